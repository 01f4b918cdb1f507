"""condkernels: fused kernels for conditional-computation CNNs.

Ops (also reachable as ``torch.ops.condkernels.<name>``):

- :func:`cond_conv2d` -- CondConv: per-example mixing of expert kernels fused with the convolution.
- :func:`gated_conv2d` -- channel-gated convolution that skips each example's closed channels.

Modules in :mod:`condkernels.nn`, the papers' networks in :mod:`condkernels.models`, parameter and
multiply-add counting in :mod:`condkernels.utils`, and :func:`optimize_for_inference`.
"""

from . import _library
from ._library import cuda_built
from .ops import cond_conv2d, gated_conv2d
from . import nn, models, utils  # noqa: E402  (after the ops: the modules call them)
from .inference import optimize_for_inference

__all__ = ["cond_conv2d", "cuda_built", "gated_conv2d", "models", "nn", "optimize_for_inference", "utils"]
__version__ = "0.1.0"
