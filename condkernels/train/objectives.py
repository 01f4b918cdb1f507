"""Training objectives, one per network kind: what is added to the cross-entropy, how its weights
follow the schedules, which parameters escape weight decay, and what the gates report.

========  ===============================================================  ======================
kind      loss                                                             stages
========  ===============================================================  ======================
plain     cross-entropy                                                    one
cc        cross-entropy (CondConv routers learn from it alone)             one
bas       + batch-shaping (lambda annealed) + L0 (gamma warmed up)         one
deepmoe   + lambda * gate L1 + mu * embedding cross-entropy                joint, then fine-tune
                                                                           with frozen gates
========  ===============================================================  ======================
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ChannelGate, DeepMoELosses, GateLosses, freeze_gates
from ..utils import conditional_macs


class Objective:
    """Cross-entropy. Subclasses add terms (named in ``terms``) and stages.

    ``__call__(logits, target, epoch)`` returns ``(loss, {term: value})`` where ``loss`` is what is
    minimised and the values are the (already weighted) added terms, for the metrics. ``epoch`` is
    fractional (steps / steps per epoch).
    """

    kind = "plain"
    terms: tuple = ()
    find_unused_parameters = False

    def __init__(self, model: nn.Module, args, process_group=None) -> None:
        self.model = model

    def __call__(self, logits: Tensor, target: Tensor, epoch: float):
        return F.cross_entropy(logits, target), {}

    def stage(self, epoch: int) -> str:
        """``"train"``, or ``"finetune"`` for DeepMoE's last epochs."""
        return "train"

    def enter_stage(self, stage: str) -> None:
        """Called when training (or a resumed run) enters ``stage``, before its first step."""

    def no_weight_decay(self) -> set:
        """Ids of parameters trained without weight decay."""
        return set()

    def density(self) -> Optional[float]:
        """Mean open fraction of the gates in the last forward, or None without gates."""
        return None

    def macs(self, model: nn.Module, images: Tensor) -> Optional[float]:
        """Multiply-adds per example of the last forward on ``images``, or None if not measurable
        here (the trainer then uses the static count)."""
        return None


class CondConvObjective(Objective):
    kind = "cc"


class BatchShapingObjective(Objective):
    """Cross-entropy + batch-shaping loss + L0 gate loss with their schedules
    (``condkernels.nn.GateLosses``); the batch-shaping loss is taken over the global batch when
    a process group is given. The gating modules get no weight decay (the paper)."""

    kind = "bas"
    terms = ("batch_shaping", "l0")

    def __init__(self, model: nn.Module, args, process_group=None) -> None:
        super().__init__(model, args, process_group)
        kwargs = dict(bs_initial=args.bs_lambda, bs_anneal_epochs=args.bs_anneal_epochs,
                      l0_start_epoch=args.l0_start_epoch, l0_full_epoch=args.l0_full_epoch,
                      process_group=process_group)
        if args.l0_gamma is not None:
            kwargs["l0_gamma"] = args.l0_gamma
        self.collector = GateLosses(model, **kwargs)

    def __call__(self, logits, target, epoch):
        ce = F.cross_entropy(logits, target)
        terms = self.collector(epoch)
        return ce + sum(terms.values()), terms

    def no_weight_decay(self) -> set:
        return {id(p) for m in self.model.modules() if isinstance(m, ChannelGate) for p in m.parameters()}

    def density(self):
        return self.collector.density()

    def macs(self, model, images):
        return float(conditional_macs(model, images))


class DeepMoEObjective(Objective):
    """Cross-entropy + lambda * gate L1 + mu * embedding cross-entropy
    (``condkernels.nn.DeepMoELosses``); for the last ``--finetune-epochs`` the embedding network
    and gates are frozen and lambda = mu = 0 (the paper's Procedure 1)."""

    kind = "deepmoe"
    terms = ("gate_l1", "embedding_ce")

    def __init__(self, model: nn.Module, args, process_group=None) -> None:
        super().__init__(model, args, process_group)
        kwargs = {}
        if args.moe_lambda is not None:
            kwargs["lam"] = args.moe_lambda
        if args.moe_mu is not None:
            kwargs["mu"] = args.moe_mu
        self.collector = DeepMoELosses(model, **kwargs)
        self.finetune_from = args.epochs - args.finetune_epochs
        self.finetuning = False

    def __call__(self, logits, target, epoch):
        ce = F.cross_entropy(logits, target)
        terms = self.collector(target)
        if self.finetuning:
            return ce, {name: torch.zeros_like(ce) for name in self.terms}
        return ce + sum(terms.values()), terms

    def stage(self, epoch: int) -> str:
        return "finetune" if epoch >= self.finetune_from else "train"

    def enter_stage(self, stage: str) -> None:
        if stage == "finetune" and not self.finetuning:
            freeze_gates(self.model)
            self.finetuning = True

    def density(self):
        return self.collector.density()

    def macs(self, model, images):
        return float(conditional_macs(model, images))


OBJECTIVES = {cls.kind: cls for cls in (Objective, CondConvObjective, BatchShapingObjective, DeepMoEObjective)}


def make_objective(kind: str, model: nn.Module, args, process_group=None) -> Objective:
    """The objective of a network ``kind`` (``plain``, ``cc``, ``bas``, ``deepmoe``)."""
    if kind not in OBJECTIVES:
        raise ValueError(f"make_objective: kind must be one of {tuple(OBJECTIVES)}, got {kind!r}")
    return OBJECTIVES[kind](model, args, process_group)
