"""Binary-concrete gates, the L0 gate loss and the loss-weight schedules of the batch-shaping paper.

Training a channel-gated network (Bejnordi et al.): the gate module's logits go through
:func:`binary_concrete_gate` (hard 0/1 forward, sigmoid(./tau) backward); the batch-shaping loss and
the L0 loss see the soft probabilities :func:`gate_probability`; the batch-shaping weight follows
:func:`batch_shaping_lambda` (0.75 annealed to 0), then the L0 weight :func:`l0_gamma` warms up.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

L0_REDUCTIONS = ("mean_over_batch", "sum")


def binary_concrete_gate(
    logits: Tensor,
    tau: float = 2.0 / 3.0,
    hard: bool = True,
    training: bool = True,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Binary-concrete (Gumbel-sigmoid) gate.

    Training: ``s = sigmoid((logits + log(u) - log(1 - u)) / tau)`` with ``u ~ U(0, 1)``; with
    ``hard=True`` the forward value is ``1[s > 0.5]`` (0 or 1) and the backward is that of ``s``
    (straight-through). Inference (``training=False``): no noise, ``1[logits > 0]`` when hard,
    ``sigmoid(logits / tau)`` otherwise.

    Args:
        logits: gate logits ``ln(pi)``, any shape, floating point.
        tau: temperature, positive (the paper uses 2/3).
        hard: whether the forward value is the 0/1 gate.
        training: whether to sample (training) or decide deterministically (inference).
        generator: optional random generator for the noise.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"binary_concrete_gate: logits must be a floating point tensor, got {_what(logits)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"binary_concrete_gate: tau must be a positive number, got {tau!r}")
    if not training:
        return (logits > 0).to(logits.dtype) if hard else torch.sigmoid(logits / tau)
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
    tiny = torch.finfo(logits.dtype).tiny
    noise = torch.log(u.clamp_min(tiny)) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / tau)
    if not hard:
        return soft
    hard_gate = (soft > 0.5).to(logits.dtype)
    return hard_gate + (soft - soft.detach())


def gate_probability(logits: Tensor) -> Tensor:
    """``sigmoid(logits)``: the probability that a gate is open. This soft value -- not the hard
    0/1 gate -- is what :func:`condkernels.batch_shaping_loss` and :func:`l0_gate_loss` expect."""
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"gate_probability: logits must be a floating point tensor, got {_what(logits)}")
    return torch.sigmoid(logits)


def l0_gate_loss(logits: Tensor, gamma: float, reduction: str = "mean_over_batch") -> Tensor:
    r"""L0 gate loss ``gamma * sum sigmoid(logits)`` (eq. 5): the expected number of open gates.

    Args:
        logits: ``(N, ...)`` gate logits, batch first.
        gamma: non-negative weight (see :func:`l0_gamma` for its schedule).
        reduction: ``"mean_over_batch"`` divides by N (expected open gates per example);
            ``"sum"`` sums over the batch too.
    """
    if not isinstance(logits, Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(f"l0_gate_loss: logits must be a floating point tensor, got {_what(logits)}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"l0_gate_loss: gamma must be a non-negative number, got {gamma!r}")
    if reduction not in L0_REDUCTIONS:
        raise ValueError(f"l0_gate_loss: reduction must be one of {L0_REDUCTIONS}, got {reduction!r}")
    total = torch.sigmoid(logits).sum()
    if reduction == "mean_over_batch":
        if logits.dim() < 1 or logits.shape[0] < 1:
            raise ValueError("l0_gate_loss: logits must hold at least 1 example for 'mean_over_batch', "
                             f"got shape {tuple(logits.shape)}")
        total = total / logits.shape[0]
    return gamma * total


def batch_shaping_lambda(epoch: float, anneal_epochs: float, initial: float = 0.75) -> float:
    """Batch-shaping weight: ``initial`` at epoch 0, linearly down to 0 at ``anneal_epochs``, then 0.

    The paper anneals 0.75 to 0 by epoch 100 (CIFAR-10) or 20 (ImageNet). ``epoch`` may be
    fractional (iteration / iterations_per_epoch).
    """
    _check_epoch("batch_shaping_lambda", epoch)
    if not anneal_epochs > 0:
        raise ValueError(f"batch_shaping_lambda: anneal_epochs must be positive, got {anneal_epochs!r}")
    if not initial >= 0:
        raise ValueError(f"batch_shaping_lambda: initial must be non-negative, got {initial!r}")
    return initial * max(0.0, 1.0 - epoch / anneal_epochs)


def l0_gamma(epoch: float, gamma: float, start_epoch: float, full_epoch: float) -> float:
    """L0 weight: 0 before ``start_epoch``, rising linearly to ``gamma`` at ``full_epoch``, then
    ``gamma`` (the paper: from epoch 100 to 300 on CIFAR-10, 30 to 60 on ImageNet)."""
    _check_epoch("l0_gamma", epoch)
    if not gamma >= 0:
        raise ValueError(f"l0_gamma: gamma must be non-negative, got {gamma!r}")
    if not full_epoch >= start_epoch:
        raise ValueError(f"l0_gamma: full_epoch ({full_epoch}) must not come before start_epoch ({start_epoch})")
    if epoch < start_epoch:
        return 0.0
    if epoch >= full_epoch:
        return float(gamma)
    return gamma * (epoch - start_epoch) / (full_epoch - start_epoch)


def _check_epoch(fn: str, epoch) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not (epoch >= 0 and math.isfinite(epoch)):
        raise ValueError(f"{fn}: epoch must be a non-negative number, got {epoch!r}")


def _what(t) -> str:
    return f"{t.dtype}" if isinstance(t, Tensor) else type(t).__name__
