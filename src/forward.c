/*
 * forward.c - one token through the model: embeddings, the attention schemes and
 * their mixing, the MLP, the output head.
 *
 * Owns: the numeric definition of a forward step (docs/FORMAT.md, "Semantics") and the
 * KV-cache writes and reads it implies. Does not own: allocation (context.c), kernels
 * (ops_*.c). Everything here works on buffers the context allocated once; nothing is
 * allocated per token.
 *
 * The block options (docs/FORMAT.md, "Block options": RoPE, RMSNorm, SwiGLU) are small
 * helpers called where the published block embeds positions, normalises, runs its MLP
 * and projects Q and K; each takes the position of every row it rotates explicitly.
 *
 * Mixture mode follows the published PyTorch model (SPEC.md section 1) step for step,
 * so that logits agree to float32 round-off: LayerNorm with biased variance, the erf
 * GELU (libm's erf in the reference kernels, one within 1e-6 in the SIMD ones),
 * scores q.k scaled by 1/sqrt(head_dim) after the dot product, mean mixing as a sum
 * divided by the number of schemes. Routed mode runs one scheme per token and layer
 * (docs/ROUTING.md).
 */
#include "context.h"

#include <math.h>
#include <string.h>

/* One projection of a block of rows: Y[t] = W X[t] (+ b).   Y [n, n_rows], stride ldy */
typedef struct {
    const moas_weight *w;
    const float *b;   /* [n_rows] or NULL */
    float *Y;
    size_t ldy;
} projection;

/* Rows [r0, r1) of projection p for the n rows of X, by the table's matrix kernel
 * for W's type. The kernel's elements do not depend on n or on the rows it is given
 * (ops.h), so a token decoded alone, in a prefill block, or on any number of threads
 * gets the same bits. */
static void project_rows(const moas_context *ctx, const projection *p, const float *X,
                         size_t ldx, int32_t n, int32_t r0, int32_t r1) {
    const moas_ops *ops = ctx->ops;
    const moas_weight *w = p->w;
    void (*matmul)(const void *, size_t, int32_t, const float *, size_t, int32_t, int32_t,
                   float *, size_t, unsigned) =
        w->type == MOAS_TYPE_F16    ? ops->matmul_f16
        : w->type == MOAS_TYPE_Q8_0 ? ops->matmul_q8_0
                                    : ops->matmul_f32;
    if (r0 < r1) {
        matmul((const uint8_t *)w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, X,
               ldx, n, w->n_cols, p->Y + r0, p->ldy, ctx->mm_hints);
    }
}

/* Several projections of the same n rows of X (Q, K and V) as one parallel step when
 * they are worth it: each slice is a part of every projection's rows, a multiple of 16
 * rows, so no thread waits for another between them.
 *   X [n, n_cols] rows of stride ldx */
typedef struct {
    const moas_context *ctx;
    const projection *p;
    int32_t n_proj;
    const float *X;
    size_t ldx;
    int32_t n;
} project_step;

static void project_slice(void *arg, int32_t ith, int32_t nth) {
    const project_step *s = arg;
    for (int32_t i = 0; i < s->n_proj; i++) {
        const int32_t rows = s->p[i].w->n_rows;
        const int32_t slice = ((rows + nth - 1) / nth + 15) / 16 * 16;
        const int32_t r0 = ith * slice < rows ? ith * slice : rows;
        project_rows(s->ctx, &s->p[i], s->X, s->ldx, s->n, r0,
                     r0 + slice < rows ? r0 + slice : rows);
    }
}

static void project(moas_context *ctx, const projection *p, int32_t n_proj, const float *X,
                    size_t ldx, int32_t n) {
    int64_t work = 0;
    for (int32_t i = 0; i < n_proj; i++) {
        work += (int64_t)p[i].w->n_rows * p[i].w->n_cols * n;
    }
    project_step step = {ctx, p, n_proj, X, ldx, n};
    moas__team_run(&ctx->team, work >= ctx->parallel_min_work, project_slice, &step);
    for (int32_t i = 0; i < n_proj; i++) {
        if (p[i].b != NULL) {
            for (int32_t t = 0; t < n; t++) {
                float *y = p[i].Y + (size_t)t * p[i].ldy;
                for (int32_t r = 0; r < p[i].w->n_rows; r++) {
                    y[r] += p[i].b[r];
                }
            }
        }
    }
}

/* Y[t] = W X[t] (+ b) for the n rows of X.
 *   X [n, n_cols] rows of stride ldx, Y [n, n_rows] rows of stride ldy, b [n_rows] */
static void matmat(moas_context *ctx, const moas_weight *w, const float *X, size_t ldx,
                   const float *b, float *Y, size_t ldy, int32_t n) {
    const projection p = {w, b, Y, ldy};
    project(ctx, &p, 1, X, ldx, n);
}

/* out = row r of an embedding table, as f32.   out [n_cols] */
static void embedding_row(const moas_weight *w, int32_t r, float *out) {
    const uint8_t *row = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
    if (w->type == MOAS_TYPE_F16) {
        const uint16_t *h = (const uint16_t *)(const void *)row;
        for (int32_t i = 0; i < w->n_cols; i++) {
            out[i] = moas__f16_to_f32(h[i]);
        }
    } else {
        memcpy(out, row, (size_t)w->n_cols * sizeof *out);
    }
}

/* out = LayerNorm(x) * w (+ b), mean and biased variance over n. Moments are summed
 * in double, in four interleaved partial sums (element i into part i % 4, then the
 * parts in order): a fixed order, and four chains of dependent adds instead of one,
 * which had made LayerNorm 4-5% of a prefill.   all [n] */
static void layernorm(float *out, const float *x, const float *w, const float *b, int32_t n,
                      float eps) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    int32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += x[i];
        s1 += x[i + 1];
        s2 += x[i + 2];
        s3 += x[i + 3];
    }
    s0 += i < n ? x[i] : 0.0;
    s1 += i + 1 < n ? x[i + 1] : 0.0;
    s2 += i + 2 < n ? x[i + 2] : 0.0;
    const double mean = (((s0 + s1) + s2) + s3) / n;
    double q0 = 0.0, q1 = 0.0, q2 = 0.0, q3 = 0.0;
    for (i = 0; i + 4 <= n; i += 4) {
        const double d0 = x[i] - mean, d1 = x[i + 1] - mean;
        const double d2 = x[i + 2] - mean, d3 = x[i + 3] - mean;
        q0 += d0 * d0;
        q1 += d1 * d1;
        q2 += d2 * d2;
        q3 += d3 * d3;
    }
    for (; i < n; i++) {   /* at most 3: into parts 0, 1, 2 as above */
        const double d = x[i] - mean;
        if (i % 4 == 0) {
            q0 += d * d;
        } else if (i % 4 == 1) {
            q1 += d * d;
        } else {
            q2 += d * d;
        }
    }
    const double sq = ((q0 + q1) + q2) + q3;
    const float inv_std = (float)(1.0 / sqrt(sq / n + eps));
    for (i = 0; i < n; i++) {
        const float y = ((float)(x[i] - mean)) * inv_std * w[i];
        out[i] = b != NULL ? y + b[i] : y;
    }
}

/* out = x / sqrt(mean(x^2) + eps) * w (+ b): RMSNorm, the sum of squares in double in
 * four interleaved partial sums, as layernorm's.   all [n] */
static void rmsnorm(float *out, const float *x, const float *w, const float *b, int32_t n,
                    float eps) {
    double q[4] = {0.0, 0.0, 0.0, 0.0};
    for (int32_t i = 0; i < n; i++) {
        q[i % 4] += (double)x[i] * x[i];
    }
    const double sq = ((q[0] + q[1]) + q[2]) + q[3];
    const float inv_rms = (float)(1.0 / sqrt(sq / n + eps));
    for (int32_t i = 0; i < n; i++) {
        const float y = x[i] * inv_rms * w[i];
        out[i] = b != NULL ? y + b[i] : y;
    }
}

/* The model's norm (LayerNorm, or RMSNorm when the file says so) of one row.   all [n] */
static void norm_row(const moas_model *m, float *out, const float *x, const float *w,
                     const float *b, int32_t n) {
    if (m->rms_norm) {
        rmsnorm(out, x, w, b, n, m->norm_eps);
    } else {
        layernorm(out, x, w, b, n, m->norm_eps);
    }
}

/* RoPE pairs whose cosines and sines are computed at once (a stack table). */
#define ROPE_CHUNK 32

/* Rotary position embedding of the row of one token at position `pos`: in each of the
 * n_q heads of q and the n_k heads of k (head_dim elements each; k may be NULL), the
 * pair (x[2i], x[2i+1]) is rotated by the angle pos * base^(-2i / head_dim):
 *   x'[2i] = x[2i] cos - x[2i+1] sin,   x'[2i+1] = x[2i] sin + x[2i+1] cos.
 * Angles, cosines and sines are computed in double and rounded to float, as
 * tools/train.py's tables are; each is computed once for all the heads of q and k.
 *   q [n_q * head_dim], k [n_k * head_dim], rotated in place */
static void rope_row(const moas_model *m, int32_t pos, float *q, int32_t n_q, float *k,
                     int32_t n_k) {
    const int32_t head_dim = m->head_dim, n_pairs = head_dim / 2;
    float cs[ROPE_CHUNK], sn[ROPE_CHUNK];
    for (int32_t i0 = 0; i0 < n_pairs; i0 += ROPE_CHUNK) {
        const int32_t i1 = i0 + ROPE_CHUNK < n_pairs ? i0 + ROPE_CHUNK : n_pairs;
        for (int32_t i = i0; i < i1; i++) {
            const double angle = pos * pow(m->rope_base, -(double)(2 * i) / head_dim);
            cs[i - i0] = (float)cos(angle);
            sn[i - i0] = (float)sin(angle);
        }
        for (int32_t h = 0; h < n_q + n_k; h++) {
            float *x = (h < n_q ? q + (size_t)h * head_dim : k + (size_t)(h - n_q) * head_dim);
            for (int32_t i = i0; i < i1; i++) {
                const float x0 = x[2 * i], x1 = x[2 * i + 1];
                x[2 * i] = x0 * cs[i - i0] - x1 * sn[i - i0];
                x[2 * i + 1] = x0 * sn[i - i0] + x1 * cs[i - i0];
            }
        }
    }
}

/* Store n f32 values at `dst` in the cache's element type. */
static void kv_store(const moas_context *ctx, void *dst, const float *src, int32_t n) {
    if (ctx->kv_type == MOAS_TYPE_F16) {
        uint16_t *h = dst;
        for (int32_t i = 0; i < n; i++) {
            h[i] = moas__f32_to_f16(src[i]);
        }
    } else {
        memcpy(dst, src, (size_t)n * sizeof *src);
    }
}

/* Attention of query heads [h0, h1) for the n queries of a block (positions pos0 ..
 * pos0 + n - 1, causal) over one KV stream, with one thread's scratch: att
 * [MOAS_ATT_QUERIES, MOAS_ATT_KEYS] scores and rows [n_ctx].
 *   s_tj = q_t,h . k_{j, h n_kv(j) / n_head} / sqrt(head_dim)
 *   out_t,h = sum_j softmax_j(s_t) v_{j, h n_kv(j) / n_head}
 *
 * Per head, the row each cached token keeps for it is found once for the block. Up to
 * MOAS_ATT_QUERIES queries then go through the keys together in runs of
 * MOAS_ATT_KEYS, so a run's K and V rows are read from memory once and from L1 by
 * every query. Softmax is online (as in flash attention): per query a running
 * maximum m and sum l; a run whose scores raise m first rescales l and the output by
 * exp(m_old - m_new), then adds its exp(s - m) and their values. No row of scores
 * longer than a run is kept. Runs start at multiples of MOAS_ATT_KEYS of the key
 * position, the same whether a query is decoded alone or in a block, so the same
 * operations happen in the same order: a query's numbers are the same bits either
 * way. */
static void attend_heads(const moas_context *ctx, const moas_kv_stream *kv, const float *Q,
                         size_t ldq, int32_t pos0, int32_t n, int32_t h0, int32_t h1, float *OUT,
                         size_t ldo, float *att, uint32_t *rows) {
    const moas_model *m = ctx->model;
    const moas_ops *ops = ctx->ops;
    const int32_t n_head = m->n_head, head_dim = m->head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    const bool f16 = ctx->kv_type == MOAS_TYPE_F16;
    void (*scores)(const void *, const uint32_t *, int32_t, const float *, size_t, int32_t,
                   int32_t, float, float *, size_t) =
        f16 ? ops->attn_scores_f16 : ops->attn_scores_f32;
    void (*mix)(const void *, const uint32_t *, int32_t, const float *, size_t, int32_t,
                int32_t, float *, size_t) = f16 ? ops->attn_mix_f16 : ops->attn_mix_f32;
    float run_max[MOAS_ATT_QUERIES], run_sum[MOAS_ATT_QUERIES];

    for (int32_t h = h0; h < h1; h++) {
        const int32_t n_keys = pos0 + n;
        if (kv->off == NULL) {
            const uint32_t n_kv = (uint32_t)kv->n_kv, g = (uint32_t)(h * kv->n_kv / n_head);
            for (int32_t j = 0; j < n_keys; j++) {
                rows[j] = (uint32_t)j * n_kv + g;
            }
        } else {
            int32_t last_n_kv = -1, g = 0;   /* a division only when n_kv changes */
            for (int32_t j = 0; j < n_keys; j++) {
                const int32_t n_kv = (int32_t)(kv->off[j + 1] - kv->off[j]);
                if (n_kv != last_n_kv) {
                    last_n_kv = n_kv;
                    g = h * n_kv / n_head;
                }
                rows[j] = kv->off[j] + (uint32_t)g;
            }
        }
        for (int32_t q0 = 0; q0 < n; q0 += MOAS_ATT_QUERIES) {
            const int32_t nq = n - q0 < MOAS_ATT_QUERIES ? n - q0 : MOAS_ATT_QUERIES;
            const int32_t seen = pos0 + q0 + nq;   /* keys the last query sees */
            for (int32_t t = 0; t < nq; t++) {
                run_max[t] = -INFINITY;
                run_sum[t] = 0.0f;
                memset(OUT + (size_t)(q0 + t) * ldo + (size_t)h * head_dim, 0,
                       (size_t)head_dim * sizeof *OUT);
            }
            for (int32_t k0 = 0; k0 < seen; k0 += MOAS_ATT_KEYS) {
                /* query t sees keys up to pos0 + q0 + t: those from t_full on see the
                 * whole run, and their scores and value sums go in one call each */
                const int32_t k1 = k0 + MOAS_ATT_KEYS;
                int32_t t_full = k1 - (pos0 + q0 + 1);
                t_full = t_full < 0 ? 0 : t_full > nq ? nq : t_full;
                if (t_full < nq) {
                    scores(kv->k, rows + k0, MOAS_ATT_KEYS,
                           Q + (size_t)(q0 + t_full) * ldq + (size_t)h * head_dim, ldq,
                           nq - t_full, head_dim, scale, att + (size_t)t_full * MOAS_ATT_KEYS,
                           MOAS_ATT_KEYS);
                }
                for (int32_t t = 0; t < nq; t++) {
                    const int32_t end = pos0 + q0 + t + 1;
                    const int32_t nk = (end < k1 ? end : k1) - k0;
                    if (nk <= 0) {
                        continue;
                    }
                    const float *q = Q + (size_t)(q0 + t) * ldq + (size_t)h * head_dim;
                    float *out = OUT + (size_t)(q0 + t) * ldo + (size_t)h * head_dim;
                    float *s = att + (size_t)t * MOAS_ATT_KEYS;
                    if (t < t_full) {
                        scores(kv->k, rows + k0, nk, q, ldq, 1, head_dim, scale, s, nk);
                    }
                    float mx = run_max[t];
                    for (int32_t j = 0; j < nk; j++) {
                        mx = s[j] > mx ? s[j] : mx;
                    }
                    if (mx > run_max[t] && run_max[t] != -INFINITY) {
                        const float shrink = expf(run_max[t] - mx);
                        run_sum[t] *= shrink;
                        for (int32_t e = 0; e < head_dim; e++) {
                            out[e] *= shrink;
                        }
                    }
                    run_max[t] = mx;
                    run_sum[t] += ops->exp_sum(s, nk, mx);
                    if (t < t_full) {
                        mix(kv->v, rows + k0, nk, s, MOAS_ATT_KEYS, 1, head_dim, out, ldo);
                    }
                }
                if (t_full < nq) {
                    mix(kv->v, rows + k0, MOAS_ATT_KEYS, att + (size_t)t_full * MOAS_ATT_KEYS,
                        MOAS_ATT_KEYS, nq - t_full, head_dim,
                        OUT + (size_t)(q0 + t_full) * ldo + (size_t)h * head_dim, ldo);
                }
            }
            for (int32_t t = 0; t < nq; t++) {
                float *out = OUT + (size_t)(q0 + t) * ldo + (size_t)h * head_dim;
                const float inv = 1.0f / run_sum[t];
                for (int32_t e = 0; e < head_dim; e++) {
                    out[e] *= inv;
                }
            }
        }
    }
}

/* Causal attention of a block of n queries (positions pos0 .. pos0 + n - 1, their K/V
 * already stored) over one KV stream, all query heads.
 *   Q [n, n_head * head_dim] rows of stride ldq, OUT likewise with stride ldo
 *
 * Query head h reads token j's KV head h * n_kv(j) / n_head: itself when j stored
 * every head (MHA), its group under GQA (repeat_interleave in the reference), head 0
 * under MQA; a K or V row that serves a group of query heads is read where it is,
 * never expanded. Slices split the query heads, each with its own scratch: each
 * head's numbers are the same whoever computes them. */
typedef struct {
    const moas_context *ctx;
    const moas_kv_stream *kv;
    const float *Q;
    size_t ldq;
    int32_t pos0, n;
    float *OUT;
    size_t ldo;
} attend_step;

static void attend_slice(void *arg, int32_t ith, int32_t nth) {
    const attend_step *s = arg;
    const moas_context *ctx = s->ctx;
    const int32_t n_head = ctx->model->n_head;
    const int32_t h0 = ith * n_head / nth, h1 = (ith + 1) * n_head / nth;
    if (h0 < h1) {
        attend_heads(ctx, s->kv, s->Q, s->ldq, s->pos0, s->n, h0, h1, s->OUT, s->ldo,
                     ctx->att + (size_t)ith * MOAS_ATT_QUERIES * MOAS_ATT_KEYS,
                     ctx->att_rows + (size_t)ith * (size_t)ctx->n_ctx);
    }
}

static void attend(moas_context *ctx, const moas_kv_stream *kv, const float *Q, size_t ldq,
                   int32_t pos0, int32_t n, float *OUT, size_t ldo) {
    const int64_t work = (int64_t)2 * ctx->model->head_dim * ctx->model->n_head * n *
                         (pos0 + (n + 1) / 2);
    attend_step step = {ctx, kv, Q, ldq, pos0, n, OUT, ldo};
    moas__team_run(&ctx->team, work >= ctx->parallel_min_work, attend_slice, &step);
}

/* The scheme with the largest gate, the first on ties. */
static int32_t largest_gate(const float *gates, int32_t n) {
    int32_t best = 0;
    for (int32_t s = 1; s < n; s++) {
        best = gates[s] > gates[best] ? s : best;
    }
    return best;
}

/* Pooled models: the mean of each group of n_head / n_kv consecutive heads of `full`.
 *   full [n_head, head_dim] -> out [n_kv, head_dim] */
static void pool_heads(const float *full, int32_t n_head, int32_t head_dim, int32_t n_kv,
                       float *out) {
    const int32_t group = n_head / n_kv;
    for (int32_t i = 0; i < n_kv; i++) {
        for (int32_t e = 0; e < head_dim; e++) {
            float sum = 0.0f;
            for (int32_t h = i * group; h < (i + 1) * group; h++) {
                sum += full[(size_t)h * head_dim + e];
            }
            out[(size_t)i * head_dim + e] = sum / (float)group;
        }
    }
}

/* Pooled models, mixture mode: out[h] = sum_s g_s pool_s(full)[h n_kv(s) / n_head], the
 * gate-weighted mix of every scheme's pooled heads broadcast back to n_head heads.
 *   full [n_head, head_dim] -> out [n_head, head_dim]; tmp [n_head, head_dim] scratch */
static void mix_pooled(const moas_model *m, const float *gates, const float *full, float *tmp,
                       float *out) {
    const int32_t n_head = m->n_head, head_dim = m->head_dim;
    memset(out, 0, (size_t)n_head * head_dim * sizeof *out);
    for (int32_t s = 0; s < m->n_scheme; s++) {
        const int32_t n_kv = m->scheme_n_kv[s];
        pool_heads(full, n_head, head_dim, n_kv, tmp);
        for (int32_t h = 0; h < n_head; h++) {
            const float *src = tmp + (size_t)(h * n_kv / n_head) * head_dim;
            for (int32_t e = 0; e < head_dim; e++) {
                out[(size_t)h * head_dim + e] += gates[s] * src[e];
            }
        }
    }
}

/* One token is a batch of one: with a single row, the batch's layer-by-layer order is
 * the token's own order, so there is one implementation of a forward step. */
void moas__forward(moas_context *ctx, int32_t token, bool want_logits) {
    moas__forward_batch(ctx, &token, 1, NULL, want_logits);
}

/* ---- batched forward: many tokens through each layer together ------------------- */

/* Store row t of K and V (kv_dim values each) as token pos's heads in `kv`. */
static void store_kv_row(const moas_context *ctx, moas_kv_stream *kv, int32_t pos,
                         const float *k, const float *v, int32_t kv_dim) {
    const size_t head_bytes = (size_t)ctx->model->head_dim * ctx->kv_elem_bytes;
    const uint32_t first = moas__kv_first(kv, pos);
    kv_store(ctx, (uint8_t *)kv->k + (size_t)first * head_bytes, k, kv_dim);
    kv_store(ctx, (uint8_t *)kv->v + (size_t)first * head_bytes, v, kv_dim);
}

/* Mixture mode, independent schemes: each scheme's K/V for every token of the batch,
 * then each token's attention, then the output projection, mixed by the gates.
 *   gates: route_gates rows of the batch's tokens, stride L * S */
static void batch_attention_mixture(moas_context *ctx, int32_t l, int32_t pos0, int32_t n,
                                    const float *gates, size_t gate_stride) {
    const moas_model *m = ctx->model;
    const int32_t C = m->n_embd, S = m->n_scheme;

    memset(ctx->bmix, 0, (size_t)n * C * sizeof *ctx->bmix);
    for (int32_t s = 0; s < S; s++) {
        const moas_scheme_weights *sw = &m->layers[l].scheme[s];
        moas_kv_stream *kv = &ctx->kv[(size_t)l * S + s];
        const int32_t kv_dim = sw->n_kv * m->head_dim;
        const projection qkv[3] = {{&sw->wq, sw->bq, ctx->bq, C},
                                   {&sw->wk, sw->bk, ctx->bk, C},
                                   {&sw->wv, sw->bv, ctx->bv, C}};
        project(ctx, qkv, 3, ctx->bxb, C, n);
        for (int32_t t = 0; t < n && m->rope; t++) {
            rope_row(m, pos0 + t, ctx->bq + (size_t)t * C, m->n_head, ctx->bk + (size_t)t * C,
                     sw->n_kv);
        }
        for (int32_t t = 0; t < n; t++) {
            store_kv_row(ctx, kv, pos0 + t, ctx->bk + (size_t)t * C, ctx->bv + (size_t)t * C,
                         kv_dim);
        }
        attend(ctx, kv, ctx->bq, C, pos0, n, ctx->batt, C);
        matmat(ctx, &sw->wo, ctx->batt, C, sw->bo, ctx->by, C, n);
        for (int32_t t = 0; t < n; t++) {
            const float g = m->mixing == MOAS_MIXING_ROUTER ? gates[(size_t)t * gate_stride + s]
                                                            : 1.0f;
            for (int32_t i = 0; i < C; i++) {
                ctx->bmix[(size_t)t * C + i] += g * ctx->by[(size_t)t * C + i];
            }
        }
    }
    for (int32_t t = 0; t < n; t++) {
        float *x = ctx->bx + (size_t)t * C;
        const float *mix = ctx->bmix + (size_t)t * C;
        for (int32_t i = 0; i < C; i++) {
            x[i] += m->mixing == MOAS_MIXING_MEAN ? mix[i] / (float)S : mix[i];
        }
    }
}

/* Routed mode, independent schemes: the batch's tokens grouped by their scheme; each
 * group's rows go through that scheme's projections together. All K/V are stored
 * before any token attends, and each token reads only positions up to its own.
 *   schemes [n] the scheme of each token in this layer */
static void batch_attention_routed(moas_context *ctx, int32_t l, int32_t pos0, int32_t n,
                                   const uint8_t *schemes, size_t scheme_stride) {
    const moas_model *m = ctx->model;
    const int32_t C = m->n_embd;
    moas_kv_stream *kv = &ctx->kv[l];
    int32_t idx[MOAS_BATCH];

    for (int32_t t = 0; t < n; t++) {   /* the ragged offsets, in position order */
        const int32_t s = schemes[(size_t)t * scheme_stride];
        kv->off[pos0 + t + 1] = kv->off[pos0 + t] + (uint32_t)m->scheme_n_kv[s];
    }
    for (int pass = 0; pass < 2; pass++) {   /* 0: Q, K, V; 1: output projections */
        for (int32_t s = 0; s < m->n_scheme; s++) {
            const moas_scheme_weights *sw = &m->layers[l].scheme[s];
            int32_t n_sel = 0;
            for (int32_t t = 0; t < n; t++) {
                if (schemes[(size_t)t * scheme_stride] == s) {
                    idx[n_sel++] = t;
                }
            }
            if (n_sel == 0) {
                continue;
            }
            const float *src = pass == 0 ? ctx->bxb : ctx->batt;
            for (int32_t i = 0; i < n_sel; i++) {   /* gather the group's rows */
                memcpy(ctx->bsel + (size_t)i * C, src + (size_t)idx[i] * C,
                       (size_t)C * sizeof(float));
            }
            if (pass == 0) {
                const projection qkv[3] = {{&sw->wq, sw->bq, ctx->by, C},
                                           {&sw->wk, sw->bk, ctx->bk, C},
                                           {&sw->wv, sw->bv, ctx->bv, C}};
                project(ctx, qkv, 3, ctx->bsel, C, n_sel);
                for (int32_t i = 0; i < n_sel; i++) {
                    if (m->rope) {
                        rope_row(m, pos0 + idx[i], ctx->by + (size_t)i * C, m->n_head,
                                 ctx->bk + (size_t)i * C, sw->n_kv);
                    }
                    memcpy(ctx->bq + (size_t)idx[i] * C, ctx->by + (size_t)i * C,
                           (size_t)C * sizeof(float));
                    store_kv_row(ctx, kv, pos0 + idx[i], ctx->bk + (size_t)i * C,
                                 ctx->bv + (size_t)i * C, sw->n_kv * m->head_dim);
                }
            } else {
                matmat(ctx, &sw->wo, ctx->bsel, C, sw->bo, ctx->by, C, n_sel);
                for (int32_t i = 0; i < n_sel; i++) {
                    float *x = ctx->bx + (size_t)idx[i] * C;
                    for (int32_t e = 0; e < C; e++) {
                        x[e] += ctx->by[(size_t)i * C + e];
                    }
                }
            }
        }
        if (pass == 0) {
            attend(ctx, kv, ctx->bq, C, pos0, n, ctx->batt, C);
        }
    }
}

/* Pooled models: one set of projections for the whole batch; each token's K/V mixed
 * (mixture) or pooled for its scheme (routed) before it is stored. */
static void batch_attention_pooled(moas_context *ctx, int32_t l, int32_t pos0, int32_t n,
                                   const float *gates, size_t gate_stride,
                                   const uint8_t *schemes, size_t scheme_stride) {
    const moas_model *m = ctx->model;
    const moas_scheme_weights *sw = &m->layers[l].shared;
    const int32_t C = m->n_embd;
    moas_kv_stream *kv = &ctx->kv[l];
    float *kp = ctx->kv_pool, *vp = ctx->kv_pool + C;

    const projection qkv[3] = {{&sw->wq, sw->bq, ctx->bq, C},
                               {&sw->wk, sw->bk, ctx->bk, C},
                               {&sw->wv, sw->bv, ctx->bv, C}};
    project(ctx, qkv, 3, ctx->bxb, C, n);
    for (int32_t t = 0; t < n && m->rope; t++) {
        /* all H key heads, before pooling: the rotation is the same for every head, so
         * the pooled heads are the rotated means */
        rope_row(m, pos0 + t, ctx->bq + (size_t)t * C, m->n_head, ctx->bk + (size_t)t * C,
                 m->n_head);
    }
    for (int32_t t = 0; t < n; t++) {
        const float *k = ctx->bk + (size_t)t * C, *v = ctx->bv + (size_t)t * C;
        int32_t n_kv = m->n_head;
        if (ctx->mode == MOAS_MODE_ROUTED) {
            n_kv = m->scheme_n_kv[schemes[(size_t)t * scheme_stride]];
            kv->off[pos0 + t + 1] = kv->off[pos0 + t] + (uint32_t)n_kv;
            pool_heads(k, m->n_head, m->head_dim, n_kv, kp);
            pool_heads(v, m->n_head, m->head_dim, n_kv, vp);
        } else {
            mix_pooled(m, gates + (size_t)t * gate_stride, k, ctx->pool_tmp, kp);
            mix_pooled(m, gates + (size_t)t * gate_stride, v, ctx->pool_tmp, vp);
        }
        store_kv_row(ctx, kv, pos0 + t, kp, vp, n_kv * m->head_dim);
    }
    attend(ctx, kv, ctx->bq, C, pos0, n, ctx->batt, C);
    matmat(ctx, &sw->wo, ctx->batt, C, sw->bo, ctx->by, C, n);
    for (int32_t t = 0; t < n; t++) {
        for (int32_t i = 0; i < C; i++) {
            ctx->bx[(size_t)t * C + i] += ctx->by[(size_t)t * C + i];
        }
    }
}

/* LayerNorm or GELU of a block's rows, one parallel step when the rows are worth it:
 * the rows are independent, slices split them. Weights: rough multiply-adds per
 * element, against the threshold of the matrix products. */
#define MOAS_NORM_COST 4
#define MOAS_GELU_COST 16
typedef struct {
    const moas_context *ctx;
    float *out;              /* LayerNorm: [n, n_cols] normed rows; GELU: [n, n_cols] in place */
    const float *in, *w, *b; /* LayerNorm: input rows and parameters */
    int32_t n_cols, n;
} rows_step;

static void norm_slice(void *arg, int32_t ith, int32_t nth) {
    const rows_step *s = arg;
    for (int32_t t = s->n * ith / nth; t < s->n * (ith + 1) / nth; t++) {
        norm_row(s->ctx->model, s->out + (size_t)t * s->n_cols, s->in + (size_t)t * s->n_cols,
                 s->w, s->b, s->n_cols);
    }
}

static void gelu_slice(void *arg, int32_t ith, int32_t nth) {
    const rows_step *s = arg;
    for (int32_t t = s->n * ith / nth; t < s->n * (ith + 1) / nth; t++) {
        s->ctx->ops->gelu(s->out + (size_t)t * s->n_cols, s->n_cols);
    }
}

/* out = LayerNorm(in) * w + b (or the RMSNorm) for n rows of C.   out, in [n, C] */
static void norm_rows(moas_context *ctx, float *out, const float *in, const float *w,
                      const float *b, int32_t n) {
    const int32_t C = ctx->model->n_embd;
    rows_step step = {ctx, out, in, w, b, C, n};
    moas__team_run(&ctx->team, (int64_t)n * C * MOAS_NORM_COST >= ctx->parallel_min_work,
                   norm_slice, &step);
}

/* x = GELU(x) for n rows of n_cols.   x [n, n_cols] */
static void gelu_rows(moas_context *ctx, float *x, int32_t n_cols, int32_t n) {
    rows_step step = {ctx, x, NULL, NULL, NULL, n_cols, n};
    moas__team_run(&ctx->team, (int64_t)n * n_cols * MOAS_GELU_COST >= ctx->parallel_min_work,
                   gelu_slice, &step);
}

/* SwiGLU's product of one slice of hidden units: h = SiLU(g) * h for n rows.
 *   h [n, n_cols] rows of stride ldh (in place), g [n, n_cols] rows of stride ldg */
typedef struct {
    float *h;
    const float *g;
    size_t ldh, ldg;
    int32_t n_cols, n;
} swiglu_step;

static void swiglu_slice(void *arg, int32_t ith, int32_t nth) {
    const swiglu_step *s = arg;
    for (int32_t t = s->n * ith / nth; t < s->n * (ith + 1) / nth; t++) {
        float *h = s->h + (size_t)t * s->ldh;
        const float *g = s->g + (size_t)t * s->ldg;
        for (int32_t i = 0; i < s->n_cols; i++) {
            h[i] = g[i] / (1.0f + expf(-g[i])) * h[i];
        }
    }
}

/* Rows [r0, r0 + n_rows) of a matrix, as a matrix of their own. */
static moas_weight weight_rows(const moas_weight *w, int32_t r0, int32_t n_rows) {
    moas_weight sub = *w;
    sub.data = (const uint8_t *)w->data + (size_t)r0 * w->row_bytes;
    sub.n_rows = n_rows;
    return sub;
}

/* The SwiGLU MLP's hidden rows: out[t] = SiLU(W_gate x_t + b) * (W_up x_t + b) for the n
 * rows x_t of ctx->bxb. The hidden scratch holds one row of n_ff per token, so the
 * hidden units go in slices of at most C: a slice's up values land in `out`, its gate
 * values wait in ctx->by (free until the down projection), and each slice is one
 * parallel step for both projections.   out [n, n_ff] */
static void swiglu_rows(moas_context *ctx, const moas_layer *layer, float *out, int32_t n) {
    const moas_model *m = ctx->model;
    const int32_t C = m->n_embd, n_ff = m->n_ff;
    for (int32_t c0 = 0; c0 < n_ff; c0 += C) {
        const int32_t w = n_ff - c0 < C ? n_ff - c0 : C;
        const moas_weight gate = weight_rows(&layer->ffn_gate, c0, w);
        const moas_weight up = weight_rows(&layer->ffn_up, c0, w);
        const projection p[2] = {
            {&gate, layer->ffn_gate_b != NULL ? layer->ffn_gate_b + c0 : NULL, ctx->by, C},
            {&up, layer->ffn_up_b != NULL ? layer->ffn_up_b + c0 : NULL, out + c0, (size_t)n_ff}};
        project(ctx, p, 2, ctx->bxb, C, n);
        swiglu_step step = {out + c0, ctx->by, (size_t)n_ff, (size_t)C, w, n};
        moas__team_run(&ctx->team, (int64_t)n * w * MOAS_GELU_COST >= ctx->parallel_min_work,
                       swiglu_slice, &step);
    }
}

static void forward_block(moas_context *ctx, const int32_t *tokens, int32_t n, float *all,
                          bool want_last) {
    const moas_model *m = ctx->model;
    const int32_t C = m->n_embd, S = m->n_scheme, L = m->n_layer, pos0 = ctx->n_past;
    const size_t gate_stride = (size_t)L * S, scheme_stride = (size_t)L;

    /* x = token embedding + position embedding, row by row (RoPE models: no table;
     * their positions are rotations of Q and K) */
    for (int32_t t = 0; t < n; t++) {
        float *x = ctx->bx + (size_t)t * C;
        embedding_row(&m->tok_embd, tokens[t], x);
        if (m->rope) {
            continue;
        }
        embedding_row(&m->pos_embd, pos0 + t, ctx->xb);
        for (int32_t i = 0; i < C; i++) {
            x[i] += ctx->xb[i];
        }
    }

    for (int32_t l = 0; l < L; l++) {
        const moas_layer *layer = &m->layers[l];
        float *gates = ctx->route_gates + ((size_t)pos0 * L + l) * S;      /* stride L S */
        uint8_t *schemes = ctx->route_scheme + (size_t)pos0 * L + l;         /* stride L */

        /* gates of every token, from its normed input */
        norm_rows(ctx, ctx->bxb, ctx->bx, layer->attn_norm_w, layer->attn_norm_b, n);
        if (m->mixing == MOAS_MIXING_ROUTER) {
            matmat(ctx, &layer->router_up, ctx->bxb, C, layer->router_up_b, ctx->bhb,
                   (size_t)m->n_router, n);
            for (int32_t t = 0; t < n; t++) {
                ctx->ops->gelu(ctx->bhb + (size_t)t * m->n_router, m->n_router);
            }
            matmat(ctx, &layer->router_down, ctx->bhb, (size_t)m->n_router,
                   layer->router_down_b, gates, gate_stride, n);
            for (int32_t t = 0; t < n; t++) {
                ctx->ops->softmax(gates + (size_t)t * gate_stride, S);
            }
        } else {
            for (int32_t t = 0; t < n; t++) {
                for (int32_t s = 0; s < S; s++) {
                    gates[(size_t)t * gate_stride + s] = 1.0f / (float)S;
                }
            }
        }

        /* each token's scheme, in position order (a callback sees them in that order) */
        for (int32_t t = 0; t < n; t++) {
            const float *g = gates + (size_t)t * gate_stride;
            if (ctx->mode == MOAS_MODE_ROUTED) {
                schemes[(size_t)t * scheme_stride] =
                    (uint8_t)moas__route_choose(ctx, pos0 + t, l, g);
            } else {
                const int32_t best = largest_gate(g, S);
                schemes[(size_t)t * scheme_stride] = (uint8_t)best;
                if (ctx->route_fn != NULL) {
                    (void)ctx->route_fn(ctx->route_user, pos0 + t, l, g, S, best);
                }
            }
        }

        if (m->kv_sharing == MOAS_KV_SHARING_POOLED) {
            batch_attention_pooled(ctx, l, pos0, n, gates, gate_stride, schemes, scheme_stride);
        } else if (ctx->mode == MOAS_MODE_ROUTED) {
            batch_attention_routed(ctx, l, pos0, n, schemes, scheme_stride);
        } else {
            batch_attention_mixture(ctx, l, pos0, n, gates, gate_stride);
        }

        /* MLP, all rows */
        norm_rows(ctx, ctx->bxb, ctx->bx, layer->ffn_norm_w, layer->ffn_norm_b, n);
        if (m->swiglu) {
            swiglu_rows(ctx, layer, ctx->bhb, n);
        } else {
            matmat(ctx, &layer->ffn_up, ctx->bxb, C, layer->ffn_up_b, ctx->bhb, (size_t)m->n_ff,
                   n);
            gelu_rows(ctx, ctx->bhb, m->n_ff, n);
        }
        matmat(ctx, &layer->ffn_down, ctx->bhb, (size_t)m->n_ff, layer->ffn_down_b, ctx->by, C, n);
        for (int32_t t = 0; t < n; t++) {
            for (int32_t i = 0; i < C; i++) {
                ctx->bx[(size_t)t * C + i] += ctx->by[(size_t)t * C + i];
            }
        }
    }

    /* logits only where asked: every row, or the last */
    for (int32_t t = 0; t < n; t++) {
        const bool last = t == n - 1;
        if (all == NULL && !(last && want_last)) {
            continue;
        }
        norm_row(m, ctx->xb, ctx->bx + (size_t)t * C, m->out_norm_w, m->out_norm_b, C);
        matmat(ctx, &m->output, ctx->xb, 0, NULL, ctx->logits, 0, 1);
        if (all != NULL) {
            memcpy(all + (size_t)t * m->n_vocab, ctx->logits, (size_t)m->n_vocab * sizeof(float));
        }
    }
    ctx->logits_valid = want_last || all != NULL;
}

/* Whether a block of n tokens has a step worth a team: the largest product per token
 * (the MLP's, or Q, K and V together), attention over the cache, or the output head
 * when logits are wanted, against the threshold the steps themselves use. */
static bool block_wants_team(const moas_context *ctx, int32_t n, bool any_logits) {
    const moas_model *m = ctx->model;
    const int64_t C = m->n_embd;
    const int64_t widest = m->n_ff > 3 * C ? m->n_ff : 3 * C;
    const int64_t attention = 2 * C * (ctx->n_past + (n + 1) / 2);
    const int64_t output = C * m->n_vocab;
    return ctx->n_threads > 1 &&
           ((int64_t)n * (C * widest > attention ? C * widest : attention) >=
                ctx->parallel_min_work ||
            (any_logits && output >= ctx->parallel_min_work));
}

typedef struct {
    moas_context *ctx;
    const int32_t *tokens;
    int32_t n;
    float *all;
    bool want_last;
} block_call;

static void forward_block_call(void *arg) {
    const block_call *c = arg;
    forward_block(c->ctx, c->tokens, c->n, c->all, c->want_last);
}

void moas__forward_batch(moas_context *ctx, const int32_t *tokens, int32_t n, float *all,
                         bool want_last) {
    block_call call = {ctx, tokens, n, all, want_last};
    const bool team = block_wants_team(ctx, n, all != NULL || want_last);
    moas__team_lead(&ctx->team, team ? ctx->n_threads : 1, forward_block_call, &call);
}
