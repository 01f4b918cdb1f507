"""``batch_shaping_loss``: the batch-shaping loss of Bejnordi et al. (eq. 2), per gate over the batch.

Where its pieces live: math shared by CPU and CUDA ``csrc/common/beta_cdf_math.h``; schema
``csrc/ops/batch_shaping_loss.cpp``; CPU kernels ``csrc/cpu/batch_shaping_loss.cpp``; CUDA kernels
``csrc/cuda/batch_shaping_loss.cu``; the naive oracle ``condkernels/reference.py``; tests
``python_tests/test_batch_shaping.py``; benchmark ``condkernels/bench/batch_shaping.py``. This module holds
the public function, its checks, the all-gather over a process group, and the fake kernels and
autograd of the compiled op.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _library  # noqa: F401  (loads the compiled ops)
from .. import reference
from . import _autocast, _autodiff
from ._backend import resolve_backend

OP = "batch_shaping_loss"
PRIORS = ("beta", "gaussian", "uniform")
REDUCTIONS = ("paper", "sum", "mean")


def batch_shaping_loss(
    gates: Tensor,
    alpha: float = 0.6,
    beta: float = 0.4,
    prior: str = "beta",
    reduction: str = "paper",
    pdf_clip: Optional[Sequence[float]] = (1e-3, 100.0),
    eps: float = 1e-6,
    process_group=None,
    *,
    prior_params: Optional[Sequence[float]] = None,
    backend: str = "auto",
) -> Tensor:
    r"""Batch-shaping loss: pushes every gate's distribution over the batch towards a prior.

    For each gate (every position of ``gates`` but the batch dimension), its N values over the
    batch are sorted, ``x_(1) <= ... <= x_(N)``, and compared with the prior's CDF F::

        "paper": sum_gates 1/N sum_i (i/(N+1) - F(x_(i)))^2     (eq. 2 with lambda = 1)
        "sum":   sum_gates     sum_i (i/(N+1) - F(x_(i)))^2     (the paper's appendix)
        "mean":  "paper" / number of gates

    Scale it by the schedule's lambda yourself (see :func:`batch_shaping_lambda`). Feed it the soft
    gate probabilities ``sigmoid(logits)`` (:func:`gate_probability`), never hard 0/1 gates.

    The backward is the paper's: ``-2 * scale * (i/(N+1) - F(x_(i))) * f(x_(i))`` with the prior
    density f clipped to ``pdf_clip``, put back at each value's own batch row through the sort order
    (ties keep batch order), times the incoming gradient. The kernels do that scatter in the
    forward, while each column is in cache, and save only the gradient (no sort indices).

    Args:
        gates: ``(N, ...)``, N >= 1 examples; floating point. NaN values give a NaN loss.
        alpha, beta: Beta(alpha, beta) prior, both positive (the paper uses 0.6, 0.4).
        prior: ``"beta"``, ``"gaussian"`` or ``"uniform"``.
        reduction: ``"paper"``, ``"sum"`` or ``"mean"`` (above).
        pdf_clip: ``(low, high)`` bounds of the density used in the gradient, or None for none.
        eps: for the beta prior, values are evaluated at ``clamp(x, eps, 1 - eps)`` (its density is
            unbounded at 0 and 1); the gradient passes through the clamp unchanged.
        process_group: a ``torch.distributed`` process group (e.g. ``dist.group.WORLD``): the
            gates of every rank are gathered so the whole global batch shapes one distribution;
            each rank gets the loss of the concatenated batch, and in the backward each rank's own
            gates receive the sum over ranks of the gradient sent to them, so that DDP's gradient
            averaging reproduces the single-process gradient.
        prior_params: ``(mean, std)`` for ``"gaussian"`` (required), ``(low, high)`` for
            ``"uniform"`` (default ``(0, 1)``); not used by ``"beta"``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        A 0-d tensor in gates' dtype. Inside ``torch.autocast`` the loss is computed in float32,
        as PyTorch's losses are (gates cast; their gradient comes back in their dtype).
    """
    (gates,) = _autocast.float32(gates)
    prior_a, prior_b = _check_args(gates, alpha, beta, prior, reduction, prior_params)
    pdf_lo, pdf_hi = _check_pdf_clip(pdf_clip)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < 0.5):
        raise ValueError(f"{OP}: eps must be a number in [0, 0.5), got {eps!r}")
    which = resolve_backend(OP, backend, gates.device)
    if process_group is not None:
        gates = gather_batch(gates, process_group)
    args = (prior, float(prior_a), float(prior_b), reduction, pdf_lo, pdf_hi, float(eps))
    if which == "reference":
        return reference.batch_shaping_loss(gates, *args)
    if _autodiff.transformed(gates):
        return _LossForTransforms.apply(gates, which, args)[0]
    return _compiled(which, gates, args)[0]


def _compiled(which: str, gates: Tensor, args: tuple) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d gates)."""
    if which == "triton":
        from ..triton import batch_shaping_loss as _triton_ops  # noqa: F401  (registers the ops)

        return torch.ops.condkernels.batch_shaping_loss_triton(gates, *args)
    return torch.ops.condkernels.batch_shaping_loss(gates, *args)


class _LossForTransforms(torch.autograd.Function):
    """The loss under forward-mode AD and the torch.func transforms, with the kernels' gradient:
    its tangent is ``<d loss / d gates, d gates>``. As with the compiled ops, the gradient is the
    paper's and is not differentiated again."""

    generate_vmap_rule = True

    @staticmethod
    def forward(gates, which, args):
        loss, grad_gates = _compiled(which, gates, args)
        return loss, grad_gates

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad_gates = output
        ctx.mark_non_differentiable(grad_gates)
        ctx.save_for_backward(grad_gates)
        ctx.save_for_forward(grad_gates)

    @staticmethod
    def backward(ctx, grad_loss, _grad_of_grad_gates):
        (grad_gates,) = ctx.saved_tensors
        return grad_loss.to(grad_gates.dtype) * grad_gates, None, None

    @staticmethod
    def jvp(ctx, d_gates, _, __):
        (grad_gates,) = ctx.saved_tensors
        return (grad_gates * d_gates).sum(), None


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _check_args(gates, alpha, beta, prior, reduction, prior_params):
    if not isinstance(gates, Tensor):
        raise TypeError(f"{OP}: gates must be a tensor, got {type(gates).__name__}")
    if not gates.dtype.is_floating_point:
        raise TypeError(f"{OP}: gates must be floating point, got {gates.dtype}")
    if gates.dim() < 1 or gates.shape[0] < 1:
        raise ValueError(f"{OP}: gates must hold at least 1 example (N, ...), got shape {tuple(gates.shape)}")
    if gates[0].numel() < 1:
        raise ValueError(f"{OP}: gates must hold at least one gate per example, got shape {tuple(gates.shape)}")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not _is_number(v) or not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{OP}: {name} must be a positive number, got {v!r}")
    if prior not in PRIORS:
        raise ValueError(f"{OP}: prior must be one of {PRIORS}, got {prior!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if prior == "beta":
        if prior_params is not None:
            raise ValueError(f"{OP}: prior_params is for the gaussian and uniform priors; "
                             "the beta prior takes alpha and beta")
        return alpha, beta
    if prior == "gaussian" and prior_params is None:
        raise ValueError(f"{OP}: prior='gaussian' needs prior_params=(mean, std)")
    params = (0.0, 1.0) if prior_params is None else tuple(prior_params)
    if len(params) != 2 or not all(_is_number(p) and math.isfinite(p) for p in params):
        raise ValueError(f"{OP}: prior_params must be two finite numbers, got {prior_params!r}")
    if prior == "gaussian" and not params[1] > 0:
        raise ValueError(f"{OP}: the gaussian std (prior_params[1]) must be positive, got {params[1]}")
    if prior == "uniform" and not params[0] < params[1]:
        raise ValueError(f"{OP}: the uniform prior_params must be (low, high) with low < high, got {params}")
    return params


def _check_pdf_clip(pdf_clip):
    if pdf_clip is None:
        return 0.0, math.inf
    try:
        lo, hi = pdf_clip
    except (TypeError, ValueError):
        raise ValueError(f"{OP}: pdf_clip must be (low, high) or None, got {pdf_clip!r}") from None
    if not (_is_number(lo) and _is_number(hi) and 0 <= lo <= hi):
        raise ValueError(f"{OP}: pdf_clip must be (low, high) with 0 <= low <= high, got {pdf_clip!r}")
    return float(lo), float(hi)


# --- the global batch over a process group ------------------------------------------------------


class _GatherBatch(torch.autograd.Function):
    """Concatenates every rank's gates along dim 0 (ranks may hold different batch sizes).

    Backward: the gradient of the gathered tensor is summed over ranks (each rank's loss reaches
    every rank's gates) and each rank keeps the rows of its own gates.
    """

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        import torch.distributed as dist

        world = dist.get_world_size(group)
        local = local.contiguous()
        sizes = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes, group=group)
        counts = [int(s.item()) for s in all_sizes]
        biggest = max(counts)
        padded = local.new_zeros((biggest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(pieces, padded, group=group)
        rank = dist.get_rank(group)
        ctx.group = group
        ctx.rows = (sum(counts[:rank]), sum(counts[: rank + 1]))
        return torch.cat([p[:n] for p, n in zip(pieces, counts)])

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        import torch.distributed as dist

        summed = grad_full.contiguous().clone()
        dist.all_reduce(summed, group=ctx.group)
        start, end = ctx.rows
        return summed[start:end], None


def gather_batch(gates: Tensor, process_group) -> Tensor:
    """All-gathers ``gates`` over ``process_group`` along the batch (differentiable, see above)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{OP}: process_group was given but torch.distributed has no initialised default group "
            "(call torch.distributed.init_process_group first, or pass process_group=None)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"{OP}: process_group must be a torch.distributed ProcessGroup, "
                        f"got {type(process_group).__name__}")
    return _GatherBatch.apply(gates, process_group)


# --- fake kernels and autograd, shared by the compiled variants (C++ and Triton) ---------------


def _fake_forward(gates, prior, prior_a, prior_b, reduction, pdf_lo, pdf_hi, eps):
    return (
        gates.new_empty(()),
        torch.empty(gates.shape, dtype=gates.dtype, device=gates.device),
    )


def register_variant(forward_op: str) -> None:
    """Registers the fake and the autograd of one compiled variant (schema as ``batch_shaping_loss``:
    ``(loss, grad_gates)``, grad_gates being d loss / d gates at each value's own batch row)."""

    def setup_context(ctx, inputs, output):
        _, grad_gates = output
        ctx.mark_non_differentiable(grad_gates)
        ctx.set_materialize_grads(False)  # no zero gradient for the non-differentiable output
        ctx.save_for_backward(grad_gates)

    def backward_formula(ctx, grad_loss, _grad_of_grad_gates):
        if grad_loss is None:  # not materialised (see setup_context): the loss got no gradient
            return None, None, None, None, None, None, None, None
        (grad_gates,) = ctx.saved_tensors
        return grad_loss.to(grad_gates.dtype) * grad_gates, None, None, None, None, None, None, None

    torch.library.register_fake(forward_op)(_fake_forward)
    torch.library.register_autograd(forward_op, backward_formula, setup_context=setup_context)


register_variant("condkernels::batch_shaping_loss")
