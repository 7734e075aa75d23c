/*
 * model.c - load a GGUF file and bind it to the moas architecture.
 *
 * Owns: where the file's bytes live (mmap, our heap copy, or the caller's buffer), the
 * hyperparameters, a typed view of every weight and the vocabulary; the public model,
 * tensor and metadata queries. Does not own: parsing the container (gguf.c) or using
 * the weights (forward.c).
 *
 * Every key and tensor docs/FORMAT.md lists is checked here, before any context can
 * touch the model: presence, type and exact shape. Weights are never copied or
 * converted; kernels read them in their stored type.
 */
#include "model.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define MOAS_HAVE_MMAP 1
#else
#define MOAS_HAVE_MMAP 0
#endif

/* Bounds on hyperparameters. They keep every size computed from them far from
 * overflow on 64-bit hosts and refuse absurd files early; real models are well inside. */
#define MAX_LAYERS 4096
#define MAX_EMBD (1 << 16)
#define MAX_FF (1 << 20)
#define MAX_CTX (1 << 20)
#define MAX_VOCAB (1 << 22)

/* ---- hyperparameters --------------------------------------------------------- */

static moas_status read_uint(const moas_gguf *g, const char *key, int64_t max, bool required,
                             int32_t *out) {
    const moas_gguf_kv *kv = moas__gguf_find_kv(g, key);
    int64_t value;

    if (kv == NULL) {
        MOAS_RETURN_IF(required, MOAS_ERR_CORRUPT, "model: required key '%s' is missing", key);
        return MOAS_OK;
    }
    switch (kv->value.type) {
    case MOAS_META_UINT8: case MOAS_META_UINT16: case MOAS_META_UINT32: case MOAS_META_UINT64:
        MOAS_RETURN_IF(kv->value.v.u64 > (uint64_t)max, MOAS_ERR_CORRUPT,
                       "model: key '%s' is %llu, above the limit %lld", key,
                       (unsigned long long)kv->value.v.u64, (long long)max);
        value = (int64_t)kv->value.v.u64;
        break;
    case MOAS_META_INT8: case MOAS_META_INT16: case MOAS_META_INT32: case MOAS_META_INT64:
        value = kv->value.v.i64;
        MOAS_RETURN_IF(value > max, MOAS_ERR_CORRUPT,
                       "model: key '%s' is %lld, above the limit %lld", key, (long long)value,
                       (long long)max);
        break;
    default:
        MOAS_RETURN_IF(true, MOAS_ERR_CORRUPT, "model: key '%s' must be an integer, has type %d",
                       key, (int)kv->value.type);
    }
    MOAS_RETURN_IF(value < 1, MOAS_ERR_CORRUPT, "model: key '%s' is %lld, must be at least 1", key,
                   (long long)value);
    *out = (int32_t)value;
    return MOAS_OK;
}

static moas_status read_string(const moas_gguf *g, const char *key, bool required,
                               const char **out) {
    const moas_gguf_kv *kv = moas__gguf_find_kv(g, key);
    if (kv == NULL) {
        MOAS_RETURN_IF(required, MOAS_ERR_CORRUPT, "model: required key '%s' is missing", key);
        return MOAS_OK;
    }
    MOAS_RETURN_IF(kv->value.type != MOAS_META_STRING, MOAS_ERR_CORRUPT,
                   "model: key '%s' must be a string, has type %d", key, (int)kv->value.type);
    /* the text is compared as a C string: "moas\0llama" must not pass for "moas" */
    MOAS_RETURN_IF(strlen(kv->value.v.str.text) != kv->value.v.str.len, MOAS_ERR_CORRUPT,
                   "model: key '%s' holds a NUL byte inside its %llu bytes", key,
                   (unsigned long long)kv->value.v.str.len);
    *out = kv->value.v.str.text;
    return MOAS_OK;
}

/* One of two names for a string key: false for `off` (also when the key is absent),
 * true for `on`, an error for anything else. */
static moas_status read_choice(const moas_gguf *g, const char *key, const char *off,
                               const char *on, bool *out) {
    const char *value = off;
    MOAS_TRY(read_string(g, key, false, &value));
    MOAS_RETURN_IF(strcmp(value, off) != 0 && strcmp(value, on) != 0, MOAS_ERR_UNSUPPORTED,
                   "model: %s '%s' is unknown (%s, %s)", key, value, off, on);
    *out = strcmp(value, on) == 0;
    return MOAS_OK;
}

/* The block options of docs/FORMAT.md: each key absent means the published block. */
static moas_status read_block_options(moas_model *m) {
    const moas_gguf *g = m->gguf;

    MOAS_TRY(read_choice(g, "moas.position_encoding", "learned", "rope", &m->rope));
    MOAS_TRY(read_choice(g, "moas.norm_type", "layer", "rms", &m->rms_norm));
    MOAS_TRY(read_choice(g, "moas.feed_forward_type", "gelu", "swiglu", &m->swiglu));
    m->rope_base = 10000.0;
    if (m->rope) {
        const moas_gguf_kv *kv = moas__gguf_find_kv(g, "moas.rope.freq_base");
        MOAS_RETURN_IF(m->head_dim % 2 != 0, MOAS_ERR_CORRUPT,
                       "model: rope rotates pairs, but the head size %d is odd", m->head_dim);
        if (kv != NULL) {
            MOAS_RETURN_IF(kv->value.type != MOAS_META_FLOAT32 &&
                           kv->value.type != MOAS_META_FLOAT64, MOAS_ERR_CORRUPT,
                           "model: key 'moas.rope.freq_base' must be a float");
            MOAS_RETURN_IF(!(kv->value.v.f64 > 1.0 && kv->value.v.f64 < 1e30), MOAS_ERR_CORRUPT,
                           "model: rope.freq_base %g is outside (1, 1e30)", kv->value.v.f64);
            m->rope_base = kv->value.v.f64;
        }
    }
    return MOAS_OK;
}

static moas_status read_hparams(moas_model *m) {
    const moas_gguf *g = m->gguf;
    const char *arch = NULL, *mixing = NULL, *sharing = "independent";
    const moas_gguf_kv *kv;

    MOAS_TRY(read_string(g, "general.architecture", true, &arch));
    MOAS_RETURN_IF(strcmp(arch, "moas") != 0, MOAS_ERR_UNSUPPORTED,
                   "model: architecture '%s' is not supported (expected 'moas')", arch);
    m->name = "";
    MOAS_TRY(read_string(g, "general.name", false, &m->name));

    MOAS_TRY(read_uint(g, "moas.context_length", MAX_CTX, true, &m->n_ctx_train));
    MOAS_TRY(read_uint(g, "moas.embedding_length", MAX_EMBD, true, &m->n_embd));
    MOAS_TRY(read_uint(g, "moas.block_count", MAX_LAYERS, true, &m->n_layer));
    MOAS_TRY(read_uint(g, "moas.feed_forward_length", MAX_FF, true, &m->n_ff));
    MOAS_TRY(read_uint(g, "moas.attention.head_count", MOAS_MAX_HEADS, true, &m->n_head));
    MOAS_RETURN_IF(m->n_embd % m->n_head != 0, MOAS_ERR_CORRUPT,
                   "model: embedding_length %d is not a multiple of head_count %d", m->n_embd,
                   m->n_head);
    m->head_dim = m->n_embd / m->n_head;

    kv = moas__gguf_find_kv(g, "moas.attention.layer_norm_epsilon");
    MOAS_RETURN_IF(kv == NULL, MOAS_ERR_CORRUPT,
                   "model: required key 'moas.attention.layer_norm_epsilon' is missing");
    MOAS_RETURN_IF(kv->value.type != MOAS_META_FLOAT32 && kv->value.type != MOAS_META_FLOAT64,
                   MOAS_ERR_CORRUPT,
                   "model: key 'moas.attention.layer_norm_epsilon' must be a float");
    MOAS_RETURN_IF(!(kv->value.v.f64 > 0.0 && kv->value.v.f64 < 1.0), MOAS_ERR_CORRUPT,
                   "model: layer_norm_epsilon %g is outside (0, 1)", kv->value.v.f64);
    m->norm_eps = (float)kv->value.v.f64;

    /* the schemes: their KV-head counts */
    kv = moas__gguf_find_kv(g, "moas.attention.scheme_kv_heads");
    MOAS_RETURN_IF(kv == NULL, MOAS_ERR_CORRUPT,
                   "model: required key 'moas.attention.scheme_kv_heads' is missing");
    /* moas__gguf_array_int() reads bools too; a bool is no count of heads */
    MOAS_RETURN_IF(kv->value.type != MOAS_META_ARRAY || kv->value.elem_type == MOAS_META_BOOL,
                   MOAS_ERR_CORRUPT,
                   "model: 'moas.attention.scheme_kv_heads' must be an array of integers");
    MOAS_RETURN_IF(kv->value.n < 1 || kv->value.n > MOAS_MAX_SCHEMES, MOAS_ERR_CORRUPT,
                   "model: %llu attention schemes; 1 to %d are supported",
                   (unsigned long long)kv->value.n, MOAS_MAX_SCHEMES);
    m->n_scheme = (int32_t)kv->value.n;
    for (int32_t s = 0; s < m->n_scheme; s++) {
        int64_t n_kv;
        MOAS_RETURN_IF(!moas__gguf_array_int(&kv->value, (uint64_t)s, &n_kv), MOAS_ERR_CORRUPT,
                       "model: 'moas.attention.scheme_kv_heads' must be an array of integers");
        MOAS_RETURN_IF(n_kv < 1 || n_kv > m->n_head || m->n_head % n_kv != 0, MOAS_ERR_CORRUPT,
                       "model: scheme %d has %lld KV heads, which does not divide head_count %d",
                       s, (long long)n_kv, m->n_head);
        m->scheme_n_kv[s] = (int32_t)n_kv;
    }

    MOAS_TRY(read_string(g, "moas.attention.mixing", true, &mixing));
    if (strcmp(mixing, "single") == 0) {
        m->mixing = MOAS_MIXING_SINGLE;
        MOAS_RETURN_IF(m->n_scheme != 1, MOAS_ERR_CORRUPT,
                       "model: mixing 'single' needs exactly one scheme, the file lists %d",
                       m->n_scheme);
    } else if (strcmp(mixing, "mean") == 0) {
        m->mixing = MOAS_MIXING_MEAN;
    } else if (strcmp(mixing, "router") == 0) {
        m->mixing = MOAS_MIXING_ROUTER;
        MOAS_TRY(read_uint(g, "moas.router.hidden_length", MAX_EMBD, true, &m->n_router));
    } else {
        MOAS_RETURN_IF(true, MOAS_ERR_UNSUPPORTED,
                       "model: attention mixing '%s' is unknown (single, mean, router)", mixing);
    }

    MOAS_TRY(read_string(g, "moas.attention.kv_sharing", false, &sharing));
    if (strcmp(sharing, "pooled") == 0) {
        /* Every scheme pools the H heads of the one full K/V into its n_kv groups, which
         * only needs n_kv to divide H (checked above). No scheme has to keep all H: [2]
         * is a GQA model, [1] an MQA one, [2, 1] routes between the two. */
        m->kv_sharing = MOAS_KV_SHARING_POOLED;
    } else {
        MOAS_RETURN_IF(strcmp(sharing, "independent") != 0, MOAS_ERR_UNSUPPORTED,
                       "model: kv_sharing '%s' is unknown (independent, pooled)", sharing);
        m->kv_sharing = MOAS_KV_SHARING_INDEPENDENT;
    }

    kv = moas__gguf_find_kv(g, "moas.bias");
    MOAS_RETURN_IF(kv == NULL, MOAS_ERR_CORRUPT, "model: required key 'moas.bias' is missing");
    MOAS_RETURN_IF(kv->value.type != MOAS_META_BOOL, MOAS_ERR_CORRUPT,
                   "model: key 'moas.bias' must be a bool");
    m->bias = kv->value.v.u64 != 0;
    return read_block_options(m);
}

/* ---- tensors ---------------------------------------------------------------- */

/* Allowed types: matrices F32/F16/Q8_0, embeddings F32/F16, vectors F32. */
enum tensor_kind { KIND_VECTOR, KIND_EMBEDDING, KIND_MATRIX };

static void format_shape(char *buf, size_t cap, uint32_t n_dims, const int64_t *ne) {
    size_t used = 0;
    used += (size_t)snprintf(buf, cap, "[");
    for (uint32_t i = 0; i < n_dims && used < cap; i++) {
        used += (size_t)snprintf(buf + used, cap - used, "%s%lld", i ? ", " : "", (long long)ne[i]);
    }
    if (used < cap) {
        snprintf(buf + used, cap - used, "]");
    }
}

/* Find tensor `name` and check it has GGUF shape [ne0] (ne1 == 0) or [ne0, ne1]. Dims of
 * 1 at the end may be written or left out: ggml's writer leaves them out, so an [R, 1]
 * matrix (one scheme's router) is stored as [R]. */
static moas_status bind(const moas_model *m, enum tensor_kind kind, int64_t ne0, int64_t ne1,
                        const char *name, const moas_gguf_tensor **out) {
    const moas_gguf_tensor *t = moas__gguf_find_tensor(m->gguf, name);
    const uint32_t want_dims = ne1 == 0 ? 1 : 2;
    const int64_t want[2] = {ne0, ne1};
    char got_shape[96], want_shape[96];
    bool type_ok;

    MOAS_RETURN_IF(t == NULL, MOAS_ERR_CORRUPT, "model: tensor '%s' is missing", name);
    format_shape(got_shape, sizeof got_shape, t->n_dims, t->ne);
    format_shape(want_shape, sizeof want_shape, want_dims, want);
    /* the reader sets the dims past n_dims to 1 */
    MOAS_RETURN_IF(t->ne[0] != ne0 || t->ne[1] != (ne1 == 0 ? 1 : ne1) || t->ne[2] != 1 ||
                       t->ne[3] != 1,
                   MOAS_ERR_CORRUPT, "model: tensor '%s' has shape %s, expected %s", name,
                   got_shape, want_shape);
    switch (kind) {
    case KIND_VECTOR:
        type_ok = t->type == MOAS_TYPE_F32;
        break;
    case KIND_EMBEDDING:
        type_ok = t->type == MOAS_TYPE_F32 || t->type == MOAS_TYPE_F16;
        break;
    default:
        type_ok = t->type == MOAS_TYPE_F32 || t->type == MOAS_TYPE_F16 ||
                  t->type == MOAS_TYPE_Q8_0;
        break;
    }
    MOAS_RETURN_IF(!type_ok, MOAS_ERR_UNSUPPORTED, "model: tensor '%s' has type %s, which is not "
                   "supported for %s", name, moas__type_name(t->type),
                   kind == KIND_VECTOR ? "a vector (F32 only)"
                   : kind == KIND_EMBEDDING ? "an embedding (F32, F16)"
                                            : "a matrix (F32, F16, Q8_0)");
    /* Kernels read elements in place: an f32 must sit on a multiple of 4, halves and
     * Q8_0 scales on a multiple of 2. Only a file whose general.alignment is below
     * that can break the rule. */
    const uintptr_t need = t->type == MOAS_TYPE_F32 ? 4 : 2;
    MOAS_RETURN_IF((uintptr_t)t->data % need != 0, MOAS_ERR_UNSUPPORTED,
                   "model: tensor '%s' data at file offset %llu is not aligned to %u bytes "
                   "(general.alignment is %u)", name,
                   (unsigned long long)(m->gguf->data_offset + t->offset), (unsigned)need,
                   (unsigned)m->gguf->alignment);
    *out = t;
    return MOAS_OK;
}

/* A matrix of n_rows outputs by n_cols inputs: GGUF shape [n_cols, n_rows]. */
static moas_status bind_matrix(const moas_model *m, enum tensor_kind kind, int32_t n_rows,
                               int32_t n_cols, const char *name, moas_weight *w) {
    const moas_gguf_tensor *t;
    uint64_t row_bytes;

    MOAS_TRY(bind(m, kind, n_cols, n_rows, name, &t));
    MOAS_RETURN_IF(!moas__type_row_bytes(t->type, n_cols, &row_bytes), MOAS_ERR_CORRUPT,
                   "model: tensor '%s' rows of %d do not fit type %s", name, n_cols,
                   moas__type_name(t->type));
    w->data = t->data;
    w->type = t->type;
    w->n_rows = n_rows;
    w->n_cols = n_cols;
    w->row_bytes = (size_t)row_bytes;
    return MOAS_OK;
}

static moas_status bind_vector(const moas_model *m, int32_t n, const char *name,
                               const float **out) {
    const moas_gguf_tensor *t;
    MOAS_TRY(bind(m, KIND_VECTOR, n, 0, name, &t));
    *out = (const float *)(const void *)t->data;
    return MOAS_OK;
}

/* A bias: bound when the model has biases, NULL otherwise. */
static moas_status bind_bias(const moas_model *m, int32_t n, const char *name,
                             const float **out) {
    *out = NULL;
    if (!m->bias) {
        MOAS_RETURN_IF(moas__gguf_find_tensor(m->gguf, name) != NULL, MOAS_ERR_CORRUPT,
                       "model: tensor '%s' is present but moas.bias is false", name);
        return MOAS_OK;
    }
    return bind_vector(m, n, name, out);
}

/* Bind "prefix.weight" (and "prefix.bias") as a matrix of n_rows x n_cols. */
static moas_status bind_linear(const moas_model *m, const char *prefix, int32_t n_rows,
                               int32_t n_cols, moas_weight *w, const float **b) {
    char name[MOAS_GGUF_MAX_NAME];
    snprintf(name, sizeof name, "%s.weight", prefix);
    MOAS_TRY(bind_matrix(m, KIND_MATRIX, n_rows, n_cols, name, w));
    snprintf(name, sizeof name, "%s.bias", prefix);
    return bind_bias(m, n_rows, name, b);
}

static moas_status bind_norm(const moas_model *m, const char *prefix, const float **w,
                             const float **b) {
    char name[MOAS_GGUF_MAX_NAME];
    snprintf(name, sizeof name, "%s.weight", prefix);
    MOAS_TRY(bind_vector(m, m->n_embd, name, w));
    snprintf(name, sizeof name, "%s.bias", prefix);
    return bind_bias(m, m->n_embd, name, b);
}

/* A tensor "prefix.weight" or "prefix.bias" that this model's options rule out is an
 * error: the file was written for another block. */
static moas_status refuse_tensor(const moas_model *m, const char *prefix, const char *why) {
    static const char *const suffix[2] = {"weight", "bias"};
    char name[MOAS_GGUF_MAX_NAME];
    for (int i = 0; i < 2; i++) {
        snprintf(name, sizeof name, "%s.%s", prefix, suffix[i]);
        MOAS_RETURN_IF(moas__gguf_find_tensor(m->gguf, name) != NULL, MOAS_ERR_CORRUPT,
                       "model: tensor '%s' is present but %s", name, why);
    }
    return MOAS_OK;
}

static moas_status bind_layer(moas_model *m, int32_t l) {
    moas_layer *layer = &m->layers[l];
    const int32_t C = m->n_embd;
    char prefix[64];

    snprintf(prefix, sizeof prefix, "blk.%d.attn_norm", l);
    MOAS_TRY(bind_norm(m, prefix, &layer->attn_norm_w, &layer->attn_norm_b));
    if (m->kv_sharing == MOAS_KV_SHARING_POOLED) {
        moas_scheme_weights *sw = &layer->shared;
        sw->n_kv = m->n_head;
        snprintf(prefix, sizeof prefix, "blk.%d.attn_q", l);
        MOAS_TRY(bind_linear(m, prefix, C, C, &sw->wq, &sw->bq));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_k", l);
        MOAS_TRY(bind_linear(m, prefix, C, C, &sw->wk, &sw->bk));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_v", l);
        MOAS_TRY(bind_linear(m, prefix, C, C, &sw->wv, &sw->bv));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_output", l);
        MOAS_TRY(bind_linear(m, prefix, C, C, &sw->wo, &sw->bo));
    }
    for (int32_t s = 0; s < m->n_scheme && m->kv_sharing == MOAS_KV_SHARING_INDEPENDENT; s++) {
        moas_scheme_weights *sw = &layer->scheme[s];
        const int32_t kv_dim = m->scheme_n_kv[s] * m->head_dim;
        sw->n_kv = m->scheme_n_kv[s];
        snprintf(prefix, sizeof prefix, "blk.%d.attn_q.%d", l, s);
        MOAS_TRY(bind_linear(m, prefix, C, C, &sw->wq, &sw->bq));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_k.%d", l, s);
        MOAS_TRY(bind_linear(m, prefix, kv_dim, C, &sw->wk, &sw->bk));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_v.%d", l, s);
        MOAS_TRY(bind_linear(m, prefix, kv_dim, C, &sw->wv, &sw->bv));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_output.%d", l, s);
        MOAS_TRY(bind_linear(m, prefix, C, C, &sw->wo, &sw->bo));
    }
    if (m->mixing == MOAS_MIXING_ROUTER) {
        snprintf(prefix, sizeof prefix, "blk.%d.attn_router_up", l);
        MOAS_TRY(bind_linear(m, prefix, m->n_router, C, &layer->router_up, &layer->router_up_b));
        snprintf(prefix, sizeof prefix, "blk.%d.attn_router_down", l);
        MOAS_TRY(bind_linear(m, prefix, m->n_scheme, m->n_router, &layer->router_down,
                             &layer->router_down_b));
    }
    snprintf(prefix, sizeof prefix, "blk.%d.ffn_norm", l);
    MOAS_TRY(bind_norm(m, prefix, &layer->ffn_norm_w, &layer->ffn_norm_b));
    snprintf(prefix, sizeof prefix, "blk.%d.ffn_up", l);
    MOAS_TRY(bind_linear(m, prefix, m->n_ff, C, &layer->ffn_up, &layer->ffn_up_b));
    snprintf(prefix, sizeof prefix, "blk.%d.ffn_down", l);
    MOAS_TRY(bind_linear(m, prefix, C, m->n_ff, &layer->ffn_down, &layer->ffn_down_b));
    snprintf(prefix, sizeof prefix, "blk.%d.ffn_gate", l);
    if (m->swiglu) {
        MOAS_TRY(bind_linear(m, prefix, m->n_ff, C, &layer->ffn_gate, &layer->ffn_gate_b));
    } else {
        MOAS_TRY(refuse_tensor(m, prefix, "moas.feed_forward_type is not 'swiglu'"));
    }
    return MOAS_OK;
}

/* ---- vocabulary -------------------------------------------------------------- */

/* Token ids by code point. qsort's comparator cannot take context in C11, so the ids
 * are sorted through a small array of (code point, id) pairs instead of a global. */
typedef struct {
    uint32_t cp;
    int32_t id;
} cp_entry;

static int compare_cp(const void *a, const void *b) {
    const cp_entry *x = a, *y = b;
    return (x->cp > y->cp) - (x->cp < y->cp);
}

static moas_status read_vocab(moas_model *m) {
    const moas_gguf_kv *kv = moas__gguf_find_kv(m->gguf, "tokenizer.ggml.tokens");
    const char *model_kind = "char";
    cp_entry *entries;

    MOAS_RETURN_IF(kv == NULL, MOAS_ERR_CORRUPT,
                   "model: required key 'tokenizer.ggml.tokens' is missing");
    MOAS_RETURN_IF(kv->value.type != MOAS_META_ARRAY || kv->value.elem_type != MOAS_META_STRING,
                   MOAS_ERR_CORRUPT, "model: 'tokenizer.ggml.tokens' must be an array of strings");
    MOAS_RETURN_IF(kv->value.n < 1 || kv->value.n > MAX_VOCAB, MOAS_ERR_CORRUPT,
                   "model: vocabulary of %llu tokens; 1 to %d are supported",
                   (unsigned long long)kv->value.n, MAX_VOCAB);
    MOAS_TRY(read_string(m->gguf, "tokenizer.ggml.model", false, &model_kind));
    MOAS_RETURN_IF(strcmp(model_kind, "char") != 0, MOAS_ERR_UNSUPPORTED,
                   "model: tokenizer '%s' is not supported (expected 'char')", model_kind);

    m->n_vocab = (int32_t)kv->value.n;
    m->vocab = kv->value.v.strs;
    m->vocab_cp = moas__calloc(m->alloc, (size_t)m->n_vocab, sizeof *m->vocab_cp);
    m->cp_order = moas__calloc(m->alloc, (size_t)m->n_vocab, sizeof *m->cp_order);
    entries = moas__calloc(m->alloc, (size_t)m->n_vocab, sizeof *entries);
    if (m->vocab_cp == NULL || m->cp_order == NULL || entries == NULL) {
        moas__free(m->alloc, entries);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY, "model: no memory for a vocabulary of %d tokens",
                       m->n_vocab);
    }
    for (int32_t i = 0; i < m->n_vocab; i++) {
        const moas_gguf_string *tok = &m->vocab[i];
        uint32_t cp;
        size_t n_bytes;
        if (!moas__utf8_decode(tok->text, (size_t)tok->len, &cp, &n_bytes) ||
            n_bytes != tok->len) {
            moas__free(m->alloc, entries);
            MOAS_RETURN_IF(true, MOAS_ERR_CORRUPT,
                           "model: token %d is not exactly one UTF-8 character (%llu bytes)", i,
                           (unsigned long long)tok->len);
        }
        m->vocab_cp[i] = cp;
        entries[i].cp = cp;
        entries[i].id = i;
    }
    qsort(entries, (size_t)m->n_vocab, sizeof *entries, compare_cp);
    for (int32_t i = 0; i < m->n_vocab; i++) {
        if (i > 0 && entries[i].cp == entries[i - 1].cp) {
            const int32_t a = entries[i - 1].id, b = entries[i].id;
            moas__free(m->alloc, entries);
            MOAS_RETURN_IF(true, MOAS_ERR_CORRUPT, "model: tokens %d and %d are the same character "
                           "U+%04X", a < b ? a : b, a < b ? b : a, (unsigned)m->vocab_cp[a]);
        }
        m->cp_order[i] = entries[i].id;
    }
    moas__free(m->alloc, entries);
    return MOAS_OK;
}

/* ---- building ---------------------------------------------------------------- */

/* The RoPE table's largest size: 128 KB for a 1,024-token context of 32-wide heads;
 * a context too long for it keeps a table of its first positions. */
#define MOAS_ROPE_TABLE_MAX_BYTES ((size_t)16 << 20)

void moas__rope_angles(const moas_model *m, int32_t pos, int32_t i0, int32_t i1, float *cs,
                       float *sn) {
    for (int32_t i = i0; i < i1; i++) {
        const double angle = pos * pow(m->rope_base, -(double)(2 * i) / m->head_dim);
        cs[i - i0] = (float)cos(angle);
        sn[i - i0] = (float)sin(angle);
    }
}

/* Decode computed each token's angles: pow, sin and cos were 2.5% of a routed decode
 * at depths 896-1,024 of the shipped 1,024-token model. */
static moas_status build_rope_table(moas_model *m) {
    const int32_t n_pairs = m->head_dim / 2;
    const size_t row_bytes = (size_t)m->head_dim * sizeof(float);
    const size_t most = MOAS_ROPE_TABLE_MAX_BYTES / row_bytes;
    m->rope_positions = (size_t)m->n_ctx_train < most ? m->n_ctx_train : (int32_t)most;
    m->rope_table = moas__malloc(m->alloc, (size_t)m->rope_positions * row_bytes);
    MOAS_RETURN_IF(m->rope_table == NULL, MOAS_ERR_NO_MEMORY,
                   "model: no memory for the RoPE table of %d positions", m->rope_positions);
    for (int32_t pos = 0; pos < m->rope_positions; pos++) {
        float *row = m->rope_table + (size_t)pos * m->head_dim;
        moas__rope_angles(m, pos, 0, n_pairs, row, row + n_pairs);
    }
    return MOAS_OK;
}

/* ---- fingerprint ------------------------------------------------------------- */

static uint64_t fnv(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001b3ull;
    }
    return h;
}

/* The first row of a weight matrix, if the model has it. */
static uint64_t fnv_first_row(uint64_t h, const moas_weight *w) {
    return w->data != NULL ? fnv(h, w->data, w->row_bytes) : h;
}

/* A vector of n floats (a norm's), if the model has it. */
static uint64_t fnv_floats(uint64_t h, const float *v, int32_t n) {
    return v != NULL ? fnv(h, v, (size_t)n * sizeof *v) : h;
}

/* A matrix's bias (one float per row), if the model has it. */
static uint64_t fnv_bias(uint64_t h, const float *b, const moas_weight *w) {
    return fnv_floats(h, b, w->n_rows);
}

/* The model's fingerprint (enough to tell checkpoints apart without reading
 * gigabytes), as saved states carry it. Version 1: its shape, vocabulary, the first
 * row of the token and position tables, the output matrix and each layer's MLP
 * matrices, and each layer's attention norm weights. Version 2 adds what version 1 let
 * two models share: the block options (RoPE and its base, RMSNorm, SwiGLU, the norm's
 * epsilon) and the first row of every other matrix (attention, router, SwiGLU's gate)
 * with the MLP norm. Version 3 adds the rest of the vectors, whole: the final norm,
 * every norm's bias and every bias (a fine-tune of biases or norms alone changes no
 * matrix). */
static uint64_t fingerprint_hash(const moas_model *m, uint32_t version) {
    const int32_t shape[] = {m->n_layer, m->n_embd, m->n_head, m->n_ff, m->n_vocab,
                             m->n_ctx_train, m->n_scheme, m->n_router, (int32_t)m->mixing,
                             (int32_t)m->kv_sharing, m->bias ? 1 : 0};
    uint64_t h = fnv(0xcbf29ce484222325ull, shape, sizeof shape);
    h = fnv(h, m->scheme_n_kv, (size_t)m->n_scheme * sizeof *m->scheme_n_kv);
    h = fnv(h, m->vocab_cp, (size_t)m->n_vocab * sizeof *m->vocab_cp);
    const moas_weight *top[] = {&m->tok_embd, &m->pos_embd, &m->output};
    for (size_t i = 0; i < sizeof top / sizeof top[0]; i++) {
        h = fnv(h, top[i]->data, top[i]->row_bytes);
    }
    for (int32_t l = 0; l < m->n_layer; l++) {
        const moas_layer *y = &m->layers[l];
        h = fnv(h, y->ffn_up.data, y->ffn_up.row_bytes);
        h = fnv(h, y->ffn_down.data, y->ffn_down.row_bytes);
        h = fnv(h, y->attn_norm_w, (size_t)m->n_embd * sizeof(float));
    }
    if (version < 2) {
        return h;
    }
    const int32_t options[] = {m->rope ? 1 : 0, m->rms_norm ? 1 : 0, m->swiglu ? 1 : 0};
    h = fnv(h, options, sizeof options);
    h = fnv(h, &m->rope_base, sizeof m->rope_base);
    h = fnv(h, &m->norm_eps, sizeof m->norm_eps);
    for (int32_t l = 0; l < m->n_layer; l++) {
        const moas_layer *y = &m->layers[l];
        const bool pooled = m->kv_sharing == MOAS_KV_SHARING_POOLED;
        for (int32_t s = 0; s < (pooled ? 1 : m->n_scheme); s++) {
            const moas_scheme_weights *w = pooled ? &y->shared : &y->scheme[s];
            const moas_weight *mats[] = {&w->wq, &w->wk, &w->wv, &w->wo};
            for (size_t i = 0; i < sizeof mats / sizeof mats[0]; i++) {
                h = fnv_first_row(h, mats[i]);
            }
        }
        h = fnv_first_row(h, &y->router_up);
        h = fnv_first_row(h, &y->router_down);
        h = fnv_first_row(h, &y->ffn_gate);
        h = fnv(h, y->ffn_norm_w, (size_t)m->n_embd * sizeof(float));
    }
    if (version < 3) {
        return h;
    }
    const int32_t C = m->n_embd;
    h = fnv_floats(h, m->out_norm_w, C);
    h = fnv_floats(h, m->out_norm_b, C);
    for (int32_t l = 0; l < m->n_layer; l++) {
        const moas_layer *y = &m->layers[l];
        const bool pooled = m->kv_sharing == MOAS_KV_SHARING_POOLED;
        h = fnv_floats(h, y->attn_norm_b, C);
        h = fnv_floats(h, y->ffn_norm_b, C);
        for (int32_t s = 0; s < (pooled ? 1 : m->n_scheme); s++) {
            const moas_scheme_weights *w = pooled ? &y->shared : &y->scheme[s];
            h = fnv_bias(h, w->bq, &w->wq);
            h = fnv_bias(h, w->bk, &w->wk);
            h = fnv_bias(h, w->bv, &w->wv);
            h = fnv_bias(h, w->bo, &w->wo);
        }
        h = fnv_bias(h, y->router_up_b, &y->router_up);
        h = fnv_bias(h, y->router_down_b, &y->router_down);
        h = fnv_bias(h, y->ffn_up_b, &y->ffn_up);
        h = fnv_bias(h, y->ffn_down_b, &y->ffn_down);
        h = fnv_bias(h, y->ffn_gate_b, &y->ffn_gate);
    }
    return h;
}

uint64_t moas__model_fingerprint(const moas_model *m, uint32_t version) {
    if (version != MOAS_FINGERPRINT_VERSION) {   /* an older state's: hashed each time */
        return fingerprint_hash(m, version);
    }
    /* the model is shared read-only; this one field is a cache, filled with the same
     * value by whichever thread comes first */
    _Atomic uint64_t *cache = &((moas_model *)m)->fingerprint;
    uint64_t print = atomic_load_explicit(cache, memory_order_relaxed);
    if (print == 0) {   /* a fingerprint that is 0 is only hashed every time */
        print = fingerprint_hash(m, version);
        atomic_store_explicit(cache, print, memory_order_relaxed);
    }
    return print;
}

static moas_status build(moas_model *m) {
    const moas_gguf_tensor *out;

    MOAS_TRY(moas__gguf_parse(m->image, m->image_size, m->alloc, &m->gguf));
    MOAS_TRY(read_hparams(m));
    MOAS_TRY(read_vocab(m));

    MOAS_TRY(bind_matrix(m, KIND_EMBEDDING, m->n_vocab, m->n_embd, "token_embd.weight",
                         &m->tok_embd));
    if (m->rope) {   /* positions are rotations: no table */
        MOAS_TRY(refuse_tensor(m, "position_embd", "moas.position_encoding is 'rope'"));
    } else {
        MOAS_TRY(bind_matrix(m, KIND_EMBEDDING, m->n_ctx_train, m->n_embd,
                             "position_embd.weight", &m->pos_embd));
    }
    MOAS_TRY(bind_norm(m, "output_norm", &m->out_norm_w, &m->out_norm_b));
    out = moas__gguf_find_tensor(m->gguf, "output.weight");
    if (out != NULL) {
        MOAS_TRY(bind_matrix(m, KIND_MATRIX, m->n_vocab, m->n_embd, "output.weight", &m->output));
    } else {
        m->output = m->tok_embd;
    }

    m->layers = moas__calloc(m->alloc, (size_t)m->n_layer, sizeof *m->layers);
    MOAS_RETURN_IF(m->layers == NULL, MOAS_ERR_NO_MEMORY, "model: no memory for %d layers",
                   m->n_layer);
    if (m->rope) {
        MOAS_TRY(build_rope_table(m));
    }
    for (int32_t l = 0; l < m->n_layer; l++) {
        MOAS_TRY(bind_layer(m, l));
    }

    m->n_params = 0;
    for (uint64_t i = 0; i < m->gguf->n_tensors; i++) {
        m->n_params += m->gguf->tensors[i].n_elements;
    }
    return MOAS_OK;
}

static moas_status model_new(const moas_model_params *params, moas_model **out) {
    moas_model_params p;
    moas_model *m;

    moas_model_params_init(&p);
    if (params != NULL) {
        MOAS_TRY(moas__params_copy(&p, params, &moas__model_params_layout, "model_load"));
        MOAS_RETURN_IF(p.allocator != NULL &&
                       (p.allocator->alloc == NULL || p.allocator->free == NULL),
                       MOAS_ERR_INVALID_ARG, "model_load: allocator without alloc or free");
    }
    m = moas__calloc(p.allocator, 1, sizeof *m);
    MOAS_RETURN_IF(m == NULL, MOAS_ERR_NO_MEMORY, "model_load: no memory for the model");
    if (p.allocator != NULL) {
        m->alloc_copy = *p.allocator;
        m->alloc = &m->alloc_copy;
    }
    m->log = p.log;
    m->log_user = p.log_user;
    m->use_mmap = p.use_mmap != 0;
    *out = m;
    return MOAS_OK;
}

/* Copies of the file start on a 64-byte boundary, so that with the file's own
 * alignment of 64 every weight row starts a cache line. */
#define COPY_ALIGNMENT 64

/* A caller's buffer is used in place when its start is aligned like an f32, the widest
 * element a kernel reads; mmap and malloc always are. */
#define BUFFER_ALIGNMENT 4

static moas_status own_copy(moas_model *m, size_t size, uint8_t **image) {
    size_t bytes;
    MOAS_RETURN_IF(!moas__size_add(size, COPY_ALIGNMENT, &bytes), MOAS_ERR_NO_MEMORY,
                   "model_load: %zu bytes is too large", size);
    m->owned = moas__malloc(m->alloc, bytes);
    MOAS_RETURN_IF(m->owned == NULL, MOAS_ERR_NO_MEMORY,
                   "model_load: no memory for a %zu-byte copy of the model", size);
    *image = (uint8_t *)m->owned + (COPY_ALIGNMENT - (uintptr_t)m->owned % COPY_ALIGNMENT);
    return MOAS_OK;
}

/* Report a failure to the params' log and release the half-built model. */
static moas_status load_failed(moas_model *m, moas_status st, const moas_model_params *params) {
    if (params != NULL &&
        params->size >= offsetof(moas_model_params, log_user) + sizeof params->log_user &&
        params->log != NULL) {
        moas__log_error(params->log, params->log_user);
    }
    moas_model_free(m);
    return st;
}

#if MOAS_HAVE_MMAP
/* errno's text in a buffer of the caller's: strerror() may share one between threads,
 * and loading models from several threads at once is allowed. */
typedef struct { char text[128]; } error_text;

static const char *describe_errno(int err, error_text *buf) {
    if (strerror_r(err, buf->text, sizeof buf->text) != 0) {
        snprintf(buf->text, sizeof buf->text, "error %d", err);
    }
    return buf->text;
}

static moas_status map_file(moas_model *m, const char *path, bool use_mmap) {
    struct stat st;
    uint8_t *image;
    int fd;
    error_text why;

    /* O_NONBLOCK: opening a FIFO no process writes to returns at once instead of
     * waiting for a writer, so that it can be refused below; a regular file's reads
     * ignore the flag. */
    fd = open(path, O_RDONLY | O_NONBLOCK);
    MOAS_RETURN_IF(fd < 0, MOAS_ERR_IO, "model_load: cannot open '%s': %s", path,
                   describe_errno(errno, &why));
    if (fstat(fd, &st) != 0) {
        const int err = errno;
        close(fd);
        MOAS_RETURN_IF(true, MOAS_ERR_IO, "model_load: cannot stat '%s': %s", path,
                       describe_errno(err, &why));
    }
    if (!S_ISREG(st.st_mode)) {
        /* Both calls succeeded: errno says nothing here, so none of its text is added. */
        close(fd);
        MOAS_RETURN_IF(true, MOAS_ERR_IO, "model_load: '%s' is %s", path,
                       S_ISDIR(st.st_mode)    ? "a directory, not a model file"
                       : S_ISCHR(st.st_mode)  ? "not a regular file (a character device)"
                       : S_ISBLK(st.st_mode)  ? "not a regular file (a block device)"
                       : S_ISFIFO(st.st_mode) ? "not a regular file (a pipe)"
                       : S_ISSOCK(st.st_mode) ? "not a regular file (a socket)"
                                              : "not a regular file");
    }
    if ((uint64_t)st.st_size > SIZE_MAX || st.st_size == 0) {
        close(fd);
        MOAS_RETURN_IF(true, MOAS_ERR_CORRUPT, "model_load: '%s' has %lld bytes", path,
                       (long long)st.st_size);
    }
    m->image_size = (size_t)st.st_size;
    if (use_mmap) {
        void *p = mmap(NULL, m->image_size, PROT_READ, MAP_PRIVATE, fd, 0);
        const int err = errno;
        close(fd);
        MOAS_RETURN_IF(p == MAP_FAILED, MOAS_ERR_IO, "model_load: cannot map '%s': %s", path,
                       describe_errno(err, &why));
        m->map = p;
        m->map_size = m->image_size;
        m->image = p;
        return MOAS_OK;
    }
    moas_status status = own_copy(m, m->image_size, &image);
    for (size_t done = 0; status == MOAS_OK && done < m->image_size;) {
        const ssize_t n = read(fd, image + done, m->image_size - done);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            moas__set_error("model_load: cannot read '%s' at byte %zu: %s", path, done,
                            n < 0 ? describe_errno(errno, &why) : "unexpected end of file");
            status = MOAS_ERR_IO;
        }
        done += n > 0 ? (size_t)n : 0;
    }
    close(fd);
    m->image = image;
    return status;
}
#else
static moas_status map_file(moas_model *m, const char *path, bool use_mmap) {
    FILE *f = fopen(path, "rb");
    uint8_t *image;
    long size;
    (void)use_mmap;
    MOAS_RETURN_IF(f == NULL, MOAS_ERR_IO, "model_load: cannot open '%s'", path);
    if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) <= 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        MOAS_RETURN_IF(true, MOAS_ERR_IO, "model_load: cannot size '%s'", path);
    }
    m->image_size = (size_t)size;
    moas_status status = own_copy(m, m->image_size, &image);
    if (status == MOAS_OK && fread(image, 1, m->image_size, f) != m->image_size) {
        moas__set_error("model_load: cannot read '%s'", path);
        status = MOAS_ERR_IO;
    }
    fclose(f);
    m->image = image;
    return status;
}
#endif

moas_status moas_model_load(const char *path, const moas_model_params *params,
                            moas_model **out) {
    moas_model *m = NULL;
    moas_status st;

    if (out != NULL) {
        *out = NULL;
    }
    if (path == NULL || out == NULL) {
        moas__set_error("model_load: %s is NULL", path == NULL ? "path" : "out");
        return load_failed(NULL, MOAS_ERR_INVALID_ARG, params);
    }
    if ((st = model_new(params, &m)) != MOAS_OK ||
        (st = map_file(m, path, m->use_mmap)) != MOAS_OK ||
        (st = build(m)) != MOAS_OK) {
        return load_failed(m, st, params);
    }
    *out = m;
    return MOAS_OK;
}

moas_status moas_model_load_memory(const void *data, size_t size,
                                   const moas_model_params *params, moas_model **out) {
    moas_model *m = NULL;
    moas_status st;

    if (out != NULL) {
        *out = NULL;
    }
    if (data == NULL || out == NULL) {
        moas__set_error("model_load_memory: %s is NULL", data == NULL ? "data" : "out");
        return load_failed(NULL, MOAS_ERR_INVALID_ARG, params);
    }
    if ((st = model_new(params, &m)) != MOAS_OK) {
        return load_failed(m, st, params);
    }
    /* Weights are read in place, so a buffer that is not aligned for an f32 is copied
     * once, and the copy used instead. */
    m->image = data;
    m->image_size = size;
    if ((uintptr_t)data % BUFFER_ALIGNMENT != 0) {
        uint8_t *image;
        if ((st = own_copy(m, size, &image)) != MOAS_OK) {
            return load_failed(m, st, params);
        }
        memcpy(image, data, size);
        m->image = image;
    }
    st = build(m);
    if (st != MOAS_OK) {
        return load_failed(m, st, params);
    }
    *out = m;
    return MOAS_OK;
}

void moas_model_free(moas_model *m) {
    const moas_allocator *alloc;
    moas_allocator alloc_copy;

    if (m == NULL) {
        return;
    }
    alloc_copy = m->alloc_copy;
    alloc = m->alloc != NULL ? &alloc_copy : NULL;
    moas__gguf_free(m->gguf, alloc);
    moas__free(alloc, m->layers);
    moas__free(alloc, m->rope_table);
    moas__free(alloc, m->vocab_cp);
    moas__free(alloc, m->cp_order);
#if MOAS_HAVE_MMAP
    if (m->map != NULL) {
        munmap(m->map, m->map_size);
    }
#endif
    moas__free(alloc, m->owned);
    moas__free(alloc, m);
}

void moas_model_params_init_sized(moas_model_params *params, size_t size) {
    moas_model_params p;
    memset(&p, 0, sizeof p);
    p.use_mmap = 1;
    moas__params_fill(params, size, &p, &moas__model_params_layout);
}

/* ---- queries ----------------------------------------------------------------- */

/* A NULL model reads as nothing (0, "", the first enum value) rather than crashing:
 * these cannot report an error, and a caller's slip should not end its process. */
const char *moas_model_arch(const moas_model *m) { (void)m; return "moas"; }
const char *moas_model_name(const moas_model *m) { return m != NULL ? m->name : ""; }
int32_t moas_model_n_layer(const moas_model *m) { return m != NULL ? m->n_layer : 0; }
int32_t moas_model_n_embd(const moas_model *m) { return m != NULL ? m->n_embd : 0; }
int32_t moas_model_n_head(const moas_model *m) { return m != NULL ? m->n_head : 0; }
int32_t moas_model_head_dim(const moas_model *m) { return m != NULL ? m->head_dim : 0; }
int32_t moas_model_n_ff(const moas_model *m) { return m != NULL ? m->n_ff : 0; }
int32_t moas_model_n_vocab(const moas_model *m) { return m != NULL ? m->n_vocab : 0; }
int32_t moas_model_n_ctx_train(const moas_model *m) { return m != NULL ? m->n_ctx_train : 0; }
int32_t moas_model_n_scheme(const moas_model *m) { return m != NULL ? m->n_scheme : 0; }
moas_mixing moas_model_mixing(const moas_model *m) {
    return m != NULL ? m->mixing : MOAS_MIXING_ROUTER;
}
moas_kv_sharing moas_model_kv_sharing(const moas_model *m) {
    return m != NULL ? m->kv_sharing : MOAS_KV_SHARING_INDEPENDENT;
}
int32_t moas_model_has_bias(const moas_model *m) { return m != NULL && m->bias ? 1 : 0; }
uint64_t moas_model_n_params(const moas_model *m) { return m != NULL ? m->n_params : 0; }

int32_t moas_model_scheme_n_kv(const moas_model *m, int32_t scheme) {
    if (m == NULL || scheme < 0 || scheme >= m->n_scheme) {
        return 0;
    }
    return m->scheme_n_kv[scheme];
}

int64_t moas_model_n_tensors(const moas_model *m) {
    return m != NULL ? (int64_t)m->gguf->n_tensors : 0;
}

moas_status moas_model_tensor(const moas_model *m, int64_t index, moas_tensor_info *info) {
    const moas_gguf_tensor *t;
    moas_tensor_info full;

    MOAS_RETURN_IF(m == NULL || info == NULL, MOAS_ERR_INVALID_ARG, "model_tensor: %s is NULL",
                   m == NULL ? "model" : "info");
    MOAS_RETURN_IF(index < 0 || (uint64_t)index >= m->gguf->n_tensors, MOAS_ERR_INVALID_ARG,
                   "model_tensor: index %lld outside [0, %llu)", (long long)index,
                   (unsigned long long)m->gguf->n_tensors);
    MOAS_RETURN_IF(info->size < offsetof(moas_tensor_info, name) + sizeof info->name,
                   MOAS_ERR_INVALID_ARG, "model_tensor: info->size %u is too small",
                   (unsigned)info->size);
    t = &m->gguf->tensors[index];
    memset(&full, 0, sizeof full);
    full.size = (uint32_t)moas__layout_fit(&moas__tensor_info_layout, info->size);
    full.name = t->name.text;
    full.type = t->type;
    full.n_dims = (int32_t)t->n_dims;
    for (int i = 0; i < 4; i++) {
        full.ne[i] = t->ne[i];
    }
    full.offset = m->gguf->data_offset + t->offset;
    full.n_bytes = t->n_bytes;
    full.data = t->data;
    memcpy(info, &full, full.size);
    return MOAS_OK;
}

moas_status moas_model_tensor_find(const moas_model *m, const char *name, int64_t *index) {
    const moas_gguf_tensor *t;
    MOAS_RETURN_IF(m == NULL || name == NULL || index == NULL, MOAS_ERR_INVALID_ARG,
                   "model_tensor_find: NULL argument");
    t = moas__gguf_find_tensor(m->gguf, name);
    MOAS_RETURN_IF(t == NULL, MOAS_ERR_NOT_FOUND, "model_tensor_find: no tensor '%s'", name);
    *index = moas__gguf_tensor_index(m->gguf, t);
    return MOAS_OK;
}

/* ---- metadata ---------------------------------------------------------------- */

int64_t moas_model_meta_count(const moas_model *m) {
    return m != NULL ? (int64_t)m->gguf->n_kv : 0;
}

const char *moas_model_meta_key(const moas_model *m, int64_t index) {
    if (m == NULL || index < 0 || (uint64_t)index >= m->gguf->n_kv) {
        return NULL;
    }
    return m->gguf->kv[index].key.text;
}

static moas_status find_value(const moas_model *m, const char *key, const void *out,
                              const moas_gguf_value **v) {
    const moas_gguf_kv *kv;
    MOAS_RETURN_IF(m == NULL || key == NULL || out == NULL, MOAS_ERR_INVALID_ARG,
                   "model_meta: NULL argument");
    kv = moas__gguf_find_kv(m->gguf, key);
    MOAS_RETURN_IF(kv == NULL, MOAS_ERR_NOT_FOUND, "model_meta: no key '%s'", key);
    *v = &kv->value;
    return MOAS_OK;
}

static bool is_int_type(moas_meta_type t) {
    return t == MOAS_META_UINT8 || t == MOAS_META_INT8 || t == MOAS_META_UINT16 ||
           t == MOAS_META_INT16 || t == MOAS_META_UINT32 || t == MOAS_META_INT32 ||
           t == MOAS_META_UINT64 || t == MOAS_META_INT64;
}

static bool is_unsigned_type(moas_meta_type t) {
    return t == MOAS_META_UINT8 || t == MOAS_META_UINT16 || t == MOAS_META_UINT32 ||
           t == MOAS_META_UINT64;
}

moas_status moas_model_meta_type(const moas_model *m, const char *key, moas_meta_type *type) {
    const moas_gguf_value *v;
    MOAS_TRY(find_value(m, key, type, &v));
    *type = v->type;
    return MOAS_OK;
}

moas_status moas_model_meta_int(const moas_model *m, const char *key, int64_t *value) {
    const moas_gguf_value *v;
    MOAS_TRY(find_value(m, key, value, &v));
    MOAS_RETURN_IF(!is_int_type(v->type), MOAS_ERR_WRONG_TYPE,
                   "model_meta_int: key '%s' has type %d, not an integer", key, (int)v->type);
    if (is_unsigned_type(v->type)) {
        MOAS_RETURN_IF(v->v.u64 > (uint64_t)INT64_MAX, MOAS_ERR_WRONG_TYPE,
                       "model_meta_int: key '%s' is %llu, above INT64_MAX", key,
                       (unsigned long long)v->v.u64);
        *value = (int64_t)v->v.u64;
    } else {
        *value = v->v.i64;
    }
    return MOAS_OK;
}

moas_status moas_model_meta_float(const moas_model *m, const char *key, double *value) {
    const moas_gguf_value *v;
    MOAS_TRY(find_value(m, key, value, &v));
    MOAS_RETURN_IF(v->type != MOAS_META_FLOAT32 && v->type != MOAS_META_FLOAT64,
                   MOAS_ERR_WRONG_TYPE, "model_meta_float: key '%s' has type %d, not a float",
                   key, (int)v->type);
    *value = v->v.f64;
    return MOAS_OK;
}

moas_status moas_model_meta_bool(const moas_model *m, const char *key, int32_t *value) {
    const moas_gguf_value *v;
    MOAS_TRY(find_value(m, key, value, &v));
    MOAS_RETURN_IF(v->type != MOAS_META_BOOL, MOAS_ERR_WRONG_TYPE,
                   "model_meta_bool: key '%s' has type %d, not a bool", key, (int)v->type);
    *value = v->v.u64 != 0;
    return MOAS_OK;
}

moas_status moas_model_meta_string(const moas_model *m, const char *key, const char **value,
                                   size_t *length) {
    const moas_gguf_value *v;
    MOAS_TRY(find_value(m, key, value, &v));
    MOAS_RETURN_IF(v->type != MOAS_META_STRING, MOAS_ERR_WRONG_TYPE,
                   "model_meta_string: key '%s' has type %d, not a string", key, (int)v->type);
    *value = v->v.str.text;
    if (length != NULL) {
        *length = (size_t)v->v.str.len;
    }
    return MOAS_OK;
}

moas_status moas_model_meta_array(const moas_model *m, const char *key,
                                  moas_meta_type *elem_type, uint64_t *n_elems) {
    const moas_gguf_value *v;
    MOAS_TRY(find_value(m, key, elem_type, &v));
    MOAS_RETURN_IF(n_elems == NULL, MOAS_ERR_INVALID_ARG, "model_meta_array: n_elems is NULL");
    MOAS_RETURN_IF(v->type != MOAS_META_ARRAY, MOAS_ERR_WRONG_TYPE,
                   "model_meta_array: key '%s' has type %d, not an array", key, (int)v->type);
    *elem_type = v->elem_type;
    *n_elems = v->n;
    return MOAS_OK;
}

/* Look up an array element: the key must exist, be an array, and `index` in range. */
static moas_status find_element(const moas_model *m, const char *key, uint64_t index,
                                const void *out, const moas_gguf_value **v) {
    MOAS_TRY(find_value(m, key, out, v));
    MOAS_RETURN_IF((*v)->type != MOAS_META_ARRAY, MOAS_ERR_WRONG_TYPE,
                   "model_meta_array: key '%s' is not an array", key);
    MOAS_RETURN_IF(index >= (*v)->n, MOAS_ERR_INVALID_ARG,
                   "model_meta_array: index %llu outside [0, %llu) of '%s'",
                   (unsigned long long)index, (unsigned long long)(*v)->n, key);
    return MOAS_OK;
}

moas_status moas_model_meta_array_int(const moas_model *m, const char *key, uint64_t index,
                                      int64_t *value) {
    const moas_gguf_value *v;
    MOAS_TRY(find_element(m, key, index, value, &v));
    MOAS_RETURN_IF(!is_int_type(v->elem_type) || !moas__gguf_array_int(v, index, value),
                   MOAS_ERR_WRONG_TYPE, "model_meta_array_int: '%s'[%llu] is not an int64", key,
                   (unsigned long long)index);
    return MOAS_OK;
}

moas_status moas_model_meta_array_float(const moas_model *m, const char *key, uint64_t index,
                                        double *value) {
    const moas_gguf_value *v;
    MOAS_TRY(find_element(m, key, index, value, &v));
    MOAS_RETURN_IF(!moas__gguf_array_float(v, index, value), MOAS_ERR_WRONG_TYPE,
                   "model_meta_array_float: '%s' is not an array of floats", key);
    return MOAS_OK;
}

moas_status moas_model_meta_array_string(const moas_model *m, const char *key, uint64_t index,
                                         const char **value, size_t *length) {
    const moas_gguf_value *v;
    MOAS_TRY(find_element(m, key, index, value, &v));
    MOAS_RETURN_IF(v->elem_type != MOAS_META_STRING, MOAS_ERR_WRONG_TYPE,
                   "model_meta_array_string: '%s' is not an array of strings", key);
    *value = v->v.strs[index].text;
    if (length != NULL) {
        *length = (size_t)v->v.strs[index].len;
    }
    return MOAS_OK;
}
