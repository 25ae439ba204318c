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
