"""Triton path of ``batch_shaping_loss``: registered as the custom op
``condkernels::batch_shaping_loss_triton``.

torch's segmented sort orders each gate's batch (stable: ties keep batch order, NaN last); one
Triton kernel then evaluates the prior on every sorted value and writes the loss term and the
gradient of the sorted position at its value's batch row in one pass. The backward is a multiply
by the incoming gradient (``condkernels/ops/batch_shaping.py``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .beta_cdf import MAX_TERMS, beta_cdf_pdf, tolerance

BLOCK = 256
PRIOR_CODES = {"beta": 0, "gaussian": 1, "uniform": 2}


@triton.jit
def _sorted_terms_kernel(values_ptr, order_ptr, grad_ptr, terms_ptr, params_ptr, n, total,
                         PRIOR: tl.constexpr, TOL: tl.constexpr, MAX: tl.constexpr, BLOCK: tl.constexpr):
    # float64 scalars come through memory: scalar float arguments would be float32
    p0 = tl.load(params_ptr + 0)
    p1 = tl.load(params_ptr + 1)
    lbeta = tl.load(params_ptr + 2)
    scale = tl.load(params_ptr + 3)
    pdf_lo = tl.load(params_ptr + 4)
    pdf_hi = tl.load(params_ptr + 5)
    eps = tl.load(params_ptr + 6)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    v = tl.load(values_ptr + offs, mask=mask, other=0.5).to(tl.float64)
    position = offs % n
    if PRIOR == 0:
        x = tl.where(v < eps, eps, tl.where(v > 1.0 - eps, 1.0 - eps, v))  # NaN passes through
        ones = tl.full(x.shape, 1.0, tl.float64)
        cdf, pdf = beta_cdf_pdf(x, ones * p0, ones * p1, ones * lbeta, TOL, MAX)
    elif PRIOR == 1:
        z = (v - p0) / p1
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * (0.3989422804014327 / p1)
    else:
        cdf = tl.where(v < p0, 0.0, tl.where(v > p1, 1.0, (v - p0) / (p1 - p0)))
        pdf = tl.where((v < p0) | (v > p1), 0.0, 1.0 / (p1 - p0))
        pdf = tl.where(v != v, v, pdf)
    residual = (position + 1).to(tl.float64) / (n + 1) - cdf
    clipped = tl.where(pdf < pdf_lo, pdf_lo, tl.where(pdf > pdf_hi, pdf_hi, pdf))
    row = tl.load(order_ptr + offs, mask=mask, other=0)
    tl.store(grad_ptr + (offs - position) + row, (-2.0 * scale * residual * clipped).to(grad_ptr.dtype.element_ty),
             mask=mask)
    tl.store(terms_ptr + offs, residual * residual, mask=mask)


@torch.library.custom_op("condkernels::batch_shaping_loss_triton", mutates_args=())
def batch_shaping_loss_triton(gates: Tensor, prior: str, prior_a: float, prior_b: float, reduction: str,
                              pdf_lo: float, pdf_hi: float, eps: float) -> tuple[Tensor, Tensor]:
    n = gates.shape[0]
    columns = gates.reshape(n, -1).t().contiguous()  # (G, N): a gate's batch is contiguous
    g = columns.shape[0]
    values, order = torch.sort(columns, dim=1, stable=True)
    grad_t = torch.empty_like(columns)
    terms = torch.empty(columns.shape, dtype=torch.float64, device=gates.device)
    scale = {"paper": 1.0 / n, "sum": 1.0, "mean": 1.0 / (n * g)}[reduction]
    lbeta = math.lgamma(prior_a) + math.lgamma(prior_b) - math.lgamma(prior_a + prior_b) if prior == "beta" else 0.0
    total = n * g
    params = torch.tensor([prior_a, prior_b, lbeta, scale, pdf_lo, pdf_hi, eps], dtype=torch.float64,
                          device=gates.device)
    _sorted_terms_kernel[(triton.cdiv(total, BLOCK),)](
        values, order, grad_t, terms, params, n, total, PRIOR=PRIOR_CODES[prior], TOL=tolerance(gates.dtype),
        MAX=MAX_TERMS, BLOCK=BLOCK,
    )
    loss = (terms.sum() * scale).to(gates.dtype)
    return loss, grad_t.t().contiguous().view(gates.shape)


def _register() -> None:
    from ..ops.batch_shaping import register_variant

    register_variant("condkernels::batch_shaping_loss_triton")


_register()
