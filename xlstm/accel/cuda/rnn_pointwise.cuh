// Pointwise RNN arithmetic (xlstm/cells/rnn.py), tanh and relu, written once for the CUDA
// kernels and for the host; the kernels that call the rnn_*_elem functions are generated
// from the table in xlstm/accel/cuda/kernels.py, with their arguments in the order of these
// functions (after e and n). The (m, n) blocks gx and ga are the input and recurrent terms.
//
// The operations are those of RNNCell.step, back_coeffs and step_back, one for one: with
// contraction off, backward results are bit-identical to the array path, forward ones
// agree to the rounding of tanh (relu's forward is exact).
//
// relu and sign follow numpy's maximum(x, 0) and sign, which the array path on numpy and
// the compiled CPU loops call: relu(-0) = +0, sign(+-0) = +0, and a NaN passes through both
// unchanged (sign and payload). CuPy's array path differs only where a NaN already is:
// its maximum returns the canonical NaN and its sign((in0 > 0) - (in0 < 0)) gives 0 for a
// NaN, so where the forward pass made a NaN its step gradient is 0 there and NaN here (and
// the sign of a zero relu(-0) is CUDA's max's to choose).

#ifndef XLSTM_RNN_POINTWISE_CUH
#define XLSTM_RNN_POINTWISE_CUH

#include "prelude.cuh"  // replaced by its text in the generated source

namespace xlstm {

// numpy's maximum(x, 0): x where x > 0 or x is NaN, else +0 (also for x = -0).
template <typename T>
XLSTM_HD inline T act_relu(T x) {
    return (x > T(0) || x != x) ? x : T(0);
}

// numpy's sign: 1, -1, +0 for either zero, and a NaN as it is.
template <typename T>
XLSTM_HD inline T sign_of(T x) {
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : (x == T(0) ? T(0) : x));
}

// ------------------------------------------------------- one element of the grid
// Forward: a = act(gx + ga); h, the saved copy of a.
// kernel rnn_tanh fwd: gx:1@gx ga:1@ga > a:1@A[t+1] h:1@H
template <typename T>
XLSTM_HD inline void rnn_tanh_fwd_elem(index_t e, index_t, const T* gx, const T* ga, T* a,
                                       T* h) {
    const T v = act_tanh(gx[e] + ga[e]);
    a[e] = v;
    h[e] = v;
}

// kernel rnn_relu fwd: gx:1@gx ga:1@ga > a:1@A[t+1] h:1@H
template <typename T>
XLSTM_HD inline void rnn_relu_fwd_elem(index_t e, index_t, const T* gx, const T* ga, T* a,
                                       T* h) {
    const T v = act_relu(gx[e] + ga[e]);
    a[e] = v;
    h[e] = v;
}

// Backward: dg = (da + da_rec) D, with D the activation's derivative from the saved output
// h: tanh_derivative (1 - h^2), or relu's sign(h).
// kernel rnn_tanh bwd: da:1@da da_rec:1@da_rec h:1@H > dg:1@dGx
template <typename T>
XLSTM_HD inline void rnn_tanh_bwd_elem(index_t e, index_t, const T* da, const T* da_rec,
                                       const T* h, T* dg) {
    const T one = T(1);
    const T D = one - h[e] * h[e];
    dg[e] = (da[e] + da_rec[e]) * D;
}

// kernel rnn_relu bwd: da:1@da da_rec:1@da_rec h:1@H > dg:1@dGx
template <typename T>
XLSTM_HD inline void rnn_relu_bwd_elem(index_t e, index_t, const T* da, const T* da_rec,
                                       const T* h, T* dg) {
    const T D = sign_of(h[e]);
    dg[e] = (da[e] + da_rec[e]) * D;
}

}  // namespace xlstm

#endif  // XLSTM_RNN_POINTWISE_CUH
