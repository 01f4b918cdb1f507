"""gated_conv2d's Triton kernels (interpreted on the CPU without a GPU) against the float64 dense
masked formulation."""

import pytest
import torch

import condkernels
from conftest import HAS_GPU
from gated_conv2d_cases import CASES, Case, conv_args, make_inputs, oracle

triton_mod = pytest.importorskip("condkernels.triton.gated_conv2d")

DEVICE = "cuda" if HAS_GPU else "cpu"
forward_op = torch.ops.condkernels.gated_conv2d_triton.default
with_ungated_op = torch.ops.condkernels._gated_conv2d_with_ungated_triton.default
backward_op = torch.ops.condkernels._gated_conv2d_triton_backward.default


def close(actual, expected, tol=1e-10):
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_every_gradient(case: Case):
    inputs = make_inputs(case, device=DEVICE)
    args = conv_args(case)
    y = forward_op(*inputs, *args)
    out, ungated = with_ungated_op(*inputs, *args)
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y_ref, ungated_ref, grads_ref = oracle(inputs, case, grad_out)
    close(y, y_ref)
    close(out, y_ref)
    close(ungated, ungated_ref)
    # Closed outputs are exactly zero, not merely small.
    if inputs[4] is not None:
        closed = (inputs[4] == 0)[:, :, None, None].expand_as(y)
        assert (y[closed] == 0).all() and (out[closed] == 0).all()

    # Through the public function and autograd, in training mode (the with_ungated path) ...
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    stride, padding, dilation, groups = args
    y_pub = condkernels.gated_conv2d(*leaves, stride, padding, dilation, groups, backend="triton")
    y_pub.backward(grad_out)
    close(y_pub.detach(), y_ref)
    for leaf, expected in zip(leaves, grads_ref):
        if leaf is not None:
            close(leaf.grad, expected)
    # ... and through the backward op alone, with and without the saved ungated output.
    for saved in (None, ungated):
        grads = backward_op(grad_out, *inputs, saved, *args, [True] * 5)
        for got, expected in zip(grads, grads_ref):
            if expected is None:
                assert got.numel() == 0
            else:
                close(got, expected)


def test_output_mask_returns_only_what_is_asked():
    case = CASES[1]
    inputs = make_inputs(case, device=DEVICE)
    grad_out = torch.randn_like(forward_op(*inputs, *conv_args(case)))
    _, _, grads_ref = oracle(inputs, case, grad_out)
    for i in range(5):
        mask = [j == i for j in range(5)]
        grads = backward_op(grad_out, *inputs, None, *conv_args(case), mask)
        for j, got in enumerate(grads):
            if j == i:
                close(got, grads_ref[j])
            else:
                assert got.numel() == 0


def test_inference_path_needs_no_gate_gradient():
    """Gates without grad: the inference op runs and x / weight still get exact gradients."""
    case = CASES[2]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device=DEVICE)
    x.requires_grad_()
    weight.requires_grad_()
    y = condkernels.gated_conv2d(x, weight, bias, in_gate, out_gate, *conv_args(case), backend="triton")
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    _, _, grads_ref = oracle((x, weight, bias, in_gate, out_gate), case, grad_out)
    close(x.grad, grads_ref[0])
    close(weight.grad, grads_ref[1])


def test_float32_and_channels_last():
    case = CASES[3]
    inputs = make_inputs(case, dtype=torch.float32, device=DEVICE)
    x = inputs[0].contiguous(memory_format=torch.channels_last)
    y = forward_op(x, *inputs[1:], *conv_args(case))
    assert y.is_contiguous(memory_format=torch.channels_last)
    y_ref, _, _ = oracle(inputs, case)
    close(y, y_ref, tol=1e-4)
    grad_out = torch.randn_like(y)
    grads = backward_op(grad_out, x, *inputs[1:], None, *conv_args(case), [True] * 5)
    _, _, grads_ref = oracle(inputs, case, grad_out)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for got, expected in zip(grads, grads_ref):
        close(got, expected, tol=1e-4)


def test_nan_and_negative_gates_stay_in_their_example():
    case = CASES[0]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device=DEVICE)
    in_gate[2, 3] = float("nan")
    out_gate[2, 1] = -2.0
    out_gate[3, 0] = -0.0  # closed, like +0
    y = forward_op(x, weight, bias, in_gate, out_gate, *conv_args(case))
    y_ref, _, _ = oracle((x, weight, bias, in_gate, out_gate), case)
    assert torch.isnan(y[2]).any()
    for b in (0, 1, 3):
        close(y[b], y_ref[b])
    assert (y[3, 0] == 0).all()


def test_nonfinite_x_in_a_closed_input_channel_is_not_read():
    case = CASES[0]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device=DEVICE)
    in_gate[2, 0] = 0.0
    x_clean = x.clone()
    x[2, 0] = float("inf")
    y = forward_op(x, weight, bias, in_gate, out_gate, *conv_args(case))
    close(y, oracle((x_clean, weight, bias, in_gate, out_gate), case)[0])


def test_gradcheck():
    case = Case("tiny", 2, 3, 4, 3, (4, 4), padding=(1, 1, 1, 1), kind="relu")
    inputs = [None if t is None else t.requires_grad_() for t in make_inputs(case, device=DEVICE)]
    inputs[3][0, 1] = 0.0  # a closed gate of each kind, away from the finite-difference kink at 0
    inputs[4][1, 2] = 0.0
    fn = lambda *t: condkernels.gated_conv2d(*t, *conv_args(case), backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=True)


def test_opcheck():
    case = CASES[3]
    inputs = make_inputs(case, device=DEVICE)
    args = (*inputs, *conv_args(case))
    torch.library.opcheck(forward_op, args)
    torch.library.opcheck(with_ungated_op, args)
    grad_out = torch.randn_like(forward_op(*args))
    torch.library.opcheck(backward_op, (grad_out, *inputs, None, *conv_args(case), [True, True, True, True, False]))


def test_torch_compile_fullgraph():
    case = CASES[1]
    leaves = [t.clone().requires_grad_() for t in make_inputs(case, device=DEVICE)]

    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, weight, bias, in_gate, out_gate):
        y = condkernels.gated_conv2d(x, weight, bias, in_gate, out_gate, 1, 1, backend="triton")
        return torch.relu(y).sum()

    block(*leaves).backward()
    grad_out = (oracle(leaves, case)[0] > 0).double()
    _, _, grads_ref = oracle(leaves, case, grad_out)
    for leaf, expected in zip(leaves, grads_ref):
        close(leaf.grad, expected)


def test_errors_name_the_argument():
    case = CASES[0]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device=DEVICE)
    with pytest.raises(ValueError, match="in_gate"):
        forward_op(x, weight, bias, in_gate[:, :-1], out_gate, *conv_args(case))
    with pytest.raises(TypeError, match="out_gate"):
        forward_op(x, weight, bias, in_gate, out_gate.float(), *conv_args(case))
    with pytest.raises(ValueError, match="grad_out"):
        backward_op(x, x, weight, bias, in_gate, out_gate, None, *conv_args(case), [True] * 5)


def test_empty_batch():
    case = CASES[1]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device=DEVICE)
    x, in_gate, out_gate = x[:0], in_gate[:0], out_gate[:0]
    y = forward_op(x, weight, bias, in_gate, out_gate, *conv_args(case))
    assert y.shape[0] == 0
    grads = backward_op(y, x, weight, bias, in_gate, out_gate, None, *conv_args(case), [True] * 5)
    assert (grads[1] == 0).all() and (grads[2] == 0).all()
