"""The pack installs ComfyUI's progress bar as the engine's progress factory; the engine itself never imports it."""
from __future__ import annotations

import sys
import types

import torch

from comfy_helpers import load_pack

pack = load_pack()


def test_the_pack_shows_comfyuis_progress_bar_while_the_autotuner_measures(monkeypatch):
    updates = []

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update(self, n):
            updates.append((self.total, n))

    fake_comfy = types.ModuleType("comfy")
    fake_utils = types.ModuleType("comfy.utils")
    fake_utils.ProgressBar = ProgressBar
    fake_comfy.utils = fake_utils
    monkeypatch.setitem(sys.modules, "comfy", fake_comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", fake_utils)
    engine = sys.modules[pack.__name__ + ".genesis_core"]
    from importlib import import_module

    measuring = import_module(engine.__name__ + ".attn.autotune.measuring")
    types_mod = import_module(engine.__name__ + ".attn.types")
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    call = types_mod.AttentionCall(q, k, v, None, 8 ** -0.5)
    entry = measuring.measure(call, ["sdpa", "pytorch"])
    assert entry["chosen"] in ("sdpa", "pytorch")
    assert len(updates) == 3 and all(total == 3 and n == 1 for total, n in updates)


def test_without_comfyui_the_bar_is_silent(monkeypatch):
    monkeypatch.setitem(sys.modules, "comfy", None)  # import comfy.utils now fails
    monkeypatch.delitem(sys.modules, "comfy.utils", raising=False)
    progress = sys.modules[pack.__name__ + ".genesis_core.progress"]
    bar = progress.bar(3)
    bar.step()  # no error, nothing shown
