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

void check_batch_shaping_loss_backward_args(const at::Tensor& grad_loss,
                                            const at::Tensor& sorted_grad,
                                            const at::Tensor& sort_index) {
  TORCH_CHECK(grad_loss.numel() == 1,
              "_batch_shaping_loss_backward: grad_loss must hold one value, got shape ",
              grad_loss.sizes());
  TORCH_CHECK(sorted_grad.sizes() == sort_index.sizes(),
              "_batch_shaping_loss_backward: sorted_grad ", sorted_grad.sizes(),
              " and sort_index ", sort_index.sizes(), " must have the same shape");
  TORCH_CHECK(sorted_grad.dim() >= 1 && sorted_grad.size(0) >= 1,
              "_batch_shaping_loss_backward: sorted_grad must have a batch dimension");
  TORCH_CHECK(sort_index.scalar_type() == at::kLong,
              "_batch_shaping_loss_backward: sort_index must be int64, got ",
              sort_index.scalar_type());
  TORCH_CHECK(grad_loss.scalar_type() == sorted_grad.scalar_type(),
              "_batch_shaping_loss_backward: grad_loss has dtype ", grad_loss.scalar_type(),
              " but sorted_grad has ", sorted_grad.scalar_type());
  TORCH_CHECK(grad_loss.device() == sorted_grad.device() &&
                  sort_index.device() == sorted_grad.device(),
              "_batch_shaping_loss_backward: grad_loss, sorted_grad and sort_index must be on one "
              "device");
}

}  // namespace condkernels

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  // prior_a, prior_b: (alpha, beta) for "beta", (mean, std) for "gaussian", (low, high) for
  // "uniform". Outputs: the loss (0-d), and what the backward needs: sorted_grad[i, g] is
  // d loss / d (i-th smallest value of gate g) and sort_index[i, g] the batch row it came from
  // (both shaped like gates).
  m.def(
      "batch_shaping_loss(Tensor gates, str prior, float prior_a, float prior_b, str reduction, "
      "float pdf_lo, float pdf_hi, float eps) -> (Tensor loss, Tensor sorted_grad, Tensor sort_index)");
  // grad_gates[sort_index[i, g], g] = grad_loss * sorted_grad[i, g].
  m.def(
      "_batch_shaping_loss_backward(Tensor grad_loss, Tensor sorted_grad, Tensor sort_index) "
      "-> Tensor");
}
