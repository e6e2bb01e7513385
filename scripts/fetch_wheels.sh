#!/usr/bin/env bash
# Download the peers' wheels for our GPU machines (Python 3.12, manylinux x86_64, no network there)
# into .whl/ (ignored by git), where scripts/gpu_check.sh installs them. Only pure-Python peers built
# on Triton travel: their dependencies (torch, triton) are already on the GPU machine, so --no-deps.
# nvidia-cutlass travels too: the CUDA extension's build reads the CuTe headers it ships (and
# nothing of its Python side, whose dependencies stay behind).
# The CuTe-DSL peers (flash-attn-4, quack) need ~95 MB of compiler libraries and stay behind.
#   bash scripts/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 nvidia-cutlass==4.2.0.0)
LIMIT_MIB=20
mkdir -p .whl
for peer in "${PEERS[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$peer"
done
size=$(du -sm .whl | cut -f1)
ls -l .whl
if [ "$size" -gt "$LIMIT_MIB" ]; then
    echo "fetch_wheels: .whl/ holds ${size} MiB, over the ${LIMIT_MIB} MiB that may travel" >&2
    exit 1
fi
echo "fetch_wheels: ${size} MiB in .whl/"
