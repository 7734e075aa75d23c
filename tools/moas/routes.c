/*
 * routes.c - `moas routes`: the scheme every token of a text used in every layer.
 */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fputs("usage: moas routes -m MODEL -f TEXT [options]\n"
          "\n"
          "Decodes TEXT and shows the scheme each character used in each layer (routed mode:\n"
          "the scheme that ran; mixture mode: the largest gate): a map of the text with a\n"
          "line per layer, then each layer's shares. A text longer than the context is\n"
          "routed in windows of the context length, each from an empty cache.\n"
          "\n"
          "  -m, --model PATH        GGUF model file\n"
          "  -f, --file TEXT         the text; - reads stdin\n"
          "      --json              one JSON object per character and layer: pos, window,\n"
          "                          window_pos, layer, char, gates (null where not\n"
          "                          finite), scheme, kv_heads\n"
          "      --color, --no-color colour the map by scheme (default: when stdout is a\n"
          "                          terminal); without colour, each cell is the scheme's number\n",
          f);
    print_context_options(f, &moas_cmd_routes);
}

static const opt_id accepted[] = {
    OPT_MODEL, OPT_FILE, OPT_JSON, OPT_COLOR, OPT_THREADS, OPT_CTX, OPT_MODE, OPT_KV_TYPE,
    OPT_UNKNOWN, OPT_FORCE_SCHEME, OPT_NO_MMAP, OPT_END,
};

static int run(int argc, char **argv);

const command moas_cmd_routes = {
    "routes", "the scheme every character used in every layer, as a map or JSON", usage,
    accepted, run,
};

/* ANSI background colours by scheme: red for the most KV heads, green for the fewest. */
static const char *scheme_color(int32_t s) {
    static const char *colors[] = {"41", "43", "42", "44", "45", "46", "47", "100"};
    return colors[s % 8];
}

/* Print token `t` as one visible cell: a newline as a pilcrow, another control
 * character as its picture (a tab or CR written raw moved the cursor, and the layers'
 * rows no longer lined up under the text). A token is one character, so an empty text
 * is NUL's. */
static void put_cell(FILE *f, const moas_model *model, int32_t t) {
    const char *text = moas_token_text(model, t);
    const unsigned char c0 = (unsigned char)text[0];
    const unsigned char c1 = c0 != 0 ? (unsigned char)text[1] : 0;
    if (strcmp(text, "\n") == 0) {
        fputs("\xc2\xb6", f);
    } else if (c0 < 0x20 || c0 == 0x7f) {
        /* C0 and DEL: Unicode's control pictures, U+2400 + c and U+2421 */
        const unsigned picture = c0 == 0x7f ? 0x2421u : 0x2400u + c0;
        fputc((int)(0xe0 | (picture >> 12)), f);
        fputc((int)(0x80 | ((picture >> 6) & 0x3f)), f);
        fputc((int)(0x80 | (picture & 0x3f)), f);
    } else if (c0 == 0xc2 && c1 >= 0x80 && c1 <= 0x9f) {
        fputs("\xef\xbf\xbd", f);   /* C1 has no pictures: U+FFFD */
    } else {
        fputs(text, f);
    }
}

void print_route_map(FILE *f, const moas_context *ctx, const int32_t *tokens, int32_t n,
                     int color) {
    const moas_model *model = moas_context_model(ctx);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    int32_t *schemes = malloc((size_t)(n > 0 ? n : 1) * L * sizeof *schemes);
    char label[24];

    if (schemes == NULL) {
        die("out of memory");
    }
    check(moas_context_routes(ctx, 0, n, NULL, schemes, NULL), "routes");
    fprintf(f, "schemes:");
    for (int32_t s = 0; s < S; s++) {
        if (color) {
            fprintf(f, "  \033[30;%sm %s \033[0m", scheme_color(s),
                    scheme_label(model, s, label, sizeof label));
        } else {
            fprintf(f, "  %d = %s", s, scheme_label(model, s, label, sizeof label));
        }
    }
    fprintf(f, "   (%s)\n\n", moas_context_mode(ctx) == MOAS_MODE_ROUTED
                                ? "routed mode: the scheme that ran"
                                : "mixture mode: the largest gate");
    for (int32_t start = 0; start < n; start += 64) {
        const int32_t end = start + 64 < n ? start + 64 : n;
        fprintf(f, "text     ");
        for (int32_t j = start; j < end; j++) {
            put_cell(f, model, tokens[j]);
        }
        fputc('\n', f);
        for (int32_t l = 0; l < L; l++) {
            fprintf(f, "layer %-3d", l);
            for (int32_t j = start; j < end; j++) {
                const int32_t s = schemes[(size_t)j * L + l];
                if (color) {
                    fprintf(f, "\033[30;%sm", scheme_color(s));
                    put_cell(f, model, tokens[j]);
                    fputs("\033[0m", f);
                } else {
                    fputc('0' + (s % 10), f);
                }
            }
            fputc('\n', f);
        }
        fputc('\n', f);
    }
    for (int32_t l = 0; l < L; l++) {
        fprintf(f, "layer %-3d", l);
        for (int32_t s = 0; s < S; s++) {
            int32_t count = 0;
            for (int32_t j = 0; j < n; j++) {
                count += schemes[(size_t)j * L + l] == s;
            }
            fprintf(f, "  %s %5.1f%%", scheme_label(model, s, label, sizeof label),
                    n > 0 ? 100.0 * count / n : 0.0);
        }
        fputc('\n', f);
    }
    free(schemes);
}

/* Decode the text window by window; print one JSON object per token and layer, or the
 * map of each window. */
static int run(int argc, char **argv) {
    options o;
    options_init(&o);
    parse_options(&moas_cmd_routes, argc, argv, &o);
    if (o.text_path == NULL) {
        usage_error(&moas_cmd_routes, "routes needs -f TEXT");
    }
    moas_model *model = load_model(&o);
    moas_context *ctx = new_context(model, &o);
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    size_t len, n_tokens;
    char name[512];

    char *text = read_text(o.text_path, &len);
    int32_t *tokens = tokenize_all(model, &o.unknown, text, len, &n_tokens, NULL);
    if (n_tokens == 0) {
        die("%s has no characters to route", text_name(o.text_path, name, sizeof name));
    }
    float *gates = malloc((size_t)n_ctx * L * S * sizeof *gates);
    int32_t *schemes = malloc((size_t)n_ctx * L * sizeof *schemes);
    int32_t *heads = malloc((size_t)n_ctx * L * sizeof *heads);
    if (gates == NULL || schemes == NULL || heads == NULL) {
        die("out of memory");
    }
    /* The model knows positions below n_ctx only: a longer text is routed in windows
     * of n_ctx characters, each from an empty cache, and every window says so. */
    const size_t n_windows = (n_tokens + (size_t)n_ctx - 1) / (size_t)n_ctx;
    if (n_windows > 1) {
        fprintf(stderr, "moas: the text has %zu characters, more than the context's %d: it is "
                "routed in %zu windows of up to %d, each from an empty cache (positions "
                "restart at 0)\n", n_tokens, n_ctx, n_windows, n_ctx);
    }
    for (size_t begin = 0; begin < n_tokens; begin += (size_t)n_ctx) {
        const int32_t n = (int32_t)(n_tokens - begin < (size_t)n_ctx ? n_tokens - begin : (size_t)n_ctx);
        const size_t window = begin / (size_t)n_ctx;
        moas_context_reset(ctx);
        check(moas_context_decode_batch(ctx, tokens + begin, n, NULL, MOAS_LOGITS_NONE), "decode");
        if (!o.json) {
            if (n_windows > 1) {
                printf("window %zu of %zu: characters %zu-%zu of the text, from an empty "
                       "cache\n", window + 1, n_windows, begin, begin + (size_t)n - 1);
            }
            print_route_map(stdout, ctx, tokens + begin, n, o.color);
            continue;
        }
        check(moas_context_routes(ctx, 0, n, gates, schemes, heads), "routes");
        for (int32_t j = 0; j < n; j++) {
            for (int32_t l = 0; l < L; l++) {
                const size_t rec = (size_t)j * L + l;
                printf("{\"pos\": %zu, \"window\": %zu, \"window_pos\": %d, \"layer\": %d, "
                       "\"char\": ", begin + (size_t)j, window, j, l);
                const char *ch = moas_token_text(model, tokens[begin + (size_t)j]);
                if (ch[0] == '\0') {   /* the NUL character: its C string is empty */
                    fputs("\"\\u0000\"", stdout);
                } else {
                    put_json_string(stdout, ch);
                }
                printf(", \"gates\": [");
                for (int32_t s = 0; s < S; s++) {
                    /* a damaged model's NaN is null: "nan" is no JSON number */
                    const float g = gates[rec * S + (size_t)s];
                    if (isfinite(g)) {
                        printf("%s%.6g", s ? ", " : "", (double)g);
                    } else {
                        printf("%snull", s ? ", " : "");
                    }
                }
                printf("], \"scheme\": %d, \"kv_heads\": %d}\n", schemes[rec], heads[rec]);
            }
        }
    }
    free(gates);
    free(schemes);
    free(heads);
    free(tokens);
    free(text);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}
