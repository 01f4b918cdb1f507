// CPU kernels of cond_conv2d, forward and backward.
//
// Three paths (and a shortcut), chosen by shape:
// - depthwise (groups == Cin == Cout): direct kernel (cpu/depthwise.h) that mixes each example's
//   k x k filters where they are used and never materialises the mixed weights.
// - a single expert (E = 1), not depthwise: the library's convolution of the whole batch, scaled per
//   example (y_b = r[b] conv(x_b, W)); its backward, the library's.
// - small planes of a batch (float32, NCHW, one group, <= 64 output pixels, AVX-512 or AVX2): the
//   forward mixes cache-sized pieces of the experts and feeds them to a register-blocked product,
//   cpu/fused_mix_gemm.h; the backward's column gradients W_b^T dy_b come from the same kernel, and
//   dW_e, dr from cpu/fused_weight_grad.h, which folds each example's dW_b as it is made.
// - everything else (1x1, strided 1x1, dense and grouped k x k): "mix + GEMM". The input is laid out
//   as im2col columns once per run of examples (or used in place for a stride-1 unpadded 1x1), and the
//   output channels are walked in tiles: one GEMM routing[chunk] @ W[:, tile] reads each expert tile
//   once and mixes it for every example of the chunk, then per-example GEMMs consume the mixed tile
//   while it is still in cache. With one tile covering every output channel this is plain
//   "mix all per-example weights, then batched GEMM"; the tile size is the only difference between the
//   two, and it is picked from cache budgets (plan_tiling, measured by condkernels/bench/condconv.py).
// The backward walks the same tiles: per-example weight gradients dW_b exist one tile at a time and
// are reduced at once into dW_e = sum_b r[b,e] dW_b and dr[b,e] += <dW_b, W_e>; the dr products
// are taken in the same pass over the experts that mixes the tile for the column gradients.
//
// Memory formats: NCHW and channels_last inputs both run without a copy; the output (and, in the
// backward, grad_x) is in x's format and grad_out is expected in it too.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "cpu/depthwise.h"
#include "cpu/frozen_weights.h"
#include "cpu/fused_mix_gemm.h"
#include "cpu/fused_weight_grad.h"
#include "cpu/im2col.h"
#include "cpu/library_conv.h"
#include "cpu/mixing.h"
#include "cpu/output_cache.h"
#include "cpu/parallel.h"
#include "cpu/scratch_pool.h"
#include "ops/cond_conv2d.h"

namespace condkernels {
namespace {

// --- layout -------------------------------------------------------------------------------------

// Mirrors memory_format_of in condkernels/ops/_conv_args.py.
bool use_channels_last(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// (B, C, H, W) in either format as per-example matrices: (B, C, H*W) for NCHW, (B, H*W, C) for NHWC.
at::Tensor as_example_matrices(const at::Tensor& t, bool channels_last) {
  const int64_t B = t.size(0), C = t.size(1), HW = t.size(2) * t.size(3);
  return channels_last ? t.permute({0, 2, 3, 1}).view({B, HW, C}) : t.view({B, C, HW});
}

// The CPU kernels' dtypes: float16 runs on CUDA only.
void check_cpu_dtype(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
                   "cond_conv2d: the CPU kernels take float32, float64 and bfloat16 (float16 runs on CUDA), "
                   "got x of ", t);
}

// --- tiling of the mix + GEMM path ----------------------------------------------------------------

enum class TilingPolicy { Auto, Whole, Tiled };

// CONDKERNELS_COND_CONV2D_CPU_TILING=whole|tiled forces one strategy (for the benchmark).
TilingPolicy tiling_policy() {
  const char* env = std::getenv("CONDKERNELS_COND_CONV2D_CPU_TILING");
  if (env == nullptr) return TilingPolicy::Auto;
  if (std::strcmp(env, "whole") == 0) return TilingPolicy::Whole;
  if (std::strcmp(env, "tiled") == 0) return TilingPolicy::Tiled;
  return TilingPolicy::Auto;
}

// im2col columns of one run of examples stay within this many bytes (they are re-read per tile).
constexpr int64_t kColsBudgetBytes = 16 << 20;
// The fused small-plane kernels read every expert from memory once per run of examples, so their
// runs take a larger budget: with the one above, 3x3 512->512 @7x7 at B = 32 ran as 18 + 14
// examples and read the E experts twice (302 MB each time at E = 32).
constexpr int64_t kFusedColsBudgetBytes = 64 << 20;
// A tile of mixed weights (or of per-example weight gradients) for one run of examples: about the
// L2 of one core, so the per-example GEMMs read it from cache right after the mixing GEMM wrote it.
constexpr int64_t kMixTileBudgetBytes = 2 << 20;
// Narrower tiles make the per-example GEMMs too thin to run near peak.
constexpr int64_t kMinTile = 32;
// Up to this many bytes of mixed weights per run, mixing them all before the GEMMs (one tile per
// group) beat cache-sized tiles in condkernels/bench/condconv.py (pointwise 512 at B = 32, E = 4:
// 34 MB); beyond it the tiles won (pointwise 2048->512 at B = 32, E = 32: 134 MB). Twice the L3.
constexpr int64_t kWholeBudgetBytes = 64 << 20;

struct Tiling {
  int64_t chunk;  // examples per run
  int64_t tile;   // output channels per tile (within one group)
};

Tiling plan_tiling(const ConvGeometry& g, bool direct_input, bool fused, int64_t element_size) {
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t Kg = g.in_channels_per_group() * taps;
  const int64_t cout_g = g.out_channels_per_group();
  const int64_t cols_bytes = direct_input ? 0 : g.in_channels * taps * g.out_h * g.out_w * element_size;
  const int64_t budget = fused ? kFusedColsBudgetBytes : kColsBudgetBytes;
  const int64_t chunk = cols_bytes == 0 ? g.batch : std::clamp<int64_t>(budget / cols_bytes, 1, g.batch);
  if (fused) return {chunk, cout_g};  // the fused kernels tile the channels themselves
  const TilingPolicy policy = tiling_policy();
  if (policy == TilingPolicy::Whole) return {chunk, cout_g};
  if (policy == TilingPolicy::Auto && chunk > 1 && chunk * g.out_channels * Kg * element_size <= kWholeBudgetBytes)
    return {chunk, cout_g};
  int64_t tile = kMixTileBudgetBytes / std::max<int64_t>(1, chunk * Kg * element_size);
  tile = std::max(tile, std::min(kMinTile, cout_g));
  if (tile > 8) tile -= tile % 8;
  // The GEMM library parallelises each product when a run holds fewer examples than threads; give
  // it at least one tile per thread to share out at batch 1 as well.
  if (policy == TilingPolicy::Auto && tile >= cout_g && chunk == 1 && cout_g >= 2 * kMinTile)
    tile = (cout_g + 1) / 2;
  return {chunk, std::min(tile, cout_g)};
}

// Runs f(b) for b in [0, n): in parallel over examples when there are enough of them (the workers
// with the caller's state: f calls ATen GEMMs), otherwise in order so that the GEMMs inside f get
// the threads.
template <typename F>
void for_each_example(int64_t n, const F& f) {
  if (n > 1 && n >= at::get_num_threads()) {
    cpu::parallel_for_as_caller(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) f(b);
    });
  } else {
    for (int64_t b = 0; b < n; ++b) f(b);
  }
}

// Per-example columns of examples [b0, b0 + n): x itself for a stride-1 unpadded 1x1, else im2col.
at::Tensor example_columns(const ConvGeometry& g, bool channels_last, bool direct_input,
                           const at::Tensor& x, int64_t b0, int64_t n) {
  if (direct_input) return as_example_matrices(x, channels_last).narrow(0, b0, n);
  const int64_t K = g.in_channels * g.kernel_h * g.kernel_w, P = g.out_h * g.out_w;
  at::Tensor cols = at::empty(channels_last ? std::vector<int64_t>{n, P, K} : std::vector<int64_t>{n, K, P},
                              x.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cond_conv2d_im2col", [&] {
    im2col::gather<scalar_t>(g, channels_last, x.const_data_ptr<scalar_t>() + b0 * x.stride(0), n,
                             cols.mutable_data_ptr<scalar_t>());
  });
  return cols;
}

// The block of example b's columns that group `grp` reads: (Kg, P) in NCHW, (P, Kg) in NHWC.
at::Tensor group_columns(const at::Tensor& cols_b, bool channels_last, int64_t grp, int64_t Kg) {
  return channels_last ? cols_b.narrow(1, grp * Kg, Kg) : cols_b.narrow(0, grp * Kg, Kg);
}

// Tiles of mixed weights and of per-example weight gradients live in the calling thread's scratch
// pool: a fresh allocation of their few to tens of MB per tile is mapped anew by glibc and pays its
// page faults on every tile (with the pool and the gradient cache, forward+backward of pointwise
// 2048->512 @7x7 at B = 8, E = 8 went from 47.8 to 30.7 ms in the full condconv grid). A tile is
// dead before the next one is asked for.
// (Slots 0-2 are the fused small-plane kernel's.)
constexpr int kMixedSlot = 3, kWeightGradSlot = 4;

at::Tensor pooled(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  void* p = cpu::ScratchPool::of_this_thread().get(slot, static_cast<size_t>(numel) * options.dtype().itemsize());
  return at::from_blob(p, sizes, options);
}

// Mixed weights of output channels [o0, o0 + T) for examples [b0, b0 + n): (n, T, Kg), with the
// columns in the order `example_columns` uses for this layout. Given the examples' weight gradients
// of the tile (`dw_rows`, (n, T * Kg) in the weight's order), it also makes their routing gradient
// over the tile, grad_routing[b0 + i, e] (+)= <dW_b, W_e>, from the same read of the experts.
at::Tensor mix_tile(const at::Tensor& routing, const at::Tensor& weight_flat, const ConvGeometry& g,
                    bool channels_last, int64_t b0, int64_t n, int64_t o0, int64_t T,
                    const at::Tensor& dw_rows = at::Tensor(), at::Tensor* grad_routing = nullptr,
                    bool accumulate_routing = false) {
  const int64_t taps = g.kernel_h * g.kernel_w, Cg = g.in_channels_per_group(), Kg = Cg * taps;
  const int64_t E = routing.size(1);
  at::Tensor mixed = pooled(kMixedSlot, {n, T * Kg}, weight_flat.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, mixed.scalar_type(), "cond_conv2d_mix", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* r = routing.const_data_ptr<scalar_t>() + b0 * E;
    const scalar_t* w = weight_flat.const_data_ptr<scalar_t>() + o0 * Kg;
    if (dw_rows.defined())
      mixing::mix_and_dot_columns<acc_t, scalar_t>(r, E, 1, w, weight_flat.size(1), E, n, T * Kg,
                                                   mixed.mutable_data_ptr<scalar_t>(), T * Kg,
                                                   dw_rows.const_data_ptr<scalar_t>(), T * Kg,
                                                   grad_routing->mutable_data_ptr<scalar_t>() + b0 * E,
                                                   accumulate_routing);
    else
      mixing::mix_columns<acc_t, scalar_t>(r, E, 1, w, weight_flat.size(1), E, n, T * Kg,
                                           mixed.mutable_data_ptr<scalar_t>(), T * Kg, mixing::Write::kStore);
  });
  if (channels_last && taps > 1)  // (c, kh, kw) -> (kh, kw, c) to match the NHWC columns
    return mixed.view({n, T, Cg, taps}).transpose(2, 3).contiguous().view({n, T, Kg});
  return mixed.view({n, T, Kg});
}

// Whether the forward or the backward runs through the fused small-plane kernels: float32, NCHW,
// one group, an AVX-512 or AVX2 CPU, and the sizes where they measured faster (cpu/fused_mix_gemm.h,
// cpu/fused_weight_grad.h). Both take them past their kMaxExperts once the batch is as large as the
// number of experts, sharing the staging of the experts among as many examples.
// CONDKERNELS_COND_CONV2D_CPU_FUSED=0 turns them off, =1 takes them whenever they can run (for the
// benchmark and the tests).
// With the experts already staged (inference in condkernels.frozen_weights(), cpu/frozen_weights.h)
// the forward costs no staging, and it beat mix + GEMM at every batch and expert count tried
// (one-off process-alternated A/B on the Intel Xeon, 2 threads, ms, fused / mix + GEMM, both inside
// frozen_weights()): 3x3 512->512 @7x7 B = 1 E = 4 4.1 / 5.0-6.8, E = 8 4.1-4.4 / 6.4-8.5, B = 8
// E = 32 27-37 / 47-49; pointwise 2048->512 B = 1 E = 8 2.3 / 3.7-3.9, B = 8 E = 32 11-14 / 17-19
// (ties at B = 1 E = 32, bound by the experts' read). Past the plane limit it stays off: on the
// Xeon's pointwise 512 @14x14 it won at B = 1 E = 32 with one layer timed alone (2.4-2.7 /
// 3.3-3.4) but tied in the benchmark's interleaved rounds, where other calls evict the L3 (`--suite
// condconv --full --filter "@14x14 (MobileNetV1)" --filter pointwise --filter inference` with it
// taken there: 2.35 / 2.29), won and lost by turns at B = 8 and 16, and lost at B = 32 E = 32
// (33-46 / 29-35).
enum class Pass { kForward, kBackward };

bool use_fused_mix_gemm(const ConvGeometry& g, bool channels_last, const at::Tensor& x, int64_t experts, Pass pass,
                        bool experts_staged = false) {
  namespace fused = cpu::fused_mix_gemm;
  if (x.scalar_type() != at::kFloat || channels_last || g.groups != 1 || !fused::available()) return false;
  const char* env = std::getenv("CONDKERNELS_COND_CONV2D_CPU_FUSED");
  if (env && std::strcmp(env, "0") == 0) return false;
  if (env && std::strcmp(env, "1") == 0) return true;
  if (g.out_h * g.out_w > fused::max_plane()) return false;
  if (experts_staged) return true;
  if (g.batch < fused::kMinBatch) return false;
  const int64_t max_experts = pass == Pass::kForward ? fused::kMaxExperts : cpu::fused_weight_grad::kMaxExperts;
  return experts <= max_experts || g.batch >= experts;
}

at::Tensor forward_mix_gemm(const ConvGeometry& g, bool channels_last, const at::Tensor& x,
                            const at::Tensor& routing, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, bool weight_is_callers) {
  const int64_t E = weight.size(0), taps = g.kernel_h * g.kernel_w;
  const int64_t Kg = g.in_channels_per_group() * taps, cout_g = g.out_channels_per_group();
  const int64_t P = g.out_h * g.out_w;
  const bool direct_input = g.is_pointwise();
  // Within condkernels.frozen_weights(), the fused kernel reads the experts from a copy in its
  // staged layout, kept between calls (cpu/frozen_weights.h); not for a copy made by this call.
  const bool experts_staged = weight_is_callers && cpu::keeps_frozen_copy(weight);
  const bool fused = use_fused_mix_gemm(g, channels_last, x, E, Pass::kForward, experts_staged);
  const at::Tensor staged_weight =
      fused && experts_staged
          ? cpu::frozen_copy(weight, cpu::kCondConv2dStagedExperts, cpu::fused_mix_gemm::staged_experts)
          : at::Tensor();
  const Tiling tiling = plan_tiling(g, direct_input, fused, x.element_size());
  const at::Tensor weight_flat = weight.view({E, -1});
  at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                           x.options().memory_format(format_of(channels_last)));
  at::Tensor y_rows = as_example_matrices(y, channels_last);
  const std::optional<at::Tensor> mixed_bias =
      bias ? std::optional<at::Tensor>(at::mm(routing, *bias)) : std::nullopt;

  for (int64_t b0 = 0; b0 < g.batch; b0 += tiling.chunk) {
    const int64_t n = std::min(tiling.chunk, g.batch - b0);
    const at::Tensor cols = example_columns(g, channels_last, direct_input, x, b0, n);
    if (fused) {
      const cpu::fused_mix_gemm::Problem problem{
          cols.const_data_ptr<float>(), cols.stride(0), weight.const_data_ptr<float>(),
          routing.const_data_ptr<float>() + b0 * E,
          mixed_bias ? mixed_bias->const_data_ptr<float>() + b0 * g.out_channels : nullptr,
          y.mutable_data_ptr<float>() + b0 * y.stride(0), y.stride(0), n, E, g.out_channels, Kg, P,
          false, staged_weight.defined() ? staged_weight.const_data_ptr<float>() : nullptr};
      cpu::fused_mix_gemm::run(problem);
      continue;
    }
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      for (int64_t t0 = 0; t0 < cout_g; t0 += tiling.tile) {
        const int64_t T = std::min(tiling.tile, cout_g - t0), o0 = grp * cout_g + t0;
        const at::Tensor mixed = mix_tile(routing, weight_flat, g, channels_last, b0, n, o0, T);
        for_each_example(n, [&](int64_t i) {
          const at::Tensor cols_g = group_columns(cols[i], channels_last, grp, Kg);
          if (channels_last) {  // (P, T) = (P, Kg) @ (Kg, T)
            at::Tensor out = y_rows[b0 + i].narrow(1, o0, T);
            if (mixed_bias)
              at::addmm_out(out, (*mixed_bias)[b0 + i].narrow(0, o0, T).unsqueeze(0).expand({P, T}), cols_g,
                            mixed[i].t());
            else
              at::mm_out(out, cols_g, mixed[i].t());
          } else {  // (T, P) = (T, Kg) @ (Kg, P)
            at::Tensor out = y_rows[b0 + i].narrow(0, o0, T);
            if (mixed_bias)
              at::addmm_out(out, (*mixed_bias)[b0 + i].narrow(0, o0, T).unsqueeze(1).expand({T, P}), mixed[i],
                            cols_g);
            else
              at::mm_out(out, mixed[i], cols_g);
          }
        });
      }
    }
  }
  return y;
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Expert gradients from this size are written past the caches (streaming stores) by the first run
// of examples: far beyond a core's share of the last-level cache, they would only evict what the
// backward reads next, and a cached store reads each line from memory first. At batch 1 (34 to
// 302 MB, E = 8 and 32) forward+backward ran 5-12% faster so in a one-off A/B on the AMD EPYC;
// smaller gradients stay in cache for the optimizer step.
constexpr int64_t kStreamedGradientBytes = int64_t(16) << 20;

// grad_routing += db_b @ bias^T and grad_bias = routing^T @ db_b, with db_b = sum of grad_out over
// space, in the accumulation type.
void bias_gradients(const at::Tensor& grad_out, const at::Tensor& routing, const at::Tensor& bias,
                    std::array<bool, 4> mask, at::Tensor& grad_routing, at::Tensor& grad_bias) {
  const auto acc_type = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor db = grad_out.sum({2, 3}, false, acc_type);  // (B, Cout)
  if (mask[3]) grad_bias = at::mm(routing.t().to(acc_type), db).to(bias.scalar_type());
  if (mask[1]) grad_routing.add_(at::mm(db, bias.t().to(acc_type)).to(grad_routing.scalar_type()));
}

Grads backward_mix_gemm(const ConvGeometry& g, bool channels_last, const at::Tensor& grad_out,
                        const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, std::array<bool, 4> mask) {
  const int64_t E = weight.size(0), taps = g.kernel_h * g.kernel_w;
  const int64_t Cg = g.in_channels_per_group(), Kg = Cg * taps, cout_g = g.out_channels_per_group();
  const int64_t P = g.out_h * g.out_w;
  const bool direct_input = g.is_pointwise();
  const bool need_dw = mask[1] || mask[2];
  // Small planes: the column gradients come from the fused kernel (the forward's problem with the
  // experts transposed), each written once, where the tiles below would add every tile's share.
  // The expert and routing gradients likewise fold each example's piece of dW_b as it is made.
  const bool fused = use_fused_mix_gemm(g, channels_last, x, E, Pass::kBackward);
  const bool fused_dx = mask[0] && fused, tiled_dx = mask[0] && !fused;
  const bool fused_dw = need_dw && fused, tiled_dw = need_dw && !fused;
  const Tiling tiling = plan_tiling(g, direct_input, fused, x.element_size());
  const at::Tensor weight_flat = weight.view({E, -1});
  const at::Tensor go_rows = as_example_matrices(grad_out, channels_last);
  auto empty = [&] { return x.new_empty({0}); };

  at::Tensor grad_x = mask[0] ? at::empty_like(x, x.options().memory_format(format_of(channels_last)))
                              : empty();
  at::Tensor grad_routing = mask[1] ? at::empty_like(routing) : empty();
  // E x the static layer's weight gradient: tens of MB for wide layers, kept between steps.
  at::Tensor grad_weight = mask[2] ? cpu::empty_cached(weight.sizes(), weight.options()) : empty();
  at::Tensor grad_bias = empty();

  for (int64_t b0 = 0; b0 < g.batch; b0 += tiling.chunk) {
    const int64_t n = std::min(tiling.chunk, g.batch - b0);
    const at::Tensor cols = need_dw ? example_columns(g, channels_last, direct_input, x, b0, n) : at::Tensor();
    // How this run's share of dW_e reaches grad_weight, on either path.
    const mixing::Write gradient_write =
        b0 > 0 ? mixing::Write::kAdd
               : (grad_weight.nbytes() >= kStreamedGradientBytes ? mixing::Write::kStream : mixing::Write::kStore);
    // Column gradients: grad_x itself for a stride-1 unpadded 1x1, else a buffer folded by col2im.
    at::Tensor dcols;
    if (mask[0]) {
      if (direct_input) {
        dcols = as_example_matrices(grad_x, channels_last).narrow(0, b0, n);
      } else {
        const int64_t K = g.in_channels * taps;
        dcols = at::empty(channels_last ? std::vector<int64_t>{n, P, K} : std::vector<int64_t>{n, K, P},
                          x.options().memory_format(at::MemoryFormat::Contiguous));
      }
    }
    if (fused_dx) {
      const cpu::fused_mix_gemm::Problem problem{
          grad_out.const_data_ptr<float>() + b0 * grad_out.stride(0), grad_out.stride(0),
          weight.const_data_ptr<float>(), routing.const_data_ptr<float>() + b0 * E, nullptr,
          dcols.mutable_data_ptr<float>(), dcols.stride(0), n, E, Kg, g.out_channels, P,
          /*weight_transposed=*/true};
      cpu::fused_mix_gemm::run(problem);
    }
    if (fused_dw) {
      const cpu::fused_weight_grad::Problem problem{
          cols.const_data_ptr<float>(), cols.stride(0),
          grad_out.const_data_ptr<float>() + b0 * grad_out.stride(0), grad_out.stride(0),
          weight.const_data_ptr<float>(), routing.const_data_ptr<float>() + b0 * E,
          mask[2] ? grad_weight.mutable_data_ptr<float>() : nullptr,
          mask[1] ? grad_routing.mutable_data_ptr<float>() + b0 * E : nullptr,
          gradient_write, n, E, g.out_channels, Kg, P};
      cpu::fused_weight_grad::run(problem);
    }
    bool first_tile = true;
    for (int64_t grp = 0; grp < g.groups && (tiled_dw || tiled_dx); ++grp) {
      for (int64_t t0 = 0; t0 < cout_g; t0 += tiling.tile) {
        const int64_t T = std::min(tiling.tile, cout_g - t0), o0 = grp * cout_g + t0;
        auto grad_out_tile = [&](int64_t i) {
          return channels_last ? go_rows[b0 + i].narrow(1, o0, T)   // (P, T)
                               : go_rows[b0 + i].narrow(0, o0, T);  // (T, P)
        };
        // Per-example weight gradients of this tile, (n, T * Kg) in the weight's order.
        at::Tensor dw_flat;
        if (tiled_dw) {
          const at::Tensor dw_tile = pooled(kWeightGradSlot, {n, T, Kg}, x.options());  // columns' order
          for_each_example(n, [&](int64_t i) {
            const at::Tensor go = grad_out_tile(i);
            const at::Tensor cols_g = group_columns(cols[i], channels_last, grp, Kg);
            at::Tensor dw = dw_tile[i];
            if (channels_last)
              at::mm_out(dw, go.t(), cols_g);
            else
              at::mm_out(dw, go, cols_g.t());
          });
          dw_flat = dw_tile;
          if (channels_last && taps > 1)  // (kh, kw, c) -> (c, kh, kw), the weight's order
            dw_flat = dw_tile.view({n, T, taps, Cg}).transpose(2, 3).contiguous();
          dw_flat = dw_flat.view({n, T * Kg});
        }
        // The mixed weights for the column gradients and, from the same read of the experts, the
        // routing gradient over this tile, dr[b, e] += <dW_b, W_e>.
        const bool routing_with_mix = tiled_dx && mask[1];
        if (tiled_dx) {
          const at::Tensor mixed =
              routing_with_mix ? mix_tile(routing, weight_flat, g, channels_last, b0, n, o0, T, dw_flat,
                                          &grad_routing, !first_tile)
                               : mix_tile(routing, weight_flat, g, channels_last, b0, n, o0, T);
          const bool first_in_group = t0 == 0;
          for_each_example(n, [&](int64_t i) {
            const at::Tensor go = grad_out_tile(i);
            at::Tensor dc = group_columns(dcols[i], channels_last, grp, Kg);
            const at::Tensor a = channels_last ? go : mixed[i].t();
            const at::Tensor b = channels_last ? mixed[i] : go;
            if (first_in_group)
              at::mm_out(dc, a, b);
            else
              dc.addmm_(a, b);
          });
        }
        if (tiled_dw) {
          // dW_e += sum_b r[b, e] dW_b (and, without the mixing above, dr[b, e] += <dW_b, W_e>) over
          // this tile: GEMMs with an inner dimension of n or E, run by the mixing kernels that stream
          // the E x tile rows once.
          AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cond_conv2d_reduce", [&] {
            using acc_t = at::opmath_type<scalar_t>;
            const scalar_t* r = routing.const_data_ptr<scalar_t>() + b0 * E;
            if (mask[2])
              mixing::mix_columns<acc_t, scalar_t>(r, 1, E, dw_flat.const_data_ptr<scalar_t>(), T * Kg, n, E,
                                                   T * Kg, grad_weight.mutable_data_ptr<scalar_t>() + o0 * Kg,
                                                   g.out_channels * Kg, gradient_write);
            if (mask[1] && !routing_with_mix)
              mixing::dot_columns<acc_t, scalar_t>(dw_flat.const_data_ptr<scalar_t>(), T * Kg, n,
                                                   weight.const_data_ptr<scalar_t>() + o0 * Kg,
                                                   g.out_channels * Kg, E, T * Kg,
                                                   grad_routing.mutable_data_ptr<scalar_t>() + b0 * E, !first_tile);
          });
        }
        first_tile = false;
      }
    }
    if (mask[0] && !direct_input) {
      AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cond_conv2d_col2im", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        im2col::scatter<acc_t, scalar_t>(g, channels_last, dcols.const_data_ptr<scalar_t>(), n,
                                         grad_x.mutable_data_ptr<scalar_t>() + b0 * x.stride(0));
      });
    }
  }
  if (bias && (mask[1] || mask[3])) bias_gradients(grad_out, routing, *bias, mask, grad_routing, grad_bias);
  return {grad_x, grad_routing, grad_weight, grad_bias};
}

// --- a single expert -----------------------------------------------------------------------------
// With E = 1, W_b = r[b] W and y_b = r[b] (conv(x_b, W) + bias): one library convolution of the
// whole batch, scaled per example, does the static layer's work plus one pass over y, where mix +
// GEMM would write B scaled copies of W and run B narrow GEMMs. The backward is the static layer's:
// dW and db from r[b] dy_b, and dx_b = r[b] g_b with g_b = conv^T(dy_b, W), the unscaled input
// gradient. That g also gives the routing gradient without another convolution, by the adjoint:
// dr[b] = <dy_b, conv(x_b, W) + bias> = <g_b, x_b> + <sum over pixels of dy_b, bias>, for any
// r[b], 0 included, and cheaper than <dW, W> + <db, bias> even at batch 1 (a pass over the input,
// not two over the weight and one more to scale dW).

std::optional<at::Tensor> first_expert_bias(const std::optional<at::Tensor>& bias) {
  return bias ? std::optional<at::Tensor>((*bias)[0]) : std::nullopt;
}

at::Tensor static_conv(const ConvGeometry& g, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias) {
  return at::conv2d(cpu::pad_if_asymmetric(x, g), weight[0], first_expert_bias(bias), {g.stride_h, g.stride_w},
                    cpu::symmetric_padding(g), {g.dilation_h, g.dilation_w}, g.groups);
}

at::Tensor forward_single_expert(const ConvGeometry& g, bool channels_last, const at::Tensor& x,
                                 const at::Tensor& routing, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias) {
  at::Tensor y = static_conv(g, x, weight, bias).contiguous(format_of(channels_last));
  return y.mul_(routing.view({g.batch, 1, 1, 1}));
}

// The static layer's backward (ATen's, oneDNN on the CPU) of dy, for the gradients `library_mask`
// names (input, weight, bias); padded_x is pad_if_asymmetric(x, g), whose gradient is the input's.
std::tuple<at::Tensor, at::Tensor, at::Tensor> static_backward(const ConvGeometry& g, const at::Tensor& dy,
                                                               const at::Tensor& padded_x, const at::Tensor& weight,
                                                               bool has_bias, std::array<bool, 3> library_mask) {
  const std::vector<int64_t> bias_sizes{g.out_channels};
  return at::convolution_backward(dy, padded_x, weight[0],
                                  has_bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(),
                                  {g.stride_h, g.stride_w}, cpu::symmetric_padding(g), {g.dilation_h, g.dilation_w},
                                  /*transposed=*/false, {0, 0}, g.groups, library_mask);
}

Grads backward_single_expert(const ConvGeometry& g, bool channels_last, const at::Tensor& grad_out,
                             const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, std::array<bool, 4> mask) {
  const at::MemoryFormat format = format_of(channels_last);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor grad_x = x.new_empty({0}), grad_routing = x.new_empty({0});
  at::Tensor grad_weight = x.new_empty({0}), grad_bias = x.new_empty({0});
  const at::Tensor r = routing.view({g.batch, 1, 1, 1});
  // The input's gradient from dy itself when dr needs it unscaled, else from r[b] dy_b with the rest.
  const bool unscaled_input = mask[1], scaled_input = mask[0] && !unscaled_input;
  const at::Tensor padded_x = cpu::pad_if_asymmetric(x, g);  // a copy only for odd 'same' padding
  at::Tensor gx, gw, gb;
  if (unscaled_input)
    std::tie(gx, std::ignore, std::ignore) =
        static_backward(g, grad_out, padded_x, weight, false, {true, false, false});
  if (scaled_input || mask[2] || (mask[3] && bias)) {
    at::Tensor scaled_gx;
    std::tie(scaled_gx, gw, gb) = static_backward(g, (grad_out * r).contiguous(format), padded_x, weight,
                                                  bias.has_value(), {scaled_input, mask[2], mask[3]});
    if (scaled_input) gx = scaled_gx;
  }
  if (mask[1]) {  // dr[b] = <g_b, x_b> + <sum over pixels of dy_b, bias>
    at::Tensor dr = (gx.to(acc_type) * padded_x.to(acc_type)).sum({1, 2, 3});
    if (bias) dr = dr + at::mv(grad_out.to(acc_type).sum({2, 3}), (*bias)[0].to(acc_type));
    grad_routing = dr.unsqueeze(1).to(x.scalar_type());
  }
  if (mask[0]) {  // the padded input's gradient, cropped back to x
    if (unscaled_input) gx = gx * r;
    if (!cpu::has_symmetric_padding(g)) gx = gx.narrow(2, g.pad_h_begin, g.in_h).narrow(3, g.pad_w_begin, g.in_w);
    grad_x = gx.contiguous(format);
  }
  if (mask[2]) grad_weight = gw.unsqueeze(0);
  if (mask[3] && bias) grad_bias = gb.unsqueeze(0);
  return {grad_x, grad_routing, grad_weight, grad_bias};
}

// --- depthwise ------------------------------------------------------------------------------------

at::Tensor forward_depthwise(const ConvGeometry& g, bool channels_last, const at::Tensor& x,
                             const at::Tensor& routing, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                           x.options().memory_format(format_of(channels_last)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cond_conv2d_depthwise", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    depthwise::forward<acc_t, scalar_t>(g, channels_last, x.const_data_ptr<scalar_t>(),
                                        routing.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                        bias ? bias->const_data_ptr<scalar_t>() : nullptr, weight.size(0),
                                        y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

Grads backward_depthwise(const ConvGeometry& g, bool channels_last, const at::Tensor& grad_out,
                         const at::Tensor& x, const at::Tensor& routing, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, std::array<bool, 4> mask) {
  const int64_t E = weight.size(0), C = g.in_channels, taps = g.kernel_h * g.kernel_w;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool need_dw = mask[1] || mask[2];
  const bool need_db = bias.has_value() && (mask[1] || mask[3]);
  auto empty = [&] { return x.new_empty({0}); };
  at::Tensor grad_x = mask[0] ? at::empty_like(x, x.options().memory_format(format_of(channels_last)))
                              : empty();
  // Per-example filter gradients are only B*C*k*k numbers for a depthwise conv: kept whole.
  at::Tensor dw_b = need_dw ? at::empty({g.batch, C * taps}, x.options().dtype(acc_type)) : at::Tensor();
  at::Tensor db_b = need_db ? at::empty({g.batch, C}, x.options().dtype(acc_type)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "cond_conv2d_depthwise_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    depthwise::backward<acc_t, scalar_t>(
        g, channels_last, grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        routing.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), E,
        mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
        need_dw ? dw_b.mutable_data_ptr<acc_t>() : nullptr, need_db ? db_b.mutable_data_ptr<acc_t>() : nullptr);
  });
  const at::Tensor r = routing.to(acc_type);
  at::Tensor grad_routing = empty(), grad_weight = empty(), grad_bias = empty();
  if (mask[2]) grad_weight = at::mm(r.t(), dw_b).to(x.scalar_type()).view_as(weight);
  if (mask[1]) grad_routing = at::mm(dw_b, weight.view({E, -1}).t().to(acc_type));
  if (need_db) {
    if (mask[3]) grad_bias = at::mm(r.t(), db_b).to(x.scalar_type());
    if (mask[1]) grad_routing.add_(at::mm(db_b, bias->t().to(acc_type)));
  }
  if (mask[1]) grad_routing = grad_routing.to(x.scalar_type());
  return {grad_x, grad_routing, grad_weight, grad_bias};
}

// --- entry points ---------------------------------------------------------------------------------

at::Tensor cond_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& routing_in, const at::Tensor& weight_in,
                           const std::optional<at::Tensor>& bias_in, c10::IntArrayRef stride,
                           c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  // The ATen products below are pieces of this kernel, not graph nodes of their own.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = check_cond_conv2d_args(x_in, routing_in, weight_in, bias_in, stride, padding,
                                                dilation, groups);
  check_cpu_dtype(x_in);
  const bool channels_last = use_channels_last(x_in);
  if (g.batch == 0)
    return at::empty({0, g.out_channels, g.out_h, g.out_w}, x_in.options().memory_format(format_of(channels_last)));
  // Inputs that are in neither dense format (slices, expanded views) are made dense once.
  const at::Tensor x = x_in.contiguous(format_of(channels_last));
  const at::Tensor routing = routing_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  if (g.is_depthwise()) return forward_depthwise(g, channels_last, x, routing, weight, bias);
  if (weight.size(0) == 1) return forward_single_expert(g, channels_last, x, routing, weight, bias);
  return forward_mix_gemm(g, channels_last, x, routing, weight, bias, weight.is_same(weight_in));
}

Grads cond_conv2d_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                               const at::Tensor& routing_in, const at::Tensor& weight_in,
                               const std::optional<at::Tensor>& bias_in, c10::IntArrayRef stride,
                               c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                               std::array<bool, 4> output_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvGeometry g = check_cond_conv2d_args(x_in, routing_in, weight_in, bias_in, stride, padding,
                                                dilation, groups);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == g.batch && grad_out_in.size(1) == g.out_channels &&
                  grad_out_in.size(2) == g.out_h && grad_out_in.size(3) == g.out_w,
              "cond_conv2d backward: grad_out must have shape (", g.batch, ", ", g.out_channels, ", ", g.out_h,
              ", ", g.out_w, "), got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == x_in.scalar_type(), "cond_conv2d backward: grad_out has dtype ",
              grad_out_in.scalar_type(), " but x has ", x_in.scalar_type());
  check_cpu_dtype(x_in);
  std::array<bool, 4> mask = output_mask;
  mask[3] = mask[3] && bias_in.has_value();
  auto empty = [&] { return x_in.new_empty({0}); };
  if (g.batch == 0) {
    return {mask[0] ? at::zeros_like(x_in) : empty(), mask[1] ? at::zeros_like(routing_in) : empty(),
            mask[2] ? at::zeros_like(weight_in) : empty(), mask[3] ? at::zeros_like(*bias_in) : empty()};
  }
  if (!(mask[0] || mask[1] || mask[2] || mask[3])) return {empty(), empty(), empty(), empty()};
  const bool channels_last = use_channels_last(x_in);
  const at::MemoryFormat format = format_of(channels_last);
  const at::Tensor x = x_in.contiguous(format), grad_out = grad_out_in.contiguous(format);
  const at::Tensor routing = routing_in.contiguous(), weight = weight_in.contiguous();
  const std::optional<at::Tensor> bias = bias_in ? std::optional<at::Tensor>(bias_in->contiguous()) : std::nullopt;
  if (g.is_depthwise()) return backward_depthwise(g, channels_last, grad_out, x, routing, weight, bias, mask);
  if (weight.size(0) == 1) return backward_single_expert(g, channels_last, grad_out, x, routing, weight, bias, mask);
  return backward_mix_gemm(g, channels_last, grad_out, x, routing, weight, bias, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(condkernels, CPU, m) {
  m.impl("cond_conv2d", &cond_conv2d_cpu);
  m.impl("_cond_conv2d_backward", &cond_conv2d_backward_cpu);
}

}  // namespace condkernels
