/*
 * gguf.c - read the GGUF v3 container from an image already in memory.
 *
 * Owns: the header, the metadata table, the tensor directory and the placement of the
 * data section. Does not own: what keys and tensors mean (model.c), how the image got
 * into memory (file.c) or how weights are used (forward.c).
 *
 * Every byte here comes from an untrusted file. Each read goes through take(), which
 * checks the bytes are there; each size computed from file values is checked for
 * overflow; nothing in this file asserts on file contents. A file is refused with the
 * field, the offset and the values at fault, and nothing half-built is returned.
 *
 * The parse makes two passes over the directory with the same code (walk_directory).
 * The first only measures: it validates every entry and counts the bytes of strings
 * and the string-array elements. Then one block is allocated for the whole directory
 * and the second pass fills it. A hostile header that claims a billion entries, or a
 * file truncated inside its directory or its data, is therefore refused before
 * anything is allocated, and what is allocated is bounded by what the file really
 * holds. Checks that need the whole directory come last:
 * duplicate keys and names (found by sorting, O(n log n)), general.alignment, and the
 * tensor data (aligned, inside the file, not overlapping).
 *
 * Reference: the GGUF specification, ggml/docs/gguf.md (version 3). The design of the
 * checks follows ggml's reader, src/gguf.cpp; the code is our own.
 */
#include "gguf.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

/* Smallest encodings, used to bound counts by the bytes that remain. A metadata entry
 * is a key length (8), a key of at least 1 byte, a value type (4) and a value of at
 * least 1 byte. A tensor entry is a name length (8), a name of at least 1 byte, n_dims
 * (4), one dimension (8), a type (4) and an offset (8). A string, alone or in an
 * array, is at least its 8-byte length. */
#define MIN_KV_BYTES 14u
#define MIN_TENSOR_BYTES 33u
#define MIN_STRING_BYTES 8u

/* Bytes per element of the fixed-size metadata types; 0 for STRING and ARRAY. */
static const uint8_t meta_type_size[MOAS_META_TYPE_COUNT] = {
    [MOAS_META_UINT8] = 1,  [MOAS_META_INT8] = 1,    [MOAS_META_UINT16] = 2,
    [MOAS_META_INT16] = 2,  [MOAS_META_UINT32] = 4,  [MOAS_META_INT32] = 4,
    [MOAS_META_FLOAT32] = 4, [MOAS_META_BOOL] = 1,   [MOAS_META_STRING] = 0,
    [MOAS_META_ARRAY] = 0,  [MOAS_META_UINT64] = 8,  [MOAS_META_INT64] = 8,
    [MOAS_META_FLOAT64] = 8,
};

/* ---- reading the image ---------------------------------------------------------- */

typedef struct {
    const uint8_t *base;  /* first byte of the image */
    size_t size;          /* bytes in the image */
    size_t pos;           /* next unread byte; always <= size */
    /* What is being read, for messages. Formatted only when something fails. */
    const char *section;  /* "header", "metadata entry" or "tensor entry" */
    uint64_t entry;       /* index of the entry in its section */
    const uint8_t *name;  /* the entry's key or tensor name once read, else NULL */
    size_t name_len;
    char text[MOAS_GGUF_MAX_NAME + 64];
} cursor;

/* A description of the entry being read: "key 'general.name'", "tensor entry 3". */
static const char *where(cursor *c) {
    if (c->name != NULL) {
        snprintf(c->text, sizeof c->text, "%s '%.*s'",
                 strcmp(c->section, "tensor entry") == 0 ? "tensor" : "key",
                 (int)c->name_len, (const char *)c->name);
    } else if (strcmp(c->section, "header") == 0) {
        snprintf(c->text, sizeof c->text, "header");
    } else {
        snprintf(c->text, sizeof c->text, "%s %" PRIu64, c->section, c->entry);
    }
    return c->text;
}

static void enter(cursor *c, const char *section, uint64_t entry) {
    c->section = section;
    c->entry = entry;
    c->name = NULL;
    c->name_len = 0;
}

static size_t remaining(const cursor *c) {
    return c->size - c->pos;
}

/* Take `n` bytes for the field `what`. Fails, and moves nothing, if fewer remain. */
static moas_status take(cursor *c, uint64_t n, const char *what, const uint8_t **out) {
    MOAS_RETURN_IF(n > remaining(c), MOAS_ERR_CORRUPT,
                   "gguf: %s: %s needs %" PRIu64 " bytes at offset %zu but the file "
                   "ends at %zu",
                   where(c), what, n, c->pos, c->size);
    *out = c->base + c->pos;
    c->pos += (size_t)n;
    return MOAS_OK;
}

/* GGUF integers are little-endian. Assemble them byte by byte so that neither the
 * host's byte order nor the alignment of the bytes matters. */
static uint64_t load_le(const uint8_t *p, size_t n) {
    uint64_t x = 0;
    for (size_t i = n; i > 0; i--) {
        x = (x << 8) | p[i - 1];
    }
    return x;
}

static moas_status take_u32(cursor *c, const char *what, uint32_t *out) {
    const uint8_t *p;
    MOAS_TRY(take(c, 4, what, &p));
    *out = (uint32_t)load_le(p, 4);
    return MOAS_OK;
}

static moas_status take_u64(cursor *c, const char *what, uint64_t *out) {
    const uint8_t *p;
    MOAS_TRY(take(c, 8, what, &p));
    *out = load_le(p, 8);
    return MOAS_OK;
}

/* Two's complement reinterpretation without implementation-defined conversions. */
static int64_t as_int64(uint64_t u) {
    return u <= (uint64_t)INT64_MAX ? (int64_t)u : -(int64_t)(~u) - 1;
}

/* Sign-extend the low `n` bytes of `u`. */
static int64_t sign_extend(uint64_t u, size_t n) {
    if (n < 8 && (u >> (8 * n - 1)) & 1u) {
        u |= ~(uint64_t)0 << (8 * n);
    }
    return as_int64(u);
}

static double load_float(const uint8_t *p, size_t n) {
    if (n == 4) {
        uint32_t bits = (uint32_t)load_le(p, 4);
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    uint64_t bits = load_le(p, 8);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static bool is_int_type(moas_meta_type t) {
    return t == MOAS_META_UINT8 || t == MOAS_META_INT8 || t == MOAS_META_UINT16 ||
           t == MOAS_META_INT16 || t == MOAS_META_UINT32 || t == MOAS_META_INT32 ||
           t == MOAS_META_UINT64 || t == MOAS_META_INT64 || t == MOAS_META_BOOL;
}

static bool is_signed_type(moas_meta_type t) {
    return t == MOAS_META_INT8 || t == MOAS_META_INT16 || t == MOAS_META_INT32 ||
           t == MOAS_META_INT64;
}

/* ---- the two passes -------------------------------------------------------------- */

/* State shared by the measuring and the filling pass. While measuring, `g` is NULL and
 * the counters grow; while filling, strings are copied to `chars` and string-array
 * descriptors taken from `strs`, both inside the block the first pass sized. */
typedef struct {
    moas_gguf *g;            /* NULL while measuring */
    char *chars;             /* filling: next free byte of the string arena */
    moas_gguf_string *strs;  /* filling: next free string-array descriptor */
    size_t n_chars;          /* measuring: bytes of every string, NULs included */
    size_t n_strs;           /* measuring: string-array elements */
    /* measuring: the tensor whose data ends last, relative to the data section */
    uint64_t max_end;        /* offset + n_bytes, saturated at UINT64_MAX */
    uint64_t max_offset, max_bytes;
    const uint8_t *max_name; /* in the image, not NUL-terminated */
    size_t max_name_len;
} walk;

/* Account for, or copy, `len` bytes of string text at `p`. */
static moas_status keep_string(cursor *c, walk *w, const uint8_t *p, uint64_t len,
                               moas_gguf_string *out) {
    if (w->g == NULL) {
        size_t bytes;
        /* Cannot overflow for an image in memory (len <= its size), but it is a size
         * computed from the file, so it is checked like every other. */
        MOAS_RETURN_IF(!moas__size_add((size_t)len, 1, &bytes) ||
                           !moas__size_add(w->n_chars, bytes, &w->n_chars),
                       MOAS_ERR_CORRUPT, "gguf: %s: string bytes overflow", where(c));
        out->text = "";
        out->len = len;
        return MOAS_OK;
    }
    memcpy(w->chars, p, (size_t)len);
    w->chars[len] = '\0';
    out->text = w->chars;
    out->len = len;
    w->chars += len + 1;
    return MOAS_OK;
}

/* A key or tensor name: 1 to MOAS_GGUF_MAX_NAME bytes, no NUL byte. */
static moas_status read_name(cursor *c, walk *w, const char *what, moas_gguf_string *out) {
    const size_t at = c->pos;
    uint64_t len;
    const uint8_t *p;

    MOAS_TRY(take_u64(c, what, &len));
    MOAS_RETURN_IF(len == 0, MOAS_ERR_CORRUPT, "gguf: %s: empty %s at offset %zu",
                   where(c), what, at);
    MOAS_RETURN_IF(len > MOAS_GGUF_MAX_NAME, MOAS_ERR_CORRUPT,
                   "gguf: %s: %s of %" PRIu64 " bytes at offset %zu is longer than the "
                   "limit of %d",
                   where(c), what, len, at, MOAS_GGUF_MAX_NAME);
    MOAS_TRY(take(c, len, what, &p));
    const uint8_t *nul = memchr(p, '\0', (size_t)len);
    MOAS_RETURN_IF(nul != NULL, MOAS_ERR_CORRUPT,
                   "gguf: %s: %s at offset %zu holds a NUL byte at position %td",
                   where(c), what, at + 8, nul - p);
    c->name = p;
    c->name_len = (size_t)len;
    return keep_string(c, w, p, len, out);
}

/* A string value: its length, then at most MOAS_GGUF_MAX_STRING bytes of any value. */
static moas_status read_string(cursor *c, walk *w, const char *what, moas_gguf_string *out) {
    const size_t at = c->pos;
    uint64_t len;
    const uint8_t *p;

    MOAS_TRY(take_u64(c, what, &len));
    MOAS_RETURN_IF(len > MOAS_GGUF_MAX_STRING, MOAS_ERR_CORRUPT,
                   "gguf: %s: %s of %" PRIu64 " bytes at offset %zu is longer than the "
                   "limit of %u",
                   where(c), what, len, at, MOAS_GGUF_MAX_STRING);
    MOAS_TRY(take(c, len, what, &p));
    return keep_string(c, w, p, len, out);
}

/* A metadata value type: one of GGUF's thirteen. */
static moas_status read_type(cursor *c, const char *what, moas_meta_type *out) {
    const size_t at = c->pos;
    uint32_t t;

    MOAS_TRY(take_u32(c, what, &t));
    MOAS_RETURN_IF(t >= MOAS_META_TYPE_COUNT, MOAS_ERR_CORRUPT,
                   "gguf: %s: unknown %s %" PRIu32 " at offset %zu (GGUF defines 0 to %d)",
                   where(c), what, t, at, MOAS_META_TYPE_COUNT - 1);
    *out = (moas_meta_type)t;
    return MOAS_OK;
}

/* Read bools strictly: GGUF says anything but 0 and 1 is invalid. */
static moas_status check_bools(cursor *c, const uint8_t *p, uint64_t n, size_t at) {
    for (uint64_t i = 0; i < n; i++) {
        MOAS_RETURN_IF(p[i] > 1, MOAS_ERR_CORRUPT,
                       "gguf: %s: bool value %u at offset %zu is neither 0 nor 1",
                       where(c), p[i], at + (size_t)i);
    }
    return MOAS_OK;
}

static moas_status read_array(cursor *c, walk *w, moas_gguf_value *v) {
    const size_t at = c->pos;
    moas_meta_type elem;
    uint64_t n;

    MOAS_TRY(read_type(c, "array element type", &elem));
    MOAS_RETURN_IF(elem == MOAS_META_ARRAY, MOAS_ERR_CORRUPT,
                   "gguf: %s: nested array at offset %zu (arrays of arrays are not "
                   "supported)",
                   where(c), at);
    MOAS_TRY(take_u64(c, "array length", &n));
    v->elem_type = elem;
    v->n = n;

    if (elem == MOAS_META_STRING) {
        /* Each element takes at least its 8-byte length: this bounds the count, and
         * with it the descriptors allocated, by the bytes that remain. */
        MOAS_RETURN_IF(n > remaining(c) / MIN_STRING_BYTES, MOAS_ERR_CORRUPT,
                       "gguf: %s: array of %" PRIu64 " strings at offset %zu cannot fit "
                       "in the %zu bytes left",
                       where(c), n, at, remaining(c));
        moas_gguf_string *strs = NULL;
        if (w->g == NULL) {
            w->n_strs += (size_t)n;  // n <= file size / 8: no overflow
        } else {
            strs = w->strs;
            w->strs += n;
        }
        v->v.strs = strs;
        for (uint64_t i = 0; i < n; i++) {
            moas_gguf_string s;
            MOAS_TRY(read_string(c, w, "array string", &s));
            if (strs != NULL) {
                strs[i] = s;
            }
        }
        return MOAS_OK;
    }

    const size_t elem_bytes = meta_type_size[elem];
    const size_t data_at = c->pos;
    MOAS_RETURN_IF(n > remaining(c) / elem_bytes, MOAS_ERR_CORRUPT,
                   "gguf: %s: array of %" PRIu64 " %s at offset %zu needs more than the "
                   "%zu bytes left",
                   where(c), n, moas__meta_type_name(elem), at, remaining(c));
    MOAS_TRY(take(c, n * elem_bytes, "array data", &v->v.raw));
    if (elem == MOAS_META_BOOL) {
        MOAS_TRY(check_bools(c, v->v.raw, n, data_at));
    }
    return MOAS_OK;
}

/* One value of type `type`, which read_type() has checked. */
static moas_status read_value(cursor *c, walk *w, moas_meta_type type, moas_gguf_value *v) {
    v->type = type;
    if (type == MOAS_META_ARRAY) {
        return read_array(c, w, v);
    }
    if (type == MOAS_META_STRING) {
        return read_string(c, w, "string value", &v->v.str);
    }

    const size_t at = c->pos;
    const size_t n = meta_type_size[type];
    const uint8_t *p;
    MOAS_TRY(take(c, n, "value", &p));
    if (type == MOAS_META_FLOAT32 || type == MOAS_META_FLOAT64) {
        v->v.f64 = load_float(p, n);
    } else if (is_signed_type(type)) {
        v->v.i64 = sign_extend(load_le(p, n), n);
    } else {
        if (type == MOAS_META_BOOL) {
            MOAS_TRY(check_bools(c, p, 1, at));
        }
        v->v.u64 = load_le(p, n);
    }
    return MOAS_OK;
}

static moas_status read_kv(cursor *c, walk *w, moas_gguf_kv *kv) {
    moas_meta_type type;

    MOAS_TRY(read_name(c, w, "key", &kv->key));
    MOAS_TRY(read_type(c, "value type", &type));
    return read_value(c, w, type, &kv->value);
}

/* Number of elements and bytes of a tensor whose dims and type have been read. */
static moas_status size_tensor(cursor *c, moas_gguf_tensor *t, uint32_t type, size_t at) {
    /* Element count: each dim is at least 1, so the running product only grows, and
     * it must stay within int64 (ggml counts elements in int64_t). */
    uint64_t n_elements = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        const uint64_t ne = (uint64_t)t->ne[d];
        MOAS_RETURN_IF(n_elements > (uint64_t)INT64_MAX / ne, MOAS_ERR_CORRUPT,
                       "gguf: %s: element count overflows at dimension %" PRIu32
                       " (ne[%" PRIu32 "] = %" PRIu64 ", %" PRIu64 " elements before it)",
                       where(c), d, d, ne, n_elements);
        n_elements *= ne;
    }
    t->n_elements = n_elements;

    MOAS_RETURN_IF(type != MOAS_TYPE_F32 && type != MOAS_TYPE_F16 && type != MOAS_TYPE_Q8_0 &&
                       type != MOAS_TYPE_BF16,
                   MOAS_ERR_UNSUPPORTED,
                   "gguf: %s: tensor type %" PRIu32 " (%s) at offset %zu is not supported "
                   "(f32, f16, bf16 and q8_0 are)",
                   where(c), type, moas__type_name((moas_type)type), at);
    t->type = (moas_type)type;

    uint64_t row_bytes;
    MOAS_RETURN_IF(!moas__type_row_bytes(t->type, t->ne[0], &row_bytes), MOAS_ERR_CORRUPT,
                   "gguf: %s: a row of ne[0] = %" PRId64 " elements is not a whole number "
                   "of %s blocks of 32",
                   where(c), t->ne[0], moas__type_name(t->type));
    const uint64_t n_rows = n_elements / (uint64_t)t->ne[0];
    MOAS_RETURN_IF(row_bytes != 0 && n_rows > UINT64_MAX / row_bytes, MOAS_ERR_CORRUPT,
                   "gguf: %s: byte size overflows (%" PRIu64 " rows of %" PRIu64 " bytes)",
                   where(c), n_rows, row_bytes);
    t->n_bytes = n_rows * row_bytes;
    return MOAS_OK;
}

static moas_status read_tensor(cursor *c, walk *w, moas_gguf_tensor *t) {
    uint32_t n_dims, type;
    size_t at;

    MOAS_TRY(read_name(c, w, "tensor name", &t->name));

    at = c->pos;
    MOAS_TRY(take_u32(c, "n_dims", &n_dims));
    MOAS_RETURN_IF(n_dims < 1 || n_dims > MOAS_GGUF_MAX_DIMS, MOAS_ERR_CORRUPT,
                   "gguf: %s: n_dims %" PRIu32 " at offset %zu is outside 1..%d",
                   where(c), n_dims, at, MOAS_GGUF_MAX_DIMS);
    t->n_dims = n_dims;
    for (uint32_t d = 0; d < MOAS_GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
    }
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne;
        at = c->pos;
        MOAS_TRY(take_u64(c, "dimension", &ne));
        MOAS_RETURN_IF(ne == 0 || ne > (uint64_t)INT64_MAX, MOAS_ERR_CORRUPT,
                       "gguf: %s: dimension ne[%" PRIu32 "] = %" PRId64 " at offset %zu "
                       "is not positive",
                       where(c), d, as_int64(ne), at);
        t->ne[d] = (int64_t)ne;
    }

    at = c->pos;
    MOAS_TRY(take_u32(c, "tensor type", &type));
    MOAS_TRY(size_tensor(c, t, type, at));
    MOAS_TRY(take_u64(c, "tensor offset", &t->offset));

    const uint64_t end = t->offset > UINT64_MAX - t->n_bytes ? UINT64_MAX
                                                               : t->offset + t->n_bytes;
    if (w->g == NULL && (w->max_name == NULL || end > w->max_end)) {
        w->max_end = end;
        w->max_offset = t->offset;
        w->max_bytes = t->n_bytes;
        w->max_name = c->name;
        w->max_name_len = c->name_len;
    }
    return MOAS_OK;
}

/* The metadata and the tensor directory, from just after the header. */
static moas_status walk_directory(cursor *c, walk *w, uint64_t n_kv, uint64_t n_tensors) {
    moas_gguf_kv kv;
    moas_gguf_tensor t;

    for (uint64_t i = 0; i < n_kv; i++) {
        enter(c, "metadata entry", i);
        MOAS_TRY(read_kv(c, w, w->g != NULL ? &w->g->kv[i] : &kv));
    }
    for (uint64_t i = 0; i < n_tensors; i++) {
        enter(c, "tensor entry", i);
        MOAS_TRY(read_tensor(c, w, w->g != NULL ? &w->g->tensors[i] : &t));
    }
    return MOAS_OK;
}

/* ---- the header ----------------------------------------------------------------- */

static moas_status read_header(cursor *c, uint64_t *n_tensors, uint64_t *n_kv) {
    static const uint8_t magic[4] = {'G', 'G', 'U', 'F'};
    const size_t have = c->size < 4 ? c->size : 4;
    const uint8_t *p;
    uint32_t version;

    enter(c, "header", 0);
    /* A file that does not start like "GGUF" is something else; one that does but
     * stops early is a truncated GGUF file. */
    MOAS_RETURN_IF(have > 0 && memcmp(c->base, magic, have) != 0, MOAS_ERR_BAD_FORMAT,
                   "gguf: bad magic at offset 0: the file starts with %02x %02x %02x %02x, "
                   "not \"GGUF\"",
                   c->base[0], have > 1 ? c->base[1] : 0u, have > 2 ? c->base[2] : 0u,
                   have > 3 ? c->base[3] : 0u);
    MOAS_TRY(take(c, 4, "magic \"GGUF\"", &p));

    MOAS_TRY(take_u32(c, "version", &version));
    MOAS_RETURN_IF(version == 1 || version == 2, MOAS_ERR_BAD_FORMAT,
                   "gguf: version %" PRIu32 " at offset 4 is not supported: GGUF versions 1 "
                   "and 2 are not read, only version %d",
                   version, MOAS_GGUF_VERSION);
    MOAS_RETURN_IF(version == 0x03000000u, MOAS_ERR_BAD_FORMAT,
                   "gguf: version 0x%08" PRIx32 " at offset 4 looks like a big-endian GGUF "
                   "file; only little-endian version %d is read",
                   version, MOAS_GGUF_VERSION);
    MOAS_RETURN_IF(version != MOAS_GGUF_VERSION, MOAS_ERR_BAD_FORMAT,
                   "gguf: version %" PRIu32 " at offset 4 is unknown; only version %d is "
                   "read",
                   version, MOAS_GGUF_VERSION);

    MOAS_TRY(take_u64(c, "n_tensors", n_tensors));
    MOAS_TRY(take_u64(c, "n_kv", n_kv));

    /* Bound both counts by what the rest of the file could hold, so that no count can
     * make us loop or allocate beyond the file's size. */
    MOAS_RETURN_IF(*n_tensors > remaining(c) / MIN_TENSOR_BYTES, MOAS_ERR_CORRUPT,
                   "gguf: header: n_tensors %" PRIu64 " at offset 8 cannot fit in the %zu "
                   "bytes after the header (each needs at least %u)",
                   *n_tensors, remaining(c), MIN_TENSOR_BYTES);
    MOAS_RETURN_IF(*n_kv > remaining(c) / MIN_KV_BYTES, MOAS_ERR_CORRUPT,
                   "gguf: header: n_kv %" PRIu64 " at offset 16 cannot fit in the %zu bytes "
                   "after the header (each needs at least %u)",
                   *n_kv, remaining(c), MIN_KV_BYTES);
    MOAS_RETURN_IF(*n_tensors * MIN_TENSOR_BYTES + *n_kv * MIN_KV_BYTES > remaining(c),
                   MOAS_ERR_CORRUPT,
                   "gguf: header: n_tensors %" PRIu64 " and n_kv %" PRIu64 " cannot both fit "
                   "in the %zu bytes after the header",
                   *n_tensors, *n_kv, remaining(c));
    return MOAS_OK;
}

/* ---- sorting and lookups --------------------------------------------------------- */

typedef int (*order_fn)(const moas_gguf *g, uint64_t a, uint64_t b);

static int kv_name_order(const moas_gguf *g, uint64_t a, uint64_t b) {
    return strcmp(g->kv[a].key.text, g->kv[b].key.text);
}

static int tensor_name_order(const moas_gguf *g, uint64_t a, uint64_t b) {
    return strcmp(g->tensors[a].name.text, g->tensors[b].name.text);
}

/* By offset, then by index, so that the order is total and the result deterministic. */
static int tensor_offset_order(const moas_gguf *g, uint64_t a, uint64_t b) {
    const uint64_t oa = g->tensors[a].offset, ob = g->tensors[b].offset;
    if (oa != ob) {
        return oa < ob ? -1 : 1;
    }
    return a < b ? -1 : (a > b);
}

static void sift_down(uint64_t *idx, uint64_t root, uint64_t n, order_fn cmp,
                      const moas_gguf *g) {
    for (;;) {
        uint64_t child = 2 * root + 1;
        if (child >= n) {
            return;
        }
        if (child + 1 < n && cmp(g, idx[child], idx[child + 1]) < 0) {
            child++;
        }
        if (cmp(g, idx[root], idx[child]) >= 0) {
            return;
        }
        const uint64_t tmp = idx[root];
        idx[root] = idx[child];
        idx[child] = tmp;
        root = child;
    }
}

/* Heapsort: O(n log n) even on adversarial input, in place, no allocation, and (unlike
 * qsort) able to pass the directory to the comparison without global state. */
static void sort_order(uint64_t *idx, uint64_t n, order_fn cmp, const moas_gguf *g) {
    for (uint64_t i = n / 2; i > 0; i--) {
        sift_down(idx, i - 1, n, cmp, g);
    }
    for (uint64_t end = n; end > 1; end--) {
        const uint64_t tmp = idx[0];
        idx[0] = idx[end - 1];
        idx[end - 1] = tmp;
        sift_down(idx, 0, end - 1, cmp, g);
    }
}

static void fill_identity(uint64_t *idx, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) {
        idx[i] = i;
    }
}

/* ---- whole-directory checks ------------------------------------------------------- */

static moas_status check_keys(moas_gguf *g) {
    fill_identity(g->kv_order, g->n_kv);
    sort_order(g->kv_order, g->n_kv, kv_name_order, g);
    for (uint64_t i = 1; i < g->n_kv; i++) {
        const uint64_t a = g->kv_order[i - 1], b = g->kv_order[i];
        MOAS_RETURN_IF(kv_name_order(g, a, b) == 0, MOAS_ERR_CORRUPT,
                       "gguf: duplicate key '%s' (metadata entries %" PRIu64 " and %" PRIu64
                       ")",
                       g->kv[a].key.text, a < b ? a : b, a < b ? b : a);
    }
    return MOAS_OK;
}

static moas_status read_alignment(moas_gguf *g) {
    const moas_gguf_kv *kv = moas__gguf_find_kv(g, MOAS_GGUF_KEY_ALIGNMENT);

    g->alignment = MOAS_GGUF_DEFAULT_ALIGNMENT;
    if (kv == NULL) {
        return MOAS_OK;
    }
    MOAS_RETURN_IF(kv->value.type != MOAS_META_UINT32, MOAS_ERR_CORRUPT,
                   "gguf: key '" MOAS_GGUF_KEY_ALIGNMENT "' has type %s; GGUF requires "
                   "uint32",
                   moas__meta_type_name(kv->value.type));
    const uint64_t a = kv->value.v.u64;
    MOAS_RETURN_IF(a == 0 || (a & (a - 1)) != 0, MOAS_ERR_CORRUPT,
                   "gguf: key '" MOAS_GGUF_KEY_ALIGNMENT "' is %" PRIu64 ", not a nonzero "
                   "power of two",
                   a);
    g->alignment = (uint32_t)a;
    return MOAS_OK;
}

/* The data section starts where the directory ends, rounded up to the alignment. */
static moas_status place_data(moas_gguf *g, size_t dir_end, size_t size) {
    const size_t pad = (g->alignment - dir_end % g->alignment) % g->alignment;
    size_t start;

    MOAS_RETURN_IF(!moas__size_add(dir_end, pad, &start), MOAS_ERR_CORRUPT,
                   "gguf: data section offset overflows (directory ends at %zu)", dir_end);
    if (start > size && g->n_tensors == 0) {
        /* Nothing lives in the data section, so the padding before it is not needed. */
        start = size;
    }
    MOAS_RETURN_IF(start > size, MOAS_ERR_CORRUPT,
                   "gguf: data section at offset %zu (directory end %zu rounded up to the "
                   "alignment %" PRIu32 ") starts past the end of the file (%zu bytes)",
                   start, dir_end, g->alignment, size);
    g->data_offset = start;
    g->data_size = size - start;
    return MOAS_OK;
}

/* Record that the data of tensor `name` (`n_bytes` at `offset` of a data section that
 * starts at file offset `base`) ends past the file, as a range of file offsets when
 * those fit in 64 bits. */
static moas_status past_end(int name_len, const char *name, uint64_t base, uint64_t offset,
                            uint64_t n_bytes, size_t size, const char *note) {
    if (offset <= UINT64_MAX - base && n_bytes <= UINT64_MAX - base - offset) {
        moas__set_error("gguf: tensor '%.*s' data [%" PRIu64 ", %" PRIu64 ") ends past the "
                        "file (%zu bytes)%s",
                        name_len, name, base + offset, base + offset + n_bytes, size, note);
    } else {
        moas__set_error("gguf: tensor '%.*s' data (%" PRIu64 " bytes at offset %" PRIu64
                        " of the data section) ends past the file (%zu bytes)%s",
                        name_len, name, n_bytes, offset, size, note);
    }
    return MOAS_ERR_CORRUPT;
}

/* Every tensor aligned, inside the data section, and apart from the others. */
static moas_status check_tensor_data(moas_gguf *g, const uint8_t *image, size_t size) {
    const uint64_t base = g->data_offset;
    uint64_t prev_end = 0;
    const moas_gguf_tensor *prev = NULL;

    fill_identity(g->tensor_order, g->n_tensors);
    sort_order(g->tensor_order, g->n_tensors, tensor_offset_order, g);
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        moas_gguf_tensor *t = &g->tensors[g->tensor_order[i]];

        MOAS_RETURN_IF(t->offset % g->alignment != 0, MOAS_ERR_CORRUPT,
                       "gguf: tensor '%s': offset %" PRIu64 " is not a multiple of the "
                       "alignment %" PRIu32,
                       t->name.text, t->offset, g->alignment);
        if (t->offset > g->data_size || t->n_bytes > g->data_size - t->offset) {
            return past_end((int)t->name.len, t->name.text, base, t->offset, t->n_bytes, size,
                            "");
        }
        MOAS_RETURN_IF(prev != NULL && t->offset < prev_end, MOAS_ERR_CORRUPT,
                       "gguf: tensors '%s' [%" PRIu64 ", %" PRIu64 ") and '%s' [%" PRIu64
                       ", %" PRIu64 ") overlap",
                       prev ? prev->name.text : "", base + (prev ? prev->offset : 0),
                       base + prev_end, t->name.text, base + t->offset,
                       base + t->offset + t->n_bytes);
        t->data = image + (size_t)(base + t->offset);
        prev = t;
        prev_end = t->offset + t->n_bytes;
    }
    return MOAS_OK;
}

static moas_status check_tensor_names(moas_gguf *g) {
    fill_identity(g->tensor_order, g->n_tensors);
    sort_order(g->tensor_order, g->n_tensors, tensor_name_order, g);
    for (uint64_t i = 1; i < g->n_tensors; i++) {
        const uint64_t a = g->tensor_order[i - 1], b = g->tensor_order[i];
        MOAS_RETURN_IF(tensor_name_order(g, a, b) == 0, MOAS_ERR_CORRUPT,
                       "gguf: duplicate tensor name '%s' (tensor entries %" PRIu64
                       " and %" PRIu64 ")",
                       g->tensors[a].name.text, a < b ? a : b, a < b ? b : a);
    }
    return MOAS_OK;
}

/* ---- the block ------------------------------------------------------------------ */

/* Reserve `n` elements of `elem` bytes at *at, aligned for any type; false on overflow. */
static bool reserve(size_t *at, size_t n, size_t elem, size_t *offset) {
    const size_t align = _Alignof(max_align_t);
    size_t bytes, start;

    if (!moas__size_add(*at, align - 1, &start) || !moas__size_mul(n, elem, &bytes)) {
        return false;
    }
    start -= start % align;
    if (!moas__size_add(start, bytes, at)) {
        return false;
    }
    *offset = start;
    return true;
}

/* Allocate the directory for what the measuring pass found, point its arrays into the
 * same block, and hand the string-array descriptors and the string arena to `w`. */
static moas_status alloc_directory(walk *w, uint64_t n_kv, uint64_t n_tensors,
                                   const moas_allocator *alloc, moas_gguf **out) {
    size_t at = sizeof(moas_gguf);
    size_t kv_at, tensors_at, kv_order_at, tensor_order_at, strs_at, chars_at;

    /* Counts are below the image size (read_header() bounded them), so they fit size_t. */
    MOAS_RETURN_IF(!reserve(&at, (size_t)n_kv, sizeof(moas_gguf_kv), &kv_at) ||
                       !reserve(&at, (size_t)n_tensors, sizeof(moas_gguf_tensor),
                                &tensors_at) ||
                       !reserve(&at, (size_t)n_kv, sizeof(uint64_t), &kv_order_at) ||
                       !reserve(&at, (size_t)n_tensors, sizeof(uint64_t), &tensor_order_at) ||
                       !reserve(&at, w->n_strs, sizeof(moas_gguf_string), &strs_at) ||
                       !reserve(&at, w->n_chars, 1, &chars_at),
                   MOAS_ERR_NO_MEMORY, "gguf: directory size overflows");

    uint8_t *block = moas__calloc(alloc, 1, at);
    MOAS_RETURN_IF(block == NULL, MOAS_ERR_NO_MEMORY,
                   "gguf: no memory for the directory (%zu bytes: %" PRIu64 " keys, %" PRIu64
                   " tensors, %zu bytes of strings)",
                   at, n_kv, n_tensors, w->n_chars);
    moas_gguf *g = (moas_gguf *)(void *)block;
    g->version = MOAS_GGUF_VERSION;
    g->alignment = MOAS_GGUF_DEFAULT_ALIGNMENT;
    g->n_kv = n_kv;
    g->n_tensors = n_tensors;
    g->kv = (moas_gguf_kv *)(void *)(block + kv_at);
    g->tensors = (moas_gguf_tensor *)(void *)(block + tensors_at);
    g->kv_order = (uint64_t *)(void *)(block + kv_order_at);
    g->tensor_order = (uint64_t *)(void *)(block + tensor_order_at);
    w->g = g;
    w->strs = (moas_gguf_string *)(void *)(block + strs_at);
    w->chars = (char *)(block + chars_at);
    *out = g;
    return MOAS_OK;
}

/* ---- the interface ---------------------------------------------------------------- */

moas_status moas__gguf_parse(const uint8_t *image, size_t size, const moas_allocator *alloc,
                             moas_gguf **out) {
    cursor c = {.base = image, .size = size, .pos = 0, .section = "header"};
    walk w = {0};
    uint64_t n_tensors, n_kv;
    moas_gguf *g = NULL;
    moas_status st;

    MOAS_ASSERT(out != NULL);
    MOAS_ASSERT(image != NULL || size == 0);
    *out = NULL;

    /* Pass 1: validate every entry and measure the strings; nothing is allocated. */
    MOAS_TRY(read_header(&c, &n_tensors, &n_kv));
    const size_t dir_start = c.pos;
    MOAS_TRY(walk_directory(&c, &w, n_kv, n_tensors));
    const size_t dir_end = c.pos;

    /* The data section starts at dir_end or later: a tensor that cannot fit even then
     * is refused now, before anything is allocated (truncated files end up here). */
    if (w.max_name != NULL && w.max_end > size - dir_end) {
        return past_end((int)w.max_name_len, (const char *)w.max_name, dir_end, w.max_offset,
                        w.max_bytes, size, " even if the data section began right after the "
                        "directory");
    }

    /* Pass 2: the same walk, filling one block sized by pass 1. It cannot fail where
     * pass 1 succeeded, but its status is honoured all the same. */
    MOAS_TRY(alloc_directory(&w, n_kv, n_tensors, alloc, &g));
    c.pos = dir_start;
    if ((st = walk_directory(&c, &w, n_kv, n_tensors)) != MOAS_OK) goto fail;
    MOAS_ASSERT(c.pos == dir_end);

    /* Checks over the whole directory. */
    if ((st = check_keys(g)) != MOAS_OK) goto fail;
    if ((st = read_alignment(g)) != MOAS_OK) goto fail;
    if ((st = place_data(g, dir_end, size)) != MOAS_OK) goto fail;
    if ((st = check_tensor_data(g, image, size)) != MOAS_OK) goto fail;
    if ((st = check_tensor_names(g)) != MOAS_OK) goto fail;

    *out = g;
    return MOAS_OK;

fail:
    moas__gguf_free(g, alloc);
    return st;
}

void moas__gguf_free(moas_gguf *gguf, const moas_allocator *alloc) {
    /* Everything lives in the one block the moas_gguf heads, so a directory in any
     * state of construction is released by freeing it. */
    moas__free(alloc, gguf);
}

const moas_gguf_kv *moas__gguf_find_kv(const moas_gguf *gguf, const char *key) {
    uint64_t lo = 0, hi;

    if (gguf == NULL || key == NULL) {
        return NULL;
    }
    hi = gguf->n_kv;
    while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        const moas_gguf_kv *kv = &gguf->kv[gguf->kv_order[mid]];
        const int order = strcmp(key, kv->key.text);
        if (order == 0) {
            return kv;
        }
        if (order < 0) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return NULL;
}

const moas_gguf_tensor *moas__gguf_find_tensor(const moas_gguf *gguf, const char *name) {
    uint64_t lo = 0, hi;

    if (gguf == NULL || name == NULL) {
        return NULL;
    }
    hi = gguf->n_tensors;
    while (lo < hi) {
        const uint64_t mid = lo + (hi - lo) / 2;
        const moas_gguf_tensor *t = &gguf->tensors[gguf->tensor_order[mid]];
        const int order = strcmp(name, t->name.text);
        if (order == 0) {
            return t;
        }
        if (order < 0) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return NULL;
}

int64_t moas__gguf_tensor_index(const moas_gguf *gguf, const moas_gguf_tensor *t) {
    if (gguf == NULL || t == NULL || gguf->n_tensors == 0) {
        return -1;
    }
    /* Compare addresses as integers: relational operators on pointers into different
     * objects are undefined. */
    const uintptr_t first = (uintptr_t)gguf->tensors, at = (uintptr_t)t;
    if (at < first || (at - first) % sizeof *t != 0 ||
        (at - first) / sizeof *t >= gguf->n_tensors) {
        return -1;
    }
    return (int64_t)((at - first) / sizeof *t);
}

/* One integer of type `type` at `p`, as int64; false if it does not fit. */
static bool load_int(moas_meta_type type, const uint8_t *p, int64_t *out) {
    const size_t n = meta_type_size[type];
    const uint64_t u = load_le(p, n);

    if (is_signed_type(type)) {
        *out = sign_extend(u, n);
        return true;
    }
    if (u > (uint64_t)INT64_MAX) {
        return false;
    }
    *out = (int64_t)u;
    return true;
}

bool moas__gguf_array_int(const moas_gguf_value *v, uint64_t i, int64_t *out) {
    if (v == NULL || out == NULL || v->type != MOAS_META_ARRAY || i >= v->n ||
        !is_int_type(v->elem_type)) {
        return false;
    }
    /* i < n, and n elements lie inside the image: the product cannot overflow. */
    return load_int(v->elem_type, v->v.raw + (size_t)i * meta_type_size[v->elem_type], out);
}

bool moas__gguf_array_float(const moas_gguf_value *v, uint64_t i, double *out) {
    if (v == NULL || out == NULL || v->type != MOAS_META_ARRAY || i >= v->n ||
        (v->elem_type != MOAS_META_FLOAT32 && v->elem_type != MOAS_META_FLOAT64)) {
        return false;
    }
    const size_t n = meta_type_size[v->elem_type];
    *out = load_float(v->v.raw + (size_t)i * n, n);
    return true;
}

bool moas__gguf_value_int(const moas_gguf_value *v, int64_t *out) {
    if (v == NULL || out == NULL || !is_int_type(v->type)) {
        return false;
    }
    if (is_signed_type(v->type)) {
        *out = v->v.i64;
        return true;
    }
    if (v->v.u64 > (uint64_t)INT64_MAX) {
        return false;
    }
    *out = (int64_t)v->v.u64;
    return true;
}

bool moas__gguf_value_float(const moas_gguf_value *v, double *out) {
    if (v == NULL || out == NULL ||
        (v->type != MOAS_META_FLOAT32 && v->type != MOAS_META_FLOAT64)) {
        return false;
    }
    *out = v->v.f64;
    return true;
}

/* ---- types ------------------------------------------------------------------------ */

bool moas__type_row_bytes(moas_type type, int64_t ne0, uint64_t *out) {
    uint64_t elem_bytes, block = 1;

    switch (type) {
    case MOAS_TYPE_F32:
        elem_bytes = 4;
        break;
    case MOAS_TYPE_F16:
    case MOAS_TYPE_BF16:
        elem_bytes = 2;
        break;
    case MOAS_TYPE_Q8_0:
        /* ggml's block_q8_0: an f16 scale, then 32 int8: 34 bytes per 32 elements. */
        elem_bytes = 34;
        block = 32;
        break;
    default:
        return false;
    }
    if (ne0 <= 0 || (uint64_t)ne0 % block != 0) {
        return false;
    }
    const uint64_t n_blocks = (uint64_t)ne0 / block;
    if (n_blocks > UINT64_MAX / elem_bytes) {
        return false;
    }
    *out = n_blocks * elem_bytes;
    return true;
}

const char *moas__type_name(moas_type type) {
    /* ggml's type numbers, so that a refused file names what it holds. Gaps are
     * numbers ggml has retired. */
    static const char *const names[] = {
        [0] = "f32",      [1] = "f16",      [2] = "q4_0",     [3] = "q4_1",
        [6] = "q5_0",     [7] = "q5_1",     [8] = "q8_0",     [9] = "q8_1",
        [10] = "q2_k",    [11] = "q3_k",    [12] = "q4_k",    [13] = "q5_k",
        [14] = "q6_k",    [15] = "q8_k",    [16] = "iq2_xxs", [17] = "iq2_xs",
        [18] = "iq3_xxs", [19] = "iq1_s",   [20] = "iq4_nl",  [21] = "iq3_s",
        [22] = "iq2_s",   [23] = "iq4_xs",  [24] = "i8",      [25] = "i16",
        [26] = "i32",     [27] = "i64",     [28] = "f64",     [29] = "iq1_m",
        [30] = "bf16",
    };
    const uint64_t t = (uint64_t)type;
    if (t < sizeof names / sizeof names[0] && names[t] != NULL) {
        return names[t];
    }
    return "unknown";
}

const char *moas__meta_type_name(moas_meta_type type) {
    static const char *const names[MOAS_META_TYPE_COUNT] = {
        [MOAS_META_UINT8] = "uint8",     [MOAS_META_INT8] = "int8",
        [MOAS_META_UINT16] = "uint16",   [MOAS_META_INT16] = "int16",
        [MOAS_META_UINT32] = "uint32",   [MOAS_META_INT32] = "int32",
        [MOAS_META_FLOAT32] = "float32", [MOAS_META_BOOL] = "bool",
        [MOAS_META_STRING] = "string",   [MOAS_META_ARRAY] = "array",
        [MOAS_META_UINT64] = "uint64",   [MOAS_META_INT64] = "int64",
        [MOAS_META_FLOAT64] = "float64",
    };
    const uint64_t t = (uint64_t)type;
    return t < MOAS_META_TYPE_COUNT ? names[t] : "unknown";
}
