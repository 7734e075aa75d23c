/*
 * test_bad_inputs.c - the rows of docs/TESTING.md's bad-input matrix that no other
 * test covered: hyperparameters above their limits or of the wrong type, an unknown
 * tokenizer or mixing, and a sampler params struct of the wrong size.
 */
#include "test.h"

#include "support/tiny_model.h"

#include <stdlib.h>

/* The default tiny model with `key` written by `add` instead; expect `want` and a
 * message naming `needle`. */
typedef void (*add_fn)(gguf_writer *w, const char *key);

static int expect_with_key(const char *key, add_fn add, moas_status want, const char *needle) {
    tiny_model_config cfg;
    size_t size;
    moas_model *m = (moas_model *)&size;   /* must become NULL */
    gguf_writer *w = gguf_writer_create();

    tiny_model_config_default(&cfg);
    cfg.omit_key = key;
    ASSERT_TRUE(w != NULL && tiny_model_write(&cfg, 1, w));
    add(w, key);
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    const moas_status st = moas_model_load_memory(image, size, NULL, &m);
    free(image);
    if (st != want || m != NULL || strstr(moas_last_error(), needle) == NULL) {
        test_report(__FILE__, __LINE__, key, "status %d (want %d), message \"%s\" should name "
                    "\"%s\"", (int)st, (int)want, moas_last_error(), needle);
        if (st == MOAS_OK) {
            moas_model_free(m);
        }
        return TEST_FAIL;
    }
    return TEST_PASS;
}

static void add_u32_5000(gguf_writer *w, const char *key) { gguf_writer_add_u32(w, key, 5000); }
static void add_u64_huge(gguf_writer *w, const char *key) { gguf_writer_add_u64(w, key, UINT64_MAX); }
static void add_i32_neg(gguf_writer *w, const char *key) { gguf_writer_add_i32(w, key, -4); }
static void add_u32_zero(gguf_writer *w, const char *key) { gguf_writer_add_u32(w, key, 0); }
static void add_string(gguf_writer *w, const char *key) { gguf_writer_add_string(w, key, "16"); }
static void add_f32(gguf_writer *w, const char *key) { gguf_writer_add_f32(w, key, 16.0f); }
static void add_bpe(gguf_writer *w, const char *key) { gguf_writer_add_string(w, key, "bpe"); }
static void add_u32_2(gguf_writer *w, const char *key) { gguf_writer_add_u32(w, key, 2); }
static void add_weird(gguf_writer *w, const char *key) { gguf_writer_add_string(w, key, "median"); }
static void add_eps_big(gguf_writer *w, const char *key) { gguf_writer_add_f64(w, key, 1.5); }
static void add_eps_int(gguf_writer *w, const char *key) { gguf_writer_add_u32(w, key, 1); }

static void add_nine_schemes(gguf_writer *w, const char *key) {
    const uint32_t heads[9] = {4, 2, 1, 1, 1, 1, 1, 1, 1};
    gguf_writer_add_array(w, key, MOAS_META_UINT32, heads, 9);
}

static void add_scheme_strings(gguf_writer *w, const char *key) {
    static const char *const heads[3] = {"4", "2", "1"};
    gguf_writer_add_array_string(w, key, heads, 3);
}

/* true, true, true: bools that read as 1, but a bool is not an integer (GGUF's, or
 * read_uint's for the scalar keys) */
static void add_scheme_bools(gguf_writer *w, const char *key) {
    const bool heads[3] = {true, true, true};
    gguf_writer_add_array(w, key, MOAS_META_BOOL, heads, 3);
}

static void add_u32_4096(gguf_writer *w, const char *key) { gguf_writer_add_u32(w, key, 4096); }
static void add_u32_4097(gguf_writer *w, const char *key) { gguf_writer_add_u32(w, key, 4097); }

/* A limit is the largest value allowed: block_count 4096 passes its check (the tiny
 * model then lacks layer 2's tensors), and 4097 is refused naming both numbers. */
TEST(bad_inputs_hyperparameter_limit_is_inclusive) {
    if (expect_with_key("moas.block_count", add_u32_4097, MOAS_ERR_CORRUPT,
                        "model: key 'moas.block_count' is 4097, above the limit 4096"))
        return TEST_FAIL;
    if (expect_with_key("moas.block_count", add_u32_4096, MOAS_ERR_CORRUPT,
                        "model: tensor 'blk.2."))
        return TEST_FAIL;
    return TEST_PASS;
}

static void add_i32_4097(gguf_writer *w, const char *key) { gguf_writer_add_i32(w, key, 4097); }
static void add_i64_4096(gguf_writer *w, const char *key) { gguf_writer_add_i64(w, key, 4096); }

/* The limits hold for a key of a signed type too: int32 4097 is refused as uint32 4097
 * is, and int64 4096 passes the check. */
TEST(bad_inputs_signed_hyperparameter_above_its_limit) {
    if (expect_with_key("moas.block_count", add_i32_4097, MOAS_ERR_CORRUPT,
                        "model: key 'moas.block_count' is 4097, above the limit 4096"))
        return TEST_FAIL;
    if (expect_with_key("moas.block_count", add_i64_4096, MOAS_ERR_CORRUPT,
                        "model: tensor 'blk.2."))
        return TEST_FAIL;
    return TEST_PASS;
}

/* Hyperparameters: above the limits of model.c, below 1, or not integers. */
TEST(bad_inputs_hyperparameters_out_of_range_or_mistyped) {
    if (expect_with_key("moas.block_count", add_u32_5000, MOAS_ERR_CORRUPT, "above the limit"))
        return TEST_FAIL;
    if (expect_with_key("moas.context_length", add_u64_huge, MOAS_ERR_CORRUPT, "above the limit"))
        return TEST_FAIL;
    if (expect_with_key("moas.embedding_length", add_i32_neg, MOAS_ERR_CORRUPT, "at least 1"))
        return TEST_FAIL;
    if (expect_with_key("moas.feed_forward_length", add_u32_zero, MOAS_ERR_CORRUPT, "at least 1"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.head_count", add_string, MOAS_ERR_CORRUPT,
                        "must be an integer"))
        return TEST_FAIL;
    if (expect_with_key("moas.router.hidden_length", add_f32, MOAS_ERR_CORRUPT,
                        "must be an integer"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.layer_norm_epsilon", add_eps_big, MOAS_ERR_CORRUPT,
                        "outside (0, 1)"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.layer_norm_epsilon", add_eps_int, MOAS_ERR_CORRUPT,
                        "must be a float"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.scheme_kv_heads", add_nine_schemes, MOAS_ERR_CORRUPT,
                        "9 attention schemes"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.scheme_kv_heads", add_scheme_strings, MOAS_ERR_CORRUPT,
                        "array of integers"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.scheme_kv_heads", add_scheme_bools, MOAS_ERR_CORRUPT,
                        "array of integers"))
        return TEST_FAIL;
    /* a string where a string is expected, but of the wrong kind */
    if (expect_with_key("general.architecture", add_u32_2, MOAS_ERR_CORRUPT, "must be a string"))
        return TEST_FAIL;
    return TEST_PASS;
}

/* Values the format names but this version does not implement. */
TEST(bad_inputs_unknown_tokenizer_or_mixing_is_unsupported) {
    if (expect_with_key("tokenizer.ggml.model", add_bpe, MOAS_ERR_UNSUPPORTED, "'bpe'"))
        return TEST_FAIL;
    if (expect_with_key("moas.attention.mixing", add_weird, MOAS_ERR_UNSUPPORTED, "'median'"))
        return TEST_FAIL;
    return TEST_PASS;
}

/* The sampler reads its params struct by its size field, like the others. */
TEST(bad_inputs_sampler_params_size_is_checked) {
    moas_sampler_params p;
    moas_sampler *s = (moas_sampler *)&p;

    moas_sampler_params_init(&p);
    p.size = 2;   /* smaller than the size field itself */
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(s == NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "size") != NULL);
    p.size = sizeof p + 8;   /* a newer header's struct */
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    /* an older caller's struct that stops after temperature: defaults for the rest */
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.top_p = 7.0f;   /* past the caller's size: never read */
    p.size = (uint32_t)(offsetof(moas_sampler_params, temperature) + sizeof p.temperature);
    ASSERT_OK(moas_sampler_create(&p, 3, &s));
    const float logits[3] = {0.0f, 2.0f, 1.0f};
    int32_t t = -1;
    ASSERT_OK(moas_sampler_sample(s, logits, &t));
    ASSERT_EQ(t, 1);   /* greedy, as the caller asked */
    moas_sampler_free(s);
    return TEST_PASS;
}

/* Every call that cannot report an error reads a NULL object as nothing (0, "", NULL,
 * the enum's first value) instead of crashing; the void ones that change something do
 * nothing and say why in moas_last_error(). */
TEST(bad_inputs_null_objects_read_as_nothing) {
    const moas_model *m = NULL;
    ASSERT_TRUE(strcmp(moas_model_arch(m), "moas") == 0);
    ASSERT_TRUE(strcmp(moas_model_name(m), "") == 0);
    ASSERT_EQ(moas_model_n_layer(m) + moas_model_n_embd(m) + moas_model_n_head(m) +
                  moas_model_head_dim(m) + moas_model_n_ff(m) + moas_model_n_vocab(m) +
                  moas_model_n_ctx_train(m) + moas_model_n_scheme(m) + moas_model_has_bias(m) +
                  moas_model_scheme_n_kv(m, 0),
              0);
    ASSERT_EQ((int)moas_model_mixing(m), (int)MOAS_MIXING_ROUTER);
    ASSERT_EQ((int)moas_model_kv_sharing(m), (int)MOAS_KV_SHARING_INDEPENDENT);
    ASSERT_TRUE(moas_model_n_params(m) == 0 && moas_model_n_tensors(m) == 0 &&
                moas_model_meta_count(m) == 0 && moas_model_meta_key(m, 0) == NULL &&
                moas_token_text(m, 0) == NULL);

    moas_context *c = NULL;
    ASSERT_TRUE(moas_context_logits(c) == NULL && moas_context_model(c) == NULL);
    ASSERT_EQ(moas_context_n_past(c) + moas_context_n_ctx(c) + moas_context_n_threads(c) +
                  moas_context_kv_pages(c),
              0);
    ASSERT_EQ((int)moas_context_mode(c), (int)MOAS_MODE_MIXTURE);
    ASSERT_TRUE(strcmp(moas_context_kernels_name(c), "") == 0);
    ASSERT_TRUE(moas_context_kv_bytes_used(c, -1) == 0 && moas_context_kv_bytes_reserved(c, -1) == 0 &&
                moas_context_kv_bytes_held(c) == 0 && moas_context_kv_token_bytes(c, 0) == 0 &&
                moas_context_state_size(c) == 0);
    moas_context_reset(c);
    ASSERT_TRUE(strstr(moas_last_error(), "context_reset: ctx is NULL") != NULL);
    moas_context_set_route_callback(c, NULL, NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "context_set_route_callback: ctx is NULL") != NULL);
    moas_context_free(c);

    moas_sampler *s = NULL;
    moas_sampler_reseed(s, 1);
    ASSERT_TRUE(strstr(moas_last_error(), "sampler_reseed: sampler is NULL") != NULL);
    moas_sampler_reset(s);
    ASSERT_TRUE(strstr(moas_last_error(), "sampler_reset: sampler is NULL") != NULL);
    moas_sampler_free(s);
    moas_pool_free(NULL);
    moas_model_free(NULL);
    return TEST_PASS;
}
