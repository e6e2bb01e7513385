#!/usr/bin/env bash
# The staged, time-boxed GPU check (docs/gpu_check.md): env and build, correctness, compute-sanitizer,
# benchmarks, each under its own timeout, each stage written to OUTDIR/report.md and results.json as
# soon as it ends. Installs the peers' wheels found in .whl/ (scripts/fetch_wheels.sh) first.
#   bash scripts/gpu_check.sh OUTDIR                 # on a GPU machine, about 7 minutes
#   bash scripts/gpu_check.sh --cpu-smoke OUTDIR     # the same plumbing without a GPU (CI runs it)
#   bash scripts/gpu_check.sh --plan                 # one `stage NAME BUDGET_SECONDS` line per stage
#   bash scripts/gpu_check.sh --only tests,sanitizer OUTDIR ; bash scripts/gpu_check.sh --suite attention OUTDIR
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

plan_only=0
for arg in "$@"; do [ "$arg" = "--plan" ] && plan_only=1; done

# Peers (pure Python on Triton) travel as wheels: install them beside, never over, the machine's own.
if [ "$plan_only" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    peers=/tmp/aimv2-kernels-peers
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$peers" .whl/*.whl; then
        export PYTHONPATH="$peers${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: installing the wheels in .whl/ failed; the peers will be reported as skipped" >&2
    fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
