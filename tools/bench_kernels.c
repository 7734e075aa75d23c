/*
 * bench_kernels.c - time every kernel of every table this CPU runs (make bench-kernels).
 *
 *   bench_kernels [rounds [offset]]   default 15 rounds, offset 0
 *
 * Three parts. "hot": one call on a row that stays in L1, at attention's head
 * dims (32, 64) and at 192, 768 and 3072 (n_embd and 4 * n_embd of small models).
 * "matmul": whole weight matrices through the matmul kernels, as forward.c runs
 * them, for one token and for a block of 32. "memory": a plain read of 1 GiB with 1
 * and 2 threads, the bandwidth decode figures are compared with. Tables are
 * measured interleaved, each round starting with the next one, so a noisy neighbour
 * slows all of them alike; the median over rounds is printed. GFLOP/s counts a multiply-add as 2 flops; GB/s counts the bytes the kernel
 * must move (see bytes_per_elem).
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

enum kernel { DOT_F32, DOT_F16, DOT_Q8_0, AXPY_F32, AXPY_F16, MATMUL_F32, MATMUL_F16,
              MATMUL_Q8_0, N_KERNELS };
static const char *const kernel_names[N_KERNELS] = {"dot_f32",    "dot_f16",    "dot_q8_0",
                                                     "axpy_f32",   "axpy_f16",   "matmul_f32",
                                                     "matmul_f16", "matmul_q8_0"};

/* Bytes read or written per element: the weights (or axpy's x), plus, unless
 * `weights_only`, the f32 vector x of a dot or y read and written by axpy. A matvec
 * reuses x across rows from cache, so there only the weights count. */
static double bytes_per_elem(enum kernel k, bool weights_only) {
    const double other = weights_only ? 0 : k == AXPY_F32 || k == AXPY_F16 ? 8 : 4;
    switch (k) {
    case DOT_F32:
    case MATMUL_F32:
    case AXPY_F32: return 4 + other;
    case DOT_Q8_0:
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

/* Operands for n_rows rows of n_cols, every type at once, and n_tok input rows. */
typedef struct {
    int32_t n_rows, n_cols, n_tok;
    float *w32, *x, *y;
    uint16_t *w16;
    moas_block_q8_0 *wq;
    void *base[5];
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
    if (!o->w32 || !o->w16 || !o->wq || !o->x || !o->y) {
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
    return 0;
}

static void operands_free(operands *o) {
    for (int i = 0; i < 5; i++) {
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

/* `reps` passes over all rows of `o` with kernel k of `t`; nanoseconds per pass. */
static double run(const moas_ops *t, enum kernel k, const operands *o, int reps) {
    const int32_t nc = o->n_cols;
    float acc = 0.0f;
    const double t0 = now_ns();
    for (int r = 0; r < reps && k >= MATMUL_F32; r++) {   /* the whole matrix per call */
        const size_t row_bytes = (size_t)(bytes_per_elem(k, true) * nc);
        const void *w = k == MATMUL_F32 ? (const void *)o->w32
                        : k == MATMUL_F16 ? (const void *)o->w16 : (const void *)o->wq;
        (k == MATMUL_F32   ? t->matmul_f32
         : k == MATMUL_F16 ? t->matmul_f16
                           : t->matmul_q8_0)(w, row_bytes, o->n_rows, o->x, (size_t)nc, o->n_tok,
                                             nc, o->y, (size_t)o->n_rows);
        acc += o->y[0];
    }
    for (int r = 0; r < reps && k < MATMUL_F32; r++) {
        for (int32_t row = 0; row < o->n_rows; row++) {
            const size_t off = (size_t)row * (size_t)nc;
            switch (k) {
            case DOT_F32: acc += t->dot_f32(o->w32 + off, o->x, nc); break;
            case DOT_F16: acc += t->dot_f16(o->w16 + off, o->x, nc); break;
            case DOT_Q8_0: acc += t->dot_q8_0(o->wq + off / MOAS_QK8_0, o->x, nc); break;
            /* a tiny a keeps y bounded over many passes */
            case AXPY_F32: t->axpy_f32(o->y, 1e-7f, o->w32 + off, nc); break;
            default: t->axpy_f16(o->y, 1e-7f, o->w16 + off, nc); break;
            }
        }
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
        const double per_call = k >= MATMUL_F32 ? m : m / o->n_rows;
        printf("%-11s %5d x %-5d x %2d %-7s %11.1f ns/call %7.2f GFLOP/s %7.2f GB/s %6.2fx\n",
               kernel_names[k], (int)o->n_rows, (int)o->n_cols, (int)o->n_tok, tables[i]->name,
               per_call, flops / m, bytes_per_elem(k, weights_only) * elems / m, ref_ns / m);
    }
}

int main(int argc, char **argv) {
    const int rounds = argc > 1 ? atoi(argv[1]) : 15;
    const int off = argc > 2 ? atoi(argv[2]) : 0;
    if (rounds < 1 || rounds > MAX_ROUNDS || off < 0 || off > 63 || off % 4 != 0) {
        fprintf(stderr, "usage: bench_kernels [rounds 1..%d [offset 0..60, a multiple of 4]]\n",
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
    printf("\n# hot: one row in L1, one call per row; GB/s counts w and x (dot), x and y "
           "twice (axpy)\n");
    for (size_t s = 0; s < sizeof hot / sizeof hot[0]; s++) {
        operands o;
        if (operands_init(&o, 1, hot[s], 1) != 0) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (int k = 0; k < MATMUL_F32; k++) {
            bench(tables, n_tables, (enum kernel)k, &o, rounds, 2e5, false);
        }
        operands_free(&o);
    }

    /* Matrices as forward.c multiplies them: the default 6-layer shape's MLP
     * up-projection (2.4 MB in f32, in L2/L3), GPT-2 small's (9.4 MB), and a 77 MB f16
     * output matrix of GPT-2's shape that only memory can hold; one token (decode) and a
     * block of 32 (prefill). */
    static const int32_t mm[][3] = {{1536, 384, 1}, {3072, 768, 1}, {50257, 768, 1},
                                    {1536, 384, 32}, {3072, 768, 32}};
    printf("\n# matmul: a whole weight matrix times 1 or 32 token rows, one call; GB/s "
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
