"""Our kernels in other people's models, in place: module swaps and patch helpers.

    from aimv2_kernels.integrations import patch_transformers_aimv2, patch_timm_aimv2, swap_modules
    swaps = patch_transformers_aimv2(hf_model)   # [Swap(name, before, after), ...]
    swaps = swap_modules(any_model)              # torch.nn.RMSNorm and documented SwiGLU patterns

A patched module keeps its object, weights, state-dict keys and hooks; only its class changes to a
subclass whose forward calls aimv2_kernels ops. transformers and timm are imported only when their
helper is called. See docs/integrations.md.
"""
from .fused import NothingPatchedError, Swap
from .swap import swap_modules
from .timm_aimv2 import patch_timm_aimv2
from .transformers_aimv2 import patch_transformers_aimv2

__all__ = ["NothingPatchedError", "Swap", "patch_timm_aimv2", "patch_transformers_aimv2", "swap_modules"]
