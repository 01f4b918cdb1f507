#include "cpu/output_cache.h"

#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

namespace condkernels::cpu {
namespace {

// Smaller outputs stay with malloc, which reuses them without page faults.
constexpr int64_t kMinCachedBytes = int64_t(32) << 20;
constexpr int64_t kDefaultBudgetMB = 1024;

int64_t budget_bytes() {
  static const int64_t budget = [] {
    const char* env = std::getenv("CONDKERNELS_CPU_OUTPUT_CACHE_MB");
    return (env != nullptr ? std::atoll(env) : kDefaultBudgetMB) << 20;
  }();
  return budget;
}

class OutputCache {
 public:
  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second == bytes) {
          void* p = it->first;
          free_.erase(it);
          free_bytes_ -= bytes;
          return p;
        }
      }
    }
    void* p = std::aligned_alloc(64, static_cast<size_t>(bytes));
    TORCH_CHECK(p != nullptr, "condkernels: cannot allocate ", bytes, " bytes");
    return p;
  }

  void give_back(void* p, int64_t bytes) {
    std::deque<std::pair<void*, int64_t>> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.emplace_back(p, bytes);
      free_bytes_ += bytes;
      while (free_bytes_ > budget_bytes() && !free_.empty()) {  // the oldest first
        evicted.push_back(free_.front());
        free_bytes_ -= free_.front().second;
        free_.pop_front();
      }
    }
    for (auto& [q, n] : evicted) std::free(q);
  }

  int64_t clear() {
    std::deque<std::pair<void*, int64_t>> all;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      all.swap(free_);
      bytes = free_bytes_;
      free_bytes_ = 0;
    }
    for (auto& [q, n] : all) std::free(q);
    return bytes;
  }

  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();  // never destroyed: tensors may outlive exit
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::deque<std::pair<void*, int64_t>> free_;
  int64_t free_bytes_ = 0;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t numel = c10::multiply_integers(sizes);
  const int64_t bytes = (numel * static_cast<int64_t>(options.dtype().itemsize()) + 63) / 64 * 64;
  if (bytes < kMinCachedBytes || bytes > budget_bytes() || options.device().type() != at::kCPU)
    return at::empty(sizes, options);
  void* p = OutputCache::instance().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { OutputCache::instance().give_back(q, bytes); },
                       options);
}

int64_t empty_output_cache() { return OutputCache::instance().clear(); }

}  // namespace condkernels::cpu

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  // condkernels.empty_cpu_cache(): frees the cached CPU output buffers; returns the bytes released.
  m.def("_empty_cpu_output_cache() -> int", &condkernels::cpu::empty_output_cache);
}
