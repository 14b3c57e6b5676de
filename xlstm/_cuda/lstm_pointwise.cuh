// Pointwise LSTM arithmetic, written once for the CUDA kernels and for the host.
//
// The same functions are compiled three ways: by NVRTC (CuPy loads the kernels at run
// time), by nvcc (the CI compile check) and by a plain host C++ compiler (the tests run
// them on the CPU and compare with the array path of xlstm._engine).
//
// Layout (see xlstm/_engine.py): gate order (o, f, i, c); the pre-activation of a step is
// an (m, 4 n) block whose sigmoid gates are already halved, so every gate is one tanh:
// sigmoid(z) = 0.5 tanh(z / 2) + 0.5.
//
// The operations follow the array path one for one (same order, no fused multiply-add
// when compiled with contraction off), so the results agree to the rounding of tanh.

#ifndef XLSTM_LSTM_POINTWISE_CUH
#define XLSTM_LSTM_POINTWISE_CUH

#if defined(__CUDACC__)
#define XLSTM_HD __host__ __device__
#else
#define XLSTM_HD
#endif

#if !defined(__CUDACC_RTC__)
#include <math.h>  // NVRTC has the math functions built in and no system headers
#endif

namespace xlstm {

typedef long long index_t;

XLSTM_HD inline float act_tanh(float x) { return tanhf(x); }
XLSTM_HD inline double act_tanh(double x) { return tanh(x); }

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

// Backward, equations (7)-(10) and (20), with the coefficients K, Q, P of
// xlstm._engine.backward_coefficients: dct = dc + da K, then
// dg = [da Q, dct P_f, dct P_i, dct P_c] and dc_prev = dct f.
template <typename T>
XLSTM_HD inline void lstm_bwd_point(T da, T dc, T K, T Q, T Pf, T Pi, T Pc, T f,
                                    T* dgo, T* dgf, T* dgi, T* dgc, T* dc_prev) {
    const T dct = dc + da * K;
    *dgo = da * Q;    // (7)
    *dgf = dct * Pf;  // (10)
    *dgi = dct * Pi;  // (9)
    *dgc = dct * Pc;  // (8)
    *dc_prev = dct * f;  // (20)
}

// ------------------------------------------------------- one element of the grid
// Element e = r n + j of the (m, n) grid: row r, unit j. Inputs are strided views; a
// stride is counted in elements and may be zero or negative (the pointer is the view's
// first element). Outputs are fresh C-contiguous arrays.

// s (m, 3n), cct, c, tc, a (m, n).
template <typename T>
XLSTM_HD inline void lstm_fwd_elem(index_t e, index_t n,
                                   const T* g, index_t g_rs, index_t g_cs,
                                   const T* c_prev, index_t cp_rs, index_t cp_cs,
                                   T* s, T* cct, T* c, T* tc, T* a) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* gr = g + r * g_rs;
    T* sr = s + r * 3 * n + j;
    lstm_fwd_point<T>(gr[j * g_cs], gr[(n + j) * g_cs], gr[(2 * n + j) * g_cs],
                      gr[(3 * n + j) * g_cs], c_prev[r * cp_rs + j * cp_cs],
                      sr, sr + n, sr + 2 * n, cct + e, c + e, tc + e, a + e);
}

// dg (m, 4n), dc_prev (m, n). P is (m, 3, n) with a row, a gate and a unit stride.
template <typename T>
XLSTM_HD inline void lstm_bwd_elem(index_t e, index_t n,
                                   const T* da, index_t da_rs, index_t da_cs,
                                   const T* dc, index_t dc_rs, index_t dc_cs,
                                   const T* K, index_t K_rs, index_t K_cs,
                                   const T* Q, index_t Q_rs, index_t Q_cs,
                                   const T* P, index_t P_rs, index_t P_gs, index_t P_cs,
                                   const T* f, index_t f_rs, index_t f_cs,
                                   T* dg, T* dc_prev) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* Pr = P + r * P_rs + j * P_cs;
    T* dgr = dg + r * 4 * n + j;
    lstm_bwd_point<T>(da[r * da_rs + j * da_cs], dc[r * dc_rs + j * dc_cs],
                      K[r * K_rs + j * K_cs], Q[r * Q_rs + j * Q_cs],
                      Pr[0], Pr[P_gs], Pr[2 * P_gs], f[r * f_rs + j * f_cs],
                      dgr, dgr + n, dgr + 2 * n, dgr + 3 * n, dc_prev + e);
}

}  // namespace xlstm

#endif  // XLSTM_LSTM_POINTWISE_CUH
