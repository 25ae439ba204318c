"""The real ComfyUI frontend in headless Chromium: the Genesis widget marks which choices work here.

Needs COMFYUI_PATH and Debian's ``chromium``; skips otherwise. Set GENESIS_SCREENSHOT=<path.png> to keep
the screenshot (docs/comfyui_backend_marks.png was made this way).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import pytest

from comfy_helpers import Chromium, ComfyServer, chromium_binary, comfyui_path, http_get

pytestmark = pytest.mark.skipif(comfyui_path() is None or chromium_binary() is None,
                                reason="needs COMFYUI_PATH and a chromium binary")

SETUP_JS = """
(async () => {
  const app = window.app;
  app.graph.clear();
  const add = (type, x, y) => { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; };
  const sw = add("GenesisAttentionSwitch", 80, 80);
  const bs = add("GenesisBackendSelect", 80, 260);
  const mm = add("GenesisMultiModalGen", 520, 80);
  const w = sw.widgets.find((x) => x.name === "attention");
  w.value = "xformers"; w.callback?.(w.value);
  app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1.2;
  app.graph.setDirtyCanvas(true, true);
  return [sw.id, bs.id, mm.id];
})()
"""

LABELS_JS = """
(() => {
  const out = {};
  for (const n of window.app.graph._nodes) {
    for (const w of n.widgets || []) if (w.genesisDecorated) {
      out[n.type + "." + w.name] = w.label || null;
      out[n.type + "." + w.name + ".tooltip"] = w.tooltip || null;
    }
  }
  return Object.keys(out).length >= 8 ? out : null;
})()
"""

OPEN_MENU_JS = """
(() => {
  const app = window.app;
  const node = app.graph._nodes.find((n) => n.type === "GenesisAttentionSwitch");
  const w = node.widgets.find((x) => x.name === "attention");
  const [cx, cy] = app.canvas.ds.convertOffsetToCanvas ? [0, 0] : [0, 0];
  const rect = app.canvas.canvas.getBoundingClientRect();
  const scale = app.canvas.ds.scale, off = app.canvas.ds.offset;
  const x = rect.left + (node.pos[0] + node.size[0] / 2 + off[0]) * scale;
  const y = rect.top + (node.pos[1] + w.y + off[1]) * scale;
  const e = new PointerEvent("click", { clientX: x + 40, clientY: y + 150 });
  e.canvasX = node.pos[0] + node.size[0] / 2; e.canvasY = node.pos[1] + w.y;
  w.onClick({ e, node, canvas: app.canvas });
  return Array.from(document.querySelectorAll(".litecontextmenu .litemenu-entry")).map((el) => ({
    value: el.dataset.value, text: el.textContent, title: el.title, available: el.dataset.genesisAvailable,
  }));
})()
"""


WIDGET_POS_JS = """
(() => {
  const app = window.app;
  const node = app.graph._nodes.find((n) => n.type === "GenesisAttentionSwitch");
  const w = node.widgets.find((x) => x.name === "attention");
  const rect = app.canvas.canvas.getBoundingClientRect();
  const scale = app.canvas.ds.scale, off = app.canvas.ds.offset;
  return [rect.left + (node.pos[0] + node.size[0] - 90 + off[0]) * scale, rect.top + (node.pos[1] + w.y + 10 + off[1]) * scale];
})()
"""

FASTEST_JS = """
(async () => {
  const m = await import("/extensions/Genesis/genesis.js");
  const data = { choices: { sdpa: { available: true, reason: null }, sage: { available: false, reason: "no CUDA" } },
                 fastest: "sdpa", compute: [{ name: "cpu", available: true, devices: ["cpu"] }] };
  return [m.choiceStatus("attention", "sdpa", data), m.choiceStatus("attention", "sage", data),
          m.choiceStatus("compute", "cpu", data)];
})()
"""


async def open_canvas(page, url: str, node_type: str) -> None:
    """Open ComfyUI's page at 1500x900, wait for the graph canvas and ``node_type``, close any dialog."""
    await page.send("Runtime.enable")
    await page.send("Page.enable")
    await page.send("Emulation.setDeviceMetricsOverride", width=1500, height=900, deviceScaleFactor=1, mobile=False)
    await page.send("Page.navigate", url=url + "/")
    await page.wait_for("!!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)", timeout=120)
    await page.wait_for(f"!!window.LiteGraph.registered_node_types['{node_type}']", timeout=60)
    await page.evaluate("document.querySelectorAll('.p-dialog-mask').forEach((d) => d.remove())")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ComfyServer(tmp_path_factory.mktemp("comfy_browser_base")) as srv:
        yield srv


def test_widget_shows_availability_marks(server, tmp_path):
    import urllib.request

    # A returning user: no first-run template dialog over the canvas.
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Validation.Workflows", False)):
        req = urllib.request.Request(f"{server.url}/settings/{key}", data=json.dumps(value).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    _, backends = http_get(server.url + "/genesis/backends")
    expected = {name: row["available"] for name, row in backends["choices"].items()}

    async def scenario(page):
        await open_canvas(page, server.url, "GenesisAttentionSwitch")
        await page.evaluate(SETUP_JS)
        labels = await page.wait_for(LABELS_JS, timeout=60)
        entries = await page.evaluate(OPEN_MENU_JS)
        # Rest the mouse on the widget's label: the frontend shows its tooltip (with the status line).
        x, y = await page.evaluate(WIDGET_POS_JS)
        for dx in (0, 2, 4):
            await page.send("Input.dispatchMouseEvent", type="mouseMoved", x=x + dx, y=y)
            await page.evaluate("new Promise((r) => setTimeout(r, 200))")
        await page.evaluate("new Promise((r) => setTimeout(r, 1200))")
        hover = await page.evaluate("document.querySelector('.node-tooltip')?.innerText || ''")
        shot = await page.send("Page.captureScreenshot", format="png")
        fastest = await page.evaluate(FASTEST_JS)
        return labels, entries, base64.b64decode(shot["data"]), page.console, fastest, hover

    with Chromium(tmp_path / "profile") as browser:
        labels, entries, png, console, fastest, hover = browser.run(scenario)

    path = tmp_path / "comfyui_backend_marks.png"
    path.write_bytes(png)
    if os.environ.get("GENESIS_SCREENSHOT"):
        shutil.copyfile(path, os.environ["GENESIS_SCREENSHOT"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # The selected (unavailable here) xformers choice is marked on the node; cpu is marked as working.
    mark = "\u2713" if expected["xformers"] else "\u2717"
    assert labels["GenesisAttentionSwitch.attention"] == f"attention {mark}", labels
    assert labels["GenesisBackendSelect.backend"].startswith("backend "), labels
    tip = labels["GenesisAttentionSwitch.attention.tooltip"]
    assert tip.startswith("Attention backend:") and "xformers" in tip.splitlines()[-1], tip
    if not expected["xformers"]:
        assert "is not available here: " in tip.splitlines()[-1], tip
    # What the frontend really shows while the mouse rests on the widget.
    assert hover.strip().endswith(tip.splitlines()[-1].strip()), hover
    assert labels["GenesisMultiModalGen.attention_type"].startswith("attention_type "), labels

    # The fastest measured choice is known to the widget when the autotuner has data.
    assert fastest[0] == {"ok": True, "reason": "", "fastest": True}
    assert fastest[1]["ok"] is False and fastest[1]["reason"] == "no CUDA"
    assert fastest[2]["ok"] is True and "cpu" in fastest[2]["reason"]

    # Every dropdown option carries a mark, and unavailable ones say why on hover.
    by_value = {e["value"]: e for e in entries}
    assert set(by_value) == set(expected), (entries, console[-10:])
    for name, ok in expected.items():
        entry = by_value[name]
        assert entry["available"] == str(ok).lower(), entry
        assert entry["text"].startswith("\u2717" if not ok else ("\u2713", "\u2605")), entry
        if not ok:
            assert entry["title"].startswith("not available here: ") and len(entry["title"]) > 25, entry


WORKFLOWS = Path(__file__).resolve().parent.parent / "example_workflows"

FROM_API_JS = """
(async () => {
  const app = window.app;
  app.loadApiJson(%s, %s);
  await new Promise((r) => setTimeout(r, 300));
  const nodes = app.graph._nodes;
  for (const n of nodes) {
    for (const w of n.widgets || []) if (w.name === "control_after_generate") w.value = "fixed";
    if (n.type === "GenesisTensorInfo") n.size = [420, 140];
    if (n.type === "PreviewImage") n.size = [320, 380];
  }
  // Columns by depth along the links, nodes stacked in each column.
  const depth = new Map();
  const d = (n) => {
    if (depth.has(n.id)) return depth.get(n.id);
    let best = 0;
    for (const inp of n.inputs || []) {
      if (inp.link == null) continue;
      const link = app.graph.links[inp.link] ?? app.graph.links.get?.(inp.link);
      const src = link && app.graph.getNodeById(link.origin_id);
      if (src) best = Math.max(best, d(src) + 1);
    }
    depth.set(n.id, best);
    return best;
  };
  const columns = [];
  for (const n of [...nodes].sort((a, b) => a.id - b.id)) (columns[d(n)] ||= []).push(n);
  let x = 60;
  for (const col of columns) {
    if (!col) continue;
    let y = 80, w = 0;
    for (const n of col) { n.pos = [x, y]; y += n.size[1] + 90; w = Math.max(w, n.size[0]); }
    x += w + 70;
  }
  return app.graph.serialize();
})()
"""

TO_API_JS = """
(async () => {
  const app = window.app;
  await app.loadGraphData(%s, true, true, %s);
  await new Promise((r) => setTimeout(r, 300));
  const p = await app.graphToPrompt();
  return p.output;
})()
"""


def _strip(api):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


def test_ui_workflows_are_the_twins_of_the_api_workflows(server, tmp_path):
    """Each example_workflows/<name>.json (UI format, for the templates browser) turns into exactly
    example_workflows/api/<name>.json when the real frontend converts it for /prompt.
    GENESIS_WRITE_UI_WORKFLOWS=1 regenerates the UI files from the API ones through the same frontend."""
    write = os.environ.get("GENESIS_WRITE_UI_WORKFLOWS") == "1"
    names = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    assert names

    async def scenario(page):
        await page.send("Runtime.enable")
        await page.send("Page.navigate", url=server.url + "/")
        await page.wait_for("!!(window.app && window.app.graph && window.LiteGraph && window.app.canvas)", timeout=120)
        await page.wait_for("!!window.LiteGraph.registered_node_types['GenesisCrossAttention']", timeout=60)
        results = {}
        for name in names:
            api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
            if write:
                ui = await page.evaluate(FROM_API_JS % (json.dumps(api), json.dumps(name)))
                (WORKFLOWS / f"{name}.json").write_text(json.dumps(ui, indent=2) + "\n")
            ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
            results[name] = (api, await page.evaluate(TO_API_JS % (json.dumps(ui), json.dumps(name))))
        return results

    with Chromium(tmp_path / "profile") as browser:
        results = browser.run(scenario)
    for name, (api, converted) in results.items():
        assert _strip(converted) == _strip(api), name


RUN_JS = """
(async () => {
  const app = window.app;
  await app.loadGraphData(%s, true, true, "genesis_cross_attention");
  await new Promise((r) => setTimeout(r, 300));
  app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 0.9;
  await app.queuePrompt(0, 1);
  return true;
})()
"""

RESULT_JS = """
(() => {
  const app = window.app;
  const info = app.graph._nodes.find((n) => n.type === "GenesisTensorInfo");
  const w = info?.widgets?.find((x) => x.name === "genesis_info");
  const preview = app.graph._nodes.find((n) => n.type === "PreviewImage");
  const hasImage = !!(preview && (preview.imgs?.length || app.nodeOutputs?.[String(preview.id)]?.images?.length));
  return w && w.value && hasImage ? { text: w.value, image: hasImage } : null;
})()
"""


def test_example_workflow_runs_in_the_frontend(server, tmp_path):
    """Load the UI workflow, press Queue in the real frontend, and see the results on the nodes."""
    ui = json.loads((WORKFLOWS / "genesis_cross_attention.json").read_text())

    async def scenario(page):
        await open_canvas(page, server.url, "GenesisCrossAttention")
        await page.evaluate(RUN_JS % json.dumps(ui))
        result = await page.wait_for(RESULT_JS, timeout=120)
        await page.evaluate("new Promise((r) => setTimeout(r, 800))")
        shot = await page.send("Page.captureScreenshot", format="png")
        return result, base64.b64decode(shot["data"])

    with Chromium(tmp_path / "profile") as browser:
        result, png = browser.run(scenario)
    if os.environ.get("GENESIS_SCREENSHOT_RUN"):
        Path(os.environ["GENESIS_SCREENSHOT_RUN"]).write_bytes(png)
    assert "shape [1x64x64]" in result["text"] and "NaN 0" in result["text"]
    assert result["image"]
