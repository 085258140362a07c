// One RK stage of the one-layer convolutional potential, fused: its drift (∇φ, the site sums of
// a''(h) that give ∇²φ) and the backward of both, for latticeflow.potentials.conv._ConvDriftNative.
//
// The potential is φ = Σ_{c,s} w_c a(h_{c,s}) with h_c(s) = b_c + Σ_j A_cj z_j(s) and the
// patches z_j(s) = Σ_{d: row[d] = j} coef[d] x(nbr[s, d]) (nbr[s, d] = s + d − p on the torus,
// d running over the k² kernel offsets; J = k² without D4 symmetry, the number of D4 orbits of
// offsets with it). The eager implementation computes the same quantities with planes of
// C·N·B numbers, one pass over memory per elementwise operation; here every sample's planes
// are made one lattice site at a time, for a block of V samples held in the vector lanes, so
// that nothing of size C·N·B is ever stored: the backward recomputes h from x instead of
// saving it. Per block of V samples it keeps the (J, N) planes of the adjoint convolution and, in
// the backward, the (C, N) and (J, N) planes whose products are the parameter gradients.
//
// Activations (act): 0 softplus (base σ(h)), 1 ln cosh (base tanh h), 2 tanh (base tanh h);
// d1 = a', d2 = a'', d3 = a''' as in latticeflow.potentials.activations (lanes.h).
//
// Plain C ABI over raw pointers (no torch headers: it compiles in a few seconds); the caller
// (latticeflow.native, latticeflow.potentials.conv) passes contiguous tensors of one dtype. The
// batch is split over nt OpenMP threads, each owning a contiguous run of blocks and its own
// parameter sums, which are added in thread order at the end.
#include <cstring>
#include <vector>

#include "lanes.h"

namespace {

constexpr int JMAX = 81;  // k² for k = 9, the largest kernel the direct method takes
constexpr int CMAX = 64;  // the most channels the kernel takes
// the default flow's conv part (ln cosh, 16 channels, 5×5 D4 kernels: J = 6 planes) gets its own
// instantiation with J and C known at compile time (loops unrolled, the per-site sums in registers)
constexpr int JDEF = 6, CDEF = 16;

using lf::derivatives;
using lf::Lanes;
using lf::load_block;
using lf::this_run;

// the stencil: the offsets d grouped by patch plane (start[j] .. start[j+1] − 1 feed plane j)
struct Geometry {
    int B, N, K2, J, C;
    const int32_t* nbr;    // (N, K2): site s + d − p, d in grouped order
    const int32_t* nbm;    // (N, K2): site s − (d − p), d in grouped order
    const int32_t* start;  // (J + 1,)
};

// z (J,) = the patches of site s: z_j = Σ_{d in group j} coef_d xl[s + d − p]
template <typename T, typename VT>
inline void patches(const Geometry& g, const T* coef, const VT* xl, int s, VT* z, int J) {
    const int32_t* nb = g.nbr + (int64_t)s * g.K2;
    for (int j = 0; j < J; ++j) {
        VT acc = VT{};
        for (int d = g.start[j]; d < g.start[j + 1]; ++d) acc += coef[d] * xl[nb[d]];
        z[j] = acc;
    }
}

// rows b0 .. b0 + nb − 1 of out (B, N): the adjoint of patches applied to y (J, N)
template <typename T, typename VT>
void fold_block(const Geometry& g, const T* coef, const VT* y, int b0, int nb, T* out) {
    const int N = g.N;
    for (int s = 0; s < N; ++s) {
        VT acc0 = VT{}, acc1 = VT{};
        const int32_t* nm = g.nbm + (int64_t)s * g.K2;
        for (int j = 0; j < g.J; ++j) {
            const VT* yj = y + (int64_t)j * N;
            int d = g.start[j];
            for (; d + 1 < g.start[j + 1]; d += 2) {
                acc0 += coef[d] * yj[nm[d]];
                acc1 += coef[d + 1] * yj[nm[d + 1]];
            }
            if (d < g.start[j + 1]) acc0 += coef[d] * yj[nm[d]];
        }
        const VT acc = acc0 + acc1;
        for (int v = 0; v < nb; ++v) out[(int64_t)(b0 + v) * N + s] = acc[v];
    }
}

// h (C,) = bias + A z with A (C, J) read as At (J, C): C independent accumulations
template <typename T, typename VT>
inline void affine(const T* At, const T* bias, const VT* z, int J, int C, VT* h) {
    for (int c = 0; c < C; ++c) h[c] = VT{} + bias[c];
    for (int j = 0; j < J; ++j) {
        const VT zj = z[j];
        const T* a = At + (int64_t)j * C;
        for (int c = 0; c < C; ++c) h[c] += a[c] * zj;
    }
}

// y = Σ_c A_cj v_c for each j, A (C, J)
template <typename T, typename VT>
inline VT contract(const T* A, int J, int C, int j, const VT* v) {
    VT acc0 = VT{}, acc1 = VT{};
    int c = 0;
    for (; c + 1 < C; c += 2) {
        acc0 += A[(int64_t)c * J + j] * v[c];
        acc1 += A[(int64_t)(c + 1) * J + j] * v[c + 1];
    }
    if (c < C) acc0 += A[(int64_t)c * J + j] * v[c];
    return acc0 + acc1;
}

// forward: grad (B, N) = fold(Aᵀ (w⊙a'(h))), S (C, B) = Σ_s a''(h); JT, CT: J and C when known at
// compile time (0: read from g)
template <typename T, int ACT, int JT, int CT>
void forward(const T* x, const Geometry& g, const T* coef, const T* A, const T* bias, const T* w,
             T* grad, T* S, int b_begin, int b_end) {
    typedef typename Lanes<T>::type VT;
    constexpr int V = sizeof(VT) / sizeof(T);
    const int N = g.N, J = JT ? JT : g.J, C = CT ? CT : g.C;
    std::vector<VT> xl(N), y((size_t)J * N), Sv(C);
    VT h[CMAX], d1[CMAX], d2[CMAX];
    std::vector<T> Aw((size_t)C * J), At((size_t)J * C);
    for (int c = 0; c < C; ++c)
        for (int j = 0; j < J; ++j) {
            Aw[c * J + j] = A[c * J + j] * w[c];
            At[j * C + c] = A[c * J + j];
        }
    VT z[JMAX];
    for (int b0 = b_begin; b0 < b_end; b0 += V) {
        const int nb = b_end - b0 < V ? b_end - b0 : V;
        load_block<T>(x, N, b0, nb, xl.data());
        for (int c = 0; c < C; ++c) Sv[c] = VT{};
        for (int s = 0; s < N; ++s) {
            patches<T>(g, coef, xl.data(), s, z, J);
            affine<T>(At.data(), bias, z, J, C, h);
            derivatives<T, ACT>((const T*)h, (T*)d1, (T*)d2, nullptr, C * V);
            for (int c = 0; c < C; ++c) Sv[c] += d2[c];
            for (int j = 0; j < J; ++j) y[(size_t)j * N + s] = contract<T>(Aw.data(), J, C, j, d1);
        }
        for (int c = 0; c < C; ++c)
            for (int v = 0; v < nb; ++v) S[(int64_t)c * g.B + b0 + v] = Sv[c][v];
        fold_block<T>(g, coef, y.data(), b0, nb, grad);
    }
}

// Σ_s a[r][s] b[q][s] for all r < R, q < Q, added lane-summed to out (R, Q): a (R, N), b (Q, N);
// tiles of 2 rows × 3 columns keep 6 sums in registers (5 loads per 6 multiply-adds)
template <typename T, typename VT>
inline T lane_sum(VT v) {
    T sum = T(0);
    for (int i = 0; i < (int)(sizeof(VT) / sizeof(T)); ++i) sum += v[i];
    return sum;
}

// (neither inlined nor cloned: its loops over sites need no constant sizes, and specialised to the
// compile-time instantiation's sizes gcc 12 warns about its remainder loop, which then never runs)
template <typename T, typename VT>
__attribute__((noinline, noclone)) void cross(const VT* a, const VT* b, int R, int Q, int N, T* out) {
    int r = 0;
    for (; r + 1 < R; r += 2) {
        const VT *a0 = a + (int64_t)r * N, *a1 = a0 + N;
        int q = 0;
        for (; q + 2 < Q; q += 3) {
            const VT *b0 = b + (int64_t)q * N, *b1 = b0 + N, *b2 = b1 + N;
            VT s00 = VT{}, s01 = VT{}, s02 = VT{}, s10 = VT{}, s11 = VT{}, s12 = VT{};
            for (int s = 0; s < N; ++s) {
                const VT x0 = a0[s], x1 = a1[s], y0 = b0[s], y1 = b1[s], y2 = b2[s];
                s00 += x0 * y0; s01 += x0 * y1; s02 += x0 * y2;
                s10 += x1 * y0; s11 += x1 * y1; s12 += x1 * y2;
            }
            T* o0 = out + (int64_t)r * Q + q;
            T* o1 = o0 + Q;
            o0[0] += lane_sum<T>(s00); o0[1] += lane_sum<T>(s01); o0[2] += lane_sum<T>(s02);
            o1[0] += lane_sum<T>(s10); o1[1] += lane_sum<T>(s11); o1[2] += lane_sum<T>(s12);
        }
        for (; q < Q; ++q) {
            const VT* bq = b + (int64_t)q * N;
            VT s0 = VT{}, s1 = VT{};
            for (int s = 0; s < N; ++s) {
                s0 += a0[s] * bq[s];
                s1 += a1[s] * bq[s];
            }
            out[(int64_t)r * Q + q] += lane_sum<T>(s0);
            out[(int64_t)(r + 1) * Q + q] += lane_sum<T>(s1);
        }
    }
    for (; r < R; ++r) {
        const VT* ar = a + (int64_t)r * N;
        for (int q = 0; q < Q; ++q) {
            const VT* bq = b + (int64_t)q * N;
            VT s0 = VT{}, s1 = VT{};
            int s = 0;
            for (; s + 1 < N; s += 2) {
                s0 += ar[s] * bq[s];
                s1 += ar[s + 1] * bq[s + 1];
            }
            if (s < N) s0 += ar[s] * bq[s];
            out[(int64_t)r * Q + q] += lane_sum<T>(s0 + s1);
        }
    }
}

// backward from cotangents dG (B, N) of grad and dL (B,) of lap = cvec·S (cvec = w⊙‖K‖²):
// dx (B, N); accumulated (added to): P (C, J) = Σ dh zᵀ, M (C, J) = Σ a' ẑᵀ, db (C) = Σ dh,
// Tc (C) = Σ_s,b a'' dL, where dh = w⊙(A ẑ)⊙a'' + (cvec ⊗ dL)⊙a''' and ẑ = patches(dG)
template <typename T, int ACT, int JT, int CT>
void backward(const T* x, const T* dG, const T* dL, const Geometry& g, const T* coef, const T* A, const T* bias,
              const T* w, const T* cvec, T* dx, T* P, T* M, T* db, T* Tc, int b_begin, int b_end) {
    typedef typename Lanes<T>::type VT;
    constexpr int V = sizeof(VT) / sizeof(T);
    const int N = g.N, J = JT ? JT : g.J, C = CT ? CT : g.C;
    // per block: the patches of x and dG (J, N), dh and a' (C, N), the adjoint planes u (J, N)
    std::vector<VT> xl(N), gl(N), Z((size_t)J * N), ZG((size_t)J * N), DH((size_t)C * N), D1((size_t)C * N),
        u((size_t)J * N), dbv(C, VT{}), Tv(C, VT{});
    VT h[CMAX], ag[CMAX], d1[CMAX], d2[CMAX], d3[CMAX], dh[CMAX];
    std::vector<T> At((size_t)J * C);
    for (int c = 0; c < C; ++c)
        for (int j = 0; j < J; ++j) At[j * C + c] = A[c * J + j];
    const std::vector<T> zero(C, T(0));
    VT z[JMAX], zg[JMAX];
    for (int b0 = b_begin; b0 < b_end; b0 += V) {
        const int nb = b_end - b0 < V ? b_end - b0 : V;
        load_block<T>(x, N, b0, nb, xl.data());
        load_block<T>(dG, N, b0, nb, gl.data());
        VT dl = VT{};
        for (int v = 0; v < nb; ++v) dl[v] = dL[b0 + v];
        for (int s = 0; s < N; ++s) {
            patches<T>(g, coef, xl.data(), s, z, J);
            patches<T>(g, coef, gl.data(), s, zg, J);
            affine<T>(At.data(), bias, z, J, C, h);
            affine<T>(At.data(), zero.data(), zg, J, C, ag);
            derivatives<T, ACT>((const T*)h, (T*)d1, (T*)d2, (T*)d3, C * V);
            for (int c = 0; c < C; ++c) {
                const VT e = w[c] * ag[c] * d2[c] + cvec[c] * dl * d3[c];
                dh[c] = e;
                dbv[c] += e;
                Tv[c] += d2[c] * dl;
                DH[(size_t)c * N + s] = e;
                D1[(size_t)c * N + s] = d1[c];
            }
            for (int j = 0; j < J; ++j) {
                Z[(size_t)j * N + s] = z[j];
                ZG[(size_t)j * N + s] = zg[j];
                u[(size_t)j * N + s] = contract<T>(A, J, C, j, dh);
            }
        }
        cross<T>(DH.data(), Z.data(), C, J, N, P);
        cross<T>(D1.data(), ZG.data(), C, J, N, M);
        fold_block<T>(g, coef, u.data(), b0, nb, dx);
    }
    for (int c = 0; c < C; ++c)
        for (int v = 0; v < V; ++v) {
            db[c] += dbv[c][v];
            Tc[c] += Tv[c][v];
        }
}

template <typename T>
void forward_all(const T* x, const Geometry& g, const T* coef, const T* A, const T* bias, const T* w, int act,
                 T* grad, T* S, int nt) {
    constexpr int V = sizeof(typename Lanes<T>::type) / sizeof(T);
    const bool dflt = g.J == JDEF && g.C == CDEF;
#pragma omp parallel num_threads(nt)
    {
        int n, begin, end;
        this_run(g.B, V, n, begin, end);
        if (end > begin) {
            if (act == 0) forward<T, 0, 0, 0>(x, g, coef, A, bias, w, grad, S, begin, end);
            else if (act == 1 && dflt) forward<T, 1, JDEF, CDEF>(x, g, coef, A, bias, w, grad, S, begin, end);
            else if (act == 1) forward<T, 1, 0, 0>(x, g, coef, A, bias, w, grad, S, begin, end);
            else forward<T, 2, 0, 0>(x, g, coef, A, bias, w, grad, S, begin, end);
        }
    }
}

// the parameter sums (P, M, db, Tc) of each thread are kept apart and added in thread order
// afterwards, so that a result depends on the thread count but not on the threads' timing
template <typename T>
void backward_all(const T* x, const T* dG, const T* dL, const Geometry& g, const T* coef, const T* A,
                  const T* bias, const T* w, const T* cvec, int act, T* dx, T* P, T* M, T* db, T* Tc, int nt) {
    constexpr int V = sizeof(typename Lanes<T>::type) / sizeof(T);
    const size_t CJ = (size_t)g.C * g.J, size = 2 * CJ + 2 * (size_t)g.C;
    std::vector<T> parts((size_t)nt * size, T(0));
    int used = 1;
    const bool dflt = g.J == JDEF && g.C == CDEF;
#pragma omp parallel num_threads(nt)
    {
        int n, begin, end;
        const int t = this_run(g.B, V, n, begin, end);
#pragma omp single
        used = n;
        T* mine = parts.data() + (size_t)t * size;
        if (end > begin) {
            T *p = mine, *m = mine + CJ, *b = mine + 2 * CJ, *c = b + g.C;
#define LF_BACKWARD(ACT, JT, CT) \
    backward<T, ACT, JT, CT>(x, dG, dL, g, coef, A, bias, w, cvec, dx, p, m, b, c, begin, end)
            if (act == 0) LF_BACKWARD(0, 0, 0);
            else if (act == 1 && dflt) LF_BACKWARD(1, JDEF, CDEF);
            else if (act == 1) LF_BACKWARD(1, 0, 0);
            else LF_BACKWARD(2, 0, 0);
#undef LF_BACKWARD
        }
    }
    for (int t = 0; t < used; ++t) {
        const T* mine = parts.data() + (size_t)t * size;
        for (size_t i = 0; i < CJ; ++i) {
            P[i] += mine[i];
            M[i] += mine[CJ + i];
        }
        for (int c = 0; c < g.C; ++c) {
            db[c] += mine[2 * CJ + c];
            Tc[c] += mine[2 * CJ + g.C + c];
        }
    }
}

}  // namespace

#define LF_EXPORT(T, SUFFIX)                                                                                       \
    extern "C" void lf_conv_forward_##SUFFIX(const T* x, int B, int N, int K2, int J, int C, const int32_t* nbr,  \
                                             const int32_t* nbm, const int32_t* start, const T* coef, const T* A,  \
                                             const T* bias, const T* w, int act, T* grad, T* S, int nt) {          \
        forward_all<T>(x, Geometry{B, N, K2, J, C, nbr, nbm, start}, coef, A, bias, w, act, grad, S, nt);          \
    }                                                                                                              \
    extern "C" void lf_conv_backward_##SUFFIX(const T* x, const T* dG, const T* dL, int B, int N, int K2, int J,  \
                                              int C, const int32_t* nbr, const int32_t* nbm, const int32_t* start, \
                                              const T* coef, const T* A, const T* bias, const T* w, const T* cvec, \
                                              int act, T* dx, T* P, T* M, T* db, T* Tc, int nt) {                  \
        backward_all<T>(x, dG, dL, Geometry{B, N, K2, J, C, nbr, nbm, start}, coef, A, bias, w, cvec, act, dx, P, \
                        M, db, Tc, nt);                                                                            \
    }

LF_EXPORT(float, f32)
LF_EXPORT(double, f64)

extern "C" int lf_conv_max_offsets() { return JMAX; }
extern "C" int lf_conv_max_channels() { return CMAX; }
