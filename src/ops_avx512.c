/*
 * ops_avx512.c - the "avx512" kernel table: x86-64 AVX-512F (+ FMA, F16C), 16 floats
 * per vector, for the f16 and Q8_0 dot products; the other entries are the AVX2
 * ones from ops_avx2.c.
 *
 * Compiled with -mavx512f -mfma -mf16c for this file only (Makefile), so nothing here
 * may run before ops_select.c has seen those features (AVX2 included, for the shared
 * entries). Off x86-64 the file defines nothing.
 *
 * Same shape as ops_avx2.c: a SIMD main loop, then a scalar tail from the same index;
 * four accumulators; unaligned loads; a summation order that depends only on n;
 * fmaf() in the tails.
 *
 * Where 512 bits pay, measured with tools/bench_kernels.c on Zen 5 (tables
 * interleaved). f16 and Q8_0 dot products: 1.4-1.9x faster than AVX2 on rows of 192
 * or more in cache and 1.2-1.6x on whole matrices streamed from L2/L3 (widening the
 * weights, not memory, limits AVX2 there), and equal at attention's head_dim 32-64. A 512-bit dot_f32 was 1.5-1.8x faster on rows
 * in L1 but 2% slower on a 2.4 MB f32 matrix and 10-25% slower on a 9.4 MB one:
 * f32 weights are bandwidth-bound, so the table keeps the AVX2 kernel. A 512-bit
 * axpy was no faster at the only sizes forward.c uses (n = head_dim, 32 to 128; 15%
 * slower at 32), so the table keeps the AVX2 one too.
 */
#include "ops.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>

/* The sum of the sixteen lanes in a fixed order: halves added down to one lane. */
static inline float hsum16(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Sixteen halves from any address, widened exactly. */
static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
}

/* Sixteen int8 from any address, as floats (exact). */
static inline __m512 load16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)));
}

static float dot_f16_avx512(const uint16_t *w, const float *x, int32_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
    int32_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm512_fmadd_ps(load16_f16(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(load16_f16(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
        acc2 = _mm512_fmadd_ps(load16_f16(w + i + 32), _mm512_loadu_ps(x + i + 32), acc2);
        acc3 = _mm512_fmadd_ps(load16_f16(w + i + 48), _mm512_loadu_ps(x + i + 48), acc3);
    }
    /* Fewer than 64 left: one 32-step and one 16-step at most, each into
     * accumulators of its own, so short rows need no serial chain. */
    if (i + 32 <= n) {
        acc0 = _mm512_fmadd_ps(load16_f16(w + i), _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(load16_f16(w + i + 16), _mm512_loadu_ps(x + i + 16), acc1);
        i += 32;
    }
    if (i + 16 <= n) {
        acc2 = _mm512_fmadd_ps(load16_f16(w + i), _mm512_loadu_ps(x + i), acc2);
        i += 16;
    }
    float sum = hsum16(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
    for (; i < n; i++) {
        sum = fmaf(_cvtsh_ss(w[i]), x[i], sum);
    }
    return sum;
}

/* q . x over one block of 32, in sixteen lanes; the caller applies the block's scale. */
static inline __m512 block_q8_0(const moas_block_q8_0 *b, const float *x) {
    const __m512 p = _mm512_mul_ps(load16_i8(b->q), _mm512_loadu_ps(x));
    return _mm512_fmadd_ps(load16_i8(b->q + 16), _mm512_loadu_ps(x + 16), p);
}

static float dot_q8_0_avx512(const moas_block_q8_0 *w, const float *x, int32_t n) {
    const int32_t nb = n / MOAS_QK8_0;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int32_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const float *xb = x + (size_t)b * MOAS_QK8_0;
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d)), block_q8_0(&w[b], xb), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b + 1].d)),
                               block_q8_0(&w[b + 1], xb + MOAS_QK8_0), acc1);
    }
    for (; b < nb; b++) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(w[b].d)),
                               block_q8_0(&w[b], x + (size_t)b * MOAS_QK8_0), acc0);
    }
    return hsum16(_mm512_add_ps(acc0, acc1));
}

#define MM_VEC __m512
#define MM_LANES 16
#define MM_ZERO() _mm512_setzero_ps()
#define MM_LOADX(p) _mm512_loadu_ps(p)
#define MM_LOAD_F16(p) load16_f16(p)
#define MM_LOAD_I8(p) load16_i8(p)
#define MM_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MM_MUL(a, b) _mm512_mul_ps(a, b)
#define MM_SET1(f) _mm512_set1_ps(f)
#define MM_HSUM(v) hsum16(v)
#define MM_STORE(p, v) _mm512_storeu_ps(p, v)
#define MM_ADD(a, b) _mm512_add_ps(a, b)
#define MM_DIV(a, b) _mm512_div_ps(a, b)
#define MM_MAX(a, b) _mm512_max_ps(a, b)
#define MM_HMAX(v) _mm512_reduce_max_ps(v)
#define MM_ABS(v) _mm512_abs_ps(v)
#define MM_ROUND(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MM_POW2(n) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define MM_COPYSIGN(mag, sign)                                                            \
    _mm512_castsi512_ps(_mm512_or_si512(                                                  \
        _mm512_and_si512(_mm512_castps_si512(mag), _mm512_set1_epi32(0x7fffffff)),        \
        _mm512_and_si512(_mm512_castps_si512(sign), _mm512_set1_epi32((int)0x80000000u))))
#define MM_TILE_ROWS 6   /* 6 x 4 beat 4 x 4 by 4-5% and 8 x 4, 4 x 8 (bench_kernels) */
#define MM_TILE_TOKS 4
#define MM_DECODE_ROWS 8
#define MM_NAME(base) base##_avx512
#include "ops_simd.h"

const moas_ops moas__ops_avx512 = {
    .name = "avx512",
    .dot_f32 = moas__dot_f32_avx2,    /* see the top of this file */
    .dot_f16 = dot_f16_avx512,
    .dot_q8_0 = dot_q8_0_avx512,
    .matmul_f32 = matmul_f32_avx512,
    .matmul_f16 = matmul_f16_avx512,
    .matmul_q8_0 = matmul_q8_0_avx512,
    .attn_scores_f32 = attn_scores_f32_avx512,
    .attn_scores_f16 = attn_scores_f16_avx512,
    .attn_mix_f32 = attn_mix_f32_avx512,
    .attn_mix_f16 = attn_mix_f16_avx512,
    .softmax = softmax_avx512,
    .gelu = gelu_avx512,
    .axpy_f32 = moas__axpy_f32_avx2,
    .axpy_f16 = moas__axpy_f16_avx2,
};

#endif /* __x86_64__ */
