// Mixing of expert tensors on the CPU: out[b, :] = sum_e routing[b, e] * w[e, :] over a run of
// columns of the flattened experts. A GEMM with a tiny inner dimension (E) and a huge N, which BLAS
// libraries run far below the bandwidth it needs; here each block of expert columns is read once
// from memory and reused from cache for every example, four experts and four examples per pass
// over a block.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/row_kernels.h"

namespace condkernels::mixing {

// Expert columns mixed per block: long enough runs per expert row for the hardware prefetcher, and
// E * kColumnBlock elements that stay in L2 while every example re-reads them.
constexpr int64_t kColumnBlock = 2048;

// out (n_examples, n_cols) = routing (n_examples, experts) @ w (experts, n_cols with row stride ld).
template <typename A, typename T>
void mix_columns(const T* routing, const T* w, int64_t ld, int64_t experts, int64_t n_examples,
                 int64_t n_cols, T* out) {
  const int64_t n_blocks = (n_cols + kColumnBlock - 1) / kColumnBlock;
  std::vector<A> r(n_examples * experts);
  for (int64_t k = 0; k < n_examples * experts; ++k) r[k] = static_cast<A>(routing[k]);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(4 * kColumnBlock), r4(16);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kColumnBlock, nc = std::min(kColumnBlock, n_cols - c0);
      for (int64_t b0 = 0; b0 < n_examples; b0 += 4) {
        const int64_t nb = std::min<int64_t>(4, n_examples - b0);
        std::fill(acc.begin(), acc.begin() + (nb == 4 ? 4 : 1) * kColumnBlock, A(0));
        for (int64_t k = 0; k < (nb == 4 ? 1 : nb); ++k) {  // below 4 examples: one row per pass
          A* acc_k = acc.data() + k * kColumnBlock;
          if (nb < 4) std::fill(acc_k, acc_k + nc, A(0));
          for (int64_t e0 = 0; e0 < experts; e0 += 4) {
            const T* wr[4];
            for (int64_t j = 0; j < 4; ++j) {  // missing experts: any valid row with a zero coefficient
              const int64_t e = std::min(e0 + j, experts - 1);
              wr[j] = w + e * ld + c0;
              for (int64_t q = 0; q < (nb == 4 ? 4 : 1); ++q)
                r4[4 * q + j] = e0 + j < experts ? r[(b0 + (nb == 4 ? q : k)) * experts + e0 + j] : A(0);
            }
            if (nb == 4)
              rows::mix4_rows4(acc.data(), kColumnBlock, wr[0], wr[1], wr[2], wr[3], r4.data(), nc);
            else
              rows::mix4_rows1(acc_k, wr[0], wr[1], wr[2], wr[3], r4.data(), nc);
          }
          const int64_t rows_done = nb == 4 ? 4 : 1;
          for (int64_t q = 0; q < rows_done; ++q) {
            T* dst = out + (b0 + (nb == 4 ? q : k)) * n_cols + c0;
            const A* src = acc.data() + (nb == 4 ? q : k) * kColumnBlock;
            for (int64_t i = 0; i < nc; ++i) dst[i] = static_cast<T>(src[i]);
          }
        }
      }
    }
  });
}

}  // namespace condkernels::mixing
