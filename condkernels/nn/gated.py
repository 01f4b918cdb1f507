"""Channel-gated convolution module.

``GatedConv2d`` is a drop-in for :class:`torch.nn.Conv2d` whose forward also takes per-example
channel gates; ``condkernels.gated_conv2d`` skips each example's closed channels (gate exactly 0).
The gates come from outside: a batch-shaping ``ChannelGate`` or DeepMoE's ReLU gates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops import gated_conv2d
from ..ops._conv_args import IntOrPair, Padding, conv_module_args


class GatedConv2d(nn.Module):
    """``y = out_gate * (conv2d(in_gate * x, weight) + bias)``, closed channels skipped per example.

    ``forward(x, in_gate=None, out_gate=None)``: gates ``(B, in_channels)`` / ``(B, out_channels)``
    broadcast over H and W; a missing gate is all ones (then this is exactly ``nn.Conv2d``).
    Parameters have ``nn.Conv2d``'s shapes and initialisation, so a Conv2d state_dict loads as it is.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        geometry = conv_module_args("GatedConv2d", in_channels, out_channels, kernel_size, stride, padding,
                                    dilation, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size, self.stride = geometry["kernel_size"], geometry["stride"]
        self.padding, self.dilation = geometry["padding"], geometry["dilation"]
        self.groups = groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, so gated and plain networks start alike.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, in_gate: Optional[Tensor] = None, out_gate: Optional[Tensor] = None) -> Tensor:
        return gated_conv2d(
            x, self.weight, self.bias, in_gate, out_gate,
            self.stride, self.padding, self.dilation, self.groups,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding!r}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s
