"""Loads the compiled ops and tells which backends this installation has."""

import importlib.util

import torch

from . import _C  # noqa: F401  (importing the library registers torch.ops.condkernels.*)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``condkernels::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"condkernels::{op}", dispatch_key)


# Fixed for the life of the process; plain constants keep them free to read under torch.compile.
_CUDA_BUILT = has_kernel("cond_conv2d", "CUDA") or has_kernel("gated_conv2d", "CUDA")
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this installation (a GPU need not be present)."""
    return _CUDA_BUILT


def triton_available() -> bool:
    return _TRITON_AVAILABLE
