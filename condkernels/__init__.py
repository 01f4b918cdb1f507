"""condkernels: fused kernels for conditional-computation CNNs.

Ops (also reachable as ``torch.ops.condkernels.<name>``):

- :func:`cond_conv2d` -- CondConv: per-example mixing of expert kernels fused with the convolution.
- :func:`gated_conv2d` -- channel-gated convolution that skips each example's closed channels.
"""

from . import _library
from ._library import cuda_built
from .ops import cond_conv2d
from .ops import gated_conv2d

__all__ = ["cond_conv2d", "gated_conv2d", "cuda_built"]
__version__ = "0.1.0"
