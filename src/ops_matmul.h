/*
 * ops_matmul.h - register-tiled matrix products for one SIMD kernel table.
 *
 * Included by ops_avx2.c and ops_avx512.c after they define the vector vocabulary
 * below; it defines the table's matmul_f32/f16/q8_0 (ops.h). One source for the
 * tiling, so the two widths cannot drift apart.
 *
 *   MM_VEC, MM_LANES          the vector type and its floats
 *   MM_ZERO(), MM_LOADX(p)    zero; MM_LANES floats from any address
 *   MM_LOAD_F16(p)            MM_LANES halves, widened; MM_LOAD_I8(p) int8 as floats
 *   MM_FMA(a, b, c), MM_MUL(a, b), MM_SET1(f), MM_HSUM(v)
 *   MM_TILE_ROWS, MM_TILE_TOKS  the tile for batches (rows x tokens of accumulators)
 *   MM_DECODE_ROWS            rows per tile for a single token
 *   MM_NAME(base)             base ## _ ## table name
 *
 * The numbers. Every output element has one accumulator: MM_LANES lanes, added to in
 * column order one vector step at a time (for Q8_0 one block at a time: the block's
 * products summed across its vectors, then scaled by the block's d), then the lanes
 * summed by MM_HSUM and the scalar tail added with fmaf in column order. A tile only
 * decides how many such chains run side by side, so an element's bits do not depend
 * on the tile it fell into: batches equal single tokens, threads may split the rows
 * anywhere. Independence comes from the tile instead of from splitting one sum into
 * several: a tile of R x T outputs keeps R x T fused multiply-adds in flight, and
 * each weight vector loaded serves T tokens, each token vector R rows.
 */

#define MM_ALWAYS_INLINE static inline __attribute__((always_inline))

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

/* An R x T tile of f32 or f16 rows (R, T compile-time constants after inlining). */
#define MM_DEFINE_TILE(type)                                                               \
    MM_ALWAYS_INLINE void mm_tile_##type(const uint8_t *w, size_t row_bytes, const float *x,  \
                                         size_t ldx, int32_t n, float *y, size_t ldy,      \
                                         const int R, const int T) {                       \
        MM_VEC acc[MM_TILE_MAX_R][MM_TILE_MAX_T];                                           \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[r][t] = MM_ZERO();     \
        }                                                                                  \
        int32_t i = 0;                                                                     \
        for (; i + MM_LANES <= n; i += MM_LANES) {                                         \
            MM_VEC xv[MM_TILE_MAX_T];                                                      \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                          \
                xv[t] = MM_LOADX(x + (size_t)t * ldx + i);                                 \
            }                                                                              \
            _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                          \
                const MM_VEC wv = mm_load_w_##type(w + (size_t)r * row_bytes, i);          \
                _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                      \
                    acc[r][t] = MM_FMA(wv, xv[t], acc[r][t]);                              \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {                              \
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {                          \
                float sum = MM_HSUM(acc[r][t]);                                            \
                for (int32_t j = i; j < n; j++) {                                          \
                    sum = fmaf(mm_scalar_w_##type(w + (size_t)r * row_bytes, j),           \
                               x[(size_t)t * ldx + j], sum);                               \
                }                                                                          \
                y[(size_t)t * ldy + r] = sum;                                              \
            }                                                                              \
        }                                                                                  \
    }

#define MM_TILE_MAX_R (MM_TILE_ROWS > MM_DECODE_ROWS ? MM_TILE_ROWS : MM_DECODE_ROWS)
#define MM_TILE_MAX_T MM_TILE_TOKS

MM_DEFINE_TILE(f32)
MM_DEFINE_TILE(f16)

/* An R x T tile of Q8_0 rows: per block, each row's 32 int8 are widened once and
 * serve all T tokens. */
MM_ALWAYS_INLINE void mm_tile_q8_0(const uint8_t *w, size_t row_bytes, const float *x,
                                   size_t ldx, int32_t n, float *y, size_t ldy, const int R,
                                   const int T) {
    enum { STEPS = MOAS_QK8_0 / MM_LANES };
    MM_VEC acc[MM_TILE_MAX_R][MM_TILE_MAX_T];
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) acc[r][t] = MM_ZERO();
    }
    for (int32_t b = 0; b < n / MOAS_QK8_0; b++) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
            const moas_block_q8_0 *blk =
                (const moas_block_q8_0 *)(const void *)(w + (size_t)r * row_bytes) + b;
            const MM_VEC d = MM_SET1(_cvtsh_ss(blk->d));
            MM_VEC q[STEPS];
            _Pragma("GCC unroll 8") for (int k = 0; k < STEPS; k++) {
                q[k] = MM_LOAD_I8(blk->q + k * MM_LANES);
            }
            _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
                const float *xb = x + (size_t)t * ldx + (size_t)b * MOAS_QK8_0;
                MM_VEC p = MM_MUL(q[0], MM_LOADX(xb));
                _Pragma("GCC unroll 8") for (int k = 1; k < STEPS; k++) {
                    p = MM_FMA(q[k], MM_LOADX(xb + k * MM_LANES), p);
                }
                acc[r][t] = MM_FMA(d, p, acc[r][t]);
            }
        }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < R; r++) {
        _Pragma("GCC unroll 8") for (int t = 0; t < T; t++) {
            y[(size_t)t * ldy + r] = MM_HSUM(acc[r][t]);
        }
    }
}

/* The driver: rows outer, so a tile's weight rows stay in L1 while every token of the
 * batch passes over them; the tokens (at most a prefill block) stay in L2. */
#define MM_DEFINE_MATMUL(type)                                                             \
    static void MM_NAME(matmul_##type)(const void *w_, size_t row_bytes, int32_t n_rows,   \
                                       const float *x, size_t ldx, int32_t n_tok, int32_t n, \
                                       float *y, size_t ldy) {                             \
        const uint8_t *w = w_;                                                             \
        int32_t r = 0;                                                                     \
        if (n_tok == 1) {                                                                  \
            for (; r + MM_DECODE_ROWS <= n_rows; r += MM_DECODE_ROWS) {                    \
                mm_tile_##type(w + (size_t)r * row_bytes, row_bytes, x, ldx, n, y + r, ldy, \
                               MM_DECODE_ROWS, 1);                                         \
            }                                                                              \
        } else {                                                                           \
            for (; r + MM_TILE_ROWS <= n_rows; r += MM_TILE_ROWS) {                        \
                const uint8_t *wr = w + (size_t)r * row_bytes;                             \
                int32_t t = 0;                                                             \
                for (; t + MM_TILE_TOKS <= n_tok; t += MM_TILE_TOKS) {                     \
                    mm_tile_##type(wr, row_bytes, x + (size_t)t * ldx, ldx, n,             \
                                   y + (size_t)t * ldy + r, ldy, MM_TILE_ROWS,             \
                                   MM_TILE_TOKS);                                          \
                }                                                                          \
                for (; t < n_tok; t++) {                                                   \
                    mm_tile_##type(wr, row_bytes, x + (size_t)t * ldx, ldx, n,             \
                                   y + (size_t)t * ldy + r, ldy, MM_TILE_ROWS, 1);         \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (; r < n_rows; r++) {                                                          \
            for (int32_t t = 0; t < n_tok; t++) {                                          \
                mm_tile_##type(w + (size_t)r * row_bytes, row_bytes, x + (size_t)t * ldx,  \
                               ldx, n, y + (size_t)t * ldy + r, ldy, 1, 1);                \
            }                                                                              \
        }                                                                                  \
    }

MM_DEFINE_MATMUL(f32)
MM_DEFINE_MATMUL(f16)
MM_DEFINE_MATMUL(q8_0)
