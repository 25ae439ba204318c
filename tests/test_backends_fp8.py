"""The FP8 backends (fa3_fp8, fp8_cudnn) on CPU: limits refused with the shared wording, probes that refuse without
the package, without CUDA and with fake packages that return wrong or unwritten output, the graph built against
cudnn-frontend 1.32's API (a recording fake), and the graph cache's key, variants and bound."""
from __future__ import annotations

import sys
import threading
import types

import pytest
import torch

from genesis_core.attn import quality, registry
from genesis_core.attn.backends import _flash_pkg as pkg
from genesis_core.attn.backends import fa3_fp8, fp8_cudnn
from genesis_core.attn.limits import check
from genesis_core.attn.quant import fp8
from genesis_core.attn.types import AttentionCall

E4M3 = torch.float8_e4m3fn


def _call(B=1, H=2, NQ=16, NK=24, D=64, dtype=torch.bfloat16, Dv=None, Hkv=None, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, NQ, H, D, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(B, NK, Hkv or H, D, generator=g).to(dtype).transpose(1, 2)
    v = torch.randn(B, NK, Hkv or H, Dv or D, generator=g).to(dtype).transpose(1, 2)
    return AttentionCall(q, k, v, mask, D ** -0.5)


def _attend_dequantised(q8, k8, v8, dq, dk, dv, scale):
    """What an FP8 kernel computes from BNHD e4m3 tensors and [B, H] descales, in float32, BNHD out."""
    q = q8.float() * dq[:, None, :, None]
    k = k8.float() * dk[:, None, :, None]
    v = v8.float() * dv[:, None, :, None]
    p = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * scale, dim=-1)
    return torch.einsum("bhnm,bmhd->bnhd", p, v)


# ---------------------------------------------------------------- registration and limits


@pytest.mark.parametrize("name", ["fa3_fp8", "fp8_cudnn"])
def test_registered_as_fp8_and_served_only_at_the_fast_level(name):
    b = registry.get(name)
    assert b.precision == "fp8" and quality.loosest_for(b.precision) == "fast"
    assert name not in registry.AUTO_ORDER


@pytest.mark.parametrize("module", [fa3_fp8, fp8_cudnn])
@pytest.mark.parametrize("kwargs,start", [
    (dict(dtype=torch.float32), "dtype float32 not supported: needs one of (float16, bfloat16)"),
    (dict(D=72), "head_dim 72 not supported: needs a multiple of 16"),
    (dict(D=272), "head_dim 272 not supported: needs <= 256"),
    (dict(Dv=32), "v head_dim 32 not supported"),
    (dict(mask=torch.ones(16, 24, dtype=torch.bool)[None, None]), "mask (bool) not supported: needs no mask"),
    (dict(H=4, Hkv=2), "grouped-query attention (4 query / 2 kv heads) not supported"),
    (dict(), "device cpu not supported: needs cuda"),
])
def test_limits_refuse_with_the_shared_wording(module, kwargs, start):
    call = _call(**kwargs)
    why = module.backend.refusal(call)
    assert why == check(module.LIMITS, call) and why.startswith(start), why


@pytest.mark.parametrize("module", [fa3_fp8, fp8_cudnn])
def test_inputs_that_need_grad_are_refused(module):
    call = _call()
    q = torch.randn(1, 16, 2, 64, dtype=torch.bfloat16, requires_grad=True).transpose(1, 2)
    assert "no backward" in module.backend.refusal(AttentionCall(q, call.k, call.v, None, call.scale))


# ---------------------------------------------------------------- probes


@pytest.fixture
def clean_modules(monkeypatch):
    for name in ("flash_attn_interface", "fa3_fwd_interface", "flash_attn_config", "fa3_fwd_config", "cudnn"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(pkg, "module_present", lambda name: False)
    monkeypatch.setattr(fp8_cudnn, "_cudnn", None)
    monkeypatch.setattr(fa3_fp8, "_impl", None)  # restored afterwards: the probes below set them
    monkeypatch.setattr(fa3_fp8, "_fn", None)
    fp8_cudnn.clear_graphs()
    yield monkeypatch
    fp8_cudnn.clear_graphs()


def test_fa3_fp8_probe_without_the_package(clean_modules):
    assert fa3_fp8._probe().startswith("not installed (")


def test_fp8_cudnn_probe_without_the_package(clean_modules):
    assert fp8_cudnn._probe() == f"not installed ({fp8_cudnn.PIP})"


def _fake_fa3(kind, direct=None):
    """A fake FA3 module: flash_attn_func of ``kind``, and (``direct``: its kind) the compiled fwd op behind it,
    with a schema naming its arguments as fa3-fwd 0.0.3's does."""
    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, q_descale=None, k_descale=None, v_descale=None):
        # FA3's FP8 contract (hopper/flash_api.cpp): e4m3 [B, N, H, D] with a contiguous last dim, descales
        # float32 (batch, num_heads_k); bfloat16 out
        B, N, H, D = q.shape
        assert q.dtype == k.dtype == v.dtype == E4M3 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        assert all(d.dtype == torch.float32 and tuple(d.shape) == (B, H) for d in (q_descale, k_descale, v_descale))
        assert not causal
        if kind == "unwritten":
            return torch.full((B, N, H, D), float("nan"), dtype=torch.bfloat16)  # what poisoned memory reads as
        if kind == "zeros":
            return torch.zeros(B, N, H, D, dtype=torch.bfloat16)
        out = _attend_dequantised(q, k, v, q_descale, k_descale, v_descale, softmax_scale)
        if kind == "wrong":
            out = out.flip(1)
        return out.to(torch.bfloat16).contiguous(), None  # FA3 allocates a contiguous [B, N, H, D] output

    mod = types.SimpleNamespace(__name__="fa3_fwd_interface", flash_attn_func=flash_attn_func, direct_calls=[])
    if direct is not None:
        names = ["q", "k", "v", "k_new", "v_new", "q_v", "out", "q_descale", "k_descale", "v_descale", "softmax_scale",
                 "is_causal", "num_splits", "pack_gqa", "sm_margin"]

        def fwd(q, k, v, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, num_splits=0):
            mod.direct_calls.append(num_splits)
            inner = _fake_fa3(direct).flash_attn_func
            return (inner(q, k, v, softmax_scale=softmax_scale, q_descale=q_descale, k_descale=k_descale,
                          v_descale=v_descale)[0], None, None, None)

        fwd._schema = types.SimpleNamespace(arguments=[types.SimpleNamespace(name=n) for n in names])
        mod.fa3_fwd_cuda = types.SimpleNamespace(fwd=types.SimpleNamespace(default=fwd))
    return mod


@pytest.fixture
def fake_fa3(clean_modules):
    def install(kind, cuda=True, direct=None):
        clean_modules.setitem(sys.modules, "fa3_fwd_interface", _fake_fa3(kind, direct))
        clean_modules.setattr(pkg, "probe_device", lambda: "cpu" if cuda else None)
        clean_modules.setattr(fp8, "triton_missing", lambda: None)
        clean_modules.setattr(fa3_fp8, "_quantize", fp8.quantize_qkv_reference)
        clean_modules.setattr(fa3_fp8.backend, "refusal", lambda call: None)  # CPU stands in for the GPU
        return fa3_fp8._probe()

    return install


def test_fa3_fp8_probe_without_cuda(fake_fa3):
    assert fake_fa3("good", cuda=False).startswith("installed, but no CUDA device")


def test_fa3_fp8_probe_accepts_a_kernel_that_attends(fake_fa3):
    assert fake_fa3("good") is None
    call = _call(B=2, H=3, NQ=20, NK=40, D=64, dtype=torch.float16)
    out = fa3_fp8.run(call)
    assert out.shape == (2, 3, 20, 64) and out.dtype == torch.float16  # FA3's bfloat16 converted back
    assert out.transpose(1, 2).is_contiguous()  # a BHND view of the kernel's BNHD output, no copy
    ref = pkg.reference(call)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.1


@pytest.mark.parametrize("kind,words", [("wrong", "wrong results"), ("unwritten", "NaN"), ("zeros", "never wrote")])
def test_fa3_fp8_probe_refuses_wrong_or_unwritten_output(fake_fa3, kind, words):
    why = fake_fa3(kind)
    assert why is not None and words in why and fa3_fp8._fn is None


def test_fa3_fp8_calls_the_compiled_op_directly_when_it_works(fake_fa3):
    assert fake_fa3("good", direct="good") is None
    mod = sys.modules["fa3_fwd_interface"]
    assert fa3_fp8._path == "direct fwd op" and mod.direct_calls == [1]  # num_splits=1, as flash_attn_func passes
    call = _call(B=1, H=2, NQ=20, NK=30, D=64)
    out = fa3_fp8.run(call)
    assert mod.direct_calls == [1, 1] and "direct fwd op" in fa3_fp8._description()
    ref = pkg.reference(call)
    assert float((out.double() - ref).norm() / ref.norm()) < 0.1


def test_fa3_fp8_falls_back_to_flash_attn_func_when_the_direct_op_is_wrong(fake_fa3):
    assert fake_fa3("good", direct="wrong") is None
    assert fa3_fp8._path == "flash_attn_func" and fa3_fp8._attend is fa3_fp8._wrapper_attend
    why = fake_fa3("wrong", direct="wrong")
    assert "FP8: direct fwd op: returns wrong results" in why and "; flash_attn_func: returns wrong" in why


def test_fa3_fp8_probe_without_triton(fake_fa3, monkeypatch):
    fake_fa3("good")
    monkeypatch.setattr(fp8, "triton_missing", lambda: "Triton is not installed (pip install triton)")
    assert fa3_fp8._probe() == "Triton is not installed (pip install triton)"


# ---------------------------------------------------------------- cuDNN: a recording fake of cudnn-frontend 1.32


class _FakeTensor:
    def __init__(self, g, name, dim=None, stride=None, data_type=None, virtual=False):
        self.g, self.name, self.dim, self.stride, self.data_type = g, name, dim, stride, data_type
        self.is_output, self.virtual, self.uid = False, virtual, len(g.tensors) + 1
        g.tensors.append(self)

    def set_output(self, v):
        self.is_output = v
        return self

    def set_dim(self, d):
        self.dim = tuple(d)
        return self

    def set_stride(self, s):
        self.stride = tuple(s)
        return self

    def set_data_type(self, d):
        self.data_type = d
        return self


class _FakeGraph:
    STEPS = ["validate", "build_operation_graph", "create_execution_plans", "check_support", "build_plans"]

    def __init__(self, name="g", io_data_type=None, intermediate_data_type=None, compute_data_type=None, handle=None):
        assert (io_data_type, intermediate_data_type, compute_data_type) == ("FP8_E4M3", "FLOAT", "FLOAT")
        self.handle, self.tensors, self.steps, self.sdpa = handle, [], [], None

    def tensor(self, name, dim, stride, data_type):
        assert len(dim) == len(stride) == 4
        return _FakeTensor(self, name, tuple(dim), tuple(stride), data_type)

    def sdpa_fp8(self, q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, **kw):
        assert set(kw) <= {"generate_stats", "is_inference", "attn_scale", "name", "use_causal_mask"}, kw
        assert kw.get("generate_stats") is False  # one of generate_stats / is_inference must be set
        self.sdpa = dict(q=q, k=k, v=v, descale_q=descale_q, descale_k=descale_k, attn_scale=kw["attn_scale"])
        return [_FakeTensor(self, "O", virtual=True), None, _FakeTensor(self, "Amax_S", virtual=True),
                _FakeTensor(self, "Amax_O", virtual=True)]

    def __getattr__(self, step):
        if step not in _FakeGraph.STEPS:
            raise AttributeError(step)
        return lambda *a: self.steps.append(step)

    def get_workspace_size(self):
        assert self.steps == _FakeGraph.STEPS, self.steps
        return 0


def _fake_cudnn():
    enum = types.SimpleNamespace(FP8_E4M3="FP8_E4M3", FLOAT="FLOAT", BFLOAT16="BFLOAT16", HALF="HALF")
    return types.SimpleNamespace(__name__="cudnn", __version__="1.32.0", pygraph=_FakeGraph, data_type=enum,
                                 heur_mode=types.SimpleNamespace(A="A", FALLBACK="FALLBACK"),
                                 backend_version=lambda: 91900, create_handle=lambda: object(),
                                 set_stream=lambda h, s: None)


@pytest.fixture
def fake_cudnn(clean_modules):
    mod = _fake_cudnn()
    clean_modules.setitem(sys.modules, "cudnn", mod)
    clean_modules.setattr(fp8_cudnn, "_cudnn", mod)
    state = types.SimpleNamespace(handle="handle", one=100, scale_s=104, descale_s=108, amax_o=112, amax_s=116,
                                  lock=threading.Lock())
    clean_modules.setitem(fp8_cudnn._devices, -1, state)  # CPU calls key their graphs with device -1
    return mod


def test_graph_is_built_as_cudnn_frontend_expects(fake_cudnn):
    call = _call(B=2, H=3, NQ=10, NK=12, D=64)
    plan = fp8_cudnn.build_graph(fp8_cudnn.graph_key(call), ("head", False))
    g = plan.graph
    by = {t.name: t for t in g.tensors}
    assert by["q"].dim == (2, 3, 10, 64) and by["q"].stride == (10 * 3 * 64, 64, 3 * 64, 1)  # BNHD memory
    assert by["k"].dim == (2, 3, 12, 64) and by["k"].data_type == "FP8_E4M3"
    assert by["descale_q"].dim == (2, 3, 1, 1) and by["descale_v"].dim == (1, 1, 1, 1)
    assert by["O"].is_output and by["O"].data_type == "FP8_E4M3" and by["O"].stride == by["q"].stride
    assert by["Amax_O"].is_output and not by["Amax_S"].is_output
    assert g.sdpa["attn_scale"] == call.scale and g.steps == _FakeGraph.STEPS
    assert set(plan.uids) >= {"q", "k", "v", "o", "descale_q", "descale_k", "descale_v", "descale_s", "scale_s",
                              "scale_o", "amax_o"}
    per_tensor = fp8_cudnn.build_graph(fp8_cudnn.graph_key(call), ("tensor", True)).graph
    by = {t.name: t for t in per_tensor.tensors}
    assert by["descale_q"].dim == (1, 1, 1, 1) and by["Amax_S"].is_output


def test_plan_execute_binds_every_tensor(fake_cudnn):
    call = _call(B=2, H=3, NQ=10, NK=12, D=64)
    plan = fp8_cudnn.build_graph(fp8_cudnn.graph_key(call), ("tensor", False))
    seen = {}
    plan.graph.execute = lambda pack, ws, handle=None: seen.update(pack=pack, ws=ws, handle=handle)
    qkv = fp8.quantize_qkv_reference(call.q, call.k, call.v, "tensor")
    o8 = torch.empty(2, 10, 3, 64, dtype=E4M3)
    plan.execute(qkv, o8)
    u, pack = plan.uids, seen["pack"]
    assert pack[u["q"]] == qkv.q.data_ptr() and pack[u["o"]] == o8.data_ptr() and seen["handle"] == "handle"
    assert pack[u["k"]] == qkv.k.data_ptr() and pack[u["v"]] == qkv.v.data_ptr()
    assert pack[u["descale_k"]] - pack[u["descale_q"]] == 4 * 2 * 3  # descale[1] follows descale[0] ([B, H] f32)
    assert (pack[u["descale_v"]], pack[u["scale_o"]], pack[u["scale_s"]], pack[u["descale_s"]]) == (100, 100, 104, 108)
    assert set(pack) == set(u.values())


def _fake_plan(kind):
    class Plan:
        granularity = "tensor"

        def execute(self, qkv, o8):
            if kind == "unwritten":
                o8.view(torch.uint8).fill_(0x7F)  # e4m3 NaN: what stale poisoned memory would read as
                return
            s = o8.shape[-1] ** -0.5
            one = torch.ones_like(qkv.descale[2])
            o = _attend_dequantised(qkv.q, qkv.k, qkv.v, qkv.descale[0], qkv.descale[1], one, s)  # v8 units
            o = o * fp8_cudnn.S_SCALE * (1.0 / (fp8_cudnn.O_FACTOR * fp8_cudnn.S_SCALE))  # descale_s, scale_o = 1
            o8.copy_((o if kind == "good" else -o).to(E4M3))

    return Plan()


# NaN read back as NaN on CUDA; Triton's CPU interpreter (if it runs the dequantisation) reads e4m3 NaN as a number
@pytest.mark.parametrize("kind,words", [("good", None), ("wrong", "wrong results"), ("unwritten", "NaN|wrong results")])
def test_fp8_cudnn_probe_judges_the_kernel(fake_cudnn, monkeypatch, kind, words):
    monkeypatch.setattr(pkg, "probe_device", lambda: "cpu")
    monkeypatch.setattr(fp8, "triton_missing", lambda: None)
    monkeypatch.setattr(fp8_cudnn, "_quantize", fp8.quantize_qkv_reference)
    monkeypatch.setattr(fp8_cudnn.backend, "refusal", lambda call: None)
    monkeypatch.setattr(fp8_cudnn, "_builder", lambda key, variant: _fake_plan(kind))
    why = fp8_cudnn._probe()
    if words is None:
        assert why is None
    else:
        assert why is not None and any(w in why for w in words.split("|")), why


def test_fp8_cudnn_probe_without_cuda_and_with_an_old_library(fake_cudnn, monkeypatch):
    monkeypatch.setattr(pkg, "probe_device", lambda: None)
    assert fp8_cudnn._probe().startswith("installed, but no CUDA device")
    monkeypatch.setattr(pkg, "probe_device", lambda: "cpu")
    monkeypatch.setattr(fp8, "triton_missing", lambda: None)
    fake_cudnn.backend_version = lambda: 91000
    assert "not 9.10.0" in fp8_cudnn._probe()


# ---------------------------------------------------------------- the graph cache


@pytest.fixture
def counting_builder(fake_cudnn, monkeypatch):
    built = []

    def builder(key, variant):
        built.append((key, variant))
        if variant[0] == "head":
            raise RuntimeError("cudnnGraphNotSupportedError: per-head descale not supported")
        return types.SimpleNamespace(granularity=variant[0], key=key)

    monkeypatch.setattr(fp8_cudnn, "_builder", builder)
    monkeypatch.setattr(fp8_cudnn, "_first_variant", 0)
    return built


def test_graph_cache_builds_once_per_signature(counting_builder):
    a = _call(NQ=16)
    p1 = fp8_cudnn.plan_for(a)
    assert p1.granularity == "tensor" and [v for _, v in counting_builder] == [("head", False), ("tensor", False)]
    assert fp8_cudnn.plan_for(_call(NQ=16)) is p1 and len(counting_builder) == 2  # same signature, fresh tensors
    fp8_cudnn.plan_for(_call(NQ=17))
    assert counting_builder[-1][1] == ("tensor", False) and len(counting_builder) == 3  # the variant that worked first
    b = _call(NQ=16)
    fp8_cudnn.plan_for(AttentionCall(b.q, b.k, b.v, None, 0.5))  # another softmax scale: another graph
    assert len(counting_builder) == 4
    keys = {k for k, _ in counting_builder}
    assert len(keys) == 3


def test_graph_cache_is_bounded_lru(counting_builder, monkeypatch):
    monkeypatch.setattr(fp8_cudnn, "MAX_GRAPHS", 4)
    for n in range(1, 5):
        fp8_cudnn.plan_for(_call(NQ=n))
    fp8_cudnn.plan_for(_call(NQ=1))  # used again: now the most recent
    before = len(counting_builder)
    fp8_cudnn.plan_for(_call(NQ=5))  # evicts the least recently used (NQ=2), not the oldest built (NQ=1)
    assert len(fp8_cudnn._graphs) == 4
    fp8_cudnn.plan_for(_call(NQ=1))
    assert len(counting_builder) == before + 1
    fp8_cudnn.plan_for(_call(NQ=2))  # evicted: built again
    assert len(counting_builder) == before + 2 and len(fp8_cudnn._graphs) == 4


def test_a_signature_no_variant_builds_for_is_remembered(fake_cudnn, monkeypatch):
    calls = []

    def builder(key, variant):
        calls.append(variant)
        raise RuntimeError("not supported")

    monkeypatch.setattr(fp8_cudnn, "_builder", builder)
    with pytest.raises(RuntimeError, match="no cuDNN FP8 attention graph builds for this call"):
        fp8_cudnn.plan_for(_call())
    n = len(calls)
    assert n == len(fp8_cudnn.VARIANTS)
    with pytest.raises(RuntimeError, match="per-head|head descales"):
        fp8_cudnn.plan_for(_call())
    assert len(calls) == n


def test_out_of_memory_while_building_is_not_remembered(fake_cudnn, monkeypatch):
    calls = []

    def builder(key, variant):
        calls.append(variant)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fp8_cudnn, "_builder", builder)
    for _ in range(2):
        with pytest.raises(torch.cuda.OutOfMemoryError):
            fp8_cudnn.plan_for(_call())
    assert len(calls) == 2


def test_run_refuses_per_tensor_q_k_scales_that_would_lose_a_quiet_head(fake_cudnn, monkeypatch):
    quantised = []

    def quantize(q, k, v, granularity, smooth_k):
        quantised.append(granularity)
        return fp8.quantize_qkv_reference(q, k, v, granularity, smooth_k)

    monkeypatch.setattr(fp8_cudnn, "_quantize", quantize)
    monkeypatch.setattr(fp8_cudnn, "_builder", lambda key, variant: _fake_plan("good"))
    call = _call(B=1, H=3, NQ=30, NK=50, D=64)
    call.k[:, 2].mul_(2.0 ** -11)  # a k head 2**11 quieter than the others: past the 2**10 one scale can span
    with pytest.raises(RuntimeError, match=r"one q and one k descale for all heads, and k's heads differ in scale by "
                                           r"2\*\*11 \(more than 2\*\*10\)"):
        fp8_cudnn.run(call)
    assert quantised == [("tensor", "tensor", "head")]  # v per head: its descale is applied after the kernel
    call.k[:, 2].mul_(2.0)  # 2**10: still served
    assert fp8_cudnn.run(call).shape == (1, 3, 30, 64)


def test_run_dequantises_the_fp8_output_per_head(fake_cudnn, monkeypatch):
    monkeypatch.setattr(fp8_cudnn, "_quantize", fp8.quantize_qkv_reference)
    monkeypatch.setattr(fp8_cudnn, "_builder", lambda key, variant: _fake_plan("good"))
    call = _call(B=1, H=2, NQ=30, NK=50, D=32 * 2)
    call.v.mul_(torch.tensor([1.0, 1000.0])[None, :, None, None])  # heads of very different v scale
    out = fp8_cudnn.run(call)
    ref = pkg.reference(call)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    for h in range(2):  # q, k, v and the output each rounded to e4m3: ~6% on random inputs
        assert float((out[:, h].double() - ref[:, h]).norm() / ref[:, h].norm()) < 0.12
