"""Walking nested arguments: tensors inside lists, tuples (named too) and dicts.

Small on purpose (no private torch pytree API): map, flatten to a list of tensors plus a template, and
rebuild from the template.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch


def _rebuild_tuple(obj: tuple, items: list) -> tuple:
    if hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*items)
    return type(obj)(items) if type(obj) is not tuple else tuple(items)


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """Apply ``fn`` to every tensor in a nested list/tuple/dict structure; other leaves are kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, list):
        return [map_tensors(x, fn) for x in obj]
    if isinstance(obj, tuple):
        return _rebuild_tuple(obj, [map_tensors(x, fn) for x in obj])
    if isinstance(obj, dict):
        items = {k: map_tensors(v, fn) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:  # OrderedDict and friends keep their type; exotic constructors fall back to dict
            return type(obj)(items)
        except TypeError:
            return items
    return obj


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested structure, depth first, in argument order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from iter_tensors(x)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor in a nested structure, or None."""
    return next(iter_tensors(obj), None)


class Slot:
    """Placeholder for the i-th tensor in a flattened structure."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"Slot({self.index})"


def flatten(obj: Any) -> Tuple[List[torch.Tensor], Any]:
    """``(tensors, template)``: the template is ``obj`` with each tensor replaced by a :class:`Slot`."""
    tensors: List[torch.Tensor] = []

    def take(t: torch.Tensor) -> Slot:
        tensors.append(t)
        return Slot(len(tensors) - 1)

    return tensors, map_tensors(obj, take)


def unflatten(template: Any, tensors: List[Any]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(template, Slot):
        return tensors[template.index]
    if isinstance(template, list):
        return [unflatten(x, tensors) for x in template]
    if isinstance(template, tuple):
        return _rebuild_tuple(template, [unflatten(x, tensors) for x in template])
    if isinstance(template, dict):
        return {k: unflatten(v, tensors) for k, v in template.items()}
    return template
