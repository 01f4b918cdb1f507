// cond_conv2d's expert and routing gradients on small output planes (float32, one group, NCHW):
//   dW_e = sum_b r[b,e] dW_b  and  dr[b,e] = <dW_b, W_e>,  with dW_b = dy_b cols_b^T,
// without ever storing a whole dW_b. Per block of 64 output channels and stage of reduction rows,
// each example's (32, 64) piece of dW_b is computed in accumulator registers over its P pixels
// (16 or 64 channels x up to 6 rows, as the forward's product in cpu/fused_mix_gemm.h), left in
// L1, and folded at once into the stage's dW_e accumulators and into dr against the staged W_e.
//
// Why: the tiled path (cpu/cond_conv2d.cpp) runs one GEMM per example and tile with an inner
// dimension of only P (49 on ResNet-50's last stage), which the library runs far from its peak
// while it packs the columns again for every tile, and it writes each dW_b tile out and reads it
// back twice (for dW_e and for dr). Here the per-example gradient never leaves the core.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/fused_mix_gemm.h"
#include "cpu/mixing.h"
#include "cpu/scratch_pool.h"

namespace condkernels {
namespace cpu {
namespace fused_weight_grad {

using fused_mix_gemm::kBlock;    // output channels per block
using fused_mix_gemm::kKc;       // reduction rows per piece of dW_b
using fused_mix_gemm::kMixGroup; // examples folded together

// The backward takes both fused kernels (this one and the column gradients from
// cpu/fused_mix_gemm.h) up to this many experts: folding costs 2E multiply-adds per weight and
// example against P for the product. From `python -m condkernels.bench --suite condconv --full
// --paths --rounds 3 --filter "(ResNet-50) B=8 E=8 fwd+bwd"` and `--filter "B=8 E=32 fwd+bwd"` on
// the 2-core AMD EPYC (AVX2), forward + backward, ms (fused=1 / fused=0, both directions): 3x3
// 512->512 @7x7 E = 8 103 / 116, E = 32 232 / 215; pointwise 2048->512 @7x7 E = 8 45.7 / 45.9,
// E = 32 101 / 73.9. Between them, an interleaved backward-only check at E = 16 (a one-off script,
// not in the grid) had the tiles faster on both shapes, so the limit is 8. Past it, the backward
// still takes them once B >= E (use_fused_mix_gemm), as the forward does: with dW_e streamed,
// `--paths --rounds 3 --filter "(ResNet-50) B=32 E=32 fwd+bwd"` on the 2-core Intel Xeon, fused=1 /
// fused=0: 3x3 512->512 @7x7 372 / 430, pointwise 2048->512 @7x7 162 / 209.
constexpr int64_t kMaxExperts = 8;

struct Problem {
  const float* cols;     // (B, K, P): each example's im2col columns (or x itself for a plain 1x1)
  int64_t cols_stride;   // elements between two examples' columns
  const float* dy;       // (B, Cout, P), examples dy_stride apart
  int64_t dy_stride;
  const float* weight;   // (E, Cout, K)
  const float* routing;  // (B, E)
  float* grad_weight;    // (E, Cout, K) or null
  float* grad_routing;   // (B, E) or null: written
  mixing::Write write;   // how grad_weight is written: stored, added to, or streamed past the caches
  int64_t batch, experts, out_channels, reduction, pixels;
};

// Reduction rows per stage: the staged W_e pieces and the dW_e accumulators, E x rows x kBlock
// floats each, share half of the core's L2.
inline int64_t stage_rows(int64_t experts) {
  const int64_t rows = l2_cache_bytes() / 4 / (experts * kBlock * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(kKc, rows / kKc * kKc);
}

// The thread's buffers, all 64-byte aligned: staged and grad (E x staged_expert_stride(stage_rows) each),
// dy_t (B x P x kBlock: the block's dy transposed), pieces (kMixGroup x kKc x kBlock).
struct Buffers {
  float* staged;
  float* grad;
  float* dy_t;
  float* pieces;
};

// One (block of kBlock channels from c0, stage of rows [s0, s0 + sc)) task for every example;
// dr_part (B x E) receives this task's share of dr. dy_t holds the block's dy transposed when
// dy_ready. Compiled once per instruction set (cpu/fused_weight_grad_kernel.h).
using RunTask = void (*)(const Problem& pb, int64_t c0, int64_t s0, int64_t sc, bool dy_ready, const Buffers& buf,
                         float* dr_part);

void run_task_avx512(const Problem& pb, int64_t c0, int64_t s0, int64_t sc, bool dy_ready, const Buffers& buf,
                     float* dr_part);
void run_task_avx2(const Problem& pb, int64_t c0, int64_t s0, int64_t sc, bool dy_ready, const Buffers& buf,
                   float* dr_part);

inline RunTask run_task_kernel() {
  switch (vector_isa()) {
    case VectorIsa::kAvx512: return run_task_avx512;
    case VectorIsa::kAvx2: return run_task_avx2;
    default: return nullptr;
  }
}

// The thread's scratch slots from this one (0-2 are the forward kernel's, 3-4 cpu/cond_conv2d.cpp's).
constexpr int kFirstSlot = 5;

// Runs the whole problem: tasks of one block and one stage, in parallel (a thread's consecutive
// tasks share a block and its transposed dy). Each task writes its own piece of dW_e; the routing
// gradient is summed over the tasks' shares in task order, so the result does not depend on the
// number of threads.
inline void run(const Problem& pb) {
  const RunTask run_task = run_task_kernel();
  const int64_t blocks = (pb.out_channels + kBlock - 1) / kBlock;
  const int64_t rows = stage_rows(pb.experts);
  const int64_t stages = (pb.reduction + rows - 1) / rows;
  const int64_t tasks = blocks * stages;
  const bool want_dr = pb.grad_routing != nullptr;
  std::vector<float> dr_parts(want_dr ? tasks * pb.batch * pb.experts : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t staged_floats = pb.experts * fused_mix_gemm::staged_expert_stride(rows);
    const Buffers buf{fused_mix_gemm::scratch_floats(kFirstSlot, staged_floats),
                      fused_mix_gemm::scratch_floats(kFirstSlot + 1, staged_floats),
                      fused_mix_gemm::scratch_floats(kFirstSlot + 2, pb.batch * pb.pixels * kBlock),
                      fused_mix_gemm::scratch_floats(kFirstSlot + 3, kMixGroup * kKc * kBlock)};
    int64_t transposed_block = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t blk = task / stages, s0 = (task % stages) * rows;
      run_task(pb, blk * kBlock, s0, std::min(rows, pb.reduction - s0), blk == transposed_block, buf,
               want_dr ? dr_parts.data() + task * pb.batch * pb.experts : nullptr);
      transposed_block = blk;
    }
  });
  if (!want_dr) return;
  for (int64_t i = 0; i < pb.batch * pb.experts; ++i) {
    float s = 0.0f;
    for (int64_t task = 0; task < tasks; ++task) s += dr_parts[task * pb.batch * pb.experts + i];
    pb.grad_routing[i] = s;
  }
}

}  // namespace fused_weight_grad
}  // namespace cpu
}  // namespace condkernels
