// The persistent time loop: the parts of the persistent kernels that no cell owns.
//
// A persistent kernel runs a whole time loop in one cooperative launch (every block
// resident at once). Block b owns the units [j0, j0 + units) of the (m, n) grid and keeps the
// recurrent weights of its units in shared memory for the whole loop. Per step it makes its
// columns of the recurrent product from the whole input of the step (the state, or the
// gradients of all units) and runs the cell's element function on its own (row, unit)
// elements; the grid synchronises once per step so that every block sees the whole new
// state. The kernels themselves are generated from the table in xlstm/accel/cuda/kernels.py;
// xlstm.accel.cuda.Loops launches them and picks their sizes (persistent_plan).
//
// The product sums in order over the inner index, one thread per output, without fused
// multiply-adds: its rounding differs from cuBLAS's (and OpenBLAS's) order, so results
// agree with the array path to the rounding of a dot product, not bit for bit.

#ifndef XLSTM_PERSISTENT_CUH
#define XLSTM_PERSISTENT_CUH

#include "prelude.cuh"  // replaced by its text in the generated source

#if defined(XLSTM_GRID_EMULATOR_H)
#define XLSTM_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(xlstm_emu::dynamic_shared())
#else
#define XLSTM_DYNAMIC_SHARED(T, name)                          \
    extern __shared__ __align__(16) unsigned char xlstm_smem_[]; \
    T* name = reinterpret_cast<T*>(xlstm_smem_)
#endif

namespace xlstm {

// Every thread of the grid waits here until all have arrived. `counter` (zero at launch)
// counts arrivals over the whole launch: the k-th barrier releases when it reaches
// (k + 1) * gridDim.x. Needs every block resident (a cooperative launch). The fences
// publish the block's writes before its arrival and order the reads after the release;
// the data written by other blocks is then read through L2 (__ldcg), past the SM's
// incoherent L1.
__device__ inline void grid_barrier(unsigned long long* counter) {
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned long long blocks = gridDim.x;
        __threadfence();
        const unsigned long long arrived = atomicAdd(counter, 1ull);
        const unsigned long long target = (arrived / blocks + 1ull) * blocks;
        while (*reinterpret_cast<volatile unsigned long long*>(counter) < target) {
            __nanosleep(32);
        }
        __threadfence();
    }
    __syncthreads();
}

// Step s's slice of a stack of `len` slices of `size` elements, whose slice 0 is step
// -base (as the loops index a stack: (base + s) % len; a single array has len 1). The
// per-step kernels take their stacks the same way, with the step as a parameter.
template <typename T>
__device__ inline T* step_slice(T* stack, index_t len, index_t base, index_t s, index_t size) {
    return stack + ((base + s) % len) * size;
}

// The columns that the block owns: `groups` groups of its `own` units, group g at column
// g * stride + j0 + (unit - j0).
struct Columns {
    index_t groups, own, stride, j0;
    __device__ index_t count() const { return groups * own; }
    __device__ index_t at(index_t c) const { return (c / own) * stride + j0 + c % own; }
};

// Load the weights of the block's columns into shared memory, row c_local of stride ldw:
// w_sh[c * ldw + k] = w[k * w_rs + col(c) * w_cs] for k < K.
template <typename T>
__device__ inline void load_weights(const T* __restrict__ w, index_t w_rs, index_t w_cs,
                                    index_t K, Columns cols, T* w_sh, index_t ldw) {
    for (index_t q = threadIdx.x; q < cols.count() * K; q += blockDim.x) {
        const index_t c = q / K;
        const index_t k = q - c * K;
        w_sh[c * ldw + k] = w[k * w_rs + cols.at(c) * w_cs];
    }
    __syncthreads();
}

// The block's columns of out = in @ W^T: out[r, col(c)] = sum_k in[r, k] w_sh[c][k] for the
// m rows of `in` (m, K), in tiles of `tile` rows staged in shared memory (stride ldw).
// Every thread of the block calls it; it returns after a __syncthreads.
template <typename T>
__device__ inline void block_gemm(const T* in, index_t m, index_t K, T* out, index_t ld_out,
                                  Columns cols, const T* w_sh, T* tile_sh, index_t tile,
                                  index_t ldw) {
    const index_t ncols = cols.count();
    for (index_t r0 = 0; ncols > 0 && r0 < m; r0 += tile) {
        const index_t rows = m - r0 < tile ? m - r0 : tile;
        __syncthreads();  // the previous tile is read
        for (index_t q = threadIdx.x; q < rows * K; q += blockDim.x) {
            const index_t r = q / K;
            const index_t k = q - r * K;
            tile_sh[r * ldw + k] = __ldcg(in + (r0 + r) * K + k);
        }
        __syncthreads();
        for (index_t q = threadIdx.x; q < rows * ncols; q += blockDim.x) {
            const index_t r = q / ncols;
            const index_t c = q - r * ncols;
            const T* x = tile_sh + r * ldw;
            const T* wc = w_sh + c * ldw;
            T acc = T(0);
            for (index_t k = 0; k < K; ++k) acc += x[k] * wc[k];
            out[(r0 + r) * ld_out + cols.at(c)] = acc;
        }
    }
    __syncthreads();
}

}  // namespace xlstm

#endif  // XLSTM_PERSISTENT_CUH
