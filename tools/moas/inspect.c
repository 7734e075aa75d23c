/*
 * inspect.c - `moas inspect`: what a model file holds.
 */
#include "cli.h"

#include <stdint.h>
#include <string.h>

static void usage(FILE *f) {
    fputs("usage: moas inspect -m MODEL\n"
          "\n"
          "Prints the model's shape, its parameters, the KV bytes per token of each scheme\n"
          "(routed mode) and of mixture mode, as a context's cache counts them, then every\n"
          "metadata key and every tensor.\n"
          "\n"
          "  -m, --model PATH        GGUF model file\n",
          f);
    print_context_options(f, &moas_cmd_inspect);
}

static const opt_id accepted[] = {OPT_MODEL, OPT_END};

static int run(int argc, char **argv);

const command moas_cmd_inspect = {
    "inspect", "metadata, tensors, parameters, KV bytes per token", usage, accepted, run,
};

/* Write `len` bytes of `s`, text from the model file, so that it cannot drive the
 * terminal (an ESC sequence, a CR back over the line): a control character (C0, DEL,
 * C1) as \n or \u00XX, a quote and a backslash escaped; at most `max` bytes of `s`,
 * cut at a character's end. Returns the bytes written. */
static size_t put_escaped(const char *s, size_t len, size_t max) {
    const unsigned char *u = (const unsigned char *)s;
    size_t written = 0;
    if (len > max) {
        len = max;
        while (len > 0 && (u[len] & 0xc0) == 0x80) {   /* not inside a character */
            len--;
        }
    }
    for (size_t i = 0; i < len; i++) {
        if (u[i] == '"' || u[i] == '\\') {
            written += (size_t)printf("\\%c", u[i]);
        } else if (u[i] == '\n') {
            written += (size_t)printf("\\n");
        } else if (u[i] < 0x20 || u[i] == 0x7f) {
            written += (size_t)printf("\\u%04x", u[i]);
        } else if (u[i] == 0xc2 && i + 1 < len && u[i + 1] >= 0x80 && u[i + 1] <= 0x9f) {
            written += (size_t)printf("\\u%04x", u[++i]);   /* C1, in two bytes */
        } else {
            putchar(u[i]);
            written++;
        }
    }
    return written;
}

/* A name from the model file, escaped, then spaces to `width`. */
static void put_name(const char *name, int width) {
    const size_t n = put_escaped(name, strlen(name), SIZE_MAX);
    printf("%*s", n < (size_t)width ? width - (int)n : 0, "");
}

static void print_meta_value(const moas_model *model, const char *key) {
    moas_meta_type type, elem;
    uint64_t n;
    int64_t iv;
    double fv;
    int32_t bv;
    const char *sv;
    size_t slen;

    check(moas_model_meta_type(model, key, &type), "metadata");
    if (type == MOAS_META_STRING) {
        check(moas_model_meta_string(model, key, &sv, &slen), "metadata");
        putchar('"');
        put_escaped(sv, slen, 80);
        putchar('"');
    } else if (type == MOAS_META_BOOL) {
        check(moas_model_meta_bool(model, key, &bv), "metadata");
        printf("%s", bv ? "true" : "false");
    } else if (type == MOAS_META_FLOAT32 || type == MOAS_META_FLOAT64) {
        check(moas_model_meta_float(model, key, &fv), "metadata");
        printf("%g", fv);
    } else if (type == MOAS_META_ARRAY) {
        check(moas_model_meta_array(model, key, &elem, &n), "metadata");
        printf("[");
        for (uint64_t i = 0; i < n && i < 8; i++) {
            if (elem == MOAS_META_STRING) {
                check(moas_model_meta_array_string(model, key, i, &sv, &slen), "metadata");
                printf("%s\"", i ? ", " : "");
                put_escaped(sv, slen, SIZE_MAX);
                putchar('"');
            } else if (elem == MOAS_META_FLOAT32 || elem == MOAS_META_FLOAT64) {
                check(moas_model_meta_array_float(model, key, i, &fv), "metadata");
                printf("%s%g", i ? ", " : "", fv);
            } else if (moas_model_meta_array_int(model, key, i, &iv) == MOAS_OK) {
                printf("%s%lld", i ? ", " : "", (long long)iv);
            } else {
                printf("%s?", i ? ", " : "");
            }
        }
        printf("%s] (%llu)", n > 8 ? ", ..." : "", (unsigned long long)n);
    } else if (moas_model_meta_int(model, key, &iv) == MOAS_OK) {
        printf("%lld", (long long)iv);
    } else {
        printf("(unsigned 64-bit beyond INT64_MAX)");
    }
}

/* A string key's value, or `fallback` when the file has none (docs/FORMAT.md's default). */
static const char *meta_or(const moas_model *model, const char *key, const char *fallback) {
    const char *value;
    return moas_model_meta_string(model, key, &value, NULL) == MOAS_OK ? value : fallback;
}

static int run(int argc, char **argv) {
    static const char *mixing_names[] = {"single", "mean", "router"};
    options o;
    options_init(&o);
    parse_options(&moas_cmd_inspect, argc, argv, &o);
    moas_model *model = load_model(&o);
    const int32_t n_scheme = moas_model_n_scheme(model);
    const int32_t head_dim = moas_model_head_dim(model);
    const int32_t n_layer = moas_model_n_layer(model);
    const int32_t n_head = moas_model_n_head(model);

    printf("model           %s (%s)\n", o.model_path, moas_model_arch(model));
    printf("layers          %d\n", n_layer);
    printf("width           %d (%d head%s of %d)\n", moas_model_n_embd(model), n_head,
           n_head == 1 ? "" : "s", head_dim);
    printf("mlp width       %d\n", moas_model_n_ff(model));
    printf("vocabulary      %d characters\n", moas_model_n_vocab(model));
    printf("context         %d tokens\n", moas_model_n_ctx_train(model));
    printf("mixing          %s, %s biases\n", mixing_names[moas_model_mixing(model)],
           moas_model_has_bias(model) ? "with" : "no");
    printf("block           %s, %s, %s\n", meta_or(model, "moas.position_encoding", "learned"),
           meta_or(model, "moas.norm_type", "layer"),
           meta_or(model, "moas.feed_forward_type", "gelu"));
    printf("parameters      %llu\n", (unsigned long long)moas_model_n_params(model));
    /* The figures the cache itself uses: a one-token context of each KV type. */
    moas_context *ctx32, *ctx16;
    options o1 = o;
    o1.n_ctx = 1;
    o1.n_threads = 1;
    o1.kv_type = MOAS_TYPE_F32;
    ctx32 = new_context(model, &o1);
    o1.kv_type = MOAS_TYPE_F16;
    ctx16 = new_context(model, &o1);
    printf("\nscheme  kv heads  routed-mode KV bytes/token (all layers, f32 / f16)\n");
    for (int32_t s = 0; s < n_scheme; s++) {
        printf("%6d  %8d  %llu / %llu\n", s, moas_model_scheme_n_kv(model, s),
               (unsigned long long)moas_context_kv_token_bytes(ctx32, s),
               (unsigned long long)moas_context_kv_token_bytes(ctx16, s));
    }
    printf("(routed mode: the K/V of the token's scheme plus its bookkeeping, per layer)\n");
    printf("mixture mode stores %s: %llu / %llu bytes per token\n",
           moas_model_kv_sharing(model) == MOAS_KV_SHARING_POOLED
               ? "one gate-mixed K/V of all heads" : "every scheme",
           (unsigned long long)moas_context_kv_token_bytes(ctx32, -1),
           (unsigned long long)moas_context_kv_token_bytes(ctx16, -1));
    moas_context_free(ctx32);
    moas_context_free(ctx16);

    printf("\nmetadata (%lld keys)\n", (long long)moas_model_meta_count(model));
    for (int64_t i = 0; i < moas_model_meta_count(model); i++) {
        const char *key = moas_model_meta_key(model, i);
        printf("  ");
        put_name(key, 40);
        putchar(' ');
        print_meta_value(model, key);
        putchar('\n');
    }
    printf("\ntensors (%lld)\n", (long long)moas_model_n_tensors(model));
    for (int64_t i = 0; i < moas_model_n_tensors(model); i++) {
        moas_tensor_info info;
        info.size = sizeof info;
        check(moas_model_tensor(model, i, &info), "tensor");
        printf("  ");
        put_name(info.name, 32);
        printf(" %-5s [", type_name(info.type));
        for (int32_t d = 0; d < info.n_dims; d++) {
            printf("%s%lld", d ? ", " : "", (long long)info.ne[d]);
        }
        printf("]  %llu bytes\n", (unsigned long long)info.n_bytes);
    }
    moas_model_free(model);
    return 0;
}
