"""The derivatives PyTorch's custom ops do not give on their own, for every public op.

- Forward mode (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``): a custom op has no
  place for a forward-mode formula, and a tangent passed to one is dropped without an error. Each
  public function asks :func:`split` whether an argument carries a tangent; if one does, it runs
  its op on the primals, builds the output's tangent by its own formula (mostly calls of the same
  op, the ops being linear in each argument) and returns :func:`join` of the two.
- Forward mode mixed with reverse mode (tangents on tensors that require grad, nested forward
  levels) and the ``torch.func`` reverse transforms (``grad``, ``vjp``, ``jacrev``, which refuse
  the autograd functions ``torch.library.register_autograd`` makes): the ops run their reference
  formulation, PyTorch's own ops, where :func:`needs_reference` says so. ``beta_cdf``, the
  batch-shaping loss and ``pooled_mlp`` have such paths for every case, taken where
  :func:`transformed` says so.
- Derivatives of the gradient (double backward, gradient penalties): the backward kernels are
  custom ops without derivatives, so a backward formula whose result will be differentiated
  (:func:`gradient_is_differentiated`) takes it from the reference formulation
  (:func:`reference_gradients`).

Outside these cases the cost is two flag reads a call.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack
from torch._functorch import eager_transforms
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters


def _has_tangent(t) -> bool:
    return isinstance(t, Tensor) and fwAD.unpack_dual(t).tangent is not None


def _any_tangent(tensors) -> bool:
    return fwAD._current_level >= 0 and any(_has_tangent(t) for t in tensors)


def _under_grad_transform() -> bool:
    if peek_interpreter_stack() is None or torch.compiler.is_compiling():
        return False
    return any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters())


def needs_reference(*tensors) -> bool:
    """Whether the op must run its reference formulation for its derivatives to be right."""
    if _under_grad_transform():
        return True
    if not _any_tangent(tensors):
        return False
    if eager_transforms.JVP_NESTING > 1:  # jvp of jvp: outer tangents sit below this level
        return True
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def transformed(*tensors) -> bool:
    """Whether a tangent or a ``torch.func`` reverse transform reaches these arguments: where the
    ops with a path PyTorch differentiates itself (an ``autograd.Function``, ATen calls) take it."""
    return _under_grad_transform() or _any_tangent(tensors)


def split(*args) -> Optional[tuple[list, list]]:
    """``None`` when no tensor among ``args`` carries a tangent; else the primals and the tangents
    (``None`` where an argument has none), in the order of ``args``."""
    if fwAD._current_level < 0:  # no dual level is open: nothing can carry a tangent
        return None
    pairs = [fwAD.unpack_dual(a) if isinstance(a, Tensor) else (a, None) for a in args]
    if all(tangent is None for _, tangent in pairs):
        return None
    return [primal for primal, _ in pairs], [tangent for _, tangent in pairs]


def join(output: Tensor, tangent: Optional[Tensor]) -> Tensor:
    """``output`` carrying ``tangent``, broadcast to its shape (zero where the formula made none)."""
    if tangent is None:
        tangent = torch.zeros_like(output)
    elif tangent.shape != output.shape:
        tangent = tangent.expand_as(output).contiguous()
    return fwAD.make_dual(output, tangent)


def add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    """Sum of tangent terms, any of which may be absent."""
    if term is None:
        return total
    return term if total is None else total + term


def gradient_is_differentiated(*tensors) -> bool:
    """Whether a backward formula's result will itself be differentiated: its inputs requiring grad
    under ``create_graph=True``, or carrying tangents."""
    present = [t for t in tensors if isinstance(t, Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return True
    return _any_tangent(present)


def reference_gradients(
    reference_op: Callable[..., Sequence[Tensor]], inputs: Sequence, mask: Sequence[bool],
    grad_outputs: Sequence[Optional[Tensor]],
) -> list:
    """The gradients, themselves differentiable, of the outputs of ``reference_op(*inputs)``
    (PyTorch ops, differentiable to any order) against ``grad_outputs`` (``None`` for an output
    that got no gradient), for the inputs ``mask`` selects; ``None`` for the others."""
    wanted = [t for t, m in zip(inputs, mask) if m]
    with torch.enable_grad():
        pairs = [(o, g) for o, g in zip(reference_op(*inputs), grad_outputs) if g is not None]
        found = iter(torch.autograd.grad(
            [o for o, _ in pairs], wanted, [g for _, g in pairs], create_graph=True, allow_unused=True
        ))
    return [next(found) if m else None for m in mask]
