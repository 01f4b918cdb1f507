// CPU kernel of batch_shaping_loss.
//
// Gates arrive as (N, G) (dims 1.. flattened). Each task owns a run of gate columns and, per
// column, does everything in cache: gather the N values, sort them with their batch rows (radix,
// or a bitonic network for short float columns on AVX-512 CPUs), evaluate the prior's CDF and
// density on the sorted values, and write the loss of the column and the gradient of every sorted
// position at its value's batch row. The backward (a multiply by the incoming gradient) needs no
// kernel. With few columns and a large batch the work is split inside each column instead.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/beta_cdf_math.h"
#include "common/sort_key.h"
#include "cpu/beta_cdf_block.h"
#include "cpu/parallel.h"
#include "cpu/small_sort.h"
#include "ops/batch_shaping_loss.h"

namespace condkernels {
namespace {

using beta_math::Prior;

constexpr int64_t kChunk = 256;             // sorted positions evaluated per inner call
constexpr int64_t kLargeBatch = 1 << 15;    // from here one column is worth splitting
constexpr int64_t kTile = 64;               // columns gathered together (a few cache lines per row)

// A 256-bucket histogram turned, in place, into each bucket's first position; returns it.
inline int64_t* bucket_starts(int64_t* count) {
  int64_t sum = 0;
  for (int d = 0; d < 256; ++d) {
    const int64_t v = count[d];
    count[d] = sum;
    sum += v;
  }
  return count;
}

// Stable LSD radix sort of (key, row) pairs by key, one byte per pass, of K columns of n pairs at
// once: the histogram and scatter loops of a single short column are chains of increments of the
// same few counters (gate values share their top bytes), and interleaving independent columns lets
// those chains overlap. The histograms of every byte come from one read of the keys; passes whose
// byte is the same for every key of every column are skipped. Stability keeps ties in batch order.
// On return keys[c] / rows[c] point at the sorted data (the input buffers or the scratch ones).
template <int K, typename Key>
void radix_sort_columns(int64_t n, Key** keys, int32_t** rows, Key** key_tmp, int32_t** row_tmp,
                        std::vector<int64_t>& count_buf) {
  constexpr int kBytes = static_cast<int>(sizeof(Key));
  if (n <= 1) return;
  count_buf.assign(static_cast<size_t>(K) * kBytes * 256, 0);
  int64_t* count = count_buf.data();
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < K; ++c) {
      const Key k = keys[c][i];
      for (int byte = 0; byte < kBytes; ++byte) ++count[(c * kBytes + byte) * 256 + ((k >> (8 * byte)) & 0xFF)];
    }
  }
  for (int byte = 0; byte < kBytes; ++byte) {
    const int shift = 8 * byte;
    bool constant = true;
    for (int c = 0; c < K; ++c) constant &= count[(c * kBytes + byte) * 256 + ((keys[c][0] >> shift) & 0xFF)] == n;
    if (constant) continue;
    int64_t* cnt[K];
    for (int c = 0; c < K; ++c) cnt[c] = bucket_starts(count + (c * kBytes + byte) * 256);
    for (int64_t i = 0; i < n; ++i) {
      for (int c = 0; c < K; ++c) {
        const Key k = keys[c][i];
        const int64_t to = cnt[c][(k >> shift) & 0xFF]++;
        key_tmp[c][to] = k;
        row_tmp[c][to] = rows[c][i];
      }
    }
    for (int c = 0; c < K; ++c) {
      std::swap(keys[c], key_tmp[c]);
      std::swap(rows[c], row_tmp[c]);
    }
  }
}

// The same for 32-bit keys, packed with their rows as (key << 32 | row): a pass moves one word per
// value instead of two. Columns of up to kMaxSmallSort values go through the bitonic network of
// cpu/small_sort.h instead where the CPU has it: the items are distinct (their rows differ), so any
// ascending sort of them is this one.
template <int K>
void radix_sort_packed(int64_t n, uint64_t** items, uint64_t** item_tmp, std::vector<int64_t>& count_buf) {
  if (n <= 1) return;
  if (n <= cpu::kMaxSmallSort) {
    if (const cpu::SmallSort small_sort = cpu::small_sort_kernel()) {  // the same order, by a network
      for (int c = 0; c < K; ++c) small_sort(items[c], n);
      return;
    }
  }
  count_buf.assign(static_cast<size_t>(K) * 4 * 256, 0);
  int64_t* count = count_buf.data();
  for (int64_t i = 0; i < n; ++i) {
    for (int c = 0; c < K; ++c) {
      const uint32_t k = static_cast<uint32_t>(items[c][i] >> 32);
      int64_t* cc = count + c * 4 * 256;
      ++cc[k & 0xFF];
      ++cc[256 + ((k >> 8) & 0xFF)];
      ++cc[512 + ((k >> 16) & 0xFF)];
      ++cc[768 + (k >> 24)];
    }
  }
  for (int byte = 0; byte < 4; ++byte) {
    const int shift = 32 + 8 * byte;
    bool constant = true;
    for (int c = 0; c < K; ++c) constant &= count[(c * 4 + byte) * 256 + ((items[c][0] >> shift) & 0xFF)] == n;
    if (constant) continue;
    int64_t* cnt[K];
    for (int c = 0; c < K; ++c) cnt[c] = bucket_starts(count + (c * 4 + byte) * 256);
    for (int64_t i = 0; i < n; ++i) {
      for (int c = 0; c < K; ++c) {
        const uint64_t item = items[c][i];
        item_tmp[c][cnt[c][(item >> shift) & 0xFF]++] = item;
      }
    }
    for (int c = 0; c < K; ++c) std::swap(items[c], item_tmp[c]);
  }
}

// Inverse of order_key (NaN keys give a NaN, -0 gives +0).
inline float key_value(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k;
  float v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}
inline double key_value(uint64_t k) {
  const uint64_t u = (k >> 63) ? (k & ~(uint64_t{1} << 63)) : ~k;
  double v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// Sorts columns ascending; ties keep batch order (the order of a stable sort), so every backend
// and the reference agree on which tied value gets which target. Values are sorted as their order
// keys (floats for every dtype but double, which is exact for half and bfloat16) and read back
// from the sorted keys, so no value is gathered through the permutation.
template <typename scalar_t>
struct ColumnSorter {
  static constexpr bool kPacked = sizeof(scalar_t) <= 4;  // 32-bit keys: packed with the rows
  using Key = std::conditional_t<kPacked, uint32_t, uint64_t>;
  using Item = std::conditional_t<kPacked, uint64_t, Key>;
  static constexpr int kGroup = 4;  // columns sorted together
  std::vector<Item> item_buf, item_tmp_buf;
  std::vector<int32_t> row_buf, row_tmp_buf;  // unpacked keys only
  std::vector<int64_t> count_buf;
  const Item* sorted_items[kTile];
  const int32_t* sorted_rows[kTile];

  static Key key_of(scalar_t v) {
    if constexpr (kPacked) {
      return order_key(static_cast<float>(v));
    } else {
      return order_key(static_cast<double>(v));
    }
  }

  // Sorts the `width` (<= kTile) columns of the (n, width) block x whose rows are `ld` apart.
  void sort(const scalar_t* x, int64_t n, int64_t width, int64_t ld) {
    item_buf.resize(n * width);
    item_tmp_buf.resize(n * width);
    if constexpr (kPacked) {
      // Eight rows at a time: each column's eight items fill one cache line of its run, where a
      // row at a time wrote one item into each of `width` lines.
      auto put = [&](int64_t i, int64_t c) {
        item_buf[c * n + i] = (uint64_t{key_of(x[i * ld + c])} << 32) | static_cast<uint32_t>(i);
      };
      constexpr int64_t kRows = 8;
      int64_t i0 = 0;
      for (; i0 + kRows <= n; i0 += kRows)
        for (int64_t c = 0; c < width; ++c)
          for (int64_t r = 0; r < kRows; ++r) put(i0 + r, c);
      for (int64_t i = i0; i < n; ++i)
        for (int64_t c = 0; c < width; ++c) put(i, c);
    } else {
      row_buf.resize(n * width);
      row_tmp_buf.resize(n * width);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t c = 0; c < width; ++c) item_buf[c * n + i] = key_of(x[i * ld + c]);
      for (int64_t c = 0; c < width; ++c)
        for (int64_t i = 0; i < n; ++i) row_buf[c * n + i] = static_cast<int32_t>(i);
    }
    int64_t c0 = 0;
    for (; c0 + kGroup <= width; c0 += kGroup) sort_group<kGroup>(c0, n);
    for (; c0 < width; ++c0) sort_group<1>(c0, n);
  }

  // Column c's values ascending into sorted[0..n), their batch rows into order[0..n).
  void column(int64_t c, int64_t n, double* sorted, int32_t* order) const {
    const Item* items = sorted_items[c];
    if constexpr (kPacked) {
      for (int64_t i = 0; i < n; ++i) {
        sorted[i] = static_cast<double>(key_value(static_cast<uint32_t>(items[i] >> 32)));
        order[i] = static_cast<int32_t>(static_cast<uint32_t>(items[i]));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) sorted[i] = key_value(items[i]);
      std::copy_n(sorted_rows[c], n, order);
    }
  }

 private:
  template <int K>
  void sort_group(int64_t c0, int64_t n) {
    Item *items[K], *item_tmp[K];
    for (int c = 0; c < K; ++c) {
      items[c] = item_buf.data() + (c0 + c) * n;
      item_tmp[c] = item_tmp_buf.data() + (c0 + c) * n;
    }
    if constexpr (kPacked) {
      radix_sort_packed<K>(n, items, item_tmp, count_buf);
    } else {
      int32_t *rows[K], *row_tmp[K];
      for (int c = 0; c < K; ++c) {
        rows[c] = row_buf.data() + (c0 + c) * n;
        row_tmp[c] = row_tmp_buf.data() + (c0 + c) * n;
      }
      radix_sort_columns<K>(n, items, rows, item_tmp, row_tmp, count_buf);
      for (int c = 0; c < K; ++c) sorted_rows[c0 + c] = rows[c];
    }
    for (int c = 0; c < K; ++c) sorted_items[c0 + c] = items[c];
  }
};

// Evaluates sorted positions [begin, end) of one column (`sorted` holds the column's values in
// sorted order, `order` their batch rows): writes their gradient (times the reduction's scale) at
// their batch rows, grad_out[order[i] * stride], and returns their unscaled sum of squared
// residuals. `table`, when given, replaces the beta prior's continued fraction.
template <typename scalar_t>
double evaluate_sorted(const BatchShapingArgs& args, const cpu::BetaCfTable* table,
                       const double* sorted, const int32_t* order, int64_t begin, int64_t end,
                       scalar_t* grad_out, int64_t stride) {
  const int64_t n = args.batch;
  const double scale = args.scale(), inv_np1 = 1.0 / static_cast<double>(n + 1);
  const double tol = beta_math::cf_tolerance<scalar_t>();
  double xs[kChunk], cdf[kChunk], pdf[kChunk];
  double loss = 0.0;
  for (int64_t i0 = begin; i0 < end; i0 += kChunk) {
    const int64_t len = std::min(kChunk, end - i0);
    for (int64_t k = 0; k < len; ++k) {
      const double v = sorted[i0 + k];
      xs[k] = args.clamps() ? beta_math::clamp_unit(v, args.eps) : v;
    }
    switch (args.prior) {
      case Prior::kBeta:
        if (table) {
          cpu::beta_cdf_pdf_many(xs, len, *table, cdf, pdf);
        } else {
          cpu::beta_cdf_pdf_many(xs, len, args.prior_a, args.prior_b, tol, cdf, pdf);
        }
        break;
      case Prior::kGaussian:
        for (int64_t k = 0; k < len; ++k) {
          const auto f = beta_math::gaussian_cdf_pdf(xs[k], args.prior_a, args.prior_b);
          cdf[k] = f.cdf;
          pdf[k] = f.pdf;
        }
        break;
      case Prior::kUniform:
        for (int64_t k = 0; k < len; ++k) {
          const auto f = beta_math::uniform_cdf_pdf(xs[k], args.prior_a, args.prior_b);
          cdf[k] = f.cdf;
          pdf[k] = f.pdf;
        }
        break;
    }
    for (int64_t k = 0; k < len; ++k) {
      const int64_t i = i0 + k;
      const auto term = beta_math::loss_term(static_cast<double>(i + 1) * inv_np1, {cdf[k], pdf[k]},
                                             args.pdf_lo, args.pdf_hi);
      loss += term.loss;
      grad_out[order[i] * stride] = static_cast<scalar_t>(scale * term.grad);
    }
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor> batch_shaping_loss_cpu(
    const at::Tensor& gates_in, c10::string_view prior, double prior_a, double prior_b,
    c10::string_view reduction, double pdf_lo, double pdf_hi, double eps) {
  const BatchShapingArgs args = check_batch_shaping_loss_args(gates_in, prior, prior_a, prior_b,
                                                              reduction, pdf_lo, pdf_hi, eps);
  const auto gates = gates_in.contiguous();
  auto grad_gates = at::empty_like(gates, at::MemoryFormat::Contiguous);
  const int64_t n = args.batch, g = args.gates;
  std::vector<double> column_loss(g, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "batch_shaping_loss_cpu", [&] {
    const scalar_t* x = gates.const_data_ptr<scalar_t>();
    scalar_t* grad = grad_gates.mutable_data_ptr<scalar_t>();
    const bool split_columns = n >= kLargeBatch && g < 2 * at::get_num_threads();
    // Many values: the beta prior's continued fraction through a per-(a, b) table.
    const auto table = args.prior == Prior::kBeta && n * g >= cpu::kTableMinValues
                           ? cpu::beta_cf_table(args.prior_a, args.prior_b, cpu::table_accuracy<scalar_t>())
                           : nullptr;
    if (!split_columns) {
      // Tiles of kTile neighbouring columns per step: rows of the tile are read and written as
      // contiguous runs. (Walking one column alone strides by G elements, and a power-of-two G
      // puts every access in the same cache set.) The gradients are scattered to their batch rows
      // within the tile's own buffer, in cache, and copied out row by row.
      // The tiles are claimed by the threads as they go (cpu/parallel.h), in runs of a few when the
      // batch is short, each thread with its own buffers.
      const int64_t tiles = (g + kTile - 1) / kTile;
      const int64_t grain = std::max<int64_t>(1, 4096 / (n * kTile));
      struct Buffers {
        std::vector<double> sorted;
        std::vector<int32_t> order;
        std::vector<scalar_t> tile_grad;
        ColumnSorter<scalar_t> sorter;
      };
      cpu::for_each_claimed(
          (tiles + grain - 1) / grain,
          [&] {
            return Buffers{std::vector<double>(n), std::vector<int32_t>(n), std::vector<scalar_t>(n * kTile), {}};
          },
          [&](Buffers& buf, int64_t run) {
            for (int64_t t = run * grain; t < std::min(tiles, (run + 1) * grain); ++t) {
              const int64_t j0 = t * kTile, width = std::min(kTile, g - j0);
              buf.sorter.sort(x + j0, n, width, g);
              for (int64_t c = 0; c < width; ++c) {
                buf.sorter.column(c, n, buf.sorted.data(), buf.order.data());
                column_loss[j0 + c] = evaluate_sorted<scalar_t>(args, table.get(), buf.sorted.data(), buf.order.data(),
                                                                0, n, buf.tile_grad.data() + c, width);
              }
              for (int64_t i = 0; i < n; ++i) std::copy_n(buf.tile_grad.data() + i * width, width, grad + i * g + j0);
            }
          });
    } else {
      // Large N, few columns: sort each column once, then spread its CDF evaluations over threads.
      std::vector<double> sorted(n);
      std::vector<int32_t> order_buf(n);
      ColumnSorter<scalar_t> sorter;
      for (int64_t j = 0; j < g; ++j) {
        sorter.sort(x + j, n, 1, g);
        sorter.column(0, n, sorted.data(), order_buf.data());
        const int32_t* order = order_buf.data();
        const int64_t blocks = (n + kChunk * 8 - 1) / (kChunk * 8);
        std::vector<double> partial(blocks, 0.0);  // fixed blocks: the sum does not depend on threads
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t lo = blk * kChunk * 8, hi = std::min(n, lo + kChunk * 8);
            partial[blk] = evaluate_sorted<scalar_t>(args, table.get(), sorted.data(), order,
                                                     lo, hi, grad + j, g);
          }
        });
        double s = 0.0;
        for (double p : partial) s += p;
        column_loss[j] = s;
      }
    }
  });
  double total = 0.0;
  for (double l : column_loss) total += l;
  auto loss = at::scalar_tensor(total * args.scale(), gates.options());
  return {loss, grad_gates};
}

}  // namespace
}  // namespace condkernels

TORCH_LIBRARY_IMPL(condkernels, CPU, m) {
  m.impl("batch_shaping_loss", &condkernels::batch_shaping_loss_cpu);
}
