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

void moas_context_params_init(moas_context_params *params) {
    memset(params, 0, sizeof *params);
    params->size = sizeof *params;
    params->mode = MOAS_MODE_MIXTURE;
    params->kv_type = MOAS_TYPE_F32;
    params->kernels = MOAS_KERNELS_AUTO;
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
    MOAS_RETURN_IF(p->n_threads < 0, MOAS_ERR_INVALID_ARG,
                   "context_create: n_threads %d is negative", p->n_threads);
    MOAS_RETURN_IF((unsigned)p->mode >= MOAS_MODE_COUNT, MOAS_ERR_INVALID_ARG,
                   "context_create: unknown mode %d", (int)p->mode);
    MOAS_RETURN_IF(p->mode == MOAS_MODE_ROUTED, MOAS_ERR_UNSUPPORTED,
                   "context_create: routed mode is not available in libmoas %s",
                   MOAS_VERSION_STRING);
    MOAS_RETURN_IF(p->kv_type != MOAS_TYPE_F32 && p->kv_type != MOAS_TYPE_F16,
                   MOAS_ERR_INVALID_ARG, "context_create: kv_type %d is not F32 (0) or F16 (1)",
                   (int)p->kv_type);
    MOAS_RETURN_IF((unsigned)p->kernels >= MOAS_KERNELS_COUNT, MOAS_ERR_INVALID_ARG,
                   "context_create: unknown kernels %d", (int)p->kernels);
    MOAS_RETURN_IF(p->allocator != NULL &&
                   (p->allocator->alloc == NULL || p->allocator->free == NULL),
                   MOAS_ERR_INVALID_ARG, "context_create: allocator without alloc or free");
    if (p->n_ctx == 0) {
        p->n_ctx = m->n_ctx_train;
    }
    if (p->n_threads == 0) {
#if defined(_OPENMP)
        p->n_threads = omp_get_max_threads();
#else
        p->n_threads = 1;
#endif
    }
    return MOAS_OK;
}

/* Bytes of K and V one token stores in one layer in mixture mode: every scheme's
 * heads. */
static size_t token_kv_bytes(const moas_context *ctx) {
    const moas_model *m = ctx->model;
    size_t heads = 0;
    for (int32_t s = 0; s < m->n_scheme; s++) {
        heads += (size_t)m->scheme_n_kv[s];
    }
    return heads * (size_t)m->head_dim * 2 * ctx->kv_elem_bytes;
}

/* Carve `n` floats from an arena cursor. */
static float *carve(float **cursor, size_t n) {
    float *p = *cursor;
    *cursor += n;
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

    /* activations: x, xb, xb2, mix, q, kv_tmp (2C), att_out, hb, att, gates, logits.
     * Sizes come from a validated model (each dimension at most 2^22), so these sums
     * cannot overflow a 64-bit size_t; the KV total is checked anyway. */
    n_floats = 8 * C + hidden + (size_t)m->n_head * n_ctx + S + (size_t)m->n_vocab;
    ctx->scratch = moas__calloc(ctx->alloc, n_floats, sizeof(float));
    MOAS_RETURN_IF(ctx->scratch == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for %zu activation floats", n_floats);
    cursor = ctx->scratch;
    ctx->x = carve(&cursor, C);
    ctx->xb = carve(&cursor, C);
    ctx->xb2 = carve(&cursor, C);
    ctx->mix = carve(&cursor, C);
    ctx->q = carve(&cursor, C);
    ctx->kv_tmp = carve(&cursor, 2 * C);
    ctx->att_out = carve(&cursor, C);
    ctx->hb = carve(&cursor, hidden);
    ctx->att = carve(&cursor, (size_t)m->n_head * n_ctx);
    ctx->gates = carve(&cursor, S);
    ctx->logits = carve(&cursor, (size_t)m->n_vocab);

    /* the KV cache, every layer and scheme at full capacity */
    ctx->kv = moas__calloc(ctx->alloc, L * S, sizeof *ctx->kv);
    MOAS_RETURN_IF(ctx->kv == NULL, MOAS_ERR_NO_MEMORY, "context_create: no memory for the KV index");
    layer_bytes = token_kv_bytes(ctx);
    MOAS_RETURN_IF(!moas__size_mul(layer_bytes, n_ctx, &kv_bytes) ||
                   !moas__size_mul(kv_bytes, L, &kv_bytes), MOAS_ERR_NO_MEMORY,
                   "context_create: a KV cache of %d tokens does not fit in memory", ctx->n_ctx);
    ctx->kv_arena = moas__malloc(ctx->alloc, kv_bytes);
    MOAS_RETURN_IF(ctx->kv_arena == NULL, MOAS_ERR_NO_MEMORY,
                   "context_create: no memory for a KV cache of %zu bytes", kv_bytes);
    kv_cursor = ctx->kv_arena;
    for (size_t l = 0; l < L; l++) {
        for (size_t s = 0; s < S; s++) {
            moas_kv_stream *kv = &ctx->kv[l * S + s];
            const size_t stream_bytes =
                n_ctx * (size_t)m->scheme_n_kv[s] * (size_t)m->head_dim * ctx->kv_elem_bytes;
            kv->n_kv = m->scheme_n_kv[s];
            kv->k = kv_cursor;
            kv->v = kv_cursor + stream_bytes;
            kv_cursor += 2 * stream_bytes;
        }
    }

    /* routing records */
    ctx->route_gates = moas__calloc(ctx->alloc, n_ctx * L * S, sizeof(float));
    MOAS_RETURN_IF(ctx->route_gates == NULL, MOAS_ERR_NO_MEMORY,
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
    ctx->mode = p.mode;
    ctx->kv_type = p.kv_type;
    ctx->kv_elem_bytes = p.kv_type == MOAS_TYPE_F16 ? 2 : 4;
    ctx->ops = moas__ops_select(p.kernels);
    if ((st = allocate(ctx)) != MOAS_OK) {
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
    moas__free(alloc, ctx->kv);
    moas__free(alloc, ctx->kv_arena);
    moas__free(alloc, ctx->route_gates);
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

moas_status moas_context_decode(moas_context *ctx, int32_t token, float *logits) {
    moas_status st;

    if (ctx == NULL) {
        moas__set_error("context_decode: ctx is NULL");
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = check_token(ctx, token, "context_decode", -1)) != MOAS_OK) {
        return fail(ctx, st);
    }
    if (ctx->n_past >= ctx->n_ctx) {
        moas__set_error("context_decode: the context holds %d tokens, its capacity", ctx->n_ctx);
        return fail(ctx, MOAS_ERR_CONTEXT_FULL);
    }
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
    if (n_tokens > ctx->n_ctx - ctx->n_past) {
        moas__set_error("%s: %d tokens do not fit: %d of %d positions are free", what, n_tokens,
                        ctx->n_ctx - ctx->n_past, ctx->n_ctx);
        return fail(ctx, MOAS_ERR_CONTEXT_FULL);
    }
    for (int32_t i = 0; i < n_tokens; i++) {
        const bool last = i == n_tokens - 1;
        const bool want = which == MOAS_LOGITS_ALL || (which == MOAS_LOGITS_LAST && last);
        moas__forward(ctx, tokens[i], want);
        ctx->n_past++;
        if (want && logits != NULL) {
            float *dst = which == MOAS_LOGITS_ALL ? logits + (size_t)i * ctx->model->n_vocab
                                                  : logits;
            memcpy(dst, ctx->logits, (size_t)ctx->model->n_vocab * sizeof *dst);
        }
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
    int32_t all_heads = 0;
    for (int32_t s = 0; s < S; s++) {
        all_heads += m->scheme_n_kv[s];
    }
    for (int32_t i = 0; i < n_pos; i++) {
        for (int32_t l = 0; l < m->n_layer; l++) {
            const size_t rec = (size_t)(pos + i) * m->n_layer + l;
            const float *g = ctx->route_gates + rec * S;
            const size_t out = (size_t)i * m->n_layer + l;
            int32_t best = 0;
            for (int32_t s = 1; s < S; s++) {
                best = g[s] > g[best] ? s : best;
            }
            if (gates != NULL) {
                memcpy(gates + out * S, g, (size_t)S * sizeof *g);
            }
            if (schemes != NULL) {
                schemes[out] = best;
            }
            if (kv_heads != NULL) {
                kv_heads[out] = all_heads;
            }
        }
    }
    return MOAS_OK;
}

static size_t kv_bytes_for(const moas_context *ctx, int32_t layer, int32_t n_tokens) {
    const int32_t n_layer = ctx->model->n_layer;
    if (layer < -1 || layer >= n_layer) {
        return 0;
    }
    const size_t per_layer = token_kv_bytes(ctx) * (size_t)n_tokens;
    return layer == -1 ? per_layer * (size_t)n_layer : per_layer;
}

size_t moas_context_kv_bytes_used(const moas_context *ctx, int32_t layer) {
    return kv_bytes_for(ctx, layer, ctx->n_past);
}

size_t moas_context_kv_bytes_reserved(const moas_context *ctx, int32_t layer) {
    return kv_bytes_for(ctx, layer, ctx->n_ctx);
}
