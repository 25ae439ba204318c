"""The bench's printed report: every line at most ``WIDTH`` columns, every target with its verdict.

Tables of the attention rows (errors and the quality level each row is judged at) and AUTO's summary per
level against the fastest exact kernel and ComfyUI's default call, dispatch overhead, end to end. A verdict line reads
``PASS|FAIL|SKIP <what>: <detail> (target: ...)``; its continuation lines are indented by ``VERDICT_INDENT``.
Where two timings run the same kernel, the report says so instead of printing their ratio.
"""
from __future__ import annotations

import textwrap
from typing import List, Optional

from .comfy_default import COMFY_ROW
from .verdicts import E2E_TARGET_TEXT, OVERHEAD_TARGET_TEXT, WORDS, e2e_verdict, overhead_verdicts

WIDTH = 100
VERDICT_INDENT = 7  # "  PASS " - a verdict's continuation lines start under its text


def fit(line: str, indent: int = 6) -> str:
    """``line`` wrapped to ``WIDTH`` columns; continuation lines indented by ``indent`` spaces."""
    if len(line) <= WIDTH:
        return line
    return "\n".join(textwrap.wrap(line, width=WIDTH, subsequent_indent=" " * indent, break_long_words=True,
                                   break_on_hyphens=False))


def say(line: str = "", indent: int = 6) -> None:
    print(fit(line, indent))


def verdict(ok: Optional[bool], what: str, target: str) -> None:
    """One verdict line: ``PASS`` / ``FAIL`` / ``SKIP`` (not judged), what was judged, and the target."""
    say(f"  {WORDS[ok]} {what} (target: {target})", VERDICT_INDENT)


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _pct(x: float) -> str:
    return f"{(x - 1) * 100:+.1f}%"


def print_attention(rows: List[dict], summary: List[dict]) -> None:
    say(f"\n{'shape':<18} {'backend':<15} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9} {'cos':>8} {'level':<5}  status")
    last = None
    for r in rows:
        if r["shape"] != last and last is not None:
            print()
        last = r["shape"]
        status = r["status"] if r["status"] != "ok" else ("ok" if r["correct"] else "INACCURATE")
        note = f"  ({r['note']})" if r["note"] else ""
        if r["status"] == "ok" and r["correct"] is False and r.get("why"):
            note = f"  ({r['why']}" + (f"; {r['note']})" if r["note"] else ")")
        tflops = _fmt(r['tflops'], '8.3g' if (r['tflops'] or 0) < 100 else '8.0f')
        say(f"{r['shape']:<18} {r['backend']:<15} {_fmt(r['ms'], '9.3f'):>9} {tflops:>8} "
            f"{_fmt(r['rel_err'], '9.2e'):>9} {_fmt(r.get('cos'), '8.5f'):>8} {r.get('level') or '-':<5}  "
            f"{status}{note}", 19)
    layouts = sorted({r.get("layout") for r in rows if r.get("layout")})
    print()
    say(f"AUTO per quality level vs the fastest exact kernel and {COMFY_ROW} (same tensors"
        f"{', ' + '/'.join(layouts) if layouts else ''}):")
    for s in summary:
        if s.get("skipped") or s.get("error"):
            say(f"  {s['shape']}: " + (f"skipped: {s['skipped']}" if s.get("skipped") else f"failed: {s['error']}"))
            continue
        say("  " + _summary_line(s))
        for level, ls in s.get("levels", {}).items():
            say("    " + _level_line(level, ls), 10)
        for t in s.get("targets", []):
            verdict(t["ok"], f"{t['shape']}: {t['text']}", t["target_text"])


def _level_line(level: str, s: dict) -> str:
    if s.get("ms") is None:
        return f"{level:<5}  {s.get('backend') or '-'}: not timed ({s.get('note') or s.get('status')})"
    parts = [f"{level:<5}  {s.get('backend') or '-':<13} {s['ms']:9.3f} ms"]
    if s.get("vs_comfy_paired") is not None:
        parts.append(f"x{s['vs_comfy_paired']:.3f} vs {COMFY_ROW} (alternated)")
    elif s.get("vs_comfy") is not None:
        parts.append(f"x{s['vs_comfy']:.3f} vs {COMFY_ROW}")
    errs = "rel -" if s.get("rel_err") is None else f"rel {s['rel_err']:.1e}"
    parts.append(errs + ("" if s.get("cos") is None else f" cos {s['cos']:.5f}")
                 + ("" if s.get("correct") else " OVER ITS THRESHOLDS"))
    if s.get("over_kernel") is not None:
        parts.append(f"{_pct(s['over_kernel'])} over its kernel")
    if s.get("fastest") and s["fastest"] != s.get("backend"):
        parts.append(f"fastest row at {level}: {s['fastest']} {s['fastest_ms']:.3f} ms")
    if s.get("first_call_ms") is not None:
        first = s["first_call_ms"]
        parts.append(f"first call {first:.1f} ms" if first < 1000 else f"first call {first / 1e3:.1f} s")
    return "; ".join(parts)


def _summary_line(s: dict) -> str:
    best, chosen = s["fastest_correct"], s["auto_backend"]
    head = f"{s['shape']}: fastest exact {best or '-'} {_fmt(s['fastest_ms'], '.3f')} ms; "
    if s.get("comfy_ms") is not None:
        head += f"{COMFY_ROW} {s['comfy_ms']:.3f} ms; "
    if chosen is None:
        return head + "no AUTO row timed"
    parts = []
    if chosen == best:  # one kernel: the only difference left is Genesis' own cost, said below
        head += f"AUTO {_fmt(s['auto_ms'], '.3f')} ms on the same backend as the fastest ({best})"
    else:
        ratio = s.get("auto_vs_fastest")
        head += f"AUTO chose {chosen}: {_fmt(s['auto_ms'], '.3f')} ms" + (f" ({_pct(ratio)})" if ratio else "")
        if s.get("same_kernel") is True:
            parts.append(f"{chosen} launches the same device kernel as {best}")
        elif s.get("choice_vs_fastest"):
            parts.append(f"chosen kernel alone {_pct(s['choice_vs_fastest'])}")
    if s.get("auto_over_kernel"):
        parts.append(f"Genesis over its kernel {_pct(s['auto_over_kernel'])} (timed alternately)")
    if s["auto_correct"] not in (None, True):
        parts.append("AUTO OUTPUT INACCURATE")
    return head + "".join(f"; {p}" for p in parts)


def print_overhead(rows: List[dict]) -> None:
    say("\nDispatch overhead (small tensors [1,1,8,64], already-seen signature), us per call:")
    for r in rows:
        say(f"  {r['device']:<6} {r['call']:<58} {r['us_per_call']:8.2f} us  ({r['overhead_us']:+.2f})")
    for device, ok, over in overhead_verdicts(rows):
        verdict(ok, f"dispatch overhead on {device}: {over:+.2f} us per call over the chosen kernel",
                OVERHEAD_TARGET_TEXT)


def print_e2e(rows: List[dict]) -> None:
    if not rows:
        return
    say(f"\nEnd to end: {rows[0]['size']}, {rows[0]['dtype']} on {rows[0]['device']}")
    base, auto = rows[0], rows[1]
    same = auto.get("same_as_baseline")
    say(f"  {base['variant']:<68} {base['ms']:9.3f} ms  baseline")
    say(f"  {auto['variant']:<68} {auto['ms']:9.3f} ms  " + ("same kernel" if same else f"x{auto['vs_baseline']:.3f}"))
    say(f"      attention {auto['attention_backend']}" + (f", {auto['same_as_baseline_why']} as the baseline" if same else "")
        + f"; rel diff {auto['rel_diff_vs_baseline']:.2e} from the baseline"
        + (f"; {auto['genesis_calls']} Genesis calls" if auto.get("genesis_calls") is not None else ""))
    ok, text = (auto["target_ok"], auto["verdict"]) if "verdict" in auto else e2e_verdict(rows)
    verdict(ok, f"end to end: {text}", E2E_TARGET_TEXT)
