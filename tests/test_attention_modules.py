"""The spec's modules, factory and interface info against independent references."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT, reference_attention

from genesis_core import (
    AdaptiveAttentionSwitch,
    AttentionType,
    CrossAttentionInterface,
    CrossAttentionModule,
    create_attention_interface,
    get_interface_info,
    last_backend,
)
from genesis_core.attn import registry


def manual_cross(mod, x, ctx, key_mask=None):
    """float64 reference of the module: projections, per-head softmax(QK^T/sqrt(d))V, output projection."""
    h, d = mod.num_heads, mod.head_dim
    dd = lambda lin, t: t.double() @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0)
    q = dd(mod.to_q, x).view(x.shape[0], x.shape[1], h, d).transpose(1, 2)
    k = dd(mod.to_k, ctx).view(ctx.shape[0], ctx.shape[1], h, d).transpose(1, 2)
    v = dd(mod.to_v, ctx).view(ctx.shape[0], ctx.shape[1], h, d).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / d**0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    p = s.softmax(-1)
    o = (p @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], h * d)
    return dd(mod.to_out[0], o), p


@pytest.mark.parametrize("backend", ["auto", "sdpa", "pytorch", "flash"])
def test_cross_attention_matches_reference(backend):
    mod = CrossAttentionModule(query_dim=48, context_dim=40, num_heads=4, backend=backend, bias=True)
    x, ctx = torch.randn(2, 19, 48), torch.randn(2, 11, 40)
    keep = torch.rand(2, 11) > 0.4
    keep[:, 0] = True
    with torch.no_grad():
        ref, probs = manual_cross(mod, x, ctx)
        assert torch.allclose(mod(x, ctx, ctx).double(), ref, atol=1e-5)
        ref_m, probs_m = manual_cross(mod, x, ctx, keep)
        assert torch.allclose(mod(x, ctx, mask=keep).double(), ref_m, atol=1e-5)
        w = mod.compute_attention_weights(x, ctx)
        assert w.shape == (2, 4, 19, 11)
        assert torch.allclose(w.double(), probs, atol=1e-5)
        assert torch.allclose(w.sum(-1), torch.ones(2, 4, 19), atol=1e-5)
        assert torch.allclose(mod.compute_attention_weights(x, ctx, mask=keep).double(), probs_m, atol=1e-5)


def test_cross_attention_is_an_interface_and_trains():
    mod = CrossAttentionModule(32, 16, 4)
    assert isinstance(mod, CrossAttentionInterface)
    with pytest.raises(TypeError):
        CrossAttentionInterface()
    x, ctx = torch.randn(1, 5, 32, requires_grad=True), torch.randn(1, 3, 16)
    mod(x, ctx).sum().backward()
    assert x.grad is not None and mod.to_q.weight.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "args, pattern",
    [
        (dict(query_dim=10, context_dim=8, num_heads=3), r"query_dim \(10\) must be divisible by num_heads \(3\)"),
        (dict(query_dim=0, context_dim=8, num_heads=1), r"query_dim must be a positive integer; got 0"),
        (dict(query_dim=8, context_dim=8, num_heads=2, dropout=1.5), r"dropout must be in \[0, 1\); got 1.5"),
    ],
)
def test_cross_attention_constructor_errors(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        CrossAttentionModule(**args)


def test_cross_attention_call_errors():
    mod = CrossAttentionModule(32, 16, 4)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"query last dimension must be query_dim=32; got shape \(2, 5, 16\)"):
        mod(torch.randn(2, 5, 16), ctx)
    with pytest.raises(ValueError, match=r"key must be 3-D \[B, N, context_dim\]; got shape \(3, 16\)"):
        mod(x, ctx[0])
    with pytest.raises(ValueError, match=r"a 2-D mask is key padding \[B, M\] = \(2, 3\); got shape \(5, 3\)"):
        mod(x, ctx, mask=torch.ones(5, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query batch 1 differs from key batch 2"):
        mod(x[:1], ctx)
    with pytest.raises(MemoryError, match=r"need 1 MiB of float32, over the 0 MiB limit"):
        mod.compute_attention_weights(torch.randn(2, 256, 32), torch.randn(2, 128, 16), max_bytes=10)


def test_adaptive_switch_self_and_cross_attention_match_reference():
    sw = AdaptiveAttentionSwitch(embed_dim=32, num_heads=4)
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 6, 32)
    with torch.no_grad():
        assert torch.allclose(sw(x).double(), manual_cross(sw, x, x)[0], atol=1e-5)
        assert torch.allclose(sw(x, context=ctx).double(), manual_cross(sw, x, ctx)[0], atol=1e-5)
        for t in (AttentionType.SDPA, AttentionType.PYTORCH):
            out = sw.forward_with_type(t, x, ctx, ctx)
            assert last_backend() == t.value
            assert torch.allclose(out.double(), manual_cross(sw, x, ctx)[0], atol=1e-5)
        q, k = torch.randn(2, 2, 7, 8), torch.randn(2, 2, 5, 8)
        raw = sw.forward_with_type("pytorch", q, k, k)
        assert raw.shape == (2, 2, 7, 8) and last_backend() == "pytorch"
        keep = torch.tensor([[True, True, False, True, False], [True, False, True, True, True]])
        masked = sw.forward_with_type("pytorch", q, k, k, mask=keep)  # [B, M] key padding, as in forward()
        assert torch.allclose(masked.double(), reference_attention(q, k, k, keep[:, None, None, :]), atol=1e-5)


def test_adaptive_switch_types_availability_and_strict():
    sw = AdaptiveAttentionSwitch(16, 2, default_type=AttentionType.SDPA)
    avail = sw.get_available_attentions()
    assert AttentionType.SDPA in avail and AttentionType.PYTORCH in avail and AttentionType.AUTO in avail
    for t in avail:
        assert t is AttentionType.AUTO or registry.get(t.value).available() is None
    missing = [t for t in AttentionType if t not in avail]
    for t in missing:
        with pytest.warns(RuntimeWarning, match=f"attention type '{t.value}' is not available"):
            sw.set_attention_type(t)
        assert sw.attention_type is t
        x = torch.randn(1, 4, 16)
        sw(x)
        assert last_backend() in ("sdpa", "pytorch")
        strict = AdaptiveAttentionSwitch(16, 2, strict=True)
        with pytest.raises(RuntimeError, match=f"attention type '{t.value}' is not available: "):
            strict.set_attention_type(t)
    with pytest.raises(ValueError, match=r"attention_type must be one of .*got 'sdpa_cudnn'"):
        sw.set_attention_type("sdpa_cudnn")
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'"):
        sw.set_attention_type("nope")


def test_factory():
    cross = create_attention_interface("cross", embed_dim=32, context_dim=24, num_heads=4)
    assert isinstance(cross, CrossAttentionModule) and cross.query_dim == 32 and cross.context_dim == 24
    adaptive = create_attention_interface("adaptive", embed_dim=32, num_heads=4)
    assert isinstance(adaptive, AdaptiveAttentionSwitch)
    with pytest.raises(ValueError, match=r"unknown attention interface kind 'self'; valid kinds: cross, adaptive"):
        create_attention_interface("self", embed_dim=8, num_heads=2)


def test_interface_info_sections():
    info = get_interface_info()
    assert isinstance(info["comfyui"]["registered_nodes"], list)
    assert "cpu" in info["heterogeneous_compute"]["backends"]
    assert info["multi_attention"]["types"] == ["flash", "sage", "xformers", "sdpa", "pytorch", "auto"]
    b = info["multi_attention"]["backends"]
    assert b["pytorch"]["available"] is True and b["pytorch"]["reason"] is None
    if not torch.cuda.is_available():
        assert b["sage"]["available"] is False and b["sage"]["reason"]
    assert info["versions"]["torch"] == torch.__version__.split("+")[0] or info["versions"]["torch"]


def test_spec_imports_and_demo_run_as_written():
    """`from genesis.core import ...` and `python -m genesis.examples.interfaces_demo` work on this machine."""
    import genesis.core as core

    for name in ("ComfyUINodeInterface", "register_comfyui_node", "COMFYUI_NODE_REGISTRY", "HeterogeneousExecutor",
                 "ComputeBackend", "CrossAttentionModule", "AdaptiveAttentionSwitch", "AttentionType",
                 "create_attention_interface", "get_interface_info"):
        assert hasattr(core, name), name
    run = subprocess.run([sys.executable, "-m", "genesis.examples.interfaces_demo"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    for text in ("registered: MyCustomNode", "Available: [", "cross -> CrossAttentionModule", "Attention types:"):
        assert text in run.stdout, text
    for demo in ("demo_comfyui_compatibility", "demo_cross_attention"):
        run = subprocess.run([sys.executable, "-c", f"from genesis.examples.interfaces_demo import {demo}; {demo}()"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
