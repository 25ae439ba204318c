"""Shared helpers for the ComfyUI-facing tests (not a conftest: import it explicitly).

* :func:`load_pack` imports the repository root as a package, the way ComfyUI's custom-node loader does.
* :func:`attention_basic_reference` is an independent float64 reading of ComfyUI's ``attention_basic``
  contract (shapes, mask semantics, output layout), used to check the Genesis override.
* :func:`comfyui_path` finds a ComfyUI checkout through ``COMFYUI_PATH`` (tests skip without one).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "genesis_pack_under_test"


def load_pack(name: str = PACK_NAME):
    """Import ``<repo>/__init__.py`` as package ``name`` (cached in sys.modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def comfyui_path() -> Optional[Path]:
    """The ComfyUI checkout named by ``COMFYUI_PATH`` if it looks real, else None."""
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        path = (REPO / path).resolve()
    if not (path / "comfy" / "ldm" / "modules" / "attention.py").is_file():
        return None
    return path


def torchvision_stub_env(env: dict, folder: Path) -> dict:
    """``env`` with an empty ``torchvision`` stand-in first on PYTHONPATH. ComfyUI imports torchvision at module
    level for models these tests never build (Cascade, Cosmos, ACE), and no torchvision wheel imports beside the
    CPU torch 2.13 these tests run on (one may be installed and still fail to import, so the stand-in is used
    always). Anything read from it is an AttributeError saying so (an ImportError in ``from ... import``)."""
    stub = Path(folder) / "torchvision"
    stub.mkdir(parents=True, exist_ok=True)
    missing = ("def __getattr__(name):\n"
               "    raise AttributeError(f'torchvision.{name}: the Genesis tests run ComfyUI with an empty "
               "torchvision stand-in')\n")
    (stub / "__init__.py").write_text("from . import transforms  # noqa: F401\n" + missing)
    (stub / "transforms.py").write_text(missing)
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH")])))


def attention_basic_reference(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False):
    """ComfyUI's ``attention_basic`` semantics in float64 (independent implementation).

    q/k/v: ``[B, N, heads*D]`` or, with ``skip_reshape``, ``[B, heads, N, D]``.
    mask: additive float broadcast as ComfyUI does ([Nq,Nk] -> all batches and heads, [B,Nq,Nk] -> all
    heads, [B,H,Nq,Nk]); boolean masks are key-padding masks ``[B, ..., Nk]`` (True = attend).
    Returns ``[B, Nq, heads*Dv]`` or, with ``skip_output_reshape``, ``[B, heads, Nq, Dv]``.
    """
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    if skip_reshape:
        b = q.shape[0]
    else:
        b = q.shape[0]

        def split(t):
            return t.reshape(t.shape[0], t.shape[1], heads, t.shape[2] // heads).permute(0, 2, 1, 3)

        q, k, v = split(q), split(k), split(v)
    d = q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / (d ** 0.5)  # [B, H, Nq, Nk]
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = mask.reshape(mask.shape[0], -1)  # [B, Nk]
            keep = keep[:, None, None, :]
            scores = scores.masked_fill(~keep, float("-inf"))
        else:
            m = mask.to(torch.float64)
            if m.ndim == 2:
                m = m[None, None]
            elif m.ndim == 3:
                m = m[:, None]
            scores = scores + m
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p, v)  # [B, H, Nq, Dv]
    if skip_output_reshape:
        return out
    return out.permute(0, 2, 1, 3).reshape(b, out.shape[2], -1)


# ---------------------------------------------------------------------------------------------------------
# Inside a real ComfyUI (run in a subprocess: ComfyUI's top-level modules `nodes`, `server`, `utils`, `app`
# must not leak into the test process).


def comfy_subprocess(function: str, timeout: float = 540.0):
    """Run ``comfy_helpers.<function>()`` in a fresh interpreter with ComfyUI importable; return its JSON."""
    import json
    import subprocess

    path = comfyui_path()
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import comfy_helpers as h; "
            f"h._comfy_entry({function!r})")
    with tempfile.TemporaryDirectory() as tmp:
        env = torchvision_stub_env(dict(os.environ, COMFYUI_PATH=str(path), PYTHONWARNINGS="ignore"), Path(tmp))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                             env=env, cwd=str(path))
    marker = "GENESIS_RESULT "
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(marker)]
    if out.returncode != 0 or not lines:
        raise AssertionError(f"{function} failed (rc={out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-6000:]}")
    result = json.loads(lines[-1][len(marker):])
    result["_stderr"] = out.stderr
    return result


def _comfy_entry(function: str) -> None:
    import json

    path = comfyui_path()
    sys.path.insert(0, str(path))
    os.chdir(path)
    from comfy.cli_args import args

    args.cpu = True
    result = globals()[function]()
    print("GENESIS_RESULT " + json.dumps(result), flush=True)


def tiny_sd_model(seed: int = 0, context_dim: int = 64):
    """A small SD1.5-style model built from ComfyUI's own classes, random weights, as a ModelPatcher on CPU."""
    import comfy.model_patcher
    import comfy.supported_models

    cfg = {"context_dim": context_dim, "model_channels": 32, "use_linear_in_transformer": True, "adm_in_channels": None,
           "use_temporal_attention": False, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
           "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
           "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False, "image_size": 32,
           "use_checkpoint": False}
    config = comfy.supported_models.SD15(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # ComfyUI's ops skip weight init: give every weight real values
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _sample(model, seed: int = 1, steps: int = 3, size: int = 16, context_dim: int = 64, mask_tokens: bool = False):
    import comfy.sample

    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 4, size, size, generator=gen)
    noise = torch.randn(1, 4, size, size, generator=gen)
    pos = [[torch.randn(1, 7, context_dim, generator=gen), {}]]
    neg = [[torch.randn(1, 5, context_dim, generator=gen), {}]]  # different length: ComfyUI pads/batches
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def _load_pack_with_comfy_loader():
    import asyncio

    import nodes  # ComfyUI's own nodes.py

    ok = asyncio.run(nodes.load_custom_node(str(REPO)))
    return ok, nodes


def sampling_check():
    """Patch a tiny ComfyUI model with every attention choice; compare sampling with the unpatched model."""
    import importlib

    ok, nodes = _load_pack_with_comfy_loader()
    switch_cls = nodes.NODE_CLASS_MAPPINGS["GenesisAttentionSwitch"]
    switch_mod = importlib.import_module(switch_cls.__module__)
    attn = importlib.import_module(switch_cls.__module__.rsplit(".", 2)[0] + ".genesis_core.attn")
    model = tiny_sd_model()
    options_before = repr(model.model_options)
    baseline = _sample(model)
    rows = []
    choices = switch_cls.INPUT_TYPES()["required"]["attention"][0]
    available = {r["name"]: r["available"] for r in attn.backends_report()}
    for choice in choices:
        patched = switch_cls().execute(model, choice)[0]
        override = patched.model_options["transformer_options"].get("optimized_attention_override")
        out = _sample(patched)
        err = float((out - baseline).norm() / baseline.norm())
        rows.append({"choice": choice, "available": available.get(choice, choice == "auto"), "rel_err": err,
                     "calls": getattr(override, "calls", 0), "fallback_calls": getattr(override, "fallback_calls", -1),
                     "is_clone": patched is not model and patched.model is model.model})
    after = _sample(model)
    # GenesisBackendSelect with a MODEL: a clone that loads on the chosen device, sampled by ComfyUI itself.
    select_cls = nodes.NODE_CLASS_MAPPINGS["GenesisBackendSelect"]
    choice, placed = select_cls().execute("cpu", 0, model)
    placed_out = _sample(placed)
    placement = {"load_device": str(placed.load_device), "is_clone": placed is not model and placed.model is model.model,
                 "equal": bool(torch.allclose(placed_out, baseline, rtol=1e-5, atol=1e-5)),
                 "original_load_device": str(model.load_device)}
    # Switching twice: the second choice wins, one Genesis wrapper, one override.
    import comfy.patcher_extension as pe

    twice = switch_cls().execute(switch_cls().execute(model, "pytorch")[0], "sdpa")[0]
    chained = {"backend": twice.model_options["transformer_options"]["optimized_attention_override"].backend,
               "wrappers": len(twice.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).get(switch_mod.WRAPPER_KEY, [])),
               "original_wrappers": len(model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).get(switch_mod.WRAPPER_KEY, []))}
    # Fallback for ComfyUI builds without the hook: replace patches.
    switch_mod.comfy_has_override_hook = lambda: False
    patched = switch_cls().execute(model, "sdpa")[0]
    replace = patched.model_options["transformer_options"].get("patches_replace", {})
    attn1 = list(replace.get("attn1", {}).values())
    calls_before = attn1[0].genesis_override.calls if attn1 else -1
    out = _sample(patched)
    n_blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in model.model.diffusion_model.modules())
    fallback = {"transformer_blocks": n_blocks, "attn1_blocks": len(replace.get("attn1", {})), "attn2_blocks": len(replace.get("attn2", {})),
                "has_override_key": "optimized_attention_override" in patched.model_options["transformer_options"],
                "calls": (attn1[0].genesis_override.calls - calls_before) if attn1 else 0,
                "rel_err": float((out - baseline).norm() / baseline.norm())}
    return {"loaded": ok, "rows": rows, "chained": chained, "placement": placement, "original_untouched": repr(model.model_options) == options_before,
            "original_after_equal": bool(torch.equal(after, baseline)), "fallback": fallback,
            "baseline_norm": float(baseline.norm())}


# ---------------------------------------------------------------------------------------------------------
# A real ComfyUI server on 127.0.0.1 with the pack installed (symlinked into a temporary base directory).


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0):
    import json
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body = resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return resp.status, (json.loads(body) if "json" in ctype else body)


class ComfyServer:
    """``python main.py --cpu --listen 127.0.0.1`` with the pack as custom_nodes/Genesis; stopped on exit."""

    def __init__(self, base_dir: Path, startup_timeout: float = 240.0):
        self.base_dir = Path(base_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout = startup_timeout
        self.proc = None
        self.log_path = self.base_dir / "comfyui.log"

    def __enter__(self) -> "ComfyServer":
        import subprocess
        import time

        path = comfyui_path()
        (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / "Genesis"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        self._log = open(self.log_path, "w")
        env = torchvision_stub_env(dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1"),
                                   self.base_dir / "stub")
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base_dir), "--disable-auto-launch", "--database-url", "sqlite:///:memory:"],
            cwd=str(path), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if http_get(self.url + "/system_stats", timeout=2)[0] == 200:
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()


def load_client():
    """example_workflows/run_api_workflow.py as a module."""
    spec = importlib.util.spec_from_file_location("genesis_run_api_workflow", REPO / "example_workflows" / "run_api_workflow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------------------
# Headless Chromium driven over the DevTools protocol (aiohttp's websocket client; no extra packages).


def chromium_binary() -> Optional[str]:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """``chromium --headless`` with a DevTools port; :meth:`run` drives one page with an async scenario."""

    def __init__(self, profile_dir: Path, width: int = 1500, height: int = 900):
        self.port = free_port()
        self.profile = Path(profile_dir)
        self.size = (width, height)
        self.proc = None

    def __enter__(self) -> "Chromium":
        import subprocess
        import time

        self.proc = subprocess.Popen(
            [chromium_binary(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", f"--remote-debugging-port={self.port}",
             "--remote-debugging-address=127.0.0.1", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                status, targets = http_get(f"http://127.0.0.1:{self.port}/json/list", timeout=2)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    self.ws_url = pages[0]["webSocketDebuggerUrl"]
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError("Chromium did not open its DevTools port")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()

    def run(self, scenario, timeout: float = 180.0):
        """Run ``await scenario(page)`` where page has ``send(method, **params)`` and ``evaluate(js)``."""
        import asyncio

        import aiohttp

        async def main():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(self.ws_url, max_msg_size=64 * 1024 * 1024) as ws:
                    page = _Page(ws)
                    reader = asyncio.ensure_future(page.read())
                    try:
                        return await asyncio.wait_for(scenario(page), timeout)
                    finally:
                        reader.cancel()

        return asyncio.run(main())


class _Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.pending = {}
        self.console = []

    async def read(self):
        import json

        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                args = data["params"].get("args", [])
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("EXCEPTION " + str(data["params"]["exceptionDetails"].get("text")))

    async def send(self, method: str, **params):
        import asyncio

        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = fut
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        data = await fut
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def evaluate(self, expression: str):
        res = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.25):
        import asyncio
        import time

        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = await self.evaluate(expression)
                if last:
                    return last
            except RuntimeError as exc:
                last = str(exc)
            await asyncio.sleep(poll)
        raise TimeoutError(f"page never satisfied {expression!r} (last: {last!r}); console: {self.console[-10:]}")
