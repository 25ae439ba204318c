"""GPU: the Triton FP8 quantiser against the PyTorch reference (bit for bit), and the FP8 backends (fa3_fp8,
fp8_cudnn) against float64 attention within the ``fast`` quality level, on hypothesis-drawn shapes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genesis_core.attn import attention, last_backend, quality, registry
from genesis_core.attn.types import AttentionCall
from genesis_core.attn.quant import fp8
from tests.conftest import l2_and_cosine, reference_attention, requires_cuda

pytestmark = [pytest.mark.gpu, requires_cuda]

E4M3 = torch.float8_e4m3fn
HALF = (torch.bfloat16, torch.float16)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _inputs(B, H, NQ, NK, D, dtype, layout, k_bias=0.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def make(n, extra=0.0):
        shape = (B, n, H, D) if layout == "BNHD" else (B, H, n, D)
        x = torch.randn(shape, device="cuda", generator=g)
        if extra:
            x = x + extra * torch.randn(D, device="cuda", generator=g)
        x = x.to(dtype)
        return x.transpose(1, 2) if layout == "BNHD" else x

    return make(NQ), make(NK, k_bias), make(NK)


def _skip_unless_available(name):
    why = registry.get(name).available()
    if why is not None:
        pytest.skip(f"{name}: {why}")




# ---------------------------------------------------------------- the quantiser


MIXED = ("tensor", "tensor", "head")  # what fp8_cudnn asks for on Hopper


def _check_against_reference(got, q, k, v, granularity, smooth, what=""):
    ref = fp8.quantize_qkv_reference(q, k, v, granularity, smooth_k=smooth, k_mean=got.k_mean)
    for name, a, b in zip("qkv", got[:3], ref[:3]):
        assert a.dtype == E4M3 and a.shape == b.shape and a.is_contiguous()
        bad = a.float() != b.float()
        assert not bool(bad.any()), f"{name}: {int(bad.sum())} of {bad.numel()} elements differ {what}"
    assert torch.equal(got.descale, ref.descale), (got.descale, ref.descale)
    assert torch.equal(got.spread, ref.spread), (got.spread, ref.spread)


def _counters_zero():
    return all(not bool(buf.any()) for buf in fp8._counters.values())


@settings(max_examples=40, **SETTINGS)
@given(B=st.integers(1, 2), H=st.integers(1, 5), NQ=st.integers(1, 3000), NK=st.integers(1, 3000),
       D=st.sampled_from([16, 64, 80, 128, 256]), dtype=st.sampled_from(HALF + (torch.float32,)),
       layout=st.sampled_from(["BNHD", "BHND"]), granularity=st.sampled_from(["head", "tensor", MIXED]),
       smooth=st.booleans(), exact=st.booleans(), k_bias=st.sampled_from([0.0, 20.0]), seed=st.integers(0, 99),
       silent=st.booleans(), quiet=st.sampled_from([0, 12, 40]))
def test_triton_quantiser_matches_the_reference_bit_for_bit(B, H, NQ, NK, D, dtype, layout, granularity, smooth,
                                                            exact, k_bias, seed, silent, quiet):
    q, k, v = _inputs(B, H, NQ, NK, D, dtype, layout, k_bias=k_bias, seed=seed)
    if silent:  # an all-zero q head and v head: descale 1, exact zeros
        q[0, -1] = 0.0
        v[-1, 0] = 0.0
    if quiet:  # a head 2**quiet quieter than the rest (the spread counts it)
        k[0, 0] *= 2.0 ** -quiet
    got = fp8.quantize_qkv(q, k, v, granularity, smooth_k=smooth, exact_round=exact)
    torch.cuda.synchronize()
    if smooth:
        assert torch.allclose(got.k_mean, k.float().mean(dim=2), rtol=1e-5, atol=1e-4)
    _check_against_reference(got, q, k, v, granularity, smooth, f"(exact_round={exact})")
    assert bool(torch.isfinite(got.descale).all()) and _counters_zero()


def test_direct_launches_match_triton_launches_bit_for_bit():
    """The second call of a shape launches the compiled kernels directly (no Triton binding); both launch
    paths give the reference's bits, and the direct path was taken."""
    kern = fp8._kernels()
    q, k, v = _inputs(2, 3, 1000, 777, 128, torch.bfloat16, "BNHD", k_bias=20.0, seed=7)
    for granularity in ("head", MIXED):
        results = []
        for fast in (False, True, True):
            kern.fast_launch(fast)
            results.append(fp8.quantize_qkv(q, k, v, granularity, smooth_k=True))
        torch.cuda.synchronize()
        assert kern.fast_launch() and len(kern._STATS_SMOOTH.compiled) >= 1 and len(kern._CAST.compiled) >= 1
        for r in results:
            _check_against_reference(r, q, k, v, granularity, True)
    o8 = (torch.randn(2, 100, 3, 128, device="cuda") * 50).clamp(-440, 440).to(E4M3)
    d = torch.ones(2, 3, device="cuda")
    outs = [fp8.dequantize_output(o8, d, 2.0, torch.bfloat16) for _ in range(3)]
    assert len(kern._DEQUANT.compiled) >= 1 and all(torch.equal(o, outs[0]) for o in outs)


def test_counters_are_zero_after_each_call_and_kept_per_stream():
    q, k, v = _inputs(1, 4, 2000, 2000, 64, torch.bfloat16, "BNHD", k_bias=5.0, seed=3)
    fp8.quantize_qkv(q, k, v)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = fp8.quantize_qkv(q, k, v, "tensor")
    torch.cuda.synchronize()
    assert len({key[2] for key in fp8._counters if key[0] == "cuda"}) >= 2 and _counters_zero()
    _check_against_reference(got, q, k, v, "tensor", True)


def test_non_finite_inputs_give_nan_descales_on_gpu():
    q, k, v = _inputs(1, 2, 300, 300, 64, torch.bfloat16, "BNHD")
    q[0, 1, 200, 5] = float("nan")
    k[0, 0, 10, 1] = float("inf")
    for smooth in (False, True):
        d = fp8.quantize_qkv(q, k, v, "head", smooth_k=smooth).descale
        assert bool(torch.isnan(d[0, 0, 1])) and bool(torch.isfinite(d[0, 0, 0]))
        assert bool(torch.isnan(d[1, 0, 0])) and bool(torch.isfinite(d[1, 0, 1]))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("factor", [2.0, 1.0 / 3.0])
def test_dequantize_output_on_gpu(dtype, factor):
    """Bit-equal to float32 arithmetic rounded once (computed on the CPU), over every finite e4m3 code
    (subnormals, +-0, +-448) and per-head descales whose products overflow float16 (inf) and land among its
    subnormals. (The inputs are e4m3 codes drawn directly: a torch cast to e4m3 may make NaN past 448 in
    some versions, and NaN != NaN.)"""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    o8 = codes[torch.randint(0, codes.numel(), (2, 333, 3, 128))].view(E4M3)
    d = torch.tensor([[2.0 ** -9, 2.0 ** -4, 1.0], [2.0 ** 6, 2.0 ** 8, 2.0 ** -7]])
    want = fp8.dequantize_output_reference(o8, d, factor, dtype)
    got = fp8.dequantize_output(o8.cuda(), d.cuda(), factor, dtype).cpu()
    bad = got.view(torch.int16) != want.view(torch.int16)
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        rows = [(o8[tuple(i)].float().item(), d[i[0], i[2]].item(), got[tuple(i)].item(), want[tuple(i)].item())
                for i in idx]
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} differ; (e4m3, descale, got, want): {rows}")


# ---------------------------------------------------------------- the backends


@pytest.mark.parametrize("name", ["fa3_fp8", "fp8_cudnn"])
def test_backend_fits_the_fast_level_on_hypothesis_shapes(name):
    _skip_unless_available(name)
    backend = registry.get(name)

    @settings(max_examples=15, **SETTINGS)
    @given(B=st.integers(1, 2), H=st.integers(1, 4), NQ=st.integers(16, 1500), NK=st.integers(16, 1500),
           D=st.sampled_from([64, 128]), dtype=st.sampled_from(HALF), layout=st.sampled_from(["BNHD", "BHND"]),
           seed=st.integers(0, 99))
    def check(B, H, NQ, NK, D, dtype, layout, seed):
        q, k, v = _inputs(B, H, NQ, NK, D, dtype, layout, seed=seed)
        call = AttentionCall(q, k, v, None, D ** -0.5)
        assert backend.refusal(call) is None
        out = backend.run(call)
        torch.cuda.synchronize()
        assert out.shape == (B, H, NQ, D) and out.dtype == dtype
        rel, cos = l2_and_cosine(out, reference_attention(q, k, v))
        max_rel, min_cos = quality.thresholds("fast", dtype)
        assert rel <= max_rel and cos >= min_cos, f"{name} B{B} H{H} Nq{NQ} Nk{NK} D{D} {dtype} {layout}: " \
                                                   f"rel {rel:.4f} cos {cos:.6f}"

    check()


@pytest.mark.parametrize("name", ["fa3_fp8", "fp8_cudnn"])
@pytest.mark.parametrize("NQ,NK", [(1, 77), (4096, 77), (77, 4096), (333, 1)])
def test_backend_on_short_and_odd_lengths(name, NQ, NK):
    _skip_unless_available(name)
    q, k, v = _inputs(2, 3, NQ, NK, 64, torch.bfloat16, "BNHD", seed=1)
    call = AttentionCall(q, k, v, None, 0.125)
    try:
        out = registry.get(name).run(call)
    except RuntimeError as exc:
        if "no cuDNN FP8 attention graph builds" in str(exc):
            pytest.skip(f"cuDNN refuses Nq={NQ} Nk={NK}: {exc}")  # dispatch falls back; recorded here
        raise
    rel, cos = l2_and_cosine(out, reference_attention(q, k, v, scale=0.125))
    max_rel, min_cos = quality.thresholds("fast", torch.bfloat16)
    assert rel <= max_rel and cos >= min_cos, (rel, cos)


@pytest.mark.parametrize("name", ["fa3_fp8", "fp8_cudnn"])
def test_backend_with_silent_heads_and_one_key(name):
    """All-zero heads (descale 1, exact zeros) and one key (k minus its mean is 0): finite, right output."""
    _skip_unless_available(name)
    for NK in (1, 200):
        q, k, v = _inputs(2, 3, 256, NK, 64, torch.bfloat16, "BNHD", seed=4)
        q[0, 1] = 0.0
        v[1, 2] = 0.0
        try:
            out = registry.get(name).run(AttentionCall(q, k, v, None, 0.125))
        except RuntimeError as exc:
            if "no cuDNN FP8 attention graph builds" in str(exc):
                continue  # dispatch falls back; recorded by test_backend_on_short_and_odd_lengths
            raise
        assert bool(torch.isfinite(out).all()), NK
        rel, cos = l2_and_cosine(out, reference_attention(q, k, v, scale=0.125))
        max_rel, min_cos = quality.thresholds("fast", torch.bfloat16)
        assert rel <= max_rel and cos >= min_cos, (NK, rel, cos)


def test_fp8_cudnn_refuses_heads_one_scale_cannot_span_and_dispatch_falls_back():
    _skip_unless_available("fp8_cudnn")
    from genesis_core.attn.backends import fp8_cudnn

    q, k, v = _inputs(1, 4, 512, 640, 128, torch.bfloat16, "BNHD", seed=5)
    k[0, 3] *= 2.0 ** -14  # 2**14 between k's heads
    call = AttentionCall(q, k, v, None, 128 ** -0.5)
    if fp8_cudnn.plan_for(call).granularity == "head":
        pytest.skip("this cuDNN takes per-head q/k descales: nothing to refuse")
    with pytest.raises(RuntimeError, match="one q and one k descale for all heads"):
        fp8_cudnn.run(call)
    out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend="fp8_cudnn", layout="BNHD",
                    quality="fast")
    assert last_backend() != "fp8_cudnn"
    rel, _cos = l2_and_cosine(out.transpose(1, 2), reference_attention(q, k, v))
    assert rel < 0.01  # what served it is exact


@pytest.mark.parametrize("name", ["fa3_fp8", "fp8_cudnn"])
def test_dispatch_serves_the_backend_under_the_fast_budget(name):
    _skip_unless_available(name)
    q, k, v = _inputs(1, 4, 1024, 1024, 128, torch.bfloat16, "BNHD", k_bias=10.0, seed=2)
    bnhd = [t.transpose(1, 2) for t in (q, k, v)]  # the caller's contiguous [B, N, H, D] tensors
    out = attention(*bnhd, backend=name, layout="BNHD", quality="fast")
    assert last_backend() == name
    rel, cos = l2_and_cosine(out.transpose(1, 2), reference_attention(q, k, v))
    max_rel, min_cos = quality.thresholds("fast", torch.bfloat16)
    assert rel <= max_rel and cos >= min_cos, (rel, cos)
