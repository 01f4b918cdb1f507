"""Build of condkernels' compiled library, ``condkernels._C``.

The CPU kernels are always built. The CUDA kernels are built whenever torch is a
CUDA build and nvcc can be found -- never decided by whether a GPU is visible, so
a build machine without a GPU still ships the CUDA kernels. ``CONDKERNELS_CUDA=0``
or ``=1`` overrides the decision.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def _find_cuda_home():
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _pip_nvidia_include_dirs():
    """Headers of the pip ``nvidia`` packages (cusparse.h etc.) that torch's CUDA headers include."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _want_cuda():
    override = os.environ.get("CONDKERNELS_CUDA")
    cuda_home = _find_cuda_home()
    if override is not None and override not in ("0", "1"):
        raise SystemExit(f"CONDKERNELS_CUDA must be 0 or 1, got {override!r}")
    if override == "0":
        return None
    if torch.version.cuda is None or cuda_home is None:
        if override == "1":
            raise SystemExit(
                "CONDKERNELS_CUDA=1 but "
                + ("torch is not a CUDA build" if torch.version.cuda is None else "nvcc was not found")
            )
        return None
    return cuda_home


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "**", "*.cu"), recursive=True))
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    cuda_home = _want_cuda()
    if cuda_home is None:
        print("condkernels: building the CPU kernels only", flush=True)
        return cpp_extension.CppExtension(
            "condkernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    include_dirs += _pip_nvidia_include_dirs()
    print(
        f"condkernels: building CPU + CUDA kernels with {cuda_home}/bin/nvcc for archs "
        f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the visible GPU')}",
        flush=True,
    )
    nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", "--threads", "2"]
    return cpp_extension.CUDAExtension(
        "condkernels._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=[("CONDKERNELS_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    name="condkernels",
    version="0.1.0",
    description="Fused kernels for conditional-computation CNNs: CondConv, gated convolution, batch-shaping",
    packages=find_packages(include=["condkernels", "condkernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
