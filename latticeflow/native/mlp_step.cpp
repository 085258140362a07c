// RK4 steps of the flow's MLP drift, fused: the one-hidden-layer potential
// φ(y) = Σ_k w_k a(W_k·y + b_k) plus a quadratic part ½ yᵀA y, with b, w and A linear in t,
// for latticeflow.potentials.mlp (see latticeflow.native.step). Forward: (y, ln p) at t → at t + dt,
// with the drift
//
//     v = ∇φ = yA + Σ_k w_k a'(h_k) W_k,      ℓ = −∇²φ = −(tr A + Σ_k w_k a''(h_k) ‖W_k‖²),
//
// h = W y + b; the stages and their combination are those of latticeflow.ode.rk4_step. Backward:
// the cotangent of (y, ln p) at t from that at t + dt, and every parameter gradient.
//
// Two kinds of step. The lanes step (small lattices, where the eager step's ~85 tensor operators
// per stage on (B, h) or (B, N) numbers cost more in dispatch than in arithmetic) computes a block
// of V samples held in the lanes of one 64-byte vector (GCC vector extensions: 16 float32 or 8
// float64 samples), parameters read as scalars, and its backward recomputes the four stages from
// y. The GEMM step (larger lattices, below) runs the products through a BLAS gemm. Both are
// called only through a whole integration of n steps, each in its random symmetry frame
// (lf_mlp_rk4_integrate_forward/backward; one step without a frame is n = 1).
//
// With u_k = W_k·v̄ and, for cotangents v̄ of v and ḡ of ℓ at one stage,
//     e_k = w_k (a''(h_k) u_k − ḡ ‖W_k‖² a'''(h_k)):
//     ȳ = v̄Aᵀ + Σ_k e_k W_k,     W̄_k += e_k y + w_k a'(h_k) v̄ − 2 ḡ w_k a''(h_k) W_k,
//     b̄_k += e_k,     w̄_k += a'(h_k) u_k − ḡ ‖W_k‖² a''(h_k),     Ā += yᵀv̄ − ḡ I,
// and each time-dependent part's gradient gets the same sums weighted by the stage's time.
//
// Activations (act): 0 softplus, 1 ln cosh, 2 tanh, as in latticeflow.potentials.activations
// (lanes.h). Plain C ABI over raw pointers; the batch is split over nt OpenMP
// threads, each with its own parameter sums, added in thread order at the end.

#include <cstring>
#include <type_traits>
#include <vector>

#include "gemm_tiles.h"
#include "lanes.h"

namespace {

constexpr int NMAX = 1024;  // sites
constexpr int HMAX = 4096;  // hidden units

using lf::derivatives;
using lf::Lanes;
using lf::load_block;
using lf::this_run;

// the parameters (null: absent; b1, w1, A1 the time-dependent parts)
template <typename T>
struct Params {
    int N, H;
    const T *W, *b0, *b1, *w0, *w1, *A0, *A1;
};

// the parameters at one stage time τ: b(τ), w(τ), A(τ), tr A(τ), and ‖W_k‖²
template <typename T>
struct Stage {
    T tau;
    std::vector<T> b, w, A;
    T trA;
    bool hasA;

    void set(const Params<T>& p, double time) {
        tau = T(time);
        const int N = p.N, H = p.H;
        b.assign(H, T(0));
        w.assign(H, T(0));
        for (int k = 0; k < H; ++k) {
            if (p.b0) b[k] = p.b1 ? p.b0[k] + tau * p.b1[k] : p.b0[k];
            w[k] = p.w1 ? p.w0[k] + tau * p.w1[k] : p.w0[k];
        }
        hasA = p.A0 != nullptr;
        trA = T(0);
        if (hasA) {
            A.resize((size_t)N * N);
            for (int64_t i = 0; i < (int64_t)N * N; ++i) A[i] = p.A1 ? p.A0[i] + tau * p.A1[i] : p.A0[i];
            for (int i = 0; i < N; ++i) trA += A[(int64_t)i * N + i];
        }
    }
};

// out_k = init_k + W_k·s for every k (init null: 0), eight rows at a time so that eight independent
// sums hide the multiply-add latency
template <typename T, typename VT>
inline void rows_dot(const T* W, int N, int H, const T* init, const VT* s, VT* out) {
    constexpr int R = 8;
    int k = 0;
    for (; k + R <= H; k += R) {
        VT acc[R];
        for (int r = 0; r < R; ++r) acc[r] = VT{} + (init ? init[k + r] : T(0));
        const T* Wk = W + (int64_t)k * N;
        for (int i = 0; i < N; ++i) {
            const VT si = s[i];
            for (int r = 0; r < R; ++r) acc[r] += Wk[(int64_t)r * N + i] * si;
        }
        for (int r = 0; r < R; ++r) out[k + r] = acc[r];
    }
    for (; k < H; ++k) {
        VT acc = VT{} + (init ? init[k] : T(0));
        const T* Wk = W + (int64_t)k * N;
        for (int i = 0; i < N; ++i) acc += Wk[i] * s[i];
        out[k] = acc;
    }
}

// out_j = Σ_k coef_k W_kj for every j, eight columns at a time: the sums stay in registers
template <typename T, typename VT>
inline void cols_dot(const T* W, int N, int H, const VT* coef, VT* out) {
    constexpr int R = 8;
    int j = 0;
    for (; j + R <= N; j += R) {
        VT acc[R];
        for (int r = 0; r < R; ++r) acc[r] = VT{};
        for (int k = 0; k < H; ++k) {
            const VT ck = coef[k];
            const T* Wk = W + (int64_t)k * N + j;
            for (int r = 0; r < R; ++r) acc[r] += Wk[r] * ck;
        }
        for (int r = 0; r < R; ++r) out[j + r] = acc[r];
    }
    for (; j < N; ++j) {
        VT acc = VT{};
        for (int k = 0; k < H; ++k) acc += W[(int64_t)k * N + j] * coef[k];
        out[j] = acc;
    }
}

// the activation's derivatives at one stage point s: D = (a'(h), a''(h), a'''(h)) for h = W s + b(τ),
// three runs of H lane vectors (the third only when asked); h is work space (H)
template <typename T, int ACT, typename VT>
inline void hidden(const Params<T>& p, const Stage<T>& st, const VT* s, VT* h, VT* D, bool third) {
    constexpr int V = sizeof(VT) / sizeof(T);
    const int H = p.H;
    rows_dot(p.W, p.N, H, st.b.data(), s, h);
    derivatives<T, ACT>((const T*)h, (T*)D, (T*)(D + H), third ? (T*)(D + 2 * H) : nullptr, H * V);
}

// the drift at a stage point s whose derivatives D are known: v = ∇φ (N lanes); returns ℓ = −∇²φ;
// c: work space (H)
template <typename T, typename VT>
inline VT velocity(const Params<T>& p, const Stage<T>& st, const T* q, const VT* s, const VT* D, VT* v, VT* c) {
    const int N = p.N, H = p.H;
    VT lap = VT{} + st.trA;
    for (int k = 0; k < H; ++k) {
        c[k] = st.w[k] * D[k];
        lap += (st.w[k] * q[k]) * D[H + k];
    }
    cols_dot(p.W, N, H, c, v);  // v_i = Σ_k w_k a'(h_k) W_ki
    if (st.hasA) {
        VT* va = c;  // c is free again: y @ A as Σ_j s_j A_j, through the same routine
        cols_dot(st.A.data(), N, N, s, va);
        for (int i = 0; i < N; ++i) v[i] += va[i];
    }
    return -lap;
}

// one thread's parameter sums, lanes kept apart until the end
template <typename T>
struct Sums {
    typedef typename Lanes<T>::type VT;
    std::vector<VT> W, R, b0, b1, w0, w1, A0, A1;
    VT tr0{}, tr1{};
    Sums(int N, int H, bool quad) : W((size_t)H * N), R(H), b0(H), b1(H), w0(H), w1(H),
                                    A0(quad ? (size_t)N * N : 0), A1(quad ? (size_t)N * N : 0) {}
};

// the cotangent of the stage point s (sbar, N lanes) from those of its drift (vbar, gbar), given the
// derivatives D at s (all three). Adds the quadratic part's sums; leaves in E, C and WB (H each) the
// factors of the MLP's (W̄_k += E_k s + C_k v̄, b̄_k += E_k, w̄_k += WB_k), which add_block adds
// for the block's four stages at once. u: work space (H)
template <typename T, typename VT>
inline void drift_vjp(const Params<T>& p, const Stage<T>& st, const T* q, const VT* s, const VT* D,
                      const VT* vbar, VT gbar, VT* sbar, VT* u, VT* E, VT* C, VT* WB, Sums<T>& S) {
    const int N = p.N, H = p.H;
    const T tau = st.tau;
    const VT *d1 = D, *d2 = D + H, *d3 = D + 2 * H;
    rows_dot<T>(p.W, N, H, nullptr, vbar, u);  // u_k = W_k·v̄
    for (int k = 0; k < H; ++k) {
        const T wk_ = st.w[k];
        const VT qg = q[k] * gbar;
        E[k] = wk_ * (d2[k] * u[k] - qg * d3[k]);
        C[k] = wk_ * d1[k];
        WB[k] = d1[k] * u[k] - qg * d2[k];
    }
    cols_dot(p.W, N, H, E, sbar);  // s̄_j = Σ_k e_k W_kj
    if (st.hasA) {
        rows_dot<T>(st.A.data(), N, N, nullptr, vbar, u);  // Σ_i A_ji v̄_i (u is free again)
        for (int j = 0; j < N; ++j) {  // Ā_ji += s_j v̄_i
            sbar[j] += u[j];
            const VT sj = s[j];
            VT* gA0 = S.A0.data() + (int64_t)j * N;
            VT* gA1 = S.A1.data() + (int64_t)j * N;
            for (int i = 0; i < N; ++i) {
                const VT sv = sj * vbar[i];
                gA0[i] += sv;
                if (p.A1) gA1[i] += tau * sv;
            }
        }
        S.tr0 -= gbar;
        if (p.A1) S.tr1 -= tau * gbar;
    }
}

// the MLP's parameter sums of a block's four stages i (stage parameters st[i], derivatives D (12H),
// cotangents of ℓ G[i], factors E, C, WB (4H each), stage points P and cotangents VB (4N each)):
// W̄_kj += Σ_i (E_ik s_ij + C_ik v̄_ij), eight multiply-adds per load and store of the (H, N) lane
// sums; b̄ += Σ_i E_i, w̄ += Σ_i WB_i (and their τ_i-weighted sums), R_k += Σ_i G_i w_ik a''_ik
template <typename T, typename VT>
inline void add_block(const Params<T>& p, const Stage<T>* const* st, const VT* D, const VT* G, const VT* E,
                      const VT* C, const VT* WB, const VT* P, const VT* VB, Sums<T>& S) {
    const int N = p.N, H = p.H;
    for (int k = 0; k < H; ++k) {
        const VT e0 = E[k], e1 = E[H + k], e2 = E[2 * H + k], e3 = E[3 * H + k];
        const VT c0 = C[k], c1 = C[H + k], c2 = C[2 * H + k], c3 = C[3 * H + k];
        VT* gW = S.W.data() + (int64_t)k * N;
        for (int j = 0; j < N; ++j) {  // one chain of eight multiply-adds (no separate multiplies and adds)
            VT acc = gW[j];
            acc += e0 * P[j];
            acc += c0 * VB[j];
            acc += e1 * P[N + j];
            acc += c1 * VB[N + j];
            acc += e2 * P[2 * N + j];
            acc += c2 * VB[2 * N + j];
            acc += e3 * P[3 * N + j];
            acc += c3 * VB[3 * N + j];
            gW[j] = acc;
        }
        VT r = VT{}, b0 = VT{}, b1 = VT{}, w0 = VT{}, w1 = VT{};
        for (int i = 0; i < 4; ++i) {
            const VT e = E[(int64_t)i * H + k], wb = WB[(int64_t)i * H + k];
            r += G[i] * (st[i]->w[k] * D[(int64_t)i * 3 * H + H + k]);
            b0 += e;
            w0 += wb;
            b1 += st[i]->tau * e;
            w1 += st[i]->tau * wb;
        }
        S.R[k] += r;
        S.b0[k] += b0;
        S.w0[k] += w0;
        if (p.b1) S.b1[k] += b1;
        if (p.w1) S.w1[k] += w1;
    }
}

// rows r0 .. r0 + nb − 1 of (B, N) from lanes (the inverse of load_block)
template <typename T, typename VT>
void store_rows(const VT* in, int N, int r0, int nb, T* x) {
    for (int s = 0; s < N; ++s)
        for (int v = 0; v < nb; ++v) x[(int64_t)(r0 + v) * N + s] = in[s][v];
}

template <typename T>
void norms(const Params<T>& p, std::vector<T>& q) {
    q.assign(p.H, T(0));
    for (int k = 0; k < p.H; ++k) {
        const T* Wk = p.W + (int64_t)k * p.N;
        T sum = T(0);
#pragma omp simd reduction(+ : sum)
        for (int i = 0; i < p.N; ++i) sum += Wk[i] * Wk[i];
        q[k] = sum;
    }
}

// the four stage points S (4N; S[0..N) = y0 on entry) of the step and the derivatives there, D (12H).
// For the forward (`backward` false): returns Σ_i c_i ℓ_i and leaves Σ_i c_i v_i in vsum (c = 1, 2, 2,
// 1). For the backward's remade stages (`backward` true): the third derivatives too, and no drift at
// the last stage point, which only the forward's combination reads
template <typename T, int ACT, typename VT>
inline VT stages(const Params<T>& p, const Stage<T>* st, const T* q, VT* S, VT* D, bool backward, VT* h, VT* v,
                 VT* vsum, T half, T full) {
    const int N = p.N, H = p.H;
    VT dl = VT{};
    for (int i = 0; i < 4; ++i) {
        const Stage<T>& sti = st[i == 0 ? 0 : (i == 3 ? 2 : 1)];
        if (i > 0) {
            const T a = i == 3 ? full : half;
            for (int j = 0; j < N; ++j) S[(int64_t)i * N + j] = S[j] + a * v[j];
        }
        hidden<T, ACT>(p, sti, S + (int64_t)i * N, h, D + (int64_t)i * 3 * H, backward);
        if (backward && i == 3) break;
        const VT l = velocity(p, sti, q, S + (int64_t)i * N, D + (int64_t)i * 3 * H, v, h);
        const T c = (i == 0 || i == 3) ? T(1) : T(2);
        dl += c * l;
        for (int j = 0; j < N; ++j) vsum[j] = i == 0 ? v[j] : vsum[j] + c * v[j];
    }
    return dl;
}

// what a step's forward and backward both need: ‖W_k‖² and the RK4 weights (once per call, also for
// a whole integration's n steps), and the parameters at the stage times t, t + dt/2 and t + dt (per
// step: at(t), reusing the stages' storage)
template <typename T>
struct StepSetup {
    const Params<T>& p;
    std::vector<T> q;
    Stage<T> st[3];
    double dt;
    T half, full, sixth, third;
    StepSetup(const Params<T>& p_, double dt_)
        : p(p_), dt(dt_), half(T(0.5 * dt_)), full(T(dt_)), sixth(T(dt_ / 6.0)), third(T(dt_ / 3.0)) {
        norms(p, q);
    }
    const StepSetup& at(double t) {
        st[0].set(p, t);
        st[1].set(p, t + 0.5 * dt);
        st[2].set(p, t + dt);
        return *this;
    }
};

template <typename T, int ACT>
void forward(const Params<T>& p, const StepSetup<T>& ss, const T* y, const T* logp, int B, T* y_out, T* logp_out,
             int nt) {
    typedef typename Lanes<T>::type VT;
    constexpr int V = sizeof(VT) / sizeof(T);
    const int N = p.N, H = p.H;
    const std::vector<T>& q = ss.q;
    const Stage<T>* st = ss.st;
    const T half = ss.half, full = ss.full, sixth = ss.sixth;
#pragma omp parallel num_threads(nt)
    {
        int team, begin, end;
        this_run(B, V, team, begin, end);
        std::vector<VT> S(4 * (size_t)N), D(12 * (size_t)H), h(std::max(H, N)), v(N), vsum(N);
        for (int r0 = begin; r0 < end; r0 += V) {
            const int nb = std::min(V, end - r0);
            load_block(y, N, r0, nb, S.data());
            const VT dl = stages<T, ACT>(p, st, q.data(), S.data(), D.data(), false, h.data(), v.data(), vsum.data(),
                                         half, full);
            for (int i = 0; i < N; ++i) v[i] = S[i] + sixth * vsum[i];
            store_rows(v.data(), N, r0, nb, y_out);
            for (int k = 0; k < nb; ++k) logp_out[r0 + k] = logp[r0 + k] + sixth * dl[k];
        }
    }
}

template <typename T, int ACT>
void backward(const Params<T>& p, const StepSetup<T>& ss, const T* y, const T* gy_out, const T* glogp_out, int B,
              T* gy, T* gW, T* gb0, T* gb1, T* gw0, T* gw1, T* gA0, T* gA1, int nt) {
    typedef typename Lanes<T>::type VT;
    constexpr int V = sizeof(VT) / sizeof(T);
    const int N = p.N, H = p.H;
    const bool quad = p.A0 != nullptr;
    const std::vector<T>& q = ss.q;
    const Stage<T>* st = ss.st;
    const T half = ss.half, full = ss.full, sixth = ss.sixth, third = ss.third;
    // per thread, the lane-summed parameter sums: W (H·N), then R, b0, b1, w0, w1 (H each), A0, A1 (N·N each),
    // tr0, tr1
    const int64_t width = (int64_t)H * N + 5 * (int64_t)H + (quad ? 2 * (int64_t)N * N + 2 : 0);
    std::vector<T> per_thread;
    int teams = 1;
#pragma omp parallel num_threads(nt)
    {
        int team, begin, end;
        const int me = this_run(B, V, team, begin, end);
#pragma omp single
        {
            teams = team;
            per_thread.assign((size_t)(team * width), T(0));
        }  // implicit barrier
        Sums<T> S(N, H, quad);
        std::vector<VT> P(4 * (size_t)N), D(12 * (size_t)H), h(std::max(H, N)), v(N), vsum(N), yb(N),
            gyo(N), VB(4 * (size_t)N), sb(N), E(4 * (size_t)H), C(4 * (size_t)H), WB(4 * (size_t)H);
        const Stage<T>* const sts[4] = {&st[0], &st[1], &st[1], &st[2]};
        for (int r0 = begin; r0 < end; r0 += V) {
            const int nb = std::min(V, end - r0);
            load_block(y, N, r0, nb, P.data());
            load_block(gy_out, N, r0, nb, gyo.data());
            VT gl = VT{};
            for (int k = 0; k < nb; ++k) gl[k] = glogp_out[r0 + k];
            // the stage points and derivatives, made again as the forward made them (saving them instead
            // costs more: a fresh megabyte per step to fault in)
            stages<T, ACT>(p, st, q.data(), P.data(), D.data(), true, h.data(), v.data(), vsum.data(), half, full);
            // y' = y + dt/6 (k1 + 2k2 + 2k3 + k4), ln p' = ln p + dt/6 (ℓ1 + 2ℓ2 + 2ℓ3 + ℓ4), (k_i, ℓ_i) at
            // stage point i; back through stages 4, 3, 2, 1
            const T wv[4] = {sixth, third, third, sixth};  // ∂y'/∂k_i and ∂ln p'/∂ℓ_i
            const T ws[3] = {half, half, full};             // ∂s_{i+1}/∂k_i
            for (int j = 0; j < N; ++j) {
                yb[j] = gyo[j];
                VB[3 * N + j] = sixth * gyo[j];
            }
            VT G[4];
            for (int i = 3; i >= 0; --i) {
                G[i] = wv[i] * gl;
                drift_vjp<T>(p, *sts[i], q.data(), P.data() + (int64_t)i * N, D.data() + (int64_t)i * 3 * H,
                             VB.data() + (int64_t)i * N, G[i], sb.data(), h.data(), E.data() + (int64_t)i * H,
                             C.data() + (int64_t)i * H, WB.data() + (int64_t)i * H, S);
                for (int j = 0; j < N; ++j) {
                    yb[j] += sb[j];
                    if (i > 0) VB[(int64_t)(i - 1) * N + j] = wv[i - 1] * gyo[j] + ws[i - 1] * sb[j];
                }
            }
            add_block<T>(p, sts, D.data(), G, E.data(), C.data(), WB.data(), P.data(), VB.data(), S);
            store_rows(yb.data(), N, r0, nb, gy);
        }
        T* mine = per_thread.data() + (int64_t)me * width;
        auto lanes = [](const VT& a) {
            T sum = T(0);
            for (int l = 0; l < V; ++l) sum += a[l];
            return sum;
        };
        for (int64_t i = 0; i < (int64_t)H * N; ++i) mine[i] = lanes(S.W[i]);
        T* rest = mine + (int64_t)H * N;
        for (int k = 0; k < H; ++k) {
            rest[k] = lanes(S.R[k]);
            rest[H + k] = lanes(S.b0[k]);
            rest[2 * H + k] = lanes(S.b1[k]);
            rest[3 * H + k] = lanes(S.w0[k]);
            rest[4 * H + k] = lanes(S.w1[k]);
        }
        if (quad) {
            T* a = rest + 5 * (int64_t)H;
            for (int64_t i = 0; i < (int64_t)N * N; ++i) {
                a[i] = lanes(S.A0[i]);
                a[(int64_t)N * N + i] = lanes(S.A1[i]);
            }
            a[2 * (int64_t)N * N] = lanes(S.tr0);
            a[2 * (int64_t)N * N + 1] = lanes(S.tr1);
        }
    }
    // the threads' sums in thread order (the result depends on the thread count, not on timing)
    std::vector<T> total(width, T(0));
    for (int th = 0; th < teams; ++th)
        for (int64_t i = 0; i < width; ++i) total[i] += per_thread[(size_t)(th * width + i)];
    const T* R = total.data() + (int64_t)H * N;
    for (int k = 0; k < H; ++k)
        for (int i = 0; i < N; ++i)
            gW[(int64_t)k * N + i] = total[(int64_t)k * N + i] - T(2) * R[k] * p.W[(int64_t)k * N + i];
    for (int k = 0; k < H; ++k) {
        if (gb0) gb0[k] = R[H + k];
        if (gb1) gb1[k] = R[2 * H + k];
        gw0[k] = R[3 * H + k];
        if (gw1) gw1[k] = R[4 * H + k];
    }
    if (quad) {
        const T* a = R + 5 * (int64_t)H;
        for (int j = 0; j < N; ++j)
            for (int i = 0; i < N; ++i) {
                const int64_t ji = (int64_t)j * N + i;
                gA0[ji] = a[ji] + (i == j ? a[2 * (int64_t)N * N] : T(0));
                if (gA1) gA1[ji] = a[(int64_t)N * N + ji] + (i == j ? a[2 * (int64_t)N * N + 1] : T(0));
            }
    }
}

// ---------------------------------------------------------------------- the GEMM step (larger lattices)
// From about 25 sites on, the step's products are large enough for a BLAS gemm to run them at matmul
// speed, and what costs beyond them is the eager step's ~40 tensor operators per stage. The GEMM step
// computes the same step as forward/backward above with the products by the BLAS gemm that torch
// itself calls (libtorch's sgemm_/dgemm_, column-major Fortran ABI, LP64; its pointer is an argument) or
// by the AVX-512 tiles of gemm_tiles.h (Products below), and everything else in a few fused passes: per
// stage, two gemms forward (h = S Wᵀ, v = U W) and two backward (u = V̄ Wᵀ, S̄ = E W), plus two for
// W̄ = Σ_i (E_iᵀ S_i + C_iᵀ V̄_i) per step (K = 4 rows). The forward keeps the stage points S_i and
// pre-activations h_i when the backward will need them (save non-null); the backward then recomputes
// only the activations' derivatives. Each thread owns a run of rows (the batch split by thread count),
// and the parameter sums are per thread, added in thread order, so every sum runs in a fixed order for
// a given thread count.

template <typename T>
using Gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                      const T*, const int*, const T*, T*, const int*);

// MKL's gemm_bf16bf16f32_: bfloat16 operands, float32 sums and result (same ABI, operands as uint16)
using GemmBf16 = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const uint16_t*,
                          const int*, const uint16_t*, const int*, const float*, float*, const int*);

// a reused work buffer of at least n numbers (the calling thread's: no fresh pages to fault in per call;
// slots 0-4 and 6 a step's, 7 the float32 tiles' packed operand; uint16/uint32 slots 0-2 the bfloat16 operands)
template <typename T>
inline T* scratch(int slot, size_t n) {
    thread_local std::vector<T> buf[12];  // 0-7: one step's; 8-11: a whole integration's
    if (buf[slot].size() < n) buf[slot].resize(n);
    return buf[slot].data();
}

// float32 → bfloat16, rounded to nearest even (finite inputs), over nt threads
inline void to_bf16(const float* x, uint16_t* out, int64_t n, int nt) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        std::memcpy(&u, x + i, 4);
        out[i] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

// the step's products: the T gemm (a BLAS gemm, or for float32 the tiles of gemm_tiles.h: gemm is then the
// address of lf_gemm_f32), or (float only) bfloat16 operands with float32 sums, by MKL's gemm_bf16bf16f32
// (lo) or by the AVX512-BF16 tiles (gemm_lo is then the address of lf_gemm_bf16_f32). The tiles' packed W
// (W as op(B) = Wᵀ, K = N, and as op(B) = W, K = H), or MKL's bfloat16 copy of W, is made once per call;
// other operands are rounded or packed as they are used.
extern "C" void lf_gemm_bf16_f32(int ta, int tb, int M, int Nc, int K, float alpha, const float* A, int lda,
                                 const float* B, int ldb, float beta, float* C, int ldc);
extern "C" void lf_gemm_f32(int ta, int tb, int M, int Nc, int K, float alpha, const float* A, int lda,
                            const float* B, int ldb, float beta, float* C, int ldc);

template <typename T>
struct Products {
    Gemm<T> g;
    GemmBf16 lo;  // MKL's bfloat16 gemm, or null
    const T* W;
    const uint16_t* Wlo;   // MKL's bfloat16 copy of W
    std::vector<uint32_t> Wp;  // the bfloat16 tiles' packed W (empty: not those tiles): Wᵀ's panels, then W's
    std::vector<float> Wf;     // the float32 tiles' packed W, likewise
    int64_t nT;                // where W's panels start in either
    int nt;

    Products(void* gemm, void* gemm_lo, const T* W_, int H, int N, int nt_)
        : g((Gemm<T>)gemm), lo(nullptr), W(W_), Wlo(nullptr), nT(0), nt(nt_) {
        if constexpr (std::is_same<T, float>::value) {
            if (gemm == (void*)&lf_gemm_f32 && !gemm_lo && LF_NATIVE_F32) {
                nT = lf::f32_packed_b_numbers(N, H);
                Wf.resize((size_t)(nT + lf::f32_packed_b_numbers(H, N)));
                lf::f32_pack_b(true, N, H, W_, N, Wf.data());
                lf::f32_pack_b(false, H, N, W_, N, Wf.data() + nT);
            } else if (gemm_lo == (void*)&lf_gemm_bf16_f32) {  // only passed where LF_NATIVE_BF16 (Python checks)
                nT = lf::bf16_packed_b_words(N, H);
                Wp.resize((size_t)(nT + lf::bf16_packed_b_words(H, N)));
                lf::bf16_pack_b(true, N, H, W_, N, Wp.data());
                lf::bf16_pack_b(false, H, N, W_, N, Wp.data() + nT);
            } else if (gemm_lo) {
                lo = (GemmBf16)gemm_lo;
                uint16_t* buf = scratch<uint16_t>(0, (size_t)H * N);
                to_bf16(W_, buf, (int64_t)H * N, nt);
                Wlo = buf;
            }
        }
    }

    const uint16_t* rounded(const T* x, int64_t n, int slot) const {
        if (x == W) return Wlo;
        uint16_t* buf = scratch<uint16_t>(slot, (size_t)n);
        to_bf16((const float*)x, buf, n, nt);
        return buf;
    }

    // row-major C (M×Nc) = alpha op(A) op(B) + beta C with op(A) (M×K), op(B) (K×Nc) (rows of lda, ldb
    // numbers), as the column-major Cᵀ = op(B)ᵀ op(A)ᵀ
    void operator()(bool ta, bool tb, int M, int Nc, int K, T alpha, const T* A, int lda, const T* B, int ldb, T beta,
                    T* C, int ldc) const {
        const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
        if constexpr (std::is_same<T, float>::value) {
#if LF_NATIVE_F32
            if (!Wf.empty()) {  // in the calling thread, its own packing buffer
                const float* pb = B == W ? Wf.data() + (tb ? 0 : nT) : nullptr;
                if (!pb) {
                    float* buf = scratch<float>(7, (size_t)lf::f32_packed_b_numbers(K, Nc));
                    lf::f32_pack_b(tb, K, Nc, B, ldb, buf);
                    pb = buf;
                }
                lf::f32_gemm_packed(ta, M, Nc, K, alpha, A, lda, pb, beta, C, ldc);
                return;
            }
#endif
#if LF_NATIVE_BF16
            if (!Wp.empty()) {  // in the calling thread, its own packing buffers
                uint32_t* pa = scratch<uint32_t>(1, (size_t)lf::bf16_pairs(K) * M);
                lf::bf16_pack_a(ta, M, K, A, lda, pa);
                const uint32_t* pb = B == W ? Wp.data() + (tb ? 0 : nT) : nullptr;
                if (!pb) {
                    uint32_t* buf = scratch<uint32_t>(2, (size_t)lf::bf16_packed_b_words(K, Nc));
                    lf::bf16_pack_b(tb, K, Nc, B, ldb, buf);
                    pb = buf;
                }
                lf::bf16_gemm_packed(ta, M, Nc, K, alpha, pa, pb, beta, C, ldc);
                return;
            }
#endif
            if (lo) {
                const uint16_t* Al = rounded(A, (int64_t)(ta ? K : M) * lda, 1);
                const uint16_t* Bl = rounded(B, (int64_t)(tb ? Nc : K) * ldb, 2);
                lo(&b, &a, &Nc, &M, &K, &alpha, Bl, &ldb, Al, &lda, &beta, C, &ldc);
                return;
            }
        }
        g(&b, &a, &Nc, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    }
};

// one forward stage for the rows at s (nb, N, rows of N numbers): h = s Wᵀ + b(τ) into hs (rows of H),
// v = ∇φ(s) into v, ℓ = −∇²φ into l (nb); U (nb, H) work space. Runs in the calling thread.
template <typename T, int ACT>
void gemm_stage(const Products<T>& mm, const Params<T>& p, const Stage<T>& st, const T* q, int nb, const T* s, T* hs,
                T* U, T* v, T* l, T* d1, T* d2) {
    const int N = p.N, H = p.H;
    mm(false, true, nb, H, N, T(1), s, N, p.W, N, T(0), hs, H);
    const T* bias = st.b.data();
    const T* w = st.w.data();
    for (int b = 0; b < nb; ++b) {
        T* h = hs + (int64_t)b * H;
#pragma omp simd
        for (int k = 0; k < H; ++k) h[k] += bias[k];
        derivatives<T, ACT>(h, d1, d2, nullptr, H);
        T* u = U + (int64_t)b * H;
        T lap = T(0);
#pragma omp simd reduction(+ : lap)
        for (int k = 0; k < H; ++k) {
            u[k] = w[k] * d1[k];
            lap += w[k] * q[k] * d2[k];
        }
        l[b] = -(lap + st.trA);
    }
    mm(false, false, nb, N, H, T(1), U, H, p.W, N, T(0), v, N);
    if (st.hasA) mm(false, false, nb, N, N, T(1), s, N, st.A.data(), N, T(1), v, N);
}

// The GEMM step splits the batch into one run of rows per thread, and each thread steps its rows with
// its own (single-threaded: nested inside a parallel region) gemms: no thread waits on another's product,
// whose shapes at 64 rows split badly. A whole integration runs in one parallel region
// (gemm_integrate_forward/backward): each thread takes its rows through every step and frame without
// waiting for the others, and per-thread parameter sums are added in thread order at the end.
//
// one forward step for the rows [r0, r0 + nb) of y (B, N) into y_out, logp_out; save_s (4, B, N) and save_h
// (4, B, H) keep the stage points and pre-activations (the backward's) where non-null
template <typename T, int ACT>
void gemm_forward_rows(const Products<T>& mm, const Params<T>& p, const StepSetup<T>& ss, const T* y, const T* logp,
                       int B, int r0, int nb, T* y_out, T* logp_out, T* save_s, T* save_h) {
    const int N = p.N, H = p.H;
    const int64_t BN = (int64_t)B * N, BH = (int64_t)B * H;
    const bool keep = save_s != nullptr;
    const int64_t nN = (int64_t)nb * N, nH = (int64_t)nb * H;
    T* S = keep ? nullptr : scratch<T>(0, nN);  // the current stage point, when not kept
    T* Hs = keep ? nullptr : scratch<T>(1, nH);
    T* U = scratch<T>(2, nH);
    T* v = scratch<T>(3, 2 * nN);
    T* vsum = v + nN;
    T* l = scratch<T>(4, 2 * (size_t)nb + 2 * (size_t)H);
    T *lsum = l + nb, *d1 = l + 2 * nb, *d2 = d1 + H;
    const T* yr = y + (int64_t)r0 * N;
    for (int i = 0; i < 4; ++i) {
        const Stage<T>& sti = ss.st[i == 0 ? 0 : (i == 3 ? 2 : 1)];
        T* si = keep ? save_s + i * BN + (int64_t)r0 * N : S;
        T* hi = keep ? save_h + i * BH + (int64_t)r0 * H : Hs;
        if (i == 0) {
            std::copy(yr, yr + nN, si);
        } else {
            const T a = i == 3 ? ss.full : ss.half;
#pragma omp simd
            for (int64_t j = 0; j < nN; ++j) si[j] = yr[j] + a * v[j];
        }
        gemm_stage<T, ACT>(mm, p, sti, ss.q.data(), nb, si, hi, U, v, l, d1, d2);
        const T c = (i == 0 || i == 3) ? T(1) : T(2);
#pragma omp simd
        for (int64_t j = 0; j < nN; ++j) vsum[j] = i == 0 ? v[j] : vsum[j] + c * v[j];
        for (int b = 0; b < nb; ++b) lsum[b] = i == 0 ? l[b] : lsum[b] + c * l[b];
    }
    T* yo = y_out + (int64_t)r0 * N;
#pragma omp simd
    for (int64_t j = 0; j < nN; ++j) yo[j] = yr[j] + ss.sixth * vsum[j];
    for (int b = 0; b < nb; ++b) logp_out[r0 + b] = logp[r0 + b] + ss.sixth * lsum[b];
}

// the GEMM step's parameter sums of a whole backward integration, one block per thread (W̄ (H·N), then
// R_k = Σ ḡ w_k a''_k, b̄, b̄1, w̄, w̄1 (H each), Ā, Ā1 (N·N each), tr, tr1), summed over the steps in each
// thread and added in thread order once at the end (reduce): no per-step pass over W̄'s H·N numbers
template <typename T>
struct GemmSums {
    int H, N;
    bool quad;
    int64_t HN, NN, width;
    std::vector<std::vector<T>> part;

    GemmSums(const Params<T>& p, int nt)
        : H(p.H), N(p.N), quad(p.A0 != nullptr), HN((int64_t)p.H * p.N), NN((int64_t)p.N * p.N),
          width(HN + 5 * (int64_t)p.H + (quad ? 2 * NN + 2 : 0)), part(nt, std::vector<T>(width, T(0))) {}

    // the gradients (outs: W̄, b̄0, b̄1, w̄0, w̄1, Ā0, Ā1, null where absent) from the threads' sums, with
    // W̄ −= 2 R_k W_k (the ‖W_k‖² term of the Laplacian) and Ā −= Σ ḡ I
    void reduce(const T* W, T* const* outs, int nt) {
        const int teams = (int)part.size();
        T* gW = outs[0];
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int k = 0; k < H; ++k) {
            T* out = gW + (int64_t)k * N;
            std::copy(part[0].data() + (int64_t)k * N, part[0].data() + (int64_t)(k + 1) * N, out);
            for (int th = 1; th < teams; ++th) {
                const T* pk = part[th].data() + (int64_t)k * N;
#pragma omp simd
                for (int j = 0; j < N; ++j) out[j] += pk[j];
            }
        }
        std::vector<T> rest(width - HN, T(0));
        for (int th = 0; th < teams; ++th)
            for (int64_t i = 0; i < width - HN; ++i) rest[i] += part[th][HN + i];
        const T *R = rest.data(), *B0 = R + H, *B1 = R + 2 * H, *W0 = R + 3 * H, *W1 = R + 4 * H;
        for (int k = 0; k < H; ++k) {
            const T r = T(2) * R[k];
            for (int j = 0; j < N; ++j) gW[(int64_t)k * N + j] -= r * W[(int64_t)k * N + j];
            if (outs[1]) outs[1][k] = B0[k];
            if (outs[2]) outs[2][k] = B1[k];
            outs[3][k] = W0[k];
            if (outs[4]) outs[4][k] = W1[k];
        }
        if (quad) {
            const T* a = R + 5 * (int64_t)H;
            const T tr0 = a[2 * NN], tr1 = a[2 * NN + 1];
            for (int j = 0; j < N; ++j)
                for (int i = 0; i < N; ++i) {
                    const int64_t ji = (int64_t)j * N + i;
                    outs[5][ji] = a[ji] - (i == j ? tr0 : T(0));
                    if (outs[6]) outs[6][ji] = a[NN + ji] - (i == j ? tr1 : T(0));
                }
        }
    }
};

// the backward of one forward step for the rows [r0, r0 + nb), from its kept stage points S (4, B, N) and
// pre-activations Hs (4, B, H): those rows of the cotangent gy of the step's input, the parameter sums added
// to this thread's block mine of GemmSums
template <typename T, int ACT>
void gemm_backward_rows(const Products<T>& mm, const Params<T>& p, const StepSetup<T>& ss, const T* S, const T* Hs,
                        const T* gy_out, const T* glogp_out, int B, int r0, int nb, T* gy, GemmSums<T>& sums,
                        T* mine) {
    const int N = p.N, H = p.H;
    const bool quad = sums.quad;
    const int64_t BN = (int64_t)B * N, BH = (int64_t)B * H, HN = sums.HN, NN = sums.NN;
    const T* q = ss.q.data();
    const Stage<T>* const sts[4] = {&ss.st[0], &ss.st[1], &ss.st[1], &ss.st[2]};
    const T wv[4] = {ss.sixth, ss.third, ss.third, ss.sixth};  // ∂y'/∂k_i and ∂ln p'/∂ℓ_i
    const T ws[3] = {ss.half, ss.half, ss.full};               // ∂s_{i+1}/∂k_i
    const int64_t nN = (int64_t)nb * N, nH = (int64_t)nb * H;
    T *R = mine + HN, *B0 = R + H, *B1 = R + 2 * H, *W0 = R + 3 * H, *W1 = R + 4 * H;
    T* VB = scratch<T>(0, 4 * nN);  // the cotangents of the four stages' drifts (this thread's rows)
    T* E = scratch<T>(1, 4 * nH);
    T* C = scratch<T>(2, 4 * nH);
    T* u = scratch<T>(3, nH);
    T* sb = scratch<T>(4, nN + 3 * (size_t)H);
    T *d1 = sb + nN, *d2 = d1 + H, *d3 = d2 + H;
    const T* go = gy_out + (int64_t)r0 * N;
    T* g = gy + (int64_t)r0 * N;
    std::copy(go, go + nN, g);
    for (int64_t j = 0; j < nN; ++j) VB[3 * nN + j] = ss.sixth * go[j];
    T tr0 = T(0), tr1 = T(0);
    for (int i = 3; i >= 0; --i) {
        const Stage<T>& st = *sts[i];
        const T* w = st.w.data();
        const T tau = st.tau;
        const T* vb = VB + i * nN;
        T* Ei = E + i * nH;
        T* Ci = C + i * nH;
        const T* hi = Hs + i * BH + (int64_t)r0 * H;
        mm(false, true, nb, H, N, T(1), vb, N, p.W, N, T(0), u, H);  // u = V̄ Wᵀ
        for (int b = 0; b < nb; ++b) {
            const T G = wv[i] * glogp_out[r0 + b];
            derivatives<T, ACT>(hi + (int64_t)b * H, d1, d2, d3, H);
            const T* ub = u + (int64_t)b * H;
            T* eb = Ei + (int64_t)b * H;
            T* cb = Ci + (int64_t)b * H;
#pragma omp simd
            for (int k = 0; k < H; ++k) {
                const T qg = q[k] * G;
                const T e = w[k] * (d2[k] * ub[k] - qg * d3[k]);
                const T wb = d1[k] * ub[k] - qg * d2[k];
                eb[k] = e;
                cb[k] = w[k] * d1[k];
                R[k] += G * w[k] * d2[k];
                B0[k] += e;
                B1[k] += tau * e;
                W0[k] += wb;
                W1[k] += tau * wb;
            }
        }
        mm(false, false, nb, N, H, T(1), Ei, H, p.W, N, T(0), sb, N);  // S̄ = E W
        if (st.hasA) {
            mm(false, true, nb, N, N, T(1), vb, N, st.A.data(), N, T(1), sb, N);  // + V̄ Aᵀ
            T gs = T(0);
            for (int b = 0; b < nb; ++b) gs += wv[i] * glogp_out[r0 + b];
            tr0 += gs;
            tr1 += tau * gs;
        }
#pragma omp simd
        for (int64_t j = 0; j < nN; ++j) {
            g[j] += sb[j];
            if (i > 0) VB[(i - 1) * nN + j] = wv[i - 1] * go[j] + ws[i - 1] * sb[j];
        }
    }
    // this thread's W̄ += Σ_i E_iᵀ S_i + C_iᵀ V̄_i as two products over its four stages' rows (K = 4 nb),
    // with its rows of the four S_i gathered into one block
    T* P = scratch<T>(6, 4 * nN);
    for (int i = 0; i < 4; ++i) {
        const T* Si = S + i * BN + (int64_t)r0 * N;
        std::copy(Si, Si + nN, P + i * nN);
    }
    mm(true, false, H, N, 4 * nb, T(1), E, H, P, N, T(1), mine, N);
    mm(true, false, H, N, 4 * nb, T(1), C, H, VB, N, T(1), mine, N);
    if (quad) {  // Ā += Σ_i S_iᵀ V̄_i, Ā1 the same weighted by τ_i
        T* a = mine + HN + 5 * (int64_t)H;
        mm(true, false, N, N, 4 * nb, T(1), P, N, VB, N, T(1), a, N);
        for (int i = 0; i < 4; ++i)
            mm(true, false, N, N, nb, sts[i]->tau, P + i * nN, N, VB + i * nN, N, T(1), a + NN, N);
        mine[sums.width - 2] += tr0;
        mine[sums.width - 1] += tr1;
    }
}

// into a step's frame, dst = s ⊙ src[perm] (one random symmetry element per sample, as
// latticeflow.symmetry.signed_permutation), and out of it (OUT), dst[perm] = s ⊙ src; rows over nt
// threads; perm null: the identity
template <typename T, bool OUT>
inline void frame_rows(const T* src, const int64_t* perm, const T* sign, int b0, int b1, int N, T* dst) {
    for (int b = b0; b < b1; ++b) {
        const T* xb = src + (int64_t)b * N;
        T* yb = dst + (int64_t)b * N;
        const T s = sign ? sign[b] : T(1);
        const int64_t* pb = perm ? perm + (int64_t)b * N : nullptr;
        for (int j = 0; j < N; ++j) {
            const int64_t i = pb ? pb[j] : j;
            if (OUT) yb[i] = s * xb[j];
            else yb[j] = s * xb[i];
        }
    }
}

template <typename T, bool OUT>
void frame(const T* src, const int64_t* perm, const T* sign, int B, int N, T* dst, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int b = 0; b < B; ++b) frame_rows<T, OUT>(src, perm, sign, b, b + 1, N, dst);
}

template <typename T>
void frame_into(const T* x, const int64_t* perm, const T* sign, int B, int N, T* y, int nt) {
    frame<T, false>(x, perm, sign, B, N, y, nt);
}

template <typename T>
void frame_out(const T* y, const int64_t* perm, const T* sign, int B, int N, T* x, int nt) {
    frame<T, true>(y, perm, sign, B, N, x, nt);
}

// A whole integration of n steps from t0 in steps of dt, step k in the frame of its random symmetry element
// (perm (n, B, N) and sign (n, B), each null for none): x ← out_k(step_k(into_k(x))), with step(k, y, lp, yo,
// lq) one RK4 step of the lanes or the GEMM kind. One call instead of n steps' Python, autograd nodes and
// frame gathers.
template <typename T, typename Step>
void integrate_forward(int B, int N, int n, const int64_t* perm, const T* sign, const T* x, const T* logp,
                       T* x_out, T* logp_out, int nt, Step step) {
    const int64_t BN = (int64_t)B * N;
    T* cur = scratch<T>(8, BN);
    T* y = scratch<T>(9, 2 * BN);
    T* yo = y + BN;
    T* lp = scratch<T>(10, 2 * (size_t)B);
    T* lq = lp + B;
    std::copy(x, x + BN, cur);
    std::copy(logp, logp + B, lp);
    for (int k = 0; k < n; ++k) {
        const int64_t* pk = perm ? perm + k * BN : nullptr;
        const T* sk = sign ? sign + (int64_t)k * B : nullptr;
        frame_into(cur, pk, sk, B, N, y, nt);
        step(k, y, lp, yo, lq);
        frame_out(yo, pk, sk, B, N, cur, nt);
        std::swap(lp, lq);
    }
    std::copy(cur, cur + BN, x_out);
    std::copy(lp, lp + B, logp_out);
}

// its backward: the cotangent gx of x from gx_out; step(k, ȳ_out, ȳ_in) runs step k's backward in its frame
// (and adds its parameter gradients where the caller keeps them)
template <typename T, typename Step>
void integrate_backward(int B, int N, int n, const int64_t* perm, const T* sign, const T* gx_out, T* gx, int nt,
                        Step step) {
    const int64_t BN = (int64_t)B * N;
    T* g = scratch<T>(8, BN);
    T* y = scratch<T>(9, 2 * BN);
    T* yi = y + BN;
    std::copy(gx_out, gx_out + BN, g);
    for (int k = n - 1; k >= 0; --k) {
        const int64_t* pk = perm ? perm + k * BN : nullptr;
        const T* sk = sign ? sign + (int64_t)k * B : nullptr;
        frame_into(g, pk, sk, B, N, y, nt);  // the adjoint of out_k is into_k
        step(k, y, yi);
        frame_out(yi, pk, sk, B, N, g, nt);  // and that of into_k is out_k
    }
    std::copy(g, g + BN, gx);
}

// A whole GEMM integration in one parallel region: each thread takes its rows through the n steps, each in
// its frame, with its own copy of the stage parameters (threads reach a step at different times); the
// numbers are those of the lanes-kind loops above (integrate_forward/backward), row by row.
template <typename T, int ACT>
void gemm_integrate_forward(const Products<T>& mm, const Params<T>& p, const StepSetup<T>& setup, int B, double t0,
                            double dt, int n, const int64_t* perm, const T* sign, const T* x, const T* logp,
                            T* x_out, T* logp_out, T* save_s, T* save_h, int nt) {
    const int N = p.N;
    const int64_t BN = (int64_t)B * N, BH = (int64_t)B * p.H;
    T* cur = scratch<T>(8, BN);
    T* y = scratch<T>(9, 2 * BN);
    T* yo = y + BN;
    T* lps = scratch<T>(10, 2 * (size_t)B);
#pragma omp parallel num_threads(nt)
    {
        int team, r0, r1;
        this_run(B, 16, team, r0, r1);
        const int nb = r1 - r0;
        if (nb > 0) {
            StepSetup<T> ss(setup);
            T *lp = lps, *lq = lps + B;
            std::copy(x + (int64_t)r0 * N, x + (int64_t)r1 * N, cur + (int64_t)r0 * N);
            std::copy(logp + r0, logp + r1, lp + r0);
            for (int k = 0; k < n; ++k) {
                const int64_t* pk = perm ? perm + k * BN : nullptr;
                const T* sk = sign ? sign + (int64_t)k * B : nullptr;
                frame_rows<T, false>(cur, pk, sk, r0, r1, N, y);
                gemm_forward_rows<T, ACT>(mm, p, ss.at(t0 + k * dt), y, lp, B, r0, nb, yo, lq,
                                          save_s ? save_s + k * 4 * BN : nullptr,
                                          save_h ? save_h + k * 4 * BH : nullptr);
                frame_rows<T, true>(yo, pk, sk, r0, r1, N, cur);
                std::swap(lp, lq);
            }
            std::copy(cur + (int64_t)r0 * N, cur + (int64_t)r1 * N, x_out + (int64_t)r0 * N);
            std::copy(lp + r0, lp + r1, logp_out + r0);
        }
    }
}

template <typename T, int ACT>
void gemm_integrate_backward(const Products<T>& mm, const Params<T>& p, const StepSetup<T>& setup, const T* S,
                             const T* Hs, const int64_t* perm, const T* sign, const T* gx_out, const T* glogp_out,
                             int B, double t0, double dt, int n, T* gx, T* const* outs, int nt) {
    const int N = p.N;
    const int64_t BN = (int64_t)B * N, BH = (int64_t)B * p.H;
    GemmSums<T> sums(p, nt);
    T* g = scratch<T>(8, BN);
    T* y = scratch<T>(9, 2 * BN);
    T* yi = y + BN;
#pragma omp parallel num_threads(nt)
    {
        int team, r0, r1;
        const int me = this_run(B, 16, team, r0, r1);
        const int nb = r1 - r0;
        if (nb > 0) {
            StepSetup<T> ss(setup);
            T* mine = sums.part[me].data();
            std::copy(gx_out + (int64_t)r0 * N, gx_out + (int64_t)r1 * N, g + (int64_t)r0 * N);
            for (int k = n - 1; k >= 0; --k) {
                const int64_t* pk = perm ? perm + k * BN : nullptr;
                const T* sk = sign ? sign + (int64_t)k * B : nullptr;
                frame_rows<T, false>(g, pk, sk, r0, r1, N, y);  // the adjoint of out_k is into_k
                gemm_backward_rows<T, ACT>(mm, p, ss.at(t0 + k * dt), S + k * 4 * BN, Hs + k * 4 * BH, y, glogp_out,
                                           B, r0, nb, yi, sums, mine);
                frame_rows<T, true>(yi, pk, sk, r0, r1, N, g);  // and that of into_k is out_k
            }
            std::copy(g + (int64_t)r0 * N, g + (int64_t)r1 * N, gx + (int64_t)r0 * N);
        }
    }
    sums.reduce(p.W, outs, nt);
}

template <typename T, int ACT>
void integrate_forward_act_(int kind, void* gemm, void* gemm_lo, const Params<T>& p, const T* x, const T* logp, int B,
                            double t0, double dt, int n, const int64_t* perm, const T* sign, T* x_out, T* logp_out,
                            T* save_s, T* save_h, int nt) {
    const int64_t BN = (int64_t)B * p.N;
    StepSetup<T> ss(p, dt);  // ‖W‖² once for the n steps
    if (kind == 0) {  // lanes: keep each step's input (in its frame) in save_s (n, B, N)
        integrate_forward<T>(B, p.N, n, perm, sign, x, logp, x_out, logp_out, nt,
                             [&](int k, const T* y, const T* lp, T* yo, T* lq) {
                                 if (save_s) std::copy(y, y + BN, save_s + k * BN);
                                 forward<T, ACT>(p, ss.at(t0 + k * dt), y, lp, B, yo, lq, nt);
                             });
    } else {
        const Products<T> mm(gemm, gemm_lo, p.W, p.H, p.N, nt);
        gemm_integrate_forward<T, ACT>(mm, p, ss, B, t0, dt, n, perm, sign, x, logp, x_out, logp_out, save_s, save_h,
                                       nt);
    }
}

template <typename T, int ACT>
void integrate_backward_act_(int kind, void* gemm, void* gemm_lo, const Params<T>& p, const T* S, const T* Hs,
                             const int64_t* perm, const T* sign, const T* gx_out, const T* glogp_out, int B,
                             double t0, double dt, int n, T* gx, T* const* outs, int nt) {
    const int N = p.N, H = p.H;
    const int64_t BN = (int64_t)B * N, HN = (int64_t)H * N, NN = (int64_t)N * N;
    StepSetup<T> ss(p, dt);
    if (kind == 0) {  // lanes: each step's gradients into one, added to outs (small: N·H numbers)
        const int64_t sizes[7] = {HN, H, H, H, H, NN, NN};
        T* one = scratch<T>(11, (size_t)(HN + 4 * (int64_t)H + (p.A0 ? 2 * NN : 0)));
        T* ones[7] = {one, one + HN, one + HN + H, one + HN + 2 * H, one + HN + 3 * H, one + HN + 4 * H,
                      one + HN + 4 * H + NN};
        for (int i = 0; i < 7; ++i) {
            if (outs[i]) std::fill(outs[i], outs[i] + sizes[i], T(0));
            if (!outs[i] && i != 0 && i != 3) ones[i] = nullptr;  // W̄ and w̄0 always exist
        }
        integrate_backward<T>(B, N, n, perm, sign, gx_out, gx, nt, [&](int k, const T* yb, T* yi) {
            backward<T, ACT>(p, ss.at(t0 + k * dt), S + k * BN, yb, glogp_out, B, yi, ones[0], ones[1], ones[2],
                             ones[3], ones[4], ones[5], ones[6], nt);
            for (int i = 0; i < 7; ++i) {
                if (!outs[i]) continue;
                T* o = outs[i];
                const T* a = ones[i];
#pragma omp simd
                for (int64_t j = 0; j < sizes[i]; ++j) o[j] += a[j];
            }
        });
    } else {  // GEMM: the threads' sums over all steps, reduced once
        const Products<T> mm(gemm, gemm_lo, p.W, H, N, nt);
        gemm_integrate_backward<T, ACT>(mm, p, ss, S, Hs, perm, sign, gx_out, glogp_out, B, t0, dt, n, gx, outs, nt);
    }
}

template <typename T>
void integrate_forward_act(int kind, void* gemm, void* gemm_lo, int act, const Params<T>& p, const T* x,
                           const T* logp, int B, double t0, double dt, int n, const int64_t* perm, const T* sign,
                           T* x_out, T* logp_out, T* save_s, T* save_h, int nt) {
    if (act == 0)
        integrate_forward_act_<T, 0>(kind, gemm, gemm_lo, p, x, logp, B, t0, dt, n, perm, sign, x_out, logp_out,
                                     save_s, save_h, nt);
    else if (act == 1)
        integrate_forward_act_<T, 1>(kind, gemm, gemm_lo, p, x, logp, B, t0, dt, n, perm, sign, x_out, logp_out,
                                     save_s, save_h, nt);
    else
        integrate_forward_act_<T, 2>(kind, gemm, gemm_lo, p, x, logp, B, t0, dt, n, perm, sign, x_out, logp_out,
                                     save_s, save_h, nt);
}

template <typename T>
void integrate_backward_act(int kind, void* gemm, void* gemm_lo, int act, const Params<T>& p, const T* S, const T* Hs,
                            const int64_t* perm, const T* sign, const T* gx_out, const T* glogp_out, int B,
                            double t0, double dt, int n, T* gx, T* const* outs, int nt) {
    if (act == 0)
        integrate_backward_act_<T, 0>(kind, gemm, gemm_lo, p, S, Hs, perm, sign, gx_out, glogp_out, B, t0, dt, n, gx,
                                      outs, nt);
    else if (act == 1)
        integrate_backward_act_<T, 1>(kind, gemm, gemm_lo, p, S, Hs, perm, sign, gx_out, glogp_out, B, t0, dt, n, gx,
                                      outs, nt);
    else
        integrate_backward_act_<T, 2>(kind, gemm, gemm_lo, p, S, Hs, perm, sign, gx_out, glogp_out, B, t0, dt, n, gx,
                                      outs, nt);
}

}  // namespace

// kind: 0 the lanes step (save_s (n, B, N) keeps each step's input; save_h unused), 1 the GEMM step
#define LF_EXPORT_INTEGRATE(T, SUFFIX)                                                                              \
    extern "C" void lf_mlp_rk4_integrate_forward_##SUFFIX(                                                         \
        int kind, void* gemm, void* gemm_lo, const T* x, const T* logp, int B, int N, int H, const T* W,           \
        const T* b0, const T* b1, const T* w0, const T* w1, const T* A0, const T* A1, int act, double t0,          \
        double dt, int n, const int64_t* perm, const T* sign, T* x_out, T* logp_out, T* save_s, T* save_h,         \
        int nt) {                                                                                                   \
        integrate_forward_act<T>(kind, gemm, gemm_lo, act, Params<T>{N, H, W, b0, b1, w0, w1, A0, A1}, x, logp, B, \
                                 t0, dt, n, perm, sign, x_out, logp_out, save_s, save_h, nt);                      \
    }                                                                                                               \
    extern "C" void lf_mlp_rk4_integrate_backward_##SUFFIX(                                                        \
        int kind, void* gemm, void* gemm_lo, const T* S, const T* Hs, const int64_t* perm, const T* sign,          \
        const T* gx_out, const T* glogp_out, int B, int N, int H, const T* W, const T* b0, const T* b1,            \
        const T* w0, const T* w1, const T* A0, const T* A1, int act, double t0, double dt, int n, T* gx, T* gW,    \
        T* gb0, T* gb1, T* gw0, T* gw1, T* gA0, T* gA1, int nt) {                                                  \
        T* const outs[7] = {gW, gb0, gb1, gw0, gw1, gA0, gA1};                                                     \
        integrate_backward_act<T>(kind, gemm, gemm_lo, act, Params<T>{N, H, W, b0, b1, w0, w1, A0, A1}, S, Hs,    \
                                  perm, sign, gx_out, glogp_out, B, t0, dt, n, gx, outs, nt);                      \
    }

LF_EXPORT_INTEGRATE(float, f32)
LF_EXPORT_INTEGRATE(double, f64)

extern "C" void lf_signed_perm_f32(const float* x, const int64_t* perm, const float* sign, int B, int N, float* y,
                                   int nt) {
    frame_into<float>(x, perm, sign, B, N, y, nt);
}
extern "C" void lf_signed_perm_f64(const double* x, const int64_t* perm, const double* sign, int B, int N,
                                   double* y, int nt) {
    frame_into<double>(x, perm, sign, B, N, y, nt);
}

// bfloat16 operands, float32 sums, by the AVX512-BF16 kernel in the calling thread: row-major
// C (M×Nc) = alpha op(A) op(B) + beta C, op(A) (M×K) = A or (ta) Aᵀ with rows of lda numbers, op(B) likewise;
// a no-op where the library was built without AVX512-BF16 (lf_native_bf16() says)
extern "C" void lf_gemm_bf16_f32(int ta, int tb, int M, int Nc, int K, float alpha, const float* A, int lda,
                                 const float* B, int ldb, float beta, float* C, int ldc) {
#if LF_NATIVE_BF16
    std::vector<uint32_t> pa((size_t)lf::bf16_pairs(K) * M), pb((size_t)lf::bf16_packed_b_words(K, Nc));
    lf::bf16_pack_a(ta != 0, M, K, A, lda, pa.data());
    lf::bf16_pack_b(tb != 0, K, Nc, B, ldb, pb.data());
    lf::bf16_gemm_packed(ta != 0, M, Nc, K, alpha, pa.data(), pb.data(), beta, C, ldc);
#else
    (void)ta, (void)tb, (void)M, (void)Nc, (void)K, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb, (void)beta,
        (void)C, (void)ldc;
#endif
}
extern "C" int lf_native_bf16() { return LF_NATIVE_BF16; }

// the float32 tiles, the same way (a no-op where the library was built without AVX-512: lf_native_f32())
extern "C" void lf_gemm_f32(int ta, int tb, int M, int Nc, int K, float alpha, const float* A, int lda,
                            const float* B, int ldb, float beta, float* C, int ldc) {
#if LF_NATIVE_F32
    std::vector<float> pb((size_t)lf::f32_packed_b_numbers(K, Nc));
    lf::f32_pack_b(tb != 0, K, Nc, B, ldb, pb.data());
    lf::f32_gemm_packed(ta != 0, M, Nc, K, alpha, A, lda, pb.data(), beta, C, ldc);
#else
    (void)ta, (void)tb, (void)M, (void)Nc, (void)K, (void)alpha, (void)A, (void)lda, (void)B, (void)ldb, (void)beta,
        (void)C, (void)ldc;
#endif
}
extern "C" int lf_native_f32() { return LF_NATIVE_F32; }

extern "C" int lf_mlp_max_sites() { return NMAX; }
extern "C" int lf_mlp_max_hidden() { return HMAX; }
