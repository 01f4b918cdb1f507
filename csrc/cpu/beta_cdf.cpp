// CPU kernels of beta_cdf and its backward.
//
// One (a, b) for every x -- the common case, and the one the batch-shaping loss needs -- runs the
// vectorised block evaluation of cpu/beta_cdf_block.h; tensors of parameters are broadcast and
// evaluated one element at a time with the scalar functions of common/beta_cdf_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/beta_cdf_math.h"
#include "cpu/beta_cdf_block.h"
#include "ops/beta_cdf.h"

namespace condkernels {
namespace {

constexpr int64_t kChunk = 256;  // values converted to double per inner call
constexpr int64_t kGrain = 2048;

bool one_shape_pair(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                    c10::IntArrayRef shape) {
  return a.numel() == 1 && b.numel() == 1 && x.sizes() == shape;
}

at::Tensor beta_cdf_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b) {
  const auto shape = check_beta_cdf_args(x, a, b);
  auto out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  if (one_shape_pair(x, a, b, shape)) {
    const auto xc = x.contiguous();
    const double av = a.item<double>(), bv = b.item<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "beta_cdf_cpu", [&] {
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      scalar_t* yp = out.mutable_data_ptr<scalar_t>();
      const double tol = beta_math::cf_tolerance<scalar_t>();
      // Many values: the continued fraction through a per-(a, b) table (cpu/beta_cdf_table.h).
      const auto table = xc.numel() >= cpu::kTableMinValues
                             ? cpu::beta_cf_table(av, bv, cpu::table_accuracy<scalar_t>())
                             : nullptr;
      at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
        double xin[kChunk], cdf[kChunk];
        for (int64_t i = begin; i < end; i += kChunk) {
          const int64_t n = std::min(kChunk, end - i);
          for (int64_t k = 0; k < n; ++k) xin[k] = static_cast<double>(xp[i + k]);
          if (table) {
            cpu::beta_cdf_pdf_many(xin, n, *table, cdf, nullptr);
          } else {
            cpu::beta_cdf_pdf_many(xin, n, av, bv, tol, cdf, nullptr);
          }
          for (int64_t k = 0; k < n; ++k) yp[i + k] = static_cast<scalar_t>(cdf[k]);
        }
      });
    });
    return out;
  }
  const auto xe = x.expand(shape).contiguous(), ae = a.expand(shape).contiguous(),
             be = b.expand(shape).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "beta_cdf_cpu", [&] {
    const scalar_t *xp = xe.const_data_ptr<scalar_t>(), *ap = ae.const_data_ptr<scalar_t>(),
                   *bp = be.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    const double tol = beta_math::cf_tolerance<scalar_t>();
    at::parallel_for(0, out.numel(), kGrain / 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const double av = ap[i], bv = bp[i];
        const double lbeta = beta_math::valid_shape(av, bv) ? beta_math::log_beta(av, bv) : 0.0;
        yp[i] = static_cast<scalar_t>(beta_math::beta_cdf(xp[i], av, bv, lbeta, tol));
      }
    });
  });
  return out;
}

at::Tensor beta_cdf_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a,
                                 const at::Tensor& b) {
  const auto shape = check_beta_cdf_args(x, a, b);
  TORCH_CHECK(grad.sizes() == c10::IntArrayRef(shape), "_beta_cdf_backward: grad has shape ",
              grad.sizes(), " but the output of beta_cdf has shape ", c10::IntArrayRef(shape));
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), "_beta_cdf_backward: grad has dtype ",
              grad.scalar_type(), " but x has ", x.scalar_type());
  auto grad_full = at::empty(shape, x.options());
  if (grad_full.numel() != 0) {
    const auto ge = grad.contiguous(), xe = x.expand(shape).contiguous(),
               ae = a.expand(shape).contiguous(), be = b.expand(shape).contiguous();
    const bool one_pair = a.numel() == 1 && b.numel() == 1;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "beta_cdf_backward_cpu", [&] {
      const scalar_t *gp = ge.const_data_ptr<scalar_t>(), *xp = xe.const_data_ptr<scalar_t>(),
                     *ap = ae.const_data_ptr<scalar_t>(), *bp = be.const_data_ptr<scalar_t>();
      scalar_t* op = grad_full.mutable_data_ptr<scalar_t>();
      const double shared_lbeta = one_pair && beta_math::valid_shape(ap[0], bp[0])
                                      ? beta_math::log_beta(ap[0], bp[0]) : 0.0;
      at::parallel_for(0, grad_full.numel(), kGrain / 4, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const double av = ap[i], bv = bp[i];
          const double lbeta = one_pair ? shared_lbeta
                                        : (beta_math::valid_shape(av, bv) ? beta_math::log_beta(av, bv) : 0.0);
          op[i] = static_cast<scalar_t>(static_cast<double>(gp[i]) *
                                        beta_math::beta_pdf(xp[i], av, bv, lbeta));
        }
      });
    });
  }
  return x.sizes() == c10::IntArrayRef(shape) ? grad_full : at::sum_to(grad_full, x.sizes());
}

}  // namespace
}  // namespace condkernels

TORCH_LIBRARY_IMPL(condkernels, CPU, m) {
  m.impl("beta_cdf", &condkernels::beta_cdf_cpu);
  m.impl("_beta_cdf_backward", &condkernels::beta_cdf_backward_cpu);
}
