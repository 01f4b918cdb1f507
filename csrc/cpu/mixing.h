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

// acc[k * kColumnBlock + i] += sum_e r[(b0 + k) * experts + e] * w[e * ld + i], k < NB, i < n
// (n <= kColumnBlock when NB > 1), four experts per pass.
template <int NB, typename A, typename T>
void mix_into(const A* r, const T* w, int64_t ld, int64_t experts, int64_t b0, int64_t n, A* acc) {
  A r4[4 * NB];
  for (int64_t e0 = 0; e0 < experts; e0 += 4) {
    const T* wr[4];
    for (int64_t j = 0; j < 4; ++j) {  // past the last expert: any valid row, coefficient zero
      wr[j] = w + std::min(e0 + j, experts - 1) * ld;
      for (int64_t k = 0; k < NB; ++k) r4[4 * k + j] = e0 + j < experts ? r[(b0 + k) * experts + e0 + j] : A(0);
    }
    if constexpr (NB == 4)
      rows::mix4_rows4(acc, kColumnBlock, wr[0], wr[1], wr[2], wr[3], r4, n);
    else
      rows::mix4_rows1(acc, wr[0], wr[1], wr[2], wr[3], r4, n);
  }
}

// Mixes rows [b0, b0 + NB) of the output over columns [c0, c0 + nc).
template <int NB, typename A, typename T>
void mix_block(const A* r, const T* w, int64_t ld, int64_t experts, int64_t b0, int64_t c0, int64_t nc,
               int64_t n_cols, A* acc, T* out) {
  std::fill(acc, acc + NB * kColumnBlock, A(0));
  mix_into<NB>(r, w + c0, ld, experts, b0, nc, acc);
  for (int64_t k = 0; k < NB; ++k) {
    T* dst = out + (b0 + k) * n_cols + c0;
    const A* src = acc + k * kColumnBlock;
    for (int64_t i = 0; i < nc; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// out (n_examples, n_cols) = routing (n_examples, experts) @ w (experts, n_cols with row stride ld).
template <typename A, typename T>
void mix_columns(const T* routing, const T* w, int64_t ld, int64_t experts, int64_t n_examples,
                 int64_t n_cols, T* out) {
  const int64_t n_blocks = (n_cols + kColumnBlock - 1) / kColumnBlock;
  std::vector<A> r(n_examples * experts);
  for (int64_t k = 0; k < n_examples * experts; ++k) r[k] = static_cast<A>(routing[k]);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(4 * kColumnBlock);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kColumnBlock, nc = std::min(kColumnBlock, n_cols - c0);
      int64_t b = 0;
      for (; b + 4 <= n_examples; b += 4) mix_block<4>(r.data(), w, ld, experts, b, c0, nc, n_cols, acc.data(), out);
      for (; b < n_examples; ++b) mix_block<1>(r.data(), w, ld, experts, b, c0, nc, n_cols, acc.data(), out);
    }
  });
}

}  // namespace condkernels::mixing
