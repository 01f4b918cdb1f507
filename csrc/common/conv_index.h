// Index arithmetic of the implicit-GEMM and direct convolution kernels, written once for the host
// and the device so that it can be checked on a machine without a GPU
// (python_tests/cpp/check_conv_index.cpp exercises every function here).
#pragma once

#include <cstdint>

#include "common/conv_geometry.h"
#include "common/macros.h"

namespace condkernels {

CK_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element strides of a 4-D (N, C, H, W) tensor: one kernel serves NCHW, NHWC and any other layout.
struct Strides4 {
  int64_t n, c, h, w;
  CK_INLINE int64_t offset(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// Input pixel read by output pixel (oh, ow) through tap (kh, kw); false when it falls in the padding.
CK_INLINE bool forward_tap_source(const ConvGeometry& g, int64_t oh, int64_t ow, int64_t kh,
                                  int64_t kw, int64_t& ih, int64_t& iw) {
  ih = g.in_row(oh, kh);
  iw = g.in_col(ow, kw);
  return ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
}

// One dimension of the inverse map: the output index o with o * stride - pad + k * dilation == i,
// or -1 when no output reads input index i through tap k.
CK_INLINE int64_t transposed_source_1d(int64_t i, int64_t k, int64_t stride, int64_t pad_begin,
                                       int64_t dilation, int64_t out_size) {
  const int64_t t = i + pad_begin - k * dilation;
  if (t < 0 || t % stride != 0) return -1;
  const int64_t o = t / stride;
  return o < out_size ? o : -1;
}

// Output pixel that read input pixel (ih, iw) through tap (kh, kw) -- the gather of the transposed
// convolution (grad_x); false when there is none (padding side or a stride gap).
CK_INLINE bool transposed_tap_source(const ConvGeometry& g, int64_t ih, int64_t iw, int64_t kh,
                                     int64_t kw, int64_t& oh, int64_t& ow) {
  oh = transposed_source_1d(ih, kh, g.stride_h, g.pad_h_begin, g.dilation_h, g.out_h);
  if (oh < 0) return false;
  ow = transposed_source_1d(iw, kw, g.stride_w, g.pad_w_begin, g.dilation_w, g.out_w);
  return ow >= 0;
}

// A column of the implicit GEMM's reduction over (channel, kh, kw). Its order is free as long as
// both operands use the same one: channel-major (c, kh, kw) is the weight's own order and suits
// NCHW activations; tap-major (kh, kw, c) makes neighbouring columns neighbouring channels, which
// are adjacent in memory in NHWC activations.
struct FilterTap {
  int64_t channel, kh, kw;
};

CK_INLINE FilterTap filter_tap(int64_t column, int64_t channels, int64_t kernel_h, int64_t kernel_w,
                               bool tap_major) {
  const int64_t taps = kernel_h * kernel_w;
  int64_t channel, tap;
  if (tap_major) {
    tap = column / channels;
    channel = column - tap * channels;
  } else {
    channel = column / taps;
    tap = column - channel * taps;
  }
  return {channel, tap / kernel_w, tap - (tap / kernel_w) * kernel_w};
}

// Offset of a tap inside one output channel's (channels, kh, kw) block of a contiguous weight.
CK_INLINE int64_t filter_offset(const FilterTap& t, int64_t kernel_h, int64_t kernel_w) {
  return (t.channel * kernel_h + t.kh) * kernel_w + t.kw;
}

// Rows of a GEMM tile handled by the blocks of one launch: tiles of `tile` output channels inside
// each group, groups side by side. Splits a flat tile index into (group, first channel in group).
struct GroupTile {
  int64_t group, first;
};

CK_INLINE GroupTile group_tile(int64_t flat_tile, int64_t channels_per_group, int64_t tile) {
  const int64_t tiles_per_group = ceil_div(channels_per_group, tile);
  const int64_t group = flat_tile / tiles_per_group;
  return {group, (flat_tile - group * tiles_per_group) * tile};
}

}  // namespace condkernels
