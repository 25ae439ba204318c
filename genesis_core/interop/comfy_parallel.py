"""ComfyUI models across GPUs: token sharding inside ComfyUI's block patches, the sequence-parallel attention
override, the worker-side model builders, and the model function wrapper that sends each model call to the workers.

Sequence mode (ComfyUI's Flux and Wan ``WanModel``): every rank runs the whole model on its shard of the image /
video tokens. ``transformer_options["patches_replace"]["dit"]`` patches on every block cut the tokens (and the
RoPE frequencies with them, so each token keeps its position) at the first block and all-gather them after the
last; text tokens stay whole on every rank. The ``optimized_attention_override`` turns each self-attention over
the shards into :func:`~genesis_core.parallel.sequence.sequence_attention` (Flux: text tokens joint in front);
any other call (Wan's cross-attention to the replicated text) runs locally through Genesis. Shards are padded
to at least ``text length + 1`` tokens, so a self-attention call is never mistaken for a cross-attention one.

CFG mode: the batched cond+uncond call is split by ``cond_or_uncond`` across two groups of workers
(:mod:`genesis_core.parallel.cfg`). Both modes combine.

:class:`MultiGPUModelFunction` is a ComfyUI ``model_function_wrapper``: in the ComfyUI process it sends the model
once to the workers (weights as ComfyUI has them, weight patches such as LoRA applied there by ComfyUI's own
``ModelPatcher``), then per call only the latents, timestep and conditioning. This module never imports ComfyUI
at module level; the builders import it inside the workers.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from .._log import log_once, logger
from ..compute._tree import map_tensors
from ..parallel.sequence import sequence_attention
from ..parallel.session import ParallelSettings, close_sessions, session_for  # noqa: F401 (re-exported)
from ..parallel.shard import gather_tokens, split_tokens
from .comfy_adapter import GenesisAttentionOverride, comfy_attention

__all__ = ["SequenceAttentionOverride", "model_family", "sequence_support", "sequence_transformer_options",
           "build_diffusion_runner", "build_base_model_runner", "base_model_payload", "MultiGPUModelFunction",
           "ParallelSettings"]

_active = threading.local()  # the shard of the block now running on this thread (set by the block patches)


@dataclass
class _Shard:
    total: int          # real tokens of the whole sharded sequence
    length: int         # padded tokens per rank
    real: List[int]     # real tokens per rank
    joint_front: int    # replicated tokens in front of the shard inside self-attention (Flux: text)
    pe: Any             # this rank's RoPE frequencies
    vec: Any            # this rank's modulation (Wan per-token timesteps) or the whole one


_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _bind(args, kwargs) -> Dict[str, Any]:
    """ComfyUI's attention arguments by name (``fn(q, k, v, heads, mask=None, attn_precision=None,
    skip_reshape=False, skip_output_reshape=False, **kwargs)``); other kwargs are dropped."""
    if len(args) > len(_PARAMS):
        raise TypeError(f"ComfyUI attention takes at most {len(_PARAMS)} positional arguments; got {len(args)}")
    bound = dict(zip(_PARAMS, args))
    bound.update({k: v for k, v in kwargs.items() if k in _PARAMS})
    missing = [p for p in _PARAMS[:4] if p not in bound]
    if missing:
        raise TypeError(f"ComfyUI attention call is missing {', '.join(missing)}")
    return bound


class SequenceAttentionOverride:
    """``optimized_attention_override`` for sharded models: self-attention over the shards goes through
    :func:`sequence_attention`, every other call through Genesis attention on this rank alone."""

    def __init__(self, mesh, backend: str = "auto", ring_impl: str = "ring"):
        self.mesh, self.backend, self.ring_impl = mesh, backend, ring_impl
        self.sharded_calls = 0
        self.local_calls = 0

    def __deepcopy__(self, memo: dict) -> "SequenceAttentionOverride":
        return self

    def __call__(self, func, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = _bind(args, kwargs)
        st: Optional[_Shard] = getattr(_active, "shard", None)
        q, k, v, heads = bound["q"], bound["k"], bound["v"], bound["heads"]
        skip_in, skip_out = bool(bound.get("skip_reshape", False)), bool(bound.get("skip_output_reshape", False))
        nq, nk = (q.shape[2], k.shape[2]) if skip_in else (q.shape[1], k.shape[1])
        want = None if st is None else st.joint_front + st.length
        if st is None or nq != want or nk != want:
            self.local_calls += 1
            return comfy_attention(q, k, v, heads, bound.get("mask"), bound.get("attn_precision"), skip_in, skip_out,
                                   backend=self.backend)
        if bound.get("mask") is not None:
            raise ValueError("sequence mode cannot shard an attention mask; this model call passes one (shape "
                             f"{tuple(bound['mask'].shape)}); use mode 'cfg'")
        if skip_in:
            qq, kk, vv, layout = q, k, v, "BHND"
        else:
            b = q.shape[0]
            qq, kk, vv = (t.reshape(b, t.shape[1], heads, -1) for t in (q, k, v))
            layout = "BNHD"
        out = sequence_attention(qq, kk, vv, self.mesh, real=st.real, joint_front=st.joint_front, layout=layout,
                                 backend=self.backend, ring_impl=self.ring_impl)
        self.sharded_calls += 1
        if layout == "BHND":
            return out if skip_out else out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)
        return out.transpose(1, 2) if skip_out else out.reshape(out.shape[0], out.shape[1], -1)


# ---------------------------------------------------------------- which models, and their block patches


def model_family(diffusion_model) -> Optional[str]:
    """``"wan"`` / ``"flux"`` for ComfyUI's WanModel / Flux (their own forward, not a subclass's), else None."""
    fo = getattr(type(diffusion_model), "forward_orig", None)
    return {"WanModel.forward_orig": "wan", "Flux.forward_orig": "flux"}.get(getattr(fo, "__qualname__", ""))


def sequence_support(diffusion_model, ulysses: int, ring: int = 1) -> Optional[str]:
    """None if ``diffusion_model`` can be sharded ``ulysses x ring`` ways, else the reason as a sentence."""
    name = type(diffusion_model).__name__
    family = model_family(diffusion_model)
    if family is None:
        return (f"sequence mode supports ComfyUI's Flux and Wan (WanModel) diffusion models; this model is {name} "
                f"(its blocks take inputs Genesis does not know how to shard); use mode 'cfg'")
    heads = int(getattr(diffusion_model, "num_heads", 0))
    if ulysses > 1 and heads % ulysses:
        return (f"the model's {heads} attention heads do not divide among {ulysses} Ulysses ranks; choose a ring "
                f"degree so that gpus / ring divides {heads}")
    if family == "flux" and len(diffusion_model.double_blocks) == 0:
        return "this Flux configuration has no double blocks, where Genesis cuts the image tokens"
    return None


def _split(mesh, x: torch.Tensor, dim: int, minimum: int = 0):
    return split_tokens(x, mesh.shard_index, mesh.sequence_degree, dim=dim, minimum=minimum)


def _gather(mesh, x: torch.Tensor, real: List[int], dim: int = 1) -> torch.Tensor:
    return gather_tokens(x, real, group=mesh.sequence_group, dim=dim)


class _Blocks:
    """Per-forward shard state shared by one model's block patches (thread-local: one forward per thread)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self._tls = threading.local()

    def _run(self, st: _Shard, original, args: Dict[str, Any]):
        _active.shard = st
        try:
            return dict(original(args))
        finally:
            _active.shard = None


class _WanBlocks(_Blocks):
    def __init__(self, mesh, n_blocks: int):
        super().__init__(mesh)
        self.n = n_blocks

    def patch(self, i: int):
        def wan_block(args: Dict[str, Any], extra: Dict[str, Any]):
            if i == 0:
                x, pe, vec, txt = args["img"], args["pe"], args["vec"], args["txt"]
                n = x.shape[1]
                minimum = txt.shape[1] + 1  # cross-attention keys are never as many as a shard
                x, length, real = _split(self.mesh, x, 1, minimum)
                if pe is None or pe.shape[1] != n:
                    raise ValueError(f"Wan sequence mode: RoPE frequencies must have one row per token ({n}); got "
                                     f"{None if pe is None else tuple(pe.shape)}")
                pe = _split(self.mesh, pe, 1, minimum)[0]
                if vec.dim() >= 2 and vec.shape[1] == n and n > 1:  # per-token timesteps (Wan 2.2 TI2V)
                    vec = _split(self.mesh, vec, 1, minimum)[0]
                elif vec.dim() >= 2 and vec.shape[1] != 1:
                    raise ValueError(f"Wan sequence mode: a modulation with {vec.shape[1]} rows for {n} tokens "
                                     "cannot be sharded; use mode 'cfg'")
                self._tls.st = _Shard(n, length, real, 0, pe, vec)
            st = self._tls.st
            out = self._run(st, extra["original_block"], {**args, "img": args["img"] if i else x, "pe": st.pe,
                                                          "vec": st.vec})
            if i == self.n - 1:
                out["img"] = _gather(self.mesh, out["img"], st.real)
                self._tls.st = None
            return out

        return wan_block


class _FluxBlocks(_Blocks):
    def __init__(self, mesh, n_double: int, n_single: int):
        super().__init__(mesh)
        self.n_double, self.n_single = n_double, n_single

    def double(self, i: int):
        def flux_double_block(args: Dict[str, Any], extra: Dict[str, Any]):
            if args.get("attn_mask") is not None:
                raise ValueError("Flux sequence mode cannot shard an attention mask; use mode 'cfg'")
            img = args["img"]
            if i == 0:
                nt, ni = args["txt"].shape[1], img.shape[1]
                img, length, real = _split(self.mesh, img, 1)
                pe = args["pe"]
                if pe is not None:
                    pe = torch.cat((pe.narrow(2, 0, nt), _split(self.mesh, pe.narrow(2, nt, ni), 2)[0]), dim=2)
                self._tls.st = _Shard(ni, length, real, nt, pe, None)
            st = self._tls.st
            out = self._run(st, extra["original_block"], {**args, "img": img, "pe": st.pe})
            if i == self.n_double - 1 and self.n_single == 0:
                out["img"] = _gather(self.mesh, out["img"], st.real)
                self._tls.st = None
            return out

        return flux_double_block

    def single(self, i: int):
        def flux_single_block(args: Dict[str, Any], extra: Dict[str, Any]):
            if args.get("attn_mask") is not None:
                raise ValueError("Flux sequence mode cannot shard an attention mask; use mode 'cfg'")
            st = self._tls.st
            out = self._run(st, extra["original_block"], {**args, "pe": st.pe})
            if i == self.n_single - 1:
                x, nt = out["img"], st.joint_front
                out["img"] = torch.cat((x.narrow(1, 0, nt), _gather(self.mesh, x.narrow(1, nt, x.shape[1] - nt),
                                                                     st.real)), dim=1)
                self._tls.st = None
            return out

        return flux_single_block


def sequence_transformer_options(diffusion_model, mesh, backend: str = "auto", ring_impl: str = "ring") -> Dict[str, Any]:
    """``transformer_options`` that shard ``diffusion_model`` over ``mesh``'s sequence group (raises if it cannot)."""
    reason = sequence_support(diffusion_model, mesh.ulysses, mesh.ring)
    if reason:
        raise ValueError(reason)
    family = model_family(diffusion_model)
    dit: Dict[Any, Any] = {}
    if family == "wan":
        blocks = _WanBlocks(mesh, len(diffusion_model.blocks))
        for i in range(blocks.n):
            dit[("double_block", i)] = blocks.patch(i)
    else:
        blocks = _FluxBlocks(mesh, len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))
        for i in range(blocks.n_double):
            dit[("double_block", i)] = blocks.double(i)
        for i in range(blocks.n_single):
            dit[("single_block", i)] = blocks.single(i)
    return {"patches_replace": {"dit": dit},
            "optimized_attention_override": SequenceAttentionOverride(mesh, backend, ring_impl)}


def _worker_options(diffusion_model, mesh, options: Dict[str, Any]) -> Dict[str, Any]:
    backend = options.get("backend", "auto")
    if mesh.sequence_degree > 1:
        return sequence_transformer_options(diffusion_model, mesh, backend, options.get("ring_impl", "ring"))
    return {"optimized_attention_override": GenesisAttentionOverride(backend)}


# ---------------------------------------------------------------- inside a worker: build the model, run a call


def _prepare_comfy(device: str, comfy_path: Optional[str]) -> None:
    if comfy_path and comfy_path not in sys.path:
        sys.path.insert(0, comfy_path)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args  # ComfyUI's own switch; must be set before model_management loads

        if device == "cpu":
            args.cpu = True


def _to(value: Any, device) -> Any:
    """``value`` with every tensor in it (nested lists, tuples, dicts) moved to ``device``."""
    return map_tensors(value, lambda t: t.to(device))


def _runner(call, device: torch.device, own: Dict[str, Any]):
    def run(inputs: Dict[str, Any]) -> torch.Tensor:
        to = dict(own)
        to.update(inputs.get("extras") or {})
        with torch.no_grad():
            out = call(inputs["x"].to(device), inputs["timestep"].to(device), _to(inputs["conds"], device), to)
        return out.cpu()

    run.transformer_options = own  # type: ignore[attr-defined]
    return run


def build_diffusion_runner(ctx, mesh, payload: Dict[str, Any], options: Dict[str, Any]):
    """Worker-side builder for a bare ComfyUI diffusion model (``payload``: module, cls, kwargs, state_dict,
    comfy_path, dtype); the runner calls ``model(x, timestep, **conds, transformer_options=...)``."""
    _prepare_comfy(ctx.device, payload.get("comfy_path"))
    import comfy.ops

    device = torch.device(ctx.device)
    dtype = getattr(torch, payload.get("dtype", "float32"))
    cls = getattr(importlib.import_module(payload["module"]), payload["cls"])
    model = cls(**payload["kwargs"], operations=comfy.ops.disable_weight_init, dtype=dtype, device=device)
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()

    def call(x, t, conds, to):
        return model(x, t, transformer_options=to, **conds)

    runner = _runner(call, device, _worker_options(model, mesh, options))
    runner.model = model  # type: ignore[attr-defined]
    return runner


def build_base_model_runner(ctx, mesh, payload: Dict[str, Any], options: Dict[str, Any]):
    """Worker-side builder for a ComfyUI BaseModel sent by :func:`base_model_payload`: ComfyUI builds the model
    from its config, loads the weights, applies the weight patches (LoRA, ...) with its own ModelPatcher."""
    _prepare_comfy(ctx.device, payload.get("comfy_path"))
    import comfy.model_patcher

    device = torch.device(ctx.device)
    data = pickle.loads(payload["blob"])
    sd = data["state_dict"]
    base = data["model_config"].get_model(sd, "", device=None)
    missing, unexpected = base.diffusion_model.load_state_dict(sd, strict=False)
    if missing:
        raise RuntimeError(f"the worker's model lacks {len(missing)} weights the ComfyUI model has (first: {missing[:3]})")
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
    if data.get("patches"):
        patcher.patches = {k: list(v) for k, v in data["patches"].items()}
    patcher.patch_model(device_to=device, force_patch_weights=True)
    base.eval()

    def call(x, t, conds, to):
        return base.apply_model(x, t, transformer_options=to, **conds)

    runner = _runner(call, device, _worker_options(base.diffusion_model, mesh, options))
    runner.model = base  # type: ignore[attr-defined]
    return runner


# ---------------------------------------------------------------- in the ComfyUI process


def _comfy_path() -> Optional[str]:
    comfy = sys.modules.get("comfy")
    paths = list(getattr(comfy, "__path__", []) or [])  # a namespace package: no __file__
    return os.path.dirname(os.path.abspath(paths[0])) if paths else None


def base_model_payload(base_model) -> Dict[str, Any]:
    """What the workers need to rebuild ``base_model`` as ComfyUI has it: its config, the *unpatched* weights
    (on CPU) and the patcher's weight patches (applied again on each worker)."""
    patcher = getattr(base_model, "current_patcher", None)
    prefix = "diffusion_model."
    sd = {k[len(prefix):]: v for k, v in base_model.state_dict().items() if k.startswith(prefix)}
    patches = {}
    if patcher is not None:
        for key, bk in getattr(patcher, "backup", {}).items():  # weights ComfyUI patched in place: the originals
            if key.startswith(prefix):
                sd[key[len(prefix):]] = bk.weight
        patches = {k: v for k, v in getattr(patcher, "patches", {}).items() if k.startswith(prefix)}
    sd = {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}
    # Pickled here, unpickled by the worker only after it has set ComfyUI up (ComfyUI's config objects import
    # comfy.model_management, which must know first whether the worker is a CPU one).
    blob = pickle.dumps({"model_config": base_model.model_config, "state_dict": sd, "patches": _to(patches, "cpu")},
                        protocol=pickle.HIGHEST_PROTOCOL)
    return {"blob": blob, "comfy_path": _comfy_path()}


class MultiGPUModelFunction:
    """ComfyUI ``model_function_wrapper``: each model call runs on the workers (see the module docstring)."""

    def __init__(self, settings: ParallelSettings):
        self.settings = settings
        self.calls = 0

    def __deepcopy__(self, memo: dict) -> "MultiGPUModelFunction":
        return self

    def check(self, base_model) -> None:
        """Raise ValueError (a sentence) if this model cannot run with these settings."""
        seq = self.settings.ulysses * self.settings.ring
        if seq > 1:
            reason = sequence_support(base_model.diffusion_model, self.settings.ulysses, self.settings.ring)
            if reason:
                raise ValueError(f"Genesis Multi-GPU: {reason}")

    def __call__(self, apply_model, args: Dict[str, Any]) -> torch.Tensor:
        base_model = getattr(apply_model, "__self__", None)
        if base_model is None or not hasattr(base_model, "diffusion_model"):
            raise TypeError("Genesis Multi-GPU: the model function wrapper expects ComfyUI's BaseModel.apply_model")
        self.check(base_model)
        x, t = args["input"], args["timestep"]
        conds = dict(args["c"])
        to = conds.pop("transformer_options", {}) or {}
        if conds.pop("control", None) is not None:
            raise ValueError("Genesis Multi-GPU: ControlNet inputs cannot be sent to the workers; remove the "
                             "ControlNet or the Multi-GPU node")
        session = session_for(self.settings)
        token = (id(base_model), getattr(getattr(base_model, "current_patcher", None), "patches_uuid", None))
        if session.model_id != token:
            logger.info(f"sending {type(base_model.diffusion_model).__name__} to {session.pool.world_size} worker(s) "
                        "(once; later steps send only latents and conditioning)")
            session.load(build_base_model_runner, base_model_payload(base_model),
                         {"backend": self.settings.backend, "ring_impl": self.settings.ring_impl})
            session.model_id = token
        extras = {k: _to(to[k], "cpu") for k in ("cond_or_uncond", "sigmas", "uuids", "sample_sigmas") if k in to}
        out = session.call(_to(x, "cpu"), _to(t, "cpu"), _to(conds, "cpu"), args.get("cond_or_uncond"), extras)
        self.calls += 1
        return out.to(x.device)
