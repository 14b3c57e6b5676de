// Pointwise MGU arithmetic (xlstm/cells/mgu.py), written once for the CUDA kernels and for
// the host; the kernels that call mgu_fwd_elem and mgu_bwd_elem are generated from their
// declarations below (xlstm/accel/cuda/kernels.py), with their arguments in the order of
// these functions (after e and n).
//
// Layout: gate order (f, n); the input term gx and the recurrent product ga are
// (m, 2 n) blocks, the recurrent bias ba a (1, 2 n) row; the rows of f are halved, so one
// tanh gives the sigmoid: sigmoid(v) = 0.5 tanh(v / 2) + 0.5.
//
// The operations are those of MGUCell.step, back_coeffs and step_back and of the engine's
// recurrent term (ga + ba) and its sum of the two gradients reaching a_prev (direct plus
// through the recurrent term), one for one, in the same order: with contraction off,
// backward results are bit-identical to the array path, forward ones agree to the
// rounding of tanh.

#ifndef XLSTM_MGU_POINTWISE_CUH
#define XLSTM_MGU_POINTWISE_CUH

#include "prelude.cuh"  // replaced by its text in the generated source

namespace xlstm {

// ------------------------------------------------------------------ one element
// Forward: the recurrent term h = ga + ba of each gate, then MGUCell.step.
template <typename T>
XLSTM_HD inline void mgu_fwd_point(T xf, T xn, T hf, T hn_in, T a_prev, T* ft, T* nt, T* hn,
                                   T* a) {
    const T half = T(0.5);
    const T one = T(1);
    const T f = half * act_tanh(xf + hf) + half;  // sigmoid_from_halved_tanh
    const T n = act_tanh(xn + f * hn_in);         // candidate_preactivation, tanh
    *ft = f;
    *nt = n;
    *hn = hn_in;
    *a = (one - f) * a_prev + f * n;  // hidden_state
}

// Backward: the gradient reaching a (upstream da, plus the next step's direct and
// recurrent parts), back_coeffs' Pf, Pn, then step_back.
template <typename T>
XLSTM_HD inline void mgu_bwd_point(T da, T da_rec, T da_direct, T f, T n, T hn, T a_prev,
                                   T* dft, T* dnt, T* dhn, T* da_direct_prev) {
    const T one = T(1);
    const T Pn = f * (one - n * n);  // backward_coefficients
    const T Pf = ((n - a_prev) + Pn * hn) * f * (one - f);
    const T d_a = da + (da_direct + da_rec);  // the engine: da_rec = direct + dga Wa
    const T gn = d_a * Pn;                    // backward_step
    const T gf = d_a * Pf;
    *dft = gf;
    *dnt = gn;
    *dhn = gn * f;
    *da_direct_prev = d_a * (one - f);
}

// ------------------------------------------------------- one element of the grid
// Element e = r n + j of the (m, n) grid: row r, unit j.

// kernel mgu fwd: gx:2@gx ga:2@ga ba:2r@ba a_prev:1@A[t] > ft:1@S nt:1@N hn:1@HN a:1@A[t+1]
template <typename T>
XLSTM_HD inline void mgu_fwd_elem(index_t e, index_t n, const T* gx, const T* ga,
                                  const T* ba, const T* a_prev, T* ft, T* nt, T* hn, T* a) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* x = gx + r * 2 * n + j;
    const T* h = ga + r * 2 * n + j;
    const T* b = ba + j;
    mgu_fwd_point<T>(x[0], x[n], h[0] + b[0], h[n] + b[n], a_prev[e], ft + e, nt + e, hn + e,
                     a + e);
}

// Backward: writes dgx = (dft, dnt) and dga = (dft, dhn), (m, 2 n) each, and
// da_direct_prev, which may be da_direct itself (read before written, by the same thread).
// kernel mgu bwd: da:1@da da_rec:1@da_rec da_direct:1@direct ft:1@S nt:1@N hn:1@HN
//     a_prev:1@A[t] > dgx:2@dGx dga:2@dGa da_direct_prev:1=da_direct@direct
template <typename T>
XLSTM_HD inline void mgu_bwd_elem(index_t e, index_t n, const T* da, const T* da_rec,
                                  const T* da_direct, const T* ft, const T* nt, const T* hn,
                                  const T* a_prev, T* dgx, T* dga, T* da_direct_prev) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    T* gx = dgx + r * 2 * n + j;
    T* ga = dga + r * 2 * n + j;
    T dft, dnt, dhn;
    mgu_bwd_point<T>(da[e], da_rec[e], da_direct[e], ft[e], nt[e], hn[e], a_prev[e], &dft,
                     &dnt, &dhn, da_direct_prev + e);
    gx[0] = dft;
    gx[n] = dnt;
    ga[0] = dft;
    ga[n] = dhn;
}

}  // namespace xlstm

#endif  // XLSTM_MGU_POINTWISE_CUH
