// Index arithmetic of the per-example channel lists and of the implicit GEMMs of gated_conv2d,
// shared by the host and the CUDA kernels.
//
// A channel list holds, for one example and one group, the group-local channel indices with the
// open channels first (ascending) and the closed ones after them (descending). Tiles cover list
// positions: positions below the open count are computed, the others are closed channels whose
// output is written as 0 without any work.
#pragma once

#include <cstdint>

#include "common/conv_geometry.h"
#include "common/macros.h"

namespace condkernels {

// Position in the list of channel `c` of a group of `per_group` channels, given the number of open
// channels before it. Open channels fill the list from the front in order, closed ones from the back.
CK_INLINE int64_t channel_list_slot(bool open, int64_t c, int64_t open_before, int64_t per_group) {
  return open ? open_before : per_group - 1 - (c - open_before);
}

// The output index that reads input index `in` through tap offset `tap_offset` (= k * dilation),
// i.e. the `o` with o * stride - pad_begin + tap_offset == in and 0 <= o < out_size; -1 if none.
CK_INLINE int64_t output_reading(int64_t in, int64_t tap_offset, int64_t stride, int64_t pad_begin,
                                 int64_t out_size) {
  const int64_t t = in + pad_begin - tap_offset;
  if (t < 0 || t % stride != 0) return -1;
  const int64_t o = t / stride;
  return o < out_size ? o : -1;
}

// A reduction index of the forward / weight-gradient GEMM, k = i * kh * kw + tap, split into the
// position i in the input-channel list and the kernel tap.
struct ReductionIndex {
  int64_t list_pos, kh, kw;
};

CK_INLINE ReductionIndex split_reduction_index(int64_t k, int64_t kernel_h, int64_t kernel_w) {
  const int64_t taps = kernel_h * kernel_w;
  const int64_t tap = k % taps;
  return {k / taps, tap / kernel_w, tap % kernel_w};
}

}  // namespace condkernels
