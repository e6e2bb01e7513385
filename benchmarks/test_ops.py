"""The op benchmarks at CPU size through pytest-benchmark: every provider that can run here, each
mode, the smallest size of each suite; on a GPU, the same tests time the real kernels.

Each test also checks that the provider computes what the suite's eager PyTorch provider computes,
so a miswired provider cannot produce a fast but meaningless number.
"""
import pytest
import torch

from benchmarks import attention, loss, norm, swiglu
from benchmarks.harness import FWD, FWD_BWD, Card, Context, prepare, synchronize

HAS_CUDA = torch.cuda.is_available()
SUITES = (norm, swiglu, attention, loss)
TRUTH = {"norm": "eager", "swiglu": "eager", "attention": "sdpa dense mask", "loss": "eager materialized"}


def _context() -> Context:
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    return Context(device, quick=True, card=Card("test", copy_gbps=1.0, matmul_tflops=1.0, l2_mib=0.0))


def _params():
    ctx = _context()
    return [pytest.param(suite, p.name, mode, id=f"{suite.NAME}-{p.name}-{mode}")
            for suite in SUITES for p in suite.providers(ctx) for mode in (FWD, FWD_BWD)]


def _first_case(suite, ctx, mode):
    return next(c for c in suite.cases(ctx, modes=(mode,)))


def _forward_output(case, provider, inputs):
    with torch.no_grad(), provider.active():
        return provider.bind(inputs)().float()


@pytest.mark.parametrize("suite, provider_name, mode", _params())
def test_op_benchmark(benchmark, suite, provider_name, mode):
    ctx = _context()
    providers = {p.name: p for p in suite.providers(ctx)}
    provider = providers[provider_name]
    skip = provider.skip_reason(mode)
    if skip:
        pytest.skip(skip)
    case = _first_case(suite, ctx, mode)

    # A provider of another mask (plain causal attention) or a bound that is not the op (the loss's
    # GEMM floor) computes something else on purpose: only the others must match the truth.
    if provider.mask != "causal" and not provider.bound:
        inputs = case.make_inputs(False)
        got = _forward_output(case, provider, inputs)
        want = _forward_output(case, providers[TRUTH[suite.NAME]], inputs)
        tol = 2e-2 if HAS_CUDA else 1e-4  # bf16 on a GPU, fp32 on the CPU
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        assert err <= tol, f"{provider_name} differs from {TRUTH[suite.NAME]}: relative error {err:.2e}"

    with provider.active():
        fn, leaves = prepare(case, provider, ctx.device)
        fn()  # compilation and first-call work, not timed

        def timed():
            for t in leaves:
                t.grad = None
            fn()
            synchronize(ctx.device)

        benchmark.pedantic(timed, rounds=20 if HAS_CUDA else 2, iterations=1, warmup_rounds=1)
    if mode == FWD_BWD:
        grads = [t.grad for t in leaves]
        if provider.bound:  # the GEMM floor differentiates hidden and weight only
            grads = [g for g in grads if g is not None]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
