"""Building blocks shared by the networks: a conv that may be CondConv, and conv -> norm -> activation."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

from .condconv import CondConv2d, RoutedSequential, Router


def make_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = False,
    num_experts: int = 0,
    router: Optional[Router] = None,
) -> nn.Module:
    """``nn.Conv2d`` when ``num_experts == 0``, else a :class:`CondConv2d` with that many experts,
    owning ``router`` when one is given and otherwise taking its routing from outside."""
    if num_experts == 0:
        if router is not None:
            raise ValueError("make_conv: a router was given for a plain convolution (num_experts=0)")
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias)
    conv = CondConv2d(
        in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias,
        num_experts=num_experts, router=False,
    )
    conv.router = router
    return conv


class ConvNormAct(RoutedSequential):
    """conv -> BatchNorm -> activation, with torchvision's ``Conv2dNormActivation`` child names
    (``0`` conv, ``1`` norm, ``2`` activation), so its state_dict keys match torchvision's."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        activation: Optional[Callable[..., nn.Module]] = nn.ReLU6,
        num_experts: int = 0,
        router: Optional[Router] = None,
    ) -> None:
        layers = [
            make_conv(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups,
                      num_experts=num_experts, router=router),
            nn.BatchNorm2d(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels
