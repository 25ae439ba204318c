"""The FlashAttention-package backends (fa2, fa3, fa4, the flash umbrella) and SageAttention (sage, sage2_*), on CPU.

The packages are faked: modules injected into ``sys.modules`` (importable-and-right, importable-and-wrong) or a
finder whose loader raises (importable-but-broken), and the probes are pointed at the CPU (the backends' device
and capability limits are lifted for the test). Real kernels run in tests/test_gpu_flash_sage.py.
"""
from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from genesis_core.attn import attention, autotune, dispatch, last_backend, registry
from genesis_core.attn.backends import _flash_pkg, fa4, flash, sage
from genesis_core.attn.limits import checker
from genesis_core.attn.types import AttentionCall
from tests.conftest import reference_attention

NAMES = ("flash", "fa2", "fa3", "fa4", "sage", "sage2_fp8", "sage2_fp16", "sage2_triton")
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ fakes


def attend_bnhd(q, k, v, scale=None):
    """Attention on [B, N, H, D] tensors (float32 math, GQA by repeat), output contiguous [B, N, H, Dv] in q's dtype."""
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.softmax(qh @ kh.transpose(-1, -2) * scale, -1) @ vh
    return out.transpose(1, 2).contiguous().to(q.dtype)


class Recorder:
    """A fake FlashAttention ``flash_attn_func``: records what it was handed, returns what ``mode`` says."""

    def __init__(self, mode="right", returns_tuple=False, first_call_s=0.0):
        self.mode, self.returns_tuple, self.first_call_s = mode, returns_tuple, first_call_s
        self.calls, self.configs = [], set()

    def __call__(self, q, k, v, softmax_scale=None, **kwargs):
        self.calls.append({"q": q, "k": k, "v": v, "scale": softmax_scale, "kwargs": kwargs})
        key = (q.dtype, q.shape[-1], q.shape[2] // k.shape[2])
        if key not in self.configs:  # FA4 compiles here
            self.configs.add(key)
            time.sleep(self.first_call_s)
        if self.mode == "right":
            out = attend_bnhd(q, k, v, softmax_scale)
        elif self.mode == "wrong":
            out = q.contiguous() * 2
        elif self.mode == "zeros":
            out = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
        elif self.mode == "empty":
            out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype)
        else:
            raise RuntimeError("no kernel image is available for execution on the device")
        return (out, None) if self.returns_tuple else out


def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    return mod


class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A finder that finds ``names`` and whose loader raises ``exc`` when they are imported."""

    def __init__(self, names, exc):
        self.names, self.exc = set(names), exc

    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in self.names else None

    def create_module(self, spec):
        return None

    def exec_module(self, mod):
        raise self.exc


class Fakes:
    def __init__(self, mp):
        self.mp = mp

    def add(self, name, **attrs):
        mod = module(name, **attrs)
        self.mp.setitem(sys.modules, name, mod)
        return mod

    def broken(self, names, exc):
        for n in names:
            self.mp.delitem(sys.modules, n, raising=False)
        self.mp.setattr(sys, "meta_path", [Broken(names, exc)] + sys.meta_path)

    def fa2(self, fn):
        return self.add("flash_attn", flash_attn_func=fn)

    def fa3(self, fn, flags=None, name="fa3_fwd_interface"):
        if flags is not None:
            self.add("fa3_fwd_config" if name == "fa3_fwd_interface" else "flash_attn_config",
                     CONFIG={"build_flags": flags})
        return self.add(name, flash_attn_func=fn)

    def fa4(self, fn):
        self.add("flash_attn")
        return self.add("flash_attn.cute", flash_attn_func=fn)

    def sage(self, mod):
        self.mp.setitem(sys.modules, "sageattention", mod)
        return mod


def _cpu_check(b):
    lim = dataclasses.replace(b.limits, devices=None, min_capability=None, max_capability=None)
    return checker(lim, b.unsupported)


@pytest.fixture
def fakes():
    """Probes on the CPU, device/capability limits lifted, every package absent unless a test injects it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_flash_pkg, "probe_device", lambda: "cpu")
        for name in ("flash_attn", "flash_attn.cute", "flash_attn_interface", "fa3_fwd_interface", "sageattention"):
            mp.delitem(sys.modules, name, raising=False)
        mp.setattr(_flash_pkg, "installed", lambda m: m in sys.modules)
        mp.setattr(_flash_pkg, "dist_version", lambda *d: None)
        mp.setattr(sage, "package_version", lambda d: None)
        mp.setattr(sage, "source_version", lambda: None)
        mp.setattr(sage, "_device_cap", lambda device: (9, 0))
        mp.setattr(fa4, "_compiled", {})
        mp.setattr(sage, "_major_seen", None)
        for name in NAMES:
            b = registry.get(name)
            mp.setattr(b, "_check", _cpu_check(b))
            mp.setattr(b, "precision", b.precision)
            mp.setattr(b, "first_call_s", b.first_call_s)
            b.reprobe()
        dispatch.clear_plans()
        yield Fakes(mp)
        for name in NAMES:
            registry.get(name).reprobe()
    for name in NAMES:
        registry.get(name).reprobe()
    dispatch.clear_plans()


def bnhd_inputs(b=1, n=96, h=4, hkv=4, d=64, nk=None, dtype=torch.bfloat16, seed=None):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()) if seed is None else seed)
    q = torch.randn(b, n, h, d, generator=g).to(dtype)
    k = torch.randn(b, nk or n, hkv, d, generator=g).to(dtype)
    v = torch.randn(b, nk or n, hkv, d, generator=g).to(dtype)
    return q, k, v


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


# ------------------------------------------------------------------ limits as data, one wording


def _meta(dtype=torch.float16, d=64, dv=None, mask=False, h=2, hkv=2, grad=False):
    q = torch.empty(1, h, 128, d, device="meta", dtype=dtype, requires_grad=grad)
    k = torch.empty(1, hkv, 128, d, device="meta", dtype=dtype)
    v = torch.empty(1, hkv, 128, dv or d, device="meta", dtype=dtype)
    m = torch.empty(1, 1, 128, 128, device="meta", dtype=torch.bool) if mask else None
    return AttentionCall(q, k, v, m, 0.125)


@pytest.mark.parametrize("name", ["fa2", "fa3", "fa4"])
@pytest.mark.parametrize("call, pattern", [
    (_meta(d=264), r"^head_dim 264 not supported: needs <= 256$"),
    (_meta(d=60), r"^head_dim 60 not supported: needs a multiple of 8$"),
    (_meta(dtype=torch.float32), r"^dtype float32 not supported: needs one of \(float16, bfloat16\)$"),
    (_meta(dv=32), r"^v head_dim 32 not supported: needs v head_dim equal to q/k head_dim 64$"),
    (_meta(mask=True), r"^mask \(bool\) not supported: needs no mask$"),
    (_meta(), r"^device meta not supported: needs cuda$"),
])
def test_flash_packages_refuse_with_the_shared_wording(name, call, pattern):
    reason = registry.get(name).refusal(call)
    assert reason is not None and re.search(pattern, reason), reason


@pytest.mark.parametrize("name", ["sage", "sage2_fp8", "sage2_fp16", "sage2_triton"])
@pytest.mark.parametrize("call, pattern", [
    (_meta(d=192), r"^head_dim 192 not supported: needs <= 128$"),
    (_meta(dtype=torch.float32), r"^dtype float32 not supported: needs one of \(float16, bfloat16\)$"),
    (_meta(mask=True), r"^mask \(bool\) not supported: needs no mask$"),
    (_meta(grad=True), r"^inputs that require grad not supported: needs torch.no_grad\(\)"),
    (_meta(d=40), r"^device meta not supported: needs cuda$"),  # 2.x pads head_dim 40 itself
])
def test_sage_backends_refuse_with_the_shared_wording(name, call, pattern, monkeypatch):
    monkeypatch.setattr(sage, "_major_seen", 2)
    reason = registry.get(name).refusal(call)
    assert reason is not None and re.search(pattern, reason), reason


def test_limits_are_the_packages_own():
    fa2l, fa3l, fa4l = (registry.get(n).limits for n in ("fa2", "fa3", "fa4"))
    assert (fa2l.min_capability, fa2l.max_capability, fa2l.autograd) == ((8, 0), None, True)
    assert (fa3l.min_capability, fa3l.max_capability) == ((8, 0), (9, 0))  # sm_90a kernels: no Blackwell
    assert (fa4l.min_capability, fa4l.autograd) == ((9, 0), False)  # forward only in Genesis
    assert [registry.get(n).limits.min_capability for n in ("sage2_fp8", "sage2_fp16", "sage2_triton")] == \
        [(8, 9), (8, 0), (8, 0)]
    assert all(registry.get(n).limits.gqa for n in NAMES)  # every one takes grouped-query attention natively


def test_fa4_refuses_blackwell_head_dims_between_128_and_256(monkeypatch):
    monkeypatch.setattr(fa4, "_arch_major", lambda call: 10)
    assert fa4._unsupported(_meta(d=192)) == \
        "head_dim 192 not supported: needs <= 128 or 256 on compute capability 10.x/11.x"
    assert fa4._unsupported(_meta(d=256)) is None and fa4._unsupported(_meta(d=128)) is None
    monkeypatch.setattr(fa4, "_arch_major", lambda call: 9)
    assert fa4._unsupported(_meta(d=192)) is None


def test_fa3_build_flags_refuse_what_the_build_left_out(fakes):
    fakes.fa3(Recorder(), flags={"FLASHATTENTION_DISABLE_FP16": True, "FLASHATTENTION_DISABLE_BACKWARD": True,
                                 "FLASHATTENTION_DISABLE_HDIM256": True})
    b = registry.get("fa3")
    assert b.available() is None  # probed in bfloat16: the build has no float16
    assert "fa3_fwd_interface" in b.description() and "(fa3_fwd)" in b.version()
    assert b.refusal(_meta()) == ("dtype float16 not supported: needs bfloat16 (this build of fa3_fwd_interface was "
                                  "compiled with FLASHATTENTION_DISABLE_FP16)")
    with torch.enable_grad():
        assert "FLASHATTENTION_DISABLE_BACKWARD" in b.refusal(_meta(dtype=torch.bfloat16, grad=True))
    assert b.refusal(_meta(dtype=torch.bfloat16, d=256)).startswith("head_dim 256 not supported: needs <= 192")
    assert b.refusal(_meta(dtype=torch.bfloat16, d=192)) is None


def test_fa3_with_a_backward_gives_gradients_through_flash_attn_func(fakes):
    """A full FA3 build (backward compiled) whose compiled fwd op is called directly for speed: that op has no
    autograd, so a call that needs a backward must go through flash_attn_func and get the right gradients."""
    names = ["q", "k", "v", "k_new", "v_new", "q_v", "out", "q_descale", "k_descale", "v_descale", "softmax_scale",
             "is_causal", "num_splits", "pack_gqa", "sm_margin"]
    direct_calls = []

    def fwd(q, k, v, softmax_scale=None, num_splits=0, **kwargs):  # a compiled op: nothing recorded for autograd
        direct_calls.append(q.requires_grad)
        with torch.no_grad():
            return attend_bnhd(q, k, v, softmax_scale), None, None, None

    fwd._schema = types.SimpleNamespace(arguments=[types.SimpleNamespace(name=n) for n in names])
    wrapper = Recorder()
    mod = fakes.fa3(wrapper, flags={}, name="flash_attn_interface")
    mod.flash_attn_3_cuda = types.SimpleNamespace(fwd=types.SimpleNamespace(default=fwd))
    b = registry.get("fa3")
    assert b.available() is None and "compiled fwd op called directly" in b.description()
    q, k, v = bnhd_inputs(n=48, h=2, hkv=2, d=64, dtype=torch.float16)
    with torch.no_grad():  # no backward needed: the fast op
        before = len(wrapper.calls)
        out = attention(q, k, v, backend="fa3", layout="BNHD")
        assert last_backend() == "fa3" and len(wrapper.calls) == before and direct_calls[-1] is False
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        out = attention(qg, kg, vg, backend="fa3", layout="BNHD")
        assert last_backend() == "fa3" and len(wrapper.calls) == before + 1
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
        ref = reference_attention(q64.transpose(1, 2), k64.transpose(1, 2), v64.transpose(1, 2)).transpose(1, 2)
        (ref * weights.double()).sum().backward()
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-2, atol=1e-2)
    for got, want in ((qg, q64), (kg, k64), (vg, v64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------ probes


@pytest.mark.parametrize("name, inject, pip", [
    ("fa2", lambda f: f.fa2(Recorder()), "pip install flash-attn"),
    ("fa3", lambda f: f.fa3(Recorder()), "pip install fa3-fwd"),
    ("fa4", lambda f: f.fa4(Recorder(returns_tuple=True)), "pip install flash-attn-4"),
    ("sage2_fp16", lambda f: f.sage(sage2_module()), "pip install sageattention"),
])
def test_probe_says_not_installed_and_no_cuda(fakes, name, inject, pip):
    b = registry.get(name)
    assert b.available().startswith("not installed (") and pip in b.available()
    inject(fakes)
    b.reprobe()
    fakes.mp.setattr(_flash_pkg, "probe_device", lambda: None)
    assert "no CUDA device" in b.available() and b.available().startswith("installed, but")


@pytest.mark.parametrize("name, modules", [
    ("fa2", ["flash_attn"]), ("fa3", ["fa3_fwd_interface"]), ("fa4", ["flash_attn", "flash_attn.cute"]),
    ("sage", ["sageattention"]), ("sage2_fp8", ["sageattention"]),
])
def test_probe_names_an_import_error(fakes, name, modules):
    fakes.broken(modules, ImportError("libc10_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEab"))
    fakes.mp.setattr(_flash_pkg, "installed", lambda m: m in modules)
    reason = registry.get(name).available()
    assert reason is not None and "undefined symbol: _ZN3c104cuda9SetDeviceEab" in reason, reason
    assert "import failed" in reason


def test_fa4_without_the_cute_package_names_the_wheel_that_holds_it(fakes):
    """What the H200 run of 2026-12-01 hit: nvidia-cutlass-dsl installed with --no-deps, no cutlass.cute."""
    fakes.broken(["flash_attn", "flash_attn.cute"], ModuleNotFoundError("No module named 'cutlass.cute'"))
    fakes.mp.setattr(_flash_pkg, "installed", lambda m: m in ("flash_attn", "flash_attn.cute"))
    reason = registry.get("fa4").available()
    assert "No module named 'cutlass.cute'" in reason and "nvidia-cutlass-dsl-libs-core" in reason, reason


@pytest.mark.parametrize("mode, pattern", [
    ("wrong", r"returns wrong results: relative L2 error [0-9.e+-]+ against float64 \(allowed 0.0[12]\)"),
    ("zeros", r"returns output memory it never wrote \(all zeros where the float64 reference is not\)"),
    ("empty", r"returns (output memory it never wrote|wrong results|NaN|Inf)"),
    ("raise", r"probe call failed: RuntimeError: no kernel image is available"),
])
@pytest.mark.parametrize("name", ["fa2", "fa3", "fa4"])
def test_probe_refuses_a_kernel_that_is_wrong_or_writes_nothing(fakes, name, mode, pattern):
    fn = Recorder(mode, returns_tuple=name == "fa4")
    getattr(fakes, name)(fn)
    reason = registry.get(name).available()
    assert reason is not None and re.search(pattern, reason), reason
    assert fn.calls, "the probe must really call the kernel"


def test_probe_accepts_a_right_kernel_and_hands_it_bnhd_views(fakes):
    fn = Recorder()
    fakes.fa2(fn)
    assert registry.get("fa2").available() is None
    call = fn.calls[0]
    assert all(call[t].is_contiguous() for t in "qkv")  # the BNHD tensors made as ComfyUI makes them
    assert call["q"].shape == (1, 128, 2, 64)


def test_verdict_names_unwritten_memory_when_the_output_was_poisoned():
    ref = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    nan = torch.full(ref.shape, float("nan"))
    assert _flash_pkg.verdict(nan, ref, 0.02, poisoned=True) == (
        "returns output memory it never wrote (NaN where the float64 reference is finite, detected by a NaN-poisoned "
        "probe)")
    assert _flash_pkg.verdict(nan, ref, 0.02, poisoned=False) == "returns NaN where the float64 reference is finite"
    assert _flash_pkg.verdict(ref.float(), ref, 0.02) is None
    assert _flash_pkg.verdict(ref[..., :8], ref, 0.02).startswith("probe call returned shape (1, 2, 8, 8)")
    assert _flash_pkg.verdict((ref + 0.1 * torch.randn_like(ref)), ref, 0.02).startswith("returns wrong results")


def test_poisoning_is_a_no_op_off_cuda():
    with _flash_pkg.poisoned_memory(1024, torch.bfloat16, torch.device("cpu")) as poisoned:
        assert poisoned is False


# ------------------------------------------------------------------ the umbrella


def test_flash_prefers_fa3_over_fa4_on_hopper_only(fakes, monkeypatch):
    fakes.fa4(Recorder(returns_tuple=True)), fakes.fa3(Recorder()), fakes.fa2(Recorder())
    fb = registry.get("flash")
    for cap, first in (((9, 0), "fa3"), ((10, 0), "fa4"), ((8, 6), "fa4")):
        monkeypatch.setattr(flash, "_capability", lambda device, cap=cap: cap)
        fb.reprobe()
        assert [b.name for b in flash.members()][:2] == [first, ({"fa3", "fa4"} - {first}).pop()], cap
        assert fb.description().startswith(first)


def test_flash_prefers_fa4_then_fa3_then_fa2_then_pytorch(fakes):
    fns = {"fa4": Recorder(returns_tuple=True), "fa3": Recorder(), "fa2": Recorder()}
    fakes.fa4(fns["fa4"]), fakes.fa3(fns["fa3"], flags={"FLASHATTENTION_DISABLE_FP16": True}), fakes.fa2(fns["fa2"])
    fb = registry.get("flash")
    assert fb.available() is None
    assert [b.name for b in flash.members()] == ["fa4", "fa3", "fa2", "sdpa_flash"]
    assert fb.description().startswith("fa4: FlashAttention-4")
    q, k, v = bnhd_inputs()
    for f in fns.values():
        f.calls.clear()
    out = attention(q, k, v, backend="flash", layout="BNHD")
    assert fns["fa4"].calls and not fns["fa3"].calls and last_backend() == "flash"
    assert rel_err(out.transpose(1, 2), reference_attention(*(t.transpose(1, 2) for t in (q, k, v)))) < 2e-2
    qg = q.clone().requires_grad_()  # fa4 is forward only here: fa3 takes a call that needs a backward
    with torch.enable_grad():
        grad_call = AttentionCall(qg.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.1)
        assert flash.member_for(grad_call).name == "fa3"
    qh = [t.half() for t in (q, k, v)]  # a float16 call skips the bfloat16-only FA3 build ... and fa4 is broken now
    fns["fa4"].mode = "raise"
    registry.get("fa4").reprobe()
    fb.reprobe()
    assert [b.name for b in flash.members()] == ["fa3", "fa2", "sdpa_flash"]
    assert flash.member_for(AttentionCall(*(t.transpose(1, 2) for t in qh), None, 0.125)).name == "fa2"


def test_flash_says_why_when_no_member_runs(fakes):
    fakes.mp.setattr(registry.get("sdpa_flash"), "_reason", "torch lacks it")
    fakes.mp.setattr(registry.get("sdpa_flash"), "_probed", True)
    reason = registry.get("flash").available()
    assert reason.startswith("no FlashAttention runs here (fa4: not installed")
    assert "sdpa_flash: torch lacks it" in reason


# ------------------------------------------------------------------ FA4's first call


def test_fa4_first_call_per_configuration_is_timed_logged_and_kept_out_of_timings(fakes, genesis_log):
    fn = Recorder(returns_tuple=True, first_call_s=0.25)
    fakes.fa4(fn)
    b = registry.get("fa4")
    assert b.available() is None
    assert list(fa4.first_calls()) == ["bfloat16 head_dim 128"] and b.first_call_s >= 0.25  # the probe's config
    q, k, v = bnhd_inputs(d=64, h=4, hkv=2)
    attention(q, k, v, backend="fa4", layout="BNHD")
    attention(q, k, v, backend="fa4", layout="BNHD")
    assert "bfloat16 head_dim 64, 2 query heads per kv head" in fa4.first_calls()
    logged = [m for m in genesis_log if m.startswith("fa4: first call of bfloat16 head_dim 64, 2 query heads")]
    assert len(logged) == 1 and re.search(r"compiled in 0\.[2-9] s$", logged[0]), genesis_log
    assert any(r["name"] == "fa4" and r["first_call_s"] >= 0.25 for r in registry.report())
    # the autotuner's warm-up run pays the compile of a new configuration; no timed sample does
    q, k, v = bnhd_inputs(d=96, n=64)
    call = AttentionCall(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 96 ** -0.5)
    entry = autotune.measure(call, ["fa4", "sdpa"], budget=5000)
    assert "fa4" in entry["ms"] and entry["ms"]["fa4"] < 100, entry
    assert "bfloat16 head_dim 96" in fa4.first_calls()


# ------------------------------------------------------------------ SageAttention: smooth_k, layout, precision


class FakeSage:
    """Records what a SageAttention function was handed; 1.x smooths k in place (as 1.0.6 does)."""

    def __init__(self, major):
        self.major, self.calls = major, []

    def fn(self, label, smooth_default=True):
        def kernel(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, smooth_k=smooth_default, **kw):
            self.calls.append({"fn": label, "q": q, "k": k, "layout": tensor_layout, "smooth_k": smooth_k, "kw": kw,
                               "k_before": k.clone()})
            if smooth_k and self.major == 1:
                k -= k.mean(dim=1 if tensor_layout == "NHD" else 2, keepdim=True)
            if tensor_layout == "HND":
                return attend_bnhd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sm_scale).transpose(1, 2)
            return attend_bnhd(q, k, v, sm_scale)
        return kernel


def sage2_module(rec=None):
    rec = rec or FakeSage(2)
    names = ["sageattn_qk_int8_pv_fp8_cuda_sm90", "sageattn_qk_int8_pv_fp8_cuda", "sageattn_qk_int8_pv_fp16_cuda",
             "sageattn_qk_int8_pv_fp16_triton"]
    core = types.SimpleNamespace(SM80_ENABLED=True, SM89_ENABLED=True, SM90_ENABLED=True)
    sageattn_inner = rec.fn("sageattn_inner")

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        return sageattn_inner(q, k, v, tensor_layout=tensor_layout, sm_scale=sm_scale)  # 2.x drops **kwargs

    mod = module("sageattention", sageattn=sageattn, core=core, **{n: rec.fn(n) for n in names})
    mod.rec = rec
    return mod


def test_sage_2x_smooths_k_itself_and_gets_the_callers_tensors(fakes):
    mod = fakes.sage(sage2_module())
    assert registry.get("sage").available() is None
    mod.rec.calls.clear()
    q, k, v = bnhd_inputs(d=64)
    k0 = k.clone()
    out = attention(q, k, v, backend="sage", layout="BNHD", quality="fast")
    got = mod.rec.calls[-1]
    assert got["k"] is k or (got["k"].data_ptr() == k.data_ptr() and got["k"].stride() == k.stride())  # no copy
    assert got["q"].data_ptr() == q.data_ptr() and got["layout"] == "NHD"
    assert got["smooth_k"] is True  # the kernel's own default: sageattn forwards no smooth_k
    assert torch.equal(k, k0) and out.is_contiguous()  # BNHD in, contiguous BNHD out
    assert rel_err(out.transpose(1, 2), reference_attention(*(t.transpose(1, 2) for t in (q, k, v)))) < 2e-2


@pytest.mark.parametrize("name, fn, kwargs", [
    ("sage2_fp8", "sageattn_qk_int8_pv_fp8_cuda_sm90", {"pv_accum_dtype": "fp32+fp32"}),
    ("sage2_fp16", "sageattn_qk_int8_pv_fp16_cuda", {"pv_accum_dtype": "fp32"}),
    ("sage2_triton", "sageattn_qk_int8_pv_fp16_triton", {}),
])
def test_sage2_kernels_get_smooth_k_and_no_copy(fakes, name, fn, kwargs):
    mod = fakes.sage(sage2_module())
    b = registry.get(name)
    assert b.available() is None and fn in b.description()
    mod.rec.calls.clear()
    q, k, v = bnhd_inputs(d=128, h=4, hkv=2)
    k0 = k.clone()
    out = b.run(AttentionCall(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 128 ** -0.5))
    got = mod.rec.calls[-1]
    assert got["fn"] == fn and got["smooth_k"] is True and got["kw"] == kwargs and got["layout"] == "NHD"
    assert got["k"].data_ptr() == k.data_ptr() and torch.equal(k, k0)
    assert rel_err(out, reference_attention(*(t.transpose(1, 2) for t in (q, k, v)))) < 2e-2


def test_sage_1x_gets_a_smoothed_copy_and_the_callers_k_is_untouched(fakes):
    rec = FakeSage(1)
    fakes.sage(module("sageattention", sageattn=rec.fn("sageattn")))
    assert registry.get("sage").available() is None
    assert registry.get("sage").precision == "int8" and "1.x" in registry.get("sage").description()
    assert "needs SageAttention 2.x" in registry.get("sage2_fp16").available()
    rec.calls.clear()
    q, k, v = bnhd_inputs(d=64, n=128)
    k0 = k.clone()
    out = attention(q, k, v, backend="sage", layout="BNHD")
    got = rec.calls[-1]
    assert got["smooth_k"] is False and got["k"].data_ptr() != k.data_ptr()  # a copy, smoothed by Genesis
    assert torch.allclose(got["k_before"].float().mean(dim=1), torch.zeros(()), atol=2e-2)
    assert torch.equal(k, k0)
    assert rel_err(out.transpose(1, 2), reference_attention(*(t.transpose(1, 2) for t in (q, k, v)))) < 3e-2


@pytest.mark.parametrize("cap, cls, kernel", [((9, 0), "int8", "sm90"), ((8, 9), "int8", "pv_fp8_cuda"),
                                              ((8, 0), "int8", "pv_fp16_cuda"), ((8, 6), "int8", "triton")])
def test_sage_precision_is_the_class_of_what_sageattn_runs_here(fakes, cap, cls, kernel):
    fakes.sage(sage2_module())
    fakes.mp.setattr(sage, "_device_cap", lambda device: cap)
    b = registry.get("sage")
    assert dispatch.effective_quality("sage", None) == {"fp8": "fast", "int8": "high"}[cls]  # probes first
    assert b.precision == cls and kernel in b.description()
    # every SageAttention kernel is class int8 (8-bit Q·Kᵀ); only kernels with q, k and v all in FP8 are fp8
    assert [registry.get(n).precision for n in ("sage2_fp8", "sage2_fp16", "sage2_triton")] == ["int8", "int8", "int8"]
    assert [registry.get(n).precision for n in ("fa3_fp8", "fp8_cudnn")] == ["fp8", "fp8"]
    assert all(registry.get(n).precision == "exact" for n in ("flash", "fa2", "fa3", "fa4"))


def test_sage2_fp16_is_served_from_64_keys_the_others_from_2(fakes):
    """sage2_fp16 wrote NaN for 2-56 keys on the H200 (2026-12-02): below 64 keys dispatch must not run it."""
    fakes.sage(sage2_module())
    for name, nk, served in (("sage2_fp16", 56, "sdpa"), ("sage2_fp16", 63, "sdpa"), ("sage2_fp16", 64, "sage2_fp16"),
                             ("sage2_fp8", 2, "sage2_fp8"), ("sage2_triton", 2, "sage2_triton")):
        q, k, v = bnhd_inputs(d=64, nk=nk)
        attention(q, k, v, backend=name, layout="BNHD", quality="high")
        assert last_backend() == served, (name, nk, last_backend())
    why = registry.get("sage2_fp16").reason_for(AttentionCall(*(t.transpose(1, 2) for t in bnhd_inputs(d=64, nk=40)),
                                                              None, 0.125))
    assert why == "key length 40 not supported: needs >= 64", why


def test_sage_on_an_a100_is_refused_below_64_keys_as_its_fp16_kernel_is(fakes):
    """2.x's sageattn runs sageattn_qk_int8_pv_fp16_cuda on compute capability 8.0: the kernel sage2_fp16 is."""
    fakes.sage(sage2_module())
    for cap, nk, served in (((8, 0), 63, "sdpa"), ((8, 0), 64, "sage"), ((9, 0), 2, "sage"), ((8, 6), 2, "sage")):
        fakes.mp.setattr(sage, "_device_cap", lambda device, cap=cap: cap)
        registry.get("sage").reprobe()
        q, k, v = bnhd_inputs(d=64, nk=nk)
        attention(q, k, v, backend="sage", layout="BNHD", quality="high")
        assert last_backend() == served, (cap, nk, last_backend())


def test_sage2_refuses_a_build_without_its_extension(fakes):
    mod = fakes.sage(sage2_module())
    mod.core.SM90_ENABLED = False
    reason = registry.get("sage2_fp8").available()
    assert reason.startswith("this SageAttention build has no sageattn_qk_int8_pv_fp8_cuda_sm90 extension")
    assert registry.get("sage2_fp16").available() is None


def test_sage2_refuses_a_kernel_that_never_writes_its_output(fakes):
    mod = fakes.sage(sage2_module())
    mod.sageattn_qk_int8_pv_fp8_cuda_sm90 = lambda q, k, v, **kw: torch.zeros_like(q)
    reason = registry.get("sage2_fp8").available()
    assert reason == ("sageattn_qk_int8_pv_fp8_cuda_sm90: returns output memory it never wrote (all zeros where the "
                      "float64 reference is not)")


# ------------------------------------------------------------------ info


def test_info_rows_say_installed_runs_and_version(fakes):
    fakes.fa3(Recorder())
    fakes.mp.setattr(_flash_pkg, "dist_version", lambda *d: "0.0.3" if "fa3_fwd" in d else None)
    fakes.fa2(Recorder("wrong"))
    rows = {r["name"]: r for r in registry.report()}
    assert rows["fa3"]["available"] and rows["fa3"]["version"] == "0.0.3 (fa3_fwd)"
    assert "fa3_fwd_interface" in rows["fa3"]["kernel"]
    assert not rows["fa2"]["available"] and rows["fa2"]["reason"].startswith("returns wrong results")
    assert rows["fa4"]["reason"].startswith("not installed (pip install flash-attn-4")
    for name in NAMES:
        assert set(rows[name]) >= {"available", "reason", "version", "kernel", "precision", "limits", "first_call_s"}
    from genesis_core import info

    table = {r[0]: r for r in info.backends_table()}
    assert {"fa2", "fa3", "fa4", "sage2_fp8", "sage2_fp16", "sage2_triton"} <= set(table)
    assert any("0.0.3 (fa3_fwd)" in cell for cell in table["fa3"])


def test_sage_version_of_a_source_build_comes_from_its_setup_py(tmp_path, monkeypatch):
    pkg_dir = tmp_path / "sageattention"
    pkg_dir.mkdir()
    (pkg_dir / "__init__.py").write_text("")
    (pkg_dir / "sm80_compile.py").write_text("")
    (tmp_path / "setup.py").write_text("setup(\n    name='sageattention',\n    version='2.2.0',\n)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sageattention", raising=False)
    monkeypatch.setattr(sage, "package_version", lambda d: None)
    assert sage.version() == "2.2.0 (source build)" and sage.find_major() == 2


# ------------------------------------------------------------------ the GPU script's dry run


def test_kernels_gpu_script_dry_run_on_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kernels_gpu", REPO / "scripts/gpu/kernels_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "kernels_gpu.json").read_text())
    assert result["dry_run"] and {r["backend"] for r in result["backends"]} >= {"fa4", "fa3", "fa2", "sage2_fp8"}
    ok = [r for r in result["shapes"] if r["status"] == "ok"]
    assert {r["shape"] for r in ok} == {"flux", "wan480", "wan720", "sdxl"} and all(r["rel_l2"] < 2e-2 for r in ok)
    assert "ratio vs sdpa" in printed and "sdpa (plain)" in printed


def test_kernels_gpu_script_measures_the_backends_that_run(tmp_path, capsys, fakes):
    """The dry run with faked FA3 and SageAttention 2 packages: every path of the script runs (timing, errors,
    the FA4 table, sage through dispatch against the raw kernel)."""
    fakes.fa3(Recorder())
    fakes.sage(sage2_module())
    spec = importlib.util.spec_from_file_location("kernels_gpu", REPO / "scripts/gpu/kernels_gpu.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "kernels_gpu.json").read_text())
    ok = {(r["shape"], r["backend"]) for r in result["shapes"] if r["status"] == "ok"}
    assert {("flux", "fa3"), ("flux", "sage"), ("sdxl", "sage2_triton"), ("wan720", "sage2_fp8")} <= ok, ok
    assert ("wan720", "sage2_fp16") not in ok  # the big shape times only what the comparison needs
    paths = [r for r in result["sage_dispatch"] if r["status"] == "ok"]
    assert len(paths) == 6 and all(r["ms"] > 0 for r in paths)
    assert "old Genesis path" in capsys.readouterr().out


def test_sage_edges_script_flags_a_kernel_that_writes_nan(tmp_path, capsys, monkeypatch):
    """The edge sweep's dry run: correct backends pass every cell; a backend whose output is NaN for a single key
    (what SageAttention did on the H200) is reported per cell and counted by what the failures share."""
    spec = importlib.util.spec_from_file_location("sage_edges", REPO / "scripts/gpu/sage_edges.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sage_edges.json").read_text())
    cells = result["backends"]["pytorch"]["cells"]
    assert len(cells) == 4 and all(c["ok"] and c["rel"] < 1e-5 for c in cells)
    b = registry.get("sdpa")
    real = b.run

    def nan_for_one_key(call):
        out = real(call)
        return out * float("nan") if call.kv_len == 1 else out

    monkeypatch.setattr(b, "run", nan_for_one_key)
    capsys.readouterr()
    assert script.main(["--cpu-dry-run", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    cells = json.loads((tmp_path / "sage_edges.json").read_text())["backends"]["sdpa"]["cells"]
    assert [c["ok"] for c in cells] == [c["nk"] != 1 for c in cells]
    assert "sdpa: 4 ran, 0 refused by limits, 2 failed" in printed and "by nk: 1: 2/2" in printed
    assert "nq 1 nk 1 d 16 float32: NaN/Inf" in printed
