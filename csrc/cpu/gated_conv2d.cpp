// CPU kernels of gated_conv2d.
//
// Each example gets its own compacted lists of open input and output channels (per group), so its
// work scales with its own open fraction, not the batch's union. Forward: a spatial kernel gathers
// the example's open input planes and its open filters (in_gate folded into them) and runs one
// oneDNN convolution on them (at::conv2d); a 1x1 kernel is one GEMM over the open channels. (An
// im2col + MKL sgemm formulation of the spatial case ran at ~0.4x of oneDNN's convolution
// throughput on the AMD CPU benchmarked, losing to the dense convolution it is meant to beat; it is
// kept only for a single example on planes up to 7x7, which are bound by reading the weights.)
// float32 inference (groups == 1, AVX-512 or AVX2 CPUs) runs an indirect GEMM instead
// (cpu/indirect_gemm.h): the weight rows are read in place, so no filter is gathered or reordered
// per example (those copies cost more than the multiply-adds on the 7x7 and 14x14 layers). From
// 10x10 output planes (7x7 batched) its columns are the example's zero-padded open planes
// themselves, split into phases when strided (padded_forward); otherwise, with an in_gate on
// planes up to 16x16 or any gates under 8x8, an im2col of the open channels (indirect_forward).
// Backward: per example, GEMMs over the open outputs only -- (open filters)^T x grad into an
// im2col-shaped buffer folded back by col2im for the input side, and im2col(open inputs) x grad^T
// for the weight -- with per-thread weight/bias accumulators. Examples run in parallel
// (at::parallel_for), each thread with its own buffers; with fewer examples than threads the
// gathers, im2col and epilogues split their channels across threads and the library kernels
// thread themselves. Above a measured fraction of the dense work the dense convolution plus masks
// is taken instead.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <vector>

#include "common/gated_channels.h"
#include "cpu/cpu_features.h"
#include "cpu/indirect_gemm.h"
#include "cpu/library_conv.h"
#include "cpu/parallel.h"
#include "cpu/scratch_pool.h"
#include "ops/gated_conv2d.h"

namespace condkernels {
namespace {

// Fractions of the dense multiply-adds (averaged over examples and groups) above which the dense
// convolution + masks is taken, from in_gate-only 3x3 ResNet block shapes (condkernels/bench/gated.py
// and a density sweep of the same cases) on a 2-core Intel Xeon (AVX-512), float32:
// - the indirect GEMM (float32 inference on planes up to 16x16): at batch 1 on 7x7 it beat the dense
//   convolution at every density (0.80x at density 1, 512 channels); on 14x14 up to 0.875 (0.94x;
//   1.09x at 1). Batched, 7x7 crossed over between 0.625 (0.86-0.95x) and 0.75 (1.01-1.12x), 14x14
//   between 0.75 (0.81-0.94x) and 0.875 (1.03-1.08x), at batch 8 and 32;
// - oneDNN per example, float32 on larger planes, groups == 1: 0.56-0.74x at 0.75 and 0.63-0.92x at 0.875
//   (128 @ 28x28, 64 @ 56x56, batch 1 and 8), still 0.77-0.94x at density 1;
// - padded planes (stride 1, `--paths`, compacted padded=1): 0.78-0.89x of the ungated convolution
//   of the same shape (`static`) at 0.75 and 1.04-1.11x at 1 (14x14 to 56x56, batch 32), about even
//   at 1 at batch 1;
// - every other case (float64, bfloat16, grouped, CPUs without AVX-512) keeps the thresholds measured
//   earlier on a 2-core AMD EPYC (AVX-512), docs/benchmarks_gated_conv2d.md: oneDNN per example won
//   up to 0.5 on every ResNet block shape but 512 @ 7x7; on small planes of a batch, reading the
//   gathered filters once per example made it lose from 0.5 (win or tie at 0.25);
// - backward (MKL GEMMs, every dtype): 0.97-1.55x of the dense masked training step at 0.25 (EPYC).
constexpr double kDenseAbovePadded = 0.85;
constexpr double kDenseAboveIndirectSingleSmall = 1.0;  // batch 1, under 8x8 outputs: never dense
constexpr double kDenseAboveIndirectSingle = 0.8;
constexpr double kDenseAboveIndirectSmallPlanes = 0.6;  // batch > 1, under 8x8 outputs
constexpr double kDenseAboveIndirect = 0.75;
constexpr double kDenseAboveForwardFloat32 = 0.85;
constexpr double kDenseAboveForward = 0.6;
constexpr double kDenseAboveForwardSmallPlanes = 0.3;
constexpr int64_t kSmallPlane = 64;
constexpr double kDenseAboveBackward = 0.2;

// Which forward kernel the compacted path runs, as far as the thresholds tell them apart.
enum class ForwardKernel { kPadded, kIndirect, kFloat32, kOther };

// CONDKERNELS_GATED_DENSE_ABOVE overrides the thresholds (2 = never dense, -1 = always dense); the
// tests use it to run both paths and the benchmark to measure the crossover.
double dense_above_work_fraction(const ConvGeometry& g, bool backward, ForwardKernel kernel = ForwardKernel::kOther) {
  const char* env = std::getenv("CONDKERNELS_GATED_DENSE_ABOVE");
  if (env != nullptr) return std::atof(env);
  if (backward) return kDenseAboveBackward;
  const bool small_plane = g.out_h * g.out_w < kSmallPlane;
  if (kernel == ForwardKernel::kPadded) return kDenseAbovePadded;
  if (kernel == ForwardKernel::kIndirect) {
    if (g.batch == 1) return small_plane ? kDenseAboveIndirectSingleSmall : kDenseAboveIndirectSingle;
    return small_plane ? kDenseAboveIndirectSmallPlanes : kDenseAboveIndirect;
  }
  // A single example reads its open filters once, as the dense convolution reads all of them.
  if (small_plane && g.batch > 1) return kDenseAboveForwardSmallPlanes;
  if (kernel == ForwardKernel::kFloat32 && !small_plane) return kDenseAboveForwardFloat32;
  return kDenseAboveForward;
}

// A single example's spatial kernel on planes of at most this many output pixels (7x7) runs as
// im2col + one MKL GEMM, not through oneDNN: these layers are bound by reading the weights, and the
// GEMM reads the gathered filters as they are, where oneDNN reorders them into its blocked layout
// first. At batch 1, one thread, density 0.5, ResNet-34's 7x7 layers measured 0.45-0.62x of the
// dense convolution this way against 0.53-0.67x through oneDNN (docs/gated_conv2d.md).
// CONDKERNELS_GATED_GEMM_POSITIONS overrides the limit (0: always oneDNN) for measurements.
constexpr int64_t kGemmMaxPositions = 64;

int64_t gemm_max_positions() {
  const char* env = std::getenv("CONDKERNELS_GATED_GEMM_POSITIONS");
  return env != nullptr ? static_cast<int64_t>(std::atoll(env)) : kGemmMaxPositions;
}

bool spatial_as_gemm(const ConvGeometry& g) {
  return g.is_pointwise() || (g.batch == 1 && g.out_h * g.out_w <= gemm_max_positions());
}

// Open channels of one example, as indices local to their group, group after group.
struct OpenChannels {
  std::vector<int64_t> index;
  std::vector<int64_t> start;  // group g's channels are index[start[g] .. start[g + 1])

  template <typename T>
  void build(const T* gate_row, int64_t channels, int64_t groups) {
    const int64_t per_group = channels / groups;
    index.clear();
    start.assign(groups + 1, 0);
    for (int64_t grp = 0; grp < groups; ++grp) {
      start[grp] = static_cast<int64_t>(index.size());
      for (int64_t c = 0; c < per_group; ++c)
        if (gate_row == nullptr || gate_is_open(gate_row[grp * per_group + c])) index.push_back(c);
    }
    start[groups] = static_cast<int64_t>(index.size());
  }
  const int64_t* of(int64_t grp) const { return index.data() + start[grp]; }
  int64_t count(int64_t grp) const { return start[grp + 1] - start[grp]; }
};

// Mean over examples and groups of (open inputs / inputs) * (open outputs / outputs): the share of
// the dense multiply-adds the compacted GEMMs do. A null gate counts as all open.
template <typename T>
double work_fraction(const T* in_gate, const T* out_gate, const ConvGeometry& g) {
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  double total = 0;
  for (int64_t b = 0; b < g.batch; ++b) {
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      int64_t n_in = cin_g, n_out = cout_g;
      if (in_gate != nullptr) {
        n_in = 0;
        for (int64_t c = 0; c < cin_g; ++c)
          n_in += gate_is_open(in_gate[b * g.in_channels + grp * cin_g + c]);
      }
      if (out_gate != nullptr) {
        n_out = 0;
        for (int64_t c = 0; c < cout_g; ++c)
          n_out += gate_is_open(out_gate[b * g.out_channels + grp * cout_g + c]);
      }
      total += static_cast<double>(n_in) / cin_g * static_cast<double>(n_out) / cout_g;
    }
  }
  return total / static_cast<double>(g.batch * g.groups);
}

// Splits `n` rows of `row_cost` elements across threads when not already inside a parallel region.
template <typename F>
void parallel_rows(int64_t n, int64_t row_cost, const F& f) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(row_cost, 1));
  at::parallel_for(0, n, grain, f);
}

// cols[(i, kh, kw), (oh, ow)] = x[chans[i]] at the input pixel tap (kh, kw) of output (oh, ow) reads,
// 0 in the padding. `xg` points at the group's first channel of one example. Rows are `ld` apart
// (positions when 0; the entries past positions are zeroed) and, with `scale` given, channel
// chans[i]'s rows are multiplied by scale[chans[i]].
template <typename T>
void im2col_channels(const T* xg, const int64_t* chans, int64_t n, const ConvGeometry& g, T* cols,
                     int64_t ld = 0, const T* scale = nullptr) {
  const int64_t kw_n = g.kernel_w, kk = g.kernel_h * g.kernel_w;
  const int64_t out_w = g.out_w, positions = g.out_h * g.out_w, in_w = g.in_w;
  if (ld == 0) ld = positions;
  // Each tap's valid output rows and columns, the same for every channel: computed per row, their
  // integer divisions were about a third of a 7x7 plane's im2col (one-off perf samples).
  std::vector<TapRange> tap_rows(g.kernel_h), tap_cols(kw_n);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh)
    tap_rows[kh] = valid_out_range(g.in_h, g.out_h, g.stride_h, g.pad_h_begin, kh * g.dilation_h);
  for (int64_t kw = 0; kw < kw_n; ++kw)
    tap_cols[kw] = valid_out_range(in_w, out_w, g.stride_w, g.pad_w_begin, kw * g.dilation_w);
  parallel_rows(n * kk, positions, [&](int64_t r0, int64_t r1) {
    int64_t channel = r0 / kk, kh = (r0 % kk) / kw_n, kw = r0 % kw_n;  // row r's, stepped along
    for (int64_t r = r0; r < r1; ++r) {
      if (r > r0 && ++kw == kw_n) {
        kw = 0;
        if (++kh == g.kernel_h) {
          kh = 0;
          ++channel;
        }
      }
      const T* src = xg + chans[channel] * g.in_h * in_w;
      T* dst = cols + r * ld;
      const T s = scale != nullptr ? scale[chans[channel]] : T(1);
      const TapRange rows = tap_rows[kh], cs = tap_cols[kw];
      // The row's padding zeroed in one call, then the pixels read from the plane written over it
      // (zeroing each output row's two ends took two library calls per row of 7 or 14 pixels).
      if (rows.begin > 0 || rows.end < g.out_h || cs.begin > 0 || cs.end < out_w) {
        std::fill(dst, dst + ld, T(0));
      } else {
        std::fill(dst + positions, dst + ld, T(0));
      }
      for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
        const T* src_row = src + g.in_row(oh, kh) * in_w;
        T* d = dst + oh * out_w;
        if (s != T(1)) {  // only the pixels read from the plane: the padding stays 0, even for NaN
          for (int64_t ow = cs.begin; ow < cs.end; ++ow) d[ow] = static_cast<T>(src_row[g.in_col(ow, kw)] * s);
        } else if (g.stride_w == 1) {  // a loop, not memcpy: rows of 7 or 14 floats
          const T* sp = src_row + g.in_col(cs.begin, kw);
          for (int64_t i = 0; i < cs.end - cs.begin; ++i) d[cs.begin + i] = sp[i];
        } else {
          for (int64_t ow = cs.begin; ow < cs.end; ++ow) d[ow] = src_row[g.in_col(ow, kw)];
        }
      }
    }
  });
}

// The adjoint of im2col_channels: gx[i] += every column entry that channel chans[i] fed. gx holds
// `n` zeroed planes of in_h * in_w in the accumulation type.
template <typename T, typename Acc>
void col2im_channels(const T* cols, int64_t n, const ConvGeometry& g, Acc* gx) {
  const int64_t kk = g.kernel_h * g.kernel_w, out_w = g.out_w, positions = g.out_h * g.out_w;
  const int64_t plane = g.in_h * g.in_w;
  parallel_rows(n, kk * positions, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      Acc* dst = gx + i * plane;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const TapRange rows = valid_out_range(g.in_h, g.out_h, g.stride_h, g.pad_h_begin, kh * g.dilation_h);
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const TapRange cs = valid_out_range(g.in_w, out_w, g.stride_w, g.pad_w_begin, kw * g.dilation_w);
          const T* src = cols + (i * kk + kh * g.kernel_w + kw) * positions;
          for (int64_t oh = rows.begin; oh < rows.end; ++oh) {
            Acc* d = dst + g.in_row(oh, kh) * g.in_w;
            const T* s = src + oh * out_w;
            for (int64_t ow = cs.begin; ow < cs.end; ++ow) d[g.in_col(ow, kw)] += static_cast<Acc>(s[ow]);
          }
        }
      }
    }
  });
}

// One filter's kk taps: a fixed-size copy for the usual kernels (a library memcpy call per 3x3
// filter costs more than the 36 bytes it moves).
template <typename T>
inline void copy_filter(T* d, const T* s, int64_t kk) {
  switch (kk) {
    case 9: std::memcpy(d, s, 9 * sizeof(T)); break;
    case 1: *d = *s; break;
    case 25: std::memcpy(d, s, 25 * sizeof(T)); break;
    default: std::memcpy(d, s, kk * sizeof(T));
  }
}

// dst[o, (i, k)] = weight[group's outs[o], ins[i], k] * (in_gate of ins[i], when given), rows
// dst_stride apart; with padded_rows > n_out, rows [n_out, padded_rows) and each row's tail past
// n_in * kk are zeroed (and nothing else is written twice).
template <typename T>
void gather_weight(const T* weight, const ConvGeometry& g, int64_t grp, const int64_t* outs,
                   int64_t n_out, const int64_t* ins, int64_t n_in, const T* in_gate_row, T* dst,
                   int64_t dst_stride, int64_t padded_rows = 0) {
  const int64_t cin_g = g.in_channels_per_group(), kk = g.kernel_h * g.kernel_w;
  using acc_t = at::opmath_type<T>;
  padded_rows = std::max(padded_rows, n_out);
  parallel_rows(padded_rows, dst_stride, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      T* d = dst + o * dst_stride;
      if (o >= n_out) {
        std::fill(d, d + dst_stride, T(0));
        continue;
      }
      std::fill(d + n_in * kk, d + dst_stride, T(0));
      const T* w_row = weight + (grp * g.out_channels_per_group() + outs[o]) * cin_g * kk;
      if (in_gate_row == nullptr && n_in == cin_g) {  // every input open: the row as it is
        std::memcpy(d, w_row, n_in * kk * sizeof(T));
        continue;
      }
      for (int64_t i = 0; i < n_in; ++i) {
        const T* s = w_row + ins[i] * kk;
        const acc_t scale = in_gate_row != nullptr ? static_cast<acc_t>(in_gate_row[grp * cin_g + ins[i]]) : acc_t(1);
        if (scale == acc_t(1)) {  // binary gates: every open filter as it is
          copy_filter(d + i * kk, s, kk);
        } else {
          for (int64_t k = 0; k < kk; ++k) d[i * kk + k] = static_cast<T>(static_cast<acc_t>(s[k]) * scale);
        }
      }
    }
  });
}

// c = a @ b into a preallocated buffer: MKL for float32/float64, oneDNN for bfloat16. (A
// register-blocked AVX-512 kernel was tried here and ran at ~0.6x of MKL's sgemm on the benchmark
// CPU, so the library GEMM stays.)
void mm_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& c) { at::mm_out(c, a, b); }

// dst[(i, k), o] = weight[group's outs[o], ins[i], k]: the transposed gather the input gradient needs.
template <typename T>
void gather_weight_transposed(const T* weight, const ConvGeometry& g, int64_t grp, const int64_t* outs,
                              int64_t n_out, const int64_t* ins, int64_t n_in, T* dst) {
  const int64_t cin_g = g.in_channels_per_group(), kk = g.kernel_h * g.kernel_w;
  parallel_rows(n_in, n_out * kk, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t o = 0; o < n_out; ++o) {
        const T* s = weight + ((grp * g.out_channels_per_group() + outs[o]) * cin_g + ins[i]) * kk;
        for (int64_t k = 0; k < kk; ++k) dst[(i * kk + k) * n_out + o] = s[k];
      }
  });
}

// Spatial kernels run each example's open channels through oneDNN's convolution; its channel counts
// are rounded up to this quantum with zero planes and zero filters, so that the number of distinct
// convolution shapes (each one a primitive oneDNN creates once and caches) stays small.
constexpr int64_t kShapeQuantum = 16;

int64_t round_up(int64_t n, int64_t quantum) { return (n + quantum - 1) / quantum * quantum; }

// The scratch-pool slot of the indirect forwards' columns: an im2col of a run of examples, or the
// padded planes (Workspace below takes the others in order).
constexpr int kIndirectColsSlot = 9;

// Per-thread scratch, sized for the largest group GEMM of the call (views of the thread's pool).
struct Workspace {
  at::Tensor cols, weight, result, planes, grad_rows, grad_rows_t, grad_cols, acc_planes, ungated;

  Workspace(const ConvGeometry& g, const at::TensorOptions& options, bool backward) {
    const int64_t kk = g.kernel_h * g.kernel_w, positions = g.out_h * g.out_w;
    const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
    cpu::ScratchPool& pool = cpu::ScratchPool::of_this_thread();
    int slot = 0;
    auto buffer = [&](int64_t numel, const at::TensorOptions& opts) {
      const size_t bytes = static_cast<size_t>(numel) * opts.dtype().itemsize();
      return at::from_blob(pool.get(slot++, bytes), {numel}, opts);
    };
    cols = buffer(cin_g * kk * positions, options);
    weight = buffer((cout_g + kShapeQuantum) * (cin_g + kShapeQuantum) * kk, options);
    result = buffer(cout_g * positions, options);
    planes = buffer((cin_g + kShapeQuantum) * g.in_h * g.in_w, options);
    if (backward) {
      grad_rows = buffer(cout_g * positions, options);
      grad_rows_t = buffer(cout_g * positions, options);
      grad_cols = buffer(cin_g * kk * positions, options);
      acc_planes = buffer(cin_g * g.in_h * g.in_w, options.dtype(at::toOpMathType(options.dtype().toScalarType())));
      ungated = buffer(g.out_channels * positions, options);
    }
  }
  static at::Tensor matrix(const at::Tensor& buffer, int64_t rows, int64_t cols) {
    return buffer.narrow(0, 0, rows * cols).view({rows, cols});
  }
};

// One example's (and group's) open channels through oneDNN's convolution: its open input planes
// and its open filters (in_gate folded in). Returns (1, out_p, out_h, out_w) whose first n_out
// channels are the open outputs (plus `bias`, given for every one of them), the rest zeros. Needs
// n_in > 0 and n_out > 0.
template <typename T>
at::Tensor open_channel_conv(const at::Tensor& x, int64_t b, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const T* in_gate_row,
                             const ConvGeometry& g, int64_t grp, const int64_t* in_list, int64_t n_in,
                             const int64_t* out_list, int64_t n_out, Workspace& ws) {
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t kk = g.kernel_h * g.kernel_w, plane = g.in_h * g.in_w;
  // Counts that are the layer's own stay as they are (a shape oneDNN sees anyway); partial ones are
  // rounded up with zero planes and zero filters, which add exact zeros.
  const int64_t in_p = n_in == cin_g ? cin_g : round_up(n_in, kShapeQuantum);
  const int64_t out_p = n_out == cout_g ? cout_g : round_up(n_out, kShapeQuantum);
  at::Tensor planes;
  if (n_in == cin_g && g.groups == 1) {  // every input plane open: the example itself, no copy
    planes = x.narrow(0, b, 1);
  } else {
    const T* x_g = x.data_ptr<T>() + (b * g.in_channels + grp * cin_g) * plane;
    planes = ws.planes.narrow(0, 0, in_p * plane).view({1, in_p, g.in_h, g.in_w});
    T* pl = planes.data_ptr<T>();
    parallel_rows(in_p, plane, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (i < n_in) std::memcpy(pl + i * plane, x_g + in_list[i] * plane, plane * sizeof(T));
        else std::fill(pl + i * plane, pl + (i + 1) * plane, T(0));
      }
    });
  }
  at::Tensor w_open;
  if (n_in == cin_g && n_out == cout_g && in_gate_row == nullptr && g.groups == 1) {
    w_open = weight;
  } else {
    w_open = ws.weight.narrow(0, 0, out_p * in_p * kk).view({out_p, in_p, g.kernel_h, g.kernel_w});
    gather_weight(weight.data_ptr<T>(), g, grp, out_list, n_out, in_list, n_in, in_gate_row,
                  w_open.data_ptr<T>(), in_p * kk, out_p);
  }
  return at::conv2d(cpu::pad_if_asymmetric(planes, g), w_open, bias, {g.stride_h, g.stride_w},
                    cpu::symmetric_padding(g), {g.dilation_h, g.dilation_w}, 1)
      .contiguous();
}

// One example's forward. Writes y_b = out_gate * (conv + bias), closed outputs as 0, and, when
// `ungated_b` is given, conv + bias of every output channel (then every output is computed).
// Either of y_b / ungated_b may be null.
template <typename T>
void forward_example(const at::Tensor& x, int64_t b, const at::Tensor& weight, const T* bias,
                     const T* in_gate_row, const T* out_gate_row, const ConvGeometry& g,
                     Workspace& ws, OpenChannels& ins, OpenChannels& outs, T* y_b, T* ungated_b) {
  using acc_t = at::opmath_type<T>;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t kk = g.kernel_h * g.kernel_w, positions = g.out_h * g.out_w;
  const bool all_outputs = ungated_b != nullptr;
  ins.build(in_gate_row, g.in_channels, g.groups);
  outs.build(all_outputs ? static_cast<const T*>(nullptr) : out_gate_row, g.out_channels, g.groups);
  const T* x_b = x.data_ptr<T>() + b * g.in_channels * g.in_h * g.in_w;
  const T* w = weight.data_ptr<T>();

  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const int64_t n_in = ins.count(grp), n_out = outs.count(grp);
    const int64_t* in_list = ins.of(grp);
    const int64_t* out_list = outs.of(grp);
    at::Tensor result = Workspace::matrix(ws.result, n_out, positions);
    if (n_out > 0 && n_in == 0) {
      result.zero_();
    } else if (n_out > 0 && !spatial_as_gemm(g)) {
      result = open_channel_conv<T>(x, b, weight, std::nullopt, in_gate_row, g, grp, in_list, n_in, out_list,
                                    n_out, ws)
                   .view({-1, positions});
    } else if (n_out > 0) {
      const bool every_input = n_in == cin_g;
      at::Tensor cols;
      if (g.is_pointwise() && every_input) {
        cols = x[b].view({g.in_channels, positions}).narrow(0, grp * cin_g, cin_g);
      } else {
        cols = Workspace::matrix(ws.cols, n_in * kk, positions);
        im2col_channels(x_b + grp * cin_g * g.in_h * g.in_w, in_list, n_in, g, cols.data_ptr<T>());
      }
      at::Tensor w_open;
      if (every_input && n_out == cout_g && in_gate_row == nullptr) {
        w_open = weight.view({g.out_channels, cin_g * kk}).narrow(0, grp * cout_g, cout_g);
      } else {
        w_open = Workspace::matrix(ws.weight, n_out, n_in * kk);
        gather_weight(w, g, grp, out_list, n_out, in_list, n_in, in_gate_row, w_open.data_ptr<T>(), n_in * kk);
      }
      mm_into(w_open, cols, result);
    }
    // Epilogue: bias, out_gate, and zeros for the closed outputs.
    const T* res = result.data_ptr<T>();
    parallel_rows(cout_g, positions, [&](int64_t c0, int64_t c1) {
      // out_list is sorted: find the first open output at or after c0.
      int64_t o = std::lower_bound(out_list, out_list + n_out, c0) - out_list;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t co = grp * cout_g + c;
        T* y_row = y_b != nullptr ? y_b + co * positions : nullptr;
        if (o < n_out && out_list[o] == c) {
          const T* r = res + o * positions;
          const acc_t bv = bias != nullptr ? static_cast<acc_t>(bias[co]) : acc_t(0);
          const acc_t gate = out_gate_row != nullptr ? static_cast<acc_t>(out_gate_row[co]) : acc_t(1);
          // Computed only for its ungated value: the gated output stays exactly 0.
          const bool closed = !gate_is_open(gate);
          T* u_row = ungated_b != nullptr ? ungated_b + co * positions : nullptr;
          for (int64_t p = 0; p < positions; ++p) {
            const T z = static_cast<T>(static_cast<acc_t>(r[p]) + bv);
            if (u_row != nullptr) u_row[p] = z;
            if (y_row != nullptr) y_row[p] = closed ? T(0) : static_cast<T>(static_cast<acc_t>(z) * gate);
          }
          ++o;
        } else if (y_row != nullptr) {
          std::fill(y_row, y_row + positions, T(0));
        }
      }
    });
  }
}

// --- float32 forward through the indirect GEMM (cpu/indirect_gemm.h) -------------------------------

// The open output channels [c0, c1) of one example as rows of the indirect GEMM: weight row,
// destination (plane c of y_b, `plane` floats apart), bias and out_gate scale. A closed channel is
// never computed: its `closed_len` destination floats are written as exactly 0.
struct OpenOutputRows {
  std::vector<const float*> weight;
  std::vector<float*> dst;
  std::vector<float> bias, scale;

  void collect(int64_t c0, int64_t c1, const float* w, int64_t row_len, const float* bias_p,
               const float* out_gate, float* y_b, int64_t plane, int64_t closed_len) {
    weight.clear(), dst.clear(), bias.clear(), scale.clear();
    for (int64_t c = c0; c < c1; ++c) {
      if (out_gate != nullptr && !gate_is_open(out_gate[c])) {
        std::fill(y_b + c * plane, y_b + c * plane + closed_len, 0.0f);
        continue;
      }
      weight.push_back(w + c * row_len);
      dst.push_back(y_b + c * plane);
      bias.push_back(bias_p ? bias_p[c] : 0.0f);
      scale.push_back(out_gate ? out_gate[c] : 1.0f);
    }
  }
  bool empty() const { return weight.empty(); }
  cpu::IndirectRows rows() const {
    return {weight.data(), dst.data(), bias.data(), scale.data(), static_cast<int64_t>(weight.size())};
  }
};

// Every example's open input channels, and where each one's taps start in a weight row (the
// indirect GEMM's `chan`).
struct OpenInputs {
  std::vector<OpenChannels> channels;
  std::vector<std::vector<int32_t>> offsets;

  OpenInputs(const float* in_gate, const ConvGeometry& g) : channels(g.batch), offsets(g.batch) {
    const int64_t cin = g.in_channels, kk = g.kernel_h * g.kernel_w;
    for (int64_t b = 0; b < g.batch; ++b) {
      channels[b].build(in_gate ? in_gate + b * cin : nullptr, cin, 1);
      offsets[b].resize(channels[b].count(0));
      for (int64_t i = 0; i < channels[b].count(0); ++i)
        offsets[b][i] = static_cast<int32_t>(channels[b].of(0)[i] * kk);
    }
  }
  int64_t count(int64_t b) const { return channels[b].count(0); }
  const int64_t* of(int64_t b) const { return channels[b].of(0); }
  const int32_t* chan(int64_t b) const { return offsets[b].data(); }
};

// Output planes of at most this many pixels take the indirect GEMM for float32 (when the CPU has
// AVX-512): it beat the oneDNN/MKL path on 7x7 and 14x14 planes; at 28x28 the two were even at
// density 0.5 and oneDNN won at 0.75 (128 channels, batch 8).
// CONDKERNELS_GATED_INDIRECT_POSITIONS overrides it (0: never) for measurements and tests.
constexpr int64_t kIndirectMaxPositions = 256;

int64_t indirect_max_positions() {
  const char* env = std::getenv("CONDKERNELS_GATED_INDIRECT_POSITIONS");
  return env != nullptr ? static_cast<int64_t>(std::atoll(env)) : kIndirectMaxPositions;
}

// Without an in_gate, on planes from 8x8, oneDNN per example stays: its filters are whole rows,
// copied as they lie, and it beat the indirect GEMM there (256 @ 14x14, output gate only, density
// 0.5, batch 1 to 32); with an in_gate, or on smaller planes, the indirect GEMM won.
bool use_indirect(const at::Tensor& x, const ConvGeometry& g, bool with_ungated, bool has_in_gate) {
  const int64_t positions = g.out_h * g.out_w;
  return x.scalar_type() == at::kFloat && g.groups == 1 && !with_ungated && !g.is_pointwise() &&
         positions <= indirect_max_positions() && (has_in_gate || positions < kSmallPlane) &&
         g.in_channels * g.kernel_h * g.kernel_w < (int64_t(1) << 31) && cpu::indirect_gemm_kernel() != nullptr;
}

// Examples are taken in runs whose im2col fits in about this many bytes, so that each thread's
// share of the weight rows is read from memory once per run and the run's columns stay in cache.
constexpr int64_t kIndirectRunBytes = int64_t(1) << 20;

int64_t indirect_run_bytes() {
  const char* env = std::getenv("CONDKERNELS_GATED_INDIRECT_RUN_BYTES");
  return env != nullptr ? static_cast<int64_t>(std::atoll(env)) : kIndirectRunBytes;
}

// Each thread walks its output channels this many at a time through every example of the run, so
// that the open pieces of those weight rows are read from memory once and from cache for the rest
// of the run (a multiple of the 6 and 8 row blocks of the kernel).
constexpr int64_t kIndirectRowChunk = 48;

int64_t indirect_row_chunk() {
  const char* env = std::getenv("CONDKERNELS_GATED_INDIRECT_ROW_CHUNK");
  return env != nullptr ? std::max<int64_t>(1, std::atoll(env)) : kIndirectRowChunk;
}

// y = out_gate * (conv(in_gate * x) + bias) for float32, groups == 1, NCHW contiguous x and y.
// Examples are taken in runs: (1) each example's im2col of its open input channels (in_gate folded
// in), rows padded to whole vectors, and the offsets of those channels in a weight row; (2) chunk of
// output rows by chunk of rows, the open outputs of every example of the run through the indirect
// GEMM, which reads the weight rows in place (no gather, no reorder) and writes y directly, bias and
// out_gate included. With at least two examples per thread, each thread takes its own examples (one
// parallel region: on a busy machine every extra region waits for its slowest thread); with fewer,
// the threads split the im2col rows and then the output channels of every run.
void indirect_forward(const at::Tensor& x, const at::Tensor& weight, const float* bias, const float* in_gate,
                      const float* out_gate, const ConvGeometry& g, float* y) {
  const int64_t cin = g.in_channels, cout = g.out_channels, kk = g.kernel_h * g.kernel_w;
  const int64_t positions = g.out_h * g.out_w, plane = g.in_h * g.in_w;
  const int64_t ld = round_up(positions, 16);
  const float* x_p = x.data_ptr<float>();
  const float* w_p = weight.data_ptr<float>();
  const OpenInputs ins(in_gate, g);
  const int64_t run_bytes = indirect_run_bytes();
  const int64_t row_chunk = indirect_row_chunk();
  const cpu::IndirectGemm gemm = cpu::indirect_gemm_kernel();

  // Examples [e0, e1), run by run; `split` spreads each run's work over the threads.
  auto examples = [&](int64_t e0, int64_t e1, bool split) {
    cpu::ScratchPool& pool = cpu::ScratchPool::of_this_thread();
    std::vector<int64_t> offset;  // each example's first column row in the run's buffer
    for (int64_t b0 = e0; b0 < e1;) {
      // The run: at least one example, then as many as fit in run_bytes.
      int64_t b1 = b0, rows = 0;
      offset.clear();
      do {
        offset.push_back(rows);
        rows += ins.count(b1) * kk;
        ++b1;
      } while (b1 < e1 && (rows + ins.count(b1) * kk) * ld * 4 <= run_bytes);
      float* cols = static_cast<float*>(
          pool.get(kIndirectColsSlot, std::max<int64_t>(rows, 1) * ld * 4));
      auto columns_of = [&](int64_t c0, int64_t c1) {
        for (int64_t b = c0; b < c1; ++b)
          im2col_channels(x_p + b * cin * plane, ins.of(b), ins.count(b), g, cols + offset[b - b0] * ld, ld,
                          in_gate ? in_gate + b * cin : nullptr);
      };
      // A single example splits its im2col rows across the threads instead.
      if (split && b1 - b0 > 1) at::parallel_for(b0, b1, 1, columns_of);
      else columns_of(b0, b1);
      auto outputs_of = [&](int64_t c0, int64_t c1) {
        OpenOutputRows open;
        for (int64_t r0 = c0; r0 < c1; r0 += row_chunk) {
          for (int64_t b = b0; b < b1; ++b) {
            open.collect(r0, std::min(c1, r0 + row_chunk), w_p, cin * kk, bias,
                         out_gate ? out_gate + b * cout : nullptr, y + b * cout * positions, positions, positions);
            if (open.empty()) continue;
            const cpu::IndirectRows out = open.rows();
            const auto in = cpu::IndirectCols::im2col(ins.chan(b), ins.count(b), g.kernel_h, g.kernel_w,
                                                      cols + offset[b - b0] * ld, ld);
            gemm(out, in, positions);
          }
        }
      };
      if (split) at::parallel_for(0, cout, 16, outputs_of);
      else outputs_of(0, cout);
      b0 = b1;
    }
  };
  if (g.batch >= 2 * at::get_num_threads()) {
    at::parallel_for(0, g.batch, 1, [&](int64_t e0, int64_t e1) { examples(e0, e1, /*split=*/false); });
  } else {
    examples(0, g.batch, /*split=*/true);
  }
}

// --- float32 forward on zero-padded planes --------------------------------------------------------

// Which planes take padded_forward (float32, AVX-512 or AVX2), from `python -m
// condkernels.bench --suite gated --full --paths` (`compacted padded=0|1`) on a 2-core Intel Xeon
// (AVX-512): at batch 1 it beat the oneDNN/im2col paths on 14x14 to 56x56 planes at every density
// (64 @ 56x56, density 0.5: 0.49-0.55 ms against 0.62-0.64; 256 @ 14x14: 0.55-0.56 against
// 0.58-0.67) and lost on 7x7 (512 channels, 0.84-0.88 against 0.66-0.78: the 2 dropped columns of 9
// cost more than the im2col there); at batch 32 it won on 7x7 and 14x14 (512 @ 7x7, output gate,
// density 0.25: 9.3 ms against 12.9) and tied oneDNN per example on the larger planes (within 10%
// either way). Strided layers take the same limits: the full grid's stride-2 rows (ResNet's
// downsampling convolutions, `--suite gated --full --filter "stride 2"`, 2-core AMD EPYC, AVX2) met
// the density target on 47 of 48 rows, at density 0.5 0.37-0.53x the dense convolution + masks at
// batch 1 and 0.24-0.60x at batch 32. Without an in_gate the im2col holds every input channel nine
// times whatever the density, and at batch 1 the padded planes won from 7x7 as well (one-off, 2-core
// AMD EPYC with AVX-512, one thread, output gate, the two paths alternated in one process, ms,
// padded / im2col: 512 @ 7x7 0.71 / 0.84 at density 0.25, 1.38 / 1.50 at 0.5, 2.84 / 2.86 at 1;
// 256->512 stride 2 to 7x7 0.39 / 0.43 at 0.25, 1.29 / 1.43 at 1); the 7x7 loss above is kept where
// an in_gate shrinks the im2col (on that EPYC too: 512 @ 7x7, in_gate 0.5, 2 threads, 0.88 / 0.82).
// On the Intel Xeon the im2col kept winning on 7x7 without an in_gate (same one-off alternation, 2
// threads, output gate, two runs each: 512 @ 7x7 4.3-4.6 / 3.0-3.3 at density 1, 1.08 / 0.91 and
// 0.84 / 1.18 at 0.25; 256->512 stride 2 2.4-2.8 / 1.5-1.8 at 1, 0.93 / 0.75 and 0.54 / 0.45 at
// 0.25), so there the limit for batch 1 stays kPaddedMinPositions.
// CONDKERNELS_GATED_PADDED_POSITIONS replaces every limit (a huge value: never; 0: wherever it
// applies) for measurements and tests.
constexpr int64_t kPaddedMinPositions = 100;
constexpr int64_t kPaddedMinPositionsBatched = 49;
constexpr int64_t kPaddedMinPositionsUngatedInputsAmd = 49;

bool use_padded(const at::Tensor& x, const ConvGeometry& g, bool with_ungated, bool has_in_gate) {
  const char* env = std::getenv("CONDKERNELS_GATED_PADDED_POSITIONS");
  const int64_t positions = g.out_h * g.out_w;
  const int64_t min_positions = g.batch > 1      ? kPaddedMinPositionsBatched
                                : !has_in_gate && cpu::cpu_is_amd() ? kPaddedMinPositionsUngatedInputsAmd
                                                                    : kPaddedMinPositions;
  const bool large_enough = env != nullptr ? positions >= std::atoll(env) : positions >= min_positions;
  return large_enough && x.scalar_type() == at::kFloat && g.groups == 1 && !with_ungated && !g.is_pointwise() &&
         g.in_channels * g.kernel_h * g.kernel_w < (int64_t(1) << 31) &&
         cpu::indirect_gemm_kernel() != nullptr;
}

// Output rows per tile: about this many pixels of the padded width, so that a tile's slice of the
// planes and its block of results stay in the core's L2 cache.
constexpr int64_t kPaddedTilePixels = 256;

// With fewer than two examples per thread, the tiles are cut into about this many pieces per thread
// (output-channel chunks of a tile), which the threads claim as they go.
constexpr int64_t kPaddedItemsPerThread = 4;

// y = out_gate * (conv(in_gate * x) + bias) for float32, groups == 1, NCHW contiguous x and y,
// without im2col: the example's open input channels are copied once into zero-padded planes of
// width wp (in_gate folded in), and output pixel (oh, ow), counted as q = oh * wp + ow along the
// padded width, reads tap (kh, kw) of a plane at q + kh * dilation_h * wp + kw * dilation_w. So the
// pixels of one tap are the plane itself, shifted, and the indirect GEMM reads them in place; the
// (wp - out_w) columns past each output row are computed and dropped (2 of 58 on 56x56) as the
// results are stored. With a stride s, each padded plane is stored as its s_h * s_w phases (the
// pixels of rows = a mod s_h and columns = b mod s_w, planes of wq = ceil(wp / s_w) columns): a tap
// reads one phase, shifted by (kh * dilation_h) / s_h rows and (kw * dilation_w) / s_w columns, at
// q = oh * wq + ow, so the strided layer is the same stride-1 product with a table of tap offsets.
// The threads claim whole examples, or with few examples tiles of whole output rows (times chunks
// of output channels), as they go; each writes its open channels' rows of y, and zeros for closed ones.
void padded_forward(const at::Tensor& x, const at::Tensor& weight, const float* bias, const float* in_gate,
                    const float* out_gate, const ConvGeometry& g, float* y) {
  const int64_t cin = g.in_channels, cout = g.out_channels, kk = g.kernel_h * g.kernel_w;
  const int64_t positions = g.out_h * g.out_w, plane = g.in_h * g.in_w;
  const int64_t hp = g.in_h + g.pad_h_begin + g.pad_h_end, wp = g.in_w + g.pad_w_begin + g.pad_w_end;
  const int64_t sh = g.stride_h, sw = g.stride_w, hq = (hp + sh - 1) / sh, wq = (wp + sw - 1) / sw;
  // The last vector of the last tile reads up to 15 pixels past the phase's last output row.
  const int64_t phase_stride = round_up(hq * wq + 16 + (g.kernel_w - 1) * g.dilation_w / sw, 16);
  const int64_t plane_stride = sh * sw * phase_stride;
  std::vector<int64_t> tap_offset(kk);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t rh = kh * g.dilation_h, rw = kw * g.dilation_w;
      tap_offset[kh * g.kernel_w + kw] = ((rh % sh) * sw + rw % sw) * phase_stride + rh / sh * wq + rw / sw;
    }
  }
  const bool strided = sh > 1 || sw > 1;
  const int threads = at::get_num_threads();
  // Tiles of equal rows, as many as the threads can share evenly when the examples are few.
  int64_t tiles = (g.out_h * wq + kPaddedTilePixels - 1) / kPaddedTilePixels;
  if (g.batch < threads) tiles = round_up(tiles, threads / g.batch);
  const int64_t tile_rows = (g.out_h + std::min(tiles, g.out_h) - 1) / std::min(tiles, g.out_h);
  tiles = (g.out_h + tile_rows - 1) / tile_rows;
  const float* x_p = x.data_ptr<float>();
  const float* w_p = weight.data_ptr<float>();

  const OpenInputs ins(in_gate, g);

  // Open channels [i0, i1) of example b into their padded planes (or phases); only pixels read from
  // x are scaled, so the padding stays 0 even for a NaN or infinite gate. Each plane is zeroed as a
  // whole, then its rows are filled.
  auto pad_planes = [&](int64_t b, int64_t i0, int64_t i1, float* planes) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t c = ins.of(b)[i];
      const float* src = x_p + (b * cin + c) * plane;
      const float s = in_gate ? in_gate[b * cin + c] : 1.0f;
      std::memset(planes + i * plane_stride, 0, plane_stride * sizeof(float));
      for (int64_t phase_h = 0; phase_h < sh; ++phase_h) {
        // Phase rows [r0, r1) hold input rows (r * sh + phase_h - pad_h_begin), columns [j0, j1)
        // input columns (j * sw + phase_w - pad_w_begin).
        const int64_t first_row = phase_h - g.pad_h_begin;
        const int64_t r0 = std::min(hq, first_row >= 0 ? 0 : (-first_row + sh - 1) / sh);
        const int64_t r1 = std::max(r0, std::min(hq, (g.in_h - first_row + sh - 1) / sh));
        for (int64_t phase_w = 0; phase_w < sw; ++phase_w) {
          float* dst = planes + i * plane_stride + (phase_h * sw + phase_w) * phase_stride;
          const int64_t first_col = phase_w - g.pad_w_begin;
          const int64_t j0 = std::min(wq, first_col >= 0 ? 0 : (-first_col + sw - 1) / sw);
          const int64_t j1 = std::max(j0, std::min(wq, (g.in_w - first_col + sw - 1) / sw));
          for (int64_t r = r0; r < r1; ++r) {
            float* row = dst + r * wq;
            const float* in_row = src + (r * sh + first_row) * g.in_w + first_col;
            if (sw == 1) {
              for (int64_t j = j0; j < j1; ++j) row[j] = in_row[j] * s;
            } else {
              for (int64_t j = j0; j < j1; ++j) row[j] = in_row[j * sw] * s;
            }
          }
        }
      }
    }
  };

  // The tile's pixels run along the padded (phase) width wq; of each 8 of them, those that are
  // outputs (ow < out_w) are stored, packed, at their place in y. Every tile starts at an output
  // row, so one pattern serves all (it runs to a whole 16-pixel vector past the tile).
  constexpr int64_t kOctet = cpu::kCompactPixels;
  const int64_t tile_octets = round_up(tile_rows * wq, 16) / kOctet;
  std::vector<int64_t> compact_offset(tile_octets);
  std::vector<uint8_t> compact_mask(tile_octets);
  for (int64_t j = 0; j < tile_octets; ++j) {
    const int64_t q = kOctet * j;
    compact_offset[j] = q / wq * g.out_w + std::min(q % wq, g.out_w);
    uint8_t mask = 0;
    for (int64_t lane = 0; lane < kOctet; ++lane)
      if ((q + lane) % wq < g.out_w) mask |= static_cast<uint8_t>(1u << lane);
    compact_mask[j] = mask;
  }
  const cpu::IndirectGemm gemm = cpu::indirect_gemm_kernel();

  // Output channels [c0, c1) of tile `tile` of example b, from its padded planes, into y.
  auto compute_tile = [&](int64_t b, int64_t tile, int64_t c0, int64_t c1, const float* planes) {
    const int64_t oh0 = tile * tile_rows, rows = std::min(tile_rows, g.out_h - oh0);
    const float* og = out_gate ? out_gate + b * cout : nullptr;
    OpenOutputRows open;
    open.collect(c0, c1, w_p, cin * kk, bias, og, y + b * cout * positions + oh0 * g.out_w, positions,
                 rows * g.out_w);
    if (open.empty()) return;
    cpu::IndirectRows out = open.rows();
    out.compact_offset = compact_offset.data();
    out.compact_mask = compact_mask.data();
    const cpu::IndirectCols in{ins.chan(b), ins.count(b), g.kernel_h, g.kernel_w,
                               planes + oh0 * wq, plane_stride, g.dilation_h * wp, g.dilation_w,
                               strided ? tap_offset.data() : nullptr};
    gemm(out, in, rows * wq);
  };

  if (g.batch >= 2 * threads) {  // whole examples, claimed by the threads, padded in the thread's own buffer
    cpu::for_each_claimed(g.batch, [&](int64_t b) {
      float* planes = static_cast<float*>(cpu::ScratchPool::of_this_thread().get(
          kIndirectColsSlot, static_cast<size_t>(std::max<int64_t>(ins.count(b), 1) * plane_stride) * 4));
      pad_planes(b, 0, ins.count(b), planes);
      for (int64_t tile = 0; tile < tiles; ++tile) compute_tile(b, tile, 0, cout, planes);
    });
    return;
  }
  // Few examples: pad them all (channels across the threads), then split tiles and channel chunks.
  std::vector<int64_t> first(g.batch + 1, 0);  // example b's planes start at plane first[b]
  for (int64_t b = 0; b < g.batch; ++b) first[b + 1] = first[b] + ins.count(b);
  float* planes = static_cast<float*>(cpu::ScratchPool::of_this_thread().get(
      kIndirectColsSlot, static_cast<size_t>(std::max<int64_t>(first[g.batch], 1) * plane_stride) * 4));
  at::parallel_for(0, first[g.batch], 1, [&](int64_t p0, int64_t p1) {
    for (int64_t b = 0; b < g.batch; ++b) {
      const int64_t i0 = std::max(p0, first[b]) - first[b], i1 = std::min(p1, first[b + 1]) - first[b];
      if (i0 < i1) pad_planes(b, i0, i1, planes + first[b] * plane_stride);
    }
  });
  const int64_t want = kPaddedItemsPerThread * threads;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((want + g.batch * tiles - 1) / (g.batch * tiles),
                                                                (cout + 15) / 16));
  const int64_t chunk = round_up((cout + chunks - 1) / chunks, 8);
  const int64_t per_example = tiles * chunks;
  cpu::for_each_claimed(g.batch * per_example, [&](int64_t i) {
    const int64_t b = i / per_example, tile = (i % per_example) / chunks, k = i % chunks;
    compute_tile(b, tile, k * chunk, std::min(cout, (k + 1) * chunk), planes + first[b] * plane_stride);
  });
}

at::Tensor channel_scale(const at::Tensor& gate) { return gate.view({gate.size(0), gate.size(1), 1, 1}); }

// t * gate per channel, exactly 0 where the gate is closed (as the compacted path, which never
// reads a closed channel, so inf/NaN there do not leak). The (B, C) gate is checked first: without
// a closed channel one multiply does, where the masked form costs three passes over t.
at::Tensor gated(const at::Tensor& t, const at::Tensor& gate) {
  const at::Tensor scale = channel_scale(gate);
  if (!(gate == 0).any().item<bool>()) return t * scale;
  return at::where(scale == 0, at::zeros({}, t.options()), t * scale);
}

// The dense formulation, for gates open enough that oneDNN's convolution beats the compaction.
at::Tensor dense_ungated(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_gate,
                         const ConvGeometry& g, c10::IntArrayRef stride, c10::IntArrayRef dilation) {
  const at::Tensor x_gated = in_gate ? gated(x, *in_gate) : x;
  return at::conv2d(cpu::pad_if_asymmetric(x_gated, g), weight, bias, stride, cpu::symmetric_padding(g),
                    dilation, g.groups);
}

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Forward of both schemas; `with_ungated` computes every output channel and returns it ungated too.
std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                const std::optional<at::Tensor>& bias_in,
                                                const std::optional<at::Tensor>& in_gate_in,
                                                const std::optional<at::Tensor>& out_gate_in,
                                                c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                c10::IntArrayRef dilation, int64_t groups,
                                                bool with_ungated) {
  const ConvGeometry g = check_gated_conv2d_args(x_in, weight_in, bias_in, in_gate_in, out_gate_in,
                                                 stride, padding, dilation, groups);
  const auto memory_format = x_in.suggest_memory_format();
  const auto out_options = x_in.options().memory_format(memory_format);
  if (g.batch == 0) {
    const std::vector<int64_t> shape{0, g.out_channels, g.out_h, g.out_w};
    return {at::empty(shape, out_options), with_ungated ? at::empty(shape, out_options) : at::Tensor()};
  }
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const auto bias = contiguous(bias_in), in_gate = contiguous(in_gate_in), out_gate = contiguous(out_gate_in);

  double fraction = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_conv2d_cpu", [&] {
    fraction = work_fraction(optional_data<scalar_t>(in_gate),
                             with_ungated ? nullptr : optional_data<scalar_t>(out_gate), g);
  });
  const bool padded = use_padded(x, g, with_ungated, in_gate.has_value());
  const bool indirect = !padded && use_indirect(x, g, with_ungated, in_gate.has_value());
  ForwardKernel kernel = ForwardKernel::kOther;
  if (padded) kernel = ForwardKernel::kPadded;
  else if (indirect) kernel = ForwardKernel::kIndirect;
  else if (x.scalar_type() == at::kFloat && g.groups == 1) kernel = ForwardKernel::kFloat32;
  if (fraction > dense_above_work_fraction(g, /*backward=*/false, kernel)) {
    at::Tensor z = dense_ungated(x_in, weight, bias, in_gate, g, stride, dilation).contiguous(memory_format);
    if (!out_gate) return {with_ungated ? z.clone() : z, with_ungated ? z : at::Tensor()};
    return {gated(z, *out_gate).contiguous(memory_format), with_ungated ? z : at::Tensor()};
  }

  if (padded) {
    at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
    padded_forward(x, weight, optional_data<float>(bias), optional_data<float>(in_gate),
                   optional_data<float>(out_gate), g, y.data_ptr<float>());
    return {y.contiguous(memory_format), at::Tensor()};
  }
  if (indirect) {
    at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options());
    indirect_forward(x, weight, optional_data<float>(bias), optional_data<float>(in_gate),
                     optional_data<float>(out_gate), g, y.data_ptr<float>());
    return {y.contiguous(memory_format), at::Tensor()};
  }

  // One example, one group, no output gate: oneDNN's result, bias included, is y itself, with
  // no epilogue copy. (float/double only: half types would round before the bias, as the
  // epilogue does, not after it.)
  const bool result_is_y = g.batch == 1 && g.groups == 1 && !spatial_as_gemm(g) && !with_ungated && !out_gate &&
                           (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
  if (result_is_y) {
    at::Tensor y;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "gated_conv2d_cpu", [&] {
      const scalar_t* in_gate_p = optional_data<scalar_t>(in_gate);
      OpenChannels ins, outs;
      ins.build(in_gate_p, g.in_channels, 1);
      if (ins.count(0) == 0) return;  // no open input: bias only, left to the general path
      outs.build(static_cast<const scalar_t*>(nullptr), g.out_channels, 1);
      at::AutoDispatchBelowAutograd below_autograd;
      Workspace ws(g, x.options(), /*backward=*/false);
      y = open_channel_conv<scalar_t>(x, 0, weight, bias, in_gate_p, g, 0, ins.of(0), ins.count(0), outs.of(0),
                                      outs.count(0), ws);
    });
    if (y.defined()) return {y.contiguous(memory_format), at::Tensor()};
  }

  const std::vector<int64_t> shape{g.batch, g.out_channels, g.out_h, g.out_w};
  at::Tensor y = at::empty(shape, x.options());
  at::Tensor ungated = with_ungated ? at::empty(shape, x.options()) : at::Tensor();
  const int64_t out_numel = g.out_channels * g.out_h * g.out_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_conv2d_cpu", [&] {
    const scalar_t* bias_p = optional_data<scalar_t>(bias);
    const scalar_t* in_gate_p = optional_data<scalar_t>(in_gate);
    const scalar_t* out_gate_p = optional_data<scalar_t>(out_gate);
    scalar_t* y_p = y.data_ptr<scalar_t>();
    scalar_t* u_p = with_ungated ? ungated.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
      // Worker threads do not inherit the caller's dispatch state: keep the buffers' GEMMs out of
      // autograd here too.
      at::AutoDispatchBelowAutograd below_autograd;
      Workspace ws(g, x.options(), /*backward=*/false);
      OpenChannels ins, outs;
      for (int64_t b = b0; b < b1; ++b) {
        forward_example<scalar_t>(x, b, weight, bias_p,
                                  in_gate_p ? in_gate_p + b * g.in_channels : nullptr,
                                  out_gate_p ? out_gate_p + b * g.out_channels : nullptr, g, ws, ins,
                                  outs, y_p + b * out_numel, u_p ? u_p + b * out_numel : nullptr);
      }
    });
  });
  return {y.contiguous(memory_format), with_ungated ? ungated.contiguous(memory_format) : at::Tensor()};
}

at::Tensor gated_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& in_gate,
                            const std::optional<at::Tensor>& out_gate, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return std::get<0>(forward_impl(x, weight, bias, in_gate, out_gate, stride, padding, dilation,
                                  groups, /*with_ungated=*/false));
}

std::tuple<at::Tensor, at::Tensor> gated_conv2d_with_ungated_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& in_gate, const std::optional<at::Tensor>& out_gate,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return forward_impl(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups,
                      /*with_ungated=*/true);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward of the dense formulation, for gates open enough that oneDNN wins.
Grads dense_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& in_gate,
                     const std::optional<at::Tensor>& out_gate, const std::optional<at::Tensor>& ungated,
                     const ConvGeometry& g, c10::IntArrayRef stride, c10::IntArrayRef dilation,
                     std::array<bool, 5> mask) {
  auto empty = [&] { return x.new_empty({0}); };
  const at::Tensor x_gated = in_gate ? gated(x, *in_gate) : x;
  const at::Tensor grad_ungated = out_gate ? grad_out * channel_scale(*out_gate) : grad_out;
  const at::Tensor x_padded = cpu::pad_if_asymmetric(x_gated, g);
  const bool need_input_grad = mask[0] || mask[3];
  const bool need_bias_grad = mask[2] && bias.has_value();
  auto [grad_x_gated, grad_weight, grad_bias] = at::convolution_backward(
      grad_ungated, x_padded, weight, std::vector<int64_t>{g.out_channels}, stride,
      cpu::symmetric_padding(g), dilation, false, {0, 0}, g.groups,
      {need_input_grad, mask[1], need_bias_grad});
  at::Tensor gx = empty(), gw = mask[1] ? grad_weight : empty(), gb = need_bias_grad ? grad_bias : empty();
  at::Tensor gig = empty(), gog = empty();
  if (need_input_grad) {
    if (x_padded.size(2) != g.in_h || x_padded.size(3) != g.in_w)
      grad_x_gated = grad_x_gated.slice(2, g.pad_h_begin, g.pad_h_begin + g.in_h)
                         .slice(3, g.pad_w_begin, g.pad_w_begin + g.in_w);
    if (mask[0]) gx = (in_gate ? grad_x_gated * channel_scale(*in_gate) : grad_x_gated.clone())
                          .contiguous(x.suggest_memory_format());
    if (mask[3]) gig = (grad_x_gated * x).sum({2, 3});
  }
  if (mask[4]) {
    const at::Tensor z = ungated ? *ungated : dense_ungated(x, weight, bias, in_gate, g, stride, dilation);
    gog = (grad_out * z).sum({2, 3});
  }
  return {gx, gw, gb, gig, gog};
}

// mask = which gradients to compute: (x, weight, bias, in_gate, out_gate).
Grads gated_conv2d_backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                const at::Tensor& weight_in, const std::optional<at::Tensor>& bias_in,
                                const std::optional<at::Tensor>& in_gate_in,
                                const std::optional<at::Tensor>& out_gate_in,
                                const std::optional<at::Tensor>& ungated_in, c10::IntArrayRef stride,
                                c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                std::array<bool, 5> mask) {
  const ConvGeometry g = check_gated_conv2d_backward_args(grad_out_in, x_in, weight_in, bias_in,
                                                          in_gate_in, out_gate_in, ungated_in,
                                                          stride, padding, dilation, groups);
  auto empty = [&] { return x_in.new_empty({0}); };
  const bool need_x = mask[0], need_w = mask[1], need_b = mask[2] && bias_in.has_value();
  const bool need_ig = mask[3] && in_gate_in.has_value(), need_og = mask[4] && out_gate_in.has_value();
  if (g.batch == 0) {
    return {need_x ? at::zeros_like(x_in) : empty(), need_w ? at::zeros_like(weight_in) : empty(),
            need_b ? at::zeros_like(*bias_in) : empty(), need_ig ? at::zeros_like(*in_gate_in) : empty(),
            need_og ? at::zeros_like(*out_gate_in) : empty()};
  }
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), grad_out = grad_out_in.contiguous();
  const auto bias = contiguous(bias_in), in_gate = contiguous(in_gate_in), out_gate = contiguous(out_gate_in);
  const auto ungated = contiguous(ungated_in);

  double fraction = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_conv2d_backward_cpu", [&] {
    fraction = work_fraction(optional_data<scalar_t>(in_gate), optional_data<scalar_t>(out_gate), g);
  });
  if (fraction > dense_above_work_fraction(g, /*backward=*/true)) {
    return dense_backward(grad_out, x, weight, bias, in_gate, out_gate, ungated, g, stride, dilation,
                          {need_x, need_w, need_b, need_ig, need_og});
  }

  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t kk = g.kernel_h * g.kernel_w, positions = g.out_h * g.out_w, plane = g.in_h * g.in_w;
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const int64_t threads = at::get_num_threads();
  at::Tensor grad_x = need_x ? at::empty_like(x) : empty();
  at::Tensor grad_ig = need_ig ? at::empty_like(*in_gate) : empty();
  at::Tensor grad_og = need_og ? at::empty_like(*out_gate) : empty();
  // Weight and bias gradients sum over examples: one accumulator per thread, reduced at the end.
  at::Tensor acc_w = need_w ? at::zeros({threads, g.out_channels, cin_g * kk}, x.options().dtype(acc_dtype)) : empty();
  at::Tensor acc_b = need_b ? at::zeros({threads, g.out_channels}, x.options().dtype(acc_dtype)) : empty();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gated_conv2d_backward_cpu", [&] {
    using T = scalar_t;
    using acc_t = at::opmath_type<T>;
    const T* x_p = x.data_ptr<T>();
    const T* w_p = weight.data_ptr<T>();
    const T* go_p = grad_out.data_ptr<T>();
    const T* bias_p = optional_data<T>(bias);
    const T* ig_p = optional_data<T>(in_gate);
    const T* og_p = optional_data<T>(out_gate);
    const T* u_p = optional_data<T>(ungated);
    at::parallel_for(0, g.batch, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowAutograd below_autograd;
      Workspace ws(g, x.options(), /*backward=*/true);
      OpenChannels ins, outs, rows;
      const int64_t tid = at::get_thread_num();
      acc_t* acc_w_t = need_w ? acc_w.data_ptr<acc_t>() + tid * g.out_channels * cin_g * kk : nullptr;
      acc_t* acc_b_t = need_b ? acc_b.data_ptr<acc_t>() + tid * g.out_channels : nullptr;
      for (int64_t b = b0; b < b1; ++b) {
        const T* x_b = x_p + b * g.in_channels * plane;
        const T* go_b = go_p + b * g.out_channels * positions;
        const T* ig_row = ig_p ? ig_p + b * g.in_channels : nullptr;
        const T* og_row = og_p ? og_p + b * g.out_channels : nullptr;
        if (need_og) {
          // d out_gate = <grad_out, conv + bias> over the plane, for closed channels too.
          const T* z_b = u_p ? u_p + b * g.out_channels * positions : nullptr;
          if (z_b == nullptr) {
            T* scratch = ws.ungated.data_ptr<T>();
            forward_example<T>(x, b, weight, bias_p, ig_row, og_row, g, ws, ins, outs, nullptr, scratch);
            z_b = scratch;
          }
          T* gog_b = grad_og.data_ptr<T>() + b * g.out_channels;
          parallel_rows(g.out_channels, positions, [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
              acc_t s = 0;
              for (int64_t p = 0; p < positions; ++p)
                s += static_cast<acc_t>(go_b[c * positions + p]) * static_cast<acc_t>(z_b[c * positions + p]);
              gog_b[c] = static_cast<T>(s);
            }
          });
        }
        ins.build(ig_row, g.in_channels, g.groups);
        outs.build(og_row, g.out_channels, g.groups);
        // The input-side gradient is needed at every input channel only when in_gate learns.
        rows.build(need_ig ? nullptr : ig_row, g.in_channels, g.groups);
        for (int64_t grp = 0; grp < g.groups; ++grp) {
          const int64_t n_in = ins.count(grp), n_out = outs.count(grp), n_rows = rows.count(grp);
          const int64_t* in_list = ins.of(grp);
          const int64_t* out_list = outs.of(grp);
          const int64_t* row_list = rows.of(grp);
          const T* x_g = x_b + grp * cin_g * plane;
          // grad of the ungated output: grad_out * out_gate on the open outputs (closed ones are 0).
          at::Tensor grad_z;
          if (og_row == nullptr) {
            grad_z = grad_out[b].view({g.out_channels, positions}).narrow(0, grp * cout_g, cout_g);
          } else {
            grad_z = Workspace::matrix(ws.grad_rows, n_out, positions);
            T* gz = grad_z.data_ptr<T>();
            parallel_rows(n_out, positions, [&](int64_t o0, int64_t o1) {
              for (int64_t o = o0; o < o1; ++o) {
                const int64_t co = grp * cout_g + out_list[o];
                const acc_t gate = static_cast<acc_t>(og_row[co]);
                for (int64_t p = 0; p < positions; ++p)
                  gz[o * positions + p] = static_cast<T>(static_cast<acc_t>(go_b[co * positions + p]) * gate);
              }
            });
          }
          const T* gz_p = grad_z.data_ptr<T>();
          const int64_t gz_stride = grad_z.stride(0);
          if (need_b) {
            for (int64_t o = 0; o < n_out; ++o) {
              acc_t s = 0;
              for (int64_t p = 0; p < positions; ++p) s += static_cast<acc_t>(gz_p[o * gz_stride + p]);
              acc_b_t[grp * cout_g + out_list[o]] += s;
            }
          }
          if (need_x || need_ig) {
            acc_t* gxg = ws.acc_planes.data_ptr<acc_t>();
            std::fill(gxg, gxg + n_rows * plane, acc_t(0));
            if (n_out > 0 && n_rows > 0) {
              at::Tensor w_rows_t = Workspace::matrix(ws.weight, n_rows * kk, n_out);
              gather_weight_transposed<T>(w_p, g, grp, out_list, n_out, row_list, n_rows, w_rows_t.data_ptr<T>());
              at::Tensor grad_cols = Workspace::matrix(ws.grad_cols, n_rows * kk, positions);
              mm_into(w_rows_t, grad_z, grad_cols);
              col2im_channels(grad_cols.data_ptr<T>(), n_rows, g, gxg);
            }
            // Every channel of the group: rows get in_gate * grad, the others (closed, in_gate not
            // learning) get 0.
            parallel_rows(cin_g, plane, [&](int64_t c0, int64_t c1) {
              int64_t r = std::lower_bound(row_list, row_list + n_rows, c0) - row_list;
              for (int64_t c = c0; c < c1; ++c) {
                const int64_t ci = grp * cin_g + c;
                T* gx_row = need_x ? grad_x.data_ptr<T>() + (b * g.in_channels + ci) * plane : nullptr;
                if (r < n_rows && row_list[r] == c) {
                  const acc_t* src = gxg + r * plane;
                  if (need_ig) {
                    acc_t s = 0;
                    for (int64_t p = 0; p < plane; ++p) s += src[p] * static_cast<acc_t>(x_g[c * plane + p]);
                    grad_ig.data_ptr<T>()[b * g.in_channels + ci] = static_cast<T>(s);
                  }
                  if (gx_row != nullptr) {
                    const acc_t gate = ig_row != nullptr ? static_cast<acc_t>(ig_row[ci]) : acc_t(1);
                    for (int64_t p = 0; p < plane; ++p) gx_row[p] = static_cast<T>(src[p] * gate);
                  }
                  ++r;
                } else if (gx_row != nullptr) {
                  std::fill(gx_row, gx_row + plane, T(0));
                }
              }
            });
          }
          if (need_w && n_out > 0 && n_in > 0) {
            at::Tensor cols;
            if (g.is_pointwise() && n_in == cin_g) {
              cols = x[b].view({g.in_channels, positions}).narrow(0, grp * cin_g, cin_g);
            } else {
              cols = Workspace::matrix(ws.cols, n_in * kk, positions);
              im2col_channels(x_g, in_list, n_in, g, cols.data_ptr<T>());
            }
            // grad_weight^T over the open block = cols (n_in*kk x P) @ grad_z^T (P x n_out).
            at::Tensor grad_z_t = Workspace::matrix(ws.grad_rows_t, positions, n_out);
            grad_z_t.copy_(grad_z.t());
            at::Tensor grad_w_open_t = Workspace::matrix(ws.weight, n_in * kk, n_out);
            mm_into(cols, grad_z_t, grad_w_open_t);
            const T* gw = grad_w_open_t.data_ptr<T>();
            for (int64_t i = 0; i < n_in; ++i) {
              const acc_t gate = ig_row != nullptr ? static_cast<acc_t>(ig_row[grp * cin_g + in_list[i]]) : acc_t(1);
              for (int64_t o = 0; o < n_out; ++o) {
                acc_t* d = acc_w_t + ((grp * cout_g + out_list[o]) * cin_g + in_list[i]) * kk;
                for (int64_t k = 0; k < kk; ++k)
                  d[k] += static_cast<acc_t>(gw[(i * kk + k) * n_out + o]) * gate;
              }
            }
          }
        }
      }
    });
  });
  at::Tensor grad_w = need_w ? acc_w.sum(0).to(x.scalar_type()).view_as(weight) : empty();
  at::Tensor grad_b = need_b ? acc_b.sum(0).to(x.scalar_type()) : empty();
  if (need_x) grad_x = grad_x.contiguous(x_in.suggest_memory_format());
  return {grad_x, grad_w, grad_b, grad_ig, grad_og};
}

}  // namespace

TORCH_LIBRARY_IMPL(condkernels, CPU, m) {
  m.impl("gated_conv2d", &gated_conv2d_cpu);
  m.impl("_gated_conv2d_with_ungated", &gated_conv2d_with_ungated_cpu);
  m.impl("_gated_conv2d_backward", &gated_conv2d_backward_cpu);
}

}  // namespace condkernels
