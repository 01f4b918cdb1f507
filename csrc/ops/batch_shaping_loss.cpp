// Schemas of batch_shaping_loss and its backward, and the argument checks every backend shares.
#include "ops/batch_shaping_loss.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace condkernels {

BatchShapingArgs check_batch_shaping_loss_args(const at::Tensor& gates, c10::string_view prior,
                                               double prior_a, double prior_b,
                                               c10::string_view reduction, double pdf_lo,
                                               double pdf_hi, double eps) {
  using beta_math::Prior;
  BatchShapingArgs args{};
  TORCH_CHECK(at::isFloatingType(gates.scalar_type()),
              "batch_shaping_loss: gates must be floating point, got ", gates.scalar_type());
  TORCH_CHECK(gates.dim() >= 1,
              "batch_shaping_loss: gates must have a batch dimension (N, ...), got a 0-d tensor");
  args.batch = gates.size(0);
  TORCH_CHECK(args.batch >= 1, "batch_shaping_loss: gates must hold at least 1 example, got shape ",
              gates.sizes());
  TORCH_CHECK(args.batch <= std::numeric_limits<int32_t>::max(),
              "batch_shaping_loss: gates has ", args.batch, " examples, more than 2^31 - 1");
  args.gates = gates.numel() / args.batch;
  TORCH_CHECK(args.gates >= 1, "batch_shaping_loss: gates must hold at least one gate per example, got shape ",
              gates.sizes());

  if (prior == "beta") {
    args.prior = Prior::kBeta;
    TORCH_CHECK(prior_a > 0 && std::isfinite(prior_a),
                "batch_shaping_loss: alpha must be a positive number, got ", prior_a);
    TORCH_CHECK(prior_b > 0 && std::isfinite(prior_b),
                "batch_shaping_loss: beta must be a positive number, got ", prior_b);
  } else if (prior == "gaussian") {
    args.prior = Prior::kGaussian;
    TORCH_CHECK(std::isfinite(prior_a), "batch_shaping_loss: the gaussian mean must be finite, got ",
                prior_a);
    TORCH_CHECK(prior_b > 0 && std::isfinite(prior_b),
                "batch_shaping_loss: the gaussian std must be positive, got ", prior_b);
  } else if (prior == "uniform") {
    args.prior = Prior::kUniform;
    TORCH_CHECK(std::isfinite(prior_a) && std::isfinite(prior_b) && prior_a < prior_b,
                "batch_shaping_loss: the uniform prior needs finite low < high, got (", prior_a,
                ", ", prior_b, ")");
  } else {
    TORCH_CHECK(false, "batch_shaping_loss: prior must be 'beta', 'gaussian' or 'uniform', got '",
                prior, "'");
  }
  args.prior_a = prior_a;
  args.prior_b = prior_b;

  if (reduction == "paper") {
    args.reduction = BatchShapingReduction::kPaper;
  } else if (reduction == "sum") {
    args.reduction = BatchShapingReduction::kSum;
  } else if (reduction == "mean") {
    args.reduction = BatchShapingReduction::kMean;
  } else {
    TORCH_CHECK(false, "batch_shaping_loss: reduction must be 'paper', 'sum' or 'mean', got '",
                reduction, "'");
  }
  TORCH_CHECK(pdf_lo >= 0 && pdf_lo <= pdf_hi,
              "batch_shaping_loss: pdf_clip must be (low, high) with 0 <= low <= high, got (",
              pdf_lo, ", ", pdf_hi, ")");
  TORCH_CHECK(eps >= 0 && eps < 0.5, "batch_shaping_loss: eps must be in [0, 0.5), got ", eps);
  args.pdf_lo = pdf_lo;
  args.pdf_hi = pdf_hi;
  args.eps = eps;
  return args;
}

}  // namespace condkernels

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  // prior_a, prior_b: (alpha, beta) for "beta", (mean, std) for "gaussian", (low, high) for
  // "uniform". Outputs: the loss (0-d) and grad_gates = d loss / d gates, already put back at each
  // value's own batch row (shaped like gates); the backward is grad_loss * grad_gates.
  m.def(
      "batch_shaping_loss(Tensor gates, str prior, float prior_a, float prior_b, str reduction, "
      "float pdf_lo, float pdf_hi, float eps) -> (Tensor loss, Tensor grad_gates)");
}
