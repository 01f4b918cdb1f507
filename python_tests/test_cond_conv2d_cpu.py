"""The CPU kernels of cond_conv2d path by path: direct depthwise (NCHW and NHWC), mix + GEMM with
one or several output-channel tiles and runs of examples, strided 1x1, asymmetric padding given to
the op itself, bfloat16, channels_last with odd shapes and every output_mask of the backward, each
against the float64 per-example oracle."""

import itertools
import os

import pytest
import torch

import condkernels

from test_cond_conv2d import make_inputs, per_example_oracle

OP = torch.ops.condkernels.cond_conv2d.default
BACKWARD = torch.ops.condkernels._cond_conv2d_backward.default
TILING_ENV = "CONDKERNELS_COND_CONV2D_CPU_TILING"
FUSED_ENV = "CONDKERNELS_COND_CONV2D_CPU_FUSED"


def oracle_with_grads(x, r, w, b, stride, pad4, dilation, groups, grad_out):
    """Oracle output and the gradients of <y, grad_out> w.r.t. every input, in float64."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (x, r, w, b)]
    y = per_example_oracle(*leaves, stride, pad4, dilation, groups)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, grad_out.double())
    grads = list(grads) + ([None] if b is None else [])
    return y.detach(), grads


def check_case(batch, cin, cout, experts, k, hw, groups, bias, stride, pad4, dilation, channels_last=False,
               dtype=torch.float64, tol=1e-9, seed=0):
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, groups, bias, dtype=dtype, seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = OP(x, r, w, b, list(stride), list(pad4), list(dilation), groups)
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    y_ref, grads_ref = oracle_with_grads(x, r, w, b, stride, pad4, dilation, groups, grad_out)
    assert y.shape == y_ref.shape and y.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    scale = lambda t: max(t.abs().max().item(), 1.0)  # noqa: E731
    assert (y.double() - y_ref).abs().max().item() <= tol * scale(y_ref)
    go = grad_out.to(dtype).contiguous(memory_format=fmt)
    grads = BACKWARD(go, x, r, w, b, list(stride), list(pad4), list(dilation), groups, [True] * 4)
    assert grads[0].is_contiguous(memory_format=fmt)
    for name, got, want in zip(("x", "routing", "weight", "bias"), grads, grads_ref):
        if want is None:
            assert got.shape == (0,), name
            continue
        assert got.shape == want.shape, name
        err = (got.double() - want).abs().max().item()
        assert err <= tol * scale(want), f"grad {name}: {err}"


# (batch, cin, cout, experts, k, hw, groups, bias, stride, pad4 (h0, h1, w0, w1), dilation)
DEPTHWISE = {
    "k3": (3, 6, 6, 4, 3, (9, 8), 6, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    "k5_stride2": (2, 5, 5, 3, 5, (11, 10), 5, False, (2, 2), (2, 2, 2, 2), (1, 1)),
    "k3_dilation2": (2, 4, 4, 2, 3, (9, 9), 4, True, (1, 1), (2, 2, 2, 2), (2, 2)),
    "asymmetric_pad": (2, 4, 4, 3, 3, (8, 7), 4, True, (2, 2), (0, 1, 1, 0), (1, 1)),
    "rect_3x1_stride_21": (2, 3, 3, 2, (3, 1), (7, 6), 3, True, (2, 1), (1, 2, 0, 1), (1, 1)),
    "k7_valid": (1, 3, 3, 5, 7, (9, 10), 3, False, (1, 1), (0, 0, 0, 0), (1, 1)),
    "large_E": (5, 8, 8, 40, 3, (6, 6), 8, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    "many_channels": (2, 70, 70, 3, 3, (5, 6), 70, True, (1, 2), (1, 1, 1, 1), (1, 1)),  # > 1 NHWC block
}

MIX_GEMM = {
    "pointwise": (3, 8, 12, 4, 1, (5, 6), 1, True, (1, 1), (0, 0, 0, 0), (1, 1)),
    "pointwise_grouped": (2, 8, 12, 3, 1, (5, 4), 4, False, (1, 1), (0, 0, 0, 0), (1, 1)),
    "pointwise_stride2": (3, 6, 10, 3, 1, (7, 8), 1, True, (2, 2), (0, 0, 0, 0), (1, 1)),
    "pointwise_padded": (2, 5, 7, 2, 1, (4, 5), 1, True, (1, 1), (1, 0, 0, 1), (1, 1)),
    "dense_k3": (3, 5, 9, 4, 3, (7, 8), 1, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    "dense_k3_stride2_asym": (2, 4, 6, 3, 3, (8, 9), 1, False, (2, 2), (0, 1, 1, 0), (1, 1)),
    "dense_k5_dilation2": (2, 3, 4, 2, 5, (12, 11), 1, True, (1, 1), (4, 4, 4, 4), (2, 2)),
    "grouped_k3": (3, 8, 12, 5, 3, (6, 7), 4, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    "depth_multiplier_2": (2, 4, 8, 3, 3, (6, 6), 4, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    "rect_1x3": (2, 4, 6, 2, (1, 3), (5, 7), 1, True, (1, 1), (0, 0, 1, 1), (1, 1)),
    "large_E": (6, 4, 6, 48, 3, (5, 5), 1, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    # Batch not a multiple of the four examples mixed per pass, experts not a multiple of four.
    "batch9_E7": (9, 6, 8, 7, 3, (5, 4), 2, True, (1, 1), (1, 1, 1, 1), (1, 1)),
}


# One expert (not depthwise): the library convolution of the whole batch, scaled per example.
SINGLE_EXPERT = {
    "pointwise": (3, 8, 12, 1, 1, (5, 6), 1, True, (1, 1), (0, 0, 0, 0), (1, 1)),
    "dense_k3_stride2_asym": (2, 4, 6, 1, 3, (8, 9), 1, True, (2, 2), (0, 1, 1, 0), (1, 1)),
    "grouped_k5_dilation2": (2, 6, 9, 1, 5, (12, 11), 3, False, (1, 1), (4, 4, 4, 4), (2, 2)),
    "batch1_rect_stride": (1, 5, 7, 1, 3, (7, 9), 1, True, (2, 1), (1, 0, 2, 1), (1, 1)),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(SINGLE_EXPERT), ids=list(SINGLE_EXPERT))
def test_single_expert_path(case, channels_last):
    check_case(*SINGLE_EXPERT[case], channels_last=channels_last)
    check_case(*SINGLE_EXPERT[case], channels_last=channels_last, dtype=torch.float32, tol=1e-5)
    check_case(*SINGLE_EXPERT[case], channels_last=channels_last, dtype=torch.bfloat16, tol=4e-2)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_single_expert_routing_gradient_at_zero_and_negative_routing(channels_last, bias):
    # dr[b] comes from the unscaled input gradient (<conv^T(dy_b, W), x_b>), not from y_b / r[b]: a
    # zero routing weight must still get its gradient. Stride 3 with a 2x2 kernel leaves input
    # pixels unused, and the asymmetric padding is applied before the library's convolution.
    x, r, w, b = make_inputs(4, 5, 6, 1, 2, (8, 7), 1, bias, seed=11)
    r = torch.tensor([[0.0], [-1.5], [0.7], [0.0]], dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = ([3, 3], [1, 0, 0, 1], [1, 1], 1)
    y = OP(x, r, w, b, *args)
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    _, want = oracle_with_grads(x, r, w, b, *args[:3], 1, grad_out)
    assert want[1][0].abs().item() > 1e-3 and want[1][3].abs().item() > 1e-3  # the case tests something
    for mask in ([True] * 4, [False, True, False, False], [True, True, False, False], [False, True, True, True],
                 [False, False, True, False], [False, False, False, True]):
        got = BACKWARD(grad_out, x, r, w, b, *args, mask)
        for i, (g, ref) in enumerate(zip(got, want)):
            if mask[i] and ref is not None:
                torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)


# The fused small-plane forward (cpu/fused_mix_gemm.h; float32, NCHW, one group, AVX-512 and AVX2
# CPUs, each build tested where the CPU has it): output channels not a multiple of its 16- and
# 64-channel blocks, reductions not a multiple of its 8- or 16-row transposes or 32-row panels,
# pixel counts that split into blocks of 1 to 6, batches not a multiple of the 4 examples mixed
# together, many experts.
FUSED = {
    "k3_odd_everything": (3, 5, 70, 3, 3, (5, 7), True, (1, 1), (1, 1, 1, 1)),
    "k3_stride2_asym": (5, 7, 17, 4, 3, (9, 8), False, (2, 2), (0, 1, 1, 0)),
    "pointwise_direct": (6, 40, 64, 8, 1, (7, 7), True, (1, 1), (0, 0, 0, 0)),
    "one_pixel": (2, 16, 20, 2, 3, (1, 1), True, (1, 1), (1, 1, 1, 1)),
    "many_experts_long_reduction": (4, 33, 65, 24, 3, (4, 4), True, (1, 1), (1, 1, 1, 1)),
    "batch1": (1, 9, 31, 5, 3, (6, 6), True, (1, 1), (1, 1, 1, 1)),
    # im2col columns (4.7 MB per example) over the fused kernels' 64 MB budget of one run: two runs,
    # the first streaming dW_e (18.9 MB, over the 16 MB from which it is written past the caches),
    # the second adding to it
    "two_runs_of_examples": (16, 2048, 128, 2, 3, (8, 8), True, (1, 1), (1, 1, 1, 1)),
}


@pytest.mark.parametrize("case", list(FUSED), ids=list(FUSED))
def test_fused_small_plane_forward(case, vector_isa, monkeypatch):
    batch, cin, cout, experts, k, hw, bias, stride, pad = FUSED[case]
    args = (batch, cin, cout, experts, k, hw, 1, bias, stride, pad, (1, 1))
    x, r, w, b = make_inputs(*args[:8], dtype=torch.float32, seed=7)
    x[0, 0, 0, 0] = 1e3  # one large input: an error in any block would show against the oracle's scale
    want = per_example_oracle(x.double(), r.double(), w.double(), None if b is None else b.double(), stride, pad,
                              (1, 1), 1)
    for policy in ("1", "0"):  # the fused kernel, then mix + GEMM on the same inputs
        monkeypatch.setenv(FUSED_ENV, policy)
        y = OP(x, r, w, b, list(stride), list(pad), [1, 1], 1)
        err = (y.double() - want).abs().max().item()
        assert err <= 2e-5 * want.abs().max().item(), (policy, err)


@pytest.mark.parametrize("case", list(FUSED), ids=list(FUSED))
def test_fused_small_plane_backward(case, vector_isa, monkeypatch):
    """The backward's column gradients W_b^T dy_b from the forward's kernel with the experts read
    transposed, and dW_e, dr from cpu/fused_weight_grad.h, for every subset of them asked for."""
    batch, cin, cout, experts, k, hw, bias, stride, pad = FUSED[case]
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, 1, bias, dtype=torch.float32, seed=11)
    args = (list(stride), list(pad), [1, 1], 1)
    y = OP(x, r, w, b, *args)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(12))
    grad_out[-1, -1, -1, -1] = 1e3  # one large output gradient: it reaches every block of the last example
    _, want = oracle_with_grads(x, r, w, b, stride, pad, (1, 1), 1, grad_out)
    for policy in ("1", "0"):
        monkeypatch.setenv(FUSED_ENV, policy)
        for mask in ([True, True, True, True], [True, False, False, False], [False, True, False, False],
                     [False, False, True, False], [False, True, True, True]):
            grads = BACKWARD(grad_out, x, r, w, b, *args, mask)
            for name, got, ref, wanted in zip(("x", "routing", "weight", "bias"), grads, want, mask):
                if ref is None or not wanted:
                    assert got.shape == (0,), (policy, name)
                    continue
                err = (got.double() - ref).abs().max().item()
                assert err <= 2e-5 * ref.abs().max().item(), (policy, mask, name, err)


def test_fused_small_plane_backward_does_not_depend_on_threads(vector_isa, monkeypatch):
    """dW_e is written in disjoint pieces and dr summed over the tasks in task order: the same bits
    with one thread as with several (the tasks then split differently among them)."""
    monkeypatch.setenv(FUSED_ENV, "1")
    x, r, w, b = make_inputs(4, 40, 130, 5, 3, (6, 7), 1, False, dtype=torch.float32, seed=5)
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1, [True, True, True, False])
    grad_out = torch.randn(4, 130, 6, 7, generator=torch.Generator().manual_seed(6))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = BACKWARD(grad_out, x, r, w, b, *args)
        torch.set_num_threads(max(2, threads))
        several = BACKWARD(grad_out, x, r, w, b, *args)
    finally:
        torch.set_num_threads(threads)
    for name, a, c in zip(("x", "routing", "weight"), one, several):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(DEPTHWISE), ids=list(DEPTHWISE))
def test_depthwise_direct_kernel(case, channels_last):
    check_case(*DEPTHWISE[case], channels_last=channels_last)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(MIX_GEMM), ids=list(MIX_GEMM))
def test_mix_gemm_path(case, channels_last):
    check_case(*MIX_GEMM[case], channels_last=channels_last)


# Shapes that make plan_tiling (csrc/cpu/cond_conv2d.cpp) cut the work in several ways; the
# arithmetic assumes its budgets (16 MiB of columns per run, 2 MiB per mixed tile, tiles >= 32).
# These mixed weights are small enough that "auto" mixes them whole; "tiled" forces the tiles.
TILING_CASES = {
    # 1x1, columns are x itself so one run of 16 examples; 2 MiB / (16 * 256 * 8 B) = 64 channels
    # per tile: tiles of 64, 64, 32 over Cout = 160.
    "pointwise_three_tiles": (16, 256, 160, 3, 1, (4, 4), 1, True, (1, 1), (0, 0, 0, 0), (1, 1)),
    # Same with 2 groups of 80 output channels: tiles of 64 and 16 inside each group.
    "pointwise_tiles_in_groups": (16, 256, 160, 3, 1, (4, 4), 2, True, (1, 1), (0, 0, 0, 0), (1, 1)),
    # 3x3 with 48 * 9 * 62 * 62 * 8 B = 13.3 MiB of columns per example: runs of one example.
    "dense_k3_runs_of_one": (3, 48, 8, 2, 3, (62, 62), 1, True, (1, 1), (1, 1, 1, 1), (1, 1)),
    # Batch 1, one tile would cover all 64 channels: split in two so both threads get a GEMM.
    "batch1_split": (1, 8, 64, 4, 3, (6, 6), 1, True, (1, 1), (1, 1, 1, 1), (1, 1)),
}


@pytest.mark.parametrize("policy", ["auto", "whole", "tiled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(TILING_CASES), ids=list(TILING_CASES))
def test_tiling_strategies_agree_with_oracle(case, channels_last, policy, monkeypatch):
    monkeypatch.setenv(TILING_ENV, policy)
    check_case(*TILING_CASES[case], channels_last=channels_last)


# The float32 mixing kernel (cpu/mixing_kernel.h, blocks of 6 output rows x 64 or 16 columns) at
# every place mix + GEMM mixes: the mixed weights (one row per example) in the forward and the
# backward, and the expert gradients (one row per expert, the examples the inner dimension), added
# to from a run's second run of examples on. Rows, experts and columns not multiples of the blocks.
FLOAT32_MIXING_CASES = {
    "batch9_E7": MIX_GEMM["batch9_E7"],  # 9 rows: blocks of 6 and 3; 108 columns per group tile
    "large_E": MIX_GEMM["large_E"],  # 48 gradient rows over 6 examples
    "pointwise_grouped": MIX_GEMM["pointwise_grouped"],  # 3 columns per group and tile
    "batch1": TILING_CASES["batch1_split"],  # gradient rows over one example
    # 6.6 MiB of float32 columns per example: runs of two, the second adds to the expert gradient.
    "runs_of_two": (3, 48, 9, 5, 3, (62, 62), 1, True, (1, 1), (1, 1, 1, 1), (1, 1)),
}


@pytest.mark.parametrize("policy", ["whole", "tiled"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(FLOAT32_MIXING_CASES), ids=list(FLOAT32_MIXING_CASES))
def test_float32_mixing_kernel(case, channels_last, policy, vector_isa, monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "0")
    monkeypatch.setenv(TILING_ENV, policy)
    args = FLOAT32_MIXING_CASES[case]
    check_case(*args, channels_last=channels_last, dtype=torch.float32, tol=2e-5)
    # Without grad_x the routing gradient's dot products run alone (mixing::dot_columns), not in
    # the pass that mixes for the column gradients.
    batch, cin, cout, experts, k, hw, groups, bias, stride, pad4, dilation = args
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, groups, bias, dtype=torch.float32, seed=3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv = (list(stride), list(pad4), list(dilation), groups)
    y = OP(x, r, w, b, *conv)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    _, want = oracle_with_grads(x, r, w, b, stride, pad4, dilation, groups, grad_out)
    grads = BACKWARD(grad_out, x, r, w, b, *conv, [False, True, True, False])
    for name, got, ref in (("routing", grads[1], want[1]), ("weight", grads[2], want[2])):
        err = (got.double() - ref).abs().max().item()
        assert err <= 2e-5 * max(ref.abs().max().item(), 1.0), (name, err)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize(
    "case", ["depthwise:k3", "depthwise:asymmetric_pad", "mix:pointwise", "mix:dense_k3", "mix:grouped_k3"]
)
def test_bfloat16_accumulates_in_float(case, channels_last):
    family, name = case.split(":")
    args = (DEPTHWISE if family == "depthwise" else MIX_GEMM)[name]
    check_case(*args, channels_last=channels_last, dtype=torch.bfloat16, tol=4e-2)


@pytest.mark.parametrize("case", ["depthwise:k3", "mix:dense_k3", "mix:pointwise"])
def test_float32(case):
    family, name = case.split(":")
    args = (DEPTHWISE if family == "depthwise" else MIX_GEMM)[name]
    check_case(*args, dtype=torch.float32, tol=1e-5)
    check_case(*args, dtype=torch.float32, tol=1e-5, channels_last=True)


def test_channels_last_odd_shapes():
    # Odd channel counts, odd and rectangular planes, batch 1, all three families.
    check_case(1, 5, 7, 3, 3, (7, 9), 1, True, (2, 1), (1, 0, 2, 1), (1, 1), channels_last=True)
    check_case(1, 7, 7, 3, 3, (9, 5), 7, True, (1, 2), (1, 1, 0, 2), (1, 1), channels_last=True)
    check_case(3, 9, 5, 2, 1, (3, 7), 1, False, (1, 1), (0, 0, 0, 0), (1, 1), channels_last=True)


MASKS = [list(m) for m in itertools.product([False, True], repeat=4)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("family", ["depthwise", "pointwise", "dense_k3", "single_expert", "single_expert_batch1"])
def test_every_output_mask(family, bias):
    args = {
        "depthwise": (2, 4, 4, 3, 3, (6, 5), 4, bias, (1, 1), (1, 1, 1, 1), (1, 1)),
        "pointwise": (2, 4, 6, 3, 1, (5, 5), 1, bias, (1, 1), (0, 0, 0, 0), (1, 1)),
        "dense_k3": (2, 4, 6, 3, 3, (5, 6), 2, bias, (2, 1), (0, 1, 1, 1), (1, 1)),
        "single_expert": (2, 4, 6, 1, 3, (5, 6), 2, bias, (2, 1), (0, 1, 1, 1), (1, 1)),
        "single_expert_batch1": (1, 4, 6, 1, 3, (5, 6), 2, bias, (2, 1), (0, 1, 1, 1), (1, 1)),
    }[family]
    batch, cin, cout, experts, k, hw, groups, _, stride, pad4, dilation = args
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, groups, bias, seed=5)
    y = OP(x, r, w, b, list(stride), list(pad4), list(dilation), groups)
    grad_out = torch.randn_like(y)
    _, want = oracle_with_grads(x, r, w, b, stride, pad4, dilation, groups, grad_out)
    for mask in MASKS:
        got = BACKWARD(grad_out, x, r, w, b, list(stride), list(pad4), list(dilation), groups, mask)
        for i, (g, ref) in enumerate(zip(got, want)):
            if mask[i] and ref is not None:
                torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-9)
            else:
                assert g.shape == (0,), (mask, i)
        for a, c in itertools.combinations(got, 2):
            assert not torch._C._is_alias_of(a, c), mask


@pytest.mark.parametrize("family", ["depthwise", "pointwise", "dense_k3"])
def test_batch_zero_and_one(family):
    cin, cout, groups, k = {"depthwise": (4, 4, 4, 3), "pointwise": (4, 6, 1, 1), "dense_k3": (4, 6, 1, 3)}[family]
    pad = [k // 2] * 4
    check_case(1, cin, cout, 3, k, (5, 5), groups, True, (1, 1), pad, (1, 1))
    check_case(1, cin, cout, 3, k, (5, 5), groups, True, (1, 1), pad, (1, 1), channels_last=True)
    x, r, w, b = make_inputs(0, cin, cout, 3, k, (5, 5), groups, True)
    y = OP(x, r, w, b, [1, 1], pad, [1, 1], groups)
    assert y.shape == (0, cout, 5, 5)
    gx, gr, gw, gb = BACKWARD(y, x, r, w, b, [1, 1], pad, [1, 1], groups, [True] * 4)
    assert gx.shape == x.shape and gr.shape == r.shape
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_gradcheck_depthwise_asymmetric_channels_last():
    x, r, w, b = make_inputs(2, 3, 3, 2, 3, (5, 6), 3, True, seed=11)
    x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    fn = lambda *a: OP(*a, [2, 1], [0, 1, 2, 0], [1, 2], 3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def test_gradcheck_mix_gemm_strided_pointwise_channels_last():
    x, r, w, b = make_inputs(3, 4, 5, 3, 1, (5, 5), 1, True, seed=12)
    x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_(True) for t in (x, r, w, b)]
    fn = lambda *a: OP(*a, [2, 2], [0, 0, 0, 0], [1, 1], 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.skipif(os.environ.get("CONDKERNELS_CPU_OUTPUT_CACHE_MB", "1024") in ("0", ""),
                    reason="the CPU output cache is turned off")
def test_large_weight_gradient_from_the_output_cache():
    """Expert gradients of 32 MB and more come from reused buffers (never zeroed): every reuse is
    fully overwritten, a gradient still alive is never handed out again, and the cache empties."""
    batch, cin, cout, experts, k = 2, 512, 256, 8, 3  # float32 gradient: 37.7 MB
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, cin, 3, 3, generator=gen)
    w = torch.randn(experts, cout, cin, k, k, generator=gen) * 0.05
    args = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    condkernels.empty_cpu_cache()

    def weight_grad(seed):
        r = torch.rand(batch, experts, generator=torch.Generator().manual_seed(seed))
        go = torch.randn(batch, cout, 3, 3, generator=torch.Generator().manual_seed(seed + 1))
        got = BACKWARD(go, x, r, w, None, *args, [False, False, True, False])[2]
        # dW_e = sum_b r[b, e] dW_b, dW_b from the library's float64 convolution backward.
        dw_b = torch.stack([
            torch.ops.aten.convolution_backward(
                go[i:i + 1].double(), x[i:i + 1].double(), w[0].double(), None, [1, 1], [1, 1], [1, 1], False,
                [0, 0], 1, [False, True, False])[1]
            for i in range(batch)])
        want = torch.einsum("be,b...->e...", r.double(), dw_b)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        return got

    first = weight_grad(0)
    first_copy = first.clone()
    second = weight_grad(10)  # `first` alive: a buffer of its own
    assert second.data_ptr() != first.data_ptr()
    assert torch.equal(first, first_copy)
    freed = {first.data_ptr(), second.data_ptr()}
    del first, second
    third = weight_grad(20)  # a freed buffer, full of earlier gradients, comes back and is overwritten
    assert third.data_ptr() in freed
    del third
    assert condkernels.empty_cpu_cache() >= 2 * experts * cout * cin * k * k * 4
    assert condkernels.empty_cpu_cache() == 0


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_large_expert_gradient_written_past_the_caches(batch, channels_last, monkeypatch):
    """The mix + GEMM backward writes expert gradients of 16 MB and more with streaming stores; odd
    channel counts start the rows of every tile at every alignment (heads and tails stored plainly)."""
    monkeypatch.setenv(FUSED_ENV, "0")
    # float32 expert gradient: 4 x 515 x 2049 x 4 B = 16.9 MB
    check_case(batch, 2049, 515, 4, 1, (2, 3), 1, True, (1, 1), (0, 0, 0, 0), (1, 1),
               channels_last=channels_last, dtype=torch.float32, tol=1e-4)


# Under torch.inference_mode the output is an inference tensor, which worker threads may not update
# in place unless they run with the caller's state (the per-example GEMMs are ATen out= calls made
# from at::parallel_for workers). Enough examples for the per-example threads, every path.
INFERENCE_MODE_CASES = {
    "depthwise": DEPTHWISE["k3"],
    "pointwise": MIX_GEMM["pointwise"],
    "dense_k3": MIX_GEMM["dense_k3"],
    "grouped_k3": MIX_GEMM["grouped_k3"],
    "single_expert": SINGLE_EXPERT["pointwise"],
}


@pytest.mark.parametrize("fused", ["0", "1"], ids=["mix_gemm", "fused"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(INFERENCE_MODE_CASES), ids=list(INFERENCE_MODE_CASES))
def test_every_path_under_inference_mode(case, channels_last, fused, monkeypatch):
    monkeypatch.setenv(FUSED_ENV, fused)
    _, cin, cout, experts, k, hw, groups, bias, stride, pad, dilation = INFERENCE_MODE_CASES[case]
    batch = max(4, 2 * torch.get_num_threads())
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, groups, bias, dtype=torch.float32, seed=3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (list(stride), list(pad), list(dilation), groups)
    want = OP(x, r, w, b, *args)
    with torch.inference_mode():
        got = OP(x, r, w, b, *args)
        made_inside = [t.clone() if t is not None else None for t in (x, r, w, b)]
        got_inside = OP(*made_inside, *args)
    assert got.is_inference() and got_inside.is_inference()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_inside, want, rtol=1e-6, atol=1e-6)


# --- condkernels.frozen_weights(): the fused forward reads the experts from a kept copy in its
# staged layout (cpu/frozen_weights.h), at any batch and expert count.


def _fused_case_inputs(case, seed):
    batch, cin, cout, experts, k, hw, bias, stride, pad = FUSED[case]
    x, r, w, b = make_inputs(batch, cin, cout, experts, k, hw, 1, bias, dtype=torch.float32, seed=seed)
    return x, r, w, b, (list(stride), list(pad), [1, 1], 1)


@pytest.mark.parametrize("case", list(FUSED), ids=list(FUSED))
def test_frozen_weights_forward(case, vector_isa, monkeypatch):
    """Against the oracle, and the same bits as the fused kernel staging the experts itself (the
    copy holds the values it would stage, summed in the same order)."""
    x, r, w, b, args = _fused_case_inputs(case, seed=21)
    x[0, 0, 0, 0] = 1e3
    want = per_example_oracle(x.double(), r.double(), w.double(), None if b is None else b.double(), *args)
    monkeypatch.setenv(FUSED_ENV, "1")
    staging = OP(x, r, w, b, *args)
    monkeypatch.delenv(FUSED_ENV)
    with condkernels.frozen_weights():
        first = OP(x, r, w, b, *args)  # makes the copy
        again = OP(x, r, w, b, *args)  # reads it
        assert condkernels.empty_cpu_cache() >= w.numel() * 4  # the copy is there, and goes
        after_emptying = OP(x, r, w, b, *args)
    err = (first.double() - want).abs().max().item()
    assert err <= 2e-5 * want.abs().max().item(), err
    for got in (again, after_emptying):
        assert torch.equal(got, first)
    assert torch.equal(first, staging)


def test_frozen_weights_follow_in_place_updates_and_other_weights(vector_isa):
    x, r, w, b, args = _fused_case_inputs("k3_odd_everything", seed=22)
    other = torch.randn(w.shape, generator=torch.Generator().manual_seed(23))
    with condkernels.frozen_weights():
        before = OP(x, r, w, b, *args)
        with torch.no_grad():
            w.mul_(-2.0)  # bumps w._version: the copy is laid out again
        after = OP(x, r, w, b, *args)
        with_other = OP(x, r, other, b, *args)
    mixed_bias = r @ b
    torch.testing.assert_close(after - mixed_bias[:, :, None, None],
                               -2.0 * (before - mixed_bias[:, :, None, None]), rtol=1e-5, atol=1e-4)
    want = per_example_oracle(x.double(), r.double(), other.double(), b.double(), *args)
    assert (with_other.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()


def test_frozen_weights_keep_copies_across_contexts_while_their_weights_live(vector_isa):
    x, r, w, b, args = _fused_case_inputs("k3_odd_everything", seed=24)
    other = w.clone()
    condkernels.empty_cpu_cache()
    with condkernels.frozen_weights():
        with condkernels.frozen_weights():
            OP(x, r, w, b, *args)
        OP(x, r, other, b, *args)
    with condkernels.frozen_weights():  # a context per call: the copies are still there
        OP(x, r, w, b, *args)
    kept = condkernels.empty_cpu_cache()
    assert kept >= 2 * w.numel() * 4
    with condkernels.frozen_weights():
        OP(x, r, w, b, *args)
        OP(x, r, other, b, *args)
    del other
    with condkernels.frozen_weights():
        OP(x, r, w, b, *args)  # frees the copy of the weight that is gone
    assert condkernels.empty_cpu_cache() == kept // 2
    OP(x, r, w, b, *args)  # outside a context: nothing kept
    assert condkernels.empty_cpu_cache() == 0
    with pytest.raises(RuntimeError, match="frozen_weights"):
        torch.ops.condkernels._exit_frozen_weights()


def test_frozen_weights_make_no_copy_of_what_they_cannot_track(vector_isa):
    """A non-contiguous weight (made contiguous per call) and inference tensors (no version) are
    read as they are: right answers, nothing kept."""
    x, r, w, b, args = _fused_case_inputs("k3_odd_everything", seed=25)
    want = OP(x, r, w, b, *args)
    strided = w.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    with condkernels.frozen_weights():
        condkernels.empty_cpu_cache()
        assert torch.equal(OP(x, r, strided, b, *args), want)
        with torch.inference_mode():
            w_inference = w.clone()
            torch.testing.assert_close(OP(x, r, w_inference, b, *args), want, rtol=1e-6, atol=1e-5)
        assert condkernels.empty_cpu_cache() == 0
