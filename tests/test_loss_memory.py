"""No (tokens x vocab) tensor, ever: every tensor that any op allocates during forward and backward of
the AIMv2 loss is recorded, and none may hold tokens * vocab elements or more."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import aimv2_kernels as ak
from aimv2_kernels import reference as ref
from aimv2_kernels.ops import linear_ce_chunks
from tests.helpers import TOLERANCE, assert_close


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor (in elements) produced by any op run under the mode."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), func
        return out


def _loss_step(tokens, vocab, D):
    """Forward and backward of aimv2_loss under the recorder; returns (recorder, text loss, inputs)."""
    B, N, P = 2, 9, 48
    pixel_out = torch.randn(B, N + 1, P, requires_grad=True)
    patches = torch.randn(B, N + 1, P)
    mask = torch.rand(B, N) > 0.3
    hidden = torch.randn(tokens, D, requires_grad=True)
    weight = torch.randn(vocab, D, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::5] = -100
    with LargestAllocation() as recorder:
        out = ak.aimv2_loss(pixel_out[:, :-1], patches[:, 1:], mask, hidden, weight, labels)
        out.total.backward()
    assert hidden.grad is not None and weight.grad is not None and pixel_out.grad is not None
    return recorder, out.text, (hidden, weight, labels)


def test_torch_backend_default_chunks_never_hold_tokens_x_vocab():
    """At the default logits budget with tokens * vocab above it (the CPU and fallback path)."""
    tokens, vocab, D = 2304, 16384, 8
    assert tokens * vocab > linear_ce_chunks.CHUNK_ELEMENTS
    with ak.use_backend("torch"):
        recorder, _, _ = _loss_step(tokens, vocab, D)
    chunk = linear_ce_chunks.chunk_tokens(tokens, vocab)
    assert recorder.numel < tokens * vocab, f"{recorder.op} made a tensor of {recorder.numel} elements"
    assert recorder.numel <= max(chunk, D) * vocab


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_small_budget_never_holds_tokens_x_vocab(monkeypatch, backend):
    """A small budget (15 tokens per chunk) at interpreter-friendly sizes, both backends, and the loss
    still matches the reference."""
    monkeypatch.setattr(linear_ce_chunks, "CHUNK_ELEMENTS", 1 << 16)
    tokens, vocab, D = 300, 4099, 16
    with ak.use_backend(backend):
        recorder, text, (hidden, weight, labels) = _loss_step(tokens, vocab, D)
    assert recorder.numel < tokens * vocab, f"{recorder.op} made a tensor of {recorder.numel} elements"
    # the largest is a chunk of logits, or the weight gradient
    assert recorder.numel <= max(linear_ce_chunks.chunk_tokens(tokens, vocab), D) * vocab
    expected = ref.linear_cross_entropy(hidden.detach().double(), weight.detach().double(), labels)
    assert_close(text, expected, TOLERANCE[torch.float32], "text loss")
