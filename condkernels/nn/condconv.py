"""CondConv modules: the routed convolution, its router, and a container that threads routing.

``CondConv2d`` holds ``num_experts`` kernels and mixes them per example with routing weights
(``condkernels.cond_conv2d`` does the mixing and the convolution in one op). ``Router`` computes the
routing weights from a layer's input. Several CondConv layers may share one router (the CondConv
paper shares one routing vector per block); ``RoutedSequential`` threads the routing of the last
router it met through the layers that follow.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..ops import cond_conv2d, pooled_mlp
from ..ops._conv_args import IntOrPair, Padding, conv_module_args, conv_module_repr

ROUTER_ACTIVATIONS = ("sigmoid", "softmax")


class Router(nn.Module):
    """Routing weights ``(B, num_experts)`` of a CondConv layer, from that layer's input.

    Global average pooling -> optional hidden ``Linear`` + ReLU -> ``Linear`` -> activation. The
    paper's router is ``sigmoid(Linear(GAP(x)))``: every expert can be on at once; ``"softmax"``
    makes the experts compete. ``temperature`` divides the logits before the activation.
    """

    def __init__(
        self,
        in_channels: int,
        num_experts: int,
        activation: str = "sigmoid",
        hidden: Optional[int] = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if activation not in ROUTER_ACTIVATIONS:
            raise ValueError(f"Router: activation must be one of {ROUTER_ACTIVATIONS}, got {activation!r}")
        if in_channels <= 0 or num_experts <= 0:
            raise ValueError(
                f"Router: in_channels and num_experts must be positive, got {in_channels}, {num_experts}"
            )
        if hidden is not None and hidden <= 0:
            raise ValueError(f"Router: hidden must be a positive int or None, got {hidden!r}")
        if not temperature > 0:
            raise ValueError(f"Router: temperature must be positive, got {temperature!r}")
        self.in_channels = in_channels
        self.num_experts = num_experts
        self.activation = activation
        self.temperature = float(temperature)
        self.hidden = nn.Linear(in_channels, hidden) if hidden is not None else None
        self.fc = nn.Linear(hidden if hidden is not None else in_channels, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"Router: x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        # GAP and the layers as one op, through their parameters (count_macs has a rule for the router).
        if self.hidden is None:
            logits = pooled_mlp(x, self.fc.weight, self.fc.bias)
        else:
            logits = pooled_mlp(x, self.hidden.weight, self.hidden.bias, self.fc.weight, self.fc.bias)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)

    def extra_repr(self) -> str:
        hidden = self.hidden.out_features if self.hidden is not None else None
        return (
            f"{self.in_channels}, num_experts={self.num_experts}, activation={self.activation!r}, "
            f"hidden={hidden}, temperature={self.temperature}"
        )


class RoutedModule(nn.Module):
    """A module whose forward takes ``(x, routing=None)``.

    ``self.router`` is its own :class:`Router` or ``None``. Without a router the routing must come
    from outside (a router shared with other layers, see :class:`RoutedSequential`).
    """

    router: Optional[Router]

    def resolve_routing(self, x: Tensor, routing: Optional[Tensor]) -> Optional[Tensor]:
        """The routing passed in, else this module's router applied to ``x``, else ``None``."""
        if routing is not None or self.router is None:
            return routing
        return self.router(x)


class CondConv2d(RoutedModule):
    """CondConv: a drop-in for :class:`torch.nn.Conv2d` whose kernel is mixed per example.

    ``y[b] = conv2d(x[b], sum_e r[b, e] * weight[e], sum_e r[b, e] * bias[e])`` with routing ``r``
    either passed to ``forward`` or computed by the layer's own :class:`Router` (``router=True``,
    the default; ``router=False`` builds a layer that always takes its routing from outside).

    Parameters:
        weight: ``(num_experts, out_channels, in_channels / groups, kh, kw)``.
        bias: ``(num_experts, out_channels)`` or ``None``.

    ``padding`` is an int, a pair, ``"valid"`` or ``"same"`` -- TensorFlow SAME for any stride
    (the odd pixel of an odd total pad goes bottom/right), which is what TensorFlow-trained
    weights expect. A state_dict in timm's layout (2-D expert weight ``(E, Cout*Cin/groups*kh*kw)``)
    loads as it is. After :func:`condkernels.optimize_for_inference` folds a BatchNorm into the
    layer, ``shift`` holds the per-channel offset that does not scale with the routing.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: Padding = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 8,
        router: bool = True,
        router_activation: str = "sigmoid",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        geometry = conv_module_args("CondConv2d", in_channels, out_channels, kernel_size, stride, padding,
                                    dilation, groups)
        if num_experts <= 0:
            raise ValueError(f"CondConv2d: num_experts must be positive, got {num_experts}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size, self.stride = geometry["kernel_size"], geometry["stride"]
        self.padding, self.dilation = geometry["padding"], geometry["dilation"]
        self.groups = groups
        self.num_experts = num_experts
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels, **factory)) if bias else None
        self.router = Router(in_channels, num_experts, router_activation) if router else None
        if self.router is not None:
            self.router.to(**factory)
        self.register_buffer("shift", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Every expert starts like an nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
        bound = 1.0 / math.sqrt(self.weight[0].numel() // self.out_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, routing: Optional[Tensor] = None) -> Tensor:
        routing = self.resolve_routing(x, routing)
        if routing is None:
            raise ValueError(
                "CondConv2d: routing is required, this layer has no router of its own "
                "(it was built with router=False to share the routing of another layer)"
            )
        y = cond_conv2d(
            x, routing, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
        if self.shift is not None:
            y = y + self.shift.view(1, -1, 1, 1)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # timm stores the experts flattened, (E, Cout*Cin/groups*kh*kw): the same memory as ours.
        key = prefix + "weight"
        w = state_dict.get(key)
        if isinstance(w, Tensor) and w.dim() == 2 and tuple(w.shape) == (
            self.num_experts, self.weight[0].numel()
        ):
            state_dict = dict(state_dict)
            state_dict[key] = w.reshape(self.weight.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return conv_module_repr(self, f", num_experts={self.num_experts}")


def call_layer(layer: nn.Module, x: Tensor, routing: Optional[Tensor]) -> Tensor:
    """Runs ``layer`` on ``x``, passing ``routing`` only to layers that take it."""
    if isinstance(layer, (RoutedModule, RoutedSequential)):
        return layer(x, routing)
    return layer(x)


def routed_step(layer: nn.Module, x: Tensor, routing: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """One step of a routed chain: a layer with its own router computes fresh routing from its input
    and hands it on; any other layer uses, and hands on, the routing it was given."""
    if isinstance(layer, RoutedSequential):
        return layer.forward_routed(x, routing)
    if isinstance(layer, RoutedModule) and layer.router is not None:
        routing = layer.router(x)
    return call_layer(layer, x, routing), routing


class RoutedSequential(nn.Sequential):
    """A Sequential that threads one routing tensor through its layers.

    A :class:`RoutedModule` that owns a router computes fresh routing from its own input; one that
    does not reuses the routing of the nearest earlier layer that did (or the routing passed in).
    This expresses per-block routers, routers shared by every other block, and one router for the
    whole network (the "shared", "partially shared" and "single" routings of the CondConv paper).
    Other layers are called as ``layer(x)``.
    """

    def forward(self, x: Tensor, routing: Optional[Tensor] = None) -> Tensor:
        return self.forward_routed(x, routing)[0]

    def forward_routed(self, x: Tensor, routing: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Like ``forward``, also returning the routing in force after the last layer."""
        for layer in self:
            x, routing = routed_step(layer, x, routing)
        return x, routing


RouterHidden = Union[None, int, str]
HIDDEN_SIZES = {"small": lambda c: max(c // 8, 1), "medium": lambda c: c, "large": lambda c: 8 * c}


def router_hidden_size(in_channels: int, hidden: RouterHidden) -> Optional[int]:
    """The paper's hidden-layer sizes: ``"small"`` = in/8, ``"medium"`` = in, ``"large"`` = 8·in."""
    if hidden is None or (isinstance(hidden, int) and not isinstance(hidden, bool)):
        return hidden
    if hidden not in HIDDEN_SIZES:
        raise ValueError(
            f"router_hidden must be None, an int, or one of {tuple(HIDDEN_SIZES)}, got {hidden!r}"
        )
    return HIDDEN_SIZES[hidden](in_channels)
