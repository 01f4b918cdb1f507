"""gated_conv2d's CUDA kernels against the float64 dense masked formulation and the CPU kernels.

Skipped without a GPU and the compiled CUDA kernels.
"""

import pytest
import torch

import condkernels
from conftest import needs_cuda_kernels
from gated_conv2d_cases import (CASES, TOLERANCES, Case, check_forward_and_every_gradient, close, conv_args,
                                make_inputs, oracle, public_args)

pytestmark = needs_cuda_kernels

forward_op = torch.ops.condkernels.gated_conv2d.default
with_ungated_op = torch.ops.condkernels._gated_conv2d_with_ungated.default
backward_op = torch.ops.condkernels._gated_conv2d_backward.default


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_every_gradient(case: Case, dtype):
    check_forward_and_every_gradient(forward_op, with_ungated_op, backward_op, case, dtype, "cuda")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_cpu(case: Case):
    cpu_inputs = make_inputs(case, dtype=torch.float32)
    gpu_inputs = [None if t is None else t.cuda() for t in cpu_inputs]
    args = conv_args(case)
    torch.testing.assert_close(forward_op(*gpu_inputs, *args).cpu(), forward_op(*cpu_inputs, *args),
                               rtol=1e-4, atol=1e-4)
    grad_out = torch.randn(forward_op(*cpu_inputs, *args).shape)
    cpu_grads = backward_op(grad_out, *cpu_inputs, None, *args, [True] * 5)
    gpu_grads = backward_op(grad_out.cuda(), *gpu_inputs, None, *args, [True] * 5)
    for got, expected in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_public_function_training_and_channels_last():
    case = CASES[3]
    inputs = make_inputs(case, device="cuda")
    leaves = [t.clone().requires_grad_() for t in inputs]
    x_cl = leaves[0].contiguous(memory_format=torch.channels_last)
    y = condkernels.gated_conv2d(x_cl, *leaves[1:], *public_args(case), backend="cuda")
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    y_ref, _, grads_ref = oracle(inputs, case, grad_out)
    close(y.detach(), y_ref, torch.float64)
    for leaf, expected in zip(leaves, grads_ref):
        close(leaf.grad, expected, torch.float64)


def test_nan_gate_stays_in_its_example():
    case = CASES[0]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device="cuda")
    in_gate[2, 3] = float("nan")
    y = forward_op(x, weight, bias, in_gate, out_gate, *conv_args(case))
    y_ref, _, _ = oracle((x, weight, bias, in_gate, out_gate), case)
    assert torch.isnan(y[2]).any()
    for b in (0, 1, 3):
        close(y[b], y_ref[b], torch.float64)


def test_many_channels_and_large_planes():
    """More channels than a warp and a tile, more pixels than a tile: every index path of the lists."""
    case = Case("wide", 3, 70, 40, 3, (19, 17), stride=2, padding=(1, 1, 1, 1), groups=2, kind="relu")
    inputs = make_inputs(case, device="cuda")
    grad_out_shape = forward_op(*inputs, *conv_args(case)).shape
    grad_out = torch.randn(grad_out_shape, dtype=torch.float64, device="cuda")
    y_ref, _, grads_ref = oracle(inputs, case, grad_out)
    close(forward_op(*inputs, *conv_args(case)), y_ref, torch.float64)
    for got, expected in zip(backward_op(grad_out, *inputs, None, *conv_args(case), [True] * 5), grads_ref):
        close(got, expected, torch.float64)


def test_gradcheck():
    case = Case("tiny", 2, 3, 4, 3, (4, 4), padding=(1, 1, 1, 1), kind="relu")
    inputs = tuple(t.requires_grad_() for t in make_inputs(case, device="cuda"))
    fn = lambda *t: condkernels.gated_conv2d(*t, *public_args(case), backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def test_opcheck():
    case = CASES[3]
    inputs = make_inputs(case, dtype=torch.float32, device="cuda")
    args = (*inputs, *conv_args(case))
    torch.library.opcheck(forward_op, args)
    torch.library.opcheck(with_ungated_op, args)
    grad_out = torch.randn_like(forward_op(*args))
    torch.library.opcheck(backward_op, (grad_out, *inputs, None, *conv_args(case), [True] * 5))


def test_torch_compile_fullgraph():
    case = CASES[1]
    leaves = [t.clone().requires_grad_() for t in make_inputs(case, device="cuda")]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, weight, bias, in_gate, out_gate):
        return torch.relu(with_ungated_op(x, weight, bias, in_gate, out_gate, *conv_args(case))[0]).sum()

    block(*leaves).backward()
    grad_out = (oracle(leaves, case)[0] > 0).double()
    _, _, grads_ref = oracle(leaves, case, grad_out)
    for leaf, expected in zip(leaves, grads_ref):
        close(leaf.grad, expected, torch.float64)
