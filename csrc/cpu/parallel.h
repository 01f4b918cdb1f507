// Work sharing of the CPU kernels beyond at::parallel_for's fixed split.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace condkernels {
namespace cpu {

// Runs f(i) for every i in [0, n), the threads claiming items one at a time: on a shared machine a
// thread that is held up leaves its items to the others, where a fixed split would wait for it.
// Inside a parallel region the calling thread runs them all.
template <typename F>
void for_each_claimed(int64_t n, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      f(i);
  });
}

}  // namespace cpu
}  // namespace condkernels
