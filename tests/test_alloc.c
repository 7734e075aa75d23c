/* test_alloc.c - allocation through the caller's allocator: nothing per token, nothing
 * leaked, and every allocation failure at creation reported cleanly. */
#include "test.h"

#include "context.h"
#include "support/tiny_model.h"

#include <stdlib.h>

typedef struct {
    long n_alloc;       /* successful allocations */
    long n_free;        /* frees of non-NULL pointers */
    long fail_at;       /* fail the allocation with this number (1-based); 0: never */
    long n_calls;
    size_t bytes;       /* bytes of the successful allocations */
} counting;

static void *count_alloc(void *user, size_t size) {
    counting *c = user;
    if (++c->n_calls == c->fail_at) {
        return NULL;
    }
    c->n_alloc++;
    c->bytes += size;
    return malloc(size);
}

static void count_free(void *user, void *ptr) {
    counting *c = user;
    if (ptr != NULL) {
        c->n_free++;
    }
    free(ptr);
}

TEST(decode_allocates_nothing_and_free_releases_everything) {
    counting c = {0, 0, 0, 0, 0};
    const moas_allocator alloc = {count_alloc, count_free, &c};
    moas_model_params mp;
    moas_context_params cp;
    moas_sampler_params sp;
    moas_model *m;
    moas_context *ctx;
    moas_sampler *smp;
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 1, &size);
    int32_t tokens[20];

    moas_model_params_init(&mp);
    mp.allocator = &alloc;
    moas_context_params_init(&cp);
    cp.allocator = &alloc;
    moas_sampler_params_init(&sp);
    sp.allocator = &alloc;
    sp.top_k = 5;
    sp.top_p = 0.9f;
    ASSERT_OK(moas_model_load_memory(image, size, &mp, &m));
    ASSERT_OK(moas_context_create(m, &cp, &ctx));
    ASSERT_OK(moas_sampler_create(&sp, moas_model_n_vocab(m), &smp));
    ASSERT_TRUE(c.n_alloc > 0);
    const long after_create = c.n_calls;

    for (int i = 0; i < 20; i++) {
        tokens[i] = i % moas_model_n_vocab(m);
    }
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 10, NULL, MOAS_LOGITS_LAST));
    for (int i = 0; i < 20; i++) {
        int32_t t;
        ASSERT_OK(moas_sampler_sample(smp, moas_context_logits(ctx), &t));
        ASSERT_OK(moas_context_decode(ctx, t, NULL));
    }
    ASSERT_OK(moas_context_truncate(ctx, 3));
    moas_context_reset(ctx);
    ASSERT_EQ(c.n_calls, after_create);   /* not one allocation per token */

    moas_sampler_free(smp);
    moas_context_free(ctx);
    moas_model_free(m);
    ASSERT_EQ(c.n_free, c.n_alloc);       /* and nothing leaked */
    free(image);
    return TEST_PASS;
}

/* Fail allocation 1, 2, 3, ... of model load (a RoPE model's too), context and sampler
 * creation (with and without the sampler's optional scratch) until the call succeeds:
 * each failure is MOAS_ERR_NO_MEMORY, sets *out to NULL and leaks nothing. */
TEST(allocation_failures_at_creation_are_clean) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 1, &size);
    moas_model *good;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &good));

    const moas_logit_bias bias[1] = {{3, -1.0f}};
    moas_pool_params gp;
    moas_pool *good_pool;
    moas_pool_params_init(&gp);
    gp.capacity_bytes = 1 << 16;
    ASSERT_OK(moas_pool_create(good, &gp, &good_pool));
    tiny_model_config rope_cfg;   /* a RoPE model: its table of angles is allocated too */
    tiny_model_config_default(&rope_cfg);
    rope_cfg.rope = true;
    size_t rope_size;
    uint8_t *rope_image = tiny_model_image(&rope_cfg, 1, &rope_size);
    ASSERT_TRUE(rope_image != NULL);
    for (int what = 0; what < 7; what++) {
        for (long n = 1;; n++) {
            counting c = {0, 0, n, 0, 0};
            const moas_allocator alloc = {count_alloc, count_free, &c};
            moas_status st;
            void *obj = &c;
            if (what == 0 || what == 6) {
                moas_model_params p;
                moas_model_params_init(&p);
                p.allocator = &alloc;
                st = what == 0 ? moas_model_load_memory(image, size, &p, (moas_model **)&obj)
                               : moas_model_load_memory(rope_image, rope_size, &p,
                                                        (moas_model **)&obj);
                if (st == MOAS_OK) moas_model_free(obj);
            } else if (what == 1) {
                moas_context_params p;
                moas_context_params_init(&p);
                p.allocator = &alloc;
                st = moas_context_create(good, &p, (moas_context **)&obj);
                if (st == MOAS_OK) moas_context_free(obj);
            } else if (what == 2 || what == 3) {
                moas_sampler_params p;
                moas_sampler_params_init(&p);
                p.allocator = &alloc;
                if (what == 3) {   /* with the scratch of biases and the penalty */
                    p.repeat_penalty = 1.1f;
                    p.n_logit_bias = 1;
                    p.logit_bias = bias;
                }
                st = moas_sampler_create(&p, 40, (moas_sampler **)&obj);
                if (st == MOAS_OK) moas_sampler_free(obj);
            } else if (what == 4) {
                moas_pool_params p;
                moas_pool_params_init(&p);
                p.allocator = &alloc;
                p.capacity_bytes = 1 << 16;
                st = moas_pool_create(good, &p, (moas_pool **)&obj);
                if (st == MOAS_OK) moas_pool_free(obj);
            } else if (what == 5) {   /* a context in a pool: a failure leaves the pool as it was */
                moas_context_params p;
                moas_pool_info info = {.size = sizeof info};
                moas_context_params_init(&p);
                p.allocator = &alloc;
                p.pool = good_pool;
                st = moas_context_create(good, &p, (moas_context **)&obj);
                if (st == MOAS_OK) moas_context_free(obj);
                ASSERT_OK(moas_pool_stats(good_pool, &info));
                ASSERT_EQ(info.n_contexts, 0);
                ASSERT_EQ(info.pages_free, info.n_pages);
            }
            ASSERT_EQ(c.n_free, c.n_alloc);
            if (st == MOAS_OK) {
                ASSERT_TRUE(n > 1);   /* at least one allocation was failed and survived */
                break;
            }
            ASSERT_STATUS(st, MOAS_ERR_NO_MEMORY);
            ASSERT_TRUE(obj == NULL);
            ASSERT_TRUE(strstr(moas_last_error(), "memory") != NULL);
            if ((what == 2 || what == 3) && n > 1) {   /* past the sampler itself, what
                * could not be had (a history of 2^31 tokens is 8 GiB: the caller sees so) */
                ASSERT_TRUE((strstr(moas_last_error(), "history of 64 tokens") != NULL) ==
                            (what == 3));
            }
            ASSERT_TRUE(n < 1000);
        }
    }
    moas_pool_free(good_pool);
    moas_model_free(good);
    free(image);
    free(rope_image);
    return TEST_PASS;
}

/* A pool's batched decode, truncate and free allocate nothing; fork allocates only
 * the new context; everything is given back. */
TEST(pool_decode_allocates_nothing) {
    counting c = {0, 0, 0, 0, 0};
    const moas_allocator alloc = {count_alloc, count_free, &c};
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 1, &size);
    moas_model *m;
    moas_pool_params pp;
    moas_context_params cp;
    moas_pool *pool;
    moas_context *a, *b, *f;
    int32_t tokens[16];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 18;
    pp.allocator = &alloc;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context_params_init(&cp);
    cp.allocator = &alloc;
    cp.pool = pool;
    ASSERT_OK(moas_context_create(m, &cp, &a));
    ASSERT_OK(moas_context_create(m, &cp, &b));
    for (int i = 0; i < 16; i++) {
        tokens[i] = (i * 7) % moas_model_n_vocab(m);
    }
    const long before = c.n_calls;
    moas_pool_seq q[2] = {{a, tokens, 9, MOAS_LOGITS_LAST, NULL},
                          {b, tokens + 3, 12, MOAS_LOGITS_NONE, NULL}};
    ASSERT_OK(moas_pool_decode(pool, q, 2));
    for (int i = 0; i < 4; i++) {
        q[0] = (moas_pool_seq){a, tokens + i, 1, MOAS_LOGITS_LAST, NULL};
        q[1] = (moas_pool_seq){b, tokens + i, 1, MOAS_LOGITS_LAST, NULL};
        ASSERT_OK(moas_pool_decode(pool, q, 2));
    }
    ASSERT_OK(moas_context_truncate(b, 2));
    ASSERT_EQ(c.n_calls, before);
    ASSERT_OK(moas_context_fork(a, &f));
    ASSERT_TRUE(c.n_calls > before);
    moas_context_free(f);
    moas_context_free(a);
    moas_context_free(b);
    moas_pool_free(pool);
    ASSERT_EQ(c.n_free, c.n_alloc);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A context of a caller's pool gets the workspace of its own calls (a block of
 * n_batch rows of activations) on its first such call, not at creation: a server's
 * sequences, which only moas_pool_decode advances, never allocate one. Once made, it
 * serves every later call; free gives it back. */
TEST(pool_context_workspace_comes_with_its_first_own_call) {
    counting c = {0, 0, 0, 0, 0};
    const moas_allocator alloc = {count_alloc, count_free, &c};
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 1, &size);
    moas_model *m;
    moas_pool_params pp;
    moas_context_params cp;
    moas_pool *pool;
    moas_context *ctx;
    int32_t tokens[8];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 18;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context_params_init(&cp);
    cp.allocator = &alloc;
    cp.pool = pool;
    ASSERT_OK(moas_context_create(m, &cp, &ctx));
    /* the nine n_embd-wide activations of a block (residual streams, q, k, v, ...) for
     * its n_batch rows, alone: what creation must not allocate, and the first call must */
    const size_t rows_bytes =
        9 * (size_t)ctx->batch_tokens * (size_t)moas_model_n_embd(m) * sizeof(float);
    ASSERT_TRUE(ctx->ws == NULL);
    ASSERT_TRUE(c.bytes < rows_bytes);
    ASSERT_TRUE(strcmp(moas_context_kernels_name(ctx), "") != 0);
    for (int i = 0; i < 8; i++) {
        tokens[i] = (i * 5) % moas_model_n_vocab(m);
    }
    const size_t created = c.bytes;
    long calls = c.n_calls;
    moas_pool_seq q = {ctx, tokens, 3, MOAS_LOGITS_LAST, NULL};
    ASSERT_OK(moas_pool_decode(pool, &q, 1));
    ASSERT_EQ(c.n_calls, calls);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 0, NULL, MOAS_LOGITS_NONE));
    ASSERT_EQ(c.n_calls, calls);   /* an empty batch needs no workspace */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 3, 2, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(c.n_calls > calls);
    ASSERT_TRUE(ctx->ws != NULL);
    ASSERT_TRUE(c.bytes - created >= rows_bytes);
    calls = c.n_calls;
    ASSERT_OK(moas_context_decode(ctx, tokens[5], NULL));
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 6, 2, NULL, MOAS_LOGITS_LAST));
    q.tokens = tokens;
    q.n_tokens = 1;
    ASSERT_OK(moas_pool_decode(pool, &q, 1));
    ASSERT_EQ(c.n_calls, calls);   /* not again, and never per token */
    moas_context_free(ctx);
    ASSERT_EQ(c.n_free, c.n_alloc);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Fail allocation 1, 2, ... of a pool context's first call of its own (decode, then
 * decode_batch), and of a fork of a context that has its workspace (the fork makes
 * its own at once, to inherit the tuning): each failure is MOAS_ERR_NO_MEMORY and
 * changes nothing (position, logits, pages, the pool's contexts), leaks nothing, and
 * the same call then succeeds with the logits of a context that never failed. */
TEST(first_own_call_allocation_failures_are_clean) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 1, &size);
    moas_model *m;
    moas_pool_params pp;
    moas_pool *pool;
    int32_t tokens[6];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    float *want = malloc((size_t)V * sizeof *want);
    float *got = malloc((size_t)V * sizeof *got);
    ASSERT_TRUE(want != NULL && got != NULL);
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 18;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    for (int i = 0; i < 6; i++) {
        tokens[i] = (i * 3 + 1) % V;
    }
    for (int what = 0; what < 3; what++) {
        /* the logits of a context that never failed */
        moas_context_params cp;
        moas_context *ref;
        moas_context_params_init(&cp);
        cp.pool = pool;
        cp.mode = MOAS_MODE_ROUTED;
        ASSERT_OK(moas_context_create(m, &cp, &ref));
        moas_pool_seq q = {ref, tokens, 4, MOAS_LOGITS_LAST, NULL};
        ASSERT_OK(moas_pool_decode(pool, &q, 1));
        ASSERT_OK(moas_context_decode_batch(ref, tokens + 4, 2, want, MOAS_LOGITS_LAST));
        moas_context_free(ref);
        for (long n = 1;; n++) {
            counting c = {0, 0, 0, 0, 0};
            const moas_allocator alloc = {count_alloc, count_free, &c};
            moas_context *ctx, *child = NULL;
            moas_pool_info before = {.size = sizeof before}, after = {.size = sizeof after};
            moas_status st;
            cp.allocator = &alloc;
            ASSERT_OK(moas_context_create(m, &cp, &ctx));
            q.ctx = ctx;
            ASSERT_OK(moas_pool_decode(pool, &q, 1));
            if (what == 2) {   /* the parent gets its workspace; the fork fails */
                ASSERT_OK(moas_context_decode_batch(ctx, tokens + 4, 0, NULL, MOAS_LOGITS_NONE));
                ASSERT_OK(moas__context_workspace(ctx, "test"));
            }
            const float *logits = moas_context_logits(ctx);
            ASSERT_TRUE(logits != NULL);
            memcpy(got, logits, (size_t)V * sizeof *got);
            ASSERT_OK(moas_pool_stats(pool, &before));
            c.fail_at = c.n_calls + n;
            if (what == 0) {
                st = moas_context_decode(ctx, tokens[4], NULL);
            } else if (what == 1) {
                st = moas_context_decode_batch(ctx, tokens + 4, 2, NULL, MOAS_LOGITS_LAST);
            } else {
                st = moas_context_fork(ctx, &child);
            }
            c.fail_at = 0;
            ASSERT_OK(moas_pool_stats(pool, &after));
            if (st == MOAS_OK) {
                ASSERT_TRUE(n > 1);   /* at least one allocation was failed and survived */
                if (what == 0) {
                    ASSERT_OK(moas_context_decode(ctx, tokens[5], got));
                } else if (what == 1) {
                    memcpy(got, moas_context_logits(ctx), (size_t)V * sizeof *got);
                } else {
                    ASSERT_TRUE(child != NULL && child->ws != NULL);
                    ASSERT_OK(moas_context_decode_batch(child, tokens + 4, 2, got,
                                                        MOAS_LOGITS_LAST));
                    moas_context_free(child);
                }
                ASSERT_TRUE(memcmp(got, want, (size_t)V * sizeof *got) == 0);
                moas_context_free(ctx);
                ASSERT_EQ(c.n_free, c.n_alloc);
                break;
            }
            ASSERT_STATUS(st, MOAS_ERR_NO_MEMORY);
            ASSERT_TRUE(strstr(moas_last_error(), "memory") != NULL);
            ASSERT_TRUE(child == NULL);
            ASSERT_EQ(moas_context_n_past(ctx), 4);
            ASSERT_TRUE(moas_context_logits(ctx) != NULL);
            ASSERT_TRUE(memcmp(moas_context_logits(ctx), got, (size_t)V * sizeof *got) == 0);
            ASSERT_EQ(after.pages_free, before.pages_free);
            ASSERT_EQ(after.n_contexts, before.n_contexts);
            /* and the context still works: the call again, allocations allowed */
            ASSERT_OK(moas_context_decode_batch(ctx, tokens + 4, 2, got, MOAS_LOGITS_LAST));
            ASSERT_TRUE(memcmp(got, want, (size_t)V * sizeof *got) == 0);
            moas_context_free(ctx);
            ASSERT_EQ(c.n_free, c.n_alloc);
            ASSERT_TRUE(n < 1000);
        }
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(want);
    free(got);
    free(image);
    return TEST_PASS;
}

/* Fail allocation 1, 2, ... of compaction's and of a context shift's first call on a
 * pool context that has no workspace yet (they need its scratch rows): each failure
 * is MOAS_ERR_NO_MEMORY and changes nothing (position, KV bytes, pages, the routes),
 * leaks nothing, and the same call then succeeds, the decode after it giving the
 * logits of a context that never failed. A pooled RoPE model in routed mode, so that
 * both calls apply. */
TEST(compact_and_shift_allocation_failures_are_clean) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.kv_sharing = "pooled";
    cfg.rope = true;
    size_t size;
    uint8_t *image = tiny_model_image(&cfg, 7, &size);
    moas_model *m;
    moas_pool_params pp;
    moas_pool *pool;
    int32_t tokens[10];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    float *want = malloc((size_t)V * sizeof *want);
    float *got = malloc((size_t)V * sizeof *got);
    ASSERT_TRUE(want != NULL && got != NULL);
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 18;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    for (int i = 0; i < 10; i++) {
        tokens[i] = (i * 7 + 2) % V;
    }
    for (int what = 0; what < 2; what++) {   /* 0: compact, 1: shift */
        moas_context_params cp;
        moas_context *ref;
        moas_context_params_init(&cp);
        cp.pool = pool;
        cp.mode = MOAS_MODE_ROUTED;
        ASSERT_OK(moas_context_create(m, &cp, &ref));
        moas_pool_seq q = {ref, tokens, 8, MOAS_LOGITS_LAST, NULL};
        ASSERT_OK(moas_pool_decode(pool, &q, 1));
        if (what == 0) {
            int32_t n_changed = 0;
            ASSERT_OK(moas_context_compact(ref, 6, 2, &n_changed));
            ASSERT_TRUE(n_changed > 0);   /* the test compacts something */
        } else {
            ASSERT_OK(moas_context_shift(ref, 2, 3));
        }
        ASSERT_OK(moas_context_decode_batch(ref, tokens + 8, 2, want, MOAS_LOGITS_LAST));
        moas_context_free(ref);
        for (long n = 1;; n++) {
            counting c = {0, 0, 0, 0, 0};
            const moas_allocator alloc = {count_alloc, count_free, &c};
            moas_context *ctx;
            moas_pool_info before = {.size = sizeof before}, after = {.size = sizeof after};
            int32_t routes_before[8 * 4] = {0}, routes_after[8 * 4] = {0};
            moas_status st;
            cp.allocator = &alloc;
            ASSERT_OK(moas_context_create(m, &cp, &ctx));
            q.ctx = ctx;
            ASSERT_OK(moas_pool_decode(pool, &q, 1));
            ASSERT_TRUE(ctx->ws == NULL);
            ASSERT_TRUE(moas_model_n_layer(m) * 8 <= (int32_t)(sizeof routes_before / sizeof *routes_before));
            ASSERT_OK(moas_context_routes(ctx, 0, 8, NULL, NULL, routes_before));
            const size_t bytes_before = moas_context_kv_bytes_used(ctx, -1);
            ASSERT_OK(moas_pool_stats(pool, &before));
            c.fail_at = c.n_calls + n;
            st = what == 0 ? moas_context_compact(ctx, 6, 2, NULL) : moas_context_shift(ctx, 2, 3);
            c.fail_at = 0;
            if (st == MOAS_OK) {
                ASSERT_TRUE(n > 1);   /* at least one allocation was failed and survived */
                ASSERT_OK(moas_context_decode_batch(ctx, tokens + 8, 2, got, MOAS_LOGITS_LAST));
                ASSERT_TRUE(memcmp(got, want, (size_t)V * sizeof *got) == 0);
                moas_context_free(ctx);
                ASSERT_EQ(c.n_free, c.n_alloc);
                break;
            }
            ASSERT_STATUS(st, MOAS_ERR_NO_MEMORY);
            ASSERT_TRUE(strstr(moas_last_error(), "memory") != NULL);
            ASSERT_OK(moas_pool_stats(pool, &after));
            ASSERT_EQ(after.pages_free, before.pages_free);
            ASSERT_EQ(moas_context_n_past(ctx), 8);
            ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), bytes_before);
            ASSERT_OK(moas_context_routes(ctx, 0, 8, NULL, NULL, routes_after));
            ASSERT_TRUE(memcmp(routes_before, routes_after, sizeof routes_before) == 0);
            /* and the context still works: the call again, allocations allowed */
            st = what == 0 ? moas_context_compact(ctx, 6, 2, NULL) : moas_context_shift(ctx, 2, 3);
            ASSERT_OK(st);
            ASSERT_OK(moas_context_decode_batch(ctx, tokens + 8, 2, got, MOAS_LOGITS_LAST));
            ASSERT_TRUE(memcmp(got, want, (size_t)V * sizeof *got) == 0);
            moas_context_free(ctx);
            ASSERT_EQ(c.n_free, c.n_alloc);
            ASSERT_TRUE(n < 1000);
        }
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(want);
    free(got);
    free(image);
    return TEST_PASS;
}
