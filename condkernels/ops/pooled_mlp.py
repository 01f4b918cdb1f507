"""``pooled_mlp``: global average pooling and one or two linear layers, as one op.

The head of CondConv's :class:`~condkernels.nn.Router` and of the batch-shaping
:class:`~condkernels.nn.ChannelGate` (after ``optimize_for_inference`` has folded its BatchNorm).
Schema, checks and the ATen composition (every device and dtype): ``csrc/ops/pooled_mlp.cpp``;
hand-written CPU kernel (float and double, batch under 16): ``csrc/cpu/pooled_mlp.cpp``; tests:
``python_tests/test_pooled_mlp.py``. This module holds the public function and the autograd.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _library
from . import _autodiff, _vmap


def pooled_mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor] = None, w2: Optional[Tensor] = None,
               b2: Optional[Tensor] = None) -> Tensor:
    r"""``w2 relu(w1 mean_hw(x) + b1) + b2``, or ``w1 mean_hw(x) + b1`` without ``w2``.

    One dispatch where the five ATen ops it stands for each cost a Python call: at batch 1 that is
    most of a gate's time. Differentiable in every argument, in forward mode and to any order.

    Args:
        x: ``(B, C, H, W)``, floating point, any memory format.
        w1, b1: ``(hidden, C)`` and ``(hidden,)`` or None, the first layer (``nn.Linear``'s layout).
        w2, b2: ``(out, hidden)`` and ``(out,)`` or None, the second layer, after a ReLU.

    Returns:
        ``(B, out)`` (``(B, hidden)`` without ``w2``), in x's dtype. Arguments of another dtype or
        device, or of the wrong shape, raise an error that names them.
    """
    if _autodiff.transformed(x, w1, b1, w2, b2):
        return _composition(x, w1, b1, w2, b2)  # PyTorch's ops give forward mode and torch.func
    return _library.call_op(torch.ops.condkernels.pooled_mlp, x, w1, b1, w2, b2)


def _composition(x, w1, b1, w2, b2) -> Tensor:
    """The op in ATen calls (the C++ composition's math, here differentiable by PyTorch itself)."""
    hidden = F.linear(x.mean((2, 3)), w1, b1)
    return hidden if w2 is None else F.linear(hidden.relu(), w2, b2)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.spatial = inputs[0].shape[2:]


def _backward(ctx, grad):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    # The hidden layer is recomputed: it is (B, hidden), next to nothing against pooling x.
    pooled = x.mean((2, 3))
    hidden = F.linear(pooled, w1, b1)
    grads = [None] * 5
    if w2 is not None:
        if ctx.needs_input_grad[3]:
            grads[3] = grad.t() @ hidden.relu()
        if b2 is not None and ctx.needs_input_grad[4]:
            grads[4] = grad.sum(0)
        grad = (grad @ w2) * (hidden > 0)
    if ctx.needs_input_grad[1]:
        grads[1] = grad.t() @ pooled
    if b1 is not None and ctx.needs_input_grad[2]:
        grads[2] = grad.sum(0)
    if ctx.needs_input_grad[0]:
        h, w = ctx.spatial
        grads[0] = ((grad @ w1) / (h * w))[:, :, None, None].expand(-1, -1, h, w)
    return tuple(grads)


torch.library.register_autograd("condkernels::pooled_mlp", _backward, setup_context=_setup_context)
_vmap.register_batch_folding("condkernels::pooled_mlp", per_example=(0,))  # x
