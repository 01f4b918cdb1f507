"""What ``torch.autocast`` does to the arguments of condkernels' ops, as it does to their PyTorch
counterparts: the convolutions run in the region's lower precision (the policy of ``conv2d``), the
batch-shaping loss in float32 (the policy of PyTorch's losses). Outside an autocast region of the
tensors' device type, and for float64 or non-floating tensors, arguments pass unchanged. The casts
are ordinary differentiable ops, so gradients reach float32 parameters in float32."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _cast(device_type: str, dtype: torch.dtype, tensors: tuple) -> tuple:
    return tuple(
        t.to(dtype)
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        and t.device.type == device_type
        else t
        for t in tensors
    )


def _enabled(device_type: str) -> bool:
    # Device types without autocast (meta, for counting) cannot be asked whether it is on.
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _region_device(tensors: tuple) -> Optional[str]:
    """The device type of the first argument when an autocast region of that type is open. A first
    argument that is not a tensor passes everything through, for the op's checks to name."""
    if not torch._C._is_any_autocast_enabled() or not isinstance(tensors[0], Tensor):
        return None  # one flag read when no region is open: every call outside autocast
    device_type = tensors[0].device.type
    return device_type if _enabled(device_type) else None


def lower_precision(*tensors):
    """``tensors`` in the autocast region's dtype (bfloat16 or float16) when autocast is on for the
    first one's device."""
    device_type = _region_device(tensors)
    if device_type is None:
        return tensors
    return _cast(device_type, torch.get_autocast_dtype(device_type), tensors)


def float32(*tensors):
    """``tensors`` in float32 when autocast is on for the first one's device."""
    device_type = _region_device(tensors)
    if device_type is None:
        return tensors
    return _cast(device_type, torch.float32, tensors)
