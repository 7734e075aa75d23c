/* test_context_info.c - what a context reports about itself: the KV bytes one token
 * occupies (the figure its own accounting uses) and the threads it resolved. */
#if defined(__linux__)
#define _GNU_SOURCE   /* sched_getaffinity(), CPU_COUNT */
#include <sched.h>
#endif

#include "test.h"
#include "cpu_quota.h"
#include "team.h"

#include <stdlib.h>

/* Hand-computed for the tiny models: 2 layers, 6 heads of 8, schemes of [6, 2, 1] KV
 * heads. A head's K and V are 8 * 2 elements; routed mode adds 5 bytes per layer. */
TEST(kv_token_bytes_is_what_the_cache_uses) {
    static const struct {
        const char *model;
        moas_type kv_type;
        uint64_t mixture, routed[3];
    } cases[] = {
        /* independent schemes: mixture stores 6 + 2 + 1 heads */
        {"tiny-moas-bias.gguf", MOAS_TYPE_F32, 2 * 9 * 16 * 4, {2 * (6 * 64 + 5), 2 * (2 * 64 + 5), 2 * (64 + 5)}},
        {"tiny-moas-bias.gguf", MOAS_TYPE_F16, 2 * 9 * 16 * 2, {2 * (6 * 32 + 5), 2 * (2 * 32 + 5), 2 * (32 + 5)}},
        /* pooled: mixture stores one gate-mixed K/V of all 6 heads, not 9 */
        {"tiny-pooled-bias.gguf", MOAS_TYPE_F32, 2 * 6 * 16 * 4, {2 * (6 * 64 + 5), 2 * (2 * 64 + 5), 2 * (64 + 5)}},
        {"tiny-pooled-bias.gguf", MOAS_TYPE_F16, 2 * 6 * 16 * 2, {2 * (6 * 32 + 5), 2 * (2 * 32 + 5), 2 * (32 + 5)}},
    };
    const int32_t tokens[7] = {11, 1, 5, 20, 30, 0, 2};

    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        moas_model *model;
        moas_context *ctx;
        moas_context_params cp;

        ASSERT_OK(moas_model_load(test_data(cases[c].model), NULL, &model));
        for (int mode = 0; mode < 2; mode++) {
            moas_context_params_init(&cp);
            cp.kv_type = cases[c].kv_type;
            cp.mode = mode;
            cp.n_ctx = 8;
            ASSERT_OK(moas_context_create(model, &cp, &ctx));
            ASSERT_EQ(moas_context_kv_token_bytes(ctx, -1), cases[c].mixture);
            for (int32_t s = 0; s < 3; s++) {
                ASSERT_EQ(moas_context_kv_token_bytes(ctx, s), cases[c].routed[s]);
            }
            ASSERT_EQ(moas_context_kv_token_bytes(ctx, 3), 0);
            ASSERT_EQ(moas_context_kv_token_bytes(ctx, -2), 0);
            ASSERT_OK(moas_context_decode_batch(ctx, tokens, 7, NULL, MOAS_LOGITS_NONE));
            if (mode == MOAS_MODE_MIXTURE) {
                /* the cache holds exactly 7 tokens' worth */
                ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), 7 * cases[c].mixture);
                ASSERT_EQ(moas_context_kv_bytes_reserved(ctx, -1), 8 * cases[c].mixture);
            } else {
                /* routed: the sum over tokens and layers of the scheme that ran */
                int32_t schemes[7 * 2];
                uint64_t want = 0;
                ASSERT_OK(moas_context_routes(ctx, 0, 7, NULL, schemes, NULL));
                for (int32_t i = 0; i < 7 * 2; i++) {
                    want += moas_context_kv_token_bytes(ctx, schemes[i]) / 2;
                }
                ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), want);
            }
            moas_context_free(ctx);
        }
        moas_model_free(model);
    }
    ASSERT_EQ(moas_context_kv_token_bytes(NULL, -1), 0);
    return TEST_PASS;
}

/* A layer outside [-1, n_layer) reads as 0 bytes used and reserved, the first one past
 * the last layer included; the last layer itself reads its own bytes (n_ctx 8). */
TEST(kv_bytes_of_a_layer_out_of_range_are_zero) {
    moas_model *model;
    moas_context *ctx;
    moas_context_params cp;
    const int32_t tokens[3] = {4, 9, 2};

    ASSERT_OK(moas_model_load(test_data("tiny-moas-bias.gguf"), NULL, &model));
    ASSERT_EQ(moas_model_n_layer(model), 2);
    for (int mode = 0; mode < 2; mode++) {
        moas_context_params_init(&cp);
        cp.mode = mode;
        cp.n_ctx = 8;
        ASSERT_OK(moas_context_create(model, &cp, &ctx));
        ASSERT_OK(moas_context_decode_batch(ctx, tokens, 3, NULL, MOAS_LOGITS_NONE));
        /* a layer: mixture 8 * 9 heads * 64 bytes, routed 8 * (6 * 64 + 5) */
        ASSERT_EQ(moas_context_kv_bytes_reserved(ctx, 1), mode == 0 ? 8 * 9 * 64 : 8 * (6 * 64 + 5));
        ASSERT_TRUE(moas_context_kv_bytes_used(ctx, 1) > 0);
        ASSERT_EQ(moas_context_kv_bytes_reserved(ctx, 2), 0);
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, 2), 0);
        ASSERT_EQ(moas_context_kv_bytes_reserved(ctx, -2), 0);
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -2), 0);
        moas_context_free(ctx);
    }
    moas_model_free(model);
    return TEST_PASS;
}

/* A pool reports its decode threads as a context does: as given, or for 0 the CPUs
 * the process may run on within its cgroup quota; a caller of the older, shorter
 * struct gets the fields before it and no more. */
TEST(pool_reports_its_thread_count) {
    moas_model *model;
    moas_pool *pool;
    moas_pool_params pp;

    ASSERT_OK(moas_model_load(test_data("tiny-pooled-bias.gguf"), NULL, &model));
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 16;
    pp.n_threads = 3;
    ASSERT_OK(moas_pool_create(model, &pp, &pool));
    moas_pool_info info = {.size = sizeof info};
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.size, sizeof info);
    ASSERT_EQ(info.n_threads, 3);
    info.n_threads = -7;
    info.size = (uint32_t)offsetof(moas_pool_info, n_threads);   /* the struct before it */
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.size, offsetof(moas_pool_info, n_threads));
    ASSERT_EQ(info.n_threads, -7);
    moas_pool_free(pool);
    pp.n_threads = 0;
    ASSERT_OK(moas_pool_create(model, &pp, &pool));
    info.size = sizeof info;
    ASSERT_OK(moas_pool_stats(pool, &info));
#if defined(__linux__)
    cpu_set_t set;
    ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
    ASSERT_EQ(info.n_threads, moas__team_threads_for(CPU_COUNT(&set), moas__cpu_quota("")));
#else
    ASSERT_TRUE(info.n_threads >= 1);
#endif
    moas_pool_free(pool);
    moas_model_free(model);
    return TEST_PASS;
}

TEST(context_reports_its_thread_count) {
    moas_model *model;
    moas_context *ctx;
    moas_context_params cp;

    ASSERT_OK(moas_model_load(test_data("tiny-moas-bias.gguf"), NULL, &model));
    moas_context_params_init(&cp);
    cp.n_threads = 3;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    ASSERT_EQ(moas_context_n_threads(ctx), 3);
    moas_context_free(ctx);
    cp.n_threads = 0;   /* the CPUs this process may run on, within its cgroup quota */
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
#if defined(__linux__)
    cpu_set_t set;
    ASSERT_EQ(sched_getaffinity(0, sizeof set, &set), 0);
    ASSERT_EQ(moas_context_n_threads(ctx),
              moas__team_threads_for(CPU_COUNT(&set), moas__cpu_quota("")));
#else
    ASSERT_TRUE(moas_context_n_threads(ctx) >= 1);
#endif
    moas_context_free(ctx);
    ASSERT_EQ(moas_context_n_threads(NULL), 0);
    moas_model_free(model);
    return TEST_PASS;
}
