/*
 * test_concurrency.c - one model, several threads: the model is read-only once loaded,
 * so contexts on different threads compute exactly what they would alone, and each
 * thread keeps its own moas_last_error(). An abort flag set by another thread stops
 * a decode.
 *
 * Also the team of threads a forward call runs its parallel steps on (team.h).
 *
 * Uses POSIX threads, as the library's teams do; `make tsan` runs these under
 * ThreadSanitizer, which checks the team's atomics and its sleeping and waking.
 */
#if defined(__linux__)
#define _GNU_SOURCE   /* syscall(), for futex.h; pthread_getattr_np() */
#endif

#include "test.h"
#include "futex.h"
#include "team.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>


#define N_THREADS 4
#define N_ROUNDS 3
#define N_GENERATE 8

static const char *shared_model = "tiny-moas-bias.gguf";

/* What one stream computes: every logit row, the routes, KV bytes, sampled tokens. */
typedef struct {
    const moas_model *model;
    const char *text;       /* all of tiny.txt */
    size_t text_len;
    int32_t slice;          /* which part of the text this stream decodes */
    int32_t n_tokens;       /* tokens of the slice decoded (n_ctx - N_GENERATE) */
    float *logits;          /* [n_tokens][n_vocab] */
    float *gates;           /* [n_ctx][n_layer][n_scheme] */
    int32_t *schemes;       /* [n_ctx][n_layer] */
    float *final_logits;    /* [n_vocab] after truncate and re-decode */
    int32_t generated[N_GENERATE];
    size_t kv_used;
    char error[512];        /* empty, or what went wrong */
} stream;

static void stream_fail(stream *s, const char *what) {
    if (s->error[0] == '\0') {
        snprintf(s->error, sizeof s->error, "slice %d: %s: %s", (int)s->slice, what,
                 moas_last_error());
    }
}

/* Decode one slice of the text, several times over, through every kind of call: a
 * batch, single tokens, sampling, routes, truncate and re-decode. Each round must
 * repeat the first exactly. Runs on whatever thread calls it. */
static void run_stream(stream *s) {
    const moas_model *m = s->model;
    const int32_t n_vocab = moas_model_n_vocab(m), n_layer = moas_model_n_layer(m);
    const int32_t n_scheme = moas_model_n_scheme(m);
    const int32_t n_ctx = moas_model_n_ctx_train(m);
    const int32_t n = n_ctx - N_GENERATE, half = n / 2;
    moas_context_params cp;
    moas_sampler_params sp;
    moas_context *ctx = NULL;
    moas_sampler *smp = NULL;
    size_t n_all = 0;
    int32_t *all = malloc(s->text_len * sizeof *all);
    const size_t n_logits = (size_t)n * n_vocab, n_routes = (size_t)n_ctx * n_layer;
    float *logits = malloc(n_logits * sizeof *logits);
    float *gates = malloc(n_routes * n_scheme * sizeof *gates);
    int32_t *schemes = malloc(n_routes * sizeof *schemes);
    float *final_logits = malloc((size_t)n_vocab * sizeof *final_logits);
    int32_t generated[N_GENERATE];

    s->n_tokens = n;
    s->logits = malloc(n_logits * sizeof *s->logits);
    s->gates = malloc(n_routes * n_scheme * sizeof *s->gates);
    s->schemes = malloc(n_routes * sizeof *s->schemes);
    s->final_logits = malloc((size_t)n_vocab * sizeof *s->final_logits);
    if (!all || !logits || !gates || !schemes || !final_logits || !s->logits || !s->gates ||
        !s->schemes || !s->final_logits) {
        stream_fail(s, "out of memory");
        goto done;
    }

    /* the tokenizer is shared too: each thread tokenizes the whole text itself */
    if (moas_tokenize(m, s->text, s->text_len, all, s->text_len, &n_all) != MOAS_OK) {
        stream_fail(s, "tokenize");
        goto done;
    }
    const size_t start = (size_t)s->slice * (n_all - (size_t)n) / (N_THREADS - 1);
    const int32_t *tokens = all + start;

    moas_context_params_init(&cp);
    cp.n_threads = 1;
    moas_sampler_params_init(&sp);
    sp.temperature = 0.8f;
    sp.top_k = 10;
    sp.seed = 1000u + (uint64_t)s->slice;
    if (moas_context_create(m, &cp, &ctx) != MOAS_OK ||
        moas_sampler_create(&sp, n_vocab, &smp) != MOAS_OK) {
        stream_fail(s, "create");
        goto done;
    }
    for (int round = 0; round < N_ROUNDS; round++) {
        moas_context_reset(ctx);
        moas_sampler_reseed(smp, sp.seed);
        /* the first half as a batch, the rest one token at a time */
        if (moas_context_decode_batch(ctx, tokens, half, logits, MOAS_LOGITS_ALL) != MOAS_OK) {
            stream_fail(s, "decode_batch");
            break;
        }
        for (int32_t i = half; i < n; i++) {
            if (moas_context_decode(ctx, tokens[i], logits + (size_t)i * n_vocab) != MOAS_OK) {
                stream_fail(s, "decode");
                break;
            }
        }
        /* then generate to the end of the context */
        for (int i = 0; i < N_GENERATE && s->error[0] == '\0'; i++) {
            if (moas_sampler_sample(smp, moas_context_logits(ctx), &generated[i]) != MOAS_OK ||
                moas_context_decode(ctx, generated[i], NULL) != MOAS_OK) {
                stream_fail(s, "generate");
            }
        }
        if (s->error[0] != '\0' ||
            moas_context_routes(ctx, 0, n_ctx, gates, schemes, NULL) != MOAS_OK) {
            stream_fail(s, "routes");
            break;
        }
        const size_t kv_used = moas_context_kv_bytes_used(ctx, -1);
        /* back to a third, and the rest of the text again as one batch */
        if (moas_context_truncate(ctx, n / 3) != MOAS_OK ||
            moas_context_decode_batch(ctx, tokens + n / 3, n - n / 3, NULL, MOAS_LOGITS_LAST) !=
                MOAS_OK) {
            stream_fail(s, "truncate and re-decode");
            break;
        }
        memcpy(final_logits, moas_context_logits(ctx), (size_t)n_vocab * sizeof *final_logits);

        if (round == 0) {
            memcpy(s->logits, logits, n_logits * sizeof *logits);
            memcpy(s->gates, gates, n_routes * n_scheme * sizeof *gates);
            memcpy(s->schemes, schemes, n_routes * sizeof *schemes);
            memcpy(s->final_logits, final_logits, (size_t)n_vocab * sizeof *final_logits);
            memcpy(s->generated, generated, sizeof generated);
            s->kv_used = kv_used;
        } else if (memcmp(s->logits, logits, n_logits * sizeof *logits) != 0 ||
                   memcmp(s->gates, gates, n_routes * n_scheme * sizeof *gates) != 0 ||
                   memcmp(s->schemes, schemes, n_routes * sizeof *schemes) != 0 ||
                   memcmp(s->final_logits, final_logits, (size_t)n_vocab * sizeof(float)) != 0 ||
                   memcmp(s->generated, generated, sizeof generated) != 0 ||
                   s->kv_used != kv_used) {
            stream_fail(s, "a later round differs from the first");
        }
        /* re-decoding after a truncate gives the uninterrupted run's last logits */
        if (memcmp(final_logits, logits + (size_t)(n - 1) * n_vocab,
                   (size_t)n_vocab * sizeof *final_logits) != 0) {
            stream_fail(s, "truncate + re-decode differs from the uninterrupted run");
        }
    }
done:
    moas_sampler_free(smp);
    moas_context_free(ctx);
    free(all);
    free(logits);
    free(gates);
    free(schemes);
    free(final_logits);
}

static void stream_free(stream *s) {
    free(s->logits);
    free(s->gates);
    free(s->schemes);
    free(s->final_logits);
}

static pthread_barrier_t start_line;

static void *stream_thread(void *arg) {
    pthread_barrier_wait(&start_line);   /* all four decode at the same time */
    run_stream(arg);
    return NULL;
}

static char *read_text(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    char *buf = malloc(4096);
    *len = 0;
    if (f != NULL && buf != NULL) {
        *len = fread(buf, 1, 4096, f);
    }
    if (f != NULL) {
        fclose(f);
    }
    return buf;
}

/* Four threads, each with its own context on one shared model, decode four different
 * slices of tiny.txt at the same time: every logit, gate, route, sampled token and KV
 * count is bitwise what the same four streams give one after another on this thread. */
TEST(concurrency_shared_model_matches_sequential) {
    moas_model *model;
    stream seq[N_THREADS], par[N_THREADS];
    pthread_t threads[N_THREADS];
    size_t text_len;
    char *text = read_text(test_data("tiny.txt"), &text_len);

    ASSERT_TRUE(text != NULL && text_len > 300);
    ASSERT_OK(moas_model_load(test_data(shared_model), NULL, &model));
    const int32_t n_vocab = moas_model_n_vocab(model), n_layer = moas_model_n_layer(model);
    const int32_t n_ctx = moas_model_n_ctx_train(model);
    ASSERT_TRUE(n_ctx > N_GENERATE + 8);

    memset(seq, 0, sizeof seq);
    memset(par, 0, sizeof par);
    for (int t = 0; t < N_THREADS; t++) {
        seq[t].model = par[t].model = model;
        seq[t].text = par[t].text = text;
        seq[t].text_len = par[t].text_len = text_len;
        seq[t].slice = par[t].slice = t;
    }
    for (int t = 0; t < N_THREADS; t++) {
        run_stream(&seq[t]);
        if (seq[t].error[0] != '\0') {
            test_report(__FILE__, __LINE__, "sequential", "%s", seq[t].error);
            return TEST_FAIL;
        }
    }

    ASSERT_EQ(pthread_barrier_init(&start_line, NULL, N_THREADS), 0);
    for (int t = 0; t < N_THREADS; t++) {
        ASSERT_EQ(pthread_create(&threads[t], NULL, stream_thread, &par[t]), 0);
    }
    for (int t = 0; t < N_THREADS; t++) {
        ASSERT_EQ(pthread_join(threads[t], NULL), 0);
    }
    pthread_barrier_destroy(&start_line);

    for (int t = 0; t < N_THREADS; t++) {
        const stream *a = &seq[t], *b = &par[t];
        const size_t n_routes = (size_t)n_ctx * n_layer;
        if (b->error[0] != '\0') {
            test_report(__FILE__, __LINE__, "concurrent", "%s", b->error);
            return TEST_FAIL;
        }
        ASSERT_TRUE(memcmp(a->logits, b->logits, (size_t)a->n_tokens * n_vocab * sizeof(float)) == 0);
        ASSERT_TRUE(memcmp(a->gates, b->gates,
                           n_routes * moas_model_n_scheme(model) * sizeof(float)) == 0);
        ASSERT_TRUE(memcmp(a->schemes, b->schemes, n_routes * sizeof(int32_t)) == 0);
        ASSERT_TRUE(memcmp(a->final_logits, b->final_logits, (size_t)n_vocab * sizeof(float)) == 0);
        ASSERT_TRUE(memcmp(a->generated, b->generated, sizeof a->generated) == 0);
        ASSERT_EQ(a->kv_used, b->kv_used);
        /* and the streams really differ from each other */
        if (t > 0) {
            ASSERT_TRUE(memcmp(seq[0].logits, a->logits, (size_t)n_vocab * sizeof(float)) != 0);
        }
    }
    for (int t = 0; t < N_THREADS; t++) {
        stream_free(&seq[t]);
        stream_free(&par[t]);
    }
    moas_model_free(model);
    free(text);
    return TEST_PASS;
}

/* ---- an abort flag set from another thread --------------------------------------- */

/* A UI's cancel button: the decode runs on one thread, and another sets a flag that the
 * decode's abort callback reads. */
typedef struct {
    moas_context *ctx;
    const int32_t *tokens;
    int32_t n_tokens;
    atomic_int started;   /* the callback was asked: the decode is inside */
    atomic_int stop;      /* set by the other thread */
    int32_t asked;        /* the decoding thread's own count */
    moas_status status;
} cancel_probe;

enum { CANCEL_WAIT_AT = 8 };   /* the ask by which the flag has surely been seen */

static int32_t read_cancel_flag(void *user) {
    cancel_probe *p = user;
    atomic_store_explicit(&p->started, 1, memory_order_release);
    if (++p->asked == CANCEL_WAIT_AT) {
        /* the flag is set in the middle of the call, not after it: wait for it here
         * (the other thread sets it as soon as it sees `started`), at most 30 s */
        for (int i = 0; i < 30000 && !atomic_load_explicit(&p->stop, memory_order_acquire);
             i++) {
            nanosleep(&(struct timespec){0, 1000000}, NULL);
        }
    }
    return atomic_load_explicit(&p->stop, memory_order_acquire);
}

static void *decode_until_cancelled(void *arg) {
    cancel_probe *p = arg;
    p->status = moas_context_decode_batch(p->ctx, p->tokens, p->n_tokens, NULL,
                                          MOAS_LOGITS_LAST);
    return NULL;
}

/* While one thread decodes a long prompt in one-token blocks (two asks each), another
 * sets the flag its abort callback reads: the decode returns MOAS_ERR_ABORTED having
 * been asked no more than CANCEL_WAIT_AT times, the context as before it (position,
 * bytes, routing), and the same decode afterwards gives the bits of a context never
 * stopped. Under `make tsan` the flag's handover, and the decode's threads, are checked. */
TEST(concurrency_abort_flag_set_by_another_thread_stops_a_decode) {
    moas_model *model;
    ASSERT_OK(moas_model_load(test_data(shared_model), NULL, &model));
    const int32_t n_vocab = moas_model_n_vocab(model), n_layer = moas_model_n_layer(model);
    const int32_t n_ctx = moas_model_n_ctx_train(model);
    const int32_t n_prompt = 4, n_tokens = n_ctx - n_prompt;
    ASSERT_TRUE(n_tokens * n_layer > 4 * CANCEL_WAIT_AT);   /* stopped well before the end */
    int32_t *tokens = malloc((size_t)n_ctx * sizeof *tokens);
    ASSERT_TRUE(tokens != NULL);
    for (int32_t i = 0; i < n_ctx; i++) {
        tokens[i] = (i * 7 + 3) % n_vocab;
    }
    moas_context_params cp;
    moas_context_params_init(&cp);
    cp.mode = MOAS_MODE_ROUTED;
    cp.n_threads = 2;
    cp.n_batch = 1;   /* a block per token: many asks */
    moas_context *ctx, *never;
    ASSERT_OK(moas_context_create(model, &cp, &ctx));
    ASSERT_OK(moas_context_create(model, &cp, &never));
    ASSERT_OK(moas_context_decode_batch(ctx, tokens, n_prompt, NULL, MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(never, tokens, n_prompt, NULL, MOAS_LOGITS_LAST));
    const size_t used = moas_context_kv_bytes_used(ctx, -1);
    int32_t counts[8] = {0}, counts_after[8] = {0};
    ASSERT_TRUE(moas_model_n_scheme(model) <= 8);
    ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts));

    cancel_probe p = {ctx, tokens + n_prompt, n_tokens, 0, 0, 0, MOAS_OK};
    moas_context_set_abort_callback(ctx, read_cancel_flag, &p);
    pthread_t decoder;
    ASSERT_EQ(pthread_create(&decoder, NULL, decode_until_cancelled, &p), 0);
    while (!atomic_load_explicit(&p.started, memory_order_acquire)) {
        nanosleep(&(struct timespec){0, 100000}, NULL);
    }
    atomic_store_explicit(&p.stop, 1, memory_order_release);   /* the cancel button */
    ASSERT_EQ(pthread_join(decoder, NULL), 0);

    ASSERT_EQ(p.status, MOAS_ERR_ABORTED);
    ASSERT_TRUE(p.asked >= 1 && p.asked <= CANCEL_WAIT_AT);
    ASSERT_EQ(moas_context_n_past(ctx), n_prompt);
    ASSERT_EQ(moas_context_kv_bytes_used(ctx, -1), used);
    ASSERT_OK(moas_context_scheme_counts(ctx, -1, counts_after));
    ASSERT_TRUE(memcmp(counts, counts_after, sizeof counts) == 0);
    ASSERT_TRUE(moas_context_logits(ctx) == NULL);

    /* the flag cleared, the same decode on this thread: the bits of the other */
    atomic_store(&p.stop, 0);
    p.asked = -1000000;   /* no waiting this time */
    ASSERT_OK(moas_context_decode_batch(ctx, tokens + n_prompt, n_tokens, NULL,
                                        MOAS_LOGITS_LAST));
    ASSERT_OK(moas_context_decode_batch(never, tokens + n_prompt, n_tokens, NULL,
                                        MOAS_LOGITS_LAST));
    ASSERT_TRUE(memcmp(moas_context_logits(ctx), moas_context_logits(never),
                       (size_t)n_vocab * sizeof(float)) == 0);
    moas_context_free(ctx);
    moas_context_free(never);
    moas_model_free(model);
    free(tokens);
    return TEST_PASS;
}

/* ---- per-thread last error ------------------------------------------------------- */

typedef struct {
    const moas_model *model;
    int id;
    char seen_first[512];   /* this thread's message before it failed */
    char mine[512];         /* the message of its own failure */
    char after[512];        /* its message after the other thread failed */
    int failed_as_expected;
} error_probe;

static pthread_barrier_t turn;

/* Thread 0 fails first, then waits while thread 1 fails with another message; each
 * must keep seeing its own. Every thread passes every barrier, whatever happens. */
static void *error_thread(void *arg) {
    error_probe *p = arg;
    int32_t tokens[4];
    size_t n;

    snprintf(p->seen_first, sizeof p->seen_first, "%s", moas_last_error());
    if (p->id == 0) {
        moas_context *ctx = NULL;
        if (moas_context_create(p->model, NULL, &ctx) == MOAS_OK) {
            p->failed_as_expected = moas_context_decode(ctx, -5, NULL) == MOAS_ERR_INVALID_ARG;
            moas_context_free(ctx);   /* success: leaves the message alone */
        }
        snprintf(p->mine, sizeof p->mine, "%s", moas_last_error());
    }
    pthread_barrier_wait(&turn);
    if (p->id == 1) {
        p->failed_as_expected =
            moas_tokenize(p->model, "And Q", (size_t)-1, tokens, 4, &n) == MOAS_ERR_UNKNOWN_CHAR;
        snprintf(p->mine, sizeof p->mine, "%s", moas_last_error());
    }
    pthread_barrier_wait(&turn);
    snprintf(p->after, sizeof p->after, "%s", moas_last_error());
    return NULL;
}

TEST(concurrency_last_error_is_per_thread) {
    moas_model *model;
    error_probe probes[2];
    pthread_t threads[2];
    moas_model *none = NULL;

    ASSERT_OK(moas_model_load(test_data(shared_model), NULL, &model));
    /* this thread's own failure, which the others must not disturb */
    ASSERT_STATUS(moas_model_load("/nonexistent/concurrency.gguf", NULL, &none), MOAS_ERR_IO);
    char main_message[512];
    snprintf(main_message, sizeof main_message, "%s", moas_last_error());

    memset(probes, 0, sizeof probes);
    ASSERT_EQ(pthread_barrier_init(&turn, NULL, 2), 0);
    for (int t = 0; t < 2; t++) {
        probes[t].model = model;
        probes[t].id = t;
        ASSERT_EQ(pthread_create(&threads[t], NULL, error_thread, &probes[t]), 0);
    }
    for (int t = 0; t < 2; t++) {
        ASSERT_EQ(pthread_join(threads[t], NULL), 0);
    }
    pthread_barrier_destroy(&turn);

    for (int t = 0; t < 2; t++) {
        ASSERT_STR_EQ(probes[t].seen_first, "");    /* a new thread starts clean */
        ASSERT_TRUE(probes[t].failed_as_expected);
        ASSERT_STR_EQ(probes[t].after, probes[t].mine);   /* unchanged by the other */
    }
    ASSERT_TRUE(strstr(probes[0].mine, "-5") != NULL);
    ASSERT_TRUE(strstr(probes[1].mine, "'Q'") != NULL);
    ASSERT_STR_EQ(moas_last_error(), main_message);
    moas_model_free(model);
    return TEST_PASS;
}

/* ---- the team of a forward call ----------------------------------------------------- */

#define TEAM_MAX 8
#define TEAM_SLICES_MAX (MOAS_TEAM_SLICES_PER_THREAD * TEAM_MAX)
#define TEAM_STEPS 2000

/* What a team's steps did: each slice adds step + ith to its own total. */
typedef struct {
    moas_team team;
    int32_t step;
    int64_t total[TEAM_SLICES_MAX];
    int32_t nth_seen[TEAM_SLICES_MAX];
    int32_t nth;        /* the team's size, as the leader saw it */
    bool ok;            /* every total was right as each step returned */
} team_probe;

static void team_probe_slice(void *arg, int32_t ith, int32_t nth) {
    team_probe *p = arg;
    p->total[ith] += p->step + ith;
    p->nth_seen[ith] = nth;
}

/* The leader's body: TEAM_STEPS parallel steps, each checked as it returns (a slice's
 * writes must be visible then), with a serial step (parallel = false) every 10th. The
 * steps' slices change from step to step: as many as threads, more (up to
 * MOAS_TEAM_SLICES_PER_THREAD a thread), and asked for fewer or more than a step may
 * have; so a thread still on an earlier step must claim nothing of a later one. */
static void team_probe_body(void *arg) {
    team_probe *p = arg;
    int64_t want[TEAM_SLICES_MAX] = {0};
    p->ok = true;
    p->nth = p->team.nth;
    const int32_t most = MOAS_TEAM_SLICES_PER_THREAD * p->nth;
    for (p->step = 0; p->step < TEAM_STEPS; p->step++) {
        const bool parallel = p->step % 10 != 0;
        const int32_t asked = p->step % 4 == 0 ? 1
                              : p->step % 4 == 1 ? 2 * p->nth + 1
                              : p->step % 4 == 2 ? most + 5
                                                 : p->nth;
        const int32_t slices = !parallel || p->nth == 1 ? 1
                               : asked < p->nth         ? p->nth
                               : asked > most           ? most
                                                        : asked;
        memset(p->nth_seen, 0, sizeof p->nth_seen);
        if (p->step % 8 == 3) {
            moas__team_run(&p->team, parallel, team_probe_slice, p);
        } else {
            moas__team_run_slices(&p->team, parallel, team_probe_slice, p, asked);
        }
        for (int32_t i = 0; i < slices; i++) {
            want[i] += p->step + i;
        }
        for (int32_t i = 0; i < TEAM_SLICES_MAX; i++) {
            p->ok = p->ok && p->total[i] == want[i] && p->nth_seen[i] == (i < slices ? slices : 0);
        }
    }
}

/* Teams of 3, 8 and 2 (8: more threads than the test machine's cores, so some are
 * preempted between steps and the others take their slices) run every slice of every
 * step exactly once, as many slices as the step has, and hand the leader their
 * results. One team serves every call, as a context's does from call to call,
 * whatever each call's size: its workers stay, a call's claims start from what the
 * calls before left, and workers numbered past a smaller call's size sit it out. */
TEST(team_runs_every_slice_of_every_step_once) {
    static const int32_t sizes[] = {3, 8, 3, 8, 2, 8};
    team_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;   /* a late team must not send the next calls to the leader */
    for (size_t round = 0; round < sizeof sizes / sizeof sizes[0]; round++) {
        memset(p->total, 0, sizeof p->total);
        moas__team_lead(&p->team, sizes[round], team_probe_body, p);
        ASSERT_EQ(p->nth, sizes[round]);
        ASSERT_TRUE(p->ok);
        ASSERT_EQ(p->team.nth, 1);   /* outside a call, steps run on the caller */
        ASSERT_EQ(p->team.n_workers, round == 0 ? 2 : 7);   /* started once, kept */
    }
    moas__team_end(&p->team);
    ASSERT_EQ(p->team.n_workers, 0);
    free(p);
    return TEST_PASS;
}

/* Two callers, each in a thread of their own OpenMP region (a program that embeds the
 * library may have one), lead their own teams at once, as two contexts decoding on
 * two threads do: each team's steps stay its own. */
TEST(team_leaders_in_a_parallel_region_keep_their_steps_apart) {
    team_probe *p = calloc(2, sizeof *p);
    ASSERT_TRUE(p != NULL);
#if defined(_OPENMP)
#pragma omp parallel for num_threads(2)
#endif
    for (int i = 0; i < 2; i++) {
        moas__team_lead(&p[i].team, 2, team_probe_body, &p[i]);
    }
    for (int i = 0; i < 2; i++) {
        ASSERT_TRUE(p[i].ok);
        ASSERT_EQ(p[i].nth, 2);
        moas__team_end(&p[i].team);
    }
    free(p);
    return TEST_PASS;
}

/* Workers that find no step for a while sleep (a futex on Linux) and are woken by the
 * next step: a body that pauses 2 ms before every 100th step puts them to sleep 20
 * times, and every slice of every step still runs exactly once. */
static void team_sleepy_body(void *arg) {
    team_probe *p = arg;
    int64_t want[TEAM_MAX] = {0};
    p->ok = true;
    p->nth = p->team.nth;
    for (p->step = 0; p->step < TEAM_STEPS; p->step++) {
        if (p->step % 100 == 0) {
            const struct timespec pause = {0, 2000000};
            nanosleep(&pause, NULL);
        }
        memset(p->nth_seen, 0, sizeof p->nth_seen);
        moas__team_run(&p->team, true, team_probe_slice, p);
        for (int32_t i = 0; i < p->nth; i++) {
            want[i] += p->step + i;
        }
        for (int32_t i = 0; i < TEAM_MAX; i++) {
            p->ok = p->ok && p->total[i] == want[i] && p->nth_seen[i] == (i < p->nth ? p->nth : 0);
        }
    }
}

TEST(team_workers_that_sleep_still_run_every_slice_once) {
    team_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    moas__team_lead(&p->team, 3, team_sleepy_body, p);
    ASSERT_TRUE(p->ok);
    ASSERT_EQ(p->nth, 3);
    moas__team_end(&p->team);
    free(p);
    return TEST_PASS;
}

/* Between calls the workers sleep instead of spinning: after a call of a team of 3,
 * both workers are soon asleep (each counted in `sleepers` just before it sleeps), and
 * over the next 100 ms their CPU clocks advance by under 5 ms all told; the next
 * call wakes them (a worker runs one of its slices) and runs with the same threads.
 * A worker that kept spinning (as a threading runtime's workers do for milliseconds
 * to hundreds of milliseconds after a parallel region) would spend the whole 100 ms
 * on a core. */
static int64_t clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A step whose slice 0, the leader's, waits (at most 2 s) for a worker to run one of
 * the others: only a worker woken by the step's post can. */
typedef struct {
    moas_team *team;
    pthread_t leader;
    atomic_int on_worker;
} wake_probe;

static void wait_for_flag(atomic_int *flag);

static void wake_slice(void *arg, int32_t ith, int32_t nth) {
    wake_probe *w = arg;
    (void)nth;
    if (ith == 0) {
        wait_for_flag(&w->on_worker);
    } else if (!pthread_equal(pthread_self(), w->leader)) {
        atomic_store(&w->on_worker, 1);
    }
}

static void wake_body(void *arg) {
    wake_probe *w = arg;
    w->leader = pthread_self();
    moas__team_run(w->team, true, wake_slice, w);
}

TEST(team_workers_sleep_between_calls) {
    team_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;
    for (int call = 0; call < 2; call++) {
        memset(p->total, 0, sizeof p->total);
        moas__team_lead(&p->team, 3, team_probe_body, p);
        ASSERT_TRUE(p->ok);
        ASSERT_EQ(p->nth, 3);
        ASSERT_EQ(p->team.n_workers, 2);
        const struct timespec ms = {0, 1000000};
        for (int i = 0; i < 2000 && atomic_load(&p->team.sleepers) < 2; i++) {
            nanosleep(&ms, NULL);
        }
        ASSERT_EQ(atomic_load(&p->team.sleepers), 2);
        clockid_t clocks[2];
        int64_t before = 0, after = 0;
        for (int w = 0; w < 2; w++) {
            ASSERT_EQ(pthread_getcpuclockid(p->team.threads[w], &clocks[w]), 0);
            before += clock_ns(clocks[w]);
        }
        const struct timespec tenth = {0, 100000000};
        nanosleep(&tenth, NULL);
        for (int w = 0; w < 2; w++) {
            after += clock_ns(clocks[w]);
        }
        ASSERT_TRUE(after - before < 5000000);
        wake_probe w = {.team = &p->team};   /* asleep, they wake for the next call */
        moas__team_lead(&p->team, 3, wake_body, &w);
        ASSERT_EQ(atomic_load(&w.on_worker), 1);
    }
    moas__team_end(&p->team);
    ASSERT_EQ(p->team.n_workers, 0);
    ASSERT_EQ(atomic_load(&p->team.sleepers), 0);   /* woken and gone */
    free(p);
    return TEST_PASS;
}

/* A leader waiting for a long slice another thread runs sleeps instead of yielding
 * its core in a loop: a worker runs slice 1, 60 ms of napping, while the leader's own
 * slice ends as soon as that has begun; the leader's CPU time across the step stays a
 * few milliseconds (spins and yields first), where it was about the whole wait. */
#if defined(MOAS_HAVE_FUTEX)   /* elsewhere the leader yields through the slice */
typedef struct {
    moas_team team;
    int64_t leader_cpu_ns;
    int32_t nth;
    atomic_int long_started;   /* slice 1 has begun, on a worker */
    pthread_t leader;
    bool long_on_worker;
} long_slice_probe;

static int64_t thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Slice 0 (the leader's own) naps until a worker has begun slice 1, at most 2 s, so
 * that the leader does not take slice 1 itself; slice 1 naps 60 ms. */
static void long_slice(void *arg, int32_t ith, int32_t nth) {
    long_slice_probe *p = arg;
    (void)nth;
    const struct timespec ms = {0, 1000000}, long_nap = {0, 60000000};
    if (ith == 0) {
        for (int i = 0; i < 2000 && !atomic_load(&p->long_started); i++) {
            nanosleep(&ms, NULL);
        }
        return;
    }
    p->long_on_worker = !pthread_equal(pthread_self(), p->leader);
    atomic_store(&p->long_started, 1);
    nanosleep(&long_nap, NULL);
}

static void long_slice_body(void *arg) {
    long_slice_probe *p = arg;
    p->nth = p->team.nth;
    p->leader = pthread_self();
    const int64_t t0 = thread_cpu_ns();
    moas__team_run(&p->team, true, long_slice, p);
    p->leader_cpu_ns = thread_cpu_ns() - t0;
}
#endif

TEST(team_leader_sleeps_through_a_long_slice) {
#if defined(MOAS_HAVE_FUTEX)
    long_slice_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;
    moas__team_lead(&p->team, 2, long_slice_body, p);
    moas__team_end(&p->team);
    ASSERT_EQ(p->nth, 2);
    ASSERT_TRUE(p->long_on_worker);   /* the leader waited for it */
    ASSERT_TRUE(p->leader_cpu_ns < 20000000);
    free(p);
    return TEST_PASS;
#else
    return test_skip("without futexes the leader yields through a long slice (team.c)");
#endif
}

/* A step cut into more slices than threads: a thread held up in a slice leaves its
 * later slices to the others, taken from the end of its share. Two threads, eight
 * slices (the worker's share 4-7): slice 4, on a worker, waits until slice 5 has run,
 * so the leader must have taken 7, 6 and 5 meanwhile; the leader's slice 0 first
 * waits for slice 4 to begin on a worker, so that the worker is there at all. Each
 * wait gives up after 2 s (the check then fails, or the test is skipped when no
 * worker came). */
typedef struct {
    moas_team team;
    int32_t nth;
    int32_t n_seen[8];       /* the slice count slice i was given */
    pthread_t leader;
    atomic_int started[8];   /* slice i has begun */
    atomic_int runs[8];      /* times slice i ran */
    bool on_leader[8];
} steal_probe;

static void wait_for_flag(atomic_int *flag) {
    const struct timespec ms = {0, 1000000};
    for (int i = 0; i < 2000 && !atomic_load(flag); i++) {
        nanosleep(&ms, NULL);
    }
}

static void steal_slice(void *arg, int32_t ith, int32_t nth) {
    steal_probe *p = arg;
    const bool leader = pthread_equal(pthread_self(), p->leader);
    p->n_seen[ith] = nth;
    p->on_leader[ith] = leader;
    atomic_store(&p->started[ith], 1);
    if (ith == 0) {
        wait_for_flag(&p->started[4]);
    } else if (ith == 4 && !leader) {
        wait_for_flag(&p->started[5]);
    }
    atomic_fetch_add(&p->runs[ith], 1);
}

static void steal_body(void *arg) {
    steal_probe *p = arg;
    p->nth = p->team.nth;
    p->leader = pthread_self();
    moas__team_run_slices(&p->team, true, steal_slice, p, 8);
}

TEST(team_leader_takes_a_held_up_threads_last_slices) {
    steal_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;
    moas__team_lead(&p->team, 2, steal_body, p);
    moas__team_end(&p->team);
    ASSERT_EQ(p->nth, 2);
    if (p->on_leader[4]) {   /* the worker came too late (a busy machine) */
        free(p);
        return TEST_SKIP;
    }
    for (int i = 0; i < 8; i++) {
        ASSERT_EQ(p->n_seen[i], 8);
        ASSERT_EQ(atomic_load(&p->runs[i]), 1);
    }
    for (int i = 0; i < 4; i++) {
        ASSERT_TRUE(p->on_leader[i]);
    }
    ASSERT_TRUE(p->on_leader[5] && p->on_leader[6] && p->on_leader[7]);
    free(p);
    return TEST_PASS;
}

/* A team's workers block every signal but those a fault raises, so that a signal for
 * the process reaches one of the host's own threads while a fault in a worker reaches
 * the host's handler (blocked, POSIX leaves it undefined and Linux kills the process
 * with the default action); the caller's mask is what it was once the call has started
 * them. A slice held on a worker (the leader's slice 0 waits at most 2 s for it) reads
 * that worker's mask, and with glibc its stack's size: 1 MiB, not `ulimit -s`'s. */
typedef struct {
    moas_team team;
    pthread_t leader;
    atomic_int on_worker;   /* slice 1 has run, on a worker */
    bool all_blocked;       /* that worker blocked each signal checked */
    bool faults_open;       /* and none of those a fault raises */
    size_t stack_bytes;     /* that worker's stack (glibc), else 0 */
} mask_probe;

static void mask_slice(void *arg, int32_t ith, int32_t nth) {
    mask_probe *p = arg;
    (void)nth;
    if (ith == 0) {
        wait_for_flag(&p->on_worker);
        return;
    }
    if (pthread_equal(pthread_self(), p->leader)) {
        return;
    }
    static const int sigs[] = {SIGINT, SIGTERM, SIGHUP, SIGUSR1, SIGUSR2, SIGALRM, SIGCHLD,
                               SIGPIPE};
    sigset_t mask;
    p->all_blocked = pthread_sigmask(SIG_BLOCK, NULL, &mask) == 0;
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        p->all_blocked = p->all_blocked && sigismember(&mask, sigs[i]) == 1;
    }
    static const int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
    p->faults_open = true;
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        p->faults_open = p->faults_open && sigismember(&mask, faults[i]) == 0;
    }
#if defined(__GLIBC__)
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        pthread_attr_getstacksize(&attr, &p->stack_bytes);
        pthread_attr_destroy(&attr);
    }
#endif
    atomic_store(&p->on_worker, 1);
}

static void mask_body(void *arg) {
    mask_probe *p = arg;
    p->leader = pthread_self();
    moas__team_run(&p->team, true, mask_slice, p);
}

TEST(team_workers_block_signals_but_faults) {
    mask_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;
    sigset_t before, after;
    ASSERT_EQ(pthread_sigmask(SIG_BLOCK, NULL, &before), 0);
    moas__team_lead(&p->team, 2, mask_body, p);
    ASSERT_EQ(pthread_sigmask(SIG_BLOCK, NULL, &after), 0);
    moas__team_end(&p->team);
    ASSERT_EQ(atomic_load(&p->on_worker), 1);
    ASSERT_TRUE(p->all_blocked);
    ASSERT_TRUE(p->faults_open);
#if defined(__GLIBC__)
    ASSERT_EQ(p->stack_bytes, (size_t)1 << 20);
#endif
    for (int sig = 1; sig < SIGRTMIN; sig++) {   /* the caller's own, unchanged */
        ASSERT_EQ(sigismember(&after, sig), sigismember(&before, sig));
    }
    free(p);
    return TEST_PASS;
}

/* A child of fork() has none of its parent's workers, only their bookkeeping: its
 * team starts threads of its own. Slice 0, the leader's, waits (at most 2 s) for
 * slice 1 to begin on another thread; a child that took the parent's workers for its
 * own would find none there and run slice 1 on the leader. The child's exit status
 * says; the parent's team is unchanged. (Skipped under TSan, which does not follow a
 * child of a threaded process that starts threads.) */
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_UNDER_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define TEST_UNDER_TSAN 1
#endif

#if !defined(TEST_UNDER_TSAN)
typedef struct {
    moas_team team;
    pthread_t leader;
    atomic_int other_started;   /* slice 1 has begun */
    bool other_on_worker;
    int32_t nth;
} fork_probe;

static void fork_slice(void *arg, int32_t ith, int32_t nth) {
    fork_probe *p = arg;
    (void)nth;
    if (ith == 0) {
        wait_for_flag(&p->other_started);
        return;
    }
    p->other_on_worker = !pthread_equal(pthread_self(), p->leader);
    atomic_store(&p->other_started, 1);
}

static void fork_body(void *arg) {
    fork_probe *p = arg;
    p->nth = p->team.nth;
    p->leader = pthread_self();
    p->other_on_worker = false;
    atomic_store(&p->other_started, 0);
    moas__team_run(&p->team, true, fork_slice, p);
}
#endif

TEST(team_in_a_child_of_fork_starts_its_own_threads) {
#if defined(TEST_UNDER_TSAN)
    return test_skip("TSan does not follow threads started in a child of a threaded process");
#else
    fork_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;
    moas__team_lead(&p->team, 2, fork_body, p);
    ASSERT_EQ(p->nth, 2);
    ASSERT_TRUE(p->other_on_worker);
    ASSERT_EQ(p->team.n_workers, 1);
    fflush(NULL);
    const pid_t child = fork();
    ASSERT_TRUE(child >= 0);
    if (child == 0) {
        alarm(20);   /* a child that hangs fails the test instead of holding it */
        moas__team_lead(&p->team, 2, fork_body, p);
        const bool ok = p->nth == 2 && p->other_on_worker && p->team.n_workers == 1;
        moas__team_end(&p->team);
        _exit(ok && p->team.n_workers == 0 ? 0 : 1);
    }
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0);
    moas__team_lead(&p->team, 2, fork_body, p);   /* the parent's own, still there */
    ASSERT_TRUE(p->other_on_worker);
    moas__team_end(&p->team);
    ASSERT_EQ(p->team.n_workers, 0);
    free(p);
    return TEST_PASS;
#endif
}

/* A thread that never comes (preempted for good, say) holds up nothing: the leader
 * claims every slice it left, its own share's first slice included. Here the team
 * has no workers at all (nth set by hand, none started), so the leader must run
 * each of the step's slices itself, exactly once, for teams of 2 to 8 and every
 * slice count they take. Should a slice be left unclaimed, a watchdog thread gives
 * up after 2 s, marks the step done so that the leader returns, and the test fails. */
typedef struct {
    moas_team team;
    int32_t runs[TEAM_SLICES_MAX];
    int32_t n_seen[TEAM_SLICES_MAX];
    atomic_int finished;     /* the leader returned from the step */
    atomic_int gave_up;      /* the watchdog released it */
} absent_probe;

static void absent_slice(void *arg, int32_t ith, int32_t nth) {
    absent_probe *p = arg;
    p->runs[ith]++;
    p->n_seen[ith] = nth;
}

static void *absent_leader(void *arg) {
    absent_probe *p = arg;
    moas__team_run_slices(&p->team, true, absent_slice, p, TEAM_SLICES_MAX);
    atomic_store(&p->finished, 1);
    return NULL;
}

TEST(team_leader_runs_every_slice_of_threads_that_never_come) {
    absent_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    for (int32_t nth = 2; nth <= TEAM_MAX; nth++) {
        const int32_t n = MOAS_TEAM_SLICES_PER_THREAD * nth;
        memset(p, 0, sizeof *p);
        p->team.nth = nth;   /* as moas__team_lead sets it, but no thread joins */
        p->team.max_slices = n;
        pthread_t leader;
        ASSERT_EQ(pthread_create(&leader, NULL, absent_leader, p), 0);
        const struct timespec ms = {0, 1000000};
        for (int i = 0; i < 2000 && !atomic_load(&p->finished); i++) {
            nanosleep(&ms, NULL);
        }
        if (!atomic_load(&p->finished)) {
            atomic_store(&p->gave_up, 1);
            atomic_store(&p->team.done, n);   /* let the leader out (it may sleep on done) */
#if defined(MOAS_HAVE_FUTEX)
            moas__futex_wake(&p->team.done, 1);
#endif
        }
        ASSERT_EQ(pthread_join(leader, NULL), 0);
        ASSERT_EQ(atomic_load(&p->gave_up), 0);
        for (int32_t i = 0; i < n; i++) {
            ASSERT_EQ(p->runs[i], 1);
            ASSERT_EQ(p->n_seen[i], n);
        }
    }
    free(p);
    return TEST_PASS;
}

/* A team is late when the leader lost more than the others saved it, by over 10 us;
 * the next calls then run alone, as many as teams that keep up (their gain averaged)
 * need to win the excess back, times a scale: 4x after each late team, half after
 * each team that kept up, at most 1024 calls. (Hand-computed; the judge is given
 * times, not measured.) */
TEST(team_judge_backs_off_and_recovers) {
    moas_team *team = calloc(1, sizeof *team);
    ASSERT_TRUE(team != NULL);
    /* a long memory-bound call: lost 2 ms waiting, the others saved 3 ms: gain 1 ms */
    ASSERT_TRUE(!moas__team_judge(team, 5000000, 2000000, 3000000));
    ASSERT_EQ(team->solo_left, 0);
    ASSERT_EQ(team->gain_ns, 1000000);
    /* lost 8 ms, saved 5 ms: 3 ms over, three calls' gain */
    ASSERT_TRUE(moas__team_judge(team, 6000000, 8000000, 5000000));
    ASSERT_EQ(team->solo_left, 3);
    ASSERT_EQ(team->solo_scale, 4);
    team->solo_left = 0;
    ASSERT_TRUE(!moas__team_judge(team, 5000000, 1000000, 3000000));   /* kept up */
    ASSERT_EQ(team->gain_ns, 1250000);                                  /* (3 + 2) / 4 */
    ASSERT_EQ(team->solo_scale, 2);
    ASSERT_TRUE(!moas__team_judge(team, 1000, 19000, 10000));   /* 9 us: too little */
    ASSERT_EQ(team->solo_left, 0);
    ASSERT_EQ(team->solo_scale, 1);
    free(team);

    /* short calls whose team gains 40 us and whose worker is preempted for 3 ms:
     * 2.96 ms / 40 us = 74 calls, then 4x, 16x, up to 1024 */
    team = calloc(1, sizeof *team);
    ASSERT_TRUE(team != NULL);
    ASSERT_TRUE(!moas__team_judge(team, 60000, 1000, 41000));
    ASSERT_EQ(team->gain_ns, 40000);
    ASSERT_TRUE(moas__team_judge(team, 60000, 3000000, 40000));
    ASSERT_EQ(team->solo_left, 74);
    ASSERT_TRUE(moas__team_judge(team, 60000, 3000000, 40000));
    ASSERT_EQ(team->solo_left, 296);
    ASSERT_TRUE(moas__team_judge(team, 60000, 3000000, 40000));
    ASSERT_EQ(team->solo_left, 1024);                      /* the most */
    ASSERT_EQ(team->solo_scale, 64);
    ASSERT_TRUE(!moas__team_judge(team, 60000, 1000, 41000));    /* kept up: half */
    ASSERT_EQ(team->gain_ns, 40000);
    ASSERT_EQ(team->solo_scale, 32);
    ASSERT_TRUE(moas__team_judge(team, 60000, 3000000, 40000));
    ASSERT_EQ(team->solo_left, 1024);
    ASSERT_EQ(team->solo_scale, 128);
    free(team);

    /* before any team kept up: the gain is what the others saved, or half the call
     * when they never came (the first call of a process starts its threads) */
    team = calloc(1, sizeof *team);
    ASSERT_TRUE(team != NULL);
    ASSERT_TRUE(moas__team_judge(team, 100000, 3000000, 50000));
    ASSERT_EQ(team->solo_left, 59);                        /* 2.95 ms / 50 us */
    free(team);
    team = calloc(1, sizeof *team);
    ASSERT_TRUE(team != NULL);
    ASSERT_TRUE(moas__team_judge(team, 16000000, 7600000, 0));
    ASSERT_EQ(team->solo_left, 1);                         /* 7.6 ms / 8 ms */
    free(team);
    return TEST_PASS;
}

/* Small calls run the faster of the leader alone and the team (hand-driven times, ns
 * per 1024 multiply-adds given as ns for work 1024): 16 calls with the team, then a
 * trial of 4 alone; the faster way stays, its calls before the next trial doubling;
 * the other way takes over only when 5% faster; a slow call in a group of 4 does not
 * count (the lowest of the 4 does). */
static void compare_calls(moas_team *t, int n, bool alone, int64_t ns, bool *ok) {
    for (int i = 0; i < n; i++) {
        *ok = *ok && moas__team_compare_alone(t) == alone;
        moas__team_compare_note(t, ns, 1024);
    }
}

TEST(team_compare_runs_small_calls_the_faster_way) {
    moas_team *t = calloc(1, sizeof *t);
    ASSERT_TRUE(t != NULL);
    bool ok = true;
    ASSERT_TRUE(!moas__team_compare_alone(t));   /* the team first */
    compare_calls(t, 16, false, 100, &ok);
    ASSERT_TRUE(ok && t->trial && t->phase_left == 4);
    compare_calls(t, 4, true, 150, &ok);          /* alone slower: the team stays */
    ASSERT_TRUE(ok && !t->alone && !t->trial);
    ASSERT_EQ(t->exploit_len, 32);
    ASSERT_EQ(t->best_rate[0], 150);
    ASSERT_EQ(t->best_rate[1], 100);
    compare_calls(t, 32, false, 100, &ok);
    compare_calls(t, 3, true, 90, &ok);
    compare_calls(t, 1, true, 400, &ok);          /* a preempted call: the group's lowest is 90 */
    ASSERT_TRUE(ok && t->alone);                  /* 90 <= 95% of 100: alone takes over */
    ASSERT_EQ(t->exploit_len, 16);
    compare_calls(t, 16, true, 90, &ok);
    compare_calls(t, 4, false, 86, &ok);          /* 4.4% faster: not enough */
    ASSERT_TRUE(ok && t->alone);
    ASSERT_EQ(t->exploit_len, 32);
    for (int len = 32; len < MOAS_TEAM_EXPLOIT_MAX; len *= 2) {   /* doubling, up to the most */
        compare_calls(t, len, true, 90, &ok);
        compare_calls(t, 4, false, 100, &ok);
        ASSERT_EQ(t->exploit_len, 2 * len);
    }
    compare_calls(t, MOAS_TEAM_EXPLOIT_MAX, true, 90, &ok);
    compare_calls(t, 4, false, 100, &ok);
    ASSERT_EQ(t->exploit_len, MOAS_TEAM_EXPLOIT_MAX);
    compare_calls(t, MOAS_TEAM_EXPLOIT_MAX, true, 120, &ok);   /* the host changed */
    compare_calls(t, 4, false, 100, &ok);
    ASSERT_TRUE(ok && !t->alone);
    ASSERT_EQ(t->exploit_len, 16);
    free(t);

    /* in moas__team_lead: a call the comparison sends alone runs on the leader (nth 1),
     * one it gives the team runs with it; calls of unknown or large work always do */
    team_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.call_work = 1000;
    p->team.trial = true;   /* the team's way, trying alone */
    moas__team_lead(&p->team, 3, team_probe_body, p);
    ASSERT_TRUE(p->ok);
    ASSERT_EQ(p->nth, 1);
    ASSERT_EQ(p->team.n_workers, 0);   /* a call run alone starts no thread */
    static const int64_t not_compared[] = {MOAS_TEAM_COMPARE_MAX_WORK + 1, 0};
    for (size_t i = 0; i < sizeof not_compared / sizeof not_compared[0]; i++) {
        p->team.call_work = not_compared[i];   /* large, then unknown: still trying alone */
        p->team.solo_left = 0;   /* the late-team judge's back-off, should the last team have
                                  * come late on a busy machine, is not what this checks */
        memset(p->total, 0, sizeof p->total);
        moas__team_lead(&p->team, 3, team_probe_body, p);
        ASSERT_TRUE(p->ok);
        ASSERT_EQ(p->nth, 3);
    }
    moas__team_end(&p->team);
    free(p);
    return TEST_PASS;
}

/* A team whose thread start was refused (pthread_create failing: no memory, a limit on
 * threads) runs with the threads it has and tries no more: none, and the call runs on
 * the leader alone; one, and a call of 4 runs as a team of 2, every slice once.
 * (The refusal is set by hand: nothing here can make pthread_create fail.) */
TEST(team_runs_with_the_threads_it_could_start) {
    team_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.never_solo = true;
    p->team.start_failed = true;
    moas__team_lead(&p->team, 3, team_probe_body, p);
    ASSERT_TRUE(p->ok);
    ASSERT_EQ(p->nth, 1);
    ASSERT_EQ(p->team.n_workers, 0);
    p->team.start_failed = false;
    memset(p->total, 0, sizeof p->total);
    moas__team_lead(&p->team, 2, team_probe_body, p);
    ASSERT_TRUE(p->ok);
    ASSERT_EQ(p->nth, 2);
    p->team.start_failed = true;   /* the next start is refused */
    memset(p->total, 0, sizeof p->total);
    moas__team_lead(&p->team, 4, team_probe_body, p);
    ASSERT_TRUE(p->ok);
    ASSERT_EQ(p->nth, 2);
    ASSERT_EQ(p->team.n_workers, 1);
    moas__team_end(&p->team);
    ASSERT_EQ(p->team.n_workers, 0);
    free(p);
    return TEST_PASS;
}

/* While solo_left counts down, a call runs on the leader alone (the same results:
 * slices depend only on (ith, nth)); then the team is tried again. */
TEST(team_runs_alone_while_backing_off) {
    for (int call = 0; call < 3; call++) {
        team_probe *p = calloc(1, sizeof *p);
        ASSERT_TRUE(p != NULL);
        p->team.solo_left = 2 - call;
        moas__team_lead(&p->team, 3, team_probe_body, p);
        moas__team_end(&p->team);
        ASSERT_TRUE(p->ok);
        ASSERT_EQ(p->nth, call < 2 ? 1 : 3);
        if (call < 2) {
            ASSERT_EQ(p->team.solo_left, 1 - call);
        }
        free(p);
    }
    /* a team that must never run alone (the tests' thread-count invariance) ignores it */
    team_probe *p = calloc(1, sizeof *p);
    ASSERT_TRUE(p != NULL);
    p->team.solo_left = 5;
    p->team.never_solo = true;
    moas__team_lead(&p->team, 3, team_probe_body, p);
    moas__team_end(&p->team);
    ASSERT_TRUE(p->ok);
    ASSERT_EQ(p->nth, 3);
    free(p);
    return TEST_PASS;
}
