// Per-(a, b) piecewise-polynomial stand-in for the continued fraction of I_x(a, b), for calls that
// evaluate many values with one (a, b).
//
// I_x(a, b) = x^a (1-x)^b / (a B(a, b)) * cf(x; a, b), and cf -- the value of the continued fraction,
// the hypergeometric 2F1(a+b, 1; a+1; x) -- is analytic on the whole evaluation range [0, s]
// (s = (a+1)/(a+b+2), the flip point; its only singularity is at x = 1): the x^a and (1-x)^b end-point
// behaviour stays in the prefactor, and cf is smooth enough for short polynomials. Both orientations
// get a table: (a, b) on [0, s] and (b, a) on [0, 1-s]. Each is cut into equal pieces, and on each piece
// cf is interpolated at the Chebyshev nodes of degree kDegree (values from the exact continued
// fraction), stored as monomial coefficients in the piece's local variable u in [-1, 1].
//
// A table is accepted only once it matches the exact continued fraction at the points between its
// nodes and at the piece ends to a relative `accuracy`; the number of pieces doubles until it does,
// and a pair (a, b) that needs more than kMaxPieces per side keeps the exact continued fraction.
// Building one costs a few hundred to a few thousand scalar continued fractions, so tables are
// cached per (a, b, accuracy): the loss is called every step with the same prior.
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

  double a = 0.0, b = 0.0, accuracy = 0.0;
  double switch_point = 0.0;
  int pieces = 0;                // per side
  double scale[2] = {0.0, 0.0};  // pieces / (length of the side's range)
  // Side 0 ((a, b), t = x) then side 1 ((b, a), t = 1 - x); piece k of side s at (s * pieces + k).
  std::vector<double> coef;
  bool usable = false;

  // cf at t for the side (0: t = x <= s, 1: t = 1 - x < 1 - s).
  double eval(int side, double t) const {
    const double pos = t * scale[side];
    int k = static_cast<int>(pos);
    k = k < 0 ? 0 : (k >= pieces ? pieces - 1 : k);
    const double u = 2.0 * (pos - k) - 1.0;
    const double* c = coef.data() + (side * pieces + k) * kCoefs;
    double r = c[kDegree];
    for (int j = kDegree - 1; j >= 0; --j) r = std::fma(r, u, c[j]);
    return r;
  }
};

namespace table_detail {

// The exact continued fraction for one side, to float64 accuracy.
inline double exact_cf(int side, double t, double a, double b) {
  return side == 0 ? beta_math::beta_continued_fraction(t, a, b, 1e-15)
                   : beta_math::beta_continued_fraction(t, b, a, 1e-15);
}

// Fills the coefficients of one piece on [lo, hi] of `side`.
inline void fit_piece(int side, double lo, double hi, double a, double b, double* out) {
  constexpr int n = BetaCfTable::kCoefs;
  double f[n], cheb[n];
  for (int j = 0; j < n; ++j) {
    const double node = std::cos(M_PI * (j + 0.5) / n);
    f[j] = exact_cf(side, lo + 0.5 * (node + 1.0) * (hi - lo), a, b);
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
  tab.coef.assign(static_cast<size_t>(2 * pieces * n), 0.0);
  for (int side = 0; side < 2; ++side) {
    tab.scale[side] = pieces / length[side];
    for (int k = 0; k < pieces; ++k) {
      const double lo = length[side] * k / pieces, hi = length[side] * (k + 1) / pieces;
      fit_piece(side, lo, hi, tab.a, tab.b, tab.coef.data() + (side * pieces + k) * n);
    }
  }
  // Check between the nodes (Chebyshev extrema, ends included), where interpolation errs most.
  for (int side = 0; side < 2; ++side) {
    for (int k = 0; k < pieces; ++k) {
      for (int j = 0; j <= n; ++j) {
        const double u = std::cos(M_PI * j / n);
        double t = length[side] * (k + 0.5 * (u + 1.0)) / pieces;
        if (side == 1 && t >= length[side]) t = std::nextafter(length[side], 0.0);
        const double want = exact_cf(side, t, tab.a, tab.b);
        const double got = tab.eval(side, t);
        if (!(std::fabs(got - want) <= tab.accuracy * std::fabs(want))) return false;
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
