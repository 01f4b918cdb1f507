"""Loads the compiled ops and tells which backends this installation has."""

import functools
import importlib.util

import torch

from . import _C  # noqa: F401  (importing the library registers torch.ops.condkernels.*)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``condkernels::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"condkernels::{op}", dispatch_key)


@functools.cache
def cuda_built() -> bool:
    """Whether the CUDA kernels were compiled into this installation (a GPU need not be present)."""
    return any(has_kernel(op, "CUDA") for op in ("cond_conv2d", "gated_conv2d"))


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
