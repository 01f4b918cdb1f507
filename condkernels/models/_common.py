"""What the CondConv networks share: where CondConv goes, how routers are made and shared, init."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..nn.condconv import (
    ROUTER_ACTIVATIONS, CondConv2d, RoutedSequential, Router, RouterHidden, router_hidden_size,
)
from ..nn.deepmoe import GateHead
from ..nn.gated import ChannelGate, GatedConv2d

ROUTER_SHARING = ("block", "partial", "single")


@dataclass(frozen=True)
class CondSpec:
    """Which layers of a network are CondConv and how their routing is computed.

    The layers of a network are numbered 1..L as in the CondConv paper (Table 7): 1 is the stem
    convolution, then every block in order, and L is the classifier. Layers ``begin``..L are CondConv
    (the classifier only when ``classifier`` is set). ``begin = L + 1`` gives the plain network.

    Routing (paper Table 6): ``router_sharing="block"`` gives every CondConv layer (block) its own
    router; ``"partial"`` one router for every other layer, the layer after it reusing its routing;
    ``"single"`` one router, at the first CondConv layer, for all of them.
    ``router_hidden``: ``None``, an int, or the paper's ``"small"`` (in/8), ``"medium"`` (in),
    ``"large"`` (8·in) hidden ReLU layer.
    """

    num_experts: int
    begin: int
    classifier: bool = True
    router_activation: str = "sigmoid"
    router_hidden: RouterHidden = None
    router_sharing: str = "block"
    router_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.num_experts <= 0:
            raise ValueError(f"num_experts must be positive, got {self.num_experts}")
        if self.begin < 1:
            raise ValueError(f"cond_begin must be >= 1 (1 is the stem), got {self.begin}")
        if self.router_activation not in ROUTER_ACTIVATIONS:
            raise ValueError(
                f"router_activation must be one of {ROUTER_ACTIVATIONS}, got {self.router_activation!r}"
            )
        if self.router_sharing not in ROUTER_SHARING:
            raise ValueError(f"router_sharing must be one of {ROUTER_SHARING}, got {self.router_sharing!r}")
        router_hidden_size(8, self.router_hidden)  # validates the value

    def plan(self, num_layers: int) -> list[tuple[int, bool]]:
        """For layers 1..num_layers: ``(num_experts or 0, owns_router)``."""
        plan, first = [], None
        for index in range(1, num_layers + 1):
            cond = index >= self.begin and (index < num_layers or self.classifier)
            if not cond:
                plan.append((0, False))
                continue
            if first is None:
                first, owns = index, True
            elif self.router_sharing == "block":
                owns = True
            elif self.router_sharing == "partial":
                owns = (index - first) % 2 == 0
            else:
                owns = False
            plan.append((self.num_experts, owns))
        return plan

    def make_router(self, in_channels: int) -> Router:
        return Router(
            in_channels, self.num_experts, self.router_activation,
            router_hidden_size(in_channels, self.router_hidden), self.router_temperature,
        )


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """torchvision's init, per expert for CondConv: He-normal (fan-out) convolutions (plain, CondConv
    and gated), unit BatchNorm, N(0, 0.01) linear layers. Routers and gate modules (ChannelGate,
    DeepMoE's GateHead) keep their own initialisation."""
    keeps_own = (Router, ChannelGate, GateHead)
    own_init = {id(m) for r in model.modules() if isinstance(r, keeps_own) for m in r.modules()}
    for m in model.modules():
        if id(m) in own_init:
            continue
        if isinstance(m, (nn.Conv2d, CondConv2d, GatedConv2d)):
            kh, kw = m.kernel_size
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.out_channels * kh * kw)))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@torch.no_grad()
def init_classifier(head: nn.Module) -> None:
    """N(0, 0.01) weights, zero bias: for a Linear or a 1x1 (Cond)Conv classifier."""
    nn.init.normal_(head.weight, 0.0, 0.01)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


def make_classifier(in_features: int, num_classes: int, dropout: float, num_experts: int,
                    router_owner: Optional[CondSpec]) -> nn.Module:
    """``Sequential(Dropout, Linear)`` on flat features (torchvision's layout), or for CondConv
    ``RoutedSequential(Dropout, 1x1 CondConv2d, Flatten)`` on ``(B, C, 1, 1)`` features, owning a
    router made by ``router_owner`` when that is given."""
    if num_experts == 0:
        head = nn.Linear(in_features, num_classes)
        init_classifier(head)
        return nn.Sequential(nn.Dropout(dropout), head)
    head = CondConv2d(in_features, num_classes, 1, bias=True, num_experts=num_experts, router=False)
    if router_owner is not None:
        head.router = router_owner.make_router(in_features)
    init_classifier(head)
    return RoutedSequential(nn.Dropout(dropout), head, nn.Flatten(1))


def classify(classifier: nn.Module, pooled: torch.Tensor, routing: Optional[torch.Tensor]) -> torch.Tensor:
    """Applies a classifier from :func:`make_classifier` to globally pooled ``(B, C, 1, 1)`` features."""
    if isinstance(classifier, RoutedSequential):
        return classifier(pooled, routing)
    return classifier(torch.flatten(pooled, 1))
