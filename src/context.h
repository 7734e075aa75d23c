/*
 * context.h - the state of one inference stream: activations, the KV cache and the
 * routing records. Allocated once by context.c; used per token by forward.c.
 */
#ifndef MOAS_CONTEXT_H
#define MOAS_CONTEXT_H

#include "model.h"
#include "ops.h"

/* One scheme's keys and values in one layer, for every position of the context.
 * Row `pos` holds that token's n_kv heads of head_dim elements, in kv_type. */
typedef struct moas_kv_stream {
    void *k;        /* [n_ctx, n_kv * head_dim] */
    void *v;        /* [n_ctx, n_kv * head_dim] */
    int32_t n_kv;
} moas_kv_stream;

struct moas_context {
    const moas_model *model;
    const moas_allocator *alloc;
    moas_allocator alloc_copy;
    moas_log_fn log;
    void *log_user;
    const moas_ops *ops;

    int32_t n_ctx;           /* capacity in tokens */
    int32_t n_threads;       /* threads for parallel loops (>= 1) */
    int32_t n_past;          /* tokens stored */
    moas_mode mode;
    moas_type kv_type;       /* F32 or F16 */
    size_t kv_elem_bytes;    /* 4 or 2 */

    /* activations of the token being decoded (one arena) */
    float *x;                /* [C] residual stream */
    float *xb;               /* [C] normed input of a sublayer */
    float *xb2;              /* [C] a sublayer's output */
    float *mix;              /* [C] attention output mixed over the schemes */
    float *q;                /* [C] queries of one scheme */
    float *kv_tmp;           /* [2, C] keys and values of one scheme before storing */
    float *att_out;          /* [C] attention output of one scheme, heads side by side */
    float *hb;               /* [max(n_ff, R)] MLP or router hidden */
    float *att;              /* [n_head, n_ctx] attention scores */
    float *gates;            /* [S] this layer's scheme weights */
    float *logits;           /* [n_vocab] logits of the last decoded token */
    bool logits_valid;       /* logits belong to the token at n_past - 1 */
    void *scratch;           /* the arena above */

    /* the KV cache: [n_layer, n_scheme] streams in one allocation */
    moas_kv_stream *kv;      /* [n_layer * n_scheme] */
    void *kv_arena;

    /* routing records, [n_ctx, n_layer, n_scheme] */
    float *route_gates;
};

/* Run one token at position ctx->n_past through the model, store its K/V and gates,
 * and compute logits when `want_logits`. The caller has checked `token` and room. */
void moas__forward(moas_context *ctx, int32_t token, bool want_logits);

#endif /* MOAS_CONTEXT_H */
