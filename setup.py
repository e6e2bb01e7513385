"""Build script: everything is declared in pyproject.toml except the CUDA extension and the csrc/ copy.

`aimv2_kernels._C` (the kernels in csrc/) is built only when all of these hold:
  * torch is importable in the build environment (use `pip install --no-build-isolation .`),
  * that torch is a CUDA build and a CUDA toolkit (nvcc) is found,
  * AIMV2_KERNELS_SKIP_CUDA_BUILD is not "1",
  * the CUTLASS/CuTe headers are found (the nvidia-cutlass package, a build requirement, or a
    checkout named by AIMV2_KERNELS_CUTLASS_DIR).
Otherwise the install is pure Python and the "cuda" backend builds the same sources with ninja on
first use. No GPU is needed to build: the arch list is TORCH_CUDA_ARCH_LIST or "8.0;9.0a" (9.0a:
Hopper's arch-specific target, which the wgmma/TMA attention kernels need; it runs on H100/H200).

Either way the csrc/ sources are copied into the package (aimv2_kernels/csrc/) of a wheel, so that a
regular, non-editable install can still build them on first use. (MANIFEST.in puts csrc/ into the
sdist; editable installs read the checkout's csrc/ directly.)
"""
import glob
import importlib.util
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC_PATTERNS = ("*.cu", "*.cuh", "*.cpp", "*.h")


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ to <build>/aimv2_kernels/csrc/ (for the first-use build)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = os.path.join(self.build_lib, "aimv2_kernels", "csrc")
        os.makedirs(target, exist_ok=True)
        for pattern in CSRC_PATTERNS:
            for path in sorted(glob.glob(os.path.join("csrc", pattern))):
                shutil.copy2(path, target)


def _cuda_ext_module():
    """aimv2_kernels/cuda_backend/ext.py, loaded by path (importing the package would need its dependencies):
    it holds the source list and the compiler flags shared with the first-use build."""
    spec = importlib.util.spec_from_file_location("_aimv2_cuda_ext", os.path.join("aimv2_kernels", "cuda_backend", "ext.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_extension():
    if os.environ.get("AIMV2_KERNELS_SKIP_CUDA_BUILD") == "1":
        return None, "AIMV2_KERNELS_SKIP_CUDA_BUILD=1"
    if not glob.glob(os.path.join("csrc", "*.cu")):
        return None, "csrc/ has no .cu sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (isolated build)"
    if torch.version.cuda is None or CUDA_HOME is None:
        return None, "torch is not a CUDA build or no CUDA toolkit was found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    cuda_ext = _cuda_ext_module()
    try:
        cutlass = cuda_ext.cutlass_include_dirs()
    except cuda_ext.CutlassNotFound as exc:
        return None, str(exc)
    ext = CUDAExtension(
        name="aimv2_kernels._C",
        sources=[os.path.relpath(p) for p in cuda_ext.source_files(cuda_ext.Path("csrc"))],
        depends=sorted(glob.glob(os.path.join("csrc", "*.cuh")) + glob.glob(os.path.join("csrc", "*.h"))),
        include_dirs=cutlass,
        extra_compile_args={"cxx": list(cuda_ext.CXX_FLAGS), "nvcc": list(cuda_ext.NVCC_FLAGS)},
    )
    return (ext, BuildExtension.with_options(use_ninja=True)), None


built, why_not = _cuda_extension()
if built is None:
    print(f"aimv2-kernels: not building the CUDA extension ({why_not})")
    setup(cmdclass={"build_py": BuildPyWithSources})
else:
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_py": BuildPyWithSources, "build_ext": build_ext})
