// A CUDA grid emulator for the host: compiles the real kernel source (the text that NVRTC
// gets) with a plain C++ compiler, and runs a launch as host loops.
//
//   xlstm_emu::launch(kernel, grid, block, seed, args...)
//
// calls kernel(args...) once for every (block, thread) of a one-dimensional grid, with
// blockIdx, threadIdx, blockDim and gridDim set as on a GPU. The blocks run in an order
// shuffled from `seed`, and so do the threads of each block (seed 0: natural order), so a
// kernel whose result depends on the order of its blocks or threads gives different
// results for different seeds. Built with -fsanitize=address, every out-of-bounds access
// of a thread is reported.
//
// What it does not emulate: concurrency. Threads run one after the other, to completion,
// so there is no __syncthreads, no __shared__ memory and no grid barrier here; a kernel
// that uses them does not compile against this header.
#ifndef XLSTM_GRID_EMULATOR_H
#define XLSTM_GRID_EMULATOR_H

#include <algorithm>
#include <cstdint>
#include <random>
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

}  // namespace xlstm_emu

#endif  // XLSTM_GRID_EMULATOR_H
