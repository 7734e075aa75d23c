/*
 * ops_ref.c - the reference kernels: the specification of every entry in moas_ops.
 *
 * Plain loops, accumulating in float in index order, so a result is reproducible from
 * the definition alone. SIMD tables are tested against these at awkward lengths.
 */
#include "ops.h"

#include "kv_cache.h"

#include <math.h>

/* The dot products and y += a x below are not table entries: the matrix products and
 * the attention kernels are defined through them. */

static float dot_f32_ref(const float *w, const float *x, int32_t n) {
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        sum += w[i] * x[i];
    }
    return sum;
}

static float dot_f16_ref(const uint16_t *w, const float *x, int32_t n) {
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        sum += moas__f16_to_f32(w[i]) * x[i];
    }
    return sum;
}

/* A Q8_0 weight is the value d * q (docs/FORMAT.md), exact in float, so the product
 * is the f32 one over those values. */
static float dot_q8_0_ref(const moas_block_q8_0 *w, const float *x, int32_t n) {
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        const moas_block_q8_0 *blk = &w[i / MOAS_QK8_0];
        sum += moas__f16_to_f32(blk->d) * (float)blk->q[i % MOAS_QK8_0] * x[i];
    }
    return sum;
}

static void axpy_f32_ref(float *y, float a, const float *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        y[i] += a * x[i];
    }
}

static void axpy_f16_ref(float *y, float a, const uint16_t *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        y[i] += a * moas__f16_to_f32(x[i]);
    }
}

/* Every element by a dot product above: trivially position-independent; the hints
 * change nothing here. */
#define DEFINE_MATMUL_REF(type)                                                            \
    static void matmul_##type##_ref(const void *w, size_t row_bytes, int32_t n_rows,       \
                                    const float *x, size_t ldx, int32_t n_tok, int32_t n,  \
                                    float *y, size_t ldy, unsigned hints) {                \
        (void)hints;                                                                       \
        for (int32_t t = 0; t < n_tok; t++) {                                              \
            for (int32_t r = 0; r < n_rows; r++) {                                         \
                const void *row = (const uint8_t *)w + (size_t)r * row_bytes;              \
                y[(size_t)t * ldy + r] = dot_##type##_ref(row, x + (size_t)t * ldx, n);    \
            }                                                                              \
        }                                                                                  \
    }

DEFINE_MATMUL_REF(f32)
DEFINE_MATMUL_REF(f16)
DEFINE_MATMUL_REF(q8_0)

static void axpy_q8_0_ref(float *y, float a, const moas_block_q8_0 *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        const moas_block_q8_0 *blk = &x[i / MOAS_QK8_0];
        y[i] += a * (moas__f16_to_f32(blk->d) * (float)blk->q[i % MOAS_QK8_0]);
    }
}

/* The attention kernels of one element type, every query by the dot product and
 * y += a x above, keys in order; a row is `per_row` elems. */
#define DEFINE_ATTN_REF(type, elem, per_row)                                               \
    static void attn_scores_##type##_ref(const void *k, const uint32_t *rows, int32_t n,   \
                                         const float *q, size_t ldq, int32_t nq,           \
                                         int32_t head_dim, float scale, float *scores,     \
                                         size_t lds) {                                     \
        for (int32_t t = 0; t < nq; t++) {                                                 \
            for (int32_t j = 0; j < n; j++) {                                              \
                const elem *row = (const elem *)k + (size_t)rows[j] * (per_row);           \
                scores[(size_t)t * lds + j] =                                              \
                    dot_##type##_ref(row, q + (size_t)t * ldq, head_dim) * scale;          \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
    static void attn_mix_##type##_ref(const void *v, const uint32_t *rows, size_t ldr,     \
                                      int32_t n, const float *p, size_t ldp, int32_t nq,   \
                                      int32_t head_dim, float *out, size_t ldo) {          \
        for (int32_t t = 0; t < nq; t++) {                                                 \
            const uint32_t *rt = rows + (size_t)t * ldr;                                   \
            for (int32_t j = 0; j < n; j++) {                                              \
                axpy_##type##_ref(out + (size_t)t * ldo, p[(size_t)t * ldp + j],           \
                                  (const elem *)v + (size_t)rt[j] * (per_row), head_dim);  \
            }                                                                              \
        }                                                                                  \
    }

DEFINE_ATTN_REF(f32, float, head_dim)
DEFINE_ATTN_REF(f16, uint16_t, head_dim)
DEFINE_ATTN_REF(q8_0, moas_block_q8_0, head_dim / MOAS_QK8_0)

static float max_ref(const float *x, int32_t n, float init) {
    float m = init;
    for (int32_t i = 0; i < n; i++) {
        m = x[i] > m ? x[i] : m;
    }
    return m;
}

static float exp_sum_ref(float *x, int32_t n, float max) {
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    return sum;
}

static void softmax_ref(float *x, int32_t n) {
    if (n <= 0) {
        return;
    }
    const float max = max_ref(x, n, x[0]);
    const float sum = exp_sum_ref(x, n, max);
    const float inv = 1.0f / sum;
    for (int32_t i = 0; i < n; i++) {
        x[i] *= inv;
    }
}

/* As nn.GELU() computes by default, with libm's erff. */
static void gelu_ref(float *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        x[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
    }
}

static void kv_rows_ref(const uint32_t *off, const int32_t *pages, uint32_t shift, uint32_t h,
                        uint64_t recip, int32_t n, uint32_t *rows) {
    for (int32_t j = 0; j < n; j++) {
        const uint32_t w = off[j + 1] - off[j];
        rows[j] = moas__page_row(pages, shift, off[j] + moas__head_group(h, w, recip));
    }
}

static void to_f16_ref(const float *x, uint16_t *out, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        out[i] = moas__f32_to_f16(x[i]);
    }
}

static void to_q8_0_ref(const float *x, moas_block_q8_0 *out, int32_t n) {
    for (int32_t b = 0; b < n / MOAS_QK8_0; b++) {
        const float *xb = x + (size_t)b * MOAS_QK8_0;
        float amax = 0.0f;
        for (int32_t i = 0; i < MOAS_QK8_0; i++) {
            amax = fabsf(xb[i]) > amax ? fabsf(xb[i]) : amax;
        }
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = moas__f32_to_f16(d);
        for (int32_t i = 0; i < MOAS_QK8_0; i++) {
            out[b].q[i] = moas__q8_0_round(xb[i] * id);
        }
    }
}

static void add_ref(float *y, const float *x, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        y[i] += x[i];
    }
}

const moas_ops moas__ops_ref = {
    .name = "ref",
    .matmul_f32 = matmul_f32_ref,
    .matmul_f16 = matmul_f16_ref,
    .matmul_q8_0 = matmul_q8_0_ref,
    .attn_scores_f32 = attn_scores_f32_ref,
    .attn_scores_f16 = attn_scores_f16_ref,
    .attn_mix_f32 = attn_mix_f32_ref,
    .attn_mix_f16 = attn_mix_f16_ref,
    .attn_scores_q8_0 = attn_scores_q8_0_ref,
    .attn_mix_q8_0 = attn_mix_q8_0_ref,
    .max = max_ref,
    .exp_sum = exp_sum_ref,
    .softmax = softmax_ref,
    .gelu = gelu_ref,
    .kv_rows = kv_rows_ref,
    .to_f16 = to_f16_ref,
    .to_q8_0 = to_q8_0_ref,
    .add = add_ref,
};
