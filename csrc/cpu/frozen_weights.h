// Prepared copies of weights that the caller declared frozen (condkernels.frozen_weights()).
//
// cond_conv2d's fused small-plane kernel reads every expert through a transposed staging copy
// (cpu/fused_mix_gemm.h): the transposition, and the short rows it reads 4 K bytes apart (18 KB at
// K = 4608, so they crowd a few cache sets), cost it about a quarter of its time (one-off perf
// samples, 3x3 512->512 @7x7, B = 8, E = 8, one thread: 27% on the Intel Xeon, 25% on the AMD
// EPYC Zen 4; a one-off C loop of the staging pattern read ~7 GB/s on one Xeon core, ~9 GB/s for
// the same bytes in order, and transposed them from L2 at 23 GB/s). A weight that does not change
// between calls can be put in the staged layout once and read from there as it lies. Within
// condkernels.frozen_weights() the CPU kernels keep such copies, made on first use and reused while
// the weight keeps its storage, data pointer, shape and version (so in-place updates through
// PyTorch ops are seen; writes that bypass the version counter, through `.data` or NumPy, are not:
// that is the caller's promise). A copy outlives the context, so that a context per request does
// not lay the experts out anew each time. Copies whose weight is gone are freed by the next call
// that asks for a copy, a copy whose weight changed is replaced when next asked for, and
// condkernels.empty_cpu_cache() frees them all.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <functional>

namespace condkernels::cpu {

// Whether frozen_copy gives a copy of `weight`: the calling thread is inside
// condkernels.frozen_weights() and the weight has a version (it is no inference tensor).
bool keeps_frozen_copy(const at::Tensor& weight);

// The copy of `weight` that `prepare` makes (a function of the weight's values alone, told apart by
// `kind`), made now or kept from an earlier call; undefined where keeps_frozen_copy(weight) is not.
at::Tensor frozen_copy(const at::Tensor& weight, int kind,
                       const std::function<at::Tensor(const at::Tensor&)>& prepare);

// Frees every kept copy; returns the bytes released.
int64_t empty_frozen_copies();

// Kinds of copies.
constexpr int kCondConv2dStagedExperts = 0;

}  // namespace condkernels::cpu
