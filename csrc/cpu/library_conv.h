// Arguments for handing a ConvGeometry to ATen's own convolution (oneDNN on the CPU), which takes
// one symmetric padding per dimension: TensorFlow-style 'same' padding with an odd total is applied
// to the input first.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/conv_geometry.h"

namespace condkernels {
namespace cpu {

inline bool has_symmetric_padding(const ConvGeometry& g) {
  return g.pad_h_begin == g.pad_h_end && g.pad_w_begin == g.pad_w_end;
}

// x with the geometry's padding applied when it is asymmetric, else x itself.
inline at::Tensor pad_if_asymmetric(const at::Tensor& x, const ConvGeometry& g) {
  if (has_symmetric_padding(g)) return x;
  return at::constant_pad_nd(x, {g.pad_w_begin, g.pad_w_end, g.pad_h_begin, g.pad_h_end}, 0);
}

// The padding to pass along with pad_if_asymmetric(x, g).
inline std::vector<int64_t> symmetric_padding(const ConvGeometry& g) {
  return has_symmetric_padding(g) ? std::vector<int64_t>{g.pad_h_begin, g.pad_w_begin}
                                  : std::vector<int64_t>{0, 0};
}

}  // namespace cpu
}  // namespace condkernels
