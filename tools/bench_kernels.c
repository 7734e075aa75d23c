/*
 * bench_kernels.c - time every kernel of every table this CPU runs (make bench-kernels).
 *
 *   bench_kernels [rounds [offset]]   default 15 rounds, offset 0
 *   bench_kernels read                the memory part alone
 *
 * Four parts. "hot": one call on one row that stays in L1, at attention's head dims
 * (32, 64) and at 192, 768 and 3072 (n_embd and 4 * n_embd of small models): the
 * matmul kernels with one row and one token (a dot product) and attn_mix with one
 * key (y += a x). "attention": attn_scores and attn_mix of one query head over 256
 * cached keys of head_dim 64, as forward.c calls them, then of six query heads over one
 * run of 64 keys of head_dim 32 that they all read (a decode step's group of query
 * heads over MQA tokens), and exp_sum over that run's 64 scores. "matmul": whole weight
 * matrices through the matmul kernels, as forward.c runs them, for one token and for
 * a block of 128. "memory": a plain read of 1 GiB with 1 and 2 threads, the bandwidth
 * decode figures are compared with. Tables are measured interleaved, each round
 * starting with the next one, so a noisy neighbour slows all of them alike; the
 * median over rounds is printed. GFLOP/s counts a multiply-add as 2 flops; GB/s
 * counts the bytes the kernel must move (see bytes_per_elem).
 *
 * Every array starts `offset` bytes past a 64-byte boundary: 0 is what GGUF's
 * 64-byte tensor alignment gives weight rows whose size is a multiple of 64; 16 is
 * what plain malloc may give, so that 64-byte loads straddle cache lines.
 */
#include "ops.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { MAX_TABLES = 8, MAX_ROUNDS = 101 };

/* The operands of a kernel are n_rows x n_cols x n_tok: weight rows x columns x
 * tokens for matmul, cached keys x head_dim x query heads for the attention kernels
 * (the heads reading the same rows), and n_rows x n_tok values for exp_sum. */
enum kernel { MATMUL_F32, MATMUL_F16, MATMUL_Q8_0, ATTN_SCORES_F32, ATTN_SCORES_F16,
              ATTN_MIX_F32, ATTN_MIX_F16, EXP_SUM, N_KERNELS };
static const char *const kernel_names[N_KERNELS] = {
    "matmul_f32",      "matmul_f16",   "matmul_q8_0", "attn_scores_f32",
    "attn_scores_f16", "attn_mix_f32", "attn_mix_f16", "exp_sum"};

/* Bytes read or written per element: the weights (or the cached K or V rows), plus,
 * unless `weights_only`, the f32 vector x of a one-row matmul (q of attn_scores), or
 * out read and written by attn_mix. A matrix product reuses x across rows from cache,
 * and attention over many keys reuses q or out, so there only the rows count. */
static double bytes_per_elem(enum kernel k, bool weights_only) {
    const double other = weights_only ? 0 : k == ATTN_MIX_F32 || k == ATTN_MIX_F16 ? 8 : 4;
    switch (k) {
    case MATMUL_F32:
    case ATTN_SCORES_F32:
    case ATTN_MIX_F32:
    case EXP_SUM: return 4 + other;
    case MATMUL_Q8_0: return (double)sizeof(moas_block_q8_0) / MOAS_QK8_0 + other;
    default: return 2 + other;
    }
}

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint64_t rng = 0x2545f4914f6cdd1du;
static float next_sym(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((int32_t)(rng >> 40) - (1 << 23)) * 0x1p-23f;
}

/* Operands for n_rows rows of n_cols, every type at once, and n_tok input rows; for
 * attention, the rows are the cached keys (or values) in order and p their weights. */
enum { N_ARRAYS = 7 };
typedef struct {
    int32_t n_rows, n_cols, n_tok;
    float *w32, *x, *y, *p;
    uint16_t *w16;
    moas_block_q8_0 *wq;
    uint32_t *rows;
    void *base[N_ARRAYS];
} operands;

static size_t offset;  /* bytes past a 64-byte boundary for every array */

static void *alloc_at(operands *o, int i, size_t size) {
    if (posix_memalign(&o->base[i], 64, size + offset) != 0) {
        o->base[i] = NULL;
        return NULL;
    }
    return (char *)o->base[i] + offset;
}

static int operands_init(operands *o, int32_t n_rows, int32_t n_cols, int32_t n_tok) {
    const size_t n = (size_t)n_rows * (size_t)n_cols;
    const size_t ny = (size_t)(n_cols > n_rows ? n_cols : n_rows) * (size_t)n_tok;
    o->n_rows = n_rows;
    o->n_cols = n_cols;
    o->n_tok = n_tok;
    o->w32 = alloc_at(o, 0, n * sizeof *o->w32);
    o->w16 = alloc_at(o, 1, n * sizeof *o->w16);
    o->wq = alloc_at(o, 2, n / MOAS_QK8_0 * sizeof *o->wq);
    o->x = alloc_at(o, 3, (size_t)n_cols * (size_t)n_tok * sizeof *o->x);
    o->y = alloc_at(o, 4, ny * sizeof *o->y);
    o->p = alloc_at(o, 5, (size_t)n_rows * (size_t)n_tok * sizeof *o->p);
    o->rows = alloc_at(o, 6, (size_t)n_rows * sizeof *o->rows);
    if (!o->w32 || !o->w16 || !o->wq || !o->x || !o->y || !o->p || !o->rows) {
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        o->w32[i] = next_sym();
        o->w16[i] = moas__f32_to_f16(o->w32[i]);
    }
    for (size_t b = 0; b < n / MOAS_QK8_0; b++) {
        o->wq[b].d = moas__f32_to_f16(1.0f / 127.0f);
        for (int i = 0; i < MOAS_QK8_0; i++) {
            o->wq[b].q[i] = (int8_t)(next_sym() * 127.0f);
        }
    }
    for (size_t i = 0; i < (size_t)n_cols * (size_t)n_tok; i++) {
        o->x[i] = next_sym();
    }
    for (size_t i = 0; i < ny; i++) {
        o->y[i] = next_sym();
    }
    for (int32_t j = 0; j < n_rows; j++) {
        o->rows[j] = (uint32_t)j;
    }
    for (size_t j = 0; j < (size_t)n_rows * (size_t)n_tok; j++) {
        o->p[j] = 1e-7f;   /* a tiny weight keeps attn_mix's out bounded over many calls */
    }
    return 0;
}

static void operands_free(operands *o) {
    for (int i = 0; i < N_ARRAYS; i++) {
        free(o->base[i]);
    }
}

static volatile float sink;
static volatile uint64_t sink_u64;

/* GB/s of reading `bytes` once with `threads` threads (a sum of 64-bit words in four
 * chains, which the compiler vectorises; nothing is written): the median of 5. */
static double read_bandwidth(const uint64_t *p, size_t bytes, int threads) {
    const size_t n = bytes / sizeof *p;
    double gbs[5];
    for (int r = 0; r < 5; r++) {
        uint64_t total = 0;
        const double t0 = now_ns();
#if defined(_OPENMP)
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
#endif
        for (int c = 0; c < 64; c++) {   /* 64 chunks, split among the threads */
            uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
            for (size_t i = n / 64 * (size_t)c; i < n / 64 * (size_t)(c + 1); i += 4) {
                a0 += p[i];
                a1 += p[i + 1];
                a2 += p[i + 2];
                a3 += p[i + 3];
            }
            total += a0 + a1 + a2 + a3;
        }
        gbs[r] = (double)bytes / (now_ns() - t0);
        sink_u64 = total;
    }
    (void)threads;
    return median(gbs, 5);
}

/* `reps` calls of kernel k of `t` over all of `o`; nanoseconds per call. */
static double run(const moas_ops *t, enum kernel k, const operands *o, int reps) {
    const int32_t nc = o->n_cols;
    const size_t row_bytes = (size_t)(bytes_per_elem(k, true) * nc);
    const size_t ld = (size_t)o->n_rows;   /* scores and weights: one row per query */
    float acc = 0.0f;
    const double t0 = now_ns();
    for (int r = 0; r < reps; r++) {
        switch (k) {
        case ATTN_SCORES_F32:
            t->attn_scores_f32(o->w32, o->rows, o->n_rows, o->x, (size_t)nc, o->n_tok, nc,
                               0.125f, o->y, ld);
            break;
        case ATTN_SCORES_F16:
            t->attn_scores_f16(o->w16, o->rows, o->n_rows, o->x, (size_t)nc, o->n_tok, nc,
                               0.125f, o->y, ld);
            break;
        case ATTN_MIX_F32:
            t->attn_mix_f32(o->w32, o->rows, 0, o->n_rows, o->p, ld, o->n_tok, nc, o->y,
                            (size_t)nc);
            break;
        case ATTN_MIX_F16:
            t->attn_mix_f16(o->w16, o->rows, 0, o->n_rows, o->p, ld, o->n_tok, nc, o->y,
                            (size_t)nc);
            break;
        case EXP_SUM:   /* x - max <= 0 again after each call: exp(x) is at most 1 */
            acc += t->exp_sum(o->y, o->n_rows * o->n_tok, 1.0f);
            break;
        default: {   /* the whole matrix per call */
            const void *w = k == MATMUL_F32 ? (const void *)o->w32
                            : k == MATMUL_F16 ? (const void *)o->w16 : (const void *)o->wq;
            (k == MATMUL_F32   ? t->matmul_f32
             : k == MATMUL_F16 ? t->matmul_f16
                               : t->matmul_q8_0)(w, row_bytes, o->n_rows, o->x, (size_t)nc,
                                                 o->n_tok, nc, o->y, (size_t)o->n_rows,
                                                 /* as forward.c does for a model this big */
                                                 row_bytes * o->n_rows > ((size_t)64 << 20)
                                                     ? MOAS_MM_STREAM : 0);
            break;
        }
        }
        acc += o->y[0];
    }
    const double dt = now_ns() - t0;
    sink = acc + o->y[0];
    return dt / reps;
}

/* Time kernel k on every table, interleaved, and print one line per table. */
static void bench(const moas_ops *const *tables, int n_tables, enum kernel k,
                  const operands *o, int rounds, double target_ns, bool weights_only) {
    double ns[MAX_TABLES][MAX_ROUNDS];
    const double elems = (double)o->n_rows * o->n_cols;
    const double flops = 2.0 * elems * o->n_tok;

    /* Repetitions so the slowest table's timing lasts about target_ns. */
    int reps = 1;
    (void)run(tables[n_tables - 1], k, o, 1);   /* warm the caches */
    const double once = run(tables[n_tables - 1], k, o, 1);
    if (once > 0 && once < target_ns) {
        reps = (int)(target_ns / once) + 1;
    }
    for (int i = 0; i < n_tables; i++) {
        (void)run(tables[i], k, o, reps);       /* warm up each table */
    }
    /* Each round starts with the next table, so none always follows the same one. */
    for (int r = 0; r < rounds; r++) {
        for (int j = 0; j < n_tables; j++) {
            const int i = (j + r) % n_tables;
            ns[i][r] = run(tables[i], k, o, reps);
        }
    }
    double ref_ns = 0;
    for (int i = n_tables - 1; i >= 0; i--) {
        const double m = median(ns[i], rounds);
        if (i == n_tables - 1) {
            ref_ns = m;
        }
        printf("%-15s %5d x %-5d x %2d %-7s %11.1f ns/call %7.2f GFLOP/s %7.2f GB/s %6.2fx\n",
               kernel_names[k], (int)o->n_rows, (int)o->n_cols, (int)o->n_tok, tables[i]->name,
               m, flops / m, bytes_per_elem(k, weights_only) * elems / m, ref_ns / m);
    }
}

/* The plain read of 1 GiB at 1 and 2 threads: the bandwidth decode is compared with. */
static int bench_memory(void) {
    const size_t big = (size_t)1 << 30;
    uint64_t *mem = malloc(big);
    if (mem == NULL) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < big / sizeof *mem; i++) {
        mem[i] = i;
    }
    printf("\n# memory: a plain read of 1 GiB\n");
    for (int threads = 1; threads <= 2; threads++) {
        printf("read      %d thread(s) %7.2f GB/s\n", threads, read_bandwidth(mem, big, threads));
    }
    free(mem);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "read") == 0) {   /* the memory part alone */
        return bench_memory();
    }
    const int rounds = argc > 1 ? atoi(argv[1]) : 15;
    const int off = argc > 2 ? atoi(argv[2]) : 0;
    if (rounds < 1 || rounds > MAX_ROUNDS || off < 0 || off > 63 || off % 4 != 0) {
        fprintf(stderr,
                "usage: bench_kernels [rounds 1..%d [offset 0..60, a multiple of 4]] | read\n",
                MAX_ROUNDS);
        return 2;
    }
    offset = (size_t)off;

    /* The runnable tables, fastest first; the reference is last. */
    const moas_ops *tables[MAX_TABLES];
    int n_tables = 0;
    for (size_t i = 0; moas__ops_tables[i] != NULL && n_tables < MAX_TABLES; i++) {
        if (moas__ops_runs_here(moas__ops_tables[i])) {
            tables[n_tables++] = moas__ops_tables[i];
        } else {
            printf("# %s: not supported by this CPU, skipped\n", moas__ops_tables[i]->name);
        }
    }
    printf("# auto selects \"%s\"; median of %d rounds; tables interleaved; "
           "arrays %d bytes past 64-byte alignment\n",
           moas__ops_select(MOAS_KERNELS_AUTO)->name, rounds, off);
    printf("# speedup is against ref\n");

    static const int32_t hot[] = {32, 64, 192, 768, 3072};
    static const enum kernel hot_kernels[] = {MATMUL_F32, MATMUL_F16, MATMUL_Q8_0, ATTN_MIX_F32,
                                              ATTN_MIX_F16};
    printf("\n# hot: one row in L1, one call: matmul of 1 row x n x 1 token (a dot product), "
           "attn_mix of 1 key x head_dim (y += a x); GB/s counts w and x (matmul), v and out "
           "twice (attn_mix)\n");
    for (size_t s = 0; s < sizeof hot / sizeof hot[0]; s++) {
        operands o;
        if (operands_init(&o, 1, hot[s], 1) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (size_t k = 0; k < sizeof hot_kernels / sizeof hot_kernels[0]; k++) {
            bench(tables, n_tables, hot_kernels[k], &o, rounds, 2e5, false);
        }
        operands_free(&o);
    }

    /* One query head over 256 cached tokens at head_dim 64: 64 KB of f32 keys, in L2. */
    printf("\n# attention: one query head, keys x head_dim, one call; GB/s counts the K or V "
           "rows only\n");
    {
        operands o;
        if (operands_init(&o, 256, 64, 1) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (int k = ATTN_SCORES_F32; k <= ATTN_MIX_F16; k++) {
            bench(tables, n_tables, (enum kernel)k, &o, rounds, 2e5, true);
        }
        operands_free(&o);
    }
    /* A decode run of MOAS_ATT_KEYS keys as attend_one_keys takes it: six query heads of
     * 32 that read the same K/V rows (MQA tokens of a 6-head model), and the run's
     * scores through exp_sum, a query head at a time. */
    printf("\n# attention: six query heads over one run of 64 keys of head_dim 32 that they "
           "all read, one call; exp_sum of 64 scores\n");
    {
        operands o, e;
        if (operands_init(&o, 64, 32, 6) != 0 || operands_init(&e, 64, 1, 1) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (int k = ATTN_SCORES_F32; k <= ATTN_MIX_F16; k++) {
            bench(tables, n_tables, (enum kernel)k, &o, rounds, 2e5, true);
        }
        bench(tables, n_tables, EXP_SUM, &e, rounds, 2e5, true);
        operands_free(&o);
        operands_free(&e);
    }

    /* Matrices as forward.c multiplies them: the default 6-layer shape's MLP
     * up-projection (2.4 MB in f32, in L2/L3), GPT-2 small's (9.4 MB) and its
     * down-projection (3072 columns), and a 77 MB f16 output matrix of GPT-2's shape
     * that only memory can hold; one token (decode), 16 (a batched decode step of 16
     * sequences) and a block of 128 (prefill). */
    static const int32_t mm[][3] = {{1536, 384, 1},   {3072, 768, 1},   {50257, 768, 1},
                                    {3072, 768, 16},  {50257, 768, 16}, {1536, 384, 128},
                                    {3072, 768, 128}, {768, 3072, 128}};
    printf("\n# matmul: a whole weight matrix times 1, 16 or 128 token rows, one call; GB/s "
           "counts weights only\n");
    for (size_t s = 0; s < sizeof mm / sizeof mm[0]; s++) {
        operands o;
        if (operands_init(&o, mm[s][0], mm[s][1], mm[s][2]) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (int k = MATMUL_F32; k <= MATMUL_Q8_0; k++) {
            bench(tables, n_tables, (enum kernel)k, &o, mm[s][0] > 10000 ? 3 : rounds,
                  mm[s][2] > 1 ? 2e7 : 2e6, true);
        }
        operands_free(&o);
    }

    return bench_memory();
}
