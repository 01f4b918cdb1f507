// im2col / col2im for a run of examples, with asymmetric padding, in both memory formats.
//
// NCHW: cols[b] is (Cin * kh * kw, OH * OW), rows ordered (c, kh, kw) like the weight, so group j is
//       the row block [j * Kg, (j + 1) * Kg) with Kg = Cin/groups * kh * kw.
// NHWC: cols[b] is (OH * OW, Cin * kh * kw), columns ordered (group, kh, kw, c-in-group), so each tap
//       copies a contiguous run of channels and group j is the column block [j * Kg, (j + 1) * Kg).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/conv_geometry.h"
#include "cpu/row_kernels.h"

namespace condkernels::im2col {

template <typename T>
void gather(const ConvGeometry& g, bool channels_last, const T* x, int64_t batch, T* cols) {
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const int64_t KH = g.kernel_h, KW = g.kernel_w, taps = KH * KW;
  if (!channels_last) {
    at::parallel_for(0, batch * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const T* xp = x + bc * H * W;
        for (int64_t i = 0; i < KH; ++i) {
          int64_t oh_lo, oh_hi;
          conv_valid_out_range(H, OH, g.stride_h, g.pad_h_begin, i * g.dilation_h, &oh_lo, &oh_hi);
          for (int64_t j = 0; j < KW; ++j) {
            int64_t ow_lo, ow_hi;
            conv_valid_out_range(W, OW, g.stride_w, g.pad_w_begin, j * g.dilation_w, &ow_lo, &ow_hi);
            T* row = cols + (bc * taps + i * KW + j) * OH * OW;
            for (int64_t oh = 0; oh < OH; ++oh) {
              T* out = row + oh * OW;
              if (oh < oh_lo || oh >= oh_hi || ow_lo >= ow_hi) {
                std::fill(out, out + OW, T(0));
                continue;
              }
              std::fill(out, out + ow_lo, T(0));
              std::fill(out + ow_hi, out + OW, T(0));
              const T* in = xp + g.in_row(oh, i) * W + g.in_col(ow_lo, j);
              if (g.stride_w == 1) {
                std::copy(in, in + (ow_hi - ow_lo), out + ow_lo);
              } else {
                for (int64_t ow = ow_lo; ow < ow_hi; ++ow) out[ow] = in[(ow - ow_lo) * g.stride_w];
              }
            }
          }
        }
      }
    });
    return;
  }
  const int64_t Cg = g.in_channels_per_group(), K = C * taps;
  at::parallel_for(0, batch * OH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t boh = begin; boh < end; ++boh) {
      const int64_t b = boh / OH, oh = boh % OH;
      for (int64_t ow = 0; ow < OW; ++ow) {
        T* out = cols + (boh * OW + ow) * K;
        for (int64_t i = 0; i < KH; ++i) {
          const int64_t ih = g.in_row(oh, i);
          for (int64_t j = 0; j < KW; ++j) {
            const int64_t iw = g.in_col(ow, j);
            const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
            const T* in = x + ((b * H + ih) * W + iw) * C;
            for (int64_t grp = 0; grp < g.groups; ++grp) {
              T* dst = out + grp * Cg * taps + (i * KW + j) * Cg;
              if (inside) {
                std::copy(in + grp * Cg, in + (grp + 1) * Cg, dst);
              } else {
                std::fill(dst, dst + Cg, T(0));
              }
            }
          }
        }
      }
    }
  });
}

// grad_x[b] = col2im(dcols[b]): the adjoint of `gather`, accumulated in A and written once.
template <typename A, typename T>
void scatter(const ConvGeometry& g, bool channels_last, const T* dcols, int64_t batch, T* grad_x) {
  const int64_t C = g.in_channels, H = g.in_h, W = g.in_w, OH = g.out_h, OW = g.out_w;
  const int64_t KH = g.kernel_h, KW = g.kernel_w, taps = KH * KW;
  if (!channels_last) {
    at::parallel_for(0, batch * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> acc(H * W);
      for (int64_t bc = begin; bc < end; ++bc) {
        std::fill(acc.begin(), acc.end(), A(0));
        for (int64_t i = 0; i < KH; ++i) {
          int64_t oh_lo, oh_hi;
          conv_valid_out_range(H, OH, g.stride_h, g.pad_h_begin, i * g.dilation_h, &oh_lo, &oh_hi);
          for (int64_t j = 0; j < KW; ++j) {
            int64_t ow_lo, ow_hi;
            conv_valid_out_range(W, OW, g.stride_w, g.pad_w_begin, j * g.dilation_w, &ow_lo, &ow_hi);
            if (ow_lo >= ow_hi) continue;
            const T* row = dcols + (bc * taps + i * KW + j) * OH * OW;
            for (int64_t oh = oh_lo; oh < oh_hi; ++oh) {
              rows::scatter_axpy(acc.data() + g.in_row(oh, i) * W + g.in_col(ow_lo, j), row + oh * OW + ow_lo,
                                 A(1), ow_hi - ow_lo, g.stride_w);
            }
          }
        }
        T* gx = grad_x + bc * H * W;
        for (int64_t p = 0; p < H * W; ++p) gx[p] = static_cast<T>(acc[p]);
      }
    });
    return;
  }
  // NHWC: one work item owns (example, group) so its scatter never races with another's.
  const int64_t Cg = g.in_channels_per_group(), K = C * taps;
  at::parallel_for(0, batch * g.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(H * W * Cg);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / g.groups, grp = item % g.groups;
      std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int64_t ow = 0; ow < OW; ++ow) {
          const T* src = dcols + ((b * OH + oh) * OW + ow) * K + grp * Cg * taps;
          for (int64_t i = 0; i < KH; ++i) {
            const int64_t ih = g.in_row(oh, i);
            if (ih < 0 || ih >= H) continue;
            for (int64_t j = 0; j < KW; ++j) {
              const int64_t iw = g.in_col(ow, j);
              if (iw < 0 || iw >= W) continue;
              rows::add_rows(acc.data() + (ih * W + iw) * Cg, src + (i * KW + j) * Cg, Cg);
            }
          }
        }
      }
      T* gx = grad_x + b * H * W * C + grp * Cg;
      for (int64_t p = 0; p < H * W; ++p)
        for (int64_t c = 0; c < Cg; ++c) gx[p * C + c] = static_cast<T>(acc[p * Cg + c]);
    }
  });
}

}  // namespace condkernels::im2col
