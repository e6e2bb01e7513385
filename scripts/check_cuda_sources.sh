#!/usr/bin/env bash
# Compile the csrc/ sources without a GPU, with the flags of the real build, warnings shown:
# every .cu for sm_80 and sm_90a (one nvcc run per file, both targets), and the binding .cpp once;
# then print the per-kernel table of scripts/cuda_kernel_table.py (registers, spills, shared memory,
# HMMA/HGMMA instructions in the SASS). Fails on any compile error, on any register spill to local
# memory, and on an attention kernel without the matrix instructions of its path.
#
# It uses the headers of the installed torch (a CPU wheel is enough) and nvcc from CUDA_HOME. Two
# gaps of that setup are bridged, without changing what the build compiles:
#   * the CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated only for CUDA builds; it
#     defines C10_CUDA_BUILD_SHARED_LIBS, used for Windows DLL exports), so its include is switched
#     off with -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE;
#   * a compiler-only toolkit lacks the cuBLAS/cuSPARSE/cuSOLVER headers that
#     ATen/cuda/CUDAContext.h includes, so the sources include c10/cuda headers instead of it.
#   bash scripts/check_cuda_sources.sh                          # every source
#   bash scripts/check_cuda_sources.sh csrc/attention_sm80.cu    # only the sources named
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$NVCC" ] || { echo "check_cuda_sources: nvcc not found at $NVCC" >&2; exit 1; }

# Include paths, torch's own nvcc flags, the C++ standard torch builds extensions with, the ABI, and
# the project's flags (aimv2_kernels/cuda_backend/ext.py, shared with setup.py and the first-use build).
settings=$(python - <<'PY'
import importlib.util
import inspect
import sysconfig

import torch
from torch.utils import cpp_extension

spec = importlib.util.spec_from_file_location("cuda_ext", "aimv2_kernels/cuda_backend/ext.py")
cuda_ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cuda_ext)
# The standard torch's extension builder passes when the project passes none (as it does not).
std = "c++20" if "-std=c++20" in inspect.getsource(cpp_extension) else "c++17"
flags = [f"-std={std}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
flags += cpp_extension.COMMON_NVCC_FLAGS + cuda_ext.NVCC_FLAGS
flags += [f"-I{p}" for p in cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]]
flags += [f"-I{p}" for p in cuda_ext.cutlass_include_dirs()]
print("\n".join(flags))
PY
)
mapfile -t SETTINGS <<< "$settings"
FLAGS=("${SETTINGS[@]}" -DTORCH_EXTENSION_NAME=_C -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE
       -Xcompiler -Wall -Xptxas -warn-spills,-warn-lmem-usage)
shopt -s nullglob
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0

compile() {  # compile SOURCE [nvcc args...]; fails on an error or a spill warning
    local src=$1 log="$out/$(basename "$1").log"
    shift
    if ! "$NVCC" "${FLAGS[@]}" "$@" -c "$src" -o "$out/$(basename "$src").o" > "$log" 2>&1; then
        status=1
    fi
    cat "$log"
    if grep -qiE "spill|local memory" "$log"; then
        echo "check_cuda_sources: $src uses local memory (register spills)" >&2
        status=1
    fi
}

if [ $# -gt 0 ]; then sources=("$@"); else sources=(csrc/*.cu csrc/*.cpp); fi
for src in "${sources[@]}"; do
    [[ $src == *.cu ]] || continue
    echo "nvcc -c $src for sm_80 and sm_90a"
    compile "$src" --threads 0 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
done
for src in "${sources[@]}"; do
    [[ $src == *.cpp ]] || continue
    echo "nvcc -c $src (host code)"
    compile "$src"
done

objects=("$out"/*.cu.o)
if [ ${#objects[@]} -gt 0 ]; then
    python scripts/cuda_kernel_table.py "${objects[@]}" || status=1
fi

if [ $status -eq 0 ]; then echo "check_cuda_sources: all sources compiled"; else echo "check_cuda_sources: FAILED" >&2; fi
exit $status
