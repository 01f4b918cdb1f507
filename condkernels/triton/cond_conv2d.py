"""Triton kernels of ``cond_conv2d`` (CondConv) and its backward.

Registered as their own ops, ``condkernels::cond_conv2d_triton`` and
``condkernels::_cond_conv2d_triton_backward`` (same schemas as ``cond_conv2d`` /
``_cond_conv2d_backward``). With compiled kernels (a GPU) they are :func:`torch.library.triton_op`
ops launching through :func:`torch.library.wrap_triton`, so torch.compile sees the kernels
themselves. Under ``TRITON_INTERPRET=1`` they are plain :func:`torch.library.custom_op` ops: eager
calls on CPU tensors work through ``triton_op`` as well, but ``wrap_triton`` returns interpreted
kernels unwrapped, so tracing a ``triton_op`` (torch.compile, ``opcheck``'s AOTAutograd checks)
would launch the interpreter on fake tensors. The fake kernels and the autograd formula are the ones
every variant shares (``condkernels.ops.cond_conv2d.register_variant``).

Kernels (``W_b = sum_e r[b,e] W_e`` is the mixed kernel of example ``b``):

- ``_mix_kernel``: ``out[i, n] = sum_t coef[i, t] src[t, n]``. Forward it mixes the biases
  (``b_b = sum_e r[b,e] bias_e``); backward, with the routing read transposed, it reduces the
  per-example gradients to the experts' (``dW_e = sum_b r[b,e] dW_b``, likewise ``dbias_e``).
- ``_conv_fwd_kernel``: batched implicit GEMM for dense and grouped convolutions, 1x1 included
  (``KH = KW = 1`` is a compile-time special case with no tap arithmetic). The mixing is fused into
  the weight-tile load: each ``(Cout, Cin*kh*kw)`` tile of ``W_b`` is mixed from the E expert tiles
  in registers (fp32, or fp64 for float64) and fed to ``tl.dot``; per-example weights never reach
  memory.
- ``_conv_grad_input_kernel``: the transposed implicit GEMM (``grad_x = W_b^T * grad_y``), same
  fused mixing, with stride/dilation handled by a divisibility mask.
- ``_conv_grad_weight_kernel``: per-example ``dW_b = grad_y x im2col(x)`` into an fp32/fp64 buffer.
- ``_depthwise_fwd_kernel``, ``_depthwise_grad_input_kernel``, ``_depthwise_grad_weight_kernel``:
  direct kernels for depthwise layers (``groups == Cin == Cout``) that mix each example's kxk
  filters in registers, tap by tap.
- ``_bias_grad_kernel``: ``db_b[c] = sum over pixels of grad_y[b, c]``.
- ``_routing_grad_kernel``: ``dr[b,e] = <dW_b, W_e> + <db_b, bias_e>``, the long reduction split
  across programs into partial sums that one ``sum`` adds up.

Precision: accumulation is fp32 (fp64 for float64 inputs). For bfloat16/float16 the mixed weight
tile is rounded to the input dtype before ``tl.dot`` (tensor cores take both operands in one dtype),
as the mixed-weights formulation would store it; the depthwise kernels keep it in fp32. float32
``tl.dot`` runs with ``input_precision="ieee"`` (no TF32). float64 uses ``tl.dot`` too: Triton 3.x
accepts fp64 operands. The interpreter's numpy matmul has no bfloat16, so there (only) bfloat16
operands are widened to fp32 for the product (``UPCAST_DOT``), after the same rounding.

Memory format: every kernel takes element strides, so channels_last input is read in place (no
copy) and the output is written in x's memory format. Offsets use int32 arithmetic except the batch
(and expert-row) terms, so a single example must hold fewer than 2**31 elements.

Verification status: the kernels have been run only under the Triton interpreter
(``TRITON_INTERPRET=1``) on CPU tensors, against float64 oracles in float64/float32/bfloat16/float16
(``python_tests/test_cond_conv2d.py``, ``python_tests/test_cond_conv2d_triton.py``), and compiled
ahead of time for sm_90 down to cubin (``test_kernels_compile_for_sm90``); the ``triton_op`` path has
been traced by AOTAutograd on meta tensors into one ``triton_kernel_wrapper_functional`` node per
kernel (``test_triton_op_path_exposes_kernels_to_aot_autograd``). Nothing has run on a GPU yet: eager
and compiled ``triton_op`` launches, fp64 ``tl.dot`` on hardware, the multi-program split of
``_routing_grad_kernel`` at GPU sizes (exercised under the interpreter by forcing the split) and the
block sizes (untuned) are unverified there, and no timings exist.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops.cond_conv2d import OP, check_args, check_geometry, register_variant
from ._common import acc_dtype as _acc_dtype, acc_zeros as _acc_zeros, block as _block
from ._common import geometry_args as _geometry_args, interpreted as _interpreted, launch as _launch
from ._common import register_op as _register_op
from ..ops._conv_args import memory_format_of

FORWARD_OP = "condkernels::cond_conv2d_triton"
BACKWARD_OP = "condkernels::_cond_conv2d_triton_backward"

_FORWARD_SCHEMA = (
    "(Tensor x, Tensor routing, Tensor weight, Tensor? bias, int[2] stride, int[4] padding, "
    "int[2] dilation, int groups) -> Tensor"
)
_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor routing, Tensor weight, Tensor? bias, int[2] stride, "
    "int[4] padding, int[2] dilation, int groups, bool[4] output_mask) "
    "-> (Tensor grad_x, Tensor grad_routing, Tensor grad_weight, Tensor grad_bias)"
)


# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _acc_zeros_1d(N: tl.constexpr, FP64: tl.constexpr):
    if FP64:
        acc = tl.zeros((N,), dtype=tl.float64)
    else:
        acc = tl.zeros((N,), dtype=tl.float32)
    return acc


@triton.jit
def _mixed_tile(r_ptr, stride_re, w_ptrs, stride_we, mask, E, acc):
    """acc + sum_e r[e] * W_e[tile]: ``w_ptrs`` points at the tile in expert 0, ``r_ptr`` at r[b, 0]."""
    for e in range(E):
        r_e = tl.load(r_ptr).to(acc.dtype)
        acc += r_e * tl.load(w_ptrs, mask=mask, other=0).to(acc.dtype)
        r_ptr += stride_re
        w_ptrs += stride_we
    return acc


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b; UPCAST runs it in fp32 (the interpreter's numpy matmul has no bfloat16)."""
    if UPCAST:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return acc


@triton.jit
def _mix_kernel(
    coef_ptr, src_ptr, out_ptr, ROWS, N, TERMS,
    stride_ci, stride_ct, stride_st, stride_sn, stride_oi, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, FP64: tl.constexpr,
):
    """out[i, n] = sum_t coef[i, t] * src[t, n]."""
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < ROWS
    col_mask = cols < N
    acc = _acc_zeros(BLOCK_R, BLOCK_N, FP64)
    for t in range(TERMS):
        c = tl.load(coef_ptr + rows * stride_ci + t * stride_ct, mask=row_mask, other=0).to(acc.dtype)
        s = tl.load(src_ptr + t * stride_st + cols * stride_sn, mask=col_mask, other=0)
        acc += c[:, None] * s.to(acc.dtype)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_oi + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _routing_grad_kernel(
    dw_ptr, w_ptr, N_W, CHUNK, db_ptr, bias_ptr, N_B, part_ptr, B, E,
    stride_dwb, stride_we, stride_wn, stride_dbb, stride_biase, stride_biasc,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
    FP64: tl.constexpr,
):
    """part[s, b, e] = sum over chunk s of dW_b[n] * W_e[n]; chunk 0 adds <db_b, bias_e>.

    ``dW_b`` is contiguous along n; CHUNK is a multiple of BLOCK_N.
    """
    pid_b = tl.program_id(0)
    pid_e = tl.program_id(1)
    split = tl.program_id(2)
    bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    es = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    b_mask = bs < B
    e_mask = es < E
    acc = _acc_zeros(BLOCK_B, BLOCK_E, FP64)
    start = split * CHUNK
    for n0 in range(0, CHUNK, BLOCK_N):
        n = start + n0 + tl.arange(0, BLOCK_N)
        n_mask = n < N_W
        a = tl.load(dw_ptr + bs[:, None].to(tl.int64) * stride_dwb + n[None, :],
                    mask=b_mask[:, None] & n_mask[None, :], other=0).to(acc.dtype)
        w = tl.load(w_ptr + es[:, None] * stride_we + n[None, :] * stride_wn,
                    mask=e_mask[:, None] & n_mask[None, :], other=0).to(acc.dtype)
        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        if split == 0:
            for c0 in range(0, N_B, BLOCK_N):
                c = c0 + tl.arange(0, BLOCK_N)
                c_mask = c < N_B
                a = tl.load(db_ptr + bs[:, None] * stride_dbb + c[None, :],
                            mask=b_mask[:, None] & c_mask[None, :], other=0).to(acc.dtype)
                w = tl.load(bias_ptr + es[:, None] * stride_biase + c[None, :] * stride_biasc,
                            mask=e_mask[:, None] & c_mask[None, :], other=0).to(acc.dtype)
                acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    out = part_ptr + (split * B + bs[:, None]) * E + es[None, :]
    tl.store(out, acc, mask=b_mask[:, None] & e_mask[None, :])


@triton.jit
def _conv_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bmix_ptr, y_ptr,
    E, COUT_G, CIN_G, GROUPS, H, W, OH, OW,
    sxb, sxc, sxh, sxw, srb, sre, swe, swo, swi, swh, sww, sbb, syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, FP64: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[b, co, p] = sum_k W_b[co, k] * im2col(x[b])[k, p] + b_b[co], one group of one example."""
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // GROUPS).to(tl.int64)
    g = pid_bg % GROUPS
    co_local = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co_local < COUT_G
    co = g * COUT_G + co_local
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < OH * OW
    oh = p // OW
    ow = p % OW
    x_base = x_ptr + b * sxb + g * CIN_G * sxc
    r_base = r_ptr + b * srb
    acc = _acc_zeros(BLOCK_CO, BLOCK_P, FP64)
    K = CIN_G * KH * KW
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        ci = k // (KH * KW)
        tap = k % (KH * KW)
        i = tap // KW
        j = tap % KW
        w_off = co[:, None] * swo + (ci * swi + i * swh + j * sww)[None, :]
        w_mask = co_mask[:, None] & k_mask[None, :]
        w_mix = _mixed_tile(r_base, sre, w_ptr + w_off, swe, w_mask, E, _acc_zeros(BLOCK_CO, BLOCK_K, FP64))
        ih = oh[None, :] * SH - PH + i[:, None] * DH
        iw = ow[None, :] * SW - PW + j[:, None] * DW
        x_mask = k_mask[:, None] & p_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + ci[:, None] * sxc + ih * sxh + iw * sxw, mask=x_mask, other=0)
        acc = _dot(w_mix.to(x_tile.dtype), x_tile, acc, UPCAST_DOT)
    if HAS_BIAS:
        acc += tl.load(bmix_ptr + b * sbb + co, mask=co_mask, other=0).to(acc.dtype)[:, None]
    y = y_ptr + b * syb + co[:, None] * syc + (oh * syh + ow * syw)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=co_mask[:, None] & p_mask[None, :])


@triton.jit
def _conv_grad_input_kernel(
    go_ptr, r_ptr, w_ptr, gx_ptr,
    E, COUT_G, CIN_G, GROUPS, H, W, OH, OW,
    sgb, sgc, sgh, sgw, srb, sre, swe, swo, swi, swh, sww, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, FP64: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x[b, ci, q] = sum over (co, tap) of W_b[co, ci, tap] * grad_y[b, co, q's output pixel]."""
    pid_p = tl.program_id(0)
    pid_ci = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // GROUPS).to(tl.int64)
    g = pid_bg % GROUPS
    ci_local = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_mask = ci_local < CIN_G
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q_mask = q < H * W
    ih = q // W
    iw = q % W
    go_base = go_ptr + b * sgb + g * COUT_G * sgc
    r_base = r_ptr + b * srb
    acc = _acc_zeros(BLOCK_CI, BLOCK_P, FP64)
    K = COUT_G * KH * KW
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        co_local = k // (KH * KW)
        tap = k % (KH * KW)
        i = tap // KW
        j = tap % KW
        w_off = ci_local[:, None] * swi + ((g * COUT_G + co_local) * swo + i * swh + j * sww)[None, :]
        w_mask = ci_mask[:, None] & k_mask[None, :]
        w_mix = _mixed_tile(r_base, sre, w_ptr + w_off, swe, w_mask, E, _acc_zeros(BLOCK_CI, BLOCK_K, FP64))
        # Output pixel that reads input pixel q through tap (i, j), when there is one.
        th = ih[None, :] + PH - i[:, None] * DH
        tw = iw[None, :] + PW - j[:, None] * DW
        th_c = tl.where(th >= 0, th, 0)
        tw_c = tl.where(tw >= 0, tw, 0)
        oh = th_c // SH
        ow = tw_c // SW
        g_mask = (k_mask[:, None] & q_mask[None, :] & (th >= 0) & (tw >= 0)
                  & (th_c % SH == 0) & (tw_c % SW == 0) & (oh < OH) & (ow < OW))
        g_tile = tl.load(go_base + co_local[:, None] * sgc + oh * sgh + ow * sgw, mask=g_mask, other=0)
        acc = _dot(w_mix.to(g_tile.dtype), g_tile, acc, UPCAST_DOT)
    gx = gx_ptr + b * sxb + (g * CIN_G + ci_local)[:, None] * sxc + (ih * sxh + iw * sxw)[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=ci_mask[:, None] & q_mask[None, :])


@triton.jit
def _conv_grad_weight_kernel(
    go_ptr, x_ptr, dw_ptr,
    COUT_G, CIN_G, GROUPS, H, W, OH, OW,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, FP64: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dW_b[co, k] = sum_p grad_y[b, co, p] * im2col(x[b])[k, p] into a contiguous (B, Cout, K) buffer."""
    pid_k = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // GROUPS).to(tl.int64)
    g = pid_bg % GROUPS
    co_local = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = co_local < COUT_G
    K = CIN_G * KH * KW
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    ci = k // (KH * KW)
    tap = k % (KH * KW)
    i = tap // KW
    j = tap % KW
    go_base = go_ptr + b * sgb + (g * COUT_G + co_local)[:, None] * sgc
    x_base = x_ptr + b * sxb + (g * CIN_G + ci)[None, :] * sxc
    acc = _acc_zeros(BLOCK_CO, BLOCK_K, FP64)
    for p0 in range(0, OH * OW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < OH * OW
        oh = p // OW
        ow = p % OW
        g_tile = tl.load(go_base + (oh * sgh + ow * sgw)[None, :],
                         mask=co_mask[:, None] & p_mask[None, :], other=0)
        ih = oh[:, None] * SH - PH + i[None, :] * DH
        iw = ow[:, None] * SW - PW + j[None, :] * DW
        x_mask = p_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + ih * sxh + iw * sxw, mask=x_mask, other=0)
        acc = _dot(g_tile, x_tile, acc, UPCAST_DOT)
    cout = GROUPS * COUT_G
    out = dw_ptr + (b * cout + g * COUT_G + co_local)[:, None] * K + k[None, :]
    tl.store(out, acc, mask=co_mask[:, None] & k_mask[None, :])


@triton.jit
def _bias_grad_kernel(
    go_ptr, db_ptr, C, OH, OW, sgb, sgc, sgh, sgw,
    FP64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """db[b, c] = sum over output pixels of grad_y[b, c], into a contiguous (B, C) buffer."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    c_mask = c < C
    acc = _acc_zeros(BLOCK_C, BLOCK_P, FP64)
    for p0 in range(0, OH * OW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < OH * OW
        ptr = go_ptr + b * sgb + c[:, None] * sgc + ((p // OW) * sgh + (p % OW) * sgw)[None, :]
        acc += tl.load(ptr, mask=c_mask[:, None] & p_mask[None, :], other=0).to(acc.dtype)
    tl.store(db_ptr + b * C + c, tl.sum(acc, axis=1), mask=c_mask)


@triton.jit
def _depthwise_fwd_kernel(
    x_ptr, r_ptr, w_ptr, bmix_ptr, y_ptr,
    E, C, H, W, OH, OW,
    sxb, sxc, sxh, sxw, srb, sre, swe, swc, swh, sww, sbb, syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Direct depthwise convolution; each tap's mixed filter column lives only in registers."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    p_mask = p < OH * OW
    c_mask = c < C
    oh = p // OW
    ow = p % OW
    x_base = x_ptr + b * sxb + c[:, None] * sxc
    r_base = r_ptr + b * srb
    acc = _acc_zeros(BLOCK_C, BLOCK_P, FP64)
    for tap in tl.static_range(KH * KW):
        i = tap // KW
        j = tap % KW
        w_mix = _mixed_tile(r_base, sre, w_ptr + c * swc + (i * swh + j * sww), swe, c_mask, E,
                            _acc_zeros_1d(BLOCK_C, FP64))
        ih = oh * SH - PH + i * DH
        iw = ow * SW - PW + j * DW
        in_bounds = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + (ih * sxh + iw * sxw)[None, :],
                         mask=c_mask[:, None] & in_bounds[None, :], other=0)
        acc += w_mix[:, None] * x_tile.to(acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bmix_ptr + b * sbb + c, mask=c_mask, other=0).to(acc.dtype)[:, None]
    y = y_ptr + b * syb + c[:, None] * syc + (oh * syh + ow * syw)[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=c_mask[:, None] & p_mask[None, :])


@triton.jit
def _depthwise_grad_input_kernel(
    go_ptr, r_ptr, w_ptr, gx_ptr,
    E, C, H, W, OH, OW,
    sgb, sgc, sgh, sgw, srb, sre, swe, swc, swh, sww, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad_x[b, c, q] = sum over taps of W_b[c, tap] * grad_y[b, c, the output pixel of q via tap]."""
    q = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(2).to(tl.int64)
    q_mask = q < H * W
    c_mask = c < C
    ih = q // W
    iw = q % W
    go_base = go_ptr + b * sgb + c[:, None] * sgc
    r_base = r_ptr + b * srb
    acc = _acc_zeros(BLOCK_C, BLOCK_P, FP64)
    for tap in tl.static_range(KH * KW):
        i = tap // KW
        j = tap % KW
        w_mix = _mixed_tile(r_base, sre, w_ptr + c * swc + (i * swh + j * sww), swe, c_mask, E,
                            _acc_zeros_1d(BLOCK_C, FP64))
        th = ih + PH - i * DH
        tw = iw + PW - j * DW
        th_c = tl.where(th >= 0, th, 0)
        tw_c = tl.where(tw >= 0, tw, 0)
        oh = th_c // SH
        ow = tw_c // SW
        hit = (q_mask & (th >= 0) & (tw >= 0) & (th_c % SH == 0) & (tw_c % SW == 0)
               & (oh < OH) & (ow < OW))
        g_tile = tl.load(go_base + (oh * sgh + ow * sgw)[None, :],
                         mask=c_mask[:, None] & hit[None, :], other=0)
        acc += w_mix[:, None] * g_tile.to(acc.dtype)
    gx = gx_ptr + b * sxb + c[:, None] * sxc + (ih * sxh + iw * sxw)[None, :]
    tl.store(gx, acc.to(gx_ptr.dtype.element_ty), mask=c_mask[:, None] & q_mask[None, :])


@triton.jit
def _depthwise_grad_weight_kernel(
    go_ptr, x_ptr, dw_ptr,
    C, H, W, OH, OW,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, FP64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """dW_b[c, tap] = sum_p grad_y[b, c, p] * x[b, c, p through tap], into a (B, C, KH*KW) buffer."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    tap = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c_mask = c < C
    i = tap // KW
    j = tap % KW
    go_base = go_ptr + b * sgb + c[:, None] * sgc
    x_base = x_ptr + b * sxb + c[:, None] * sxc
    acc = _acc_zeros(BLOCK_C, BLOCK_P, FP64)
    for p0 in range(0, OH * OW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_mask = p < OH * OW
        oh = p // OW
        ow = p % OW
        g_tile = tl.load(go_base + (oh * sgh + ow * sgw)[None, :],
                         mask=c_mask[:, None] & p_mask[None, :], other=0)
        ih = oh * SH - PH + i * DH
        iw = ow * SW - PW + j * DW
        in_bounds = p_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_base + (ih * sxh + iw * sxw)[None, :],
                         mask=c_mask[:, None] & in_bounds[None, :], other=0)
        acc += g_tile.to(acc.dtype) * x_tile.to(acc.dtype)
    out = dw_ptr + (b * C + c) * (KH * KW) + tap
    tl.store(out, tl.sum(acc, axis=1), mask=c_mask)


# --- launchers -----------------------------------------------------------------------------------


def _caps() -> dict:
    # The interpreter pays per program and per block operation, not per element: fewer, larger blocks.
    if _interpreted():
        return dict(p=256, c=64, k=64, n=256, dw_c=64, dw_p=256, contract_n=256, split_programs=1)
    # dw_*: the direct depthwise tiles (no tensor cores, more pixels per program); contract_n bounds
    # the (BLOCK_B, BLOCK_E, BLOCK_N) product _routing_grad_kernel holds in registers.
    return dict(p=64, c=64, k=32, n=128, dw_c=32, dw_p=128, contract_n=32, split_programs=264)


def _upcast_dot(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpreted()


def _is_depthwise(x: Tensor, weight: Tensor, groups: int) -> bool:
    return groups > 1 and groups == x.shape[1] == weight.shape[1]


def _check_call(x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor], stride, padding,
                dilation, groups: int) -> tuple[int, int]:
    check_args(x, routing, weight, bias, groups)
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError(f"{OP}: stride and dilation need 2 values and padding 4 "
                         f"(h_begin, h_end, w_begin, w_end)")
    if any(s <= 0 for s in stride):
        raise ValueError(f"{OP}: stride must be positive, got {list(stride)}")
    if any(d <= 0 for d in dilation):
        raise ValueError(f"{OP}: dilation must be positive, got {list(dilation)}")
    if any(p < 0 for p in padding):
        raise ValueError(f"{OP}: padding must be non-negative, got {list(padding)}")
    _check_device(x)
    return check_geometry(x, weight, stride, padding, dilation)


def _check_device(x: Tensor) -> None:
    if x.device.type == "cpu" and not _interpreted():
        raise RuntimeError(f"{OP}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                           "set before triton is imported, to interpret the kernels on the CPU)")


def _mix(coef_strides: tuple[int, int], coef: Tensor, rows: int, terms: int, src: Tensor,
         out: Tensor, fp64: bool) -> None:
    """out (rows, N) = coef (rows, terms) @ src (terms, N), through ``_mix_kernel``."""
    caps = _caps()
    n = src.shape[1]
    block_r = _block(rows, 16, floor=1)
    block_n = _block(n, caps["n"])
    _launch(
        _mix_kernel, (triton.cdiv(n, block_n), triton.cdiv(rows, block_r)),
        coef, src, out, rows, n, terms,
        coef_strides[0], coef_strides[1], src.stride(0), src.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n, FP64=fp64,
    )


def _mix_biases(routing: Tensor, bias: Tensor) -> Tensor:
    """b_b = sum_e r[b,e] bias_e, (B, Cout) in the accumulation dtype."""
    out = torch.empty((routing.shape[0], bias.shape[1]), dtype=_acc_dtype(bias.dtype), device=bias.device)
    _mix((routing.stride(0), routing.stride(1)), routing, routing.shape[0], routing.shape[1], bias, out,
         bias.dtype == torch.float64)
    return out


def _reduce_to_experts(routing: Tensor, per_example: Tensor, out: Tensor) -> Tensor:
    """out[e] = sum_b r[b,e] per_example[b]: the expert gradient from the per-example one."""
    batch, experts = routing.shape
    flat_src = per_example.reshape(batch, out.numel() // experts)
    target = out if out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype, device=out.device)
    _mix((routing.stride(1), routing.stride(0)), routing, experts, batch, flat_src,
         target.view(experts, -1), out.dtype == torch.float64)
    if target is not out:
        out.copy_(target)
    return out


def _routing_grad(routing: Tensor, dw: Tensor, weight: Tensor, db: Optional[Tensor],
                  bias: Optional[Tensor], out: Tensor) -> Tensor:
    """out[b,e] = <dW_b, W_e> + <db_b, bias_e>."""
    batch, experts = routing.shape
    caps = _caps()
    fp64 = weight.dtype == torch.float64
    w_flat = weight.reshape(experts, -1)
    n_w = w_flat.shape[1]
    block_b = _block(batch, 16, floor=1)
    block_e = _block(experts, 16, floor=1)
    block_n = _block(n_w, caps["contract_n"])
    grid_b, grid_e = triton.cdiv(batch, block_b), triton.cdiv(experts, block_e)
    blocks_n = triton.cdiv(n_w, block_n)
    splits = max(1, min(blocks_n, caps["split_programs"] // max(1, grid_b * grid_e)))
    chunk = triton.cdiv(blocks_n, splits) * block_n
    splits = triton.cdiv(n_w, chunk)
    partial = torch.empty((splits, batch, experts), dtype=_acc_dtype(weight.dtype), device=weight.device)
    has_bias = db is not None
    _launch(
        _routing_grad_kernel, (grid_b, grid_e, splits),
        dw, w_flat, n_w, chunk,
        db if has_bias else dw, bias if has_bias else w_flat, db.shape[1] if has_bias else 0,
        partial, batch, experts,
        dw.stride(0), w_flat.stride(0), w_flat.stride(1),
        db.stride(0) if has_bias else 0,
        bias.stride(0) if has_bias else 0, bias.stride(1) if has_bias else 0,
        HAS_BIAS=has_bias, BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_N=block_n, FP64=fp64,
    )
    out.copy_(partial.sum(0) if splits > 1 else partial[0])
    return out


@_register_op(FORWARD_OP, _FORWARD_SCHEMA)
def _cond_conv2d_triton(
    x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    out_h, out_w = _check_call(x, routing, weight, bias, stride, padding, dilation, groups)
    batch, _, height, width = x.shape
    experts, cout, cin_g, kh, kw = weight.shape
    y = torch.empty((batch, cout, out_h, out_w), dtype=x.dtype, device=x.device,
                    memory_format=memory_format_of(x))
    if y.numel() == 0:
        return y
    fp64 = x.dtype == torch.float64
    caps = _caps()
    b_mix = _mix_biases(routing, bias) if bias is not None else None
    b_arg, b_stride = (b_mix, b_mix.stride(0)) if b_mix is not None else (y, 0)
    geometry = _geometry_args(stride, padding, dilation)
    if _is_depthwise(x, weight, groups):
        block_c = _block(cout, caps["dw_c"], floor=1)
        block_p = _block(out_h * out_w, caps["dw_p"])
        _launch(
            _depthwise_fwd_kernel,
            (triton.cdiv(out_h * out_w, block_p), triton.cdiv(cout, block_c), batch),
            x, routing, weight, b_arg, y, experts, cout, height, width, out_h, out_w,
            *x.stride(), *routing.stride(), weight.stride(0), weight.stride(1), weight.stride(3),
            weight.stride(4), b_stride, *y.stride(), *geometry,
            KH=kh, KW=kw, HAS_BIAS=bias is not None, FP64=fp64, BLOCK_C=block_c, BLOCK_P=block_p,
        )
        return y
    cout_g = cout // groups
    block_co = _block(cout_g, caps["c"])
    block_p = _block(out_h * out_w, caps["p"])
    block_k = _block(cin_g * kh * kw, caps["k"])
    _launch(
        _conv_fwd_kernel,
        (triton.cdiv(out_h * out_w, block_p), triton.cdiv(cout_g, block_co), batch * groups),
        x, routing, weight, b_arg, y, experts, cout_g, cin_g, groups, height, width, out_h, out_w,
        *x.stride(), *routing.stride(), *weight.stride(), b_stride, *y.stride(), *geometry,
        KH=kh, KW=kw, HAS_BIAS=bias is not None, FP64=fp64, UPCAST_DOT=_upcast_dot(x.dtype),
        BLOCK_CO=block_co, BLOCK_P=block_p, BLOCK_K=block_k,
    )
    return y


@_register_op(BACKWARD_OP, _BACKWARD_SCHEMA)
def _cond_conv2d_triton_backward(
    grad_out: Tensor, x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
    output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out_h, out_w = _check_call(x, routing, weight, bias, stride, padding, dilation, groups)
    batch, cin, height, width = x.shape
    experts, cout, cin_g, kh, kw = weight.shape
    if tuple(grad_out.shape) != (batch, cout, out_h, out_w):
        raise ValueError(f"{OP}: grad_out must have shape {(batch, cout, out_h, out_w)}, "
                         f"got {tuple(grad_out.shape)}")
    if grad_out.dtype != x.dtype or grad_out.device != x.device:
        raise ValueError(f"{OP}: grad_out must have x's dtype and device")
    if len(output_mask) != 4:
        raise ValueError(f"{OP}: output_mask must have 4 values (x, routing, weight, bias)")
    want_x, want_routing, want_weight, want_bias = (bool(m) for m in output_mask)
    want_bias = want_bias and bias is not None
    fp64 = x.dtype == torch.float64
    acc_dtype = _acc_dtype(x.dtype)
    caps = _caps()
    geometry = _geometry_args(stride, padding, dilation)
    depthwise = _is_depthwise(x, weight, groups)
    cout_g = cout // groups

    def empty() -> Tensor:
        return x.new_empty((0,))

    grad_x = torch.empty_like(x) if want_x else empty()
    if want_x and grad_x.numel():
        if depthwise:
            block_c = _block(cin, caps["dw_c"], floor=1)
            block_p = _block(height * width, caps["dw_p"])
            _launch(
                _depthwise_grad_input_kernel,
                (triton.cdiv(height * width, block_p), triton.cdiv(cin, block_c), batch),
                grad_out, routing, weight, grad_x, experts, cin, height, width, out_h, out_w,
                *grad_out.stride(), *routing.stride(), weight.stride(0), weight.stride(1),
                weight.stride(3), weight.stride(4), *grad_x.stride(), *geometry,
                KH=kh, KW=kw, FP64=fp64, BLOCK_C=block_c, BLOCK_P=block_p,
            )
        else:
            block_ci = _block(cin_g, caps["c"])
            block_p = _block(height * width, caps["p"])
            block_k = _block(cout_g * kh * kw, caps["k"])
            _launch(
                _conv_grad_input_kernel,
                (triton.cdiv(height * width, block_p), triton.cdiv(cin_g, block_ci), batch * groups),
                grad_out, routing, weight, grad_x, experts, cout_g, cin_g, groups, height, width,
                out_h, out_w, *grad_out.stride(), *routing.stride(), *weight.stride(),
                *grad_x.stride(), *geometry,
                KH=kh, KW=kw, FP64=fp64, UPCAST_DOT=_upcast_dot(x.dtype),
                BLOCK_CI=block_ci, BLOCK_P=block_p, BLOCK_K=block_k,
            )

    # Per-example gradients of the mixed kernel and bias, the inputs of dW_e, dbias_e and dr.
    dw_per_example = None
    if want_weight or want_routing:
        taps = cin_g * kh * kw
        dw_per_example = torch.empty((batch, cout, taps), dtype=acc_dtype, device=x.device)
        if depthwise:
            block_c = _block(cout, caps["c"], floor=1)
            block_p = _block(out_h * out_w, caps["p"])
            _launch(
                _depthwise_grad_weight_kernel, (triton.cdiv(cout, block_c), kh * kw, batch),
                grad_out, x, dw_per_example, cout, height, width, out_h, out_w,
                *grad_out.stride(), *x.stride(), *geometry,
                KH=kh, KW=kw, FP64=fp64, BLOCK_C=block_c, BLOCK_P=block_p,
            )
        else:
            block_co = _block(cout_g, caps["c"])
            block_k = _block(taps, caps["k"])
            block_p = _block(out_h * out_w, caps["p"])
            _launch(
                _conv_grad_weight_kernel,
                (triton.cdiv(taps, block_k), triton.cdiv(cout_g, block_co), batch * groups),
                grad_out, x, dw_per_example, cout_g, cin_g, groups, height, width, out_h, out_w,
                *grad_out.stride(), *x.stride(), *geometry,
                KH=kh, KW=kw, FP64=fp64, UPCAST_DOT=_upcast_dot(x.dtype),
                BLOCK_CO=block_co, BLOCK_K=block_k, BLOCK_P=block_p,
            )
        dw_per_example = dw_per_example.view(batch, cout * taps)
    db_per_example = None
    if bias is not None and (want_bias or want_routing):
        db_per_example = torch.empty((batch, cout), dtype=acc_dtype, device=x.device)
        block_c = _block(cout, caps["c"], floor=1)
        block_p = _block(out_h * out_w, caps["p"])
        _launch(
            _bias_grad_kernel, (triton.cdiv(cout, block_c), batch),
            grad_out, db_per_example, cout, out_h, out_w, *grad_out.stride(),
            FP64=fp64, BLOCK_C=block_c, BLOCK_P=block_p,
        )

    grad_routing = empty()
    if want_routing:
        grad_routing = _routing_grad(routing, dw_per_example, weight, db_per_example, bias,
                                     torch.empty_like(routing))
    grad_weight = _reduce_to_experts(routing, dw_per_example, torch.empty_like(weight)) if want_weight else empty()
    grad_bias = _reduce_to_experts(routing, db_per_example, torch.empty_like(bias)) if want_bias else empty()
    return grad_x, grad_routing, grad_weight, grad_bias


def triton_forward_op() -> torch._ops.OpOverload:
    """The OpOverload of the Triton forward, ``torch.ops.condkernels.cond_conv2d_triton.default``."""
    return torch.ops.condkernels.cond_conv2d_triton.default


def triton_backward_op() -> torch._ops.OpOverload:
    return torch.ops.condkernels._cond_conv2d_triton_backward.default


def cond_conv2d_triton(
    x: Tensor, routing: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
    padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    """``cond_conv2d`` through the Triton kernels; arguments already normalised by the public function."""
    return triton_forward_op()(x, routing, weight, bias, list(stride), list(padding), list(dilation), groups)


register_variant(FORWARD_OP, BACKWARD_OP)
