/*
 * context.c - contexts: creation with every buffer decoding needs, decode and batch
 * decode, reset and truncate, routing records and KV accounting.
 *
 * Owns: the memory of a context and the rules of its API (argument checks, the
 * all-or-nothing promise of a failed call). Does not own: the arithmetic of a
 * forward step (forward.c).
 *
 * Invariant: positions [0, n_past) of the KV cache and of the routing records hold
 * exactly what decoding those tokens wrote; nothing past n_past is ever read. That is
 * why truncate only moves n_past.
 */
#include "context.h"

#include <string.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

void moas_context_params_init_sized(moas_context_params *params, size_t size) {
    moas_context_params p;
    memset(&p, 0, sizeof p);
    p.mode = MOAS_MODE_MIXTURE;
    p.kv_type = MOAS_TYPE_F32;
    p.kernels = MOAS_KERNELS_AUTO;
    p.forced_scheme = -1;
    moas__params_fill(params, size, &p, sizeof p);
}

/* Check and complete the caller's params against `m`. */
static moas_status resolve_params(const moas_model *m, const moas_context_params *in,
                                  moas_context_params *p) {
    moas_context_params_init(p);
    if (in != NULL) {
        MOAS_RETURN_IF(!moas__params_copy(p, sizeof *p, in), MOAS_ERR_INVALID_ARG,
                       "context_create: params->size is %u; this library knows %zu bytes "
                       "(call moas_context_params_init)", (unsigned)in->size, sizeof *p);
    }
    MOAS_RETURN_IF(p->n_ctx < 0 || p->n_ctx > m->n_ctx_train, MOAS_ERR_INVALID_ARG,
                   "context_create: n_ctx %d outside [0, %d] (0 means the trained length; "
                   "learned positions stop there)", p->n_ctx, m->n_ctx_train);
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
    MOAS_RETURN_IF(p->kv_type != MOAS_TYPE_F32 && p->kv_type != MOAS_TYPE_F16,
                   MOAS_ERR_INVALID_ARG, "context_create: kv_type %d is not F32 (0) or F16 (1)",
                   (int)p->kv_type);
    MOAS_RETURN_IF(p->kernels < 0 || p->kernels >= MOAS_KERNELS_COUNT, MOAS_ERR_INVALID_ARG,
                   "context_create: unknown kernels %d", (int)p->kernels);
    MOAS_RETURN_IF(p->allocator != NULL &&
                   (p->allocator->alloc == NULL || p->allocator->free == NULL),
                   MOAS_ERR_INVALID_ARG, "context_create: allocator without alloc or free");
    if (p->n_ctx == 0) {
        p->n_ctx = m->n_ctx_train;
    }
    if (p->n_threads == 0) {
#if defined(_OPENMP)
        p->n_threads = omp_get_max_threads() < MOAS_MAX_THREADS ? omp_get_max_threads()
                                                                : MOAS_MAX_THREADS;
#else
        p->n_threads = 1;
#endif
    }
    return MOAS_OK;
}

uint64_t moas__kv_token_bytes(const moas_context *ctx, int32_t s) {
    const moas_model *m = ctx->model;
    const uint64_t head_bytes = (uint64_t)m->head_dim * 2 * ctx->kv_elem_bytes;   /* K and V */
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

static moas_status allocate(moas_context *ctx) {
    const moas_model *m = ctx->model;
    const size_t C = (size_t)m->n_embd, S = (size_t)m->n_scheme, L = (size_t)m->n_layer;
    const size_t n_ctx = (size_t)ctx->n_ctx;
    const size_t hidden = (size_t)(m->n_ff > m->n_router ? m->n_ff : m->n_router);
    size_t n_floats, kv_bytes, layer_bytes;
    float *cursor;
    uint8_t *kv_cursor;

    /* per-token scratch: xb, kv_pool (2C), pool_tmp, logits, and per thread the
     * attention scores and rows (32-bit, one float each); each buffer rounded up to 16
     * floats (64 bytes): 6 buffers, at most 15 each */
    const size_t att_floats =
        (size_t)ctx->n_threads * ((size_t)MOAS_ATT_QUERIES * MOAS_ATT_KEYS + n_ctx);
    n_floats = 4 * C + att_floats + (size_t)m->n_vocab + 6 * 15;
    cursor = alloc_aligned(ctx->alloc, n_floats * sizeof(float), &ctx->scratch);
    MOAS_RETURN_IF(cursor == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for %zu activation floats", n_floats);
    memset(cursor, 0, n_floats * sizeof(float));
    ctx->xb = carve(&cursor, C);
    ctx->kv_pool = carve(&cursor, 2 * C);
    ctx->pool_tmp = carve(&cursor, C);
    ctx->att = carve(&cursor, (size_t)ctx->n_threads * MOAS_ATT_QUERIES * MOAS_ATT_KEYS);
    ctx->att_rows = (uint32_t *)(void *)carve(&cursor, (size_t)ctx->n_threads * n_ctx);
    ctx->logits = carve(&cursor, (size_t)m->n_vocab);

    /* batch activations */
    const size_t rows = (size_t)ctx->batch_tokens;
    const size_t c16 = (C + 15) & ~(size_t)15, h16 = (hidden + 15) & ~(size_t)15;
    cursor = alloc_aligned(ctx->alloc, (9 * c16 + h16) * rows * sizeof(float), &ctx->batch_scratch);
    MOAS_RETURN_IF(cursor == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for batch activations");
    ctx->bx = carve(&cursor, rows * c16);
    ctx->bxb = carve(&cursor, rows * c16);
    ctx->bq = carve(&cursor, rows * c16);
    ctx->bk = carve(&cursor, rows * c16);
    ctx->bv = carve(&cursor, rows * c16);
    ctx->batt = carve(&cursor, rows * c16);
    ctx->bmix = carve(&cursor, rows * c16);
    ctx->by = carve(&cursor, rows * c16);
    ctx->bsel = carve(&cursor, rows * c16);
    ctx->bhb = carve(&cursor, rows * h16);

    /* the KV cache at full capacity: in mixture mode a stream per layer and scheme
     * (pooled models: one, of all H heads), in routed mode one ragged stream per layer
     * with room for the widest scheme at every position */
    const bool pooled = m->kv_sharing == MOAS_KV_SHARING_POOLED;
    int32_t max_kv = 0;
    for (int32_t s = 0; s < m->n_scheme; s++) {
        max_kv = m->scheme_n_kv[s] > max_kv ? m->scheme_n_kv[s] : max_kv;
    }
    ctx->n_streams = ctx->mode == MOAS_MODE_ROUTED || pooled ? (int32_t)L : (int32_t)(L * S);
    ctx->kv = moas__calloc(ctx->alloc, (size_t)ctx->n_streams, sizeof *ctx->kv);
    MOAS_RETURN_IF(ctx->kv == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for the KV index");
    layer_bytes = ctx->mode == MOAS_MODE_ROUTED
                      ? (size_t)max_kv * (size_t)m->head_dim * 2 * ctx->kv_elem_bytes
                      : (size_t)moas__kv_token_bytes(ctx, -1);
    MOAS_RETURN_IF(!moas__size_mul(layer_bytes, n_ctx, &kv_bytes) ||
                   !moas__size_mul(kv_bytes, L, &kv_bytes), MOAS_ERR_NO_MEMORY,
                   "context_create: a KV cache of %d tokens does not fit in memory", ctx->n_ctx);
    kv_cursor = alloc_aligned(ctx->alloc, kv_bytes, &ctx->kv_arena);
    MOAS_RETURN_IF(kv_cursor == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for a KV cache of %zu bytes", kv_bytes);
    if (ctx->mode == MOAS_MODE_ROUTED) {
        ctx->kv_offsets = moas__calloc(ctx->alloc, L * (n_ctx + 1), sizeof *ctx->kv_offsets);
        MOAS_RETURN_IF(ctx->kv_offsets == NULL, MOAS_ERR_NO_MEMORY,
                       "context_create: no memory for the KV offsets");
    }
    for (int32_t i = 0; i < ctx->n_streams; i++) {
        moas_kv_stream *kv = &ctx->kv[i];
        const int32_t n_kv = ctx->mode == MOAS_MODE_ROUTED ? max_kv
                             : pooled                      ? m->n_head
                                                           : m->scheme_n_kv[i % (int32_t)S];
        const size_t stream_bytes =
            n_ctx * (size_t)n_kv * (size_t)m->head_dim * ctx->kv_elem_bytes;
        kv->n_kv = n_kv;
        kv->off = ctx->mode == MOAS_MODE_ROUTED ? ctx->kv_offsets + (size_t)i * (n_ctx + 1) : NULL;
        kv->k = kv_cursor;
        kv->v = kv_cursor + stream_bytes;
        kv_cursor += 2 * stream_bytes;
    }

    /* routing records */
    ctx->route_gates = moas__calloc(ctx->alloc, n_ctx * L * S, sizeof(float));
    ctx->route_scheme = moas__calloc(ctx->alloc, n_ctx * L, sizeof(uint8_t));
    MOAS_RETURN_IF(ctx->route_gates == NULL || ctx->route_scheme == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for routing records");
    return MOAS_OK;
}

static void context_failed(moas_log_fn log, void *user) {
    moas__log_error(log, user);
}

moas_status moas_context_create(const moas_model *model, const moas_context_params *params,
                                moas_context **out) {
    moas_context_params p;
    moas_context *ctx;
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
    if ((st = resolve_params(model, params, &p)) != MOAS_OK) {
        context_failed(log, log_user);
        return st;
    }
    ctx = moas__calloc(p.allocator, 1, sizeof *ctx);
    if (ctx == NULL) {
        moas__set_error("context_create: no memory for the context");
        context_failed(log, log_user);
        return MOAS_ERR_NO_MEMORY;
    }
    if (p.allocator != NULL) {
        ctx->alloc_copy = *p.allocator;
        ctx->alloc = &ctx->alloc_copy;
    }
    ctx->model = model;
    ctx->log = p.log;
    ctx->log_user = p.log_user;
    ctx->n_ctx = p.n_ctx;
    ctx->n_threads = p.n_threads;
    ctx->parallel_min_work = MOAS_PARALLEL_MIN_WORK;
    ctx->batch_tokens = ctx->n_ctx < MOAS_BATCH ? ctx->n_ctx : MOAS_BATCH;
    ctx->mm_hints = model->image_size > MOAS_STREAM_MODEL_BYTES ? MOAS_MM_STREAM : 0;
    ctx->mode = (moas_mode)p.mode;
    ctx->kv_type = (moas_type)p.kv_type;
    ctx->kv_elem_bytes = p.kv_type == MOAS_TYPE_F16 ? 2 : 4;
    ctx->ops = moas__ops_select((moas_kernels)p.kernels);
    ctx->forced_scheme = p.forced_scheme;
    ctx->route_fn = p.route_fn;
    ctx->route_user = p.route_user;
    if ((st = check_budget(ctx, p.kv_budget_bytes)) != MOAS_OK ||
        (st = allocate(ctx)) != MOAS_OK) {
        context_failed(log, log_user);
        moas_context_free(ctx);
        return st;
    }
    *out = ctx;
    return MOAS_OK;
}

void moas_context_free(moas_context *ctx) {
    moas_allocator alloc_copy;
    const moas_allocator *alloc;

    if (ctx == NULL) {
        return;
    }
    alloc_copy = ctx->alloc_copy;
    alloc = ctx->alloc != NULL ? &alloc_copy : NULL;
    moas__free(alloc, ctx->scratch);
    moas__free(alloc, ctx->batch_scratch);
    moas__free(alloc, ctx->kv);
    moas__free(alloc, ctx->kv_arena);
    moas__free(alloc, ctx->kv_offsets);
    moas__free(alloc, ctx->route_gates);
    moas__free(alloc, ctx->route_scheme);
    moas__free(alloc, ctx);
}

/* Record a failure of a context call and forward it to the context's log. */
static moas_status fail(const moas_context *ctx, moas_status st) {
    if (ctx != NULL) {
        moas__log_error(ctx->log, ctx->log_user);
    }
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
    const uint64_t head_bytes = (uint64_t)m->head_dim * 2 * ctx->kv_elem_bytes;
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
    const uint64_t left = ctx->kv_budget - kv_bytes_at(ctx, -1, ctx->n_past);
    const uint64_t room = left - (uint64_t)n_after * min_token_bytes(ctx);
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

moas_status moas_context_decode(moas_context *ctx, int32_t token, float *logits) {
    moas_status st;

    if (ctx == NULL) {
        moas__set_error("context_decode: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = check_token(ctx, token, "context_decode", -1)) != MOAS_OK ||
        (st = check_room(ctx, 1, "context_decode")) != MOAS_OK) {
        return fail(ctx, st);
    }
    plan_token(ctx, 0);
    moas__forward(ctx, token, true);
    ctx->n_past++;
    if (logits != NULL) {
        memcpy(logits, ctx->logits, (size_t)ctx->model->n_vocab * sizeof *logits);
    }
    return MOAS_OK;
}

moas_status moas_context_decode_batch(moas_context *ctx, const int32_t *tokens,
                                      int32_t n_tokens, float *logits, moas_logits which) {
    const char *what = "context_decode_batch";
    moas_status st;

    if (ctx == NULL) {
        moas__set_error("%s: ctx is NULL", what);
        return MOAS_ERR_INVALID_ARG;
    }
    if (n_tokens < 0 || (tokens == NULL && n_tokens > 0) || (unsigned)which >= MOAS_LOGITS_COUNT ||
        (which == MOAS_LOGITS_ALL && logits == NULL && n_tokens > 0)) {
        moas__set_error("%s: %s", what,
                        n_tokens < 0 ? "n_tokens is negative"
                        : (unsigned)which >= MOAS_LOGITS_COUNT ? "unknown `which`"
                        : tokens == NULL ? "tokens is NULL"
                                         : "MOAS_LOGITS_ALL needs a logits array");
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        if ((st = check_token(ctx, tokens[i], what, i)) != MOAS_OK) {
            return fail(ctx, st);
        }
    }
    if ((st = check_room(ctx, n_tokens, what)) != MOAS_OK) {
        return fail(ctx, st);
    }
    const size_t n_vocab = (size_t)ctx->model->n_vocab;
    if (ctx->mode == MOAS_MODE_ROUTED && ctx->kv_budget != 0) {
        /* the budget plans token by token, with every layer of a token before the next */
        for (int32_t i = 0; i < n_tokens; i++) {
            const bool last = i == n_tokens - 1;
            const bool want = which == MOAS_LOGITS_ALL || (which == MOAS_LOGITS_LAST && last);
            plan_token(ctx, n_tokens - i - 1);
            moas__forward(ctx, tokens[i], want);
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
            moas__forward_batch(ctx, tokens + i, n,
                                which == MOAS_LOGITS_ALL ? logits + (size_t)i * n_vocab : NULL,
                                which == MOAS_LOGITS_LAST && i + n == n_tokens);
            ctx->n_past += n;
        }
    }
    if (which == MOAS_LOGITS_LAST && logits != NULL && n_tokens > 0) {
        memcpy(logits, ctx->logits, n_vocab * sizeof *logits);
    }
    return MOAS_OK;
}

const float *moas_context_logits(const moas_context *ctx) {
    return ctx != NULL && ctx->logits_valid ? ctx->logits : NULL;
}

int32_t moas_context_n_past(const moas_context *ctx) { return ctx->n_past; }
int32_t moas_context_n_ctx(const moas_context *ctx) { return ctx->n_ctx; }
moas_mode moas_context_mode(const moas_context *ctx) { return ctx->mode; }
const moas_model *moas_context_model(const moas_context *ctx) { return ctx->model; }
const char *moas_context_kernels_name(const moas_context *ctx) { return ctx->ops->name; }

void moas_context_reset(moas_context *ctx) {
    ctx->n_past = 0;
    ctx->logits_valid = false;
}

/* Positions below n_keep, their ragged offsets included, are untouched by later
 * decodes, so moving n_past back restores the earlier state exactly. */
moas_status moas_context_truncate(moas_context *ctx, int32_t n_keep) {
    if (ctx == NULL) {
        moas__set_error("context_truncate: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if (n_keep < 0 || n_keep > ctx->n_past) {
        moas__set_error("context_truncate: n_keep %d outside [0, %d]", n_keep, ctx->n_past);
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    ctx->n_past = n_keep;
    ctx->logits_valid = false;
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
    if (ctx == NULL) {
        moas__set_error("context_force_scheme: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if (scheme < -1 || scheme >= ctx->model->n_scheme ||
        (scheme >= 0 && ctx->mode != MOAS_MODE_ROUTED)) {
        moas__set_error("context_force_scheme: %s", ctx->mode != MOAS_MODE_ROUTED
                                                        ? "forcing a scheme needs routed mode"
                                                        : "scheme outside [-1, n_scheme)");
        return fail(ctx, MOAS_ERR_INVALID_ARG);
    }
    ctx->forced_scheme = scheme;
    return MOAS_OK;
}

moas_status moas_context_set_kv_budget(moas_context *ctx, uint64_t bytes) {
    moas_status st;
    if (ctx == NULL) {
        moas__set_error("context_set_kv_budget: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = check_budget(ctx, bytes)) != MOAS_OK) {
        return fail(ctx, st);
    }
    return MOAS_OK;
}

void moas_context_set_route_callback(moas_context *ctx, moas_route_fn fn, void *user) {
    ctx->route_fn = fn;
    ctx->route_user = user;
}

size_t moas_context_kv_bytes_used(const moas_context *ctx, int32_t layer) {
    if (layer < -1 || layer >= ctx->model->n_layer) {
        return 0;
    }
    return (size_t)kv_bytes_at(ctx, layer, ctx->n_past);
}

size_t moas_context_kv_bytes_reserved(const moas_context *ctx, int32_t layer) {
    const moas_model *m = ctx->model;
    if (layer < -1 || layer >= m->n_layer) {
        return 0;
    }
    uint64_t per_layer;
    if (ctx->mode == MOAS_MODE_ROUTED) {
        per_layer = (uint64_t)ctx->n_ctx * ((uint64_t)ctx->kv[0].n_kv * (uint64_t)m->head_dim * 2 *
                                                ctx->kv_elem_bytes + MOAS_ROUTED_TOKEN_META_BYTES);
    } else {
        per_layer = (uint64_t)ctx->n_ctx * moas__kv_token_bytes(ctx, -1);
    }
    return (size_t)(layer == -1 ? per_layer * (uint64_t)m->n_layer : per_layer);
}
