// Work sharing of the CPU kernels beyond at::parallel_for's fixed split.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace condkernels {
namespace cpu {

// Runs f(state, i) for every i in [0, n), the threads claiming items one at a time: on a shared
// machine a thread that is held up leaves its items to the others, where a fixed split would wait
// for it. Each worker first makes what it needs for every item (its buffers): state = make_state().
// Inside a parallel region the calling thread runs them all.
template <typename MakeState, typename F>
void for_each_claimed(int64_t n, const MakeState& make_state, const F& f) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      f(state, i);
  });
}

// The same without a per-worker state: f(i).
template <typename F>
void for_each_claimed(int64_t n, const F& f) {
  for_each_claimed(n, [] { return 0; }, [&](int, int64_t i) { f(i); });
}

// at::parallel_for whose workers run f with the calling thread's state (inference mode, grad mode,
// the dispatch keys it excludes), so that ATen ops inside f behave as they would in the caller. Worker
// threads do not inherit it: there, an in-place or out= op on a tensor the caller made under
// torch.inference_mode() is refused, and ops go through autograd again.
template <typename F>
void parallel_for_as_caller(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState caller;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard as_caller(caller);
    f(b, e);
  });
}

}  // namespace cpu
}  // namespace condkernels
