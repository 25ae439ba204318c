"""Every backend available here against a float64 reference, on hypothesis-drawn calls."""
from __future__ import annotations

import pytest
import torch
from conftest import l2_and_cosine, reference_attention, requires_cuda
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genesis_core.attn import attention, explain, last_backend
from genesis_core.attn import quality, registry

# Relative error (max-abs error over max-abs reference) allowed per dtype.
TOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.bfloat16: 4e-2, torch.float16: 6e-3}
def quantised_tol(name, dtype):
    """A lossy backend's bound: the (relative L2, cosine) thresholds of the loosest quality level its precision
    class admits (the level's metric: an L2 bound is no bound on the largest single error)."""
    b = registry.get(name)
    return quality.thresholds(quality.loosest_for(b.precision), dtype, b.tolerance.get(dtype))


def rel_err(out, ref):
    return ((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@st.composite
def calls(draw, device="cpu", dtypes=(torch.float32, torch.bfloat16, torch.float64)):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 1, 2]))
    nq = draw(st.integers(1, 70))
    nk = draw(st.integers(1, 70))
    d = draw(st.sampled_from([40, 64, 80, 128, 160]))
    dv = draw(st.sampled_from([d, d, 32]))
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["BHND", "BNHD"]))
    mask_kind = draw(st.sampled_from(["none", "bool", "additive"]))
    mask_shape = draw(st.sampled_from(["nk", "nq_nk", "b_nq_nk", "b_h_nq_nk", "b_1_1_nk"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g)
    v = torch.randn(b, hkv, nk, dv, generator=g)
    mask = None
    if mask_kind != "none":
        shape = {"nk": (nk,), "nq_nk": (nq, nk), "b_nq_nk": (b, nq, nk), "b_h_nq_nk": (b, hq, nq, nk),
                 "b_1_1_nk": (b, 1, 1, nk)}[mask_shape]
        keep = torch.rand(shape, generator=g) > 0.3
        keep[..., 0] = True  # every row attends somewhere (fully masked rows are NaN by definition)
        mask = keep if mask_kind == "bool" else torch.zeros(shape).masked_fill(~keep, -1e4).to(dtype)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), (None if mask is None else mask.to(device)), layout


def _to_layout(t, layout):
    return t.transpose(1, 2).contiguous() if layout == "BNHD" else t


def check_backend(name, q, k, v, mask, layout, tol):
    ref = reference_attention(q, k, v, mask)
    chain = explain(_to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), mask, backend=name, layout=layout)
    expected = next(c["name"] for c in chain if c["reason"] is None)
    out = attention(_to_layout(q, layout), _to_layout(k, layout), _to_layout(v, layout), mask, backend=name, layout=layout)
    assert last_backend() == expected, (chain, last_backend())
    if name != "auto" and chain[0]["reason"] is None:
        assert last_backend() == name, "a backend that can serve the call must be the one that runs"
    out = out.transpose(1, 2) if layout == "BNHD" else out
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[3])
    assert out.dtype == q.dtype
    assert_within(out, ref, tol, f"{name} (ran {expected})")
    return expected


def assert_within(out, ref, tol, what):
    """``tol``: a float (largest error over the largest reference value) or a quality level's (relative L2,
    cosine) thresholds."""
    if isinstance(tol, tuple):
        rel, cos = l2_and_cosine(out, ref)
        assert rel <= tol[0] and cos >= tol[1], f"{what}: rel L2 {rel:.3g} cos {cos:.5f} vs {tol}"
    else:
        err = rel_err(out, ref)
        assert err < tol, f"{what}: rel err {err:.3g} over {tol}"


CPU_BACKENDS = [b.name for b in registry.all_backends()]


@pytest.mark.parametrize("name", CPU_BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_backend_matches_float64_reference_cpu(name, data):
    q, k, v, mask, layout = data.draw(calls())
    check_backend(name, q, k, v, mask, layout, TOL[q.dtype])


def test_auto_matches_reference_and_fp16_cpu():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 33, 64, generator=g).half()
    k = torch.randn(2, 4, 20, 64, generator=g).half()
    v = torch.randn(2, 4, 20, 64, generator=g).half()
    for name in ("auto", "sdpa", "pytorch"):
        check_backend(name, q, k, v, None, "BHND", TOL[torch.float16])


def test_explicit_backend_that_serves_really_runs():
    q = torch.randn(1, 2, 16, 64)
    for name in ("pytorch", "sdpa", "sdpa_math", "flash"):
        if explain(q, q, q, backend=name)[0]["reason"] is None:
            attention(q, q, q, backend=name)
            assert last_backend() == name


# ------------------------------------------------------------------ GPU

GPU_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", CPU_BACKENDS)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_backend_matches_float64_reference_cuda(name, data):
    q, k, v, mask, layout = data.draw(calls(device="cuda", dtypes=GPU_DTYPES))
    tol = quantised_tol(name, q.dtype) if registry.get(name).precision != "exact" else TOL[q.dtype]
    check_backend(name, q, k, v, mask, layout, tol)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("name", ["flash", "sage", "xformers", "sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_cuda_backend_runs_its_own_kernel(name, dtype):
    """On a shape every CUDA kernel supports, the named backend (when available) serves the call itself."""
    reason = registry.get(name).available()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype)
    k = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype)
    v = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype)
    k_before = k.clone()
    out = attention(q, k, v, backend=name)
    assert last_backend() == name
    assert torch.equal(k, k_before), f"{name} modified its key input in place"
    tol = quantised_tol(name, dtype) if registry.get(name).precision != "exact" else TOL[dtype]
    assert_within(out, reference_attention(q, k, v), tol, name)


# ------------------------------------------------------------------ the pytorch backend's memory bound

def _bhnd(t, layout):
    """t (BHND) as the BHND view of a [B, N, H, D] tensor where layout is BNHD (the strides ComfyUI hands in)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == "BNHD" else t


PEAK_CASES = {
    # name: (batch, q heads, kv heads, head_dim, dtype, layout, mask kind)
    "fp32-1head": (1, 1, 1, 16, torch.float32, "BHND", "none"),
    "fp32-gqa-bnhd-bool": (2, 4, 2, 8, torch.float32, "BNHD", "bool"),
    "fp64-additive-fp32-mask": (1, 2, 2, 8, torch.float64, "BHND", "additive"),
    "bf16-additive": (1, 2, 1, 16, torch.bfloat16, "BHND", "additive"),
    "fp16-bool": (1, 2, 2, 16, torch.float16, "BHND", "bool"),
}
HALF_GEMM_WORKSPACE = 4 * 2**20  # PyTorch's CPU half-precision GEMM packs operands (measured: 0.3-3.4 MiB)


@pytest.mark.parametrize("n", [800, 1600, 2400])
@pytest.mark.parametrize("case", list(PEAK_CASES))
def test_pytorch_backend_peak_memory_stays_within_its_budget(case, n):
    """What the pytorch backend allocates besides its output stays within its documented bound (the budget)
    at every length, measured from the CPU allocator's events; the whole score matrix is many budgets."""
    from torch_peak import peak_bytes

    from genesis_core.attn.backends import pytorch as math_backend
    from genesis_core.attn.types import AttentionCall

    b, h, hkv, d, dtype, layout, mask_kind = PEAK_CASES[case]
    budget = 2**20
    q = _bhnd(torch.randn(b, h, n, d, dtype=dtype), layout)
    k = _bhnd(torch.randn(b, hkv, n, d, dtype=dtype), layout)
    v = _bhnd(torch.randn(b, hkv, n, d, dtype=dtype), layout)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, n, n) > 0.3
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(1, 1, n, n, dtype=torch.float32 if dtype == torch.float64 else dtype)
    call = AttentionCall(q, k, v, mask, d ** -0.5)
    with torch.no_grad():
        peak, out = peak_bytes(lambda: math_backend.run(call, budget))
    beyond = peak - out.numel() * out.element_size()
    bound = budget + (HALF_GEMM_WORKSPACE if dtype in (torch.float16, torch.bfloat16) else 0)
    assert b * h * n * n * 4 >= 2 * budget  # the float32 score matrix alone is over the budget
    assert b * h * n * 32 < budget  # and one query row (two values of <= 8 bytes per score) is far below it
    assert beyond <= bound, f"{case}, {n} tokens: {beyond / 2**20:.2f} MiB beyond the output, bound {bound / 2**20:.2f}"
    # and it still computes attention (spot-check a few rows against float64)
    rows = torch.tensor([0, n // 2, n - 1])
    ref = reference_attention(q[:, :, rows], k, v, None if mask is None else mask[:, :, rows])
    assert rel_err(out[:, :, rows], ref) < TOL[dtype] * 10


@pytest.mark.parametrize("layout", ["BHND", "BNHD"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pytorch_backend_small_blocks_match_reference(layout, mask_kind, dtype):
    """Tiny budgets (one row per block, one batch item per block) give the same result as one block, with
    GQA, every mask shape class and a different v head dim."""
    from genesis_core.attn.backends import pytorch as math_backend
    from genesis_core.attn.types import AttentionCall

    b, h, hkv, nq, nk, d, dv = 2, 6, 3, 23, 17, 16, 8
    q = _bhnd(torch.randn(b, h, nq, d, dtype=dtype), layout)
    k = _bhnd(torch.randn(b, hkv, nk, d, dtype=dtype), layout)
    v = _bhnd(torch.randn(b, hkv, nk, dv, dtype=dtype), layout)
    masks = [None]
    if mask_kind == "bool":
        keep = torch.rand(b, h, nq, nk) > 0.4
        keep[..., 0] = True
        masks = [keep, keep[:1, :1], keep[:, :1, :1]]
    elif mask_kind == "additive":
        bias = torch.randn(b, h, nq, nk, dtype=dtype) * 3
        masks = [bias, bias[:1, :, :1], bias[:, :1].float()]
    for mask in masks:
        call = AttentionCall(q, k, v, mask, 0.3)
        ref = reference_attention(q, k, v, mask, scale=0.3)
        for budget in (1, math_backend.block_bytes(call, 4, 1) + math_backend.fixed_bytes(call),
                       math_backend.SCORE_BUDGET_BYTES):
            out = math_backend.run(call, budget)
            assert out.dtype == dtype and out.shape == (b, h, nq, dv)
            assert rel_err(out, ref) < TOL[dtype], (budget, math_backend.plan(call, budget))


# ------------------------------------------------------------------ explicit choices pass the memory guard

def test_explicit_sdpa_math_refuses_scores_that_do_not_fit_and_falls_back_once(monkeypatch, genesis_log):
    """sdpa_math materialises the [B, H, Nq, Nk] scores; chosen explicitly on a device without room for them
    (here: 1 MiB free), it is skipped for sdpa with the reason logged once, and the answer is still right."""
    from genesis_core import _memory
    from genesis_core.attn import clear_plans

    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**20)
    clear_plans()
    q, k, v = (torch.randn(1, 2, 301, 16) for _ in range(3))  # scores + softmax: 2 x 301^2 x 8 B = 2.8 MiB
    try:
        for _ in range(3):
            out = attention(q, k, v, backend="sdpa_math")
            assert last_backend() == "sdpa"
            assert rel_err(out, reference_attention(q, k, v)) < TOL[torch.float32]
        said = [m for m in genesis_log if "'sdpa_math' skipped" in m]
        assert len(said) == 1, genesis_log
        assert "attention scores" in said[0] and "free on cpu" in said[0] and "using 'sdpa'" in said[0]
        monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**34)  # room again: it serves itself
        clear_plans()
        attention(q, k, v, backend="sdpa_math")
        assert last_backend() == "sdpa_math"
    finally:
        clear_plans()
