"""Per-kernel table of compiled CUDA objects: registers, stack, spills, shared memory and the matrix
instructions in the SASS, per target architecture; with the checks the attention kernels must pass.

    python scripts/cuda_kernel_table.py build/attention_sm80.o build/attention_sm90.o ...

For every kernel in every cubin of the given objects (from `cuobjdump -res-usage` and `-sass`):
arch, registers, stack bytes, local memory bytes (spills), static shared memory, and the number of
HMMA (mma.sync, Ampere-style) and HGMMA (wgmma, Hopper) instructions. Fails (exit 1) when an
attention kernel (its name contains "attention") uses local memory, when an sm_90a attention kernel
named for the Hopper path ("sm90") has no HGMMA, or when an "sm80" attention kernel compiled for
sm_80 has no HMMA. cuobjdump is the toolkit's ($CUDA_HOME/bin) or the one Triton ships.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Kernel:
    arch: str
    mangled: str
    name: str = ""
    registers: int = 0
    stack: int = 0
    local: int = 0
    shared: int = 0
    counts: dict = field(default_factory=lambda: {"HMMA": 0, "HGMMA": 0})


def cuobjdump() -> str:
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    candidates += [Path(found)] if found else []
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate)
    raise SystemExit("cuda_kernel_table: no cuobjdump (CUDA_HOME/bin, triton's bundled one, or PATH)")


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names (c++filt when present), shortened to the function's own name."""
    tool = shutil.which("c++filt") or shutil.which("llvm-cxxfilt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return {mangled: _function_name(readable) for mangled, readable in zip(names, out)}


def _function_name(readable: str) -> str:
    """'void ns::(anonymous namespace)::kern<T, 64>(args)' -> 'ns::kern<T, 64>', at most 90 chars."""
    text = readable.replace("(anonymous namespace)::", "").removeprefix("void ")
    depth = 0
    for i, char in enumerate(text):
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            text = text[:i]
            break
    return text if len(text) <= 90 else text[:87] + "..."


def parse(obj: str, tool: str) -> list[Kernel]:
    kernels: dict[tuple[str, str], Kernel] = {}
    usage = subprocess.run([tool, "-res-usage", obj], capture_output=True, text=True, check=True).stdout
    arch = "?"
    current = None
    for line in usage.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            current = kernels.setdefault((arch, m.group(1)), Kernel(arch, m.group(1)))
        elif current is not None and "REG:" in line:
            fields = dict(re.findall(r"(\w+):(\d+)", line))
            current.registers, current.stack = int(fields.get("REG", 0)), int(fields.get("STACK", 0))
            current.shared, current.local = int(fields.get("SHARED", 0)), int(fields.get("LOCAL", 0))
            current = None
    sass = subprocess.run([tool, "-sass", obj], capture_output=True, text=True, check=True).stdout
    arch, current = "?", None
    for line in sass.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            current = kernels.setdefault((arch, m.group(1)), Kernel(arch, m.group(1)))
        elif current is not None:
            for op in ("HGMMA", "HMMA"):
                if re.search(rf"\b{op}\.", line):
                    current.counts[op] += 1
    return list(kernels.values())


def problems(kernel: Kernel) -> list[str]:
    name = kernel.name.lower()
    if "attention" not in name:
        return []
    found = []
    if kernel.local or kernel.stack:
        found.append(f"{kernel.local} bytes of local memory / {kernel.stack} of stack (spills)")
    if "sm90" in name and kernel.arch == "sm_90a" and not kernel.counts["HGMMA"]:
        found.append("no HGMMA (wgmma) in an sm_90a attention kernel")
    if "sm80" in name and kernel.arch == "sm_80" and not kernel.counts["HMMA"]:
        found.append("no HMMA (mma.sync) in an sm_80 attention kernel")
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    tool = cuobjdump()
    kernels = [k for obj in argv for k in parse(obj, tool)]
    names = demangle(sorted({k.mangled for k in kernels}))
    for k in kernels:
        k.name = names[k.mangled]
    header = f"{'arch':7} {'regs':>4} {'stack':>5} {'spill':>5} {'smem':>6} {'HMMA':>5} {'HGMMA':>5}  kernel"
    print(header)
    print("-" * len(header))
    failures = []
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        print(f"{k.arch:7} {k.registers:>4} {k.stack:>5} {k.local:>5} {k.shared:>6} {k.counts['HMMA']:>5} "
              f"{k.counts['HGMMA']:>5}  {k.name}")
        failures += [f"{k.arch} {k.name}: {p}" for p in problems(k)]
    for failure in failures:
        print(f"cuda_kernel_table: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
