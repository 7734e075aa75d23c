/*
 * replay.c - run a fuzz target without libFuzzer: feed it every file named on the
 * command line, and every regular file in every directory named there (not
 * recursively; in name order), once each.
 *
 * Linked with one fuzz_*.c, this is how `make test` runs the committed corpus with
 * the ordinary compiler, and how a crasher found elsewhere is reproduced under gdb,
 * valgrind or a sanitizer build: build/fuzz/replay_load crash-1234.
 *
 * Exit status 0 when every input ran; a target that finds a broken invariant
 * aborts, and the name of the input it was running is printed first.
 */
#include "fuzz.h"

#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char current[4096];   /* the input being run, for the crash message */

static void say_current(void) {
    static const char head[] = "replay: crashed on input ";
    if (current[0] != '\0') {
        (void)!write(2, head, sizeof head - 1);
        (void)!write(2, current, strlen(current));
        (void)!write(2, "\n", 1);
    }
}

static void on_signal(int sig) {
    say_current();
    signal(sig, SIG_DFL);
    raise(sig);
}

/* Sanitizers end the process through their own path; ask them to name the input too. */
#if defined(__GNUC__)
extern void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));
#endif

static int run_file(const char *path) {
    FILE *f = fopen(path, "rb");
    uint8_t *buf = NULL;
    size_t size = 0, cap = 0;

    if (f == NULL) {
        fprintf(stderr, "replay: cannot open %s: %s\n", path, strerror(errno));
        return 1;
    }
    for (;;) {
        if (size == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            uint8_t *grown = realloc(buf, cap);
            if (grown == NULL) {
                fprintf(stderr, "replay: out of memory reading %s\n", path);
                free(buf);
                fclose(f);
                return 1;
            }
            buf = grown;
        }
        const size_t got = fread(buf + size, 1, cap - size, f);
        size += got;
        if (got == 0) {
            break;
        }
    }
    const int bad = ferror(f);
    fclose(f);
    if (bad) {
        fprintf(stderr, "replay: cannot read %s\n", path);
        free(buf);
        return 1;
    }
    /* Give the target exactly `size` bytes, as libFuzzer does, so that a sanitizer
     * sees a read past the end. */
    uint8_t *exact = malloc(size ? size : 1);
    if (exact == NULL) {
        free(buf);
        return 1;
    }
    memcpy(exact, buf, size);
    free(buf);
    snprintf(current, sizeof current, "%s", path);
    LLVMFuzzerTestOneInput(exact, size);
    current[0] = '\0';
    free(exact);
    return 0;
}

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Run every regular file in `dir`; returns the number of failures, *n_run the runs. */
static int run_dir(const char *dir, int *n_run) {
    DIR *d = opendir(dir);
    char **names = NULL;
    size_t n = 0, cap = 0;
    int failures = 0;
    struct dirent *e;

    if (d == NULL) {
        fprintf(stderr, "replay: cannot open directory %s: %s\n", dir, strerror(errno));
        return 1;
    }
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') {
            continue;   /* ".", "..", and hidden files such as .gitignore */
        }
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **grown = realloc(names, cap * sizeof *names);
            if (grown == NULL) {
                failures++;
                break;
            }
            names = grown;
        }
        const size_t len = strlen(dir) + strlen(e->d_name) + 2;
        names[n] = malloc(len);
        if (names[n] == NULL) {
            failures++;
            break;
        }
        snprintf(names[n], len, "%s/%s", dir, e->d_name);
        n++;
    }
    closedir(d);
    if (n > 0) {
        qsort(names, n, sizeof *names, by_name);
    }
    for (size_t i = 0; i < n; i++) {
        struct stat st;
        if (stat(names[i], &st) == 0 && S_ISREG(st.st_mode)) {
            failures += run_file(names[i]);
            (*n_run)++;
        }
        free(names[i]);
    }
    free(names);
    return failures;
}

int main(int argc, char **argv) {
    int failures = 0, n_run = 0;

    signal(SIGABRT, on_signal);
    signal(SIGSEGV, on_signal);
    signal(SIGBUS, on_signal);
    signal(SIGILL, on_signal);
    signal(SIGFPE, on_signal);
#if defined(__GNUC__)
    if (__sanitizer_set_death_callback != NULL) {
        __sanitizer_set_death_callback(say_current);
    }
#endif
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE|DIR...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            fprintf(stderr, "replay: cannot stat %s: %s\n", argv[i], strerror(errno));
            failures++;
        } else if (S_ISDIR(st.st_mode)) {
            failures += run_dir(argv[i], &n_run);
        } else {
            failures += run_file(argv[i]);
            n_run++;
        }
    }
    printf("replay %s: %d inputs, %d unreadable\n", argv[0], n_run, failures);
    return failures == 0 ? 0 : 1;
}
