"""``get_interface_info()`` and the backends table of ``python -m genesis_core info``."""
from __future__ import annotations

import platform
from typing import Dict, List

import torch

from . import __version__
from .attn import AttentionType, backends_report
from .attn.backends._common import package_version

_PACKAGES = ("torch", "flash-attn", "sageattention", "xformers", "onnxruntime", "onnx", "wgpu")


def _versions() -> Dict[str, str]:
    out = {"genesis": __version__, "python": platform.python_version()}
    for dist in _PACKAGES:
        ver = package_version(dist)
        if ver is not None:
            out[dist] = ver
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    if getattr(torch.version, "hip", None):
        out["hip"] = torch.version.hip
    return out


def _compute_section() -> dict:
    from .compute import detect_backends

    detected = detect_backends()
    return {
        "backends": [b.value for b, info in detected.items() if info.available],
        "details": {
            b.value: {"available": info.available, "devices": [str(d) for d in info.devices], "reason": info.reason}
            for b, info in detected.items()
        },
    }


def get_interface_info() -> dict:
    """What this process can do: the spec's three sections plus backend availability and versions.

    ``info['comfyui']['registered_nodes']``: names in COMFYUI_NODE_REGISTRY;
    ``info['heterogeneous_compute']['backends']``: available ComputeBackend values (``details`` has reasons);
    ``info['multi_attention']['types']``: every AttentionType value; ``['backends']``: per attention
    backend, available or the reason, version and kernel; ``info['versions']``: package versions.
    """
    from .comfyui import COMFYUI_NODE_REGISTRY

    rows = backends_report()
    return {
        "comfyui": {"registered_nodes": sorted(COMFYUI_NODE_REGISTRY)},
        "heterogeneous_compute": _compute_section(),
        "multi_attention": {
            "types": [t.value for t in AttentionType],
            "available": [t.value for t in AttentionType
                          if t is AttentionType.AUTO or any(r["name"] == t.value and r["available"] for r in rows)],
            "backends": {r["name"]: {k: r[k] for k in ("available", "reason", "version", "kernel")} for r in rows},
        },
        "versions": _versions(),
    }


def backends_table() -> List[List[str]]:
    rows = [["backend", "status", "version", "kernel"]]
    for r in backends_report():
        rows.append([r["name"], "available" if r["available"] else f"unavailable: {r['reason']}",
                     r["version"] or "-", r["kernel"]])
    return rows


def print_backends_table() -> None:
    rows = backends_table()
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
        if i == 0:
            print("-" * (sum(widths) + 6 + len(r[3])))
    try:
        from .compute import detect_backends

        print()
        print("compute backends:")
        for b, info in detect_backends().items():
            print(f"  {b.value:7s} " + ("available " + ", ".join(map(str, info.devices)) if info.available
                                          else f"unavailable: {info.reason}"))
    except ImportError:
        pass
    vers = _versions()
    print()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
