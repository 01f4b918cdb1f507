"""Channel-gated ResNets of the batch-shaping paper (ResNet-BAS), and the CIFAR ResNets they gate.

A gated block (paper eq. 4) is ``x' = relu(W2 * (G(x) . relu(BN(W1 * x))) + shortcut(x))``: a
:class:`~condkernels.nn.ChannelGate` reads the block input ``x`` and gates the channels between
the block's first and second convolution (in a bottleneck, the output of the 1x1 reduction, i.e.
the input of the 3x3). Both convolutions are :class:`~condkernels.nn.GatedConv2d`:

- the second one takes the gates as ``in_gate``: an example's closed channels are skipped;
- in eval mode the first one also takes them as ``out_gate``, so it does not compute the channels
  that the second one will skip. This is exact: those channels never reach the output (the second
  conv ignores closed input channels), and once :func:`~condkernels.optimize_for_inference` has
  folded BN into the conv, ``relu(g * (conv + b)) == g * relu(conv + b)`` for 0/1 gates. In training
  it is not done: BatchNorm's batch statistics would see the zeroed channels, and the
  straight-through gradient of a gate needs the ungated activation of its channel.

Builders: ``resnet18_bas``, ``resnet34_bas``, ``resnet50_bas`` (ImageNet, the stem, stages and head
of :class:`~condkernels.models.ResNet`) and ``resnet20/32/56`` with their ``_bas`` versions (CIFAR:
3x3 stem, three stages of 16/32/64 channels, option-A shortcuts as in He et al. 2016).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inference import fold_batchnorm_pairs, register_inference_rule
from ..nn.gated import ChannelGate, GatedConv2d
from ._common import init_classifier, init_weights
from .resnet import BasicBlock, ResNet

__all__ = [
    "CifarResNet", "GatedBasicBlock", "GatedBottleneck", "ShortcutA", "resnet18_bas", "resnet20", "resnet20_bas",
    "resnet32", "resnet32_bas", "resnet34_bas", "resnet50_bas", "resnet56", "resnet56_bas",
]


def _no_experts(block: str, num_experts: int, router) -> None:
    if num_experts or router is not None:
        raise ValueError(f"{block}: gated blocks take no CondConv experts or router (got num_experts={num_experts})")


class GatedBasicBlock(nn.Module):
    """Two 3x3 convolutions whose middle channels a :class:`ChannelGate` of the block input gates."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 num_experts: int = 0, router=None, *, gate_hidden: int = 16, tau: float = 2.0 / 3.0) -> None:
        super().__init__()
        _no_experts("GatedBasicBlock", num_experts, router)
        self.gate = ChannelGate(inplanes, planes, gate_hidden, tau)
        self.conv1 = GatedConv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = GatedConv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate(x)
        out = self.relu(self.bn1(self.conv1(x, None, None if self.training else gate)))
        out = self.bn2(self.conv2(out, gate))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class GatedBottleneck(nn.Module):
    """1x1 reduce -> gate -> 3x3 (stride, v1.5) -> 1x1 expand: the gate closes channels of the 1x1
    reduction's output, which the 3x3 then skips; the expansion stays a plain convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 num_experts: int = 0, router=None, *, gate_hidden: int = 16, tau: float = 2.0 / 3.0) -> None:
        super().__init__()
        _no_experts("GatedBottleneck", num_experts, router)
        self.gate = ChannelGate(inplanes, planes, gate_hidden, tau)
        self.conv1 = GatedConv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = GatedConv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate(x)
        out = self.relu(self.bn1(self.conv1(x, None, None if self.training else gate)))
        out = self.relu(self.bn2(self.conv2(out, gate)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class _GatedBlockFactory:
    """A block class with the gate options bound, usable where a block class is expected."""

    def __init__(self, block: type, **options) -> None:
        self.block, self.options, self.expansion = block, options, block.expansion

    def __call__(self, *args, **kwargs) -> nn.Module:
        return self.block(*args, **kwargs, **self.options)


class ShortcutA(nn.Module):
    """He et al.'s option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"ShortcutA: out_channels ({out_channels}) must be >= in_channels ({in_channels})")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


SHORTCUTS = ("A", "B")


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, sec. 4.2): 3x3 stem, three stages of ``layers[i]`` blocks with
    ``stage_planes`` (16, 32, 64) times ``width`` channels, global pool, classifier ``fc``.

    ``shortcut="A"`` (the paper's, parameter free: subsample + zero channels) or ``"B"`` (1x1
    projection + BN) where the shape changes. ``block`` is a block class as for
    :class:`~condkernels.models.ResNet` (plain :class:`BasicBlock` or :class:`GatedBasicBlock`).
    """

    def __init__(self, block, layers: Sequence[int], num_classes: int = 10, width: float = 1.0,
                 shortcut: str = "A", stage_planes: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"CifarResNet: shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        planes = _widths("CifarResNet", stage_planes, width)
        self.conv1 = nn.Conv2d(3, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = planes[0]
        for stage, (width_, blocks) in enumerate(zip(planes, layers)):
            stage_layers = []
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                out = width_ * block.expansion
                downsample = None
                if stride != 1 or inplanes != out:
                    downsample = (ShortcutA(inplanes, out, stride) if shortcut == "A" else
                                  nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)))
                stage_layers.append(block(inplanes, width_, stride, downsample))
                inplanes = out
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)
        init_weights(self)
        init_classifier(self.fc)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _widths(who: str, planes: Sequence[int], width: float) -> list[int]:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not (0 < width < math.inf):
        raise ValueError(f"{who}: width must be a positive number, got {width!r}")
    return [max(1, int(round(p * width))) for p in planes]


def _imagenet_bas(block: type, layers, num_classes, width, gate_hidden, tau) -> ResNet:
    planes = _widths("resnet_bas", (64, 128, 256, 512), width)
    return ResNet(_GatedBlockFactory(block, gate_hidden=gate_hidden, tau=tau), layers, num_classes,
                  stage_planes=planes)


def resnet18_bas(num_classes: int = 1000, width: float = 1.0, gate_hidden: int = 16, tau: float = 2.0 / 3.0) -> ResNet:
    """ResNet18-BAS: ResNet-18 with a ChannelGate in each of its 8 basic blocks."""
    return _imagenet_bas(GatedBasicBlock, (2, 2, 2, 2), num_classes, width, gate_hidden, tau)


def resnet34_bas(num_classes: int = 1000, width: float = 1.0, gate_hidden: int = 16, tau: float = 2.0 / 3.0) -> ResNet:
    """ResNet34-BAS: ResNet-34 with a ChannelGate in each of its 16 basic blocks."""
    return _imagenet_bas(GatedBasicBlock, (3, 4, 6, 3), num_classes, width, gate_hidden, tau)


def resnet50_bas(num_classes: int = 1000, width: float = 1.0, gate_hidden: int = 16, tau: float = 2.0 / 3.0) -> ResNet:
    """ResNet50-BAS: ResNet-50 (v1.5) with a ChannelGate on the middle channels of each of its 16 bottlenecks."""
    return _imagenet_bas(GatedBottleneck, (3, 4, 6, 3), num_classes, width, gate_hidden, tau)


def _cifar(depth: int, gated: bool, num_classes: int, width: float, shortcut: str, gate_hidden: int,
           tau: float) -> CifarResNet:
    n = (depth - 2) // 6
    block = _GatedBlockFactory(GatedBasicBlock, gate_hidden=gate_hidden, tau=tau) if gated else BasicBlock
    return CifarResNet(block, (n, n, n), num_classes, width, shortcut)


def resnet20(num_classes: int = 10, width: float = 1.0, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-20 (3 stages of 3 basic blocks, 0.27M parameters at width 1)."""
    return _cifar(20, False, num_classes, width, shortcut, 16, 2.0 / 3.0)


def resnet32(num_classes: int = 10, width: float = 1.0, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-32 (3 stages of 5 basic blocks)."""
    return _cifar(32, False, num_classes, width, shortcut, 16, 2.0 / 3.0)


def resnet56(num_classes: int = 10, width: float = 1.0, shortcut: str = "A") -> CifarResNet:
    """CIFAR ResNet-56 (3 stages of 9 basic blocks)."""
    return _cifar(56, False, num_classes, width, shortcut, 16, 2.0 / 3.0)


def resnet20_bas(num_classes: int = 10, width: float = 1.0, shortcut: str = "A", gate_hidden: int = 16,
                 tau: float = 2.0 / 3.0) -> CifarResNet:
    """ResNet20-BAS: CIFAR ResNet-20 with a ChannelGate in each block (``width`` widens every stage)."""
    return _cifar(20, True, num_classes, width, shortcut, gate_hidden, tau)


def resnet32_bas(num_classes: int = 10, width: float = 1.0, shortcut: str = "A", gate_hidden: int = 16,
                 tau: float = 2.0 / 3.0) -> CifarResNet:
    """ResNet32-BAS: CIFAR ResNet-32 with a ChannelGate in each block."""
    return _cifar(32, True, num_classes, width, shortcut, gate_hidden, tau)


def resnet56_bas(num_classes: int = 10, width: float = 1.0, shortcut: str = "A", gate_hidden: int = 16,
                 tau: float = 2.0 / 3.0) -> CifarResNet:
    """ResNet56-BAS: CIFAR ResNet-56 with a ChannelGate in each block."""
    return _cifar(56, True, num_classes, width, shortcut, gate_hidden, tau)


# BatchNorm folds into the gated convolutions as into plain ones (weight scaled, shift as bias).
register_inference_rule(GatedBasicBlock)(lambda m: fold_batchnorm_pairs(m, (("conv1", "bn1"), ("conv2", "bn2"))))
register_inference_rule(GatedBottleneck)(
    lambda m: fold_batchnorm_pairs(m, (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")))
)
register_inference_rule(CifarResNet)(lambda m: fold_batchnorm_pairs(m, (("conv1", "bn1"),)))
