#!/usr/bin/env bash
# Compile every csrc/*.cu (and the binding .cpp) for sm_80 and sm_90 without a GPU, warnings shown.
# torch's CPU wheel carries the CUDA-side headers that the sources include; nvcc comes from CUDA_HOME.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$NVCC" ] || { echo "check_cuda_sources: nvcc not found at $NVCC" >&2; exit 1; }
mapfile -t INCLUDES < <(python - <<'PY'
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
PY
)
FLAGS=(-std=c++17 -O3 -Xcompiler -Wall -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
       --expt-relaxed-constexpr -Xcudafe --diag_suppress=20012)
for inc in "${INCLUDES[@]}"; do FLAGS+=(-I"$inc"); done
out=$(mktemp -d)
status=0
for src in csrc/*.cu; do
    for arch in 80 90; do
        echo "nvcc -c $src for sm_$arch"
        if ! "$NVCC" "${FLAGS[@]}" -gencode "arch=compute_$arch,code=sm_$arch" -c "$src" -o "$out/$(basename "$src").$arch.o"; then
            status=1
        fi
    done
done
rm -rf "$out"
[ $status -eq 0 ] && echo "check_cuda_sources: all sources compiled" || echo "check_cuda_sources: FAILED" >&2
exit $status
