"""One Triton kernel at one launch configuration: what a kernel module lists in `compile_configs()`
for the ahead-of-time compile check (aimv2_kernels/compile_check.py)."""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class KernelConfig:
    """One kernel at one launch configuration."""

    label: str  # e.g. "rms_norm_fwd D=1024 bf16"
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]  # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 3
    hot: bool = True  # a spill here fails the check
    # Arguments a real launch sees as multiples of 16 (Triton specializes on this, which enables
    # 128-bit accesses and changes register use). None: every pointer argument, as torch allocations
    # are 16-byte aligned; name integer strides/sizes here too when the launcher's real sizes are.
    divisible_by_16: tuple[str, ...] | None = None
    # SM versions this entry is for (a launcher whose configs differ per architecture registers one
    # entry per arch); None: every arch checked.
    arches: tuple[int, ...] | None = None

    def attrs(self) -> dict:
        names = self.divisible_by_16
        if names is None:
            names = tuple(n for n, t in self.signature.items() if t.startswith("*"))
        arg_names = self.kernel.arg_names
        return {(arg_names.index(n),): [["tt.divisibility", 16]] for n in names}
