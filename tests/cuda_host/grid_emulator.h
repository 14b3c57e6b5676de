// A CUDA grid emulator for the host: compiles the real kernel source (the text that NVRTC
// gets) with a plain C++ compiler, and runs a launch as host code.
//
//   xlstm_emu::launch(kernel, grid, block, seed, args...)
//
// calls kernel(args...) once for every (block, thread) of a one-dimensional grid, with
// blockIdx, threadIdx, blockDim and gridDim set as on a GPU. The blocks run in an order
// shuffled from `seed`, and so do the threads of each block (seed 0: natural order), so a
// kernel whose result depends on the order of its blocks or threads gives different
// results for different seeds. Built with -fsanitize=address, every out-of-bounds access
// of a thread is reported. Threads run one after the other, to completion: a kernel that
// waits for another thread (__syncthreads) aborts with a message.
//
//   xlstm_emu::launch_concurrent(kernel, grid, block, shared_bytes, seed, args...)
//
// runs every (block, thread) of the grid as its own host thread, all at once, as a
// cooperative launch does on a GPU (every block resident): __syncthreads waits for the
// threads of the block, atomicAdd, __threadfence and volatile loads work across all of
// them, so a grid barrier built from them really holds the grid, and each block gets its
// own heap buffer of `shared_bytes` for the kernel's dynamic shared memory
// (XLSTM_DYNAMIC_SHARED), so ASan reports an access past it. Threads start in an order
// shuffled from `seed`; __nanosleep yields the host thread.
//
// What it does not emulate: static __shared__ variables, warps and their intrinsics, and
// the GPU's weaker memory model (host threads see each other's writes in x86's order).
#ifndef XLSTM_GRID_EMULATOR_H
#define XLSTM_GRID_EMULATOR_H

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Per host thread, as the launches of two Python threads may run at once (ctypes releases
// the GIL during a call).
static thread_local uint3 blockIdx = {0, 0, 0};
static thread_local uint3 threadIdx = {0, 0, 0};
static thread_local dim3 blockDim;
static thread_local dim3 gridDim;

namespace xlstm_emu {

// The threads of one block, waiting for each other (__syncthreads), and its shared memory.
class Block {
  public:
    Block(unsigned threads, std::size_t shared_bytes)
        : threads_(threads), shared_(shared_bytes ? new unsigned char[shared_bytes] : nullptr) {}
    void sync() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long long generation = generation_;
        if (++waiting_ == threads_) {
            waiting_ = 0;
            ++generation_;
            lock.unlock();  // the woken threads need the mutex: release it first
            wake_.notify_all();
        } else {
            wake_.wait(lock, [&] { return generation_ != generation; });
        }
    }
    unsigned char* shared() const { return shared_.get(); }

  private:
    const unsigned threads_;
    std::unique_ptr<unsigned char[]> shared_;
    std::mutex mutex_;
    std::condition_variable wake_;
    unsigned waiting_ = 0;
    unsigned long long generation_ = 0;
};

// The block of the calling host thread; null outside a concurrent launch.
static thread_local Block* this_block = nullptr;

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "grid_emulator: %s\n", what);
    std::abort();
}

inline Block& current_block(const char* what) {
    if (this_block == nullptr) fail(what);
    return *this_block;
}

// The block's dynamic shared memory (extern __shared__ on a GPU).
inline unsigned char* dynamic_shared() {
    unsigned char* p = current_block("dynamic shared memory needs launch_concurrent").shared();
    if (p == nullptr) fail("the kernel uses dynamic shared memory, but the launch gave none");
    return p;
}

inline std::vector<unsigned> order(unsigned count, std::mt19937_64& rng, bool shuffle) {
    std::vector<unsigned> idx(count);
    for (unsigned k = 0; k < count; ++k) idx[k] = k;
    if (shuffle) std::shuffle(idx.begin(), idx.end(), rng);
    return idx;
}

// Run `kernel` over `grid` blocks of `block` threads each.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, std::uint64_t seed,
            Args... args) {
    std::mt19937_64 rng(seed);
    const bool shuffle = seed != 0;
    gridDim = dim3(grid);
    blockDim = dim3(block);
    for (unsigned b : order(grid, rng, shuffle)) {
        blockIdx = {b, 0, 0};
        for (unsigned t : order(block, rng, shuffle)) {
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
    }
    blockIdx = {0, 0, 0};
    threadIdx = {0, 0, 0};
}

// Run `kernel` over `grid` blocks of `block` threads, every thread at once on its own host
// thread, each block with `shared_bytes` of dynamic shared memory.
template <typename... Params, typename... Args>
void launch_concurrent(void (*kernel)(Params...), unsigned grid, unsigned block,
                       std::size_t shared_bytes, std::uint64_t seed, Args... args) {
    std::mt19937_64 rng(seed);
    const bool shuffle = seed != 0;
    std::vector<std::unique_ptr<Block>> blocks;
    for (unsigned b = 0; b < grid; ++b) blocks.emplace_back(new Block(block, shared_bytes));
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(grid) * block);
    for (unsigned b : order(grid, rng, shuffle)) {
        for (unsigned t : order(block, rng, shuffle)) {
            Block* home = blocks[b].get();
            threads.emplace_back([=] {
                gridDim = dim3(grid);
                blockDim = dim3(block);
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                this_block = home;
                kernel(args...);
                this_block = nullptr;
            });
        }
    }
    for (std::thread& th : threads) th.join();
}

}  // namespace xlstm_emu

// ---- the device functions of CUDA that the kernels use, on host threads
inline void __syncthreads() {
    xlstm_emu::current_block("__syncthreads needs launch_concurrent").sync();
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __nanosleep(unsigned) { std::this_thread::yield(); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T __ldcg(const T* address) {
    return *address;
}

#endif  // XLSTM_GRID_EMULATOR_H
