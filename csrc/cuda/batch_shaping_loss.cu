// CUDA kernels of batch_shaping_loss.
//
// The gates are transposed to (G, N) so that a gate's batch is contiguous. Up to kMaxFusedBatch
// examples, one block owns one gate column and does everything in shared memory: a bitonic sort of
// (value key, batch row) pairs, then one thread per sorted position evaluates the prior (the math
// of common/beta_cdf_math.h) and writes its gradient at its value's batch row, and the block reduces
// the column's loss. Larger batches sort with torch's segmented sort and evaluate the sorted values
// elementwise, scattering the same way. The backward, a multiply by the incoming gradient, needs no
// kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>

#include "common/beta_cdf_math.h"
#include "common/sort_key.h"
#include "ops/batch_shaping_loss.h"

namespace condkernels {
namespace {

constexpr int kMaxFusedBatch = 1024;
// Threads of the fused kernel's block, which loops over a column of up to kMaxFusedBatch values:
// with 1024 its ~80 registers a thread would exceed the 64K of a multiprocessor and the launch
// would be refused; the bound makes the compiler keep to what 512 threads may use.
constexpr int kMaxFusedThreads = 512;
constexpr int kThreads = 256;

// What the kernels need of BatchShapingArgs, with the reduction's scale already applied.
struct LossParams {
  beta_math::Prior prior;
  double p0, p1, lbeta, tol, scale, pdf_lo, pdf_hi, eps;
  bool clamp;
};

template <typename scalar_t>
__device__ __forceinline__ uint64_t sort_key(scalar_t v) {
  if constexpr (sizeof(scalar_t) == 8) {
    return order_key(static_cast<double>(v));
  } else {
    return order_key(static_cast<float>(v));
  }
}

// Loss of sorted position i (0-based) of a column of n values; writes its gradient to *grad_out
// (the value's batch row of the column).
template <typename scalar_t>
__device__ __forceinline__ double sorted_term(const LossParams& lp, double value, int64_t i,
                                              int64_t n, scalar_t* grad_out) {
  const double x = lp.clamp ? beta_math::clamp_unit(value, lp.eps) : value;
  const auto f = beta_math::prior_cdf_pdf(lp.prior, x, lp.p0, lp.p1, lp.lbeta, lp.tol);
  const auto term = beta_math::loss_term(static_cast<double>(i + 1) / static_cast<double>(n + 1), f,
                                         lp.pdf_lo, lp.pdf_hi);
  *grad_out = static_cast<scalar_t>(lp.scale * term.grad);
  return term.loss;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxFusedThreads)
    fused_column_kernel(const scalar_t* __restrict__ gates_t, int64_t n, int padded, LossParams lp,
                        scalar_t* __restrict__ grad_t, double* __restrict__ column_loss) {
  extern __shared__ unsigned char shared[];
  uint64_t* keys = reinterpret_cast<uint64_t*>(shared);
  int32_t* rows = reinterpret_cast<int32_t*>(keys + padded);
  double* partial = reinterpret_cast<double*>(keys);  // reused after the sort (see below)
  const int64_t column = blockIdx.x;
  const scalar_t* x = gates_t + column * n;
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    // padding sorts after everything, NaN included (same key, larger row)
    keys[i] = i < n ? sort_key(x[i]) : ~uint64_t{0};
    rows[i] = i;
  }
  __syncthreads();
  for (int k = 2; k <= padded; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < padded; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const bool greater = keys[i] > keys[partner] || (keys[i] == keys[partner] && rows[i] > rows[partner]);
          if (greater == ((i & k) == 0)) {
            const uint64_t tk = keys[i]; keys[i] = keys[partner]; keys[partner] = tk;
            const int32_t tr = rows[i]; rows[i] = rows[partner]; rows[partner] = tr;
          }
        }
      }
      __syncthreads();
    }
  }
  double loss = 0.0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int32_t row = rows[i];
    loss += sorted_term(lp, static_cast<double>(x[row]), i, n, grad_t + column * n + row);
  }
  __syncthreads();  // every thread has read keys/rows: their memory becomes the reduction buffer
  partial[threadIdx.x] = loss;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) column_loss[column] = partial[0];
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sorted_values_kernel(const scalar_t* __restrict__ values_t, const int64_t* __restrict__ order_t, int64_t n,
                         int64_t total, LossParams lp, scalar_t* __restrict__ grad_t, double* __restrict__ terms) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t column_start = e - e % n;
    terms[e] = sorted_term(lp, static_cast<double>(values_t[e]), e % n, n,
                           grad_t + column_start + order_t[e]);
  }
}

int grid_for(int64_t n) {
  const int64_t max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

std::tuple<at::Tensor, at::Tensor> batch_shaping_loss_cuda(
    const at::Tensor& gates, c10::string_view prior, double prior_a, double prior_b,
    c10::string_view reduction, double pdf_lo, double pdf_hi, double eps) {
  const BatchShapingArgs args = check_batch_shaping_loss_args(gates, prior, prior_a, prior_b,
                                                              reduction, pdf_lo, pdf_hi, eps);
  const c10::cuda::CUDAGuard guard(gates.device());
  const int64_t n = args.batch, g = args.gates;
  const auto gates_t = gates.reshape({n, g}).t().contiguous();  // (G, N): a gate's batch is contiguous
  auto grad_t = at::empty({g, n}, gates.options());
  LossParams lp{args.prior, args.prior_a, args.prior_b,
                args.clamps() ? beta_math::log_beta(args.prior_a, args.prior_b) : 0.0, 0.0,
                args.scale(), args.pdf_lo, args.pdf_hi, args.eps, args.clamps()};
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor column_loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gates.scalar_type(), "batch_shaping_loss_cuda", [&] {
    lp.tol = beta_math::cf_tolerance<scalar_t>();
    if (n <= kMaxFusedBatch) {
      int padded = 1;
      while (padded < n) padded <<= 1;
      const int threads = std::max(32, std::min(padded, kMaxFusedThreads));
      const size_t shared = std::max<size_t>(padded * (sizeof(uint64_t) + sizeof(int32_t)),
                                             threads * sizeof(double));
      column_loss = at::empty({g}, gates.options().dtype(at::kDouble));
      fused_column_kernel<scalar_t><<<g, threads, shared, stream>>>(
          gates_t.const_data_ptr<scalar_t>(), n, padded, lp, grad_t.mutable_data_ptr<scalar_t>(),
          column_loss.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const auto [values_t, order_t] = at::sort(gates_t, /*stable=*/true, /*dim=*/1, /*descending=*/false);
      auto terms = at::empty({g, n}, gates.options().dtype(at::kDouble));
      sorted_values_kernel<scalar_t><<<grid_for(g * n), kThreads, 0, stream>>>(
          values_t.const_data_ptr<scalar_t>(), order_t.const_data_ptr<int64_t>(), n, g * n, lp,
          grad_t.mutable_data_ptr<scalar_t>(), terms.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      column_loss = terms.sum(1);
    }
  });
  auto loss = (column_loss.sum() * args.scale()).to(gates.scalar_type());
  return {loss, grad_t.t().contiguous().view(gates.sizes())};
}

}  // namespace
}  // namespace condkernels

TORCH_LIBRARY_IMPL(condkernels, CUDA, m) {
  m.impl("batch_shaping_loss", &condkernels::batch_shaping_loss_cuda);
}
