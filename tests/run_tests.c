/*
 * run_tests.c - the test runner. Runs every test in test_list.h, or those named on
 * the command line, one line each (TAP-like), then "N passed, M failed, K skipped".
 * Exits non-zero if any test failed.
 */
#include "test.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#define X(name_) int test_##name_(void);
#include "test_list.h"
#undef X

static const struct {
    const char *name;
    int (*fn)(void);
} tests[] = {
#define X(name_) {#name_, test_##name_},
#include "test_list.h"
#undef X
};

static char skip_reason[256];

void test_report(const char *file, int line, const char *what, const char *fmt, ...) {
    va_list ap;
    fprintf(stdout, "#   %s:%d: %s: ", file, line, what);
    va_start(ap, fmt);
    vfprintf(stdout, fmt, ap);
    va_end(ap);
    fputc('\n', stdout);
}

int test_skip(const char *reason) {
    snprintf(skip_reason, sizeof skip_reason, "%s", reason);
    return TEST_SKIP;
}

const char *test_data(const char *name) {
    static char path[512];
    const char *dir = getenv("MOAS_TEST_DATA");
    snprintf(path, sizeof path, "%s/%s", dir ? dir : "tests/data", name);
    return path;
}

int main(int argc, char **argv) {
    const size_t n_tests = sizeof tests / sizeof tests[0];
    int passed = 0, failed = 0, skipped = 0, number = 0;

    for (size_t i = 0; i < n_tests; i++) {
        int selected = argc < 2;
        for (int a = 1; a < argc; a++) {
            selected |= strcmp(argv[a], tests[i].name) == 0;
        }
        if (!selected) {
            continue;
        }
        number++;
        fflush(stdout);
        int rc = tests[i].fn();
        if (rc == TEST_PASS) {
            passed++;
            printf("ok %d %s\n", number, tests[i].name);
        } else if (rc == TEST_SKIP) {
            skipped++;
            printf("ok %d %s # SKIP %s\n", number, tests[i].name, skip_reason);
        } else {
            failed++;
            printf("not ok %d %s\n", number, tests[i].name);
        }
    }
    if (number == 0) {
        fprintf(stderr, "no test matches\n");
        return 2;
    }
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed == 0 ? 0 : 1;
}
