"""Batching rules for ``torch.vmap`` (and so ``jacfwd``'s batched tangents) of the compiled ops.

Without one, PyTorch runs a custom op once per vmapped slice and warns of the cost. The ops'
per-example arguments (x, routing, gates) already carry a batch: a vmapped dimension of theirs is
folded into it, so the vmapped op is one call of the op. Where a shared argument (the weights, a
bias) is vmapped too, as in an ensemble of stacked weights, the op runs once per vmapped slice.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _library


def _batched(d) -> bool:
    return isinstance(d, int)  # a non-tensor argument's entry is None, or a list of them


def _slice(args, in_dims, k: int) -> list:
    return [a.select(d, k) if _batched(d) else a for a, d in zip(args, in_dims)]


def register_batch_folding(qualified_name: str, per_example: Sequence[int]) -> None:
    """Registers the rule for an op whose arguments at ``per_example`` are ``(B, ...)`` tensors
    of one row per example (or None) and whose other tensors are shared by the batch."""
    op = _library.overload(qualified_name)

    def rule(info, in_dims, *args):
        n = info.batch_size
        shared_batched = any(_batched(d) for i, d in enumerate(in_dims) if i not in per_example)
        if shared_batched:
            results = [op(*_slice(args, in_dims, k)) for k in range(n)]
            if isinstance(results[0], tuple):
                return tuple(torch.stack(r) for r in zip(*results)), (0,) * len(results[0])
            return torch.stack(results), 0
        folded, batch = list(args), None
        for i in per_example:
            a, d = args[i], in_dims[i]
            if a is None:
                continue
            a = a.movedim(d, 0) if _batched(d) else a.unsqueeze(0).expand(n, *a.shape)
            batch = a.shape[1]
            folded[i] = a.reshape(n * batch, *a.shape[2:])
        out = op(*folded)
        if isinstance(out, tuple):
            return tuple(o.unflatten(0, (n, batch)) for o in out), (0,) * len(out)
        return out.unflatten(0, (n, batch)), 0

    torch.library.register_vmap(qualified_name, rule)


def register_elementwise(qualified_name: str) -> None:
    """Registers the rule for an op that broadcasts all its tensor arguments elementwise: each
    vmapped dimension goes in front, and each argument gets the logical rank of the widest."""
    op = _library.overload(qualified_name)

    def rule(info, in_dims, *args):
        tensors = [(a, d) for a, d in zip(args, in_dims) if isinstance(a, Tensor)]
        rank = max(a.dim() - _batched(d) for a, d in tensors)
        moved = []
        for a, d in zip(args, in_dims):
            if isinstance(a, Tensor) and _batched(d):
                a = a.movedim(d, 0)
                a = a.reshape(a.shape[0], *([1] * (rank - (a.dim() - 1))), *a.shape[1:])
            moved.append(a)
        return op(*moved), 0

    torch.library.register_vmap(qualified_name, rule)
