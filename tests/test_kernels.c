/* test_kernels.c - every SIMD kernel table this CPU runs, against the reference
 * (ops_ref.c), at awkward lengths, aligned and misaligned, with random data from a
 * seeded generator and with special values; and the choice of table.
 *
 * The tables differ from the reference only in the order of float operations and in
 * fusing multiply-adds, so results are compared with tolerances derived from float32
 * rounding (below), never with a guess. */
#include "test.h"

#include "f16.h"
#include "kv_cache.h"
#include "ops.h"

#include <fenv.h>
#include <stdio.h>
#include <stdlib.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

/* ---- tolerances ---------------------------------------------------------------- */

/* Unit roundoff of binary32: one rounding moves a value by at most u times itself. */
#define U32 0x1p-24

/* Dot products: each matmul element (one row of w with one token of x; the one-row
 * checks below call matmul with one of each) and each attn_scores score before its
 * scaling. Both sides round n products (or fuse them) and n additions, in different
 * orders, so each is within gamma_n * S of the exact sum, where
 * S = sum |w_i x_i| and gamma_n ~ n u (Higham, Accuracy and Stability, 3.1). That
 * worst case assumes every rounding goes the same way; for data with random signs the
 * errors add like a random walk and grow as sqrt(n) u S. We allow
 *     |simd - ref| <= DOT_TOL_UNITS * sqrt(n) * u * S,
 * which for n <= 4 is at least the worst case of both sides (2 n u S) and for longer
 * rows leaves a margin of several random-walk standard deviations. S is computed in
 * double from the exact products. Each length runs twice: with random signs (the
 * partial sums cancel, errors stay near u S) and with all terms positive (no
 * cancellation: the partial sums grow with n and the sqrt(n) is real; the largest
 * |simd - ref| / (sqrt(n) u S) seen for a one-row matmul of either SIMD table over
 * 200 such rows per length was 1.40, at n = 2, and 1.15 from n = 16 on). */
#define DOT_TOL_UNITS 4.0

/* y += a x (an axpy): attn_mix with one key, elementwise, with e = y + a x exact. A
 * fused table rounds once: |f - e| <= u |e|. The reference rounds a x, then the sum:
 * |r - e| <= u |a x| (1 + u) + u |e|. As |e| <= |y| + |a x|,
 *     |f - r| <= (3 + u) u (|y| + |a x|),   and AXPY_TOL_UNITS is 3 + u rounded up. */
#define AXPY_TOL_UNITS 3.000001

static double dot_tol(int32_t n, double sum_abs) {
    return DOT_TOL_UNITS * sqrt((double)n) * U32 * sum_abs;
}

/* ---- data ---------------------------------------------------------------------- */

/* splitmix64: a fixed seed gives the same data on every platform. */
static uint64_t next_u64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1), 24 random bits. */
static float next_sym(uint64_t *s) {
    return (float)((int32_t)(next_u64(s) >> 40) - (1 << 23)) * 0x1p-23f;
}

/* Uniform in [-1, 1), or in [0, 1] when `positive`. */
static float next_val(uint64_t *s, bool positive) {
    const float v = next_sym(s);
    return positive ? fabsf(v) : v;
}

/* A buffer of n elements of `esize` bytes starting `off` elements past a 64-byte
 * boundary. One spare byte keeps n = 0 a real allocation; a read of even one element
 * past the end still touches unallocated bytes, which AddressSanitizer reports. */
static void *alloc_at(size_t n, size_t esize, size_t off, void **base) {
    *base = NULL;
    if (posix_memalign(base, 64, (n + off) * esize + 1) != 0) {
        return NULL;
    }
    return (char *)*base + off * esize;
}

/* Lengths that end a vector loop early, late and exactly, for 8- and 16-wide
 * vectors with 4x unrolling, plus one longer than any cache-line trick. */
static const int32_t lengths[] = {0,  1,  2,  3,   7,   8,   9,   15,   16,  17,
                                  31, 33, 63, 64, 65, 127, 257, 1000, 4097};
/* Q8_0 rows are whole blocks of 32: one, an odd and an even count, and a long row. */
static const int32_t lengths_q8_0[] = {0, 32, 64, 96, 160, 1024, 4096};

#define N_LENGTHS (sizeof lengths / sizeof lengths[0])
#define N_LENGTHS_Q8_0 (sizeof lengths_q8_0 / sizeof lengths_q8_0[0])

/* Reports a failed comparison with everything needed to reproduce it. */
#define CHECK_NEAR(what_, n_, off_, got_, want_, tol_)                                   \
    do {                                                                                 \
        double cg_ = (double)(got_), cw_ = (double)(want_), ct_ = (double)(tol_);        \
        if (!(fabs(cg_ - cw_) <= ct_)) {                                                 \
            test_report(__FILE__, __LINE__, what_,                                       \
                        "%s, n=%d, offset %d: %.9g vs ref %.9g, difference %.3g > %.3g", \
                        ops->name, (int)(n_), (int)(off_), cg_, cw_, fabs(cg_ - cw_),    \
                        ct_);                                                            \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

/* Same table, same values, different address: bit for bit the same result. */
#define CHECK_SAME_BITS(what_, n_, a_, b_)                                               \
    do {                                                                                 \
        float ca_ = (a_), cb_ = (b_);                                                    \
        if (memcmp(&ca_, &cb_, sizeof ca_) != 0) {                                       \
            test_report(__FILE__, __LINE__, what_,                                       \
                        "%s, n=%d: %.9g aligned but %.9g misaligned", ops->name,         \
                        (int)(n_), (double)ca_, (double)cb_);                            \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

/* ---- dot products and axpy through the kernels the library uses -------------------
 *
 * A dot product of one weight row with x is matmul with n_rows = n_tok = 1 (row_bytes
 * the row's size, ldx = n, ldy = 1); y += a x is attn_mix with one key: row 0 of
 * v = x, weight a, head_dim n, adding onto out = y. y starts at a value no kernel
 * computes here, so an output never written shows. */
#define UNWRITTEN (-1234.5f)

static float row_dot_f32(const moas_ops *ops, const float *w, const float *x, int32_t n) {
    float y = UNWRITTEN;
    ops->matmul_f32(w, (size_t)n * sizeof *w, 1, x, (size_t)n, 1, n, &y, 1, 0);
    return y;
}

static float row_dot_f16(const moas_ops *ops, const uint16_t *w, const float *x, int32_t n) {
    float y = UNWRITTEN;
    ops->matmul_f16(w, (size_t)n * sizeof *w, 1, x, (size_t)n, 1, n, &y, 1, 0);
    return y;
}

/* n % 32 == 0 */
static float row_dot_q8_0(const moas_ops *ops, const moas_block_q8_0 *w, const float *x,
                          int32_t n) {
    float y = UNWRITTEN;
    ops->matmul_q8_0(w, (size_t)(n / MOAS_QK8_0) * sizeof *w, 1, x, (size_t)n, 1, n, &y, 1, 0);
    return y;
}

static void one_key_axpy_f32(const moas_ops *ops, float *y, float a, const float *x,
                             int32_t n) {
    static const uint32_t row0 = 0;
    ops->attn_mix_f32(x, &row0, 0, 1, &a, 1, 1, n, y, (size_t)n);
}

static void one_key_axpy_f16(const moas_ops *ops, float *y, float a, const uint16_t *x,
                             int32_t n) {
    static const uint32_t row0 = 0;
    ops->attn_mix_f16(x, &row0, 0, 1, &a, 1, 1, n, y, (size_t)n);
}

/* ---- the comparisons, one per kernel ------------------------------------------------ */

/* matmul with one row and one token, at every length (n = 0 included: an empty row
 * gives exactly 0), with operands aligned and one element off, which must give the
 * same bits. */
static int check_one_row_f32(const moas_ops *ops) {
    uint64_t seed = 1;
    for (size_t k = 0; k < 2 * N_LENGTHS; k++) {
        const int32_t n = lengths[k / 2];
        const bool positive = k % 2;
        float got[2];
        for (int off = 0; off < 2; off++) {
            void *wb, *xb;
            float *w = alloc_at((size_t)n, sizeof *w, (size_t)off, &wb);
            float *x = alloc_at((size_t)n, sizeof *x, (size_t)off, &xb);
            ASSERT_TRUE(w != NULL && x != NULL);
            uint64_t s = seed;  /* the same values at both offsets */
            double sum_abs = 0;
            for (int32_t i = 0; i < n; i++) {
                w[i] = next_val(&s, positive);
                x[i] = next_val(&s, positive);
                sum_abs += fabs((double)w[i] * x[i]);
            }
            got[off] = row_dot_f32(ops, w, x, n);
            if (n == 0) {
                ASSERT_TRUE(got[off] == 0.0f);   /* empty rows: exactly 0 */
            }
            CHECK_NEAR("matmul_f32 one row", n, off, got[off],
                       row_dot_f32(&moas__ops_ref, w, x, n), dot_tol(n, sum_abs));
            free(wb);
            free(xb);
        }
        CHECK_SAME_BITS("matmul_f32 one row", n, got[0], got[1]);
        seed += 1000;
    }
    return TEST_PASS;
}

static int check_one_row_f16(const moas_ops *ops) {
    uint64_t seed = 2;
    for (size_t k = 0; k < 2 * N_LENGTHS; k++) {
        const int32_t n = lengths[k / 2];
        const bool positive = k % 2;
        float got[2];
        for (int off = 0; off < 2; off++) {
            void *wb, *xb;
            uint16_t *w = alloc_at((size_t)n, sizeof *w, (size_t)off, &wb);
            float *x = alloc_at((size_t)n, sizeof *x, (size_t)off, &xb);
            ASSERT_TRUE(w != NULL && x != NULL);
            uint64_t s = seed;
            double sum_abs = 0;
            for (int32_t i = 0; i < n; i++) {
                w[i] = moas__f32_to_f16(next_val(&s, positive) * 4.0f);
                x[i] = next_val(&s, positive);
                sum_abs += fabs((double)moas__f16_to_f32(w[i]) * x[i]);
            }
            got[off] = row_dot_f16(ops, w, x, n);
            if (n == 0) {
                ASSERT_TRUE(got[off] == 0.0f);   /* empty rows: exactly 0 */
            }
            CHECK_NEAR("matmul_f16 one row", n, off, got[off],
                       row_dot_f16(&moas__ops_ref, w, x, n), dot_tol(n, sum_abs));
            free(wb);
            free(xb);
        }
        CHECK_SAME_BITS("matmul_f16 one row", n, got[0], got[1]);
        seed += 1000;
    }
    return TEST_PASS;
}

/* Quantized as a converter would: per block d = max|w| / 127 rounded to f16 and
 * q = round(w / d), here drawn directly with scales spanning four decades. */
static void fill_q8_0(moas_block_q8_0 *w, float *x, int32_t n, bool positive, uint64_t *s) {
    for (int32_t b = 0; b < n / MOAS_QK8_0; b++) {
        const float scale = ldexpf(1.0f + 0.5f * next_sym(s), -(int)(next_u64(s) % 14));
        w[b].d = moas__f32_to_f16(scale / 127.0f);
        for (int i = 0; i < MOAS_QK8_0; i++) {
            const int32_t q = (int32_t)(next_u64(s) % 255) - 127;
            w[b].q[i] = (int8_t)(positive && q < 0 ? -q : q);
        }
    }
    for (int32_t i = 0; i < n; i++) {
        x[i] = next_val(s, positive);
    }
}

static double sum_abs_q8_0(const moas_block_q8_0 *w, const float *x, int32_t n) {
    double sum_abs = 0;
    for (int32_t i = 0; i < n; i++) {
        const moas_block_q8_0 *b = &w[i / MOAS_QK8_0];
        sum_abs += fabs((double)moas__f16_to_f32(b->d) * b->q[i % MOAS_QK8_0] * x[i]);
    }
    return sum_abs;
}

static int check_one_row_q8_0(const moas_ops *ops) {
    uint64_t seed = 3;
    for (size_t k = 0; k < 2 * N_LENGTHS_Q8_0; k++) {
        const int32_t n = lengths_q8_0[k / 2], nb = n / MOAS_QK8_0;
        const bool positive = k % 2;
        float got[2];
        for (int off = 0; off < 2; off++) {
            void *wb, *xb;
            moas_block_q8_0 *w = alloc_at((size_t)nb, sizeof *w, (size_t)off, &wb);
            float *x = alloc_at((size_t)n, sizeof *x, (size_t)off, &xb);
            ASSERT_TRUE(w != NULL && x != NULL);
            uint64_t s = seed;
            fill_q8_0(w, x, n, positive, &s);
            got[off] = row_dot_q8_0(ops, w, x, n);
            if (n == 0) {
                ASSERT_TRUE(got[off] == 0.0f);   /* empty rows: exactly 0 */
            }
            CHECK_NEAR("matmul_q8_0 one row", n, off, got[off],
                       row_dot_q8_0(&moas__ops_ref, w, x, n),
                       dot_tol(n, sum_abs_q8_0(w, x, n)));
            free(wb);
            free(xb);
        }
        CHECK_SAME_BITS("matmul_q8_0 one row", n, got[0], got[1]);
        seed += 1000;
    }
    return TEST_PASS;
}

/* matmul: every element against the reference dot product of its row and token
 * (within dot_tol), and bit for bit against the same table computing that element
 * alone (n_rows = n_tok = 1) or inside a slice of rows starting elsewhere, computed
 * with the streaming hint: an element's bits must not depend on the tile it fell into
 * or the order of work (ops.h). Shapes cover the
 * tiles' edges: rows and tokens below, at and past the 6x4, 4x2 and 8x1 tiles. Y has
 * a stride past n_rows whose padding must survive. */
enum { MM_F32, MM_F16, MM_Q8_0 };

static void matmul_call(const moas_ops *ops, int type, const void *w, size_t row_bytes,
                        int32_t n_rows, const float *x, size_t ldx, int32_t n_tok, int32_t n,
                        float *y, size_t ldy, unsigned hints) {
    (type == MM_F32   ? ops->matmul_f32
     : type == MM_F16 ? ops->matmul_f16
                      : ops->matmul_q8_0)(w, row_bytes, n_rows, x, ldx, n_tok, n, y, ldy, hints);
}

static float ref_dot(int type, const void *row, const float *x, int32_t n, double *sum_abs) {
    double s = 0;
    for (int32_t i = 0; i < n; i++) {
        double wi;
        if (type == MM_F32) {
            wi = ((const float *)row)[i];
        } else if (type == MM_F16) {
            wi = moas__f16_to_f32(((const uint16_t *)row)[i]);
        } else {
            const moas_block_q8_0 *b = (const moas_block_q8_0 *)row + i / MOAS_QK8_0;
            wi = (double)moas__f16_to_f32(b->d) * b->q[i % MOAS_QK8_0];
        }
        s += fabs(wi * x[i]);
    }
    *sum_abs = s;
    return type == MM_F32   ? row_dot_f32(&moas__ops_ref, row, x, n)
           : type == MM_F16 ? row_dot_f16(&moas__ops_ref, row, x, n)
                            : row_dot_q8_0(&moas__ops_ref, row, x, n);
}

static int check_matmul_type(const moas_ops *ops, int type) {
    static const int32_t rows[] = {1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 17};
    /* 37 tokens: more than a group of 32; 6, 7: a tile of 4 tokens and one of 2 or 3
     * after it, as 2 and 3 alone; 1041 and 1056 columns: more than a chunk of 1024
     * (ops_simd.h), 1041 with a scalar tail after it */
    static const int32_t toks[] = {1, 2, 3, 4, 5, 6, 7, 9, 37};
    static const int32_t ns_f[] = {1, 7, 16, 17, 33, 65, 257, 1041};
    static const int32_t ns_q[] = {32, 96, 160, 544, 1056};
    const char *what = type == MM_F32   ? "matmul_f32"
                       : type == MM_F16 ? "matmul_f16"
                                        : "matmul_q8_0";
    const int32_t *ns = type == MM_Q8_0 ? ns_q : ns_f;
    const size_t n_ns = type == MM_Q8_0 ? 5 : 8;
    uint64_t seed = 77 + (uint64_t)type;

    for (size_t a = 0; a < n_ns; a++) {
        const int32_t n = ns[a];
        const size_t q8_bytes = (size_t)(n / MOAS_QK8_0) * sizeof(moas_block_q8_0);
        const size_t row_bytes = type == MM_F32   ? (size_t)n * 4
                                 : type == MM_F16 ? (size_t)n * 2
                                                  : q8_bytes;
        for (size_t b = 0; b < sizeof rows / sizeof rows[0]; b++) {
            for (size_t c = 0; c < sizeof toks / sizeof toks[0]; c++) {
                const int32_t n_rows = rows[b], n_tok = toks[c];
                const size_t ldx = (size_t)n + 3, ldy = (size_t)n_rows + 2;
                void *wb, *xb, *yb, *zb;
                /* off a 64-byte boundary by one element: aligned only as the type requires */
                uint8_t *w =
                    alloc_at(row_bytes * (size_t)n_rows, 1, type == MM_F32 ? 4 : 2, &wb);
                float *x = alloc_at(ldx * (size_t)n_tok, sizeof *x, 1, &xb);
                float *y = alloc_at(ldy * (size_t)n_tok, sizeof *y, 0, &yb);
                float *z = alloc_at(ldy * (size_t)n_tok, sizeof *z, 0, &zb);
                ASSERT_TRUE(w != NULL && x != NULL && y != NULL && z != NULL);
                for (int32_t r = 0; r < n_rows; r++) {
                    uint8_t *row = w + (size_t)r * row_bytes;
                    for (int32_t i = 0; i < n; i++) {
                        const float v = next_val(&seed, (r + c) % 2 == 1);
                        if (type == MM_F32) {
                            memcpy(row + (size_t)i * 4, &v, 4);
                        } else if (type == MM_F16) {
                            const uint16_t h = moas__f32_to_f16(4.0f * v);
                            memcpy(row + (size_t)i * 2, &h, 2);
                        }
                    }
                    if (type == MM_Q8_0) {
                        float scratch[1056];
                        moas_block_q8_0 blocks[1056 / MOAS_QK8_0];
                        fill_q8_0(blocks, scratch, n, r % 2 == 1, &seed);
                        memcpy(row, blocks, row_bytes);
                    }
                }
                for (size_t i = 0; i < ldx * (size_t)n_tok; i++) {
                    x[i] = next_val(&seed, false);
                }
                for (size_t i = 0; i < ldy * (size_t)n_tok; i++) {
                    y[i] = z[i] = -1234.5f;
                }
                matmul_call(ops, type, w, row_bytes, n_rows, x, ldx, n_tok, n, y, ldy, 0);
                /* rows 1.. as a slice of their own (other tile boundaries), with the
                 * streaming hint (another order of work) */
                if (n_rows > 1) {
                    matmul_call(ops, type, w + row_bytes, row_bytes, n_rows - 1, x, ldx, n_tok,
                                n, z + 1, ldy, MOAS_MM_STREAM);
                }
                for (int32_t t = 0; t < n_tok; t++) {
                    for (int32_t r = 0; r < (int32_t)ldy; r++) {
                        const float got = y[(size_t)t * ldy + r];
                        if (r >= n_rows) {
                            ASSERT_TRUE(got == -1234.5f);  /* padding untouched */
                            continue;
                        }
                        const uint8_t *row = w + (size_t)r * row_bytes;
                        const float *xt = x + (size_t)t * ldx;
                        double sum_abs;
                        const float want = ref_dot(type, row, xt, n, &sum_abs);
                        CHECK_NEAR(what, n, r, got, want, dot_tol(n, sum_abs));
                        float alone;
                        matmul_call(ops, type, row, row_bytes, 1, xt, ldx, 1, n, &alone, 1, 0);
                        if (memcmp(&alone, &got, sizeof got) != 0 ||
                            (r > 0 && memcmp(&z[(size_t)t * ldy + r], &got, sizeof got) != 0)) {
                            test_report(__FILE__, __LINE__, what,
                                        "%s, n=%d, %d rows x %d tokens: element (%d, %d) is "
                                        "%.9g in the tile, %.9g alone, %.9g in a slice",
                                        ops->name, (int)n, (int)n_rows, (int)n_tok, (int)r,
                                        (int)t, (double)got, (double)alone,
                                        (double)z[(size_t)t * ldy + r]);
                            return TEST_FAIL;
                        }
                    }
                }
                free(wb);
                free(xb);
                free(yb);
                free(zb);
            }
        }
    }
    return TEST_PASS;
}

static int check_matmul(const moas_ops *ops) {
    int rc;
    if ((rc = check_matmul_type(ops, MM_F32)) != TEST_PASS) return rc;
    if ((rc = check_matmul_type(ops, MM_F16)) != TEST_PASS) return rc;
    return check_matmul_type(ops, MM_Q8_0);
}

/* attn_scores / attn_mix: one query head over n cached rows picked by a row index
 * (in any order, repeated, as ragged streams give them), at head sizes around the
 * vector widths and key counts around the four-key step. Scores against the reference
 * dot (dot_tol, then one more rounding for the scale); each score also bit for bit
 * against the same table scoring that key alone. The value sum, added onto what out
 * held, against the reference within 2 (n + 1) u (|out| + sum_j |p_j v_j|) (both sides
 * round n sequential additions), and bit for bit against the same sum in two runs.
 * When 1 to 16 queries go in one call (as many as decode gives one), each query's
 * scores and sums are bit for bit those of the query alone, also when each query reads
 * rows of its own. Rows of f32, f16, and Q8_0 (head sizes that are multiples of 32;
 * the reference values are its d * q). */
static int check_attention(const moas_ops *ops) {
    static const int32_t dims[] = {1, 7, 8, 16, 17, 24, 32, 33, 48, 64, 100, 128};
    static const int32_t counts[] = {0, 1, 3, 4, 5, 8, 9, 37};
    enum { POOL = 11, MAXD = 128, MAXN = 37 };
    uint64_t seed = 91;
    for (size_t a = 0; a < sizeof dims / sizeof dims[0]; a++) {
        for (size_t c = 0; c < sizeof counts / sizeof counts[0]; c++) {
            for (int kind = 0; kind < 3; kind++) {
                const int32_t d = dims[a], n = counts[c];
                const int f16 = kind == 1, q8 = kind == 2;
                if (q8 && d % MOAS_QK8_0 != 0) {
                    continue;
                }
                static float q[MAXD], kf[POOL * MAXD], vf[POOL * MAXD], out[MAXD], want[MAXD];
                static uint16_t kh[POOL * MAXD], vh[POOL * MAXD];
                static moas_block_q8_0 kq[POOL * MAXD / MOAS_QK8_0], vq[POOL * MAXD / MOAS_QK8_0];
                float sc[MAXN], p[MAXN];
                uint32_t rows[MAXN];
                for (int32_t i = 0; i < d; i++) {
                    q[i] = next_val(&seed, false);
                }
                for (int32_t i = 0; i < POOL * d; i++) {
                    kh[i] = moas__f32_to_f16(next_val(&seed, false));
                    vh[i] = moas__f32_to_f16(next_val(&seed, false));
                    kf[i] = f16 ? moas__f16_to_f32(kh[i]) : next_val(&seed, false);
                    vf[i] = f16 ? moas__f16_to_f32(vh[i]) : next_val(&seed, false);
                }
                if (q8) {   /* blocks of random scales and quants; kf, vf their values */
                    for (int32_t b = 0; b < POOL * d / MOAS_QK8_0; b++) {
                        kq[b].d = moas__f32_to_f16(0.01f + fabsf(next_val(&seed, false)) / 64);
                        vq[b].d = moas__f32_to_f16(0.01f + fabsf(next_val(&seed, false)) / 64);
                        for (int32_t i = 0; i < MOAS_QK8_0; i++) {
                            kq[b].q[i] = (int8_t)((int)(next_u64(&seed) % 255) - 127);
                            vq[b].q[i] = (int8_t)((int)(next_u64(&seed) % 255) - 127);
                            kf[b * MOAS_QK8_0 + i] = moas__f16_to_f32(kq[b].d) * kq[b].q[i];
                            vf[b * MOAS_QK8_0 + i] = moas__f16_to_f32(vq[b].d) * vq[b].q[i];
                        }
                    }
                }
                for (int32_t j = 0; j < n; j++) {
                    rows[j] = (uint32_t)(next_u64(&seed) % POOL);
                    p[j] = next_val(&seed, true);
                }
                float out0[MAXD], split[MAXD];
                for (int32_t i = 0; i < d; i++) {
                    out[i] = split[i] = out0[i] = next_val(&seed, false);
                }
                const float scale = 0.17f;
                const char *what_s = q8 ? "attn_scores_q8_0" : f16 ? "attn_scores_f16" : "attn_scores_f32";
                const char *what_m = q8 ? "attn_mix_q8_0" : f16 ? "attn_mix_f16" : "attn_mix_f32";
                const int32_t cut = n / 3;   /* the value sum in two runs of keys */
                void (*mix)(const void *, const uint32_t *, size_t, int32_t, const float *,
                            size_t, int32_t, int32_t, float *, size_t) =
                    q8 ? ops->attn_mix_q8_0 : f16 ? ops->attn_mix_f16 : ops->attn_mix_f32;
                const void *v = q8 ? (const void *)vq : f16 ? (const void *)vh : (const void *)vf;
                void (*score)(const void *, const uint32_t *, int32_t, const float *, size_t,
                              int32_t, int32_t, float, float *, size_t) =
                    q8 ? ops->attn_scores_q8_0 : f16 ? ops->attn_scores_f16 : ops->attn_scores_f32;
                const void *keys = q8 ? (const void *)kq : f16 ? (const void *)kh : (const void *)kf;
                score(keys, rows, n, q, 1, 1, d, scale, sc, 1);
                mix(v, rows, 0, n, p, 1, 1, d, out, 1);
                mix(v, rows, 0, cut, p, 1, 1, d, split, 1);
                mix(v, rows + cut, 0, n - cut, p + cut, 1, 1, d, split, 1);

                /* NQ queries in one call: each the bits of that query alone; the
                 * padding between queries' scores and outputs untouched */
                enum { NQ = 16, LDO = MAXD + 3, LDS = MAXN + 2 };
                static float pm[NQ][MAXN], om[NQ][LDO], oa[MAXD], qm[NQ][MAXD];
                static float sm[NQ][LDS];
                float sa[MAXN];
                for (int32_t t = 0; t < NQ; t++) {
                    for (int32_t i = 0; i < d; i++) {
                        qm[t][i] = next_val(&seed, false);
                    }
                }
                for (int32_t nq = 1; nq <= NQ; nq++) {
                    for (int32_t t = 0; t < NQ; t++) {
                        for (int32_t j = 0; j < LDS; j++) {
                            sm[t][j] = -1234.5f;
                        }
                    }
                    score(keys, rows, n, qm[0], MAXD, nq, d, scale, sm[0], LDS);
                    for (int32_t t = 0; t < NQ; t++) {
                        score(keys, rows, n, qm[t], MAXD, 1, d, scale, sa, 1);
                        for (int32_t j = 0; j < LDS; j++) {
                            CHECK_SAME_BITS(what_s, d, sm[t][j],
                                            t < nq && j < n ? sa[j] : -1234.5f);
                        }
                    }
                }
                for (int32_t t = 0; t < NQ; t++) {
                    for (int32_t j = 0; j < n; j++) {
                        pm[t][j] = next_val(&seed, true);
                    }
                    for (int32_t i = 0; i < LDO; i++) {
                        om[t][i] = i < d ? next_val(&seed, false) : -1234.5f;
                    }
                }
                for (int32_t nq = 1; nq <= NQ; nq++) {
                    static float ob[NQ][LDO];
                    memcpy(ob, om, sizeof ob);
                    mix(v, rows, 0, n, pm[0], MAXN, nq, d, ob[0], LDO);
                    for (int32_t t = 0; t < NQ; t++) {
                        memcpy(oa, om[t], sizeof oa);
                        if (t < nq) {
                            mix(v, rows, 0, n, pm[t], MAXN, 1, d, oa, MAXD);
                        }
                        for (int32_t i = 0; i < LDO; i++) {
                            CHECK_SAME_BITS(what_m, d, ob[t][i], i < d ? oa[i] : om[t][i]);
                        }
                    }
                }
                /* each query its own rows (ldr > 0), as the heads of one query read
                 * over tokens of different widths: query t the same as alone over
                 * rows_t; every other query shares its neighbour's rows, and at every
                 * fourth key all queries read one row (an MQA token's) */
                static uint32_t rg[NQ][MAXN];
                for (int32_t t = 0; t < NQ; t++) {
                    for (int32_t j = 0; j < n; j++) {
                        rg[t][j] = t > 0 && j % 4 == 1            ? rg[0][j]
                                   : t % 2 == 1 && j % 3 != 0 ? rg[t - 1][j]
                                                              : (uint32_t)(next_u64(&seed) % POOL);
                    }
                }
                /* the same at the attention scratch's strides, which the SIMD tables
                 * take as constants */
                static uint32_t rg64[NQ][MOAS_OPS_RUN_STRIDE];
                static float pm64[NQ][MOAS_OPS_RUN_STRIDE];
                for (int32_t t = 0; t < NQ; t++) {
                    memcpy(rg64[t], rg[t], (size_t)n * sizeof rg[t][0]);
                    memcpy(pm64[t], pm[t], (size_t)n * sizeof pm[t][0]);
                }
                for (int32_t nq = 1; nq <= NQ; nq++) {
                    static float ob[NQ][LDO], o64[NQ][LDO];
                    memcpy(ob, om, sizeof ob);
                    memcpy(o64, om, sizeof o64);
                    mix(v, rg[0], MAXN, n, pm[0], MAXN, nq, d, ob[0], LDO);
                    mix(v, rg64[0], MOAS_OPS_RUN_STRIDE, n, pm64[0], MOAS_OPS_RUN_STRIDE, nq, d,
                        o64[0], LDO);
                    for (int32_t t = 0; t < NQ; t++) {
                        memcpy(oa, om[t], sizeof oa);
                        if (t < nq) {
                            mix(v, rg[t], 0, n, pm[t], MAXN, 1, d, oa, MAXD);
                        }
                        for (int32_t i = 0; i < LDO; i++) {
                            CHECK_SAME_BITS(what_m, d, ob[t][i], i < d ? oa[i] : om[t][i]);
                            CHECK_SAME_BITS(what_m, d, o64[t][i], i < d ? oa[i] : om[t][i]);
                        }
                    }
                }
                for (int32_t j = 0; j < n; j++) {
                    const float *k = kf + (size_t)rows[j] * d;
                    double sum_abs = 0;
                    for (int32_t i = 0; i < d; i++) {
                        sum_abs += fabs((double)k[i] * q[i]);
                    }
                    const float ref = row_dot_f32(&moas__ops_ref, k, q, d) * scale;
                    CHECK_NEAR(what_s, d, j, sc[j], ref,
                               (dot_tol(d, sum_abs) + 2 * U32 * fabs(ref / scale)) * scale);
                    float alone;
                    score(keys, &rows[j], 1, q, 1, 1, d, scale, &alone, 1);
                    CHECK_SAME_BITS(what_s, d, sc[j], alone);
                }
                for (int32_t i = 0; i < d; i++) {
                    double sum_abs = fabs(out0[i]), w = out0[i];
                    for (int32_t j = 0; j < n; j++) {
                        const double t = (double)p[j] * vf[(size_t)rows[j] * d + i];
                        sum_abs += fabs(t);
                        w += t;
                    }
                    want[i] = (float)w;
                    CHECK_NEAR(what_m, d, i, out[i], want[i], 2.0 * (n + 1) * U32 * sum_abs);
                    CHECK_SAME_BITS(what_m, d, out[i], split[i]);
                }
            }
        }
    }
    return TEST_PASS;
}

/* max: the largest of init and x, NaN elements passed over, against a plain loop in
 * double: the same number at every length around the vector widths (a vector's lanes
 * and the scalar tail), with the largest element anywhere, infinities, NaNs, and an
 * init above, below or equal to every element. Zeros compare equal whatever their
 * sign (the one freedom a maximum taken in lanes has). */
static int check_max(const moas_ops *ops) {
    uint64_t seed = 23;
    for (int32_t n = 0; n <= 70; n++) {
        for (int variant = 0; variant < 6; variant++) {
            float x[70];
            for (int32_t i = 0; i < n; i++) {
                x[i] = 10.0f * next_val(&seed, false);
            }
            if (n > 0 && variant == 1) {
                x[next_u64(&seed) % (uint64_t)n] = NAN;
                x[next_u64(&seed) % (uint64_t)n] = NAN;
            }
            if (n > 0 && variant == 2) {
                x[next_u64(&seed) % (uint64_t)n] = INFINITY;
            }
            if (n > 0 && variant == 3) {   /* the largest at the last place, then the first */
                x[n - 1] = 99.0f;
                x[0] = n > 1 ? 98.0f : x[0];
            }
            if (variant == 4) {
                for (int32_t i = 0; i < n; i++) {
                    x[i] = (i % 3 == 0) ? -0.0f : (i % 3 == 1) ? 0.0f : -INFINITY;
                }
            }
            const float inits[] = {-INFINITY, 0.5f, 1000.0f, -0.0f};
            for (size_t k = 0; k < sizeof inits / sizeof inits[0]; k++) {
                const float init = variant == 5 && n > 0 ? x[n / 2] : inits[k];
                double want = init;
                for (int32_t i = 0; i < n; i++) {
                    if (x[i] == x[i] && x[i] > want) {
                        want = x[i];
                    }
                }
                const float got = ops->max(x, n, init);
                if (!(got == (float)want)) {
                    test_report(__FILE__, __LINE__, "max", "%s, n=%d, init %g: %.9g, want %.9g",
                                ops->name, (int)n, (double)init, (double)got, want);
                    return TEST_FAIL;
                }
            }
        }
    }
    return TEST_PASS;
}

/* exp_sum, for x <= max: each exponential within 4 u of libm's (the SIMD exp is within
 * 2 ulp; below e^-87 it gives e^-87, hence the absolute 2^-120), the sum within
 * (4 + 2n) u of the exact one (n additions on each side).
 * softmax: each probability within (8 + 2n) u of itself against the reference: both
 * sides round n exponentials (the SIMD exp is within 2 ulp), a sum of n terms (at
 * most n u relative each) and a scaling. Probabilities sum to 1 within the same bound,
 * and inputs far below the maximum give (almost) 0. */
static int check_softmax(const moas_ops *ops) {
    static const int32_t ns[] = {1, 2, 3, 7, 8, 15, 16, 17, 33, 127, 128, 129, 1000};
    uint64_t seed = 5;
    for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++) {
        for (int spread = 0; spread < 3; spread++) {
            const int32_t n = ns[a];
            const float range = spread == 0 ? 1.0f : spread == 1 ? 30.0f : 200.0f;
            float x[1000], r[1000], e[1000], er[1000];
            for (int32_t i = 0; i < n; i++) {
                x[i] = r[i] = e[i] = er[i] = range * next_val(&seed, false);
            }
            /* exp_sum against an offset above the maximum (as a running maximum can be) */
            float off = -INFINITY;
            for (int32_t i = 0; i < n; i++) {
                off = x[i] > off ? x[i] : off;
            }
            off += 0.25f * range;
            const double se = ops->exp_sum(e, n, off), ser = moas__ops_ref.exp_sum(er, n, off);
            double se_exact = 0;
            for (int32_t i = 0; i < n; i++) {
                CHECK_NEAR("exp_sum", n, i, e[i], er[i], 4 * U32 * er[i] + 0x1p-120);
                se_exact += exp((double)x[i] - off);
            }
            CHECK_NEAR("exp_sum total", n, 0, se, ser,
                       (4.0 + 2.0 * n) * U32 * se_exact + n * 0x1p-120);
            ops->softmax(x, n);
            moas__ops_ref.softmax(r, n);
            double sum = 0;
            for (int32_t i = 0; i < n; i++) {
                CHECK_NEAR("softmax", n, i, x[i], r[i], (8.0 + 2.0 * n) * U32 * r[i] + 0x1p-120);
                sum += x[i];
            }
            CHECK_NEAR("softmax sum", n, 0, sum, 1.0, (8.0 + 2.0 * n) * U32);
        }
    }
    return TEST_PASS;
}

/* GELU: within 0.5 |x| E + 4 u |ref| of libm's erff version, where E = 1e-6 bounds the
 * error of the SIMD erf: 1.5e-7 by construction plus its float evaluation near 0,
 * where 1 - t p e cancels (5.1e-7 measured at x = 0.073 on a grid of 2e5 points);
 * over a dense sweep of [-12, 12] and special values. */
#define GELU_ERF_ABS 1e-6
static int check_gelu(const moas_ops *ops) {
    enum { N = 4801 };
    static float in[N + 4], x[N + 4], r[N + 4];
    for (int32_t i = 0; i < N; i++) {
        in[i] = -12.0f + 24.0f * (float)i / (N - 1);
    }
    in[N] = 0.0f;
    in[N + 1] = -0.0f;
    in[N + 2] = 1e-30f;
    in[N + 3] = -40.0f;
    memcpy(x, in, sizeof x);
    memcpy(r, in, sizeof r);
    ops->gelu(x, N + 4);
    moas__ops_ref.gelu(r, N + 4);
    for (int32_t i = 0; i < N + 4; i++) {
        CHECK_NEAR("gelu", N + 4, i, x[i], r[i],
                   0.5 * fabs((double)in[i]) * GELU_ERF_ABS + 4 * U32 * fabs(r[i]));
    }
    float nan = NAN;
    ops->gelu(&nan, 1);
    ASSERT_TRUE(nan != nan);
    return TEST_PASS;
}

/* attn_mix with one key (y += a x), at every length, aligned and misaligned. y gets
 * one guard element past n that must survive. x[i] is read as f32 or f16. */
static int check_one_key(const moas_ops *ops, bool f16) {
    const char *what = f16 ? "attn_mix_f16 one key" : "attn_mix_f32 one key";
    const size_t esize = f16 ? sizeof(uint16_t) : sizeof(float);
    const float guard = 12345.0f;
    uint64_t seed = f16 ? 5 : 4;
    for (size_t k = 0; k < N_LENGTHS; k++) {
        const int32_t n = lengths[k];
        float *first = malloc(((size_t)n + 1) * sizeof *first);   /* result at offset 0 */
        float *y0 = malloc(((size_t)n + 1) * sizeof *y0);         /* y before the call */
        ASSERT_TRUE(first != NULL && y0 != NULL);
        for (int off = 0; off < 2; off++) {
            void *yb, *rb, *xb;
            float *y = alloc_at((size_t)n + 1, sizeof *y, (size_t)off, &yb);
            float *r = alloc_at((size_t)n + 1, sizeof *r, (size_t)off, &rb);
            void *x = alloc_at((size_t)n, esize, (size_t)off, &xb);
            uint16_t *xh = x;
            float *xf = x;
            ASSERT_TRUE(y != NULL && r != NULL && x != NULL);
            uint64_t s = seed;
            const float a = next_sym(&s) * 3.0f;
            for (int32_t i = 0; i < n; i++) {
                y0[i] = y[i] = r[i] = next_sym(&s);
                if (f16) {
                    xh[i] = moas__f32_to_f16(next_sym(&s));
                } else {
                    xf[i] = next_sym(&s);
                }
            }
            y[n] = r[n] = guard;
            if (f16) {
                one_key_axpy_f16(ops, y, a, xh, n);
                one_key_axpy_f16(&moas__ops_ref, r, a, xh, n);
            } else {
                one_key_axpy_f32(ops, y, a, xf, n);
                one_key_axpy_f32(&moas__ops_ref, r, a, xf, n);
            }
            for (int32_t i = 0; i < n; i++) {
                const double xi = f16 ? (double)moas__f16_to_f32(xh[i]) : (double)xf[i];
                CHECK_NEAR(what, n, off, y[i], r[i],
                           AXPY_TOL_UNITS * U32 * (fabs((double)y0[i]) + fabs(a * xi)));
                if (off == 0) {
                    first[i] = y[i];
                } else {
                    CHECK_SAME_BITS(what, n, first[i], y[i]);
                }
            }
            ASSERT_TRUE(y[n] == guard);
            free(yb);
            free(rb);
            free(xb);
        }
        free(first);
        free(y0);
        seed += 1000;
    }
    return TEST_PASS;
}

static int check_one_key_f32(const moas_ops *ops) { return check_one_key(ops, false); }
static int check_one_key_f16(const moas_ops *ops) { return check_one_key(ops, true); }

/* ---- special values -------------------------------------------------------------- */

/* Widening: 1 * h + (-0) is h exactly, for every binary16 h, so attn_mix_f16 with one
 * key of weight 1 onto out = -0 must reproduce moas__f16_to_f32 bit for bit: zeros of
 * both signs, all subnormals, infinities, and NaN as NaN. 65536 is a whole number of
 * vectors; 65535 values at an odd address put the last ones in the scalar tail. */
static int check_every_f16_widens_exactly(const moas_ops *ops) {
    const int32_t n = 0x10000;
    uint16_t *h = malloc((size_t)n * sizeof *h);
    float *y = malloc((size_t)n * sizeof *y);
    ASSERT_TRUE(h != NULL && y != NULL);
    for (int32_t start = 0; start < 2; start++) {
        for (int32_t i = 0; i < n; i++) {
            h[i] = (uint16_t)i;
            y[i] = -0.0f;
        }
        one_key_axpy_f16(ops, y + start, 1.0f, h + start, n - start);
        for (int32_t i = start; i < n; i++) {
            const float want = moas__f16_to_f32(h[i]);
            if (isnan(want) ? !isnan(y[i]) : memcmp(&want, &y[i], sizeof want) != 0) {
                test_report(__FILE__, __LINE__, "attn_mix_f16 widening",
                            "%s: half 0x%04x gave %.9g, want %.9g", ops->name, (unsigned)h[i],
                            (double)y[i], (double)want);
                free(h);
                free(y);
                return TEST_FAIL;
            }
        }
    }
    free(h);
    free(y);
    return TEST_PASS;
}

/* Subnormal half weights (every one, both signs) in a one-row matmul_f16: exact
 * products scaled up by x ~ 2^20, so only the summation rounds. Lengths end in each
 * loop. */
static int check_f16_subnormal_dot(const moas_ops *ops) {
    enum { N_SUB = 2 * 0x3ff };
    static const int32_t ns[] = {N_SUB, N_SUB - 1, N_SUB - 9, N_SUB - 30};
    uint16_t w[N_SUB];
    float x[N_SUB];
    uint64_t s = 6;
    for (int32_t i = 0; i < N_SUB; i++) {
        w[i] = (uint16_t)((i % 2 ? 0x8000u : 0) | (uint32_t)(1 + i / 2));
        x[i] = 0x1p20f * (1.0f + 0.5f * next_sym(&s));
    }
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        const int32_t n = ns[k];
        double sum_abs = 0;
        for (int32_t i = 0; i < n; i++) {
            sum_abs += fabs((double)moas__f16_to_f32(w[i]) * x[i]);
        }
        CHECK_NEAR("matmul_f16 subnormals", n, 0, row_dot_f16(ops, w, x, n),
                   row_dot_f16(&moas__ops_ref, w, x, n), dot_tol(n, sum_abs));
    }
    return TEST_PASS;
}

/* One infinity (or NaN) anywhere, in a vector lane or in the tail, decides a one-row
 * matmul (f32 and f16 weights) as it does in the reference: +inf * positive = +inf,
 * inf * 0 = NaN. */
static int check_inf_and_nan_in_dot(const moas_ops *ops) {
    enum { N = 77 };   /* 9 * 8 + 5 = 4 * 16 + 13: vector steps and a tail at both widths */
    float w[N], x[N];
    uint16_t h[N];
    uint64_t s = 7;
    for (int32_t k = 0; k < N; k++) {
        for (int32_t i = 0; i < N; i++) {
            w[i] = next_sym(&s);
            x[i] = 0.5f + 0.25f * next_sym(&s);   /* positive */
            h[i] = moas__f32_to_f16(w[i]);
        }
        w[k] = INFINITY;
        h[k] = 0x7c00;
        float d32 = row_dot_f32(ops, w, x, N), d16 = row_dot_f16(ops, h, x, N);
        if (!(isinf(d32) && d32 > 0 && isinf(d16) && d16 > 0)) {
            test_report(__FILE__, __LINE__, "inf in dot", "%s: +inf at %d gave %g, %g",
                        ops->name, (int)k, (double)d32, (double)d16);
            return TEST_FAIL;
        }
        x[k] = 0.0f;   /* inf * 0 */
        d32 = row_dot_f32(ops, w, x, N);
        d16 = row_dot_f16(ops, h, x, N);
        if (!(isnan(d32) && isnan(d16))) {
            test_report(__FILE__, __LINE__, "inf * 0 in dot", "%s: at %d gave %g, %g",
                        ops->name, (int)k, (double)d32, (double)d16);
            return TEST_FAIL;
        }
    }
    return TEST_PASS;
}

/* Q8_0 scales, in a one-row matmul_q8_0. An infinite scale makes the result
 * non-finite: infinite or NaN depending on the signs of the lanes' terms, which is not
 * part of the contract; but a non-finite scale gives the same bits in a batch of
 * tokens as alone. A subnormal scale still counts, within the usual tolerance. */
static int check_q8_0_special_scales(const moas_ops *ops) {
    enum { NB = 5, N = NB * MOAS_QK8_0 };
    moas_block_q8_0 w[NB];
    float x[N];
    uint64_t s = 8;
    fill_q8_0(w, x, N, false, &s);
    for (int32_t b = 0; b < NB; b++) {
        const uint16_t saved = w[b].d;
        w[b].d = b % 2 ? 0xfc00 : 0x7c00;  /* -inf, +inf */
        const float got = row_dot_q8_0(ops, w, x, N);
        const float want = row_dot_q8_0(&moas__ops_ref, w, x, N);
        if (isfinite(got) || isfinite(want)) {
            test_report(__FILE__, __LINE__, "inf scale", "%s: block %d gave %g, ref %g",
                        ops->name, (int)b, (double)got, (double)want);
            return TEST_FAIL;
        }
        /* a batch makes a block's values another way (ops_simd.h): same bits */
        enum { T = 5 };
        float xs[T][N], ys[T], alone;
        for (int32_t t = 0; t < T; t++) {
            for (int32_t i = 0; i < N; i++) {
                xs[t][i] = 0.5f + fabsf(x[(i + 7 * t) % N]);   /* positive: see below */
            }
        }
        /* -inf times q > 0 times x > 0 is -inf in every lane: an infinite sum, not NaN */
        moas_block_q8_0 kept = w[b];
        for (int i = 0; i < MOAS_QK8_0; i++) {
            w[b].q[i] = (int8_t)(1 + i);
        }
        w[b].d = b % 2 ? 0x7e00 : 0xfc00;   /* NaN, -inf */
        ops->matmul_q8_0(w, sizeof w, 1, xs[0], N, T, N, ys, 1, 0);
        for (int32_t t = 0; t < T; t++) {
            ops->matmul_q8_0(w, sizeof w, 1, xs[t], N, 1, N, &alone, 1, 0);
            if (memcmp(&alone, &ys[t], sizeof alone) != 0) {
                test_report(__FILE__, __LINE__, "non-finite scale", "%s: block %d, token %d: "
                            "%g in a batch, %g alone", ops->name, (int)b, (int)t,
                            (double)ys[t], (double)alone);
                return TEST_FAIL;
            }
        }
        w[b] = kept;
        w[b].d = saved;
    }
    for (int32_t b = 0; b < NB; b++) {
        w[b].d = (uint16_t)(0x0001 + 0x77 * b);  /* subnormal halves */
    }
    CHECK_NEAR("q8_0 subnormal scales", N, 0, row_dot_q8_0(ops, w, x, N),
               row_dot_q8_0(&moas__ops_ref, w, x, N), dot_tol(N, sum_abs_q8_0(w, x, N)));
    return TEST_PASS;
}

/* attn_mix_f32 with one key: an infinity in the value row x reaches y at that element
 * only; the others stay within the ordinary tolerance. */
static int check_inf_in_axpy(const moas_ops *ops) {
    enum { N = 77 };
    const float a = 0.5f;
    float y0[N], y[N], r[N], x[N];
    uint64_t s = 9;
    for (int32_t k = 0; k < N; k += 3) {
        for (int32_t i = 0; i < N; i++) {
            y0[i] = y[i] = r[i] = next_sym(&s);
            x[i] = next_sym(&s);
        }
        x[k] = -INFINITY;
        one_key_axpy_f32(ops, y, a, x, N);
        one_key_axpy_f32(&moas__ops_ref, r, a, x, N);
        for (int32_t i = 0; i < N; i++) {
            if (i == k) {
                ASSERT_TRUE(isinf(y[i]) && y[i] < 0);
            } else {
                CHECK_NEAR("attn_mix_f32 beside inf", N, 0, y[i], r[i],
                           AXPY_TOL_UNITS * U32 * (fabs((double)y0[i]) + fabs((double)a * x[i])));
            }
        }
    }
    return TEST_PASS;
}

/* exp_sum and softmax with a NaN score (a model with NaN weights can produce one):
 * that element's exp is NaN, and so is the sum, wherever it sits, in a vector's lanes
 * or in the scalar tail, as the reference's expf gives; max passes it over. */
static int check_nan_in_exp_sum(const moas_ops *ops) {
    static const int32_t ns[] = {1, 7, 8, 9, 16, 17, 33, 40};
    for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++) {
        const int32_t n = ns[a];
        for (int32_t p = 0; p < n; p++) {
            float x[40], s[40];
            for (int32_t i = 0; i < n; i++) {
                x[i] = s[i] = 0.125f * (float)(i % 5) - 0.25f;
            }
            x[p] = s[p] = NAN;
            const float max = ops->max(x, n, -INFINITY);   /* -inf when x is the NaN alone */
            const float sum = ops->exp_sum(x, n, max > -INFINITY ? max : 0.0f);
            if (!isnan(x[p]) || !isnan(sum)) {
                test_report(__FILE__, __LINE__, "exp_sum", "%s, n %d: a NaN at %d gave %g, sum %g",
                            ops->name, (int)n, (int)p, (double)x[p], (double)sum);
                return TEST_FAIL;
            }
            ops->softmax(s, n);
            for (int32_t i = 0; i < n; i++) {
                if (!isnan(s[i])) {
                    test_report(__FILE__, __LINE__, "softmax",
                                "%s, n %d: a NaN at %d left %g at %d", ops->name, (int)n,
                                (int)p, (double)s[i], (int)i);
                    return TEST_FAIL;
                }
            }
        }
    }
    return TEST_PASS;
}

static int check_special_values(const moas_ops *ops) {
    int rc;
    if ((rc = check_every_f16_widens_exactly(ops)) != TEST_PASS) return rc;
    if ((rc = check_f16_subnormal_dot(ops)) != TEST_PASS) return rc;
    if ((rc = check_inf_and_nan_in_dot(ops)) != TEST_PASS) return rc;
    if ((rc = check_q8_0_special_scales(ops)) != TEST_PASS) return rc;
    if ((rc = check_nan_in_exp_sum(ops)) != TEST_PASS) return rc;
    return check_inf_in_axpy(ops);
}

/* ---- the tests, per table ---------------------------------------------------------- */

/* kv_rows: every token's row for query head h against the definition with a division,
 * i = off[j] + h w / n_head, row = pages[i / 2^shift] 2^shift + i mod 2^shift: widths
 * drawn from one head, all of them, half and any count between, head counts from 1 to
 * the loader's largest, pages of 1 to 64 heads in a scrambled table, lengths around
 * the vector widths, off read from an unaligned place. */
static int check_kv_rows(const moas_ops *ops) {
    static const int32_t head_counts[] = {1, 2, 3, 4, 6, 8, 12, 25, 1024};
    static const int32_t lengths_rows[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 70};
    static const uint32_t shifts[] = {0, 1, 2, 3, 6};
    enum { MAX_N = 70, SKEW = 3 };
    uint64_t seed = 41;
    uint32_t *off = malloc((MAX_N + 1 + SKEW) * sizeof *off);
    int32_t *pages = malloc((size_t)(MAX_N * 1024 + 1) * sizeof *pages);
    uint32_t rows[MAX_N];
    ASSERT_TRUE(off != NULL && pages != NULL);
    for (int32_t p = 0; p < MAX_N * 1024 + 1; p++) {
        pages[p] = (int32_t)(((uint32_t)p * 7919u + 13u) % 100003u);
    }
    int rc = TEST_PASS;
    for (size_t a = 0; a < sizeof head_counts / sizeof head_counts[0] && rc == TEST_PASS; a++) {
        const int32_t n_head = head_counts[a];
        const uint64_t recip = moas__head_group_recip(n_head);
        for (size_t b = 0; b < sizeof lengths_rows / sizeof lengths_rows[0]; b++) {
            const int32_t n = lengths_rows[b];
            uint32_t *o = off + (b % 2 ? SKEW : 0);
            o[0] = (uint32_t)(next_u64(&seed) % 5);
            for (int32_t j = 0; j < n; j++) {
                const uint64_t r = next_u64(&seed);
                const uint32_t w = r % 4 == 0   ? (uint32_t)n_head
                                   : r % 4 == 1 ? 1u
                                   : r % 4 == 2 ? (uint32_t)(n_head + 1) / 2
                                                : 1u + (uint32_t)((r >> 8) % (uint64_t)n_head);
                o[j + 1] = o[j] + w;
            }
            for (size_t c = 0; c < sizeof shifts / sizeof shifts[0]; c++) {
                const uint32_t shift = shifts[c];
                for (int32_t h = 0; h < n_head; h += n_head > 12 ? n_head / 4 + 1 : 1) {
                    for (int pass = 0; pass < 2; pass++) {
                        const int32_t hh = pass == 0 ? h : n_head - 1 - h;
                        ops->kv_rows(o, pages, shift, (uint32_t)hh, recip, n, rows);
                        for (int32_t j = 0; j < n; j++) {
                            const uint32_t w = o[j + 1] - o[j];
                            const uint32_t i = o[j] + (uint32_t)hh * w / (uint32_t)n_head;
                            const uint32_t want = ((uint32_t)pages[i >> shift] << shift) |
                                                  (i & ((1u << shift) - 1u));
                            if (rows[j] != want && rc == TEST_PASS) {
                                test_report(__FILE__, __LINE__, "kv_rows",
                                            "%s, %d heads, h %d, n %d, shift %u, key %d: row "
                                            "%u, want %u",
                                            ops->name, (int)n_head, (int)hh, (int)n,
                                            (unsigned)shift, (int)j, (unsigned)rows[j],
                                            (unsigned)want);
                                rc = TEST_FAIL;
                            }
                        }
                    }
                }
            }
        }
    }
    free(off);
    free(pages);
    return rc;
}

/* to_f16: hand-worked conversions (rounding at the halfway points, the largest half,
 * overflow, subnormals, signed zeros, infinities, NaNs of any payload), then a million
 * random bit patterns against moas__f32_to_f16, at lengths around the vector widths,
 * from and to unaligned places; under the default rounding mode, and the hand-worked
 * ones and a part of the random ones again under the others (the conversion rounds to
 * nearest even whatever mode the process has set). */
static int check_to_f16_in_mode(const moas_ops *ops, int32_t n_random);

static int check_to_f16(const moas_ops *ops) {
    static const int modes[] = {FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO};
    int rc = check_to_f16_in_mode(ops, 1 << 20);
    for (size_t m = 0; m < sizeof modes / sizeof modes[0] && rc == TEST_PASS; m++) {
        fesetround(modes[m]);
        rc = check_to_f16_in_mode(ops, 1 << 16);
        fesetround(FE_TONEAREST);
    }
    return rc;
}

static int check_to_f16_in_mode(const moas_ops *ops, int32_t n_random) {
    static const struct {
        uint32_t f;
        uint16_t h;
    } cases[] = {
        {0x3f800000u, 0x3c00u},   /* 1 */
        {0xc0000000u, 0xc000u},   /* -2 */
        {0x3f801000u, 0x3c00u},   /* 1 + 2^-11: halfway, to even (down) */
        {0x3f803000u, 0x3c02u},   /* 1 + 3 2^-11: halfway, to even (up) */
        {0x3f801001u, 0x3c01u},   /* just above halfway */
        {0x477fe000u, 0x7bffu},   /* 65504, the largest half */
        {0x477fefffu, 0x7bffu},   /* just below 65520 */
        {0x477ff000u, 0x7c00u},   /* 65520: rounds to infinity */
        {0xc9742400u, 0xfc00u},   /* -1e6 */
        {0x33800000u, 0x0001u},   /* 2^-24, the smallest subnormal */
        {0x33000000u, 0x0000u},   /* 2^-25: halfway to it, to even (zero) */
        {0x33400000u, 0x0001u},   /* 3 2^-26 */
        {0x33c00000u, 0x0002u},   /* 3 2^-25: halfway, to even (up) */
        {0x34400000u, 0x0003u},   /* 3 2^-24 */
        {0x387fc000u, 0x03ffu},   /* the largest subnormal */
        {0x38800000u, 0x0400u},   /* 2^-14, the smallest normal */
        {0x00000001u, 0x0000u},   /* an f32 subnormal */
        {0x80000000u, 0x8000u},   /* -0 */
        {0x7f800000u, 0x7c00u},   /* infinity */
        {0xff800000u, 0xfc00u},
        {0x7fc00000u, 0x7e00u},   /* NaNs: quiet, payload dropped, sign kept */
        {0x7f800001u, 0x7e00u},
        {0x7fffffffu, 0x7e00u},
        {0xffc00123u, 0xfe00u},
    };
    enum { N_CASES = sizeof cases / sizeof cases[0], MAX_N = 70 };
    static const int32_t counts[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 70};
    float x[MAX_N + 1];
    uint16_t out[MAX_N + 1], want[MAX_N + 1];
    uint64_t seed = 43;
    int rc = TEST_PASS;

    for (int32_t c = 0; c < N_CASES; c++) {   /* each case in lanes all over a vector */
        for (int32_t i = 0; i < 33; i++) {
            x[i] = moas__f32_from_bits((i * 7 + c) % 3 == 0 ? cases[c].f : 0x3f800000u);
        }
        ops->to_f16(x, out, 33);
        for (int32_t i = 0; i < 33 && rc == TEST_PASS; i++) {
            const uint16_t h = (i * 7 + c) % 3 == 0 ? cases[c].h : 0x3c00u;
            if (out[i] != h || moas__f32_to_f16(x[i]) != h) {
                test_report(__FILE__, __LINE__, "to_f16",
                            "%s, rounding %d: 0x%08x in lane %d: 0x%04x, want 0x%04x", ops->name,
                            fegetround(), (unsigned)moas__f32_bits(x[i]), (int)i,
                            (unsigned)out[i], (unsigned)h);
                rc = TEST_FAIL;
            }
        }
    }
    for (int32_t done = 0; done < n_random && rc == TEST_PASS;) {
        for (size_t b = 0; b < sizeof counts / sizeof counts[0] && rc == TEST_PASS; b++) {
            const int32_t n = counts[b], skew = (int32_t)(b % 2);
            for (int32_t i = 0; i < n; i++) {
                x[skew + i] = moas__f32_from_bits((uint32_t)(next_u64(&seed) >> 32));
                want[i] = moas__f32_to_f16(x[skew + i]);
            }
            ops->to_f16(x + skew, out + 1 - skew, n);
            for (int32_t i = 0; i < n && rc == TEST_PASS; i++) {
                if (out[1 - skew + i] != want[i]) {
                    test_report(__FILE__, __LINE__, "to_f16",
                                "%s, rounding %d: 0x%08x: 0x%04x, want 0x%04x", ops->name,
                                fegetround(), (unsigned)moas__f32_bits(x[skew + i]),
                                (unsigned)out[1 - skew + i], (unsigned)want[i]);
                    rc = TEST_FAIL;
                }
            }
            done += n;
        }
    }
    return rc;
}

/* to_q8_0: blocks against the definition written out here (largest |x| passing NaNs
 * over, d = amax / 127, q = x / d rounded half away from zero, clamped to [-127, 127],
 * NaN 0): ties at every lane (x id exactly k + 1/2), 0.49999997, infinities and NaNs,
 * blocks so small that d is subnormal or 1 / d infinite, then random blocks of random
 * scales; from an unaligned x, under every rounding mode. */
static void want_q8_0(const float *x, moas_block_q8_0 *out) {
    float amax = 0.0f;
    for (int i = 0; i < MOAS_QK8_0; i++) {
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
        }
    }
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    out->d = moas__f32_to_f16(d);
    for (int i = 0; i < MOAS_QK8_0; i++) {
        const float v = x[i] * id;
        out->q[i] = (int8_t)(isnan(v) ? 0.0f : v >= 127.0f ? 127.0f : v <= -127.0f ? -127.0f
                                                                                  : roundf(v));
    }
}

static int check_to_q8_0_in_mode(const moas_ops *ops) {
    enum { BLOCKS = 8, N = BLOCKS * MOAS_QK8_0 };
    static const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 0.49999997f,
                                     -0.49999997f, 126.5f, -126.5f, 1e-38f, -1e-45f};
    float x[N + 1];
    moas_block_q8_0 out[BLOCKS], want[BLOCKS];
    uint64_t seed = 53;
    for (int round = 0; round < 4000; round++) {
        float *xs = x + 1;   /* unaligned */
        for (int b = 0; b < BLOCKS; b++) {
            float *xb = xs + b * MOAS_QK8_0;
            const uint64_t kind = next_u64(&seed) % 6;
            /* scales from 2^-140 (subnormal d, or 1 / d infinite) to 2^20 */
            const float scale = ldexpf(1.0f, (int)(next_u64(&seed) % 161) - 140);
            for (int i = 0; i < MOAS_QK8_0; i++) {
                const uint64_t r = next_u64(&seed);
                if (kind == 0) {          /* d = 1 or 1/2: x id exactly k + 1/2 */
                    xb[i] = ((float)((int)(r % 254) - 127) + 0.5f) / (round % 2 ? 2.0f : 1.0f);
                } else if (kind == 1 && r % 8 == 0) {
                    xb[i] = specials[(r >> 8) % (sizeof specials / sizeof specials[0])];
                } else {
                    xb[i] = next_val(&seed, false) * scale;
                }
            }
            if (kind == 0) {
                xb[next_u64(&seed) % MOAS_QK8_0] = round % 2 ? 63.5f : 127.0f;   /* sets d */
            }
        }
        ops->to_q8_0(xs, out, N);
        for (int b = 0; b < BLOCKS; b++) {
            want_q8_0(xs + b * MOAS_QK8_0, &want[b]);
            if (memcmp(&out[b], &want[b], sizeof out[b]) != 0) {
                int i = 0;
                while (i < MOAS_QK8_0 && out[b].q[i] == want[b].q[i]) {
                    i++;
                }
                test_report(__FILE__, __LINE__, "to_q8_0",
                            "%s, rounding %d, round %d, block %d: d 0x%04x (want 0x%04x), "
                            "element %d of x %a: %d, want %d", ops->name, fegetround(), round,
                            b, (unsigned)out[b].d, (unsigned)want[b].d, i,
                            (double)xs[b * MOAS_QK8_0 + (i < MOAS_QK8_0 ? i : 0)],
                            i < MOAS_QK8_0 ? out[b].q[i] : 0, i < MOAS_QK8_0 ? want[b].q[i] : 0);
                return TEST_FAIL;
            }
        }
    }
    return TEST_PASS;
}

static int check_to_q8_0(const moas_ops *ops) {
    static const int modes[] = {FE_TONEAREST, FE_UPWARD, FE_DOWNWARD, FE_TOWARDZERO};
    int rc = TEST_PASS;
    for (size_t m = 0; m < sizeof modes / sizeof modes[0] && rc == TEST_PASS; m++) {
        fesetround(modes[m]);
        rc = check_to_q8_0_in_mode(ops);
        fesetround(FE_TONEAREST);
    }
    return rc;
}

/* add: y += x element by element, against the scalar sum, over random values (with
 * infinities, NaN and signed zeros among them) at lengths around the vector widths,
 * from and to unaligned places; the elements past n stay as they were. */
static int check_add(const moas_ops *ops) {
    static const int32_t counts[] = {0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 70, 193};
    static const float specials[] = {INFINITY, -INFINITY, NAN, 0.0f, -0.0f, 65504.0f};
    enum { MAX_N = 193 };
    float x[MAX_N + 1], y[MAX_N + 2], want[MAX_N + 2];
    uint64_t seed = 47;
    for (size_t b = 0; b < sizeof counts / sizeof counts[0]; b++) {
        const int32_t n = counts[b], skew = (int32_t)(b % 2);
        for (int32_t i = 0; i < MAX_N + 2; i++) {
            y[i] = next_val(&seed, false) * 8.0f;
            if (i < MAX_N + 1) {
                const uint64_t r = next_u64(&seed);
                x[i] = r % 16 == 0 ? specials[(r >> 8) % 6] : next_val(&seed, false);
            }
        }
        memcpy(want, y, sizeof y);
        for (int32_t i = 0; i < n; i++) {
            want[1 - skew + i] += x[skew + i];
        }
        ops->add(y + 1 - skew, x + skew, n);
        for (int32_t i = 0; i < MAX_N + 2; i++) {
            if (moas__f32_bits(y[i]) != moas__f32_bits(want[i])) {
                test_report(__FILE__, __LINE__, "add", "%s, n %d, element %d: %a, want %a",
                            ops->name, (int)n, (int)i, (double)y[i], (double)want[i]);
                return TEST_FAIL;
            }
        }
    }
    return TEST_PASS;
}

static const moas_ops *find_table(const char *name) {
    for (size_t i = 0; moas__ops_tables[i] != NULL; i++) {
        if (strcmp(moas__ops_tables[i]->name, name) == 0) {
            return moas__ops_tables[i];
        }
    }
    return NULL;
}

/* Runs `check` on the table `name`, or skips: not built here, or not runnable here. */
static int on_table(const char *name, const char *needs, int (*check)(const moas_ops *)) {
    static char reason[160];
    const moas_ops *ops = find_table(name);
    if (ops == NULL) {
        snprintf(reason, sizeof reason, "no %s table on this architecture", name);
        return test_skip(reason);
    }
    if (!moas__ops_runs_here(ops)) {
        snprintf(reason, sizeof reason, "this CPU lacks %s", needs);
        return test_skip(reason);
    }
    return check(ops);
}

#define KERNEL_TESTS(table_, needs_)                                                     \
    TEST(kernels_##table_##_matmul_one_row_f32_matches_ref) {                            \
        return on_table(#table_, needs_, check_one_row_f32);                             \
    }                                                                                    \
    TEST(kernels_##table_##_matmul_one_row_f16_matches_ref) {                            \
        return on_table(#table_, needs_, check_one_row_f16);                             \
    }                                                                                    \
    TEST(kernels_##table_##_matmul_one_row_q8_0_matches_ref) {                           \
        return on_table(#table_, needs_, check_one_row_q8_0);                            \
    }                                                                                    \
    TEST(kernels_##table_##_matmul_matches_ref_and_tiles_agree) {                        \
        return on_table(#table_, needs_, check_matmul);                                  \
    }                                                                                    \
    TEST(kernels_##table_##_attention_max_softmax_gelu_match_ref) {                          \
        int rc_ = on_table(#table_, needs_, check_attention);                            \
        if (rc_ == TEST_PASS) rc_ = on_table(#table_, needs_, check_softmax);            \
        if (rc_ == TEST_PASS) rc_ = on_table(#table_, needs_, check_max);                \
        if (rc_ == TEST_PASS) rc_ = on_table(#table_, needs_, check_gelu);               \
        return rc_;                                                                      \
    }                                                                                    \
    TEST(kernels_##table_##_attn_mix_one_key_f32_matches_ref) {                          \
        return on_table(#table_, needs_, check_one_key_f32);                             \
    }                                                                                    \
    TEST(kernels_##table_##_attn_mix_one_key_f16_matches_ref) {                          \
        return on_table(#table_, needs_, check_one_key_f16);                             \
    }                                                                                    \
    TEST(kernels_##table_##_special_values) {                                            \
        return on_table(#table_, needs_, check_special_values);                          \
    }                                                                                    \
    TEST(kernels_##table_##_kv_rows_match_definition) {                                  \
        return on_table(#table_, needs_, check_kv_rows);                                 \
    }                                                                                    \
    TEST(kernels_##table_##_to_f16_matches_definition) {                                 \
        return on_table(#table_, needs_, check_to_f16);                                  \
    }                                                                                    \
    TEST(kernels_##table_##_add_matches_definition) {                                    \
        return on_table(#table_, needs_, check_add);                                     \
    }                                                                                    \
    TEST(kernels_##table_##_to_q8_0_matches_definition) {                                \
        return on_table(#table_, needs_, check_to_q8_0);                                 \
    }

KERNEL_TESTS(avx2, "AVX2, FMA or F16C")
KERNEL_TESTS(avx512, "AVX-512F, AVX2, FMA or F16C")

/* The reference compared with itself: the harness and tolerances accept it, so a
 * failure above is the table's, not the test's. Runs on every architecture. */
KERNEL_TESTS(ref, "nothing")

/* ---- selection ------------------------------------------------------------------- */

/* The table the CPU's features call for, found without libmoas: GCC/Clang builtins
 * and CPUID, and on Linux the kernel's own flag list too. */
#if defined(__x86_64__) && defined(__GNUC__)
static const char *expected_table_builtin(void) {
    unsigned eax, ebx, ecx, edx;
    const bool f16c = __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c;
    if (avx2 && __builtin_cpu_supports("avx512f")) return "avx512";
    return avx2 ? "avx2" : "ref";
}

/* Whether a "flags : a b c" line lists `flag` as a whole word. */
static bool has_flag(const char *line, const char *flag) {
    const size_t n = strlen(flag);
    for (const char *p = strstr(line, flag); p != NULL; p = strstr(p + 1, flag)) {
        if (p[-1] == ' ' && (p[n] == ' ' || p[n] == '\n' || p[n] == '\0')) {
            return true;
        }
    }
    return false;
}

/* NULL when /proc/cpuinfo is not there to read. */
static const char *expected_table_cpuinfo(void) {
    static char line[16384];
    FILE *f = fopen("/proc/cpuinfo", "r");
    const char *found = NULL;
    if (f == NULL) {
        return NULL;
    }
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "flags", 5) == 0) {
            const bool avx2 = has_flag(line, "avx2") && has_flag(line, "fma") &&
                              has_flag(line, "f16c");
            found = avx2 && has_flag(line, "avx512f") ? "avx512" : avx2 ? "avx2" : "ref";
            break;
        }
    }
    fclose(f);
    return found;
}
#endif

TEST(kernels_select_ref_or_fastest_runnable) {
    ASSERT_TRUE(moas__ops_select(MOAS_KERNELS_REF) == &moas__ops_ref);
    ASSERT_STR_EQ(moas__ops_ref.name, "ref");

    const moas_ops *best = moas__ops_select(MOAS_KERNELS_AUTO);
    ASSERT_TRUE(best != NULL && moas__ops_runs_here(best));
    /* The first runnable table in the list, which is ordered fastest first. */
    for (size_t i = 0; moas__ops_tables[i] != best; i++) {
        ASSERT_TRUE(moas__ops_tables[i] != NULL);
        ASSERT_TRUE(!moas__ops_runs_here(moas__ops_tables[i]));
    }
#if defined(__x86_64__) && defined(__GNUC__)
    ASSERT_STR_EQ(best->name, expected_table_builtin());
    const char *from_cpuinfo = expected_table_cpuinfo();
    if (from_cpuinfo != NULL) {
        ASSERT_STR_EQ(best->name, from_cpuinfo);
    }
#else
    ASSERT_STR_EQ(best->name, "ref");
#endif
    return TEST_PASS;
}

/* Every table fills every entry, names are distinct, the reference comes last. */
TEST(kernels_tables_are_complete) {
    size_t n = 0;
    for (; moas__ops_tables[n] != NULL; n++) {
        const moas_ops *t = moas__ops_tables[n];
        ASSERT_TRUE(t->name != NULL && t->matmul_f32 != NULL && t->matmul_f16 != NULL &&
                    t->matmul_q8_0 != NULL &&
                    t->attn_scores_f32 != NULL && t->attn_scores_f16 != NULL &&
                    t->attn_mix_f32 != NULL && t->attn_mix_f16 != NULL &&
                    t->attn_scores_q8_0 != NULL && t->attn_mix_q8_0 != NULL && t->max != NULL &&
                    t->exp_sum != NULL && t->softmax != NULL && t->gelu != NULL &&
                    t->kv_rows != NULL && t->to_f16 != NULL && t->to_q8_0 != NULL &&
                    t->add != NULL);
        for (size_t j = 0; j < n; j++) {
            ASSERT_TRUE(strcmp(moas__ops_tables[j]->name, t->name) != 0);
        }
    }
    ASSERT_TRUE(n >= 1 && moas__ops_tables[n - 1] == &moas__ops_ref);
    return TEST_PASS;
}
