"""Linear cross-entropy over token chunks: the driver every backend shares.

Loss and gradients of CE(hidden @ weight.T + bias, labels) are computed one chunk of tokens at a time,
so the largest temporary is a (chunk, V) block of logits, never (tokens, V). Per chunk:

    logits  = h_c @ W.T                   GEMM, float32 result          (c, V)
    rows(...)                             per token: online log-sum-exp over vocab tiles, loss, and
                                          dlogits = softmax - onehot   (c, V), not yet / n_counted
    dh_c    = dlogits @ W                 GEMM into the chunk's rows of dhidden
    dW      = / += dlogits.T @ h_c        GEMM: the first chunk writes the float32 accumulator (out=),
                                          later ones add to it
    db      = / += column sums of dlogits float32

`rows` is the backend's part (PyTorch ops here, a Triton kernel in triton_backend/); the GEMMs go to
cuBLAS, which already runs them near peak. Gradients are produced in the forward pass, as fused
linear-CE kernels do: the logits are computed once (3 GEMMs) instead of once more in the backward (4
GEMMs), and the backward only scales the stored gradients, in place, by dloss / n_counted. That factor
is applied there and nowhere earlier so that fp16 under a GradScaler keeps its gradients: softmax -
onehot and its products are in fp16's range; divided by thousands of tokens first, they were not.

GEMM precision: fp16/bf16 operands multiply into float32 results where torch can (torch.mm/addmm with
out_dtype, CUDA, torch >= 2.8; checked once per device), so logits are never rounded to 16 bits and
the weight gradient is summed in float32 inside the GEMM. Elsewhere (the CPU, older torch) the operands
are upcast to float32 instead: same results, slower.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

# Logit values held per chunk (float32: 256 MiB): the memory bound, whatever the number of tokens. At
# V = 32000 that is 2048 tokens, so the d-hidden GEMM of a chunk (tokens x D output, K = V) has enough
# output tiles to fill the card without split-K (1024 tokens gave 64 tiles of 128 x 128 at D = 1024).
CHUNK_ELEMENTS = 1 << 26

# rows(logits, bias, labels, ignore_index, scale, loss_out, dlogits_out): see ce_rows_torch.
RowsFn = Callable[[Tensor, Optional[Tensor], Tensor, int, Tensor, Tensor, Optional[Tensor]], None]


def chunk_tokens(tokens: int, vocab: int) -> int:
    """Tokens per chunk: as many as CHUNK_ELEMENTS logits allow, a multiple of 128 when that large
    (GEMM tile friendly), at least 1 and at most all of them."""
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if chunk >= 128:
        chunk -= chunk % 128
    return max(1, min(tokens, chunk))


@functools.cache
def fp32_output_gemms(device: torch.device) -> bool:
    """Whether torch here multiplies fp16/bf16 matrices into float32 outputs (mm into a given out and
    in-place addmm, with out_dtype), probed once per device with products whose answers are exact."""
    if device.type != "cuda":
        return False
    try:
        a = torch.ones(2, 3, dtype=torch.bfloat16, device=device)
        acc = torch.full((2, 2), 0.5, device=device)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        out = torch.empty(2, 2, device=device)
        torch.mm(a, a.t(), out_dtype=torch.float32, out=out)
        return bool((acc == 3.5).all()) and bool((out == 3.0).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def stored_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the driver returns d weight (and the custom op saves it) in for a weight of `dtype`:
    its own, except fp16, whose summed gradient stays float32 until the backward has applied
    dloss / n_counted (a sum over tokens can pass fp16's 65504, a mean can sink below 6e-5)."""
    return torch.float32 if dtype == torch.float16 else dtype


class _ChunkGemms:
    """The chunk GEMMs of one call, with float32 (or float64) results for the logits and dW."""

    def __init__(self, weight: Tensor, cdt: torch.dtype):
        self.weight = weight  # (V, D)
        self.cdt = cdt
        self.native = weight.dtype == cdt or fp32_output_gemms(weight.device)
        # Upcast fallback: one float32 copy of the weight for the call (V x D, not tokens x V).
        self.weight_up = None if self.native else weight.to(cdt)

    def logits(self, h: Tensor) -> Tensor:
        """(c, D) -> (c, V) in the compute dtype."""
        if self.weight.dtype == self.cdt:
            return h @ self.weight.t()
        if self.native:
            return torch.mm(h, self.weight.t(), out_dtype=self.cdt)
        return h.to(self.cdt) @ self.weight_up.t()

    def dweight(self, acc: Tensor, dlogits: Tensor, h: Tensor, first: bool) -> None:
        """acc (V, D) in the compute dtype = (first chunk) or += (later ones) dlogits.T @ h. The first
        chunk writes acc with mm(out=): the accumulator is never zero-filled."""
        if self.weight.dtype == self.cdt:
            torch.mm(dlogits.t(), h, out=acc) if first else acc.addmm_(dlogits.t(), h)
        elif self.native:
            if first:
                torch.mm(dlogits.t(), h, out_dtype=self.cdt, out=acc)
            else:
                torch.addmm(acc, dlogits.t(), h, out_dtype=self.cdt, out=acc)
        else:
            a, b = dlogits.t().to(self.cdt), h.to(self.cdt)
            torch.mm(a, b, out=acc) if first else acc.addmm_(a, b)


def linear_ce_chunked(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], ignore_index: int,
                      grad_hidden: bool, grad_params: bool, rows: RowsFn) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mean loss, dhidden, dweight, dbias). The gradients are those of the SUMMED loss over counted
    tokens (d loss = n_counted): the caller's backward multiplies them by dloss / n_counted once. Kept
    unscaled, softmax - onehot is in [-1, 1] and fp16 holds it; scaled by 1/n_counted first, small
    entries flushed to zero in fp16 before a GradScaler's factor could lift them.

    A gradient not asked for (grad_hidden; grad_params covers weight and bias) is an empty tensor.
    Loss in float32 (float64 for float64). dhidden in hidden's dtype; dweight in
    stored_grad_dtype(weight.dtype) (float32 for a float32 weight: the accumulator itself, no copy);
    dbias in the compute dtype (float32 or float64), cast by the backward."""
    cdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    D, V = hidden.shape[-1], weight.shape[0]
    h = hidden.reshape(-1, D)  # (T, D)
    y = labels.reshape(-1)  # (T,)
    T = h.shape[0]
    # 1 / max(counted tokens, 1) as a device scalar, for the loss only: no host sync.
    inv_count = 1.0 / (y != ignore_index).sum().clamp_min(1).to(cdt)
    unit = torch.ones((), dtype=cdt, device=h.device)  # the rows' gradient scale: unscaled (see above)
    want_grad = grad_hidden or grad_params
    gemms = _ChunkGemms(weight, cdt)
    losses = torch.empty(T, dtype=cdt, device=h.device)  # per-token CE, 0 where ignored
    dh = torch.empty((T, D), dtype=hidden.dtype, device=h.device) if grad_hidden else h.new_empty(0)
    # Written whole by the first chunk (mm(out=), sum): no zero fill, unless there is no chunk at all.
    dw = torch.empty((V, D), dtype=cdt, device=h.device) if grad_params else None
    db = torch.empty(V, dtype=cdt, device=h.device) if grad_params and bias is not None else None
    step = chunk_tokens(T, V)
    for start in range(0, T, step):
        end = min(start + step, T)
        h_c = h[start:end]
        logits = gemms.logits(h_c)  # (c, V)
        dlogits = None
        if want_grad:  # written over the logits when the dtypes agree (rows() allows the alias)
            dlogits = logits if weight.dtype == cdt else torch.empty_like(logits, dtype=weight.dtype)
        rows(logits, bias, y[start:end], ignore_index, unit, losses[start:end], dlogits)
        if grad_hidden:
            torch.mm(dlogits, weight, out=dh[start:end])
        if dw is not None:
            gemms.dweight(dw, dlogits, h_c, first=start == 0)
        if db is not None:
            torch.sum(dlogits, 0, dtype=cdt, out=db) if start == 0 else db.add_(dlogits.sum(0, dtype=cdt))
        del logits, dlogits  # free the chunk before the next one is allocated
    if T == 0:
        for t in (dw, db):
            if t is not None:
                t.zero_()
    loss = losses.sum() * inv_count
    dweight = dw.to(stored_grad_dtype(weight.dtype)) if dw is not None else weight.new_empty(0)
    dbias = db if db is not None else weight.new_empty(0)
    return loss, dh.reshape(hidden.shape) if grad_hidden else dh, dweight, dbias


def ce_rows_torch(logits: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int, scale: Tensor,
                  loss_out: Tensor, dlogits_out: Optional[Tensor]) -> None:
    """The per-token part of one chunk, in PyTorch ops.

    logits (c, V) in the compute dtype, used as scratch (dlogits_out may be the same tensor); bias (V,)
    or None; labels (c,); scale: () the gradient's factor (the driver passes 1). Writes loss_out (c,) = per-token CE (0 where
    ignored) and, when given, dlogits_out (c, V) = (softmax - onehot) * scale on counted rows, 0 on
    ignored rows.
    """
    if bias is not None:
        logits += bias.to(logits.dtype)
    counted = labels != ignore_index
    safe = torch.where(counted, labels, 0).unsqueeze(1)  # (c, 1): any valid column for ignored rows
    lse = torch.logsumexp(logits, dim=1)  # (c,)
    loss_out.copy_(torch.where(counted, lse - logits.gather(1, safe).squeeze(1), 0.0))
    if dlogits_out is None:
        return
    weight = counted.to(logits.dtype) * scale  # (c,)
    probs = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place
    probs.scatter_add_(1, safe, -counted.to(logits.dtype).unsqueeze(1))
    probs.mul_(weight.unsqueeze(1))
    if dlogits_out.data_ptr() != probs.data_ptr():
        dlogits_out.copy_(probs)
