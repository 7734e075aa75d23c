/*
 * f16.h - IEEE binary16 and bfloat16 conversions in portable C, and the Q8_0 block.
 *
 * Weights stay in their file type and are converted inside the kernels, one element
 * at a time here, eight or sixteen at a time in the SIMD files.
 */
#ifndef MOAS_F16_H
#define MOAS_F16_H

#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float moas__f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t moas__f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* binary16 -> binary32, exact for every input (subnormals, infinities, NaN). */
static inline float moas__f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;

    if (exp == 0x1f) {                       /* infinity or NaN */
        return moas__f32_from_bits(sign | 0x7f800000u | (mant << 13));
    }
    if (exp != 0) {                          /* normal: rebias 15 -> 127 */
        return moas__f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
    }
    /* zero or subnormal: mant * 2^-24, exact in binary32 */
    float f = (float)mant * 5.9604644775390625e-8f;
    return sign ? -f : f;
}

/* binary32 -> binary16, rounding to nearest even (in integers: whatever rounding mode
 * the process has set, as the SIMD tables' conversion, whose rounding is given in the
 * instruction); overflow gives infinity. */
static inline uint16_t moas__f32_to_f16(float f) {
    const uint32_t u = moas__f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t abs = u & 0x7fffffffu;

    if (abs >= 0x7f800000u) {                /* infinity or NaN (keep NaN quiet) */
        return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0));
    }
    if (abs >= 0x477ff000u) {                /* rounds to >= 65536: infinity */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (abs < 0x38800000u) {                 /* below 2^-14: subnormal or zero */
        if (abs < 0x33000000u) {             /* up to 2^-25, half the smallest step */
            return (uint16_t)sign;           /* (2^-25 itself: a tie, to even zero) */
        }
        /* the significand m (implicit bit set) in steps of 2^-24: m 2^(e - 126), with
         * e in [102, 112], so a right shift by s = 126 - e in [14, 24], rounded to
         * nearest even */
        const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        const uint32_t s = 126u - (abs >> 23);
        const uint32_t q = m >> s, rest = m & ((1u << s) - 1u), half = 1u << (s - 1u);
        return (uint16_t)(sign | (q + (rest > half || (rest == half && (q & 1u)))));
    }
    /* normal: rebias, then round the 13 dropped bits to nearest even */
    const uint32_t mant_odd = (abs >> 13) & 1u;
    const uint32_t rounded = abs + 0xfffu + mant_odd;
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline float moas__bf16_to_f32(uint16_t h) {
    return moas__f32_from_bits((uint32_t)h << 16);
}

/* ggml's Q8_0 block: 32 weights w[i] = d * q[i]. */
#define MOAS_QK8_0 32
typedef struct {
    uint16_t d;              /* binary16 scale */
    int8_t q[MOAS_QK8_0];
} moas_block_q8_0;
_Static_assert(sizeof(moas_block_q8_0) == 34, "Q8_0 block must be 34 bytes, as in GGUF");

/* x id of a Q8_0 block as its int8, rounded half away from zero as roundf does. |x id|
 * rounds to at most 127 while id = 1 / d is finite; but a block whose largest |x| is
 * below 127 / FLT_MAX (about 3.7e-37) has an infinite id, and an infinite or NaN x makes
 * x id NaN or infinite (hostile weights can do either), where converting to an integer
 * would be undefined: those take the nearer end of [-127, 127], NaN 0. */
static inline int8_t moas__q8_0_round(float v) {
    if (v != v) {
        return 0;
    }
    if (v >= 127.0f || v <= -127.0f) {
        return v > 0.0f ? 127 : -127;
    }
    return (int8_t)roundf(v);
}

#endif /* MOAS_F16_H */
