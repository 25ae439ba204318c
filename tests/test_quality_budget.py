"""Limits as data, quality budgets and the guard, on CPU with fake backends: a lossy kernel is only ever served
under a budget that admits its class and when its measured error on the live inputs fits that budget; a kernel
that returns NaN, garbage or memory it never wrote is never served."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import genesis_core
from conftest import reference_attention
from genesis_core.attn import autotune, dispatch, quality, registry
from genesis_core.attn.autotune import measuring
from genesis_core.attn.limits import Limits, check
from genesis_core.attn.registry import Backend
from genesis_core.attn.types import AttentionCall


def qkv(b=1, h=2, nq=24, nk=20, d=16, dtype=torch.float32):
    return (torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, h, nk, d, dtype=dtype),
            torch.randn(b, h, nk, d, dtype=dtype))


def _call(**kw):
    q, k, v = qkv(**kw)
    return AttentionCall(q, k, v, None, q.shape[-1] ** -0.5)


# ------------------------------------------------------------------ limits as data


@pytest.mark.parametrize("limits, call_kw, mask, grad, expected", [
    (Limits(dtypes=(torch.float16,)), {}, False, False, "dtype float32 not supported: needs one of (float16)"),
    (Limits(devices=("cuda",)), {}, False, False, "device cpu not supported: needs cuda"),
    (Limits(head_dims=(64, 128)), {"d": 16}, False, False, "head_dim 16 not supported: needs one of (64, 128)"),
    (Limits(max_head_dim=8), {"d": 16}, False, False, "head_dim 16 not supported: needs <= 8"),
    (Limits(head_dim_multiple=32), {"d": 16}, False, False, "head_dim 16 not supported: needs a multiple of 32"),
    (Limits(mask=False), {}, True, False, "mask (bool) not supported: needs no mask"),
    (Limits(kv_len_multiple=64), {"nk": 20}, False, False, "key length 20 not supported: needs a multiple of 64"),
    (Limits(min_kv_len=32), {"nk": 20}, False, False, "key length 20 not supported: needs >= 32"),
    (Limits(autograd=False), {}, False, True,
     "inputs that require grad not supported: needs torch.no_grad() (this kernel has no backward pass)"),
])
def test_every_limit_has_one_wording(limits, call_kw, mask, grad, expected):
    call = _call(**call_kw)
    if mask:
        call.mask = torch.ones(1, 1, call.q_len, call.kv_len, dtype=torch.bool)
    if grad:
        call.q.requires_grad_()
    assert check(limits, call) == expected
    assert check(Limits(), call) is None  # no limits: nothing refused


def test_limits_equal_v_head_dim_and_gqa():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 32)
    call = AttentionCall(q, k, v, None, 0.25)
    assert check(Limits(equal_v_head_dim=True), call) == (
        "v head_dim 32 not supported: needs v head_dim equal to q/k head_dim 16")
    assert check(Limits(gqa=False), call).startswith("grouped-query attention (4 query / 2 kv heads) not supported")


def test_a_backend_with_limits_is_refused_by_dispatch_with_the_reason(genesis_log):
    registry.register(Backend(name="limited_test", probe=lambda: None, run=lambda c: registry.get("pytorch").run(c),
                              description=lambda: "test", limits=Limits(head_dims=(64,))))
    try:
        q, k, v = qkv(d=16)
        out = genesis_core.attention(q, k, v, backend="limited_test")
        assert dispatch.last_backend() == "sdpa"
        assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
        assert any("'limited_test' skipped: head_dim 16 not supported: needs one of (64,)" in m for m in genesis_log)
    finally:
        registry.unregister("limited_test")


def test_registry_order_is_data_not_import_order():
    names = registry.names()
    assert names.index("flash") < names.index("sdpa") < names.index("pytorch")
    registry.register(Backend(name="ranked_test", probe=lambda: None, run=lambda c: None,
                              description=lambda: "t"), rank=-5)
    try:
        assert registry.names()[0] == "ranked_test"
    finally:
        registry.unregister("ranked_test")
    assert dispatch.DEFAULT_AUTO_ORDER[0] == "sdpa"


# ------------------------------------------------------------------ quality levels


def test_quality_levels_parse_and_default(monkeypatch):
    assert quality.normalise(" FAST ") == "fast"
    with pytest.raises(ValueError, match=r"quality must be one of exact, high, fast; got 'turbo'"):
        quality.normalise("turbo")
    monkeypatch.setenv("GENESIS_QUALITY", "high")
    quality.set_default(None)
    try:
        assert quality.default() == "high"
        monkeypatch.setenv("GENESIS_QUALITY", "bogus")
        quality.set_default(None)
        with pytest.raises(ValueError, match=r"\$GENESIS_QUALITY must be one of"):
            quality.default()
    finally:
        monkeypatch.delenv("GENESIS_QUALITY")
        quality.set_default(None)
    assert quality.default() == "exact"
    assert quality.admits("exact", "exact") and not quality.admits("exact", "int8")
    assert quality.admits("high", "int8") and not quality.admits("high", "fp8") and quality.admits("fast", "fp8")
    assert [quality.loosest_for(c) for c in quality.CLASSES] == ["exact", "high", "fast"]


def test_verdict_names_the_numbers():
    assert quality.verdict("exact", torch.float32, 5e-4, 0.9) is None
    assert "relative error 0.002 > tolerance 0.001 (float32, quality 'exact')" in quality.verdict(
        "exact", torch.float32, 2e-3, None)
    rel, cos = quality.LOSSY["high"]
    assert quality.verdict("high", torch.bfloat16, rel / 2, cos + (1 - cos) / 2) is None
    assert "cosine similarity" in quality.verdict("high", torch.bfloat16, rel / 2, cos - 1e-3)
    assert "NaN" in quality.verdict("fast", torch.bfloat16, float("nan"), None)


def test_bad_quality_argument_names_it():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"quality must be one of exact, high, fast; got 'best'"):
        genesis_core.attention(q, k, v, quality="best")


# ------------------------------------------------------------------ fake lossy backends


def _noisy(rel: float):
    """A CPU 'kernel' whose output is the true attention plus noise of relative L2 size ``rel``."""
    def run(call):
        out = F.scaled_dot_product_attention(call.q, call.k, call.v, scale=call.scale)
        noise = torch.randn_like(out)
        return out + noise * (rel * out.norm() / noise.norm())
    return run


def _stale():
    """A 'kernel' that hands back a buffer it wrote once, on the first inputs it saw: memory it never wrote."""
    box = {}

    def run(call):
        if "out" not in box:
            box["out"] = F.scaled_dot_product_attention(call.q, call.k, call.v, scale=call.scale)
        return box["out"]
    return run


@pytest.fixture
def lossy(tmp_path, monkeypatch):
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(tmp_path / "cache"))
    autotune.set_mode("all")
    autotune.clear()
    added = []

    def add(name, run, precision="fp8"):
        registry.register(Backend(name=name, probe=lambda: None, run=run, description=lambda: "test lossy kernel",
                                  precision=precision))
        added.append(name)

    yield add
    for name in added:
        registry.unregister(name)
    autotune.set_mode(None)
    autotune.clear(disk=False)


def test_exact_budget_never_tries_a_lossy_kernel(lossy, monkeypatch):
    tried = []
    lossy("fp8_test", lambda call: (tried.append(1), _noisy(1e-2)(call))[1])
    q, k, v = qkv()
    out = genesis_core.attention(q, k, v)  # quality exact by default
    assert tried == [] and dispatch.last_backend() != "fp8_test"
    assert torch.allclose(out.double(), reference_attention(q, k, v), atol=1e-5)
    chain = genesis_core.explain(q, k, v, backend="fp8_test", quality="exact")
    assert "outside the quality budget 'exact'" in chain[0]["reason"] and "quality='fast'" in chain[0]["reason"]


def test_fast_budget_serves_a_lossy_kernel_only_within_its_thresholds(lossy):
    rel_ok = quality.LOSSY["fast"][0] / 4
    lossy("fp8_good", _noisy(rel_ok))
    lossy("fp8_bad", _noisy(quality.LOSSY["fast"][0] * 3))
    lossy("fp8_nan", lambda call: torch.full_like(call.q, float("nan")))
    q, k, v = qkv()
    genesis_core.attention(q, k, v, quality="fast")
    (row,) = autotune.timings().values()
    entry = autotune.lookup(next(iter(autotune.timings())))
    assert "fp8_good" in row and "fp8_good" not in row["rejected"]
    assert math.isclose(entry["rel_err"]["fp8_good"], rel_ok, rel_tol=0.35)
    assert "relative error" in row["rejected"]["fp8_bad"] and "quality 'fast'" in row["rejected"]["fp8_bad"]
    assert "NaN" in row["rejected"]["fp8_nan"]
    # whatever fast picks, it is never one of the rejected ones; exact never picks a lossy one
    assert autotune.pick(entry, list(row["rejected"]) + ["fp8_good", "sdpa"], "fast") in ("fp8_good", "sdpa")
    assert autotune.pick(entry, ["fp8_good", "sdpa", "pytorch"], "exact") != "fp8_good"


def test_one_measurement_serves_every_budget_and_a_stricter_level_refuses_with_the_numbers(lossy, genesis_log):
    high_rel = quality.LOSSY["high"][0]
    lossy("int8_mid", _noisy(high_rel * 1.5), precision="int8")  # fits 'fast', not 'high'
    q, k, v = qkv()
    genesis_core.attention(q, k, v, quality="fast")
    sig = next(iter(autotune.timings()))
    entry = autotune.lookup(sig)
    ms = dict(entry["ms"], int8_mid=min(entry["ms"].values()) / 10)  # make it the fastest on paper
    entry = dict(entry, ms=ms)
    assert autotune.pick(entry, list(ms), "fast") == "int8_mid"
    assert autotune.pick(entry, list(ms), "high") != "int8_mid"
    refused = autotune.refused_for(entry, ["int8_mid"], "high")
    assert "relative error" in refused["int8_mid"] and "quality 'high'" in refused["int8_mid"]


def test_the_measurement_log_says_what_each_level_serves(lossy, genesis_log):
    """The log line of a measurement named only exact's choice ("chose flash" on Wan 480p, where fast served
    fa3_fp8, H200 2026-12-02): where the levels differ it names each level's pick."""
    from genesis_core.attn.autotune import store
    lossy("fp8_fastest", _noisy(quality.LOSSY["fast"][0] / 4))
    q, k, v = qkv()
    genesis_core.attention(q, k, v, quality="fast")
    sig = next(iter(autotune.timings()))
    entry = autotune.lookup(sig)
    entry = dict(entry, ms=dict(entry["ms"], fp8_fastest=min(entry["ms"].values()) / 10))
    exact = autotune.pick(entry, list(entry["ms"]), "exact")
    del genesis_log[:]
    store.log_entry(sig, entry)
    msg = genesis_log[-1]
    assert f"chose {exact} at exact, {exact} at high, fp8_fastest at fast; " in msg, msg
    store.log_entry(sig, dict(entry, ms={n: t for n, t in entry["ms"].items() if n != "fp8_fastest"}))
    assert f"chose {entry['chosen']}; " in genesis_log[-1], genesis_log[-1]


def test_explicit_lossy_choice_is_guarded_on_the_live_inputs(lossy, genesis_log):
    autotune.set_mode("off")  # no autotuner data: the guard alone decides
    lossy("fp8_stale", _stale())
    lossy("fp8_fine", _noisy(quality.LOSSY["fast"][0] / 5))
    q, k, v = qkv()
    first = genesis_core.attention(q, k, v, backend="fp8_stale")  # first inputs: what it returns is right
    q2, k2, v2 = qkv()  # same signature, new data: its stale buffer is memory it never wrote for these inputs
    dispatch.clear_plans()
    out = genesis_core.attention(q2, k2, v2, backend="fp8_stale")
    assert dispatch.last_backend() == "sdpa"
    assert torch.allclose(out.double(), reference_attention(q2, k2, v2), atol=1e-5)
    assert any("'fp8_stale' skipped: relative error" in m for m in genesis_log), genesis_log
    assert first.shape == out.shape
    out = genesis_core.attention(q2, k2, v2, backend="fp8_fine")  # its class implies 'fast': served
    assert dispatch.last_backend() == "fp8_fine"
    out = genesis_core.attention(q2, k2, v2, backend="fp8_fine", quality="high")  # stricter budget: refused
    assert dispatch.last_backend() == "sdpa"


def test_guard_poisons_memory_so_an_unwritten_output_reads_nan():
    call = _call()
    box = {}

    class Unwritten:
        name, precision, tolerance = "unwritten", "fp8", {}

        @staticmethod
        def run(c):
            return torch.empty(c.batch, c.heads, c.q_len, c.v_head_dim, dtype=c.dtype)

    reason = measuring.check_output(call, Unwritten, "fast")
    assert reason is not None, "an output nothing wrote must never pass"
    box["ok"] = measuring.check_output(call, registry.get("sdpa"), "exact")
    assert box["ok"] is None


def test_the_spec_modules_carry_a_quality_budget(lossy):
    from genesis_core import AdaptiveAttentionSwitch, CrossAttentionModule

    autotune.set_mode("off")
    lossy("fp8_mod", _noisy(quality.LOSSY["fast"][0] / 5))
    x, ctx = torch.randn(2, 12, 32), torch.randn(2, 7, 16)
    m = CrossAttentionModule(32, 16, 4, backend="fp8_mod")
    m(x, ctx)
    assert dispatch.last_backend() == "fp8_mod"  # an explicit lossy choice implies its level
    m = CrossAttentionModule(32, 16, 4, backend="fp8_mod", quality="exact")
    m(x, ctx)
    assert dispatch.last_backend() == "sdpa"
    s = AdaptiveAttentionSwitch(32, 4, quality="HIGH")
    assert s.quality == "high"
    with pytest.raises(ValueError, match="quality must be one of"):
        s.set_quality("ultra")
    with pytest.raises(ValueError, match="quality must be one of"):
        CrossAttentionModule(32, 16, 4, quality=3)


def test_reference_kernels_are_not_run_where_they_cannot_win(lossy, monkeypatch):
    """On a call whose fastest kernel is slow, the (much slower) reference kernels are skipped for good."""
    ran = []
    pytorch = registry.get("pytorch")
    monkeypatch.setattr(pytorch, "run", lambda call: (ran.append(1), F.scaled_dot_product_attention(
        call.q, call.k, call.v, scale=call.scale))[1])
    monkeypatch.setattr(measuring, "REFERENCE_SKIP_MS", 0.0)  # every call counts as slow here
    q, k, v = qkv()
    call = AttentionCall(q, k, v, None, q.shape[-1] ** -0.5)
    entry = measuring.measure(call, ["sdpa", "pytorch"])
    assert ran and "pytorch" in entry["ms"], "on CPU the reference kernels are always measured"
    ran.clear()
    monkeypatch.setattr(measuring, "_device_type", lambda device: "cuda")  # as if on an accelerator
    entry = measuring.measure(call, ["sdpa", "pytorch"])
    assert ran == [] and "skipped: a reference kernel" in entry["rejected"]["pytorch"]
    assert autotune.known(entry, ["sdpa", "pytorch"]), "a lasting reason: not measured again on the next shape"
    monkeypatch.setattr(measuring, "REFERENCE_SKIP_MS", float("inf"))
    entry = measuring.measure(call, ["sdpa", "pytorch"])
    assert ran and "pytorch" in entry["ms"]


def test_unmeasured_auto_on_cuda_runs_what_comfyui_runs(monkeypatch):
    """Without a measurement, AUTO on CUDA tries sdpa_cudnn first (ComfyUI calls SDPA with cuDNN first), then sdpa;
    on other devices sdpa first. Checked with meta tensors relabelled as CUDA (no kernel runs)."""
    from genesis_core.attn import install_autotuner, uninstall_autotuner

    uninstall_autotuner()  # nothing measured: the unmeasured order alone
    try:
        q, k, v = qkv()
        call = AttentionCall(q, k, v, None, 0.25)
        assert dispatch.chain_for("auto", call)[0] == "sdpa"

        class FakeCuda:
            type = "cuda"

        monkeypatch.setattr(AttentionCall, "device", property(lambda self: FakeCuda()))
        chain = dispatch.chain_for("auto", call)
        assert chain[:2] == ["sdpa_cudnn", "sdpa"] and chain[-1] == "pytorch"
        assert dispatch.chain_for("sdpa", call)[0] == "sdpa"  # an explicit choice is unchanged
    finally:
        install_autotuner()


# ------------------------------------------------------------------ argument errors a newcomer meets (issue 12 item 13)


def test_layout_is_case_insensitive_like_backend_names():
    q, k, v = qkv()
    ref = genesis_core.attention(q, k, v)
    out = genesis_core.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="bnhd")
    torch.testing.assert_close(out.transpose(1, 2), ref)
    torch.testing.assert_close(genesis_core.attention(q, k, v, layout="bhnd"), ref)


def test_swapped_layout_is_named_in_the_error():
    q = torch.randn(1, 4, 6, 16)  # BHND with H=4, N=6
    k = v = torch.randn(1, 4, 5, 16)
    with pytest.raises(ValueError, match=r"axes 1 and 2 look swapped, pass layout='BHND'"):
        genesis_core.attention(q, k, v, layout="BNHD")


def test_a_key_padding_mask_gets_a_hint_on_how_to_shape_it():
    q, k, v = qkv(b=2, nq=24, nk=20)
    pad = torch.rand(2, 20) > 0.2
    pad[:, 0] = True
    with pytest.raises(ValueError, match=r"\[B, Nk\] key-padding mask, pass mask\[:, None, :\]"):
        genesis_core.attention(q, k, v, pad)
    out = genesis_core.attention(q, k, v, pad[:, None, :])
    assert torch.allclose(out.double(), reference_attention(q, k, v, pad[:, None, None, :]), atol=1e-5)


def test_served_signatures_stay_bounded(monkeypatch):
    monkeypatch.setattr(dispatch, "_MAX_PLANS", 8)
    dispatch.clear_plans()
    for n in range(2, 30):
        q = torch.randn(1, 1, n, 4)
        genesis_core.attention(q, q, q, backend="pytorch")
    assert 0 < len(dispatch.served_signatures()) <= 8
