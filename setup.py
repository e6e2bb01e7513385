"""Build script: everything is declared in pyproject.toml except the optional CUDA extension.

`aimv2_kernels._C` (the kernels in csrc/) is built only when all of these hold:
  * torch is importable in the build environment (use `pip install --no-build-isolation .`),
  * that torch is a CUDA build and a CUDA toolkit (nvcc) is found,
  * AIMV2_KERNELS_SKIP_CUDA_BUILD is not "1".
Otherwise the install is pure Python and the "cuda" backend builds the same sources with ninja on
first use. No GPU is needed to build: the arch list is TORCH_CUDA_ARCH_LIST or "8.0;9.0".
"""
import glob
import os

from setuptools import setup


def _cuda_extension():
    if os.environ.get("AIMV2_KERNELS_SKIP_CUDA_BUILD") == "1":
        return None, "AIMV2_KERNELS_SKIP_CUDA_BUILD=1"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not any(s.endswith(".cu") for s in sources):
        return None, "csrc/ has no .cu sources"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return None, "torch is not importable in the build environment (isolated build)"
    if torch.version.cuda is None or CUDA_HOME is None:
        return None, "torch is not a CUDA build or no CUDA toolkit was found"
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension(
        name="aimv2_kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
    )
    return (ext, BuildExtension.with_options(use_ninja=True)), None


built, why_not = _cuda_extension()
if built is None:
    print(f"aimv2-kernels: not building the CUDA extension ({why_not})")
    setup()
else:
    ext, build_ext = built
    setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
