"""Fully masked rows: one policy for every backend (PyTorch SDPA's): a query row whose keys are all masked out,
by a boolean mask (all False) or an additive mask (-inf on every key), returns 0 — never NaN — on every
registered backend that can serve masked calls, through dispatch and AUTO too, and its gradients are 0."""
from __future__ import annotations

import pytest
import torch
from conftest import reference_attention, requires_cuda

from genesis_core.attn import attention, autotune, dispatch, last_backend, registry
from genesis_core.attn.backends import xformers as xformers_backend
from genesis_core.attn.types import AttentionCall

B, H, HKV, NQ, NK, D = 2, 4, 2, 9, 13, 16
DEAD = [(0, slice(None), 2), (0, slice(None), 5), (1, 1, 7)]  # (batch, head, query row) with no key left
TOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 4e-2, torch.float16: 6e-3}
LOSSY_TOL = 8e-2


def masked_call(kind: str, device="cpu", dtype=torch.float32, seed=0):
    """q, k, v, a [B, H, Nq, Nk] mask with the rows in DEAD fully masked (and random holes elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, NQ, D, generator=g)
    k = torch.randn(B, HKV, NK, D, generator=g)
    v = torch.randn(B, HKV, NK, D, generator=g)
    keep = torch.rand(B, H, NQ, NK, generator=g) > 0.3
    keep[..., 0] = True
    for b, h, row in DEAD:
        keep[b, h, row] = False
    mask = keep if kind == "bool" else torch.zeros(B, H, NQ, NK).masked_fill(~keep, float("-inf")).to(dtype)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), mask.to(device)


def reference(q, k, v, mask):
    """float64 attention with fully masked rows 0 (computed apart from the softmax, which makes them NaN)."""
    ref = reference_attention(q, k, v, mask)
    dead = ~mask.any(-1) if mask.dtype == torch.bool else (mask == float("-inf")).all(-1)
    return ref.masked_fill(dead.cpu()[..., None], 0.0)


def check(out, q, k, v, mask, tol, what):
    ref = reference(q, k, v, mask)
    out = out.double().cpu()
    assert out.shape == ref.shape
    bad = torch.nonzero(~torch.isfinite(out).all(-1)).tolist()
    assert not bad, f"{what}: non-finite output in rows (batch, head, row) {bad}"
    for b, h, row in DEAD:
        assert torch.equal(out[b, h, row], torch.zeros_like(out[b, h, row])), f"{what}: fully masked row {row} is not 0"
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < tol, f"{what}: rel err {err:.3g} over {tol}"


def _serve_or_skip(name, q, k, v, mask):
    b = registry.get(name)
    reason = b.available()
    if reason is not None:
        pytest.skip(f"{name}: {reason}")
    call = AttentionCall(q, k, v, mask, D ** -0.5)
    reason = b.refusal(call)
    if reason is not None:
        pytest.skip(f"{name} does not serve this masked call: {reason}")
    return b, call


def _tol(b, dtype):
    return TOL[dtype] if b.precision == "exact" else LOSSY_TOL


def _run_everywhere(name, kind, device, dtype):
    q, k, v, mask = masked_call(kind, device, dtype)
    b, call = _serve_or_skip(name, q, k, v, mask)
    with torch.no_grad():
        check(b.run(call), q, k, v, mask, _tol(b, dtype), f"{name}.run ({kind}, {dtype})")
        # and through dispatch, where the backend serves the call itself
        out = attention(q, k, v, mask, backend=name)
        assert last_backend() == name
        check(out, q, k, v, mask, _tol(b, dtype), f"attention(backend={name!r}) ({kind}, {dtype})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("name", registry.names())
def test_every_backend_returns_zero_for_fully_masked_rows_cpu(name, kind, dtype):
    _run_everywhere(name, kind, "cpu", dtype)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("name", registry.names())
def test_every_backend_returns_zero_for_fully_masked_rows_cuda(name, kind, dtype):
    _run_everywhere(name, kind, "cuda", dtype)


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """The autotuner measuring on CPU too, with a private cache; state restored afterwards."""
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GENESIS_AUTOTUNE_BUDGET_MS", "2000")
    autotune.set_mode("all")
    autotune.clear()
    yield
    autotune.set_mode(None)
    autotune.clear(disk=False)
    dispatch.clear_plans()


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_auto_returns_zero_for_fully_masked_rows_whatever_it_picks(kind, measuring):
    q, k, v, mask = masked_call(kind, seed=3)
    with torch.no_grad():
        for _ in range(2):  # the measuring call and the served choice
            check(attention(q, k, v, mask), q, k, v, mask, TOL[q.dtype], f"auto (picked {last_backend()})")
    # whichever backend AUTO serves on this signature, every candidate it may pick returns 0 there
    for name in dispatch.servable(AttentionCall(q, k, v, mask, D ** -0.5), "exact"):
        check(attention(q, k, v, mask, backend=name), q, k, v, mask, TOL[q.dtype], name)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("budget", [1, 2**28])  # one row per block, and one block
def test_pytorch_backend_gradients_are_finite_and_zero_through_fully_masked_rows(kind, budget):
    from genesis_core.attn.backends import pytorch as math_backend

    q, k, v, mask = masked_call(kind, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    w = torch.randn(B, H, NQ, D, dtype=torch.float64)
    (math_backend.run(AttentionCall(q, k, v, mask, D ** -0.5), budget) * w).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    # the reference: float64 autograd with the fully masked rows' softmax replaced by 0 (finite by construction)
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    keep = mask if mask.dtype == torch.bool else mask == 0
    dead = ~keep.any(-1, keepdim=True)
    s = (qr @ kr.repeat_interleave(H // HKV, 1).transpose(-1, -2)) * D ** -0.5
    s = s.masked_fill(~keep | dead, float("-inf")).masked_fill(dead, 0.0)
    p = torch.softmax(s, -1).masked_fill(dead, 0.0)
    ((p @ vr.repeat_interleave(H // HKV, 1)) * w).sum().backward()
    for name, g, r in zip("qkv", got, (qr.grad, kr.grad, vr.grad)):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        assert torch.allclose(g, r, atol=1e-10), f"d{name} differs from the reference"
    for b, h, row in DEAD:
        assert torch.equal(got[0][b, h, row], torch.zeros_like(got[0][b, h, row]))


class _FakeXformersOps:
    """xformers.ops as its CUDA kernels behave: a softmax over the bias, NaN where a row is -inf on every key."""

    @staticmethod
    def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):  # BNHD in, BNHD out
        qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
        s = qd @ kd.transpose(-1, -2) * scale
        if attn_bias is not None:
            s = s + attn_bias.double()
        return (torch.softmax(s, -1) @ vd).transpose(1, 2).to(q.dtype)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_xformers_run_zeroes_fully_masked_rows(kind, monkeypatch):
    """xformers builds a dense additive bias; a fully masked row is -inf on every key there, which its kernels
    turn into NaN. Its run() returns 0 for those rows (checked on CPU with the kernel's semantics)."""
    monkeypatch.setattr(xformers_backend, "_ops", _FakeXformersOps)
    q, k, v, mask = masked_call(kind)
    call = AttentionCall(q, k, v, mask, D ** -0.5)
    check(xformers_backend.run(call), q, k, v, mask, TOL[q.dtype], f"xformers ({kind})")
    # a [Nq, Nk] mask broadcast over batch and heads, rows fully masked for everyone
    keep = torch.rand(NQ, NK) > 0.3
    keep[:, 0] = True
    keep[4] = False
    call = AttentionCall(q, k, v, keep.view(1, 1, NQ, NK), D ** -0.5)
    out = xformers_backend.run(call)
    assert torch.isfinite(out).all() and torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    ref = reference(q, k, v, keep.view(1, 1, NQ, NK).expand(B, H, NQ, NK))
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_xformers_run_keeps_gradients_finite_through_fully_masked_rows(monkeypatch):
    monkeypatch.setattr(xformers_backend, "_ops", _FakeXformersOps)
    q, k, v, mask = masked_call("bool", dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    xformers_backend.run(AttentionCall(q, k, v, mask, D ** -0.5)).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    for b, h, row in DEAD:
        assert torch.equal(q.grad[b, h, row], torch.zeros_like(q.grad[b, h, row]))


def test_policy_is_pytorch_sdpa_semantics():
    """The policy's anchor: PyTorch's own SDPA returns 0 for a fully masked row, boolean or additive."""
    q, k, v, mask = masked_call("bool")
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):
        out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                               attn_mask=m)
        for b, h, row in DEAD:
            assert torch.equal(out[b, h, row], torch.zeros_like(out[b, h, row]))

