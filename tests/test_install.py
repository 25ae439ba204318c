"""install.py (what ComfyUI-Manager runs): never touches torch, reports every backend with a reason or pip line."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import ROOT


def _load_install():
    spec = importlib.util.spec_from_file_location("genesis_install", f"{ROOT}/install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_requirements_never_name_torch(tmp_path, monkeypatch):
    mod = _load_install()
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\ntorch>=2.0\ntorchvision==0.20\nonnxruntime>=1.16  # optional\nTorchAudio\nnumpy[extra]\n")
    monkeypatch.setattr(mod, "HERE", str(tmp_path))
    assert mod._requirements() == ["onnxruntime>=1.16", "numpy[extra]"]
    monkeypatch.setattr(mod, "HERE", ROOT)
    assert all(r.split("=")[0].split(">")[0].lower() not in ("torch", "torchvision", "torchaudio")
               for r in mod._requirements())


def test_install_reports_every_backend():
    from genesis_core import get_interface_info

    run = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    info = get_interface_info()
    for name, b in info["multi_attention"]["backends"].items():
        line = next(ln for ln in run.stdout.splitlines() if ln.strip().startswith(name + " "))
        assert ("present" in line) == b["available"], line
        if not b["available"]:
            assert b["reason"] in line
    for name in info["heterogeneous_compute"]["details"]:
        assert any(ln.strip().startswith(name + " ") for ln in run.stdout.splitlines()), name
    if not info["multi_attention"]["backends"]["sage"]["available"]:
        assert "pip install sageattention" in run.stdout
