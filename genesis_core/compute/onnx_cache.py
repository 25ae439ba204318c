"""What identifies an exported graph, and its entry in the disk cache.

Keys. :func:`template_key` (the non-tensor arguments, baked into a traced graph) and :func:`globals_key` (simple
constants among the globals fn's code reads, and same-module helper functions by code; see
:func:`globals_read`) are parts of the runner's in-memory key. :func:`disk_key` is the key that is stable
across processes: it covers fn's code (and that of same-module helpers it calls), the classes and architecture
of captured models, the *contents* of their weights and of every other reachable tensor, simple captured
constants (closure cells, defaults, partial arguments, globals the code reads), the input signature, opset,
exporter and torch version.

Entries (opt-in, ``cache_dir=``): ``<cache_dir>/<name>-<sha256>.onnx`` plus a JSON sidecar holding the full key,
the sha256 of the ``.onnx`` file and the outputs' structure (:func:`json_template`). :func:`read_entry` returns
an entry only when the sidecar parses, names this key, and the file's hash matches; it raises otherwise, and
the runner then logs, exports again and rewrites the entry with :func:`write_entry`, so the next process gets a
good hit. Files are written atomically (temporary file + rename), the graph before its sidecar, and the
temporary file is removed when writing fails. (A valid entry is still run against the current ``fn`` once
per process before it is served; the runner does that.)
"""
from __future__ import annotations

import enum
import functools
import hashlib
import json
import os
import threading
import types
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from .._log import log_once
from ._tree import Slot

CACHE_FORMAT = "genesis-onnx-cache-2"  # bump when the sidecar or the key changes meaning


def template_key(template: Any) -> Any:
    """Hashable form of an argument template (tensors already replaced by Slots)."""
    if isinstance(template, Slot):
        return ("T", template.index)
    if isinstance(template, list):
        return ("L",) + tuple(template_key(x) for x in template)
    if isinstance(template, tuple):
        return ("U", type(template).__qualname__) + tuple(template_key(x) for x in template)
    if isinstance(template, dict):
        return ("D",) + tuple((k, template_key(v)) for k, v in template.items())
    try:
        hash(template)
    except TypeError:
        raise TypeError(f"non-tensor arguments of a function run on ONNX are baked into the graph and must be "
                        f"hashable; got {type(template).__name__}") from None
    return ("V", type(template).__qualname__, template)


def json_template(template: Any) -> Any:
    """JSON form of an output template for the sidecar; TypeError when it holds values JSON cannot store."""
    if isinstance(template, Slot):
        return {"slot": template.index}
    if isinstance(template, list):
        return {"list": [json_template(x) for x in template]}
    if isinstance(template, tuple):
        return {"tuple": [json_template(x) for x in template]}
    if isinstance(template, dict) and all(isinstance(k, str) for k in template):
        return {"dict": {k: json_template(v) for k, v in template.items()}}
    if template is None or isinstance(template, (bool, int, float, str)):
        return {"value": template}
    raise TypeError(f"cannot store {type(template).__name__} in the ONNX cache sidecar")


def from_json_template(obj: Dict[str, Any]) -> Any:
    """The template :func:`json_template` stored."""
    if "slot" in obj:
        return Slot(obj["slot"])
    if "list" in obj:
        return [from_json_template(x) for x in obj["list"]]
    if "tuple" in obj:
        return tuple(from_json_template(x) for x in obj["tuple"])
    if "dict" in obj:
        return {k: from_json_template(v) for k, v in obj["dict"].items()}
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


_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, enum.Enum)


def _is_simple(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (tuple, frozenset)) and depth < 2 and len(value) <= 64:
        return all(_is_simple(v, depth + 1) for v in value)
    return False


@functools.lru_cache(maxsize=4096)
def _names_read(code: types.CodeType) -> Tuple[str, ...]:
    """Global/attribute names a code object (and the code nested in it) uses, in order, once each."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_names_read(const))
    return tuple(dict.fromkeys(names))


def globals_read(fn: Any, max_depth: int = 3) -> Tuple[Tuple[str, Any], ...]:
    """What fn's code reads from module globals that tracing bakes in without it being a tensor or a model:
    simple constants (``S = 2``; numbers, strings, enums, dtypes, tuples of those) as ``(name, value)``, and
    helper functions of the same module (followed through globals and closure cells) as ``(name, code)``,
    whose own globals are read too. Tensors and models there are found and keyed by :func:`reach`."""
    out: List[Tuple[str, Any]] = []
    seen: set = set()

    def visit(f: Any, depth: int) -> None:
        while isinstance(f, (functools.partial, types.MethodType)):
            f = f.func if isinstance(f, functools.partial) else f.__func__
        if isinstance(f, nn.Module):
            f = getattr(type(f).forward, "__func__", type(f).forward)
        if not isinstance(f, types.FunctionType) or id(f) in seen or depth > max_depth:
            return
        seen.add(id(f))
        module = getattr(f, "__module__", None)
        if depth:
            out.append((f"{module}.{f.__qualname__}", f.__code__))
        g = f.__globals__
        for name in _names_read(f.__code__):
            if name not in g:
                continue
            value = g[name]
            if _is_simple(value):
                out.append((f"{module}.{name}", value))
            elif isinstance(value, types.FunctionType) and value.__module__ == module:
                visit(value, depth + 1)
        for cell in f.__closure__ or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if isinstance(value, (types.FunctionType, functools.partial, types.MethodType)):
                visit(value, depth + 1)

    visit(fn, 0)
    return tuple(out)


def globals_key(read: Tuple[Tuple[str, Any], ...]) -> Tuple[Any, ...]:
    """Hashable, equality-safe form of :func:`globals_read` for the in-memory key (NaN == NaN by repr)."""
    return tuple((name, value) if isinstance(value, types.CodeType) else (name, type(value).__qualname__,
                                                                             repr(value))
                 for name, value in read)


def disk_key(fn: Any, modules: List[nn.Module], signature: Any, extra: Tuple[Any, ...],
             tensors: Sequence[torch.Tensor] = ()) -> Tuple[str, str]:
    """``(readable name, sha256 hex)`` that is stable across processes.

    Covers fn's code, what its closure cells, defaults and partial arguments hold (constants by value,
    other objects by type), the globals its code reads (:func:`globals_read`: constants by value, helper
    functions by code), the captured models (class, architecture, forward code, mode, weight contents), the
    contents of every other reachable tensor (``tensors``, in walk order), the signature and ``extra``.
    """
    h = hashlib.sha256()
    h.update(CACHE_FORMAT.encode())
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
    h.update(b"globals")
    for gname, value in globals_read(fn):
        h.update(gname.encode())
        if isinstance(value, types.CodeType):
            _hash_code(h, value)
        else:
            h.update(f"{type(value).__qualname__}:{value!r}".encode())
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


def entry_paths(cache_dir: str, fn: Any, modules: List[nn.Module], signature: Any, extra: Tuple[Any, ...],
                tensors: Sequence[torch.Tensor] = ()) -> Tuple[Tuple[str, str], str]:
    """``((graph path, sidecar path), sha256 hex)`` of fn's entry in ``cache_dir`` (see :func:`disk_key`)."""
    name, digest = disk_key(fn, modules, signature, extra, tensors)
    base = os.path.join(cache_dir, f"{name}-{digest[:24]}")
    return (base + ".onnx", base + ".json"), digest


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_entry(paths: Tuple[str, str], digest: str
               ) -> Tuple[bytes, Dict[str, Any], List[Tuple[Tuple[int, ...], torch.dtype]]]:
    """``(graph bytes, sidecar, output shapes and dtypes)`` of a valid entry for ``digest``; raises (OSError,
    ValueError, ...) when the files are missing or unreadable, the sidecar describes another key or format, or
    the graph is not the one the sidecar describes."""
    with open(paths[1], "r", encoding="utf-8") as fh:
        meta = json.load(fh)
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != digest:
        raise ValueError(f"the sidecar {os.path.basename(paths[1])} does not describe this entry (written "
                         f"by another Genesis version, or for another key)")
    with open(paths[0], "rb") as fh:
        model_bytes = fh.read()
    if _sha256(model_bytes) != meta.get("onnx_sha256"):
        raise ValueError(f"the content of {os.path.basename(paths[0])} is not the graph its sidecar "
                         f"describes (sha256 differs)")
    out_meta = [(tuple(int(d) for d in shape), getattr(torch, dtype)) for shape, dtype in meta["out_meta"]]
    if not all(isinstance(d, torch.dtype) for _, d in out_meta):
        raise ValueError("the sidecar names an unknown dtype")
    return model_bytes, meta, out_meta


def write_entry(cache_dir: str, paths: Tuple[str, str], model_bytes: bytes, out_template_json: Any,
                out_meta: List[Tuple[Tuple[int, ...], torch.dtype]], digest: str, random_ops: bool) -> None:
    """Write the graph, then its sidecar, atomically; a failure is logged once, never raised."""
    meta = {"format": CACHE_FORMAT, "key": digest, "onnx_sha256": _sha256(model_bytes),
            "out_template": out_template_json, "random": random_ops,
            "out_meta": [[list(s), str(d).replace("torch.", "")] for s, d in out_meta]}
    tmp = None
    try:
        os.makedirs(cache_dir, exist_ok=True)
        # the graph first: a reader that sees the new sidecar with the old graph (or the reverse) finds the
        # hashes differ and rebuilds
        for path, data in ((paths[0], model_bytes), (paths[1], json.dumps(meta).encode())):
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never half
            tmp = None
    except OSError as exc:
        log_once(("onnx-cache-write", cache_dir), f"could not write the ONNX cache in {cache_dir}: {exc}")
    finally:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass

