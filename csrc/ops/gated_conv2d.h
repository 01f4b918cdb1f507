// gated_conv2d: y[b] = out_gate[b] * (conv2d(in_gate[b] * x[b], weight) + bias), where a gate that
// is exactly zero closes its channel for that example and its work is skipped.
//
// Schema (csrc/ops/gated_conv2d.cpp), CPU kernels (csrc/cpu/gated_conv2d.cpp), CUDA kernels
// (csrc/cuda/gated_conv2d.cu), Triton kernels (condkernels/triton/gated_conv2d.py), Python function,
// fake kernels and autograd (condkernels/ops/gated_conv2d.py), tests
// (python_tests/test_gated_conv2d.py), benchmark (condkernels/bench/gated.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>

#include "common/conv_geometry.h"

namespace condkernels {

// Validates every argument of gated_conv2d (shapes, dtypes, devices, geometry) with an error that
// names the offending argument, and returns the geometry of the convolution.
ConvGeometry check_gated_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& in_gate,
                                     const std::optional<at::Tensor>& out_gate,
                                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                                     c10::IntArrayRef dilation, int64_t groups);

// The checks of the backward op: the forward's, plus grad_out (and `ungated` when given) of shape
// (B, Cout, H_out, W_out).
ConvGeometry check_gated_conv2d_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_gate,
    const std::optional<at::Tensor>& out_gate, const std::optional<at::Tensor>& ungated,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups);

}  // namespace condkernels
