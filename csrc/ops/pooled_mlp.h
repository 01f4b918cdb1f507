// pooled_mlp: global average pooling, then one linear layer, or two with a ReLU between them.
//
// Schema, checks and the ATen composition: csrc/ops/pooled_mlp.cpp; CPU kernel:
// csrc/cpu/pooled_mlp.cpp; Python function and autograd: condkernels/ops/pooled_mlp.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace condkernels {

// Checks every argument against x (dtype, device, shape) and names the offending one.
void check_pooled_mlp_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                           const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2);

// out = w2 relu(w1 mean_hw(x) + b1) + b2 (w1 mean_hw(x) + b1 without w2), through ATen's ops.
at::Tensor pooled_mlp_composite(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2);

}  // namespace condkernels
