"""Pure-PyTorch references: the executable definition of every op.

Tests compare each kernel to these, and the "torch" backend runs them (with autograd supplying the
backward). Written for clarity, not speed: they materialize what the kernels avoid (dense masks,
normalized targets, full logits). Math is done in float32 (or float64 when given float64) and cast
back to the input dtype, which is what the kernels promise too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """y = x / sqrt(mean(x^2, last dim) + eps) * weight, in the dtype of x."""
    xf = x.to(_compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5):
    """(rms_norm(x + residual), x + residual): the pre-norm block's add-then-normalize.

    x is the update, residual the stream it is added to. The residual may be wider than x (a float32
    stream under bf16 autocast): the sum is computed in float32 (float64 for float64 inputs) and
    stored in the residual's dtype, the stored stream is what gets normalized, and y comes back in
    x's dtype. With one dtype this is plain `x + residual`.
    """
    stream = (x.to(_compute_dtype(residual)) + residual.to(_compute_dtype(residual))).to(residual.dtype)
    return rms_norm(stream, weight, eps).to(x.dtype), stream


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, computed in float32 and returned in the input dtype."""
    g = gate.to(_compute_dtype(gate))
    return (F.silu(g) * up.to(g.dtype)).to(gate.dtype)


def swiglu_packed(x: torch.Tensor) -> torch.Tensor:
    """x[..., :H] is the gate, x[..., H:] is up (one GEMM produces both halves)."""
    gate, up = x.chunk(2, dim=-1)
    return swiglu(gate, up)


def prefix_visibility(seq_len: int, prefix_len: torch.Tensor | None, causal: bool = True, device=None) -> torch.Tensor:
    """Boolean (B or 1, S, S) mask: entry [b, i, j] is True when query i may attend key j.

    Visible iff not causal, or j <= i, or j < prefix_len[b]. prefix 0 is plain causal; a prefix >= S
    makes every key visible.
    """
    i = torch.arange(seq_len, device=device).view(1, seq_len, 1)
    j = torch.arange(seq_len, device=device).view(1, 1, seq_len)
    if not causal:
        return torch.ones(1, seq_len, seq_len, dtype=torch.bool, device=device)
    visible = j <= i
    if prefix_len is not None:
        visible = visible | (j < prefix_len.view(-1, 1, 1).to(device))
    return visible


def prefix_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_len: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with the prefix-causal mask; q, k, v and output (B, H, S, D)."""
    return prefix_causal_attention_with_lse(q, k, v, prefix_len, causal, scale)[0]


def prefix_causal_attention_with_lse(q, k, v, prefix_len=None, causal=True, scale=None):
    """As `prefix_causal_attention`, also returning the row log-sum-exp (B, H, S) in float32/64."""
    B, H, S, D = q.shape
    scale = D**-0.5 if scale is None else scale
    cdt = _compute_dtype(q)
    scores = torch.einsum("bhid,bhjd->bhij", q.to(cdt), k.to(cdt)) * scale  # (B, H, S, S)
    visible = prefix_visibility(S, prefix_len, causal, device=q.device).unsqueeze(1)  # (B|1, 1, S, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, S); finite: key 0 is always visible
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.einsum("bhij,bhjd->bhid", probs, v.to(cdt))
    return out.to(q.dtype), lse


def prefix_causal_attention_varlen(q, k, v, cu_seqlens, prefix_len=None, causal=True, scale=None):
    """Prefix-causal attention over n packed sequences; q, k, v and output (T, H, D).

    Sequence s is tokens cu_seqlens[s] .. cu_seqlens[s + 1] - 1; inside it the padded op's rule holds
    with positions counted from the sequence start and prefix_len[s] (an int tensor (n,) or None);
    nothing is visible across sequences. Zero-length sequences contribute no tokens.
    """
    return prefix_causal_attention_varlen_with_lse(q, k, v, cu_seqlens, prefix_len, causal, scale)[0]


def prefix_causal_attention_varlen_with_lse(q, k, v, cu_seqlens, prefix_len=None, causal=True, scale=None):
    """As `prefix_causal_attention_varlen`, also returning the row log-sum-exp (H, T) in float32/64.

    One call of the padded reference per sequence (batch of 1, no padding), so the dense mask never
    spans two sequences. Reads cu_seqlens on the host: a reference, not a kernel.
    """
    T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        prefix = None if prefix_len is None else prefix_len[s : s + 1]  # (1,)
        q_s, k_s, v_s = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, L, D)
        out, lse = prefix_causal_attention_with_lse(q_s, k_s, v_s, prefix, causal, scale)
        outs.append(out[0].transpose(0, 1))  # (L, H, D)
        lses.append(lse[0])  # (H, L)
    if not outs:  # T == 0: every sequence is empty
        return q.new_zeros(0, H, D), q.new_zeros(H, 0, dtype=_compute_dtype(q))
    return torch.cat(outs, 0), torch.cat(lses, 1)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch norm-pix target: (t - mean(t)) / sqrt(var(t) + eps), unbiased variance, last dim."""
    t = target.to(_compute_dtype(target))
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)  # unbiased, as torch.var's default (and the AIMv2 code)
    return (t - mean) / torch.sqrt(var + eps)


def patch_mse_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    norm_pix: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Mean over counted patches of the per-patch mean squared error; a float32 (or 64) scalar.

    pred, target: (B, N, P); mask: bool (B, N), True = counted (None counts all). The mean is over
    counted patches of the whole batch (a token mean). No counted patch gives 0, not NaN. The target
    is treated as a constant: no gradient flows into it.
    """
    cdt = _compute_dtype(pred)
    t = normalize_patches(target.detach(), eps) if norm_pix else target.detach().to(cdt)
    per_patch = (pred.to(cdt) - t.to(cdt)).pow(2).mean(dim=-1)  # (B, N)
    if mask is None:
        return per_patch.mean() if per_patch.numel() else per_patch.sum()
    weights = mask.to(cdt)
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T (+ bias), in float32, over non-ignored labels.

    hidden (..., D), weight (V, D), labels (...). All labels ignored gives 0 (with zero gradients).
    """
    cdt = _compute_dtype(hidden)
    logits = hidden.reshape(-1, hidden.shape[-1]).to(cdt) @ weight.to(cdt).t()  # (T, V)
    if bias is not None:
        logits = logits + bias.to(cdt)
    flat = labels.reshape(-1)
    per_token = F.cross_entropy(logits, flat, ignore_index=ignore_index, reduction="none")  # (T,)
    counted = (flat != ignore_index).to(cdt)
    return (per_token * counted).sum() / counted.sum().clamp_min(1.0)
