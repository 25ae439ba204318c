#!/usr/bin/env bash
# Genesis on a CUDA GPU (written for the lent H100: python3 3.12, torch 2.11 cu130; SageAttention /
# xformers wheels, where carried, already on PYTHONPATH):
#   1. attention: the diffusion set (SD1.5 self/cross head_dim 40 and 160, SDXL 4k self and 77-token
#      cross, Flux 4608x24x128, Wan 32760x40x128) in bf16, every backend + Genesis AUTO, plus the
#      dispatch overhead and the end-to-end Flux-sized stack (Genesis AUTO vs plain SDPA), one run;
#   2. torch.compile (Inductor) on CUDA: a block calling genesis_core.attention matches eager and
#      compiles once for repeated calls;
#   3. checks the targets and prints PASS/FAIL lines; exits non-zero if a target or a step failed.
# Writes under $OUT (a temp dir if unset): bench_gpu.json, bench_gpu.png, bench.log, compile.log and the
# autotuner's cache file (genesis-cache/). Huge shapes stay bounded: sdpa_math is skipped where its
# score matrix would not fit, and every cell's repetitions are capped by --budget-ms, so the pytorch
# chunked path on Wan runs once or twice; the whole script ends well inside 6 minutes.
# With COMFYUI_PATH set to a ComfyUI checkout (only its comfy/ package is needed; it imports einops, psutil
# and PIL, all on the lent image), the e2e section also runs ComfyUI's own Flux model code (2 double + 4
# single blocks, random weights, 4608 tokens): ComfyUI's default attention vs Genesis AUTO through
# transformer_options["optimized_attention_override"].
# Usage (repo root): OUT=/some/dir [COMFYUI_PATH=/path/to/ComfyUI] bash scripts/gpu/bench_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export GENESIS_CACHE_DIR="$OUT/genesis-cache"   # a fresh cache: AUTO measures in this run
rm -rf "$GENESIS_CACHE_DIR"
fail=0

"$PY" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if ok else "NO CUDA DEVICE"); sys.exit(0 if ok else 1)' || exit 1

echo "== bench (attention, overhead, e2e)"
timeout 200 "$PY" -m genesis_core bench --device cuda --dtype bf16 --shapes diffusion --reps 10 --budget-ms 1500 \
    --section attention,overhead,e2e --e2e-blocks 4 --json "$OUT/bench_gpu.json" --plot "$OUT/bench_gpu.png" \
    --no-progress 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "FAIL bench exited $rc"; fail=1; fi

echo "== torch.compile (inductor, CUDA)"
timeout 150 "$PY" - <<'EOF' 2>&1 | tee "$OUT/compile.log"
import sys, time, torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from genesis_core.bench import FluxLikeBlock
from genesis_core.attn import dispatch
torch.manual_seed(0)
attn = lambda q, k, v: dispatch.attention(q, k, v)
m = FluxLikeBlock(24, 128, attn).cuda().to(torch.bfloat16).eval()
cnt = CompileCounterWithBackend("inductor")
cm = torch.compile(m, backend=cnt, fullgraph=True)
ok = True
with torch.no_grad():
    for n in (4608, 4608, 4608, 4096, 3072):
        x = torch.randn(1, n, 3072, device="cuda", dtype=torch.bfloat16)
        t0 = time.time(); y = cm(x); torch.cuda.synchronize(); dt = time.time() - t0
        ref = m(x)
        err = float((y.float() - ref.float()).norm() / ref.float().norm())
        print(f"compile n={n}: rel diff vs eager {err:.2e}, {dt * 1e3:.1f} ms (incl. compile on first), frames {cnt.frame_count}, "
              f"served by {dispatch.last_backend()}")
        ok &= err < 2e-2
ok &= cnt.frame_count <= 2
print("compile:", "PASS" if ok else "FAIL", f"(frames compiled: {cnt.frame_count}; target <= 2 for 5 calls over 3 lengths)")
sys.exit(0 if ok else 1)
EOF
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ]; then echo "FAIL torch.compile check exited $rc"; fail=1; fi

echo "== targets"
"$PY" - "$OUT/bench_gpu.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
env = d["environment"]
print(f"{env['device_name']} | torch {env['torch']} | CUDA {env['cuda']} | cuDNN {env.get('cudnn')} | {env['date_utc']}")
for name, b in env["backends"].items():
    print(f"  {name:<15} {'ok ' if b['available'] else 'no '} {b['version'] or '':<22} {b['reason'] or b['kernel']}"[:160])
bad = 0
print(f"\n{'shape':<18} {'fastest correct':<16} {'ms':>8} {'TFLOP/s':>8} | {'AUTO ->':<15} {'ms':>8} {'vs best':>8} {'choice':>8}")
print("  (vs best: the AUTO row, dispatch included; choice: the chosen kernel's own row; target: choice within 3%,\n"
      "   or within 3% timed alternately with the fastest; the same device kernel decides only without that timing)")
rows = {(r["shape"], r["backend"]): r for r in d.get("attention", [])}
for s in d.get("summary", []):
    best = rows.get((s["shape"], s["fastest_correct"]), {})
    ratio, choice = s.get("auto_vs_fastest"), s.get("choice_vs_fastest")
    print(f"{s['shape']:<18} {s['fastest_correct'] or '-':<16} {s['fastest_ms'] or 0:8.3f} {best.get('tflops') or 0:8.1f} | "
          f"{s['auto_backend'] or '-':<15} {s['auto_ms'] or 0:8.3f} {((ratio or 0) - 1) * 100:+7.1f}% {((choice or 0) - 1) * 100:+7.1f}%"
          + (f"  (Genesis over its kernel, timed alternately: {(s['auto_over_kernel'] - 1) * 100:+.1f}%)" if s.get("auto_over_kernel") else "")
          + (f"   rejected: {s['rejected']}" if s["rejected"] else ""))
    if not s["auto_correct"]:
        print(f"FAIL {s['shape']}: AUTO output over tolerance"); bad = 1
    # The choice is judged by the chosen kernel's own row (same run, same method); the AUTO row adds
    # Genesis' dispatch (a few us per call, judged by the overhead target), which shows on host-bound shapes.
    # Where the rows differ, the bench also timed the two alternately and compared their device kernels:
    # choice_ok / choice_verdict carry that judgement (a missing verdict on a timed choice fails too).
    if s.get("choice_vs_fastest_paired") is not None or s.get("same_kernel") is not None or s.get("kernel_probe_error"):
        paired = s.get("choice_vs_fastest_paired")
        print(f"  {'':<18} chosen vs fastest timed alternately: {((paired - 1) * 100) if paired else float('nan'):+.1f}%"
              f" ({s.get('choice_paired_rounds')} rounds); same kernel: {s.get('same_kernel')}"
              + (f"; kernel probe: {s['kernel_probe_error']}" if s.get("kernel_probe_error") else ""))
        print(f"  {'':<18} kernels: chosen {s.get('chosen_kernels')}, fastest {s.get('fastest_kernels')}"[:400])
    if s.get("choice_ok") is not True:
        why = s.get("choice_verdict") or ("no choice_ok in the summary" if choice is not None else "no timed choice")
        print(f"FAIL {s['shape']}: AUTO's choice: {why}"); bad = 1
    else:
        print(f"PASS {s['shape']}: AUTO's choice: {s['choice_verdict']}")
for r in d.get("overhead", []):
    if r["call"].startswith("genesis_core.attention(q, k, v)"):
        verdict = "PASS" if r["overhead_us"] <= 5.0 else "FAIL"
        print(f"{verdict} dispatch overhead on {r['device']}: {r['overhead_us']:+.2f} us per call ({r['us_per_call']:.2f} us total; target <= 5)")
        bad |= verdict == "FAIL" and r["device"] == "cpu"
for key, required in (("e2e", True), ("e2e_comfyui", False)):
    e2e = d.get(key, [])
    if len(e2e) == 2:
        ratio = e2e[1]["vs_baseline"]
        verdict = "PASS" if ratio <= 1.0 + 0.01 else "FAIL"
        print(f"{verdict} end to end ({e2e[0]['size']}): {e2e[0]['variant']} {e2e[0]['ms']:.3f} ms, "
              f"Genesis AUTO {e2e[1]['ms']:.3f} ms (x{ratio:.3f}, attention {e2e[1]['attention_backend']}, "
              f"rel diff {e2e[1]['rel_diff_vs_baseline']:.1e}; target: not slower, 1% noise allowed)")
        bad |= verdict == "FAIL"
    elif required or key + "_error" in d:
        print(f"FAIL {key}: {d.get(key + '_error', 'no rows')}"); bad = 1
    else:
        print(f"(no {key}: set COMFYUI_PATH to a ComfyUI checkout to run ComfyUI's own Flux model)")
sys.exit(bad)
EOF
rc=$?
if [ "$rc" -ne 0 ]; then fail=1; fi
echo "outputs in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $fail
