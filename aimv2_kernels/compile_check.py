"""Ahead-of-time compile check: every Triton kernel, compiled for real GPUs on a machine without one.

    python -m aimv2_kernels.compile_check [--arch 80,90] [--only SUBSTRING]

The interpreter accepts code that the GPU compiler rejects, so each kernel is also compiled for sm_80
and sm_90 at the configs its launcher picks for real AIMv2 sizes. For each (kernel config, arch) this
prints registers, local memory (spills), shared memory, the matrix instructions found in the SASS
(HMMA on sm_80, HGMMA = wgmma on sm_90) and, per dot, the tensor-core layout Triton chose (read from
the TTGIR). It exits non-zero on a compile error, on local memory use in a config marked hot, or on a
hot config whose dot layout covers more rows or columns than its tile (duplicated tensor-core work).

"HGMMA in the SASS" says nothing about how well the tensor cores are used: on sm_90 a chained dot (the
result of one feeding the next, as in attention) gets its warps along rows only, so 8 warps on a
64-row tile give `warpsPerCTA = [8, 1]`, 128 rows of instructions for 64 rows of data: the second
warpgroup recomputes what the first computes (sm_80's mma.sync can do the same along columns). The
layout says so before any GPU run does.

Kernel modules in `aimv2_kernels/triton_backend/` take part by defining

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
from typing import Callable

from .triton_backend.kernel_config import KernelConfig


# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100
# (sm_80) 163 KiB, H100/H200 (sm_90) 227 KiB. Every compiled entry must fit: a launch over it fails.
SHARED_BYTES_PER_BLOCK = {80: 166912, 90: 232448}


@dataclasses.dataclass(frozen=True)
class DotLayout:
    """One dot of a compiled kernel: its result tile and the tensor-core layout computing it.

    `warps` is the layout's warpsPerCTA (warps along rows, along columns) and `instr` its instrShape:
    per warp 16 rows by instr[1] columns (mma.sync on sm_80: [16, 8]; wgmma on sm_90: [16, N, K],
    four warps of 16 rows making one m64nNkK instruction). Version 0, no warps: a dot without tensor
    cores (FMA), which cannot duplicate tensor-core work."""

    rows: int
    cols: int
    version: int = 0  # 2: mma.sync (sm_80 style), 3: wgmma (sm_90); 0: no tensor cores (FMA)
    warps: tuple[int, ...] = ()
    instr: tuple[int, ...] = ()

    @property
    def duplicated(self) -> bool:
        """The layout spans more rows or columns than the tile: some warps compute what others do."""
        if not self.version:
            return False
        return self.warps[0] * 16 > self.rows or self.warps[1] * self.instr[1] > self.cols

    def describe(self) -> str:
        """e.g. "64x128 wgmma m64n64k16 w4x2", "128x64 mma m16n8 w8x1 DUP"."""
        if not self.version:
            return f"{self.rows}x{self.cols} fma"
        if self.version >= 3:
            instr = f"wgmma m64n{self.instr[1]}k{self.instr[2]}" if len(self.instr) > 2 else f"wgmma m64n{self.instr[1]}"
        else:
            instr = f"mma m{self.instr[0]}n{self.instr[1]}"
        warps = "x".join(str(w) for w in self.warps)
        return f"{self.rows}x{self.cols} {instr} w{warps}" + (" DUP" if self.duplicated else "")


# A layout definition, "#mma1 = #ttg.nvidia_mma<{versionMajor = 3, ..., warpsPerCTA = [4, 2],
# instrShape = [16, 64, 16]}>" (triton 3.6 to 3.9; older releases spelled the dialect triton_gpu).
_MMA_DEF = re.compile(r"^(#[\w.]+)\s*=\s*#[\w.]*nvidia_mma<\{(.*?)\}>", re.MULTILINE)
# A dot: "tt.dot" (mma.sync or FMA) or "ttng.warp_group_dot" (wgmma; not its "_wait"), whose result
# type ends the line: "-> tensor<64x128xf32, #mma1>" (or the layout written out in place).
_DOT = re.compile(r"= (?:tt\.dot|[\w.]*warp_group_dot) .*-> tensor<(\d+)x(\d+)x\w+, (#[^>]*>?)>")


def _ints(text: str, key: str) -> tuple[int, ...]:
    match = re.search(rf"{key}\s*=\s*\[([\d,\s]*)\]", text)
    return tuple(int(x) for x in match.group(1).split(",") if x.strip()) if match else ()


def _mma_layout(body: str) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    version = re.search(r"versionMajor\s*=\s*(\d+)", body)
    return int(version.group(1)) if version else 0, _ints(body, "warpsPerCTA"), _ints(body, "instrShape")


def dot_layouts(ttgir: str) -> list[DotLayout]:
    """The distinct dot layouts of a kernel's TTGIR, in order of appearance (a dot in a pipelined or
    repeated loop shows up several times but is listed once)."""
    defs = {name: _mma_layout(body) for name, body in _MMA_DEF.findall(ttgir)}
    found: list[DotLayout] = []
    for line in ttgir.splitlines():
        match = _DOT.search(line)
        if match is None:
            continue
        rows, cols, layout = int(match.group(1)), int(match.group(2)), match.group(3)
        if "nvidia_mma<" in layout:  # written out in place rather than as an alias
            version, warps, instr = _mma_layout(layout)
        else:
            version, warps, instr = defs.get(layout.rstrip(">"), (0, (), ()))
        dot = DotLayout(rows, cols, version, warps, instr) if version else DotLayout(rows, cols)
        if dot not in found:
            found.append(dot)
    return found


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
    dots: list[DotLayout] = dataclasses.field(default_factory=list)

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0

    @property
    def over_shared_limit(self) -> bool:
        """More shared memory than one block may use on this arch: the launch would fail."""
        return self.shared_bytes > SHARED_BYTES_PER_BLOCK.get(self.arch, 1 << 62)

    @property
    def duplicated(self) -> bool:
        """Some dot's layout covers more rows or columns than its tile (see DotLayout)."""
        return any(dot.duplicated for dot in self.dots)

    @property
    def failed(self) -> bool:
        return bool(self.error) or (self.hot and (self.spills or self.duplicated)) or self.over_shared_limit

    @property
    def status(self) -> str:
        if self.error:
            return "ERROR " + self.error
        problems = [name for name, bad in (("SHARED>LIMIT", self.over_shared_limit), ("SPILL", self.spills),
                                           ("DUPLICATED", self.duplicated)) if bad]
        return " ".join(problems) or "ok"


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
            # a kernel compiled in debug mode (device asserts) is checked as it will run
            options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                     "debug": bool(getattr(config.kernel, "debug", False))},
        )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = _resource_usage(cubin.name)
            result.mma = _matrix_instructions(cubin.name)
        result.dots = dot_layouts(compiled.asm["ttgir"])
        result.registers, result.stack_bytes = usage["REG"], usage["STACK"]
        result.local_bytes = usage["LOCAL"]
        result.shared_bytes = max(usage["SHARED"], int(getattr(compiled.metadata, "shared", 0)))
    except Exception as exc:  # any compiler failure is a reported row, not a crash of the tool
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:200]
    return result


def collect_configs(package: str = "aimv2_kernels.triton_backend") -> list[KernelConfig]:
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
    header = "| kernel config | arch | regs | local B | stack B | shared B | mma | dots (tile, instruction, warps) | hot | status |"
    lines = [header, "|" + "---|" * 10]
    for r in results:
        dots = "; ".join(d.describe() for d in r.dots) or "-"
        lines.append(
            f"| {r.label} | sm_{r.arch} | {r.registers} | {r.local_bytes} | {r.stack_bytes} | {r.shared_bytes} "
            f"| {r.mma or '-'} | {dots} | {'yes' if r.hot else 'no'} | {r.status} |"
        )
    return "\n".join(lines)


def run(configs: list[KernelConfig], arches: list[int]) -> list[CompileResult]:
    return [compile_one(config, arch) for config in configs for arch in arches
            if config.arches is None or arch in config.arches]


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
