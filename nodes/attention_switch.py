"""GenesisAttentionSwitch: route a MODEL's attention through Genesis, scoped to that model only."""
from __future__ import annotations

from typing import Any, List, Tuple

from ..genesis_core._log import log_once, logger
from ..genesis_core.attn import backend_name
from ..genesis_core.comfyui import ComfyUINodeInterface, register_comfyui_node
from ..genesis_core.attn import QUALITY_LEVELS
from ..genesis_core.interop import GenesisAttentionOverride, make_replace_patch, make_step_wrapper
from ._common import ATTENTION_CHOICES, tooltip

OVERRIDE_KEY = "optimized_attention_override"
WRAPPER_KEY = "genesis_attention_switch"
#: How many of the first and of the last sampling steps run at 'exact' unless the user says otherwise.
#: One each: the first step lays out the composition from pure noise and the last one leaves detail that no
#: later step corrects, while 2 steps of 20-30 cost little of what a lower level gains.
DEFAULT_EXACT_STEPS = 1
MAX_EXACT_STEPS = 1000

QUALITY_TOOLTIP = (
    "How far from exact attention Genesis may go for speed. exact: only kernels that compute in the model's "
    "own precision (SDPA, FlashAttention, xformers); results match ComfyUI's up to bf16/fp16 rounding. "
    "high: also SageAttention's kernels (INT8 Q·K of smoothed keys; P·V in FP16, or in FP8 with FP32 "
    "accumulation). fast: also kernels that quantise q, k and v all to FP8 (cuDNN and FA3 FP8). Every lower-level "
    "kernel is checked against a float64 reference on the live inputs and refused when its error is over the "
    "level's thresholds (the README's 'Quality budgets' section lists them). With an explicit lossy attention "
    "(sage) the steps not held at exact run at least at the level that kernel needs."
)
EXACT_STEPS_TOOLTIP = (
    "The first N and last N sampling steps run at 'exact', whatever 'quality' says: low precision is least safe "
    "there (the first step sets the composition, the last ones the fine detail). 0: every step runs at 'quality'; "
    "N at least half the steps: every step is exact. Counted over the steps this sampler runs (with a start or "
    "end step, over that range)."
)


def comfy_has_override_hook() -> bool:
    """Whether this ComfyUI build honours ``transformer_options["optimized_attention_override"]``."""
    try:
        from comfy.ldm.modules import attention as comfy_attention  # ComfyUI's own module
    except Exception:
        return False
    return hasattr(comfy_attention, "wrap_attn")


def _outer_sample_wrapper(override: GenesisAttentionOverride):
    def wrapper(executor, *args: Any, **kwargs: Any):
        try:
            return executor(*args, **kwargs)
        finally:
            override.end_run("sampling finished")

    wrapper.genesis_override = override  # type: ignore[attr-defined]
    return wrapper


def _transformer_blocks(diffusion_model) -> List[Tuple[str, int, int, bool]]:
    """(block name, block number, transformer index, has attn2) for a UNet built from ComfyUI's classes."""
    found = []
    groups = (("input", getattr(diffusion_model, "input_blocks", None)),
              ("middle", [getattr(diffusion_model, "middle_block", None)]),
              ("output", getattr(diffusion_model, "output_blocks", None)))
    for name, blocks in groups:
        if blocks is None:
            continue
        for number, block in enumerate(blocks):
            if block is None:
                continue
            for module in block.modules():
                tblocks = getattr(module, "transformer_blocks", None)
                if tblocks is None:
                    continue
                for index, tb in enumerate(tblocks):
                    found.append((name, number, index, getattr(tb, "attn2", None) is not None))
    return found


def apply_replace_patches(model, override: GenesisAttentionOverride) -> int:
    """Fallback for ComfyUI builds without the override hook: attn1/attn2 replace patches on every UNet
    transformer block. Returns how many blocks were patched (0 for architectures it cannot see)."""
    patch = make_replace_patch(override)
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    blocks = _transformer_blocks(diffusion_model) if diffusion_model is not None else []
    for name, number, index, has_attn2 in blocks:
        model.set_model_attn1_replace(patch, name, number, index)
        if has_attn2:
            model.set_model_attn2_replace(patch, name, number, index)
    return len(blocks)


@register_comfyui_node("GenesisAttentionSwitch", display_name="Genesis Attention Switch")
class GenesisAttentionSwitch(ComfyUINodeInterface):
    """MODEL + attention choice -> a patched clone of the MODEL."""

    CATEGORY = "genesis/attention"
    DESCRIPTION = (
        "Runs the model's attention through Genesis with the chosen backend. Only the returned model "
        "changes (a clone with its own attention override); the input model is untouched. 'auto' picks "
        "the fastest measured backend per call shape within the 'quality' budget; the first and last "
        "'exact_steps' sampling steps always run at 'exact'. Unavailable choices fall back to sdpa, then "
        "pytorch, and the log says why. After each sampling run the log lists which backend served each call "
        "shape at which quality level, and which steps ran at exact."
    )
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose attention runs through Genesis.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", tooltip("The diffusion model to patch (it is cloned, never changed in place).")),
                "attention": (list(ATTENTION_CHOICES), tooltip(
                    "Attention backend: auto (measured choice), flash, sage, xformers, sdpa or pytorch (plain math). "
                    "Marks show which work on this server; unavailable ones fall back to sdpa.",
                    default="auto")),
                "quality": (list(QUALITY_LEVELS), tooltip(QUALITY_TOOLTIP, default="exact")),
                "exact_steps": ("INT", tooltip(EXACT_STEPS_TOOLTIP, default=DEFAULT_EXACT_STEPS, min=0,
                                               max=MAX_EXACT_STEPS, step=1)),
            }
        }

    def execute(self, model, attention: str = "auto", quality: str = "exact",
                exact_steps: int = DEFAULT_EXACT_STEPS):
        if not hasattr(model, "clone") or not hasattr(model, "model_options"):
            raise ValueError(f"GenesisAttentionSwitch: input 'model' must be a ComfyUI MODEL; got a {type(model).__name__}")
        try:
            name = backend_name(attention)
        except ValueError as exc:
            raise ValueError(f"GenesisAttentionSwitch: input 'attention': {exc}") from None
        if quality not in QUALITY_LEVELS:
            raise ValueError(f"GenesisAttentionSwitch: input 'quality' must be one of {', '.join(QUALITY_LEVELS)}; "
                             f"got {quality!r}")
        if isinstance(exact_steps, bool) or not isinstance(exact_steps, int) or not 0 <= exact_steps <= MAX_EXACT_STEPS:
            raise ValueError(f"GenesisAttentionSwitch: input 'exact_steps' must be an integer from 0 to "
                             f"{MAX_EXACT_STEPS}; got {exact_steps!r}")
        patched = model.clone()
        override = GenesisAttentionOverride(name, quality=quality, exact_steps=exact_steps)
        if comfy_has_override_hook():
            to = patched.model_options.setdefault("transformer_options", {})
            previous = to.get(OVERRIDE_KEY)
            if previous is not None and not isinstance(previous, GenesisAttentionOverride):
                log_once(("switch-replaces-foreign-override", type(previous).__name__),
                         f"GenesisAttentionSwitch replaces another node's attention override "
                         f"({getattr(previous, '__qualname__', type(previous).__name__)}) on this model")
            to[OVERRIDE_KEY] = override
        else:
            n = apply_replace_patches(patched, override)
            if n:
                log_once(("switch-replace-fallback",),
                         "this ComfyUI has no optimized_attention_override hook; Genesis patches the model's "
                         f"attn1/attn2 blocks instead ({n} transformer blocks)")
            else:
                logger.warning("this ComfyUI has no optimized_attention_override hook and the model has no UNet "
                               "transformer blocks Genesis can patch; attention is left as it was")
        self._install_wrappers(patched, override)
        return (patched,)

    @staticmethod
    def _install_wrappers(patched, override: GenesisAttentionOverride) -> None:
        """The end-of-run log (outer sample) and, where some steps are held at exact, the per-model-call step
        tracker (apply_model); an earlier Genesis switch's wrappers on this model are replaced, other nodes'
        wrappers stay and run around or inside ours as ComfyUI chains them."""
        if not hasattr(patched, "add_wrapper_with_key"):
            if override.exact_steps and override.middle_level != "exact":
                logger.warning("this ComfyUI has no model wrappers: 'exact_steps' cannot be honoured, every step "
                               f"runs at quality '{override.middle_level}'")
            return
        try:
            from comfy.patcher_extension import WrappersMP
        except ImportError:
            return
        for kind in (WrappersMP.OUTER_SAMPLE, WrappersMP.APPLY_MODEL):
            if hasattr(patched, "remove_wrappers_with_key"):
                patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper(override))
        if override.exact_steps and override.middle_level != "exact":
            patched.add_wrapper_with_key(WrappersMP.APPLY_MODEL, WRAPPER_KEY, make_step_wrapper(override))
