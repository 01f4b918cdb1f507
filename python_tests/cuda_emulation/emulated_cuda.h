// The CUDA features condkernels' kernels use, emulated with host threads, so that the kernels in
// csrc/cuda/ run on CPU tensors (python_tests/cuda_emulation/build.py rewrites each launch
// `k<<<grid, block, shared, stream>>>(args)` into `::emu::launch(::emu::Config(grid, block, shared,
// stream), k, args)` and includes this header in place of the CUDA ones).
//
// Every thread of a block is a host thread, so __syncthreads, warp shuffles and ballots are real
// rendezvous; a few blocks run at once, each with its own __shared__ variables (build.py makes
// each declaration a reference to the block's copy, emu::block_shared), so that blocks also race
// for global memory as on the device. It checks the kernels' indexing, synchronisation and
// arithmetic, not their speed, the device's memory model or resource use
// (python_tests/test_cuda_launch_resources.py reads those from the compiled code).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace emu {

struct Stream {};

struct Block {
  explicit Block(int threads)
      : barrier(threads), warps((threads + 31) / 32) {
    for (int w = 0; w < static_cast<int>(warps.size()); ++w)
      warps[w] = std::make_unique<Warp>(std::min(32, threads - 32 * w));
  }
  struct Warp {
    explicit Warp(int size_) : size(size_), barrier(size_) {}
    int size;
    std::barrier<> barrier;
    alignas(16) unsigned char slots[32][16] = {};
  };
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic_shared;
  // The block's __shared__ variables, by declaration, made on first use and filled with garbage.
  std::mutex statics_mutex;
  std::map<const void*, std::vector<unsigned char>> statics;

  void* shared_variable(const void* key, size_t bytes) {
    std::lock_guard<std::mutex> lock(statics_mutex);
    auto& slot = statics[key];
    if (slot.empty()) slot.assign(bytes + 64, 0xA5);
    return aligned(slot.data());
  }
  static void* aligned(unsigned char* p) { return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64; }
};

struct ThreadState {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
  int rank = 0;  // the thread's linear index in its block: lane rank % 32 of warp rank / 32
  Block* block = nullptr;
};

inline ThreadState& state() {
  static thread_local ThreadState s;
  return s;
}

struct Config {
  template <class G, class B>
  Config(G grid_, B block_, size_t shared_ = 0, Stream = {}) : grid(to_dim3(grid_)), block(to_dim3(block_)),
                                                               shared(shared_) {}
  static dim3 to_dim3(dim3 d) { return d; }
  template <class I>
  static dim3 to_dim3(I n) {
    return dim3(static_cast<unsigned>(n));
  }
  dim3 grid, block;
  size_t shared;
};

inline unsigned char* dynamic_shared() {
  return static_cast<unsigned char*>(Block::aligned(state().block->dynamic_shared.data()));
}

// `__shared__ T name;` as build.py rewrites it: `auto& name = emu::block_shared<T, __LINE__>();`.
template <class T, int Line>
T& block_shared() {
  static const char key = 0;  // one per declaration (and type)
  return *static_cast<T*>(state().block->shared_variable(&key, sizeof(T)));
}

// Host threads kept for the emulated CUDA threads of one block at a time (made on first need and
// kept for the process: starting 256 threads for every block made the tests slow).
class ThreadPool {
 public:
  static ThreadPool& get() {
    static ThreadPool* pool = new ThreadPool();  // never destroyed: its threads wait for work
    return *pool;
  }

  // Runs body(t) for t in [0, threads), each on its own thread; returns when all are done.
  void run(int threads, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_) < threads) {
      std::thread(&ThreadPool::work, this, static_cast<int>(workers_)).detach();
      ++workers_;
    }
    body_ = &body;
    active_ = threads;
    remaining_ = threads;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    body_ = nullptr;
  }

 private:
  void work(int id) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (id >= active_) continue;
      const std::function<void(int)>* body = body_;
      lock.unlock();
      (*body)(id);
      lock.lock();
      if (--remaining_ == 0) done_.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  size_t workers_ = 0;
  uint64_t generation_ = 0;
  int active_ = 0, remaining_ = 0;
  const std::function<void(int)>* body_ = nullptr;
};

// Blocks run at once, taken from across the grid (wave w runs blocks w, w + waves, ...): blocks
// that update the same memory usually differ in their slowest grid index, far apart in launch order.
constexpr int kConcurrentBlocks = 4;

// Runs kernel(args...) once per thread of every block of the grid.
template <class... P, class... A>
void launch(const Config& c, void (*kernel)(P...), A&&... a) {
  std::tuple<std::decay_t<P>...> args(std::forward<A>(a)...);
  const int threads = static_cast<int>(c.block.x * c.block.y * c.block.z);
  TORCH_CHECK(threads >= 1 && threads <= 1024, "emulated launch: ", threads, " threads per block");
  TORCH_CHECK(c.shared <= 227 * 1024, "emulated launch: ", c.shared, " bytes of dynamic shared memory");
  const int64_t blocks = int64_t{c.grid.x} * c.grid.y * c.grid.z;
  const int64_t waves = (blocks + kConcurrentBlocks - 1) / kConcurrentBlocks;
  for (int64_t first = 0; first < waves; ++first) {
    const int wave = static_cast<int>((blocks - first + waves - 1) / waves);  // blocks first + i * waves
    std::vector<std::unique_ptr<Block>> wave_blocks;
    for (int i = 0; i < wave; ++i) {
      wave_blocks.push_back(std::make_unique<Block>(threads));
      wave_blocks.back()->dynamic_shared.assign(c.shared + 64, 0xA5);  // not zero: kernels must not assume it
    }
    const std::function<void(int)> body = [&](int id) {
      const int i = id / threads, t = id % threads;
      const int64_t linear = first + i * waves;
      Block& block = *wave_blocks[i];
      ThreadState& s = state();
      s.thread_idx = uint3{t % c.block.x, (t / c.block.x) % c.block.y, t / (c.block.x * c.block.y)};
      s.block_idx = uint3{static_cast<unsigned>(linear % c.grid.x), static_cast<unsigned>(linear / c.grid.x % c.grid.y),
                          static_cast<unsigned>(linear / (int64_t{c.grid.x} * c.grid.y))};
      s.block_dim = c.block;
      s.grid_dim = c.grid;
      s.rank = t;
      s.block = &block;
      std::apply(kernel, args);
      // An exited thread no longer holds up the others' barriers, as on the device.
      block.warps[t / 32]->barrier.arrive_and_drop();
      block.barrier.arrive_and_drop();
    };
    ThreadPool::get().run(wave * threads, body);
  }
}

inline int lane() { return state().rank % 32; }
inline Block::Warp& warp() { return *state().block->warps[state().rank / 32]; }

}  // namespace emu

#define threadIdx (::emu::state().thread_idx)
#define blockIdx (::emu::state().block_idx)
#define blockDim (::emu::state().block_dim)
#define gridDim (::emu::state().grid_dim)

inline void __syncthreads() { ::emu::state().block->barrier.arrive_and_wait(); }

template <class T>
T __shfl_down_sync(unsigned /*mask*/, T v, unsigned offset) {
  static_assert(sizeof(T) <= 16, "one slot per lane");
  auto& w = ::emu::warp();
  const int lane = ::emu::lane();
  std::memcpy(w.slots[lane], &v, sizeof(T));
  w.barrier.arrive_and_wait();
  T out = v;
  if (lane + static_cast<int>(offset) < w.size) std::memcpy(&out, w.slots[lane + offset], sizeof(T));
  w.barrier.arrive_and_wait();
  return out;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  auto& w = ::emu::warp();
  const int lane = ::emu::lane();
  const unsigned char bit = predicate ? 1 : 0;
  w.slots[lane][0] = bit;
  w.barrier.arrive_and_wait();
  unsigned ballot = 0;
  for (int i = 0; i < w.size; ++i)
    if (w.slots[i][0]) ballot |= 1u << i;
  w.barrier.arrive_and_wait();
  return ballot & mask;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }

template <class T>
T atomicAdd(T* address, T v) {
  return std::atomic_ref<T>(*address).fetch_add(v);
}

using std::max;
using std::min;

using cudaStream_t = ::emu::Stream;

struct cudaDeviceProp {  // the fields the kernels' host code reads
  int multiProcessorCount = 2;
};

namespace at::cuda {
inline ::emu::Stream getCurrentCUDAStream() { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp props;
  return &props;
}
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda

#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
