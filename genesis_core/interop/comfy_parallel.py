"""ComfyUI models across GPUs: the worker-side model builders and the model function wrapper that sends each
model call to the workers.

Sequence mode (:mod:`.comfy_parallel_models`: ComfyUI's Flux, Wan, SD3 and HunyuanVideo): every rank runs the
whole model on its shard of the image / video tokens, cut and joined by block patches; the attention override of
:mod:`.comfy_parallel_attn` makes every self-attention over the shards exact. CFG mode: the batched cond+uncond
call is split by ``cond_or_uncond`` across two groups of workers (:mod:`genesis_core.parallel.cfg`). Both modes
combine.

:class:`MultiGPUModelFunction` is a ComfyUI ``model_function_wrapper``: in the ComfyUI process it sends the model
once to the workers (weights as ComfyUI has them, weight patches such as LoRA applied there by ComfyUI's own
``ModelPatcher``), then per call only the latents, timestep, conditioning and the quality level the workers'
attention runs at (``extras[QUALITY_KEY]``: a Genesis Attention Switch on the model decides it step by step, else
the node's ``quality``). This module never imports ComfyUI at module level; the builders import it inside the
workers.
"""
from __future__ import annotations

import importlib
import os
import pickle
import sys
from typing import Any, Dict, Optional

import torch

from .._log import log_once, logger
from ..attn import quality as _quality
from ..compute._tree import map_tensors
from ..parallel.session import ParallelSettings, close_sessions, session_for  # noqa: F401 (re-exported)
from .comfy_adapter import GenesisAttentionOverride
from .comfy_parallel_attn import SequenceAttentionOverride, level_for
from .comfy_parallel_models import SUPPORTED, model_family, sequence_support, sequence_transformer_options

__all__ = ["SequenceAttentionOverride", "model_family", "sequence_support", "sequence_transformer_options",
           "build_diffusion_runner", "build_base_model_runner", "base_model_payload", "MultiGPUModelFunction",
           "ParallelSettings", "SUPPORTED", "QUALITY_KEY"]


#: ``extras`` key of a model call: the quality level its attention runs at on the workers (set per call by
#: :class:`MultiGPUModelFunction`; without it a worker's calls run at the ``quality`` its model was loaded with).
QUALITY_KEY = "genesis_quality"


def _worker_options(diffusion_model, mesh, options: Dict[str, Any]) -> Dict[str, Any]:
    backend, quality = options.get("backend", "auto"), options.get("quality")
    if mesh.sequence_degree > 1:
        return sequence_transformer_options(diffusion_model, mesh, backend, options.get("ring_impl", "ring"), quality)
    return {"optimized_attention_override": GenesisAttentionOverride(backend, quality=quality)}


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
    override = own.get("optimized_attention_override")
    loaded_level = getattr(override, "level", None)

    def run(inputs: Dict[str, Any]) -> torch.Tensor:
        extras = dict(inputs.get("extras") or {})
        level = extras.pop(QUALITY_KEY, loaded_level)
        if override is not None:
            if level is not None:
                _quality.normalise(level, f"extras[{QUALITY_KEY!r}]")
            override.level = level_for(override.backend, level)
        to = dict(own)
        to.update(extras)
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
    """ComfyUI ``model_function_wrapper``: each model call runs on the workers (see the module docstring).

    The quality level of the workers' attention is decided here, per model call, and sent with it: a Genesis
    Attention Switch on the model (its override in the call's ``transformer_options``) governs, with its
    ``quality`` and ``exact_steps`` as if the model ran in this process; without one, ``settings.quality``
    (None: this process's default), raised to what an explicit lossy ``settings.backend`` needs, as the switch
    does. The ComfyUI process runs no attention of its own here, so the switch's per-step tracking runs here.
    """

    def __init__(self, settings: ParallelSettings):
        self.settings = settings
        self.calls = 0
        self.own = GenesisAttentionOverride(settings.backend, quality=settings.quality)  # without a switch
        self.levels: list = []  # the level sent with each model call (the last 1000)

    def call_level(self, transformer_options: Dict[str, Any], timestep: Any = None) -> str:
        """The quality level the workers' attention runs at for this model call (see the class docstring)."""
        switch = (transformer_options or {}).get("optimized_attention_override")
        if isinstance(switch, GenesisAttentionOverride):
            log_once(("multigpu-quality-from-switch", id(switch)),
                     f"Genesis Multi-GPU: the workers' attention runs at the model's Attention Switch quality "
                     f"('{switch.middle_level or _quality.default()}', exact_steps={switch.exact_steps}); the "
                     f"Multi-GPU node's own 'quality' does not apply")
            level = switch.begin_model_call(transformer_options, timestep)
        else:
            level = self.own.begin_model_call(None)
        level = level or _quality.default()
        self.levels = self.levels[-999:] + [level]
        return level

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
                         {"backend": self.settings.backend, "ring_impl": self.settings.ring_impl,
                          "quality": self.settings.quality})
            session.model_id = token
        extras = {k: _to(to[k], "cpu") for k in ("cond_or_uncond", "sigmas", "uuids", "sample_sigmas") if k in to}
        extras[QUALITY_KEY] = self.call_level(to, t)
        out = session.call(_to(x, "cpu"), _to(t, "cpu"), _to(conds, "cpu"), args.get("cond_or_uncond"), extras)
        self.calls += 1
        return out.to(x.device)
