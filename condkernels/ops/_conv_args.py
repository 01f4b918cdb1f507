"""Argument normalisation shared by the convolution ops (cond_conv2d, gated_conv2d)."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

IntOrPair = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]


def pair(value: IntOrPair, name: str) -> list[int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, torch.SymInt):
        return [value, value]
    try:
        values = list(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(values) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return values


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow SAME padding of one dimension: output = ceil(size / stride), the odd pixel at the end."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def normalize_conv_args(
    op: str,
    input_hw: Sequence[int],
    kernel_hw: Sequence[int],
    stride: IntOrPair,
    padding: Padding,
    dilation: IntOrPair,
) -> tuple[list[int], list[int], list[int]]:
    """Returns ``stride (2), padding (h_begin, h_end, w_begin, w_end), dilation (2)`` for the kernels."""
    if kernel_hw[0] <= 0 or kernel_hw[1] <= 0:
        raise ValueError(f"{op}: weight's kernel must be at least 1x1, got {kernel_hw[0]}x{kernel_hw[1]}")
    stride2 = pair(stride, f"{op}: stride")
    dilation2 = pair(dilation, f"{op}: dilation")
    if any(s <= 0 for s in stride2):
        raise ValueError(f"{op}: stride must be positive, got {stride!r}")
    if any(d <= 0 for d in dilation2):
        raise ValueError(f"{op}: dilation must be positive, got {dilation!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pad4 = [0, 0, 0, 0]
        elif padding == "same":
            pad4 = [
                *same_padding(input_hw[0], kernel_hw[0], stride2[0], dilation2[0]),
                *same_padding(input_hw[1], kernel_hw[1], stride2[1], dilation2[1]),
            ]
        else:
            raise ValueError(f"{op}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    else:
        ph, pw = pair(padding, f"{op}: padding")
        if ph < 0 or pw < 0:
            raise ValueError(f"{op}: padding must be non-negative, got {padding!r}")
        pad4 = [ph, ph, pw, pw]
    return stride2, pad4, dilation2


def conv_out_size(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> int:
    """Mirror of ``conv_out_size`` in csrc/common/conv_geometry.h."""
    span = dilation * (kernel - 1) + 1
    padded = size + pad_begin + pad_end
    return 0 if padded < span else (padded - span) // stride + 1


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels write their output in: channels_last in, channels_last out."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def check_geometry(op: str, x: torch.Tensor, weight: torch.Tensor, stride, pad4, dilation) -> tuple[int, int]:
    """Output size, or an error when the dilated kernel is larger than the padded input."""
    (h, w), (kh, kw) = x.shape[-2:], weight.shape[-2:]
    out_h = conv_out_size(h, kh, stride[0], pad4[0], pad4[1], dilation[0])
    out_w = conv_out_size(w, kw, stride[1], pad4[2], pad4[3], dilation[1])
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"{op}: the kernel {kh}x{kw} (dilation {dilation}) is larger than the padded input "
            f"{h + pad4[0] + pad4[1]}x{w + pad4[2] + pad4[3]}"
        )
    return out_h, out_w


def shape_of(t) -> str:
    """How an argument that should be a tensor looks, for error messages."""
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def conv_module_args(module: str, in_channels: int, out_channels: int, kernel_size: IntOrPair,
                     stride: IntOrPair, padding: Padding, dilation: IntOrPair, groups: int) -> dict:
    """Checks and normalises the geometry arguments of a convolution module's constructor.

    Returns ``kernel_size``, ``stride``, ``dilation`` as tuples and ``padding`` as a tuple or the
    string ``"same"`` / ``"valid"``; errors name ``module`` and the argument.
    """
    if in_channels <= 0 or out_channels <= 0:
        raise ValueError(
            f"{module}: in_channels and out_channels must be positive, got {in_channels}, {out_channels}"
        )
    if groups <= 0 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{module}: groups ({groups}) must divide in_channels ({in_channels}) and out_channels ({out_channels})"
        )
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"{module}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    geometry = dict(
        kernel_size=tuple(pair(kernel_size, f"{module}: kernel_size")),
        stride=tuple(pair(stride, f"{module}: stride")),
        padding=padding if isinstance(padding, str) else tuple(pair(padding, f"{module}: padding")),
        dilation=tuple(pair(dilation, f"{module}: dilation")),
    )
    for name in ("kernel_size", "stride", "dilation"):
        if min(geometry[name]) <= 0:
            raise ValueError(f"{module}: {name} must be positive, got {geometry[name]}")
    if not isinstance(padding, str) and min(geometry["padding"]) < 0:
        raise ValueError(f"{module}: padding must be non-negative, got {geometry['padding']}")
    return geometry


def conv_module_repr(module, extra: str = "") -> str:
    """``extra_repr`` of a convolution module: the geometry, ``extra`` after the padding, and the
    arguments that differ from their defaults."""
    s = (
        f"{module.in_channels}, {module.out_channels}, kernel_size={module.kernel_size}, "
        f"stride={module.stride}, padding={module.padding!r}{extra}"
    )
    if module.dilation != (1, 1):
        s += f", dilation={module.dilation}"
    if module.groups != 1:
        s += f", groups={module.groups}"
    if module.bias is None:
        s += ", bias=False"
    return s


def _plain(value) -> bool:
    """An int, a string, or a tuple of ints: geometry arguments that key a call exactly (a bool or
    a list would not: ``True == 1`` hashes alike, and lists do not hash)."""
    kind = type(value)
    if kind is int or kind is str:
        return True
    if kind is not tuple:
        return False
    for v in value:
        if type(v) is not int:
            return False
    return True


class CallPlans:
    """What a convolution op's argument checks and normalisation concluded, per call signature.

    The checks read nothing but the arguments' types, shapes, dtypes and devices, the geometry
    arguments, ``groups`` and the backend, so a call with the same signature as one that passed
    them (the same layer run again) reuses their outcome. At batch 1 they cost about as much as
    the op itself (~25 us a call). Calls that cannot be keyed exactly (lists or bools for the
    geometry, non-tensors, tracing under torch.compile or export) run the checks every time.
    """

    def __init__(self, limit: int = 4096) -> None:
        self._plans: dict = {}
        self._limit = limit

    @staticmethod
    def signature(tensors: tuple, *args) -> Optional[tuple]:
        """The key of a call, or ``None`` when it cannot be keyed exactly."""
        for a in args:
            if not _plain(a):
                return None
        if torch.compiler.is_compiling():
            return None
        key = list(args)
        try:
            for t in tensors:
                key.append(None if t is None else (type(t), t.shape, t.dtype, t.device))
            key = tuple(key)
            hash(key)  # symbolic sizes do not hash
        except (AttributeError, TypeError):
            return None
        return key

    def get(self, key: Optional[tuple]):
        return None if key is None else self._plans.get(key)

    def remember(self, key: Optional[tuple], plan) -> None:
        if key is None:
            return
        if len(self._plans) >= self._limit:  # many distinct shapes: start again rather than grow
            self._plans.clear()
        self._plans[key] = plan
