// Schemas of gated_conv2d, its training variant and its backward, and the argument checks every
// backend shares.
#include "ops/gated_conv2d.h"

#include "ops/conv_checks.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace condkernels {
namespace {

void check_gate(const std::optional<at::Tensor>& gate, const char* name, const char* channels,
                int64_t batch, int64_t num_channels, const at::Tensor& x) {
  if (!gate.has_value()) return;
  TORCH_CHECK(gate->dim() == 2 && gate->size(0) == batch && gate->size(1) == num_channels,
              "gated_conv2d: ", name, " must have shape (B, ", channels, ") = (", batch, ", ",
              num_channels, "), got ", gate->sizes());
  check_like_x("gated_conv2d", *gate, name, x);
}

}  // namespace

ConvGeometry check_gated_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& in_gate,
                                     const std::optional<at::Tensor>& out_gate,
                                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                                     c10::IntArrayRef dilation, int64_t groups) {
  constexpr const char* op = "gated_conv2d";
  TORCH_CHECK(weight.dim() == 4,
              "gated_conv2d: weight must be 4-D (Cout, Cin/groups, kh, kw), got shape ",
              weight.sizes());
  const ConvGeometry g = check_conv_geometry(op, x, weight.size(0), weight.size(1), weight.size(2),
                                             weight.size(3), stride, padding, dilation, groups);
  check_like_x(op, weight, "weight", x);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels,
                "gated_conv2d: bias must have shape (Cout,) = (", g.out_channels, ",), got ",
                bias->sizes());
    check_like_x(op, *bias, "bias", x);
  }
  check_gate(in_gate, "in_gate", "Cin", g.batch, g.in_channels, x);
  check_gate(out_gate, "out_gate", "Cout", g.batch, g.out_channels, x);
  return g;
}

ConvGeometry check_gated_conv2d_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_gate,
    const std::optional<at::Tensor>& out_gate, const std::optional<at::Tensor>& ungated,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = check_gated_conv2d_args(x, weight, bias, in_gate, out_gate, stride,
                                                 padding, dilation, groups);
  const std::vector<int64_t> out_shape{g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(out_shape), "gated_conv2d: grad_out must have shape ",
              c10::IntArrayRef(out_shape), ", got ", grad_out.sizes());
  check_like_x("gated_conv2d", grad_out, "grad_out", x);
  if (ungated.has_value()) {
    TORCH_CHECK(ungated->sizes() == c10::IntArrayRef(out_shape),
                "gated_conv2d: ungated must have shape ", c10::IntArrayRef(out_shape), ", got ",
                ungated->sizes());
    check_like_x("gated_conv2d", *ungated, "ungated", x);
  }
  return g;
}

}  // namespace condkernels

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  // Inference form: every closed channel of every example is skipped.
  m.def(
      "gated_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gate, Tensor? out_gate, "
      "int[2] stride, int[4] padding, int[2] dilation, int groups) -> Tensor");
  // Training form, for an out_gate that needs its gradient: closed input channels are still
  // skipped, but every output channel is computed and also returned ungated
  // (conv2d(in_gate * x, weight) + bias), which that gradient needs.
  m.def(
      "_gated_conv2d_with_ungated(Tensor x, Tensor weight, Tensor? bias, Tensor? in_gate, "
      "Tensor? out_gate, int[2] stride, int[4] padding, int[2] dilation, int groups) "
      "-> (Tensor out, Tensor ungated)");
  // `ungated` is the second output of _gated_conv2d_with_ungated; without it a requested
  // grad_out_gate recomputes it. Unrequested gradients, and grad_bias when bias is None, come back
  // as distinct empty (0,) tensors: a schema cannot return None.
  m.def(
      "_gated_conv2d_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "
      "Tensor? in_gate, Tensor? out_gate, Tensor? ungated, int[2] stride, int[4] padding, "
      "int[2] dilation, int groups, bool[5] output_mask) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bias, Tensor grad_in_gate, Tensor grad_out_gate)");
}
