"""DeepMoE networks (Wang et al., "Deep Mixture of Experts via Shallow Embedding"): ResNets and VGG-16
whose convolutions have their input channels scaled by per-example ReLU gates computed from a shallow
embedding of the image.

Which convolutions are gated. The paper shows its residual blocks only in a figure (Fig. 2: basic
block, bottleneck-A, bottleneck-B; the widened layers drawn in blue). Here the channels *inside* a
block are gated and, in the wide variant, doubled; the residual stream keeps its width:

- basic block: ``conv1`` (x -> mid) -> BN -> ReLU -> gate -> ``conv2`` (mid -> planes);
- bottleneck-A: both inner widths ``mid``, gates on the inputs of ``conv2`` (3x3) and ``conv3``;
- bottleneck-B: only ``conv1``'s output is widened and gated (the input of the 3x3 ``conv2``).
  It has 30·p² block weights against A's 52·p² (p = planes); with it a wide ResNet-50 has 41.7M
  parameters, the paper's "6% less parameters than ResNet-101" (44.5M).
- VGG-16: a gate after every convolution, i.e. on the inputs of convolutions 2..13 (wide: all 13
  convolutions doubled, the paper's W13-All).

``wide=True`` doubles the gated channels (wide-DeepMoE); ``wide=False`` keeps the base network's
widths (narrow-DeepMoE). ``forward(x)`` returns the class logits; the embedding network keeps its
own logits (``model.embedding.last_logits``) for :class:`~condkernels.nn.DeepMoELosses`.

After :func:`condkernels.optimize_for_inference` (BatchNorm folded), each gate also closes the
output channels of the convolution that produces the gated channels: ``g · ReLU(z) = ReLU(g · z)``
for ``g >= 0``, so that convolution gets ``out_gate = g`` and the gated one ``in_gate = (g != 0)``;
a closed channel is then skipped in both, and a wide network at half density costs about what the
narrow one does.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..inference import fold_batchnorm, register_inference_rule
from ..nn.deepmoe import GateHead, ShallowEmbedding, gate_heads
from ..nn.gated import GatedConv2d
from ._common import init_weights

__all__ = [
    "DeepMoEBasicBlock", "DeepMoEBottleneck", "DeepMoEResNet", "DeepMoEVGG", "deepmoe_resnet18",
    "deepmoe_resnet34", "deepmoe_resnet50", "deepmoe_resnet56", "deepmoe_resnet110", "deepmoe_vgg16",
]


def _open(g: Tensor) -> Tensor:
    """0/1 mask of the open entries of ``g``: the in_gate of a convolution whose input is already gated."""
    return (g != 0).to(g.dtype)


def _check_positive(builder: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{builder}: {name} must be a positive int, got {value!r}")


class DeepMoEBasicBlock(nn.Module):
    """Basic residual block with its inner channels (``conv1``'s output, ``conv2``'s input) gated;
    ``wide`` doubles them."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 embed_dim: int, wide: bool = False) -> None:
        super().__init__()
        mid = planes * (2 if wide else 1)
        self.conv1 = nn.Conv2d(inplanes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu = nn.ReLU(inplace=True)
        self.gate2 = GateHead(embed_dim, mid)
        self.conv2 = GatedConv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.gates_at_producer = False  # set by optimize_for_inference once the BatchNorms are folded

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        g2 = self.gate2(e)
        if self.gates_at_producer:
            out = self.relu(self.conv1(x, None, g2))
            out = self.conv2(out, _open(g2))
        else:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.conv2(out, g2)
        out = self.bn2(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class DeepMoEBottleneck(nn.Module):
    """Bottleneck (1x1 -> 3x3 with the stride, v1.5 -> 1x1) with gated inner channels.

    ``variant="A"``: both inner widths gated (inputs of ``conv2`` and ``conv3``) and, when wide,
    doubled. ``variant="B"``: only ``conv1``'s output (``conv2``'s input) gated and doubled.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 embed_dim: int, wide: bool = False, variant: str = "A") -> None:
        super().__init__()
        if variant not in ("A", "B"):
            raise ValueError(f"DeepMoEBottleneck: variant must be 'A' or 'B', got {variant!r}")
        factor = 2 if wide else 1
        mid1 = planes * factor
        mid2 = planes * factor if variant == "A" else planes
        self.variant = variant
        self.conv1 = nn.Conv2d(inplanes, mid1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid1)
        self.gate2 = GateHead(embed_dim, mid1)
        self.conv2 = GatedConv2d(mid1, mid2, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid2)
        if variant == "A":
            self.gate3 = GateHead(embed_dim, mid2)
            self.conv3 = GatedConv2d(mid2, planes * self.expansion, 1, bias=False)
        else:
            self.gate3 = None
            self.conv3 = nn.Conv2d(mid2, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.gates_at_producer = False

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        g2 = self.gate2(e)
        g3 = self.gate3(e) if self.gate3 is not None else None
        if self.gates_at_producer:
            out = self.relu(self.conv1(x, None, g2))
            out = self.relu(self.conv2(out, _open(g2), g3))
            out = self.conv3(out, _open(g3)) if g3 is not None else self.conv3(out)
        else:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out, g2)))
            out = self.conv3(out, g3) if g3 is not None else self.conv3(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _number_heads(model: nn.Module) -> None:
    # Distinct indices give the heads distinct forced-density masks.
    for index, head in enumerate(gate_heads(model)):
        head.index = index


class DeepMoEResNet(nn.Module):
    """A ResNet whose blocks take the embedding: ``embedding`` (:class:`ShallowEmbedding`), stem,
    stages ``layer1..`` of DeepMoE blocks, global pooling, ``fc``.

    ``cifar=True``: the CIFAR ResNet of He et al. (3x3 stem, no max-pool, three stages of basic
    blocks at 16/32/64 channels); else the ImageNet one (7x7 stride-2 stem and max-pool). A change of
    shape on the shortcut is a 1x1 convolution + BatchNorm.
    """

    def __init__(self, block: type, layers: Sequence[int], num_classes: int, stage_planes: Sequence[int],
                 cifar: bool, wide: bool = False, embed_layers: int = 4, embed_width: int = 32,
                 **block_kwargs) -> None:
        super().__init__()
        self.embedding = ShallowEmbedding(num_classes, embed_layers, embed_width)
        embed_dim = self.embedding.embed_dim
        stem = stage_planes[0]
        if cifar:
            self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        inplanes = stem
        self.num_stages = len(stage_planes)
        for stage, (planes, blocks) in enumerate(zip(stage_planes, layers)):
            stage_blocks = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                out = planes * block.expansion
                downsample = None
                if stride != 1 or inplanes != out:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
                stage_blocks.append(block(inplanes, planes, stride, downsample, embed_dim, wide, **block_kwargs))
                inplanes = out
            setattr(self, f"layer{stage + 1}", nn.ModuleList(stage_blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self)
        _number_heads(self)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embedding(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.num_stages + 1):
            for block in getattr(self, f"layer{stage}"):
                x = block(x, e)
        return self.fc(torch.flatten(self.avgpool(x), 1))


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class DeepMoEVGGLayer(nn.Module):
    """One VGG convolution: [gate] -> 3x3 conv -> BN -> ReLU [-> 2x2 max-pool]."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, gated: bool, pool: bool) -> None:
        super().__init__()
        self.gate = GateHead(embed_dim, in_channels) if gated else None
        conv = GatedConv2d if gated else nn.Conv2d
        self.conv = conv(in_channels, out_channels, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        x = self.conv(x, self.gate(e)) if self.gate is not None else self.conv(x)
        return self.pool(self.relu(self.bn(x)))


class DeepMoEVGG(nn.Module):
    """VGG-16 with BatchNorm for 32x32 inputs (CIFAR): 13 gated-input convolutions (all but the first
    gated), global pooling, one linear classifier on the last ``512·k`` features."""

    def __init__(self, num_classes: int = 100, wide: bool = False, base_width: int = 64,
                 embed_layers: int = 4, embed_width: int = 32) -> None:
        super().__init__()
        self.embedding = ShallowEmbedding(num_classes, embed_layers, embed_width)
        factor = (2 if wide else 1) * base_width / 64
        layers, channels = [], 3
        for i, item in enumerate(VGG16_CFG):
            if item == "M":
                continue
            out = int(item * factor)
            pool = i + 1 < len(VGG16_CFG) and VGG16_CFG[i + 1] == "M"
            layers.append(DeepMoEVGGLayer(channels, out, self.embedding.embed_dim, gated=bool(layers), pool=pool))
            channels = out
        self.features = nn.ModuleList(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.gates_at_producer = False
        init_weights(self)
        _number_heads(self)

    def forward(self, x: Tensor) -> Tensor:
        e = self.embedding(x)
        if self.gates_at_producer:
            gates = [layer.gate(e) if layer.gate is not None else None for layer in self.features] + [None]
            for layer, g, g_next in zip(self.features, gates, gates[1:]):
                x = layer.conv(x, None if g is None else _open(g), g_next)
                x = layer.pool(layer.relu(x))
        else:
            for layer in self.features:
                x = layer(x, e)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


# --- builders ------------------------------------------------------------------------------------


def _imagenet_resnet(name: str, block, layers, num_classes: int, wide: bool, base_width: int,
                     embed_layers: int, embed_width: int, **block_kwargs) -> DeepMoEResNet:
    _check_positive(name, num_classes=num_classes, base_width=base_width, embed_layers=embed_layers,
                    embed_width=embed_width)
    planes = tuple(base_width * m for m in (1, 2, 4, 8))
    return DeepMoEResNet(block, layers, num_classes, planes, cifar=False, wide=wide,
                         embed_layers=embed_layers, embed_width=embed_width, **block_kwargs)


def _cifar_resnet(name: str, depth: int, num_classes: int, wide: bool, base_width: int,
                  embed_layers: int, embed_width: int) -> DeepMoEResNet:
    _check_positive(name, num_classes=num_classes, base_width=base_width, embed_layers=embed_layers,
                    embed_width=embed_width)
    n = (depth - 2) // 6
    planes = tuple(base_width * m for m in (1, 2, 4))
    return DeepMoEResNet(DeepMoEBasicBlock, (n, n, n), num_classes, planes, cifar=True, wide=wide,
                         embed_layers=embed_layers, embed_width=embed_width)


def deepmoe_resnet18(num_classes: int = 1000, wide: bool = False, *, base_width: int = 64,
                     embed_layers: int = 5, embed_width: int = 16) -> DeepMoEResNet:
    """DeepMoE ResNet-18 for ImageNet (basic blocks, gated inner channels; paper Table 1)."""
    return _imagenet_resnet("deepmoe_resnet18", DeepMoEBasicBlock, (2, 2, 2, 2), num_classes, wide, base_width,
                            embed_layers, embed_width)


def deepmoe_resnet34(num_classes: int = 1000, wide: bool = False, *, base_width: int = 64,
                     embed_layers: int = 5, embed_width: int = 16) -> DeepMoEResNet:
    """DeepMoE ResNet-34 for ImageNet (basic blocks, gated inner channels; paper Table 1)."""
    return _imagenet_resnet("deepmoe_resnet34", DeepMoEBasicBlock, (3, 4, 6, 3), num_classes, wide, base_width,
                            embed_layers, embed_width)


def deepmoe_resnet50(num_classes: int = 1000, wide: bool = False, *, bottleneck: str = "A", base_width: int = 64,
                     embed_layers: int = 5, embed_width: int = 16) -> DeepMoEResNet:
    """DeepMoE ResNet-50 for ImageNet with bottleneck-A (the paper's Table 1/3 network) or the
    lighter bottleneck-B (``bottleneck="B"``)."""
    if bottleneck not in ("A", "B"):
        raise ValueError(f"deepmoe_resnet50: bottleneck must be 'A' or 'B', got {bottleneck!r}")
    block = functools.partial(DeepMoEBottleneck, variant=bottleneck)
    block.expansion = DeepMoEBottleneck.expansion
    return _imagenet_resnet("deepmoe_resnet50", block, (3, 4, 6, 3), num_classes, wide, base_width,
                            embed_layers, embed_width)


def deepmoe_resnet56(num_classes: int = 10, wide: bool = False, *, base_width: int = 16,
                     embed_layers: int = 4, embed_width: int = 32) -> DeepMoEResNet:
    """DeepMoE ResNet-56 for CIFAR (9 basic blocks per stage; paper Table 2)."""
    return _cifar_resnet("deepmoe_resnet56", 56, num_classes, wide, base_width, embed_layers, embed_width)


def deepmoe_resnet110(num_classes: int = 10, wide: bool = False, *, base_width: int = 16,
                      embed_layers: int = 4, embed_width: int = 32) -> DeepMoEResNet:
    """DeepMoE ResNet-110 for CIFAR (18 basic blocks per stage; paper Table 2)."""
    return _cifar_resnet("deepmoe_resnet110", 110, num_classes, wide, base_width, embed_layers, embed_width)


def deepmoe_vgg16(num_classes: int = 100, wide: bool = False, *, base_width: int = 64,
                  embed_layers: int = 4, embed_width: int = 32) -> DeepMoEVGG:
    """DeepMoE VGG-16 (with BatchNorm) for CIFAR, as in the paper's Fig. 3a and Table 4."""
    _check_positive("deepmoe_vgg16", num_classes=num_classes, base_width=base_width, embed_layers=embed_layers,
                    embed_width=embed_width)
    return DeepMoEVGG(num_classes, wide, base_width, embed_layers, embed_width)


# --- optimize_for_inference ----------------------------------------------------------------------


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, (nn.Conv2d, GatedConv2d))
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _as_gated(conv: nn.Module) -> GatedConv2d:
    """A GatedConv2d computing what ``conv`` (an nn.Conv2d) does, sharing nothing with it."""
    if isinstance(conv, GatedConv2d):
        return conv
    gated = GatedConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=conv.bias is not None,
                        device=conv.weight.device, dtype=conv.weight.dtype)
    gated.weight.copy_(conv.weight)
    if conv.bias is not None:
        gated.bias.copy_(conv.bias)
    return gated


@torch.no_grad()
def _fold_pairs(module: nn.Module, pairs) -> bool:
    """Folds every ``(conv, bn)`` attribute pair; True when all of them were folded."""
    if not all(_foldable(getattr(module, c), getattr(module, b)) for c, b in pairs):
        return False
    for conv_name, bn_name in pairs:
        fold_batchnorm(getattr(module, conv_name), getattr(module, bn_name))
        setattr(module, bn_name, nn.Identity())
    return True


@register_inference_rule(DeepMoEBasicBlock)
@torch.no_grad()
def _optimize_basic_block(block: DeepMoEBasicBlock) -> None:
    if _fold_pairs(block, (("conv1", "bn1"), ("conv2", "bn2"))):
        block.conv1 = _as_gated(block.conv1)
        block.gates_at_producer = True


@register_inference_rule(DeepMoEBottleneck)
@torch.no_grad()
def _optimize_bottleneck(block: DeepMoEBottleneck) -> None:
    if _fold_pairs(block, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))):
        block.conv1 = _as_gated(block.conv1)
        block.gates_at_producer = True


@register_inference_rule(DeepMoEResNet)
def _optimize_resnet(model: DeepMoEResNet) -> None:
    _fold_pairs(model, (("conv1", "bn1"),))


@register_inference_rule(DeepMoEVGG)
@torch.no_grad()
def _optimize_vgg(model: DeepMoEVGG) -> None:
    if all(_foldable(layer.conv, layer.bn) for layer in model.features):
        for layer in model.features:
            _fold_pairs(layer, (("conv", "bn"),))
            layer.conv = _as_gated(layer.conv)
        model.gates_at_producer = True
