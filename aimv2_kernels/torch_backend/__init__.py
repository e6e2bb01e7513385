"""The "torch" backend: every kernel in PyTorch, registered as each module is imported. Always
present: it is the CPU path, the fallback of the other backends for inputs their kernels cannot take,
and (in float64) the checking path."""
from . import attention, attention_varlen, loss, norm, swiglu  # noqa: F401  (each registers its kernels)
