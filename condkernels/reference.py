"""Pure-PyTorch formulations of every op: the test oracles and the ``backend="reference"`` path.

They are written the naive way on purpose (the mixture of E convolutions, the dense masked
convolution) so that they share no code with the kernels they check.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops._conv_args import memory_format_of


def pad_input(x: Tensor, padding: Sequence[int]) -> Tensor:
    """Applies padding ``(h_begin, h_end, w_begin, w_end)`` explicitly (it may be asymmetric)."""
    h0, h1, w0, w1 = padding
    return F.pad(x, (w0, w1, h0, h1)) if any(padding) else x


def cond_conv2d(
    x: Tensor,
    routing: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """The mixture of experts ``sum_e routing[:, e] * (weight[e] * x + bias[e])``: E convolutions,
    run as one convolution with the E experts stacked along the output channels of each group."""
    experts, cout, cin_g, kh, kw = weight.shape
    batch = x.shape[0]
    # (E, g, Cout/g, ...) -> (g, E, Cout/g, ...): every group's output channels stay contiguous.
    stacked = weight.reshape(experts, groups, cout // groups, cin_g, kh, kw).transpose(0, 1)
    y = F.conv2d(
        pad_input(x, padding), stacked.reshape(groups * experts * (cout // groups), cin_g, kh, kw),
        None, tuple(stride), 0, tuple(dilation), groups,
    )
    y = y.reshape(batch, groups, experts, cout // groups, *y.shape[-2:])
    y = torch.einsum("bgeoij,be->bgoij", y, routing).reshape(batch, cout, *y.shape[-2:])
    if bias is not None:
        y = y + (routing @ bias)[:, :, None, None]
    return y.contiguous(memory_format=memory_format_of(x))


def gated_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    in_gate: Optional[Tensor],
    out_gate: Optional[Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """The dense masked formulation ``out_gate * (conv2d(in_gate * x, weight) + bias)``: every
    channel of every example is computed and closed ones are multiplied by their zero gate."""
    if in_gate is not None:
        x = x * in_gate[:, :, None, None]
    y = F.conv2d(pad_input(x, padding), weight, bias, tuple(stride), 0, tuple(dilation), groups)
    if out_gate is not None:
        y = y * out_gate[:, :, None, None]
    return y.contiguous(memory_format=memory_format_of(x))
