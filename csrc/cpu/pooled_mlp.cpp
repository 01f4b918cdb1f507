// CPU kernel of pooled_mlp (csrc/ops/pooled_mlp.h) for float and double. ATen's mean alone costs
// ~10 us of reduction set-up at batch 1 whatever the size (a gate's ReLU and two small products
// as much again); here the pooling is one pass over x and the small layers are plain loops, so a
// gate costs its read of x. Other dtypes take the ATen composition.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "ops/pooled_mlp.h"

namespace condkernels {
namespace {

// Independent partial sums: the loops over them vectorise without reassociating a single sum.
constexpr int64_t kLanes = 16;

// Pooled values are summed in this many-element pieces per thread task.
constexpr int64_t kGrainElements = 32768;

// Below this batch the layers are loops over the rows; from it, BLAS.
constexpr int64_t kBlasBatch = 16;

template <typename T>
T sum_contiguous(const T* p, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += p[i + l];
  T total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
  for (; i < n; ++i) total += p[i];
  return total;
}

// (B, C) means over H and W of x, NCHW or channels_last contiguous.
template <typename T>
void pool(const at::Tensor& x, T* pooled) {
  const int64_t batch = x.size(0), channels = x.size(1), plane = x.size(2) * x.size(3);
  const T* x_p = x.const_data_ptr<T>();
  const T scale = plane > 0 ? T(1) / static_cast<T>(plane) : std::numeric_limits<T>::quiet_NaN();
  if (x.is_contiguous()) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(plane, 1));
    at::parallel_for(0, batch * channels, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) pooled[i] = sum_contiguous(x_p + i * plane, plane) * scale;
    });
    return;
  }
  // channels_last: each pixel's channels are a row; the rows add into one row of sums.
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(plane * channels, 1));
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* sums = pooled + b * channels;
      std::fill(sums, sums + channels, T(0));
      const T* rows = x_p + b * plane * channels;
      for (int64_t p = 0; p < plane; ++p)
        for (int64_t c = 0; c < channels; ++c) sums[c] += rows[p * channels + c];
      for (int64_t c = 0; c < channels; ++c) sums[c] *= scale;
    }
  });
}

// out[b] = w in[b] + bias (w: (out_features, in_features) contiguous), then ReLU if asked.
template <typename T>
void layer(const T* in, const T* w, const T* bias, int64_t batch, int64_t in_features, int64_t out_features,
           bool relu, T* out) {
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t o = 0; o < out_features; ++o) {
      const T* row = w + o * in_features;
      const T* v = in + b * in_features;
      T acc[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= in_features; i += kLanes)
        for (int64_t l = 0; l < kLanes; ++l) acc[l] += row[i + l] * v[i + l];
      T total = bias != nullptr ? bias[o] : T(0);
      for (int64_t l = 0; l < kLanes; ++l) total += acc[l];
      for (; i < in_features; ++i) total += row[i] * v[i];
      out[b * out_features + o] = relu ? std::max(total, T(0)) : total;
    }
  }
}

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t ? t->const_data_ptr<T>() : nullptr;
}

at::Tensor pooled_mlp_cpu(const at::Tensor& x_in, const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
                          const std::optional<at::Tensor>& w2_in, const std::optional<at::Tensor>& b2_in) {
  check_pooled_mlp_args(x_in, w1_in, b1_in, w2_in, b2_in);
  const auto dtype = x_in.scalar_type();
  const int64_t batch = x_in.size(0);
  if ((dtype != at::kFloat && dtype != at::kDouble) || batch >= kBlasBatch)
    return pooled_mlp_composite(x_in, w1_in, b1_in, w2_in, b2_in);
  const at::Tensor x = x_in.is_contiguous() || x_in.is_contiguous(at::MemoryFormat::ChannelsLast)
                           ? x_in
                           : x_in.contiguous();
  auto contiguous = [](const std::optional<at::Tensor>& t) {
    return t ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  const at::Tensor w1 = w1_in.contiguous();
  const auto b1 = contiguous(b1_in), w2 = contiguous(w2_in), b2 = contiguous(b2_in);
  const int64_t channels = x.size(1), hidden = w1.size(0), outputs = w2 ? w2->size(0) : hidden;
  at::Tensor out = at::empty({batch, outputs}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "pooled_mlp_cpu", [&] {
    std::vector<scalar_t> pooled(batch * channels), h(w2 ? batch * hidden : 0);
    pool<scalar_t>(x, pooled.data());
    scalar_t* first_out = w2 ? h.data() : out.mutable_data_ptr<scalar_t>();
    layer<scalar_t>(pooled.data(), w1.const_data_ptr<scalar_t>(), data_or_null<scalar_t>(b1), batch, channels,
                    hidden, /*relu=*/w2.has_value(), first_out);
    if (w2) {
      layer<scalar_t>(h.data(), w2->const_data_ptr<scalar_t>(), data_or_null<scalar_t>(b2), batch, hidden,
                      outputs, /*relu=*/false, out.mutable_data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace
}  // namespace condkernels

TORCH_LIBRARY_IMPL(condkernels, CPU, m) {
  m.impl("pooled_mlp", &condkernels::pooled_mlp_cpu);
}
