// CUDA kernels of beta_cdf and its backward: one thread per output element, the math of
// common/beta_cdf_math.h. Parameters that hold one value are read from device memory by every
// thread, so a Python-number a or b costs no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/beta_cdf_math.h"
#include "ops/beta_cdf.h"

namespace condkernels {
namespace {

constexpr int kThreads = 256;

// a_stride / b_stride: 0 when the parameter holds one value, 1 when it was expanded to the output.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    beta_cdf_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                    int64_t a_stride, int64_t b_stride, scalar_t* __restrict__ out, int64_t n) {
  const double tol = beta_math::cf_tolerance<scalar_t>();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double av = static_cast<double>(a[i * a_stride]), bv = static_cast<double>(b[i * b_stride]);
    const double lbeta = beta_math::valid_shape(av, bv) ? beta_math::log_beta(av, bv) : 0.0;
    out[i] = static_cast<scalar_t>(beta_math::beta_cdf(static_cast<double>(x[i]), av, bv, lbeta, tol));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    beta_pdf_times_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                               const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, int64_t a_stride,
                               int64_t b_stride, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double av = static_cast<double>(a[i * a_stride]), bv = static_cast<double>(b[i * b_stride]);
    const double lbeta = beta_math::valid_shape(av, bv) ? beta_math::log_beta(av, bv) : 0.0;
    out[i] = static_cast<scalar_t>(static_cast<double>(grad[i]) *
                                   beta_math::beta_pdf(static_cast<double>(x[i]), av, bv, lbeta));
  }
}

int blocks_for(int64_t n) {
  const int64_t max_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, max_blocks)));
}

// Parameter laid out for the kernels: its one value (stride 0), or expanded to the output shape.
std::pair<at::Tensor, int64_t> as_kernel_param(const at::Tensor& p, c10::IntArrayRef shape) {
  if (p.numel() == 1) return {p.reshape({1}).contiguous(), 0};
  return {p.expand(shape).contiguous(), 1};
}

at::Tensor beta_cdf_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  const auto shape = check_beta_cdf_args(x, a, b);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty(shape, x.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const auto xe = x.expand(shape).contiguous();
  const auto [ae, a_stride] = as_kernel_param(a, shape);
  const auto [be, b_stride] = as_kernel_param(b, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "beta_cdf_cuda", [&] {
    beta_cdf_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        xe.const_data_ptr<scalar_t>(), ae.const_data_ptr<scalar_t>(), be.const_data_ptr<scalar_t>(),
        a_stride, b_stride, out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor beta_cdf_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a,
                                  const at::Tensor& b) {
  const auto shape = check_beta_cdf_args(x, a, b);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(shape), "_beta_cdf_backward: grad has shape ",
              grad.sizes(), " but the output of beta_cdf has shape ", c10::IntArrayRef(shape));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type() && grad.device() == x.device(),
              "_beta_cdf_backward: grad must have x's dtype and device");
  const c10::cuda::CUDAGuard guard(x.device());
  auto full = at::empty(shape, x.options());
  const int64_t n = full.numel();
  if (n != 0) {
    const auto ge = grad.contiguous(), xe = x.expand(shape).contiguous();
    const auto [ae, a_stride] = as_kernel_param(a, shape);
    const auto [be, b_stride] = as_kernel_param(b, shape);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "beta_cdf_backward_cuda", [&] {
      beta_pdf_times_grad_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          ge.const_data_ptr<scalar_t>(), xe.const_data_ptr<scalar_t>(), ae.const_data_ptr<scalar_t>(),
          be.const_data_ptr<scalar_t>(), a_stride, b_stride, full.mutable_data_ptr<scalar_t>(), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return x.sizes() == c10::IntArrayRef(shape) ? full : at::sum_to(full, x.sizes());
}

}  // namespace
}  // namespace condkernels

TORCH_LIBRARY_IMPL(condkernels, CUDA, m) {
  m.impl("beta_cdf", &condkernels::beta_cdf_cuda);
  m.impl("_beta_cdf_backward", &condkernels::beta_cdf_backward_cuda);
}
