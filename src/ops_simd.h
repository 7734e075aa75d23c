/*
 * ops_simd.h - the kernels both SIMD tables share, written once over a vector
 * vocabulary, so the two widths cannot drift apart.
 *
 * Included by ops_avx2.c and ops_avx512.c after they define:
 *
 *   MM_VEC, MM_LANES          the vector type and its floats
 *   MM_ZERO(), MM_LOADX(p)    zero; MM_LANES floats from any address; MM_STORE(p, v)
 *   MM_LOAD_F16(p)            MM_LANES halves, widened; MM_LOAD_I8(p) int8 as floats;
 *   MM_LOAD_I8_BIASED(p)      int8 q as the floats 1.5 2^23 + q (an integer add)
 *   MM_FMA(a, b, c), MM_MUL(a, b), MM_ADD(a, b), MM_DIV(a, b), MM_MAX(a, b) and
 *   MM_MIN(a, b) (b's lane where either lane is a NaN), MM_SET1(f), MM_HSUM(v), MM_HMAX(v),
 *   MM_ABS(v), MM_ROUND(v) (to nearest, ties to even), MM_TRUNC(v) (toward zero),
 *   MM_POW2(n) (2^n for integral n in [-126, 127]), MM_COPYSIGN(mag, sign)
 *   MM_TILE_ROWS, MM_TILE_TOKS  the matmul tile for batches (rows x tokens)
 *   MM_DECODE_ROWS            matmul rows per step for a single token
 *   MM_MIX_QUERIES            queries per step of a value sum
 *   MM_MIX_QUERIES_NARROW     the same for heads of one or two vectors (>= MM_MIX_QUERIES)
 *   MM_SCORE_QUERIES, MM_SCORES_4xQ(acc, scale, out, lds)  queries per step of scores;
 *                             their lane sums times scale, stored (acc[4 key + query])
 *   MM_SCORE_NV               optional: heads of this many vectors get those scores with
 *                             the loop over the vectors unrolled (0 or absent: none)
 *   MM_F16_PANEL              optional: 1 to widen f16 rows of a batch into a panel
 *   MM_TILE_SUMS_4x4(v, y, ldy, rows), MM_TILE_SUMS_8x1(v, y)  optional (16 lanes),
 *   or MM_TILE_SUMS_4x2(v, y, ldy, tokens) and MM_TILE_SUMS_8x1(v, y)  (8 lanes):
 *                             a matmul tile's lane sums at once, each MM_HSUM's bits
 *   MM_IVEC, MM_ILOAD(p), MM_ISTORE(p, v)  MM_LANES uint32 lanes, from and to any address
 *   MM_ISET1(x), MM_IADD(a, b), MM_ISUB(a, b), MM_IMULLO(a, b), MM_IAND(a, b),
 *   MM_IOR(a, b), MM_ISRL(v, n), MM_ISLL(v, n) (every lane shifted by n < 32),
 *   MM_IMULHI(v, r) ((v r) >> 32 per lane, r < 2^32), MM_IGATHER(base, idx)
 *   MM_STORE_F16(p, v)        v as MM_LANES halves (to nearest even) at any address;
 *   MM_STORE_I8(p, v)         v, integers in [-127, 127], as MM_LANES int8 at any address;
 *   MM_NAN_MASK(v)            bit i set where lane i is a NaN
 *   MM_NAME(base)             base ## _ ## table name
 *
 * It defines the table's matmul_f32/f16/q8_0, attn_scores_f32/f16,
 * attn_mix_f32/f16, max, exp_sum, softmax, gelu, kv_rows, to_f16, to_q8_0 and add
 * (ops.h).
 */

/* ---- matrix products -------------------------------------------------------------
 *
 * Every output element has one accumulator: MM_LANES lanes, added to in column order
 * one vector step at a time (a Q8_0 weight being the float d * q), then the lanes
 * summed by MM_HSUM and the scalar tail added with fmaf in column order. A tile only
 * decides how many such chains run side by side, so an element's bits do not depend
 * on the tile it fell into: batches equal single tokens, threads may split the rows
 * anywhere.
 * Independence comes from the tile instead of from splitting one sum into several: a
 * tile of R x T outputs keeps R x T fused multiply-adds in flight, and each weight
 * vector loaded serves T tokens, each token vector R rows.
 */

#include "kv_cache.h"

#include <string.h>

#define MM_ALWAYS_INLINE static inline __attribute__((always_inline))
/* A single token's tile asks for the same bytes of the next tile as it goes: its rows
 * are short (hundreds of bytes), too short for the hardware prefetcher to get ahead of
 * eight streams. Measured on Zen 5 with a 5 MB f16 matrix in L3: 57-61 -> 78-81
 * GFLOP/s, f32 35 -> 43; two or four tiles ahead did worse. The last tile asks for
 * nothing, so no address past the matrix is formed; the stream prefetch below (8 KB on
 * in a row) still forms one over the last rows: a hint, never a load, it cannot fault. */
#define MM_PREFETCH_TILES 1
/* A row read front to back from memory (MOAS_MM_STREAM, f16) asks for the bytes 8 KB
 * on. GPT-2 small's 77 MB f16 output matrix alone, against the other loops in one
 * process: 43-45 GB/s with it, 35-36 without. Whole f16 decode, four rounds in
 * alternating order: 208-224 against 194-197 tokens/s at two threads, 93-112 against
 * 91-111 at one (ahead in three rounds of four). In f32 the same prefetch (4, 8 or
 * 16 KB on) made decode 5-30% slower in every round, so f32 rows take none. */
#define MM_STREAM_AHEAD 8192

/* Loads MM_LANES weights of row `row` (a byte pointer) at column i, as floats. */
MM_ALWAYS_INLINE MM_VEC mm_load_w_f32(const uint8_t *row, int32_t i) {
    return MM_LOADX((const float *)(const void *)row + i);
}
MM_ALWAYS_INLINE MM_VEC mm_load_w_f16(const uint8_t *row, int32_t i) {
    return MM_LOAD_F16((const uint16_t *)(const void *)row + i);
}
MM_ALWAYS_INLINE float mm_scalar_w_f32(const uint8_t *row, int32_t i) {
    return ((const float *)(const void *)row)[i];
}
MM_ALWAYS_INLINE float mm_scalar_w_f16(const uint8_t *row, int32_t i) {
    return _cvtsh_ss(((const uint16_t *)(const void *)row)[i]);
}

/* MM_LANES Q8_0 weights as the values d * q. The product is exact in float (an 11-bit
 * significand times a 7-bit integer), so a Q8_0 product is the f32 product over these
 * values, whether they are made once per token (mm_tile_q8_0: widen q, convert,
 * multiply) or once for a group of tokens (mm_panel_q8_0: q rides in the significand
 * of 1.5 2^23 + q, an integer add, and one fused multiply-add takes
 * d (1.5 2^23 + q) - d 1.5 2^23 with a single rounding; 5-8% faster there). The two
 * agree on every finite d; an infinite or NaN d takes the multiply in both. */
MM_ALWAYS_INLINE MM_VEC mm_q8_0_values(MM_VEC d, const int8_t *q) {
    return MM_MUL(d, MM_LOAD_I8(q));
}
MM_ALWAYS_INLINE MM_VEC mm_q8_0_values_fma(MM_VEC d, MM_VEC minus_d_bias, const int8_t *q) {
    return MM_FMA(d, MM_LOAD_I8_BIASED(q), minus_d_bias);
}

/* Byte offset of column i in an f32 or f16 row. */
#define MM_WOFF_f32(i) ((size_t)(i) * 4)
#define MM_WOFF_f16(i) ((size_t)(i) * 2)

#define MM_TILE_MAX_R (MM_TILE_ROWS > MM_DECODE_ROWS ? MM_TILE_ROWS : MM_DECODE_ROWS)
#define MM_TILE_MAX_T MM_TILE_TOKS

/* An R x T tile's sums when no scalar tail follows, several chains reduced together
 * where the table can (MM_TILE_SUMS_*: 4 x 4 and 6 x 4, the 16-lane batch tiles, 4 x 3
 * and 4 x 2, the 8-lane ones, and 8 x 1, a single token's); returns 0 where it cannot,
 * leaving them to MM_HSUM one by one.
 * Either way each sum has MM_HSUM's bits. */
MM_ALWAYS_INLINE int mm_tile_sums(MM_VEC acc[MM_TILE_MAX_R][MM_TILE_MAX_T], const int R,
                                  const int T, float *y, size_t ldy) {
#if defined(MM_TILE_SUMS_4x4) && defined(MM_TILE_SUMS_8x1)
    MM_VEC v[16];
    if (T == 4 && (R == 4 || R == 6 || R == 8)) {
        for (int r0 = 0; r0 < R; r0 += 4) {
            const int rows = R - r0 < 4 ? R - r0 : 4;
            _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
                _Pragma("GCC unroll 4") for (int t = 0; t < 4; t++) {
                    v[4 * u + t] = u < rows ? acc[r0 + u][t] : MM_ZERO();
                }
            }
            MM_TILE_SUMS_4x4(v, y + r0, ldy, rows);
        }
        return 1;
    }
    if (T == 1 && R == 8) {
        _Pragma("GCC unroll 8") for (int r = 0; r < 8; r++) {
            v[4 * (r % 4) + r / 4] = acc[r][0];
            v[4 * (r % 4) + r / 4 + 2] = MM_ZERO();
        }
        MM_TILE_SUMS_8x1(v, y);
        return 1;
    }
#elif defined(MM_TILE_SUMS_4x2) && defined(MM_TILE_SUMS_8x1)
    MM_VEC v[8];
    if ((T == 2 || T == 3) && R == 4) {
        for (int t0 = 0; t0 < T; t0 += 2) {   /* tokens t0 and t0 + 1 (if there is one) */
            const int tokens = T - t0 < 2 ? T - t0 : 2;
            _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {
                v[2 * u] = acc[u][t0];
                v[2 * u + 1] = tokens == 2 ? acc[u][t0 + 1] : acc[u][t0];
            }
            MM_TILE_SUMS_4x2(v, y + (size_t)t0 * ldy, ldy, tokens);
        }
        return 1;
    }
    if (T == 1 && R == 8) {
        _Pragma("GCC unroll 4") for (int r = 0; r < 4; r++) {
            v[2 * r] = acc[r][0];
            v[2 * r + 1] = acc[r + 4][0];
        }
        MM_TILE_SUMS_8x1(v, y);
        return 1;
    }
#endif
    (void)acc, (void)R, (void)T, (void)y, (void)ldy;
    return 0;
}

/* An R x T tile (R, T, P compile-time constants after inlining) over columns [0, n).
 * P: 0 no software prefetch; 1 rows [pr0, pr1) of the next tile (R rows on) at the
 * same column; 2 MM_STREAM_AHEAD bytes on in the matrix, for one row read front to
 * back.
 * A tile may cover the columns in pieces: all but the last piece a multiple of
 * MM_LANES wide, `first` starting the chains at zero instead of taking them from
 * `chains` (element [t * MM_TILE_MAX_R + r]), `last` finishing them into y instead of
 * leaving them there. Storing a chain and loading it back changes no bit. */
#define MM_DEFINE_TILE(type)                                                               \
    MM_ALWAYS_INLINE void mm_tile_##type(const uint8_t *w, size_t row_bytes, const float *x,  \
                                         size_t ldx, int32_t n, float *y, size_t ldy,      \
                                         const int R, const int T, const int P,            \
                                         MM_VEC *chains, int first, int last, int pr0,     \
                                         int pr1) {                                        \
        MM_VEC acc[MM_TILE_MAX_R][MM_TILE_MAX_T];                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                          \
                acc[r][t] = first ? MM_ZERO() : chains[t * MM_TILE_MAX_R + r];             \
            }                                                                              \
        }                                                                                  \
        int32_t i = 0;                                                                     \
        for (; i + MM_LANES <= n; i += MM_LANES) {                                         \
            MM_VEC xv[MM_TILE_MAX_T];                                                      \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                          \
                xv[t] = MM_LOADX(x + (size_t)t * ldx + i);                                 \
            }                                                                              \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                          \
                if (P == 1 && r >= pr0 && r < pr1) {                                       \
                    __builtin_prefetch(w + (size_t)(r + MM_PREFETCH_TILES * R) * row_bytes + \
                                       MM_WOFF_##type(i));                                 \
                } else if (P == 2) {                                                       \
                    __builtin_prefetch(w + (size_t)r * row_bytes + MM_WOFF_##type(i) +       \
                                       MM_STREAM_AHEAD);                                   \
                }                                                                          \
                const MM_VEC wv = mm_load_w_##type(w + (size_t)r * row_bytes, i);          \
                _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                      \
                    acc[r][t] = MM_FMA(wv, xv[t], acc[r][t]);                              \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        if (last && i == n && mm_tile_sums(acc, R, T, y, ldy)) {                           \
            return;                                                                        \
        }                                                                                  \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                          \
                if (!last) {                                                               \
                    chains[t * MM_TILE_MAX_R + r] = acc[r][t];                             \
                    continue;                                                              \
                }                                                                          \
                float sum = MM_HSUM(acc[r][t]);                                            \
                for (int32_t j = i; j < n; j++) {                                          \
                    sum = fmaf(mm_scalar_w_##type(w + (size_t)r * row_bytes, j),           \
                               x[(size_t)t * ldx + j], sum);                               \
                }                                                                          \
                y[(size_t)t * ldy + r] = sum;                                              \
            }                                                                              \
        }                                                                                  \
    }

MM_DEFINE_TILE(f32)
MM_DEFINE_TILE(f16)

/* The Q8_0 tile computes what MM_DEFINE_TILE(q8_0) would, a block at a time: each
 * row's scale is widened once per block instead of once per vector step, which
 * kept a single token's product 25% slower. */
MM_ALWAYS_INLINE void mm_tile_q8_0(const uint8_t *w, size_t row_bytes, const float *x,
                                   size_t ldx, int32_t n, float *y, size_t ldy, const int R,
                                   const int T, const int P, MM_VEC *chains, int first,
                                   int last, int pr0, int pr1) {
    enum { STEPS = MOAS_QK8_0 / MM_LANES };
    MM_VEC acc[MM_TILE_MAX_R][MM_TILE_MAX_T];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
            acc[r][t] = first ? MM_ZERO() : chains[t * MM_TILE_MAX_R + r];
        }
    }
    for (int32_t b = 0; b < n / MOAS_QK8_0; b++) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            const moas_block_q8_0 *blk =
                (const moas_block_q8_0 *)(const void *)(w + (size_t)r * row_bytes) + b;
            if (P && r >= pr0 && r < pr1) {
                __builtin_prefetch((const uint8_t *)blk +
                                   (size_t)MM_PREFETCH_TILES * R * row_bytes);
            }
            const MM_VEC d = MM_SET1(_cvtsh_ss(blk->d));
            _Pragma("GCC unroll 8") for (int k = 0; k < STEPS; k++) {
                const MM_VEC wv = mm_q8_0_values(d, blk->q + k * MM_LANES);
                _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
                    const float *xb = x + (size_t)t * ldx + (size_t)b * MOAS_QK8_0;
                    acc[r][t] = MM_FMA(wv, MM_LOADX(xb + k * MM_LANES), acc[r][t]);
                }
            }
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
            if (last) {
                y[(size_t)t * ldy + r] = MM_HSUM(acc[r][t]);
            } else {
                chains[t * MM_TILE_MAX_R + r] = acc[r][t];
            }
        }
    }
}

/* ---- a batch of tokens ------------------------------------------------------------
 *
 * R rows (one tile's) against every token of the batch, in tiles of MM_TILE_TOKS
 * tokens. Rows wider than MM_CHUNK_COLS are taken a chunk of columns at a time, for
 * groups of MM_GROUP_TOKS tokens, the chains carried from chunk to chunk: a chunk of
 * the tile's rows (6 x 1024 f32, 24 KB) stays in L1 while the group's tokens pass,
 * where a whole 3072-wide row tile (72 KB) would come from L2 for every token tile.
 * Q8_0 rows are first made into floats (mm_panel_q8_0), a chunk at a time, and the
 * f32 tile runs over them: made in the tile itself, the values would cost a multiply
 * and two conversions per weight vector per token tile; here, once per chunk and
 * group (once per row tile when the rows fit one chunk). */
#define MM_CHUNK_COLS 1024
#define MM_GROUP_TOKS (32 / MM_TILE_TOKS * MM_TILE_TOKS)

MM_ALWAYS_INLINE void mm_panel_q8_0(const uint8_t *w, size_t row_bytes, int32_t c0, int32_t kc,
                                    float *panel, const int R) {
    for (int r = 0; r < R; r++) {
        const moas_block_q8_0 *blk =
            (const moas_block_q8_0 *)(const void *)(w + (size_t)r * row_bytes) + c0 / MOAS_QK8_0;
        for (int32_t b = 0; b < kc / MOAS_QK8_0; b++, blk++) {
            float *out = panel + (size_t)r * kc + b * MOAS_QK8_0;
            const MM_VEC d = MM_SET1(_cvtsh_ss(blk->d));
            if ((blk->d & 0x7c00) == 0x7c00) {   /* infinite or NaN */
                _Pragma("GCC unroll 8") for (int k = 0; k < MOAS_QK8_0 / MM_LANES; k++) {
                    MM_STORE(out + k * MM_LANES, mm_q8_0_values(d, blk->q + k * MM_LANES));
                }
                continue;
            }
            const MM_VEC minus_d_bias = MM_MUL(d, MM_SET1(-12582912.0f));
            _Pragma("GCC unroll 8") for (int k = 0; k < MOAS_QK8_0 / MM_LANES; k++) {
                MM_STORE(out + k * MM_LANES,
                         mm_q8_0_values_fma(d, minus_d_bias, blk->q + k * MM_LANES));
            }
        }
    }
}

/* Tokens [0, n_tok) of x against columns [0, kc) of R rows w (f32 or f16, or a Q8_0
 * panel passed as f32), token t's chains at chains[t * MM_TILE_MAX_R]. With `ahead`
 * (rows read from the matrix itself) the token tiles ask for the next row tile's
 * bytes as they go, each for its share of the rows: token tile j of n_tiles for rows
 * [ceil(j R / n_tiles), ceil((j + 1) R / n_tiles)). A batched decode step of 16 tokens
 * serves each row tile to four token tiles only, and GPT-2's rows come from memory:
 * asked for by the first token tile alone, the next tile's 9 KB came in stalled (one
 * step of 16 sequences 1.16-1.18x faster spread, docs/PERFORMANCE_HISTORY.md,
 * "Asking for the next rows across the pass"). */
MM_ALWAYS_INLINE int mm_ask_from(int32_t j, int32_t n_tiles, const int R) {
    return (int)((j * R + n_tiles - 1) / n_tiles);
}

#define MM_DEFINE_TILES(type)                                                              \
    /* a tile of T tokens that asks for rows [pr0, pr1) of the next row tile: P, a        \
     * compile-time constant, chosen at run time */                                        \
    MM_ALWAYS_INLINE void mm_ask_##type(const uint8_t *w, size_t row_bytes, const float *x, \
                                        size_t ldx, int32_t kc, float *y, size_t ldy,      \
                                        const int R, const int T, int pr0, int pr1,        \
                                        MM_VEC *chains, int first, int last) {             \
        if (pr0 < pr1) {                                                                   \
            mm_tile_##type(w, row_bytes, x, ldx, kc, y, ldy, R, T, 1, chains, first, last,  \
                           pr0, pr1);                                                      \
        } else {                                                                           \
            mm_tile_##type(w, row_bytes, x, ldx, kc, y, ldy, R, T, 0, chains, first, last,  \
                           0, 0);                                                          \
        }                                                                                  \
    }                                                                                      \
    MM_ALWAYS_INLINE void mm_tiles_##type(const uint8_t *w, size_t row_bytes, const float *x, \
                                          size_t ldx, int32_t n_tok, int32_t kc, float *y, \
                                          size_t ldy, const int R, MM_VEC *chains,         \
                                          int first, int last, const int ahead) {          \
        const int32_t n_tiles = (n_tok + MM_TILE_TOKS - 1) / MM_TILE_TOKS;                 \
        int32_t t = 0, j = 0;                                                              \
        for (; t + MM_TILE_TOKS <= n_tok; t += MM_TILE_TOKS, j++) {                        \
            mm_ask_##type(w, row_bytes, x + (size_t)t * ldx, ldx, kc, y + (size_t)t * ldy, \
                          ldy, R, MM_TILE_TOKS, ahead ? mm_ask_from(j, n_tiles, R) : 0,    \
                          ahead ? mm_ask_from(j + 1, n_tiles, R) : 0,                      \
                          chains + (size_t)t * MM_TILE_MAX_R, first, last);                \
        }                                                                                  \
        /* the last n_tok mod MM_TILE_TOKS tokens in one tile */                           \
        const int32_t left = n_tok - t;                                                    \
        const int pr0 = ahead ? mm_ask_from(j, n_tiles, R) : 0;                            \
        const int pr1 = ahead ? R : 0;                                                     \
        x += (size_t)t * ldx;                                                              \
        y += (size_t)t * ldy;                                                              \
        chains += (size_t)t * MM_TILE_MAX_R;                                               \
        if (MM_TILE_TOKS > 3 && left == 3) {                                               \
            mm_ask_##type(w, row_bytes, x, ldx, kc, y, ldy, R, 3, pr0, pr1, chains, first, \
                          last);                                                           \
        } else if (MM_TILE_TOKS > 2 && left == 2) {                                        \
            mm_ask_##type(w, row_bytes, x, ldx, kc, y, ldy, R, 2, pr0, pr1, chains, first, \
                          last);                                                           \
        } else if (left == 1) {                                                            \
            mm_ask_##type(w, row_bytes, x, ldx, kc, y, ldy, R, 1, pr0, pr1, chains, first, \
                          last);                                                           \
        }                                                                                  \
    }

MM_DEFINE_TILES(f32)
MM_DEFINE_TILES(f16)

/* f16 rows made into floats first, a chunk at a time, as Q8_0's are (MM_F16_PANEL, a
 * table's choice): an AVX2 tile widening each weight vector again for every token tile
 * spent more on the conversions than on the products (Zen 2: 18 GFLOP/s for f16
 * against 27 for f32 over 128 tokens, bench_kernels). The widening is exact, so the
 * products over the panel have the bits of the f16 tile's. Only for more tokens than
 * one tile: a lone tile would widen each vector once either way. */
#ifndef MM_F16_PANEL
#define MM_F16_PANEL 0
#endif
MM_ALWAYS_INLINE void mm_panel_f16(const uint8_t *w, size_t row_bytes, int32_t c0, int32_t kc,
                                   float *panel, const int R) {
    for (int r = 0; r < R; r++) {
        const uint16_t *row = (const uint16_t *)(const void *)(w + (size_t)r * row_bytes) + c0;
        float *out = panel + (size_t)r * kc;
        int32_t i = 0;
        for (; i + MM_LANES <= kc; i += MM_LANES) {
            MM_STORE(out + i, MM_LOAD_F16(row + i));
        }
        for (; i < kc; i++) {
            out[i] = _cvtsh_ss(row[i]);
        }
    }
}

/* The tiles of the panel (R rows of kc floats, made of columns [c0, c0 + kc) of the
 * rows at w); with `ahead` each token tile first asks for its share of the next row
 * tile's bytes of these columns (mm_tiles' shares), a few lines at a time, so that the
 * next panel is made from rows already on their way. */
MM_ALWAYS_INLINE void mm_panel_tiles(const uint8_t *next, size_t row_bytes, size_t bytes,
                                     const float *panel, int32_t kc, const float *x,
                                     size_t ldx, int32_t n_tok, float *y, size_t ldy,
                                     const int R, MM_VEC *chains, int first, int last,
                                     int ahead) {
    const size_t panel_row = (size_t)kc * sizeof(float);
    if (!ahead) {
        mm_tiles_f32((const uint8_t *)panel, panel_row, x, ldx, n_tok, kc, y, ldy, R, chains,
                     first, last, 0);
        return;
    }
    const int32_t n_tiles = (n_tok + MM_TILE_TOKS - 1) / MM_TILE_TOKS;
    for (int32_t t = 0, j = 0; t < n_tok; t += MM_TILE_TOKS, j++) {
        for (int r = mm_ask_from(j, n_tiles, R); r < mm_ask_from(j + 1, n_tiles, R); r++) {
            const uint8_t *row = next + (size_t)r * row_bytes;
            for (size_t b = 0; b < bytes; b += 64) {
                __builtin_prefetch(row + b);
            }
            __builtin_prefetch(row + bytes - 1);   /* the last line, where rows are unaligned */
        }
        const int32_t tt = n_tok - t < MM_TILE_TOKS ? n_tok - t : MM_TILE_TOKS;
        mm_tiles_f32((const uint8_t *)panel, panel_row, x + (size_t)t * ldx, ldx, tt, kc,
                     y + (size_t)t * ldy, ldy, R, chains + (size_t)t * MM_TILE_MAX_R, first,
                     last, 0);
    }
}

/* Columns [c0, c0 + kc) of R rows against n_tok tokens: f32 rows as they are, f16 rows
 * likewise or made into `panel` first (MM_F16_PANEL), Q8_0 rows made into `panel`
 * first (MM_PANEL_FLOATS_##type floats; one, unused, where no panel is made). */
#define MM_PANEL_FLOATS_f32 1
#define MM_PANEL_FLOATS_f16 (MM_F16_PANEL ? MM_TILE_ROWS * MM_CHUNK_COLS : 1)
#define MM_PANEL_FLOATS_q8_0 (MM_TILE_ROWS * MM_CHUNK_COLS)

MM_ALWAYS_INLINE void mm_chunk_f32(const uint8_t *w, size_t row_bytes, int32_t c0, int32_t kc,
                                   const float *x, size_t ldx, int32_t n_tok, float *y,
                                   size_t ldy, const int R, MM_VEC *chains, int first,
                                   int last, float *panel, int ahead) {
    (void)panel;
    mm_tiles_f32(w + MM_WOFF_f32(c0), row_bytes, x, ldx, n_tok, kc, y, ldy, R, chains, first,
                 last, ahead);
}

MM_ALWAYS_INLINE void mm_chunk_f16(const uint8_t *w, size_t row_bytes, int32_t c0, int32_t kc,
                                   const float *x, size_t ldx, int32_t n_tok, float *y,
                                   size_t ldy, const int R, MM_VEC *chains, int first,
                                   int last, float *panel, int ahead) {
    if (!MM_F16_PANEL || n_tok <= MM_TILE_TOKS) {
        (void)panel;
        mm_tiles_f16(w + MM_WOFF_f16(c0), row_bytes, x, ldx, n_tok, kc, y, ldy, R, chains,
                     first, last, ahead);
        return;
    }
    mm_panel_f16(w, row_bytes, c0, kc, panel, R);
    mm_panel_tiles(w + (size_t)R * row_bytes + MM_WOFF_f16(c0), row_bytes, MM_WOFF_f16(kc),
                   panel, kc, x, ldx, n_tok, y, ldy, R, chains, first, last, ahead);
}

MM_ALWAYS_INLINE void mm_chunk_q8_0(const uint8_t *w, size_t row_bytes, int32_t c0, int32_t kc,
                                    const float *x, size_t ldx, int32_t n_tok, float *y,
                                    size_t ldy, const int R, MM_VEC *chains, int first,
                                    int last, float *panel, int ahead) {
    mm_panel_q8_0(w, row_bytes, c0, kc, panel, R);
    mm_panel_tiles(w + (size_t)R * row_bytes + (size_t)(c0 / MOAS_QK8_0) * sizeof(moas_block_q8_0),
                   row_bytes, (size_t)(kc / MOAS_QK8_0) * sizeof(moas_block_q8_0), panel, kc, x,
                   ldx, n_tok, y, ldy, R, chains, first, last, ahead);
}

/* The batch of R rows, a chunk of columns and a group of tokens at a time; `ahead`:
 * R more rows follow in the matrix, worth asking for (mm_tiles). */
#define MM_DEFINE_ROWS(type)                                                               \
    MM_ALWAYS_INLINE void mm_rows_##type(const uint8_t *w, size_t row_bytes, const float *x, \
                                         size_t ldx, int32_t n_tok, int32_t n, float *y,   \
                                         size_t ldy, const int R, int ahead) {             \
        MM_VEC chains[MM_GROUP_TOKS * MM_TILE_MAX_R];                                      \
        float panel[MM_PANEL_FLOATS_##type] __attribute__((aligned(64)));                  \
        const int32_t group = n <= MM_CHUNK_COLS ? n_tok : MM_GROUP_TOKS;                  \
        for (int32_t g = 0; g < n_tok; g += group) {                                       \
            const int32_t g_tok = n_tok - g < group ? n_tok - g : group;                   \
            for (int32_t c0 = 0; c0 < n; c0 += MM_CHUNK_COLS) {                            \
                const int32_t kc = n - c0 < MM_CHUNK_COLS ? n - c0 : MM_CHUNK_COLS;        \
                mm_chunk_##type(w, row_bytes, c0, kc, x + (size_t)g * ldx + c0, ldx, g_tok, \
                                y + (size_t)g * ldy, ldy, R, chains, c0 == 0, c0 + kc == n, \
                                panel, ahead);                                             \
            }                                                                              \
        }                                                                                  \
    }

MM_DEFINE_ROWS(f32)
MM_DEFINE_ROWS(f16)
MM_DEFINE_ROWS(q8_0)

/* The driver: rows outer, so a tile's weight rows stay in L1 while every token of the
 * batch passes over them; the tokens (at most a prefill block) stay in L2. A single
 * token takes MM_DECODE_ROWS rows at a time, prefetching the next tile's (P = 1),
 * or, with MOAS_MM_STREAM and f32 or f16 weights, one row at a time front to back
 * (f16 with a prefetch MM_STREAM_AHEAD on, P = 2): on a model streamed from memory
 * (GPT-2 small in f16, Zen 5) that read 20-25% more bytes per second than eight
 * interleaved rows, which in turn win by 15-25% when the weights are in cache. Q8_0
 * keeps the tile, which the stream order made 20-40% slower. */
#define MM_STREAMS_f32 1
#define MM_STREAMS_f16 1
#define MM_STREAMS_q8_0 0
#define MM_STREAM_PREFETCH_f32 0
#define MM_STREAM_PREFETCH_f16 1
#define MM_STREAM_PREFETCH_q8_0 0
#define MM_DEFINE_MATMUL(type)                                                             \
    static void MM_NAME(matmul_##type)(const void *w_, size_t row_bytes, int32_t n_rows,   \
                                       const float *x, size_t ldx, int32_t n_tok, int32_t n, \
                                       float *y, size_t ldy, unsigned hints) {             \
        const uint8_t *w = w_;                                                             \
        int32_t r = 0;                                                                     \
        if (n_tok == 1) {                                                                  \
            if (!(MM_STREAMS_##type && (hints & MOAS_MM_STREAM))) {                        \
                for (; r + 2 * MM_DECODE_ROWS <= n_rows; r += MM_DECODE_ROWS) {            \
                    mm_tile_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n, y + r, \
                                   ldy, MM_DECODE_ROWS, 1, 1, NULL, 1, 1, 0,               \
                                   MM_DECODE_ROWS);                                        \
                }                                                                          \
                if (r + MM_DECODE_ROWS <= n_rows) { /* the last tile: no next to ask for */ \
                    mm_tile_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n, y + r, \
                                   ldy, MM_DECODE_ROWS, 1, 0, NULL, 1, 1, 0, 0);           \
                    r += MM_DECODE_ROWS;                                                   \
                }                                                                          \
            }                                                                              \
            const bool ahead = MM_STREAM_PREFETCH_##type && (hints & MOAS_MM_STREAM);      \
            for (; r < n_rows; r++) {                                                      \
                if (ahead) {                                                               \
                    mm_tile_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n, y + r, \
                                   ldy, 1, 1, 2, NULL, 1, 1, 0, 0);                        \
                } else {                                                                   \
                    mm_tile_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n, y + r, \
                                   ldy, 1, 1, 0, NULL, 1, 1, 0, 0);                        \
                }                                                                          \
            }                                                                              \
            return;                                                                        \
        }                                                                                  \
        for (; r + MM_TILE_ROWS <= n_rows; r += MM_TILE_ROWS) {                            \
            mm_rows_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n_tok, n, y + r,  \
                           ldy, MM_TILE_ROWS, r + 2 * MM_TILE_ROWS <= n_rows);             \
        }                                                                                  \
        for (; r < n_rows; r++) {                                                          \
            mm_rows_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n_tok, n, y + r,  \
                           ldy, 1, r + 2 <= n_rows);                                       \
        }                                                                                  \
    }

MM_DEFINE_MATMUL(f32)
MM_DEFINE_MATMUL(f16)
MM_DEFINE_MATMUL(q8_0)

/* ---- attention of one query head ------------------------------------------------
 *
 * Scores: each one chain of MM_LANES lanes over head_dim, MM_HSUM, the scalar tail,
 * times scale; four keys at a time for independent chains, which does not change a
 * score's bits. Value sum: the output columns stay in registers (up to four vectors at
 * a time, for up to MM_MIX_QUERIES queries) while every key's row passes, each
 * element fused-multiply-added in key order onto what out held, tail columns likewise
 * with fmaf; so a sum split into runs of keys gives what one call over all of them
 * gives, and a query's sums do not depend on the queries beside it. */

MM_ALWAYS_INLINE MM_VEC mm_load_kv_f32(const uint8_t *row, int32_t i) {
    return MM_LOADX((const float *)(const void *)row + i);
}
MM_ALWAYS_INLINE MM_VEC mm_load_kv_f16(const uint8_t *row, int32_t i) {
    return MM_LOAD_F16((const uint16_t *)(const void *)row + i);
}

/* Q8_0 rows of K/V: head_dim a multiple of 32, so MM_LANES elements at i (a multiple
 * of MM_LANES) lie in one block and there is never a scalar tail. */
MM_ALWAYS_INLINE MM_VEC mm_load_kv_q8_0(const uint8_t *row, int32_t i) {
    const moas_block_q8_0 *b = (const moas_block_q8_0 *)(const void *)row + i / MOAS_QK8_0;
    return mm_q8_0_values(MM_SET1(_cvtsh_ss(b->d)), b->q + i % MOAS_QK8_0);
}

/* One element of a K/V row of kind 0 (f32), 1 (f16) or 2 (Q8_0), for the tails. */
MM_ALWAYS_INLINE float mm_scalar_kv(const uint8_t *row, int32_t i, int kind) {
    if (kind == 2) {
        const moas_block_q8_0 *b = (const moas_block_q8_0 *)(const void *)row + i / MOAS_QK8_0;
        return _cvtsh_ss(b->d) * (float)b->q[i % MOAS_QK8_0];
    }
    return kind == 1 ? mm_scalar_w_f16(row, i) : mm_scalar_w_f32(row, i);
}

MM_ALWAYS_INLINE float mm_score_tail(float sum, const uint8_t *row, const float *q, int32_t i,
                                     int32_t head_dim, int kind) {
    for (; i < head_dim; i++) {
        sum = fmaf(mm_scalar_kv(row, i, kind), q[i], sum);
    }
    return sum;
}

/* Bytes of a K/V row of head_dim elements of each kind. */
#define MM_KV_ROW_BYTES_f32(head_dim) ((size_t)(head_dim) * 4)
#define MM_KV_ROW_BYTES_f16(head_dim) ((size_t)(head_dim) * 2)
#define MM_KV_ROW_BYTES_q8_0(head_dim) ((size_t)(head_dim) / MOAS_QK8_0 * sizeof(moas_block_q8_0))

/* One query's scores go MM_SCORE_KEYS keys at a time, as MM_SCORES_4xQ's 4 keys x
 * MM_SCORE_QUERIES queries: chain c is key MM_SCORE_KEY(c). */
#define MM_SCORE_KEYS (4 * MM_SCORE_QUERIES)
#define MM_SCORE_KEY(c) (4 * ((c) % MM_SCORE_QUERIES) + (c) / MM_SCORE_QUERIES)

/* Heads of MM_SCORE_NV whole vectors (0: none) take the scores of several queries
 * with the loop over their vectors unrolled at compile time. */
#ifndef MM_SCORE_NV
#define MM_SCORE_NV 0
#endif

#define MM_DEFINE_ATTN(type, kind)                                                         \
    /* One query against its keys MM_SCORE_KEYS at a time, of NV whole vectors each (NV \
     * a compile-time constant after inlining), up to the last whole group; returns how    \
     * many keys it took. The query sits in registers and each key's chain runs to its    \
     * end before the next key's (its row found once, not kept while the others run);     \
     * chain MM_SCORE_QUERIES u + t is key 4 t + u (MM_SCORE_KEY), so MM_SCORES_4xQ's     \
     * "query t, key u" lands at scores[4 t + u]. Each chain adds the same products in    \
     * the same order as mm_scores_'s loop over the vectors: the same bits. */            \
    MM_ALWAYS_INLINE int32_t mm_scores_one_##type(const void *k, const uint32_t *rows,     \
                                                  int32_t n, const float *q,               \
                                                  size_t row_bytes, float scale,           \
                                                  float *scores, const int NV) {           \
        MM_VEC qv[4];                                                                      \
        _Pragma("GCC unroll 4") for (int i = 0; i < NV; i++) {                             \
            qv[i] = MM_LOADX(q + i * MM_LANES);                                            \
        }                                                                                  \
        int32_t j = 0;                                                                     \
        for (; j + MM_SCORE_KEYS <= n; j += MM_SCORE_KEYS) {                               \
            MM_VEC accs[MM_SCORE_KEYS];                                                    \
            _Pragma("GCC unroll 16") for (int c = 0; c < MM_SCORE_KEYS; c++) {             \
                const uint8_t *r = (const uint8_t *)k + rows[j + MM_SCORE_KEY(c)] * row_bytes; \
                MM_VEC a = MM_ZERO();                                                      \
                _Pragma("GCC unroll 4") for (int i = 0; i < NV; i++) {                     \
                    a = MM_FMA(mm_load_kv_##type(r, i * MM_LANES), qv[i], a);              \
                }                                                                          \
                accs[c] = a;                                                               \
            }                                                                              \
            MM_SCORES_4xQ(accs, scale, scores + j, 4);                                     \
        }                                                                                  \
        return j;                                                                          \
    }                                                                                      \
    /* Scores of Q queries (a compile-time constant after inlining) against 4 keys at  \
     * a time: 4 Q chains, each key vector loaded serving every query; for Q =          \
     * MM_SCORE_QUERIES and no scalar tail, MM_SCORES_4xQ sums, scales and stores them   \
     * together (the same bits as MM_HSUM of each, times scale). */                      \
    MM_ALWAYS_INLINE void mm_scores_##type(const void *k, const uint32_t *rows, int32_t n,  \
                                           const float *q, size_t ldq, int32_t head_dim,   \
                                           float scale, float *scores, size_t lds,         \
                                           const int Q, const int NV) {                    \
        const size_t row_bytes = MM_KV_ROW_BYTES_##type(head_dim);                         \
        const int32_t whole = NV ? NV * MM_LANES : head_dim / MM_LANES * MM_LANES;         \
        int32_t j = 0;                                                                     \
        if (Q == 1 && whole == head_dim) {                                                 \
            /* one query, MM_SCORE_KEYS keys at a time: chain MM_SCORE_QUERIES u + t is   \
             * key j + 4 t + u, so MM_SCORES_4xQ's "query t, key u" lands at              \
             * scores[j + 4 t + u], each sum the bits of MM_HSUM of its chain (one         \
             * reduction for all of them) */                                               \
            switch (whole / MM_LANES) { /* up to 4 vectors: the query in registers */      \
            case 1:                                                                        \
                j = mm_scores_one_##type(k, rows, n, q, row_bytes, scale, scores, 1);      \
                break;                                                                     \
            case 2:                                                                        \
                j = mm_scores_one_##type(k, rows, n, q, row_bytes, scale, scores, 2);      \
                break;                                                                     \
            case 3:                                                                        \
                j = mm_scores_one_##type(k, rows, n, q, row_bytes, scale, scores, 3);      \
                break;                                                                     \
            case 4:                                                                        \
                j = mm_scores_one_##type(k, rows, n, q, row_bytes, scale, scores, 4);      \
                break;                                                                     \
            default: /* wider: the loop below, one vector step for all the keys */         \
                break;                                                                     \
            }                                                                              \
            for (; j + MM_SCORE_KEYS <= n; j += MM_SCORE_KEYS) {                           \
                MM_VEC accs[MM_SCORE_KEYS];                                                \
                const uint8_t *rk[MM_SCORE_KEYS];                                          \
                _Pragma("GCC unroll 16") for (int c = 0; c < MM_SCORE_KEYS; c++) {         \
                    rk[c] = (const uint8_t *)k + rows[j + MM_SCORE_KEY(c)] * row_bytes;    \
                    accs[c] = MM_ZERO();                                                   \
                }                                                                          \
                for (int32_t i = 0; i < whole; i += MM_LANES) {                            \
                    const MM_VEC qv = MM_LOADX(q + i);                                     \
                    _Pragma("GCC unroll 16") for (int c = 0; c < MM_SCORE_KEYS; c++) {     \
                        accs[c] = MM_FMA(mm_load_kv_##type(rk[c], i), qv, accs[c]);        \
                    }                                                                      \
                }                                                                          \
                MM_SCORES_4xQ(accs, scale, scores + j, 4);                                 \
            }                                                                              \
        }                                                                                  \
        for (; j + 4 <= n; j += 4) {                                                       \
            const uint8_t *r[4];                                                           \
            MM_VEC acc[4 * MM_SCORE_QUERIES];                                              \
            _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {                          \
                r[u] = (const uint8_t *)k + rows[j + u] * row_bytes;                       \
                _Pragma("GCC unroll 8") for (int t = 0; t < Q; t++) {                      \
                    acc[u * MM_SCORE_QUERIES + t] = MM_ZERO();                             \
                }                                                                          \
            }                                                                              \
            for (int32_t i = 0; i < whole; i += MM_LANES) {                                \
                MM_VEC kv[4];                                                              \
                _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {                      \
                    kv[u] = mm_load_kv_##type(r[u], i);                                    \
                }                                                                          \
                _Pragma("GCC unroll 8") for (int t = 0; t < Q; t++) {                      \
                    const MM_VEC qv = MM_LOADX(q + (size_t)t * ldq + i);                   \
                    _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {                  \
                        acc[u * MM_SCORE_QUERIES + t] =                                    \
                            MM_FMA(kv[u], qv, acc[u * MM_SCORE_QUERIES + t]);              \
                    }                                                                      \
                }                                                                          \
            }                                                                              \
            if (Q == MM_SCORE_QUERIES && whole == head_dim) {                              \
                MM_SCORES_4xQ(acc, scale, scores + j, lds);                                \
                continue;                                                                  \
            }                                                                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < Q; t++) {                          \
                _Pragma("GCC unroll 4") for (int u = 0; u < 4; u++) {                      \
                    const float sum = MM_HSUM(acc[u * MM_SCORE_QUERIES + t]);              \
                    scores[(size_t)t * lds + j + u] =                                      \
                        mm_score_tail(sum, r[u], q + (size_t)t * ldq, whole, head_dim,     \
                                      kind) * scale;                                     \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (; j < n; j++) {                                                               \
            const uint8_t *r0 = (const uint8_t *)k + rows[j] * row_bytes;                  \
            for (int t = 0; t < Q; t++) {                                                  \
                const float *qt = q + (size_t)t * ldq;                                     \
                MM_VEC a0 = MM_ZERO();                                                     \
                for (int32_t i = 0; i < whole; i += MM_LANES) {                            \
                    a0 = MM_FMA(mm_load_kv_##type(r0, i), MM_LOADX(qt + i), a0);           \
                }                                                                          \
                scores[(size_t)t * lds + j] =                                              \
                    mm_score_tail(MM_HSUM(a0), r0, qt, whole, head_dim, kind) * scale;   \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    static void MM_NAME(attn_scores_##type)(const void *k, const uint32_t *rows, int32_t n, \
                                            const float *q, size_t ldq, int32_t nq,        \
                                            int32_t head_dim, float scale, float *scores,  \
                                            size_t lds) {                                  \
        int32_t t = 0;                                                                     \
        for (; t + MM_SCORE_QUERIES <= nq; t += MM_SCORE_QUERIES) {                        \
            const float *qt = q + (size_t)t * ldq;                                         \
            float *st = scores + (size_t)t * lds;                                          \
            if (MM_SCORE_NV && head_dim == MM_SCORE_NV * MM_LANES) {                       \
                mm_scores_##type(k, rows, n, qt, ldq, head_dim, scale, st, lds,            \
                                 MM_SCORE_QUERIES, MM_SCORE_NV);                           \
            } else {                                                                       \
                mm_scores_##type(k, rows, n, qt, ldq, head_dim, scale, st, lds,            \
                                 MM_SCORE_QUERIES, 0);                                     \
            }                                                                              \
        }                                                                                  \
        for (; t < nq; t++) {                                                              \
            mm_scores_##type(k, rows, n, q + (size_t)t * ldq, ldq, head_dim, scale,        \
                             scores + (size_t)t * lds, lds, 1, 0);                         \
        }                                                                                  \
    }                                                                                      \
    /* Columns [c, c + NV MM_LANES) of Q queries' value sums (NV, Q, GATHER compile-time   \
     * constants after inlining): the columns of all Q stay in registers while every       \
     * key's row passes, NV Q chains in flight. Without GATHER the queries read the same   \
     * rows, each loaded once for all of them; with it query t reads rows + t ldr, each    \
     * query loading its own (from L1 when queries share a token's one head). */           \
    MM_ALWAYS_INLINE void mm_mix_cols_##type(const void *v, const uint32_t *rows,          \
                                             size_t ldr, int32_t n, const float *p,        \
                                             size_t ldp, size_t row_bytes, float *out,     \
                                             size_t ldo, int32_t c, const int Q,           \
                                             const int NV, const int GATHER) {             \
        MM_VEC o[MM_MIX_QUERIES_NARROW][4];                                                \
        _Pragma("GCC unroll 8") for (int t = 0; t < Q; t++) {                              \
            _Pragma("GCC unroll 4") for (int u = 0; u < NV; u++) {                         \
                o[t][u] = MM_LOADX(out + (size_t)t * ldo + c + u * MM_LANES);              \
            }                                                                              \
        }                                                                                  \
        for (int32_t j = 0; j < n; j++) {                                                  \
            MM_VEC vr[4];                                                                  \
            if (!GATHER) {                                                                 \
                const uint8_t *r = (const uint8_t *)v + rows[j] * row_bytes;               \
                _Pragma("GCC unroll 4") for (int u = 0; u < NV; u++) {                     \
                    vr[u] = mm_load_kv_##type(r, c + u * MM_LANES);                        \
                }                                                                          \
            }                                                                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < Q; t++) {                          \
                const MM_VEC a = MM_SET1(p[(size_t)t * ldp + j]);                          \
                const uint8_t *rt =                                                        \
                    (const uint8_t *)v + rows[(size_t)t * ldr + j] * row_bytes;            \
                _Pragma("GCC unroll 4") for (int u = 0; u < NV; u++) {                     \
                    const MM_VEC x =                                                       \
                        GATHER ? mm_load_kv_##type(rt, c + u * MM_LANES) : vr[u];          \
                    o[t][u] = MM_FMA(a, x, o[t][u]);                                       \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        _Pragma("GCC unroll 8") for (int t = 0; t < Q; t++) {                              \
            _Pragma("GCC unroll 4") for (int u = 0; u < NV; u++) {                         \
                MM_STORE(out + (size_t)t * ldo + c + u * MM_LANES, o[t][u]);               \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    /* Q queries (a compile-time constant after inlining) at once: each value row          \
     * loaded serves all of them (or, with GATHER, each its own row), and Q times as many  \
     * chains are in flight. The whole vectors of a row go four at a time, then the rest   \
     * (1 to 3) in one pass. */                                                            \
    MM_ALWAYS_INLINE void mm_mix_##type(const void *v, const uint32_t *rows, size_t ldr,   \
                                        int32_t n, const float *p, size_t ldp,             \
                                        int32_t head_dim, float *out, size_t ldo,          \
                                        const int Q, const int GATHER) {                   \
        const size_t row_bytes = MM_KV_ROW_BYTES_##type(head_dim);                         \
        const int32_t whole = head_dim / MM_LANES * MM_LANES;                              \
        int32_t c = 0;                                                                     \
        for (; c + 4 * MM_LANES <= whole; c += 4 * MM_LANES) {                             \
            mm_mix_cols_##type(v, rows, ldr, n, p, ldp, row_bytes, out, ldo, c, Q, 4,      \
                               GATHER);                                                    \
        }                                                                                  \
        switch ((whole - c) / MM_LANES) {                                                  \
        case 3:                                                                            \
            mm_mix_cols_##type(v, rows, ldr, n, p, ldp, row_bytes, out, ldo, c, Q, 3,      \
                               GATHER);                                                    \
            break;                                                                         \
        case 2:                                                                            \
            mm_mix_cols_##type(v, rows, ldr, n, p, ldp, row_bytes, out, ldo, c, Q, 2,      \
                               GATHER);                                                    \
            break;                                                                         \
        case 1:                                                                            \
            mm_mix_cols_##type(v, rows, ldr, n, p, ldp, row_bytes, out, ldo, c, Q, 1,      \
                               GATHER);                                                    \
            break;                                                                         \
        default:                                                                           \
            break;                                                                         \
        }                                                                                  \
        c = whole;                                                                         \
        for (; c < head_dim; c++) {                                                        \
            for (int t = 0; t < Q; t++) {                                                  \
                float o = out[(size_t)t * ldo + c];                                        \
                for (int32_t j = 0; j < n; j++) {                                          \
                    const uint8_t *r =                                                     \
                        (const uint8_t *)v + rows[(size_t)t * ldr + j] * row_bytes;        \
                    o = fmaf(p[(size_t)t * ldp + j], mm_scalar_kv(r, c, kind), o);         \
                }                                                                          \
                out[(size_t)t * ldo + c] = o;                                              \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    /* Blocks of MM_MIX_QUERIES queries, then the rest (1 to MM_MIX_QUERIES - 1) in as     \
     * few passes as the registers allow: one query alone is a chain or two per key, bound \
     * by the FMA's latency. Heads of one or two whole vectors (head_dim 16 or 32 with     \
     * AVX-512) take up to MM_MIX_QUERIES_NARROW queries a pass instead: six heads in      \
     * one pass of 12 chains, where a pass of four and one of two left the second 4       \
     * chains (decode at depth 1.01-1.09x faster, docs/PERFORMANCE_HISTORY.md). */         \
    MM_ALWAYS_INLINE void mm_attn_mix_##type(const void *v, const uint32_t *rows,          \
                                             size_t ldr, int32_t n, const float *p,        \
                                             size_t ldp, int32_t nq, int32_t head_dim,     \
                                             float *out, size_t ldo, const int GATHER) {   \
        int32_t t = 0;                                                                     \
        if (MM_MIX_QUERIES_NARROW > MM_MIX_QUERIES && head_dim % MM_LANES == 0 &&          \
            head_dim <= 2 * MM_LANES) {                                                    \
            while (nq - t >= MM_MIX_QUERIES_NARROW || nq - t == 6) {                       \
                const uint32_t *rt = rows + (size_t)t * ldr;                               \
                const float *pt = p + (size_t)t * ldp;                                     \
                float *ot = out + (size_t)t * ldo;                                         \
                if (nq - t == 6) {                                                         \
                    mm_mix_##type(v, rt, ldr, n, pt, ldp, head_dim, ot, ldo, 6, GATHER);   \
                    t += 6;                                                                \
                } else {                                                                   \
                    mm_mix_##type(v, rt, ldr, n, pt, ldp, head_dim, ot, ldo,               \
                                  MM_MIX_QUERIES_NARROW, GATHER);                          \
                    t += MM_MIX_QUERIES_NARROW;                                            \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (; t + MM_MIX_QUERIES <= nq; t += MM_MIX_QUERIES) {                            \
            mm_mix_##type(v, rows + (size_t)t * ldr, ldr, n, p + (size_t)t * ldp, ldp,     \
                          head_dim, out + (size_t)t * ldo, ldo, MM_MIX_QUERIES, GATHER);   \
        }                                                                                  \
        while (t < nq) {                                                                   \
            const uint32_t *rt = rows + (size_t)t * ldr;                                   \
            const float *pt = p + (size_t)t * ldp;                                         \
            float *ot = out + (size_t)t * ldo;                                             \
            if (MM_MIX_QUERIES > 3 && nq - t >= 3) {                                       \
                mm_mix_##type(v, rt, ldr, n, pt, ldp, head_dim, ot, ldo, 3, GATHER);       \
                t += 3;                                                                    \
            } else if (MM_MIX_QUERIES > 2 && nq - t >= 2) {                                \
                mm_mix_##type(v, rt, ldr, n, pt, ldp, head_dim, ot, ldo, 2, GATHER);       \
                t += 2;                                                                    \
            } else {                                                                       \
                mm_mix_##type(v, rt, ldr, n, pt, ldp, head_dim, ot, ldo, 1, GATHER);       \
                t += 1;                                                                    \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    static void MM_NAME(attn_mix_##type)(const void *v, const uint32_t *rows, size_t ldr,  \
                                         int32_t n, const float *p, size_t ldp,            \
                                         int32_t nq,                                       \
                                         int32_t head_dim, float *out, size_t ldo) {       \
        if (ldr == 0) {                                                                    \
            mm_attn_mix_##type(v, rows, 0, n, p, ldp, nq, head_dim, out, ldo, 0);          \
        } else if (ldr == MOAS_OPS_RUN_STRIDE && ldp == MOAS_OPS_RUN_STRIDE) {             \
            /* decode's scratch: constant strides free the registers that held them */     \
            mm_attn_mix_##type(v, rows, MOAS_OPS_RUN_STRIDE, n, p, MOAS_OPS_RUN_STRIDE, nq, \
                               head_dim, out, ldo, 1);                                     \
        } else {                                                                           \
            mm_attn_mix_##type(v, rows, ldr, n, p, ldp, nq, head_dim, out, ldo, 1);        \
        }                                                                                  \
    }

MM_DEFINE_ATTN(f32, 0)
MM_DEFINE_ATTN(f16, 1)
MM_DEFINE_ATTN(q8_0, 2)

/* ---- exp, softmax, GELU ------------------------------------------------------------
 *
 * exp(x) for x <= 0 (softmax's x - max, GELU's -z^2): 2^n e^r with n = round(x log2 e)
 * and r = x - n ln 2 (ln 2 in two parts, so r is nearly exact), e^r by its Taylor
 * polynomial of degree 7 on |r| <= ln2 / 2 (truncation below 2^-27, under a quarter
 * of an ulp). Inputs below -87 give exp(-87) (1.6e-38) instead of something smaller:
 * no difference after the sums these feed. NaN stays NaN. The scalar twin does the
 * same operations with fmaf, so a tail element gets the bits a vector lane would. */

#define MM_EXP_LOW (-87.0f)
#define MM_EXP_HIGH 88.0f
#define MM_LOG2E 1.44269504088896341f
#define MM_LN2_HI 0.693145751953125f          /* 11 bits: n * LN2_HI is exact */
#define MM_LN2_LO 1.42860682030941723212e-6f
static const float mm_exp_coef[8] = {1.0f,          1.0f,          0.5f,           1.0f / 6,
                                     1.0f / 24,     1.0f / 120,    1.0f / 720,     1.0f / 5040};

/* e[v] = exp(x[v]) for v < N (1 or 2, a compile-time constant after inlining), each
 * step done for every vector before the next step: each lane the same operations
 * whatever N, so the same bits, and with N = 2 the two dependent chains interleave,
 * where an out-of-order window would fill with one exp's steps before reaching the
 * next (exp_sum of 256 on Zen 2: 1.76 -> 1.21 ns a value). */
MM_ALWAYS_INLINE void mm_exp_n(const MM_VEC *x, MM_VEC *e, const int N) {
    MM_VEC xc[2], n[2], r[2], p[2];
    _Pragma("GCC unroll 2") for (int v = 0; v < N; v++) {
        xc[v] = MM_MAX(MM_SET1(MM_EXP_LOW), x[v]);   /* x second: a NaN x is kept */
        n[v] = MM_ROUND(MM_MUL(xc[v], MM_SET1(MM_LOG2E)));
    }
    _Pragma("GCC unroll 2") for (int v = 0; v < N; v++) {
        r[v] = MM_FMA(n[v], MM_SET1(-MM_LN2_HI), xc[v]);
    }
    _Pragma("GCC unroll 2") for (int v = 0; v < N; v++) {
        r[v] = MM_FMA(n[v], MM_SET1(-MM_LN2_LO), r[v]);
        p[v] = MM_SET1(mm_exp_coef[7]);
    }
    _Pragma("GCC unroll 8") for (int c = 6; c >= 0; c--) {
        _Pragma("GCC unroll 2") for (int v = 0; v < N; v++) {
            p[v] = MM_FMA(p[v], r[v], MM_SET1(mm_exp_coef[c]));
        }
    }
    _Pragma("GCC unroll 2") for (int v = 0; v < N; v++) {
        e[v] = MM_MUL(p[v], MM_POW2(n[v]));
    }
}

MM_ALWAYS_INLINE MM_VEC mm_exp(MM_VEC x) {
    MM_VEC e;
    mm_exp_n(&x, &e, 1);
    return e;
}

MM_ALWAYS_INLINE float mm_exp1(float x) {
    if (x != x) {
        return x;
    }
    /* below: as the vector version; above: outside the domain (a NaN or infinite score
     * can get here), capped so that n fits the exponent instead of overflowing int */
    x = x > MM_EXP_LOW ? (x < MM_EXP_HIGH ? x : MM_EXP_HIGH) : MM_EXP_LOW;
    const float n = nearbyintf(x * MM_LOG2E);
    float r = fmaf(n, -MM_LN2_HI, x);
    r = fmaf(n, -MM_LN2_LO, r);
    float p = mm_exp_coef[7];
    for (int c = 6; c >= 0; c--) {
        p = fmaf(p, r, mm_exp_coef[c]);
    }
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;   /* 2^n, as MM_POW2 */
    float pow2;
    memcpy(&pow2, &bits, sizeof pow2);
    return p * pow2;
}

/* The largest of init and x: lanes that keep x > m ? x : m (MM_MAX's first operand
 * wins only when greater, so a NaN x leaves the lane as it was), their maximum, then
 * the tail. A maximum of numbers does not depend on the order it is taken in. */
static float MM_NAME(max)(const float *x, int32_t n, float init) {
    float m = init;
    int32_t i = 0;
    if (n >= MM_LANES) {
        MM_VEC vm = MM_SET1(init);
        for (; i + MM_LANES <= n; i += MM_LANES) {
            vm = MM_MAX(MM_LOADX(x + i), vm);
        }
        m = MM_HMAX(vm);
    }
    for (; i < n; i++) {
        m = x[i] > m ? x[i] : m;
    }
    return m;
}

/* x = exp(x - max), returning the sum of the new x: summed in lanes, then the tail in
 * order. */
static float MM_NAME(exp_sum)(float *x, int32_t n, float max) {
    const MM_VEC vm = MM_SET1(max);
    MM_VEC vsum = MM_ZERO();
    int32_t i = 0;
    /* two vectors a step: each exp is a long chain, and two side by side keep the
     * pipes busy where one at a time left them waiting (the sums stay in order) */
    for (; i + 2 * MM_LANES <= n; i += 2 * MM_LANES) {
        const MM_VEC xs[2] = {MM_ADD(MM_LOADX(x + i), MM_MUL(vm, MM_SET1(-1.0f))),
                              MM_ADD(MM_LOADX(x + i + MM_LANES), MM_MUL(vm, MM_SET1(-1.0f)))};
        MM_VEC e[2];
        mm_exp_n(xs, e, 2);
        MM_STORE(x + i, e[0]);
        MM_STORE(x + i + MM_LANES, e[1]);
        vsum = MM_ADD(MM_ADD(vsum, e[0]), e[1]);
    }
    for (; i + MM_LANES <= n; i += MM_LANES) {
        const MM_VEC e = mm_exp(MM_ADD(MM_LOADX(x + i), MM_MUL(vm, MM_SET1(-1.0f))));
        MM_STORE(x + i, e);
        vsum = MM_ADD(vsum, e);
    }
    float sum = MM_HSUM(vsum);
    for (; i < n; i++) {
        x[i] = mm_exp1(x[i] - max);
        sum += x[i];
    }
    return sum;
}

/* x = softmax(x): the max, exp_sum, then a scaling by 1 / sum. */
static void MM_NAME(softmax)(float *x, int32_t n) {
    if (n <= 0) {
        return;
    }
    const float max = MM_NAME(max)(x, n, x[0]);
    const float sum = MM_NAME(exp_sum)(x, n, max);
    const MM_VEC inv = MM_SET1(1.0f / sum);
    int32_t i;
    for (i = 0; i + MM_LANES <= n; i += MM_LANES) {
        MM_STORE(x + i, MM_MUL(MM_LOADX(x + i), inv));
    }
    for (; i < n; i++) {
        x[i] *= 1.0f / sum;
    }
}

/* GELU with the exact-erf definition, 0.5 x (1 + erf(x / sqrt 2)), erf by
 * Abramowitz and Stegun 7.1.26: erf(a) = 1 - t (a1 + t (a2 + ... t a5)) exp(-a^2),
 * t = 1 / (1 + p a), for a = |z| (odd symmetry for z < 0): 1.5e-7 absolute by
 * construction, up to 5e-7 in float near z = 0 where 1 - t p e cancels. The golden
 * logits stay within 5e-6 of PyTorch with it (tests/test_forward.c). */
#define MM_ERF_P 0.3275911f
static const float mm_erf_coef[5] = {0.254829592f, -0.284496736f, 1.421413741f,
                                     -1.453152027f, 1.061405429f};

MM_ALWAYS_INLINE MM_VEC mm_gelu(MM_VEC x) {
    const MM_VEC z = MM_MUL(x, MM_SET1(0.70710678118654752f));
    const MM_VEC a = MM_ABS(z);
    const MM_VEC t = MM_DIV(MM_SET1(1.0f), MM_FMA(MM_SET1(MM_ERF_P), a, MM_SET1(1.0f)));
    MM_VEC p = MM_SET1(mm_erf_coef[4]);
    _Pragma("GCC unroll 8") for (int c = 3; c >= 0; c--) {
        p = MM_FMA(p, t, MM_SET1(mm_erf_coef[c]));
    }
    const MM_VEC e = mm_exp(MM_MUL(MM_MUL(a, a), MM_SET1(-1.0f)));
    const MM_VEC erf_a = MM_FMA(MM_MUL(p, t), MM_MUL(e, MM_SET1(-1.0f)), MM_SET1(1.0f));
    const MM_VEC erf_z = MM_COPYSIGN(erf_a, z);
    return MM_MUL(MM_MUL(MM_SET1(0.5f), x), MM_ADD(MM_SET1(1.0f), erf_z));
}

MM_ALWAYS_INLINE float mm_gelu1(float x) {
    const float z = x * 0.70710678118654752f;
    const float a = fabsf(z);
    const float t = 1.0f / fmaf(MM_ERF_P, a, 1.0f);
    float p = mm_erf_coef[4];
    for (int c = 3; c >= 0; c--) {
        p = fmaf(p, t, mm_erf_coef[c]);
    }
    const float e = mm_exp1((a * a) * -1.0f);
    const float erf_a = fmaf(p * t, e * -1.0f, 1.0f);
    return (0.5f * x) * (1.0f + copysignf(erf_a, z));
}

static void MM_NAME(gelu)(float *x, int32_t n) {
    int32_t i = 0;
    for (; i + MM_LANES <= n; i += MM_LANES) {
        MM_STORE(x + i, mm_gelu(MM_LOADX(x + i)));
    }
    for (; i < n; i++) {
        x[i] = mm_gelu1(x[i]);
    }
}

/* ---- K/V rows of a ragged stream ---------------------------------------------------
 *
 * ops.h's kv_rows, MM_LANES tokens at a time: the widths from two loads of off, the
 * head group as a product with the reciprocal (h w < 2^20, so MM_IMULLO is exact),
 * the page looked up by a gather. The scalar tail is the reference's loop. One head
 * (recip = 2^32, which no lane holds) takes the tail's loop throughout: h is 0 there. */
static void MM_NAME(kv_rows)(const uint32_t *off, const int32_t *pages, uint32_t shift,
                             uint32_t h, uint64_t recip, int32_t n, uint32_t *rows) {
    int32_t j = 0;
    if (recip <= UINT32_MAX) {
        const MM_IVEC hv = MM_ISET1(h), in_page = MM_ISET1((1u << shift) - 1u);
        for (; j + MM_LANES <= n; j += MM_LANES) {
            const MM_IVEC first = MM_ILOAD(off + j);
            const MM_IVEC width = MM_ISUB(MM_ILOAD(off + j + 1), first);
            const MM_IVEC i = MM_IADD(first, MM_IMULHI(MM_IMULLO(hv, width), (uint32_t)recip));
            const MM_IVEC page = MM_IGATHER(pages, MM_ISRL(i, shift));
            MM_ISTORE(rows + j, MM_IOR(MM_ISLL(page, shift), MM_IAND(i, in_page)));
        }
    }
    for (; j < n; j++) {
        const uint32_t w = off[j + 1] - off[j];
        rows[j] = moas__page_row(pages, shift, off[j] + moas__head_group(h, w, recip));
    }
}

/* ---- binary16 stores ---------------------------------------------------------------
 *
 * ops.h's to_f16 by the hardware's conversion, with the rounding given in the
 * instruction (to nearest even, whatever MXCSR says): it agrees with moas__f32_to_f16
 * on every input but NaN, whose payload it keeps; those lanes, which a sound model
 * never stores, are redone by the scalar conversion. */
static void MM_NAME(to_f16)(const float *x, uint16_t *out, int32_t n) {
    int32_t i = 0;
    for (; i + MM_LANES <= n; i += MM_LANES) {
        const MM_VEC v = MM_LOADX(x + i);
        MM_STORE_F16(out + i, v);
        for (unsigned nan = MM_NAN_MASK(v); nan != 0; nan &= nan - 1) {
            const int32_t e = i + __builtin_ctz(nan);
            out[e] = moas__f32_to_f16(x[e]);
        }
    }
    for (; i < n; i++) {
        out[i] = moas__f32_to_f16(x[i]);
    }
}

/* ---- Q8_0 stores ------------------------------------------------------------------
 *
 * ops.h's to_q8_0, a block at a time. The largest |x| is a maximum, the same in any
 * order (MM_MAX(|x|, m) passes a NaN over, as the scalar comparison does), and d and id
 * are the scalar's own operations. Each x id is clamped to [-127, 127] and rounded half
 * away from zero as t + trunc(2 (v - t)), t = trunc(v): v - t is exact, and so is 2 (v -
 * t), whose truncation is the step to the farther integer when |v - t| >= 1/2 (adding
 * 1/2 before truncating would round 0.49999997 up). A NaN x id, which the clamp would
 * turn into -127, is redone by the scalar rounding (0). Stored thousands of heads a
 * step in a batched Q8_0 decode, one roundf call each before. */
static void MM_NAME(to_q8_0)(const float *x, moas_block_q8_0 *out, int32_t n) {
    for (int32_t b = 0; b < n / MOAS_QK8_0; b++) {
        const float *xb = x + (size_t)b * MOAS_QK8_0;
        MM_VEC m = MM_ZERO();
        _Pragma("GCC unroll 4") for (int k = 0; k < MOAS_QK8_0; k += MM_LANES) {
            m = MM_MAX(MM_ABS(MM_LOADX(xb + k)), m);
        }
        const float amax = MM_HMAX(m);
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = moas__f32_to_f16(d);
        const MM_VEC idv = MM_SET1(id), lo = MM_SET1(-127.0f), hi = MM_SET1(127.0f);
        const MM_VEC minus_one = MM_SET1(-1.0f);
        _Pragma("GCC unroll 4") for (int k = 0; k < MOAS_QK8_0; k += MM_LANES) {
            const MM_VEC v = MM_MUL(MM_LOADX(xb + k), idv);
            const MM_VEC c = MM_MIN(MM_MAX(v, lo), hi);
            const MM_VEC t = MM_TRUNC(c);
            const MM_VEC f = MM_FMA(minus_one, t, c);   /* c - t, exact */
            MM_STORE_I8(out[b].q + k, MM_ADD(t, MM_TRUNC(MM_ADD(f, f))));
            for (unsigned nan = MM_NAN_MASK(v); nan != 0; nan &= nan - 1) {
                const int e = k + __builtin_ctz(nan);
                out[b].q[e] = moas__q8_0_round(xb[e] * id);
            }
        }
    }
}

/* ops.h's add: each element's one rounding, whatever the width. */
static void MM_NAME(add)(float *y, const float *x, int32_t n) {
    int32_t i = 0;
    for (; i + MM_LANES <= n; i += MM_LANES) {
        MM_STORE(y + i, MM_ADD(MM_LOADX(y + i), MM_LOADX(x + i)));
    }
    for (; i < n; i++) {
        y[i] += x[i];
    }
}
