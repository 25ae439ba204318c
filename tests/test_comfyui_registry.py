"""genesis_core.comfyui: the spec's ComfyUINodeInterface / COMFYUI_NODE_REGISTRY / register_comfyui_node."""
from __future__ import annotations

import importlib

import pytest

from comfy_helpers import REPO, load_pack

pack = load_pack()
comfyui = importlib.import_module(pack.__name__ + ".genesis_core.comfyui")
ComfyUINodeInterface = comfyui.ComfyUINodeInterface
register = comfyui.register_comfyui_node
Err = comfyui.ComfyUINodeError


@pytest.fixture
def clean_names():
    names = []
    yield names
    for n in names:
        comfyui.unregister_comfyui_node(n)


def test_spec_example_works_as_written(clean_names):
    clean_names.append("MyCustomNode")

    @register("MyCustomNode")
    class MyNode(ComfyUINodeInterface):
        CATEGORY = "genesis/custom"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"default": ""}), "value": ("INT", {"default": 42})}}

        @classmethod
        def RETURN_TYPES(cls):
            return ("OUTPUT",)

        def execute(self, text, value):
            return (f"{text}: {value}",)

    assert comfyui.COMFYUI_NODE_REGISTRY["MyCustomNode"] is MyNode
    assert MyNode.RETURN_TYPES == ("OUTPUT",)  # a plain tuple, as ComfyUI reads it
    assert isinstance(MyNode.RETURN_TYPES, tuple)
    assert MyNode.FUNCTION == "execute"
    assert getattr(MyNode(), MyNode.FUNCTION)("x", 3) == ("x: 3",)
    assert comfyui.COMFYUI_DISPLAY_NAMES["MyCustomNode"] == "My Custom Node"


def test_spec_import_path_works_as_written():
    """``from genesis.core import ComfyUINodeInterface, register_comfyui_node`` (the pip-style layout)."""
    import sys

    sys.path.insert(0, str(REPO))
    try:
        core = importlib.import_module("genesis.core")
        top = importlib.import_module("genesis_core.comfyui")
    finally:
        sys.path.remove(str(REPO))
    assert core.register_comfyui_node is top.register_comfyui_node
    assert core.COMFYUI_NODE_REGISTRY is top.COMFYUI_NODE_REGISTRY

    @core.register_comfyui_node("MyCustomNodeViaGenesisCore")
    class MyNode(core.ComfyUINodeInterface):
        CATEGORY = "genesis/custom"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"default": ""}), "value": ("INT", {"default": 42})}}

        @classmethod
        def RETURN_TYPES(cls):
            return ("OUTPUT",)

        def execute(self, text, value):
            return (f"{text}: {value}",)

    try:
        assert top.COMFYUI_NODE_REGISTRY["MyCustomNodeViaGenesisCore"] is MyNode
        assert MyNode.RETURN_TYPES == ("OUTPUT",)
    finally:
        top.unregister_comfyui_node("MyCustomNodeViaGenesisCore")


def test_defaults_category_and_function(clean_names):
    clean_names.append("DefaultsNode")

    @register("DefaultsNode")
    class Node(ComfyUINodeInterface):
        RETURN_TYPES = ("INT",)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"a": ("INT",)}}

        def execute(self, a):
            return (a,)

    assert Node.CATEGORY.startswith("genesis/")
    assert Node.FUNCTION == "execute"


def test_plain_class_with_classmethod_return_types_is_normalised(clean_names):
    clean_names.append("PlainNode")

    @register("PlainNode")
    class Plain:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        @classmethod
        def RETURN_TYPES(cls):
            return ["IMAGE", "MASK"]

        def execute(self):
            return (1, 2)

    assert Plain.RETURN_TYPES == ("IMAGE", "MASK")
    assert Plain.CATEGORY == comfyui.DEFAULT_CATEGORY and Plain.FUNCTION == "execute"


def _node(**attrs):
    base = {
        "INPUT_TYPES": classmethod(lambda cls: {"required": {"x": ("INT", {"default": 1})}}),
        "RETURN_TYPES": ("INT",),
        "execute": lambda self, x: (x,),
    }
    base.update(attrs)
    return type("BadNode", (ComfyUINodeInterface,), base)


@pytest.mark.parametrize(
    "attrs,message",
    [
        ({"INPUT_TYPES": classmethod(lambda cls: ["x"])}, "INPUT_TYPES\\(\\) must return a dict"),
        ({"INPUT_TYPES": classmethod(lambda cls: {"needed": {}})}, "sections must be among required"),
        ({"INPUT_TYPES": classmethod(lambda cls: {"required": {"x": "INT"}})}, "input 'x'.*must be a tuple"),
        ({"INPUT_TYPES": classmethod(lambda cls: {"required": {"x": (3,)}})}, "must start with a type name"),
        ({"INPUT_TYPES": classmethod(lambda cls: {"required": {"x": ("INT", 5)}})}, "options that are not a dict"),
        ({"INPUT_TYPES": classmethod(lambda cls: 1 / 0)}, "INPUT_TYPES\\(\\) raised ZeroDivisionError"),
        ({"RETURN_TYPES": "INT"}, "RETURN_TYPES must be a tuple"),
        ({"RETURN_TYPES": ("INT", 3)}, "RETURN_TYPES\\[1\\] must be a type name"),
        ({"RETURN_NAMES": ("a", "b")}, "RETURN_NAMES must be a tuple with one entry per RETURN_TYPES item \\(1\\)"),
        ({"FUNCTION": "run"}, "FUNCTION is 'run' but the class has no callable method"),
        ({"CATEGORY": ""}, "CATEGORY must be a non-empty string"),
    ],
)
def test_bad_nodes_fail_at_registration_with_a_sentence(attrs, message, clean_names):
    clean_names.append("BadNode")
    with pytest.raises(Err, match=message):
        register("BadNode")(_node(**attrs))
    assert "BadNode" not in comfyui.COMFYUI_NODE_REGISTRY


def test_name_clash_is_refused(clean_names):
    clean_names.append("ClashNode")
    register("ClashNode")(_node())

    class Other(ComfyUINodeInterface):
        RETURN_TYPES = ("INT",)

        def execute(self):
            return (1,)

    with pytest.raises(Err, match="already registered"):
        register("ClashNode")(Other)


def test_pack_mappings_come_from_the_registry():
    assert set(pack.NODE_CLASS_MAPPINGS) <= set(comfyui.COMFYUI_NODE_REGISTRY)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert comfyui.COMFYUI_NODE_REGISTRY[name] is cls
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Genesis ")
    assert pack.WEB_DIRECTORY == "./web"
