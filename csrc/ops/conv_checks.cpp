#include "ops/conv_checks.h"

#include <ATen/ATen.h>

namespace condkernels {

void check_like_x(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

ConvGeometry check_conv_geometry(const char* op, const at::Tensor& x, int64_t out_channels,
                                 int64_t in_channels_per_group, int64_t kernel_h, int64_t kernel_w,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding,
                                 c10::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(stride.size() == 2, op, ": stride must have 2 values");
  TORCH_CHECK(padding.size() == 4, op,
              ": padding must have 4 values (h_begin, h_end, w_begin, w_end)");
  TORCH_CHECK(dilation.size() == 2, op, ": dilation must have 2 values");
  TORCH_CHECK(groups > 0, op, ": groups must be positive, got ", groups);
  TORCH_CHECK(kernel_h > 0 && kernel_w > 0, op, ": weight's kernel must be at least 1x1, got ", kernel_h, "x",
              kernel_w);

  ConvGeometry g{};
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.in_h = x.size(2);
  g.in_w = x.size(3);
  g.out_channels = out_channels;
  g.groups = groups;
  g.kernel_h = kernel_h;
  g.kernel_w = kernel_w;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h_begin = padding[0];
  g.pad_h_end = padding[1];
  g.pad_w_begin = padding[2];
  g.pad_w_end = padding[3];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];

  TORCH_CHECK(g.in_channels % groups == 0, op, ": in_channels (", g.in_channels,
              ") is not divisible by groups (", groups, ")");
  TORCH_CHECK(g.out_channels % groups == 0, op, ": out_channels (", g.out_channels,
              ") is not divisible by groups (", groups, ")");
  TORCH_CHECK(in_channels_per_group * groups == g.in_channels, op, ": weight has ",
              in_channels_per_group, " input channels per group but x has ", g.in_channels,
              " channels in ", groups, " groups");
  TORCH_CHECK(g.stride_h > 0 && g.stride_w > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(g.dilation_h > 0 && g.dilation_w > 0, op, ": dilation must be positive, got ",
              dilation);
  TORCH_CHECK(g.pad_h_begin >= 0 && g.pad_h_end >= 0 && g.pad_w_begin >= 0 && g.pad_w_end >= 0,
              op, ": padding must be non-negative, got ", padding);
  g.out_h = conv_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h_begin, g.pad_h_end, g.dilation_h);
  g.out_w = conv_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w_begin, g.pad_w_end, g.dilation_w);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, op, ": the (dilated) kernel ", g.kernel_h, "x",
              g.kernel_w, " is larger than the padded input ", g.in_h + g.pad_h_begin + g.pad_h_end,
              "x", g.in_w + g.pad_w_begin + g.pad_w_end);
  return g;
}

}  // namespace condkernels
