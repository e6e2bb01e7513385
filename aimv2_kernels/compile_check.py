"""Ahead-of-time compile check: every Triton kernel, compiled for real GPUs on a machine without one.

    python -m aimv2_kernels.compile_check [--arch 80,90] [--only SUBSTRING]

The interpreter accepts code that the GPU compiler rejects, so each kernel is also compiled for sm_80
and sm_90 at the configs its launcher picks for real AIMv2 sizes. For each (kernel config, arch) this
prints registers, local memory (spills), shared memory and the matrix instructions found in the SASS
(HMMA on sm_80, HGMMA = wgmma on sm_90). It exits non-zero on a compile error, or on local memory use
in a config marked hot.

Kernel modules in `aimv2_kernels/triton_kernels/` take part by defining

    def compile_configs() -> list[KernelConfig]: ...

built from the same config choice their launcher makes (so the check follows the launcher).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from typing import Any, Callable


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

    def attrs(self) -> dict:
        names = self.divisible_by_16
        if names is None:
            names = tuple(n for n, t in self.signature.items() if t.startswith("*"))
        arg_names = self.kernel.arg_names
        return {(arg_names.index(n),): [["tt.divisibility", 16]] for n in names}


# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100
# (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB. Every compiled entry must fit: a launch over it fails.
SHARED_BYTES_PER_BLOCK = {80: 166912, 90: 232448}


@dataclasses.dataclass
class CompileResult:
    label: str
    arch: int
    registers: int = -1
    local_bytes: int = -1  # per-thread local memory: spills and local arrays
    stack_bytes: int = -1
    shared_bytes: int = -1
    mma: str = ""  # "HGMMA", "HMMA", "" (none)
    error: str = ""
    hot: bool = True

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def over_shared_limit(self) -> bool:
        """More shared memory than one block may use on this arch: the launch would fail."""
        return self.shared_bytes > SHARED_BYTES_PER_BLOCK.get(self.arch, 1 << 62)

    @property
    def failed(self) -> bool:
        return bool(self.error) or (self.hot and self.spills) or self.over_shared_limit


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin_path: str) -> dict[str, int]:
    text = subprocess.run([_cuobjdump(), "-res-usage", cubin_path], capture_output=True, text=True, check=True).stdout
    fields = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        match = re.search(rf"\b{key}:(\d+)", text)
        fields[key] = int(match.group(1)) if match else -1
    return fields


def _matrix_instructions(cubin_path: str) -> str:
    sass = subprocess.run([_cuobjdump(), "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    found = [name for name in ("HGMMA", "HMMA") if re.search(rf"\b{name}\b", sass)]
    return "+".join(found)


def compile_one(config: KernelConfig, arch: int) -> CompileResult:
    """Compile `config` for sm_`arch` and read its resource usage from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = CompileResult(config.label, arch, hot=config.hot)
    try:
        source = ASTSource(fn=config.kernel, signature=config.signature, constexprs=config.constexprs, attrs=config.attrs())
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = _resource_usage(cubin.name)
            result.mma = _matrix_instructions(cubin.name)
        result.registers, result.stack_bytes = usage["REG"], usage["STACK"]
        result.local_bytes = usage["LOCAL"]
        result.shared_bytes = max(usage["SHARED"], int(getattr(compiled.metadata, "shared", 0)))
    except Exception as exc:  # any compiler failure is a reported row, not a crash of the tool
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:200]
    return result


def collect_configs(package: str = "aimv2_kernels.triton_kernels") -> list[KernelConfig]:
    """The compile configs of every kernel module in `package` (modules without one are skipped)."""
    pkg = importlib.import_module(package)
    configs: list[KernelConfig] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package}.{info.name}")
        provider: Callable[[], list[KernelConfig]] | None = getattr(module, "compile_configs", None)
        if provider is not None:
            configs.extend(provider())
    return configs


def format_table(results: list[CompileResult]) -> str:
    header = "| kernel config | arch | regs | local B | stack B | shared B | mma | hot | status |"
    lines = [header, "|" + "---|" * 9]
    for r in results:
        status = "ERROR " + r.error if r.error else (
            "SHARED>LIMIT" if r.over_shared_limit else ("SPILL" if r.spills else "ok"))
        lines.append(
            f"| {r.label} | sm_{r.arch} | {r.registers} | {r.local_bytes} | {r.stack_bytes} | {r.shared_bytes} "
            f"| {r.mma or '-'} | {'yes' if r.hot else 'no'} | {status} |"
        )
    return "\n".join(lines)


def run(configs: list[KernelConfig], arches: list[int]) -> list[CompileResult]:
    return [compile_one(config, arch) for config in configs for arch in arches]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90", help="comma-separated SM versions (default 80,90)")
    parser.add_argument("--only", default="", help="check only configs whose label contains this")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_check compiles for real GPUs: run it without TRITON_INTERPRET=1")
    arches = [int(a) for a in args.arch.split(",") if a.strip()]
    configs = [c for c in collect_configs() if args.only in c.label]
    if not configs:
        print("compile_check: no kernel configs registered")
        return 0
    results = run(configs, arches)
    print(format_table(results))
    failed = [r for r in results if r.failed]
    print(f"\ncompile_check: {len(results)} compiled, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
