"""Inputs, the float64 oracle and the check shared by the gated_conv2d backend tests (Triton, CUDA,
emulated CUDA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from condkernels import reference


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    cin: int
    cout: int
    k: int
    hw: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    gates: str = "both"  # "both", "in", "out"
    kind: str = "binary"  # "binary" (0/1 at `density`), "relu" (ReLU of a normal: real, exact zeros)
    density: float = 0.5

    def __str__(self) -> str:
        return self.name


# Each example of a batch of >= 3 gets an all-closed row (0), an all-open row (1), and random rows.
CASES = [
    Case("1x1_binary", 4, 8, 12, 1, (4, 5), density=0.5),
    Case("3x3_relu", 4, 6, 10, 3, (5, 6), padding=(1, 1, 1, 1), kind="relu"),
    Case("3x3_stride2_asym", 3, 5, 7, 3, (7, 6), stride=2, padding=(0, 1, 1, 0), density=0.9),
    Case("3x3_groups", 3, 8, 12, 3, (5, 5), padding=(1, 1, 1, 1), groups=2, density=0.5),
    Case("3x3_dilated_in_only", 3, 6, 6, 3, (7, 7), padding=(2, 2, 2, 2), dilation=2, gates="in", bias=False),
    Case("1x1_out_only_sparse", 3, 6, 9, 1, (3, 4), gates="out", density=0.1),
    Case("batch1", 1, 6, 8, 3, (5, 4), padding=(1, 1, 1, 1), kind="relu"),
]


def make_gate(batch: int, channels: int, kind: str, density: float, gen: torch.Generator) -> torch.Tensor:
    if kind == "binary":
        gate = (torch.rand(batch, channels, generator=gen) < density).double()
    else:
        gate = torch.relu(torch.randn(batch, channels, generator=gen, dtype=torch.float64))
    if batch >= 3:
        gate[0] = 0.0
        gate[1] = 1.0 if kind == "binary" else gate[1].abs() + 0.5
    return gate


def make_inputs(case: Case, dtype=torch.float64, device="cpu", seed=0):
    """(x, weight, bias, in_gate, out_gate) for `case`; all but the gates drawn from N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.batch, case.cin, *case.hw, generator=gen, dtype=torch.float64)
    weight = torch.randn(case.cout, case.cin // case.groups, case.k, case.k, generator=gen, dtype=torch.float64)
    bias = torch.randn(case.cout, generator=gen, dtype=torch.float64) if case.bias else None
    in_gate = make_gate(case.batch, case.cin, case.kind, case.density, gen) if case.gates in ("both", "in") else None
    out_gate = make_gate(case.batch, case.cout, case.kind, case.density, gen) if case.gates in ("both", "out") else None
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return tuple(move(t) for t in (x, weight, bias, in_gate, out_gate))


def conv_args(case: Case):
    return [case.stride] * 2, list(case.padding), [case.dilation] * 2, case.groups


def oracle(inputs, case: Case, grad_out: Optional[torch.Tensor] = None):
    """The dense masked formulation in float64: output, ungated output, and, given grad_out, the
    gradients of (x, weight, bias, in_gate, out_gate) (None where an input is None)."""
    leaves = [None if t is None else t.detach().double().cpu().requires_grad_() for t in inputs]
    x, weight, bias, in_gate, out_gate = leaves
    y = reference.gated_conv2d(x, weight, bias, in_gate, out_gate, *conv_args(case))
    ungated = reference.gated_conv2d(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                                     None if in_gate is None else in_gate.detach(), None, *conv_args(case))
    grads = None
    if grad_out is not None:
        y.backward(grad_out.double().cpu())
        grads = [None if t is None else t.grad for t in leaves]
    return y.detach(), ungated, grads


def public_args(case: Case):
    """conv_args as the public function spells them; the case's padding must be symmetric."""
    h0, h1, w0, w1 = case.padding
    assert h0 == h1 and w0 == w1, "asymmetric padding reaches the public function only as 'same'"
    return case.stride, (h0, w0), case.dilation, case.groups


# Relative to the largest reference magnitude: fp32 accumulation over at most a few hundred terms.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def close(actual, expected, dtype):
    tol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol * scale)


def check_forward_and_every_gradient(forward_op, with_ungated_op, backward_op, case: Case, dtype, device):
    """The three ops of one backend (forward, forward with the ungated output, backward) against the
    oracle: outputs, closed channels exactly zero, every gradient with and without the saved ungated
    output."""
    inputs = make_inputs(case, dtype=dtype, device=device)
    args = conv_args(case)
    y = forward_op(*inputs, *args)
    out, ungated = with_ungated_op(*inputs, *args)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    # The oracle sees the inputs as rounded to `dtype`, so only the arithmetic differs.
    y_ref, ungated_ref, grads_ref = oracle(inputs, case, grad_out)
    close(y, y_ref, dtype)
    close(out, y_ref, dtype)
    close(ungated, ungated_ref, dtype)
    if inputs[4] is not None:
        closed = (inputs[4] == 0)[:, :, None, None].expand_as(y)
        assert (y[closed] == 0).all()
    check_backward_op(backward_op, grad_out, inputs, ungated, args, grads_ref, lambda a, e: close(a, e, dtype))


def check_backward_op(backward_op, grad_out, inputs, ungated, args, grads_ref, close_to):
    """The backward op's five gradients, with and without the saved ungated output, against the
    oracle's (`close_to(got, expected)` is the caller's comparison); empty where an input is None."""
    for saved in (None, ungated):
        grads = backward_op(grad_out, *inputs, saved, *args, [True] * 5)
        for got, expected in zip(grads, grads_ref):
            if expected is None:
                assert got.numel() == 0
            else:
                close_to(got, expected)
