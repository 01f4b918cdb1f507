"""Training data held in memory as uint8 images, the epoch order, and batch augmentation.

Every source gives ``(images uint8 (N, H, W, 3), labels int64 (N,))``. Batches are gathered by
index straight from these tensors (no loader workers): the order of an epoch is that of
``DistributedSampler(seed, epoch)`` and the augmentation of example ``i`` in epoch ``e`` depends only
on ``(seed, e, i)``, so a run resumes exactly and N processes see the same augmented global batch
as one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class Split:
    images: Tensor  # (N, H, W, 3) uint8
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class DataSet:
    train: Split
    test: Split
    num_classes: int
    mean: tuple
    std: tuple


def cifar10(root: str) -> DataSet:
    """CIFAR-10 from ``root`` (torchvision's layout), never downloaded."""
    import torchvision  # noqa: F401  (only this source needs it)
    from torchvision.datasets import CIFAR10

    def split(train: bool) -> Split:
        ds = CIFAR10(root, train=train, download=False)
        return Split(torch.from_numpy(ds.data).contiguous(), torch.tensor(ds.targets, dtype=torch.int64))

    return DataSet(split(True), split(False), 10, CIFAR10_MEAN, CIFAR10_STD)


def synthetic(size: int, image_size: int, seed: int, num_classes: int = 10) -> DataSet:
    """A learnable generated data set: each class is a smooth random colour pattern; an example is
    its class's pattern at a random contrast plus pixel noise. Deterministic in ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=gen)
    patterns = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)

    def split(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        contrast = 0.8 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen)
        x = 0.5 + contrast * (patterns[labels] - 0.5) + 0.1 * torch.randn(n, 3, image_size, image_size, generator=gen)
        images = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        return Split(images, labels)

    return DataSet(split(size), split(max(1, size // 2)), num_classes, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def epoch_order(n: int, epoch: int, seed: int, rank: int, world: int) -> list[int]:
    """This rank's training indices for ``epoch``: ``DistributedSampler`` order, tail dropped so that
    every rank holds the same number."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def augmentation(n: int, epoch: int, seed: int, pad: int):
    """Per-example random crop offsets ``(N, 2)`` in ``[0, 2*pad]`` and flips ``(N,)`` for ``epoch``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2 ** 63))
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5
    return offsets, flips


def make_batch(split: Split, index: Tensor, data: DataSet, image_size: int, device,
               aug=None, pad: int = 0) -> tuple[Tensor, Tensor]:
    """Normalised float images ``(B, 3, S, S)`` and labels on ``device`` for the examples ``index``;
    ``aug`` = :func:`augmentation`'s output for the whole split (random crop with zero padding ``pad``
    and horizontal flip), or None."""
    x = split.images[index].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    y = split.labels[index].to(device, non_blocking=True)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    x = (x - mean) / std
    if aug is not None and pad > 0:
        offsets, flips = (t[index].to(device) for t in aug)
        x = random_crop_flip(x, offsets, flips, pad)
    return x, y


def random_crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Crops each example of zero-padded ``x`` at its own offset and flips it when ``flips`` says,
    all at once by gathering rows and columns."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()
