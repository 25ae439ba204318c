"""The bench's targets and the verdict each gets.

Attention, per shape: AUTO at ``exact`` at least x0.97 of the fastest exact kernel's speed (its choice,
judged by the rows and, where they differ, by the two timed alternately); AUTO's output within every level's
thresholds; and, on the shapes of :data:`SPEEDUP_TARGETS`, AUTO at a level at least that many times as fast
as ComfyUI's default call (``comfyui-default``, timed alternately with it). Dispatch overhead, the ComfyUI
override and end to end have theirs below.
"""
from __future__ import annotations

from typing import List, Optional

OVERHEAD_TARGET_US = 5.0
COMFY_OVERRIDE_TARGET_US = 5.0  # the Genesis override over ComfyUI's own attention_pytorch, per call
EXACT_SPEED_TARGET = 0.97  # AUTO at exact: never below x0.97 of the fastest exact kernel in the same run
CHOICE_TARGET = 1.0 / EXACT_SPEED_TARGET  # the same, as a time ratio (chosen / fastest)
# AUTO at a level over ComfyUI's default call, per shape of the diffusion set (speed ratio, >=): Wan 480p
# at exact and at the fastest level, Flux at the fastest level.
SPEEDUP_TARGETS = {"wan-32k": {"exact": 1.15, "fast": 1.5}, "flux-4608": {"fast": 1.3}}


def choice_verdict(summ: dict) -> tuple:
    """(choice_ok, choice_verdict) for one shape's summary. OK when the chosen kernel's own row is within
    CHOICE_TARGET of the fastest correct row, or else when the two timed alternately are (the rows of two
    launches of one device kernel can differ by run-to-run noise: the alternated timing settles it, and the
    kernel names say why). Only when no alternated timing exists does "the same device kernel" decide alone;
    a chosen backend that is slower timed alternately fails even with the same kernel (its host side costs).
    None (no verdict) where no choice was timed: no AUTO row, AUTO failed, or the chosen backend's own row
    was not measured."""
    ratio, best, chosen = summ.get("choice_vs_fastest"), summ.get("fastest_correct"), summ.get("auto_backend")
    paired, same = summ.get("choice_vs_fastest_paired"), summ.get("same_kernel")
    pct = lambda x: f"{(x - 1) * 100:+.1f}%"  # noqa: E731
    kernels = ", ".join(summ.get("chosen_kernels") or [])
    if ratio is None:
        why = "no AUTO row" if chosen is None else f"the chosen backend {chosen}'s own row was not timed"
        return None, f"no timed choice ({why})"
    if ratio <= CHOICE_TARGET:
        return True, ("chose the fastest exact kernel" if chosen == best
                      else f"{chosen} within {pct(CHOICE_TARGET)} of the fastest row {best} ({pct(ratio)})")
    if paired is not None and paired <= CHOICE_TARGET:
        return True, (f"rows {pct(ratio)}, but timed alternately with {best} {pct(paired)}: within "
                      f"{pct(CHOICE_TARGET)}" + (f"; same device kernel as the fastest row: {kernels}" if same else ""))
    if paired is None and same is True:
        return True, f"same kernel as the fastest row: {kernels}; rows differ by timing noise ({pct(ratio)})"
    parts = [f"{chosen} {pct(ratio)} slower than {best} in the rows"]
    if paired is not None:
        parts.append(f"timed alternately {pct(paired)}")
    if same is True:
        parts.append(f"same device kernel ({kernels}), so the difference is host-side")
    elif same is False:
        parts.append("different kernels")
    for key in ("kernel_probe_error", "choice_paired_error"):
        if summ.get(key):
            parts.append(f"{key}: {summ[key]}")
    return False, "; ".join(parts)


E2E_NOISE = 0.01  # end to end: Genesis AUTO not slower than the baseline, 1% timing noise allowed
WORDS = {True: "PASS", False: "FAIL", None: "SKIP"}

CHOICE_TARGET_TEXT = f"AUTO exact >= x{EXACT_SPEED_TARGET:g} of the fastest exact kernel"
OVERHEAD_TARGET_TEXT = f"<= {OVERHEAD_TARGET_US:g} us"
COMFY_OVERRIDE_TARGET_TEXT = f"<= {COMFY_OVERRIDE_TARGET_US:g} us"
E2E_TARGET_TEXT = f"not slower than the baseline, {E2E_NOISE * 100:g}% noise allowed"


def overhead_verdicts(rows: list) -> list:
    """One ``(device, ok, overhead_us)`` per device of the overhead rows: Genesis ``attention()`` with AUTO,
    in µs per call over calling the chosen kernel directly, against ``OVERHEAD_TARGET_US``."""
    out = []
    for r in rows:
        if r["call"].startswith("genesis_core.attention(q, k, v)"):
            out.append((r["device"], r["overhead_us"] <= OVERHEAD_TARGET_US, r["overhead_us"]))
    return out


def comfy_override_verdicts(rows: list) -> list:
    """One ``(device, path, ok, overhead_us)`` per device and ComfyUI path (reproduced, real) of the override
    rows: µs per call of ``attention_pytorch`` with the Genesis override over the same call without it."""
    return [(r["device"], r["path"], r["overhead_us"] <= COMFY_OVERRIDE_TARGET_US, r["overhead_us"])
            for r in rows if r.get("genesis")]


def e2e_verdict(rows: list) -> tuple:
    """(target_ok, text) for an end-to-end pair [baseline, Genesis AUTO]: OK when AUTO is not slower than the
    baseline beyond ``E2E_NOISE``. Where AUTO ran the baseline's own kernel (``same_as_baseline``), the text
    says so and gives no speed ratio: the two differ only by Genesis' dispatch and timing noise."""
    base, auto = rows[0], rows[1]
    ratio = auto["ms"] / base["ms"]
    ok = ratio <= 1.0 + E2E_NOISE
    if auto.get("same_as_baseline"):
        why = auto.get("same_as_baseline_why") or "the same kernel"
        if ok:
            return ok, f"AUTO runs the baseline's own kernel, {why}: no speed ratio, same time within noise"
        return ok, (f"AUTO runs the baseline's own kernel, {why}, yet took {auto['ms'] - base['ms']:.3f} ms "
                    f"more per forward: host-side cost or noise")
    return ok, f"AUTO x{ratio:.3f} of the baseline (attention {auto.get('attention_backend')})"


def comfy_target(shape: str, level: str) -> Optional[float]:
    """The speed-up over ``comfyui-default`` AUTO at ``level`` must reach on ``shape``, or None."""
    return SPEEDUP_TARGETS.get(shape, {}).get(level)


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"x{value:.3f}"


def exact_whole_path(summ: dict) -> Optional[float]:
    """AUTO at exact's speed relative to the fastest exact kernel over the whole path a user pays for
    (fastest / AUTO): Genesis' cost over its kernel (timed alternately) times the choice (the chosen and the
    fastest timed alternately where they were, else the same device kernel counts as equal, else the rows)."""
    over = summ.get("auto_over_kernel")
    choice = summ.get("choice_vs_fastest_paired")
    if choice is None:
        choice = 1.0 if summ.get("same_kernel") is True else summ.get("choice_vs_fastest")
    if over is None or choice is None:
        return None
    return 1.0 / (over * choice)


def judge_targets(summ: dict) -> List[dict]:
    """The attention targets of one shape's summary, each ``{"shape", "what", "ok", "value", "target",
    "text", "target_text"}`` with ``ok`` True / False / None (not judged): AUTO exact against the fastest
    exact kernel, every level's errors, and the speed-ups over ``comfyui-default`` of SPEEDUP_TARGETS."""
    shape, levels = summ["shape"], summ.get("levels", {})
    out: List[dict] = []

    def add(what, ok, value, target, text, target_text):
        out.append({"shape": shape, "what": what, "ok": ok, "value": value, "target": target, "text": text,
                    "target_text": target_text})

    if "exact" in levels:
        ok, why = summ.get("choice_ok"), summ.get("choice_verdict") or "no timed choice"
        whole = exact_whole_path(summ)
        text = f"AUTO exact ({summ.get('auto_backend') or '-'}) vs the fastest exact kernel " \
               f"({summ.get('fastest_correct') or '-'}): {why}"
        if whole is not None:
            text += f"; whole path with Genesis' dispatch {_x(whole)} (dispatch has its own target)"
        add("exact_vs_fastest", ok, whole, EXACT_SPEED_TARGET, text, CHOICE_TARGET_TEXT)
    judged = {lv: s for lv, s in levels.items() if s.get("correct") is not None}
    if levels:
        ok = None if not judged else all(s["correct"] for s in judged.values())
        parts = [f"{lv} {s.get('backend')} " + ("rel -" if s["rel_err"] is None else f"rel {s['rel_err']:.1e}")
                 + ("" if s["cos"] is None else f" cos {s['cos']:.5f}") + ("" if s["correct"] else " OVER")
                 for lv, s in judged.items()]
        bounds = "; ".join(f"{lv} rel <= {s['max_rel']:.0e}" + (f", cos >= {s['min_cos']:g}" if s["min_cos"] else "")
                           for lv, s in judged.items())
        add("errors", ok, None, None, "AUTO errors: " + ("; ".join(parts) or "no AUTO output judged"),
            f"within each level's thresholds: {bounds or '-'}")
    for lv, want in SPEEDUP_TARGETS.get(shape, {}).items():
        s = levels.get(lv)
        if s is None:
            continue
        value = s.get("vs_comfy_paired", s.get("vs_comfy"))
        how = "timed alternately" if "vs_comfy_paired" in s else "rows"
        if value is None:
            ok, text = None, f"AUTO {lv} over comfyui-default: not timed ({s.get('note') or s.get('status')})"
        else:
            ok = value >= want and s.get("correct") is True
            text = (f"AUTO {lv} ({s.get('backend')}) {_x(value)} over comfyui-default ({how}"
                    + (f", {s['comfy_paired_rounds']} rounds" if "comfy_paired_rounds" in s else "") + ")"
                    + ("" if s.get("correct") else "; its output is over the level's thresholds"))
        add(f"{lv}_vs_comfy", ok, value, want, text, f">= x{want:g} over ComfyUI's default")
    return out
