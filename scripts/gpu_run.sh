#!/usr/bin/env bash
# On a GPU machine: print the device and versions, build the extension, run the tests with each
# CUDA backend, run compute-sanitizer memcheck on norms and prox_, and run the full benchmark.
#
#   scripts/gpu_run.sh OUTDIR
#
# Every step runs under a time limit and its exit status goes into OUTDIR/summary.txt; a failed
# step does not stop the next ones. The whole run ends within GPU_RUN_SECONDS (default 540).
# OUTDIR gets at most 8 files: env.txt, build.log, tests.log, sanitizer.log, bench.log,
# cuda-full.csv, cuda-full.png and summary.txt.
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."

TOTAL=${GPU_RUN_SECONDS:-540}
PY=${PYTHON:-python}
SUMMARY="$OUT/summary.txt"
STEPS=()

# run_step NAME LIMIT_SECONDS LOG COMMAND...: runs COMMAND (a function of this script or a program)
# in a child shell under LIMIT_SECONDS (less if the run's time is running out; STEP_LIMIT tells
# it), appends its output to LOG and records its exit status; never fails.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((TOTAL - SECONDS - 15))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -le 5 ]; then
        STEPS+=("$(printf '%-14s %-9s %7s  %s' "$name" "skipped" "0" "no time left")")
        return
    fi
    echo "== $name: $* (limit ${limit}s)" >> "$log"
    local start=$SECONDS
    STEP_LIMIT=$limit timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" >> "$log" 2>&1
    local rc=$?
    local status=$rc
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="$rc(time)"; fi
    STEPS+=("$(printf '%-14s %-9s %7s  %s' "$name" "$status" "$((SECONDS - start))" "$(basename "$log")")")
    echo "== $name: exit $rc after $((SECONDS - start))s" >> "$log"
    echo "[$(date -u +%T)] $name: exit $rc after $((SECONDS - start))s" >&2
}

environment() {
    date -u +%Y-%m-%dT%H:%M:%SZ
    git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no | head -20
    nvidia-smi
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, \
'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    "$PY" -c "import triton; print('triton', triton.__version__)"
    nvcc --version
    sanitizer --version
    echo "cpus: $(nproc)"
}

sanitizer() {
    local tool
    tool=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
    "$tool" "$@"
}

build() {
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -e . &&
        "$PY" -c "import regfast; print(regfast.backend('cuda')); print(regfast.backend('cpu'))"
}

tests_with() {
    REGFAST_BACKEND=$1 "$PY" -m pytest tests -q -p no:cacheprovider
}

# Norms and the prox on shapes that stress the launchers (empty, 0-dim, 1 element, odd sizes,
# above 65535 blocks' worth), with each CUDA backend; PyTorch's caching allocator is off so that
# memcheck sees each tensor's own bounds.
memcheck() {
    local script
    script=$(mktemp /tmp/regfast_memcheck.XXXXXX.py)
    cat > "$script" <<'EOF'
import os

import torch

import regfast
from regfast import _dispatch

shapes = [(), (0,), (1,), (7,), (3, 0), (17, 33), (4, 3, 5, 2), (1031,), (2, 65537)]
failures = 0
for backend in ("cuda", "triton"):
    reason = _dispatch.unavailable_reason(backend, "cuda")
    if reason:
        print(f"{backend}: not run: {reason}")
        continue
    os.environ["REGFAST_BACKEND"] = backend
    for dtype in (torch.float32, torch.bfloat16):
        ws = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        ref = [w.double().cpu() for w in ws]
        n = regfast.norms(ws)
        regfast.prox_(ws, 0.1, l1=0.5, l2=0.1, group_lasso=0.05)
        torch.cuda.synchronize()
        l1 = sum(r.abs().sum().item() for r in ref)
        ok = abs(n.l1.item() - l1) <= 1e-2 * max(l1, 1.0)
        failures += not ok
        print(f"{backend} {dtype}: norms l1 {n.l1.item():.6g} (float64 {l1:.6g}) {'ok' if ok else 'WRONG'}; "
              f"prox_ zeros {sum(int((w == 0).sum()) for w in ws)}")
raise SystemExit(1 if failures else 0)
EOF
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitizer --tool memcheck --error-exitcode 3 --leak-check no "$PY" "$script"
    local rc=$?
    rm -f "$script"
    return $rc
}

# Cases not started after the budget are recorded as skipped; the margin covers the case in
# flight, the chart and the table.
bench() {
    local budget=$((STEP_LIMIT - 60))
    if [ "$budget" -lt 30 ]; then budget=30; fi
    "$PY" -m regfast.bench --full --device cuda --out "$OUT" --budget "$budget"
}

export PY OUT
export -f environment sanitizer build tests_with memcheck bench

run_step env 60 "$OUT/env.txt" environment
run_step build 240 "$OUT/build.log" build
run_step tests-cuda 100 "$OUT/tests.log" tests_with cuda
run_step tests-triton 120 "$OUT/tests.log" tests_with triton
run_step tests-auto 80 "$OUT/tests.log" tests_with auto
run_step memcheck 90 "$OUT/sanitizer.log" memcheck
run_step bench 600 "$OUT/bench.log" bench

{
    echo "regfast GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS}s"
    grep -m1 -E "^torch " "$OUT/env.txt"
    grep -m1 -E "^triton " "$OUT/env.txt"
    echo
    printf '%-14s %-9s %7s  %s\n' step exit seconds log
    printf '%s\n' "${STEPS[@]}"
    echo
    awk '/^== tests-[a-z]+: / {step = substr($2, 1, length($2) - 1)}
         /^(=+ )?[0-9]+ (passed|failed|error)/ {print "tests: " step ": " $0}' "$OUT/tests.log"
    grep -E "ERROR SUMMARY|: norms" "$OUT/sanitizer.log" | sed 's/^/memcheck: /'
    if [ -f "$OUT/cuda-full.csv" ]; then
        echo
        "$PY" -m regfast.bench --headline "$OUT/cuda-full.csv"
        echo
        "$PY" -m regfast.bench --markdown "$OUT/cuda-full.csv"
    fi
} > "$SUMMARY" 2>&1

# The short table: steps, test counts, and the fastest regfast row against the naive loop (float32).
sed -n '1,/^$/p' "$SUMMARY" | head -4
printf '%-14s %-9s %7s  %s\n' step exit seconds log
printf '%s\n' "${STEPS[@]}"
grep -E "^(tests|memcheck): " "$SUMMARY"
if [ -f "$OUT/cuda-full.csv" ]; then
    "$PY" -m regfast.bench --headline "$OUT/cuda-full.csv" | grep -E "^(workload|-|.* float32 )"
fi
echo "full results: $OUT"
