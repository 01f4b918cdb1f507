// cond_conv2d: y[b] = conv2d(x[b], sum_e routing[b,e] * weight[e], sum_e routing[b,e] * bias[e]).
//
// Schema (csrc/ops/cond_conv2d.cpp), CPU kernels (csrc/cpu/cond_conv2d.cpp), CUDA kernels
// (csrc/cuda/cond_conv2d.cu), Triton kernels (condkernels/triton/cond_conv2d.py), Python function,
// fake kernel and autograd (condkernels/ops/cond_conv2d.py), tests (python_tests/test_cond_conv2d.py),
// benchmark (condkernels/bench/condconv.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>

#include "common/conv_geometry.h"

namespace condkernels {

// Validates every argument of cond_conv2d (shapes, dtypes, devices, geometry) with an error that
// names the offending argument, and returns the geometry of the convolution.
ConvGeometry check_cond_conv2d_args(const at::Tensor& x, const at::Tensor& routing,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, int64_t groups);

}  // namespace condkernels
