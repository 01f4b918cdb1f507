"""gated_conv2d's Triton kernels (interpreted on the CPU without a GPU) against the float64 dense
masked formulation."""

import pytest
import torch

import condkernels
from conftest import HAS_GPU
from gated_conv2d_cases import CASES, Case, check_backward_op, conv_args, make_inputs, oracle, public_args

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

    # Through autograd in training mode (the with_ungated op; the public function's path when
    # out_gate requires grad) ...
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    stride, padding, dilation, groups = args
    if padding[0] == padding[1] and padding[2] == padding[3]:
        y_train = condkernels.gated_conv2d(*leaves, stride, (padding[0], padding[2]), dilation, groups,
                                           backend="triton")
    else:  # the public function spells asymmetric padding only as "same"
        y_train = with_ungated_op(*leaves, *args)[0]
    y_train.backward(grad_out)
    close(y_train.detach(), y_ref)
    for leaf, expected in zip(leaves, grads_ref):
        if leaf is not None:
            close(leaf.grad, expected)
    # ... and through the backward op alone, with and without the saved ungated output.
    check_backward_op(backward_op, grad_out, inputs, ungated, args, grads_ref, close)


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
    case = CASES[3]
    x, weight, bias, in_gate, out_gate = make_inputs(case, device=DEVICE)
    x.requires_grad_()
    weight.requires_grad_()
    y = condkernels.gated_conv2d(x, weight, bias, in_gate, out_gate, *public_args(case), backend="triton")
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
    inputs = make_inputs(case, device=DEVICE)
    inputs[3][0, 1] = 0.0  # closed gates: the gradient must reach them too
    inputs[4][1, 2] = 0.0
    inputs = [t.requires_grad_() for t in inputs]
    fn = lambda *t: condkernels.gated_conv2d(*t, *public_args(case), backend="triton")  # noqa: E731
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

    # The registered ops with their autograd, as the public function calls them in training mode.
    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, weight, bias, in_gate, out_gate):
        y = with_ungated_op(x, weight, bias, in_gate, out_gate, *conv_args(case))[0]
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
