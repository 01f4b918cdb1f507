"""ResNets (He et al. 2016, torchvision's v1.5 layout and module names) and CC-ResNet-50.

:class:`ResNet` takes its block class, so other block kinds (e.g. gated blocks) plug into the same
stem, stages and head. A block class is built as ``block(inplanes, planes, stride, downsample,
num_experts=..., router=...)``, has an ``expansion`` attribute and a ``forward(x, routing=None)``.

Layers are numbered as in the CondConv paper's Table 7: 1 is the stem convolution, then every
residual block in order, and the last one is the classifier; ``cond_begin`` is the first CondConv layer.
"""

from __future__ import annotations

from typing import Optional, Sequence, Type

import torch
from torch import Tensor, nn

from ..nn.blocks import make_conv
from ..nn.condconv import CondConv2d, RoutedModule, RoutedSequential, Router, RouterHidden, call_layer, routed_step
from ..inference import fold_batchnorm_pairs, register_inference_rule
from ._common import CondSpec, init_classifier, init_weights

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34", "resnet50", "cc_resnet50"]


class BasicBlock(RoutedModule):
    """Two 3x3 convolutions with an identity (or projected) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 num_experts: int = 0, router: Optional[Router] = None) -> None:
        super().__init__()
        self.conv1 = make_conv(inplanes, planes, 3, stride, 1, num_experts=num_experts)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = make_conv(planes, planes, 3, 1, 1, num_experts=num_experts)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.router = router

    def forward(self, x: Tensor, routing: Optional[Tensor] = None) -> Tensor:
        routing = self.resolve_routing(x, routing)
        out = self.relu(self.bn1(call_layer(self.conv1, x, routing)))
        out = self.bn2(call_layer(self.conv2, out, routing))
        identity = x if self.downsample is None else call_layer(self.downsample, x, routing)
        return self.relu(out + identity)


class Bottleneck(RoutedModule):
    """1x1 reduce -> 3x3 (carrying the stride, ResNet v1.5) -> 1x1 expand, plus the shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 num_experts: int = 0, router: Optional[Router] = None) -> None:
        super().__init__()
        self.conv1 = make_conv(inplanes, planes, 1, num_experts=num_experts)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = make_conv(planes, planes, 3, stride, 1, num_experts=num_experts)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = make_conv(planes, planes * self.expansion, 1, num_experts=num_experts)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.router = router

    def forward(self, x: Tensor, routing: Optional[Tensor] = None) -> Tensor:
        routing = self.resolve_routing(x, routing)
        out = self.relu(self.bn1(call_layer(self.conv1, x, routing)))
        out = self.relu(self.bn2(call_layer(self.conv2, out, routing)))
        out = self.bn3(call_layer(self.conv3, out, routing))
        identity = x if self.downsample is None else call_layer(self.downsample, x, routing)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7 stem + max-pool, four stages of ``block``, global pool, classifier.

    ``cond`` makes layers CondConv (see :class:`~condkernels.models.CondSpec`); a CondConv block's
    projection shortcut stays a plain convolution unless ``cond_shortcut`` is set. The classifier is
    ``fc``: an ``nn.Linear``, or a 1x1 CondConv2d applied to the pooled ``(B, C, 1, 1)`` features.
    """

    def __init__(
        self,
        block: Type[nn.Module],
        layers: Sequence[int],
        num_classes: int = 1000,
        dropout: float = 0.0,
        cond: Optional[CondSpec] = None,
        cond_shortcut: bool = False,
        zero_init_residual: bool = False,
        stage_planes: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        self.num_layers = 2 + sum(layers)
        plan = cond.plan(self.num_layers) if cond is not None else [(0, False)] * self.num_layers
        routers = [cond.make_router if owns else None for _, owns in plan]

        experts, make_router = plan[0][0], routers[0]
        self.conv1 = make_conv(3, stage_planes[0], 7, 2, 3, num_experts=experts,
                               router=make_router(3) if make_router else None)
        self.bn1 = nn.BatchNorm2d(stage_planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.inplanes = stage_planes[0]
        index = 1
        for stage, (planes, blocks) in enumerate(zip(stage_planes, layers)):
            stride = 1 if stage == 0 else 2
            stage_layers = []
            for i in range(blocks):
                experts, make_router = plan[index][0], routers[index]
                stage_layers.append(self._make_block(
                    block, planes, stride if i == 0 else 1, experts,
                    make_router(self.inplanes) if make_router else None, cond_shortcut,
                ))
                index += 1
            setattr(self, f"layer{stage + 1}", RoutedSequential(*stage_layers))

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        init_weights(self)
        experts, make_router = plan[-1][0], routers[-1]
        if experts:
            self.fc = CondConv2d(self.inplanes, num_classes, 1, num_experts=experts, router=False)
            self.fc.router = make_router(self.inplanes) if make_router else None
        else:
            self.fc = nn.Linear(self.inplanes, num_classes)
        init_classifier(self.fc)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_block(self, block, planes: int, stride: int, num_experts: int, router: Optional[Router],
                    cond_shortcut: bool) -> nn.Module:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = RoutedSequential(
                make_conv(self.inplanes, out, 1, stride, num_experts=num_experts if cond_shortcut else 0),
                nn.BatchNorm2d(out),
            )
        layer = block(self.inplanes, planes, stride, downsample, num_experts=num_experts, router=router)
        self.inplanes = out
        return layer

    def forward(self, x: Tensor) -> Tensor:
        x, routing = routed_step(self.conv1, x, None)
        x = self.maxpool(self.relu(self.bn1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, routing = stage.forward_routed(x, routing)
        x = self.dropout(self.avgpool(x))
        if isinstance(self.fc, CondConv2d):
            x, _ = routed_step(self.fc, x, routing)
            return torch.flatten(x, 1)
        return self.fc(torch.flatten(x, 1))


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 1000, dropout: float = 0.0) -> ResNet:
    """ResNet-50 (v1.5: the stride on the 3x3 convolution), torchvision's module names."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, dropout)


def cc_resnet50(
    num_experts: int = 8,
    num_classes: int = 1000,
    dropout: float = 0.0,
    *,
    cond_begin: int = 15,
    cond_classifier: bool = True,
    cond_shortcut: bool = False,
    router_activation: str = "sigmoid",
    router_hidden: RouterHidden = None,
    router_sharing: str = "block",
    router_temperature: float = 1.0,
) -> ResNet:
    """CC-ResNet-50: the final three bottleneck blocks (layers 15..17, all three convolutions, one
    router per block) and the classifier are CondConv. Layer 1 is the stem, 2..17 the blocks,
    18 the classifier. ``cond_shortcut`` also makes the projection shortcut CondConv."""
    cond = CondSpec(num_experts, cond_begin, cond_classifier, router_activation, router_hidden,
                    router_sharing, router_temperature)
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, dropout, cond=cond, cond_shortcut=cond_shortcut)


register_inference_rule(BasicBlock)(lambda m: fold_batchnorm_pairs(m, (("conv1", "bn1"), ("conv2", "bn2"))))
register_inference_rule(Bottleneck)(
    lambda m: fold_batchnorm_pairs(m, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")))
)
register_inference_rule(ResNet)(lambda m: fold_batchnorm_pairs(m, (("conv1", "bn1"),)))
