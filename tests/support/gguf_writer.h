/*
 * gguf_writer.h - build GGUF v3 images in memory, valid or deliberately broken.
 *
 * Test support only. Add metadata and tensors in the order they should appear, then
 * call gguf_writer_finish() for the image: header, metadata, tensor directory, padding
 * to the alignment, then each tensor's data at the next aligned offset. There is no
 * padding after the last tensor, so every proper prefix of a finished image is
 * truncated inside something a reader must have.
 *
 * Values are given in host order; the writer stores them little-endian. Allocation
 * failures inside the writer are remembered, and gguf_writer_finish() then returns
 * NULL: callers check only that.
 *
 * The "raw" functions and the overrides write what a correct writer never would
 * (wrong counts, versions, offsets, types, names with NUL bytes, missing padding), for
 * the tests of malformed files.
 */
#ifndef MOAS_TEST_GGUF_WRITER_H
#define MOAS_TEST_GGUF_WRITER_H

#include "moas.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct gguf_writer gguf_writer;

/* A new empty writer (alignment 32, version 3), or NULL when out of memory. */
gguf_writer *gguf_writer_create(void);
void gguf_writer_free(gguf_writer *w);

/* Lay the data section out at `alignment` and also add the key general.alignment
 * (uint32) with that value, at this point in the metadata. */
void gguf_writer_set_alignment(gguf_writer *w, uint32_t alignment);

/* Lay the data section out at `alignment` without writing any key (for files whose key
 * disagrees with their layout, or that rely on the default of 32). 0 means 1. */
void gguf_writer_set_layout_alignment(gguf_writer *w, uint32_t alignment);

/* ---- metadata --------------------------------------------------------------------- */

void gguf_writer_add_u8(gguf_writer *w, const char *key, uint8_t value);
void gguf_writer_add_i8(gguf_writer *w, const char *key, int8_t value);
void gguf_writer_add_u16(gguf_writer *w, const char *key, uint16_t value);
void gguf_writer_add_i16(gguf_writer *w, const char *key, int16_t value);
void gguf_writer_add_u32(gguf_writer *w, const char *key, uint32_t value);
void gguf_writer_add_i32(gguf_writer *w, const char *key, int32_t value);
void gguf_writer_add_u64(gguf_writer *w, const char *key, uint64_t value);
void gguf_writer_add_i64(gguf_writer *w, const char *key, int64_t value);
void gguf_writer_add_f32(gguf_writer *w, const char *key, float value);
void gguf_writer_add_f64(gguf_writer *w, const char *key, double value);
void gguf_writer_add_bool(gguf_writer *w, const char *key, bool value);
void gguf_writer_add_string(gguf_writer *w, const char *key, const char *value);
/* A string of `len` bytes, which may include NUL bytes. */
void gguf_writer_add_string_n(gguf_writer *w, const char *key, const char *value, size_t len);

/* An array of `n` numeric elements of `elem_type` (not STRING or ARRAY), read from
 * `data` in host order with the C type of that size (uint8_t/int8_t/bool as 1 byte,
 * uint16_t, uint32_t, float, uint64_t, double, ...). */
void gguf_writer_add_array(gguf_writer *w, const char *key, moas_meta_type elem_type,
                           const void *data, size_t n);
/* An array of `n` NUL-terminated strings. */
void gguf_writer_add_array_string(gguf_writer *w, const char *key, const char *const *strs,
                                  size_t n);
/* An array of `n` strings with explicit lengths (may hold NUL bytes). */
void gguf_writer_add_array_string_n(gguf_writer *w, const char *key, const char *const *strs,
                                    const size_t *lens, size_t n);

/* Raw: a key of `key_len` bytes (any bytes, any length, 0 included), the type code
 * `type` (any number), then `n` payload bytes exactly as given. Counts as one entry. */
void gguf_writer_add_kv_raw(gguf_writer *w, const char *key, size_t key_len, uint32_t type,
                            const void *payload, size_t n);

/* Raw: append `n` bytes to the metadata section as they are, and count them as
 * `n_entries` entries in the header (lengths that lie, truncated values, ...). */
void gguf_writer_add_meta_raw(gguf_writer *w, const void *bytes, size_t n, uint64_t n_entries);

/* ---- tensors ---------------------------------------------------------------------- */

/* A tensor of `type` (F32, F16, BF16 or Q8_0) with `n_dims` dims `ne` (fastest first).
 * `data` holds its bytes (computed from type and dims); NULL writes zeros. Returns the
 * tensor's index, or -1 when the type or shape cannot be sized. */
int gguf_writer_add_tensor(gguf_writer *w, const char *name, moas_type type, uint32_t n_dims,
                           const int64_t *ne, const void *data);

/* Raw: the directory entry says what the arguments say (name of `name_len` bytes, any
 * type number, any n_dims with that many values in `ne`), and `n_bytes` bytes of `data`
 * (NULL: zeros) are placed at the next aligned offset of the data section. */
int gguf_writer_add_tensor_raw(gguf_writer *w, const char *name, size_t name_len,
                               uint32_t type, uint32_t n_dims, const uint64_t *ne,
                               const void *data, size_t n_bytes);

/* ---- overrides for broken files --------------------------------------------------- */

void gguf_writer_override_magic(gguf_writer *w, const char magic[4]);
void gguf_writer_override_version(gguf_writer *w, uint32_t version);
void gguf_writer_override_n_kv(gguf_writer *w, uint64_t n_kv);
void gguf_writer_override_n_tensors(gguf_writer *w, uint64_t n_tensors);
/* The directory gives tensor `index` this offset; its data stays where layout put it. */
void gguf_writer_override_offset(gguf_writer *w, int index, uint64_t offset);
/* Write no padding between the directory and the data section. */
void gguf_writer_skip_padding(gguf_writer *w);

/* ---- output ----------------------------------------------------------------------- */

/* The image, malloc'd (release with free()), and its size in *size; NULL when out of
 * memory. The writer stays usable: finish again after adding more. */
uint8_t *gguf_writer_finish(const gguf_writer *w, size_t *size);

/* Where tensor `index` starts in the last image the layout would produce, as an offset
 * from the start of the data section and of the file. */
uint64_t gguf_writer_tensor_offset(const gguf_writer *w, int index);
size_t gguf_writer_data_offset(const gguf_writer *w);
/* Where the tensor directory ends (before any padding). */
size_t gguf_writer_directory_end(const gguf_writer *w);

/* Bytes of `n` elements of `type` in rows of ne0, or 0 if that cannot be sized. */
size_t gguf_writer_tensor_bytes(moas_type type, const int64_t *ne, uint32_t n_dims);

#endif /* MOAS_TEST_GGUF_WRITER_H */
