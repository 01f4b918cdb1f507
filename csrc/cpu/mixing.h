// Mixing of expert tensors on the CPU: out[b, :] = sum_e routing[b, e] * w[e, :] over a run of
// columns of the flattened experts. A GEMM with a tiny inner dimension (E) and a huge N, which BLAS
// libraries run far below the bandwidth it needs; here each block of expert columns is read once
// from memory and reused from cache for every example, four examples per pass over the block.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/row_kernels.h"

namespace condkernels::mixing {

// Expert columns mixed per block: E * kColumnBlock elements are re-read from L1/L2 for each example.
constexpr int64_t kColumnBlock = 512;

// out (n_examples, n_cols) = routing (n_examples, experts) @ w (experts, n_cols with row stride ld).
template <typename A, typename T>
void mix_columns(const T* routing, const T* w, int64_t ld, int64_t experts, int64_t n_examples,
                 int64_t n_cols, T* out) {
  const int64_t n_blocks = (n_cols + kColumnBlock - 1) / kColumnBlock;
  std::vector<A> r(n_examples * experts);
  for (int64_t k = 0; k < n_examples * experts; ++k) r[k] = static_cast<A>(routing[k]);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(4 * kColumnBlock), rq(4);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kColumnBlock, nc = std::min(kColumnBlock, n_cols - c0);
      for (int64_t b0 = 0; b0 < n_examples; b0 += 4) {
        const int64_t nb = std::min<int64_t>(4, n_examples - b0);
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t e = 0; e < experts; ++e) {
          for (int64_t k = 0; k < 4; ++k) rq[k] = k < nb ? r[(b0 + k) * experts + e] : A(0);
          rows::axpy4(acc.data(), acc.data() + kColumnBlock, acc.data() + 2 * kColumnBlock,
                      acc.data() + 3 * kColumnBlock, w + e * ld + c0, rq.data(), nc);
        }
        for (int64_t k = 0; k < nb; ++k) {
          T* dst = out + (b0 + k) * n_cols + c0;
          const A* src = acc.data() + k * kColumnBlock;
          for (int64_t i = 0; i < nc; ++i) dst[i] = static_cast<T>(src[i]);
        }
      }
    }
  });
}

}  // namespace condkernels::mixing
