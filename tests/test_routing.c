/*
 * test_routing.c - routed mode: one scheme per token and layer, a KV cache whose bytes
 * follow the schemes chosen, and the controls over the choice (forcing, a callback, a
 * KV budget).
 */
#include "test.h"

#include "support/tiny_model.h"

#include <stdlib.h>

/* The default tiny model: 2 layers, width 16, 4 heads of 4, schemes [4, 2, 1]. */
#define N_LAYER 2
#define HEAD_DIM 4
#define N_CTX 32
#define META 5   /* routed bookkeeping per token and layer: a uint32 offset, a uint8 scheme */

static const int32_t scheme_heads[3] = {4, 2, 1};

static moas_context *routed_context(const moas_model *m, moas_type kv_type, int32_t forced) {
    moas_context_params p;
    moas_context *ctx = NULL;
    moas_context_params_init(&p);
    p.mode = MOAS_MODE_ROUTED;
    p.kv_type = kv_type;
    p.forced_scheme = forced;
    return moas_context_create(m, &p, &ctx) == MOAS_OK ? ctx : NULL;
}

static void pseudo_tokens(int32_t *tokens, int32_t n, int32_t n_vocab, uint32_t seed) {
    for (int32_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        tokens[i] = (int32_t)((seed >> 8) % (uint32_t)n_vocab);
    }
}

/* A callback that routes by a fixed pseudo-random rule of (pos, layer). */
static int32_t random_route(void *user, int32_t pos, int32_t layer, const float *gates,
                            int32_t n_scheme, int32_t proposed) {
    (void)user, (void)gates, (void)proposed;
    const uint32_t h = (uint32_t)(pos * 2654435761u) ^ (uint32_t)(layer * 40503u);
    return (int32_t)((h >> 7) % (uint32_t)n_scheme);
}

/* Bytes in use equal sum_j n_kv(s_j) * head_dim * 2 * sizeof(element) + bookkeeping,
 * per layer, for a random routing, at every length, in f32 and f16. */
static int check_routed_kv_bytes(const char *kv_sharing) {
    tiny_model_config cfg;
    size_t size;
    tiny_model_config_default(&cfg);
    cfg.kv_sharing = kv_sharing;
    uint8_t *image = tiny_model_image(&cfg, 11, &size);
    moas_model *m;
    int32_t tokens[N_CTX], schemes[N_CTX * N_LAYER], heads[N_CTX * N_LAYER];

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(tokens, N_CTX, moas_model_n_vocab(m), 2);
    for (int k = 0; k < 2; k++) {
        const uint64_t elem = k == 0 ? 4 : 2;
        moas_context *ctx = routed_context(m, k == 0 ? MOAS_TYPE_F32 : MOAS_TYPE_F16, -1);
        ASSERT_TRUE(ctx != NULL);
        moas_context_set_route_callback(ctx, random_route, NULL);
        ASSERT_EQ(moas_context_kv_bytes_reserved(ctx, 0), N_CTX * (4 * HEAD_DIM * 2 * elem + META));
        int32_t used_heads[N_LAYER] = {0, 0}, seen[3] = {0, 0, 0};
        for (int32_t n = 0; n < N_CTX; n++) {
            ASSERT_OK(moas_context_decode(ctx, tokens[n], NULL));
            ASSERT_OK(moas_context_routes(ctx, n, 1, NULL, schemes, heads));
            uint64_t total = 0;
            for (int32_t l = 0; l < N_LAYER; l++) {
                ASSERT_EQ(schemes[l], random_route(NULL, n, l, NULL, 3, 0));
                ASSERT_EQ(heads[l], scheme_heads[schemes[l]]);
                used_heads[l] += heads[l];
                seen[schemes[l]]++;
                const uint64_t want = (uint64_t)used_heads[l] * HEAD_DIM * 2 * elem +
                                      (uint64_t)(n + 1) * META;
                ASSERT_EQ(moas_context_kv_bytes_used(ctx, l), want);
                total += want;
            }
            ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), total);
        }
        ASSERT_TRUE(seen[0] > 0 && seen[1] > 0 && seen[2] > 0);   /* all schemes exercised */
        /* far below a cache storing every head of every token */
        ASSERT_TRUE(moas_context_kv_bytes_used(ctx, -1) < moas_context_kv_bytes_reserved(ctx, -1));
        int32_t counts[3];
        ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
        ASSERT_EQ(counts[0], seen[0]);
        ASSERT_EQ(counts[1], seen[1]);
        ASSERT_EQ(counts[2], seen[2]);
        ASSERT_OK(moas_context_scheme_counts(ctx, 1, counts));
        ASSERT_EQ(counts[0] + counts[1] + counts[2], N_CTX);
        ASSERT_STATUS(moas_context_scheme_counts(ctx, 2, counts), MOAS_ERR_INVALID_ARG);
        moas_context_free(ctx);
    }
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

TEST(routed_kv_bytes_follow_formula_for_random_routing) {
    return check_routed_kv_bytes("independent");
}

/* A pooled model stores the same bytes for the same routing; in mixture mode it keeps
 * one gate-mixed K/V of all heads per token, an MHA cache's worth. */
/* moas_context_scheme_counts takes a layer in [-1, n_layer): -1 is every layer, and -2
 * is refused with the range in the message, leaving the counts as they were. */
TEST(scheme_counts_refuse_a_layer_below_minus_one) {
    tiny_model_config cfg;
    size_t size;
    tiny_model_config_default(&cfg);
    uint8_t *image = tiny_model_image(&cfg, 12, &size);
    moas_model *m;
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    moas_context *ctx = routed_context(m, MOAS_TYPE_F32, 1);
    ASSERT_TRUE(ctx != NULL);
    ASSERT_OK(moas_context_decode(ctx, 1, NULL));
    int32_t counts[3] = {7, 7, 7};
    ASSERT_STATUS(moas_context_scheme_counts(ctx, -2, counts), MOAS_ERR_INVALID_ARG);
    ASSERT_STR_EQ(moas_last_error(), "context_scheme_counts: layer -2 outside [-1, 2)");
    ASSERT_TRUE(counts[0] == 7 && counts[1] == 7 && counts[2] == 7);
    ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
    ASSERT_TRUE(counts[0] == 0 && counts[1] == 2 && counts[2] == 0);
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

TEST(pooled_kv_bytes_follow_formula) {
    tiny_model_config cfg;
    size_t size;
    moas_model *m;
    moas_context *ctx;
    int32_t tokens[10], heads[10 * N_LAYER];

    if (check_routed_kv_bytes("pooled") != TEST_PASS) {
        return TEST_FAIL;
    }
    tiny_model_config_default(&cfg);
    cfg.kv_sharing = "pooled";
    uint8_t *image = tiny_model_image(&cfg, 11, &size);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    ASSERT_EQ(moas_model_kv_sharing(m), MOAS_KV_SHARING_POOLED);
    ASSERT_OK(moas_context_create(m, NULL, &ctx));
    pseudo_tokens(tokens, 10, 40, 3);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 10, NULL, MOAS_LOGITS_LAST));
    ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), (size_t)N_LAYER * 10 * 4 * HEAD_DIM * 2 * 4);
    ASSERT_OK(moas_context_routes(ctx, 0, 10, NULL, NULL, heads));
    for (int32_t i = 0; i < 10 * N_LAYER; i++) {
        ASSERT_EQ(heads[i], 4);
    }
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Forced to MHA everywhere, the MoAS model computes exactly what a plain model made of
 * its MHA branch computes. tiny_model seeds each tensor by its name, so the
 * single-scheme model below has the same scheme-0, norm, MLP and embedding weights. */
static int forced_mha_equals_mha_branch(bool modern) {
    tiny_model_config cfg;
    size_t size_moas, size_mha;
    tiny_model_config_default(&cfg);
    cfg.rope = cfg.rms_norm = cfg.swiglu = modern;
    uint8_t *image_moas = tiny_model_image(&cfg, 21, &size_moas);
    cfg.n_scheme = 1;
    cfg.scheme_n_kv[0] = 4;
    cfg.mixing = MOAS_MIXING_SINGLE;
    uint8_t *image_mha = tiny_model_image(&cfg, 21, &size_mha);
    moas_model *moas, *mha;
    moas_context *routed, *plain;
    int32_t tokens[N_CTX];
    float want[40], got[40];

    ASSERT_OK(moas_model_load_memory(image_moas, size_moas, NULL, &moas));
    ASSERT_OK(moas_model_load_memory(image_mha, size_mha, NULL, &mha));
    routed = routed_context(moas, MOAS_TYPE_F32, 0);
    ASSERT_TRUE(routed != NULL);
    ASSERT_OK(moas_context_create(mha, NULL, &plain));
    pseudo_tokens(tokens, N_CTX, 40, 4);
    for (int32_t i = 0; i < N_CTX; i++) {
        ASSERT_OK(moas_context_decode(routed, tokens[i], got));
        ASSERT_OK(moas_context_decode(plain, tokens[i], want));
        ASSERT_TRUE(memcmp(got, want, sizeof got) == 0);
    }
    /* and it stores what an MHA cache stores, plus the bookkeeping */
    ASSERT_EQ(moas_context_kv_bytes_used(routed, -1),
              moas_context_kv_bytes_used(plain, -1) + N_LAYER * N_CTX * META);
    /* a single-scheme model gives the same logits in both modes */
    moas_context *plain_routed = routed_context(mha, MOAS_TYPE_F32, -1);
    ASSERT_TRUE(plain_routed != NULL);
    ASSERT_OK(moas_context_decode_batch(plain_routed, tokens, N_CTX, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(plain_routed), want, sizeof want) == 0);
    moas_context_free(plain_routed);
    moas_context_free(routed);
    moas_context_free(plain);
    moas_model_free(moas);
    moas_model_free(mha);
    free(image_moas);
    free(image_mha);
    return TEST_PASS;
}

TEST(routed_forced_mha_equals_mha_branch_alone) {
    return forced_mha_equals_mha_branch(false);
}

/* The same with RoPE, RMSNorm and SwiGLU: routed mode rotates each token's Q and K at
 * the token's own position, whichever group of its block it runs in. */
TEST(routed_forced_mha_equals_mha_branch_alone_modern) {
    return forced_mha_equals_mha_branch(true);
}

typedef struct {
    int calls;
    int32_t last_pos;
    float gate_sum_error;
} observer;

static int32_t observe(void *user, int32_t pos, int32_t layer, const float *gates,
                       int32_t n_scheme, int32_t proposed) {
    observer *o = user;
    float sum = 0.0f;
    (void)layer;
    for (int32_t s = 0; s < n_scheme; s++) {
        sum += gates[s];
    }
    o->gate_sum_error = fmaxf(o->gate_sum_error, fabsf(sum - 1.0f));
    o->calls++;
    o->last_pos = pos;
    return proposed == 0 ? 2 : 0;   /* an override, ignored in mixture mode */
}

/* Forcing per context and per token, and the callback's override, take effect; in
 * mixture mode the callback only observes. */
TEST(routed_force_and_callback_take_effect) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 5, &size);
    moas_model *m;
    moas_context *ctx, *mix;
    int32_t tokens[8], schemes[8 * N_LAYER], heads[8 * N_LAYER];
    observer o = {0, -1, 0.0f};

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(tokens, 8, 40, 6);
    ctx = routed_context(m, MOAS_TYPE_F32, 2);   /* MQA for every token */
    ASSERT_TRUE(ctx != NULL);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 3, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_force_scheme(ctx, 1));   /* one GQA token */
    ASSERT_OK(moas_context_decode(ctx, tokens[3], NULL));
    ASSERT_OK(moas_context_force_scheme(ctx, -1));  /* back to the router, with a callback */
    moas_context_set_route_callback(ctx, observe, &o);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 4, 4, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_routes(ctx, 0, 8, NULL, schemes, heads));
    for (int32_t l = 0; l < N_LAYER; l++) {
        for (int32_t j = 0; j < 3; j++) {
            ASSERT_EQ(schemes[j * N_LAYER + l], 2);
            ASSERT_EQ(heads[j * N_LAYER + l], 1);
        }
        ASSERT_EQ(schemes[3 * N_LAYER + l], 1);
        ASSERT_EQ(heads[3 * N_LAYER + l], 2);
        for (int32_t j = 4; j < 8; j++) {   /* the callback maps the router's 0 to 2, else 0 */
            ASSERT_TRUE(schemes[j * N_LAYER + l] == 0 || schemes[j * N_LAYER + l] == 2);
        }
    }
    ASSERT_EQ(o.calls, 4 * N_LAYER);
    ASSERT_EQ(o.last_pos, 7);
    ASSERT_NEAR(o.gate_sum_error, 0.0, 1e-6);
    /* a callback answer outside [0, n_scheme) keeps the proposal; errors are checked */
    ASSERT_STATUS(moas_context_force_scheme(ctx, 3), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_force_scheme(ctx, -2), MOAS_ERR_INVALID_ARG);

    /* mixture mode: the callback sees every token and layer, overrides nothing */
    moas_context_params p;
    moas_context_params_init(&p);
    p.route_fn = observe;
    p.route_user = &o;
    ASSERT_OK(moas_context_create(m, &p, &mix));
    moas_context *mix_plain;
    ASSERT_OK(moas_context_create(m, NULL, &mix_plain));
    o.calls = 0;
    ASSERT_OK(moas_context_decode_batch(mix, tokens, 8, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(mix_plain, tokens, 8, NULL, MOAS_LOGITS_LAST));
    ASSERT_EQ(o.calls, 8 * N_LAYER);
    ASSERT_TRUE(memcmp(moas_context_logits(mix), moas_context_logits(mix_plain), 40 * 4) == 0);
    ASSERT_STATUS(moas_context_force_scheme(mix, 0), MOAS_ERR_INVALID_ARG);
    p.forced_scheme = 1;   /* forcing needs routed mode */
    moas_context *bad;
    ASSERT_STATUS(moas_context_create(m, &p, &bad), MOAS_ERR_INVALID_ARG);
    moas_context_free(mix);
    moas_context_free(mix_plain);
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* In mixture mode a route callback is proposed the scheme with the largest gate, the
 * first on ties (moas.h's moas_route_fn), the scheme moas_context_routes then reports:
 * every call's `proposed` is checked against the gates it is given, and the router of
 * this model proposes other schemes than 0 too, so a constant proposal shows. */
typedef struct {
    int calls, wrong, not_first;
    int32_t proposed[8 * N_LAYER];
} proposal_log;

static int32_t log_proposal(void *user, int32_t pos, int32_t layer, const float *gates,
                            int32_t n_scheme, int32_t proposed) {
    proposal_log *o = user;
    int32_t best = 0;
    for (int32_t s = 1; s < n_scheme; s++) {
        best = gates[s] > gates[best] ? s : best;
    }
    o->wrong += proposed != best;
    o->not_first += proposed != 0;
    if (pos < 8) {
        o->proposed[pos * N_LAYER + layer] = proposed;
    }
    o->calls++;
    return 0;
}

TEST(mixture_callback_is_proposed_the_largest_gate) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 5, &size);
    moas_model *m;
    moas_context *ctx;
    int32_t tokens[8], schemes[8 * N_LAYER];
    proposal_log o = {0};
    ASSERT_TRUE(image != NULL);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(tokens, 8, 40, 7);
    moas_context_params p;
    moas_context_params_init(&p);
    p.route_fn = log_proposal;
    p.route_user = &o;
    ASSERT_OK(moas_context_create(m, &p, &ctx));
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 5, NULL, MOAS_LOGITS_NONE));
    for (int32_t i = 5; i < 8; i++) {
        ASSERT_OK(moas_context_decode(ctx, tokens[i], NULL));
    }
    ASSERT_EQ(o.calls, 8 * N_LAYER);
    ASSERT_EQ(o.wrong, 0);
    ASSERT_TRUE(o.not_first > 0);
    ASSERT_OK(moas_context_routes(ctx, 0, 8, NULL, schemes, NULL));
    for (int32_t i = 0; i < 8 * N_LAYER; i++) {
        ASSERT_EQ(schemes[i], o.proposed[i]);
    }
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

static int32_t always_mha(void *user, int32_t pos, int32_t layer, const float *gates,
                          int32_t n_scheme, int32_t proposed) {
    (void)user, (void)pos, (void)layer, (void)gates, (void)n_scheme, (void)proposed;
    return 0;
}

/* A budget below all-MHA but above all-MQA for the full context: the context fills
 * completely, never exceeds the budget at any step, and uses MHA while it can. */
TEST(routed_kv_budget_holds) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 8, &size);
    moas_model *m;
    int32_t tokens[N_CTX];
    const uint64_t mha_token = N_LAYER * (4 * HEAD_DIM * 2 * 4 + META);
    const uint64_t mqa_token = N_LAYER * (1 * HEAD_DIM * 2 * 4 + META);

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(tokens, N_CTX, 40, 8);
    for (int variant = 0; variant < 2; variant++) {
        moas_context *ctx = routed_context(m, MOAS_TYPE_F32, -1);
        ASSERT_TRUE(ctx != NULL);
        const uint64_t budget = N_CTX * (mha_token + mqa_token) / 2;   /* halfway */
        moas_context_set_route_callback(ctx, always_mha, NULL);   /* the greediest router */
        ASSERT_OK(moas_context_set_kv_budget(ctx, budget));
        if (variant == 0) {
            for (int32_t i = 0; i < N_CTX; i++) {
                ASSERT_OK(moas_context_decode(ctx, tokens[i], NULL));
                ASSERT_TRUE(moas_context_kv_bytes_used(ctx, -1) <= budget);
            }
        } else {
            ASSERT_OK(moas_context_decode_batch(ctx, tokens, N_CTX, NULL, MOAS_LOGITS_LAST));
        }
        ASSERT_EQ(moas_context_n_past(ctx), N_CTX);
        ASSERT_TRUE(moas_context_kv_bytes_used(ctx, -1) <= budget);
        /* the budget is used, not wasted: within one MHA token of it */
        ASSERT_TRUE(moas_context_kv_bytes_used(ctx, -1) + mha_token > budget);
        int32_t counts[3];
        ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));
        ASSERT_TRUE(counts[0] > 0 && counts[0] < N_CTX * N_LAYER);
        moas_context_free(ctx);
    }

    /* a budget that cannot hold the context: decoding stops with CONTEXT_FULL, the
     * context unchanged, and the budget never exceeded */
    moas_context *ctx = routed_context(m, MOAS_TYPE_F32, -1);
    const uint64_t small = 10 * mqa_token + 7;
    ASSERT_OK(moas_context_set_kv_budget(ctx, small));
    int32_t n = 0;
    moas_status st;
    while ((st = moas_context_decode(ctx, tokens[n], NULL)) == MOAS_OK) {
        n++;
        ASSERT_TRUE(moas_context_kv_bytes_used(ctx, -1) <= small);
    }
    ASSERT_STATUS(st, MOAS_ERR_CONTEXT_FULL);
    ASSERT_TRUE(strstr(moas_last_error(), "budget") != NULL);
    ASSERT_EQ(n, 10);
    ASSERT_EQ(moas_context_n_past(ctx), 10);
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens, 2, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_CONTEXT_FULL);
    ASSERT_EQ(moas_context_n_past(ctx), 10);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 0, NULL, MOAS_LOGITS_NONE));   /* empty */
    ASSERT_STATUS(moas_context_set_kv_budget(ctx, mqa_token - 1), MOAS_ERR_INVALID_ARG);
    ASSERT_OK(moas_context_set_kv_budget(ctx, 0));   /* lifted: decoding goes on */
    ASSERT_OK(moas_context_decode(ctx, tokens[10], NULL));
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* MHA always, and at position 2 (layer 0) a budget of one MQA token set on the context
 * being decoded, as a route callback may (THREADING in moas.h). */
static int32_t mha_then_lower_budget(void *user, int32_t pos, int32_t layer,
                                     const float *gates, int32_t n_scheme, int32_t proposed) {
    (void)gates, (void)n_scheme, (void)proposed;
    if (pos == 2 && layer == 0) {
        (void)moas_context_set_kv_budget(user, N_LAYER * (1 * HEAD_DIM * 2 * 4 + META));
    }
    return 0;
}

/* A budget a route callback lowers below what the call's tokens already use binds the
 * rest of the call: the later tokens take the cheapest scheme in every layer (the plan
 * of a token once wrapped around below zero, and they went on at MHA), and the next
 * call is refused. */
TEST(kv_budget_lowered_during_a_call_binds_its_later_tokens) {
    enum { N = 8 };
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 8, &size);
    moas_model *m;
    int32_t tokens[N + 1], schemes[N * N_LAYER];
    const uint64_t mha_token = N_LAYER * (4 * HEAD_DIM * 2 * 4 + META);
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(tokens, N + 1, 40, 9);
    moas_context *ctx = routed_context(m, MOAS_TYPE_F32, -1);
    ASSERT_TRUE(ctx != NULL);
    ASSERT_OK(moas_context_set_kv_budget(ctx, N_CTX * mha_token));   /* all at MHA */
    moas_context_set_route_callback(ctx, mha_then_lower_budget, ctx);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, N, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_routes(ctx, 0, N, NULL, schemes, NULL));
    for (int32_t j = 0; j < N; j++) {
        for (int32_t l = 0; l < N_LAYER; l++) {
            ASSERT_EQ(schemes[j * N_LAYER + l], j < 2 ? 0 : j == 2 ? schemes[2 * N_LAYER + l] : 2);
        }
    }
    ASSERT_STATUS(moas_context_decode(ctx, tokens[N], NULL), MOAS_ERR_CONTEXT_FULL);
    moas_context_free(ctx);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* A budget is a bound the cache may reach, not one it must stay under: the least
 * budget (one token at the cheapest scheme in every layer) is accepted and holds
 * exactly one token, and a budget of exactly ten such tokens holds ten, the eleventh
 * refused; in mixture mode alike with its fixed token (all schemes' heads). */
TEST(kv_budget_holds_exactly_what_it_names) {
    size_t size;
    uint8_t *image = tiny_model_image(NULL, 8, &size);
    moas_model *m;
    int32_t tokens[N_CTX];
    const uint64_t mqa_token = N_LAYER * (1 * HEAD_DIM * 2 * 4 + META);   /* 74 */
    const uint64_t mix_token = N_LAYER * (4 + 2 + 1) * HEAD_DIM * 2 * 4;  /* 448 */

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(tokens, N_CTX, 40, 9);
    for (int mode = 0; mode < 2; mode++) {
        moas_context *ctx;
        uint64_t token;
        if (mode == 0) {
            ctx = routed_context(m, MOAS_TYPE_F32, 2);   /* MQA forced */
            token = mqa_token;
        } else {
            moas_context_params p;
            moas_context_params_init(&p);
            ASSERT_OK(moas_context_create(m, &p, &ctx));
            token = mix_token;
        }
        ASSERT_TRUE(ctx != NULL);
        ASSERT_STATUS(moas_context_set_kv_budget(ctx, token - 1), MOAS_ERR_INVALID_ARG);
        ASSERT_OK(moas_context_set_kv_budget(ctx, token));
        ASSERT_OK(moas_context_decode(ctx, tokens[0], NULL));
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), token);
        ASSERT_STATUS(moas_context_decode(ctx, tokens[1], NULL), MOAS_ERR_CONTEXT_FULL);
        ASSERT_OK(moas_context_set_kv_budget(ctx, 10 * token));
        ASSERT_OK(moas_context_decode_batch(ctx, tokens + 1, 8, NULL, MOAS_LOGITS_NONE));
        ASSERT_OK(moas_context_decode(ctx, tokens[9], NULL));   /* the tenth: exactly */
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), 10 * token);
        ASSERT_STATUS(moas_context_decode(ctx, tokens[10], NULL), MOAS_ERR_CONTEXT_FULL);
        ASSERT_STATUS(moas_context_decode_batch(ctx, tokens, 1, NULL, MOAS_LOGITS_NONE),
                      MOAS_ERR_CONTEXT_FULL);
        ASSERT_EQ(moas_context_n_past(ctx), 10);
        moas_context_free(ctx);
    }
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

/* Routed decode token by token equals routed batch decode; truncate then decode other
 * tokens equals never having gone further (the ragged offsets are restored). */
static int batch_and_truncate_equal_uninterrupted(bool modern) {
    tiny_model_config cfg;
    size_t size;
    tiny_model_config_default(&cfg);
    cfg.rope = cfg.rms_norm = cfg.swiglu = modern;
    uint8_t *image = tiny_model_image(&cfg, 9, &size);
    moas_model *m;
    int32_t first[N_CTX], second[N_CTX];
    float *all = malloc((size_t)N_CTX * 40 * sizeof *all);
    float one[40];

    ASSERT_OK(moas_model_load_memory(image, size, NULL, &m));
    pseudo_tokens(first, N_CTX, 40, 10);
    pseudo_tokens(second, N_CTX, 40, 11);
    moas_context *a = routed_context(m, MOAS_TYPE_F32, -1);
    moas_context *b = routed_context(m, MOAS_TYPE_F32, -1);
    ASSERT_TRUE(a && b && all);
    moas_context_set_route_callback(a, random_route, NULL);
    moas_context_set_route_callback(b, random_route, NULL);
    ASSERT_OK(moas_context_decode_batch(a, first, N_CTX, all, MOAS_LOGITS_ALL));
    for (int32_t i = 0; i < N_CTX; i++) {
        ASSERT_OK(moas_context_decode(b, first[i], one));
        ASSERT_TRUE(memcmp(one, all + (size_t)i * 40, sizeof one) == 0);
    }
    ASSERT_EQ(moas_context_kv_bytes_used(a, -1), moas_context_kv_bytes_used(b, -1));

    /* a: back to 13, then 15 others; b: fresh, 13 then the same 15 */
    ASSERT_OK(moas_context_truncate(a, 13));
    ASSERT_OK(moas_context_decode_batch(a, second, 15, NULL, MOAS_LOGITS_LAST));
    moas_context_reset(b);
    ASSERT_OK(moas_context_decode_batch(b, first, 13, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_decode_batch(b, second, 15, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(a), moas_context_logits(b), sizeof one) == 0);
    ASSERT_EQ(moas_context_kv_bytes_used(a, -1), moas_context_kv_bytes_used(b, -1));
    int32_t sa[28 * N_LAYER], sb[28 * N_LAYER];
    ASSERT_OK(moas_context_routes(a, 0, 28, NULL, sa, NULL));
    ASSERT_OK(moas_context_routes(b, 0, 28, NULL, sb, NULL));
    ASSERT_TRUE(memcmp(sa, sb, sizeof sa) == 0);
    free(all);
    moas_context_free(a);
    moas_context_free(b);
    moas_model_free(m);
    free(image);
    return TEST_PASS;
}

TEST(routed_batch_and_truncate_equal_uninterrupted) {
    return batch_and_truncate_equal_uninterrupted(false);
}

/* With RoPE a block's tokens run in groups by scheme, each rotated at its own position. */
TEST(routed_batch_and_truncate_equal_uninterrupted_modern) {
    return batch_and_truncate_equal_uninterrupted(true);
}

/* An f16 cache in routed mode stays within a stated tolerance of f32. */
TEST(routed_f16_cache_close_to_f32) {
    moas_model *m;
    int32_t tokens[64];
    ASSERT_OK(moas_model_load(test_data("tiny-moas-bias.gguf"), NULL, &m));
    const int32_t n = 64, n_vocab = moas_model_n_vocab(m);
    float *a = malloc((size_t)n * n_vocab * sizeof *a), *b = malloc((size_t)n * n_vocab * sizeof *b);
    pseudo_tokens(tokens, n, n_vocab, 12);
    moas_context *c32 = routed_context(m, MOAS_TYPE_F32, -1);
    moas_context *c16 = routed_context(m, MOAS_TYPE_F16, -1);
    ASSERT_TRUE(a && b && c32 && c16);
    /* the same routing for both, so only the storage differs */
    moas_context_set_route_callback(c32, random_route, NULL);
    moas_context_set_route_callback(c16, random_route, NULL);
    ASSERT_OK(moas_context_decode_batch(c32, tokens, n, a, MOAS_LOGITS_ALL));
    ASSERT_OK(moas_context_decode_batch(c16, tokens, n, b, MOAS_LOGITS_ALL));
    double worst = 0.0;
    for (size_t i = 0; i < (size_t)n * n_vocab; i++) {
        worst = fmax(worst, fabs((double)a[i] - (double)b[i]));
    }
    /* the same 2^-11 relative storage error, and the same bound, as in mixture mode */
    ASSERT_TRUE(worst > 0.0);
    ASSERT_NEAR(worst, 0.0, 1e-2);
    /* f16 halves the K/V bytes; the bookkeeping stays */
    const uint64_t meta = (uint64_t)n * moas_model_n_layer(m) * META;
    ASSERT_EQ((moas_context_kv_bytes_used(c32, -1) - meta) / 2, moas_context_kv_bytes_used(c16, -1) - meta);
    free(a);
    free(b);
    moas_context_free(c32);
    moas_context_free(c16);
    moas_model_free(m);
    return TEST_PASS;
}

/* Mean mixing gives every scheme the same gate, 1/n_scheme, so the scheme
 * moas_context_routes reports is decided by its tie rule: the first (moas.h), in
 * mixture mode (largest_gate) and in routed mode (what ran) alike. */
TEST(mean_mixing_ties_route_to_the_first_scheme) {
    enum { N = 6 };
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.mixing = MOAS_MIXING_MEAN;
    size_t size;
    uint8_t *image = tiny_model_image(&cfg, 99, &size);
    ASSERT_TRUE(image != NULL);
    moas_model *model;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &model));
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    ASSERT_TRUE(S == 3 && L == 2);
    int32_t tokens[N], schemes[N * 2];
    float gates[N * 2 * 3];
    pseudo_tokens(tokens, N, moas_model_n_vocab(model), 101);
    for (int mode = 0; mode < 2; mode++) {
        moas_context_params cp;
        moas_context *ctx;
        moas_context_params_init(&cp);
        cp.mode = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
        ASSERT_OK(moas_context_create(model, &cp, &ctx));
        ASSERT_OK(moas_context_decode_batch(ctx, tokens, N, NULL, MOAS_LOGITS_LAST));
        ASSERT_OK(moas_context_routes(ctx, 0, N, gates, schemes, NULL));
        for (int32_t i = 0; i < N * L; i++) {
            ASSERT_EQ(schemes[i], 0);
            for (int32_t s = 0; s < S; s++) {
                ASSERT_TRUE(gates[i * S + s] == 1.0f / 3.0f);
            }
        }
        moas_context_free(ctx);
    }
    moas_model_free(model);
    free(image);
    return TEST_PASS;
}
