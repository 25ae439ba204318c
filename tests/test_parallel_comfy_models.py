"""ComfyUI's own Wan and Flux model classes at small random configurations, sharded over 2 and 4 gloo
processes (sequence mode), split by CFG branch, and both: the results equal one process running the same model
(computed in a worker without any collective). Needs a ComfyUI checkout in COMFYUI_PATH."""
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
    key = (spec["cls"], seed)
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


# ---------------------------------------------------------------- tests


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), frames=st.integers(1, 3), h=st.sampled_from([4, 6, 7]),
       w=st.sampled_from([4, 8, 9]), mesh=st.sampled_from([(4, 1), (2, 2), (1, 4)]),
       ring_impl=st.sampled_from(["ring", "allgather"]))
def test_wan_sequence_parallel_on_four_ranks_matches_one_process(pool4, seed, frames, h, w, mesh, ring_impl):
    payload = payload_for(pool4, WAN)
    inputs = wan_inputs(torch.Generator().manual_seed(seed), 1, frames, h, w)
    want = pool4.run(one_process, payload, inputs)[0]
    got, session, key = run_parallel(pool4, payload, inputs, cfg=1, ulysses=mesh[0], ring=mesh[1], ring_impl=ring_impl)
    assert_close(got, want)
    stats = pool4.run(runner_stats, key)
    assert all(s["sharded"] == WAN["kwargs"]["num_layers"] for s in stats)  # every self-attention was sharded
    assert all(s["local"] == WAN["kwargs"]["num_layers"] for s in stats)    # every cross-attention stayed local


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), h=st.sampled_from([4, 6, 10]), w=st.sampled_from([4, 8, 10]),
       ctx_len=st.integers(1, 9), mesh=st.sampled_from([(4, 1), (2, 2), (1, 4)]))
def test_flux_sequence_parallel_on_four_ranks_matches_one_process(pool4, seed, h, w, ctx_len, mesh):
    payload = payload_for(pool4, FLUX)
    inputs = flux_inputs(torch.Generator().manual_seed(seed), 1, h, w, ctx_len)
    want = pool4.run(one_process, payload, inputs)[0]
    got, session, key = run_parallel(pool4, payload, inputs, cfg=1, ulysses=mesh[0], ring=mesh[1])
    assert_close(got, want)
    stats = pool4.run(runner_stats, key)
    blocks = FLUX["kwargs"]["depth"] + FLUX["kwargs"]["depth_single_blocks"]
    assert all(s["sharded"] == blocks and s["local"] == 0 for s in stats)


@pytest.mark.parametrize("spec", ["wan", "flux"])
def test_cfg_parallel_on_two_ranks_matches_one_process(pool2, spec):
    gen = torch.Generator().manual_seed(7)
    if spec == "wan":
        payload, inputs = payload_for(pool2, WAN), wan_inputs(gen, 2, 2, 6, 8)
    else:
        payload, inputs = payload_for(pool2, FLUX), flux_inputs(gen, 2, 6, 8)
    want = pool2.run(one_process, payload, inputs)[0]
    got, session, _ = run_parallel(pool2, payload, inputs, cfg=2, ulysses=1, ring=1, cond_or_uncond=[0, 1])
    assert_close(got, want)
    got2 = session.call(inputs["x"], inputs["timestep"], inputs["conds"], [1, 0])  # labels in the other order
    assert_close(got2, want)


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


def test_models_and_settings_that_cannot_be_split_are_refused():
    from genesis_core.interop.comfy_parallel import sequence_support

    class Other(torch.nn.Module):
        num_heads = 4

    assert "supports ComfyUI's Flux and Wan" in sequence_support(Other(), 2)
    WanLike = type("WanModel", (torch.nn.Module,), {"forward_orig": lambda self: None, "num_heads": 12})
    WanLike.forward_orig.__qualname__ = "WanModel.forward_orig"
    assert sequence_support(WanLike(), 4) is None
    assert "12 attention heads do not divide among 8 Ulysses ranks" in sequence_support(WanLike(), 8)
