"""Shared test set-up: the device matrix and the Triton interpreter.

Without a GPU the Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before
triton is first imported. CUDA cases are collected everywhere and skipped without a GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import condkernels  # noqa: E402

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
needs_cuda_kernels = pytest.mark.skipif(
    not (HAS_GPU and condkernels.cuda_built()), reason="needs a CUDA GPU and the CUDA kernels"
)

# (device, backend) pairs that run here: the compiled CPU kernels, Triton (interpreted on the CPU
# without a GPU), and the CUDA kernels when a GPU is present.
COMPILED_BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("cuda" if HAS_GPU else "cpu", "triton", id="triton"),
    pytest.param("cuda", "cuda", id="cuda", marks=needs_cuda_kernels),
]


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# The hand-written CPU vector kernels, one build per instruction set (csrc/cpu/vector_kernels_*.cpp):
# tests of those kernels run once per set the CPU has, capped through CONDKERNELS_CPU_ISA, so an
# AVX-512 machine tests the AVX2 build too.
os.environ.pop("CONDKERNELS_CPU_ISA", None)
HARDWARE_ISA = condkernels.cpu_vector_isa()
_ISA_LEVEL = {"none": 0, "avx2": 1, "avx512": 2}


@pytest.fixture(params=["avx512", "avx2"])
def vector_isa(request, monkeypatch):
    """Runs the test with the CPU kernels capped at the given instruction set; skipped without it."""
    if _ISA_LEVEL[HARDWARE_ISA] < _ISA_LEVEL[request.param]:
        pytest.skip(f"the CPU has no {request.param.upper()} (it runs the {HARDWARE_ISA} kernels)")
    monkeypatch.setenv("CONDKERNELS_CPU_ISA", request.param)
    assert condkernels.cpu_vector_isa() == request.param
    return request.param
