"""ComfyUI's own Wan, Flux, SD3 (MMDiT) and HunyuanVideo model classes at small random configurations, sharded
over 2 and 4 gloo processes (sequence mode), split by CFG branch, and both: the results equal one process running
the same model (computed in a worker without any collective). Needs a ComfyUI checkout in COMFYUI_PATH."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comfy_helpers import comfyui_path
from genesis_core.parallel.launch import LocalProcessGroup
from genesis_core.parallel.session import ParallelSession

COMFY = comfyui_path()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(COMFY is None, reason="set COMFYUI_PATH to a ComfyUI checkout")]

WAN = {"module": "comfy.ldm.wan.model", "cls": "WanModel",
       "kwargs": dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=4, dim=32, ffn_dim=48, freq_dim=16,
                      text_dim=24, out_dim=4, num_heads=4, num_layers=2, qk_norm=True, cross_attn_norm=True)}
FLUX = {"module": "comfy.ldm.flux.model", "cls": "Flux",
        "kwargs": dict(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=12, hidden_size=32, mlp_ratio=2.0,
                       num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 2, 2], theta=10000, patch_size=2,
                       qkv_bias=True, guidance_embed=True)}
# MMDiT: hidden 64 * depth, heads = depth; the last block is context-pre-only; blocks 0 and 1 have SD3.5's
# image-only self-attention
SD3 = {"module": "comfy.ldm.modules.diffusionmodules.mmdit", "cls": "OpenAISignatureMMDITWrapper",
       "kwargs": dict(input_size=None, patch_size=2, in_channels=4, out_channels=4, depth=4, mlp_ratio=1.0,
                      adm_in_channels=8, pos_embed_max_size=8, num_patches=64, qk_norm="rms",
                      x_block_self_attn_layers=[0, 1],
                      context_embedder_config={"target": "torch.nn.Linear",
                                               "params": {"in_features": 12, "out_features": 256}})}
HUNYUAN = {"module": "comfy.ldm.hunyuan_video.model", "cls": "HunyuanVideo",
           "kwargs": dict(in_channels=4, out_channels=4, vec_in_dim=8, context_in_dim=12, hidden_size=32, mlp_ratio=2.0,
                          num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 2, 2], theta=256,
                          patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False)}
# HunyuanImage 2.1's layout: the same class, 2-D patches, no pooled vector, ByT5 glyph tokens appended to the text
HUNYUAN_IMAGE = {"module": "comfy.ldm.hunyuan_video.model", "cls": "HunyuanVideo",
                 "kwargs": dict(HUNYUAN["kwargs"], vec_in_dim=None, axes_dim=[4, 4], patch_size=[1, 1], byt5=True)}


# ---------------------------------------------------------------- in the workers


def random_state(ctx, spec, seed, comfy_path):
    """ComfyUI builds its model without initialising weights: give every weight a value (rank 0 only)."""
    if ctx.rank != 0:
        return None
    import importlib
    import sys

    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ops

    cls = getattr(importlib.import_module(spec["module"]), spec["cls"])
    model = cls(**spec["kwargs"], operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * (0.3 if v.dim() > 1 else 0.1) for k, v in model.state_dict().items()}


def one_process(ctx, payload, inputs):
    """The reference: rank 0 runs the plain model on the whole input, no sharding, no collective."""
    if ctx.rank != 0:
        return None
    from genesis_core.interop.comfy_parallel import _prepare_comfy
    import importlib

    _prepare_comfy("cpu", payload["comfy_path"])
    import comfy.ops

    cls = getattr(importlib.import_module(payload["module"]), payload["cls"])
    model = cls(**payload["kwargs"], operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu")
    model.load_state_dict(payload["state_dict"])
    with torch.no_grad():
        return model(inputs["x"], inputs["timestep"], transformer_options={}, **inputs["conds"])


FAKE = "fp8_comfy_test"
_FAKE_RUNS = []


def fake_backend(ctx, on):
    """Register (on) / drop (off) an fp8-class test backend that computes exact SDPA and records the query
    length of each run, and make it what ``auto`` resolves to on this rank (so only the call's quality budget
    decides whether it may serve); return the query lengths it has run so far on this rank."""
    from genesis_core.attn import dispatch, registry
    from genesis_core.attn.registry import Backend

    if on and FAKE not in registry.names():
        registry.register(Backend(name=FAKE, probe=lambda: None, description=lambda: "recording test kernel",
                                  run=lambda call: (_FAKE_RUNS.append(call.q_len), registry.get("sdpa").run(call))[1],
                                  precision="fp8"))
        dispatch.set_default_backend(FAKE)
    elif not on:
        dispatch.set_default_backend("auto")
        registry.unregister(FAKE)
    return list(_FAKE_RUNS)


def runner_stats(ctx, key):
    runner = ctx.cache["models"][key]
    o = runner.transformer_options.get("optimized_attention_override")
    return {"runner": id(runner), "sharded": getattr(o, "sharded_calls", None), "local": getattr(o, "local_calls", None)}


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def pool4():
    with LocalProcessGroup(4, timeout_s=120) as pool:
        yield pool


@pytest.fixture(scope="module")
def pool2():
    with LocalProcessGroup(2, timeout_s=120) as pool:
        yield pool


_states = {}


def payload_for(pool, spec, seed=0):
    key = (spec["cls"], repr(sorted(spec["kwargs"].items())), seed)
    if key not in _states:
        _states[key] = pool.run(random_state, spec, seed, str(COMFY))[0]
    return dict(spec, state_dict=_states[key], comfy_path=str(COMFY))


def wan_inputs(gen, batch, frames, h, w, ctx_len=16):
    return {"x": torch.randn(batch, 4, frames, h, w, generator=gen),
            "timestep": torch.rand(batch, generator=gen) * 900,
            "conds": {"context": torch.randn(batch, ctx_len, 24, generator=gen)}}


def flux_inputs(gen, batch, h, w, ctx_len=7):
    return {"x": torch.randn(batch, 4, h, w, generator=gen), "timestep": torch.rand(batch, generator=gen),
            "conds": {"context": torch.randn(batch, ctx_len, 12, generator=gen), "y": torch.randn(batch, 8, generator=gen),
                      "guidance": torch.full((batch,), 3.5)}}


def sd3_inputs(gen, batch, h, w, ctx_len=5):
    return {"x": torch.randn(batch, 4, h, w, generator=gen), "timestep": torch.rand(batch, generator=gen) * 900,
            "conds": {"context": torch.randn(batch, ctx_len, 12, generator=gen), "y": torch.randn(batch, 8, generator=gen)}}


def hunyuan_inputs(gen, batch, frames, h, w, ctx_len=6, mask=None, guiding=False, ref=False):
    """``mask``: None, "binary" (ComfyUI's text-encoder mask: trailing tokens 0) or "additive" (a float mask
    HunyuanVideo adds as it is); ``guiding``: the first frame modulated apart (image-to-video "v2 (replace)");
    ``ref``: a reference frame's tokens put in front of the video's (image-to-video "custom")."""
    conds = {"context": torch.randn(batch, ctx_len, 12, generator=gen), "y": torch.randn(batch, 8, generator=gen),
             "guidance": torch.full((batch,), 6.0)}
    if frames is None:  # HunyuanImage 2.1: a 2-D latent, no pooled vector, ByT5 glyph tokens
        conds.pop("y")
        conds["txt_byt5"] = torch.randn(batch, 3, 1472, generator=gen)
        return {"x": torch.randn(batch, 4, h, w, generator=gen), "timestep": torch.rand(batch, generator=gen),
                "conds": conds}
    if mask == "binary":
        conds["attention_mask"] = torch.ones(1, ctx_len, dtype=torch.long)
        conds["attention_mask"][:, int(torch.randint(1, ctx_len, (1,), generator=gen)):] = 0
    elif mask == "additive":
        conds["attention_mask"] = -3 * torch.rand(1, ctx_len, generator=gen)
    if guiding:
        conds["guiding_frame_index"] = torch.tensor([0.0])
    if ref:
        conds["ref_latent"] = torch.randn(batch, 4, 1, h, w, generator=gen)
    return {"x": torch.randn(batch, 4, frames, h, w, generator=gen), "timestep": torch.rand(batch, generator=gen),
            "conds": conds}


def run_parallel(pool, payload, inputs, cfg, ulysses, ring, cond_or_uncond=None, ring_impl="ring"):
    from genesis_core.interop.comfy_parallel import build_diffusion_runner

    session = ParallelSession(pool, cfg=cfg, ulysses=ulysses, ring=ring)
    key = session.load(build_diffusion_runner, payload, {"backend": "auto", "ring_impl": ring_impl})
    out = session.call(inputs["x"], inputs["timestep"], inputs["conds"], cond_or_uncond)
    return out, session, key


def assert_close(got, want):
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= 2e-4 * max(1.0, scale), f"max abs error {err:.3e} (output scale {scale:.3e})"


def sequence_matches_one_process(pool, spec, inputs, mesh, ring_impl="ring"):
    """Sequence mode on ``mesh`` (Ulysses, ring) against one process on the same inputs; each rank's runner stats."""
    payload = payload_for(pool, spec)
    want = pool.run(one_process, payload, inputs)[0]
    got, _, key = run_parallel(pool, payload, inputs, cfg=1, ulysses=mesh[0], ring=mesh[1], ring_impl=ring_impl)
    assert_close(got, want)
    return pool.run(runner_stats, key)


# ---------------------------------------------------------------- tests


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), frames=st.integers(1, 3), h=st.sampled_from([4, 6, 7]),
       w=st.sampled_from([4, 8, 9]), mesh=st.sampled_from([(4, 1), (2, 2), (1, 4)]),
       ring_impl=st.sampled_from(["ring", "allgather"]))
def test_wan_sequence_parallel_on_four_ranks_matches_one_process(pool4, seed, frames, h, w, mesh, ring_impl):
    inputs = wan_inputs(torch.Generator().manual_seed(seed), 1, frames, h, w)
    stats = sequence_matches_one_process(pool4, WAN, inputs, mesh, ring_impl)
    assert all(s["sharded"] == WAN["kwargs"]["num_layers"] for s in stats)  # every self-attention was sharded
    assert all(s["local"] == WAN["kwargs"]["num_layers"] for s in stats)    # every cross-attention stayed local


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), h=st.sampled_from([4, 6, 10]), w=st.sampled_from([4, 8, 10]),
       ctx_len=st.integers(1, 9), mesh=st.sampled_from([(4, 1), (2, 2), (1, 4)]))
def test_flux_sequence_parallel_on_four_ranks_matches_one_process(pool4, seed, h, w, ctx_len, mesh):
    inputs = flux_inputs(torch.Generator().manual_seed(seed), 1, h, w, ctx_len)
    stats = sequence_matches_one_process(pool4, FLUX, inputs, mesh)
    blocks = FLUX["kwargs"]["depth"] + FLUX["kwargs"]["depth_single_blocks"]
    assert all(s["sharded"] == blocks and s["local"] == 0 for s in stats)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), h=st.sampled_from([4, 7, 10]), w=st.sampled_from([4, 6, 9]),
       ctx_len=st.integers(1, 9), mesh=st.sampled_from([(4, 1), (2, 2), (1, 4)]))
def test_sd3_sequence_parallel_on_four_ranks_matches_one_process(pool4, seed, h, w, ctx_len, mesh):
    inputs = sd3_inputs(torch.Generator().manual_seed(seed), 1, h, w, ctx_len)
    stats = sequence_matches_one_process(pool4, SD3, inputs, mesh)
    calls = SD3["kwargs"]["depth"] + len(SD3["kwargs"]["x_block_self_attn_layers"])  # joint + image-only
    assert all(s["sharded"] == calls and s["local"] == 0 for s in stats)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), frames=st.integers(1, 3), h=st.sampled_from([4, 6]),
       w=st.sampled_from([4, 6, 8]), ctx_len=st.integers(2, 9), mesh=st.sampled_from([(4, 1), (2, 2), (1, 4)]),
       mask=st.sampled_from([None, "binary", "additive"]), guiding=st.booleans(),
       ring_impl=st.sampled_from(["ring", "allgather"]))
def test_hunyuan_video_sequence_parallel_on_four_ranks_matches_one_process(pool4, seed, frames, h, w, ctx_len, mesh,
                                                                          mask, guiding, ring_impl):
    inputs = hunyuan_inputs(torch.Generator().manual_seed(seed), 1, frames, h, w, ctx_len, mask, guiding)
    stats = sequence_matches_one_process(pool4, HUNYUAN, inputs, mesh, ring_impl)
    blocks = HUNYUAN["kwargs"]["depth"] + HUNYUAN["kwargs"]["depth_single_blocks"]
    assert all(s["sharded"] == blocks and s["local"] == 2 for s in stats)  # the text refiner's 2 blocks: local


@pytest.mark.parametrize("spec,mesh", [("sd3", (2, 1)), ("sd3", (1, 2)), ("hunyuan", (2, 1)), ("hunyuan", (1, 2)),
                                       ("hunyuan-i2v", (2, 1)), ("hunyuan-i2v", (1, 2)), ("hunyuan-ref", (1, 2)),
                                       ("hunyuan-image", (2, 1))])
def test_sequence_parallel_on_two_ranks_even_and_uneven(pool2, spec, mesh):
    gen = torch.Generator().manual_seed(17)
    for shape in ((8, 8), (6, 10)):  # 16 tokens per frame (even on 2 ranks), 15 (a padded shard)
        if spec == "sd3":
            payload, inputs = payload_for(pool2, SD3), sd3_inputs(gen, 1, *shape)
        elif spec == "hunyuan":
            payload, inputs = payload_for(pool2, HUNYUAN), hunyuan_inputs(gen, 1, 1, *shape, mask="binary")
        elif spec == "hunyuan-i2v":  # first frame modulated apart: 2 x 16 tokens (cut at the frame), 3 x 15 (inside)
            frames = 2 if shape == (8, 8) else 3
            payload, inputs = payload_for(pool2, HUNYUAN), hunyuan_inputs(gen, 1, frames, *shape, guiding=True)
        elif spec == "hunyuan-ref":
            payload, inputs = payload_for(pool2, HUNYUAN), hunyuan_inputs(gen, 1, 1, *shape, ref=True)
        else:
            payload, inputs = payload_for(pool2, HUNYUAN_IMAGE), hunyuan_inputs(gen, 1, None, shape[0] // 2, shape[1] // 2)
        want = pool2.run(one_process, payload, inputs)[0]
        got, _, _ = run_parallel(pool2, payload, inputs, cfg=1, ulysses=mesh[0], ring=mesh[1])
        assert_close(got, want)


def _cfg_case(pool, spec, gen):
    if spec == "wan":
        return payload_for(pool, WAN), wan_inputs(gen, 2, 2, 6, 8)
    if spec == "flux":
        return payload_for(pool, FLUX), flux_inputs(gen, 2, 6, 8)
    if spec == "sd3":
        return payload_for(pool, SD3), sd3_inputs(gen, 2, 6, 7)
    return payload_for(pool, HUNYUAN), hunyuan_inputs(gen, 2, 2, 6, 4)


@pytest.mark.parametrize("spec", ["wan", "flux", "sd3", "hunyuan"])
def test_cfg_parallel_on_two_ranks_matches_one_process(pool2, spec):
    payload, inputs = _cfg_case(pool2, spec, torch.Generator().manual_seed(7))
    want = pool2.run(one_process, payload, inputs)[0]
    got, session, _ = run_parallel(pool2, payload, inputs, cfg=2, ulysses=1, ring=1, cond_or_uncond=[0, 1])
    assert_close(got, want)
    got2 = session.call(inputs["x"], inputs["timestep"], inputs["conds"], [1, 0])  # labels in the other order
    assert_close(got2, want)


@pytest.mark.parametrize("spec", ["sd3", "hunyuan"])
def test_cfg_and_sequence_together_on_four_ranks_mmdit(pool4, spec):
    payload, inputs = _cfg_case(pool4, spec, torch.Generator().manual_seed(13))
    want = pool4.run(one_process, payload, inputs)[0]
    got, _, _ = run_parallel(pool4, payload, inputs, cfg=2, ulysses=1, ring=2, cond_or_uncond=[1, 0])
    assert_close(got, want)


def test_cfg_and_sequence_together_on_four_ranks(pool4):
    gen = torch.Generator().manual_seed(11)
    payload, inputs = payload_for(pool4, WAN), wan_inputs(gen, 2, 3, 6, 8)
    want = pool4.run(one_process, payload, inputs)[0]
    got, session, key = run_parallel(pool4, payload, inputs, cfg=2, ulysses=2, ring=1, cond_or_uncond=[0, 1])
    assert_close(got, want)
    # the model was sent once: a second call reuses the same runner on every worker
    before = pool4.run(runner_stats, key)
    assert_close(session.call(inputs["x"], inputs["timestep"], inputs["conds"], [0, 1]), want)
    after = pool4.run(runner_stats, key)
    assert [b["runner"] for b in before] == [a["runner"] for a in after]


def test_cfg_one_runs_on_the_first_branch_and_says_why(pool2, genesis_log):
    gen = torch.Generator().manual_seed(3)
    payload, inputs = payload_for(pool2, WAN), wan_inputs(gen, 1, 1, 4, 4)
    want = pool2.run(one_process, payload, inputs)[0]
    got, _, _ = run_parallel(pool2, payload, inputs, cfg=2, ulysses=1, ring=1, cond_or_uncond=[0])
    assert_close(got, want)
    assert any("CFG = 1" in m and "nothing to split" in m for m in genesis_log)


@pytest.mark.parametrize("cfg,ulysses,ring,ring_impl", [(1, 2, 1, "ring"), (1, 1, 2, "allgather"), (2, 1, 1, "ring")])
def test_the_quality_level_reaches_the_workers_attention(pool2, cfg, ulysses, ring, ring_impl):
    """The level a model is loaded with, then the one each call carries, governs every attention call on the
    workers: sharded, local (the text refiner) and CFG-only: an fp8-class backend serves at 'fast' only."""
    from genesis_core.interop.comfy_parallel import QUALITY_KEY, build_diffusion_runner

    batch, cou = (2, [0, 1]) if cfg == 2 else (1, None)
    payload = payload_for(pool2, HUNYUAN)
    inputs = hunyuan_inputs(torch.Generator().manual_seed(3), batch, 2, 4, 6, mask="binary")
    want = pool2.run(one_process, payload, inputs)[0]
    pool2.run(fake_backend, True)
    try:
        session = ParallelSession(pool2, cfg=cfg, ulysses=ulysses, ring=ring)
        for loaded, extras, ran in (("exact", None, False), ("exact", {QUALITY_KEY: "fast"}, True),
                                    ("exact", {QUALITY_KEY: "high"}, False), ("exact", {}, False),
                                    ("fast", None, True), ("fast", {QUALITY_KEY: "exact"}, False)):
            if loaded != getattr(session, "loaded", None):
                session.load(build_diffusion_runner, payload, {"backend": "auto", "quality": loaded,
                                                               "ring_impl": ring_impl})
                session.loaded = loaded
            before = pool2.run(fake_backend, True)
            got = session.call(inputs["x"], inputs["timestep"], inputs["conds"], cou, extras)
            assert_close(got, want)
            runs = [set(a[len(b):]) for a, b in zip(pool2.run(fake_backend, True), before)]
            # at 'fast' both kinds of call: the image tokens' attention (sharded or CFG) and the text refiner's
            assert all(len(r) == 2 for r in runs) if ran else runs == [set(), set()], (extras, runs)
    finally:
        pool2.run(fake_backend, False)


def support_of(ctx, spec, overrides, ulysses, ring):
    """What sequence_support says of ComfyUI's own class at this configuration (built on rank 0)."""
    if ctx.rank != 0:
        return None
    from genesis_core.interop.comfy_parallel import _prepare_comfy, sequence_support
    import importlib

    _prepare_comfy("cpu", str(COMFY))
    import comfy.ops

    cls = getattr(importlib.import_module(spec["module"]), spec["cls"])
    model = cls(**{**spec["kwargs"], **overrides}, operations=comfy.ops.disable_weight_init, device="cpu")
    return sequence_support(model, ulysses, ring)


@pytest.mark.parametrize("spec,overrides,mesh,message", [
    (SD3, {"depth": 3, "x_block_self_attn_layers": []}, (2, 1), "3 attention heads do not divide among 2 Ulysses"),
    (SD3, {"depth": 3, "x_block_self_attn_layers": []}, (1, 2), None),
    (HUNYUAN, {"num_heads": 2, "axes_dim": [8, 4, 4]}, (4, 1), "2 attention heads do not divide among 4 Ulysses"),
    (HUNYUAN, {"depth": 0}, (2, 1), "HunyuanVideo configuration has no double blocks"),
    (FLUX, {}, (2, 2), None), (WAN, {}, (4, 1), None),
])
def test_comfy_models_that_cannot_be_split_are_refused(pool2, spec, overrides, mesh, message):
    said = pool2.run(support_of, spec, overrides, *mesh)[0]
    assert said is None if message is None else message in said


def test_models_and_settings_that_cannot_be_split_are_refused():
    from genesis_core.interop.comfy_parallel import sequence_support

    class Other(torch.nn.Module):
        num_heads = 4

    said = sequence_support(Other(), 2)
    assert "supports ComfyUI's Flux, Wan (WanModel), SD3" in said and "this model is Other" in said
    WanLike = type("WanModel", (torch.nn.Module,), {"forward_orig": lambda self: None, "num_heads": 12})
    WanLike.forward_orig.__qualname__ = "WanModel.forward_orig"
    assert sequence_support(WanLike(), 4) is None
    assert "12 attention heads do not divide among 8 Ulysses ranks" in sequence_support(WanLike(), 8)
