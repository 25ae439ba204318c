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
