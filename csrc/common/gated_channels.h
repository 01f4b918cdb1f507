// Per-example channel gating arithmetic shared by the CPU and CUDA kernels of gated_conv2d.
#pragma once

#include <cstdint>

#include "common/conv_geometry.h"
#include "common/macros.h"

namespace condkernels {

// A channel is skipped only where its gate is exactly zero (either sign). NaN and negative gates
// are ordinary values: the channel is computed and multiplied by them.
// Half types compare through float, which holds every one of their values exactly; a double gate
// is compared as it is (a tiny one such as 1e-300 would round to 0 in float and be skipped).
template <typename T>
CK_INLINE bool gate_is_open(T gate) {
  return !(static_cast<float>(gate) == 0.0f);
}
CK_INLINE bool gate_is_open(double gate) { return !(gate == 0.0); }

CK_INLINE int64_t ceil_div_signed(int64_t a, int64_t b) {  // b > 0, a of either sign
  return a >= 0 ? (a + b - 1) / b : -((-a) / b);
}

// The output columns [begin, end) whose input column for kernel tap `kw` lies inside the image
// (the others read padding). Same for rows with the h-geometry.
struct TapRange {
  int64_t begin, end;
};

CK_INLINE TapRange valid_out_range(int64_t in_size, int64_t out_size, int64_t stride,
                                   int64_t pad_begin, int64_t tap_offset /* k * dilation */) {
  int64_t lo = ceil_div_signed(pad_begin - tap_offset, stride);
  int64_t hi = ceil_div_signed(in_size + pad_begin - tap_offset, stride);
  lo = lo < 0 ? 0 : (lo > out_size ? out_size : lo);
  hi = hi < lo ? lo : (hi > out_size ? out_size : hi);
  return {lo, hi};
}

}  // namespace condkernels
