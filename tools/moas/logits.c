/*
 * logits.c - `moas logits`: the logits at every position of a text, as raw float32.
 */
#include "cli.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void usage(FILE *f) {
    fputs("usage: moas logits -m MODEL -f TEXT -o OUT [options]\n"
          "\n"
          "Writes the logits after each character of TEXT to OUT: float32, little-endian,\n"
          "[n_tokens][n_vocab], no header. A text longer than the context is decoded in\n"
          "windows of the context length, each from an empty cache.\n"
          "\n"
          "  -m, --model PATH        GGUF model file\n"
          "  -f, --file TEXT         the text; - reads stdin\n"
          "  -o, --output OUT        the file to write\n",
          f);
    print_context_options(f, &moas_cmd_logits);
}

static const opt_id accepted[] = {
    OPT_MODEL, OPT_FILE, OPT_OUTPUT, OPT_THREADS, OPT_CTX, OPT_MODE, OPT_KV_TYPE,
    OPT_UNKNOWN, OPT_FORCE_SCHEME, OPT_NO_MMAP, OPT_END,
};

static int run(int argc, char **argv);

const command moas_cmd_logits = {
    "logits", "every position's logits of a text, as raw float32", usage, accepted, run,
};

static int run(int argc, char **argv) {
    options o;
    options_init(&o);
    parse_options(&moas_cmd_logits, argc, argv, &o);
    if (o.text_path == NULL || o.out_path == NULL) {
        usage_error(&moas_cmd_logits, "logits needs -f TEXT and -o OUT");
    }
    moas_model *model = load_model(&o);
    moas_context *ctx = new_context(model, &o);
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    const int32_t n_vocab = moas_model_n_vocab(model);
    size_t len, n_tokens;
    char name[512];

    char *text = read_text(o.text_path, &len);
    int32_t *tokens = tokenize_all(model, &o.unknown, text, len, &n_tokens, NULL);
    if (n_tokens == 0) {
        die("%s has no characters: there are no logits to write",
            text_name(o.text_path, name, sizeof name));
    }
    /* the output must not be an input: opening it for writing would truncate the
     * model's mapped file (a bus error) or the text before they are read */
    struct stat out_st, in_st;
    if (stat(o.out_path, &out_st) == 0) {
        const char *inputs[2] = {o.model_path, o.text_path};
        for (int k = 0; k < 2; k++) {
            if (inputs[k] != NULL && strcmp(inputs[k], "-") != 0 &&
                stat(inputs[k], &in_st) == 0 && in_st.st_dev == out_st.st_dev &&
                in_st.st_ino == out_st.st_ino) {
                die("-o '%s' is the %s: the logits would overwrite it", o.out_path,
                    k == 0 ? "model file" : "text");
            }
        }
    }
    FILE *out = fopen(o.out_path, "wb");
    if (out == NULL) {
        die("cannot create '%s': %s", o.out_path, strerror(errno));
    }
    /* Logits of every position, in windows of the context length from an empty cache,
     * written as they come; float32 on every platform we build for is IEEE
     * little-endian. */
    if (n_tokens > (size_t)n_ctx) {
        fprintf(stderr, "moas: the text has %zu characters, more than the context's %d: its "
                "logits come from windows of %d, each from an empty cache\n", n_tokens, n_ctx,
                n_ctx);
    }
    for (size_t i = 0; i < n_tokens; i++) {
        if (i % (size_t)n_ctx == 0) {
            moas_context_reset(ctx);
        }
        check(moas_context_decode(ctx, tokens[i], NULL), "decode");
        if (fwrite(moas_context_logits(ctx), sizeof(float), (size_t)n_vocab, out) !=
            (size_t)n_vocab) {
            die("cannot write '%s'", o.out_path);
        }
    }
    if (fclose(out) != 0) {
        die("cannot write '%s'", o.out_path);
    }
    fprintf(stderr, "moas: wrote %zu x %d logits to %s\n", n_tokens, n_vocab, o.out_path);
    free(tokens);
    free(text);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}
