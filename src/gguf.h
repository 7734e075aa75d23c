/*
 * gguf.h - the GGUF v3 container, parsed from an image in memory.
 *
 * moas__gguf_parse() validates the whole header, metadata and tensor directory before
 * returning; what it returns can be trusted to lie inside the image. It knows nothing
 * of what keys and tensors mean (model.c does).
 *
 * The directory is one allocation: the moas_gguf heads a block that also holds the
 * kv and tensor arrays, the two lookup orders, the string-array descriptors and every
 * copied string. Its size is measured by a first pass over the file, so it is
 * O(file size) whatever the counts in the header claim.
 */
#ifndef MOAS_GGUF_H
#define MOAS_GGUF_H

#include "core.h"

/* Limits on what a file may declare, beyond "fits in the file". They bound the work a
 * hostile file can cause; real models are far below them. */
#define MOAS_GGUF_MAX_DIMS 4
/* Bytes in a key or tensor name. GGUF limits tensor names to 64; we allow more. */
#define MOAS_GGUF_MAX_NAME 256
#define MOAS_GGUF_MAX_STRING (1u << 24)    /* bytes in one string value */
#define MOAS_GGUF_DEFAULT_ALIGNMENT 32     /* GGUF's default when general.alignment is absent */
#define MOAS_GGUF_VERSION 3                /* the only version read; 1 and 2 are refused */

/* general.alignment must be stored as UINT32, as GGUF specifies and ggml requires;
 * any other type is refused (MOAS_ERR_CORRUPT) rather than converted, so that we never
 * accept a file that other GGUF readers would lay out differently. */
#define MOAS_GGUF_KEY_ALIGNMENT "general.alignment"

typedef struct moas_gguf_string {
    const char *text;  /* NUL-terminated copy owned by the moas_gguf */
    uint64_t len;      /* bytes, without the NUL; the text may contain NUL bytes */
} moas_gguf_string;

typedef struct moas_gguf_value {
    moas_meta_type type;       /* MOAS_META_ARRAY for arrays */
    moas_meta_type elem_type;  /* arrays only: the element type (never ARRAY: nested
                                  arrays are refused) */
    uint64_t n;                /* arrays only: element count */
    union {
        uint64_t u64;          /* UINT8..UINT64 and BOOL, zero-extended */
        int64_t i64;           /* INT8..INT64, sign-extended */
        double f64;            /* FLOAT32, FLOAT64 */
        moas_gguf_string str;  /* STRING */
        const uint8_t *raw;    /* numeric arrays: n little-endian elements inside the image */
        moas_gguf_string *strs;/* string arrays: n copies, owned by the moas_gguf */
    } v;
} moas_gguf_value;

typedef struct moas_gguf_kv {
    moas_gguf_string key;
    moas_gguf_value value;
} moas_gguf_kv;

typedef struct moas_gguf_tensor {
    moas_gguf_string name;
    moas_type type;
    uint32_t n_dims;                   /* 1..4 */
    int64_t ne[MOAS_GGUF_MAX_DIMS];    /* fastest first; unused dims are 1 */
    uint64_t n_elements;
    uint64_t offset;                   /* from the start of the data section */
    uint64_t n_bytes;
    const uint8_t *data;               /* image + data_offset + offset */
} moas_gguf_tensor;

typedef struct moas_gguf {
    uint32_t version;         /* 3 */
    uint32_t alignment;       /* general.alignment or 32; a power of two */
    uint64_t n_kv;
    uint64_t n_tensors;
    moas_gguf_kv *kv;         /* [n_kv] in file order */
    moas_gguf_tensor *tensors;/* [n_tensors] in file order */
    uint64_t data_offset;     /* start of the data section in the image */
    uint64_t data_size;       /* bytes from data_offset to the end of the image */
    /* private to gguf.c: indexes into kv[] and tensors[], sorted by name */
    uint64_t *kv_order;       /* [n_kv] */
    uint64_t *tensor_order;   /* [n_tensors] */
} moas_gguf;

/* Parse `size` bytes at `image`. On success *out is a directory whose pointers point
 * into `image` (which must outlive it) or into memory it owns. On failure *out is NULL,
 * nothing leaks, and moas_last_error() names the field, offset and values at fault:
 *   MOAS_ERR_BAD_FORMAT  wrong magic or version;
 *   MOAS_ERR_CORRUPT     truncated, counts or lengths past the end, empty or over-long
 *                        names, names with NUL bytes, duplicates, bad alignment, bad
 *                        dims, Q8_0 rows not a multiple of 32, overlapping, unaligned or
 *                        out-of-file tensors, unknown metadata value type, nested arrays,
 *                        a bool other than 0 or 1;
 *   MOAS_ERR_UNSUPPORTED a tensor type other than F32, F16, BF16, Q8_0 (named);
 *   MOAS_ERR_NO_MEMORY. */
moas_status moas__gguf_parse(const uint8_t *image, size_t size, const moas_allocator *alloc,
                             moas_gguf **out);

/* Release a directory, also a partly built one. NULL is a no-op. */
void moas__gguf_free(moas_gguf *gguf, const moas_allocator *alloc);

/* Lookups by exact name; NULL when absent. O(log n). */
const moas_gguf_kv *moas__gguf_find_kv(const moas_gguf *gguf, const char *key);
const moas_gguf_tensor *moas__gguf_find_tensor(const moas_gguf *gguf, const char *name);

/* Index of a tensor in file order, or -1. */
int64_t moas__gguf_tensor_index(const moas_gguf *gguf, const moas_gguf_tensor *t);

/* Element i of a numeric array value, converted; false if i >= n or the element type
 * is not of that kind (int: any integer type or BOOL; float: FLOAT32/FLOAT64). An
 * unsigned 64-bit value above INT64_MAX does not convert to int. */
bool moas__gguf_array_int(const moas_gguf_value *v, uint64_t i, int64_t *out);
bool moas__gguf_array_float(const moas_gguf_value *v, uint64_t i, double *out);

/* Scalar value as an integer (any integer type or BOOL) or a float (FLOAT32/FLOAT64);
 * false for another type, or a UINT64 above INT64_MAX. */
bool moas__gguf_value_int(const moas_gguf_value *v, int64_t *out);
bool moas__gguf_value_float(const moas_gguf_value *v, double *out);

/* Bytes of one row of `ne0` elements of `type`; false for a type we do not know, a
 * row length that is not positive or not a multiple of the block size (32 for Q8_0),
 * or overflow. */
bool moas__type_row_bytes(moas_type type, int64_t ne0, uint64_t *out);

/* Lower-case names for messages: "f32", "q8_0", ...; "unknown" for anything else.
 * moas__type_name() also names the ggml types we do not support ("q4_0"). */
const char *moas__type_name(moas_type type);
const char *moas__meta_type_name(moas_meta_type type);

#endif /* MOAS_GGUF_H */
