"""The tensor nodes run without ComfyUI: bridges, cross attention, attention map, info, multimodal, backend select."""
from __future__ import annotations

import math

import pytest
import torch

from comfy_helpers import load_pack

pack = load_pack()
N = pack.NODE_CLASS_MAPPINGS


def run(name, **kwargs):
    cls = N[name]
    return getattr(cls(), cls.FUNCTION)(**kwargs)


def test_latent_round_trip_restores_shape_and_values():
    samples = torch.randn(2, 4, 6, 5)
    latent = {"samples": samples, "batch_index": [0, 1]}
    (tokens,) = run("GenesisLatentToTensor", latent=latent)
    assert tokens.shape == (2, 30, 4)
    assert torch.equal(tokens[1, 7], samples[1, :, 7 // 5, 7 % 5])  # token n is pixel (n // W, n % W)
    (back,) = run("GenesisTensorToLatent", tokens=tokens * 2, like=latent)
    assert torch.equal(back["samples"], samples * 2) and back["batch_index"] == [0, 1]


def test_video_latent_round_trip():
    samples = torch.randn(1, 3, 2, 4, 4)
    (tokens,) = run("GenesisLatentToTensor", latent={"samples": samples})
    assert tokens.shape == (1, 32, 3)
    (back,) = run("GenesisTensorToLatent", tokens=tokens, like={"samples": samples})
    assert torch.equal(back["samples"], samples)


def test_conditioning_to_tensor():
    cond = torch.randn(1, 77, 32)
    (t,) = run("GenesisConditioningToTensor", conditioning=[[cond, {"pooled_output": None}]], index=0)
    assert t is cond
    with pytest.raises(ValueError, match="GenesisConditioningToTensor: input 'index'"):
        run("GenesisConditioningToTensor", conditioning=[[cond, {}]], index=2)


def _reference_cross_attention(module, q, c, mask=None):
    """float64 multi-head cross attention with the module's own weights (independent of dispatch)."""
    h, d = module.num_heads, module.head_dim
    w = {k: v.double() for k, v in module.state_dict().items()}
    qq = (q.double() @ w["to_q.weight"].T).view(q.shape[0], q.shape[1], h, d).transpose(1, 2)
    kk = (c.double() @ w["to_k.weight"].T).view(c.shape[0], c.shape[1], h, d).transpose(1, 2)
    vv = (c.double() @ w["to_v.weight"].T).view(c.shape[0], c.shape[1], h, d).transpose(1, 2)
    s = qq @ kk.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    p = s.softmax(-1)
    o = (p @ vv).transpose(1, 2).reshape(q.shape[0], q.shape[1], h * d)
    return o @ w["to_out.0.weight"].T.double() + w["to_out.0.bias"].double(), p


@pytest.mark.parametrize("attention", ["auto", "sdpa", "pytorch"])
def test_cross_attention_matches_float64_reference_and_is_seeded(attention):
    cross = pack.NODE_CLASS_MAPPINGS["GenesisCrossAttention"]
    mod = __import__(cross.__module__, fromlist=["build_module"])
    q, c = torch.randn(2, 9, 16), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    (out,) = run("GenesisCrossAttention", query=q, context=c, num_heads=4, attention=attention, seed=7, mask=mask)
    module = mod.build_module("t", q, c, 4, attention, 7)
    ref, _ = _reference_cross_attention(module, q, c, mask > 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    (again,) = run("GenesisCrossAttention", query=q, context=c, num_heads=4, attention=attention, seed=7, mask=mask)
    assert torch.equal(out, again)
    (other,) = run("GenesisCrossAttention", query=q, context=c, num_heads=4, attention=attention, seed=8, mask=mask)
    assert not torch.allclose(out, other)


def test_cross_attention_on_selected_cpu_backend():
    (choice, model) = run("GenesisBackendSelect", backend="cpu", device_index=0)
    assert choice.backend == "cpu" and choice.device == "cpu" and model is None
    q, c = torch.randn(1, 4, 8), torch.randn(1, 3, 8)
    (a,) = run("GenesisCrossAttention", query=q, context=c, num_heads=2, attention="sdpa", seed=1, backend=choice)
    (b,) = run("GenesisCrossAttention", query=q, context=c, num_heads=2, attention="sdpa", seed=1)
    torch.testing.assert_close(a, b)


def test_attention_map_image_shows_the_weights():
    q, c = torch.randn(2, 8, 16), torch.randn(2, 4, 12)
    image, weights = run("GenesisAttentionMap", query=q, context=c, num_heads=4, seed=3)
    cross = pack.NODE_CLASS_MAPPINGS["GenesisCrossAttention"]
    mod = __import__(cross.__module__, fromlist=["build_module"])
    _, p = _reference_cross_attention(mod.build_module("t", q, c, 4, "auto", 3), q, c)
    torch.testing.assert_close(weights.double(), p, rtol=1e-4, atol=1e-5)
    assert image.ndim == 4 and image.shape[0] == 2 and image.shape[-1] == 3
    assert image.shape[1] % 8 == 0 and image.shape[2] % 4 == 0 and min(image.shape[1:3]) >= 256
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # The brightest cell of the picture is the largest head-averaged weight.
    avg = p.mean(1)[0]
    i, j = divmod(int(avg.argmax()), avg.shape[1])
    sy, sx = image.shape[1] // 8, image.shape[2] // 4
    brightest = image[0].sum(-1)
    assert torch.isclose(brightest[i * sy, j * sx], brightest.max())


def test_tensor_info_reports_stats_and_nans():
    x = torch.tensor([[1.0, float("nan")], [-3.0, 5.0]])
    res = run("GenesisTensorInfo", tensor=x)
    text = res["result"][0]
    assert res["ui"]["text"] == [text]
    assert "shape [2x2]" in text and "float32" in text and "cpu" in text
    assert "min -3" in text and "max 5" in text and "mean 1" in text and "NaN 1" in text


@pytest.mark.parametrize("attention_type", ["sdpa", "flash", "xformers"])
def test_multimodal_gen_runs_the_spec_example(attention_type):
    img, txt = torch.randn(2, 6, 16), torch.randn(2, 5, 24)
    (out,) = run("GenesisMultiModalGen", image_features=img, text_embeddings=txt, backend="cpu",
                 attention_type=attention_type, num_heads=4, seed=0)
    assert out.shape == img.shape and torch.isfinite(out).all()
    (ref,) = run("GenesisMultiModalGen", image_features=img, text_embeddings=txt, backend="cpu",
                 attention_type="sdpa", num_heads=4, seed=0)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # implementations agree; fallbacks are exact


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="GenesisBackendSelect: input 'backend' is 'cuda', which is not available here"):
        run("GenesisBackendSelect", backend="cuda", device_index=0)
    with pytest.raises(ValueError, match="GenesisMultiModalGen: input 'backend' is 'cuda'"):
        run("GenesisMultiModalGen", image_features=torch.randn(1, 2, 8), text_embeddings=torch.randn(1, 2, 8),
            backend="cuda", attention_type="sdpa", num_heads=2)


@pytest.mark.parametrize(
    "name,kwargs,message",
    [
        ("GenesisCrossAttention", dict(query=torch.randn(4, 8), context=torch.randn(1, 3, 8)),
         "GenesisCrossAttention: input 'query' must be 3-D"),
        ("GenesisCrossAttention", dict(query=torch.randn(1, 4, 8), context=torch.randn(1, 3, 8), num_heads=3),
         "input 'num_heads' must divide"),
        ("GenesisTensorToLatent", dict(tokens=torch.randn(1, 5, 4), like={"samples": torch.randn(1, 4, 2, 2)}),
         "GenesisTensorToLatent: input 'tokens' must be shape"),
        ("GenesisLatentToTensor", dict(latent=torch.randn(1, 4, 2, 2)), "input 'latent' must be a LATENT"),
        ("GenesisTensorInfo", dict(tensor=None), "input 'tensor' must be a TENSOR"),
    ],
)
def test_bad_inputs_name_node_and_input(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(name, **kwargs)


def test_cross_attention_through_onnx_runtime_matches_torch():
    compute = __import__(pack.__name__ + ".genesis_core.compute.backends", fromlist=["backend_status"])
    status = compute.backend_status("onnx")
    if not status.available:
        pytest.skip(f"onnx backend not available: {status.reason}")
    (choice, _) = run("GenesisBackendSelect", backend="onnx", device_index=0)
    assert choice.backend == "onnx" and choice.device is None
    q, c = torch.randn(1, 6, 16), torch.randn(1, 4, 12)
    (a,) = run("GenesisCrossAttention", query=q, context=c, num_heads=4, attention="sdpa", seed=3, backend=choice)
    (b,) = run("GenesisCrossAttention", query=q, context=c, num_heads=4, attention="sdpa", seed=3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="input 'model' can only be placed on a torch device"):
        run("GenesisBackendSelect", backend="onnx", device_index=0, model=type("M", (), {"clone": None})())


def test_backend_select_model_clone_gets_the_load_device():
    class FakePatcher:  # the two things ComfyUI's ModelPatcher offers that the node uses
        def __init__(self):
            self.load_device = torch.device("meta")

        def clone(self):
            c = FakePatcher()
            c.parent = self
            return c

    original = FakePatcher()
    (choice, model) = run("GenesisBackendSelect", backend="cpu", device_index=0, model=original)
    assert model is not original and model.parent is original
    assert model.load_device == torch.device("cpu") and original.load_device == torch.device("meta")
    with pytest.raises(ValueError, match="input 'device_index' must be in 0..0"):
        run("GenesisBackendSelect", backend="cpu", device_index=3)


def test_attention_switch_rejects_what_is_not_a_model_and_unknown_choices():
    with pytest.raises(ValueError, match="GenesisAttentionSwitch: input 'model' must be a ComfyUI MODEL"):
        run("GenesisAttentionSwitch", model=torch.randn(2), attention="sdpa")
    fake = type("M", (), {"clone": lambda self: self, "model_options": {}})()
    with pytest.raises(ValueError, match="GenesisAttentionSwitch: input 'attention': unknown attention backend 'warp'"):
        run("GenesisAttentionSwitch", model=fake, attention="warp")
