// Pointwise LSTM arithmetic, written once for the CUDA kernels and for the host.
//
// The kernels that call lstm_fwd_elem and lstm_bwd_elem are generated from the table in
// xlstm/_cuda/kernels.py, which lists their arguments in the order of these functions
// (after e and n). The generated text, with this header inlined, is compiled three ways:
// by NVRTC (CuPy loads the kernels at run time), by nvcc (the CI compile check) and by a
// plain host C++ compiler behind a grid emulator (the tests run it on the CPU under
// AddressSanitizer and compare with the array path of xlstm._engine).
//
// Layout (see xlstm/_engine.py): gate order (o, f, i, c); the pre-activation of a step is
// an (m, 4 n) block whose sigmoid gates are already halved, so every gate is one tanh:
// sigmoid(z) = 0.5 tanh(z / 2) + 0.5.
//
// The operations follow the array path one for one (same order, no fused multiply-add
// when compiled with contraction off): forward results agree with it to the rounding of
// tanh, backward results bit for bit.

#ifndef XLSTM_LSTM_POINTWISE_CUH
#define XLSTM_LSTM_POINTWISE_CUH

#include "prelude.cuh"  // replaced by its text in the generated source

namespace xlstm {

// ------------------------------------------------------------------ one element
// Forward, equations (1)-(6): gates from the halved pre-activations, then the cell.
template <typename T>
XLSTM_HD inline void lstm_fwd_point(T go, T gf, T gi, T gc, T c_prev,
                                    T* so, T* sf, T* si, T* cct, T* c, T* tc, T* a) {
    const T half = T(0.5);
    const T o = half * act_tanh(go) + half;  // (5)
    const T f = half * act_tanh(gf) + half;  // (1)
    const T i = half * act_tanh(gi) + half;  // (2)
    const T cc = act_tanh(gc);               // (3)
    const T cn = f * c_prev + i * cc;        // (4)
    const T t = act_tanh(cn);
    *so = o;
    *sf = f;
    *si = i;
    *cct = cc;
    *c = cn;
    *tc = t;
    *a = o * t;  // (6)
}

// Backward, equations (7)-(10) and (20), for one (row, unit) of a step, from the values
// the forward pass kept: the sigmoid gates o, f, i, tanh(c), the candidate cct and c_prev.
// The expressions, and their order, are those of xlstm._engine.backward_coefficients
// (K, Q, P) and xlstm._engine.step_backward, so with contraction off the results are
// bit-identical to the array path (there is no transcendental function here).
template <typename T>
XLSTM_HD inline void lstm_bwd_point(T da, T da_rec, T dc, T o, T f, T i, T tc, T cct,
                                    T c_prev, T* dgo, T* dgf, T* dgi, T* dgc, T* dc_prev) {
    const T one = T(1);
    const T d_a = da + da_rec;                     // upstream plus recurrent gradient
    const T dct = dc + d_a * (o * (one - tc * tc));  // dL/dc_t, with K = o (1 - tanh^2 c)
    *dgo = d_a * (tc * o * (one - o));             // (7), Q
    *dgf = dct * (c_prev * f * (one - f));         // (10)
    *dgi = dct * (cct * i * (one - i));            // (9)
    *dgc = dct * (i * (one - cct * cct));          // (8)
    *dc_prev = dct * f;                            // (20)
}

// ------------------------------------------------------- one element of the grid
// Element e = r n + j of the (m, n) grid: row r, unit j. Every array is one step's
// C-contiguous slice of the engine's stacks: gates (m, 4 n), sigmoid gates (m, 3 n), the
// rest (m, n).

// Forward: the pre-activation is gx + ga (input projection plus recurrent product).
template <typename T>
XLSTM_HD inline void lstm_fwd_elem(index_t e, index_t n, const T* gx, const T* ga,
                                   const T* c_prev, T* s, T* cct, T* c, T* tc, T* a) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* x = gx + r * 4 * n + j;
    const T* h = ga + r * 4 * n + j;
    T* sr = s + r * 3 * n + j;
    lstm_fwd_point<T>(x[0] + h[0], x[n] + h[n], x[2 * n] + h[2 * n], x[3 * n] + h[3 * n],
                      c_prev[e], sr, sr + n, sr + 2 * n, cct + e, c + e, tc + e, a + e);
}

// Backward: writes dg (m, 4 n) and dc_prev, which may be dc itself (each element is read
// before it is written, by the same thread).
template <typename T>
XLSTM_HD inline void lstm_bwd_elem(index_t e, index_t n, const T* da, const T* da_rec,
                                   const T* dc, const T* s, const T* cct, const T* tc,
                                   const T* c_prev, T* dg, T* dc_prev) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* sr = s + r * 3 * n + j;
    T* dgr = dg + r * 4 * n + j;
    lstm_bwd_point<T>(da[e], da_rec[e], dc[e], sr[0], sr[n], sr[2 * n], tc[e], cct[e],
                      c_prev[e], dgr, dgr + n, dgr + 2 * n, dgr + 3 * n, dc_prev + e);
}

}  // namespace xlstm

#endif  // XLSTM_LSTM_POINTWISE_CUH
