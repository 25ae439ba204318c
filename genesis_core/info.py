"""``get_interface_info()`` and the backends table of ``python -m genesis_core info``."""
from __future__ import annotations

import platform
from typing import Dict, List

import torch

from . import __version__
from .attn import QUALITY_LEVELS, AttentionType, backends_report
from .attn.backends._common import package_version

_PACKAGES = ("torch", "triton", "flash-attn", "flash_attn_3", "fa3-fwd", "flash-attn-4", "nvidia-cutlass-dsl",
             "sageattention", "xformers", "nvidia-cudnn-frontend", "onnxruntime", "onnx", "wgpu", "ray")
WIDTH = 100


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
            "backends": {r["name"]: {k: r.get(k) for k in ("available", "reason", "version", "kernel", "precision",
                                                           "first_call_s")} for r in rows},
            "quality_levels": list(QUALITY_LEVELS),
        },
        "versions": _versions(),
    }


def backends_table() -> List[List[str]]:
    """[name, status, precision class, version, kernel or reason] per attention backend (header first)."""
    rows = [["backend", "status", "class", "version", "kernel (or why not)"]]
    for r in backends_report():
        first = f"; first call of a new shape compiles ({r['first_call_s']:.1f} s seen)" if r.get("first_call_s") else ""
        rows.append([r["name"], "runs" if r["available"] else "no", r.get("precision") or "-", r["version"] or "-",
                     (r["kernel"] + first) if r["available"] else r["reason"]])
    return rows


def print_backends_table() -> None:
    """The backends table, wrapped to 100 columns: which backends really run here, and why the others do not."""
    import textwrap

    rows = backends_table()
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    indent = sum(widths) + 8
    for i, r in enumerate(rows):
        head = "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  "
        text = textwrap.wrap(r[4], width=max(WIDTH - indent, 30)) or [""]
        print(head + text[0])
        for more in text[1:]:
            print(" " * indent + more)
        if i == 0:
            print("-" * WIDTH)
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
