/* test_sampler.c - greedy, temperature, top-k, top-p: hand-computed distributions,
 * reproducibility and the error paths. */
#include "test.h"

#include <float.h>

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
static moas_sampler *make_ex(const moas_sampler_params *p, int32_t n_vocab) {
    moas_sampler *s = NULL;
    return moas_sampler_create(p, n_vocab, &s) == MOAS_OK ? s : NULL;
}

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

/* +infinity logits are certain: only they are chosen, each as often (the limit of
 * softmax as their logits grow alike); greedy takes the first. Two biases of FLT_MAX
 * on one token add up to +infinity the same way. */
TEST(sampler_infinite_logits_are_certain) {
    const float logits[4] = {0.0f, INFINITY, 1.0f, INFINITY};
    int hist[4] = {0};
    int32_t t = -1;
    moas_sampler *s = make(0.0f, 0, 1.0f, 1, 4);
    ASSERT_TRUE(s != NULL);
    ASSERT_OK(moas_sampler_sample(s, logits, &t));
    ASSERT_EQ(t, 1);
    moas_sampler_free(s);
    ASSERT_TRUE((s = make(1.0f, 0, 1.0f, 7, 4)) != NULL);
    ASSERT_EQ(draw(s, logits, 4000, hist), 0);
    ASSERT_EQ(hist[0] + hist[2], 0);
    ASSERT_TRUE(hist[1] > 1800 && hist[3] > 1800);
    moas_sampler_free(s);

    moas_sampler_params p;
    moas_sampler_params_init(&p);
    const moas_logit_bias huge[2] = {{2, FLT_MAX}, {2, FLT_MAX}};
    p.n_logit_bias = 2;
    p.logit_bias = huge;
    ASSERT_TRUE((s = make_ex(&p, 3)) != NULL);
    const float finite[3] = {5.0f, 4.0f, 0.0f};
    int hist3[3] = {0};
    ASSERT_EQ(draw(s, finite, 100, hist3), 0);
    ASSERT_EQ(hist3[2], 100);
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

/* ---- 1.1: logit biases, repetition penalty, min-p, stop strings ------------------ */


TEST(sampler_logit_bias_shifts_and_bans) {
    const float logits[3] = {1.0f, 2.0f, 3.0f};
    moas_sampler_params p;
    moas_sampler *s;
    int32_t t;

    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    /* 3 - 10 = -7: token 1 (2.0) is now the largest */
    const moas_logit_bias down[1] = {{2, -10.0f}};
    p.n_logit_bias = 1;
    p.logit_bias = down;
    ASSERT_TRUE((s = make_ex(&p, 3)) != NULL);
    ASSERT_OK(moas_sampler_sample(s, logits, &t));
    ASSERT_EQ(t, 1);
    ASSERT_TRUE(logits[2] == 3.0f);   /* the caller's logits are only read */
    moas_sampler_free(s);
    /* two entries for one token add up: 1 + 1.5 + 1.0 = 3.5 > 3 */
    const moas_logit_bias up[2] = {{0, 1.5f}, {0, 1.0f}};
    p.n_logit_bias = 2;
    p.logit_bias = up;
    ASSERT_TRUE((s = make_ex(&p, 3)) != NULL);
    ASSERT_OK(moas_sampler_sample(s, logits, &t));
    ASSERT_EQ(t, 0);
    moas_sampler_free(s);
    /* -infinity bans: at temperature 1 token 2 (otherwise 66.5%) and 1 never come */
    const moas_logit_bias ban[2] = {{2, -INFINITY}, {1, -INFINITY}};
    p.logit_bias = ban;
    p.temperature = 1.0f;
    ASSERT_TRUE((s = make_ex(&p, 3)) != NULL);
    int hist[3] = {0};
    ASSERT_EQ(draw(s, logits, 1000, hist), 0);
    ASSERT_EQ(hist[0], 1000);
    moas_sampler_free(s);
    /* every token banned: nothing finite is left */
    const moas_logit_bias all[3] = {{0, -INFINITY}, {1, -INFINITY}, {2, -INFINITY}};
    p.n_logit_bias = 3;
    p.logit_bias = all;
    ASSERT_TRUE((s = make_ex(&p, 3)) != NULL);
    ASSERT_STATUS(moas_sampler_sample(s, logits, &t), MOAS_ERR_INVALID_ARG);
    moas_sampler_free(s);
    return TEST_PASS;
}

TEST(sampler_repeat_penalty_hand_computed) {
    moas_sampler_params p;
    moas_sampler *s;
    int32_t t;

    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 2;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    /* greedy, remembering its own choices, the last 2 of them */
    const float l[4] = {2.0f, 3.0f, -1.0f, 2.5f};
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 1);   /* nothing remembered: 3.0 */
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 3);   /* [1]: 3.0 / 2 = 1.5 < 2.5 */
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 0);   /* [1, 3]: 1.5 and 1.25 < 2.0 */
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 1);   /* [3, 0]: 1 has left the window of 2; 3.0 */
    moas_sampler_reset(s);
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 1);   /* forgotten: 3.0 again */
    /* a negative logit is multiplied: -0.4 * 2 = -0.8 < -0.5 */
    const float neg[4] = {-0.5f, -3.0f, -0.4f, -2.0f};
    moas_sampler_reset(s);
    ASSERT_OK(moas_sampler_sample(s, neg, &t));
    ASSERT_EQ(t, 2);
    ASSERT_OK(moas_sampler_sample(s, neg, &t));
    ASSERT_EQ(t, 0);
    /* a token remembered twice is penalised once: 3.0 / 2 = 1.5 > 1.0, not 0.75 */
    const float two[4] = {1.0f, 3.0f, -5.0f, -5.0f};
    moas_sampler_reset(s);
    ASSERT_OK(moas_sampler_accept(s, 1));
    ASSERT_OK(moas_sampler_accept(s, 1));
    ASSERT_OK(moas_sampler_sample(s, two, &t));
    ASSERT_EQ(t, 1);
    ASSERT_STATUS(moas_sampler_accept(s, 4), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_sampler_accept(s, -1), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_sampler_accept(NULL, 0), MOAS_ERR_INVALID_ARG);
    moas_sampler_free(s);

    /* repeat_last_n 0 turns the penalty off; accept still checks its token */
    p.repeat_last_n = 0;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    ASSERT_OK(moas_sampler_accept(s, 1));
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 1);
    ASSERT_STATUS(moas_sampler_accept(s, 4), MOAS_ERR_INVALID_ARG);
    moas_sampler_free(s);
    return TEST_PASS;
}

/* OpenAI's penalties: count * frequency_penalty + presence_penalty subtracted from each
 * remembered token's logit, after the repetition penalty; greedy choices whose margins
 * are hand-computed. */
TEST(sampler_frequency_and_presence_penalties_hand_computed) {
    moas_sampler_params p;
    moas_sampler *s = NULL;
    int32_t t;
    const float l[4] = {2.0f, 1.6f, 1.0f, -9.0f};

    /* frequency: once per occurrence among the last 4 */
    moas_sampler_params_init(&p);
    ASSERT_TRUE(p.frequency_penalty == 0.0f && p.presence_penalty == 0.0f);
    p.temperature = 0.0f;
    p.repeat_last_n = 4;
    p.frequency_penalty = 0.25f;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    ASSERT_OK(moas_sampler_accept(s, 0));
    const int32_t want[7] = {
        0,   /* [0]: 2.0 - 0.25 = 1.75 > 1.6 */
        1,   /* [0 0]: 2.0 - 0.5 = 1.5 < 1.6 */
        0,   /* [0 0 1]: 1.5 > 1.6 - 0.25 = 1.35 */
        1,   /* [0 0 1 0]: 2.0 - 0.75 = 1.25 < 1.35 */
        0,   /* [0 1 0 1]: the first 0 has left the window: 1.5 > 1.6 - 0.5 = 1.1 */
        0,   /* [1 0 1 0]: 1.5 > 1.1 */
        1,   /* [0 1 0 0]: 1.25 < 1.35 */
    };
    for (int i = 0; i < 7; i++) {
        ASSERT_OK(moas_sampler_sample(s, l, &t));
        ASSERT_EQ(t, want[i]);
    }
    moas_sampler_reset(s);   /* forgotten: no penalty */
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 0);
    moas_sampler_free(s);

    /* presence: once, however often: 2.0 - 0.5 = 1.5 < 1.6, and 2.0 - 0.3 = 1.7 > 1.6
     * (as a frequency penalty, three times 0.3 would be 1.1) */
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.presence_penalty = 0.5f;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    for (int i = 0; i < 3; i++) {
        ASSERT_OK(moas_sampler_accept(s, 0));
    }
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 1);
    moas_sampler_free(s);
    p.presence_penalty = 0.3f;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    for (int i = 0; i < 3; i++) {
        ASSERT_OK(moas_sampler_accept(s, 0));
    }
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 0);
    moas_sampler_free(s);

    /* after the repetition penalty: 2.0 / 2 - (2 * 0.25 + 0.5) = 0.0 < 0.25 (subtracting
     * first would give (2.0 - 1.0) / 2 = 0.5 > 0.25) */
    const float order[4] = {2.0f, 0.25f, -1.0f, -9.0f};
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.repeat_penalty = 2.0f;
    p.frequency_penalty = 0.25f;
    p.presence_penalty = 0.5f;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    ASSERT_OK(moas_sampler_accept(s, 0));
    ASSERT_OK(moas_sampler_accept(s, 0));
    ASSERT_OK(moas_sampler_sample(s, order, &t));
    ASSERT_EQ(t, 1);
    moas_sampler_free(s);

    /* negative values favour what was seen: 1.6 + 1.0 = 2.6 > 2.0 */
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.frequency_penalty = -1.0f;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    ASSERT_OK(moas_sampler_accept(s, 1));
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 1);
    moas_sampler_free(s);

    /* repeat_last_n 0 turns them off too */
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.presence_penalty = 5.0f;
    p.repeat_last_n = 0;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    ASSERT_OK(moas_sampler_accept(s, 0));
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 0);
    moas_sampler_free(s);

    /* not finite: refused; a struct from before the fields: never read */
    moas_sampler_params_init(&p);
    p.frequency_penalty = NAN;
    ASSERT_STATUS(moas_sampler_create(&p, 4, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(s == NULL && strstr(moas_last_error(), "frequency_penalty") != NULL);
    moas_sampler_params_init(&p);
    p.presence_penalty = -INFINITY;
    ASSERT_STATUS(moas_sampler_create(&p, 4, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(s == NULL && strstr(moas_last_error(), "presence_penalty") != NULL);
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.size = (uint32_t)offsetof(moas_sampler_params, frequency_penalty);
    p.frequency_penalty = NAN;
    p.presence_penalty = 100.0f;
    ASSERT_OK(moas_sampler_create(&p, 4, &s));
    ASSERT_OK(moas_sampler_accept(s, 0));
    ASSERT_OK(moas_sampler_sample(s, l, &t));
    ASSERT_EQ(t, 0);
    moas_sampler_free(s);
    return TEST_PASS;
}

/* p = 0.5, 0.3, 0.15, 0.05: relative to the most likely 1, 0.6, 0.3, 0.1. min-p 0.2
 * keeps the first three, exactly as top-k 3 does: the same draws from the same seed. */
TEST(sampler_min_p_cuts_relative_to_the_most_likely) {
    const float logits[4] = {-0.69314718f, -1.2039728f, -1.89712f, -2.9957323f};
    moas_sampler_params p;
    moas_sampler *a, *b;

    moas_sampler_params_init(&p);
    p.seed = 7;
    p.min_p = 0.2f;
    ASSERT_TRUE((a = make_ex(&p, 4)) != NULL);
    ASSERT_TRUE((b = make(1.0f, 3, 1.0f, 7, 4)) != NULL);
    int hist[4] = {0};
    for (int i = 0; i < 2000; i++) {
        int32_t ta, tb;
        ASSERT_OK(moas_sampler_sample(a, logits, &ta));
        ASSERT_OK(moas_sampler_sample(b, logits, &tb));
        ASSERT_EQ(ta, tb);
        hist[ta]++;
    }
    ASSERT_EQ(hist[3], 0);
    ASSERT_TRUE(hist[2] > 0);
    moas_sampler_free(a);
    moas_sampler_free(b);
    /* min-p 0.7 keeps only the most likely (0.6 < 0.7) */
    p.min_p = 0.7f;
    ASSERT_TRUE((a = make_ex(&p, 4)) != NULL);
    int only[4] = {0};
    ASSERT_EQ(draw(a, logits, 500, only), 0);
    ASSERT_EQ(only[0], 500);
    moas_sampler_free(a);
    return TEST_PASS;
}

TEST(sampler_new_params_are_checked_and_old_sizes_work) {
    moas_sampler_params p;
    moas_sampler *s = NULL;
    const moas_logit_bias bad_token[1] = {{3, 1.0f}}, bad_nan[1] = {{0, NAN}},
                          bad_inf[1] = {{0, INFINITY}};

    moas_sampler_params_init(&p);
    ASSERT_TRUE(p.min_p == 0.0f && p.repeat_penalty == 1.0f);
    ASSERT_EQ(p.repeat_last_n, 64);
    ASSERT_EQ(p.n_logit_bias, 0);
    ASSERT_TRUE(p.logit_bias == NULL);
#define BAD_(field_, value_)                                                     \
    do {                                                                         \
        moas_sampler_params_init(&p);                                            \
        p.field_ = value_;                                                       \
        ASSERT_STATUS(moas_sampler_create(&p, 3, &s), MOAS_ERR_INVALID_ARG);     \
        ASSERT_TRUE(s == NULL);                                                  \
    } while (0)
    BAD_(min_p, -0.1f);
    BAD_(min_p, 1.5f);
    BAD_(min_p, NAN);
    BAD_(repeat_penalty, 0.0f);
    BAD_(repeat_penalty, -1.0f);
    BAD_(repeat_penalty, INFINITY);
    BAD_(repeat_last_n, -1);
    BAD_(n_logit_bias, -1);
    BAD_(n_logit_bias, 1);   /* with a NULL logit_bias */
#undef BAD_
    moas_sampler_params_init(&p);
    p.n_logit_bias = 1;
    p.logit_bias = bad_token;
    ASSERT_STATUS(moas_sampler_create(&p, 3, &s), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "token 3") != NULL);
    p.logit_bias = bad_nan;
    ASSERT_STATUS(moas_sampler_create(&p, 3, &s), MOAS_ERR_INVALID_ARG);
    p.logit_bias = bad_inf;
    ASSERT_STATUS(moas_sampler_create(&p, 3, &s), MOAS_ERR_INVALID_ARG);

    /* a 1.0 program's struct ends before min_p: what follows is never read */
    moas_sampler_params_init(&p);
    p.temperature = 0.0f;
    p.size = (uint32_t)offsetof(moas_sampler_params, min_p);
    p.min_p = -5.0f;
    p.n_logit_bias = 99;
    ASSERT_OK(moas_sampler_create(&p, 3, &s));
    const float logits[3] = {1.0f, 2.0f, 3.0f};
    int32_t t;
    ASSERT_OK(moas_sampler_sample(s, logits, &t));
    ASSERT_EQ(t, 2);
    moas_sampler_free(s);
    return TEST_PASS;
}

TEST(text_find_stop_hand_computed) {
    const char *const stops[3] = {"\n\n", "", "Amen"};
    size_t end = 99;
    int32_t found = 99;

#define FIND_(text_, more_, want_end_, want_found_)                                       \
    do {                                                                                  \
        ASSERT_OK(moas_text_find_stop(text_, strlen(text_), stops, 3, more_, &end, &found)); \
        ASSERT_EQ(end, want_end_);                                                        \
        ASSERT_EQ(found, want_found_);                                                    \
    } while (0)
    FIND_("And it was so.\n\nAnd", 1, 14, 1);   /* the first whole one */
    FIND_("so. Amen.\n\n", 1, 4, 1);            /* the earlier of two */
    FIND_("so. Am", 1, 4, 0);                   /* "Am" may become "Amen": held back */
    FIND_("so. Am", 0, 6, 0);                   /* ... unless nothing follows */
    FIND_("so. A\n", 1, 5, 0);                  /* "\n" may become "\n\n" */
    FIND_("so. Ax", 1, 6, 0);                   /* "Ax" cannot */
    FIND_("", 1, 0, 0);
#undef FIND_
    /* a whole stop string ends the text at once, though a cut-off one began earlier
     * ("abcd" might still complete at 0): generation stops when one is written */
    const char *const two[2] = {"abcd", "c"};
    ASSERT_OK(moas_text_find_stop("abc", 3, two, 2, 1, &end, &found));
    ASSERT_EQ(end, 2);
    ASSERT_EQ(found, 1);
    ASSERT_OK(moas_text_find_stop("abc", 3, two, 2, 0, &end, &found));
    ASSERT_EQ(end, 2);
    ASSERT_EQ(found, 1);
    /* two whole at once (both end at the last character): the earlier start wins */
    const char *const nested[2] = {"c", "bc"};
    ASSERT_OK(moas_text_find_stop("abc", 3, nested, 2, 1, &end, &found));
    ASSERT_EQ(end, 1);
    ASSERT_EQ(found, 1);
    /* held back from the first cut-off start, a later cut-off one notwithstanding */
    const char *const cut[2] = {"xyz", "yq"};
    ASSERT_OK(moas_text_find_stop("axy", 3, cut, 2, 1, &end, &found));
    ASSERT_EQ(end, 1);
    ASSERT_EQ(found, 0);
    /* no stop strings: everything can be shown */
    ASSERT_OK(moas_text_find_stop("abc", 3, NULL, 0, 1, &end, &found));
    ASSERT_EQ(end, 3);
    ASSERT_EQ(found, 0);
    const char *const with_null[1] = {NULL};
    ASSERT_STATUS(moas_text_find_stop("abc", 3, with_null, 1, 1, &end, &found),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_text_find_stop(NULL, 3, two, 2, 1, &end, &found), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_text_find_stop("abc", 3, NULL, 2, 1, &end, &found), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_text_find_stop("abc", 3, two, 2, 1, NULL, &found), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_text_find_stop("abc", 3, two, 2, 1, &end, NULL), MOAS_ERR_INVALID_ARG);
    return TEST_PASS;
}

/* Cuts at their exact boundaries, on logits whose probabilities are exact (expf(0) is
 * 1): equal logits rank by lower id, so top-k 2 and top-p 0.5 of four equal tokens
 * keep ids 0 and 1 (kept mass 2 reaches 0.5 * 4 exactly: the smallest set with mass
 * >= p), and min-p 1 keeps the two tokens exactly as likely as the most likely one
 * and nothing less likely, whatever their ids. */
TEST(sampler_cuts_keep_exact_boundaries_and_lowest_ids_of_ties) {
    const float equal[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    moas_sampler_params p;
    moas_sampler *s;
    int hist[4] = {0};

    ASSERT_TRUE((s = make(1.0f, 2, 1.0f, 3, 4)) != NULL);
    ASSERT_EQ(draw(s, equal, 1000, hist), 0);
    ASSERT_EQ(hist[2] + hist[3], 0);
    ASSERT_TRUE(hist[0] > 0 && hist[1] > 0);
    moas_sampler_free(s);

    memset(hist, 0, sizeof hist);
    ASSERT_TRUE((s = make(1.0f, 0, 0.5f, 4, 4)) != NULL);
    ASSERT_EQ(draw(s, equal, 1000, hist), 0);
    ASSERT_EQ(hist[2] + hist[3], 0);
    ASSERT_TRUE(hist[0] > 0 && hist[1] > 0);
    moas_sampler_free(s);

    const float two_best[4] = {1.0f, 2.0f, 2.0f, 0.0f};
    moas_sampler_params_init(&p);
    p.seed = 5;
    p.min_p = 1.0f;
    ASSERT_TRUE((s = make_ex(&p, 4)) != NULL);
    memset(hist, 0, sizeof hist);
    ASSERT_EQ(draw(s, two_best, 1000, hist), 0);
    ASSERT_EQ(hist[0] + hist[3], 0);
    ASSERT_TRUE(hist[1] > 0 && hist[2] > 0);
    moas_sampler_free(s);
    return TEST_PASS;
}
