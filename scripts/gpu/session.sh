#!/usr/bin/env bash
# One lent-GPU session of Genesis checks, in stages: bash scripts/gpu/session.sh STAGE [STAGE ...]
#
# Written for the lent H200 (python3 3.12, torch 2.11 cu130, no network). What travels with the call (ignored
# folders of the repo, never committed): .whl/ (wheels: fa3-fwd, nvidia-cudnn-frontend, flash-attn-4 and its
# pure-python deps, nvidia-cutlass-dsl base and core libs: the core wheel holds the CuTe Python package,
# cutlass.cute), .fa4a/ and .fa4b/ (the 92 MB cu13 CuTe-DSL libs wheel, repacked as two xz tarballs because one call
# carries at most 64 MiB: on 2026-12-02 the first call carried .whl + .fa4b and ran `keep`, the next one, within
# the 30 s a warm machine waits, carried .fa4a alone; /tmp/keep holds them while the machine stays warm), .sage_src/ (SageAttention 2.x source, thu-ml/SageAttention main; built in /tmp/sage, which also
# outlives the call while the machine stays warm), .comfy/ (ComfyUI's comfy/ package as comfy.tar.xz, for the
# end-to-end runs).
#
# Stages:
#   keep      copy what this call carried in .fa4a/ and .fa4b/ to /tmp/keep (the next call must follow within 30 s)
#   setup     install the wheels into /tmp/site, unpack the CuTe-DSL libs if kept, start the SageAttention build in
#             /tmp/sage in the background (/tmp/sage/sage.log) unless it is built or building, unpack ComfyUI
#   info      python -m genesis_core info, nvidia-smi
#   waitsage  wait for the SageAttention build (it takes ~200 s on 16 cores)
#   gputests  pytest -m gpu
#   interp    the quantiser's Triton tests under TRITON_INTERPRET=1 (tests/test_quant_fp8.py; skipped in CI without Triton)
#   kernels   scripts/gpu/kernels_gpu.py      (FlashAttention packages, SageAttention 2 sub-kernels)
#   fp8       scripts/gpu/fp8_gpu.py          (FP8 attention, the fused quantisation, its error)
#   bench     python -m genesis_core bench    (the BENCHMARKS.md run; bench_gpu.sh)
#   e2e       scripts/gpu/comfy_e2e_gpu.py    (ComfyUI's Wan 1.3B, Flux, SDXL; needs .comfy)
#   edges     scripts/gpu/sage_edges.py       (small shapes where SageAttention / FP8 kernels write NaN or lose accuracy)
#   fp8prof   scripts/gpu/fp8_profile.py      (device time per kernel and host time per call of the FP8 paths)
#   qvar      scripts/gpu/quant_variants.py   (the quantiser's launch settings, timed and checked bit for bit)
#   scaleout  scripts/gpu/scaleout.py --gpus 1 (the single-GPU path of the multi-GPU benchmark)
# Every stage writes under $OUT (logs and JSON) and goes on after a failing stage; the exit code says whether any
# stage failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
FINAL="${OUT:-$(mktemp -d)}"
OUT="$FINAL/work"          # everything lands here, and comes back as one archive (a call returns at most 8 files)
mkdir -p "$OUT" /tmp/keep /tmp/site
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
SAGE=/tmp/sage
export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$SAGE:$REPO"
export GENESIS_CACHE_DIR="$OUT/genesis-cache"
[ -d /tmp/comfyui/comfy ] && export COMFYUI_PATH=/tmp/comfyui
fail=0
say() { echo "== [$(date +%H:%M:%S)] $*"; }
run() {  # run NAME TIMEOUT CMD...: one stage, its log in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  say "$name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 60
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "FAIL stage $name exited $rc"; fail=1; }
}

for stage in "$@"; do
  case "$stage" in
    keep)
      cp -f .fa4a/* .fa4b/* /tmp/keep/ 2>/dev/null; ls -la /tmp/keep ;;
    setup)
      say "setup"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $(ls .whl/*.whl /tmp/keep/*.whl 2>/dev/null) 2>&1 | tail -3
      for t in /tmp/keep/*.tar.xz .fa4b/*.tar.xz; do [ -f "$t" ] && tar -xJf "$t" -C /tmp/site && echo "unpacked $t"; done
      if [ -f .comfy/comfy.tar.xz ]; then
        mkdir -p /tmp/comfyui && tar -xJf .comfy/comfy.tar.xz -C /tmp/comfyui && export COMFYUI_PATH=/tmp/comfyui
        echo "ComfyUI at $COMFYUI_PATH"
      fi
      if ls $SAGE/sageattention/_qattn_sm90*.so >/dev/null 2>&1; then
        echo "SageAttention already built in $SAGE"
      elif pgrep -f "setup.py build_ext" >/dev/null; then
        echo "SageAttention build still running in $SAGE"
      elif [ -f .sage_src/setup.py ]; then
        rm -rf $SAGE && cp -r .sage_src $SAGE
        (cd $SAGE && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14 EXT_PARALLEL=4 NVCC_APPEND_FLAGS="--threads 4" \
          nice -n 10 python3 setup.py build_ext --inplace > $SAGE/sage.log 2>&1; echo "exit $?" >> $SAGE/sage.log) &
        echo "SageAttention build started in the background (log: $SAGE/sage.log)"
      fi ;;
    info)
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
      python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
      run info 120 python3 -m genesis_core info ;;
    waitsage)
      say "waiting for the SageAttention build"
      for _ in $(seq 1 330); do grep -q "^exit" $SAGE/sage.log 2>/dev/null && break; sleep 1; done
      tail -n 5 $SAGE/sage.log; cp $SAGE/sage.log "$OUT/" 2>/dev/null; ls -la $SAGE/sageattention/*.so 2>/dev/null ;;
    gputests)
      run gputests 420 python3 -m pytest -q -m gpu -p no:cacheprovider tests ;;
    interp)
      run interp 240 env TRITON_INTERPRET=1 python3 -m pytest -q -p no:cacheprovider tests/test_quant_fp8.py ;;
    kernels)
      run kernels 240 python3 scripts/gpu/kernels_gpu.py --out "$OUT" ;;
    fp8)
      run fp8 240 python3 scripts/gpu/fp8_gpu.py --out "$OUT" ;;
    bench)
      run bench 420 env OUT="$OUT/bench" bash scripts/gpu/bench_gpu.sh ;;
    benchq)  # the bench alone (no torch.compile stage, no ComfyUI Flux e2e), within BENCH_BUDGET_S
      run benchq 300 env -u COMFYUI_PATH python3 -m genesis_core bench --device cuda --dtype bf16 \
        --section attention,overhead,e2e --time-budget-s "${BENCH_BUDGET_S:-180}" --json "$OUT/bench.json" \
        --plot "$OUT/bench.png" --no-progress ;;
    gpusub)  # the GPU tests that failed in the first H200 run, and the FP8 ones
      run gpusub 240 python3 -m pytest -q -m gpu -p no:cacheprovider \
        ${GPUSUB_TESTS:-tests/test_gpu_fp8.py tests/test_masked_rows.py tests/test_gpu_flash_sage.py} ;;
    e2e)
      run e2e 330 python3 scripts/gpu/comfy_e2e_gpu.py --out "$OUT" --budget-s "${E2E_BUDGET_S:-270}" ;;
    edges)
      run edges 180 python3 scripts/gpu/sage_edges.py --out "$OUT" ${EDGES_ARGS:-} ;;
    qvar)
      run qvar 150 python3 scripts/gpu/quant_variants.py --out "$OUT" ;;
    fp8prof)
      run fp8prof 120 python3 scripts/gpu/fp8_profile.py --out "$OUT" ;;
    scaleout)
      run scaleout 240 python3 scripts/gpu/scaleout.py --gpus 1 --json "$OUT/scaleout.json" ${SCALEOUT_ARGS:-} ;;
    *)
      echo "unknown stage $stage"; fail=1 ;;
  esac
done
ls -la "$OUT"
tar -czf "$FINAL/session.tgz" -C "$OUT" . && rm -rf "$OUT"
exit $fail
