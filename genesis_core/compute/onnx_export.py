"""Exporting a function to an ONNX graph, and checking that the graph reproduces it.

:func:`export_graph` exports ``fn`` (a function or an ``nn.Module``; captured models included) with
``torch.onnx.export``. Exporter choice: ``"torchscript"`` (the runner's default) is the tracing exporter
(``dynamo=False``): on this project's CPU box it exported a small SDPA cross-attention module in ~0.3 s,
against ~2.75 s for the dynamo exporter, and it needs no ``onnxscript``, which the dynamo exporter requires.
PyTorch 2.13 still ships it (with a deprecation warning that we silence). ``"dynamo"`` uses ``torch.export``;
``"auto"`` tries the tracing exporter and falls back to dynamo when tracing fails or is refused (by the guard,
:mod:`~genesis_core.compute.onnx_guard`, which runs around every tracing export), or the tracer is gone in a
future PyTorch. The graph is exported in the module's current mode (``TrainingMode.PRESERVE``): ONNX computes
what ``fn`` computes now. Captured CPU models become submodules of the export wrapper (:class:`Flat`), so their
weights are initializers; models on another device are traced through CPU replicas
(:class:`~genesis_core.compute.placement.ReplicaMode`).

What an export promises (each point is checked, not assumed):

* **The caller's tensors are not touched by the export.** The trace runs on copies of the inputs. A function
  that modifies its inputs in place gets the eager result; the caller's tensors stay unchanged (logged once:
  an ONNX graph cannot write into its inputs). Captured tensors modified in place during the export's single
  run of ``fn`` are logged, and refused when the graph then disagrees with ``fn`` (:func:`mutations`).
* **A reference to check the graph against.** The outputs ``fn`` returned while being traced are kept (no
  extra call of ``fn``; the runner checks the new session on the export inputs, and that run is the first
  call's result); the dynamo exporter traces fake tensors, so there the reference comes from one eager run
  (:func:`eager_reference`, also the price of a disk hit). :func:`difference` compares: float outputs to
  1e-3 of their largest value (2e-2 for 16-bit types), others exactly. Functions that draw random numbers can
  only be checked for structure.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ._tree import flatten, unflatten
from .onnx_errors import OnnxDataDependentError, OnnxExportError
from .onnx_guard import Guard, judge
from .placement import ReplicaCache, ReplicaMode, ReplicaView


def name_of(fn: Any) -> str:
    """A readable name for a callable (for logs and errors)."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class Flat(nn.Module):
    """Export wrapper: flat tensors in, flat tensors out; remembers the output structure and, with a guard, the
    outputs ``fn`` returned while being traced (the reference the new graph is checked against)."""

    def __init__(self, fn: Any, template: Any, guard: Optional[Guard] = None) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)  # not a submodule: export must not touch its training mode
        object.__setattr__(self, "guard", guard)
        self.template = template
        self.out_template: Any = None
        self.out_meta: List[Tuple[Tuple[int, ...], torch.dtype]] = []
        self.traced: Optional[List[torch.Tensor]] = None

    def forward(self, *flat: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        args, kwargs = unflatten(self.template, list(flat))
        guard = self.guard
        if guard is None:
            result = self.fn(*args, **kwargs)
        else:
            guard.mark_inputs(flat)
            with guard:
                result = self.fn(*args, **kwargs)
        outs, self.out_template = flatten(result)
        self.out_meta = [(tuple(int(s) for s in t.shape), t.dtype) for t in outs]
        if guard is not None:
            self.traced = list(outs)
        return tuple(outs)


_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 2e-2}


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).replace('torch.', '')}{list(t.shape)}"


def difference(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], values: bool = True) -> Optional[str]:
    """None when the graph's outputs ``got`` match fn's ``want``; else a sentence saying where they differ.

    Float outputs may differ by 1e-3 of their largest finite magnitude (2e-2 for 16-bit types), the usual
    kernel-order noise between ONNX Runtime and PyTorch; NaN and infinities must sit in the same places;
    other dtypes must be equal. ``values=False`` compares count, shapes and dtypes only.
    """
    if len(got) != len(want):
        return f"the graph has {len(got)} outputs but the function returned {len(want)} tensors"
    for i, (g, w) in enumerate(zip(got, want)):
        g, w = g.detach().to("cpu"), w.detach().to("cpu")
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            return f"output {i} is {_describe(g)} from the graph but {_describe(w)} from the function"
        if not values or w.numel() == 0:
            continue
        if not (w.is_floating_point() or w.is_complex()):
            bad = int((g != w).sum())
            if bad:
                return f"output {i} differs in {bad} of {w.numel()} elements"
            continue
        gd, wd = g.double(), w.double()
        if not torch.equal(torch.isnan(gd), torch.isnan(wd)):
            return f"output {i} differs: NaN in {int((torch.isnan(gd) ^ torch.isnan(wd)).sum())} places where the " \
                   f"other has a number"
        finite = torch.isfinite(wd)
        if not torch.equal(torch.isfinite(gd), finite) or not torch.equal(gd[torch.isinf(wd)], wd[torch.isinf(wd)]):
            return f"output {i} differs: infinities in different places"
        if finite.any():
            err = (gd[finite] - wd[finite]).abs().max().item()
            scale = wd[finite].abs().max().item()
            tol = _TOLERANCE.get(w.dtype, 1e-3)
            if not err <= tol * scale + tol * 1e-3:
                return f"output {i} differs by up to {err:.3g} (largest magnitude {scale:.3g}, allowed {tol:g} of it)"
    return None


def _cpu_copies(flat: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Detached CPU copies of the inputs: the export and the eager reference never touch the caller's tensors."""
    return tuple(t.detach().to("cpu", copy=True) for t in flat)


def _replica_mode(view: ReplicaView) -> Any:
    """A context in which fn sees the CPU replicas of its models that live on other devices (no-op: none do)."""
    return ReplicaMode(view) if view else contextlib.nullcontext()


def eager_reference(fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                    replicas: ReplicaCache) -> Tuple[List[torch.Tensor], Any, List[str]]:
    """fn's outputs on CPU copies of ``flat``, run the way the export traces it (no grad, CPU replicas of
    models on other devices): ``(outputs, output template, random ops seen)``."""
    example = _cpu_copies(flat)
    guard = Guard()
    wrapper = Flat(fn, template, guard)
    view = replicas.view(modules, torch.device("cpu"))
    with torch.no_grad(), _replica_mode(view):
        outs = list(wrapper(*example))
    return outs, wrapper.out_template, guard.random


def export_graph(fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                 tensors: Sequence[torch.Tensor], choice: str, opset_version: Optional[int],
                 replicas: ReplicaCache) -> Tuple[bytes, Flat, List[torch.Tensor], List[str]]:
    """``(model bytes, wrapper, reference outputs, random ops)``: fn exported from copies of the inputs,
    refused when it turns input data into Python values (tracing), with the outputs fn returned on them.

    ``choice`` is ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (both, in that order); ``tensors`` are the
    other tensors fn can reach (watched, with the models' weights, for in-place changes).
    """
    label = name_of(fn)
    example = _cpu_copies(flat)  # the caller's tensors stay untouched
    view = replicas.view(modules, torch.device("cpu"))
    names = [f"in{i}" for i in range(len(example))]
    order = ["torchscript", "dynamo"] if choice == "auto" else [choice]
    errors: List[str] = []
    refusal: Optional[OnnxDataDependentError] = None
    captured = list(tensors) + [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    for exporter in order:
        pristine = tuple(t.clone() for t in example) if exporter != order[-1] else example
        versions = [t._version for t in pristine]
        captured_versions = [t._version for t in captured]
        try:
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                guard = Guard() if exporter == "torchscript" else None
                wrapper = _wrapper(fn, template, modules, guard)
                with _replica_mode(view):
                    model_bytes = _export_with(exporter, wrapper, pristine, names, opset_version)
            if not wrapper.out_meta:
                raise OnnxExportError(f"{label} returned no tensors; ONNX needs at least one output")
            if guard is not None:
                judge(label, guard, caught)
        except OnnxDataDependentError as exc:
            refusal = exc
            continue
        except OnnxExportError:
            raise
        except Exception as exc:
            text = str(exc)
            text = text if len(text) <= 400 else text[:400] + " ..."
            errors.append(f"{exporter} exporter: {type(exc).__name__}: {text}")
            continue
        wrapper.mutation_hint, wrapper.mutation_notes = mutations(label, pristine, versions, captured,
                                                                  captured_versions)
        if guard is not None:
            reference, random_ops = wrapper.traced or [], guard.random
        else:  # dynamo traced fake tensors: take the reference from one eager run
            reference, _, random_ops = eager_reference(fn, modules, flat, template, replicas)
        return model_bytes, wrapper, reference, random_ops
    if refusal is not None:
        if errors:
            raise OnnxDataDependentError(f"{refusal} (exporter='auto' also tried: {'; '.join(errors)})")
        raise refusal
    raise OnnxExportError(f"could not export {label} to ONNX - " + "; ".join(errors))


def _wrapper(fn: Any, template: Any, modules: List[nn.Module], guard: Optional[Guard]) -> Flat:
    cpu = torch.device("cpu")
    wrapper = Flat(fn, template, guard)
    wrapper.mutation_hint, wrapper.mutation_notes = "", []
    for i, module in enumerate(modules):
        # captured CPU models become submodules so the tracer sees their weights as parameters
        # (initializers); fn still reaches them by its own path. Models on another device are traced
        # through detached CPU replicas instead (see ReplicaMode), which become graph constants.
        if any(t.device != cpu for t in list(module.parameters()) + list(module.buffers())):
            continue
        if module is not fn:
            wrapper.add_module(f"captured{i}", module)
        else:
            wrapper.add_module("fn_module", module)
    return wrapper


def mutations(label: str, inputs: Sequence[torch.Tensor], versions: List[int],
              captured: Sequence[torch.Tensor], captured_versions: List[int]) -> Tuple[str, List[Tuple[Any, str]]]:
    """In-place changes fn made during the export: ``(hint for a failed check, log notes for a good one)``."""
    changed_inputs = [i for i, (t, v) in enumerate(zip(inputs, versions)) if t._version != v]
    changed = [t for t, v in zip(captured, captured_versions) if t._version != v]
    hint, notes = "", []
    if changed_inputs:
        which = ", ".join(str(i) for i in changed_inputs)
        notes.append((("onnx-inplace-input", label),
                      f"ONNX export of {label}: it modifies its input tensor(s) in place (tensor argument(s) "
                      f"{which}, counted from 0); the export ran it on copies, and the ONNX graph returns the "
                      f"values {label} computes but leaves the caller's tensors unchanged (an ONNX graph cannot "
                      f"write into its inputs)"))
    if changed:
        shapes = ", ".join(_describe(t) for t in changed[:4]) + (" ..." if len(changed) > 4 else "")
        notes.append((("onnx-inplace-captured", label),
                      f"ONNX export of {label}: it modified {len(changed)} captured tensor(s) in place ({shapes}) "
                      f"during the export's run; an ONNX graph cannot update state, so calls on this backend "
                      f"leave them as they are now"))
        hint = (f"{label} modified {len(changed)} captured tensor(s) in place ({shapes}) while it was traced, "
                f"which an ONNX graph cannot do. ")
    return hint, notes


def _export_with(exporter: str, wrapper: Flat, example: Tuple[torch.Tensor, ...], names: List[str],
                 opset_version: Optional[int]) -> bytes:
    if exporter == "torchscript":
        buf = io.BytesIO()
        # torch < 2.5 has no `dynamo` argument and always traces; newer ones default to dynamo
        extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(wrapper, example, buf, input_names=names, opset_version=opset_version,
                          do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE, **extra)
        return buf.getvalue()
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("the dynamo exporter needs onnxscript (pip install onnxscript)")
    program = torch.onnx.export(wrapper, example, dynamo=True, input_names=names,
                                opset_version=opset_version)
    return program.model_proto.SerializeToString()
