"""Shared test utilities: comparison by relative error norm and per element, tolerances, float64
gradients, the linear cross-entropy against its reference."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

# The per-element bound of `assert_close`, in units of tol * max|expected|: loose enough for the
# rounding of a correct kernel (whose worst element is a few times its typical error), tight enough
# that a wrong row or tile fails even when it barely moves the norm of a large tensor.
ELEMENT_FACTOR = 4.0


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / max(||expected||, tiny), computed in float64."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|), in float64; (0, 0) for empty tensors."""
    if expected.numel() == 0:
        return 0.0, 0.0
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).abs().max()), float(e.abs().max())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "",
                 element_factor: float = ELEMENT_FACTOR) -> None:
    """actual matches expected within `tol` by relative error norm AND per element: every element
    within element_factor * tol * max|expected| of its expected value, so one wrong row of a large
    tensor fails even when the norm of the whole hardly moves."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    worst, scale = max_abs_err(actual, expected)
    bound = element_factor * tol * scale
    if worst > bound:
        diff = (actual.detach().double() - expected.detach().double()).abs()
        where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: element {where} off by {worst:.3e} > {bound:.3e} ({element_factor:g} x tol {tol:.1e} x "
            f"max|expected| {scale:.3e}); relative error norm {err:.3e}")


# fp32 near 1e-5, fp16/tf32 near 3e-4..1e-3, bf16 1e-2 (SPEC section 5)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def assert_error_names(call, error: type, words) -> None:
    """call() raises `error` whose message contains every one of `words`."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def grads64(fn, *tensors):
    """Value and gradients of fn on float64 copies of tensors (None entries pass through)."""
    copies = [t.detach().double().requires_grad_() if t is not None else None for t in tensors]
    out = fn(*copies)
    out.backward()
    return out.detach(), [c.grad if c is not None else None for c in copies]


def check_linear_ce(device, tokens: int, vocab: int, D: int, dtype: torch.dtype, with_bias: bool,
                    make_labels: Callable[[int, int, torch.device], torch.Tensor]) -> None:
    """`ak.linear_cross_entropy` on random (tokens, D) hidden states, a (vocab, D) weight, a bias if
    with_bias, all in dtype, and make_labels(tokens, vocab, device), forward and backward, against the
    float64 reference: the float32 loss within float32's tolerance, the gradients within dtype's."""
    import aimv2_kernels as ak
    from aimv2_kernels import reference as ref

    hidden = torch.randn(tokens, D, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, D, device=device) * 0.5).to(dtype).requires_grad_()
    bias = torch.randn(vocab, device=device).to(dtype).requires_grad_() if with_bias else None
    labels = make_labels(tokens, vocab, device)
    out = ak.linear_cross_entropy(hidden, weight, labels, bias=bias)
    out.backward()
    expected, grads = grads64(lambda h, w, b: ref.linear_cross_entropy(h, w, labels, b), hidden, weight, bias)
    assert out.dtype == torch.float32
    tol = TOLERANCE[dtype]
    assert_close(out, expected, TOLERANCE[torch.float32], "loss")
    assert_close(hidden.grad, grads[0], tol, "dhidden")
    assert_close(weight.grad, grads[1], tol, "dweight")
    if bias is not None:
        assert_close(bias.grad, grads[2], tol, "dbias")


def device_memsets(prof) -> list:
    """The memsets a torch.profiler run saw executing on the GPU. The runtime call that queued each one
    (`cudaMemsetAsync`, a CPU-side event) is left out, so each buffer filled counts once."""
    return [e for e in prof.events()
            if "memset" in e.name.lower() and e.device_type == torch.autograd.DeviceType.CUDA]
