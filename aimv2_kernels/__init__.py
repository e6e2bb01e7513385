"""aimv2-kernels: fused ops for AIMv2-style pre-training.

    import aimv2_kernels as ak
    y = ak.rms_norm(x, weight)
    o = ak.prefix_causal_attention(q, k, v, prefix_len)
    o = ak.prefix_causal_attention_qkvpacked(qkv, prefix_len)  # (B, S, 3, H, D) in, (B, S, H, D) out
    o = ak.prefix_causal_attention_varlen(q, k, v, cu_seqlens, max_seqlen, prefix_len)  # packed
    o = ak.prefix_causal_attention_varlen_qkvpacked(qkv, cu_seqlens, max_seqlen, prefix_len)  # (T, 3, H, D) in

Every op is a `torch.library` custom op (namespace `aimv2_kernels`) with a pure-PyTorch reference in
`aimv2_kernels.reference`; `set_backend` / `use_backend` pick the implementation.
"""
# The backends first: each registers (torch) or declares (triton, cuda) itself in the registry.
from . import cuda_backend, torch_backend, triton_backend  # noqa: F401
from . import nn, reference
from .backend import available_backends, get_backend, set_backend, unavailable_reason, use_backend
from .ops.attention import prefix_causal_attention
from .ops.attention_qkvpacked import prefix_causal_attention_qkvpacked
from .ops.attention_varlen import prefix_causal_attention_varlen
from .ops.attention_varlen_qkvpacked import prefix_causal_attention_varlen_qkvpacked
from .ops.loss import AIMv2Loss, aimv2_loss, linear_cross_entropy, patch_mse_loss
from .ops.norm import rms_norm, rms_norm_residual
from .ops.swiglu import swiglu, swiglu_packed
from .integrations import swap_modules  # also binds aimv2_kernels.integrations

__version__ = "0.1.0"

__all__ = [
    "AIMv2Loss",
    "aimv2_loss",
    "available_backends",
    "get_backend",
    "linear_cross_entropy",
    "nn",
    "patch_mse_loss",
    "prefix_causal_attention",
    "prefix_causal_attention_qkvpacked",
    "prefix_causal_attention_varlen",
    "prefix_causal_attention_varlen_qkvpacked",
    "reference",
    "rms_norm",
    "rms_norm_residual",
    "set_backend",
    "swiglu",
    "swiglu_packed",
    "unavailable_reason",
    "use_backend",
]
