// Host check of csrc/common/conv_index.h, the index arithmetic of the CUDA kernels. Each kernel's
// decomposition (forward implicit GEMM, transposed gather for grad_x, weight-gradient GEMM; both
// column orders; grouped row tiles; NCHW and NHWC strides) is replayed with integer data and must
// reproduce the direct definition of the convolution exactly. Prints "checked N geometries".
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "common/conv_index.h"

using namespace condkernels;
using Vec = std::vector<int64_t>;

static int failures = 0;
#define EXPECT(cond, ...)                       \
  do {                                          \
    if (!(cond)) {                              \
      if (failures++ < 20) {                    \
        std::printf("FAIL %s: ", #cond);        \
        std::printf(__VA_ARGS__);               \
        std::printf("\n");                      \
      }                                         \
    }                                           \
  } while (0)

static Strides4 layout(int64_t n, int64_t c, int64_t h, int64_t w, bool nhwc) {
  (void)n;
  return nhwc ? Strides4{h * w * c, 1, w * c, c} : Strides4{c * h * w, h * w, w, 1};
}

int main() {
  std::mt19937_64 rng(20261123);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int checked = 0;
  for (int trial = 0; trial < 400; ++trial) {
    ConvGeometry g{};
    g.batch = pick(1, 2);
    g.groups = pick(1, 3);
    g.in_channels = g.groups * pick(1, 3);
    g.out_channels = g.groups * pick(1, 3);
    g.kernel_h = pick(1, 4);
    g.kernel_w = pick(1, 4);
    g.stride_h = pick(1, 3);
    g.stride_w = pick(1, 3);
    g.dilation_h = pick(1, 3);
    g.dilation_w = pick(1, 3);
    g.pad_h_begin = pick(0, 3);
    g.pad_h_end = pick(0, 3);
    g.pad_w_begin = pick(0, 3);
    g.pad_w_end = pick(0, 3);
    g.in_h = pick(1, 9);
    g.in_w = pick(1, 9);
    g.out_h = conv_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h_begin, g.pad_h_end, g.dilation_h);
    g.out_w = conv_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w_begin, g.pad_w_end, g.dilation_w);
    if (g.out_h <= 0 || g.out_w <= 0) continue;
    ++checked;
    const bool nhwc = trial % 2;
    const int64_t B = g.batch, Ci = g.in_channels, Co = g.out_channels, KH = g.kernel_h, KW = g.kernel_w;
    const int64_t cin_g = Ci / g.groups, cout_g = Co / g.groups, taps = KH * KW;
    const Strides4 xs = layout(B, Ci, g.in_h, g.in_w, nhwc), ys = layout(B, Co, g.out_h, g.out_w, nhwc);

    // 1. forward_tap_source and transposed_tap_source are inverse maps.
    for (int64_t oh = 0; oh < g.out_h; ++oh)
      for (int64_t ow = 0; ow < g.out_w; ++ow)
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t kw = 0; kw < KW; ++kw) {
            int64_t ih, iw, oh2 = -7, ow2 = -7;
            const bool inside = forward_tap_source(g, oh, ow, kh, kw, ih, iw);
            const bool direct_inside = oh * g.stride_h - g.pad_h_begin + kh * g.dilation_h >= 0 &&
                                       oh * g.stride_h - g.pad_h_begin + kh * g.dilation_h < g.in_h &&
                                       ow * g.stride_w - g.pad_w_begin + kw * g.dilation_w >= 0 &&
                                       ow * g.stride_w - g.pad_w_begin + kw * g.dilation_w < g.in_w;
            EXPECT(inside == direct_inside, "trial %d", trial);
            if (inside) {
              EXPECT(transposed_tap_source(g, ih, iw, kh, kw, oh2, ow2) && oh2 == oh && ow2 == ow, "trial %d", trial);
            }
          }
    for (int64_t ih = 0; ih < g.in_h; ++ih)
      for (int64_t iw = 0; iw < g.in_w; ++iw)
        for (int64_t kh = 0; kh < KH; ++kh)
          for (int64_t kw = 0; kw < KW; ++kw) {
            int64_t oh, ow, ih2, iw2;
            if (transposed_tap_source(g, ih, iw, kh, kw, oh, ow)) {
              EXPECT(oh >= 0 && oh < g.out_h && ow >= 0 && ow < g.out_w, "trial %d", trial);
              EXPECT(forward_tap_source(g, oh, ow, kh, kw, ih2, iw2) && ih2 == ih && iw2 == iw, "trial %d", trial);
            }
          }

    // Integer data: x in its layout, weight (Co, cin_g, KH, KW) contiguous, dy in y's layout.
    Vec x(B * Ci * g.in_h * g.in_w), w(Co * cin_g * taps), dy(B * Co * g.out_h * g.out_w);
    for (auto& v : x) v = pick(-5, 5);
    for (auto& v : w) v = pick(-5, 5);
    for (auto& v : dy) v = pick(-5, 5);
    auto W = [&](int64_t co, int64_t ci, int64_t kh, int64_t kw) { return w[((co * cin_g + ci) * KH + kh) * KW + kw]; };

    // Direct definitions.
    Vec y_ref(dy.size(), 0), dx_ref(x.size(), 0), dw_ref(w.size(), 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t co = 0; co < Co; ++co)
        for (int64_t oh = 0; oh < g.out_h; ++oh)
          for (int64_t ow = 0; ow < g.out_w; ++ow)
            for (int64_t ci = 0; ci < cin_g; ++ci)
              for (int64_t kh = 0; kh < KH; ++kh)
                for (int64_t kw = 0; kw < KW; ++kw) {
                  const int64_t ih = oh * g.stride_h - g.pad_h_begin + kh * g.dilation_h;
                  const int64_t iw = ow * g.stride_w - g.pad_w_begin + kw * g.dilation_w;
                  if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) continue;
                  const int64_t c = (co / cout_g) * cin_g + ci;
                  y_ref[ys.offset(b, co, oh, ow)] += W(co, ci, kh, kw) * x[xs.offset(b, c, ih, iw)];
                  dx_ref[xs.offset(b, c, ih, iw)] += W(co, ci, kh, kw) * dy[ys.offset(b, co, oh, ow)];
                  dw_ref[((co * cin_g + ci) * KH + kh) * KW + kw] +=
                      dy[ys.offset(b, co, oh, ow)] * x[xs.offset(b, c, ih, iw)];
                }

    const int64_t tile = pick(1, 4);  // row tile, small so that groups hold several ragged tiles
    for (bool tap_major : {false, true}) {
      // 2. forward: rows = output channels via group_tile, columns f = filter_tap order.
      Vec y(dy.size(), 0);
      const int64_t columns = cin_g * taps;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t flat = 0; flat < g.groups * ceil_div(cout_g, tile); ++flat) {
          const GroupTile gt = group_tile(flat, cout_g, tile);
          for (int64_t m = gt.first; m < gt.first + tile && m < cout_g; ++m)
            for (int64_t n = 0; n < g.out_h * g.out_w; ++n)
              for (int64_t f = 0; f < columns; ++f) {
                const FilterTap t = filter_tap(f, cin_g, KH, KW, tap_major);
                int64_t ih, iw;
                if (!forward_tap_source(g, n / g.out_w, n % g.out_w, t.kh, t.kw, ih, iw)) continue;
                y[ys.offset(b, gt.group * cout_g + m, n / g.out_w, n % g.out_w)] +=
                    w[(gt.group * cout_g + m) * columns + filter_offset(t, KH, KW)] *
                    x[xs.offset(b, gt.group * cin_g + t.channel, ih, iw)];
              }
        }
      EXPECT(y == y_ref, "forward, trial %d tap_major %d", trial, tap_major);

      // 3. grad_x: rows = input channels, columns c = (co, kh, kw) in filter_tap order over cout_g.
      Vec dx(x.size(), 0);
      const int64_t t_columns = cout_g * taps;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t flat = 0; flat < g.groups * ceil_div(cin_g, tile); ++flat) {
          const GroupTile gt = group_tile(flat, cin_g, tile);
          for (int64_t m = gt.first; m < gt.first + tile && m < cin_g; ++m)
            for (int64_t n = 0; n < g.in_h * g.in_w; ++n)
              for (int64_t c = 0; c < t_columns; ++c) {
                const FilterTap t = filter_tap(c, cout_g, KH, KW, tap_major);
                int64_t oh, ow;
                if (!transposed_tap_source(g, n / g.in_w, n % g.in_w, t.kh, t.kw, oh, ow)) continue;
                const FilterTap wt{m, t.kh, t.kw};
                dx[xs.offset(b, gt.group * cin_g + m, n / g.in_w, n % g.in_w)] +=
                    w[(gt.group * cout_g + t.channel) * columns + filter_offset(wt, KH, KW)] *
                    dy[ys.offset(b, gt.group * cout_g + t.channel, oh, ow)];
              }
        }
      EXPECT(dx == dx_ref, "grad_x, trial %d tap_major %d", trial, tap_major);

      // 4. grad_weight: rows = output channels, columns f, reduction over output pixels in slices.
      Vec dw(w.size(), 0);
      const int64_t per_slice = pick(1, 5);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t flat = 0; flat < g.groups * ceil_div(cout_g, tile); ++flat) {
          const GroupTile gt = group_tile(flat, cout_g, tile);
          for (int64_t p0 = 0; p0 < g.out_h * g.out_w; p0 += per_slice)
            for (int64_t m = gt.first; m < gt.first + tile && m < cout_g; ++m)
              for (int64_t f = 0; f < columns; ++f) {
                const FilterTap t = filter_tap(f, cin_g, KH, KW, tap_major);
                int64_t acc = 0;
                for (int64_t p = p0; p < p0 + per_slice && p < g.out_h * g.out_w; ++p) {
                  int64_t ih, iw;
                  if (!forward_tap_source(g, p / g.out_w, p % g.out_w, t.kh, t.kw, ih, iw)) continue;
                  acc += dy[ys.offset(b, gt.group * cout_g + m, p / g.out_w, p % g.out_w)] *
                         x[xs.offset(b, gt.group * cin_g + t.channel, ih, iw)];
                }
                dw[(gt.group * cout_g + m) * columns + filter_offset(t, KH, KW)] += acc;
              }
        }
      EXPECT(dw == dw_ref, "grad_weight, trial %d tap_major %d", trial, tap_major);
    }
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("checked %d geometries\n", checked);
  return checked > 100 ? 0 : 1;
}
