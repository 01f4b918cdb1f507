// Direct depthwise cond_conv2d on the CPU (groups == Cin == Cout, any kernel, stride, dilation and
// asymmetric padding). A work item is (example, block of channels): it mixes that block's k x k
// filters from the E experts into an L1-sized buffer and convolves right away, so the B per-example
// weights are never written to memory.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/conv_geometry.h"
#include "cpu/mixing.h"
#include "cpu/row_kernels.h"

namespace condkernels::depthwise {

// Channels handled together by one work item: their mixed filters (block * k*k values) stay in L1,
// and in NHWC the rows run along them, long enough for the vector units; small enough that an NHWC
// plane of accumulators for them stays in L2; and few enough per item that every thread gets work.
inline int64_t channel_block(const ConvGeometry& g) {
  const int64_t plane = std::max(g.in_h * g.in_w, g.out_h * g.out_w);
  int64_t block = 64;
  while (block > 16 && plane * block * 4 > (256 << 10)) block /= 2;
  auto items = [&](int64_t bl) { return g.batch * ((g.in_channels + bl - 1) / bl); };
  while (block > 8 && items(block) < 4 * at::get_num_threads()) block /= 2;
  return std::min(block, g.in_channels);
}

// The filters of channels [c0, c0 + cb) of one example, mixed into wk (cb, k*k) with the vectorised
// expert mixing, and their mixed biases into bias_mix (when bias is not null).
template <typename A, typename T>
inline void mix_channel_block(const T* routing_row, const T* weight, const T* bias, int64_t experts,
                              int64_t channels, int64_t taps, int64_t c0, int64_t cb, A* r, A* wk,
                              A* bias_mix) {
  for (int64_t e = 0; e < experts; ++e) r[e] = static_cast<A>(routing_row[e]);
  std::fill(wk, wk + cb * taps, A(0));
  mixing::mix_into<1>(r, weight + c0 * taps, channels * taps, experts, 0, cb * taps, wk);
  if (bias != nullptr) {
    std::fill(bias_mix, bias_mix + cb, A(0));
    mixing::mix_into<1>(r, bias + c0, channels, experts, 0, cb, bias_mix);
  }
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
// contiguous. Work items are (example, channel block).
template <typename A, typename T>
void forward(const ConvGeometry& g, bool channels_last, const T* x, const T* routing, const T* weight,
             const T* bias, int64_t experts, T* y) {
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const int64_t KH = g.kernel_h, KW = g.kernel_w, taps = KH * KW;
  const int64_t block = channel_block(g), n_blocks = (C + block - 1) / block;
  const WidePlane wp(g);
  at::parallel_for(0, g.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> r(experts), wk(block * taps), wt(block * taps), bias_mix(block, A(0));
    std::vector<A> xpad(channels_last ? 0 : wp.padded_size()), acc(channels_last ? OW * block : wp.wide_size());
    std::vector<int64_t> tap_offset(taps);  // of tap (i, j) in the padded plane
    for (int64_t i = 0; i < KH; ++i)
      for (int64_t j = 0; j < KW; ++j) tap_offset[i * KW + j] = i * g.dilation_h * wp.wp + j * g.dilation_w;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks, c0 = (item % n_blocks) * block, cb = std::min(block, C - c0);
      mix_channel_block<A, T>(routing + b * experts, weight, bias, experts, C, taps, c0, cb, r.data(), wk.data(),
                              bias_mix.data());
      if (!channels_last) {
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t plane = b * C + c0 + c;
          wp.load_input(g, x + plane * H * W, xpad.data());
          if (g.stride_w == 1) {  // all taps of a run at once, in registers
            const int64_t runs = g.stride_h == 1 ? 1 : OH, run = g.stride_h == 1 ? OH * wp.wq : wp.wq;
            for (int64_t k = 0; k < runs; ++k)
              rows::multi_tap(acc.data() + k * wp.wq, xpad.data() + k * g.stride_h * wp.wp, tap_offset.data(),
                              wk.data() + c * taps, taps, run, bias_mix[c]);
          } else {
            std::fill(acc.begin(), acc.end(), bias_mix[c]);
            for (int64_t i = 0; i < KH; ++i)
              for (int64_t j = 0; j < KW; ++j)
                wp.for_each_run(g, i, j, [&](int64_t out_off, int64_t in_off, int64_t n) {
                  rows::axpy_strided(acc.data() + out_off, xpad.data() + in_off, wk[c * taps + i * KW + j], n,
                                     g.stride_w);
                });
          }
          T* yp = y + plane * OH * OW;
          for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) yp[oh * OW + ow] = static_cast<T>(acc[oh * wp.wq + ow]);
        }
        continue;
      }
      for (int64_t c = 0; c < cb; ++c)  // tap-major panel: each tap's row runs along channels
        for (int64_t t = 0; t < taps; ++t) wt[t * cb + c] = wk[c * taps + t];
      const T* xb = x + b * H * W * C + c0;
      T* yb = y + b * OH * OW * C + c0;
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int64_t ow = 0; ow < OW; ++ow) std::copy(bias_mix.begin(), bias_mix.begin() + cb, acc.begin() + ow * cb);
        for (int64_t i = 0; i < KH; ++i) {
          const int64_t ih = g.in_row(oh, i);
          if (ih < 0 || ih >= H) continue;
          for (int64_t j = 0; j < KW; ++j) {
            int64_t ow_lo, ow_hi;
            conv_valid_out_range(W, OW, g.stride_w, g.pad_w_begin, j * g.dilation_w, &ow_lo, &ow_hi);
            if (ow_lo >= ow_hi) continue;
            rows::fma_panel(acc.data() + ow_lo * cb, cb, wt.data() + (i * KW + j) * cb,
                            xb + (ih * W + g.in_col(ow_lo, j)) * C, g.stride_w * C, ow_hi - ow_lo, cb);
          }
        }
        for (int64_t ow = 0; ow < OW; ++ow) {
          T* yp = yb + (oh * OW + ow) * C;
          for (int64_t c = 0; c < cb; ++c) yp[c] = static_cast<T>(acc[ow * cb + c]);
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
  const int64_t block = channel_block(g), n_blocks = (C + block - 1) / block;
  const WidePlane wp(g);
  at::parallel_for(0, g.batch * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> r(experts), wk(block * taps), wt(block * taps);
    // NCHW: one padded input plane, one padded grad_x plane, grad_out in the wide layout.
    std::vector<A> xpad(!channels_last && grad_w_b ? wp.padded_size() : 0);
    std::vector<A> gpad(!channels_last && grad_x ? wp.padded_size() : 0);
    std::vector<A> gowide(channels_last ? 0 : wp.wide_size(), A(0));
    // NHWC: grad_x accumulators of the block's channels over the whole plane, filter gradients.
    std::vector<A> gacc(channels_last && grad_x ? H * W * block : 0), dwacc(taps * block), dbacc(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / n_blocks, c0 = (item % n_blocks) * block, cb = std::min(block, C - c0);
      if (grad_x)
        mix_channel_block<A, T>(routing + b * experts, weight, static_cast<const T*>(nullptr), experts, C, taps, c0,
                                cb, r.data(), wk.data(), static_cast<A*>(nullptr));
      if (!channels_last) {
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t plane = b * C + c0 + c;
          const T* go = grad_out + plane * OH * OW;
          A db = 0;
          for (int64_t oh = 0; oh < OH; ++oh)  // the wide columns past OW stay zero
            for (int64_t ow = 0; ow < OW; ++ow) {
              const A v = static_cast<A>(go[oh * OW + ow]);
              gowide[oh * wp.wq + ow] = v;
              db += v;
            }
          if (grad_b_b) grad_b_b[plane] = db;
          if (grad_w_b) wp.load_input(g, x + plane * H * W, xpad.data());
          if (grad_x) std::fill(gpad.begin(), gpad.end(), A(0));
          for (int64_t i = 0; i < KH; ++i)
            for (int64_t j = 0; j < KW; ++j) {
              A dw = 0;
              wp.for_each_run(g, i, j, [&](int64_t out_off, int64_t in_off, int64_t n) {
                if (grad_x)
                  rows::scatter_axpy(gpad.data() + in_off, gowide.data() + out_off, wk[c * taps + i * KW + j], n,
                                     g.stride_w);
                if (grad_w_b) dw += rows::dot_strided(gowide.data() + out_off, xpad.data() + in_off, n, g.stride_w);
              });
              if (grad_w_b) grad_w_b[plane * taps + i * KW + j] = dw;
            }
          if (grad_x) {
            T* gx = grad_x + plane * H * W;
            for (int64_t ih = 0; ih < H; ++ih)
              for (int64_t iw = 0; iw < W; ++iw)
                gx[ih * W + iw] = static_cast<T>(gpad[(ih + g.pad_h_begin) * wp.wp + iw + g.pad_w_begin]);
          }
        }
        continue;
      }
      if (grad_x) {
        for (int64_t c = 0; c < cb; ++c)
          for (int64_t t = 0; t < taps; ++t) wt[t * cb + c] = wk[c * taps + t];
        std::fill(gacc.begin(), gacc.begin() + H * W * cb, A(0));
      }
      std::fill(dwacc.begin(), dwacc.end(), A(0));
      std::fill(dbacc.begin(), dbacc.end(), A(0));
      const T* xb = x + b * H * W * C + c0;
      const T* gob = grad_out + b * OH * OW * C + c0;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const T* go_row = gob + oh * OW * C;
        if (grad_b_b)
          for (int64_t ow = 0; ow < OW; ++ow) rows::add_rows(dbacc.data(), go_row + ow * C, cb);
        for (int64_t i = 0; i < KH; ++i) {
          const int64_t ih = g.in_row(oh, i);
          if (ih < 0 || ih >= H) continue;
          for (int64_t j = 0; j < KW; ++j) {
            int64_t ow_lo, ow_hi;
            conv_valid_out_range(W, OW, g.stride_w, g.pad_w_begin, j * g.dilation_w, &ow_lo, &ow_hi);
            if (ow_lo >= ow_hi) continue;
            const int64_t t = i * KW + j, iw_lo = g.in_col(ow_lo, j), n = ow_hi - ow_lo;
            if (grad_x)  // grad_x[ih, iw] += w * grad_out[oh, ow]: the forward's panel FMA, strides swapped
              rows::fma_panel(gacc.data() + (ih * W + iw_lo) * cb, g.stride_w * cb, wt.data() + t * cb,
                              go_row + ow_lo * C, C, n, cb);
            if (grad_w_b)
              rows::dot_panel(dwacc.data() + t * cb, go_row + ow_lo * C, C, xb + (ih * W + iw_lo) * C,
                              g.stride_w * C, n, cb);
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
