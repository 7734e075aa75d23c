/*
 * batched_bench.c - `moas batched-bench`: prompt and generation throughput of many
 * sequences decoded together in one KV pool, with the parameters and columns of
 * llama.cpp's llama-batched-bench (so the two tables read side by side), plus the KV
 * bytes the sequences use and the pages they hold; and, given only --pool-mb, how
 * many sequences of PP+TG tokens fit in that pool.
 */
#include "cli.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static void usage(FILE *f) {
    fputs("usage: moas batched-bench -m MODEL [-npp 128] [-ntg 128] [-npl 1,2,4,8,16,32,64]\n"
          "                          [options]\n"
          "\n"
          "Every combination of PP, TG and B is one row: B sequences decode a prompt of PP\n"
          "tokens together, then TG tokens each, all in one KV pool; the columns are\n"
          "llama-batched-bench's, plus the KV bytes and pages the sequences hold (a\n"
          "shared prompt counted once, as in N_KV). As there, one call of 16 prompt\n"
          "tokens warms up before the first row.\n"
          "\n"
          "  -m, --model PATH        GGUF model file\n"
          "  -npp LIST               prompt tokens, comma-separated (default 128)\n"
          "  -ntg LIST               generated tokens (default 128)\n"
          "  -npl LIST               parallel sequences (default 1,2,4,8,16,32,64)\n"
          "  -pps, --shared-prompt   one prompt decoded once and forked to every sequence\n"
          "      --pool-mb N         the KV pool's size (default: what the largest row\n"
          "                          needs; a row that does not fit is skipped with a\n"
          "                          note on stderr, and the exit status is 1); without\n"
          "                          -npl: how many sequences of PP+TG tokens fit\n"
          "  -b N                    rows per batched block (default 128)\n"
          "      --page-heads P      K/V heads per page, a power of two (default 4)\n"
          "      --compact-keep N    with --pool-mb alone, routed mode, pooled K/V: pool all\n"
          "                          but each sequence's last N tokens down to the cheapest\n"
          "                          scheme\n"
          "  -f, --file TEXT         take tokens from this text, - for stdin (default: a\n"
          "                          fixed pseudo-random sequence; routed-mode KV use\n"
          "                          follows the text)\n"
          "      --json              one JSON object per row\n",
          f);
    print_context_options(f, &moas_cmd_batched_bench);
}

static const opt_id accepted[] = {
    OPT_MODEL, OPT_NPP, OPT_NTG, OPT_NPL, OPT_SHARED_PROMPT, OPT_POOL_MB, OPT_BATCH,
    OPT_PAGE_HEADS, OPT_COMPACT_KEEP, OPT_FILE, OPT_UNKNOWN, OPT_JSON, OPT_THREADS, OPT_MODE,
    OPT_KV_TYPE, OPT_FORCE_SCHEME, OPT_NO_MMAP, OPT_END,
};

static int run(int argc, char **argv);

const command moas_cmd_batched_bench = {
    "batched-bench", "many sequences in one KV pool, as llama-batched-bench measures them",
    usage, accepted, run,
};

typedef struct {
    const char *model_path;
    const char *text_path;   /* tokens from this text (its first characters onwards) */
    const int *npp, *ntg, *npl;
    int n_npp, n_ntg, n_npl;
    int shared_prompt;
    int mode;
    int kv_type;
    int threads;
    int n_batch;
    double pool_mb;          /* 0: sized for the largest row */
    int json;
    int capacity_only;       /* --pool-mb without -npl */
    int fixed_scheme;        /* -1: the router decides */
    int page_heads;          /* 0: the library's default */
    int compact_keep;        /* capacity: pool all but the last N tokens to the cheapest
                                scheme after each sequence; -1: no compaction */
} bb_options;

static void bb_check(moas_status st, const char *what) {
    if (st != MOAS_OK) {
        die("%s: %s", what, moas_last_error());
    }
}

/* A row that does not fit in a pool of the caller's size (--pool-mb) is skipped with a
 * note, as llama-batched-bench skips rows beyond its context, and the run goes on; any
 * other failure ends it. Returns 1 when the row is to be skipped. */
static int bb_row_check(moas_status st, const char *what, const bb_options *o, int pp, int tg,
                        int pl) {
    if (st == MOAS_ERR_POOL_FULL && o->pool_mb > 0) {
        fprintf(stderr, "moas: PP %d, TG %d, B %d skipped: %s: %s\n", pp, tg, pl, what,
                moas_last_error());
        return 1;
    }
    bb_check(st, what);
    return 0;
}

static void bb_parse(int argc, char **argv, options *all, bb_options *o) {
    static const int default_pl[] = {1, 2, 4, 8, 16, 32, 64};
    options_init(all);
    all->npp[0] = all->ntg[0] = 128;
    all->n_npp = all->n_ntg = 1;
    memcpy(all->npl, default_pl, sizeof default_pl);
    all->n_npl = 7;
    parse_options(&moas_cmd_batched_bench, argc, argv, all);
    memset(o, 0, sizeof *o);
    o->model_path = all->model_path;
    o->text_path = all->text_path;
    o->npp = all->npp, o->n_npp = all->n_npp;
    o->ntg = all->ntg, o->n_ntg = all->n_ntg;
    o->npl = all->npl, o->n_npl = all->n_npl;
    o->shared_prompt = all->shared_prompt;
    o->mode = all->mode;
    o->kv_type = all->kv_type;
    o->threads = all->n_threads;
    o->n_batch = all->n_batch;
    o->pool_mb = all->pool_mb;
    o->json = all->json;
    o->fixed_scheme = all->forced;
    o->page_heads = all->page_heads;
    o->compact_keep = all->compact_keep;
    o->capacity_only = o->pool_mb > 0 && !all->given[OPT_NPL];
    /* options the run would otherwise ignore in silence */
    if (o->capacity_only && (o->n_npp > 1 || o->n_ntg > 1)) {
        usage_error(&moas_cmd_batched_bench, "--pool-mb without -npl counts sequences of "
                    "one -npp and one -ntg value, not lists");
    }
    if (o->capacity_only && o->shared_prompt) {
        usage_error(&moas_cmd_batched_bench, "--shared-prompt needs -npl (--pool-mb alone "
                    "counts separate sequences)");
    }
    if (all->given[OPT_COMPACT_KEEP] && !o->capacity_only) {
        usage_error(&moas_cmd_batched_bench, "--compact-keep applies to --pool-mb without "
                    "-npl only");
    }
}

static double bb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* n tokens for sequence `seq`: from the text (each sequence at its own offset), or
 * pseudo-random. */
typedef struct {
    int32_t *ids;
    size_t n;
} token_source;

static void fill_tokens(const token_source *src, int32_t n_vocab, int seq, int32_t *out, int n) {
    uint32_t seed = 12345u + 7919u * (uint32_t)seq;
    for (int i = 0; i < n; i++) {
        if (src->n > 0) {
            out[i] = src->ids[((size_t)seq * 977u + (size_t)i) % src->n];
        } else {
            seed = seed * 1664525u + 1013904223u;
            out[i] = (int32_t)((seed >> 8) % (uint32_t)n_vocab);
        }
    }
}

/* The text's tokens, as the other commands read a text (--unknown included). */
static token_source load_text(const moas_model *model, const char *path,
                              const unknown_opt *unknown) {
    token_source src = {NULL, 0};
    size_t len;
    char name[256];
    if (path == NULL) {
        return src;
    }
    char *text = read_text(path, &len);
    src.ids = tokenize_all(model, unknown, text, len, &src.n, NULL);
    free(text);
    if (src.n == 0) {
        die("%s has no characters", text_name(path, name, sizeof name));
    }
    return src;
}

/* `n_batch` sizes the context's own workspace: 16 where the sequences decode through
 * the pool's blocks, 1 where each decodes alone a token at a time (capacity: thousands
 * of contexts, whose workspaces would otherwise outweigh the pool they measure). */
static moas_context *bb_context(const moas_model *model, moas_pool *pool, const bb_options *o,
                                int n_ctx, int n_batch) {
    moas_context_params cp;
    moas_context *ctx;
    moas_context_params_init(&cp);
    cp.pool = pool;
    cp.mode = o->mode;
    cp.n_ctx = n_ctx;
    cp.n_threads = o->threads;
    cp.n_batch = n_batch;
    cp.forced_scheme = o->fixed_scheme;
    const moas_status st = moas_context_create(model, &cp, &ctx);
    return st == MOAS_OK ? ctx : NULL;
}

static moas_pool *bb_pool(const moas_model *model, const bb_options *o, double mb) {
    moas_pool_params pp;
    moas_pool *pool;
    moas_pool_params_init(&pp);
    pp.capacity_bytes = (uint64_t)(mb * 1048576.0);
    pp.kv_type = o->kv_type;
    pp.n_threads = o->threads;
    pp.n_batch = o->n_batch;
    pp.page_heads = o->page_heads;
    pp.commit = 1;   /* pages resident before timing, as llama.cpp clears its KV buffer */
    bb_check(moas_pool_create(model, &pp, &pool), "pool");
    return pool;
}

/* Bytes of K/V one token may take at most (every scheme in mixture mode, MHA-sized for
 * pooled models, the widest scheme in routed mode), for sizing a default pool. */
static double worst_token_bytes(const moas_model *model, const bb_options *o) {
    const int32_t L = moas_model_n_layer(model), S = moas_model_n_scheme(model);
    const double elem = o->kv_type == MOAS_TYPE_F16 ? 2 : 4;   /* Q8_0: fewer, 4 is room */
    int32_t heads = 0;
    for (int32_t s = 0; s < S; s++) {
        heads += moas_model_scheme_n_kv(model, s);
    }
    return (double)L * heads * moas_model_head_dim(model) * 2 * elem;
}

/* Bytes of one page of a pool made with these options (its 64 MB are not touched: no
 * commit; a page of 4096 heads of 128 f32 elements is 4 MB). */
static double page_bytes_of(const moas_model *model, const bb_options *o) {
    moas_pool_params pp;
    moas_pool *pool;
    moas_pool_info info = {.size = sizeof info};
    moas_pool_params_init(&pp);
    pp.capacity_bytes = 64u << 20;
    pp.kv_type = o->kv_type;
    pp.page_heads = o->page_heads;
    bb_check(moas_pool_create(model, &pp, &pool), "pool");
    bb_check(moas_pool_stats(pool, &info), "pool stats");
    moas_pool_free(pool);
    return (double)info.page_bytes;
}

/* MB of a pool with room for `seqs` sequences of n_ctx tokens at their widest, two
 * pages per stream spare (the partly filled one, and what a call reserves: with large
 * pages these dominate), and a megabyte for pages' rounding. */
static double pool_mb_for(const moas_model *model, const bb_options *o, int seqs, int n_ctx) {
    const double streams = (double)moas_model_n_layer(model) * moas_model_n_scheme(model);
    return (worst_token_bytes(model, o) * ((double)seqs * n_ctx + 64.0 * seqs) +
            2.0 * streams * seqs * page_bytes_of(model, o)) / 1048576.0 + 1.0;
}

static int run_capacity(const moas_model *model, const bb_options *o, const token_source *src) {
    const int n_tok = o->npp[0] + o->ntg[0];
    const int32_t n_vocab = moas_model_n_vocab(model);
    moas_pool *pool = bb_pool(model, o, o->pool_mb);
    int32_t *tokens = malloc((size_t)n_tok * sizeof *tokens);
    moas_context **ctxs = NULL;
    int n = 0, cap = 0;
    if (tokens == NULL) {
        die("out of memory");
    }
    /* fill the pool with sequences of PP+TG tokens until one no longer fits */
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 64;
            ctxs = realloc(ctxs, (size_t)cap * sizeof *ctxs);
            if (ctxs == NULL) {
                die("out of memory");
            }
        }
        moas_context *ctx = bb_context(model, pool, o, n_tok, 1);
        if (ctx == NULL) {
            die("context: %s", moas_last_error());
        }
        fill_tokens(src, n_vocab, n, tokens, n_tok);
        /* a token at a time: a call reserves pages for its tokens at their widest
         * scheme, so a whole prompt in one call would be refused while its routed
         * tokens still fit */
        moas_status st = MOAS_OK;
        for (int i = 0; i < n_tok && st == MOAS_OK; i++) {
            st = moas_context_decode(ctx, tokens[i], NULL);
        }
        if (st == MOAS_ERR_POOL_FULL) {
            moas_context_free(ctx);
            break;
        }
        bb_check(st, "decode");
        if (o->compact_keep >= 0 && n_tok > o->compact_keep) {
            int32_t cheapest = 0;
            for (int32_t s = 1; s < moas_model_n_scheme(model); s++) {
                cheapest = moas_model_scheme_n_kv(model, s) < moas_model_scheme_n_kv(model, cheapest)
                               ? s : cheapest;
            }
            bb_check(moas_context_compact(ctx, n_tok - o->compact_keep, cheapest, NULL), "compact");
        }
        ctxs[n++] = ctx;
    }
    moas_pool_info info = {.size = sizeof info};
    bb_check(moas_pool_stats(pool, &info), "pool stats");
    if (n == 0) {
        die("a pool of %.3f MB (%d pages of %llu bytes) holds no sequence of %d tokens",
            info.bytes_capacity / 1048576.0, info.n_pages,
            (unsigned long long)info.page_bytes, n_tok);
    }
    const double per_seq = (double)info.bytes_used / n;
    if (o->json) {
        printf("{\"pool_bytes\": %llu, \"page_bytes\": %llu, \"pp\": %d, \"tg\": %d, "
               "\"max_sequences\": %d, \"kv_bytes_per_sequence\": %.0f, \"kv_bytes\": %llu, "
               "\"held_bytes\": %llu, \"pages\": %d, \"waste\": %.4f}\n",
               (unsigned long long)info.bytes_capacity, (unsigned long long)info.page_bytes,
               o->npp[0], o->ntg[0], n, per_seq, (unsigned long long)info.bytes_used,
               (unsigned long long)info.bytes_held, info.n_pages - info.pages_free,
               info.bytes_held ? 1.0 - (double)info.bytes_stored / (double)info.bytes_held : 0.0);
    } else {
        printf("pool %.1f MB (%d pages of %llu bytes): %d sequences of %d tokens fit\n",
               info.bytes_capacity / 1048576.0, info.n_pages,
               (unsigned long long)info.page_bytes, n, n_tok);
        printf("KV bytes used %llu (%.0f per sequence), held %llu (%d pages): %.2f%% of held "
               "bytes hold no K/V\n",
               (unsigned long long)info.bytes_used, per_seq, (unsigned long long)info.bytes_held,
               info.n_pages - info.pages_free,
               info.bytes_held ? 100.0 * (1.0 - (double)info.bytes_stored / info.bytes_held) : 0.0);
    }
    for (int i = 0; i < n; i++) {
        moas_context_free(ctxs[i]);
    }
    free(ctxs);
    free(tokens);
    moas_pool_free(pool);
    return 0;
}

/* Before the first row, as llama-batched-bench does: one call of 16 prompt tokens in a
 * pool and context of their own, so that the first row does not also time what any
 * first call pays once (the threads' start, the weights' first reads). */
/* Returns the threads a call of these settings runs with. */
static int32_t warm_up(const moas_model *model, const bb_options *o, const token_source *src) {
    enum { WARM_TOKENS = 16 };
    int32_t tokens[WARM_TOKENS];
    const int n = moas_model_n_ctx_train(model) < WARM_TOKENS ? moas_model_n_ctx_train(model)
                                                              : WARM_TOKENS;
    moas_pool *pool = bb_pool(model, o, pool_mb_for(model, o, 1, n));
    moas_context *ctx = bb_context(model, pool, o, n, 16);
    if (ctx == NULL) {
        die("context: %s", moas_last_error());
    }
    fill_tokens(src, moas_model_n_vocab(model), 0, tokens, n);
    const moas_pool_seq seq = {ctx, tokens, n, MOAS_LOGITS_LAST, NULL};
    bb_check(moas_pool_decode(pool, &seq, 1), "warm-up");
    const int32_t n_threads = moas_context_n_threads(ctx);
    moas_context_free(ctx);
    moas_pool_free(pool);
    return n_threads;
}

/* What decoding a row measured, for its line of the table. */
typedef struct {
    double t0, t1, t2;       /* start, end of the prompt, end of generation */
    int prompt_pages;        /* --shared-prompt: pages held by the prompt before forking */
    uint64_t prompt_stored;  /* and its bytes, as moas_pool_info counts them */
    uint64_t prompt_used;
} row_times;

/* Decodes one row's prompts and generation into the row's contexts (made here, freed by
 * the caller). Returns 1 when the row does not fit in the caller's pool (skipped). */
static int decode_row(const moas_model *model, const bb_options *o, moas_pool *pool,
                      moas_context **ctxs, moas_pool_seq *seqs, const int32_t *tokens, int pp,
                      int tg, int pl, row_times *r) {
    const int n_ctx = pp + tg;
    /* prompt: every sequence's in one batched call, or one prompt forked */
    r->t0 = bb_now();
    if (o->shared_prompt) {
        if ((ctxs[0] = bb_context(model, pool, o, n_ctx, 16)) == NULL) {
            die("context: %s", moas_last_error());
        }
        seqs[0] = (moas_pool_seq){ctxs[0], tokens, pp, MOAS_LOGITS_LAST, NULL};
        if (bb_row_check(moas_pool_decode(pool, seqs, 1), "prompt", o, pp, tg, pl)) {
            return 1;
        }
        moas_pool_info after_prompt = {.size = sizeof after_prompt};
        bb_check(moas_pool_stats(pool, &after_prompt), "pool stats");
        r->prompt_pages = after_prompt.n_pages - after_prompt.pages_free;
        r->prompt_stored = after_prompt.bytes_stored;
        r->prompt_used = after_prompt.bytes_used;
        for (int s = 1; s < pl; s++) {
            if (bb_row_check(moas_context_fork(ctxs[0], &ctxs[s]), "fork", o, pp, tg, pl)) {
                return 1;
            }
        }
    } else {
        for (int s = 0; s < pl; s++) {
            if ((ctxs[s] = bb_context(model, pool, o, n_ctx, 16)) == NULL) {
                die("context: %s", moas_last_error());
            }
            seqs[s] = (moas_pool_seq){ctxs[s], tokens + (size_t)s * n_ctx, pp, MOAS_LOGITS_LAST, NULL};
        }
        if (bb_row_check(moas_pool_decode(pool, seqs, pl), "prompt", o, pp, tg, pl)) {
            return 1;
        }
    }
    r->t1 = bb_now();
    for (int i = 0; i < tg; i++) {
        for (int s = 0; s < pl; s++) {
            seqs[s] = (moas_pool_seq){ctxs[s], tokens + (size_t)s * n_ctx + pp + i, 1,
                                      MOAS_LOGITS_LAST, NULL};
        }
        if (bb_row_check(moas_pool_decode(pool, seqs, pl), "generation", o, pp, tg, pl)) {
            return 1;
        }
    }
    r->t2 = bb_now();
    return 0;
}

static void print_row(moas_pool *pool, const bb_options *o, int pp, int tg, int pl,
                      const row_times *r) {
    moas_pool_info info = {.size = sizeof info};
    bb_check(moas_pool_stats(pool, &info), "pool stats");
    const int n_kv = o->shared_prompt ? pp + pl * tg : pl * (pp + tg);
    const double t_pp = r->t1 - r->t0, t_tg = r->t2 - r->t1, t = r->t2 - r->t0;
    const double s_pp = (o->shared_prompt ? pp : (double)pl * pp) / t_pp;
    const double s_tg = tg > 0 ? (double)pl * tg / t_tg : 0.0;
    const double s = ((o->shared_prompt ? pp : (double)pl * pp) + (double)pl * tg) / t;
    const int pages = info.n_pages - info.pages_free;
    /* the pool counts a shared prompt once per fork; the row counts it once, as N_KV and
       the pages do */
    const uint64_t kv_bytes = info.bytes_used - (uint64_t)(pl - 1) * r->prompt_used;
    if (o->json) {
        printf("{\"pp\": %d, \"tg\": %d, \"b\": %d, \"n_kv\": %d, \"t_pp\": %.6f, \"s_pp\": %.2f, "
               "\"t_tg\": %.6f, \"s_tg\": %.2f, \"t\": %.6f, \"s\": %.2f, \"kv_bytes\": %llu, "
               "\"held_bytes\": %llu, \"stored_bytes\": %llu, \"pages\": %d, \"page_bytes\": %llu, "
               "\"mode\": \"%s\", \"forced_scheme\": %d, \"kv_type\": \"%s\", "
               "\"shared_prompt\": %s, \"threads\": %d",
               pp, tg, pl, n_kv, t_pp, s_pp, t_tg, s_tg, t, s,
               (unsigned long long)kv_bytes, (unsigned long long)info.bytes_held,
               (unsigned long long)info.bytes_stored, pages, (unsigned long long)info.page_bytes,
               o->mode == MOAS_MODE_ROUTED ? "routed" : "mixture", o->fixed_scheme,
               type_name(o->kv_type), o->shared_prompt ? "true" : "false", info.n_threads);
        if (o->shared_prompt) {
            /* the forks' own tokens' bytes: every fork counts the prompt's as its own */
            const double own = (double)info.bytes_stored - (double)pl * (double)r->prompt_stored;
            printf(", \"prompt_pages\": %d, \"pages_over_prompt_plus_own\": %.4f",
                   r->prompt_pages, pages / (r->prompt_pages + own / (double)info.page_bytes));
        }
        printf("}\n");
    } else {
        printf("|%6d |%6d |%4d |%7d |%9.3f |%10.2f |%9.3f |%10.2f |%9.3f |%10.2f |%12llu |%7d |\n",
               pp, tg, pl, n_kv, t_pp, s_pp, t_tg, s_tg, t, s,
               (unsigned long long)kv_bytes, pages);
    }
    fflush(stdout);
}

/* Returns 1 when the row did not fit in the caller's pool (skipped), else 0. */
static int run_row(const moas_model *model, const bb_options *o, const token_source *src,
                   int pp, int tg, int pl) {
    const int32_t n_vocab = moas_model_n_vocab(model);
    const int n_ctx = pp + tg;
    double mb = o->pool_mb;
    if (mb <= 0) {
        mb = pool_mb_for(model, o, pl, n_ctx);
    }
    moas_pool *pool = bb_pool(model, o, mb);
    moas_context **ctxs = calloc((size_t)pl, sizeof *ctxs);
    moas_pool_seq *seqs = calloc((size_t)pl, sizeof *seqs);
    int32_t *tokens = malloc((size_t)pl * n_ctx * sizeof *tokens);
    if (ctxs == NULL || seqs == NULL || tokens == NULL) {
        die("out of memory");
    }
    for (int s = 0; s < pl; s++) {
        fill_tokens(src, n_vocab, o->shared_prompt ? 0 : s, tokens + (size_t)s * n_ctx, pp);
        fill_tokens(src, n_vocab, 1000 + s, tokens + (size_t)s * n_ctx + pp, tg);
    }
    row_times r = {0};
    const int skip = decode_row(model, o, pool, ctxs, seqs, tokens, pp, tg, pl, &r);
    if (!skip) {
        print_row(pool, o, pp, tg, pl, &r);
    }
    for (int i = 0; i < pl; i++) {
        moas_context_free(ctxs[i]);
    }
    free(ctxs);
    free(seqs);
    free(tokens);
    moas_pool_free(pool);
    return skip;
}

static int run(int argc, char **argv) {
    options all;
    bb_options o;
    moas_model *model;
    bb_parse(argc, argv, &all, &o);
    model = load_model(&all);
    token_source src = load_text(model, o.text_path, &all.unknown);
    const int32_t n_train = moas_model_n_ctx_train(model);
    for (int i = 0; i < o.n_npp; i++) {
        for (int j = 0; j < o.n_ntg; j++) {
            if (o.npp[i] + o.ntg[j] > n_train) {
                die("PP %d + TG %d = %d tokens exceed the model's context of %d (give "
                    "smaller -npp and -ntg, e.g. -npp %d -ntg %d)", o.npp[i], o.ntg[j],
                    o.npp[i] + o.ntg[j], n_train, n_train / 2, n_train / 2);
            }
        }
    }
    if (o.capacity_only) {
        const int rc = run_capacity(model, &o, &src);
        free(src.ids);
        moas_model_free(model);
        return rc;
    }
    /* a pool and a context of these settings decode a few tokens before any output, so
     * that settings the library refuses stop the run before its table starts */
    const int32_t n_threads = warm_up(model, &o, &src);
    if (!o.json) {
        char forced[48] = "";
        if (o.fixed_scheme >= 0) {
            snprintf(forced, sizeof forced, ", every token on scheme %d", o.fixed_scheme);
        }
        printf("model %s, %s mode%s, KV %s, threads %d%s\n\n", o.model_path,
               o.mode == MOAS_MODE_ROUTED ? "routed" : "mixture", forced,
               type_name(o.kv_type), n_threads, o.threads == 0 ? " (default)" : "");
        printf("|    PP |    TG |   B |   N_KV |   T_PP s |  S_PP t/s |   T_TG s |  S_TG t/s |"
               "      T s |    S t/s |    KV bytes |  pages |\n");
        printf("|-------|-------|-----|--------|----------|-----------|----------|-----------|"
               "----------|----------|-------------|--------|\n");
    }
    int skipped = 0;
    for (int i = 0; i < o.n_npp; i++) {
        for (int j = 0; j < o.n_ntg; j++) {
            for (int k = 0; k < o.n_npl; k++) {
                skipped += run_row(model, &o, &src, o.npp[i], o.ntg[j], o.npl[k]);
            }
        }
    }
    free(src.ids);
    moas_model_free(model);
    return skipped > 0;
}
