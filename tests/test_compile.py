"""torch.compile on CPU: a module calling genesis_core.attention compiles without graph breaks,
matches eager, does not recompile on every call, and measures (autotuner) outside tracing.

Most tests use backend="aot_eager": it runs Dynamo *and* AOTAutograd (fake tensors through the
custom op's fake implementation, functionalization, the backward graph) without a C++ compiler,
so they stay cheap on a 2-core CI runner. One test runs Inductor where a C++ compiler exists.
"""
from __future__ import annotations

import shutil

import pytest
import torch

import genesis_core
from genesis_core.attn import autotune, dispatch
from genesis_core.attn.autotune import measuring
from genesis_core.attn import compile as gcompile

pytestmark = pytest.mark.skipif(not gcompile.HAS_CUSTOM_OP, reason="torch.library.custom_op needs torch >= 2.4")

CompileCounterWithBackend = pytest.importorskip("torch._dynamo.testing").CompileCounterWithBackend


class Block(torch.nn.Module):
    """qkv projection -> genesis attention -> output projection, in ComfyUI's [B, N, H, D] habit."""

    def __init__(self, dim=64, heads=4, kv_heads=4, layout="BNHD", masked=False):
        super().__init__()
        self.h, self.hk, self.d = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.d)
        self.o = torch.nn.Linear(dim, dim)
        self.layout, self.masked = layout, masked

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.h, self.d)
        k, v = self.kv(x).view(b, n, 2, self.hk, self.d).unbind(2)
        if self.layout == "BHND":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        out = genesis_core.attention(q, k, v, mask, layout=self.layout)
        if self.layout == "BHND":
            out = out.transpose(1, 2)
        return self.o(out.reshape(b, n, -1))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    dispatch.clear_plans()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("layout, kv_heads, masked", [("BNHD", 4, False), ("BHND", 4, False),
                                                      ("BNHD", 2, False), ("BHND", 4, True)])
def test_compiled_matches_eager_fullgraph(layout, kv_heads, masked):
    torch.manual_seed(0)
    m = Block(layout=layout, kv_heads=kv_heads).eval()
    cnt = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=cnt, fullgraph=True)  # fullgraph: any graph break raises
    x = torch.randn(2, 24, 64)
    mask = (torch.rand(2, 1, 24, 24) > 0.3) | torch.eye(24, dtype=torch.bool) if masked else None
    with torch.no_grad():
        torch.testing.assert_close(cm(x, mask), m(x, mask), atol=2e-5, rtol=1e-5)
    assert cnt.frame_count == 1
    assert any("attention" in str(n.target) for n in cnt.graphs[0].graph.nodes if n.op == "call_function")


def test_no_recompile_per_call_and_dynamic_lengths():
    m = Block().eval()
    cnt = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    with torch.no_grad():
        x = torch.randn(1, 16, 64)
        for _ in range(5):
            torch.testing.assert_close(cm(x), m(x), atol=2e-5, rtol=1e-5)
        assert cnt.frame_count == 1
        for n in (17, 20, 33, 50, 64):  # after one re-trace with symbolic sizes, no more recompiles
            x = torch.randn(1, n, 64)
            torch.testing.assert_close(cm(x), m(x), atol=2e-5, rtol=1e-5)
    assert cnt.frame_count <= 2


def test_use_backend_applies_at_run_time_without_recompiling():
    m = Block().eval()
    cnt = CompileCounterWithBackend("aot_eager")
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        ref = m(x)
        cm(x)
        with genesis_core.use_backend("pytorch"):
            torch.testing.assert_close(cm(x), ref, atol=2e-5, rtol=1e-5)
            assert dispatch.last_backend() == "pytorch"
        cm(x)
        assert dispatch.last_backend() != "pytorch"
    assert cnt.frame_count == 1


def test_autotuner_measures_on_real_tensors_outside_tracing(tmp_path, monkeypatch):
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(tmp_path))
    autotune.set_mode("all")
    autotune.clear()
    seen = []
    real = autotune.measure

    def spy(call, names, budget_ms=None):
        seen.append(type(call.q).__name__)
        return real(call, names, budget_ms)

    monkeypatch.setattr(measuring, "measure", spy)
    try:
        m = Block().eval()
        cm = torch.compile(m, backend=CompileCounterWithBackend("aot_eager"), fullgraph=True)
        x = torch.randn(1, 20, 64)
        with torch.no_grad():
            for _ in range(3):
                torch.testing.assert_close(cm(x), m(x), atol=2e-5, rtol=1e-5)
        assert seen == ["Tensor"]  # measured once, on real tensors (never fake ones while tracing)
        (row,) = autotune.timings().values()
        assert dispatch.last_backend() == row["chosen"]
    finally:
        autotune.set_mode(None)
        autotune.clear(disk=False)


def test_compiled_gradients_match_eager():
    torch.manual_seed(1)
    m = Block(kv_heads=2)
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 10, 64, requires_grad=True)
    cm(x).square().sum().backward()
    g_compiled = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    m(x).square().sum().backward()
    g_eager = [x.grad] + [p.grad for p in m.parameters()]
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="Inductor on CPU needs a C++ compiler")
def test_inductor_matches_eager():
    m = Block(kv_heads=2).eval()
    cm = torch.compile(m, backend="inductor", fullgraph=True)
    with torch.no_grad():
        for n in (16, 16, 24):
            x = torch.randn(1, n, 64)
            torch.testing.assert_close(cm(x), m(x), atol=1e-4, rtol=1e-4)


def test_op_rejects_bad_input_with_the_eager_sentence():
    def f(q, k, v):
        return genesis_core.attention(q, k, v)

    cf = torch.compile(f, backend="aot_eager")
    q = torch.randn(1, 2, 8, 16)
    k = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 9, 16)
    with pytest.raises(Exception, match="same number of tokens"):
        cf(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inductor_on_cuda_matches_eager():
    m = Block(dim=256, heads=4, kv_heads=4).cuda().to(torch.bfloat16).eval()
    cnt = CompileCounterWithBackend("inductor")
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    with torch.no_grad():
        for n in (256, 256, 384):
            x = torch.randn(2, n, 256, device="cuda", dtype=torch.bfloat16)
            y, ref = cm(x).float(), m(x).float()
            assert float((y - ref).norm() / ref.norm()) < 2e-2
    assert cnt.frame_count <= 2
