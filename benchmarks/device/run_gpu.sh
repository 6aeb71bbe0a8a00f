#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels (fetch_wheels.sh) beside the image's
# torch, then run `python -m benchmarks --gpu`, writing everything to $OUT, which comes back:
#   $OUT/results/*.json   the four benchmarks' JSON and run_gpu.json
#   $OUT/performance.md   docs/performance.md with its gpu block rewritten
#   $OUT/gpu.log          the whole output
# The device tool's call (one call; the plan took 244 s on an H200, and
# natten_build_probe.sh uses the rest of the call):
#   run(command="bash benchmarks/device/run_gpu.sh; rc=$?; bash benchmarks/device/natten_build_probe.sh $((575 - SECONDS)); exit $rc",
#       carry=[".whl"], timeout_s=590)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/medfed-gpu-out}
mkdir -p "$OUT/results"
ls .whl/*.whl > /dev/null 2>&1 || { echo "run_gpu: no wheels in .whl/; run benchmarks/device/fetch_wheels.sh here and carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "run_gpu: installing the carried wheels failed" >&2; exit 2; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
python3 -c "import torch, flwr, natten, medfed; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, '| flwr', flwr.__version__, '| natten', natten.__version__, '|', torch.cuda.get_device_name(0))" \
    || { echo "run_gpu: the environment is incomplete (see above)" >&2; exit 2; }
cp docs/performance.md "$OUT/performance.md"
python3 -m benchmarks --gpu --results-dir "$OUT/results" --docs "$OUT/performance.md" 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
