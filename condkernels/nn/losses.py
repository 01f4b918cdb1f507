"""The training losses of channel-gated networks: batch-shaping and L0, on their schedules.

:class:`GateLosses` collects every :class:`~condkernels.nn.ChannelGate` of a model and, after a
forward pass, turns what the gates recorded into the two weighted losses of the batch-shaping paper.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..gates import batch_shaping_lambda, l0_gamma, l0_gate_loss
from ..ops import batch_shaping_loss
from .gated import ChannelGate

# The paper sweeps gamma over {0, 1, 2, 5, 10, 15, 20} * 1e-2 on CIFAR-10 (to 40e-2 on ImageNet)
# and names no single value; 0.02 is one point of that sweep.
DEFAULT_L0_GAMMA = 0.02


class GateLosses:
    """``losses = GateLosses(model)(epoch)`` after a forward pass of ``model``.

    Returns ``{"batch_shaping": lambda(epoch) * sum_gates batch_shaping_loss(p),
    "l0": gamma(epoch) * L0}``: 0-d tensors with gradients into the gate modules, computed from the
    soft probabilities ``p = sigmoid(logits)`` that every ChannelGate recorded in the last forward.

    - Batch-shaping (eq. 2, ``reduction="paper"``, Beta(``alpha``, ``beta``) prior): each gate's values
      sorted over the batch; summed over every gate of every ChannelGate. With ``process_group`` the
      gate values of all ranks are gathered first, so the loss is that of the global batch.
    - L0 (eq. 5): ``sum over all gates of sigmoid(logits)``, averaged over the batch (the expected
      number of open gates per example).
    - Schedules: ``lambda`` = ``bs_initial`` annealed linearly to 0 at ``bs_anneal_epochs``
      (:func:`~condkernels.batch_shaping_lambda`); ``gamma`` 0 until ``l0_start_epoch``, rising
      linearly to ``l0_gamma`` at ``l0_full_epoch`` (:func:`~condkernels.l0_gamma`). The defaults are
      the paper's CIFAR-10 ones; on ImageNet it uses 20 epochs of annealing and 30 -> 60 for L0.

    ``epoch`` may be fractional (iteration / iterations per epoch). A loss whose weight is 0 is a
    zero that still carries the (zero) gradient, so every rank of a distributed run takes the same
    path. :meth:`density` is the open fraction of the last forward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        bs_initial: float = 0.75,
        bs_anneal_epochs: float = 100.0,
        l0_gamma: float = DEFAULT_L0_GAMMA,
        l0_start_epoch: float = 100.0,
        l0_full_epoch: float = 300.0,
        process_group=None,
        alpha: float = 0.6,
        beta: float = 0.4,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GateLosses: model must be an nn.Module, got {type(model).__name__}")
        self.gates = [m for m in model.modules() if isinstance(m, ChannelGate)]
        if not self.gates:
            raise ValueError("GateLosses: model has no ChannelGate modules")
        for name, v in (("bs_initial", bs_initial), ("bs_anneal_epochs", bs_anneal_epochs), ("l0_gamma", l0_gamma),
                        ("l0_start_epoch", l0_start_epoch), ("l0_full_epoch", l0_full_epoch),
                        ("alpha", alpha), ("beta", beta)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"GateLosses: {name} must be a finite number, got {v!r}")
        self.bs_initial = float(bs_initial)
        self.bs_anneal_epochs = float(bs_anneal_epochs)
        self.l0_gamma = float(l0_gamma)
        self.l0_start_epoch = float(l0_start_epoch)
        self.l0_full_epoch = float(l0_full_epoch)
        self.process_group = process_group
        self.alpha = float(alpha)
        self.beta = float(beta)
        # Validate the schedules once, here, rather than at the first training step.
        self.weights(0.0)

    def weights(self, epoch: float) -> tuple[float, float]:
        """``(lambda, gamma)`` at ``epoch``."""
        lam = batch_shaping_lambda(epoch, self.bs_anneal_epochs, self.bs_initial)
        gamma = l0_gamma(epoch, self.l0_gamma, self.l0_start_epoch, self.l0_full_epoch)
        return lam, gamma

    def _recorded(self) -> tuple[Tensor, Tensor]:
        missing = [i for i, g in enumerate(self.gates) if g.last_logits is None]
        if missing:
            raise RuntimeError("GateLosses: run a forward pass of the model before asking for the losses")
        logits = torch.cat([g.last_logits for g in self.gates], dim=1)
        probability = torch.cat([g.last_probability for g in self.gates], dim=1)
        return logits, probability

    def __call__(self, epoch: float) -> dict[str, Tensor]:
        lam, gamma = self.weights(epoch)
        logits, probability = self._recorded()
        # One call over all gates: the "paper" reduction sums over gates, so this is the sum of the
        # per-module losses, in one kernel launch (and one all-gather).
        if lam > 0:
            bs = lam * batch_shaping_loss(probability, self.alpha, self.beta, process_group=self.process_group)
        else:
            bs = probability.sum() * 0.0
        l0 = l0_gate_loss(logits, gamma, "mean_over_batch") if gamma > 0 else logits.sum() * 0.0
        return {"batch_shaping": bs, "l0": l0}

    def density(self) -> float:
        """Fraction of all gates (every gate of every ChannelGate, every example) open in the last forward."""
        if any(g.last_open_fraction is None for g in self.gates):
            raise RuntimeError("GateLosses: run a forward pass of the model before asking for the density")
        fractions = torch.stack([g.last_open_fraction.double() for g in self.gates])
        sizes = torch.tensor([g.gated_channels for g in self.gates], dtype=torch.float64, device=fractions.device)
        return float((fractions * sizes).sum() / sizes.sum())  # one device sync
