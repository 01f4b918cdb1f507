"""``cond_conv2d``: CondConv, per-example mixing of expert kernels fused with the convolution.

Where its pieces live: schema ``csrc/ops/cond_conv2d.cpp``; CPU kernels ``csrc/cpu/cond_conv2d.cpp``;
CUDA kernels ``csrc/cuda/cond_conv2d.cu``; Triton kernels ``condkernels/triton/cond_conv2d.py``;
the naive oracle ``condkernels/reference.py``; tests ``python_tests/test_cond_conv2d.py``;
benchmark ``condkernels/bench/condconv.py``. This module holds the public function, its argument
checks, and the fake kernels and autograd formulas of every compiled variant.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _library  # loads the compiled ops
from .. import reference
from ._backend import resolve_backend
from . import _autocast, _autodiff, _conv_args, _vmap
from ._conv_args import IntOrPair, Padding, memory_format_of, normalize_conv_args, shape_of

OP = "cond_conv2d"


def cond_conv2d(
    x: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Conditionally parameterised convolution (CondConv).

    For every example ``b``::

        y[b] = conv2d(x[b], sum_e routing[b, e] * weight[e], sum_e routing[b, e] * bias[e],
                      stride, padding, dilation, groups)

    which equals the mixture of experts ``sum_e routing[b, e] * conv2d(x[b], weight[e], bias[e])``
    at the cost of one convolution.

    Args:
        x: input ``(B, Cin, H, W)``; channels_last is accepted and kept.
        routing: per-example expert coefficients ``(B, E)``, any real values (not normalised).
        weight: expert kernels ``(E, Cout, Cin / groups, kh, kw)``. timm's ``CondConv2d.weight``
            ``(E, Cout * Cin / groups * kh * kw)`` is the same memory:
            ``w5 = timm_w.view(E, Cout, Cin // groups, kh, kw)`` and ``timm_w = w5.reshape(E, -1)``.
        bias: expert biases ``(E, Cout)`` or ``None``.
        stride, dilation: int or pair.
        padding: int, pair, ``"valid"``, or ``"same"`` -- TensorFlow SAME for any stride
            (output ``ceil(H / stride)``; the odd pixel of an odd total pad goes bottom/right).
        groups: as in :func:`torch.nn.functional.conv2d`.
        backend: ``"auto"`` (the compiled kernels of the tensors' device), ``"cpu"``, ``"cuda"``,
            ``"triton"``, or ``"reference"`` (the naive mixture of E convolutions, in pure PyTorch).

    Returns:
        ``(B, Cout, H_out, W_out)``, in x's memory format. Differentiable in x, routing, weight
        and bias: ``dW_e = sum_b r[b,e] dW_b`` and ``dr[b,e] = <dW_b, W_e> + <db_b, bias_e>``;
        forward mode (jvp) runs the kernels too, second derivatives and the ``torch.func``
        reverse transforms the reference formulation (``ops/_autodiff.py``).
        Inside ``torch.autocast`` the op runs in the region's dtype, as ``conv2d`` does (float32
        arguments are cast; their gradients come back in float32).
    """
    x, routing, weight, bias = _autocast.lower_precision(x, routing, weight, bias)
    which, conv_args = _plan(x, routing, weight, bias, stride, padding, dilation, groups, backend)
    if which == "reference" or _autodiff.needs_reference(x, routing, weight, bias):
        return reference.cond_conv2d(x, routing, weight, bias, *conv_args)
    duals = _autodiff.split(x, routing, weight, bias)
    if duals is None:
        return _run(which, x, routing, weight, bias, conv_args)
    primals, tangents = duals
    return _autodiff.join(_run(which, *primals, conv_args), _tangent(which, primals, tangents, conv_args))


_PLANS = _conv_args.CallPlans()


def _plan(x, routing, weight, bias, stride, padding, dilation, groups, backend) -> tuple:
    """The backend that runs and the kernels' ``(stride, padding, dilation, groups)``, after every
    argument check (remembered per call signature, see ``CallPlans``)."""
    key = _PLANS.signature((x, routing, weight, bias), stride, padding, dilation, groups, backend)
    plan = _PLANS.get(key)
    if plan is None:
        check_args(x, routing, weight, bias, groups)
        stride2, pad4, dilation2 = normalize_conv_args(
            OP, x.shape[-2:], weight.shape[-2:], stride, padding, dilation
        )
        check_geometry(x, weight, stride2, pad4, dilation2)
        plan = resolve_backend(OP, backend, x.device), (stride2, pad4, dilation2, groups)
        _PLANS.remember(key, plan)
    return plan


def _run(which: str, x, routing, weight, bias, conv_args) -> Tensor:
    if which == "triton":
        from ..triton import cond_conv2d as triton_cond_conv2d

        return triton_cond_conv2d.cond_conv2d_triton(x, routing, weight, bias, *conv_args)
    return _library.call_op(torch.ops.condkernels.cond_conv2d, x, routing, weight, bias, *conv_args)


def _tangent(which: str, primals, tangents, conv_args) -> Tensor:
    """The op is linear in x, in routing and in (weight, bias): its tangent is one call per
    argument that carries one."""
    x, routing, weight, bias = primals
    dx, drouting, dweight, dbias = tangents
    tangent = None
    if dx is not None:
        tangent = _autodiff.add(tangent, _run(which, dx, routing, weight, None, conv_args))
    if drouting is not None:
        tangent = _autodiff.add(tangent, _run(which, x, drouting, weight, bias, conv_args))
    if dweight is not None:
        tangent = _autodiff.add(tangent, _run(which, x, routing, dweight, dbias, conv_args))
    elif dbias is not None:
        tangent = _autodiff.add(tangent, (routing @ dbias)[:, :, None, None])
    return tangent


def check_args(x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor], groups: int) -> None:
    """Shape, dtype and device checks with errors that name the argument."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{OP}: x must be a 4-D tensor (B, Cin, H, W), got {shape_of(x)}")
    if not isinstance(routing, Tensor) or routing.dim() != 2:
        raise ValueError(f"{OP}: routing must be a 2-D tensor (B, E), got {shape_of(routing)}")
    if not isinstance(weight, Tensor) or weight.dim() != 5:
        raise ValueError(
            f"{OP}: weight must be a 5-D tensor (E, Cout, Cin/groups, kh, kw), got {shape_of(weight)}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{OP}: groups must be a positive int, got {groups!r}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{OP}: x must be floating point, got {x.dtype}")
    named = [("routing", routing), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{OP}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}")
    batch, cin = x.shape[:2]
    experts, cout, cin_per_group = weight.shape[:3]
    if routing.shape[0] != batch:
        raise ValueError(f"{OP}: routing has {routing.shape[0]} rows but x has batch size {batch}")
    if routing.shape[1] != experts:
        raise ValueError(f"{OP}: routing has {routing.shape[1]} experts but weight has {experts}")
    if experts == 0:
        raise ValueError(f"{OP}: weight must hold at least one expert")
    if cout == 0:
        raise ValueError(f"{OP}: weight must have at least one output channel, got shape {tuple(weight.shape)}")
    if cin == 0:
        raise ValueError(f"{OP}: x must have at least one channel, got shape {tuple(x.shape)}")
    if cin % groups:
        raise ValueError(f"{OP}: in_channels ({cin}) is not divisible by groups ({groups})")
    if cout % groups:
        raise ValueError(f"{OP}: out_channels ({cout}) is not divisible by groups ({groups})")
    if cin_per_group * groups != cin:
        raise ValueError(
            f"{OP}: weight has {cin_per_group} input channels per group but x has {cin} channels "
            f"in {groups} groups"
        )
    if bias is not None and tuple(bias.shape) != (experts, cout):
        raise ValueError(f"{OP}: bias must have shape (E, Cout) = ({experts}, {cout}), got {tuple(bias.shape)}")


def check_geometry(x: Tensor, weight: Tensor, stride, pad4, dilation) -> tuple[int, int]:
    return _conv_args.check_geometry(OP, x, weight, stride, pad4, dilation)


# --- fake kernels and autograd, shared by the compiled variants (C++ and Triton) ---------------


def _fake_forward(x, routing, weight, bias, stride, padding, dilation, groups):
    check_args(x, routing, weight, bias, groups)
    out_h, out_w = check_geometry(x, weight, stride, padding, dilation)
    return torch.empty(
        (x.shape[0], weight.shape[1], out_h, out_w), dtype=x.dtype, device=x.device,
        memory_format=memory_format_of(x),
    )


def _fake_backward(grad_out, x, routing, weight, bias, stride, padding, dilation, groups, output_mask):
    empty = lambda: x.new_empty((0,))  # noqa: E731  (outputs must not alias each other)
    return (
        torch.empty_like(x) if output_mask[0] else empty(),
        torch.empty_like(routing) if output_mask[1] else empty(),
        torch.empty_like(weight) if output_mask[2] else empty(),
        torch.empty_like(bias) if output_mask[3] and bias is not None else empty(),
    )


def register_variant(forward_op: str, backward_op: str) -> None:
    """Registers the fake kernels and the autograd formula of one compiled variant of cond_conv2d.

    ``forward_op`` / ``backward_op`` are qualified names (``"condkernels::cond_conv2d"``) whose schemas
    match ``cond_conv2d`` / ``_cond_conv2d_backward``.
    """
    backward = _library.overload(backward_op)

    def setup_context(ctx, inputs, output):
        x, routing, weight, bias, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, routing, weight, bias)
        ctx.conv_args = (stride, padding, dilation, groups)

    def backward_formula(ctx, grad_out):
        x, routing, weight, bias = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:4])
        mask[3] = mask[3] and bias is not None
        if not any(mask):
            return None, None, None, None, None, None, None, None
        if _autodiff.gradient_is_differentiated(grad_out, x, routing, weight, bias):
            grads = _autodiff.reference_gradients(
                lambda *inputs: (reference.cond_conv2d(*inputs, *ctx.conv_args),),
                (x, routing, weight, bias), mask, (grad_out,),
            )
            return (*grads, None, None, None, None)
        grad_x, grad_routing, grad_weight, grad_bias = backward(
            grad_out.contiguous(memory_format=memory_format_of(x)), x, routing, weight, bias,
            *ctx.conv_args, mask,
        )
        return (
            grad_x if mask[0] else None,
            grad_routing if mask[1] else None,
            grad_weight if mask[2] else None,
            grad_bias if mask[3] else None,
            None, None, None, None,
        )

    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(backward_op)(_fake_backward)
    torch.library.register_autograd(forward_op, backward_formula, setup_context=setup_context)
    _vmap.register_batch_folding(forward_op, per_example=(0, 1))  # x, routing


register_variant("condkernels::cond_conv2d", "condkernels::_cond_conv2d_backward")
