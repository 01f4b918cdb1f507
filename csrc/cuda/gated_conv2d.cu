// CUDA kernels of gated_conv2d.
//
// 1. build_channel_lists_kernel: one warp per (example, group) compacts the gates into a channel list
//    (open channels first, then closed ones; common/gated_lists.h) and an open count, entirely on the
//    device: the host never learns how many channels are open, so there is no synchronisation.
// 2. Three implicit GEMMs in the grouped-GEMM style share one tile routine (tile_gemm). A block owns a
//    32 x 32 tile of one (example, group) problem; its sizes come from that example's open counts, so
//    tiles past them exit at once and the reduction loop runs over that example's open channels only.
//    Operands are gathered through the lists straight from x / grad_out / weight (no im2col buffer),
//    the gates folded into the loads, and results scattered back through the lists.
//    - forward_kernel:      y[open outs] = W[open outs, open ins] * x[open ins]; closed outputs written 0.
//    - grad_input_kernel:   d(in_gate * x)[rows] = W[open outs, rows]^T * (out_gate * grad_out)[open outs],
//                           rows = open inputs, or every input when in_gate needs its gradient.
//    - grad_weight_kernel:  dW[open outs, open ins] += (out_gate * grad_out) * x^T per example
//                           (atomic adds into an fp32 / fp64 buffer).
// The bias and gate gradients are per-channel reductions left to ATen.
//
// Accumulation is in at::opmath_type (fp32 for half / bfloat16 / float, fp64 for double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <limits>

#include "common/gated_channels.h"
#include "common/gated_conv2d_operands.h"
#include "common/gated_lists.h"
#include "ops/gated_conv2d.h"

namespace condkernels {
namespace {

constexpr int kTileM = 32, kTileN = 32, kTileK = 16;
constexpr int kSub = 16;  // a 16 x 16 thread block; each thread owns a 2 x 2 sub-tile
constexpr int kThreads = kSub * kSub;
constexpr int kWarp = 32;
// Shared tiles are stored [k][m]; the extra column keeps the k-strided stores of A off one bank.
constexpr int kTileMPadded = kTileM + 1;

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// --- channel lists ------------------------------------------------------------------------------

// list[b, grp * per_group + j] and count[b * groups + grp]; a null gate opens every channel.
template <typename T>
__global__ void __launch_bounds__(kWarp)
    build_channel_lists_kernel(const T* __restrict__ gate, int64_t channels, int64_t groups,
                               int32_t* __restrict__ list, int32_t* __restrict__ count) {
  const int64_t bg = blockIdx.x;
  const int64_t b = bg / groups, grp = bg % groups;
  const int64_t per_group = channels / groups;
  const T* row = gate != nullptr ? gate + b * channels + grp * per_group : nullptr;
  int32_t* out = list + b * channels + grp * per_group;
  const unsigned lane = threadIdx.x;
  int64_t open_before = 0;
  for (int64_t base = 0; base < per_group; base += kWarp) {
    const int64_t c = base + lane;
    const bool in_range = c < per_group;
    const bool open = in_range && (row == nullptr || gate_is_open(row[c]));
    const unsigned ballot = __ballot_sync(0xffffffffu, open);
    const int64_t rank = __popc(ballot & ((1u << lane) - 1u));
    if (in_range) out[channel_list_slot(open, c, open_before + rank, per_group)] = static_cast<int32_t>(c);
    open_before += __popc(ballot);
  }
  if (lane == 0) count[bg] = static_cast<int32_t>(open_before);
}

struct ChannelLists {
  at::Tensor list, count;  // (B, C) int32, (B * groups) int32
};

ChannelLists build_channel_lists(const std::optional<at::Tensor>& gate, int64_t batch, int64_t channels,
                                 int64_t groups, const at::Tensor& like, cudaStream_t stream) {
  ChannelLists lists{at::empty({batch, channels}, like.options().dtype(at::kInt)),
                     at::empty({batch * groups}, like.options().dtype(at::kInt))};
  if (batch * groups == 0) return lists;
  TORCH_CHECK(batch * groups <= std::numeric_limits<int32_t>::max(),
              "gated_conv2d: batch * groups is too large for the CUDA kernels");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "gated_conv2d_lists", [&] {
    build_channel_lists_kernel<scalar_t><<<static_cast<unsigned>(batch * groups), kWarp, 0, stream>>>(
        gate.has_value() ? gate->data_ptr<scalar_t>() : nullptr, channels, groups,
        lists.list.data_ptr<int32_t>(), lists.count.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return lists;
}

// --- the shared tile GEMM ------------------------------------------------------------------------

// acc += A[m0 .. m0 + 32, 0 .. K) * B[0 .. K, n0 .. n0 + 32) for the operands of one (example, group)
// problem (common/gated_conv2d_operands.h: lhs / rhs return 0 outside it, so partial tiles need no
// other care). Thread (ty, tx) owns rows ty, ty + 16 and columns tx, tx + 16. K = ops.reduction() is
// the same for the whole block.
template <typename Acc, typename Operands>
__device__ __forceinline__ void tile_gemm(const Operands& ops, int64_t m0, int64_t n0,
                                          Acc (&a_tile)[kTileK][kTileMPadded], Acc (&b_tile)[kTileK][kTileN],
                                          Acc (&acc)[2][2]) {
  const int tid = threadIdx.x, tx = tid % kSub, ty = tid / kSub;
  const int64_t k_total = ops.reduction();
  for (int64_t k0 = 0; k0 < k_total; k0 += kTileK) {
    // A is walked along k, the direction it is contiguous in for every caller.
    for (int e = tid; e < kTileK * kTileM; e += kThreads) {
      const int m = e / kTileK, kk = e % kTileK;
      a_tile[kk][m] = ops.lhs(m0 + m, k0 + kk);
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kk = e / kTileN, n = e % kTileN;
      b_tile[kk][n] = ops.rhs(k0 + kk, n0 + n);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const Acc a0 = a_tile[kk][ty], a1 = a_tile[kk][ty + kSub];
      const Acc b0 = b_tile[kk][tx], b1 = b_tile[kk][tx + kSub];
      acc[0][0] += a0 * b0;
      acc[0][1] += a0 * b1;
      acc[1][0] += a1 * b0;
      acc[1][1] += a1 * b1;
    }
    __syncthreads();
  }
}

// blockIdx.x enumerates (example, group) problems, blockIdx.y row tiles, blockIdx.z column tiles.
__device__ __forceinline__ int64_t problem_example(const ConvGeometry& g) { return blockIdx.x / g.groups; }
__device__ __forceinline__ int64_t problem_group(const ConvGeometry& g) { return blockIdx.x % g.groups; }
__device__ __forceinline__ int64_t row_tile_start() { return static_cast<int64_t>(blockIdx.y) * kTileM; }
__device__ __forceinline__ int64_t col_tile_start() { return static_cast<int64_t>(blockIdx.z) * kTileN; }

// --- forward -------------------------------------------------------------------------------------

// Rows past the example's open outputs (a whole tile of them skips the reduction) are written as 0.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ x, Strides4 sx, const T* __restrict__ weight, const T* __restrict__ bias,
               const T* __restrict__ in_gate, const T* __restrict__ out_gate,
               const int32_t* __restrict__ in_list, const int32_t* __restrict__ in_count,
               const int32_t* __restrict__ out_list, const int32_t* __restrict__ out_count,
               T* __restrict__ y, T* __restrict__ ungated, Strides4 sy, ConvGeometry g) {
  __shared__ Acc a_tile[kTileK][kTileMPadded];
  __shared__ Acc b_tile[kTileK][kTileN];
  const int64_t b = problem_example(g), grp = problem_group(g);
  const ForwardOperands<T, Acc> ops{g, weight, x, sx, in_gate, b, grp,
                                    group_list(in_list, in_count, b, grp, g.in_channels, g.groups),
                                    group_list(out_list, out_count, b, grp, g.out_channels, g.groups)};
  const int64_t m0 = row_tile_start(), n0 = col_tile_start();
  Acc acc[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
  if (m0 < ops.rows()) tile_gemm(ops, m0, n0, a_tile, b_tile, acc);

  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t cout_g = g.out_channels_per_group(), positions = ops.cols();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t m = m0 + ty + i * kSub, n = n0 + tx + j * kSub;
      if (m < cout_g && n < positions) ops.store(m, n, acc[i][j], bias, out_gate, y, ungated, sy);
    }
  }
}

// --- backward ------------------------------------------------------------------------------------

// d(in_gate * x) over the listed input rows, from the open outputs only; see GradInputOperands::store.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
grad_input_kernel(const T* __restrict__ grad_out, Strides4 sgo, const T* __restrict__ weight,
                  const T* __restrict__ in_gate, const T* __restrict__ out_gate,
                  const int32_t* __restrict__ row_list, const int32_t* __restrict__ row_count,
                  const int32_t* __restrict__ out_list, const int32_t* __restrict__ out_count,
                  T* __restrict__ grad_x, Strides4 sgx, Acc* __restrict__ grad_gated, ConvGeometry g) {
  __shared__ Acc a_tile[kTileK][kTileMPadded];
  __shared__ Acc b_tile[kTileK][kTileN];
  const int64_t b = problem_example(g), grp = problem_group(g);
  const GradInputOperands<T, Acc> ops{g, weight, grad_out, sgo, out_gate, b, grp,
                                      group_list(row_list, row_count, b, grp, g.in_channels, g.groups),
                                      group_list(out_list, out_count, b, grp, g.out_channels, g.groups)};
  const int64_t m0 = row_tile_start(), n0 = col_tile_start();
  Acc acc[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
  if (m0 < ops.rows()) tile_gemm(ops, m0, n0, a_tile, b_tile, acc);

  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
  const int64_t cin_g = g.in_channels_per_group(), plane = ops.cols();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t m = m0 + ty + i * kSub, n = n0 + tx + j * kSub;
      if (m < cin_g && n < plane) ops.store(m, n, acc[i][j], in_gate, grad_x, sgx, grad_gated);
    }
  }
}

// grad_w += this example's (out_gate * grad_out) im2col(in_gate * x)^T over its open outputs x open
// inputs, added atomically (examples run concurrently).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
grad_weight_kernel(const T* __restrict__ grad_out, Strides4 sgo, const T* __restrict__ x, Strides4 sx,
                   const T* __restrict__ in_gate, const T* __restrict__ out_gate,
                   const int32_t* __restrict__ in_list, const int32_t* __restrict__ in_count,
                   const int32_t* __restrict__ out_list, const int32_t* __restrict__ out_count,
                   Acc* __restrict__ grad_w, ConvGeometry g) {
  __shared__ Acc a_tile[kTileK][kTileMPadded];
  __shared__ Acc b_tile[kTileK][kTileN];
  const int64_t b = problem_example(g), grp = problem_group(g);
  const GradWeightOperands<T, Acc> ops{g, grad_out, sgo, x, sx, in_gate, out_gate, b, grp,
                                       group_list(in_list, in_count, b, grp, g.in_channels, g.groups),
                                       group_list(out_list, out_count, b, grp, g.out_channels, g.groups)};
  const int64_t m0 = row_tile_start(), n0 = col_tile_start();
  if (m0 >= ops.rows() || n0 >= ops.cols()) return;  // uniform across the block
  Acc acc[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
  tile_gemm(ops, m0, n0, a_tile, b_tile, acc);

  const int tx = threadIdx.x % kSub, ty = threadIdx.x / kSub;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t m = m0 + ty + i * kSub, n = n0 + tx + j * kSub;
      if (m < ops.rows() && n < ops.cols()) atomicAdd(grad_w + ops.grad_weight_offset(m, n), acc[i][j]);
    }
  }
}

// --- host side -----------------------------------------------------------------------------------

// Grid over (example, group) pairs x tiles of `rows` x tiles of `cols`; false when there is no work.
bool tile_grid(int64_t problems, int64_t rows, int64_t cols, dim3& grid) {
  if (problems == 0 || rows == 0 || cols == 0) return false;
  const int64_t row_tiles = (rows + kTileM - 1) / kTileM, col_tiles = (cols + kTileN - 1) / kTileN;
  TORCH_CHECK(problems <= std::numeric_limits<int32_t>::max() && row_tiles <= 65535 && col_tiles <= 65535,
              "gated_conv2d: problem too large for the CUDA kernels' grid (", problems, " x ", row_tiles,
              " x ", col_tiles, " tiles)");
  grid = dim3(static_cast<unsigned>(problems), static_cast<unsigned>(row_tiles), static_cast<unsigned>(col_tiles));
  return true;
}

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> forward_impl(const at::Tensor& x_in, const at::Tensor& weight_in,
                                                const std::optional<at::Tensor>& bias_in,
                                                const std::optional<at::Tensor>& in_gate_in,
                                                const std::optional<at::Tensor>& out_gate_in,
                                                c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                c10::IntArrayRef dilation, int64_t groups, bool with_ungated) {
  const ConvGeometry g = check_gated_conv2d_args(x_in, weight_in, bias_in, in_gate_in, out_gate_in, stride,
                                                 padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto memory_format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(memory_format), weight = weight_in.contiguous();
  const auto bias = contiguous(bias_in), in_gate = contiguous(in_gate_in), out_gate = contiguous(out_gate_in);
  at::Tensor y = at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, x.options().memory_format(memory_format));
  at::Tensor ungated = with_ungated ? at::empty_like(y) : at::Tensor();
  dim3 grid;
  if (!tile_grid(g.batch * g.groups, g.out_channels_per_group(), g.out_h * g.out_w, grid)) {
    return {y, ungated};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const ChannelLists ins = build_channel_lists(in_gate, g.batch, g.in_channels, g.groups, x, stream);
  // The training form computes every output channel: its ungated value is needed for out_gate's gradient.
  const ChannelLists outs =
      build_channel_lists(with_ungated ? std::nullopt : out_gate, g.batch, g.out_channels, g.groups, x, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_conv2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), strides_of(x), weight.data_ptr<scalar_t>(), optional_data<scalar_t>(bias),
        optional_data<scalar_t>(in_gate), optional_data<scalar_t>(out_gate), ins.list.data_ptr<int32_t>(),
        ins.count.data_ptr<int32_t>(), outs.list.data_ptr<int32_t>(), outs.count.data_ptr<int32_t>(),
        y.data_ptr<scalar_t>(), with_ungated ? ungated.data_ptr<scalar_t>() : nullptr, strides_of(y), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, ungated};
}

at::Tensor gated_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& in_gate, const std::optional<at::Tensor>& out_gate,
                             c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             int64_t groups) {
  return std::get<0>(
      forward_impl(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, /*with_ungated=*/false));
}

std::tuple<at::Tensor, at::Tensor> gated_conv2d_with_ungated_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& in_gate, const std::optional<at::Tensor>& out_gate, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  return forward_impl(x, weight, bias, in_gate, out_gate, stride, padding, dilation, groups, /*with_ungated=*/true);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// mask = which gradients to compute: (x, weight, bias, in_gate, out_gate).
Grads gated_conv2d_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
                                 const std::optional<at::Tensor>& bias_in,
                                 const std::optional<at::Tensor>& in_gate_in,
                                 const std::optional<at::Tensor>& out_gate_in,
                                 const std::optional<at::Tensor>& ungated_in, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                 std::array<bool, 5> mask) {
  const ConvGeometry g = check_gated_conv2d_backward_args(grad_out_in, x_in, weight_in, bias_in, in_gate_in,
                                                          out_gate_in, ungated_in, stride, padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  auto empty = [&] { return x_in.new_empty({0}); };
  const bool need_x = mask[0], need_w = mask[1], need_b = mask[2] && bias_in.has_value();
  const bool need_ig = mask[3] && in_gate_in.has_value(), need_og = mask[4] && out_gate_in.has_value();
  if (g.batch == 0) {
    return {need_x ? at::zeros_like(x_in) : empty(), need_w ? at::zeros_like(weight_in) : empty(),
            need_b ? at::zeros_like(*bias_in) : empty(), need_ig ? at::zeros_like(*in_gate_in) : empty(),
            need_og ? at::zeros_like(*out_gate_in) : empty()};
  }
  const auto memory_format = x_in.suggest_memory_format();
  const at::Tensor x = x_in.contiguous(memory_format), weight = weight_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous(memory_format);
  const auto in_gate = contiguous(in_gate_in), out_gate = contiguous(out_gate_in);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  const int64_t cin_g = g.in_channels_per_group(), cout_g = g.out_channels_per_group();
  const int64_t taps = g.kernel_h * g.kernel_w;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor grad_x = empty(), grad_w = empty(), grad_b = empty(), grad_ig = empty(), grad_og = empty();
  if (need_og) {
    // d out_gate = <grad_out, conv + bias> over the plane, closed channels included.
    const at::Tensor z = ungated_in.has_value()
                             ? *ungated_in
                             : std::get<1>(forward_impl(x, weight, bias_in, in_gate, out_gate, stride, padding,
                                                        dilation, groups, /*with_ungated=*/true));
    grad_og = (grad_out.to(acc_dtype) * z.to(acc_dtype)).sum({2, 3}).to(x.scalar_type());
  }
  if (need_b) {
    at::Tensor per_example = grad_out.to(acc_dtype).sum({2, 3});
    if (out_gate.has_value()) per_example = per_example * out_gate->to(acc_dtype);
    grad_b = per_example.sum(0).to(x.scalar_type());
  }
  if (!(need_x || need_ig || need_w)) return {grad_x, grad_w, grad_b, grad_ig, grad_og};

  const ChannelLists ins = build_channel_lists(in_gate, g.batch, g.in_channels, g.groups, x, stream);
  const ChannelLists outs = build_channel_lists(out_gate, g.batch, g.out_channels, g.groups, x, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_conv2d_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ig_p = optional_data<scalar_t>(in_gate);
    const scalar_t* og_p = optional_data<scalar_t>(out_gate);
    dim3 grid;
    if (need_x || need_ig) {
      // The gradient of the gated input is needed at every input channel only when in_gate learns.
      const ChannelLists rows =
          need_ig ? build_channel_lists(std::nullopt, g.batch, g.in_channels, g.groups, x, stream) : ins;
      if (need_x) grad_x = at::empty_like(x);
      at::Tensor grad_gated =
          need_ig ? at::empty({g.batch, g.in_channels, g.in_h, g.in_w}, x.options().dtype(acc_dtype)) : at::Tensor();
      if (tile_grid(g.batch * g.groups, cin_g, g.in_h * g.in_w, grid)) {
        grad_input_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), strides_of(grad_out), weight.data_ptr<scalar_t>(), ig_p, og_p,
            rows.list.data_ptr<int32_t>(), rows.count.data_ptr<int32_t>(), outs.list.data_ptr<int32_t>(),
            outs.count.data_ptr<int32_t>(), need_x ? grad_x.data_ptr<scalar_t>() : nullptr,
            need_x ? strides_of(grad_x) : Strides4{0, 0, 0, 0}, need_ig ? grad_gated.data_ptr<acc_t>() : nullptr, g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        if (need_ig) grad_gated.zero_();
        if (need_x) grad_x.zero_();
      }
      if (need_ig) grad_ig = (grad_gated * x.to(acc_dtype)).sum({2, 3}).to(x.scalar_type());
    }
    if (need_w) {
      at::Tensor acc_w = at::zeros({g.out_channels, cin_g * taps}, x.options().dtype(acc_dtype));
      if (tile_grid(g.batch * g.groups, cout_g, cin_g * taps, grid)) {
        grad_weight_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
            grad_out.data_ptr<scalar_t>(), strides_of(grad_out), x.data_ptr<scalar_t>(), strides_of(x), ig_p, og_p,
            ins.list.data_ptr<int32_t>(), ins.count.data_ptr<int32_t>(), outs.list.data_ptr<int32_t>(),
            outs.count.data_ptr<int32_t>(), acc_w.data_ptr<acc_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      grad_w = acc_w.to(x.scalar_type()).view_as(weight);
    }
  });
  return {grad_x, grad_w, grad_b, grad_ig, grad_og};
}

}  // namespace

TORCH_LIBRARY_IMPL(condkernels, CUDA, m) {
  m.impl("gated_conv2d", &gated_conv2d_cuda);
  m.impl("_gated_conv2d_with_ungated", &gated_conv2d_with_ungated_cuda);
  m.impl("_gated_conv2d_backward", &gated_conv2d_backward_cuda);
}

}  // namespace condkernels
