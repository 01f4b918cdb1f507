"""The CUDA kernels of csrc/cuda/, run without a GPU: compiled for the host with emulated CUDA
(python_tests/cuda_emulation/: one host thread per CUDA thread, real block barriers and warp
exchanges, four blocks from across the grid at a time) and checked against the float64 oracles the
GPU tests use.

This runs the kernels' indexing, tiling, synchronisation, atomics and the host code that plans
their launches, on every path, dtype and layout; it cannot show what only the device does (its
memory model, its scheduling, its speed). Kept small: every emulated CUDA thread is a host thread.
"""

import math
import pathlib
import shutil

import pytest
import scipy.special
import torch

from gated_conv2d_cases import CASES as GATED_CASES
from gated_conv2d_cases import Case, check_forward_and_every_gradient
from test_cond_conv2d import make_inputs, pad4, per_example_oracle
from test_cond_conv2d_cuda import DTYPE_TOL, SHAPE, SHAPES
from test_cond_conv2d_cuda import _rel_err as rel_err

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def emulated():
    from cuda_emulation import build

    return build.build(ROOT / "build" / "cuda_emulation")


# --- cond_conv2d ----------------------------------------------------------------------------------


def cond_conv2d_case(emulated, shape, dtype, channels_last, batch=3, experts=4):
    name, cin, cout, groups, k, hw, stride, dilation, padding = shape
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, groups, True, dtype=dtype, seed=0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p4 = list(pad4(padding, hw, k, stride, dilation))
    args = ([stride] * 2, p4, [dilation] * 2, groups)
    y = emulated.cond_conv2d(x, r, w, b, *args)
    assert y.dtype == dtype and y.shape[0] == batch
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)

    ref = [t.detach().double().clone().requires_grad_(True) for t in (x, r, w, b)]
    y_ref = per_example_oracle(*ref, stride, p4, dilation, groups)
    tol = DTYPE_TOL[dtype]  # the GPU test's
    assert rel_err(y, y_ref) < tol, "y"
    grad = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y_ref * grad).sum().backward()
    grads = emulated._cond_conv2d_backward(grad.to(dtype), x, r, w, b, *args, [True] * 4)
    assert grads[0].stride() == x.stride()  # laid out like x, as the fake kernel promises
    for arg, got, want in zip(("x", "routing", "weight", "bias"), grads, ref):
        assert got.shape == want.shape, arg
        assert rel_err(got, want.grad) < 4 * tol, arg


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_cond_conv2d_every_path(emulated, shape, channels_last):
    cond_conv2d_case(emulated, shape, torch.float32, channels_last)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [SHAPE[n] for n in ("pointwise", "depthwise_k3", "dense_k3", "grouped_k3_s2")],
                         ids=lambda s: s[0])
def test_cond_conv2d_dtypes(emulated, shape, dtype):
    cond_conv2d_case(emulated, shape, dtype, channels_last=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_cond_conv2d_small_batches_and_one_expert(emulated, batch):
    for shape in (SHAPE["pointwise"], SHAPE["dense_k3"], SHAPE["depthwise_k3"]):
        cond_conv2d_case(emulated, shape, torch.float64, channels_last=True, batch=batch, experts=1)


# --- gated_conv2d ---------------------------------------------------------------------------------


GATED_RUNS = [(case, dtype) for case in GATED_CASES for dtype in (torch.float32, torch.float64)] + [
    (case, dtype) for case in GATED_CASES[:4] for dtype in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", GATED_RUNS, ids=[f"{c}-{d}" for c, d in GATED_RUNS])
def test_gated_conv2d_forward_and_every_gradient(emulated, case: Case, dtype):
    """The GPU test's check (and tolerances), on the emulated ops."""
    check_forward_and_every_gradient(emulated.gated_conv2d, emulated._gated_conv2d_with_ungated,
                                     emulated._gated_conv2d_backward, case, dtype, "cpu")


# --- beta CDF and the batch-shaping loss ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_beta_cdf_and_its_gradient(emulated, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(300, generator=gen, dtype=torch.float64)
    x[:3] = torch.tensor([0.0, 1.0, 1e-12])
    a = 0.1 + 3 * torch.rand(300, generator=gen, dtype=torch.float64)
    b = 0.1 + 3 * torch.rand(300, generator=gen, dtype=torch.float64)
    got = emulated.beta_cdf(x.to(dtype), a.to(dtype), b.to(dtype))
    want = torch.from_numpy(scipy.special.betainc(a.to(dtype).double().numpy(), b.to(dtype).double().numpy(),
                                                  x.to(dtype).double().numpy()))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    # d/dx I_x(a, b) = x^(a-1) (1-x)^(b-1) / B(a, b), times the incoming gradient.
    inner = x[3:].to(dtype).double()
    grad = torch.randn(297, generator=gen, dtype=torch.float64)
    got = emulated._beta_cdf_backward(grad.to(dtype), x[3:].to(dtype), a[3:].to(dtype), b[3:].to(dtype))
    a_, b_ = a[3:].to(dtype).double(), b[3:].to(dtype).double()
    log_pdf = (a_ - 1) * inner.log() + (b_ - 1) * torch.log1p(-inner) - (
        torch.lgamma(a_) + torch.lgamma(b_) - torch.lgamma(a_ + b_))
    want = grad.to(dtype).double() * log_pdf.exp()
    torch.testing.assert_close(got.double(), want, rtol=100 * tol, atol=100 * tol)


# Every prior, reduction and density clip at a small batch; two of them at the larger ones.
SHAPING_ARGS = [(prior, pa, pb, reduction, lo, hi, 1e-6)
                for reduction in ("paper", "mean", "sum")
                for prior, pa, pb in (("beta", 0.6, 0.4), ("gaussian", 0.4, 0.2), ("uniform", 0.0, 1.0))
                for lo, hi in ((0.0, math.inf), (0.05, 3.0))]


@pytest.mark.parametrize("rows", [7, 600, 1024, 1500])
def test_batch_shaping_loss_matches_the_cpu_kernels(emulated, rows):
    """Against the CPU kernels (themselves checked against scipy in test_batch_shaping.py), with
    ties and a constant column. Up to 1024 rows one block sorts each column in shared memory (600
    and 1024: 512 threads, two elements each); 1500 rows take the sorted-values kernel."""
    gen = torch.Generator().manual_seed(rows)
    gates = torch.rand(rows, 5, generator=gen, dtype=torch.float64)
    gates[: rows // 3, 1] = 0.5  # ties
    gates[:, 2] = 0.0
    for args in SHAPING_ARGS if rows < 100 else (SHAPING_ARGS[0], SHAPING_ARGS[9]):
        got = emulated.batch_shaping_loss(gates, *args)
        want = torch.ops.condkernels.batch_shaping_loss(gates, *args)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
