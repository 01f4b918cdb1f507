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
