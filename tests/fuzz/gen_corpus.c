/*
 * gen_corpus.c - write the seed corpora of the fuzz targets: gen_corpus DIR writes
 * DIR/load/, DIR/tokenize/ and DIR/decode/ (make fuzz-corpus: tests/fuzz/corpus).
 *
 * Seeds are small on purpose: a fuzzer mutates a 3 KB model far faster than a 300 KB
 * one, and every structure of the format is already in the small ones.
 *   load/     valid tiny models in each architecture variant and weight type (F32,
 *             F16, Q8_0; router, mean, single; independent and pooled K/V; one and
 *             two layers; tied and untied;
 *             with and without biases; alignment 1, 32, and 32 by default), one
 *             with a key of every value type and an array of every element type, a
 *             multi-byte vocabulary, and truncations of one of them inside each
 *             section;
 *   tokenize/ texts for fuzz_tokenize (byte 0: flags; fuzz_tokenize.c);
 *   decode/   programs for fuzz_decode (layout in fuzz_decode.c);
 *   state/    states and edits for fuzz_state (layout in fuzz_state.c);
 *   pool/     programs over contexts of one KV pool for fuzz_pool (layout in
 *             fuzz_pool.c).
 * Files that fuzzing found and that once failed are added by hand as crash-*; this
 * program never deletes them.
 */
#include "support/tiny_model.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

static void write_file(const char *dir, const char *sub, const char *name, const void *data,
                       size_t size) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s/%s", dir, sub, name);
    FILE *f = fopen(path, "wb");
    if (f == NULL || fwrite(data, 1, size, f) != size || fclose(f) != 0) {
        fprintf(stderr, "gen_corpus: cannot write %s\n", path);
        failures++;
    }
}

/* A small model: 1 layer, width 8, 2 heads, schemes [2, 1], 8 positions, 8 tokens. */
static void small_config(tiny_model_config *cfg) {
    tiny_model_config_default(cfg);
    cfg->n_layer = 1;
    cfg->n_embd = 8;
    cfg->n_head = 2;
    cfg->n_ff = 8;
    cfg->n_ctx_train = 8;
    cfg->n_scheme = 2;
    cfg->scheme_n_kv[0] = 2;
    cfg->scheme_n_kv[1] = 1;
    cfg->router_hidden = 2;
    cfg->n_vocab = 8;
    cfg->alignment = 32;
}

static void model_seed(const char *dir, const char *name, const tiny_model_config *cfg,
                       uint64_t seed) {
    size_t size;
    uint8_t *image = tiny_model_image(cfg, seed, &size);
    if (image == NULL) {
        fprintf(stderr, "gen_corpus: cannot build %s\n", name);
        failures++;
        return;
    }
    write_file(dir, "load", name, image, size);
    free(image);
}

static void load_seeds(const char *dir) {
    tiny_model_config cfg;
    static const char *const multibyte[6] = {"a", " ", "\xc3\xa9", "\xe2\x80\x94",
                                             "\xf0\x9f\x98\x80", "Z"};

    small_config(&cfg);
    model_seed(dir, "small-router-f32.gguf", &cfg, 1);
    cfg.alignment = 1;
    model_seed(dir, "small-router-align1.gguf", &cfg, 2);
    cfg.alignment = 0;   /* no general.alignment: GGUF's default 32 */
    model_seed(dir, "small-router-noalign.gguf", &cfg, 3);

    small_config(&cfg);
    cfg.mixing = MOAS_MIXING_MEAN;
    cfg.bias = false;
    cfg.tied = false;
    model_seed(dir, "small-mean-nobias-untied.gguf", &cfg, 4);

    small_config(&cfg);
    cfg.n_scheme = 1;
    cfg.scheme_n_kv[0] = 1;
    cfg.mixing = MOAS_MIXING_SINGLE;
    cfg.mat_type = MOAS_TYPE_F16;
    cfg.emb_type = MOAS_TYPE_F16;
    model_seed(dir, "small-single-mqa-f16.gguf", &cfg, 5);

    small_config(&cfg);
    cfg.n_embd = 32;
    cfg.n_ff = 32;
    cfg.router_hidden = 32;
    cfg.mat_type = MOAS_TYPE_Q8_0;
    cfg.emb_type = MOAS_TYPE_F16;
    cfg.n_ctx_train = 4;
    model_seed(dir, "small-router-q8_0.gguf", &cfg, 6);

    small_config(&cfg);   /* one Q, K, V, output per layer; K/V pooled per scheme */
    cfg.kv_sharing = "pooled";
    model_seed(dir, "small-pooled-router.gguf", &cfg, 9);

    small_config(&cfg);
    cfg.vocab = multibyte;
    cfg.n_vocab = 6;
    cfg.name = NULL;
    model_seed(dir, "small-multibyte-vocab.gguf", &cfg, 7);

    /* the first small model plus a key of every value type and an array of every
     * element type, for the loader's metadata getters */
    small_config(&cfg);
    gguf_writer *w = gguf_writer_create();
    if (w == NULL || !tiny_model_write(&cfg, 10, w)) {
        failures++;
    } else {
        const uint8_t u8s[3] = {0, 7, 255};
        const int16_t i16s[2] = {-300, 300};
        const uint32_t u32s[2] = {1, 4000000000u};
        const int64_t i64s[2] = {INT64_MIN, INT64_MAX};
        const uint64_t u64s[2] = {1, UINT64_MAX};
        const float f32s[3] = {0.5f, -1e30f, 3.0f};
        const double f64s[2] = {1e-300, -2.5};
        const bool bools[3] = {true, false, true};
        static const char *const strs[2] = {"one", ""};
        static const char *const nul_strs[1] = {"a\0b"};
        const size_t nul_lens[1] = {3};
        gguf_writer_add_u8(w, "x.u8", 200);
        gguf_writer_add_i8(w, "x.i8", -100);
        gguf_writer_add_u16(w, "x.u16", 60000);
        gguf_writer_add_i16(w, "x.i16", -30000);
        gguf_writer_add_u32(w, "x.u32", 4000000000u);
        gguf_writer_add_i32(w, "x.i32", -2000000000);
        gguf_writer_add_u64(w, "x.u64", UINT64_MAX);
        gguf_writer_add_i64(w, "x.i64", INT64_MIN);
        gguf_writer_add_f32(w, "x.f32", -0.25f);
        gguf_writer_add_f64(w, "x.f64", 1e300);
        gguf_writer_add_bool(w, "x.bool", true);
        gguf_writer_add_string_n(w, "x.str", "nul\0inside", 10);
        gguf_writer_add_array(w, "x.a.u8", MOAS_META_UINT8, u8s, 3);
        gguf_writer_add_array(w, "x.a.i16", MOAS_META_INT16, i16s, 2);
        gguf_writer_add_array(w, "x.a.u32", MOAS_META_UINT32, u32s, 2);
        gguf_writer_add_array(w, "x.a.i64", MOAS_META_INT64, i64s, 2);
        gguf_writer_add_array(w, "x.a.u64", MOAS_META_UINT64, u64s, 2);
        gguf_writer_add_array(w, "x.a.f32", MOAS_META_FLOAT32, f32s, 3);
        gguf_writer_add_array(w, "x.a.f64", MOAS_META_FLOAT64, f64s, 2);
        gguf_writer_add_array(w, "x.a.bool", MOAS_META_BOOL, bools, 3);
        gguf_writer_add_array(w, "x.a.empty", MOAS_META_UINT8, u8s, 0);
        gguf_writer_add_array_string(w, "x.a.str", strs, 2);
        gguf_writer_add_array_string_n(w, "x.a.nul", nul_strs, nul_lens, 1);
        size_t size;
        uint8_t *image = gguf_writer_finish(w, &size);
        if (image == NULL) {
            failures++;
        } else {
            write_file(dir, "load", "small-every-value-type.gguf", image, size);
            free(image);
        }
    }
    gguf_writer_free(w);

    small_config(&cfg);   /* two layers, three schemes */
    cfg.n_layer = 2;
    cfg.n_scheme = 3;
    cfg.scheme_n_kv[2] = 1;
    cfg.router_hidden = 3;
    model_seed(dir, "small-2layer-3scheme.gguf", &cfg, 8);

    /* truncations of the first small model inside the header, the metadata, the
     * tensor directory and the data */
    size_t size;
    small_config(&cfg);
    uint8_t *image = tiny_model_image(&cfg, 1, &size);
    if (image == NULL) {
        failures++;
        return;
    }
    /* nothing, the magic, inside n_kv, inside the metadata, inside the tensor data,
     * and the last tensor one byte short */
    const size_t cut_list[6] = {0, 4, 20, 200, size / 2, size - 1};
    for (int i = 0; i < 6; i++) {
        char name[64];
        snprintf(name, sizeof name, "truncated-at-%zu.gguf", cut_list[i]);
        write_file(dir, "load", name, image, cut_list[i]);
    }
    free(image);
}

static void tokenize_seeds(const char *dir) {
    static const struct {
        const char *name;
        const char *bytes;
        size_t len;
    } seeds[] = {
        {"ascii", "\x00" "a z.A\nb", 8},
        {"multibyte", "\x01" "a\xc3\xa9\xe2\x80\x94\xf0\x9f\x98\x80\xf4\x8f\xbf\xbf", 16},
        {"edges", "\x00" "\x7f\xc2\x80\xdf\xbf\xe0\xa0\x80\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbf"
                  "\xf0\x90\x80\x80", 22},
        {"nul-inside", "\x10" "a\x00" "b", 4},
        {"unknown-char", "\x00" "abc", 4},
        {"invalid-utf8", "\x00" "a\x80" "b\xc3", 5},
        {"overlong", "\x00" "\xc0\xaf\xe0\x80\xaf", 6},
        {"surrogate", "\x00" "\xed\xa0\x80", 4},
        {"too-big", "\x00" "\xf4\x90\x80\x80", 5},
        {"short-buffer", "\x0a" "aaaaaaaaaaaa", 13},
        {"count-only", "\x03" "a b", 4},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        write_file(dir, "tokenize", seeds[i].name, seeds[i].bytes, seeds[i].len);
    }
}

/* Opcodes as in fuzz_decode.c. */
enum { DECODE, BATCH, TRUNCATE, RESET, ROUTES, KV_BYTES, VERIFY, BAD_ARGS, GENERATE, FORCE,
       BUDGET, CALLBACK };
#define DECODE_TO_BUFFER 132   /* 132 % 12 == DECODE, with the high bit: logits copied */

/* Append a batch of n tokens (ids 1 + 7i mod 39, all in the 40-token vocabulary)
 * with the given flags. */
static size_t put_batch(uint8_t *p, size_t at, uint8_t flags, uint8_t n) {
    p[at++] = BATCH;
    p[at++] = flags;
    p[at++] = n;
    for (uint8_t i = 0; i < n; i++) {
        p[at++] = (uint8_t)(1 + (i * 7) % 39);
    }
    return at;
}

/* The long model (byte 0 with bits 0xC0, % 3 == 1): prompts of 64 and more tokens,
 * so blocks reach past a whole 64-key run and through the 1,056-wide MLP in chunks. */
static void long_seeds(const char *dir) {
    uint8_t p[256];
    size_t n = 0;
    p[n++] = 0xC1;   /* long, F32 cache, mixture */
    p[n++] = 79;     /* n_ctx 80 */
    p[n++] = 0x00;
    n = put_batch(p, n, 0x02, 72);   /* every row's logits */
    p[n++] = VERIFY;
    p[n++] = DECODE;
    p[n++] = 5;
    p[n++] = TRUNCATE;
    p[n++] = 66;
    n = put_batch(p, n, 0x02, 12);
    p[n++] = VERIFY;
    write_file(dir, "decode", "long-mixture", p, n);

    n = 0;
    p[n++] = 0xD6;   /* long, F16 cache, routed */
    p[n++] = 79;
    p[n++] = 0x00;
    n = put_batch(p, n, 0x01, 70);
    p[n++] = DECODE;
    p[n++] = 3;
    p[n++] = DECODE;
    p[n++] = 4;
    p[n++] = VERIFY;
    p[n++] = TRUNCATE;
    p[n++] = 64;
    n = put_batch(p, n, 0x02, 16);
    p[n++] = VERIFY;
    write_file(dir, "decode", "long-routed", p, n);
}

static void decode_seeds(const char *dir) {
    static const uint8_t decode_some[] = {
        0x00, 15, 0x01, DECODE, 3, DECODE_TO_BUFFER, 7, DECODE, 39, VERIFY, ROUTES, 0, 3, 0,
        KV_BYTES, 0, KV_BYTES, 1, DECODE, 250, VERIFY};
    static const uint8_t batch_truncate[] = {
        0x01, 9, 0x00, BATCH, 0x02, 6, 1, 2, 3, 4, 5, 6, TRUNCATE, 2, DECODE, 9, VERIFY,
        BATCH, 0x01, 3, 10, 11, 12, TRUNCATE, 0, BATCH, 0x00, 2, 1, 1, VERIFY};
    static const uint8_t fill_up[] = {
        0x02, 3, 0x04, BATCH, 0x01, 4, 1, 2, 3, 4, DECODE, 5, BATCH, 0x02, 1, 7, VERIFY,
        TRUNCATE, 3, DECODE, 5, VERIFY, RESET, VERIFY};
    static const uint8_t odd_ranges[] = {
        0x00, 7, 0x00, BATCH, 0x01, 5, 1, 2, 3, 4, 5, ROUTES, 225, 230, 0, ROUTES, 4, 2, 1,
        ROUTES, 6, 0, 0, ROUTES, 0, 231, 2, KV_BYTES, 201, KV_BYTES, 206, TRUNCATE, 226,
        TRUNCATE, 228, VERIFY};
    static const uint8_t bad_args[] = {
        0x0c, 5, 0x00, DECODE, 1, BAD_ARGS, 0, BAD_ARGS, 1, BAD_ARGS, 2, BAD_ARGS, 3, BAD_ARGS,
        4, BAD_ARGS, 5, BAD_ARGS, 6, BAD_ARGS, 7, DECODE, 241, DECODE, 242, DECODE, 243,
        BATCH, 0x03, 2, 1, 2, BATCH, 0x04, 2, 1, 2, BATCH, 0x5a, 2, 1, 2, BATCH, 0x12, 2, 1,
        2, VERIFY};
    static const uint8_t generate[] = {
        0x00, 15, 0x21, DECODE, 1, GENERATE, GENERATE, GENERATE, GENERATE, VERIFY, TRUNCATE, 2,
        GENERATE, GENERATE, VERIFY};
    static const uint8_t routed[] = {
        0x10, 15, 0x00, BATCH, 0x01, 3, 1, 2, 3, FORCE, 3, DECODE, 4, FORCE, 0, DECODE, 5,
        CALLBACK, 7, DECODE, 6, ROUTES, 0, 5, 0, KV_BYTES, 0, BUDGET, 0x05, DECODE, 7,
        BATCH, 0x02, 2, 8, 9, BUDGET, 0x02, BUDGET, 0x00, CALLBACK, 0, RESET, BATCH, 0x01,
        4, 1, 2, 3, 4, VERIFY};
    static const uint8_t routed_budget[] = {
        0x1c, 15, 0x00, BUDGET, 0x09, BATCH, 0x01, 6, 1, 2, 3, 4, 5, 6, ROUTES, 0, 6, 0,
        KV_BYTES, 0, DECODE, 7, DECODE, 8, TRUNCATE, 3, BATCH, 0x02, 3, 1, 1, 1, BUDGET, 0x06,
        DECODE, 1, VERIFY};
    static const uint8_t pooled[] = {
        0x20, 15, 0x00, BATCH, 0x02, 5, 1, 2, 3, 4, 5, ROUTES, 0, 5, 0, KV_BYTES, 0, TRUNCATE,
        2, DECODE, 6, VERIFY};
    static const uint8_t pooled_routed[] = {
        0x34, 15, 0x00, BATCH, 0x01, 4, 1, 2, 3, 4, FORCE, 2, DECODE, 5, FORCE, 0, BUDGET, 0x09,
        BATCH, 0x02, 3, 6, 7, 8, ROUTES, 0, 8, 0, KV_BYTES, 0, TRUNCATE, 3, VERIFY};
    static const struct {
        const char *name;
        const uint8_t *bytes;
        size_t len;
    } seeds[] = {
        {"decode-some", decode_some, sizeof decode_some},
        {"pooled", pooled, sizeof pooled},
        {"pooled-routed", pooled_routed, sizeof pooled_routed},
        {"batch-truncate", batch_truncate, sizeof batch_truncate},
        {"fill-up", fill_up, sizeof fill_up},
        {"odd-ranges", odd_ranges, sizeof odd_ranges},
        {"bad-args", bad_args, sizeof bad_args},
        {"generate", generate, sizeof generate},
        {"routed", routed, sizeof routed},
        {"routed-budget", routed_budget, sizeof routed_budget},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        write_file(dir, "decode", seeds[i].name, seeds[i].bytes, seeds[i].len);
    }
    long_seeds(dir);
}

/* state/: programs for fuzz_state (layout in fuzz_state.c): real states of 0 to 31
 * tokens in both modes and KV types, cut short, lengthened and with bytes flipped in
 * the header, the records and the K/V, and one made-up state; loaded alone, into a
 * pool beside a fork of the target, into a small pool, and with Q8_0 K/V. */
static void state_seeds(const char *dir) {
    static const struct {
        const char *name;
        uint8_t bytes[16];
        size_t len;
    } seeds[] = {
        {"mixture-as-saved", {0x00 | 5 << 2, 3}, 2},
        {"routed-as-saved", {0x01 | 9 << 2, 4}, 2},
        {"routed-f16-as-saved", {0x03 | 31 << 2, 0}, 2},
        {"empty-into-full", {0x01, 31}, 2},
        {"routed-cut", {0x01 | 7 << 2, 2, 100, 0}, 4},
        {"mixture-longer", {0x00 | 3 << 2, 1, 0x00, 0x20}, 4},
        {"routed-bad-scheme", {0x01 | 6 << 2, 0, 0, 0, 58, 0, 0x07}, 7},
        {"routed-bad-version", {0x01 | 6 << 2, 0, 0, 0, 8, 0, 0x02}, 7},
        {"mixture-flip-kv", {0x00 | 4 << 2, 5, 0, 0, 0x40, 0x02, 0x81}, 7},
        {"made-up", {0x80, 0, 'M', 'O', 'A', 'S', 'S', 'T', 'A', 'T', 1, 0, 0, 0}, 14},
        {"routed-into-pool-beside-fork", {0x01 | 20 << 2, 0x20 | 6}, 2},
        {"mixture-into-small-pool", {0x00 | 31 << 2, 0x60 | 31}, 2},
        {"routed-q8-as-saved", {0x01 | 12 << 2, 0x80 | 4}, 2},
        {"routed-q8-flip-kv-in-pool", {0x01 | 8 << 2, 0xa0 | 3, 0, 0, 0x40, 0x01, 0x81}, 7},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        write_file(dir, "state", seeds[i].name, seeds[i].bytes, seeds[i].len);
    }
}

/* pool/: programs for fuzz_pool (layout and opcodes in fuzz_pool.c). Together they
 * reach every opcode on every model: a pool too small for what is asked of it
 * (MOAS_ERR_POOL_FULL in decode, moas_pool_decode, fork, state load and the copies a
 * shift or compaction makes of shared pages), shift and compaction of forked
 * contexts, a state loaded into another context, allocation failures, bad arguments,
 * route callbacks (every nested call they make, on a context of the decoding call and
 * on one it does not name; settings they change; a forced scheme that reserves at the
 * widest under one), abort callbacks (stopping a decode, a batch and a moas_pool_decode
 * at a chosen ask, a fork's inherited one, one after a route callback chose). */
enum { P_CREATE, P_FREE, P_FORK, P_DECODE, P_BATCH, P_POOL_DECODE, P_TRUNCATE, P_RESET,
       P_SHIFT, P_COMPACT, P_SAVE, P_LOAD, P_STATS, P_BAD_ARGS, P_VERIFY, P_FORCE, P_OOM };
/* P_FORCE's operand: install a route callback (followed by its seed, action, position |
 * layer << 4, target: bit 7 a context the call does not name), or remove it */
enum { P_ROUTE_ON = 240, P_ROUTE_OFF = 241 };
/* P_FORCE's operand: install an abort callback (followed by the ask it stops at, 0:
 * never), or remove it */
enum { P_ABORT_ON = 248, P_ABORT_OFF = 249 };
/* the callbacks' nested calls (cb_action in fuzz_pool.c); A_NONE: only the choice */
enum { A_DECODE, A_BATCH, A_TRUNCATE, A_FORK, A_LOAD, A_RESET, A_FREE, A_POOL, A_COMPACT,
       A_SHIFT, A_FORCE, A_BUDGET, A_SETCB, A_NONE };

static void pool_seeds(const char *dir) {
    static const uint8_t pooled_routed[] = {
        0x10 | 0x80, 40, 0x00,                 /* pooled RoPE, F32, routed, pages of 4 */
        P_CREATE, 0, 0, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5, P_FORCE, 0, 1,
        P_DECODE, 0, 6, P_FORK, 0, P_BATCH, 1, 0x02, 7, 8, P_VERIFY,
        P_POOL_DECODE, 0x03, 0x12, 9, 10, 0x01, 11, P_VERIFY,
        P_TRUNCATE, 1, 3, P_COMPACT, 0, 4, 2, P_SHIFT, 1, 1, 1, P_STATS, 200, P_VERIFY,
        P_SAVE, 0, 1, P_CREATE, 0, 0, P_LOAD, 2, 3, P_DECODE, 2, 12, P_VERIFY,
        P_FREE, 0, P_FREE, 1, P_FREE, 2};
    static const uint8_t pool_full[] = {
        0x00 | 0x40, 17, 0x00,                 /* pooled, F32, mixture, 20 pages of 2 heads */
        P_CREATE, 0, 0, P_BATCH, 0, 0x03, 1, 2, 3, P_FORK, 0, P_BATCH, 1, 0x0a, 4, 5,
        P_DECODE, 0, 6, P_POOL_DECODE, 0x03, 0x09, 7, 0x09, 8, P_TRUNCATE, 0, 1,
        P_DECODE, 0, 9, P_FORK, 1, P_SAVE, 0, 0, P_CREATE, 0, 0, P_LOAD, 2, 3,
        P_SHIFT, 0, 0, 1, P_RESET, 1, P_DECODE, 0, 9, P_VERIFY, P_STATS, 0};
    static const uint8_t independent[] = {
        0x01 | 0x20 | 0x80, 30, 0x80,          /* independent, learned positions, per context */
        P_CREATE, 0, 0, P_CREATE, 5, 1, P_BATCH, 0, 0x0c, 1, 2, 3, 4, P_BATCH, 1, 0x14, 5, 6, 7, 8,
        P_POOL_DECODE, 0x03, 0x09, 9, 0x09, 10, P_BAD_ARGS, 14, 0, P_SHIFT, 0, 1, 1,
        P_COMPACT, 1, 1, 0, P_FORCE, 0, 1, P_FORCE, 1, 1, P_DECODE, 1, 11, P_SAVE, 1, 0,
        P_LOAD, 0, 3, P_CREATE, 2, 0x01, P_LOAD, 2, 3, P_VERIFY, P_FREE, 0};
    static const uint8_t q8_routed[] = {
        0x02 | 0x08 | 0x10 | 0x40, 40, 0x02,   /* pooled heads of 32, Q8_0, routed, steered */
        P_CREATE, 0, 0, P_FORCE, 0, 1, P_BATCH, 0, 0x05, 1, 2, 3, 4, 5, P_FORK, 0,
        P_COMPACT, 0, 5, 2, P_TRUNCATE, 0, 2, P_COMPACT, 1, 3, 1, P_SHIFT, 1, 1, 2,
        P_POOL_DECODE, 0x83, 0x0d, 6, 7, 8, 9, 10, 0x0c, 11, 12, 13, 14, P_VERIFY,
        P_SAVE, 1, 1, P_LOAD, 0, 2, P_LOAD, 0, 3, P_VERIFY};
    static const uint8_t rope_independent[] = {
        0x03 | 0x04 | 0xc0, 12, 0x40,          /* independent RoPE, F16, mixture, pages of 8 */
        P_CREATE, 0, 0, P_BATCH, 0, 0x15, 1, 2, 3, 4, 5, P_FORK, 0, P_SHIFT, 1, 1, 2,
        P_DECODE, 1, 6, P_DECODE | 0x80, 0, 7, P_VERIFY, P_POOL_DECODE, 0x13, 0x0a, 1, 2,
        0x11, 3, P_RESET, 0, P_VERIFY};
    static const uint8_t oom_and_bad[] = {
        0x00 | 0x10, 30, 0x00,
        P_OOM, 0, P_CREATE, 0, 0, P_CREATE, 0, 0, P_OOM, 1, P_DECODE, 0, 3,
        P_DECODE, 0, 3, P_OOM, 0, P_FORK, 0, P_OOM, 2, P_FORK, 0, P_OOM, 0, P_COMPACT, 0, 1, 2,
        P_BAD_ARGS, 0, 0, P_BAD_ARGS, 1, 0, P_BAD_ARGS, 2, 0, P_BAD_ARGS, 3, 0,
        P_BAD_ARGS, 4, 0, P_BAD_ARGS, 5, 0, P_BAD_ARGS, 6, 0, P_BAD_ARGS, 7, 0,
        P_BAD_ARGS, 8, 0, P_BAD_ARGS, 9, 0, P_BAD_ARGS, 10, 0, P_BAD_ARGS, 11, 0,
        P_BAD_ARGS, 12, 0, P_BAD_ARGS, 13, 0, P_BAD_ARGS, 15, 0,
        P_DECODE, 0, 250, P_BATCH, 0, 0xe2, 1, 2, P_BATCH, 0, 0xc0, P_BATCH, 0, 0x52, 1, 2,
        P_TRUNCATE, 0, 240, P_SHIFT, 0, 233, 0, P_COMPACT, 0, 233, 241, P_FORCE, 0, 241,
        P_STATS, 2, P_STATS, 20, P_CREATE, 250, 0, P_CREATE, 251, 0, P_LOAD, 0, 0,
        P_SAVE, 0, 0, P_LOAD, 0, 0, P_LOAD, 0, 1, P_LOAD, 0, 2};
    /* a callback's nested calls on its own context and on the other parts of a
     * moas_pool_decode: refused (MOAS_ERR_BUSY, reset and free no-ops); the settings go
     * ahead; a fork inherits the callback */
    static const uint8_t route_busy[] = {
        0x10 | 0x80, 40, 0x00,                 /* pooled RoPE, F32, routed, pages of 4 */
        P_CREATE, 0, 0, P_FORCE, 0, P_ROUTE_ON, 0x00, A_NONE, 0, 0,
        P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5, P_VERIFY,
        P_FORCE, 0, P_ROUTE_ON, 0x80, A_DECODE, 5, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON, 0x81, A_BATCH, 6, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x82, A_TRUNCATE, 7, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_FORK, 8, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_LOAD, 9, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_RESET, 10, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_FREE, 11, 0, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_POOL, 12, 0, P_DECODE, 0, 6, P_VERIFY,
        P_FORK, 0, P_CREATE, 0, 0,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x43, A_COMPACT, 13, 1,
        P_FORCE, 1, P_ROUTE_ON + 4, 0xc3, A_SHIFT, 13, 0,
        P_POOL_DECODE, 0x07, 0x09, 1, 0x09, 2, 0x09, 3, P_VERIFY,
        P_FORCE, 2, P_ROUTE_OFF, P_FORCE, 1, P_ROUTE_ON + 4, 0x83, A_FORCE, 14, 1,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_BUDGET, 14, 1,
        P_FORCE, 2, P_ROUTE_ON + 4, 0x83, A_SETCB, 1 | 1 << 4, 2,
        P_POOL_DECODE, 0x07, 0x09, 1, 0x09, 2, 0x09, 3,
        P_FORCE, 0, P_ROUTE_ON + 4, 0x83, A_POOL, 15, 1,
        P_POOL_DECODE, 0x03, 0x09, 1, 0x09, 2, P_VERIFY};
    /* nested calls on contexts the decoding call does not name: decode, truncate,
     * reset, free and an empty moas_pool_decode go ahead (refused within a
     * moas_pool_decode), and a decode finds the pool without the call's pages */
    static const uint8_t route_unrelated[] = {
        0x10 | 0x80, 40, 0x00,
        P_CREATE, 0, 0, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5, P_FORK, 0, P_CREATE, 0, 0x80,
        P_BATCH, 2, 0x0b, 1, 2, 3,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x80, A_TRUNCATE, 5, 0x81, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x80, A_RESET, 6, 0x82, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x80, A_POOL, 7, 0x82, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x80, A_DECODE, 8, 0x82, P_DECODE, 0, 6,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x80, A_FREE, 9 | 1 << 4, 0x81, P_DECODE, 0, 6,
        P_VERIFY, P_STATS, 20,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x80, A_POOL, 10, 0x83, P_CREATE, 0, 0, P_CREATE, 0, 0,
        P_POOL_DECODE, 0x03, 0x09, 1, 0x09, 2,
        P_FORCE, 1, P_ROUTE_ON + 2, 0x80, A_DECODE, 1, 0x83, P_POOL_DECODE, 0x03, 0x09, 1,
        0x09, 2, P_VERIFY,
        P_FORCE, 0, P_ROUTE_ON + 2, 0x82, A_POOL, 0, 0x81, P_BATCH, 0, 0x0c, 1, 2, 3, 4,
        P_VERIFY};
    /* a forced scheme bounds the reservation only without a callback: MQA forced,
     * 20 pages of one head, 5 tokens take 10 pages; with a callback they reserve 40 */
    static const uint8_t route_reserve[] = {
        0x10, 17, 0x00,                        /* pooled RoPE, F32, routed, pages of 1 */
        P_CREATE, 0, 0, P_FORCE, 0, 3, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5,
        P_FORCE, 0, P_ROUTE_ON, 0x40, A_NONE, 0, 0, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5,
        P_DECODE, 0, 6, P_FORCE, 0, P_ROUTE_OFF, P_DECODE, 0, 7, P_VERIFY,
        P_FORCE, 0, P_ROUTE_OFF + 6, P_TRUNCATE, 0, 2, P_BATCH, 0, 0x0b, 1, 2, 3, P_VERIFY};
    /* independent schemes, each context its own mode, callbacks from creation (every
     * style of choice), in a moas_pool_decode with a callback that frees a context
     * it does not name */
    static const uint8_t route_modes[] = {
        0x01 | 0x20 | 0x80, 40, 0x00,
        P_CREATE, 0, 0x81, P_CREATE, 1, 0x80, P_CREATE, 0x40, 0x81, P_CREATE, 0x80, 0x81,
        P_BATCH, 0, 0x15, 1, 2, 3, 4, 5, P_BATCH, 2, 0x15, 1, 2, 3, 4, 5,
        P_BATCH, 3, 0x15, 1, 2, 3, 4, 5, P_FORCE, 2, 1,
        P_FORCE, 0, P_ROUTE_ON, 0xc5, A_FREE, 5 | 1 << 4, 0x81,
        P_POOL_DECODE, 0x85, 0x0d, 6, 7, 8, 9, 10, 0x0d, 6, 7, 8, 9, 10, P_VERIFY,
        P_DECODE, 1, 11, P_VERIFY};
    /* settings changed from a callback during a moas_pool_decode: another part's
     * forcing (MQA, which bounded its reservation) released, so that its next decode
     * reserves at the widest; then the callback removes itself */
    static const uint8_t route_settings[] = {
        0x10 | 0x40, 60, 0x00,                 /* pooled RoPE, F32, routed, pages of 2 */
        P_CREATE, 0, 0, P_CREATE, 0, 0, P_FORCE, 1, 3,
        P_FORCE, 0, P_ROUTE_ON, 0x00, A_FORCE, 1, 0x41, P_BATCH, 0, 0x09, 1,
        P_BATCH, 1, 0x09, 1, P_POOL_DECODE, 0x83, 0x0c, 1, 2, 3, 4, 0x0c, 1, 2, 3, 4,
        P_VERIFY, P_DECODE, 1, 5, P_VERIFY,
        P_FORCE, 0, P_ROUTE_ON, 0x01, A_SETCB, 6, 0x40,
        P_POOL_DECODE, 0x83, 0x0c, 1, 2, 3, 4, 0x0c, 1, 2, 3, 4, P_DECODE, 0, 3, P_VERIFY};
    /* a callback forks a context the decoding call does not name, twice (during a
     * decode and a batch), and the forks decode on; in a moas_pool_decode a fork of a
     * part is refused */
    static const uint8_t route_fork[] = {
        0x10 | 0x80, 40, 0x00,
        P_CREATE, 0, 0, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5, P_CREATE, 0, 0x80,
        P_BATCH, 1, 0x0b, 1, 2, 3, P_FORCE, 0, P_ROUTE_ON + 2, 0x02, A_FORK, 5, 0x81,
        P_DECODE, 0, 6, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5, P_VERIFY, P_DECODE, 2, 4,
        P_DECODE, 3, 5, P_FORCE, 1, P_ROUTE_ON + 2, 0x06, A_FORK, 3, 0x82,
        P_POOL_DECODE, 0x83, 0x0b, 1, 2, 3, 0x0b, 1, 2, 3, P_VERIFY};
    /* abort callbacks: a batch of one-token blocks stopped at its first and third ask,
     * after a truncate into a page a fork shares (the reservation's copy stays); a
     * fork inherits the callback and stops a moas_pool_decode of both; one that never
     * stops; one stopping after a route callback chose */
    static const uint8_t abort_stops[] = {
        0x10 | 0x80, 40, 0x00,                 /* pooled RoPE, F32, routed, pages of 4 */
        P_CREATE, 0, 0x04, P_BATCH, 0, 0x0d, 1, 2, 3, 4, 5, P_FORK, 0, P_TRUNCATE, 0, 3,
        P_FORCE, 0, P_ABORT_ON, 1, P_BATCH, 0, 0x0c, 6, 7, 8, 9,
        P_FORCE, 0, P_ABORT_ON, 3, P_BATCH, 0, 0x0c, 6, 7, 8, 9, P_DECODE, 0, 6, P_VERIFY,
        P_FORK, 0, P_POOL_DECODE, 0x85, 0x0d, 1, 2, 3, 4, 5, 0x0b, 1, 2, 3, P_VERIFY,
        P_FORCE, 0, P_ABORT_OFF, P_FORCE, 2, P_ABORT_ON, 0,
        P_POOL_DECODE, 0x85, 0x0d, 1, 2, 3, 4, 5, 0x0b, 1, 2, 3,
        P_FORCE, 1, P_ROUTE_ON, 0x00, A_NONE, 0, 0, P_FORCE, 1, P_ABORT_ON, 2,
        P_BATCH, 1, 0x0c, 1, 2, 3, 4, P_FORCE, 1, P_ABORT_OFF, P_BATCH, 1, 0x0c, 1, 2, 3, 4,
        P_VERIFY};
    static const struct {
        const char *name;
        const uint8_t *bytes;
        size_t len;
    } seeds[] = {
        {"pooled-routed-fork-compact-shift-load", pooled_routed, sizeof pooled_routed},
        {"pool-full", pool_full, sizeof pool_full},
        {"independent-modes-apart", independent, sizeof independent},
        {"q8-routed-steered", q8_routed, sizeof q8_routed},
        {"rope-independent-f16", rope_independent, sizeof rope_independent},
        {"oom-and-bad-args", oom_and_bad, sizeof oom_and_bad},
        {"route-callback-nested-busy", route_busy, sizeof route_busy},
        {"route-callback-other-contexts", route_unrelated, sizeof route_unrelated},
        {"route-callback-reserves-widest", route_reserve, sizeof route_reserve},
        {"route-callback-modes", route_modes, sizeof route_modes},
        {"route-callback-changes-settings", route_settings, sizeof route_settings},
        {"route-callback-forks-other-context", route_fork, sizeof route_fork},
        {"abort-callback-stops-and-undoes", abort_stops, sizeof abort_stops},
    };
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) {
        write_file(dir, "pool", seeds[i].name, seeds[i].bytes, seeds[i].len);
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR (with load/, tokenize/, decode/, state/ and pool/ in it)\n",
                argv[0]);
        return 2;
    }
    load_seeds(argv[1]);
    tokenize_seeds(argv[1]);
    decode_seeds(argv[1]);
    state_seeds(argv[1]);
    pool_seeds(argv[1]);
    return failures == 0 ? 0 : 1;
}
