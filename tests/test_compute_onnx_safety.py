"""ONNX backend never serves a wrong graph: data-dependent Python values are refused at export, export works on
copies of the caller's tensors, every new graph is checked against the function's own (eager) result, and the
disk cache is keyed on the globals the function reads, checks file contents and re-checks a cached graph
against the current function once per process. References are eager PyTorch results on fresh random inputs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn as nn

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from genesis_core.compute import ComputeBackend, HeterogeneousExecutor  # noqa: E402
from genesis_core.compute.onnx import OnnxExportError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ex():
    e = HeterogeneousExecutor()
    e.register_backend(ComputeBackend.ONNX)
    return e


def _fresh(cache_dir, **options):
    e = HeterogeneousExecutor()
    e.register_backend("onnx", cache_dir=str(cache_dir), **options)
    return e


def _positive(*shape):
    return torch.rand(*shape) + 0.1


# -- 1. data-dependent Python values are refused, not frozen into the graph ---------------------------------
def _item_branch(a):
    return a * 2 if a.sum().item() > 0 else a * 0


def _bool_branch(a):
    if a.mean() > 0:
        return a * 2
    return a - 1


def _item_as_constant(a):
    return a / a.max().item()  # the tracer would bake this number in


def _float_as_constant(a):
    return a * float(a.mean())


def _tolist(a):
    return a * sum(a.flatten().tolist())


def _branch_on_data_dependent_size(a):
    kept = a[a > 0]
    return a * 2 if kept.shape[0] > 2 else a * 0


def _loop_over_data_dependent_rows(a):
    total = torch.zeros(a.shape[-1])
    for row in a[a.sum(-1) > 0]:
        total = total + row
    return total


DATA_DEPENDENT = [_item_branch, _bool_branch, _item_as_constant, _float_as_constant, _tolist,
                  _branch_on_data_dependent_size, _loop_over_data_dependent_rows]


@pytest.mark.parametrize("fn", DATA_DEPENDENT, ids=lambda f: f.__name__)
def test_data_dependent_python_values_are_refused_at_export(ex, fn):
    x = _positive(4, 3)
    with pytest.raises(OnnxExportError) as info:
        out = ex.execute_on_backend("onnx", fn, x)
        # what the old code did: it exported, and a second input got the first input's frozen branch/value
        other = -_positive(4, 3)
        torch.testing.assert_close(ex.execute_on_backend("onnx", fn, other), fn(other.clone()))
        torch.testing.assert_close(out, fn(x.clone()))
    msg = str(info.value)
    assert fn.__name__ in msg and "Python value" in msg, msg
    assert "torch.where" in msg and "cpu backend" in msg, msg
    assert "test_compute_onnx_safety.py:" in msg, msg  # points at the offending line
    assert ex.stats()["onnx"]["sessions"] == 0  # nothing was cached


def test_the_issue_lambda_is_refused_and_its_tensor_form_is_right_for_both_signs(ex):
    fn = lambda a: a * 2 if a.sum().item() > 0 else a * 0  # noqa: E731
    with pytest.raises(OnnxExportError, match=r"<lambda>.*\.item\(\)"):
        ex.execute_on_backend("onnx", fn, torch.ones(3))
    with pytest.raises(OnnxExportError):  # a refusal is not cached as a success either
        ex.execute_on_backend("onnx", fn, -torch.ones(3))
    fixed = lambda a: torch.where(a.sum() > 0, a * 2, a * 0)  # noqa: E731
    for x in (_positive(3), -_positive(3), _positive(3)):
        torch.testing.assert_close(ex.execute_on_backend("onnx", fixed, x), fixed(x))
    assert ex.stats()["onnx"]["exports"] == 1


def test_auto_exporter_says_both_exporters_refused_when_dynamo_is_missing():
    import importlib.util
    if importlib.util.find_spec("onnxscript") is not None:
        pytest.skip("onnxscript is installed: the dynamo exporter would be tried for real")
    e = HeterogeneousExecutor()
    e.register_backend("onnx", exporter="auto")
    with pytest.raises(OnnxExportError, match=r"(?s)Python value.*dynamo exporter.*onnxscript"):
        e.execute_on_backend("onnx", _item_branch, _positive(5))


class _Gate(nn.Module):
    """Branches on its own weight and on shapes: both are in the cache key, so tracing them is exact."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(()))
        self.lin = nn.Linear(6, 6)

    def forward(self, x):
        assert x.dim() == 2 and x.shape[-1] == 6, "shape check"
        y = self.lin(x) * (x.shape[-1] ** -0.5)
        if self.gate.item() > 0:
            y = y + len(x)
        if x.shape[0] > 3:
            y = y * 2
        return y / x.numel()


def test_shape_and_weight_dependent_python_values_still_export(ex):
    m = _Gate().eval()
    with torch.no_grad():
        for rows in (2, 5, 2):
            x = torch.randn(rows, 6)
            torch.testing.assert_close(ex.execute_on_backend("onnx", m, x), m(x))
        m.gate.neg_()  # the other branch: a new weight fingerprint, so a new export
        x = torch.randn(5, 6)
        torch.testing.assert_close(ex.execute_on_backend("onnx", m, x), m(x))
    assert ex.stats()["onnx"]["exports"] == 3


def _library_style_gate(x):
    """A function written the way torch's own Python functions are: it dispatches through __torch_function__,
    so its body runs where a TorchFunctionMode no longer sees the calls it makes."""
    if torch.overrides.has_torch_function_unary(x):
        return torch.overrides.handle_torch_function(_library_style_gate, (x,), x)
    return x * 2 if x.sum() > 0 else x * 0


def test_data_dependent_branch_inside_a_library_function_is_refused(ex):
    with pytest.raises(OnnxExportError, match=r"(?s)<lambda>.*inside _library_style_gate\(\).*torch\.where"):
        ex.execute_on_backend("onnx", lambda t: _library_style_gate(t) + 1, _positive(6))


def test_library_code_with_shape_checks_is_followed_not_refused(ex, genesis_log):
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    fn = lambda q, kv: mha(q, kv, kv)  # noqa: E731 - F.multi_head_attention_forward checks shapes in Python
    with torch.no_grad():
        for _ in range(2):
            q, kv = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
            out, weights = ex.execute_on_backend("onnx", fn, q, kv)
            ref_out, ref_weights = fn(q, kv)
            torch.testing.assert_close(out, ref_out)
            torch.testing.assert_close(weights, ref_weights)
    assert ex.stats()["onnx"]["exports"] == 1
    assert not [m for m in genesis_log if "Python value" in m or "baked" in m], genesis_log


def test_data_dependent_output_size_runs_on_inputs_with_other_counts(ex):
    fn = lambda a: (a[a > 0] * 3, a.sum())  # noqa: E731
    for _ in range(3):
        x = torch.randn(17)
        got = ex.execute_on_backend("onnx", fn, x)
        want = fn(x)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    assert ex.stats()["onnx"]["exports"] == 1


# -- 2. export works on copies: the caller's tensors are not touched --------------------------------------
def test_function_modifying_its_input_returns_the_eager_result_and_leaves_the_input_alone(ex, genesis_log):
    def f(t):
        t.mul_(2)
        return t + 1

    for _ in range(2):  # the export call and a session hit
        x = torch.randn(4, 3)
        before = x.clone()
        out = ex.execute_on_backend("onnx", f, x)
        torch.testing.assert_close(out, f(before.clone()))
        torch.testing.assert_close(x, before, rtol=0, atol=0)
    assert ex.stats()["onnx"]["exports"] == 1
    warned = [m for m in genesis_log if "modifies its input" in m]
    assert len(warned) == 1 and "f" in warned[0] and "unchanged" in warned[0], genesis_log


def test_function_accumulating_into_a_captured_tensor_is_refused(ex):
    buf = torch.randn(3)

    def accumulate(t):
        buf.add_(t)
        return buf * 2

    with pytest.raises(OnnxExportError, match=r"(?s)accumulate.*in place.*cpu backend"):
        ex.execute_on_backend("onnx", accumulate, torch.randn(3))


def test_every_new_graph_is_checked_against_the_function(ex, monkeypatch):
    """A graph that does not reproduce fn on the export inputs is refused: simulate an exporter bug that negates
    the output."""
    import functools
    import io

    import onnx

    real = torch.onnx.export

    @functools.wraps(real)
    def buggy_export(model, args, f=None, *rest, **kwargs):
        result = real(model, args, f, *rest, **kwargs)
        if isinstance(f, io.BytesIO):
            proto = onnx.load_from_string(f.getvalue())
            out = proto.graph.output[0].name
            for node in proto.graph.node:
                node.output[:] = [n + "_raw" if n == out else n for n in node.output]
            proto.graph.node.append(onnx.helper.make_node("Neg", [out + "_raw"], [out]))
            f.seek(0)
            f.truncate()
            f.write(proto.SerializeToString())
        return result

    def wave(t):
        return torch.sin(t) + 2

    monkeypatch.setattr(torch.onnx, "export", buggy_export)
    with pytest.raises(OnnxExportError, match=r"(?s)wave.*does not reproduce.*output 0 differs"):
        ex.execute_on_backend("onnx", wave, torch.randn(5))
    assert ex.stats()["onnx"]["sessions"] == 0


# -- 3. the disk cache: keyed on read globals, file contents checked, cached graphs re-checked ---------------
def _module_fn(scale, name="genesis_probe_scaled"):
    """``fn`` defined in a module whose global ``S`` is ``scale`` (a fresh module stands in for a new process)."""
    mod = types.ModuleType(name)
    mod.torch = torch
    exec(textwrap.dedent("""
        S = %r
        def helper(x):
            return x * S
        def fn(x):
            return helper(x) + 1
    """ % (scale,)), mod.__dict__)
    return mod


def test_disk_cache_key_covers_globals_the_function_reads(tmp_path):
    x = torch.randn(3, 4)
    for scale in (2.0, 3.0):
        mod = _module_fn(scale)
        fresh = _fresh(tmp_path)
        torch.testing.assert_close(fresh.execute_on_backend("onnx", mod.fn, x), x * scale + 1)
        assert fresh.stats()["onnx"]["disk_hits"] == 0
    fresh = _fresh(tmp_path)
    torch.testing.assert_close(fresh.execute_on_backend("onnx", _module_fn(3.0).fn, x), x * 3.0 + 1)
    assert fresh.stats()["onnx"]["disk_hits"] == 1


def test_changing_a_global_in_this_process_gives_a_new_export(ex):
    mod = _module_fn(2.0)
    x = torch.randn(5)
    torch.testing.assert_close(ex.execute_on_backend("onnx", mod.fn, x), x * 2 + 1)
    mod.S = -1.5
    torch.testing.assert_close(ex.execute_on_backend("onnx", mod.fn, x), x * -1.5 + 1)
    assert ex.stats()["onnx"]["exports"] == 2


def test_changed_global_is_seen_by_a_new_process(tmp_path):
    """The issue's scenario for real: this process exports with ``S = 2``; a new process, whose module says
    ``S = 3``, must not be served the cached ``S = 2`` graph."""
    import importlib.util

    src, cache = tmp_path / "src", tmp_path / "cache"
    src.mkdir()
    path = src / "probe_scaled.py"
    x = torch.randn(4)
    path.write_text("S = 2\n\ndef fn(x):\n    return x * S\n")
    spec = importlib.util.spec_from_file_location("probe_scaled", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.testing.assert_close(_fresh(cache).execute_on_backend("onnx", mod.fn, x), x * 2)
    assert len([f for f in os.listdir(cache) if f.endswith(".onnx")]) == 1

    path.write_text("S = 3\n\ndef fn(x):\n    return x * S\n")
    script = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(src)!r}, {ROOT!r}]
        import torch, probe_scaled
        from genesis_core.compute import HeterogeneousExecutor
        ex = HeterogeneousExecutor()
        ex.register_backend("onnx", cache_dir={str(cache)!r})
        out = ex.execute_on_backend("onnx", probe_scaled.fn, torch.tensor(json.loads(sys.argv[1])))
        print(json.dumps({{"out": out.tolist(), "exports": ex.stats()["onnx"]["exports"]}}))
    """)
    run = subprocess.run([sys.executable, "-c", script, json.dumps(x.tolist())], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(got["out"]), x * 3)
    assert got["exports"] == 1


def _two_entries(tmp_path):
    """Export two different functions of the same signature; return (fn_a, paths of a, paths of b, input)."""
    x = torch.randn(3, 5)
    fn_a = lambda t: t * 2 + 1  # noqa: E731
    fn_b = lambda t: t.exp()  # noqa: E731
    _fresh(tmp_path / "a").execute_on_backend("onnx", fn_a, x)
    _fresh(tmp_path / "b").execute_on_backend("onnx", fn_b, x)

    def paths(d):
        names = sorted(os.listdir(d))
        return [d / n for n in names if n.endswith(".onnx")][0], [d / n for n in names if n.endswith(".json")][0]

    return fn_a, paths(tmp_path / "a"), paths(tmp_path / "b"), x


def test_a_foreign_onnx_file_under_the_right_name_is_not_run(tmp_path, genesis_log):
    fn_a, (onnx_a, _), (onnx_b, _), x = _two_entries(tmp_path)
    shutil.copyfile(onnx_b, onnx_a)
    fresh = _fresh(tmp_path / "a")
    torch.testing.assert_close(fresh.execute_on_backend("onnx", fn_a, x), fn_a(x))
    assert fresh.stats()["onnx"]["exports"] == 1
    assert any("content" in m and str(onnx_a.name) in m for m in genesis_log), genesis_log
    again = _fresh(tmp_path / "a")  # rebuilt: the next process gets a good disk hit
    torch.testing.assert_close(again.execute_on_backend("onnx", fn_a, x), fn_a(x))
    assert again.stats()["onnx"]["disk_hits"] == 1


def test_a_foreign_entry_with_its_own_sidecar_is_caught_by_the_check_against_the_function(tmp_path, genesis_log):
    fn_a, (onnx_a, json_a), (onnx_b, json_b), x = _two_entries(tmp_path)
    shutil.copyfile(onnx_b, onnx_a)
    meta_b = json.loads(json_b.read_text())
    meta_a = json.loads(json_a.read_text())
    meta_b.update({k: v for k, v in meta_a.items() if k not in meta_b or k == "key"})  # forged consistently
    json_a.write_text(json.dumps(meta_b))
    fresh = _fresh(tmp_path / "a")
    x2 = torch.randn(3, 5)
    torch.testing.assert_close(fresh.execute_on_backend("onnx", fn_a, x2), fn_a(x2))
    assert fresh.stats()["onnx"]["exports"] == 1
    assert any("does not reproduce" in m for m in genesis_log), genesis_log


def _broken_sidecars():
    return {
        "not-json": lambda meta: "{not json",
        "missing-keys": lambda meta: json.dumps({"out_meta": meta["out_meta"]}),
        "wrong-shape": lambda meta: json.dumps({**meta, "out_meta": [[[7, 7], "float32"]]}),
        "wrong-template": lambda meta: json.dumps({**meta, "out_template": {"value": 5}}),
        "wrong-dtype": lambda meta: json.dumps({**meta, "out_meta": [[meta["out_meta"][0][0], "int64"]]}),
    }


@pytest.mark.parametrize("breakage", list(_broken_sidecars()))
def test_broken_sidecar_is_rebuilt_once_not_failed_on_every_run(tmp_path, genesis_log, breakage):
    lin = nn.Linear(5, 4)
    x = torch.randn(3, 5)
    _fresh(tmp_path).execute_on_backend("onnx", lin, x)
    sidecar = [tmp_path / f for f in os.listdir(tmp_path) if f.endswith(".json")][0]
    sidecar.write_text(_broken_sidecars()[breakage](json.loads(sidecar.read_text())))
    with torch.no_grad():
        first = _fresh(tmp_path)
        torch.testing.assert_close(first.execute_on_backend("onnx", lin, x), lin(x))
        assert first.stats()["onnx"]["exports"] == 1
        second = _fresh(tmp_path)
        torch.testing.assert_close(second.execute_on_backend("onnx", lin, x), lin(x))
        assert second.stats()["onnx"]["exports"] == 0 and second.stats()["onnx"]["disk_hits"] == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_failed_cache_write_leaves_no_temporary_files(tmp_path, genesis_log):
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    _fresh(tmp_path).execute_on_backend("onnx", lin, x)
    sidecar = [tmp_path / f for f in os.listdir(tmp_path) if f.endswith(".json")][0]
    sidecar.unlink()
    sidecar.mkdir()  # a folder where the sidecar goes: the rename fails
    with torch.no_grad():
        torch.testing.assert_close(_fresh(tmp_path).execute_on_backend("onnx", lin, x), lin(x))
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], os.listdir(tmp_path)
    assert any("could not write the ONNX cache" in m for m in genesis_log), genesis_log
