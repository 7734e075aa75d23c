/* test_pool.c - the KV pool: batched decode equals decoding alone bit for bit, a full
 * pool changes nothing, fork shares pages and copies on write, saved state round trips
 * and bad state is refused, contexts of one pool on several threads. */
#include "test.h"

#include "context.h"
#include "support/tiny_model.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Tokens from a fixed generator, valid for the model. */
static void seq_tokens(int32_t *tokens, int32_t n, int32_t n_vocab, uint32_t seed) {
    for (int32_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        tokens[i] = (int32_t)((seed >> 8) % (uint32_t)n_vocab);
    }
}

/* The models the bitwise tests run: router mixing with independent schemes (f32 and
 * Q8_0 weights), mean mixing, pooled K/V (f16 weights), and pooled K/V with RoPE,
 * RMSNorm and SwiGLU. Context 64 each. */
enum { N_KINDS = 5 };
static uint8_t *kind_image(int kind, size_t *size) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.n_ctx_train = 64;
    cfg.n_embd = 32;
    cfg.n_ff = 64;
    if (kind == 1) {
        cfg.mat_type = MOAS_TYPE_Q8_0;
        cfg.router_hidden = 32;   /* Q8_0 rows are blocks of 32 */
    } else if (kind == 2) {
        cfg.mixing = MOAS_MIXING_MEAN;
    } else if (kind == 3) {
        cfg.kv_sharing = "pooled";
        cfg.mat_type = MOAS_TYPE_F16;
        cfg.emb_type = MOAS_TYPE_F16;
    } else if (kind == 4) {
        cfg.kv_sharing = "pooled";
        cfg.rope = cfg.rms_norm = cfg.swiglu = true;
    }
    return tiny_model_image(&cfg, 40 + (uint64_t)kind, size);
}

static moas_pool *make_pool(const moas_model *m, uint64_t bytes, moas_type kv_type,
                            int32_t threads, int32_t n_batch, int32_t page_heads) {
    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = bytes;
    pp.kv_type = kv_type;
    pp.n_threads = threads;
    pp.n_batch = n_batch;
    pp.page_heads = page_heads;
    if (moas_pool_create(m, &pp, &pool) != MOAS_OK) {
        return NULL;
    }
    pool->ws->parallel_min_work = 0;   /* tiny models take every parallel path, */
    pool->ws->team.never_solo = true;  /* with the team, never on the leader alone */
    return pool;
}

static moas_context *make_ctx(const moas_model *m, moas_pool *pool, moas_mode mode,
                              moas_type kv_type, int32_t threads) {
    moas_context_params cp;
    moas_context *ctx = NULL;
    moas_context_params_init(&cp);
    cp.pool = pool;
    cp.mode = mode;
    cp.kv_type = kv_type;
    cp.n_threads = threads;
    if (moas_context_create(m, &cp, &ctx) != MOAS_OK) {
        return NULL;
    }
    if (moas__context_workspace(ctx, "make_ctx") != MOAS_OK) {   /* made now, to tune it */
        moas_context_free(ctx);
        return NULL;
    }
    ctx->ws->parallel_min_work = 0;
    ctx->ws->team.never_solo = true;
    return ctx;
}

/* Whether two contexts hold the same routing records and KV use. */
/* moas_pool_stats 200 times, while other threads decode in the pool: it answers, and
 * its free pages stay within the pool's. */
static bool pool_figures_read_while_they_change(moas_pool *pool) {
    for (int i = 0; i < 200; i++) {
        moas_pool_info info = {.size = sizeof info};
        if (moas_pool_stats(pool, &info) != MOAS_OK || info.pages_free < 0 ||
            info.pages_free > info.n_pages) {
            return false;
        }
    }
    return true;
}

static bool same_records(const moas_context *a, const moas_context *b) {
    const moas_model *m = a->model;
    const size_t n = (size_t)a->n_past, L = (size_t)m->n_layer, S = (size_t)m->n_scheme;
    return a->n_past == b->n_past &&
           memcmp(a->route_gates, b->route_gates, n * L * S * sizeof(float)) == 0 &&
           memcmp(a->route_scheme, b->route_scheme, n * L) == 0 &&
           moas_context_kv_bytes_used(a, -1) == moas_context_kv_bytes_used(b, -1);
}

enum { B = 5, PROMPT_MAX = 23, GEN = 6 };

/* The KV head a query head reads, found by multiplication (kv_cache.h), against the
 * division it stands for: every head count the loader accepts, every width a scheme
 * can have (a divisor of it) and every query head. */
TEST(head_group_without_division_is_exact) {
    for (uint32_t n_head = 1; n_head <= MOAS_MAX_HEADS; n_head++) {
        const uint64_t recip = moas__head_group_recip((int32_t)n_head);
        for (uint32_t w = 1; w <= n_head; w++) {
            if (n_head % w != 0) {
                continue;
            }
            for (uint32_t h = 0; h < n_head; h++) {
                if (moas__head_group(h, w, recip) != h * w / n_head) {
                    test_report(__FILE__, __LINE__, "head group",
                                "n_head %u, w %u, h %u: %u, want %u", n_head, w, h,
                                moas__head_group(h, w, recip), h * w / n_head);
                    return TEST_FAIL;
                }
            }
        }
    }
    return TEST_PASS;
}

/* Five sequences with prompts of 0 to 23 tokens decoded by moas_pool_decode, joining
 * at different steps and generating one token per step, equal decoding each alone,
 * bit for bit: every logit, routing record and KV byte count. Blocks of 7 rows (so
 * sequences straddle blocks), for every model kind, both modes, f32 and f16 caches
 * and 1 to 3 threads. */
TEST(pool_batch_equals_alone_bit_for_bit) {
    static const int32_t prompt_len[B] = {23, 1, 9, 16, 0};
    static const int32_t join_step[B] = {0, 0, 1, 2, 0};
    for (int kind = 0; kind < N_KINDS; kind++) {
        size_t size;
        uint8_t *image = kind_image(kind, &size);
        moas_model *m;
        ASSERT_TRUE(image != NULL);
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
        const int32_t V = moas_model_n_vocab(m);
        int32_t tokens[B][PROMPT_MAX + GEN + 1];
        for (int32_t s = 0; s < B; s++) {
            seq_tokens(tokens[s], PROMPT_MAX + GEN + 1, V, 100 + (uint32_t)s);
        }
        float *want = malloc((size_t)B * (PROMPT_MAX + GEN + 1) * V * sizeof *want);
        float *got = malloc((size_t)B * (PROMPT_MAX + GEN + 1) * V * sizeof *got);
        ASSERT_TRUE(want != NULL && got != NULL);
        for (int variant = 0; variant < 6; variant++) {
            const moas_mode mode = variant % 2 ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            const moas_type kv_type = variant / 2 == 1 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
            const int32_t threads = 1 + (variant + kind) % 3;
            moas_context *alone[B], *in_pool[B];
            moas_pool *pool = make_pool(m, 1 << 20, kv_type, threads, 7, 4);
            ASSERT_TRUE(pool != NULL);
            for (int32_t s = 0; s < B; s++) {
                alone[s] = make_ctx(m, NULL, mode, kv_type, 1);
                in_pool[s] = make_ctx(m, pool, mode, MOAS_TYPE_F32, threads);
                ASSERT_TRUE(alone[s] != NULL && in_pool[s] != NULL);
            }
            /* alone: the prompt as one batch with every logit, then one token a step */
            for (int32_t s = 0; s < B; s++) {
                float *w = want + (size_t)s * (PROMPT_MAX + GEN + 1) * V;
                ASSERT_OK(moas_context_decode_batch(alone[s], tokens[s], prompt_len[s], w,
                                                    MOAS_LOGITS_ALL));
                for (int32_t g = 0; g < GEN - join_step[s]; g++) {
                    const int32_t i = prompt_len[s] + g;
                    ASSERT_OK(moas_context_decode(alone[s], tokens[s][i], w + (size_t)i * V));
                }
            }
            /* in the pool: step k carries each sequence that has joined: its prompt and
             * first generated token at its join step, one token after */
            for (int32_t step = 0; step < GEN; step++) {
                moas_pool_seq q[B];
                int32_t n_q = 0;
                for (int32_t s = 0; s < B; s++) {
                    const int32_t n_done = in_pool[s]->n_past;
                    if (step < join_step[s] || n_done >= prompt_len[s] + GEN - join_step[s]) {
                        continue;
                    }
                    q[n_q].ctx = in_pool[s];
                    q[n_q].tokens = tokens[s] + n_done;
                    q[n_q].n_tokens = step == join_step[s] ? prompt_len[s] + 1 : 1;
                    q[n_q].which = MOAS_LOGITS_ALL;
                    q[n_q].logits = got + ((size_t)s * (PROMPT_MAX + GEN + 1) + n_done) * V;
                    n_q++;
                }
                ASSERT_OK(moas_pool_decode(pool, q, n_q));
            }
            for (int32_t s = 0; s < B; s++) {
                const size_t n = (size_t)(prompt_len[s] + GEN - join_step[s]);
                const size_t at = (size_t)s * (PROMPT_MAX + GEN + 1) * V;
                ASSERT_EQ(in_pool[s]->n_past, n);
                if (memcmp(want + at, got + at, n * V * sizeof *want) != 0) {
                    test_report(__FILE__, __LINE__, "bitwise", "kind %d variant %d seq %d", kind,
                                variant, (int)s);
                    return TEST_FAIL;
                }
                ASSERT_TRUE(same_records(alone[s], in_pool[s]));
                ASSERT_TRUE(memcmp(moas_context_logits(alone[s]), moas_context_logits(in_pool[s]),
                                   (size_t)V * sizeof(float)) == 0);
            }
            /* with a team, some blocks ran their sequences split between its threads */
            ASSERT_TRUE((pool->ws->shard_blocks > 0) == (threads > 1));
            for (int32_t s = 0; s < B; s++) {
                moas_context_free(alone[s]);
                moas_context_free(in_pool[s]);
            }
            moas_pool_info info = {.size = sizeof info};
            ASSERT_OK(moas_pool_stats(pool, &info));
            ASSERT_EQ(info.pages_free, info.n_pages);   /* freeing gave every page back */
            moas_pool_free(pool);
        }
        free(want);
        free(got);
        moas_model_free(m);
        free(image);
    }
    return TEST_PASS;
}

/* Pages follow the tokens: a routed sequence holds ceil(heads / P) pages per layer,
 * the pool's figures add up, truncate gives pages back. */
TEST(pool_pages_follow_tokens) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    int32_t tokens[40];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    seq_tokens(tokens, 40, moas_model_n_vocab(m), 9);
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 16);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(pool != NULL && a != NULL && b != NULL);
    ASSERT_OK(moas_context_decode_batch(a, tokens, 37, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_decode_batch(b, tokens, 11, NULL, MOAS_LOGITS_NONE));

    /* routed: each layer's stream holds the heads its schemes stored */
    const int32_t L = moas_model_n_layer(m), S = moas_model_n_scheme(m);
    int32_t kv_heads[37 * 8], want_pages = 0;
    ASSERT_TRUE(L <= 8);
    ASSERT_OK(moas_context_routes(a, 0, 37, NULL, NULL, kv_heads));
    for (int32_t l = 0; l < L; l++) {
        int32_t heads = 0;
        for (int32_t j = 0; j < 37; j++) {
            heads += kv_heads[j * L + l];
        }
        want_pages += (heads + 15) / 16;
    }
    ASSERT_EQ(moas_context_kv_pages(a), want_pages);
    /* mixture: every scheme's stream, 11 tokens of n_kv(s) heads: 4, 2, 1 -> 44, 22, 11 */
    ASSERT_EQ(S, 3);
    ASSERT_EQ(moas_context_kv_pages(b), L * (3 + 2 + 1));
    const size_t page_bytes = (size_t)16 * moas_model_head_dim(m) * 2 * 4;
    ASSERT_EQ(moas_context_kv_bytes_held(a), (size_t)want_pages * page_bytes);

    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.page_bytes, page_bytes);
    ASSERT_EQ(info.n_pages, (1 << 20) / page_bytes);
    ASSERT_EQ(info.n_pages - info.pages_free, want_pages + L * 6);
    ASSERT_EQ(info.bytes_held, (uint64_t)(want_pages + L * 6) * page_bytes);
    ASSERT_EQ(info.bytes_used, moas_context_kv_bytes_used(a, -1) + moas_context_kv_bytes_used(b, -1));
    ASSERT_EQ(info.bytes_stored, info.bytes_used - (uint64_t)37 * L * 5);   /* a's bookkeeping */
    ASSERT_EQ(info.n_contexts, 2);

    /* truncate and reset give pages back */
    ASSERT_OK(moas_context_truncate(b, 4));   /* 16, 8, 4 heads: one page each */
    ASSERT_EQ(moas_context_kv_pages(b), L * 3);
    moas_context_reset(a);
    ASSERT_EQ(moas_context_kv_pages(a), 0);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.n_pages - info.pages_free, L * 3);
    moas_context_free(a);
    moas_context_free(b);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, info.n_pages);
    ASSERT_EQ(info.n_contexts, 0);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* page_heads takes every power of two in [1, 4096], both ends included, and nothing
 * past them; the pool holds the whole pages capacity_bytes has room for (a page is
 * page_heads heads of K and as many of V: page_heads * head_dim * 2 * element bytes),
 * and moas_pool_stats reports their bytes as bytes_capacity, not the bytes asked for. */
TEST(pool_page_heads_range_is_inclusive_and_capacity_is_whole_pages) {
    size_t size;
    uint8_t *image = kind_image(0, &size);   /* heads of 8: 32 bytes of K at f32 */
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_head_dim(m), 8);
    static const struct {
        int32_t page_heads;
        uint64_t capacity, page_bytes, n_pages, bytes_capacity;
    } cases[] = {
        {1, 1000, 64, 15, 960},                 /* 1 * 8 * 2 * 4; 40 bytes left over */
        {4, 4096, 256, 16, 4096},               /* the default */
        {4096, 600000, 262144, 2, 524288},      /* 4096 * 8 * 2 * 4 */
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        moas_pool_params pp;
        moas_pool *pool = NULL;
        moas_pool_params_init(&pp);
        pp.page_heads = cases[c].page_heads;
        pp.capacity_bytes = cases[c].capacity;
        pp.n_threads = 1;
        ASSERT_OK(moas_pool_create(m, &pp, &pool));
        moas_pool_info info = {.size = sizeof info};
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.page_heads, cases[c].page_heads);
        ASSERT_EQ(info.page_bytes, cases[c].page_bytes);
        ASSERT_EQ(info.n_pages, cases[c].n_pages);
        ASSERT_EQ(info.pages_free, cases[c].n_pages);
        ASSERT_EQ(info.bytes_capacity, cases[c].bytes_capacity);
        ASSERT_EQ(info.bytes_held, 0);
        ASSERT_EQ(info.n_contexts, 0);
        moas_pool_free(pool);
    }
    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 20;
    pp.page_heads = 8192;
    ASSERT_STATUS(moas_pool_create(m, &pp, &pool), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "page_heads") != NULL);
    ASSERT_TRUE(pool == NULL);
    pp.page_heads = -4;
    ASSERT_STATUS(moas_pool_create(m, &pp, &pool), MOAS_ERR_INVALID_ARG);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A call that cannot get its pages fails with MOAS_ERR_POOL_FULL naming the shortfall
 * and changes nothing in any sequence: after pages come free, the same call gives
 * exactly what it would have. */
TEST(pool_full_changes_nothing) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    int32_t tokens[64];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 64, V, 5);
    const size_t page_bytes = (size_t)4 * moas_model_head_dim(m) * 2 * 4;
    /* mixture, 2 layers, streams of 4, 2 and 1 heads a token, pages of 4 heads: a's 10
     * tokens hold 2 x (10 + 5 + 3) = 36 pages, b's 2 tokens 2 x (2 + 1 + 1) = 8, and
     * the pool has 48 */
    moas_pool *pool = make_pool(m, 48 * page_bytes, MOAS_TYPE_F32, 1, 0, 4);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *ref = make_ctx(m, NULL, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(pool && a && b && ref);
    float *la = malloc((size_t)V * sizeof *la), *lr = malloc((size_t)V * sizeof *lr);
    ASSERT_TRUE(la && lr);
    ASSERT_OK(moas_context_decode_batch(a, tokens, 10, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(b, tokens + 20, 2, NULL, MOAS_LOGITS_LAST));
    moas_pool_info before = {.size = sizeof before}, after = {.size = sizeof after};
    ASSERT_OK(moas_pool_stats(pool, &before));
    ASSERT_EQ(before.pages_free, 48 - 36 - 8);

    /* 3 more tokens of a need 2 x (3 + 2 + 1) = 12 pages, one more of b 2 x 2: with 4
     * free both calls fail, in a pool call and alone */
    moas_pool_seq q[2] = {{b, tokens + 22, 1, MOAS_LOGITS_LAST, NULL},
                          {a, tokens + 10, 3, MOAS_LOGITS_LAST, la}};
    ASSERT_STATUS(moas_pool_decode(pool, q, 2), MOAS_ERR_POOL_FULL);
    ASSERT_TRUE(strstr(moas_last_error(), "lacks 12 page(s): 16 needed, 4 free") != NULL);
    ASSERT_STATUS(moas_context_decode_batch(a, tokens + 10, 3, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_POOL_FULL);
    /* a count past the context's room is refused before its tokens are read (here it
     * runs far past the array) */
    const moas_pool_seq far = {b, tokens + 22, 100000, MOAS_LOGITS_NONE, NULL};
    ASSERT_STATUS(moas_pool_decode(pool, &far, 1), MOAS_ERR_CONTEXT_FULL);
    ASSERT_OK(moas_pool_stats(pool, &after));
    ASSERT_EQ(after.pages_free, before.pages_free);
    ASSERT_EQ(after.bytes_used, before.bytes_used);
    ASSERT_EQ(a->n_past, 10);
    ASSERT_EQ(b->n_past, 2);

    /* b gives its pages back; the same call now runs and equals decoding alone */
    moas_context_free(b);
    ASSERT_OK(moas_pool_decode(pool, &q[1], 1));
    ASSERT_OK(moas_context_decode_batch(ref, tokens, 13, lr, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(la, lr, (size_t)V * sizeof *la) == 0);
    ASSERT_TRUE(same_records(a, ref));
    free(la);
    free(lr);
    moas_context_free(a);
    moas_context_free(ref);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The same in routed mode with pages shared by a fork: a parent and its fork (truncated
 * into the shared pages, so its next token must copy one first) in one pool call that
 * finds the pool full leave every byte of both sequences' saved state and the pool's
 * figures as they were; with room, the same call equals decoding each alone. */
static uint8_t *saved_state(const moas_context *ctx, size_t *size) {
    *size = moas_context_state_size(ctx);
    uint8_t *buf = malloc(*size);
    size_t written = 0;
    if (buf != NULL && moas_context_state_save(ctx, buf, *size, &written) != MOAS_OK) {
        free(buf);
        return NULL;
    }
    *size = written;
    return buf;
}

TEST(pool_full_changes_nothing_routed_with_shared_pages) {
    enum { N = 24 };
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V */
    moas_model *m;
    int32_t tokens[N], other[8];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, N, V, 61);
    seq_tokens(other, 8, V, 62);
    moas_pool *pool = make_pool(m, 64 << 10, MOAS_TYPE_F32, 1, 0, 4);
    moas_context *p = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1), *f = NULL;
    moas_context *filler = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *spent[64];
    int32_t n_spent = 0;
    ASSERT_TRUE(pool && p && filler);
    ASSERT_OK(moas_context_decode_batch(p, tokens, 12, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_fork(p, &f));
    ASSERT_OK(moas_context_truncate(f, 3));
    /* fillers take pages until not even one more of their tokens fits */
    moas_status st = MOAS_OK;
    for (int32_t i = 0; st == MOAS_OK; i = (i + 1) % N) {
        st = moas_context_decode(filler, tokens[i], NULL);
        if (st == MOAS_ERR_CONTEXT_FULL && n_spent < 64) {   /* full first: another one */
            spent[n_spent++] = filler;
            filler = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
            ASSERT_TRUE(filler != NULL);
            st = MOAS_OK;
        }
    }
    ASSERT_STATUS(st, MOAS_ERR_POOL_FULL);
    size_t np0, nf0, np1, nf1;
    uint8_t *p0 = saved_state(p, &np0), *f0 = saved_state(f, &nf0);
    ASSERT_TRUE(p0 && f0);
    moas_pool_info before = {.size = sizeof before}, after = {.size = sizeof after};
    ASSERT_OK(moas_pool_stats(pool, &before));
    moas_pool_seq q[2] = {{f, other, 4, MOAS_LOGITS_LAST, NULL},
                          {p, tokens + 12, 2, MOAS_LOGITS_LAST, NULL}};
    ASSERT_STATUS(moas_pool_decode(pool, q, 2), MOAS_ERR_POOL_FULL);
    ASSERT_TRUE(strstr(moas_last_error(), "lacks ") != NULL);
    ASSERT_OK(moas_pool_stats(pool, &after));
    ASSERT_EQ(after.pages_free, before.pages_free);
    ASSERT_EQ(after.bytes_held, before.bytes_held);
    ASSERT_EQ(after.bytes_used, before.bytes_used);
    uint8_t *p1 = saved_state(p, &np1), *f1 = saved_state(f, &nf1);
    ASSERT_TRUE(p1 && f1);
    ASSERT_TRUE(np1 == np0 && memcmp(p1, p0, np0) == 0);
    ASSERT_TRUE(nf1 == nf0 && memcmp(f1, f0, nf0) == 0);

    /* room again: the same call, each sequence as alone */
    moas_context_free(filler);
    for (int32_t i = 0; i < n_spent; i++) {
        moas_context_free(spent[i]);
    }
    ASSERT_OK(moas_pool_decode(pool, q, 2));
    for (int k = 0; k < 2; k++) {
        moas_context *ref = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(ref != NULL);
        ASSERT_OK(moas_context_decode_batch(ref, tokens, k == 0 ? 3 : 14, NULL,
                                            MOAS_LOGITS_LAST));
        if (k == 0) {
            ASSERT_OK(moas_context_decode_batch(ref, other, 4, NULL, MOAS_LOGITS_LAST));
        }
        const moas_context *got = k == 0 ? f : p;
        ASSERT_TRUE(memcmp(moas_context_logits(ref), moas_context_logits(got),
                           (size_t)V * sizeof(float)) == 0);
        ASSERT_TRUE(same_records(ref, got));
        moas_context_free(ref);
    }
    free(p0);
    free(f0);
    free(p1);
    free(f1);
    moas_context_free(f);
    moas_context_free(p);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A call that stores nothing needs no page: an empty decode (or a pool call's part of
 * 0 tokens) on a context whose partly written last page it shares with a fork neither
 * copies that page nor fails when the pool is full (it copied it, and failed with
 * MOAS_ERR_POOL_FULL when no page was free). A token there still needs the copy. */
TEST(empty_call_needs_no_page) {
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V: mixture stores every head */
    moas_model *m;
    int32_t tokens[6];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    seq_tokens(tokens, 6, moas_model_n_vocab(m), 5);
    moas_pool *pool = make_pool(m, 1 << 14, MOAS_TYPE_F32, 1, 0, 16);   /* a filler fills it */
    moas_context *parent = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *filler = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *child = NULL;
    ASSERT_TRUE(pool && parent && filler);
    ASSERT_OK(moas_context_decode_batch(parent, tokens, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_fork(parent, &child));
    ASSERT_OK(moas_context_truncate(child, 2));   /* its last pages: shared, partly written */
    while (moas_context_decode(filler, tokens[0], NULL) == MOAS_OK) {
    }
    moas_pool_info before = {.size = sizeof before}, after = {.size = sizeof after};
    ASSERT_OK(moas_pool_stats(pool, &before));
    ASSERT_EQ(before.pages_free, 0);
    ASSERT_OK(moas_context_decode_batch(child, NULL, 0, NULL, MOAS_LOGITS_LAST));
    moas_pool_seq empty = {child, tokens, 0, MOAS_LOGITS_NONE, NULL};
    ASSERT_OK(moas_pool_decode(pool, &empty, 1));
    ASSERT_OK(moas_pool_stats(pool, &after));
    ASSERT_EQ(after.pages_free, 0);
    ASSERT_EQ(after.bytes_held, before.bytes_held);
    ASSERT_EQ(moas_context_n_past(child), 2);
    ASSERT_EQ(moas_context_decode(child, tokens[2], NULL), MOAS_ERR_POOL_FULL);
    moas_context_free(filler);   /* room: now the token copies the page and goes on */
    ASSERT_OK(moas_context_decode(child, tokens[2], NULL));
    ASSERT_EQ(moas_context_n_past(child), 3);
    moas_context_free(child);
    moas_context_free(parent);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Forks share full pages and copy the partly filled last one; writes into a shared
 * page copy it first, so parent and forks never see each other's tokens: each equals
 * a context that decoded its whole history alone. */
TEST(fork_shares_pages_and_copies_on_write) {
    enum { N_FORK = 4, PROMPT = 21 };
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V */
    moas_model *m;
    int32_t prompt[PROMPT], tail[N_FORK + 1][8];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(prompt, PROMPT, V, 77);
    for (int32_t f = 0; f <= N_FORK; f++) {
        seq_tokens(tail[f], 8, V, 200 + (uint32_t)f);
    }
    for (int mode = 0; mode < 2; mode++) {
        const moas_mode md = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
        moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F16, 2, 0, 16);
        moas_context *parent = make_ctx(m, pool, md, MOAS_TYPE_F16, 2), *forks[N_FORK];
        ASSERT_TRUE(pool && parent);
        ASSERT_OK(moas_context_decode_batch(parent, prompt, PROMPT, NULL, MOAS_LOGITS_LAST));
        moas_pool_info info = {.size = sizeof info};
        ASSERT_OK(moas_pool_stats(pool, &info));
        const int32_t prompt_pages = info.n_pages - info.pages_free;
        ASSERT_EQ(prompt_pages, moas_context_kv_pages(parent));
        /* the partial last pages: one per layer unless a stream ends on a page edge */
        int32_t partial = 0;
        for (int32_t i = 0; i < parent->n_streams; i++) {
            partial += moas__kv_heads_at(&parent->kv[i], PROMPT) % 16 != 0;
        }
        for (int32_t f = 0; f < N_FORK; f++) {
            ASSERT_OK(moas_context_fork(parent, &forks[f]));
            ASSERT_EQ(moas_context_n_past(forks[f]), PROMPT);
            ASSERT_TRUE(memcmp(moas_context_logits(forks[f]), moas_context_logits(parent),
                               (size_t)V * sizeof(float)) == 0);
        }
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.n_pages - info.pages_free, prompt_pages + N_FORK * partial);

        /* everyone goes on differently: the forks in one pool call, the parent alone
         * after truncating into its shared pages */
        ASSERT_OK(moas_context_truncate(parent, 3));
        ASSERT_OK(moas_context_decode_batch(parent, tail[N_FORK], 8, NULL, MOAS_LOGITS_LAST));
        for (int32_t step = 0; step < 8; step++) {
            moas_pool_seq q[N_FORK];
            for (int32_t f = 0; f < N_FORK; f++) {
                q[f] = (moas_pool_seq){forks[f], &tail[f][step], 1, MOAS_LOGITS_LAST, NULL};
            }
            ASSERT_OK(moas_pool_decode(pool, q, N_FORK));
        }
        for (int32_t f = 0; f <= N_FORK; f++) {
            moas_context *ref = make_ctx(m, NULL, md, MOAS_TYPE_F16, 1);
            const moas_context *c = f < N_FORK ? forks[f] : parent;
            ASSERT_TRUE(ref != NULL);
            ASSERT_OK(moas_context_decode_batch(ref, prompt, f < N_FORK ? PROMPT : 3, NULL,
                                                MOAS_LOGITS_NONE));
            ASSERT_OK(moas_context_decode_batch(ref, tail[f], 8, NULL, MOAS_LOGITS_LAST));
            ASSERT_TRUE(memcmp(moas_context_logits(ref), moas_context_logits(c),
                               (size_t)V * sizeof(float)) == 0);
            ASSERT_TRUE(same_records(ref, c));
            moas_context_free(ref);
        }
        for (int32_t f = 0; f < N_FORK; f++) {
            moas_context_free(forks[f]);
        }
        moas_context_free(parent);
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, info.n_pages);
        moas_pool_free(pool);
        if (md != MOAS_MODE_MIXTURE) {
            continue;
        }
        /* a pool with one page free after the prompt (mixture mode takes exactly the
         * prompt's pages): a fork needing `partial` copies fails whole, names how many
         * pages it lacked, and takes none */
        ASSERT_TRUE(partial >= 2);
        pool = make_pool(m, (uint64_t)(prompt_pages + 1) * info.page_bytes, MOAS_TYPE_F16, 2,
                         0, 16);
        parent = make_ctx(m, pool, md, MOAS_TYPE_F16, 2);
        ASSERT_TRUE(pool && parent);
        ASSERT_OK(moas_context_decode_batch(parent, prompt, PROMPT, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 1);
        moas_context *child = forks[0];
        ASSERT_STATUS(moas_context_fork(parent, &child), MOAS_ERR_POOL_FULL);
        ASSERT_TRUE(child == NULL);
        char want[128];
        snprintf(want, sizeof want, "context_fork: the KV pool lacks %d page(s): %d needed, 1 "
                 "free of %d", partial - 1, partial, info.n_pages);
        ASSERT_TRUE(strstr(moas_last_error(), want) != NULL);
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 1);
        ASSERT_EQ(moas_context_kv_pages(parent), prompt_pages);
        moas_context_free(parent);
        moas_pool_free(pool);
    }
    /* a context with a private cache has no pool to share */
    moas_context *own = make_ctx(m, NULL, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1), *child = NULL;
    ASSERT_STATUS(moas_context_fork(own, &child), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(child == NULL);
    ASSERT_STATUS(moas_context_fork(NULL, &child), MOAS_ERR_INVALID_ARG);
    moas_context_free(own);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Two forks truncated into the page they share, both of them in one pool call: the
 * first to write copies the page, the second then holds it alone and writes in place,
 * so the call needs one copy, not two (it did count two, and refused a pool with the
 * pages free that decoding them one after the other takes). The pooled model, mixture
 * mode (4 heads a token and layer), pages of 16 heads, a pool of 6 pages. */
TEST(pool_call_of_every_holder_of_a_shared_page_counts_one_copy) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t prompt[5], next[2];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(prompt, 5, V, 31);
    seq_tokens(next, 2, V, 32);
    moas_pool *pool = make_pool(m, 6 * 512, MOAS_TYPE_F16, 1, 0, 16);
    ASSERT_TRUE(pool != NULL);
    ASSERT_EQ(pool->n_pages, 6);
    moas_context *other = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F16, 1);
    ASSERT_TRUE(other != NULL);
    for (int order = 0; order < 3; order++) {
        moas_context *parent = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F16, 1);
        moas_context *child = NULL, *third = NULL;
        ASSERT_TRUE(parent != NULL);
        ASSERT_OK(moas_context_decode_batch(parent, prompt, 5, NULL, MOAS_LOGITS_NONE));
        ASSERT_OK(moas_context_fork(parent, &child));   /* 4 pages and 2 copies */
        ASSERT_EQ(pool->n_free, 0);
        ASSERT_OK(moas_context_truncate(child, 1));   /* both hold the first pages, shared */
        if (order == 2) {   /* and a third holder, outside the call */
            ASSERT_OK(moas_context_fork(parent, &third));
            ASSERT_OK(moas_context_truncate(third, 1));
        }
        ASSERT_OK(moas_context_truncate(parent, 1));
        ASSERT_EQ(pool->refs[parent->kv[0].pages[0]], order == 2 ? 3u : 2u);
        ASSERT_OK(moas_context_decode(other, prompt[0], NULL));
        ASSERT_EQ(pool->n_free, 2);
        moas_context *a = order == 1 ? child : parent, *b = order == 1 ? parent : child;
        const moas_pool_seq q[2] = {{a, &next[0], 1, MOAS_LOGITS_LAST, NULL},
                                    {b, &next[1], 1, MOAS_LOGITS_LAST, NULL}};
        if (order == 2) {   /* then both writers copy: two pages are too few */
            ASSERT_STATUS(moas_pool_decode(pool, q, 2), MOAS_ERR_POOL_FULL);
            ASSERT_STR_EQ(moas_last_error(),
                          "pool_decode: the KV pool lacks 2 page(s): 4 needed, 2 free of 6");
            ASSERT_EQ(pool->n_free, 2);
        } else {
            ASSERT_OK(moas_pool_decode(pool, q, 2));
            ASSERT_EQ(pool->n_free, 0);
            for (int k = 0; k < 2; k++) {   /* as decoding alone */
                moas_context *ref = make_ctx(m, NULL, MOAS_MODE_MIXTURE, MOAS_TYPE_F16, 1);
                ASSERT_TRUE(ref != NULL);
                ASSERT_OK(moas_context_decode(ref, prompt[0], NULL));
                ASSERT_OK(moas_context_decode(ref, next[k], NULL));
                ASSERT_TRUE(memcmp(moas_context_logits(ref), moas_context_logits(k ? b : a),
                                   (size_t)V * sizeof(float)) == 0);
                ASSERT_TRUE(same_records(ref, k ? b : a));
                moas_context_free(ref);
            }
        }
        moas_context_free(third);
        moas_context_free(child);
        moas_context_free(parent);
        moas_context_reset(other);
        ASSERT_EQ(pool->n_free, pool->n_pages);
    }
    moas_context_free(other);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A fork whose copies of the partly written last pages take exactly the pages left
 * runs (and one more fork then finds none); the fork's figures count in
 * moas_pool_stats at once, shared tokens in each holder. The pooled 2-layer model,
 * routed with MHA forced (4 heads of 8 a token and layer, 64 bytes of K and V each),
 * pages of 8 heads (512 bytes), a pool of 6 pages: 3 tokens are 12 heads a layer, a
 * full page and half of one; the fork shares the full ones and copies the halves. */
TEST(fork_into_exactly_the_free_pages_and_its_figures_count) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[4];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_layer(m), 2);
    ASSERT_EQ(moas_model_head_dim(m), 8);
    seq_tokens(tokens, 4, moas_model_n_vocab(m), 12);
    moas_pool *pool = make_pool(m, 6 * 512, MOAS_TYPE_F32, 1, 0, 8);
    moas_context *parent = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1), *child = NULL;
    ASSERT_TRUE(pool && parent);
    ASSERT_OK(moas_context_force_scheme(parent, 0));
    ASSERT_OK(moas_context_decode_batch(parent, tokens, 3, NULL, MOAS_LOGITS_LAST));
    ASSERT_EQ(moas_context_kv_pages(parent), 4);
    const uint64_t used3 = 2 * (12 * 64 + 3 * 5);   /* 1,566 */
    ASSERT_EQ(moas_context_kv_bytes_used(parent, -1), used3);
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.n_pages, 6);
    ASSERT_EQ(info.pages_free, 2);

    ASSERT_OK(moas_context_fork(parent, &child));
    ASSERT_EQ(moas_context_kv_pages(child), 4);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    ASSERT_EQ(info.n_contexts, 2);
    ASSERT_EQ(info.bytes_held, 6 * 512);
    ASSERT_EQ(info.bytes_used, 2 * used3);               /* 3,132: more than held */
    ASSERT_EQ(info.bytes_stored, 2 * 2 * 12 * 64);       /* 3,072 */

    /* the half page is the fork's own: its next token needs no page */
    ASSERT_OK(moas_context_decode(child, tokens[3], NULL));
    const uint64_t used4 = 2 * (16 * 64 + 4 * 5);   /* 2,088 */
    ASSERT_EQ(moas_context_kv_bytes_used(child, -1), used4);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    ASSERT_EQ(info.bytes_used, used3 + used4);

    /* no page left for another fork's two copies: refused, nothing taken */
    moas_context *second = child;
    ASSERT_STATUS(moas_context_fork(parent, &second), MOAS_ERR_POOL_FULL);
    ASSERT_TRUE(second == NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "lacks 2 page(s): 2 needed, 0 free of 6") != NULL);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    ASSERT_EQ(info.n_contexts, 2);
    ASSERT_EQ(info.bytes_used, used3 + used4);

    moas_context_free(child);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 2);   /* its copies; the shared pages stay the parent's */
    ASSERT_EQ(info.bytes_used, used3);
    moas_context_free(parent);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 6);
    ASSERT_EQ(info.bytes_used, 0);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Save a sequence, load it into a context of another pool (and into one that holds
 * other tokens), decode on: the same bits as the context that never stopped. A routed
 * state holds only the heads the router chose. */
TEST(state_round_trip_is_bit_identical) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    int32_t tokens[40];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 40, V, 3);
    size_t sizes[2];
    for (int mode = 0; mode < 2; mode++) {
        const moas_mode md = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
        moas_pool *p1 = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 8);
        moas_pool *p2 = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 32);
        moas_context *src = make_ctx(m, p1, md, MOAS_TYPE_F32, 1);
        moas_context *dst = make_ctx(m, p2, md, MOAS_TYPE_F32, 1);
        moas_context *own = make_ctx(m, NULL, md, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(p1 && p2 && src && dst && own);
        ASSERT_OK(moas_context_decode_batch(src, tokens, 25, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_context_decode_batch(dst, tokens + 30, 7, NULL, MOAS_LOGITS_LAST));
        const size_t n = moas_context_state_size(src);
        uint8_t *buf = malloc(n);
        size_t written = 0;
        ASSERT_TRUE(buf != NULL);
        ASSERT_STATUS(moas_context_state_save(src, buf, n - 1, &written), MOAS_ERR_BUFFER_TOO_SMALL);
        ASSERT_EQ(written, n);
        written = 0;   /* no buffer and no size: a query of the size */
        ASSERT_STATUS(moas_context_state_save(src, NULL, 0, &written), MOAS_ERR_BUFFER_TOO_SMALL);
        ASSERT_EQ(written, n);
        written = 0;
        ASSERT_STATUS(moas_context_state_save(src, NULL, n, &written), MOAS_ERR_INVALID_ARG);
        ASSERT_EQ(written, 0);
        ASSERT_OK(moas_context_state_save(src, buf, n, &written));
        ASSERT_EQ(written, n);
        sizes[mode] = n;
        ASSERT_OK(moas_context_state_load(dst, buf, n));
        ASSERT_OK(moas_context_state_load(own, buf, n));
        ASSERT_TRUE(same_records(src, dst) && same_records(src, own));
        ASSERT_TRUE(memcmp(moas_context_logits(src), moas_context_logits(dst),
                           (size_t)V * sizeof(float)) == 0);
        for (int32_t i = 25; i < 40; i++) {
            ASSERT_OK(moas_context_decode(src, tokens[i], NULL));
            ASSERT_OK(moas_context_decode(dst, tokens[i], NULL));
            ASSERT_OK(moas_context_decode(own, tokens[i], NULL));
            ASSERT_TRUE(memcmp(moas_context_logits(src), moas_context_logits(dst),
                               (size_t)V * sizeof(float)) == 0);
            ASSERT_TRUE(memcmp(moas_context_logits(src), moas_context_logits(own),
                               (size_t)V * sizeof(float)) == 0);
        }
        ASSERT_TRUE(same_records(src, dst));
        free(buf);
        moas_context_free(src);
        moas_context_free(dst);
        moas_context_free(own);
        moas_pool_free(p1);
        moas_pool_free(p2);
    }
    ASSERT_TRUE(sizes[1] < sizes[0]);   /* routed stores fewer heads than every scheme's */
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Every truncation, a flipped byte in each header word, a bad scheme record, another
 * model's state, another mode's, one byte too many: each refused, the context as it
 * was (its next decode equals an untouched twin's). */
TEST(state_load_refuses_bad_data_and_changes_nothing) {
    size_t size, size2;
    uint8_t *image = kind_image(0, &size), *image2 = kind_image(2, &size2);
    moas_model *m, *m2;
    int32_t tokens[20];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_OK(moas_model_load_memory(image2, size2, NULL, &m2));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 20, V, 8);
    moas_context *src = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *ctx = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *twin = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *mix = make_ctx(m, NULL, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *other = make_ctx(m2, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(src && ctx && twin && mix && other);
    ASSERT_OK(moas_context_decode_batch(src, tokens, 12, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 5, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(twin, tokens + 5, 6, NULL, MOAS_LOGITS_LAST));
    const size_t n = moas_context_state_size(src);
    uint8_t *good = malloc(n + 1), *bad = malloc(n + 1);
    size_t written;
    ASSERT_TRUE(good && bad);
    ASSERT_OK(moas_context_state_save(src, good, n, &written));
    ASSERT_STATUS(moas_context_state_load(ctx, good, 0), MOAS_ERR_BAD_FORMAT);
    for (size_t cut = 1; cut < n; cut++) {
        ASSERT_STATUS(moas_context_state_load(ctx, good, cut), MOAS_ERR_CORRUPT);
    }
    const uint8_t not_a_state[3] = {'G', 'G', 'U'};
    ASSERT_STATUS(moas_context_state_load(ctx, not_a_state, 3), MOAS_ERR_BAD_FORMAT);
    for (size_t word = 0; word < 14; word++) {   /* every header word */
        memcpy(bad, good, n);
        bad[word * 4] ^= 0x40;
        ASSERT_TRUE(moas_context_state_load(ctx, bad, n) != MOAS_OK);
    }
    memcpy(bad, good, n);
    bad[14 * 4 + 3] = 3;   /* a scheme record of 3 schemes */
    ASSERT_STATUS(moas_context_state_load(ctx, bad, n), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(strstr(moas_last_error(), "scheme 3") != NULL);
    memcpy(bad, good, n);
    bad[n] = 0;
    ASSERT_STATUS(moas_context_state_load(ctx, bad, n + 1), MOAS_ERR_CORRUPT);
    ASSERT_STATUS(moas_context_state_load(other, good, n), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(strstr(moas_last_error(), "another model") != NULL);
    ASSERT_STATUS(moas_context_state_load(mix, good, n), MOAS_ERR_CORRUPT);
    ASSERT_STATUS(moas_context_state_load(ctx, NULL, n), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_state_load(NULL, good, n), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_state_save(src, NULL, n, &written), MOAS_ERR_INVALID_ARG);

    /* nothing changed */
    ASSERT_TRUE(same_records(ctx, twin));
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(twin), (size_t)V * 4) == 0);
    ASSERT_OK(moas_context_decode(ctx, tokens[0], NULL));
    ASSERT_OK(moas_context_decode(twin, tokens[0], NULL));
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(twin), (size_t)V * 4) == 0);
    free(good);
    free(bad);
    moas_context_free(src);
    moas_context_free(ctx);
    moas_context_free(twin);
    moas_context_free(mix);
    moas_context_free(other);
    moas_model_free(m);
    moas_model_free(m2);
    free(image);
    free(image2);
    return TEST_PASS;
}

/* A state load takes its pages from the free ones and from those only the context
 * itself holds (it gives them all back first): in a pool with no page free, a context
 * holding 16 pages loads a state of 12; pages it shares with a fork are not its to
 * give, so with them shared the same load is refused whole, naming the 12 pages it
 * lacks, and changes nothing. The pooled model in mixture mode stores 4 heads of 8 a
 * token and layer: one page of 4 heads each, 2 pages a token. */
TEST(state_load_counts_only_its_own_pages_as_free) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[16];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_layer(m), 2);
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 16, V, 31);
    const uint64_t page_bytes = (uint64_t)4 * 8 * 2 * 4;   /* 256 */
    moas_pool *pool = make_pool(m, 20 * page_bytes, MOAS_TYPE_F32, 1, 0, 4);
    moas_context *src = make_ctx(m, NULL, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *ctx = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *filler = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *fork = NULL;
    ASSERT_TRUE(pool && src && ctx && filler);
    ASSERT_OK(moas_context_decode_batch(src, tokens, 6, NULL, MOAS_LOGITS_LAST));
    size_t n;
    uint8_t *state = saved_state(src, &n);
    ASSERT_TRUE(state != NULL);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 6, 8, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(filler, tokens, 2, NULL, MOAS_LOGITS_NONE));
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(moas_context_kv_pages(ctx), 16);
    ASSERT_EQ(info.pages_free, 0);

    ASSERT_OK(moas_context_state_load(ctx, state, n));
    ASSERT_EQ(moas_context_n_past(ctx), 6);
    ASSERT_EQ(moas_context_kv_pages(ctx), 12);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 4);
    ASSERT_TRUE(same_records(ctx, src));

    /* shared with a fork (6 tokens are 6 full pages a layer: nothing copied), the
     * filler taking the 4 pages left: the context owns none of its pages */
    ASSERT_OK(moas_context_fork(ctx, &fork));
    ASSERT_OK(moas_context_decode_batch(filler, tokens + 2, 2, NULL, MOAS_LOGITS_NONE));
    moas_pool_info before = {.size = sizeof before};
    ASSERT_OK(moas_pool_stats(pool, &before));
    ASSERT_EQ(before.pages_free, 0);
    size_t n0;
    uint8_t *ctx0 = saved_state(ctx, &n0);
    ASSERT_TRUE(ctx0 != NULL);
    ASSERT_STATUS(moas_context_state_load(ctx, state, n), MOAS_ERR_POOL_FULL);
    ASSERT_TRUE(strstr(moas_last_error(),
                       "context_state_load: the KV pool lacks 12 page(s): 12 needed, 0 free "
                       "of 20") != NULL);
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    ASSERT_EQ(info.bytes_held, before.bytes_held);
    ASSERT_EQ(info.bytes_used, before.bytes_used);
    ASSERT_EQ(moas_context_kv_pages(ctx), 12);
    size_t n1;
    uint8_t *ctx1 = saved_state(ctx, &n1);
    ASSERT_TRUE(ctx1 != NULL && n1 == n0 && memcmp(ctx1, ctx0, n0) == 0);

    /* the fork gone, the pages are the context's alone again: the load runs with none
     * free; with the filler gone too, decoding on gives the bits of the context that
     * saved it */
    moas_context_free(fork);
    ASSERT_OK(moas_context_state_load(ctx, state, n));
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    moas_context_free(filler);
    ASSERT_OK(moas_context_decode(ctx, tokens[15], NULL));
    ASSERT_OK(moas_context_decode(src, tokens[15], NULL));
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(src),
                       (size_t)V * sizeof(float)) == 0);
    ASSERT_TRUE(same_records(ctx, src));
    free(state);
    free(ctx0);
    free(ctx1);
    moas_context_free(ctx);
    moas_context_free(src);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The edges of a state load: a state of exactly n_ctx tokens loads into a context of
 * n_ctx and is refused by one of n_ctx - 1 with MOAS_ERR_CONTEXT_FULL; a version
 * other than 1 or 2 is MOAS_ERR_BAD_FORMAT (not a state this library reads), as
 * moas.h says; and a state cut anywhere, in a buffer of exactly the bytes given, is
 * refused as corrupt without reading past them (under `make asan` a read past the
 * end fails the test; the cuts of the other test sit in a longer buffer). */
static moas_context *ctx_of(const moas_model *m, int32_t n_ctx) {
    moas_context_params cp;
    moas_context *ctx = NULL;
    moas_context_params_init(&cp);
    cp.mode = MOAS_MODE_ROUTED;
    cp.n_ctx = n_ctx;
    cp.n_threads = 1;
    return moas_context_create(m, &cp, &ctx) == MOAS_OK ? ctx : NULL;
}

TEST(state_load_edges_length_version_and_exact_buffers) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    int32_t tokens[8];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 8, V, 17);
    moas_context *src = ctx_of(m, 8), *dst = ctx_of(m, 8), *small = ctx_of(m, 7);
    ASSERT_TRUE(src && dst && small);
    ASSERT_OK(moas_context_decode_batch(src, tokens, 8, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(dst, tokens, 2, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(small, tokens, 2, NULL, MOAS_LOGITS_LAST));
    size_t n;
    uint8_t *state = saved_state(src, &n);
    ASSERT_TRUE(state != NULL);

    ASSERT_STATUS(moas_context_state_load(small, state, n), MOAS_ERR_CONTEXT_FULL);
    ASSERT_EQ(moas_context_n_past(small), 2);
    ASSERT_OK(moas_context_state_load(dst, state, n));
    ASSERT_EQ(moas_context_n_past(dst), 8);
    ASSERT_TRUE(same_records(dst, src));
    ASSERT_TRUE(memcmp(moas_context_logits(dst), moas_context_logits(src),
                       (size_t)V * sizeof(float)) == 0);
    ASSERT_STATUS(moas_context_decode(dst, tokens[0], NULL), MOAS_ERR_CONTEXT_FULL);

    uint8_t *bad = malloc(n);
    ASSERT_TRUE(bad != NULL);
    static const uint32_t versions[] = {0, 4, 0xffffffffu};
    for (size_t i = 0; i < sizeof versions / sizeof versions[0]; i++) {
        memcpy(bad, state, n);
        memcpy(bad + 8, &versions[i], 4);   /* header word 2 */
        ASSERT_STATUS(moas_context_state_load(dst, bad, n), MOAS_ERR_BAD_FORMAT);
        ASSERT_TRUE(strstr(moas_last_error(), "version") != NULL);
    }
    free(bad);
    for (size_t cut = 1; cut < n; cut++) {
        uint8_t *part = malloc(cut);
        ASSERT_TRUE(part != NULL);
        memcpy(part, state, cut);
        const moas_status st = moas_context_state_load(dst, part, cut);
        free(part);
        ASSERT_STATUS(st, MOAS_ERR_CORRUPT);
    }
    ASSERT_EQ(moas_context_n_past(dst), 8);
    ASSERT_TRUE(same_records(dst, src));
    free(state);
    moas_context_free(src);
    moas_context_free(dst);
    moas_context_free(small);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The saved state of a context of `m` in `mode` that decoded 10 tokens (seq_tokens with
 * `seed`, left in tokens[10]), or NULL. */
static uint8_t *state_of_ten_tokens(moas_model *m, moas_mode mode, uint32_t seed,
                                    int32_t *tokens, size_t *n) {
    seq_tokens(tokens, 10, moas_model_n_vocab(m), seed);
    moas_context *src = make_ctx(m, NULL, mode, MOAS_TYPE_F32, 1);
    uint8_t *state = NULL;
    if (src != NULL &&
        moas_context_decode_batch(src, tokens, 10, NULL, MOAS_LOGITS_LAST) == MOAS_OK) {
        state = saved_state(src, n);
    }
    moas_context_free(src);
    return state;
}

/* A context of `other` holding the first 3 of `tokens` refuses `state` (saved from another
 * model) as another model's, and still holds its 3 tokens. */
static int refused_as_another_models(moas_model *other, moas_mode mode, const int32_t *tokens,
                                     const uint8_t *state, size_t n) {
    moas_context *dst = make_ctx(other, NULL, mode, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(dst != NULL);
    ASSERT_OK(moas_context_decode_batch(dst, tokens, 3, NULL, MOAS_LOGITS_LAST));
    ASSERT_STATUS(moas_context_state_load(dst, state, n), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(strstr(moas_last_error(), "another model") != NULL);
    ASSERT_EQ(moas_context_n_past(dst), 3);
    moas_context_free(dst);
    return TEST_PASS;
}

/* A state from a model that differs from the context's in its norm's epsilon alone (the
 * same shape, seed and weights: the first fingerprint could not tell them apart) is
 * refused, and the context keeps what it had. */
TEST(state_refuses_a_model_differing_only_in_its_block_options) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.n_ctx_train = 64;
    cfg.rope = true;
    size_t size, size2;
    uint8_t *image = tiny_model_image(&cfg, 77, &size);
    cfg.eps = 1e-6f;
    uint8_t *image2 = tiny_model_image(&cfg, 77, &size2);
    moas_model *m, *m2;
    ASSERT_TRUE(image != NULL && image2 != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_OK(moas_model_load_memory(image2, size2, NULL, &m2));
    int32_t tokens[10];
    size_t n;
    uint8_t *buf = state_of_ten_tokens(m, MOAS_MODE_MIXTURE, 5, tokens, &n);
    ASSERT_TRUE(buf != NULL);
    ASSERT_EQ(refused_as_another_models(m2, MOAS_MODE_MIXTURE, tokens, buf, n), TEST_PASS);
    free(buf);
    moas_model_free(m);
    moas_model_free(m2);
    free(image);
    free(image2);
    return TEST_PASS;
}

/* A routed context of `m` on the reference kernels (whose bits every machine
 * reproduces), as the saved states of tests/data were written from. */
static moas_context *ref_routed_ctx(moas_model *m) {
    moas_context_params cp;
    moas_context_params_init(&cp);
    cp.mode = MOAS_MODE_ROUTED;
    cp.kernels = MOAS_KERNELS_REF;
    moas_context *ctx = NULL;
    return moas_context_create(m, &cp, &ctx) == MOAS_OK ? ctx : NULL;
}

/* A state saved by an older libmoas in format version `version` (tests/data/README.md)
 * still loads, decodes on with the bits of decoding its text again, and is saved again
 * in the current version. */
static int older_state_still_loads(const char *file, uint32_t version) {
    static const char text[] = "the cat sat on the mat";
    moas_model *m;
    ASSERT_OK(moas_model_load(test_data("tiny-modern-pooled-nobias.gguf"), NULL, &m));
    FILE *f = fopen(test_data(file), "rb");
    ASSERT_TRUE(f != NULL);
    uint8_t buf[16384];
    const size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    ASSERT_TRUE(n > 56 && n < sizeof buf);
    uint32_t saved_version;
    memcpy(&saved_version, buf + 8, 4);
    ASSERT_EQ(saved_version, version);
    int32_t ids[32];
    size_t n_ids;
    ASSERT_OK(moas_tokenize(m, text, sizeof text - 1, ids, 32, &n_ids));
    const int32_t next = ids[3];   /* a space */
    moas_context *loaded = ref_routed_ctx(m), *again = ref_routed_ctx(m);
    ASSERT_TRUE(loaded != NULL && again != NULL);
    ASSERT_OK(moas_context_state_load(loaded, buf, n));
    ASSERT_EQ(moas_context_n_past(loaded), (int32_t)n_ids);
    ASSERT_OK(moas_context_decode_batch(again, ids, (int32_t)n_ids, NULL, MOAS_LOGITS_LAST));
    const size_t V = (size_t)moas_model_n_vocab(m);
    ASSERT_TRUE(memcmp(moas_context_logits(loaded), moas_context_logits(again), V * 4) == 0);
    ASSERT_TRUE(same_records(loaded, again));
    ASSERT_OK(moas_context_decode(loaded, next, NULL));
    ASSERT_OK(moas_context_decode(again, next, NULL));
    ASSERT_TRUE(memcmp(moas_context_logits(loaded), moas_context_logits(again), V * 4) == 0);
    /* saved again, it is the current version */
    size_t n2;
    uint8_t *buf2 = saved_state(loaded, &n2);
    ASSERT_TRUE(buf2 != NULL);
    memcpy(&saved_version, buf2 + 8, 4);
    ASSERT_EQ(saved_version, 3u);
    free(buf2);
    moas_context_free(loaded);
    moas_context_free(again);
    moas_model_free(m);
    return TEST_PASS;
}

/* Version 1: written by libmoas 1.1.0 before the second fingerprint. */
TEST(state_of_version_1_still_loads) {
    return older_state_still_loads("tiny-modern-pooled-nobias-routed.state-v1", 1);
}

/* Version 2: written before the third fingerprint. */
TEST(state_of_version_2_still_loads) {
    return older_state_still_loads("tiny-modern-pooled-nobias-routed.state-v2", 2);
}

/* A copy of a model image with the last float of tensor `name` raised by 0.5 (the
 * last: a fingerprint that hashed the vector short would miss it). */
static uint8_t *image_with_one_value_changed(const uint8_t *image, size_t size,
                                             const moas_model *m, const char *name) {
    int64_t t;
    moas_tensor_info info;
    info.size = sizeof info;
    if (moas_model_tensor_find(m, name, &t) != MOAS_OK || moas_model_tensor(m, t, &info) ||
        info.type != MOAS_TYPE_F32 || info.n_bytes < 4 || info.offset + info.n_bytes > size) {
        return NULL;
    }
    const uint64_t index = info.n_bytes / 4 - 1;
    uint8_t *copy = malloc(size);
    if (copy != NULL) {
        float v;
        memcpy(copy, image, size);
        memcpy(&v, copy + info.offset + 4 * index, 4);
        v += 0.5f;
        memcpy(copy + info.offset + 4 * index, &v, 4);
    }
    return copy;
}

/* A state from a model that differs from the context's only in its final norm, a norm's
 * bias or one bias of one matrix (which the second fingerprint left out) is refused, and
 * the context keeps what it had; the model's own state still loads. */
TEST(state_refuses_a_model_differing_only_in_a_norm_or_a_bias) {
    static const char *const changed[] = {
        "output_norm.weight",   "output_norm.bias",     "blk.1.attn_norm.bias",
        "blk.0.ffn_norm.bias",  "blk.0.ffn_up.bias",    "blk.0.ffn_down.bias",
        "blk.1.attn_q.0.bias",  "blk.0.attn_k.1.bias",  "blk.1.attn_v.2.bias",
        "blk.0.attn_output.2.bias", "blk.0.attn_router_up.bias",
        "blk.1.attn_router_down.bias"};
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    size_t size;
    uint8_t *image = tiny_model_image(&cfg, 78, &size);
    moas_model *m;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    int32_t tokens[10];
    size_t n;
    uint8_t *buf = state_of_ten_tokens(m, MOAS_MODE_ROUTED, 6, tokens, &n);
    ASSERT_TRUE(buf != NULL);
    for (size_t i = 0; i < sizeof changed / sizeof changed[0]; i++) {
        uint8_t *image2 = image_with_one_value_changed(image, size, m, changed[i]);
        moas_model *m2;
        ASSERT_TRUE(image2 != NULL);
        ASSERT_OK(moas_model_load_memory(image2, size, NULL, &m2));
        ASSERT_EQ(refused_as_another_models(m2, MOAS_MODE_ROUTED, tokens, buf, n), TEST_PASS);
        moas_model_free(m2);
        free(image2);
    }
    moas_context *same = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(same != NULL);
    ASSERT_OK(moas_context_state_load(same, buf, n));
    ASSERT_EQ(moas_context_n_past(same), 10);
    moas_context_free(same);
    moas_model_free(m);
    free(buf);
    free(image);
    return TEST_PASS;
}

/* The checks of pool creation and of a pool call, each refused before anything runs. */
/* Resident bytes of this process (Linux /proc/self/statm), or -1 where unknown. */
static long long resident_bytes(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long long pages_total = 0, pages_resident = -1;
    if (f == NULL) {
        return -1;
    }
    if (fscanf(f, "%lld %lld", &pages_total, &pages_resident) != 2) {
        pages_resident = -1;
    }
    fclose(f);
    return pages_resident < 0 ? -1 : pages_resident * 4096;
}

/* An allocator whose memory holds 0xA5 bytes: what the library leaves unwritten. */
static void *pattern_alloc(void *user, size_t size) {
    (void)user;
    void *p = malloc(size);
    if (p != NULL) {
        memset(p, 0xA5, size);
    }
    return p;
}

static void pattern_free(void *user, void *ptr) {
    (void)user;
    free(ptr);
}

/* params.commit writes every page, and the block arena of moas_pool_decode, at
 * creation: the pool's memory is resident at once (the process's RSS grows by its
 * capacity), where a default pool stays address space until pages and rows are
 * used. */
TEST(committed_pool_is_resident_from_the_start) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    if (resident_bytes() < 0) {
        moas_model_free(m);
        free(image);
        test_skip("no /proc/self/statm");
        return TEST_SKIP;
    }
    /* slabs of 64 MB: above malloc's largest mmap threshold, so each is fresh memory
     * of its own, never a resident block an earlier test freed */
    const long long capacity = 128ll << 20;
    for (int commit = 0; commit <= 1; commit++) {
        moas_pool_params pp;
        moas_pool *pool = NULL;
        moas_pool_params_init(&pp);
        pp.capacity_bytes = (uint64_t)capacity;
        pp.commit = commit;
        const long long before = resident_bytes();
        ASSERT_OK(moas_pool_create(m, &pp, &pool));
        const long long grew = resident_bytes() - before;
        if (commit) {
            ASSERT_TRUE(grew >= capacity * 9 / 10);
        } else {
            ASSERT_TRUE(grew < capacity / 2);
        }
        moas_pool_free(pool);
    }
    /* the block arena: written by commit (zeros over the allocator's pattern), left
     * as allocated otherwise (whether fresh pages or reused heap, RSS cannot tell) */
    for (int commit = 0; commit <= 1; commit++) {
        const moas_allocator alloc = {pattern_alloc, pattern_free, NULL};
        moas_pool_params pp;
        moas_pool *pool = NULL;
        moas_pool_params_init(&pp);
        pp.capacity_bytes = 1 << 16;
        pp.n_batch = 512;
        pp.commit = commit;
        pp.allocator = &alloc;
        ASSERT_OK(moas_pool_create(m, &pp, &pool));
        const unsigned char *arena = (const unsigned char *)pool->ws->bx;
        const size_t n = pool->ws->batch_floats * sizeof(float);
        size_t zeros = 0;
        for (size_t i = 0; i < n; i++) {
            zeros += arena[i] == 0;
        }
        ASSERT_EQ(zeros, commit ? n : 0);
        moas_pool_free(pool);
    }
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* An allocator that refuses blocks of `limit` bytes or more and counts the bytes it
 * handed out after its first refusal. */
typedef struct {
    size_t limit, refused, given_after;
} refusing_allocator;

static void *refusing_alloc(void *user, size_t size) {
    refusing_allocator *r = user;
    if (size >= r->limit) {
        r->refused++;
        return NULL;
    }
    if (r->refused > 0) {
        r->given_after += size;
    }
    return malloc(size);
}

/* A pool whose slabs cannot be had fails before it asks for (and zeroes) the page
 * bookkeeping, 8 bytes a page: a 1 TB pool wrote 8 GB of it first, for 18 s. */
TEST(pool_without_room_for_its_slabs_asks_for_nothing_more) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    refusing_allocator r = {64u << 20, 0, 0};
    const moas_allocator alloc = {refusing_alloc, pattern_free, &r};
    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1ull << 30;   /* slabs of 512 MB: refused */
    pp.allocator = &alloc;
    ASSERT_EQ(moas_pool_create(m, &pp, &pool), MOAS_ERR_NO_MEMORY);
    ASSERT_TRUE(pool == NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "no memory for") != NULL);
    ASSERT_EQ(r.refused, 1);          /* the K slab; then nothing */
    ASSERT_EQ(r.given_after, 0);
    pp.capacity_bytes = 1u << 20;     /* and one that fits is made as before */
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

typedef struct {
    long live;   /* blocks given and not yet freed */
} counting_allocator;

static void *counting_alloc(void *user, size_t size) {
    void *p = malloc(size);
    ((counting_allocator *)user)->live += p != NULL;
    return p;
}

static void counting_free(void *user, void *ptr) {
    ((counting_allocator *)user)->live--;
    free(ptr);
}

/* A pool freed before its contexts (a garbage collector may free in any order) stays
 * until the last of them is freed, and they go on decoding the same bits meanwhile. */
TEST(pool_freed_before_its_contexts_goes_with_the_last) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    counting_allocator count = {0};
    const moas_allocator alloc = {counting_alloc, counting_free, &count};
    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1u << 20;
    pp.allocator = &alloc;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context *a = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *alone = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a && b && alone);
    const int32_t n_vocab = moas_model_n_vocab(m);
    int32_t tokens[12];
    seq_tokens(tokens, 12, n_vocab, 5);
    ASSERT_OK(moas_context_decode_batch(a, tokens, 6, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_decode_batch(b, tokens, 3, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_decode_batch(alone, tokens, 6, NULL, MOAS_LOGITS_NONE));
    const long held = count.live;
    ASSERT_TRUE(held > 0);

    moas_pool_free(pool);
    ASSERT_EQ(count.live, held);
    ASSERT_OK(moas_context_decode_batch(a, tokens + 6, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(alone, tokens + 6, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(a), moas_context_logits(alone),
                       (size_t)n_vocab * sizeof(float)) == 0);
    moas_context_free(a);
    ASSERT_EQ(count.live, held);   /* b still holds it */
    ASSERT_OK(moas_context_decode(b, tokens[3], NULL));
    moas_context_free(b);
    ASSERT_EQ(count.live, 0);
    moas_context_free(alone);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The same with one context: the pool freed while a single context is in it stays (not
 * a block given back) until that context is freed, and the context decodes on. */
TEST(pool_freed_under_its_only_context_goes_with_it) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    counting_allocator count = {0};
    const moas_allocator alloc = {counting_alloc, counting_free, &count};
    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1u << 16;
    pp.allocator = &alloc;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context *a = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a != NULL);
    int32_t tokens[6];
    seq_tokens(tokens, 6, moas_model_n_vocab(m), 23);
    ASSERT_OK(moas_context_decode_batch(a, tokens, 3, NULL, MOAS_LOGITS_NONE));
    const long held = count.live;
    ASSERT_TRUE(held > 0);
    moas_pool_free(pool);
    ASSERT_EQ(count.live, held);
    ASSERT_OK(moas_context_decode_batch(a, tokens + 3, 3, NULL, MOAS_LOGITS_LAST));
    ASSERT_EQ(moas_context_n_past(a), 6);
    moas_context_free(a);
    ASSERT_EQ(count.live, 0);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

typedef struct {
    moas_context *ctx;
    const int32_t *tokens;
    const uint8_t *state;   /* a state of 3 tokens to load, or NULL */
    size_t state_size;
    atomic_int *stop;
    atomic_int rounds;
    int failures;
} shrinking_work;

/* Grow the context, then give pages back: reset, truncate, or load a shorter state. */
static void *grow_and_shrink(void *arg) {
    shrinking_work *w = arg;
    while (!atomic_load(w->stop)) {
        moas_context_reset(w->ctx);
        w->failures += moas_context_decode_batch(w->ctx, w->tokens, 40, NULL,
                                                 MOAS_LOGITS_LAST) != MOAS_OK;
        if (w->state != NULL) {
            w->failures += moas_context_state_load(w->ctx, w->state, w->state_size) != MOAS_OK;
        } else {
            w->failures += moas_context_truncate(w->ctx, 3) != MOAS_OK;
        }
        w->failures += moas_context_decode_batch(w->ctx, w->tokens, 20, NULL,
                                                 MOAS_LOGITS_LAST) != MOAS_OK;
        atomic_fetch_add(&w->rounds, 1);
    }
    return NULL;
}

/* Without forks every stored byte is in a page held: moas_pool_stats, read while other
 * threads give pages back, never shows more stored than held (pages went back before
 * the figures fell, in about 2% of the calls). */
TEST(pool_stats_never_store_more_than_they_hold) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 0);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(pool && a && b);
    int32_t tokens[64];
    seq_tokens(tokens, 64, moas_model_n_vocab(m), 9);
    ASSERT_OK(moas_context_decode_batch(b, tokens, 3, NULL, MOAS_LOGITS_LAST));
    size_t state_size = moas_context_state_size(b), written;
    uint8_t *state = malloc(state_size);
    ASSERT_TRUE(state != NULL);
    ASSERT_OK(moas_context_state_save(b, state, state_size, &written));
    atomic_int stop = 0;
    shrinking_work wa = {a, tokens, NULL, 0, &stop, 0, 0};
    shrinking_work wb = {b, tokens, state, state_size, &stop, 0, 0};
    pthread_t ta, tb;
    ASSERT_EQ(pthread_create(&ta, NULL, grow_and_shrink, &wa), 0);
    ASSERT_EQ(pthread_create(&tb, NULL, grow_and_shrink, &wb), 0);
    /* read while each worker goes round 300 times (bounded, should one stall) */
    int over = 0;
    for (long i = 0; i < 20000000 && (atomic_load(&wa.rounds) < 300 ||
                                      atomic_load(&wb.rounds) < 300); i++) {
        moas_pool_info info = {.size = sizeof info};
        ASSERT_OK(moas_pool_stats(pool, &info));
        over += info.bytes_stored > info.bytes_held;
    }
    atomic_store(&stop, 1);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    ASSERT_EQ(over, 0);
    ASSERT_EQ(wa.failures + wb.failures, 0);
    moas_context_free(a);
    moas_context_free(b);
    moas_pool_free(pool);
    free(state);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A thread that waits for the pool's lock while its holder keeps it (preempted, on a
 * busy machine) sleeps instead of yielding in a loop, where futexes exist (Linux): here
 * a thread holds the lock for 60 ms; moas_pool_stats, called meanwhile, returns only
 * after the holder let go, with a few milliseconds of CPU at most, where it used about
 * the whole wait. */
typedef struct {
    moas_pool *pool;
    atomic_int held;
    atomic_int released;   /* set just before the holder unlocks */
} lock_holder;

static void *hold_pool_lock(void *arg) {
    lock_holder *h = arg;
    const struct timespec nap = {0, 60000000};
    moas__pool_lock(h->pool);
    atomic_store(&h->held, 1);
    nanosleep(&nap, NULL);
    atomic_store(&h->released, 1);
    moas__pool_unlock(h->pool);
    return NULL;
}

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

TEST(pool_lock_waiter_sleeps_while_the_holder_keeps_it) {
#if !defined(__linux__) || defined(MOAS_NO_FUTEX)   /* futex.h */
    return test_skip("a waiter sleeps only where futexes exist; elsewhere it yields");
#endif
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 0);
    ASSERT_TRUE(pool != NULL);
    lock_holder h = {pool, 0, 0};
    pthread_t holder;
    ASSERT_EQ(pthread_create(&holder, NULL, hold_pool_lock, &h), 0);
    while (!atomic_load(&h.held)) {
        sched_yield();
    }
    const int64_t cpu0 = thread_cpu_ns();
    moas_pool_info info = {.size = sizeof info};
    const moas_status st = moas_pool_stats(pool, &info);
    const int64_t cpu = thread_cpu_ns() - cpu0;
    const bool waited = atomic_load(&h.released);   /* it could not pass the holder */
    pthread_join(holder, NULL);
    ASSERT_OK(st);
    ASSERT_TRUE(waited);
    ASSERT_TRUE(cpu < 20000000);
    ASSERT_EQ(info.n_pages, pool->n_pages);
    /* the lock works on after a sleeper: taken and given back by this thread */
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(atomic_load(&pool->lock), 0u);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A context that only moas_pool_decode advanced (so it never made a workspace of its
 * own) can still be compacted and shifted: each gives what the same calls give on a
 * context that decoded the same tokens on its own. */
TEST(pool_only_context_compacts_and_shifts) {
    size_t size;
    uint8_t *image = kind_image(4, &size);   /* pooled K/V with RoPE */
    moas_model *m;
    int32_t tokens[30];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    seq_tokens(tokens, 30, moas_model_n_vocab(m), 5);
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 0);
    ASSERT_TRUE(pool != NULL);
    for (int op = 0; op < 2; op++) {
        moas_context_params cp;
        moas_context *a = NULL;
        moas_context_params_init(&cp);
        cp.pool = pool;
        cp.mode = MOAS_MODE_ROUTED;
        cp.n_threads = 1;
        ASSERT_OK(moas_context_create(m, &cp, &a));   /* no workspace of its own yet */
        moas_context *b = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(b != NULL);
        moas_pool_seq q = {.ctx = a, .tokens = tokens, .n_tokens = 30,
                           .which = MOAS_LOGITS_NONE, .logits = NULL};
        ASSERT_OK(moas_pool_decode(pool, &q, 1));
        ASSERT_OK(moas_context_decode_batch(b, tokens, 30, NULL, MOAS_LOGITS_NONE));
        int32_t changed_a = -1, changed_b = -2;
        if (op == 0) {
            ASSERT_OK(moas_context_compact(a, 20, 2, &changed_a));
            ASSERT_OK(moas_context_compact(b, 20, 2, &changed_b));
            ASSERT_EQ(changed_a, changed_b);
        } else {
            ASSERT_OK(moas_context_shift(a, 4, 10));
            ASSERT_OK(moas_context_shift(b, 4, 10));
        }
        float la[64], lb[64];
        ASSERT_TRUE(moas_model_n_vocab(m) <= 64);
        ASSERT_OK(moas_context_decode(a, tokens[0], la));
        ASSERT_OK(moas_context_decode(b, tokens[0], lb));
        ASSERT_TRUE(memcmp(la, lb, (size_t)moas_model_n_vocab(m) * sizeof *la) == 0);
        ASSERT_TRUE(same_records(a, b));
        moas_context_free(a);
        moas_context_free(b);
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Which blocks run their sequences apart (forward.c, "Sequences split between the
 * threads"): any share of a model file up to 16 MB, and of a larger one only shares
 * with a row for every 2 MB of it; a pool whose shares could never qualify makes no
 * workspaces for them. The tiny model stands for a 22 MB one by its recorded size. */
TEST(pool_splits_sequences_only_where_the_weights_allow) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_TRUE(moas__shard_rows_suit(m, 1) && !moas__shard_rows_suit(m, 0));
    const size_t real_size = m->image_size;
    m->image_size = (size_t)22 << 20;
    ASSERT_TRUE(!moas__shard_rows_suit(m, 10) && moas__shard_rows_suit(m, 11));

    moas_pool *few_rows = make_pool(m, 1 << 20, MOAS_TYPE_F32, 2, 20, 4);   /* 10 a share */
    moas_pool *many_rows = make_pool(m, 1 << 20, MOAS_TYPE_F32, 2, 32, 4);  /* 16 a share */
    ASSERT_TRUE(few_rows != NULL && many_rows != NULL);
    ASSERT_TRUE(few_rows->ws->shards == NULL && many_rows->ws->shards != NULL);
    enum { N_SEQ = 24 };
    moas_context *ctx[N_SEQ];
    moas_pool_seq q[N_SEQ];
    int32_t tokens[N_SEQ];
    for (int32_t s = 0; s < N_SEQ; s++) {
        ctx[s] = make_ctx(m, many_rows, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 2);
        ASSERT_TRUE(ctx[s] != NULL);
        tokens[s] = s % moas_model_n_vocab(m);
        q[s] = (moas_pool_seq){ctx[s], &tokens[s], 1, MOAS_LOGITS_NONE, NULL};
    }
    ASSERT_OK(moas_pool_decode(many_rows, q, 20));   /* 10 rows a share: not split */
    ASSERT_EQ(many_rows->ws->shard_blocks, 0);
    ASSERT_OK(moas_pool_decode(many_rows, q, 22));   /* 11 a share: split, with a team */
    ASSERT_EQ(many_rows->ws->shard_blocks, 1);
    for (int32_t s = 0; s < N_SEQ; s++) {
        moas_context_free(ctx[s]);
    }
    moas_pool_free(few_rows);
    moas_pool_free(many_rows);
    m->image_size = real_size;
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Route callbacks are called on the thread that decodes, in each context's order: a
 * block with one is not split between the threads (and one without is). Routed
 * contexts under KV budgets, split between the threads, route as they do alone. */
typedef struct {
    pthread_t caller;
    int calls, elsewhere;
    int32_t last_pos, last_layer, out_of_order;
} route_watch;

static int32_t watch_route(void *user, int32_t pos, int32_t layer, const float *gates,
                           int32_t n_scheme, int32_t proposed) {
    route_watch *w = user;
    (void)gates, (void)n_scheme;
    w->calls++;
    w->elsewhere += !pthread_equal(pthread_self(), w->caller);
    w->out_of_order += pos < w->last_pos || (pos == w->last_pos && layer <= w->last_layer);
    w->last_pos = pos, w->last_layer = layer;
    return proposed;
}

TEST(pool_split_keeps_callbacks_on_the_caller_and_budgets_as_alone) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    enum { N_SEQ = 6, STEPS = 12 };
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 2, 16, 4);
    ASSERT_TRUE(pool != NULL);
    moas_context *in_pool[N_SEQ], *alone[N_SEQ];
    int32_t tokens[N_SEQ][STEPS];
    route_watch watch = {pthread_self(), 0, 0, -1, -1, 0};
    for (int32_t s = 0; s < N_SEQ; s++) {
        in_pool[s] = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 2);
        alone[s] = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(in_pool[s] != NULL && alone[s] != NULL);
        seq_tokens(tokens[s], STEPS, V, 300 + (uint32_t)s);
        if (s % 2 == 0) {   /* 12 tokens, each at least 138 bytes: the router leans cheaper */
            const uint64_t cap = 3000;
            ASSERT_OK(moas_context_set_kv_budget(in_pool[s], cap));
            ASSERT_OK(moas_context_set_kv_budget(alone[s], cap));
        }
    }
    for (int32_t step = 0; step < STEPS; step++) {
        /* the first half of the steps without a callback, then one on the last context
         * (which a split would give to the other thread) */
        if (step == STEPS / 2) {
            moas_context_set_route_callback(in_pool[N_SEQ - 1], watch_route, &watch);
            watch.last_pos = in_pool[N_SEQ - 1]->n_past - 1;
            watch.last_layer = moas_model_n_layer(m);
        }
        const int64_t split_before = pool->ws->shard_blocks;
        moas_pool_seq q[N_SEQ];
        for (int32_t s = 0; s < N_SEQ; s++) {
            q[s] = (moas_pool_seq){in_pool[s], &tokens[s][step], 1, MOAS_LOGITS_LAST, NULL};
            ASSERT_OK(moas_context_decode(alone[s], tokens[s][step], NULL));
        }
        ASSERT_OK(moas_pool_decode(pool, q, N_SEQ));
        ASSERT_EQ(pool->ws->shard_blocks - split_before, step < STEPS / 2 ? 1 : 0);
        for (int32_t s = 0; s < N_SEQ; s++) {
            ASSERT_TRUE(memcmp(moas_context_logits(alone[s]), moas_context_logits(in_pool[s]),
                               (size_t)V * sizeof(float)) == 0);
        }
    }
    for (int32_t s = 0; s < N_SEQ; s++) {
        ASSERT_TRUE(same_records(alone[s], in_pool[s]));
        ASSERT_TRUE(s % 2 != 0 || moas_context_kv_bytes_used(in_pool[s], -1) <= 3000);
    }
    /* the budget steered: its contexts stored fewer bytes than the free ones */
    ASSERT_TRUE(moas_context_kv_bytes_used(in_pool[0], -1) +
                    moas_context_kv_bytes_used(in_pool[2], -1) <
                moas_context_kv_bytes_used(in_pool[1], -1) +
                    moas_context_kv_bytes_used(in_pool[3], -1));
    ASSERT_EQ(watch.calls, (STEPS - STEPS / 2) * moas_model_n_layer(m));
    ASSERT_EQ(watch.elsewhere, 0);
    ASSERT_EQ(watch.out_of_order, 0);
    for (int32_t s = 0; s < N_SEQ; s++) {
        moas_context_free(in_pool[s]);
        moas_context_free(alone[s]);
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

TEST(pool_arguments_are_checked) {
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    int32_t tokens[4] = {1, 2, 3, 4}, bad_tok[1] = {-1};
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool_params pp;
    moas_pool *pool = NULL, *other = NULL;
    moas_pool_params_init(&pp);
    ASSERT_STATUS(moas_pool_create(m, &pp, &pool), MOAS_ERR_INVALID_ARG);   /* no capacity */
    pp.capacity_bytes = 1 << 16;
    pp.page_heads = 12;
    ASSERT_STATUS(moas_pool_create(m, &pp, &pool), MOAS_ERR_INVALID_ARG);
    pp.page_heads = 0;
    pp.kv_type = 7;
    ASSERT_STATUS(moas_pool_create(m, &pp, &pool), MOAS_ERR_INVALID_ARG);
    pp.kv_type = MOAS_TYPE_F32;
    ASSERT_STATUS(moas_pool_create(NULL, &pp, &pool), MOAS_ERR_INVALID_ARG);
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    ASSERT_OK(moas_pool_create(m, &pp, &other));
    moas_context *a = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    moas_context *r = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *o = make_ctx(m, other, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a && r && o);
    ASSERT_OK(moas_context_set_kv_budget(r, 1 << 20));
    const moas_pool_seq twice[2] = {{a, tokens, 1, 0, NULL}, {a, tokens, 1, 0, NULL}};
    const moas_pool_seq foreign[1] = {{o, tokens, 1, 0, NULL}};
    const moas_pool_seq mixed[2] = {{a, tokens, 1, 0, NULL}, {r, tokens, 1, 0, NULL}};
    const moas_pool_seq budget[1] = {{r, tokens, 2, 0, NULL}};
    const moas_pool_seq badtok[2] = {{a, tokens, 1, 0, NULL}, {NULL, NULL, 0, 0, NULL}};
    const moas_pool_seq badtok2[1] = {{a, bad_tok, 1, 0, NULL}};
    const moas_pool_seq nologits[1] = {{a, tokens, 2, MOAS_LOGITS_ALL, NULL}};
    ASSERT_STATUS(moas_pool_decode(pool, twice, 2), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "twice") != NULL);
    ASSERT_STATUS(moas_pool_decode(pool, foreign, 1), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_pool_decode(pool, mixed, 2), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_pool_decode(pool, budget, 1), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_pool_decode(pool, badtok, 2), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_pool_decode(pool, badtok2, 1), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "sequence 0") != NULL);
    ASSERT_STATUS(moas_pool_decode(pool, nologits, 1), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_pool_decode(NULL, twice, 1), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_pool_decode(pool, NULL, 1), MOAS_ERR_INVALID_ARG);
    ASSERT_OK(moas_pool_decode(pool, NULL, 0));
    ASSERT_EQ(a->n_past + r->n_past, 0);
    ASSERT_OK(moas_pool_decode(pool, twice, 1));   /* a is still usable */
    ASSERT_EQ(a->n_past, 1);

    /* a context for another model's pool is refused */
    size_t size2;
    uint8_t *image2 = kind_image(2, &size2);
    moas_model *m2;
    moas_context_params cp;
    moas_context *x = NULL;
    ASSERT_OK(moas_model_load_memory(image2, size2, NULL, &m2));
    moas_context_params_init(&cp);
    cp.pool = pool;
    ASSERT_STATUS(moas_context_create(m2, &cp, &x), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(x == NULL);
    moas_model_free(m2);
    free(image2);
    moas_context_free(a);
    moas_context_free(r);
    moas_context_free(o);
    moas_pool_free(pool);
    moas_pool_free(other);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Contexts of one pool decoded from several threads at once (their pages come and go
 * under the pool's lock), while another thread reads the pool's figures, equal the
 * same work done one after another. */
typedef struct {
    moas_context *ctx;
    const int32_t *tokens;
    int32_t n;
    moas_status st;
} pool_thread_job;

static void *pool_thread(void *arg) {
    pool_thread_job *j = arg;
    j->st = MOAS_OK;
    for (int32_t round = 0; round < 3 && j->st == MOAS_OK; round++) {
        moas_context_reset(j->ctx);
        for (int32_t i = 0; i < j->n && j->st == MOAS_OK; i++) {
            j->st = moas_context_decode(j->ctx, j->tokens[i], NULL);
        }
    }
    return NULL;
}

TEST(pool_contexts_on_several_threads) {
    enum { T = 4, N = 40 };
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[T][N];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 4);
    ASSERT_TRUE(pool != NULL);
    pthread_t th[T];
    pool_thread_job jobs[T];
    moas_context *ref[T];
    for (int32_t t = 0; t < T; t++) {
        seq_tokens(tokens[t], N, moas_model_n_vocab(m), 50 + (uint32_t)t);
        jobs[t] = (pool_thread_job){make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1),
                                    tokens[t], N, MOAS_OK};
        ref[t] = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(jobs[t].ctx != NULL && ref[t] != NULL);
        ASSERT_OK(moas_context_decode_batch(ref[t], tokens[t], N, NULL, MOAS_LOGITS_LAST));
    }
    for (int32_t t = 0; t < T; t++) {
        ASSERT_EQ(pthread_create(&th[t], NULL, pool_thread, &jobs[t]), 0);
    }
    ASSERT_TRUE(pool_figures_read_while_they_change(pool));
    for (int32_t t = 0; t < T; t++) {
        pthread_join(th[t], NULL);
        ASSERT_OK(jobs[t].st);
    }
    for (int32_t t = 0; t < T; t++) {
        ASSERT_TRUE(memcmp(moas_context_logits(ref[t]), moas_context_logits(jobs[t].ctx),
                           (size_t)moas_model_n_vocab(m) * sizeof(float)) == 0);
        ASSERT_TRUE(same_records(ref[t], jobs[t].ctx));
        moas_context_free(jobs[t].ctx);
        moas_context_free(ref[t]);
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* What else may run at once on one pool (docs/KV_CACHE.md, "Threads"): one thread
 * advances two contexts with moas_pool_decode while two others each decode a context
 * of their own, fork it (and decode and free the fork), save its state, load it into a
 * new context of the pool and go on there, and the main thread reads the pool's
 * figures. Every sequence ends equal to the same tokens decoded alone, bit for bit.
 * make tsan runs it under ThreadSanitizer. */
typedef struct {
    moas_pool *pool;
    moas_context *ctx[2];
    const int32_t *tokens[2];
    int32_t n;
    moas_status st;
} pool_batch_job;

static void *pool_batch_thread(void *arg) {
    pool_batch_job *j = arg;
    j->st = MOAS_OK;
    for (int32_t i = 0; i < j->n && j->st == MOAS_OK; i++) {
        moas_pool_seq q[2];
        for (int k = 0; k < 2; k++) {
            q[k] = (moas_pool_seq){j->ctx[k], &j->tokens[k][i], 1, MOAS_LOGITS_LAST, NULL};
        }
        j->st = moas_pool_decode(j->pool, q, 2);
    }
    return NULL;
}

typedef struct {
    const moas_model *m;
    moas_pool *pool;
    moas_context *ctx;   /* at the end: the context the state was loaded into */
    const int32_t *tokens;
    int32_t n;
    moas_status st;
} pool_moving_job;

static void *pool_moving_thread(void *arg) {
    pool_moving_job *j = arg;
    moas_status st = MOAS_OK;
    for (int32_t i = 0; i < j->n && st == MOAS_OK; i++) {
        st = moas_context_decode(j->ctx, j->tokens[i], NULL);
        if (st == MOAS_OK && i == j->n / 2) {
            moas_context *fork = NULL, *moved = NULL;
            size_t written = 0;
            const size_t size = moas_context_state_size(j->ctx);
            uint8_t *state = malloc(size);
            st = state == NULL ? MOAS_ERR_NO_MEMORY : moas_context_fork(j->ctx, &fork);
            for (int32_t k = 0; st == MOAS_OK && k < 4; k++) {   /* the fork goes its way */
                st = moas_context_decode(fork, j->tokens[k], NULL);
            }
            if (st == MOAS_OK) {
                st = moas_context_state_save(j->ctx, state, size, &written);
            }
            if (st == MOAS_OK) {
                moved = make_ctx(j->m, j->pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
                st = moved == NULL ? MOAS_ERR_NO_MEMORY
                                   : moas_context_state_load(moved, state, written);
            }
            moas_context_free(fork);
            free(state);
            moas_context_free(j->ctx);
            j->ctx = moved;
        }
    }
    j->st = st;
    return NULL;
}

TEST(pool_batch_fork_and_state_on_several_threads) {
    enum { N = 40 };
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[4][N];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 4);
    ASSERT_TRUE(pool != NULL);
    for (int32_t t = 0; t < 4; t++) {
        seq_tokens(tokens[t], N, V, 500 + (uint32_t)t);
    }
    pool_batch_job batch = {pool, {NULL, NULL}, {tokens[0], tokens[1]}, N, MOAS_OK};
    pool_moving_job moving[2];
    for (int k = 0; k < 2; k++) {
        batch.ctx[k] = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        moving[k] = (pool_moving_job){m, pool, make_ctx(m, pool, MOAS_MODE_ROUTED,
                                                         MOAS_TYPE_F32, 1),
                                      tokens[2 + k], N, MOAS_OK};
        ASSERT_TRUE(batch.ctx[k] != NULL && moving[k].ctx != NULL);
    }
    pthread_t th[3];
    ASSERT_EQ(pthread_create(&th[0], NULL, pool_batch_thread, &batch), 0);
    ASSERT_EQ(pthread_create(&th[1], NULL, pool_moving_thread, &moving[0]), 0);
    ASSERT_EQ(pthread_create(&th[2], NULL, pool_moving_thread, &moving[1]), 0);
    ASSERT_TRUE(pool_figures_read_while_they_change(pool));
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
    }
    ASSERT_OK(batch.st);
    ASSERT_OK(moving[0].st);
    ASSERT_OK(moving[1].st);
    const moas_context *got[4] = {batch.ctx[0], batch.ctx[1], moving[0].ctx, moving[1].ctx};
    for (int32_t t = 0; t < 4; t++) {
        moas_context *ref = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(ref != NULL);
        for (int32_t i = 0; i < N; i++) {
            ASSERT_OK(moas_context_decode(ref, tokens[t][i], NULL));
        }
        ASSERT_TRUE(memcmp(moas_context_logits(ref), moas_context_logits(got[t]),
                           (size_t)V * sizeof(float)) == 0);
        ASSERT_TRUE(same_records(ref, got[t]));
        moas_context_free(ref);
    }
    for (int32_t t = 0; t < 4; t++) {
        moas_context_free((moas_context *)got[t]);
    }
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, info.n_pages);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A second moas_pool_decode on a pool while one is under way is refused (and the first
 * goes on unharmed): the first call's route callback, on its decoding thread, waits
 * until another thread has tried a call of its own. */
typedef struct {
    moas_pool *pool;
    moas_context *other;
    int32_t token;
    atomic_int stage;        /* 0: idle, 1: first call inside, 2: second call returned */
    moas_status second;
    char message[160];
} refusal_probe;

static void *second_call_thread(void *arg) {
    refusal_probe *p = arg;
    while (atomic_load(&p->stage) != 1) {
        sched_yield();
    }
    moas_pool_seq q = {p->other, &p->token, 1, MOAS_LOGITS_LAST, NULL};
    p->second = moas_pool_decode(p->pool, &q, 1);
    snprintf(p->message, sizeof p->message, "%s", moas_last_error());
    atomic_store(&p->stage, 2);
    return NULL;
}

static int32_t hold_the_call(void *user, int32_t pos, int32_t layer, const float *gates,
                             int32_t n_scheme, int32_t proposed) {
    refusal_probe *p = user;
    (void)pos, (void)gates, (void)n_scheme;
    if (layer == 0 && atomic_load(&p->stage) == 0) {
        atomic_store(&p->stage, 1);
        while (atomic_load(&p->stage) != 2) {
            sched_yield();
        }
    }
    return proposed;
}

TEST(pool_decode_refuses_a_second_call_at_once) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 4);
    moas_context *held = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *ref = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    refusal_probe probe = {.pool = pool,
                           .other = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1),
                           .token = 3};
    ASSERT_TRUE(pool && held && ref && probe.other);
    atomic_init(&probe.stage, 0);
    moas_context_set_route_callback(held, hold_the_call, &probe);
    pthread_t th;
    ASSERT_EQ(pthread_create(&th, NULL, second_call_thread, &probe), 0);
    const int32_t token = 5;
    moas_pool_seq q = {held, &token, 1, MOAS_LOGITS_LAST, NULL};
    ASSERT_OK(moas_pool_decode(pool, &q, 1));
    pthread_join(th, NULL);
    ASSERT_STATUS(probe.second, MOAS_ERR_BUSY);
    ASSERT_TRUE(strstr(probe.message, "another pool_decode call on this pool") != NULL);
    ASSERT_EQ(moas_context_n_past(probe.other), 0);
    ASSERT_OK(moas_context_decode(ref, token, NULL));
    ASSERT_TRUE(memcmp(moas_context_logits(ref), moas_context_logits(held),
                       (size_t)moas_model_n_vocab(m) * sizeof(float)) == 0);
    /* and once it has returned, the pool takes the next call */
    moas_pool_seq q2 = {probe.other, &probe.token, 1, MOAS_LOGITS_LAST, NULL};
    ASSERT_OK(moas_pool_decode(pool, &q2, 1));
    moas_context_free(held);
    moas_context_free(ref);
    moas_context_free(probe.other);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Compaction pools older MHA tokens down to MQA: the stored heads become the means of
 * the six (computed here from the state saved before), the scheme records follow, the
 * freed pages go back, later tokens are untouched, and a fork sharing the pages is not
 * affected. */
TEST(compaction_pools_old_tokens_and_frees_pages) {
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V, heads 4, schemes 4, 2, 1 */
    moas_model *m;
    int32_t tokens[24];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m), L = moas_model_n_layer(m), d = moas_model_head_dim(m);
    seq_tokens(tokens, 24, V, 4);
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 0, 4);
    moas_context *ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1), *fork, *ref;
    ASSERT_TRUE(pool && ctx);
    ASSERT_OK(moas_context_force_scheme(ctx, 0));   /* MHA: 4 heads */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 12, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_fork(ctx, &fork));
    ref = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_OK(moas_context_force_scheme(ref, 0));
    ASSERT_OK(moas_context_decode_batch(ref, tokens, 12, NULL, MOAS_LOGITS_LAST));
    const size_t n0 = moas_context_state_size(ctx);
    uint8_t *before = malloc(n0), *after = malloc(n0);
    size_t w;
    ASSERT_TRUE(before && after);
    ASSERT_OK(moas_context_state_save(ctx, before, n0, &w));
    const int32_t pages0 = moas_context_kv_pages(ctx);

    int32_t changed = -1;
    ASSERT_OK(moas_context_compact(ctx, 8, 2, &changed));   /* tokens 0..7 to MQA */
    ASSERT_EQ(changed, 8 * L);
    ASSERT_EQ(moas_context_kv_pages(ctx), L * ((8 * 1 + 4 * 4 + 3) / 4));   /* 24 heads: 6 pages */
    ASSERT_TRUE(moas_context_kv_pages(ctx) < pages0);
    int32_t counts[3];
    ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
    ASSERT_EQ(counts[2], 8 * L);
    ASSERT_EQ(counts[0], 4 * L);
    ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1),
              (size_t)L * ((8 * 1 + 4 * 4) * d * 2 * 4 + 12 * 5));
    ASSERT_OK(moas_context_state_save(ctx, after, n0, &w));

    /* the saved layout: header, schemes, gates, logits, then per layer K heads, V heads */
    const size_t S = 3, head = (size_t)d * 4;
    const size_t kv0 = 56 + (size_t)12 * L * (1 + 4 * S) + (size_t)V * 4;
    const float *old = (const float *)(const void *)(before + kv0);
    const float *now = (const float *)(const void *)(after + kv0);
    for (int32_t l = 0; l < L; l++) {
        for (int side = 0; side < 2; side++) {
            for (int32_t j = 0; j < 12; j++) {
                for (int32_t e = 0; e < d; e++) {
                    if (j < 8) {   /* one head, the mean of the four, summed in order */
                        float sum = 0.0f;
                        for (int32_t h = 0; h < 4; h++) {
                            sum += old[((size_t)j * 4 + h) * d + e];
                        }
                        ASSERT_TRUE(now[(size_t)j * d + e] == sum / 4.0f);
                    } else {
                        ASSERT_TRUE(now[((size_t)8 + (j - 8) * 4) * d + e] ==
                                    old[(size_t)j * 4 * d + e]);
                        ASSERT_TRUE(now[((size_t)8 + (j - 8) * 4 + 1) * d + e] ==
                                    old[((size_t)j * 4 + 1) * d + e]);
                    }
                }
            }
            old += (size_t)12 * 4 * d;
            now += (size_t)(8 + 4 * 4) * d;
        }
    }
    (void)head;

    /* decoding on reads the pooled heads; the fork, sharing the old pages, equals the
     * uncompacted reference */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 12, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(fork, tokens + 12, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(ref, tokens + 12, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(fork), moas_context_logits(ref), (size_t)V * 4) == 0);
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(ref), (size_t)V * 4) != 0);

    /* refused: mixture mode, independent schemes, out of range */
    moas_context *mix = make_ctx(m, pool, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_STATUS(moas_context_compact(mix, 0, 2, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_compact(ctx, 19, 2, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_compact(ctx, 4, 3, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_OK(moas_context_compact(ctx, 4, 2, &changed));   /* nothing left to pool */
    ASSERT_EQ(changed, 0);
    free(before);
    free(after);
    moas_context_free(mix);
    moas_context_free(ctx);
    moas_context_free(fork);
    moas_context_free(ref);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Compaction pools only groups that nest: with 12 heads and schemes of 12, 4 and 3
 * heads, compacting to 3 pools the tokens that stored 12 (groups of 4) and leaves
 * those that stored 4, which no mean of whole groups turns into 3, as they were. */
TEST(compaction_leaves_heads_that_do_not_nest) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.n_ctx_train = 64;
    cfg.n_embd = 48;
    cfg.n_head = 12;
    cfg.scheme_n_kv[0] = 12;
    cfg.scheme_n_kv[1] = 4;
    cfg.scheme_n_kv[2] = 3;
    cfg.kv_sharing = "pooled";
    size_t size;
    uint8_t *image = tiny_model_image(&cfg, 81, &size);
    moas_model *m;
    int32_t tokens[8];
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t L = moas_model_n_layer(m), d = moas_model_head_dim(m);
    seq_tokens(tokens, 8, moas_model_n_vocab(m), 5);
    moas_context *ctx = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(ctx != NULL);
    ASSERT_OK(moas_context_force_scheme(ctx, 1));   /* 4 heads */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 6, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_force_scheme(ctx, 0));   /* 12 heads */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 6, 2, NULL, MOAS_LOGITS_LAST));
    const size_t used0 = moas_context_kv_bytes_used(ctx, -1);

    int32_t changed = -1, counts[3];
    ASSERT_OK(moas_context_compact(ctx, 8, 2, &changed));
    ASSERT_EQ(changed, 2 * L);
    ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
    ASSERT_EQ(counts[0], 0);
    ASSERT_EQ(counts[1], 6 * L);
    ASSERT_EQ(counts[2], 2 * L);
    /* two tokens in each layer lost 9 heads of K and V, f32 */
    ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), used0 - (size_t)L * 2 * 9 * d * 2 * 4);
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Compaction in a pool with no page free, which is when a server compacts: it needs no
 * page for pages only its context holds, so it runs and gives pages back; where a fork
 * shares the pages it would rewrite, it needs a copy of each first, and with none free
 * it is refused whole, naming the pages it lacks, and changes nothing. The pooled
 * 2-layer model, routed, MHA forced (4 heads a token and layer), pages of 4 heads, a
 * pool of 20 pages: 8 tokens are 8 pages a layer, 2 pages a layer once pooled to MQA. */
TEST(compaction_in_a_full_pool) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[10];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_layer(m), 2);
    ASSERT_EQ(moas_model_head_dim(m), 8);
    seq_tokens(tokens, 10, moas_model_n_vocab(m), 14);
    moas_pool *pool = make_pool(m, 20 * 256, MOAS_TYPE_F32, 1, 0, 4);
    ASSERT_TRUE(pool != NULL);
    moas_pool_info info = {.size = sizeof info}, before = {.size = sizeof before};
    for (int shared = 0; shared < 2; shared++) {
        moas_context *ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1), *fork = NULL;
        moas_context *filler = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(ctx && filler);
        ASSERT_OK(moas_context_force_scheme(ctx, 0));
        ASSERT_OK(moas_context_force_scheme(filler, 0));
        ASSERT_OK(moas_context_decode_batch(ctx, tokens, 8, NULL, MOAS_LOGITS_LAST));
        if (shared) {
            ASSERT_OK(moas_context_fork(ctx, &fork));   /* 32 heads a layer: no copy */
        }
        ASSERT_OK(moas_context_decode_batch(filler, tokens + 8, 2, NULL, MOAS_LOGITS_NONE));
        ASSERT_OK(moas_pool_stats(pool, &before));
        ASSERT_EQ(before.pages_free, 0);
        ASSERT_EQ(moas_context_kv_pages(ctx), 16);
        int32_t changed = -1, counts[3];
        if (shared) {
            size_t n0, n1;
            uint8_t *s0 = saved_state(ctx, &n0), *f0 = saved_state(fork, &n0);
            ASSERT_TRUE(s0 && f0);
            ASSERT_STATUS(moas_context_compact(ctx, 8, 2, &changed), MOAS_ERR_POOL_FULL);
            /* the copies of the pages the pooled heads go to, 2 a layer */
            ASSERT_TRUE(strstr(moas_last_error(), "context_compact: the KV pool lacks 4 "
                                                  "page(s): 4 needed, 0 free of 20") != NULL);
            ASSERT_EQ(changed, 0);
            ASSERT_OK(moas_pool_stats(pool, &info));
            ASSERT_EQ(info.pages_free, 0);
            ASSERT_EQ(info.bytes_used, before.bytes_used);
            ASSERT_EQ(moas_context_kv_pages(ctx), 16);
            ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
            ASSERT_EQ(counts[0], 8 * 2);
            uint8_t *s1 = saved_state(ctx, &n1), *f1 = saved_state(fork, &n1);
            ASSERT_TRUE(s1 && f1);
            ASSERT_TRUE(memcmp(s1, s0, n0) == 0 && memcmp(f1, f0, n0) == 0);
            free(s0);
            free(f0);
            free(s1);
            free(f1);
            moas_context_free(fork);   /* the pages are ctx's alone again; still none free */
            ASSERT_OK(moas_pool_stats(pool, &info));
            ASSERT_EQ(info.pages_free, 0);
        }
        ASSERT_OK(moas_context_compact(ctx, 8, 2, &changed));
        ASSERT_EQ(changed, 8 * 2);
        ASSERT_EQ(moas_context_kv_pages(ctx), 4);
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), 2 * (8 * 1 * 8 * 2 * 4 + 8 * 5));
        ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
        ASSERT_EQ(counts[2], 8 * 2);
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 12);
        moas_context_free(filler);
        moas_context_free(ctx);
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 20);
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A shift or compaction of a context whose pages a fork shares copies only the shared
 * pages it writes into: those holding the heads from the first it rewrites to its new
 * end. The shared pages past that end are only read and then given back, so a pool with
 * too few free pages to copy them still serves the call. op 0: a shift dropping every
 * token after the first 2 (nothing is written: no copy), op 1: a shift dropping the
 * first 6 of 8, op 2: compaction of all 8 from 4 heads to 1. Each context stores 4
 * heads (a page) a token and layer: 8 tokens, 2 layers hold 16 of the pool's 20 pages.
 * The fork keeps its state; the context ends as a context of its own pages does after
 * the same call. */
static int shift_or_compact(moas_context *ctx, int op, int32_t *changed) {
    return op == 0   ? moas_context_shift(ctx, 2, 6)
           : op == 1 ? moas_context_shift(ctx, 0, 6)
                     : moas_context_compact(ctx, 8, 2, changed);
}

TEST(shift_and_compaction_copy_only_the_shared_pages_they_write) {
    size_t size;
    uint8_t *image = kind_image(4, &size);   /* pooled K/V, RoPE: compact and shift apply */
    moas_model *m;
    int32_t tokens[8];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_layer(m), 2);
    ASSERT_EQ(moas_model_head_dim(m), 8);
    seq_tokens(tokens, 8, moas_model_n_vocab(m), 23);
    moas_pool *pool = make_pool(m, 20 * 256, MOAS_TYPE_F32, 1, 0, 4);
    ASSERT_TRUE(pool != NULL);
    moas_pool_info info = {.size = sizeof info};
    for (int op = 0; op < 3; op++) {
        /* pages the call copies: 0; the 2 tokens kept, 2 pages a layer; 8 heads a layer */
        const int32_t copies = op == 0 ? 0 : 4, pages_after = 4;
        moas_context *ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1), *fork = NULL;
        ASSERT_TRUE(ctx != NULL);
        ASSERT_OK(moas_context_force_scheme(ctx, 0));
        ASSERT_OK(moas_context_decode_batch(ctx, tokens, 8, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_context_fork(ctx, &fork));   /* 8 full pages a layer: all shared */
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 4);
        size_t n_fork, n_after;
        uint8_t *f0 = saved_state(fork, &n_fork);
        ASSERT_TRUE(f0 != NULL);
        int32_t changed = -1;
        ASSERT_OK(shift_or_compact(ctx, op, &changed));
        ASSERT_EQ(moas_context_kv_pages(ctx), pages_after);
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 4 - copies);
        uint8_t *f1 = saved_state(fork, &n_after), *s1 = saved_state(ctx, &n_after);
        ASSERT_TRUE(f1 != NULL && s1 != NULL);
        ASSERT_TRUE(memcmp(f1, f0, n_fork) == 0);
        moas_context_free(fork);   /* the same call on a context holding its pages alone */
        moas_context *alone = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(alone != NULL);
        ASSERT_OK(moas_context_force_scheme(alone, 0));
        ASSERT_OK(moas_context_decode_batch(alone, tokens, 8, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(shift_or_compact(alone, op, &changed));
        ASSERT_EQ(changed, op == 2 ? 8 * 2 : -1);
        size_t n_alone;
        uint8_t *a1 = saved_state(alone, &n_alone);
        ASSERT_TRUE(a1 != NULL);
        ASSERT_EQ(n_alone, n_after);
        ASSERT_TRUE(memcmp(a1, s1, n_after) == 0);
        free(f0);
        free(f1);
        free(s1);
        free(a1);
        moas_context_free(alone);
        moas_context_free(ctx);
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, 20);
    }
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A pool with steer_below routes a routed context's tokens toward cheaper schemes as
 * its pages run out: each token's heads follow the limit computed here from the free
 * pages before its call, and the context fits more tokens than without steering. */
TEST(pool_steering_follows_free_pages) {
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V, schemes 4, 2, 1 */
    moas_model *m;
    int32_t tokens[64];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t L = moas_model_n_layer(m);
    seq_tokens(tokens, 64, moas_model_n_vocab(m), 6);
    int32_t fitted[2];
    for (int steered = 0; steered < 2; steered++) {
        moas_pool_params pp;
        moas_pool *pool;
        moas_pool_params_init(&pp);
        pp.page_heads = 4;
        pp.capacity_bytes = (uint64_t)40 * 4 * moas_model_head_dim(m) * 2 * 4;   /* 40 pages */
        pp.steer_below = steered ? 1.0f : 0.0f;
        ASSERT_OK(moas_pool_create(m, &pp, &pool));
        moas_context *ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(ctx != NULL);
        ASSERT_OK(moas_context_force_scheme(ctx, 0));   /* the router's proposal: MHA */
        int32_t n = 0;
        for (; n < 64; n++) {
            moas_pool_info info = {.size = sizeof info};
            ASSERT_OK(moas_pool_stats(pool, &info));
            const moas_status st = moas_context_decode(ctx, tokens[n], NULL);
            if (st == MOAS_ERR_POOL_FULL) {
                break;
            }
            ASSERT_OK(st);
            int32_t heads[8];
            float gates[8 * 3];
            ASSERT_OK(moas_context_routes(ctx, n, 1, gates, NULL, heads));
            const int32_t limit = steered && info.pages_free < info.n_pages
                                      ? 1 + (int32_t)(3.0 * info.pages_free / info.n_pages)
                                      : 4;
            for (int32_t l = 0; l < L; l++) {
                /* MHA within the limit; else the larger gate of GQA (2 heads, if the limit
                 * allows) and MQA */
                const float *g = gates + l * 3;
                const int32_t want = limit >= 4 ? 4 : limit >= 2 && g[1] >= g[2] ? 2 : 1;
                ASSERT_EQ(heads[l], want);
            }
        }
        fitted[steered] = n;
        moas_context_free(ctx);
        moas_pool_free(pool);
    }
    ASSERT_EQ(fitted[0], 40 * 4 / 4 / 2);   /* 40 pages of 4 heads, 2 layers of MHA tokens */
    ASSERT_TRUE(fitted[1] > 2 * fitted[0]);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The limit scales with steer_below: at 0.5 the tokens keep the widest scheme while
 * half the pages or more are free, and below that the limit is cheapest + (widest -
 * cheapest) * f / 0.5, so GQA (2 heads) stays open down to a sixth of the pages free,
 * where at steer_below 1 it would close at a third. Same model and pool as above. */
TEST(pool_steering_scales_with_steer_below) {
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V, schemes 4, 2, 1 */
    moas_model *m;
    int32_t tokens[64];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t L = moas_model_n_layer(m);
    seq_tokens(tokens, 64, moas_model_n_vocab(m), 6);
    moas_pool_params pp;
    moas_pool *pool;
    moas_pool_params_init(&pp);
    pp.page_heads = 4;
    pp.capacity_bytes = (uint64_t)40 * 4 * moas_model_head_dim(m) * 2 * 4;   /* 40 pages */
    pp.steer_below = 0.5f;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context *ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(ctx != NULL);
    ASSERT_OK(moas_context_force_scheme(ctx, 0));   /* the router's proposal: MHA */
    int32_t wide = 0, gqa_low = 0;   /* MHA tokens; GQA ones below a third free */
    for (int32_t n = 0; n < 64; n++) {
        moas_pool_info info = {.size = sizeof info};
        ASSERT_OK(moas_pool_stats(pool, &info));
        const moas_status st = moas_context_decode(ctx, tokens[n], NULL);
        if (st == MOAS_ERR_POOL_FULL) {
            break;
        }
        ASSERT_OK(st);
        int32_t heads[8];
        float gates[8 * 3];
        ASSERT_OK(moas_context_routes(ctx, n, 1, gates, NULL, heads));
        const double f = (double)info.pages_free / (double)info.n_pages;
        const int32_t limit = f >= 0.5 ? 4 : 1 + (int32_t)(3 * f / 0.5);
        for (int32_t l = 0; l < L; l++) {
            const float *g = gates + l * 3;
            const int32_t want = limit >= 4 ? 4 : limit >= 2 && g[1] >= g[2] ? 2 : 1;
            ASSERT_EQ(heads[l], want);
            wide += heads[l] == 4;
            gqa_low += heads[l] == 2 && 3 * info.pages_free < info.n_pages;
        }
    }
    ASSERT_TRUE(wide > 0);
    ASSERT_TRUE(gqa_low > 0);   /* the range where 0.5 and 1 differ was reached */
    moas_context_free(ctx);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A call reserves pages for the most heads its tokens may take: a forced scheme
 * without a route callback takes only that scheme's, steering only its limit; with a
 * callback (which may choose any scheme) the widest. The pooled 2-layer model of
 * schemes 4, 2 and 1 heads, pages of 4 heads. */
static int32_t propose(void *user, int32_t pos, int32_t layer, const float *gates,
                       int32_t n_scheme, int32_t proposed) {
    (void)user, (void)pos, (void)layer, (void)gates, (void)n_scheme;
    return proposed;
}

TEST(pool_reserves_only_the_heads_a_token_may_take) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[48];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_layer(m), 2);
    const int32_t V = moas_model_n_vocab(m);
    const uint64_t page_bytes = (uint64_t)4 * moas_model_head_dim(m) * 2 * 4;
    seq_tokens(tokens, 48, V, 8);

    /* forced MQA: 16 tokens are 4 pages a layer, not the 16 of MHA-wide tokens */
    moas_pool_params pp;
    moas_pool *pool;
    moas_pool_params_init(&pp);
    pp.page_heads = 4;
    pp.capacity_bytes = 10 * page_bytes;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context *ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *alone = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(ctx != NULL && alone != NULL);
    ASSERT_OK(moas_context_force_scheme(ctx, 2));
    ASSERT_OK(moas_context_force_scheme(alone, 2));
    float *got = malloc((size_t)16 * V * sizeof *got), *want = malloc((size_t)16 * V * sizeof *want);
    ASSERT_TRUE(got != NULL && want != NULL);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 16, got, MOAS_LOGITS_ALL));
    ASSERT_OK(moas_context_decode_batch(alone, tokens, 16, want, MOAS_LOGITS_ALL));
    ASSERT_TRUE(memcmp(got, want, (size_t)16 * V * sizeof *got) == 0);
    ASSERT_TRUE(same_records(ctx, alone));
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 2);
    /* with a route callback the same call must reserve for MHA: refused, nothing kept */
    moas_context_free(ctx);
    ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(ctx != NULL);
    ASSERT_OK(moas_context_force_scheme(ctx, 2));
    moas_context_set_route_callback(ctx, propose, NULL);
    ASSERT_EQ(moas_context_decode_batch(ctx, tokens, 16, got, MOAS_LOGITS_ALL),
              MOAS_ERR_POOL_FULL);
    ASSERT_EQ(moas_context_n_past(ctx), 0);
    moas_context_free(ctx);
    moas_pool_free(pool);

    /* steering: with 2 pages of 24 free the limit is 1 head a token, so 4 more tokens
     * of a context whose router proposes MHA fit in one page a layer */
    pp.capacity_bytes = 24 * page_bytes;
    pp.steer_below = 1.0f;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context *filler = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ctx = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(filler != NULL && ctx != NULL);
    ASSERT_OK(moas_context_force_scheme(filler, 2));
    ASSERT_OK(moas_context_decode_batch(filler, tokens, 44, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 2);
    ASSERT_OK(moas_context_force_scheme(ctx, 0));
    ASSERT_EQ(moas_context_decode_batch(ctx, tokens, 8, NULL, MOAS_LOGITS_NONE),
              MOAS_ERR_POOL_FULL);   /* 8 heads a layer: 2 pages each */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 4, NULL, MOAS_LOGITS_NONE));
    int32_t heads[4 * 2];
    ASSERT_OK(moas_context_routes(ctx, 0, 4, NULL, NULL, heads));
    for (int32_t i = 0; i < 4 * 2; i++) {
        ASSERT_EQ(heads[i], 1);
    }
    moas_context_free(filler);
    moas_context_free(ctx);
    moas_context_free(alone);
    moas_pool_free(pool);
    free(got);
    free(want);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Steering below a forced scheme that is not the widest: the limit binds, so a forced
 * GQA token (2 heads) stores 1, and the call reserves 1 a token (the lesser of the
 * forced scheme's heads and the limit). Both bounds narrow at once here, which no other
 * test nor the fuzz corpus reached: moas__route_choose skipping steering for a narrow
 * forced scheme passed every test while its tokens wrote past their pages. The pooled
 * 2-layer model of schemes 4, 2 and 1 heads, pages of 4 heads, a pool of 40 pages
 * with steer_below 1: a forced-MQA filler of 64 tokens leaves 8 free, a limit of
 * 1 + 3 * 8 / 40 = 1 head. */
TEST(pool_steering_binds_below_a_forced_scheme) {
    size_t size;
    uint8_t *image = kind_image(3, &size);
    moas_model *m;
    int32_t tokens[64];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_layer(m), 2);
    ASSERT_EQ(moas_model_scheme_n_kv(m, 1), 2);
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 64, V, 9);

    moas_pool_params pp;
    moas_pool *pool;
    moas_pool_params_init(&pp);
    pp.page_heads = 4;
    pp.capacity_bytes = 40 * (uint64_t)4 * moas_model_head_dim(m) * 2 * 4;
    pp.steer_below = 1.0f;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_context *filler = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(filler != NULL && a != NULL && b != NULL);
    ASSERT_OK(moas_context_force_scheme(filler, 2));
    ASSERT_OK(moas_context_decode_batch(filler, tokens, 64, NULL, MOAS_LOGITS_NONE));
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 8);

    /* a forced GQA, b left to its router: 8 tokens each at 1 head fill the 8 pages (at
     * the forced scheme's 2 heads a alone would ask 8) */
    ASSERT_OK(moas_context_force_scheme(a, 1));
    const moas_pool_seq seqs[2] = {{a, tokens, 8, MOAS_LOGITS_LAST, NULL},
                                   {b, tokens + 8, 8, MOAS_LOGITS_LAST, NULL}};
    ASSERT_OK(moas_pool_decode(pool, seqs, 2));
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    int32_t heads[8 * 2];
    for (int k = 0; k < 2; k++) {
        ASSERT_OK(moas_context_routes(k == 0 ? a : b, 0, 8, NULL, NULL, heads));
        for (int32_t i = 0; i < 8 * 2; i++) {
            ASSERT_EQ(heads[i], 1);
        }
        ASSERT_EQ(moas_context_kv_pages(k == 0 ? a : b), 4);
    }

    /* alone, a's own call reserves the same way: with b's 4 pages back (the limit is
     * still 1 head), 8 more tokens fit at 1 head a token, not at the forced scheme's 2 */
    ASSERT_OK(moas_context_truncate(b, 0));
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 4);
    ASSERT_OK(moas_context_decode_batch(a, tokens + 16, 8, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_routes(a, 8, 8, NULL, NULL, heads));
    for (int32_t i = 0; i < 8 * 2; i++) {
        ASSERT_EQ(heads[i], 1);
    }
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, 0);
    moas_context_free(b);
    moas_context_free(filler);
    moas_context_free(a);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Outside the rules, a route callback of one context forces a wider scheme on another
 * context of the same call: that context's tokens in this call still take no more
 * heads than its pages were reserved for (its forced MQA's one); from the next call
 * on, the new forcing. */
static int32_t force_other_to_mha(void *user, int32_t pos, int32_t layer, const float *gates,
                                  int32_t n_scheme, int32_t proposed) {
    (void)pos, (void)layer, (void)gates, (void)n_scheme;
    (void)moas_context_force_scheme((moas_context *)user, 0);
    return proposed;
}

TEST(pool_call_keeps_tokens_within_their_reservation) {
    size_t size;
    uint8_t *image = kind_image(3, &size);   /* pooled K/V, schemes 4, 2, 1, 2 layers */
    moas_model *m;
    int32_t tokens[2] = {3, 5};
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 16, 4);
    ASSERT_TRUE(pool != NULL);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a != NULL && b != NULL);
    ASSERT_OK(moas_context_force_scheme(b, 2));
    moas_context_set_route_callback(a, force_other_to_mha, b);
    for (int32_t step = 0; step < 2; step++) {
        moas_pool_seq q[2] = {{a, &tokens[step], 1, MOAS_LOGITS_LAST, NULL},
                              {b, &tokens[step], 1, MOAS_LOGITS_LAST, NULL}};
        ASSERT_OK(moas_pool_decode(pool, q, 2));
        int32_t heads[2];
        ASSERT_OK(moas_context_routes(b, step, 1, NULL, NULL, heads));
        ASSERT_EQ(heads[0], step == 0 ? 1 : 4);   /* reserved for MQA, then MHA */
        ASSERT_EQ(heads[1], step == 0 ? 1 : 4);
    }
    ASSERT_EQ(moas_context_kv_pages(b), 2 * 2);   /* 5 heads a layer: 2 pages of 4 */
    moas_context_free(a);
    moas_context_free(b);
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, info.n_pages);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A route callback that calls into a context of the decode under way (its own, or
 * another of the same pool call): every call that would write or reuse its pages is
 * refused and changes nothing; the decode's results are those of decoding alone. */
typedef struct {
    moas_context *self, *other;
    const void *state;
    size_t state_size;
    int calls;
    int refused, wrong;   /* calls refused with INVALID_ARG; calls that were not */
} meddler;

/* A refusal because another call holds the context, as the library words it. */
static bool refused_in_use(moas_status st) {
    return st == MOAS_ERR_BUSY && strstr(moas_last_error(), "in use by another call");
}

static void expect_refused(meddler *w, moas_status st) {
    if (refused_in_use(st)) {
        w->refused++;
    } else {
        w->wrong++;
    }
}

static int32_t meddle(void *user, int32_t pos, int32_t layer, const float *gates,
                      int32_t n_scheme, int32_t proposed) {
    meddler *w = user;
    (void)pos, (void)layer, (void)gates, (void)n_scheme;
    if (w->calls++ > 0) {
        return proposed;
    }
    const int32_t token = 1;
    moas_context *targets[2] = {w->self, w->other};
    for (int t = 0; t < 2; t++) {
        moas_context *c = targets[t];
        moas_context *child = NULL;
        int32_t changed = 0;
        expect_refused(w, moas_context_decode(c, token, NULL));
        expect_refused(w, moas_context_decode_batch(c, &token, 1, NULL, MOAS_LOGITS_NONE));
        expect_refused(w, moas_context_truncate(c, 0));
        expect_refused(w, moas_context_fork(c, &child));
        expect_refused(w, moas_context_state_load(c, w->state, w->state_size));
        expect_refused(w, moas_context_compact(c, 0, 2, &changed));
        expect_refused(w, moas_context_shift(c, 0, 1));
        moas__set_error("none");
        moas_context_reset(c);
        expect_refused(w, MOAS_ERR_BUSY);   /* reset: refused, says so */
        moas__set_error("none");
        moas_context_free(c);
        expect_refused(w, MOAS_ERR_BUSY);   /* free: kept, says so */
        w->wrong += child != NULL || changed != 0;
    }
    return proposed;
}

TEST(calls_into_a_context_being_decoded_are_refused) {
    size_t size;
    uint8_t *image = kind_image(4, &size);   /* pooled K/V, RoPE: compact and shift apply */
    moas_model *m;
    int32_t tokens[3];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 3, V, 17);
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 16, 4);
    ASSERT_TRUE(pool != NULL);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *a_alone = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b_alone = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a != NULL && b != NULL && a_alone != NULL && b_alone != NULL);
    /* two tokens each first, so that truncate, shift and compact would have work */
    for (int32_t i = 0; i < 2; i++) {
        ASSERT_OK(moas_context_decode(a, tokens[i], NULL));
        ASSERT_OK(moas_context_decode(b, tokens[(i + 1) % 3], NULL));
        ASSERT_OK(moas_context_decode(a_alone, tokens[i], NULL));
        ASSERT_OK(moas_context_decode(b_alone, tokens[(i + 1) % 3], NULL));
    }
    static uint8_t state[1 << 16];
    size_t state_size = 0;
    ASSERT_OK(moas_context_state_save(b_alone, state, sizeof state, &state_size));
    meddler w = {a, b, state, state_size, 0, 0, 0};
    moas_context_set_route_callback(a, meddle, &w);
    moas_pool_seq q[2] = {{a, &tokens[2], 1, MOAS_LOGITS_LAST, NULL},
                          {b, &tokens[0], 1, MOAS_LOGITS_LAST, NULL}};
    ASSERT_OK(moas_pool_decode(pool, q, 2));
    ASSERT_EQ(w.wrong, 0);
    ASSERT_EQ(w.refused, 2 * 9);
    ASSERT_OK(moas_context_decode(a_alone, tokens[2], NULL));
    ASSERT_OK(moas_context_decode(b_alone, tokens[0], NULL));
    ASSERT_TRUE(same_records(a, a_alone) && same_records(b, b_alone));
    ASSERT_TRUE(memcmp(moas_context_logits(a), moas_context_logits(a_alone),
                       (size_t)V * sizeof(float)) == 0);
    ASSERT_TRUE(memcmp(moas_context_logits(b), moas_context_logits(b_alone),
                       (size_t)V * sizeof(float)) == 0);
    /* its own decode too: a context decoding alone refuses its callback's calls */
    w = (meddler){a, a, state, state_size, 0, 0, 0};
    ASSERT_OK(moas_context_decode(a, tokens[1], NULL));
    ASSERT_EQ(w.wrong, 0);
    ASSERT_EQ(w.refused, 2 * 9);
    moas_context_free(a);
    moas_context_free(b);
    moas_context_free(a_alone);
    moas_context_free(b_alone);
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.pages_free, info.n_pages);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* One thread per context is the rule; a call that breaks it while another thread's
 * call holds the context is refused as a route callback's is, and changes nothing:
 * thread A decodes `a` and waits inside its route callback; meanwhile this thread's
 * calls on `a` (and pool calls naming `b` then `a`, and `a` alone, and the settings:
 * forced scheme, budget, route callback) are refused, `b` keeps no claim, and A's
 * decode ends with the bits of decoding alone (its callback still called). A route
 * callback changing its own context's settings, on the decoding thread, goes ahead
 * (pool_call_keeps_tokens_within_their_reservation). */
typedef struct {
    moas_context *ctx;
    int32_t token;
    atomic_int inside, go;
    moas_status st;
} held_decode;

static int32_t wait_inside(void *user, int32_t pos, int32_t layer, const float *gates,
                           int32_t n_scheme, int32_t proposed) {
    held_decode *h = user;
    (void)pos, (void)gates, (void)n_scheme;
    if (layer == 0) {
        atomic_store(&h->inside, 1);
        while (!atomic_load(&h->go)) {
            sched_yield();
        }
    }
    return proposed;
}

static void *decode_thread(void *arg) {
    held_decode *h = arg;
    h->st = moas_context_decode(h->ctx, h->token, NULL);
    return NULL;
}

TEST(calls_on_a_context_another_thread_holds_are_refused) {
    size_t size;
    uint8_t *image = kind_image(4, &size);   /* pooled K/V, RoPE: compact and shift apply */
    moas_model *m;
    int32_t tokens[3];
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, 3, V, 23);
    moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 16, 4);
    ASSERT_TRUE(pool != NULL);
    moas_context *a = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *alone = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a != NULL && b != NULL && alone != NULL);
    for (int32_t i = 0; i < 2; i++) {
        ASSERT_OK(moas_context_decode(a, tokens[i], NULL));
        ASSERT_OK(moas_context_decode(alone, tokens[i], NULL));
    }
    static uint8_t state[1 << 16];
    size_t state_size = 0;
    ASSERT_OK(moas_context_state_save(alone, state, sizeof state, &state_size));
    held_decode h = {.ctx = a, .token = tokens[2]};
    moas_context_set_route_callback(a, wait_inside, &h);
    pthread_t thread;
    ASSERT_EQ(pthread_create(&thread, NULL, decode_thread, &h), 0);
    while (!atomic_load(&h.inside)) {
        sched_yield();
    }
    moas_pool_info before = {.size = sizeof before};   /* A's pages reserved */
    ASSERT_OK(moas_pool_stats(pool, &before));
    int refused = 0;
    moas_context *child = NULL;
    int32_t changed = -1;
    const int32_t token = 1;
    refused += refused_in_use(moas_context_decode(a, token, NULL));
    refused += refused_in_use(moas_context_decode_batch(a, &token, 1, NULL, MOAS_LOGITS_NONE));
    refused += refused_in_use(moas_context_truncate(a, 0));
    refused += refused_in_use(moas_context_fork(a, &child));
    refused += refused_in_use(moas_context_state_load(a, state, state_size));
    refused += refused_in_use(moas_context_compact(a, 1, 2, &changed));
    refused += refused_in_use(moas_context_shift(a, 0, 1));
    moas_context_reset(a);
    refused += strstr(moas_last_error(), "context_reset: the context is in use") != NULL;
    moas_context_free(a);
    refused += strstr(moas_last_error(), "context_free: the context is in use") != NULL;
    moas_pool_seq q[2] = {{b, &tokens[0], 1, MOAS_LOGITS_LAST, NULL},
                          {a, &tokens[1], 1, MOAS_LOGITS_LAST, NULL}};
    refused += refused_in_use(moas_pool_decode(pool, q, 2)) &&
               strstr(moas_last_error(), "sequence 1's context") != NULL;
    refused += refused_in_use(moas_pool_decode(pool, &q[1], 1)) &&
               strstr(moas_last_error(), "sequence 0's context") != NULL;
    /* the settings too: another thread's change would race with the decode reading them */
    refused += refused_in_use(moas_context_force_scheme(a, 2));
    refused += refused_in_use(moas_context_set_kv_budget(a, 1 << 20));
    moas_context_set_route_callback(a, NULL, NULL);
    refused += strstr(moas_last_error(), "context_set_route_callback: the context is in use") !=
               NULL;
    ASSERT_EQ(refused, 14);
    ASSERT_TRUE(child == NULL && changed == 0);
    ASSERT_EQ(moas_context_n_past(b), 0);
    moas_pool_info during = {.size = sizeof during};
    ASSERT_OK(moas_pool_stats(pool, &during));
    ASSERT_EQ(during.pages_free, before.pages_free);
    ASSERT_OK(moas_context_decode(b, tokens[0], NULL));          /* b was let go */

    atomic_store(&h.go, 1);
    ASSERT_EQ(pthread_join(thread, NULL), 0);
    ASSERT_OK(h.st);
    ASSERT_OK(moas_context_decode(alone, tokens[2], NULL));
    ASSERT_EQ(moas_context_n_past(a), 3);
    ASSERT_TRUE(same_records(a, alone));
    ASSERT_TRUE(memcmp(moas_context_logits(a), moas_context_logits(alone),
                       (size_t)V * sizeof(float)) == 0);
    ASSERT_OK(moas_context_truncate(a, 1));   /* held no more */
    moas_context_free(a);
    moas_context_free(b);
    moas_context_free(alone);
    moas_pool_info after = {.size = sizeof after};
    ASSERT_OK(moas_pool_stats(pool, &after));
    ASSERT_EQ(after.pages_free, after.n_pages);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Threads that all call into one context at once, against the rule: each call either
 * runs whole or is refused as "in use" (or fails as it would alone), and what ran is
 * what the context holds. Each thread decodes tokens of its own (one at a time, in
 * threes, or through moas_pool_decode), truncates, resets and forks at random; the
 * route callback, run by whichever thread holds the context, writes down the token at
 * each position it decodes. Replayed alone, that history must give the same records
 * and logits, bit for bit, and every page must come back. */
enum { CROWD_THREADS = 3, CROWD_CALLS = 200, CROWD_CTX = 48 };

typedef struct {
    moas_pool *pool;
    moas_context *ctx;
    int32_t n_vocab;
    int32_t history[CROWD_CTX];   /* written by the holder's callback only */
    atomic_int ready;             /* threads at the start line: they begin together */
    atomic_int ran, refused, bad;
} crowd;

typedef struct {
    crowd *c;
    uint32_t seed;
} crowd_thread;

static _Thread_local int32_t crowd_token;   /* the token this thread is decoding */

static int32_t crowd_record(void *user, int32_t pos, int32_t layer, const float *gates,
                            int32_t n_scheme, int32_t proposed) {
    crowd *c = user;
    (void)gates, (void)n_scheme;
    if (layer == 0) {
        c->history[pos] = crowd_token;
    }
    return proposed;
}

/* A call's status: it ran, it was refused because another call held the context (or,
 * for moas_pool_decode, the pool), or it failed as it may alone (full, or a truncation
 * past the end); anything else is bad. */
static void crowd_count(crowd *c, moas_status st) {
    if (st == MOAS_OK) {
        atomic_fetch_add(&c->ran, 1);
    } else if (refused_in_use(st) ||
               (st == MOAS_ERR_BUSY &&
                strstr(moas_last_error(), "another pool_decode call on this pool"))) {
        atomic_fetch_add(&c->refused, 1);
    } else if (st == MOAS_ERR_CONTEXT_FULL || (st == MOAS_ERR_INVALID_ARG &&
                                               strstr(moas_last_error(), "outside [0,"))) {
        return;
    } else {
        atomic_fetch_add(&c->bad, 1);
    }
}

static void *crowd_body(void *arg) {
    crowd_thread *t = arg;
    crowd *c = t->c;
    uint32_t x = t->seed;
    atomic_fetch_add(&c->ready, 1);
    while (atomic_load(&c->ready) < CROWD_THREADS) {
        sched_yield();
    }
    for (int i = 0; i < CROWD_CALLS; i++) {
        x = x * 1664525u + 1013904223u;
        const uint32_t op = (x >> 8) % 16;
        crowd_token = (int32_t)((x >> 16) % (uint32_t)c->n_vocab);
        const int32_t three[3] = {crowd_token, crowd_token, crowd_token};
        if (op < 7) {
            crowd_count(c, moas_context_decode(c->ctx, crowd_token, NULL));
        } else if (op < 9) {
            crowd_count(c, moas_context_decode_batch(c->ctx, three, 3, NULL, MOAS_LOGITS_LAST));
        } else if (op < 11) {
            const moas_pool_seq q = {c->ctx, three, 1, MOAS_LOGITS_LAST, NULL};
            crowd_count(c, moas_pool_decode(c->pool, &q, 1));
        } else if (op < 14) {
            crowd_count(c, moas_context_truncate(c->ctx, (int32_t)((x >> 24) % CROWD_CTX)));
        } else if (op < 15) {
            moas__set_error("none");
            moas_context_reset(c->ctx);
            crowd_count(c, strstr(moas_last_error(), "in use") ? MOAS_ERR_BUSY : MOAS_OK);
        } else {
            moas_context *child = NULL;
            const moas_status st = moas_context_fork(c->ctx, &child);
            crowd_count(c, st);
            moas_context_free(child);
        }
    }
    return NULL;
}

TEST(crowded_context_runs_or_refuses_each_call_whole) {
    size_t size;
    uint8_t *image = kind_image(4, &size);   /* pooled K/V, RoPE, routed: ragged pages */
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    crowd c = {.n_vocab = moas_model_n_vocab(m)};
    c.pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 1, 16, 4);
    ASSERT_TRUE(c.pool != NULL);
    moas_context_params cp;
    moas_context_params_init(&cp);
    cp.n_ctx = CROWD_CTX;
    cp.n_threads = 1;
    cp.mode = MOAS_MODE_ROUTED;
    cp.pool = c.pool;
    cp.route_fn = crowd_record;
    cp.route_user = &c;
    ASSERT_OK(moas_context_create(m, &cp, &c.ctx));
    pthread_t threads[CROWD_THREADS];
    crowd_thread args[CROWD_THREADS];
    for (int t = 0; t < CROWD_THREADS; t++) {
        args[t] = (crowd_thread){&c, 977u * (uint32_t)t + 5u};
        ASSERT_EQ(pthread_create(&threads[t], NULL, crowd_body, &args[t]), 0);
    }
    for (int t = 0; t < CROWD_THREADS; t++) {
        ASSERT_EQ(pthread_join(threads[t], NULL), 0);
    }
    printf("#   %d calls: %d ran, %d refused as in use\n", CROWD_THREADS * CROWD_CALLS,
           atomic_load(&c.ran), atomic_load(&c.refused));
    ASSERT_EQ(atomic_load(&c.bad), 0);
    ASSERT_TRUE(atomic_load(&c.ran) > 0);

    /* the history, replayed alone */
    const int32_t n = moas_context_n_past(c.ctx);
    moas_context_params ap = cp;
    ap.pool = NULL;
    ap.route_fn = NULL;
    moas_context *alone = NULL;
    ASSERT_OK(moas_context_create(m, &ap, &alone));
    for (int32_t i = 0; i < n; i++) {
        ASSERT_OK(moas_context_decode(alone, c.history[i], NULL));
    }
    ASSERT_TRUE(same_records(c.ctx, alone));
    /* the logits, unless the last call to run truncated or reset */
    const float *got = moas_context_logits(c.ctx), *want = moas_context_logits(alone);
    ASSERT_TRUE(got == NULL || memcmp(got, want, (size_t)c.n_vocab * sizeof(float)) == 0);
    moas_context_free(alone);
    moas_context_free(c.ctx);
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(c.pool, &info));
    ASSERT_EQ(info.pages_free, info.n_pages);
    moas_pool_free(c.pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Context shift on a RoPE model: drop 10 tokens after the first 4, move the rest down
 * with their keys turned back, decode on. With one layer a token's K and V depend only
 * on the token and its position, so the logits must match decoding the shortened text
 * from scratch up to the round-off of turning keys twice (deeper models' kept tokens
 * also remember, in layers 1 and up, the tokens that were dropped: that is what a
 * context shift is, not an error). Every mode and KV type (Q8_0 on heads of 32, one
 * block each, independent and pooled K/V), routed mode on a ragged cache (tokens of
 * different widths, as the router chose them); a fork holding the same pages must not
 * change. Learned positions are refused. */
TEST(context_shift_equals_decoding_the_shifted_text) {
    enum { N = 40, KEEP = 4, DROP = 10, MORE = 6 };
    int32_t tokens[N + MORE], shifted[N + MORE];
    for (int variant = 0; variant < 8; variant++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_ctx_train = 64;
        cfg.n_embd = variant >= 6 ? 128 : 32;
        cfg.n_ff = variant >= 6 ? 128 : cfg.n_ff;
        cfg.n_layer = 1;
        cfg.rope = true;
        if (variant >= 2 && variant != 6) {
            cfg.kv_sharing = "pooled";
            cfg.rms_norm = cfg.swiglu = variant >= 4;
        }
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 70 + (uint64_t)variant, &size);
        moas_model *m;
        ASSERT_TRUE(image != NULL);
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
        const int32_t V = moas_model_n_vocab(m);
        seq_tokens(tokens, N + MORE, V, 90 + (uint32_t)variant);
        memcpy(shifted, tokens, KEEP * sizeof *tokens);
        memcpy(shifted + KEEP, tokens + KEEP + DROP, (N + MORE - KEEP - DROP) * sizeof *tokens);
        const moas_mode mode = variant % 2 ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
        const moas_type kv = variant >= 6    ? MOAS_TYPE_Q8_0
                             : variant == 5 ? MOAS_TYPE_F16
                                            : MOAS_TYPE_F32;
        moas_pool *pool = make_pool(m, 1 << 20, kv, 1, 0, 4);
        moas_context *a = make_ctx(m, pool, mode, kv, 1), *fork;
        moas_context *b = make_ctx(m, NULL, mode, kv, 1), *c = make_ctx(m, NULL, mode, kv, 1);
        /* the shortened text with an f32 cache: what the cache type itself costs */
        moas_context *e = make_ctx(m, NULL, mode, MOAS_TYPE_F32, 1);
        ASSERT_TRUE(pool && a && b && c && e);
        ASSERT_OK(moas_context_decode_batch(a, tokens, N, NULL, MOAS_LOGITS_LAST));
        if (mode == MOAS_MODE_ROUTED) {
            /* one layer of RoPE: the router sees the token alone, so every history
             * routes a token alike, and the tokens' widths differ (a ragged cache) */
            int32_t counts[8] = {0}, used = 0;
            ASSERT_OK(moas_context_scheme_counts(a, -1, counts));
            for (int s = 0; s < moas_model_n_scheme(m); s++) {
                used += counts[s] > 0;
            }
            ASSERT_TRUE(used >= 2);
        }
        ASSERT_OK(moas_context_fork(a, &fork));
        ASSERT_OK(moas_context_decode_batch(c, tokens, N, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_context_shift(a, KEEP, DROP));
        ASSERT_EQ(moas_context_n_past(a), N - DROP);
        ASSERT_OK(moas_context_decode_batch(b, shifted, N - DROP, NULL, MOAS_LOGITS_NONE));
        ASSERT_OK(moas_context_decode_batch(e, shifted, N - DROP, NULL, MOAS_LOGITS_NONE));
        ASSERT_EQ(moas_context_kv_bytes_used(a, -1), moas_context_kv_bytes_used(b, -1));
        float worst = 0.0f, own = 0.0f;
        for (int32_t i = 0; i < MORE; i++) {
            ASSERT_OK(moas_context_decode(a, tokens[N + i], NULL));
            ASSERT_OK(moas_context_decode(b, tokens[N + i], NULL));
            ASSERT_OK(moas_context_decode(e, tokens[N + i], NULL));
            ASSERT_OK(moas_context_decode(fork, tokens[N + i], NULL));
            ASSERT_OK(moas_context_decode(c, tokens[N + i], NULL));
            for (int32_t v = 0; v < V; v++) {
                const float d = fabsf(moas_context_logits(a)[v] - moas_context_logits(b)[v]);
                worst = d > worst ? d : worst;
                const float r = fabsf(moas_context_logits(b)[v] - moas_context_logits(e)[v]);
                own = r > own ? r : own;
            }
            /* the fork shared the pages the shift rewrote: untouched */
            ASSERT_TRUE(memcmp(moas_context_logits(fork), moas_context_logits(c), (size_t)V * 4) == 0);
        }
        /* measured: at most 6e-7 with an f32 cache, 1.0e-4 with f16 (whose turned keys
         * are rounded to half precision a second time); with Q8_0 the turned keys are
         * quantised a second time, which costs about what quantising them once does
         * (the cache type's own error against f32, `own`): at most twice that */
        ASSERT_TRUE(worst < (kv == MOAS_TYPE_F16 ? 1e-3f : 5e-6f) ||
                    (kv == MOAS_TYPE_Q8_0 && worst < 2.0f * own));
        printf("#   shift variant %d (%s, %s, %s): max |logit diff| %.3g, the cache type's own "
               "%.3g\n", variant,
               variant >= 2 && variant != 6 ? "pooled" : "independent",
               mode ? "routed" : "mixture",
               kv == MOAS_TYPE_Q8_0 ? "q8_0" : kv == MOAS_TYPE_F16 ? "f16" : "f32", (double)worst,
               (double)own);
        moas_context_free(a);
        moas_context_free(b);
        moas_context_free(c);
        moas_context_free(e);
        moas_context_free(fork);
        moas_pool_free(pool);
        moas_model_free(m);
        free(image);
    }
    /* learned positions, and ranges outside the stored tokens, are refused */
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_context *x = make_ctx(m, NULL, MOAS_MODE_MIXTURE, MOAS_TYPE_F32, 1);
    ASSERT_OK(moas_context_decode_batch(x, tokens, 8, NULL, MOAS_LOGITS_NONE));
    ASSERT_STATUS(moas_context_shift(x, 0, 4), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "learned positions") != NULL);
    moas_context_free(x);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The shift tests' model, loaded from *image (the caller frees both): tiny, 32 wide,
 * RoPE, a context of 64; NULL on failure. */
static moas_model *rope_model(uint8_t **image) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.n_ctx_train = 64;
    cfg.n_embd = 32;
    cfg.rope = true;
    size_t size;
    moas_model *m = NULL;
    *image = tiny_model_image(&cfg, 77, &size);
    if (*image != NULL && moas_model_load_memory(*image, size, NULL, &m) != MOAS_OK) {
        m = NULL;
    }
    return m;
}

/* A shift may discard every token after n_keep (n_keep + n_discard = n_past): nothing
 * moves, and decoding on gives exactly the logits of a context that decoded only the
 * kept tokens. One token more than is stored is refused, naming both counts, and
 * changes nothing. */
TEST(context_shift_may_discard_every_token_after_n_keep) {
    enum { N = 8, KEEP = 3 };
    int32_t tokens[N + 1];
    uint8_t *image;
    moas_model *m = rope_model(&image);
    ASSERT_TRUE(m != NULL);
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, N + 1, V, 91);
    moas_context *a = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    moas_context *b = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(a != NULL && b != NULL);
    for (int i = 0; i < N; i++) {
        ASSERT_OK(moas_context_decode(a, tokens[i], NULL));
    }
    for (int i = 0; i < KEEP; i++) {
        ASSERT_OK(moas_context_decode(b, tokens[i], NULL));
    }
    ASSERT_OK(moas_context_shift(a, KEEP, N - KEEP));
    ASSERT_EQ(moas_context_n_past(a), KEEP);
    ASSERT_STATUS(moas_context_shift(a, 0, KEEP + 1), MOAS_ERR_INVALID_ARG);
    ASSERT_STR_EQ(moas_last_error(),
                  "context_shift: n_keep 0 and n_discard 4 do not fit in the 3 tokens stored");
    ASSERT_EQ(moas_context_n_past(a), KEEP);
    ASSERT_OK(moas_context_decode(a, tokens[N], NULL));
    ASSERT_OK(moas_context_decode(b, tokens[N], NULL));
    ASSERT_TRUE(memcmp(moas_context_logits(a), moas_context_logits(b), (size_t)V * sizeof(float)) == 0);
    moas_context_free(a);
    moas_context_free(b);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A shift that drops the last token leaves the context as moas_context_truncate(n_keep)
 * would, logits included: moas_context_logits() is NULL (they were the dropped token's),
 * and a saved state says so. A shift that keeps the last token keeps its logits. */
TEST(context_shift_dropping_the_last_token_drops_its_logits) {
    enum { N = 8, KEEP = 3 };
    int32_t tokens[N];
    uint8_t *image;
    moas_model *m = rope_model(&image);
    ASSERT_TRUE(m != NULL);
    const int32_t V = moas_model_n_vocab(m);
    seq_tokens(tokens, N, V, 91);
    for (int mode = 0; mode < 2; mode++) {
        moas_context *a = make_ctx(m, NULL, mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE,
                                   MOAS_TYPE_F32, 1);
        moas_context *b = make_ctx(m, NULL, mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE,
                                   MOAS_TYPE_F32, 1);
        ASSERT_TRUE(a != NULL && b != NULL);
        ASSERT_OK(moas_context_decode_batch(a, tokens, N, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_context_shift(a, 1, 2));   /* the last token stays: so do its logits */
        ASSERT_TRUE(moas_context_logits(a) != NULL);
        ASSERT_OK(moas_context_shift(a, KEEP, N - 2 - KEEP));   /* every token after n_keep */
        ASSERT_EQ(moas_context_n_past(a), KEEP);
        ASSERT_TRUE(moas_context_logits(a) == NULL);
        /* the same as truncating: the same state, byte for byte */
        ASSERT_OK(moas_context_decode_batch(b, tokens, N, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_context_shift(b, 1, 2));
        ASSERT_OK(moas_context_truncate(b, KEEP));
        const size_t n = moas_context_state_size(a);
        ASSERT_EQ(n, moas_context_state_size(b));
        uint8_t *sa = malloc(n), *sb = malloc(n);
        size_t written;
        ASSERT_TRUE(sa != NULL && sb != NULL);
        ASSERT_OK(moas_context_state_save(a, sa, n, &written));
        ASSERT_OK(moas_context_state_save(b, sb, n, &written));
        ASSERT_TRUE(memcmp(sa, sb, n) == 0);
        free(sa);
        free(sb);
        moas_context_free(a);
        moas_context_free(b);
    }
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A Q8_0 cache (head_dim 32: one block per head): logits near an f32 cache's, batched
 * decode equal to decoding alone bit for bit, saved state and compaction working on
 * its blocks; refused when head_dim is not a multiple of 32. */
TEST(q8_0_kv_cache_close_to_f32_and_batch_equals_alone) {
    enum { N = 30 };
    int32_t tokens[3][N];
    for (int pooled = 0; pooled < 2; pooled++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_ctx_train = 64;
        cfg.n_embd = 128;
        cfg.n_ff = 128;
        cfg.kv_sharing = pooled ? "pooled" : "independent";
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 50 + (uint64_t)pooled, &size);
        moas_model *m;
        ASSERT_TRUE(image != NULL);
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
        ASSERT_EQ(moas_model_head_dim(m), 32);
        const int32_t V = moas_model_n_vocab(m);
        for (int s = 0; s < 3; s++) {
            seq_tokens(tokens[s], N, V, 300 + (uint32_t)s);
        }
        for (int mode = 0; mode < 2; mode++) {
            const moas_mode md = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_Q8_0, 2, 5, 4);
            moas_context *in_pool[3], *alone[3];
            moas_context *f32 = make_ctx(m, NULL, md, MOAS_TYPE_F32, 1);
            ASSERT_TRUE(pool != NULL && f32 != NULL);
            if (mode) {   /* the same routes in the f32 comparison */
                ASSERT_OK(moas_context_force_scheme(f32, 1));
            }
            moas_pool_seq q[3];
            for (int s = 0; s < 3; s++) {
                in_pool[s] = make_ctx(m, pool, md, MOAS_TYPE_F32, 2);
                alone[s] = make_ctx(m, NULL, md, MOAS_TYPE_Q8_0, 1);
                ASSERT_TRUE(in_pool[s] && alone[s]);
                ASSERT_OK(moas_context_decode_batch(alone[s], tokens[s], N, NULL, MOAS_LOGITS_LAST));
                q[s] = (moas_pool_seq){in_pool[s], tokens[s], N, MOAS_LOGITS_LAST, NULL};
            }
            ASSERT_OK(moas_pool_decode(pool, q, 3));
            for (int s = 0; s < 3; s++) {
                ASSERT_TRUE(memcmp(moas_context_logits(alone[s]), moas_context_logits(in_pool[s]),
                                   (size_t)V * 4) == 0);
                ASSERT_TRUE(same_records(alone[s], in_pool[s]));
            }
            if (mode) {
                ASSERT_OK(moas_context_force_scheme(alone[1], 1));
                moas_context_reset(alone[1]);
                ASSERT_OK(moas_context_decode_batch(alone[1], tokens[1], N, NULL, MOAS_LOGITS_LAST));
            }
            ASSERT_OK(moas_context_decode_batch(f32, tokens[1], N, NULL, MOAS_LOGITS_LAST));
            float worst = 0.0f, top = 0.0f;
            for (int32_t v = 0; v < V; v++) {
                const float d = fabsf(moas_context_logits(f32)[v] - moas_context_logits(alone[1])[v]);
                worst = d > worst ? d : worst;
                top = fabsf(moas_context_logits(f32)[v]) > top ? fabsf(moas_context_logits(f32)[v]) : top;
            }
            ASSERT_TRUE(worst > 0.0f && worst < 0.02f * (top > 1.0f ? top : 1.0f));
            const size_t b32 = moas_context_kv_bytes_used(f32, -1);
            const size_t b8 = moas_context_kv_bytes_used(alone[1], -1);
            const size_t meta = mode ? (size_t)N * moas_model_n_layer(m) * 5 : 0;
            ASSERT_EQ((b8 - meta) * 128, (b32 - meta) * 34);   /* 34 bytes a head, not 128 */

            /* saved state round trip on Q8_0 blocks */
            const size_t n = moas_context_state_size(alone[2]);
            uint8_t *buf = malloc(n);
            size_t w;
            ASSERT_TRUE(buf != NULL);
            ASSERT_OK(moas_context_state_save(alone[2], buf, n, &w));
            ASSERT_OK(moas_context_state_load(alone[0], buf, n));
            ASSERT_OK(moas_context_decode(alone[0], 3, NULL));
            ASSERT_OK(moas_context_decode(alone[2], 3, NULL));
            ASSERT_TRUE(memcmp(moas_context_logits(alone[0]), moas_context_logits(alone[2]),
                               (size_t)V * 4) == 0);
            free(buf);
            if (pooled && mode) {   /* compaction re-quantises the pooled heads */
                int32_t changed = 0;
                ASSERT_OK(moas_context_compact(in_pool[0], N / 2, 2, &changed));
                ASSERT_OK(moas_context_decode(in_pool[0], 5, NULL));
            }
            for (int s = 0; s < 3; s++) {
                moas_context_free(in_pool[s]);
                moas_context_free(alone[s]);
            }
            moas_context_free(f32);
            moas_pool_free(pool);
        }
        moas_model_free(m);
        free(image);
    }
    /* head_dim 8: refused, for a context and for a pool */
    size_t size;
    uint8_t *image = kind_image(0, &size);
    moas_model *m;
    moas_context *x = NULL;
    moas_context_params cp;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_context_params_init(&cp);
    cp.kv_type = MOAS_TYPE_Q8_0;
    ASSERT_STATUS(moas_context_create(m, &cp, &x), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "multiple of 32") != NULL);
    ASSERT_TRUE(make_pool(m, 1 << 20, MOAS_TYPE_Q8_0, 1, 0, 4) == NULL);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A Q8_0 cache through blocks split between the threads (forward.c, "Sequences split
 * between the threads"): four sequences, their prompts together, then a token each a
 * step, equal decoding each alone bit for bit (logits at every step, routing records,
 * KV use), for independent and pooled K/V in both modes; some blocks ran split. */
TEST(q8_0_kv_cache_split_between_threads_equals_alone) {
    enum { NS = 4, STEPS = 6, PMAX = 6 };
    for (int pooled = 0; pooled < 2; pooled++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_ctx_train = 64;
        cfg.n_embd = 128;   /* head_dim 32: one Q8_0 block a head */
        cfg.n_ff = 128;
        cfg.kv_sharing = pooled ? "pooled" : "independent";
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 60 + (uint64_t)pooled, &size);
        moas_model *m;
        ASSERT_TRUE(image != NULL);
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
        const int32_t V = moas_model_n_vocab(m);
        int32_t tokens[NS][PMAX + STEPS];
        for (int32_t s = 0; s < NS; s++) {
            seq_tokens(tokens[s], PMAX + STEPS, V, 400 + (uint32_t)s);
        }
        for (int mode = 0; mode < 2; mode++) {
            const moas_mode md = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_Q8_0, 2, 8, 4);
            ASSERT_TRUE(pool != NULL);
            moas_context *in_pool[NS], *alone[NS];
            moas_pool_seq q[NS];
            for (int32_t s = 0; s < NS; s++) {
                const int32_t prompt = 3 + s;
                in_pool[s] = make_ctx(m, pool, md, MOAS_TYPE_F32, 2);
                alone[s] = make_ctx(m, NULL, md, MOAS_TYPE_Q8_0, 1);
                ASSERT_TRUE(in_pool[s] != NULL && alone[s] != NULL);
                ASSERT_OK(moas_context_decode_batch(alone[s], tokens[s], prompt, NULL,
                                                    MOAS_LOGITS_LAST));
                q[s] = (moas_pool_seq){in_pool[s], tokens[s], prompt, MOAS_LOGITS_LAST, NULL};
            }
            ASSERT_OK(moas_pool_decode(pool, q, NS));
            for (int32_t step = 0; step <= STEPS; step++) {
                for (int32_t s = 0; s < NS; s++) {
                    ASSERT_TRUE(moas_context_logits(in_pool[s]) != NULL);
                    ASSERT_TRUE(memcmp(moas_context_logits(alone[s]),
                                       moas_context_logits(in_pool[s]), (size_t)V * 4) == 0);
                }
                if (step == STEPS) {
                    break;
                }
                for (int32_t s = 0; s < NS; s++) {
                    const int32_t at = 3 + s + step;
                    ASSERT_OK(moas_context_decode(alone[s], tokens[s][at], NULL));
                    q[s] = (moas_pool_seq){in_pool[s], &tokens[s][at], 1, MOAS_LOGITS_LAST, NULL};
                }
                ASSERT_OK(moas_pool_decode(pool, q, NS));
            }
            for (int32_t s = 0; s < NS; s++) {
                ASSERT_TRUE(same_records(alone[s], in_pool[s]));
            }
            ASSERT_TRUE(pool->ws->shard_blocks > 0);
            for (int32_t s = 0; s < NS; s++) {
                moas_context_free(in_pool[s]);
                moas_context_free(alone[s]);
            }
            moas_pool_free(pool);
        }
        moas_model_free(m);
        free(image);
    }
    return TEST_PASS;
}

/* ---- abort callbacks ------------------------------------------------------------ */

/* An abort callback that says stop at its `stop_at`-th question (0: never), counting
 * them, and tries a call on its own context each time (refused: it holds a decode). */
typedef struct {
    moas_context *ctx;
    int32_t asked, stop_at;
    int32_t refused, other_status;
} stopper;

static int32_t stop_when_told(void *user) {
    stopper *s = user;
    const moas_status st = moas_context_truncate(s->ctx, 0);
    if (st == MOAS_ERR_BUSY) {
        s->refused++;
    } else {
        s->other_status = st;
    }
    return ++s->asked == s->stop_at;
}

/* An abort callback that removes itself at its first question (a setting, which the
 * decode's own thread may change) and lets the call go on. */
static int32_t remove_myself(void *user) {
    stopper *s = user;
    s->asked++;
    moas_context_set_abort_callback(s->ctx, NULL, NULL);
    return 0;
}

/* What a context holds, to check that an aborted call changed none of it. */
typedef struct {
    int32_t n_past;
    size_t used, held;
    int32_t counts[8];
} held_state;

static held_state state_of(const moas_context *ctx) {
    held_state h = {moas_context_n_past(ctx), moas_context_kv_bytes_used(ctx, -1),
                    moas_context_kv_bytes_held(ctx), {0}};
    (void)moas_context_scheme_counts(ctx, -1, h.counts);
    return h;
}

static bool same_state(held_state a, held_state b) {
    return a.n_past == b.n_past && a.used == b.used && a.held == b.held &&
           memcmp(a.counts, b.counts, sizeof a.counts) == 0;
}

/* A call stopped by its abort callback at any of the points it is asked (before each
 * block, between a block's layers: 2 a block here) returns MOAS_ERR_ABORTED and
 * leaves the context as it was but for its logits (NULL until the next decode); the
 * same call afterwards gives the bits of a context that was never stopped. Decode,
 * decode_batch over three blocks, the budget's token-by-token path, both modes, two
 * models; a fork asks its parent's callback. */
TEST(abort_callback_stops_a_decode_and_loses_nothing) {
    enum { PROMPT = 10, N = 40, BLOCK = 16 };
    for (int kind = 0; kind < N_KINDS; kind += 4) {   /* router; pooled with RoPE */
        size_t size;
        uint8_t *image = kind_image(kind, &size);
        moas_model *m;
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
        const int32_t V = moas_model_n_vocab(m);
        int32_t tokens[PROMPT + N];
        seq_tokens(tokens, PROMPT + N, V, 31 + (uint32_t)kind);
        float *want = malloc((size_t)N * V * sizeof *want);
        float *got = malloc((size_t)N * V * sizeof *got);
        ASSERT_TRUE(want != NULL && got != NULL);
        for (int mode = 0; mode < 2; mode++) {
            for (int budget = 0; budget <= mode; budget++) {   /* routed: with a budget */
                moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, 2, BLOCK, 4);
                moas_context *ctx = make_ctx(m, pool, (moas_mode)mode, MOAS_TYPE_F32, 2);
                moas_context *alone = make_ctx(m, NULL, (moas_mode)mode, MOAS_TYPE_F32, 2);
                ASSERT_TRUE(pool != NULL && ctx != NULL && alone != NULL);
                ctx->batch_tokens = alone->batch_tokens = BLOCK;   /* three blocks */
                if (budget) {
                    ASSERT_OK(moas_context_set_kv_budget(ctx, 1 << 20));
                    ASSERT_OK(moas_context_set_kv_budget(alone, 1 << 20));
                }
                ASSERT_OK(moas_context_decode_batch(ctx, tokens, PROMPT, NULL,
                                                    MOAS_LOGITS_LAST));
                ASSERT_OK(moas_context_decode_batch(alone, tokens, PROMPT, NULL,
                                                    MOAS_LOGITS_LAST));
                ASSERT_OK(moas_context_decode_batch(alone, tokens + PROMPT, N, want,
                                                    MOAS_LOGITS_ALL));
                const held_state before = state_of(ctx);
                moas_pool_info info = {.size = sizeof info};
                ASSERT_OK(moas_pool_stats(pool, &info));
                const int32_t free_before = info.pages_free;
                /* asked twice a block (before it, between its 2 layers): 3 blocks, or
                 * the budget's 40 one-token blocks */
                const int32_t asks = budget ? 2 * N : 2 * 3;
                stopper s = {ctx, 0, 0, 0, MOAS_OK};
                moas_context_set_abort_callback(ctx, stop_when_told, &s);
                for (int32_t k = 1; k <= asks; k += budget ? 7 : 1) {
                    s.asked = s.refused = 0;
                    s.stop_at = k;
                    ASSERT_EQ(moas_context_decode_batch(ctx, tokens + PROMPT, N, got,
                                                        MOAS_LOGITS_ALL),
                              MOAS_ERR_ABORTED);
                    ASSERT_EQ(s.asked, k);
                    ASSERT_EQ(s.refused, k);   /* its truncate, each time */
                    ASSERT_TRUE(strstr(moas_last_error(), "abort callback") != NULL);
                    ASSERT_TRUE(same_state(state_of(ctx), before));
                    ASSERT_TRUE(moas_context_logits(ctx) == NULL);
                    ASSERT_OK(moas_pool_stats(pool, &info));
                    ASSERT_EQ(info.pages_free, free_before);
                }
                s.asked = 0;
                s.stop_at = 2;   /* a single token: between its layers */
                ASSERT_EQ(moas_context_decode(ctx, tokens[PROMPT], NULL), MOAS_ERR_ABORTED);
                ASSERT_TRUE(same_state(state_of(ctx), before));
                /* never stopped: every ask made, the bits of the context never stopped */
                s.asked = s.refused = 0;
                s.stop_at = 0;
                ASSERT_OK(moas_context_decode_batch(ctx, tokens + PROMPT, N, got,
                                                    MOAS_LOGITS_ALL));
                ASSERT_EQ(s.asked, asks);
                ASSERT_EQ(s.refused, asks);
                ASSERT_EQ(s.other_status, MOAS_OK);
                ASSERT_TRUE(memcmp(got, want, (size_t)N * V * sizeof *got) == 0);
                ASSERT_TRUE(same_records(ctx, alone));
                /* removed from inside, at its first question: asked no more */
                s.asked = 0;
                moas_context_set_abort_callback(ctx, remove_myself, &s);
                ASSERT_OK(moas_context_decode(ctx, tokens[0], NULL));
                ASSERT_OK(moas_context_decode(ctx, tokens[1], NULL));
                ASSERT_EQ(s.asked, 1);
                ASSERT_OK(moas_context_truncate(ctx, PROMPT + N));
                moas_context_set_abort_callback(ctx, stop_when_told, &s);
                /* a fork asks its parent's callback, and stops the same way */
                moas_context *child;
                ASSERT_OK(moas_context_fork(ctx, &child));
                s.ctx = child;
                s.asked = 0;
                s.stop_at = 1;
                ASSERT_EQ(moas_context_decode(child, tokens[0], NULL), MOAS_ERR_ABORTED);
                ASSERT_EQ(moas_context_n_past(child), PROMPT + N);
                moas_context_set_abort_callback(child, NULL, NULL);
                ASSERT_OK(moas_context_decode(child, tokens[0], NULL));
                moas_context_free(child);
                moas_context_free(ctx);
                moas_context_free(alone);
                moas_pool_free(pool);
            }
        }
        free(want);
        free(got);
        moas_model_free(m);
        free(image);
    }
    moas_context_set_abort_callback(NULL, stop_when_told, NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "ctx is NULL") != NULL);
    ASSERT_TRUE(strcmp(moas_status_name(MOAS_ERR_ABORTED), "MOAS_ERR_ABORTED") == 0);
    return TEST_PASS;
}

/* moas_pool_decode stopped by one context's abort callback at any point it is asked
 * undoes every context of the call (a context of no tokens keeps its logits); the
 * same call afterwards gives each the bits of decoding alone. With the pool's threads
 * taking whole sequences each (a small model's blocks), it is asked before each block. */
TEST(abort_callback_stops_a_pool_decode_whole) {
    size_t size;
    uint8_t *image = kind_image(4, &size);
    moas_model *m;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    const int32_t V = moas_model_n_vocab(m);
    int32_t tokens[3][24];
    for (int32_t i = 0; i < 3; i++) {
        seq_tokens(tokens[i], 24, V, 50 + (uint32_t)i);
    }
    for (int32_t threads = 1; threads <= 2; threads++) {
        moas_pool *pool = make_pool(m, 1 << 20, MOAS_TYPE_F32, threads, 16, 4);
        ASSERT_TRUE(pool != NULL);
        moas_context *c[3], *alone[3];
        for (int32_t i = 0; i < 3; i++) {
            c[i] = make_ctx(m, pool, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
            alone[i] = make_ctx(m, NULL, MOAS_MODE_ROUTED, MOAS_TYPE_F32, 1);
            ASSERT_TRUE(c[i] != NULL && alone[i] != NULL);
            ASSERT_OK(moas_context_decode_batch(c[i], tokens[i], 4, NULL, MOAS_LOGITS_LAST));
            ASSERT_OK(moas_context_decode_batch(alone[i], tokens[i], 4, NULL,
                                                MOAS_LOGITS_LAST));
        }
        float last2[64];
        ASSERT_TRUE(V <= 64);
        memcpy(last2, moas_context_logits(c[2]), (size_t)V * sizeof *last2);
        held_state before[3];
        for (int32_t i = 0; i < 3; i++) {
            before[i] = state_of(c[i]);
        }
        moas_pool_info info = {.size = sizeof info};
        ASSERT_OK(moas_pool_stats(pool, &info));
        const int32_t free_before = info.pages_free;
        /* 5 + 20 tokens: blocks of 16 rows [5 of c0, 11 of c1], [9 of c1]; c2 none */
        moas_pool_seq q[3] = {{c[0], tokens[0] + 4, 5, MOAS_LOGITS_LAST, NULL},
                              {c[1], tokens[1] + 4, 20, MOAS_LOGITS_LAST, NULL},
                              {c[2], tokens[2] + 4, 0, MOAS_LOGITS_LAST, NULL}};
        stopper s = {c[1], 0, 0, 0, MOAS_OK};
        moas_context_set_abort_callback(c[1], stop_when_told, &s);
        s.stop_at = 0;   /* how often it is asked when nothing stops */
        moas_context *probe[2];
        for (int32_t i = 0; i < 2; i++) {
            ASSERT_OK(moas_context_fork(c[i], &probe[i]));
        }
        moas_pool_seq pq[2] = {{probe[0], tokens[0] + 4, 5, MOAS_LOGITS_NONE, NULL},
                               {probe[1], tokens[1] + 4, 20, MOAS_LOGITS_NONE, NULL}};
        moas_context_set_abort_callback(probe[1], stop_when_told, &s);
        s.ctx = probe[1];
        ASSERT_OK(moas_pool_decode(pool, pq, 2));
        const int32_t asks = s.asked;
        ASSERT_EQ(asks, 2 * 2);   /* 2 blocks of 2 layers (too uneven to split by sequence) */
        for (int32_t i = 0; i < 2; i++) {
            moas_context_free(probe[i]);
        }
        if (threads == 2) {   /* two even sequences: the threads take one each */
            for (int32_t i = 0; i < 2; i++) {
                ASSERT_OK(moas_context_fork(c[i], &probe[i]));
                pq[i] = (moas_pool_seq){probe[i], tokens[i] + 4, 8, MOAS_LOGITS_NONE, NULL};
            }
            moas_context_set_abort_callback(probe[1], stop_when_told, &s);
            s.ctx = probe[1];
            s.asked = 0;
            const int64_t shard_blocks = pool->ws->shard_blocks;
            ASSERT_OK(moas_pool_decode(pool, pq, 2));
            ASSERT_EQ(pool->ws->shard_blocks, shard_blocks + 1);
            ASSERT_EQ(s.asked, 1);   /* before the block only */
            s.asked = 0;
            s.stop_at = 1;
            ASSERT_EQ(moas_pool_decode(pool, pq, 2), MOAS_ERR_ABORTED);
            ASSERT_EQ(moas_context_n_past(probe[0]), 4 + 8);
            ASSERT_EQ(moas_context_n_past(probe[1]), 4 + 8);
            s.stop_at = 0;
            for (int32_t i = 0; i < 2; i++) {
                moas_context_free(probe[i]);
            }
        }
        ASSERT_OK(moas_pool_stats(pool, &info));
        ASSERT_EQ(info.pages_free, free_before);
        s.ctx = c[1];
        for (int32_t k = 1; k <= asks; k++) {
            s.asked = 0;
            s.stop_at = k;
            ASSERT_EQ(moas_pool_decode(pool, q, 3), MOAS_ERR_ABORTED);
            ASSERT_EQ(s.asked, k);
            for (int32_t i = 0; i < 3; i++) {
                ASSERT_TRUE(same_state(state_of(c[i]), before[i]));
            }
            ASSERT_TRUE(moas_context_logits(c[0]) == NULL && moas_context_logits(c[1]) == NULL);
            ASSERT_TRUE(moas_context_logits(c[2]) != NULL &&
                        memcmp(moas_context_logits(c[2]), last2, (size_t)V * 4) == 0);
            ASSERT_OK(moas_pool_stats(pool, &info));
            ASSERT_EQ(info.pages_free, free_before);
        }
        s.stop_at = 0;
        ASSERT_OK(moas_pool_decode(pool, q, 3));
        for (int32_t i = 0; i < 2; i++) {
            ASSERT_OK(moas_context_decode_batch(alone[i], q[i].tokens, q[i].n_tokens, NULL,
                                                MOAS_LOGITS_LAST));
            ASSERT_TRUE(memcmp(moas_context_logits(c[i]), moas_context_logits(alone[i]),
                               (size_t)V * 4) == 0);
            ASSERT_TRUE(same_records(c[i], alone[i]));
        }
        for (int32_t i = 0; i < 3; i++) {
            moas_context_free(c[i]);
            moas_context_free(alone[i]);
        }
        moas_pool_free(pool);
    }
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}
