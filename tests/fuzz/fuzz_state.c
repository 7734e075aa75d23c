/*
 * fuzz_state.c - saved state that is truncated, extended, edited or made up, loaded
 * into a context of a fixed tiny model (pooled K/V, so mixture and routed states both
 * occur) that holds tokens of its own.
 *
 * Input: byte 0 picks the mode (bit 0), the KV type (bit 1), whether the state is made
 * from scratch out of the input (bit 7) and the source's length (bits 2-6); byte 1 the
 * target's own tokens (bits 0-4), whether the target lives in a pool beside a fork of
 * itself that shares its pages (bit 5), whether that pool is small enough for a load to
 * find it full (bit 6), and Q8_0 K/V on a second model whose heads are 32 wide (bit 7,
 * for source and target; bit 1 of byte 0 is then ignored). Without bit 7 of byte 0 the
 * state is a real one, saved from a source context that decoded that many tokens, and
 * the rest of the input edits it: a new length (u16; 0 keeps it) and then triples
 * (offset u16, xor byte).
 *
 * After the load:
 *   - a failure changed nothing: n_past, the logits, the routing records and the KV
 *     bytes are as before, and the next decode equals that of an untouched twin;
 *   - whatever happened, a fork sharing the target's pages still equals the twin;
 *   - a success holds what the state said: saving again gives back the loaded bytes
 *     exactly (a state of version 1 or 2 comes back as version 3: its version and
 *     fingerprint words differ, nothing else), and decoding on works.
 * Under ASan this is also the proof that loading never reads or writes out of bounds.
 */
#include "fuzz.h"

#include "support/tiny_model.h"

#include <stdlib.h>
#include <string.h>

#define MAX_STATE (1u << 16)

static moas_model *model, *models[2];   /* heads of 8; heads of 32 (for Q8_0 K/V) */
static uint8_t state[MAX_STATE + 64], again[MAX_STATE + 64];

static void load_models_once(void) {
    if (models[0] != NULL) {
        return;
    }
    for (int i = 0; i < 2; i++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.kv_sharing = "pooled";
        if (i == 1) {
            cfg.n_embd = cfg.n_ff = 128;
        }
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 9, &size);
        FUZZ_CHECK(image != NULL);
        FUZZ_CHECK(moas_model_load_memory(image, size, NULL, &models[i]) == MOAS_OK);
        /* the model keeps a copy of an unaligned buffer, else it borrows: keep the image */
    }
}

static moas_context *make_in(moas_pool *pool, moas_mode mode, moas_type kv_type) {
    moas_context_params cp;
    moas_context *ctx = NULL;
    moas_context_params_init(&cp);
    cp.mode = mode;
    cp.kv_type = kv_type;
    cp.n_threads = 1;
    cp.pool = pool;
    FUZZ_CHECK(moas_context_create(model, &cp, &ctx) == MOAS_OK);
    return ctx;
}

static moas_context *make(moas_mode mode, moas_type kv_type) {
    return make_in(NULL, mode, kv_type);
}

static void decode_some(moas_context *ctx, int n, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        FUZZ_CHECK(moas_context_decode(ctx, (int32_t)((seed >> 8) % 40u), NULL) == MOAS_OK);
    }
}

static bool same(const moas_context *a, const moas_context *b) {
    const int32_t n = moas_context_n_past(a), V = moas_model_n_vocab(model);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    static float ga[32 * 8 * 8], gb[32 * 8 * 8];
    static int32_t sa[32 * 8], sb[32 * 8];
    if (n != moas_context_n_past(b) ||
        moas_context_kv_bytes_used(a, -1) != moas_context_kv_bytes_used(b, -1)) {
        return false;
    }
    FUZZ_CHECK(n <= 32 && L * S <= 64);
    FUZZ_CHECK(moas_context_routes(a, 0, n, ga, sa, NULL) == MOAS_OK);
    FUZZ_CHECK(moas_context_routes(b, 0, n, gb, sb, NULL) == MOAS_OK);
    const float *la = moas_context_logits(a), *lb = moas_context_logits(b);
    return memcmp(ga, gb, (size_t)n * L * S * sizeof *ga) == 0 &&
           memcmp(sa, sb, (size_t)n * L * sizeof *sa) == 0 && (la == NULL) == (lb == NULL) &&
           (la == NULL || memcmp(la, lb, (size_t)V * sizeof *la) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_cursor c = {data, size};
    load_models_once();
    const uint8_t flags = fuzz_u8(&c), target = fuzz_u8(&c);
    const bool q8 = (target & 0x80) != 0, pooled = (target & 0x20) != 0;
    model = models[q8];
    const moas_mode mode = flags & 1 ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
    const moas_type kv_type = q8 ? MOAS_TYPE_Q8_0 : flags & 2 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
    const int n_source = (flags >> 2) & 31, n_target = target % 32;
    size_t n_state;

    if (flags & 0x80) {   /* the rest of the input is the state */
        n_state = c.n < MAX_STATE ? c.n : MAX_STATE;
        memcpy(state, c.p, n_state);
    } else {
        moas_context *src = make(mode, kv_type);
        decode_some(src, n_source, 1);
        size_t written = 0;
        FUZZ_CHECK(moas_context_state_save(src, state, MAX_STATE, &written) == MOAS_OK);
        FUZZ_CHECK(written == moas_context_state_size(src));
        moas_context_free(src);
        n_state = written;
        const uint16_t len = fuzz_u16(&c);
        if (len != 0) {
            n_state = len;   /* a u16: never above MAX_STATE */
            if (n_state > written) {
                memset(state + written, 0, n_state - written);
            }
        }
        while (c.n >= 3) {
            const uint16_t at = fuzz_u16(&c);
            const uint8_t x = fuzz_u8(&c);
            if (n_state > 0) {
                state[at % n_state] ^= x;
            }
        }
    }

    /* the target: alone, or in a pool beside a fork of itself; a small pool holds 44
     * tokens of every head (the target and the fork's copied pages fit, a loaded state
     * of many tokens beside them may not) */
    moas_pool *pool = NULL;
    moas_context *fork = NULL;
    if (pooled) {
        moas_pool_params pp;
        moas_pool_params_init(&pp);
        pp.kv_type = kv_type;
        pp.n_threads = 1;
        const size_t head_bytes = kv_type == MOAS_TYPE_Q8_0
                                      ? (size_t)moas_model_head_dim(model) / 32 * 34
                                      : (size_t)moas_model_head_dim(model) *
                                            (kv_type == MOAS_TYPE_F16 ? 2 : 4);
        const size_t token_bytes = (size_t)moas_model_n_layer(model) *
                                   (size_t)moas_model_n_head(model) * 2 * head_bytes;
        pp.capacity_bytes = target & 0x40 ? 44 * token_bytes : (size_t)1 << 20;
        FUZZ_CHECK(moas_pool_create(model, &pp, &pool) == MOAS_OK);
    }
    moas_context *ctx = make_in(pool, mode, kv_type), *twin = make(mode, kv_type);
    decode_some(ctx, n_target, 2);
    decode_some(twin, n_target, 2);
    if (pooled) {
        FUZZ_CHECK(moas_context_fork(ctx, &fork) == MOAS_OK);
    }
    /* loaded from a buffer of exactly its size, so that ASan sees a read past its end
     * (the static buffer has room beyond any state) */
    uint8_t *exact = malloc(n_state > 0 ? n_state : 1);
    FUZZ_CHECK(exact != NULL);
    memcpy(exact, state, n_state);
    fuzz_prime_error();
    const moas_status st = moas_context_state_load(ctx, exact, n_state);
    free(exact);
    if (fork != NULL) {   /* its pages, shared with the target, are as they were */
        FUZZ_CHECK(same(fork, twin));
    }
    /* a decode after the load: OK, or in the small pool MOAS_ERR_POOL_FULL (which
     * changes nothing) */
    const bool may_fill = pooled && (target & 0x40);
    if (st != MOAS_OK) {
        FUZZ_CHECK(fuzz_error_replaced());
        FUZZ_CHECK(same(ctx, twin));
        if (moas_context_n_past(ctx) < moas_context_n_ctx(ctx)) {
            const moas_status ds = moas_context_decode(ctx, 3, NULL);
            FUZZ_CHECK(ds == MOAS_OK || (may_fill && ds == MOAS_ERR_POOL_FULL));
            if (ds == MOAS_OK) {
                FUZZ_CHECK(moas_context_decode(twin, 3, NULL) == MOAS_OK);
            }
            FUZZ_CHECK(same(ctx, twin));
        }
    } else {
        size_t written = 0;
        FUZZ_CHECK(moas_context_state_save(ctx, again, MAX_STATE, &written) == MOAS_OK);
        uint32_t version;
        memcpy(&version, state + 8, sizeof version);
        FUZZ_CHECK(written == n_state);
        if (version < 3) {   /* words 2-4: version and fingerprint */
            FUZZ_CHECK(memcmp(again, state, 8) == 0 &&
                       memcmp(again + 20, state + 20, n_state - 20) == 0);
        } else {
            FUZZ_CHECK(memcmp(again, state, n_state) == 0);
        }
        if (moas_context_n_past(ctx) < moas_context_n_ctx(ctx)) {
            const moas_status ds = moas_context_decode(ctx, 5, NULL);
            FUZZ_CHECK(ds == MOAS_OK || (may_fill && ds == MOAS_ERR_POOL_FULL));
        }
    }
    if (fork != NULL && moas_context_n_past(fork) < moas_context_n_ctx(fork)) {
        moas_context *again_twin = make(mode, kv_type);
        decode_some(again_twin, n_target, 2);
        const moas_status ds = moas_context_decode(fork, 7, NULL);
        FUZZ_CHECK(ds == MOAS_OK || (may_fill && ds == MOAS_ERR_POOL_FULL));
        if (ds == MOAS_OK) {
            FUZZ_CHECK(moas_context_decode(again_twin, 7, NULL) == MOAS_OK);
        }
        FUZZ_CHECK(same(fork, again_twin));
        moas_context_free(again_twin);
    }
    moas_context_free(ctx);
    moas_context_free(twin);
    moas_context_free(fork);
    moas_pool_free(pool);
    return 0;
}
