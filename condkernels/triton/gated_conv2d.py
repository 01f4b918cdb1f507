"""Triton kernels of ``gated_conv2d``, registered as their own ops.

``condkernels::gated_conv2d_triton``, ``condkernels::_gated_conv2d_with_ungated_triton`` and
``condkernels::_gated_conv2d_triton_backward`` have the schemas of ``gated_conv2d``,
``_gated_conv2d_with_ungated`` and ``_gated_conv2d_backward``; the fake kernels and autograd formulas
are the ones every variant shares (``condkernels.ops.gated_conv2d.register_variant``).

Channel lists: for every (example, group) the group-local channel indices, open channels first (in
order) then the closed ones, and the open count -- built on the device by a stable sort of the
"closed" flags, so the host never learns how many channels are open.

``_forward_kernel``: a program owns a tile of list positions of one example's output channels and a
tile of output pixels. Positions below the open count are computed by an implicit GEMM whose
reduction loop runs over that example's open input channels only (``n_in * kh * kw``, read from the
list at run time); input-channel indices are gathered through the list and the in_gate folded into
the input tile. Positions past the open count are closed outputs: written as 0, with no reduction.
The training form (``with_ungated``) lists every output channel as open and also stores the ungated
value ``conv + bias``.

``_grad_input_kernel``: the transposed implicit GEMM ``d(in_gate * x) = W^T (out_gate * grad_y)``
over a tile of one example's listed input channels (its open ones, or all of them when in_gate needs
its gradient), reducing over its open output channels only; stride and dilation are handled by a
divisibility mask. ``_grad_weight_kernel``: per example, ``(out_gate * grad_y) im2col(in_gate * x)^T``
over its open outputs x open inputs only, added atomically into an fp32 / fp64 buffer. The bias and
gate gradients are per-channel reductions left to PyTorch.

Precision: accumulation in fp32 (fp64 for float64); float32 ``tl.dot`` with ``input_precision="ieee"``.

Registration: with compiled kernels the ops are :func:`torch.library.triton_op` so torch.compile sees
the kernels; under ``TRITON_INTERPRET=1`` ``wrap_triton`` cannot trace the interpreter's functions,
so the ops are plain :func:`torch.library.custom_op` (opaque to tracing, still compilable).

Verification status: these kernels have only run under the Triton interpreter on CPU tensors
(``python_tests/test_gated_conv2d_triton.py``); they have not been compiled for or run on a GPU, and
their block sizes for GPUs are untuned.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._conv_args import memory_format_of
from ..ops.gated_conv2d import OP, check_args, check_geometry, register_variant
from ._common import acc_dtype as _acc_dtype, acc_zeros as _acc_zeros, block as _block
from ._common import geometry_args as _geometry, interpreted as _interpreted, launch as _launch
from ._common import register_op as _register_op

FORWARD_OP = "condkernels::gated_conv2d_triton"
WITH_UNGATED_OP = "condkernels::_gated_conv2d_with_ungated_triton"
BACKWARD_OP = "condkernels::_gated_conv2d_triton_backward"

_ARGS = (
    "(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gate, Tensor? out_gate, int[2] stride, "
    "int[4] padding, int[2] dilation, int groups)"
)
_FORWARD_SCHEMA = _ARGS + " -> Tensor"
_WITH_UNGATED_SCHEMA = _ARGS + " -> (Tensor out, Tensor ungated)"
_BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? in_gate, Tensor? out_gate, "
    "Tensor? ungated, int[2] stride, int[4] padding, int[2] dilation, int groups, bool[5] output_mask) "
    "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_in_gate, Tensor grad_out_gate)"
)


# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, bias_ptr, ig_ptr, og_ptr, in_list_ptr, in_count_ptr, out_list_ptr, out_count_ptr,
    y_ptr, u_ptr,
    CIN, COUT, GROUPS, CIN_G, COUT_G, H, W, OH, OW,
    sxb, sxc, sxh, sxw, syb, syc, syh, syw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_IG: tl.constexpr,
    HAS_OG: tl.constexpr, WRITE_UNGATED: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // GROUPS).to(tl.int64)
    g = pid_bg % GROUPS
    n_in = tl.load(in_count_ptr + pid_bg)
    n_out = tl.load(out_count_ptr + pid_bg)
    slot = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    slot_mask = slot < COUT_G
    computed = slot < n_out
    co = g * COUT_G + tl.load(out_list_ptr + b * COUT + g * COUT_G + slot, mask=slot_mask, other=0)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = p < OH * OW
    oh = p // OW
    ow = p % OW
    x_base = x_ptr + b * sxb
    in_list = in_list_ptr + b * CIN + g * CIN_G
    acc = _acc_zeros(BLOCK_CO, BLOCK_P, FP64)
    if pid_co * BLOCK_CO < n_out:  # a tile of closed outputs only does no reduction
        K = n_in * (KH * KW)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            ci_local = tl.load(in_list + k // (KH * KW), mask=k_mask, other=0)
            tap = k % (KH * KW)
            i = tap // KW
            j = tap % KW
            w_tile = tl.load(w_ptr + (co[:, None] * CIN_G + ci_local[None, :]) * (KH * KW) + tap[None, :],
                             mask=computed[:, None] & k_mask[None, :], other=0)
            ih = oh[None, :] * SH - PH + i[:, None] * DH
            iw = ow[None, :] * SW - PW + j[:, None] * DW
            x_mask = k_mask[:, None] & p_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ci = g * CIN_G + ci_local
            x_tile = tl.load(x_base + ci[:, None] * sxc + ih * sxh + iw * sxw, mask=x_mask, other=0)
            if HAS_IG:
                gate = tl.load(ig_ptr + b * CIN + ci, mask=k_mask, other=0)
                x_tile = (x_tile.to(acc.dtype) * gate.to(acc.dtype)[:, None]).to(x_tile.dtype)
            if UPCAST:
                acc = tl.dot(w_tile.to(tl.float32), x_tile.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w_tile, x_tile, acc, input_precision="ieee", out_dtype=acc.dtype)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co, mask=slot_mask, other=0).to(acc.dtype)[:, None]
    z = acc.to(y_ptr.dtype.element_ty)
    out_off = b * syb + co[:, None] * syc + (oh * syh + ow * syw)[None, :]
    store_mask = slot_mask[:, None] & p_mask[None, :]
    if WRITE_UNGATED:
        tl.store(u_ptr + out_off, z, mask=store_mask & computed[:, None])
    keep = computed
    if HAS_OG:
        gate = tl.load(og_ptr + b * COUT + co, mask=slot_mask, other=0)
        keep = keep & (gate != 0)
        y = z.to(acc.dtype) * gate.to(acc.dtype)[:, None]
    else:
        y = z.to(acc.dtype)
    y = tl.where(keep[:, None], y, 0)
    tl.store(y_ptr + out_off, y.to(y_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _grad_input_kernel(
    go_ptr, w_ptr, ig_ptr, og_ptr, row_list_ptr, row_count_ptr, out_list_ptr, out_count_ptr,
    gx_ptr, gg_ptr,
    CIN, COUT, GROUPS, CIN_G, COUT_G, H, W, OH, OW,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_IG: tl.constexpr, HAS_OG: tl.constexpr,
    WRITE_GX: tl.constexpr, WRITE_GATED: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_CI: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """gated[ci, q] = sum over open (co, tap) of W[co, ci, tap] * (out_gate * grad_y)[co, pixel of q]."""
    pid_q = tl.program_id(0)
    pid_ci = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // GROUPS).to(tl.int64)
    g = pid_bg % GROUPS
    n_rows = tl.load(row_count_ptr + pid_bg)
    n_out = tl.load(out_count_ptr + pid_bg)
    slot = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    slot_mask = slot < CIN_G
    computed = slot < n_rows
    ci_local = tl.load(row_list_ptr + b * CIN + g * CIN_G + slot, mask=slot_mask, other=0)
    ci = g * CIN_G + ci_local
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < H * W
    ih = q // W
    iw = q % W
    out_list = out_list_ptr + b * COUT + g * COUT_G
    acc = _acc_zeros(BLOCK_CI, BLOCK_Q, FP64)
    if pid_ci * BLOCK_CI < n_rows:
        K = n_out * (KH * KW)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            co = g * COUT_G + tl.load(out_list + k // (KH * KW), mask=k_mask, other=0)
            tap = k % (KH * KW)
            i = tap // KW
            j = tap % KW
            w_tile = tl.load(w_ptr + (co[None, :] * CIN_G + ci_local[:, None]) * (KH * KW) + tap[None, :],
                             mask=computed[:, None] & k_mask[None, :], other=0)
            # The output pixel that reads input pixel q through tap (i, j), where there is one.
            th = ih[None, :] + PH - i[:, None] * DH
            tw = iw[None, :] + PW - j[:, None] * DW
            th_c = tl.where(th >= 0, th, 0)
            tw_c = tl.where(tw >= 0, tw, 0)
            oh = th_c // SH
            ow = tw_c // SW
            g_mask = (k_mask[:, None] & q_mask[None, :] & (th >= 0) & (tw >= 0)
                      & (th_c % SH == 0) & (tw_c % SW == 0) & (oh < OH) & (ow < OW))
            g_tile = tl.load(go_ptr + b * sgb + co[:, None] * sgc + oh * sgh + ow * sgw, mask=g_mask, other=0)
            if HAS_OG:
                gate = tl.load(og_ptr + b * COUT + co, mask=k_mask, other=0)
                g_tile = (g_tile.to(acc.dtype) * gate.to(acc.dtype)[:, None]).to(g_tile.dtype)
            if UPCAST:
                acc = tl.dot(w_tile.to(tl.float32), g_tile.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w_tile, g_tile, acc, input_precision="ieee", out_dtype=acc.dtype)
    acc = tl.where(computed[:, None], acc, 0)
    store_mask = slot_mask[:, None] & q_mask[None, :]
    if WRITE_GATED:
        tl.store(gg_ptr + (b * CIN + ci)[:, None] * (H * W) + q[None, :], acc, mask=store_mask)
    if WRITE_GX:
        gx = acc
        if HAS_IG:
            gate = tl.load(ig_ptr + b * CIN + ci, mask=slot_mask, other=0)
            gx = tl.where(computed[:, None], acc * gate.to(acc.dtype)[:, None], 0)
        off = b * sxb + ci[:, None] * sxc + (ih * sxh + iw * sxw)[None, :]
        tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _grad_weight_kernel(
    go_ptr, x_ptr, ig_ptr, og_ptr, in_list_ptr, in_count_ptr, out_list_ptr, out_count_ptr, gw_ptr,
    CIN, COUT, GROUPS, CIN_G, COUT_G, H, W, OH, OW,
    sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, HAS_IG: tl.constexpr, HAS_OG: tl.constexpr,
    FP64: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """gw[co, ci * taps + tap] += this example's sum over pixels, its open co and open ci only."""
    pid_n = tl.program_id(0)
    pid_co = tl.program_id(1)
    pid_bg = tl.program_id(2)
    b = (pid_bg // GROUPS).to(tl.int64)
    g = pid_bg % GROUPS
    n_in = tl.load(in_count_ptr + pid_bg)
    n_out = tl.load(out_count_ptr + pid_bg)
    n_cols = n_in * (KH * KW)
    if (pid_co * BLOCK_CO < n_out) & (pid_n * BLOCK_N < n_cols):
        slot = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
        row_mask = slot < n_out
        co = g * COUT_G + tl.load(out_list_ptr + b * COUT + g * COUT_G + slot, mask=row_mask, other=0)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = n < n_cols
        ci_local = tl.load(in_list_ptr + b * CIN + g * CIN_G + n // (KH * KW), mask=col_mask, other=0)
        ci = g * CIN_G + ci_local
        tap = n % (KH * KW)
        i = tap // KW
        j = tap % KW
        acc = _acc_zeros(BLOCK_CO, BLOCK_N, FP64)
        for p0 in range(0, OH * OW, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            p_mask = p < OH * OW
            oh = p // OW
            ow = p % OW
            g_tile = tl.load(go_ptr + b * sgb + co[:, None] * sgc + (oh * sgh + ow * sgw)[None, :],
                             mask=row_mask[:, None] & p_mask[None, :], other=0)
            if HAS_OG:
                gate = tl.load(og_ptr + b * COUT + co, mask=row_mask, other=0)
                g_tile = (g_tile.to(acc.dtype) * gate.to(acc.dtype)[:, None]).to(g_tile.dtype)
            ih = oh[:, None] * SH - PH + i[None, :] * DH
            iw = ow[:, None] * SW - PW + j[None, :] * DW
            x_mask = p_mask[:, None] & col_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tile = tl.load(x_ptr + b * sxb + ci[None, :] * sxc + ih * sxh + iw * sxw, mask=x_mask, other=0)
            if HAS_IG:
                gate = tl.load(ig_ptr + b * CIN + ci, mask=col_mask, other=0)
                x_tile = (x_tile.to(acc.dtype) * gate.to(acc.dtype)[None, :]).to(x_tile.dtype)
            if UPCAST:
                acc = tl.dot(g_tile.to(tl.float32), x_tile.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(g_tile, x_tile, acc, input_precision="ieee", out_dtype=acc.dtype)
        out = gw_ptr + co[:, None] * (CIN_G * KH * KW) + (ci_local * (KH * KW) + tap)[None, :]
        tl.atomic_add(out, acc, mask=row_mask[:, None] & col_mask[None, :])


# --- launchers -----------------------------------------------------------------------------------


def _caps() -> dict:
    # The interpreter pays per program and per block operation, not per element: fewer, larger blocks.
    if _interpreted():
        return dict(c=64, p=256, k=64)
    return dict(c=64, p=64, k=32)


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter's tl.dot has no half-precision matmul of its own.
    return dtype in (torch.float16, torch.bfloat16) and _interpreted()


def channel_lists(gate: Optional[Tensor], batch: int, channels: int, groups: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Per (example, group): group-local channel indices, open ones first in order, then the closed
    ones; and the open counts. ``(B, C)`` and ``(B * groups,)`` int32, built without a host sync."""
    per_group = channels // groups
    if gate is None:
        lists = torch.arange(per_group, dtype=torch.int32, device=device).repeat(batch, groups)
        counts = torch.full((batch * groups,), per_group, dtype=torch.int32, device=device)
        return lists, counts
    closed = (gate == 0).view(batch, groups, per_group)
    order = torch.argsort(closed.to(torch.int32), dim=2, stable=True)
    counts = (~closed).sum(dim=2, dtype=torch.int32).reshape(-1)
    return order.to(torch.int32).reshape(batch, channels), counts


def _check_call(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups) -> tuple[int, int]:
    check_args(x, weight, bias, in_gate, out_gate, groups)
    if len(stride) != 2 or len(dilation) != 2 or len(padding) != 4:
        raise ValueError(f"{OP}: stride and dilation need 2 values and padding 4 (h_begin, h_end, w_begin, w_end)")
    if any(s <= 0 for s in stride) or any(d <= 0 for d in dilation) or any(p < 0 for p in padding):
        raise ValueError(f"{OP}: stride and dilation must be positive and padding non-negative, got "
                         f"{list(stride)}, {list(dilation)}, {list(padding)}")
    return check_geometry(x, weight, stride, padding, dilation)


def _forward(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups,
             with_ungated: bool) -> tuple[Tensor, Optional[Tensor]]:
    out_h, out_w = _check_call(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups)
    batch, cin, height, width = x.shape
    cout, cin_g, kh, kw = weight.shape
    cout_g = cout // groups
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    in_gate = in_gate.contiguous() if in_gate is not None else None
    out_gate = out_gate.contiguous() if out_gate is not None else None
    y = torch.empty((batch, cout, out_h, out_w), dtype=x.dtype, device=x.device,
                    memory_format=memory_format_of(x))
    ungated = torch.empty_like(y) if with_ungated else None
    in_list, in_count = channel_lists(in_gate, batch, cin, groups, x.device)
    # The training form computes every output channel: out_gate's gradient needs their ungated value.
    out_list, out_count = channel_lists(None if with_ungated else out_gate, batch, cout, groups, x.device)
    caps = _caps()
    block_co = _block(cout_g, caps["c"])
    block_p = _block(out_h * out_w, caps["p"])
    block_k = _block(cin_g * kh * kw, caps["k"])
    dummy = y  # stands in for absent optional pointers; never read
    _launch(
        _forward_kernel,
        (triton.cdiv(out_h * out_w, block_p), triton.cdiv(cout_g, block_co), batch * groups),
        x, weight, bias if bias is not None else dummy, in_gate if in_gate is not None else dummy,
        out_gate if out_gate is not None else dummy, in_list, in_count, out_list, out_count,
        y, ungated if ungated is not None else dummy,
        cin, cout, groups, cin_g, cout_g, height, width, out_h, out_w,
        *x.stride(), *y.stride(), *_geometry(stride, padding, dilation),
        KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_IG=in_gate is not None, HAS_OG=out_gate is not None,
        WRITE_UNGATED=with_ungated, FP64=x.dtype == torch.float64, UPCAST=_upcast(x.dtype),
        BLOCK_CO=block_co, BLOCK_P=block_p, BLOCK_K=block_k,
    )
    return y, ungated


@_register_op(FORWARD_OP, _FORWARD_SCHEMA)
def _gated_conv2d_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], in_gate: Optional[Tensor], out_gate: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    return _forward(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, False)[0]


@_register_op(WITH_UNGATED_OP, _WITH_UNGATED_SCHEMA)
def _gated_conv2d_with_ungated_triton(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], in_gate: Optional[Tensor], out_gate: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, True)


@_register_op(BACKWARD_OP, _BACKWARD_SCHEMA)
def _gated_conv2d_triton_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], in_gate: Optional[Tensor],
    out_gate: Optional[Tensor], ungated: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int, output_mask: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out_h, out_w = _check_call(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups)
    batch, cin, height, width = x.shape
    cout, cin_g, kh, kw = weight.shape
    cout_g = cout // groups
    expected = (batch, cout, out_h, out_w)
    for name, t in (("grad_out", grad_out), ("ungated", ungated)):
        if t is None:
            continue
        if tuple(t.shape) != expected:
            raise ValueError(f"{OP}: {name} must have shape {expected}, got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{OP}: {name} must have x's dtype and device")
    need_x, need_w, need_b, need_ig, need_og = (bool(m) for m in output_mask)
    need_b = need_b and bias is not None
    need_ig = need_ig and in_gate is not None
    need_og = need_og and out_gate is not None
    acc_dtype = _acc_dtype(x.dtype)

    def empty() -> Tensor:
        return x.new_empty((0,))

    weight = weight.contiguous()
    in_gate = in_gate.contiguous() if in_gate is not None else None
    out_gate = out_gate.contiguous() if out_gate is not None else None
    grad_x = grad_w = grad_b = grad_ig = grad_og = None
    if need_og:
        # d out_gate = <grad_y, conv + bias> over the plane, closed channels included.
        if ungated is None:
            ungated = _forward(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, True)[1]
        grad_og = (grad_out.to(acc_dtype) * ungated.to(acc_dtype)).sum((2, 3)).to(x.dtype)
    if need_b:
        per_example = grad_out.to(acc_dtype).sum((2, 3))
        if out_gate is not None:
            per_example = per_example * out_gate.to(acc_dtype)
        grad_b = per_example.sum(0).to(x.dtype)

    caps = _caps()
    geometry = _geometry(stride, padding, dilation)
    fp64, upcast = x.dtype == torch.float64, _upcast(x.dtype)
    dummy = x
    if need_x or need_w or need_ig:
        in_list, in_count = channel_lists(in_gate, batch, cin, groups, x.device)
        out_list, out_count = channel_lists(out_gate, batch, cout, groups, x.device)
    if need_x or need_ig:
        # Every input channel's gradient is needed only when in_gate learns.
        rows, row_count = (channel_lists(None, batch, cin, groups, x.device) if need_ig
                           else (in_list, in_count))
        grad_x = torch.empty_like(x, memory_format=memory_format_of(x)) if need_x else None
        gated = torch.empty((batch, cin, height, width), dtype=acc_dtype, device=x.device) if need_ig else None
        block_ci = _block(cin_g, caps["c"])
        block_q = _block(height * width, caps["p"])
        block_k = _block(cout_g * kh * kw, caps["k"])
        gx_strides = grad_x.stride() if grad_x is not None else (0, 0, 0, 0)
        _launch(
            _grad_input_kernel,
            (triton.cdiv(height * width, block_q), triton.cdiv(cin_g, block_ci), batch * groups),
            grad_out, weight, in_gate if in_gate is not None else dummy,
            out_gate if out_gate is not None else dummy, rows, row_count, out_list, out_count,
            grad_x if grad_x is not None else dummy, gated if gated is not None else dummy,
            cin, cout, groups, cin_g, cout_g, height, width, out_h, out_w,
            *grad_out.stride(), *gx_strides, *geometry,
            KH=kh, KW=kw, HAS_IG=in_gate is not None, HAS_OG=out_gate is not None,
            WRITE_GX=need_x, WRITE_GATED=need_ig, FP64=fp64, UPCAST=upcast,
            BLOCK_CI=block_ci, BLOCK_Q=block_q, BLOCK_K=block_k,
        )
        if need_ig:
            grad_ig = (gated * x.to(acc_dtype)).sum((2, 3)).to(x.dtype)
    if need_w:
        taps = cin_g * kh * kw
        acc_w = torch.zeros((cout, taps), dtype=acc_dtype, device=x.device)
        block_co = _block(cout_g, caps["c"])
        block_n = _block(taps, caps["k"])
        block_p = _block(out_h * out_w, caps["p"])
        _launch(
            _grad_weight_kernel,
            (triton.cdiv(taps, block_n), triton.cdiv(cout_g, block_co), batch * groups),
            grad_out, x, in_gate if in_gate is not None else dummy, out_gate if out_gate is not None else dummy,
            in_list, in_count, out_list, out_count, acc_w,
            cin, cout, groups, cin_g, cout_g, height, width, out_h, out_w,
            *grad_out.stride(), *x.stride(), *geometry,
            KH=kh, KW=kw, HAS_IG=in_gate is not None, HAS_OG=out_gate is not None, FP64=fp64, UPCAST=upcast,
            BLOCK_CO=block_co, BLOCK_N=block_n, BLOCK_P=block_p,
        )
        grad_w = acc_w.to(x.dtype).view(cout, cin_g, kh, kw)
    return tuple(t if t is not None else empty() for t in (grad_x, grad_w, grad_b, grad_ig, grad_og))


def triton_ops() -> tuple[torch._ops.OpOverload, torch._ops.OpOverload]:
    """The Triton forward ops: inference form and training form (with the ungated output)."""
    return (torch.ops.condkernels.gated_conv2d_triton.default,
            torch.ops.condkernels._gated_conv2d_with_ungated_triton.default)


register_variant(FORWARD_OP, WITH_UNGATED_OP, BACKWARD_OP)
