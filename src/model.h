/*
 * model.h - a loaded model: hyperparameters, typed views of every weight, and the
 * character vocabulary. Built and checked by model.c; read by everything else.
 */
#ifndef MOAS_MODEL_H
#define MOAS_MODEL_H

#include "core.h"
#include "gguf.h"

#include <stdatomic.h>

/* At most this many attention schemes per layer (the reference has 3). */
#define MOAS_MAX_SCHEMES 8
/* Query heads a model may have (the loader refuses more). Decode attention finds a
 * head's K/V row without a division on the strength of MOAS_MAX_HEADS^3 < 2^32. */
#define MOAS_MAX_HEADS 1024

/* A matrix used in place: n_rows rows of n_cols elements of `type`, row-major.
 * For an embedding table a "row" is one token's (or position's) vector. */
typedef struct moas_weight {
    const void *data;
    moas_type type;
    int32_t n_rows;     /* output features (or table entries) */
    int32_t n_cols;     /* input features (or vector width)   */
    size_t row_bytes;   /* bytes per row in `type` */
} moas_weight;

typedef struct moas_scheme_weights {
    int32_t n_kv;                   /* KV heads of this scheme */
    moas_weight wq, wk, wv, wo;     /* [C, C], [n_kv*d, C], [n_kv*d, C], [C, C] (rows, cols) */
    const float *bq, *bk, *bv, *bo; /* biases, or NULL without bias */
} moas_scheme_weights;

typedef struct moas_layer {
    const float *attn_norm_w, *attn_norm_b;      /* [C] */
    moas_scheme_weights scheme[MOAS_MAX_SCHEMES]; /* independent K/V: one set per scheme */
    moas_scheme_weights shared;                  /* pooled K/V: the one set, K/V with H heads */
    moas_weight router_up, router_down;          /* [R, C], [S, R]; router mixing only */
    const float *router_up_b, *router_down_b;    /* [R], [S] or NULL */
    const float *ffn_norm_w, *ffn_norm_b;        /* [C] */
    moas_weight ffn_up, ffn_down;                /* [n_ff, C], [C, n_ff] */
    const float *ffn_up_b, *ffn_down_b;          /* [n_ff], [C] or NULL */
    moas_weight ffn_gate;                        /* [n_ff, C]; SwiGLU only */
    const float *ffn_gate_b;                     /* [n_ff] or NULL */
} moas_layer;

struct moas_model {
    /* where the bytes live */
    const moas_allocator *alloc;
    moas_allocator alloc_copy;  /* the caller's allocator, copied; alloc points here */
    moas_log_fn log;
    void *log_user;
    bool use_mmap;              /* from the params: map the file (else read it) */
    void *map;                  /* mmap'ed file, or NULL */
    size_t map_size;
    void *owned;                /* our heap copy of the file (read or realigned), or NULL */
    const uint8_t *image;       /* the GGUF image: map, owned copy or caller's buffer */
    size_t image_size;
    moas_gguf *gguf;

    /* hyperparameters (names as in docs/FORMAT.md) */
    int32_t n_layer, n_embd, n_head, head_dim, n_ff, n_vocab, n_ctx_train;
    int32_t n_scheme, n_router;
    int32_t scheme_n_kv[MOAS_MAX_SCHEMES];
    moas_mixing mixing;
    moas_kv_sharing kv_sharing;
    bool bias;
    float norm_eps;
    /* block options (docs/FORMAT.md, "Block options"); false is the published block */
    bool rope;                  /* rotary positions instead of position_embd */
    double rope_base;           /* RoPE frequency base (rope only) */
    /* RoPE: per position below rope_positions, the head_dim / 2 cosines and then the
     * sines of its angles (moas__rope_angles), so that a token's rotation costs no
     * trigonometry; positions past it, and negative ones, are computed */
    float *rope_table;          /* [rope_positions, head_dim]; NULL without rope */
    int32_t rope_positions;
    bool rms_norm;              /* RMSNorm instead of LayerNorm, for every norm */
    bool swiglu;                /* MLP down(SiLU(gate x) * up x) instead of down(GELU(up x)) */
    const char *name;
    uint64_t n_params;
    /* moas__model_fingerprint(m, MOAS_FINGERPRINT_VERSION) once a state first needs it
     * (0: not yet); a cache any thread may fill, always with the same value */
    _Atomic uint64_t fingerprint;

    /* weights */
    moas_weight tok_embd;          /* [n_vocab, C] */
    moas_weight pos_embd;          /* [n_ctx_train, C]; data NULL with rope */
    moas_weight output;            /* [n_vocab, C]; tok_embd when tied */
    const float *out_norm_w, *out_norm_b;
    moas_layer *layers;            /* [n_layer] */

    /* vocabulary */
    const moas_gguf_string *vocab; /* [n_vocab] token texts, owned by gguf */
    uint32_t *vocab_cp;            /* [n_vocab] code point of each token */
    int32_t *cp_order;             /* [n_vocab] token ids sorted by code point */
};

/* RoPE's cosines and sines for pairs [i0, i1) at position pos: the angle pos *
 * base^(-2i / head_dim), its cosine and sine computed in double and rounded to float
 * (as tools/train.py's tables are). */
void moas__rope_angles(const moas_model *m, int32_t pos, int32_t i0, int32_t i1, float *cs,
                       float *sn);

/* The version of moas__model_fingerprint that saved states are written with (their
 * format's version). */
#define MOAS_FINGERPRINT_VERSION 3

/* The model's fingerprint of `version` (1 to MOAS_FINGERPRINT_VERSION), as saved states
 * of that version carry it (docs/FORMAT.md, "Saved state"). The current version's is
 * hashed by the first call and kept: a large model's takes about 1 ms to hash and a few
 * more to fault in the pages it reads, too much for every state saved or loaded (GPT-2
 * small: 0.48 ms against 0.002 ms) and for every model loaded, most of which never save
 * a state. */
uint64_t moas__model_fingerprint(const moas_model *m, uint32_t version);


#endif /* MOAS_MODEL_H */
