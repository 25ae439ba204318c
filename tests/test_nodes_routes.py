"""nodes/routes.py without a server: the /genesis/backends payload, the autotune winner, and registration."""
from __future__ import annotations

import importlib
import json
import sys

from comfy_helpers import load_pack

pack = load_pack()
routes = importlib.import_module(pack.__name__ + ".nodes.routes")


def test_payload_lists_backends_with_reasons():
    data = routes.backends_payload()
    json.dumps(data, default=str)  # what the route sends must serialise
    names = {r["name"] for r in data["attention"]}
    assert {"sdpa", "pytorch", "flash", "sage", "xformers"} <= names
    for row in data["attention"] + data["compute"]:
        assert row["available"] or row["reason"], row
    assert set(data["choices"]) == {"auto", "flash", "sage", "xformers", "sdpa", "pytorch"}
    assert data["choices"]["pytorch"]["available"] is True
    assert {r["name"] for r in data["compute"]} == {"cuda", "cpu", "npu", "mps", "onnx", "rocm", "webgpu"}


def test_fastest_choice_counts_wins_and_maps_sdpa_subkernels():
    timings = {
        "a": {"sdpa_cudnn": 1.0, "flash": 2.0, "chosen": "sdpa_cudnn", "rejected": {}},
        "b": {"sdpa_flash": 1.0, "sage": 3.0, "chosen": "sdpa_flash", "rejected": {}},
        "c": {"sage": 0.5, "sdpa": 1.0, "chosen": "sage", "rejected": {}},
        "d": {"flash": 0.5, "sdpa": 1.0, "chosen": None, "rejected": {}},
    }
    assert routes.fastest_choice(timings) == "sdpa"
    assert routes.fastest_choice({}) is None and routes.fastest_choice(None) is None


def test_register_is_a_no_op_outside_comfyui(monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert routes.register() is False
    assert "server" not in sys.modules  # never imported


def test_register_adds_the_route_to_a_prompt_server(monkeypatch):
    import types

    added = {}

    class Routes:
        def get(self, path):
            def deco(fn):
                added[path] = fn
                return fn
            return deco

    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(routes=Routes())})
    monkeypatch.setitem(sys.modules, "server", fake)
    monkeypatch.setattr(routes, "_registered", False)
    assert routes.register() is True
    assert "/genesis/backends" in added


def test_payload_stays_small_however_many_signatures_are_cached(monkeypatch, tmp_path):
    """The route sends a bounded summary (it answered 13 MB bodies for a 200 MB cache before); details on request."""
    monkeypatch.setenv("GENESIS_CACHE_DIR", str(tmp_path))
    store = importlib.import_module(pack.__name__ + ".genesis_core.attn.autotune.store")
    store.reload()
    n = 3000
    entries = {f"cpu float32 BH{i} Nq64 Nk64 D64 mask=none BHND": {
        "chosen": "sdpa", "ms": {"sdpa": 1.0 + i * 1e-4, "pytorch": 2.0}, "rejected": {"sage": "x" * 200},
        "when": f"2026-12-01T00:{i // 60 % 60:02d}:{i % 60:02d}Z"} for i in range(n)}
    monkeypatch.setattr(store, "_entries", dict(entries))
    monkeypatch.setattr(store, "_loaded", {"cpu", "accel"})
    data = routes.backends_payload()
    body = json.dumps(data, default=str)
    assert data["autotune"]["signatures"] == n and data["autotune"]["shown"] == routes.SUMMARY_LIMIT
    assert len(body) < 64 * 1024, len(body)
    assert data["fastest"] == "sdpa"
    sig = next(iter(entries))
    detail = routes.autotune_detail(sig)
    assert detail["entry"]["ms"] == entries[sig]["ms"]
    assert "no measurement" in routes.autotune_detail("nope")["error"]
    assert len(routes.autotune_detail(None)["signatures"]) == n
