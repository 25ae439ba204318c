"""The bench's printed tables: attention rows and AUTO's summary, dispatch overhead, end to end."""
from __future__ import annotations

from typing import List

from .verdicts import OVERHEAD_TARGET_US


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def print_attention(rows: List[dict], summary: List[dict]) -> None:
    print(f"\n{'shape':<18} {'backend':<15} {'ms':>9} {'TFLOP/s':>8} {'rel err':>9}  status")
    last = None
    for r in rows:
        if r["shape"] != last and last is not None:
            print()
        last = r["shape"]
        status = r["status"] if r["status"] != "ok" else ("ok" if r["correct"] else "INACCURATE")
        note = f"  ({r['note']})" if r["note"] else ""
        print(f"{r['shape']:<18} {r['backend']:<15} {_fmt(r['ms'], '9.3f'):>9} {_fmt(r['tflops'], '8.3g' if (r['tflops'] or 0) < 100 else '8.0f'):>8} "
              f"{_fmt(r['rel_err'], '9.2e'):>9}  {status}{note}")
    print("\nAUTO against the fastest correct backend measured in this run:")
    for s in summary:
        ratio = s.get("auto_vs_fastest")
        print(f"  {s['shape']:<18} fastest {s['fastest_correct'] or '-':<15} {_fmt(s['fastest_ms'], '.3f')} ms; "
              f"auto -> {s['auto_backend'] or '-'} {_fmt(s['auto_ms'], '.3f')} ms"
              + (f" ({(ratio - 1) * 100:+.1f}%" if ratio else "")
              + (f"; chosen kernel alone {(s['choice_vs_fastest'] - 1) * 100:+.1f}%" if s.get("choice_vs_fastest") else "")
              + (f"; Genesis over its kernel {(s['auto_over_kernel'] - 1) * 100:+.1f}%" if s.get("auto_over_kernel") else "")
              + (")" if ratio else "")
              + ("" if s["auto_correct"] in (None, True) else "  AUTO OUTPUT INACCURATE"))
        if s.get("choice_verdict"):
            ok = {True: "OK", False: "NOT OK", None: "no verdict"}[s.get("choice_ok")]
            print(f"  {'':<18} choice {ok}: {s['choice_verdict']}")


def print_overhead(rows: List[dict]) -> None:
    print(f"\nDispatch overhead (small tensors [1,1,8,64], already-seen signature; target <= {OVERHEAD_TARGET_US:g} us):")
    for r in rows:
        print(f"  {r['device']:<6} {r['call']:<58} {r['us_per_call']:8.2f} us  ({r['overhead_us']:+.2f})")


def print_e2e(rows: List[dict]) -> None:
    if not rows:
        return
    print(f"\nEnd to end: {rows[0]['size']}, {rows[0]['dtype']} on {rows[0]['device']}")
    for r in rows:
        extra = f"  attention: {r['attention_backend']}, rel diff {r['rel_diff_vs_baseline']:.2e}" if r["attention_backend"] else ""
        print(f"  {r['variant']:<68} {r['ms']:9.3f} ms  x{r['vs_baseline']:.3f}{extra}")
