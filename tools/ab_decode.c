/*
 * ab_decode.c - decode speed of two or more builds of libmoas, interleaved in one
 * process.
 *
 *   build/tools/ab_decode [options] LIBMOAS.so[@S] LIBMOAS.so[@S] [...]
 *
 * Each shared library is loaded with dlopen (RTLD_LOCAL, so each keeps its own
 * symbols) and given the same model, contexts and random tokens, filled to the same
 * depth untimed. Then, round after round, every build decodes -n tokens per sequence
 * (-b sequences of one pool through moas_pool_decode, or one context through
 * moas_context_decode when -b is 0) and truncates back; the order of the builds
 * reverses every other round. On a machine whose speed drifts within minutes, builds
 * timed seconds apart in one process differ by what they are, where separate runs
 * differ by the minute they ran in. It prints, for each build, its median tokens/s
 * and the median and 10th-90th percentile range of its per-round ratio to the first.
 * A build written LIB@S runs with every token forced to scheme S (routed mode), so
 * one library against itself as LIB and LIB@0 is routed decode against an MHA-sized
 * cache of the same model, timed the same way. The tokens are random, as `moas
 * bench` draws them, or a text's (--text FILE, sequence s starting 1,000 s characters
 * in, wrapping around): a router routes the two differently.
 *
 * It calls only functions libmoas 1.1 exports (the pool's among them), and the ABI
 * only grows, so any two commits since the pool came can be compared: `make
 * lib/libmoas.so.1.1.0` in a worktree of each.
 */
#include <moas.h>

#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { MAX_BUILDS = 8, MAX_SEQS = 64, MAX_ROUNDS = 1000, MAX_TEXT = 1 << 24 };

typedef struct {
    const char *arg;          /* as given: LIB or LIB@S */
    char path[4096];          /* LIB */
    int forced;               /* S, or the options' --force-scheme */
    moas_status (*model_load)(const char *, const moas_model_params *, moas_model **);
    void (*context_params_init)(moas_context_params *, size_t);
    void (*pool_params_init)(moas_pool_params *, size_t);
    moas_status (*context_create)(const moas_model *, const moas_context_params *,
                                  moas_context **);
    moas_status (*pool_create)(const moas_model *, const moas_pool_params *, moas_pool **);
    moas_status (*decode)(moas_context *, int32_t, float *);
    moas_status (*decode_batch)(moas_context *, const int32_t *, int32_t, float *, moas_logits);
    moas_status (*pool_decode)(moas_pool *, const moas_pool_seq *, int32_t);
    moas_status (*truncate)(moas_context *, int32_t);
    int32_t (*n_vocab)(const moas_model *);
    int32_t (*n_layer)(const moas_model *);
    int32_t (*n_embd)(const moas_model *);
    void (*model_free)(moas_model *);
    moas_status (*tokenize)(const moas_model *, const char *, size_t, int32_t *, size_t,
                            size_t *);
    const char *(*last_error)(void);
    moas_model *model;
    moas_pool *pool;
    moas_context *ctx[MAX_SEQS];
} build;

typedef struct {
    const char *model;
    int depth, n_gen, rounds, threads, forced, seqs, mode, kv_type;
    const char *text;
} options;

static void usage(void) {
    fprintf(stderr,
            "usage: ab_decode -m MODEL [-d DEPTH] [-n N] [-r ROUNDS] [-t THREADS] [-b SEQS]\n"
            "                 [--mode mixture|routed] [--force-scheme S] [--kv-type f32|f16|q8_0]\n"
            "                 [--text FILE] LIBMOAS.so[@S] LIBMOAS.so[@S] [...]\n"
            "  -d  cached tokens before timing (512)   -n  tokens decoded per round (64)\n"
            "  -r  rounds (20)   -t  threads (1)   -b  sequences in one pool (0: one context)\n");
    exit(2);
}

/* A whole decimal number that fits an int, else the usage: "-r 20x" must not quietly
 * run 20 rounds, nor "LIB@x" force scheme 0. */
static int number(const char *text) {
    char *end;
    errno = 0;
    const long v = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno != 0 || v < INT_MIN || v > INT_MAX) {
        usage();
    }
    return (int)v;
}

static void fail(const build *b, const char *what) {
    fprintf(stderr, "ab_decode: %s: %s: %s\n", b->arg, what, b->last_error());
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

#define BIND(field, name)                                                                \
    do {                                                                                 \
        *(void **)&b->field = dlsym(h, name);                                            \
        if (b->field == NULL) {                                                          \
            fprintf(stderr, "ab_decode: %s: no %s\n", b->path, name);                    \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

static void bind(build *b) {
    void *h = dlopen(b->path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        fprintf(stderr, "ab_decode: %s\n", dlerror());
        exit(1);
    }
    BIND(model_load, "moas_model_load");
    BIND(context_params_init, "moas_context_params_init_sized");
    BIND(pool_params_init, "moas_pool_params_init_sized");
    BIND(context_create, "moas_context_create");
    BIND(pool_create, "moas_pool_create");
    BIND(decode, "moas_context_decode");
    BIND(decode_batch, "moas_context_decode_batch");
    BIND(pool_decode, "moas_pool_decode");
    BIND(truncate, "moas_context_truncate");
    BIND(n_vocab, "moas_model_n_vocab");
    BIND(n_layer, "moas_model_n_layer");
    BIND(n_embd, "moas_model_n_embd");
    BIND(model_free, "moas_model_free");
    BIND(tokenize, "moas_tokenize");
    BIND(last_error, "moas_last_error");
}

/* Model, pool (committed, as batched-bench's) and contexts filled to the depth. */
static void prepare(build *b, const options *o, const int32_t *tokens) {
    const int n_seq = o->seqs > 0 ? o->seqs : 1;
    if (b->model_load(o->model, NULL, &b->model) != MOAS_OK) {
        fail(b, "load");
    }
    b->pool = NULL;
    if (o->seqs > 0) {
        moas_pool_params pp;
        b->pool_params_init(&pp, sizeof pp);
        /* room for every sequence at its widest (K and V of every head in f32), and
         * a megabyte for pages' rounding */
        const uint64_t token_bytes =
            2 * sizeof(float) * (uint64_t)b->n_layer(b->model) * (uint64_t)b->n_embd(b->model);
        pp.capacity_bytes = (uint64_t)o->seqs * (uint64_t)(o->depth + o->n_gen) * token_bytes +
                            (1u << 20);
        pp.kv_type = o->kv_type;
        pp.n_threads = o->threads;
        pp.commit = 1;
        if (b->pool_create(b->model, &pp, &b->pool) != MOAS_OK) {
            fail(b, "pool");
        }
    }
    for (int s = 0; s < n_seq; s++) {
        moas_context_params p;
        b->context_params_init(&p, sizeof p);
        p.mode = o->mode;
        p.forced_scheme = b->forced;
        p.n_threads = o->threads;
        p.n_ctx = o->depth + o->n_gen;
        p.pool = b->pool;
        if (b->pool == NULL) {
            p.kv_type = o->kv_type;
        }
        if (b->context_create(b->model, &p, &b->ctx[s]) != MOAS_OK) {
            fail(b, "context");
        }
        if (b->decode_batch(b->ctx[s], tokens + (size_t)s * (o->depth + o->n_gen), o->depth,
                            NULL, MOAS_LOGITS_NONE) != MOAS_OK) {
            fail(b, "depth");
        }
    }
}

/* The tokens of a text for every sequence: sequence s starts 1,000 s characters in,
 * wrapping around to the text's start. */
static void text_tokens(const build *b, const moas_model *model, const options *o,
                        int32_t *tokens) {
    FILE *f = fopen(o->text, "rb");
    char *text = malloc(MAX_TEXT + 1);
    size_t n_text = 0, n_tok = 0;
    int32_t *all = malloc(sizeof *all * MAX_TEXT);
    if (f == NULL || text == NULL || all == NULL) {
        fprintf(stderr, "ab_decode: %s: cannot read\n", o->text);
        exit(1);
    }
    n_text = fread(text, 1, MAX_TEXT, f);
    fclose(f);
    if (b->tokenize(model, text, n_text, all, MAX_TEXT, &n_tok) != MOAS_OK || n_tok == 0) {
        fail(b, "tokenize the text");
    }
    const int n_seq = o->seqs > 0 ? o->seqs : 1, stride = o->depth + o->n_gen;
    for (int s = 0; s < n_seq; s++) {
        for (int i = 0; i < stride; i++) {
            tokens[(size_t)s * stride + i] = all[((size_t)s * 1000 + (size_t)i) % n_tok];
        }
    }
    free(all);
    free(text);
}

/* One round of one build: n_gen tokens per sequence, then back to the depth. */
static double round_seconds(build *b, const options *o, const int32_t *tokens) {
    const int n_seq = o->seqs > 0 ? o->seqs : 1, stride = o->depth + o->n_gen;
    moas_pool_seq seqs[MAX_SEQS];
    const double t0 = now();
    for (int i = 0; i < o->n_gen; i++) {
        if (o->seqs == 0) {
            if (b->decode(b->ctx[0], tokens[o->depth + i], NULL) != MOAS_OK) {
                fail(b, "decode");
            }
            continue;
        }
        for (int s = 0; s < n_seq; s++) {
            seqs[s] = (moas_pool_seq){b->ctx[s], tokens + (size_t)s * stride + o->depth + i, 1,
                                      MOAS_LOGITS_LAST, NULL};
        }
        if (b->pool_decode(b->pool, seqs, n_seq) != MOAS_OK) {
            fail(b, "pool decode");
        }
    }
    const double t = now() - t0;
    for (int s = 0; s < n_seq; s++) {
        b->truncate(b->ctx[s], o->depth);
    }
    return t;
}

int main(int argc, char **argv) {
    options o = {NULL, 512, 64, 20, 1, -1, 0, MOAS_MODE_ROUTED, MOAS_TYPE_F32, NULL};
    static build builds[MAX_BUILDS];
    int n_builds = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (n_builds == MAX_BUILDS) {
                usage();
            }
            build *b = &builds[n_builds++];
            const char *at = strrchr(a, '@');
            const size_t len = at != NULL ? (size_t)(at - a) : strlen(a);
            if (len == 0 || len >= sizeof b->path) {
                usage();
            }
            b->arg = a;
            memcpy(b->path, a, len);
            b->path[len] = '\0';
            b->forced = at != NULL ? number(at + 1) : -2;   /* -2: the options' */
            continue;
        }
        if (v == NULL) {
            usage();
        }
        i++;
        const struct { const char *name; int *value; } ints[] = {
            {"-d", &o.depth}, {"-n", &o.n_gen}, {"-r", &o.rounds}, {"-t", &o.threads},
            {"-b", &o.seqs},  {"--force-scheme", &o.forced}};
        size_t k = 0;
        while (k < sizeof ints / sizeof ints[0] && strcmp(a, ints[k].name) != 0) {
            k++;
        }
        if (k < sizeof ints / sizeof ints[0]) {
            *ints[k].value = number(v);
        } else if (!strcmp(a, "-m")) {
            o.model = v;
        } else if (!strcmp(a, "--text")) {
            o.text = v;
        } else if (!strcmp(a, "--mode") && (!strcmp(v, "routed") || !strcmp(v, "mixture"))) {
            o.mode = !strcmp(v, "routed") ? MOAS_MODE_ROUTED : MOAS_MODE_MIXTURE;
        } else if (!strcmp(a, "--kv-type") && (!strcmp(v, "f32") || !strcmp(v, "f16") ||
                                               !strcmp(v, "q8_0"))) {
            o.kv_type = !strcmp(v, "f32") ? MOAS_TYPE_F32
                        : !strcmp(v, "f16") ? MOAS_TYPE_F16
                                            : MOAS_TYPE_Q8_0;
        } else {
            usage();
        }
    }
    if (o.model == NULL || n_builds < 2 || o.depth < 0 || o.n_gen < 1 || o.rounds < 1 ||
        o.rounds > MAX_ROUNDS || o.seqs < 0 || o.seqs > MAX_SEQS || o.threads < 0) {
        usage();
    }
    const int n_seq = o.seqs > 0 ? o.seqs : 1;
    int32_t *tokens = malloc(sizeof *tokens * (size_t)n_seq * (size_t)(o.depth + o.n_gen));
    static double seconds[MAX_BUILDS][MAX_ROUNDS];
    if (tokens == NULL) {
        return 1;
    }
    for (int k = 0; k < n_builds; k++) {
        bind(&builds[k]);
    }
    for (int k = 0; k < n_builds; k++) {
        builds[k].forced = builds[k].forced == -2 ? o.forced : builds[k].forced;
    }
    moas_model *probe = NULL;
    if (builds[0].model_load(o.model, NULL, &probe) != MOAS_OK) {
        fail(&builds[0], "load");
    }
    const size_t n_all = (size_t)n_seq * (size_t)(o.depth + o.n_gen);
    if (o.text == NULL) {   /* the tokens `moas bench` draws (an LCG's high bits) */
        const uint32_t vocab = (uint32_t)builds[0].n_vocab(probe);
        uint32_t seed = 12345;
        for (size_t i = 0; i < n_all; i++) {
            seed = seed * 1664525u + 1013904223u;
            tokens[i] = (int32_t)((seed >> 8) % vocab);
        }
    } else {
        text_tokens(&builds[0], probe, &o, tokens);
    }
    builds[0].model_free(probe);
    for (int k = 0; k < n_builds; k++) {
        prepare(&builds[k], &o, tokens);
    }
    for (int r = 0; r < o.rounds; r++) {
        for (int i = 0; i < n_builds; i++) {
            const int k = r % 2 ? n_builds - 1 - i : i;
            seconds[k][r] = round_seconds(&builds[k], &o, tokens);
        }
    }
    const int lo = o.rounds / 10, hi = o.rounds - 1 - o.rounds / 10;
    for (int k = 0; k < n_builds; k++) {
        double speed[MAX_ROUNDS], ratio[MAX_ROUNDS];
        for (int r = 0; r < o.rounds; r++) {
            speed[r] = (double)o.n_gen * n_seq / seconds[k][r];
            ratio[r] = seconds[0][r] / seconds[k][r];
        }
        qsort(speed, (size_t)o.rounds, sizeof *speed, cmp_double);
        qsort(ratio, (size_t)o.rounds, sizeof *ratio, cmp_double);
        printf("%s: %.0f tokens/s; against the first %.3f (%.3f-%.3f)\n", builds[k].arg,
               speed[o.rounds / 2], ratio[o.rounds / 2], ratio[lo], ratio[hi]);
    }
    free(tokens);
    return 0;
}
