// Fused per-step LSTM kernels: one launch for the whole pointwise part of a forward step
// and one for a backward step. All arithmetic lives in lstm_pointwise.cuh; these kernels
// only map one thread to one (row, unit) element of the (m, n) grid.
//
// Argument order is the contract with xlstm/_cuda/__init__.py (_forward_args and
// _backward_args): sizes, then each input as (pointer, strides in elements), then the
// contiguous outputs.

#include "lstm_pointwise.cuh"

#define XLSTM_FWD_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void NAME(                                                        \
        xlstm::index_t m, xlstm::index_t n,                                                 \
        const T* __restrict__ g, xlstm::index_t g_rs, xlstm::index_t g_cs,                  \
        const T* __restrict__ c_prev, xlstm::index_t cp_rs, xlstm::index_t cp_cs,           \
        T* __restrict__ s, T* __restrict__ cct, T* __restrict__ c, T* __restrict__ tc,      \
        T* __restrict__ a) {                                                                \
        const xlstm::index_t e =                                                            \
            (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x;                          \
        if (e < m * n) {                                                                    \
            xlstm::lstm_fwd_elem<T>(e, n, g, g_rs, g_cs, c_prev, cp_rs, cp_cs,              \
                                    s, cct, c, tc, a);                                      \
        }                                                                                   \
    }

#define XLSTM_BWD_KERNEL(NAME, T)                                                           \
    extern "C" __global__ void NAME(                                                        \
        xlstm::index_t m, xlstm::index_t n,                                                 \
        const T* __restrict__ da, xlstm::index_t da_rs, xlstm::index_t da_cs,               \
        const T* __restrict__ dc, xlstm::index_t dc_rs, xlstm::index_t dc_cs,               \
        const T* __restrict__ K, xlstm::index_t K_rs, xlstm::index_t K_cs,                  \
        const T* __restrict__ Q, xlstm::index_t Q_rs, xlstm::index_t Q_cs,                  \
        const T* __restrict__ P, xlstm::index_t P_rs, xlstm::index_t P_gs,                  \
        xlstm::index_t P_cs,                                                                \
        const T* __restrict__ f, xlstm::index_t f_rs, xlstm::index_t f_cs,                  \
        T* __restrict__ dg, T* __restrict__ dc_prev) {                                      \
        const xlstm::index_t e =                                                            \
            (xlstm::index_t)blockIdx.x * blockDim.x + threadIdx.x;                          \
        if (e < m * n) {                                                                    \
            xlstm::lstm_bwd_elem<T>(e, n, da, da_rs, da_cs, dc, dc_rs, dc_cs, K, K_rs,      \
                                    K_cs, Q, Q_rs, Q_cs, P, P_rs, P_gs, P_cs, f, f_rs,      \
                                    f_cs, dg, dc_prev);                                     \
        }                                                                                   \
    }

XLSTM_FWD_KERNEL(xlstm_lstm_fwd_f32, float)
XLSTM_FWD_KERNEL(xlstm_lstm_fwd_f64, double)
XLSTM_BWD_KERNEL(xlstm_lstm_bwd_f32, float)
XLSTM_BWD_KERNEL(xlstm_lstm_bwd_f64, double)
