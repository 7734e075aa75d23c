/*
 * core.c - version, status strings, the per-thread error message, logging and the
 * allocator wrappers.
 *
 * The error message lives in a C11 _Thread_local buffer, so FFI users read a precise
 * cause without installing callbacks, and two threads never see each other's errors.
 */
#include "core.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Long enough for a message naming a tensor, two shapes and an offset. */
#define ERROR_CAPACITY 512

static _Thread_local char error_text[ERROR_CAPACITY];

int32_t moas_version_number(void) {
    return MOAS_VERSION_NUMBER;
}

const char *moas_version_string(void) {
    return MOAS_VERSION_STRING;
}

const char *moas_status_string(moas_status status) {
    switch (status) {
#define MOAS_STATUS_CASE_(name_, value_, msg_) \
    case MOAS_##name_:                         \
        return msg_;
        MOAS_STATUS_MAP(MOAS_STATUS_CASE_)
#undef MOAS_STATUS_CASE_
    default:
        return "unknown status";
    }
}

const char *moas_status_name(moas_status status) {
    switch (status) {
#define MOAS_STATUS_NAME_(name_, value_, msg_) \
    case MOAS_##name_:                          \
        return "MOAS_" #name_;
        MOAS_STATUS_MAP(MOAS_STATUS_NAME_)
#undef MOAS_STATUS_NAME_
    default:
        return "MOAS_UNKNOWN";
    }
}

const char *moas_last_error(void) {
    return error_text;
}

const char *moas__error_text(void) {
    return error_text;
}

void moas__set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, ap);
    va_end(ap);
}

void moas__log_error(moas_log_fn log, void *user) {
    if (log != NULL) {
        log(user, MOAS_LOG_ERROR, error_text);
    }
}

void moas__log(moas_log_fn log, void *user, moas_log_level level, const char *fmt, ...) {
    char line[ERROR_CAPACITY];
    va_list ap;

    if (log == NULL) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    log(user, level, line);
}

#if defined(MOAS_DEBUG)
void moas__assert_fail(const char *expr, const char *file, int line) {
    moas__set_error("internal: assertion '%s' failed at %s:%d", expr, file, line);
    /* A broken invariant of our own: stop here under a debugger or sanitizer rather
     * than compute garbage. Only debug and test builds reach this line. */
    __builtin_trap();
}
#endif

void *moas__malloc(const moas_allocator *alloc, size_t size) {
    if (size == 0) {
        size = 1;
    }
    if (alloc != NULL) {
        return alloc->alloc(alloc->user, size);
    }
    return malloc(size);
}

void *moas__calloc(const moas_allocator *alloc, size_t n, size_t size) {
    size_t bytes;
    void *p;

    if (!moas__size_mul(n, size, &bytes)) {
        return NULL;
    }
    p = moas__malloc(alloc, bytes);
    if (p != NULL) {
        memset(p, 0, bytes);
    }
    return p;
}

void moas__free(const moas_allocator *alloc, void *ptr) {
    if (ptr == NULL) {
        return;
    }
    if (alloc != NULL) {
        alloc->free(alloc->user, ptr);
    } else {
        free(ptr);
    }
}

void moas__params_fill(void *params, size_t size, void *defaults, size_t full_size) {
    uint32_t filled;
    if (params == NULL || size < sizeof(uint32_t)) {
        return;
    }
    filled = (uint32_t)(size < full_size ? size : full_size);
    memcpy(defaults, &filled, sizeof filled);
    memcpy(params, defaults, filled);
}

bool moas__params_copy(void *dst, size_t dst_size, const void *src) {
    uint32_t size;

    memcpy(&size, src, sizeof size);
    if (size < sizeof(uint32_t) || size > dst_size) {
        return false;
    }
    memcpy(dst, src, size);
    /* Keep our own idea of the size: fields past the caller's stay at defaults. */
    size = (uint32_t)dst_size;
    memcpy(dst, &size, sizeof size);
    return true;
}
