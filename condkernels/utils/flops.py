"""Parameter and multiply-add counts, as the papers count them.

Multiply-adds (MACs) are those of one inference: every convolution and linear layer, BatchNorm folded
away (free), activations, pooling and additions not counted. A CondConv layer costs its convolution
(one kernel-sized conv per example) plus the kernel mixing: one multiply-add per expert parameter per
example. Routers are linear layers and count as such.

Counting is rule based: ``MAC_RULES`` maps a module type to a function ``(module, inputs, output) ->
MACs for the whole batch of that call`` counting the module's own work (its submodules are counted
by their own rules). New module kinds join with :func:`register_mac_rule`. ``count_macs`` runs one
forward pass, so models built on the ``meta`` device are counted without allocating their weights.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ..nn.condconv import CondConv2d

MacRule = Callable[[nn.Module, tuple, Tensor], int]
MAC_RULES: dict[type, MacRule] = {}


def register_mac_rule(module_type: type) -> Callable[[MacRule], MacRule]:
    """Decorator: ``rule(module, inputs, output)`` returns the MACs of one call over the whole batch."""

    def register(rule: MacRule) -> MacRule:
        MAC_RULES[module_type] = rule
        return rule

    return register


def mac_rule_for(module: nn.Module):
    for cls in type(module).__mro__:
        if cls in MAC_RULES:
            return MAC_RULES[cls]
    return None


@register_mac_rule(nn.Conv2d)
def conv2d_macs(m: nn.Conv2d, inputs: tuple, out: Tensor) -> int:
    kh, kw = m.kernel_size
    return out.numel() * (m.in_channels // m.groups) * kh * kw


@register_mac_rule(nn.Linear)
def linear_macs(m: nn.Linear, inputs: tuple, out: Tensor) -> int:
    return out.numel() * m.in_features


@register_mac_rule(CondConv2d)
def cond_conv2d_macs(m: CondConv2d, inputs: tuple, out: Tensor) -> int:
    kh, kw = m.kernel_size
    conv = out.numel() * (m.in_channels // m.groups) * kh * kw
    mixing = out.shape[0] * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))
    return conv + mixing


def count_params(model: nn.Module) -> int:
    """Number of parameters (each shared parameter once); BatchNorm's affine parameters included."""
    return sum(p.numel() for p in model.parameters())


def macs_by_module(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> dict[str, int]:
    """Inference MACs per example of every counted module, keyed by its qualified name.

    ``input_size`` is ``(C, H, W)`` or ``(B, C, H, W)``; the model runs once in eval mode on zeros of
    that size, on the device and dtype of its parameters (``meta`` works), then gets its modes back.
    """
    size = tuple(input_size)
    if len(size) == 3:
        size = (1,) + size
    if len(size) != 4 or any(s <= 0 for s in size):
        raise ValueError(f"count_macs: input_size must be (C, H, W) or (B, C, H, W), got {tuple(input_size)}")
    param = next(model.parameters(), None)
    x = torch.zeros(size, device=param.device if param is not None else None,
                    dtype=param.dtype if param is not None else None)
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        rule = mac_rule_for(module)
        if rule is None:
            continue

        def hook(mod, inputs, output, name=name, rule=rule):
            counts[name] = counts.get(name, 0) + int(rule(mod, inputs, output))

        handles.append(module.register_forward_hook(hook))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return {name: macs // size[0] for name, macs in counts.items()}


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Inference multiply-adds per example at ``input_size`` (see :func:`macs_by_module`)."""
    return sum(macs_by_module(model, input_size).values())
