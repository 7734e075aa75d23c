/*
 * moas.c - the `moas` command-line program: generate, perplexity, logits, inspect.
 *
 * A thin client of the public API (it includes nothing but moas.h and libc), so it
 * doubles as a worked example. Every failure prints the library's message and exits
 * with status 1; usage errors exit with status 2.
 */
#include "moas.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- small helpers ------------------------------------------------------------ */

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2), noreturn))
#endif
static void die(const char *fmt, ...);

static void die(const char *fmt, ...) {
    va_list ap;
    fputs("moas: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* Exit with the library's message when `st` is a failure. */
static void check(moas_status st, const char *what) {
    if (st != MOAS_OK) {
        die("%s: %s (%s)", what, moas_last_error(), moas_status_string(st));
    }
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The whole file at `path`, NUL-terminated; its length in *len. */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, n = 0;

    if (f == NULL) {
        die("cannot open '%s': %s", path, strerror(errno));
    }
    for (;;) {
        if (n + 1 >= cap) {
            cap = cap ? cap * 2 : 1 << 16;
            buf = realloc(buf, cap);
            if (buf == NULL) {
                die("out of memory reading '%s'", path);
            }
        }
        const size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) {
            break;
        }
    }
    if (ferror(f)) {
        die("cannot read '%s'", path);
    }
    fclose(f);
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Text -> freshly allocated token ids. */
static int32_t *tokenize_all(const moas_model *model, const char *text, size_t len,
                             size_t *n_tokens) {
    int32_t *tokens;
    moas_status st = moas_tokenize(model, text, len, NULL, 0, n_tokens);
    if (st != MOAS_OK && st != MOAS_ERR_BUFFER_TOO_SMALL) {
        check(st, "tokenize");
    }
    tokens = malloc((*n_tokens ? *n_tokens : 1) * sizeof *tokens);
    if (tokens == NULL) {
        die("out of memory for %zu tokens", *n_tokens);
    }
    check(moas_tokenize(model, text, len, tokens, *n_tokens, n_tokens), "tokenize");
    return tokens;
}

/* ---- options ------------------------------------------------------------------ */

typedef struct {
    const char *model_path;
    const char *prompt;
    const char *text_path;
    const char *out_path;
    int n_predict;
    float temperature;
    int top_k;
    float top_p;
    unsigned long long seed;
    int n_threads;
    int n_ctx;
    moas_mode mode;
    moas_type kv_type;
    int json;
    int show_routes;
    int n_prompt;    /* bench: prompt tokens */
    int depth;       /* bench: tokens in the cache before decoding starts */
    int stride;      /* perplexity: new tokens scored per window (0: consecutive windows) */
    int forced;      /* routed mode: the context-wide forced scheme, -1: the router's */
    int repeats;     /* bench: repetitions, the median is reported */
    int color;       /* 1: ANSI colours; default: when stdout is a terminal */
} options;

static void usage(void) {
    fputs("usage: moas COMMAND -m MODEL [options]\n"
          "\n"
          "commands:\n"
          "  generate    -p PROMPT [-n N] [--temp T] [--top-k K] [--top-p P] [--seed S]\n"
          "              [--show-routes]\n"
          "  perplexity  -f TEXT [--json] [--stride S]  (S: sliding windows that score\n"
          "              their last S tokens, the rest is context)\n"
          "  routes      -f TEXT [--json] [--no-color]   (the scheme of every token and layer)\n"
          "  logits      -f TEXT -o OUT   (raw little-endian float32 [n_tokens][n_vocab])\n"
          "  inspect     (metadata, tensors, parameters, KV bytes per token)\n"
          "  bench       [-p 512] [-n 128] [-d 0] [-r 5] [--json]  (prefill tokens/s from an\n"
          "              empty cache; decode tokens/s after -d cached tokens)\n"
          "\n"
          "common options:\n"
          "  -m, --model PATH     GGUF model file\n"
          "  -t, --threads N      threads per call (default: all)\n"
          "  -c, --ctx N          context length (default: the trained length)\n"
          "      --mode M         mixture (default) or routed\n"
          "      --kv-type T      f32 (default) or f16\n"
          "      --force-scheme S routed mode: every token runs scheme S (e.g. 0, MHA)\n",
          stderr);
    exit(2);
}

static const char *need_value(int argc, char **argv, int *i) {
    if (*i + 1 >= argc) {
        fprintf(stderr, "moas: option %s needs a value\n", argv[*i]);
        usage();
    }
    return argv[++*i];
}

static long parse_long(const char *s, const char *what, long min, long max) {
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || end == s || v < min || v > max) {
        die("%s must be an integer in [%ld, %ld], got '%s'", what, min, max, s);
    }
    return v;
}

static float parse_float(const char *s, const char *what) {
    char *end;
    errno = 0;
    const float v = strtof(s, &end);
    if (errno != 0 || *end != '\0' || end == s) {
        die("%s must be a number, got '%s'", what, s);
    }
    return v;
}

static void parse_options(int argc, char **argv, options *o) {
    memset(o, 0, sizeof *o);
    o->n_predict = 256;
    o->temperature = 0.8f;
    o->top_p = 1.0f;
    o->mode = MOAS_MODE_MIXTURE;
    o->kv_type = MOAS_TYPE_F32;
    o->color = isatty(STDOUT_FILENO);
    o->n_prompt = 512;
    o->repeats = 5;
    o->forced = -1;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            o->model_path = need_value(argc, argv, &i);
        } else if ((!strcmp(a, "-p") && strcmp(argv[1], "bench") != 0) || !strcmp(a, "--prompt")) {
            o->prompt = need_value(argc, argv, &i);
        } else if (!strcmp(a, "-f") || !strcmp(a, "--file")) {
            o->text_path = need_value(argc, argv, &i);
        } else if (!strcmp(a, "-o") || !strcmp(a, "--output")) {
            o->out_path = need_value(argc, argv, &i);
        } else if (!strcmp(a, "-n") || !strcmp(a, "--n-predict")) {
            o->n_predict = (int)parse_long(need_value(argc, argv, &i), "-n", 0, 1L << 30);
        } else if (!strcmp(a, "--temp")) {
            o->temperature = parse_float(need_value(argc, argv, &i), "--temp");
        } else if (!strcmp(a, "--top-k")) {
            o->top_k = (int)parse_long(need_value(argc, argv, &i), "--top-k", 0, 1L << 30);
        } else if (!strcmp(a, "--top-p")) {
            o->top_p = parse_float(need_value(argc, argv, &i), "--top-p");
        } else if (!strcmp(a, "--seed")) {
            o->seed = (unsigned long long)parse_long(need_value(argc, argv, &i), "--seed", 0,
                                                     0x7fffffffL);
        } else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) {
            o->n_threads = (int)parse_long(need_value(argc, argv, &i), "--threads", 1, 1024);
        } else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) {
            o->n_ctx = (int)parse_long(need_value(argc, argv, &i), "--ctx", 1, 1L << 30);
        } else if (!strcmp(a, "--mode")) {
            const char *m = need_value(argc, argv, &i);
            if (!strcmp(m, "mixture")) {
                o->mode = MOAS_MODE_MIXTURE;
            } else if (!strcmp(m, "routed")) {
                o->mode = MOAS_MODE_ROUTED;
            } else {
                die("--mode must be mixture or routed, got '%s'", m);
            }
        } else if (!strcmp(a, "--kv-type")) {
            const char *t = need_value(argc, argv, &i);
            if (!strcmp(t, "f32")) {
                o->kv_type = MOAS_TYPE_F32;
            } else if (!strcmp(t, "f16")) {
                o->kv_type = MOAS_TYPE_F16;
            } else {
                die("--kv-type must be f32 or f16, got '%s'", t);
            }
        } else if (!strcmp(a, "--json")) {
            o->json = 1;
        } else if (!strcmp(a, "--prompt-tokens") || (!strcmp(a, "-p") && !strcmp(argv[1], "bench"))) {
            o->n_prompt = (int)parse_long(need_value(argc, argv, &i), "-p", 1, 1L << 20);
        } else if (!strcmp(a, "-d") || !strcmp(a, "--depth")) {
            o->depth = (int)parse_long(need_value(argc, argv, &i), "-d", 0, 1L << 20);
        } else if (!strcmp(a, "-r") || !strcmp(a, "--repeats")) {
            o->repeats = (int)parse_long(need_value(argc, argv, &i), "-r", 1, 1000);
        } else if (!strcmp(a, "--force-scheme")) {
            o->forced = (int)parse_long(need_value(argc, argv, &i), "--force-scheme", 0, 7);
        } else if (!strcmp(a, "--stride")) {
            o->stride = (int)parse_long(need_value(argc, argv, &i), "--stride", 1, 1L << 30);
        } else if (!strcmp(a, "--show-routes")) {
            o->show_routes = 1;
        } else if (!strcmp(a, "--no-color")) {
            o->color = 0;
        } else if (!strcmp(a, "--color")) {
            o->color = 1;
        } else {
            fprintf(stderr, "moas: unknown option '%s'\n", a);
            usage();
        }
    }
    if (o->model_path == NULL) {
        fprintf(stderr, "moas: -m MODEL is required\n");
        usage();
    }
}

static moas_model *load_model(const options *o) {
    moas_model *model;
    check(moas_model_load(o->model_path, NULL, &model), "cannot load the model");
    return model;
}

static moas_context *new_context(const moas_model *model, const options *o) {
    moas_context_params p;
    moas_context *ctx;
    moas_context_params_init(&p);
    p.n_ctx = o->n_ctx;
    p.n_threads = o->n_threads;
    p.mode = o->mode;
    p.kv_type = o->kv_type;
    p.forced_scheme = o->forced;
    check(moas_context_create(model, &p, &ctx), "cannot create a context");
    return ctx;
}

static const char *mode_name(moas_mode mode) {
    return mode == MOAS_MODE_ROUTED ? "routed" : "mixture";
}

/* ---- routes ------------------------------------------------------------------- */

/* A short name for a scheme from its KV heads: MHA stores all, MQA one, GQA between. */
static const char *scheme_label(const moas_model *model, int32_t s, char *buf, size_t cap) {
    const int32_t n_kv = moas_model_scheme_n_kv(model, s), n_head = moas_model_n_head(model);
    if (n_kv == n_head) {
        snprintf(buf, cap, "MHA");
    } else if (n_kv == 1) {
        snprintf(buf, cap, "MQA");
    } else {
        snprintf(buf, cap, "GQA-%d", n_kv);
    }
    return buf;
}

/* ANSI background colours by scheme: red for the most KV heads, green for the fewest. */
static const char *scheme_color(int32_t s) {
    static const char *colors[] = {"41", "43", "42", "44", "45", "46", "47", "100"};
    return colors[s % 8];
}

/* Print token `t` as one visible cell: a newline as a pilcrow. */
static void put_cell(FILE *f, const moas_model *model, int32_t t) {
    const char *text = moas_token_text(model, t);
    fputs(strcmp(text, "\n") == 0 ? "\xc2\xb6" : text, f);
}

/* Draw the routing of the n tokens stored in ctx: the text in rows of 64 characters,
 * under each row one line per layer whose cells are coloured by the scheme that token
 * used there (or show its number, without colour); then each layer's shares. */
static void print_route_map(FILE *f, const moas_context *ctx, const int32_t *tokens, int32_t n,
                            int color) {
    const moas_model *model = moas_context_model(ctx);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    int32_t *schemes = malloc((size_t)(n > 0 ? n : 1) * L * sizeof *schemes);
    char label[16];

    if (schemes == NULL) {
        die("out of memory");
    }
    check(moas_context_routes(ctx, 0, n, NULL, schemes, NULL), "routes");
    fprintf(f, "schemes:");
    for (int32_t s = 0; s < S; s++) {
        if (color) {
            fprintf(f, "  \033[30;%sm %s \033[0m", scheme_color(s), scheme_label(model, s, label, sizeof label));
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

/* `text` as a JSON string. */
static void put_json_string(FILE *f, const char *text) {
    const unsigned char *c = (const unsigned char *)text;
    fputc('"', f);
    for (; *c; c++) {
        if (*c == '"' || *c == '\\') {
            fprintf(f, "\\%c", *c);
        } else if (*c == '\n') {
            fputs("\\n", f);
        } else if (*c < 0x20) {
            fprintf(f, "\\u%04x", *c);
        } else {
            fputc(*c, f);
        }
    }
    fputc('"', f);
}

/* A JSON string holding the text of token t. */
static void put_json_char(FILE *f, const moas_model *model, int32_t t) {
    put_json_string(f, moas_token_text(model, t));
}

/* Decode TEXT window by window; print one JSON object per token and layer, or the map
 * of each window. */
static int cmd_routes(const options *o) {
    moas_model *model = load_model(o);
    moas_context *ctx = new_context(model, o);
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    size_t len, n_tokens;

    if (o->text_path == NULL) {
        die("routes needs -f TEXT");
    }
    char *text = read_file(o->text_path, &len);
    int32_t *tokens = tokenize_all(model, text, len, &n_tokens);
    float *gates = malloc((size_t)n_ctx * L * S * sizeof *gates);
    int32_t *schemes = malloc((size_t)n_ctx * L * sizeof *schemes);
    int32_t *heads = malloc((size_t)n_ctx * L * sizeof *heads);
    if (gates == NULL || schemes == NULL || heads == NULL) {
        die("out of memory");
    }
    for (size_t begin = 0; begin < n_tokens; begin += (size_t)n_ctx) {
        const int32_t n = (int32_t)(n_tokens - begin < (size_t)n_ctx ? n_tokens - begin : (size_t)n_ctx);
        moas_context_reset(ctx);
        check(moas_context_decode_batch(ctx, tokens + begin, n, NULL, MOAS_LOGITS_NONE), "decode");
        if (!o->json) {
            print_route_map(stdout, ctx, tokens + begin, n, o->color);
            continue;
        }
        check(moas_context_routes(ctx, 0, n, gates, schemes, heads), "routes");
        for (int32_t j = 0; j < n; j++) {
            for (int32_t l = 0; l < L; l++) {
                const size_t rec = (size_t)j * L + l;
                printf("{\"pos\": %zu, \"layer\": %d, \"char\": ", begin + (size_t)j, l);
                put_json_char(stdout, model, tokens[begin + (size_t)j]);
                printf(", \"gates\": [");
                for (int32_t s = 0; s < S; s++) {
                    printf("%s%.6g", s ? ", " : "", gates[rec * S + (size_t)s]);
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

/* ---- generate ----------------------------------------------------------------- */

/* Generation beyond the context: the published model only knows positions below its
 * trained length, so when the cache is full the last half of the window is decoded
 * again from position 0 and generation continues from there. */
static int cmd_generate(const options *o) {
    moas_model *model = load_model(o);
    moas_context *ctx = new_context(model, o);
    moas_sampler_params sp;
    moas_sampler *smp;
    const char *prompt = o->prompt ? o->prompt : "";
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    size_t n_prompt;
    int32_t *tokens, *window;
    int32_t n_window = 0;

    moas_sampler_params_init(&sp);
    sp.temperature = o->temperature;
    sp.top_k = o->top_k;
    sp.top_p = o->top_p;
    sp.seed = o->seed;
    check(moas_sampler_create(&sp, moas_model_n_vocab(model), &smp), "cannot create a sampler");

    tokens = tokenize_all(model, prompt, strlen(prompt), &n_prompt);
    if (n_prompt == 0) {
        die("the prompt is empty: give at least one character with -p");
    }
    window = malloc((size_t)n_ctx * sizeof *window);
    if (window == NULL) {
        die("out of memory");
    }
    /* a prompt longer than the context keeps its end */
    const size_t start = n_prompt > (size_t)n_ctx ? n_prompt - (size_t)n_ctx : 0;
    for (size_t i = start; i < n_prompt; i++) {
        window[n_window++] = tokens[i];
    }
    check(moas_context_decode_batch(ctx, window, n_window, NULL, MOAS_LOGITS_LAST), "decode");
    fputs(prompt, stdout);
    fflush(stdout);

    const double t0 = now_seconds();
    for (int i = 0; i < o->n_predict; i++) {
        int32_t token;
        check(moas_sampler_sample(smp, moas_context_logits(ctx), &token), "sample");
        fputs(moas_token_text(model, token), stdout);
        fflush(stdout);
        if (n_window == n_ctx) {
            const int32_t keep = n_ctx / 2;
            memmove(window, window + n_window - keep, (size_t)keep * sizeof *window);
            n_window = keep;
            moas_context_reset(ctx);
            check(moas_context_decode_batch(ctx, window, n_window, NULL, MOAS_LOGITS_NONE),
                  "decode");
        }
        window[n_window++] = token;
        check(moas_context_decode(ctx, token, NULL), "decode");
    }
    const double dt = now_seconds() - t0;
    fputc('\n', stdout);
    fprintf(stderr, "moas: %d tokens in %.3f s (%.1f tokens/s), mode %s, kernels %s\n",
            o->n_predict, dt, dt > 0 ? o->n_predict / dt : 0.0, mode_name(o->mode),
            moas_context_kernels_name(ctx));
    if (o->show_routes) {   /* the window in the cache now: the text's last n_ctx tokens */
        fputc('\n', stdout);
        print_route_map(stdout, ctx, window, moas_context_n_past(ctx), o->color);
    }

    free(window);
    free(tokens);
    moas_sampler_free(smp);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}

/* ---- perplexity and logits ---------------------------------------------------- */

/* Walk `tokens` in windows of the context length, each from an empty cache.
 * stride 0: consecutive windows, decoded token by token; for every token after the
 * first of its window, `visit` sees the logits that predicted it.
 * stride S (1 .. n_ctx): windows start at 0, S, 2S, ... and are decoded as one batch;
 * the first window's tokens after its first are visited, and each later window visits
 * only the tokens it adds (its last S), the n_ctx - S before them being context only.
 * A window ends early at the end of the text; the walk stops once one has. */
typedef void (*logits_visitor)(void *user, const float *logits, int32_t n_vocab, int32_t next);

typedef struct {
    double nll;        /* summed negative log-likelihood, nats */
    size_t n_scored;   /* tokens predicted */
    size_t kv_bytes;   /* KV bytes at the end of the longest window */
} score;

static void score_visit(void *user, const float *logits, int32_t n_vocab, int32_t next) {
    score *s = user;
    double max = logits[0], sum = 0.0;
    for (int32_t i = 1; i < n_vocab; i++) {
        max = logits[i] > max ? logits[i] : max;
    }
    for (int32_t i = 0; i < n_vocab; i++) {
        sum += exp((double)logits[i] - max);
    }
    s->nll += log(sum) + max - (double)logits[next];
    s->n_scored++;
}

/* Also sums, over all windows, the token-layer pairs per scheme into scheme_pairs
 * [n_scheme], and reports the KV bytes, length and per-scheme token-layer pairs
 * (window_pairs [n_scheme]) of the window that used the most KV bytes. */
static double walk_windows(moas_context *ctx, const int32_t *tokens, size_t n_tokens,
                           int32_t stride, logits_visitor visit, void *user, size_t *kv_bytes,
                           int32_t *window_tokens, long long *scheme_pairs,
                           int32_t *window_pairs) {
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    const moas_model *model = moas_context_model(ctx);
    const int32_t n_vocab = moas_model_n_vocab(model), S = moas_model_n_scheme(model);
    int32_t counts[8];
    const double t0 = now_seconds();

    *kv_bytes = 0;
    *window_tokens = 0;
    memset(scheme_pairs, 0, (size_t)S * sizeof *scheme_pairs);
    float *all = NULL;
    if (stride > 0) {
        if (stride > n_ctx) {
            die("--stride %d is longer than the context (%d)", stride, n_ctx);
        }
        all = malloc((size_t)n_ctx * n_vocab * sizeof *all);
        if (all == NULL) {
            die("out of memory");
        }
    }
    const size_t step = stride > 0 ? (size_t)stride : (size_t)n_ctx;
    for (size_t begin = 0; begin < n_tokens; begin += step) {
        const size_t end = begin + (size_t)n_ctx < n_tokens ? begin + (size_t)n_ctx : n_tokens;
        moas_context_reset(ctx);
        if (stride > 0) {
            /* targets from the first the previous window did not score; a window's own
             * first token has no logits before it (stride n_ctx: consecutive windows) */
            const size_t skip = begin == 0 || stride == n_ctx ? 1 : (size_t)(n_ctx - stride);
            const size_t first = begin + skip;
            check(moas_context_decode_batch(ctx, tokens + begin, (int32_t)(end - begin), all,
                                            MOAS_LOGITS_ALL), "decode_batch");
            for (size_t j = first; j < end && visit != NULL; j++) {
                visit(user, all + (j - 1 - begin) * (size_t)n_vocab, n_vocab, tokens[j]);
            }
        } else {
            for (size_t i = begin; i < end; i++) {
                check(moas_context_decode(ctx, tokens[i], NULL), "decode");
                if (visit != NULL && i + 1 < end) {
                    visit(user, moas_context_logits(ctx), n_vocab, tokens[i + 1]);
                }
            }
        }
        const size_t used = moas_context_kv_bytes_used(ctx, -1);
        check(moas_context_scheme_counts(ctx, -1, counts), "scheme counts");
        if (used > *kv_bytes) {
            *kv_bytes = used;
            *window_tokens = moas_context_n_past(ctx);
            memcpy(window_pairs, counts, (size_t)S * sizeof *counts);
        }
        for (int32_t s = 0; s < S; s++) {
            scheme_pairs[s] += counts[s];
        }
        if (stride > 0 && end == n_tokens) {
            break;
        }
    }
    free(all);
    return now_seconds() - t0;
}

static int cmd_perplexity(const options *o) {
    moas_model *model = load_model(o);
    moas_context *ctx = new_context(model, o);
    size_t len, n_tokens;
    score s = {0, 0, 0};

    if (o->text_path == NULL) {
        die("perplexity needs -f TEXT");
    }
    char *text = read_file(o->text_path, &len);
    int32_t *tokens = tokenize_all(model, text, len, &n_tokens);
    if (n_tokens < 2) {
        die("'%s' has %zu characters; at least 2 are needed", o->text_path, n_tokens);
    }
    long long pairs[8], all_pairs = 0;
    int32_t window_tokens, window_pairs[8];
    char label[16];
    const int32_t S = moas_model_n_scheme(model);
    const double dt = walk_windows(ctx, tokens, n_tokens, o->stride, score_visit, &s,
                                   &s.kv_bytes, &window_tokens, pairs, window_pairs);
    const double nats = s.nll / (double)s.n_scored;
    const double tok_s = dt > 0 ? (double)n_tokens / dt : 0.0;
    const double kv_per_token = (double)s.kv_bytes / window_tokens;
    /* what a plain MHA cache of the same element type holds per token */
    const long long mha_per_token = (long long)moas_model_n_layer(model) * moas_model_n_embd(model) *
                                    2 * (o->kv_type == MOAS_TYPE_F16 ? 2 : 4);
    for (int32_t i = 0; i < S; i++) {
        all_pairs += pairs[i];
    }

    if (o->json) {
        printf("{\"mode\": \"%s\", \"forced_scheme\": %d, \"kv_type\": \"%s\", \"n_tokens\": %zu, "
               "\"n_scored\": %zu, "
               "\"n_ctx\": %d, \"stride\": %d, \"nats_per_token\": %.6f, \"perplexity\": %.6f, "
               "\"tokens_per_second\": %.1f, \"kv_bytes\": %zu, \"kv_bytes_per_token\": %.2f, "
               "\"mha_kv_bytes_per_token\": %lld, \"scheme_shares\": [",
               mode_name(o->mode), o->forced, o->kv_type == MOAS_TYPE_F16 ? "f16" : "f32", n_tokens,
               s.n_scored, moas_context_n_ctx(ctx), o->stride, nats, exp(nats), tok_s, s.kv_bytes,
               kv_per_token, mha_per_token);
        for (int32_t i = 0; i < S; i++) {
            printf("%s%.6f", i ? ", " : "", (double)pairs[i] / (double)all_pairs);
        }
        printf("], \"schemes\": [");
        for (int32_t i = 0; i < S; i++) {
            printf("%s\"%s\"", i ? ", " : "", scheme_label(model, i, label, sizeof label));
        }
        /* enough to recompute kv_bytes: sum_s pairs_s n_kv(s) head_dim 2 elem (+ 5 bytes
         * of bookkeeping per token-layer pair in routed mode) */
        printf("], \"scheme_kv_heads\": [");
        for (int32_t i = 0; i < S; i++) {
            printf("%s%d", i ? ", " : "", moas_model_scheme_n_kv(model, i));
        }
        printf("], \"head_dim\": %d, \"n_layer\": %d, \"kv_window_tokens\": %d, "
               "\"kv_window_scheme_pairs\": [", moas_model_head_dim(model),
               moas_model_n_layer(model), window_tokens);
        for (int32_t i = 0; i < S; i++) {
            printf("%s%d", i ? ", " : "", window_pairs[i]);
        }
        printf("]}\n");
    } else {
        printf("mode            %s\n", mode_name(o->mode));
        printf("tokens          %zu (%zu scored, windows of %d", n_tokens, s.n_scored,
               moas_context_n_ctx(ctx));
        if (o->stride > 0) {
            printf(", stride %d", o->stride);
        }
        printf(")\n");
        printf("nats/token      %.4f\n", nats);
        printf("perplexity      %.4f\n", exp(nats));
        printf("tokens/s        %.1f\n", tok_s);
        printf("KV bytes        %zu at the end of the longest window (%d tokens)\n", s.kv_bytes,
               window_tokens);
        printf("KV bytes/token  %.1f (a plain MHA cache: %lld)\n", kv_per_token, mha_per_token);
        printf("scheme shares  ");
        for (int32_t i = 0; i < S; i++) {
            printf(" %s %.1f%%", scheme_label(model, i, label, sizeof label),
                   100.0 * (double)pairs[i] / (double)all_pairs);
        }
        printf("\n");
    }
    free(tokens);
    free(text);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}

static int cmd_logits(const options *o) {
    moas_model *model = load_model(o);
    moas_context *ctx = new_context(model, o);
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    const int32_t n_vocab = moas_model_n_vocab(model);
    size_t len, n_tokens;

    if (o->text_path == NULL || o->out_path == NULL) {
        die("logits needs -f TEXT and -o OUT");
    }
    char *text = read_file(o->text_path, &len);
    int32_t *tokens = tokenize_all(model, text, len, &n_tokens);
    FILE *out = fopen(o->out_path, "wb");
    if (out == NULL) {
        die("cannot create '%s': %s", o->out_path, strerror(errno));
    }
    /* Logits of every position, in windows of the context length from an empty cache,
     * written as they come; float32 on every platform we build for is IEEE
     * little-endian. */
    for (size_t i = 0; i < n_tokens; i++) {
        if (i % (size_t)n_ctx == 0) {
            moas_context_reset(ctx);
        }
        check(moas_context_decode(ctx, tokens[i], NULL), "decode");
        if (fwrite(moas_context_logits(ctx), sizeof(float), (size_t)n_vocab, out) !=
            (size_t)n_vocab) {
            die("cannot write '%s'", o->out_path);
        }
    }
    if (fclose(out) != 0) {
        die("cannot write '%s'", o->out_path);
    }
    fprintf(stderr, "moas: wrote %zu x %d logits to %s\n", n_tokens, n_vocab, o->out_path);
    free(tokens);
    free(text);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}

/* ---- bench -------------------------------------------------------------------- */

static int compare_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, compare_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Weight bytes and multiply-adds one token reads through the matrices, given how often
 * each scheme ran in each layer (share[l * S + s]; 1 for every scheme in mixture mode).
 * The output matrix (token_embd when tied) counts only when `with_output`. */
static void matrix_cost(const moas_model *model, const double *share, int with_output,
                        double *bytes, double *macs) {
    const int32_t S = moas_model_n_scheme(model);
    int tied = 1;
    int64_t index;

    if (moas_model_tensor_find(model, "output.weight", &index) == MOAS_OK) {
        tied = 0;
    }
    *bytes = *macs = 0.0;
    for (int64_t i = 0; i < moas_model_n_tensors(model); i++) {
        moas_tensor_info t;
        int l, s, used;
        double weight = 1.0;
        t.size = sizeof t;
        check(moas_model_tensor(model, i, &t), "tensor");
        const char *name = t.name;
        if (t.n_dims != 2 || strstr(name, ".weight") == NULL || !strcmp(name, "position_embd.weight")) {
            continue;   /* vectors, and embedding rows (a few bytes per token) */
        }
        if (!strcmp(name, "token_embd.weight")) {
            if (!tied || !with_output) {
                continue;
            }
        } else if (!strcmp(name, "output.weight") && !with_output) {
            continue;
        }
        char kind[32];
        if (sscanf(name, "blk.%d.attn_%31[a-z].%d.weight%n", &l, kind, &s, &used) == 3 &&
            s >= 0 && s < S) {
            weight = share[l * S + s];
        }
        *bytes += weight * (double)t.n_bytes;
        *macs += weight * (double)t.ne[0] * (double)t.ne[1];
    }
}

static int cmd_bench(const options *o) {
    moas_model *model = load_model(o);
    const int32_t n_train = moas_model_n_ctx_train(model);
    const int32_t n_vocab = moas_model_n_vocab(model);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    options oc = *o;
    int n_prompt = o->n_prompt, n_gen = o->n_predict, depth = o->depth;

    /* keep every run inside the trained context */
    n_prompt = n_prompt < n_train ? n_prompt : n_train;
    depth = depth < n_train - 1 ? depth : n_train - 1;
    n_gen = n_gen < n_train - depth ? n_gen : n_train - depth;
    oc.n_ctx = n_prompt > depth + n_gen ? n_prompt : depth + n_gen;
    moas_context *ctx = new_context(model, &oc);
    int32_t *tokens = malloc((size_t)oc.n_ctx * sizeof *tokens);
    double *t_prefill = malloc((size_t)o->repeats * sizeof *t_prefill);
    double *t_decode = malloc((size_t)o->repeats * sizeof *t_decode);
    double *share = calloc((size_t)L * S, sizeof *share);
    int32_t counts[8];
    if (!tokens || !t_prefill || !t_decode || !share) {
        die("out of memory");
    }
    uint32_t seed = 12345;
    for (int i = 0; i < oc.n_ctx; i++) {
        seed = seed * 1664525u + 1013904223u;
        tokens[i] = (int32_t)((seed >> 8) % (uint32_t)n_vocab);
    }

    /* one warm-up run, then the measured ones: the prompt from an empty cache (logits
     * of its last token), then from `depth` cached tokens (filled untimed) n_gen more
     * one at a time, logits every token, as llama-bench's pp and tg tests do */
    for (int r = -1; r < o->repeats; r++) {
        moas_context_reset(ctx);
        const double t0 = now_seconds();
        check(moas_context_decode_batch(ctx, tokens, n_prompt, NULL, MOAS_LOGITS_LAST), "prefill");
        const double t1 = now_seconds();
        moas_context_reset(ctx);
        if (depth > 0) {
            check(moas_context_decode_batch(ctx, tokens, depth, NULL, MOAS_LOGITS_NONE), "depth");
        }
        const double t2 = now_seconds();
        for (int i = 0; i < n_gen; i++) {
            check(moas_context_decode(ctx, tokens[depth + i], NULL), "decode");
        }
        const double t3 = now_seconds();
        if (r >= 0) {
            t_prefill[r] = t1 - t0;
            t_decode[r] = t3 - t2;
        }
    }
    for (int32_t l = 0; l < L; l++) {
        check(moas_context_scheme_counts(ctx, l, counts), "scheme counts");
        for (int32_t s = 0; s < S; s++) {
            share[l * S + s] = o->mode == MOAS_MODE_ROUTED
                                   ? (double)counts[s] / moas_context_n_past(ctx) : 1.0;
        }
    }
    const double prefill_tok_s = n_prompt / median(t_prefill, o->repeats);
    const double decode_tok_s = n_gen > 0 ? n_gen / median(t_decode, o->repeats) : 0.0;
    double dec_bytes, dec_macs, pre_bytes, pre_macs;
    matrix_cost(model, share, 1, &dec_bytes, &dec_macs);
    matrix_cost(model, share, 0, &pre_bytes, &pre_macs);
    const double dec_gbs = dec_bytes * decode_tok_s * 1e-9;
    const double dec_gflops = 2.0 * dec_macs * decode_tok_s * 1e-9;
    const double pre_gflops = 2.0 * pre_macs * prefill_tok_s * 1e-9;

    if (o->json) {
        fputs("{\"model\": ", stdout);
        put_json_string(stdout, o->model_path);
        printf(", \"mode\": \"%s\", \"forced_scheme\": %d, \"kernels\": \"%s\", \"threads\": %d, "
               "\"n_prompt\": %d, \"n_decode\": %d, \"depth\": %d, \"repeats\": %d, "
               "\"prefill_tok_s\": %.1f, "
               "\"decode_tok_s\": %.1f, \"weight_bytes_per_token\": %.0f, \"decode_gb_s\": %.2f, "
               "\"decode_gflop_s\": %.2f, \"prefill_gflop_s\": %.2f}\n",
               mode_name(o->mode), o->forced, moas_context_kernels_name(ctx), o->n_threads,
               n_prompt, n_gen, depth, o->repeats, prefill_tok_s, decode_tok_s, dec_bytes, dec_gbs,
               dec_gflops, pre_gflops);
    } else {
        printf("model            %s (%s mode, %s kernels, %s threads)\n", o->model_path,
               mode_name(o->mode), moas_context_kernels_name(ctx),
               o->n_threads ? "fixed" : "default");
        printf("prefill          %8.1f tokens/s  (%d tokens, median of %d; %.2f GFLOP/s in matrices)\n",
               prefill_tok_s, n_prompt, o->repeats, pre_gflops);
        printf("decode           %8.1f tokens/s  (%d tokens after %d cached, median of %d)\n",
               decode_tok_s, n_gen, depth, o->repeats);
        printf("weights/token    %.0f bytes -> %.2f GB/s, %.2f GFLOP/s\n", dec_bytes, dec_gbs,
               dec_gflops);
    }
    free(tokens);
    free(t_prefill);
    free(t_decode);
    free(share);
    moas_context_free(ctx);
    moas_model_free(model);
    return 0;
}

/* ---- inspect ------------------------------------------------------------------ */

static const char *type_name(moas_type t) {
    switch (t) {
    case MOAS_TYPE_F32: return "f32";
    case MOAS_TYPE_F16: return "f16";
    case MOAS_TYPE_Q8_0: return "q8_0";
    case MOAS_TYPE_BF16: return "bf16";
    default: return "?";
    }
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
        printf("\"%.*s\"", slen > 80 ? 80 : (int)slen, sv);
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
                printf("%s\"%s\"", i ? ", " : "", strcmp(sv, "\n") ? sv : "\\n");
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

static int cmd_inspect(const options *o) {
    static const char *mixing_names[] = {"single", "mean", "router"};
    moas_model *model = load_model(o);
    const int32_t n_scheme = moas_model_n_scheme(model);
    const int32_t head_dim = moas_model_head_dim(model);
    const int32_t n_layer = moas_model_n_layer(model);
    const int32_t n_head = moas_model_n_head(model);
    long long all_heads = 0;

    printf("model           %s (%s)\n", o->model_path, moas_model_arch(model));
    printf("layers          %d\n", n_layer);
    printf("width           %d (%d heads of %d)\n", moas_model_n_embd(model), n_head, head_dim);
    printf("mlp width       %d\n", moas_model_n_ff(model));
    printf("vocabulary      %d characters\n", moas_model_n_vocab(model));
    printf("context         %d tokens\n", moas_model_n_ctx_train(model));
    printf("mixing          %s, %s biases\n", mixing_names[moas_model_mixing(model)],
           moas_model_has_bias(model) ? "with" : "no");
    printf("block           %s, %s, %s\n", meta_or(model, "moas.position_encoding", "learned"),
           meta_or(model, "moas.norm_type", "layer"),
           meta_or(model, "moas.feed_forward_type", "gelu"));
    printf("parameters      %llu\n", (unsigned long long)moas_model_n_params(model));
    printf("\nscheme  kv heads  KV bytes/token (all layers, f32 / f16)\n");
    for (int32_t s = 0; s < n_scheme; s++) {
        const long long heads = moas_model_scheme_n_kv(model, s);
        const long long per_token = heads * head_dim * 2 * n_layer;
        all_heads += heads;
        printf("%6d  %8lld  %lld / %lld\n", s, heads, per_token * 4, per_token * 2);
    }
    if (moas_model_kv_sharing(model) == MOAS_KV_SHARING_POOLED) {
        /* one mix of the pooled heads, broadcast back to all of them */
        printf("mixture mode stores the gate-weighted mix, %d heads: %lld / %lld bytes per "
               "token\n", n_head, (long long)n_head * head_dim * 2 * n_layer * 4,
               (long long)n_head * head_dim * 2 * n_layer * 2);
    } else {
        printf("mixture mode stores every scheme: %lld / %lld bytes per token\n",
               all_heads * head_dim * 2 * n_layer * 4, all_heads * head_dim * 2 * n_layer * 2);
    }

    printf("\nmetadata (%lld keys)\n", (long long)moas_model_meta_count(model));
    for (int64_t i = 0; i < moas_model_meta_count(model); i++) {
        const char *key = moas_model_meta_key(model, i);
        printf("  %-40s ", key);
        print_meta_value(model, key);
        putchar('\n');
    }
    printf("\ntensors (%lld)\n", (long long)moas_model_n_tensors(model));
    for (int64_t i = 0; i < moas_model_n_tensors(model); i++) {
        moas_tensor_info info;
        info.size = sizeof info;
        check(moas_model_tensor(model, i, &info), "tensor");
        printf("  %-32s %-5s [", info.name, type_name(info.type));
        for (int32_t d = 0; d < info.n_dims; d++) {
            printf("%s%lld", d ? ", " : "", (long long)info.ne[d]);
        }
        printf("]  %llu bytes\n", (unsigned long long)info.n_bytes);
    }
    moas_model_free(model);
    return 0;
}

int main(int argc, char **argv) {
    options o;

    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage();
    }
    if (!strcmp(argv[1], "--version")) {
        printf("moas %s\n", moas_version_string());
        return 0;
    }
    parse_options(argc, argv, &o);
    if (!strcmp(argv[1], "generate")) {
        return cmd_generate(&o);
    } else if (!strcmp(argv[1], "perplexity")) {
        return cmd_perplexity(&o);
    } else if (!strcmp(argv[1], "bench")) {
        return cmd_bench(&o);
    } else if (!strcmp(argv[1], "routes")) {
        return cmd_routes(&o);
    } else if (!strcmp(argv[1], "logits")) {
        return cmd_logits(&o);
    } else if (!strcmp(argv[1], "inspect")) {
        return cmd_inspect(&o);
    }
    fprintf(stderr, "moas: unknown command '%s'\n", argv[1]);
    usage();
    return 2;
}
