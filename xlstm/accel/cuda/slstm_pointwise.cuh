// Pointwise sLSTM arithmetic (xlstm/cells/slstm.py), written once for the CUDA kernels and
// for the host, for both forget gates: logsigmoid(f~) (slstm) and f~ itself (slstm_exp).
//
// The kernels that call these functions are generated from the table in
// xlstm/accel/cuda/kernels.py, which lists their arguments in the order below (after e and n).
// Layout: the pre-activation of a step is an (m, 4 n) block in gate order (i, f, z, o),
// the output gate's rows halved, so sigmoid(o~) = 0.5 tanh(o~ / 2) + 0.5. Saved per step:
// X2 = (i', f'), ZO = (tanh z~, tanh(o~ / 2)), CN = (c, n) and, for the sigmoid forget gate,
// D = sigmoid(-f~).
//
// The operations follow the array path one for one (same order; with contraction off, no
// fused multiply-add): the forward pass agrees with it to the rounding of exp, log1p and
// tanh, the backward pass bit for bit.

#ifndef XLSTM_SLSTM_POINTWISE_CUH
#define XLSTM_SLSTM_POINTWISE_CUH

#include "prelude.cuh"  // replaced by its text in the generated source

namespace xlstm {

XLSTM_HD inline float act_exp(float x) { return expf(x); }
XLSTM_HD inline double act_exp(double x) { return exp(x); }
XLSTM_HD inline float act_log1p(float x) { return log1pf(x); }
XLSTM_HD inline double act_log1p(double x) { return log1p(x); }

// numpy's sign: -1, 0 or 1, NaN for NaN.
template <typename T>
XLSTM_HD inline T sign_of(T x) {
    return x > T(0) ? T(1) : (x < T(0) ? T(-1) : x);
}

// numpy's maximum: NaN if either is NaN.
template <typename T>
XLSTM_HD inline T max_nan(T a, T b) {
    return (a > b || a != a) ? a : b;
}

// ------------------------------------------------------------------ one element
// Forward: the stabiliser m, the stabilised gates i', f', and c, n, h. With `sigmoid`, the
// forget gate's exponent is logsigmoid(f) = min(f, 0) - log1p(exp(-|f|)) and its slope
// sigmoid(-f) is written to *d; otherwise the exponent is f and d is not written.
template <typename T, bool sigmoid>
XLSTM_HD inline void slstm_fwd_point(T pi, T pf, T pz, T po, T c_prev, T n_prev, T m_prev,
                                     T* ip_out, T* fp_out, T* zt_out, T* to_out, T* c_save,
                                     T* n_save, T* d, T* c, T* nn, T* m, T* h) {
    const T half = T(0.5), one = T(1);
    T lf = pf;
    if (sigmoid) {
        const T af = pf < T(0) ? -pf : pf;
        const T e = act_exp(-af);
        const T l1p = act_log1p(e);
        const T s = sign_of(pf);
        lf = half * (pf - af) - l1p;
        *d = (half * (one - s) + half * (one + s) * e) / (one + e);
    }
    const T mt = max_nan(lf + m_prev, pi);
    const T ip = act_exp(pi - mt);
    const T fp = act_exp(lf + m_prev - mt);
    const T zt = act_tanh(pz);
    const T to = act_tanh(po);
    const T cn = fp * c_prev + ip * zt;
    const T nt = fp * n_prev + ip;
    *ip_out = ip;
    *fp_out = fp;
    *zt_out = zt;
    *to_out = to;
    *c_save = cn;
    *n_save = nt;
    *c = cn;
    *nn = nt;
    *m = mt;
    *h = (half * to + half) * cn / nt;
}

// Backward: xlstm.cells.slstm.backward_step, m held constant (h does not depend on it).
template <typename T>
XLSTM_HD inline void slstm_bwd_point(T da, T da_rec, T dc, T dn, T dm, T ip, T fp, T lfd,
                                     T zt, T to, T c, T n, T c_prev, T n_prev, T* dgi, T* dgf,
                                     T* dgz, T* dgo, T* dc_prev, T* dn_prev, T* dm_prev) {
    const T one = T(1), half = T(0.5);
    const T dh = da + da_rec;
    const T og = half * to + half;
    const T q = c / n;
    const T dct = dc + dh * og / n;
    const T dnt = dn - dh * og * q / n;
    *dgi = (dct * zt + dnt) * ip;
    *dgf = (dct * c_prev + dnt * n_prev) * fp * lfd;
    *dgz = dct * ip * (one - zt * zt);
    *dgo = dh * q * (half * (one - to * to));
    *dc_prev = dct * fp;
    *dn_prev = dnt * fp;
    *dm_prev = dm * T(0);
}

// ------------------------------------------------------- one element of the grid
// Element e = r n + j of the (m, n) grid: row r, unit j.
template <typename T, bool sigmoid>
XLSTM_HD inline void slstm_fwd_any(index_t e, index_t n, const T* gx, const T* ga,
                                   const T* c_prev, const T* n_prev, const T* m_prev, T* x2,
                                   T* zo, T* cn, T* d, T* c, T* nn, T* mt, T* h) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const T* x = gx + r * 4 * n + j;
    const T* a = ga + r * 4 * n + j;
    T* x2r = x2 + r * 2 * n + j;
    T* zor = zo + r * 2 * n + j;
    T* cnr = cn + r * 2 * n + j;
    slstm_fwd_point<T, sigmoid>(x[0] + a[0], x[n] + a[n], x[2 * n] + a[2 * n],
                                x[3 * n] + a[3 * n], c_prev[e], n_prev[e], m_prev[e], x2r,
                                x2r + n, zor, zor + n, cnr, cnr + n, sigmoid ? d + e : d,
                                c + e, nn + e, mt + e, h + e);
}

// kernel slstm fwd: gx:4@gx ga:4@ga c_prev:1@C[t] n_prev:1@N[t] m_prev:1@M[t] > x2:2@X2
//     zo:2@ZO cn:2@CN d:1@D c:1@C[t+1] nn:1@N[t+1] mt:1@M[t+1] h:1@H[t+1]
template <typename T>
XLSTM_HD inline void slstm_fwd_elem(index_t e, index_t n, const T* gx, const T* ga,
                                    const T* c_prev, const T* n_prev, const T* m_prev, T* x2,
                                    T* zo, T* cn, T* d, T* c, T* nn, T* mt, T* h) {
    slstm_fwd_any<T, true>(e, n, gx, ga, c_prev, n_prev, m_prev, x2, zo, cn, d, c, nn, mt, h);
}

// kernel slstm_exp fwd: gx:4@gx ga:4@ga c_prev:1@C[t] n_prev:1@N[t] m_prev:1@M[t] > x2:2@X2
//     zo:2@ZO cn:2@CN c:1@C[t+1] nn:1@N[t+1] mt:1@M[t+1] h:1@H[t+1]
template <typename T>
XLSTM_HD inline void slstm_exp_fwd_elem(index_t e, index_t n, const T* gx, const T* ga,
                                        const T* c_prev, const T* n_prev, const T* m_prev,
                                        T* x2, T* zo, T* cn, T* c, T* nn, T* mt, T* h) {
    T unused = T(0);  // no slope: the exponential forget gate's is 1
    slstm_fwd_any<T, false>(e, n, gx, ga, c_prev, n_prev, m_prev, x2, zo, cn, &unused, c, nn,
                            mt, h);
}

// Backward: writes dg (m, 4 n) and the gradients on c_prev, n_prev, m_prev, each of which
// may be the incoming one itself (read before it is written, by the same thread).
template <typename T>
XLSTM_HD inline void slstm_bwd_any(index_t e, index_t n, const T* da, const T* da_rec,
                                   const T* dc, const T* dn, const T* dm, const T* x2,
                                   const T* zo, const T* cn, T lfd, const T* c_prev,
                                   const T* n_prev, T* dg, T* dc_prev, T* dn_prev, T* dm_prev) {
    const index_t r = e / n;
    const index_t j = e - r * n;
    const index_t w = r * 2 * n + j;
    T* dgr = dg + r * 4 * n + j;
    slstm_bwd_point<T>(da[e], da_rec[e], dc[e], dn[e], dm[e], x2[w], x2[w + n], lfd, zo[w],
                       zo[w + n], cn[w], cn[w + n], c_prev[e], n_prev[e], dgr, dgr + n,
                       dgr + 2 * n, dgr + 3 * n, dc_prev + e, dn_prev + e, dm_prev + e);
}

// kernel slstm bwd: da:1@da da_rec:1@da_rec dc:1@dC dn:1@dN dm:1@dM x2:2@X2 zo:2@ZO cn:2@CN
//     d:1@D c_prev:1@C[t] n_prev:1@N[t] > dg:4@dGx dc_prev:1=dc@dC dn_prev:1=dn@dN
//     dm_prev:1=dm@dM
template <typename T>
XLSTM_HD inline void slstm_bwd_elem(index_t e, index_t n, const T* da, const T* da_rec,
                                    const T* dc, const T* dn, const T* dm, const T* x2,
                                    const T* zo, const T* cn, const T* d, const T* c_prev,
                                    const T* n_prev, T* dg, T* dc_prev, T* dn_prev,
                                    T* dm_prev) {
    slstm_bwd_any<T>(e, n, da, da_rec, dc, dn, dm, x2, zo, cn, d[e], c_prev, n_prev, dg,
                     dc_prev, dn_prev, dm_prev);
}

// kernel slstm_exp bwd: da:1@da da_rec:1@da_rec dc:1@dC dn:1@dN dm:1@dM x2:2@X2 zo:2@ZO
//     cn:2@CN c_prev:1@C[t] n_prev:1@N[t] > dg:4@dGx dc_prev:1=dc@dC dn_prev:1=dn@dN
//     dm_prev:1=dm@dM
template <typename T>
XLSTM_HD inline void slstm_exp_bwd_elem(index_t e, index_t n, const T* da, const T* da_rec,
                                        const T* dc, const T* dn, const T* dm, const T* x2,
                                        const T* zo, const T* cn, const T* c_prev,
                                        const T* n_prev, T* dg, T* dc_prev, T* dn_prev,
                                        T* dm_prev) {
    slstm_bwd_any<T>(e, n, da, da_rec, dc, dn, dm, x2, zo, cn, T(1), c_prev, n_prev, dg,
                     dc_prev, dn_prev, dm_prev);
}

}  // namespace xlstm

#endif  // XLSTM_SLSTM_POINTWISE_CUH
