"""The bench's targets and the verdict each gets: AUTO's choice against the fastest correct backend."""
from __future__ import annotations

OVERHEAD_TARGET_US = 5.0
COMFY_OVERRIDE_TARGET_US = 5.0  # the Genesis override over ComfyUI's own attention_pytorch, per call
CHOICE_TARGET = 1.03  # AUTO's choice: within 3% of the fastest correct backend


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
        return True, ("chose the fastest correct backend" if chosen == best
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

CHOICE_TARGET_TEXT = f"within {(CHOICE_TARGET - 1) * 100:+.1f}% of the fastest"
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
