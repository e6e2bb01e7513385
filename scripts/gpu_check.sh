#!/usr/bin/env bash
# GPU check, on one of our GPU machines (torch 2.11, triton 3.6, no network), in under 8 minutes:
# install the project (building the CUDA extension), print the card and versions, run the GPU-marked
# tests on every backend, then the quick benchmark suite. Writes at most 8 files into OUTDIR.
#   bash scripts/gpu_check.sh OUTDIR
set -uo pipefail
OUT="${1:?usage: scripts/gpu_check.sh OUTDIR}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
start=$(date +%s)
report="$OUT/report.md"

arch=$(python -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')" 2>/dev/null || echo "9.0")
echo "# GPU check $(date -u +%FT%TZ)" > "$report"
{
    nvidia-smi
    python -c "import sys, torch, triton; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

# Build the extension for this card only (faster than the 8.0;9.0 default).
TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" timeout 240 \
    pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
echo "- install: exit $? ($(( $(date +%s) - start ))s), log install.log" >> "$report"
python -c "import aimv2_kernels as ak; print('available backends:', ak.available_backends()); print('cuda:', ak.unavailable_reason('cuda') or 'ok')" >> "$report" 2>&1

timeout 210 python -m pytest -m gpu -q -x --no-header -p no:cacheprovider tests > "$OUT/gpu_tests.log" 2>&1
echo "- gpu tests: exit $? ($(( $(date +%s) - start ))s): $(tail -n 1 "$OUT/gpu_tests.log")" >> "$report"

if [ -f benchmarks/__main__.py ]; then
    remaining=$(( 460 - ($(date +%s) - start) ))
    if [ "$remaining" -gt 30 ]; then
        timeout "$remaining" python -m benchmarks --quick --out "$OUT" > "$OUT/bench.log" 2>&1
        echo "- benchmarks: exit $? ($(( $(date +%s) - start ))s), log bench.log" >> "$report"
        [ -f "$OUT/results.md" ] && cat "$OUT/results.md" >> "$report"
    fi
fi
echo "- total $(( $(date +%s) - start ))s" >> "$report"
cat "$report"
