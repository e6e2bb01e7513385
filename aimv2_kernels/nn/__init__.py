"""Drop-in modules built on the functional ops: one module per file."""
from .attention import PrefixCausalSelfAttention
from .norm import RMSNorm
from .swiglu import SwiGLU

__all__ = ["PrefixCausalSelfAttention", "RMSNorm", "SwiGLU"]
