"""The Genesis Multi-GPU node without ComfyUI or Ray: its contract, how gpus/mode/ring become a mesh, the
sentences it refuses with, the clone it returns, and the example API workflow that uses it."""
from __future__ import annotations

import json

import pytest

from comfy_helpers import REPO, load_pack

pack = load_pack()
NODE = pack.NODE_CLASS_MAPPINGS["GenesisMultiGPU"]
mg = __import__(NODE.__module__, fromlist=["degrees", "parse_gpus"])


def test_contract():
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["GenesisMultiGPU"] == "Genesis Multi-GPU"
    assert NODE.CATEGORY.startswith("genesis/") and len(NODE.DESCRIPTION) > 40
    assert NODE.RETURN_TYPES == ("MODEL",) and len(NODE.OUTPUT_TOOLTIPS) == 1
    spec = NODE.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, entry in spec[section].items():
            assert entry[1]["tooltip"], name
            if isinstance(entry[0], list):
                assert entry[1]["default"] in entry[0]


@pytest.mark.parametrize("mode,count,ring,want", [
    ("cfg", 2, 1, (2, 1, 1)), ("sequence", 2, 1, (1, 2, 1)), ("sequence", 8, 2, (1, 4, 2)),
    ("both", 4, 1, (2, 2, 1)), ("both", 8, 2, (2, 2, 2)), ("both", 2, 1, (2, 1, 1)),
])
def test_degrees(mode, count, ring, want):
    assert mg.degrees(mode, count, ring) == want


@pytest.mark.parametrize("mode,count,ring,message", [
    ("cfg", 4, 1, "exactly 2 workers"), ("both", 3, 1, "odd"), ("sequence", 1, 1, "at least 2 workers"),
    ("sequence", 6, 4, "must divide the 6 workers"), ("tiles", 2, 1, "must be one of"),
])
def test_degrees_refused_with_a_sentence(mode, count, ring, message):
    with pytest.raises(ValueError, match=message):
        mg.degrees(mode, count, ring)


def test_parse_gpus():
    assert mg.parse_gpus("4", True, "") == (4, ())
    assert mg.parse_gpus("0, 2,3", True, "") == (3, (0, 2, 3))
    for text, message in (("a,b", "a count such as 4"), ("1,1", "names a GPU twice"), ("", "number of CPU workers")):
        with pytest.raises(ValueError, match=message):
            mg.parse_gpus(text, False, "")
    with pytest.raises(ValueError, match="only apply to this machine"):
        mg.parse_gpus("0,1", True, "ray://head:10001")


class _Model:
    """Just what the node touches of a ComfyUI ModelPatcher."""

    def __init__(self, diffusion_model=None):
        self.model_options = {"transformer_options": {}}
        self.model = type("Base", (), {"diffusion_model": diffusion_model})()

    def clone(self):
        c = _Model(self.model.diffusion_model)
        c.model_options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model_options.items()}
        return c

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


def test_returns_a_clone_with_the_wrapper_and_leaves_the_input_alone():
    import torch

    WanLike = type("WanModel", (torch.nn.Module,), {"forward_orig": lambda self: None, "num_heads": 12})
    WanLike.forward_orig.__qualname__ = "WanModel.forward_orig"
    model = _Model(WanLike())
    (clone,) = NODE().execute(model, mode="both", gpus="8", ring=2, workers="cpu")
    assert clone is not model and "model_function_wrapper" not in model.model_options
    s = clone.model_options["model_function_wrapper"].settings
    assert (s.cfg, s.ulysses, s.ring, s.use_gpu) == (2, 2, 2, False)
    with pytest.raises(ValueError, match="12 attention heads do not divide among 8 Ulysses ranks"):
        NODE().execute(model, mode="sequence", gpus="8", ring=1, workers="cpu")
    with pytest.raises(ValueError, match="supports ComfyUI's Flux, Wan .*SD3.* HunyuanVideo.* this model is Linear"):
        NODE().execute(_Model(torch.nn.Linear(2, 2)), mode="sequence", gpus="2", workers="cpu")
    (cfg_clone,) = NODE().execute(_Model(torch.nn.Linear(2, 2)), mode="cfg", gpus="2", workers="cpu")  # any model
    assert cfg_clone.model_options["model_function_wrapper"].settings.cfg == 2


def test_example_workflow_uses_the_node_with_valid_inputs():
    workflow = json.loads((REPO / "example_workflows" / "genesis_multigpu_wan_t2v_api.json").read_text())
    nodes = [n for n in workflow.values() if n["class_type"] == "GenesisMultiGPU"]
    assert len(nodes) == 1
    spec = NODE.INPUT_TYPES()
    inputs = nodes[0]["inputs"]
    allowed = {**spec["required"], **spec["optional"]}
    assert set(spec["required"]) <= set(inputs) <= set(allowed)
    for name, value in inputs.items():
        kind = allowed[name][0]
        if isinstance(kind, list):
            assert value in kind, name
    assert mg.degrees(inputs["mode"], int(inputs["gpus"]), inputs["ring"]) == (2, 2, 1)
    sampler = [n for n in workflow.values() if n["class_type"] == "KSampler"][0]
    assert sampler["inputs"]["model"][0] == [k for k, n in workflow.items() if n["class_type"] == "GenesisMultiGPU"][0]
    assert sampler["inputs"]["cfg"] > 1  # cfg branches need CFG > 1


class _Session:
    """Stands in for the workers: records what the wrapper loads and what each call carries."""

    def __init__(self):
        self.model_id, self.pool, self.sent = None, type("Pool", (), {"world_size": 2})(), []

    def load(self, builder, payload, options):
        self.sent.append(("load", dict(options)))

    def call(self, x, t, conds, cond_or_uncond, extras):
        self.sent.append(("call", dict(extras)))
        return x


@pytest.fixture
def workers(monkeypatch):
    cp = __import__(mg.MultiGPUModelFunction.__module__, fromlist=["session_for"])
    session = _Session()
    monkeypatch.setattr(cp, "session_for", lambda settings: session)
    monkeypatch.setattr(cp, "base_model_payload", lambda base_model: {})
    return cp, session


class _Base:
    """Just what the wrapper touches of a ComfyUI BaseModel."""

    diffusion_model = None

    def apply_model(self, *args, **kwargs):
        raise AssertionError("the wrapper must not run the model in the ComfyUI process")


def _levels(wrapper, session, options):
    """The quality level each model call sends, for one call per transformer_options in ``options``."""
    import torch

    x = torch.zeros(2, 1)
    for to in options:
        wrapper(_Base().apply_model, {"input": x, "timestep": torch.zeros(2), "c": {"transformer_options": to},
                                      "cond_or_uncond": [0, 1]})
    return [extras["genesis_quality"] for kind, extras in session.sent if kind == "call"]


def test_the_workers_quality_comes_from_the_node_then_from_an_attention_switch(workers, genesis_log):
    import torch

    cp, session = workers
    node = lambda **kw: NODE().execute(_Model(), mode="cfg", gpus="2", workers="cpu", **kw)[0]  # noqa: E731
    wrapper = node(quality="fast").model_options["model_function_wrapper"]
    assert wrapper.settings.quality == "fast" and _levels(wrapper, session, [{}, {}]) == ["fast", "fast"]
    assert session.sent[0] == ("load", {"backend": "auto", "ring_impl": "ring", "quality": "fast"})
    session.sent.clear()
    assert _levels(node().model_options["model_function_wrapper"], session, [{}]) == ["exact"]  # the default
    session.sent.clear()
    # an explicit lossy backend runs at least at the level it needs, as the Attention Switch does
    assert _levels(node(attention="sage").model_options["model_function_wrapper"], session, [{}]) == ["high"]
    session.sent.clear()
    # a Genesis Attention Switch on the model governs: its quality, its first and last step held at exact
    switch = cp.GenesisAttentionOverride("auto", quality="high", exact_steps=1)
    schedule = torch.linspace(1.0, 0.0, 6)  # 5 steps
    steps = [{"optimized_attention_override": switch, "sample_sigmas": schedule, "sigmas": schedule[i:i + 1]}
             for i in range(5)]
    assert _levels(wrapper, session, steps) == ["exact", "high", "high", "high", "exact"]
    assert any("Attention Switch quality ('high', exact_steps=1)" in m and "does not apply" in m for m in genesis_log)
    with pytest.raises(ValueError, match="input 'quality' must be one of exact, high, fast; got 'best'"):
        node(quality="best")


def test_settings_without_a_quality_take_the_process_default_and_share_a_session(workers):
    cp, session = workers
    settings = cp.ParallelSettings(cfg=2)
    assert settings == cp.ParallelSettings(cfg=2, quality="fast")  # the level travels per call, not per pool
    assert hash(settings) == hash(cp.ParallelSettings(cfg=2, quality="fast"))
    with pytest.raises(ValueError, match="quality must be one of exact, high, fast; got 'fastest'"):
        cp.ParallelSettings(quality="fastest")
    try:
        cp._quality.set_default("high")
        assert _levels(cp.MultiGPUModelFunction(settings), session, [{}]) == ["high"]
    finally:
        cp._quality.set_default(None)


def test_the_workers_raise_the_level_for_an_explicit_lossy_backend_as_the_switch_does():
    from genesis_core.attn import registry
    from genesis_core.interop.comfy_adapter import GenesisAttentionOverride
    from genesis_core.interop.comfy_parallel_attn import level_for

    assert (level_for("sage", "exact"), level_for("sage", "fast"), level_for("auto", None)) == ("high", "fast", None)
    for backend in ["auto", *registry.names()]:
        for quality in (None, "exact", "high", "fast"):
            assert level_for(backend, quality) == GenesisAttentionOverride(backend, quality=quality).middle_level, \
                (backend, quality)
