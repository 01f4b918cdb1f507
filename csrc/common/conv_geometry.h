// Convolution geometry shared by every conv op and backend.
//
// Padding is carried as four numbers (h_begin, h_end, w_begin, w_end) so TensorFlow's SAME padding,
// which puts the odd pixel at the end, is handled by the kernels themselves instead of by a padded
// copy of the input.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace condkernels {

struct ConvGeometry {
  int64_t batch, in_channels, out_channels, groups;
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h_begin, pad_h_end, pad_w_begin, pad_w_end;
  int64_t dilation_h, dilation_w;

  CK_INLINE int64_t in_channels_per_group() const { return in_channels / groups; }
  CK_INLINE int64_t out_channels_per_group() const { return out_channels / groups; }
  CK_INLINE bool is_pointwise() const {
    return kernel_h == 1 && kernel_w == 1 && stride_h == 1 && stride_w == 1 && pad_h_begin == 0 &&
           pad_h_end == 0 && pad_w_begin == 0 && pad_w_end == 0;
  }
  CK_INLINE bool is_depthwise() const {
    return groups == in_channels && out_channels == in_channels;
  }
  // Input row/column read by output position `o` and kernel tap `k`; may fall in the padding.
  CK_INLINE int64_t in_row(int64_t oh, int64_t kh) const {
    return oh * stride_h - pad_h_begin + kh * dilation_h;
  }
  CK_INLINE int64_t in_col(int64_t ow, int64_t kw) const {
    return ow * stride_w - pad_w_begin + kw * dilation_w;
  }
};

// Output extent of one spatial dimension; <= 0 when the dilated kernel is larger than the padded input.
CK_INLINE int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad_begin,
                                int64_t pad_end, int64_t dilation) {
  const int64_t span = dilation * (kernel - 1) + 1;
  const int64_t padded = in + pad_begin + pad_end;
  return padded < span ? 0 : (padded - span) / stride + 1;
}

}  // namespace condkernels

namespace condkernels {

// Output positions [lo, hi) of one spatial dimension whose input index o * stride - pad_begin +
// tap_offset (tap_offset = k * dilation) falls inside [0, in); empty when lo >= hi.
CK_INLINE void conv_valid_out_range(int64_t in, int64_t out, int64_t stride, int64_t pad_begin,
                                    int64_t tap_offset, int64_t* lo, int64_t* hi) {
  const int64_t first = pad_begin - tap_offset;        // smallest o * stride that lands inside
  const int64_t last = in - 1 + pad_begin - tap_offset;  // largest o * stride that lands inside
  *lo = first <= 0 ? 0 : (first + stride - 1) / stride;
  *hi = last < 0 ? 0 : last / stride + 1;
  if (*hi > out) *hi = out;
  if (*lo > *hi) *lo = *hi;
}

}  // namespace condkernels
