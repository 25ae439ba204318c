"""FP8 quantisation (genesis_core.attn.quant.fp8): the PyTorch reference's math, and the Triton kernels against
it under Triton's CPU interpreter (TRITON_INTERPRET=1; skipped where Triton is not installed)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are first imported: they are decorated for the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from genesis_core.attn.quant import fp8  # noqa: E402
from tests.conftest import reference_attention  # noqa: E402

E4M3 = torch.float8_e4m3fn
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_interpreter = pytest.mark.skipif(
    not HAS_TRITON or torch.cuda.is_available(),
    reason="needs Triton (pip install triton) and a machine without CUDA (the kernels then run in the interpreter)")


def _rel(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm())


def _e4m3_half_step(y: torch.Tensor) -> torch.Tensor:
    """Per element: half e4m3's step at ``y`` (2**(e - 4) in binade e; below 2**-6 the subnormal step, 2**-10)."""
    a = y.abs().clamp_min(2.0 ** -6)
    return torch.exp2(torch.floor(torch.log2(a)) - 3) / 2


def _on_e4m3_grid_nearest(y: torch.Tensor) -> torch.Tensor:
    """Per element: |y - e4m3(y)| <= half the e4m3 step at y (independent of torch's cast)."""
    return (y - y.to(E4M3).float()).abs() <= _e4m3_half_step(y) + 1e-12


# ---------------------------------------------------------------- the scale


def test_scale_exponent_is_the_largest_power_of_two_that_fits():
    amax = torch.cat([torch.rand(2000) * 10.0 ** torch.randint(-15, 15, (2000,)).float(),
                      torch.tensor([1.0, 448.0, 448.0001, 447.999, 1.75, 0.875, 2.0 ** -52, 1e17])])
    s = fp8.scale_exponents(amax).double()
    a = amax.double()
    assert bool((a * torch.exp2(s) <= 448).all())
    fits_next = (a * torch.exp2(s + 1) <= 448) & (s < fp8.MAX_EXPONENT)
    assert not bool(fits_next.any()), amax[fits_next][:5]
    assert fp8.scale_exponents(torch.tensor([448.0, 1.0])).tolist() == [0, 8]


def test_scale_exponent_clamps_at_60_and_is_0_without_a_scale():
    # nothing to scale: 0 (all zeros) and non-finite groups get scale 1
    assert fp8.scale_exponents(torch.tensor([0.0, float("inf"), float("nan")])).tolist() == [0, 0, 0]
    # tiny (down to float32 subnormals) and huge groups stop at +-60
    assert fp8.scale_exponents(torch.tensor([1e-45, 1e-30, 2.0 ** -52, 3e38, 1e30])).tolist() == [60, 60, 60, -60, -60]


def test_q_and_k_descales_multiply_to_a_normal_float32():
    """FA3 and cuDNN multiply the q and k descales with the softmax scale: the product must not flush to 0
    (0 times a masked column's -inf is NaN) nor overflow, for any group maxima."""
    amax = torch.tensor([0.0, 1e-45, 1e-38, 1e-30, 1e-10, 1.0, 448.0, 1e10, 1e30, 3e38])
    _, d = fp8._scales(amax)
    prod = d[:, None].double() * d[None, :].double() * 0.0625 * 1.4427
    assert bool((prod >= 2.0 ** -126).all()) and bool((prod < 2.0 ** 127).all()), prod.min()


def test_all_zero_groups_get_descale_one_and_exact_zeros():
    q = torch.randn(1, 3, 20, 16)
    q[0, 1] = 0.0  # a silent head
    k1 = torch.randn(1, 3, 1, 16)  # one key: k minus its mean is all zeros
    r = fp8.quantize_qkv_reference(q, k1, torch.zeros(1, 3, 1, 16), "head", smooth_k=True)
    assert r.descale[0, 0, 1] == 1.0 and torch.equal(r.descale[1:], torch.ones(2, 1, 3))
    assert torch.equal(r.q.float()[0, :, 1], torch.zeros(20, 16)) and torch.equal(r.k.float(), torch.zeros(1, 1, 3, 16))
    assert torch.equal(r.v.float(), torch.zeros(1, 1, 3, 16))
    t = fp8.quantize_reference(torch.zeros(2, 2, 5, 8), "tensor")
    assert torch.equal(t.descale, torch.ones(2, 2)) and torch.equal(t.data.float(), torch.zeros(2, 2, 5, 8))


def test_head_spread_counts_binades_between_non_zero_heads():
    amax = torch.tensor([[1.0, 2.0 ** -12, 0.0, 3.0], [float("nan"), 1.0, 1.0, 1.0]])
    assert fp8.head_spread(amax) == 13.0  # 3.0 -> s = 7, 2**-12 -> s = 20; the 0 and the NaN head are left out
    assert fp8.head_spread(torch.tensor([[5.0]])) == 0.0 and fp8.head_spread(torch.zeros(2, 2)) == 0.0


def test_descale_is_nan_for_a_group_that_is_not_finite():
    x = torch.randn(1, 3, 16, 8)
    x[0, 1, 2, 3] = float("inf")
    x[0, 2, 0, 0] = float("nan")
    d = fp8.quantize_reference(x, "head").descale
    assert bool(torch.isfinite(d[0, 0])) and bool(torch.isnan(d[0, 1])) and bool(torch.isnan(d[0, 2]))
    assert bool(torch.isnan(fp8.quantize_reference(x, "tensor").descale).all())


# ---------------------------------------------------------------- the reference quantiser


@pytest.mark.parametrize("granularity", fp8.GRANULARITIES)
def test_reference_round_trip_is_within_half_an_e4m3_step(granularity):
    x = torch.randn(2, 3, 200, 16) * torch.tensor([0.01, 1.0, 30.0])[None, :, None, None]
    t = fp8.quantize_reference(x, granularity, block=64)
    assert t.data.dtype == E4M3 and t.data.shape == x.shape
    want = {"tensor": (2, 3), "head": (2, 3), "block": (2, 3, 4)}[granularity]
    assert tuple(t.descale.shape) == want
    per_element = (t.descale[:, :, None, None] if t.block is None
                   else t.descale.repeat_interleave(64, 2)[:, :, :200, None])
    scaled = fp8.dequantize(t) / per_element
    assert float(scaled.abs().max()) <= 448.0
    # every group uses the top binade of e4m3: its maximum lands in [224, 448]
    groups = scaled.abs().amax(dim=(2, 3)) if granularity == "head" else scaled.abs().amax()
    if granularity != "block":
        assert bool((groups >= 224).all())
    exact = x / per_element
    assert bool(_on_e4m3_grid_nearest(exact).all())
    err = (fp8.dequantize(t) - x).abs()
    normal = exact.abs() >= 2.0 ** -6
    assert bool((err[normal] <= x.abs()[normal] * 2.0 ** -4 + 1e-30).all())


def test_per_head_scales_keep_a_quiet_head_that_per_tensor_flushes():
    x = torch.randn(1, 2, 256, 32)
    x[:, 1] *= 1e-5  # a head 100000x quieter than the other: below e4m3's range under one shared scale
    per_tensor = fp8.dequantize(fp8.quantize_reference(x, "tensor"))
    per_head = fp8.dequantize(fp8.quantize_reference(x, "head"))
    assert _rel(per_head[:, 1], x[:, 1]) < 0.05
    assert _rel(per_tensor[:, 1], x[:, 1]) > 0.3
    # the loud head is the same either way: e4m3's relative precision does not depend on the scale
    assert _rel(per_head[:, 0], x[:, 0]) < 0.05 and _rel(per_tensor[:, 0], x[:, 0]) < 0.05


def test_block_scales_follow_each_block():
    x = torch.randn(1, 1, 256, 16)
    x[:, :, 128:] *= 1000.0
    t = fp8.quantize_reference(x, "block", block=128)
    assert float(t.descale[0, 0, 1] / t.descale[0, 0, 0]) >= 256  # powers of two, ~1000x apart
    assert _rel(fp8.dequantize(t)[:, :, :128], x[:, :, :128]) < 0.05


def test_smoothing_subtracts_the_per_head_mean_and_leaves_attention_unchanged():
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 50, 16) + 5.0, torch.randn(2, 3, 50, 16)
    t = fp8.quantize_reference(k, "head", smooth=True)
    assert torch.allclose(t.mean, k.mean(dim=2), atol=1e-6)
    centred = k - t.mean[:, :, None, :]
    err = (fp8.dequantize(t, add_mean=True) - k).abs()
    descale = t.descale[:, :, None, None]
    # e4m3 precision of k - mean, not of k: half a step at the scaled value (subnormal steps included), in k's units,
    # plus float32 rounding of the dequantised sum
    bound = _e4m3_half_step(centred / descale) * descale + k.abs() * 2.0 ** -22
    assert bool((err <= bound).all()), float((err - bound).max())
    mean = t.mean.double()[:, :, None, :]
    exact = reference_attention(q.double(), k.double(), v.double())
    shifted = reference_attention(q.double(), k.double() - mean, v.double())
    assert float((exact - shifted).abs().max()) < 1e-12


def test_smoothing_lowers_the_error_when_k_has_a_channel_offset():
    torch.manual_seed(0)
    q, v = torch.randn(1, 2, 128, 64), torch.randn(1, 2, 256, 64)
    k = torch.randn(1, 2, 256, 64) + torch.randn(64) * 30.0  # a large per-channel bias, as in DiT activations
    exact = reference_attention(q.double(), k.double(), v.double())
    errs = {}
    for smooth in (False, True):
        qq = fp8.dequantize(fp8.quantize_reference(q, "head"))
        kk = fp8.dequantize(fp8.quantize_reference(k, "head", smooth=smooth))
        vv = fp8.dequantize(fp8.quantize_reference(v, "head"))
        errs[smooth] = _rel(reference_attention(qq.double(), kk.double(), vv.double()), exact)
    assert errs[True] < 0.5 * errs[False], errs


def test_mean_override_is_used():
    k = torch.randn(1, 2, 30, 8)
    mean = torch.full((1, 2, 8), 0.25)
    t = fp8.quantize_reference(k, "head", smooth=True, mean=mean)
    assert torch.equal(t.mean, mean)
    assert bool(((fp8.dequantize(t) - (k - 0.25)).abs() <= (k - 0.25).abs() * 2.0 ** -4 + 1e-5).all())


def test_qkv_reference_layout_and_descales():
    q, k, v = torch.randn(2, 7, 3, 16), torch.randn(2, 9, 3, 16), torch.randn(2, 9, 3, 16)  # BNHD
    r = fp8.quantize_qkv_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "head", smooth_k=True)
    assert r.q.shape == (2, 7, 3, 16) and r.k.shape == (2, 9, 3, 16) and r.q.is_contiguous()
    assert r.descale.shape == (3, 2, 3) and r.k_mean.shape == (2, 3, 16)
    alone = fp8.quantize_reference(k.transpose(1, 2), "head", smooth=True)
    assert torch.equal(r.k.transpose(1, 2).float(), alone.data.float()) and torch.equal(r.descale[1], alone.descale)


def test_bad_arguments_are_named():
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="granularity must be one of"):
        fp8.quantize_reference(x, "row")
    with pytest.raises(ValueError, match="x must be 4-D"):
        fp8.quantize_reference(x[0])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        fp8.quantize_reference(x.to(E4M3))
    with pytest.raises(ValueError, match="per-block"):
        fp8.quantize_qkv_reference(x, x, x, "block")
    with pytest.raises(ValueError, match="share B, H and D"):
        fp8.quantize_qkv_reference(x, x[:, :1], x[:, :1])
    with pytest.raises(TypeError, match="share one dtype"):
        fp8.quantize_qkv_reference(x, x.half(), x)


def _all_e4m3(shape, seed=0):
    """Every finite e4m3 code (all but the two NaNs), shuffled and tiled to ``shape``: subnormals, +-0, +-448."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)], dtype=torch.uint8)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, codes.numel(), shape, generator=g)
    return codes[idx].view(E4M3)


def _dequant_cases():
    # per-head descales from 2**-9 (fp16 subnormals, ties that round to 0) to 2**8 (past fp16's 65504: inf)
    d = torch.tensor([[2.0 ** -9, 2.0 ** -4, 1.0], [2.0 ** 6, 2.0 ** 8, 2.0 ** -7]])
    return d, (2.0, 1.0 / 3.0)  # a power of two (exact products) and not (one float32 rounding, then dtype's)


def test_dequantize_output_reference_is_float32_then_one_rounding():
    o8 = _all_e4m3((2, 7, 3, 16))
    d, factors = _dequant_cases()
    for factor in factors:
        f = (d * torch.tensor(factor, dtype=torch.float32))[:, None, :, None]
        # an e4m3 value times a float32 is exact in float64: .float() is the one float32 rounding
        product = (o8.double() * f.double()).float()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = fp8.dequantize_output_reference(o8, d, factor, dtype)
            assert out.dtype == dtype and torch.equal(out.view(-1).view(torch.uint8),
                                                      product.to(dtype).view(-1).view(torch.uint8))
    assert bool(torch.isinf(fp8.dequantize_output_reference(o8, d, 2.0, torch.float16)).any())  # overflow is in


# ---------------------------------------------------------------- the Triton kernels, in the interpreter


def _inputs(layout, B, H, NQ, NK, D, dtype, k_bias=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "BNHD":
        q = torch.randn(B, NQ, H, D, generator=g).to(dtype).transpose(1, 2)
        k = (torch.randn(B, NK, H, D, generator=g) * 3 + k_bias * torch.randn(D, generator=g)).to(dtype).transpose(1, 2)
        v = torch.randn(B, NK, H, D, generator=g).to(dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, NQ, D, generator=g).to(dtype)
        k = (torch.randn(B, H, NK, D, generator=g) * 3 + k_bias * torch.randn(D, generator=g)).to(dtype)
        v = torch.randn(B, H, NK, D, generator=g).to(dtype)
    return q, k, v


def _same(a: fp8.FP8QKV, b: fp8.FP8QKV) -> None:
    for name, x, y in zip("qkv", a[:3], b[:3]):
        assert x.dtype == E4M3 and x.shape == y.shape and x.is_contiguous(), name
        bad = x.float() != y.float()
        assert not bool(bad.any()), f"{name}: {int(bad.sum())} elements differ from the reference"
    assert torch.equal(a.descale, b.descale) and torch.equal(a.spread.cpu(), b.spread.cpu()), (a.spread, b.spread)


def _counters_zero():
    return all(not bool(buf.any()) for buf in fp8._counters.values())


@needs_interpreter
@pytest.mark.parametrize("layout,B,H,NQ,NK,D,dtype,granularity,smooth", [
    ("BNHD", 1, 2, 37, 70, 32, torch.bfloat16, "head", True),
    ("BHND", 2, 1, 20, 9, 48, torch.float16, "head", False),
    ("BNHD", 1, 3, 1, 5, 16, torch.bfloat16, "tensor", True),
    ("BHND", 1, 2, 30, 30, 32, torch.bfloat16, "tensor", False),
    ("BNHD", 2, 3, 40, 33, 32, torch.bfloat16, ("tensor", "tensor", "head"), True),
])
def test_triton_kernels_match_the_reference_bit_for_bit(layout, B, H, NQ, NK, D, dtype, granularity, smooth):
    q, k, v = _inputs(layout, B, H, NQ, NK, D, dtype, k_bias=20.0)
    got = fp8.quantize_qkv(q, k, v, granularity, smooth_k=smooth)
    if smooth:
        assert torch.allclose(got.k_mean, k.float().mean(dim=2), rtol=1e-5, atol=1e-5)
    else:
        assert got.k_mean is None
    _same(got, fp8.quantize_qkv_reference(q, k, v, granularity, smooth_k=smooth, k_mean=got.k_mean))
    assert _counters_zero()  # every counter the statistics launch used is back at 0


@needs_interpreter
def test_triton_zero_groups_and_quiet_heads():
    """A silent q head, a single key (k - mean = 0), a silent v head and heads 2**40 apart: descale 1 and
    exact zeros where there is nothing to scale, exponents clamped at 60, spreads as the reference's."""
    q, k, v = _inputs("BNHD", 2, 3, 33, 1, 32, torch.bfloat16)
    q[0, 1] = 0.0
    v[1, 2] = 0.0
    q[1, 0] *= 2.0 ** -40
    for granularity in ("head", "tensor", ("tensor", "tensor", "head")):
        got = fp8.quantize_qkv(q, k, v, granularity, smooth_k=True)
        _same(got, fp8.quantize_qkv_reference(q, k, v, granularity, smooth_k=True, k_mean=got.k_mean))
        assert torch.equal(got.descale[1], torch.ones(2, 3)) and not bool(got.k.float().any())
        assert bool(torch.isfinite(got.descale).all())
    got = fp8.quantize_qkv(q, k, v, "head", smooth_k=True)
    assert got.descale[0, 0, 1] == 1.0 and got.descale[2, 1, 2] == 1.0 and got.spread[0] >= 40


@needs_interpreter
def test_triton_counters_are_per_device_and_stream_and_grow():
    fp8._counters.clear()
    small = _inputs("BNHD", 1, 2, 20, 20, 16, torch.bfloat16)
    fp8.quantize_qkv(*small)
    buf = fp8._counters[("cpu", -1, 0)]
    big = _inputs("BNHD", 3, 40, 5, 7, 16, torch.bfloat16, seed=1)  # 3 + 3 * 120 counters: more than the first
    got = fp8.quantize_qkv(*big, "tensor")
    assert fp8._counters[("cpu", -1, 0)].numel() >= 3 + 3 * 120 > buf.numel() and _counters_zero()
    _same(got, fp8.quantize_qkv_reference(*big, "tensor", k_mean=got.k_mean))
    _same(fp8.quantize_qkv(*small), fp8.quantize_qkv_reference(*small, k_mean=fp8.quantize_qkv(*small).k_mean))


@needs_interpreter
def test_triton_heads_spanning_several_chunks():
    # D=128 tiles hold 32 tokens; 100 tokens make 4 chunks of 32 per head: the maxima sit on chunk ends
    q, k, v = _inputs("BNHD", 1, 1, 100, 100, 128, torch.bfloat16, k_bias=5.0, seed=3)
    q[0, 0, 31, 7], k[0, 0, 63, 3], v[0, 0, 99, 1] = 300.0, -200.0, 100.0
    for granularity, smooth in (("head", True), ("tensor", False)):
        got = fp8.quantize_qkv(q, k, v, granularity, smooth_k=smooth)
        _same(got, fp8.quantize_qkv_reference(q, k, v, granularity, smooth_k=smooth, k_mean=got.k_mean))


@needs_interpreter
def test_triton_smoothed_head_reduction_over_more_than_one_tile_of_chunks():
    """1100 keys at D=128 make 18 chunks a head: the head's reduction reads them as a 16-row tile and a 2-row one.
    The extremes sit in the second tile's chunks; the k mean and every byte must match the reference."""
    kern = fp8._kernels()
    per, nch = kern.chunks(1100, kern._blocks(128)[0])
    assert nch > kern.RB.value and nch <= kern.MAX_CHUNKS, (per, nch)
    q, k, v = _inputs("BNHD", 1, 2, 40, 1100, 128, torch.bfloat16, k_bias=4.0, seed=11)
    k[0, 1, 1090, 5], k[0, 0, 1099, 9] = 250.0, -250.0
    got = fp8.quantize_qkv(q, k, v, "head", smooth_k=True)
    ref = fp8.quantize_qkv_reference(q, k, v, "head", smooth_k=True)
    assert torch.allclose(got.k_mean, ref.k_mean, rtol=1e-5, atol=1e-6)  # summed in another order, not bit for bit
    _same(got, fp8.quantize_qkv_reference(q, k, v, "head", smooth_k=True, k_mean=got.k_mean))


@needs_interpreter
def test_smoothed_and_plain_calls_take_their_own_statistics_launch(monkeypatch):
    """Smoothed k takes the 4-warp statistics launcher, plain calls the 8-warp one (measured faster each way)."""
    kern = fp8._kernels()
    used = []
    for name in ("_STATS", "_STATS_SMOOTH"):
        launcher = getattr(kern, name)
        monkeypatch.setattr(kern, name, lambda *a, _l=launcher, _n=name: (used.append(_n), _l(*a))[1])
    q, k, v = _inputs("BNHD", 1, 2, 20, 30, 32, torch.float16, seed=5)
    fp8.quantize_qkv(q, k, v, "head", smooth_k=True)
    fp8.quantize_qkv(q, k, v, "head", smooth_k=False)
    assert used == ["_STATS_SMOOTH", "_STATS"], used
    monkeypatch.undo()
    assert (kern._STATS_SMOOTH.num_warps, kern._STATS.num_warps) == (kern.SMOOTH_WARPS, kern.NUM_WARPS) == (4, 8)


@needs_interpreter
def test_triton_rounding_is_nearest_even_at_ties_and_binade_edges():
    # amax 448 gives scale 1: the values land on the grid as given (ties between e4m3 neighbours, carries
    # into the next binade, subnormals)
    vals = torch.tensor([448.0, 84.0, -84.0, 125.05, 127.9, 31.44, -7.86, 0.0029, 0.00098, 2.0 ** -10, 240.0,
                         232.0, 1.0625, 1.1875, -0.0, 17.0, 19.0])
    x = vals[:, None].expand(vals.numel(), 16).reshape(1, 1, vals.numel(), 16).contiguous()
    got = fp8.quantize_qkv(x, x, x, "head", smooth_k=False)
    assert torch.equal(got.descale, torch.ones(3, 1, 1))
    assert torch.equal(got.q.float()[0, :, 0, 0], vals.to(E4M3).float())


@needs_interpreter
def test_triton_non_finite_inputs_give_nan_descales():
    q, k, v = _inputs("BNHD", 1, 2, 16, 16, 16, torch.bfloat16)
    q[0, 1, 3, 5] = float("nan")
    k[0, 0, 2, 1] = float("inf")
    for smooth in (False, True):
        d = fp8.quantize_qkv(q, k, v, "head", smooth_k=smooth).descale
        assert bool(torch.isnan(d[0, 0, 1])) and bool(torch.isfinite(d[0, 0, 0]))
        assert bool(torch.isnan(d[1, 0, 0])) and bool(torch.isfinite(d[1, 0, 1])) and bool(torch.isfinite(d[2]).all())
    d = fp8.quantize_qkv(q, k, v, "tensor", smooth_k=True).descale
    assert bool(torch.isnan(d[:2]).all()) and bool(torch.isfinite(d[2]).all())


@needs_interpreter
def test_triton_dequantize_output_is_float32_then_one_rounding():
    o8 = _all_e4m3((2, 9, 3, 32), seed=4)
    d, factors = _dequant_cases()
    # the interpreter's float32 -> bfloat16 cast truncates (the GPU's cvt.rn.bf16x2.f32 rounds to nearest even,
    # see the ahead-of-time test): bfloat16 only with the exact power-of-two factor here
    for factor, dtype in ((factors[0], torch.float16), (factors[1], torch.float16), (factors[0], torch.bfloat16)):
        want = fp8.dequantize_output_reference(o8, d, factor, dtype)
        got = fp8.dequantize_output(o8, d, factor, dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (factor, dtype)


def test_direct_launch_keeps_the_compiled_kernel_per_key_and_falls_back(monkeypatch):
    """Launcher with a fake kernel: the first launch per key goes through kernel[grid](..., constexprs by name),
    later ones through the kept compiled[grid](*args, *constexprs); other integers make another key; a direct
    launch that raises turns the direct path off and the launch still happens through kernel[grid]."""
    from genesis_core.attn.quant import _triton_launch as L

    log = []

    class Compiled:
        def __init__(self, fail=False):
            self.fail = fail

        def __getitem__(self, grid):
            def run(*args):
                if self.fail:
                    raise TypeError("launcher refused")
                log.append(("direct", grid, args))
            return run

    class Kernel:
        arg_names = ["x", "n", "BLOCK"]
        fail = False

        def __getitem__(self, grid):
            def run(*args, **kw):
                log.append(("triton", grid, args, kw))
                return Compiled(self.fail)
            return run

    monkeypatch.setattr(L, "_fast", True)
    monkeypatch.setattr(L, "_launchers", [])
    kern = Kernel()
    launch = L.Launcher(kern, ("BLOCK",), num_warps=4)
    launch((2, 1, 1), ("ptr", 7), (64,), ("dev",))
    launch((2, 1, 1), ("ptr", 7), (64,), ("dev",))
    launch((2, 1, 1), ("ptr", 8), (64,), ("dev",))  # n = 8: another key
    assert [e[0] for e in log] == ["triton", "direct", "triton"]
    assert log[0][3] == {"BLOCK": 64, "num_warps": 4} and log[1][2] == ("ptr", 7, 64)
    kern.fail = True
    launch((1, 1, 1), ("ptr", 9), (32,), ("dev",))  # kept, and its direct launch will refuse
    launch((1, 1, 1), ("ptr", 9), (32,), ("dev",))
    assert [e[0] for e in log[-2:]] == ["triton", "triton"] and not L.fast_launch() and not launch.compiled
    with pytest.raises(AssertionError):
        L.Launcher(kern, ("n",))  # constexprs must come last in the signature


def test_triton_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(fp8, "_kernels_mod", None)
    monkeypatch.setattr(fp8, "_missing", None)
    real = importlib.import_module

    def no_triton(name, *a, **kw):
        if name.endswith("_fp8_triton"):
            raise ImportError("No module named 'triton'")
        return real(name, *a, **kw)

    monkeypatch.setattr(fp8.importlib, "import_module", no_triton)
    why = fp8.triton_missing()
    assert why and "pip install triton" in why
    with pytest.raises(ImportError, match="pip install triton"):
        fp8._kernels()


def test_the_gpu_study_runs_its_cpu_dry_run(tmp_path):
    """scripts/gpu/fp8_gpu.py --cpu-dry-run: the reference math (and the kernels under the interpreter) on tiny
    shapes, every section written to the JSON."""
    import importlib.util as util
    import json

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gpu", "fp8_gpu.py")
    spec = util.spec_from_file_location("fp8_gpu_script", path)
    script = util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "fp8_gpu.json").read_text())
    emulated = [r for r in out["errors"] if r["path"] == "emulated" and r["status"] == "ok"]
    assert len(emulated) == len(script.CPU_SHAPES) * len(script.KINDS) * 6
    assert all(0 < r["rel_l2"] < 0.5 and 0.9 < r["cos"] <= 1.0 for r in emulated)
    smooth = {r["shape"]: r["rel_l2"] for r in emulated if r["inputs"] == "outliers" and r["smooth_k"]
              and r["granularity"] == "head"}
    plain = {r["shape"]: r["rel_l2"] for r in emulated if r["inputs"] == "outliers" and not r["smooth_k"]
             and r["granularity"] == "head"}
    assert all(smooth[s] < plain[s] for s in smooth)  # k smoothing pays off on k with a channel offset
    assert any(r["what"].startswith("sdpa bf16") and r["ms"] for r in out["timing"])
    if not torch.cuda.is_available():  # the report probes the machine: with a Hopper GPU FA3's FP8 path may run
        assert out["env"]["backends"]["fa3_fp8"]["reason"]  # nothing FP8 runs on a CPU


AOT_SCRIPT = r'''
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from genesis_core.attn.quant import _fp8_triton as K

DIV16 = {"q", "k", "v", "q8", "k8", "v8", "out", "ws", "desc", "mean", "mean_in", "cnt", "o8", "sqb", "sqh", "sqn", "skb",
         "skh", "skn", "svb", "svh", "svn", "D"}
PTRS = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "q8": "*fp8e4nv", "k8": "*fp8e4nv", "v8": "*fp8e4nv", "out": "*bf16",
        "ws": "*fp32", "desc": "*fp32", "mean": "*fp32", "mean_in": "*fp32", "cnt": "*i32", "o8": "*fp8e4nv"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def build(fn, constexprs, ptrs=PTRS, num_warps=K.NUM_WARPS):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in constexprs else ptrs.get(name, "fp32" if name == "factor" else "i32")
        if name in DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]


def registers(ptx):
    if not os.path.exists(PTXAS):
        return None
    with open("/tmp/_genesis_fp8.ptx", "w") as f:
        f.write(ptx)
    err = subprocess.run([PTXAS, "-arch=sm_90a", "-v", "/tmp/_genesis_fp8.ptx", "-o", os.devnull],
                         capture_output=True, text=True).stderr
    regs, spill = re.findall(r"Used (\d+) registers", err), re.findall(r"(\d+) bytes spill stores", err)
    return [int(regs[0]), int(spill[0])] if regs and spill else None


ptx = {
    "stats": build(K._stats, dict(SMOOTH_K=True, TENSOR_MASK=3, BLOCK_N=32, BLOCK_D=128, HB=K.HEADS),
                   num_warps=K.SMOOTH_WARPS),
    "stats_plain": build(K._stats, dict(SMOOTH_K=False, TENSOR_MASK=0, BLOCK_N=32, BLOCK_D=128, HB=K.HEADS)),
    "cast": build(K._cast, dict(SMOOTH_K=True, EXACT=False, BLOCK_N=32, BLOCK_D=128)),
    "dequant": build(K._dequant, dict(BLOCK_N=32, BLOCK_D=128)),
    "dequant_fp16": build(K._dequant, dict(BLOCK_N=32, BLOCK_D=128), dict(PTRS, out="*fp16")),
}
json.dump({k: {"v4_loads": "ld.global.v4" in p, "fp8_cvt": "cvt.rn.satfinite.e4m3x2.f32" in p,
               "half_cvt": [c for c in ("cvt.rn.bf16x2.f32", "cvt.rn.f16x2.f32") if c in p],
               "acq_rel_atomics": len(re.findall(r"atom\.[a-z_.]*acq_rel[a-z_.]*\.add", p)),
               "regs_spill": registers(p)} for k, p in ptx.items()}, sys.stdout)
'''


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (pip install triton)")
def test_the_kernels_compile_for_sm90_ahead_of_time():
    """Triton compiles the kernels for sm_90 without a GPU: what the interpreter cannot check (types across
    branches, pointer selects, while loops, acq_rel atomics), plus 16-byte vector loads, the
    round-to-nearest-even e4m3 cast, and (with Triton's ptxas) registers and spills, each kernel compiled with the
    warps it ships with: the smoothed statistics kernel (4 warps; 128 registers measured on the H200, 2026-12-02)
    at 128 or fewer (4 programs of 128 threads per SM), the others at 80 or fewer."""
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["stats"]["v4_loads"] and got["cast"]["v4_loads"] and got["dequant"]["v4_loads"], got
    assert got["cast"]["fp8_cvt"], got
    # the output pass: e4m3 -> float32 exactly, one float32 product, one round-to-nearest-even conversion
    assert got["dequant"]["half_cvt"] == ["cvt.rn.bf16x2.f32"] and got["dequant_fp16"]["half_cvt"] == ["cvt.rn.f16x2.f32"]
    assert got["stats"]["acq_rel_atomics"] == 2 and got["stats_plain"]["acq_rel_atomics"] == 2, got
    for name in ("stats", "stats_plain", "cast", "dequant", "dequant_fp16"):
        rs = got[name]["regs_spill"]
        assert rs is None or (rs[0] <= (128 if name == "stats" else 80) and rs[1] <= 8), (name, rs)
