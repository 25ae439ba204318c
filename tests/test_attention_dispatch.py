"""Dispatch: validation errors, unsupported reasons, fallback chains, logging once, plans, chunking."""
from __future__ import annotations

import re
import threading

import pytest
import torch
from conftest import reference_attention

from genesis_core.attn import (
    AttentionType,
    attention,
    clear_plans,
    explain,
    last_backend,
    served_signatures,
    use_backend,
)
from genesis_core.attn import registry
from genesis_core.attn.backends import pytorch as math_backend
from genesis_core.attn.registry import Backend
from genesis_core.attn.types import AttentionCall


def qkv(b=2, h=4, nq=9, nk=7, d=16, dtype=torch.float32, hkv=None, dv=None):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, hkv or h, nk, d, dtype=dtype),
            torch.randn(b, hkv or h, nk, dv or d, dtype=dtype))


# ------------------------------------------------------------------ validation errors

@pytest.mark.parametrize(
    "make, exc, pattern",
    [
        (lambda q, k, v: ([1.0], k, v, None), TypeError, r"query must be a torch\.Tensor; got list"),
        (lambda q, k, v: (q, "k", v, None), TypeError, r"key must be a torch\.Tensor; got str"),
        (lambda q, k, v: (q[0], k, v, None), ValueError, r"query must be 4-D \[B, H, N, D\].*got shape \(4, 9, 16\)"),
        (lambda q, k, v: (q, k, v[..., 0], None), ValueError, r"value must be 4-D .*got shape \(2, 4, 7\)"),
        (lambda q, k, v: (q.long(), k, v, None), TypeError, r"query must have a floating-point dtype; got torch\.int64"),
        (lambda q, k, v: (q, k.double(), v, None), TypeError, r"key dtype torch\.float64 differs from query dtype torch\.float32"),
        (lambda q, k, v: (q, k, v.to("meta"), None), ValueError, r"value is on meta but query is on cpu"),
        (lambda q, k, v: (q, k[:1], v[:1], None), ValueError, r"batch sizes differ: query 2, key 1, value 1"),
        (lambda q, k, v: (q, k[..., :8], v, None), ValueError, r"key head_dim 8 differs from query head_dim 16"),
        (lambda q, k, v: (q, k, v[:, :, :5], None), ValueError, r"same number of tokens; got key 7, value 5"),
        (lambda q, k, v: (q, k, v[:, :2], None), ValueError, r"same number of heads; got key 4, value 2"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3], None), ValueError, r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
        (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0], None), ValueError, r"key must have no empty dimension"),
        (lambda q, k, v: (q, k, v, torch.ones(9, 6, dtype=torch.bool)), ValueError, r"mask shape \(9, 6\) does not broadcast to \[Nq, Nk\] = \(9, 7\)"),
        (lambda q, k, v: (q, k, v, torch.ones(3, 9, 7, dtype=torch.bool)), ValueError, r"mask shape \(3, 9, 7\) does not broadcast to \[B, Nq, Nk\] = \(2, 9, 7\)"),
        (lambda q, k, v: (q, k, v, torch.ones(1, 1, 1, 1, 7, dtype=torch.bool)), ValueError, r"mask must be 1-D \[Nk\].*got shape \(1, 1, 1, 1, 7\)"),
        (lambda q, k, v: (q, k, v, torch.ones(7, dtype=torch.int32)), TypeError, r"mask must be boolean .* got dtype torch\.int32"),
        (lambda q, k, v: (q, k, v, [True] * 7), TypeError, r"mask must be a torch\.Tensor; got list"),
        (lambda q, k, v: (q, k, v, torch.ones(7, dtype=torch.bool, device="meta")), ValueError, r"mask is on meta but query is on cpu"),
    ],
)
def test_bad_inputs_get_clear_errors(make, exc, pattern):
    q, k, v, mask = make(*qkv())
    with pytest.raises(exc, match=pattern):
        attention(q, k, v, mask)
    with pytest.raises(exc, match=pattern):
        explain(q, k, v, mask)


def test_bad_layout_scale_and_backend_names():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"layout must be 'BHND' or 'BNHD'; got 'BNDH'"):
        attention(q, k, v, layout="BNDH")
    with pytest.raises(ValueError, match=r"scale must be a finite number or None; got nan"):
        attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match=r"unknown attention backend 'flashy'; valid: auto, .*sdpa"):
        attention(q, k, v, backend="flashy")
    with pytest.raises(TypeError, match=r"backend must be an AttentionType or a string; got int"):
        attention(q, k, v, backend=3)


def test_bnhd_layout_errors_name_the_layout():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"query must be 4-D \[B, N, H, D\] \(layout 'BNHD'\)"):
        attention(q[0], k, v, layout="BNHD")


# ------------------------------------------------------------------ semantics

def test_layouts_and_scale_and_gqa_against_reference():
    q, k, v = qkv(h=6, hkv=2, nq=13, nk=11, d=24, dv=10)
    scale = 0.37
    ref = reference_attention(q, k, v, scale=scale)
    for name in ("pytorch", "sdpa", "auto"):
        out = attention(q, k, v, backend=name, scale=scale)
        assert torch.allclose(out.double(), ref, atol=1e-5)
        out2 = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend=name, layout="BNHD", scale=scale)
        assert out2.shape == (2, 13, 6, 10)
        assert torch.allclose(out2.transpose(1, 2).double(), ref, atol=1e-5)


def test_additive_float_mask_broadcasting_matches_reference():
    q, k, v = qkv(nq=5, nk=6)
    mask = torch.randn(2, 1, 5, 6) * 3  # real-valued bias, not just 0/-inf
    ref = reference_attention(q, k, v, mask)
    for name in ("pytorch", "sdpa", "sdpa_math"):
        assert torch.allclose(attention(q, k, v, mask, backend=name).double(), ref, atol=1e-5)


def test_pytorch_backend_chunks_queries_and_stays_exact():
    q, k, v = qkv(b=1, h=2, nq=37, nk=19, d=8)
    mask = torch.rand(37, 19) > 0.5
    mask[:, 0] = True
    call = AttentionCall(q, k, v, mask.view(1, 1, 37, 19), 8 ** -0.5)
    # A budget for five query rows per block: the whole footprint of a block, and what the call holds throughout.
    budget = math_backend.block_bytes(call, 5) + math_backend.fixed_bytes(call)
    assert math_backend.query_block(call, budget) == 5
    assert math_backend.query_block(call, budget - 1) == 4
    out = math_backend.run(call, budget)
    assert torch.allclose(out.double(), reference_attention(q, k, v, mask), atol=1e-5)


def test_pytorch_backend_block_bounds_32k_score_memory():
    """A 32k x 32k call is processed in query blocks whose whole footprint (at least the float32 scores and
    their softmax, two float32 values per score) fits the budget."""
    q = torch.empty(1, 24, 32768, 128, device="meta")
    call = AttentionCall(q, q, q, None, 1.0)
    rows = math_backend.query_block(call)
    assert rows < 32768
    assert math_backend.block_bytes(call, rows) <= math_backend.SCORE_BUDGET_BYTES
    assert rows * 24 * 32768 * 4 * 2 <= math_backend.SCORE_BUDGET_BYTES


# ------------------------------------------------------------------ unsupported reasons (every one)

def _call(device="meta", dtype=torch.float16, d=64, dv=None, mask=False, nk=128, h=2, hkv=2):
    q = torch.empty(1, h, 128, d, device=device, dtype=dtype)
    k = torch.empty(1, hkv, nk, d, device=device, dtype=dtype)
    v = torch.empty(1, hkv, nk, dv or d, device=device, dtype=dtype)
    m = torch.empty(1, 1, 128, nk, device=device, dtype=torch.bool) if mask else None
    return AttentionCall(q, k, v, m, 0.125)


@pytest.mark.parametrize(
    "backend, call, pattern",
    [
        ("sage", _call(d=192), r"head_dim 192 not supported: needs <= 128"),
        ("sage", _call(dtype=torch.float32), r"dtype float32 not supported: needs one of \(float16, bfloat16\)"),
        ("sage", _call(dv=32), r"v head_dim 32 not supported: needs v head_dim equal to q/k head_dim 64"),
        ("sage", _call(mask=True), r"mask \(bool\) not supported: needs no mask"),
        ("sage", _call(), r"device meta not supported: needs cuda"),
        ("xformers", _call(dtype=torch.float64), r"dtype float64 not supported: needs one of \(float16, bfloat16, float32\)"),
        ("xformers", _call(), r"device meta not supported: needs cuda"),
        ("sdpa_flash", _call(mask=True), r"mask \(bool\) not supported: needs no mask"),
        ("sdpa_flash", _call(), r"device meta not supported: needs cuda or cpu"),
        ("sdpa_efficient", _call(), r"device meta not supported: needs cuda"),
        ("sdpa_cudnn", _call(), r"device meta not supported: needs cuda"),
        ("flash", _call(mask=True), r"mask \(bool\) not supported: needs no mask"),
        ("flash", _call(), r"device meta not supported: needs cuda"),
    ],
)
def test_every_unsupported_reason(backend, call, pattern):
    reason = registry.get(backend).refusal(call)
    assert reason is not None and re.search(pattern, reason), reason


def test_sage_1x_refuses_key_lengths_it_gets_wrong(monkeypatch):
    from genesis_core.attn.backends import sage

    monkeypatch.setattr(sage, "_major", lambda: 1)
    reason = sage.backend.unsupported(_call(nk=77))
    assert reason.startswith("key length 77 not supported: needs a multiple of 64")
    assert sage.backend.unsupported(_call(nk=4608)) is None
    assert sage.backend.refusal(_call(nk=4608)) == "device meta not supported: needs cuda"
    monkeypatch.setattr(sage, "_major", lambda: 2)
    assert sage.backend.unsupported(_call(nk=77)) is None


def test_flash_cpu_reason_for_unequal_v_head_dim():
    reason = registry.get("sdpa_flash").refusal(_call(device="cpu", dtype=torch.float32, dv=32))
    assert reason == "v head_dim 32 not supported: needs v head_dim equal to q/k head_dim 64"


def test_unavailable_backends_say_why():
    for row in registry.report():
        if not row["available"]:
            assert isinstance(row["reason"], str) and len(row["reason"]) > 10
    if not torch.cuda.is_available():
        assert "no CUDA device" in registry.get("sdpa_cudnn").available()


# ------------------------------------------------------------------ chains, fallback and logging

def test_explain_lists_the_chain_with_reasons():
    q, k, v = qkv(d=40)
    mask = torch.ones(7, dtype=torch.bool)
    chain = explain(q, k, v, mask, backend=AttentionType.SAGE_ATTENTION)
    assert [c["name"] for c in chain] == ["sage", "sdpa", "pytorch"]
    assert chain[0]["reason"] is not None and chain[1]["reason"] is None
    chain = explain(q, k, v, backend="pytorch")
    assert [c["name"] for c in chain] == ["pytorch", "sdpa"]


def test_skip_is_logged_once_per_backend_and_reason(genesis_log):
    q, k, v = qkv()
    mask = torch.ones(7, dtype=torch.bool)
    clear_plans()
    for _ in range(3):
        attention(q, k, v, mask, backend="sdpa_flash")
    assert last_backend() == "sdpa"
    skips = [m for m in genesis_log if "'sdpa_flash' skipped" in m]
    assert len(skips) == 1 and "mask (bool) not supported" in skips[0] and "using 'sdpa'" in skips[0]


def _broken_backend(name, exc=RuntimeError("kernel exploded")):
    def run(call):
        raise exc

    return Backend(name=name, probe=lambda: None, unsupported=lambda call: None, run=run,
                   description=lambda: "test backend that always raises")


def test_runtime_failure_falls_back_logs_once_and_is_remembered(genesis_log):
    calls = []
    broken = _broken_backend("broken_test")
    orig = broken.run
    broken.run = lambda call: (calls.append(1), orig(call))
    registry.register(broken)
    try:
        q, k, v = qkv()
        for _ in range(3):
            out = attention(q, k, v, backend="broken_test")
            assert last_backend() == "sdpa"
            assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
        assert len(calls) == 1, "a failed backend is dropped from the plan, not retried every call"
        fails = [m for m in genesis_log if "'broken_test' failed" in m]
        assert len(fails) == 1 and "kernel exploded" in fails[0] and "falling back to 'sdpa'" in fails[0]
        assert any(v == "sdpa" and "requested=broken_test" in s for s, v in served_signatures().items())
    finally:
        registry.unregister("broken_test")
        clear_plans()


def test_last_link_failing_raises_the_real_error():
    orig = registry.get("pytorch")
    registry.register(_broken_backend("sdpa", ValueError("sdpa broke")))
    registry.register(_broken_backend("pytorch", ValueError("pytorch broke")))
    try:
        clear_plans()
        q, k, v = qkv()
        with pytest.raises(ValueError, match="pytorch broke"):
            attention(q, k, v, backend="sdpa")
    finally:
        from genesis_core.attn.backends import sdpa as sdpa_mod

        registry.register(sdpa_mod.backend)
        registry.register(orig)
        clear_plans()


def test_use_backend_is_thread_local():
    q, k, v = qkv()
    seen = {}

    def other():
        attention(q, k, v)
        seen["other"] = last_backend()

    with use_backend("pytorch"):
        attention(q, k, v)
        assert last_backend() == "pytorch"
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen["other"] != "pytorch"
    attention(q, k, v, backend="auto")
    assert last_backend() != "pytorch"


def test_plans_are_reused_for_the_same_signature(monkeypatch):
    from genesis_core.attn import dispatch

    clear_plans()
    q, k, v = qkv()
    attention(q, k, v, backend="pytorch")
    calls = []
    monkeypatch.setattr(dispatch, "validate", lambda *a: calls.append(1))
    attention(torch.randn_like(q), torch.randn_like(k), torch.randn_like(v), backend="pytorch")
    assert calls == [], "an already-seen signature must not be validated again"
    attention(torch.randn(1, 4, 9, 16), torch.randn(1, 4, 7, 16), torch.randn(1, 4, 7, 16), backend="pytorch")
    assert calls == [1]


def test_scale_is_checked_on_every_call_not_only_the_first():
    q, k, v = qkv()
    attention(q, k, v, scale=0.25, backend="pytorch")
    for bad in (float("inf"), float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"scale must be a finite number or None"):
            attention(q, k, v, scale=bad, backend="pytorch")


def test_strides_and_grad_mode_get_their_own_plans():
    from genesis_core.attn import dispatch

    clear_plans()
    q, k, v = qkv()
    attention(q, k, v, backend="pytorch")
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, other strides
    out = attention(qt, k, v, backend="pytorch")
    assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    attention(q.requires_grad_(), k, v, backend="pytorch")
    assert len(dispatch._plans) == 3


def test_sage_refuses_inputs_that_need_a_backward():
    from genesis_core.attn.backends import sage

    call = _call()
    call.q.requires_grad_()
    assert sage.backend.refusal(call).startswith("inputs that require grad not supported: needs torch.no_grad()")
    with torch.no_grad():
        assert sage.backend.refusal(call) == "device meta not supported: needs cuda"


def test_concurrent_failures_drop_only_the_failing_backend():
    from genesis_core.attn import dispatch

    barrier = threading.Barrier(2, timeout=10)

    def run(call):
        barrier.wait()
        raise RuntimeError("both threads fail here together")

    registry.register(Backend(name="racy_test", probe=lambda: None, unsupported=lambda c: None, run=run,
                              description=lambda: "fails in two threads at once"))
    try:
        clear_plans()
        q, k, v = qkv()
        seen = []
        threads = [threading.Thread(target=lambda: (attention(q, k, v, backend="racy_test"),
                                                    seen.append(last_backend()))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == ["sdpa", "sdpa"]
        (plan,) = [p for key, p in dispatch._plans.items() if key[0] == "racy_test"]
        assert [b.name for b in plan.chain] == ["sdpa", "pytorch"]
    finally:
        registry.unregister("racy_test")
        clear_plans()


def test_out_of_memory_falls_back_for_that_call_only(genesis_log):
    calls = []

    def run(call):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return registry.get("pytorch").run(call)

    registry.register(Backend(name="oom_test", probe=lambda: None, unsupported=lambda c: None, run=run,
                              description=lambda: "out of memory once"))
    try:
        clear_plans()
        q, k, v = qkv()
        attention(q, k, v, backend="oom_test")
        assert last_backend() == "sdpa"
        assert any("this call only" in m for m in genesis_log)
        out = attention(q, k, v, backend="oom_test")
        assert last_backend() == "oom_test" and len(calls) == 2
        assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    finally:
        registry.unregister("oom_test")
        clear_plans()


def test_reprobe_forgets_plans():
    from genesis_core.attn import dispatch

    q, k, v = qkv()
    attention(q, k, v, backend="pytorch")
    assert dispatch._plans
    registry.get("pytorch").reprobe()
    assert not dispatch._plans


# ------------------------------------------------------------------ the direct path (registry.Backend.direct)

def test_direct_path_serves_only_unmasked_default_scale_calls(monkeypatch):
    """sdpa's direct path skips run(call) for the common call, in either layout; masks, scales and GQA still go
    through run."""
    sdpa_backend = registry.get("sdpa")
    orig = sdpa_backend.run
    runs = []
    monkeypatch.setattr(sdpa_backend, "run", lambda call: (runs.append(1), orig(call))[1])
    clear_plans()
    q, k, v = qkv(b=int(torch.randint(1, 3, ())), nq=int(torch.randint(3, 12, ())), nk=int(torch.randint(3, 12, ())))
    for _ in range(3):
        out = attention(q, k, v, backend="sdpa")
        assert last_backend() == "sdpa"
        assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    assert runs == [], "the unmasked default-scale call must take the direct path"
    mask = torch.rand(q.shape[2], k.shape[2]) > 0.3
    mask[:, 0] = True
    cases = [  # (call, reference, goes through run(call))
        (lambda: attention(q, k, v, mask, backend="sdpa"), reference_attention(q, k, v, mask), True),
        (lambda: attention(q, k, v, backend="sdpa", scale=0.3), reference_attention(q, k, v, scale=0.3), True),
        (lambda: attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="sdpa",
                           layout="BNHD").transpose(1, 2), reference_attention(q, k, v), False),
        (lambda: attention(q, k[:, :2], v[:, :2], backend="sdpa"), reference_attention(q, k[:, :2], v[:, :2]), True),
    ]
    for i, (fn, ref, through_run) in enumerate(cases):
        before = len(runs)
        out = fn()
        assert len(runs) == before + through_run, f"case {i}: through run(call) expected {through_run}"
        assert torch.allclose(out.double(), ref, atol=1e-5), f"case {i}"


@pytest.mark.parametrize("run_works", [True, False])
def test_direct_path_failure_is_dropped_and_falls_back(genesis_log, run_works):
    direct_calls, run_calls = [], []

    def broken_direct(q, k, v):
        direct_calls.append(1)
        raise RuntimeError("direct kernel exploded")

    def run(call):
        run_calls.append(1)
        if not run_works:
            raise RuntimeError("run kernel exploded")
        return registry.get("pytorch").run(call)

    registry.register(Backend(name="direct_test", probe=lambda: None, unsupported=lambda c: None, run=run,
                              description=lambda: "direct path that raises", direct=lambda call: broken_direct))
    try:
        clear_plans()
        q, k, v = qkv()
        for _ in range(3):
            out = attention(q, k, v, backend="direct_test")
            assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
            assert last_backend() == ("direct_test" if run_works else "sdpa")
        assert len(direct_calls) == 1, "a direct path that raised is not tried again for that signature"
        assert len(run_calls) == (3 if run_works else 1)
        fails = [m for m in genesis_log if "'direct_test' failed" in m and "direct path" not in m]
        assert len(fails) == (0 if run_works else 1)
        direct_logs = [m for m in genesis_log if "direct path of attention backend 'direct_test' failed" in m]
        assert len(direct_logs) == 1 and "direct kernel exploded" in direct_logs[0], genesis_log
    finally:
        registry.unregister("direct_test")
        clear_plans()
