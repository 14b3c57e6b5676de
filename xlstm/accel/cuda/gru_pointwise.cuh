// Pointwise GRU arithmetic (xlstm/cells/gru.py), written once for the CUDA kernels and for
// the host; the kernels that call gru_fwd_elem and gru_bwd_elem are generated from the table
// in xlstm/accel/cuda/kernels.py, with their arguments in the order of these functions (after
// e and n).
//
// Layout: gate order (r, z, n); the input term gx and the recurrent product ga are
// (m, 3 n) blocks, the recurrent bias ba a (1, 3 n) row; the rows of r and z are halved,
// so one tanh gives each sigmoid: sigmoid(v) = 0.5 tanh(v / 2) + 0.5.
//
// The operations are those of GRUCell.step, back_coeffs and step_back and of the engine's
// recurrent term (ga + ba) and its sum of the two gradients reaching a_prev (direct plus
// through the recurrent term), one for one, in the same order: with contraction off,
// backward results are bit-identical to the array path, forward ones agree to the
// rounding of tanh.

#ifndef XLSTM_GRU_POINTWISE_CUH
#define XLSTM_GRU_POINTWISE_CUH

#include "prelude.cuh"  // replaced by its text in the generated source

namespace xlstm {

// ------------------------------------------------------------------ one element
// Forward: the recurrent term h = ga + ba of each gate, then GRUCell.step.
template <typename T>
XLSTM_HD inline void gru_fwd_point(T xr, T xz, T xn, T hr, T hz, T hn_in, T a_prev,
                                   T* sr, T* sz, T* nt, T* hn, T* a) {
    const T half = T(0.5);
    const T one = T(1);
    const T r = half * act_tanh(xr + hr) + half;  // sigmoid_from_halved_tanh
    const T z = half * act_tanh(xz + hz) + half;
    const T n = act_tanh(xn + r * hn_in);         // candidate_preactivation, tanh
    *sr = r;
    *sz = z;
    *nt = n;
    *hn = hn_in;
    *a = (one - z) * n + z * a_prev;  // hidden_state
}

// Backward: the gradient reaching a (upstream da, plus the next step's direct and
// recurrent parts), back_coeffs' Pr, Pz, Pn, then step_back.
template <typename T>
XLSTM_HD inline void gru_bwd_point(T da, T da_rec, T da_direct, T r, T z, T n, T hn,
                                   T a_prev, T* drt, T* dzt, T* dnt, T* dhn,
                                   T* da_direct_prev) {
    const T one = T(1);
    const T Pn = (one - z) * (one - n * n);   // backward_coefficients
    const T Pz = (a_prev - n) * z * (one - z);
    const T Pr = hn * r * (one - r);
    const T d_a = da + (da_direct + da_rec);  // the engine: da_rec = direct + dga Wa
    const T gn = d_a * Pn;                    // backward_step
    const T gz = d_a * Pz;
    const T gr = gn * Pr;
    *drt = gr;
    *dzt = gz;
    *dnt = gn;
    *dhn = gn * r;
    *da_direct_prev = d_a * z;
}

// ------------------------------------------------------- one element of the grid
// Element e = r n + j of the (m, n) grid: row r, unit j.

// kernel gru fwd: gx:3@gx ga:3@ga ba:3r@ba a_prev:1@A[t] > s:2@S nt:1@N hn:1@HN a:1@A[t+1]
template <typename T>
XLSTM_HD inline void gru_fwd_elem(index_t e, index_t n, const T* gx, const T* ga,
                                  const T* ba, const T* a_prev, T* s, T* nt, T* hn, T* a) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* x = gx + r * 3 * n + j;
    const T* h = ga + r * 3 * n + j;
    const T* b = ba + j;
    T* sr = s + r * 2 * n + j;
    gru_fwd_point<T>(x[0], x[n], x[2 * n], h[0] + b[0], h[n] + b[n], h[2 * n] + b[2 * n],
                     a_prev[e], sr, sr + n, nt + e, hn + e, a + e);
}

// Backward: writes dgx = (drt, dzt, dnt) and dga = (drt, dzt, dhn), (m, 3 n) each, and
// da_direct_prev, which may be da_direct itself (read before written, by the same thread).
// kernel gru bwd: da:1@da da_rec:1@da_rec da_direct:1@direct s:2@S nt:1@N hn:1@HN
//     a_prev:1@A[t] > dgx:3@dGx dga:3@dGa da_direct_prev:1=da_direct@direct
template <typename T>
XLSTM_HD inline void gru_bwd_elem(index_t e, index_t n, const T* da, const T* da_rec,
                                  const T* da_direct, const T* s, const T* nt, const T* hn,
                                  const T* a_prev, T* dgx, T* dga, T* da_direct_prev) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* sr = s + r * 2 * n + j;
    T* gx = dgx + r * 3 * n + j;
    T* ga = dga + r * 3 * n + j;
    T drt, dzt, dnt, dhn;
    gru_bwd_point<T>(da[e], da_rec[e], da_direct[e], sr[0], sr[n], nt[e], hn[e], a_prev[e],
                     &drt, &dzt, &dnt, &dhn, da_direct_prev + e);
    gx[0] = drt;
    gx[n] = dzt;
    gx[2 * n] = dnt;
    ga[0] = drt;
    ga[n] = dzt;
    ga[2 * n] = dhn;
}

}  // namespace xlstm

#endif  // XLSTM_GRU_POINTWISE_CUH
