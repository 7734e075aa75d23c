/*
 * spaced_decode.c - what a process spends on a library's threads when it decodes now
 * and then: one token every -g milliseconds, -n times, with -t threads.
 *
 *   build/tools/spaced_decode -m MODEL [-g GAP_MS] [-n CALLS] [-t THREADS] LIBMOAS.so
 *
 * The library is loaded with dlopen, so any build since 1.1 can be measured (`make
 * lib/libmoas.so.1.1.0` in a worktree of each). It prints the calls' median time and
 * the process's CPU time per call (user + system, all threads). CPU time is the
 * process's, so each build runs in a process of its own; alternate them (A B A B) in
 * a shell loop. A call's own work costs about its time times the threads that run it;
 * what the CPU time holds beyond that is threads waiting between calls: spinning
 * workers cost a core for as long as they spin, sleeping ones nothing.
 */
#include <moas.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

enum { MAX_CALLS = 100000 };

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1e-6;
}

static int compare_doubles(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void usage(void) {
    fprintf(stderr,
            "usage: spaced_decode -m MODEL [-g GAP_MS] [-n CALLS] [-t THREADS] LIBMOAS.so\n"
            "  -g  milliseconds between calls (10)   -n  calls (200)   -t  threads (2)\n");
    exit(2);
}

/* A whole decimal number, else the usage: "-n 20k" must not quietly make 20 calls. */
static long number(const char *text) {
    char *end;
    errno = 0;
    const long v = strtol(text, &end, 10);
    if (end == text || *end != '\0' || errno != 0) {
        usage();
    }
    return v;
}

static void *symbol(void *lib, const char *name) {
    void *p = dlsym(lib, name);
    if (p == NULL) {
        fprintf(stderr, "spaced_decode: the library has no %s\n", name);
        exit(1);
    }
    return p;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *lib_path = NULL;
    long gap_ms = 10, calls = 200, threads = 2;
    for (int i = 1; i < argc; i++) {
        const bool value = i + 1 < argc;
        if (strcmp(argv[i], "-m") == 0 && value) {
            model_path = argv[++i];
        } else if (strcmp(argv[i], "-g") == 0 && value) {
            gap_ms = number(argv[++i]);
        } else if (strcmp(argv[i], "-n") == 0 && value) {
            calls = number(argv[++i]);
        } else if (strcmp(argv[i], "-t") == 0 && value) {
            threads = number(argv[++i]);
        } else if (argv[i][0] != '-' && lib_path == NULL) {
            lib_path = argv[i];
        } else {
            usage();
        }
    }
    if (model_path == NULL || lib_path == NULL || gap_ms < 0 || gap_ms > 10000 || calls < 1 ||
        calls > MAX_CALLS || threads < 1 || threads > 1024) {
        usage();
    }
    void *lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "spaced_decode: %s\n", dlerror());
        return 1;
    }
    moas_status (*model_load)(const char *, const moas_model_params *, moas_model **) =
        (moas_status(*)(const char *, const moas_model_params *, moas_model **))symbol(
            lib, "moas_model_load");
    void (*params_init)(moas_context_params *, size_t) =
        (void (*)(moas_context_params *, size_t))symbol(lib, "moas_context_params_init_sized");
    moas_status (*context_create)(const moas_model *, const moas_context_params *,
                                  moas_context **) =
        (moas_status(*)(const moas_model *, const moas_context_params *, moas_context **))symbol(
            lib, "moas_context_create");
    moas_status (*decode)(moas_context *, int32_t, float *) =
        (moas_status(*)(moas_context *, int32_t, float *))symbol(lib, "moas_context_decode");
    moas_status (*truncate)(moas_context *, int32_t) =
        (moas_status(*)(moas_context *, int32_t))symbol(lib, "moas_context_truncate");
    int32_t (*n_vocab)(const moas_model *) =
        (int32_t(*)(const moas_model *))symbol(lib, "moas_model_n_vocab");
    int32_t (*n_ctx)(const moas_context *) =
        (int32_t(*)(const moas_context *))symbol(lib, "moas_context_n_ctx");
    void (*context_free)(moas_context *) =
        (void (*)(moas_context *))symbol(lib, "moas_context_free");
    void (*model_free)(moas_model *) = (void (*)(moas_model *))symbol(lib, "moas_model_free");
    const char *(*last_error)(void) = (const char *(*)(void))symbol(lib, "moas_last_error");

    moas_model *model;
    moas_context *ctx;
    moas_context_params cp;
    if (model_load(model_path, NULL, &model) != MOAS_OK) {
        fprintf(stderr, "spaced_decode: %s\n", last_error());
        return 1;
    }
    params_init(&cp, sizeof cp);
    cp.n_threads = (int32_t)threads;
    if (context_create(model, &cp, &ctx) != MOAS_OK) {
        fprintf(stderr, "spaced_decode: %s\n", last_error());
        return 1;
    }
    const int32_t vocab = n_vocab(model), keep = 8, most = n_ctx(ctx);
    double *took = malloc((size_t)calls * sizeof *took);
    if (took == NULL) {
        return 1;
    }
    srand(1);
    for (int32_t i = 0; i < keep; i++) {   /* a few tokens of context, and warm caches */
        if (decode(ctx, rand() % vocab, NULL) != MOAS_OK) {
            fprintf(stderr, "spaced_decode: %s\n", last_error());
            return 1;
        }
    }
    const struct timespec gap = {gap_ms / 1000, (gap_ms % 1000) * 1000000};
    const double cpu0 = cpu_s(), wall0 = now_s();
    int32_t past = keep;
    for (long i = 0; i < calls; i++) {
        if (past == most) {
            if (truncate(ctx, keep) != MOAS_OK) {
                fprintf(stderr, "spaced_decode: %s\n", last_error());
                return 1;
            }
            past = keep;
        }
        const double t0 = now_s();
        if (decode(ctx, rand() % vocab, NULL) != MOAS_OK) {
            fprintf(stderr, "spaced_decode: %s\n", last_error());
            return 1;
        }
        took[i] = now_s() - t0;
        past++;
        nanosleep(&gap, NULL);
    }
    const double cpu = cpu_s() - cpu0, wall = now_s() - wall0;
    qsort(took, (size_t)calls, sizeof *took, compare_doubles);
    printf("%ld calls %ld ms apart, %ld threads: %.1f us a call (median), %.3f ms of CPU a call, "
           "%.2f s of CPU over %.2f s\n",
           calls, gap_ms, threads, took[calls / 2] * 1e6, cpu / (double)calls * 1e3, cpu, wall);
    free(took);
    context_free(ctx);
    model_free(model);
    dlclose(lib);
    return 0;
}
