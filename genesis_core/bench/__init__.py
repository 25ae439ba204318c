"""``python -m genesis_core bench``: attention backends, Genesis AUTO, dispatch overhead, end to end.

Sections (``--section``, comma-separated; default all), one module each:

* ``attention`` (``attention.py``): for each shape (``shapes.py``; inputs made as ComfyUI makes them), every
  backend that can serve it, ComfyUI's default SDPA call (``comfy_default.py``) and AUTO at each quality
  level (``auto``, ``auto@high``, ``auto@fast``) - median ms, TFLOP/s, relative L2 and cosine against a
  float64 reference, judged at the row's level (``judge.py``) - then a summary per shape (``summary.py``)
  and the targets' verdicts (``verdicts.py``: AUTO exact against the fastest exact kernel - where the
  choice is not the fastest row, the two are timed in strict alternation and compared kernel by kernel,
  ``kernels.py`` - the errors per level, the speed-ups over ComfyUI's default).
* ``overhead`` (``overhead.py``): Genesis ``attention()`` against calling the chosen kernel directly,
  CPU-side µs per call on small tensors for an already-seen signature.
* ``e2e`` (``e2e.py``): a stack of Flux-sized transformer blocks with Genesis AUTO against plain
  ``F.scaled_dot_product_attention``; with a ComfyUI checkout (``--comfyui`` or ``$COMFYUI_PATH``),
  also ComfyUI's own Flux model (``comfy_e2e.py``, the one optional module that imports ComfyUI).
* ``executor``: the executor's own rows (``genesis_core.compute.bench``).

``cli.py`` parses the arguments, says how long the run will take (``estimate.py``) and runs the sections;
``report.py`` prints (at most 100 columns, a PASS/FAIL verdict beside every target); ``plot.py`` draws
``--plot``.
Timing primitives are shared with the autotuner (``genesis_core._timing``). Defaults follow the device:
the diffusion shape set in bf16 on CUDA, small shapes in float32 on CPU. This package only re-exports.
"""
from . import estimate, kernels, verdicts
from .attention import bench_attention
from .cli import SECTIONS, build_parser, environment, main
from .comfy_e2e import bench_e2e_comfyui, comfyui_path
from .e2e import FluxLikeBlock, bench_e2e
from .kernels import KERNEL_NAME_CHARS, _compare_kernels, device_kernels
from .overhead import bench_overhead
from .plot import write_plot
from .report import print_attention, print_e2e, print_overhead
from .shapes import DTYPES, SHAPE_SETS, Shape, parse_shapes
from .verdicts import CHOICE_TARGET, OVERHEAD_TARGET_US, choice_verdict

__all__ = [
    "CHOICE_TARGET", "DTYPES", "FluxLikeBlock", "KERNEL_NAME_CHARS", "OVERHEAD_TARGET_US", "SECTIONS", "SHAPE_SETS",
    "Shape", "bench_attention", "bench_e2e", "bench_e2e_comfyui", "bench_overhead", "build_parser", "choice_verdict",
    "comfyui_path", "device_kernels", "environment", "estimate", "kernels", "main", "parse_shapes", "print_attention",
    "print_e2e", "print_overhead", "verdicts", "write_plot",
]
