"""Running a PyTorch function in ONNX Runtime: export once per input signature, cache the session, bind I/O.

:class:`OnnxRunner` backs the executor's ONNX and WEBGPU backends. On the first call for a given
``(fn, input shapes and dtypes, non-tensor arguments, weights)`` it exports ``fn`` (a function or an
``nn.Module``; captured models included) with ``torch.onnx.export`` and builds an
``onnxruntime.InferenceSession``; later calls with the same signature reuse the session without exporting.

Exporter choice. ``exporter="torchscript"`` (default) is the tracing exporter (``dynamo=False``): on this
project's CPU box it exported a small SDPA cross-attention module in ~0.3 s, against ~2.75 s for the dynamo
exporter, and it needs no ``onnxscript``, which the dynamo exporter requires. PyTorch 2.13 still ships it
(with a deprecation warning that we silence). ``"dynamo"`` uses ``torch.export``; ``"auto"`` tries the
tracing exporter and falls back to dynamo when tracing fails (or the tracer is gone in a future PyTorch).
Tracing bakes Python control flow and non-tensor arguments into the graph, which is why they are part of
the cache key; its TracerWarnings are logged once.

The graph is exported in the module's current mode (``TrainingMode.PRESERVE``): ONNX computes what ``fn``
computes now. Weights, and any other tensor ``fn`` can reach (closure cells, defaults, attributes of
captured objects, globals; see :func:`~genesis_core.compute.placement.reach`), are constants of the graph,
so the in-memory key fingerprints them (identity, version counter, data pointer, shape, dtype): a tensor
changed in place or an attribute re-pointed to a new tensor gives a new export rather than stale numbers.
What the walk cannot key (too deep, tensors without a storage pointer) is logged once as baked in.

I/O. Inputs are bound by pointer (``IOBinding``) from contiguous torch tensors on the runner's device, and
outputs are written straight into preallocated torch tensors (their shapes are known from the trace), so
CPU and CUDA calls copy nothing. Providers without pointer binding (WebGPU, DirectML, ...) go through
numpy.

Disk cache (opt-in, ``cache_dir=``): ``<cache_dir>/<name>-<sha256>.onnx`` plus a JSON sidecar describing the
outputs; the hash covers fn's code, the classes and architecture of captured models, the *contents* of their
weights and of every other reachable tensor, simple captured constants (closure cells, defaults, partial
arguments), the input signature, opset, exporter and torch version. Non-tensor state hidden in other
captured objects is not covered: clear the folder when such state changes.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import os
import threading
import time
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._log import log_once, logger
from ._tree import Slot, flatten, unflatten
from .placement import ReplicaCache, ReplicaMode, callable_key, reach, tensor_fingerprint, weights_fingerprint

EXPORTERS = ("torchscript", "dynamo", "auto")

_TORCH_TO_NUMPY = {
    torch.float32: "float32", torch.float16: "float16", torch.float64: "float64", torch.int64: "int64",
    torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool",
}
_ORT_TYPE_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int16)": torch.int16,
    "tensor(int8)": torch.int8, "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool,
    "tensor(bfloat16)": torch.bfloat16,
}
# providers whose memory torch can point at directly, and the torch device type they use
_BINDABLE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


class OnnxExportError(RuntimeError):
    """``fn`` could not be exported to ONNX (the message names the exporter and the cause)."""


def _template_key(template: Any) -> Any:
    """Hashable form of an argument template (tensors already replaced by Slots)."""
    if isinstance(template, Slot):
        return ("T", template.index)
    if isinstance(template, list):
        return ("L",) + tuple(_template_key(x) for x in template)
    if isinstance(template, tuple):
        return ("U", type(template).__qualname__) + tuple(_template_key(x) for x in template)
    if isinstance(template, dict):
        return ("D",) + tuple((k, _template_key(v)) for k, v in template.items())
    try:
        hash(template)
    except TypeError:
        raise TypeError(f"non-tensor arguments of a function run on ONNX are baked into the graph and must be "
                        f"hashable; got {type(template).__name__}") from None
    return ("V", type(template).__qualname__, template)


def _json_template(template: Any) -> Any:
    if isinstance(template, Slot):
        return {"slot": template.index}
    if isinstance(template, list):
        return {"list": [_json_template(x) for x in template]}
    if isinstance(template, tuple):
        return {"tuple": [_json_template(x) for x in template]}
    if isinstance(template, dict) and all(isinstance(k, str) for k in template):
        return {"dict": {k: _json_template(v) for k, v in template.items()}}
    if template is None or isinstance(template, (bool, int, float, str)):
        return {"value": template}
    raise TypeError(f"cannot store {type(template).__name__} in the ONNX cache sidecar")


def _from_json_template(obj: Dict[str, Any]) -> Any:
    if "slot" in obj:
        return Slot(obj["slot"])
    if "list" in obj:
        return [_from_json_template(x) for x in obj["list"]]
    if "tuple" in obj:
        return tuple(_from_json_template(x) for x in obj["tuple"])
    if "dict" in obj:
        return {k: _from_json_template(v) for k, v in obj["dict"].items()}
    return obj["value"]


def _hash_code(h: "hashlib._Hash", code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _hash_code(h, const)
        else:
            h.update(repr(const).encode())


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    h.update(str((tuple(t.shape), t.dtype)).encode())
    try:
        data = t.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        h.update(data.numpy().tobytes())
    except Exception as exc:  # noqa: BLE001 - sparse/nested/subclass tensors: type and shape only (logged)
        h.update(f"unreadable:{type(t).__qualname__}:{type(exc).__name__}".encode())


def _hash_captured(h: "hashlib._Hash", value: Any) -> None:
    """Simple constants by value; anything else by type (its tensors are hashed by content elsewhere)."""
    if value is None or isinstance(value, (bool, int, float, str, tuple)):
        h.update(repr(value).encode())
    elif isinstance(value, torch.Tensor):
        _hash_tensor(h, value)
    else:
        h.update(type(value).__qualname__.encode())


def _disk_key(fn: Any, modules: List[nn.Module], signature: Any, extra: Tuple[Any, ...],
              tensors: Sequence[torch.Tensor] = ()) -> Tuple[str, str]:
    """``(readable name, sha256 hex)`` that is stable across processes.

    Covers fn's code, what its closure cells, defaults and partial arguments hold (constants by value,
    other objects by type), the captured models (class, architecture, forward code, mode, weight contents),
    the contents of every other reachable tensor (``tensors``, in walk order), the signature and ``extra``.
    """
    h = hashlib.sha256()
    target = fn.forward if isinstance(fn, nn.Module) else fn
    partial_parts: List[Any] = []
    if isinstance(target, functools.partial):
        partial_parts = list(target.args) + sorted((target.keywords or {}).items())
        target = target.func
    inner = getattr(target, "__func__", target)  # bound method
    name = getattr(inner, "__qualname__", type(fn).__name__)
    h.update(f"{getattr(inner, '__module__', '')}.{name}".encode())
    code = getattr(inner, "__code__", None)
    if code is not None:
        _hash_code(h, code)
    for cell in getattr(inner, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        _hash_captured(h, value)
    h.update(b"defaults")
    for value in getattr(inner, "__defaults__", None) or ():
        _hash_captured(h, value)
    for kw, value in sorted((getattr(inner, "__kwdefaults__", None) or {}).items()):
        h.update(kw.encode())
        _hash_captured(h, value)
    h.update(b"partial")
    for value in partial_parts:
        _hash_captured(h, value)
    for m in modules:
        h.update(f"{type(m).__module__}.{type(m).__qualname__}".encode())
        h.update(repr(m).encode())
        fwd = getattr(type(m).forward, "__code__", None)
        if fwd is not None:
            _hash_code(h, fwd)
        h.update(str(m.training).encode())
        for pname, t in list(m.named_parameters()) + list(m.named_buffers()):
            h.update(pname.encode())
            _hash_tensor(h, t)
    h.update(b"tensors")
    for t in tensors:
        _hash_tensor(h, t)
    h.update(repr(signature).encode())
    h.update(repr(extra).encode())
    h.update(torch.__version__.encode())
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:60]
    return safe, h.hexdigest()


def name_of(fn: Any) -> str:
    """A readable name for a callable (for logs and errors)."""
    return getattr(fn, "__qualname__", None) or type(fn).__name__


class _Flat(nn.Module):
    """Export wrapper: flat tensors in, flat tensors out; remembers the output structure."""

    def __init__(self, fn: Any, template: Any) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)  # not a submodule: export must not touch its training mode
        self.template = template
        self.out_template: Any = None
        self.out_meta: List[Tuple[Tuple[int, ...], torch.dtype]] = []

    def forward(self, *flat: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        args, kwargs = unflatten(self.template, list(flat))
        outs, self.out_template = flatten(self.fn(*args, **kwargs))
        self.out_meta = [(tuple(int(s) for s in t.shape), t.dtype) for t in outs]
        return tuple(outs)


@dataclass
class _Compiled:
    session: Any
    input_index: List[Tuple[str, int]]  # (session input name, index into the flat inputs)
    output_names: List[str]
    out_template: Any
    out_meta: List[Tuple[Tuple[int, ...], torch.dtype]]
    keepalive: Tuple[Any, ...] = ()
    source: str = "export"
    bindable: bool = True


@dataclass
class OnnxStats:
    """Counters one runner keeps (thread-safe updates under the runner's lock)."""

    exports: int = 0
    export_s: float = 0.0
    disk_hits: int = 0
    session_hits: int = 0
    sessions: int = 0
    last_export_s: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


def default_device_for(providers: Sequence[Union[str, Tuple[str, Dict[str, Any]]]],
                       provider_options: Optional[Sequence[Dict[str, Any]]] = None) -> torch.device:
    """Where torch tensors should live for the first provider: ``cuda:<device_id>`` for CUDA/TensorRT, else CPU."""
    if not providers:
        return torch.device("cpu")
    first = providers[0]
    name = first[0] if isinstance(first, tuple) else first
    opts = first[1] if isinstance(first, tuple) else (provider_options[0] if provider_options else {}) or {}
    if _BINDABLE.get(name) == "cuda":
        return torch.device("cuda", int(opts.get("device_id", 0)))
    return torch.device("cpu")


class OnnxRunner:
    """Exports functions, caches ONNX Runtime sessions, runs them on torch tensors.

    Args:
        providers: ONNX Runtime execution providers in priority order (names, or ``(name, options)``).
        provider_options: per-provider option dicts, parallel to ``providers`` (when given as names).
        device: torch device for inputs/outputs; default from the first provider (CUDA EP → ``cuda:<id>``).
        cache_dir: keep exported ``.onnx`` files here and reuse them across processes (optional).
        opset_version: ONNX opset (default: the exporter's own default).
        exporter: ``"torchscript"`` (default), ``"dynamo"`` or ``"auto"`` (see module docstring).
        max_sessions: in-memory LRU size.
        log_severity: ONNX Runtime log level (3 = errors only).
        session_config: extra ``SessionOptions`` config entries. Default turns intra-op spinning off:
            ONNX Runtime's threads otherwise busy-wait after each run and steal the cores PyTorch work
            running beside them needs (measured on a 2-core box: a PyTorch cross-attention interleaved
            with ORT calls went from 5.6 ms to 9.8 ms with spinning on; ORT's own latency barely moved).
    """

    _genesis_opaque = True  # model discovery does not search runners (their caches hold other models)

    def __init__(self, providers: Sequence[Union[str, Tuple[str, Dict[str, Any]]]] = ("CPUExecutionProvider",),
                 provider_options: Optional[Sequence[Dict[str, Any]]] = None,
                 device: Optional[torch.device] = None, cache_dir: Optional[Union[str, os.PathLike]] = None,
                 opset_version: Optional[int] = None, exporter: str = "torchscript", max_sessions: int = 32,
                 log_severity: int = 3, session_config: Optional[Dict[str, str]] = None) -> None:
        if exporter not in EXPORTERS:
            raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}; got {exporter!r}")
        if int(max_sessions) < 1:
            raise ValueError(f"max_sessions must be >= 1; got {max_sessions}")
        self.providers = list(providers)
        self.provider_options = list(provider_options) if provider_options is not None else None
        self.device = torch.device(device) if device is not None else default_device_for(self.providers,
                                                                                       self.provider_options)
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.opset_version = opset_version
        self.exporter = exporter
        self.max_sessions = int(max_sessions)
        self.log_severity = int(log_severity)
        self.session_config = {"session.intra_op.allow_spinning": "0", **(session_config or {})}
        self.stats = OnnxStats()
        self._sessions: "OrderedDict[Any, _Compiled]" = OrderedDict()
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._replicas = ReplicaCache()
        first = self.providers[0] if self.providers else "CPUExecutionProvider"
        first_name = first[0] if isinstance(first, tuple) else first
        self._bind_device_type = _BINDABLE.get(first_name)
        if self._bind_device_type is not None and self._bind_device_type != self.device.type:
            self._bind_device_type = None

    # -- public -------------------------------------------------------------------------------------
    def run(self, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)`` in ONNX Runtime; outputs are torch tensors on ``self.device``."""
        flat, template = flatten((tuple(args), dict(kwargs)))
        compiled = self.compiled_for(fn, flat, template)
        outs = self._run_session(compiled, flat)
        return unflatten(compiled.out_template, outs)

    def clear(self) -> None:
        """Drop every cached session (files in ``cache_dir`` stay)."""
        with self._lock:
            self._sessions.clear()
            self.stats.sessions = 0

    # -- sessions -----------------------------------------------------------------------------------
    def compiled_for(self, fn: Any, flat: List[torch.Tensor], template: Any) -> _Compiled:
        """The cached session for this call signature, exporting on a miss.

        The key holds fn's identity, the input signature, the captured models' weights fingerprint and a
        fingerprint of every other tensor fn can reach (closure cells, defaults, attributes of captured
        objects, globals): tracing bakes those into the graph as constants, so modifying one in place or
        re-pointing an attribute to a new tensor must give a new export, not the old numbers.
        """
        fkey, keep = callable_key(fn)
        found = reach(fn)
        modules = found.modules
        tensors_fp, unkeyable = tensor_fingerprint(found.tensors)
        signature = (tuple((tuple(t.shape), t.dtype) for t in flat), _template_key(template))
        key = (fkey, signature, weights_fingerprint(modules), tensors_fp)
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None:
                self._sessions.move_to_end(key)
                self.stats.session_hits += 1
                return hit
        with self._export_lock:  # exports are rare; one at a time, and never twice for one key
            with self._lock:
                hit = self._sessions.get(key)
                if hit is not None:
                    self.stats.session_hits += 1
                    return hit
            label = name_of(fn)
            for what in unkeyable:
                log_once(("onnx-unkeyed-tensor", label, what),
                         f"ONNX export of {label}: a captured tensor ({what}) cannot be fingerprinted; its current "
                         f"value is baked into the exported graph and later changes to it are not seen "
                         f"(runner.clear() forces a new export)")
            for what in found.unkeyed:
                log_once(("onnx-unkeyed", label, what),
                         f"ONNX export of {label}: the cache key does not look into {what}; tensors there are baked "
                         f"into the exported graph and later changes to them are not seen (runner.clear() forces "
                         f"a new export)", level=20)
            compiled = self._load_or_export(fn, modules, flat, template, signature, found.tensors)
            # the key holds ids: keep those objects (and the reachable tensors) alive while the entry lives,
            # so a new object cannot reuse an id and hit a stale session
            compiled.keepalive = keep + tuple(found.tensors)
            with self._lock:
                self._sessions[key] = compiled
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
                self.stats.sessions = len(self._sessions)
            return compiled

    def _session(self, model: Union[bytes, str]) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = self.log_severity
        for key, value in self.session_config.items():
            so.add_session_config_entry(key, str(value))
        kwargs: Dict[str, Any] = {"providers": self.providers}
        if self.provider_options is not None:
            kwargs["provider_options"] = self.provider_options
        session = ort.InferenceSession(model, sess_options=so, **kwargs)
        active = session.get_providers()
        with self._lock:
            self.stats.extra["active_providers"] = active
        wanted = self.providers[0][0] if isinstance(self.providers[0], tuple) else self.providers[0]
        if active and active[0] != wanted:
            log_once(("onnx-provider-fallback", wanted), f"ONNX Runtime could not start {wanted}; this session "
                                                         f"runs on {', '.join(active)}")
        return session

    def _load_or_export(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                        signature: Any, tensors: Sequence[torch.Tensor] = ()) -> _Compiled:
        paths = None
        if self.cache_dir is not None:
            name, digest = _disk_key(fn, modules, signature, (self.opset_version, self.exporter), tensors)
            base = os.path.join(self.cache_dir, f"{name}-{digest[:24]}")
            paths = (base + ".onnx", base + ".json")
            if os.path.exists(paths[0]) and os.path.exists(paths[1]):
                try:
                    with open(paths[1], "r", encoding="utf-8") as fh:
                        meta = json.load(fh)
                    out_meta = [(tuple(s), getattr(torch, d)) for s, d in meta["out_meta"]]
                    compiled = self._compile(self._session(paths[0]), len(flat), meta["out_template"], out_meta,
                                             "disk")
                    with self._lock:
                        self.stats.disk_hits += 1
                    return compiled
                except Exception as exc:  # a corrupt cache file is rebuilt, never fatal
                    log_once(("onnx-cache-corrupt", paths[0]),
                             f"ignoring unreadable ONNX cache entry {paths[0]} ({type(exc).__name__}: {exc})")
        t0 = time.perf_counter()
        model_bytes, wrapper = self._export(fn, modules, flat, template)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.exports += 1
            self.stats.export_s += dt
            self.stats.last_export_s = dt
        logger.debug("exported %s to ONNX in %.3f s", name_of(fn), dt)
        try:
            out_template_json = _json_template(wrapper.out_template)
        except TypeError:
            out_template_json = None
        compiled = self._compile(self._session(model_bytes), len(flat), out_template_json, wrapper.out_meta,
                                 "export", raw_template=wrapper.out_template)
        if paths is not None and out_template_json is not None:
            self._write_cache(paths, model_bytes, out_template_json, wrapper.out_meta)
        elif paths is not None:
            log_once(("onnx-cache-template", paths[0]), "the function's outputs hold values that cannot be "
                                                        "stored in the ONNX disk cache; caching in memory only")
        return compiled

    def _write_cache(self, paths: Tuple[str, str], model_bytes: bytes, out_template_json: Any,
                     out_meta: List[Tuple[Tuple[int, ...], torch.dtype]]) -> None:
        try:
            os.makedirs(self.cache_dir, exist_ok=True)
            meta = {"out_template": out_template_json,
                    "out_meta": [[list(s), str(d).replace("torch.", "")] for s, d in out_meta]}
            for path, data in ((paths[0], model_bytes), (paths[1], json.dumps(meta).encode())):
                tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
        except OSError as exc:
            log_once(("onnx-cache-write", self.cache_dir), f"could not write the ONNX cache in {self.cache_dir}: {exc}")

    def _compile(self, session: Any, n_inputs: int, out_template_json: Any,
                 out_meta: List[Tuple[Tuple[int, ...], torch.dtype]], source: str,
                 raw_template: Any = None) -> _Compiled:
        input_index = []
        for inp in session.get_inputs():
            if not inp.name.startswith("in") or not inp.name[2:].isdigit() or int(inp.name[2:]) >= n_inputs:
                raise OnnxExportError(f"unexpected ONNX graph input {inp.name!r} (expected in0..in{n_inputs - 1})")
            input_index.append((inp.name, int(inp.name[2:])))
        outputs = session.get_outputs()
        if len(outputs) != len(out_meta):
            raise OnnxExportError(f"the ONNX graph has {len(outputs)} outputs but the function returned "
                                  f"{len(out_meta)} tensors")
        first = self.providers[0][0] if isinstance(self.providers[0], tuple) else self.providers[0]
        bindable = self._bind_device_type is not None and session.get_providers()[:1] == [first] and all(
            _ORT_TYPE_TO_TORCH.get(o.type) == dtype and dtype in _TORCH_TO_NUMPY and all(shape)
            for o, (shape, dtype) in zip(outputs, out_meta))
        template = raw_template if raw_template is not None else _from_json_template(out_template_json)
        return _Compiled(session, input_index, [o.name for o in outputs], template, list(out_meta),
                         source=source, bindable=bindable)

    def _export(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any
                ) -> Tuple[bytes, _Flat]:
        cpu = torch.device("cpu")
        example = tuple(t.detach().to(cpu) for t in flat)
        view = self._replicas.view(modules, cpu)
        wrapper = _Flat(fn, template)
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
        names = [f"in{i}" for i in range(len(example))]
        order = ["torchscript", "dynamo"] if self.exporter == "auto" else [self.exporter]
        errors = []
        for exporter in order:
            try:
                with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    mode = ReplicaMode(view) if view else None
                    if mode is not None:
                        mode.__enter__()
                    try:
                        model_bytes = self._export_with(exporter, wrapper, example, names)
                    finally:
                        if mode is not None:
                            mode.__exit__(None, None, None)
                for w in caught:
                    if issubclass(w.category, torch.jit.TracerWarning):
                        # shapes are part of the cache key, so tensor->int conversions of sizes are
                        # harmless (debug); a tensor->bool conversion is either a shape check (harmless)
                        # or a data-dependent branch that the graph freezes: say so once (info)
                        if "boolean" in str(w.message):
                            log_once(("onnx-tracer-bool", name_of(fn)),
                                     f"ONNX export of {name_of(fn)}: a tensor was used as a Python bool; the graph "
                                     f"keeps the branch taken for these inputs (fine for shape checks, wrong for "
                                     f"data-dependent branches) - {w.filename}:{w.lineno}", level=20)
                        else:
                            log_once(("onnx-tracer", str(w.message)), f"ONNX export of {name_of(fn)}: {w.message}",
                                     level=10)
                if not wrapper.out_meta:
                    raise OnnxExportError("the function returned no tensors; ONNX needs at least one output")
                return model_bytes, wrapper
            except OnnxExportError:
                raise
            except Exception as exc:
                text = str(exc)
                text = text if len(text) <= 400 else text[:400] + " ..."
                errors.append(f"{exporter} exporter: {type(exc).__name__}: {text}")
        raise OnnxExportError("could not export the function to ONNX - " + "; ".join(errors))

    def _export_with(self, exporter: str, wrapper: _Flat, example: Tuple[torch.Tensor, ...],
                     names: List[str]) -> bytes:
        if exporter == "torchscript":
            buf = io.BytesIO()
            # torch < 2.5 has no `dynamo` argument and always traces; newer ones default to dynamo
            extra = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            torch.onnx.export(wrapper, example, buf, input_names=names, opset_version=self.opset_version,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.PRESERVE, **extra)
            return buf.getvalue()
        import importlib.util

        if importlib.util.find_spec("onnxscript") is None:
            raise ImportError("the dynamo exporter needs onnxscript (pip install onnxscript)")
        program = torch.onnx.export(wrapper, example, dynamo=True, input_names=names,
                                    opset_version=self.opset_version)
        return program.model_proto.SerializeToString()

    # -- running ------------------------------------------------------------------------------------
    def _run_session(self, compiled: _Compiled, flat: List[torch.Tensor]) -> List[torch.Tensor]:
        dev = self.device
        feeds = [(name, flat[i].to(dev).contiguous()) for name, i in compiled.input_index]
        if compiled.bindable and all(t.dtype in _TORCH_TO_NUMPY and t.numel() > 0 for _, t in feeds):
            import numpy as np

            binding = compiled.session.io_binding()
            dev_type, dev_id = self._bind_device_type, (dev.index or 0)
            for name, t in feeds:
                binding.bind_input(name, dev_type, dev_id, np.dtype(_TORCH_TO_NUMPY[t.dtype]), tuple(t.shape),
                                   t.data_ptr())
            outs = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in compiled.out_meta]
            for name, o in zip(compiled.output_names, outs):
                binding.bind_output(name, dev_type, dev_id, np.dtype(_TORCH_TO_NUMPY[o.dtype]), tuple(o.shape),
                                    o.data_ptr())
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()  # ORT uses its own stream; inputs must be ready
            compiled.session.run_with_iobinding(binding)
            return outs
        feed = {}
        for name, t in feeds:
            if t.dtype == torch.bfloat16:
                raise TypeError(f"ONNX input {name} is bfloat16, which this provider path cannot pass through "
                                "numpy; cast to float16 or float32 first")
            feed[name] = t.detach().cpu().numpy()
        results = compiled.session.run(compiled.output_names, feed)
        return [torch.from_numpy(r).to(dev) for r in results]
