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
from tests.conftest import reference_attention, requires_cuda

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


def _errors(out, ref):
    o, r = out.double().cpu().flatten(), ref.double().cpu().flatten()
    rel = float((o - r).norm() / r.norm())
    cos = float(torch.dot(o, r) / (o.norm() * r.norm()))
    return rel, cos


# ---------------------------------------------------------------- the quantiser


@settings(max_examples=40, **SETTINGS)
@given(B=st.integers(1, 2), H=st.integers(1, 5), NQ=st.integers(1, 3000), NK=st.integers(1, 3000),
       D=st.sampled_from([16, 64, 80, 128, 256]), dtype=st.sampled_from(HALF + (torch.float32,)),
       layout=st.sampled_from(["BNHD", "BHND"]), granularity=st.sampled_from(["head", "tensor"]),
       smooth=st.booleans(), exact=st.booleans(), k_bias=st.sampled_from([0.0, 20.0]), seed=st.integers(0, 99))
def test_triton_quantiser_matches_the_reference_bit_for_bit(B, H, NQ, NK, D, dtype, layout, granularity, smooth,
                                                            exact, k_bias, seed):
    q, k, v = _inputs(B, H, NQ, NK, D, dtype, layout, k_bias=k_bias, seed=seed)
    got = fp8.quantize_qkv(q, k, v, granularity, smooth_k=smooth, exact_round=exact)
    torch.cuda.synchronize()
    if smooth:
        assert torch.allclose(got.k_mean, k.float().mean(dim=2), rtol=1e-5, atol=1e-4)
    ref = fp8.quantize_qkv_reference(q, k, v, granularity, smooth_k=smooth, k_mean=got.k_mean)
    for name, a, b in zip("qkv", got[:3], ref[:3]):
        assert a.dtype == E4M3 and a.shape == b.shape and a.is_contiguous()
        bad = a.float() != b.float()
        assert not bool(bad.any()), f"{name}: {int(bad.sum())} of {bad.numel()} elements differ (exact_round={exact})"
    assert torch.equal(got.descale, ref.descale)


def test_non_finite_inputs_give_nan_descales_on_gpu():
    q, k, v = _inputs(1, 2, 300, 300, 64, torch.bfloat16, "BNHD")
    q[0, 1, 200, 5] = float("nan")
    k[0, 0, 10, 1] = float("inf")
    for smooth in (False, True):
        d = fp8.quantize_qkv(q, k, v, "head", smooth_k=smooth).descale
        assert bool(torch.isnan(d[0, 0, 1])) and bool(torch.isfinite(d[0, 0, 0]))
        assert bool(torch.isnan(d[1, 0, 0])) and bool(torch.isfinite(d[1, 0, 1]))


@pytest.mark.parametrize("dtype", HALF)
def test_dequantize_output_on_gpu(dtype):
    o8 = (torch.randn(2, 333, 3, 128, device="cuda") * 100).to(E4M3)
    d = torch.exp2(torch.randint(-8, 8, (2, 3), device="cuda").float())
    want = (o8.float() * (d * 2.0)[:, None, :, None]).to(dtype)
    assert torch.equal(fp8.dequantize_output(o8, d, 2.0, dtype), want)


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
        rel, cos = _errors(out, reference_attention(q, k, v))
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
    rel, cos = _errors(out, reference_attention(q, k, v, scale=0.125))
    max_rel, min_cos = quality.thresholds("fast", torch.bfloat16)
    assert rel <= max_rel and cos >= min_cos, (rel, cos)


@pytest.mark.parametrize("name", ["fa3_fp8", "fp8_cudnn"])
def test_dispatch_serves_the_backend_under_the_fast_budget(name):
    _skip_unless_available(name)
    q, k, v = _inputs(1, 4, 1024, 1024, 128, torch.bfloat16, "BNHD", k_bias=10.0, seed=2)
    bnhd = [t.transpose(1, 2) for t in (q, k, v)]  # the caller's contiguous [B, N, H, D] tensors
    out = attention(*bnhd, backend=name, layout="BNHD", quality="fast")
    assert last_backend() == name
    rel, cos = _errors(out.transpose(1, 2), reference_attention(q, k, v))
    max_rel, min_cos = quality.thresholds("fast", torch.bfloat16)
    assert rel <= max_rel and cos >= min_cos, (rel, cos)
