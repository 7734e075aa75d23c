/* test_core.c - version, status strings, params structs. */
#include "test.h"

#include <stdio.h>

TEST(version_macros_match_runtime) {
    char expect[32];
    snprintf(expect, sizeof expect, "%d.%d.%d", MOAS_VERSION_MAJOR, MOAS_VERSION_MINOR,
             MOAS_VERSION_PATCH);
    ASSERT_STR_EQ(moas_version_string(), expect);
    ASSERT_STR_EQ(MOAS_VERSION_STRING, expect);
    ASSERT_EQ(moas_version_number(), MOAS_VERSION_NUMBER);
    ASSERT_EQ(MOAS_VERSION_NUMBER,
              MOAS_VERSION_MAJOR * 10000 + MOAS_VERSION_MINOR * 100 + MOAS_VERSION_PATCH);
    return TEST_PASS;
}

TEST(status_strings_cover_every_status) {
    int n = 0;
    /* Every status has its own non-empty message; pinned values do not move. */
#define CHECK_(name_, value_, msg_)                                   \
    ASSERT_EQ(MOAS_##name_, value_);                                  \
    ASSERT_STR_EQ(moas_status_string(MOAS_##name_), msg_);            \
    ASSERT_TRUE(strlen(msg_) > 0);                                    \
    n++;
    MOAS_STATUS_MAP(CHECK_)
#undef CHECK_
    ASSERT_EQ(n, MOAS_STATUS_COUNT);
    ASSERT_EQ(MOAS_ERR_INVALID_ARG, -1);
    ASSERT_EQ(MOAS_ERR_CONTEXT_FULL, -7);
    ASSERT_STR_EQ(moas_status_string((moas_status)1), "unknown status");
    ASSERT_STR_EQ(moas_status_string((moas_status)-1000), "unknown status");
    ASSERT_TRUE(moas_last_error() != NULL);
    return TEST_PASS;
}

/* A program built against an older, smaller struct: init writes only its bytes. */
TEST(params_init_never_writes_past_the_callers_size) {
    unsigned char buf[sizeof(moas_context_params) + 16];
    moas_context_params p;
    const size_t old_size = offsetof(moas_context_params, n_threads);   /* size, n_ctx */

    memset(buf, 0xAB, sizeof buf);
    moas_context_params_init_sized((moas_context_params *)(void *)buf, old_size);
    memcpy(&p, buf, sizeof p);
    ASSERT_EQ(p.size, old_size);
    ASSERT_EQ(p.n_ctx, 0);
    for (size_t i = old_size; i < sizeof buf; i++) {
        ASSERT_EQ(buf[i], 0xAB);
    }
    memset(buf, 0xAB, sizeof buf);   /* a newer, larger struct: filled up to ours */
    moas_sampler_params_init_sized((moas_sampler_params *)(void *)buf, sizeof buf);
    ASSERT_EQ(((moas_sampler_params *)(void *)buf)->size, sizeof(moas_sampler_params));
    ASSERT_EQ(buf[sizeof(moas_sampler_params)], 0xAB);
    moas_model_params_init_sized(NULL, 100);                 /* harmless */
    memset(buf, 0xAB, sizeof buf);
    moas_model_params_init_sized((moas_model_params *)(void *)buf, 2);   /* too small: nothing */
    ASSERT_EQ(buf[0], 0xAB);
    ASSERT_STR_EQ(moas_status_name(MOAS_ERR_CORRUPT), "MOAS_ERR_CORRUPT");
    ASSERT_STR_EQ(moas_status_name(MOAS_OK), "MOAS_OK");
    ASSERT_STR_EQ(moas_status_name((moas_status)5), "MOAS_UNKNOWN");
    return TEST_PASS;
}

TEST(params_init_sets_size_and_defaults) {
    moas_model_params mp;
    moas_context_params cp;
    moas_sampler_params sp;
    memset(&mp, 0xAB, sizeof mp);
    memset(&cp, 0xAB, sizeof cp);
    memset(&sp, 0xAB, sizeof sp);
    moas_model_params_init(&mp);
    moas_context_params_init(&cp);
    moas_sampler_params_init(&sp);
    ASSERT_EQ(mp.size, sizeof mp);
    ASSERT_EQ(mp.use_mmap, 1);
    ASSERT_TRUE(mp.log == NULL && mp.allocator == NULL);
    ASSERT_EQ(cp.size, sizeof cp);
    ASSERT_EQ(cp.n_ctx, 0);
    ASSERT_EQ(cp.n_threads, 0);
    ASSERT_EQ(cp.mode, MOAS_MODE_MIXTURE);
    ASSERT_EQ(cp.kv_type, MOAS_TYPE_F32);
    ASSERT_EQ(cp.kernels, MOAS_KERNELS_AUTO);
    ASSERT_EQ(sp.size, sizeof sp);
    ASSERT_NEAR(sp.temperature, 1.0, 0);
    ASSERT_EQ(sp.top_k, 0);
    ASSERT_NEAR(sp.top_p, 1.0, 0);
    return TEST_PASS;
}
