// batch_shaping_loss: per gate, sort its N values over the batch and compare their prior CDF with
// the targets i/(N+1) (eq. 2 of the batch-shaping paper). The forward also puts each sorted
// position's gradient back at its value's own batch row (a scatter through the sort order while the
// column is in cache), so the backward is one multiply by the incoming gradient and no sort
// indices are kept.
//
// Math (shared by CPU and CUDA): csrc/common/beta_cdf_math.h. Schema:
// csrc/ops/batch_shaping_loss.cpp. CPU kernels: csrc/cpu/batch_shaping_loss.cpp; CUDA kernels:
// csrc/cuda/batch_shaping_loss.cu; Triton path: condkernels/triton/batch_shaping_loss.py; Python
// function, fakes, autograd and the process-group gather: condkernels/ops/batch_shaping.py;
// tests: python_tests/test_batch_shaping.py; benchmark: condkernels/bench/batch_shaping.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <string>

#include "common/beta_cdf_math.h"

namespace condkernels {

enum class BatchShapingReduction : int { kPaper = 0, kSum = 1, kMean = 2 };

struct BatchShapingArgs {
  beta_math::Prior prior;
  double prior_a, prior_b;  // (alpha, beta), (mean, std) or (low, high)
  BatchShapingReduction reduction;
  double pdf_lo, pdf_hi, eps;
  int64_t batch, gates;  // N and the number of gate positions G (the product of dims 1..)

  // The factor each squared residual is multiplied by: 1/N, 1 or 1/(N G).
  double scale() const {
    switch (reduction) {
      case BatchShapingReduction::kPaper: return 1.0 / static_cast<double>(batch);
      case BatchShapingReduction::kSum: return 1.0;
      default: return 1.0 / (static_cast<double>(batch) * static_cast<double>(gates));
    }
  }
  // Whether values are clamped to [eps, 1 - eps] before the prior is evaluated.
  bool clamps() const { return prior == beta_math::Prior::kBeta; }
};

// Validates the arguments of batch_shaping_loss with errors naming the argument.
BatchShapingArgs check_batch_shaping_loss_args(const at::Tensor& gates, c10::string_view prior,
                                               double prior_a, double prior_b,
                                               c10::string_view reduction, double pdf_lo,
                                               double pdf_hi, double eps);

}  // namespace condkernels
