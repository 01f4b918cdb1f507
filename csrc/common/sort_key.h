// Unsigned sort keys whose integer order is the numeric order of the values, with -0 == +0 and NaN
// above +inf: NaN values end last (as in torch.sort) instead of breaking the sort. Shared by the
// batch-shaping CPU and CUDA kernels, whose sorts must agree.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/macros.h"

namespace condkernels {

CK_INLINE uint32_t order_key(float v) {
  if (v != v) return 0xFFFFFFFFu;
  if (v == 0.0f) v = 0.0f;
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

CK_INLINE uint64_t order_key(double v) {
  if (v != v) return ~uint64_t{0};
  if (v == 0.0) v = 0.0;
#if defined(__CUDA_ARCH__)
  const uint64_t u = static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
#endif
  return (u >> 63) ? ~u : (u | (uint64_t{1} << 63));
}

}  // namespace condkernels
