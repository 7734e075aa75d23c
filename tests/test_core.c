/* test_core.c - version, status strings, params structs. */
#include "test.h"

#include "core.h"
#include "support/tiny_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* Every public struct that begins with its size has a layout listing its fields in
 * order, none overlapping, the size field first; the last is the struct's last (also
 * checked when the library is built). That none is missing between two listed ones,
 * which offsets cannot tell from padding, is checked against moas.h by
 * tests/python/test_api_doc.py. */
TEST(layouts_list_every_field) {
    const moas__layout *layouts[] = {
        &moas__model_params_layout,  &moas__tensor_info_layout,     &moas__context_params_layout,
        &moas__pool_params_layout,   &moas__pool_info_layout,       &moas__tokenize_params_layout,
        &moas__sampler_params_layout,
    };
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        const moas__layout *l = layouts[i];
        ASSERT_TRUE(l->n_fields >= 2);
        ASSERT_EQ(l->fields[0].offset, 0);
        ASSERT_EQ(l->fields[0].bytes, sizeof(uint32_t));
        for (size_t f = 1; f < l->n_fields; f++) {
            const uint32_t end = l->fields[f - 1].offset + l->fields[f - 1].bytes;
            ASSERT_TRUE(l->fields[f].offset >= end);
            ASSERT_TRUE(l->fields[f].offset - end < l->fields[f].bytes);
        }
        const moas__field *last = &l->fields[l->n_fields - 1];
        ASSERT_TRUE(last->offset + last->bytes <= l->size);
        ASSERT_TRUE(l->size - (last->offset + last->bytes) < sizeof(void *));
    }
    return TEST_PASS;
}

/* A size that ends inside a field is refused by every call that reads a params struct:
 * reading half a pointer crashed, and half an n_ctx was honoured as another number. */
TEST(params_size_inside_a_field_is_refused) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 5, &size);
    moas_model *m = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));

    moas_model_params mp;
    moas_model *m2 = (moas_model *)&mp;
    moas_allocator alloc = {NULL, NULL, NULL};
    moas_model_params_init(&mp);
    mp.allocator = &alloc;
    mp.size = (uint32_t)(offsetof(moas_model_params, allocator) + 4);
    ASSERT_STATUS(moas_model_load_memory(image, size, &mp, &m2), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(m2 == NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "inside a field of moas_model_params") != NULL);

    moas_context_params cp;
    moas_context *ctx = (moas_context *)&cp;
    moas_context_params_init(&cp);
    cp.n_ctx = 0x7fff0010;   /* its low half alone is 16 */
    cp.size = (uint32_t)offsetof(moas_context_params, n_ctx) + 1;
    ASSERT_STATUS(moas_context_create(m, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(ctx == NULL);
    moas_context_params_init(&cp);
    cp.size = (uint32_t)(offsetof(moas_context_params, pool) + 4);
    ASSERT_STATUS(moas_context_create(m, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    cp.size = (uint32_t)offsetof(moas_context_params, pool);   /* a 1.0 struct: fine */
    ASSERT_OK(moas_context_create(m, &cp, &ctx));
    moas_context_free(ctx);

    moas_pool_params pp;
    moas_pool *pool = (moas_pool *)&pp;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 20;
    pp.allocator = &alloc;
    pp.size = (uint32_t)(offsetof(moas_pool_params, allocator) + 4);
    ASSERT_STATUS(moas_pool_create(m, &pp, &pool), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(pool == NULL);

    moas_sampler_params sp;
    moas_sampler *s = (moas_sampler *)&sp;
    moas_sampler_params_init(&sp);
    sp.n_logit_bias = 1;
    sp.size = (uint32_t)(offsetof(moas_sampler_params, logit_bias) + 4);
    ASSERT_STATUS(moas_sampler_create(&sp, 10, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(s == NULL);

    moas_tokenize_params tp;
    int32_t tokens[8];
    size_t n = 99;
    moas_tokenize_params_init(&tp);
    tp.size = (uint32_t)offsetof(moas_tokenize_params, replacement) + 2;
    ASSERT_STATUS(moas_tokenize_ex(m, "a", 1, &tp, tokens, 8, &n, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_EQ(n, 99);

    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Structs the library writes get whole fields only, and their size says how many
 * bytes; an init of a size inside a field writes the fields before it. */
TEST(struct_fills_stop_before_a_cut_field) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 5, &size);
    moas_model *m = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));

    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 20;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_pool_info info;
    memset(&info, 0xAB, sizeof info);
    info.size = 6;   /* the size field and half of page_heads */
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.size, 4);
    ASSERT_EQ((uint32_t)info.page_heads, 0xABABABABu);
    info.size = 3;
    ASSERT_STATUS(moas_pool_stats(pool, &info), MOAS_ERR_INVALID_ARG);
    info.size = (uint32_t)offsetof(moas_pool_info, n_pages) + 2;
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.size, offsetof(moas_pool_info, n_pages));
    ASSERT_EQ(info.page_heads, 4);
    ASSERT_EQ((uint32_t)info.n_pages, 0xABABABABu);
    moas_pool_free(pool);

    moas_tensor_info t;
    memset(&t, 0xCD, sizeof t);
    t.size = (uint32_t)(offsetof(moas_tensor_info, data) + 4);
    ASSERT_OK(moas_model_tensor(m, 0, &t));
    ASSERT_EQ(t.size, offsetof(moas_tensor_info, data));
    ASSERT_TRUE(t.n_bytes > 0);
    uintptr_t untouched;
    memset(&untouched, 0xCD, sizeof untouched);
    ASSERT_TRUE((uintptr_t)t.data == untouched);

    unsigned char buf[sizeof(moas_context_params)];
    memset(buf, 0xAB, sizeof buf);
    moas_context_params_init_sized((moas_context_params *)(void *)buf,
                                   offsetof(moas_context_params, n_ctx) + 2);
    moas_context_params cp;
    memcpy(&cp, buf, sizeof cp);
    ASSERT_EQ(cp.size, offsetof(moas_context_params, n_ctx));
    ASSERT_EQ(buf[offsetof(moas_context_params, n_ctx)], 0xAB);

    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* An init of exactly the size field writes that field, and says 4: a caller's struct of
 * only `size` can hold it (moas.h: nothing is written only when it cannot). Structs the
 * library fills (moas_pool_stats) likewise answer with the size field alone. */
TEST(params_init_of_only_the_size_field_writes_it) {
    unsigned char buf[sizeof(moas_context_params)];
    uint32_t size;
    memset(buf, 0xAB, sizeof buf);
    moas_context_params_init_sized((moas_context_params *)(void *)buf, sizeof size);
    memcpy(&size, buf, sizeof size);
    ASSERT_EQ(size, sizeof size);
    for (size_t i = sizeof size; i < sizeof buf; i++) {
        ASSERT_EQ(buf[i], 0xAB);
    }

    size_t image_size;
    uint8_t *image = tiny_model_image(NULL, 5, &image_size);
    moas_model *m = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, image_size, NULL, &m));
    moas_pool_params pp;
    moas_pool *pool = NULL;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 1 << 20;
    ASSERT_OK(moas_pool_create(m, &pp, &pool));
    moas_pool_info info;
    memset(&info, 0xAB, sizeof info);
    info.size = 4;
    ASSERT_OK(moas_pool_stats(pool, &info));
    ASSERT_EQ(info.size, 4);
    ASSERT_EQ((uint32_t)info.page_heads, 0xABABABABu);
    moas_pool_free(pool);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A params struct larger than this library's (a newer header's) is refused saying
 * so, whatever the excess: one byte over must not read as a size "inside a field". */
TEST(params_larger_than_the_librarys_are_refused_as_such) {
    size_t image_size;
    uint8_t *image = tiny_model_image(NULL, 5, &image_size);
    moas_model *m = NULL;
    moas_context *ctx = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, image_size, NULL, &m));
    static const uint32_t excess[] = {1, 8, 64};
    for (size_t i = 0; i < sizeof excess / sizeof excess[0]; i++) {
        moas_context_params cp;
        moas_context_params_init(&cp);
        cp.size = (uint32_t)sizeof cp + excess[i];
        ASSERT_STATUS(moas_context_create(m, &cp, &ctx), MOAS_ERR_INVALID_ARG);
        ASSERT_TRUE(ctx == NULL);
        ASSERT_TRUE(strstr(moas_last_error(),
                           "is larger than this library's moas_context_params") != NULL);
    }
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* The allocation wrappers (core.h): moas__calloc refuses an n * size that overflows,
 * where the wrapped product would hand out a few bytes for a huge array; a request of
 * 0 bytes asks the allocator for 1, since malloc(0) may answer NULL, which would read
 * as no memory. */
static void *recording_alloc(void *user, size_t size) {
    *(size_t *)user = size;
    return malloc(size);
}

static void recording_free(void *user, void *ptr) {
    (void)user;
    free(ptr);
}

TEST(allocation_wrappers_check_overflow_and_never_ask_for_zero_bytes) {
    const size_t wraps_to_8 = SIZE_MAX / 8 + 2;   /* times 8: 2^64 + 8 */
    void *p = moas__calloc(NULL, wraps_to_8, 8);
    ASSERT_TRUE(p == NULL);
    free(p);
    p = moas__calloc(NULL, 8, wraps_to_8);
    ASSERT_TRUE(p == NULL);
    free(p);

    size_t asked = 99;
    const moas_allocator a = {recording_alloc, recording_free, &asked};
    p = moas__malloc(&a, 0);
    ASSERT_TRUE(p != NULL);
    ASSERT_EQ(asked, 1);
    moas__free(&a, p);
    asked = 99;
    p = moas__calloc(&a, 0, 16);
    ASSERT_TRUE(p != NULL);
    ASSERT_EQ(asked, 1);
    moas__free(&a, p);
    return TEST_PASS;
}
