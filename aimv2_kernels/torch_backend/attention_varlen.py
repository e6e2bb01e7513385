"""The "torch" backend's prefix-causal attention over packed variable-length sequences."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import register
from .attention import _attention_bwd_torch, _attention_fwd_torch


# The sequences as one zero-padded batch: the padded op's math on (n, H, L, D), L the longest sequence, instead of a loop over sequences
# (a loop of small matmuls is 10x slower on a CPU for a batch of ~100 images). Exact, not an
# approximation: padded keys sit after every real key, so a causal rule whose prefix stops at the
# sequence's end (min(prefix, length)) never shows them to a real query; bidirectional attention
# inside a sequence is the same rule with prefix = length. Padded queries are zeros with zero
# output gradient, so they add exactly nothing to dk and dv.

def _token_places(cu_seqlens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(sequence (T,), position in it (T,), lengths (n,)) as int64, from cu_seqlens (n + 1,)."""
    bounds = cu_seqlens.long()
    lengths = bounds.diff()
    sequence = torch.repeat_interleave(torch.arange(lengths.numel(), device=bounds.device), lengths)
    return sequence, torch.arange(sequence.numel(), device=bounds.device) - bounds[sequence], lengths


def _to_padded(t: Tensor, sequence: Tensor, position: Tensor, n: int, longest: int) -> Tensor:
    """(T, H, ...) -> (n, H, L, ...) zero-padded, sequence s in batch row s."""
    padded = t.new_zeros(n, longest, *t.shape[1:])
    padded[sequence, position] = t
    return padded.transpose(1, 2)


def _from_padded(t: Tensor, sequence: Tensor, position: Tensor) -> Tensor:
    """(n, H, L, ...) -> (T, H, ...): the real tokens back in packed order."""
    return t.transpose(1, 2)[sequence, position]


def _padded_prefix(prefix_len: Optional[Tensor], lengths: Tensor, causal: bool) -> Optional[Tensor]:
    if not causal:
        return lengths
    return None if prefix_len is None else torch.minimum(prefix_len.long(), lengths)


@register("attention_varlen_fwd", "torch")
def _attention_varlen_fwd_torch(q, k, v, cu_seqlens, max_seqlen, prefix_len, causal, scale):
    sequence, position, lengths = _token_places(cu_seqlens)
    n, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    qp, kp, vp = (_to_padded(t, sequence, position, n, longest) for t in (q, k, v))  # (n, H, L, D)
    out, lse = _attention_fwd_torch(qp, kp, vp, _padded_prefix(prefix_len, lengths, causal), True, scale)
    lse = _from_padded(lse.unsqueeze(-1), sequence, position).squeeze(-1).transpose(0, 1)  # (H, T)
    return _from_padded(out, sequence, position).contiguous(), lse.contiguous()


@register("attention_varlen_bwd", "torch")
def _attention_varlen_bwd_torch(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, prefix_len, causal, scale, grads=None):
    """-> (dq, dk, dv) (T, H, D): written into `grads` when given (the views of one packed (T, 3, H, D)
    buffer), else new contiguous tensors."""
    sequence, position, lengths = _token_places(cu_seqlens)
    n, longest = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    padded = [_to_padded(t, sequence, position, n, longest) for t in (dout, q, k, v, out)]  # (n, H, L, D)
    lse_padded = _to_padded(lse.transpose(0, 1).unsqueeze(-1), sequence, position, n, longest).squeeze(-1)  # (n, H, L)
    padded_grads = _attention_bwd_torch(*padded, lse_padded, _padded_prefix(prefix_len, lengths, causal), True, scale)
    packed = (_from_padded(g, sequence, position) for g in padded_grads)  # (T, H, D) each
    if grads is None:
        return tuple(g.contiguous() for g in packed)
    return tuple(buf.copy_(g) for buf, g in zip(grads, packed))
