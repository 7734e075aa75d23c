/*
 * fuzz.h - what the fuzz targets share: the libFuzzer entry point, a check that
 * stops the run with a message, a counting allocator, tiny models, and a cursor that
 * turns input bytes into choices.
 *
 * A target is one LLVMFuzzerTestOneInput(). Built with -fsanitize=fuzzer it runs
 * under libFuzzer; linked with replay.c it replays corpus files from a plain main()
 * (make fuzz-replay, part of make test). Either way a failed FUZZ_CHECK prints the
 * expression and aborts, which both drivers report as a crash.
 */
#ifndef MOAS_FUZZ_H
#define MOAS_FUZZ_H

#include "moas.h"
#include "support/tiny_model.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An invariant of the library that an input broke: report it and crash, so that
 * libFuzzer saves the input. Not for conditions the input may legitimately cause. */
#define FUZZ_CHECK(cond_)                                                               \
    do {                                                                                \
        if (!(cond_)) {                                                                 \
            fprintf(stderr, "%s:%d: FUZZ_CHECK(%s) failed; last error: %s\n", __FILE__, \
                    __LINE__, #cond_, moas_last_error());                               \
            abort();                                                                    \
        }                                                                               \
    } while (0)

/* An allocator that counts (a moas_allocator with fuzz_count_alloc, fuzz_count_free
 * and a fuzz_counting as its user data): the calls asked for, the blocks still live,
 * and allocation number fail_at (1-based; 0: none) fails, so that a target can check
 * that nothing leaks and that every allocation failure is handled. */
typedef struct {
    long n_calls;   /* allocations asked for */
    long fail_at;   /* fail this one (1-based); 0: never */
    long live;      /* blocks handed out and not yet freed */
} fuzz_counting;

static inline void *fuzz_count_alloc(void *user, size_t size) {
    fuzz_counting *c = user;
    if (++c->n_calls == c->fail_at) {
        return NULL;
    }
    void *p = malloc(size);
    c->live += p != NULL;
    return p;
}

static inline void fuzz_count_free(void *user, void *ptr) {
    fuzz_counting *c = user;
    c->live -= ptr != NULL;
    free(ptr);
}

/* One of a target's fixed models: a tiny model of cfg (tests/support/tiny_model.h)
 * loaded from memory, its image kept alive with it for the whole process. */
static inline moas_model *fuzz_tiny_model(const tiny_model_config *cfg, uint64_t seed) {
    size_t size;
    moas_model *m = NULL;
    uint8_t *image = tiny_model_image(cfg, seed, &size);
    FUZZ_CHECK(image != NULL);
    FUZZ_CHECK(moas_model_load_memory(image, size, NULL, &m) == MOAS_OK);
    return m;
}

/* Input bytes consumed front to back; past the end every read is 0. */
typedef struct {
    const uint8_t *p;
    size_t n;
} fuzz_cursor;

static inline uint8_t fuzz_u8(fuzz_cursor *c) {
    if (c->n == 0) {
        return 0;
    }
    c->n--;
    return *c->p++;
}

static inline uint16_t fuzz_u16(fuzz_cursor *c) {
    const uint16_t lo = fuzz_u8(c);
    return (uint16_t)(lo | (uint16_t)fuzz_u8(c) << 8);
}

static inline uint32_t fuzz_u32(fuzz_cursor *c) {
    const uint32_t lo = fuzz_u16(c);
    return lo | (uint32_t)fuzz_u16(c) << 16;
}

/* FNV-1a of the input: a cheap deterministic seed for choices that should not use
 * up input bytes. */
static inline uint64_t fuzz_hash(const uint8_t *data, size_t size) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < size; i++) {
        h = (h ^ data[i]) * 0x100000001b3ull;
    }
    return h;
}

/* Every failing call must record its own message. To see that it did, record a
 * known one first (a NULL-argument failure) and compare after the call. */
static char fuzz_primed_[512];

static inline void fuzz_prime_error(void) {
    (void)moas_context_truncate(NULL, 0);
    snprintf(fuzz_primed_, sizeof fuzz_primed_, "%s", moas_last_error());
}

static inline int fuzz_error_replaced(void) {
    return moas_last_error()[0] != '\0' && strcmp(moas_last_error(), fuzz_primed_) != 0;
}

#endif /* MOAS_FUZZ_H */
