"""The ``backend=`` keyword shared by every op."""

from __future__ import annotations

import torch

from .. import _library

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Turns ``backend`` into the one that will run on ``device``, or raises naming what is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            if _library.cuda_built():
                return "cuda"
            if _library.triton_available():
                return "triton"
        return "reference"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
    if backend == "cuda":
        if not _library.cuda_built():
            raise RuntimeError(
                f"{op}: backend='cuda' was asked for but this installation of condkernels was built "
                "without its CUDA kernels (rebuild with nvcc available, or CONDKERNELS_CUDA=1)"
            )
        if device.type != "cuda":
            raise ValueError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
    if backend == "triton" and not _library.triton_available():
        raise RuntimeError(f"{op}: backend='triton' was asked for but Triton is not installed")
    return backend
