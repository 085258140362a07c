// What the compiled kernels (conv_stage.cpp, mlp_step.cpp) share: a block of samples in the lanes
// of one 64-byte vector, the activations' derivatives over such lanes, and the split of the batch
// over OpenMP threads.
//
// exp is IEEE (no -ffast-math); the simd declarations below let gcc call glibc's vector exp
// (libmvec), which the system header declares only under -ffast-math.
#pragma once

#include <algorithm>
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef LF_SIMD_EXP
extern "C" float expf(float) __attribute__((simd("notinbranch"), nothrow, const));
extern "C" double exp(double) __attribute__((simd("notinbranch"), nothrow, const));
#else
#include <cmath>
#endif

namespace lf {

// one block of samples in the lanes of a 64-byte vector (GCC vector extensions: one AVX-512
// register, or two AVX2 registers); V = 16 float32 or 8 float64 samples
typedef float vf32 __attribute__((vector_size(64)));
typedef double vf64 __attribute__((vector_size(64)));
template <typename T> struct Lanes;
template <> struct Lanes<float> { typedef vf32 type; };
template <> struct Lanes<double> { typedef vf64 type; };

inline float exp_(float v) { return expf(v); }
inline double exp_(double v) { return exp(v); }

// (d1, d2, d3) = (a', a'', a''') of the activation (act: 0 softplus, 1 ln cosh, 2 tanh, as in
// latticeflow.potentials.activations) at the n numbers h, one vectorised loop; d3 may be null
template <typename T, int ACT>
inline void derivatives(const T* __restrict h, T* __restrict d1, T* __restrict d2, T* __restrict d3, int n) {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
        T a1, a2, a3;
        if (ACT == 0) {  // softplus: σ, σ(1 − σ), σ(1 − σ)(1 − 2σ)
            const T s = T(1) / (T(1) + exp_(-h[i]));
            a1 = s;
            a2 = s * (T(1) - s);
            a3 = a2 * (T(1) - T(2) * s);
        } else {  // tanh h = 1 − 2 / (1 + e^{2h}) (±1 at overflow)
            const T t = T(1) - T(2) / (T(1) + exp_(T(2) * h[i]));
            const T u = T(1) - t * t;
            if (ACT == 1) {  // ln cosh: tanh, 1 − tanh², −2 tanh (1 − tanh²)
                a1 = t;
                a2 = u;
                a3 = T(-2) * t * u;
            } else {  // tanh: 1 − tanh², −2 tanh (1 − tanh²), (1 − tanh²)(6 tanh² − 2)
                a1 = u;
                a2 = T(-2) * t * u;
                a3 = u * (T(6) * t * t - T(2));
            }
        }
        d1[i] = a1;
        d2[i] = a2;
        if (d3) d3[i] = a3;
    }
}

// rows b0 .. b0 + nb − 1 of x (B, N) into the lanes of xl (N,), lanes past nb zero
template <typename T, typename VT>
void load_block(const T* x, int N, int b0, int nb, VT* xl) {
    for (int s = 0; s < N; ++s) {
        VT a = VT{};
        for (int v = 0; v < nb; ++v) a[v] = x[(int64_t)(b0 + v) * N + s];
        xl[s] = a;
    }
}

// the blocks of V samples in [0, B), split into nt contiguous runs: run t is [begin, end)
inline void run_of(int B, int V, int nt, int t, int& begin, int& end) {
    const int64_t blocks = (B + V - 1) / V;
    begin = (int)std::min<int64_t>(B, blocks * t / nt * V);
    end = (int)std::min<int64_t>(B, blocks * (t + 1) / nt * V);
}

// inside a parallel region: this thread's index (returned), the team's size and this thread's run
inline int this_run(int B, int V, int& team, int& begin, int& end) {
    int t = 0, n = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    n = omp_get_num_threads();
#endif
    run_of(B, V, n, t, begin, end);
    team = n;
    return t;
}

}  // namespace lf
