// Genesis backend picker marks for ComfyUI.
//
// On Genesis nodes, the `attention`, `attention_type` and `backend` combo widgets show which choices work
// on this server: the widget label gets a mark for the selected choice (✓ works, ✗ not available here,
// ★ fastest measured), and in the dropdown every option carries a mark and, on hover, the reason.
// Data comes from GET /genesis/backends on the ComfyUI server; nothing else is fetched.
// Plain ES module, no build step.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const EXTENSION = "genesis.backend_marks";
const ROUTE = "/genesis/backends";
// widget name -> which table answers for it
const WIDGET_KINDS = { attention: "attention", attention_type: "attention", backend: "compute" };
const MARK_OK = "\u2713";       // ✓
const MARK_MISSING = "\u2717";  // ✗
const MARK_FASTEST = "\u2605";  // ★

let info = null;
let loading = null;
let activeWidget = null; // the Genesis combo whose dropdown is opening
const baseTooltips = {}; // node type -> input name -> tooltip from the node definition

export async function loadBackends(force = false) {
  if (info && !force) return info;
  if (!loading || force) {
    loading = api
      .fetchApi(ROUTE)
      .then((r) => (r.ok ? r.json() : Promise.reject(new Error(`${ROUTE} answered ${r.status}`))))
      .then((data) => {
        info = data;
        return data;
      })
      .catch((err) => {
        console.warn("[Genesis] could not read backend availability:", err);
        loading = null;
        return null;
      });
  }
  return loading;
}

/** {ok, reason, fastest} for one choice of one widget kind, or null when unknown. */
export function choiceStatus(kind, value, data = info) {
  if (!data) return null;
  if (kind === "attention") {
    const row = data.choices?.[value];
    if (!row) return null;
    return { ok: !!row.available, reason: row.reason || row.note || row.kernel || "", fastest: data.fastest === value };
  }
  if (value === "auto") return { ok: true, reason: "first present of cuda, rocm, mps, npu, cpu", fastest: false };
  const row = (data.compute || []).find((r) => r.name === value);
  if (!row) return null;
  const devices = row.devices?.length ? ` (${row.devices.join(", ")})` : "";
  return { ok: !!row.available, reason: row.available ? `available${devices}` : row.reason || "", fastest: false };
}

function markFor(status) {
  if (!status) return "";
  if (!status.ok) return MARK_MISSING;
  return status.fastest ? MARK_FASTEST : MARK_OK;
}

function isGenesisNode(node) {
  const type = node?.comfyClass || node?.type || "";
  return typeof type === "string" && type.startsWith("Genesis");
}

function statusLine(value, status) {
  if (!status) return "";
  if (!status.ok) return `${MARK_MISSING} ${value} is not available here: ${status.reason}`;
  const why = status.reason ? `: ${status.reason}` : "";
  return `${markFor(status)} ${value}${status.fastest ? " (fastest measured here)" : ""}${why}`;
}

function refreshLabel(widget) {
  const kind = WIDGET_KINDS[widget.name];
  const status = choiceStatus(kind, widget.value);
  const mark = markFor(status);
  widget.label = mark ? `${widget.name} ${mark}` : undefined;
  widget.genesisStatus = status;
  // Hovering the widget shows its tooltip followed by the selected choice's status.
  const base = widget.genesisBaseTooltip || "";
  const line = statusLine(widget.value, status);
  widget.tooltip = line ? (base ? `${base}\n${line}` : line) : base || undefined;
  app.graph?.setDirtyCanvas?.(true, false);
}

function decorateWidget(node, widget) {
  if (widget.genesisDecorated) return;
  widget.genesisDecorated = true;
  widget.genesisBaseTooltip = baseTooltips[node.comfyClass || node.type]?.[widget.name] || "";
  const originalClick = widget.onClick;
  widget.onClick = function (options) {
    activeWidget = this;
    try {
      return originalClick?.call(this, options);
    } finally {
      activeWidget = null;
    }
  };
  const originalCallback = widget.callback;
  widget.callback = function (...args) {
    const result = originalCallback?.apply(this, args);
    refreshLabel(widget);
    return result;
  };
  refreshLabel(widget);
}

/** Put a mark and a hover reason on every entry of a dropdown opened by a Genesis combo. */
function decorateMenu(menu, widget) {
  const kind = WIDGET_KINDS[widget.name];
  for (const entry of menu.root?.querySelectorAll?.(".litemenu-entry") || []) {
    const value = entry.dataset?.value;
    const status = choiceStatus(kind, value);
    if (!status) continue;
    const mark = document.createElement("span");
    mark.className = "genesis-mark";
    mark.textContent = `${markFor(status)} `;
    mark.style.color = !status.ok ? "#e66" : status.fastest ? "#fc4" : "#6c6";
    entry.prepend(mark);
    entry.title = status.ok ? (status.fastest ? `fastest measured here. ${status.reason}` : status.reason) : `not available here: ${status.reason}`;
    entry.dataset.genesisAvailable = String(status.ok);
    if (!status.ok) entry.style.opacity = "0.7";
  }
}

function patchContextMenu() {
  const LiteGraph = window.LiteGraph;
  if (!LiteGraph?.ContextMenu || LiteGraph.ContextMenu.genesisPatched) return;
  const Base = LiteGraph.ContextMenu;
  class GenesisContextMenu extends Base {
    constructor(values, options) {
      super(values, options);
      const widget = activeWidget;
      if (widget) {
        try {
          decorateMenu(this, widget);
        } catch (err) {
          console.warn("[Genesis] could not mark the menu:", err);
        }
      }
    }
  }
  GenesisContextMenu.genesisPatched = true;
  LiteGraph.ContextMenu = GenesisContextMenu;
}

function decorateNode(node) {
  if (!isGenesisNode(node)) return;
  const widgets = (node.widgets || []).filter((w) => w.type === "combo" && WIDGET_KINDS[w.name]);
  if (!widgets.length) return;
  loadBackends().then((data) => {
    if (!data) return;
    for (const w of widgets) decorateWidget(node, w);
  });
}

app.registerExtension({
  name: EXTENSION,
  async setup() {
    patchContextMenu();
    loadBackends();
    // Re-read after each run: the autotuner may have measured something new.
    api.addEventListener("execution_success", async () => {
      await loadBackends(true);
      for (const node of app.graph?._nodes || []) {
        for (const w of node.widgets || []) if (w.genesisDecorated) refreshLabel(w);
      }
    });
  },
  async nodeCreated(node) {
    decorateNode(node);
  },
  async loadedGraphNode(node) {
    decorateNode(node);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (typeof nodeData?.name === "string" && nodeData.name.startsWith("Genesis")) {
      const tips = (baseTooltips[nodeData.name] = {});
      for (const section of ["required", "optional"]) {
        for (const [name, spec] of Object.entries(nodeData.input?.[section] || {})) {
          if (spec?.[1]?.tooltip) tips[name] = spec[1].tooltip;
        }
      }
    }
    if (nodeData?.name !== "GenesisTensorInfo") return;
    // Show the summary text that GenesisTensorInfo returns in its "ui" output.
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text || []).join("\n");
      let widget = this.widgets?.find((w) => w.name === "genesis_info");
      if (!widget) {
        widget = ComfyWidgets.STRING(this, "genesis_info", ["STRING", { multiline: true }], app).widget;
        widget.serialize = false;
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = "0.85";
        }
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
