/*
 * test.h - the test harness: TEST() definitions and ASSERT macros that print the
 * expression and both values, then fail the test. Operands are evaluated once.
 * A test returns TEST_PASS (0), or TEST_SKIP after test_skip("reason").
 */
#ifndef MOAS_TEST_H
#define MOAS_TEST_H

#include "moas.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TEST_PASS 0
#define TEST_FAIL 1
#define TEST_SKIP 77

#define TEST(name_)             \
    int test_##name_(void);     \
    int test_##name_(void)

void test_report(const char *file, int line, const char *what, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Record why a test is skipped; return its value from the test. */
int test_skip(const char *reason);

/* Repository-relative path of a test data file (tests/data/NAME). */
const char *test_data(const char *name);

#define ASSERT_TRUE(c_)                                                                  \
    do {                                                                                 \
        if (!(c_)) {                                                                     \
            test_report(__FILE__, __LINE__, "ASSERT_TRUE(" #c_ ")", "false");            \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

#define ASSERT_EQ(a_, b_)                                                                \
    do {                                                                                 \
        long long ta_ = (long long)(a_), tb_ = (long long)(b_);                          \
        if (ta_ != tb_) {                                                                \
            test_report(__FILE__, __LINE__, "ASSERT_EQ(" #a_ ", " #b_ ")",               \
                        "%lld != %lld", ta_, tb_);                                       \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

#define ASSERT_OK(st_)                                                                   \
    do {                                                                                 \
        moas_status ts_ = (st_);                                                         \
        if (ts_ != MOAS_OK) {                                                            \
            test_report(__FILE__, __LINE__, "ASSERT_OK(" #st_ ")", "status %d (%s): %s", \
                        (int)ts_, moas_status_string(ts_), moas_last_error());           \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

#define ASSERT_STATUS(st_, want_)                                                        \
    do {                                                                                 \
        moas_status ts_ = (st_), tw_ = (want_);                                          \
        if (ts_ != tw_) {                                                                \
            test_report(__FILE__, __LINE__, "ASSERT_STATUS(" #st_ ", " #want_ ")",       \
                        "got %d (%s), want %d (%s); last error: %s", (int)ts_,           \
                        moas_status_string(ts_), (int)tw_, moas_status_string(tw_),      \
                        moas_last_error());                                              \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

#define ASSERT_STR_EQ(a_, b_)                                                            \
    do {                                                                                 \
        const char *ta_ = (a_), *tb_ = (b_);                                             \
        if (ta_ == NULL || tb_ == NULL || strcmp(ta_, tb_) != 0) {                       \
            test_report(__FILE__, __LINE__, "ASSERT_STR_EQ(" #a_ ", " #b_ ")",           \
                        "\"%s\" != \"%s\"", ta_ ? ta_ : "(null)", tb_ ? tb_ : "(null)"); \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

/* |a - b| <= tol, and neither is NaN. */
#define ASSERT_NEAR(a_, b_, tol_)                                                        \
    do {                                                                                 \
        double ta_ = (double)(a_), tb_ = (double)(b_), tt_ = (double)(tol_);             \
        if (!(fabs(ta_ - tb_) <= tt_)) {                                                 \
            test_report(__FILE__, __LINE__, "ASSERT_NEAR(" #a_ ", " #b_ ", " #tol_ ")",  \
                        "%.9g vs %.9g: difference %.3g > %.3g", ta_, tb_,                \
                        fabs(ta_ - tb_), tt_);                                           \
            return TEST_FAIL;                                                            \
        }                                                                                \
    } while (0)

#endif /* MOAS_TEST_H */
