/*
 * moas.h - the public interface of libmoas.
 *
 * libmoas runs character language models whose attention layers are a Mixture of
 * Attention Schemes (MoAS): per token, a learned router weighs multi-head (MHA),
 * grouped-query (GQA) and multi-query (MQA) attention. It loads a GGUF model file,
 * decodes token by token with a KV cache, and exposes every routing decision.
 *
 * QUICK START (the same program as examples/simple.c)
 *
 *     #include <moas.h>
 *     #include <stdio.h>
 *
 *     int main(int argc, char **argv) {
 *         moas_model *model = NULL;
 *         moas_context *ctx = NULL;
 *         moas_sampler *smp = NULL;
 *         const char *prompt = argc > 2 ? argv[2] : "In the beginning";
 *         int32_t tokens[256];
 *         size_t n_tokens = 0;
 *         int ok = 1;
 *
 *         if (argc < 2) {
 *             fprintf(stderr, "usage: %s MODEL.gguf [PROMPT]\n", argv[0]);
 *             return 2;
 *         }
 *         if (moas_model_load(argv[1], NULL, &model) != MOAS_OK ||
 *             moas_context_create(model, NULL, &ctx) != MOAS_OK ||
 *             moas_sampler_create(NULL, moas_model_n_vocab(model), &smp) != MOAS_OK ||
 *             moas_tokenize(model, prompt, (size_t)-1, tokens, 256, &n_tokens) != MOAS_OK ||
 *             moas_context_decode_batch(ctx, tokens, (int32_t)n_tokens, NULL,
 *                                       MOAS_LOGITS_LAST) != MOAS_OK) {
 *             ok = 0;
 *         }
 *         if (ok) {
 *             fputs(prompt, stdout);
 *             for (int i = 0; ok && i < 100 && moas_context_n_past(ctx) < moas_context_n_ctx(ctx);
 *                  i++) {
 *                 int32_t token;
 *                 ok = moas_sampler_sample(smp, moas_context_logits(ctx), &token) == MOAS_OK;
 *                 if (ok) {
 *                     fputs(moas_token_text(model, token), stdout);
 *                     ok = moas_context_decode(ctx, token, NULL) == MOAS_OK;
 *                 }
 *             }
 *             putchar('\n');
 *         }
 *         if (!ok) {
 *             fprintf(stderr, "error: %s\n", moas_last_error());
 *         }
 *         moas_sampler_free(smp);
 *         moas_context_free(ctx);
 *         moas_model_free(model);
 *         return ok ? 0 : 1;
 *     }
 *
 * THREADING. A model is read-only once loaded: any number of contexts, on any number of
 * threads, may share it. A context or a sampler belongs to one thread at a time; calls
 * on different contexts never interfere. A call that changes a context's sequence
 * (decode, truncate, reset, fork, state load, compaction, shift, free, a
 * moas_pool_decode() naming it) holds it until it returns, and another such call
 * meanwhile (from a route callback, or from another thread against the rule) is refused
 * with MOAS_ERR_BUSY and changes nothing (it may be retried once the first has
 * returned). The settings (forced scheme, budget,
 * route and abort callbacks) may be changed by a route callback on the decoding thread and are
 * refused the same way to another thread meanwhile; getters are not checked. A context
 * may use several threads inside one call (`n_threads`); results do not depend on that
 * number. The calling thread leads them and runs every callback; the others are the
 * context's own (the pool's, for moas_pool_decode), started by its first call that
 * uses them (in a child of fork(), by the child's first), kept until it is freed, with
 * every signal blocked but SIGSEGV, SIGBUS, SIGFPE and SIGILL (a fault there reaches
 * the host's handler). A worker that finds nothing to do, within a call or between
 * calls, spins for tens of microseconds, then sleeps until the next step; the calling
 * thread waiting for another's slice spins, yields, then sleeps (docs/API.md,
 * "Decode"). Changed 2026-12-06: the other threads were OpenMP's, whose runtime kept
 * them spinning for milliseconds after each call (up to 200 ms with LLVM's). When the
 * other threads come late (the machine's cores are busy), the following calls run on the
 * calling thread alone for a while; and a small call (a decoded token of a small model)
 * runs on the calling thread alone whenever that was last measured faster than the
 * team. A call should still not ask for more threads than it has free cores. A decoding
 * call needs up to about 48 KB of stack on the calling thread and on each worker (Q8_0
 * weights make a block of rows into floats there); each worker has a stack of 1 MiB,
 * whatever `ulimit -s` says.
 *
 * OWNERSHIP. The caller owns what it passes in; the library never keeps a caller's
 * pointer beyond the call unless the function's documentation says so (a memory
 * buffer given to moas_model_load_memory(), an allocator). Objects created by the
 * library are released with their own _free function, which accepts NULL. Pointers
 * the library returns ("borrowed") stay valid as long as the object they came from,
 * unless the documentation names an earlier end (the next call on the same context).
 *
 * ERRORS. Every fallible function returns a moas_status: MOAS_OK (0) or a negative
 * code. moas_status_string() gives a fixed sentence per code; moas_last_error() gives
 * the exact cause of the calling thread's last failure ("gguf: tensor 'blk.1.ffn_up.weight'
 * ends at byte 90112 but the file has 90000"). A failed call changes nothing the caller
 * can observe: constructors set *out to NULL and leak nothing; a context keeps its
 * cache, position and counters. The library never aborts, exits or prints; it speaks
 * only through a log callback the caller installs.
 *
 * STABILITY. Functions, types and enum values declared here keep their meaning and
 * binary layout for every 1.x release; new functions, enum values and parameter-struct
 * fields are only appended. Parameter structs begin with a `size` field that their
 * _init() function sets, so an older program keeps working with a newer library. A
 * size larger than this library's struct, or one that ends part way through a field,
 * is refused (MOAS_ERR_INVALID_ARG, "bad params->size" below).
 * The ABI is checked against a baseline on every CI run (docs/API.md).
 */
#ifndef MOAS_H
#define MOAS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  if defined(MOAS_BUILD)
#    define MOAS_API __declspec(dllexport)
#  else
#    define MOAS_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__) && defined(MOAS_BUILD)
#  define MOAS_API __attribute__((visibility("default")))
#else
#  define MOAS_API
#endif

/* ======================================================================
 *  Version
 * ====================================================================== */

#define MOAS_VERSION_MAJOR 1
#define MOAS_VERSION_MINOR 1
#define MOAS_VERSION_PATCH 0
#define MOAS_VERSION_NUMBER \
    (MOAS_VERSION_MAJOR * 10000 + MOAS_VERSION_MINOR * 100 + MOAS_VERSION_PATCH)
#define MOAS_VERSION_STRING "1.1.0"

/*
 * moas_version_number() - the version of the library actually linked.
 *
 * Compare with MOAS_VERSION_NUMBER to check that the header an application was
 * compiled with matches the library it runs with (same major version).
 *
 * Returns: MAJOR * 10000 + MINOR * 100 + PATCH, e.g. 10000 for 1.0.0.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API int32_t moas_version_number(void);

/*
 * moas_version_string() - the linked library's version as text.
 *
 * Returns: a static string such as "1.0.0", never NULL.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API const char *moas_version_string(void);

/* ======================================================================
 *  Status and errors
 * ====================================================================== */

/* One row per status: name, pinned value, message. Rows are only ever appended. */
#define MOAS_STATUS_MAP(X)                                                        \
    X(OK,                    0, "success")                                        \
    X(ERR_INVALID_ARG,      -1, "invalid argument")                               \
    X(ERR_NO_MEMORY,        -2, "out of memory")                                  \
    X(ERR_IO,               -3, "cannot read the model file")                     \
    X(ERR_BAD_FORMAT,       -4, "not a GGUF version 3 file")                      \
    X(ERR_CORRUPT,          -5, "model file is truncated or inconsistent")        \
    X(ERR_UNSUPPORTED,      -6, "model needs a feature this build lacks")         \
    X(ERR_CONTEXT_FULL,     -7, "context length reached")                         \
    X(ERR_UNKNOWN_CHAR,     -8, "text has a character outside the vocabulary")    \
    X(ERR_BUFFER_TOO_SMALL, -9, "output buffer too small")                        \
    X(ERR_NOT_FOUND,       -10, "no such metadata key or tensor")                 \
    X(ERR_WRONG_TYPE,      -11, "metadata value has another type")               \
    X(ERR_INTERNAL,        -12, "internal error (a bug in libmoas)")                \
    X(ERR_INVALID_UTF8,    -13, "text is not valid UTF-8")                 \
    X(ERR_POOL_FULL,       -14, "the KV pool has too few free pages")             \
    X(ERR_BUSY,            -15, "the object is in use by another call")              \
    X(ERR_ABORTED,         -16, "the call was stopped by its abort callback")

typedef enum moas_status {
#define MOAS_STATUS_ENUM_(name_, value_, msg_) MOAS_##name_ = value_,
    MOAS_STATUS_MAP(MOAS_STATUS_ENUM_)
#undef MOAS_STATUS_ENUM_
    MOAS_STATUS_COUNT = 17 /* number of statuses, not a status */
} moas_status;

/*
 * moas_status_string() - a fixed sentence describing a status.
 *
 * Returns: a static NUL-terminated string, never NULL; "unknown status" for a value
 *          outside the table.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API const char *moas_status_string(moas_status status);

/*
 * moas_status_name() - the name of a status, as spelled in this header.
 *
 * For bindings that have no access to MOAS_STATUS_MAP.
 *
 * Returns: a static string such as "MOAS_ERR_CORRUPT", never NULL; "MOAS_UNKNOWN" for a
 *          value outside the table.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API const char *moas_status_name(moas_status status);

/*
 * moas_last_error() - the cause of this thread's most recent failure.
 *
 * Every failing libmoas call records, for the calling thread only, a message naming
 * the exact cause (a tensor, an offset, a token id). A successful call does not clear
 * it. The text stays valid until this thread's next failing libmoas call. It is UTF-8
 * with no control or invisible format characters, safe to print: what it quotes from
 * a file (an architecture's name, a key, a tensor's name) has its control characters
 * but a tab, and its bidi and zero-width ones, written as \uXXXX, and its bytes that
 * are no UTF-8 as \xXX; a message too long for its 511 bytes is cut at a character's
 * boundary. A log callback gets the same text; a library call it makes that fails
 * does not replace the message the failing call leaves (it did until 2026-12-06).
 *
 * Returns: a NUL-terminated string, never NULL; "" if nothing has failed yet.
 * Thread safety: safe; each thread sees its own message.   Allocates: no.
 */
MOAS_API const char *moas_last_error(void);

/* ======================================================================
 *  Logging and allocation
 * ====================================================================== */

typedef enum moas_log_level {
    MOAS_LOG_ERROR = 0,
    MOAS_LOG_WARN  = 1,
    MOAS_LOG_INFO  = 2,
    MOAS_LOG_DEBUG = 3,
    MOAS_LOG_LEVEL_COUNT
} moas_log_level;

/* A log callback receives one complete line without a trailing newline, in a buffer
 * that lives only for the callback's call: copy it to keep it (moas_last_error()
 * still gives the text afterwards). It may be called from any thread that calls into
 * the object it was given to. */
typedef void (*moas_log_fn)(void *user, moas_log_level level, const char *message);

/*
 * A caller-supplied allocator, attached to one object through its params. `alloc`
 * returns NULL on failure; `free` accepts NULL. The library asks for no particular
 * alignment beyond what malloc() guarantees. The struct and its functions must stay
 * valid for the whole life of the object. NULL in params means malloc()/free().
 */
typedef struct moas_allocator {
    void *(*alloc)(void *user, size_t size);  /* returns NULL on failure */
    void (*free)(void *user, void *ptr);      /* accepts NULL */
    void *user;                               /* handed back unchanged */
} moas_allocator;

/* ======================================================================
 *  Model
 * ====================================================================== */

typedef struct moas_model moas_model;  /* opaque; read-only once loaded */

/* Element types, numbered as in GGUF. */
typedef enum moas_type {
    MOAS_TYPE_F32  = 0,   /* IEEE binary32 */
    MOAS_TYPE_F16  = 1,   /* IEEE binary16 */
    MOAS_TYPE_Q8_0 = 8,   /* blocks of 32: an f16 scale, then 32 int8 */
    MOAS_TYPE_BF16 = 30   /* bfloat16 */
} moas_type;

/* How a layer combines the outputs of its attention schemes. */
typedef enum moas_mixing {
    MOAS_MIXING_SINGLE = 0,  /* one scheme (a plain MHA, GQA or MQA model) */
    MOAS_MIXING_MEAN   = 1,  /* the mean of all schemes ("static MoAS") */
    MOAS_MIXING_ROUTER = 2,  /* per-token softmax gates from a router ("dynamic MoAS") */
    MOAS_MIXING_COUNT
} moas_mixing;

/* How the schemes of a layer relate to each other's projections. */
typedef enum moas_kv_sharing {
    MOAS_KV_SHARING_INDEPENDENT = 0,  /* each scheme has its own Q, K, V, output */
    MOAS_KV_SHARING_POOLED      = 1,  /* one Q, K, V, output; K/V mean-pooled per scheme */
    MOAS_KV_SHARING_COUNT
} moas_kv_sharing;

typedef struct moas_model_params {
    uint32_t size;                    /* sizeof(moas_model_params); set by _init() */
    int32_t use_mmap;                 /* 1 (default): map the file read-only; 0: read it */
    moas_log_fn log;                  /* NULL (default): the library stays silent */
    void *log_user;                   /* handed back to `log` unchanged; default NULL */
    const moas_allocator *allocator;  /* NULL (default): malloc/free; must outlive the model */
} moas_model_params;

/*
 * moas_model_params_init_sized() - fill the caller's `size` bytes of `params` with the
 *                                  defaults, and set params->size to what was filled.
 * moas_model_params_init(params) - the same with the caller's sizeof (a macro).
 *
 * Always initialise params this way before setting fields: fields added by a later
 * version then get their defaults, and a program built against an older, smaller
 * struct is never written past its end. FFI callers pass their struct's size. Nothing
 * is written when `params` is NULL or `size` cannot hold the size field.
 *
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API void moas_model_params_init_sized(moas_model_params *params, size_t size);
#define moas_model_params_init(params_) \
    moas_model_params_init_sized((params_), sizeof *(params_))

/*
 * moas_model_load() - open a GGUF model file.
 * CONSTRUCTOR: moas_model
 *
 * Maps the file at `path` read-only (or reads it, if params->use_mmap is 0) and checks
 * its header, metadata, tensor directory and every tensor the architecture needs
 * (presence, shape, type) before returning. Weights are used in place from the
 * mapping. `params` may be NULL for defaults. On success *out holds a model to release
 * with moas_model_free(); on failure *out is NULL, nothing is leaked and
 * moas_last_error() names the cause. The model must outlive every context made from it.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (`path` or `out` NULL, bad params->size),
 *          MOAS_ERR_IO (cannot open, stat, map or read; or `path` is a directory, a
 *          device or a pipe, not a regular file), MOAS_ERR_BAD_FORMAT (magic or
 *          version), MOAS_ERR_CORRUPT (truncated or inconsistent file, missing or
 *          misshapen tensor), MOAS_ERR_UNSUPPORTED (architecture, tensor type or
 *          feature this version lacks), MOAS_ERR_NO_MEMORY.
 * Thread safety: safe.   Allocates: yes.
 */
MOAS_API moas_status moas_model_load(const char *path, const moas_model_params *params,
                                     moas_model **out);

/*
 * moas_model_load_memory() - open a GGUF model held in memory.
 * CONSTRUCTOR: moas_model
 *
 * Like moas_model_load(), for the `size` bytes at `data`. The buffer is borrowed: it
 * must stay valid and unchanged until moas_model_free(). Weights are used in place,
 * so if `data` is not 4-byte aligned (malloc() and mmap() always are), the library
 * copies the buffer once into an aligned one of its own (moas_model_tensor() reports
 * where each tensor's data lives). params->use_mmap is ignored.
 *
 * Returns: as moas_model_load(), without MOAS_ERR_IO; MOAS_ERR_INVALID_ARG also when
 *          `data` is NULL.
 * Thread safety: safe.   Allocates: yes.
 */
MOAS_API moas_status moas_model_load_memory(const void *data, size_t size,
                                            const moas_model_params *params,
                                            moas_model **out);

/*
 * moas_model_free() - release a model and its mapping.
 * DESTRUCTOR: moas_model
 *
 * Every context made from `model` must have been freed first. NULL is a no-op.
 *
 * Thread safety: not while any other thread uses `model`.   Allocates: no.
 */
MOAS_API void moas_model_free(moas_model *model);

/* Hyperparameters. These cannot fail; a NULL `model` reads as 0 ("" for the name,
 * MOAS_MIXING_ROUTER and MOAS_KV_SHARING_INDEPENDENT for the enums; the architecture is
 * "moas" for every model, NULL included). */
MOAS_API const char *moas_model_arch(const moas_model *model);  /* "moas" */
MOAS_API const char *moas_model_name(const moas_model *model);  /* general.name, or "" */
MOAS_API int32_t moas_model_n_layer(const moas_model *model);   /* transformer blocks */
MOAS_API int32_t moas_model_n_embd(const moas_model *model);    /* model width C */
MOAS_API int32_t moas_model_n_head(const moas_model *model);    /* query heads H */
MOAS_API int32_t moas_model_head_dim(const moas_model *model);  /* C / H */
MOAS_API int32_t moas_model_n_ff(const moas_model *model);      /* MLP width */
MOAS_API int32_t moas_model_n_vocab(const moas_model *model);   /* tokens (characters) */
MOAS_API int32_t moas_model_n_ctx_train(const moas_model *model); /* trained positions */
MOAS_API int32_t moas_model_n_scheme(const moas_model *model);  /* attention schemes, >= 1 */
MOAS_API moas_mixing moas_model_mixing(const moas_model *model);   /* how schemes combine */
MOAS_API moas_kv_sharing moas_model_kv_sharing(const moas_model *model); /* projections */
MOAS_API int32_t moas_model_has_bias(const moas_model *model);  /* 1 if Linear/LN biases */
MOAS_API uint64_t moas_model_n_params(const moas_model *model); /* elements of all tensors */

/*
 * moas_model_scheme_n_kv() - KV heads stored per token by attention scheme `scheme`.
 *
 * For the published MoAS layout this is n_head for scheme 0 (MHA), 2 for scheme 1
 * (GQA) and 1 for scheme 2 (MQA).
 *
 * Returns: a divisor of moas_model_n_head(), or 0 when `scheme` is out of range.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API int32_t moas_model_scheme_n_kv(const moas_model *model, int32_t scheme);

/* A tensor of the model file, as moas_model_tensor() reports it. */
typedef struct moas_tensor_info {
    uint32_t size;       /* set by the caller to sizeof(moas_tensor_info) */
    const char *name;    /* borrowed from the model, e.g. "blk.0.attn_q.1.weight" */
    moas_type type;      /* element type */
    int32_t n_dims;      /* 1..4 */
    int64_t ne[4];       /* elements per dimension, fastest first; unused ones are 1 */
    uint64_t offset;     /* byte offset of the data from the start of the file */
    uint64_t n_bytes;    /* bytes of data */
    const void *data;    /* borrowed; the weights, in the model's mapping or buffer */
} moas_tensor_info;

/*
 * moas_model_n_tensors() - how many tensors the file has.
 *
 * Returns: the count (tensors the architecture does not use included).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API int64_t moas_model_n_tensors(const moas_model *model);

/*
 * moas_model_tensor() - describe tensor number `index` of the file.
 *
 * `info->size` must be set by the caller; the library fills only the whole fields that
 * fit in that size and sets info->size to the bytes it wrote. Tensors are numbered 0 .. moas_model_n_tensors()-1 in file order.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL argument, `index` out of range,
 *          info->size too small for `name`).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_tensor(const moas_model *model, int64_t index,
                                       moas_tensor_info *info);

/*
 * moas_model_tensor_find() - the index of the tensor called `name`.
 *
 * Returns: MOAS_OK with *index set, MOAS_ERR_NOT_FOUND, or MOAS_ERR_INVALID_ARG (NULL).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_tensor_find(const moas_model *model, const char *name,
                                            int64_t *index);

/* Types of GGUF metadata values, numbered as in GGUF. */
typedef enum moas_meta_type {
    MOAS_META_UINT8   = 0,
    MOAS_META_INT8    = 1,
    MOAS_META_UINT16  = 2,
    MOAS_META_INT16   = 3,
    MOAS_META_UINT32  = 4,
    MOAS_META_INT32   = 5,
    MOAS_META_FLOAT32 = 6,
    MOAS_META_BOOL    = 7,
    MOAS_META_STRING  = 8,
    MOAS_META_ARRAY   = 9,
    MOAS_META_UINT64  = 10,
    MOAS_META_INT64   = 11,
    MOAS_META_FLOAT64 = 12,
    MOAS_META_TYPE_COUNT
} moas_meta_type;

/*
 * moas_model_meta_count() - how many metadata keys the file has.
 *
 * Returns: the count; keys are numbered 0 .. count-1 in file order.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API int64_t moas_model_meta_count(const moas_model *model);

/*
 * moas_model_meta_key() - the name of metadata key number `index`.
 *
 * Returns: a borrowed NUL-terminated string, or NULL when `index` is out of range.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API const char *moas_model_meta_key(const moas_model *model, int64_t index);

/*
 * moas_model_meta_type() - the type of the value stored under `key`.
 *
 * For an array, *type is MOAS_META_ARRAY; moas_model_meta_array() tells its element
 * type and length.
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, or MOAS_ERR_INVALID_ARG (NULL argument).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_type(const moas_model *model, const char *key,
                                          moas_meta_type *type);

/*
 * moas_model_meta_int() - read an integer value, of any GGUF integer type.
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, MOAS_ERR_WRONG_TYPE (not an integer, or a
 *          uint64 above INT64_MAX), or MOAS_ERR_INVALID_ARG (NULL argument).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_int(const moas_model *model, const char *key,
                                         int64_t *value);

/*
 * moas_model_meta_float() - read a float32 or float64 value.
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, MOAS_ERR_WRONG_TYPE, or MOAS_ERR_INVALID_ARG.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_float(const moas_model *model, const char *key,
                                           double *value);

/*
 * moas_model_meta_bool() - read a bool value as 0 or 1.
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, MOAS_ERR_WRONG_TYPE, or MOAS_ERR_INVALID_ARG.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_bool(const moas_model *model, const char *key,
                                          int32_t *value);

/*
 * moas_model_meta_string() - read a string value.
 *
 * *value receives a borrowed NUL-terminated copy and *length (may be NULL) its length
 * in bytes; a GGUF string may hold NUL bytes, so trust *length over strlen().
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, MOAS_ERR_WRONG_TYPE, or MOAS_ERR_INVALID_ARG.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_string(const moas_model *model, const char *key,
                                            const char **value, size_t *length);

/*
 * moas_model_meta_array() - the element type and length of an array value.
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, MOAS_ERR_WRONG_TYPE (not an array), or
 *          MOAS_ERR_INVALID_ARG (NULL argument).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_array(const moas_model *model, const char *key,
                                           moas_meta_type *elem_type, uint64_t *n_elems);

/*
 * moas_model_meta_array_int() - element `index` of an integer array.
 * moas_model_meta_array_float() - element `index` of a float array.
 * moas_model_meta_array_string() - element `index` of a string array (borrowed,
 *                                  NUL-terminated; `length` may be NULL).
 *
 * Returns: MOAS_OK, MOAS_ERR_NOT_FOUND, MOAS_ERR_WRONG_TYPE (not an array of that kind),
 *          or MOAS_ERR_INVALID_ARG (NULL argument, `index` out of range).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_model_meta_array_int(const moas_model *model, const char *key,
                                               uint64_t index, int64_t *value);
MOAS_API moas_status moas_model_meta_array_float(const moas_model *model, const char *key,
                                                 uint64_t index, double *value);
MOAS_API moas_status moas_model_meta_array_string(const moas_model *model, const char *key,
                                                  uint64_t index, const char **value,
                                                  size_t *length);

/* ======================================================================
 *  Context
 * ====================================================================== */

typedef struct moas_context moas_context;  /* opaque; one thread at a time */
typedef struct moas_pool moas_pool;        /* opaque; a KV pool shared by contexts */

/* How a context runs the attention schemes. */
typedef enum moas_mode {
    MOAS_MODE_MIXTURE = 0,  /* exact: every scheme runs, outputs mixed as trained */
    MOAS_MODE_ROUTED  = 1,  /* one scheme per token and layer; its K/V alone are stored */
    MOAS_MODE_COUNT
} moas_mode;

/*
 * A route callback, called for every token and layer as the token is decoded, after
 * the router and before the layer's attention. `gates` holds the layer's n_scheme
 * scheme weights for this token (docs/ROUTING.md); `proposed` is the scheme the
 * context would use: the forced scheme if one is set, else the largest gate.
 *
 * In routed mode the return value is the scheme to use; a value outside
 * [0, n_scheme) keeps `proposed`. A KV budget still applies after the callback (it
 * may replace the choice with a cheaper scheme). In mixture mode every scheme runs
 * and the return value is ignored: the callback only observes.
 *
 * The callback runs on the decoding thread and must not call the same context, nor
 * another context of the same moas_pool_decode() call: decoding, truncating,
 * resetting, forking, loading state into, compacting, shifting or freeing such a
 * context is refused (MOAS_ERR_BUSY, "in use by another call"; for reset and
 * free, a no-op with moas_last_error() set), as it would change pages the decode is
 * writing (THREADING above). Within
 * one moas_context_decode_batch() call it sees blocks of tokens layer by layer (every
 * token's layer 0, then layer 1, ...), so its answer must depend only on its arguments
 * (and state of its own that does not assume token-major order).
 */
typedef int32_t (*moas_route_fn)(void *user, int32_t pos, int32_t layer, const float *gates,
                                 int32_t n_scheme, int32_t proposed);

/*
 * An abort callback, asked by a decoding call of its context (moas_context_decode,
 * moas_context_decode_batch, moas_pool_decode) before each block of tokens and between
 * the layers of a block, on the calling thread. A nonzero return stops the call: it
 * returns MOAS_ERR_ABORTED and undoes what it did, so every context of the call is as
 * before it (tokens, cache, pages, routing records), except that
 * moas_context_logits() returns NULL until the next decode, as after
 * moas_context_truncate(), and the caller's logits arrays hold nothing meaningful.
 * One thing a stopped call may keep: a context whose partly written last page it shared
 * with a fork holds the private copy of that page the call made when it reserved its
 * pages (copy on write, as its next decode would make it anyway): the same contents
 * and page count, one page fewer free in the pool.
 * The typical callback reads a flag another thread sets (an atomic), or a deadline.
 * Like a route callback, it may change its context's settings but not its sequence
 * (decode, truncate, ... are refused with MOAS_ERR_BUSY).
 * A decode of a small model's block, where the threads take whole sequences each, is
 * asked before the block only. A call whose last layer has begun completes.
 */
typedef int32_t (*moas_abort_fn)(void *user);

/* Which kernels a context uses. */
typedef enum moas_kernels {
    MOAS_KERNELS_AUTO = 0,  /* the fastest this CPU supports, chosen at context creation */
    MOAS_KERNELS_REF  = 1,  /* the portable reference loops (for testing) */
    MOAS_KERNELS_COUNT
} moas_kernels;

/* Which logits moas_context_decode_batch() computes. */
typedef enum moas_logits {
    MOAS_LOGITS_NONE = 0,  /* none: prompt prefill whose logits nobody reads */
    MOAS_LOGITS_LAST = 1,  /* the last token's (also kept in moas_context_logits()) */
    MOAS_LOGITS_ALL  = 2,  /* every token's: `logits` is [n_tokens][n_vocab] */
    MOAS_LOGITS_COUNT
} moas_logits;

typedef struct moas_context_params {
    uint32_t size;                    /* sizeof(moas_context_params); set by _init() */
    int32_t n_ctx;                    /* tokens the cache holds; 0 (default): trained length */
    int32_t n_threads;                /* threads per call (<= 1024); 0: every CPU the
                                       * process may run on, within its cgroup's CPU
                                       * quota */
    int32_t mode;                     /* a moas_mode; default MOAS_MODE_MIXTURE */
    int32_t kv_type;                  /* a moas_type: MOAS_TYPE_F32 (default), _F16, or
                                         _Q8_0 (blocks of 32 along a head: head_dim a
                                         multiple of 32) */
    int32_t kernels;                  /* a moas_kernels; default MOAS_KERNELS_AUTO */
    moas_log_fn log;                  /* NULL (default): silent */
    void *log_user;                   /* handed back to `log` unchanged; default NULL */
    const moas_allocator *allocator;  /* NULL (default): malloc/free; must outlive ctx */
    int32_t forced_scheme;            /* routed mode: -1 (default) router decides; else this
                                         scheme for every token (moas_context_force_scheme) */
    uint64_t kv_budget_bytes;         /* 0 (default): none; else a cap on
                                         moas_context_kv_bytes_used(ctx, -1) (docs/ROUTING.md) */
    moas_route_fn route_fn;           /* NULL (default): no callback */
    void *route_user;                 /* handed back to `route_fn` unchanged */
    /* added in 1.1 */
    struct moas_pool *pool;           /* NULL (default): the context's KV cache is a private
                                         pool sized for n_ctx tokens; else its pages come
                                         from this pool (same model; the pool's kv_type and
                                         kernels apply), which must outlive the context */
    int32_t n_batch;                  /* tokens per block of the context's own calls;
                                         0 (default): 128, or n_ctx if smaller; below 64
                                         its per-slice attention scratch is a quarter
                                         (for a context decoded mostly by
                                         moas_pool_decode) */
} moas_context_params;

/*
 * moas_context_params_init_sized() - fill the caller's `size` bytes of `params` with the
 *                                  defaults, and set params->size to what was filled.
 * moas_context_params_init(params) - the same with the caller's sizeof (a macro).
 *
 * Always initialise params this way before setting fields: fields added by a later
 * version then get their defaults, and a program built against an older, smaller
 * struct is never written past its end. FFI callers pass their struct's size. Nothing
 * is written when `params` is NULL or `size` cannot hold the size field.
 *
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API void moas_context_params_init_sized(moas_context_params *params, size_t size);
#define moas_context_params_init(params_) \
    moas_context_params_init_sized((params_), sizeof *(params_))

/*
 * moas_context_create() - make an inference context for `model`.
 * CONSTRUCTOR: moas_context
 *
 * Allocates everything decoding will need, once: activations, scratch, the KV cache at
 * full capacity and the routing records; in a caller's pool (params.pool) the
 * activations and scratch of the context's own decode calls come with the first such
 * call instead, so that a context only moas_pool_decode() advances never has them.
 * `params` may be NULL for defaults. The model
 * is borrowed and must outlive the context. On failure *out is NULL and nothing leaks.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `model`/`out`, n_ctx negative or above
 *          the trained length, n_threads outside [0, 1024], unknown mode, kv_type or
 *          kernels, a Q8_0 kv_type with head_dim not a multiple of 32,
 *          forced_scheme outside [-1, n_scheme) or set in mixture mode, a kv budget
 *          below one token's cheapest KV, bad params->size), MOAS_ERR_NO_MEMORY.
 * Thread safety: safe (the model is only read).   Allocates: yes.
 */
MOAS_API moas_status moas_context_create(const moas_model *model,
                                         const moas_context_params *params,
                                         moas_context **out);

/*
 * moas_context_free() - release a context.
 * DESTRUCTOR: moas_context
 *
 * NULL is a no-op. A context that another call holds (its decode under way, called
 * from a route callback, or another thread's call) is not freed: the call is refused,
 * as moas_last_error() then says.
 *
 * Thread safety: not while another thread uses `ctx`.   Allocates: no.
 */
MOAS_API void moas_context_free(moas_context *ctx);

/*
 * moas_context_decode() - run the model on the next token.
 * METHOD: moas_context
 *
 * Computes the logits for `token` at position moas_context_n_past(ctx), stores its
 * keys and values in the cache and records its routing. The logits are kept in the
 * context (moas_context_logits()) and, when `logits` is not NULL, also copied to the
 * caller's moas_model_n_vocab() floats. On failure nothing changes: cache, position,
 * logits and routing records are as before, and the context stays usable.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `ctx`, `token` outside [0, n_vocab)),
 *          MOAS_ERR_CONTEXT_FULL (n_ctx tokens already stored, or the KV budget has no
 *          room for even the cheapest scheme's K/V of one more token),
 *          MOAS_ERR_POOL_FULL (a context in a caller's pool: the pool lacks the pages
 *          the token needs; the message says how many),
 *          MOAS_ERR_NO_MEMORY (the first own call of a context in a caller's pool),
 *          MOAS_ERR_BUSY (another call holds the context: THREADING above),
 *          MOAS_ERR_ABORTED (its abort callback stopped it: moas_abort_fn).
 * Thread safety: one thread per context.   Allocates: never per token; a context in
 *   a caller's pool, on its first call of this or decode_batch, its workspace, once.
 */
MOAS_API moas_status moas_context_decode(moas_context *ctx, int32_t token, float *logits);

/*
 * moas_context_decode_batch() - run the model on `n_tokens` consecutive tokens.
 * METHOD: moas_context
 *
 * Equivalent to moas_context_decode() on each token in turn (the same logits, cache
 * and routing), but checks every token and the room left before touching anything:
 * either all tokens are stored or none (the room first, so a count larger than the
 * array is refused before the array is read). `which` selects the logits written to
 * `logits`: MOAS_LOGITS_NONE (then `logits` may be NULL), MOAS_LOGITS_LAST
 * ([n_vocab] floats; may be NULL, the context keeps them anyway) or MOAS_LOGITS_ALL
 * ([n_tokens][n_vocab] floats, required). `n_tokens` may be 0: nothing is decoded or
 * written, `logits` may be NULL whatever `which` says, and moas_context_logits() keeps
 * what it had.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `ctx`, NULL `tokens` with n_tokens
 *          > 0, negative n_tokens, a token outside [0, n_vocab) — its index is named —,
 *          unknown `which`, MOAS_LOGITS_ALL with NULL `logits`),
 *          MOAS_ERR_CONTEXT_FULL (n_past + n_tokens > n_ctx, or the KV budget cannot
 *          hold the batch even with the cheapest scheme everywhere),
 *          MOAS_ERR_POOL_FULL, MOAS_ERR_NO_MEMORY, MOAS_ERR_BUSY, MOAS_ERR_ABORTED (as
 *          moas_context_decode()).
 * Thread safety: one thread per context.   Allocates: as moas_context_decode().
 */
MOAS_API moas_status moas_context_decode_batch(moas_context *ctx, const int32_t *tokens,
                                               int32_t n_tokens, float *logits,
                                               moas_logits which);

/*
 * moas_context_logits() - the logits of the last decoded token.
 *
 * Returns: a borrowed array of moas_model_n_vocab() floats, valid until the next call
 *          that decodes, truncates, resets, shifts, loads state into or frees `ctx`;
 *          NULL when no token has been decoded since creation, reset, a truncate or a
 *          shift that dropped the last token, when the last call that decoded tokens
 *          was a moas_context_decode_batch() with MOAS_LOGITS_NONE, or after loading a
 *          state saved without logits.
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API const float *moas_context_logits(const moas_context *ctx);

/* Context state. These cannot fail; a NULL `ctx` reads as 0 (NULL model, "" kernels,
 * MOAS_MODE_MIXTURE). */
MOAS_API int32_t moas_context_n_past(const moas_context *ctx);    /* tokens in the cache */
MOAS_API int32_t moas_context_n_ctx(const moas_context *ctx);     /* capacity in tokens */
MOAS_API moas_mode moas_context_mode(const moas_context *ctx);     /* as created */
MOAS_API const moas_model *moas_context_model(const moas_context *ctx); /* borrowed */
MOAS_API const char *moas_context_kernels_name(const moas_context *ctx); /* e.g. "ref" */

/*
 * moas_context_reset() - forget every token: empty the cache and the routing records.
 * METHOD: moas_context
 *
 * Its tokens, routing records, logits and pages go; what was set on it since its
 * creation stays (a forced scheme, a KV budget, route and abort callbacks). A NULL `ctx`
 * does nothing (moas_last_error() says so). While another call holds
 * the context (its decode, from a route callback; another thread's call), it does
 * nothing and sets moas_last_error().
 *
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API void moas_context_reset(moas_context *ctx);

/*
 * moas_context_truncate() - keep only the first `n_keep` tokens of the cache.
 * METHOD: moas_context
 *
 * Afterwards the context is exactly as if only those tokens had been decoded: the next
 * decode is at position `n_keep` and gives the same results as in that history.
 * moas_context_logits() returns NULL until the next decode.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `ctx`, `n_keep` < 0 or > n_past),
 *          MOAS_ERR_BUSY (another call holds the context: THREADING above).
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API moas_status moas_context_truncate(moas_context *ctx, int32_t n_keep);

/* ======================================================================
 *  Routing and KV accounting
 * ====================================================================== */

/*
 * moas_context_routes() - the routing of positions [pos, pos + n_pos).
 * METHOD: moas_context
 *
 * Copies, for every position in the range (all < n_past) and every layer, in
 * position-major order:
 *   gates    [n_pos][n_layer][n_scheme]  the layer's scheme weights for the token: the
 *            router's softmax gates, 1/n_scheme each for mean mixing, 1 for single
 *            (as computed, before any forcing, callback or budget);
 *   schemes  [n_pos][n_layer]  routed mode: the scheme that ran; mixture mode: the
 *            scheme with the largest gate (the first on ties), i.e. routed mode's pick;
 *   kv_heads [n_pos][n_layer]  KV heads the cache stores for that token and layer:
 *            routed mode n_kv of the scheme that ran; mixture mode every scheme's (the
 *            sum of their n_kv), or for a pooled model n_head (one mix of all heads).
 * Any of the three arrays may be NULL. n_pos may be 0.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `ctx`, range outside [0, n_past)).
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API moas_status moas_context_routes(const moas_context *ctx, int32_t pos, int32_t n_pos,
                                         float *gates, int32_t *schemes, int32_t *kv_heads);

/*
 * moas_context_scheme_counts() - tokens per scheme in one layer, or in all.
 * METHOD: moas_context
 *
 * Writes to `counts` [n_scheme] how many of the n_past stored tokens used each scheme
 * in `layer` (routed mode: the scheme that ran; mixture mode: the largest gate), or,
 * for `layer` -1, the sum over layers (token-layer pairs).
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL argument, `layer` outside
 *          [-1, n_layer)).
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API moas_status moas_context_scheme_counts(const moas_context *ctx, int32_t layer,
                                                int32_t *counts);

/*
 * moas_context_force_scheme() - route every following token to `scheme`.
 * METHOD: moas_context
 *
 * Routed mode only (-1 is accepted in mixture mode too, where nothing is forced).
 * `scheme` -1 returns the choice to the router. Takes effect from the next decoded
 * token, so a caller may force one token and release the next; set from a route
 * callback, from the next routing decision (the next layer of the token under way).
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `ctx`, `scheme` outside
 *          [-1, n_scheme), a scheme for a context in mixture mode), MOAS_ERR_BUSY (a
 *          context another thread's call holds: THREADING above).
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API moas_status moas_context_force_scheme(moas_context *ctx, int32_t scheme);

/*
 * moas_context_set_kv_budget() - cap the KV bytes the context may use.
 * METHOD: moas_context
 *
 * `bytes` 0 removes the cap. In routed mode the choice of scheme leans toward
 * cheaper schemes as use approaches the cap, so that a full context fits when the cap
 * allows it (policy in docs/ROUTING.md); in mixture mode the cap only limits the
 * number of tokens. Tokens already stored are kept even if they exceed a new cap.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `ctx`, a nonzero cap below what one
 *          token needs with the cheapest scheme in every layer), MOAS_ERR_BUSY (a
 *          context another thread's call holds: THREADING above).
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API moas_status moas_context_set_kv_budget(moas_context *ctx, uint64_t bytes);

/*
 * moas_context_set_route_callback() - install or remove (`fn` NULL) the route callback.
 * METHOD: moas_context
 *
 * See moas_route_fn. A NULL `ctx`, or one another thread's call holds (THREADING
 * above), is left as it is (moas_last_error() says why).
 *
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API void moas_context_set_route_callback(moas_context *ctx, moas_route_fn fn, void *user);

/*
 * moas_context_set_abort_callback() - install or remove (`fn` NULL) the abort callback.
 * METHOD: moas_context
 *
 * See moas_abort_fn (added in 1.1). A fork gets its parent's. A NULL `ctx`, or one
 * another thread's call holds (THREADING above), is left as it is (moas_last_error()
 * says why); the callback itself may change it.
 *
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API void moas_context_set_abort_callback(moas_context *ctx, moas_abort_fn fn, void *user);

/*
 * moas_context_kv_bytes_used() - bytes of keys and values the cache holds now.
 * moas_context_kv_bytes_reserved() - bytes allocated for keys and values at capacity.
 *
 * `layer` selects one layer, or -1 for the sum over all layers. Used bytes count what
 * the stored tokens occupy: their KV heads times head_dim times two (K and V) times the
 * element size, plus, in routed mode, 5 bytes of bookkeeping per token and layer (where
 * its heads start, which scheme it used). Reserved bytes are what the context
 * allocated for n_ctx tokens: in routed mode room for the most expensive scheme at
 * every position. docs/KV_CACHE.md gives the formulas.
 *
 * Returns: the byte count; 0 for a `layer` out of range.
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API size_t moas_context_kv_bytes_used(const moas_context *ctx, int32_t layer);
MOAS_API size_t moas_context_kv_bytes_reserved(const moas_context *ctx, int32_t layer);

/* ---- Added in 1.1: what one token costs, and the threads a context uses ---------- */

/*
 * moas_context_kv_token_bytes() - bytes of the KV cache one token occupies, over all
 *                                 layers, as this context stores it.
 * METHOD: moas_context
 *
 * `scheme` -1: mixture mode's storage, every scheme's K/V (a pooled model: one mix of
 * all n_head heads); a scheme s in [0, n_scheme): routed mode's storage of a token
 * routed to s in every layer, its 5 bytes of bookkeeping per layer included. The
 * element size is the context's kv_type. This is the figure the context itself uses
 * for its accounting and budget, so n tokens decoded in mixture mode use exactly n
 * times moas_context_kv_token_bytes(ctx, -1) (moas_context_kv_bytes_used()). A tool
 * that wants the figure for a model creates a context with n_ctx 1.
 *
 * Returns: the byte count; 0 for a NULL `ctx` or a `scheme` outside [-1, n_scheme).
 * Thread safety: one thread per context.   Allocates: no.
 * Since: 1.1.
 */
MOAS_API uint64_t moas_context_kv_token_bytes(const moas_context *ctx, int32_t scheme);

/*
 * moas_context_n_threads() - threads a decoding call of this context uses.
 *
 * params->n_threads as given, or for 0 the number it resolved to at creation (the
 * CPUs in the creating thread's affinity mask on Linux, which is the process's unless
 * that thread changed its own; else the CPUs online), on Linux no more than the CPU
 * quota of the process's control group and its ancestors, rounded up (a container's
 * CPU limit: cgroup v2's cpu.max or v1's cpu.cfs_quota_us over cpu.cfs_period_us; a
 * quota of 1.5 CPUs gives 2 threads). A call gets fewer should the
 * system refuse to start a thread (the context then keeps those it has, and does not
 * try again), and runs on the calling thread alone while the other threads come
 * late, or, for a small call, while that was measured faster (THREADING above).
 * Changed 2026-12-06: 0 was OpenMP's default (OMP_NUM_THREADS), and a library built
 * without OpenMP used 1; the cgroup quota bounds it since 2026-12-06 too.
 *
 * Returns: the count (>= 1); 0 for a NULL `ctx`.
 * Thread safety: one thread per context.   Allocates: no.
 * Since: 1.1.
 */
MOAS_API int32_t moas_context_n_threads(const moas_context *ctx);

/* ---- end of the 1.1 additions to the context ---------------------------------- */

/* ======================================================================
 *  KV pool: many sequences in one memory, batched decode, fork, saved state
 * ======================================================================
 *
 * A pool owns the KV memory of many contexts as pages of `page_heads` K heads and as
 * many V heads. A context created with moas_context_params.pool takes pages as its
 * tokens need them (a token routed to MQA takes one head per layer, not n_head) and
 * returns them on truncate, reset and free, so memory one sequence gives back serves
 * another. A context without a pool has a private one sized for its n_ctx tokens and
 * behaves as it always did. docs/KV_CACHE.md describes pages, fork and state.
 */

typedef struct moas_pool_params {
    uint32_t size;                    /* sizeof(moas_pool_params); set by _init() */
    uint64_t capacity_bytes;          /* bytes of K/V pages, allocated at creation
                                         (rounded down to whole pages); required */
    int32_t kv_type;                  /* a moas_type: MOAS_TYPE_F32 (default), _F16, or
                                         _Q8_0 (blocks of 32 along a head: head_dim a
                                         multiple of 32) */
    int32_t page_heads;               /* head slots per page, a power of two;
                                         0 (default): 4 */
    int32_t n_threads;                /* threads of moas_pool_decode; 0: every CPU the
                                       * process may run on, within its cgroup's CPU
                                       * quota */
    int32_t kernels;                  /* a moas_kernels; default MOAS_KERNELS_AUTO */
    int32_t n_batch;                  /* rows (tokens of all sequences) per block of
                                         moas_pool_decode; 0 (default): 128 */
    moas_log_fn log;                  /* NULL (default): silent */
    void *log_user;
    const moas_allocator *allocator;  /* NULL (default): malloc/free; must outlive pool */
    float steer_below;                /* routed contexts: while the fraction of free pages
                                         is below this, new tokens are steered toward
                                         cheaper schemes, more as the pool fills
                                         (docs/KV_CACHE.md); 0 (default): never */
    int32_t commit;                   /* nonzero: write every page and the buffers of
                                         moas_pool_decode at creation, so the pool's
                                         memory is resident from the start and the
                                         process's RSS does not grow as pages and
                                         rows are first used (a server's flat footprint; an
                                         overcommitting system fails now, not at a page
                                         fault later); 0 (default): pages are touched
                                         as they are first used */
} moas_pool_params;

/*
 * moas_pool_params_init_sized() - fill `params` with the defaults (as
 *                                 moas_context_params_init_sized()).
 * moas_pool_params_init(params) - the same with the caller's sizeof (a macro).
 *
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API void moas_pool_params_init_sized(moas_pool_params *params, size_t size);
#define moas_pool_params_init(params_) moas_pool_params_init_sized((params_), sizeof *(params_))

/*
 * moas_pool_create() - make a KV pool for contexts of `model`.
 * CONSTRUCTOR: moas_pool
 *
 * Allocates capacity_bytes of pages (address space until written: the operating
 * system backs pages as they are first used, unless params->commit asks for them to be
 * written now) and the buffers of moas_pool_decode: with 2 to 8 threads and a
 * small enough model (a file of at most 16 MB, or blocks of n_batch rows that give
 * each thread a row for every 2 MB of it), one set of them per thread besides, so that
 * a decode step can give each thread a share of the sequences to run through the
 * whole model (about 1.4 MB a thread for a 4-layer 192-wide model; docs/KV_CACHE.md).
 * A page holds page_heads K and V heads of head_dim elements of kv_type. The model is
 * borrowed and must outlive the pool; contexts made in the pool keep it alive
 * (moas_pool_free()).
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `model`/`out`, capacity below one
 *          page, page_heads not a power of two in [1, 4096], unknown kv_type or
 *          kernels, a Q8_0 kv_type with head_dim not a multiple of 32, n_threads
 *          outside [0, 1024], n_batch outside [0, 65536], steer_below outside [0, 1],
 *          an allocator without alloc or free, bad params->size), MOAS_ERR_NO_MEMORY
 *          (also for pages of 2^32 - 1 heads or more, or over 2^31 - 1 pages).
 * Thread safety: safe.   Allocates: yes.
 */
MOAS_API moas_status moas_pool_create(const moas_model *model, const moas_pool_params *params,
                                      moas_pool **out);

/*
 * moas_pool_free() - release a pool.
 * DESTRUCTOR: moas_pool
 *
 * The pool handle may not be used again. Contexts still in the pool keep it alive
 * and keep working: its memory is released when the last of them is freed (free them
 * first to release it now). NULL is a no-op.
 * Thread safety: not while any call uses the pool.   Allocates: no.
 */
MOAS_API void moas_pool_free(moas_pool *pool);

/* What moas_pool_stats() reports. Set `size` to sizeof(moas_pool_info) first. */
typedef struct moas_pool_info {
    uint32_t size;
    int32_t page_heads;       /* head slots per page */
    uint64_t page_bytes;      /* bytes of one page: page_heads * head_dim * 2 * element */
    int32_t n_pages;          /* pages in the pool */
    int32_t pages_free;       /* pages no context holds */
    int32_t n_contexts;       /* contexts in the pool */
    uint64_t bytes_capacity;  /* n_pages * page_bytes */
    uint64_t bytes_held;      /* (n_pages - pages_free) * page_bytes; a page shared by
                                 forks counts once */
    uint64_t bytes_used;      /* the sum of moas_context_kv_bytes_used(ctx, -1) over the
                                 pool's contexts; shared tokens count in each holder,
                                 so with forks this can exceed bytes_held */
    uint64_t bytes_stored;    /* the K/V bytes those contexts keep in pages: bytes_used
                                 without routed mode's 5 bytes of bookkeeping per token
                                 and layer (which live beside the pages); held pages
                                 minus this is the pool's waste */
    int32_t n_threads;        /* threads of moas_pool_decode: params->n_threads, or for
                                 0 the number it resolved to at creation, as
                                 moas_context_n_threads() says (since 2026-12-06) */
} moas_pool_info;

/*
 * moas_pool_stats() - the pool's capacity and occupancy now.
 *
 * Writes the whole fields that fit in info->size bytes and sets info->size to the
 * bytes written.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL argument, info->size under 4).
 * Thread safety: safe, also while other threads decode contexts of the pool: each
 *   context counts as of its last finished call.   Allocates: no.
 */
MOAS_API moas_status moas_pool_stats(moas_pool *pool, moas_pool_info *info);

/* One context's part of a moas_pool_decode() call. */
typedef struct moas_pool_seq {
    moas_context *ctx;        /* a context of the pool, at most once per call */
    const int32_t *tokens;    /* n_tokens tokens for positions n_past, n_past + 1, ... */
    int32_t n_tokens;         /* >= 0; 1 for a generation step, more for a prompt */
    int32_t which;            /* a moas_logits: which of these tokens' logits to write */
    float *logits;            /* as moas_context_decode_batch(): [n_vocab] for
                                 MOAS_LOGITS_LAST (may be NULL), [n_tokens][n_vocab]
                                 for MOAS_LOGITS_ALL */
} moas_pool_seq;

/*
 * moas_pool_decode() - advance many contexts of one pool in one call.
 * METHOD: moas_pool
 *
 * Every context gets its tokens as if by moas_context_decode_batch(ctx, tokens,
 * n_tokens, logits, which) on its own: the same logits, cache and routing records, bit
 * for bit, whatever the other sequences in the call. What the call adds is speed: the
 * rows of all sequences (up to n_batch per block) go through each weight matrix
 * together, so a weight is read once per block instead of once per sequence, and each
 * sequence's attention reads only its own pages. All contexts must share `pool` and
 * one mode. Routed contexts with a KV budget take at most one token per call.
 *
 * Everything is checked, and every page the call may need reserved (every token at
 * the widest scheme it may take: the widest, or a forced scheme's when no route
 * callback is set, or the steering limit; docs/KV_CACHE.md), before anything runs: on
 * failure no context changes.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `pool`, `seqs` NULL with n_seqs > 0,
 *          a NULL or repeated context, one of another pool or mode, a bad token or
 *          `which` — the sequence's index is named —, more than one token for a
 *          routed context with a budget), MOAS_ERR_CONTEXT_FULL (a context's n_ctx or
 *          budget), MOAS_ERR_POOL_FULL (the message says how many pages were lacking),
 *          MOAS_ERR_BUSY (another call holds one of the contexts, THREADING above; or
 *          another moas_pool_decode() on this pool is under way), MOAS_ERR_ABORTED
 *          (the abort callback of one of its contexts stopped it: every context is
 *          as before the call, moas_abort_fn).
 * Thread safety: one call per pool at a time (a second call on the pool while one is
 *   under way is refused with MOAS_ERR_BUSY, and changes nothing), and no
 *   other call on its contexts meanwhile; contexts not in the call may be decoded by
 *   other threads.   Allocates: never.
 */
MOAS_API moas_status moas_pool_decode(moas_pool *pool, const moas_pool_seq *seqs,
                                      int32_t n_seqs);

/*
 * moas_context_fork() - a new context that continues from where `parent` is.
 * CONSTRUCTOR: moas_context
 *
 * The child has the parent's tokens, routing records, logits and settings (mode,
 * n_ctx, forced scheme, budget, route callback, log callback and allocator: what
 * their pointers reach must outlive the child too), in the parent's pool. It shares the
 * parent's full pages (copy on write: whichever later writes into a shared page copies
 * it first) and gets its own copy of the partly filled last page of each stream, so N
 * forks of a prompt hold one prompt of pages plus their own tokens. Afterwards parent
 * and child are independent: decoding one never changes the other.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL argument, a parent without a pool
 *          of the caller's), MOAS_ERR_POOL_FULL (fewer pages free than the copies of
 *          the partly filled pages; moas_last_error() says how many it lacked; nothing
 *          taken), MOAS_ERR_NO_MEMORY, MOAS_ERR_BUSY (another call holds `parent`:
 *          THREADING above).
 * Thread safety: not while another thread uses `parent`.   Allocates: yes.
 */
MOAS_API moas_status moas_context_fork(moas_context *parent, moas_context **out);

/*
 * moas_context_compact() - pool older tokens' keys and values down to a cheaper scheme.
 * METHOD: moas_context
 *
 * Routed mode, models with pooled K/V only. Every token at positions [0, n_before)
 * that stored more KV heads than `scheme` keeps, in every layer, gets its heads
 * mean-pooled down to `scheme`'s (the groups must nest: 6 -> 2 -> 1 heads do), which
 * is what routing the token to `scheme` would have stored from the same full K/V; its
 * scheme record becomes `scheme`. The stream is packed again and the pages this frees
 * go back to the pool. Later tokens are unchanged; later decodes read the pooled
 * heads. Pages shared with forks are copied first, so forks are not affected.
 * docs/KV_CACHE.md ("Compaction") gives what it costs in quality.
 *
 * Returns: MOAS_OK with *n_changed (may be NULL) the token-layer pairs pooled, or
 *          MOAS_ERR_INVALID_ARG (NULL ctx, mixture mode, a model with independent
 *          schemes, `scheme` or `n_before` out of range), MOAS_ERR_POOL_FULL (the copies
 *          of shared pages do not fit; nothing changed), MOAS_ERR_NO_MEMORY (as
 *          moas_context_decode(); nothing changed), MOAS_ERR_BUSY (another call holds the context: THREADING above).
 * Thread safety: one thread per context.   Allocates: as moas_context_decode().
 */
MOAS_API moas_status moas_context_compact(moas_context *ctx, int32_t n_before, int32_t scheme,
                                          int32_t *n_changed);

/*
 * moas_context_shift() - drop tokens from the middle of the cache and move the later
 *                        ones down, without decoding them again (RoPE models).
 * METHOD: moas_context
 *
 * Keeps positions [0, n_keep), drops [n_keep, n_keep + n_discard), and moves the tokens
 * after them down by n_discard positions: their stored keys are turned back by
 * n_discard positions (the rotation of RoPE composes) and their values, routing records
 * and heads move as they are, in every mode, on the paged cache. Decoding then goes on
 * at n_past - n_discard, as if the kept tokens had been decoded at their new positions
 * (up to rounding: a re-rotated key differs from one rotated once by float round-off;
 * docs/KV_CACHE.md gives the measured difference). For a context that fills up:
 * llama.cpp's context shift, and with n_keep > 0 StreamingLLM's attention sinks. The
 * last logits stay, unless the last token is among those dropped: then
 * moas_context_logits() returns NULL until the next decode, as after
 * moas_context_truncate(n_keep). Pages shared with forks are copied first.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL ctx, a model with learned positions,
 *          a range outside the stored tokens), MOAS_ERR_POOL_FULL (copies of shared
 *          pages do not fit; nothing changed), MOAS_ERR_NO_MEMORY (as
 *          moas_context_decode(); nothing changed), MOAS_ERR_BUSY (another call holds the context: THREADING above).
 * Thread safety: one thread per context.   Allocates: as moas_context_decode().
 */
MOAS_API moas_status moas_context_shift(moas_context *ctx, int32_t n_keep, int32_t n_discard);

/*
 * moas_context_kv_pages() - pages the context holds now (shared ones included).
 * moas_context_kv_bytes_held() - those pages' bytes.
 *
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API int32_t moas_context_kv_pages(const moas_context *ctx);
MOAS_API size_t moas_context_kv_bytes_held(const moas_context *ctx);

/*
 * moas_context_state_size() - bytes moas_context_state_save() writes now.
 * moas_context_state_save() - save the context's sequence to `buf`.
 * moas_context_state_load() - replace the context's sequence with a saved one.
 * METHOD: moas_context
 *
 * The state holds the stored tokens' keys and values (only the heads each token
 * stored: a routed sequence saves what its router chose), their routing records, the
 * position and the last logits, with a fingerprint of the model; docs/FORMAT.md
 * ("Saved state") gives the layout. Loading needs a context of the same model, mode
 * and kv_type, in any pool, with room for the tokens; afterwards decoding gives the
 * same bits as in the context that saved it. Loading checks everything before it
 * changes anything: on failure the context is as it was. It checks the structure
 * (fingerprint, sizes, scheme records), not the numbers: keys, values, gates and logits
 * load as they are. A KV budget (moas_context_set_kv_budget()) does not refuse a
 * state, as it keeps tokens stored before a lower cap: a state over the budget loads,
 * and the next decode is refused with MOAS_ERR_CONTEXT_FULL.
 *
 * Returns: save: MOAS_OK with *written set, or MOAS_ERR_INVALID_ARG (NULL `ctx` or
 *          `written`, NULL `buf` with a nonzero `size`), MOAS_ERR_BUFFER_TOO_SMALL
 *          (*written says how many bytes are needed; `buf` NULL and `size` 0 asks just
 *          that, as moas_context_state_size() does).
 *          load: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL argument), MOAS_ERR_BAD_FORMAT
 *          (not a libmoas state, or another version), MOAS_ERR_CORRUPT (truncated or
 *          inconsistent data, another model, mode or kv_type), MOAS_ERR_CONTEXT_FULL
 *          (more tokens than n_ctx), MOAS_ERR_POOL_FULL, MOAS_ERR_BUSY (another call holds the context: THREADING above).
 * Thread safety: one thread per context.   Allocates: no.
 */
MOAS_API size_t moas_context_state_size(const moas_context *ctx);
MOAS_API moas_status moas_context_state_save(const moas_context *ctx, void *buf, size_t size,
                                             size_t *written);
MOAS_API moas_status moas_context_state_load(moas_context *ctx, const void *buf, size_t size);

/* ======================================================================
 *  Tokenizer
 * ====================================================================== */

/*
 * moas_tokenize() - turn UTF-8 text into token ids, one per character.
 *
 * Reads `text_len` bytes of `text`, or up to its NUL when `text_len` is (size_t)-1.
 * Writes the number of ids the whole text needs to *n_tokens (also when that is more
 * than `n_max`; `tokens` may then be NULL to ask for the count) and, when they fit in
 * `n_max`, the ids to `tokens`; a failing call writes none of them. A character outside the vocabulary, or invalid UTF-8, is an
 * error naming the character and its byte offset; both are MOAS_ERR_UNKNOWN_CHAR here,
 * as in 1.0 (moas_tokenize_ex() tells invalid UTF-8 apart and can replace or drop
 * unknown characters).
 *
 * Returns: MOAS_OK, or MOAS_ERR_UNKNOWN_CHAR, MOAS_ERR_BUFFER_TOO_SMALL (needs more
 *          than `n_max`; *n_tokens says how many), MOAS_ERR_INVALID_ARG (NULL
 *          `model`, `text` or `n_tokens`; NULL `tokens` with n_max > 0).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_tokenize(const moas_model *model, const char *text,
                                   size_t text_len, int32_t *tokens, size_t n_max,
                                   size_t *n_tokens);

/* ---- Added in 1.1: characters outside the vocabulary, on request ---------------- */

/* What moas_tokenize_ex() does with a character outside the vocabulary. */
typedef enum moas_unknown {
    MOAS_UNKNOWN_ERROR   = 0,  /* fail with MOAS_ERR_UNKNOWN_CHAR, as moas_tokenize() */
    MOAS_UNKNOWN_REPLACE = 1,  /* write the token params->replacement in its place */
    MOAS_UNKNOWN_DROP    = 2,  /* write nothing for it */
    MOAS_UNKNOWN_COUNT
} moas_unknown;

typedef struct moas_tokenize_params {
    uint32_t size;        /* sizeof(moas_tokenize_params); set by _init() */
    int32_t unknown;      /* a moas_unknown; default MOAS_UNKNOWN_ERROR */
    int32_t replacement;  /* MOAS_UNKNOWN_REPLACE: a token id in [0, n_vocab); default -1,
                             so REPLACE needs it set */
} moas_tokenize_params;

/*
 * moas_tokenize_params_init_sized() - fill the caller's `size` bytes of `params` with
 *                                     the defaults, and set params->size to what was
 *                                     filled.
 * moas_tokenize_params_init(params) - the same with the caller's sizeof (a macro).
 *
 * As moas_model_params_init_sized(). Thread safety: safe.   Allocates: no.
 * Since: 1.1.
 */
MOAS_API void moas_tokenize_params_init_sized(moas_tokenize_params *params, size_t size);
#define moas_tokenize_params_init(params_) \
    moas_tokenize_params_init_sized((params_), sizeof *(params_))

/*
 * moas_tokenize_ex() - moas_tokenize() with a rule for characters outside the
 *                      vocabulary.
 *
 * As moas_tokenize(), except that a character outside the vocabulary is an error, is
 * replaced by the token params->replacement, or is dropped, as params->unknown says
 * (`params` NULL: an error), and that invalid UTF-8 is MOAS_ERR_INVALID_UTF8 whatever
 * the rule (its message names the byte and its offset). *n_changed, when `n_changed`
 * is not NULL, receives how many characters were replaced or dropped, also when the
 * buffer is too small. *n_tokens counts the ids written, so with DROP it is the
 * text's characters minus the dropped ones.
 *
 * Returns: MOAS_OK, or MOAS_ERR_UNKNOWN_CHAR (rule ERROR), MOAS_ERR_INVALID_UTF8,
 *          MOAS_ERR_BUFFER_TOO_SMALL (*n_tokens and *n_changed say how many),
 *          MOAS_ERR_INVALID_ARG (as moas_tokenize(); an unknown rule, a replacement
 *          outside [0, n_vocab) with rule REPLACE, bad params->size).
 * Thread safety: safe.   Allocates: no.
 * Since: 1.1.
 */
MOAS_API moas_status moas_tokenize_ex(const moas_model *model, const char *text,
                                      size_t text_len, const moas_tokenize_params *params,
                                      int32_t *tokens, size_t n_max, size_t *n_tokens,
                                      size_t *n_changed);

/* ---- end of the 1.1 tokenizer additions ----------------------------------------- */

/*
 * moas_detokenize() - turn token ids into UTF-8 text.
 *
 * Writes the text of the `n_tokens` ids and a terminating NUL into `text` (`capacity`
 * bytes), and its length without the NUL into *length, also when it does not fit.
 *
 * Returns: MOAS_OK, or MOAS_ERR_BUFFER_TOO_SMALL (then `text` holds nothing useful;
 *          *length says how much is needed), MOAS_ERR_INVALID_ARG (NULL argument, an
 *          id outside [0, n_vocab)).
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API moas_status moas_detokenize(const moas_model *model, const int32_t *tokens,
                                     size_t n_tokens, char *text, size_t capacity,
                                     size_t *length);

/*
 * moas_token_text() - the text of one token.
 *
 * A vocabulary may hold the NUL character: its text reads as empty here, and
 * moas_detokenize() gives its byte.
 *
 * Returns: a borrowed NUL-terminated UTF-8 string, or NULL for an id outside
 *          [0, n_vocab) or a NULL `model`.
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API const char *moas_token_text(const moas_model *model, int32_t token);

/* ======================================================================
 *  Sampler
 * ====================================================================== */

typedef struct moas_sampler moas_sampler;  /* opaque; one thread at a time */

/* Added in 1.1: a bias added to one token's logit before sampling. */
typedef struct moas_logit_bias {
    int32_t token;                    /* in [0, n_vocab) */
    float bias;                       /* added to the logit; -INFINITY bans the token */
} moas_logit_bias;

typedef struct moas_sampler_params {
    uint32_t size;                    /* sizeof(moas_sampler_params); set by _init() */
    float temperature;                /* 0: greedy (argmax); default 1.0 */
    int32_t top_k;                    /* keep the k most likely; 0 (default): all */
    float top_p;                      /* keep the smallest set with mass >= p; default 1.0 */
    uint64_t seed;                    /* random stream; same seed, same choices; default 0 */
    const moas_allocator *allocator;  /* NULL (default): malloc/free */
    /* ---- added in 1.1 ---- */
    float min_p;                      /* keep tokens at least min_p times as likely as the
                                         most likely; 0 (default): off */
    float repeat_penalty;             /* a token among the last repeat_last_n has its logit
                                         divided by this if positive, multiplied if not;
                                         1 (default): off */
    int32_t repeat_last_n;            /* tokens of history the penalty looks at; default 64 */
    int32_t n_logit_bias;             /* entries of logit_bias; default 0 */
    const moas_logit_bias *logit_bias; /* [n_logit_bias], copied at creation; default NULL */
    float frequency_penalty;          /* subtracted from a token's logit once for each time
                                         it is among the last repeat_last_n; default 0 */
    float presence_penalty;           /* subtracted once from the logit of every token
                                         among the last repeat_last_n; default 0 */
} moas_sampler_params;

/*
 * moas_sampler_params_init_sized() - fill the caller's `size` bytes of `params` with the
 *                                  defaults, and set params->size to what was filled.
 * moas_sampler_params_init(params) - the same with the caller's sizeof (a macro).
 *
 * Always initialise params this way before setting fields: fields added by a later
 * version then get their defaults, and a program built against an older, smaller
 * struct is never written past its end. FFI callers pass their struct's size. Nothing
 * is written when `params` is NULL or `size` cannot hold the size field.
 *
 * Thread safety: safe.   Allocates: no.
 */
MOAS_API void moas_sampler_params_init_sized(moas_sampler_params *params, size_t size);
#define moas_sampler_params_init(params_) \
    moas_sampler_params_init_sized((params_), sizeof *(params_))

/*
 * moas_sampler_create() - make a sampler for logits of `n_vocab` entries.
 * CONSTRUCTOR: moas_sampler
 *
 * The logits first get the biases of logit_bias (summed per token), then the penalties
 * of the tokens among the last repeat_last_n the sampler saw (its own choices and those
 * given to moas_sampler_accept()), each such token once: its logit is divided by
 * repeat_penalty if positive, multiplied by it if not, then has
 * count * frequency_penalty + presence_penalty subtracted, count being how often it is
 * among them (OpenAI's penalties, in llama.cpp's order; negative values favour
 * repeats). Then: greedy (the largest) when temperature is 0; otherwise
 * softmax(logits / temperature), cut to top_k, then
 * top_p, then min_p, renormalised, drawn with a generator seeded by `seed`. `params`
 * may be NULL for defaults. Stop strings are text, not logits: see
 * moas_text_find_stop().
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `out`, n_vocab < 1, temperature
 *          negative or not finite, top_k negative, top_p outside (0, 1], min_p outside
 *          [0, 1], repeat_penalty not a finite value > 0, repeat_last_n negative,
 *          n_logit_bias negative, NULL logit_bias with n_logit_bias > 0, a bias's token
 *          outside [0, n_vocab) or its value NaN or +infinity, frequency_penalty or
 *          presence_penalty not finite, bad size), MOAS_ERR_NO_MEMORY.
 * Thread safety: safe.   Allocates: yes (scratch for n_vocab entries, once, and with a
 *               penalty 4 bytes per token of repeat_last_n: a caller that takes
 *               repeat_last_n from others should bound it, e.g. by the context).
 */
MOAS_API moas_status moas_sampler_create(const moas_sampler_params *params, int32_t n_vocab,
                                         moas_sampler **out);

/*
 * moas_sampler_free() - release a sampler. NULL is a no-op.
 * DESTRUCTOR: moas_sampler
 */
MOAS_API void moas_sampler_free(moas_sampler *sampler);

/*
 * moas_sampler_sample() - choose a token from `logits` (n_vocab floats).
 * METHOD: moas_sampler
 *
 * Advances the random stream by one draw (greedy draws nothing) and remembers the
 * token for the repetition penalty. `logits` is only read. NaN logits are never
 * chosen; +infinity logits are certain: one of them is chosen, each as likely (greedy:
 * the first; top_k and top_p keep the lowest ids of equal logits, as for finite ones);
 * if every logit (biases and penalty applied) is NaN or -infinity the call fails.
 *
 * Returns: MOAS_OK with *token set, or MOAS_ERR_INVALID_ARG (NULL argument, no
 *          finite logit).
 * Thread safety: one thread per sampler.   Allocates: never.
 */
MOAS_API moas_status moas_sampler_sample(moas_sampler *sampler, const float *logits,
                                         int32_t *token);

/*
 * moas_sampler_reseed() - restart the random stream from `seed`.
 * METHOD: moas_sampler
 *
 * A NULL `sampler` does nothing (moas_last_error() says so).
 */
MOAS_API void moas_sampler_reseed(moas_sampler *sampler, uint64_t seed);

/* ---- Added in 1.1: the penalty's history, and stop strings -------------------- */

/*
 * moas_sampler_accept() - remember `token` for the repetition penalty, as if sampled.
 * METHOD: moas_sampler
 *
 * For tokens the sampler did not choose: the prompt, or a token the caller forced.
 * moas_sampler_sample() remembers its own choices. Only the last repeat_last_n
 * tokens are kept.
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `sampler`, `token` outside
 *          [0, n_vocab)).
 * Thread safety: one thread per sampler.   Allocates: never.
 * Since: 1.1.
 */
MOAS_API moas_status moas_sampler_accept(moas_sampler *sampler, int32_t token);

/*
 * moas_sampler_reset() - forget the tokens remembered for the repetition penalty.
 * METHOD: moas_sampler
 *
 * The random stream goes on (moas_sampler_reseed() restarts it). A NULL `sampler`
 * does nothing (moas_last_error() says so).
 *
 * Thread safety: one thread per sampler.   Allocates: no.
 * Since: 1.1.
 */
MOAS_API void moas_sampler_reset(moas_sampler *sampler);

/*
 * moas_text_find_stop() - where generated text meets a stop string.
 *
 * Looks in the `len` bytes of `text` for the first place where one of the `n_stops`
 * NUL-terminated `stops` occurs whole (empty strings are ignored): then *found is 1
 * and *end that offset: keep text[0, *end) and stop. Generation stops as soon as a stop
 * string has been written (as OpenAI's API and vLLM's and llama.cpp's servers stop),
 * even where the start of a longer one began before it. Otherwise *found is 0 and *end
 * is how much of the text can be shown. While `more` is 1 (more text may follow),
 * that is all of it but a tail that is the start of a stop string and may yet become
 * one, to be looked at again with the text that follows; with `more` 0 (generation is
 * over) it is all of it. Pass the text generated and not yet shown, after each token.
 * (Builds before 2026-12-06 held a whole stop string back behind the cut-off start of
 * another that began earlier: "abcd" and "c" in "abc" gave *found 0 and *end 0, where
 * they now give 1 and 2.)
 *
 * Returns: MOAS_OK, or MOAS_ERR_INVALID_ARG (NULL `end` or `found`, NULL `text` with
 *          len > 0, NULL `stops` with n_stops > 0, a NULL stop string).
 * Thread safety: safe.   Allocates: no.
 * Since: 1.1.
 */
MOAS_API moas_status moas_text_find_stop(const char *text, size_t len,
                                         const char *const *stops, size_t n_stops,
                                         int32_t more, size_t *end, int32_t *found);

/* ---- end of the 1.1 sampler additions ----------------------------------------- */

#ifdef __cplusplus
}
#endif

#endif /* MOAS_H */
