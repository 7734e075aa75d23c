/*
 * random_model.c - write a moas GGUF file of any shape with random weights, for
 * benchmarks. Speed does not depend on what the weights are, only on their shape and
 * type, so this is how libmoas is measured on shapes no one trained for it (GPT-2
 * small, the 6-layer 384-wide model of docs/PERFORMANCE.md).
 *
 *   random_model -o OUT.gguf [--layers 6] [--embd 384] [--heads 6] [--ff 4*embd]
 *                [--vocab 256] [--ctx 1024] [--schemes H,2,1 | --mha] [--mixing router]
 *                [--type f32|f16|q8_0] [--untied] [--no-bias] [--seed 1]
 *
 * The file follows docs/FORMAT.md exactly; it is built by the same generator the tests
 * use (tests/support/tiny_model.c), which writes whatever it is asked to, so the image
 * is loaded by libmoas before it is written: arguments that make a model the library
 * refuses (mixing single with three schemes, a scheme that does not divide the heads)
 * are a usage error with the library's reason. A vocabulary larger than printable
 * ASCII uses consecutive code points from U+0100.
 */
#include "support/tiny_model.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(void) {
    fputs("usage: random_model -o OUT.gguf [--layers N] [--embd C] [--heads H] [--ff F]\n"
          "                    [--vocab V] [--ctx T] [--schemes a,b,c | --mha]\n"
          "                    [--mixing single|mean|router] [--type f32|f16|q8_0]\n"
          "                    [--untied] [--no-bias] [--seed S]\n", stderr);
    exit(2);
}

static long number(const char *s, const char *what) {
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (errno || *end || v < 1 || v > (1L << 24)) {
        fprintf(stderr, "random_model: %s must be a positive integer, got '%s'\n", what, s);
        exit(2);
    }
    return v;
}

/* An argument that names none of the choices: a usage error. */
static int refuse(const char *what, const char *got, const char *choices) {
    fprintf(stderr, "random_model: %s must be %s, got '%s'\n", what, choices, got);
    exit(2);
}

/* UTF-8 of code point cp into buf (at least 5 bytes). */
static void utf8(unsigned cp, char *buf) {
    if (cp < 0x80) {
        buf[0] = (char)cp, buf[1] = 0;
    } else if (cp < 0x800) {
        buf[0] = (char)(0xc0 | cp >> 6), buf[1] = (char)(0x80 | (cp & 0x3f)), buf[2] = 0;
    } else if (cp < 0x10000) {
        buf[0] = (char)(0xe0 | cp >> 12), buf[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        buf[2] = (char)(0x80 | (cp & 0x3f)), buf[3] = 0;
    } else {
        buf[0] = (char)(0xf0 | cp >> 18), buf[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        buf[2] = (char)(0x80 | ((cp >> 6) & 0x3f)), buf[3] = (char)(0x80 | (cp & 0x3f));
        buf[4] = 0;
    }
}

int main(int argc, char **argv) {
    tiny_model_config cfg;
    const char *out = NULL, *schemes = NULL;
    int mha = 0, mixing_given = 0;
    unsigned long long seed = 1;

    tiny_model_config_default(&cfg);
    cfg.n_layer = 6, cfg.n_embd = 384, cfg.n_head = 6, cfg.n_ff = 0;
    cfg.n_ctx_train = 1024;
    cfg.n_vocab = 256;
    cfg.mixing = MOAS_MIXING_ROUTER;
    cfg.name = "random";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-o") && v) out = v, i++;
        else if (!strcmp(a, "--layers") && v) cfg.n_layer = (int32_t)number(v, a), i++;
        else if (!strcmp(a, "--embd") && v) cfg.n_embd = (int32_t)number(v, a), i++;
        else if (!strcmp(a, "--heads") && v) cfg.n_head = (int32_t)number(v, a), i++;
        else if (!strcmp(a, "--ff") && v) cfg.n_ff = (int32_t)number(v, a), i++;
        else if (!strcmp(a, "--vocab") && v) cfg.n_vocab = (int32_t)number(v, a), i++;
        else if (!strcmp(a, "--ctx") && v) cfg.n_ctx_train = (int32_t)number(v, a), i++;
        else if (!strcmp(a, "--seed") && v) seed = (unsigned long long)number(v, a), i++;
        else if (!strcmp(a, "--schemes") && v) schemes = v, i++;
        else if (!strcmp(a, "--mha")) mha = 1;
        else if (!strcmp(a, "--untied")) cfg.tied = false;
        else if (!strcmp(a, "--no-bias")) cfg.bias = false;
        else if (!strcmp(a, "--mixing") && v) {
            cfg.mixing = !strcmp(v, "single") ? MOAS_MIXING_SINGLE
                         : !strcmp(v, "mean") ? MOAS_MIXING_MEAN
                         : !strcmp(v, "router") ? MOAS_MIXING_ROUTER
                                                : refuse("--mixing", v, "single, mean or router");
            mixing_given = 1;
            i++;
        } else if (!strcmp(a, "--type") && v) {
            cfg.mat_type = !strcmp(v, "f16") ? MOAS_TYPE_F16
                           : !strcmp(v, "q8_0") ? MOAS_TYPE_Q8_0
                           : !strcmp(v, "f32") ? MOAS_TYPE_F32
                                               : refuse("--type", v, "f32, f16 or q8_0");
            cfg.emb_type = cfg.mat_type == MOAS_TYPE_F32 ? MOAS_TYPE_F32 : MOAS_TYPE_F16;
            i++;
        } else {
            usage();
        }
    }
    if (out == NULL || cfg.n_embd % cfg.n_head != 0) {
        usage();
    }
    if (mha && (schemes != NULL || mixing_given)) {   /* it would override them */
        fprintf(stderr, "random_model: --mha is one scheme of every head, mixed 'single'; "
                        "it takes no --schemes or --mixing\n");
        exit(2);
    }
    if (cfg.n_ff == 0) {
        cfg.n_ff = 4 * cfg.n_embd;
    }
    cfg.router_hidden = cfg.n_embd / 4;
    if (mha) {   /* a plain MHA model: one scheme, no router */
        cfg.n_scheme = 1;
        cfg.scheme_n_kv[0] = cfg.n_head;
        cfg.mixing = MOAS_MIXING_SINGLE;
    } else {
        const char *p = schemes ? schemes : "";
        cfg.n_scheme = 0;
        if (schemes == NULL) {   /* the published layout */
            cfg.n_scheme = 3;
            cfg.scheme_n_kv[0] = cfg.n_head, cfg.scheme_n_kv[1] = 2, cfg.scheme_n_kv[2] = 1;
        }
        char item[32];
        while (*p) {   /* comma-separated KV head counts, each one a positive integer */
            const size_t len = strcspn(p, ",");
            if (cfg.n_scheme == TINY_MODEL_MAX_SCHEMES || len >= sizeof item) {
                fprintf(stderr, "random_model: --schemes takes at most %d counts, got '%s'\n",
                        TINY_MODEL_MAX_SCHEMES, schemes);
                exit(2);
            }
            memcpy(item, p, len);
            item[len] = 0;
            cfg.scheme_n_kv[cfg.n_scheme++] = (int32_t)number(item, "--schemes");
            p += len + (p[len] == ',');
        }
        if (schemes != NULL && (cfg.n_scheme == 0 || schemes[strlen(schemes) - 1] == ',')) {
            number("", "--schemes");   /* nothing, or nothing after the last comma */
        }
    }

    /* Q8_0 rows are blocks of 32: every matrix input (the width, the MLP's for its down
     * matrix, the router's for its second) must be a multiple of it */
    if (cfg.mat_type == MOAS_TYPE_Q8_0 &&
        (cfg.n_embd % 32 != 0 || cfg.n_ff % 32 != 0 ||
         (cfg.mixing == MOAS_MIXING_ROUTER && cfg.router_hidden % 32 != 0))) {
        fprintf(stderr, "random_model: --type q8_0 needs rows of a multiple of 32: --embd %d, "
                        "--ff %d", cfg.n_embd, cfg.n_ff);
        if (cfg.mixing == MOAS_MIXING_ROUTER) {
            fprintf(stderr, ", the router's embd/4 %d", cfg.router_hidden);
        }
        fputs("\n", stderr);
        exit(2);
    }

    /* vocabulary: printable ASCII first, then code points from U+0100, of which Unicode
     * has 0x110000 - 0x100 - 0x800 (the surrogates) */
    const int32_t most_vocab = 95 + (0x110000 - 0x100 - 0x800);
    if (cfg.n_vocab > most_vocab) {
        fprintf(stderr, "random_model: --vocab is at most %d (one token per Unicode character "
                        "this tool uses), got %d\n", most_vocab, cfg.n_vocab);
        exit(2);
    }
    char **vocab = malloc((size_t)cfg.n_vocab * sizeof *vocab);
    char *text = malloc((size_t)cfg.n_vocab * 5);
    if (vocab == NULL || text == NULL) {
        fprintf(stderr, "random_model: out of memory\n");
        return 1;
    }
    for (int32_t i = 0; i < cfg.n_vocab; i++) {
        const unsigned cp = i < 95 ? 0x20u + (unsigned)i : 0x100u + (unsigned)(i - 95);
        vocab[i] = text + (size_t)i * 5;
        utf8(cp >= 0xd800 ? cp + 0x800 : cp, vocab[i]);   /* skip the surrogates */
    }
    cfg.vocab = (const char *const *)vocab;

    size_t size;
    uint8_t *image = tiny_model_image(&cfg, seed, &size);
    if (image == NULL) {
        fprintf(stderr, "random_model: cannot build this shape (check the arguments)\n");
        return 1;
    }
    moas_model *model;
    if (moas_model_load_memory(image, size, NULL, &model) != MOAS_OK) {
        fprintf(stderr, "random_model: libmoas would refuse this model: %s\n",
                moas_last_error());
        exit(2);
    }
    moas_model_free(model);
    FILE *f = fopen(out, "wb");
    if (f == NULL || fwrite(image, 1, size, f) != size || fclose(f) != 0) {
        fprintf(stderr, "random_model: cannot write '%s'\n", out);
        return 1;
    }
    fprintf(stderr, "random_model: wrote %s (%zu bytes)\n", out, size);
    free(image);
    free(vocab);
    free(text);
    return 0;
}
