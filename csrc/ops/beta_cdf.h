// beta_cdf: the regularised incomplete beta function I_x(a, b), elementwise with broadcasting.
//
// Math (shared by CPU and CUDA): csrc/common/beta_cdf_math.h. Schema: csrc/ops/beta_cdf.cpp.
// CPU kernels: csrc/cpu/beta_cdf.cpp; CUDA kernels: csrc/cuda/beta_cdf.cu; Triton kernels:
// condkernels/triton/beta_cdf.py; Python function, fakes and autograd: condkernels/ops/beta_cdf.py;
// tests: python_tests/test_beta_cdf.py; benchmark: condkernels/bench/batch_shaping.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace condkernels {

// Checks dtypes and devices of x, a, b (names the offending argument) and returns the broadcast
// shape of the three.
std::vector<int64_t> check_beta_cdf_args(const at::Tensor& x, const at::Tensor& a,
                                         const at::Tensor& b);

}  // namespace condkernels
