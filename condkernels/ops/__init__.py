"""The public ops: one module per op with its checks, docstring, fake kernel and autograd."""

from .cond_conv2d import cond_conv2d
from .gated_conv2d import gated_conv2d

__all__ = ["cond_conv2d", "gated_conv2d"]
