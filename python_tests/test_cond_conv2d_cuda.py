"""The CUDA kernels of cond_conv2d: what needs a GPU (half types, larger shapes hitting every path,
CUDA vs CPU agreement, opcheck on CUDA tensors), plus checks of the build that run without one."""

import pathlib
import shutil
import subprocess

import pytest
import torch

import condkernels
from condkernels import _library
from conftest import needs_cuda_kernels
from test_cond_conv2d import make_inputs, pad4, per_example_oracle

ROOT = pathlib.Path(__file__).resolve().parents[1]

# --- the build ----------------------------------------------------------------------------------


def _extension_links_cuda() -> bool:
    """Whether condkernels._C was linked against torch's CUDA libraries, read from the file itself."""
    path = pathlib.Path(condkernels._C.__file__)
    return b"libc10_cuda.so" in path.read_bytes()


def test_cuda_kernels_registered_iff_built_with_cuda():
    """Two independent facts must agree: the shared library links libc10_cuda exactly when both ops
    have a CUDA kernel in the dispatcher, registered from csrc/cuda/cond_conv2d.cu."""
    linked = _extension_links_cuda()
    registered = [_library.has_kernel(op, "CUDA") for op in ("cond_conv2d", "_cond_conv2d_backward")]
    assert registered == [linked, linked]
    assert condkernels.cuda_built() == linked
    if not linked:
        pytest.skip("condkernels was built without its CUDA kernels")
    assert torch.version.cuda is not None
    dump = torch._C._dispatch_dump("condkernels::cond_conv2d")
    cuda_lines = [line for line in dump.splitlines() if line.startswith("CUDA")]
    assert cuda_lines and "cuda/cond_conv2d.cu" in cuda_lines[0], dump


def test_conv_index_helpers_on_the_host(tmp_path):
    """The index arithmetic the CUDA kernels use (csrc/common/conv_index.h), compiled for the host
    and checked exhaustively against the direct definition of the convolution."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = ROOT / "python_tests" / "cpp" / "check_conv_index.cpp"
    exe = tmp_path / "check_conv_index"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'csrc'}", str(src), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "checked" in result.stdout


# --- on a GPU -----------------------------------------------------------------------------------

# (name, cin, cout, groups, k, hw, stride, dilation, padding): every path and its variants at sizes
# that span several GEMM tiles (64 channels, 64 pixels, 16-deep steps) and ragged edges. The GEMM
# path mixes weights while loading them up to 2 pixel tiles (128 pixels) and premixes them beyond:
# "dense_k3_small" and "grouped_k3_s2" (forward) stay below, the others go above.
SHAPES = [
    ("pointwise", 96, 80, 1, 1, (15, 17), 1, 1, 0),
    ("pointwise_grouped", 96, 80, 4, 1, (9, 11), 1, 1, 0),
    ("pointwise_strided", 48, 72, 1, 1, (13, 13), 2, 1, 0),
    ("depthwise_k3", 72, 72, 72, 3, (17, 15), 1, 1, 1),
    ("depthwise_k5_s2_same", 40, 40, 40, 5, (16, 16), 2, 1, "same"),
    ("depthwise_k3_dil2", 33, 33, 33, 3, (14, 13), 1, 2, "same"),
    ("dense_k3", 40, 70, 1, 3, (14, 12), 1, 1, 1),
    ("dense_k3_small", 24, 40, 1, 3, (8, 9), 1, 1, 1),
    ("dense_k3_s2_same", 24, 36, 1, 3, (16, 16), 2, 1, "same"),
    ("dense_k5_dil2", 12, 20, 1, 5, (17, 15), 1, 2, 2),
    ("dense_k7_valid", 6, 10, 1, 7, (19, 18), 1, 1, "valid"),
    ("grouped_k3", 64, 96, 4, 3, (12, 12), 1, 1, "same"),
    ("grouped_k3_s2", 36, 24, 3, 3, (11, 13), 2, 1, 1),
    ("depthwise_multiplier", 16, 32, 16, 3, (10, 10), 1, 1, 1),
    ("rect_3x1", 20, 28, 1, (3, 1), (10, 9), 1, 1, "same"),
]

SHAPE = {s[0]: s for s in SHAPES}

DTYPE_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _inputs(shape, batch, experts, bias, dtype, channels_last, seed=0):
    name, cin, cout, groups, k, hw, stride, dilation, padding = shape
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, groups, bias, dtype=dtype, device="cuda", seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, r, w, b


def _rel_err(got, want):
    return ((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@needs_cuda_kernels
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_forward_and_backward_against_float64_oracle(shape, dtype, channels_last):
    name, cin, cout, groups, k, hw, stride, dilation, padding = shape
    x, r, w, b = _inputs(shape, 3, 4, True, dtype, channels_last)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    y = condkernels.cond_conv2d(x, r, w, b, stride, padding, dilation, groups, backend="cuda")
    assert y.dtype == dtype and y.device.type == "cuda"
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)

    ref = [t.detach().cpu().double().requires_grad_(True) for t in inputs]
    p4 = pad4(padding, hw, k, stride, dilation)
    y_ref = per_example_oracle(*ref, stride, p4, dilation, groups)
    tol = DTYPE_TOL[dtype]
    assert y.shape == y_ref.shape
    assert _rel_err(y, y_ref) < tol

    grad = torch.randn(y_ref.shape, dtype=torch.float64)
    (y * grad.to(device="cuda", dtype=dtype)).sum().backward()
    (y_ref * grad).sum().backward()
    for arg, got, want in zip(("x", "routing", "weight", "bias"), inputs, ref):
        # reductions over the batch and all pixels: allow a little more than the forward.
        assert _rel_err(got.grad, want.grad) < 4 * tol, arg


@needs_cuda_kernels
@pytest.mark.parametrize("mask", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (1, 1, 1, 1), (0, 1, 1, 0)])
@pytest.mark.parametrize("shape", [SHAPE[n] for n in ("pointwise", "depthwise_k3", "dense_k3_s2_same", "grouped_k3")],
                         ids=lambda s: s[0])
def test_backward_op_honours_output_mask(shape, mask):
    """Requested gradients match the CPU kernels; the others come back as distinct empty tensors."""
    name, cin, cout, groups, k, hw, stride, dilation, padding = shape
    x, r, w, b = _inputs(shape, 2, 3, True, torch.float64, channels_last=False, seed=2)
    p4 = list(pad4(padding, hw, k, stride, dilation))
    y = torch.ops.condkernels.cond_conv2d(x, r, w, b, [stride] * 2, p4, [dilation] * 2, groups)
    g = torch.randn_like(y)
    args = ([stride] * 2, p4, [dilation] * 2, groups, [bool(m) for m in mask])
    got = torch.ops.condkernels._cond_conv2d_backward(g, x, r, w, b, *args)
    want = torch.ops.condkernels._cond_conv2d_backward(*(t.cpu() for t in (g, x, r, w, b)), *args)
    for m, gt, wt in zip(mask, got, want):
        if m:
            torch.testing.assert_close(gt.cpu(), wt, rtol=1e-9, atol=1e-9)
        else:
            assert gt.numel() == 0
    ptrs = [t.data_ptr() for t in got if t.numel()]
    assert len(set(ptrs)) == len(ptrs)


@needs_cuda_kernels
def test_backward_without_bias_returns_empty_grad_bias():
    x, r, w, _ = _inputs(SHAPE["dense_k3"], 2, 3, False, torch.float32, channels_last=True)
    y = torch.ops.condkernels.cond_conv2d(x, r, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    gx, gr, gw, gb = torch.ops.condkernels._cond_conv2d_backward(
        torch.ones_like(y), x, r, w, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, [True, True, True, True])
    assert gb.numel() == 0 and gx.shape == x.shape and gr.shape == r.shape and gw.shape == w.shape
    assert gx.stride() == x.stride()  # grad_x is laid out like x, as the fake kernel promises


@needs_cuda_kernels
@pytest.mark.parametrize("experts", [1, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_cuda_agrees_with_cpu_backend(shape, experts):
    name, cin, cout, groups, k, hw, stride, dilation, padding = shape
    x, r, w, b = _inputs(shape, 5, experts, True, torch.float64, channels_last=True, seed=4)
    y_cuda = condkernels.cond_conv2d(x, r, w, b, stride, padding, dilation, groups, backend="cuda")
    cpu = [t.cpu() for t in (x, r, w, b)]
    y_cpu = condkernels.cond_conv2d(*cpu, stride, padding, dilation, groups, backend="cpu")
    torch.testing.assert_close(y_cuda.cpu(), y_cpu, rtol=1e-10, atol=1e-10)


@needs_cuda_kernels
@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_and_empty_batches(batch):
    x, r, w, b = _inputs(SHAPE["dense_k3"], batch, 3, True, torch.float32, channels_last=False)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    y = condkernels.cond_conv2d(*inputs, padding=1, backend="cuda")
    assert y.shape == (batch, 70, 14, 12)
    y.sum().backward()
    assert inputs[0].grad.shape == x.shape
    if batch == 0:
        assert all(t.grad.abs().sum() == 0 for t in inputs[1:])


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_opcheck_on_cuda_tensors(dtype):
    for shape, cl in [(SHAPE["pointwise"], False), (SHAPE["depthwise_k3"], True), (SHAPE["dense_k3"], True),
                      (SHAPE["grouped_k3"], False)]:
        name, cin, cout, groups, k, hw, stride, dilation, padding = shape
        x, r, w, b = _inputs((name, cin, cout, groups, k, (6, 7), stride, dilation, padding), 2, 3, True, dtype, cl)
        p4 = list(pad4(padding, (6, 7), k, stride, dilation))
        args = [t.requires_grad_(True) for t in (x, r, w, b)]
        torch.library.opcheck(torch.ops.condkernels.cond_conv2d.default,
                              (*args, [stride] * 2, p4, [dilation] * 2, groups))


@needs_cuda_kernels
def test_inputs_on_another_device_are_rejected():
    x, r, w, b = _inputs(SHAPE["dense_k3"], 2, 3, True, torch.float32, channels_last=False)
    with pytest.raises(RuntimeError, match="routing is on"):
        torch.ops.condkernels.cond_conv2d(x, r.cpu(), w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1)
