"""``fp8_cudnn`` backend: cuDNN's fused FP8 attention (``sdpa_fp8``) through NVIDIA's cudnn-frontend.

``run(call)`` is the whole path, and what AUTO times: Genesis's Triton kernels quantise q, k, v to e4m3
(:mod:`..quant.fp8`, k smoothed), cuDNN attends, and one fused Triton pass turns cuDNN's e4m3 output back
into the input dtype; the result is a BHND view of a contiguous [B, N, H, D] tensor.

Facts from nvidia-cudnn-frontend 1.32.0 (its compiled support checks, ``sdpa_support_surface.h``, and the
``sdpa_fp8`` binding's docstring), which shape the design:

* FP8 forward needs cuDNN >= 9.1 (not 9.10.0) and compute capability >= 9.0; on Hopper head dims up to
  256, multiples of 16; no bias;
* "sdpa fp8 forward with HALF/BFLOAT16 output is only supported on Blackwell architecture with cuDNN
  version 9.13.0 and newer": on an H100/H200 the output is FP8. Its value is
  ``O8 = (S8 @ V8) * descale_s * descale_v * scale_o`` with ``S8 = e4m3(softmax * scale_s)``. Genesis
  passes ``scale_s = 448`` (the documented bound for E4M3), ``descale_s = 1 / (2 * 448)`` and
  ``descale_v = scale_o = 1``: ``O8`` is then half the output in v's quantised units, at most 224 in size
  for any value of v, and ``O = O8 * 2 * descale_v[b, h]`` is applied per head in the dequantisation pass;
* ``Amax_S`` is deprecated ("leave it virtual"); ``Amax_O`` is declared as an output (a scratch float per
  device, written and never read). q/k descales are tried per head ([B, H, 1, 1]) first and per tensor
  ([1, 1, 1, 1], what NVIDIA's samples use) next; the first variant that builds is remembered. On an H200
  with cuDNN 9.19 the per-head variant does not build ("no plan in the list could be built").

Scales: v is always quantised per head (its descale is applied per head after the kernel, in the
dequantisation pass); q and k per head where the graph takes per-head descales, else one scale per
tensor. One shared scale costs a quiet head its precision: the loudest head's maximum lands in
[224, 448] = [2**7.8, 2**8.8], a head 2**j quieter in [2**(7.8-j), 2**(8.8-j)]; e4m3 keeps its 2**-4
relative precision only down to its smallest normal value, 2**-6 (subnormals go on to 2**-9, losing a
bit per binade, and past about 2**17.8 the whole head rounds to 0). Requiring the bulk of a head, its
values down to 1/16 of its maximum, to stay normal gives 7.8 - j - 4 >= -6, so j <= 9.8: with per-tensor
q/k descales ``run`` reads the quantiser's per-tensor spread of head scales (binades between the loudest
and the quietest non-zero head; one device sync per call) and refuses (raises, so dispatch falls back)
when q's or k's exceeds :data:`MAX_SHARED_SPREAD` = 10. Measured on an H200 (quiet-head inputs, heads up
to 10**6 apart): per-tensor scales put the worst head at 95-100% relative L2 error, per-head at about 3%.

A graph is built once per signature (device, shapes, strides, dtypes, softmax scale) and kept in a
bounded LRU cache (:data:`MAX_GRAPHS`); a signature no variant builds for is remembered with the reason
(its calls fail at once and dispatch falls back). The library the frontend loads is found by its own
rules (``LD_LIBRARY_PATH``, then ``nvidia/cudnn/lib`` in site-packages, then ``libcudnn.so.9``, which is
torch's when torch loaded it first); ``description()`` names its version next to torch's.
"""
from __future__ import annotations

import importlib
import threading
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from ..._log import first_line
from ..limits import HALF, Limits
from ..quant import fp8
from ..registry import Backend, register
from ..types import AttentionCall
from . import _flash_pkg as pkg

LIMITS = Limits(dtypes=HALF, devices=("cuda",), head_dim_multiple=16, max_head_dim=256, equal_v_head_dim=True,
                mask=False, gqa=False, min_capability=(9, 0), autograd=False)
PIP = "pip install nvidia-cudnn-frontend; needs cuDNN >= 9.1 and compute capability >= 9.0"
SMOOTH_K = True
MAX_SHARED_SPREAD = 10  # binades between head scales one shared q or k scale may span (derived above)
S_SCALE = 448.0
O_FACTOR = 2.0  # O8 holds half the output (in v's quantised units)
MAX_GRAPHS = 32
PROBE_REL = 0.15
# (q/k descale granularity, whether Amax_S is declared as an output), tried in this order
VARIANTS: Tuple[Tuple[str, bool], ...] = (("head", False), ("tensor", False), ("tensor", True))

_cudnn = None
_quantize = fp8.quantize_qkv  # the tests substitute the PyTorch reference on CPU
_lock = threading.Lock()
_graphs: "OrderedDict[tuple, object]" = OrderedDict()  # key -> _Plan, or the reason no graph builds
_first_variant = 0
_devices: Dict[int, "_DeviceState"] = {}


class _DeviceState:
    """A cuDNN handle per device, and the constant scale tensors its graphs read (never change)."""

    def __init__(self, index: int):
        with torch.cuda.device(index):
            self.handle = _cudnn.create_handle()
        # [descale_v = scale_o = 1, scale_s, descale_s, amax_o scratch, amax_s scratch]
        self.consts = torch.tensor([1.0, S_SCALE, 1.0 / (O_FACTOR * S_SCALE), 0.0, 0.0], dtype=torch.float32,
                                   device=torch.device("cuda", index))
        base = self.consts.data_ptr()
        self.one, self.scale_s, self.descale_s, self.amax_o, self.amax_s = (base + 4 * i for i in range(5))
        self.lock = threading.Lock()


def _device_state(index: int) -> _DeviceState:
    st = _devices.get(index)
    if st is None:
        with _lock:
            st = _devices.get(index)
            if st is None:
                st = _devices[index] = _DeviceState(index)
    return st


class _Plan:
    """A built graph: its tensors' uids, workspace size and the variant it was built with."""

    __slots__ = ("graph", "uids", "workspace", "granularity", "amax_s", "device")

    def __init__(self, graph, uids: Dict[str, int], workspace: int, granularity: str, amax_s: bool, device: int):
        self.graph, self.uids, self.workspace = graph, uids, workspace
        self.granularity, self.amax_s, self.device = granularity, amax_s, device

    def execute(self, qkv: fp8.FP8QKV, o8: torch.Tensor) -> None:
        st = _device_state(self.device)
        u = self.uids
        d = qkv.descale.data_ptr()
        bh = qkv.descale.shape[1] * qkv.descale.shape[2]
        # device pointers throughout (the frontend takes ints as well as tensors; ints cost it nothing to read)
        pack = {u["q"]: qkv.q.data_ptr(), u["k"]: qkv.k.data_ptr(), u["v"]: qkv.v.data_ptr(), u["o"]: o8.data_ptr(),
                u["descale_q"]: d,
                u["descale_k"]: d + 4 * bh, u["descale_v"]: st.one, u["scale_o"]: st.one, u["scale_s"]: st.scale_s,
                u["descale_s"]: st.descale_s, u["amax_o"]: st.amax_o}
        if self.amax_s:
            pack[u["amax_s"]] = st.amax_s
        ws = torch.empty(self.workspace, dtype=torch.uint8, device=o8.device) if self.workspace else None
        stream = torch.cuda.current_stream(o8.device).cuda_stream if o8.device.type == "cuda" else 0
        with st.lock:  # the handle's stream is state: one caller at a time
            _cudnn.set_stream(st.handle, stream)
            self.graph.execute(pack, ws, handle=st.handle)


def graph_key(call: AttentionCall) -> tuple:
    """What a graph is built for: device, shapes, the strides of the e4m3 tensors Genesis hands it
    (contiguous [B, N, H, D], described as [B, H, N, D] dims), their dtypes, and the softmax scale."""
    B, H, NQ, D = call.q.shape
    NK = call.kv_len
    index = call.device.index
    if index is None:
        index = torch.cuda.current_device() if call.device.type == "cuda" else -1
    return (index, B, H, NQ, NK, D, (NQ * H * D, D, H * D, 1), (NK * H * D, D, H * D, 1), "e4m3", "e4m3",
            float(call.scale))


def build_graph(key: tuple, variant: Tuple[str, bool]) -> _Plan:
    """Build (and plan) the cuDNN graph for ``key`` with ``variant``; raises what cuDNN raises."""
    index, B, H, NQ, NK, D, q_stride, kv_stride, _, _, scale = key
    granularity, amax_s_out = variant
    cudnn, st = _cudnn, _device_state(index)
    dt = cudnn.data_type
    g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                      handle=st.handle)
    q = g.tensor(name="q", dim=(B, H, NQ, D), stride=q_stride, data_type=dt.FP8_E4M3)
    k = g.tensor(name="k", dim=(B, H, NK, D), stride=kv_stride, data_type=dt.FP8_E4M3)
    v = g.tensor(name="v", dim=(B, H, NK, D), stride=kv_stride, data_type=dt.FP8_E4M3)
    one = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)
    per = dict(dim=(B, H, 1, 1), stride=(H, 1, 1, 1), data_type=dt.FLOAT) if granularity == "head" else one
    t = {"q": q, "k": k, "v": v, "descale_q": g.tensor(name="descale_q", **per),
         "descale_k": g.tensor(name="descale_k", **per)}
    for name in ("descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = g.tensor(name=name, **one)
    o, _stats, amax_s, amax_o = g.sdpa_fp8(
        q=q, k=k, v=v, descale_q=t["descale_q"], descale_k=t["descale_k"], descale_v=t["descale_v"],
        descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"], generate_stats=False,
        attn_scale=scale, name="genesis_fp8_attention")
    o.set_output(True).set_dim((B, H, NQ, D)).set_stride(q_stride).set_data_type(dt.FP8_E4M3)
    amax_o.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
    t["o"], t["amax_o"] = o, amax_o
    if amax_s_out:
        amax_s.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
        t["amax_s"] = amax_s
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return _Plan(g, {name: x.uid for name, x in t.items()}, int(g.get_workspace_size()), granularity, amax_s_out,
                 index)


_builder = build_graph  # the tests substitute a fake


def plan_for(call: AttentionCall) -> _Plan:
    """The cached graph for ``call``'s signature, built on first use (trying :data:`VARIANTS` from the last
    one that worked); RuntimeError saying why when none builds (remembered for the signature)."""
    global _first_variant
    key = graph_key(call)
    with _lock:
        hit = _graphs.get(key)
        if hit is not None:
            _graphs.move_to_end(key)
        start = _first_variant
    if hit is None:
        errors = []
        for i in list(range(start, len(VARIANTS))) + list(range(start)):
            try:
                hit = _builder(key, VARIANTS[i])
            except torch.cuda.OutOfMemoryError:
                raise  # can pass: not remembered
            except Exception as exc:
                errors.append(f"{VARIANTS[i][0]} descales{' + Amax_S' if VARIANTS[i][1] else ''}: {first_line(exc)}")
                continue
            _first_variant = i
            break
        if hit is None:
            hit = "no cuDNN FP8 attention graph builds for this call (" + "; ".join(errors) + ")"
        with _lock:
            _graphs[key] = hit
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
    if isinstance(hit, str):
        raise RuntimeError(hit)
    return hit


def clear_graphs() -> None:
    """Forget every built graph (and every remembered failure)."""
    with _lock:
        _graphs.clear()


def granularity_for(plan: "_Plan") -> Tuple[str, str, str]:
    """What the quantiser is asked for with ``plan``: q and k as its descales are shaped, v always per head."""
    return (plan.granularity, plan.granularity, "head")


def shared_scale_refusal(qkv: fp8.FP8QKV) -> Optional[str]:
    """Why one q and one k scale for all heads would lose a head (see the module docstring), or None.
    Reads the quantiser's spreads back from the device: one synchronisation."""
    sq, sk = qkv.spread[:2].tolist()
    worst = max(sq, sk)
    if not worst > MAX_SHARED_SPREAD:
        return None
    name = "q" if sq >= sk else "k"
    return (f"cuDNN's FP8 attention here takes one q and one k descale for all heads, and {name}'s heads differ in "
            f"scale by 2**{int(worst)} (more than 2**{MAX_SHARED_SPREAD}): one shared scale would put the quietest "
            f"head's values below e4m3's normal range (448 down to 2**-6, subnormals to 2**-9) and lose its precision")


def run(call: AttentionCall) -> torch.Tensor:
    plan = plan_for(call)
    qkv = _quantize(call.q, call.k, call.v, granularity_for(plan), SMOOTH_K)
    if plan.granularity == "tensor":
        why = shared_scale_refusal(qkv)
        if why is not None:
            raise RuntimeError(why)
    B, H, NQ, D = call.q.shape
    o8 = torch.empty((B, NQ, H, D), dtype=fp8.E4M3, device=call.device)
    plan.execute(qkv, o8)
    return fp8.dequantize_output(o8, qkv.descale[2], O_FACTOR, call.dtype).transpose(1, 2)


def _backend_versions() -> Tuple[Optional[int], Optional[int]]:
    """(cuDNN version the frontend loaded, cuDNN version torch loaded), None where unknown."""
    try:
        ours = int(_cudnn.backend_version()) if _cudnn is not None else None
    except Exception:
        ours = None
    try:
        theirs = torch.backends.cudnn.version()
    except Exception:
        theirs = None
    return ours, theirs


def _probe() -> Optional[str]:
    global _cudnn
    if not pkg.installed("cudnn"):
        return f"not installed ({PIP})"
    device = pkg.probe_device()
    if device is None:
        return "installed, but no CUDA device: cuDNN's FP8 attention runs on CUDA (compute capability >= 9.0) only"
    why = fp8.triton_missing()
    if why is not None:
        return why
    try:
        mod = importlib.import_module("cudnn")
    except Exception as exc:
        return f"import failed: {first_line(exc)}"
    if not hasattr(mod, "pygraph") or not hasattr(mod, "backend_version"):
        return f"the 'cudnn' module found is not NVIDIA's cudnn-frontend ({PIP})"
    _cudnn = mod
    ours, _theirs = _backend_versions()
    if ours is None:
        _cudnn = None
        return "cudnn-frontend found no cuDNN library (install nvidia-cudnn-cu12/cu13, or set LD_LIBRARY_PATH)"
    if ours < 90100 or ours == 91000:
        _cudnn = None
        return f"cuDNN {ours} is too old for FP8 attention: needs >= 9.1.0 (and not 9.10.0)"
    try:
        why = pkg.probe_call(run, device, torch.bfloat16, PROBE_REL, head_dim=128, refusal=backend.refusal)
    except Exception as exc:
        why = f"probe call failed: {first_line(exc)}"
    if why is not None:
        _cudnn = None
        return f"cuDNN FP8 attention: {why}"
    return None


def _description() -> str:
    backend.available()
    ours, theirs = _backend_versions()
    if _cudnn is None:
        return "cuDNN sdpa_fp8 through cudnn-frontend: not available here"
    lib = f"cuDNN {ours}" + ("" if theirs is None else f" (torch's: {theirs}{', the same' if ours == theirs else ''})")
    front = getattr(_cudnn, "__version__", "?")
    return (f"cuDNN fused FP8 attention (sdpa_fp8, e4m3 in and out) via cudnn-frontend {front}, {lib}; "
            "Genesis's Triton quantisation before, one dequantisation pass after")


backend = register(
    Backend(
        name="fp8_cudnn",
        probe=_probe,
        run=run,
        description=_description,
        version=lambda: pkg.dist_version("nvidia-cudnn-frontend", "nvidia_cudnn_frontend"),
        limits=LIMITS,
        precision="fp8",
    ),
    rank=26,
)
