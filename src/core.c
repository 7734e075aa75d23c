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

bool moas__utf8_decode(const char *s, size_t len, uint32_t *cp, size_t *n_bytes) {
    const unsigned char *u = (const unsigned char *)s;
    uint32_t c, min;
    size_t n;

    if (len == 0) {
        return false;
    }
    if (u[0] < 0x80) {
        *cp = u[0];
        *n_bytes = 1;
        return true;
    } else if ((u[0] & 0xe0) == 0xc0) {
        n = 2, c = u[0] & 0x1fu, min = 0x80;
    } else if ((u[0] & 0xf0) == 0xe0) {
        n = 3, c = u[0] & 0x0fu, min = 0x800;
    } else if ((u[0] & 0xf8) == 0xf0) {
        n = 4, c = u[0] & 0x07u, min = 0x10000;
    } else {
        return false;
    }
    if (len < n) {
        return false;
    }
    for (size_t i = 1; i < n; i++) {
        if ((u[i] & 0xc0) != 0x80) {
            return false;
        }
        c = (c << 6) | (u[i] & 0x3fu);
    }
    if (c < min || c > 0x10ffff || (c >= 0xd800 && c <= 0xdfff)) {
        return false;
    }
    *cp = c;
    *n_bytes = n;
    return true;
}

bool moas__is_format_character(uint32_t cp) {
    return cp == 0xad || (cp >= 0x200b && cp <= 0x200f) || (cp >= 0x2028 && cp <= 0x202e) ||
           (cp >= 0x2060 && cp <= 0x2069) || cp == 0xfeff;
}

/* text (NUL-terminated, in a buffer of `cap` bytes) made printable in place, as
 * moas__set_error says; what no longer fits is left out whole (an escape or a
 * character is never cut). A character vsnprintf cut off at the end is bytes that
 * are no UTF-8 in a full buffer, whose escapes never fit: it goes too. */
static void make_printable(char *text, size_t cap) {
    char out[ERROR_CAPACITY];
    const size_t room = (cap < sizeof out ? cap : sizeof out) - 1;
    const size_t len = strlen(text);
    size_t o = 0;

    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t n;
        char esc[12];
        const char *piece = text + i;
        size_t piece_len;
        if (!moas__utf8_decode(text + i, len - i, &cp, &n)) {
            snprintf(esc, sizeof esc, "\\x%02x", (unsigned)(unsigned char)text[i]);
            piece = esc, piece_len = strlen(esc), n = 1;
        } else if ((cp < 0x20 && cp != '\t') || (cp >= 0x7f && cp <= 0x9f) ||
                   moas__is_format_character(cp)) {
            snprintf(esc, sizeof esc, "\\u%04x", (unsigned)cp);
            piece = esc, piece_len = strlen(esc);
        } else {
            piece_len = n;
        }
        if (o + piece_len > room) {
            break;
        }
        memcpy(out + o, piece, piece_len);
        o += piece_len;
        i += n;
    }
    out[o] = '\0';
    memcpy(text, out, o + 1);
}

void moas__set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(error_text, sizeof error_text, fmt, ap);
    va_end(ap);
    make_printable(error_text, sizeof error_text);
}

void moas__log_error(moas_log_fn log, void *user) {
    if (log != NULL) {
        /* the callback may call the library, and a call of its that fails would
         * replace the error the caller reads next: it hears a copy, which is put back */
        char text[ERROR_CAPACITY];
        memcpy(text, error_text, sizeof text);
        log(user, MOAS_LOG_ERROR, text);
        memcpy(error_text, text, sizeof text);
    }
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

size_t moas__layout_fit(const moas__layout *layout, size_t size) {
    size_t fit = size < layout->size ? size : layout->size;
    for (size_t i = 0; i < layout->n_fields; i++) {
        const moas__field *f = &layout->fields[i];
        if (f->offset < fit && fit < (size_t)f->offset + f->bytes) {
            fit = f->offset;   /* fields are in order: none before this one is cut */
            break;
        }
    }
    return fit;
}

size_t moas__params_fill(void *params, size_t size, void *defaults, const moas__layout *layout) {
    uint32_t filled;
    if (params == NULL || size < sizeof(uint32_t)) {
        return 0;
    }
    filled = (uint32_t)moas__layout_fit(layout, size);
    memcpy(defaults, &filled, sizeof filled);
    memcpy(params, defaults, filled);
    return filled;
}

moas_status moas__params_copy(void *dst, const void *src, const moas__layout *layout,
                              const char *caller) {
    uint32_t size;

    memcpy(&size, src, sizeof size);
    MOAS_RETURN_IF(size < sizeof(uint32_t), MOAS_ERR_INVALID_ARG,
                   "%s: params->size %u cannot hold the size field (call %s_init)", caller,
                   (unsigned)size, layout->name);
    MOAS_RETURN_IF(size > layout->size, MOAS_ERR_INVALID_ARG,
                   "%s: params->size %u is larger than this library's %s of %zu bytes (a "
                   "newer header's fields cannot be honoured)", caller, (unsigned)size,
                   layout->name, layout->size);
    MOAS_RETURN_IF(moas__layout_fit(layout, size) != size, MOAS_ERR_INVALID_ARG,
                   "%s: params->size %u ends inside a field of %s (call %s_init)", caller,
                   (unsigned)size, layout->name, layout->name);
    memcpy(dst, src, size);
    /* Keep our own idea of the size: fields past the caller's stay at defaults. */
    size = (uint32_t)layout->size;
    memcpy(dst, &size, sizeof size);
    return MOAS_OK;
}

/* ---- the public structs that begin with their size ------------------------------ */

/* A layout's list must end with the struct's last field: nothing but padding after
 * it (a field appended to moas.h and forgotten here fails the build). The lists are
 * checked against moas.h's declarations by tests/python/test_api_doc.py. */
#define LAYOUT_ENDS_WITH(type_, member_)                                                   \
    _Static_assert((offsetof(type_, member_) + sizeof(((type_ *)0)->member_) +             \
                    _Alignof(type_) - 1) / _Alignof(type_) * _Alignof(type_) ==            \
                       sizeof(type_),                                                      \
                   #type_ " has a field after " #member_ " that its layout lacks")
#define LAYOUT(var_, type_, fields_) \
    const moas__layout var_ = {#type_, fields_, sizeof fields_ / sizeof fields_[0], sizeof(type_)}

static const moas__field model_params_fields[] = {
    MOAS__FIELD(moas_model_params, size),     MOAS__FIELD(moas_model_params, use_mmap),
    MOAS__FIELD(moas_model_params, log),      MOAS__FIELD(moas_model_params, log_user),
    MOAS__FIELD(moas_model_params, allocator),
};
LAYOUT_ENDS_WITH(moas_model_params, allocator);
LAYOUT(moas__model_params_layout, moas_model_params, model_params_fields);

static const moas__field tensor_info_fields[] = {
    MOAS__FIELD(moas_tensor_info, size),   MOAS__FIELD(moas_tensor_info, name),
    MOAS__FIELD(moas_tensor_info, type),   MOAS__FIELD(moas_tensor_info, n_dims),
    MOAS__FIELD(moas_tensor_info, ne),     MOAS__FIELD(moas_tensor_info, offset),
    MOAS__FIELD(moas_tensor_info, n_bytes), MOAS__FIELD(moas_tensor_info, data),
};
LAYOUT_ENDS_WITH(moas_tensor_info, data);
LAYOUT(moas__tensor_info_layout, moas_tensor_info, tensor_info_fields);

static const moas__field context_params_fields[] = {
    MOAS__FIELD(moas_context_params, size),          MOAS__FIELD(moas_context_params, n_ctx),
    MOAS__FIELD(moas_context_params, n_threads),     MOAS__FIELD(moas_context_params, mode),
    MOAS__FIELD(moas_context_params, kv_type),       MOAS__FIELD(moas_context_params, kernels),
    MOAS__FIELD(moas_context_params, log),           MOAS__FIELD(moas_context_params, log_user),
    MOAS__FIELD(moas_context_params, allocator),
    MOAS__FIELD(moas_context_params, forced_scheme),
    MOAS__FIELD(moas_context_params, kv_budget_bytes),
    MOAS__FIELD(moas_context_params, route_fn),      MOAS__FIELD(moas_context_params, route_user),
    MOAS__FIELD(moas_context_params, pool),          MOAS__FIELD(moas_context_params, n_batch),
};
LAYOUT_ENDS_WITH(moas_context_params, n_batch);
LAYOUT(moas__context_params_layout, moas_context_params, context_params_fields);

static const moas__field pool_params_fields[] = {
    MOAS__FIELD(moas_pool_params, size),        MOAS__FIELD(moas_pool_params, capacity_bytes),
    MOAS__FIELD(moas_pool_params, kv_type),     MOAS__FIELD(moas_pool_params, page_heads),
    MOAS__FIELD(moas_pool_params, n_threads),   MOAS__FIELD(moas_pool_params, kernels),
    MOAS__FIELD(moas_pool_params, n_batch),     MOAS__FIELD(moas_pool_params, log),
    MOAS__FIELD(moas_pool_params, log_user),    MOAS__FIELD(moas_pool_params, allocator),
    MOAS__FIELD(moas_pool_params, steer_below), MOAS__FIELD(moas_pool_params, commit),
};
LAYOUT_ENDS_WITH(moas_pool_params, commit);
LAYOUT(moas__pool_params_layout, moas_pool_params, pool_params_fields);

static const moas__field pool_info_fields[] = {
    MOAS__FIELD(moas_pool_info, size),           MOAS__FIELD(moas_pool_info, page_heads),
    MOAS__FIELD(moas_pool_info, page_bytes),     MOAS__FIELD(moas_pool_info, n_pages),
    MOAS__FIELD(moas_pool_info, pages_free),     MOAS__FIELD(moas_pool_info, n_contexts),
    MOAS__FIELD(moas_pool_info, bytes_capacity), MOAS__FIELD(moas_pool_info, bytes_held),
    MOAS__FIELD(moas_pool_info, bytes_used),     MOAS__FIELD(moas_pool_info, bytes_stored),
    MOAS__FIELD(moas_pool_info, n_threads),
};
LAYOUT_ENDS_WITH(moas_pool_info, n_threads);
LAYOUT(moas__pool_info_layout, moas_pool_info, pool_info_fields);

static const moas__field tokenize_params_fields[] = {
    MOAS__FIELD(moas_tokenize_params, size),
    MOAS__FIELD(moas_tokenize_params, unknown),
    MOAS__FIELD(moas_tokenize_params, replacement),
};
LAYOUT_ENDS_WITH(moas_tokenize_params, replacement);
LAYOUT(moas__tokenize_params_layout, moas_tokenize_params, tokenize_params_fields);

static const moas__field sampler_params_fields[] = {
    MOAS__FIELD(moas_sampler_params, size),           MOAS__FIELD(moas_sampler_params, temperature),
    MOAS__FIELD(moas_sampler_params, top_k),          MOAS__FIELD(moas_sampler_params, top_p),
    MOAS__FIELD(moas_sampler_params, seed),           MOAS__FIELD(moas_sampler_params, allocator),
    MOAS__FIELD(moas_sampler_params, min_p),          MOAS__FIELD(moas_sampler_params, repeat_penalty),
    MOAS__FIELD(moas_sampler_params, repeat_last_n),  MOAS__FIELD(moas_sampler_params, n_logit_bias),
    MOAS__FIELD(moas_sampler_params, logit_bias),
    MOAS__FIELD(moas_sampler_params, frequency_penalty),
    MOAS__FIELD(moas_sampler_params, presence_penalty),
};
LAYOUT_ENDS_WITH(moas_sampler_params, presence_penalty);
LAYOUT(moas__sampler_params_layout, moas_sampler_params, sampler_params_fields);
