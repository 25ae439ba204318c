"""The bench CLI on tiny CPU shapes: argument parsing, table and JSON format, accuracy flags."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genesis_core import bench
from genesis_core.attention import dispatch, registry
from genesis_core.attention.registry import Backend

REPO = Path(__file__).resolve().parents[1]


def test_parse_shapes_named_custom_and_errors():
    assert [s.name for s in bench.parse_shapes("sdxl")] == ["sdxl-self-4k", "sdxl-cross-77"]
    shapes = bench.parse_shapes("flux,wan;2,3,40,50,16")
    assert [s.name for s in shapes[:2]] == ["flux-4608", "wan-32k"]
    custom = shapes[2]
    assert (custom.b, custom.h, custom.nq, custom.nk, custom.d) == (2, 3, 40, 50, 16)
    assert custom.flops == 4 * 2 * 3 * 40 * 50 * 16
    assert len(bench.parse_shapes("diffusion")) == 8
    for bad in ("sd3", "1,2,3", "1,2,3,4,0", ""):
        with pytest.raises(ValueError, match="--shapes"):
            bench.parse_shapes(bad)


def test_bad_arguments_exit_2(capsys):
    assert bench.main(["--shapes", "nope", "--device", "cpu"]) == 2
    assert "--shapes entry 'nope'" in capsys.readouterr().err
    assert bench.main(["--section", "attention,colour", "--device", "cpu"]) == 2
    assert bench.main(["--backends", "warp_drive", "--device", "cpu"]) == 2


def test_attention_table_and_json_on_tiny_shapes(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = bench.main(["--device", "cpu", "--shapes", "tiny;1,2,20,9,8", "--reps", "2", "--section", "attention",
                       "--backends", "sdpa,pytorch,sdpa_math,sage", "--json", str(out_json), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert text.startswith("Genesis bench: ")
    header = next(line for line in text.splitlines() if line.startswith("shape"))
    assert header.split() == ["shape", "backend", "ms", "TFLOP/s", "rel", "err", "status"]
    assert "AUTO against the fastest correct backend" in text
    assert "skipped" in text  # sage cannot run on CPU and says why
    data = json.loads(out_json.read_text())
    assert {"environment", "settings", "attention", "summary", "autotune"} <= set(data)
    rows = data["attention"]
    assert {(r["shape"], r["backend"]) for r in rows} == {
        (s, b) for s in ("tiny", "custom-1x2x20x9x8") for b in ("sdpa", "pytorch", "sdpa_math", "sage", "auto")}
    for r in rows:
        if r["backend"] == "sage":
            assert r["status"] == "skipped" and ("CUDA" in r["note"] or "not installed" in r["note"])
            continue
        assert r["status"] == "ok" and r["correct"] is True, r
        assert r["ms"] > 0 and r["rel_err"] < 1e-5
        flops = 4 * r["B"] * r["H"] * r["Nq"] * r["Nk"] * r["D"]
        assert math.isclose(r["tflops"], flops / (r["ms"] * 1e-3) / 1e12, rel_tol=1e-9)
    auto = [r for r in rows if r["backend"] == "auto"]
    assert all(r["chosen"] in registry.names() for r in auto)
    assert all(s["fastest_correct"] in ("sdpa", "pytorch", "sdpa_math") for s in data["summary"])
    assert all(s["auto_vs_fastest"] > 0 for s in data["summary"])


def test_inaccurate_backend_is_flagged():
    registry.register(Backend(name="bench_wrong", probe=lambda: None, unsupported=lambda call: None,
                              run=lambda call: call.q * 2, description=lambda: "wrong on purpose"))
    try:
        rows, summary = bench.bench_attention(bench.parse_shapes("tiny"), ["sdpa", "bench_wrong"], False,
                                              torch.device("cpu"), torch.float32, 2, 1, 1000.0, False, 0)
    finally:
        registry.unregister("bench_wrong")
        dispatch.clear_plans()
    wrong = next(r for r in rows if r["backend"] == "bench_wrong")
    assert wrong["correct"] is False and wrong["rel_err"] > 0.1
    assert summary[0]["fastest_correct"] == "sdpa"
    assert "bench_wrong" in summary[0]["rejected"]
    bench.print_attention(rows, summary)


def test_overhead_and_e2e_rows():
    rows = bench.bench_overhead([torch.device("cpu")], calls=50, rounds=3)
    assert len(rows) == 4 and all(r["us_per_call"] > 0 for r in rows)
    assert rows[0]["overhead_us"] == 0.0 or rows[1]["overhead_us"] == 0.0
    e2e = bench.bench_e2e(torch.device("cpu"), torch.float32, "small", 1, 2, 0)
    assert [r["vs_baseline"] for r in e2e][0] == 1.0
    assert e2e[1]["rel_diff_vs_baseline"] < 1e-5 and e2e[1]["attention_backend"] in registry.names()
    bench.print_overhead(rows)
    bench.print_e2e(e2e)


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "genesis_core", "bench", "--device", "cpu", "--shapes", "tiny",
                           "--reps", "1", "--section", "attention", "--backends", "sdpa", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tiny" in proc.stdout and "sdpa" in proc.stdout


def test_e2e_with_comfyui_flux_model(tmp_path):
    from comfy_helpers import comfyui_path

    path = comfyui_path()
    if path is None:
        pytest.skip("needs a ComfyUI checkout in COMFYUI_PATH")
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "-m", "genesis_core", "bench", "--device", "cpu", "--section", "e2e",
                           "--e2e-size", "small", "--reps", "1", "--comfyui", str(path), "--json", str(out),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["e2e_comfyui"]
    assert rows[0]["variant"].startswith("ComfyUI default attention")
    assert rows[1]["genesis_calls"] > 0 and rows[1]["rel_diff_vs_baseline"] < 1e-4
    assert rows[1]["attention_backend"] in registry.names()


def test_plot_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows, _ = bench.bench_attention(bench.parse_shapes("tiny;1,2,16,16,8"), ["sdpa", "pytorch"], True,
                                    torch.device("cpu"), torch.float32, 1, 1, 1000.0, False, 0)
    path = tmp_path / "bench.png"
    assert bench.write_plot(str(path), rows, "test") is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
