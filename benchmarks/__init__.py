"""Benchmarks of every aimv2_kernels op and of a whole AIMv2 training step against the alternatives.

    python -m benchmarks                 # every suite (needs a CUDA GPU; on a CPU: a smoke run)
    python -m benchmarks --quick --out DIR
    python -m benchmarks --suite attention --suite loss
    python -m benchmarks --list

One module per suite (`norm`, `swiglu`, `attention`, `varlen`, `loss`, `step`, `host`), each with `run(ctx)` and
`targets(results)`; `harness` times and measures, `providers` builds ours and the alternatives,
`report` writes the table, CSV and plot. `pytest benchmarks/` runs CPU-sized versions of the op
benchmarks through pytest-benchmark. Results of GPU runs: benchmarks/RESULTS.md.
"""
from . import attention, host, loss, norm, step, swiglu, varlen

SUITES = {module.NAME: module for module in (norm, swiglu, attention, varlen, loss, step, host)}
