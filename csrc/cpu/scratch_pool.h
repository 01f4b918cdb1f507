// Per-thread scratch memory of the CPU kernels (gated_conv2d, the fused small-plane cond_conv2d).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdlib>
#include <memory>

namespace condkernels {
namespace cpu {

// Scratch memory kept by each thread from call to call, grown as needed. Buffers of a few MB
// allocated and freed on every call come from fresh pages (glibc maps and unmaps them, or trims
// the heap), and the page faults on first touch cost as much as the copies written into them: at
// batch 1 on the CPU benchmarked they made gated_conv2d's compacted convolution of a 64->128 3x3
// layer at stride 2 twice as slow as the same convolution on reused buffers. Each op's call
// takes its slots afresh, so ops may number their slots independently.
class ScratchPool {
 public:
  // `bytes` of memory for `slot`, 64-byte aligned; valid until the same thread asks for the slot again.
  void* get(int slot, size_t bytes) {
    Buffer& b = buffers_[slot];
    if (b.bytes < bytes) {
      b.data.reset(static_cast<char*>(std::aligned_alloc(64, round_up_bytes(bytes))));
      TORCH_CHECK(b.data != nullptr, "condkernels: cannot allocate ", bytes, " bytes of scratch memory");
      b.bytes = round_up_bytes(bytes);
    }
    return b.data.get();
  }
  static ScratchPool& of_this_thread() {
    thread_local ScratchPool pool;
    return pool;
  }
  static constexpr int kSlots = 11;

 private:
  static size_t round_up_bytes(size_t n) { return std::max<size_t>(64, (n + 63) / 64 * 64); }
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    size_t bytes = 0;
  };
  std::array<Buffer, kSlots> buffers_;
};

}  // namespace cpu
}  // namespace condkernels
