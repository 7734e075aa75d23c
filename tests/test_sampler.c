/* test_sampler.c - greedy, temperature, top-k, top-p: hand-computed distributions,
 * reproducibility and the error paths. */
#include "test.h"

#include <stdlib.h>

static moas_sampler *make(float temperature, int32_t top_k, float top_p, uint64_t seed,
                          int32_t n_vocab) {
    moas_sampler_params p;
    moas_sampler *s = NULL;
    moas_sampler_params_init(&p);
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.seed = seed;
    return moas_sampler_create(&p, n_vocab, &s) == MOAS_OK ? s : NULL;
}

/* Draw `n` tokens and count them into hist[n_vocab]. */
static int draw(moas_sampler *s, const float *logits, int n, int *hist) {
    for (int i = 0; i < n; i++) {
        int32_t t;
        if (moas_sampler_sample(s, logits, &t) != MOAS_OK) {
            return 1;
        }
        hist[t]++;
    }
    return 0;
}

TEST(sampler_greedy_picks_argmax_and_skips_nan) {
    const float logits[5] = {0.5f, NAN, 3.0f, 3.0f, -INFINITY};
    moas_sampler *s = make(0.0f, 0, 1.0f, 1, 5);
    int32_t t = -1;
    ASSERT_TRUE(s != NULL);
    ASSERT_OK(moas_sampler_sample(s, logits, &t));
    ASSERT_EQ(t, 2);   /* the first of two equal maxima */
    const float none[5] = {NAN, -INFINITY, NAN, NAN, -INFINITY};
    ASSERT_STATUS(moas_sampler_sample(s, none, &t), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_sampler_sample(s, NULL, &t), MOAS_ERR_INVALID_ARG);
    moas_sampler_free(s);
    return TEST_PASS;
}

/* logits ln(1), ln(2), ln(3), ln(4): probabilities 0.1 0.2 0.3 0.4 at temperature 1. */
TEST(sampler_temperature_matches_softmax) {
    const float logits[4] = {0.0f, 0.69314718f, 1.09861229f, 1.38629436f};
    int hist[4] = {0};
    const int n = 200000;
    moas_sampler *s = make(1.0f, 0, 1.0f, 42, 4);
    ASSERT_TRUE(s != NULL);
    ASSERT_EQ(draw(s, logits, n, hist), 0);
    /* binomial standard deviation at most sqrt(0.25 / n) ~ 0.0011; allow 5 of them */
    for (int i = 0; i < 4; i++) {
        ASSERT_NEAR((double)hist[i] / n, 0.1 * (i + 1), 0.0056);
    }
    moas_sampler_free(s);

    /* temperature 0.5 squares the odds: 1, 4, 9, 16 over 30 */
    int hist2[4] = {0};
    s = make(0.5f, 0, 1.0f, 43, 4);
    ASSERT_EQ(draw(s, logits, n, hist2), 0);
    for (int i = 0; i < 4; i++) {
        ASSERT_NEAR((double)hist2[i] / n, (double)((i + 1) * (i + 1)) / 30.0, 0.0056);
    }
    moas_sampler_free(s);
    return TEST_PASS;
}

TEST(sampler_top_k_and_top_p_cut_the_tail) {
    const float logits[4] = {0.0f, 0.69314718f, 1.09861229f, 1.38629436f};
    int hist[4] = {0};
    const int n = 100000;

    /* top-k 2 keeps 0.3 and 0.4: renormalised 3/7 and 4/7 */
    moas_sampler *s = make(1.0f, 2, 1.0f, 7, 4);
    ASSERT_EQ(draw(s, logits, n, hist), 0);
    ASSERT_EQ(hist[0] + hist[1], 0);
    ASSERT_NEAR((double)hist[3] / n, 4.0 / 7.0, 0.008);
    moas_sampler_free(s);

    /* top-p 0.65: 0.4 alone is short of it, 0.4 + 0.3 reaches it */
    memset(hist, 0, sizeof hist);
    s = make(1.0f, 0, 0.65f, 8, 4);
    ASSERT_EQ(draw(s, logits, n, hist), 0);
    ASSERT_EQ(hist[0] + hist[1], 0);
    ASSERT_TRUE(hist[2] > 0 && hist[3] > 0);
    moas_sampler_free(s);

    /* top-p 0.35: the most likely alone */
    memset(hist, 0, sizeof hist);
    s = make(1.0f, 0, 0.35f, 9, 4);
    ASSERT_EQ(draw(s, logits, 1000, hist), 0);
    ASSERT_EQ(hist[3], 1000);
    moas_sampler_free(s);
    return TEST_PASS;
}

TEST(sampler_same_seed_same_tokens) {
    float logits[50];
    int32_t a[100], b[100], c[100];
    for (int i = 0; i < 50; i++) {
        logits[i] = (float)((i * 37) % 11) * 0.3f;
    }
    moas_sampler *s1 = make(0.9f, 20, 0.95f, 1234, 50);
    moas_sampler *s2 = make(0.9f, 20, 0.95f, 1234, 50);
    moas_sampler *s3 = make(0.9f, 20, 0.95f, 1235, 50);
    ASSERT_TRUE(s1 && s2 && s3);
    for (int i = 0; i < 100; i++) {
        ASSERT_OK(moas_sampler_sample(s1, logits, &a[i]));
        ASSERT_OK(moas_sampler_sample(s2, logits, &b[i]));
        ASSERT_OK(moas_sampler_sample(s3, logits, &c[i]));
    }
    ASSERT_TRUE(memcmp(a, b, sizeof a) == 0);
    ASSERT_TRUE(memcmp(a, c, sizeof a) != 0);
    moas_sampler_reseed(s1, 1234);
    for (int i = 0; i < 100; i++) {
        ASSERT_OK(moas_sampler_sample(s1, logits, &c[i]));
    }
    ASSERT_TRUE(memcmp(a, c, sizeof a) == 0);
    moas_sampler_free(s1);
    moas_sampler_free(s2);
    moas_sampler_free(s3);
    return TEST_PASS;
}

TEST(sampler_params_are_checked) {
    moas_sampler_params p;
    moas_sampler *s = (moas_sampler *)&p;
    moas_sampler_params_init(&p);
    p.temperature = -1.0f;
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(s == NULL);
    p.temperature = NAN;
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    p.temperature = INFINITY;
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    moas_sampler_params_init(&p);
    p.top_p = 0.0f;
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    p.top_p = 1.5f;
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    moas_sampler_params_init(&p);
    p.top_k = -1;
    ASSERT_STATUS(moas_sampler_create(&p, 10, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_sampler_create(NULL, 0, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_sampler_create(NULL, 10, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_OK(moas_sampler_create(NULL, 10, &s));
    moas_sampler_free(s);
    moas_sampler_free(NULL);
    return TEST_PASS;
}

/* The cut keeps exactly the k most likely, whatever their order in the array. */
TEST(sampler_top_k_keeps_the_k_most_likely) {
    enum { N = 1000 };
    static float logits[N];
    int hist[N] = {0};
    /* a permutation of 0..999 as logits / 100: the top 10 are ids with values 990..999 */
    for (int i = 0; i < N; i++) {
        logits[i] = (float)((i * 7919) % N) / 100.0f;
    }
    moas_sampler *s = make(1.0f, 10, 1.0f, 3, N);
    ASSERT_TRUE(s != NULL);
    ASSERT_EQ(draw(s, logits, 5000, hist), 0);
    int distinct = 0;
    for (int i = 0; i < N; i++) {
        if (hist[i] > 0) {
            distinct++;
            ASSERT_TRUE(logits[i] >= 9.895f);
        }
    }
    ASSERT_EQ(distinct, 10);
    moas_sampler_free(s);
    return TEST_PASS;
}
