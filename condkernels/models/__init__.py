"""The networks of the papers, as torchvision-style builders."""

from ._common import CondSpec
from .mobilenet import (
    InvertedResidual, MobileNetV1, MobileNetV2, SeparableBlock, cc_mobilenet_v1, cc_mobilenet_v2,
    mobilenet_v1, mobilenet_v2,
)
from .resnet import BasicBlock, Bottleneck, ResNet, cc_resnet50, resnet18, resnet34, resnet50

__all__ = [
    "BasicBlock", "Bottleneck", "CondSpec", "InvertedResidual", "MobileNetV1", "MobileNetV2", "ResNet",
    "SeparableBlock", "cc_mobilenet_v1", "cc_mobilenet_v2", "cc_resnet50", "mobilenet_v1", "mobilenet_v2",
    "resnet18", "resnet34", "resnet50",
]
