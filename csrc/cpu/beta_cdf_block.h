// Vectorised CPU evaluation of I_x(a, b) and the Beta density for many x sharing one (a, b).
//
// The formulas are those of common/beta_cdf_math.h, instantiated on a vector of kLanes doubles
// (GCC/Clang vector extensions). A block holds kGroups independent vectors whose continued fractions
// advance together, so the divisions of one hide the latency of the others; the block runs until
// its slowest lane has converged (finished lanes keep multiplying g by ~1). On x86-64 an AVX2+FMA
// build is chosen at run time, with glibc's vector log/exp (libmvec) where available. Used by the
// beta_cdf and batch_shaping_loss CPU kernels.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/beta_cdf_math.h"
#include "cpu/beta_cdf_table.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CONDKERNELS_X86_DISPATCH 1
#include <immintrin.h>
#if defined(__GLIBC__)
// glibc's libmvec (linked through libm): 4-wide AVX2 log and exp.
extern "C" __m256d _ZGVdN4v_log(__m256d);
extern "C" __m256d _ZGVdN4v_exp(__m256d);
#define CONDKERNELS_LIBMVEC 1
#endif
#endif

// GCC notes that ScalarLaneMath returns a 32-byte vector without AVX; it is only ever called from
// the baseline build, and everything shared with the AVX2 build is always inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace condkernels {
namespace cpu {

constexpr int kLanes = 4;  // one AVX2 register of doubles
constexpr int kGroups = 4;
constexpr int kBlock = kLanes * kGroups;
typedef double LaneVec __attribute__((vector_size(kLanes * sizeof(double))));
typedef int64_t LaneMask __attribute__((vector_size(kLanes * sizeof(int64_t))));

struct ScalarLaneMath {
  static LaneVec log(LaneVec v) {
    for (int i = 0; i < kLanes; ++i) v[i] = std::log(v[i]);
    return v;
  }
  static LaneVec exp(LaneVec v) {
    for (int i = 0; i < kLanes; ++i) v[i] = std::exp(v[i]);
    return v;
  }
};

#if defined(CONDKERNELS_LIBMVEC)
struct Avx2LaneMath {
  template <__m256d (*fn)(__m256d)>
  __attribute__((target("avx2,fma"))) static LaneVec apply(LaneVec v) {
    __m256d native;
    std::memcpy(&native, &v, sizeof(v));
    native = fn(native);
    std::memcpy(&v, &native, sizeof(v));
    return v;
  }
  __attribute__((target("avx2,fma"))) static LaneVec log(LaneVec v) {
    return apply<_ZGVdN4v_log>(v);
  }
  __attribute__((target("avx2,fma"))) static LaneVec exp(LaneVec v) {
    return apply<_ZGVdN4v_exp>(v);
  }
};
#else
using Avx2LaneMath = ScalarLaneMath;
#endif

// Partial-numerator coefficients of both orientations, (a, b) and (b, a), filled as far as the
// slowest block of a call has needed them: the lanes then only multiply by x.
struct CoefficientTable {
  double a, b;
  int filled = 0;
  double even_ab[beta_math::kMaxTerms], even_ba[beta_math::kMaxTerms];
  double odd_ab[beta_math::kMaxTerms], odd_ba[beta_math::kMaxTerms];

  void fill_to(int m) {
    for (; filled <= m; ++filled) {
      even_ab[filled] = beta_math::cf_even_coef(filled, a, b);
      even_ba[filled] = beta_math::cf_even_coef(filled, b, a);
      odd_ab[filled] = beta_math::cf_odd_coef(filled, a, b);
      odd_ba[filled] = beta_math::cf_odd_coef(filled, b, a);
    }
  }
};

// One block of n <= kBlock values; pdf may be null.
template <typename Math>
__attribute__((always_inline)) inline void beta_cdf_pdf_block(const double* x, int n, double a,
                                                              double b, double lbeta, double tol,
                                                              CoefficientTable& coef, double* cdf,
                                                              double* pdf) {
  using namespace beta_math;
  LaneVec xs[kGroups], log_x[kGroups], log_1mx[kGroups], change[kGroups];
  LaneMask inside[kGroups], flip[kGroups];
  LentzState<LaneVec> s[kGroups];
  const double switch_point = (a + 1.0) / (a + b + 2.0);
  for (int k = 0; k < kGroups; ++k) {
    LaneVec xin;
    for (int i = 0; i < kLanes; ++i) xin[i] = k * kLanes + i < n ? x[k * kLanes + i] : 0.5;
    inside[k] = (xin > 0.0) & (xin < 1.0);  // false for NaN
    const LaneVec xc = inside[k] ? xin : 0.5 + LaneVec{};
    log_x[k] = Math::log(xc);
    // 1 - xc is exact for xc >= 0.5 and off by <= 1.1e-16 absolute below: the log stays accurate.
    log_1mx[k] = Math::log(1.0 - xc);
    flip[k] = xc > switch_point;
    xs[k] = flip[k] ? 1.0 - xc : xc;
    change[k] = lentz_step(s[k], (flip[k] ? coef.odd_ba[0] + LaneVec{} : coef.odd_ab[0] + LaneVec{}) * xs[k]);
  }
  for (int m = 1; m < kMaxTerms; ++m) {
    LaneVec worst_vec = change[0];
    for (int k = 1; k < kGroups; ++k) worst_vec = change[k] > worst_vec ? change[k] : worst_vec;
    double worst = 0.0;
    for (int i = 0; i < kLanes; ++i) worst = worst_vec[i] > worst ? worst_vec[i] : worst;
    if (!(worst >= tol)) break;
    if (m >= coef.filled) coef.fill_to(m);
    const double even_ab = coef.even_ab[m], even_ba = coef.even_ba[m];
    const double odd_ab = coef.odd_ab[m], odd_ba = coef.odd_ba[m];
    for (int k = 0; k < kGroups; ++k) {
      const LaneVec even =
          lentz_step(s[k], (flip[k] ? even_ba + LaneVec{} : even_ab + LaneVec{}) * xs[k]);
      const LaneVec odd =
          lentz_step(s[k], (flip[k] ? odd_ba + LaneVec{} : odd_ab + LaneVec{}) * xs[k]);
      change[k] = even > odd ? even : odd;
    }
  }
  for (int k = 0; k < kGroups; ++k) {
    const LaneVec log_front = a * log_x[k] + b * log_1mx[k] - lbeta;
    const LaneVec as = flip[k] ? b + LaneVec{} : a + LaneVec{};
    const LaneVec tail = Math::exp(log_front) / (s[k].g * as);
    const LaneVec out_cdf = flip[k] ? 1.0 - tail : tail;
    LaneVec out_pdf{};
    if (pdf) out_pdf = Math::exp(log_front - log_x[k] - log_1mx[k]);
    for (int i = 0; i < kLanes && k * kLanes + i < n; ++i) {
      const int j = k * kLanes + i;
      if (inside[k][i]) {
        cdf[j] = out_cdf[i];
        if (pdf) pdf[j] = out_pdf[i];
      } else {  // 0, 1, outside, NaN: rare, the scalar conventions of the header
        const CdfPdf f = beta_cdf_pdf(x[j], a, b, lbeta, tol);
        cdf[j] = f.cdf;
        if (pdf) pdf[j] = f.pdf;
      }
    }
  }
}

template <typename Math>
__attribute__((always_inline)) inline void beta_cdf_pdf_many_body(const double* x, int64_t n,
                                                                  double a, double b, double tol,
                                                                  double* cdf, double* pdf) {
  if (!beta_math::valid_shape(a, b)) {
    for (int64_t i = 0; i < n; ++i) {
      cdf[i] = beta_math::quiet_nan();
      if (pdf) pdf[i] = beta_math::quiet_nan();
    }
    return;
  }
  const double lbeta = beta_math::log_beta(a, b);
  CoefficientTable coef;
  coef.a = a;
  coef.b = b;
  coef.fill_to(0);
  for (int64_t i = 0; i < n; i += kBlock) {
    const int len = n - i < kBlock ? static_cast<int>(n - i) : kBlock;
    beta_cdf_pdf_block<Math>(x + i, len, a, b, lbeta, tol, coef, cdf + i, pdf ? pdf + i : nullptr);
  }
}

#ifdef CONDKERNELS_X86_DISPATCH
__attribute__((target("avx2,fma"))) inline void beta_cdf_pdf_many_avx2(
    const double* x, int64_t n, double a, double b, double tol, double* cdf, double* pdf) {
  beta_cdf_pdf_many_body<Avx2LaneMath>(x, n, a, b, tol, cdf, pdf);
}
#endif

inline void beta_cdf_pdf_many_baseline(const double* x, int64_t n, double a, double b, double tol,
                                       double* cdf, double* pdf) {
  beta_cdf_pdf_many_body<ScalarLaneMath>(x, n, a, b, tol, cdf, pdf);
}

// cdf[i] = I_{x[i]}(a, b) and, when pdf is not null, pdf[i] = the Beta(a, b) density at x[i].
inline void beta_cdf_pdf_many(const double* x, int64_t n, double a, double b, double tol,
                              double* cdf, double* pdf) {
#ifdef CONDKERNELS_X86_DISPATCH
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return beta_cdf_pdf_many_avx2(x, n, a, b, tol, cdf, pdf);
#endif
  beta_cdf_pdf_many_baseline(x, n, a, b, tol, cdf, pdf);
}

// The same outputs through a BetaCfTable (cpu/beta_cdf_table.h): tail = t^p H(t) and
// density = t^p Q(t) / t, one log and one exp per value; the end-point conventions as above.
template <typename Math>
__attribute__((always_inline)) inline void beta_cdf_pdf_table_body(const double* x, int64_t n,
                                                                   const BetaCfTable& tab,
                                                                   double* cdf, double* pdf) {
  using namespace beta_math;
  constexpr int kC = BetaCfTable::kCoefs;
  const double a = tab.a, b = tab.b, s = tab.switch_point;
  const double top = tab.pieces - 1;
  const double* coef = tab.coef.data();
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const int len = n - i0 < kLanes ? static_cast<int>(n - i0) : kLanes;
    LaneVec xin;
    for (int l = 0; l < kLanes; ++l) xin[l] = l < len ? x[i0 + l] : 0.5;
    const LaneMask inside = (xin > 0.0) & (xin < 1.0);  // false for NaN
    const LaneVec xc = inside ? xin : 0.5 + LaneVec{};
    const LaneMask flip = xc > s;
    // 1 - xc is exact for xc >= 0.5 and off by <= 1.1e-16 absolute below (where it is > 0.5).
    const LaneVec t = flip ? 1.0 - xc : xc;
    const LaneVec p = flip ? b + LaneVec{} : a + LaneVec{};
    const LaneVec pos = t * (flip ? tab.scale[1] + LaneVec{} : tab.scale[0] + LaneVec{});
    LaneVec piece;
    int64_t idx[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const double k = pos[l] < top ? std::floor(pos[l]) : top;  // t <= the range's end
      piece[l] = k;
      idx[l] = (static_cast<int64_t>(k) + (flip[l] ? tab.pieces : 0)) * 2 * kC;
    }
    const LaneVec u = 2.0 * (pos - piece) - 1.0;
    LaneVec h, q = LaneVec{};
    if (idx[0] == idx[1] && idx[0] == idx[2] && idx[0] == idx[3]) {
      // One piece for all lanes -- the rule for sorted input (the loss): broadcast coefficients.
      const double* c = coef + idx[0];
      h = c[kC - 1] + LaneVec{};
      for (int j = kC - 2; j >= 0; --j) h = h * u + c[j];
      if (pdf) {
        q = c[2 * kC - 1] + LaneVec{};
        for (int j = 2 * kC - 2; j >= kC; --j) q = q * u + c[j];
      }
    } else {
      for (int l = 0; l < kLanes; ++l) h[l] = coef[idx[l] + kC - 1];
      for (int j = kC - 2; j >= 0; --j) {
        LaneVec cj;
        for (int l = 0; l < kLanes; ++l) cj[l] = coef[idx[l] + j];
        h = h * u + cj;
      }
      if (pdf) {
        for (int l = 0; l < kLanes; ++l) q[l] = coef[idx[l] + 2 * kC - 1];
        for (int j = 2 * kC - 2; j >= kC; --j) {
          LaneVec cj;
          for (int l = 0; l < kLanes; ++l) cj[l] = coef[idx[l] + j];
          q = q * u + cj;
        }
      }
    }
    const LaneVec power = Math::exp(p * Math::log(t));  // t^p
    const LaneVec tail = power * h;
    const LaneVec out_cdf = flip ? 1.0 - tail : tail;
    LaneVec out_pdf{};
    if (pdf) out_pdf = power * q / t;
    for (int l = 0; l < len; ++l) {
      if (inside[l]) {
        cdf[i0 + l] = out_cdf[l];
        if (pdf) pdf[i0 + l] = out_pdf[l];
      } else {  // 0, 1, outside, NaN: the scalar conventions of the header
        const CdfPdf f = beta_cdf_pdf(x[i0 + l], a, b, tab.lbeta, 1e-15);
        cdf[i0 + l] = f.cdf;
        if (pdf) pdf[i0 + l] = f.pdf;
      }
    }
  }
}

#ifdef CONDKERNELS_X86_DISPATCH
__attribute__((target("avx2,fma"))) inline void beta_cdf_pdf_table_avx2(
    const double* x, int64_t n, const BetaCfTable& tab, double* cdf, double* pdf) {
  beta_cdf_pdf_table_body<Avx2LaneMath>(x, n, tab, cdf, pdf);
}
#endif

inline void beta_cdf_pdf_table_baseline(const double* x, int64_t n, const BetaCfTable& tab,
                                        double* cdf, double* pdf) {
  beta_cdf_pdf_table_body<ScalarLaneMath>(x, n, tab, cdf, pdf);
}

// beta_cdf_pdf_many for tab.a, tab.b through the table.
inline void beta_cdf_pdf_many(const double* x, int64_t n, const BetaCfTable& tab, double* cdf,
                              double* pdf) {
#ifdef CONDKERNELS_X86_DISPATCH
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) return beta_cdf_pdf_table_avx2(x, n, tab, cdf, pdf);
#endif
  beta_cdf_pdf_table_baseline(x, n, tab, cdf, pdf);
}

// Accuracy asked of a table, relative to the continued fraction, per output dtype (see
// cf_tolerance), and the number of values from which building one pays.
template <typename scalar_t>
constexpr double table_accuracy() {
  return sizeof(scalar_t) >= 8 ? 1e-14 : 1e-9;
}
constexpr int64_t kTableMinValues = 1 << 14;

}  // namespace cpu
}  // namespace condkernels
