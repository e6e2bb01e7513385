"""Triton kernels: the "triton" backend. Each module holds one op family's kernels, their launchers,
and `@register(kernel_name, "triton")` implementations; `aimv2_kernels.backend` imports every module
here on first use, so adding a module is all it takes to plug a kernel in."""
