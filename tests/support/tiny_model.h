/*
 * tiny_model.h - deterministic tiny moas models for tests.
 *
 * tiny_model_image() returns a complete GGUF image laid out as docs/FORMAT.md says:
 * every key and every tensor for the configured shape, weights drawn from a seeded
 * xorshift generator (matrices, embeddings and biases uniform in [-0.2, 0.2],
 * LayerNorm weights in [0.9, 1.1]). The same config and seed give the same bytes.
 * Each tensor's values depend only on the seed and the tensor's name, so omitting a
 * tensor or changing the alignment leaves the others' values unchanged.
 *
 * The config is not checked against FORMAT.md's rules beyond what is needed to size
 * the tensors, so tests can build files the model loader must refuse (mixing "single"
 * with three schemes, a scheme that does not divide n_head, a missing key or tensor).
 */
#ifndef MOAS_TEST_TINY_MODEL_H
#define MOAS_TEST_TINY_MODEL_H

#include "gguf_writer.h"
#include "moas.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define TINY_MODEL_MAX_SCHEMES 8
#define TINY_MODEL_DEFAULT_VOCAB 40

typedef struct tiny_model_config {
    int32_t n_layer;                             /* default 2 */
    int32_t n_embd;                              /* default 16 */
    int32_t n_head;                              /* default 4 */
    int32_t n_ff;                                /* default 64 */
    int32_t n_ctx_train;                         /* default 32 */
    int32_t n_scheme;                            /* 1..8; default 3 */
    int32_t scheme_n_kv[TINY_MODEL_MAX_SCHEMES]; /* default {4, 2, 1} */
    moas_mixing mixing;                          /* default MOAS_MIXING_ROUTER */
    int32_t router_hidden;                       /* router width R; default 4 */
    bool bias;                                   /* default true */
    bool tied;                                   /* default true: no output.weight */
    moas_type mat_type;   /* matrices: F32 (default), F16 or Q8_0 (rows % 32 == 0) */
    moas_type emb_type;   /* token and position embeddings: F32 (default) or F16 */
    const char *const *vocab;  /* NULL (default): 40 ASCII characters, sorted */
    int32_t n_vocab;      /* entries of `vocab`; with vocab NULL, 0 = all 40, else the
                             first n_vocab of them */
    uint32_t alignment;   /* general.alignment; default 64 (our writer's); 0: no key,
                             layout at GGUF's default 32 */
    float eps;            /* moas.attention.layer_norm_epsilon; default 1e-5 */
    const char *name;     /* general.name; default "tiny"; NULL: no key */
    const char *kv_sharing;    /* default "independent"; "pooled": shared attn_{q,k,v,output} */
    bool rope;            /* block options (docs/FORMAT.md), default false: RoPE (base */
    bool rms_norm;        /* 10000, no position_embd), RMSNorm, SwiGLU (with ffn_gate); */
    bool swiglu;          /* each writes its key only when true */
    const char *omit_key;      /* NULL (default), or a key to leave out */
    const char *omit_tensor;   /* NULL (default), or a tensor to leave out */
} tiny_model_config;

/* The default: 2 layers, n_embd 16, 4 heads, schemes [4, 2, 1], router mixing with
 * hidden width 4, n_ff 64, n_ctx_train 32, biases, tied output, F32. */
void tiny_model_config_default(tiny_model_config *cfg);

/* The model's image, malloc'd (release with free()); its size in *size. `cfg` NULL
 * means the default. NULL when the config cannot be sized or memory runs out. */
uint8_t *tiny_model_image(const tiny_model_config *cfg, uint64_t seed, size_t *size);

/* Add the model's keys and tensors to `w` (which may hold others already; the caller
 * finishes it). False when the config cannot be sized or memory runs out. */
bool tiny_model_write(const tiny_model_config *cfg, uint64_t seed, gguf_writer *w);

/* Tensors the model has (omit_tensor not counted out). */
int32_t tiny_model_n_tensors(const tiny_model_config *cfg);

/* The default vocabulary: TINY_MODEL_DEFAULT_VOCAB one-character strings. */
const char *const *tiny_model_default_vocab(void);

/* IEEE half conversions, round to nearest even, as the images store F16. */
uint16_t tiny_model_f32_to_f16(float f);
float tiny_model_f16_to_f32(uint16_t h);

#endif /* MOAS_TEST_TINY_MODEL_H */
