/*
 * tiny_model.c - deterministic tiny moas models (see tiny_model.h and docs/FORMAT.md).
 */
#include "tiny_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Sorted by code point, as the reference builds its vocabulary. */
static const char *const default_vocab[TINY_MODEL_DEFAULT_VOCAB] = {
    "\n", " ", "!", "'", ",", ".", ":", "?", "A", "E", "G", "H", "I", "T",
    "a",  "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n",
    "o",  "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z",
};

const char *const *tiny_model_default_vocab(void) {
    return default_vocab;
}

void tiny_model_config_default(tiny_model_config *cfg) {
    memset(cfg, 0, sizeof *cfg);
    cfg->n_layer = 2;
    cfg->n_embd = 16;
    cfg->n_head = 4;
    cfg->n_ff = 64;
    cfg->n_ctx_train = 32;
    cfg->n_scheme = 3;
    cfg->scheme_n_kv[0] = 4;
    cfg->scheme_n_kv[1] = 2;
    cfg->scheme_n_kv[2] = 1;
    cfg->mixing = MOAS_MIXING_ROUTER;
    cfg->router_hidden = 4;
    cfg->bias = true;
    cfg->tied = true;
    cfg->mat_type = MOAS_TYPE_F32;
    cfg->emb_type = MOAS_TYPE_F32;
    cfg->vocab = NULL;
    cfg->n_vocab = 0;
    cfg->alignment = 64;
    cfg->eps = 1e-5f;
    cfg->name = "tiny";
    cfg->kv_sharing = "independent";
}

/* ---- half precision ---------------------------------------------------------------- */

uint16_t tiny_model_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    uint32_t mant = x & 0x7fffffu;
    const int32_t exp = (int32_t)((x >> 23) & 0xffu) - 127 + 15;

    if (((x >> 23) & 0xffu) == 0xffu) {
        return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));  // inf or NaN
    }
    if (exp >= 0x1f) {
        return (uint16_t)(sign | 0x7c00u);  // overflow to infinity
    }
    if (exp <= 0) {
        /* Subnormal half: the value in units of 2^-24. */
        if (exp < -10) {
            return sign;
        }
        mant |= 0x800000u;
        const uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1u), mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u))) {
            half++;
        }
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) {
        half++;  // a carry into the exponent is the correct rounding
    }
    return (uint16_t)(sign | half);
}

float tiny_model_f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t x;

    if (exp == 0) {
        const float v = ldexpf((float)mant, -24);
        return sign ? -v : v;
    }
    if (exp == 0x1f) {
        x = sign | 0x7f800000u | (mant << 13);
    } else {
        x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* ---- weights ---------------------------------------------------------------------- */

typedef struct {
    uint64_t s;
} rng;

static uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* xorshift64*, seeded from the model seed and the tensor name (FNV-1a). */
static rng rng_for(uint64_t seed, const char *name) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (const char *p = name; *p != '\0'; p++) {
        h = (h ^ (uint8_t)*p) * 0x100000001b3ull;
    }
    rng r = {splitmix64(seed ^ splitmix64(h))};
    if (r.s == 0) {
        r.s = 1;
    }
    return r;
}

/* Uniform in [-1, 1). */
static float rng_unit(rng *r) {
    r->s ^= r->s >> 12;
    r->s ^= r->s << 25;
    r->s ^= r->s >> 27;
    const uint64_t x = r->s * 0x2545f4914f6cdd1dull;
    return (float)((double)(x >> 40) / (double)(1ull << 24)) * 2.0f - 1.0f;
}

typedef enum { FILL_UNIFORM, FILL_NORM_WEIGHT } fill_kind;

/* Write one tensor of ne = [ne0, ne1] (ne1 = 1 for vectors) in `type`. */
static bool add_weights(const tiny_model_config *cfg, uint64_t seed, gguf_writer *w,
                        const char *name, moas_type type, int64_t ne0, int64_t ne1,
                        fill_kind kind) {
    if (cfg->omit_tensor != NULL && strcmp(cfg->omit_tensor, name) == 0) {
        return true;
    }
    const int64_t ne[2] = {ne0, ne1};
    const uint32_t n_dims = ne1 == 1 ? 1 : 2;
    const size_t n_bytes = gguf_writer_tensor_bytes(type, ne, n_dims);
    const size_t n = (size_t)ne0 * (size_t)ne1;
    if (n_bytes == 0) {
        return false;
    }
    float *values = malloc(n * sizeof *values);
    uint8_t *bytes = malloc(n_bytes);
    bool ok = values != NULL && bytes != NULL;
    if (ok) {
        rng r = rng_for(seed, name);
        for (size_t i = 0; i < n; i++) {
            const float u = rng_unit(&r);
            values[i] = kind == FILL_NORM_WEIGHT ? 1.0f + 0.1f * u : 0.2f * u;
        }
        if (type == MOAS_TYPE_F32) {
            for (size_t i = 0; i < n; i++) {
                uint32_t bits;
                memcpy(&bits, &values[i], sizeof bits);
                for (int k = 0; k < 4; k++) {
                    bytes[4 * i + (size_t)k] = (uint8_t)(bits >> (8 * k));
                }
            }
        } else if (type == MOAS_TYPE_F16) {
            for (size_t i = 0; i < n; i++) {
                const uint16_t h = tiny_model_f32_to_f16(values[i]);
                bytes[2 * i] = (uint8_t)h;
                bytes[2 * i + 1] = (uint8_t)(h >> 8);
            }
        } else if (type == MOAS_TYPE_Q8_0) {
            /* ggml's reference quantisation: d = max|x| / 127, q = round(x / d), halves
             * away from zero (roundf, as ggml's; lrintf took them to even) */
            for (size_t b = 0; b < n / 32; b++) {
                const float *x = values + 32 * b;
                uint8_t *out = bytes + 34 * b;
                float amax = 0.0f;
                for (int i = 0; i < 32; i++) {
                    amax = fmaxf(amax, fabsf(x[i]));
                }
                const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
                const uint16_t h = tiny_model_f32_to_f16(d);
                out[0] = (uint8_t)h;
                out[1] = (uint8_t)(h >> 8);
                for (int i = 0; i < 32; i++) {
                    const int8_t q = (int8_t)roundf(x[i] * id);
                    memcpy(out + 2 + i, &q, 1);
                }
            }
        } else {
            ok = false;
        }
    }
    if (ok) {
        ok = gguf_writer_add_tensor(w, name, type, n_dims, ne, bytes) >= 0;
    }
    free(values);
    free(bytes);
    return ok;
}

/* A Linear layer: weight [n_in, n_out] of the matrix type, bias [n_out]. */
static bool add_linear(const tiny_model_config *cfg, uint64_t seed, gguf_writer *w,
                       const char *prefix, int64_t n_in, int64_t n_out) {
    char name[128];
    snprintf(name, sizeof name, "%s.weight", prefix);
    if (!add_weights(cfg, seed, w, name, cfg->mat_type, n_in, n_out, FILL_UNIFORM)) {
        return false;
    }
    if (!cfg->bias) {
        return true;
    }
    snprintf(name, sizeof name, "%s.bias", prefix);
    return add_weights(cfg, seed, w, name, MOAS_TYPE_F32, n_out, 1, FILL_UNIFORM);
}

static bool add_norm(const tiny_model_config *cfg, uint64_t seed, gguf_writer *w,
                     const char *prefix) {
    char name[128];
    snprintf(name, sizeof name, "%s.weight", prefix);
    if (!add_weights(cfg, seed, w, name, MOAS_TYPE_F32, cfg->n_embd, 1, FILL_NORM_WEIGHT)) {
        return false;
    }
    if (!cfg->bias) {
        return true;
    }
    snprintf(name, sizeof name, "%s.bias", prefix);
    return add_weights(cfg, seed, w, name, MOAS_TYPE_F32, cfg->n_embd, 1, FILL_UNIFORM);
}

/* ---- keys ------------------------------------------------------------------------- */

static bool keep(const tiny_model_config *cfg, const char *key) {
    return cfg->omit_key == NULL || strcmp(cfg->omit_key, key) != 0;
}

static const char *mixing_name(moas_mixing m) {
    switch (m) {
    case MOAS_MIXING_SINGLE:
        return "single";
    case MOAS_MIXING_MEAN:
        return "mean";
    default:
        return "router";
    }
}

static void add_keys(const tiny_model_config *cfg, gguf_writer *w, const char *const *vocab,
                     int32_t n_vocab) {
    uint32_t kv_heads[TINY_MODEL_MAX_SCHEMES];

    if (keep(cfg, "general.architecture")) {
        gguf_writer_add_string(w, "general.architecture", "moas");
    }
    if (cfg->alignment != 0) {
        if (keep(cfg, "general.alignment")) {
            gguf_writer_set_alignment(w, cfg->alignment);
        } else {
            gguf_writer_set_layout_alignment(w, cfg->alignment);
        }
    }
    if (cfg->name != NULL && keep(cfg, "general.name")) {
        gguf_writer_add_string(w, "general.name", cfg->name);
    }
    if (keep(cfg, "moas.context_length")) {
        gguf_writer_add_u32(w, "moas.context_length", (uint32_t)cfg->n_ctx_train);
    }
    if (keep(cfg, "moas.embedding_length")) {
        gguf_writer_add_u32(w, "moas.embedding_length", (uint32_t)cfg->n_embd);
    }
    if (keep(cfg, "moas.block_count")) {
        gguf_writer_add_u32(w, "moas.block_count", (uint32_t)cfg->n_layer);
    }
    if (keep(cfg, "moas.feed_forward_length")) {
        gguf_writer_add_u32(w, "moas.feed_forward_length", (uint32_t)cfg->n_ff);
    }
    if (keep(cfg, "moas.attention.head_count")) {
        gguf_writer_add_u32(w, "moas.attention.head_count", (uint32_t)cfg->n_head);
    }
    if (keep(cfg, "moas.attention.layer_norm_epsilon")) {
        gguf_writer_add_f32(w, "moas.attention.layer_norm_epsilon", cfg->eps);
    }
    if (keep(cfg, "moas.attention.scheme_kv_heads")) {
        for (int32_t s = 0; s < cfg->n_scheme; s++) {
            kv_heads[s] = (uint32_t)cfg->scheme_n_kv[s];
        }
        gguf_writer_add_array(w, "moas.attention.scheme_kv_heads", MOAS_META_UINT32, kv_heads,
                              (size_t)cfg->n_scheme);
    }
    if (keep(cfg, "moas.attention.mixing")) {
        gguf_writer_add_string(w, "moas.attention.mixing", mixing_name(cfg->mixing));
    }
    if (cfg->kv_sharing != NULL && keep(cfg, "moas.attention.kv_sharing")) {
        gguf_writer_add_string(w, "moas.attention.kv_sharing", cfg->kv_sharing);
    }
    if (cfg->mixing == MOAS_MIXING_ROUTER && keep(cfg, "moas.router.hidden_length")) {
        gguf_writer_add_u32(w, "moas.router.hidden_length", (uint32_t)cfg->router_hidden);
    }
    if (keep(cfg, "moas.bias")) {
        gguf_writer_add_bool(w, "moas.bias", cfg->bias);
    }
    if (cfg->rope && keep(cfg, "moas.position_encoding")) {
        gguf_writer_add_string(w, "moas.position_encoding", "rope");
    }
    if (cfg->rope && keep(cfg, "moas.rope.freq_base")) {
        gguf_writer_add_f32(w, "moas.rope.freq_base", 10000.0f);
    }
    if (cfg->rms_norm && keep(cfg, "moas.norm_type")) {
        gguf_writer_add_string(w, "moas.norm_type", "rms");
    }
    if (cfg->swiglu && keep(cfg, "moas.feed_forward_type")) {
        gguf_writer_add_string(w, "moas.feed_forward_type", "swiglu");
    }
    if (keep(cfg, "tokenizer.ggml.model")) {
        gguf_writer_add_string(w, "tokenizer.ggml.model", "char");
    }
    if (keep(cfg, "tokenizer.ggml.tokens")) {
        gguf_writer_add_array_string(w, "tokenizer.ggml.tokens", vocab, (size_t)n_vocab);
    }
}

/* ---- the model -------------------------------------------------------------------- */

static bool config_sizes(const tiny_model_config *cfg, const char *const **vocab,
                         int32_t *n_vocab) {
    if (cfg->n_layer < 0 || cfg->n_embd <= 0 || cfg->n_head <= 0 || cfg->n_ff <= 0 ||
        cfg->n_ctx_train <= 0 || cfg->n_embd % cfg->n_head != 0 || cfg->n_scheme < 1 ||
        cfg->n_scheme > TINY_MODEL_MAX_SCHEMES ||
        (cfg->mixing == MOAS_MIXING_ROUTER && cfg->router_hidden <= 0)) {
        return false;
    }
    for (int32_t s = 0; s < cfg->n_scheme; s++) {
        if (cfg->scheme_n_kv[s] <= 0) {
            return false;
        }
    }
    if (cfg->vocab != NULL) {
        *vocab = cfg->vocab;
        *n_vocab = cfg->n_vocab;
    } else {
        *vocab = default_vocab;
        *n_vocab = cfg->n_vocab > 0 ? cfg->n_vocab : TINY_MODEL_DEFAULT_VOCAB;
        if (*n_vocab > TINY_MODEL_DEFAULT_VOCAB) {
            return false;
        }
    }
    return *n_vocab > 0;
}

int32_t tiny_model_n_tensors(const tiny_model_config *cfg) {
    tiny_model_config def;
    if (cfg == NULL) {
        tiny_model_config_default(&def);
        cfg = &def;
    }
    const int32_t b = cfg->bias ? 2 : 1;  // tensors per Linear or LayerNorm
    const bool pooled = cfg->kv_sharing != NULL && strcmp(cfg->kv_sharing, "pooled") == 0;
    int32_t per_layer = b + 4 * (pooled ? 1 : cfg->n_scheme) * b + b + (cfg->swiglu ? 3 : 2) * b;
    if (cfg->mixing == MOAS_MIXING_ROUTER) {
        per_layer += 2 * b;
    }
    return (cfg->rope ? 1 : 2) + b + (cfg->tied ? 0 : 1) + cfg->n_layer * per_layer;
}

bool tiny_model_write(const tiny_model_config *cfg, uint64_t seed, gguf_writer *w) {
    tiny_model_config def;
    const char *const *vocab;
    int32_t n_vocab;
    char name[128];

    if (cfg == NULL) {
        tiny_model_config_default(&def);
        cfg = &def;
    }
    if (!config_sizes(cfg, &vocab, &n_vocab)) {
        return false;
    }
    const int64_t n_embd = cfg->n_embd, head_dim = cfg->n_embd / cfg->n_head;

    add_keys(cfg, w, vocab, n_vocab);

    bool ok = add_weights(cfg, seed, w, "token_embd.weight", cfg->emb_type, n_embd, n_vocab,
                          FILL_UNIFORM) &&
              (cfg->rope || add_weights(cfg, seed, w, "position_embd.weight", cfg->emb_type,
                                        n_embd, cfg->n_ctx_train, FILL_UNIFORM));
    for (int32_t l = 0; ok && l < cfg->n_layer; l++) {
        snprintf(name, sizeof name, "blk.%d.attn_norm", (int)l);
        ok = add_norm(cfg, seed, w, name);
        if (cfg->kv_sharing != NULL && strcmp(cfg->kv_sharing, "pooled") == 0) {
            /* pooled K/V: one set of projections, K and V with all heads */
            static const char *const proj[4] = {"q", "k", "v", "output"};
            for (int i = 0; ok && i < 4; i++) {
                snprintf(name, sizeof name, "blk.%d.attn_%s", (int)l, proj[i]);
                ok = add_linear(cfg, seed, w, name, n_embd, n_embd);
            }
        }
        for (int32_t s = 0; ok && s < cfg->n_scheme &&
                            !(cfg->kv_sharing && strcmp(cfg->kv_sharing, "pooled") == 0); s++) {
            const int64_t n_kv_embd = cfg->scheme_n_kv[s] * head_dim;
            snprintf(name, sizeof name, "blk.%d.attn_q.%d", (int)l, (int)s);
            ok = ok && add_linear(cfg, seed, w, name, n_embd, n_embd);
            snprintf(name, sizeof name, "blk.%d.attn_k.%d", (int)l, (int)s);
            ok = ok && add_linear(cfg, seed, w, name, n_embd, n_kv_embd);
            snprintf(name, sizeof name, "blk.%d.attn_v.%d", (int)l, (int)s);
            ok = ok && add_linear(cfg, seed, w, name, n_embd, n_kv_embd);
            snprintf(name, sizeof name, "blk.%d.attn_output.%d", (int)l, (int)s);
            ok = ok && add_linear(cfg, seed, w, name, n_embd, n_embd);
        }
        if (ok && cfg->mixing == MOAS_MIXING_ROUTER) {
            snprintf(name, sizeof name, "blk.%d.attn_router_up", (int)l);
            ok = add_linear(cfg, seed, w, name, n_embd, cfg->router_hidden);
            snprintf(name, sizeof name, "blk.%d.attn_router_down", (int)l);
            ok = ok && add_linear(cfg, seed, w, name, cfg->router_hidden, cfg->n_scheme);
        }
        snprintf(name, sizeof name, "blk.%d.ffn_norm", (int)l);
        ok = ok && add_norm(cfg, seed, w, name);
        if (cfg->swiglu) {
            snprintf(name, sizeof name, "blk.%d.ffn_gate", (int)l);
            ok = ok && add_linear(cfg, seed, w, name, n_embd, cfg->n_ff);
        }
        snprintf(name, sizeof name, "blk.%d.ffn_up", (int)l);
        ok = ok && add_linear(cfg, seed, w, name, n_embd, cfg->n_ff);
        snprintf(name, sizeof name, "blk.%d.ffn_down", (int)l);
        ok = ok && add_linear(cfg, seed, w, name, cfg->n_ff, n_embd);
    }
    ok = ok && add_norm(cfg, seed, w, "output_norm");
    if (ok && !cfg->tied) {
        ok = add_weights(cfg, seed, w, "output.weight", cfg->mat_type, n_embd, n_vocab,
                         FILL_UNIFORM);
    }
    return ok;
}

uint8_t *tiny_model_image(const tiny_model_config *cfg, uint64_t seed, size_t *size) {
    gguf_writer *w = gguf_writer_create();
    uint8_t *image = NULL;

    if (w != NULL && tiny_model_write(cfg, seed, w)) {
        image = gguf_writer_finish(w, size);
    }
    gguf_writer_free(w);
    return image;
}
