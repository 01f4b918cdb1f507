// Argument checks shared by the convolution ops (cond_conv2d, gated_conv2d): every error names the
// op and the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include "common/conv_geometry.h"

namespace condkernels {

// `t` has x's dtype and device.
void check_like_x(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x);

// x is a 4-D floating-point (B, Cin, H, W); groups, stride, padding (h_begin, h_end, w_begin,
// w_end) and dilation are valid for a kernel of `in_channels_per_group` x kh x kw producing
// `out_channels`, and the dilated kernel fits the padded input. Returns the geometry.
ConvGeometry check_conv_geometry(const char* op, const at::Tensor& x, int64_t out_channels,
                                 int64_t in_channels_per_group, int64_t kernel_h, int64_t kernel_w,
                                 c10::IntArrayRef stride, c10::IntArrayRef padding,
                                 c10::IntArrayRef dilation, int64_t groups);

}  // namespace condkernels
