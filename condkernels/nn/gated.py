"""Channel-gated convolution module and the batch-shaping gate module.

``GatedConv2d`` is a drop-in for :class:`torch.nn.Conv2d` whose forward also takes per-example
channel gates; ``condkernels.gated_conv2d`` skips each example's closed channels (gate exactly 0).
The gates come from outside: a batch-shaping :class:`ChannelGate` or DeepMoE's ReLU gates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..gates import binary_concrete_gate, gate_probability
from ..ops import gated_conv2d, pooled_mlp
from ..ops._conv_args import IntOrPair, Padding, conv_module_args, conv_module_repr


class GatedConv2d(nn.Module):
    """``y = out_gate * (conv2d(in_gate * x, weight) + bias)``, closed channels skipped per example.

    ``forward(x, in_gate=None, out_gate=None)``: gates ``(B, in_channels)`` / ``(B, out_channels)``
    broadcast over H and W; a missing gate is all ones (then this is exactly ``nn.Conv2d``).
    Parameters have ``nn.Conv2d``'s shapes and initialisation, so a Conv2d state_dict loads as it is.
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
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        geometry = conv_module_args("GatedConv2d", in_channels, out_channels, kernel_size, stride, padding,
                                    dilation, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size, self.stride = geometry["kernel_size"], geometry["stride"]
        self.padding, self.dilation = geometry["padding"], geometry["dilation"]
        self.groups = groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's initialisation, so gated and plain networks start alike.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, in_gate: Optional[Tensor] = None, out_gate: Optional[Tensor] = None) -> Tensor:
        return gated_conv2d(
            x, self.weight, self.bias, in_gate, out_gate,
            self.stride, self.padding, self.dilation, self.groups,
        )

    def extra_repr(self) -> str:
        return conv_module_repr(self)


class ForcedDensity:
    """What a gate module needs to emit fixed random per-example 0/1 masks of a chosen density in
    place of its learned gates (benchmarks and counting at a given sparsity; see
    :func:`condkernels.utils.set_gate_density`).

    The module sets ``forced_channels`` (its gate count) and may override :meth:`forced_mask_seed`.
    """

    forced_channels: int
    forced_density: Optional[float] = None
    forced_seed: int = 0

    def force_density(self, density: Optional[float], seed: int = 0) -> None:
        """From now on emit fixed random per-example 0/1 masks with ``round(density * channels)``
        open gates per example (see :func:`forced_gate_mask`: example b's mask depends only on
        the seed and ``b``, whatever the batch size); ``None`` restores the learned gates."""
        who = f"{type(self).__name__}.force_density"
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not (0.0 <= density <= 1.0):
                raise ValueError(f"{who}: density must be None or a number in [0, 1], got {density!r}")
            density = float(density)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{who}: seed must be an int, got {seed!r}")
        self.forced_density = density
        self.forced_seed = seed

    def forced_mask_seed(self) -> int:
        return self.forced_seed

    def forced_mask(self, batch: int, device, dtype: torch.dtype) -> Tensor:
        """The ``(batch, channels)`` mask of :meth:`force_density`. The masks are a pure function of
        these arguments: made once, not on every forward (the hashing and two argsorts cost ~0.1 ms
        a gate at batch 1); traced graphs make the mask themselves."""
        seed = self.forced_mask_seed()
        if torch.compiler.is_compiling():
            return forced_gate_mask(batch, self.forced_channels, self.forced_density, seed, device=device, dtype=dtype)
        key = (batch, self.forced_channels, self.forced_density, seed, device, dtype)
        cached = self.__dict__.get("_forced_mask_cache")
        if cached is None or cached[0] != key:
            mask = forced_gate_mask(batch, self.forced_channels, self.forced_density, seed, device=device, dtype=dtype)
            self.__dict__["_forced_mask_cache"] = cached = (key, mask)
        return cached[1]


class ChannelGate(ForcedDensity, nn.Module):
    """The batch-shaping paper's gate module: per-example 0/1 gates for ``gated_channels`` channels.

    ``GAP(x) -> Linear(in_channels, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, gated_channels)``
    gives the logits ``ln(pi)``; :func:`~condkernels.binary_concrete_gate` turns them into gates:
    in training a hard 0/1 sample with the straight-through gradient of ``sigmoid((logits + noise) / tau)``,
    in eval the deterministic ``1[logits > 0]``. ``forward(x)`` takes ``(B, in_channels, H, W)`` and
    returns ``(B, gated_channels)`` in x's dtype.

    After each forward the module keeps, for the losses and the counting:

    - ``last_logits``: the logits (with their graph in training),
    - ``last_probability``: ``sigmoid(logits)`` (:func:`~condkernels.gate_probability`), the soft
      value the batch-shaping and L0 losses take,
    - ``last_open_fraction``: the fraction of gates that were open, a detached 0-d tensor.

    (Nothing is recorded while ``torch.export`` traces the module.)

    The paper does not say how the last layer is initialised; here its bias starts at ``init_bias``
    (default 3.0, ``P(open) = sigmoid(3) ~ 0.95``) so that training starts from the open network and
    the losses close gates from there. Note BatchNorm1d needs more than one example per batch in training.

    :meth:`force_density` replaces the learned decisions by fixed random masks of a chosen density
    (benchmarks and counting at a given sparsity).
    """

    def __init__(
        self,
        in_channels: int,
        gated_channels: int,
        hidden: int = 16,
        tau: float = 2.0 / 3.0,
        init_bias: float = 3.0,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("gated_channels", gated_channels), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ChannelGate: {name} must be a positive int, got {v!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
            raise ValueError(f"ChannelGate: tau must be a positive number, got {tau!r}")
        self.in_channels = in_channels
        self.gated_channels = gated_channels
        self.tau = float(tau)
        self.init_bias = float(init_bias)
        self.fc1 = nn.Linear(in_channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, gated_channels)
        self.forced_channels = gated_channels
        self._last: Optional[tuple[Tensor, Tensor]] = None  # (logits, gate) of the last forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.bn.reset_parameters()
        self.fc2.reset_parameters()
        with torch.no_grad():
            self.fc2.bias.fill_(self.init_bias)

    def logits(self, x: Tensor) -> Tensor:
        """``(B, gated_channels)`` gate logits of ``x``."""
        # The layers run through their parameters, not their modules, and once optimize_for_inference
        # has folded the BatchNorm, as one op with the pooling: at batch 1 the separate calls cost
        # several times the pooling itself (count_macs has a rule for the gate).
        if isinstance(self.bn, nn.Identity):
            return pooled_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        h = self.bn(pooled_mlp(x, self.fc1.weight, self.fc1.bias))
        return F.linear(torch.relu(h), self.fc2.weight, self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"ChannelGate: x must be (B, {self.in_channels}, H, W), got {got}")
        logits = self.logits(x)
        if self.forced_density is not None:
            gate = self.forced_mask(x.shape[0], x.device, logits.dtype)
        else:
            gate = binary_concrete_gate(logits, self.tau, hard=True, training=self.training)
        if not torch.compiler.is_exporting():
            self._last = (logits, gate)
        return gate

    # What the last forward recorded. The soft values and the open fraction are derived when read
    # (the losses and the counting read them once a step; inference never does).
    @property
    def last_logits(self) -> Optional[Tensor]:
        """The last forward's logits (with their graph in training), or None before a forward."""
        return None if self._last is None else self._last[0]

    @property
    def last_probability(self) -> Optional[Tensor]:
        """``sigmoid(last_logits)`` (with its graph in training), or None before a forward."""
        return None if self._last is None else gate_probability(self._last[0])

    @property
    def last_open_fraction(self) -> Optional[Tensor]:
        """Fraction of the last forward's gates that were open (a detached 0-d tensor), or None."""
        return None if self._last is None else self._last[1].detach().mean()

    _RECORDS = ("_last", "_forced_mask_cache")

    def __getstate__(self):
        # The records of the last forward hold autograd graphs, which cannot be copied or pickled;
        # a copy (deepcopy, optimize_for_inference, pickle) starts without them.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        for name in self._RECORDS:
            state[name] = None
        return state

    def extra_repr(self) -> str:
        s = f"{self.in_channels} -> {self.gated_channels} gates, tau={self.tau:.4g}"
        if self.forced_density is not None:
            s += f", forced_density={self.forced_density}"
        return s


_HASH_MASK = (1 << 31) - 1


def _mix(h: Tensor) -> Tensor:
    # A few xorshift-multiply rounds on 31-bit values held in int64 (no overflow: < 2^62).
    for _ in range(3):
        h = h ^ (h >> 13)
        h = (h * 1103515245 + 12345) & _HASH_MASK
        h = h ^ (h >> 16)
    return h


def forced_gate_mask(batch: int, channels: int, density: float, seed: int = 0, *, device=None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """``(batch, channels)`` 0/1 masks with exactly ``round(density * channels)`` ones per row.

    Row b is a pseudo-random choice of channels that depends only on ``(seed, b)``: the first rows
    are the same whatever ``batch`` is, and the masks are the same on every device.
    """
    k = int(round(density * channels))
    b = torch.arange(batch, device=device, dtype=torch.int64).view(-1, 1)
    c = torch.arange(channels, device=device, dtype=torch.int64).view(1, -1)
    h = _mix(_mix((b * 40503 + (seed & _HASH_MASK)) & _HASH_MASK) ^ c)
    # Unique keys (hash, then channel) so the ranking is a permutation with no ties.
    ranks = (h * channels + c).argsort(dim=1).argsort(dim=1)
    return (ranks < k).to(dtype)
