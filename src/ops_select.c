/*
 * ops_select.c - which kernel table this CPU runs.
 *
 * Owns: CPU feature detection and the list of tables built for this architecture.
 * Does not own: the kernels (ops_*.c). Nothing here is cached: a context calls
 * moas__ops_select() once at creation and keeps the pointer, so there is no global
 * state to initialise or race on. Compiles on any architecture; off x86-64 (or
 * without GCC/Clang builtins) the reference is the only table.
 */
#include "ops.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#define MOAS_OPS_X86 1
#else
#define MOAS_OPS_X86 0
#endif

const moas_ops *const moas__ops_tables[] = {
#if MOAS_OPS_X86
    &moas__ops_avx512,
    &moas__ops_avx2,
#endif
    &moas__ops_ref,
    NULL,
};

#if MOAS_OPS_X86
enum {
    FEAT_AVX2 = 1u << 0,
    FEAT_FMA = 1u << 1,
    FEAT_F16C = 1u << 2,
    FEAT_AVX512F = 1u << 3,
};

/* The features the kernels use. __builtin_cpu_supports also checks that the OS saves
 * the YMM/ZMM state (XCR0). Clang 14 does not know "f16c", so that one comes from
 * CPUID leaf 1; F16C's registers are the AVX ones, which the "avx2" test covers. */
static unsigned cpu_features(void) {
    unsigned f = 0, eax, ebx, ecx, edx;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= FEAT_AVX2;
    if (__builtin_cpu_supports("fma")) f |= FEAT_FMA;
    if (__builtin_cpu_supports("avx512f")) f |= FEAT_AVX512F;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C)) f |= FEAT_F16C;
    return f;
}

/* Whether a CPU with `features` runs `ops`: each table needs what its file was
 * compiled for (the Makefile's per-file flags). The AVX-512 file is compiled with
 * -mavx512f, which lets the compiler emit AVX2 instructions too, and uses F16C and FMA
 * in its helpers, so that table needs the AVX2 set as well. */
static bool runs_with(const moas_ops *ops, unsigned features) {
    const unsigned avx2 = FEAT_AVX2 | FEAT_FMA | FEAT_F16C;
    if (ops == &moas__ops_avx512) {
        return (features & (avx2 | FEAT_AVX512F)) == (avx2 | FEAT_AVX512F);
    }
    if (ops == &moas__ops_avx2) {
        return (features & avx2) == avx2;
    }
    return ops == &moas__ops_ref;
}
#else
static unsigned cpu_features(void) { return 0; }
static bool runs_with(const moas_ops *ops, unsigned features) {
    (void)features;
    return ops == &moas__ops_ref;
}
#endif

bool moas__ops_runs_here(const moas_ops *ops) {
    return runs_with(ops, cpu_features());
}

const moas_ops *moas__ops_select(moas_kernels kind) {
    if (kind == MOAS_KERNELS_REF) {
        return &moas__ops_ref;
    }
    const unsigned features = cpu_features();
    for (size_t i = 0; moas__ops_tables[i] != NULL; i++) {
        if (runs_with(moas__ops_tables[i], features)) {
            return moas__ops_tables[i];
        }
    }
    return &moas__ops_ref;
}
