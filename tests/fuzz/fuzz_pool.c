/*
 * fuzz_pool.c - the input is a program of API calls over up to four contexts of one
 * small KV pool: create a context in the pool, free one, fork one, decode a token or
 * a run of tokens into one, moas_pool_decode over several (each a token or a short run,
 * every `which`), truncate, reset, shift (RoPE models), compact (pooled K/V, routed),
 * force a scheme, install or remove a route callback, save a context's state and load
 * it into another, read the pool's figures, arm an allocation failure for the next
 * call, and calls with bad arguments (NULL, out of range, a context of another pool or
 * mode, a pool of another model).
 *
 * Route callbacks (route_cb) come from moas_context_params.route_fn at creation or
 * moas_context_set_route_callback() later, and a fork inherits its parent's (moas.h).
 * Each returns a pure function of (pos, layer, a seed byte): a scheme in range, -1,
 * n_scheme or beyond (which keep `proposed`), by the seed. One may also, in one layer
 * at one position and every fourth after, make a nested call:
 *   - on a context of the decoding call under way (its own, or another part of the
 *     same moas_pool_decode), decode, decode_batch, truncate, fork, state load,
 *     compact, shift and moas_pool_decode must be refused with MOAS_ERR_BUSY and leave
 *     it as it was, reset and free be no-ops that leave a message;
 *   - on such a context the settings go ahead (THREADING in moas.h): the forced scheme
 *     or callback it has, budget 0 (MOAS_OK), a bad scheme or budget refused with
 *     MOAS_ERR_INVALID_ARG, or a new forced scheme or callback, which the shadow
 *     follows (that context's tokens of the call are then not replayed: which
 *     decisions follow the change depends on the order of rows and layers);
 *   - on a context of the pool the call does not name, decode, truncate, fork (into a
 *     free slot), reset and free go ahead, the shadow following at once (a decode's
 *     or fork's status and pages are those of any against the pages the call under
 *     way left free; its own callback only chooses), and so does a moas_pool_decode
 *     of it (of one token or none) unless the call is itself a moas_pool_decode
 *     (MOAS_ERR_BUSY).
 * Each callback within a decoding call also checks moas_pool_stats (the free pages
 * are the shadow's less the call's reservation, taken before anything ran) and, in a
 * call of one context, `proposed` (the forced scheme, else the largest gate).
 * The callback records each status, whether it left a message and whether a refused
 * call left n_past and the pages as they were; the harness checks them once the
 * decoding call has returned, and that the callbacks were called once per token and
 * layer of each context that has one (unless a setting changed), none when the call
 * failed. With a callback a forced scheme no longer bounds what a routed token
 * reserves: it reserves at the widest (or the steering limit), as the library's
 * call_max_heads does.
 *
 * The shadow keeps each context's history (tokens, the scheme forced for each, the
 * seed of the callback each was decoded under, which tokens a shift, a compaction,
 * steering or a callback's change of a setting made impossible to replay) and a copy
 * of the pool's page bookkeeping: which page each stream of each context holds and how
 * many holders each page has, updated as docs/KV_CACHE.md describes (a call reserves
 * every page its tokens may need at the most they may take, a write into a shared
 * page copies it first, a fork shares full pages and copies the partly written last
 * one, truncate,
 * reset and free give pages back). So every call gets its expected status, including
 * MOAS_ERR_POOL_FULL exactly when the reservation exceeds the free pages. After every
 * step:
 *   - a failing call recorded a new message and changed nothing: in every context of
 *     the pool n_past, the logits (bitwise), the routing records and the KV bytes are
 *     as before, and the pool's free pages too;
 *   - a context the step did not name changed in nothing;
 *   - the pool's figures add up: free pages, n_contexts, bytes_held, bytes_used and
 *     bytes_stored as the shadow computes them, each context's pages and held bytes;
 *     with every context freed, every page is free;
 *   - calls that the header says never allocate (moas_pool_decode, truncate, reset,
 *     state save and load, stats) made no allocation.
 * A VERIFY step, and the end of every program, replays each context whose history a
 * shift, a compaction or steering did not touch, token by token, in a fresh private
 * context of the same model, mode and KV type: every logit the fuzzer was handed for a
 * position (single decodes, LOGITS_LAST and every row of LOGITS_ALL, alone or in a
 * pool call), the context's last logits, its routing records and KV bytes must be
 * bitwise equal, each token decoded under the scheme it was forced to and the
 * callback (choosing alone) it was decoded under, or none. That covers fork,
 * moas_pool_decode, truncate, reset, state load and route callbacks.
 * Shifted and compacted contexts get sanity checks: finite logits, n_past and the
 * routing records as predicted (a shift moves them down, compaction pools exactly the
 * tokens whose heads nest in the target's).
 *
 * Abort callbacks (abort_cb, moas_context_set_abort_callback; a fork inherits its
 * parent's) count the asks of the decoding call under way and say stop at the
 * `stop`-th (1 to 7; 0: never), unless a route callback's nested call has already
 * fired in it (whose effects the shadow follows only for a call that completes);
 * nested calls' asks (a route callback decoding another context) always go on. A call
 * that was told to stop returns MOAS_ERR_ABORTED with a message, its validation and
 * pages having passed (the asks come after the reservation), and is undone: every
 * context of it with tokens holds n_past, KV bytes and routing records as before and no
 * logits, one with none keeps its logits, the rest are untouched, and the pages are
 * as if the reservation had been made and given back (a shared page it copied on
 * write stays copied). A call not told to stop never returns MOAS_ERR_ABORTED, and one
 * that decoded tokens of a context with an abort callback asked it at least once.
 *
 * Every object is made through a counting allocator; at the end of a program nothing
 * may be left.
 *
 * Program layout: byte 0 picks the model (bits 0-1: pooled K/V with RoPE; independent
 * schemes with learned positions; pooled K/V with RoPE and heads of 32; independent
 * with RoPE and heads of 32), the KV type (bits 2-3: F32, F16, Q8_0, F16; Q8_0 on heads
 * of 4 must be refused, and falls back to F32), the mode (bits 4-5: mixture, routed, or
 * each context's own) and the page size (bits 6-7: 1, 2, 4 or 8 heads); byte 1 the
 * pool's pages (3 to 63); byte 2 steering (bits 0-1), bytes past the last whole page
 * (bits 2-7) and, with bit 7, blocks of 3 rows for moas_pool_decode (n_batch 3). Then
 * one opcode byte per step followed by its operands; at most MAX_STEPS steps. Route
 * callbacks: OP_CREATE's flags bit 7 (one that only chooses, seeded from the
 * operands), and OP_FORCE's second operand 240 to 247 (step_route: 240, 242, 244, 246
 * install one, followed by its seed, action, position and layer, and target; the odd
 * ones remove it). Abort callbacks: OP_FORCE's second operand 248 to 251 (step_abort:
 * 248 and 250 install one, followed by its stop % 8; the odd ones remove it).
 */
#include "fuzz.h"


#include <math.h>
#include <string.h>

#define N_MODELS 4
#define MAX_SLOTS 4
#define MAX_CTX 16            /* every model's trained length */
#define MAX_L 2
#define MAX_S 3
#define MAX_V 40
#define MAX_STREAMS (MAX_L * MAX_S)
#define MAX_STREAM_PAGES (MAX_CTX * 4 + 2)
#define MAX_POOL_PAGES 64
#define MAX_RUN 5             /* tokens of one decode run */
#define MAX_STEPS 64
#define MAX_STATE (64 << 10)
#define MAX_VERIFY 6          /* VERIFY steps that replay, besides the one at the end */

typedef enum {
    OP_CREATE,
    OP_FREE,
    OP_FORK,
    OP_DECODE,
    OP_BATCH,
    OP_POOL_DECODE,
    OP_TRUNCATE,
    OP_RESET,
    OP_SHIFT,
    OP_COMPACT,
    OP_SAVE,
    OP_LOAD,
    OP_STATS,
    OP_BAD_ARGS,
    OP_VERIFY,
    OP_FORCE,
    OP_OOM,
    OP_COUNT
} opcode;

static fuzz_counting counts;   /* every object the programs make */
static const moas_allocator allocator = {fuzz_count_alloc, fuzz_count_free, &counts};

/* ---- the fixed models -------------------------------------------------------------- */

static moas_model *models[N_MODELS];

static void init_models(void) {
    tiny_model_config cfg;

    tiny_model_config_default(&cfg);   /* router over [4, 2, 1], pooled K/V, RoPE */
    cfg.n_ctx_train = MAX_CTX;
    cfg.kv_sharing = "pooled";
    cfg.rope = cfg.rms_norm = cfg.swiglu = true;
    models[0] = fuzz_tiny_model(&cfg, 21);

    tiny_model_config_default(&cfg);   /* independent schemes, learned positions */
    cfg.n_ctx_train = MAX_CTX;
    models[1] = fuzz_tiny_model(&cfg, 22);

    tiny_model_config_default(&cfg);   /* pooled K/V, RoPE, heads of 32: Q8_0 K/V */
    cfg.n_ctx_train = MAX_CTX;
    cfg.n_embd = 128;
    cfg.n_ff = 32;
    cfg.kv_sharing = "pooled";
    cfg.rope = true;
    models[2] = fuzz_tiny_model(&cfg, 23);

    tiny_model_config_default(&cfg);   /* independent MHA and MQA of 2 heads of 32, RoPE */
    cfg.n_ctx_train = MAX_CTX;
    cfg.n_embd = 64;
    cfg.n_head = 2;
    cfg.n_ff = 32;
    cfg.n_scheme = 2;
    cfg.scheme_n_kv[0] = 2;
    cfg.scheme_n_kv[1] = 1;
    cfg.rope = cfg.swiglu = true;
    models[3] = fuzz_tiny_model(&cfg, 24);
}

/* ---- the shadow ------------------------------------------------------------------ */

/* What a route callback does (see route_cb): the nested call it makes in one layer at
 * one position and every fourth after, on a context of the decoding call under way or
 * on a context of the pool that the call does not name. */
typedef enum {
    ACT_DECODE,     /* moas_context_decode: MOAS_ERR_BUSY; unrelated: a decode as any
                     * other, against the pages the call under way left free */
    ACT_BATCH,      /* moas_context_decode_batch: MOAS_ERR_BUSY */
    ACT_TRUNCATE,   /* MOAS_ERR_BUSY; unrelated: truncated to half, MOAS_OK */
    ACT_FORK,       /* MOAS_ERR_BUSY, *out NULL; unrelated (with a slot free): a fork
                     * as any other, into that slot */
    ACT_LOAD,       /* moas_context_state_load: MOAS_ERR_BUSY */
    ACT_RESET,      /* a no-op with a message; unrelated: reset */
    ACT_FREE,       /* a no-op with a message; unrelated: freed */
    ACT_POOL,       /* moas_pool_decode naming it: MOAS_ERR_BUSY; unrelated: a part of
                     * no tokens, MOAS_ERR_BUSY within a moas_pool_decode, else MOAS_OK
                     * (seed bit 1: of one token, as ACT_DECODE's) */
    ACT_COMPACT,    /* MOAS_ERR_BUSY */
    ACT_SHIFT,      /* MOAS_ERR_BUSY */
    ACT_FORCE,      /* a setting: the forced scheme it has (MOAS_OK), then n_scheme
                     * (MOAS_ERR_INVALID_ARG); target bit 6: a new one from the seed */
    ACT_BUDGET,     /* a setting: budget 0, which it has (MOAS_OK), then 1 byte
                     * (MOAS_ERR_INVALID_ARG) */
    ACT_SETCB,      /* a setting: the route callback it has, again; target bit 6: the
                     * firing callback, or none (seed bit 0) */
    ACT_NONE        /* and above: only the choice */
} cb_action;

typedef struct {
    uint8_t seed;                       /* the choice: cb_choice(seed, pos, layer) */
    uint8_t act;                        /* a cb_action */
    int32_t pos, layer;                 /* where the action happens: in that layer, at
                                         * pos and every fourth position after */
    uint8_t target;                     /* which context: bit 7, one the call does not
                                         * name (decode, truncate, fork, reset, free,
                                         * pool) if any, else the call's context
                                         * target % n; bit 6: see ACT_FORCE, ACT_SETCB */
} cbspec;

#define MAX_SPECS (MAX_STEPS + 1)       /* one per step at the most */

typedef struct {
    int32_t n;                          /* pages held */
    int32_t ids[MAX_STREAM_PAGES];      /* shadow page ids */
} sstream;

typedef struct {
    bool live;
    moas_context *ctx;
    moas_mode mode;
    int32_t n_ctx;
    int32_t forced;                     /* forced scheme now, -1: none */
    int32_t cb;                         /* route callback now: index in driver.specs,
                                         * -1: none */
    int32_t abort;                      /* abort callback now: index in driver.stops,
                                         * -1: none */
    int32_t limit;                      /* routed: the most heads a token of the call
                                         * under way may take (call_limit) */
    bool has_ws;                        /* known to have its own workspace */

    int32_t n_past;
    int32_t tok[MAX_CTX];
    int8_t forced_at[MAX_CTX];          /* the forcing each token was decoded under */
    int16_t cb_at[MAX_CTX];             /* the seed of the route callback each token was
                                         * decoded under, -1: none */
    bool taint[MAX_CTX];                /* shifted, pooled down or steered: no replay */
    int32_t heads[MAX_CTX][MAX_L];      /* KV heads per token and layer (routes) */
    bool logits;                        /* moas_context_logits() is not NULL */
    bool stale;                         /* held logits are not the last token's */
    bool pos_has[MAX_CTX];
    float pos_logits[MAX_CTX][MAX_V];   /* logits handed out for each position */

    int32_t n_streams;
    sstream st[MAX_STREAMS];

    /* before the step: what a failed or unrelated call must leave */
    int32_t snap_n_past;
    bool snap_has_logits;
    float snap_logits[MAX_V];
    float snap_gates[MAX_CTX * MAX_L * MAX_S];
    int32_t snap_schemes[MAX_CTX * MAX_L], snap_heads[MAX_CTX * MAX_L];
    size_t snap_used;
} sctx;

typedef struct {
    const moas_model *model;
    int32_t V, L, S, H, head_dim;
    int32_t n_kv[MAX_S];
    int32_t widest;
    bool pooled, rope;
    moas_type kv_type;
    int mode_sel;                       /* 0 mixture, 1 routed, 2 per context */
    int32_t P;                          /* page heads */
    size_t head_bytes;
    uint64_t page_bytes;
    float steer_below;
    moas_pool *pool;
    int32_t n_pages;

    /* page bookkeeping */
    int32_t refs[MAX_POOL_PAGES];
    int32_t free_ids[MAX_POOL_PAGES];
    int32_t n_free;

    sctx c[MAX_SLOTS];
    cbspec specs[MAX_SPECS];            /* route callbacks installed, never rewritten
                                         * (forks share them) */
    int n_specs;
    uint8_t stops[MAX_SPECS];           /* abort callbacks installed (their stop), never
                                         * rewritten (forks share them) */
    int n_stops;
    moas_context *ref[2];               /* replay contexts per mode, made on first use */
    moas_pool *other_pool;              /* another pool of the same model */
    moas_context *other_ctx;            /* a context in it */
    moas_context *private_ctx;          /* a context without a pool of the caller's */

    /* the saved state slot */
    uint8_t *state;
    size_t state_size;
    bool state_ok;
    sctx state_src;                     /* the history it holds */

    long arm;                           /* fail allocation number `arm` of the next call */
    long armed_at;
    int n_verify;                       /* VERIFY steps run (a few per program) */
} driver;

static uint8_t state_buf[MAX_STATE], state_tmp[MAX_STATE];

/* The asks of the decoding call under way's abort callbacks (reset by cb_begin). */
static struct {
    long asked;
    bool stopped;                       /* one said stop */
} g_abort;

/* FUZZ_POOL_TRACE=1 in the environment: each call and its status on stderr. */
static int trace = -1;

static void note(const driver *d, const char *what, int slot, moas_status st) {
    if (trace < 0) {
        trace = getenv("FUZZ_POOL_TRACE") != NULL;
    }
    if (trace) {
        fprintf(stderr, "pool: %-12s slot %d: %-22s free %d/%d (asks %ld)\n", what, slot,
                moas_status_name(st), d->n_free, d->n_pages, g_abort.asked);
    }
}

/* ---- shadow pages ------------------------------------------------------------------ */

static int32_t take_page(driver *d) {
    FUZZ_CHECK(d->n_free > 0);
    const int32_t p = d->free_ids[--d->n_free];
    d->refs[p] = 1;
    return p;
}

static void drop_page(driver *d, int32_t p) {
    FUZZ_CHECK(d->refs[p] > 0);
    if (--d->refs[p] == 0) {
        d->free_ids[d->n_free++] = p;
    }
}

static int32_t pages_for(const driver *d, uint32_t heads) {
    return (int32_t)((heads + (uint32_t)d->P - 1) / (uint32_t)d->P);
}

/* Streams: routed, one per layer (ragged); mixture with pooled K/V, one per layer of H
 * heads a token; mixture with independent schemes, one per layer and scheme. */
static int32_t n_streams(const driver *d, moas_mode mode) {
    return mode == MOAS_MODE_ROUTED || d->pooled ? d->L : d->L * d->S;
}

static int32_t stream_max(const driver *d, const sctx *c, int32_t i) {
    if (c->mode == MOAS_MODE_ROUTED) {
        return c->limit;
    }
    return d->pooled ? d->H : d->n_kv[i % d->S];
}

/* Heads stream i holds for the first n tokens. */
static uint32_t stream_heads(const driver *d, const sctx *c, int32_t i, int32_t n) {
    if (c->mode != MOAS_MODE_ROUTED) {
        return (uint32_t)n * (uint32_t)stream_max(d, c, i);
    }
    uint32_t h = 0;
    for (int32_t j = 0; j < n; j++) {
        h += (uint32_t)c->heads[j][i];
    }
    return h;
}

static bool writes_shared(const driver *d, const sstream *s, uint32_t used) {
    const int32_t page = (int32_t)(used / (uint32_t)d->P);
    return used % (uint32_t)d->P != 0 && page < s->n && d->refs[s->ids[page]] > 1;
}

/* Pages a call storing n more tokens of c reserves: every stream's tokens at the most
 * they may take (stream_max), plus a copy of a shared page it would write into; a call
 * of 0 tokens writes nowhere and needs none. */
static uint64_t need_tokens(const driver *d, const sctx *c, int32_t n) {
    uint64_t need = 0;
    for (int32_t i = 0; i < c->n_streams; i++) {
        const uint32_t used = stream_heads(d, c, i, c->n_past);
        const int32_t total = pages_for(d, used + (uint32_t)n * (uint32_t)stream_max(d, c, i));
        need += (uint64_t)(total > c->st[i].n ? total - c->st[i].n : 0) +
                (n > 0 && writes_shared(d, &c->st[i], used) ? 1 : 0);
    }
    return need;
}

/* Pages a moas_pool_decode call of these parts reserves: each part's need_tokens, in
 * the call's order, with the copies made before it: a part that would copy a shared
 * page all of whose other holders copied it earlier in the call holds it alone by its
 * turn and writes in place. */
static uint64_t need_call(driver *d, sctx *const *cs, const int32_t *n, int32_t n_parts) {
    static int32_t refs[MAX_POOL_PAGES];
    memcpy(refs, d->refs, sizeof refs);
    uint64_t need = 0;
    for (int32_t k = 0; k < n_parts; k++) {
        need += need_tokens(d, cs[k], n[k]);
        for (int32_t i = 0; i < cs[k]->n_streams; i++) {
            const sstream *s = &cs[k]->st[i];
            const uint32_t used = stream_heads(d, cs[k], i, cs[k]->n_past);
            if (n[k] > 0 && writes_shared(d, s, used)) {
                const int32_t id = s->ids[used / (uint32_t)d->P];
                need -= refs[id] > 1 ? 0 : 1;   /* counted, but no longer shared */
                refs[id] -= refs[id] > 1 ? 1 : 0;
            }
        }
    }
    return need;
}

static void cow(driver *d, sstream *s, int32_t page) {
    const int32_t copy = take_page(d);
    drop_page(d, s->ids[page]);
    s->ids[page] = copy;
}

static void grow_tokens(driver *d, sctx *c, int32_t n) {
    for (int32_t i = 0; i < c->n_streams; i++) {
        sstream *s = &c->st[i];
        const uint32_t used = stream_heads(d, c, i, c->n_past);
        if (n > 0 && writes_shared(d, s, used)) {
            cow(d, s, (int32_t)(used / (uint32_t)d->P));
        }
        const int32_t total = pages_for(d, used + (uint32_t)n * (uint32_t)stream_max(d, c, i));
        while (s->n < total) {
            FUZZ_CHECK(s->n < MAX_STREAM_PAGES);
            s->ids[s->n++] = take_page(d);
        }
    }
}

/* After a call: each stream keeps the pages its heads need (c->heads and n_past are
 * the new ones). */
static void trim(driver *d, sctx *c) {
    for (int32_t i = 0; i < c->n_streams; i++) {
        sstream *s = &c->st[i];
        const int32_t keep = pages_for(d, stream_heads(d, c, i, c->n_past));
        while (s->n > keep) {
            drop_page(d, s->ids[--s->n]);
        }
    }
}

static void drop_all(driver *d, sctx *c) {
    for (int32_t i = 0; i < c->n_streams; i++) {
        while (c->st[i].n > 0) {
            drop_page(d, c->st[i].ids[--c->st[i].n]);
        }
    }
}

/* The shared pages of page indices [from[i], to[i]) of each stream (from[i] -1: none
 * of stream i's): those a shift or compaction writes into (the heads it rewrites, up to
 * the stream's new end; the pages past that end are only read, then given back). */
static uint64_t need_unshare(const driver *d, const sctx *c, const int32_t *from,
                             const int32_t *to) {
    uint64_t need = 0;
    for (int32_t i = 0; i < c->n_streams; i++) {
        for (int32_t p = from[i] < 0 ? c->st[i].n : from[i]; p < to[i] && p < c->st[i].n; p++) {
            need += d->refs[c->st[i].ids[p]] > 1 ? 1 : 0;
        }
    }
    return need;
}

static void unshare(driver *d, sctx *c, const int32_t *from, const int32_t *to) {
    for (int32_t i = 0; i < c->n_streams; i++) {
        for (int32_t p = from[i] < 0 ? c->st[i].n : from[i]; p < to[i] && p < c->st[i].n; p++) {
            if (d->refs[c->st[i].ids[p]] > 1) {
                cow(d, &c->st[i], p);
            }
        }
    }
}

/* The page index past the one holding head `end - 1`: to[] for a rewrite ending there. */
static int32_t pages_to(const driver *d, uint32_t end) {
    return (int32_t)((end + (uint32_t)d->P - 1) / (uint32_t)d->P);
}

static bool shares_pages(const driver *d) {
    for (int32_t p = 0; p < d->n_pages; p++) {
        if (d->refs[p] > 1) {
            return true;
        }
    }
    return false;
}

/* ---- operands -------------------------------------------------------------------- */

/* A live slot near the one the byte names, or -1 when none is live. */
static int pick_live(driver *d, uint8_t b) {
    for (int k = 0; k < MAX_SLOTS; k++) {
        const int s = (b + k) % MAX_SLOTS;
        if (d->c[s].live) {
            return s;
        }
    }
    return -1;
}

static int32_t pick_token(fuzz_cursor *cur, int32_t n_vocab) {
    const uint8_t b = fuzz_u8(cur);
    if (b < 248) {
        return b % n_vocab;
    }
    static const int32_t odd[4] = {-1, MAX_V, INT32_MIN, INT32_MAX};
    return odd[b & 3];
}

/* Mostly in [0, limit], sometimes just past it, negative or extreme. */
static int32_t pick_count(fuzz_cursor *cur, int32_t limit) {
    const uint8_t b = fuzz_u8(cur);
    if (b < 232) {
        return b % (limit + 1);
    }
    static const int32_t odd[4] = {-1, INT32_MIN, INT32_MAX, 0};
    return (b & 4) ? limit + 1 : odd[b & 3];
}

static bool bad_token(const driver *d, int32_t t) {
    return t < 0 || t >= d->V;
}

/* ---- route callbacks ------------------------------------------------------------ */

/* The scheme a callback of seed `seed` returns for (pos, layer): a pure function of
 * them (and n_scheme, the model's), so that a replay with the same seed chooses the
 * same. By seed >> 6: always in range; always -1 (keeps `proposed`); mixed (in range,
 * -1, n_scheme, INT32_MAX, INT32_MIN); in range in layer 0 only, past n_scheme in the
 * others. */
static int32_t cb_choice(uint8_t seed, int32_t pos, int32_t layer, int32_t n_scheme) {
    uint32_t h = (uint32_t)seed * 0x9E3779B1u ^ (uint32_t)pos * 0x85EBCA77u ^
                 (uint32_t)layer * 0xC2B2AE3Du;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    const int32_t in = (int32_t)((h >> 4) % (uint32_t)n_scheme);
    switch (seed >> 6) {
    case 0:
        return in;
    case 1:
        return -1;
    case 2:
        switch (h % 8) {
        case 4: return -1;
        case 5: return n_scheme;
        case 6: return INT32_MAX;
        case 7: return INT32_MIN;
        default: return in;
        }
    default:
        return layer == 0 ? in : n_scheme + (int32_t)(h % 3);
    }
}

#define MAX_FIRES 8

/* A nested call a callback made, checked once the decoding call has returned. */
typedef struct {
    int act;                            /* a cb_action */
    int slot;                           /* the context it named */
    bool unrelated;                     /* one the decoding call does not name */
    moas_status st, want;               /* its status, and the expected one */
    bool msg;                           /* it left a new message */
    bool same;                          /* n_past and pages as before it (and a refused
                                         * fork's *out NULL) */
    int32_t n_keep;                     /* an unrelated truncate's */
} cb_fire;

/* The decoding call under way, for the callbacks (replays have none: active false). */
static struct {
    driver *d;
    bool active;
    bool pool;                          /* a moas_pool_decode */
    int n_call;
    int slots[MAX_SLOTS];               /* the contexts it names */
    unsigned in_call;                   /* as a mask */
    unsigned gone;                      /* unrelated contexts a callback freed */
    long n_invoked;                     /* callback calls (not those of a nested call) */
    long nested_allocs;                 /* allocations the nested calls made */
    unsigned changed;                   /* contexts of the call whose forcing or
                                         * callback a callback changed: their tokens of
                                         * the call are not replayed (which decisions
                                         * follow the change depends on the order of
                                         * rows and layers) */
    int32_t n_tokens[MAX_SLOTS];        /* each context's tokens in the call */
    bool grown;                         /* the shadow holds the call's reservation */
    unsigned touched;                   /* unrelated contexts the nested calls changed */
    int depth;
    int n_fires;
    cb_fire fires[MAX_FIRES];
} g_cb;

/* For the replays: a callback of every seed that only chooses. */
static cbspec replay_specs[256];

static void cb_act(const cbspec *sp);
static void cb_stats(void);

static int32_t route_cb(void *user, int32_t pos, int32_t layer, const float *gates,
                        int32_t n_scheme, int32_t proposed) {
    const cbspec *sp = (const cbspec *)user;
    FUZZ_CHECK(sp != NULL && n_scheme >= 1 && n_scheme <= MAX_S);
    FUZZ_CHECK(pos >= 0 && pos < MAX_CTX && layer >= 0 && layer < MAX_L);
    FUZZ_CHECK(proposed >= 0 && proposed < n_scheme);
    for (int32_t s = 0; s < n_scheme; s++) {
        FUZZ_CHECK(isfinite(gates[s]) && gates[s] >= 0.0f);
    }
    g_cb.n_invoked += g_cb.depth == 0;
    if (g_cb.active && g_cb.depth == 0) {
        cb_stats();
        if (g_cb.n_call == 1) {
            /* the one context of the call: `proposed` is its forcing (as a callback
             * may have changed it), else the largest gate, the first of equals */
            int32_t best = 0;
            for (int32_t s = 1; s < n_scheme; s++) {
                best = gates[s] > gates[best] ? s : best;
            }
            const int32_t forced = g_cb.d->c[g_cb.slots[0]].forced;
            FUZZ_CHECK(proposed == (forced >= 0 ? forced : best));
        }
    }
    if (g_cb.active && g_cb.depth == 0 && sp->act < ACT_NONE && pos >= sp->pos &&
        (pos - sp->pos) % 4 == 0 && layer == sp->layer && g_cb.n_fires < MAX_FIRES) {
        g_cb.depth++;
        cb_act(sp);
        g_cb.depth--;
    }
    return cb_choice(sp->seed, pos, layer, n_scheme);
}

static int32_t abort_cb(void *user) {
    const uint8_t *stop = (const uint8_t *)user;
    FUZZ_CHECK(stop != NULL);
    if (!g_cb.active || g_cb.depth > 0) {
        return 0;   /* a replay, or a route callback's nested decode: it goes on */
    }
    FUZZ_CHECK(!g_abort.stopped);   /* the call ends at the stop: asked no more */
    g_abort.asked++;
    /* not once a nested call fired: the shadow follows those only for a call that
     * completes (cb_check) */
    if (*stop != 0 && g_abort.asked >= *stop && g_cb.n_fires == 0 && g_cb.changed == 0) {
        g_abort.stopped = true;
        return 1;
    }
    return 0;
}

/* ---- allocation failures -------------------------------------------------------- */

static void arm(driver *d) {
    d->armed_at = counts.n_calls;
    counts.fail_at = d->arm > 0 ? counts.n_calls + d->arm : 0;
}

static void disarm(driver *d) {
    counts.fail_at = 0;
    d->arm = 0;
}

/* ---- snapshots and checks ----------------------------------------------------------- */

static void read_routes(const driver *d, const sctx *c, float *gates, int32_t *schemes,
                        int32_t *heads) {
    FUZZ_CHECK(moas_context_routes(c->ctx, 0, moas_context_n_past(c->ctx), gates, schemes,
                                   heads) == MOAS_OK);
    (void)d;
}

static void snap_all(driver *d) {
    for (int s = 0; s < MAX_SLOTS; s++) {
        sctx *c = &d->c[s];
        if (!c->live) {
            continue;
        }
        const float *l = moas_context_logits(c->ctx);
        c->snap_n_past = moas_context_n_past(c->ctx);
        c->snap_has_logits = l != NULL;
        if (l != NULL) {
            memcpy(c->snap_logits, l, (size_t)d->V * sizeof *l);
        }
        c->snap_used = moas_context_kv_bytes_used(c->ctx, -1);
        read_routes(d, c, c->snap_gates, c->snap_schemes, c->snap_heads);
    }
}

/* The context is as it was before the step. */
static void expect_same(const driver *d, const sctx *c) {
    static float gates[MAX_CTX * MAX_L * MAX_S];
    static int32_t schemes[MAX_CTX * MAX_L], heads[MAX_CTX * MAX_L];
    const float *l = moas_context_logits(c->ctx);
    const size_t rows = (size_t)c->snap_n_past * (size_t)d->L;
    FUZZ_CHECK(moas_context_n_past(c->ctx) == c->snap_n_past);
    FUZZ_CHECK((l != NULL) == c->snap_has_logits);
    FUZZ_CHECK(l == NULL || memcmp(l, c->snap_logits, (size_t)d->V * sizeof *l) == 0);
    FUZZ_CHECK(moas_context_kv_bytes_used(c->ctx, -1) == c->snap_used);
    read_routes(d, c, gates, schemes, heads);
    FUZZ_CHECK(memcmp(gates, c->snap_gates, rows * (size_t)d->S * sizeof *gates) == 0);
    FUZZ_CHECK(memcmp(schemes, c->snap_schemes, rows * sizeof *schemes) == 0);
    FUZZ_CHECK(memcmp(heads, c->snap_heads, rows * sizeof *heads) == 0);
}

/* Every context but `except` (a mask of slots) is as before the step. */
static void expect_others_same(const driver *d, unsigned except) {
    for (int s = 0; s < MAX_SLOTS; s++) {
        if (d->c[s].live && !(except & (1u << s))) {
            expect_same(d, &d->c[s]);
        }
    }
}

/* A failed call: a new message, nothing changed anywhere, no block left over
 * (live_before -1: the call may have made the context's own workspace, which a
 * context in a caller's pool gets with its first own decode, compaction or shift
 * before the pages are reserved, and keeps). */
static void expect_failed(const driver *d, long live_before) {
    FUZZ_CHECK(fuzz_error_replaced());
    expect_others_same(d, 0);
    FUZZ_CHECK(live_before < 0 || counts.live == live_before);
}

/* After a call that changed c: take its new KV heads from its routes, and check them
 * against the mode. */
static void take_heads(const driver *d, sctx *c) {
    static int32_t schemes[MAX_CTX * MAX_L], heads[MAX_CTX * MAX_L];
    FUZZ_CHECK(moas_context_n_past(c->ctx) == c->n_past);
    read_routes(d, c, NULL, schemes, heads);
    for (int32_t j = 0; j < c->n_past; j++) {
        for (int32_t l = 0; l < d->L; l++) {
            const int32_t s = schemes[j * d->L + l], h = heads[j * d->L + l];
            FUZZ_CHECK(s >= 0 && s < d->S);
            if (c->mode == MOAS_MODE_ROUTED) {
                FUZZ_CHECK(h == d->n_kv[s]);
            }
            c->heads[j][l] = h;
        }
    }
}

static void check_logits_finite(const driver *d, const sctx *c) {
    const float *l = moas_context_logits(c->ctx);
    for (int32_t v = 0; l != NULL && v < d->V; v++) {
        FUZZ_CHECK(isfinite(l[v]));
    }
}

/* The pool's figures and every context's pages against the shadow. */
static void check_pool(driver *d) {
    moas_pool_info info;
    memset(&info, 0xAB, sizeof info);
    info.size = sizeof info;
    FUZZ_CHECK(moas_pool_stats(d->pool, &info) == MOAS_OK);
    FUZZ_CHECK(info.size == sizeof info);
    FUZZ_CHECK(info.page_heads == d->P);
    FUZZ_CHECK(info.page_bytes == d->page_bytes);
    FUZZ_CHECK(info.n_pages == d->n_pages);
    FUZZ_CHECK(info.pages_free == d->n_free);
    FUZZ_CHECK(info.pages_free >= 0 && info.pages_free <= info.n_pages);
    FUZZ_CHECK(info.bytes_capacity == (uint64_t)info.n_pages * info.page_bytes);
    FUZZ_CHECK(info.bytes_held == (uint64_t)(info.n_pages - info.pages_free) * info.page_bytes);
    FUZZ_CHECK(info.bytes_held <= info.bytes_capacity);
    int32_t n_live = 0;
    uint64_t used = 0, stored = 0, held_sum = 0;
    for (int s = 0; s < MAX_SLOTS; s++) {
        sctx *c = &d->c[s];
        if (!c->live) {
            continue;
        }
        n_live++;
        FUZZ_CHECK(moas_context_n_past(c->ctx) == c->n_past);
        FUZZ_CHECK((moas_context_logits(c->ctx) != NULL) == c->logits);
        int32_t pages = 0;
        for (int32_t i = 0; i < c->n_streams; i++) {
            FUZZ_CHECK(c->st[i].n == pages_for(d, stream_heads(d, c, i, c->n_past)));
            pages += c->st[i].n;
            stored += (uint64_t)stream_heads(d, c, i, c->n_past) * 2 * d->head_bytes;
        }
        FUZZ_CHECK(moas_context_kv_pages(c->ctx) == pages);
        FUZZ_CHECK(moas_context_kv_bytes_held(c->ctx) == (size_t)pages * d->page_bytes);
        held_sum += (uint64_t)pages * d->page_bytes;
        /* KV bytes from the header's formula */
        uint64_t want = 0;
        for (int32_t i = 0; i < c->n_streams; i++) {
            want += (uint64_t)stream_heads(d, c, i, c->n_past) * 2 * d->head_bytes;
        }
        want += c->mode == MOAS_MODE_ROUTED ? (uint64_t)c->n_past * d->L * 5 : 0;
        FUZZ_CHECK(moas_context_kv_bytes_used(c->ctx, -1) == want);
        used += want;
    }
    FUZZ_CHECK(info.n_contexts == n_live);
    FUZZ_CHECK(info.bytes_used == used);
    FUZZ_CHECK(info.bytes_stored == stored);
    /* stored K/V sit in held pages; a page shared by forks is held once and stored
     * in each holder, so the pool's held bytes bound them only without sharing */
    FUZZ_CHECK(info.bytes_stored <= held_sum);
    if (!shares_pages(d)) {
        FUZZ_CHECK(info.bytes_stored <= info.bytes_held);
        FUZZ_CHECK(held_sum == info.bytes_held);
    }
    if (n_live == 0) {
        FUZZ_CHECK(info.pages_free == info.n_pages && info.bytes_used == 0);
    }
}

/* ---- the replay ---------------------------------------------------------------- */

static bool replayable(const sctx *c) {
    for (int32_t j = 0; j < c->n_past; j++) {
        if (c->taint[j]) {
            return false;
        }
    }
    return true;
}

static void verify_one(driver *d, sctx *c) {
    check_logits_finite(d, c);
    if (!replayable(c)) {
        return;
    }
    const int m = c->mode == MOAS_MODE_ROUTED;
    if (d->ref[m] == NULL) {
        moas_context_params p;
        moas_context_params_init(&p);
        p.mode = c->mode;
        p.kv_type = d->kv_type;
        p.n_threads = 1;
        p.allocator = &allocator;
        FUZZ_CHECK(moas_context_create(d->model, &p, &d->ref[m]) == MOAS_OK);
    }
    moas_context *ref = d->ref[m];
    moas_context_reset(ref);
    for (int32_t j = 0; j < c->n_past; j++) {
        if (c->mode == MOAS_MODE_ROUTED) {
            FUZZ_CHECK(moas_context_force_scheme(ref, c->forced_at[j]) == MOAS_OK);
        }
        /* the callback the token was decoded under, choosing alone */
        moas_context_set_route_callback(ref, c->cb_at[j] >= 0 ? route_cb : NULL,
                                        c->cb_at[j] >= 0 ? &replay_specs[c->cb_at[j]] : NULL);
        FUZZ_CHECK(moas_context_decode(ref, c->tok[j], NULL) == MOAS_OK);
        if (c->pos_has[j]) {
            FUZZ_CHECK(memcmp(moas_context_logits(ref), c->pos_logits[j],
                              (size_t)d->V * sizeof(float)) == 0);
        }
    }
    moas_context_set_route_callback(ref, NULL, NULL);
    const float *l = moas_context_logits(c->ctx);
    if (l != NULL && !c->stale) {
        FUZZ_CHECK(c->n_past > 0);
        FUZZ_CHECK(memcmp(l, moas_context_logits(ref), (size_t)d->V * sizeof *l) == 0);
    }
    static float ga[MAX_CTX * MAX_L * MAX_S], gb[MAX_CTX * MAX_L * MAX_S];
    static int32_t sa[MAX_CTX * MAX_L], sb[MAX_CTX * MAX_L], ha[MAX_CTX * MAX_L],
        hb[MAX_CTX * MAX_L];
    const size_t rows = (size_t)c->n_past * (size_t)d->L;
    FUZZ_CHECK(moas_context_routes(c->ctx, 0, c->n_past, ga, sa, ha) == MOAS_OK);
    FUZZ_CHECK(moas_context_routes(ref, 0, c->n_past, gb, sb, hb) == MOAS_OK);
    FUZZ_CHECK(memcmp(ga, gb, rows * (size_t)d->S * sizeof *ga) == 0);
    FUZZ_CHECK(memcmp(sa, sb, rows * sizeof *sa) == 0);
    FUZZ_CHECK(memcmp(ha, hb, rows * sizeof *ha) == 0);
    FUZZ_CHECK(moas_context_kv_bytes_used(c->ctx, -1) == moas_context_kv_bytes_used(ref, -1));
}

static void verify(driver *d) {
    for (int s = 0; s < MAX_SLOTS; s++) {
        if (d->c[s].live) {
            verify_one(d, &d->c[s]);
        }
    }
}

/* ---- steps --------------------------------------------------------------------- */

/* Whether tokens decoded now in routed mode may be steered (docs/KV_CACHE.md, "When the
 * pool fills"): the fraction of free pages, before the call reserves, below
 * steer_below. */
static bool steering(const driver *d, const sctx *c) {
    return c->mode == MOAS_MODE_ROUTED && d->steer_below > 0.0f &&
           (double)d->n_free / (double)d->n_pages < (double)d->steer_below;
}

/* Before a call reserves: the most heads a routed token of c may take in it, which
 * its reservation counts (the library's call_max_heads): the widest scheme's, or the
 * forced scheme's when no route callback is set (a callback may pick any scheme, so
 * with one a forced scheme reserves at the widest), or the steering limit below
 * steer_below of free pages, cheapest + (widest - cheapest) free / steer_below. */
static void call_limit(const driver *d, sctx *c) {
    int32_t heads = d->widest, cheapest = d->widest;
    for (int32_t s = 0; s < d->S; s++) {
        cheapest = d->n_kv[s] < cheapest ? d->n_kv[s] : cheapest;
    }
    if (c->forced >= 0 && c->cb < 0 && d->n_kv[c->forced] < heads) {
        heads = d->n_kv[c->forced];
    }
    if (steering(d, c)) {
        const double free_frac = (double)d->n_free / (double)d->n_pages;
        const int32_t steer = cheapest + (int32_t)((d->widest - cheapest) * free_frac /
                                                   d->steer_below);
        heads = steer < heads ? steer : heads;
    }
    c->limit = heads;
}

/* The shadow of n tokens stored at the end of c, the logits handed out for them. */
static void record_tokens(driver *d, sctx *c, const int32_t *tokens, int32_t n,
                          moas_logits which, const float *out, bool steered) {
    const int32_t at = c->n_past;
    for (int32_t i = 0; i < n; i++) {
        c->tok[at + i] = tokens[i];
        c->forced_at[at + i] = (int8_t)c->forced;
        c->cb_at[at + i] = (int16_t)(c->cb >= 0 ? d->specs[c->cb].seed : -1);
        c->taint[at + i] = steered;
        c->pos_has[at + i] = false;
        if (which == MOAS_LOGITS_ALL) {
            memcpy(c->pos_logits[at + i], out + (size_t)i * d->V, (size_t)d->V * sizeof *out);
            c->pos_has[at + i] = true;
        }
    }
    if (n > 0) {
        c->logits = which != MOAS_LOGITS_NONE;
        c->stale = false;
    }
    c->n_past += n;
    if (n > 0 && which == MOAS_LOGITS_LAST) {
        memcpy(c->pos_logits[c->n_past - 1], moas_context_logits(c->ctx),
               (size_t)d->V * sizeof(float));
        c->pos_has[c->n_past - 1] = true;
        if (out != NULL) {
            FUZZ_CHECK(memcmp(out, moas_context_logits(c->ctx), (size_t)d->V * sizeof *out) == 0);
        }
    }
    if (n > 0 && which == MOAS_LOGITS_ALL) {
        FUZZ_CHECK(memcmp(out + (size_t)(n - 1) * d->V, moas_context_logits(c->ctx),
                          (size_t)d->V * sizeof *out) == 0);
    }
}

static void init_slot(driver *d, sctx *c, moas_context *ctx, moas_mode mode, int32_t n_ctx) {
    memset(c, 0, sizeof *c);
    c->live = true;
    c->ctx = ctx;
    c->mode = mode;
    c->n_ctx = n_ctx;
    c->forced = -1;
    c->cb = -1;
    c->abort = -1;
    c->n_streams = n_streams(d, mode);
}

static void step_create(driver *d, fuzz_cursor *cur) {
    const uint8_t b = fuzz_u8(cur), flags = fuzz_u8(cur);
    int slot = -1;
    for (int s = 0; s < MAX_SLOTS && slot < 0; s++) {
        slot = d->c[s].live ? -1 : s;
    }
    moas_context_params p;
    moas_context_params_init(&p);
    p.n_ctx = b < 240 ? b % (MAX_CTX + 1) : (b & 1) ? MAX_CTX + 1 : -1;
    p.mode = d->mode_sel == 2 ? (int32_t)(flags & 1) : d->mode_sel;
    p.kv_type = flags & 2 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;   /* the pool's type applies */
    p.n_threads = 1;
    p.allocator = &allocator;
    p.pool = d->pool;
    p.n_batch = (flags >> 2) & 3;   /* blocks of 1 to 3 tokens, or 0: the default */
    if (slot < 0) {
        return;
    }
    int32_t cb = -1;
    if (flags & 0x80) {   /* a route callback from the start, one that only chooses */
        cb = d->n_specs++;
        FUZZ_CHECK(cb < MAX_SPECS);
        d->specs[cb] = (cbspec){(uint8_t)(b * 7u + flags), ACT_NONE, 0, 0, 0};
        p.route_fn = route_cb;
        p.route_user = &d->specs[cb];
    }
    const bool valid = p.n_ctx >= 0 && p.n_ctx <= MAX_CTX;
    const long live_before = counts.live;
    moas_context *ctx = (moas_context *)&ctx;   /* must become NULL on failure */
    fuzz_prime_error();
    arm(d);
    const bool oom_possible = d->arm > 0;
    const moas_status st = moas_context_create(d->model, &p, &ctx);
    disarm(d);
    note(d, "create", slot, st);
    if (!valid) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG && ctx == NULL);
        expect_failed(d, live_before);
        return;
    }
    if (st == MOAS_ERR_NO_MEMORY && oom_possible) {
        FUZZ_CHECK(ctx == NULL);
        expect_failed(d, live_before);
        return;
    }
    FUZZ_CHECK(st == MOAS_OK && ctx != NULL);
    init_slot(d, &d->c[slot], ctx, (moas_mode)p.mode, p.n_ctx == 0 ? MAX_CTX : p.n_ctx);
    d->c[slot].cb = cb;
    FUZZ_CHECK(moas_context_n_ctx(ctx) == d->c[slot].n_ctx);
    FUZZ_CHECK(moas_context_mode(ctx) == (moas_mode)p.mode);
    FUZZ_CHECK(moas_context_logits(ctx) == NULL && moas_context_kv_pages(ctx) == 0);
    expect_others_same(d, 1u << slot);
}

static void step_free(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    moas_context_free(c->ctx);
    drop_all(d, c);
    c->live = false;
    expect_others_same(d, 1u << slot);
}

/* Pages a fork of c copies: the partly written last page of each stream. */
static uint64_t fork_copies(const driver *d, const sctx *c) {
    uint64_t copies = 0;
    for (int32_t i = 0; i < c->n_streams; i++) {
        copies += stream_heads(d, c, i, c->n_past) % (uint32_t)d->P != 0;
    }
    return copies;
}

/* The shadow of a fork of c into slot k: it shares the full pages, copies the last. */
static void shadow_fork(driver *d, const sctx *c, sctx *k, moas_context *out) {
    *k = *c;   /* history, settings (forcing, route callback), logits */
    k->ctx = out;
    for (int32_t i = 0; i < c->n_streams; i++) {
        const uint32_t heads = stream_heads(d, c, i, c->n_past);
        const int32_t full = (int32_t)(heads / (uint32_t)d->P);
        for (int32_t p = 0; p < full; p++) {
            d->refs[c->st[i].ids[p]]++;
        }
        k->st[i].n = full;
        if (heads % (uint32_t)d->P != 0) {
            k->st[i].ids[k->st[i].n++] = take_page(d);
        }
    }
}

static void step_fork(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    int child = -1;
    for (int s = 0; s < MAX_SLOTS && child < 0; s++) {
        child = d->c[s].live ? -1 : s;
    }
    if (slot < 0 || child < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    const uint64_t copies = fork_copies(d, c);
    const long live_before = counts.live;
    moas_context *out = (moas_context *)&out;
    fuzz_prime_error();
    arm(d);
    const moas_status st = moas_context_fork(c->ctx, &out);
    note(d, "fork", slot, st);
    const bool oom_possible = d->arm > 0;
    disarm(d);
    if (st != MOAS_OK) {
        FUZZ_CHECK(out == NULL);
        FUZZ_CHECK((st == MOAS_ERR_POOL_FULL && copies > (uint64_t)d->n_free) ||
                   (st == MOAS_ERR_NO_MEMORY && oom_possible));
        expect_failed(d, live_before);
        return;
    }
    FUZZ_CHECK(copies <= (uint64_t)d->n_free);
    sctx *k = &d->c[child];
    shadow_fork(d, c, k, out);
    FUZZ_CHECK(moas_context_n_ctx(out) == c->n_ctx && moas_context_mode(out) == c->mode);
    expect_same(d, c);
    /* the child holds what the parent does */
    k->snap_used = c->snap_used;
    expect_same(d, k);
    expect_others_same(d, (1u << slot) | (1u << child));
}

/* ---- the callbacks' nested calls ------------------------------------------------ */

/* The shadow of the decoding call's reservation, taken once (before a nested call on
 * another context of the pool, or after the call). */
static void cb_grow(driver *d) {
    if (g_cb.grown) {
        return;
    }
    g_cb.grown = true;
    for (int i = 0; i < g_cb.n_call; i++) {
        grow_tokens(d, &d->c[g_cb.slots[i]], g_cb.n_tokens[i]);
    }
}

/* A callback decodes a token into a context the decoding call does not name, by
 * moas_context_decode or (via_pool) a moas_pool_decode of it alone: it goes ahead as
 * any decode would, against the pages the call under way left free; its own callback,
 * if any, only chooses (depth 1). The shadow follows at once. */
static void cb_nested_decode(driver *d, cb_fire *f, sctx *c, int32_t token, bool via_pool) {
    const bool full = c->n_past >= c->n_ctx;
    call_limit(d, c);
    const uint64_t need = full ? 0 : need_tokens(d, c, 1);
    const bool steered = steering(d, c);
    f->want = full ? MOAS_ERR_CONTEXT_FULL
                   : need > (uint64_t)d->n_free ? MOAS_ERR_POOL_FULL : MOAS_OK;
    const long fail_at = counts.fail_at, calls = counts.n_calls;
    const bool had_ws = c->has_ws;
    counts.fail_at = 0;   /* an armed failure is the decoding call's */
    fuzz_prime_error();
    if (via_pool) {
        const moas_pool_seq q = {c->ctx, &token, 1, MOAS_LOGITS_LAST, NULL};
        f->st = moas_pool_decode(d->pool, &q, 1);
    } else {
        f->st = moas_context_decode(c->ctx, token, NULL);
    }
    f->msg = f->st == MOAS_OK || fuzz_error_replaced();
    f->same = true;
    counts.fail_at = fail_at;
    g_cb.nested_allocs += counts.n_calls - calls;
    FUZZ_CHECK((!had_ws && !via_pool) || counts.n_calls == calls);   /* never per token */
    if (!full && !via_pool) {
        c->has_ws = true;   /* made before the pages are reserved */
    }
    if (f->st != MOAS_OK || f->want != MOAS_OK) {
        return;   /* unchanged: checked with the contexts the step did not name */
    }
    grow_tokens(d, c, 1);
    record_tokens(d, c, &token, 1, MOAS_LOGITS_LAST, NULL, steered);
    take_heads(d, c);
    trim(d, c);
    g_cb.touched |= 1u << f->slot;
}

/* Within a decoding call (moas_pool_stats may run beside anything): every page the
 * call may need is taken before anything runs, so the pool's free pages are the
 * shadow's with the call's reservation. */
static void cb_stats(void) {
    driver *d = g_cb.d;
    cb_grow(d);
    moas_pool_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    int32_t live = 0;
    for (int s = 0; s < MAX_SLOTS; s++) {
        live += d->c[s].live;
    }
    const long calls = counts.n_calls;
    FUZZ_CHECK(moas_pool_stats(d->pool, &info) == MOAS_OK);
    FUZZ_CHECK(counts.n_calls == calls);
    FUZZ_CHECK(info.pages_free == d->n_free && info.n_contexts == live);
}

static void cb_act(const cbspec *sp) {
    driver *d = g_cb.d;
    cb_fire *f = &g_cb.fires[g_cb.n_fires++];
    memset(f, 0, sizeof *f);
    f->act = sp->act;
    f->slot = -1;
    int child = -1;   /* a free slot for an unrelated fork */
    for (int s = 0; s < MAX_SLOTS && child < 0; s++) {
        child = d->c[s].live ? -1 : s;
    }
    if ((sp->target & 0x80) && (sp->act == ACT_DECODE || sp->act == ACT_TRUNCATE ||
                                sp->act == ACT_RESET || sp->act == ACT_FREE ||
                                sp->act == ACT_POOL || (sp->act == ACT_FORK && child >= 0))) {
        for (int k = 0; k < MAX_SLOTS && f->slot < 0; k++) {
            const int s = (sp->target + k) % MAX_SLOTS;
            if (d->c[s].live && !(g_cb.in_call & (1u << s)) && !(g_cb.gone & (1u << s))) {
                f->slot = s;
                f->unrelated = true;
            }
        }
    }
    if (f->slot < 0) {
        f->slot = g_cb.slots[sp->target % g_cb.n_call];
    }
    sctx *c = &d->c[f->slot];
    moas_context *t = c->ctx;
    if (f->unrelated) {
        cb_grow(d);   /* the pool as the nested call finds it: the call's pages taken */
    }
    const int32_t n_before = moas_context_n_past(t), pages_before = moas_context_kv_pages(t);
    const int32_t tokens[2] = {0, 1};
    moas_context *out = (moas_context *)&out;
    moas_pool_seq q = {t, tokens, f->unrelated ? 0 : 1, MOAS_LOGITS_LAST, NULL};
    bool msg = true;
    f->want = MOAS_ERR_BUSY;
    fuzz_prime_error();
    switch (sp->act) {
    case ACT_DECODE:
        if (f->unrelated) {
            cb_nested_decode(d, f, c, sp->seed % d->V, false);
            return;
        }
        f->st = moas_context_decode(t, 0, NULL);
        break;
    case ACT_BATCH:
        f->st = moas_context_decode_batch(t, tokens, 2, NULL, MOAS_LOGITS_NONE);
        break;
    case ACT_TRUNCATE:
        f->n_keep = f->unrelated ? n_before / 2 : 0;
        f->want = f->unrelated ? MOAS_OK : MOAS_ERR_BUSY;
        f->st = moas_context_truncate(t, f->n_keep);
        break;
    case ACT_FORK:
        if (f->unrelated) {   /* goes ahead as any fork, a new context in the pool */
            const uint64_t copies = fork_copies(d, c);
            const long fail_at = counts.fail_at, calls = counts.n_calls;
            counts.fail_at = 0;   /* an armed failure is the decoding call's */
            f->want = copies > (uint64_t)d->n_free ? MOAS_ERR_POOL_FULL : MOAS_OK;
            f->st = moas_context_fork(t, &out);
            counts.fail_at = fail_at;
            g_cb.nested_allocs += counts.n_calls - calls;
            f->msg = f->st == MOAS_OK || fuzz_error_replaced();
            f->same = (f->st == MOAS_OK) == (out != NULL);
            if (f->st == MOAS_OK && f->want == MOAS_OK) {
                shadow_fork(d, c, &d->c[child], out);
                g_cb.touched |= 1u << child;
            }
            return;
        }
        f->st = moas_context_fork(t, &out);
        break;
    case ACT_LOAD:
        f->st = moas_context_state_load(t, state_buf, d->state_ok ? d->state_size : 64);
        break;
    case ACT_RESET:   /* no status: MOAS_ERR_BUSY stands for the message of a no-op */
        f->n_keep = 0;
        moas_context_reset(t);
        f->want = f->unrelated ? MOAS_OK : MOAS_ERR_BUSY;
        f->st = fuzz_error_replaced() ? MOAS_ERR_BUSY : MOAS_OK;
        break;
    case ACT_FREE:
        if (f->unrelated) {
            g_cb.gone |= 1u << f->slot;
        }
        moas_context_free(t);
        f->want = f->unrelated ? MOAS_OK : MOAS_ERR_BUSY;
        f->st = f->unrelated || !fuzz_error_replaced() ? MOAS_OK : MOAS_ERR_BUSY;
        break;
    case ACT_POOL:
        if (f->unrelated && !g_cb.pool && (sp->seed & 2)) {
            cb_nested_decode(d, f, c, sp->seed % d->V, true);
            return;
        }
        f->want = f->unrelated && !g_cb.pool ? MOAS_OK : MOAS_ERR_BUSY;
        f->st = moas_pool_decode(d->pool, &q, 1);
        break;
    case ACT_COMPACT:
        f->st = moas_context_compact(t, 0, 0, NULL);
        break;
    case ACT_SHIFT:
        f->st = moas_context_shift(t, 0, 0);
        break;
    case ACT_FORCE:
        if (sp->target & 0x40) {   /* a new forcing, from the next routing decision */
            const int32_t scheme = (int32_t)(sp->seed % (uint32_t)(d->S + 1)) - 1;
            const bool valid = c->mode == MOAS_MODE_ROUTED || scheme == -1;
            f->want = valid ? MOAS_OK : MOAS_ERR_INVALID_ARG;
            f->st = moas_context_force_scheme(t, scheme);
            msg = !valid;
            if (f->st == MOAS_OK && valid && c->mode == MOAS_MODE_ROUTED) {
                c->forced = scheme;
                g_cb.changed |= 1u << f->slot;
            }
            break;
        }
        f->want = MOAS_ERR_INVALID_ARG;
        f->st = moas_context_force_scheme(t, c->forced);
        if (f->st == MOAS_OK) {
            fuzz_prime_error();
            f->st = moas_context_force_scheme(t, d->S);
        }
        break;
    case ACT_BUDGET:
        f->want = MOAS_ERR_INVALID_ARG;
        f->st = moas_context_set_kv_budget(t, 0);
        if (f->st == MOAS_OK) {
            fuzz_prime_error();
            f->st = moas_context_set_kv_budget(t, 1);
        }
        break;
    default:   /* ACT_SETCB: no status, no message */
        if (sp->target & 0x40) {   /* the firing callback's (bit 0 of the seed: none) */
            c->cb = (sp->seed & 1) ? -1 : (int32_t)(sp - d->specs);
            g_cb.changed |= 1u << f->slot;
        }
        moas_context_set_route_callback(t, c->cb >= 0 ? route_cb : NULL,
                                        c->cb >= 0 ? &d->specs[c->cb] : NULL);
        f->want = f->st = MOAS_OK;
        msg = false;
        break;
    }
    if (f->want == MOAS_OK && sp->act != ACT_SETCB) {
        msg = false;   /* an unrelated call that goes ahead */
    }
    f->msg = !msg || fuzz_error_replaced();
    /* (an unrelated context may be freed by now) */
    f->same = f->unrelated || (moas_context_n_past(t) == n_before &&
                               moas_context_kv_pages(t) == pages_before &&
                               (sp->act != ACT_FORK || out == NULL));
    if (!f->unrelated || f->st != MOAS_OK) {
        return;
    }
    /* the shadow follows an unrelated call that went ahead, at once: a later nested
     * call finds the pool so */
    switch (f->act) {
    case ACT_TRUNCATE:
    case ACT_RESET:
        FUZZ_CHECK(f->n_keep <= c->n_past);
        c->n_past = f->n_keep;
        c->logits = false;
        c->stale = false;
        trim(d, c);
        g_cb.touched |= 1u << f->slot;
        break;
    case ACT_FREE:
        drop_all(d, c);
        c->live = false;
        g_cb.touched |= 1u << f->slot;
        break;
    default:   /* an empty moas_pool_decode: nothing */
        break;
    }
}



/* Before a decoding call that names the contexts of `slots`. */
static void cb_begin(driver *d, const int *slots, const int32_t *n_tokens, int n, bool pool) {
    memset(&g_cb, 0, sizeof g_cb);
    memset(&g_abort, 0, sizeof g_abort);
    g_cb.d = d;
    g_cb.active = true;
    g_cb.pool = pool;
    g_cb.n_call = n;
    for (int i = 0; i < n; i++) {
        g_cb.slots[i] = slots[i];
        g_cb.n_tokens[i] = n_tokens[i] > 0 ? n_tokens[i] : 0;
        g_cb.in_call |= 1u << slots[i];
    }
}

/* After it: the callbacks were called for every token and layer of each context that
 * has one (`tokens` of them in all), and none for a call that failed (but one an abort
 * callback stopped, whose route callbacks may have chosen: abort_undone). */
static void cb_end(const driver *d, moas_status st, long tokens) {
    g_cb.active = false;
    FUZZ_CHECK((st == MOAS_ERR_ABORTED) == g_abort.stopped);
    if (st == MOAS_ERR_ABORTED) {
        FUZZ_CHECK(g_cb.n_fires == 0);
    } else if (st != MOAS_OK) {
        FUZZ_CHECK(g_cb.n_invoked == 0 && g_cb.n_fires == 0);
    } else if (g_cb.changed == 0) {
        FUZZ_CHECK(g_cb.n_invoked == tokens * d->L);
    }
}

/* After a call an abort callback stopped (asked only once its checks and reservation
 * passed): undone. Each context of it with tokens is as before but for its logits,
 * none; one with no tokens, and every other, as before; the pages as if reserved and
 * given back (a shared page the reservation copied stays copied, as the library
 * leaves it). `live_before` as expect_failed's. */
static void abort_undone(driver *d, long live_before) {
    FUZZ_CHECK(fuzz_error_replaced());
    FUZZ_CHECK(strstr(moas_last_error(), "abort callback") != NULL);
    FUZZ_CHECK(live_before < 0 || counts.live == live_before);
    cb_grow(d);
    for (int i = 0; i < g_cb.n_call; i++) {
        sctx *c = &d->c[g_cb.slots[i]];
        if (g_cb.n_tokens[i] == 0) {
            expect_same(d, c);
            continue;
        }
        FUZZ_CHECK(moas_context_logits(c->ctx) == NULL);
        c->logits = c->stale = false;
        c->snap_has_logits = false;
        expect_same(d, c);
        trim(d, c);
    }
    expect_others_same(d, g_cb.in_call);
}

/* After a call that succeeded: every nested call the callbacks made had its status (a
 * refusal left a message and its context as it was; the shadow followed those that
 * went ahead on contexts the call does not name, which it returns). */
static unsigned cb_check(void) {
    for (int i = 0; i < g_cb.n_fires; i++) {
        const cb_fire *f = &g_cb.fires[i];
        if (trace) {
            fprintf(stderr, "pool:   callback's call %d on slot %d%s: %s\n", f->act, f->slot,
                    f->unrelated ? " (not in the call)" : "", moas_status_name(f->st));
        }
        FUZZ_CHECK(f->st == f->want);
        FUZZ_CHECK(f->msg);
        FUZZ_CHECK(f->same);
    }
    return g_cb.touched;
}

/* A run of tokens into one context: moas_context_decode (n < 0: one token, the logits
 * copied out or not) or moas_context_decode_batch. */
static void decode_run(driver *d, int slot, const int32_t *tokens, int32_t n, int which,
                       bool null_out, bool single) {
    sctx *c = &d->c[slot];
    static float out[MAX_RUN * MAX_V + 1];
    float *buf = null_out ? NULL : out;
    memset(out, 0xAB, sizeof out);
    bool invalid = false;
    if (!single) {
        invalid = n < 0 || (unsigned)which >= MOAS_LOGITS_COUNT ||
                  (which == MOAS_LOGITS_ALL && buf == NULL && n > 0);
    }
    /* a batch checks its room before its ids; one token its id first */
    bool full = !single && !invalid && n > c->n_ctx - c->n_past;
    for (int32_t i = 0; i < n && !invalid && !full; i++) {
        invalid = bad_token(d, tokens[i]);
    }
    full = full || (!invalid && n > c->n_ctx - c->n_past);
    call_limit(d, c);
    const uint64_t need = invalid || full ? 0 : need_tokens(d, c, n);
    const bool pool_full = !invalid && !full && need > (uint64_t)d->n_free;
    const bool steered = steering(d, c);
    const long live_before = counts.live, calls_before = counts.n_calls;
    const bool had_ws = c->has_ws;
    const long cb_tokens = c->cb >= 0 && n > 0 ? n : 0;
    fuzz_prime_error();
    cb_begin(d, &slot, &n, 1, false);
    arm(d);
    const bool oom_possible = d->arm > 0 && n > 0;
    moas_status st;
    if (single) {
        st = moas_context_decode(c->ctx, tokens[0], buf);
    } else {
        st = moas_context_decode_batch(c->ctx, tokens, n, buf, (moas_logits)which);
    }
    disarm(d);
    note(d, single ? "decode" : "batch", slot, st);
    cb_end(d, st, cb_tokens);
    if (had_ws) {
        FUZZ_CHECK(counts.n_calls - g_cb.nested_allocs == calls_before);   /* never per token */
    }
    if (st == MOAS_ERR_ABORTED) {
        FUZZ_CHECK(!invalid && !full && !pool_full && n > 0);
        c->has_ws = true;
        abort_undone(d, had_ws ? live_before : -1);
        return;
    }
    FUZZ_CHECK(st != MOAS_OK || c->abort < 0 || n == 0 || g_abort.asked > 0);
    if (st == MOAS_ERR_NO_MEMORY) {
        FUZZ_CHECK(oom_possible && !invalid && !full && !had_ws);
        expect_failed(d, live_before);
        return;
    }
    if (!invalid && !full && n > 0) {
        c->has_ws = true;   /* made before the pages are reserved */
    }
    if (invalid) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG);
    } else if (full) {
        FUZZ_CHECK(st == MOAS_ERR_CONTEXT_FULL);
    } else if (pool_full) {
        FUZZ_CHECK(st == MOAS_ERR_POOL_FULL);
        FUZZ_CHECK(strstr(moas_last_error(), "lacks") != NULL);
    } else {
        FUZZ_CHECK(st == MOAS_OK);
    }
    if (st != MOAS_OK) {
        expect_failed(d, st == MOAS_ERR_POOL_FULL && !had_ws ? -1 : live_before);
        /* the caller's buffer is untouched */
        for (size_t i = 0; i < sizeof out / sizeof out[0]; i++) {
            uint32_t bits;
            memcpy(&bits, &out[i], sizeof bits);
            FUZZ_CHECK(bits == 0xABABABABu);
        }
        return;
    }
    cb_grow(d);   /* grow_tokens(d, c, n), unless a callback's nested call did */
    record_tokens(d, c, tokens, n, single ? MOAS_LOGITS_LAST : (moas_logits)which,
                  buf, steered || (g_cb.changed & (1u << slot)));
    take_heads(d, c);
    trim(d, c);
    check_logits_finite(d, c);
    const unsigned touched = cb_check();
    expect_others_same(d, (1u << slot) | touched);
}

static void step_decode(driver *d, fuzz_cursor *cur, bool copy_out) {
    const int slot = pick_live(d, fuzz_u8(cur));
    const int32_t token = pick_token(cur, d->V);
    if (slot >= 0) {
        decode_run(d, slot, &token, 1, MOAS_LOGITS_LAST, !copy_out, true);
    }
}

static void step_batch(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    const uint8_t flags = fuzz_u8(cur);
    /* bits 0-2: n (6 and 7: 0 and 1); 3-4: which; 6: no logits buffer; bits 5-7 all
     * set: an unknown `which`; 6 and 7 alone: a negative n */
    int32_t n = (flags & 7) % (MAX_RUN + 1);
    const int which = (flags & 0xE0) == 0xE0 ? MOAS_LOGITS_COUNT : ((flags >> 3) & 3) % 3;
    const bool null_out = (flags & 0x40) && !(flags & 0x80);
    int32_t tokens[MAX_RUN];
    for (int32_t i = 0; i < n; i++) {
        tokens[i] = pick_token(cur, d->V);
    }
    if (slot < 0) {
        return;
    }
    if ((flags & 0xE0) == 0xC0) {
        n = -1 - (flags & 1);   /* negative */
    }
    decode_run(d, slot, tokens, n, which, null_out, false);
}

static void step_pool_decode(driver *d, fuzz_cursor *cur) {
    const uint8_t mask = fuzz_u8(cur);
    moas_pool_seq seqs[MAX_SLOTS];
    int slots[MAX_SLOTS];
    int32_t tokens[MAX_SLOTS][MAX_RUN];
    static float out[MAX_SLOTS][MAX_RUN * MAX_V];
    int32_t n_seqs = 0;
    memset(out, 0xAB, sizeof out);
    for (int k = 0; k < MAX_SLOTS; k++) {
        if (!(mask & (1u << k))) {
            continue;
        }
        /* bits 0-2: n (up to 2 unless bit 7 of the mask is set); 3-4: which; 6: no
         * logits buffer; 6 and 7: an unknown `which` */
        const uint8_t f = fuzz_u8(cur);
        const int32_t n = (f & 7) % (MAX_RUN + 1) % ((mask & 0x80) ? MAX_RUN + 1 : 3);
        for (int32_t i = 0; i < n; i++) {
            tokens[n_seqs][i] = pick_token(cur, d->V);
        }
        if (!d->c[k].live) {
            continue;
        }
        moas_pool_seq *q = &seqs[n_seqs];
        q->ctx = d->c[k].ctx;
        q->tokens = tokens[n_seqs];
        q->n_tokens = n;
        q->which = ((f >> 3) & 3) % 3;
        q->logits = (f & 0x40) ? NULL : out[n_seqs];
        if ((f & 0xC0) == 0xC0) {
            q->which = 3;   /* unknown */
        }
        slots[n_seqs++] = k;
    }
    /* the order of the parts: reversed by bit 4 of the mask */
    if (mask & 0x10) {
        for (int32_t i = 0; i < n_seqs / 2; i++) {
            const moas_pool_seq tq = seqs[i];
            seqs[i] = seqs[n_seqs - 1 - i];
            seqs[n_seqs - 1 - i] = tq;
            const int ts = slots[i];
            slots[i] = slots[n_seqs - 1 - i];
            slots[n_seqs - 1 - i] = ts;
        }
    }
    /* the expected status: the first part that fails a check decides; then pages */
    moas_status want = MOAS_OK;
    for (int32_t i = 0; i < n_seqs && want == MOAS_OK; i++) {
        const moas_pool_seq *q = &seqs[i];
        const sctx *c = &d->c[slots[i]];
        bool bad = c->mode != d->c[slots[0]].mode || (unsigned)q->which >= MOAS_LOGITS_COUNT ||
                   (q->which == MOAS_LOGITS_ALL && q->logits == NULL && q->n_tokens > 0);
        if (!bad && q->n_tokens > c->n_ctx - c->n_past) {   /* the room before the ids */
            want = MOAS_ERR_CONTEXT_FULL;
            break;
        }
        for (int32_t t = 0; t < q->n_tokens && !bad; t++) {
            bad = bad_token(d, q->tokens[t]);
        }
        if (bad) {
            want = MOAS_ERR_INVALID_ARG;
        }
    }
    sctx *parts[MAX_SLOTS];
    int32_t part_n[MAX_SLOTS];
    for (int32_t i = 0; i < n_seqs; i++) {
        call_limit(d, &d->c[slots[i]]);
        parts[i] = &d->c[slots[i]];
        part_n[i] = seqs[i].n_tokens;
    }
    const uint64_t need = need_call(d, parts, part_n, n_seqs);
    if (want == MOAS_OK && need > (uint64_t)d->n_free) {
        want = MOAS_ERR_POOL_FULL;
    }
    bool steered[MAX_SLOTS];
    for (int32_t i = 0; i < n_seqs; i++) {
        steered[i] = steering(d, &d->c[slots[i]]);
    }
    long cb_tokens = 0;
    for (int32_t i = 0; i < n_seqs; i++) {
        cb_tokens += d->c[slots[i]].cb >= 0 ? seqs[i].n_tokens : 0;
    }
    const long live_before = counts.live, calls_before = counts.n_calls;
    fuzz_prime_error();
    int32_t n_tokens[MAX_SLOTS];
    for (int32_t i = 0; i < n_seqs; i++) {
        n_tokens[i] = seqs[i].n_tokens;
    }
    cb_begin(d, slots, n_tokens, (int)n_seqs, true);
    arm(d);
    const moas_status st = moas_pool_decode(d->pool, seqs, n_seqs);
    disarm(d);
    note(d, "pool_decode", (int)n_seqs, st);
    cb_end(d, st, cb_tokens);
    /* never allocates (a callback's decode of another context may) */
    FUZZ_CHECK(counts.n_calls - g_cb.nested_allocs == calls_before);
    if (st == MOAS_ERR_ABORTED) {
        FUZZ_CHECK(want == MOAS_OK);
        abort_undone(d, live_before);
        return;
    }
    FUZZ_CHECK(st == want);
    for (int32_t i = 0; i < n_seqs && st == MOAS_OK; i++) {
        FUZZ_CHECK(d->c[slots[i]].abort < 0 || seqs[i].n_tokens == 0 || g_abort.asked > 0);
    }
    if (st != MOAS_OK) {
        expect_failed(d, live_before);
        for (size_t i = 0; i < sizeof out / sizeof(float); i++) {
            uint32_t bits;
            memcpy(&bits, (const float *)out + i, sizeof bits);
            FUZZ_CHECK(bits == 0xABABABABu);
        }
        return;
    }
    /* every reservation first, in order, then the trims */
    unsigned touched = 0;
    cb_grow(d);   /* unless a callback's nested call did */
    for (int32_t i = 0; i < n_seqs; i++) {
        sctx *c = &d->c[slots[i]];
        record_tokens(d, c, seqs[i].tokens, seqs[i].n_tokens, (moas_logits)seqs[i].which,
                      seqs[i].logits, steered[i] || (g_cb.changed & (1u << slots[i])));
        take_heads(d, c);
        touched |= 1u << slots[i];
        check_logits_finite(d, c);
    }
    for (int32_t i = 0; i < n_seqs; i++) {
        trim(d, &d->c[slots[i]]);
    }
    /* a part with no tokens changes nothing of its context */
    for (int32_t i = 0; i < n_seqs; i++) {
        if (seqs[i].n_tokens == 0) {
            expect_same(d, &d->c[slots[i]]);
        }
    }
    touched |= cb_check();
    expect_others_same(d, touched);
}

static void step_truncate(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    if (slot < 0) {
        (void)fuzz_u8(cur);
        return;
    }
    sctx *c = &d->c[slot];
    const int32_t n_keep = pick_count(cur, c->n_past);
    const long live_before = counts.live, calls_before = counts.n_calls;
    fuzz_prime_error();
    const moas_status st = moas_context_truncate(c->ctx, n_keep);
    note(d, "truncate", slot, st);
    FUZZ_CHECK(counts.n_calls == calls_before);
    if (n_keep < 0 || n_keep > c->n_past) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG);
        expect_failed(d, live_before);
        return;
    }
    FUZZ_CHECK(st == MOAS_OK);
    c->n_past = n_keep;
    c->logits = false;
    c->stale = false;
    trim(d, c);
    FUZZ_CHECK(moas_context_logits(c->ctx) == NULL);
    expect_others_same(d, 1u << slot);
}

static void step_reset(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    const long calls_before = counts.n_calls;
    moas_context_reset(c->ctx);
    FUZZ_CHECK(counts.n_calls == calls_before);
    c->n_past = 0;
    c->logits = false;
    c->stale = false;
    trim(d, c);
    FUZZ_CHECK(moas_context_logits(c->ctx) == NULL && moas_context_kv_pages(c->ctx) == 0);
    expect_others_same(d, 1u << slot);
}

/* A shift or a compaction that needs `need` pages to unshare: true, checked, when it
 * failed as predicted (an armed allocation failure, an argument it refuses, too few
 * free pages), false when it must have succeeded. `works` says it got past its
 * arguments to real work and so made the context's workspace, which it keeps even
 * when the pool then turns out full. */
static bool in_place_failed(driver *d, sctx *c, moas_status st, bool oom_possible, bool valid,
                            bool works, uint64_t need, bool had_ws, long live_before) {
    if (st == MOAS_ERR_NO_MEMORY) {
        FUZZ_CHECK(oom_possible);
        expect_failed(d, live_before);
        return true;
    }
    if (works) {
        c->has_ws = true;
    }
    if (!valid) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG);
        expect_failed(d, live_before);
        return true;
    }
    if (need > (uint64_t)d->n_free) {
        FUZZ_CHECK(st == MOAS_ERR_POOL_FULL);
        expect_failed(d, had_ws ? live_before : -1);
        return true;
    }
    FUZZ_CHECK(st == MOAS_OK);
    return false;
}

static void step_shift(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    if (slot < 0) {
        (void)fuzz_u8(cur);
        (void)fuzz_u8(cur);
        return;
    }
    sctx *c = &d->c[slot];
    const int32_t n_keep = pick_count(cur, c->n_past);
    const int32_t n_discard = pick_count(cur, c->n_past);
    const bool valid = d->rope && n_keep >= 0 && n_discard >= 0 &&
                       (int64_t)n_discard <= (int64_t)c->n_past - n_keep;
    int32_t from[MAX_STREAMS], to[MAX_STREAMS];
    for (int32_t i = 0; i < c->n_streams; i++) {
        /* the later tokens' heads move down to the first dropped head: none when no
         * token follows the dropped ones */
        const uint32_t start = valid ? stream_heads(d, c, i, n_keep) : 0;
        const uint32_t moved = valid ? stream_heads(d, c, i, c->n_past) -
                                           stream_heads(d, c, i, n_keep + n_discard)
                                     : 0;
        from[i] = valid && moved > 0 ? (int32_t)(start / (uint32_t)d->P) : -1;
        to[i] = pages_to(d, start + moved);
    }
    const bool noop = valid && n_discard == 0;
    const uint64_t need = valid && !noop ? need_unshare(d, c, from, to) : 0;
    const long live_before = counts.live;
    const bool had_ws = c->has_ws;
    fuzz_prime_error();
    arm(d);
    const bool oom_possible = d->arm > 0 && valid && !noop && !had_ws;
    const moas_status st = moas_context_shift(c->ctx, n_keep, n_discard);
    disarm(d);
    note(d, "shift", slot, st);
    if (in_place_failed(d, c, st, oom_possible, valid, valid && !noop, need, had_ws,
                        live_before)) {
        return;
    }
    if (noop) {
        expect_others_same(d, 0);
        return;
    }
    unshare(d, c, from, to);
    /* the routes of the kept tokens, and of the later ones moved down */
    static float gates[MAX_CTX * MAX_L * MAX_S];
    static int32_t schemes[MAX_CTX * MAX_L], heads[MAX_CTX * MAX_L];
    const int32_t n_after = c->n_past - n_keep - n_discard;
    FUZZ_CHECK(moas_context_n_past(c->ctx) == c->n_past - n_discard);
    read_routes(d, c, gates, schemes, heads);
    const size_t LS = (size_t)d->L * (size_t)d->S, L = (size_t)d->L;
    FUZZ_CHECK(memcmp(gates, c->snap_gates, (size_t)n_keep * LS * sizeof *gates) == 0);
    FUZZ_CHECK(memcmp(gates + n_keep * LS, c->snap_gates + (size_t)(n_keep + n_discard) * LS,
                      (size_t)n_after * LS * sizeof *gates) == 0);
    FUZZ_CHECK(memcmp(schemes, c->snap_schemes, (size_t)n_keep * L * sizeof *schemes) == 0);
    FUZZ_CHECK(memcmp(schemes + n_keep * L, c->snap_schemes + (size_t)(n_keep + n_discard) * L,
                      (size_t)n_after * L * sizeof *schemes) == 0);
    for (int32_t j = n_keep; j < c->n_past - n_discard; j++) {
        c->tok[j] = c->tok[j + n_discard];
        c->forced_at[j] = c->forced_at[j + n_discard];
        c->cb_at[j] = c->cb_at[j + n_discard];
        c->taint[j] = true;   /* keys turned back: not bit for bit a fresh decode */
        c->pos_has[j] = false;
    }
    c->n_past -= n_discard;
    if (n_after == 0) {   /* the last token was dropped, its logits with it */
        c->logits = c->stale = false;
    } else {
        c->stale = c->logits;   /* the last logits stay */
    }
    take_heads(d, c);
    trim(d, c);
    check_logits_finite(d, c);
    FUZZ_CHECK((moas_context_logits(c->ctx) != NULL) == c->logits);
    FUZZ_CHECK(!c->logits ||
               memcmp(moas_context_logits(c->ctx), c->snap_logits, (size_t)d->V * sizeof(float)) == 0);
    expect_others_same(d, 1u << slot);
}

/* Whether a token's `from` heads pool down to `to` (groups must nest). */
static bool pools_down(const driver *d, int32_t from, int32_t to) {
    return to < from && from % to == 0 && d->H % from == 0;
}

static void step_compact(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    const uint8_t b = fuzz_u8(cur), sb = fuzz_u8(cur);
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    int32_t n_before = b < 232 ? b % (c->n_past + 1) : (b & 1) ? c->n_past + 1 : -1;
    const int32_t scheme = sb < 240 ? sb % d->S : (sb & 1) ? d->S : -1;
    const bool valid = c->mode == MOAS_MODE_ROUTED && d->pooled && scheme >= 0 &&
                       scheme < d->S && n_before >= 0 && n_before <= c->n_past;
    int32_t from[MAX_STREAMS], to[MAX_STREAMS], changed = 0;
    const int32_t target = valid ? d->n_kv[scheme] : 0;
    for (int32_t l = 0; l < c->n_streams; l++) {
        from[l] = -1;
        uint32_t off = 0, end = 0;   /* end: the stream's heads after the call */
        for (int32_t j = 0; valid && j < c->n_past; j++) {
            const bool pooled = j < n_before && pools_down(d, c->heads[j][l], target);
            if (pooled) {
                if (from[l] < 0) {
                    from[l] = (int32_t)(off / (uint32_t)d->P);
                }
                changed++;
            }
            off += (uint32_t)c->heads[j][l];
            end += pooled ? (uint32_t)target : (uint32_t)c->heads[j][l];
        }
        to[l] = pages_to(d, end);
    }
    const uint64_t need = valid ? need_unshare(d, c, from, to) : 0;
    const long live_before = counts.live;
    const bool had_ws = c->has_ws;
    int32_t n_changed = -5;
    fuzz_prime_error();
    arm(d);
    const bool oom_possible = d->arm > 0 && valid && !had_ws;
    const moas_status st = moas_context_compact(c->ctx, n_before, scheme,
                                                (sb & 0x10) ? NULL : &n_changed);
    disarm(d);
    note(d, "compact", slot, st);
    if (!(sb & 0x10)) {
        FUZZ_CHECK(st == MOAS_OK || n_changed == 0);
    }
    if (in_place_failed(d, c, st, oom_possible, valid, valid, need, had_ws, live_before)) {
        return;
    }
    FUZZ_CHECK((sb & 0x10) || n_changed == changed);
    unshare(d, c, from, to);
    /* exactly the tokens whose heads nest in the target's are pooled, to the target */
    static float gates[MAX_CTX * MAX_L * MAX_S];
    static int32_t schemes[MAX_CTX * MAX_L], heads[MAX_CTX * MAX_L];
    read_routes(d, c, gates, schemes, heads);
    FUZZ_CHECK(memcmp(gates, c->snap_gates, (size_t)c->n_past * d->L * d->S * sizeof *gates) == 0);
    for (int32_t j = 0; j < c->n_past; j++) {
        for (int32_t l = 0; l < d->L; l++) {
            const size_t r = (size_t)j * d->L + l;
            const bool pooled = j < n_before && pools_down(d, c->heads[j][l], target);
            FUZZ_CHECK(schemes[r] == (pooled ? scheme : c->snap_schemes[r]));
            FUZZ_CHECK(heads[r] == (pooled ? target : c->snap_heads[r]));
            if (pooled) {
                c->taint[j] = true;   /* its K/V now differ from a fresh decode's */
            }
        }
    }
    take_heads(d, c);
    trim(d, c);
    FUZZ_CHECK((moas_context_logits(c->ctx) != NULL) == c->logits);
    FUZZ_CHECK(!c->logits ||
               memcmp(moas_context_logits(c->ctx), c->snap_logits, (size_t)d->V * sizeof(float)) == 0);
    expect_others_same(d, 1u << slot);
}

/* The bytes moas_context_state_size() must report. */
static size_t state_bytes(const driver *d, const sctx *c) {
    size_t total = 14 * 4 + (size_t)c->n_past * d->L * (1 + 4 * (size_t)d->S);
    total += c->logits ? 4 * (size_t)d->V : 0;
    for (int32_t i = 0; i < c->n_streams; i++) {
        total += 2 * (size_t)stream_heads(d, c, i, c->n_past) * d->head_bytes;
    }
    return total;
}

static void step_save(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    const uint8_t v = fuzz_u8(cur);
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    const size_t need = state_bytes(d, c);
    FUZZ_CHECK(need <= MAX_STATE);
    const long live_before = counts.live, calls_before = counts.n_calls;
    FUZZ_CHECK(moas_context_state_size(c->ctx) == need);
    size_t written = 0;
    if (v & 1) {   /* one byte short: refused, *written says how many */
        memset(state_tmp, 0xAB, sizeof state_tmp);
        fuzz_prime_error();
        FUZZ_CHECK(moas_context_state_save(c->ctx, state_tmp, need - 1, &written) ==
                   MOAS_ERR_BUFFER_TOO_SMALL);
        FUZZ_CHECK(written == need);
        expect_failed(d, live_before);
        for (size_t i = 0; i < need; i++) {
            FUZZ_CHECK(state_tmp[i] == 0xAB);
        }
    }
    FUZZ_CHECK(moas_context_state_save(c->ctx, state_buf, MAX_STATE, &written) == MOAS_OK);
    FUZZ_CHECK(written == need);
    FUZZ_CHECK(counts.n_calls == calls_before);
    d->state_size = written;
    d->state_ok = true;
    d->state_src = *c;
    expect_others_same(d, 0);
}

static void step_load(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    const uint8_t v = fuzz_u8(cur);
    if (slot < 0 || !d->state_ok) {
        return;
    }
    sctx *c = &d->c[slot];
    const sctx *src = &d->state_src;
    size_t size = d->state_size;
    const void *buf = state_buf;
    moas_status want = MOAS_OK;
    switch (v % 8) {
    case 0:
        buf = NULL;
        want = MOAS_ERR_INVALID_ARG;
        break;
    case 1:
        size = 0;
        want = MOAS_ERR_BAD_FORMAT;
        break;
    case 2:
        size--;   /* cut short */
        break;
    default:
        break;
    }
    if (want == MOAS_OK) {
        if (size < 14 * 4) {
            want = MOAS_ERR_CORRUPT;
        } else if (src->mode != c->mode) {
            want = MOAS_ERR_CORRUPT;
        } else if (src->n_past > c->n_ctx) {
            want = MOAS_ERR_CONTEXT_FULL;
        } else if (size != d->state_size) {
            want = MOAS_ERR_CORRUPT;
        }
    }
    /* pages: those the state needs, from the free ones and those only c holds */
    uint64_t need = 0, own = 0;
    for (int32_t i = 0; i < c->n_streams && src->mode == c->mode; i++) {
        need += (uint64_t)pages_for(d, stream_heads(d, src, i, src->n_past));
        for (int32_t p = 0; p < c->st[i].n; p++) {
            own += d->refs[c->st[i].ids[p]] == 1;
        }
    }
    if (want == MOAS_OK && need > (uint64_t)d->n_free + own) {
        want = MOAS_ERR_POOL_FULL;
    }
    const long live_before = counts.live, calls_before = counts.n_calls;
    fuzz_prime_error();
    arm(d);
    const moas_status st = moas_context_state_load(c->ctx, buf, size);
    disarm(d);
    note(d, "load", slot, st);
    FUZZ_CHECK(counts.n_calls == calls_before);   /* allocates nothing */
    FUZZ_CHECK(st == want);
    if (st != MOAS_OK) {
        expect_failed(d, live_before);
        return;
    }
    drop_all(d, c);
    for (int32_t i = 0; i < c->n_streams; i++) {
        const int32_t n = pages_for(d, stream_heads(d, src, i, src->n_past));
        for (int32_t p = 0; p < n; p++) {
            c->st[i].ids[p] = take_page(d);
        }
        c->st[i].n = n;
    }
    /* the history is the source's; the settings (forcing, route callback, n_ctx) stay */
    c->n_past = src->n_past;
    memcpy(c->tok, src->tok, sizeof c->tok);
    memcpy(c->forced_at, src->forced_at, sizeof c->forced_at);
    memcpy(c->cb_at, src->cb_at, sizeof c->cb_at);
    memcpy(c->taint, src->taint, sizeof c->taint);
    memcpy(c->heads, src->heads, sizeof c->heads);
    memset(c->pos_has, 0, sizeof c->pos_has);
    c->logits = src->logits;
    c->stale = src->stale;
    take_heads(d, c);
    FUZZ_CHECK(memcmp(c->heads, src->heads, sizeof c->heads) == 0);
    /* saved again, the same bytes */
    size_t written = 0;
    FUZZ_CHECK(moas_context_state_save(c->ctx, state_tmp, MAX_STATE, &written) == MOAS_OK);
    FUZZ_CHECK(written == d->state_size && memcmp(state_tmp, state_buf, written) == 0);
    expect_others_same(d, 1u << slot);
}

/* OP_FORCE with 240 <= b < 248: install a route callback on the slot's context (b
 * even; operands: the seed of its choice, its action % 16 (ACT_NONE and above: none),
 * where (bits 0-3 the position, 4-7 the layer), its target), or remove it (b odd; 247
 * also asks a NULL context, which must leave a message). */
static void step_route(driver *d, fuzz_cursor *cur, int slot, uint8_t b) {
    cbspec sp = {0, ACT_NONE, 0, 0, 0};
    if (!(b & 1)) {
        sp.seed = fuzz_u8(cur);
        sp.act = fuzz_u8(cur) % 16;
        const uint8_t at = fuzz_u8(cur);
        sp.pos = at & 15;
        sp.layer = (at >> 4) % d->L;
        sp.target = fuzz_u8(cur);
    }
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    const long calls_before = counts.n_calls;
    if (b & 1) {
        moas_context_set_route_callback(c->ctx, NULL, NULL);
        c->cb = -1;
        if (b == 247) {
            fuzz_prime_error();
            moas_context_set_route_callback(NULL, route_cb, NULL);
            FUZZ_CHECK(fuzz_error_replaced());
        }
    } else {
        FUZZ_CHECK(d->n_specs < MAX_SPECS);
        c->cb = d->n_specs++;
        d->specs[c->cb] = sp;
        moas_context_set_route_callback(c->ctx, route_cb, &d->specs[c->cb]);
    }
    note(d, b & 1 ? "route off" : "route on", slot, MOAS_OK);
    FUZZ_CHECK(counts.n_calls == calls_before);   /* allocates nothing */
    expect_others_same(d, 0);   /* its own context too: a setting only */
}

/* OP_FORCE with 248 to 251: install an abort callback (b even; operand: its stop % 8)
 * or remove it (b odd). A setting: nothing else changes. */
static void step_abort(driver *d, fuzz_cursor *cur, int slot, uint8_t b) {
    const uint8_t stop = (b & 1) ? 0 : fuzz_u8(cur) % 8;
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    const long calls_before = counts.n_calls;
    if (b & 1) {
        moas_context_set_abort_callback(c->ctx, NULL, NULL);
        c->abort = -1;
    } else {
        FUZZ_CHECK(d->n_stops < MAX_SPECS);
        c->abort = d->n_stops++;
        d->stops[c->abort] = stop;
        moas_context_set_abort_callback(c->ctx, abort_cb, &d->stops[c->abort]);
    }
    note(d, b & 1 ? "abort off" : "abort on", slot, MOAS_OK);
    FUZZ_CHECK(counts.n_calls == calls_before);   /* allocates nothing */
    expect_others_same(d, 0);
}

static void step_force(driver *d, fuzz_cursor *cur) {
    const int slot = pick_live(d, fuzz_u8(cur));
    const uint8_t b = fuzz_u8(cur);
    if (b >= 240 && b < 248) {
        step_route(d, cur, slot, b);
        return;
    }
    if (b >= 248 && b < 252) {
        step_abort(d, cur, slot, b);
        return;
    }
    if (slot < 0) {
        return;
    }
    sctx *c = &d->c[slot];
    const int32_t scheme = b < 240 ? (int32_t)(b % (d->S + 1)) - 1 : (b & 1) ? d->S : -2;
    const bool valid = scheme >= -1 && scheme < d->S && (c->mode == MOAS_MODE_ROUTED || scheme == -1);
    const long live_before = counts.live;
    fuzz_prime_error();
    const moas_status st = moas_context_force_scheme(c->ctx, scheme);
    note(d, "force", slot, st);
    FUZZ_CHECK(st == (valid ? MOAS_OK : MOAS_ERR_INVALID_ARG));
    if (st != MOAS_OK) {
        expect_failed(d, live_before);
        return;
    }
    if (c->mode == MOAS_MODE_ROUTED) {
        c->forced = scheme;
    }
    expect_others_same(d, 0);
}

static void step_stats(driver *d, fuzz_cursor *cur) {
    const uint8_t b = fuzz_u8(cur);
    moas_pool_info info;
    memset(&info, 0xAB, sizeof info);
    info.size = (uint32_t)(b % (sizeof info + 8));
    const uint32_t asked = info.size;
    const long calls_before = counts.n_calls;
    fuzz_prime_error();
    const moas_status st = moas_pool_stats(d->pool, &info);
    FUZZ_CHECK(counts.n_calls == calls_before);
    if (asked < sizeof info.size) {
        FUZZ_CHECK(st == MOAS_ERR_INVALID_ARG && fuzz_error_replaced());
        return;
    }
    FUZZ_CHECK(st == MOAS_OK);
    FUZZ_CHECK(info.size <= asked && info.size <= sizeof info && info.size >= sizeof info.size);
    /* nothing past what it says it wrote */
    const uint8_t *bytes = (const uint8_t *)&info;
    for (size_t i = info.size; i < sizeof info; i++) {
        FUZZ_CHECK(bytes[i] == 0xAB);
    }
    if (info.size >= offsetof(moas_pool_info, pages_free) + sizeof info.pages_free) {
        FUZZ_CHECK(info.pages_free == d->n_free);
    }
}

/* The other pool, its context and a context without a pool, made on first use. */
static void make_others(driver *d) {
    if (d->other_pool != NULL) {
        return;
    }
    moas_pool_params pp;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 16 * d->page_bytes;
    pp.kv_type = d->kv_type;
    pp.page_heads = d->P;
    pp.n_threads = 1;
    pp.allocator = &allocator;
    FUZZ_CHECK(moas_pool_create(d->model, &pp, &d->other_pool) == MOAS_OK);
    moas_context_params p;
    moas_context_params_init(&p);
    p.n_threads = 1;
    p.allocator = &allocator;
    p.pool = d->other_pool;
    p.kv_type = d->kv_type;
    p.mode = d->mode_sel == 1 ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
    FUZZ_CHECK(moas_context_create(d->model, &p, &d->other_ctx) == MOAS_OK);
    FUZZ_CHECK(moas_context_decode(d->other_ctx, 1, NULL) == MOAS_OK);
    p.pool = NULL;
    FUZZ_CHECK(moas_context_create(d->model, &p, &d->private_ctx) == MOAS_OK);
    FUZZ_CHECK(moas_context_decode(d->private_ctx, 2, NULL) == MOAS_OK);
}

static void step_bad_args(driver *d, fuzz_cursor *cur) {
    const uint8_t v = fuzz_u8(cur);
    const int slot = pick_live(d, fuzz_u8(cur));
    const int32_t one = 1;
    moas_context *ctx = slot >= 0 ? d->c[slot].ctx : NULL;
    moas_context *out = (moas_context *)&out;
    moas_pool *pool_out = (moas_pool *)&pool_out;
    /* the first part stores nothing, so that a full context passes its checks and
     * the second part is the one refused */
    moas_pool_seq q[2] = {{ctx, &one, 0, MOAS_LOGITS_LAST, NULL},
                          {ctx, &one, 1, MOAS_LOGITS_LAST, NULL}};
    moas_pool_info info = {.size = sizeof info};
    moas_pool_params pp;
    moas_context_params cp;
    size_t written = 0;
    make_others(d);
    const long live_before = counts.live;
    fuzz_prime_error();
    switch (v % 16) {
    case 0:
        FUZZ_CHECK(moas_pool_decode(NULL, q + 1, 1) == MOAS_ERR_INVALID_ARG);
        break;
    case 1:
        FUZZ_CHECK(moas_pool_decode(d->pool, NULL, 1) == MOAS_ERR_INVALID_ARG);
        break;
    case 2:
        FUZZ_CHECK(moas_pool_decode(d->pool, q, -1) == MOAS_ERR_INVALID_ARG);
        break;
    case 3:   /* a context of another pool, alone or after one of this pool */
        q[1].ctx = d->other_ctx;
        FUZZ_CHECK(moas_pool_decode(d->pool, ctx != NULL ? q : q + 1, ctx != NULL ? 2 : 1) ==
                   MOAS_ERR_INVALID_ARG);
        break;
    case 4:   /* a context without a pool of the caller's */
        q[1].ctx = d->private_ctx;
        FUZZ_CHECK(moas_pool_decode(d->pool, q + 1, 1) == MOAS_ERR_INVALID_ARG);
        break;
    case 5:   /* the same context twice, or a NULL one */
        FUZZ_CHECK(moas_pool_decode(d->pool, q, 2) == MOAS_ERR_INVALID_ARG);
        break;
    case 6:
        FUZZ_CHECK(moas_context_fork(NULL, &out) == MOAS_ERR_INVALID_ARG && out == NULL);
        break;
    case 7:
        if (ctx != NULL) {
            FUZZ_CHECK(moas_context_fork(ctx, NULL) == MOAS_ERR_INVALID_ARG);
        } else {
            FUZZ_CHECK(moas_context_fork(d->private_ctx, &out) == MOAS_ERR_INVALID_ARG && out == NULL);
        }
        break;
    case 8:
        FUZZ_CHECK(moas_context_fork(d->private_ctx, &out) == MOAS_ERR_INVALID_ARG && out == NULL);
        break;
    case 9:
        FUZZ_CHECK(moas_context_shift(NULL, 0, 0) == MOAS_ERR_INVALID_ARG);
        FUZZ_CHECK(moas_context_compact(NULL, 0, 0, NULL) == MOAS_ERR_INVALID_ARG);
        break;
    case 10:
        FUZZ_CHECK(moas_context_state_size(NULL) == 0);
        FUZZ_CHECK(moas_context_state_save(NULL, state_tmp, MAX_STATE, &written) ==
                   MOAS_ERR_INVALID_ARG);
        if (ctx != NULL) {
            FUZZ_CHECK(moas_context_state_save(ctx, NULL, MAX_STATE, &written) ==
                       MOAS_ERR_INVALID_ARG);
            FUZZ_CHECK(moas_context_state_save(ctx, state_tmp, MAX_STATE, NULL) ==
                       MOAS_ERR_INVALID_ARG);
        }
        break;
    case 11:
        FUZZ_CHECK(moas_pool_stats(NULL, &info) == MOAS_ERR_INVALID_ARG);
        FUZZ_CHECK(moas_pool_stats(d->pool, NULL) == MOAS_ERR_INVALID_ARG);
        break;
    case 12:   /* a pool made for another model */
        moas_context_params_init(&cp);
        cp.pool = d->pool;
        cp.allocator = &allocator;
        FUZZ_CHECK(moas_context_create(models[(d->model == models[0]) ? 1 : 0], &cp, &out) ==
                       MOAS_ERR_INVALID_ARG &&
                   out == NULL);
        break;
    case 13:   /* pools that cannot be made */
        moas_pool_params_init(&pp);
        pp.allocator = &allocator;
        pp.capacity_bytes = d->page_bytes - 1;   /* no whole page */
        pp.page_heads = d->P;
        pp.kv_type = d->kv_type;
        FUZZ_CHECK(moas_pool_create(d->model, &pp, &pool_out) == MOAS_ERR_INVALID_ARG &&
                   pool_out == NULL);
        pp.capacity_bytes = 1 << 16;
        pp.page_heads = 3 + (v >> 4) * 2;   /* odd: never a power of two */
        FUZZ_CHECK(moas_pool_create(d->model, &pp, &pool_out) == MOAS_ERR_INVALID_ARG);
        pp.page_heads = 8192;
        FUZZ_CHECK(moas_pool_create(d->model, &pp, &pool_out) == MOAS_ERR_INVALID_ARG);
        pp.page_heads = 0;
        pp.steer_below = 1.5f;
        FUZZ_CHECK(moas_pool_create(d->model, &pp, &pool_out) == MOAS_ERR_INVALID_ARG);
        pp.steer_below = 0.0f;
        pp.kv_type = 2;
        FUZZ_CHECK(moas_pool_create(d->model, &pp, &pool_out) == MOAS_ERR_INVALID_ARG);
        FUZZ_CHECK(moas_pool_create(NULL, &pp, &pool_out) == MOAS_ERR_INVALID_ARG &&
                   pool_out == NULL);
        break;
    case 14:   /* contexts of both modes in one call */
    {
        int other = -1;
        for (int s = 0; s < MAX_SLOTS && slot >= 0; s++) {
            if (d->c[s].live && d->c[s].mode != d->c[slot].mode) {
                other = s;
            }
        }
        if (other < 0) {
            FUZZ_CHECK(moas_context_shift(NULL, 0, 1) == MOAS_ERR_INVALID_ARG);
            break;
        }
        q[1].ctx = d->c[other].ctx;
        FUZZ_CHECK(moas_pool_decode(d->pool, q, 2) == MOAS_ERR_INVALID_ARG);
        break;
    }
    default:   /* a state of another pool's context: its mode and kv_type match, so it
                * loads if this context is of that mode; here only the refusals */
        FUZZ_CHECK(moas_context_state_load(NULL, state_buf, 4) == MOAS_ERR_INVALID_ARG);
        if (ctx != NULL) {
            FUZZ_CHECK(moas_context_state_load(ctx, NULL, 4) == MOAS_ERR_INVALID_ARG);
        }
        break;
    }
    FUZZ_CHECK(fuzz_error_replaced());
    expect_failed(d, live_before);
}

/* ---- the program ------------------------------------------------------------------ */

static void driver_free(driver *d) {
    for (int s = 0; s < MAX_SLOTS; s++) {
        if (d->c[s].live) {
            moas_context_free(d->c[s].ctx);
            drop_all(d, &d->c[s]);
            d->c[s].live = false;
            check_pool(d);
        }
    }
    moas_context_free(d->ref[0]);
    moas_context_free(d->ref[1]);
    moas_context_free(d->other_ctx);
    moas_context_free(d->private_ctx);
    moas_pool_free(d->other_pool);
    moas_pool_free(d->pool);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static driver d;
    fuzz_cursor cur = {data, size};

    if (models[0] == NULL) {
        init_models();
        for (int i = 0; i < 256; i++) {
            replay_specs[i] = (cbspec){(uint8_t)i, ACT_NONE, 0, 0, 0};
        }
    }
    memset(&d, 0, sizeof d);
    memset(&counts, 0, sizeof counts);
    const uint8_t b0 = fuzz_u8(&cur), b1 = fuzz_u8(&cur), b2 = fuzz_u8(&cur);
    d.model = models[b0 & 3];
    d.V = moas_model_n_vocab(d.model);
    d.L = moas_model_n_layer(d.model);
    d.S = moas_model_n_scheme(d.model);
    d.H = moas_model_n_head(d.model);
    d.head_dim = moas_model_head_dim(d.model);
    FUZZ_CHECK(d.V <= MAX_V && d.L <= MAX_L && d.S <= MAX_S);
    for (int32_t s = 0; s < d.S; s++) {
        d.n_kv[s] = moas_model_scheme_n_kv(d.model, s);
        d.widest = d.n_kv[s] > d.widest ? d.n_kv[s] : d.widest;
    }
    d.pooled = moas_model_kv_sharing(d.model) == MOAS_KV_SHARING_POOLED;
    d.rope = (b0 & 3) != 1;
    static const moas_type kv_types[4] = {MOAS_TYPE_F32, MOAS_TYPE_F16, MOAS_TYPE_Q8_0,
                                          MOAS_TYPE_F16};
    d.kv_type = kv_types[(b0 >> 2) & 3];
    d.mode_sel = (b0 >> 4) & 3;
    d.mode_sel = d.mode_sel > 2 ? 2 : d.mode_sel;
    d.P = 1 << ((b0 >> 6) & 3);
    static const float steer[4] = {0.0f, 0.0f, 0.5f, 1.0f};
    d.steer_below = steer[b2 & 3];

    moas_pool_params pp;
    moas_pool_params_init(&pp);
    pp.kv_type = d.kv_type;
    pp.page_heads = d.P;
    pp.n_threads = 1;
    pp.allocator = &allocator;
    pp.steer_below = d.steer_below;
    pp.n_batch = (b2 & 0x80) ? 3 : 0;   /* blocks of 3 rows: runs straddle blocks */
    if (d.kv_type == MOAS_TYPE_Q8_0 && d.head_dim % 32 != 0) {
        pp.capacity_bytes = 1 << 16;
        moas_pool *p = (moas_pool *)&p;
        FUZZ_CHECK(moas_pool_create(d.model, &pp, &p) == MOAS_ERR_INVALID_ARG && p == NULL);
        d.kv_type = pp.kv_type = MOAS_TYPE_F32;
    }
    d.head_bytes = d.kv_type == MOAS_TYPE_Q8_0 ? (size_t)d.head_dim / 32 * 34
                                                 : (size_t)d.head_dim * (d.kv_type == MOAS_TYPE_F16 ? 2 : 4);
    d.page_bytes = (uint64_t)d.P * 2 * d.head_bytes;
    d.n_pages = 3 + b1 % (MAX_POOL_PAGES - 3);
    pp.capacity_bytes = (uint64_t)d.n_pages * d.page_bytes + (b2 >> 2) * d.page_bytes / 64;
    FUZZ_CHECK(moas_pool_create(d.model, &pp, &d.pool) == MOAS_OK);
    for (int32_t p = 0; p < d.n_pages; p++) {
        d.free_ids[p] = p;
    }
    d.n_free = d.n_pages;
    check_pool(&d);

    for (int step = 0; step < MAX_STEPS && cur.n > 0; step++) {
        const uint8_t op = fuzz_u8(&cur);
        snap_all(&d);
        switch ((opcode)(op % OP_COUNT)) {
        case OP_CREATE: step_create(&d, &cur); break;
        case OP_FREE: step_free(&d, &cur); break;
        case OP_FORK: step_fork(&d, &cur); break;
        case OP_DECODE: step_decode(&d, &cur, (op & 0x80) != 0); break;
        case OP_BATCH: step_batch(&d, &cur); break;
        case OP_POOL_DECODE: step_pool_decode(&d, &cur); break;
        case OP_TRUNCATE: step_truncate(&d, &cur); break;
        case OP_RESET: step_reset(&d, &cur); break;
        case OP_SHIFT: step_shift(&d, &cur); break;
        case OP_COMPACT: step_compact(&d, &cur); break;
        case OP_SAVE: step_save(&d, &cur); break;
        case OP_LOAD: step_load(&d, &cur); break;
        case OP_STATS: step_stats(&d, &cur); break;
        case OP_BAD_ARGS: step_bad_args(&d, &cur); break;
        case OP_VERIFY:
            if (++d.n_verify <= MAX_VERIFY) {
                verify(&d);
            }
            break;
        case OP_FORCE: step_force(&d, &cur); break;
        default: d.arm = 1 + fuzz_u8(&cur) % 8; continue;   /* for the next step's call */
        }
        d.arm = 0;
        check_pool(&d);
    }
    verify(&d);
    driver_free(&d);
    FUZZ_CHECK(counts.live == 0);
    return 0;
}
