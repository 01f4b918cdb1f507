"""condkernels: fused kernels for conditional-computation CNNs.

Ops (also reachable as ``torch.ops.condkernels.<name>``):

- :func:`cond_conv2d` -- CondConv: per-example mixing of expert kernels fused with the convolution.
- :func:`gated_conv2d` -- channel-gated convolution that skips each example's closed channels.
- :func:`beta_cdf` -- the regularised incomplete beta function I_x(a, b), differentiable in x.
- :func:`batch_shaping_loss` -- the batch-shaping loss (per gate, sorted over the batch).
- :func:`pooled_mlp` -- global average pooling and one or two linear layers (routers' and gates' heads).

Gates and their losses and schedules in :mod:`condkernels.gates`; modules in :mod:`condkernels.nn`,
the papers' networks in :mod:`condkernels.models`, parameter and multiply-add counting in
:mod:`condkernels.utils`, :func:`optimize_for_inference`, :func:`frozen_weights`, :func:`empty_cpu_cache`, and
:func:`cpu_vector_isa` (the instruction set the CPU kernels run with).
"""

from . import _library
from ._library import cpu_vector_isa, cuda_built, empty_cpu_cache, frozen_weights
from .ops import batch_shaping_loss, beta_cdf, cond_conv2d, gated_conv2d, pooled_mlp
from .gates import batch_shaping_lambda, binary_concrete_gate, gate_probability, l0_gamma, l0_gate_loss
from . import nn, models, utils  # noqa: E402  (after the ops: the modules call them)
from .inference import optimize_for_inference

__all__ = [
    "batch_shaping_lambda", "batch_shaping_loss", "beta_cdf", "binary_concrete_gate", "cond_conv2d",
    "cpu_vector_isa", "cuda_built", "empty_cpu_cache", "frozen_weights", "gate_probability", "gated_conv2d",
    "l0_gamma", "l0_gate_loss", "models", "nn", "optimize_for_inference", "pooled_mlp", "utils",
]
__version__ = "0.1.0"
