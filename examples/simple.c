/*
 * simple.c - load a model, feed a prompt, sample 100 characters.
 *
 *     cc simple.c $(pkg-config --cflags --libs moas) -o simple
 *     ./simple models/moas-kjv.gguf "And God said"
 *
 * This is the quick start of moas.h, line for line (tests/pkgconfig.sh checks it).
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

    if (argc < 2 ||
        moas_model_load(argv[1], NULL, &model) != MOAS_OK ||
        moas_context_create(model, NULL, &ctx) != MOAS_OK ||
        moas_sampler_create(NULL, moas_model_n_vocab(model), &smp) != MOAS_OK ||
        moas_tokenize(model, prompt, (size_t)-1, tokens, 256, &n_tokens) != MOAS_OK ||
        moas_context_decode_batch(ctx, tokens, (int32_t)n_tokens, NULL,
                                  MOAS_LOGITS_LAST) != MOAS_OK) {
        fprintf(stderr, "error: %s\n", moas_last_error());
        return 1;
    }
    fputs(prompt, stdout);
    for (int i = 0; i < 100 && moas_context_n_past(ctx) < moas_context_n_ctx(ctx); i++) {
        int32_t token;
        moas_sampler_sample(smp, moas_context_logits(ctx), &token);
        fputs(moas_token_text(model, token), stdout);
        if (moas_context_decode(ctx, token, NULL) != MOAS_OK) break;
    }
    putchar('\n');
    moas_sampler_free(smp);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}
