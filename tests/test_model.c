/*
 * test_model.c - loading and binding a model: path and buffer agree, every query
 * answers from the file, and every architecture-level fault is refused with a
 * message naming it, leaving nothing behind.
 */
#include "test.h"

#include "support/tiny_model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- log capture --------------------------------------------------------------- */

typedef struct {
    int n_lines;
    char last[512];
} log_capture;

static void capture(void *user, moas_log_level level, const char *message) {
    log_capture *c = user;
    (void)level;
    c->n_lines++;
    snprintf(c->last, sizeof c->last, "%s", message);
}

/* A log callback that calls the library, which fails (as a logger that loads, or
 * asks something of a freed object, might). */
static void capture_and_fail(void *user, moas_log_level level, const char *message) {
    capture(user, level, message);
    moas_model *m;
    (void)moas_model_load("/nonexistent/inside-the-callback.gguf", NULL, &m);
}

/* ---- helpers ------------------------------------------------------------------- */

static char tmp_path[64];

/* Write `size` bytes to a temporary file; its path in tmp_path. */
static int write_temp(const void *data, size_t size) {
    snprintf(tmp_path, sizeof tmp_path, "/tmp/moas_test_%d.gguf", (int)(size % 100000));
    FILE *f = fopen(tmp_path, "wb");
    if (f == NULL) {
        return 1;
    }
    const int ok = fwrite(data, 1, size, f) == size;
    return fclose(f) == 0 && ok ? 0 : 1;
}

/* Load a tiny model built from `cfg` and expect `want`, with `needle` in the message. */
static int expect_load(const tiny_model_config *cfg, moas_status want, const char *needle) {
    size_t size;
    uint8_t *image = tiny_model_image(cfg, 1, &size);
    moas_model *model = (moas_model *)&size;   /* must become NULL on failure */
    ASSERT_TRUE(image != NULL);
    moas_status st = moas_model_load_memory(image, size, NULL, &model);
    if (st != want || (needle != NULL && strstr(moas_last_error(), needle) == NULL)) {
        test_report(__FILE__, __LINE__, "expect_load", "status %d (want %d), message \"%s\" "
                    "should name \"%s\"", (int)st, (int)want, moas_last_error(),
                    needle ? needle : "");
        free(image);
        moas_model_free(st == MOAS_OK ? model : NULL);
        return TEST_FAIL;
    }
    if (st != MOAS_OK) {
        ASSERT_TRUE(model == NULL);
    }
    moas_model_free(st == MOAS_OK ? model : NULL);
    free(image);
    return TEST_PASS;
}

/* ---- good loads ---------------------------------------------------------------- */

TEST(model_path_and_buffer_loads_agree) {
    moas_model *a, *b, *c;
    moas_model_params p;
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 3, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_EQ(write_temp(image, size), 0);

    ASSERT_OK(moas_model_load(tmp_path, NULL, &a));
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &b));
    moas_model_params_init(&p);
    p.use_mmap = 0;
    ASSERT_OK(moas_model_load(tmp_path, &p, &c));

    const moas_model *models[3] = {a, b, c};
    for (int i = 0; i < 3; i++) {
        const moas_model *m = models[i];
        ASSERT_STR_EQ(moas_model_arch(m), "moas");
        ASSERT_STR_EQ(moas_model_name(m), "tiny");
        ASSERT_EQ(moas_model_n_layer(m), 2);
        ASSERT_EQ(moas_model_n_embd(m), 16);
        ASSERT_EQ(moas_model_n_head(m), 4);
        ASSERT_EQ(moas_model_head_dim(m), 4);
        ASSERT_EQ(moas_model_n_ff(m), 64);
        ASSERT_EQ(moas_model_n_vocab(m), 40);
        ASSERT_EQ(moas_model_n_ctx_train(m), 32);
        ASSERT_EQ(moas_model_n_scheme(m), 3);
        ASSERT_EQ(moas_model_scheme_n_kv(m, 0), 4);
        ASSERT_EQ(moas_model_scheme_n_kv(m, 1), 2);
        ASSERT_EQ(moas_model_scheme_n_kv(m, 2), 1);
        ASSERT_EQ(moas_model_scheme_n_kv(m, 3), 0);
        ASSERT_EQ(moas_model_scheme_n_kv(m, -1), 0);
        ASSERT_EQ(moas_model_mixing(m), MOAS_MIXING_ROUTER);
        ASSERT_EQ(moas_model_kv_sharing(m), MOAS_KV_SHARING_INDEPENDENT);
        ASSERT_EQ(moas_model_has_bias(m), 1);
        ASSERT_EQ(moas_model_n_tensors(m), tiny_model_n_tensors(NULL));
        ASSERT_EQ(moas_model_n_params(m), moas_model_n_params(a));
    }

    /* every tensor: same name, shape and bytes through all three */
    for (int64_t i = 0; i < moas_model_n_tensors(a); i++) {
        moas_tensor_info ta, tb, tc;
        ta.size = tb.size = tc.size = sizeof ta;
        ASSERT_OK(moas_model_tensor(a, i, &ta));
        ASSERT_OK(moas_model_tensor(b, i, &tb));
        ASSERT_OK(moas_model_tensor(c, i, &tc));
        ASSERT_STR_EQ(ta.name, tb.name);
        ASSERT_STR_EQ(ta.name, tc.name);
        ASSERT_EQ(ta.n_bytes, tb.n_bytes);
        ASSERT_EQ(ta.offset, tb.offset);
        ASSERT_EQ(ta.offset % 64, 0);
        ASSERT_TRUE(memcmp(ta.data, tb.data, ta.n_bytes) == 0);
        ASSERT_TRUE(memcmp(ta.data, tc.data, ta.n_bytes) == 0);
        ASSERT_TRUE(memcmp(tb.data, image + tb.offset, tb.n_bytes) == 0);
        int64_t found;
        ASSERT_OK(moas_model_tensor_find(b, ta.name, &found));
        ASSERT_EQ(found, i);
    }
    /* a buffer load uses the caller's bytes in place */
    moas_tensor_info t;
    t.size = sizeof t;
    ASSERT_OK(moas_model_tensor(b, 0, &t));
    ASSERT_TRUE((const uint8_t *)t.data == image + t.offset);

    /* and the models compute the same thing */
    moas_context *ca, *cb;
    const int32_t tokens[5] = {1, 2, 3, 4, 5};
    ASSERT_OK(moas_context_create(a, NULL, &ca));
    ASSERT_OK(moas_context_create(b, NULL, &cb));
    ASSERT_OK(moas_context_decode_batch(ca, tokens, 5, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(cb, tokens, 5, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(ca), moas_context_logits(cb), 40 * sizeof(float)) == 0);
    moas_context_free(ca);
    moas_context_free(cb);

    moas_model_free(a);
    moas_model_free(b);
    moas_model_free(c);
    moas_model_free(NULL);
    remove(tmp_path);
    free(image);
    return TEST_PASS;
}

/* A buffer that is not aligned for in-place use is copied, and works the same. */
TEST(model_misaligned_buffer_is_copied) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 3, &size);
    uint8_t *shifted = malloc(size + 1);
    moas_model *a, *b;
    moas_tensor_info t;
    ASSERT_TRUE(image && shifted);
    memcpy(shifted + 1, image, size);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &a));
    ASSERT_OK(moas_model_load_memory(shifted + 1, size, NULL, &b));
    memset(shifted, 0xEE, size + 1);   /* the copy no longer needs the caller's bytes */
    t.size = sizeof t;
    ASSERT_OK(moas_model_tensor(b, 1, &t));
    ASSERT_EQ((uintptr_t)t.data % 4, 0);
    moas_tensor_info ta;
    ta.size = sizeof ta;
    ASSERT_OK(moas_model_tensor(a, 1, &ta));
    ASSERT_TRUE(memcmp(ta.data, t.data, t.n_bytes) == 0);
    moas_model_free(a);
    moas_model_free(b);
    free(shifted);
    free(image);
    return TEST_PASS;
}

TEST(model_metadata_getters_read_typed_values) {
    moas_model *m;
    size_t size, len;
    uint8_t *image = tiny_model_image(NULL, 3, &size);
    moas_meta_type type, elem;
    int64_t iv;
    double fv;
    int32_t bv;
    uint64_t n;
    const char *sv;

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_TRUE(moas_model_meta_count(m) >= 12);
    ASSERT_STR_EQ(moas_model_meta_key(m, 0), "general.architecture");
    ASSERT_TRUE(moas_model_meta_key(m, moas_model_meta_count(m)) == NULL);
    ASSERT_TRUE(moas_model_meta_key(m, -1) == NULL);

    ASSERT_OK(moas_model_meta_string(m, "general.architecture", &sv, &len));
    ASSERT_STR_EQ(sv, "moas");
    ASSERT_EQ(len, 4);
    ASSERT_OK(moas_model_meta_int(m, "moas.block_count", &iv));
    ASSERT_EQ(iv, 2);
    ASSERT_OK(moas_model_meta_float(m, "moas.attention.layer_norm_epsilon", &fv));
    ASSERT_NEAR(fv, 1e-5, 1e-12);
    ASSERT_OK(moas_model_meta_bool(m, "moas.bias", &bv));
    ASSERT_EQ(bv, 1);
    ASSERT_OK(moas_model_meta_type(m, "moas.attention.scheme_kv_heads", &type));
    ASSERT_EQ(type, MOAS_META_ARRAY);
    ASSERT_OK(moas_model_meta_array(m, "moas.attention.scheme_kv_heads", &elem, &n));
    ASSERT_EQ(n, 3);
    ASSERT_OK(moas_model_meta_array_int(m, "moas.attention.scheme_kv_heads", 1, &iv));
    ASSERT_EQ(iv, 2);
    ASSERT_OK(moas_model_meta_array_string(m, "tokenizer.ggml.tokens", 0, &sv, &len));
    ASSERT_EQ(len, 1);
    ASSERT_STR_EQ(sv, moas_token_text(m, 0));

    /* wrong type, missing key, out-of-range index, NULL */
    ASSERT_STATUS(moas_model_meta_int(m, "general.architecture", &iv), MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_string(m, "moas.block_count", &sv, NULL), MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_float(m, "moas.bias", &fv), MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_bool(m, "moas.block_count", &bv), MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_array(m, "moas.block_count", &elem, &n), MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_array_string(m, "moas.attention.scheme_kv_heads", 0, &sv, NULL),
                  MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_array_int(m, "tokenizer.ggml.tokens", 0, &iv),
                  MOAS_ERR_WRONG_TYPE);
    ASSERT_STATUS(moas_model_meta_int(m, "no.such.key", &iv), MOAS_ERR_NOT_FOUND);
    ASSERT_TRUE(strstr(moas_last_error(), "no.such.key") != NULL);
    ASSERT_STATUS(moas_model_meta_array_int(m, "moas.attention.scheme_kv_heads", 3, &iv),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_meta_int(m, NULL, &iv), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_meta_int(m, "moas.block_count", NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_meta_int(NULL, "moas.block_count", &iv), MOAS_ERR_INVALID_ARG);

    /* tensor queries */
    int64_t index;
    moas_tensor_info t;
    ASSERT_OK(moas_model_tensor_find(m, "blk.1.attn_k.2.weight", &index));
    t.size = sizeof t;
    ASSERT_OK(moas_model_tensor(m, index, &t));
    ASSERT_EQ(t.type, MOAS_TYPE_F32);
    ASSERT_EQ(t.n_dims, 2);
    ASSERT_EQ(t.ne[0], 16);
    ASSERT_EQ(t.ne[1], 4);   /* MQA: one KV head of head_dim 4 */
    ASSERT_EQ(t.ne[2], 1);
    ASSERT_EQ(t.n_bytes, 16 * 4 * 4);
    ASSERT_STATUS(moas_model_tensor_find(m, "blk.2.attn_k.0.weight", &index), MOAS_ERR_NOT_FOUND);
    ASSERT_STATUS(moas_model_tensor(m, -1, &t), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_tensor(m, moas_model_n_tensors(m), &t), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_tensor(m, 0, NULL), MOAS_ERR_INVALID_ARG);
    /* an older caller's struct that ends after `name` gets only what fits */
    moas_tensor_info small;
    memset(&small, 0x5A, sizeof small);
    small.size = (uint32_t)(offsetof(moas_tensor_info, name) + sizeof small.name);
    ASSERT_OK(moas_model_tensor(m, index, &small));
    ASSERT_STR_EQ(small.name, "blk.1.attn_k.2.weight");
    ASSERT_EQ(small.n_dims, 0x5A5A5A5A);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* ---- architecture-level faults ------------------------------------------------- */

TEST(model_refuses_missing_or_misshapen_tensors) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.omit_tensor = "blk.1.ffn_up.weight";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "'blk.1.ffn_up.weight' is missing")) return TEST_FAIL;
    cfg.omit_tensor = "blk.0.attn_router_down.bias";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "blk.0.attn_router_down.bias")) return TEST_FAIL;
    cfg.omit_tensor = "output_norm.weight";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "output_norm.weight")) return TEST_FAIL;
    cfg.omit_tensor = "blk.0.attn_v.1.weight";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "blk.0.attn_v.1.weight")) return TEST_FAIL;

    /* the file says bias=false but carries bias tensors: inconsistent */
    tiny_model_config_default(&cfg);
    cfg.bias = true;
    size_t size;
    uint8_t *image;
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    cfg.omit_key = "moas.bias";
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    gguf_writer_add_bool(w, "moas.bias", false);
    image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    moas_model *m = (moas_model *)&size;
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(strstr(moas_last_error(), "moas.bias is false") != NULL);
    ASSERT_TRUE(m == NULL);
    free(image);

    /* a scheme's K with the wrong number of heads: declared [4, 2, 1], stored [4, 4, 1]
     * in layer 0 scheme 1 */
    tiny_model_config_default(&cfg);
    cfg.omit_key = "moas.attention.scheme_kv_heads";
    w = gguf_writer_create();
    cfg.scheme_n_kv[1] = 4;
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    const uint32_t heads[3] = {4, 2, 1};
    gguf_writer_add_array(w, "moas.attention.scheme_kv_heads", MOAS_META_UINT32, heads, 3);
    image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(strstr(moas_last_error(), "has shape [16, 16], expected [16, 8]") != NULL);
    free(image);
    return TEST_PASS;
}

/* The default tiny model with `name` replaced by a tensor of `n_dims` dims `ne`, its
 * values all 0.5 (F32); the load's status and message. */
static int expect_reshaped(const char *name, uint32_t n_dims, const int64_t *ne,
                           moas_status want, const char *needle) {
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.omit_tensor = name;
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    size_t n = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        n *= (size_t)ne[d];
    }
    float *values = malloc(n * sizeof *values);
    ASSERT_TRUE(values != NULL);
    for (size_t i = 0; i < n; i++) {
        values[i] = 0.5f;
    }
    ASSERT_TRUE(gguf_writer_add_tensor(w, name, MOAS_TYPE_F32, n_dims, ne, values) >= 0);
    free(values);
    size_t size;
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    moas_model *m = (moas_model *)&size;
    const moas_status st = moas_model_load_memory(image, size, NULL, &m);
    free(image);
    moas_model_free(st == MOAS_OK ? m : NULL);
    if (st != want || (needle != NULL && strstr(moas_last_error(), needle) == NULL)) {
        test_report(__FILE__, __LINE__, "expect_reshaped", "%s: status %d (want %d), "
                    "message \"%s\"", name, (int)st, (int)want, moas_last_error());
        return TEST_FAIL;
    }
    return TEST_PASS;
}

/* GGUF dims of 1 at the end may be left out (ggml's writer does) or written: [R, 1] and
 * [R] are one shape, and so are [C] and [C, 1, 1]. Any other dim still has to match. */
TEST(model_reads_trailing_dims_of_one) {
    /* one routed scheme: the router's output matrix is [R, 1], written as [R] */
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.n_scheme = 1;
    cfg.scheme_n_kv[0] = 2;
    cfg.kv_sharing = "pooled";
    if (expect_load(&cfg, MOAS_OK, NULL)) return TEST_FAIL;
    cfg.kv_sharing = "independent";
    if (expect_load(&cfg, MOAS_OK, NULL)) return TEST_FAIL;

    const int64_t norm_2d[2] = {16, 1}, norm_3d[3] = {16, 1, 1}, up_3d[3] = {16, 64, 1};
    if (expect_reshaped("blk.0.ffn_norm.weight", 2, norm_2d, MOAS_OK, NULL)) return TEST_FAIL;
    if (expect_reshaped("output_norm.bias", 3, norm_3d, MOAS_OK, NULL)) return TEST_FAIL;
    if (expect_reshaped("blk.1.ffn_up.weight", 3, up_3d, MOAS_OK, NULL)) return TEST_FAIL;

    const int64_t norm_turned[2] = {1, 16}, norm_twice[2] = {16, 2}, up_deep[3] = {16, 64, 2};
    if (expect_reshaped("blk.0.ffn_norm.weight", 2, norm_turned, MOAS_ERR_CORRUPT,
                        "has shape [1, 16], expected [16]")) return TEST_FAIL;
    if (expect_reshaped("blk.0.ffn_norm.weight", 2, norm_twice, MOAS_ERR_CORRUPT,
                        "has shape [16, 2], expected [16]")) return TEST_FAIL;
    if (expect_reshaped("blk.1.ffn_up.weight", 3, up_deep, MOAS_ERR_CORRUPT,
                        "has shape [16, 64, 2], expected [16, 64]")) return TEST_FAIL;
    return TEST_PASS;
}

/* The tiny default model with general.architecture the `len` bytes of `arch`: its load
 * status must be `want`, with `needle` in the message. */
static int load_with_architecture(const char *arch, size_t len, moas_status want,
                                  const char *needle) {
    tiny_model_config cfg;
    size_t size;
    moas_model *m = NULL;
    gguf_writer *w = gguf_writer_create();
    tiny_model_config_default(&cfg);
    cfg.omit_key = "general.architecture";
    gguf_writer_add_string_n(w, "general.architecture", arch, len);
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    const moas_status st = moas_model_load_memory(image, size, NULL, &m);
    free(image);
    moas_model_free(st == MOAS_OK ? m : NULL);
    if (st != want || strstr(moas_last_error(), needle) == NULL) {
        test_report(__FILE__, __LINE__, "load_with_architecture", "status %d (want %d), "
                    "message \"%s\"", (int)st, (int)want, moas_last_error());
        return TEST_FAIL;
    }
    return TEST_PASS;
}

TEST(model_refuses_bad_hyperparameters) {
    tiny_model_config cfg;

    /* head_count 5 does not divide the width 16 */
    size_t size;
    moas_model *m;
    gguf_writer *w = gguf_writer_create();
    tiny_model_config_default(&cfg);
    cfg.omit_key = "moas.attention.head_count";
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    gguf_writer_add_u32(w, "moas.attention.head_count", 5);
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(strstr(moas_last_error(), "not a multiple of head_count 5") != NULL);
    free(image);

    tiny_model_config_default(&cfg);
    cfg.scheme_n_kv[1] = 3;   /* does not divide 4 */
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "scheme 1 has 3 KV heads")) return TEST_FAIL;

    tiny_model_config_default(&cfg);
    cfg.mixing = MOAS_MIXING_SINGLE;   /* with three schemes */
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "exactly one scheme")) return TEST_FAIL;

    /* pooled K/V needs no scheme that keeps every head: [2, 1] and [1] are whole models */
    tiny_model_config_default(&cfg);
    cfg.kv_sharing = "pooled";
    cfg.n_scheme = 2;
    cfg.scheme_n_kv[0] = 2;
    cfg.scheme_n_kv[1] = 1;
    if (expect_load(&cfg, MOAS_OK, NULL)) return TEST_FAIL;
    cfg.n_scheme = 1;
    cfg.scheme_n_kv[0] = 1;
    cfg.mixing = MOAS_MIXING_SINGLE;
    if (expect_load(&cfg, MOAS_OK, NULL)) return TEST_FAIL;
    tiny_model_config_default(&cfg);
    cfg.kv_sharing = "pooled";
    cfg.omit_tensor = "blk.1.attn_v.weight";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "'blk.1.attn_v.weight' is missing")) return TEST_FAIL;
    cfg.kv_sharing = "telepathic";
    cfg.omit_tensor = NULL;
    if (expect_load(&cfg, MOAS_ERR_UNSUPPORTED, "telepathic")) return TEST_FAIL;

    tiny_model_config_default(&cfg);
    cfg.omit_key = "moas.context_length";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "moas.context_length")) return TEST_FAIL;
    cfg.omit_key = "moas.router.hidden_length";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "moas.router.hidden_length")) return TEST_FAIL;
    cfg.omit_key = "tokenizer.ggml.tokens";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "tokenizer.ggml.tokens")) return TEST_FAIL;
    cfg.omit_key = "general.architecture";
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "general.architecture")) return TEST_FAIL;

    tiny_model_config_default(&cfg);
    cfg.eps = 0.0f;
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "layer_norm_epsilon")) return TEST_FAIL;

    /* a vocabulary entry of two characters, and a repeated character */
    static const char *const two_chars[3] = {"a", "bc", "d"};
    static const char *const repeated[3] = {"a", "b", "a"};
    tiny_model_config_default(&cfg);
    cfg.vocab = two_chars;
    cfg.n_vocab = 3;
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "token 1 is not exactly one UTF-8 character"))
        return TEST_FAIL;
    cfg.vocab = repeated;
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "tokens 0 and 2 are the same character"))
        return TEST_FAIL;

    /* an architecture with a NUL inside: not "moas" */
    if (load_with_architecture("moas\0llama", 10, MOAS_ERR_CORRUPT, "NUL byte") ||
        load_with_architecture("llama", 5, MOAS_ERR_UNSUPPORTED, "'llama'")) {
        return TEST_FAIL;
    }
    /* an architecture with an escape sequence, a bidi override and a byte that is no
     * UTF-8: quoted escaped, so that printing the message cannot drive a terminal */
    if (load_with_architecture("\x1b[2J\xe2\x80\xae\xff\tx", 10, MOAS_ERR_UNSUPPORTED,
                               "'\\u001b[2J\\u202e\\xff\tx'")) {
        return TEST_FAIL;
    }
    /* a message cut at the buffer's end is cut between characters, whichever byte the
     * cut falls on: 'é' is two bytes, and one of the two names puts the cut inside one */
    for (int odd = 0; odd < 2; odd++) {
        char name[700];
        size_t at = 0;
        if (odd) {
            name[at++] = 'x';
        }
        while (at + 2 < sizeof name) {
            name[at++] = (char)0xc3;
            name[at++] = (char)0xa9;
        }
        if (load_with_architecture(name, at, MOAS_ERR_UNSUPPORTED, "architecture")) {
            return TEST_FAIL;
        }
        const unsigned char *msg = (const unsigned char *)moas_last_error();
        const size_t len = strlen((const char *)msg);
        ASSERT_TRUE(len > 400 && len < 512);
        ASSERT_TRUE(msg[len - 1] == 0xa9);   /* the last 'é' whole, no \xc3 */
        for (size_t i = 0; i < len; i++) {   /* printable ASCII or a whole 'é' */
            ASSERT_TRUE((msg[i] >= 0x20 && msg[i] < 0x7f) ||
                        (msg[i] == 0xc3 && i + 1 < len && msg[i + 1] == 0xa9) ||
                        (msg[i] == 0xa9 && i > 0 && msg[i - 1] == 0xc3));
        }
    }
    return TEST_PASS;
}

/* The tiny default model with extra keys (NULL value: none) and, when `gate` is set, a
 * blk.0.ffn_gate.weight of the right shape; its load status and message. */
static int expect_block_options(const char *pos, const char *norm, const char *ffn,
                                const char *omit_tensor, bool gate, int32_t n_embd,
                                float base, moas_status want, const char *needle) {
    tiny_model_config cfg;
    size_t size;
    moas_model *m = NULL;
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    tiny_model_config_default(&cfg);
    cfg.omit_tensor = omit_tensor;
    cfg.n_embd = n_embd;
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    if (pos != NULL) {
        gguf_writer_add_string(w, "moas.position_encoding", pos);
    }
    if (norm != NULL) {
        gguf_writer_add_string(w, "moas.norm_type", norm);
    }
    if (ffn != NULL) {
        gguf_writer_add_string(w, "moas.feed_forward_type", ffn);
    }
    if (base != 0.0f) {
        gguf_writer_add_f32(w, "moas.rope.freq_base", base);
    }
    if (gate) {
        static float zeros[64 * 64];
        const int64_t ne[2] = {n_embd, cfg.n_ff};
        ASSERT_TRUE(gguf_writer_add_tensor(w, "blk.0.ffn_gate.weight", MOAS_TYPE_F32, 2, ne,
                                           zeros) >= 0);
    }
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    const moas_status st = moas_model_load_memory(image, size, NULL, &m);
    free(image);
    if (st != want || (needle != NULL && strstr(moas_last_error(), needle) == NULL)) {
        test_report(__FILE__, __LINE__, "expect_block_options", "status %d (want %d), message "
                    "\"%s\" should name \"%s\"", (int)st, (int)want,
                    st == MOAS_OK ? "" : moas_last_error(), needle ? needle : "");
        moas_model_free(m);
        return TEST_FAIL;
    }
    ASSERT_TRUE(st == MOAS_OK ? m != NULL : m == NULL);
    moas_model_free(m);
    return TEST_PASS;
}

/* docs/FORMAT.md "Block options": unknown values, a position table beside RoPE, an odd
 * head size, a bad base, a gate without SwiGLU and SwiGLU without its gate. */
TEST(model_refuses_bad_block_options) {
    static const char *const no_pos = "position_embd.weight";
    static const char *const no_gate = NULL;
    if (expect_block_options("alibi", NULL, NULL, NULL, false, 16, 0.0f, MOAS_ERR_UNSUPPORTED,
                             "'alibi' is unknown") ||
        expect_block_options(NULL, "batch", NULL, NULL, false, 16, 0.0f, MOAS_ERR_UNSUPPORTED,
                             "moas.norm_type 'batch'") ||
        expect_block_options(NULL, NULL, "relu", NULL, false, 16, 0.0f, MOAS_ERR_UNSUPPORTED,
                             "moas.feed_forward_type 'relu'") ||
        expect_block_options("rope", NULL, NULL, NULL, false, 16, 0.0f, MOAS_ERR_CORRUPT,
                             "'position_embd.weight' is present") ||
        expect_block_options("rope", NULL, NULL, no_pos, false, 16, 0.5f, MOAS_ERR_CORRUPT,
                             "freq_base 0.5") ||
        expect_block_options("rope", NULL, NULL, no_pos, false, 12, 0.0f, MOAS_ERR_CORRUPT,
                             "head size 3 is odd") ||
        expect_block_options(NULL, NULL, NULL, no_gate, true, 16, 0.0f, MOAS_ERR_CORRUPT,
                             "'blk.0.ffn_gate.weight' is present") ||
        expect_block_options(NULL, NULL, "swiglu", NULL, false, 16, 0.0f, MOAS_ERR_CORRUPT,
                             "'blk.0.ffn_gate.weight' is missing")) {
        return TEST_FAIL;
    }
    /* the options' defaults written out, and RoPE without a base (10000), load */
    if (expect_block_options("learned", "layer", "gelu", NULL, false, 16, 0.0f, MOAS_OK, NULL) ||
        expect_block_options("rope", "rms", NULL, no_pos, false, 16, 0.0f, MOAS_OK, NULL)) {
        return TEST_FAIL;
    }
    return TEST_PASS;
}

/* The open ends of two ranges: layer_norm_epsilon 1 is outside (0, 1) and a RoPE
 * freq_base of 1 (no rotation at all) is outside (1, 1e30). */
TEST(model_refuses_the_open_ends_of_eps_and_rope_base) {
    tiny_model_config cfg;

    tiny_model_config_default(&cfg);
    cfg.eps = 1.0f;
    if (expect_load(&cfg, MOAS_ERR_CORRUPT, "model: layer_norm_epsilon 1 is outside (0, 1)"))
        return TEST_FAIL;
    if (expect_block_options("rope", NULL, NULL, "position_embd.weight", false, 16, 1.0f,
                             MOAS_ERR_CORRUPT, "model: rope.freq_base 1 is outside (1, 1e30)"))
        return TEST_FAIL;
    return TEST_PASS;
}

/* Eight schemes, the most a file may have (nine are refused: test_bad_inputs.c), load
 * and are read back in order; a decode routes among them. */
TEST(model_loads_the_most_schemes) {
    tiny_model_config cfg;
    static const int32_t heads[8] = {4, 2, 1, 4, 2, 1, 2, 4};
    size_t size;
    moas_model *m = NULL;
    moas_context *ctx = NULL;

    tiny_model_config_default(&cfg);
    cfg.n_scheme = 8;
    memcpy(cfg.scheme_n_kv, heads, sizeof heads);
    uint8_t *image = tiny_model_image(&cfg, 3, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_n_scheme(m), 8);
    for (int32_t s = 0; s < 8; s++) {
        ASSERT_EQ(moas_model_scheme_n_kv(m, s), heads[s]);
    }
    ASSERT_EQ(moas_model_scheme_n_kv(m, 8), 0);
    ASSERT_OK(moas_context_create(m, NULL, &ctx));
    ASSERT_OK(moas_context_decode(ctx, 1, NULL));
    int32_t counts[8];
    ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
    int32_t total = 0;
    for (int32_t s = 0; s < 8; s++) {
        total += counts[s];
    }
    ASSERT_EQ(total, 2);   /* one token, two layers */
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

TEST(model_refuses_unsupported_weight_types) {
    tiny_model_config cfg;
    size_t size;
    moas_model *m;

    /* BF16 is a GGUF type the reader knows, but no moas tensor may use it */
    tiny_model_config_default(&cfg);
    cfg.omit_tensor = "blk.0.ffn_norm.weight";
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(tiny_model_write(&cfg, 1, w));
    uint16_t ones[16];
    for (int i = 0; i < 16; i++) {
        ones[i] = 0x3f80;
    }
    const int64_t ne[1] = {16};
    ASSERT_TRUE(gguf_writer_add_tensor(w, "blk.0.ffn_norm.weight", MOAS_TYPE_BF16, 1, ne, ones) >= 0);
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_UNSUPPORTED);
    ASSERT_TRUE(strstr(moas_last_error(), "blk.0.ffn_norm.weight") != NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "BF16") != NULL || strstr(moas_last_error(), "bf16"));
    free(image);

    /* F16 and Q8_0 matrices and F16 embeddings load and decode */
    tiny_model_config_default(&cfg);
    cfg.n_embd = 32;
    cfg.n_ff = 64;
    cfg.mat_type = MOAS_TYPE_Q8_0;
    cfg.emb_type = MOAS_TYPE_F16;
    cfg.router_hidden = 32;
    cfg.tied = false;
    image = tiny_model_image(&cfg, 2, &size);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_context *ctx;
    ASSERT_OK(moas_context_create(m, NULL, &ctx));
    const int32_t tokens[3] = {0, 1, 2};
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 3, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(isfinite(moas_context_logits(ctx)[0]));
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Q8_0 is a matrix type only: embeddings are read a row at a time as F32 or F16, so a
 * Q8_0 token_embd.weight (of whole blocks: n_embd 32) is refused as unsupported,
 * naming the tensor, its type and what an embedding may be. */
TEST(model_refuses_a_q8_0_embedding) {
    tiny_model_config cfg;
    size_t size;
    moas_model *m = (moas_model *)&size;
    const uint64_t ne[2] = {32, 40};

    tiny_model_config_default(&cfg);
    cfg.n_embd = 32;
    cfg.omit_tensor = "token_embd.weight";
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL && tiny_model_write(&cfg, 1, w));
    ASSERT_TRUE(gguf_writer_add_tensor_raw(w, "token_embd.weight", 17, MOAS_TYPE_Q8_0, 2, ne,
                                           NULL, 40 * 34) >= 0);
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_UNSUPPORTED);
    ASSERT_TRUE(m == NULL);
    ASSERT_STR_EQ(moas_last_error(), "model: tensor 'token_embd.weight' has type q8_0, which is "
                  "not supported for an embedding (F32, F16)");
    free(image);
    return TEST_PASS;
}

/* Kernels read elements in place, so a file whose general.alignment (1 here) puts a
 * tensor's data off its element's alignment is refused, naming the tensor, its file
 * offset and the bytes it needs: 2 for F16, 4 for F32. token_embd.weight is the first
 * tensor, at offset 0 of the data section, which starts where the directory ends; a
 * padding key's length moves that end. */
static uint8_t *embd_at(moas_type type, int32_t remainder, size_t *dir_end, size_t *size) {
    for (int pad = 0; pad < 4; pad++) {
        tiny_model_config cfg;
        const uint64_t ne[2] = {16, 40};
        tiny_model_config_default(&cfg);
        cfg.alignment = 1;
        cfg.omit_tensor = "token_embd.weight";
        gguf_writer *w = gguf_writer_create();
        if (w == NULL) {
            return NULL;
        }
        gguf_writer_add_tensor_raw(w, "token_embd.weight", 17, type, 2, ne, NULL,
                                   type == MOAS_TYPE_F16 ? 1280 : 2560);
        gguf_writer_add_string_n(w, "x.pad", "xyz", (size_t)pad);
        uint8_t *image = tiny_model_write(&cfg, 1, w) ? gguf_writer_finish(w, size) : NULL;
        *dir_end = gguf_writer_directory_end(w);
        const bool found = gguf_writer_tensor_offset(w, 0) == 0 && *dir_end % 4 == (size_t)remainder;
        gguf_writer_free(w);
        if (image == NULL || found) {
            return image;
        }
        free(image);
    }
    return NULL;
}

TEST(model_refuses_misaligned_tensor_data) {
    size_t dir_end = 0, size = 0;
    moas_model *m = (moas_model *)&size;
    char want[160];

    uint8_t *image = embd_at(MOAS_TYPE_F16, 1, &dir_end, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_UNSUPPORTED);
    ASSERT_TRUE(m == NULL);
    snprintf(want, sizeof want, "model: tensor 'token_embd.weight' data at file offset %zu is "
             "not aligned to 2 bytes (general.alignment is 1)", dir_end);
    ASSERT_STR_EQ(moas_last_error(), want);
    free(image);

    image = embd_at(MOAS_TYPE_F32, 2, &dir_end, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_STATUS(moas_model_load_memory(image, size, NULL, &m), MOAS_ERR_UNSUPPORTED);
    snprintf(want, sizeof want, "model: tensor 'token_embd.weight' data at file offset %zu is "
             "not aligned to 4 bytes (general.alignment is 1)", dir_end);
    ASSERT_STR_EQ(moas_last_error(), want);
    free(image);
    return TEST_PASS;
}

/* A proper prefix of a valid file is a truncated file: refused, nothing left behind. */
TEST(model_refuses_every_truncation) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 5, &size);
    ASSERT_TRUE(image != NULL);
    for (size_t n = 0; n < size; n++) {
        moas_model *m = (moas_model *)&size;
        uint8_t *copy = malloc(n ? n : 1);   /* exactly n bytes: ASan sees any overread */
        ASSERT_TRUE(copy != NULL);
        memcpy(copy, image, n);
        const moas_status st = moas_model_load_memory(copy, n, NULL, &m);
        if (!(st == MOAS_ERR_CORRUPT || st == MOAS_ERR_BAD_FORMAT) || m != NULL ||
            moas_last_error()[0] == '\0') {
            test_report(__FILE__, __LINE__, "truncation", "%zu of %zu bytes: status %d, %s", n,
                        size, (int)st, moas_last_error());
            return TEST_FAIL;
        }
        free(copy);
    }
    free(image);
    return TEST_PASS;
}

TEST(model_load_errors_name_the_cause) {
    moas_model *m = (moas_model *)&m;
    moas_model_params p;
    log_capture log = {0, ""};

    ASSERT_STATUS(moas_model_load("/nonexistent/model.gguf", NULL, &m), MOAS_ERR_IO);
    ASSERT_TRUE(m == NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "/nonexistent/model.gguf") != NULL);
    ASSERT_STATUS(moas_model_load("/tmp", NULL, &m), MOAS_ERR_IO);
    ASSERT_STATUS(moas_model_load(NULL, NULL, &m), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_load("x", NULL, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_model_load_memory(NULL, 10, NULL, &m), MOAS_ERR_INVALID_ARG);

    /* an empty file, and a file that is not GGUF */
    ASSERT_EQ(write_temp("", 0), 0);
    ASSERT_STATUS(moas_model_load(tmp_path, NULL, &m), MOAS_ERR_CORRUPT);
    ASSERT_EQ(write_temp("PK\003\004 this is a zip", 18), 0);
    ASSERT_STATUS(moas_model_load(tmp_path, NULL, &m), MOAS_ERR_BAD_FORMAT);
    remove(tmp_path);

    /* the log hears the same message, and only when it is set */
    moas_model_params_init(&p);
    p.log = capture;
    p.log_user = &log;
    ASSERT_STATUS(moas_model_load("/nonexistent/x.gguf", &p, &m), MOAS_ERR_IO);
    ASSERT_EQ(log.n_lines, 1);
    ASSERT_STR_EQ(log.last, moas_last_error());
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 1, &size);
    ASSERT_OK(moas_model_load_memory(image, size, &p, &m));
    ASSERT_EQ(log.n_lines, 1);   /* success is silent */
    moas_model_free(m);
    free(image);
    /* a failing call inside the callback leaves the caller's error as it was */
    p.log = capture_and_fail;
    ASSERT_STATUS(moas_model_load("/nonexistent/y.gguf", &p, &m), MOAS_ERR_IO);
    ASSERT_EQ(log.n_lines, 2);
    ASSERT_STR_EQ(log.last, moas_last_error());
    ASSERT_TRUE(strstr(moas_last_error(), "/nonexistent/y.gguf") != NULL);

    /* params with a size this library does not know */
    moas_model_params_init(&p);
    p.size = 3;
    ASSERT_STATUS(moas_model_load("x", &p, &m), MOAS_ERR_INVALID_ARG);
    return TEST_PASS;
}

/* Load `path`, which opens but is not a regular file: MOAS_ERR_IO, and a message that
 * names the path and `what` it is. errno is made stale first (ENOTTY, what an earlier
 * isatty() leaves behind): no system call fails here, so no errno text may appear. */
static int expect_not_a_file(const char *path, const char *what) {
    moas_model *m = (moas_model *)&m;
    errno = ENOTTY;
    const moas_status st = moas_model_load(path, NULL, &m);
    const char *msg = moas_last_error();
    if (st != MOAS_ERR_IO || m != NULL || strstr(msg, path) == NULL ||
        strstr(msg, what) == NULL || strstr(msg, strerror(ENOTTY)) != NULL ||
        strstr(msg, "ioctl") != NULL) {
        test_report(__FILE__, __LINE__, path, "status %d, want MOAS_ERR_IO and '%s': %s",
                    (int)st, what, msg);
        return TEST_FAIL;
    }
    return TEST_PASS;
}

TEST(model_load_names_what_is_not_a_file) {
    char dir[64], fifo[96];

    ASSERT_EQ(expect_not_a_file("/dev/null", "not a regular file (a character device)"),
              TEST_PASS);
    snprintf(dir, sizeof dir, "/tmp/moas_test_dir_%ld", (long)getpid());
    snprintf(fifo, sizeof fifo, "%s/fifo", dir);
    ASSERT_EQ(mkdir(dir, 0700), 0);
    const int dir_result = expect_not_a_file(dir, "is a directory");
    /* a FIFO with no writer: refused at once (opening it must not wait for a writer;
     * the alarm ends the run if it does) */
    int fifo_result = TEST_FAIL;
    if (mkfifo(fifo, 0600) == 0) {
        alarm(20);
        fifo_result = expect_not_a_file(fifo, "not a regular file (a pipe)");
        alarm(0);
        remove(fifo);
    }
    rmdir(dir);
    ASSERT_EQ(dir_result, TEST_PASS);
    ASSERT_EQ(fifo_result, TEST_PASS);
    return TEST_PASS;
}

/* A model is read-only: contexts on several threads could share it; here, several
 * contexts interleaved on one thread do not disturb each other. */
TEST(model_shared_by_interleaved_contexts) {
    moas_model *m;
    moas_context *a, *b;
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 4, &size);
    const int32_t ta[6] = {1, 5, 9, 2, 6, 3}, tb[6] = {7, 7, 0, 1, 30, 2};
    float la[40], lb[40];

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_OK(moas_context_create(m, NULL, &a));
    ASSERT_OK(moas_context_create(m, NULL, &b));
    for (int i = 0; i < 6; i++) {
        ASSERT_OK(moas_context_decode(a, ta[i], la));
        ASSERT_OK(moas_context_decode(b, tb[i], lb));
    }
    moas_context_reset(a);
    ASSERT_OK(moas_context_decode_batch(a, tb, 6, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(a), lb, sizeof lb) == 0);
    moas_context_free(a);
    moas_context_free(b);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}
