// Schemas of beta_cdf and its backward, and the argument checks every backend shares.
#include "ops/beta_cdf.h"

#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

namespace condkernels {

std::vector<int64_t> check_beta_cdf_args(const at::Tensor& x, const at::Tensor& a,
                                         const at::Tensor& b) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), "beta_cdf: x must be floating point, got ", dtype);
  TORCH_CHECK(a.scalar_type() == dtype, "beta_cdf: a has dtype ", a.scalar_type(), " but x has ",
              dtype);
  TORCH_CHECK(b.scalar_type() == dtype, "beta_cdf: b has dtype ", b.scalar_type(), " but x has ",
              dtype);
  TORCH_CHECK(a.device() == x.device(), "beta_cdf: a is on ", a.device(), " but x is on ",
              x.device());
  TORCH_CHECK(b.device() == x.device(), "beta_cdf: b is on ", b.device(), " but x is on ",
              x.device());
  c10::DimVector shape_xa;
  try {
    shape_xa = at::infer_size_dimvector(x.sizes(), a.sizes());
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "beta_cdf: a of shape ", a.sizes(), " does not broadcast with x of shape ",
                x.sizes());
  }
  try {
    auto shape = at::infer_size_dimvector(shape_xa, b.sizes());
    return std::vector<int64_t>(shape.begin(), shape.end());
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "beta_cdf: b of shape ", b.sizes(), " does not broadcast with x and a (",
                c10::IntArrayRef(shape_xa), ")");
  }
}

}  // namespace condkernels

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  // a and b broadcast with x; invalid (a, b) (<= 0 or NaN) give NaN where they are used.
  m.def("beta_cdf(Tensor x, Tensor a, Tensor b) -> Tensor");
  // grad_x = sum over the broadcast dimensions of grad * beta_pdf(x; a, b).
  m.def("_beta_cdf_backward(Tensor grad, Tensor x, Tensor a, Tensor b) -> Tensor");
}
