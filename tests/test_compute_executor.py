"""HeterogeneousExecutor on torch backends: results, argument moving, return placement, captured models,
errors, thread safety, telemetry.

Without a GPU, a CPU worker whose device is switched to ``meta`` stands in for "another device": moving
tensors there really happens, and a CPU weight meeting a meta input really fails, so the placement
mechanism is exercised for real.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from genesis_core.compute import (BackendUnavailableError, ComputeBackend, HeterogeneousExecutor, current_worker,
                                  detect_backends, reachable_modules)


def _fake_device_worker(ex: HeterogeneousExecutor, name: str = "elsewhere") -> str:
    ex.register_backend(ComputeBackend.CPU, name=name)
    ex._workers[name].device = torch.device("meta")  # test-only: a second "device" on a CPU-only box
    return name


class TinyCross(nn.Module):
    def __init__(self, qd=32, cd=48, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(qd, qd, bias=False), nn.Linear(cd, qd, bias=False)
        self.v, self.o = nn.Linear(cd, qd, bias=False), nn.Linear(qd, qd)

    def forward(self, x, ctx):
        b, n, _ = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(ctx)), split(self.v(ctx)))
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def reference_cross(m: TinyCross, x, ctx):
    """float64 math reference, independent of SDPA."""
    w = {k: v.double() for k, v in m.state_dict().items()}
    x, ctx = x.double(), ctx.double()
    b, n, _ = x.shape
    q = (x @ w["q.weight"].T).view(b, n, m.heads, -1).transpose(1, 2)
    k = (ctx @ w["k.weight"].T).view(b, ctx.shape[1], m.heads, -1).transpose(1, 2)
    v = (ctx @ w["v.weight"].T).view(b, ctx.shape[1], m.heads, -1).transpose(1, 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
    return a.transpose(1, 2).reshape(b, n, -1) @ w["o.weight"].T + w["o.bias"]


@pytest.fixture
def ex():
    e = HeterogeneousExecutor()
    e.register_backend(ComputeBackend.CPU, torch.device("cpu"))
    return e


def test_spec_example_runs_or_raises_a_clear_error():
    ex = HeterogeneousExecutor()
    if detect_backends()[ComputeBackend.CUDA].available:
        ex.register_backend(ComputeBackend.CUDA, torch.device("cuda:0"))
    else:
        with pytest.raises(BackendUnavailableError, match=r"ComputeBackend.CUDA is not available here: .*"
                                                          r"Available backends: cpu") as info:
            ex.register_backend(ComputeBackend.CUDA, torch.device("cuda:0"))
        assert isinstance(info.value, RuntimeError) and info.value.backend is ComputeBackend.CUDA
        assert ComputeBackend.CPU in info.value.available
    ex.register_backend(ComputeBackend.CPU, torch.device("cpu"))
    x = torch.randn(100, 100)
    out = ex.execute_on_backend(ComputeBackend.CPU, lambda t: t * 2 + 1, x)
    torch.testing.assert_close(out.double(), x.double() * 2 + 1)


def test_results_equal_plain_pytorch(ex):
    m = TinyCross().eval()
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 7, 48)
    out = ex.execute_on_backend("cpu", m, x, ctx)
    torch.testing.assert_close(out.double(), reference_cross(m, x, ctx), atol=1e-5, rtol=1e-4)


def test_nested_arguments_reach_the_device_and_keep_their_structure(ex):
    name = _fake_device_worker(ex)
    seen = {}

    def fn(pack, *, extra):
        seen["devices"] = {str(t.device) for t in (pack["a"], pack["pair"][0], pack["pair"][1], extra[0])}
        seen["kinds"] = (type(pack["pair"]), type(extra), pack["n"])
        return {"sum": pack["a"] + 1, "list": [pack["pair"][1] * 2], "n": pack["n"]}

    pack = {"a": torch.randn(3), "pair": (torch.randn(2), torch.randn(4)), "n": 7}
    out = ex.execute_on_backend(name, fn, pack, extra=[torch.randn(1)], return_device=None)
    assert seen["devices"] == {"meta"} and seen["kinds"] == (tuple, list, 7)
    assert out["sum"].device.type == "meta" and out["list"][0].shape == (4,) and out["n"] == 7


def test_results_return_where_the_first_input_came_from(ex):
    name = _fake_device_worker(ex)
    out = ex.execute_on_backend(name, lambda t: t + 1, torch.randn(3), return_device=None)  # None: where computed
    assert out.device.type == "meta"
    out = ex.execute_on_backend("cpu", lambda t: (t + 1, [t * 2]), torch.randn(3), return_device="meta")
    assert out[0].device.type == "meta" and out[1][0].device.type == "meta"
    out = ex.execute_on_backend("cpu", lambda: torch.ones(2))  # no inputs: stays on the worker device
    assert out.device.type == "cpu"


def test_default_return_device_is_the_first_input_tensors(ex, monkeypatch):
    # meta tensors cannot be copied back to the CPU, so record where the executor sends things instead
    from genesis_core.compute import executor as E
    targets = []
    monkeypatch.setattr(E, "_mover", lambda device: targets.append(device) or (lambda t: t))
    ex.execute_on_backend("cpu", lambda *a, **k: torch.ones(1), 5, [torch.randn(2, device="meta")],
                          torch.randn(2), k=torch.randn(1))
    assert targets[-1] == torch.device("meta")  # the first tensor, found inside the list


def test_models_captured_by_a_closure_run_where_the_data_runs(ex, genesis_log):
    name = _fake_device_worker(ex)

    class Node:  # the spec's integration example: fn closes over self, which holds the model
        def __init__(self):
            self.cross_attn = TinyCross().eval()

        def run(self, backend, x, ctx):
            def process(a, b):
                return self.cross_attn.forward(a, b, )
            return ex.execute_on_backend(backend, process, x, ctx, return_device=None)

    node = Node()
    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 7, 48)
    with pytest.raises(RuntimeError, match="meta"):  # proves the mismatch is real without the mechanism
        node.cross_attn(x.to("meta"), ctx.to("meta"))
    out = node.run(name, x, ctx)
    assert out.device.type == "meta" and out.shape == (2, 16, 32)
    assert all(p.device.type == "cpu" for p in node.cross_attn.parameters())  # the user's model is untouched
    copies = ex._replicas.copies
    node.run(name, x, ctx)  # replicas are cached per device
    assert ex._replicas.copies == copies == 5
    with torch.no_grad():
        node.cross_attn.o.bias.add_(1.0)  # an in-place weight change refreshes the replicas
    node.run(name, x, ctx)
    assert ex._replicas.copies == 10
    cpu_out = node.run("cpu", x, ctx)  # and the CPU worker still computes right on the original
    torch.testing.assert_close(cpu_out.double(), reference_cross(node.cross_attn, x, ctx), atol=1e-5, rtol=1e-4)
    assert any("cached device copies" in m for m in genesis_log)


def test_discovery_finds_models_through_common_paths():
    a, b, c, d = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)

    class Holder:
        def __init__(self):
            self.inner = {"m": b}

        def method(self, x):
            return self.inner["m"](x)

    h = Holder()
    assert reachable_modules(a) == [a]
    assert reachable_modules(h.method) == [b]
    assert {id(m) for m in reachable_modules(lambda x: c(x) + a(x))} == {id(c), id(a)}
    assert reachable_modules(lambda x, m=d: m(x)) == [d]
    import functools
    assert reachable_modules(functools.partial(lambda m, x: m(x), d)) == [d]
    assert reachable_modules(lambda x: x + 1) == []


def test_place_moves_a_module_for_good(ex):
    name = _fake_device_worker(ex)
    m = nn.Linear(3, 3)
    assert ex.place(m, name) is m and m.weight.device.type == "meta"
    out = ex.execute_on_backend(name, m, torch.randn(2, 3), return_device=None)
    assert out.device.type == "meta" and ex._replicas.copies == 0
    with pytest.raises(TypeError, match="nn.Module"):
        ex.place(lambda x: x, name)


def test_unknown_backend_is_a_value_error(ex):
    with pytest.raises(ValueError, match="backend must be a ComputeBackend or one of .*got 'tpu'"):
        ex.register_backend("tpu")


def test_unregistered_backend_is_a_key_error_listing_registered(ex):
    with pytest.raises(KeyError, match=r"'onnx' is not registered .*registered: 'cpu'"):
        ex.execute_on_backend(ComputeBackend.ONNX, lambda t: t, torch.randn(2))
    with pytest.raises(KeyError, match="registered: 'cpu'"):
        ex.execute_on_backend("my-gpu", lambda t: t, torch.randn(2))


def test_detected_backends_run_without_registering():
    # issue 12, item 12: a detected torch backend is usable by name; registering stays for choosing devices
    fresh = HeterogeneousExecutor()
    x, w = torch.randn(5, 7), torch.randn(7, 3)
    f = lambda t: t @ w + 1  # noqa: E731
    torch.testing.assert_close(fresh.execute_on_backend("cpu", f, x), x @ w + 1)
    torch.testing.assert_close(fresh.execute_on_backend(ComputeBackend.CPU, f, x), x @ w + 1)
    parts = [torch.randn(n, 7) for n in (2, 4)]
    outs = fresh.parallel_execute(f, parts, ["cpu", ComputeBackend.CPU])
    torch.testing.assert_close(outs, [p @ w + 1 for p in parts])
    torch.testing.assert_close(fresh.split_execute(f, x, ["cpu"]), x @ w + 1)
    assert fresh.device_of("cpu") == torch.device("cpu")
    assert fresh.registered() == []  # nothing was registered behind the caller's back
    assert fresh.stats()["cpu"]["calls"] == 5 and fresh.stats()["cpu"]["errors"] == 0
    with pytest.raises(ValueError, match="at least one registered backend"):
        fresh.split_execute(f, x)  # without names, a split takes the registered workers only


def test_registering_a_detected_backend_chooses_its_device():
    fresh = HeterogeneousExecutor()
    assert fresh.execute_on_backend("cpu", lambda t: t + 1, torch.randn(3), return_device=None).device.type == "cpu"
    _fake_device_worker(fresh, name="cpu")  # the registered worker takes the name over
    out = fresh.execute_on_backend("cpu", lambda t: t + 1, torch.randn(3), return_device=None)
    assert out.device.type == "meta" and fresh.registered() == ["cpu"]


def test_a_backend_it_cannot_serve_is_a_sentence_listing_what_it_can(ex):
    ex.register_backend(ComputeBackend.CPU, name="cpu-b")
    with pytest.raises(ValueError) as info:  # also a KeyError, for callers written against earlier versions
        ex.execute_on_backend("my-gpu", lambda t: t, torch.randn(2))
    text = str(info.value)
    assert isinstance(info.value, KeyError)
    assert text.startswith("backend 'my-gpu' is not registered with this executor; registered: 'cpu', 'cpu-b'.")
    assert "run without registering: cpu" in text
    found = detect_backends()
    if not found[ComputeBackend.CUDA].available:
        with pytest.raises(ValueError) as info:
            ex.execute_on_backend("cuda", lambda t: t, torch.randn(2))
        assert found[ComputeBackend.CUDA].reason in str(info.value) and "not available here" in str(info.value)
    if found[ComputeBackend.ONNX].available:
        with pytest.raises(ValueError, match="runs only once registered .*runtime options"):
            ex.execute_on_backend(ComputeBackend.ONNX, lambda t: t, torch.randn(2))


def test_non_callable_fn_is_a_type_error(ex):
    with pytest.raises(TypeError, match="fn must be callable; got Tensor"):
        ex.execute_on_backend("cpu", torch.randn(2), torch.randn(2))


def test_bad_devices_and_options_are_rejected(ex):
    with pytest.raises(ValueError, match="must be a 'cpu' device; got 'meta'"):
        ex.register_backend(ComputeBackend.CPU, "meta")
    with pytest.raises(TypeError, match="takes no options"):
        ex.register_backend(ComputeBackend.CPU, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        ex.register_backend(ComputeBackend.CPU, name="")


def test_errors_propagate_and_are_counted(ex):
    def bad(t):
        raise ArithmeticError("nope")
    with pytest.raises(ArithmeticError, match="nope"):
        ex.execute_on_backend("cpu", bad, torch.randn(2))
    ex.execute_on_backend("cpu", torch.neg, torch.randn(2))
    s = ex.stats()["cpu"]
    assert s["calls"] == 2 and s["errors"] == 1 and s["total_s"] > 0 and s["backend"] == "cpu"


def test_concurrent_calls_are_safe_and_counted(ex):
    ex.register_backend(ComputeBackend.CPU, name="cpu-b")
    lin = nn.Linear(8, 8)
    failures = []

    def worker(i):
        for j in range(25):
            x = torch.randn(4, 8)
            name = "cpu" if (i + j) % 2 else "cpu-b"
            got = ex.execute_on_backend(name, lambda t: (lin(t), current_worker()), x)
            if not torch.allclose(got[0], lin(x), atol=1e-6) or got[1] != name:
                failures.append((i, j))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = ex.stats()
    assert not failures and stats["cpu"]["calls"] + stats["cpu-b"]["calls"] == 200
    assert current_worker() is None


def test_several_workers_of_one_backend_by_name(ex):
    names = [ex.register_backend("cpu", name=f"cpu{i}") for i in range(3)]
    assert ex.registered() == ["cpu", "cpu0", "cpu1", "cpu2"] and names == ["cpu0", "cpu1", "cpu2"]
    ex.unregister_backend("cpu1")
    assert "cpu1" not in ex.registered()
    with pytest.raises(KeyError):
        ex.unregister_backend("cpu1")


def test_replica_substitution_is_thread_local(ex):
    # the same closure runs at the same time on the CPU (original weights) and on another device (replicas)
    name = _fake_device_worker(ex)
    m = TinyCross().eval()
    barrier = threading.Barrier(2, timeout=10)

    def fn(x, ctx):
        barrier.wait()  # both calls are inside fn together
        out = m(x, ctx)
        barrier.wait()
        return out

    x, ctx = torch.randn(2, 16, 32), torch.randn(2, 7, 48)
    outs = ex.parallel_execute(fn, [(x, ctx), (x, ctx)], ["cpu", name], return_device=None)
    assert outs[0].device.type == "cpu" and outs[1].device.type == "meta"
    torch.testing.assert_close(outs[0].double(), reference_cross(m, x, ctx), atol=1e-5, rtol=1e-4)


def test_unused_reachable_models_are_not_copied(ex):
    name = _fake_device_worker(ex)

    class Node:
        def __init__(self):
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(64, 64)
            self.executor = ex  # the executor itself is never searched

    node = Node()
    out = ex.execute_on_backend(name, lambda x: node.used(x), torch.randn(2, 4), return_device=None)
    assert out.device.type == "meta" and ex._replicas.copies == 2  # weight + bias of `used` only
    assert {id(m) for m in reachable_modules(lambda x: node.used(x))} == {id(node.used), id(node.unused)}
