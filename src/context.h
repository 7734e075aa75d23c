/*
 * context.h - the state of one inference stream: activations, the KV cache and the
 * routing records. Allocated once by context.c; used per token by forward.c.
 */
#ifndef MOAS_CONTEXT_H
#define MOAS_CONTEXT_H

#include "kv_cache.h"
#include "model.h"
#include "ops.h"
#include "team.h"

/* One context's tokens in a block of rows: tokens[0 .. n) at positions n_past ..
 * n_past + n - 1, rows row0 .. row0 + n - 1 of the block. */
typedef struct moas_seq_run {
    struct moas_context *ctx;
    const int32_t *tokens;
    int32_t n;
    int32_t row0;
    float *all;              /* [n, n_vocab] every token's logits, or NULL */
    bool want_last;          /* the last token's logits into ctx->logits */
} moas_seq_run;

/*
 * What a forward call computes with: the kernels, the thread team and every buffer a
 * block of rows needs. A context has one for its own calls; a pool has one for
 * moas_pool_decode, whose blocks hold rows of many contexts.
 */
typedef struct moas_workspace {
    const moas_model *model;
    const moas_ops *ops;
    int32_t n_threads;       /* threads for parallel steps (>= 1) */
    unsigned mm_hints;       /* matmul hints for this model's weights (MOAS_MM_*) */
    int64_t parallel_min_work; /* multiply-adds below which a step stays on one thread
                                * (MOAS_PARALLEL_MIN_WORK; tests lower it to 0 so that
                                * tiny models take the parallel paths too) */
    int32_t max_rows;        /* rows a block may have (the arenas below) */
    int32_t max_keys;        /* positions attention may see (per-thread rows) */
    int32_t logit_rows;      /* rows whose logits are computed together */

    moas_team team;          /* the threads of the forward call under way */

    /* per-call scratch (one arena) */
    float *xb;               /* [C] a position embedding */
    float *kv_pool;          /* per slice [2, C] pooled models: the K and V to store */
    float *pool_tmp;         /* per slice [C] pooled models: one scheme's pooled heads */
    float *att;              /* per slice (a thread's, or one of the several slices a thread
                              * of a prompt block's attention takes: forward.c)
                              * [MOAS_ATT_QUERIES, MOAS_ATT_KEYS] scores */
    uint32_t *att_rows;      /* per slice [rows_each] cached tokens' K/V rows */
    size_t rows_each;        /* max(max_keys, MOAS_ATT_QUERIES * MOAS_ATT_KEYS) */
    float *att_split;        /* per slice [MOAS_ATT_QUERIES, head_dim] a split's value sums */
    float *att_part;         /* one decoded query's split states: [max_splits, n_head,
                              * head_dim] value sums, then [max_splits, n_head] maxima,
                              * then as many sums (forward.c, flash-decoding) */
    int32_t max_splits;      /* splits of MOAS_ATT_SPLIT_KEYS keys in max_keys */
    float *lx;               /* [logit_rows, C] final-normed rows whose logits are wanted */
    float *logits;           /* [logit_rows, n_vocab] their logits */
    void *scratch;           /* the allocation holding the arena above */

    /* activations of a block of up to max_rows rows (one arena), rows of C floats
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
    float *bgates;           /* [B, S] each row's gates in the current layer */
    uint8_t *bscheme;        /* [B] each row's scheme in the current layer */
    struct moas_context **row_ctx; /* [B] the context of each row */
    int32_t *row_pos;        /* [B] the position of each row */
    int32_t *idx;            /* [B] rows of one scheme (routed) */
    moas_seq_run *runs;      /* [B] the runs of a block of moas_pool_decode */
    void *batch_scratch;     /* the allocation holding the arena above */
    size_t batch_floats;     /* the arena's floats, from bx on */

    /* A pool's workspace for a model small enough (MOAS_SHARD_MODEL_BYTES): a workspace
     * of one thread for each of its threads, in which that thread runs a share of a
     * block's sequences through the whole model (forward.c, "Sequences split between
     * the threads"); NULL otherwise */
    struct moas_workspace **shards;
    int64_t shard_blocks;    /* blocks run that way (tests check the path ran) */

    /* abort callbacks (moas_abort_fn): whether forward_block asks its runs' contexts
     * between layers (only while it runs on the calling thread), and whether one said
     * stop in the forward call under way */
    bool ask_abort;
    bool aborted;
} moas_workspace;

struct moas_context {
    const moas_model *model;
    const moas_allocator *alloc;
    moas_allocator alloc_copy;
    moas_log_fn log;
    void *log_user;

    int32_t n_ctx;           /* capacity in tokens */
    int32_t n_threads;       /* threads of the context's own calls */
    int32_t batch_tokens;    /* tokens per block of moas__forward_batch: MOAS_BATCH, or
                              * n_ctx if smaller (tests lower it to cross blocks) */
    int32_t n_past;          /* tokens stored */
    moas_mode mode;
    moas_type kv_type;       /* F32, F16 or Q8_0: the pool's */
    size_t kv_head_bytes;    /* one K or V head in that type */

    moas_workspace *ws;      /* this context's own calls: made at creation for a private
                              * pool; for a context of a caller's pool, on its first call
                              * of its own (moas__context_workspace), since one that only
                              * moas_pool_decode advances never needs it */
    const moas_ops *ops;     /* the kernels of those calls (the pool's, if it has any) */

    /* routing control */
    int32_t forced_scheme;   /* -1: the router decides */
    uint64_t kv_budget;      /* 0: none */
    moas_route_fn route_fn;
    void *route_user;
    moas_abort_fn abort_fn;
    void *abort_user;
    int32_t n_past_at_call;  /* n_past when the call under way began: an abort's undo */

    float *logits;           /* [n_vocab] logits of the last decoded token */
    bool logits_valid;       /* logits belong to the token at n_past - 1 */
    atomic_bool in_use;      /* held for the whole of a call that decodes, truncates,
                              * resets, forks, loads state into, compacts, shifts or
                              * frees the context: such a call meanwhile, from a route
                              * callback or another thread, is refused (context.c,
                              * context_claim) */
    _Atomic(const void *) holder; /* the holding thread's marker (context.c): a setting
                              * changed from a callback on that thread goes ahead */

    /* the KV cache: mixture mode [n_layer * n_scheme] uniform streams (pooled models:
     * [n_layer] of n_head heads), routed mode [n_layer] ragged streams; their pages in
     * `pool` */
    struct moas_pool *pool;
    moas_kv_stream *kv;
    int32_t n_streams;
    uint32_t *kv_offsets;    /* routed mode: [n_layer, n_ctx + 1] the streams' `off` */
    int32_t *kv_pages;       /* every stream's page table, max_pages each */
    int32_t max_pages;       /* pages a stream may hold at n_ctx tokens */
    uint32_t *state_heads;   /* [2, n_streams] a state being loaded: each stream's heads;
                              * compaction and shift: the first head each stream
                              * rewrites, then its end after the rewrite */
    bool pool_owned;         /* `pool` is this context's private pool */
    bool linked;             /* on the pool's list */
    struct moas_context *pool_next, *pool_prev;   /* the pool's list of contexts */
    uint64_t published_used;   /* under the pool's lock: kv bytes used after the last call */
    uint64_t published_stored; /* and the K/V bytes in pages */

    /* routing records */
    float *route_gates;      /* [n_ctx, n_layer, n_scheme] gates as computed */
    uint8_t *route_scheme;   /* [n_ctx, n_layer] scheme that ran (routed) or largest gate */

    /* the budget plan of the token being decoded (routed mode with a budget) */
    uint64_t plan_rate;      /* bytes this token should stay within */
    uint64_t plan_room;      /* bytes this token may use at most */
    uint64_t plan_spent;     /* bytes this token has used so far */

    /* the pool's steering for this call's tokens (routed mode): at most this many KV
     * heads a token and layer; 0: no limit */
    int32_t steer_heads;
    /* routed mode: the most KV heads a token and layer of the call under way may take,
     * as its pages were reserved (context.c, call_max_heads); moas__route_choose keeps
     * every token within it, even should the forcing or the callback change during
     * the call (another context's callback calling moas_context_force_scheme on this
     * one: outside the rules, but never a write past the pages) */
    int32_t call_heads;
};

/* Run one token at position ctx->n_past through the model, store its K/V and routing,
 * and compute logits when `want_logits`. The caller has checked `token`, reserved the
 * pages, and in routed mode with a budget has set the plan_* fields. False when the
 * context's abort callback stopped it (moas__forward_runs). */
bool moas__forward(moas_context *ctx, int32_t token, bool want_logits);


/* Run every run's tokens through the model together, each exactly as its own
 * moas__forward calls would (the same arithmetic, in the same order, for every
 * number): the block's rows go through each weight once, and each run's queries
 * attend only to its own context's cache. All runs share one pool and one mode, rows
 * number at most ws->max_rows, and no context appears twice. The caller has reserved
 * pages and advances each n_past. Returns false when an abort callback of the runs'
 * contexts said stop (asked before the block and between its layers, on the calling
 * thread): the block is left part done, and the caller undoes its call. */
bool moas__forward_runs(moas_workspace *ws, moas_seq_run *runs, int32_t n_runs);

/* RoPE models: rotate the n_q heads of q and the n_k heads of k (either may be NULL
 * with 0 heads) as a token at position `pos` (negative to turn back), in place. */
void moas__rope_row(const moas_model *m, int32_t pos, float *q, int32_t n_q, float *k,
                    int32_t n_k);

/* Pooled models: the mean of each group of n_head / n_kv consecutive heads of `full`
 * (summed in order, then divided by the group's size); compaction pools stored heads
 * with it too, so they get what routing would have stored.
 *   full [n_head, head_dim] -> out [n_kv, head_dim] */
void moas__pool_heads(const float *full, int32_t n_head, int32_t head_dim, int32_t n_kv,
                      float *out);

/* Allocate a workspace's buffers; free them. */
moas_status moas__workspace_make(const moas_model *model, const moas_allocator *alloc,
                                 const moas_ops *ops, int32_t n_threads, int32_t max_rows,
                                 int32_t max_keys, int32_t logit_rows, moas_workspace **out);
void moas__workspace_free(const moas_allocator *alloc, moas_workspace *ws);

/* A pool's workspace: give it its shards (moas_workspace.shards) when the model and
 * the thread count qualify; MOAS_OK (also when they do not), or MOAS_ERR_NO_MEMORY. */
moas_status moas__workspace_shards(moas_workspace *ws, const moas_allocator *alloc);

/* Give ctx its workspace if it has none yet: MOAS_OK, or MOAS_ERR_NO_MEMORY (named for
 * `what`) with ctx unchanged. Once made, it lives as long as the context. */
moas_status moas__context_workspace(moas_context *ctx, const char *what);

/* Write every buffer of a workspace (a committed pool's), so that its memory is
 * resident now rather than when a large call first reaches it. */
void moas__workspace_commit(moas_workspace *ws);

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

/* A pool with 2 to MOAS_SHARD_MAX_THREADS threads may split a block's sequences
 * between its threads, each running its share through the whole model with no step
 * shared (forward.c, "Sequences split between the threads"). Each thread then reads
 * every weight: little cost while the weights stay in the last-level cache and a
 * share's tokens make each weight worth its read, double the bytes a step reads from
 * memory otherwise. So a model file of at most MOAS_SHARD_MODEL_BYTES splits any
 * block worth a team, and a larger one only when every share has a row for each
 * MOAS_SHARD_ROW_BYTES of it. Measured interleaved at 2 threads on Zen 5 (2 vCPUs,
 * 32 MB L3), splitting against the parallel steps: the 4-layer 192-wide f16 model
 * (3.6 MB) 1.41-1.68x from 2 to 64 sequences; the 6-layer 384-wide f16 one (22 MB)
 * 0.82x at 2 sequences, 0.90x at 4, 1.09-1.15x at 16, 1.30x at 64; in f32 (44 MB)
 * 0.87-0.94x at 16, 1.08x at 64; GPT-2 small in f16 (247 MB) 0.88-0.97x at 16. */
#define MOAS_SHARD_MODEL_BYTES ((size_t)16 << 20)
#define MOAS_SHARD_ROW_BYTES ((size_t)2 << 20)
#define MOAS_SHARD_MAX_THREADS 8

/* Whether a share of `rows` rows may run apart for model m (as above). */
static inline bool moas__shard_rows_suit(const moas_model *m, int32_t rows) {
    return rows >= 1 && (m->image_size <= MOAS_SHARD_MODEL_BYTES ||
                         (size_t)rows * MOAS_SHARD_ROW_BYTES >= m->image_size);
}

/* Blocks of at least this many rows (a prompt's, or many sequences') take their
 * products, and runs of this many tokens their attention and row work, in
 * MOAS_TEAM_SLICES_PER_THREAD slices a thread (team.h): a thread that runs slower than
 * the other (the host's doing) then leaves its last slices to it instead of holding the
 * step. Smaller blocks run one slice a thread, so a workspace whose blocks are smaller
 * needs scratch for one slice a thread. */
#define MOAS_FINE_SLICE_ROWS 64

/* Attention goes through the keys in runs of MOAS_ATT_KEYS (their K and V rows, 32 KB
 * at head_dim 64 in f32, stay in L1) with up to MOAS_ATT_QUERIES queries of a block
 * at a time, whose scores for the run are the per-thread scratch. */
#define MOAS_ATT_QUERIES 16
#define MOAS_ATT_KEYS 64
_Static_assert(MOAS_ATT_KEYS == MOAS_OPS_RUN_STRIDE, "attn_mix's constant strides are a run's");
/* ... and in splits of this many keys, each with a softmax state of its own, folded in
 * order (forward.c's merge_split): one decoded query's splits can go to different
 * threads. A multiple of MOAS_ATT_KEYS. */
#define MOAS_ATT_SPLIT_KEYS 128

/* Tokens the batched forward pass takes at once: enough to read each weight row once
 * for many tokens, few enough that their activations stay in L2/L3 (GPT-2 small: 5 MB).
 * Measured interleaved on Zen 5, 1 thread, 512-token prefill: 64 beat 32 by 3-30% and
 * 128 beat 64 by 1-8% (6-layer 384-wide f32: 4,000 -> 4,500 -> 4,850 tokens/s; GPT-2
 * f16: 610-640 -> 645-685 -> 645-680); 256 was no better than 128. */
#define MOAS_BATCH 128

/* Rows whose logits a pool's batched decode computes together, so that the output
 * matrix (GPT-2's is a third of its weights) is read once per step for up to 64
 * sequences; 64 rows of GPT-2's logits are 12.9 MB of the pool's workspace. A
 * context's own calls compute one row at a time, as they always did. */
#define MOAS_POOL_LOGIT_ROWS 64


/* n_threads as the caller gave it, or for 0 moas__team_default_threads(). */
int32_t moas__default_threads(int32_t n_threads);

/* Run tokens[0 .. n) (n <= ctx->ws->max_rows) at positions n_past .. n_past + n - 1 through the
 * model together, exactly as n calls of moas__forward would (the same arithmetic, in
 * the same order, for every number). Logits: for every token into `all` ([n, n_vocab])
 * when it is not NULL, and the last token's into ctx->logits when `want_last`. Not for
 * routed mode with a KV budget, whose plan is per token. The caller advances n_past.
 * False when the context's abort callback stopped it (moas__forward_runs). */
bool moas__forward_batch(moas_context *ctx, const int32_t *tokens, int32_t n, float *all,
                         bool want_last);

/* Bytes of K and V (and routed bookkeeping) one token stores in one layer with
 * scheme `s`, or with every scheme in mixture mode (s = -1). */
uint64_t moas__kv_token_bytes(const moas_context *ctx, int32_t s);

#endif /* MOAS_CONTEXT_H */
