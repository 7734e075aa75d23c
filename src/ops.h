/*
 * ops.h - the table of hot kernels.
 *
 * ops_ref.c holds the portable reference of every kernel: plain loops, always built,
 * and the specification the SIMD versions are tested against. A context picks one
 * table when it is created and keeps the pointer.
 */
#ifndef MOAS_OPS_H
#define MOAS_OPS_H

#include "core.h"
#include "f16.h"

typedef struct moas_ops {
    const char *name;  /* "ref", "avx2", ... */

    /* Dot products of a weight row (in its stored type) with an f32 vector of n. */
    float (*dot_f32)(const float *w, const float *x, int32_t n);
    float (*dot_f16)(const uint16_t *w, const float *x, int32_t n);
    float (*dot_q8_0)(const moas_block_q8_0 *w, const float *x, int32_t n); /* n % 32 == 0 */

    /* y += a * x over n elements, x in f32 or f16 (value rows of the KV cache). */
    void (*axpy_f32)(float *y, float a, const float *x, int32_t n);
    void (*axpy_f16)(float *y, float a, const uint16_t *x, int32_t n);
} moas_ops;

extern const moas_ops moas__ops_ref;

/* The fastest table this CPU runs, or the reference when `kind` asks for it. */
const moas_ops *moas__ops_select(moas_kernels kind);

#endif /* MOAS_OPS_H */
