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

/* Decode one UTF-8 character from s[0..len): its code point and byte length, or
 * false for invalid or truncated UTF-8 (overlong forms, surrogates, > U+10FFFF). */
bool moas__utf8_decode(const char *s, size_t len, uint32_t *cp, size_t *n_bytes);

/* Whether `cp` is an invisible format character that changes how the text around it
 * shows: a soft hyphen, zero-width ones, the line and paragraph separators, bidi
 * embeddings, overrides and isolates, the byte order mark. */
bool moas__is_format_character(uint32_t cp);

/* Set this thread's error message (moas_last_error()), printf-style. It is made
 * printable: the control characters (C0 but a tab, DEL, C1) and format characters a
 * message may quote from a file (an architecture's name, a key, a tensor's name) are
 * written as \uXXXX, and bytes that are no UTF-8 as \xXX, so that no escape sequence,
 * carriage return or bidi override reaches a terminal or log that prints it. */
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

/* One field of a public struct that begins with its size. A caller's size may end
 * between fields (an older header's struct), never inside one: half a pointer is no
 * value to honour, and half of one written back is no value to read. */
typedef struct moas__field {
    uint32_t offset, bytes;
} moas__field;

#define MOAS__FIELD(type_, member_) \
    {(uint32_t)offsetof(type_, member_), (uint32_t)sizeof(((type_ *)0)->member_)}

/* A size-prefixed struct: its fields in order, first to last, and its sizeof. */
typedef struct moas__layout {
    const char *name;
    const moas__field *fields;
    size_t n_fields;
    size_t size;
} moas__layout;

/* The layouts of the public structs that begin with a size (core.c). */
extern const moas__layout moas__model_params_layout, moas__tensor_info_layout,
    moas__context_params_layout, moas__pool_params_layout, moas__pool_info_layout,
    moas__tokenize_params_layout, moas__sampler_params_layout;

/* The largest size <= `size` (and <= the struct's) that ends no field part way. */
size_t moas__layout_fit(const moas__layout *layout, size_t size);

/* Copy the defaults in `defaults` (a whole struct of `layout`, whose first field is the
 * uint32_t size) into the caller's struct of `size` bytes: the whole fields that fit,
 * and the size field saying how many bytes that was. Returns that count, 0 (nothing
 * written) when `params` is NULL or `size` cannot hold the size field. */
size_t moas__params_fill(void *params, size_t size, void *defaults, const moas__layout *layout);

/* Read the caller's params struct safely whatever its `size`: `dst` holds the
 * defaults, and the first `size` bytes the caller provided are copied over them.
 * Fails with MOAS_ERR_INVALID_ARG, its message starting with `caller`, when `size` is
 * too small to hold even the size field, larger than we know (a newer header's fields
 * we cannot honour) or ends inside a field. */
moas_status moas__params_copy(void *dst, const void *src, const moas__layout *layout,
                              const char *caller);

#endif /* MOAS_CORE_H */
