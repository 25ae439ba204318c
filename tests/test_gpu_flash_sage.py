"""The FlashAttention packages and SageAttention 2.x on a real GPU (skipped without CUDA or the package).

Every backend against float64 on hypothesis-drawn calls within its declared limits (FA4: few configurations,
each compiles at its first call), BNHD views in and contiguous BNHD out with no copy of q, k or v (the kernel
gets the caller's tensors; the peak memory of a call is its output), SageAttention 2 called with the caller's k
(no smoothed copy), and the probe's NaN poisoning seen by the real caching allocator.
"""
from __future__ import annotations

import pytest
import torch
from conftest import l2_and_cosine, reference_attention, requires_cuda
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genesis_core.attn import attention, clear_plans, explain, last_backend, quality, registry
from genesis_core.attn.backends import _flash_pkg, fa2, fa3, fa4, flash, sage, sage2

pytestmark = [pytest.mark.gpu, requires_cuda]

EXACT = ("flash", "fa2", "fa3", "fa4")
LOSSY = ("sage", "sage2_fp8", "sage2_fp16", "sage2_triton")
LEVEL = {"exact": "exact", "int8": "high", "fp8": "fast"}


def _available(name):
    reason = registry.get(name).available()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    return registry.get(name)




@st.composite
def calls(draw, name):
    """A call inside ``name``'s limits: FA4 draws few configurations (each compiles once)."""
    if name in ("fa4", "flash"):
        d, group, dtypes = draw(st.sampled_from([64, 128])), draw(st.sampled_from([1, 2])), [torch.bfloat16]
    elif name in EXACT:
        d, group, dtypes = draw(st.sampled_from([32, 64, 96, 128, 256])), draw(st.sampled_from([1, 2, 4])), \
            [torch.bfloat16, torch.float16]
    else:
        d, group, dtypes = draw(st.sampled_from([40, 64, 96, 128])), draw(st.sampled_from([1, 2])), \
            [torch.bfloat16, torch.float16]
    b, hkv = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    nq = draw(st.sampled_from([1, 77, 128, 300]) | st.integers(1, 300))
    min_nk = registry.get(name).limits.min_kv_len or 1  # SageAttention: 2 (one smoothed key is all zeros)
    nk = draw(st.sampled_from([min_nk, 77, 128, 300]) | st.integers(min_nk, 300))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["BHND", "BNHD"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shapes = ((b, hkv * group, nq, d), (b, hkv, nk, d), (b, hkv, nk, d))
    q, k, v = (torch.randn(s, generator=g).to("cuda", dtype) for s in shapes)
    return q, k, v, layout


@pytest.mark.parametrize("name", EXACT + LOSSY)
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_backend_matches_float64_within_its_class(name, data, genesis_log):
    b = _available(name)
    q, k, v, layout = data.draw(calls(name))
    args = [t.transpose(1, 2).contiguous() if layout == "BNHD" else t for t in (q, k, v)]
    level = LEVEL[b.precision]
    chain = explain(*args, backend=name, layout=layout, quality=level)
    if chain[0]["reason"] is not None:  # drawn inside the declared limits: only a build's own gaps may refuse
        assert "FLASHATTENTION_DISABLE" in chain[0]["reason"], chain
        return
    out = attention(*args, backend=name, layout=layout, quality=level)
    assert last_backend() == name, (chain, genesis_log[-3:])
    out = out.transpose(1, 2) if layout == "BNHD" else out
    rel, cos = l2_and_cosine(out, reference_attention(q, k, v))
    max_rel, min_cos = quality.thresholds(level, q.dtype, b.tolerance.get(q.dtype))
    assert rel <= max_rel and cos >= min_cos, \
        f"{name} {tuple(q.shape)}/{tuple(k.shape)} {q.dtype} {layout}: rel {rel:.3g} cos {cos:.6f}"


class Spy:
    """Wraps a kernel function and keeps what it was handed and what it returned."""

    def __init__(self, fn):
        self.fn, self.seen = fn, []

    def __call__(self, q, k, v, *args, **kwargs):
        out = self.fn(q, k, v, *args, **kwargs)
        self.seen.append({"q": (q.data_ptr(), q.stride()), "k": (k.data_ptr(), k.stride()), "kwargs": kwargs,
                          "out": _flash_pkg.first(out).data_ptr()})
        return out


@pytest.mark.parametrize("name, module", [("fa2", fa2), ("fa3", fa3), ("fa4", fa4)])
def test_bnhd_views_reach_the_kernel_and_come_back_without_a_copy(name, module, monkeypatch):
    _available(name)
    spy = Spy(module._fn)
    monkeypatch.setattr(module, "_fn", spy)
    clear_plans()
    q, k, v = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    attention(q, k, v, backend=name, layout="BNHD")  # a first call (FA4: compiled before, by the probe)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = attention(q, k, v, backend=name, layout="BNHD")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert last_backend() == name
    assert spy.seen[-1]["q"] == (q.data_ptr(), q.stride()) and spy.seen[-1]["k"] == (k.data_ptr(), k.stride())
    assert out.is_contiguous() and out.data_ptr() == spy.seen[-1]["out"]  # the kernel's own output, BNHD
    assert extra < out.numel() * out.element_size() + (2 << 20), f"{extra} bytes beyond the inputs: a copy?"
    clear_plans()


@pytest.mark.parametrize("name", ["sage", "sage2_fp8", "sage2_fp16", "sage2_triton"])
def test_sage2_gets_the_callers_k_and_returns_contiguous_bnhd(name, monkeypatch):
    b = _available(name)
    if name == "sage":
        if sage._major() < 2:
            pytest.skip("SageAttention 1.x: Genesis smooths a copy of k by design")
        spy = Spy(sage._sageattn)
        monkeypatch.setattr(sage, "_sageattn", spy)
    else:
        spy = Spy(sage2.variants[name].fn)
        monkeypatch.setattr(sage2.variants[name], "fn", spy)
        assert "smooth_k=True" in b.description()
    clear_plans()
    q, k, v = (torch.randn(1, 4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k0 = k.clone()
    out = attention(q, k, v, backend=name, layout="BNHD", quality=LEVEL[b.precision])
    assert last_backend() == name
    seen = spy.seen[-1]
    assert seen["k"] == (k.data_ptr(), k.stride()) and seen["kwargs"]["tensor_layout"] == "NHD"
    assert out.is_contiguous() and torch.equal(k, k0)
    clear_plans()


def test_fa4_first_call_cost_is_known_after_the_probe():
    b = _available("fa4")
    assert f"bfloat16 head_dim {fa4.PROBE_HEAD_DIM}" in fa4.first_calls()
    assert b.first_call_s is not None and b.first_call_s > 0
    row = next(r for r in registry.report() if r["name"] == "fa4")
    assert row["first_call_s"] == b.first_call_s and "compiled per configuration" in row["kernel"]


def test_sage_precision_is_what_sageattn_runs_on_this_gpu():
    b = _available("sage")
    if sage._major() >= 2:
        name, cls = sage.dispatched(torch.cuda.get_device_capability())
        assert b.precision == cls and name in b.description()
    else:
        assert b.precision == "int8"


@pytest.mark.parametrize("intermediates", [False, True])
def test_the_probe_sees_unwritten_output_through_the_real_allocator(intermediates):
    """A kernel that returns torch.empty(...) (with, like SageAttention, int8 copies of q and k allocated first)."""
    def unwritten(call):
        if intermediates:
            scratch = [torch.empty(call.q.numel(), dtype=torch.int8, device="cuda") for _ in range(2)]
            scratch.append(torch.empty(call.batch * call.heads * 8, dtype=torch.float32, device="cuda"))
        out = torch.empty(call.batch, call.q_len, call.heads, call.v_head_dim, dtype=call.dtype, device="cuda")
        return out.transpose(1, 2)

    reason = _flash_pkg.probe_call(unwritten, "cuda", torch.bfloat16, 2e-2)
    assert reason == ("returns output memory it never wrote (NaN where the float64 reference is finite, "
                      "detected by a NaN-poisoned probe)")


def test_flash_umbrella_serves_with_the_best_member():
    b = _available("flash")
    live = [m.name for m in flash.members()]
    order = flash.member_order(torch.cuda.get_device_capability())
    want = [n for n in order if registry.get(n).available() is None]
    assert live == want and b.description().startswith(want[0])
    q, k, v = (torch.randn(1, 1024, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, backend="flash", layout="BNHD")
    assert last_backend() == "flash" and out.is_contiguous()
