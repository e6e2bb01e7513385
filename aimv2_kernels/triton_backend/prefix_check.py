"""The prefix lengths' value check (every prefix_len >= 0) in one tiny launch.

The attention ops check their prefix lengths on every call without waiting for the GPU: PyTorch's
way (`torch._assert_async((prefix_len >= 0).all())`, the "torch" backend's) is three launches, a
compare, a reduction and the assert. Here one program reads the lengths and fails a device assert
on a negative one, with the same message; like `_assert_async` the error surfaces at the next
synchronization, as "device-side assert triggered", and the message is printed to stderr.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import register
from ..validation import check_prefix_values
from .common import device_context, next_power_of_2
from .kernel_config import KernelConfig

MAX_BLOCK = 1024  # lengths read per loop step; a batch is rarely larger


# debug=True: Triton compiles device asserts only in debug mode; this kernel is the only one in it.
@triton.jit(debug=True)
def prefix_check_kernel(PREFIX, n, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        rows = start + offs
        prefix = tl.load(PREFIX + rows * stride, mask=rows < n, other=0)
        tl.device_assert(prefix >= 0, "prefix_len must be >= 0")


@register("prefix_check", "triton")
def _prefix_check_triton(prefix_len: torch.Tensor) -> None:
    n = prefix_len.numel()
    if not prefix_len.is_cuda or n == 0:
        check_prefix_values(prefix_len)  # on the CPU: raised on the host at once
        return
    with device_context(prefix_len):
        prefix_check_kernel[(1,)](prefix_len, n, prefix_len.stride(0), BLOCK=min(MAX_BLOCK, next_power_of_2(n)))


def compile_configs() -> list[KernelConfig]:
    sig = {"PREFIX": "*i32", "n": "i32", "stride": "i32", "BLOCK": "constexpr"}
    return [KernelConfig("prefix_check", prefix_check_kernel, sig, {"BLOCK": 256}, num_warps=4, num_stages=1,
                         divisible_by_16=("PREFIX",))]
