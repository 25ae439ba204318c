"""Running a PyTorch function in ONNX Runtime: export once per input signature, cache the session, bind I/O.

:class:`OnnxRunner` backs the executor's ONNX and WEBGPU backends. On the first call for a given
``(fn, input shapes and dtypes, non-tensor arguments, weights, globals fn reads)`` it exports ``fn`` (a function
or an ``nn.Module``; captured models included) with ``torch.onnx.export`` and builds an
``onnxruntime.InferenceSession``; later calls with the same signature reuse the session without exporting.
This module holds the runner, its in-memory session cache and the public names; the work is done by:

* :mod:`~genesis_core.compute.onnx_export`: the export (``exporter="torchscript"`` by default, ``"dynamo"``,
  ``"auto"``; the choice is explained there), run on copies of the inputs, and the reference check.
* :mod:`~genesis_core.compute.onnx_guard`: the guard that refuses a trace turning input-dependent tensors into
  Python values. Tracing bakes Python control flow and non-tensor arguments into the graph, which is why they
  are part of the cache key.
* :mod:`~genesis_core.compute.onnx_session`: the ONNX Runtime session, its I/O checks and IO binding.
* :mod:`~genesis_core.compute.onnx_cache`: the keys and the optional disk cache (``cache_dir=``).

What a served graph is guaranteed to be (each point is checked, not assumed; the module named says how):

* **No input-dependent Python values** (guard): refused with :class:`OnnxDataDependentError`, which names the
  function and the line and says what to write instead.
* **The caller's tensors are not touched by the export** (export): the trace runs on copies of the inputs.
* **Every new graph reproduces fn**: the runner runs the new session on the export inputs and compares it with
  what ``fn`` returned on them while being traced (no extra call of ``fn``; that run is the first call's
  result; tolerances in export). A mismatch refuses the export (:class:`OnnxExportError`).
* **A disk hit reproduces the current fn**: once per process (per session) the runner runs the cached graph
  on the call's inputs and compares it with one eager run of the current ``fn`` on CPU copies of them (that
  run is the price of a disk hit), which catches state the key cannot see and a foreign file that came with its
  own sidecar. Any failure is logged and the entry is rebuilt and rewritten (cache).
* Graphs with data-dependent output sizes run through ONNX Runtime's own output allocation (session).

In-memory key. Weights, and any other tensor ``fn`` can reach (closure cells, defaults, attributes of
captured objects, globals; see :func:`~genesis_core.compute.placement.reach`), are constants of the graph,
so the key fingerprints them (identity, version counter, data pointer, shape, dtype): a tensor changed in
place or an attribute re-pointed to a new tensor gives a new export rather than stale numbers. Simple
constants among the globals fn's code reads (``S = 2``; also through same-module helper functions) are in the
key by value. What the walk cannot key (too deep, tensors without a storage pointer) is logged once as baked
in. Non-tensor attributes of captured objects (``self.mode = "fast"``) are not in the in-memory key: after
changing one, call ``runner.clear()`` (a disk hit is re-checked against fn, which catches them).
"""
from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .._log import first_line, log_once, logger
from ._tree import flatten, unflatten
from .onnx_cache import entry_paths, globals_key, globals_read, json_template, read_entry, template_key, write_entry
from .onnx_errors import OnnxDataDependentError, OnnxExportError
from .onnx_export import difference, eager_reference, export_graph, name_of
from .onnx_session import (Compiled, Provider, bind_device_type, compile_session, default_device_for, new_session,
                           provider_name, run_compiled)
from .placement import ReplicaCache, callable_key, reach, tensor_fingerprint, weights_fingerprint

__all__ = ["EXPORTERS", "OnnxDataDependentError", "OnnxExportError", "OnnxRunner", "OnnxStats", "default_device_for",
           "name_of"]

EXPORTERS = ("torchscript", "dynamo", "auto")


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


class OnnxRunner:
    """Exports functions, caches ONNX Runtime sessions, runs them on torch tensors.

    Args:
        providers: ONNX Runtime execution providers in priority order (names, or ``(name, options)``).
        provider_options: per-provider option dicts, parallel to ``providers`` (when given as names).
        device: torch device for inputs/outputs; default from the first provider (CUDA EP → ``cuda:<id>``).
        cache_dir: keep exported ``.onnx`` files here and reuse them across processes (optional).
        opset_version: ONNX opset (default: the exporter's own default).
        exporter: ``"torchscript"`` (default), ``"dynamo"`` or ``"auto"`` (see :mod:`.onnx_export`).
        max_sessions: in-memory LRU size.
        log_severity: ONNX Runtime log level (3 = errors only).
        session_config: extra ``SessionOptions`` config entries. Default turns intra-op spinning off:
            ONNX Runtime's threads otherwise busy-wait after each run and steal the cores PyTorch work
            running beside them needs (measured on a 2-core box: a PyTorch cross-attention interleaved
            with ORT calls went from 5.6 ms to 9.8 ms with spinning on; ORT's own latency barely moved).
    """

    _genesis_opaque = True  # model discovery does not search runners (their caches hold other models)

    def __init__(self, providers: Sequence[Provider] = ("CPUExecutionProvider",),
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
        self._sessions: "OrderedDict[Any, Compiled]" = OrderedDict()
        self._lock = threading.Lock()
        self._export_lock = threading.Lock()
        self._replicas = ReplicaCache()
        self._bind_device_type = bind_device_type(self.providers, self.device)

    # -- public -------------------------------------------------------------------------------------
    def run(self, fn: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """Run ``fn(*args, **kwargs)`` in ONNX Runtime; outputs are torch tensors on ``self.device``."""
        flat, template = flatten((tuple(args), dict(kwargs)))
        compiled, outs = self._compiled(fn, flat, template)
        if outs is None:
            outs = self._run_session(compiled, flat)
        return unflatten(compiled.out_template, outs)

    def clear(self) -> None:
        """Drop every cached session (files in ``cache_dir`` stay)."""
        with self._lock:
            self._sessions.clear()
            self.stats.sessions = 0

    # -- sessions -----------------------------------------------------------------------------------
    def _compiled(self, fn: Any, flat: List[torch.Tensor], template: Any
                  ) -> Tuple[Compiled, Optional[List[torch.Tensor]]]:
        """``(session, outputs)`` for this call signature, exporting (and checking) on a miss; outputs are this
        call's results when a new session was checked on them.

        The key holds fn's identity, the input signature, the captured models' weights fingerprint, a
        fingerprint of every other tensor fn can reach (closure cells, defaults, attributes of captured
        objects, globals) and the simple constants among the globals fn's code reads: tracing bakes those
        into the graph as constants, so modifying one in place, re-pointing an attribute to a new tensor or
        assigning a new value to a global must give a new export, not the old numbers.
        """
        fkey, keep = callable_key(fn)
        found = reach(fn)
        modules = found.modules
        tensors_fp, unkeyable = tensor_fingerprint(found.tensors)
        signature = (tuple((tuple(t.shape), t.dtype) for t in flat), template_key(template))
        key = (fkey, signature, weights_fingerprint(modules), tensors_fp, globals_key(globals_read(fn)))
        with self._lock:
            hit = self._sessions.get(key)
            if hit is not None:
                self._sessions.move_to_end(key)
                self.stats.session_hits += 1
                return hit, None
        with self._export_lock:  # exports are rare; one at a time, and never twice for one key
            with self._lock:
                hit = self._sessions.get(key)
                if hit is not None:
                    self.stats.session_hits += 1
                    return hit, None
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
            compiled, outs = self._load_or_export(fn, modules, flat, template, signature, found.tensors)
            # the key holds ids: keep those objects (and the reachable tensors) alive while the entry lives,
            # so a new object cannot reuse an id and hit a stale session
            compiled.keepalive = keep + tuple(found.tensors)
            with self._lock:
                self._sessions[key] = compiled
                while len(self._sessions) > self.max_sessions:
                    self._sessions.popitem(last=False)
                self.stats.sessions = len(self._sessions)
            return compiled, outs

    def _session(self, model: Union[bytes, str]) -> Any:
        session = new_session(model, self.providers, self.provider_options, self.log_severity, self.session_config)
        active = session.get_providers()
        with self._lock:
            self.stats.extra["active_providers"] = active
        wanted = provider_name(self.providers[0])
        if active and active[0] != wanted:
            log_once(("onnx-provider-fallback", wanted), f"ONNX Runtime could not start {wanted}; this session "
                                                         f"runs on {', '.join(active)}")
        return session

    def _compile(self, session: Any, n_inputs: int, out_template_json: Any,
                 out_meta: List[Tuple[Tuple[int, ...], torch.dtype]], source: str,
                 raw_template: Any = None) -> Compiled:
        return compile_session(session, n_inputs, out_template_json, out_meta, source,
                               provider_name(self.providers[0]), self._bind_device_type, raw_template)

    def _run_session(self, compiled: Compiled, flat: List[torch.Tensor]) -> List[torch.Tensor]:
        return run_compiled(compiled, flat, self.device, self._bind_device_type)

    # -- export and disk cache ----------------------------------------------------------------------
    def _load_or_export(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                        signature: Any, tensors: Sequence[torch.Tensor] = ()
                        ) -> Tuple[Compiled, List[torch.Tensor]]:
        """A checked session and its outputs for ``flat``: from the disk cache when a valid entry reproduces
        the current fn, else from a new export (written to the cache)."""
        paths = digest = None
        if self.cache_dir is not None:
            paths, digest = entry_paths(self.cache_dir, fn, modules, signature, (self.opset_version, self.exporter),
                                        tensors)
            if os.path.exists(paths[0]) or os.path.exists(paths[1]):
                loaded = self._load_cached(fn, modules, flat, template, paths, digest)
                if loaded is not None:
                    with self._lock:
                        self.stats.disk_hits += 1
                    return loaded
        t0 = time.perf_counter()
        model_bytes, wrapper, reference, random_ops = export_graph(fn, modules, flat, template, tensors, self.exporter,
                                                                   self.opset_version, self._replicas)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.exports += 1
            self.stats.export_s += dt
            self.stats.last_export_s = dt
        logger.debug("exported %s to ONNX in %.3f s", name_of(fn), dt)
        try:
            out_template_json = json_template(wrapper.out_template)
        except TypeError:
            out_template_json = None
        try:
            session = self._session(model_bytes)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types
            raise OnnxExportError(f"ONNX Runtime cannot load the graph exported from {name_of(fn)} "
                                  f"({first_line(exc, 300)}); run {name_of(fn)} on the cpu backend") from exc
        compiled = self._compile(session, len(flat), out_template_json, wrapper.out_meta, "export",
                                 raw_template=wrapper.out_template)
        outs = self._run_session(compiled, flat)  # the first call's result, and the check of the new graph
        problem = difference(outs, reference, values=not random_ops)
        if problem is not None:
            raise OnnxExportError(
                f"the ONNX graph exported from {name_of(fn)} does not reproduce {name_of(fn)} on the inputs it was "
                f"traced with: {problem}. {wrapper.mutation_hint}The graph is not used; run {name_of(fn)} on the "
                f"cpu backend, or make its result depend only on its inputs, weights and constants.")
        for key, note in wrapper.mutation_notes:
            log_once(key, note)
        if random_ops:
            log_once(("onnx-random", name_of(fn)),
                     f"ONNX export of {name_of(fn)}: it draws random numbers ({', '.join(sorted(set(random_ops)))}), "
                     f"so its graph was checked for output shapes and dtypes only, not values", level=20)
        if paths is not None and out_template_json is not None:
            write_entry(self.cache_dir, paths, model_bytes, out_template_json, wrapper.out_meta, digest,
                        bool(random_ops))
        elif paths is not None:
            log_once(("onnx-cache-template", paths[0]), "the function's outputs hold values that cannot be "
                                                        "stored in the ONNX disk cache; caching in memory only")
        return compiled, outs

    def _load_cached(self, fn: Any, modules: List[nn.Module], flat: List[torch.Tensor], template: Any,
                     paths: Tuple[str, str], digest: str) -> Optional[Tuple[Compiled, List[torch.Tensor]]]:
        """The cached entry's session and outputs, or None (logged) when the entry is unusable or stale."""
        label = name_of(fn)
        try:
            model_bytes, meta, out_meta = read_entry(paths, digest)
            compiled = self._compile(self._session(model_bytes), len(flat), meta["out_template"], out_meta, "disk")
            outs = self._run_session(compiled, flat)
        except Exception as exc:  # noqa: BLE001 - a broken cache entry is rebuilt, never fatal
            log_once(("onnx-cache-corrupt", paths[0], type(exc).__name__),
                     f"ignoring unreadable ONNX cache entry {paths[0]} ({type(exc).__name__}: {exc}); exporting "
                     f"{label} again and rewriting it")
            return None
        try:  # once per process and session: the cached graph must reproduce the current fn
            reference, ref_template, random_ops = eager_reference(fn, modules, flat, template, self._replicas)
            problem = None
            if json_template(ref_template) != meta["out_template"]:
                problem = "the function's outputs are structured differently"
            problem = problem or difference(outs, reference, values=not random_ops)
        except Exception as exc:  # noqa: BLE001 - fn itself failing eagerly: the export will say it again
            problem = f"{label} could not be run to check it ({type(exc).__name__}: {exc})"
        if problem is not None:
            log_once(("onnx-cache-stale", paths[0]),
                     f"the cached ONNX graph {paths[0]} does not reproduce {label} as it is now ({problem}): state "
                     f"the cache key cannot see has changed, or the file belongs to another function; exporting "
                     f"{label} again and rewriting it")
            return None
        if random_ops:
            log_once(("onnx-random-cached", label),
                     f"cached ONNX graph of {label}: it draws random numbers, so the cached graph was checked for "
                     f"output shapes and dtypes only, not values", level=20)
        return compiled, outs

