"""What each op is measured against, written with the op's own signature.

The same functions time the single ops and, swapped in for the op inside a network
(:class:`ops_replaced`), the models. Every one is a complete formulation that gives the op's result:

- ``naive``: the formulation of the public code -- the mixture of E convolutions for CondConv, the
  dense convolution times a mask for gating (``condkernels.reference``).
- ``grouped``: timm's trick -- per-example weights, the batch folded into the groups of one conv.
- ``loop``: per-example weights, one convolution per example (for gating: only the example's open
  channels, the batch-shaping paper's CPU method).
- ``static``: the plain convolution of the same shape with one kernel and no gates, the cost
  that conditional computation sets out to match.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import condkernels
from condkernels.ops._conv_args import normalize_conv_args
from condkernels.reference import pad_input


def _padded(op: str, x: Tensor, weight: Tensor, stride, padding, dilation):
    """x padded explicitly (SAME may be asymmetric), and stride and dilation as tuples."""
    stride2, pad4, dilation2 = normalize_conv_args(op, x.shape[-2:], weight.shape[-2:], stride, padding, dilation)
    return pad_input(x, pad4), tuple(stride2), tuple(dilation2)


def own_backends(device: torch.device) -> list[str]:
    """condkernels' backends that can run on ``device``: "cpu" on the CPU; "cuda" (when compiled)
    and "triton" (when installed) on a GPU."""
    if device.type == "cpu":
        return ["cpu"]
    backends = []
    if condkernels.cuda_built():
        backends.append("cuda")
    if condkernels._library.triton_available():
        backends.append("triton")
    return backends


# --- cond_conv2d -----------------------------------------------------------------------------------


def cond_naive(x, routing, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """The mixture of E convolutions (condkernels.reference)."""
    return condkernels.cond_conv2d(x, routing, weight, bias, stride, padding, dilation, groups, backend="reference")


def _mixed(routing: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Per-example kernels and biases, ``routing @ experts`` as one GEMM (timm's mixing)."""
    experts = weight.shape[0]
    mixed = (routing @ weight.reshape(experts, -1)).view(routing.shape[0], *weight.shape[1:])
    return mixed, (routing @ bias if bias is not None else None)


def cond_grouped(x, routing, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """timm's CondConv2d: mix with one GEMM, fold the batch into the groups, one convolution."""
    xp, s, d = _padded("cond_conv2d", x, weight, stride, padding, dilation)
    batch, cout = x.shape[0], weight.shape[1]
    mixed, mixed_bias = _mixed(routing, weight, bias)
    y = F.conv2d(xp.reshape(1, -1, *xp.shape[-2:]), mixed.reshape(batch * cout, *weight.shape[2:]),
                 None if mixed_bias is None else mixed_bias.reshape(-1), s, 0, d, groups * batch)
    return y.view(batch, cout, *y.shape[-2:])


def cond_loop(x, routing, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """Per-example mixed kernels, one convolution per example."""
    xp, s, d = _padded("cond_conv2d", x, weight, stride, padding, dilation)
    mixed, mixed_bias = _mixed(routing, weight, bias)
    return torch.cat([
        F.conv2d(xp[b : b + 1], mixed[b], None if mixed_bias is None else mixed_bias[b], s, 0, d, groups)
        for b in range(x.shape[0])
    ])


def cond_static(x, routing, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """The convolution of the same shape with expert 0 alone (no routing)."""
    xp, s, d = _padded("cond_conv2d", x, weight, stride, padding, dilation)
    return F.conv2d(xp, weight[0], None if bias is None else bias[0], s, 0, d, groups)


# --- gated_conv2d ----------------------------------------------------------------------------------


def gated_naive(x, weight, bias=None, in_gate=None, out_gate=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """The dense convolution times the masks (condkernels.reference)."""
    return condkernels.gated_conv2d(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups,
                                    backend="reference")


def _gated_weights(weight, bias, in_gate, out_gate, batch, groups):
    """Per-example kernels ``(B, Cout, Cin/g, kh, kw)`` with the closed channels zeroed."""
    cout, cin_g = weight.shape[:2]
    w = weight.expand(batch, *weight.shape)
    if in_gate is not None:  # input channel j of group q is channel q * cin_g + j
        gin = in_gate.view(batch, groups, 1, cin_g).expand(batch, groups, cout // groups, cin_g)
        w = w * gin.reshape(batch, cout, cin_g, 1, 1)
    b = None if bias is None else bias.expand(batch, cout)
    if out_gate is not None:
        w = w * out_gate.view(batch, cout, 1, 1, 1)
        b = None if b is None else b * out_gate
    return w, b


def gated_grouped(x, weight, bias=None, in_gate=None, out_gate=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """timm's trick applied to gating: per-example masked kernels, the batch folded into the groups."""
    xp, s, d = _padded("gated_conv2d", x, weight, stride, padding, dilation)
    batch, cout = x.shape[0], weight.shape[0]
    w, b = _gated_weights(weight, bias, in_gate, out_gate, batch, groups)
    y = F.conv2d(xp.reshape(1, -1, *xp.shape[-2:]), w.reshape(batch * cout, *weight.shape[1:]),
                 None if b is None else b.reshape(-1), s, 0, d, groups * batch)
    return y.view(batch, cout, *y.shape[-2:])


def gated_loop(x, weight, bias=None, in_gate=None, out_gate=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """One convolution per example on its open channels only, scattered back (the batch-shaping
    paper's CPU method); with groups > 1, per-example masked kernels instead of slices."""
    xp, s, d = _padded("gated_conv2d", x, weight, stride, padding, dilation)
    batch, cout = x.shape[0], weight.shape[0]
    if groups != 1:
        w, b = _gated_weights(weight, bias, in_gate, out_gate, batch, groups)
        return torch.cat([F.conv2d(xp[i : i + 1], w[i], None if b is None else b[i], s, 0, d, groups)
                          for i in range(batch)])
    outs = []
    for i in range(batch):
        xb, wb = xp[i : i + 1], weight
        if in_gate is not None:
            idx = in_gate[i].nonzero().squeeze(1)
            xb, wb = xb[:, idx] * in_gate[i, idx][None, :, None, None], wb[:, idx]
        odx = out_gate[i].nonzero().squeeze(1) if out_gate is not None else None
        if odx is not None:
            wb = wb[odx]
        yb = F.conv2d(xb, wb, None, s, 0, d)
        if bias is not None:
            yb = yb + (bias if odx is None else bias[odx])[None, :, None, None]
        if odx is not None:
            full = yb.new_zeros(1, cout, *yb.shape[-2:])
            full[:, odx] = yb * out_gate[i, odx][None, :, None, None]
            yb = full
        outs.append(yb)
    return torch.cat(outs)


def gated_static(x, weight, bias=None, in_gate=None, out_gate=None, stride=1, padding=0, dilation=1, groups=1, **_):
    """The convolution of the same shape without gates."""
    xp, s, d = _padded("gated_conv2d", x, weight, stride, padding, dilation)
    return F.conv2d(xp, weight, bias, s, 0, d, groups)


COND = {"naive": cond_naive, "grouped": cond_grouped, "loop": cond_loop, "static": cond_static}
GATED = {"naive": gated_naive, "grouped": gated_grouped, "loop": gated_loop, "static": gated_static}


class ops_replaced:
    """Context manager: inside it, the model layer (condkernels.nn, condkernels.models) calls
    ``cond`` / ``gated`` where it would call ``condkernels.cond_conv2d`` / ``gated_conv2d``.

    The modules holding the ops are found once, at construction, so entering is cheap enough to
    wrap every timed call.
    """

    OPS = {"cond_conv2d": condkernels.cond_conv2d, "gated_conv2d": condkernels.gated_conv2d}

    def __init__(self, cond=None, gated=None):
        wanted = {"cond_conv2d": cond, "gated_conv2d": gated}
        self.swaps = []
        for name, module in list(sys.modules.items()):
            if module is None or not name.startswith(("condkernels.nn", "condkernels.models")):
                continue
            for attr, fn in wanted.items():
                if fn is not None and getattr(module, attr, None) is self.OPS[attr]:
                    self.swaps.append((module, attr, fn))

    def __enter__(self):
        for module, attr, fn in self.swaps:
            setattr(module, attr, fn)
        return self

    def __exit__(self, *exc):
        for module, attr, _ in self.swaps:
            setattr(module, attr, self.OPS[attr])
        return False


def with_backend(op, backend: str):
    """``op`` with its ``backend=`` keyword fixed."""

    def call(*args, **kwargs):
        return op(*args, **kwargs, backend=backend)

    call.__name__ = f"{op.__name__}[{backend}]"
    return call
