"""Quality per sampling step in ComfyUI: the Attention Switch's ``quality`` and ``exact_steps``.

Without ComfyUI: how a sigma maps to a step and a step to a level, how the override reads the step once per
model call, and that the level reaches the engine (an explicit 8-bit test kernel runs only where the level
admits it). With a ComfyUI checkout (``COMFYUI_PATH``, in a subprocess): ComfyUI's own sampler over a tiny
model built from ComfyUI's classes, where each step's attention calls are recorded against the step the
sampler reports through its callback.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from comfy_helpers import comfyui_path, load_pack, torchvision_stub_env

pack = load_pack()
interop = importlib.import_module(pack.__name__ + ".genesis_core.interop")
registry = importlib.import_module(pack.__name__ + ".genesis_core.attn.registry")
dispatch = importlib.import_module(pack.__name__ + ".genesis_core.attn.dispatch")
SWITCH = pack.NODE_CLASS_MAPPINGS["GenesisAttentionSwitch"]

SCHEDULE = [14.6, 9.0, 5.5, 3.1, 1.6, 0.7, 0.0]  # 6 steps, falling to 0 like ComfyUI's schedulers


# ---------------------------------------------------------------- sigma -> step -> level


def test_step_index_follows_the_schedule():
    for i, s in enumerate(SCHEDULE[:-1]):
        assert interop.step_index(SCHEDULE, s) == i
        assert interop.step_index(SCHEDULE, s * (1 - 1e-7)) == i  # float32 rounding of the same sigma
    assert interop.step_index(SCHEDULE, 4.0) == 2  # between sigmas[2] and sigmas[3]: a call inside step 2
    assert interop.step_index(SCHEDULE, 99.0) == 0 and interop.step_index(SCHEDULE, 0.0) == 5  # clamped
    assert interop.step_index([0.1, 0.5, 0.9, 1.0], 0.52) == 1  # a rising schedule: the nearest value
    assert interop.step_index([3.0], 3.0) == 0


@pytest.mark.parametrize("exact_steps,expected", [
    (0, "mmmmmm"), (1, "emmmme"), (2, "eemmee"), (3, "eeeeee"), (7, "eeeeee"),
])
def test_first_and_last_steps_are_exact(exact_steps, expected):
    got = "".join("e" if interop.step_level(i, 6, exact_steps, "fast") == "exact" else "m" for i in range(6))
    assert got == expected
    assert interop.step_level(3, 7, 3, "high") == "high"  # 7 steps, 3 each end: only the middle one
    assert [interop.step_level(i, 7, 4, "high") for i in range(7)] == ["exact"] * 7


def _options(sigma: float, schedule=None):
    sched = torch.tensor(SCHEDULE if schedule is None else schedule)
    return {"sample_sigmas": sched, "sigmas": torch.tensor([sigma, sigma])}


def test_begin_model_call_reads_each_sigma_tensor_once():
    o = interop.GenesisAttentionOverride("auto", quality="fast", exact_steps=2)
    sched = torch.tensor(SCHEDULE)
    levels = []
    for s in SCHEDULE[:-1]:
        to = {"sample_sigmas": sched, "sigmas": torch.tensor([s])}
        levels.append(o.begin_model_call(to))
        # The second model call of one step (uncond run apart from cond) hands the same sigma tensor:
        # its value is not read again (changing it in place shows that), the level is shared.
        to["sigmas"].fill_(SCHEDULE[2])
        assert o.begin_model_call(to) == levels[-1]
    assert levels == ["exact", "exact", "fast", "fast", "exact", "exact"]
    assert [i for i, _, _ in o.step_levels] == [0, 1, 2, 3, 4, 5] and {n for _, n, _ in o.step_levels} == {6}
    assert o.level == "exact"


def test_without_a_schedule_or_exact_steps_every_call_runs_at_the_chosen_level():
    o = interop.GenesisAttentionOverride("auto", quality="high", exact_steps=1)
    assert o.begin_model_call({}) == "high"
    assert o.begin_model_call({"sigmas": torch.tensor([1.0])}) == "high"  # no sample_sigmas: not sampling
    none = interop.GenesisAttentionOverride("auto", quality="fast", exact_steps=0)
    assert none.begin_model_call(_options(SCHEDULE[0])) == "fast" and none.step_levels == []
    exact = interop.GenesisAttentionOverride("auto", quality="exact", exact_steps=3)
    assert exact.begin_model_call(_options(SCHEDULE[2])) == "exact" and exact.step_levels == []


def test_an_explicit_lossy_backend_runs_at_least_at_its_own_level():
    assert interop.GenesisAttentionOverride("sage", quality="exact").middle_level == "high"
    assert interop.GenesisAttentionOverride("sage", quality="fast").middle_level == "fast"
    assert interop.GenesisAttentionOverride("sdpa", quality="exact").middle_level == "exact"
    assert interop.GenesisAttentionOverride("auto").middle_level is None  # the engine's default
    with pytest.raises(ValueError, match="quality must be one of exact, high, fast"):
        interop.GenesisAttentionOverride("auto", quality="turbo")
    with pytest.raises(ValueError, match="exact_steps must be a non-negative int"):
        interop.GenesisAttentionOverride("auto", exact_steps=-1)


def test_step_wrapper_passes_everything_through_and_restores_the_level():
    o = interop.GenesisAttentionOverride("auto", quality="fast", exact_steps=1)
    wrapper = interop.make_step_wrapper(o)
    seen = {}

    def executor(*args, **kwargs):
        seen["args"], seen["kwargs"], seen["level"] = args, kwargs, o.level
        return "model output"

    x, t = torch.zeros(1), torch.tensor([SCHEDULE[0]])
    to = {"sample_sigmas": torch.tensor(SCHEDULE), "sigmas": t}
    assert wrapper(executor, x, t, None, None, None, to, extra=1) == "model output"
    assert seen["args"] == (x, t, None, None, None, to) and seen["kwargs"] == {"extra": 1}
    assert seen["level"] == "exact" and o.level == "fast"
    to2 = {"sample_sigmas": to["sample_sigmas"], "sigmas": torch.tensor([SCHEDULE[3]])}
    wrapper(executor, x, to2["sigmas"], None, None, None, to2)
    assert seen["level"] == "fast"
    broken = {"sample_sigmas": "not a schedule", "sigmas": torch.tensor([1.0])}
    wrapper(executor, x, t, None, None, None, broken)  # bookkeeping fails: sampling goes on, middle level
    assert seen["level"] == "fast"


# ---------------------------------------------------------------- the level reaches the engine


def _int8_test_backend(name: str, runs: list):
    """An 'int8'-class test kernel (exact results, so the accuracy guard admits it) that records its runs."""
    sdpa = registry.get("sdpa")

    def run(call):
        runs.append(call.q.shape)
        return sdpa.run(call)

    return registry.Backend(name=name, probe=lambda: None, run=run, description=lambda: "test int8 kernel",
                            precision="int8", tolerance={torch.float32: 1e-3})


def test_exact_steps_keep_an_int8_kernel_out_and_the_middle_steps_use_it():
    runs: list = []
    registry.register(_int8_test_backend("int8_steps_test", runs), rank=999)
    try:
        o = interop.GenesisAttentionOverride("int8_steps_test", quality="high", exact_steps=1)
        sched = torch.tensor(SCHEDULE)
        q, k, v = (torch.randn(2, 9, 2 * 8) for _ in range(3))
        per_step = []
        for s in SCHEDULE[:-1]:
            o.begin_model_call({"sample_sigmas": sched, "sigmas": torch.tensor([s])})
            before = len(runs)
            for _ in range(3):
                out = o(None, q, k, v, 2)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    *(t.view(2, 9, 2, 8).transpose(1, 2) for t in (q, k, v))).transpose(1, 2).reshape(2, 9, 16)
                torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
            per_step.append(len(runs) - before)
        assert per_step[0] == per_step[-1] == 0, per_step  # exact steps: the int8 kernel is outside the budget
        assert all(n >= 3 for n in per_step[1:-1]), per_step  # middle steps: it serves (plus its guard check)
        table = dict(o.run_table())
        exact_rows = [s for s in table if s.endswith("quality=exact")]
        high_rows = [s for s in table if s.endswith("quality=high")]
        assert len(exact_rows) == 1 and set(table[exact_rows[0]]) == {"sdpa"}
        assert len(high_rows) == 1 and table[high_rows[0]] == {"int8_steps_test": 12}
    finally:
        registry.unregister("int8_steps_test")
        dispatch.clear_plans()


def test_node_inputs_and_their_checks():
    spec = SWITCH.INPUT_TYPES()["required"]
    assert spec["quality"][0] == ["exact", "high", "fast"] and spec["quality"][1]["default"] == "exact"
    assert "README" in spec["quality"][1]["tooltip"]
    steps = spec["exact_steps"]
    assert steps[0] == "INT" and (steps[1]["min"], steps[1]["max"]) == (0, 1000) and steps[1]["default"] == 1
    assert "first N and last N sampling steps run at 'exact'" in steps[1]["tooltip"]

    class Model:  # the two attributes the node checks for before cloning
        model_options: dict = {}

        def clone(self):
            raise AssertionError("a bad input must be refused before the model is cloned")

    with pytest.raises(ValueError, match="input 'quality' must be one of exact, high, fast; got 'turbo'"):
        SWITCH().execute(Model(), "auto", "turbo", 1)
    with pytest.raises(ValueError, match="input 'exact_steps' must be an integer from 0 to 1000; got -2"):
        SWITCH().execute(Model(), "auto", "fast", -2)


# ---------------------------------------------------------------- ComfyUI's own sampler (subprocess)

COMFY = comfyui_path()
STEPS = 6
RUNS = [(0, False), (1, False), (2, True), (3, False)]  # (exact_steps, cond and uncond in separate model calls)


def _entry() -> None:
    """Runs in a fresh interpreter whose working directory is the ComfyUI checkout."""
    sys.path.insert(0, str(COMFY))
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.modules.attention as comfy_attention
    import comfy.patcher_extension as pe
    import comfy.sample
    from comfy_helpers import tiny_sd_model

    optimized_before = comfy_attention.optimized_attention
    runs: list = []
    registry.register(_int8_test_backend("int8_comfy_test", runs), rank=999)
    base = tiny_sd_model()
    options_before = repr(base.model_options)
    results = []
    for exact_steps, separate in RUNS:
        if True:
            t0 = time.perf_counter()
            model = SWITCH().execute(base, "int8_comfy_test", "high", exact_steps)[0]
            if separate:  # cond and uncond in two model calls, as ComfyUI does when they do not fit together
                model.model.memory_required = lambda *a, **k: 1e30
            override = model.model_options["transformer_options"]["optimized_attention_override"]
            step = {"i": 0}
            per_step = [{"calls": 0, "int8": 0} for _ in range(STEPS)]
            calls_before = [0]

            def callback(i, x0, x, total, step=step, per_step=per_step, override=override):
                per_step[i]["calls"] = override.calls - calls_before[0]
                calls_before[0] = override.calls
                step["i"] = i + 1

            real_run = registry.get("int8_comfy_test").run

            def counting_run(call, step=step, per_step=per_step, real_run=real_run):
                per_step[min(step["i"], STEPS - 1)]["int8"] += 1
                return real_run(call)

            registry.get("int8_comfy_test").run = counting_run
            gen = torch.Generator().manual_seed(1)
            latent = torch.zeros(1, 4, 16, 16)
            noise = torch.randn(1, 4, 16, 16, generator=gen)
            pos = [[torch.randn(1, 7, 64, generator=gen), {}]]
            neg = [[torch.randn(1, 7, 64, generator=gen), {}]]  # same length: one batch of 2 unless separate
            out = comfy.sample.sample(model, noise, STEPS, 4.0, "euler", "normal", pos, neg, latent, seed=1,
                                      callback=callback, disable_pbar=True)
            registry.get("int8_comfy_test").run = real_run
            if separate:
                del model.model.memory_required  # the clone shares the model object with the next runs
            wrappers = model.wrappers.get(pe.WrappersMP.APPLY_MODEL, {})
            results.append({"exact_steps": exact_steps, "separate": separate, "per_step": per_step,
                            "finite": bool(torch.isfinite(out).all()),
                            "step_levels": [list(x) for x in override.last_step_levels],
                            "table": [[s, c] for s, c in override.last_run],
                            "apply_model_wrappers": sum(len(v) for v in wrappers.values()),
                            "seconds": time.perf_counter() - t0})
    def step_wrappers(m):
        return sum(len(v) for v in m.wrappers.get(pe.WrappersMP.APPLY_MODEL, {}).values())

    once = SWITCH().execute(base, "auto", "fast", 2)[0]
    twice = {"steps_then_steps": step_wrappers(SWITCH().execute(once, "auto", "high", 1)[0]),
             "steps_then_exact": step_wrappers(SWITCH().execute(once, "sdpa", "exact", 3)[0]),
             "first": step_wrappers(once)}
    print("GENESIS_RESULT " + json.dumps({
        "results": results, "twice": twice, "original_untouched": repr(base.model_options) == options_before,
        "original_wrappers": sum(len(v) for w in base.wrappers.values() for v in w.values()),
        "global_untouched": comfy_attention.optimized_attention is optimized_before}), flush=True)


@pytest.fixture(scope="module")
def sampled():
    if COMFY is None:
        pytest.skip("set COMFYUI_PATH to a ComfyUI checkout")
    # One thread: a tiny model's kernels are far shorter than a thread hand-off on a busy 2-core machine.
    env = dict(os.environ, COMFYUI_PATH=str(COMFY), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        env = torchvision_stub_env(env, Path(tmp))
        code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                f"import test_comfyui_quality_steps as t; t._entry()")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                             cwd=str(COMFY))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("GENESIS_RESULT ")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    result = json.loads(lines[-1][len("GENESIS_RESULT "):])
    result["_stderr"] = out.stderr
    return result


def _expected_exact(exact_steps: int):
    return [i < exact_steps or i >= STEPS - exact_steps for i in range(STEPS)]


@pytest.mark.parametrize("exact_steps,separate", RUNS)
def test_comfy_sampler_runs_the_first_and_last_steps_exact(sampled, exact_steps, separate):
    row = next(r for r in sampled["results"] if r["exact_steps"] == exact_steps and r["separate"] == separate)
    assert row["finite"]
    exact = _expected_exact(exact_steps)
    for i, (is_exact, counts) in enumerate(zip(exact, row["per_step"])):
        assert counts["calls"] > 0, (i, row["per_step"])
        if is_exact:
            assert counts["int8"] == 0, f"step {i} should be exact: {row['per_step']}"
        else:
            assert counts["int8"] >= counts["calls"], f"step {i} should run the int8 kernel: {row['per_step']}"
    # One step reading per sampler step, cond and uncond in one model call or two alike.
    assert [i for i, _, _ in row["step_levels"]] == ([] if exact_steps == 0 else list(range(STEPS)))
    assert all(n == STEPS for _, n, _ in row["step_levels"])
    assert [lv == "exact" for _, _, lv in row["step_levels"]] == ([] if exact_steps == 0 else exact)
    levels = {sig.rsplit("quality=", 1)[1] for sig, _ in row["table"]}
    assert levels == ({"exact", "high"} if 0 < exact_steps < STEPS / 2 else {"high"} if exact_steps == 0 else {"exact"})
    assert row["apply_model_wrappers"] == (1 if exact_steps else 0)
    batches = {sig.split(" B=")[1].split()[0] for sig, _ in row["table"]}
    assert batches == ({"1"} if separate else {"2"})  # cond and uncond apart, or in one model call


def test_comfy_sampling_leaves_the_input_model_and_comfyui_untouched(sampled):
    assert sampled["original_untouched"] and sampled["original_wrappers"] == 0
    assert sampled["global_untouched"]
    assert "steps at exact: 0, 5 of 6" in sampled["_stderr"]


def test_switching_twice_keeps_one_step_wrapper(sampled):
    # the second switch replaces the first's wrappers; with nothing held below exact it needs none
    assert sampled["twice"] == {"steps_then_steps": 1, "steps_then_exact": 0, "first": 1}
