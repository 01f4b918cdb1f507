// The regularised incomplete beta function I_x(a, b), the Beta density, and the cdf/pdf of every
// batch-shaping prior, written once for the CPU kernels and the CUDA kernels.
//
// All arithmetic is in double whatever the tensor dtype: the prefactor x^a (1-x)^b / B(a, b) is the
// exponential of a sum of terms of size ~a*|log x|, which cancel to a small number; in float32 that
// cancellation alone costs more than the 2e-6 absolute accuracy asked for at a, b ~ 50.
//
// I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * 1 / (1 + d_1 / (1 + d_2 / (1 + ...)))
//   d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),   d_{2m} = m(b-m) x / ((a+2m-1)(a+2m))
// The fraction converges quickly for x < (a+1)/(a+b+2); above that point the symmetry
// I_x(a, b) = 1 - I_{1-x}(b, a) is used. It is evaluated with the modified Lentz algorithm.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace condkernels {
namespace beta_math {

// Priors of the batch-shaping loss; the values are part of the op schema (as strings) only.
enum class Prior : int { kBeta = 0, kGaussian = 1, kUniform = 2 };

// Lentz's stand-in for a zero denominator; small enough never to matter, large enough that the
// product of two of them (see lentz_step) stays a normal double.
constexpr double kTiny = 1e-150;
// Upper bound on continued-fraction terms; a, b <= 50 need well under 200 at 1e-15.
constexpr int kMaxTerms = 1000;

// Relative change of the fraction at which it has converged, per output dtype: float32 results
// need far fewer terms than float64 ones.
template <typename scalar_t>
CK_INLINE constexpr double cf_tolerance() {
  return sizeof(scalar_t) >= 8 ? 1e-15 : 1e-7;
}

CK_INLINE double quiet_nan() { return std::numeric_limits<double>::quiet_NaN(); }

CK_INLINE double log_gamma(double v) {
#if defined(__CUDA_ARCH__)
  return ::lgamma(v);
#elif defined(__GLIBC__)
  int sign;  // lgamma writes the global signgam; lgamma_r keeps the parallel CPU loops race-free
  return ::lgamma_r(v, &sign);
#else
  return std::lgamma(v);
#endif
}

// log B(a, b), computed once per (a, b) and passed to the per-element functions.
CK_INLINE double log_beta(double a, double b) {
  return log_gamma(a) + log_gamma(b) - log_gamma(a + b);
}

// (a, b) for which I_x(a, b) is defined; NaN parameters fail too.
CK_INLINE bool valid_shape(double a, double b) { return a > 0.0 && b > 0.0 && a < INFINITY && b < INFINITY; }

// The continued fraction is evaluated at (x, a, b) = (x, a, b) or, past the switch point, at
// (1-x, b, a). Flipping is decided once per element and shared by the CPU and CUDA loops.
CK_INLINE bool use_symmetry(double x, double a, double b) { return x > (a + 1.0) / (a + b + 2.0); }

// Partial numerators d_{2m+1} = odd_coef * x and d_{2m} = even_coef * x (see the top of this
// file).
CK_INLINE double cf_odd_coef(int m, double a, double b) {
  return -(a + m) * (a + b + m) / ((a + 2 * m) * (a + 2 * m + 1));
}
CK_INLINE double cf_even_coef(int m, double a, double b) {
  return m * (b - m) / ((a + 2 * m - 1) * (a + 2 * m));
}

// The helpers below are templates over V = double or a GCC/Clang vector of doubles: the CPU
// kernels run several lanes through exactly these formulas, the CUDA kernels one value per thread.
// On the host they are always inlined: an out-of-line copy would be compiled for the baseline ISA
// and called from AVX2 code with a different calling convention for the vector arguments.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define CK_LANE_INLINE CK_INLINE
#else
#define CK_LANE_INLINE inline __attribute__((always_inline))
#endif

template <typename V>
CK_LANE_INLINE V abs_value(V v) {
  return v < 0.0 ? -v : v;
}

template <typename V>
CK_LANE_INLINE V avoid_zero(V v) {
  return abs_value(v) < kTiny ? kTiny + V{} : v;
}

// State of the modified Lentz algorithm for g = 1 + d_1 / (1 + d_2 / (1 + ...)).
template <typename V>
struct LentzState {
  V g = 1.0 + V{}, c = 1.0 + V{}, d = V{};
};

// Adds one partial numerator to g; returns |delta - 1|, the relative change of g. The update
// C' = 1 + d_k / C, D' = 1 / (1 + d_k D) needs 1/C and 1/q (q = 1 + d_k D): both come from the one
// division 1 / (C q), divisions being the slowest step of the loop.
template <typename V>
CK_LANE_INLINE V lentz_step(LentzState<V>& s, V term) {
  const V q = avoid_zero(1.0 + term * s.d);
  const V r = 1.0 / (s.c * q);
  const V c = avoid_zero(1.0 + term * (r * q));
  s.d = r * s.c;
  s.c = c;
  const V delta = c * s.d;
  s.g = s.g * delta;
  return abs_value(delta - 1.0);
}

// 1 / g for the (already flipped) arguments.
CK_INLINE double beta_continued_fraction(double x, double a, double b, double tol) {
  LentzState<double> s;
  double change = lentz_step(s, cf_odd_coef(0, a, b) * x);
  for (int m = 1; m < kMaxTerms && change >= tol; ++m) {
    const double even = lentz_step(s, cf_even_coef(m, a, b) * x);
    const double odd = lentz_step(s, cf_odd_coef(m, a, b) * x);
    change = even > odd ? even : odd;
  }
  return 1.0 / s.g;
}

// a*log(x), taking 0*log(0) as 0 (a density with exponent 0 is 1 at the end point).
CK_INLINE double mul_log(double a, double log_x) { return a == 0.0 ? 0.0 : a * log_x; }

// Beta(a, b) density from log x, log(1 - x) and log B(a, b); x must lie in [0, 1].
CK_INLINE double beta_pdf_from_logs(double log_x, double log_1mx, double a, double b, double lbeta) {
  return exp(mul_log(a - 1.0, log_x) + mul_log(b - 1.0, log_1mx) - lbeta);
}

struct CdfPdf {
  double cdf, pdf;
};

// I_x(a, b) and the Beta(a, b) density at x together: they share log x, log(1-x) and log B(a, b).
// x <= 0 gives (0, 0), x >= 1 gives (1, 0), NaN x or invalid (a, b) give NaN.
CK_INLINE CdfPdf beta_cdf_pdf(double x, double a, double b, double lbeta, double tol) {
  if (!valid_shape(a, b) || x != x) return {quiet_nan(), quiet_nan()};
  if (x <= 0.0) return {0.0, x == 0.0 ? beta_pdf_from_logs(-INFINITY, 0.0, a, b, lbeta) : 0.0};
  if (x >= 1.0) return {1.0, x == 1.0 ? beta_pdf_from_logs(0.0, -INFINITY, a, b, lbeta) : 0.0};
  const double log_x = log(x), log_1mx = log1p(-x);
  const bool flip = use_symmetry(x, a, b);
  const double xs = flip ? 1.0 - x : x, as = flip ? b : a, bs = flip ? a : b;
  const double log_front = a * log_x + b * log_1mx - lbeta;  // symmetric in the flip
  const double tail = exp(log_front) * beta_continued_fraction(xs, as, bs, tol) / as;
  return {flip ? 1.0 - tail : tail, exp(log_front - log_x - log_1mx)};
}

CK_INLINE double beta_cdf(double x, double a, double b, double lbeta, double tol) {
  return beta_cdf_pdf(x, a, b, lbeta, tol).cdf;
}

// Beta density with the conventions of beta_cdf: zero outside [0, 1], the limit at the end points.
CK_INLINE double beta_pdf(double x, double a, double b, double lbeta) {
  if (!valid_shape(a, b) || x != x) return quiet_nan();
  if (x < 0.0 || x > 1.0) return 0.0;
  return beta_pdf_from_logs(log(x), log1p(-x), a, b, lbeta);
}

// Normal(mean, std) prior.
CK_INLINE CdfPdf gaussian_cdf_pdf(double x, double mean, double std) {
  const double z = (x - mean) / std;
  constexpr double kInvSqrt2 = 0.70710678118654752440;
  constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  return {0.5 * erfc(-z * kInvSqrt2), kInvSqrt2Pi / std * exp(-0.5 * z * z)};
}

// Uniform(low, high) prior; NaN stays NaN because both comparisons are false for it.
CK_INLINE CdfPdf uniform_cdf_pdf(double x, double low, double high) {
  if (x < low) return {0.0, 0.0};
  if (x > high) return {1.0, 0.0};
  const double inv_width = 1.0 / (high - low);
  return {(x - low) * inv_width, x == x ? inv_width : x};
}

// The cdf and density of any prior at x (x already clamped where the prior asks for it).
CK_INLINE CdfPdf prior_cdf_pdf(Prior prior, double x, double p0, double p1, double lbeta,
                               double tol) {
  switch (prior) {
    case Prior::kBeta: return beta_cdf_pdf(x, p0, p1, lbeta, tol);
    case Prior::kGaussian: return gaussian_cdf_pdf(x, p0, p1);
    default: return uniform_cdf_pdf(x, p0, p1);
  }
}

// One sorted value's contribution to the batch-shaping loss (e - F)^2 and to its gradient
// -2 (e - F) clip(pdf), before the reduction's scale. `x` is already clamped where the prior
// asks for it.
struct LossTerm {
  double loss, grad;
};

CK_INLINE double clip_pdf(double pdf, double lo, double hi) {
  return pdf < lo ? lo : (pdf > hi ? hi : pdf);  // NaN passes through
}

CK_INLINE LossTerm loss_term(double target, CdfPdf f, double pdf_lo, double pdf_hi) {
  const double residual = target - f.cdf;
  return {residual * residual, -2.0 * residual * clip_pdf(f.pdf, pdf_lo, pdf_hi)};
}

// Values below eps or above 1 - eps are evaluated at the bound (the beta density is unbounded at
// 0 and 1); NaN passes through.
CK_INLINE double clamp_unit(double x, double eps) {
  return x < eps ? eps : (x > 1.0 - eps ? 1.0 - eps : x);
}

}  // namespace beta_math
}  // namespace condkernels
