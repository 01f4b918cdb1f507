// Direct depthwise cond_conv2d on the CPU (groups == Cin == Cout, any kernel, stride, dilation and
// asymmetric padding). Each example's k x k filters are mixed from the E experts right where they are
// used (a k*k array per (example, channel) plane in NCHW, a k*k x channel-block panel in NHWC, both
// in L1), so the B per-example weights are never written to memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/conv_geometry.h"
#include "cpu/row_kernels.h"

namespace condkernels::depthwise {

// Channels handled together by one NHWC work item: long enough rows for the vector units, small
// enough that a plane of accumulators for them stays in L2.
inline int64_t nhwc_channel_block(const ConvGeometry& g) {
  const int64_t plane = std::max(g.in_h * g.in_w, g.out_h * g.out_w);
  int64_t block = 64;
  while (block > 16 && plane * block * 4 > (256 << 10)) block /= 2;
  return std::min(block, g.in_channels);
}

// wk[t] = sum_e r[e] * W[e, c, t] for the k*k taps t of channel c (accumulated in A).
template <typename A, typename T>
inline void mix_taps(const T* routing_row, const T* weight, int64_t experts, int64_t channels,
                     int64_t taps, int64_t c, A* wk) {
  for (int64_t t = 0; t < taps; ++t) wk[t] = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const A r = static_cast<A>(routing_row[e]);
    const T* w = weight + (e * channels + c) * taps;
    for (int64_t t = 0; t < taps; ++t) wk[t] += r * static_cast<A>(w[t]);
  }
}

template <typename A, typename T>
inline A mix_bias(const T* routing_row, const T* bias, int64_t experts, int64_t channels, int64_t c) {
  A s = 0;
  if (bias != nullptr)
    for (int64_t e = 0; e < experts; ++e)
      s += static_cast<A>(routing_row[e]) * static_cast<A>(bias[e * channels + c]);
  return s;
}

// NCHW planes are convolved in a "wide" layout: the input plane is copied (converted to A) into a
// zero-padded buffer whose row length wp is a multiple of the column stride, and the output is
// computed wq = wp / stride_w columns wide, so for a row stride of 1 each tap is ONE long strided axpy
// over the whole plane (out[q] += w * in[q * stride_w + tap offset]) instead of OH short rows. The
// columns past OW are computed and dropped; padding needs no bounds checks.
struct WidePlane {
  int64_t hp, wp, wq, out_h;
  explicit WidePlane(const ConvGeometry& g)
      : hp(g.in_h + g.pad_h_begin + g.pad_h_end),
        wp((g.in_w + g.pad_w_begin + g.pad_w_end + g.stride_w - 1) / g.stride_w * g.stride_w),
        wq(wp / g.stride_w),
        out_h(g.out_h) {}
  // One spare row: the last wide row of a tap reads up to (kw - 1) * dilation past its end.
  int64_t padded_size() const { return (hp + 1) * wp; }
  int64_t wide_size() const { return out_h * wq; }

  template <typename A, typename T>
  void load_input(const ConvGeometry& g, const T* plane, A* xpad) const {
    std::fill(xpad, xpad + padded_size(), A(0));
    for (int64_t ih = 0; ih < g.in_h; ++ih) {
      A* dst = xpad + (ih + g.pad_h_begin) * wp + g.pad_w_begin;
      const T* src = plane + ih * g.in_w;
      for (int64_t iw = 0; iw < g.in_w; ++iw) dst[iw] = static_cast<A>(src[iw]);
    }
  }

  // Calls f(wide output offset, padded input offset, length) for the runs of tap (i, j).
  template <typename F>
  void for_each_run(const ConvGeometry& g, int64_t i, int64_t j, const F& f) const {
    const int64_t tap = i * g.dilation_h * wp + j * g.dilation_w;
    if (g.stride_h == 1) {
      f(0, tap, out_h * wq);
    } else {
      for (int64_t oh = 0; oh < out_h; ++oh) f(oh * wq, oh * g.stride_h * wp + tap, wq);
    }
  }
};

// Forward. x, y: contiguous in `channels_last` or NCHW; weight (E, C, 1, kh, kw) and bias (E, C)
// contiguous.
template <typename A, typename T>
void forward(const ConvGeometry& g, bool channels_last, const T* x, const T* routing, const T* weight,
             const T* bias, int64_t experts, T* y) {
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const int64_t KH = g.kernel_h, KW = g.kernel_w, taps = KH * KW;
  if (!channels_last) {
    const WidePlane wp(g);
    at::parallel_for(0, g.batch * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> wk(taps), xpad(wp.padded_size()), acc(wp.wide_size());
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const T* r = routing + b * experts;
        mix_taps<A, T>(r, weight, experts, C, taps, c, wk.data());
        wp.load_input(g, x + bc * H * W, xpad.data());
        std::fill(acc.begin(), acc.end(), mix_bias<A, T>(r, bias, experts, C, c));
        for (int64_t i = 0; i < KH; ++i)
          for (int64_t j = 0; j < KW; ++j)
            wp.for_each_run(g, i, j, [&](int64_t out_off, int64_t in_off, int64_t n) {
              rows::axpy_strided(acc.data() + out_off, xpad.data() + in_off, wk[i * KW + j], n, g.stride_w);
            });
        T* yp = y + bc * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh)
          for (int64_t ow = 0; ow < OW; ++ow) yp[oh * OW + ow] = static_cast<T>(acc[oh * wp.wq + ow]);
      }
    });
    return;
  }
  const int64_t block = nhwc_channel_block(g), n_blocks = (C + block - 1) / block;
  at::parallel_for(0, g.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> wt(taps * block), wk(taps), bias_mix(block), acc(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks, c0 = (item % n_blocks) * block;
      const int64_t cb = std::min(block, C - c0);
      const T* r = routing + b * experts;
      for (int64_t c = 0; c < cb; ++c) {  // tap-major panel: each tap's row runs along channels
        mix_taps<A, T>(r, weight, experts, C, taps, c0 + c, wk.data());
        for (int64_t t = 0; t < taps; ++t) wt[t * cb + c] = wk[t];
        bias_mix[c] = mix_bias<A, T>(r, bias, experts, C, c0 + c);
      }
      const T* xb = x + b * H * W * C + c0;
      T* yb = y + b * OH * OW * C + c0;
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          std::copy(bias_mix.begin(), bias_mix.begin() + cb, acc.begin());
          for (int64_t i = 0; i < KH; ++i) {
            const int64_t ih = g.in_row(oh, i);
            if (ih < 0 || ih >= H) continue;
            for (int64_t j = 0; j < KW; ++j) {
              const int64_t iw = g.in_col(ow, j);
              if (iw < 0 || iw >= W) continue;
              rows::fma_rows(acc.data(), wt.data() + (i * KW + j) * cb, xb + (ih * W + iw) * C, cb);
            }
          }
          T* yp = yb + (oh * OW + ow) * C;
          for (int64_t c = 0; c < cb; ++c) yp[c] = static_cast<T>(acc[c]);
        }
      }
    }
  });
}

// Backward. Writes grad_x (same layout as x) when non-null, and the per-example filter and bias
// gradients grad_w_b (B, C, kh*kw) and grad_b_b (B, C), in A, when non-null.
template <typename A, typename T>
void backward(const ConvGeometry& g, bool channels_last, const T* grad_out, const T* x,
              const T* routing, const T* weight, int64_t experts, T* grad_x, A* grad_w_b,
              A* grad_b_b) {
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const int64_t KH = g.kernel_h, KW = g.kernel_w, taps = KH * KW;
  if (!channels_last) {
    const WidePlane wp(g);
    at::parallel_for(0, g.batch * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> wk(taps), xpad(grad_w_b ? wp.padded_size() : 0), gpad(grad_x ? wp.padded_size() : 0),
          gowide(wp.wide_size(), A(0));
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        const T* go = grad_out + bc * OH * OW;
        A db = 0;
        for (int64_t oh = 0; oh < OH; ++oh)  // the wide columns past OW stay zero
          for (int64_t ow = 0; ow < OW; ++ow) {
            const A v = static_cast<A>(go[oh * OW + ow]);
            gowide[oh * wp.wq + ow] = v;
            db += v;
          }
        if (grad_b_b) grad_b_b[bc] = db;
        if (grad_w_b) wp.load_input(g, x + bc * H * W, xpad.data());
        if (grad_x) {
          mix_taps<A, T>(routing + b * experts, weight, experts, C, taps, c, wk.data());
          std::fill(gpad.begin(), gpad.end(), A(0));
        }
        for (int64_t i = 0; i < KH; ++i)
          for (int64_t j = 0; j < KW; ++j) {
            A dw = 0;
            wp.for_each_run(g, i, j, [&](int64_t out_off, int64_t in_off, int64_t n) {
              if (grad_x)
                rows::scatter_axpy(gpad.data() + in_off, gowide.data() + out_off, wk[i * KW + j], n, g.stride_w);
              if (grad_w_b) dw += rows::dot_strided(gowide.data() + out_off, xpad.data() + in_off, n, g.stride_w);
            });
            if (grad_w_b) grad_w_b[bc * taps + i * KW + j] = dw;
          }
        if (grad_x) {
          T* gx = grad_x + bc * H * W;
          for (int64_t ih = 0; ih < H; ++ih)
            for (int64_t iw = 0; iw < W; ++iw)
              gx[ih * W + iw] = static_cast<T>(gpad[(ih + g.pad_h_begin) * wp.wp + iw + g.pad_w_begin]);
        }
      }
    });
    return;
  }
  const int64_t block = nhwc_channel_block(g), n_blocks = (C + block - 1) / block;
  at::parallel_for(0, g.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> wt(taps * block), wk(taps), gacc(grad_x ? H * W * block : 0), dwacc(taps * block),
        dbacc(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks, c0 = (item % n_blocks) * block;
      const int64_t cb = std::min(block, C - c0);
      if (grad_x) {
        for (int64_t c = 0; c < cb; ++c) {
          mix_taps<A, T>(routing + b * experts, weight, experts, C, taps, c0 + c, wk.data());
          for (int64_t t = 0; t < taps; ++t) wt[t * cb + c] = wk[t];
        }
        std::fill(gacc.begin(), gacc.begin() + H * W * cb, A(0));
      }
      std::fill(dwacc.begin(), dwacc.end(), A(0));
      std::fill(dbacc.begin(), dbacc.end(), A(0));
      const T* xb = x + b * H * W * C + c0;
      const T* gob = grad_out + b * OH * OW * C + c0;
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          const T* go = gob + (oh * OW + ow) * C;
          if (grad_b_b) rows::add_rows(dbacc.data(), go, cb);
          for (int64_t i = 0; i < KH; ++i) {
            const int64_t ih = g.in_row(oh, i);
            if (ih < 0 || ih >= H) continue;
            for (int64_t j = 0; j < KW; ++j) {
              const int64_t iw = g.in_col(ow, j);
              if (iw < 0 || iw >= W) continue;
              const int64_t t = i * KW + j;
              if (grad_x) rows::fma_rows(gacc.data() + (ih * W + iw) * cb, wt.data() + t * cb, go, cb);
              if (grad_w_b) rows::fma_rows2(dwacc.data() + t * cb, go, xb + (ih * W + iw) * C, cb);
            }
          }
        }
      }
      if (grad_x) {
        T* gxb = grad_x + b * H * W * C + c0;
        for (int64_t p = 0; p < H * W; ++p)
          for (int64_t c = 0; c < cb; ++c) gxb[p * C + c] = static_cast<T>(gacc[p * cb + c]);
      }
      if (grad_w_b)
        for (int64_t c = 0; c < cb; ++c)
          for (int64_t t = 0; t < taps; ++t) grad_w_b[(b * C + c0 + c) * taps + t] = dwacc[t * cb + c];
      if (grad_b_b)
        for (int64_t c = 0; c < cb; ++c) grad_b_b[b * C + c0 + c] = dbacc[c];
    }
  });
}

}  // namespace condkernels::depthwise
