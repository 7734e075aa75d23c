/*
 * core.h - what every libmoas source file needs: status plumbing, the per-object
 * allocator, overflow-checked size arithmetic and the debug assertion.
 *
 * Nothing here is public. Non-static names start with moas__ and are hidden from the
 * shared library by -fvisibility=hidden; the static library still carries them, which
 * is how the tests reach them.
 */
#ifndef MOAS_CORE_H
#define MOAS_CORE_H

#include "moas.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define MOAS_PRINTF(fmt_, args_) __attribute__((format(printf, fmt_, args_)))
#else
#define MOAS_PRINTF(fmt_, args_)
#endif

/* Record the message for this thread's moas_last_error(). printf-style. */
void moas__set_error(const char *fmt, ...) MOAS_PRINTF(1, 2);

/* The buffer behind moas_last_error(), for the API boundary to forward to a log. */
const char *moas__error_text(void);

/* Fail the current function with `status_` when `cond_` holds. The printf-style
 * message (required) becomes this thread's moas_last_error(). Use for failures caused
 * by input, never for our own invariants. */
#define MOAS_RETURN_IF(cond_, status_, ...)                                  \
    do {                                                                     \
        if (cond_) {                                                         \
            moas__set_error(__VA_ARGS__);                                    \
            return (status_);                                                \
        }                                                                    \
    } while (0)

/* Pass a callee's failure up unchanged; its message is already recorded. */
#define MOAS_TRY(expr_)                                                      \
    do {                                                                     \
        moas_status moas_try_ = (expr_);                                     \
        if (moas_try_ != MOAS_OK) return moas_try_;                          \
    } while (0)

/* Invariants of our own code, checked only in debug and test builds. A failure
 * records an ERR_INTERNAL-style message and traps; it is never used for anything a
 * file or a caller controls. */
#if defined(MOAS_DEBUG)
void moas__assert_fail(const char *expr, const char *file, int line);
#define MOAS_ASSERT(x_) ((x_) ? (void)0 : moas__assert_fail(#x_, __FILE__, __LINE__))
#else
#define MOAS_ASSERT(x_) ((void)0)
#endif

/* Forward the current error text to a log callback, if there is one. Called at the
 * API boundary when a call fails, so a log sees exactly what moas_last_error() says. */
void moas__log_error(moas_log_fn log, void *user);

/* Format a line and send it to `log` at `level`; does nothing when `log` is NULL. */
void moas__log(moas_log_fn log, void *user, moas_log_level level, const char *fmt, ...)
    MOAS_PRINTF(4, 5);

/* Allocation through an object's allocator (NULL means libc). moas__calloc zeroes
 * and checks n * size for overflow. Both return NULL on failure, and never record
 * an error: the caller knows what it was allocating and says so. */
void *moas__malloc(const moas_allocator *alloc, size_t size);
void *moas__calloc(const moas_allocator *alloc, size_t n, size_t size);
void moas__free(const moas_allocator *alloc, void *ptr);

/* Size arithmetic on file-derived values: false on overflow, *out untouched then. */
static inline bool moas__size_mul(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) {
        return false;
    }
    *out = a * b;
    return true;
}

static inline bool moas__size_add(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) {
        return false;
    }
    *out = a + b;
    return true;
}

/* Copy the defaults in `defaults` (a full struct of `full_size` bytes whose first field
 * is the uint32_t size) into the caller's struct of `size` bytes: only what fits, and
 * with the size field saying how much that was. */
void moas__params_fill(void *params, size_t size, void *defaults, size_t full_size);

/* Read the caller's params struct safely whatever its `size`: start from the
 * defaults, then copy the first `size` bytes the caller provided. Returns false when
 * `size` is too small to hold even the size field, or larger than we know (a newer
 * header's fields we cannot honour). */
bool moas__params_copy(void *dst, size_t dst_size, const void *src);

#endif /* MOAS_CORE_H */
