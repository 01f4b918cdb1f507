// CUDA kernels of cond_conv2d: y[b] = conv2d(x[b], sum_e r[b,e] W_e, sum_e r[b,e] bias_e).
//
// Three paths (docs/cuda_kernels.md has the design and the memory traffic of each):
//   depthwise  -- a direct kernel; each block mixes its channels' k x k filters once into shared
//                 memory, the mixed weights never reach global memory;
//   1x1        -- a mixing kernel writes the B per-example (Cout, Cin) panels, cuBLAS runs them as
//                 one batched GEMM (at::bmm) straight into the output's memory;
//   k x k      -- a batched implicit GEMM: each block's weight tile is mixed from the E experts as
//                 it is loaded, its activation tile is gathered from x (im2col never exists).
// Backward: grad_x is the transposed convolution with the mixed weights on the same three paths;
// per-example weight gradients dW_b are reduced in the GEMM epilogue straight into
// dW_e += r[b,e] dW_b and dr[b,e] += <dW_b, W_e> (atomics into float/double accumulators), so the
// B x |W| tensor of dW_b is never stored; only the depthwise path, whose dW_b are C*k*k numbers per
// example, keeps them and reduces them with one GEMM.
//
// Every activation is addressed through its four strides, so NCHW and channels_last inputs are
// read in place; the GEMM paths switch their column order and thread layout to keep channels_last
// loads and stores coalesced.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "common/conv_index.h"
#include "ops/cond_conv2d.h"

namespace condkernels {
namespace {

// ------------------------------------------------------------------------------------------------
// Launch helpers

constexpr int kThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Channels adjacent in memory (NHWC-like): the kernels then make neighbouring threads walk channels.
bool channels_inner(const at::Tensor& t) { return t.size(1) > 1 && t.stride(1) == 1; }

// Runs `launch(grid, y_offset, z_offset)` over a (gx, gy, gz) grid, cutting y and z into pieces of
// at most 65535 blocks (the hardware limit); kernels add the offsets to blockIdx.
template <typename Launch>
void launch_grid(int64_t gx, int64_t gy, int64_t gz, Launch&& launch) {
  if (gx == 0 || gy == 0 || gz == 0) return;
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "cond_conv2d: problem too large for one launch");
  for (int64_t z0 = 0; z0 < gz; z0 += kMaxGridYZ) {
    for (int64_t y0 = 0; y0 < gy; y0 += kMaxGridYZ) {
      const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(std::min(kMaxGridYZ, gy - y0)),
                      static_cast<unsigned>(std::min(kMaxGridYZ, gz - z0)));
      launch(grid, y0, z0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

int64_t multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Sum over the block; the result is valid in thread 0. Every thread must call it.
template <typename T>
__device__ T block_sum(T v, T* scratch /* [kThreads / 32] */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return total;
}

// ------------------------------------------------------------------------------------------------
// Mixing kernel: mixed[b, j] = sum_e r[b, e] * experts[e, j] for a (B, E) x (E, N) product with tiny E.
// Each thread owns one column j and kMixExamples examples, so every expert element is read
// B / kMixExamples times; routing reads are warp-uniform broadcasts.

constexpr int kMixExamples = 8;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    mix_experts_kernel(const scalar_t* __restrict__ routing, const scalar_t* __restrict__ experts,
                       scalar_t* __restrict__ mixed, int64_t batch, int64_t num_experts, int64_t n,
                       int64_t y_offset) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b0 = (blockIdx.y + y_offset) * kMixExamples;
  if (j >= n) return;
  acc_t acc[kMixExamples];
#pragma unroll
  for (int i = 0; i < kMixExamples; ++i) acc[i] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    const acc_t w = static_cast<acc_t>(experts[e * n + j]);
#pragma unroll
    for (int i = 0; i < kMixExamples; ++i) {
      if (b0 + i < batch) acc[i] += static_cast<acc_t>(routing[(b0 + i) * num_experts + e]) * w;
    }
  }
#pragma unroll
  for (int i = 0; i < kMixExamples; ++i) {
    if (b0 + i < batch) mixed[(b0 + i) * n + j] = static_cast<scalar_t>(acc[i]);
  }
}

// (B, E) x (E, N) -> (B, N) in the dtype of the inputs, accumulated in acc_t.
at::Tensor mix_experts(const at::Tensor& routing, const at::Tensor& experts_2d) {
  const int64_t batch = routing.size(0), num_experts = routing.size(1), n = experts_2d.size(1);
  auto mixed = at::empty({batch, n}, experts_2d.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, routing.scalar_type(), "cond_conv2d_mix", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_grid(ceil_div(n, kThreads), ceil_div(batch, kMixExamples), 1, [&](dim3 grid, int64_t y0, int64_t) {
      mix_experts_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          routing.data_ptr<scalar_t>(), experts_2d.data_ptr<scalar_t>(), mixed.data_ptr<scalar_t>(), batch,
          num_experts, n, y0);
    });
  });
  return mixed;
}

// ------------------------------------------------------------------------------------------------
// Batched implicit GEMM: a 64 x 64 output tile per block, 16-deep reduction steps through shared
// memory, 4 x 4 accumulators per thread. Thread (row_lane, col_lane) owns rows row_lane + 16 i and
// columns col_lane + 16 j; which of the thread index's two halves is the row lane is chosen per
// launch so that neighbouring threads store neighbouring addresses (pixels for NCHW, channels for
// NHWC).

constexpr int kTileM = 64, kTileN = 64, kTileK = 16, kLanes = 16, kRegs = 4;
static_assert(kLanes * kLanes == kThreads && kLanes * kRegs == kTileM && kLanes * kRegs == kTileN);
constexpr int kTileLoads = kTileK * kTileM / kThreads;  // elements each thread loads per operand
static_assert(kTileM == kTileN);

template <typename acc_t>
struct TileSmem {
  acc_t a[kTileK][kTileM + 1];  // a[k][m]
  acc_t b[kTileK][kTileN + 1];  // b[k][n]
};

struct Lanes {
  int row, col;
};

__device__ __forceinline__ Lanes thread_lanes(bool rows_inner) {
  const int hi = threadIdx.x / kLanes, lo = threadIdx.x % kLanes;
  return rows_inner ? Lanes{lo, hi} : Lanes{hi, lo};
}

// Position (k, mn) inside a kTileK x 64 operand tile of the l-th element a thread block loads;
// k_inner makes neighbouring threads take neighbouring k.
struct TilePos {
  int k, mn;
};

__device__ __forceinline__ TilePos tile_pos(int l, bool k_inner) {
  return k_inner ? TilePos{l % kTileK, l / kTileK} : TilePos{l / kTileM, l % kTileM};
}

template <typename acc_t>
__device__ __forceinline__ void multiply_tile(const TileSmem<acc_t>& s, acc_t (&acc)[kRegs][kRegs],
                                              Lanes lanes) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    acc_t a[kRegs], b[kRegs];
#pragma unroll
    for (int i = 0; i < kRegs; ++i) a[i] = s.a[kk][lanes.row + kLanes * i];
#pragma unroll
    for (int j = 0; j < kRegs; ++j) b[j] = s.b[kk][lanes.col + kLanes * j];
#pragma unroll
    for (int i = 0; i < kRegs; ++i)
#pragma unroll
      for (int j = 0; j < kRegs; ++j) acc[i][j] += a[i] * b[j];
  }
}

// Sum over experts of r[e] * w[e * expert_stride]: one element of an example's mixed weights.
// r == nullptr means w already holds the example's mixed weights.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t mixed_weight(const scalar_t* __restrict__ r, const scalar_t* __restrict__ w,
                                              int64_t num_experts, int64_t expert_stride) {
  if (r == nullptr) return static_cast<acc_t>(w[0]);
  acc_t v = 0;
  for (int64_t e = 0; e < num_experts; ++e)
    v += static_cast<acc_t>(r[e]) * static_cast<acc_t>(w[e * expert_stride]);
  return v;
}

// Forward: for example b and group g, Y[co, p] = sum_f Wmix[co, f] * Xcol[f, p] over the group's
// output channels co, output pixels p and filter columns f = (ci, kh, kw).
// Weights (and bias) are either the E experts mixed with routing row b while the tile loads, or,
// with routing == nullptr, per-example weights mixed beforehand at weight + b * weight_example_stride.
// Grid: x = pixel tiles, y = (group, channel tile), z = example.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) forward_igemm_kernel(
    const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ routing,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, int64_t weight_example_stride,
    int64_t bias_example_stride, scalar_t* __restrict__ y, Strides4 ys, ConvGeometry g, int64_t num_experts,
    bool nhwc, int64_t y_offset, int64_t z_offset) {
  __shared__ TileSmem<acc_t> s;
  const int64_t b = blockIdx.z + z_offset;
  weight += b * weight_example_stride;
  if (bias) bias += b * bias_example_stride;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t columns = cin_g * g.kernel_h * g.kernel_w;  // reduction length
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t expert_stride = g.out_channels * columns;
  const GroupTile gt = group_tile(blockIdx.y + y_offset, cout_g, kTileM);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const scalar_t* r = routing ? routing + b * num_experts : nullptr;
  const Lanes lanes = thread_lanes(nhwc);

  acc_t acc[kRegs][kRegs] = {};
  for (int64_t k0 = 0; k0 < columns; k0 += kTileK) {
#pragma unroll
    for (int t = 0; t < kTileLoads; ++t) {  // A: the example's mixed weights, mixed while loaded
      const TilePos p = tile_pos(threadIdx.x + t * kThreads, /*k_inner=*/true);
      const int64_t m = gt.first + p.mn, f = k0 + p.k;
      acc_t v = 0;
      if (m < cout_g && f < columns) {
        const FilterTap tap = filter_tap(f, cin_g, g.kernel_h, g.kernel_w, nhwc);
        v = mixed_weight<scalar_t, acc_t>(
            r, weight + (gt.group * cout_g + m) * columns + filter_offset(tap, g.kernel_h, g.kernel_w),
            num_experts, expert_stride);
      }
      s.a[p.k][p.mn] = v;
    }
#pragma unroll
    for (int t = 0; t < kTileLoads; ++t) {  // B: im2col of x, gathered on the fly
      const TilePos p = tile_pos(threadIdx.x + t * kThreads, /*k_inner=*/nhwc);
      const int64_t n = n0 + p.mn, f = k0 + p.k;
      acc_t v = 0;
      if (n < pixels && f < columns) {
        const FilterTap tap = filter_tap(f, cin_g, g.kernel_h, g.kernel_w, nhwc);
        int64_t ih, iw;
        if (forward_tap_source(g, n / g.out_w, n % g.out_w, tap.kh, tap.kw, ih, iw))
          v = static_cast<acc_t>(x[xs.offset(b, gt.group * cin_g + tap.channel, ih, iw)]);
      }
      s.b[p.k][p.mn] = v;
    }
    __syncthreads();
    multiply_tile(s, acc, lanes);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRegs; ++i) {
    const int64_t m = gt.first + lanes.row + kLanes * i;
    if (m >= cout_g) continue;
    const int64_t co = gt.group * cout_g + m;
    const acc_t bias_v = bias ? mixed_weight<scalar_t, acc_t>(r, bias + co, num_experts, g.out_channels) : acc_t(0);
#pragma unroll
    for (int j = 0; j < kRegs; ++j) {
      const int64_t n = n0 + lanes.col + kLanes * j;
      if (n < pixels) y[ys.offset(b, co, n / g.out_w, n % g.out_w)] = static_cast<scalar_t>(acc[i][j] + bias_v);
    }
  }
}

// grad_x: for example b and group g, dX[ci, q] = sum_c Wmix[co, ci, kh, kw] * dY[co, src(q, kh, kw)]
// over input pixels q and columns c = (co, kh, kw) -- the transposed convolution; taps whose source
// output pixel does not exist (padding side, stride gaps) contribute zero.
// Weights come as in the forward kernel: mixed while loaded, or premixed when routing == nullptr.
// Grid: x = input-pixel tiles, y = (group, input-channel tile), z = example.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) grad_input_igemm_kernel(
    const scalar_t* __restrict__ grad_out, Strides4 gos, const scalar_t* __restrict__ routing,
    const scalar_t* __restrict__ weight, int64_t weight_example_stride, scalar_t* __restrict__ grad_x,
    Strides4 gxs, ConvGeometry g, int64_t num_experts, bool nhwc, int64_t y_offset, int64_t z_offset) {
  __shared__ TileSmem<acc_t> s;
  const int64_t b = blockIdx.z + z_offset;
  weight += b * weight_example_stride;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const int64_t filter_size = cin_g * taps;   // one output channel's weights
  const int64_t columns = cout_g * taps;      // reduction length
  const int64_t pixels = g.in_h * g.in_w;
  const int64_t expert_stride = g.out_channels * filter_size;
  const GroupTile gt = group_tile(blockIdx.y + y_offset, cin_g, kTileM);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  const scalar_t* r = routing ? routing + b * num_experts : nullptr;
  const Lanes lanes = thread_lanes(nhwc);

  acc_t acc[kRegs][kRegs] = {};
  for (int64_t k0 = 0; k0 < columns; k0 += kTileK) {
#pragma unroll
    for (int t = 0; t < kTileLoads; ++t) {  // A[ci][c]: mixed weights, transposed
      const TilePos p = tile_pos(threadIdx.x + t * kThreads, /*k_inner=*/true);
      const int64_t m = gt.first + p.mn, c = k0 + p.k;
      acc_t v = 0;
      if (m < cin_g && c < columns) {
        const FilterTap tap = filter_tap(c, cout_g, g.kernel_h, g.kernel_w, nhwc);
        const FilterTap w_tap{m, tap.kh, tap.kw};
        v = mixed_weight<scalar_t, acc_t>(
            r, weight + (gt.group * cout_g + tap.channel) * filter_size + filter_offset(w_tap, g.kernel_h, g.kernel_w),
            num_experts, expert_stride);
      }
      s.a[p.k][p.mn] = v;
    }
#pragma unroll
    for (int t = 0; t < kTileLoads; ++t) {  // B[c][q]: grad_out gathered through the inverse map
      const TilePos p = tile_pos(threadIdx.x + t * kThreads, /*k_inner=*/nhwc);
      const int64_t n = n0 + p.mn, c = k0 + p.k;
      acc_t v = 0;
      if (n < pixels && c < columns) {
        const FilterTap tap = filter_tap(c, cout_g, g.kernel_h, g.kernel_w, nhwc);
        int64_t oh, ow;
        if (transposed_tap_source(g, n / g.in_w, n % g.in_w, tap.kh, tap.kw, oh, ow))
          v = static_cast<acc_t>(grad_out[gos.offset(b, gt.group * cout_g + tap.channel, oh, ow)]);
      }
      s.b[p.k][p.mn] = v;
    }
    __syncthreads();
    multiply_tile(s, acc, lanes);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRegs; ++i) {
    const int64_t m = gt.first + lanes.row + kLanes * i;
    if (m >= cin_g) continue;
    const int64_t ci = gt.group * cin_g + m;
#pragma unroll
    for (int j = 0; j < kRegs; ++j) {
      const int64_t n = n0 + lanes.col + kLanes * j;
      if (n < pixels) grad_x[gxs.offset(b, ci, n / g.in_w, n % g.in_w)] = static_cast<scalar_t>(acc[i][j]);
    }
  }
}

// Weight gradients: for example b and group g, dW_b[co, f] = sum_p dY[co, p] * Xcol[f, p] over a
// slice of the output pixels (split-K: several blocks share one tile), then, in the epilogue,
//   grad_weight[e, co, f] += r[b, e] * dW_b[co, f]   and   grad_routing[b, e] += <dW_b, W_e>,
// both linear in the partial sums, so split-K and the reduction over the batch are plain atomics.
// grad_weight / grad_routing are acc_t buffers, zeroed by the caller; either may be null.
// Grid: x = filter-column tiles, y = (group, output-channel tile), z = (example, pixel slice).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) grad_weight_igemm_kernel(
    const scalar_t* __restrict__ grad_out, Strides4 gos, const scalar_t* __restrict__ x, Strides4 xs,
    const scalar_t* __restrict__ routing, const scalar_t* __restrict__ weight, acc_t* __restrict__ grad_weight,
    acc_t* __restrict__ grad_routing, ConvGeometry g, int64_t num_experts, bool nhwc, int64_t slices,
    int64_t pixels_per_slice, int64_t y_offset, int64_t z_offset) {
  __shared__ TileSmem<acc_t> s;
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t z = blockIdx.z + z_offset;
  const int64_t b = z / slices;
  const int64_t p_begin = (z - b * slices) * pixels_per_slice;
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t p_end = p_begin + pixels_per_slice < pixels ? p_begin + pixels_per_slice : pixels;
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t columns = cin_g * g.kernel_h * g.kernel_w;
  const int64_t expert_stride = g.out_channels * columns;
  const GroupTile gt = group_tile(blockIdx.y + y_offset, cout_g, kTileM);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  // Tile rows are output channels, columns filter columns. Operands are loaded channel-fastest in
  // NHWC and pixel-fastest in NCHW; the epilogue's atomics walk filter columns.
  const Lanes lanes = thread_lanes(/*rows_inner=*/false);

  acc_t acc[kRegs][kRegs] = {};
  for (int64_t p0 = p_begin; p0 < p_end; p0 += kTileK) {
#pragma unroll
    for (int t = 0; t < kTileLoads; ++t) {  // A[p][co] = dY
      const TilePos p = tile_pos(threadIdx.x + t * kThreads, /*k_inner=*/!nhwc);
      const int64_t m = gt.first + p.mn, px = p0 + p.k;
      acc_t v = 0;
      if (m < cout_g && px < p_end)
        v = static_cast<acc_t>(grad_out[gos.offset(b, gt.group * cout_g + m, px / g.out_w, px % g.out_w)]);
      s.a[p.k][p.mn] = v;
    }
#pragma unroll
    for (int t = 0; t < kTileLoads; ++t) {  // B[p][f] = im2col of x
      const TilePos p = tile_pos(threadIdx.x + t * kThreads, /*k_inner=*/!nhwc);
      const int64_t f = n0 + p.mn, px = p0 + p.k;
      acc_t v = 0;
      if (f < columns && px < p_end) {
        const FilterTap tap = filter_tap(f, cin_g, g.kernel_h, g.kernel_w, nhwc);
        int64_t ih, iw;
        if (forward_tap_source(g, px / g.out_w, px % g.out_w, tap.kh, tap.kw, ih, iw))
          v = static_cast<acc_t>(x[xs.offset(b, gt.group * cin_g + tap.channel, ih, iw)]);
      }
      s.b[p.k][p.mn] = v;
    }
    __syncthreads();
    multiply_tile(s, acc, lanes);
    __syncthreads();
  }

  // Offsets of this thread's 4 x 4 entries inside one expert's weight; -1 outside the problem.
  int64_t offset[kRegs][kRegs];
#pragma unroll
  for (int i = 0; i < kRegs; ++i) {
    const int64_t m = gt.first + lanes.row + kLanes * i;
#pragma unroll
    for (int j = 0; j < kRegs; ++j) {
      const int64_t f = n0 + lanes.col + kLanes * j;
      offset[i][j] = -1;
      if (m < cout_g && f < columns) {
        const FilterTap tap = filter_tap(f, cin_g, g.kernel_h, g.kernel_w, nhwc);
        offset[i][j] = (gt.group * cout_g + m) * columns + filter_offset(tap, g.kernel_h, g.kernel_w);
      }
    }
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    const acc_t r_be = static_cast<acc_t>(routing[b * num_experts + e]);
    acc_t dot = 0;
#pragma unroll
    for (int i = 0; i < kRegs; ++i)
#pragma unroll
      for (int j = 0; j < kRegs; ++j) {
        if (offset[i][j] < 0) continue;
        if (grad_weight) atomicAdd(grad_weight + e * expert_stride + offset[i][j], r_be * acc[i][j]);
        if (grad_routing) dot += acc[i][j] * static_cast<acc_t>(weight[e * expert_stride + offset[i][j]]);
      }
    if (grad_routing) {  // uniform over the block: every thread reaches block_sum
      const acc_t total = block_sum(dot, scratch);
      if (threadIdx.x == 0) atomicAdd(grad_routing + b * num_experts + e, total);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Depthwise (groups == Cin == Cout): direct kernels. A block covers kChannels channels of one
// example and a run of pixels; it first mixes those channels' k x k filters (and biases) from the
// E experts into shared memory, then each thread computes its outputs from them. kChannels = 1
// (threads walk pixels) suits NCHW, kChannels = 32 (threads walk channels) suits NHWC.

constexpr int kDepthwisePixelsPerThread = 8;

template <int kChannels>
constexpr int64_t depthwise_pixels_per_block() {
  return static_cast<int64_t>(kThreads / kChannels) * kDepthwisePixelsPerThread;
}

// Shared bytes a depthwise block needs: the mixed filters (taps x kChannels) and biases (kChannels).
template <typename acc_t>
size_t depthwise_smem_bytes(int64_t taps, int channels_per_block) {
  return static_cast<size_t>(taps + 1) * channels_per_block * sizeof(acc_t);
}

// filters[t * kChannels + cc] = sum_e r[e] W[e, c0 + cc, 0, t]; biases[cc] likewise (0 without bias).
template <typename scalar_t, typename acc_t, int kChannels>
__device__ void mix_depthwise_filters(const scalar_t* __restrict__ r, const scalar_t* __restrict__ weight,
                                      const scalar_t* __restrict__ bias, int64_t num_experts,
                                      int64_t channels, int64_t taps, int64_t c0, acc_t* filters,
                                      acc_t* biases) {
  for (int64_t idx = threadIdx.x; idx < (taps + 1) * kChannels; idx += kThreads) {
    const int64_t t = idx / kChannels, cc = idx - t * kChannels, c = c0 + cc;
    acc_t v = 0;
    if (c < channels) {
      if (t < taps)
        v = mixed_weight<scalar_t, acc_t>(r, weight + c * taps + t, num_experts, channels * taps);
      else if (bias)
        v = mixed_weight<scalar_t, acc_t>(r, bias + c, num_experts, channels);
    }
    if (t < taps) filters[t * kChannels + cc] = v;
    else biases[cc] = v;
  }
  __syncthreads();
}

// Grid: x = pixel runs, y = channel tiles, z = example.
template <typename scalar_t, typename acc_t, int kChannels>
__global__ void __launch_bounds__(kThreads) depthwise_forward_kernel(
    const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ routing,
    const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias, scalar_t* __restrict__ y,
    Strides4 ys, ConvGeometry g, int64_t num_experts, int64_t y_offset, int64_t z_offset) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  acc_t* filters = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t taps = g.kernel_h * g.kernel_w;
  acc_t* biases = filters + taps * kChannels;
  const int64_t b = blockIdx.z + z_offset;
  const int64_t c0 = (blockIdx.y + y_offset) * kChannels;
  mix_depthwise_filters<scalar_t, acc_t, kChannels>(routing + b * num_experts, weight, bias, num_experts,
                                                    g.in_channels, taps, c0, filters, biases);
  const int cc = threadIdx.x % kChannels, lane = threadIdx.x / kChannels;
  const int64_t c = c0 + cc;
  if (c >= g.in_channels) return;
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * depthwise_pixels_per_block<kChannels>();
  for (int i = 0; i < kDepthwisePixelsPerThread; ++i) {
    const int64_t p = p0 + lane + static_cast<int64_t>(i) * (kThreads / kChannels);
    if (p >= pixels) break;
    const int64_t oh = p / g.out_w, ow = p % g.out_w;
    acc_t v = biases[cc];
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        int64_t ih, iw;
        if (forward_tap_source(g, oh, ow, kh, kw, ih, iw))
          v += filters[(kh * g.kernel_w + kw) * kChannels + cc] * static_cast<acc_t>(x[xs.offset(b, c, ih, iw)]);
      }
    y[ys.offset(b, c, oh, ow)] = static_cast<scalar_t>(v);
  }
}

// Transposed depthwise convolution with the mixed filters. Grid as the forward, over input pixels.
template <typename scalar_t, typename acc_t, int kChannels>
__global__ void __launch_bounds__(kThreads) depthwise_grad_input_kernel(
    const scalar_t* __restrict__ grad_out, Strides4 gos, const scalar_t* __restrict__ routing,
    const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_x, Strides4 gxs, ConvGeometry g,
    int64_t num_experts, int64_t y_offset, int64_t z_offset) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  acc_t* filters = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t taps = g.kernel_h * g.kernel_w;
  acc_t* biases = filters + taps * kChannels;
  const int64_t b = blockIdx.z + z_offset;
  const int64_t c0 = (blockIdx.y + y_offset) * kChannels;
  mix_depthwise_filters<scalar_t, acc_t, kChannels>(routing + b * num_experts, weight, nullptr, num_experts,
                                                    g.in_channels, taps, c0, filters, biases);
  const int cc = threadIdx.x % kChannels, lane = threadIdx.x / kChannels;
  const int64_t c = c0 + cc;
  if (c >= g.in_channels) return;
  const int64_t pixels = g.in_h * g.in_w;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * depthwise_pixels_per_block<kChannels>();
  for (int i = 0; i < kDepthwisePixelsPerThread; ++i) {
    const int64_t p = p0 + lane + static_cast<int64_t>(i) * (kThreads / kChannels);
    if (p >= pixels) break;
    const int64_t ih = p / g.in_w, iw = p % g.in_w;
    acc_t v = 0;
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        int64_t oh, ow;
        if (transposed_tap_source(g, ih, iw, kh, kw, oh, ow))
          v += filters[(kh * g.kernel_w + kw) * kChannels + cc] *
               static_cast<acc_t>(grad_out[gos.offset(b, c, oh, ow)]);
      }
    grad_x[gxs.offset(b, c, ih, iw)] = static_cast<scalar_t>(v);
  }
}

// Per-example depthwise weight gradients dW_b[b, c, t] = sum_p dY[b, c, p] * x[b, c, src(p, t)],
// accumulated (atomically, over pixel slices) into a zeroed acc_t (B, C, taps) buffer.
// Grid: x = pixel slices, y = channel tiles, z = example.
template <typename scalar_t, typename acc_t, int kChannels>
__global__ void __launch_bounds__(kThreads) depthwise_grad_weight_kernel(
    const scalar_t* __restrict__ grad_out, Strides4 gos, const scalar_t* __restrict__ x, Strides4 xs,
    acc_t* __restrict__ grad_weight_per_example, ConvGeometry g, int64_t pixels_per_slice, int64_t y_offset,
    int64_t z_offset) {
  __shared__ acc_t partial[kThreads];
  constexpr int kPixelLanes = kThreads / kChannels;
  const int64_t b = blockIdx.z + z_offset;
  const int cc = threadIdx.x % kChannels, lane = threadIdx.x / kChannels;
  const int64_t c = (blockIdx.y + y_offset) * kChannels + cc;
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.x) * pixels_per_slice;
  const int64_t p_end = p_begin + pixels_per_slice < pixels ? p_begin + pixels_per_slice : pixels;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh)
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      acc_t v = 0;
      if (c < g.in_channels) {
        for (int64_t p = p_begin + lane; p < p_end; p += kPixelLanes) {
          const int64_t oh = p / g.out_w, ow = p % g.out_w;
          int64_t ih, iw;
          if (forward_tap_source(g, oh, ow, kh, kw, ih, iw))
            v += static_cast<acc_t>(grad_out[gos.offset(b, c, oh, ow)]) *
                 static_cast<acc_t>(x[xs.offset(b, c, ih, iw)]);
        }
      }
      partial[threadIdx.x] = v;
      __syncthreads();
      for (int half = kPixelLanes / 2; half > 0; half /= 2) {  // tree over the pixel lanes
        if (lane < half) partial[threadIdx.x] += partial[threadIdx.x + half * kChannels];
        __syncthreads();
      }
      if (lane == 0 && c < g.in_channels)
        atomicAdd(grad_weight_per_example + (b * g.in_channels + c) * g.kernel_h * g.kernel_w + kh * g.kernel_w + kw,
                  partial[cc]);
      __syncthreads();  // partial is rewritten for the next tap
    }
}

// ------------------------------------------------------------------------------------------------
// Host side

enum class Path { kDepthwise, kPointwise, kImplicitGemm };

// Channels per depthwise block for this layout, or 0 when the mixed filters do not fit in shared memory.
template <typename acc_t>
int depthwise_channels_per_block(const ConvGeometry& g, bool nhwc) {
  constexpr size_t kSmemLimit = 48 * 1024;
  const int64_t taps = g.kernel_h * g.kernel_w;
  if (nhwc && depthwise_smem_bytes<acc_t>(taps, 32) <= kSmemLimit) return 32;
  if (depthwise_smem_bytes<acc_t>(taps, 1) <= kSmemLimit) return 1;
  return 0;
}

Path choose_path(const ConvGeometry& g, at::ScalarType dtype, bool nhwc) {
  if (g.is_depthwise()) {
    const bool fits = dtype == at::kDouble ? depthwise_channels_per_block<double>(g, nhwc) > 0
                                           : depthwise_channels_per_block<float>(g, nhwc) > 0;
    if (fits) return Path::kDepthwise;
  }
  if (g.is_pointwise() && g.groups == 1) return Path::kPointwise;
  return Path::kImplicitGemm;
}

// The output layout rule shared with the fake kernel: channels_last in, channels_last out.
at::MemoryFormat output_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                              : at::MemoryFormat::Contiguous;
}

// (B, C, H, W) -> a (B, C, H*W) view when NCHW-contiguous, else (B, H*W, C) when NHWC-contiguous;
// `transposed` tells which. Empty when neither (the caller copies).
std::optional<at::Tensor> gemm_view(const at::Tensor& t, bool& transposed) {
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  if (t.is_contiguous()) {
    transposed = false;
    return t.view({n, c, hw});
  }
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    transposed = true;
    return t.permute({0, 2, 3, 1}).view({n, hw, c});
  }
  return std::nullopt;
}

// out[b] = panels[b] @ in[b] for (B, Cout, Cin) panels and (B, Cin, H, W) activations in either
// layout, written straight into `out` when it is NCHW- or NHWC-contiguous.
void pointwise_bmm(const at::Tensor& panels, const at::Tensor& in, at::Tensor& out) {
  bool in_t = false, out_t = false;
  auto in_view = gemm_view(in, in_t);
  if (!in_view) in_view = gemm_view(in.contiguous(), in_t);
  const auto out_view = gemm_view(out, out_t);
  at::Tensor target =
      out_view ? *out_view : at::empty({out.size(0), out.size(1), out.size(2) * out.size(3)}, out.options());
  if (!out_view) out_t = false;
  const at::Tensor in_cp = in_t ? in_view->transpose(1, 2) : *in_view;  // (B, Cin, P)
  if (out_t) {
    at::bmm_out(target, in_cp.transpose(1, 2), panels.transpose(1, 2));  // (P x Cin)(Cin x Cout)
  } else {
    at::bmm_out(target, panels, in_cp);  // (Cout x Cin)(Cin x P)
  }
  if (!out_view) out.copy_(target.view(out.sizes()));
}

// Mixing while loading re-mixes an example's weight tile for each of its pixel tiles. Past two pixel
// tiles, mixing once into per-example weights (B x |W| of scratch) reads the experts less often.
bool premix_weights(int64_t pixel_tiles, int64_t experts, int64_t premixed_bytes) {
  constexpr int64_t kScratchLimit = int64_t{1} << 30;
  return experts > 1 && pixel_tiles > 2 && premixed_bytes <= kScratchLimit;
}

template <typename scalar_t, typename acc_t>
void launch_forward(const ConvGeometry& g, Path path, bool nhwc, const at::Tensor& x, const at::Tensor& routing,
                    const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t E = weight.size(0);
  const scalar_t* bias_ptr = bias ? bias->data_ptr<scalar_t>() : nullptr;
  if (path == Path::kDepthwise) {
    const int ct = depthwise_channels_per_block<acc_t>(g, nhwc);
    const size_t smem = depthwise_smem_bytes<acc_t>(g.kernel_h * g.kernel_w, ct);
    const int64_t pixels = g.out_h * g.out_w;
    auto run = [&](auto kernel, int64_t per_block) {
      const int64_t blocks_x = ceil_div(pixels, per_block), blocks_y = ceil_div(g.in_channels, ct);
      launch_grid(blocks_x, blocks_y, g.batch, [&](dim3 grid, int64_t y0, int64_t z0) {
        kernel<<<grid, kThreads, smem, stream>>>(x.data_ptr<scalar_t>(), strides_of(x), routing.data_ptr<scalar_t>(),
                                                 weight.data_ptr<scalar_t>(), bias_ptr, y.data_ptr<scalar_t>(),
                                                 strides_of(y), g, E, y0, z0);
      });
    };
    if (ct == 32) run(depthwise_forward_kernel<scalar_t, acc_t, 32>, depthwise_pixels_per_block<32>());
    else run(depthwise_forward_kernel<scalar_t, acc_t, 1>, depthwise_pixels_per_block<1>());
    return;
  }
  if (path == Path::kPointwise) {
    auto panels = mix_experts(routing, weight.view({E, -1})).view({g.batch, g.out_channels, g.in_channels});
    pointwise_bmm(panels, x, y);
    if (bias) y.add_(mix_experts(routing, *bias).view({g.batch, g.out_channels, 1, 1}));
    return;
  }
  const int64_t row_tiles = g.groups * ceil_div(g.out_channels_per_group(), kTileM);
  const int64_t pixel_tiles = ceil_div(g.out_h * g.out_w, kTileN);
  const scalar_t* routing_ptr = routing.data_ptr<scalar_t>();
  const scalar_t* weight_ptr = weight.data_ptr<scalar_t>();
  int64_t weight_example_stride = 0, bias_example_stride = 0, experts = E;
  at::Tensor mixed, mixed_bias;
  if (premix_weights(pixel_tiles, E, g.batch * weight.numel() / E * weight.element_size())) {
    mixed = mix_experts(routing, weight.view({E, -1}));
    weight_ptr = mixed.data_ptr<scalar_t>();
    weight_example_stride = mixed.size(1);
    if (bias) {
      mixed_bias = mix_experts(routing, *bias);
      bias_ptr = mixed_bias.data_ptr<scalar_t>();
      bias_example_stride = g.out_channels;
    }
    routing_ptr = nullptr;
    experts = 1;
  }
  launch_grid(pixel_tiles, row_tiles, g.batch, [&](dim3 grid, int64_t y0, int64_t z0) {
    forward_igemm_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), strides_of(x), routing_ptr, weight_ptr, bias_ptr, weight_example_stride,
        bias_example_stride, y.data_ptr<scalar_t>(), strides_of(y), g, experts, nhwc, y0, z0);
  });
}

at::Tensor cond_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& routing_in, const at::Tensor& weight_in,
                            const std::optional<at::Tensor>& bias_in, c10::IntArrayRef stride,
                            c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_cond_conv2d_args(x_in, routing_in, weight_in, bias_in, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x_in.options().memory_format(output_format(x_in)));
  if (g.batch == 0 || y.numel() == 0) return y;
  // x is read through its strides in place; the small operands are made contiguous (no-ops normally).
  const auto& x = x_in;
  const auto routing = routing_in.contiguous();
  const auto weight = weight_in.contiguous();
  std::optional<at::Tensor> bias;
  if (bias_in) bias = bias_in->contiguous();
  const bool nhwc = channels_inner(x);
  const Path path = choose_path(g, x.scalar_type(), nhwc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cond_conv2d_cuda", [&] {
    launch_forward<scalar_t, at::opmath_type<scalar_t>>(g, path, nhwc, x, routing, weight, bias, y);
  });
  return y;
}

template <typename scalar_t, typename acc_t>
void launch_grad_input(const ConvGeometry& g, Path path, bool nhwc, const at::Tensor& grad_out,
                       const at::Tensor& routing, const at::Tensor& weight, at::Tensor& grad_x) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t E = weight.size(0);
  if (path == Path::kDepthwise) {
    const int ct = depthwise_channels_per_block<acc_t>(g, nhwc);
    const size_t smem = depthwise_smem_bytes<acc_t>(g.kernel_h * g.kernel_w, ct);
    const int64_t pixels = g.in_h * g.in_w;
    auto run = [&](auto kernel, int64_t per_block) {
      const int64_t blocks_x = ceil_div(pixels, per_block), blocks_y = ceil_div(g.in_channels, ct);
      launch_grid(blocks_x, blocks_y, g.batch, [&](dim3 grid, int64_t y0, int64_t z0) {
        kernel<<<grid, kThreads, smem, stream>>>(grad_out.data_ptr<scalar_t>(), strides_of(grad_out),
                                                 routing.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                                 grad_x.data_ptr<scalar_t>(), strides_of(grad_x), g, E, y0, z0);
      });
    };
    if (ct == 32) run(depthwise_grad_input_kernel<scalar_t, acc_t, 32>, depthwise_pixels_per_block<32>());
    else run(depthwise_grad_input_kernel<scalar_t, acc_t, 1>, depthwise_pixels_per_block<1>());
    return;
  }
  if (path == Path::kPointwise) {
    auto panels = mix_experts(routing, weight.view({E, -1})).view({g.batch, g.out_channels, g.in_channels});
    pointwise_bmm(panels.transpose(1, 2), grad_out, grad_x);
    return;
  }
  const int64_t row_tiles = g.groups * ceil_div(g.in_channels_per_group(), kTileM);
  const int64_t pixel_tiles = ceil_div(g.in_h * g.in_w, kTileN);
  const scalar_t* routing_ptr = routing.data_ptr<scalar_t>();
  const scalar_t* weight_ptr = weight.data_ptr<scalar_t>();
  int64_t weight_example_stride = 0, experts = E;
  at::Tensor mixed;
  if (premix_weights(pixel_tiles, E, g.batch * weight.numel() / E * weight.element_size())) {
    mixed = mix_experts(routing, weight.view({E, -1}));
    weight_ptr = mixed.data_ptr<scalar_t>();
    weight_example_stride = mixed.size(1);
    routing_ptr = nullptr;
    experts = 1;
  }
  launch_grid(pixel_tiles, row_tiles, g.batch, [&](dim3 grid, int64_t y0, int64_t z0) {
    grad_input_igemm_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), strides_of(grad_out), routing_ptr, weight_ptr, weight_example_stride,
        grad_x.data_ptr<scalar_t>(), strides_of(grad_x), g, experts, nhwc, y0, z0);
  });
}

// Fills grad_weight_acc (E, |W_e|) and grad_routing_acc (B, E) -- zeroed acc-dtype buffers, either
// undefined when not wanted -- with sum_b r[b,e] dW_b and <dW_b, W_e>.
template <typename scalar_t, typename acc_t>
void launch_grad_weight(const ConvGeometry& g, Path path, bool nhwc, const at::Tensor& grad_out, const at::Tensor& x,
                        const at::Tensor& routing, const at::Tensor& weight, at::Tensor& grad_weight_acc,
                        at::Tensor& grad_routing_acc) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t E = weight.size(0);
  const int64_t pixels = g.out_h * g.out_w;
  const int64_t target_blocks = 4 * multiprocessors();
  if (path == Path::kDepthwise) {
    // dW_b is C * k * k numbers per example: keep them and reduce over the batch with two GEMMs.
    const int ct = depthwise_channels_per_block<acc_t>(g, nhwc);
    const int64_t taps = g.kernel_h * g.kernel_w;
    at::Tensor per_example =
        at::zeros({g.batch, g.in_channels * taps}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int64_t channel_tiles = ceil_div(g.in_channels, ct);
    const int64_t slices =
        std::clamp<int64_t>(ceil_div(target_blocks, channel_tiles * g.batch), 1, ceil_div(pixels, 1024));
    const int64_t per_slice = ceil_div(pixels, slices);
    acc_t* per_example_ptr = per_example.data_ptr<acc_t>();
    auto run = [&](auto kernel) {
      launch_grid(ceil_div(pixels, per_slice), channel_tiles, g.batch, [&](dim3 grid, int64_t y0, int64_t z0) {
        kernel<<<grid, kThreads, 0, stream>>>(grad_out.data_ptr<scalar_t>(), strides_of(grad_out),
                                              x.data_ptr<scalar_t>(), strides_of(x), per_example_ptr, g, per_slice,
                                              y0, z0);
      });
    };
    if (ct == 32) run(depthwise_grad_weight_kernel<scalar_t, acc_t, 32>);
    else run(depthwise_grad_weight_kernel<scalar_t, acc_t, 1>);
    const auto r_acc = routing.to(per_example.scalar_type());
    if (grad_weight_acc.defined()) at::mm_out(grad_weight_acc, r_acc.t(), per_example);
    if (grad_routing_acc.defined())
      at::mm_out(grad_routing_acc, per_example, weight.view({E, -1}).to(per_example.scalar_type()).t());
    return;
  }
  const int64_t columns = g.in_channels_per_group() * g.kernel_h * g.kernel_w;
  const int64_t col_tiles = ceil_div(columns, kTileN);
  const int64_t row_tiles = g.groups * ceil_div(g.out_channels_per_group(), kTileM);
  int64_t slices =
      std::clamp<int64_t>(ceil_div(target_blocks, col_tiles * row_tiles * g.batch), 1, ceil_div(pixels, 256));
  const int64_t per_slice = ceil_div(ceil_div(pixels, slices), kTileK) * kTileK;
  slices = ceil_div(pixels, per_slice);
  acc_t* gw = grad_weight_acc.defined() ? grad_weight_acc.data_ptr<acc_t>() : nullptr;
  acc_t* gr = grad_routing_acc.defined() ? grad_routing_acc.data_ptr<acc_t>() : nullptr;
  launch_grid(col_tiles, row_tiles, g.batch * slices, [&](dim3 grid, int64_t y0, int64_t z0) {
    grad_weight_igemm_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), strides_of(grad_out), x.data_ptr<scalar_t>(), strides_of(x),
        routing.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), gw, gr, g, E, nhwc, slices, per_slice, y0, z0);
  });
}

// Copies an acc-dtype result into a tensor laid out like `like` (what the fake kernel promises).
at::Tensor finish_like(const at::Tensor& like, const at::Tensor& value) {
  if (value.scalar_type() == like.scalar_type() && value.strides() == like.strides()) return value;
  auto out = at::empty_like(like);
  out.copy_(value.view(like.sizes()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cond_conv2d_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& routing_in, const at::Tensor& weight_in,
    const std::optional<at::Tensor>& bias_in, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, std::array<bool, 4> output_mask) {
  const ConvGeometry g = check_cond_conv2d_args(x, routing_in, weight_in, bias_in, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out_in.dim() == 4 && grad_out_in.size(0) == g.batch && grad_out_in.size(1) == g.out_channels &&
                  grad_out_in.size(2) == g.out_h && grad_out_in.size(3) == g.out_w,
              "_cond_conv2d_backward: grad_out must have shape (", g.batch, ", ", g.out_channels, ", ", g.out_h, ", ",
              g.out_w, "), got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == x.scalar_type(), "_cond_conv2d_backward: grad_out has dtype ",
              grad_out_in.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(grad_out_in.device() == x.device(), "_cond_conv2d_backward: grad_out is on ", grad_out_in.device(),
              " but x is on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const bool has_bias = bias_in.has_value();
  auto empty = [&] { return x.new_empty({0}); };
  if (g.batch == 0) {
    return {output_mask[0] ? at::zeros_like(x) : empty(), output_mask[1] ? at::zeros_like(routing_in) : empty(),
            output_mask[2] ? at::zeros_like(weight_in) : empty(),
            output_mask[3] && has_bias ? at::zeros_like(*bias_in) : empty()};
  }
  const auto& grad_out = grad_out_in;  // read through its strides, in place
  at::Tensor grad_x = output_mask[0] ? at::empty_like(x) : empty();
  const auto routing = routing_in.contiguous();
  const auto weight = weight_in.contiguous();
  const int64_t E = weight.size(0);
  const bool nhwc = channels_inner(x);
  const Path path = choose_path(g, x.scalar_type(), nhwc);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_dtype).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_weight_acc = output_mask[2] ? at::zeros(weight.sizes(), acc_options) : at::Tensor();
  at::Tensor grad_routing_acc = output_mask[1] ? at::zeros({g.batch, E}, acc_options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cond_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (output_mask[0]) launch_grad_input<scalar_t, acc_t>(g, path, nhwc, grad_out, routing, weight, grad_x);
    if (output_mask[1] || output_mask[2]) {
      auto gw = grad_weight_acc.defined() ? grad_weight_acc.view({E, -1}) : at::Tensor();
      launch_grad_weight<scalar_t, acc_t>(g, path, nhwc, grad_out, x, routing, weight, gw, grad_routing_acc);
    }
  });

  at::Tensor grad_routing = empty(), grad_weight = empty(), grad_bias = empty();
  if (has_bias && (output_mask[1] || output_mask[3])) {
    // db_b[b, co] = sum_p dY[b, co, p]: B x Cout numbers, reduced over the batch by two small GEMMs.
    const auto db = at::sum(grad_out, {2, 3}, false, acc_dtype);
    if (output_mask[3]) grad_bias = finish_like(*bias_in, at::mm(routing.to(acc_dtype).t(), db));
    if (output_mask[1]) grad_routing_acc.addmm_(db, bias_in->to(acc_dtype).t());
  }
  if (output_mask[1]) grad_routing = finish_like(routing_in, grad_routing_acc);
  if (output_mask[2]) grad_weight = finish_like(weight_in, grad_weight_acc);
  return {grad_x, grad_routing, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(condkernels, CUDA, m) {
  m.impl("cond_conv2d", &cond_conv2d_cuda);
  m.impl("_cond_conv2d_backward", &cond_conv2d_backward_cuda);
}

}  // namespace condkernels
