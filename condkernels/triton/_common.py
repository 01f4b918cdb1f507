"""What the Triton kernel modules share: op registration, launch, block sizes, accumulator dtypes."""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def register_op(name: str, schema: str):
    """``triton_op`` when the kernels are compiled; an opaque ``custom_op`` under the interpreter.

    Under TRITON_INTERPRET=1, ``@triton.jit`` yields an ``InterpretedFunction`` and ``wrap_triton``
    hands it back unwrapped (there is no HOP to trace it into), so the functional decomposition a
    ``triton_op`` undergoes in torch.compile / AOTAutograd would launch the interpreter on fake
    tensors. Eager calls on CPU tensors do work through ``triton_op``; tracing does not. Registering
    the interpreted kernels as an ordinary custom op keeps them traceable as one opaque node.
    """
    if interpreted():
        return custom_op(name, mutates_args=(), schema=schema)
    return triton_op(name, mutates_args=(), schema=schema)


def launch(kernel, grid: Sequence[int], *args, **meta) -> None:
    """Launches ``kernel`` unless the grid is empty (an empty batch or channel list).

    Compiled kernels go through ``wrap_triton`` so that tracing sees them; interpreted ones are
    launched as they are (torch before 2.14 refuses to wrap them).
    """
    if all(int(g) > 0 for g in grid):
        (kernel if interpreted() else wrap_triton(kernel))[tuple(grid)](*args, **meta)


def block(n: int, cap: int, floor: int = 16) -> int:
    """A power-of-two block covering ``n`` up to ``cap``; ``tl.dot`` needs at least 16."""
    return max(floor, min(cap, triton.next_power_of_2(max(int(n), 1))))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def geometry_args(stride, padding, dilation) -> tuple[int, ...]:
    # Kernels take (SH, SW, PH, PW, DH, DW): the begin paddings; the end ones only bound the output size.
    return (stride[0], stride[1], padding[0], padding[2], dilation[0], dilation[1])


@triton.jit
def acc_zeros(M: tl.constexpr, N: tl.constexpr, FP64: tl.constexpr):
    if FP64:
        acc = tl.zeros((M, N), dtype=tl.float64)
    else:
        acc = tl.zeros((M, N), dtype=tl.float32)
    return acc
