"""The ComfyUI compatibility interface (spec section 1): a node base class, a registry and a decorator.

This module never imports ComfyUI. It describes nodes the way ComfyUI reads them (class attributes
``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``, ``CATEGORY`` ...) and checks them when they are
registered, so a malformed node fails at import time with a sentence naming what is wrong, not at
the user's first click.

The spec's example writes ``RETURN_TYPES`` as a classmethod; ComfyUI reads ``cls.RETURN_TYPES`` as a
plain tuple. Subclasses of :class:`ComfyUINodeInterface` have such classmethods (``RETURN_TYPES``,
``RETURN_NAMES``, ``OUTPUT_IS_LIST``, ``OUTPUT_TOOLTIPS``) resolved to tuples when the class is created.

Example::

    @register_comfyui_node("MyCustomNode")
    class MyNode(ComfyUINodeInterface):
        CATEGORY = "genesis/custom"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {"default": ""})}}

        @classmethod
        def RETURN_TYPES(cls):
            return ("STRING",)

        def execute(self, text):
            return (text,)
"""
from __future__ import annotations

import re
from typing import Any, Callable, Dict, Optional, Type, TypeVar

from ._log import logger

__all__ = [
    "ComfyUINodeInterface",
    "ComfyUINodeError",
    "COMFYUI_NODE_REGISTRY",
    "COMFYUI_DISPLAY_NAMES",
    "register_comfyui_node",
    "unregister_comfyui_node",
    "validate_node_class",
    "node_class_mappings",
    "node_display_name_mappings",
    "DEFAULT_CATEGORY",
]

DEFAULT_CATEGORY = "genesis/custom"

#: Registered node classes by node name (the key ComfyUI uses in NODE_CLASS_MAPPINGS).
COMFYUI_NODE_REGISTRY: Dict[str, type] = {}
#: Display names by node name (ComfyUI's NODE_DISPLAY_NAME_MAPPINGS).
COMFYUI_DISPLAY_NAMES: Dict[str, str] = {}

_INPUT_SECTIONS = ("required", "optional", "hidden")
# Attributes that ComfyUI reads as plain tuples but that the spec's style may write as classmethods.
_TUPLE_ATTRIBUTES = ("RETURN_TYPES", "RETURN_NAMES", "OUTPUT_IS_LIST", "OUTPUT_TOOLTIPS")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\- ]*$")

T = TypeVar("T", bound=type)


class ComfyUINodeError(ValueError):
    """A node class does not have the shape ComfyUI expects (raised at registration)."""


def _resolve_tuple_attributes(cls: type) -> None:
    """Turn classmethod/staticmethod/function forms of the tuple attributes into real tuples on ``cls``."""
    for attr in _TUPLE_ATTRIBUTES:
        raw = cls.__dict__.get(attr)
        if raw is None:
            continue
        if isinstance(raw, (classmethod, staticmethod)) or callable(raw):
            value = getattr(cls, attr)  # bound classmethod / staticmethod / function
            try:
                result = value() if callable(value) else value
            except TypeError as exc:
                raise ComfyUINodeError(
                    f"{cls.__name__}.{attr} must be a tuple or a classmethod returning one; calling it failed: {exc}"
                ) from exc
            if isinstance(result, list):
                result = tuple(result)
            setattr(cls, attr, result)


class ComfyUINodeInterface:
    """Base for ComfyUI-style nodes.

    Subclasses define ``INPUT_TYPES`` (classmethod returning ``{"required": {...}, "optional": {...}}``),
    ``RETURN_TYPES`` (a tuple of type names, or a classmethod returning one) and ``execute`` (the default
    ``FUNCTION``). ``CATEGORY`` defaults to ``"genesis/custom"``. ``DESCRIPTION`` is shown by ComfyUI as
    the node's help text.

    This is an interface only: it does not implement ComfyUI's execution, caching or UI.
    """

    FUNCTION: str = "execute"
    CATEGORY: str = DEFAULT_CATEGORY
    RETURN_TYPES: tuple = ()
    DESCRIPTION: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _resolve_tuple_attributes(cls)

    @classmethod
    def INPUT_TYPES(cls) -> Dict[str, Dict[str, tuple]]:  # noqa: N802 (ComfyUI's name)
        """The node's inputs: ``{"required": {name: (TYPE, {options})}, "optional": {...}}``."""
        return {"required": {}}

    def execute(self, *args: Any, **kwargs: Any) -> tuple:
        """Run the node; return a tuple with one entry per ``RETURN_TYPES`` item."""
        raise NotImplementedError(f"{type(self).__name__} must implement execute()")


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_input_spec(node: str, section: str, name: Any, spec: Any) -> None:
    where = f"{node}: input {name!r} in INPUT_TYPES()[{section!r}]"
    if not isinstance(name, str) or not name:
        raise ComfyUINodeError(f"{node}: INPUT_TYPES()[{section!r}] keys must be non-empty strings; got {name!r}")
    if not isinstance(spec, tuple) or not spec:
        raise ComfyUINodeError(f"{where} must be a tuple (TYPE,) or (TYPE, {{options}}); got {_describe(spec)}")
    kind = spec[0]
    if isinstance(kind, (list, tuple)):
        if not all(isinstance(c, (str, int, float, bool)) for c in kind):
            raise ComfyUINodeError(f"{where} is a choice list, so its entries must be strings or numbers; got {_describe(kind)}")
    elif not isinstance(kind, str) or not kind:
        raise ComfyUINodeError(f"{where} must start with a type name (a string like 'INT') or a list of choices; got {_describe(kind)}")
    if len(spec) > 1 and not isinstance(spec[1], dict):
        raise ComfyUINodeError(f"{where} has options that are not a dict; got {_describe(spec[1])}")
    if len(spec) > 2:
        raise ComfyUINodeError(f"{where} must have at most 2 entries (TYPE, options); got {len(spec)}")


def validate_node_class(cls: type, name: Optional[str] = None) -> None:
    """Check that ``cls`` has the shape ComfyUI expects; raise :class:`ComfyUINodeError` naming the problem.

    Checks: ``INPUT_TYPES`` is a classmethod returning a dict with only ``required``/``optional``/``hidden``
    sections of ``name -> (TYPE, {options})``; ``RETURN_TYPES`` is a tuple of type names; ``RETURN_NAMES``,
    ``OUTPUT_IS_LIST`` and ``OUTPUT_TOOLTIPS`` (when present) match it in length; ``FUNCTION`` names a
    callable; ``CATEGORY`` is a non-empty string.
    """
    node = name or getattr(cls, "__name__", repr(cls))
    if not isinstance(cls, type):
        raise ComfyUINodeError(f"{node}: a node must be a class; got {_describe(cls)}")

    input_types = getattr(cls, "INPUT_TYPES", None)
    if not callable(input_types):
        raise ComfyUINodeError(f"{node}: INPUT_TYPES must be a classmethod returning a dict; got {_describe(input_types)}")
    try:
        inputs = input_types()
    except Exception as exc:  # the node's own code failed: say so, with the cause
        raise ComfyUINodeError(f"{node}: INPUT_TYPES() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(inputs, dict):
        raise ComfyUINodeError(f"{node}: INPUT_TYPES() must return a dict like {{'required': {{...}}}}; got {_describe(inputs)}")
    unknown = [k for k in inputs if k not in _INPUT_SECTIONS]
    if unknown:
        raise ComfyUINodeError(
            f"{node}: INPUT_TYPES() sections must be among {', '.join(_INPUT_SECTIONS)}; got {', '.join(map(repr, unknown))}"
        )
    for section, entries in inputs.items():
        if not isinstance(entries, dict):
            raise ComfyUINodeError(f"{node}: INPUT_TYPES()[{section!r}] must be a dict of name -> (TYPE, options); got {_describe(entries)}")
        if section == "hidden":
            continue  # hidden inputs are (or name) special strings like "PROMPT"; ComfyUI accepts several forms
        for input_name, spec in entries.items():
            _check_input_spec(node, section, input_name, spec)

    returns = getattr(cls, "RETURN_TYPES", None)
    if callable(returns):  # a class not derived from the interface, with a classmethod RETURN_TYPES
        _resolve_tuple_attributes(cls)
        returns = getattr(cls, "RETURN_TYPES", None)
    if isinstance(returns, list):
        returns = tuple(returns)
        cls.RETURN_TYPES = returns
    if not isinstance(returns, tuple):
        raise ComfyUINodeError(f"{node}: RETURN_TYPES must be a tuple of type names like ('IMAGE',); got {_describe(returns)}")
    for i, rtype in enumerate(returns):
        ok = (isinstance(rtype, str) and rtype) or (isinstance(rtype, list) and all(isinstance(c, str) for c in rtype))
        if not ok:
            raise ComfyUINodeError(f"{node}: RETURN_TYPES[{i}] must be a type name string; got {_describe(rtype)}")
    for attr in ("RETURN_NAMES", "OUTPUT_IS_LIST", "OUTPUT_TOOLTIPS"):
        value = getattr(cls, attr, None)
        if value is None:
            continue
        if not isinstance(value, (tuple, list)) or len(value) != len(returns):
            raise ComfyUINodeError(
                f"{node}: {attr} must be a tuple with one entry per RETURN_TYPES item ({len(returns)}); got {_describe(value)}"
            )

    function = getattr(cls, "FUNCTION", None)
    if not isinstance(function, str) or not function:
        raise ComfyUINodeError(f"{node}: FUNCTION must name the method to run (a string such as 'execute'); got {_describe(function)}")
    if not callable(getattr(cls, function, None)):
        raise ComfyUINodeError(f"{node}: FUNCTION is {function!r} but the class has no callable method of that name")

    category = getattr(cls, "CATEGORY", None)
    if not isinstance(category, str) or not category:
        raise ComfyUINodeError(f"{node}: CATEGORY must be a non-empty string like 'genesis/attention'; got {_describe(category)}")


def _default_display_name(name: str) -> str:
    """``GenesisAttentionSwitch`` -> ``Genesis Attention Switch``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
    return spaced.replace("_", " ").strip()


def register_comfyui_node(name: Optional[str] = None, display_name: Optional[str] = None) -> Callable[[T], T]:
    """Class decorator: validate a node class and add it to :data:`COMFYUI_NODE_REGISTRY` under ``name``.

    ``name`` defaults to the class name; ``display_name`` to the class's ``DISPLAY_NAME`` attribute or
    the name split into words. Classes without a ``CATEGORY`` of their own get ``"genesis/custom"`` and
    classes without ``FUNCTION`` get ``"execute"``. Registering a different class under a name that is
    taken raises :class:`ComfyUINodeError`; re-registering the same class (a module reload) replaces it.

    Raises:
        ComfyUINodeError: the class does not have the shape ComfyUI expects (the message says what).
    """
    if isinstance(name, type):  # used bare: @register_comfyui_node
        return register_comfyui_node()(name)  # type: ignore[return-value]
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
        raise ComfyUINodeError(f"register_comfyui_node name must be a non-empty identifier-like string; got {name!r}")

    def decorator(cls: T) -> T:
        node_name = name or cls.__name__
        if not isinstance(cls, type):
            raise ComfyUINodeError(f"{node_name}: register_comfyui_node decorates classes; got {_describe(cls)}")
        if not isinstance(getattr(cls, "CATEGORY", None), str):
            cls.CATEGORY = DEFAULT_CATEGORY  # type: ignore[attr-defined]
        if getattr(cls, "FUNCTION", None) is None:
            cls.FUNCTION = "execute"  # type: ignore[attr-defined]
        validate_node_class(cls, node_name)
        existing = COMFYUI_NODE_REGISTRY.get(node_name)
        if existing is not None and existing is not cls:
            if existing.__qualname__ != cls.__qualname__ or existing.__module__.split(".")[-1] != cls.__module__.split(".")[-1]:
                raise ComfyUINodeError(
                    f"node name {node_name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                    f"pick another name for {cls.__module__}.{cls.__qualname__}"
                )
            logger.debug("re-registering node %s (module reloaded)", node_name)
        COMFYUI_NODE_REGISTRY[node_name] = cls
        COMFYUI_DISPLAY_NAMES[node_name] = display_name or getattr(cls, "DISPLAY_NAME", None) or _default_display_name(node_name)
        return cls

    return decorator


def unregister_comfyui_node(name: str) -> None:
    """Remove ``name`` from the registry (no error if it is not there)."""
    COMFYUI_NODE_REGISTRY.pop(name, None)
    COMFYUI_DISPLAY_NAMES.pop(name, None)


def node_class_mappings(prefix: Optional[str] = None) -> Dict[str, type]:
    """A copy of the registry for ComfyUI's ``NODE_CLASS_MAPPINGS`` (only names starting with ``prefix`` if given)."""
    return {k: v for k, v in COMFYUI_NODE_REGISTRY.items() if prefix is None or k.startswith(prefix)}


def node_display_name_mappings(prefix: Optional[str] = None) -> Dict[str, str]:
    """Display names for ComfyUI's ``NODE_DISPLAY_NAME_MAPPINGS`` (only names starting with ``prefix`` if given)."""
    return {k: v for k, v in COMFYUI_DISPLAY_NAMES.items() if prefix is None or k.startswith(prefix)}
