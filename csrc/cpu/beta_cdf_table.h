// Per-(a, b) piecewise-polynomial tables of I_x(a, b) and the Beta(a, b) density, for calls that
// evaluate many values with one (a, b).
//
// With t = x below the flip point s = (a+1)/(a+b+2) (orientation (a, b)) and t = 1 - x above it
// (orientation (b, a), the result then 1 - tail), writing (p, q) for the orientation's shapes:
//   tail    = t^p H(t),        H(t) = (1-t)^q cf(t; p, q) / (p B(a, b))
//   density = t^(p-1) Q(t),    Q(t) = (1-t)^(q-1) / B(a, b)
// where cf, the value of the continued fraction (the hypergeometric 2F1(p+q, 1; p+1; t)), is
// analytic on the whole range [0, s] or [0, 1-s]: its only singularity is at t = 1. The end-point
// behaviour t^p stays outside the tables, H and Q are smooth, and each value costs one log, one exp
// (t^p) and two short polynomials instead of a continued fraction, log x, log(1-x) and exps.
// Each range is cut into equal pieces; on each piece H and Q are interpolated at the Chebyshev nodes
// of degree kDegree (H from the exact continued fraction) and stored as monomial coefficients in the
// piece's local variable u in [-1, 1].
//
// A table is accepted only once it matches the exact formulas at the points between its nodes and
// at the piece ends to a relative `accuracy`; the number of pieces doubles until it does, and a pair
// (a, b) that needs more than kMaxPieces per side keeps the exact continued fraction. Building one
// costs a few hundred to a few thousand scalar continued fractions, so tables are cached per
// (a, b, accuracy): the loss is called every step with the same prior.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/beta_cdf_math.h"

namespace condkernels {
namespace cpu {

struct BetaCfTable {
  static constexpr int kDegree = 9;
  static constexpr int kCoefs = kDegree + 1;
  static constexpr int kMaxPieces = 256;

  double a = 0.0, b = 0.0, accuracy = 0.0, lbeta = 0.0;
  double switch_point = 0.0;
  int pieces = 0;                // per side
  double scale[2] = {0.0, 0.0};  // pieces / (length of the side's range)
  // Side 0 ((a, b), t = x) then side 1 ((b, a), t = 1 - x); piece k of side s at
  // (s * pieces + k) * 2 * kCoefs: the kCoefs coefficients of H, then those of Q.
  std::vector<double> coef;
  bool usable = false;

  // H (which = 0) or Q (which = 1) at t for the side.
  double eval(int side, int which, double t) const {
    const double pos = t * scale[side];
    int k = static_cast<int>(pos);
    k = k < 0 ? 0 : (k >= pieces ? pieces - 1 : k);
    const double u = 2.0 * (pos - k) - 1.0;
    const double* c = coef.data() + ((side * pieces + k) * 2 + which) * kCoefs;
    double r = c[kDegree];
    for (int j = kDegree - 1; j >= 0; --j) r = std::fma(r, u, c[j]);
    return r;
  }
};

namespace table_detail {

// H (which = 0) or Q (which = 1) of one side from the exact formulas, to float64 accuracy.
inline double exact(const BetaCfTable& tab, int side, int which, double t) {
  const double p = side == 0 ? tab.a : tab.b, q = side == 0 ? tab.b : tab.a;
  const double log_1mt = std::log1p(-t);
  if (which == 1) return std::exp((q - 1.0) * log_1mt - tab.lbeta);
  return std::exp(q * log_1mt - tab.lbeta) * beta_math::beta_continued_fraction(t, p, q, 1e-15) / p;
}

// Fills the coefficients of H or Q on the piece [lo, hi] of `side`.
inline void fit_piece(const BetaCfTable& tab, int side, int which, double lo, double hi, double* out) {
  constexpr int n = BetaCfTable::kCoefs;
  double f[n], cheb[n];
  for (int j = 0; j < n; ++j) {
    const double node = std::cos(M_PI * (j + 0.5) / n);
    f[j] = exact(tab, side, which, lo + 0.5 * (node + 1.0) * (hi - lo));
  }
  for (int m = 0; m < n; ++m) {
    double s = 0.0;
    for (int j = 0; j < n; ++j) s += f[j] * std::cos(M_PI * m * (j + 0.5) / n);
    cheb[m] = (m == 0 ? 1.0 : 2.0) * s / n;
  }
  // Chebyshev series -> monomials in u: T_{m+1} = 2u T_m - T_{m-1}, accumulated term by term.
  double t_prev[n] = {1.0}, t_cur[n] = {0.0, 1.0};
  for (int j = 0; j < n; ++j) out[j] = 0.0;
  out[0] += cheb[0];
  if (n > 1) out[1] += cheb[1];
  for (int m = 2; m < n; ++m) {
    double t_next[n];
    for (int j = 0; j < n; ++j) t_next[j] = (j > 0 ? 2.0 * t_cur[j - 1] : 0.0) - t_prev[j];
    for (int j = 0; j < n; ++j) {
      out[j] += cheb[m] * t_next[j];
      t_prev[j] = t_cur[j];
      t_cur[j] = t_next[j];
    }
  }
}

inline bool build(BetaCfTable& tab, int pieces) {
  constexpr int n = BetaCfTable::kCoefs;
  const double length[2] = {tab.switch_point, 1.0 - tab.switch_point};
  tab.pieces = pieces;
  tab.coef.assign(static_cast<size_t>(2 * pieces * 2 * n), 0.0);
  for (int side = 0; side < 2; ++side) {
    tab.scale[side] = pieces / length[side];
    for (int k = 0; k < pieces; ++k) {
      const double lo = length[side] * k / pieces, hi = length[side] * (k + 1) / pieces;
      for (int which = 0; which < 2; ++which)
        fit_piece(tab, side, which, lo, hi, tab.coef.data() + ((side * pieces + k) * 2 + which) * n);
    }
  }
  // Check between the nodes (Chebyshev extrema, ends included), where interpolation errs most.
  for (int side = 0; side < 2; ++side) {
    for (int k = 0; k < pieces; ++k) {
      for (int j = 0; j <= n; ++j) {
        const double u = std::cos(M_PI * j / n);
        double t = length[side] * (k + 0.5 * (u + 1.0)) / pieces;
        if (side == 1 && t >= length[side]) t = std::nextafter(length[side], 0.0);
        for (int which = 0; which < 2; ++which) {
          const double want = exact(tab, side, which, t);
          const double got = tab.eval(side, which, t);
          if (!(std::fabs(got - want) <= tab.accuracy * std::fabs(want))) return false;
        }
      }
    }
  }
  return true;
}

}  // namespace table_detail

// The table for (a, b) at relative accuracy `accuracy`, or null where (a, b) is invalid or no table
// within kMaxPieces reaches it. Thread-safe; the last few tables are kept.
inline std::shared_ptr<const BetaCfTable> beta_cf_table(double a, double b, double accuracy) {
  if (!beta_math::valid_shape(a, b)) return nullptr;
  static std::mutex mutex;
  static std::vector<std::shared_ptr<const BetaCfTable>> cache;
  constexpr size_t kCached = 8;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& t : cache)
    if (t->a == a && t->b == b && t->accuracy == accuracy) return t->usable ? t : nullptr;
  auto tab = std::make_shared<BetaCfTable>();
  tab->a = a;
  tab->b = b;
  tab->accuracy = accuracy;
  tab->lbeta = beta_math::log_beta(a, b);
  tab->switch_point = (a + 1.0) / (a + b + 2.0);
  for (int pieces = 2; pieces <= BetaCfTable::kMaxPieces && !tab->usable; pieces *= 2)
    tab->usable = table_detail::build(*tab, pieces);
  if (!tab->usable) tab->coef.clear();
  if (cache.size() >= kCached) cache.erase(cache.begin());
  cache.push_back(tab);
  return tab->usable ? tab : nullptr;
}

}  // namespace cpu
}  // namespace condkernels
