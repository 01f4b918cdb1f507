"""MobileNetV1, MobileNetV2 and their CondConv versions (CC-MobileNetV1/V2 of the CondConv paper).

Layers are numbered as in the paper's Table 7: 1 is the stem convolution, then every block in order,
then (MobileNetV2) the final 1x1 convolution, and last the classifier. ``cond_begin`` is the first
CondConv layer. MobileNetV2 keeps torchvision's module names, so its state_dict keys match.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..nn.blocks import ConvNormAct, make_conv
from ..nn.condconv import RoutedModule, RoutedSequential, Router, RouterHidden
from ._common import CondSpec, classify, init_weights, make_classifier

__all__ = [
    "MobileNetV1", "MobileNetV2", "SeparableBlock", "InvertedResidual",
    "mobilenet_v1", "cc_mobilenet_v1", "mobilenet_v2", "cc_mobilenet_v2",
]

# (out_channels, stride) of MobileNetV1's 13 depthwise-separable blocks at width 1.0.
MOBILENET_V1_BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# (expansion, out_channels, repeats, first stride) of MobileNetV2's inverted residual stages.
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
COND_LAYERS = ("all", "pointwise", "depthwise")


def _plan(cond: Optional[CondSpec], num_layers: int) -> list[tuple[int, Optional[CondSpec]]]:
    """Per layer: ``(num_experts, spec if the layer owns a router else None)``."""
    if cond is None:
        return [(0, None)] * num_layers
    return [(experts, cond if owns else None) for experts, owns in cond.plan(num_layers)]


def _router(owner: Optional[CondSpec], in_channels: int) -> Optional[Router]:
    return owner.make_router(in_channels) if owner is not None else None


class SeparableBlock(RoutedModule):
    """Depthwise 3x3 -> BN -> ReLU6 -> pointwise 1x1 -> BN -> ReLU6; one router (computed from the
    block input) serves both convolutions when they are CondConv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, depthwise_experts: int = 0,
                 pointwise_experts: int = 0, router: Optional[Router] = None) -> None:
        super().__init__()
        self.depthwise = ConvNormAct(in_channels, in_channels, 3, stride, groups=in_channels,
                                     num_experts=depthwise_experts)
        self.pointwise = ConvNormAct(in_channels, out_channels, 1, num_experts=pointwise_experts)
        self.router = router

    def forward(self, x: Tensor, routing: Optional[Tensor] = None) -> Tensor:
        routing = self.resolve_routing(x, routing)
        return self.pointwise(self.depthwise(x, routing), routing)


class MobileNetV1(nn.Module):
    """MobileNetV1 (Howard et al. 2017); layers 1..15: stem, 13 separable blocks, classifier."""

    num_layers = 15

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.0,
                 cond: Optional[CondSpec] = None, cond_layers: str = "all", min_channels: int = 8) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if cond_layers not in COND_LAYERS:
            raise ValueError(f"cond_layers must be one of {COND_LAYERS}, got {cond_layers!r}")
        plan = _plan(cond, self.num_layers)

        def channels(c: int) -> int:
            return max(int(c * width_mult), min_channels)

        experts, owner = plan[0]
        in_ch = channels(32)
        layers = [ConvNormAct(3, in_ch, 3, 2, num_experts=experts, router=_router(owner, 3))]
        for (out, stride), (experts, owner) in zip(MOBILENET_V1_BLOCKS, plan[1:-1]):
            out = channels(out)
            layers.append(SeparableBlock(
                in_ch, out, stride,
                depthwise_experts=experts if cond_layers != "pointwise" else 0,
                pointwise_experts=experts if cond_layers != "depthwise" else 0,
                router=_router(owner, in_ch),
            ))
            in_ch = out
        self.features = RoutedSequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        init_weights(self)
        experts, owner = plan[-1]
        self.classifier = make_classifier(in_ch, num_classes, dropout, experts, owner)

    def forward(self, x: Tensor) -> Tensor:
        x, routing = self.features.forward_routed(x)
        return classify(self.classifier, self.avgpool(x), routing)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` to ``value``, at least ``divisor``, never below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class InvertedResidual(RoutedModule):
    """MobileNetV2 block: 1x1 expand -> depthwise 3x3 -> 1x1 linear projection (+ identity when the
    shape allows). One router (computed from the block input) serves all three convolutions."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int,
                 num_experts: int = 0, router: Optional[Router] = None) -> None:
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers = []
        if expand_ratio != 1:
            layers.append(ConvNormAct(in_channels, hidden, 1, num_experts=num_experts))
        layers += [
            ConvNormAct(hidden, hidden, 3, stride, groups=hidden, num_experts=num_experts),
            make_conv(hidden, out_channels, 1, num_experts=num_experts),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = RoutedSequential(*layers)
        self.out_channels = out_channels
        self.router = router

    def forward(self, x: Tensor, routing: Optional[Tensor] = None) -> Tensor:
        y = self.conv(x, self.resolve_routing(x, routing))
        return x + y if self.use_res_connect else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018); layers 1..20: stem, 17 inverted residual blocks, the final
    1x1 convolution, classifier."""

    num_layers = 20

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2,
                 cond: Optional[CondSpec] = None) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        plan = _plan(cond, self.num_layers)
        in_ch = make_divisible(32 * width_mult)
        last_ch = make_divisible(1280 * max(1.0, width_mult))
        experts, owner = plan[0]
        layers = [ConvNormAct(3, in_ch, 3, 2, num_experts=experts, router=_router(owner, 3))]
        block_plan = iter(plan[1:-2])
        for t, c, n, s in MOBILENET_V2_STAGES:
            out = make_divisible(c * width_mult)
            for i in range(n):
                experts, owner = next(block_plan)
                layers.append(InvertedResidual(in_ch, out, s if i == 0 else 1, t, experts, _router(owner, in_ch)))
                in_ch = out
        experts, owner = plan[-2]
        layers.append(ConvNormAct(in_ch, last_ch, 1, num_experts=experts, router=_router(owner, in_ch)))
        self.features = RoutedSequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        init_weights(self)
        experts, owner = plan[-1]
        self.classifier = make_classifier(last_ch, num_classes, dropout, experts, owner)

    def forward(self, x: Tensor) -> Tensor:
        x, routing = self.features.forward_routed(x)
        return classify(self.classifier, self.avgpool(x), routing)


def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.0) -> MobileNetV1:
    """MobileNetV1 at width multiplier ``width_mult``."""
    return MobileNetV1(width_mult, num_classes, dropout)


def cc_mobilenet_v1(
    width_mult: float = 1.0,
    num_experts: int = 8,
    num_classes: int = 1000,
    dropout: float = 0.0,
    *,
    cond_begin: int = 7,
    cond_classifier: bool = True,
    cond_layers: str = "all",
    router_activation: str = "sigmoid",
    router_hidden: RouterHidden = None,
    router_sharing: str = "block",
    router_temperature: float = 1.0,
) -> MobileNetV1:
    """CC-MobileNetV1: the final 8 separable blocks (layers 7..14) and the classifier are CondConv,
    one router per block shared by its depthwise and pointwise convolutions.

    Ablations of the paper: ``cond_begin`` (Table 7; 1 = the stem, 15 = the classifier only),
    ``cond_classifier`` (Table 8), ``cond_layers`` = ``"all"``, ``"pointwise"`` or ``"depthwise"``
    (Table 5), ``router_activation`` / ``router_hidden`` / ``router_sharing`` (Table 6; see
    :class:`~condkernels.models.CondSpec`).
    """
    cond = CondSpec(num_experts, cond_begin, cond_classifier, router_activation, router_hidden,
                    router_sharing, router_temperature)
    return MobileNetV1(width_mult, num_classes, dropout, cond=cond, cond_layers=cond_layers)


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 at width multiplier ``width_mult`` (torchvision's channel rounding and names)."""
    return MobileNetV2(width_mult, num_classes, dropout)


def cc_mobilenet_v2(
    width_mult: float = 1.0,
    num_experts: int = 8,
    num_classes: int = 1000,
    dropout: float = 0.2,
    *,
    cond_begin: int = 13,
    cond_classifier: bool = True,
    router_activation: str = "sigmoid",
    router_hidden: RouterHidden = None,
    router_sharing: str = "block",
    router_temperature: float = 1.0,
) -> MobileNetV2:
    """CC-MobileNetV2: the last 6 inverted residual blocks (layers 13..18, all three convolutions,
    one router per block), the final 1x1 convolution and the classifier are CondConv."""
    cond = CondSpec(num_experts, cond_begin, cond_classifier, router_activation, router_hidden,
                    router_sharing, router_temperature)
    return MobileNetV2(width_mult, num_classes, dropout, cond=cond)
