// CPU kernels of cond_conv2d.
// BASELINE: mixes per-example weights with one GEMM and runs them as one grouped convolution.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops/cond_conv2d.h"

namespace condkernels {
namespace {

at::Tensor pad_if_asymmetric(const at::Tensor& x, const ConvGeometry& g) {
  if (g.pad_h_begin == g.pad_h_end && g.pad_w_begin == g.pad_w_end) return x;
  return at::constant_pad_nd(x, {g.pad_w_begin, g.pad_w_end, g.pad_h_begin, g.pad_h_end}, 0);
}

at::Tensor cond_conv2d_cpu(const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g = check_cond_conv2d_args(x, routing, weight, bias, stride, padding, dilation,
                                                groups);
  if (g.batch == 0) return at::empty({0, g.out_channels, g.out_h, g.out_w}, x.options());
  const int64_t E = weight.size(0);
  const bool symmetric = g.pad_h_begin == g.pad_h_end && g.pad_w_begin == g.pad_w_end;
  auto mixed = at::mm(routing, weight.reshape({E, -1}))
                   .view({g.batch * g.out_channels, g.in_channels_per_group(), g.kernel_h, g.kernel_w});
  std::optional<at::Tensor> mixed_bias;
  if (bias) mixed_bias = at::mm(routing, *bias).reshape({-1});
  auto xin = pad_if_asymmetric(x, g).reshape({1, -1, symmetric ? g.in_h : g.in_h + g.pad_h_begin + g.pad_h_end,
                                               symmetric ? g.in_w : g.in_w + g.pad_w_begin + g.pad_w_end});
  std::vector<int64_t> pad = symmetric ? std::vector<int64_t>{g.pad_h_begin, g.pad_w_begin}
                                       : std::vector<int64_t>{0, 0};
  auto y = at::conv2d(xin, mixed, mixed_bias, stride, pad, dilation, g.batch * groups);
  return y.view({g.batch, g.out_channels, g.out_h, g.out_w}).contiguous(x.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_conv2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& routing,
    const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 4> output_mask) {
  const ConvGeometry g = check_cond_conv2d_args(x, routing, weight, bias, stride, padding, dilation,
                                                groups);
  const int64_t E = weight.size(0);
  auto empty = [&] { return x.new_empty({0}); };
  if (g.batch == 0) {
    return {output_mask[0] ? at::zeros_like(x) : empty(), output_mask[1] ? at::zeros_like(routing) : empty(),
            output_mask[2] ? at::zeros_like(weight) : empty(),
            output_mask[3] && bias ? at::zeros_like(*bias) : empty()};
  }
  const bool symmetric = g.pad_h_begin == g.pad_h_end && g.pad_w_begin == g.pad_w_end;
  auto mixed = at::mm(routing, weight.reshape({E, -1}))
                   .view({g.batch * g.out_channels, g.in_channels_per_group(), g.kernel_h, g.kernel_w});
  auto xpad = pad_if_asymmetric(x, g);
  auto xin = xpad.reshape({1, -1, xpad.size(2), xpad.size(3)});
  std::vector<int64_t> pad = symmetric ? std::vector<int64_t>{g.pad_h_begin, g.pad_w_begin}
                                       : std::vector<int64_t>{0, 0};
  const bool need_mixed_grad = output_mask[1] || output_mask[2];
  const bool need_bias_grad = bias.has_value() && (output_mask[1] || output_mask[3]);
  auto go = grad_out.reshape({1, g.batch * g.out_channels, g.out_h, g.out_w});
  auto [gx, gmixed, gbias_mixed] = at::convolution_backward(
      go, xin, mixed, std::vector<int64_t>{g.batch * g.out_channels}, stride, pad, dilation, false,
      {0, 0}, g.batch * groups, {output_mask[0], need_mixed_grad, need_bias_grad});
  at::Tensor grad_x = empty(), grad_routing = empty(), grad_weight = empty(), grad_bias = empty();
  if (output_mask[0]) {
    grad_x = gx.view_as(xpad);
    if (!symmetric)
      grad_x = grad_x.slice(2, g.pad_h_begin, g.pad_h_begin + g.in_h)
                   .slice(3, g.pad_w_begin, g.pad_w_begin + g.in_w)
                   .contiguous();
    grad_x = grad_x.contiguous(x.suggest_memory_format());
  }
  at::Tensor gmixed_b = need_mixed_grad ? gmixed.reshape({g.batch, -1}) : empty();
  at::Tensor gbias_b = need_bias_grad ? gbias_mixed.view({g.batch, g.out_channels}) : empty();
  if (output_mask[2]) grad_weight = at::mm(routing.t(), gmixed_b).view_as(weight);
  if (output_mask[3] && bias) grad_bias = at::mm(routing.t(), gbias_b);
  if (output_mask[1]) {
    grad_routing = at::mm(gmixed_b, weight.reshape({E, -1}).t());
    if (bias) grad_routing = grad_routing + at::mm(gbias_b, bias->t());
  }
  return {grad_x, grad_routing, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(condkernels, CPU, m) {
  m.impl("cond_conv2d", &cond_conv2d_cpu);
  m.impl("_cond_conv2d_backward", &cond_conv2d_backward_cpu);
}

}  // namespace condkernels
