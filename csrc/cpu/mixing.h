// Mixing of expert tensors on the CPU: out[b, :] = sum_e routing[b, e] * w[e, :] over a run of
// columns of the flattened experts (and, in the backward, the same with routing transposed, and the
// matching dot products). A GEMM with a tiny inner dimension (E) and a huge N, which BLAS
// libraries run far below the bandwidth it needs; here each block of expert columns is read once
// from memory and reused from cache for every example: in float32 on AVX-512 and AVX2 CPUs by a
// register-blocked kernel (cpu/mixing_kernel.h), otherwise four experts and four examples per pass
// over a block.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CONDKERNELS_STREAMING_STORES 1
#endif

#include "cpu/cpu_features.h"
#include "cpu/row_kernels.h"
#include "cpu/scratch_pool.h"

namespace condkernels::mixing {

// How mixed rows reach their output: stored (kept in cache for the GEMM that reads them next),
// added to it, or streamed past the caches. Streaming suits an output written once and not read
// again soon, the expert gradients (E x the tile): a cached store first reads each line from memory.
enum class Write { kStore, kAdd, kStream };

// dst[i] = src[i], i < n, with non-temporal stores where there are (float on x86-64).
template <typename A, typename T>
void stream_row(T* dst, const A* src, int64_t n) {
  int64_t i = 0;
#ifdef CONDKERNELS_STREAMING_STORES
  if constexpr (std::is_same_v<A, float> && std::is_same_v<T, float>) {
    for (; i < n && reinterpret_cast<uintptr_t>(dst + i) % 16 != 0; ++i) dst[i] = src[i];
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// Makes a thread's streamed stores visible before it reports its work done.
inline void finish_streaming() {
#ifdef CONDKERNELS_STREAMING_STORES
  _mm_sfence();
#endif
}

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
               int64_t out_ld, Write write, A* acc, T* out) {
  std::fill(acc, acc + NB * kColumnBlock, A(0));
  mix_into<NB>(r, w + c0, ld, experts, b0, nc, acc);
  for (int64_t k = 0; k < NB; ++k) {
    T* dst = out + (b0 + k) * out_ld + c0;
    const A* src = acc + k * kColumnBlock;
    if (write == Write::kAdd) {
      for (int64_t i = 0; i < nc; ++i) dst[i] = static_cast<T>(static_cast<A>(dst[i]) + src[i]);
    } else if (write == Write::kStream) {
      stream_row(dst, src, nc);
    } else {
      for (int64_t i = 0; i < nc; ++i) dst[i] = static_cast<T>(src[i]);
    }
  }
}

// The float32 kernel of a block (cpu/mixing_kernel.h), compiled once per instruction set:
// out[b * out_ld + c] (=|+=) sum_e r[b * experts + e] * w[e * ld + c] for b < n_out, c < nc <=
// kColumnBlock, with `packed` (64-byte aligned, experts * kColumnBlock floats) for the packed experts.
using MixBlockF32 = void (*)(const float* r, int64_t n_out, const float* w, int64_t ld, int64_t experts,
                             int64_t nc, float* out, int64_t out_ld, Write write, float* packed);
void mix_block_f32_avx512(const float* r, int64_t n_out, const float* w, int64_t ld, int64_t experts,
                          int64_t nc, float* out, int64_t out_ld, Write write, float* packed);
void mix_block_f32_avx2(const float* r, int64_t n_out, const float* w, int64_t ld, int64_t experts,
                        int64_t nc, float* out, int64_t out_ld, Write write, float* packed);

// The float32 kernel of dot_block (cpu/mixing_kernel.h), one per instruction set:
// part[b * experts + e] = <a[b * a_ld + c], w[e * ld + c]> over c < nc.
using DotRowsF32 = void (*)(const float* a, int64_t a_ld, int64_t n_rows, const float* w, int64_t ld,
                            int64_t experts, int64_t nc, float* part);
void dot_rows_f32_avx512(const float* a, int64_t a_ld, int64_t n_rows, const float* w, int64_t ld,
                         int64_t experts, int64_t nc, float* part);
void dot_rows_f32_avx2(const float* a, int64_t a_ld, int64_t n_rows, const float* w, int64_t ld,
                       int64_t experts, int64_t nc, float* part);

// Of a kernel's builds, the one for the CPU's instruction set (cpu::vector_isa()), or null.
template <typename Kernel>
Kernel for_vector_isa(Kernel avx512, Kernel avx2) {
  switch (cpu::vector_isa()) {
    case cpu::VectorIsa::kAvx512: return avx512;
    case cpu::VectorIsa::kAvx2: return avx2;
    default: return nullptr;
  }
}

// The vector dot kernel where it runs (float32, an AVX-512 or AVX2 CPU, two or more rows: one
// row's dots are bound by reading the experts), else null.
template <typename A, typename T>
DotRowsF32 vector_dot_kernel(int64_t n_rows) {
  if constexpr (std::is_same_v<A, float> && std::is_same_v<T, float>) {
    if (n_rows >= 2) return for_vector_isa<DotRowsF32>(dot_rows_f32_avx512, dot_rows_f32_avx2);
  }
  return nullptr;
}

// The scratch-pool slot of the vector kernel's packed experts (E x kColumnBlock floats, up to MBs
// when the examples are the inner dimension): the mixing runs inside cond_conv2d's calls, whose
// slots are 0-8, and gated_conv2d takes 9.
constexpr int kPackedExpertsSlot = 10;

// Mixes blocks of columns for n_out output rows with one thread's buffers: the vector kernel where
// it runs (float32, an AVX-512 or AVX2 CPU, two or more output rows: a single row is bound by
// reading the experts, and packing them would only add a pass), else the generic loop.
template <typename A, typename T>
class BlockMixer {
 public:
  BlockMixer(const A* r, const T* w, int64_t ld, int64_t experts, int64_t n_out)
      : r_(r), w_(w), ld_(ld), experts_(experts), n_out_(n_out), kernel_(vector_kernel(n_out)) {
    if (kernel_)
      packed_ = static_cast<float*>(cpu::ScratchPool::of_this_thread().get(
          kPackedExpertsSlot, static_cast<size_t>(experts * kColumnBlock) * sizeof(float)));
    else
      acc_.resize(4 * kColumnBlock);
  }

  // out rows [0, n_out) over columns [c0, c0 + nc).
  void mix(int64_t c0, int64_t nc, T* out, int64_t out_ld, Write write) {
    if constexpr (std::is_same_v<A, float> && std::is_same_v<T, float>) {
      if (kernel_) return kernel_(r_, n_out_, w_ + c0, ld_, experts_, nc, out + c0, out_ld, write, packed_);
    }
    int64_t b = 0;
    for (; b + 4 <= n_out_; b += 4) mix_block<4>(r_, w_, ld_, experts_, b, c0, nc, out_ld, write, acc_.data(), out);
    for (; b < n_out_; ++b) mix_block<1>(r_, w_, ld_, experts_, b, c0, nc, out_ld, write, acc_.data(), out);
  }

 private:
  static MixBlockF32 vector_kernel(int64_t n_out) {
    if constexpr (std::is_same_v<A, float> && std::is_same_v<T, float>) {
      if (n_out >= 2) return for_vector_isa<MixBlockF32>(mix_block_f32_avx512, mix_block_f32_avx2);
    }
    return nullptr;
  }

  const A* r_;
  const T* w_;
  int64_t ld_, experts_, n_out_;
  MixBlockF32 kernel_;
  std::vector<A> acc_;
  float* packed_ = nullptr;  // the thread's pool: valid until it next asks for the slot
};

// Coefficients coef(b, e) = coefs[b * cs0 + e * cs1] (so a transposed routing is a stride swap) of
// n_out rows, dense and in the accumulation type.
template <typename A, typename T>
std::vector<A> dense_coefficients(const T* coefs, int64_t cs0, int64_t cs1, int64_t n_out, int64_t experts) {
  std::vector<A> r(n_out * experts);
  for (int64_t b = 0; b < n_out; ++b)
    for (int64_t e = 0; e < experts; ++e) r[b * experts + e] = static_cast<A>(coefs[b * cs0 + e * cs1]);
  return r;
}

// part[b * experts + e] = <a[b, c0 : c0 + nc], w[e, c0 : c0 + nc]>: by `kernel` where given (see
// vector_dot_kernel), else four rows of `a` and two experts per pass.
template <typename A, typename T>
void dot_block(const T* a, int64_t a_ld, int64_t n_rows, const T* w, int64_t ld, int64_t experts, int64_t c0,
               int64_t nc, A* part, DotRowsF32 kernel = nullptr) {
  if constexpr (std::is_same_v<A, float> && std::is_same_v<T, float>) {
    if (kernel) return kernel(a + c0, a_ld, n_rows, w + c0, ld, experts, nc, part);
  }
  A dots[8];
  int64_t b = 0;
  for (; b + 4 <= n_rows; b += 4) {
    int64_t e = 0;
    for (; e + 2 <= experts; e += 2) {
      rows::dot_rows4x2(dots, a + b * a_ld + c0, a_ld, w + e * ld + c0, ld, nc);
      for (int64_t k = 0; k < 4; ++k)
        for (int64_t j = 0; j < 2; ++j) part[(b + k) * experts + e + j] = dots[2 * k + j];
    }
    for (; e < experts; ++e)
      for (int64_t k = 0; k < 4; ++k)
        part[(b + k) * experts + e] = rows::dot_strided(a + (b + k) * a_ld + c0, w + e * ld + c0, nc, int64_t{1});
  }
  for (; b < n_rows; ++b)
    for (int64_t e = 0; e < experts; ++e)
      part[b * experts + e] = rows::dot_strided(a + b * a_ld + c0, w + e * ld + c0, nc, int64_t{1});
}

// out[k] (=|+=) the sum over blocks of partial[blk * n + k], in block order (the result does not
// depend on how the blocks were shared among threads).
template <typename A, typename T>
void sum_blocks(const std::vector<A>& partial, int64_t n_blocks, int64_t n, T* out, bool accumulate) {
  for (int64_t k = 0; k < n; ++k) {
    A s = accumulate ? static_cast<A>(out[k]) : A(0);
    for (int64_t blk = 0; blk < n_blocks; ++blk) s += partial[blk * n + k];
    out[k] = static_cast<T>(s);
  }
}

inline int64_t column_blocks(int64_t n_cols) { return (n_cols + kColumnBlock - 1) / kColumnBlock; }

// out[b, :n_cols] (=|+=) sum_e coef(b, e) * w[e, :n_cols] (coef as in dense_coefficients), w rows
// `ld` apart and out rows `out_ld` apart.
template <typename A, typename T>
void mix_columns(const T* coefs, int64_t cs0, int64_t cs1, const T* w, int64_t ld, int64_t experts,
                 int64_t n_out, int64_t n_cols, T* out, int64_t out_ld, Write write) {
  const std::vector<A> r = dense_coefficients<A>(coefs, cs0, cs1, n_out, experts);
  at::parallel_for(0, column_blocks(n_cols), 1, [&](int64_t begin, int64_t end) {
    BlockMixer<A, T> mixer(r.data(), w, ld, experts, n_out);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kColumnBlock, nc = std::min(kColumnBlock, n_cols - c0);
      mixer.mix(c0, nc, out, out_ld, write);
    }
    if (write == Write::kStream) finish_streaming();
  });
}

// out[b, e] (=|+=) <a[b, :n_cols], w[e, :n_cols]> for b < n_rows, e < experts (rows `a_ld` and `ld`
// apart, out dense (n_rows, experts)): the routing gradient of a tile.
template <typename A, typename T>
void dot_columns(const T* a, int64_t a_ld, int64_t n_rows, const T* w, int64_t ld, int64_t experts,
                 int64_t n_cols, T* out, bool accumulate) {
  const int64_t n_blocks = column_blocks(n_cols);
  std::vector<A> partial(n_blocks * n_rows * experts);
  const DotRowsF32 kernel = vector_dot_kernel<A, T>(n_rows);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kColumnBlock, nc = std::min(kColumnBlock, n_cols - c0);
      dot_block(a, a_ld, n_rows, w, ld, experts, c0, nc, partial.data() + blk * n_rows * experts, kernel);
    }
  });
  sum_blocks(partial, n_blocks, n_rows * experts, out, accumulate);
}

// Both of the above over the same expert columns, as a tile of the backward needs them: the mixed
// weights mixed[b, :] = sum_e coef(b, e) w[e, :] (for the column gradients) and the routing
// gradient dots[b, e] (=|+=) <a[b, :], w[e, :]>, for the same n_rows examples. Each block of expert
// columns is read from memory once and from cache the second time, where the two calls read E x
// the tile from memory twice (at small batch the largest traffic of the backward).
template <typename A, typename T>
void mix_and_dot_columns(const T* coefs, int64_t cs0, int64_t cs1, const T* w, int64_t ld, int64_t experts,
                         int64_t n_rows, int64_t n_cols, T* mixed, int64_t mixed_ld, const T* a, int64_t a_ld,
                         T* dots, bool accumulate_dots) {
  const std::vector<A> r = dense_coefficients<A>(coefs, cs0, cs1, n_rows, experts);
  const int64_t n_blocks = column_blocks(n_cols);
  std::vector<A> partial(n_blocks * n_rows * experts);
  const DotRowsF32 kernel = vector_dot_kernel<A, T>(n_rows);
  at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
    BlockMixer<A, T> mixer(r.data(), w, ld, experts, n_rows);
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kColumnBlock, nc = std::min(kColumnBlock, n_cols - c0);
      mixer.mix(c0, nc, mixed, mixed_ld, Write::kStore);
      dot_block(a, a_ld, n_rows, w, ld, experts, c0, nc, partial.data() + blk * n_rows * experts, kernel);
    }
  });
  sum_blocks(partial, n_blocks, n_rows * experts, dots, accumulate_dots);
}

}  // namespace condkernels::mixing
