"""With a real ComfyUI checkout (COMFYUI_PATH): load the pack with ComfyUI's own loader, patch a small model
built from ComfyUI's classes, and sample with every attention choice against the unpatched model."""
from __future__ import annotations

import pytest

from comfy_helpers import comfy_subprocess, comfyui_path

pytestmark = pytest.mark.skipif(comfyui_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout")


@pytest.fixture(scope="module")
def sampling():
    return comfy_subprocess("sampling_check")


def test_pack_loads_with_comfy_loader(sampling):
    assert sampling["loaded"] is True


def test_every_choice_matches_unpatched_sampling(sampling):
    rows = {r["choice"]: r for r in sampling["rows"]}
    assert set(rows) == {"auto", "flash", "sage", "xformers", "sdpa", "pytorch"}
    for choice, row in rows.items():
        assert row["is_clone"], choice
        assert row["calls"] > 0, f"{choice}: the override was never called"
        assert row["fallback_calls"] == 0, f"{choice}: Genesis handed calls back to ComfyUI"
        assert row["rel_err"] < 1e-4, f"{choice}: sampling differs from the unpatched model by {row['rel_err']:.2e}"


def test_original_model_is_untouched(sampling):
    assert sampling["original_untouched"]
    assert sampling["original_after_equal"]


def test_replace_patch_fallback_matches(sampling):
    fb = sampling["fallback"]
    assert fb["transformer_blocks"] > 0
    assert fb["attn1_blocks"] == fb["attn2_blocks"] == fb["transformer_blocks"]  # every block of the UNet
    assert not fb["has_override_key"]
    assert fb["calls"] > 0
    assert fb["rel_err"] < 1e-4


def test_each_run_logs_backend_per_signature(sampling):
    assert "call signature(s)" in sampling["_stderr"]
    assert "sampling finished: attention=sdpa" in sampling["_stderr"]


def test_switching_twice_keeps_one_override_and_one_wrapper(sampling):
    assert sampling["chained"] == {"backend": "sdpa", "wrappers": 1, "original_wrappers": 0}


def test_backend_select_model_clone_samples_through_comfy(sampling):
    assert sampling["placement"] == {"load_device": "cpu", "is_clone": True, "equal": True, "original_load_device": "cpu"}


# ---------------------------------------------------------------- the end-to-end GPU script, dry run on CPU


@pytest.fixture(scope="module")
def e2e_dry_run(tmp_path_factory):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path_factory.mktemp("e2e")
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu" / "comfy_e2e_gpu.py"
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(script), "--cpu-dry-run", "--out", str(out), "--rounds", "2",
                           "--steps", "2", "--reps", "3"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads((out / "comfy_e2e_gpu.json").read_text())


def test_e2e_script_times_every_model_and_level(e2e_dry_run):
    text, data = e2e_dry_run
    assert set(data["models"]) == {"wan", "sdxl", "flux"} and not data["errors"]
    for name, res in data["models"].items():
        assert set(res["s_per_step"]) == {"comfy", "exact", "high", "fast"}, name
        assert all(t > 0 for t in res["s_per_step"].values()) and set(res["first_call_s"]) == set(res["s_per_step"])
        # float32 on CPU: every level is served by exact kernels, so the sampled latents agree closely
        assert all(d < 1e-4 for d in res["latent_rel_diff"].values()), (name, res["latent_rel_diff"])
        for level, table in res["served"].items():
            served = {b for _, counts in table for b in counts}
            assert table and not any(b.startswith("comfy:") for b in served), (name, level, table)
    wan = data["models"]["wan"]["info"]
    assert (wan["layers"], wan["heads"], wan["batch"]) == (2, 4, 2)


def test_e2e_script_checks_the_autotuner_against_plain_timings(e2e_dry_run):
    text, data = e2e_dry_run
    chk = data["checks"]["wan_autotuner"]
    assert chk["shape"] == "B2 H4 N48 D16 float32" and chk["strides"]["contiguous_bnhd"]
    assert "sdpa" in chk["autotuner_ms"] and "sdpa" in chk["autotuner_again_ms"]
    plain = chk["plain_ms"]
    assert plain["genesis sdpa.run(call)"]["median_ms"] > 0
    assert plain["comfy attention_pytorch (ComfyUI's own function)"]["median_ms"] > 0
    assert chk["kernels"]["genesis sdpa.run(call)"] and chk["in_model_attention"]
    assert "plain timing" in chk["verdict"] and chk["step_ms_per_layer"] > 0
    assert any(v["what"].startswith("wan exact") for v in data["verdicts"])
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert lines[-1].startswith("elapsed") and any(ln.startswith(("PASS", "FAIL")) for ln in lines[-12:])
