"""A benchmark case: one op at one shape, in one mode, with the competitors to time side by side."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import condkernels

# Method names shared by every suite (and the report's columns, in this order).
STATIC, NAIVE, GROUPED, LOOP = "static", "naive", "grouped", "loop"


def ours(backend: str, variant: str = "") -> str:
    """Method name of one of condkernels' backends, e.g. ``condkernels:cpu``."""
    return f"condkernels:{backend}" + (f" {variant}" if variant else "")


def with_env(fn, env: dict):
    """``fn`` run with the environment variables ``env`` set (the CPU kernels' path overrides)."""

    def call(*args, **kwargs):
        os.environ.update(env)
        try:
            return fn(*args, **kwargs)
        finally:
            for name in env:
                os.environ.pop(name, None)

    return call


def with_lower_vector_isas(method: str, fn) -> dict:
    """``method`` with the CPU kernels capped at each instruction set below the CPU's own
    (``CONDKERNELS_CPU_ISA``; ``isa=none`` takes the library and generic paths), for ``--paths``:
    what the hand-written vector kernels gain over what would run without them."""
    lower = {"avx512": ["avx2", "none"], "avx2": ["none"]}.get(condkernels.cpu_vector_isa(), [])
    return {f"{method} isa={isa}": with_env(fn, {"CONDKERNELS_CPU_ISA": isa}) for isa in lower}


def is_ours(method: str) -> bool:
    return method.startswith("condkernels:")


# The CPU op inside condkernels.frozen_weights() around each call, its kept copies reused between
# calls (as by a server that enters it per request): inference with fixed weights.
FROZEN = ours("cpu", "frozen")


def in_frozen_weights(fn):
    def call(*args, **kwargs):
        with condkernels.frozen_weights():
            return fn(*args, **kwargs)

    return call


def ours_method(methods) -> str | None:
    """The backend judged against the targets: on the CPU cpu frozen where it was timed (inference
    with fixed weights), else cpu; else cuda, else triton."""
    if FROZEN in methods:
        return FROZEN
    for backend in ("cpu", "cuda", "triton"):
        if ours(backend) in methods:
            return ours(backend)
    return None


@dataclass
class Config:
    """What the command line asked for."""

    device: torch.device
    dtype: torch.dtype
    full: bool
    rounds: int
    round_s: float
    skip_s: Optional[float]  # a competitor expected to take longer per call is not timed
    paths: bool = False  # also time the CPU kernels with each internal path forced (threshold studies)


@dataclass
class Case:
    """``setup()`` allocates the inputs and returns the timed calls, by method, the first being the
    yardstick of ``hints``. ``macs`` and ``nbytes`` are the op's unavoidable multiply-adds and bytes
    (they set the row's floor). ``compare`` names the methods whose calls return outputs that must
    agree. ``hints`` are expected times as multiples of the first method's, to skip the slow ones
    without running them."""

    suite: str
    op: str
    name: str
    mode: str
    params: dict
    setup: Callable[[], dict[str, Callable]]
    macs: float = 0.0
    nbytes: float = 0.0
    compare: tuple = ()
    hints: dict = field(default_factory=dict)
    threads: Optional[int] = None
    dtype: Optional[torch.dtype] = None


def conv_macs(batch, cin, cout, groups, k, ho, wo) -> float:
    return float(batch * cout * ho * wo * (cin // groups) * k * k)


def grad_call(fn: Callable, leaves: list, *args, **kwargs) -> Callable:
    """A forward + backward step: ``fn(*leaves, *args)`` then the gradients of every leaf that
    requires them (a unit output gradient, as ``y.sum()``)."""
    needs = [t for t in leaves if t is not None and t.requires_grad]

    def call():
        y = fn(*leaves, *args, **kwargs)
        return torch.autograd.grad(y, needs, torch.ones_like(y), allow_unused=True)

    return call


def no_grad_call(fn: Callable, *args, **kwargs) -> Callable:
    def call():
        with torch.no_grad():
            return fn(*args, **kwargs)

    return call
