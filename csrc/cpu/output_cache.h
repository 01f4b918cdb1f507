// Reuse of the CPU kernels' largest outputs (cond_conv2d's expert-weight gradients).
//
// Tensors past glibc's mmap threshold (32 MB at most) get fresh pages from the kernel on every
// allocation and are returned to it on every free, so each training step pays the page faults of
// writing them the first time. The buffers of such outputs are kept here when their tensor dies and
// handed to the next request of the same size (with it, forward+backward of eight 3x3 512->512
// experts @7x7 at batch 8 went from 86.5 to 66.6 ms in the full condconv grid, docs/benchmarks.md).
// Free buffers are bounded (CONDKERNELS_CPU_OUTPUT_CACHE_MB, default 1024; 0 turns the cache off),
// the oldest going first; condkernels.empty_cpu_cache() releases them all.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace condkernels::cpu {

// An uninitialised CPU tensor of `sizes` (contiguous), from the cache when it is large enough to
// be worth it, else from at::empty.
at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached buffer; returns the bytes released.
int64_t empty_output_cache();

}  // namespace condkernels::cpu
