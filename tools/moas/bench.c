/*
 * bench.c - `moas bench`: prefill and decode speed, as llama-bench's pp and tg tests
 * measure them.
 */
#include "cli.h"

#include <stdlib.h>
#include <string.h>

static void usage(FILE *f) {
    fputs("usage: moas bench -m MODEL [--n-prompt 512] [-n 128] [-d 0] [-r 5] [options]\n"
          "\n"
          "One warm-up, then -r repeats of: prefill --n-prompt random tokens from an empty\n"
          "cache (one batch, logits of the last); then, after -d cached tokens (filled\n"
          "untimed), decode -n more one at a time. Prints the median tokens/s of each, the\n"
          "weight bytes a decoded token reads and the GB/s and GFLOP/s they imply. Sizes\n"
          "beyond the trained context are cut to it, and stderr says so.\n"
          "\n"
          "  -m, --model PATH        GGUF model file\n"
          "      --n-prompt N        prefill tokens (default 512, or the trained context\n"
          "                          if shorter; llama-bench's -p, which is a prompt's\n"
          "                          text everywhere in moas)\n"
          "  -n, --n-gen N           decode tokens (default 128)\n"
          "  -d, --n-depth N         cached tokens before decoding starts (default 0)\n"
          "  -r, --repeats N         measured runs; the median is reported (default 5)\n"
          "      --json              one JSON object\n",
          f);
    print_context_options(f, &moas_cmd_bench);
}

static const opt_id accepted[] = {
    OPT_MODEL, OPT_N_PROMPT, OPT_N_GEN, OPT_N_DEPTH, OPT_REPEATS, OPT_JSON, OPT_THREADS,
    OPT_MODE, OPT_KV_TYPE, OPT_FORCE_SCHEME, OPT_NO_MMAP, OPT_END,
};

static int run(int argc, char **argv);

const command moas_cmd_bench = {
    "bench", "prefill and decode tokens/s, as llama-bench measures them", usage, accepted,
    run,
};

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
    const int32_t S = moas_model_n_scheme(model), L = moas_model_n_layer(model);
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
        /* a file may hold tensors the model does not use: only its layers and schemes */
        if (sscanf(name, "blk.%d.attn_%31[a-z].%d.weight%n", &l, kind, &s, &used) == 3 &&
            l >= 0 && l < L && s >= 0 && s < S) {
            weight = share[l * S + s];
        }
        *bytes += weight * (double)t.n_bytes;
        *macs += weight * (double)t.ne[0] * (double)t.ne[1];
    }
}

static int run(int argc, char **argv) {
    options o;
    options_init(&o);
    o.n_prompt = 0;   /* not given: 512, or the trained context if shorter */
    o.n_gen = 128;
    o.repeats = 5;
    parse_options(&moas_cmd_bench, argc, argv, &o);
    moas_model *model = load_model(&o);
    const int32_t n_train = moas_model_n_ctx_train(model);
    const int32_t n_vocab = moas_model_n_vocab(model);
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    int n_prompt = o.n_prompt, n_gen = o.n_gen, depth = o.depth;
    if (n_prompt == 0) {
        n_prompt = n_train < 512 ? n_train : 512;
    }

    /* keep every run inside the trained context, and say what changed */
    if (n_prompt > n_train) {
        fprintf(stderr, "moas: bench: --n-prompt %d is more than the trained context: the "
                "prefill measures %d tokens\n", n_prompt, n_train);
        n_prompt = n_train;
    }
    if (depth > n_train - 1) {
        fprintf(stderr, "moas: bench: -d %d leaves no room to decode in the trained context "
                "of %d: decoding starts after %d cached tokens\n", depth, n_train, n_train - 1);
        depth = n_train - 1;
    }
    if (n_gen > n_train - depth) {
        fprintf(stderr, "moas: bench: -n %d does not fit after %d cached tokens in the trained "
                "context of %d: decode measures %d tokens\n", n_gen, depth, n_train,
                n_train - depth);
        n_gen = n_train - depth;
    }
    options oc = o;   /* a context just long enough */
    oc.n_ctx = n_prompt > depth + n_gen ? n_prompt : depth + n_gen;
    moas_context *ctx = new_context(model, &oc);
    int32_t *tokens = malloc((size_t)oc.n_ctx * sizeof *tokens);
    double *t_prefill = malloc((size_t)o.repeats * sizeof *t_prefill);
    double *t_decode = malloc((size_t)o.repeats * sizeof *t_decode);
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
    for (int r = -1; r < o.repeats; r++) {
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
            const int32_t n_past = moas_context_n_past(ctx);
            share[l * S + s] = o.mode != MOAS_MODE_ROUTED ? 1.0
                               : n_past > 0               ? (double)counts[s] / n_past
                                                          : 0.0;
        }
    }
    const double prefill_tok_s = n_prompt / median(t_prefill, o.repeats);
    const double decode_tok_s = n_gen > 0 ? n_gen / median(t_decode, o.repeats) : 0.0;
    double dec_bytes, dec_macs, pre_bytes, pre_macs;
    matrix_cost(model, share, 1, &dec_bytes, &dec_macs);
    matrix_cost(model, share, 0, &pre_bytes, &pre_macs);
    const double dec_gbs = dec_bytes * decode_tok_s * 1e-9;
    const double dec_gflops = 2.0 * dec_macs * decode_tok_s * 1e-9;
    const double pre_gflops = 2.0 * pre_macs * prefill_tok_s * 1e-9;

    if (o.json) {
        fputs("{\"model\": ", stdout);
        put_json_string(stdout, o.model_path);
        printf(", \"mode\": \"%s\", \"forced_scheme\": %d, \"kv_type\": \"%s\", "
               "\"kernels\": \"%s\", \"threads\": %d, \"mmap\": %s, "
               "\"n_prompt\": %d, \"n_decode\": %d, \"depth\": %d, \"repeats\": %d, "
               "\"prefill_tok_s\": %.1f, "
               "\"decode_tok_s\": %.1f, \"weight_bytes_per_token\": %.0f, \"decode_gb_s\": %.2f, "
               "\"decode_gflop_s\": %.2f, \"prefill_gflop_s\": %.2f}\n",
               mode_name(o.mode), o.forced, type_name(o.kv_type), moas_context_kernels_name(ctx),
               moas_context_n_threads(ctx), o.no_mmap ? "false" : "true", n_prompt, n_gen,
               depth, o.repeats, prefill_tok_s,
               decode_tok_s, dec_bytes, dec_gbs, dec_gflops, pre_gflops);
    } else {
        char forced[48] = "";
        if (o.forced >= 0) {
            snprintf(forced, sizeof forced, ", every token on scheme %d", o.forced);
        }
        printf("model            %s (%s mode%s, %s K/V, %s kernels, %d thread%s%s%s)\n",
               o.model_path, mode_name(o.mode), forced, type_name(o.kv_type),
               moas_context_kernels_name(ctx),
               moas_context_n_threads(ctx), moas_context_n_threads(ctx) == 1 ? "" : "s",
               o.n_threads ? ", as asked" : ", the default",
               o.no_mmap ? "; read into memory" : "");
        printf("prefill          %8.1f tokens/s  (%d tokens, median of %d; %.2f GFLOP/s in matrices)\n",
               prefill_tok_s, n_prompt, o.repeats, pre_gflops);
        printf("decode           %8.1f tokens/s  (%d tokens after %d cached, median of %d)\n",
               decode_tok_s, n_gen, depth, o.repeats);
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
