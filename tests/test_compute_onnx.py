"""ONNX backend: really runs in ONNX Runtime, accuracy against a float64 reference, session reuse, disk cache."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from genesis_core.compute import ComputeBackend, HeterogeneousExecutor  # noqa: E402
from genesis_core.compute.onnx import OnnxExportError  # noqa: E402
from test_compute_executor import TinyCross, reference_cross  # noqa: E402


@pytest.fixture
def ex():
    e = HeterogeneousExecutor()
    e.register_backend(ComputeBackend.ONNX)
    return e


def test_cross_attention_matches_float64_reference(ex):
    m = TinyCross(qd=64, cd=96, heads=4).eval()
    x, ctx = torch.randn(2, 40, 64), torch.randn(2, 11, 96)
    out = ex.execute_on_backend(ComputeBackend.ONNX, m, x, ctx)
    ref = reference_cross(m, x, ctx)
    err = (out.double() - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    # measured here: ~2e-7 absolute; float32 PyTorch SDPA shows the same order against float64
    assert err < 2e-5 and rel < 2e-5, (err, rel)
    torch_err = (m(x, ctx).double() - ref).abs().max().item()
    assert err < 20 * max(torch_err, 1e-7)
    assert ex.stats()["onnx"]["exports"] == 1


def test_runs_in_onnx_runtime_not_pytorch(ex):
    calls = []

    def fn(t):
        calls.append(1)  # Python side effects happen during the export trace only
        return torch.tanh(t) * 3

    x = torch.randn(4, 5)
    for _ in range(3):
        torch.testing.assert_close(ex.execute_on_backend("onnx", fn, x), torch.tanh(x) * 3)
    assert len(calls) == 1


def test_second_call_reuses_the_session_without_exporting(ex):
    lin = nn.Linear(6, 3)

    class Node:
        def run(self, x):
            def process(t):  # a new closure every call, as in the spec's integration example
                return lin(t).relu()
            return ex.execute_on_backend("onnx", process, x)

    node = Node()
    x = torch.randn(5, 6)
    first = node.run(x)
    second = node.run(torch.randn(5, 6))
    s = ex.stats()["onnx"]
    assert s["exports"] == 1 and s["session_hits"] == 1 and s["calls"] == 2
    assert first.shape == second.shape == (5, 3)
    node.run(torch.randn(7, 6))  # a new shape is a new signature
    node.run(torch.randn(7, 6).double().float())
    assert ex.stats()["onnx"]["exports"] == 2


def test_changed_weights_give_a_new_export_not_stale_numbers(ex):
    lin = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    ex.execute_on_backend("onnx", lin, x)
    with torch.no_grad():
        lin.weight.mul_(-2.0)
    out = ex.execute_on_backend("onnx", lin, x)
    torch.testing.assert_close(out, lin(x).detach())
    assert ex.stats()["onnx"]["exports"] == 2


def test_nested_inputs_outputs_and_constants(ex):
    def fn(pack, scale, flag=True):
        y = pack["a"] @ pack["b"][0] * scale
        return {"y": y, "parts": (y.sum(-1), pack["b"][1] + 1), "flag": flag}

    pack = {"a": torch.randn(3, 4), "b": [torch.randn(4, 2), torch.randn(5)]}
    out = ex.execute_on_backend("onnx", fn, pack, 0.5, flag=False)
    ref = fn(pack, 0.5, flag=False)
    torch.testing.assert_close(out["y"], ref["y"])
    torch.testing.assert_close(out["parts"][0], ref["parts"][0])
    torch.testing.assert_close(out["parts"][1], ref["parts"][1])
    assert out["flag"] is False and isinstance(out["parts"], tuple)
    ex.execute_on_backend("onnx", fn, pack, 0.25)  # another constant: another graph
    assert ex.stats()["onnx"]["exports"] == 2


def test_integer_and_bool_inputs(ex):
    def fn(x, idx, mask):
        return x[idx].masked_fill(mask, 0.0)

    x, idx = torch.randn(6, 3), torch.tensor([4, 0, 2])
    mask = torch.rand(3, 3) > 0.5
    torch.testing.assert_close(ex.execute_on_backend("onnx", fn, x, idx, mask), fn(x, idx, mask))


def test_disk_cache_survives_a_new_executor(tmp_path):
    lin = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(3, 8)
    a = HeterogeneousExecutor()
    a.register_backend("onnx", cache_dir=str(tmp_path))
    first = a.execute_on_backend("onnx", lin, x)
    assert a.stats()["onnx"]["exports"] == 1 and len([f for f in os.listdir(tmp_path) if f.endswith(".onnx")]) == 1
    b = HeterogeneousExecutor()
    b.register_backend("onnx", cache_dir=str(tmp_path))
    second = b.execute_on_backend("onnx", lin, x)
    s = b.stats()["onnx"]
    assert s["exports"] == 0 and s["disk_hits"] == 1
    torch.testing.assert_close(first, second)
    with torch.no_grad():
        lin[0].bias.add_(1.0)  # different weights: a different file, not the stale one
    c = HeterogeneousExecutor()
    c.register_backend("onnx", cache_dir=str(tmp_path))
    torch.testing.assert_close(c.execute_on_backend("onnx", lin, x), lin(x).detach())
    assert c.stats()["onnx"]["exports"] == 1


def test_corrupt_disk_cache_is_rebuilt(tmp_path, genesis_log):
    lin = nn.Linear(4, 2)
    x = torch.randn(2, 4)
    a = HeterogeneousExecutor()
    a.register_backend("onnx", cache_dir=str(tmp_path))
    a.execute_on_backend("onnx", lin, x)
    for f in os.listdir(tmp_path):
        with open(tmp_path / f, "wb") as fh:
            fh.write(b"not onnx")
    b = HeterogeneousExecutor()
    b.register_backend("onnx", cache_dir=str(tmp_path))
    torch.testing.assert_close(b.execute_on_backend("onnx", lin, x), lin(x).detach())
    assert b.stats()["onnx"]["exports"] == 1 and any("unreadable ONNX cache" in m for m in genesis_log)


def test_bad_onnx_options_and_functions(ex):
    with pytest.raises(ValueError, match="provider 'NoSuchExecutionProvider' is not in this onnxruntime build"):
        ex.register_backend("onnx", providers=["NoSuchExecutionProvider"], name="x")
    with pytest.raises(TypeError, match="unknown option.*bogus"):
        ex.register_backend("onnx", bogus=1, name="y")
    with pytest.raises(ValueError, match="exporter must be one of"):
        ex.register_backend("onnx", exporter="magic", name="z")
    with pytest.raises(OnnxExportError, match="no tensors"):
        ex.execute_on_backend("onnx", lambda t: 3, torch.randn(2))
    with pytest.raises(TypeError, match="must be hashable"):
        ex.execute_on_backend("onnx", lambda t, opts: t * 2, torch.randn(2), {1, 2})
    with pytest.raises(ValueError, match="ONNX Runtime, which captures weights"):
        ex.place(nn.Linear(2, 2), "onnx")


def test_lru_keeps_at_most_max_sessions():
    ex = HeterogeneousExecutor()
    ex.register_backend("onnx", max_sessions=2)
    for n in (2, 3, 4, 2):
        ex.execute_on_backend("onnx", torch.sin, torch.randn(n))
    s = ex.stats()["onnx"]
    assert s["sessions"] == 2 and s["exports"] == 4  # size 2 was evicted before it came back


def test_cpu_provider_binds_torch_memory_directly(ex):
    ex.execute_on_backend("onnx", torch.cos, torch.randn(3, 3))
    compiled = list(ex._workers["onnx"].runner._sessions.values())
    assert len(compiled) == 1 and compiled[0].bindable  # IOBinding by pointer, no numpy round trip
    assert ex.stats()["onnx"]["active_providers"][0] == "CPUExecutionProvider"


def test_exporter_choice():
    import importlib.util
    x = torch.randn(4)
    auto = HeterogeneousExecutor()
    auto.register_backend("onnx", exporter="auto")
    torch.testing.assert_close(auto.execute_on_backend("onnx", torch.exp, x), torch.exp(x))
    if importlib.util.find_spec("onnxscript") is None:
        dyn = HeterogeneousExecutor()
        dyn.register_backend("onnx", exporter="dynamo")
        with pytest.raises(OnnxExportError, match="dynamo exporter: ImportError: .*onnxscript"):
            dyn.execute_on_backend("onnx", torch.exp, x)


def test_spec_integration_example_runs_on_cpu_and_onnx():
    import genesis_core as spec

    missing = [n for n in ("CrossAttentionModule", "AdaptiveAttentionSwitch", "AttentionType") if not hasattr(spec, n)]
    assert not missing, f"genesis_core no longer exports the spec's {missing}"

    class MultiModalGenNode:  # the spec's integration example, minus the ComfyUI registration
        def __init__(self):
            self.executor = HeterogeneousExecutor()
            try:
                self.executor.register_backend(ComputeBackend.CUDA, torch.device("cuda"))
            except RuntimeError:
                pass  # CPU-only machine: the demo falls back
            self.executor.register_backend(ComputeBackend.CPU)
            self.executor.register_backend(ComputeBackend.ONNX)
            self.cross_attn = spec.CrossAttentionModule(512, 768, 8)
            self.self_attn = spec.AdaptiveAttentionSwitch(512, 8)
            self.self_attn.set_attention_type(spec.AttentionType.SDPA)

        def execute(self, image_features, text_embeddings, backend):
            def process(img_feat, txt_emb):
                cross_out = self.cross_attn.forward(img_feat, txt_emb, txt_emb)
                return self.self_attn.forward(cross_out)
            return (self.executor.execute_on_backend(backend, process, image_features, text_embeddings),)

    node = MultiModalGenNode()
    x, t = torch.randn(2, 256, 512), torch.randn(2, 77, 768)
    with torch.no_grad():
        direct = node.self_attn.forward(node.cross_attn.forward(x, t, t))
        on_cpu = node.execute(x, t, "cpu")[0]
        on_onnx = [node.execute(x, t, "onnx")[0] for _ in range(2)]
    torch.testing.assert_close(on_cpu, direct)
    for out in on_onnx:
        assert (out - direct).abs().max().item() < 1e-5
    assert node.executor.stats()["onnx"]["exports"] == 1


# -- tensors captured outside module parameters: part of the cache key ------------------------------------
def test_captured_plain_tensor_changed_in_place_gives_a_new_export(ex):
    w = torch.randn(4, 5)
    f = lambda x: x * w  # noqa: E731
    x = torch.randn(3, 4, 5)
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x).double(), x.double() * w.double())
    w.mul_(3)  # in place: same object, new values
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x).double(), x.double() * w.double())
    assert ex.stats()["onnx"]["exports"] == 2
    ex.execute_on_backend("onnx", f, x)
    assert ex.stats()["onnx"]["exports"] == 2  # unchanged: the session is reused


def test_repointed_tensor_attribute_of_a_captured_object_gives_a_new_export(ex):
    class Holder:
        pass

    h = Holder()
    h.inner = Holder()
    h.inner.bias = torch.randn(6)
    f = lambda x: x + h.inner.bias  # noqa: E731
    x = torch.randn(2, 6)
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x).double(), x.double() + h.inner.bias.double())
    h.inner.bias = torch.randn(6)  # a new tensor object on the same attribute
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x).double(), x.double() + h.inner.bias.double())


def test_plain_tensor_attribute_of_a_captured_module_is_keyed(ex):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.gain = torch.randn(4)  # neither parameter nor buffer: a plain attribute

        def forward(self, x):
            return self.lin(x) * self.gain

    m = Scaled().eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(ex.execute_on_backend("onnx", m, x), m(x))
        m.gain.add_(torch.randn(4))
        torch.testing.assert_close(ex.execute_on_backend("onnx", m, x), m(x))


def test_default_argument_tensor_changed_in_place_gives_a_new_export(ex):
    def f(x, w=torch.randn(3)):
        return x - w

    x = torch.randn(2, 3)
    w = f.__defaults__[0]
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x), x - w)
    w.sub_(torch.randn(3))
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x), x - w)


def _closure_over(t):
    return lambda x: x * t


def _default_of(t):
    return lambda x, w=t: x * w


def _scalar_default(s):
    return lambda x, s=s: x * s


@pytest.mark.parametrize("make", [_closure_over, _default_of, _scalar_default],
                         ids=["closure-tensor", "default-tensor", "default-scalar"])
def test_disk_cache_key_covers_captured_values(tmp_path, make):
    """Two functions with the same code that capture different values must not share a disk entry (a new
    executor stands in for a new process)."""
    scalar = make is _scalar_default
    x = torch.randn(3, 4)
    for value in ((1.5, -2.25) if scalar else (torch.randn(4), torch.randn(4))):
        fresh = HeterogeneousExecutor()
        fresh.register_backend("onnx", cache_dir=tmp_path)
        out = fresh.execute_on_backend("onnx", make(value), x)
        torch.testing.assert_close(out, x * value)
        assert fresh.stats()["onnx"]["disk_hits"] == 0
    again = HeterogeneousExecutor()
    again.register_backend("onnx", cache_dir=tmp_path)
    torch.testing.assert_close(again.execute_on_backend("onnx", make(value), x), x * value)
    assert again.stats()["onnx"]["disk_hits"] == 1  # the same value is found on disk


def test_state_the_key_cannot_see_is_logged_as_baked_in(ex, genesis_log):
    class Box:
        def __init__(self, inner):
            self.inner = inner

    deep = Box(Box(Box(Box(torch.randn(3)))))  # deeper than the walk looks
    f = lambda x: x + deep.inner.inner.inner.inner  # noqa: E731
    x = torch.randn(3)
    torch.testing.assert_close(ex.execute_on_backend("onnx", f, x), x + deep.inner.inner.inner.inner)
    baked = [m for m in genesis_log if "baked into the exported graph" in m]
    assert len(baked) == 1 and "nested more than" in baked[0], genesis_log
    ex.execute_on_backend("onnx", f, torch.randn(3))
    assert len([m for m in genesis_log if "baked into the exported graph" in m]) == 1  # once
