// Schemas of cond_conv2d and its backward, and the argument checks every backend shares.
#include "ops/cond_conv2d.h"

#include "ops/conv_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace condkernels {

ConvGeometry check_cond_conv2d_args(const at::Tensor& x, const at::Tensor& routing,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "cond_conv2d";
  TORCH_CHECK(routing.dim() == 2, "cond_conv2d: routing must be 2-D (B, E), got shape ",
              routing.sizes());
  TORCH_CHECK(weight.dim() == 5,
              "cond_conv2d: weight must be 5-D (E, Cout, Cin/groups, kh, kw), got shape ",
              weight.sizes());
  const ConvGeometry g = check_conv_geometry(op, x, weight.size(1), weight.size(2), weight.size(3),
                                             weight.size(4), stride, padding, dilation, groups);
  check_like_x(op, routing, "routing", x);
  check_like_x(op, weight, "weight", x);
  const int64_t experts = weight.size(0);
  TORCH_CHECK(experts > 0, "cond_conv2d: weight must have at least one expert");
  // An empty reduction or output would reach the kernels' block arithmetic (a division by zero).
  TORCH_CHECK(g.out_channels > 0, "cond_conv2d: weight must have at least one output channel, got shape ",
              weight.sizes());
  TORCH_CHECK(g.in_channels > 0, "cond_conv2d: x must have at least one channel, got shape ", x.sizes());
  TORCH_CHECK(routing.size(0) == g.batch, "cond_conv2d: routing has ", routing.size(0),
              " rows but x has batch size ", g.batch);
  TORCH_CHECK(routing.size(1) == experts, "cond_conv2d: routing has ", routing.size(1),
              " experts but weight has ", experts);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == experts && bias->size(1) == g.out_channels,
                "cond_conv2d: bias must have shape (E, Cout) = (", experts, ", ", g.out_channels,
                "), got ", bias->sizes());
    check_like_x(op, *bias, "bias", x);
  }
  return g;
}

}  // namespace condkernels

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  m.def(
      "cond_conv2d(Tensor x, Tensor routing, Tensor weight, Tensor? bias, int[2] stride, "
      "int[4] padding, int[2] dilation, int groups) -> Tensor");
  // Gradients the mask does not ask for, and grad_bias when bias is None, come back as empty (0,)
  // tensors: a schema cannot return None.
  m.def(
      "_cond_conv2d_backward(Tensor grad_out, Tensor x, Tensor routing, Tensor weight, Tensor? bias, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups, bool[4] output_mask) "
      "-> (Tensor grad_x, Tensor grad_routing, Tensor grad_weight, Tensor grad_bias)");
}
