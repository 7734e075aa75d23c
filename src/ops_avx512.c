/*
 * ops_avx512.c - the "avx512" kernel table: x86-64 AVX-512F (+ FMA, F16C), 16 floats
 * per vector.
 *
 * Compiled with -mavx512f -mfma -mf16c for this file only (Makefile), so nothing here
 * may run before ops_select.c has seen those features, and AVX2 too: -mavx512f lets
 * the compiler use AVX2 instructions. Off x86-64 the file defines nothing.
 *
 * As in ops_avx2.c, the kernels are ops_simd.h's; this file gives them the 512-bit
 * vocabulary (the MM_* macros) and the helpers that take more than one instruction:
 * the sum of the sixteen lanes in a fixed order, and loads of sixteen halves or
 * sixteen int8 from any address, widened exactly.
 *
 * Where 512 bits pay, measured with tools/bench_kernels.c on Zen 5 (tables
 * interleaved; two runs on a busy 2-core machine). Blocks of 32 tokens: 1.9-2.3x
 * AVX2 for every weight type, each weight vector loaded serving four tokens. One
 * token: a row of 192 to 3072 in L1, 1.5-2.3x for f32 and f16 and 1.1-1.3x for Q8_0,
 * about equal at attention's head_dim 32-64; whole matrices from L2/L3, 1.1-1.3x for
 * f16 and 1.2-1.6x for Q8_0 (widening the weights, not memory, limits AVX2 there).
 * f32, with twice f16's bytes to move, gains least: 0.85-1.1x AVX2 on a 2.4 MB
 * matrix, 1.1-1.5x on 9.4 MB and 154 MB ones. Matrices streamed from memory (77 MB
 * f16, with MOAS_MM_STREAM) ranged from 0.7x to 1.8x AVX2 between runs on the shared
 * machine: memory, not the kernel, sets that pace. Attention over 256 keys at
 * head_dim 64: scores equal, the value sum 1.2x (f32) and 1.9x (f16).
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

/* Sixteen lane sums at once, each taken in hsum16's order, so that lane
 * 4 (i % 4) + i / 4 of the result is bit for bit hsum16(v[i]): at each level, where hsum16
 * adds a vector's upper half to its lower half, this adds the halves of two vectors
 * at a time, packed into one (2 shuffles and an add for two sums, instead of one
 * sum's 4 extractions and adds). For scores: v[4 u + t] (key u, query t) lands in
 * lane 4 t + u, each query's four keys side by side. */
static inline __m512 hsum16_x16(const __m512 *v) {
    __m512 w[8], z[4], y[2];
    _Pragma("GCC unroll 8")
    for (int k = 0; k < 8; k++) {   /* lane i + lane i + 8 */
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * k], v[2 * k + 1], 0xee));
    }
    _Pragma("GCC unroll 8")
    for (int k = 0; k < 4; k++) {   /* + lane i + 4 */
        z[k] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(w[2 * k], w[2 * k + 1], 0xdd));
    }
    _Pragma("GCC unroll 8")
    for (int k = 0; k < 2; k++) {   /* + lane i + 2, within each 128 bits */
        y[k] = _mm512_add_ps(_mm512_shuffle_ps(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(z[2 * k], z[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(y[0], y[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of 4 keys x 4 queries from their chains (v[4 u + t]), times scale, query t's
 * four at out + t * lds. */
static inline void scores4x4(const __m512 *v, float scale, float *out, size_t lds) {
    const __m512 s = _mm512_mul_ps(hsum16_x16(v), _mm512_set1_ps(scale));
    _mm_storeu_ps(out, _mm512_castps512_ps128(s));
    _mm_storeu_ps(out + lds, _mm512_extractf32x4_ps(s, 1));
    _mm_storeu_ps(out + 2 * lds, _mm512_extractf32x4_ps(s, 2));
    _mm_storeu_ps(out + 3 * lds, _mm512_extractf32x4_ps(s, 3));
}

/* A matmul tile's lane sums at once (hsum16_x16, so each the bits of hsum16 of its
 * chain): 4 tokens of `rows` (4 or 2) rows from v[4 u + t] (row u, token t), row u of
 * token t stored at y + t ldy + u; or one token's 8 rows from v[4 (r % 4) + r / 4]
 * (the other eight vectors anything), stored at y + r. Against one hsum16 per chain,
 * in one process: a single sequence's decode 1.03-1.04x, GPT-2's 16 sequences
 * 1.09-1.21x (bf06e72). */
static inline void tile_sums_4x4(const __m512 *v, float *y, size_t ldy, int rows) {
    const __m512 s = hsum16_x16(v);
    const __m128 t0 = _mm512_castps512_ps128(s), t1 = _mm512_extractf32x4_ps(s, 1);
    const __m128 t2 = _mm512_extractf32x4_ps(s, 2), t3 = _mm512_extractf32x4_ps(s, 3);
    if (rows == 4) {
        _mm_storeu_ps(y, t0);
        _mm_storeu_ps(y + ldy, t1);
        _mm_storeu_ps(y + 2 * ldy, t2);
        _mm_storeu_ps(y + 3 * ldy, t3);
        return;
    }
    _mm_storel_pi((__m64 *)(void *)y, t0);
    _mm_storel_pi((__m64 *)(void *)(y + ldy), t1);
    _mm_storel_pi((__m64 *)(void *)(y + 2 * ldy), t2);
    _mm_storel_pi((__m64 *)(void *)(y + 3 * ldy), t3);
}
static inline void tile_sums_8x1(const __m512 *v, float *y) {
    _mm256_storeu_ps(y, _mm512_castps512_ps256(hsum16_x16(v)));
}

/* Sixteen halves from any address, widened exactly. */
static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(const void *)p));
}

/* Sixteen int8 from any address, as floats (exact). */
static inline __m512 load16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)));
}

/* Sixteen int8 from any address as the floats 1.5 2^23 + q: the integer added to the bits
 * of 1.5 2^23, no conversion. */
static inline __m512 load16_i8_biased(const int8_t *p) {
    return _mm512_castsi512_ps(_mm512_add_epi32(
        _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(const void *)p)),
        _mm512_set1_epi32(0x4b400000)));
}

/* Sixteen floats, integers in [-127, 127], as int8 at any address. */
static inline void store16_i8(int8_t *p, __m512 v) {
    _mm_storeu_si128((__m128i *)(void *)p, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v)));
}

/* (v r) >> 32 in each 32-bit lane, r < 2^32: even and odd lanes as 64-bit products. */
static inline __m512i mulhi16_u32(__m512i v, uint32_t r) {
    const __m512i r64 = _mm512_set1_epi64((long long)r);
    const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(v, r64), 32);
    const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(v, 32), r64);
    return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

#define MM_VEC __m512
#define MM_LANES 16
#define MM_ZERO() _mm512_setzero_ps()
#define MM_LOADX(p) _mm512_loadu_ps(p)
#define MM_LOAD_F16(p) load16_f16(p)
#define MM_LOAD_I8(p) load16_i8(p)
#define MM_LOAD_I8_BIASED(p) load16_i8_biased(p)
#define MM_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define MM_MUL(a, b) _mm512_mul_ps(a, b)
#define MM_SET1(f) _mm512_set1_ps(f)
#define MM_HSUM(v) hsum16(v)
#define MM_STORE(p, v) _mm512_storeu_ps(p, v)
#define MM_ADD(a, b) _mm512_add_ps(a, b)
#define MM_DIV(a, b) _mm512_div_ps(a, b)
#define MM_MAX(a, b) _mm512_max_ps(a, b)
#define MM_MIN(a, b) _mm512_min_ps(a, b)
#define MM_TRUNC(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)
#define MM_STORE_I8(p, v) store16_i8(p, v)
#define MM_HMAX(v) _mm512_reduce_max_ps(v)
#define MM_ABS(v) _mm512_abs_ps(v)
#define MM_ROUND(v) _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MM_POW2(n)                                                                        \
    _mm512_castsi512_ps(                                                                  \
        _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define MM_COPYSIGN(mag, sign)                                                            \
    _mm512_castsi512_ps(_mm512_or_si512(                                                  \
        _mm512_and_si512(_mm512_castps_si512(mag), _mm512_set1_epi32(0x7fffffff)),        \
        _mm512_and_si512(_mm512_castps_si512(sign), _mm512_set1_epi32((int)0x80000000u))))
#define MM_TILE_ROWS 6   /* 6 x 4 beat 4 x 4 by 4-5% and 8 x 4, 4 x 8 (bench_kernels) */
#define MM_TILE_TOKS 4
#define MM_DECODE_ROWS 8
#define MM_MIX_QUERIES 4   /* 16 output vectors + 4 value vectors in registers */
#define MM_MIX_QUERIES_NARROW 8 /* heads of up to 2 vectors: 16 output vectors too */
#define MM_SCORE_QUERIES 4 /* 16 chains: 4 keys x 4 queries, summed by hsum16_x16 */
#define MM_SCORES_4xQ(acc, scale, out, lds) scores4x4(acc, scale, out, lds)
#define MM_TILE_SUMS_4x4(v, y, ldy, rows) tile_sums_4x4(v, y, ldy, rows)
#define MM_TILE_SUMS_8x1(v, y) tile_sums_8x1(v, y)
#define MM_IVEC __m512i
#define MM_ILOAD(p) _mm512_loadu_si512((const void *)(p))
#define MM_ISTORE(p, v) _mm512_storeu_si512((void *)(p), v)
#define MM_ISET1(x) _mm512_set1_epi32((int)(x))
#define MM_IADD(a, b) _mm512_add_epi32(a, b)
#define MM_ISUB(a, b) _mm512_sub_epi32(a, b)
#define MM_IMULLO(a, b) _mm512_mullo_epi32(a, b)
#define MM_IAND(a, b) _mm512_and_si512(a, b)
#define MM_IOR(a, b) _mm512_or_si512(a, b)
#define MM_ISRL(v, n) _mm512_srl_epi32(v, _mm_cvtsi32_si128((int)(n)))
#define MM_ISLL(v, n) _mm512_sll_epi32(v, _mm_cvtsi32_si128((int)(n)))
#define MM_IMULHI(v, r) mulhi16_u32(v, r)
#define MM_IGATHER(base, idx) _mm512_i32gather_epi32(idx, (const void *)(base), 4)
#define MM_STORE_F16(p, v) \
    _mm256_storeu_si256((__m256i *)(void *)(p), \
                        _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define MM_NAN_MASK(v) ((unsigned)_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q))
#define MM_NAME(base) base##_avx512
#include "ops_simd.h"

const moas_ops moas__ops_avx512 = {
    .name = "avx512",
    .matmul_f32 = matmul_f32_avx512,
    .matmul_f16 = matmul_f16_avx512,
    .matmul_q8_0 = matmul_q8_0_avx512,
    .attn_scores_f32 = attn_scores_f32_avx512,
    .attn_scores_f16 = attn_scores_f16_avx512,
    .attn_mix_f32 = attn_mix_f32_avx512,
    .attn_mix_f16 = attn_mix_f16_avx512,
    .attn_scores_q8_0 = attn_scores_q8_0_avx512,
    .attn_mix_q8_0 = attn_mix_q8_0_avx512,
    .max = max_avx512,
    .exp_sum = exp_sum_avx512,
    .softmax = softmax_avx512,
    .gelu = gelu_avx512,
    .kv_rows = kv_rows_avx512,
    .to_f16 = to_f16_avx512,
    .to_q8_0 = to_q8_0_avx512,
    .add = add_avx512,
};

#endif /* __x86_64__ */
