"""Parameter and multiply-add counts, as the papers count them.

Multiply-adds (MACs) are those of one inference: every convolution and linear layer, BatchNorm folded
away (free), activations, pooling and additions not counted. A CondConv layer costs its convolution
(one kernel-sized conv per example) plus the kernel mixing: one multiply-add per expert parameter per
example. Routers are linear layers and count as such.

Counting is rule based: ``MAC_RULES`` maps a module type to a function ``(module, inputs, output) ->
MACs for the whole batch of that call`` counting the module's own work (its submodules are counted
by their own rules). New module kinds join with :func:`register_mac_rule`. ``count_macs`` runs one
forward pass, so models built on the ``meta`` device are counted without allocating their weights.

A channel-gated convolution (``GatedConv2d``) costs the work it executes: per example, per group,
open input channels x open output channels x kernel x output pixels, where a gate exactly 0 is closed
(the gates are those passed to its forward; on ``meta`` they cannot be read and count as open). A
gate module costs its linear layers. ``count_macs`` counts the eval forward of zeros, where gates
decide as the network does in eval; :func:`conditional_macs` counts the work for a given batch.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.condconv import CondConv2d, Router
from ..nn.gated import ChannelGate, GatedConv2d

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


@register_mac_rule(ChannelGate)
def channel_gate_macs(m: ChannelGate, inputs: tuple, out: Tensor) -> int:
    """Its two linear layers (it applies them through their parameters, so their own rule does not run)."""
    return out.shape[0] * (m.fc1.in_features * m.fc1.out_features + m.fc2.in_features * m.fc2.out_features)


@register_mac_rule(Router)
def router_macs(m: Router, inputs: tuple, out: Tensor) -> int:
    """Its linear layers (applied through their parameters, so their own rule does not run)."""
    layers = [m.fc] if m.hidden is None else [m.hidden, m.fc]
    return out.shape[0] * sum(layer.in_features * layer.out_features for layer in layers)


@register_mac_rule(CondConv2d)
def cond_conv2d_macs(m: CondConv2d, inputs: tuple, out: Tensor) -> int:
    kh, kw = m.kernel_size
    conv = out.numel() * (m.in_channels // m.groups) * kh * kw
    mixing = out.shape[0] * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0))
    return conv + mixing


@register_mac_rule(GatedConv2d)
def gated_conv2d_macs(m: GatedConv2d, inputs: tuple, out: Tensor) -> int:
    """Executed MACs: per example and group, open input x open output channels x kernel x pixels."""
    in_gate = inputs[1] if len(inputs) > 1 else None
    out_gate = inputs[2] if len(inputs) > 2 else None
    batch, groups = out.shape[0], m.groups
    kh, kw = m.kernel_size
    per_pair = kh * kw * out.shape[2] * out.shape[3]
    open_in = _open_per_group(in_gate, batch, groups, m.in_channels)
    open_out = _open_per_group(out_gate, batch, groups, m.out_channels)
    return int((open_in * open_out).sum()) * per_pair


def _open_per_group(gate: Optional[Tensor], batch: int, groups: int, channels: int) -> Tensor:
    """``(batch, groups)`` int64 counts of open channels (gate != 0); all open without a readable gate."""
    if gate is None or gate.device.type == "meta":
        return torch.full((batch, groups), channels // groups, dtype=torch.int64)
    return (gate.detach() != 0).reshape(batch, groups, channels // groups).sum(2, dtype=torch.int64).cpu()


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
    return {name: macs // size[0] for name, macs in _batch_macs(model, x).items()}


def conditional_macs(model: nn.Module, x: Tensor) -> float:
    """MACs per example (the batch's total / its size) that an eval forward of the batch ``x`` executes.

    Unlike :func:`count_macs` (zeros in), this counts what the gates decide for these inputs (or the
    masks set with :func:`~condkernels.utils.set_gate_density`): a gated convolution costs only its
    open channel pairs. The model runs once in eval mode without gradients and gets its modes back.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[0] < 1:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"conditional_macs: x must be a (B, C, H, W) batch with B >= 1, got {got}")
    return sum(_batch_macs(model, x).values()) / x.shape[0]


def _bound_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The forward's arguments in signature order (defaults filled in) when some came by keyword."""
    if not kwargs:
        return args
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _batch_macs(model: nn.Module, x: Tensor) -> dict[str, int]:
    """MACs of every counted module over the whole batch of one eval forward of ``x``."""
    counts: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        rule = mac_rule_for(module)
        if rule is None:
            continue

        def hook(mod, args, kwargs, output, name=name, rule=rule):
            counts[name] = counts.get(name, 0) + int(rule(mod, _bound_inputs(mod, args, kwargs), output))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
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
    return counts


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> int:
    """Inference multiply-adds per example at ``input_size`` (see :func:`macs_by_module`)."""
    return sum(macs_by_module(model, input_size).values())
