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
 * Mixture mode follows the published PyTorch model (docs/FORMAT.md, "Semantics") step for step,
 * so that logits agree to float32 round-off: LayerNorm with biased variance, the erf
 * GELU (libm's erf in the reference kernels, one within 1e-6 in the SIMD ones),
 * scores q.k scaled by 1/sqrt(head_dim) after the dot product, mean mixing as a sum
 * divided by the number of schemes. Routed mode runs one scheme per token and layer
 * (docs/ROUTING.md).
 */
#include "context.h"

#include <math.h>
#include <string.h>

/* Blocks of MOAS_FINE_SLICE_ROWS rows or more (context.h) cut attention into chunks of
 * a head's MOAS_ATT_CHUNK_QUERIES queries, to have slices enough for that. */
#define MOAS_ATT_CHUNK_QUERIES 64
_Static_assert(MOAS_ATT_CHUNK_QUERIES % MOAS_ATT_QUERIES == 0,
               "a chunk is whole blocks of the attention's queries");

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
static void project_rows(const moas_workspace *ws, const projection *p, const float *X,
                         size_t ldx, int32_t n, int32_t r0, int32_t r1) {
    const moas_ops *ops = ws->ops;
    const moas_weight *w = p->w;
    void (*matmul)(const void *, size_t, int32_t, const float *, size_t, int32_t, int32_t,
                   float *, size_t, unsigned) =
        w->type == MOAS_TYPE_F16    ? ops->matmul_f16
        : w->type == MOAS_TYPE_Q8_0 ? ops->matmul_q8_0
                                    : ops->matmul_f32;
    if (r0 < r1) {
        matmul((const uint8_t *)w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, X,
               ldx, n, w->n_cols, p->Y + r0, p->ldy, ws->mm_hints);
    }
}

/* Several projections of the same n rows of X (Q, K and V) as one parallel step when
 * they are worth it. Each slice is a part of every projection's rows, a multiple of 16
 * rows, so no thread waits for another between them; or, for a block of prompt rows
 * whose X outweighs the weights (a small model's long prompt), a part of X's rows, so
 * that each slice reads the weights and only its own rows of X. Either way an
 * element's arithmetic is the same (the kernels' elements do not depend on the rows
 * they are given).
 *   X [n, n_cols] rows of stride ldx */
typedef struct {
    const moas_workspace *ws;
    const projection *p;
    int32_t n_proj;
    const float *X;
    size_t ldx;
    int32_t n;
    bool by_tokens;          /* slices are X's rows, not the weights' */
} project_step;

/* Each slice adds the biases of its own rows, in its thread and while they are in
 * its cache: added by the leader after the step, they were 5% of its time in a
 * 64-sequence decode step of a 192-wide model, with the other thread waiting. */
static void project_slice(void *arg, int32_t ith, int32_t nth) {
    const project_step *s = arg;
    if (s->by_tokens) {
        const int32_t t0 = (int32_t)((int64_t)s->n * ith / nth);
        const int32_t t1 = (int32_t)((int64_t)s->n * (ith + 1) / nth);
        for (int32_t i = 0; i < s->n_proj && t0 < t1; i++) {
            const projection *p = &s->p[i];
            const projection part = {p->w, p->b, p->Y + (size_t)t0 * p->ldy, p->ldy};
            project_rows(s->ws, &part, s->X + (size_t)t0 * s->ldx, s->ldx, t1 - t0, 0,
                         p->w->n_rows);
            for (int32_t t = 0; t < t1 - t0 && p->b != NULL; t++) {
                s->ws->ops->add(part.Y + (size_t)t * p->ldy, p->b, p->w->n_rows);
            }
        }
        return;
    }
    for (int32_t i = 0; i < s->n_proj; i++) {
        const projection *p = &s->p[i];
        const int32_t rows = p->w->n_rows;
        const int32_t slice = ((rows + nth - 1) / nth + 15) / 16 * 16;
        const int32_t r0 = ith * slice < rows ? ith * slice : rows;
        const int32_t r1 = r0 + slice < rows ? r0 + slice : rows;
        project_rows(s->ws, p, s->X, s->ldx, s->n, r0, r1);
        for (int32_t t = 0; t < s->n && p->b != NULL && r0 < r1; t++) {
            s->ws->ops->add(p->Y + (size_t)t * p->ldy + r0, p->b + r0, r1 - r0);
        }
    }
}

static void project(moas_workspace *ws, const projection *p, int32_t n_proj, const float *X,
                    size_t ldx, int32_t n) {
    int64_t work = 0, weight_bytes = 0;
    for (int32_t i = 0; i < n_proj; i++) {
        work += (int64_t)p[i].w->n_rows * p[i].w->n_cols * n;
        weight_bytes += (int64_t)p[i].w->n_rows * (int64_t)p[i].w->row_bytes;
    }
    const bool prompt = n >= MOAS_FINE_SLICE_ROWS;
    const int64_t x_bytes = (int64_t)n * p[0].w->n_cols * (int64_t)sizeof(float);
    project_step step = {ws, p, n_proj, X, ldx, n, prompt && x_bytes > weight_bytes};
    moas__team_run_slices(&ws->team, work >= ws->parallel_min_work, project_slice, &step,
                          prompt ? MOAS_TEAM_SLICES_PER_THREAD * ws->team.nth
                                 : ws->team.nth);
}

/* Work a block does row by row between its products (RoPE, pooling and storing K/V,
 * residual adds): fn(arg, t, slot) for each row t, with `slot` the index of the
 * workspace's per-slice scratch it may use. A block of MOAS_FINE_SLICE_ROWS rows or
 * more runs it as a parallel step, where the calling thread alone would leave the
 * others waiting (about a tenth of a 1,024-token prefill of a 192-wide model at two
 * threads); a smaller block's rows cost less than handing them to another thread. */
typedef void (*row_fn)(const void *arg, int32_t t, int32_t slot);
typedef struct {
    row_fn fn;
    const void *arg;
    int32_t n;
} each_row_step;

static void each_row_slice(void *arg, int32_t ith, int32_t nth) {
    const each_row_step *s = arg;
    const int32_t t1 = (int32_t)((int64_t)s->n * (ith + 1) / nth);
    for (int32_t t = (int32_t)((int64_t)s->n * ith / nth); t < t1; t++) {
        s->fn(s->arg, t, ith);
    }
}

static void each_row(moas_workspace *ws, int32_t n, row_fn fn, const void *arg) {
    each_row_step step = {fn, arg, n};
    const bool prompt = n >= MOAS_FINE_SLICE_ROWS;
    moas__team_run_slices(&ws->team, prompt, each_row_slice, &step,
                          MOAS_TEAM_SLICES_PER_THREAD * ws->team.nth);
}

/* x[t] += y[t] for n rows of C floats, back to back. */
typedef struct {
    const moas_workspace *ws;
    float *x;
    const float *y;
} add_rows_args;

static void add_row(const void *arg, int32_t t, int32_t slot) {
    const add_rows_args *a = arg;
    const size_t C = (size_t)a->ws->model->n_embd;
    (void)slot;
    a->ws->ops->add(a->x + (size_t)t * C, a->y + (size_t)t * C, (int32_t)C);
}

static void add_rows(moas_workspace *ws, float *x, const float *y, int32_t n) {
    const add_rows_args a = {ws, x, y};
    each_row(ws, n, add_row, &a);
}

/* Y[t] = W X[t] (+ b) for the n rows of X.
 *   X [n, n_cols] rows of stride ldx, Y [n, n_rows] rows of stride ldy, b [n_rows] */
static void matmat(moas_workspace *ws, const moas_weight *w, const float *X, size_t ldx,
                   const float *b, float *Y, size_t ldy, int32_t n) {
    const projection p = {w, b, Y, ldy};
    project(ws, &p, 1, X, ldx, n);
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

/* RoPE pairs whose cosines and sines are computed at once (a stack table), for a
 * position the model's table does not hold. */
#define ROPE_CHUNK 32

/* Rotate the pairs [i0, i1) of each of the n_q heads of q and the n_k heads of k by the
 * angles whose cosines and sines are cs and sn. */
static void rope_pairs(int32_t head_dim, int32_t i0, int32_t i1, const float *cs,
                       const float *sn, float *q, int32_t n_q, float *k, int32_t n_k) {
    for (int32_t h = 0; h < n_q + n_k; h++) {
        float *x = (h < n_q ? q + (size_t)h * head_dim : k + (size_t)(h - n_q) * head_dim);
        for (int32_t i = i0; i < i1; i++) {
            const float x0 = x[2 * i], x1 = x[2 * i + 1];
            x[2 * i] = x0 * cs[i - i0] - x1 * sn[i - i0];
            x[2 * i + 1] = x0 * sn[i - i0] + x1 * cs[i - i0];
        }
    }
}

/* Rotary position embedding of the row of one token at position `pos`: in each of the
 * n_q heads of q and the n_k heads of k (head_dim elements each; k may be NULL), the
 * pair (x[2i], x[2i+1]) is rotated by the angle pos * base^(-2i / head_dim):
 *   x'[2i] = x[2i] cos - x[2i+1] sin,   x'[2i+1] = x[2i] sin + x[2i+1] cos,
 * with the cosines and sines of moas__rope_angles, from the model's table or computed
 * here: the same numbers either way.
 *   q [n_q * head_dim], k [n_k * head_dim], rotated in place */
void moas__rope_row(const moas_model *m, int32_t pos, float *q, int32_t n_q, float *k,
                    int32_t n_k) {
    const int32_t head_dim = m->head_dim, n_pairs = head_dim / 2;
    if (pos >= 0 && pos < m->rope_positions) {
        const float *row = m->rope_table + (size_t)pos * head_dim;
        rope_pairs(head_dim, 0, n_pairs, row, row + n_pairs, q, n_q, k, n_k);
        return;
    }
    float cs[ROPE_CHUNK], sn[ROPE_CHUNK];
    for (int32_t i0 = 0; i0 < n_pairs; i0 += ROPE_CHUNK) {
        const int32_t i1 = i0 + ROPE_CHUNK < n_pairs ? i0 + ROPE_CHUNK : n_pairs;
        moas__rope_angles(m, pos, i0, i1, cs, sn);
        rope_pairs(head_dim, i0, i1, cs, sn, q, n_q, k, n_k);
    }
}

/* The attention kernels for a cache's element type. */
typedef struct {
    void (*scores)(const void *, const uint32_t *, int32_t, const float *, size_t, int32_t,
                   int32_t, float, float *, size_t);
    void (*mix)(const void *, const uint32_t *, size_t, int32_t, const float *, size_t, int32_t,
                int32_t, float *, size_t);
} kv_kernels;

static kv_kernels kv_kernels_for(const moas_ops *ops, moas_type type) {
    kv_kernels k = {ops->attn_scores_f32, ops->attn_mix_f32};
    if (type == MOAS_TYPE_F16) {
        k.scores = ops->attn_scores_f16;
        k.mix = ops->attn_mix_f16;
    } else if (type == MOAS_TYPE_Q8_0) {
        k.scores = ops->attn_scores_q8_0;
        k.mix = ops->attn_mix_q8_0;
    }
    return k;
}

/* The online softmax step of one query over a run of nk scores s (already scaled):
 * raise its running maximum, shrinking what it summed so far, and exponentiate s in
 * place. The value sum of the run follows. */
static void softmax_run(const moas_ops *ops, float *s, int32_t nk, float *run_max,
                        float *run_sum, float *out, int32_t head_dim) {
    const float mx = ops->max(s, nk, *run_max);
    if (mx > *run_max && *run_max != -INFINITY) {
        const float shrink = expf(*run_max - mx);
        *run_sum *= shrink;
        for (int32_t e = 0; e < head_dim; e++) {
            out[e] *= shrink;
        }
    }
    *run_max = mx;
    *run_sum += ops->exp_sum(s, nk, mx);
}

/* Keys are taken in splits of MOAS_ATT_SPLIT_KEYS positions (multiples of the run),
 * each with a softmax state of its own (maximum, sum and unscaled value sum, from
 * nothing), folded into the query's running state in split order by merge_split. A
 * single decoded query can then give its splits to different threads (flash-decoding)
 * and fold their states afterwards with the same bits as one thread going split by
 * split, and a block's queries fold at the same positions, so a query's numbers stay
 * the same however it is computed. Up to one split of keys, this is plain online
 * softmax. */

/* A head's value sums divided by its softmax sum: the attention output. */
static void divide_by_sum(float *o, float sum, int32_t head_dim) {
    const float inv = 1.0f / sum;
    for (int32_t e = 0; e < head_dim; e++) {
        o[e] *= inv;
    }
}

/* Fold a later split's state (m_s, l_s, o_s) into the running one (M, L, O). */
static void merge_split(float *O, float *M, float *L, const float *o_s, float m_s, float l_s,
                        int32_t head_dim) {
    const float m = *M > m_s ? *M : m_s;
    const float a = expf(*M - m), b = expf(m_s - m);
    for (int32_t e = 0; e < head_dim; e++) {
        O[e] = O[e] * a + o_s[e] * b;
    }
    *L = *L * a + l_s * b;
    *M = m;
}

_Static_assert(MOAS_ATT_QUERIES < 32, "a call's query heads are bits of a uint32_t");

/* Which query heads of [c0, c1) (at most MOAS_ATT_QUERIES) read another K/V row than
 * the head before them, for a token of w heads: bit h - c0 for c0 < h < c1 with
 * (h - 1) w / n_head != h w / n_head. */
static uint32_t width_breaks(int32_t w, int32_t n_head, int32_t c0, int32_t c1) {
    uint32_t breaks = 0;
    for (int32_t h = c0 + 1; h < c1; h++) {
        if ((h - 1) * w / n_head != h * w / n_head) {
            breaks |= 1u << (h - c0);
        }
    }
    return breaks;
}

/* The widths one attend_one_keys call has met and their breaks, so that each costs its
 * divisions once per call, not once per run of keys. A stored token has the width
 * of one of the model's schemes, so a call meets at most MOAS_MAX_SCHEMES of them. */
typedef struct {
    int32_t n;
    int32_t width[MOAS_MAX_SCHEMES];
    uint32_t breaks[MOAS_MAX_SCHEMES];
} width_memo;

/* The breaks of query heads [c0, c1) over keys [j0, j1): those of every width present
 * (a uniform stream has one). A head then reads the same row of every key as the head
 * before it unless its bit is set. Should a call meet more widths than the memo holds
 * (no model can), every head from then on is a group of its own: slower, same result. */
static uint32_t run_breaks(const moas_kv_stream *kv, int32_t n_head, int32_t j0, int32_t j1,
                           int32_t c0, int32_t c1, width_memo *memo) {
    const uint32_t every = ((1u << (c1 - c0)) - 1) & ~1u;   /* each head a group */
    uint32_t breaks = 0;
    int32_t last = -1;
    for (int32_t j = j0; j < j1; j++) {
        const int32_t w = moas__kv_heads(kv, j);
        if (w == last) {
            continue;   /* neighbouring tokens mostly share a scheme */
        }
        last = w;
        int32_t i = 0;
        while (i < memo->n && memo->width[i] != w) {
            i++;
        }
        if (i == memo->n) {
            if (memo->n == MOAS_MAX_SCHEMES) {
                return every;
            }
            memo->width[i] = w;
            memo->breaks[i] = width_breaks(w, n_head, c0, c1);
            memo->n++;
        }
        breaks |= memo->breaks[i];
        if (kv->off == NULL || breaks == every) {
            break;   /* one width, or no finer grouping left to find */
        }
    }
    return breaks;
}

/* Groups of query heads [c0, c1) cut at `breaks`: [bounds[g], bounds[g + 1]) for g
 * below the returned count. */
static int32_t groups_at(uint32_t breaks, int32_t c0, int32_t c1, int32_t *bounds) {
    int32_t n = 0;
    bounds[n++] = c0;
    for (uint32_t b = breaks; b != 0; b &= b - 1) {
        bounds[n++] = c0 + __builtin_ctz(b);
    }
    bounds[n] = c1;
    return n;
}

/* The K/V rows query head h reads for keys [j0, j1): a ragged stream's by the
 * kv_rows kernel (ops.h). The page table and its shift are read once, not per key:
 * `rows` could alias them for all the compiler knows. */
static void head_rows(const moas_ops *ops, const moas_pool *pool, const moas_kv_stream *kv,
                      int32_t n_head, int32_t h, int32_t j0, int32_t j1, uint32_t *rows) {
    const int32_t *pages = kv->pages;
    const uint32_t shift = (uint32_t)pool->page_shift;
    if (kv->off == NULL) {   /* uniform: one width */
        const uint32_t w = (uint32_t)kv->n_kv, g = (uint32_t)(h * kv->n_kv / n_head);
        for (int32_t j = j0; j < j1; j++) {
            rows[j - j0] = moas__page_row(pages, shift, (uint32_t)j * w + g);
        }
        return;
    }
    ops->kv_rows(kv->off + j0, pages, shift, (uint32_t)h, moas__head_group_recip(n_head),
                 j1 - j0, rows);
}

/* One query (a token decoded alone or a sequence's one row of a batched step) over
 * keys [j0, j1) (whole splits, j0 a multiple of MOAS_ATT_SPLIT_KEYS), query heads
 * [c0, c1) (at most MOAS_ATT_QUERIES): each head's softmax state over those keys from
 * nothing, into o [c1 - c0][head_dim] (value sums not yet divided), mx and sm; the
 * rows of keys up to `ahead` are asked for a run ahead. What attend_heads computes, bit
 * for bit, for n = 1, with the heads that read the same K/V rows taken together. In
 * each run of keys, a group of query heads that reads the same row of every key (all
 * of them over a run of MQA tokens, a third over GQA-2 ones) goes through the score
 * kernel as the queries of one block: each K row is loaded once for the group and its
 * rows are found once. Groups are formed over the whole run: cut into pieces of 16
 * keys grouped each on its own, so that one wide token split only its piece's heads,
 * decode was 2-8% slower (docs/PERFORMANCE_HISTORY.md, "Tried and not kept"). Every
 * query's operations stay what they are alone (a score is one chain, a value sum goes
 * key by key, and a sum split into runs of keys equals one call over all of them). */
static void attend_one_keys(const moas_workspace *ws, const moas_pool *pool,
                            const moas_kv_stream *kv, const float *q, int32_t j0_keys,
                            int32_t j1_keys, int32_t ahead, int32_t c0, int32_t c1, float *o,
                            float *mx_out, float *sm_out, float *att, uint32_t *rows) {
    const moas_model *m = ws->model;
    const int32_t n_head = m->n_head, head_dim = m->head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    const void *K = pool->k, *V = pool->v;
    const kv_kernels kern = kv_kernels_for(ws->ops, pool->kv_type);
    int32_t bounds[MOAS_ATT_QUERIES + 1];   /* a run's groups: [bounds[g], bounds[g + 1]) */
    width_memo memo = {0};
    /* the softmax states in the thread's own stack until the end: a split's outputs
     * share cache lines with the neighbouring split's, which another thread may write */
    float mx[MOAS_ATT_QUERIES], sm[MOAS_ATT_QUERIES];

    for (int32_t h = c0; h < c1; h++) {
        mx[h - c0] = -INFINITY;
        sm[h - c0] = 0.0f;
    }
    memset(o, 0, (size_t)(c1 - c0) * head_dim * sizeof *o);
    for (int32_t k0 = j0_keys; k0 < j1_keys; k0 += MOAS_ATT_KEYS) {
        const int32_t k1 = j1_keys - k0 < MOAS_ATT_KEYS ? j1_keys : k0 + MOAS_ATT_KEYS;
        /* the next run's keys [k1, k2), asked for while this one is computed: a piece
         * before each group's scores, not all at once */
        const int32_t k2 = k1 >= ahead                   ? k1
                           : ahead - k1 < MOAS_ATT_KEYS ? ahead
                                                        : k1 + MOAS_ATT_KEYS;
        size_t asked = 0;
        const int32_t n_groups =
            groups_at(run_breaks(kv, n_head, k0, k1, c0, c1, &memo), c0, c1, bounds);
        for (int32_t g = 0; g < n_groups; g++) {   /* scores */
            const int32_t a = bounds[g], b = bounds[g + 1];
            if (k2 > k1) {
                const int32_t p0 = k1 + (k2 - k1) * g / n_groups;
                const int32_t p1 = k1 + (k2 - k1) * (g + 1) / n_groups;
                asked = moas__kv_prefetch(pool, kv, moas__kv_first(kv, p0),
                                          moas__kv_first(kv, p1), asked);
            }
            uint32_t *r = rows + (size_t)(a - c0) * MOAS_ATT_KEYS;
            head_rows(ws->ops, pool, kv, n_head, a, k0, k1, r);
            kern.scores(K, r, k1 - k0, q + (size_t)a * head_dim, (size_t)head_dim, b - a,
                        head_dim, scale, att + (size_t)(a - c0) * MOAS_ATT_KEYS,
                        MOAS_ATT_KEYS);
        }
        for (int32_t h = c0; h < c1; h++) {
            softmax_run(ws->ops, att + (size_t)(h - c0) * MOAS_ATT_KEYS, k1 - k0, &mx[h - c0],
                        &sm[h - c0], o + (size_t)(h - c0) * head_dim, head_dim);
        }
        if (n_groups == 1) {   /* value sums: every head the same rows */
            kern.mix(V, rows, 0, k1 - k0, att, MOAS_ATT_KEYS, c1 - c0, head_dim, o,
                     (size_t)head_dim);
            continue;
        }
        /* Heads that read different rows: each head's rows (its group's first head
         * found them), and the heads together in one call, each reading its own, so
         * that the kernel takes them in blocks instead of a head at a time; a query's
         * sums are the same either way. */
        for (int32_t g = 0; g < n_groups; g++) {
            const int32_t a = bounds[g], b = bounds[g + 1];
            const uint32_t *first = rows + (size_t)(a - c0) * MOAS_ATT_KEYS;
            for (int32_t h = a + 1; h < b; h++) {
                memcpy(rows + (size_t)(h - c0) * MOAS_ATT_KEYS, first,
                       (size_t)(k1 - k0) * sizeof *rows);
            }
        }
        kern.mix(V, rows, MOAS_ATT_KEYS, k1 - k0, att, MOAS_ATT_KEYS, c1 - c0, head_dim, o,
                 (size_t)head_dim);
    }
    memcpy(mx_out, mx, (size_t)(c1 - c0) * sizeof *mx);
    memcpy(sm_out, sm, (size_t)(c1 - c0) * sizeof *sm);
}

/* One query over all its keys, query heads [h0, h1): split by split (the first
 * straight into out), each later one folded in, then divided by the sums. `split`
 * is the thread's scratch for a split's state of MOAS_ATT_QUERIES heads; with
 * `prefetch` each run's rows are asked for a run ahead (step_prefetches). */
static void attend_one(const moas_workspace *ws, const moas_pool *pool,
                       const moas_kv_stream *kv, const float *q, int32_t pos, int32_t h0,
                       int32_t h1, bool prefetch, float *out, float *att, uint32_t *rows,
                       float *split) {
    const int32_t head_dim = ws->model->head_dim, n_keys = pos + 1;
    const int32_t ahead = prefetch ? n_keys : 0;
    float run_max[MOAS_ATT_QUERIES], run_sum[MOAS_ATT_QUERIES];
    float split_max[MOAS_ATT_QUERIES], split_sum[MOAS_ATT_QUERIES];

    for (int32_t c0 = h0; c0 < h1; c0 += MOAS_ATT_QUERIES) {   /* heads whose scores fit */
        const int32_t c1 = h1 - c0 < MOAS_ATT_QUERIES ? h1 : c0 + MOAS_ATT_QUERIES;
        float *o = out + (size_t)c0 * head_dim;
        for (int32_t s0 = 0; s0 < n_keys; s0 += MOAS_ATT_SPLIT_KEYS) {
            const int32_t s1 = n_keys - s0 < MOAS_ATT_SPLIT_KEYS ? n_keys : s0 + MOAS_ATT_SPLIT_KEYS;
            if (s0 == 0) {
                attend_one_keys(ws, pool, kv, q, s0, s1, ahead, c0, c1, o, run_max, run_sum,
                                att, rows);
                continue;
            }
            attend_one_keys(ws, pool, kv, q, s0, s1, ahead, c0, c1, split, split_max,
                            split_sum, att, rows);
            for (int32_t h = c0; h < c1; h++) {
                merge_split(o + (size_t)(h - c0) * head_dim, &run_max[h - c0], &run_sum[h - c0],
                            split + (size_t)(h - c0) * head_dim, split_max[h - c0],
                            split_sum[h - c0], head_dim);
            }
        }
        for (int32_t h = c0; h < c1; h++) {
            divide_by_sum(o + (size_t)(h - c0) * head_dim, run_sum[h - c0], head_dim);
        }
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
 * longer than a run is kept. Each split of MOAS_ATT_SPLIT_KEYS keys starts a state
 * of its own (the first in OUT, later ones in `split`, [MOAS_ATT_QUERIES, head_dim]),
 * folded into the query's by merge_split. Runs and splits start at multiples of
 * their length in key positions, the same whether a query is decoded alone or in a
 * block, so the same operations happen in the same order: a query's numbers are the
 * same bits either way. */
static void attend_heads(const moas_workspace *ws, const moas_pool *pool,
                         const moas_kv_stream *kv, const float *Q, size_t ldq, int32_t pos0,
                         int32_t n, int32_t h0, int32_t h1, float *OUT, size_t ldo, float *att,
                         uint32_t *rows, float *split) {
    const moas_model *m = ws->model;
    const moas_ops *ops = ws->ops;
    const int32_t n_head = m->n_head, head_dim = m->head_dim;
    const float scale = 1.0f / sqrtf((float)head_dim);
    const void *K = pool->k, *V = pool->v;
    const kv_kernels kern = kv_kernels_for(ops, pool->kv_type);
    float run_max[MOAS_ATT_QUERIES], run_sum[MOAS_ATT_QUERIES];
    float split_max[MOAS_ATT_QUERIES], split_sum[MOAS_ATT_QUERIES];

    for (int32_t h = h0; h < h1; h++) {
        const int32_t n_keys = pos0 + n;
        head_rows(ops, pool, kv, n_head, h, 0, n_keys, rows);
        for (int32_t q0 = 0; q0 < n; q0 += MOAS_ATT_QUERIES) {
            const int32_t nq = n - q0 < MOAS_ATT_QUERIES ? n - q0 : MOAS_ATT_QUERIES;
            const int32_t seen = pos0 + q0 + nq;   /* keys the last query sees */
            for (int32_t s0 = 0; s0 < seen; s0 += MOAS_ATT_SPLIT_KEYS) {
                const int32_t s1 = seen - s0 < MOAS_ATT_SPLIT_KEYS ? seen : s0 + MOAS_ATT_SPLIT_KEYS;
                /* the split's state: the first in OUT itself, later ones in `split` */
                float *ob = s0 == 0 ? OUT + (size_t)q0 * ldo + (size_t)h * head_dim : split;
                const size_t ld = s0 == 0 ? ldo : (size_t)head_dim;
                float *mx = s0 == 0 ? run_max : split_max, *sm = s0 == 0 ? run_sum : split_sum;
                for (int32_t t = 0; t < nq; t++) {
                    mx[t] = -INFINITY;
                    sm[t] = 0.0f;
                    memset(ob + (size_t)t * ld, 0, (size_t)head_dim * sizeof *ob);
                }
                for (int32_t k0 = s0; k0 < s1; k0 += MOAS_ATT_KEYS) {
                    /* query t sees keys up to pos0 + q0 + t: those from t_full on see
                     * the whole run, and their scores and value sums go in one call each */
                    const int32_t k1 = k0 + MOAS_ATT_KEYS;
                    int32_t t_full = k1 - (pos0 + q0 + 1);
                    t_full = t_full < 0 ? 0 : t_full > nq ? nq : t_full;
                    if (t_full < nq) {
                        kern.scores(K, rows + k0, MOAS_ATT_KEYS,
                                    Q + (size_t)(q0 + t_full) * ldq + (size_t)h * head_dim, ldq,
                                    nq - t_full, head_dim, scale,
                                    att + (size_t)t_full * MOAS_ATT_KEYS, MOAS_ATT_KEYS);
                    }
                    for (int32_t t = 0; t < nq; t++) {
                        const int32_t end = pos0 + q0 + t + 1;
                        const int32_t nk = (end < k1 ? end : k1) - k0;
                        if (nk <= 0) {
                            continue;
                        }
                        const float *q = Q + (size_t)(q0 + t) * ldq + (size_t)h * head_dim;
                        float *out = ob + (size_t)t * ld;
                        float *s = att + (size_t)t * MOAS_ATT_KEYS;
                        if (t < t_full) {
                            kern.scores(K, rows + k0, nk, q, ldq, 1, head_dim, scale, s, nk);
                        }
                        softmax_run(ops, s, nk, &mx[t], &sm[t], out, head_dim);
                        if (t < t_full) {
                            kern.mix(V, rows + k0, 0, nk, s, MOAS_ATT_KEYS, 1, head_dim, out, ld);
                        }
                    }
                    if (t_full < nq) {
                        kern.mix(V, rows + k0, 0, MOAS_ATT_KEYS,
                                 att + (size_t)t_full * MOAS_ATT_KEYS, MOAS_ATT_KEYS,
                                 nq - t_full, head_dim, ob + (size_t)t_full * ld, ld);
                    }
                }
                for (int32_t t = 0; s0 > 0 && t < nq; t++) {
                    if (pos0 + q0 + t >= s0) {   /* a query with keys in the split */
                        merge_split(OUT + (size_t)(q0 + t) * ldo + (size_t)h * head_dim,
                                    &run_max[t], &run_sum[t], split + (size_t)t * head_dim,
                                    split_max[t], split_sum[t], head_dim);
                    }
                }
            }
            for (int32_t t = 0; t < nq; t++) {
                float *out = OUT + (size_t)(q0 + t) * ldo + (size_t)h * head_dim;
                divide_by_sum(out, run_sum[t], head_dim);
            }
        }
    }
}

/* Causal attention of each run's block of queries (positions n_past .. n_past + n - 1
 * of its context, their K/V already stored) over its own context's stream `stream`,
 * all query heads.
 *   Q [rows, n_head * head_dim] of stride ldq, OUT likewise with stride ldo
 *
 * Query head h reads token j's KV head h * n_kv(j) / n_head: itself when j stored
 * every head (MHA), its group under GQA (repeat_interleave in the reference), head 0
 * under MQA; a K or V row that serves a group of query heads is read where it is,
 * never expanded. Slices split the units of work: per run, each head's queries in
 * chunks of `chunk` (a multiple of MOAS_ATT_QUERIES; a decoded token's head is one
 * unit), run by run, head by head; each slice with its own scratch. A query's numbers
 * are the same whoever computes them, in whichever chunk, and whichever other runs
 * share the call (attend_heads). */
typedef struct {
    const moas_workspace *ws;
    const moas_seq_run *runs;
    int32_t n_runs;
    int32_t stream;          /* index into each context's kv */
    const float *Q;
    size_t ldq;
    float *OUT;
    size_t ldo;
    bool prefetch;           /* ask for K/V rows ahead (step_prefetches) */
    int32_t chunk;           /* queries a unit of a run with several */
    int64_t units;           /* all runs' */
} attend_step;

static int64_t run_units(const moas_seq_run *run, int32_t n_head, int32_t chunk) {
    return (int64_t)n_head * (((int64_t)run->n + chunk - 1) / chunk);
}

static void attend_slice(void *arg, int32_t ith, int32_t nth) {
    const attend_step *s = arg;
    const moas_workspace *ws = s->ws;
    const int32_t n_head = ws->model->n_head;
    const int64_t u0 = ith * s->units / nth, u1 = (ith + 1) * s->units / nth;
    float *att = ws->att + (size_t)ith * MOAS_ATT_QUERIES * MOAS_ATT_KEYS;
    uint32_t *rows = ws->att_rows + (size_t)ith * ws->rows_each;
    float *split = ws->att_split + (size_t)ith * MOAS_ATT_QUERIES * ws->model->head_dim;

    int64_t base = 0;   /* units of the runs before r */
    for (int32_t r = 0; r < s->n_runs && base < u1 && u0 < u1; r++) {
        const moas_seq_run *run = &s->runs[r];
        const int64_t ur = run_units(run, n_head, s->chunk);
        if (base + ur <= u0) {
            base += ur;
            continue;
        }
        /* this slice's units of the run: [a, b), unit h * chunks + c */
        const int64_t a = (u0 > base ? u0 : base) - base;
        const int64_t b = (u1 < base + ur ? u1 : base + ur) - base;
        const moas_context *ctx = run->ctx;
        const moas_kv_stream *kv = &ctx->kv[s->stream];
        if (run->n == 1) {
            if (s->prefetch && base + ur < u1) {
                /* attend_one asks for each run of keys one run ahead, so a query's first
                 * run would come from memory while it waits: ask for the next query's
                 * first run now, while this one is computed */
                const moas_seq_run *next = &s->runs[r + 1];
                const moas_kv_stream *nkv = &next->ctx->kv[s->stream];
                const int32_t n_keys = next->ctx->n_past + next->n;
                (void)moas__kv_prefetch(next->ctx->pool, nkv, 0,
                                        moas__kv_first(nkv, n_keys < MOAS_ATT_KEYS
                                                                ? n_keys
                                                                : MOAS_ATT_KEYS),
                                        0);
            }
            attend_one(ws, ctx->pool, kv, s->Q + (size_t)run->row0 * s->ldq, ctx->n_past,
                       (int32_t)a, (int32_t)b, s->prefetch,
                       s->OUT + (size_t)run->row0 * s->ldo, att, rows, split);
        } else {
            const int64_t chunks = ur / n_head;
            for (int64_t h = a / chunks; h <= (b - 1) / chunks; h++) {
                const int64_t c0 = h == a / chunks ? a % chunks : 0;
                const int64_t c1 = h == (b - 1) / chunks ? (b - 1) % chunks + 1 : chunks;
                const int32_t q0 = (int32_t)(c0 * s->chunk);
                const int32_t q1 = c1 * s->chunk < run->n ? (int32_t)c1 * s->chunk : run->n;
                const size_t row = (size_t)run->row0 + (size_t)q0;
                attend_heads(ws, ctx->pool, kv, s->Q + row * s->ldq, s->ldq, ctx->n_past + q0,
                             q1 - q0, (int32_t)h, (int32_t)h + 1, s->OUT + row * s->ldo,
                             s->ldo, att, rows, split);
            }
        }
        base += ur;
    }
}

/* One decoded query's keys split between threads (flash-decoding): each thread takes
 * whole splits, every head, and leaves each split's state in ws->att_part; the
 * caller folds them in split order. Splitting heads instead would have every thread
 * read every row that several heads share (an MQA token's one row, all six heads). */
typedef struct {
    const moas_workspace *ws;
    const moas_context *ctx;
    int32_t stream;
    const float *q;
    int32_t n_splits;
    bool prefetch;           /* ask for K/V rows ahead (step_prefetches) */
} split_step;

/* Where split sp's state lives in ws->att_part: value sums [n_head, head_dim], then
 * after all of them the maxima and the sums [n_splits_max, n_head] each. */
static float *split_sums(const moas_workspace *ws, int32_t sp) {
    return ws->att_part + (size_t)sp * ws->model->n_head * ws->model->head_dim;
}
static float *split_max_of(const moas_workspace *ws, int32_t sp) {
    return ws->att_part + (size_t)ws->max_splits * ws->model->n_head * ws->model->head_dim +
           (size_t)sp * ws->model->n_head;
}
static float *split_sum_of(const moas_workspace *ws, int32_t sp) {
    return split_max_of(ws, sp) + (size_t)ws->max_splits * ws->model->n_head;
}

static void attend_split_slice(void *arg, int32_t ith, int32_t nth) {
    const split_step *s = arg;
    const moas_workspace *ws = s->ws;
    const int32_t n_head = ws->model->n_head, head_dim = ws->model->head_dim;
    const int32_t n_keys = s->ctx->n_past + 1;
    const int32_t sp0 = ith * s->n_splits / nth, sp1 = (ith + 1) * s->n_splits / nth;
    const int32_t ahead = !s->prefetch                          ? 0
                          : sp1 * MOAS_ATT_SPLIT_KEYS < n_keys ? sp1 * MOAS_ATT_SPLIT_KEYS
                                                               : n_keys;
    float *att = ws->att + (size_t)ith * MOAS_ATT_QUERIES * MOAS_ATT_KEYS;
    uint32_t *rows = ws->att_rows + (size_t)ith * ws->rows_each;
    for (int32_t sp = sp0; sp < sp1; sp++) {
        const int32_t j0 = sp * MOAS_ATT_SPLIT_KEYS;
        const int32_t j1 = n_keys - j0 < MOAS_ATT_SPLIT_KEYS ? n_keys : j0 + MOAS_ATT_SPLIT_KEYS;
        for (int32_t c0 = 0; c0 < n_head; c0 += MOAS_ATT_QUERIES) {
            const int32_t c1 = n_head - c0 < MOAS_ATT_QUERIES ? n_head : c0 + MOAS_ATT_QUERIES;
            attend_one_keys(ws, s->ctx->pool, &s->ctx->kv[s->stream], s->q, j0, j1, ahead, c0,
                            c1, split_sums(ws, sp) + (size_t)c0 * head_dim,
                            split_max_of(ws, sp) + c0, split_sum_of(ws, sp) + c0, att, rows);
        }
    }
}

/* Whether a step's decode attention asks for K/V rows ahead: only when the K/V it
 * reads, all its contexts' streams together, outgrow what the caches keep from one
 * step to the next (MOAS_KV_PREFETCH_MIN_BYTES), or MOAS_KV_PREFETCH_MANY_BYTES when
 * each of the step's `n_threads` threads goes through the rows of two sequences or
 * more. Estimated from this stream's heads times the context's streams. */
static bool step_prefetches(const moas_seq_run *runs, int32_t n_runs, int32_t stream,
                            int32_t n_threads) {
    uint64_t bytes = 0;
    for (int32_t r = 0; r < n_runs; r++) {
        const moas_context *ctx = runs[r].ctx;
        bytes += (uint64_t)moas__kv_heads_at(&ctx->kv[stream], ctx->n_past + runs[r].n) * 2 *
                 ctx->pool->head_bytes * (uint64_t)ctx->n_streams;
    }
    return bytes >= (n_runs >= 2 * n_threads ? MOAS_KV_PREFETCH_MANY_BYTES
                                             : MOAS_KV_PREFETCH_MIN_BYTES);
}

static void attend(moas_workspace *ws, const moas_seq_run *runs, int32_t n_runs, int32_t stream,
                   const float *Q, size_t ldq, float *OUT, size_t ldo) {
    const int32_t n_head = ws->model->n_head, head_dim = ws->model->head_dim;
    int64_t work = 0;
    for (int32_t r = 0; r < n_runs; r++) {
        work += (int64_t)2 * head_dim * n_head * runs[r].n *
                (runs[r].ctx->n_past + (runs[r].n + 1) / 2);
    }
    const bool parallel = work >= ws->parallel_min_work;
    /* one decoded query (n_past + 1 keys), enough splits for every thread to get two */
    const int32_t n_splits = n_runs == 1 && runs[0].n == 1
                                 ? (runs[0].ctx->n_past + MOAS_ATT_SPLIT_KEYS) / MOAS_ATT_SPLIT_KEYS
                                 : 0;
    if (parallel && ws->n_threads > 1 && n_splits >= 2 * ws->n_threads) {
        split_step step = {ws, runs[0].ctx, stream, Q + (size_t)runs[0].row0 * ldq, n_splits,
                           step_prefetches(runs, n_runs, stream, ws->n_threads)};
        moas__team_run(&ws->team, true, attend_split_slice, &step);
        float *out = OUT + (size_t)runs[0].row0 * ldo;
        for (int32_t h = 0; h < n_head; h++) {   /* fold the splits in order */
            float *o = out + (size_t)h * head_dim;
            float mx = split_max_of(ws, 0)[h], sm = split_sum_of(ws, 0)[h];
            memcpy(o, split_sums(ws, 0) + (size_t)h * head_dim, (size_t)head_dim * sizeof *o);
            for (int32_t sp = 1; sp < n_splits; sp++) {
                merge_split(o, &mx, &sm, split_sums(ws, sp) + (size_t)h * head_dim,
                            split_max_of(ws, sp)[h], split_sum_of(ws, sp)[h], head_dim);
            }
            divide_by_sum(o, sm, head_dim);
        }
        return;
    }
    /* a prompt block: each head's queries in chunks, several slices a thread (team.h),
     * so that a thread that runs slower leaves its last chunks to the other */
    bool prompt = false;
    for (int32_t r = 0; r < n_runs && !prompt; r++) {
        prompt = runs[r].n >= MOAS_FINE_SLICE_ROWS;
    }
    attend_step step = {ws,  runs, n_runs, stream, Q, ldq, OUT, ldo,
                        step_prefetches(runs, n_runs, stream, parallel ? ws->n_threads : 1),
                        prompt ? MOAS_ATT_CHUNK_QUERIES : INT32_MAX, 0};
    for (int32_t r = 0; r < n_runs; r++) {
        step.units += run_units(&runs[r], n_head, step.chunk);
    }
    moas__team_run_slices(&ws->team, parallel, attend_slice, &step,
                          prompt ? MOAS_TEAM_SLICES_PER_THREAD * ws->team.nth : ws->team.nth);
}

/* The scheme with the largest gate, the first on ties. */
static int32_t largest_gate(const float *gates, int32_t n) {
    int32_t best = 0;
    for (int32_t s = 1; s < n; s++) {
        best = gates[s] > gates[best] ? s : best;
    }
    return best;
}

void moas__pool_heads(const float *full, int32_t n_head, int32_t head_dim, int32_t n_kv,
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
        moas__pool_heads(full, n_head, head_dim, n_kv, tmp);
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
bool moas__forward(moas_context *ctx, int32_t token, bool want_logits) {
    return moas__forward_batch(ctx, &token, 1, NULL, want_logits);
}

/* ---- batched forward: many rows through each layer together ------------------------ */

/* Store one token's n_heads heads of K and V as token pos's heads in `kv`, head by
 * head: a token's heads may straddle two pages. */
static void store_kv_row(const moas_workspace *ws, const moas_pool *pool, moas_kv_stream *kv,
                         int32_t pos, const float *k, const float *v, int32_t n_heads) {
    const int32_t d = ws->model->head_dim;
    const uint32_t first = moas__kv_first(kv, pos);
    /* the call reserved pages for at least these heads (context.c, call_max_heads) */
    MOAS_ASSERT(first + (uint32_t)n_heads <= (uint32_t)kv->n_pages << pool->page_shift);
    for (int32_t i = 0; i < n_heads; i++) {
        const uint32_t row = moas__kv_row(pool, kv, first + (uint32_t)i);
        moas__kv_head_store(ws->ops, pool->kv_type, moas__pool_head(pool, pool->k, row),
                            k + (size_t)i * d, d);
        moas__kv_head_store(ws->ops, pool->kv_type, moas__pool_head(pool, pool->v, row),
                            v + (size_t)i * d, d);
    }
}

/* Mixture mode's rows: scheme s's RoPE and K/V stored; its output added to the mix,
 * weighted by the row's gate; the mix added to the residual (s == n_scheme). */
typedef struct {
    moas_workspace *ws;
    const moas_scheme_weights *sw;
    int32_t stream, s;
} mixture_rows;

static void mixture_store_row(const void *arg, int32_t t, int32_t slot) {
    const mixture_rows *a = arg;
    const moas_workspace *ws = a->ws;
    const moas_model *m = ws->model;
    const size_t C = (size_t)m->n_embd;
    moas_context *ctx = ws->row_ctx[t];
    (void)slot;
    if (m->rope) {
        moas__rope_row(m, ws->row_pos[t], ws->bq + t * C, m->n_head, ws->bk + t * C,
                       a->sw->n_kv);
    }
    store_kv_row(ws, ctx->pool, &ctx->kv[a->stream], ws->row_pos[t], ws->bk + t * C,
                 ws->bv + t * C, a->sw->n_kv);
}

static void mixture_mix_row(const void *arg, int32_t t, int32_t slot) {
    const mixture_rows *a = arg;
    const moas_workspace *ws = a->ws;
    const moas_model *m = ws->model;
    const int32_t C = m->n_embd, S = m->n_scheme;
    const float g = m->mixing == MOAS_MIXING_ROUTER ? ws->bgates[(size_t)t * S + a->s] : 1.0f;
    (void)slot;
    for (int32_t i = 0; i < C; i++) {
        ws->bmix[(size_t)t * C + i] += g * ws->by[(size_t)t * C + i];
    }
}

static void mixture_residual_row(const void *arg, int32_t t, int32_t slot) {
    const mixture_rows *a = arg;
    const moas_model *m = a->ws->model;
    const int32_t C = m->n_embd, S = m->n_scheme;
    float *x = a->ws->bx + (size_t)t * C;
    const float *mix = a->ws->bmix + (size_t)t * C;
    (void)slot;
    for (int32_t i = 0; i < C; i++) {
        x[i] += m->mixing == MOAS_MIXING_MEAN ? mix[i] / (float)S : mix[i];
    }
}

/* Mixture mode, independent schemes: each scheme's K/V for every row of the block,
 * then each run's attention, then the output projection, mixed by the gates. */
static void batch_attention_mixture(moas_workspace *ws, const moas_seq_run *runs,
                                    int32_t n_runs, int32_t l, int32_t n) {
    const moas_model *m = ws->model;
    const int32_t C = m->n_embd, S = m->n_scheme;

    memset(ws->bmix, 0, (size_t)n * C * sizeof *ws->bmix);
    for (int32_t s = 0; s < S; s++) {
        const moas_scheme_weights *sw = &m->layers[l].scheme[s];
        const int32_t stream = l * S + s;
        const projection qkv[3] = {{&sw->wq, sw->bq, ws->bq, C},
                                   {&sw->wk, sw->bk, ws->bk, C},
                                   {&sw->wv, sw->bv, ws->bv, C}};
        project(ws, qkv, 3, ws->bxb, C, n);
        const mixture_rows a = {ws, sw, stream, s};
        each_row(ws, n, mixture_store_row, &a);
        attend(ws, runs, n_runs, stream, ws->bq, C, ws->batt, C);
        matmat(ws, &sw->wo, ws->batt, C, sw->bo, ws->by, C, n);
        each_row(ws, n, mixture_mix_row, &a);
    }
    const mixture_rows a = {ws, NULL, 0, S};
    each_row(ws, n, mixture_residual_row, &a);
}

/* Routed mode's rows of one scheme's group (the group's row i is the block's row
 * idx[i]): RoPE, the query put back in place and K/V stored; the output added to the
 * residual. */
typedef struct {
    moas_workspace *ws;
    const moas_scheme_weights *sw;
    int32_t l;
} routed_rows;

static void routed_store_row(const void *arg, int32_t i, int32_t slot) {
    const routed_rows *a = arg;
    const moas_workspace *ws = a->ws;
    const moas_model *m = ws->model;
    const size_t C = (size_t)m->n_embd;
    const int32_t t = ws->idx[i];
    moas_context *ctx = ws->row_ctx[t];
    (void)slot;
    if (m->rope) {
        moas__rope_row(m, ws->row_pos[t], ws->by + i * C, m->n_head, ws->bk + i * C,
                       a->sw->n_kv);
    }
    memcpy(ws->bq + (size_t)t * C, ws->by + i * C, C * sizeof(float));
    store_kv_row(ws, ctx->pool, &ctx->kv[a->l], ws->row_pos[t], ws->bk + i * C,
                 ws->bv + i * C, a->sw->n_kv);
}

static void routed_residual_row(const void *arg, int32_t i, int32_t slot) {
    const routed_rows *a = arg;
    const size_t C = (size_t)a->ws->model->n_embd;
    (void)slot;
    a->ws->ops->add(a->ws->bx + (size_t)a->ws->idx[i] * C, a->ws->by + i * C, (int32_t)C);
}

/* Routed mode, independent schemes: the block's rows grouped by their scheme; each
 * group's rows go through that scheme's projections together. All K/V are stored
 * before any token attends, and each token reads only its own context's positions up
 * to its own. */
static void batch_attention_routed(moas_workspace *ws, const moas_seq_run *runs,
                                   int32_t n_runs, int32_t l, int32_t n) {
    const moas_model *m = ws->model;
    const int32_t C = m->n_embd;
    int32_t *idx = ws->idx;

    for (int32_t t = 0; t < n; t++) {   /* the ragged offsets, in position order */
        moas_kv_stream *kv = &ws->row_ctx[t]->kv[l];
        const int32_t pos = ws->row_pos[t];
        kv->off[pos + 1] = kv->off[pos] + (uint32_t)m->scheme_n_kv[ws->bscheme[t]];
    }
    for (int pass = 0; pass < 2; pass++) {   /* 0: Q, K, V; 1: output projections */
        for (int32_t s = 0; s < m->n_scheme; s++) {
            const moas_scheme_weights *sw = &m->layers[l].scheme[s];
            int32_t n_sel = 0;
            for (int32_t t = 0; t < n; t++) {
                if (ws->bscheme[t] == s) {
                    idx[n_sel++] = t;
                }
            }
            if (n_sel == 0) {
                continue;
            }
            const float *src = pass == 0 ? ws->bxb : ws->batt;
            for (int32_t i = 0; i < n_sel; i++) {   /* gather the group's rows */
                memcpy(ws->bsel + (size_t)i * C, src + (size_t)idx[i] * C,
                       (size_t)C * sizeof(float));
            }
            if (pass == 0) {
                const projection qkv[3] = {{&sw->wq, sw->bq, ws->by, C},
                                           {&sw->wk, sw->bk, ws->bk, C},
                                           {&sw->wv, sw->bv, ws->bv, C}};
                project(ws, qkv, 3, ws->bsel, C, n_sel);
                const routed_rows a = {ws, sw, l};
                each_row(ws, n_sel, routed_store_row, &a);
            } else {
                matmat(ws, &sw->wo, ws->bsel, C, sw->bo, ws->by, C, n_sel);
                const routed_rows a = {ws, sw, l};
                each_row(ws, n_sel, routed_residual_row, &a);
            }
        }
        if (pass == 0) {
            attend(ws, runs, n_runs, l, ws->bq, C, ws->batt, C);
        }
    }
}

/* A pooled model's row: RoPE on the query and all H key heads, before pooling (the
 * rotation is the same for every head, so the pooled heads are the rotated means);
 * then its K/V mixed (mixture) or pooled for its scheme (routed) in the slot's scratch,
 * and stored. */
typedef struct {
    moas_workspace *ws;
    int32_t l;
    moas_mode mode;
} pooled_rows;

static void pooled_store_row(const void *arg, int32_t t, int32_t slot) {
    const pooled_rows *a = arg;
    const moas_workspace *ws = a->ws;
    const moas_model *m = ws->model;
    const size_t C = (size_t)m->n_embd, S = (size_t)m->n_scheme;
    float *kp = ws->kv_pool + (size_t)slot * 2 * C, *vp = kp + C;
    float *tmp = ws->pool_tmp + (size_t)slot * C;
    moas_context *ctx = ws->row_ctx[t];
    const float *k = ws->bk + t * C, *v = ws->bv + t * C;
    int32_t n_kv = m->n_head;
    if (m->rope) {
        moas__rope_row(m, ws->row_pos[t], ws->bq + t * C, m->n_head, ws->bk + t * C, m->n_head);
    }
    if (a->mode == MOAS_MODE_ROUTED) {
        n_kv = m->scheme_n_kv[ws->bscheme[t]];
        moas__pool_heads(k, m->n_head, m->head_dim, n_kv, kp);
        moas__pool_heads(v, m->n_head, m->head_dim, n_kv, vp);
    } else {
        mix_pooled(m, ws->bgates + t * S, k, tmp, kp);
        mix_pooled(m, ws->bgates + t * S, v, tmp, vp);
    }
    store_kv_row(ws, ctx->pool, &ctx->kv[a->l], ws->row_pos[t], kp, vp, n_kv);
}

/* Pooled models: one set of projections for the whole block; each token's K/V mixed
 * (mixture) or pooled for its scheme (routed) before it is stored. */
static void batch_attention_pooled(moas_workspace *ws, const moas_seq_run *runs,
                                   int32_t n_runs, int32_t l, int32_t n, moas_mode mode) {
    const moas_model *m = ws->model;
    const moas_scheme_weights *sw = &m->layers[l].shared;
    const int32_t C = m->n_embd;

    const projection qkv[3] = {{&sw->wq, sw->bq, ws->bq, C},
                               {&sw->wk, sw->bk, ws->bk, C},
                               {&sw->wv, sw->bv, ws->bv, C}};
    project(ws, qkv, 3, ws->bxb, C, n);
    for (int32_t t = 0; t < n && mode == MOAS_MODE_ROUTED; t++) {   /* in position order */
        moas_kv_stream *kv = &ws->row_ctx[t]->kv[l];
        const int32_t pos = ws->row_pos[t];
        kv->off[pos + 1] = kv->off[pos] + (uint32_t)m->scheme_n_kv[ws->bscheme[t]];
    }
    const pooled_rows a = {ws, l, mode};
    each_row(ws, n, pooled_store_row, &a);
    attend(ws, runs, n_runs, l, ws->bq, C, ws->batt, C);
    matmat(ws, &sw->wo, ws->batt, C, sw->bo, ws->by, C, n);
    add_rows(ws, ws->bx, ws->by, n);
}

/* LayerNorm or GELU of a block's rows, one parallel step when the rows are worth it:
 * the rows are independent, slices split them. Weights: rough multiply-adds per
 * element, against the threshold of the matrix products. */
#define MOAS_NORM_COST 4
#define MOAS_GELU_COST 16
typedef struct {
    const moas_workspace *ws;
    float *out;              /* LayerNorm: [n, n_cols] normed rows; GELU: [n, n_cols] in place */
    const float *in, *w, *b; /* LayerNorm: input rows and parameters */
    int32_t n_cols, n;
} rows_step;

static void norm_slice(void *arg, int32_t ith, int32_t nth) {
    const rows_step *s = arg;
    for (int32_t t = s->n * ith / nth; t < s->n * (ith + 1) / nth; t++) {
        norm_row(s->ws->model, s->out + (size_t)t * s->n_cols, s->in + (size_t)t * s->n_cols,
                 s->w, s->b, s->n_cols);
    }
}

static void gelu_slice(void *arg, int32_t ith, int32_t nth) {
    const rows_step *s = arg;
    for (int32_t t = s->n * ith / nth; t < s->n * (ith + 1) / nth; t++) {
        s->ws->ops->gelu(s->out + (size_t)t * s->n_cols, s->n_cols);
    }
}

/* out = LayerNorm(in) * w + b (or the RMSNorm) for n rows of C.   out, in [n, C] */
static void norm_rows(moas_workspace *ws, float *out, const float *in, const float *w,
                      const float *b, int32_t n) {
    const int32_t C = ws->model->n_embd;
    rows_step step = {ws, out, in, w, b, C, n};
    moas__team_run(&ws->team, (int64_t)n * C * MOAS_NORM_COST >= ws->parallel_min_work,
                   norm_slice, &step);
}

/* x = GELU(x) for n rows of n_cols.   x [n, n_cols] */
static void gelu_rows(moas_workspace *ws, float *x, int32_t n_cols, int32_t n) {
    rows_step step = {ws, x, NULL, NULL, NULL, n_cols, n};
    moas__team_run(&ws->team, (int64_t)n * n_cols * MOAS_GELU_COST >= ws->parallel_min_work,
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
 * rows x_t of ws->bxb. The hidden scratch holds one row of n_ff per token, so the
 * hidden units go in slices of at most C: a slice's up values land in `out`, its gate
 * values wait in ws->by (free until the down projection), and each slice is one
 * parallel step for both projections.   out [n, n_ff] */
static void swiglu_rows(moas_workspace *ws, const moas_layer *layer, float *out, int32_t n) {
    const moas_model *m = ws->model;
    const int32_t C = m->n_embd, n_ff = m->n_ff;
    for (int32_t c0 = 0; c0 < n_ff; c0 += C) {
        const int32_t w = n_ff - c0 < C ? n_ff - c0 : C;
        const moas_weight gate = weight_rows(&layer->ffn_gate, c0, w);
        const moas_weight up = weight_rows(&layer->ffn_up, c0, w);
        const projection p[2] = {
            {&gate, layer->ffn_gate_b != NULL ? layer->ffn_gate_b + c0 : NULL, ws->by, C},
            {&up, layer->ffn_up_b != NULL ? layer->ffn_up_b + c0 : NULL, out + c0, (size_t)n_ff}};
        project(ws, p, 2, ws->bxb, C, n);
        swiglu_step step = {out + c0, ws->by, (size_t)n_ff, (size_t)C, w, n};
        moas__team_run(&ws->team, (int64_t)n * w * MOAS_GELU_COST >= ws->parallel_min_work,
                       swiglu_slice, &step);
    }
}

/* The logits of the n rows gathered in ws->lx, handed to their runs: into `all` at
 * the token's place, and a run's last token's into its context's logits. */
static void flush_logits(moas_workspace *ws, const moas_seq_run *runs, const int32_t *run_of,
                         const int32_t *tok_of, int32_t n) {
    const moas_model *m = ws->model;
    const size_t n_vocab = (size_t)m->n_vocab;
    matmat(ws, &m->output, ws->lx, (size_t)m->n_embd, NULL, ws->logits, n_vocab, n);
    for (int32_t i = 0; i < n; i++) {
        const moas_seq_run *run = &runs[run_of[i]];
        const float *row = ws->logits + (size_t)i * n_vocab;
        if (run->all != NULL) {
            memcpy(run->all + (size_t)tok_of[i] * n_vocab, row, n_vocab * sizeof *row);
        }
        if (tok_of[i] == run->n - 1) {
            memcpy(run->ctx->logits, row, n_vocab * sizeof *row);
        }
    }
}

/* Logits of the rows that want them (every row of a run with `all`, a run's last row
 * with `want_last`), logit_rows at a time through the output matrix. */
static void block_logits(moas_workspace *ws, const moas_seq_run *runs, int32_t n_runs) {
    const moas_model *m = ws->model;
    const int32_t C = m->n_embd;
    int32_t run_of[MOAS_POOL_LOGIT_ROWS], tok_of[MOAS_POOL_LOGIT_ROWS];
    int32_t n_pending = 0;

    for (int32_t r = 0; r < n_runs; r++) {
        const moas_seq_run *run = &runs[r];
        run->ctx->logits_valid = run->want_last || run->all != NULL;
        for (int32_t t = 0; t < run->n; t++) {
            if (run->all == NULL && !(t == run->n - 1 && run->want_last)) {
                continue;
            }
            norm_row(m, ws->lx + (size_t)n_pending * C, ws->bx + (size_t)(run->row0 + t) * C,
                     m->out_norm_w, m->out_norm_b, C);
            run_of[n_pending] = r;
            tok_of[n_pending] = t;
            if (++n_pending == ws->logit_rows) {
                flush_logits(ws, runs, run_of, tok_of, n_pending);
                n_pending = 0;
            }
        }
    }
    if (n_pending > 0) {
        flush_logits(ws, runs, run_of, tok_of, n_pending);
    }
}

/* Whether an abort callback of the runs' contexts says stop (moas_abort_fn); it is
 * remembered in ws->aborted. */
static bool abort_asked(moas_workspace *ws, const moas_seq_run *runs, int32_t n_runs) {
    for (int32_t r = 0; r < n_runs; r++) {
        const moas_context *ctx = runs[r].ctx;
        if (ctx->abort_fn != NULL && ctx->abort_fn(ctx->abort_user) != 0) {
            ws->aborted = true;
            return true;
        }
    }
    return false;
}

static void forward_block(moas_workspace *ws, const moas_seq_run *runs, int32_t n_runs) {
    const moas_model *m = ws->model;
    const int32_t C = m->n_embd, S = m->n_scheme, L = m->n_layer;
    const int32_t n = runs[n_runs - 1].row0 + runs[n_runs - 1].n;
    const moas_mode mode = runs[0].ctx->mode;

    /* each row's context and position; x = token embedding + position embedding (RoPE
     * models: no table; their positions are rotations of Q and K) */
    for (int32_t r = 0; r < n_runs; r++) {
        for (int32_t t = 0; t < runs[r].n; t++) {
            const int32_t row = runs[r].row0 + t;
            float *x = ws->bx + (size_t)row * C;
            ws->row_ctx[row] = runs[r].ctx;
            ws->row_pos[row] = runs[r].ctx->n_past + t;
            embedding_row(&m->tok_embd, runs[r].tokens[t], x);
            if (m->rope) {
                continue;
            }
            embedding_row(&m->pos_embd, ws->row_pos[row], ws->xb);
            ws->ops->add(x, ws->xb, C);
        }
    }

    for (int32_t l = 0; l < L; l++) {
        const moas_layer *layer = &m->layers[l];

        if (l > 0 && ws->ask_abort && abort_asked(ws, runs, n_runs)) {
            return;   /* the caller undoes the call: nothing here is kept */
        }
        /* gates of every row, from its normed input */
        norm_rows(ws, ws->bxb, ws->bx, layer->attn_norm_w, layer->attn_norm_b, n);
        if (m->mixing == MOAS_MIXING_ROUTER) {
            matmat(ws, &layer->router_up, ws->bxb, C, layer->router_up_b, ws->bhb,
                   (size_t)m->n_router, n);
            gelu_rows(ws, ws->bhb, m->n_router, n);
            matmat(ws, &layer->router_down, ws->bhb, (size_t)m->n_router,
                   layer->router_down_b, ws->bgates, (size_t)S, n);
            for (int32_t t = 0; t < n; t++) {
                ws->ops->softmax(ws->bgates + (size_t)t * S, S);
            }
        } else {
            for (int32_t t = 0; t < n; t++) {
                for (int32_t s = 0; s < S; s++) {
                    ws->bgates[(size_t)t * S + s] = 1.0f / (float)S;
                }
            }
        }

        /* each row's scheme, run by run in position order (a callback sees each
         * context's tokens in that order), recorded in its context */
        for (int32_t t = 0; t < n; t++) {
            moas_context *ctx = ws->row_ctx[t];
            const int32_t pos = ws->row_pos[t];
            const float *g = ws->bgates + (size_t)t * S;
            int32_t choice;
            memcpy(ctx->route_gates + ((size_t)pos * L + l) * S, g, (size_t)S * sizeof *g);
            if (ctx->mode == MOAS_MODE_ROUTED) {
                choice = moas__route_choose(ctx, pos, l, g);
            } else {
                choice = largest_gate(g, S);
                if (ctx->route_fn != NULL) {
                    (void)ctx->route_fn(ctx->route_user, pos, l, g, S, choice);
                }
            }
            ws->bscheme[t] = (uint8_t)choice;
            ctx->route_scheme[(size_t)pos * L + l] = (uint8_t)choice;
        }

        if (m->kv_sharing == MOAS_KV_SHARING_POOLED) {
            batch_attention_pooled(ws, runs, n_runs, l, n, mode);
        } else if (mode == MOAS_MODE_ROUTED) {
            batch_attention_routed(ws, runs, n_runs, l, n);
        } else {
            batch_attention_mixture(ws, runs, n_runs, l, n);
        }

        /* MLP, all rows */
        norm_rows(ws, ws->bxb, ws->bx, layer->ffn_norm_w, layer->ffn_norm_b, n);
        if (m->swiglu) {
            swiglu_rows(ws, layer, ws->bhb, n);
        } else {
            matmat(ws, &layer->ffn_up, ws->bxb, C, layer->ffn_up_b, ws->bhb, (size_t)m->n_ff, n);
            gelu_rows(ws, ws->bhb, m->n_ff, n);
        }
        matmat(ws, &layer->ffn_down, ws->bhb, (size_t)m->n_ff, layer->ffn_down_b, ws->by, C, n);
        add_rows(ws, ws->bx, ws->by, n);   /* the residual */
    }
    block_logits(ws, runs, n_runs);
}

/* Whether a block has a step worth a team: per run, the largest product per token
 * (the MLP's, or Q, K and V together) or attention over the cache, or the output
 * head when logits are wanted, against the threshold the steps themselves use. *work
 * is that measure of the block plus the output head's rows, which the team compares
 * calls by (team.h): a narrow model with a large vocabulary is not a small call. */
static bool block_wants_team(const moas_workspace *ws, const moas_seq_run *runs,
                             int32_t n_runs, int64_t *work_out) {
    const moas_model *m = ws->model;
    const int64_t C = m->n_embd;
    const int64_t widest = m->n_ff > 3 * C ? m->n_ff : 3 * C;
    const int64_t output = C * m->n_vocab;
    int64_t work = 0, logit_rows = 0;
    bool any_logits = false;
    for (int32_t r = 0; r < n_runs; r++) {
        const int64_t attention = 2 * C * (runs[r].ctx->n_past + (runs[r].n + 1) / 2);
        work += (int64_t)runs[r].n * (C * widest > attention ? C * widest : attention);
        any_logits = any_logits || runs[r].all != NULL || runs[r].want_last;
        logit_rows += runs[r].all != NULL ? runs[r].n : runs[r].want_last ? 1 : 0;
    }
    *work_out = work + logit_rows * output;
    return ws->n_threads > 1 &&
           (work >= ws->parallel_min_work || (any_logits && output >= ws->parallel_min_work));
}

typedef struct {
    moas_workspace *ws;
    const moas_seq_run *runs;
    int32_t n_runs;
} block_call;

static void forward_block_call(void *arg) {
    const block_call *c = arg;
    forward_block(c->ws, c->runs, c->n_runs);
}

/* ---- sequences split between the threads ------------------------------------------
 *
 * A decode step of many sequences of a small model is dozens of parallel steps of a
 * few microseconds each: every one hands its inputs from the thread that wrote them
 * to the one that reads them, and the work between them (routing, the norms of small
 * blocks, and below MOAS_FINE_SLICE_ROWS rows the residual adds and storing K/V) runs
 * on the leader while the others wait. Where the weights
 * stay in the cache, the block's sequences are cut instead into one share per thread,
 * balanced by their work, and each thread runs its share through the whole model in a
 * workspace of its own (ws->shards): one parallel step per block and no data handed
 * between threads. Every row's numbers are what they would be in the whole block (a
 * row's arithmetic never depends on the rows beside it), so the results are the
 * same bits. A route callback is always called from the calling thread, so blocks
 * with one take the parallel steps. */

/* A run's work for balancing the shares, in multiply-adds per layer over n_embd: its
 * products (Q, K, V, the output's 4 C, the MLP's 2 n_ff) and its attention over the
 * keys it sees (scores and value sums, 2 per key). */
static int64_t shard_work(const moas_model *m, const moas_seq_run *run) {
    const int64_t per_token = 4 * (int64_t)m->n_embd + 2 * (int64_t)m->n_ff;
    return (int64_t)run->n * (per_token + 2 * ((int64_t)run->ctx->n_past + (run->n + 1) / 2));
}

/* The first run of the share that begins at `target` work: runs go to the earlier
 * share while the work before their middle is below it. */
static int32_t shard_cut(const moas_model *m, const moas_seq_run *runs, int32_t n_runs,
                         int64_t target) {
    int64_t done = 0;
    int32_t r = 0;
    for (; r < n_runs; r++) {
        const int64_t w = shard_work(m, &runs[r]);
        if (2 * done + w >= 2 * target) {
            break;
        }
        done += w;
    }
    return r;
}

/* Whether a block is worth splitting by sequences: a pool workspace with shards, no
 * route callback, and for its n_threads threads shares that are none empty, none more
 * than a quarter over an even share, and each with rows enough for the model's size
 * (moas__shard_rows_suit). */
static bool shards_suit(const moas_workspace *ws, const moas_seq_run *runs, int32_t n_runs,
                        int64_t *total_out) {
    const int32_t nth = ws->n_threads;
    int64_t total = 0;
    if (ws->shards == NULL || n_runs < nth) {
        return false;
    }
    for (int32_t r = 0; r < n_runs; r++) {
        if (runs[r].ctx->route_fn != NULL) {
            return false;
        }
        total += shard_work(ws->model, &runs[r]);
    }
    int32_t r0 = 0;
    for (int32_t i = 0; i < nth; i++) {
        const int32_t r1 = shard_cut(ws->model, runs, n_runs, total * (i + 1) / nth);
        int64_t work = 0;
        for (int32_t r = r0; r < r1; r++) {
            work += shard_work(ws->model, &runs[r]);
        }
        if (r1 == r0 || work * 4 * nth > total * 5 ||
            !moas__shard_rows_suit(ws->model,
                                   runs[r1 - 1].row0 + runs[r1 - 1].n - runs[r0].row0)) {
            return false;
        }
        r0 = r1;
    }
    *total_out = total;
    return true;
}

typedef struct {
    moas_workspace *ws;
    const moas_seq_run *runs;
    int32_t n_runs;
    int64_t total;
} shard_step;

/* Share ith of nth: its runs, their rows renumbered from 0, through the whole model in
 * shard ith's workspace. */
static void shard_slice(void *arg, int32_t ith, int32_t nth) {
    const shard_step *s = arg;
    const moas_model *m = s->ws->model;
    const int32_t r0 = shard_cut(m, s->runs, s->n_runs, s->total * ith / nth);
    const int32_t r1 = shard_cut(m, s->runs, s->n_runs, s->total * (ith + 1) / nth);
    if (r0 == r1) {
        return;
    }
    moas_workspace *shard = s->ws->shards[ith];
    const int32_t row0 = s->runs[r0].row0;
    for (int32_t r = r0; r < r1; r++) {
        shard->runs[r - r0] = s->runs[r];
        shard->runs[r - r0].row0 -= row0;
    }
    forward_block(shard, shard->runs, r1 - r0);
}

/* The team's body: the shares as one step, or the whole block on the leader when the
 * team runs alone (team.h). */
static void forward_shards_call(void *arg) {
    shard_step *step = arg;
    if (step->ws->team.nth <= 1) {
        forward_block(step->ws, step->runs, step->n_runs);
        return;
    }
    moas__team_run(&step->ws->team, true, shard_slice, step);
    step->ws->shard_blocks++;
}

bool moas__forward_runs(moas_workspace *ws, moas_seq_run *runs, int32_t n_runs) {
    int64_t work = 0, total = 0;
    ws->aborted = false;
    if (abort_asked(ws, runs, n_runs)) {
        return false;
    }
    const bool team = block_wants_team(ws, runs, n_runs, &work);
    ws->team.call_work = work;
    if (team && shards_suit(ws, runs, n_runs, &total)) {
        /* the shares run on every thread: no asking between their layers */
        shard_step step = {ws, runs, n_runs, total};
        moas__team_lead(&ws->team, ws->n_threads, forward_shards_call, &step);
        return true;
    }
    block_call call = {ws, runs, n_runs};
    ws->ask_abort = true;   /* forward_block runs on the calling thread */
    moas__team_lead(&ws->team, team ? ws->n_threads : 1, forward_block_call, &call);
    ws->ask_abort = false;
    return !ws->aborted;
}

bool moas__forward_batch(moas_context *ctx, const int32_t *tokens, int32_t n, float *all,
                         bool want_last) {
    moas_seq_run run = {ctx, tokens, n, 0, all, want_last};
    return moas__forward_runs(ctx->ws, &run, 1);
}
