"""BatchNorm over the global batch of all processes, on any device.

``torch.nn.SyncBatchNorm`` runs only on accelerators; on the CPU (gloo) :class:`GlobalBatchNorm`
does the same with two differentiable all-reduces (sum, then the sum of squared deviations), so
that N processes compute what one process computes on the concatenated batch. Its backward sums
the statistics' gradients over ranks, which together with DDP's gradient averaging gives the
single-process gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    """A BatchNorm (any input rank >= 2, channels on dim 1) whose training statistics are those of
    the batch over ``process_group``. State dict identical to ``nn.BatchNorm*d``."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        group = self.process_group or dist.group.WORLD
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(group) > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]])
        total = all_reduce(torch.cat([x.sum(dims), count]), group=group)
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims), group=group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                self.running_mean.lerp_(mean.detach(), factor)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """Every ``nn.BatchNorm1d/2d/3d`` of ``module`` becomes a BatchNorm over the global batch:
    ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere. Parameters and
    buffers are kept (the state dict keys do not change). Returns the (possibly new) module."""
    if isinstance(module, _BatchNorm) and not isinstance(module, (nn.SyncBatchNorm, GlobalBatchNorm)):
        ref = module.weight if module.affine else module.running_mean
        cls = nn.SyncBatchNorm if ref is not None and ref.device.type == "cuda" else GlobalBatchNorm
        factory = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, process_group, **factory)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            setattr(module, name, new)
    return module
