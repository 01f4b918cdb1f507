"""``beta_cdf``: the regularised incomplete beta function I_x(a, b), differentiable in x.

Where its pieces live: math shared by CPU and CUDA ``csrc/common/beta_cdf_math.h``; schema
``csrc/ops/beta_cdf.cpp``; CPU kernels ``csrc/cpu/beta_cdf.cpp`` (+ ``csrc/cpu/beta_cdf_block.h``);
CUDA kernels ``csrc/cuda/beta_cdf.cu``; Triton kernels ``condkernels/triton/beta_cdf.py``; tests
``python_tests/test_beta_cdf.py``; benchmark ``condkernels/bench/batch_shaping.py``. This module holds the
public function, its checks, and the fake kernels and autograd of every compiled variant.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from .. import _library  # loads the compiled ops
from .. import reference
from . import _autodiff, _vmap
from ._backend import resolve_backend

OP = "beta_cdf"
Param = Union[float, Tensor]


def beta_cdf(x: Tensor, a: Param, b: Param, *, backend: str = "auto") -> Tensor:
    r"""Regularised incomplete beta function, the CDF of Beta(a, b) at x, elementwise.

    ``I_x(a, b) = B(x; a, b) / B(a, b)``, evaluated with a modified-Lentz continued fraction (and
    ``I_x(a, b) = 1 - I_{1-x}(b, a)`` above ``x = (a+1)/(a+b+2)``) in float64 whatever the dtype:
    within 1e-12 of ``scipy.special.betainc`` in float64 and 2e-6 in float32 for a, b in [0.05, 50].

    Args:
        x: values, any shape, floating point. ``x <= 0`` gives 0, ``x >= 1`` gives 1, NaN stays NaN.
        a, b: positive shape parameters: Python numbers, or floating tensors that broadcast with
            ``x`` (cast to x's dtype; entries that are not positive give NaN).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"`` (pure PyTorch).

    Returns:
        The broadcast shape of ``x``, ``a`` and ``b``, in x's dtype. Differentiable in ``x``
        (d/dx is the Beta(a, b) density, 0 outside [0, 1]), in forward mode and to any order too;
        asking for derivatives in ``a`` or ``b`` raises an error, they are not implemented.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{OP}: x must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{OP}: x must be floating point, got {x.dtype}")
    a_t = _as_parameter("a", a, x)
    b_t = _as_parameter("b", b, x)
    try:
        torch.broadcast_shapes(x.shape, a_t.shape, b_t.shape)
    except RuntimeError:
        raise ValueError(
            f"{OP}: x {tuple(x.shape)}, a {tuple(a_t.shape)} and b {tuple(b_t.shape)} do not broadcast"
        ) from None
    which = resolve_backend(OP, backend, x.device)
    if which == "reference":
        return reference.beta_cdf(x, a_t, b_t)
    if _autodiff.transformed(x, a_t, b_t):
        return _BetaCdfForTransforms.apply(x, a_t, b_t, which)
    return _compiled(which, x, a_t, b_t)


def _compiled(which: str, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    if which == "triton":
        from ..triton import beta_cdf as _triton_ops  # noqa: F401  (registers the ops)

        return torch.ops.condkernels.beta_cdf_triton(x, a, b)
    return torch.ops.condkernels.beta_cdf(x, a, b)


def density(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The Beta(a, b) density with beta_cdf's conventions (0 outside [0, 1], ``0 * log 0 = 0`` at
    the end points), in ATen calls: differentiable to any order."""
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    pdf = torch.exp(torch.xlogy(a - 1, x) + torch.special.xlog1py(b - 1, -x) - log_beta)
    return torch.where((x >= 0) & (x <= 1), pdf, torch.zeros_like(pdf))


def _grad_x_from_density(grad: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """x's gradient in ATen calls, differentiable again; summed back to x's shape where it broadcast."""
    return (grad * density(x, a, b)).sum_to_size(x.shape)


def _reject_parameter_gradients(needs: tuple) -> None:
    for name, needed in zip("ab", needs):
        if needed:
            raise RuntimeError(
                f"{OP}: the derivative with respect to {name} is not implemented (only x is "
                f"differentiable); pass {name} as a number or a tensor without grad or tangent"
            )


class _BetaCdfForTransforms(torch.autograd.Function):
    """beta_cdf under forward-mode AD and the torch.func transforms: the value from the kernels,
    the derivatives from the density in ATen calls (exact, and differentiable again)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, a, b, which):
        return _compiled(which, x, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, a, b, _ = inputs
        ctx.save_for_backward(x, a, b)
        ctx.save_for_forward(x, a, b)
        ctx.set_materialize_grads(False)  # a and b without tangents get None, not zeros

    @staticmethod
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        _reject_parameter_gradients(ctx.needs_input_grad[1:3])
        return _grad_x_from_density(grad, x, a, b), None, None, None

    @staticmethod
    def jvp(ctx, dx, da, db, _):
        x, a, b = ctx.saved_tensors
        _reject_parameter_gradients((da is not None, db is not None))
        return torch.broadcast_to(dx * density(x, a, b), torch.broadcast_shapes(x.shape, a.shape, b.shape))


def _as_parameter(name: str, value: Param, x: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{OP}: {name} must be a floating point tensor, got {value.dtype}")
        if value.device != x.device:
            raise ValueError(f"{OP}: {name} is on {value.device} but x is on {x.device}")
        return value.to(x.dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{OP}: {name} must be a positive number or a tensor, got {type(value).__name__}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{OP}: {name} must be positive and finite, got {value}")
    return torch.tensor(float(value), dtype=x.dtype, device=x.device)


# --- fake kernels and autograd, shared by the compiled variants (C++ and Triton) ---------------


def _fake_forward(x, a, b):
    return x.new_empty(torch.broadcast_shapes(x.shape, a.shape, b.shape))


def _fake_backward(grad, x, a, b):
    return torch.empty_like(x)


def register_variant(forward_op: str, backward_op: str) -> None:
    """Registers fakes and autograd of one compiled variant (schemas as ``beta_cdf`` /
    ``_beta_cdf_backward``)."""
    backward = _library.overload(backward_op)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_formula(ctx, grad):
        x, a, b = ctx.saved_tensors
        _reject_parameter_gradients(ctx.needs_input_grad[1:3])
        if ctx.needs_input_grad[0] and _autodiff.gradient_is_differentiated(grad, x):
            return _grad_x_from_density(grad, x, a, b), None, None
        grad_x = backward(grad.contiguous(), x, a, b) if ctx.needs_input_grad[0] else None
        return grad_x, None, None

    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)
    torch.library.register_autograd(forward_op, backward_formula, setup_context=setup_context)
    _vmap.register_elementwise(forward_op)


register_variant("condkernels::beta_cdf", "condkernels::_beta_cdf_backward")
