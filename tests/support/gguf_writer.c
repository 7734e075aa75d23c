/*
 * gguf_writer.c - GGUF v3 images for tests (see gguf_writer.h).
 *
 * Metadata is serialised as it is added; tensors are kept as records until
 * gguf_writer_finish() lays out the directory and the data section. Nothing here reads
 * GGUF, so the writer can never agree with the reader by sharing its mistakes.
 */
#include "gguf_writer.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf;

typedef struct {
    uint8_t *name;     /* name_len bytes, not NUL-terminated */
    size_t name_len;
    uint32_t type;
    uint32_t n_dims;
    uint64_t *ne;      /* [n_dims] */
    uint8_t *data;     /* [n_bytes] */
    size_t n_bytes;
    bool has_offset;   /* the directory shows `offset` instead of the real one */
    uint64_t offset;
} tensor_rec;

struct gguf_writer {
    buf meta;          /* serialised metadata entries */
    uint64_t n_kv;
    tensor_rec *tensors;
    size_t n_tensors, cap_tensors;
    uint32_t alignment;
    bool oom;          /* an allocation failed; finish() returns NULL */
    char magic[4];
    uint32_t version;
    bool has_n_kv, has_n_tensors, skip_padding;
    uint64_t n_kv_override, n_tensors_override;
};

/* ---- byte buffers ----------------------------------------------------------------- */

static bool buf_reserve(buf *b, size_t extra) {
    if (extra <= b->cap - b->n) {
        return true;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->n < extra) {
        if (cap > SIZE_MAX / 2) {
            return false;
        }
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL) {
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

/* Append `n` bytes of `src` (zeros when NULL). After a failure *oom stays true and
 * nothing more is written. */
static void put(bool *oom, buf *b, const void *src, size_t n) {
    if (*oom || !buf_reserve(b, n)) {
        *oom = true;
        return;
    }
    if (n > 0) {
        if (src != NULL) {
            memcpy(b->p + b->n, src, n);
        } else {
            memset(b->p + b->n, 0, n);
        }
    }
    b->n += n;
}

/* Little-endian, byte by byte, whatever the host. */
static void put_le(bool *oom, buf *b, uint64_t x, size_t n) {
    uint8_t bytes[8];
    for (size_t i = 0; i < n; i++) {
        bytes[i] = (uint8_t)(x >> (8 * i));
    }
    put(oom, b, bytes, n);
}

static void put_string(bool *oom, buf *b, const void *s, size_t len) {
    put_le(oom, b, len, 8);
    put(oom, b, s, len);
}

/* ---- writer --------------------------------------------------------------------- */

gguf_writer *gguf_writer_create(void) {
    gguf_writer *w = calloc(1, sizeof *w);
    if (w == NULL) {
        return NULL;
    }
    w->alignment = 32;
    memcpy(w->magic, "GGUF", 4);
    w->version = 3;
    return w;
}

void gguf_writer_free(gguf_writer *w) {
    if (w == NULL) {
        return;
    }
    for (size_t i = 0; i < w->n_tensors; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].ne);
        free(w->tensors[i].data);
    }
    free(w->tensors);
    free(w->meta.p);
    free(w);
}

void gguf_writer_set_layout_alignment(gguf_writer *w, uint32_t alignment) {
    w->alignment = alignment ? alignment : 1;
}

void gguf_writer_set_alignment(gguf_writer *w, uint32_t alignment) {
    gguf_writer_set_layout_alignment(w, alignment);
    gguf_writer_add_u32(w, "general.alignment", alignment);
}

/* ---- metadata --------------------------------------------------------------------- */

void gguf_writer_add_kv_raw(gguf_writer *w, const char *key, size_t key_len, uint32_t type,
                            const void *payload, size_t n) {
    put_string(&w->oom, &w->meta, key, key_len);
    put_le(&w->oom, &w->meta, type, 4);
    put(&w->oom, &w->meta, payload, n);
    w->n_kv++;
}

void gguf_writer_add_meta_raw(gguf_writer *w, const void *bytes, size_t n, uint64_t n_entries) {
    put(&w->oom, &w->meta, bytes, n);
    w->n_kv += n_entries;
}

static void add_scalar(gguf_writer *w, const char *key, moas_meta_type type, uint64_t bits,
                       size_t n) {
    put_string(&w->oom, &w->meta, key, strlen(key));
    put_le(&w->oom, &w->meta, (uint64_t)type, 4);
    put_le(&w->oom, &w->meta, bits, n);
    w->n_kv++;
}

void gguf_writer_add_u8(gguf_writer *w, const char *key, uint8_t value) {
    add_scalar(w, key, MOAS_META_UINT8, value, 1);
}

void gguf_writer_add_i8(gguf_writer *w, const char *key, int8_t value) {
    add_scalar(w, key, MOAS_META_INT8, (uint64_t)(int64_t)value, 1);
}

void gguf_writer_add_u16(gguf_writer *w, const char *key, uint16_t value) {
    add_scalar(w, key, MOAS_META_UINT16, value, 2);
}

void gguf_writer_add_i16(gguf_writer *w, const char *key, int16_t value) {
    add_scalar(w, key, MOAS_META_INT16, (uint64_t)(int64_t)value, 2);
}

void gguf_writer_add_u32(gguf_writer *w, const char *key, uint32_t value) {
    add_scalar(w, key, MOAS_META_UINT32, value, 4);
}

void gguf_writer_add_i32(gguf_writer *w, const char *key, int32_t value) {
    add_scalar(w, key, MOAS_META_INT32, (uint64_t)(int64_t)value, 4);
}

void gguf_writer_add_u64(gguf_writer *w, const char *key, uint64_t value) {
    add_scalar(w, key, MOAS_META_UINT64, value, 8);
}

void gguf_writer_add_i64(gguf_writer *w, const char *key, int64_t value) {
    add_scalar(w, key, MOAS_META_INT64, (uint64_t)value, 8);
}

void gguf_writer_add_f32(gguf_writer *w, const char *key, float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    add_scalar(w, key, MOAS_META_FLOAT32, bits, 4);
}

void gguf_writer_add_f64(gguf_writer *w, const char *key, double value) {
    uint64_t bits;
    memcpy(&bits, &value, sizeof bits);
    add_scalar(w, key, MOAS_META_FLOAT64, bits, 8);
}

void gguf_writer_add_bool(gguf_writer *w, const char *key, bool value) {
    add_scalar(w, key, MOAS_META_BOOL, value ? 1u : 0u, 1);
}

void gguf_writer_add_string_n(gguf_writer *w, const char *key, const char *value, size_t len) {
    put_string(&w->oom, &w->meta, key, strlen(key));
    put_le(&w->oom, &w->meta, MOAS_META_STRING, 4);
    put_string(&w->oom, &w->meta, value, len);
    w->n_kv++;
}

void gguf_writer_add_string(gguf_writer *w, const char *key, const char *value) {
    gguf_writer_add_string_n(w, key, value, strlen(value));
}

static size_t elem_size(moas_meta_type t) {
    switch (t) {
    case MOAS_META_UINT8:
    case MOAS_META_INT8:
    case MOAS_META_BOOL:
        return 1;
    case MOAS_META_UINT16:
    case MOAS_META_INT16:
        return 2;
    case MOAS_META_UINT32:
    case MOAS_META_INT32:
    case MOAS_META_FLOAT32:
        return 4;
    case MOAS_META_UINT64:
    case MOAS_META_INT64:
    case MOAS_META_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

void gguf_writer_add_array(gguf_writer *w, const char *key, moas_meta_type elem_type,
                           const void *data, size_t n) {
    const size_t size = elem_size(elem_type);
    const uint8_t *p = data;

    put_string(&w->oom, &w->meta, key, strlen(key));
    put_le(&w->oom, &w->meta, MOAS_META_ARRAY, 4);
    put_le(&w->oom, &w->meta, (uint64_t)elem_type, 4);
    put_le(&w->oom, &w->meta, n, 8);
    for (size_t i = 0; i < n; i++) {
        uint64_t x = 0;
        switch (size) {
        case 1: {
            uint8_t v;
            memcpy(&v, p + i, 1);
            x = v;
            break;
        }
        case 2: {
            uint16_t v;
            memcpy(&v, p + 2 * i, 2);
            x = v;
            break;
        }
        case 4: {
            uint32_t v;
            memcpy(&v, p + 4 * i, 4);
            x = v;
            break;
        }
        default:
            memcpy(&x, p + 8 * i, 8);
            break;
        }
        put_le(&w->oom, &w->meta, x, size);
    }
    w->n_kv++;
}

void gguf_writer_add_array_string_n(gguf_writer *w, const char *key, const char *const *strs,
                                    const size_t *lens, size_t n) {
    put_string(&w->oom, &w->meta, key, strlen(key));
    put_le(&w->oom, &w->meta, MOAS_META_ARRAY, 4);
    put_le(&w->oom, &w->meta, MOAS_META_STRING, 4);
    put_le(&w->oom, &w->meta, n, 8);
    for (size_t i = 0; i < n; i++) {
        put_string(&w->oom, &w->meta, strs[i], lens != NULL ? lens[i] : strlen(strs[i]));
    }
    w->n_kv++;
}

void gguf_writer_add_array_string(gguf_writer *w, const char *key, const char *const *strs,
                                  size_t n) {
    gguf_writer_add_array_string_n(w, key, strs, NULL, n);
}

/* ---- tensors ---------------------------------------------------------------------- */

size_t gguf_writer_tensor_bytes(moas_type type, const int64_t *ne, uint32_t n_dims) {
    size_t n = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] <= 0 || (uint64_t)ne[d] > SIZE_MAX / n) {
            return 0;
        }
        n *= (size_t)ne[d];
    }
    switch (type) {
    case MOAS_TYPE_F32:
        return n <= SIZE_MAX / 4 ? 4 * n : 0;
    case MOAS_TYPE_F16:
    case MOAS_TYPE_BF16:
        return n <= SIZE_MAX / 2 ? 2 * n : 0;
    case MOAS_TYPE_Q8_0:
        return n_dims > 0 && ne[0] % 32 == 0 ? n / 32 * 34 : 0;
    default:
        return 0;
    }
}

int gguf_writer_add_tensor_raw(gguf_writer *w, const char *name, size_t name_len,
                               uint32_t type, uint32_t n_dims, const uint64_t *ne,
                               const void *data, size_t n_bytes) {
    if (w->oom) {
        return -1;
    }
    if (w->n_tensors == w->cap_tensors) {
        const size_t cap = w->cap_tensors ? 2 * w->cap_tensors : 16;
        tensor_rec *t = realloc(w->tensors, cap * sizeof *t);
        if (t == NULL) {
            w->oom = true;
            return -1;
        }
        w->tensors = t;
        w->cap_tensors = cap;
    }
    tensor_rec *t = &w->tensors[w->n_tensors];
    memset(t, 0, sizeof *t);
    t->name = malloc(name_len ? name_len : 1);
    t->ne = malloc(n_dims ? n_dims * sizeof *t->ne : 1);
    t->data = malloc(n_bytes ? n_bytes : 1);
    if (t->name == NULL || t->ne == NULL || t->data == NULL) {
        free(t->name);
        free(t->ne);
        free(t->data);
        w->oom = true;
        return -1;
    }
    memcpy(t->name, name, name_len);
    t->name_len = name_len;
    t->type = type;
    t->n_dims = n_dims;
    if (n_dims > 0) {
        memcpy(t->ne, ne, n_dims * sizeof *t->ne);
    }
    if (data != NULL) {
        memcpy(t->data, data, n_bytes);
    } else {
        memset(t->data, 0, n_bytes ? n_bytes : 1);
    }
    t->n_bytes = n_bytes;
    return (int)w->n_tensors++;
}

int gguf_writer_add_tensor(gguf_writer *w, const char *name, moas_type type, uint32_t n_dims,
                           const int64_t *ne, const void *data) {
    uint64_t une[8];
    const size_t n_bytes = gguf_writer_tensor_bytes(type, ne, n_dims);
    if (n_bytes == 0 || n_dims == 0 || n_dims > 8) {
        return -1;
    }
    for (uint32_t d = 0; d < n_dims; d++) {
        une[d] = (uint64_t)ne[d];
    }
    return gguf_writer_add_tensor_raw(w, name, strlen(name), (uint32_t)type, n_dims, une,
                                      data, n_bytes);
}

/* ---- overrides -------------------------------------------------------------------- */

void gguf_writer_override_magic(gguf_writer *w, const char magic[4]) {
    memcpy(w->magic, magic, 4);
}

void gguf_writer_override_version(gguf_writer *w, uint32_t version) {
    w->version = version;
}

void gguf_writer_override_n_kv(gguf_writer *w, uint64_t n_kv) {
    w->has_n_kv = true;
    w->n_kv_override = n_kv;
}

void gguf_writer_override_n_tensors(gguf_writer *w, uint64_t n_tensors) {
    w->has_n_tensors = true;
    w->n_tensors_override = n_tensors;
}

void gguf_writer_override_offset(gguf_writer *w, int index, uint64_t offset) {
    if (index >= 0 && (size_t)index < w->n_tensors) {
        w->tensors[index].has_offset = true;
        w->tensors[index].offset = offset;
    }
}

void gguf_writer_skip_padding(gguf_writer *w) {
    w->skip_padding = true;
}

/* ---- layout and output ------------------------------------------------------------ */

static size_t round_up(size_t x, size_t a) {
    return (x + a - 1) / a * a;
}

size_t gguf_writer_directory_end(const gguf_writer *w) {
    size_t n = 4 + 4 + 8 + 8 + w->meta.n;
    for (size_t i = 0; i < w->n_tensors; i++) {
        n += 8 + w->tensors[i].name_len + 4 + 8 * (size_t)w->tensors[i].n_dims + 4 + 8;
    }
    return n;
}

size_t gguf_writer_data_offset(const gguf_writer *w) {
    const size_t end = gguf_writer_directory_end(w);
    return w->skip_padding ? end : round_up(end, w->alignment);
}

uint64_t gguf_writer_tensor_offset(const gguf_writer *w, int index) {
    size_t off = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        off = round_up(off, w->alignment);
        if (i == (size_t)index) {
            return off;
        }
        off += w->tensors[i].n_bytes;
    }
    return off;
}

uint8_t *gguf_writer_finish(const gguf_writer *w, size_t *size) {
    bool oom = false;
    buf out = {0};
    size_t off = 0;

    if (w->oom) {
        return NULL;
    }
    /* Header. */
    put(&oom, &out, w->magic, 4);
    put_le(&oom, &out, w->version, 4);
    put_le(&oom, &out, w->has_n_tensors ? w->n_tensors_override : w->n_tensors, 8);
    put_le(&oom, &out, w->has_n_kv ? w->n_kv_override : w->n_kv, 8);
    /* Metadata. */
    put(&oom, &out, w->meta.p, w->meta.n);
    /* Tensor directory, with offsets laid out as gguf_writer_tensor_offset() says. */
    for (size_t i = 0; i < w->n_tensors; i++) {
        const tensor_rec *t = &w->tensors[i];
        off = round_up(off, w->alignment);
        put_string(&oom, &out, t->name, t->name_len);
        put_le(&oom, &out, t->n_dims, 4);
        for (uint32_t d = 0; d < t->n_dims; d++) {
            put_le(&oom, &out, t->ne[d], 8);
        }
        put_le(&oom, &out, t->type, 4);
        put_le(&oom, &out, t->has_offset ? t->offset : off, 8);
        off += t->n_bytes;
    }
    /* Padding, then the data: each tensor at its aligned offset, none after the last. */
    const size_t data_start = gguf_writer_data_offset(w);
    put(&oom, &out, NULL, data_start - out.n);
    off = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const tensor_rec *t = &w->tensors[i];
        const size_t at = round_up(off, w->alignment);
        put(&oom, &out, NULL, at - off);
        put(&oom, &out, t->data, t->n_bytes);
        off = at + t->n_bytes;
    }
    if (oom) {
        free(out.p);
        return NULL;
    }
    *size = out.n;
    return out.p;
}
