/*
 * ops_avx2.c - the "avx2" kernel table: x86-64 AVX2 + FMA + F16C, 8 floats per vector.
 *
 * Compiled with -mavx2 -mfma -mf16c for this file only (Makefile), so nothing here may
 * run before ops_select.c has seen those features. Off x86-64 the file defines
 * nothing.
 *
 * The kernels are ops_simd.h's, written once for both SIMD tables; this file gives
 * them the 256-bit vocabulary (the MM_* macros) and the helpers that take more than
 * one instruction: the sum of a vector's lanes in a fixed order (so a result depends
 * only on the values, never on alignment or threads), their maximum, and loads of
 * eight halves or eight int8 from any address, widened exactly. Loads are unaligned:
 * weight rows of an f16 or Q8_0 tensor start wherever the previous row ended. The
 * matmul tiles keep at least eight independent fused multiply-adds in flight, what
 * FMA needs to stay busy (latency four or five cycles, two issued per cycle): 8 rows
 * for one token, 4 rows x 3 tokens for a batch (12 chains, 3 token vectors and a
 * weight vector: all sixteen registers). On Zen 2 at 2 GHz the 4 x 3 tile ran 32-34
 * GFLOP/s of one core against 26-29 for 4 x 2 (bench_kernels, f32 over 128 tokens,
 * several runs), and batches widen f16 rows into a panel of floats once per chunk
 * (MM_F16_PANEL), which there took f16 from 18 to 27-35 GFLOP/s.
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

/* Eight lane sums at once, each taken in hsum8's order, so that lane i of the result
 * is bit for bit hsum8(v[2 i]) and lane 4 + i hsum8(v[2 i + 1]) (i < 4): at each level,
 * where hsum8 adds a vector's upper part to its lower part, this adds the parts of two
 * vectors at a time, packed into one (14 shuffles and 7 adds for eight sums, against
 * eight hsum8's 24 of each). */
static inline __m256 hsum8_x8(const __m256 *v) {
    __m256 w[4], z[2];
    /* unrolled, so that v and w stay in registers: as a loop, GCC kept them in memory */
    _Pragma("GCC unroll 4") for (int k = 0; k < 4; k++) {   /* lane i + lane i + 4 */
        w[k] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * k], v[2 * k + 1], 0x31));
    }
    _Pragma("GCC unroll 2") for (int k = 0; k < 2; k++) {   /* + lane i + 2, per 128 bits */
        z[k] = _mm256_add_ps(_mm256_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(w[2 * k], w[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    }
    return _mm256_add_ps(_mm256_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm256_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Scores of 4 keys x 2 queries from their chains (v[2 u + t]), times scale, query t's
 * four at out + t * lds. */
static inline void scores4x2(const __m256 *v, float scale, float *out, size_t lds) {
    const __m256 s = _mm256_mul_ps(hsum8_x8(v), _mm256_set1_ps(scale));
    _mm_storeu_ps(out, _mm256_castps256_ps128(s));
    _mm_storeu_ps(out + lds, _mm256_extractf128_ps(s, 1));
}

/* A matmul tile's lane sums at once (hsum8_x8, so each the bits of hsum8 of its
 * chain): `tokens` (1 or 2) tokens of 4 rows from v[2 u + t] (row u, token t), row u
 * of token t stored at y + t ldy + u; or one token's 8 rows from v[2 (r % 4) + r / 4],
 * stored at y + r. */
static inline void tile_sums_4x2(const __m256 *v, float *y, size_t ldy, int tokens) {
    const __m256 s = hsum8_x8(v);
    _mm_storeu_ps(y, _mm256_castps256_ps128(s));
    if (tokens == 2) {
        _mm_storeu_ps(y + ldy, _mm256_extractf128_ps(s, 1));
    }
}
static inline void tile_sums_8x1(const __m256 *v, float *y) {
    _mm256_storeu_ps(y, hsum8_x8(v));
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

/* Eight int8 from any address as the floats 1.5 2^23 + q: the integer added to the bits
 * of 1.5 2^23, no conversion. */
static inline __m256 load8_i8_biased(const int8_t *p) {
    return _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)),
                         _mm256_set1_epi32(0x4b400000)));
}

/* Eight floats, integers in [-127, 127], as int8 at any address. */
static inline void store8_i8(int8_t *p, __m256 v) {
    const __m256i i = _mm256_cvttps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)(void *)p, _mm_packs_epi16(w, w));
}

/* (v r) >> 32 in each 32-bit lane, r < 2^32: even and odd lanes as 64-bit products. */
static inline __m256i mulhi8_u32(__m256i v, uint32_t r) {
    const __m256i r64 = _mm256_set1_epi64x((long long)r);
    const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(v, r64), 32);
    const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(v, 32), r64);
    return _mm256_blend_epi32(even, odd, 0xAA);
}

#define MM_VEC __m256
#define MM_LANES 8
#define MM_IVEC __m256i
#define MM_ILOAD(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define MM_ISTORE(p, v) _mm256_storeu_si256((__m256i *)(void *)(p), v)
#define MM_ISET1(x) _mm256_set1_epi32((int)(x))
#define MM_IADD(a, b) _mm256_add_epi32(a, b)
#define MM_ISUB(a, b) _mm256_sub_epi32(a, b)
#define MM_IMULLO(a, b) _mm256_mullo_epi32(a, b)
#define MM_IAND(a, b) _mm256_and_si256(a, b)
#define MM_IOR(a, b) _mm256_or_si256(a, b)
#define MM_ISRL(v, n) _mm256_srl_epi32(v, _mm_cvtsi32_si128((int)(n)))
#define MM_ISLL(v, n) _mm256_sll_epi32(v, _mm_cvtsi32_si128((int)(n)))
#define MM_IMULHI(v, r) mulhi8_u32(v, r)
#define MM_IGATHER(base, idx) _mm256_i32gather_epi32((const int *)(const void *)(base), idx, 4)
#define MM_STORE_F16(p, v) \
    _mm_storeu_si128((__m128i *)(void *)(p), \
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
#define MM_NAN_MASK(v) ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
#define MM_ZERO() _mm256_setzero_ps()
#define MM_LOADX(p) _mm256_loadu_ps(p)
#define MM_LOAD_F16(p) load8_f16(p)
#define MM_LOAD_I8(p) load8_i8(p)
#define MM_LOAD_I8_BIASED(p) load8_i8_biased(p)
#define MM_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define MM_MUL(a, b) _mm256_mul_ps(a, b)
#define MM_SET1(f) _mm256_set1_ps(f)
#define MM_HSUM(v) hsum8(v)
#define MM_STORE(p, v) _mm256_storeu_ps(p, v)
#define MM_ADD(a, b) _mm256_add_ps(a, b)
#define MM_DIV(a, b) _mm256_div_ps(a, b)
#define MM_MAX(a, b) _mm256_max_ps(a, b)
#define MM_MIN(a, b) _mm256_min_ps(a, b)
#define MM_TRUNC(v) _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC)
#define MM_STORE_I8(p, v) store8_i8(p, v)
#define MM_HMAX(v) hmax8(v)
#define MM_ABS(v) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v)
#define MM_ROUND(v) _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define MM_POW2(n)                                                                        \
    _mm256_castsi256_ps(                                                                  \
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define MM_COPYSIGN(mag, sign)                                                            \
    _mm256_or_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), mag),                            \
                 _mm256_and_ps(_mm256_set1_ps(-0.0f), sign))
#define MM_TILE_ROWS 4
#define MM_TILE_TOKS 3
#define MM_DECODE_ROWS 8
#define MM_F16_PANEL 1   /* batches widen f16 rows once per chunk (ops_simd.h) */
#define MM_MIX_QUERIES 2   /* 8 output vectors + 4 value vectors of 16 registers */
#define MM_MIX_QUERIES_NARROW 2 /* no wider passes: the registers are taken */
#define MM_SCORE_QUERIES 2 /* 8 chains: 4 keys x 2 queries */
#define MM_SCORE_NV 4      /* head_dim 32: its scores' vector loop unrolled */
#define MM_SCORES_4xQ(acc, scale, out, lds) scores4x2(acc, scale, out, lds)
#define MM_TILE_SUMS_4x2(v, y, ldy, tokens) tile_sums_4x2(v, y, ldy, tokens)
#define MM_TILE_SUMS_8x1(v, y) tile_sums_8x1(v, y)
#define MM_NAME(base) base##_avx2
#include "ops_simd.h"

const moas_ops moas__ops_avx2 = {
    .name = "avx2",
    .matmul_f32 = matmul_f32_avx2,
    .matmul_f16 = matmul_f16_avx2,
    .matmul_q8_0 = matmul_q8_0_avx2,
    .attn_scores_f32 = attn_scores_f32_avx2,
    .attn_scores_f16 = attn_scores_f16_avx2,
    .attn_mix_f32 = attn_mix_f32_avx2,
    .attn_mix_f16 = attn_mix_f16_avx2,
    .attn_scores_q8_0 = attn_scores_q8_0_avx2,
    .attn_mix_q8_0 = attn_mix_q8_0_avx2,
    .max = max_avx2,
    .exp_sum = exp_sum_avx2,
    .softmax = softmax_avx2,
    .gelu = gelu_avx2,
    .kv_rows = kv_rows_avx2,
    .to_f16 = to_f16_avx2,
    .to_q8_0 = to_q8_0_avx2,
    .add = add_avx2,
};

#endif /* __x86_64__ */
