#!/usr/bin/env bash
# On the lent GPU machine, after run_gpu.sh: build NATTEN's CUDA kernels for SM 9.0 only
# (H100/H200) from the carried sdist, with every core, for at most BUDGET seconds, and
# report how far the build got. Issue 9 asks whether the fused kernels build "in a few
# minutes"; a build cut off at its budget still measures that (percent done by make
# after N seconds), and a finished one leaves the wheel's build time.
#   bash benchmarks/device/natten_build_probe.sh BUDGET_SECONDS
# Writes $OUT/natten_build.log: the toolchain, make's progress lines and the outcome.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/medfed-gpu-out}
BUDGET=${1:-300}
LOG="$OUT/natten_build.log"
mkdir -p "$OUT"
if (( BUDGET < 30 )); then
    echo "natten_build_probe: only ${BUDGET} s left; not started" | tee "$LOG"
    exit 0
fi
sdist=$(ls .whl/natten-*.tar.gz 2>/dev/null | head -1)
[[ -n "$sdist" ]] || { echo "natten_build_probe: no NATTEN sdist in .whl/ (fetch_wheels.sh puts it there)" | tee "$LOG"; exit 2; }
{
    echo "sdist: $sdist; budget ${BUDGET} s; cores $(nproc)"
    nvcc --version | tail -2
    cmake --version | head -1
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} > "$LOG" 2>&1
export NATTEN_CUDA_ARCH="9.0" NATTEN_N_WORKERS="$(nproc)" NATTEN_BUILD_DIR=/tmp/natten-build
# A fresh build: what an earlier probe on this machine compiled must not count.
rm -rf "$NATTEN_BUILD_DIR" /tmp/natten-wheel
mkdir -p "$NATTEN_BUILD_DIR" /tmp/natten-wheel
started=$(date +%s)
timeout --signal=KILL "$BUDGET" python3 -m pip wheel -v --no-deps --no-build-isolation --no-index \
    -w /tmp/natten-wheel "$sdist" > /tmp/natten-build.log 2>&1
rc=$?
elapsed=$(( $(date +%s) - started ))
{
    echo "--- build output: lines about the plan, make's progress, errors (full log not kept)"
    grep -E "archs|workers|Auto-gen|\[ *[0-9]+%\]|[Ee]rror|Successfully|Built" /tmp/natten-build.log | tail -400
    echo "--- outcome"
    objects=$(find "$NATTEN_BUILD_DIR" -name '*.o' 2>/dev/null | wc -l)
    # Every object's rule names its source last: the build's whole count of objects.
    planned=$(grep -cE '\.(cu|cpp)\.o: .*\.(cu|cpp)$' "$NATTEN_BUILD_DIR/CMakeFiles/natten.dir/build.make" 2>/dev/null)
    progress=$(grep -oE '\[ *[0-9]+%\]' /tmp/natten-build.log | tail -1)
    echo "rc=$rc (137: cut off at the budget) after ${elapsed} s; make's last progress ${progress:-none};" \
         "object files done ${objects} of ${planned:-?}"
    ls -la /tmp/natten-wheel 2>/dev/null
} >> "$LOG" 2>&1
tail -3 "$LOG"
exit 0
