// Matrix products for the GEMM step (mlp_step.cpp) in tiles of up to 12 rows × 32 columns held in 24
// AVX-512 registers, for the shapes a thread's rows give (32 × 256 by 256 × 512 and the like), where a
// BLAS gemm spends much of its time outside its inner kernel:
//
// - bfloat16 operands with float32 sums (vdpbf16ps, AVX512-BF16), for latticeflow.native.step.products
//   ("bfloat16") where MKL's gemm_bf16bf16f32 has no fast path: on AMD Zen 4 it runs at sgemm's speed, so
//   that rounding the operands made a step slower than float32. There these tiles run the step's products
//   at about twice sgemm's speed. Operands are rounded from float32 to bfloat16 (to nearest, ties to
//   even: the rounding of the MKL path) while they are packed into the layouts vdpbf16ps reads: for the
//   k-pairs kk = 0..⌈K/2⌉,
//   A: one 32-bit word (opA[m][2kk], opA[m][2kk+1]) per row and pair, at a[m·rs + kk·ks]: rows of pairs
//      (rs = ⌈K/2⌉, ks = 1) when A is not transposed, so that packing is a contiguous rounding pass, and
//      pairs of rows (rs = 1, ks = M) when it is, so that packing reads A's rows contiguously;
//   B: panels of 32 columns, b[(panel·KK + kk)·32 + j] = (opB[2kk][j0+j], opB[2kk+1][j0+j]),
//   low half the even k, zeros past K and past the last column.
// - float32 (FMA), where they beat the BLAS at these shapes (AMD Zen 4: a paper-configuration training
//   iteration 1.08-1.12× faster than with MKL's sgemm); A is read in place, B packed in the same panels.
//
// A tile sums over all of K in registers and is stored once (alpha, beta, masked past the last column);
// every sum runs over k in the same order whatever the thread count. Single-threaded: the GEMM step calls
// them from each thread for that thread's rows. `python benchmarks/ising_speed.py --bfloat16` times a
// training iteration with each gemm available.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LF_NATIVE_BF16 1
#else
#define LF_NATIVE_BF16 0
#endif

namespace lf {

// float32 → bfloat16 bits, to nearest, ties to even (finite inputs)
inline uint32_t bf16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

constexpr int TILE_MR = 12;  // rows of a tile
constexpr int TILE_NR = 32;  // columns of a tile (two 16-lane vectors)

inline int bf16_pairs(int K) { return (K + 1) / 2; }
inline int64_t bf16_packed_b_words(int K, int Nc) {
    return (int64_t)((Nc + TILE_NR - 1) / TILE_NR) * bf16_pairs(K) * TILE_NR;
}

// the strides of a packed A (bf16_pack_a): word (m, kk) at a[m·rs + kk·ks]
inline void bf16_a_strides(bool ta, int M, int K, int64_t& rs, int64_t& ks) {
    rs = ta ? 1 : bf16_pairs(K);
    ks = ta ? M : 1;
}

// op(A) (M×K; A rows of lda numbers, transposed when ta) into a (⌈K/2⌉·M words, strides bf16_a_strides)
inline void bf16_pack_a(bool ta, int M, int K, const float* A, int lda, uint32_t* a) {
    const int KK = bf16_pairs(K);
    if (ta) {  // op(A)[m][k] = A[k][m]: a pair's two rows of A, contiguous over m
        for (int kk = 0; kk < KK; ++kk) {
            const float* r0 = A + (int64_t)(2 * kk) * lda;
            const float* r1 = 2 * kk + 1 < K ? A + (int64_t)(2 * kk + 1) * lda : nullptr;
            uint32_t* out = a + (int64_t)kk * M;
            if (r1) {
#pragma omp simd
                for (int m = 0; m < M; ++m) out[m] = bf16_bits(r0[m]) | (bf16_bits(r1[m]) << 16);
            } else {
#pragma omp simd
                for (int m = 0; m < M; ++m) out[m] = bf16_bits(r0[m]);
            }
        }
    } else {  // op(A)[m][k] = A[m][k]: a pair is two neighbours in a row, and a row of pairs is a row of A
        for (int m = 0; m < M; ++m) {
            const float* row = A + (int64_t)m * lda;
            uint32_t* out = a + (int64_t)m * KK;
#pragma omp simd
            for (int kk = 0; kk < K / 2; ++kk) out[kk] = bf16_bits(row[2 * kk]) | (bf16_bits(row[2 * kk + 1]) << 16);
            if (K & 1) out[KK - 1] = bf16_bits(row[K - 1]);
        }
    }
}

// B in panels of TILE_NR columns: out[(panel·G + g)·TILE_NR + j] = elem(g, j0 + j) for the G k-groups (a k for
// float32, a pair of k for bfloat16), zeros past column Nc. by_rows (op(B) = Bᵀ): j outer, so that elem reads a
// row of B contiguously; else g outer, contiguous over j.
template <typename Word, typename Elem>
inline void pack_panels(int G, int Nc, bool by_rows, Word* out, Elem elem) {
    const int panels = (Nc + TILE_NR - 1) / TILE_NR;
    for (int pnl = 0; pnl < panels; ++pnl) {
        const int j0 = pnl * TILE_NR, nj = Nc - j0 < TILE_NR ? Nc - j0 : TILE_NR;
        Word* o = out + (int64_t)pnl * G * TILE_NR;
        if (by_rows) {
            for (int j = 0; j < TILE_NR; ++j)
                for (int g = 0; g < G; ++g) o[(int64_t)g * TILE_NR + j] = j < nj ? elem(g, j0 + j) : Word(0);
        } else {
            for (int g = 0; g < G; ++g) {
                Word* og = o + (int64_t)g * TILE_NR;
#pragma omp simd
                for (int j = 0; j < nj; ++j) og[j] = elem(g, j0 + j);
                for (int j = nj; j < TILE_NR; ++j) og[j] = Word(0);
            }
        }
    }
}

// op(B) (K×Nc; B rows of ldb numbers, transposed when tb) into b (bf16_packed_b_words(K, Nc) words)
inline void bf16_pack_b(bool tb, int K, int Nc, const float* B, int ldb, uint32_t* b) {
    const int64_t sk = tb ? 1 : ldb, sj = tb ? ldb : 1;  // op(B)[k][j] at B[k·sk + j·sj]
    pack_panels(bf16_pairs(K), Nc, tb, b, [&](int kk, int j) {
        const float* x = B + (int64_t)(2 * kk) * sk + j * sj;
        return bf16_bits(x[0]) | (2 * kk + 1 < K ? bf16_bits(x[sk]) << 16 : 0u);
    });
}

#if defined(__AVX512F__)
// a tile's sums (MR rows × two 16-lane vectors) into C: alpha acc + beta C, masked past column nj (≤ 32)
template <int MR>
inline void store_tile(const __m512 (&acc0)[MR], const __m512 (&acc1)[MR], float* c, int ldc, int nj, float alpha,
                       float beta) {
    const __mmask16 m0 = nj >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nj) - 1u);
    const __mmask16 m1 = nj >= 32 ? (__mmask16)0xFFFF : (nj <= 16 ? (__mmask16)0 : (__mmask16)((1u << (nj - 16)) - 1u));
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    for (int r = 0; r < MR; ++r) {
        float* cr = c + (int64_t)r * ldc;
        __m512 x0 = _mm512_mul_ps(va, acc0[r]), x1 = _mm512_mul_ps(va, acc1[r]);
        if (beta != 0.0f) {
            x0 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m0, cr), x0);
            x1 = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m1, cr + 16), x1);
        }
        _mm512_mask_storeu_ps(cr, m0, x0);
        _mm512_mask_storeu_ps(cr + 16, m1, x1);
    }
}

// one tile: C[MR × nj] = alpha Σ_g a[r·rs + g·ks] · b[g·32 + j] + beta C over G k-groups (nj ≤ 32 columns
// stored), Ops the element type's vector load, broadcast and multiply-add
template <typename Ops, int MR>
inline void tile(int G, const typename Ops::Word* a, int64_t rs, int64_t ks, const typename Ops::Word* b, float* c,
                 int ldc, int nj, float alpha, float beta) {
    __m512 acc0[MR], acc1[MR];
    for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
        const auto b0 = Ops::load(b + (int64_t)g * TILE_NR);
        const auto b1 = Ops::load(b + (int64_t)g * TILE_NR + 16);
        const typename Ops::Word* ag = a + g * ks;
        for (int r = 0; r < MR; ++r) {
            const auto av = Ops::broadcast(ag[r * rs]);
            acc0[r] = Ops::fma(acc0[r], av, b0);
            acc1[r] = Ops::fma(acc1[r], av, b1);
        }
    }
    store_tile<MR>(acc0, acc1, c, ldc, nj, alpha, beta);
}

// C (M×Nc, rows of ldc) = alpha op(A) op(B) + beta C in tiles: op(A) at a[m·rs + g·ks], op(B) packed in panels
// (pack_panels); for each panel of 32 columns, the rows in tiles of at most MR, as even as they come (32 rows:
// 11 + 11 + 10, not 12 + 12 + 8)
template <typename Ops>
inline void tiles(int M, int Nc, int G, float alpha, const typename Ops::Word* a, int64_t rs, int64_t ks,
                  const typename Ops::Word* b, float beta, float* c, int ldc) {
    const int panels = (Nc + TILE_NR - 1) / TILE_NR;
    const int count = (M + TILE_MR - 1) / TILE_MR;
    for (int pnl = 0; pnl < panels; ++pnl) {
        const int j0 = pnl * TILE_NR, nj = Nc - j0 < TILE_NR ? Nc - j0 : TILE_NR;
        const typename Ops::Word* bp = b + (int64_t)pnl * G * TILE_NR;
        int m0 = 0;
        for (int t = 0; t < count; ++t) {
            const int m1 = (int)((int64_t)M * (t + 1) / count);
            const typename Ops::Word* at = a + m0 * rs;
            float* ct = c + (int64_t)m0 * ldc + j0;
            switch (m1 - m0) {
#define LF_TILE(R) \
    case R: tile<Ops, R>(G, at, rs, ks, bp, ct, ldc, nj, alpha, beta); break;
                LF_TILE(1) LF_TILE(2) LF_TILE(3) LF_TILE(4) LF_TILE(5) LF_TILE(6)
                LF_TILE(7) LF_TILE(8) LF_TILE(9) LF_TILE(10) LF_TILE(11) LF_TILE(12)
#undef LF_TILE
                default: break;
            }
            m0 = m1;
        }
    }
}
#endif

#if LF_NATIVE_BF16
// vdpbf16ps on pairs: acc_j += a.lo·b_j.lo + a.hi·b_j.hi
struct Bf16Ops {
    using Word = uint32_t;
    static __m512bh load(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
    static __m512bh broadcast(uint32_t x) { return (__m512bh)_mm512_set1_epi32((int)x); }
    static __m512 fma(__m512 acc, __m512bh a, __m512bh b) { return _mm512_dpbf16_ps(acc, a, b); }
};

// C (M×Nc, rows of ldc) = alpha op(A) op(B) + beta C from the packed a (bf16_pack_a of the same ta) and b
// (bf16_pack_b)
inline void bf16_gemm_packed(bool ta, int M, int Nc, int K, float alpha, const uint32_t* a, const uint32_t* b,
                             float beta, float* c, int ldc) {
    const int KK = bf16_pairs(K);
    int64_t rs, ks;
    bf16_a_strides(ta, M, K, rs, ks);
    tiles<Bf16Ops>(M, Nc, KK, alpha, a, rs, ks, b, beta, c, ldc);
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// The float32 tiles (AVX-512 FMA). A needs no packing: a tile reads op(A)[m][k] at A[m·rs + k·ks] (rs = lda,
// ks = 1 untransposed; rs = 1, ks = lda transposed); B is packed in panels of 32 columns,
// b[(panel·K + k)·32 + j] = opB[k][j0+j], zeros past the last column.

inline int64_t f32_packed_b_numbers(int K, int Nc) { return (int64_t)((Nc + TILE_NR - 1) / TILE_NR) * K * TILE_NR; }

inline void f32_pack_b(bool tb, int K, int Nc, const float* B, int ldb, float* b) {
    const int64_t sk = tb ? 1 : ldb, sj = tb ? ldb : 1;
    pack_panels(K, Nc, tb, b, [&](int k, int j) { return B[k * sk + j * sj]; });
}

#if defined(__AVX512F__)
#define LF_NATIVE_F32 1
struct F32Ops {
    using Word = float;
    static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    static __m512 broadcast(float x) { return _mm512_set1_ps(x); }
    static __m512 fma(__m512 acc, __m512 a, __m512 b) { return _mm512_fmadd_ps(a, b, acc); }
};

// C (M×Nc, rows of ldc) = alpha op(A) op(B) + beta C, op(A) read from A (lda, ta) and op(B) packed (f32_pack_b)
inline void f32_gemm_packed(bool ta, int M, int Nc, int K, float alpha, const float* A, int lda, const float* b,
                            float beta, float* c, int ldc) {
    const int64_t rs = ta ? 1 : lda, ks = ta ? lda : 1;
    tiles<F32Ops>(M, Nc, K, alpha, A, rs, ks, b, beta, c, ldc);
}
#else
#define LF_NATIVE_F32 0
#endif

}  // namespace lf
