/*
 * test_forward.c - the forward pass against PyTorch, and the decode invariants.
 *
 * Golden fixtures (tests/data/README.md) hold the float32 logits at every position and
 * the router gates, computed by PyTorch for tiny random models of each attention type.
 * libmoas must match them within float32 round-off, both when the text is decoded as
 * one batch and token by token.
 */
#include "test.h"

#include "context.h"
#include "support/tiny_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Logits are of order 1..10; float32 round-off over two layers stays near 1e-6.
 * 1e-4 is the product's promise (README.md, docs/FORMAT.md). Gates are in [0, 1]. */
#define LOGIT_TOLERANCE 1e-4
#define GATE_TOLERANCE 1e-5

typedef struct {
    uint32_t n_tokens, n_vocab, n_layer, n_scheme;
    int32_t *tokens;   /* [n_tokens] */
    float *logits;     /* [n_tokens][n_vocab] */
    float *gates;      /* [n_tokens][n_layer][n_scheme] */
} golden;

static void golden_free(golden *g) {
    free(g->tokens);
    free(g->logits);
    free(g->gates);
    memset(g, 0, sizeof *g);
}

/* Read NAME.golden (format in tests/data/README.md); 0 on success. Fixtures are
 * little-endian, as is every host we test on. */
static int golden_read(const char *name, golden *g) {
    char magic[8];
    FILE *f = fopen(test_data(name), "rb");
    int ok;

    memset(g, 0, sizeof *g);
    if (f == NULL) {
        test_report(__FILE__, __LINE__, "golden_read", "cannot open %s", test_data(name));
        return 1;
    }
    ok = fread(magic, 1, 8, f) == 8 && memcmp(magic, "MOASGLD1", 8) == 0 &&
         fread(&g->n_tokens, 4, 1, f) == 1 && fread(&g->n_vocab, 4, 1, f) == 1 &&
         fread(&g->n_layer, 4, 1, f) == 1 && fread(&g->n_scheme, 4, 1, f) == 1 &&
         g->n_tokens > 0 && g->n_tokens <= 4096 && g->n_vocab <= 4096 && g->n_layer <= 64 &&
         g->n_scheme <= 8;
    if (ok) {
        const size_t n_logits = (size_t)g->n_tokens * g->n_vocab;
        const size_t n_gates = (size_t)g->n_tokens * g->n_layer * g->n_scheme;
        g->tokens = malloc(g->n_tokens * sizeof *g->tokens);
        g->logits = malloc(n_logits * sizeof *g->logits);
        g->gates = malloc((n_gates ? n_gates : 1) * sizeof *g->gates);
        ok = g->tokens && g->logits && g->gates &&
             fread(g->tokens, 4, g->n_tokens, f) == g->n_tokens &&
             fread(g->logits, 4, n_logits, f) == n_logits &&
             fread(g->gates, 4, n_gates, f) == n_gates && fgetc(f) == EOF;
    }
    fclose(f);
    if (!ok) {
        test_report(__FILE__, __LINE__, "golden_read", "%s is malformed", test_data(name));
        golden_free(g);
        return 1;
    }
    return 0;
}

static double max_abs_diff(const float *a, const float *b, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= worst)) {   /* NaN makes it infinite */
            worst = d == d ? d : INFINITY;
        }
    }
    return worst;
}

/* Decode the golden text as one batch and token by token, with the given kernels and
 * thread count, and compare logits and gates with PyTorch's. */
static int check_golden(const char *model_file, const char *golden_file, moas_kernels kernels,
                        int32_t n_threads, moas_mode mode) {
    moas_model *model = NULL;
    moas_context *ctx = NULL;
    moas_context_params cp;
    golden g;
    float *logits, *gates;

    if (golden_read(golden_file, &g) != 0) {
        return TEST_FAIL;
    }
    ASSERT_OK(moas_model_load(test_data(model_file), NULL, &model));
    ASSERT_EQ(moas_model_n_vocab(model), g.n_vocab);
    ASSERT_EQ(moas_model_n_layer(model), g.n_layer);
    const int32_t S = moas_model_n_scheme(model);
    ASSERT_TRUE(g.n_scheme == 0 || (int32_t)g.n_scheme == S);

    moas_context_params_init(&cp);
    cp.kernels = kernels;
    cp.n_threads = n_threads;
    cp.mode = mode;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    const size_t n_logits = (size_t)g.n_tokens * g.n_vocab;
    logits = malloc(n_logits * sizeof *logits);
    gates = malloc((size_t)g.n_tokens * g.n_layer * S * sizeof *gates);
    ASSERT_TRUE(logits != NULL && gates != NULL);

    for (int pass = 0; pass < 2; pass++) {
        moas_context_reset(ctx);
        if (pass == 0) {
            ASSERT_OK(moas_context_decode_batch(ctx, g.tokens, (int32_t)g.n_tokens, logits,
                                                MOAS_LOGITS_ALL));
        } else {
            for (uint32_t i = 0; i < g.n_tokens; i++) {
                ASSERT_OK(moas_context_decode(ctx, g.tokens[i], logits + (size_t)i * g.n_vocab));
            }
        }
        ASSERT_EQ(moas_context_n_past(ctx), g.n_tokens);
        const double logit_err = max_abs_diff(logits, g.logits, n_logits);
        if (!(logit_err <= LOGIT_TOLERANCE)) {
            test_report(__FILE__, __LINE__, model_file, "%s pass: max |logit diff| %.3g > %.3g",
                        pass ? "token-by-token" : "batch", logit_err, LOGIT_TOLERANCE);
            return TEST_FAIL;
        }
        double gate_err = 0.0;
        if (g.n_scheme > 0) {
            ASSERT_OK(moas_context_routes(ctx, 0, (int32_t)g.n_tokens, gates, NULL, NULL));
            gate_err = max_abs_diff(gates, g.gates, (size_t)g.n_tokens * g.n_layer * g.n_scheme);
            if (!(gate_err <= GATE_TOLERANCE)) {
                test_report(__FILE__, __LINE__, model_file, "max |gate diff| %.3g > %.3g",
                            gate_err, GATE_TOLERANCE);
                return TEST_FAIL;
            }
        }
        printf("#   %s, %s mode, %s kernels, %d thread(s), %s: max |logit diff| %.2e, max |gate "
               "diff| %.2e\n", model_file, mode == MOAS_MODE_ROUTED ? "routed" : "mixture",
               moas_context_kernels_name(ctx), n_threads,
               pass ? "token by token" : "batch", logit_err, gate_err);
    }
    free(logits);
    free(gates);
    golden_free(&g);
    moas_context_free(ctx);
    moas_model_free(model);
    return TEST_PASS;
}

/* A fixture, with the reference kernels and with the fastest this CPU has. */
static int check_golden_mode(const char *name, const char *golden_suffix, moas_mode mode) {
    char model_file[128], golden_file[128];
    snprintf(model_file, sizeof model_file, "%s.gguf", name);
    snprintf(golden_file, sizeof golden_file, "%s%s.golden", name, golden_suffix);
    if (check_golden(model_file, golden_file, MOAS_KERNELS_REF, 1, mode) != TEST_PASS ||
        check_golden(model_file, golden_file, MOAS_KERNELS_AUTO, 0, mode) != TEST_PASS) {
        return TEST_FAIL;
    }
    return TEST_PASS;
}

static int check_golden_all_kernels(const char *name) {
    return check_golden_mode(name, "", MOAS_MODE_MIXTURE);
}

TEST(golden_baseline_bias_matches_pytorch) { return check_golden_all_kernels("tiny-baseline-bias"); }
TEST(golden_baseline_nobias_matches_pytorch) { return check_golden_all_kernels("tiny-baseline-nobias"); }
TEST(golden_static_bias_matches_pytorch) { return check_golden_all_kernels("tiny-static-bias"); }
TEST(golden_static_nobias_matches_pytorch) { return check_golden_all_kernels("tiny-static-nobias"); }
TEST(golden_moas_bias_matches_pytorch) { return check_golden_all_kernels("tiny-moas-bias"); }
TEST(golden_moas_nobias_matches_pytorch) { return check_golden_all_kernels("tiny-moas-nobias"); }
TEST(golden_moas_f16_weights_match_pytorch) { return check_golden_all_kernels("tiny-moas-f16"); }

/* The published block's independent schemes in routed mode: tools/train.py's
 * SchemeMixture.routed (--golden-mode routed) runs the largest gate's branch alone and
 * lets each query read the keys and values that every earlier token's own branch
 * stored (docs/ROUTING.md), so a query meets other branches' keys. Static MoAS has no
 * router: every token runs scheme 0. */
TEST(golden_moas_bias_routed_matches_pytorch) {
    return check_golden_mode("tiny-moas-bias", "-routed", MOAS_MODE_ROUTED);
}
TEST(golden_moas_nobias_routed_matches_pytorch) {
    return check_golden_mode("tiny-moas-nobias", "-routed", MOAS_MODE_ROUTED);
}
TEST(golden_modern_moas_routed_matches_pytorch) {
    return check_golden_mode("tiny-modern-moas-bias", "-routed", MOAS_MODE_ROUTED);
}
TEST(golden_static_bias_routed_matches_pytorch) {
    return check_golden_mode("tiny-static-bias", "-routed", MOAS_MODE_ROUTED);
}
TEST(golden_static_nobias_routed_matches_pytorch) {
    return check_golden_mode("tiny-static-nobias", "-routed", MOAS_MODE_ROUTED);
}

/* Pooled K/V models: PyTorch's soft mixture, and its hard top-1 routing (tools/train.py
 * --golden-mode routed), against libmoas's mixture and routed modes. */
TEST(golden_pooled_bias_mixture_matches_pytorch) {
    return check_golden_all_kernels("tiny-pooled-bias");
}
TEST(golden_pooled_nobias_mixture_matches_pytorch) {
    return check_golden_all_kernels("tiny-pooled-nobias");
}
TEST(golden_pooled_bias_routed_matches_pytorch) {
    return check_golden_mode("tiny-pooled-bias", "-routed", MOAS_MODE_ROUTED);
}
TEST(golden_pooled_nobias_routed_matches_pytorch) {
    return check_golden_mode("tiny-pooled-nobias", "-routed", MOAS_MODE_ROUTED);
}

/* The block options (docs/FORMAT.md, "Block options"): RoPE alone on the published
 * block and on static MoAS, RMSNorm and SwiGLU with learned positions, and all three,
 * on every attention type (plain GQA among them); pooled models in both modes. */
TEST(golden_rope_baseline_matches_pytorch) {
    return check_golden_all_kernels("tiny-rope-baseline-nobias");
}
TEST(golden_rms_swiglu_static_matches_pytorch) {
    return check_golden_all_kernels("tiny-rms-static-nobias");
}
TEST(golden_modern_moas_matches_pytorch) {
    return check_golden_all_kernels("tiny-modern-moas-bias");
}
TEST(golden_modern_moas_f16_weights_match_pytorch) {
    return check_golden_all_kernels("tiny-modern-moas-f16");
}
TEST(golden_rope_static_matches_pytorch) {
    return check_golden_all_kernels("tiny-rope-static-bias");
}
TEST(golden_modern_gqa_matches_pytorch) {
    return check_golden_all_kernels("tiny-modern-gqa2-nobias");
}
TEST(golden_rope_pooled_mixture_matches_pytorch) {
    return check_golden_all_kernels("tiny-rope-pooled-bias");
}
TEST(golden_rope_pooled_routed_matches_pytorch) {
    return check_golden_mode("tiny-rope-pooled-bias", "-routed", MOAS_MODE_ROUTED);
}
TEST(golden_modern_pooled_mixture_matches_pytorch) {
    return check_golden_all_kernels("tiny-modern-pooled-nobias");
}
TEST(golden_modern_pooled_routed_matches_pytorch) {
    return check_golden_mode("tiny-modern-pooled-nobias", "-routed", MOAS_MODE_ROUTED);
}

/* RoPE far from position 0: a context of 1,024, all 537 characters of tiny.txt, so the
 * batch pass runs blocks of 128 that start at positions 128 .. 512. */
TEST(golden_rope_long_mixture_matches_pytorch) {
    return check_golden_all_kernels("tiny-rope-long");
}
TEST(golden_rope_long_routed_matches_pytorch) {
    return check_golden_mode("tiny-rope-long", "-routed", MOAS_MODE_ROUTED);
}

/* Plain GQA (2 KV heads, biases) and MQA (1, none): one scheme of G < H heads, mixing
 * single (tools/train.py --attention-type gqa), and a pooled model with the one scheme
 * [1]. One PyTorch forward each; both modes must give it, and the cache must hold G
 * heads per token and layer, not H. */
static int check_plain_gqa(const char *name, int32_t n_kv) {
    char model_file[128];
    moas_model *model = NULL;
    moas_context *ctx = NULL;
    moas_context_params cp;
    golden g;

    if (check_golden_mode(name, "", MOAS_MODE_MIXTURE) != TEST_PASS ||
        check_golden_mode(name, "", MOAS_MODE_ROUTED) != TEST_PASS) {
        return TEST_FAIL;
    }
    snprintf(model_file, sizeof model_file, "%s.golden", name);
    if (golden_read(model_file, &g) != 0) {
        return TEST_FAIL;
    }
    snprintf(model_file, sizeof model_file, "%s.gguf", name);
    ASSERT_OK(moas_model_load(test_data(model_file), NULL, &model));
    ASSERT_EQ(moas_model_n_scheme(model), 1);
    ASSERT_EQ(moas_model_scheme_n_kv(model, 0), n_kv);
    for (int mode = 0; mode < 2; mode++) {
        moas_context_params_init(&cp);
        cp.mode = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
        ASSERT_OK(moas_context_create(model, &cp, &ctx));
        ASSERT_OK(moas_context_decode_batch(ctx, g.tokens, (int32_t)g.n_tokens, NULL,
                                            MOAS_LOGITS_NONE));
        /* 64 tokens x 2 layers x n_kv heads x 8 x (K, V) x 4 bytes, + 5 per token-layer
         * routed; a pooled model's mixture cache keeps the mix broadcast to all 6 heads */
        const bool pooled = strcmp(name, "tiny-pooled-mqa") == 0;
        const size_t heads = pooled && !mode ? 6 : (size_t)n_kv;
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1),
                  g.n_tokens * 2 * heads * 8 * 2 * 4 + (mode ? g.n_tokens * 2 * 5 : 0));
        moas_context_free(ctx);
    }
    moas_model_free(model);
    golden_free(&g);
    return TEST_PASS;
}

TEST(golden_gqa2_bias_matches_pytorch_both_modes) { return check_plain_gqa("tiny-gqa2-bias", 2); }
TEST(golden_mqa_nobias_matches_pytorch_both_modes) { return check_plain_gqa("tiny-mqa-nobias", 1); }
TEST(golden_pooled_mqa_matches_pytorch_both_modes) { return check_plain_gqa("tiny-pooled-mqa", 1); }

/* ---- decode invariants on the router model ------------------------------------ */

static const char *invariant_model = "tiny-moas-bias.gguf";

/* Tokens from a fixed generator, valid for the model. */
static void pseudo_tokens(int32_t *tokens, int32_t n, int32_t n_vocab, uint32_t seed) {
    for (int32_t i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        tokens[i] = (int32_t)((seed >> 8) % (uint32_t)n_vocab);
    }
}

/* Decoding incrementally gives, at every length, exactly the logits of decoding that
 * prefix from scratch: the cache holds everything the past contributes. The prefix
 * goes through blocks of 1 to 13 tokens (the context's full block is larger than
 * these models' contexts), so blocks split anywhere give the same bits too. */
TEST(incremental_decode_equals_recompute) {
    moas_model *model;
    moas_context *inc, *fresh;
    int32_t tokens[64];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t n_vocab = moas_model_n_vocab(model);
    const int32_t n = moas_model_n_ctx_train(model) < 64 ? moas_model_n_ctx_train(model) : 64;
    float *want = malloc((size_t)n_vocab * sizeof *want);
    ASSERT_TRUE(want != NULL);
    pseudo_tokens(tokens, n, n_vocab, 7);
    ASSERT_OK(moas_context_create(model, NULL, &inc));
    ASSERT_OK(moas_context_create(model, NULL, &fresh));
    for (int32_t k = 1; k <= n; k++) {
        ASSERT_OK(moas_context_decode(inc, tokens[k - 1], NULL));
        moas_context_reset(fresh);
        fresh->batch_tokens = 1 + k % 13;
        ASSERT_OK(moas_context_decode_batch(fresh, tokens, k, want, MOAS_LOGITS_LAST));
        ASSERT_TRUE(memcmp(moas_context_logits(inc), want, (size_t)n_vocab * sizeof *want) == 0);
    }
    free(want);
    moas_context_free(inc);
    moas_context_free(fresh);
    moas_model_free(model);
    return TEST_PASS;
}

/* Truncating to n_keep and decoding other tokens equals never having gone further. */
TEST(truncate_then_redecode_equals_uninterrupted_run) {
    moas_model *model;
    moas_context *a, *b;
    int32_t first[48], second[48];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t n_vocab = moas_model_n_vocab(model);
    const int32_t S = moas_model_n_scheme(model), L = moas_model_n_layer(model);
    pseudo_tokens(first, 48, n_vocab, 11);
    pseudo_tokens(second, 48, n_vocab, 12);
    ASSERT_OK(moas_context_create(model, NULL, &a));
    ASSERT_OK(moas_context_create(model, NULL, &b));

    /* a: 40 tokens, back to 17, then 20 others; b: the same 17, then the 20 others */
    ASSERT_OK(moas_context_decode_batch(a, first, 40, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_truncate(a, 17));
    ASSERT_EQ(moas_context_n_past(a), 17);
    ASSERT_TRUE(moas_context_logits(a) == NULL);
    ASSERT_OK(moas_context_decode_batch(a, second, 20, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(b, first, 17, NULL, MOAS_LOGITS_NONE));
    ASSERT_OK(moas_context_decode_batch(b, second, 20, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(a), moas_context_logits(b),
                       (size_t)n_vocab * sizeof(float)) == 0);

    /* the routing records agree too */
    float ga[37 * 8 * 8], gb[37 * 8 * 8];
    ASSERT_TRUE(L * S <= 64);
    ASSERT_OK(moas_context_routes(a, 0, 37, ga, NULL, NULL));
    ASSERT_OK(moas_context_routes(b, 0, 37, gb, NULL, NULL));
    ASSERT_TRUE(memcmp(ga, gb, (size_t)37 * L * S * sizeof(float)) == 0);
    ASSERT_EQ(moas_context_kv_bytes_used(a, -1), moas_context_kv_bytes_used(b, -1));

    /* truncate to the current length is a no-op; beyond it, or negative, is refused */
    ASSERT_OK(moas_context_truncate(a, 37));
    ASSERT_STATUS(moas_context_truncate(a, 38), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_truncate(a, -1), MOAS_ERR_INVALID_ARG);
    ASSERT_EQ(moas_context_n_past(a), 37);
    moas_context_free(a);
    moas_context_free(b);
    moas_model_free(model);
    return TEST_PASS;
}

/* Results do not depend on the thread count: rows and heads are split, never sums.
 * The parallel threshold is lowered to 0, so that these tiny models take every
 * parallel path (projections, attention heads) that large models take; a prompt of
 * 40 tokens goes through a block of 32 and a block of 8 (the block lowered from
 * MOAS_BATCH), then 8 tokens one by one. Each thread count runs twice: as these small
 * models run, and with the products' streaming hint that models larger than
 * MOAS_STREAM_MODEL_BYTES get (single tokens read rows one at a time), which must not
 * change a bit either. Teams never fall back to one thread here when they come late
 * (team.h), so the parallel paths run however busy the machine is. */
TEST(logits_identical_for_any_thread_count) {
    static const char *const models[] = {"tiny-moas-bias.gguf", "tiny-static-nobias.gguf",
                                         "tiny-pooled-bias.gguf", "tiny-baseline-bias.gguf",
                                         "tiny-modern-moas-bias.gguf",
                                         "tiny-modern-pooled-nobias.gguf"};
    /* The block-option models (RoPE, RMSNorm, SwiGLU) run every thread count with an
     * f32 cache, all bit-identical. The f16 bound below is the published models'; in
     * routed mode an f16 cache moves tiny-modern-moas-bias's logits by up to 0.0125
     * (measured, with no route changed: its random independent schemes amplify the
     * rounding more), so it is not applied to them. */
    const size_t first_modern = 4;
    for (size_t mi = 0; mi < sizeof models / sizeof models[0]; mi++) {
        for (int mode = 0; mode < 2; mode++) {
            moas_model *model;
            moas_context_params cp;
            int32_t tokens[48];
            float *one, *two;

            ASSERT_OK(moas_model_load(test_data(models[mi]), NULL, &model));
            const int32_t n_vocab = moas_model_n_vocab(model);
            const int32_t n_train = moas_model_n_ctx_train(model);
            const int32_t n = n_train < 48 ? n_train : 48;
            const int32_t n_prompt = n - 8;
            pseudo_tokens(tokens, n, n_vocab, 5 + (uint32_t)mi);
            one = malloc((size_t)n * n_vocab * sizeof *one);
            two = malloc((size_t)n * n_vocab * sizeof *two);
            ASSERT_TRUE(one && two);
            for (int32_t run = 0; run < 6; run++) {
                const int32_t t = run % 3 + 1;
                moas_context *ctx;
                float *out = run == 0 ? one : two;
                moas_context_params_init(&cp);
                cp.n_threads = t;
                cp.mode = mode == 0 ? MOAS_MODE_MIXTURE : MOAS_MODE_ROUTED;
                cp.kv_type = t == 3 && mi < first_modern ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
                ASSERT_OK(moas_context_create(model, &cp, &ctx));
                ctx->ws->parallel_min_work = 0;
                ctx->batch_tokens = 32;
                ctx->ws->mm_hints = run < 3 ? 0 : MOAS_MM_STREAM;
                ctx->ws->team.never_solo = true;   /* the team even on a busy machine */
                ASSERT_OK(moas_context_decode_batch(ctx, tokens, n_prompt, out, MOAS_LOGITS_ALL));
                for (int32_t i = n_prompt; i < n; i++) {
                    ASSERT_OK(moas_context_decode(ctx, tokens[i], out + (size_t)i * n_vocab));
                }
                if (run > 0 && (t < 3 || mi >= first_modern)) {
                    ASSERT_TRUE(memcmp(one, two, (size_t)n * n_vocab * sizeof *one) == 0);
                }
                moas_context_free(ctx);
            }
            /* the last run (t == 3) had an f16 cache: the same computation on other
             * numbers, so close to, but not the same as, the f32 runs */
            float worst = 0.0f;
            for (size_t i = 0; i < (size_t)n * n_vocab; i++) {
                const float d = fabsf(one[i] - two[i]);
                worst = d > worst ? d : worst;
            }
            ASSERT_TRUE(mi >= first_modern ? worst == 0.0f : worst > 0.0f && worst < 1e-2f);
            free(one);
            free(two);
            moas_model_free(model);
        }
    }
    return TEST_PASS;
}

/* A long prompt in blocks equals it token by token, bit for bit, for every token's
 * logits: 200 tokens go through a block of 128 and one of 72, so most queries of a
 * block see whole runs of 64 keys and take the several-query attention kernels
 * (ops.h), where the short contexts above only reach single queries. head_dim 16
 * is one AVX-512 vector (scores summed 4 x 4 together), 20 leaves a scalar tail;
 * mixture and routed mode, f32 and f16 caches, two of the four with the products'
 * streaming hint (single tokens read rows one at a time). */
TEST(long_prompt_in_blocks_equals_token_by_token) {
    enum { N = 200 };
    static const int32_t embd[] = {64, 80};
    int32_t tokens[N];
    for (size_t e = 0; e < sizeof embd / sizeof embd[0]; e++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_embd = embd[e];
        cfg.n_ff = 2 * embd[e];
        cfg.n_ctx_train = 256;
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 21 + e, &size);
        ASSERT_TRUE(image != NULL);
        moas_model *model;
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &model));
        ASSERT_EQ(moas_model_head_dim(model), embd[e] / 4);
        const int32_t n_vocab = moas_model_n_vocab(model);
        pseudo_tokens(tokens, N, n_vocab, 31 + (uint32_t)e);
        float *batch = malloc((size_t)N * n_vocab * sizeof *batch);
        float *single = malloc((size_t)N * n_vocab * sizeof *single);
        ASSERT_TRUE(batch != NULL && single != NULL);
        for (int variant = 0; variant < 4; variant++) {
            moas_context_params cp;
            moas_context *a, *b;
            moas_context_params_init(&cp);
            cp.n_threads = 1;
            cp.mode = variant % 2 ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            cp.kv_type = variant / 2 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
            ASSERT_OK(moas_context_create(model, &cp, &a));
            ASSERT_OK(moas_context_create(model, &cp, &b));
            ASSERT_EQ(a->batch_tokens, 128);
            a->ws->mm_hints = b->ws->mm_hints = variant == 1 || variant == 2 ? MOAS_MM_STREAM : 0;
            ASSERT_OK(moas_context_decode_batch(a, tokens, N, batch, MOAS_LOGITS_ALL));
            for (int32_t i = 0; i < N; i++) {
                ASSERT_OK(moas_context_decode(b, tokens[i], single + (size_t)i * n_vocab));
            }
            ASSERT_TRUE(memcmp(batch, single, (size_t)N * n_vocab * sizeof *batch) == 0);
            moas_context_free(a);
            moas_context_free(b);
        }
        free(batch);
        free(single);
        moas_model_free(model);
        free(image);
    }
    return TEST_PASS;
}

/* One decoded query's keys split between threads (flash-decoding: whole splits of
 * MOAS_ATT_SPLIT_KEYS keys to each thread, their softmax states folded in order) give
 * the bits of one thread going split by split and of the same positions in a prompt's
 * blocks: a 700-token context, 660 tokens, the last 60 decoded one at a time with 1, 2
 * and 3 threads (2 threads split the keys from 385 on, 3 from 641: the first 40
 * tokens split the heads, the last 20 the keys, and both ways must agree), for the
 * published block and a
 * pooled RoPE model in routed mode (MQA tokens: one row for all heads), f32 and f16
 * caches; and through a pool's batched decode (its own workspace), one sequence at 2
 * threads. */
TEST(decode_keys_split_across_threads_equal_one_thread) {
    enum { N = 660, PROMPT = 600 };
    int32_t tokens[N];
    for (int variant = 0; variant < 4; variant++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_ctx_train = 700;
        if (variant >= 2) {
            cfg.kv_sharing = "pooled";
            cfg.rope = true;
        }
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 41 + (uint64_t)variant, &size);
        ASSERT_TRUE(image != NULL);
        moas_model *model;
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &model));
        const int32_t n_vocab = moas_model_n_vocab(model);
        pseudo_tokens(tokens, N, n_vocab, 51 + (uint32_t)variant);
        float *want = malloc((size_t)N * n_vocab * sizeof *want);
        float *got = malloc((size_t)(N - PROMPT) * n_vocab * sizeof *got);
        ASSERT_TRUE(want != NULL && got != NULL);
        for (int t = 0; t <= 4; t++) {   /* t 0: the whole text in blocks, one thread */
            moas_context_params cp;
            moas_context *ctx;
            moas_pool *pool = NULL;
            moas_context_params_init(&cp);
            cp.n_threads = t == 0 ? 1 : t == 4 ? 2 : t;
            cp.mode = variant >= 2 ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            cp.kv_type = variant % 2 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
            if (t == 4) {   /* t 4: the pool's batched decode, 2 threads */
                moas_pool_params pp;
                moas_pool_params_init(&pp);
                pp.capacity_bytes = 16 << 20;
                pp.kv_type = cp.kv_type;
                pp.n_threads = 2;
                ASSERT_OK(moas_pool_create(model, &pp, &pool));
                pool->ws->parallel_min_work = 0;
                pool->ws->team.never_solo = true;
                cp.pool = pool;
            }
            ASSERT_OK(moas_context_create(model, &cp, &ctx));
            ASSERT_OK(moas__context_workspace(ctx, "test"));
            ctx->ws->parallel_min_work = 0;
            ctx->ws->team.never_solo = true;
            if (t == 4) {
                moas_pool_seq q = {ctx, tokens, PROMPT, MOAS_LOGITS_NONE, NULL};
                ASSERT_OK(moas_pool_decode(pool, &q, 1));
                for (int32_t i = PROMPT; i < N; i++) {
                    q.tokens = tokens + i;
                    q.n_tokens = 1;
                    q.which = MOAS_LOGITS_LAST;
                    q.logits = got + (size_t)(i - PROMPT) * n_vocab;
                    ASSERT_OK(moas_pool_decode(pool, &q, 1));
                }
                ASSERT_TRUE(memcmp(got, want + (size_t)PROMPT * n_vocab,
                                   (size_t)(N - PROMPT) * n_vocab * sizeof *got) == 0);
            } else if (t == 0) {
                ASSERT_OK(moas_context_decode_batch(ctx, tokens, N, want, MOAS_LOGITS_ALL));
            } else {
                ASSERT_OK(moas_context_decode_batch(ctx, tokens, PROMPT, NULL, MOAS_LOGITS_NONE));
                for (int32_t i = PROMPT; i < N; i++) {
                    ASSERT_OK(moas_context_decode(ctx, tokens[i],
                                                  got + (size_t)(i - PROMPT) * n_vocab));
                }
                ASSERT_TRUE(memcmp(got, want + (size_t)PROMPT * n_vocab,
                                   (size_t)(N - PROMPT) * n_vocab * sizeof *got) == 0);
            }
            moas_context_free(ctx);
            moas_pool_free(pool);
        }
        free(want);
        free(got);
        moas_model_free(model);
        free(image);
    }
    return TEST_PASS;
}

/* A failed call changes nothing: bad token ids and a full context. */
TEST(decode_errors_leave_context_unchanged) {
    moas_model *model;
    moas_context *ctx, *ref;
    moas_context_params cp;
    int32_t tokens[16];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t n_vocab = moas_model_n_vocab(model);
    pseudo_tokens(tokens, 16, n_vocab, 3);
    moas_context_params_init(&cp);
    cp.n_ctx = 8;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    ASSERT_OK(moas_context_create(model, &cp, &ref));

    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 5, NULL, MOAS_LOGITS_LAST));
    ASSERT_STATUS(moas_context_decode(ctx, -1, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "-1") != NULL);
    ASSERT_STATUS(moas_context_decode(ctx, n_vocab, NULL), MOAS_ERR_INVALID_ARG);
    tokens[7] = n_vocab + 5;   /* the batch is refused whole, before anything runs */
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens + 5, 3, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "index 2") != NULL);
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens, 4, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_CONTEXT_FULL);
    /* the room is checked before the tokens are read: a count past the room is
     * CONTEXT_FULL whatever the ids (the bad id at index 2 was reported first), and a
     * count past the caller's array is refused without reading beyond it (ASan) */
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens + 5, 4, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_CONTEXT_FULL);
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens + 14, 1000, NULL, MOAS_LOGITS_NONE),
                  MOAS_ERR_CONTEXT_FULL);
    /* no tokens: nothing written, whatever `which`, and the last logits kept */
    const float *kept = moas_context_logits(ctx);
    ASSERT_TRUE(kept != NULL);
    ASSERT_OK(moas_context_decode_batch(ctx, NULL, 0, NULL, MOAS_LOGITS_ALL));
    ASSERT_OK(moas_context_decode_batch(ctx, NULL, 0, NULL, MOAS_LOGITS_NONE));
    ASSERT_TRUE(moas_context_logits(ctx) == kept);
    ASSERT_STATUS(moas_context_decode_batch(ctx, NULL, 1, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens, -1, NULL, MOAS_LOGITS_LAST),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens, 1, NULL, MOAS_LOGITS_ALL),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_decode_batch(ctx, tokens, 1, NULL, (moas_logits)9),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_decode(NULL, 0, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_EQ(moas_context_n_past(ctx), 5);

    /* still usable, and as if the failures never happened */
    ASSERT_OK(moas_context_decode_batch(ref, tokens, 5, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(ref),
                       (size_t)n_vocab * sizeof(float)) == 0);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + 8, 3, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(ref, tokens + 8, 3, NULL, MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(ref),
                       (size_t)n_vocab * sizeof(float)) == 0);
    ASSERT_EQ(moas_context_n_past(ctx), 8);
    ASSERT_STATUS(moas_context_decode(ctx, 0, NULL), MOAS_ERR_CONTEXT_FULL);
    ASSERT_TRUE(strstr(moas_last_error(), "8") != NULL);
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, 0, NULL, MOAS_LOGITS_NONE));
    ASSERT_EQ(moas_context_n_past(ctx), 8);

    moas_context_reset(ctx);
    ASSERT_EQ(moas_context_n_past(ctx), 0);
    ASSERT_TRUE(moas_context_logits(ctx) == NULL);
    ASSERT_OK(moas_context_decode(ctx, tokens[0], NULL));
    moas_context_free(ctx);
    moas_context_free(ref);
    moas_model_free(model);
    return TEST_PASS;
}

TEST(context_params_are_checked) {
    moas_model *model;
    moas_context *ctx = (moas_context *)&ctx;   /* must be overwritten with NULL */
    moas_context_params cp;

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t n_train = moas_model_n_ctx_train(model);
    moas_context_params_init(&cp);
    cp.n_ctx = n_train + 1;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(ctx == NULL);
    cp.n_ctx = -1;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    moas_context_params_init(&cp);
    cp.n_threads = -2;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    cp.n_threads = 1025;   /* each thread has attention scratch: 1024 at most */
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "n_threads 1025") != NULL);
    cp.n_threads = 1024;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    moas_context_free(ctx);
    moas_context_params_init(&cp);
    cp.kv_type = MOAS_TYPE_Q8_0;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    moas_context_params_init(&cp);
    cp.mode = (moas_mode)7;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    moas_context_params_init(&cp);
    cp.size = 2;   /* smaller than the size field itself */
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    cp.size = sizeof cp + 8;   /* a newer header's struct */
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_create(NULL, NULL, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_context_create(model, NULL, NULL), MOAS_ERR_INVALID_ARG);

    /* an older caller's struct that stops after n_ctx gets defaults for the rest */
    moas_context_params_init(&cp);
    cp.n_ctx = 5;
    cp.size = (uint32_t)(offsetof(moas_context_params, n_ctx) + sizeof cp.n_ctx);
    cp.kv_type = (moas_type)99;   /* past the caller's size: never read */
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    ASSERT_EQ(moas_context_n_ctx(ctx), 5);
    ASSERT_EQ(moas_context_mode(ctx), MOAS_MODE_MIXTURE);
    moas_context_free(ctx);

    ASSERT_OK(moas_context_create(model, NULL, &ctx));
    ASSERT_EQ(moas_context_n_ctx(ctx), n_train);
    ASSERT_TRUE(moas_context_model(ctx) == model);
    moas_context_free(ctx);
    moas_context_free(NULL);
    moas_model_free(model);
    return TEST_PASS;
}

/* Each range of moas_context_params is closed where moas.h says so: n_ctx up to the
 * trained length, n_batch up to 65536, forced_scheme below n_scheme (the last scheme
 * can be forced, n_scheme itself is refused naming the range). */
TEST(context_params_accept_their_last_values) {
    moas_model *model;
    moas_context *ctx = NULL;
    moas_context_params cp;
    char want[96];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t n_train = moas_model_n_ctx_train(model);
    const int32_t n_scheme = moas_model_n_scheme(model);
    moas_context_params_init(&cp);
    cp.n_ctx = n_train;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    ASSERT_EQ(moas_context_n_ctx(ctx), n_train);
    moas_context_free(ctx);

    moas_context_params_init(&cp);
    cp.n_batch = 65536;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    moas_context_free(ctx);
    cp.n_batch = 65537;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_STR_EQ(moas_last_error(), "context_create: n_batch 65537 outside [0, 65536]");

    moas_context_params_init(&cp);
    cp.mode = MOAS_MODE_ROUTED;
    cp.forced_scheme = n_scheme - 1;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    ASSERT_OK(moas_context_decode(ctx, 1, NULL));
    const int32_t n_layer = moas_model_n_layer(model);
    int32_t schemes[64];
    ASSERT_TRUE(n_layer <= 64);
    ASSERT_OK(moas_context_routes(ctx, 0, 1, NULL, schemes, NULL));
    for (int32_t l = 0; l < n_layer; l++) {
        ASSERT_EQ(schemes[l], n_scheme - 1);
    }
    moas_context_free(ctx);
    cp.forced_scheme = n_scheme;
    ctx = (moas_context *)&ctx;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(ctx == NULL);
    snprintf(want, sizeof want, "context_create: forced_scheme %d outside [-1, %d)", n_scheme,
             n_scheme);
    ASSERT_STR_EQ(moas_last_error(), want);
    moas_model_free(model);
    return TEST_PASS;
}

/* An enum's COUNT is the first value past its members, not a member: mode
 * MOAS_MODE_COUNT and kernels MOAS_KERNELS_COUNT are refused naming the value. */
TEST(context_params_refuse_each_enums_count) {
    moas_model *model;
    moas_context *ctx = (moas_context *)&ctx;
    moas_context_params cp;
    char want[64];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    moas_context_params_init(&cp);
    cp.mode = MOAS_MODE_COUNT;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(ctx == NULL);
    snprintf(want, sizeof want, "context_create: unknown mode %d", (int)MOAS_MODE_COUNT);
    ASSERT_STR_EQ(moas_last_error(), want);
    moas_context_params_init(&cp);
    cp.kernels = MOAS_KERNELS_COUNT;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    snprintf(want, sizeof want, "context_create: unknown kernels %d", (int)MOAS_KERNELS_COUNT);
    ASSERT_STR_EQ(moas_last_error(), want);
    moas_model_free(model);
    return TEST_PASS;
}

static void *alloc_only(void *user, size_t size) {
    (void)user;
    return malloc(size);
}

static void free_only(void *user, void *ptr) {
    (void)user;
    free(ptr);
}

/* An allocator needs both functions: one without free, or without alloc, is refused
 * before anything is allocated. */
TEST(context_params_refuse_an_allocator_without_free) {
    moas_model *model;
    moas_context *ctx = (moas_context *)&ctx;
    moas_context_params cp;
    const moas_allocator no_free = {alloc_only, NULL, NULL}, no_alloc = {NULL, free_only, NULL};

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    moas_context_params_init(&cp);
    cp.allocator = &no_free;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(ctx == NULL);
    ASSERT_STR_EQ(moas_last_error(), "context_create: allocator without alloc or free");
    cp.allocator = &no_alloc;
    ASSERT_STATUS(moas_context_create(model, &cp, &ctx), MOAS_ERR_INVALID_ARG);
    ASSERT_STR_EQ(moas_last_error(), "context_create: allocator without alloc or free");
    moas_model_free(model);
    return TEST_PASS;
}

/* Mixture mode stores every scheme's heads for every token: bytes follow exactly. */
TEST(mixture_kv_bytes_follow_formula) {
    moas_model *model;
    moas_context *ctx;
    moas_context_params cp;
    int32_t tokens[10];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t L = moas_model_n_layer(model), d = moas_model_head_dim(model);
    size_t heads = 0;
    for (int32_t s = 0; s < moas_model_n_scheme(model); s++) {
        heads += (size_t)moas_model_scheme_n_kv(model, s);
    }
    pseudo_tokens(tokens, 10, moas_model_n_vocab(model), 1);
    for (int k = 0; k < 2; k++) {
        const size_t elem = k == 0 ? 4 : 2;
        moas_context_params_init(&cp);
        cp.kv_type = k == 0 ? MOAS_TYPE_F32 : MOAS_TYPE_F16;
        cp.n_ctx = 12;
        ASSERT_OK(moas_context_create(model, &cp, &ctx));
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), 0);
        ASSERT_OK(moas_context_decode_batch(ctx, tokens, 10, NULL, MOAS_LOGITS_NONE));
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, 0), 10 * heads * d * 2 * elem);
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), (size_t)L * 10 * heads * d * 2 * elem);
        ASSERT_EQ(moas_context_kv_bytes_reserved(ctx, -1), (size_t)L * 12 * heads * d * 2 * elem);
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, L), 0);
        ASSERT_EQ(moas_context_kv_bytes_used(ctx, -2), 0);

        int32_t kv_heads[10 * 8], schemes[10 * 8];
        ASSERT_OK(moas_context_routes(ctx, 0, 10, NULL, schemes, kv_heads));
        for (int32_t i = 0; i < 10 * L; i++) {
            ASSERT_EQ(kv_heads[i], heads);
            ASSERT_TRUE(schemes[i] >= 0 && schemes[i] < moas_model_n_scheme(model));
        }
        ASSERT_STATUS(moas_context_routes(ctx, 5, 6, NULL, NULL, NULL), MOAS_ERR_INVALID_ARG);
        ASSERT_STATUS(moas_context_routes(ctx, -1, 1, NULL, NULL, NULL), MOAS_ERR_INVALID_ARG);
        moas_context_free(ctx);
    }
    moas_model_free(model);
    return TEST_PASS;
}

/* An f16 KV cache stays close to f32: keys and values lose 11 bits of mantissa. */
TEST(f16_kv_cache_close_to_f32) {
    moas_model *model;
    moas_context *a, *b;
    moas_context_params cp;
    int32_t tokens[64];

    ASSERT_OK(moas_model_load(test_data(invariant_model), NULL, &model));
    const int32_t n_vocab = moas_model_n_vocab(model);
    const int32_t n = moas_model_n_ctx_train(model) < 64 ? moas_model_n_ctx_train(model) : 64;
    pseudo_tokens(tokens, n, n_vocab, 9);
    moas_context_params_init(&cp);
    ASSERT_OK(moas_context_create(model, &cp, &a));
    cp.kv_type = MOAS_TYPE_F16;
    ASSERT_OK(moas_context_create(model, &cp, &b));
    float *la = malloc((size_t)n * n_vocab * sizeof *la);
    float *lb = malloc((size_t)n * n_vocab * sizeof *lb);
    ASSERT_TRUE(la && lb);
    ASSERT_OK(moas_context_decode_batch(a, tokens, n, la, MOAS_LOGITS_ALL));
    ASSERT_OK(moas_context_decode_batch(b, tokens, n, lb, MOAS_LOGITS_ALL));
    /* relative error of f16 is 2^-11; through two layers the logits move by a few
     * 1e-3 at most on this model */
    const double err = max_abs_diff(la, lb, (size_t)n * n_vocab);
    ASSERT_TRUE(err > 0.0);    /* the cache really is f16 */
    ASSERT_NEAR(err, 0.0, 1e-2);
    free(la);
    free(lb);
    moas_context_free(a);
    moas_context_free(b);
    moas_model_free(model);
    return TEST_PASS;
}

/* Prompt blocks of 64 rows or more take the finer slicing (products in four slices a
 * thread, attention in chunks of 64 queries, the row work between products as steps):
 * every thread count gives the bits of one thread, for every kind of block (independent
 * and pooled schemes, mixture and routed, RoPE or learned positions, f32, f16 and Q8_0
 * caches, f32, f16 and Q8_0 matrices, pages of 1 and 4 heads); and a pool's block that mixes a long run with short
 * runs and single tokens gives each context what it gets alone. */
TEST(fine_slices_identical_for_any_thread_count) {
    enum { N = 230 };
    static const int32_t threads[] = {1, 2, 5};   /* 5: more threads than the test host's cores */
    int32_t tokens[N];
    for (int kind = 0; kind < 5; kind++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_embd = 128;   /* head_dim 32: a Q8_0 block per head */
        cfg.n_ff = 256;
        cfg.n_ctx_train = 256;
        cfg.router_hidden = 64;
        if (kind == 1 || kind == 3) {
            cfg.kv_sharing = "pooled";
        }
        if (kind >= 2) {
            cfg.rope = true;
        }
        if (kind == 3) {
            cfg.rms_norm = cfg.swiglu = true;
            cfg.mat_type = MOAS_TYPE_F16;
        }
        if (kind == 4) {
            cfg.mixing = MOAS_MIXING_MEAN;
            cfg.mat_type = MOAS_TYPE_Q8_0;
        }
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 71 + (uint64_t)kind, &size);
        ASSERT_TRUE(image != NULL);
        moas_model *model;
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &model));
        const int32_t n_vocab = moas_model_n_vocab(model);
        pseudo_tokens(tokens, N, n_vocab, 81 + (uint32_t)kind);
        float *want = malloc((size_t)N * n_vocab * sizeof *want);
        float *got = malloc((size_t)N * n_vocab * sizeof *got);
        ASSERT_TRUE(want != NULL && got != NULL);
        /* both modes, each with one cache type per kind, so that across the kinds
         * each mode meets every type (all six pairs per kind took half a minute
         * under TSan) */
        for (int variant = 0; variant < 2; variant++) {
            const moas_mode mode = variant ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            const int type_index = (kind + variant) % 3;
            const moas_type kv_type = type_index == 0   ? MOAS_TYPE_F32
                                      : type_index == 1 ? MOAS_TYPE_F16
                                                        : MOAS_TYPE_Q8_0;
            for (size_t ti = 0; ti < sizeof threads / sizeof threads[0]; ti++) {
                moas_context_params cp;
                moas_context *ctx;
                moas_context_params_init(&cp);
                cp.n_threads = threads[ti];
                cp.mode = mode;
                cp.kv_type = kv_type;
                ASSERT_OK(moas_context_create(model, &cp, &ctx));
                ctx->ws->parallel_min_work = 0;
                ctx->ws->team.never_solo = true;
                float *out = ti == 0 ? want : got;
                /* 200 tokens (a block of 128, one of 72), then a block of 30 */
                ASSERT_OK(moas_context_decode_batch(ctx, tokens, 200, out, MOAS_LOGITS_ALL));
                ASSERT_OK(moas_context_decode_batch(ctx, tokens + 200, N - 200,
                                                    out + (size_t)200 * n_vocab,
                                                    MOAS_LOGITS_ALL));
                if (ti > 0) {
                    ASSERT_TRUE(memcmp(want, got, (size_t)N * n_vocab * sizeof *want) == 0);
                }
                moas_context_free(ctx);
            }
            /* a pool: four contexts, one block of a 100-token run, a 70-token run, a
             * 20-token run and a single token each, at 1, 2 and 3 threads (pages of one
             * head: every token's heads in pages of their own) */
            for (int pt = 0; pt < 3; pt++) {
                static const int32_t lens[4] = {100, 1, 70, 20};
                moas_pool_params pp;
                moas_pool *pool;
                moas_pool_params_init(&pp);
                pp.capacity_bytes = 64 << 20;
                pp.kv_type = kv_type;
                pp.n_threads = pt + 1;
                pp.n_batch = 256;
                pp.page_heads = pt == 1 ? 1 : 4;
                ASSERT_OK(moas_pool_create(model, &pp, &pool));
                pool->ws->parallel_min_work = 0;
                pool->ws->team.never_solo = true;
                moas_context *c[4];
                moas_pool_seq q[4];
                float *logits = got;
                for (int i = 0; i < 4; i++) {
                    moas_context_params cp;
                    moas_context_params_init(&cp);
                    cp.pool = pool;
                    cp.mode = mode;
                    cp.kv_type = kv_type;
                    ASSERT_OK(moas_context_create(model, &cp, &c[i]));
                    /* a few tokens first, so that the block starts past position 0 */
                    moas_pool_seq first = {c[i], tokens + 3 * i, 3 + i, MOAS_LOGITS_NONE, NULL};
                    ASSERT_OK(moas_pool_decode(pool, &first, 1));
                    q[i] = (moas_pool_seq){c[i], tokens + 10 + 7 * i, lens[i], MOAS_LOGITS_ALL,
                                           logits};
                    logits += (size_t)lens[i] * n_vocab;
                }
                ASSERT_OK(moas_pool_decode(pool, q, 4));
                /* each alone, one thread */
                logits = got;
                for (int i = 0; i < 4; i++) {
                    moas_context_params cp;
                    moas_context *alone;
                    moas_context_params_init(&cp);
                    cp.n_threads = 1;
                    cp.mode = mode;
                    cp.kv_type = kv_type;
                    ASSERT_OK(moas_context_create(model, &cp, &alone));
                    ASSERT_OK(moas_context_decode_batch(alone, tokens + 3 * i, 3 + i, NULL,
                                                        MOAS_LOGITS_NONE));
                    ASSERT_OK(moas_context_decode_batch(alone, tokens + 10 + 7 * i, lens[i],
                                                        want, MOAS_LOGITS_ALL));
                    ASSERT_TRUE(memcmp(want, logits, (size_t)lens[i] * n_vocab * sizeof *want) ==
                                0);
                    logits += (size_t)lens[i] * n_vocab;
                    moas_context_free(alone);
                    moas_context_free(c[i]);
                }
                moas_pool_free(pool);
            }
        }
        free(want);
        free(got);
        moas_model_free(model);
        free(image);
    }
    return TEST_PASS;
}

/* ---- the forward pass written out in double ---------------------------------- */

/* docs/FORMAT.md's "Semantics" for one layer of independent schemes (MHA and MQA),
 * mean mixing and learned positions, with LayerNorm and GELU or RMSNorm and SwiGLU,
 * computed here in double from the model's own tensors: the library must agree
 * within float32 round-off (3e-7 measured, 1e-5 allowed). The goldens' models are
 * all 16 or more wide in multiples of 4; this one is 15 wide (three heads of 5), so
 * the norms' four interleaved partial sums end on a tail of 3, and its eps is 0.01,
 * large enough that dropping it shows. */
typedef struct {
    const moas_model *model;
    int32_t C, H, d, n_ff, n_vocab;
    bool rms, swiglu;
    double eps;
} ref_model;

static const float *ref_tensor(const ref_model *r, const char *name) {
    int64_t index = -1;
    moas_tensor_info info;
    if (moas_model_tensor_find(r->model, name, &index) != MOAS_OK) {
        return NULL;
    }
    info.size = sizeof info;
    if (moas_model_tensor(r->model, index, &info) != MOAS_OK || info.type != MOAS_TYPE_F32) {
        return NULL;
    }
    return info.data;
}

/* out = norm(x; w, b) over C (b may be NULL). */
static void ref_norm(const ref_model *r, const double *x, const float *w, const float *b,
                     double *out) {
    double mean = 0.0, sq = 0.0;
    for (int32_t i = 0; i < r->C; i++) {
        mean += x[i];
    }
    mean = r->rms ? 0.0 : mean / r->C;
    for (int32_t i = 0; i < r->C; i++) {
        sq += (x[i] - mean) * (x[i] - mean);
    }
    const double inv = 1.0 / sqrt(sq / r->C + r->eps);
    for (int32_t i = 0; i < r->C; i++) {
        out[i] = (x[i] - mean) * inv * w[i] + (b != NULL ? b[i] : 0.0);
    }
}

/* y = W x (+ b), W [rows][cols] as the file stores it. */
static void ref_matvec(const float *w, const float *b, const double *x, int32_t rows,
                       int32_t cols, double *y) {
    for (int32_t r = 0; r < rows; r++) {
        double sum = b != NULL ? b[r] : 0.0;
        for (int32_t c = 0; c < cols; c++) {
            sum += (double)w[(size_t)r * cols + c] * x[c];
        }
        y[r] = sum;
    }
}

TEST(forward_of_an_odd_width_equals_the_definition_in_double) {
    enum { N = 5, MAX_C = 15, MAX_FF = 40, S = 2 };
    static const int32_t n_kv[S] = {3, 1};
    for (int variant = 0; variant < 2; variant++) {
        tiny_model_config cfg;
        tiny_model_config_default(&cfg);
        cfg.n_layer = 1;
        cfg.n_embd = 15;
        cfg.n_head = 3;
        cfg.n_ff = variant == 0 ? 40 : 24;
        cfg.n_scheme = S;
        cfg.scheme_n_kv[0] = n_kv[0];
        cfg.scheme_n_kv[1] = n_kv[1];
        cfg.mixing = MOAS_MIXING_MEAN;
        cfg.eps = 0.01f;
        cfg.rms_norm = cfg.swiglu = variant == 1;
        size_t size;
        uint8_t *image = tiny_model_image(&cfg, 91 + (uint64_t)variant, &size);
        ASSERT_TRUE(image != NULL);
        moas_model *model;
        ASSERT_OK(moas_model_load_memory(image, size, NULL, &model));
        const ref_model r = {model, 15, 3, 5, cfg.n_ff, moas_model_n_vocab(model),
                             variant == 1, variant == 1, (double)cfg.eps};
        const float *tok = ref_tensor(&r, "token_embd.weight");
        const float *pos = ref_tensor(&r, "position_embd.weight");
        const float *an_w = ref_tensor(&r, "blk.0.attn_norm.weight");
        const float *an_b = ref_tensor(&r, "blk.0.attn_norm.bias");
        const float *fn_w = ref_tensor(&r, "blk.0.ffn_norm.weight");
        const float *fn_b = ref_tensor(&r, "blk.0.ffn_norm.bias");
        const float *on_w = ref_tensor(&r, "output_norm.weight");
        const float *on_b = ref_tensor(&r, "output_norm.bias");
        const float *up_w = ref_tensor(&r, "blk.0.ffn_up.weight");
        const float *up_b = ref_tensor(&r, "blk.0.ffn_up.bias");
        const float *gate_w = variant == 1 ? ref_tensor(&r, "blk.0.ffn_gate.weight") : NULL;
        const float *gate_b = variant == 1 ? ref_tensor(&r, "blk.0.ffn_gate.bias") : NULL;
        const float *down_w = ref_tensor(&r, "blk.0.ffn_down.weight");
        const float *down_b = ref_tensor(&r, "blk.0.ffn_down.bias");
        ASSERT_TRUE(tok && pos && an_w && an_b && fn_w && fn_b && on_w &&
                    on_b && up_w && up_b && (gate_w || variant == 0) &&
                    (gate_b || variant == 0) && down_w && down_b);
        const float *wq[S], *bq[S], *wk[S], *bk[S], *wv[S], *bv[S], *wo[S], *bo[S];
        for (int s = 0; s < S; s++) {
            char name[64];
#define REF_SCHEME_TENSOR_(var_, what_)                                       \
    snprintf(name, sizeof name, "blk.0.attn_%s.%d.%s", #what_, s,         \
             #var_[0] == 'w' ? "weight" : "bias");                        \
    var_[s] = ref_tensor(&r, name);                                       \
    ASSERT_TRUE(var_[s] != NULL);
            REF_SCHEME_TENSOR_(wq, q)
            REF_SCHEME_TENSOR_(bq, q)
            REF_SCHEME_TENSOR_(wk, k)
            REF_SCHEME_TENSOR_(bk, k)
            REF_SCHEME_TENSOR_(wv, v)
            REF_SCHEME_TENSOR_(bv, v)
            REF_SCHEME_TENSOR_(wo, output)
            REF_SCHEME_TENSOR_(bo, output)
#undef REF_SCHEME_TENSOR_
        }

        int32_t tokens[N];
        pseudo_tokens(tokens, N, r.n_vocab, 93 + (uint32_t)variant);
        /* the definition: every position's residual, keys and values kept */
        double x[N][MAX_C], a[N][MAX_C], k[S][N][MAX_C], v[S][N][MAX_C], q[S][N][MAX_C];
        double want[N][TINY_MODEL_DEFAULT_VOCAB];
        for (int32_t p = 0; p < N; p++) {
            for (int32_t i = 0; i < r.C; i++) {
                x[p][i] = (double)tok[(size_t)tokens[p] * r.C + i] + (double)pos[(size_t)p * r.C + i];
            }
            ref_norm(&r, x[p], an_w, an_b, a[p]);
            double y[MAX_C] = {0};
            for (int s = 0; s < S; s++) {
                ref_matvec(wq[s], bq[s], a[p], r.C, r.C, q[s][p]);
                ref_matvec(wk[s], bk[s], a[p], n_kv[s] * r.d, r.C, k[s][p]);
                ref_matvec(wv[s], bv[s], a[p], n_kv[s] * r.d, r.C, v[s][p]);
                double o[MAX_C] = {0}, ys[MAX_C];
                for (int32_t h = 0; h < r.H; h++) {
                    const int32_t g = h * n_kv[s] / r.H;
                    double score[N], most = -INFINITY, sum = 0.0;
                    for (int32_t j = 0; j <= p; j++) {
                        score[j] = 0.0;
                        for (int32_t e = 0; e < r.d; e++) {
                            score[j] += q[s][p][h * r.d + e] * k[s][j][g * r.d + e];
                        }
                        score[j] /= sqrt((double)r.d);
                        most = score[j] > most ? score[j] : most;
                    }
                    for (int32_t j = 0; j <= p; j++) {
                        score[j] = exp(score[j] - most);
                        sum += score[j];
                    }
                    for (int32_t j = 0; j <= p; j++) {
                        for (int32_t e = 0; e < r.d; e++) {
                            o[h * r.d + e] += score[j] / sum * v[s][j][g * r.d + e];
                        }
                    }
                }
                ref_matvec(wo[s], bo[s], o, r.C, r.C, ys);
                for (int32_t i = 0; i < r.C; i++) {
                    y[i] += ys[i] / S;
                }
            }
            for (int32_t i = 0; i < r.C; i++) {
                x[p][i] += y[i];
            }
            double hn[MAX_C], up[MAX_FF], gate[MAX_FF], down[MAX_C], out[MAX_C];
            ref_norm(&r, x[p], fn_w, fn_b, hn);
            ref_matvec(up_w, up_b, hn, r.n_ff, r.C, up);
            if (r.swiglu) {
                ref_matvec(gate_w, gate_b, hn, r.n_ff, r.C, gate);
            }
            for (int32_t i = 0; i < r.n_ff; i++) {
                up[i] = r.swiglu ? gate[i] / (1.0 + exp(-gate[i])) * up[i]
                                 : 0.5 * up[i] * (1.0 + erf(up[i] / sqrt(2.0)));
            }
            ref_matvec(down_w, down_b, up, r.C, r.n_ff, down);
            for (int32_t i = 0; i < r.C; i++) {
                x[p][i] += down[i];
            }
            ref_norm(&r, x[p], on_w, on_b, out);
            ref_matvec(tok, NULL, out, r.n_vocab, r.C, want[p]);   /* tied output */
        }

        /* the library, a block of all five tokens, with the fastest table and the reference */
        for (int kernels = 0; kernels < 2; kernels++) {
            moas_context_params cp;
            moas_context *ctx;
            float got[N * TINY_MODEL_DEFAULT_VOCAB];
            moas_context_params_init(&cp);
            cp.n_threads = 1;
            cp.kernels = kernels ? MOAS_KERNELS_REF : MOAS_KERNELS_AUTO;
            ASSERT_OK(moas_context_create(model, &cp, &ctx));
            ASSERT_OK(moas_context_decode_batch(ctx, tokens, N, got, MOAS_LOGITS_ALL));
            for (int32_t p = 0; p < N; p++) {
                for (int32_t t = 0; t < r.n_vocab; t++) {
                    ASSERT_NEAR(got[(size_t)p * r.n_vocab + t], want[p][t], 1e-5);
                }
            }
            moas_context_free(ctx);
        }
        moas_model_free(model);
        free(image);
    }
    return TEST_PASS;
}

/* RoPE positions past the model's table (which holds at most
 * MOAS_ROPE_TABLE_MAX_BYTES: a long context's first positions only) take angles
 * computed on the spot, the table's numbers exactly. Here the table is cut to its
 * first 8 positions, followed by a row of NaN that no position may read, and 20
 * tokens must decode to the bits of the whole table, in both modes. Heads of 8 (4
 * pairs, fewer than a chunk of computed angles) so that a chunk running past a head's
 * pairs would turn the next head. */
TEST(rope_positions_past_the_table_are_computed_alike) {
    enum { N = 20, KEPT = 8, D = 8 };
    tiny_model_config cfg;
    tiny_model_config_default(&cfg);
    cfg.n_embd = 4 * D;
    cfg.rope = true;
    size_t size;
    uint8_t *image = tiny_model_image(&cfg, 95, &size);
    ASSERT_TRUE(image != NULL);
    moas_model *model;
    ASSERT_OK(moas_model_load_memory(image, size, NULL, &model));
    ASSERT_EQ(moas_model_head_dim(model), D);
    ASSERT_TRUE(model->rope_positions >= N);
    const int32_t n_vocab = moas_model_n_vocab(model);
    int32_t tokens[N];
    pseudo_tokens(tokens, N, n_vocab, 97);
    float *want = malloc((size_t)N * n_vocab * sizeof *want);
    float *got = malloc((size_t)N * n_vocab * sizeof *got);
    ASSERT_TRUE(want != NULL && got != NULL);
    float cut[(KEPT + 1) * D];
    memcpy(cut, model->rope_table, sizeof(float) * KEPT * D);
    for (int32_t i = KEPT * D; i < (KEPT + 1) * D; i++) {
        cut[i] = NAN;
    }
    float *const table = model->rope_table;
    const int32_t positions = model->rope_positions;
    for (int mode = 0; mode < 2; mode++) {
        for (int cut_table = 0; cut_table < 2; cut_table++) {
            moas_context_params cp;
            moas_context *ctx;
            moas_context_params_init(&cp);
            cp.mode = mode ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
            model->rope_table = cut_table ? cut : table;
            model->rope_positions = cut_table ? KEPT : positions;
            ASSERT_OK(moas_context_create(model, &cp, &ctx));
            ASSERT_OK(moas_context_decode_batch(ctx, tokens, N, cut_table ? got : want,
                                                MOAS_LOGITS_ALL));
            moas_context_free(ctx);
        }
        ASSERT_TRUE(memcmp(want, got, (size_t)N * n_vocab * sizeof *want) == 0);
    }
    model->rope_table = table;
    model->rope_positions = positions;
    free(want);
    free(got);
    moas_model_free(model);
    free(image);
    return TEST_PASS;
}
