"""condkernels: fused kernels for conditional-computation CNNs.

Ops (also reachable as ``torch.ops.condkernels.<name>``):

- :func:`cond_conv2d` -- CondConv: per-example mixing of expert kernels fused with the convolution.
- :func:`beta_cdf` -- the regularised incomplete beta function I_x(a, b), differentiable in x.
- :func:`batch_shaping_loss` -- the batch-shaping loss (per gate, sorted over the batch).
"""

from . import _library
from ._library import cuda_built
from .ops import cond_conv2d
from .ops import batch_shaping_loss, beta_cdf
from .gates import batch_shaping_lambda, binary_concrete_gate, gate_probability, l0_gamma, l0_gate_loss

__all__ = ["cond_conv2d", "cuda_built"]
__all__ += ["beta_cdf", "batch_shaping_loss", "binary_concrete_gate", "gate_probability", "l0_gate_loss",
            "batch_shaping_lambda", "l0_gamma"]
__version__ = "0.1.0"
