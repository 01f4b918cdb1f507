// Schemas of gated_conv2d, its training variant and its backward, and the argument checks every
// backend shares.
#include "ops/gated_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace condkernels {
namespace {

void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gated_conv2d: ", name, " has dtype ",
              t.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "gated_conv2d: ", name, " is on ", t.device(),
              " but x is on ", x.device());
}

void check_gate(const std::optional<at::Tensor>& gate, const char* name, const char* channels,
                int64_t batch, int64_t num_channels, const at::Tensor& x) {
  if (!gate.has_value()) return;
  TORCH_CHECK(gate->dim() == 2 && gate->size(0) == batch && gate->size(1) == num_channels,
              "gated_conv2d: ", name, " must have shape (B, ", channels, ") = (", batch, ", ",
              num_channels, "), got ", gate->sizes());
  check_like_x(*gate, name, x);
}

}  // namespace

ConvGeometry check_gated_conv2d_args(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& in_gate,
                                     const std::optional<at::Tensor>& out_gate,
                                     c10::IntArrayRef stride, c10::IntArrayRef padding,
                                     c10::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "gated_conv2d: x must be 4-D (B, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4,
              "gated_conv2d: weight must be 4-D (Cout, Cin/groups, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2, "gated_conv2d: stride must have 2 values");
  TORCH_CHECK(padding.size() == 4,
              "gated_conv2d: padding must have 4 values (h_begin, h_end, w_begin, w_end)");
  TORCH_CHECK(dilation.size() == 2, "gated_conv2d: dilation must have 2 values");
  TORCH_CHECK(groups > 0, "gated_conv2d: groups must be positive, got ", groups);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "gated_conv2d: x must be floating point, got ",
              x.scalar_type());
  check_like_x(weight, "weight", x);

  ConvGeometry g{};
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.in_h = x.size(2);
  g.in_w = x.size(3);
  g.out_channels = weight.size(0);
  g.groups = groups;
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h_begin = padding[0];
  g.pad_h_end = padding[1];
  g.pad_w_begin = padding[2];
  g.pad_w_end = padding[3];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];

  TORCH_CHECK(g.in_channels % groups == 0, "gated_conv2d: in_channels (", g.in_channels,
              ") is not divisible by groups (", groups, ")");
  TORCH_CHECK(g.out_channels % groups == 0, "gated_conv2d: out_channels (", g.out_channels,
              ") is not divisible by groups (", groups, ")");
  TORCH_CHECK(weight.size(1) * groups == g.in_channels, "gated_conv2d: weight has ",
              weight.size(1), " input channels per group but x has ", g.in_channels,
              " channels in ", groups, " groups");
  TORCH_CHECK(g.stride_h > 0 && g.stride_w > 0, "gated_conv2d: stride must be positive, got ",
              stride);
  TORCH_CHECK(g.dilation_h > 0 && g.dilation_w > 0,
              "gated_conv2d: dilation must be positive, got ", dilation);
  TORCH_CHECK(g.pad_h_begin >= 0 && g.pad_h_end >= 0 && g.pad_w_begin >= 0 && g.pad_w_end >= 0,
              "gated_conv2d: padding must be non-negative, got ", padding);
  g.out_h = conv_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h_begin, g.pad_h_end, g.dilation_h);
  g.out_w = conv_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w_begin, g.pad_w_end, g.dilation_w);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "gated_conv2d: the (dilated) kernel ", g.kernel_h, "x",
              g.kernel_w, " is larger than the padded input ", g.in_h + g.pad_h_begin + g.pad_h_end,
              "x", g.in_w + g.pad_w_begin + g.pad_w_end);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels,
                "gated_conv2d: bias must have shape (Cout,) = (", g.out_channels, ",), got ",
                bias->sizes());
    check_like_x(*bias, "bias", x);
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
  check_like_x(grad_out, "grad_out", x);
  if (ungated.has_value()) {
    TORCH_CHECK(ungated->sizes() == c10::IntArrayRef(out_shape),
                "gated_conv2d: ungated must have shape ", c10::IntArrayRef(out_shape), ", got ",
                ungated->sizes());
    check_like_x(*ungated, "ungated", x);
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
