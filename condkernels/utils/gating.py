"""Setting the gate density of a gated network by hand (benchmarks, counting at a given sparsity)."""

from __future__ import annotations

from typing import Optional

from torch import nn


def set_gate_density(model: nn.Module, density: Optional[float], seed: int = 0) -> int:
    """Calls ``force_density(density, seed + i)`` on the i-th module of ``model`` that has that method
    (ChannelGate, DeepMoE's gates): every gate then emits fixed random per-example 0/1 masks with
    that open fraction (``None`` restores the learned gates). Each gate module gets its own seed so
    their masks are not copies of one another.

    Works before and after :func:`~condkernels.optimize_for_inference` (the gate modules survive the
    copy). Returns the number of gate modules set (0 for a network without gates).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_gate_density: model must be an nn.Module, got {type(model).__name__}")
    if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                or not 0.0 <= density <= 1.0):
        raise ValueError(f"set_gate_density: density must be None or a number in [0, 1], got {density!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"set_gate_density: seed must be an int, got {seed!r}")
    gates = [m for m in model.modules() if callable(getattr(m, "force_density", None))]
    for i, gate in enumerate(gates):
        gate.force_density(density, seed + i)
    return len(gates)
