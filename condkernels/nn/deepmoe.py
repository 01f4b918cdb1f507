"""DeepMoE's gating: the shallow embedding network, the per-layer ReLU gate heads, the losses.

DeepMoE (Wang et al., "Deep Mixture of Experts via Shallow Embedding") computes, once per image, an
embedding ``e`` with a small stride-2 convolutional network, and from it one gate vector per gated
convolution, ``g_l = ReLU(W_l · e)`` (eq. 6), which scales that convolution's input channels (eq. 3).
A zero gate is a skipped channel (:class:`~condkernels.nn.GatedConv2d` skips it per example).

Training (Procedure 1): ``CE(logits, y) + λ·Σ_l ‖g_l‖₁ + μ·CE(embedding logits, y)`` with everything
trained jointly, then the embedding network and the gate heads frozen (:func:`freeze_gates`) and the
base network fine-tuned with λ = μ = 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gated import ForcedDensity

__all__ = ["DeepMoELosses", "GateHead", "ShallowEmbedding", "freeze_gates", "gate_heads"]


class ShallowEmbedding(nn.Module):
    """The shallow embedding network: ``num_layers`` stride-2 3x3 conv -> BN -> ReLU, global pooling.

    The paper uses 4 layers for 32x32 (CIFAR) inputs and 5 for 224x224 (ImageNet) and gives no
    widths; here layer ``i`` has ``width * 2**i`` channels, so ``e`` has ``embed_dim = width *
    2**(num_layers - 1)`` features. ``forward(x)`` returns ``e (B, embed_dim)`` and keeps the logits of
    its own classifier (``classifier``, a Linear on ``e``) in ``last_logits`` for the embedding loss
    ``μ·CE``. While frozen (:func:`freeze_gates`) it stays in eval mode, so its BatchNorm uses the
    running statistics and the gates of an image do not depend on the rest of the batch.
    """

    def __init__(self, num_classes: int, num_layers: int = 4, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_layers", num_layers), ("width", width),
                            ("in_channels", in_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ShallowEmbedding: {name} must be a positive int, got {value!r}")
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(num_layers):
            out = width * 2 ** i
            layers += [nn.Conv2d(channels, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.in_channels = in_channels
        self.embed_dim = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.frozen = False
        self.last_logits: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ShallowEmbedding: x must be (B, {self.in_channels}, H, W), got {got}")
        e = torch.flatten(self.pool(self.features(x)), 1)
        self.last_logits = self.classifier(e)
        return e

    def __getstate__(self):
        # The record of the last forward holds an autograd graph, which copy.deepcopy refuses.
        state = self.__dict__.copy()
        state["last_logits"] = None
        return state

    def train(self, mode: bool = True) -> "ShallowEmbedding":
        # Frozen gates must not follow the batch: BatchNorm keeps its running statistics.
        return super().train(mode and not self.frozen)


class GateHead(ForcedDensity, nn.Module):
    """One head of the multi-headed sparse gating network: ``g = ReLU(W · e)`` (paper eq. 6, no bias).

    ``forward(e)`` returns ``g (B, channels)`` and records it in ``last_gate`` (with its graph, for
    the L1 loss) and the share of open (non-zero) entries in ``open_fraction`` (a detached 0-d tensor;
    reading it as a float is left to the caller, so the forward never synchronises a GPU).

    :meth:`force_density` replaces the learned gates by fixed random 0/1 masks with a given open
    fraction (to measure a network's cost at a chosen density); ``index`` makes the masks of the
    heads of one network differ.
    """

    def __init__(self, embed_dim: int, channels: int, index: int = 0) -> None:
        super().__init__()
        if embed_dim <= 0 or channels <= 0:
            raise ValueError(f"GateHead: embed_dim and channels must be positive, got {embed_dim}, {channels}")
        self.embed_dim = embed_dim
        self.channels = channels
        self.index = index
        self.proj = nn.Linear(embed_dim, channels, bias=False)
        self.forced_channels = channels
        self.last_gate: Optional[Tensor] = None
        self.open_fraction: Optional[Tensor] = None

    def forced_mask_seed(self) -> int:
        # Each head draws its own masks: its index joins the seed. (The forced gate is the mask
        # itself, not mask x ReLU value, so the open fraction is exactly the one asked for.)
        return (self.forced_seed * 0x9E3779B1 + self.index) & 0xFFFFFFFF

    def forward(self, e: Tensor) -> Tensor:
        if not isinstance(e, Tensor) or e.dim() != 2 or e.shape[1] != self.embed_dim:
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"GateHead: e must be (B, {self.embed_dim}), got {got}")
        if self.forced_density is None:
            g = F.relu(self.proj(e))
        else:
            g = self.forced_mask(e.shape[0], e.device, e.dtype)
        self.last_gate = g
        self.open_fraction = (g.detach() != 0).to(torch.float32).mean()
        return g

    def __getstate__(self):
        state = self.__dict__.copy()
        state["last_gate"] = state["open_fraction"] = state["_forced_mask_cache"] = None
        return state

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, channels={self.channels}"
        if self.forced_density is not None:
            s += f", forced_density={self.forced_density}"
        return s


def gate_heads(model: nn.Module) -> list[GateHead]:
    """Every :class:`GateHead` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, GateHead)]


def freeze_gates(model: nn.Module, frozen: bool = True) -> nn.Module:
    """Freezes (or with ``frozen=False`` unfreezes) DeepMoE's gating for the fine-tuning stage.

    Every :class:`ShallowEmbedding` and :class:`GateHead` of ``model`` stops taking gradients, and
    the embedding networks stay in eval mode (running BatchNorm statistics, not updated) even under
    ``model.train()``. Returns ``model``.
    """
    found = False
    for m in model.modules():
        if isinstance(m, (ShallowEmbedding, GateHead)):
            found = True
            for p in m.parameters():
                p.requires_grad_(not frozen)
            if isinstance(m, ShallowEmbedding):
                m.frozen = frozen
                m.train(model.training)
    if not found:
        raise ValueError("freeze_gates: model has no ShallowEmbedding or GateHead")
    return model


class DeepMoELosses:
    """DeepMoE's two extra loss terms (paper eq. 7-8), read from the last forward of ``model``.

    ``collector(target)`` returns ``{"gate_l1": λ·Σ_l ‖g_l‖₁ (averaged over the batch),
    "embedding_ce": μ·CE(embedding logits, target)}``; add them to the classification loss.
    Defaults: ``lam=0.001``, the low end of the paper's range [0.001, 8] (larger values close more
    channels), and ``mu=1``, its CIFAR value (it uses μ = 0 on ImageNet). ``density()`` is the share
    of open gate entries over every gated channel of every head in the last forward.
    """

    def __init__(self, model: nn.Module, lam: float = 0.001, mu: float = 1.0) -> None:
        for name, value in (("lam", lam), ("mu", mu)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"DeepMoELosses: {name} must be a non-negative number, got {value!r}")
        self.heads = gate_heads(model)
        self.embeddings = [m for m in model.modules() if isinstance(m, ShallowEmbedding)]
        if not self.heads or len(self.embeddings) != 1:
            raise ValueError(
                f"DeepMoELosses: model must have gate heads and one ShallowEmbedding, found "
                f"{len(self.heads)} heads and {len(self.embeddings)} embedding networks"
            )
        self.lam = float(lam)
        self.mu = float(mu)

    def _gates(self) -> list[Tensor]:
        gates = [h.last_gate for h in self.heads]
        if any(g is None for g in gates):
            raise RuntimeError("DeepMoELosses: run a forward pass of the model first")
        return gates

    def __call__(self, target: Tensor) -> dict[str, Tensor]:
        gates = self._gates()
        logits = self.embeddings[0].last_logits
        if logits is None:
            raise RuntimeError("DeepMoELosses: run a forward pass of the model first")
        if not isinstance(target, Tensor) or target.dim() != 1 or target.shape[0] != logits.shape[0]:
            got = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
            raise ValueError(f"DeepMoELosses: target must be class indices of shape ({logits.shape[0]},), got {got}")
        l1 = sum(g.abs().sum(dim=1).mean() for g in gates)
        return {
            "gate_l1": self.lam * l1,
            "embedding_ce": self.mu * F.cross_entropy(logits, target),
        }

    def density(self) -> float:
        """Open share of all gate entries (every head, every example) of the last forward."""
        gates = self._gates()
        open_count = sum((g.detach() != 0).sum() for g in gates)
        return float(open_count) / sum(g.numel() for g in gates)
