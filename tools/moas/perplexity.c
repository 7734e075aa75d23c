/*
 * perplexity.c - `moas perplexity`: how well the model predicts a text, and the KV
 * bytes it took.
 */
#include "cli.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f) {
    fputs("usage: moas perplexity -m MODEL -f TEXT [options]\n"
          "\n"
          "Scores each character of TEXT by the logits before it (each window's first\n"
          "character only gives context): nats per token and perplexity, tokens/s, the KV\n"
          "bytes per token the cache held, and the share of token-layer pairs each scheme\n"
          "took. A text longer than the context is scored in consecutive windows of the\n"
          "context length, each from an empty cache.\n"
          "On a terminal, stderr shows the progress.\n"
          "\n"
          "  -m, --model PATH        GGUF model file\n"
          "  -f, --file TEXT         the text (at least 2 characters); - reads stdin\n"
          "      --stride S          slide the window by S tokens and score only the S it\n"
          "                          adds, the rest being context (S = the context length:\n"
          "                          the consecutive windows; --ppl-stride too)\n"
          "      --json              one JSON object\n",
          f);
    print_context_options(f, &moas_cmd_perplexity);
}

static const opt_id accepted[] = {
    OPT_MODEL, OPT_FILE, OPT_STRIDE, OPT_JSON, OPT_THREADS, OPT_CTX, OPT_MODE, OPT_KV_TYPE,
    OPT_UNKNOWN, OPT_FORCE_SCHEME, OPT_NO_MMAP, OPT_END,
};

static int run(int argc, char **argv);

const command moas_cmd_perplexity = {
    "perplexity", "score a text: nats/token, perplexity, KV bytes per token", usage,
    accepted, run,
};

/* ---- progress ------------------------------------------------------------------- */

/* A line on stderr, rewritten in place, while a long run goes on: only when stderr is
 * a terminal, at most ten times a second, and erased before the result. */
typedef struct {
    int on;
    int shown;
    double last;
} progress;

static void progress_show(progress *p, size_t window, size_t n_windows, size_t done,
                          size_t total) {
    const double t = now_seconds();
    if (!p->on || (p->shown && t - p->last < 0.1)) {
        return;
    }
    fprintf(stderr, "\r\033[Kmoas: perplexity: window %zu of %zu, %zu of %zu tokens", window,
            n_windows, done, total);
    p->shown = 1;
    p->last = t;
}

static void progress_end(progress *p) {
    if (p->shown) {
        fputs("\r\033[K", stderr);
    }
}

/* ---- the windows ---------------------------------------------------------------- */

/* Walk `tokens` in windows of the context length, each from an empty cache.
 * stride 0: consecutive windows, decoded token by token; for every token after the
 * first of its window, `visit` sees the logits that predicted it.
 * stride S (1 .. n_ctx): windows start at 0, S, 2S, ... and are decoded as one batch;
 * the first window's tokens after its first are visited, and each later window visits
 * only the tokens it adds (its last S), the n_ctx - S before them being context only.
 * A window ends early at the end of the text; the walk stops once one has. */
typedef struct {
    double nll;        /* summed negative log-likelihood, nats */
    size_t n_scored;   /* tokens predicted */
    size_t kv_bytes;   /* KV bytes at the end of the longest window */
} score;

/* Token `at` of the text, `next`, scored by the logits before it. Logits that are not
 * finite (a damaged model's NaN) are an error: the sum went on as NaN, and the result
 * and its JSON ("nan" is no JSON number) with it, under exit status 0. */
static void score_visit(score *s, const float *logits, int32_t n_vocab, size_t at,
                        int32_t next) {
    double max = logits[0], sum = 0.0;
    for (int32_t i = 1; i < n_vocab; i++) {
        max = logits[i] > max ? logits[i] : max;
    }
    for (int32_t i = 0; i < n_vocab; i++) {
        sum += exp((double)logits[i] - max);
    }
    const double nll = log(sum) + max - (double)logits[next];
    if (!isfinite(nll)) {
        die("the logits scoring token %zu of the text are not finite (NaN or infinity): "
            "the model computes no probability for it", at);
    }
    s->nll += nll;
    s->n_scored++;
}

/* Also sums, over all windows, the token-layer pairs per scheme into scheme_pairs
 * [n_scheme], and reports the KV bytes, length and per-scheme token-layer pairs
 * (window_pairs [n_scheme]) of the window that used the most KV bytes. */
static double walk_windows(moas_context *ctx, const int32_t *tokens, size_t n_tokens,
                           int32_t stride, score *sc, int32_t *window_tokens,
                           long long *scheme_pairs, int32_t *window_pairs) {
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    const moas_model *model = moas_context_model(ctx);
    const int32_t n_vocab = moas_model_n_vocab(model), S = moas_model_n_scheme(model);
    int32_t counts[8];
    progress prog = {isatty(STDERR_FILENO), 0, 0.0};
    const double t0 = now_seconds();

    sc->kv_bytes = 0;
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
    const size_t n_windows = stride == 0 ? (n_tokens + step - 1) / step
                             : n_tokens > (size_t)n_ctx
                                 ? 1 + (n_tokens - (size_t)n_ctx + step - 1) / step
                                 : 1;
    for (size_t begin = 0; begin < n_tokens; begin += step) {
        const size_t end = begin + (size_t)n_ctx < n_tokens ? begin + (size_t)n_ctx : n_tokens;
        progress_show(&prog, begin / step + 1, n_windows, begin, n_tokens);
        moas_context_reset(ctx);
        if (stride > 0) {
            /* targets from the first the previous window did not score; a window's own
             * first token has no logits before it (stride n_ctx: consecutive windows) */
            const size_t skip = begin == 0 || stride == n_ctx ? 1 : (size_t)(n_ctx - stride);
            const size_t first = begin + skip;
            check(moas_context_decode_batch(ctx, tokens + begin, (int32_t)(end - begin), all,
                                            MOAS_LOGITS_ALL), "decode_batch");
            for (size_t j = first; j < end; j++) {
                score_visit(sc, all + (j - 1 - begin) * (size_t)n_vocab, n_vocab, j,
                            tokens[j]);
            }
        } else {
            for (size_t i = begin; i < end; i++) {
                check(moas_context_decode(ctx, tokens[i], NULL), "decode");
                if (i + 1 < end) {
                    score_visit(sc, moas_context_logits(ctx), n_vocab, i + 1, tokens[i + 1]);
                }
            }
        }
        const size_t used = moas_context_kv_bytes_used(ctx, -1);
        check(moas_context_scheme_counts(ctx, -1, counts), "scheme counts");
        if (used > sc->kv_bytes) {
            sc->kv_bytes = used;
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
    progress_end(&prog);
    free(all);
    return now_seconds() - t0;
}

/* ---- perplexity ----------------------------------------------------------------- */

static int run(int argc, char **argv) {
    options o;
    options_init(&o);
    parse_options(&moas_cmd_perplexity, argc, argv, &o);
    if (o.text_path == NULL) {
        usage_error(&moas_cmd_perplexity, "perplexity needs -f TEXT");
    }
    moas_model *model = load_model(&o);
    moas_context *ctx = new_context(model, &o);
    size_t len, n_tokens, n_changed;
    score s = {0, 0, 0};
    char name[512];

    char *text = read_text(o.text_path, &len);
    int32_t *tokens = tokenize_all(model, &o.unknown, text, len, &n_tokens, &n_changed);
    /* characters of the text: dropped ones are not among the tokens */
    const size_t n_chars = n_tokens + (o.unknown.rule == MOAS_UNKNOWN_DROP ? n_changed : 0);
    if (n_tokens < 2) {
        die("%s has %zu character%s to score: perplexity needs at least 2 (the first is "
            "only context)", text_name(o.text_path, name, sizeof name), n_tokens,
            n_tokens == 1 ? "" : "s");
    }
    if (moas_context_n_ctx(ctx) < 2) {   /* each window's first token is only context */
        die("a context of %d token leaves nothing to score: perplexity needs -c 2 or more",
            moas_context_n_ctx(ctx));
    }
    long long pairs[8], all_pairs = 0;
    int32_t window_tokens, window_pairs[8];
    char label[24];
    const int32_t S = moas_model_n_scheme(model);
    const double dt = walk_windows(ctx, tokens, n_tokens, o.stride, &s, &window_tokens, pairs,
                                   window_pairs);
    const double nats = s.nll / (double)s.n_scored;
    const double tok_s = dt > 0 ? (double)n_tokens / dt : 0.0;
    const double kv_per_token = (double)s.kv_bytes / window_tokens;
    /* what a plain MHA cache of the same element type holds per token */
    const long long mha_per_token =
        (long long)moas_model_n_layer(model) * moas_model_n_head(model) * 2 *
        (o.kv_type == MOAS_TYPE_Q8_0 ? moas_model_head_dim(model) / 32 * 34
                                     : moas_model_head_dim(model) * (o.kv_type == MOAS_TYPE_F16 ? 2 : 4));
    for (int32_t i = 0; i < S; i++) {
        all_pairs += pairs[i];
    }

    if (o.json) {
        printf("{\"n_chars\": %zu, \"n_unknown\": %zu, \"unknown\": \"%s\", ", n_chars,
               n_changed, o.unknown.rule == MOAS_UNKNOWN_DROP      ? "drop"
                          : o.unknown.rule == MOAS_UNKNOWN_REPLACE ? "replace"
                                                                  : "error");
        printf("\"mode\": \"%s\", \"forced_scheme\": %d, \"kv_type\": \"%s\", \"n_tokens\": %zu, "
               "\"n_scored\": %zu, "
               "\"n_ctx\": %d, \"stride\": %d, \"nats_per_token\": %.6f, \"perplexity\": ",
               mode_name(o.mode), o.forced, type_name(o.kv_type), n_tokens,
               s.n_scored, moas_context_n_ctx(ctx), o.stride, nats);
        /* past about 709 nats a token the perplexity is more than a double holds: JSON
         * has no inf, so null (the text says inf) */
        if (isfinite(exp(nats))) {
            printf("%.6f, ", exp(nats));
        } else {
            printf("null, ");
        }
        printf("\"tokens_per_second\": %.1f, \"kv_bytes\": %zu, \"kv_bytes_per_token\": %.2f, "
               "\"mha_kv_bytes_per_token\": %lld, \"scheme_shares\": [",
               tok_s, s.kv_bytes, kv_per_token, mha_per_token);
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
        printf("mode            %s\n", mode_name(o.mode));
        printf("characters      %zu in the text", n_chars);
        if (n_changed > 0) {
            printf(", %zu outside the vocabulary %s", n_changed,
                   o.unknown.rule == MOAS_UNKNOWN_DROP ? "dropped" : "replaced");
        }
        printf("\n");
        printf("tokens          %zu (%zu scored, windows of %d", n_tokens, s.n_scored,
               moas_context_n_ctx(ctx));
        if (o.stride > 0) {
            printf(", stride %d", o.stride);
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
