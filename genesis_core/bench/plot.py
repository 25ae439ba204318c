"""``--plot``: a bar chart of TFLOP/s per backend per shape (matplotlib, optional)."""
from __future__ import annotations

from typing import List, Optional


def write_plot(path: str, rows: List[dict], title: str) -> Optional[str]:
    """Grouped bars: TFLOP/s per backend per shape; hatched bars are over tolerance. Returns an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); --plot skipped"
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows if r["tflops"] is not None))
    if not shapes or not backends:
        return "nothing measured to plot"
    width = 0.8 / len(backends)
    fig, ax = plt.subplots(figsize=(min(22, max(8, 0.25 * len(shapes) * len(backends) + 2)), 5))
    cmap = plt.get_cmap("tab10" if len(backends) <= 10 else "tab20")
    for i, bname in enumerate(backends):
        for j, s in enumerate(shapes):
            r = next((r for r in rows if r["shape"] == s and r["backend"] == bname and r["tflops"] is not None), None)
            if r is None:
                continue
            ax.bar(j + (i - (len(backends) - 1) / 2) * width, r["tflops"], width, color=cmap(i % 20),
                   hatch="//" if not r["correct"] else None, edgecolor="black" if bname == "auto" else None,
                   label=bname)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, ncol=2)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("TFLOP/s (4·B·H·Nq·Nk·D / time)")
    ax.set_title(title + "   (hatched: over tolerance)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
