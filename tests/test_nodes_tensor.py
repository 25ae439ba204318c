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


# ------------------------------------------------------------------ bounded memory and size pre-checks

def _module_of(node_name):
    import sys

    return sys.modules[N[node_name].__module__]


def test_tensor_info_statistics_in_bounded_memory():
    """A 64 MiB tensor is summarised with about 20 MiB of temporaries at most (the old boolean indexing asked for
    ~5x the input: a mask, int64 indices, the copy and its float64 cast), measured from the CPU allocator."""
    from torch_peak import peak_bytes

    x = torch.randn(4, 4096, 1024)
    x[0, 0, :5] = float("nan")
    x[1, 2, 3] = float("inf")
    x[3, 9, 9] = -float("inf")
    peak, res = peak_bytes(lambda: run("GenesisTensorInfo", tensor=x))
    assert peak <= 24 * 2**20, f"Tensor Info allocated {peak / 2**20:.0f} MiB for a 64 MiB input"
    finite = x[torch.isfinite(x)].double()
    text = res["result"][0]
    assert f"min {finite.min().item():.4g}" in text and f"max {finite.max().item():.4g}" in text
    assert f"mean {finite.mean().item():.4g}" in text and "NaN 5" in text


@pytest.mark.parametrize("make", [
    lambda: torch.randn(5, 6, 7),
    lambda: torch.randn(7, 6, 5).permute(2, 1, 0),  # not contiguous: pieces are copied, never the whole tensor
    lambda: torch.randn(3, 40)[:, ::3],
    lambda: torch.randn(2, 3, 4, dtype=torch.float16),
    lambda: torch.randint(-50, 50, (6, 9)),
    lambda: torch.rand(4, 5) > 0.5,
    lambda: torch.randn(3, 4, dtype=torch.complex64),
])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_tensor_info_statistics_match_a_direct_computation(make, chunk):
    stats = _module_of("GenesisTensorInfo").tensor_stats
    x = make()
    if x.is_floating_point():
        x[torch.rand(x.shape) < 0.2] = float("nan")
        x[torch.rand(x.shape) < 0.1] = float("inf")
    st = stats(x, chunk)
    ref = torch.view_as_real(x) if x.is_complex() else x
    ref = ref.double()
    ok = torch.isfinite(ref)
    assert st["nan"] == int(torch.isnan(ref).sum()) and st["finite"] == int(ok.sum())
    assert st["min"] == ref[ok].min().item() and st["max"] == ref[ok].max().item()
    assert math.isclose(st["mean"], ref[ok].mean().item(), rel_tol=1e-9, abs_tol=1e-12)


def test_tensor_info_with_no_finite_value():
    res = run("GenesisTensorInfo", tensor=torch.full((3, 3), float("nan")))
    assert "no finite values" in res["result"][0] and "NaN 9" in res["result"][0]


def _fake_free(monkeypatch, free_bytes):
    """Make the pack's memory helper (the pack's own copy of genesis_core._memory) report ``free_bytes`` free."""
    import importlib

    mem = importlib.import_module(pack.__name__ + ".genesis_core._memory")
    monkeypatch.setattr(mem, "available_bytes", lambda device: free_bytes)


def _no_big_allocation(monkeypatch, limit=2**30):
    """Fail the test instead of allocating when a torch factory is asked for more than ``limit`` bytes."""
    for name in ("randn", "empty", "zeros"):
        real = getattr(torch, name)

        def guarded(*size, _real=real, _name=name, **kw):
            dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
            if all(isinstance(d, int) for d in dims) and math.prod(dims) * 4 > limit:
                raise AssertionError(f"torch.{_name}{tuple(dims)} reached the allocator")
            return _real(*size, **kw)

        monkeypatch.setattr(torch, name, guarded)


def test_random_tensor_refuses_sizes_over_the_free_memory_before_allocating(monkeypatch):
    _fake_free(monkeypatch, 8 * 2**30)
    _no_big_allocation(monkeypatch)
    with pytest.raises(ValueError) as err:
        run("GenesisRandomTensor", batch=64, tokens=16384, dim=8192, seed=0)  # the widget maxima: 32 GiB
    msg = str(err.value)
    assert msg.startswith("GenesisRandomTensor: ") and "64 x 16384 x 8192" in msg
    assert "needs 32.00 GiB, over the limit of 6.40 GiB on cpu (80% of the 8.00 GiB free)" in msg
    assert "lower batch, tokens or dim" in msg
    (t,) = run("GenesisRandomTensor", batch=2, tokens=8, dim=4, seed=1)  # what fits still runs
    assert t.shape == (2, 8, 4)


def test_random_tensor_runs_when_free_memory_is_unknown(monkeypatch):
    _fake_free(monkeypatch, None)
    (t,) = run("GenesisRandomTensor", batch=1, tokens=3, dim=2, seed=0)
    assert t.shape == (1, 3, 2)


def test_attention_map_refuses_weights_over_the_free_memory_before_allocating(monkeypatch):
    _fake_free(monkeypatch, 64 * 2**20)
    q, c = torch.randn(2, 1024, 128), torch.randn(2, 512, 16)
    with pytest.raises(ValueError) as err:  # 2 x [2, 128, 1024, 512] float32 = 1 GiB
        run("GenesisAttentionMap", query=q, context=c, num_heads=128, seed=0)
    msg = str(err.value)
    assert msg.startswith("GenesisAttentionMap: ") and "H=128" in msg
    assert "need 1.00 GiB, over the limit of 0.05 GiB on cpu" in msg
    assert "lower num_heads" in msg
    image, weights = run("GenesisAttentionMap", query=q[:, :8], context=c[:, :4], num_heads=2, seed=0)
    assert weights.shape == (2, 2, 8, 4)


def test_cgroup_limit_caps_free_memory(tmp_path):
    """In a container the cgroup limit, not the host's MemAvailable, is what a process can still allocate."""
    from genesis_core import _memory

    v2 = tmp_path / "v2"
    (v2 / "app").mkdir(parents=True)
    (v2 / "app" / "memory.max").write_text("4294967296\n")
    (v2 / "app" / "memory.current").write_text("3221225472\n")
    (v2 / "app" / "memory.stat").write_text("anon 1\ninactive_file 536870912\n")
    (v2 / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/app\n")
    assert _memory.cgroup_headroom(str(proc), str(v2)) == 2**30 + 2**29  # 4 GiB - 3 GiB used + 0.5 GiB cache
    v1 = tmp_path / "v1" / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text("2147483648\n")
    (v1 / "memory.usage_in_bytes").write_text("1073741824\n")
    (v1.parent / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit above
    proc.write_text("12:pids:/docker/abc\n4:memory:/docker/abc\n")
    assert _memory.cgroup_headroom(str(proc), str(tmp_path / "v1")) == 2**30
    proc.write_text("4:memory:/\n")
    assert _memory.cgroup_headroom(str(proc), str(tmp_path / "nowhere")) is None
