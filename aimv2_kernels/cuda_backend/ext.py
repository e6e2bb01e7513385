"""Loading of the compiled csrc/ kernels behind the "cuda" backend.

Two ways to get them, the same sources and flags either way:
  * `pip install --no-build-isolation .` next to a CUDA build of torch and a CUDA toolkit builds the
    module `aimv2_kernels._C` (see setup.py);
  * otherwise the first use of the "cuda" backend compiles the sources with ninja into
    ~/.cache/aimv2_kernels/ (say so once, takes minutes) and later processes load that build;
    AIMV2_KERNELS_NO_JIT=1 turns this route off (the backend is then unavailable, with that reason).
Loading registers the ops `torch.ops.aimv2_kernels.cuda_*`; the package then imports `kernels` and
`attention`, which plug them into the backend registry. `load_status()` says why the backend is
unavailable when it is.

Importing this module needs only torch (the package is imported lazily), so setup.py and
scripts/check_cuda_sources.sh read the flags, the include directories and the source list from this
one place.

The attention kernels are written with CuTe, the layout and copy/MMA-atom library in CUTLASS's headers.
Those come from the `nvidia-cutlass` pip package (its wheel ships them under
`cutlass_library/source/include`), or from a CUTLASS checkout named by AIMV2_KERNELS_CUTLASS_DIR.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import torch

# Compiler flags of both builds. No -std: torch's extension builder picks the standard its headers
# need (C++17 in older releases, C++20 in newer ones); a fixed one would break one side or the other.
# NDEBUG: CuTe asserts when the driver refuses a TMA descriptor, which would abort the whole Python
# process; without the assert the descriptor stays zero and csrc/tma_descriptors.h turns that into an
# error naming the tensor. Both compilers get it so every translation unit sees the same inline code.
CXX_FLAGS = ["-O3", "-DNDEBUG"]
NVCC_FLAGS = ["-O3", "-DNDEBUG", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
SOURCE_SUFFIXES = (".cu", ".cpp")
JIT_NAME = "aimv2_kernels_cuda"
# Set to 1 where an untimed build of minutes must never start behind an innocent call such as
# `available_backends()` (time-boxed GPU checks, benchmarks): then only a prebuilt _C loads.
NO_JIT_ENV = "AIMV2_KERNELS_NO_JIT"

# A CUTLASS checkout (its root, holding include/cute) to build against instead of the pip package.
CUTLASS_DIR_ENV = "AIMV2_KERNELS_CUTLASS_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # aimv2_kernels/


class CutlassNotFound(RuntimeError):
    """No CUTLASS/CuTe headers: neither the nvidia-cutlass package nor AIMV2_KERNELS_CUTLASS_DIR."""


def cutlass_include_dirs() -> list[str]:
    """The include directories that hold cute/ and cutlass/: AIMV2_KERNELS_CUTLASS_DIR's include/
    when set, else the nvidia-cutlass package's. Raises CutlassNotFound saying how to get them."""
    override = os.environ.get(CUTLASS_DIR_ENV, "").strip()
    if override:
        include = Path(override) / "include"
        if not (include / "cute").is_dir():
            raise CutlassNotFound(f"{CUTLASS_DIR_ENV}={override} has no include/cute; point it at a CUTLASS checkout")
        return [str(include)]
    # Located, not imported: importing cutlass_library would load its Python dependencies (scipy,
    # cuda-python, ...), which the headers do not need and a --no-deps install lacks.
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise CutlassNotFound("the CUTLASS headers are missing: pip install nvidia-cutlass (or set "
                              f"{CUTLASS_DIR_ENV} to a CUTLASS checkout)")
    include = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    if not (include / "cute").is_dir():
        raise CutlassNotFound(f"the nvidia-cutlass package at {include.parent.parent} has no source/include/cute")
    return [str(include)]


def source_dir() -> Path | None:
    """Where the csrc/ sources are: inside the installed package (wheels ship a copy), else the
    checkout this package runs from (editable installs). None when neither has them."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if any(candidate.glob("*.cu")):
            return candidate
    return None


def source_files(directory: Path) -> list[str]:
    """The translation units to compile (.cu kernels and the .cpp binding), sorted."""
    return sorted(str(p) for p in directory.iterdir() if p.suffix in SOURCE_SUFFIXES)


def cache_dir() -> Path:
    """Root of first-use builds: $XDG_CACHE_HOME/aimv2_kernels, by default ~/.cache/aimv2_kernels."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "aimv2_kernels"


def _build_tag() -> str:
    """One build directory per torch, CUDA, Python and target-architecture combination: torch's
    build cache notices edited sources and flags, not a different torch or GPU."""
    arch = jit_arch_list().replace(";", "_").replace(" ", "_").replace("+", "")
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-py{py}-sm{arch}"


def jit_arch_list() -> str:
    """The architectures of a first-use build: TORCH_CUDA_ARCH_LIST, else the visible GPU's, with
    Hopper as "9.0a" (torch would say "9.0", whose cubin lacks the wgmma/TMA attention kernels)."""
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch:
        return arch
    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _import_prebuilt() -> str | None:
    """Import aimv2_kernels._C (built by pip); None on success, else the import error."""
    try:
        from aimv2_kernels import _C  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def _toolkit_nvcc() -> str | None:
    """The nvcc of the CUDA toolkit torch's extension builder would use, or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    nvcc = Path(CUDA_HOME) / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else None


def _jit_unavailable_reason() -> str | None:
    """Why a first-use build cannot run here, or None when it can."""
    if os.environ.get(NO_JIT_ENV, "").strip() == "1":
        return f"first-use build disabled ({NO_JIT_ENV}=1)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "this torch is not a CUDA build"
    if _toolkit_nvcc() is None:
        return "no CUDA toolkit found (set CUDA_HOME to a toolkit with bin/nvcc)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if source_dir() is None:
        return f"the csrc/ sources are not found in {_PACKAGE_DIR} or next to it"
    try:
        cutlass_include_dirs()
    except CutlassNotFound as exc:
        return str(exc)
    return None


def _jit_build() -> None:
    """Compile the sources into the cache (or load an earlier build) and load the library."""
    from torch.utils.cpp_extension import load

    directory = cache_dir() / _build_tag()
    directory.mkdir(parents=True, exist_ok=True)
    if not any(directory.glob(f"{JIT_NAME}*.so")):
        print(f"aimv2-kernels: building the CUDA kernels of the 'cuda' backend on first use; this takes a few "
              f"minutes and is cached in {directory}", file=sys.stderr, flush=True)
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = jit_arch_list()  # torch's builder reads the targets from here
    try:
        load(name=JIT_NAME, sources=source_files(source_dir()), build_directory=str(directory),
             extra_cflags=CXX_FLAGS, extra_cuda_cflags=NVCC_FLAGS, extra_include_paths=cutlass_include_dirs(),
             is_python_module=False, verbose=False)
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST")
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _load() -> str | None:
    prebuilt_error = _import_prebuilt()
    if prebuilt_error is None:
        return None
    absent = f"aimv2_kernels._C is not available ({prebuilt_error})"
    why_not = _jit_unavailable_reason()
    if why_not is not None:
        return f"{absent} and cannot be built on first use: {why_not}"
    try:
        _jit_build()
    except Exception as exc:  # a failed compile surfaces as the reason, not as a crash of the op
        return f"{absent} and the first-use build failed ({type(exc).__name__}): {_tail(str(exc))}"
    return None


@functools.cache
def load_status() -> str | None:
    """None when the kernels are loaded and registered as the "cuda" backend, else why they are not.

    The first call may build them (once per machine and torch version; see the module doc).
    """
    return _load()
