// Schemas of cond_conv2d and its backward, and the argument checks every backend shares.
#include "ops/cond_conv2d.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace condkernels {

ConvGeometry check_cond_conv2d_args(const at::Tensor& x, const at::Tensor& routing,
                                    const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "cond_conv2d: x must be 4-D (B, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(routing.dim() == 2, "cond_conv2d: routing must be 2-D (B, E), got shape ",
              routing.sizes());
  TORCH_CHECK(weight.dim() == 5,
              "cond_conv2d: weight must be 5-D (E, Cout, Cin/groups, kh, kw), got shape ",
              weight.sizes());
  TORCH_CHECK(stride.size() == 2, "cond_conv2d: stride must have 2 values");
  TORCH_CHECK(padding.size() == 4,
              "cond_conv2d: padding must have 4 values (h_begin, h_end, w_begin, w_end)");
  TORCH_CHECK(dilation.size() == 2, "cond_conv2d: dilation must have 2 values");
  TORCH_CHECK(groups > 0, "cond_conv2d: groups must be positive, got ", groups);

  const auto dtype = x.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "cond_conv2d: x must be floating point, got ", dtype);
  TORCH_CHECK(routing.scalar_type() == dtype, "cond_conv2d: routing has dtype ",
              routing.scalar_type(), " but x has ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "cond_conv2d: weight has dtype ",
              weight.scalar_type(), " but x has ", dtype);
  TORCH_CHECK(routing.device() == x.device(), "cond_conv2d: routing is on ", routing.device(),
              " but x is on ", x.device());
  TORCH_CHECK(weight.device() == x.device(), "cond_conv2d: weight is on ", weight.device(),
              " but x is on ", x.device());

  ConvGeometry g{};
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.in_h = x.size(2);
  g.in_w = x.size(3);
  g.out_channels = weight.size(1);
  g.groups = groups;
  g.kernel_h = weight.size(3);
  g.kernel_w = weight.size(4);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h_begin = padding[0];
  g.pad_h_end = padding[1];
  g.pad_w_begin = padding[2];
  g.pad_w_end = padding[3];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  const int64_t experts = weight.size(0);

  TORCH_CHECK(routing.size(0) == g.batch, "cond_conv2d: routing has ", routing.size(0),
              " rows but x has batch size ", g.batch);
  TORCH_CHECK(routing.size(1) == experts, "cond_conv2d: routing has ", routing.size(1),
              " experts but weight has ", experts);
  TORCH_CHECK(experts > 0, "cond_conv2d: weight must have at least one expert");
  TORCH_CHECK(g.in_channels % groups == 0, "cond_conv2d: in_channels (", g.in_channels,
              ") is not divisible by groups (", groups, ")");
  TORCH_CHECK(g.out_channels % groups == 0, "cond_conv2d: out_channels (", g.out_channels,
              ") is not divisible by groups (", groups, ")");
  TORCH_CHECK(weight.size(2) * groups == g.in_channels, "cond_conv2d: weight has ", weight.size(2),
              " input channels per group but x has ", g.in_channels, " channels in ", groups,
              " groups");
  TORCH_CHECK(g.stride_h > 0 && g.stride_w > 0, "cond_conv2d: stride must be positive, got ",
              stride);
  TORCH_CHECK(g.dilation_h > 0 && g.dilation_w > 0, "cond_conv2d: dilation must be positive, got ",
              dilation);
  TORCH_CHECK(g.pad_h_begin >= 0 && g.pad_h_end >= 0 && g.pad_w_begin >= 0 && g.pad_w_end >= 0,
              "cond_conv2d: padding must be non-negative, got ", padding);
  g.out_h = conv_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h_begin, g.pad_h_end, g.dilation_h);
  g.out_w = conv_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w_begin, g.pad_w_end, g.dilation_w);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "cond_conv2d: the (dilated) kernel ", g.kernel_h, "x",
              g.kernel_w, " is larger than the padded input ", g.in_h + g.pad_h_begin + g.pad_h_end,
              "x", g.in_w + g.pad_w_begin + g.pad_w_end);
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 2 && b.size(0) == experts && b.size(1) == g.out_channels,
                "cond_conv2d: bias must have shape (E, Cout) = (", experts, ", ", g.out_channels,
                "), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == dtype, "cond_conv2d: bias has dtype ", b.scalar_type(),
                " but x has ", dtype);
    TORCH_CHECK(b.device() == x.device(), "cond_conv2d: bias is on ", b.device(), " but x is on ",
                x.device());
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
