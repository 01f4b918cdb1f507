"""The Triton kernels of cond_conv2d, path by path (on the CPU under TRITON_INTERPRET=1 without a GPU).

test_cond_conv2d.py already runs its randomised cases with backend="triton"; this file checks what is
specific to the Triton variant: each kernel family against a float64 oracle, half-precision
tolerance, the backward op's output_mask contract, its registration, torch.compile through it, and,
without a GPU, that the kernels compile for sm_90 and that the triton_op path hands them to AOTAutograd.
"""

import pytest
import torch

pytest.importorskip("triton")

import condkernels  # noqa: E402
from condkernels.triton import cond_conv2d as tk  # noqa: E402
from conftest import HAS_GPU  # noqa: E402
from test_cond_conv2d import make_inputs, per_example_oracle  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"

# (name, cin, cout, groups, k, stride, padding (h0, h1, w0, w1), dilation): one case per kernel family.
PATHS = [
    ("pointwise", 6, 10, 1, 1, 1, (0, 0, 0, 0), 1),
    ("pointwise_strided_padded", 5, 7, 1, 1, 2, (1, 0, 0, 1), 1),
    ("depthwise", 6, 6, 6, 3, 1, (1, 1, 1, 1), 1),
    ("depthwise_strided_dilated", 5, 5, 5, 3, 2, (2, 1, 1, 2), 2),
    ("depthwise_multiplier_2", 4, 8, 4, 3, 1, (1, 1, 1, 1), 1),
    ("dense_k3", 5, 7, 1, 3, 1, (1, 1, 1, 1), 1),
    ("dense_k5_strided", 3, 4, 1, 5, 2, (2, 2, 1, 2), 1),
    ("grouped", 6, 9, 3, 3, 1, (0, 1, 1, 0), 2),
    ("rect_3x1", 4, 6, 1, (3, 1), 1, (1, 1, 0, 0), 1),
]


def path_inputs(case, batch=3, experts=3, hw=(6, 7), dtype=torch.float64, seed=0, bias=True):
    _, cin, cout, groups, k, *_ = case
    return make_inputs(batch, cin, cout, experts, k, hw, groups, bias, dtype=dtype, device=DEVICE, seed=seed)


def call_triton(x, r, w, b, case):
    *_, groups, k, stride, padding, dilation = case
    return tk.cond_conv2d_triton(x, r, w, b, [stride] * 2, list(padding), [dilation] * 2, groups)


def oracle_with_grads(x, r, w, b, case, grad):
    *_, groups, k, stride, padding, dilation = case
    inputs = [t.detach().cpu().double().requires_grad_(True) for t in (x, r, w, b) if t is not None]
    rb = inputs[3] if b is not None else None
    y = per_example_oracle(inputs[0], inputs[1], inputs[2], rb, (stride,) * 2, padding, (dilation,) * 2, groups)
    (y * grad.cpu().double()).sum().backward()
    return y.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("case", PATHS, ids=[c[0] for c in PATHS])
def test_each_path_matches_float64_oracle(case):
    x, r, w, b = path_inputs(case)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    y = call_triton(*inputs, case)
    grad = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1)).to(y.device)
    y_ref, grads_ref = oracle_with_grads(x, r, w, b, case, grad)
    torch.testing.assert_close(y.detach().cpu(), y_ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(y, inputs, grad)
    for name, got, want in zip(("x", "routing", "weight", "bias"), grads, grads_ref):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_depthwise_selects_the_direct_kernel_only_for_multiplier_one():
    x = torch.empty(1, 6, 4, 4)
    assert tk._is_depthwise(x, torch.empty(2, 6, 1, 3, 3), 6)
    assert not tk._is_depthwise(x, torch.empty(2, 12, 1, 3, 3), 6)  # multiplier 2: implicit GEMM
    assert not tk._is_depthwise(torch.empty(1, 1, 4, 4), torch.empty(2, 1, 1, 3, 3), 1)


def test_mixing_kernel_against_matmul():
    gen = torch.Generator().manual_seed(4)
    routing = torch.randn(5, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    bias = torch.randn(3, 37, dtype=torch.float64, generator=gen).to(DEVICE)
    torch.testing.assert_close(tk._mix_biases(routing, bias), routing @ bias, rtol=1e-12, atol=1e-12)
    per_example = torch.randn(5, 4, 3, 2, dtype=torch.float64, generator=gen).to(DEVICE)
    out = torch.empty(3, 4, 3, 2, dtype=torch.float64, device=DEVICE)
    want = torch.einsum("be,bn->en", routing, per_example.reshape(5, -1)).reshape(3, 4, 3, 2)
    torch.testing.assert_close(tk._reduce_to_experts(routing, per_example, out), want, rtol=1e-12, atol=1e-12)
    # a non-contiguous destination (an expert-major permutation) is filled through a temporary
    out_t = torch.empty(4, 3, 3, 2, dtype=torch.float64, device=DEVICE).transpose(0, 1)
    torch.testing.assert_close(tk._reduce_to_experts(routing, per_example, out_t), want, rtol=1e-12, atol=1e-12)


def test_routing_grad_split_reduction(monkeypatch):
    """The GPU launch splits <dW_b, W_e> across programs; force that split under the interpreter too."""
    caps = tk._caps()
    monkeypatch.setattr(tk, "_caps", lambda: dict(caps, split_programs=7))
    gen = torch.Generator().manual_seed(5)
    routing = torch.randn(3, 2, dtype=torch.float64, generator=gen).to(DEVICE)
    weight = torch.randn(2, 5, 4, 3, 3, dtype=torch.float64, generator=gen).to(DEVICE)
    bias = torch.randn(2, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    dw = torch.randn(3, 5 * 4 * 9, dtype=torch.float64, generator=gen).to(DEVICE)
    db = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(DEVICE)
    got = tk._routing_grad(routing, dw, weight, db, bias, torch.empty_like(routing))
    want = dw @ weight.reshape(2, -1).T + db @ bias.T
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# Relative to the largest reference value; the inputs' own rounding is the floor (bf16 eps = 7.8e-3).
LOW_PRECISION = [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype,tol", LOW_PRECISION, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", [PATHS[0], PATHS[2], PATHS[7]], ids=["pointwise", "depthwise", "grouped"])
def test_low_precision(case, dtype, tol):
    """Forward and gradients in float32/bfloat16/float16 (fp32 accumulation) within a relative tolerance."""
    x, r, w, b = path_inputs(case, dtype=dtype, seed=2)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    y = call_triton(*inputs, case)
    assert y.dtype == dtype
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype).to(y.device)
    y_ref, grads_ref = oracle_with_grads(x, r, w, b, case, grad)
    grads = torch.autograd.grad(y, inputs, grad)
    for name, got, want in [("y", y.detach(), y_ref)] + list(zip(("x", "routing", "weight", "bias"), grads, grads_ref)):
        assert got.dtype == dtype
        err = (got.cpu().double() - want).abs().max() / want.abs().max()
        assert err < tol, f"{name}: relative error {err:.3g}"


MASKS = [[True, True, True, True], [True, False, False, False], [False, True, False, False],
         [False, False, True, False], [False, False, False, True], [False, True, True, False]]


@pytest.mark.parametrize("case", [PATHS[1], PATHS[3], PATHS[7]], ids=["pointwise", "depthwise", "grouped"])
def test_backward_honours_output_mask(case):
    *_, groups, k, stride, padding, dilation = case
    x, r, w, b = path_inputs(case, seed=6)
    x = x.contiguous(memory_format=torch.channels_last)
    y_ref = per_example_oracle(x, r, w, b, (stride,) * 2, padding, (dilation,) * 2, groups)
    grad = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    grad = grad.contiguous(memory_format=torch.channels_last)
    _, want = oracle_with_grads(x, r, w, b, case, grad)
    args = (grad, x, r, w, b, [stride] * 2, list(padding), [dilation] * 2, groups)
    for mask in MASKS:
        got = tk.triton_backward_op()(*args, mask)
        assert len({id(t) for t in got}) == 4
        for name, asked, g, ref in zip(("x", "routing", "weight", "bias"), mask, got, want):
            if asked:
                torch.testing.assert_close(g.cpu(), ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"{mask} {name}: {m}")
            else:
                assert g.shape == (0,), f"{mask}: {name} was not asked for"
        if mask[0]:
            assert got[0].is_contiguous(memory_format=torch.channels_last)
    # without bias, grad_bias is empty even when asked for
    got = tk.triton_backward_op()(grad, x, r, w, None, *args[5:], [False, False, False, True])
    assert all(t.shape == (0,) for t in got)


def test_channels_last_output_and_strided_inputs():
    case = PATHS[5]
    x, r, w, b = path_inputs(case, seed=8)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    r_t = r.T.contiguous().T  # column-major routing
    w_perm = w.permute(1, 0, 2, 3, 4).contiguous().permute(1, 0, 2, 3, 4)  # expert dim not outermost
    y = call_triton(x_cl, r_t, w_perm, b, case)
    assert y.is_contiguous(memory_format=torch.channels_last)
    *_, groups, k, stride, padding, dilation = case
    y_ref = per_example_oracle(x, r, w, b, (stride,) * 2, padding, (dilation,) * 2, groups)
    torch.testing.assert_close(y.cpu(), y_ref.cpu(), rtol=1e-10, atol=1e-10)


def test_empty_batch():
    case = PATHS[5]
    x, r, w, b = path_inputs(case, batch=0)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    y = call_triton(*inputs, case)
    assert y.shape == (0, 7, 6, 7)
    gx, gr, gw, gb = torch.autograd.grad(y.sum(), inputs)
    assert gx.shape == x.shape and gr.shape == r.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_forward_op_checks_its_arguments():
    x, r, w, b = path_inputs(PATHS[5])
    with pytest.raises(ValueError, match="routing has 2 experts"):
        tk.triton_forward_op()(x, r[:, :2], w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="padding must be non-negative"):
        tk.triton_forward_op()(x, r, w, b, [1, 1], [1, -1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="larger than the padded input"):
        tk.triton_forward_op()(x, r, w, b, [1, 1], [0, 0, 0, 0], [4, 4], 1)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        tk.triton_backward_op()(torch.zeros(1, device=DEVICE, dtype=x.dtype), x, r, w, b, [1, 1],
                                [1, 1, 1, 1], [1, 1], 1, [True] * 4)


def test_backward_op_opcheck():
    for case, bias in [(PATHS[0], True), (PATHS[2], True), (PATHS[7], False)]:
        *_, groups, k, stride, padding, dilation = case
        x, r, w, b = path_inputs(case, batch=2, hw=(5, 5), seed=9, bias=bias)
        y = per_example_oracle(x, r, w, b, (stride,) * 2, padding, (dilation,) * 2, groups)
        g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(DEVICE)
        for mask in ([True, True, True, True], [False, True, False, True]):
            torch.library.opcheck(
                tk.triton_backward_op(), (g, x, r, w, b, [stride] * 2, list(padding), [dilation] * 2, groups, mask)
            )


def test_torch_compile_fullgraph_through_triton_variant():
    case = PATHS[5]
    x, r, w, b = path_inputs(case, dtype=torch.float32, seed=10)
    x = x.contiguous(memory_format=torch.channels_last)
    fn = torch.compile(
        lambda *a: torch.relu(condkernels.cond_conv2d(*a, padding=1, backend="triton")),
        fullgraph=True, backend="aot_eager",
    )
    inputs = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    eager_inputs = [t.clone().requires_grad_(True) for t in (x, r, w, b)]
    y = fn(*inputs)
    y_eager = torch.relu(condkernels.cond_conv2d(*eager_inputs, padding=1, backend="triton"))
    torch.testing.assert_close(y, y_eager)
    y.square().sum().backward()
    y_eager.square().sum().backward()
    for got, want in zip(inputs, eager_inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-5)


# Compiles the kernels for an sm_90 target in a separate process without TRITON_INTERPRET: no GPU is
# needed (Triton ships ptxas), and it catches what the interpreter accepts but the compiler rejects.
SM90_COMPILE = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from condkernels.triton import cond_conv2d as tk

def compile_for_sm90(fn, pointers, constexprs):
    signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
                 else "i32" for name in fn.arg_names}
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert kernel.asm["cubin"], fn.__name__

def compile_all(d, dot_only):
    acc, fp64 = ("fp64", True) if d == "fp64" else ("fp32", False)
    dot = dict(FP64=fp64, UPCAST_DOT=False, BLOCK_P=64, BLOCK_K=32)
    compile_for_sm90(tk._conv_fwd_kernel, dict(x_ptr=d, r_ptr=d, w_ptr=d, bmix_ptr=acc, y_ptr=d),
                     dict(KH=3, KW=3, HAS_BIAS=True, BLOCK_CO=64, **dot))
    compile_for_sm90(tk._conv_grad_input_kernel, dict(go_ptr=d, r_ptr=d, w_ptr=d, gx_ptr=d),
                     dict(KH=3, KW=3, BLOCK_CI=64, **dot))
    compile_for_sm90(tk._conv_grad_weight_kernel, dict(go_ptr=d, x_ptr=d, dw_ptr=acc),
                     dict(KH=1, KW=1, BLOCK_CO=64, **dot))
    if dot_only:
        return
    compile_for_sm90(tk._mix_kernel, dict(coef_ptr=d, src_ptr=acc, out_ptr=d), dict(BLOCK_R=4, BLOCK_N=128, FP64=fp64))
    compile_for_sm90(tk._routing_grad_kernel, dict(dw_ptr=acc, w_ptr=d, db_ptr=acc, bias_ptr=d, part_ptr=acc),
                     dict(HAS_BIAS=True, BLOCK_B=16, BLOCK_E=8, BLOCK_N=32, FP64=fp64))
    compile_for_sm90(tk._bias_grad_kernel, dict(go_ptr=d, db_ptr=acc), dict(FP64=fp64, BLOCK_C=64, BLOCK_P=64))
    compile_for_sm90(tk._depthwise_fwd_kernel, dict(x_ptr=d, r_ptr=d, w_ptr=d, bmix_ptr=acc, y_ptr=d),
                     dict(KH=3, KW=3, HAS_BIAS=True, FP64=fp64, BLOCK_C=32, BLOCK_P=128))
    compile_for_sm90(tk._depthwise_grad_input_kernel, dict(go_ptr=d, r_ptr=d, w_ptr=d, gx_ptr=d),
                     dict(KH=3, KW=3, FP64=fp64, BLOCK_C=32, BLOCK_P=128))
    compile_for_sm90(tk._depthwise_grad_weight_kernel, dict(go_ptr=d, x_ptr=d, dw_ptr=acc),
                     dict(KH=3, KW=3, FP64=fp64, BLOCK_C=64, BLOCK_P=64))

# every kernel in fp32; the tl.dot kernels also with the operand types that change their lowering
compile_all("fp32", dot_only=False)
compile_all("bf16", dot_only=True)
compile_all("fp64", dot_only=True)
print("compiled")
'''


@pytest.mark.skipif(HAS_GPU, reason="with a GPU the kernels are compiled and run by the other tests")
def test_kernels_compile_for_sm90():
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", SM90_COMPILE], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]


# Without the interpreter the ops are triton_ops: AOTAutograd must see the kernels as
# triton_kernel_wrapper nodes, not one opaque call. Meta tensors trace without a GPU.
TRACE_TRITON_OP = r'''
import torch
from functorch.compile import aot_function
from condkernels.triton import cond_conv2d as tk

class Traced(Exception):
    pass

def show(gm, _):
    raise Traced(gm.code)

def f(x, r, w, b):
    return tk.cond_conv2d_triton(x, r, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1)

meta = lambda *shape: torch.randn(*shape, device="meta")
try:
    aot_function(f, fw_compiler=show)(meta(2, 4, 6, 6), meta(2, 3), meta(3, 6, 4, 3, 3), meta(3, 6))
except Traced as graph:
    code = str(graph)
    print("kernel nodes:", code.count("torch.ops.higher_order.triton_kernel_wrapper_functional("))
    print("opaque calls:", code.count("condkernels.cond_conv2d_triton"))
'''


@pytest.mark.skipif(HAS_GPU, reason="with a GPU the compile test runs the triton_op path for real")
def test_triton_op_path_exposes_kernels_to_aot_autograd():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", TRACE_TRITON_OP], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # the bias-mixing kernel and the implicit-GEMM convolution
    assert "kernel nodes: 2" in done.stdout and "opaque calls: 0" in done.stdout, done.stdout
