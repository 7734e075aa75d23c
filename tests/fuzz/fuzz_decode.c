/*
 * fuzz_decode.c - the input is a program over a context of a fixed tiny model: decode
 * token ids (valid, out of range, extreme), batches with every `which`, truncate to
 * any n, reset, routes over any range, KV byte queries, calls with NULL or
 * contradictory arguments, sampling and decoding what was sampled.
 *
 * A shadow copy of the context's history (the tokens stored, whether logits are
 * held) gives every call its expected status. After each call:
 *   - a successful one moved n_past as the shadow says, and copied the logits it
 *     promised to the caller's buffer;
 *   - a failing one returned the status the shadow expects, recorded a new message,
 *     and changed nothing: n_past, the logits and every stored route are as before,
 *     the caller's buffers are untouched, and no route callback ran;
 *   - a VERIFY step (and the end of every program) replays the history in a fresh
 *     context with the same params: logits, routes and KV bytes must be bitwise equal,
 *     which is what "truncate, then decode, equals never having decoded the rest"
 *     promises.
 * Routes must be sane (schemes in range, gates summing to one, the scheme that of the
 * largest gate in mixture mode, KV heads as the mode says), and KV bytes must follow
 * the header's formula from the routes (per layer and in total, never above the
 * reservation, 0 for a layer out of range).
 *
 * Program layout: byte 0 picks the model (router-mixed F32; mean-mixed Q8_0/F16,
 * untied, no bias, RMSNorm; a single GQA scheme in F16; with bit 0x20, the router-mixed
 * shape with pooled K/V, RoPE, RMSNorm and SwiGLU; with bits 0xC0, a router-mixed Q8_0
 * RoPE model of 80 positions whose SwiGLU MLP is 1,056 wide) and the context params (KV type, kernels, mode); byte 1 picks n_ctx;
 * byte 2 the sampler; then one opcode byte per step followed by its operands. At most
 * MAX_STEPS steps run.
 *
 * The long model is there for the paths a block of many tokens takes: rows wider than
 * the matrix kernels' 1,024-column chunks, Q8_0 rows made into float panels, and
 * queries that see a whole 64-key run of the cache going through attention together.
 *
 * Built with -DFUZZ_ROUTED (the Makefile adds it once src/context.c implements routed
 * mode), programs may also run a routed context and use force_scheme, KV budgets,
 * route callbacks and scheme counts. The replay sets, before each token, the budget
 * that was in effect when it was stored, token by token: so it also checks that a
 * batch under a budget routes exactly as single decodes would. A history made partly
 * under another forced scheme or route callback than the current one is not replayed.
 */
#include "fuzz.h"


#include <math.h>
#include <string.h>

#define N_MODELS 5   /* the fourth, pooled, is chosen by bit 0x20 of byte 0, the
                        fifth, long, by bits 0xC0 */
#define SHORT_CTX 16
#define MAX_CTX 80   /* the long model's */
#define MAX_STEPS 200

typedef enum {
    OP_DECODE,
    OP_BATCH,
    OP_TRUNCATE,
    OP_RESET,
    OP_ROUTES,
    OP_KV_BYTES,
    OP_VERIFY,
    OP_BAD_ARGS,
    OP_GENERATE,
    OP_FORCE,      /* the routed-mode API; without FUZZ_ROUTED, a decode */
    OP_BUDGET,
    OP_CALLBACK,
    OP_COUNT
} opcode;

typedef enum { LOGITS_NULL, LOGITS_HELD, LOGITS_EITHER } logits_state;

typedef struct {
    const moas_model *model;
    int32_t n_vocab, n_layer, n_scheme, n_ctx, head_dim, n_head;
    int32_t n_kv[TINY_MODEL_MAX_SCHEMES];
    size_t kv_elem;            /* bytes per cached element */
    uint64_t one_token;        /* the least KV one more token adds: every scheme in
                                  mixture mode, the cheapest (+ 5 bytes) in routed */
    bool routed;
    bool pooled;               /* kv_sharing "pooled": mixture mode stores all heads */
    moas_context_params params;
    moas_context *ctx;
    moas_context *ref;         /* created on first use, same params */

    /* the shadow */
    int32_t hist[MAX_CTX];
    uint64_t tok_budget[MAX_CTX]; /* the KV budget in effect when the token was stored */
    bool no_replay[MAX_CTX];   /* stored under a forcing or callback since changed */
    int32_t n_past;
    logits_state logits;
    int32_t forced;            /* routed API state, mirrored */
    uint64_t budget;
    int32_t cb_seed;           /* 0: no callback */

    /* callback bookkeeping: calls seen, and the positions they may name */
    long cb_calls;
    int32_t cb_lo, cb_hi;

    /* scratch, sized once per program */
    float *logits_buf;         /* [n_vocab] */
    float *snap_logits;        /* [n_vocab] */
    float *snap_gates;         /* [MAX_CTX][n_layer][n_scheme] */
    int32_t *snap_schemes;     /* [MAX_CTX][n_layer] */
    int32_t *snap_heads;       /* [MAX_CTX][n_layer] */
    float *ref_gates;
    int32_t *ref_schemes, *ref_heads;
    moas_sampler *sampler;
} driver;

/* ---- the fixed models ------------------------------------------------------------ */

static const moas_model *models[N_MODELS];

static void init_models(void) {
    tiny_model_config cfg;

    tiny_model_config_default(&cfg);   /* router mixing of [4, 2, 1] KV heads, F32 */
    cfg.n_ctx_train = SHORT_CTX;
    models[0] = fuzz_tiny_model(&cfg, 11);

    tiny_model_config_default(&cfg);
    cfg.n_embd = 32;
    cfg.n_ff = 32;
    cfg.n_ctx_train = 12;
    cfg.mixing = MOAS_MIXING_MEAN;
    cfg.mat_type = MOAS_TYPE_Q8_0;
    cfg.emb_type = MOAS_TYPE_F16;
    cfg.bias = false;
    cfg.tied = false;
    cfg.n_vocab = 20;
    cfg.rms_norm = true;
    models[1] = fuzz_tiny_model(&cfg, 12);

    tiny_model_config_default(&cfg);
    cfg.n_layer = 3;
    cfg.n_scheme = 1;
    cfg.scheme_n_kv[0] = 2;
    cfg.mixing = MOAS_MIXING_SINGLE;
    cfg.mat_type = MOAS_TYPE_F16;
    cfg.n_ctx_train = 8;
    models[2] = fuzz_tiny_model(&cfg, 13);

    tiny_model_config_default(&cfg);   /* one Q, K, V, output; K/V pooled per scheme */
    cfg.n_ctx_train = SHORT_CTX;
    cfg.kv_sharing = "pooled";
    cfg.rope = cfg.rms_norm = cfg.swiglu = true;   /* and the recent block */
    models[3] = fuzz_tiny_model(&cfg, 14);

    tiny_model_config_default(&cfg);   /* long: MHA and MQA of 2 heads of 16, Q8_0 */
    cfg.n_embd = 32;
    cfg.n_head = 2;
    cfg.n_scheme = 2;
    cfg.scheme_n_kv[0] = 2;
    cfg.scheme_n_kv[1] = 1;
    cfg.router_hidden = 32;
    cfg.n_ff = 1056;
    cfg.n_ctx_train = MAX_CTX;
    cfg.mat_type = MOAS_TYPE_Q8_0;
    cfg.rope = cfg.swiglu = true;      /* SwiGLU's 1,056 hidden units in 33 slices */
    models[4] = fuzz_tiny_model(&cfg, 15);
}

/* ---- operand decoding --------------------------------------------------------- */

/* Mostly valid ids, sometimes just outside the vocabulary or extreme. */
static int32_t pick_token(fuzz_cursor *c, int32_t n_vocab) {
    const uint8_t b = fuzz_u8(c);
    if (b < 240) {
        return b % n_vocab;
    }
    switch (b & 7) {
    case 0: return -1;
    case 1: return n_vocab;
    case 2: return INT32_MIN;
    case 3: return INT32_MAX;
    case 4: return n_vocab + 1;
    case 5: return -n_vocab;
    default: return (int32_t)fuzz_u32(c);
    }
}

/* Mostly in [0, limit], sometimes just past it, negative or extreme. */
static int32_t pick_count(fuzz_cursor *c, int32_t limit) {
    const uint8_t b = fuzz_u8(c);
    if (b < 224) {
        return b % (limit + 2);
    }
    switch (b & 7) {
    case 0: return -1;
    case 1: return INT32_MIN;
    case 2: return INT32_MAX;
    case 3: return limit + 1;
    case 4: return -(int32_t)(b >> 3);
    default: return limit;
    }
}

/* ---- the route callback --------------------------------------------------------- */

#if defined(FUZZ_ROUTED)
static int32_t route_cb(void *user, int32_t pos, int32_t layer, const float *gates,
                        int32_t n_scheme, int32_t proposed) {
    driver *d = user;
    d->cb_calls++;
    FUZZ_CHECK(pos >= d->cb_lo && pos < d->cb_hi);
    FUZZ_CHECK(layer >= 0 && layer < d->n_layer);
    FUZZ_CHECK(gates != NULL && n_scheme == d->n_scheme);
    FUZZ_CHECK(proposed >= 0 && proposed < n_scheme);
    /* a choice from the seed, the position and the layer; outside [0, n_scheme)
     * sometimes, which must keep the proposal */
    const uint32_t x = (uint32_t)d->cb_seed * 2654435761u ^ (uint32_t)pos * 40503u ^
                       (uint32_t)layer * 9973u;
    return (int32_t)(x % (uint32_t)(n_scheme + 2)) - 1;
}

/* The same callback on the reference context, which has no shadow to check against. */
static int32_t ref_route_cb(void *user, int32_t pos, int32_t layer, const float *gates,
                            int32_t n_scheme, int32_t proposed) {
    const int32_t seed = *(const int32_t *)user;
    (void)gates;
    (void)proposed;
    const uint32_t x = (uint32_t)seed * 2654435761u ^ (uint32_t)pos * 40503u ^
                       (uint32_t)layer * 9973u;
    return (int32_t)(x % (uint32_t)(n_scheme + 2)) - 1;
}
#endif

/* ---- snapshots: what a failing call must leave as it was -------------------------- */

typedef struct {
    int32_t n_past;
    bool has_logits;
    size_t kv_used;
    long cb_calls;
} snapshot;

static void snap(driver *d, snapshot *s) {
    const float *l = moas_context_logits(d->ctx);
    s->n_past = moas_context_n_past(d->ctx);
    s->has_logits = l != NULL;
    if (l != NULL) {
        memcpy(d->snap_logits, l, (size_t)d->n_vocab * sizeof *l);
    }
    s->kv_used = moas_context_kv_bytes_used(d->ctx, -1);
    s->cb_calls = d->cb_calls;
    FUZZ_CHECK(moas_context_routes(d->ctx, 0, s->n_past, d->snap_gates, d->snap_schemes,
                                   d->snap_heads) == MOAS_OK);
}

static void expect_unchanged(driver *d, const snapshot *s) {
    const float *l = moas_context_logits(d->ctx);
    const size_t rows = (size_t)s->n_past * d->n_layer;
    FUZZ_CHECK(fuzz_error_replaced());
    FUZZ_CHECK(moas_context_n_past(d->ctx) == s->n_past);
    FUZZ_CHECK((l != NULL) == s->has_logits);
    FUZZ_CHECK(l == NULL || memcmp(l, d->snap_logits, (size_t)d->n_vocab * sizeof *l) == 0);
    FUZZ_CHECK(moas_context_kv_bytes_used(d->ctx, -1) == s->kv_used);
    FUZZ_CHECK(d->cb_calls == s->cb_calls);
    FUZZ_CHECK(moas_context_routes(d->ctx, 0, s->n_past, d->ref_gates, d->ref_schemes,
                                   d->ref_heads) == MOAS_OK);
    FUZZ_CHECK(memcmp(d->ref_gates, d->snap_gates, rows * d->n_scheme * sizeof(float)) == 0);
    FUZZ_CHECK(memcmp(d->ref_schemes, d->snap_schemes, rows * sizeof(int32_t)) == 0);
    FUZZ_CHECK(memcmp(d->ref_heads, d->snap_heads, rows * sizeof(int32_t)) == 0);
}

/* moas_context_set_kv_budget() where the library has it; without FUZZ_ROUTED no
 * budget is ever set, and 0 is the only value asked for. */
#if defined(FUZZ_ROUTED)
#define set_budget moas_context_set_kv_budget
#else
static moas_status set_budget(moas_context *ctx, uint64_t bytes) {
    (void)ctx;
    return bytes == 0 ? MOAS_OK : MOAS_ERR_INVALID_ARG;
}
#endif

/* ---- invariants ---------------------------------------------------------------- */

static void check_shadow(const driver *d) {
    FUZZ_CHECK(moas_context_n_past(d->ctx) == d->n_past);
    FUZZ_CHECK(moas_context_n_ctx(d->ctx) == d->n_ctx);
    if (d->logits == LOGITS_NULL) {
        FUZZ_CHECK(moas_context_logits(d->ctx) == NULL);
    } else if (d->logits == LOGITS_HELD) {
        FUZZ_CHECK(moas_context_logits(d->ctx) != NULL);
    }
}

/* Routes of [pos, pos + n) as read into the given arrays are sane. */
static void check_routes(const driver *d, int32_t n, const float *gates, const int32_t *schemes,
                         const int32_t *heads) {
    int32_t all_heads = 0;
    for (int32_t s = 0; s < d->n_scheme; s++) {
        all_heads += d->n_kv[s];
    }
    for (int32_t r = 0; r < n * d->n_layer; r++) {
        const float *g = gates + (size_t)r * d->n_scheme;
        const int32_t s = schemes[r];
        double sum = 0;
        int32_t best = 0;
        FUZZ_CHECK(s >= 0 && s < d->n_scheme);
        for (int32_t k = 0; k < d->n_scheme; k++) {
            FUZZ_CHECK(g[k] >= 0.0f && g[k] <= 1.0f);
            sum += g[k];
            best = g[k] > g[best] ? k : best;
        }
        FUZZ_CHECK(fabs(sum - 1.0) < 1e-4);
        if (d->routed) {
            FUZZ_CHECK(heads[r] == d->n_kv[s]);
        } else {
            /* mixture: every scheme's heads, or a pooled model's mix of all heads */
            FUZZ_CHECK(s == best && heads[r] == (d->pooled ? d->n_head : all_heads));
        }
    }
}

/* KV bytes from the header's formula, computed from the stored routes. */
static void check_kv_bytes(driver *d) {
    FUZZ_CHECK(moas_context_routes(d->ctx, 0, d->n_past, d->snap_gates, d->snap_schemes,
                                   d->snap_heads) == MOAS_OK);
    size_t total = 0, total_reserved = 0;
    for (int32_t l = 0; l < d->n_layer; l++) {
        size_t want = d->routed ? (size_t)d->n_past * 5 : 0;
        for (int32_t j = 0; j < d->n_past; j++) {
            want += (size_t)d->snap_heads[(size_t)j * d->n_layer + l] * d->head_dim * 2 *
                    d->kv_elem;
        }
        const size_t used = moas_context_kv_bytes_used(d->ctx, l);
        const size_t reserved = moas_context_kv_bytes_reserved(d->ctx, l);
        FUZZ_CHECK(used == want);
        FUZZ_CHECK(used <= reserved);
        total += used;
        total_reserved += reserved;
    }
    FUZZ_CHECK(moas_context_kv_bytes_used(d->ctx, -1) == total);
    FUZZ_CHECK(moas_context_kv_bytes_reserved(d->ctx, -1) == total_reserved);
    /* Right after a token is stored under a budget, use is within it, and truncation
     * returns to such a state. Tokens stored before a lower cap was set may exceed it. */
    if (d->n_past > 0 && d->tok_budget[d->n_past - 1] != 0 && d->budget != 0 &&
        d->tok_budget[d->n_past - 1] <= d->budget) {
        FUZZ_CHECK(total <= d->budget);
    }
}

static bool replayable(const driver *d) {
    for (int32_t j = 0; j < d->n_past; j++) {
        if (d->no_replay[j]) {
            return false;
        }
    }
    return true;
}

/* Replay the history in the reference context and compare everything. */
static void verify(driver *d) {
    check_shadow(d);
    check_kv_bytes(d);
    if (!replayable(d)) {
        return;
    }
    if (d->ref == NULL) {
        moas_context_params p = d->params;
#if defined(FUZZ_ROUTED)
        p.route_fn = NULL;
        p.route_user = NULL;
#endif
        FUZZ_CHECK(moas_context_create(d->model, &p, &d->ref) == MOAS_OK);
    }
    moas_context_reset(d->ref);
#if defined(FUZZ_ROUTED)
    /* the callback and forcing in effect when each token was decoded are not
     * recorded per token; replay only histories made under the current ones */
    if (d->routed) {
        FUZZ_CHECK(moas_context_force_scheme(d->ref, d->forced) == MOAS_OK);
        moas_context_set_route_callback(d->ref, d->cb_seed ? ref_route_cb : NULL, &d->cb_seed);
    }
#endif
    bool budgeted = false;
    for (int32_t j = 0; j < d->n_past; j++) {
        budgeted |= d->tok_budget[j] != 0;
    }
    if (!budgeted) {
        FUZZ_CHECK(set_budget(d->ref, 0) == MOAS_OK);
        FUZZ_CHECK(moas_context_decode_batch(d->ref, d->hist, d->n_past, NULL,
                                             MOAS_LOGITS_LAST) == MOAS_OK);
    } else {
        /* one token at a time, each under the budget it was stored under */
        for (int32_t j = 0; j < d->n_past; j++) {
            FUZZ_CHECK(set_budget(d->ref, d->tok_budget[j]) == MOAS_OK);
            FUZZ_CHECK(moas_context_decode(d->ref, d->hist[j], NULL) == MOAS_OK);
        }
    }
    const float *a = moas_context_logits(d->ctx), *b = moas_context_logits(d->ref);
    if (a != NULL && d->n_past > 0) {
        FUZZ_CHECK(b != NULL && memcmp(a, b, (size_t)d->n_vocab * sizeof *a) == 0);
    }
    const size_t rows = (size_t)d->n_past * d->n_layer;
    FUZZ_CHECK(moas_context_routes(d->ref, 0, d->n_past, d->ref_gates, d->ref_schemes,
                                   d->ref_heads) == MOAS_OK);
    FUZZ_CHECK(memcmp(d->ref_gates, d->snap_gates, rows * d->n_scheme * sizeof(float)) == 0);
    FUZZ_CHECK(memcmp(d->ref_schemes, d->snap_schemes, rows * sizeof(int32_t)) == 0);
    FUZZ_CHECK(memcmp(d->ref_heads, d->snap_heads, rows * sizeof(int32_t)) == 0);
    for (int32_t l = -1; l < d->n_layer; l++) {
        FUZZ_CHECK(moas_context_kv_bytes_used(d->ctx, l) == moas_context_kv_bytes_used(d->ref, l));
    }
}

/* ---- steps ---------------------------------------------------------------------- */

static bool token_ok(const driver *d, int32_t t) {
    return t >= 0 && t < d->n_vocab;
}

/* `st` from a call that stores n tokens: the status the shadow allows. Positions run
 * out at n_ctx; a KV budget runs out when even the cheapest way to store n more
 * tokens would pass it. */
static void check_room_status(const driver *d, moas_status st, bool bad_arg, int64_t n,
                              uint64_t used) {
    bool full = n > d->n_ctx - d->n_past;
    if (d->budget != 0 && !full && n > 0) {
        full = used > d->budget || (uint64_t)n * d->one_token > d->budget - used;
    }
    if (bad_arg && full) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG || st == MOAS_ERR_CONTEXT_FULL);
    } else if (bad_arg) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG);
    } else if (full) {
        FUZZ_CHECK(st == MOAS_ERR_CONTEXT_FULL);
    } else {
        FUZZ_CHECK(st == MOAS_OK);
    }
}

static void stored(driver *d, const int32_t *tokens, int32_t n, logits_state after) {
    for (int32_t i = 0; i < n; i++) {
        d->hist[d->n_past] = tokens[i];
        d->tok_budget[d->n_past] = d->budget;
        d->no_replay[d->n_past] = false;
        d->n_past++;
    }
    if (n > 0) {
        d->logits = after;
    }
}

static void step_decode(driver *d, int32_t token, bool with_buffer) {
    snapshot s;
    snap(d, &s);
    float *out = with_buffer ? d->logits_buf : NULL;
    if (out != NULL) {
        memset(out, 0xAB, (size_t)d->n_vocab * sizeof *out);
    }
    d->cb_lo = d->n_past;
    d->cb_hi = d->n_past + 1;
    fuzz_prime_error();
    const moas_status st = moas_context_decode(d->ctx, token, out);
    check_room_status(d, st, !token_ok(d, token), 1, s.kv_used);
    if (st != MOAS_OK) {
        expect_unchanged(d, &s);
        for (int32_t i = 0; out != NULL && i < d->n_vocab; i++) {
            uint32_t bits;
            memcpy(&bits, &out[i], sizeof bits);
            FUZZ_CHECK(bits == 0xABABABABu);
        }
        return;
    }
    stored(d, &token, 1, LOGITS_HELD);
    check_shadow(d);
    if (d->cb_seed != 0) {
        FUZZ_CHECK(d->cb_calls == s.cb_calls + d->n_layer);
    }
    if (out != NULL) {
        FUZZ_CHECK(memcmp(out, moas_context_logits(d->ctx), (size_t)d->n_vocab * sizeof *out) == 0);
    }
}

static void step_batch(driver *d, fuzz_cursor *c) {
    const uint8_t flags = fuzz_u8(c);
    int32_t n = pick_count(c, d->n_ctx);
    if (n > d->n_ctx + 1) {
        n = d->n_ctx + 1;   /* the caller must own n ids; keep the array small */
    }
    int32_t tokens[MAX_CTX + 1];
    bool bad_token = false;
    for (int32_t i = 0; i < n; i++) {
        tokens[i] = pick_token(c, d->n_vocab);
        bad_token |= !token_ok(d, tokens[i]);
    }
    static const moas_logits whiches[5] = {MOAS_LOGITS_NONE, MOAS_LOGITS_LAST, MOAS_LOGITS_ALL,
                                           (moas_logits)3, (moas_logits)100};
    const moas_logits which = whiches[(flags & 7) % 5];
    const bool null_tokens = (flags & 0x08) && n > 0 && (flags & 0x40);
    const bool null_logits = (flags & 0x10) != 0;
    const int32_t rows = which == MOAS_LOGITS_ALL ? (n > 0 ? n : 0) : 1;
    const size_t n_floats = (size_t)rows * d->n_vocab;
    float *out = null_logits || n_floats == 0 ? NULL : malloc(n_floats * sizeof *out);
    if (out != NULL) {
        memset(out, 0xAB, n_floats * sizeof *out);
    }
    const bool bad_arg = n < 0 || (unsigned)which >= MOAS_LOGITS_COUNT ||
                         (null_tokens && n > 0) ||
                         (which == MOAS_LOGITS_ALL && out == NULL && n > 0) || bad_token;
    snapshot s;
    snap(d, &s);
    d->cb_lo = d->n_past;
    d->cb_hi = d->n_past + (n > 0 ? n : 0);
    fuzz_prime_error();
    const moas_status st =
        moas_context_decode_batch(d->ctx, null_tokens ? NULL : tokens, n, out, which);
    check_room_status(d, st, bad_arg, n, s.kv_used);
    if (st != MOAS_OK) {
        expect_unchanged(d, &s);
    }
    /* the caller's floats: untouched unless the call succeeded and promised them */
    const bool written = st == MOAS_OK && n > 0 && which != MOAS_LOGITS_NONE;
    for (size_t i = 0; out != NULL && !written && i < n_floats; i++) {
        uint32_t bits;
        memcpy(&bits, &out[i], sizeof bits);
        FUZZ_CHECK(bits == 0xABABABABu);
    }
    if (st == MOAS_OK) {
        const int32_t n_before = d->n_past;
        stored(d, tokens, n, which == MOAS_LOGITS_NONE ? LOGITS_EITHER : LOGITS_HELD);
        check_shadow(d);
        if (d->cb_seed != 0) {
            FUZZ_CHECK(d->cb_calls == s.cb_calls + (long)n * d->n_layer);
        }
        if (written && out != NULL) {
            const float *last = out + (size_t)(rows - 1) * d->n_vocab;
            FUZZ_CHECK(memcmp(last, moas_context_logits(d->ctx),
                              (size_t)d->n_vocab * sizeof *last) == 0);
        }
        /* every row of an ALL batch equals decoding that prefix alone */
        if (written && out != NULL && which == MOAS_LOGITS_ALL && n > 1 && replayable(d)) {
            verify(d);   /* creates and fills the reference with the whole history */
            float *ref_rows = malloc(n_floats * sizeof *ref_rows);
            FUZZ_CHECK(ref_rows != NULL);
            FUZZ_CHECK(moas_context_truncate(d->ref, n_before) == MOAS_OK);
            FUZZ_CHECK(moas_context_decode_batch(d->ref, tokens, n, ref_rows, MOAS_LOGITS_ALL) ==
                       MOAS_OK);
            FUZZ_CHECK(memcmp(ref_rows, out, n_floats * sizeof *out) == 0);
            free(ref_rows);
        }
    }
    free(out);
}

static void step_truncate(driver *d, fuzz_cursor *c) {
    const int32_t n_keep = pick_count(c, d->n_past);
    snapshot s;
    snap(d, &s);
    fuzz_prime_error();
    const moas_status st = moas_context_truncate(d->ctx, n_keep);
    if (n_keep < 0 || n_keep > d->n_past) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG);
        expect_unchanged(d, &s);
        return;
    }
    FUZZ_CHECK(st == MOAS_OK);
    d->n_past = n_keep;
    d->logits = LOGITS_NULL;
    check_shadow(d);
}

static void step_routes(driver *d, fuzz_cursor *c) {
    const int32_t pos = pick_count(c, d->n_past);
    const int32_t n_pos = pick_count(c, d->n_past);
    const uint8_t flags = fuzz_u8(c);
    const bool valid = pos >= 0 && n_pos >= 0 && (int64_t)pos + n_pos <= d->n_past;
    /* room for the rows asked, capped by what any valid call could write: a call that
     * writes more than it may is caught by the sanitizer */
    const int32_t cap = n_pos < 0 ? 0 : n_pos > d->n_ctx + 1 ? d->n_ctx + 1 : n_pos;
    const size_t rows = (size_t)cap * d->n_layer;
    float *gates = flags & 1 ? NULL : malloc((rows ? rows : 1) * d->n_scheme * sizeof *gates);
    int32_t *schemes = flags & 2 ? NULL : malloc((rows ? rows : 1) * sizeof *schemes);
    int32_t *heads = flags & 4 ? NULL : malloc((rows ? rows : 1) * sizeof *heads);
    if (gates) memset(gates, 0xAB, rows * d->n_scheme * sizeof *gates);
    if (schemes) memset(schemes, 0xAB, rows * sizeof *schemes);
    if (heads) memset(heads, 0xAB, rows * sizeof *heads);

    snapshot s;
    snap(d, &s);   /* also the full routes, to compare the slice with */
    fuzz_prime_error();
    const moas_status st = moas_context_routes(d->ctx, pos, n_pos, gates, schemes, heads);
    if (!valid) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG);
        expect_unchanged(d, &s);
        for (size_t i = 0; gates && i < rows * d->n_scheme; i++) {
            uint32_t bits;
            memcpy(&bits, &gates[i], sizeof bits);
            FUZZ_CHECK(bits == 0xABABABABu);
        }
        for (size_t i = 0; i < rows; i++) {
            FUZZ_CHECK(!schemes || (uint32_t)schemes[i] == 0xABABABABu);
            FUZZ_CHECK(!heads || (uint32_t)heads[i] == 0xABABABABu);
        }
    } else {
        FUZZ_CHECK(st == MOAS_OK);
        const size_t at = (size_t)pos * d->n_layer;
        if (gates) {
            FUZZ_CHECK(memcmp(gates, d->snap_gates + at * d->n_scheme,
                              rows * d->n_scheme * sizeof *gates) == 0);
        }
        if (schemes) {
            FUZZ_CHECK(memcmp(schemes, d->snap_schemes + at, rows * sizeof *schemes) == 0);
        }
        if (heads) {
            FUZZ_CHECK(memcmp(heads, d->snap_heads + at, rows * sizeof *heads) == 0);
        }
        check_routes(d, d->n_past, d->snap_gates, d->snap_schemes, d->snap_heads);
#if defined(FUZZ_ROUTED)
        /* scheme counts agree with the routes, per layer and in total */
        int32_t counts[TINY_MODEL_MAX_SCHEMES], total[TINY_MODEL_MAX_SCHEMES] = {0};
        for (int32_t l = -1; l < d->n_layer; l++) {
            int32_t want[TINY_MODEL_MAX_SCHEMES] = {0};
            for (int32_t j = 0; j < d->n_past; j++) {
                for (int32_t k = 0; k < d->n_layer; k++) {
                    if (l == -1 || l == k) {
                        want[d->snap_schemes[(size_t)j * d->n_layer + k]]++;
                    }
                }
            }
            FUZZ_CHECK(moas_context_scheme_counts(d->ctx, l, counts) == MOAS_OK);
            FUZZ_CHECK(memcmp(counts, want, (size_t)d->n_scheme * sizeof *counts) == 0);
            for (int32_t k = 0; l >= 0 && k < d->n_scheme; k++) {
                total[k] += counts[k];
            }
        }
        FUZZ_CHECK(moas_context_scheme_counts(d->ctx, -1, counts) == MOAS_OK);
        FUZZ_CHECK(memcmp(counts, total, (size_t)d->n_scheme * sizeof *counts) == 0);
        FUZZ_CHECK(moas_context_scheme_counts(d->ctx, d->n_layer, counts) == MOAS_ERR_INVALID_ARG);
        FUZZ_CHECK(moas_context_scheme_counts(d->ctx, -2, counts) == MOAS_ERR_INVALID_ARG);
#endif
    }
    free(gates);
    free(schemes);
    free(heads);
}

static void step_kv_bytes(driver *d, fuzz_cursor *c) {
    const uint8_t b = fuzz_u8(c);
    int32_t layer;
    if (b < 200) {
        layer = b % (d->n_layer + 1) - 1;
    } else {
        static const int32_t odd[4] = {-2, INT32_MIN, INT32_MAX, 0};
        layer = b & 4 ? d->n_layer : odd[b & 3];
    }
    if (layer < -1 || layer >= d->n_layer) {
        FUZZ_CHECK(moas_context_kv_bytes_used(d->ctx, layer) == 0);
        FUZZ_CHECK(moas_context_kv_bytes_reserved(d->ctx, layer) == 0);
    } else {
        check_kv_bytes(d);
    }
}

static void step_bad_args(driver *d, fuzz_cursor *c) {
    const int32_t one = 0;
    snapshot s;
    snap(d, &s);
    fuzz_prime_error();
    switch (fuzz_u8(c) % 8) {
    case 0:
        FUZZ_CHECK(moas_context_decode(NULL, 0, NULL) == MOAS_ERR_INVALID_ARG);
        break;
    case 1:
        FUZZ_CHECK(moas_context_decode_batch(NULL, &one, 1, NULL, MOAS_LOGITS_LAST) ==
                   MOAS_ERR_INVALID_ARG);
        break;
    case 2:
        FUZZ_CHECK(moas_context_decode_batch(d->ctx, NULL, 1, NULL, MOAS_LOGITS_LAST) ==
                   MOAS_ERR_INVALID_ARG);
        break;
    case 3:
        FUZZ_CHECK(moas_context_decode_batch(d->ctx, &one, 1, NULL, MOAS_LOGITS_ALL) ==
                   MOAS_ERR_INVALID_ARG);
        break;
    case 4:
        FUZZ_CHECK(moas_context_routes(NULL, 0, 0, NULL, NULL, NULL) == MOAS_ERR_INVALID_ARG);
        break;
    case 5:
        FUZZ_CHECK(moas_context_decode_batch(d->ctx, &one, -1, NULL, MOAS_LOGITS_NONE) ==
                   MOAS_ERR_INVALID_ARG);
        break;
    case 6:
#if defined(FUZZ_ROUTED)
        FUZZ_CHECK(moas_context_force_scheme(NULL, -1) == MOAS_ERR_INVALID_ARG);
        FUZZ_CHECK(moas_context_set_kv_budget(NULL, 0) == MOAS_ERR_INVALID_ARG);
        FUZZ_CHECK(moas_context_scheme_counts(d->ctx, -1, NULL) == MOAS_ERR_INVALID_ARG);
#else
        FUZZ_CHECK(moas_context_routes(d->ctx, -1, 0, NULL, NULL, NULL) == MOAS_ERR_INVALID_ARG);
#endif
        break;
    default: {
        /* nothing to store is not an error, whatever `which` asks for, and fits even
         * when the tokens kept from before a lowered KV budget exceed it (corpus:
         * crash-empty-batch-over-budget) */
        FUZZ_CHECK(moas_context_decode_batch(d->ctx, NULL, 0, NULL, MOAS_LOGITS_ALL) == MOAS_OK);
        FUZZ_CHECK(moas_context_n_past(d->ctx) == s.n_past);
        return;
    }
    }
    expect_unchanged(d, &s);
}

#if defined(FUZZ_ROUTED)
static void step_force(driver *d, fuzz_cursor *c) {
    const int32_t v = pick_count(c, d->n_scheme);
    const int32_t scheme = v == INT32_MIN ? v : v - 1;   /* mostly in [-1, n_scheme] */
    snapshot s;
    snap(d, &s);
    fuzz_prime_error();
    const moas_status st = moas_context_force_scheme(d->ctx, scheme);
    const bool valid = scheme >= -1 && scheme < d->n_scheme && (d->routed || scheme == -1);
    FUZZ_CHECK(st == (valid ? MOAS_OK : MOAS_ERR_INVALID_ARG));
    if (st != MOAS_OK) {
        expect_unchanged(d, &s);
        return;
    }
    if (d->forced != scheme) {
        /* the history was made under another forcing: not replayable as a whole */
        for (int32_t j = 0; j < d->n_past; j++) {
            d->no_replay[j] = true;
        }
    }
    d->forced = scheme;
}

static void step_budget(driver *d, fuzz_cursor *c) {
    const uint8_t b = fuzz_u8(c);
    const uint64_t one = d->one_token;
    uint64_t bytes;
    switch (b & 3) {
    case 0: bytes = 0; break;
    case 1: bytes = one * (1 + (b >> 2) % 20) + (b >> 5); break;
    case 2: bytes = one - 1 - (b >> 2) % 4; break;
    default: bytes = b & 4 ? UINT64_MAX : (uint64_t)fuzz_u32(c); break;
    }
    snapshot s;
    snap(d, &s);
    fuzz_prime_error();
    const moas_status st = moas_context_set_kv_budget(d->ctx, bytes);
    FUZZ_CHECK(st == (bytes != 0 && bytes < one ? MOAS_ERR_INVALID_ARG : MOAS_OK));
    if (st != MOAS_OK) {
        expect_unchanged(d, &s);
        return;
    }
    d->budget = bytes;
    FUZZ_CHECK(moas_context_n_past(d->ctx) == s.n_past);   /* stored tokens are kept */
    FUZZ_CHECK(moas_context_kv_bytes_used(d->ctx, -1) == s.kv_used);
}

static void step_callback(driver *d, fuzz_cursor *c) {
    const int32_t seed = fuzz_u8(c);
    if (d->cb_seed != seed && d->routed) {
        for (int32_t j = 0; j < d->n_past; j++) {
            d->no_replay[j] = true;   /* made under another callback: not replayable */
        }
    }
    d->cb_seed = seed;
    moas_context_set_route_callback(d->ctx, seed ? route_cb : NULL, d);
}
#endif

static void step_generate(driver *d) {
    const float *l = moas_context_logits(d->ctx);
    int32_t token = -1;
    if (l == NULL || d->n_past >= d->n_ctx) {
        return;
    }
    FUZZ_CHECK(moas_sampler_sample(d->sampler, l, &token) == MOAS_OK);
    FUZZ_CHECK(token >= 0 && token < d->n_vocab);
    step_decode(d, token, false);
}

/* ---- the program ------------------------------------------------------------------ */

static void driver_free(driver *d) {
    moas_context_free(d->ctx);
    moas_context_free(d->ref);
    moas_sampler_free(d->sampler);
    free(d->logits_buf);
    free(d->snap_logits);
    free(d->snap_gates);
    free(d->snap_schemes);
    free(d->snap_heads);
    free(d->ref_gates);
    free(d->ref_schemes);
    free(d->ref_heads);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_cursor c = {data, size};
    driver d;

    if (models[0] == NULL) {
        init_models();
    }
    memset(&d, 0, sizeof d);
    const uint8_t head = fuzz_u8(&c);
    int model_index = head % 3;
    if ((head & 0x20) && head % 3 == 0) {
        model_index = 3;   /* pooled */
    } else if ((head & 0xC0) == 0xC0 && head % 3 == 1) {
        model_index = 4;   /* long */
    }
    d.model = models[model_index];
    d.pooled = moas_model_kv_sharing(d.model) == MOAS_KV_SHARING_POOLED;
    d.n_head = moas_model_n_head(d.model);
    d.n_vocab = moas_model_n_vocab(d.model);
    d.n_layer = moas_model_n_layer(d.model);
    d.n_scheme = moas_model_n_scheme(d.model);
    d.head_dim = moas_model_head_dim(d.model);
    for (int32_t s = 0; s < d.n_scheme; s++) {
        d.n_kv[s] = moas_model_scheme_n_kv(d.model, s);
    }
    moas_context_params_init(&d.params);
    d.params.n_threads = 1;
    d.params.kv_type = head & 0x04 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
    d.params.kernels = head & 0x08 ? MOAS_KERNELS_REF : MOAS_KERNELS_AUTO;
    d.params.n_ctx = 1 + fuzz_u8(&c) % moas_model_n_ctx_train(d.model);
    d.kv_elem = d.params.kv_type == MOAS_TYPE_F16 ? 2 : 4;
    d.forced = -1;
#if defined(FUZZ_ROUTED)
    if (head & 0x10) {
        d.params.mode = MOAS_MODE_ROUTED;
        d.routed = true;
    }
#endif
    FUZZ_CHECK(moas_context_create(d.model, &d.params, &d.ctx) == MOAS_OK);
    d.n_ctx = moas_context_n_ctx(d.ctx);
    uint64_t cheapest = UINT64_MAX, all = 0;
    for (int32_t s = 0; s < d.n_scheme; s++) {
        const uint64_t bytes = (uint64_t)d.n_kv[s] * (uint64_t)d.head_dim * 2 * d.kv_elem;
        cheapest = bytes < cheapest ? bytes : cheapest;
        all += bytes;
    }
    if (d.pooled) {
        all = (uint64_t)d.n_head * (uint64_t)d.head_dim * 2 * d.kv_elem;
    }
    d.one_token = (uint64_t)d.n_layer * (d.routed ? cheapest + 5 : all);
    FUZZ_CHECK(d.n_ctx == d.params.n_ctx && d.n_ctx <= MAX_CTX);

    const uint8_t smp = fuzz_u8(&c);
    moas_sampler_params sp;
    moas_sampler_params_init(&sp);
    sp.temperature = smp & 1 ? 0.0f : 0.5f + (float)(smp >> 4) / 8.0f;
    sp.top_k = (smp >> 1) & 3;
    sp.top_p = smp & 8 ? 0.75f : 1.0f;
    sp.seed = smp;
    FUZZ_CHECK(moas_sampler_create(&sp, d.n_vocab, &d.sampler) == MOAS_OK);

    const size_t rows = (size_t)MAX_CTX * d.n_layer;
    d.logits_buf = malloc((size_t)d.n_vocab * sizeof(float));
    d.snap_logits = malloc((size_t)d.n_vocab * sizeof(float));
    d.snap_gates = malloc(rows * d.n_scheme * sizeof(float));
    d.snap_schemes = malloc(rows * sizeof(int32_t));
    d.snap_heads = malloc(rows * sizeof(int32_t));
    d.ref_gates = malloc(rows * d.n_scheme * sizeof(float));
    d.ref_schemes = malloc(rows * sizeof(int32_t));
    d.ref_heads = malloc(rows * sizeof(int32_t));
    FUZZ_CHECK(d.logits_buf && d.snap_logits && d.snap_gates && d.snap_schemes &&
               d.snap_heads && d.ref_gates && d.ref_schemes && d.ref_heads);
    check_shadow(&d);

    for (int step = 0; step < MAX_STEPS && c.n > 0; step++) {
        const uint8_t op = fuzz_u8(&c);
        switch ((opcode)(op % OP_COUNT)) {
        case OP_BATCH:
            step_batch(&d, &c);
            break;
        case OP_TRUNCATE:
            step_truncate(&d, &c);
            break;
        case OP_RESET:
            moas_context_reset(d.ctx);
            d.n_past = 0;
            d.logits = LOGITS_NULL;
            check_shadow(&d);
            FUZZ_CHECK(moas_context_kv_bytes_used(d.ctx, -1) == 0);
            break;
        case OP_ROUTES:
            step_routes(&d, &c);
            break;
        case OP_KV_BYTES:
            step_kv_bytes(&d, &c);
            break;
        case OP_VERIFY:
            verify(&d);
            break;
        case OP_BAD_ARGS:
            step_bad_args(&d, &c);
            break;
        case OP_GENERATE:
            step_generate(&d);
            break;
#if defined(FUZZ_ROUTED)
        case OP_FORCE:
            step_force(&d, &c);
            break;
        case OP_BUDGET:
            step_budget(&d, &c);
            break;
        case OP_CALLBACK:
            step_callback(&d, &c);
            break;
#endif
        default: {
            const int32_t token = pick_token(&c, d.n_vocab);
            step_decode(&d, token, (op & 0x80) != 0);
            break;
        }
        }
    }
    verify(&d);
    driver_free(&d);
    return 0;
}
