"""The networks of the papers, as torchvision-style builders."""

from ._common import CondSpec
from .deepmoe import (
    DeepMoEBasicBlock, DeepMoEBottleneck, DeepMoEResNet, DeepMoEVGG, deepmoe_resnet18, deepmoe_resnet34,
    deepmoe_resnet50, deepmoe_resnet56, deepmoe_resnet110, deepmoe_vgg16,
)
from .mobilenet import (
    InvertedResidual, MobileNetV1, MobileNetV2, SeparableBlock, cc_mobilenet_v1, cc_mobilenet_v2,
    mobilenet_v1, mobilenet_v2,
)
from .gated_resnet import (
    CifarResNet, GatedBasicBlock, GatedBottleneck, ShortcutA, resnet18_bas, resnet20, resnet20_bas, resnet32,
    resnet32_bas, resnet34_bas, resnet50_bas, resnet56, resnet56_bas,
)
from .resnet import BasicBlock, Bottleneck, ResNet, cc_resnet50, resnet18, resnet34, resnet50

__all__ = [
    # CondConv paper: MobileNetV1/V2, ResNet-50 and their CondConv versions
    "BasicBlock", "Bottleneck", "CondSpec", "InvertedResidual", "MobileNetV1", "MobileNetV2", "ResNet",
    "SeparableBlock", "cc_mobilenet_v1", "cc_mobilenet_v2", "cc_resnet50", "mobilenet_v1", "mobilenet_v2",
    "resnet18", "resnet34", "resnet50",
    # batch-shaping paper: channel-gated ResNets and the CIFAR ResNets
    "CifarResNet", "GatedBasicBlock", "GatedBottleneck", "ShortcutA", "resnet18_bas", "resnet20", "resnet20_bas",
    "resnet32", "resnet32_bas", "resnet34_bas", "resnet50_bas", "resnet56", "resnet56_bas",
    # DeepMoE
    "DeepMoEBasicBlock", "DeepMoEBottleneck", "DeepMoEResNet", "DeepMoEVGG", "deepmoe_resnet18", "deepmoe_resnet34",
    "deepmoe_resnet50", "deepmoe_resnet56", "deepmoe_resnet110", "deepmoe_vgg16",
]
