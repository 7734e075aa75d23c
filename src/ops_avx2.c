/*
 * ops_avx2.c - the "avx2" kernel table: x86-64 AVX2 + FMA + F16C, 8 floats per vector.
 *
 * Compiled with -mavx2 -mfma -mf16c for this file only (Makefile), so nothing here may
 * run before ops_select.c has seen those features. Off x86-64 the file defines
 * nothing.
 *
 * Each kernel is a SIMD main loop, then a scalar tail that continues from the same
 * index. Dot products keep four independent accumulators, so four fused
 * multiply-adds are in flight instead of one waiting on the last (FMA latency is
 * about four cycles, throughput two per cycle). Loads are unaligned: weight rows of
 * an f16 or Q8_0 tensor start wherever the previous row ended. The summation order
 * depends only on n, so results do not depend on alignment or threads. Tails use
 * fmaf(), as the vector loop does, so every element is rounded the same way.
 */
#include "ops.h"

#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>

/* The sum of the eight lanes, as (lo + hi) halved twice: a fixed order. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The largest of the eight lanes. */
static inline float hmax8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight halves from any address, widened exactly (subnormals, infinities, NaN). */
static inline __m256 load8_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p));
}

/* Eight int8 from any address, as floats (exact). */
static inline __m256 load8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)));
}

/* Shared with the avx512 table (see ops_avx512.c). */
float moas__dot_f32_avx2(const float *w, const float *x, int32_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    /* Fewer than 32 left: one 16-step and one 8-step at most, each into
     * accumulators of its own, so short rows need no serial chain. */
    if (i + 16 <= n) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        i += 16;
    }
    if (i + 8 <= n) {
        acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc2);
        i += 8;
    }
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) {
        sum = fmaf(w[i], x[i], sum);
    }
    return sum;
}

static float dot_f16_avx2(const uint16_t *w, const float *x, int32_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        acc0 = _mm256_fmadd_ps(load8_f16(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(load8_f16(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        acc2 = _mm256_fmadd_ps(load8_f16(w + i + 16), _mm256_loadu_ps(x + i + 16), acc2);
        acc3 = _mm256_fmadd_ps(load8_f16(w + i + 24), _mm256_loadu_ps(x + i + 24), acc3);
    }
    /* Fewer than 32 left: one 16-step and one 8-step at most, each into
     * accumulators of its own, so short rows need no serial chain. */
    if (i + 16 <= n) {
        acc0 = _mm256_fmadd_ps(load8_f16(w + i), _mm256_loadu_ps(x + i), acc0);
        acc1 = _mm256_fmadd_ps(load8_f16(w + i + 8), _mm256_loadu_ps(x + i + 8), acc1);
        i += 16;
    }
    if (i + 8 <= n) {
        acc2 = _mm256_fmadd_ps(load8_f16(w + i), _mm256_loadu_ps(x + i), acc2);
        i += 8;
    }
    float sum = hsum8(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    for (; i < n; i++) {
        sum = fmaf(_cvtsh_ss(w[i]), x[i], sum);
    }
    return sum;
}

/* q . x over one block of 32, in eight lanes; the caller applies the block's scale,
 * once per block as the reference does (to each lane's partial sum). */
static inline __m256 block_q8_0(const moas_block_q8_0 *b, const float *x) {
    __m256 p0 = _mm256_mul_ps(load8_i8(b->q), _mm256_loadu_ps(x));
    __m256 p1 = _mm256_mul_ps(load8_i8(b->q + 8), _mm256_loadu_ps(x + 8));
    p0 = _mm256_fmadd_ps(load8_i8(b->q + 16), _mm256_loadu_ps(x + 16), p0);
    p1 = _mm256_fmadd_ps(load8_i8(b->q + 24), _mm256_loadu_ps(x + 24), p1);
    return _mm256_add_ps(p0, p1);
}

/* Whole blocks only (n % 32 == 0), so there is no element tail; two blocks per step
 * into two accumulators, then a last odd block. */
static float dot_q8_0_avx2(const moas_block_q8_0 *w, const float *x, int32_t n) {
    const int32_t nb = n / MOAS_QK8_0;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int32_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const float *xb = x + (size_t)b * MOAS_QK8_0;
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d)), block_q8_0(&w[b], xb), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b + 1].d)),
                               block_q8_0(&w[b + 1], xb + MOAS_QK8_0), acc1);
    }
    for (; b < nb; b++) {
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(w[b].d)),
                               block_q8_0(&w[b], x + (size_t)b * MOAS_QK8_0), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* Each y[i] becomes fmaf(a, x[i], y[i]), whatever its position. Shared with the
 * avx512 table (see ops_avx512.c). */
void moas__axpy_f32_avx2(float *y, float a, const float *x, int32_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 y0 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i));
        __m256 y1 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8));
        __m256 y2 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 16), _mm256_loadu_ps(y + i + 16));
        __m256 y3 = _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i + 24), _mm256_loadu_ps(y + i + 24));
        _mm256_storeu_ps(y + i, y0);
        _mm256_storeu_ps(y + i + 8, y1);
        _mm256_storeu_ps(y + i + 16, y2);
        _mm256_storeu_ps(y + i + 24, y3);
    }
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) {
        y[i] = fmaf(a, x[i], y[i]);
    }
}

void moas__axpy_f16_avx2(float *y, float a, const uint16_t *x, int32_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256 y0 = _mm256_fmadd_ps(va, load8_f16(x + i), _mm256_loadu_ps(y + i));
        __m256 y1 = _mm256_fmadd_ps(va, load8_f16(x + i + 8), _mm256_loadu_ps(y + i + 8));
        __m256 y2 = _mm256_fmadd_ps(va, load8_f16(x + i + 16), _mm256_loadu_ps(y + i + 16));
        __m256 y3 = _mm256_fmadd_ps(va, load8_f16(x + i + 24), _mm256_loadu_ps(y + i + 24));
        _mm256_storeu_ps(y + i, y0);
        _mm256_storeu_ps(y + i + 8, y1);
        _mm256_storeu_ps(y + i + 16, y2);
        _mm256_storeu_ps(y + i + 24, y3);
    }
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8_f16(x + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) {
        y[i] = fmaf(a, _cvtsh_ss(x[i]), y[i]);
    }
}

#define MM_VEC __m256
#define MM_LANES 8
#define MM_ZERO() _mm256_setzero_ps()
#define MM_LOADX(p) _mm256_loadu_ps(p)
#define MM_LOAD_F16(p) load8_f16(p)
#define MM_LOAD_I8(p) load8_i8(p)
#define MM_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define MM_MUL(a, b) _mm256_mul_ps(a, b)
#define MM_SET1(f) _mm256_set1_ps(f)
#define MM_HSUM(v) hsum8(v)
#define MM_STORE(p, v) _mm256_storeu_ps(p, v)
#define MM_ADD(a, b) _mm256_add_ps(a, b)
#define MM_DIV(a, b) _mm256_div_ps(a, b)
#define MM_MAX(a, b) _mm256_max_ps(a, b)
#define MM_HMAX(v) hmax8(v)
#define MM_ABS(v) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)
#define MM_ROUND(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MM_POW2(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define MM_COPYSIGN(mag, sign)                                                            \
    _mm256_or_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), mag),                            \
                 _mm256_and_ps(_mm256_set1_ps(-0.0f), sign))
#define MM_TILE_ROWS 4
#define MM_TILE_TOKS 2
#define MM_DECODE_ROWS 8
#define MM_NAME(base) base##_avx2
#include "ops_simd.h"

const moas_ops moas__ops_avx2 = {
    .name = "avx2",
    .dot_f32 = moas__dot_f32_avx2,
    .dot_f16 = dot_f16_avx2,
    .dot_q8_0 = dot_q8_0_avx2,
    .matmul_f32 = matmul_f32_avx2,
    .matmul_f16 = matmul_f16_avx2,
    .matmul_q8_0 = matmul_q8_0_avx2,
    .attn_scores_f32 = attn_scores_f32_avx2,
    .attn_scores_f16 = attn_scores_f16_avx2,
    .attn_mix_f32 = attn_mix_f32_avx2,
    .attn_mix_f16 = attn_mix_f16_avx2,
    .softmax = softmax_avx2,
    .gelu = gelu_avx2,
    .axpy_f32 = moas__axpy_f32_avx2,
    .axpy_f16 = moas__axpy_f16_avx2,
};

#endif /* __x86_64__ */
