/*
 * context.c - contexts: creation with every buffer decoding needs, decode and batch
 * decode, reset and truncate, routing records and KV accounting.
 *
 * Owns: the memory of a context and the rules of its API (argument checks, the
 * all-or-nothing promise of a failed call), batched decode across a pool's contexts,
 * fork and saved state. Does not own: the arithmetic of a forward step (forward.c)
 * nor the bookkeeping of pages (kv_cache.c).
 *
 * Invariant: positions [0, n_past) of the KV cache and of the routing records hold
 * exactly what decoding those tokens wrote; nothing past n_past is ever read. That is
 * why truncate only moves n_past (and gives back the pages past it).
 */
#include "context.h"

#include <string.h>

void moas_context_params_init_sized(moas_context_params *params, size_t size) {
    moas_context_params p;
    memset(&p, 0, sizeof p);
    p.mode = MOAS_MODE_MIXTURE;
    p.kv_type = MOAS_TYPE_F32;
    p.kernels = MOAS_KERNELS_AUTO;
    p.forced_scheme = -1;
    moas__params_fill(params, size, &p, &moas__context_params_layout);
}

/* Check and complete the caller's params against `m`. */
static moas_status resolve_params(const moas_model *m, const moas_context_params *in,
                                  moas_context_params *p) {
    moas_context_params_init(p);
    if (in != NULL) {
        MOAS_TRY(moas__params_copy(p, in, &moas__context_params_layout, "context_create"));
    }
    MOAS_RETURN_IF(p->n_ctx < 0 || p->n_ctx > m->n_ctx_train, MOAS_ERR_INVALID_ARG,
                   "context_create: n_ctx %d outside [0, %d] (0 means the trained length; %s)",
                   p->n_ctx, m->n_ctx_train,
                   m->rope ? "longer contexts shift (moas_context_shift)"
                           : "learned positions stop there");
    MOAS_RETURN_IF(p->n_threads < 0 || p->n_threads > MOAS_MAX_THREADS, MOAS_ERR_INVALID_ARG,
                   "context_create: n_threads %d outside [0, %d]", p->n_threads,
                   MOAS_MAX_THREADS);
    MOAS_RETURN_IF(p->mode < 0 || p->mode >= MOAS_MODE_COUNT, MOAS_ERR_INVALID_ARG,
                   "context_create: unknown mode %d", (int)p->mode);
    MOAS_RETURN_IF(p->forced_scheme < -1 || p->forced_scheme >= m->n_scheme,
                   MOAS_ERR_INVALID_ARG, "context_create: forced_scheme %d outside [-1, %d)",
                   p->forced_scheme, m->n_scheme);
    MOAS_RETURN_IF(p->forced_scheme >= 0 && p->mode != MOAS_MODE_ROUTED, MOAS_ERR_INVALID_ARG,
                   "context_create: forcing scheme %d needs routed mode (mixture runs every "
                   "scheme)", p->forced_scheme);
    MOAS_RETURN_IF(p->kv_type != MOAS_TYPE_F32 && p->kv_type != MOAS_TYPE_F16 &&
                   p->kv_type != MOAS_TYPE_Q8_0, MOAS_ERR_INVALID_ARG,
                   "context_create: kv_type %d is not F32 (0), F16 (1) or Q8_0 (8)",
                   (int)p->kv_type);
    MOAS_RETURN_IF(p->kv_type == MOAS_TYPE_Q8_0 && p->pool == NULL && m->head_dim % 32 != 0,
                   MOAS_ERR_INVALID_ARG, "context_create: a Q8_0 cache needs head_dim a "
                   "multiple of 32 (this model's is %d)", m->head_dim);
    MOAS_RETURN_IF(p->kernels < 0 || p->kernels >= MOAS_KERNELS_COUNT, MOAS_ERR_INVALID_ARG,
                   "context_create: unknown kernels %d", (int)p->kernels);
    MOAS_RETURN_IF(p->allocator != NULL &&
                   (p->allocator->alloc == NULL || p->allocator->free == NULL),
                   MOAS_ERR_INVALID_ARG, "context_create: allocator without alloc or free");
    if (p->n_ctx == 0) {
        p->n_ctx = m->n_ctx_train;
    }
    MOAS_RETURN_IF(p->n_batch < 0 || p->n_batch > 65536, MOAS_ERR_INVALID_ARG,
                   "context_create: n_batch %d outside [0, 65536]", p->n_batch);
    MOAS_RETURN_IF(p->pool != NULL && p->pool->model != m, MOAS_ERR_INVALID_ARG,
                   "context_create: the pool was made for another model");
    MOAS_RETURN_IF(p->pool != NULL && p->pool->is_private, MOAS_ERR_INVALID_ARG,
                   "context_create: that pool is another context's private cache");
    p->n_threads = moas__default_threads(p->n_threads);
    return MOAS_OK;
}

int32_t moas__default_threads(int32_t n_threads) {
    if (n_threads != 0) {
        return n_threads;
    }
    return moas__team_default_threads();
}

uint64_t moas__kv_token_bytes(const moas_context *ctx, int32_t s) {
    const moas_model *m = ctx->model;
    const uint64_t head_bytes = 2 * (uint64_t)ctx->kv_head_bytes;   /* K and V */
    uint64_t heads = 0;

    if (s >= 0) {
        return (uint64_t)m->scheme_n_kv[s] * head_bytes + MOAS_ROUTED_TOKEN_META_BYTES;
    }
    if (m->kv_sharing == MOAS_KV_SHARING_POOLED) {   /* the gate-mixed K/V, all heads */
        return (uint64_t)m->n_head * head_bytes;
    }
    for (int32_t i = 0; i < m->n_scheme; i++) {
        heads += (uint64_t)m->scheme_n_kv[i];
    }
    return heads * head_bytes;
}

/* The scheme with the fewest KV heads (the first of equals). */
static int32_t cheapest_scheme(const moas_model *m) {
    int32_t best = 0;
    for (int32_t s = 1; s < m->n_scheme; s++) {
        best = m->scheme_n_kv[s] < m->scheme_n_kv[best] ? s : best;
    }
    return best;
}

/* The fewest bytes one more token can add over all layers: every scheme in mixture
 * mode, the cheapest scheme everywhere in routed mode. */
static uint64_t min_token_bytes(const moas_context *ctx) {
    const int32_t s = ctx->mode == MOAS_MODE_ROUTED ? cheapest_scheme(ctx->model) : -1;
    return moas__kv_token_bytes(ctx, s) * (uint64_t)ctx->model->n_layer;
}

/* A budget must hold at least one token: the cheapest way to store it in every layer. */
static moas_status check_budget(moas_context *ctx, uint64_t bytes) {
    const uint64_t one = min_token_bytes(ctx);
    MOAS_RETURN_IF(bytes != 0 && bytes < one, MOAS_ERR_INVALID_ARG,
                   "kv budget: %llu bytes cannot hold one token (at least %llu)",
                   (unsigned long long)bytes, (unsigned long long)one);
    ctx->kv_budget = bytes;
    return MOAS_OK;
}

/* SIMD rows load fastest from cache-line starts, so the arenas are aligned to 64
 * bytes inside an allocation 63 bytes larger (the allocator promises only malloc's
 * alignment). *raw keeps what to free. */
#define ARENA_ALIGNMENT 64

static void *alloc_aligned(const moas_allocator *alloc, size_t bytes, void **raw) {
    size_t padded;
    if (!moas__size_add(bytes, ARENA_ALIGNMENT - 1, &padded) ||
        (*raw = moas__malloc(alloc, padded)) == NULL) {
        return NULL;
    }
    const uintptr_t p = (uintptr_t)*raw;
    return (void *)(p + (ARENA_ALIGNMENT - p % ARENA_ALIGNMENT) % ARENA_ALIGNMENT);
}

/* Carve `n` floats from an arena cursor, keeping every buffer on a cache line. */
static float *carve(float **cursor, size_t n) {
    float *p = *cursor;
    *cursor += (n + 15) & ~(size_t)15;
    return p;
}

void moas__workspace_free(const moas_allocator *alloc, moas_workspace *ws) {
    if (ws == NULL) {
        return;
    }
    moas__team_end(&ws->team);
    for (int32_t i = 0; ws->shards != NULL && i < ws->n_threads; i++) {
        moas__workspace_free(alloc, ws->shards[i]);
    }
    moas__free(alloc, ws->shards);
    moas__free(alloc, ws->scratch);
    moas__free(alloc, ws->batch_scratch);
    moas__free(alloc, ws->bscheme);
    moas__free(alloc, ws->row_ctx);
    moas__free(alloc, ws->row_pos);
    moas__free(alloc, ws->idx);
    moas__free(alloc, ws->runs);
    moas__free(alloc, ws);
}

moas_status moas__workspace_make(const moas_model *m, const moas_allocator *alloc,
                                 const moas_ops *ops, int32_t n_threads, int32_t max_rows,
                                 int32_t max_keys, int32_t logit_rows, moas_workspace **out) {
    const size_t C = (size_t)m->n_embd, S = (size_t)m->n_scheme;
    const size_t hidden = (size_t)(m->n_ff > m->n_router ? m->n_ff : m->n_router);
    const size_t rows = (size_t)max_rows;
    moas_workspace *ws;
    float *cursor;

    *out = NULL;
    ws = moas__calloc(alloc, 1, sizeof *ws);
    MOAS_RETURN_IF(ws == NULL, MOAS_ERR_NO_MEMORY, "context_create: no memory for the workspace");
    ws->model = m;
    ws->ops = ops;
    ws->n_threads = n_threads;
    ws->mm_hints = m->image_size > MOAS_STREAM_MODEL_BYTES ? MOAS_MM_STREAM : 0;
    ws->parallel_min_work = MOAS_PARALLEL_MIN_WORK;
    ws->max_rows = max_rows;
    ws->max_keys = max_keys;
    ws->logit_rows = logit_rows;

    /* per-call scratch: xb, and per slice kv_pool (2C), pool_tmp (C), the attention scores
     * and rows (32-bit, one float each) and a split's value sums, one decoded query's split
     * states, the normed rows and logits of logit_rows;
     * each buffer rounded up to 16 floats (64 bytes): 9 buffers, at most 15 each */
    /* rows: a head's for every key (attend_heads), or a run's for up to
     * MOAS_ATT_QUERIES heads (attend_one) */
    const size_t run_rows = (size_t)MOAS_ATT_QUERIES * MOAS_ATT_KEYS;
    ws->rows_each = (size_t)max_keys > run_rows ? (size_t)max_keys : run_rows;
    ws->max_splits = (max_keys + MOAS_ATT_SPLIT_KEYS - 1) / MOAS_ATT_SPLIT_KEYS;
    const size_t hd = (size_t)m->head_dim, H = (size_t)m->n_head;
    /* a slice's scratch: a prompt block's attention and row work have up to
     * MOAS_TEAM_SLICES_PER_THREAD slices a thread (team.h), at most MOAS_MAX_THREADS;
     * blocks smaller than MOAS_FINE_SLICE_ROWS, all a workspace of fewer rows sees (a
     * context decoding a few tokens at a time), one a thread */
    const size_t per_thread = max_rows >= MOAS_FINE_SLICE_ROWS ? MOAS_TEAM_SLICES_PER_THREAD : 1;
    const size_t slots = n_threads == 1 ? 1
                         : (size_t)n_threads * per_thread < MOAS_MAX_THREADS
                             ? (size_t)n_threads * per_thread
                             : MOAS_MAX_THREADS;
    const size_t split_floats =
        slots * MOAS_ATT_QUERIES * hd + (size_t)ws->max_splits * H * (hd + 2);
    const size_t att_floats = slots * (run_rows + ws->rows_each) + split_floats;
    const size_t n_floats =
        C + 3 * slots * C + att_floats + (size_t)logit_rows * (C + (size_t)m->n_vocab) + 9 * 15;
    cursor = alloc_aligned(alloc, n_floats * sizeof(float), &ws->scratch);
    if (cursor == NULL) {
        moas__workspace_free(alloc, ws);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY,
                       "context_create: no memory for %zu activation floats", n_floats);
    }
    memset(cursor, 0, n_floats * sizeof(float));
    ws->xb = carve(&cursor, C);
    ws->kv_pool = carve(&cursor, slots * 2 * C);
    ws->pool_tmp = carve(&cursor, slots * C);
    ws->att = carve(&cursor, slots * MOAS_ATT_QUERIES * MOAS_ATT_KEYS);
    ws->att_rows = (uint32_t *)(void *)carve(&cursor, slots * ws->rows_each);
    ws->att_split = carve(&cursor, slots * MOAS_ATT_QUERIES * hd);
    ws->att_part = carve(&cursor, (size_t)ws->max_splits * H * (hd + 2));
    ws->lx = carve(&cursor, (size_t)logit_rows * C);
    ws->logits = carve(&cursor, (size_t)logit_rows * (size_t)m->n_vocab);

    /* block activations */
    const size_t c16 = (C + 15) & ~(size_t)15, h16 = (hidden + 15) & ~(size_t)15;
    const size_t s16 = (S + 15) & ~(size_t)15;
    ws->batch_floats = (9 * c16 + h16 + s16) * rows;
    cursor = alloc_aligned(alloc, ws->batch_floats * sizeof(float), &ws->batch_scratch);
    ws->bscheme = moas__calloc(alloc, rows, sizeof *ws->bscheme);
    ws->row_ctx = moas__calloc(alloc, rows, sizeof *ws->row_ctx);
    ws->row_pos = moas__calloc(alloc, rows, sizeof *ws->row_pos);
    ws->idx = moas__calloc(alloc, rows, sizeof *ws->idx);
    ws->runs = moas__calloc(alloc, rows, sizeof *ws->runs);
    if (cursor == NULL || ws->bscheme == NULL || ws->row_ctx == NULL || ws->row_pos == NULL ||
        ws->idx == NULL || ws->runs == NULL) {
        moas__workspace_free(alloc, ws);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY,
                       "context_create: no memory for the activations of %d rows", max_rows);
    }
    ws->bx = carve(&cursor, rows * c16);
    ws->bxb = carve(&cursor, rows * c16);
    ws->bq = carve(&cursor, rows * c16);
    ws->bk = carve(&cursor, rows * c16);
    ws->bv = carve(&cursor, rows * c16);
    ws->batt = carve(&cursor, rows * c16);
    ws->bmix = carve(&cursor, rows * c16);
    ws->by = carve(&cursor, rows * c16);
    ws->bsel = carve(&cursor, rows * c16);
    ws->bhb = carve(&cursor, rows * h16);
    ws->bgates = carve(&cursor, rows * s16);
    *out = ws;
    return MOAS_OK;
}

moas_status moas__workspace_shards(moas_workspace *ws, const moas_allocator *alloc) {
    const moas_model *m = ws->model;
    if (ws->n_threads < 2 || ws->n_threads > MOAS_SHARD_MAX_THREADS ||
        !moas__shard_rows_suit(m, ws->max_rows / ws->n_threads)) {
        return MOAS_OK;   /* no block could be split */
    }
    ws->shards = moas__calloc(alloc, (size_t)ws->n_threads, sizeof *ws->shards);
    MOAS_RETURN_IF(ws->shards == NULL, MOAS_ERR_NO_MEMORY,
                   "pool_create: no memory for the threads' workspaces");
    for (int32_t i = 0; i < ws->n_threads; i++) {
        /* as many rows as the pool's own: a team that could start fewer threads cuts
         * a block into fewer, larger shares */
        const moas_status st = moas__workspace_make(m, alloc, ws->ops, 1, ws->max_rows,
                                                    ws->max_keys, ws->logit_rows, &ws->shards[i]);
        if (st != MOAS_OK) {   /* the ones made go with ws (moas__workspace_free) */
            moas__set_error("pool_create: no memory for the workspace of thread %d of %d", i + 1,
                            ws->n_threads);
            return st;
        }
        ws->shards[i]->mm_hints = ws->mm_hints;
    }
    return MOAS_OK;
}

void moas__workspace_commit(moas_workspace *ws) {
    const size_t rows = (size_t)ws->max_rows;
    for (int32_t i = 0; ws->shards != NULL && i < ws->n_threads; i++) {
        moas__workspace_commit(ws->shards[i]);
    }
    memset(ws->bx, 0, ws->batch_floats * sizeof(float));   /* the scratch arena is zeroed */
    memset(ws->bscheme, 0, rows * sizeof *ws->bscheme);
    memset(ws->row_ctx, 0, rows * sizeof *ws->row_ctx);
    memset(ws->row_pos, 0, rows * sizeof *ws->row_pos);
    memset(ws->idx, 0, rows * sizeof *ws->idx);
    memset(ws->runs, 0, rows * sizeof *ws->runs);
}

/* Heads per token of the context's streams: i's in mixture mode, the widest scheme's
 * (the most a token may take) in routed mode. */
static int32_t stream_max_heads(const moas_context *ctx, int32_t i) {
    return ctx->kv[i].n_kv;
}

/* Heads stream i holds for the first n tokens. */
static uint32_t stream_heads(const moas_context *ctx, int32_t i, int32_t n) {
    return moas__kv_heads_at(&ctx->kv[i], n);
}

static moas_status allocate(moas_context *ctx, moas_pool *pool, moas_kernels kernels) {
    const moas_model *m = ctx->model;
    const size_t S = (size_t)m->n_scheme, L = (size_t)m->n_layer;
    const size_t n_ctx = (size_t)ctx->n_ctx;
    moas_status st;

    ctx->logits = moas__calloc(ctx->alloc, (size_t)m->n_vocab, sizeof *ctx->logits);
    MOAS_RETURN_IF(ctx->logits == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for the logits");

    /* the streams: in mixture mode one per layer and scheme (pooled models: one, of
     * all H heads), in routed mode one ragged stream per layer whose tokens take up
     * to the widest scheme's heads */
    const bool pooled = m->kv_sharing == MOAS_KV_SHARING_POOLED;
    int32_t max_kv = 0;
    for (int32_t s = 0; s < m->n_scheme; s++) {
        max_kv = m->scheme_n_kv[s] > max_kv ? m->scheme_n_kv[s] : max_kv;
    }
    ctx->n_streams = ctx->mode == MOAS_MODE_ROUTED || pooled ? (int32_t)L : (int32_t)(L * S);
    ctx->kv = moas__calloc(ctx->alloc, (size_t)ctx->n_streams, sizeof *ctx->kv);
    MOAS_RETURN_IF(ctx->kv == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for the KV index");
    if (ctx->mode == MOAS_MODE_ROUTED) {
        ctx->kv_offsets = moas__calloc(ctx->alloc, L * (n_ctx + 1), sizeof *ctx->kv_offsets);
        MOAS_RETURN_IF(ctx->kv_offsets == NULL, MOAS_ERR_NO_MEMORY,
                       "context_create: no memory for the KV offsets");
    }
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas_kv_stream *kv = &ctx->kv[i];
        kv->n_kv = ctx->mode == MOAS_MODE_ROUTED ? max_kv
                   : pooled                      ? m->n_head
                                                 : m->scheme_n_kv[i % (int32_t)S];
        kv->off = ctx->mode == MOAS_MODE_ROUTED ? ctx->kv_offsets + (size_t)i * (n_ctx + 1) : NULL;
    }

    /* the pages: the caller's pool, or a private one with room for every stream at
     * n_ctx tokens of its widest tokens, so that a context of its own never runs out */
    if (pool == NULL) {
        uint64_t n_pages = 0;
        for (int32_t i = 0; i < ctx->n_streams; i++) {
            n_pages += ((uint64_t)n_ctx * (uint64_t)ctx->kv[i].n_kv + MOAS_PAGE_HEADS - 1) /
                       MOAS_PAGE_HEADS;
        }
        if ((st = moas__pool_make(m, ctx->alloc, ctx->log, ctx->log_user, ctx->kv_type,
                                  MOAS_PAGE_HEADS, n_pages, &pool)) != MOAS_OK) {
            return st;
        }
        pool->is_private = true;
        ctx->pool_owned = true;
    }
    ctx->pool = pool;
    int32_t widest = 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        widest = stream_max_heads(ctx, i) > widest ? stream_max_heads(ctx, i) : widest;
    }
    ctx->max_pages = (int32_t)(((uint64_t)n_ctx * (uint64_t)widest + (uint64_t)pool->page_heads - 1) /
                               (uint64_t)pool->page_heads);
    ctx->kv_pages = moas__calloc(ctx->alloc, (size_t)ctx->n_streams * (size_t)ctx->max_pages + 1,
                                 sizeof *ctx->kv_pages);
    ctx->state_heads =
        moas__calloc(ctx->alloc, 2 * (size_t)ctx->n_streams, sizeof *ctx->state_heads);
    MOAS_RETURN_IF(ctx->kv_pages == NULL || ctx->state_heads == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for the page tables");
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        ctx->kv[i].pages = ctx->kv_pages + (size_t)i * (size_t)ctx->max_pages;
    }

    /* this context's own calls: the pool's kernels when it has one, so that a sequence
     * decoded alone and in a pool call computes the same bits. Their workspace (1.3 MB
     * at 128 rows of a 192-wide model) now for a private pool; in a caller's pool only
     * when the context first decodes on its own: a server's sequences, which only
     * moas_pool_decode advances, never need one, and making and freeing one per
     * request left the allocator's heap fragmented (RSS growing, docs/SERVING.md). */
    ctx->ops = pool->ws != NULL ? pool->ws->ops : moas__ops_select(kernels);
    if (ctx->pool_owned && (st = moas__context_workspace(ctx, "context_create")) != MOAS_OK) {
        return st;
    }

    /* routing records */
    ctx->route_gates = moas__calloc(ctx->alloc, n_ctx * L * S, sizeof(float));
    ctx->route_scheme = moas__calloc(ctx->alloc, n_ctx * L, sizeof(uint8_t));
    MOAS_RETURN_IF(ctx->route_gates == NULL || ctx->route_scheme == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for routing records");
    return MOAS_OK;
}

moas_status moas__context_workspace(moas_context *ctx, const char *what) {
    if (ctx->ws != NULL) {
        return MOAS_OK;
    }
    const moas_status st = moas__workspace_make(ctx->model, ctx->alloc, ctx->ops, ctx->n_threads,
                                                ctx->batch_tokens, ctx->n_ctx, 1, &ctx->ws);
    if (st != MOAS_OK) {   /* the message says context_create: name the call */
        moas__set_error("%s: no memory for the context's workspace (%d rows)", what,
                        ctx->batch_tokens);
    }
    return st;
}

static void context_failed(moas_log_fn log, void *user) {
    moas__log_error(log, user);
}

/* Put ctx on its pool's list, or take it off. */
static void pool_link(moas_context *ctx) {
    moas_pool *pool = ctx->pool;
    moas__pool_lock(pool);
    ctx->pool_prev = NULL;
    ctx->pool_next = pool->contexts;
    if (pool->contexts != NULL) {
        pool->contexts->pool_prev = ctx;
    }
    pool->contexts = ctx;
    pool->n_contexts++;
    ctx->linked = true;
    moas__pool_unlock(pool);
}

/* Returns whether the pool is to be released now: it was freed while ctx was its last
 * context. */
static bool pool_unlink(moas_context *ctx) {
    moas_pool *pool = ctx->pool;
    moas__pool_lock(pool);
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas__kv_drop_all(pool, &ctx->kv[i]);
    }
    if (ctx->linked) {
        if (ctx->pool_prev != NULL) {
            ctx->pool_prev->pool_next = ctx->pool_next;
        } else {
            pool->contexts = ctx->pool_next;
        }
        if (ctx->pool_next != NULL) {
            ctx->pool_next->pool_prev = ctx->pool_prev;
        }
        pool->n_contexts--;
        ctx->linked = false;
    }
    const bool release = pool->freed && pool->n_contexts == 0;
    moas__pool_unlock(pool);
    return release;
}

/* Make a context from resolved params `p` (the caller has checked them). */
static moas_status context_make(const moas_model *model, const moas_context_params *p,
                                moas_context **out) {
    moas_context *ctx;
    moas_status st;

    ctx = moas__calloc(p->allocator, 1, sizeof *ctx);
    MOAS_RETURN_IF(ctx == NULL, MOAS_ERR_NO_MEMORY, "context_create: no memory for the context");
    if (p->allocator != NULL) {
        ctx->alloc_copy = *p->allocator;
        ctx->alloc = &ctx->alloc_copy;
    }
    atomic_init(&ctx->in_use, false);
    atomic_init(&ctx->holder, NULL);
    ctx->model = model;
    ctx->log = p->log;
    ctx->log_user = p->log_user;
    ctx->n_ctx = p->n_ctx;
    ctx->n_threads = p->n_threads;
    ctx->batch_tokens = p->n_batch != 0 ? p->n_batch : MOAS_BATCH;
    ctx->batch_tokens = ctx->n_ctx < ctx->batch_tokens ? ctx->n_ctx : ctx->batch_tokens;
    ctx->mode = (moas_mode)p->mode;
    ctx->kv_type = p->pool != NULL ? p->pool->kv_type : (moas_type)p->kv_type;
    ctx->kv_head_bytes = moas__kv_head_bytes(ctx->kv_type, model->head_dim);
    ctx->forced_scheme = p->forced_scheme;
    ctx->route_fn = p->route_fn;
    ctx->route_user = p->route_user;
    if ((st = check_budget(ctx, p->kv_budget_bytes)) != MOAS_OK ||
        (st = allocate(ctx, p->pool, (moas_kernels)p->kernels)) != MOAS_OK) {
        moas_context_free(ctx);
        return st;
    }
    pool_link(ctx);
    *out = ctx;
    return MOAS_OK;
}

moas_status moas_context_create(const moas_model *model, const moas_context_params *params,
                                moas_context **out) {
    moas_context_params p;
    moas_status st;
    moas_log_fn log = NULL;
    void *log_user = NULL;

    if (params != NULL && params->size >= offsetof(moas_context_params, log_user) +
                                               sizeof params->log_user) {
        log = params->log;
        log_user = params->log_user;
    }
    if (out != NULL) {
        *out = NULL;
    }
    if (model == NULL || out == NULL) {
        moas__set_error("context_create: %s is NULL", model == NULL ? "model" : "out");
        context_failed(log, log_user);
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = resolve_params(model, params, &p)) != MOAS_OK ||
        (st = context_make(model, &p, out)) != MOAS_OK) {
        context_failed(log, log_user);
        return st;
    }
    return MOAS_OK;
}

static moas_status context_claim(moas_context *ctx, const char *what);

void moas_context_free(moas_context *ctx) {
    moas_allocator alloc_copy;
    const moas_allocator *alloc;

    if (ctx == NULL || context_claim(ctx, "context_free") != MOAS_OK) {
        return;   /* freed under a call of its own (a route callback's): kept */
    }
    alloc_copy = ctx->alloc_copy;
    alloc = ctx->alloc != NULL ? &alloc_copy : NULL;
    if (ctx->pool != NULL) {
        if (pool_unlink(ctx) || ctx->pool_owned) {
            moas_pool_free(ctx->pool);
        }
    }
    moas__workspace_free(alloc, ctx->ws);
    moas__free(alloc, ctx->logits);
    moas__free(alloc, ctx->kv);
    moas__free(alloc, ctx->kv_pages);
    moas__free(alloc, ctx->state_heads);
    moas__free(alloc, ctx->kv_offsets);
    moas__free(alloc, ctx->route_gates);
    moas__free(alloc, ctx->route_scheme);
    moas__free(alloc, ctx);
}

/* ---- pages for a call ---------------------------------------------------------- */

/* The most heads a token of this call may store in stream i: the stream's widest, or
 * in routed mode less where moas__route_choose cannot go wider: a forced scheme with
 * no route callback (which could pick any scheme) and the steering limit of this call
 * (set by steer() before the pages are reserved; a KV budget only ever picks a
 * cheaper scheme). A pool that is filling, where steering matters, then reserves only
 * what its tokens may take. */
static int32_t call_max_heads(const moas_context *ctx, int32_t i) {
    int32_t heads = stream_max_heads(ctx, i);
    if (ctx->mode != MOAS_MODE_ROUTED) {
        return heads;
    }
    if (ctx->forced_scheme >= 0 && ctx->route_fn == NULL &&
        ctx->model->scheme_n_kv[ctx->forced_scheme] < heads) {
        heads = ctx->model->scheme_n_kv[ctx->forced_scheme];
    }
    return ctx->steer_heads > 0 && ctx->steer_heads < heads ? ctx->steer_heads : heads;
}

/* With the pool locked: pages ctx needs for n more tokens, at worst (every token
 * taking call_max_heads). */
static uint64_t pages_needed(const moas_context *ctx, int32_t n) {
    uint64_t need = 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        const uint32_t used = stream_heads(ctx, i, ctx->n_past);
        need += moas__kv_need(ctx->pool, &ctx->kv[i], used,
                              used + (uint32_t)n * (uint32_t)call_max_heads(ctx, i));
    }
    return need;
}

/* With the pool locked: the shared page stream i of ctx copies before writing n more
 * tokens, or -1. */
static int32_t copied_page(const moas_context *ctx, int32_t i, int32_t n) {
    const uint32_t used = stream_heads(ctx, i, ctx->n_past);
    return moas__kv_write_copy(ctx->pool, &ctx->kv[i], used,
                               used + (uint32_t)n * (uint32_t)call_max_heads(ctx, i));
}

static void pages_take(moas_context *ctx, int32_t n) {
    ctx->call_heads = ctx->mode == MOAS_MODE_ROUTED ? call_max_heads(ctx, 0) : 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        const uint32_t used = stream_heads(ctx, i, ctx->n_past);
        moas__kv_grow(ctx->pool, &ctx->kv[i], used,
                      used + (uint32_t)n * (uint32_t)call_max_heads(ctx, i));
    }
}

/* Give back the pages past what n_past tokens hold. */
static uint64_t kv_bytes_at(const moas_context *ctx, int32_t layer, int32_t n_tokens);

/* Give back the pages past what n_past tokens hold, and publish what the context now
 * uses for moas_pool_stats (which other threads may call while this context decodes:
 * they read only these figures, under the pool's lock). Both under one lock: pages
 * given back before the figures fell showed a pool holding less than it stored. */
static void pages_trim(moas_context *ctx) {
    uint64_t stored = 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        stored += (uint64_t)stream_heads(ctx, i, ctx->n_past) * 2 * ctx->pool->head_bytes;
    }
    const uint64_t used = kv_bytes_at(ctx, -1, ctx->n_past);
    moas__pool_lock(ctx->pool);
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas__kv_trim(ctx->pool, &ctx->kv[i], stream_heads(ctx, i, ctx->n_past));
    }
    ctx->published_used = used;
    ctx->published_stored = stored;
    moas__pool_unlock(ctx->pool);
}

static moas_status pool_full(const moas_pool *pool, uint64_t need, const char *what) {
    moas__set_error("%s: the KV pool lacks %llu page(s): %llu needed, %d free of %d", what,
                    (unsigned long long)(need - (uint64_t)pool->n_free),
                    (unsigned long long)need, pool->n_free, pool->n_pages);
    return MOAS_ERR_POOL_FULL;
}

/* With the pool locked, before a call reserves its pages: the most KV heads a routed
 * token of ctx may take in this call. Below steer_below of pages free, the limit falls
 * from the widest scheme's heads to the cheapest's in proportion to what is free:
 * limit = cheapest + (widest - cheapest) * free / steer_below (rounded down). */
static void steer(moas_context *ctx) {
    const moas_pool *pool = ctx->pool;
    const moas_model *m = ctx->model;
    ctx->steer_heads = 0;
    if (ctx->mode != MOAS_MODE_ROUTED || pool->steer_below <= 0.0f) {
        return;
    }
    const double free_frac = (double)pool->n_free / (double)pool->n_pages;
    if (free_frac >= (double)pool->steer_below) {
        return;
    }
    int32_t widest = 0;
    for (int32_t s = 0; s < m->n_scheme; s++) {
        widest = m->scheme_n_kv[s] > widest ? m->scheme_n_kv[s] : widest;
    }
    const int32_t cheapest = m->scheme_n_kv[cheapest_scheme(m)];
    ctx->steer_heads = cheapest + (int32_t)((widest - cheapest) * free_frac / pool->steer_below);
}

/* Reserve the pages of n more tokens of ctx, all or nothing. */
static moas_status reserve(moas_context *ctx, int32_t n, const char *what) {
    moas_pool *pool = ctx->pool;
    moas__pool_lock(pool);
    steer(ctx);
    const uint64_t need = pages_needed(ctx, n);
    if (need > (uint64_t)pool->n_free) {
        const moas_status st = pool_full(pool, need, what);
        moas__pool_unlock(pool);
        return st;
    }
    pages_take(ctx, n);
    moas__pool_unlock(pool);
    return MOAS_OK;
}
/* Record a failure of a context call and forward it to the context's log. */
static moas_status fail(const moas_context *ctx, moas_status st) {
    if (ctx != NULL) {
        moas__log_error(ctx->log, ctx->log_user);
    }
    return st;
}

/* Every call that changes a context's sequence (decode, truncate, reset, fork, state
 * load, compaction, shift, free; moas_pool_decode for each context it names) holds the
 * context from its first check to its return. Another such call meanwhile can come
 * from a route callback (its own context's, or another context's of the same
 * moas_pool_decode) or from another thread against the one-thread-per-context rule;
 * either would reuse or change the pages and buffers the first is writing, so it is
 * refused with MOAS_ERR_BUSY and changes nothing. The refusal reads only the
 * flag and what creation wrote (the log callback). */
/* One address per thread: a holder marks the context with its own. Only this thread
 * stores this address, and it clears it before letting go, so a thread that reads its
 * own marker there holds the context now (relaxed loads suffice). */
static _Thread_local char thread_marker;

static moas_status refuse_in_use(const moas_context *ctx, const char *what) {
    moas__set_error("%s: the context is in use by another call (its own decode, from a route "
                    "callback, or a call from another thread)", what);
    return fail(ctx, MOAS_ERR_BUSY);
}

static bool context_try_claim(moas_context *ctx) {
    if (atomic_exchange_explicit(&ctx->in_use, true, memory_order_acquire)) {
        return false;
    }
    atomic_store_explicit(&ctx->holder, (const void *)&thread_marker, memory_order_relaxed);
    return true;
}

static moas_status context_claim(moas_context *ctx, const char *what) {
    return context_try_claim(ctx) ? MOAS_OK : refuse_in_use(ctx, what);
}

static void context_release(moas_context *ctx) {
    atomic_store_explicit(&ctx->holder, NULL, memory_order_relaxed);
    atomic_store_explicit(&ctx->in_use, false, memory_order_release);
}

/* The settings (forced scheme, budget, route callback) a route callback may change on a
 * context of the decode under way, its own thread's: they go ahead when this thread
 * holds the context (*claimed false), or once it is claimed for them (*claimed true),
 * and are refused while another thread's call holds it. */
static moas_status settings_claim(moas_context *ctx, const char *what, bool *claimed) {
    *claimed = false;
    if (atomic_load_explicit(&ctx->holder, memory_order_relaxed) == (const void *)&thread_marker) {
        return MOAS_OK;
    }
    const moas_status st = context_claim(ctx, what);
    *claimed = st == MOAS_OK;
    return st;
}

/* `index` is the token's place in a batch, or -1 for a single token. */
static moas_status check_token(const moas_context *ctx, int32_t token, const char *what,
                               int32_t index) {
    const int32_t n_vocab = ctx->model->n_vocab;
    if (token >= 0 && token < n_vocab) {
        return MOAS_OK;
    }
    if (index >= 0) {
        moas__set_error("%s: token %d at index %d is outside the vocabulary [0, %d)", what, token,
                        index, n_vocab);
    } else {
        moas__set_error("%s: token %d is outside the vocabulary [0, %d)", what, token, n_vocab);
    }
    return MOAS_ERR_INVALID_ARG;
}

/* Bytes of K/V (and routed bookkeeping) in `layer`, or all layers for -1, when the
 * first `n_tokens` positions are stored. */
static uint64_t kv_bytes_at(const moas_context *ctx, int32_t layer, int32_t n_tokens) {
    const moas_model *m = ctx->model;
    const uint64_t head_bytes = 2 * (uint64_t)ctx->kv_head_bytes;
    uint64_t total = 0;

    for (int32_t l = 0; l < m->n_layer; l++) {
        if (layer != -1 && layer != l) {
            continue;
        }
        if (ctx->mode == MOAS_MODE_ROUTED) {
            total += (uint64_t)ctx->kv[l].off[n_tokens] * head_bytes +
                     (uint64_t)n_tokens * MOAS_ROUTED_TOKEN_META_BYTES;
        } else {
            total += (uint64_t)n_tokens * moas__kv_token_bytes(ctx, -1);
        }
    }
    return total;
}

/* Is there room for `n` more tokens: positions, and bytes under the KV budget? */
static moas_status check_room(const moas_context *ctx, int32_t n, const char *what) {
    MOAS_RETURN_IF(n > ctx->n_ctx - ctx->n_past, MOAS_ERR_CONTEXT_FULL,
                   "%s: %d token(s) do not fit: %d of %d positions are free", what, n,
                   ctx->n_ctx - ctx->n_past, ctx->n_ctx);
    if (ctx->kv_budget != 0 && n > 0) {   /* an empty batch always fits */
        const uint64_t used = kv_bytes_at(ctx, -1, ctx->n_past);
        const uint64_t need = (uint64_t)n * min_token_bytes(ctx);
        MOAS_RETURN_IF(used > ctx->kv_budget || need > ctx->kv_budget - used,
                       MOAS_ERR_CONTEXT_FULL, "%s: KV budget of %llu bytes reached: %llu used, "
                       "%d token(s) need at least %llu more", what,
                       (unsigned long long)ctx->kv_budget, (unsigned long long)used, n,
                       (unsigned long long)need);
    }
    return MOAS_OK;
}

/* Routed mode with a budget: plan the next token, `n_after` more to follow in this
 * call. The token should stay within an even share of what is left per free position
 * (so the share never shrinks and a full context fits when the budget allows), and
 * must leave room for the cheapest scheme in the tokens after it. */
static void plan_token(moas_context *ctx, int32_t n_after) {
    if (ctx->mode != MOAS_MODE_ROUTED || ctx->kv_budget == 0) {
        return;
    }
    /* nothing left rather than a wrap below zero: a route callback may lower the budget
     * under what the call's tokens already use (the rest then take the cheapest scheme) */
    const uint64_t used = kv_bytes_at(ctx, -1, ctx->n_past);
    const uint64_t later = (uint64_t)n_after * min_token_bytes(ctx);
    const uint64_t left = used < ctx->kv_budget ? ctx->kv_budget - used : 0;
    const uint64_t room = left > later ? left - later : 0;
    const uint64_t rate = left / (uint64_t)(ctx->n_ctx - ctx->n_past);
    ctx->plan_room = room;
    ctx->plan_rate = rate < room ? rate : room;
    ctx->plan_spent = 0;
}

int32_t moas__route_choose(moas_context *ctx, int32_t pos, int32_t layer, const float *gates) {
    const moas_model *m = ctx->model;
    const int32_t S = m->n_scheme;
    int32_t choice = 0;

    /* the proposal: the forced scheme, else the largest gate (the first on ties) */
    if (ctx->forced_scheme >= 0) {
        choice = ctx->forced_scheme;
    } else {
        for (int32_t s = 1; s < S; s++) {
            choice = gates[s] > gates[choice] ? s : choice;
        }
    }
    if (ctx->route_fn != NULL) {
        const int32_t r = ctx->route_fn(ctx->route_user, pos, layer, gates, S, choice);
        choice = r >= 0 && r < S ? r : choice;
    }
    if (ctx->call_heads > 0 && m->scheme_n_kv[choice] > ctx->call_heads) {
        /* the pool is filling (the steering limit, which the pages were reserved for):
         * the most favoured scheme within the limit */
        int32_t best = -1;
        for (int32_t s = 0; s < S; s++) {
            if (m->scheme_n_kv[s] <= ctx->call_heads && (best < 0 || gates[s] > gates[best])) {
                best = s;
            }
        }
        choice = best >= 0 ? best : cheapest_scheme(m);
    }
    if (ctx->kv_budget == 0) {
        return choice;
    }

    /* The budget: this layer may spend an even share of what the token's plan has
     * left, and never so much that a later layer could not afford the cheapest scheme.
     * Over the allowance, the most favoured scheme that fits wins; failing that, the
     * cheapest, which the plan always leaves room for. */
    const int32_t cheap = cheapest_scheme(m);
    const uint64_t later = (uint64_t)(m->n_layer - layer - 1) * moas__kv_token_bytes(ctx, cheap);
    const uint64_t hard = ctx->plan_room - ctx->plan_spent - later;
    const uint64_t share = ctx->plan_rate > ctx->plan_spent
                               ? (ctx->plan_rate - ctx->plan_spent) / (uint64_t)(m->n_layer - layer)
                               : 0;
    const uint64_t allow = share < hard ? share : hard;
    if (moas__kv_token_bytes(ctx, choice) > allow) {
        int32_t best = -1;
        for (int32_t s = 0; s < S; s++) {
            if (moas__kv_token_bytes(ctx, s) <= allow && (best < 0 || gates[s] > gates[best])) {
                best = s;
            }
        }
        choice = best >= 0 ? best : cheap;
    }
    ctx->plan_spent += moas__kv_token_bytes(ctx, choice);
    return choice;
}

/* An abort callback stopped a call of ctx (moas_abort_fn): back to the tokens it had
 * when the call began, as moas_context_truncate would leave it. */
static void undo_call(moas_context *ctx) {
    ctx->n_past = ctx->n_past_at_call;
    ctx->logits_valid = false;
    pages_trim(ctx);
}

static moas_status aborted(const char *what) {
    moas__set_error("%s: stopped by the abort callback; nothing was decoded", what);
    return MOAS_ERR_ABORTED;
}

/* moas_context_decode with the context held (context_claim), as the other calls that
 * change a context below. */
static moas_status context_decode(moas_context *ctx, int32_t token, float *logits) {
    moas_status st;

    if ((st = check_token(ctx, token, "context_decode", -1)) != MOAS_OK ||
        (st = check_room(ctx, 1, "context_decode")) != MOAS_OK ||
        (st = moas__context_workspace(ctx, "context_decode")) != MOAS_OK ||
        (st = reserve(ctx, 1, "context_decode")) != MOAS_OK) {
        return fail(ctx, st);
    }
    plan_token(ctx, 0);
    ctx->n_past_at_call = ctx->n_past;
    if (!moas__forward(ctx, token, true)) {
        undo_call(ctx);
        return fail(ctx, aborted("context_decode"));
    }
    ctx->n_past++;
    pages_trim(ctx);
    if (logits != NULL) {
        memcpy(logits, ctx->logits, (size_t)ctx->model->n_vocab * sizeof *logits);
    }
    return MOAS_OK;
}

moas_status moas_context_decode(moas_context *ctx, int32_t token, float *logits) {
    moas_status st;

    if (ctx == NULL) {
        moas__set_error("context_decode: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = context_claim(ctx, "context_decode")) != MOAS_OK) {
        return st;
    }
    st = context_decode(ctx, token, logits);
    context_release(ctx);
    return st;
}

static moas_status context_decode_batch(moas_context *ctx, const int32_t *tokens,
                                       int32_t n_tokens, float *logits, moas_logits which) {
    const char *what = "context_decode_batch";
    moas_status st;

    if (n_tokens < 0 || (tokens == NULL && n_tokens > 0) || (unsigned)which >= MOAS_LOGITS_COUNT ||
        (which == MOAS_LOGITS_ALL && logits == NULL && n_tokens > 0)) {
        moas__set_error("%s: %s", what,
                        n_tokens < 0 ? "n_tokens is negative"
                        : (unsigned)which >= MOAS_LOGITS_COUNT ? "unknown `which`"
                        : tokens == NULL ? "tokens is NULL"
                                         : "MOAS_LOGITS_ALL needs a logits array");
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    /* the room before the tokens: a count beyond the caller's array must not read it */
    if ((st = check_room(ctx, n_tokens, what)) != MOAS_OK) {
        return fail(ctx, st);
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        if ((st = check_token(ctx, tokens[i], what, i)) != MOAS_OK) {
            return fail(ctx, st);
        }
    }
    if ((n_tokens > 0 && (st = moas__context_workspace(ctx, what)) != MOAS_OK) ||
        (st = reserve(ctx, n_tokens, what)) != MOAS_OK) {
        return fail(ctx, st);
    }
    const size_t n_vocab = (size_t)ctx->model->n_vocab;
    ctx->n_past_at_call = ctx->n_past;
    if (ctx->mode == MOAS_MODE_ROUTED && ctx->kv_budget != 0) {
        /* the budget plans token by token, with every layer of a token before the next */
        for (int32_t i = 0; i < n_tokens; i++) {
            const bool last = i == n_tokens - 1;
            const bool want = which == MOAS_LOGITS_ALL || (which == MOAS_LOGITS_LAST && last);
            plan_token(ctx, n_tokens - i - 1);
            if (!moas__forward(ctx, tokens[i], want)) {
                undo_call(ctx);
                return fail(ctx, aborted(what));
            }
            ctx->n_past++;
            if (want && which == MOAS_LOGITS_ALL) {
                memcpy(logits + (size_t)i * n_vocab, ctx->logits, n_vocab * sizeof *logits);
            }
        }
    } else {
        /* blocks of batch_tokens: each weight row is read once per block */
        const int32_t block = ctx->batch_tokens;
        for (int32_t i = 0; i < n_tokens; i += block) {
            const int32_t n = n_tokens - i < block ? n_tokens - i : block;
            if (!moas__forward_batch(ctx, tokens + i, n,
                                     which == MOAS_LOGITS_ALL ? logits + (size_t)i * n_vocab
                                                              : NULL,
                                     which == MOAS_LOGITS_LAST && i + n == n_tokens)) {
                undo_call(ctx);
                return fail(ctx, aborted(what));
            }
            ctx->n_past += n;
        }
    }
    pages_trim(ctx);
    if (which == MOAS_LOGITS_LAST && logits != NULL && n_tokens > 0) {
        memcpy(logits, ctx->logits, n_vocab * sizeof *logits);
    }
    return MOAS_OK;
}

moas_status moas_context_decode_batch(moas_context *ctx, const int32_t *tokens,
                                      int32_t n_tokens, float *logits, moas_logits which) {
    moas_status st;

    if (ctx == NULL) {
        moas__set_error("context_decode_batch: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = context_claim(ctx, "context_decode_batch")) != MOAS_OK) {
        return st;
    }
    st = context_decode_batch(ctx, tokens, n_tokens, logits, which);
    context_release(ctx);
    return st;
}

const float *moas_context_logits(const moas_context *ctx) {
    return ctx != NULL && ctx->logits_valid ? ctx->logits : NULL;
}

/* A NULL context reads as nothing (0, NULL, "", mixture) rather than crashing. */
int32_t moas_context_n_past(const moas_context *ctx) { return ctx != NULL ? ctx->n_past : 0; }
int32_t moas_context_n_ctx(const moas_context *ctx) { return ctx != NULL ? ctx->n_ctx : 0; }
moas_mode moas_context_mode(const moas_context *ctx) {
    return ctx != NULL ? ctx->mode : MOAS_MODE_MIXTURE;
}
const moas_model *moas_context_model(const moas_context *ctx) {
    return ctx != NULL ? ctx->model : NULL;
}
const char *moas_context_kernels_name(const moas_context *ctx) {
    return ctx != NULL ? ctx->ops->name : "";
}

void moas_context_reset(moas_context *ctx) {
    if (ctx == NULL) {
        moas__set_error("context_reset: ctx is NULL");
        return;
    }
    if (context_claim(ctx, "context_reset") != MOAS_OK) {
        return;
    }
    ctx->n_past = 0;
    ctx->logits_valid = false;
    pages_trim(ctx);
    context_release(ctx);
}

/* Positions below n_keep, their ragged offsets included, are untouched by later
 * decodes, so moving n_past back restores the earlier state exactly; the pages past
 * them go back to the pool. */
moas_status moas_context_truncate(moas_context *ctx, int32_t n_keep) {
    if (ctx == NULL) {
        moas__set_error("context_truncate: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    const moas_status claim = context_claim(ctx, "context_truncate");
    if (claim != MOAS_OK) {
        return claim;
    }
    if (n_keep < 0 || n_keep > ctx->n_past) {
        moas__set_error("context_truncate: n_keep %d outside [0, %d]", n_keep, ctx->n_past);
        (void)fail(ctx, MOAS_ERR_INVALID_ARG);   /* logged while still held */
        context_release(ctx);
        return MOAS_ERR_INVALID_ARG;
    }
    ctx->n_past = n_keep;
    ctx->logits_valid = false;
    pages_trim(ctx);
    context_release(ctx);
    return MOAS_OK;
}

/* ---- routing and KV accounting ------------------------------------------------ */

moas_status moas_context_routes(const moas_context *ctx, int32_t pos, int32_t n_pos,
                                float *gates, int32_t *schemes, int32_t *kv_heads) {
    if (ctx == NULL) {
        moas__set_error("context_routes: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if (pos < 0 || n_pos < 0 || n_pos > ctx->n_past - pos) {
        moas__set_error("context_routes: positions [%d, %d + %d) outside the %d stored", pos, pos,
                        n_pos, ctx->n_past);
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    const moas_model *m = ctx->model;
    const int32_t S = m->n_scheme;
    /* mixture mode stores every scheme's heads, or a pooled model's mix of all H */
    int32_t all_heads = 0;
    for (int32_t s = 0; s < S; s++) {
        all_heads += m->scheme_n_kv[s];
    }
    if (m->kv_sharing == MOAS_KV_SHARING_POOLED) {
        all_heads = m->n_head;
    }
    for (int32_t i = 0; i < n_pos; i++) {
        for (int32_t l = 0; l < m->n_layer; l++) {
            const size_t rec = (size_t)(pos + i) * m->n_layer + l;
            const size_t out = (size_t)i * m->n_layer + l;
            const int32_t s = ctx->route_scheme[rec];
            if (gates != NULL) {
                memcpy(gates + out * S, ctx->route_gates + rec * S, (size_t)S * sizeof *gates);
            }
            if (schemes != NULL) {
                schemes[out] = s;
            }
            if (kv_heads != NULL) {
                kv_heads[out] = ctx->mode == MOAS_MODE_ROUTED ? m->scheme_n_kv[s] : all_heads;
            }
        }
    }
    return MOAS_OK;
}

moas_status moas_context_scheme_counts(const moas_context *ctx, int32_t layer, int32_t *counts) {
    if (ctx == NULL || counts == NULL) {
        moas__set_error("context_scheme_counts: %s is NULL", ctx == NULL ? "ctx" : "counts");
        return ctx == NULL ? MOAS_ERR_INVALID_ARG : fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    const moas_model *m = ctx->model;
    if (layer < -1 || layer >= m->n_layer) {
        moas__set_error("context_scheme_counts: layer %d outside [-1, %d)", layer, m->n_layer);
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    memset(counts, 0, (size_t)m->n_scheme * sizeof *counts);
    for (int32_t j = 0; j < ctx->n_past; j++) {
        for (int32_t l = 0; l < m->n_layer; l++) {
            if (layer == -1 || layer == l) {
                counts[ctx->route_scheme[(size_t)j * m->n_layer + l]]++;
            }
        }
    }
    return MOAS_OK;
}

moas_status moas_context_force_scheme(moas_context *ctx, int32_t scheme) {
    bool claimed;
    if (ctx == NULL) {
        moas__set_error("context_force_scheme: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    moas_status st = settings_claim(ctx, "context_force_scheme", &claimed);
    if (st != MOAS_OK) {
        return st;
    }
    if (scheme < -1 || scheme >= ctx->model->n_scheme ||
        (scheme >= 0 && ctx->mode != MOAS_MODE_ROUTED)) {
        moas__set_error("context_force_scheme: %s", ctx->mode != MOAS_MODE_ROUTED
                                                        ? "forcing a scheme needs routed mode"
                                                        : "scheme outside [-1, n_scheme)");
        st = fail(ctx, MOAS_ERR_INVALID_ARG);
    } else {
        ctx->forced_scheme = scheme;
    }
    if (claimed) {
        context_release(ctx);
    }
    return st;
}

moas_status moas_context_set_kv_budget(moas_context *ctx, uint64_t bytes) {
    bool claimed;
    if (ctx == NULL) {
        moas__set_error("context_set_kv_budget: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    moas_status st = settings_claim(ctx, "context_set_kv_budget", &claimed);
    if (st != MOAS_OK) {
        return st;
    }
    st = check_budget(ctx, bytes);
    if (st != MOAS_OK) {
        (void)fail(ctx, st);
    }
    if (claimed) {
        context_release(ctx);
    }
    return st;
}

void moas_context_set_abort_callback(moas_context *ctx, moas_abort_fn fn, void *user) {
    bool claimed;
    if (ctx == NULL) {
        moas__set_error("context_set_abort_callback: ctx is NULL");
        return;
    }
    if (settings_claim(ctx, "context_set_abort_callback", &claimed) != MOAS_OK) {
        return;
    }
    ctx->abort_fn = fn;
    ctx->abort_user = user;
    if (claimed) {
        context_release(ctx);
    }
}

void moas_context_set_route_callback(moas_context *ctx, moas_route_fn fn, void *user) {
    bool claimed;
    if (ctx == NULL) {
        moas__set_error("context_set_route_callback: ctx is NULL");
        return;
    }
    if (settings_claim(ctx, "context_set_route_callback", &claimed) != MOAS_OK) {
        return;
    }
    ctx->route_fn = fn;
    ctx->route_user = user;
    if (claimed) {
        context_release(ctx);
    }
}

size_t moas_context_kv_bytes_used(const moas_context *ctx, int32_t layer) {
    if (ctx == NULL || layer < -1 || layer >= ctx->model->n_layer) {
        return 0;
    }
    return (size_t)kv_bytes_at(ctx, layer, ctx->n_past);
}

size_t moas_context_kv_bytes_reserved(const moas_context *ctx, int32_t layer) {
    if (ctx == NULL || layer < -1 || layer >= ctx->model->n_layer) {
        return 0;
    }
    const moas_model *m = ctx->model;
    uint64_t per_layer;
    if (ctx->mode == MOAS_MODE_ROUTED) {
        per_layer = (uint64_t)ctx->n_ctx * ((uint64_t)ctx->kv[0].n_kv * 2 * ctx->kv_head_bytes +
                                            MOAS_ROUTED_TOKEN_META_BYTES);
    } else {
        per_layer = (uint64_t)ctx->n_ctx * moas__kv_token_bytes(ctx, -1);
    }
    return (size_t)(layer == -1 ? per_layer * (uint64_t)m->n_layer : per_layer);
}

/* ---- many contexts of one pool --------------------------------------------------- */

/* Check part `i` of a moas_pool_decode call, its context held. */
static moas_status check_seq(const moas_context *ctx, const moas_pool_seq *q, int32_t i,
                             moas_mode mode) {
    const char *what = "pool_decode";
    MOAS_RETURN_IF(i > 0 && ctx->mode != mode, MOAS_ERR_INVALID_ARG,
                   "%s: sequence %d is in another mode than sequence 0", what, i);
    MOAS_RETURN_IF(q->n_tokens < 0 || (q->tokens == NULL && q->n_tokens > 0), MOAS_ERR_INVALID_ARG,
                   "%s: sequence %d: %s", what, i,
                   q->n_tokens < 0 ? "n_tokens is negative" : "tokens is NULL");
    MOAS_RETURN_IF((unsigned)q->which >= MOAS_LOGITS_COUNT, MOAS_ERR_INVALID_ARG,
                   "%s: sequence %d: unknown `which` %d", what, i, (int)q->which);
    MOAS_RETURN_IF(q->which == MOAS_LOGITS_ALL && q->logits == NULL && q->n_tokens > 0,
                   MOAS_ERR_INVALID_ARG, "%s: sequence %d: MOAS_LOGITS_ALL needs a logits array",
                   what, i);
    MOAS_RETURN_IF(ctx->mode == MOAS_MODE_ROUTED && ctx->kv_budget != 0 && q->n_tokens > 1,
                   MOAS_ERR_INVALID_ARG, "%s: sequence %d: a routed context with a KV budget "
                   "takes one token per call (its budget plans token by token)", what, i);
    const moas_status st = check_room(ctx, q->n_tokens, what);   /* before reading tokens */
    if (st != MOAS_OK) {
        return st;
    }
    for (int32_t t = 0; t < q->n_tokens; t++) {
        if (q->tokens[t] < 0 || q->tokens[t] >= ctx->model->n_vocab) {
            moas__set_error("%s: sequence %d: token %d at index %d is outside the vocabulary "
                            "[0, %d)", what, i, q->tokens[t], t, ctx->model->n_vocab);
            return MOAS_ERR_INVALID_ARG;
        }
    }
    return MOAS_OK;
}

/* Claim the context of part `i` of a moas_pool_decode call (context_claim); `i` names
 * it in the message. The parts before it are held, so a context named twice is found
 * by its claim. On failure part `i` is not held. */
static moas_status claim_seq(const moas_pool *pool, const moas_pool_seq *seqs, int32_t i) {
    const char *what = "pool_decode";
    moas_context *ctx = seqs[i].ctx;
    MOAS_RETURN_IF(ctx == NULL, MOAS_ERR_INVALID_ARG, "%s: sequence %d has a NULL context", what, i);
    MOAS_RETURN_IF(ctx->pool != pool, MOAS_ERR_INVALID_ARG,
                   "%s: sequence %d's context is not in this pool", what, i);
    if (!context_try_claim(ctx)) {
        int32_t first = 0;
        while (first < i && seqs[first].ctx != ctx) {
            first++;
        }
        if (first < i) {
            moas__set_error("%s: sequence %d's context appears twice in the call (as sequence "
                            "%d too)", what, i, first);
            return MOAS_ERR_INVALID_ARG;
        }
        moas__set_error("%s: sequence %d's context is in use by another call (its own "
                        "decode, from a route callback, or a call from another thread)",
                        what, i);
        return MOAS_ERR_BUSY;
    }
    return MOAS_OK;
}

static void release_seqs(const moas_pool_seq *seqs, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        context_release(seqs[i].ctx);
    }
}

/* With the pool locked: the copies pages_needed() counted that the parts' pages_take()
 * will not make. It counts a copy for every part writing into a shared page; when every
 * holder of that page writes into it in this call, the last to take its pages finds
 * the page its own (moas__kv_grow), so the call makes one copy fewer (a shared page sits
 * at the same stream in each of its holders). */
static uint64_t copies_spared(const moas_pool_seq *seqs, int32_t n_seqs) {
    uint64_t spared = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        const moas_context *ctx = seqs[i].ctx;
        for (int32_t s = 0; s < ctx->n_streams; s++) {
            const int32_t page = copied_page(ctx, s, seqs[i].n_tokens);
            if (page < 0) {
                continue;
            }
            uint32_t writers = 1;   /* counted at the page's first writer in the call */
            bool first = true;
            for (int32_t j = 0; j < n_seqs && first; j++) {
                const bool same =
                    j != i && copied_page(seqs[j].ctx, s, seqs[j].n_tokens) == page;
                first = !(same && j < i);
                writers += same ? 1 : 0;
            }
            spared += first && writers == ctx->pool->refs[page] ? 1 : 0;
        }
    }
    return spared;
}

/* Claim and check every part, then reserve the pages of all of them at once. The
 * first *held parts' contexts are held whatever happens: the caller lets them go as the
 * last thing it does, after its last use of the pool (a context let go may be freed at
 * once, and with it a pool that moas_pool_free already gave up). */
static moas_status pool_decode_prepare(moas_pool *pool, const moas_pool_seq *seqs,
                                       int32_t n_seqs, int32_t *held) {
    moas_status st = MOAS_OK;
    /* the mode every part must share: sequence 0's, read once it is held */
    moas_mode mode = MOAS_MODE_MIXTURE;

    for (*held = 0; *held < n_seqs;) {
        const int32_t i = *held;
        if ((st = claim_seq(pool, seqs, i)) != MOAS_OK) {
            return st;
        }
        (*held)++;
        if ((st = check_seq(seqs[i].ctx, &seqs[i], i, mode)) != MOAS_OK) {
            return st;
        }
        mode = seqs[0].ctx->mode;
    }
    moas__pool_lock(pool);
    uint64_t need = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        steer(seqs[i].ctx);
        need += pages_needed(seqs[i].ctx, seqs[i].n_tokens);
    }
    need -= copies_spared(seqs, n_seqs);
    if (need > (uint64_t)pool->n_free) {
        st = pool_full(pool, need, "pool_decode");
        moas__pool_unlock(pool);
        return st;
    }
    for (int32_t i = 0; i < n_seqs; i++) {
        pages_take(seqs[i].ctx, seqs[i].n_tokens);
    }
    moas__pool_unlock(pool);
    return MOAS_OK;
}

moas_status moas_pool_decode(moas_pool *pool, const moas_pool_seq *seqs, int32_t n_seqs) {
    moas_status st;

    if (pool == NULL || n_seqs < 0 || (seqs == NULL && n_seqs > 0)) {
        moas__set_error("pool_decode: %s", pool == NULL ? "pool is NULL"
                                           : n_seqs < 0 ? "n_seqs is negative"
                                                        : "seqs is NULL");
        if (pool != NULL) {
            moas__log_error(pool->log, pool->log_user);
        }
        return MOAS_ERR_INVALID_ARG;
    }
    if (atomic_flag_test_and_set_explicit(&pool->busy, memory_order_acquire)) {
        moas__set_error("pool_decode: another pool_decode call on this pool is under way");
        moas__log_error(pool->log, pool->log_user);
        return MOAS_ERR_BUSY;
    }
    int32_t held;
    if ((st = pool_decode_prepare(pool, seqs, n_seqs, &held)) != MOAS_OK) {
        moas__log_error(pool->log, pool->log_user);
        atomic_flag_clear_explicit(&pool->busy, memory_order_release);
        release_seqs(seqs, held);
        return st;
    }
    for (int32_t i = 0; i < n_seqs; i++) {
        if (seqs[i].n_tokens > 0) {
            plan_token(seqs[i].ctx, 0);   /* budgets: one token per call, checked above */
        }
        seqs[i].ctx->n_past_at_call = seqs[i].ctx->n_past;
    }

    /* blocks of up to max_rows rows: each sequence's tokens in order, a sequence's
     * run split across blocks where a block fills up */
    moas_workspace *ws = pool->ws;
    const size_t n_vocab = (size_t)pool->model->n_vocab;
    int32_t seq = 0, done = 0;   /* the next token to place: seqs[seq].tokens[done] */
    while (seq < n_seqs) {
        int32_t n_runs = 0, rows = 0;
        while (seq < n_seqs && rows < ws->max_rows) {
            const moas_pool_seq *q = &seqs[seq];
            const int32_t left = q->n_tokens - done;
            if (left == 0) {
                seq++;
                done = 0;
                continue;
            }
            const int32_t n = left < ws->max_rows - rows ? left : ws->max_rows - rows;
            moas_seq_run *run = &ws->runs[n_runs++];
            run->ctx = q->ctx;
            run->tokens = q->tokens + done;
            run->n = n;
            run->row0 = rows;
            run->all = q->which == MOAS_LOGITS_ALL ? q->logits + (size_t)done * n_vocab : NULL;
            run->want_last = q->which == MOAS_LOGITS_LAST && done + n == q->n_tokens;
            rows += n;
            done += n;
        }
        if (n_runs == 0) {
            break;
        }
        if (!moas__forward_runs(ws, ws->runs, n_runs)) {
            for (int32_t i = 0; i < n_seqs; i++) {
                if (seqs[i].n_tokens > 0) {   /* the others keep their logits */
                    undo_call(seqs[i].ctx);
                }
            }
            st = aborted("pool_decode");
            moas__log_error(pool->log, pool->log_user);
            atomic_flag_clear_explicit(&pool->busy, memory_order_release);
            release_seqs(seqs, n_seqs);
            return st;
        }
        for (int32_t r = 0; r < n_runs; r++) {
            ws->runs[r].ctx->n_past += ws->runs[r].n;
        }
    }
    for (int32_t i = 0; i < n_seqs; i++) {
        const moas_pool_seq *q = &seqs[i];
        pages_trim(q->ctx);
        if (q->which == MOAS_LOGITS_LAST && q->logits != NULL && q->n_tokens > 0) {
            memcpy(q->logits, q->ctx->logits, n_vocab * sizeof *q->logits);
        }
    }
    atomic_flag_clear_explicit(&pool->busy, memory_order_release);
    release_seqs(seqs, n_seqs);   /* last: see pool_decode_prepare */
    return MOAS_OK;
}

/* ---- fork -------------------------------------------------------------------- */

static moas_status context_fork(moas_context *parent, moas_context **out) {
    moas_context_params p;
    moas_context *child = NULL;
    moas_status st;

    if (out != NULL) {
        *out = NULL;
    }
    if (parent == NULL || out == NULL) {
        moas__set_error("context_fork: %s is NULL", parent == NULL ? "parent" : "out");
        return MOAS_ERR_INVALID_ARG;
    }
    if (parent->pool_owned) {
        moas__set_error("context_fork: the context has no pool of its own to share pages "
                        "in (create it with moas_context_params.pool)");
        return fail(parent, MOAS_ERR_INVALID_ARG);
    }
    moas_context_params_init(&p);
    p.n_ctx = parent->n_ctx;
    p.n_threads = parent->n_threads;
    p.mode = parent->mode;
    p.kv_type = parent->kv_type;
    p.log = parent->log;
    p.log_user = parent->log_user;
    p.allocator = parent->alloc;
    p.forced_scheme = parent->forced_scheme;
    p.kv_budget_bytes = parent->kv_budget;
    p.route_fn = parent->route_fn;
    p.route_user = parent->route_user;
    p.pool = parent->pool;
    p.n_batch = parent->batch_tokens;
    if ((st = context_make(parent->model, &p, &child)) != MOAS_OK) {
        return fail(parent, st);
    }
    child->batch_tokens = parent->batch_tokens;
    child->abort_fn = parent->abort_fn;
    child->abort_user = parent->abort_user;
    if (parent->ws != NULL) {   /* a workspace now only if the parent has one: its tuning */
        if ((st = moas__context_workspace(child, "context_fork")) != MOAS_OK) {
            moas_context_free(child);
            return fail(parent, st);
        }
        child->ws->parallel_min_work = parent->ws->parallel_min_work;
        child->ws->mm_hints = parent->ws->mm_hints;
    }
    /* every stream's copy of its partly written last page at once, all or nothing,
     * under one lock: no other call sees pages taken by a fork that then fails */
    moas_pool *pool = parent->pool;
    uint64_t copies = 0;
    for (int32_t i = 0; i < parent->n_streams; i++) {
        copies += moas__kv_fork_copies(pool, stream_heads(parent, i, parent->n_past));
    }
    moas__pool_lock(pool);
    if (copies > (uint64_t)pool->n_free) {
        st = pool_full(pool, copies, "context_fork");
        moas__pool_unlock(pool);
        moas_context_free(child);
        return fail(parent, st);
    }
    for (int32_t i = 0; i < parent->n_streams; i++) {
        moas__kv_fork(pool, &child->kv[i], &parent->kv[i],
                      stream_heads(parent, i, parent->n_past));
    }
    moas__pool_unlock(pool);
    const moas_model *m = parent->model;
    const size_t L = (size_t)m->n_layer, S = (size_t)m->n_scheme, n = (size_t)parent->n_past;
    if (parent->kv_offsets != NULL) {
        for (int32_t i = 0; i < parent->n_streams; i++) {
            memcpy(child->kv[i].off, parent->kv[i].off, (n + 1) * sizeof *parent->kv[i].off);
        }
    }
    memcpy(child->route_gates, parent->route_gates, n * L * S * sizeof *parent->route_gates);
    memcpy(child->route_scheme, parent->route_scheme, n * L * sizeof *parent->route_scheme);
    memcpy(child->logits, parent->logits, (size_t)m->n_vocab * sizeof *parent->logits);
    child->logits_valid = parent->logits_valid;
    child->n_past = parent->n_past;
    pages_trim(child);   /* publishes its figures */
    *out = child;
    return MOAS_OK;
}

moas_status moas_context_fork(moas_context *parent, moas_context **out) {
    if (out != NULL) {
        *out = NULL;
    }
    if (parent == NULL) {
        return context_fork(parent, out);   /* the NULL's message */
    }
    moas_status st = context_claim(parent, "context_fork");
    if (st == MOAS_OK) {
        st = context_fork(parent, out);
        context_release(parent);
    }
    return st;
}

int32_t moas_context_kv_pages(const moas_context *ctx) {
    int32_t n = 0;
    for (int32_t i = 0; ctx != NULL && i < ctx->n_streams; i++) {
        n += ctx->kv[i].n_pages;
    }
    return n;
}

size_t moas_context_kv_bytes_held(const moas_context *ctx) {
    if (ctx == NULL) {
        return 0;
    }
    return (size_t)moas_context_kv_pages(ctx) * (size_t)ctx->pool->page_heads *
           ctx->pool->head_bytes * 2;
}

/* ---- saved state --------------------------------------------------------------- */

/* Layout (docs/FORMAT.md, "Saved state"), little-endian as the host writes it:
 *   header      STATE_HEADER_WORDS 32-bit words (magic, version, fingerprint, shape)
 *   schemes     [n_past, n_layer] u8
 *   gates       [n_past, n_layer, n_scheme] f32
 *   logits      [n_vocab] f32, when the header says they are valid
 *   per stream  [heads] K heads then [heads] V heads of head_dim elements */
#define STATE_MAGIC0 0x53414f4du   /* "MOAS" */
#define STATE_MAGIC1 0x54415453u   /* "STAT" */
/* written; versions 1 and 2 (their fingerprints) are still read */
#define STATE_VERSION ((uint32_t)MOAS_FINGERPRINT_VERSION)
enum {
    SH_MAGIC0, SH_MAGIC1, SH_VERSION, SH_PRINT_LO, SH_PRINT_HI, SH_MODE, SH_KV_TYPE,
    SH_N_LAYER, SH_N_SCHEME, SH_N_STREAMS, SH_HEAD_DIM, SH_N_VOCAB, SH_N_PAST,
    SH_LOGITS_VALID, STATE_HEADER_WORDS
};

/* Bytes of a state of n tokens whose streams hold heads[i] heads. */
static uint64_t state_bytes(const moas_context *ctx, int32_t n, const uint32_t *heads,
                            bool logits) {
    const moas_model *m = ctx->model;
    uint64_t total = STATE_HEADER_WORDS * 4 + (uint64_t)n * (uint64_t)m->n_layer *
                                                  (1 + 4 * (uint64_t)m->n_scheme);
    total += logits ? 4 * (uint64_t)m->n_vocab : 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        total += 2 * (uint64_t)heads[i] * ctx->pool->head_bytes;
    }
    return total;
}

size_t moas_context_state_size(const moas_context *ctx) {
    uint64_t total = STATE_HEADER_WORDS * 4;
    if (ctx == NULL) {
        return 0;
    }
    const moas_model *m = ctx->model;
    total += (uint64_t)ctx->n_past * (uint64_t)m->n_layer * (1 + 4 * (uint64_t)m->n_scheme);
    total += ctx->logits_valid ? 4 * (uint64_t)m->n_vocab : 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        total += 2 * (uint64_t)stream_heads(ctx, i, ctx->n_past) * ctx->pool->head_bytes;
    }
    return (size_t)total;
}

moas_status moas_context_state_save(const moas_context *ctx, void *buf, size_t size,
                                    size_t *written) {
    if (ctx == NULL || (buf == NULL && size > 0) || written == NULL) {
        moas__set_error("context_state_save: %s is NULL",
                        ctx == NULL ? "ctx" : written == NULL ? "written" : "buf");
        return ctx == NULL ? MOAS_ERR_INVALID_ARG : fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    const size_t need = moas_context_state_size(ctx);
    *written = need;
    if (size < need) {
        moas__set_error("context_state_save: the state needs %zu bytes, the buffer has %zu",
                        need, size);
        return fail(ctx, MOAS_ERR_BUFFER_TOO_SMALL);
    }
    const moas_model *m = ctx->model;
    const moas_pool *pool = ctx->pool;
    const uint64_t print = moas__model_fingerprint(m, STATE_VERSION);
    const uint32_t header[STATE_HEADER_WORDS] = {
        [SH_MAGIC0] = STATE_MAGIC0, [SH_MAGIC1] = STATE_MAGIC1, [SH_VERSION] = STATE_VERSION,
        [SH_PRINT_LO] = (uint32_t)print, [SH_PRINT_HI] = (uint32_t)(print >> 32),
        [SH_MODE] = (uint32_t)ctx->mode, [SH_KV_TYPE] = (uint32_t)ctx->kv_type,
        [SH_N_LAYER] = (uint32_t)m->n_layer, [SH_N_SCHEME] = (uint32_t)m->n_scheme,
        [SH_N_STREAMS] = (uint32_t)ctx->n_streams, [SH_HEAD_DIM] = (uint32_t)m->head_dim,
        [SH_N_VOCAB] = (uint32_t)m->n_vocab, [SH_N_PAST] = (uint32_t)ctx->n_past,
        [SH_LOGITS_VALID] = ctx->logits_valid ? 1u : 0u};
    uint8_t *p = buf;
    const size_t n = (size_t)ctx->n_past, L = (size_t)m->n_layer, S = (size_t)m->n_scheme;
    memcpy(p, header, sizeof header);
    p += sizeof header;
    memcpy(p, ctx->route_scheme, n * L);
    p += n * L;
    memcpy(p, ctx->route_gates, n * L * S * sizeof(float));
    p += n * L * S * sizeof(float);
    if (ctx->logits_valid) {
        memcpy(p, ctx->logits, (size_t)m->n_vocab * sizeof(float));
        p += (size_t)m->n_vocab * sizeof(float);
    }
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        const uint32_t heads = stream_heads(ctx, i, ctx->n_past);
        for (int kv = 0; kv < 2; kv++) {
            uint8_t *slab = kv == 0 ? pool->k : pool->v;
            for (uint32_t h = 0; h < heads; h++) {
                memcpy(p, moas__pool_head(pool, slab, moas__kv_row(pool, &ctx->kv[i], h)),
                       pool->head_bytes);
                p += pool->head_bytes;
            }
        }
    }
    return MOAS_OK;
}

/* Check a state against ctx without changing anything; on success heads[] holds each
 * stream's heads. */
static moas_status state_check(const moas_context *ctx, const uint8_t *buf, size_t size,
                               uint32_t *heads) {
    const char *what = "context_state_load";
    const moas_model *m = ctx->model;
    uint32_t h[STATE_HEADER_WORDS];

    /* a state cut short is corrupt however short; no bytes, or bytes that do not begin
     * as a state does, are not one */
    const uint32_t magic[2] = {STATE_MAGIC0, STATE_MAGIC1};
    MOAS_RETURN_IF(size == 0, MOAS_ERR_BAD_FORMAT, "%s: no state (0 bytes)", what);
    MOAS_RETURN_IF(memcmp(buf, magic, size < sizeof magic ? size : sizeof magic) != 0,
                   MOAS_ERR_BAD_FORMAT, "%s: not a libmoas state (bad magic)", what);
    MOAS_RETURN_IF(size < sizeof h, MOAS_ERR_CORRUPT,
                   "%s: the state is cut short: %zu bytes, fewer than its %zu-byte header",
                   what, size, sizeof h);
    memcpy(h, buf, sizeof h);
    MOAS_RETURN_IF(h[SH_MAGIC0] != STATE_MAGIC0 || h[SH_MAGIC1] != STATE_MAGIC1,
                   MOAS_ERR_BAD_FORMAT, "%s: not a libmoas state (bad magic)", what);
    MOAS_RETURN_IF(h[SH_VERSION] < 1 || h[SH_VERSION] > STATE_VERSION, MOAS_ERR_BAD_FORMAT,
                   "%s: state version %u; this library reads versions 1 to %u", what,
                   h[SH_VERSION], STATE_VERSION);
    const uint64_t print = (uint64_t)h[SH_PRINT_LO] | (uint64_t)h[SH_PRINT_HI] << 32;
    MOAS_RETURN_IF(print != moas__model_fingerprint(m, h[SH_VERSION]) ||
                   h[SH_N_LAYER] != (uint32_t)m->n_layer || h[SH_N_SCHEME] != (uint32_t)m->n_scheme ||
                   h[SH_HEAD_DIM] != (uint32_t)m->head_dim || h[SH_N_VOCAB] != (uint32_t)m->n_vocab,
                   MOAS_ERR_CORRUPT, "%s: the state was saved from another model", what);
    MOAS_RETURN_IF(h[SH_MODE] != (uint32_t)ctx->mode || h[SH_KV_TYPE] != (uint32_t)ctx->kv_type ||
                   h[SH_N_STREAMS] != (uint32_t)ctx->n_streams, MOAS_ERR_CORRUPT,
                   "%s: the state is of mode %u, kv_type %u; the context's are %d, %d", what,
                   h[SH_MODE], h[SH_KV_TYPE], (int)ctx->mode, (int)ctx->kv_type);
    MOAS_RETURN_IF(h[SH_LOGITS_VALID] > 1, MOAS_ERR_CORRUPT, "%s: bad logits flag %u", what,
                   h[SH_LOGITS_VALID]);
    MOAS_RETURN_IF(h[SH_N_PAST] > (uint32_t)ctx->n_ctx, MOAS_ERR_CONTEXT_FULL,
                   "%s: the state holds %u tokens; the context has room for %d", what,
                   h[SH_N_PAST], ctx->n_ctx);
    const int32_t n = (int32_t)h[SH_N_PAST];
    const size_t L = (size_t)m->n_layer;
    MOAS_RETURN_IF(size < sizeof h + (size_t)n * L, MOAS_ERR_CORRUPT,
                   "%s: the state is truncated (%zu bytes)", what, size);
    const uint8_t *schemes = buf + sizeof h;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        heads[i] = 0;
    }
    for (size_t j = 0; j < (size_t)n * L; j++) {
        MOAS_RETURN_IF(schemes[j] >= (uint32_t)m->n_scheme, MOAS_ERR_CORRUPT,
                       "%s: token %zu, layer %zu has scheme %u of %d", what, j / L, j % L,
                       schemes[j], m->n_scheme);
        if (ctx->mode == MOAS_MODE_ROUTED) {
            heads[j % L] += (uint32_t)m->scheme_n_kv[schemes[j]];
        }
    }
    if (ctx->mode != MOAS_MODE_ROUTED) {
        for (int32_t i = 0; i < ctx->n_streams; i++) {
            heads[i] = (uint32_t)n * (uint32_t)ctx->kv[i].n_kv;
        }
    }
    const uint64_t want = state_bytes(ctx, n, heads, h[SH_LOGITS_VALID] != 0);
    MOAS_RETURN_IF(want != (uint64_t)size, MOAS_ERR_CORRUPT,
                   "%s: the state has %zu bytes; its header and routing records say %llu "
                   "(truncated or padded)", what, size, (unsigned long long)want);
    return MOAS_OK;
}

static moas_status context_state_load(moas_context *ctx, const void *buf, size_t size) {
    moas_status st;
    uint32_t *heads;

    if (ctx == NULL || buf == NULL) {
        moas__set_error("context_state_load: %s is NULL", ctx == NULL ? "ctx" : "buf");
        return ctx == NULL ? MOAS_ERR_INVALID_ARG : fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    heads = ctx->state_heads;
    if ((st = state_check(ctx, buf, size, heads)) != MOAS_OK) {
        return fail(ctx, st);
    }

    /* pages: what the state needs, from the free ones and those only this context
     * holds (it gives them all back first); all or nothing */
    moas_pool *pool = ctx->pool;
    moas__pool_lock(pool);
    uint64_t need = 0, own = 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        need += ((uint64_t)heads[i] + (uint64_t)pool->page_heads - 1) >> pool->page_shift;
        for (int32_t k = 0; k < ctx->kv[i].n_pages; k++) {
            own += pool->refs[ctx->kv[i].pages[k]] == 1 ? 1 : 0;
        }
    }
    if (need > (uint64_t)pool->n_free + own) {
        st = pool_full(pool, need - own, "context_state_load");
        moas__pool_unlock(pool);
        return fail(ctx, st);
    }
    uint64_t stored = 0;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas__kv_drop_all(pool, &ctx->kv[i]);
        stored += (uint64_t)heads[i] * 2 * pool->head_bytes;
    }
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas__kv_grow(pool, &ctx->kv[i], 0, heads[i]);
    }
    /* until pages_trim publishes the loaded state's figures, the context stores no
     * more than both states: the pages it now holds cover that */
    if (ctx->published_stored > stored) {
        ctx->published_used -= ctx->published_stored - stored;
        ctx->published_stored = stored;
    }
    moas__pool_unlock(pool);

    const moas_model *m = ctx->model;
    const uint8_t *p = (const uint8_t *)buf + STATE_HEADER_WORDS * 4;
    uint32_t header[STATE_HEADER_WORDS];
    memcpy(header, buf, sizeof header);
    const size_t n = header[SH_N_PAST], L = (size_t)m->n_layer, S = (size_t)m->n_scheme;
    memcpy(ctx->route_scheme, p, n * L);
    p += n * L;
    memcpy(ctx->route_gates, p, n * L * S * sizeof(float));
    p += n * L * S * sizeof(float);
    ctx->logits_valid = header[SH_LOGITS_VALID] != 0;
    if (ctx->logits_valid) {
        memcpy(ctx->logits, p, (size_t)m->n_vocab * sizeof(float));
        p += (size_t)m->n_vocab * sizeof(float);
    }
    if (ctx->mode == MOAS_MODE_ROUTED) {   /* offsets from the schemes */
        for (size_t l = 0; l < L; l++) {
            uint32_t *off = ctx->kv[l].off;
            off[0] = 0;
            for (size_t j = 0; j < n; j++) {
                off[j + 1] = off[j] + (uint32_t)m->scheme_n_kv[ctx->route_scheme[j * L + l]];
            }
        }
    }
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        for (int kv = 0; kv < 2; kv++) {
            uint8_t *slab = kv == 0 ? pool->k : pool->v;
            for (uint32_t h = 0; h < heads[i]; h++) {
                memcpy(moas__pool_head(pool, slab, moas__kv_row(pool, &ctx->kv[i], h)), p,
                       pool->head_bytes);
                p += pool->head_bytes;
            }
        }
    }
    ctx->n_past = (int32_t)n;
    pages_trim(ctx);   /* publishes its figures */
    return MOAS_OK;
}

moas_status moas_context_state_load(moas_context *ctx, const void *buf, size_t size) {
    if (ctx == NULL) {
        return context_state_load(ctx, buf, size);   /* the NULL's message */
    }
    moas_status st = context_claim(ctx, "context_state_load");
    if (st == MOAS_OK) {
        st = context_state_load(ctx, buf, size);
        context_release(ctx);
    }
    return st;
}

/* ---- compaction ---------------------------------------------------------------- */

/* Whether a token that stored `from` heads can be pooled down to `to` heads: groups of
 * H / from heads must nest in groups of H / to (6 -> 2 -> 1 do; 4 -> 3 would not). */
static bool pools_down(const moas_model *m, int32_t from, int32_t to) {
    return to < from && from % to == 0 && m->n_head % from == 0;
}

/* The page indices [*first, *last) of stream i that a rewrite of its heads [from[i],
 * end[i]) writes into; none when from[i] is UINT32_MAX or the range is empty. */
static void rewritten_pages(const moas_context *ctx, int32_t i, const uint32_t *from,
                            const uint32_t *end, uint32_t *first, uint32_t *last) {
    const moas_pool *pool = ctx->pool;
    *first = *last = 0;
    if (from[i] != UINT32_MAX && end[i] > from[i]) {
        *first = from[i] >> pool->page_shift;
        *last = (uint32_t)(((uint64_t)end[i] + (uint64_t)pool->page_heads - 1) >> pool->page_shift);
    }
}

/* Before pages are rewritten in place: give each stream its own copy of every page it
 * shares among those holding its heads [from[i], end[i]), the heads the rewrite writes
 * (UINT32_MAX: none), all or nothing (MOAS_ERR_POOL_FULL changes nothing). Shared pages
 * past end[i] are only read, then given back: copying them would refuse a call that
 * fits. */
static moas_status unshare_from(moas_context *ctx, const uint32_t *from, const uint32_t *end,
                                const char *what) {
    moas_pool *pool = ctx->pool;
    uint64_t need = 0;
    moas__pool_lock(pool);
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        const moas_kv_stream *kv = &ctx->kv[i];
        uint32_t first, last;
        rewritten_pages(ctx, i, from, end, &first, &last);
        for (uint32_t p = first; p < last && p < (uint32_t)kv->n_pages; p++) {
            need += pool->refs[kv->pages[p]] > 1 ? 1 : 0;
        }
    }
    if (need > (uint64_t)pool->n_free) {
        const moas_status st = pool_full(pool, need, what);
        moas__pool_unlock(pool);
        return fail(ctx, st);
    }
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        uint32_t first, last;
        rewritten_pages(ctx, i, from, end, &first, &last);
        moas__kv_unshare(pool, &ctx->kv[i], first, last);
    }
    moas__pool_unlock(pool);
    return MOAS_OK;
}

/* The first token below n_before whose heads in `layer` pool down to `target`, or -1. */
static int32_t first_to_pool(const moas_context *ctx, int32_t layer, int32_t n_before,
                             int32_t target) {
    for (int32_t j = 0; j < n_before; j++) {
        if (pools_down(ctx->model, moas__kv_heads(&ctx->kv[layer], j), target)) {
            return j;
        }
    }
    return -1;
}

/* Move (or pool) the heads of every token from `first` on in `layer`'s stream, packing
 * them front to back, tokens below n_before that stored more than `target` heads pooled
 * down to `target`; returns how many tokens changed. Writes never pass reads: a token
 * is read whole before it is written, and its new place starts at or before its old. */
static int32_t compact_stream(moas_context *ctx, int32_t layer, int32_t first, int32_t n_before,
                              int32_t scheme) {
    const moas_model *m = ctx->model;
    moas_pool *pool = ctx->pool;
    moas_kv_stream *kv = &ctx->kv[layer];
    const int32_t d = m->head_dim, target = m->scheme_n_kv[scheme];
    float *in = ctx->ws->kv_pool, *out = ctx->ws->kv_pool + m->n_embd;
    int32_t changed = 0;
    uint32_t w = kv->off[first];

    for (int32_t j = first; j < ctx->n_past; j++) {
        const uint32_t r = kv->off[j];
        const int32_t k = (int32_t)(kv->off[j + 1] - r);
        const bool pool_it = j < n_before && pools_down(m, k, target);
        const int32_t k_new = pool_it ? target : k;
        for (int side = 0; side < 2; side++) {
            uint8_t *slab = side == 0 ? pool->k : pool->v;
            if (!pool_it) {   /* moved as they are, byte for byte */
                for (int32_t h = 0; h < k; h++) {
                    memmove(moas__pool_head(pool, slab, moas__kv_row(pool, kv, w + (uint32_t)h)),
                            moas__pool_head(pool, slab, moas__kv_row(pool, kv, r + (uint32_t)h)),
                            pool->head_bytes);
                }
                continue;
            }
            for (int32_t h = 0; h < k; h++) {   /* widen, then the means of groups */
                moas__kv_head_load(ctx->kv_type,
                                   moas__pool_head(pool, slab, moas__kv_row(pool, kv, r + (uint32_t)h)),
                                   in + (size_t)h * d, d);
            }
            moas__pool_heads(in, k, d, target, out);
            for (int32_t i = 0; i < target; i++) {
                moas__kv_head_store(ctx->ops, ctx->kv_type,
                                    moas__pool_head(pool, slab, moas__kv_row(pool, kv, w + (uint32_t)i)),
                                    out + (size_t)i * d, d);
            }
        }
        kv->off[j] = w;
        w += (uint32_t)k_new;
        if (pool_it) {
            ctx->route_scheme[(size_t)j * m->n_layer + layer] = (uint8_t)scheme;
            changed++;
        }
    }
    kv->off[ctx->n_past] = w;
    return changed;
}

static moas_status context_compact(moas_context *ctx, int32_t n_before, int32_t scheme,
                                   int32_t *n_changed) {
    const char *what = "context_compact";
    if (n_changed != NULL) {
        *n_changed = 0;
    }
    if (ctx == NULL) {
        moas__set_error("%s: ctx is NULL", what);
        return MOAS_ERR_INVALID_ARG;
    }
    const moas_model *m = ctx->model;
    const char *bad = ctx->mode != MOAS_MODE_ROUTED ? "needs routed mode (mixture stores every "
                                                      "scheme's heads)"
                      : m->kv_sharing != MOAS_KV_SHARING_POOLED
                          ? "needs a model with pooled K/V (independent schemes' K/V cannot be "
                            "derived from each other)"
                      : scheme < 0 || scheme >= m->n_scheme ? "scheme outside [0, n_scheme)"
                      : n_before < 0 || n_before > ctx->n_past ? "n_before outside [0, n_past]"
                                                               : NULL;
    if (bad != NULL) {
        moas__set_error("%s: %s", what, bad);
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }

    moas_status st;
    if ((st = moas__context_workspace(ctx, what)) != MOAS_OK) {   /* its scratch rows */
        return fail(ctx, st);
    }

    /* the heads from the first each layer changes on to the layer's new end are
     * rewritten */
    const int32_t target = m->scheme_n_kv[scheme], L = m->n_layer;
    uint32_t *from = ctx->state_heads, *end = ctx->state_heads + ctx->n_streams;
    for (int32_t l = 0; l < L; l++) {
        const int32_t j = first_to_pool(ctx, l, n_before, target);
        from[l] = j < 0 ? UINT32_MAX : ctx->kv[l].off[j];
        end[l] = ctx->kv[l].off[ctx->n_past];
        for (int32_t k = j < 0 ? n_before : j; k < n_before; k++) {
            const int32_t heads = moas__kv_heads(&ctx->kv[l], k);
            end[l] -= pools_down(m, heads, target) ? (uint32_t)(heads - target) : 0;
        }
    }
    if ((st = unshare_from(ctx, from, end, what)) != MOAS_OK) {
        return st;
    }

    int32_t changed = 0;
    for (int32_t l = 0; l < L; l++) {
        const int32_t j = first_to_pool(ctx, l, n_before, target);
        if (j >= 0) {
            changed += compact_stream(ctx, l, j, n_before, scheme);
        }
    }
    pages_trim(ctx);
    if (n_changed != NULL) {
        *n_changed = changed;
    }
    return MOAS_OK;
}

moas_status moas_context_compact(moas_context *ctx, int32_t n_before, int32_t scheme,
                                 int32_t *n_changed) {
    if (n_changed != NULL) {
        *n_changed = 0;
    }
    if (ctx == NULL) {
        return context_compact(ctx, n_before, scheme, n_changed);   /* the NULL's message */
    }
    moas_status st = context_claim(ctx, "context_compact");
    if (st == MOAS_OK) {
        st = context_compact(ctx, n_before, scheme, n_changed);
        context_release(ctx);
    }
    return st;
}

/* ---- context shift --------------------------------------------------------------- */

/* Turn one stored key head back by `delta` positions (RoPE), in the cache's type. */
static void rotate_head(const moas_context *ctx, uint8_t *head, int32_t delta, float *tmp) {
    const moas_model *m = ctx->model;
    moas__kv_head_load(ctx->kv_type, head, tmp, m->head_dim);
    moas__rope_row(m, -delta, NULL, 0, tmp, 1);
    moas__kv_head_store(ctx->ops, ctx->kv_type, head, tmp, m->head_dim);
}

static moas_status context_shift(moas_context *ctx, int32_t n_keep, int32_t n_discard) {
    const char *what = "context_shift";
    if (ctx == NULL) {
        moas__set_error("%s: ctx is NULL", what);
        return MOAS_ERR_INVALID_ARG;
    }
    const moas_model *m = ctx->model;
    if (!m->rope) {
        moas__set_error("%s: the model has learned positions (a position table), which "
                        "cannot be shifted; decode the kept text again instead", what);
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    if (n_keep < 0 || n_discard < 0 || n_discard > ctx->n_past - n_keep) {
        moas__set_error("%s: n_keep %d and n_discard %d do not fit in the %d tokens stored",
                        what, n_keep, n_discard, ctx->n_past);
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    if (n_discard == 0) {
        return MOAS_OK;
    }
    moas_status st;
    if ((st = moas__context_workspace(ctx, what)) != MOAS_OK) {   /* its scratch rows */
        return fail(ctx, st);
    }

    /* the later tokens' heads are rewritten from the first removed head on, when there
     * are any */
    uint32_t *rewrite_from = ctx->state_heads, *rewrite_end = ctx->state_heads + ctx->n_streams;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        rewrite_from[i] = stream_heads(ctx, i, n_keep);
        rewrite_end[i] = rewrite_from[i] + stream_heads(ctx, i, ctx->n_past) -
                         stream_heads(ctx, i, n_keep + n_discard);
    }
    if ((st = unshare_from(ctx, rewrite_from, rewrite_end, what)) != MOAS_OK) {
        return st;
    }
    moas_pool *pool = ctx->pool;

    /* the later tokens' heads move down (front to back, so a write never passes a
     * read), their keys turned back by n_discard positions */
    const int32_t n_after = ctx->n_past - n_keep - n_discard;
    float *tmp = ctx->ws->kv_pool;
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas_kv_stream *kv = &ctx->kv[i];
        const uint32_t to = stream_heads(ctx, i, n_keep);
        const uint32_t from = stream_heads(ctx, i, n_keep + n_discard);
        const uint32_t end = stream_heads(ctx, i, ctx->n_past);
        for (uint32_t h = 0; h < end - from; h++) {
            const uint32_t src = moas__kv_row(pool, kv, from + h), dst = moas__kv_row(pool, kv, to + h);
            memmove(moas__pool_head(pool, pool->k, dst), moas__pool_head(pool, pool->k, src),
                    pool->head_bytes);
            memmove(moas__pool_head(pool, pool->v, dst), moas__pool_head(pool, pool->v, src),
                    pool->head_bytes);
            rotate_head(ctx, moas__pool_head(pool, pool->k, dst), n_discard, tmp);
        }
        if (kv->off != NULL) {
            for (int32_t j = 0; j <= n_after; j++) {
                kv->off[n_keep + j] = kv->off[n_keep + n_discard + j] - (from - to);
            }
        }
    }
    const size_t L = (size_t)m->n_layer, S = (size_t)m->n_scheme;
    memmove(ctx->route_gates + (size_t)n_keep * L * S,
            ctx->route_gates + (size_t)(n_keep + n_discard) * L * S,
            (size_t)n_after * L * S * sizeof *ctx->route_gates);
    memmove(ctx->route_scheme + (size_t)n_keep * L, ctx->route_scheme + (size_t)(n_keep + n_discard) * L,
            (size_t)n_after * L);
    ctx->n_past -= n_discard;
    if (n_after == 0) {   /* the logits were the last token's, dropped: as truncate */
        ctx->logits_valid = false;
    }
    pages_trim(ctx);
    return MOAS_OK;
}

moas_status moas_context_shift(moas_context *ctx, int32_t n_keep, int32_t n_discard) {
    if (ctx == NULL) {
        return context_shift(ctx, n_keep, n_discard);   /* the NULL's message */
    }
    moas_status st = context_claim(ctx, "context_shift");
    if (st == MOAS_OK) {
        st = context_shift(ctx, n_keep, n_discard);
        context_release(ctx);
    }
    return st;
}
