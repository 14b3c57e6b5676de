// Fused per-step LSTM kernels: one launch for the whole pointwise part of a forward step
// and one for a backward step. All arithmetic lives in lstm_pointwise.cuh; these kernels
// only map one thread to one (row, unit) element of the (m, n) grid.
//
// Argument order is the contract with xlstm/_cuda/__init__.py (Loops): the sizes m and n,
// then the step's C-contiguous slices of the engine's stacks, inputs first.

#include "lstm_pointwise.cuh"

#define XLSTM_FWD_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void NAME(                                                        \
        xlstm::index_t m, xlstm::index_t n, const T* __restrict__ gx,                       \
        const T* __restrict__ ga, const T* __restrict__ c_prev, T* __restrict__ s,          \
        T* __restrict__ cct, T* __restrict__ c, T* __restrict__ tc, T* __restrict__ a) {    \
        const xlstm::index_t e =                                                            \
            (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x;                          \
        if (e < m * n) {                                                                    \
            xlstm::lstm_fwd_elem<T>(e, n, gx, ga, c_prev, s, cct, c, tc, a);                \
        }                                                                                   \
    }

// dc and dc_prev may be the same array (updated in place), so neither is __restrict__.
#define XLSTM_BWD_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void NAME(                                                        \
        xlstm::index_t m, xlstm::index_t n, const T* __restrict__ da,                       \
        const T* __restrict__ da_rec, const T* dc, const T* __restrict__ s,                 \
        const T* __restrict__ cct, const T* __restrict__ tc, const T* __restrict__ c_prev,  \
        T* __restrict__ dg, T* dc_prev) {                                                   \
        const xlstm::index_t e =                                                            \
            (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x;                          \
        if (e < m * n) {                                                                    \
            xlstm::lstm_bwd_elem<T>(e, n, da, da_rec, dc, s, cct, tc, c_prev, dg, dc_prev); \
        }                                                                                   \
    }

XLSTM_FWD_KERNEL(xlstm_lstm_fwd_f32, float)
XLSTM_FWD_KERNEL(xlstm_lstm_fwd_f64, double)
XLSTM_BWD_KERNEL(xlstm_lstm_bwd_f32, float)
XLSTM_BWD_KERNEL(xlstm_lstm_bwd_f64, double)
