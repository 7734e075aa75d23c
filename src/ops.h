/*
 * ops.h - the table of hot kernels: the matrix products of the projections, the
 * attention of one query head over cached keys and values, softmax and GELU.
 *
 * ops_ref.c holds the portable reference of every kernel: plain loops, always built,
 * and the specification the SIMD versions are tested against (tests/test_kernels.c).
 * ops_avx2.c and ops_avx512.c hold x86-64 tables, each compiled with its own ISA flags;
 * both take their kernels from one template, ops_simd.h, at their vector width.
 * ops_select.c picks one from the CPU's features. A context picks one table when it
 * is created and keeps the pointer.
 *
 * Every kernel accepts any n >= 0 (and n_rows, n_tok, head_dim >= 0) and pointers with
 * only their element type's alignment. A given table's result depends only on the
 * values and n, never on the pointers' alignment or the thread calling it; different
 * tables may differ by float rounding (the summation order differs).
 */
#ifndef MOAS_OPS_H
#define MOAS_OPS_H

#include "core.h"
#include "f16.h"

/* matmul hints. STREAM: the weights come from memory, not cache (a model much larger
 * than the last-level cache): a single token reads rows one at a time, front to back,
 * which the hardware prefetcher follows best. */
#define MOAS_MM_STREAM 1u

/* The stride of the attention scratch's rows of scores and K/V rows (a run of keys,
 * MOAS_ATT_KEYS in context.h, which asserts they agree). */
#define MOAS_OPS_RUN_STRIDE 64

typedef struct moas_ops {
    const char *name;  /* "ref", "avx2", ... */

    /* Matrix products, for the projections: for r < n_rows and t < n_tok,
     *   y[t * ldy + r] = (row r of w) . (x + t * ldx),
     * rows of n columns in the kernel's weight type, `row_bytes` apart (n % 32 == 0
     * for Q8_0; n = 0 is a product of empty rows: every y is 0). Each element of y is
     * the same bits whatever n_rows and n_tok are and wherever it sits among them, so
     * a batch of tokens gives what its tokens give one at a time, and any split of the
     * rows among threads gives the same result. `hints` (MOAS_MM_*) choose how the
     * work is ordered, never what is computed: the bits are the same for any hints.
     * The SIMD tables use up to 40 KB of stack for a batch (ops_simd.h). */
    void (*matmul_f32)(const void *w, size_t row_bytes, int32_t n_rows, const float *x,
                       size_t ldx, int32_t n_tok, int32_t n, float *y, size_t ldy,
                       unsigned hints);
    void (*matmul_f16)(const void *w, size_t row_bytes, int32_t n_rows, const float *x,
                       size_t ldx, int32_t n_tok, int32_t n, float *y, size_t ldy,
                       unsigned hints);
    void (*matmul_q8_0)(const void *w, size_t row_bytes, int32_t n_rows, const float *x,
                        size_t ldx, int32_t n_tok, int32_t n, float *y, size_t ldy,
                        unsigned hints);

    /* Attention of one query head over n cached tokens: token j's key or value row
     * for this head is row rows[j] of k or v (rows of head_dim, f32 or f16, or Q8_0
     * blocks of 32 when head_dim is a multiple of 32: the cache's element type), so one
     * kernel serves uniform and ragged streams. A Q8_0 element is used as d * q.
     * For each of nq queries t (q_t = q + t * ldq, scores_t = scores + t * lds, p_t =
     * p + t * ldp, out_t = out + t * ldo):
     *   scores_t[j] = (q_t . k_row(j)) * scale                           (attn_scores)
     *   out_t += p_t[j] v_row(j) for j = 0, 1, ..., n - 1, in that order (attn_mix)
     * attn_mix's queries read the same rows when ldr is 0, and query t rows + t * ldr
     * otherwise (the heads of one query, over tokens of different widths); with ldr =
     * ldp = MOAS_OPS_RUN_STRIDE, the attention scratch's, the SIMD tables take both as
     * constants (the same result, fewer registers).
     * Each score is the same bits whatever n, nq and its place among them, and a value
     * sum likewise, and split into runs of keys it equals one call over all of them: a
     * query decoded alone and inside a batch agree. */
    void (*attn_scores_f32)(const void *k, const uint32_t *rows, int32_t n, const float *q,
                            size_t ldq, int32_t nq, int32_t head_dim, float scale,
                            float *scores, size_t lds);
    void (*attn_scores_f16)(const void *k, const uint32_t *rows, int32_t n, const float *q,
                            size_t ldq, int32_t nq, int32_t head_dim, float scale,
                            float *scores, size_t lds);
    void (*attn_mix_f32)(const void *v, const uint32_t *rows, size_t ldr, int32_t n,
                         const float *p, size_t ldp, int32_t nq, int32_t head_dim,
                         float *out, size_t ldo);
    void (*attn_mix_f16)(const void *v, const uint32_t *rows, size_t ldr, int32_t n,
                         const float *p, size_t ldp, int32_t nq, int32_t head_dim,
                         float *out, size_t ldo);
    void (*attn_scores_q8_0)(const void *k, const uint32_t *rows, int32_t n, const float *q,
                             size_t ldq, int32_t nq, int32_t head_dim, float scale,
                             float *scores, size_t lds);
    void (*attn_mix_q8_0)(const void *v, const uint32_t *rows, size_t ldr, int32_t n,
                          const float *p, size_t ldp, int32_t nq, int32_t head_dim,
                          float *out, size_t ldo);

    /* The K/V rows query head h of n_head reads of n tokens of a ragged stream (the
     * attention kernels' `rows`): for j < n, with w_j = off[j + 1] - off[j] the token's
     * heads and i_j = off[j] + h w_j / n_head the stream head it keeps for h,
     *   rows[j] = pages[i_j >> shift] 2^shift + (i_j mod 2^shift),
     * the pool row of that head in pages of 2^shift heads (moas__page_row). `recip` is
     * moas__head_group_recip(n_head), and h w_j / n_head is taken as a product with it
     * (moas__head_group: exact for h < n_head and w_j <= n_head <= MOAS_MAX_HEADS).
     * off has n + 1 entries. Integers only: every table gives the same rows. Decode
     * finds one per key and query head group, and random text changes the width
     * every few keys, so it is worth lanes. */
    void (*kv_rows)(const uint32_t *off, const int32_t *pages, uint32_t shift, uint32_t h,
                    uint64_t recip, int32_t n, uint32_t *rows);

    /* out[i] = x[i] as binary16 for i < n: moas__f32_to_f16 element by element (to
     * nearest even, overflow to infinity, every NaN the quiet NaN 0x7e00 with x's
     * sign), the same bits in every table. An f16 K/V cache stores its heads with it:
     * a batched step stores thousands (64 small-shape sequences decoded 1.03-1.05x
     * faster than with the scalar loop). */
    void (*to_f16)(const float *x, uint16_t *out, int32_t n);

    /* x[0 .. n) as n / MOAS_QK8_0 Q8_0 blocks (n a multiple of MOAS_QK8_0): per block
     * amax = the largest |x[i]| (NaNs passed over), d = amax / 127, id = 1 / d (0 when d
     * is 0), out.d = d as binary16 (moas__f32_to_f16) and out.q[i] =
     * moas__q8_0_round(x[i] id), the same bits in every table. A Q8_0 K/V cache stores
     * its heads with it. */
    void (*to_q8_0)(const float *x, moas_block_q8_0 *out, int32_t n);

    /* y[i] += x[i] for i < n: one rounding each, the same bits in every table. Biases
     * and residuals: a batched step adds them to thousands of elements. */
    void (*add)(float *y, const float *x, int32_t n);

    /* The largest of init and x[0 .. n), n >= 0, taken as m = x > m ? x : m element
     * by element (so a NaN x is passed over): a maximum in any order, the same value
     * in every table (a zero's sign aside, which no caller tells apart). */
    float (*max)(const float *x, int32_t n, float init);
    /* x = exp(x - max) over n >= 0 elements with every x <= max (the SIMD tables'
     * exp is for arguments <= 0); returns the sum of the results. */
    float (*exp_sum)(float *x, int32_t n, float max);
    /* x = softmax(x) over n >= 0 elements, largest first subtracted. */
    void (*softmax)(float *x, int32_t n);
    /* x = GELU(x) = 0.5 x (1 + erf(x / sqrt 2)) elementwise (the exact-erf GELU, not the
     * tanh one); the SIMD tables approximate erf within 1e-6 absolute (ops_simd.h). */
    void (*gelu)(float *x, int32_t n);
} moas_ops;

extern const moas_ops moas__ops_ref;

#if defined(__x86_64__)
/* ops_avx2.c, ops_avx512.c: call only where moas__ops_runs_here() says so. */
extern const moas_ops moas__ops_avx2;    /* "avx2":   AVX2 + FMA + F16C */
extern const moas_ops moas__ops_avx512;  /* "avx512": AVX-512F + AVX2 + FMA + F16C */
#endif

/* Every table built for this architecture, fastest first, ending with the reference,
 * then NULL. Tests and benchmarks walk it; a context uses moas__ops_select(). */
extern const moas_ops *const moas__ops_tables[];

/* Whether this CPU, and the OS's saved register state, can run `ops`. Detects the
 * features afresh on each call; the reference runs everywhere. */
bool moas__ops_runs_here(const moas_ops *ops);

/* The fastest table this CPU runs, or the reference when `kind` asks for it. Called
 * once per context, at creation; the context keeps the pointer. */
const moas_ops *moas__ops_select(moas_kernels kind);

#endif /* MOAS_OPS_H */
