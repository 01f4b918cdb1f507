// The operands of the three implicit GEMMs of gated_conv2d's CUDA kernels, as seen by one
// (example, group) problem: how a GEMM element (row m, reduction index k, column n) maps through the
// channel lists (common/gated_lists.h) to x, weight and grad_out, and where each result goes.
//
// Written once for the host and the device: the CUDA kernels tile these GEMMs, and a host test
// (python_tests/cpp/gated_conv2d_operands_test.cpp) evaluates them tile by tile and compares with the
// dense masked convolution. Every loader returns 0 outside its problem (partial tiles, padding).
#pragma once

#include <cstdint>

#include "common/conv_geometry.h"
#include "common/gated_channels.h"
#include "common/gated_lists.h"
#include "common/macros.h"

namespace condkernels {

struct Strides4 {
  int64_t b, c, h, w;
};

// The channel list of one (example, group) and its open count.
struct GroupList {
  const int32_t* index;
  int64_t count;
};

// lists is (B, C) and counts (B * groups): see build_channel_lists_kernel.
CK_INLINE GroupList group_list(const int32_t* lists, const int32_t* counts, int64_t b, int64_t grp,
                               int64_t channels, int64_t groups) {
  return {lists + b * channels + grp * (channels / groups), counts[b * groups + grp]};
}

// Forward: rows = listed output channels (the first `outs.count` computed), reduction over
// (open input channel, tap), columns = output pixels.
template <typename T, typename Acc>
struct ForwardOperands {
  ConvGeometry g;
  const T* weight;   // (Cout, Cin / groups, kh, kw), contiguous
  const T* x;        // strided by sx
  Strides4 sx;
  const T* in_gate;  // (B, Cin) or null
  int64_t b, grp;
  GroupList ins, outs;

  CK_INLINE int64_t taps() const { return g.kernel_h * g.kernel_w; }
  CK_INLINE int64_t rows() const { return outs.count; }
  CK_INLINE int64_t reduction() const { return ins.count * taps(); }
  CK_INLINE int64_t cols() const { return g.out_h * g.out_w; }
  CK_INLINE int64_t in_channel(int64_t list_pos) const {
    return grp * g.in_channels_per_group() + ins.index[list_pos];
  }
  CK_INLINE int64_t out_channel(int64_t m) const { return grp * g.out_channels_per_group() + outs.index[m]; }

  CK_INLINE Acc lhs(int64_t m, int64_t k) const {  // weight[open out m, open in (k / taps), tap]
    if (m >= rows() || k >= reduction()) return Acc(0);
    const int64_t t = taps();
    return static_cast<Acc>(
        weight[(out_channel(m) * g.in_channels_per_group() + ins.index[k / t]) * t + k % t]);
  }
  CK_INLINE Acc rhs(int64_t k, int64_t n) const {  // (in_gate * x)[open in, pixel tap (k) of output n reads]
    if (k >= reduction() || n >= cols()) return Acc(0);
    const ReductionIndex r = split_reduction_index(k, g.kernel_h, g.kernel_w);
    const int64_t ci = in_channel(r.list_pos);
    const int64_t ih = g.in_row(n / g.out_w, r.kh), iw = g.in_col(n % g.out_w, r.kw);
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return Acc(0);
    const Acc v = static_cast<Acc>(x[b * sx.b + ci * sx.c + ih * sx.h + iw * sx.w]);
    return in_gate != nullptr ? v * static_cast<Acc>(in_gate[b * g.in_channels + ci]) : v;
  }
  // y = out_gate * (acc + bias) for computed rows whose gate is open, 0 otherwise; `ungated`
  // (when given) gets acc + bias of every computed row. m < Cout / groups, n < cols().
  CK_INLINE void store(int64_t m, int64_t n, Acc acc, const T* bias, const T* out_gate, T* y, T* ungated,
                       Strides4 sy) const {
    const int64_t co = out_channel(m);
    const int64_t off = b * sy.b + co * sy.c + (n / g.out_w) * sy.h + (n % g.out_w) * sy.w;
    if (m >= rows()) {
      y[off] = T(0);
      return;
    }
    const T z = static_cast<T>(acc + (bias != nullptr ? static_cast<Acc>(bias[co]) : Acc(0)));
    if (ungated != nullptr) ungated[off] = z;
    if (out_gate == nullptr) {
      y[off] = z;
      return;
    }
    const T gate = out_gate[b * g.out_channels + co];
    y[off] = gate_is_open(gate) ? static_cast<T>(static_cast<Acc>(z) * static_cast<Acc>(gate)) : T(0);
  }
};

// Gradient of the gated input: rows = listed input channels (the first `rows.count` computed),
// reduction over (open output channel, tap), columns = input pixels.
template <typename T, typename Acc>
struct GradInputOperands {
  ConvGeometry g;
  const T* weight;
  const T* grad_out;  // strided by sgo
  Strides4 sgo;
  const T* out_gate;  // (B, Cout) or null
  int64_t b, grp;
  GroupList in_rows, outs;  // in_rows: the input channels computed first, then the others

  CK_INLINE int64_t taps() const { return g.kernel_h * g.kernel_w; }
  CK_INLINE int64_t rows() const { return in_rows.count; }
  CK_INLINE int64_t reduction() const { return outs.count * taps(); }
  CK_INLINE int64_t cols() const { return g.in_h * g.in_w; }
  CK_INLINE int64_t in_channel(int64_t m) const { return grp * g.in_channels_per_group() + in_rows.index[m]; }
  CK_INLINE int64_t out_channel(int64_t list_pos) const {
    return grp * g.out_channels_per_group() + outs.index[list_pos];
  }

  CK_INLINE Acc lhs(int64_t m, int64_t k) const {  // weight[open out (k / taps), listed in m, tap]
    if (m >= rows() || k >= reduction()) return Acc(0);
    const int64_t t = taps();
    return static_cast<Acc>(
        weight[(out_channel(k / t) * g.in_channels_per_group() + in_rows.index[m]) * t + k % t]);
  }
  // (out_gate * grad_out)[open out, the output pixel reading n via tap]
  CK_INLINE Acc rhs(int64_t k, int64_t n) const {
    if (k >= reduction() || n >= cols()) return Acc(0);
    const ReductionIndex r = split_reduction_index(k, g.kernel_h, g.kernel_w);
    const int64_t oh = output_reading(n / g.in_w, r.kh * g.dilation_h, g.stride_h, g.pad_h_begin, g.out_h);
    const int64_t ow = output_reading(n % g.in_w, r.kw * g.dilation_w, g.stride_w, g.pad_w_begin, g.out_w);
    if (oh < 0 || ow < 0) return Acc(0);
    const int64_t co = out_channel(r.list_pos);
    const Acc v = static_cast<Acc>(grad_out[b * sgo.b + co * sgo.c + oh * sgo.h + ow * sgo.w]);
    return out_gate != nullptr ? v * static_cast<Acc>(out_gate[b * g.out_channels + co]) : v;
  }
  // grad_x = in_gate * acc (0 for rows not computed); grad_gated (B, Cin, H * W) contiguous, when
  // given, gets acc itself. m < Cin / groups, n < cols().
  CK_INLINE void store(int64_t m, int64_t n, Acc acc, const T* in_gate, T* grad_x, Strides4 sgx,
                       Acc* grad_gated) const {
    const int64_t ci = in_channel(m);
    const bool computed = m < rows();
    const Acc value = computed ? acc : Acc(0);
    if (grad_gated != nullptr) grad_gated[(b * g.in_channels + ci) * cols() + n] = value;
    if (grad_x != nullptr) {
      const Acc gate = in_gate != nullptr ? static_cast<Acc>(in_gate[b * g.in_channels + ci]) : Acc(1);
      const int64_t off = b * sgx.b + ci * sgx.c + (n / g.in_w) * sgx.h + (n % g.in_w) * sgx.w;
      grad_x[off] = computed ? static_cast<T>(value * gate) : T(0);
    }
  }
};

// Weight gradient of one example: rows = open output channels, reduction over output pixels,
// columns = (open input channel, tap).
template <typename T, typename Acc>
struct GradWeightOperands {
  ConvGeometry g;
  const T* grad_out;
  Strides4 sgo;
  const T* x;
  Strides4 sx;
  const T* in_gate;
  const T* out_gate;
  int64_t b, grp;
  GroupList ins, outs;

  CK_INLINE int64_t taps() const { return g.kernel_h * g.kernel_w; }
  CK_INLINE int64_t rows() const { return outs.count; }
  CK_INLINE int64_t reduction() const { return g.out_h * g.out_w; }
  CK_INLINE int64_t cols() const { return ins.count * taps(); }
  CK_INLINE int64_t in_channel(int64_t list_pos) const {
    return grp * g.in_channels_per_group() + ins.index[list_pos];
  }
  CK_INLINE int64_t out_channel(int64_t m) const { return grp * g.out_channels_per_group() + outs.index[m]; }

  CK_INLINE Acc lhs(int64_t m, int64_t p) const {  // (out_gate * grad_out)[open out m, pixel p]
    if (m >= rows() || p >= reduction()) return Acc(0);
    const int64_t co = out_channel(m);
    const Acc v = static_cast<Acc>(grad_out[b * sgo.b + co * sgo.c + (p / g.out_w) * sgo.h + (p % g.out_w) * sgo.w]);
    return out_gate != nullptr ? v * static_cast<Acc>(out_gate[b * g.out_channels + co]) : v;
  }
  CK_INLINE Acc rhs(int64_t p, int64_t n) const {  // (in_gate * x)[open in (n / taps), the pixel tap reads for p]
    if (p >= reduction() || n >= cols()) return Acc(0);
    const ReductionIndex r = split_reduction_index(n, g.kernel_h, g.kernel_w);
    const int64_t ci = in_channel(r.list_pos);
    const int64_t ih = g.in_row(p / g.out_w, r.kh), iw = g.in_col(p % g.out_w, r.kw);
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return Acc(0);
    const Acc v = static_cast<Acc>(x[b * sx.b + ci * sx.c + ih * sx.h + iw * sx.w]);
    return in_gate != nullptr ? v * static_cast<Acc>(in_gate[b * g.in_channels + ci]) : v;
  }
  // Offset in the (Cout, Cin / groups * kh * kw) weight gradient of GEMM element (m, n).
  CK_INLINE int64_t grad_weight_offset(int64_t m, int64_t n) const {
    const int64_t t = taps();
    return (out_channel(m) * g.in_channels_per_group() + ins.index[n / t]) * t + n % t;
  }
};

}  // namespace condkernels
