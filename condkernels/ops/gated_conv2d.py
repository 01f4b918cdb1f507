"""``gated_conv2d``: a convolution that skips each example's closed channels.

Where its pieces live: schemas ``csrc/ops/gated_conv2d.cpp``; CPU kernels ``csrc/cpu/gated_conv2d.cpp``;
CUDA kernels ``csrc/cuda/gated_conv2d.cu``; Triton kernels ``condkernels/triton/gated_conv2d.py``;
the dense masked oracle ``condkernels/reference.py``; tests ``python_tests/test_gated_conv2d.py``;
benchmark ``condkernels/bench/gated.py``. This module holds the public function, its argument
checks, and the fake kernels and autograd formulas of every compiled variant.

Every compiled variant provides three ops with the schemas of ``condkernels::gated_conv2d``,
``condkernels::_gated_conv2d_with_ungated`` and ``condkernels::_gated_conv2d_backward`` and is
registered here with :func:`register_variant`.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import Tensor

from .. import _library
from .. import reference
from ._backend import resolve_backend
from . import _autocast, _autodiff, _conv_args, _vmap
from ._conv_args import IntOrPair, Padding, memory_format_of, normalize_conv_args, shape_of

OP = "gated_conv2d"


def gated_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    in_gate: Optional[Tensor] = None,
    out_gate: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Padding = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> Tensor:
    r"""Channel-gated convolution that skips, per example, the channels whose gate is zero.

    For every example ``b`` (gates broadcast over H and W; a missing gate is all ones)::

        y[b] = out_gate[b] * (conv2d(in_gate[b] * x[b], weight, stride, padding, dilation, groups) + bias)

    A channel is *closed* for an example where its gate is exactly ``0`` (``-0.0`` too); any other
    value, negative or NaN included, opens it and is multiplied in. What is skipped:

    - Always: closed input channels do not enter that example's reduction (they contribute exactly
      0), and closed output channels are written as 0 without being computed, so each example's
      work scales with its own open fraction, not the batch's union. Non-finite values of ``x`` in
      a closed input channel therefore do not reach the output, where the dense masked formula
      would give NaN.
    - Gates that need no gradient (inference, ``torch.no_grad()``, detached gates): everything
      closed is skipped, forward and backward.
    - ``out_gate`` requiring grad: its gradient ``<grad_y, conv + bias>`` needs the ungated value
      of closed output channels too, so every output channel is computed (closed input channels
      are still skipped) and kept for the backward. The backward still skips closed outputs in the
      gradients of x, weight, bias and in_gate.
    - ``in_gate`` requiring grad: the forward is unchanged; the backward computes the gradient of
      the gated input at every input channel (over the open outputs only), since a closed input
      channel's gate gradient is ``<x, d(in_gate * x)>``.

    Gradients of x, weight, bias, in_gate and out_gate are exact: equal to those of the dense
    masked formulation (``backend="reference"``). When the gates are open enough (more than a
    benchmark-chosen share of the dense work), the CPU kernels run the dense convolution plus the
    masks instead, which is faster there; results are the same. Forward mode (jvp) runs the
    kernels too; second derivatives and the ``torch.func`` reverse transforms run the reference
    formulation (``ops/_autodiff.py``).

    Args:
        x: input ``(B, Cin, H, W)``; channels_last is accepted and kept.
        weight: ``(Cout, Cin / groups, kh, kw)``.
        bias: ``(Cout,)`` or ``None``.
        in_gate: ``(B, Cin)`` or ``None``: binary 0/1 gates or real-valued ones (DeepMoE's ReLU
            gates), with x's dtype and device.
        out_gate: ``(B, Cout)`` or ``None``, like ``in_gate``.
        stride, dilation: int or pair.
        padding: int, pair, ``"valid"``, or ``"same"`` -- TensorFlow SAME for any stride
            (output ``ceil(H / stride)``; the odd pixel of an odd total pad goes bottom/right).
        groups: as in :func:`torch.nn.functional.conv2d`; gates act on the full channel axes.
        backend: ``"auto"`` (the compiled kernels of the tensors' device), ``"cpu"``, ``"cuda"``,
            ``"triton"``, or ``"reference"`` (the dense masked formulation, in pure PyTorch).

    Returns:
        ``(B, Cout, H_out, W_out)``, in x's memory format. Inside ``torch.autocast`` the op runs in
        the region's dtype, as ``conv2d`` does (float32 arguments, gates included, are cast; their
        gradients come back in float32).
    """
    x, weight, bias, in_gate, out_gate = _autocast.lower_precision(x, weight, bias, in_gate, out_gate)
    which, conv_args = _plan(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, backend)
    if which == "reference" or _autodiff.needs_reference(x, weight, bias, in_gate, out_gate):
        return reference.gated_conv2d(x, weight, bias, in_gate, out_gate, *conv_args)
    duals = _autodiff.split(x, weight, bias, in_gate, out_gate)
    if duals is None:
        return _run(which, x, weight, bias, in_gate, out_gate, conv_args)
    primals, tangents = duals
    return _autodiff.join(_run(which, *primals, conv_args), _tangent(which, primals, tangents, conv_args))


_PLANS = _conv_args.CallPlans()


def _plan(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, backend) -> tuple:
    """The backend that runs and the kernels' ``(stride, padding, dilation, groups)``, after every
    argument check (remembered per call signature, see ``CallPlans``)."""
    key = _PLANS.signature((x, weight, bias, in_gate, out_gate), stride, padding, dilation, groups, backend)
    plan = _PLANS.get(key)
    if plan is None:
        check_args(x, weight, bias, in_gate, out_gate, groups)
        stride2, pad4, dilation2 = normalize_conv_args(
            OP, x.shape[-2:], weight.shape[-2:], stride, padding, dilation
        )
        check_geometry(x, weight, stride2, pad4, dilation2)
        plan = _resolve(backend, x.device), (stride2, pad4, dilation2, groups)
        _PLANS.remember(key, plan)
    return plan


def _run(which: str, x, weight, bias, in_gate, out_gate, conv_args) -> Tensor:
    if which == "triton":
        from ..triton import gated_conv2d as triton_gated_conv2d

        forward, with_ungated = triton_gated_conv2d.triton_ops()
    else:
        forward = torch.ops.condkernels.gated_conv2d
        with_ungated = torch.ops.condkernels._gated_conv2d_with_ungated
    if out_gate is not None and out_gate.requires_grad and torch.is_grad_enabled():
        return with_ungated(x, weight, bias, in_gate, out_gate, *conv_args)[0]
    return _library.call_op(forward, x, weight, bias, in_gate, out_gate, *conv_args)


def _tangent(which: str, primals, tangents, conv_args) -> Tensor:
    """``out_gate * (conv(in_gate * x, weight) + bias)`` is linear in x, in (weight, bias), in
    in_gate and in out_gate: its tangent is one call per argument that carries one."""
    x, weight, bias, in_gate, out_gate = primals
    dx, dweight, dbias, din_gate, dout_gate = tangents
    tangent = None
    if dx is not None:
        tangent = _autodiff.add(tangent, _run(which, dx, weight, None, in_gate, out_gate, conv_args))
    if dweight is not None:
        tangent = _autodiff.add(tangent, _run(which, x, dweight, dbias, in_gate, out_gate, conv_args))
    elif dbias is not None:
        gate = 1 if out_gate is None else out_gate
        tangent = _autodiff.add(tangent, (gate * dbias)[..., None, None])
    if din_gate is not None:
        tangent = _autodiff.add(tangent, _run(which, x, weight, None, din_gate, out_gate, conv_args))
    if dout_gate is not None:
        ungated = _run(which, x, weight, bias, in_gate, None, conv_args)
        tangent = _autodiff.add(tangent, ungated * dout_gate[:, :, None, None])
    return tangent


def _find_triton_kernels() -> bool:
    try:
        return importlib.util.find_spec(f"condkernels.triton.{OP}") is not None
    except ModuleNotFoundError:  # no condkernels.triton package at all
        return False


# Which kernels of gated_conv2d this installation has, decided once (not while torch.compile traces).
HAS_TRITON_KERNELS = _find_triton_kernels()
HAS_CUDA_KERNELS = _library.has_kernel(OP, "CUDA")


def _resolve(backend: str, device: torch.device) -> str:
    """``resolve_backend``, plus a clear error where gated_conv2d has no kernels of that backend."""
    which = resolve_backend(OP, backend, device)
    if which == "cpu" or which == "reference":
        return which
    if backend == "auto" and which == "cuda" and not HAS_CUDA_KERNELS:
        which = "triton" if HAS_TRITON_KERNELS and _library.triton_available() else "reference"
    if backend == "auto" and which == "triton" and not HAS_TRITON_KERNELS:
        which = "reference"
    if which == "triton" and not HAS_TRITON_KERNELS:
        raise RuntimeError(
            f"{OP}: backend='triton' is not implemented: this installation has no Triton kernels "
            f"of {OP} (condkernels/triton/{OP}.py)"
        )
    if which == "cuda" and not HAS_CUDA_KERNELS:
        raise RuntimeError(
            f"{OP}: backend='cuda' is not implemented: this installation has no CUDA kernels of "
            f"{OP} (csrc/cuda/{OP}.cu)"
        )
    return which


def check_args(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], in_gate: Optional[Tensor],
    out_gate: Optional[Tensor], groups: int,
) -> None:
    """Shape, dtype and device checks with errors that name the argument."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{OP}: x must be a 4-D tensor (B, Cin, H, W), got {shape_of(x)}")
    if not isinstance(weight, Tensor) or weight.dim() != 4:
        raise ValueError(f"{OP}: weight must be a 4-D tensor (Cout, Cin/groups, kh, kw), got {shape_of(weight)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"{OP}: groups must be a positive int, got {groups!r}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{OP}: x must be floating point, got {x.dtype}")
    named = [("weight", weight), ("bias", bias), ("in_gate", in_gate), ("out_gate", out_gate)]
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != x.dtype:
            raise TypeError(f"{OP}: {name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}")
    batch, cin = x.shape[:2]
    cout, cin_per_group = weight.shape[:2]
    if cin % groups:
        raise ValueError(f"{OP}: in_channels ({cin}) is not divisible by groups ({groups})")
    if cout % groups:
        raise ValueError(f"{OP}: out_channels ({cout}) is not divisible by groups ({groups})")
    if cin_per_group * groups != cin:
        raise ValueError(
            f"{OP}: weight has {cin_per_group} input channels per group but x has {cin} channels "
            f"in {groups} groups"
        )
    if bias is not None and tuple(bias.shape) != (cout,):
        raise ValueError(f"{OP}: bias must have shape (Cout,) = ({cout},), got {tuple(bias.shape)}")
    for name, gate, channels, label in (("in_gate", in_gate, cin, "Cin"), ("out_gate", out_gate, cout, "Cout")):
        if gate is not None and tuple(gate.shape) != (batch, channels):
            raise ValueError(
                f"{OP}: {name} must have shape (B, {label}) = ({batch}, {channels}), got {tuple(gate.shape)}"
            )


def check_geometry(x: Tensor, weight: Tensor, stride, pad4, dilation) -> tuple[int, int]:
    return _conv_args.check_geometry(OP, x, weight, stride, pad4, dilation)


# --- fake kernels and autograd, shared by the compiled variants (C++ and Triton) ---------------


def _fake_forward(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups):
    check_args(x, weight, bias, in_gate, out_gate, groups)
    out_h, out_w = check_geometry(x, weight, stride, padding, dilation)
    return torch.empty(
        (x.shape[0], weight.shape[0], out_h, out_w), dtype=x.dtype, device=x.device,
        memory_format=memory_format_of(x),
    )


def _fake_forward_with_ungated(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups):
    out = _fake_forward(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups)
    return out, torch.empty_like(out)


def _fake_backward(grad_out, x, weight, bias, in_gate, out_gate, ungated, stride, padding, dilation, groups,
                   output_mask):
    empty = lambda: x.new_empty((0,))  # noqa: E731  (outputs must not alias each other)
    return (
        torch.empty_like(x) if output_mask[0] else empty(),
        torch.empty_like(weight) if output_mask[1] else empty(),
        torch.empty_like(bias) if output_mask[2] and bias is not None else empty(),
        torch.empty_like(in_gate) if output_mask[3] and in_gate is not None else empty(),
        torch.empty_like(out_gate) if output_mask[4] and out_gate is not None else empty(),
    )


def _gradient_mask(needs_input_grad, bias, in_gate, out_gate) -> list[bool]:
    mask = list(needs_input_grad[:5])
    mask[2] = mask[2] and bias is not None
    mask[3] = mask[3] and in_gate is not None
    mask[4] = mask[4] and out_gate is not None
    return mask


def _as_input_grads(grads, mask) -> tuple:
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None, None, None)


def _reference_gradients(ctx, mask, grad_out, grad_ungated) -> list:
    """Differentiable gradients of the dense masked formulation, for the outputs that got one."""
    x, weight, bias, in_gate, out_gate = ctx.saved_tensors[:5]

    def outputs(x, weight, bias, in_gate, out_gate):
        ungated = reference.gated_conv2d(x, weight, bias, in_gate, None, *ctx.conv_args)
        return ungated * out_gate[:, :, None, None] if out_gate is not None else ungated, ungated

    return _autodiff.reference_gradients(
        outputs, (x, weight, bias, in_gate, out_gate), mask, (grad_out, grad_ungated)
    )


def register_variant(forward_op: str, with_ungated_op: str, backward_op: str) -> None:
    """Registers the fake kernels and autograd formulas of one compiled variant of gated_conv2d.

    The three arguments are qualified names (``"condkernels::gated_conv2d"``) whose schemas match
    ``gated_conv2d``, ``_gated_conv2d_with_ungated`` and ``_gated_conv2d_backward``.
    """
    backward = _library.overload(backward_op)

    def call_backward(ctx, grad_out, ungated, mask):
        x, weight, bias, in_gate, out_gate = ctx.saved_tensors[:5]
        return backward(
            grad_out.contiguous(memory_format=memory_format_of(x)), x, weight, bias, in_gate, out_gate,
            ungated, *ctx.conv_args, mask,
        )

    def setup_context(ctx, inputs, output):
        x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight, bias, in_gate, out_gate)
        ctx.conv_args = (stride, padding, dilation, groups)

    def backward_formula(ctx, grad_out):
        _, _, bias, in_gate, out_gate = ctx.saved_tensors
        mask = _gradient_mask(ctx.needs_input_grad, bias, in_gate, out_gate)
        if not any(mask):
            return (None,) * 9
        if _autodiff.gradient_is_differentiated(grad_out, *ctx.saved_tensors):
            return _as_input_grads(_reference_gradients(ctx, mask, grad_out, None), mask)
        return _as_input_grads(call_backward(ctx, grad_out, None, mask), mask)

    def setup_context_with_ungated(ctx, inputs, output):
        x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups = inputs
        ctx.save_for_backward(x, weight, bias, in_gate, out_gate, output[1])
        ctx.conv_args = (stride, padding, dilation, groups)
        # The ungated output is internal to gated_conv2d: its gradient is normally absent.
        ctx.set_materialize_grads(False)

    def backward_formula_with_ungated(ctx, grad_out, grad_ungated):
        x, weight, bias, in_gate, out_gate, ungated = ctx.saved_tensors
        mask = _gradient_mask(ctx.needs_input_grad, bias, in_gate, out_gate)
        if not any(mask) or (grad_out is None and grad_ungated is None):
            return (None,) * 9
        if _autodiff.gradient_is_differentiated(grad_out, grad_ungated, *ctx.saved_tensors):
            return _as_input_grads(_reference_gradients(ctx, mask, grad_out, grad_ungated), mask)
        if grad_out is None:
            grad_out = torch.zeros_like(ungated)
        if grad_ungated is None:
            return _as_input_grads(call_backward(ctx, grad_out, ungated, mask), mask)
        # Both outputs used: out = out_gate * ungated, so the ungated value receives both.
        gate = out_gate[:, :, None, None] if out_gate is not None else 1
        grad_total = grad_out * gate + grad_ungated
        grads = list(backward(
            grad_total.contiguous(memory_format=memory_format_of(x)), x, weight, bias, in_gate, None, None,
            *ctx.conv_args, mask[:4] + [False],
        ))
        if mask[4]:
            grads[4] = (grad_out * ungated).sum((2, 3))
        return _as_input_grads(grads, mask)

    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_fake(with_ungated_op)(_fake_forward_with_ungated)
    torch.library.register_fake(backward_op)(_fake_backward)
    torch.library.register_autograd(forward_op, backward_formula, setup_context=setup_context)
    torch.library.register_autograd(
        with_ungated_op, backward_formula_with_ungated, setup_context=setup_context_with_ungated
    )
    for op in (forward_op, with_ungated_op):
        _vmap.register_batch_folding(op, per_example=(0, 3, 4))  # x, in_gate, out_gate


register_variant(
    "condkernels::gated_conv2d", "condkernels::_gated_conv2d_with_ungated", "condkernels::_gated_conv2d_backward"
)
