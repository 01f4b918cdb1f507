"""Pure-PyTorch formulations of every op: the test oracles and the ``backend="reference"`` path.

They are written the naive way on purpose (the mixture of E convolutions, the dense masked
convolution) so that they share no code with the kernels they check.
"""

from __future__ import annotations

import math
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


def beta_cdf(x: Tensor, a: Tensor, b: Tensor, terms: int = 120) -> Tensor:
    """I_x(a, b) by a plain Lentz continued fraction with a fixed number of terms, in float64."""
    x, a, b = torch.broadcast_tensors(x, a, b)
    xd, ad, bd = x.double(), a.double(), b.double()
    inside = (xd > 0) & (xd < 1)
    xc = torch.where(inside, xd, torch.full_like(xd, 0.5))
    flip = xc > (ad + 1) / (ad + bd + 2)
    xs, as_, bs = torch.where(flip, 1 - xc, xc), torch.where(flip, bd, ad), torch.where(flip, ad, bd)
    tiny = 1e-300
    f, c, d = torch.ones_like(xs), torch.ones_like(xs), torch.zeros_like(xs)
    for k in range(1, 2 * terms + 1):
        m = k // 2
        if k % 2:
            term = -(as_ + m) * (as_ + bs + m) * xs / ((as_ + 2 * m) * (as_ + 2 * m + 1))
        else:
            term = m * (bs - m) * xs / ((as_ + 2 * m - 1) * (as_ + 2 * m))
        d = 1 + term * d
        d = torch.where(d.abs() < tiny, torch.full_like(d, tiny), d)
        c = 1 + term / c
        c = torch.where(c.abs() < tiny, torch.full_like(c, tiny), c)
        d = 1 / d
        f = f * c * d
    log_beta = torch.lgamma(ad) + torch.lgamma(bd) - torch.lgamma(ad + bd)
    tail = torch.exp(ad * torch.log(xc) + bd * torch.log1p(-xc) - log_beta) / (as_ * f)
    y = torch.where(flip, 1 - tail, tail)
    y = torch.where(xd <= 0, torch.zeros_like(y), torch.where(xd >= 1, torch.ones_like(y), y))
    y = torch.where(torch.isnan(xd) | ~((ad > 0) & (bd > 0)), torch.full_like(y, float("nan")), y)
    return y.to(x.dtype)


def _prior_cdf_pdf(x: Tensor, prior: str, p0: float, p1: float):
    if prior == "beta":
        a, b = torch.tensor(p0, dtype=x.dtype), torch.tensor(p1, dtype=x.dtype)
        log_beta = math.lgamma(p0) + math.lgamma(p1) - math.lgamma(p0 + p1)
        pdf = torch.exp((p0 - 1) * torch.log(x) + (p1 - 1) * torch.log1p(-x) - log_beta)
        return beta_cdf(x, a, b), pdf
    if prior == "gaussian":
        z = (x - p0) / p1
        return torch.special.ndtr(z), torch.exp(-0.5 * z * z) / (p1 * math.sqrt(2 * math.pi))
    inside = (x >= p0) & (x <= p1)
    pdf = torch.where(inside, torch.full_like(x, 1 / (p1 - p0)), torch.zeros_like(x))
    return ((x - p0) / (p1 - p0)).clamp(0, 1), torch.where(torch.isnan(x), x, pdf)


class _BatchShapingReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gates, prior, p0, p1, reduction, pdf_lo, pdf_hi, eps):
        n = gates.shape[0]
        g = gates.reshape(n, -1).double()
        values, order = torch.sort(g, dim=0, stable=True)
        if prior == "beta":
            values = values.clamp(eps, 1 - eps)
        cdf, pdf = _prior_cdf_pdf(values, prior, p0, p1)
        target = torch.arange(1, n + 1, dtype=torch.float64)[:, None] / (n + 1)
        scale = {"paper": 1 / n, "sum": 1.0, "mean": 1 / (n * g.shape[1])}[reduction]
        loss = scale * ((target - cdf) ** 2).sum()
        grad_sorted = -2 * scale * (target - cdf) * pdf.clamp(pdf_lo, pdf_hi)
        ctx.save_for_backward(torch.zeros_like(g).scatter(0, order, grad_sorted).reshape(gates.shape))
        return loss.to(gates.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad_loss * grad).to(grad_loss.dtype), None, None, None, None, None, None, None


def batch_shaping_loss(gates: Tensor, prior: str, p0: float, p1: float, reduction: str,
                       pdf_lo: float, pdf_hi: float, eps: float) -> Tensor:
    """Eq. 2 per gate column with torch.sort and scatter; the backward uses the clipped density."""
    return _BatchShapingReference.apply(gates, prior, p0, p1, reduction, pdf_lo, pdf_hi, eps)
