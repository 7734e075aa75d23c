/*
 * context.h - the state of one inference stream: activations, the KV cache and the
 * routing records. Allocated once by context.c; used per token by forward.c.
 */
#ifndef MOAS_CONTEXT_H
#define MOAS_CONTEXT_H

#include "model.h"
#include "ops.h"
#include "team.h"

/*
 * One stream of cached keys and values in one layer. Heads of head_dim elements are
 * packed back to back; token j's heads are [first(j), first(j) + n_kv(j)):
 *   uniform stream (mixture mode, one per layer and scheme): first(j) = j * n_kv;
 *   ragged stream (routed mode, one per layer): first(j) = off[j], n_kv(j) =
 *   off[j + 1] - off[j], so off[n_past] is the number of heads in use.
 */
typedef struct moas_kv_stream {
    void *k;          /* [capacity heads, head_dim] in the cache's element type */
    void *v;          /* [capacity heads, head_dim] */
    uint32_t *off;    /* [n_ctx + 1] first head of each token; NULL for a uniform stream */
    int32_t n_kv;     /* uniform stream: heads per token */
} moas_kv_stream;

/* Bookkeeping a ragged stream keeps per token: off[j] and the scheme record. */
#define MOAS_ROUTED_TOKEN_META_BYTES (sizeof(uint32_t) + sizeof(uint8_t))

static inline uint32_t moas__kv_first(const moas_kv_stream *kv, int32_t j) {
    return kv->off != NULL ? kv->off[j] : (uint32_t)j * (uint32_t)kv->n_kv;
}

static inline int32_t moas__kv_heads(const moas_kv_stream *kv, int32_t j) {
    return kv->off != NULL ? (int32_t)(kv->off[j + 1] - kv->off[j]) : kv->n_kv;
}

struct moas_context {
    const moas_model *model;
    const moas_allocator *alloc;
    moas_allocator alloc_copy;
    moas_log_fn log;
    void *log_user;
    const moas_ops *ops;

    int32_t n_ctx;           /* capacity in tokens */
    int32_t n_threads;       /* threads for parallel steps (>= 1) */
    unsigned mm_hints;       /* matmul hints for this model's weights (MOAS_MM_*) */
    int64_t parallel_min_work; /* multiply-adds below which a step stays on one thread
                                * (MOAS_PARALLEL_MIN_WORK; tests lower it to 0 so that
                                * tiny models take the parallel paths too) */
    int32_t batch_tokens;    /* tokens per block of moas__forward_batch: MOAS_BATCH, or
                              * n_ctx if smaller (tests lower it to cross blocks) */
    int32_t n_past;          /* tokens stored */
    moas_mode mode;
    moas_type kv_type;       /* F32 or F16 */
    size_t kv_elem_bytes;    /* 4 or 2 */

    moas_team team;          /* the threads of the forward call under way */

    /* routing control */
    int32_t forced_scheme;   /* -1: the router decides */
    uint64_t kv_budget;      /* 0: none */
    moas_route_fn route_fn;
    void *route_user;

    /* per-token scratch (one arena) */
    float *xb;               /* [C] a position embedding, or the last row's final norm */
    float *kv_pool;          /* [2, C] pooled models: the K and V to store */
    float *pool_tmp;         /* [C] pooled models: one scheme's pooled heads */
    float *att;              /* per thread [MOAS_ATT_QUERIES, MOAS_ATT_KEYS] scores */
    uint32_t *att_rows;      /* per thread [n_ctx] each cached token's K/V row for a head */
    float *logits;           /* [n_vocab] logits of the last decoded token */
    bool logits_valid;       /* logits belong to the token at n_past - 1 */
    void *scratch;           /* the allocation holding the arena above */

    /* activations of a batch of up to MOAS_BATCH tokens (one arena), rows of C floats
     * unless said otherwise */
    float *bx;               /* [B, C] residual streams */
    float *bxb;              /* [B, C] normed inputs */
    float *bq;               /* [B, C] queries */
    float *bk;               /* [B, C] keys (all heads for pooled models) */
    float *bv;               /* [B, C] values */
    float *batt;             /* [B, C] attention outputs */
    float *bmix;             /* [B, C] attention outputs mixed over the schemes */
    float *by;               /* [B, C] a projection's outputs */
    float *bsel;             /* [B, C] the rows of one scheme's tokens (routed) */
    float *bhb;              /* [B, max(n_ff, R)] MLP or router hidden */
    void *batch_scratch;     /* the allocation holding the arena above */

    /* the KV cache: mixture mode [n_layer * n_scheme] uniform streams, routed mode
     * [n_layer] ragged streams; all data in kv_arena */
    moas_kv_stream *kv;
    int32_t n_streams;
    void *kv_arena;          /* the allocation holding every stream's K and V */
    uint32_t *kv_offsets;    /* routed mode: [n_layer, n_ctx + 1] the streams' `off` */

    /* routing records */
    float *route_gates;      /* [n_ctx, n_layer, n_scheme] gates as computed */
    uint8_t *route_scheme;   /* [n_ctx, n_layer] scheme that ran (routed) or largest gate */

    /* the budget plan of the token being decoded (routed mode with a budget) */
    uint64_t plan_rate;      /* bytes this token should stay within */
    uint64_t plan_room;      /* bytes this token may use at most */
    uint64_t plan_spent;     /* bytes this token has used so far */
};

/* Run one token at position ctx->n_past through the model, store its K/V and routing,
 * and compute logits when `want_logits`. The caller has checked `token` and room, and
 * in routed mode with a budget has set the plan_* fields. */
void moas__forward(moas_context *ctx, int32_t token, bool want_logits);

/* Routed mode: choose the scheme of the token at `pos` in `layer` from its `gates`,
 * applying the forced scheme, the callback and the budget plan (context.c). */
int32_t moas__route_choose(moas_context *ctx, int32_t pos, int32_t layer, const float *gates);

/* Below this many multiply-adds a step stays on one thread. A step posted to the
 * call's team (team.h) costs well under a microsecond, 2^16 multiply-adds several; when
 * every step was an OpenMP fork/join (about 3 us) the threshold was 2^18, which left
 * the 192-wide shipped model on one thread. Interleaved at 2 threads (medians of
 * three, tokens/s): the shipped model decoded 8,246 with 2^16, 8,314 with 2^17 and
 * 6,979 with 2^14; the 6-layer, 384-wide f16 model 3,487, 3,560 and 3,264. Splitting
 * the smallest steps loses most when the other core is busy. */
#define MOAS_PARALLEL_MIN_WORK ((int64_t)1 << 16)

/* A model file larger than this has its weights streamed from memory at every token
 * (no last-level cache holds it), so single-token products read rows front to back
 * (MOAS_MM_STREAM). 64 MB: twice the 32 MB L3 of a Zen 5 CCD; the 44 MB 6-layer f32
 * benchmark model still gains from the cache-friendly order. */
#define MOAS_STREAM_MODEL_BYTES ((size_t)64 << 20)

/* Attention goes through the keys in runs of MOAS_ATT_KEYS (their K and V rows, 32 KB
 * at head_dim 64 in f32, stay in L1) with up to MOAS_ATT_QUERIES queries of a block
 * at a time, whose scores for the run are the per-thread scratch. */
#define MOAS_ATT_QUERIES 16
#define MOAS_ATT_KEYS 64

/* Tokens the batched forward pass takes at once: enough to read each weight row once
 * for many tokens, few enough that their activations stay in L2/L3 (GPT-2 small: 5 MB).
 * Measured interleaved on Zen 5, 1 thread, 512-token prefill: 64 beat 32 by 3-30% and
 * 128 beat 64 by 1-8% (6-layer 384-wide f32: 4,000 -> 4,500 -> 4,850 tokens/s; GPT-2
 * f16: 610-640 -> 645-685 -> 645-680); 256 was no better than 128. */
#define MOAS_BATCH 128

/* Run tokens[0 .. n) (n <= ctx->batch_tokens) at positions n_past .. n_past + n - 1 through the
 * model together, exactly as n calls of moas__forward would (the same arithmetic, in
 * the same order, for every number). Logits: for every token into `all` ([n, n_vocab])
 * when it is not NULL, and the last token's into ctx->logits when `want_last`. Not for
 * routed mode with a KV budget, whose plan is per token. The caller advances n_past. */
void moas__forward_batch(moas_context *ctx, const int32_t *tokens, int32_t n, float *all,
                         bool want_last);

/* Bytes of K and V (and routed bookkeeping) one token stores in one layer with
 * scheme `s`, or with every scheme in mixture mode (s = -1). */
uint64_t moas__kv_token_bytes(const moas_context *ctx, int32_t s);

#endif /* MOAS_CONTEXT_H */
