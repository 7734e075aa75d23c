/*
 * simple.c - load a model, feed a prompt, sample 100 characters.
 *
 *     cc simple.c $(pkg-config --cflags --libs moas) -o simple
 *     ./simple models/moas-kjv.gguf "And God said"
 *
 * This is the quick start of moas.h, line for line (tests/python/test_docs.py checks
 * it; tests/pkgconfig.sh builds and runs it).
 */
#include <moas.h>
#include <stdio.h>

int main(int argc, char **argv) {
    moas_model *model = NULL;
    moas_context *ctx = NULL;
    moas_sampler *smp = NULL;
    const char *prompt = argc > 2 ? argv[2] : "In the beginning";
    int32_t tokens[256];
    size_t n_tokens = 0;
    int ok = 1;

    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [PROMPT]\n", argv[0]);
        return 2;
    }
    if (moas_model_load(argv[1], NULL, &model) != MOAS_OK ||
        moas_context_create(model, NULL, &ctx) != MOAS_OK ||
        moas_sampler_create(NULL, moas_model_n_vocab(model), &smp) != MOAS_OK ||
        moas_tokenize(model, prompt, (size_t)-1, tokens, 256, &n_tokens) != MOAS_OK ||
        moas_context_decode_batch(ctx, tokens, (int32_t)n_tokens, NULL,
                                  MOAS_LOGITS_LAST) != MOAS_OK) {
        ok = 0;
    }
    if (ok) {
        fputs(prompt, stdout);
        for (int i = 0; ok && i < 100 && moas_context_n_past(ctx) < moas_context_n_ctx(ctx);
             i++) {
            int32_t token;
            ok = moas_sampler_sample(smp, moas_context_logits(ctx), &token) == MOAS_OK;
            if (ok) {
                fputs(moas_token_text(model, token), stdout);
                ok = moas_context_decode(ctx, token, NULL) == MOAS_OK;
            }
        }
        putchar('\n');
    }
    if (!ok) {
        fprintf(stderr, "error: %s\n", moas_last_error());
    }
    moas_sampler_free(smp);
    moas_context_free(ctx);
    moas_model_free(model);
    return ok ? 0 : 1;
}
