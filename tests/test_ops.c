/* test_ops.c - half-precision conversions and the reference kernels, against values
 * worked out by hand from the IEEE 754 and ggml Q8_0 definitions. */
#include "test.h"

#include "f16.h"
#include "kv_cache.h"
#include "ops.h"

TEST(f16_to_f32_exact_cases) {
    ASSERT_NEAR(moas__f16_to_f32(0x3c00), 1.0, 0);
    ASSERT_NEAR(moas__f16_to_f32(0xc000), -2.0, 0);
    ASSERT_NEAR(moas__f16_to_f32(0x7bff), 65504.0, 0);
    ASSERT_NEAR(moas__f16_to_f32(0x0001), 5.9604644775390625e-8, 0);   /* 2^-24 */
    ASSERT_NEAR(moas__f16_to_f32(0x03ff), 6.097555160522461e-5, 0);    /* largest subnormal */
    ASSERT_NEAR(moas__f16_to_f32(0x0400), 6.103515625e-5, 0);          /* 2^-14 */
    ASSERT_TRUE(isinf(moas__f16_to_f32(0x7c00)) && moas__f16_to_f32(0x7c00) > 0);
    ASSERT_TRUE(isnan(moas__f16_to_f32(0x7e00)));
    ASSERT_TRUE(signbit(moas__f16_to_f32(0x8000)) && moas__f16_to_f32(0x8000) == 0.0f);
    ASSERT_NEAR(moas__bf16_to_f32(0x3f80), 1.0, 0);
    return TEST_PASS;
}

TEST(f32_to_f16_rounds_to_nearest_even) {
    ASSERT_EQ(moas__f32_to_f16(1.0f), 0x3c00);
    ASSERT_EQ(moas__f32_to_f16(-0.0f), 0x8000);
    ASSERT_EQ(moas__f32_to_f16(65504.0f), 0x7bff);
    ASSERT_EQ(moas__f32_to_f16(65519.0f), 0x7bff);       /* below the halfway point */
    ASSERT_EQ(moas__f32_to_f16(65520.0f), 0x7c00);       /* halfway: even is infinity */
    ASSERT_EQ(moas__f32_to_f16(1e10f), 0x7c00);
    ASSERT_EQ(moas__f32_to_f16(1.0f + 0x1p-11f), 0x3c00); /* tie, to even (down) */
    ASSERT_EQ(moas__f32_to_f16(1.0f + 0x3p-11f), 0x3c02); /* tie, to even (up) */
    ASSERT_EQ(moas__f32_to_f16(1.0f + 0x1p-12f), 0x3c00); /* below half an ulp */
    ASSERT_EQ(moas__f32_to_f16(0x1p-24f), 0x0001);
    ASSERT_EQ(moas__f32_to_f16(0x1p-25f), 0x0000);       /* tie between 0 and 2^-24: 0 */
    ASSERT_EQ(moas__f32_to_f16(0x3p-25f), 0x0002);       /* tie between 1 and 2 ulps: 2 */
    ASSERT_EQ(moas__f32_to_f16(0x1p-14f - 0x1p-25f), 0x0400); /* rounds up into normals */
    ASSERT_EQ(moas__f32_to_f16(INFINITY), 0x7c00);
    ASSERT_EQ(moas__f32_to_f16(-INFINITY), 0xfc00);
    ASSERT_TRUE((moas__f32_to_f16(NAN) & 0x7c00) == 0x7c00 && (moas__f32_to_f16(NAN) & 0x3ff));
    return TEST_PASS;
}

/* Every finite half survives the trip to float and back unchanged. */
TEST(f16_round_trip_is_exact_for_all_values) {
    for (uint32_t h = 0; h < 0x10000; h++) {
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) {
            continue;   /* NaN payloads need not survive */
        }
        ASSERT_EQ(moas__f32_to_f16(moas__f16_to_f32((uint16_t)h)), h);
    }
    return TEST_PASS;
}

/* The reference's dot product of one weight row with x is its matmul with one row and
 * one token; y += a x is its attn_mix with one key (row 0 of v = x, weight a). */
typedef void matmul_fn(const void *, size_t, int32_t, const float *, size_t, int32_t, int32_t,
                       float *, size_t, unsigned);
typedef void attn_mix_fn(const void *, const uint32_t *, size_t, int32_t, const float *,
                         size_t, int32_t, int32_t, float *, size_t);

static float one_row(matmul_fn *matmul, const void *w, size_t row_bytes, const float *x,
                     int32_t n) {
    float y = NAN;
    matmul(w, row_bytes, 1, x, (size_t)n, 1, n, &y, 1, 0);
    return y;
}

static void one_key(attn_mix_fn *attn_mix, float *y, float a, const void *x, int32_t n) {
    const uint32_t row = 0;
    attn_mix(x, &row, 0, 1, &a, 1, 1, n, y, (size_t)n);
}

/* Q8_0: one block with scale 0.5 and q = -16..15: dot with all-ones x is
 * 0.5 * sum(-16..15) = 0.5 * -16 = -8; with x = 2 it doubles. */
TEST(ref_matmul_one_row_q8_0_hand_computed) {
    matmul_fn *const mm = moas__ops_ref.matmul_q8_0;
    moas_block_q8_0 blocks[2];
    float x[64];
    blocks[0].d = moas__f32_to_f16(0.5f);
    blocks[1].d = moas__f32_to_f16(-0.25f);
    for (int i = 0; i < 32; i++) {
        blocks[0].q[i] = (int8_t)(i - 16);
        blocks[1].q[i] = (int8_t)(i % 2 ? 127 : -127);
    }
    for (int i = 0; i < 64; i++) {
        x[i] = i < 32 ? 1.0f : 2.0f;
    }
    ASSERT_NEAR(one_row(mm, blocks, sizeof blocks[0], x, 32), -8.0, 0);
    /* second block: 16 * 127 - 16 * 127 = 0 */
    ASSERT_NEAR(one_row(mm, blocks, sizeof blocks, x, 64), -8.0, 0);
    x[33] = 3.0f;   /* the odd element 33 has q = +127: adds -0.25 * 127 * (3 - 2) */
    ASSERT_NEAR(one_row(mm, blocks, sizeof blocks, x, 64), -8.0 - 31.75, 0);
    return TEST_PASS;
}

/* A head stored as Q8_0 K/V: per block d = max|x| / 127 and q = round(x / d), half away
 * from zero; and defined values where x / d is not a number in [-127, 127]: a block too
 * small for 1 / d to be finite, a NaN, an infinity. */
TEST(q8_0_kv_store_hand_computed_and_defined_at_the_edges) {
    float x[128] = {0};
    moas_block_q8_0 b[4];
    x[0] = 127.0f;          /* d = 1 */
    x[1] = 2.5f;            /* ties away from zero */
    x[2] = -2.5f;
    x[3] = 0.49999997f;
    x[4] = -126.5f;
    for (int i = 32; i < 63; i++) {   /* max |x| 1e-38: d subnormal, 1 / d infinite */
        x[i] = i % 2 ? -1e-38f : 1e-38f;
    }
    x[64] = NAN;            /* ignored by the maximum; stored as 0 */
    x[65] = 1.0f;
    x[96] = INFINITY;       /* d infinite, 1 / d = 0: every x / d 0 or NaN */
    x[97] = -3.0f;
    moas__kv_head_store(&moas__ops_ref, MOAS_TYPE_Q8_0, b, x, 128);
    ASSERT_EQ(b[0].d, 0x3c00);
    ASSERT_EQ(b[0].q[0], 127);
    ASSERT_EQ(b[0].q[1], 3);
    ASSERT_EQ(b[0].q[2], -3);
    ASSERT_EQ(b[0].q[3], 0);
    ASSERT_EQ(b[0].q[4], -127);
    ASSERT_EQ(b[0].q[5], 0);
    ASSERT_EQ(b[1].d, 0);   /* 1e-38 / 127 rounds to a zero half */
    for (int i = 0; i < 31; i++) {
        ASSERT_EQ(b[1].q[i], i % 2 ? -127 : 127);
    }
    ASSERT_EQ(b[1].q[31], 0);   /* 0 times an infinite 1 / d */
    ASSERT_EQ(b[2].d, moas__f32_to_f16(1.0f / 127.0f));
    ASSERT_EQ(b[2].q[0], 0);
    ASSERT_EQ(b[2].q[1], 127);
    ASSERT_EQ(b[3].d, 0x7c00);
    ASSERT_EQ(b[3].q[0], 0);
    ASSERT_EQ(b[3].q[1], 0);
    float back[128];
    moas__kv_head_load(MOAS_TYPE_Q8_0, b, back, 128);
    ASSERT_NEAR(back[1], 3.0, 0);
    ASSERT_NEAR(back[4], -127.0, 0);
    return TEST_PASS;
}

TEST(ref_matmul_one_row_and_attn_mix_one_key_hand_computed) {
    const float w[5] = {1, 2, 3, 4, 5}, x[5] = {1, -1, 0.5f, 2, -2};
    uint16_t h[5];
    float y[5] = {1, 1, 1, 1, 1};
    for (int i = 0; i < 5; i++) {
        h[i] = moas__f32_to_f16(w[i]);
    }
    /* 1 - 2 + 1.5 + 8 - 10 = -1.5 */
    ASSERT_NEAR(one_row(moas__ops_ref.matmul_f32, w, sizeof w, x, 5), -1.5, 0);
    ASSERT_NEAR(one_row(moas__ops_ref.matmul_f16, h, sizeof h, x, 5), -1.5, 0);
    one_key(moas__ops_ref.attn_mix_f32, y, 2.0f, w, 5);
    ASSERT_NEAR(y[4], 11.0, 0);
    one_key(moas__ops_ref.attn_mix_f16, y, -1.0f, h, 5);
    ASSERT_NEAR(y[4], 6.0, 0);
    ASSERT_NEAR(y[0], 2.0, 0);
    return TEST_PASS;
}
