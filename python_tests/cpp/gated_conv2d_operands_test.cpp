// Host test of the index arithmetic the CUDA kernels of gated_conv2d run on the device
// (common/gated_lists.h, common/gated_conv2d_operands.h): channel lists built the way
// build_channel_lists_kernel builds them (a warp ballot per 32 channels), and the three implicit
// GEMMs evaluated element by element over whole tiles, as the kernels' tile loops visit them,
// against a naive dense masked convolution and its gradients. Prints "ok" and exits 0 on success.
//
// Built and run by python_tests/test_gated_conv2d_cuda_index_math.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/gated_conv2d_operands.h"

using namespace condkernels;

namespace {

constexpr int64_t kTileM = 32, kTileN = 32, kTileK = 16, kWarp = 32;

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int failures = 0;

void expect_close(double got, double want, const char* what, int64_t index) {
  if (std::fabs(got - want) > 1e-9 * std::max(1.0, std::fabs(want))) {
    if (failures < 20) std::printf("FAIL %s[%lld]: got %.12g, want %.12g\n", what, (long long)index, got, want);
    ++failures;
  }
}

// build_channel_lists_kernel, one simulated warp per (example, group).
void build_lists(const double* gate, int64_t batch, int64_t channels, int64_t groups, std::vector<int32_t>& list,
                 std::vector<int32_t>& count) {
  list.assign(batch * channels, -1);
  count.assign(batch * groups, -1);
  const int64_t per_group = channels / groups;
  for (int64_t bg = 0; bg < batch * groups; ++bg) {
    const int64_t b = bg / groups, grp = bg % groups;
    const double* row = gate != nullptr ? gate + b * channels + grp * per_group : nullptr;
    int32_t* out = list.data() + b * channels + grp * per_group;
    int64_t open_before = 0;
    for (int64_t base = 0; base < per_group; base += kWarp) {
      unsigned ballot = 0;
      for (unsigned lane = 0; lane < kWarp; ++lane) {
        const int64_t c = base + lane;
        if (c < per_group && (row == nullptr || gate_is_open(row[c]))) ballot |= 1u << lane;
      }
      for (unsigned lane = 0; lane < kWarp; ++lane) {
        const int64_t c = base + lane;
        const bool open = (ballot >> lane) & 1u;
        const int64_t rank = __builtin_popcount(ballot & ((1u << lane) - 1u));
        if (c < per_group) out[channel_list_slot(open, c, open_before + rank, per_group)] = static_cast<int32_t>(c);
      }
      open_before += __builtin_popcount(ballot);
    }
    count[bg] = static_cast<int32_t>(open_before);
  }
}

// The lists must hold every channel once, the open ones first in increasing order.
void check_lists(const double* gate, int64_t batch, int64_t channels, int64_t groups, const std::vector<int32_t>& list,
                 const std::vector<int32_t>& count) {
  const int64_t per_group = channels / groups;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      std::vector<int32_t> open, seen(list.begin() + b * channels + grp * per_group,
                                      list.begin() + b * channels + (grp + 1) * per_group);
      for (int64_t c = 0; c < per_group; ++c)
        if (gate == nullptr || gate[b * channels + grp * per_group + c] != 0.0) open.push_back(static_cast<int32_t>(c));
      expect_close(count[b * groups + grp], static_cast<double>(open.size()), "count", b * groups + grp);
      for (size_t i = 0; i < open.size(); ++i) expect_close(seen[i], open[i], "open list", static_cast<int64_t>(i));
      std::sort(seen.begin(), seen.end());
      for (int64_t c = 0; c < per_group; ++c) expect_close(seen[c], static_cast<double>(c), "permutation", c);
    }
  }
}

struct Config {
  int64_t batch, cin, cout, groups, h, w, kh, kw, stride_h, stride_w, pad[4], dil_h, dil_w;
  bool channels_last, in_gate, out_gate;
};

void run(const Config& cfg, std::mt19937& rng) {
  ConvGeometry g{};
  g.batch = cfg.batch, g.in_channels = cfg.cin, g.out_channels = cfg.cout, g.groups = cfg.groups;
  g.in_h = cfg.h, g.in_w = cfg.w, g.kernel_h = cfg.kh, g.kernel_w = cfg.kw;
  g.stride_h = cfg.stride_h, g.stride_w = cfg.stride_w;
  g.pad_h_begin = cfg.pad[0], g.pad_h_end = cfg.pad[1], g.pad_w_begin = cfg.pad[2], g.pad_w_end = cfg.pad[3];
  g.dilation_h = cfg.dil_h, g.dilation_w = cfg.dil_w;
  g.out_h = conv_out_size(g.in_h, g.kernel_h, g.stride_h, g.pad_h_begin, g.pad_h_end, g.dilation_h);
  g.out_w = conv_out_size(g.in_w, g.kernel_w, g.stride_w, g.pad_w_begin, g.pad_w_end, g.dilation_w);
  const int64_t B = g.batch, Ci = g.in_channels, Co = g.out_channels, cin_g = Ci / g.groups, cout_g = Co / g.groups;
  const int64_t H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w, taps = g.kernel_h * g.kernel_w;
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform;
  auto randn = [&](int64_t n) {
    std::vector<double> v(n);
    for (auto& e : v) e = normal(rng);
    return v;
  };
  auto gates = [&](int64_t channels) {  // example 0 all closed, 1 all open, the others half open
    std::vector<double> v(B * channels);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < channels; ++c)
        v[b * channels + c] = b == 0 ? 0.0 : (b == 1 || uniform(rng) < 0.5 ? 0.5 + uniform(rng) : 0.0);
    return v;
  };
  std::vector<double> x = randn(B * Ci * H * W), weight = randn(Co * cin_g * taps), bias = randn(Co);
  std::vector<double> grad_out = randn(B * Co * OH * OW);
  std::vector<double> ig = gates(Ci), og = gates(Co);
  const double* ig_p = cfg.in_gate ? ig.data() : nullptr;
  const double* og_p = cfg.out_gate ? og.data() : nullptr;
  // x in NCHW or channels_last (NHWC) memory; the outputs in the same format, grad_out in NCHW.
  const Strides4 sx = cfg.channels_last ? Strides4{H * W * Ci, 1, W * Ci, Ci} : Strides4{Ci * H * W, H * W, W, 1};
  const Strides4 sy =
      cfg.channels_last ? Strides4{OH * OW * Co, 1, OW * Co, Co} : Strides4{Co * OH * OW, OH * OW, OW, 1};
  const Strides4 sgo{Co * OH * OW, OH * OW, OW, 1};
  auto X = [&](int64_t b, int64_t c, int64_t ih, int64_t iw) { return x[b * sx.b + c * sx.c + ih * sx.h + iw * sx.w]; };
  auto IG = [&](int64_t b, int64_t c) { return ig_p ? ig_p[b * Ci + c] : 1.0; };
  auto OG = [&](int64_t b, int64_t c) { return og_p ? og_p[b * Co + c] : 1.0; };

  // The dense masked formulation and its gradients, naively.
  std::vector<double> ref_z(B * Co * OH * OW), ref_gxg(B * Ci * H * W, 0.0), ref_gw(Co * cin_g * taps, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t co = 0; co < Co; ++co)
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t grp = co / cout_g;
          const double gz = grad_out[b * sgo.b + co * sgo.c + oh * OW + ow] * OG(b, co);
          double z = bias[co];
          for (int64_t c = 0; c < cin_g; ++c)
            for (int64_t kh = 0; kh < g.kernel_h; ++kh)
              for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
                const int64_t ih = g.in_row(oh, kh), iw = g.in_col(ow, kw), ci = grp * cin_g + c;
                if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
                const double wv = weight[(co * cin_g + c) * taps + kh * g.kernel_w + kw];
                z += wv * IG(b, ci) * X(b, ci, ih, iw);
                ref_gxg[((b * Ci + ci) * H + ih) * W + iw] += wv * gz;
                ref_gw[(co * cin_g + c) * taps + kh * g.kernel_w + kw] += gz * IG(b, ci) * X(b, ci, ih, iw);
              }
          ref_z[((b * Co + co) * OH + oh) * OW + ow] = z;
        }

  std::vector<int32_t> in_list, in_count, out_list, out_count, all_in, all_in_count, all_out, all_out_count;
  build_lists(ig_p, B, Ci, g.groups, in_list, in_count);
  build_lists(og_p, B, Co, g.groups, out_list, out_count);
  build_lists(nullptr, B, Ci, g.groups, all_in, all_in_count);
  build_lists(nullptr, B, Co, g.groups, all_out, all_out_count);
  check_lists(ig_p, B, Ci, g.groups, in_list, in_count);
  check_lists(og_p, B, Co, g.groups, out_list, out_count);
  check_lists(nullptr, B, Co, g.groups, all_out, all_out_count);

  // Forward, inference form (closed outputs skipped) and training form (every output, plus ungated).
  for (int with_ungated = 0; with_ungated < 2; ++with_ungated) {
    const std::vector<int32_t>& ol = with_ungated ? all_out : out_list;
    const std::vector<int32_t>& oc = with_ungated ? all_out_count : out_count;
    std::vector<double> y(B * Co * OH * OW, std::nan("")), u(B * Co * OH * OW, std::nan(""));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const ForwardOperands<double, double> ops{g, weight.data(), x.data(), sx, ig_p, b, grp,
                                                  group_list(in_list.data(), in_count.data(), b, grp, Ci, g.groups),
                                                  group_list(ol.data(), oc.data(), b, grp, Co, g.groups)};
        for (int64_t m = 0; m < round_up(cout_g, kTileM); ++m)
          for (int64_t n = 0; n < round_up(ops.cols(), kTileN); ++n) {
            double acc = 0;
            if (m / kTileM * kTileM < ops.rows())
              for (int64_t k = 0; k < round_up(ops.reduction(), kTileK); ++k) acc += ops.lhs(m, k) * ops.rhs(k, n);
            if (m < cout_g && n < ops.cols())
              ops.store(m, n, acc, bias.data(), og_p, y.data(), with_ungated ? u.data() : nullptr, sy);
          }
      }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t co = 0; co < Co; ++co)
        for (int64_t p = 0; p < OH * OW; ++p) {
          const int64_t off = b * sy.b + co * sy.c + (p / OW) * sy.h + (p % OW) * sy.w;
          const double z = ref_z[(b * Co + co) * OH * OW + p];
          expect_close(y[off], OG(b, co) == 0.0 ? 0.0 : z * OG(b, co), with_ungated ? "y (training form)" : "y", off);
          if (with_ungated) expect_close(u[off], z, "ungated", off);
        }
  }

  // Gradient of the input: over the open inputs only (in_gate not learning) and over all of them.
  for (int every_row = 0; every_row < 2; ++every_row) {
    const std::vector<int32_t>& rl = every_row ? all_in : in_list;
    const std::vector<int32_t>& rc = every_row ? all_in_count : in_count;
    std::vector<double> gx(B * Ci * H * W, std::nan("")), gg(B * Ci * H * W, std::nan(""));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t grp = 0; grp < g.groups; ++grp) {
        const GradInputOperands<double, double> ops{
            g, weight.data(), grad_out.data(), sgo, og_p, b, grp,
            group_list(rl.data(), rc.data(), b, grp, Ci, g.groups),
            group_list(out_list.data(), out_count.data(), b, grp, Co, g.groups)};
        for (int64_t m = 0; m < round_up(cin_g, kTileM); ++m)
          for (int64_t n = 0; n < round_up(ops.cols(), kTileN); ++n) {
            double acc = 0;
            if (m / kTileM * kTileM < ops.rows())
              for (int64_t k = 0; k < round_up(ops.reduction(), kTileK); ++k) acc += ops.lhs(m, k) * ops.rhs(k, n);
            if (m < cin_g && n < ops.cols()) ops.store(m, n, acc, ig_p, gx.data(), sx, every_row ? gg.data() : nullptr);
          }
      }
    for (int64_t b = 0; b < B; ++b)
      for (int64_t ci = 0; ci < Ci; ++ci)
        for (int64_t q = 0; q < H * W; ++q) {
          const int64_t off = b * sx.b + ci * sx.c + (q / W) * sx.h + (q % W) * sx.w;
          const double gxg = ref_gxg[(b * Ci + ci) * H * W + q];
          expect_close(gx[off], IG(b, ci) == 0.0 ? 0.0 : IG(b, ci) * gxg, "grad_x", off);
          if (every_row) expect_close(gg[(b * Ci + ci) * H * W + q], gxg, "grad of the gated input", off);
        }
  }

  // Gradient of the weight: examples' tiles over their open outputs x open inputs, summed.
  std::vector<double> gw(Co * cin_g * taps, 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t grp = 0; grp < g.groups; ++grp) {
      const GradWeightOperands<double, double> ops{g, grad_out.data(), sgo, x.data(), sx, ig_p, og_p, b, grp,
                                                   group_list(in_list.data(), in_count.data(), b, grp, Ci, g.groups),
                                                   group_list(out_list.data(), out_count.data(), b, grp, Co, g.groups)};
      for (int64_t m0 = 0; m0 < round_up(cout_g, kTileM); m0 += kTileM)
        for (int64_t n0 = 0; n0 < round_up(cin_g * taps, kTileN); n0 += kTileN) {
          if (m0 >= ops.rows() || n0 >= ops.cols()) continue;
          for (int64_t m = m0; m < m0 + kTileM; ++m)
            for (int64_t n = n0; n < n0 + kTileN; ++n) {
              double acc = 0;
              for (int64_t p = 0; p < round_up(ops.reduction(), kTileK); ++p) acc += ops.lhs(m, p) * ops.rhs(p, n);
              if (m < ops.rows() && n < ops.cols()) gw[ops.grad_weight_offset(m, n)] += acc;
            }
        }
    }
  for (int64_t i = 0; i < Co * cin_g * taps; ++i) expect_close(gw[i], ref_gw[i], "grad_weight", i);
}

}  // namespace

int main() {
  // output_reading against brute force over every (output, tap) pair.
  for (int64_t stride = 1; stride <= 3; ++stride)
    for (int64_t dil = 1; dil <= 2; ++dil)
      for (int64_t pad = 0; pad <= 2; ++pad)
        for (int64_t in = 0; in < 9; ++in)
          for (int64_t k = 0; k < 3; ++k) {
            const int64_t out_size = conv_out_size(9, 3, stride, pad, pad, dil);
            int64_t want = -1;
            for (int64_t o = 0; o < out_size; ++o)
              if (o * stride - pad + k * dil == in) want = o;
            expect_close(output_reading(in, k * dil, stride, pad, out_size), want, "output_reading", in);
          }
  std::mt19937 rng(7);
  const Config configs[] = {
      // batch cin cout groups h w kh kw sh sw pad[4] dh dw channels_last in_gate out_gate
      {4, 8, 12, 1, 5, 6, 1, 1, 1, 1, {0, 0, 0, 0}, 1, 1, false, true, true},
      {3, 6, 10, 1, 6, 5, 3, 3, 1, 1, {1, 1, 1, 1}, 1, 1, false, true, true},
      {3, 5, 7, 1, 7, 6, 3, 3, 2, 2, {0, 1, 1, 0}, 1, 1, true, true, true},
      {3, 8, 12, 2, 5, 5, 3, 3, 1, 1, {1, 1, 1, 1}, 1, 1, false, true, false},
      {3, 6, 6, 3, 7, 7, 3, 3, 1, 1, {2, 2, 2, 2}, 2, 2, true, false, true},
      {3, 6, 6, 6, 6, 6, 3, 3, 2, 1, {1, 1, 1, 1}, 1, 1, false, true, true},         // depthwise
      {3, 70, 40, 2, 9, 7, 3, 2, 2, 1, {1, 2, 0, 1}, 1, 2, false, true, true},       // > a warp, > a tile
      {2, 40, 72, 1, 11, 9, 1, 3, 1, 2, {0, 0, 1, 1}, 1, 1, true, true, true},
  };
  for (const Config& cfg : configs) run(cfg, rng);
  if (failures != 0) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
