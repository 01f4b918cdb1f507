"""Triton kernels of ``beta_cdf`` and its backward, registered as the custom ops
``condkernels::beta_cdf_triton`` / ``condkernels::_beta_cdf_triton_backward``.

Same algorithm as ``csrc/common/beta_cdf_math.h`` (modified Lentz with the symmetry switch, one
division per step), in float64 per element; a block loops until its slowest lane has converged.
log B(a, b) is computed by the launcher with ``torch.lgamma`` (Triton has no lgamma).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 256
MAX_TERMS = 1000
TINY = 1e-150


def tolerance(dtype: torch.dtype) -> float:
    """Relative change of the continued fraction at which it has converged (as in the C++ code)."""
    return 1e-15 if dtype == torch.float64 else 1e-7


@triton.jit
def _lentz_step(g, c, d, term):
    q = 1.0 + term * d
    q = tl.where(tl.abs(q) < 1e-150, 1e-150, q)
    r = 1.0 / (c * q)  # one division gives 1/c and 1/q
    c_new = 1.0 + term * (r * q)
    c_new = tl.where(tl.abs(c_new) < 1e-150, 1e-150, c_new)
    d_new = r * c
    delta = c_new * d_new
    return g * delta, c_new, d_new, tl.abs(delta - 1.0)


@triton.jit
def beta_cdf_pdf(x, a, b, lbeta, TOL: tl.constexpr, MAX: tl.constexpr):
    """I_x(a, b) and the Beta(a, b) density for float64 blocks x, a, b, lbeta = log B(a, b)."""
    valid = (a > 0.0) & (b > 0.0)
    inside = (x > 0.0) & (x < 1.0)
    xc = tl.where(inside, x, 0.5)
    flip = xc > (a + 1.0) / (a + b + 2.0)
    xs = tl.where(flip, 1.0 - xc, xc)
    aa = tl.where(flip, b, a)
    bb = tl.where(flip, a, b)
    g = tl.full(xs.shape, 1.0, tl.float64)
    c = tl.full(xs.shape, 1.0, tl.float64)
    d = tl.zeros(xs.shape, tl.float64)
    g, c, d, change = _lentz_step(g, c, d, -(aa + bb) / (aa + 1.0) * xs)
    change = tl.where(valid, change, 0.0)
    m = 1
    while (m < MAX) & (tl.max(change, axis=0) >= TOL):
        even = m * (bb - m) / ((aa + 2 * m - 1) * (aa + 2 * m)) * xs
        g, c, d, ch_even = _lentz_step(g, c, d, even)
        odd = -(aa + m) * (aa + bb + m) / ((aa + 2 * m) * (aa + 2 * m + 1)) * xs
        g, c, d, ch_odd = _lentz_step(g, c, d, odd)
        change = tl.where(valid, tl.maximum(ch_even, ch_odd), 0.0)
        m += 1
    log_x = tl.log(xc)
    log_1mx = tl.log(1.0 - xc)
    log_front = a * log_x + b * log_1mx - lbeta
    tail = tl.exp(log_front) / (aa * g)
    cdf = tl.where(flip, 1.0 - tail, tail)
    pdf = tl.exp(log_front - log_x - log_1mx)
    cdf = tl.where(x <= 0.0, 0.0, tl.where(x >= 1.0, 1.0, cdf))
    pdf = tl.where(inside, pdf, _pdf_outside(x, a, b, lbeta))
    nan = (x != x) | ~valid
    return tl.where(nan, float("nan"), cdf), tl.where(nan, float("nan"), pdf)


@triton.jit
def _pdf_outside(x, a, b, lbeta):
    # 0 outside [0, 1]; at the end points the limit (0 * log 0 taken as 0)
    at0 = tl.where(a == 1.0, 0.0, (a - 1.0) * tl.log(tl.maximum(x, 0.0)))
    at1 = tl.where(b == 1.0, 0.0, (b - 1.0) * tl.log(tl.maximum(1.0 - x, 0.0)))
    end = tl.exp(tl.where(x == 0.0, at0, at1) - lbeta)
    return tl.where((x == 0.0) | (x == 1.0), end, 0.0)


@triton.jit
def _beta_cdf_kernel(x_ptr, a_ptr, b_ptr, lbeta_ptr, grad_ptr, out_ptr, n, param_stride,
                     WITH_GRAD: tl.constexpr, TOL: tl.constexpr, MAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.5).to(tl.float64)
    a = tl.load(a_ptr + offs * param_stride, mask=mask, other=1.0).to(tl.float64)
    b = tl.load(b_ptr + offs * param_stride, mask=mask, other=1.0).to(tl.float64)
    lbeta = tl.load(lbeta_ptr + offs * param_stride, mask=mask, other=0.0)
    cdf, pdf = beta_cdf_pdf(x, a, b, lbeta, TOL, MAX)
    if WITH_GRAD:
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float64)
        tl.store(out_ptr + offs, (grad * pdf).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + offs, cdf.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: Tensor, a: Tensor, b: Tensor, grad: Tensor | None) -> Tensor:
    shape = torch.broadcast_shapes(x.shape, a.shape, b.shape)
    xe = x.expand(shape).contiguous()
    if a.numel() == 1 and b.numel() == 1:
        ae, be, stride = a.reshape(1).contiguous(), b.reshape(1).contiguous(), 0
    else:
        ae, be, stride = a.expand(shape).contiguous(), b.expand(shape).contiguous(), 1
    ad, bd = ae.double(), be.double()
    lbeta = (torch.lgamma(ad) + torch.lgamma(bd) - torch.lgamma(ad + bd)).contiguous()
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    n = out.numel()
    if n:
        g = grad.contiguous() if grad is not None else xe
        _beta_cdf_kernel[(triton.cdiv(n, BLOCK),)](
            xe, ae, be, lbeta, g, out, n, stride, WITH_GRAD=grad is not None,
            TOL=tolerance(x.dtype), MAX=MAX_TERMS, BLOCK=BLOCK,
        )
    return out


@torch.library.custom_op("condkernels::beta_cdf_triton", mutates_args=())
def beta_cdf_triton(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return _launch(x, a, b, None)


@torch.library.custom_op("condkernels::_beta_cdf_triton_backward", mutates_args=())
def _beta_cdf_triton_backward(grad: Tensor, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
    full = _launch(x, a, b, grad)
    return full.sum_to_size(x.shape).clone() if full.shape != x.shape else full


def _register() -> None:
    from ..ops.beta_cdf import register_variant

    register_variant("condkernels::beta_cdf_triton", "condkernels::_beta_cdf_triton_backward")


_register()
