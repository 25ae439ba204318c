"""Contract tests for every Genesis node, without ComfyUI: the shape ComfyUI reads."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from comfy_helpers import REPO, load_pack

pack = load_pack()

EXPECTED = {
    "GenesisAttentionSwitch", "GenesisBackendSelect", "GenesisCrossAttention", "GenesisAttentionMap",
    "GenesisLatentToTensor", "GenesisTensorToLatent", "GenesisConditioningToTensor", "GenesisTensorInfo",
    "GenesisMultiModalGen", "GenesisRandomTensor",
}
TYPE_NAMES = {"MODEL", "LATENT", "CONDITIONING", "IMAGE", "STRING", "INT", "FLOAT", "BOOLEAN", "TENSOR", "GENESIS_BACKEND"}


def test_every_node_is_mapped():
    assert EXPECTED <= set(pack.NODE_CLASS_MAPPINGS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_node_contract(name):
    cls = pack.NODE_CLASS_MAPPINGS[name]
    assert pack.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Genesis ")
    assert cls.CATEGORY.startswith("genesis/")
    assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert all(t in TYPE_NAMES for t in cls.RETURN_TYPES)
    for attr in ("RETURN_NAMES", "OUTPUT_TOOLTIPS"):
        if hasattr(cls, attr):
            assert len(getattr(cls, attr)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for input_name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, input_name
            kind = entry[0]
            assert isinstance(kind, list) or kind in TYPE_NAMES, (input_name, kind)
            opts = entry[1] if len(entry) > 1 else {}
            assert isinstance(opts.get("tooltip"), str) and opts["tooltip"], f"{name}.{input_name} has no tooltip"
            if isinstance(kind, list):
                assert opts.get("default", kind[0]) in kind
            if kind == "INT":
                assert opts["min"] <= opts["default"] <= opts["max"]


def test_attention_choices_are_the_engine_types():
    cls = pack.NODE_CLASS_MAPPINGS["GenesisAttentionSwitch"]
    choices = cls.INPUT_TYPES()["required"]["attention"][0]
    assert choices == ["auto", "flash", "sage", "xformers", "sdpa", "pytorch"]
    backend = pack.NODE_CLASS_MAPPINGS["GenesisBackendSelect"].INPUT_TYPES()["required"]["backend"][0]
    assert set(backend) == {"auto", "cuda", "rocm", "mps", "npu", "cpu", "onnx", "webgpu"}


def test_importing_the_pack_is_light():
    """A fresh interpreter imports the pack without heavy optional packages or touching CUDA."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        spec = importlib.util.spec_from_file_location("genesis_light", {str(REPO / '__init__.py')!r},
                                                      submodule_search_locations=[{str(REPO)!r}])
        m = importlib.util.module_from_spec(spec); sys.modules["genesis_light"] = m; spec.loader.exec_module(m)
        heavy = [n for n in ("xformers", "flash_attn", "sageattention", "onnxruntime", "triton", "server", "comfy")
                 if n in sys.modules]
        import torch
        print("HEAVY", heavy, "CUDA_INIT", torch.cuda.is_initialized(), "NODES", len(m.NODE_CLASS_MAPPINGS))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY [] CUDA_INIT False" in out.stdout, out.stdout + out.stderr


def test_pack_does_not_shadow_a_top_level_nodes_module():
    assert "nodes" not in sys.modules or not getattr(sys.modules["nodes"], "__file__", "").startswith(str(REPO / "nodes"))
