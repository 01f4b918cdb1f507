#include "cpu/frozen_weights.h"

#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace condkernels::cpu {
namespace {

thread_local int64_t frozen_depth = 0;

struct Copy {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  std::vector<int64_t> sizes, strides;
  int kind;
  uint32_t version;
  at::Tensor prepared;

  bool describes(const at::Tensor& w, int k) const {
    return kind == k && data == w.const_data_ptr() && !storage.expired() &&
           storage._unsafe_get_target() == w.storage().unsafeGetStorageImpl() && w.sizes().equals(sizes) &&
           w.strides().equals(strides);
  }
};

class FrozenCopies {
 public:
  static FrozenCopies& instance() {
    static FrozenCopies copies;
    return copies;
  }

  at::Tensor get(const at::Tensor& weight, int kind, const std::function<at::Tensor(const at::Tensor&)>& prepare) {
    const uint32_t version = weight.unsafeGetTensorImpl()->version_counter().current_version();
    std::vector<Copy> released;
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < copies_.size();) {  // copies of weights that are gone go
      if (copies_[i].storage.expired()) {
        released.push_back(std::move(copies_[i]));
        copies_[i] = std::move(copies_.back());
        copies_.pop_back();
      } else {
        ++i;
      }
    }
    Copy* found = nullptr;
    for (Copy& c : copies_)
      if (c.describes(weight, kind)) found = &c;
    if (found != nullptr && found->version == version) return found->prepared;
    // Prepared under the lock: two threads asking for the same weight make it once.
    Copy fresh{weight.storage().getWeakStorageImpl(), weight.const_data_ptr(), weight.sizes().vec(),
               weight.strides().vec(), kind, version, prepare(weight)};
    if (found != nullptr) {
      released.push_back(std::move(*found));
      *found = std::move(fresh);
      return found->prepared;
    }
    copies_.push_back(std::move(fresh));
    return copies_.back().prepared;
  }

  int64_t clear() {
    std::vector<Copy> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(copies_);
    }
    int64_t bytes = 0;
    for (const Copy& c : released) bytes += c.prepared.nbytes();
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::vector<Copy> copies_;
};

void enter_frozen_weights() { ++frozen_depth; }

void exit_frozen_weights() {
  TORCH_CHECK(frozen_depth > 0, "condkernels.frozen_weights(): left more often than entered on this thread");
  --frozen_depth;
}

}  // namespace

bool keeps_frozen_copy(const at::Tensor& weight) { return frozen_depth > 0 && !weight.is_inference(); }

at::Tensor frozen_copy(const at::Tensor& weight, int kind,
                       const std::function<at::Tensor(const at::Tensor&)>& prepare) {
  if (!keeps_frozen_copy(weight)) return at::Tensor();
  return FrozenCopies::instance().get(weight, kind, prepare);
}

int64_t empty_frozen_copies() { return FrozenCopies::instance().clear(); }

}  // namespace condkernels::cpu

TORCH_LIBRARY_FRAGMENT(condkernels, m) {
  // condkernels.frozen_weights() enters and leaves; empty_cpu_cache() also frees the copies.
  m.def("_enter_frozen_weights() -> ()", &condkernels::cpu::enter_frozen_weights);
  m.def("_exit_frozen_weights() -> ()", &condkernels::cpu::exit_frozen_weights);
  m.def("_empty_frozen_weight_copies() -> int", &condkernels::cpu::empty_frozen_copies);
}
