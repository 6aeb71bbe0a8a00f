#!/usr/bin/env bash
# Fetch into .whl/ (repo root, git-ignored through .git/info/exclude) the wheels that the
# lent GPU machine's image lacks for `python -m benchmarks --gpu`. That machine cannot reach
# the network; its python3 (3.12) already holds torch, numpy, grpcio, protobuf, pyyaml, rich,
# typer, requests, safetensors, scikit-learn and matplotlib (.library/device/KINDS.md).
#
#   benchmarks/device/fetch_wheels.sh            # here, in the project's venv (22 wheels and NATTEN's sdist, about 27 MB)
#   then run benchmarks/device/run_gpu.sh there  # see docs/performance.md, "The GPU run"
#
# Versions are those of this venv, the ones the test suite ran with. grpcio and protobuf
# are carried too although the image has them: Flower's generated gRPC code checks their
# versions, and the image's are not pinned. Only what the in-process engine imports is
# carried (found by running it over a venv of the image's packages alone: Flower's error
# catalog imports FastAPI, its object store SQLAlchemy): no Ray (the GPU plan runs no Ray
# path), no medmnist (the benchmarks use the embedded BreastMNIST), no uvicorn or uv.
# DEVICE_PYTHON_VERSION=3.11 fetches for this machine's Python instead (to test the set here).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PY=${DEVICE_PYTHON_VERSION:-3.12}
mkdir -p .git/info "$DEST"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
rm -f "$DEST"/*.whl

packages=()
for name in flwr cryptography cffi pycparser pycryptodome iterators tomli tomli-w grpcio grpcio-health-checking \
            fastapi starlette pydantic pydantic-core annotated-types typing-inspection sqlalchemy greenlet alembic mako \
            protobuf; do
    version=$(python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
        echo "fetch_wheels: $name is not installed in this venv; install medfed first (README)." >&2; exit 1; }
    packages+=("$name==$version")
done
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64; do
    platforms+=(--platform "$tag")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
    "${platforms[@]}" -d "$DEST" "${packages[@]}"
# NATTEN is published only as an sdist. Built here, without CUDA kernels, it is a
# pure-Python wheel (flex backend, no fused kernels); building its kernels for SM 9.0
# takes about 9 minutes on the 16-core GPU machine, more than a lease leaves beside the
# plan (docs/performance.md, NATTEN section). The sdist travels too, for
# natten_build_probe.sh; the wheel is built from that very file.
natten_version=$(python -c "import importlib.metadata as m; print(m.version('natten'))")
rm -f "$DEST"/natten-*.tar.gz
python -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$DEST" "natten==$natten_version"
NATTEN_CUDA_ARCH="" python -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$DEST"/natten-"$natten_version".tar.gz
ls "$DEST"/*.whl | grep -q 'natten-.*-py3-none-any.whl' || {
    echo "fetch_wheels: the NATTEN wheel is not pure Python (was CUDA found here?); build it without CUDA." >&2
    exit 1; }
du -ch "$DEST"/* | tail -1 | sed "s|total|in $DEST/ for Python $PY|"
