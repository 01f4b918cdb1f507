// pooled_mlp: the head of CondConv's routers and of the batch-shaping gates as one op,
//
//   out = w2 relu(w1 mean_hw(x) + b1) + b2      (or w1 mean_hw(x) + b1 without w2),
//
// so that a network at batch 1 pays one dispatch per gate instead of five ATen ops and their
// Python calls. Schema, checks and the ATen composition (every device and dtype, fake tensors
// too): here; CPU kernel (float, double): csrc/cpu/pooled_mlp.cpp; Python function and autograd:
// condkernels/ops/pooled_mlp.py; tests: python_tests/test_pooled_mlp.py.
#include "ops/pooled_mlp.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace condkernels {
namespace {

void check_same(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "pooled_mlp: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "pooled_mlp: ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

void check_layer(const at::Tensor& w, const std::optional<at::Tensor>& b, const char* w_name, const char* b_name,
                 int64_t in_features, const at::Tensor& x) {
  check_same(w, w_name, x);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == in_features, "pooled_mlp: ", w_name, " must be (out_features, ",
              in_features, "), got ", w.sizes());
  if (b) {
    check_same(*b, b_name, x);
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "pooled_mlp: ", b_name, " must be (", w.size(0),
                ",), got ", b->sizes());
  }
}

}  // namespace

void check_pooled_mlp_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                           const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "pooled_mlp: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, "pooled_mlp: x must be (B, C, H, W), got ", x.sizes());
  check_layer(w1, b1, "w1", "b1", x.size(1), x);
  TORCH_CHECK(w2 || !b2, "pooled_mlp: b2 given without w2");
  if (w2) check_layer(*w2, b2, "w2", "b2", w1.size(0), x);
}

at::Tensor pooled_mlp_composite(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2) {
  check_pooled_mlp_args(x, w1, b1, w2, b2);
  at::Tensor h = at::linear(x.mean({2, 3}), w1, b1);
  if (!w2) return h;
  return at::linear(h.relu_(), *w2, b2);
}

}  // namespace condkernels

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  m.def("pooled_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2) -> Tensor");
}

TORCH_LIBRARY_IMPL(condkernels, CompositeExplicitAutograd, m) {
  m.impl("pooled_mlp", &condkernels::pooled_mlp_composite);
}
