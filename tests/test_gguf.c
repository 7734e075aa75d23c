/*
 * test_gguf.c - the GGUF container reader (src/gguf.c).
 *
 * Valid files read back exactly (every value type, arrays, strings with NUL bytes,
 * every tensor type, any alignment); lookups find and miss; a table of handcrafted
 * broken files (after llama.cpp's test-gguf) each fail with their own status and a
 * message naming the field; every truncation of a valid model fails; a randomised
 * round trip; the directory is one allocation and a failed one leaks nothing.
 */
#include "test.h"

#include "gguf.h"
#include "support/gguf_writer.h"
#include "support/tiny_model.h"

#include <stdio.h>
#include <stdlib.h>

/* Any non-NULL value the parser must overwrite with NULL on failure. */
static moas_gguf sentinel_gguf;

/* ---- helpers ------------------------------------------------------------------- */

/* A little-endian byte string for raw entries. */
typedef struct {
    uint8_t b[1024];
    size_t n;
} bytes;

static void b_le(bytes *b, uint64_t x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        b->b[b->n++] = (uint8_t)(x >> (8 * i));
    }
}

static void b_raw(bytes *b, const void *p, size_t n) {
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

static void b_str(bytes *b, const char *s) {
    b_le(b, strlen(s), 8);
    b_raw(b, s, strlen(s));
}

static uint64_t test_rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static uint32_t below(uint64_t *s, uint32_t n) {
    return (uint32_t)(test_rng_next(s) % n);
}

/* ---- a sample file with every value type ------------------------------------------ */

static const uint8_t sample_u8[3] = {1, 2, 255};
static const int8_t sample_i8[3] = {-1, -128, 127};
static const uint16_t sample_u16[2] = {0, 65535};
static const int16_t sample_i16[2] = {-32768, 32767};
static const uint32_t sample_u32[3] = {4, 2, 1};
static const int32_t sample_i32[2] = {INT32_MIN, INT32_MAX};
static const uint64_t sample_u64[2] = {UINT64_MAX, 5};
static const int64_t sample_i64[2] = {INT64_MIN, INT64_MAX};
static const float sample_f32[3] = {1.5f, -0.25f, 3.0e38f};
static const double sample_f64[2] = {-2.25e300, 1e-300};
static const bool sample_bool[3] = {true, false, true};
static const char *const sample_strs[3] = {"x", "", "yz"};
static const char *const sample_strs_nul[2] = {"a\0b", "\0"};
static const size_t sample_strs_nul_len[2] = {3, 1};

static const int64_t sample_t0_ne[2] = {3, 2};
static const int64_t sample_t1_ne[1] = {4};
static const int64_t sample_t2_ne[3] = {2, 2, 2};
static const int64_t sample_t3_ne[2] = {32, 2};
static const int64_t sample_t4_ne[4] = {1, 2, 1, 3};

/* Bytes of sample tensor `i`: a recognisable pattern. */
static void sample_tensor_bytes(int i, uint8_t *out, size_t n) {
    for (size_t k = 0; k < n; k++) {
        out[k] = (uint8_t)(k * 7 + (size_t)i * 31 + 1);
    }
}

static const struct {
    const char *name;
    moas_type type;
    uint32_t n_dims;
    const int64_t *ne;
    size_t n_bytes;
} sample_tensors[] = {
    {"a.f32", MOAS_TYPE_F32, 2, sample_t0_ne, 24},
    {"b.f16", MOAS_TYPE_F16, 1, sample_t1_ne, 8},
    {"c.bf16", MOAS_TYPE_BF16, 3, sample_t2_ne, 16},
    {"d.q8_0", MOAS_TYPE_Q8_0, 2, sample_t3_ne, 68},
    {"e.4d", MOAS_TYPE_F32, 4, sample_t4_ne, 24},
};
#define N_SAMPLE_TENSORS (sizeof sample_tensors / sizeof sample_tensors[0])
#define N_SAMPLE_KV 31

static gguf_writer *sample_writer(uint32_t alignment) {
    gguf_writer *w = gguf_writer_create();
    if (w == NULL) {
        return NULL;
    }
    gguf_writer_add_string(w, "general.architecture", "moas");
    gguf_writer_set_alignment(w, alignment);
    gguf_writer_add_u8(w, "v.u8", 200);
    gguf_writer_add_i8(w, "v.i8", -100);
    gguf_writer_add_u16(w, "v.u16", 60000);
    gguf_writer_add_i16(w, "v.i16", -30000);
    gguf_writer_add_u32(w, "v.u32", 4000000000u);
    gguf_writer_add_i32(w, "v.i32", -2000000000);
    gguf_writer_add_u64(w, "v.u64", UINT64_MAX);
    gguf_writer_add_i64(w, "v.i64", INT64_MIN);
    gguf_writer_add_f32(w, "v.f32", 1.5f);
    gguf_writer_add_f64(w, "v.f64", -2.25e300);
    gguf_writer_add_bool(w, "v.true", true);
    gguf_writer_add_bool(w, "v.false", false);
    gguf_writer_add_string(w, "v.str", "hello");
    gguf_writer_add_string_n(w, "v.str_nul", "a\0b", 3);
    gguf_writer_add_string(w, "v.str_empty", "");
    gguf_writer_add_array(w, "a.u8", MOAS_META_UINT8, sample_u8, 3);
    gguf_writer_add_array(w, "a.i8", MOAS_META_INT8, sample_i8, 3);
    gguf_writer_add_array(w, "a.u16", MOAS_META_UINT16, sample_u16, 2);
    gguf_writer_add_array(w, "a.i16", MOAS_META_INT16, sample_i16, 2);
    gguf_writer_add_array(w, "a.u32", MOAS_META_UINT32, sample_u32, 3);
    gguf_writer_add_array(w, "a.i32", MOAS_META_INT32, sample_i32, 2);
    gguf_writer_add_array(w, "a.u64", MOAS_META_UINT64, sample_u64, 2);
    gguf_writer_add_array(w, "a.i64", MOAS_META_INT64, sample_i64, 2);
    gguf_writer_add_array(w, "a.f32", MOAS_META_FLOAT32, sample_f32, 3);
    gguf_writer_add_array(w, "a.f64", MOAS_META_FLOAT64, sample_f64, 2);
    gguf_writer_add_array(w, "a.bool", MOAS_META_BOOL, sample_bool, 3);
    gguf_writer_add_array(w, "a.empty", MOAS_META_UINT32, NULL, 0);
    gguf_writer_add_array_string(w, "a.str", sample_strs, 3);
    gguf_writer_add_array_string_n(w, "a.str_nul", sample_strs_nul, sample_strs_nul_len, 2);

    for (size_t i = 0; i < N_SAMPLE_TENSORS; i++) {
        uint8_t data[128];
        sample_tensor_bytes((int)i, data, sample_tensors[i].n_bytes);
        if (gguf_writer_add_tensor(w, sample_tensors[i].name, sample_tensors[i].type,
                                   sample_tensors[i].n_dims, sample_tensors[i].ne,
                                   data) != (int)i) {
            gguf_writer_free(w);
            return NULL;
        }
    }
    return w;
}

static uint8_t *sample_image(uint32_t alignment, size_t *size) {
    gguf_writer *w = sample_writer(alignment);
    uint8_t *image = w != NULL ? gguf_writer_finish(w, size) : NULL;
    gguf_writer_free(w);
    return image;
}

static int check_int_array(const moas_gguf *g, const char *key, moas_meta_type elem,
                           const int64_t *want, uint64_t n) {
    const moas_gguf_kv *kv = moas__gguf_find_kv(g, key);
    int64_t x;
    ASSERT_TRUE(kv != NULL);
    ASSERT_EQ(kv->value.type, MOAS_META_ARRAY);
    ASSERT_EQ(kv->value.elem_type, elem);
    ASSERT_EQ(kv->value.n, n);
    for (uint64_t i = 0; i < n; i++) {
        ASSERT_TRUE(moas__gguf_array_int(&kv->value, i, &x));
        ASSERT_EQ(x, want[i]);
    }
    ASSERT_TRUE(!moas__gguf_array_int(&kv->value, n, &x));
    ASSERT_TRUE(!moas__gguf_array_float(&kv->value, 0, &(double){0}));
    return TEST_PASS;
}

TEST(gguf_reads_every_value_type) {
    size_t size = 0;
    uint8_t *image = sample_image(64, &size);
    moas_gguf *g = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_TRUE(g != NULL);

    ASSERT_EQ(g->version, 3);
    ASSERT_EQ(g->alignment, 64);
    ASSERT_EQ(g->n_kv, N_SAMPLE_KV);
    ASSERT_EQ(g->n_tensors, N_SAMPLE_TENSORS);
    ASSERT_EQ(g->data_offset % 64, 0);
    ASSERT_EQ(g->data_offset + g->data_size, size);

    /* File order is kept. */
    ASSERT_STR_EQ(g->kv[0].key.text, "general.architecture");
    ASSERT_EQ(g->kv[0].key.len, 20);
    ASSERT_STR_EQ(g->kv[1].key.text, "general.alignment");
    ASSERT_EQ(g->kv[1].value.type, MOAS_META_UINT32);
    ASSERT_EQ(g->kv[1].value.v.u64, 64);
    ASSERT_STR_EQ(g->kv[N_SAMPLE_KV - 1].key.text, "a.str_nul");

    /* Scalars: widened by value. */
    const moas_gguf_kv *kv;
    int64_t i64;
    double f64;
    kv = moas__gguf_find_kv(g, "general.architecture");
    ASSERT_EQ(kv->value.type, MOAS_META_STRING);
    ASSERT_STR_EQ(kv->value.v.str.text, "moas");
    ASSERT_EQ(kv->value.v.str.len, 4);
    kv = moas__gguf_find_kv(g, "v.u8");
    ASSERT_EQ(kv->value.type, MOAS_META_UINT8);
    ASSERT_EQ(kv->value.v.u64, 200);
    kv = moas__gguf_find_kv(g, "v.i8");
    ASSERT_EQ(kv->value.type, MOAS_META_INT8);
    ASSERT_EQ(kv->value.v.i64, -100);
    kv = moas__gguf_find_kv(g, "v.u16");
    ASSERT_EQ(kv->value.type, MOAS_META_UINT16);
    ASSERT_EQ(kv->value.v.u64, 60000);
    kv = moas__gguf_find_kv(g, "v.i16");
    ASSERT_EQ(kv->value.type, MOAS_META_INT16);
    ASSERT_EQ(kv->value.v.i64, -30000);
    kv = moas__gguf_find_kv(g, "v.u32");
    ASSERT_EQ(kv->value.type, MOAS_META_UINT32);
    ASSERT_EQ(kv->value.v.u64, 4000000000u);
    ASSERT_TRUE(moas__gguf_value_int(&kv->value, &i64));
    ASSERT_EQ(i64, 4000000000u);
    kv = moas__gguf_find_kv(g, "v.i32");
    ASSERT_EQ(kv->value.type, MOAS_META_INT32);
    ASSERT_EQ(kv->value.v.i64, -2000000000);
    ASSERT_TRUE(moas__gguf_value_int(&kv->value, &i64));
    ASSERT_EQ(i64, -2000000000);
    kv = moas__gguf_find_kv(g, "v.u64");
    ASSERT_EQ(kv->value.type, MOAS_META_UINT64);
    ASSERT_TRUE(kv->value.v.u64 == UINT64_MAX);
    ASSERT_TRUE(!moas__gguf_value_int(&kv->value, &i64)); /* above INT64_MAX */
    kv = moas__gguf_find_kv(g, "v.i64");
    ASSERT_EQ(kv->value.type, MOAS_META_INT64);
    ASSERT_TRUE(kv->value.v.i64 == INT64_MIN);
    kv = moas__gguf_find_kv(g, "v.f32");
    ASSERT_EQ(kv->value.type, MOAS_META_FLOAT32);
    ASSERT_TRUE(kv->value.v.f64 == 1.5);
    ASSERT_TRUE(moas__gguf_value_float(&kv->value, &f64));
    ASSERT_TRUE(f64 == 1.5);
    ASSERT_TRUE(!moas__gguf_value_int(&kv->value, &i64));
    kv = moas__gguf_find_kv(g, "v.f64");
    ASSERT_EQ(kv->value.type, MOAS_META_FLOAT64);
    ASSERT_TRUE(kv->value.v.f64 == -2.25e300);
    kv = moas__gguf_find_kv(g, "v.true");
    ASSERT_EQ(kv->value.type, MOAS_META_BOOL);
    ASSERT_EQ(kv->value.v.u64, 1);
    ASSERT_TRUE(moas__gguf_value_int(&kv->value, &i64));
    ASSERT_EQ(i64, 1);
    ASSERT_TRUE(!moas__gguf_value_float(&kv->value, &f64));
    kv = moas__gguf_find_kv(g, "v.false");
    ASSERT_EQ(kv->value.v.u64, 0);
    kv = moas__gguf_find_kv(g, "v.str_nul");
    ASSERT_EQ(kv->value.v.str.len, 3);
    ASSERT_TRUE(memcmp(kv->value.v.str.text, "a\0b", 4) == 0); /* NUL-terminated too */
    kv = moas__gguf_find_kv(g, "v.str_empty");
    ASSERT_EQ(kv->value.type, MOAS_META_STRING);
    ASSERT_EQ(kv->value.v.str.len, 0);
    ASSERT_STR_EQ(kv->value.v.str.text, "");

    /* Arrays: numeric ones read in place, by index. */
    const int64_t w_u8[3] = {1, 2, 255}, w_i8[3] = {-1, -128, 127};
    const int64_t w_u16[2] = {0, 65535}, w_i16[2] = {-32768, 32767};
    const int64_t w_u32[3] = {4, 2, 1}, w_i32[2] = {INT32_MIN, INT32_MAX};
    const int64_t w_i64[2] = {INT64_MIN, INT64_MAX}, w_bool[3] = {1, 0, 1};
    if (check_int_array(g, "a.u8", MOAS_META_UINT8, w_u8, 3) ||
        check_int_array(g, "a.i8", MOAS_META_INT8, w_i8, 3) ||
        check_int_array(g, "a.u16", MOAS_META_UINT16, w_u16, 2) ||
        check_int_array(g, "a.i16", MOAS_META_INT16, w_i16, 2) ||
        check_int_array(g, "a.u32", MOAS_META_UINT32, w_u32, 3) ||
        check_int_array(g, "a.i32", MOAS_META_INT32, w_i32, 2) ||
        check_int_array(g, "a.i64", MOAS_META_INT64, w_i64, 2) ||
        check_int_array(g, "a.bool", MOAS_META_BOOL, w_bool, 3) ||
        check_int_array(g, "a.empty", MOAS_META_UINT32, NULL, 0)) {
        return TEST_FAIL;
    }
    kv = moas__gguf_find_kv(g, "a.u64");
    ASSERT_EQ(kv->value.elem_type, MOAS_META_UINT64);
    ASSERT_TRUE(!moas__gguf_array_int(&kv->value, 0, &i64)); /* UINT64_MAX does not fit */
    ASSERT_TRUE(moas__gguf_array_int(&kv->value, 1, &i64));
    ASSERT_EQ(i64, 5);
    ASSERT_TRUE(kv->value.v.raw >= image && kv->value.v.raw + 16 <= image + size);
    kv = moas__gguf_find_kv(g, "a.f32");
    ASSERT_EQ(kv->value.elem_type, MOAS_META_FLOAT32);
    ASSERT_EQ(kv->value.n, 3);
    for (uint64_t i = 0; i < 3; i++) {
        ASSERT_TRUE(moas__gguf_array_float(&kv->value, i, &f64));
        ASSERT_TRUE(f64 == (double)sample_f32[i]);
    }
    ASSERT_TRUE(!moas__gguf_array_float(&kv->value, 3, &f64));
    ASSERT_TRUE(!moas__gguf_array_int(&kv->value, 0, &i64));
    kv = moas__gguf_find_kv(g, "a.f64");
    ASSERT_TRUE(moas__gguf_array_float(&kv->value, 0, &f64));
    ASSERT_TRUE(f64 == -2.25e300);
    ASSERT_TRUE(moas__gguf_array_float(&kv->value, 1, &f64));
    ASSERT_TRUE(f64 == 1e-300);

    /* String arrays: copies, NUL-terminated, lengths kept. */
    kv = moas__gguf_find_kv(g, "a.str");
    ASSERT_EQ(kv->value.elem_type, MOAS_META_STRING);
    ASSERT_EQ(kv->value.n, 3);
    for (int i = 0; i < 3; i++) {
        ASSERT_STR_EQ(kv->value.v.strs[i].text, sample_strs[i]);
        ASSERT_EQ(kv->value.v.strs[i].len, strlen(sample_strs[i]));
        ASSERT_TRUE((const uint8_t *)kv->value.v.strs[i].text < image ||
                    (const uint8_t *)kv->value.v.strs[i].text >= image + size);
    }
    ASSERT_TRUE(!moas__gguf_array_int(&kv->value, 0, &i64));
    kv = moas__gguf_find_kv(g, "a.str_nul");
    ASSERT_EQ(kv->value.n, 2);
    ASSERT_EQ(kv->value.v.strs[0].len, 3);
    ASSERT_TRUE(memcmp(kv->value.v.strs[0].text, "a\0b", 4) == 0);
    ASSERT_EQ(kv->value.v.strs[1].len, 1);
    ASSERT_TRUE(memcmp(kv->value.v.strs[1].text, "\0", 2) == 0);
    /* Scalars are not arrays. */
    ASSERT_TRUE(!moas__gguf_array_int(&moas__gguf_find_kv(g, "v.u8")->value, 0, &i64));

    /* Tensors: shape, type, sizes, offsets and the bytes, in place. */
    uint64_t prev_end = 0;
    for (size_t i = 0; i < N_SAMPLE_TENSORS; i++) {
        const moas_gguf_tensor *t = &g->tensors[i];
        uint8_t want[128];
        uint64_t n_elements = 1;
        sample_tensor_bytes((int)i, want, sample_tensors[i].n_bytes);
        ASSERT_STR_EQ(t->name.text, sample_tensors[i].name);
        ASSERT_EQ(t->type, sample_tensors[i].type);
        ASSERT_EQ(t->n_dims, sample_tensors[i].n_dims);
        for (uint32_t d = 0; d < MOAS_GGUF_MAX_DIMS; d++) {
            const int64_t ne = d < t->n_dims ? sample_tensors[i].ne[d] : 1;
            ASSERT_EQ(t->ne[d], ne);
            n_elements *= (uint64_t)ne;
        }
        ASSERT_EQ(t->n_elements, n_elements);
        ASSERT_EQ(t->n_bytes, sample_tensors[i].n_bytes);
        ASSERT_EQ(t->offset % 64, 0);
        ASSERT_TRUE(t->offset >= prev_end);
        prev_end = t->offset + t->n_bytes;
        ASSERT_TRUE(t->data == image + g->data_offset + t->offset);
        ASSERT_TRUE(memcmp(t->data, want, t->n_bytes) == 0);
    }
    ASSERT_EQ(g->data_offset + prev_end, size); /* the writer leaves no tail */

    moas__gguf_free(g, NULL);
    free(image);
    return TEST_PASS;
}

TEST(gguf_lookups_find_and_miss) {
    size_t size = 0;
    uint8_t *image = sample_image(32, &size);
    moas_gguf *g = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));

    for (uint64_t i = 0; i < g->n_kv; i++) {
        ASSERT_TRUE(moas__gguf_find_kv(g, g->kv[i].key.text) == &g->kv[i]);
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const moas_gguf_tensor *t = moas__gguf_find_tensor(g, sample_tensors[i].name);
        ASSERT_TRUE(t == &g->tensors[i]);
        ASSERT_EQ(moas__gguf_tensor_index(g, t), (int64_t)i);
    }
    /* Misses: empty, prefixes, extensions, before the first and after the last. */
    static const char *const misses[] = {
        "", "general", "general.", "general.alignmen", "general.alignmentx", "v.u", "a",
        "0", "zzzz", "V.U8", "a.f32 ", "\xff",
    };
    for (size_t i = 0; i < sizeof misses / sizeof misses[0]; i++) {
        ASSERT_TRUE(moas__gguf_find_kv(g, misses[i]) == NULL);
        ASSERT_TRUE(moas__gguf_find_tensor(g, misses[i]) == NULL);
    }
    /* Keys and tensors are separate namespaces. */
    ASSERT_TRUE(moas__gguf_find_tensor(g, "v.u8") == NULL);
    ASSERT_TRUE(moas__gguf_find_kv(g, "b.f16") == NULL);
    ASSERT_TRUE(moas__gguf_find_kv(g, NULL) == NULL);
    ASSERT_TRUE(moas__gguf_find_tensor(g, NULL) == NULL);
    ASSERT_TRUE(moas__gguf_find_kv(NULL, "v.u8") == NULL);
    ASSERT_TRUE(moas__gguf_find_tensor(NULL, "a.f32") == NULL);
    /* tensor_index() knows only its own tensors. */
    moas_gguf_tensor other;
    memset(&other, 0, sizeof other);
    ASSERT_EQ(moas__gguf_tensor_index(g, &other), -1);
    ASSERT_EQ(moas__gguf_tensor_index(g, NULL), -1);
    ASSERT_EQ(moas__gguf_tensor_index(g, g->tensors + g->n_tensors), -1);
    ASSERT_EQ(moas__gguf_tensor_index(NULL, g->tensors), -1);

    moas__gguf_free(g, NULL);
    moas__gguf_free(NULL, NULL); /* a no-op */
    free(image);
    return TEST_PASS;
}

TEST(gguf_type_sizes_and_names) {
    uint64_t n = 0;
    ASSERT_TRUE(moas__type_row_bytes(MOAS_TYPE_F32, 5, &n));
    ASSERT_EQ(n, 20);
    ASSERT_TRUE(moas__type_row_bytes(MOAS_TYPE_F16, 5, &n));
    ASSERT_EQ(n, 10);
    ASSERT_TRUE(moas__type_row_bytes(MOAS_TYPE_BF16, 7, &n));
    ASSERT_EQ(n, 14);
    ASSERT_TRUE(moas__type_row_bytes(MOAS_TYPE_Q8_0, 32, &n));
    ASSERT_EQ(n, 34);
    ASSERT_TRUE(moas__type_row_bytes(MOAS_TYPE_Q8_0, 96, &n));
    ASSERT_EQ(n, 102);
    ASSERT_TRUE(!moas__type_row_bytes(MOAS_TYPE_Q8_0, 48, &n));
    ASSERT_TRUE(!moas__type_row_bytes(MOAS_TYPE_Q8_0, 31, &n));
    ASSERT_TRUE(!moas__type_row_bytes(MOAS_TYPE_F32, 0, &n));
    ASSERT_TRUE(!moas__type_row_bytes(MOAS_TYPE_F32, -4, &n));
    ASSERT_TRUE(!moas__type_row_bytes((moas_type)2, 32, &n));
    ASSERT_TRUE(moas__type_row_bytes(MOAS_TYPE_F32, INT64_MAX / 4, &n));
    ASSERT_TRUE(!moas__type_row_bytes(MOAS_TYPE_F32, INT64_MAX, &n)); /* 2^65 bytes */
    ASSERT_STR_EQ(moas__type_name(MOAS_TYPE_F32), "f32");
    ASSERT_STR_EQ(moas__type_name(MOAS_TYPE_F16), "f16");
    ASSERT_STR_EQ(moas__type_name(MOAS_TYPE_Q8_0), "q8_0");
    ASSERT_STR_EQ(moas__type_name(MOAS_TYPE_BF16), "bf16");
    ASSERT_STR_EQ(moas__type_name((moas_type)2), "q4_0");
    ASSERT_STR_EQ(moas__type_name((moas_type)4), "unknown");
    ASSERT_STR_EQ(moas__type_name((moas_type)1000), "unknown");
    ASSERT_STR_EQ(moas__meta_type_name(MOAS_META_UINT32), "uint32");
    ASSERT_STR_EQ(moas__meta_type_name(MOAS_META_FLOAT64), "float64");
    ASSERT_STR_EQ(moas__meta_type_name(MOAS_META_TYPE_COUNT), "unknown");
    return TEST_PASS;
}

TEST(gguf_accepts_minimal_files) {
    moas_gguf *g = NULL;
    size_t size = 0;

    /* A bare header: no keys, no tensors, no data section. */
    static const uint8_t header[24] = {'G', 'G', 'U', 'F', 3};
    ASSERT_OK(moas__gguf_parse(header, sizeof header, NULL, &g));
    ASSERT_EQ(g->n_kv, 0);
    ASSERT_EQ(g->n_tensors, 0);
    ASSERT_EQ(g->alignment, MOAS_GGUF_DEFAULT_ALIGNMENT);
    ASSERT_EQ(g->data_offset, 24);
    ASSERT_EQ(g->data_size, 0);
    ASSERT_TRUE(moas__gguf_find_kv(g, "x") == NULL);
    ASSERT_TRUE(moas__gguf_find_tensor(g, "x") == NULL);
    moas__gguf_free(g, NULL);

    /* Keys only: the padding before an empty data section may be missing. */
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    gguf_writer_add_string(w, "general.name", "no tensors");
    gguf_writer_skip_padding(w);
    uint8_t *image = gguf_writer_finish(w, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_TRUE(size % 32 != 0);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->n_kv, 1);
    ASSERT_EQ(g->data_offset, size);
    moas__gguf_free(g, NULL);
    free(image);

    /* Default alignment when the key is absent: tensors at multiples of 32. */
    const float data[3] = {1, 2, 3};
    const int64_t ne[1] = {3};
    gguf_writer_free(w);
    w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    ASSERT_TRUE(gguf_writer_add_tensor(w, "t0", MOAS_TYPE_F32, 1, ne, data) == 0);
    ASSERT_TRUE(gguf_writer_add_tensor(w, "t1", MOAS_TYPE_F32, 1, ne, data) == 1);
    image = gguf_writer_finish(w, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->alignment, 32);
    ASSERT_EQ(g->data_offset % 32, 0);
    ASSERT_EQ(g->tensors[0].offset, 0);
    ASSERT_EQ(g->tensors[1].offset, 32);
    ASSERT_TRUE(memcmp(g->tensors[1].data, data, sizeof data) == 0);
    moas__gguf_free(g, NULL);

    /* Bytes after the last tensor are allowed (ggml's writer pads the end too). */
    uint8_t *longer = calloc(1, size + 40);
    ASSERT_TRUE(longer != NULL);
    memcpy(longer, image, size);
    ASSERT_OK(moas__gguf_parse(longer, size + 40, NULL, &g));
    ASSERT_EQ(g->data_offset + g->data_size, size + 40);
    ASSERT_TRUE(g->tensors[1].data == longer + g->data_offset + 32);
    moas__gguf_free(g, NULL);
    free(longer);
    free(image);

    /* Directory order need not be data order, and gaps are allowed: swap offsets. */
    gguf_writer_override_offset(w, 0, 32);
    gguf_writer_override_offset(w, 1, 0);
    image = gguf_writer_finish(w, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->tensors[0].offset, 32);
    ASSERT_EQ(g->tensors[1].offset, 0);
    ASSERT_TRUE(g->tensors[0].data == image + g->data_offset + 32);
    moas__gguf_free(g, NULL);
    free(image);

    /* Alignment 1 is a power of two. */
    gguf_writer_free(w);
    w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    gguf_writer_set_alignment(w, 1);
    const int64_t ne1[1] = {1};
    ASSERT_TRUE(gguf_writer_add_tensor(w, "h0", MOAS_TYPE_F16, 1, ne1, NULL) == 0);
    ASSERT_TRUE(gguf_writer_add_tensor(w, "h1", MOAS_TYPE_F16, 1, ne1, NULL) == 1);
    image = gguf_writer_finish(w, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->alignment, 1);
    ASSERT_EQ(g->tensors[1].offset, 2);
    ASSERT_EQ(g->data_offset + 4, size);
    moas__gguf_free(g, NULL);
    free(image);
    gguf_writer_free(w);
    return TEST_PASS;
}

/* ---- the tiny model ------------------------------------------------------------- */

static int check_tensor_shape(const moas_gguf *g, const char *name, moas_type type,
                              int64_t ne0, int64_t ne1) {
    const moas_gguf_tensor *t = moas__gguf_find_tensor(g, name);
    if (t == NULL) {
        test_report(__FILE__, __LINE__, "find_tensor", "no tensor '%s'", name);
        return TEST_FAIL;
    }
    ASSERT_EQ(t->type, type);
    ASSERT_EQ(t->n_dims, ne1 == 1 ? 1 : 2);
    ASSERT_EQ(t->ne[0], ne0);
    ASSERT_EQ(t->ne[1], ne1);
    return TEST_PASS;
}

TEST(gguf_parses_tiny_model) {
    tiny_model_config cfg;
    size_t size = 0;
    moas_gguf *g = NULL;
    int64_t x;

    tiny_model_config_default(&cfg);
    uint8_t *image = tiny_model_image(&cfg, 7, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->n_tensors, tiny_model_n_tensors(&cfg));
    ASSERT_EQ(g->alignment, 64);
    ASSERT_STR_EQ(moas__gguf_find_kv(g, "general.architecture")->value.v.str.text, "moas");
    ASSERT_STR_EQ(moas__gguf_find_kv(g, "moas.attention.mixing")->value.v.str.text, "router");
    ASSERT_EQ(moas__gguf_find_kv(g, "moas.embedding_length")->value.v.u64, 16);
    ASSERT_EQ(moas__gguf_find_kv(g, "moas.router.hidden_length")->value.v.u64, 4);
    ASSERT_EQ(moas__gguf_find_kv(g, "moas.bias")->value.v.u64, 1);
    const moas_gguf_kv *kv = moas__gguf_find_kv(g, "moas.attention.scheme_kv_heads");
    ASSERT_TRUE(kv != NULL);
    ASSERT_EQ(kv->value.n, 3);
    ASSERT_TRUE(moas__gguf_array_int(&kv->value, 0, &x) && x == 4);
    ASSERT_TRUE(moas__gguf_array_int(&kv->value, 1, &x) && x == 2);
    ASSERT_TRUE(moas__gguf_array_int(&kv->value, 2, &x) && x == 1);
    kv = moas__gguf_find_kv(g, "tokenizer.ggml.tokens");
    ASSERT_EQ(kv->value.n, TINY_MODEL_DEFAULT_VOCAB);
    for (int i = 0; i < TINY_MODEL_DEFAULT_VOCAB; i++) {
        ASSERT_STR_EQ(kv->value.v.strs[i].text, tiny_model_default_vocab()[i]);
        ASSERT_TRUE(i == 0 || strcmp(kv->value.v.strs[i - 1].text, kv->value.v.strs[i].text) < 0);
    }
    if (check_tensor_shape(g, "token_embd.weight", MOAS_TYPE_F32, 16, 40) ||
        check_tensor_shape(g, "position_embd.weight", MOAS_TYPE_F32, 16, 32) ||
        check_tensor_shape(g, "blk.1.attn_q.0.weight", MOAS_TYPE_F32, 16, 16) ||
        check_tensor_shape(g, "blk.1.attn_k.0.weight", MOAS_TYPE_F32, 16, 16) ||
        check_tensor_shape(g, "blk.1.attn_k.1.weight", MOAS_TYPE_F32, 16, 8) ||
        check_tensor_shape(g, "blk.1.attn_v.2.weight", MOAS_TYPE_F32, 16, 4) ||
        check_tensor_shape(g, "blk.1.attn_v.2.bias", MOAS_TYPE_F32, 4, 1) ||
        check_tensor_shape(g, "blk.0.attn_router_up.weight", MOAS_TYPE_F32, 16, 4) ||
        check_tensor_shape(g, "blk.0.attn_router_down.weight", MOAS_TYPE_F32, 4, 3) ||
        check_tensor_shape(g, "blk.0.attn_router_down.bias", MOAS_TYPE_F32, 3, 1) ||
        check_tensor_shape(g, "blk.0.ffn_up.weight", MOAS_TYPE_F32, 16, 64) ||
        check_tensor_shape(g, "blk.0.ffn_down.weight", MOAS_TYPE_F32, 64, 16) ||
        check_tensor_shape(g, "output_norm.bias", MOAS_TYPE_F32, 16, 1)) {
        return TEST_FAIL;
    }
    ASSERT_TRUE(moas__gguf_find_tensor(g, "output.weight") == NULL); /* tied */
    /* Values as documented: matrices within 0.2, LayerNorm weights near 1. */
    const moas_gguf_tensor *t = moas__gguf_find_tensor(g, "blk.0.ffn_up.weight");
    const moas_gguf_tensor *ln = moas__gguf_find_tensor(g, "blk.0.ffn_norm.weight");
    float v, vmax = 0;
    for (uint64_t i = 0; i < t->n_elements; i++) {
        memcpy(&v, t->data + 4 * i, 4);
        ASSERT_TRUE(fabsf(v) <= 0.2f);
        vmax = fmaxf(vmax, fabsf(v));
    }
    ASSERT_TRUE(vmax > 0.1f);
    for (uint64_t i = 0; i < ln->n_elements; i++) {
        memcpy(&v, ln->data + 4 * i, 4);
        ASSERT_TRUE(v >= 0.9f && v <= 1.1f);
    }
    moas__gguf_free(g, NULL);
    free(image);

    /* Variants: untied, no bias, mean mixing, F16 and Q8_0 matrices, a custom vocab. */
    static const char *const vocab[4] = {"a", "b", "\xc3\xa9", "\xe2\x82\xac"};
    tiny_model_config_default(&cfg);
    cfg.tied = false;
    cfg.bias = false;
    cfg.mixing = MOAS_MIXING_MEAN;
    cfg.mat_type = MOAS_TYPE_F16;
    cfg.emb_type = MOAS_TYPE_F16;
    cfg.vocab = vocab;
    cfg.n_vocab = 4;
    image = tiny_model_image(&cfg, 7, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->n_tensors, tiny_model_n_tensors(&cfg));
    ASSERT_TRUE(moas__gguf_find_kv(g, "moas.router.hidden_length") == NULL);
    ASSERT_TRUE(moas__gguf_find_tensor(g, "blk.0.attn_router_up.weight") == NULL);
    ASSERT_TRUE(moas__gguf_find_tensor(g, "blk.0.ffn_up.bias") == NULL);
    ASSERT_STR_EQ(moas__gguf_find_kv(g, "tokenizer.ggml.tokens")->value.v.strs[3].text,
                  "\xe2\x82\xac");
    if (check_tensor_shape(g, "output.weight", MOAS_TYPE_F16, 16, 4) ||
        check_tensor_shape(g, "token_embd.weight", MOAS_TYPE_F16, 16, 4) ||
        check_tensor_shape(g, "output_norm.weight", MOAS_TYPE_F32, 16, 1)) {
        return TEST_FAIL;
    }
    moas__gguf_free(g, NULL);
    free(image);

    tiny_model_config_default(&cfg);
    cfg.n_embd = 32;
    cfg.router_hidden = 32;
    cfg.mat_type = MOAS_TYPE_Q8_0;
    cfg.omit_tensor = "blk.1.ffn_down.bias";
    cfg.omit_key = "general.name";
    image = tiny_model_image(&cfg, 7, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->n_tensors, tiny_model_n_tensors(&cfg) - 1);
    ASSERT_TRUE(moas__gguf_find_tensor(g, "blk.1.ffn_down.bias") == NULL);
    ASSERT_TRUE(moas__gguf_find_kv(g, "general.name") == NULL);
    t = moas__gguf_find_tensor(g, "blk.1.ffn_down.weight");
    ASSERT_EQ(t->type, MOAS_TYPE_Q8_0);
    ASSERT_EQ(t->n_bytes, 64 / 32 * 34 * 32);
    moas__gguf_free(g, NULL);
    free(image);

    /* Q8_0 needs rows of a multiple of 32: the default n_embd 16 cannot be built. */
    tiny_model_config_default(&cfg);
    cfg.mat_type = MOAS_TYPE_Q8_0;
    ASSERT_TRUE(tiny_model_image(&cfg, 7, &size) == NULL);
    return TEST_PASS;
}

TEST(gguf_tiny_model_is_deterministic) {
    size_t a_size = 0, b_size = 0, c_size = 0;
    uint8_t *a = tiny_model_image(NULL, 11, &a_size);
    uint8_t *b = tiny_model_image(NULL, 11, &b_size);
    uint8_t *c = tiny_model_image(NULL, 12, &c_size);
    ASSERT_TRUE(a != NULL && b != NULL && c != NULL);
    ASSERT_EQ(a_size, b_size);
    ASSERT_EQ(a_size, c_size);
    ASSERT_TRUE(memcmp(a, b, a_size) == 0);
    ASSERT_TRUE(memcmp(a, c, a_size) != 0);
    free(a);
    free(b);
    free(c);
    /* Half conversions round to nearest even and round-trip every half. */
    ASSERT_EQ(tiny_model_f32_to_f16(1.0f), 0x3c00);
    ASSERT_EQ(tiny_model_f32_to_f16(-2.0f), 0xc000);
    ASSERT_EQ(tiny_model_f32_to_f16(65504.0f), 0x7bff);
    ASSERT_EQ(tiny_model_f32_to_f16(1e6f), 0x7c00);
    ASSERT_EQ(tiny_model_f32_to_f16(5.9604645e-8f), 0x0001);
    ASSERT_EQ(tiny_model_f32_to_f16(1.0f + 1.0f / 2048), 0x3c00); /* tie to even */
    ASSERT_EQ(tiny_model_f32_to_f16(1.0f + 3.0f / 2048), 0x3c02);
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0) {
            continue; /* NaN */
        }
        ASSERT_EQ(tiny_model_f32_to_f16(tiny_model_f16_to_f32((uint16_t)h)), h);
    }
    return TEST_PASS;
}

/* ---- malformed files ------------------------------------------------------------- */

typedef enum {
    BAD_MAGIC,
    EMPTY_FILE,
    SHORT_MAGIC,
    VERSION_1,
    VERSION_2,
    VERSION_4,
    VERSION_BIG_ENDIAN,
    TRUNCATED_HEADER,
    HUGE_N_TENSORS,
    HUGE_N_KV,
    N_KV_ONE_TOO_MANY,
    N_TENSORS_ONE_TOO_MANY,
    KEY_LENGTH_PAST_END,
    EMPTY_KEY,
    KEY_TOO_LONG,
    KEY_WITH_NUL,
    DUPLICATE_KEY,
    UNKNOWN_VALUE_TYPE,
    HUGE_VALUE_TYPE,
    NESTED_ARRAY,
    UNKNOWN_ARRAY_TYPE,
    ARRAY_LENGTH_PAST_END,
    HUGE_STRING_ARRAY_COUNT,
    STRING_ARRAY_COUNT_PAST_END,
    STRING_ARRAY_ELEMENT_PAST_END,
    STRING_VALUE_PAST_END,
    STRING_TOO_LONG,
    SCALAR_PAST_END,
    BOOL_NOT_0_OR_1,
    BOOL_ARRAY_NOT_0_OR_1,
    ALIGNMENT_NOT_POWER_OF_TWO,
    ALIGNMENT_ZERO,
    ALIGNMENT_INT32,
    ALIGNMENT_UINT64,
    N_DIMS_0,
    N_DIMS_5,
    ZERO_DIM,
    NEGATIVE_DIM,
    ELEMENT_COUNT_OVERFLOW,
    BYTE_SIZE_OVERFLOW,
    UNKNOWN_TENSOR_TYPE,
    HUGE_TENSOR_TYPE,
    Q8_0_ROW_NOT_MULTIPLE_OF_32,
    EMPTY_TENSOR_NAME,
    TENSOR_NAME_TOO_LONG,
    TENSOR_NAME_WITH_NUL,
    DUPLICATE_TENSOR_NAME,
    OFFSET_NOT_ALIGNED,
    TENSOR_PAST_END,
    TENSOR_OFFSET_HUGE,
    OVERLAPPING_TENSORS,
    MISSING_PADDING,
    DATA_SECTION_PAST_END,
    BAD_CASE_COUNT
} bad_case;

static const struct {
    const char *name;
    moas_status want;
    const char *needle;   /* the message must mention this ... */
    const char *needle2;  /* ... and this, unless NULL */
} bad_cases[BAD_CASE_COUNT] = {
    [BAD_MAGIC] = {"bad magic", MOAS_ERR_BAD_FORMAT, "magic", NULL},
    [EMPTY_FILE] = {"empty file", MOAS_ERR_CORRUPT, "magic", NULL},
    [SHORT_MAGIC] = {"file of 2 bytes", MOAS_ERR_CORRUPT, "magic", NULL},
    [VERSION_1] = {"version 1", MOAS_ERR_BAD_FORMAT, "version 1 ", NULL},
    [VERSION_2] = {"version 2", MOAS_ERR_BAD_FORMAT, "version 2 ", NULL},
    [VERSION_4] = {"version 4", MOAS_ERR_BAD_FORMAT, "version 4 ", NULL},
    [VERSION_BIG_ENDIAN] = {"big-endian version", MOAS_ERR_BAD_FORMAT, "big-endian", NULL},
    [TRUNCATED_HEADER] = {"truncated header", MOAS_ERR_CORRUPT, "n_kv", NULL},
    [HUGE_N_TENSORS] = {"huge n_tensors", MOAS_ERR_CORRUPT, "n_tensors 18446744073709551615", NULL},
    [HUGE_N_KV] = {"huge n_kv", MOAS_ERR_CORRUPT, "n_kv 1099511627776", NULL},
    [N_KV_ONE_TOO_MANY] = {"n_kv one too many", MOAS_ERR_CORRUPT, "metadata entry 2", NULL},
    [N_TENSORS_ONE_TOO_MANY] = {"n_tensors one too many", MOAS_ERR_CORRUPT, "tensor entry 3", NULL},
    [KEY_LENGTH_PAST_END] = {"key length past end", MOAS_ERR_CORRUPT, "key needs 200 bytes", NULL},
    [EMPTY_KEY] = {"empty key", MOAS_ERR_CORRUPT, "empty key", NULL},
    [KEY_TOO_LONG] = {"key too long", MOAS_ERR_CORRUPT, "key of 257 bytes", NULL},
    [KEY_WITH_NUL] = {"key with NUL", MOAS_ERR_CORRUPT, "key at offset", "NUL byte at position 3"},
    [DUPLICATE_KEY] = {"duplicate key", MOAS_ERR_CORRUPT, "duplicate key 'general.name'", NULL},
    [UNKNOWN_VALUE_TYPE] = {"unknown value type", MOAS_ERR_CORRUPT, "value type 13", NULL},
    [HUGE_VALUE_TYPE] = {"huge value type", MOAS_ERR_CORRUPT, "value type 4294967295", NULL},
    [NESTED_ARRAY] = {"nested array", MOAS_ERR_CORRUPT, "nested array", NULL},
    [UNKNOWN_ARRAY_TYPE] = {"unknown array type", MOAS_ERR_CORRUPT, "element type 13", NULL},
    [ARRAY_LENGTH_PAST_END] = {"array length past end", MOAS_ERR_CORRUPT,
                               "array of 1000 uint32", NULL},
    [HUGE_STRING_ARRAY_COUNT] = {"huge string array", MOAS_ERR_CORRUPT,
                                 "array of 4611686018427387904 strings", NULL},
    [STRING_ARRAY_COUNT_PAST_END] = {"string array count past end", MOAS_ERR_CORRUPT,
                                     "array of 10 strings", "cannot fit in the 18 bytes"},
    [STRING_ARRAY_ELEMENT_PAST_END] = {"string array element past end", MOAS_ERR_CORRUPT,
                                       "array string needs 500 bytes", NULL},
    [STRING_VALUE_PAST_END] = {"string past end", MOAS_ERR_CORRUPT,
                               "string value needs 100 bytes", NULL},
    [STRING_TOO_LONG] = {"string too long", MOAS_ERR_CORRUPT,
                         "string value of 16777217 bytes", NULL},
    [SCALAR_PAST_END] = {"scalar past end", MOAS_ERR_CORRUPT, "value needs 8 bytes", NULL},
    [BOOL_NOT_0_OR_1] = {"bool 2", MOAS_ERR_CORRUPT, "bool value 2", NULL},
    [BOOL_ARRAY_NOT_0_OR_1] = {"bool array with 255", MOAS_ERR_CORRUPT, "bool value 255", NULL},
    [ALIGNMENT_NOT_POWER_OF_TWO] = {"alignment 48", MOAS_ERR_CORRUPT,
                                    "'general.alignment' is 48", NULL},
    [ALIGNMENT_ZERO] = {"alignment 0", MOAS_ERR_CORRUPT, "'general.alignment' is 0", NULL},
    [ALIGNMENT_INT32] = {"alignment int32", MOAS_ERR_CORRUPT,
                         "'general.alignment' has type int32", NULL},
    [ALIGNMENT_UINT64] = {"alignment uint64", MOAS_ERR_CORRUPT,
                          "'general.alignment' has type uint64", NULL},
    [N_DIMS_0] = {"n_dims 0", MOAS_ERR_CORRUPT, "n_dims 0", NULL},
    [N_DIMS_5] = {"n_dims 5", MOAS_ERR_CORRUPT, "n_dims 5", NULL},
    [ZERO_DIM] = {"zero dim", MOAS_ERR_CORRUPT, "ne[1] = 0", NULL},
    [NEGATIVE_DIM] = {"negative dim", MOAS_ERR_CORRUPT, "ne[1] = -3", NULL},
    [ELEMENT_COUNT_OVERFLOW] = {"element count overflow", MOAS_ERR_CORRUPT,
                                "element count overflows", NULL},
    [BYTE_SIZE_OVERFLOW] = {"byte size overflow", MOAS_ERR_CORRUPT, "byte size overflows", NULL},
    [UNKNOWN_TENSOR_TYPE] = {"tensor type 2", MOAS_ERR_UNSUPPORTED, "type 2 (q4_0)", NULL},
    [HUGE_TENSOR_TYPE] = {"tensor type 1000", MOAS_ERR_UNSUPPORTED, "type 1000", NULL},
    [Q8_0_ROW_NOT_MULTIPLE_OF_32] = {"q8_0 row of 48", MOAS_ERR_CORRUPT, "ne[0] = 48", NULL},
    [EMPTY_TENSOR_NAME] = {"empty tensor name", MOAS_ERR_CORRUPT, "empty tensor name", NULL},
    [TENSOR_NAME_TOO_LONG] = {"tensor name too long", MOAS_ERR_CORRUPT,
                              "tensor name of 257 bytes", NULL},
    [TENSOR_NAME_WITH_NUL] = {"tensor name with NUL", MOAS_ERR_CORRUPT, "tensor name at offset",
                              "NUL byte at position 2"},
    [DUPLICATE_TENSOR_NAME] = {"duplicate tensor", MOAS_ERR_CORRUPT,
                               "duplicate tensor name 'w.1'", NULL},
    [OFFSET_NOT_ALIGNED] = {"offset not aligned", MOAS_ERR_CORRUPT,
                            "'w.1': offset 68 is not a multiple", NULL},
    [TENSOR_PAST_END] = {"tensor past end", MOAS_ERR_CORRUPT, "tensor 't' data [",
                         "ends past the file"},
    [TENSOR_OFFSET_HUGE] = {"tensor offset huge", MOAS_ERR_CORRUPT, "tensor 'w.2' data (",
                            "ends past the file"},
    [OVERLAPPING_TENSORS] = {"overlapping tensors", MOAS_ERR_CORRUPT, "tensors 'w.0'",
                             "and 'w.1' ["},
    [MISSING_PADDING] = {"missing padding", MOAS_ERR_CORRUPT, "tensor 'w.2' data [",
                         "ends past the file"},
    [DATA_SECTION_PAST_END] = {"data section past end", MOAS_ERR_CORRUPT,
                               "data section at offset", NULL},
};

/* A small valid file the cases break: two keys, three F32 tensors at alignment 32
 * (w.0 [16] at 0, w.1 [4, 2] at 64, w.2 [5] at 96). */
static gguf_writer *base_writer(bool with_tensors) {
    gguf_writer *w = gguf_writer_create();
    const int64_t ne0[1] = {16}, ne1[2] = {4, 2}, ne2[1] = {5};
    if (w == NULL) {
        return NULL;
    }
    gguf_writer_add_string(w, "general.architecture", "moas");
    gguf_writer_add_string(w, "general.name", "bad");
    if (with_tensors) {
        gguf_writer_add_tensor(w, "w.0", MOAS_TYPE_F32, 1, ne0, NULL);
        gguf_writer_add_tensor(w, "w.1", MOAS_TYPE_F32, 2, ne1, NULL);
        gguf_writer_add_tensor(w, "w.2", MOAS_TYPE_F32, 1, ne2, NULL);
    }
    return w;
}

/* Build the image for `which`, or NULL when out of memory. The cases about tensor
 * data start from the file with three tensors. The others start from the keys only,
 * without padding, so that what a case appends is the last thing in the file. */
static uint8_t *build_bad(bad_case which, size_t *size) {
    const bool with_tensors = which >= DUPLICATE_TENSOR_NAME || which == N_TENSORS_ONE_TOO_MANY;
    gguf_writer *w = base_writer(with_tensors);
    bytes b = {{0}, 0};
    uint64_t ne[8] = {4, 4, 4, 4, 4, 4, 4, 4};
    char name[300];
    uint8_t *image = NULL;
    size_t cut = SIZE_MAX;  /* truncate the image here */

    if (w == NULL) {
        return NULL;
    }
    if (!with_tensors) {
        gguf_writer_skip_padding(w);
    }
    switch (which) {
    case BAD_MAGIC:
        gguf_writer_override_magic(w, "GGUX");
        break;
    case EMPTY_FILE:
        cut = 0;
        break;
    case SHORT_MAGIC:
        cut = 2;
        break;
    case VERSION_1:
        gguf_writer_override_version(w, 1);
        break;
    case VERSION_2:
        gguf_writer_override_version(w, 2);
        break;
    case VERSION_4:
        gguf_writer_override_version(w, 4);
        break;
    case VERSION_BIG_ENDIAN:
        gguf_writer_override_version(w, 0x03000000u);
        break;
    case TRUNCATED_HEADER:
        cut = 20;
        break;
    case HUGE_N_TENSORS:
        gguf_writer_override_n_tensors(w, UINT64_MAX);
        break;
    case HUGE_N_KV:
        gguf_writer_override_n_kv(w, (uint64_t)1 << 40);
        break;
    case N_KV_ONE_TOO_MANY:
        gguf_writer_override_n_kv(w, 3);
        break;
    case N_TENSORS_ONE_TOO_MANY:
        gguf_writer_override_n_tensors(w, 4);  /* the fourth entry reads padding */
        break;
    case KEY_LENGTH_PAST_END:
        b_le(&b, 200, 8);
        b_raw(&b, "abc", 3);
        gguf_writer_add_meta_raw(w, b.b, b.n, 1);
        break;
    case EMPTY_KEY:
        gguf_writer_add_kv_raw(w, "", 0, MOAS_META_UINT8, "\1", 1);
        break;
    case KEY_TOO_LONG:
        memset(name, 'k', 257);
        gguf_writer_add_kv_raw(w, name, 257, MOAS_META_UINT8, "\1", 1);
        break;
    case KEY_WITH_NUL:
        gguf_writer_add_kv_raw(w, "gen\0ral", 7, MOAS_META_UINT8, "\1", 1);
        break;
    case DUPLICATE_KEY:
        gguf_writer_add_u32(w, "x.other", 1);
        gguf_writer_add_string(w, "general.name", "again");
        break;
    case UNKNOWN_VALUE_TYPE:
        gguf_writer_add_kv_raw(w, "x.bad", 5, 13, "\0\0\0\0", 4);
        break;
    case HUGE_VALUE_TYPE:
        gguf_writer_add_kv_raw(w, "x.bad", 5, UINT32_MAX, "\0\0\0\0", 4);
        break;
    case NESTED_ARRAY:
        b_le(&b, MOAS_META_ARRAY, 4);
        b_le(&b, 1, 8);
        b_le(&b, MOAS_META_UINT8, 4);
        b_le(&b, 1, 8);
        b_le(&b, 7, 1);
        gguf_writer_add_kv_raw(w, "x.nested", 8, MOAS_META_ARRAY, b.b, b.n);
        break;
    case UNKNOWN_ARRAY_TYPE:
        b_le(&b, 13, 4);
        b_le(&b, 0, 8);
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_ARRAY, b.b, b.n);
        break;
    case ARRAY_LENGTH_PAST_END:
        b_le(&b, MOAS_META_UINT32, 4);
        b_le(&b, 1000, 8);
        b_le(&b, 1, 4);
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_ARRAY, b.b, b.n);
        break;
    case HUGE_STRING_ARRAY_COUNT:
        b_le(&b, MOAS_META_STRING, 4);
        b_le(&b, (uint64_t)1 << 62, 8);
        b_str(&b, "a");
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_ARRAY, b.b, b.n);
        break;
    case STRING_ARRAY_COUNT_PAST_END:
        b_le(&b, MOAS_META_STRING, 4);
        b_le(&b, 10, 8);  /* 10 strings need at least 80 bytes; 18 follow */
        b_str(&b, "a");
        b_str(&b, "b");
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_ARRAY, b.b, b.n);
        break;
    case STRING_ARRAY_ELEMENT_PAST_END:
        b_le(&b, MOAS_META_STRING, 4);
        b_le(&b, 2, 8);
        b_str(&b, "a");
        b_le(&b, 500, 8);
        b_raw(&b, "b", 1);
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_ARRAY, b.b, b.n);
        break;
    case STRING_VALUE_PAST_END:
        b_le(&b, 100, 8);
        b_raw(&b, "abc", 3);
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_STRING, b.b, b.n);
        break;
    case STRING_TOO_LONG:
        b_le(&b, MOAS_GGUF_MAX_STRING + 1u, 8);
        b_raw(&b, "abc", 3);
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_STRING, b.b, b.n);
        break;
    case SCALAR_PAST_END:
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_UINT64, "\1\2\3", 3);
        break;
    case BOOL_NOT_0_OR_1:
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_BOOL, "\2", 1);
        break;
    case BOOL_ARRAY_NOT_0_OR_1:
        b_le(&b, MOAS_META_BOOL, 4);
        b_le(&b, 3, 8);
        b_raw(&b, "\1\0\377", 3);
        gguf_writer_add_kv_raw(w, "x.bad", 5, MOAS_META_ARRAY, b.b, b.n);
        break;
    case ALIGNMENT_NOT_POWER_OF_TWO:
        gguf_writer_set_alignment(w, 48);
        break;
    case ALIGNMENT_ZERO:
        gguf_writer_add_u32(w, "general.alignment", 0);
        break;
    case ALIGNMENT_INT32:
        gguf_writer_add_i32(w, "general.alignment", 32);
        break;
    case ALIGNMENT_UINT64:
        gguf_writer_add_u64(w, "general.alignment", 32);
        break;
    case N_DIMS_0:
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 0, ne, NULL, 4);
        break;
    case N_DIMS_5:
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 5, ne, NULL, 4 << 10);
        break;
    case ZERO_DIM:
        ne[1] = 0;
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 2, ne, NULL, 16);
        break;
    case NEGATIVE_DIM:
        ne[1] = (uint64_t)-3;
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 2, ne, NULL, 16);
        break;
    case ELEMENT_COUNT_OVERFLOW:
        ne[0] = ne[1] = (uint64_t)1 << 32;
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 2, ne, NULL, 16);
        break;
    case BYTE_SIZE_OVERFLOW:
        ne[0] = ne[1] = (uint64_t)1 << 31;
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 2, ne, NULL, 16);
        break;
    case UNKNOWN_TENSOR_TYPE:
        ne[0] = 32;
        gguf_writer_add_tensor_raw(w, "t", 1, 2, 1, ne, NULL, 18);
        break;
    case HUGE_TENSOR_TYPE:
        gguf_writer_add_tensor_raw(w, "t", 1, 1000, 1, ne, NULL, 16);
        break;
    case Q8_0_ROW_NOT_MULTIPLE_OF_32:
        ne[0] = 48;
        ne[1] = 2;
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_Q8_0, 2, ne, NULL, 102);
        break;
    case EMPTY_TENSOR_NAME:
        gguf_writer_add_tensor_raw(w, "", 0, MOAS_TYPE_F32, 1, ne, NULL, 16);
        break;
    case TENSOR_NAME_TOO_LONG:
        memset(name, 't', 257);
        gguf_writer_add_tensor_raw(w, name, 257, MOAS_TYPE_F32, 1, ne, NULL, 16);
        break;
    case TENSOR_NAME_WITH_NUL:
        gguf_writer_add_tensor_raw(w, "w.\0x", 4, MOAS_TYPE_F32, 1, ne, NULL, 16);
        break;
    case DUPLICATE_TENSOR_NAME:
        ne[1] = 2;
        gguf_writer_add_tensor_raw(w, "w.1", 3, MOAS_TYPE_F32, 2, ne, NULL, 32);
        break;
    case OFFSET_NOT_ALIGNED:
        gguf_writer_override_offset(w, 1, 68);
        break;
    case TENSOR_PAST_END:
        ne[0] = 100;  /* 400 bytes, of which 16 are in the file */
        gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 1, ne, NULL, 16);
        break;
    case TENSOR_OFFSET_HUGE:
        gguf_writer_override_offset(w, 2, UINT64_MAX - 31);
        break;
    case OVERLAPPING_TENSORS:
        gguf_writer_override_offset(w, 1, 32);  /* w.0 covers [0, 64) */
        break;
    case MISSING_PADDING:
        gguf_writer_skip_padding(w);
        break;
    case DATA_SECTION_PAST_END:
        /* A 2-byte tensor that fits after the directory, but not after the padding. */
        gguf_writer_free(w);
        w = base_writer(false);
        if (w == NULL) {
            return NULL;
        }
        ne[0] = 1;
        gguf_writer_add_tensor_raw(w, "h", 1, MOAS_TYPE_F16, 1, ne, NULL, 2);
        cut = gguf_writer_directory_end(w) + 2;
        break;
    case BAD_CASE_COUNT:
        break;
    }
    image = gguf_writer_finish(w, size);
    gguf_writer_free(w);
    if (image != NULL && cut < *size) {
        *size = cut;
    }
    return image;
}

/* Parse one broken file; report and fail unless it fails exactly as the table says. */
static int check_bad(bad_case which) {
    size_t size = 0;
    uint8_t *image = build_bad(which, &size);
    moas_gguf *g = &sentinel_gguf;
    const char *name = bad_cases[which].name;

    if (image == NULL) {
        test_report(__FILE__, __LINE__, name, "could not build the image");
        return TEST_FAIL;
    }
    moas__set_error("%s", "");
    const moas_status st = moas__gguf_parse(image, size, NULL, &g);
    const char *msg = moas_last_error();
    int rc = TEST_PASS;
    if (st != bad_cases[which].want) {
        test_report(__FILE__, __LINE__, name, "status %d (%s), want %d; message: %s", (int)st,
                    moas_status_string(st), (int)bad_cases[which].want, msg);
        rc = TEST_FAIL;
    } else if (g != NULL) {
        test_report(__FILE__, __LINE__, name, "*out is not NULL after a failure");
        rc = TEST_FAIL;
    } else if (strncmp(msg, "gguf: ", 6) != 0 || strstr(msg, bad_cases[which].needle) == NULL ||
               (bad_cases[which].needle2 != NULL &&
                strstr(msg, bad_cases[which].needle2) == NULL)) {
        test_report(__FILE__, __LINE__, name, "message \"%s\" does not mention \"%s\" and \"%s\"",
                    msg, bad_cases[which].needle,
                    bad_cases[which].needle2 ? bad_cases[which].needle2 : "");
        rc = TEST_FAIL;
    }
    if (rc == TEST_FAIL && g != NULL && g != &sentinel_gguf) {
        moas__gguf_free(g, NULL);
    }
    free(image);
    return rc;
}

TEST(gguf_rejects_malformed_files) {
    int failed = 0;
    for (int i = 0; i < BAD_CASE_COUNT; i++) {
        ASSERT_TRUE(bad_cases[i].name != NULL);
        failed |= check_bad((bad_case)i);
    }
    return failed ? TEST_FAIL : TEST_PASS;
}

/* The base file of the table is itself valid, so each case fails for its own reason. */
TEST(gguf_malformed_cases_start_from_valid_files) {
    for (int with_tensors = 0; with_tensors < 2; with_tensors++) {
        gguf_writer *w = base_writer(with_tensors != 0);
        size_t size = 0;
        moas_gguf *g = NULL;
        ASSERT_TRUE(w != NULL);
        uint8_t *image = gguf_writer_finish(w, &size);
        ASSERT_TRUE(image != NULL);
        ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
        ASSERT_EQ(g->n_tensors, with_tensors ? 3 : 0);
        if (with_tensors) {
            ASSERT_EQ(g->tensors[1].offset, 64);
            ASSERT_EQ(g->tensors[2].offset, 96);
        }
        moas__gguf_free(g, NULL);
        free(image);
        gguf_writer_free(w);
    }
    /* MISSING_PADDING and DATA_SECTION_PAST_END need padding to exist. */
    size_t padded = 0, unpadded = 0;
    gguf_writer *w = base_writer(true);
    ASSERT_TRUE(w != NULL);
    uint8_t *a = gguf_writer_finish(w, &padded);
    gguf_writer_skip_padding(w);
    uint8_t *b = gguf_writer_finish(w, &unpadded);
    ASSERT_TRUE(a != NULL && b != NULL);
    ASSERT_TRUE(unpadded < padded);
    free(a);
    free(b);
    gguf_writer_free(w);
    return TEST_PASS;
}

/* The limits are inclusive: a key and a tensor name of MOAS_GGUF_MAX_NAME bytes and a
 * string value of MOAS_GGUF_MAX_STRING bytes are read back whole (one byte more is
 * refused: KEY_TOO_LONG, TENSOR_NAME_TOO_LONG, STRING_TOO_LONG). */
TEST(gguf_names_and_strings_of_the_limit_length_are_read) {
    char name[MOAS_GGUF_MAX_NAME + 1];
    const uint64_t ne[1] = {4};
    size_t size = 0;
    moas_gguf *g = NULL;

    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    memset(name, 'k', MOAS_GGUF_MAX_NAME);
    name[MOAS_GGUF_MAX_NAME] = '\0';
    gguf_writer_add_kv_raw(w, name, MOAS_GGUF_MAX_NAME, MOAS_META_UINT8, "\7", 1);
    char *text = malloc(MOAS_GGUF_MAX_STRING);
    ASSERT_TRUE(text != NULL);
    memset(text, 's', MOAS_GGUF_MAX_STRING);
    gguf_writer_add_string_n(w, "v.long", text, MOAS_GGUF_MAX_STRING);
    memset(name, 't', MOAS_GGUF_MAX_NAME);
    ASSERT_EQ(gguf_writer_add_tensor_raw(w, name, MOAS_GGUF_MAX_NAME, MOAS_TYPE_F32, 1, ne,
                                         NULL, 16), 0);
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);

    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->n_kv, 2);
    ASSERT_EQ(g->n_tensors, 1);
    memset(name, 'k', MOAS_GGUF_MAX_NAME);
    const moas_gguf_kv *kv = moas__gguf_find_kv(g, name);
    ASSERT_TRUE(kv != NULL);
    ASSERT_EQ(kv->key.len, MOAS_GGUF_MAX_NAME);
    ASSERT_EQ(kv->value.v.u64, 7);
    kv = moas__gguf_find_kv(g, "v.long");
    ASSERT_TRUE(kv != NULL);
    ASSERT_EQ(kv->value.v.str.len, MOAS_GGUF_MAX_STRING);
    ASSERT_TRUE(memcmp(kv->value.v.str.text, text, MOAS_GGUF_MAX_STRING) == 0);
    memset(name, 't', MOAS_GGUF_MAX_NAME);
    const moas_gguf_tensor *t = moas__gguf_find_tensor(g, name);
    ASSERT_TRUE(t != NULL);
    ASSERT_EQ(t->name.len, MOAS_GGUF_MAX_NAME);
    ASSERT_EQ(t->n_bytes, 16);
    moas__gguf_free(g, NULL);
    free(image);
    free(text);
    return TEST_PASS;
}

/* A name holding a NUL byte is refused with the file offset of the name's first byte
 * (its 8-byte length before it) and the NUL's position in the name: here the key's
 * length is at 24, just after the header, so its text starts at 32. */
TEST(gguf_nul_in_a_name_names_the_offset_of_its_text) {
    bytes b = {{0}, 0};
    moas_gguf *g = &sentinel_gguf;

    b_raw(&b, "GGUF", 4);
    b_le(&b, 3, 4);            /* version */
    b_le(&b, 0, 8);            /* n_tensors */
    b_le(&b, 1, 8);            /* n_kv */
    b_le(&b, 7, 8);            /* offset 24: the key's length */
    b_raw(&b, "gen\0ral", 7); /* offset 32: its text, NUL at position 3 */
    b_le(&b, MOAS_META_UINT8, 4);
    b_le(&b, 1, 1);
    uint8_t *image = malloc(b.n);   /* exactly its size, for make asan */
    ASSERT_TRUE(image != NULL);
    memcpy(image, b.b, b.n);
    ASSERT_STATUS(moas__gguf_parse(image, b.n, NULL, &g), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(g == NULL);
    ASSERT_STR_EQ(moas_last_error(),
                  "gguf: metadata entry 0: key at offset 32 holds a NUL byte at position 3");
    free(image);
    return TEST_PASS;
}

/* Tensors may touch but not share a byte: at alignment 1, two 2-byte F16 tensors at
 * data offsets 0 and 1 overlap by one byte and are refused with both ranges as file
 * offsets; at offsets 0 and 2 they touch and are read. */
TEST(gguf_tensors_overlapping_by_one_byte_are_refused) {
    const uint64_t ne[1] = {1};
    size_t size = 0;
    moas_gguf *g = &sentinel_gguf;
    char want[160];

    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    gguf_writer_set_alignment(w, 1);
    ASSERT_EQ(gguf_writer_add_tensor_raw(w, "h0", 2, MOAS_TYPE_F16, 1, ne, NULL, 2), 0);
    ASSERT_EQ(gguf_writer_add_tensor_raw(w, "h1", 2, MOAS_TYPE_F16, 1, ne, NULL, 2), 1);
    uint8_t *image = gguf_writer_finish(w, &size);
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    ASSERT_EQ(g->tensors[1].offset, 2);
    const size_t base = g->data_offset;
    moas__gguf_free(g, NULL);
    free(image);

    gguf_writer_override_offset(w, 1, 1);
    image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    g = &sentinel_gguf;
    ASSERT_STATUS(moas__gguf_parse(image, size, NULL, &g), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(g == NULL);
    snprintf(want, sizeof want, "gguf: tensors 'h0' [%zu, %zu) and 'h1' [%zu, %zu) overlap",
             base, base + 2, base + 1, base + 3);
    ASSERT_STR_EQ(moas_last_error(), want);
    free(image);
    return TEST_PASS;
}

/* A duplicate key is found wherever it sorts, the first pair included: a file of two
 * keys, both the same, is refused naming entries 0 and 1. */
TEST(gguf_duplicate_keys_that_sort_first_are_refused) {
    size_t size = 0;
    moas_gguf *g = &sentinel_gguf;

    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    gguf_writer_add_u32(w, "a.same", 1);
    gguf_writer_add_u32(w, "a.same", 2);
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    ASSERT_STATUS(moas__gguf_parse(image, size, NULL, &g), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(g == NULL);
    ASSERT_STR_EQ(moas_last_error(), "gguf: duplicate key 'a.same' (metadata entries 0 and 1)");
    free(image);
    return TEST_PASS;
}

/* ---- truncation, alignment, round trip -------------------------------------------- */

TEST(gguf_rejects_every_truncation) {
    size_t size = 0;
    uint8_t *image = tiny_model_image(NULL, 7, &size);
    moas_gguf *g = NULL;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
    moas__gguf_free(g, NULL);

    /* Each prefix sits at the very end of a buffer, so that ASan sees any read past it. */
    uint8_t *buffer = malloc(size);
    ASSERT_TRUE(buffer != NULL);
    for (size_t n = 0; n < size; n++) {
        uint8_t *prefix = buffer + (size - n);
        memcpy(prefix, image, n);
        g = &sentinel_gguf;
        moas__set_error("%s", "");
        const moas_status st = moas__gguf_parse(prefix, n, NULL, &g);
        if (st != MOAS_ERR_CORRUPT && st != MOAS_ERR_BAD_FORMAT) {
            test_report(__FILE__, __LINE__, "truncation", "prefix of %zu bytes: status %d",
                        n, (int)st);
            return TEST_FAIL;
        }
        ASSERT_TRUE(g == NULL);
        ASSERT_TRUE(moas_last_error()[0] != '\0');
    }
    free(buffer);
    free(image);
    return TEST_PASS;
}

/* The same for the file with every value type: prefixes that pass the header's count
 * bounds end inside metadata values of each kind. */
TEST(gguf_rejects_every_truncation_of_every_value_type) {
    size_t size = 0;
    uint8_t *image = sample_image(32, &size);
    ASSERT_TRUE(image != NULL);
    uint8_t *buffer = malloc(size);
    ASSERT_TRUE(buffer != NULL);
    for (size_t n = 0; n < size; n++) {
        uint8_t *prefix = buffer + (size - n);
        moas_gguf *g = &sentinel_gguf;
        memcpy(prefix, image, n);
        const moas_status st = moas__gguf_parse(prefix, n, NULL, &g);
        if (st != MOAS_ERR_CORRUPT && st != MOAS_ERR_BAD_FORMAT) {
            test_report(__FILE__, __LINE__, "truncation", "prefix of %zu bytes: status %d",
                        n, (int)st);
            return TEST_FAIL;
        }
        ASSERT_TRUE(g == NULL);
    }
    free(buffer);
    free(image);
    return TEST_PASS;
}

TEST(gguf_alignment_variants_agree) {
    static const uint32_t alignments[3] = {32, 64, 256};
    uint8_t *images[3] = {NULL, NULL, NULL};
    moas_gguf *g[3] = {NULL, NULL, NULL};
    tiny_model_config cfg;
    size_t size[3];

    for (int i = 0; i < 3; i++) {
        tiny_model_config_default(&cfg);
        cfg.alignment = alignments[i];
        images[i] = tiny_model_image(&cfg, 3, &size[i]);
        ASSERT_TRUE(images[i] != NULL);
        ASSERT_OK(moas__gguf_parse(images[i], size[i], NULL, &g[i]));
        ASSERT_EQ(g[i]->alignment, alignments[i]);
        ASSERT_EQ(g[i]->data_offset % alignments[i], 0);
    }
    ASSERT_TRUE(size[0] < size[2]);
    for (int i = 1; i < 3; i++) {
        ASSERT_EQ(g[i]->n_tensors, g[0]->n_tensors);
        ASSERT_EQ(g[i]->n_kv, g[0]->n_kv);
        for (uint64_t k = 0; k < g[0]->n_tensors; k++) {
            const moas_gguf_tensor *a = &g[0]->tensors[k], *b = &g[i]->tensors[k];
            ASSERT_STR_EQ(a->name.text, b->name.text);
            ASSERT_EQ(a->type, b->type);
            ASSERT_EQ(a->n_dims, b->n_dims);
            for (int d = 0; d < MOAS_GGUF_MAX_DIMS; d++) {
                ASSERT_EQ(a->ne[d], b->ne[d]);
            }
            ASSERT_EQ(a->n_bytes, b->n_bytes);
            ASSERT_EQ(b->offset % alignments[i], 0);
            ASSERT_TRUE(memcmp(a->data, b->data, a->n_bytes) == 0);
        }
    }
    for (int i = 0; i < 3; i++) {
        moas__gguf_free(g[i], NULL);
        free(images[i]);
    }
    return TEST_PASS;
}

/* What one random file holds, to compare with what the reader returns. */
#define RT_MAX_KV 24
#define RT_MAX_TENSORS 8
#define RT_MAX_ELEMS 12

typedef struct {
    char key[48];
    moas_meta_type type, elem_type;
    uint64_t n;
    uint64_t bits[RT_MAX_ELEMS];  /* scalar or elements: the value's bit pattern */
    char str[RT_MAX_ELEMS][16];   /* string or string elements */
    size_t len[RT_MAX_ELEMS];
} rt_kv;

typedef struct {
    char name[48];
    moas_type type;
    uint32_t n_dims;
    int64_t ne[4];
    uint8_t data[34 * 4 * 4 * 4];  /* the largest: Q8_0 [32, 4, 4, 4] */
    size_t n_bytes;
} rt_tensor;

static const size_t rt_size[MOAS_META_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

static moas_meta_type rt_scalar_type(uint64_t *s) {
    static const moas_meta_type types[] = {
        MOAS_META_UINT8, MOAS_META_INT8,  MOAS_META_UINT16, MOAS_META_INT16,
        MOAS_META_UINT32, MOAS_META_INT32, MOAS_META_FLOAT32, MOAS_META_BOOL,
        MOAS_META_STRING, MOAS_META_UINT64, MOAS_META_INT64,  MOAS_META_FLOAT64,
    };
    return types[below(s, sizeof types / sizeof types[0])];
}

/* A random value of `type` as bits (floats finite, bools 0/1). */
static uint64_t rt_bits(uint64_t *s, moas_meta_type type) {
    const uint64_t r = test_rng_next(s);
    switch (type) {
    case MOAS_META_BOOL:
        return r & 1u;
    case MOAS_META_FLOAT32: {
        const float f = (float)((double)(r >> 11) / 9007199254740992.0 * 2000.0 - 1000.0);
        uint32_t u;
        memcpy(&u, &f, 4);
        return u;
    }
    case MOAS_META_FLOAT64: {
        const double d = (double)(r >> 11) / 9007199254740992.0 * 2e10 - 1e10;
        uint64_t u;
        memcpy(&u, &d, 8);
        return u;
    }
    default:
        return rt_size[type] == 8 ? r : r & ((UINT64_C(1) << (8 * rt_size[type])) - 1u);
    }
}

static void rt_string(uint64_t *s, char *out, size_t *len) {
    *len = below(s, 16);
    for (size_t i = 0; i < *len; i++) {
        out[i] = (char)below(s, 256);  /* NUL bytes included */
    }
}

static void rt_add_kv(gguf_writer *w, const rt_kv *kv) {
    if (kv->type == MOAS_META_ARRAY) {
        if (kv->elem_type == MOAS_META_STRING) {
            const char *strs[RT_MAX_ELEMS];
            for (uint64_t i = 0; i < kv->n; i++) {
                strs[i] = kv->str[i];
            }
            gguf_writer_add_array_string_n(w, kv->key, strs, kv->len, (size_t)kv->n);
            return;
        }
        uint8_t host[RT_MAX_ELEMS * 8];
        const size_t size = rt_size[kv->elem_type];
        for (uint64_t i = 0; i < kv->n; i++) {
            /* Host order of a value of `size` bytes: copy from the matching C type. */
            const uint8_t u8 = (uint8_t)kv->bits[i];
            const uint16_t u16 = (uint16_t)kv->bits[i];
            const uint32_t u32 = (uint32_t)kv->bits[i];
            const void *src = size == 1 ? (const void *)&u8 :
                              size == 2 ? (const void *)&u16 :
                              size == 4 ? (const void *)&u32 : (const void *)&kv->bits[i];
            memcpy(host + i * size, src, size);
        }
        gguf_writer_add_array(w, kv->key, kv->elem_type, host, (size_t)kv->n);
        return;
    }
    if (kv->type == MOAS_META_STRING) {
        gguf_writer_add_string_n(w, kv->key, kv->str[0], kv->len[0]);
        return;
    }
    /* Scalars through the raw hook: the writer's LE encoding of the bit pattern. */
    uint8_t le[8];
    for (size_t i = 0; i < rt_size[kv->type]; i++) {
        le[i] = (uint8_t)(kv->bits[0] >> (8 * i));
    }
    gguf_writer_add_kv_raw(w, kv->key, strlen(kv->key), (uint32_t)kv->type, le,
                           rt_size[kv->type]);
}

/* The value of element `i` as the reader should report it. */
static int rt_check_elem(const moas_gguf_value *v, moas_meta_type type, uint64_t bits,
                         uint64_t i, bool array) {
    const size_t size = rt_size[type];
    if (type == MOAS_META_FLOAT32 || type == MOAS_META_FLOAT64) {
        double want, got;
        if (size == 4) {
            float f;
            const uint32_t u = (uint32_t)bits;
            memcpy(&f, &u, 4);
            want = f;
        } else {
            memcpy(&want, &bits, 8);
        }
        if (array) {
            ASSERT_TRUE(moas__gguf_array_float(v, i, &got));
        } else {
            ASSERT_TRUE(moas__gguf_value_float(v, &got));
        }
        ASSERT_TRUE(got == want);
        return TEST_PASS;
    }
    /* Integers: sign- or zero-extend the bit pattern. */
    const bool is_signed = type == MOAS_META_INT8 || type == MOAS_META_INT16 ||
                           type == MOAS_META_INT32 || type == MOAS_META_INT64;
    int64_t want;
    bool fits = true;
    if (is_signed) {
        uint64_t u = bits;
        if (size < 8 && (u >> (8 * size - 1)) & 1u) {
            u |= ~UINT64_C(0) << (8 * size);
        }
        memcpy(&want, &u, 8);
    } else {
        fits = bits <= (uint64_t)INT64_MAX;
        want = (int64_t)(bits & (uint64_t)INT64_MAX);
    }
    int64_t got = 0;
    const bool ok = array ? moas__gguf_array_int(v, i, &got) : moas__gguf_value_int(v, &got);
    ASSERT_EQ(ok, fits);
    if (fits) {
        ASSERT_EQ(got, want);
    }
    if (!array) {
        if (is_signed) {
            ASSERT_EQ(v->v.i64, want);
        } else {
            ASSERT_TRUE(v->v.u64 == bits);
        }
    }
    return TEST_PASS;
}

static int round_trip_once(uint64_t seed) {
    static rt_kv kvs[RT_MAX_KV];
    static rt_tensor tensors[RT_MAX_TENSORS];
    uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
    const uint32_t n_kv = below(&s, RT_MAX_KV + 1);
    const uint32_t n_tensors = below(&s, RT_MAX_TENSORS + 1);
    const uint32_t alignment = below(&s, 3) == 0 ? 0 : 1u << below(&s, 10);
    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);

    if (alignment != 0) {
        gguf_writer_set_alignment(w, alignment);
    }
    for (uint32_t k = 0; k < n_kv; k++) {
        rt_kv *kv = &kvs[k];
        memset(kv, 0, sizeof *kv);
        /* The index keeps keys unique; a random tail scrambles the sorted order. */
        const int n = snprintf(kv->key, sizeof kv->key, "k%u.", (unsigned)k);
        for (uint32_t i = 0, len = below(&s, 12); i < len; i++) {
            kv->key[n + (int)i] = (char)('a' + below(&s, 26));
        }
        const bool array = below(&s, 3) == 0;
        kv->type = array ? MOAS_META_ARRAY : rt_scalar_type(&s);
        kv->elem_type = array ? rt_scalar_type(&s) : kv->type;
        kv->n = array ? below(&s, RT_MAX_ELEMS + 1) : 1;
        for (uint64_t i = 0; i < kv->n; i++) {
            if (kv->elem_type == MOAS_META_STRING) {
                rt_string(&s, kv->str[i], &kv->len[i]);
            } else {
                kv->bits[i] = rt_bits(&s, kv->elem_type);
            }
        }
        rt_add_kv(w, kv);
    }
    for (uint32_t k = 0; k < n_tensors; k++) {
        static const moas_type types[4] = {MOAS_TYPE_F32, MOAS_TYPE_F16, MOAS_TYPE_BF16,
                                           MOAS_TYPE_Q8_0};
        rt_tensor *t = &tensors[k];
        memset(t, 0, sizeof *t);
        snprintf(t->name, sizeof t->name, "%c.t%u", (char)('a' + below(&s, 26)), (unsigned)k);
        t->type = types[below(&s, 4)];
        t->n_dims = 1 + below(&s, 4);
        for (uint32_t d = 0; d < t->n_dims; d++) {
            t->ne[d] = 1 + below(&s, 4);
        }
        if (t->type == MOAS_TYPE_Q8_0) {
            t->ne[0] = 32;
        }
        t->n_bytes = gguf_writer_tensor_bytes(t->type, t->ne, t->n_dims);
        ASSERT_TRUE(t->n_bytes > 0 && t->n_bytes <= sizeof t->data);
        for (size_t i = 0; i < t->n_bytes; i++) {
            t->data[i] = (uint8_t)test_rng_next(&s);
        }
        ASSERT_TRUE(gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, t->data) ==
                    (int)k);
    }

    size_t size = 0;
    uint8_t *image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    moas_gguf *g = NULL;
    ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));

    ASSERT_EQ(g->n_kv, n_kv + (alignment != 0));
    ASSERT_EQ(g->alignment, alignment != 0 ? alignment : 32);
    ASSERT_EQ(g->data_offset % g->alignment, 0);
    for (uint32_t k = 0; k < n_kv; k++) {
        const rt_kv *want = &kvs[k];
        const moas_gguf_kv *got = &g->kv[k + (alignment != 0)];
        ASSERT_STR_EQ(got->key.text, want->key);
        ASSERT_TRUE(moas__gguf_find_kv(g, want->key) == got);
        ASSERT_EQ(got->value.type, want->type);
        if (want->type == MOAS_META_ARRAY) {
            ASSERT_EQ(got->value.elem_type, want->elem_type);
            ASSERT_EQ(got->value.n, want->n);
        }
        for (uint64_t i = 0; i < want->n; i++) {
            if (want->elem_type == MOAS_META_STRING) {
                const moas_gguf_string *str = want->type == MOAS_META_ARRAY ?
                                                  &got->value.v.strs[i] : &got->value.v.str;
                ASSERT_EQ(str->len, want->len[i]);
                ASSERT_TRUE(memcmp(str->text, want->str[i], want->len[i]) == 0);
                ASSERT_EQ(str->text[want->len[i]], '\0');
            } else if (rt_check_elem(&got->value, want->elem_type, want->bits[i], i,
                                     want->type == MOAS_META_ARRAY) != TEST_PASS) {
                return TEST_FAIL;
            }
        }
    }
    ASSERT_EQ(g->n_tensors, n_tensors);
    for (uint32_t k = 0; k < n_tensors; k++) {
        const rt_tensor *want = &tensors[k];
        const moas_gguf_tensor *got = moas__gguf_find_tensor(g, want->name);
        ASSERT_TRUE(got == &g->tensors[k]);
        ASSERT_EQ(got->type, want->type);
        ASSERT_EQ(got->n_dims, want->n_dims);
        for (uint32_t d = 0; d < MOAS_GGUF_MAX_DIMS; d++) {
            ASSERT_EQ(got->ne[d], d < want->n_dims ? want->ne[d] : 1);
        }
        ASSERT_EQ(got->n_bytes, want->n_bytes);
        ASSERT_EQ(got->offset % g->alignment, 0);
        ASSERT_TRUE(memcmp(got->data, want->data, want->n_bytes) == 0);
    }
    moas__gguf_free(g, NULL);
    free(image);
    return TEST_PASS;
}

TEST(gguf_round_trips_random_files) {
    for (uint64_t seed = 1; seed <= 400; seed++) {
        if (round_trip_once(seed) != TEST_PASS) {
            test_report(__FILE__, __LINE__, "round trip", "seed %llu",
                        (unsigned long long)seed);
            return TEST_FAIL;
        }
    }
    return TEST_PASS;
}

/* ---- allocation and scale ----------------------------------------------------------- */

typedef struct {
    int n_allocs;
    int live;
    int fail_at;  /* 1-based; 0: never */
} counting;

static void *counting_alloc(void *user, size_t size) {
    counting *c = user;
    c->n_allocs++;
    if (c->fail_at == c->n_allocs) {
        return NULL;
    }
    void *p = malloc(size);
    c->live += p != NULL;
    return p;
}

static void counting_free(void *user, void *ptr) {
    counting *c = user;
    if (ptr != NULL) {
        c->live--;
        free(ptr);
    }
}

TEST(gguf_directory_is_one_allocation) {
    counting c = {0, 0, 0};
    const moas_allocator alloc = {counting_alloc, counting_free, &c};
    size_t size = 0;
    uint8_t *image = tiny_model_image(NULL, 5, &size);
    moas_gguf *g = NULL;
    ASSERT_TRUE(image != NULL);

    ASSERT_OK(moas__gguf_parse(image, size, &alloc, &g));
    ASSERT_EQ(c.n_allocs, 1);
    ASSERT_EQ(c.live, 1);
    moas__gguf_free(g, &alloc);
    ASSERT_EQ(c.live, 0);

    /* The allocation fails: NO_MEMORY, nothing returned, nothing leaked. */
    c = (counting){0, 0, 1};
    g = &sentinel_gguf;
    ASSERT_STATUS(moas__gguf_parse(image, size, &alloc, &g), MOAS_ERR_NO_MEMORY);
    ASSERT_TRUE(g == NULL);
    ASSERT_EQ(c.live, 0);
    ASSERT_TRUE(strstr(moas_last_error(), "no memory") != NULL);

    /* A file cut well inside its data is refused before anything is allocated. */
    c = (counting){0, 0, 0};
    g = &sentinel_gguf;
    ASSERT_STATUS(moas__gguf_parse(image, size - 100, &alloc, &g), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(g == NULL);
    ASSERT_EQ(c.n_allocs, 0);
    ASSERT_TRUE(strstr(moas_last_error(), "even if the data section began") != NULL);
    free(image);

    /* So is a header claiming 2^40 keys. */
    size_t bad_size = 0;
    uint8_t *bad = build_bad(HUGE_N_KV, &bad_size);
    ASSERT_TRUE(bad != NULL);
    c = (counting){0, 0, 0};
    ASSERT_STATUS(moas__gguf_parse(bad, bad_size, &alloc, &g), MOAS_ERR_CORRUPT);
    ASSERT_EQ(c.n_allocs, 0);
    free(bad);

    /* A failure found after the allocation (an unaligned offset) releases it. */
    bad = build_bad(OFFSET_NOT_ALIGNED, &bad_size);
    ASSERT_TRUE(bad != NULL);
    c = (counting){0, 0, 0};
    g = &sentinel_gguf;
    ASSERT_STATUS(moas__gguf_parse(bad, bad_size, &alloc, &g), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(g == NULL);
    ASSERT_EQ(c.n_allocs, 1);
    ASSERT_EQ(c.live, 0);
    free(bad);
    return TEST_PASS;
}

/* A file one byte short of its last tensor is refused before anything is allocated,
 * saying so: at alignment 1 the data section starts where the directory ends, so a
 * 16-byte tensor there cannot fit in the 15 bytes left. */
TEST(gguf_file_one_byte_short_is_refused_before_allocating) {
    counting c = {0, 0, 0};
    const moas_allocator alloc = {counting_alloc, counting_free, &c};
    const uint64_t ne[1] = {4};
    size_t size = 0;
    moas_gguf *g = NULL;
    char want[200];

    gguf_writer *w = gguf_writer_create();
    ASSERT_TRUE(w != NULL);
    gguf_writer_set_alignment(w, 1);
    ASSERT_EQ(gguf_writer_add_tensor_raw(w, "t", 1, MOAS_TYPE_F32, 1, ne, NULL, 16), 0);
    uint8_t *image = gguf_writer_finish(w, &size);
    const size_t dir_end = gguf_writer_directory_end(w);
    gguf_writer_free(w);
    ASSERT_TRUE(image != NULL);
    ASSERT_EQ(size, dir_end + 16);
    ASSERT_OK(moas__gguf_parse(image, size, &alloc, &g));
    ASSERT_EQ(g->data_offset, dir_end);
    moas__gguf_free(g, &alloc);

    c = (counting){0, 0, 0};
    g = &sentinel_gguf;
    ASSERT_STATUS(moas__gguf_parse(image, size - 1, &alloc, &g), MOAS_ERR_CORRUPT);
    ASSERT_TRUE(g == NULL);
    ASSERT_EQ(c.n_allocs, 0);
    snprintf(want, sizeof want, "gguf: tensor 't' data [%zu, %zu) ends past the file (%zu "
             "bytes) even if the data section began right after the directory",
             dir_end, dir_end + 16, size - 1);
    ASSERT_STR_EQ(moas_last_error(), want);
    free(image);
    return TEST_PASS;
}

/* Many entries: duplicates are found by sorting, not by comparing every pair. A
 * quadratic check would need ~10^10 comparisons here and time out. */
TEST(gguf_many_entries_are_checked_by_sorting) {
    enum { N = 150000 };
    char key[32];
    size_t size = 0;
    moas_gguf *g = NULL;

    for (int dup = 0; dup < 2; dup++) {
        gguf_writer *w = gguf_writer_create();
        ASSERT_TRUE(w != NULL);
        for (int i = N - 1; i >= 0; i--) {
            snprintf(key, sizeof key, "key.%07d", i);
            gguf_writer_add_u8(w, key, (uint8_t)i);
        }
        for (int i = 0; i < N / 4; i++) {
            const int64_t ne[1] = {1};
            snprintf(key, sizeof key, "t.%07d", (int)(((uint32_t)i * 7919u) % (N / 4)));
            ASSERT_TRUE(gguf_writer_add_tensor(w, key, MOAS_TYPE_F16, 1, ne, NULL) == i);
        }
        if (dup) {
            gguf_writer_add_u8(w, "key.0074999", 1);
        }
        uint8_t *image = gguf_writer_finish(w, &size);
        gguf_writer_free(w);
        ASSERT_TRUE(image != NULL);
        if (!dup) {
            ASSERT_OK(moas__gguf_parse(image, size, NULL, &g));
            ASSERT_EQ(g->n_kv, N);
            for (int i = 0; i < N; i += 997) {
                snprintf(key, sizeof key, "key.%07d", i);
                const moas_gguf_kv *kv = moas__gguf_find_kv(g, key);
                ASSERT_TRUE(kv != NULL);
                ASSERT_EQ(kv->value.v.u64, (uint8_t)i);
                ASSERT_TRUE(kv == &g->kv[N - 1 - i]);
            }
            ASSERT_TRUE(moas__gguf_find_tensor(g, "t.0001234") != NULL);
            ASSERT_TRUE(moas__gguf_find_kv(g, "key.0150000") == NULL);
            moas__gguf_free(g, NULL);
        } else {
            g = &sentinel_gguf;
            ASSERT_STATUS(moas__gguf_parse(image, size, NULL, &g), MOAS_ERR_CORRUPT);
            ASSERT_TRUE(g == NULL);
            ASSERT_TRUE(strstr(moas_last_error(), "duplicate key 'key.0074999'") != NULL);
        }
        free(image);
    }
    return TEST_PASS;
}
