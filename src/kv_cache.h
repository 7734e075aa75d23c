/*
 * kv_cache.h - the KV cache: a pool of fixed-size pages shared by many sequences,
 * each sequence's streams of keys and values as tables of those pages, and the
 * bookkeeping of who holds which page.
 *
 * A page holds MOAS_PAGE_HEADS (or the pool's page_heads) K heads and as many V heads
 * of head_dim elements. The pool allocates all its pages as two slabs when it is
 * created (K and V), so a head anywhere in the pool has one index, page * P + slot,
 * and the attention kernels read rows by that index from the slab's base: paging
 * changes which rows attention reads, never how it reads them.
 *
 * A stream is the sequence of heads one layer (and, in mixture mode, one scheme)
 * stores, numbered from 0 in the order they were written: token j's heads are
 * [first(j), first(j) + n_kv(j)). Logical head i lives in the stream's page
 * pages[i / P], slot i % P. A token may start in one page and end in the next, so the
 * only room a stream wastes is the unwritten tail of its last page.
 *
 * Pages are reference-counted: a fork shares its parent's pages, and whoever writes
 * into a shared page first copies it (copy on write). Outside a call a stream holds
 * exactly the pages its heads need, ceil(heads / P); a call first reserves every page
 * it may need, all or nothing, and returns what it did not use.
 */
#ifndef MOAS_KV_CACHE_H
#define MOAS_KV_CACHE_H

#include "model.h"

#include <stdatomic.h>

struct moas_ops;   /* ops.h */

/* Head slots per page unless the pool's params say otherwise. docs/KV_CACHE.md
 * ("Page size") has the measurements behind 4. */
#define MOAS_PAGE_HEADS 4

/*
 * One stream of cached keys and values. Token j's heads are [first(j), first(j) +
 * n_kv(j)):
 *   uniform stream (mixture mode, one per layer and scheme): first(j) = j * n_kv;
 *   ragged stream (routed mode, one per layer): first(j) = off[j], n_kv(j) =
 *   off[j + 1] - off[j], so off[n_past] is the number of heads in use.
 */
typedef struct moas_kv_stream {
    uint32_t *off;     /* [n_ctx + 1] first head of each token; NULL for a uniform stream */
    int32_t n_kv;      /* uniform stream: heads per token; ragged: the widest scheme's */
    int32_t n_pages;   /* pages held */
    int32_t *pages;    /* [max_pages] the pool's index of each page held */
} moas_kv_stream;

/* Bookkeeping a ragged stream keeps per token: off[j] and the scheme record. */
#define MOAS_ROUTED_TOKEN_META_BYTES (sizeof(uint32_t) + sizeof(uint8_t))

static inline uint32_t moas__kv_first(const moas_kv_stream *kv, int32_t j) {
    return kv->off != NULL ? kv->off[j] : (uint32_t)j * (uint32_t)kv->n_kv;
}

static inline int32_t moas__kv_heads(const moas_kv_stream *kv, int32_t j) {
    return kv->off != NULL ? (int32_t)(kv->off[j + 1] - kv->off[j]) : kv->n_kv;
}

/* Heads a stream holds for its first n tokens. */
static inline uint32_t moas__kv_heads_at(const moas_kv_stream *kv, int32_t n) {
    return moas__kv_first(kv, n);
}

struct moas_pool {
    const moas_model *model;
    const moas_allocator *alloc;
    moas_allocator alloc_copy;
    moas_log_fn log;
    void *log_user;

    moas_type kv_type;        /* F32, F16 or Q8_0 */
    size_t head_bytes;        /* one K (or V) head: moas__kv_head_bytes() */
    int32_t page_shift;       /* page_heads = 1 << page_shift */
    int32_t page_heads;
    int32_t n_pages;          /* capacity */
    uint8_t *k, *v;           /* [n_pages * page_heads, head_dim] each, aligned */
    void *k_raw, *v_raw;      /* the allocations behind them */
    uint32_t *refs;           /* [n_pages] holders of each page; 0: free */
    int32_t *free_pages;      /* [n_pages] a stack of the free pages' indices */
    int32_t n_free;
    atomic_uint lock;         /* guards refs, free_pages, n_free and the context list:
                                 0 free, 1 held, 2 held with sleepers (kv_cache.c) */
    bool is_private;          /* made by moas_context_create for one context */
    bool freed;               /* moas_pool_free came while contexts were in it: the
                                 last one's moas_context_free releases the pool */
    float steer_below;        /* free fraction below which routed tokens are steered */

    struct moas_context *contexts;   /* every context in the pool (a list) */
    int32_t n_contexts;

    /* batched decode across sequences (moas_pool_decode); NULL for a private pool */
    struct moas_workspace *ws;
    atomic_flag busy;         /* a moas_pool_decode call is under way */
};

/* Bytes of one K or V head of head_dim elements stored as `type`: 4 or 2 bytes an
 * element, or for Q8_0 a block of 34 bytes (an f16 scale, 32 int8) per 32 elements. */
static inline size_t moas__kv_head_bytes(moas_type type, int32_t head_dim) {
    return type == MOAS_TYPE_Q8_0 ? (size_t)head_dim / 32 * 34
           : type == MOAS_TYPE_F16 ? (size_t)head_dim * 2
                                   : (size_t)head_dim * 4;
}

/* One head of head_dim elements between f32 and the cache's type: stored (F16 rounds
 * to nearest even, by the kernels' to_f16; Q8_0 takes per block of 32 the scale d =
 * max|x| / 127 and q = round(x / d), as ggml quantises) and loaded back (widened;
 * Q8_0 as d * q). */
void moas__kv_head_store(const struct moas_ops *ops, moas_type type, void *dst,
                         const float *src, int32_t head_dim);
void moas__kv_head_load(moas_type type, const void *src, float *dst, int32_t head_dim);

/* The head at index `i` of the pool's slabs, K or V. */
static inline uint8_t *moas__pool_head(const struct moas_pool *pool, uint8_t *slab, uint32_t i) {
    return slab + (size_t)i * pool->head_bytes;
}

/* The pool index of logical head `i` of a stream whose page table is `pages`, in a
 * pool of pages of 2^shift heads. */
static inline uint32_t moas__page_row(const int32_t *pages, uint32_t shift, uint32_t i) {
    return ((uint32_t)pages[i >> shift] << shift) | (i & ((1u << shift) - 1));
}

/* The pool index of a stream's logical head `i`. */
static inline uint32_t moas__kv_row(const struct moas_pool *pool, const moas_kv_stream *kv,
                                    uint32_t i) {
    return moas__page_row(kv->pages, (uint32_t)pool->page_shift, i);
}

/* Query head h of n_head reads the KV head h w / n_head of a token that stored w
 * heads. Decode finds that for every key, and random text changes w every few keys,
 * so it is taken without a division or a branch: moas__head_group(h, w,
 * moas__head_group_recip(n_head)) is (h w) ceil(2^32 / n_head) / 2^32, which equals h w
 * / n_head when (h w) e < 2^32, e < n_head the rounding of the reciprocal: so for
 * every h < n_head, w <= n_head and n_head <= MOAS_MAX_HEADS, as n_head^3 < 2^32
 * (test head_group_without_division_is_exact checks every case). */
_Static_assert((uint64_t)MOAS_MAX_HEADS * MOAS_MAX_HEADS * MOAS_MAX_HEADS < (UINT64_C(1) << 32),
               "moas__head_group needs n_head^3 < 2^32");

static inline uint64_t moas__head_group_recip(int32_t n_head) {
    return ((UINT64_C(1) << 32) + (uint64_t)n_head - 1) / (uint64_t)n_head;
}

static inline uint32_t moas__head_group(uint32_t h, uint32_t w, uint64_t recip) {
    return (uint32_t)(((uint64_t)h * w * recip) >> 32);
}

/* Bytes of K and V a prefetch asks into L1; the rest of it goes to L2. L1 holds 48 KB
 * on the Zen 5 this was measured on, and asking it for more evicts the rows being
 * computed: an MHA-sized run of 64 keys is 96 KB in f32. Against all of it into L1,
 * two builds interleaved in one process, depth 960, 4 layers of 6 heads of 32: one
 * MHA-sized sequence 1.03-1.06x, 16 of them 1.07-1.12x, 16 routed 1.03-1.07x, one
 * routed sequence unchanged; 64 sequences of the small MHA shape 1.03-1.04x. */
#define MOAS_KV_PREFETCH_L1_BYTES 32768

/* Decode asks for K/V rows ahead only when a step reads at least this many bytes of
 * K/V (every sequence of the step, every stream): below it, asking cost more than it
 * brought (likely because K/V of a few MB stay in the last-level cache from one step
 * to the next; not measured directly). On the Zen 5 above, depth 960, 4 layers of 6
 * heads of 32, f32, one thread, asking against not asking: MHA-sized sequences 0.82x (1 sequence, 5.9 MB),
 * 0.84x (2), 1.10x (4, 24 MB), 1.04x (8); routed ones (1.7 MB each) 0.94x (1), 0.95x
 * (2), 0.97x (4), 0.99x (8, 13 MB), 1.23x (16). Those were measured at d228a0d; on a
 * later machine of the same kind two MHA-sized sequences gained from asking (below). */
#define MOAS_KV_PREFETCH_MIN_BYTES ((uint64_t)16 << 20)

/* The same when every thread of the step reads the rows of two sequences or more
 * (each sequence's rows start a new stream for the hardware prefetcher, and the other
 * sequences' rows pass between one step's reading of them and the next; a reading,
 * not measured apart). Against 16 MB, in one process, one thread: 16 sequences of the
 * small shape (4 layers of 6 heads of 32, f16 K/V, depth 192, 9-11 MB) 1.30-1.32x;
 * the long-context model at depth 896, 2 MHA-sized sequences (12 MB) 1.12-1.13x, 8
 * routed ones (12 MB) 1.13x (1.09x at two threads). Asking from 2 MB lost at 4
 * small-shape sequences (2.4 MB, 0.90x) and for one sequence (MHA-sized, 5.9 MB,
 * 0.93x). docs/PERFORMANCE_HISTORY.md, "Several sequences ask for rows sooner". */
#define MOAS_KV_PREFETCH_MANY_BYTES ((uint64_t)8 << 20)

/* Ask for the cache lines of [p, p + bytes): into L1, or into L2 only. */
static inline void moas__prefetch_lines(const uint8_t *p, size_t bytes, bool to_l1) {
    for (uintptr_t a = (uintptr_t)p & ~(uintptr_t)63; a < (uintptr_t)(p + bytes); a += 64) {
        if (to_l1) {
            __builtin_prefetch((const void *)a, 0, 3);
        } else {
            __builtin_prefetch((const void *)a, 0, 2);
        }
    }
}

/* Ask the memory system for the K and V bytes of a stream's logical heads [first,
 * last), a page's run of them at a time, one request per cache line: while `asked`
 * (bytes asked before, for the same run of keys) is under MOAS_KV_PREFETCH_L1_BYTES
 * into L1, the rest into L2; returns `asked` with these bytes added. With many
 * sequences in one pool their pages interleave, so the rows a query reads next are
 * scattered lines the hardware prefetcher cannot guess; asked for a run of keys ahead,
 * they arrive while the run before is computed. */
static inline size_t moas__kv_prefetch(const struct moas_pool *pool, const moas_kv_stream *kv,
                                       uint32_t first, uint32_t last, size_t asked) {
    const uint32_t mask = (uint32_t)pool->page_heads - 1;
    for (uint32_t i = first; i < last;) {
        const uint32_t n = (mask + 1 - (i & mask)) < last - i ? mask + 1 - (i & mask) : last - i;
        const size_t at = (size_t)moas__kv_row(pool, kv, i) * pool->head_bytes;
        const size_t bytes = (size_t)n * pool->head_bytes;
        const bool to_l1 = asked < MOAS_KV_PREFETCH_L1_BYTES;
        moas__prefetch_lines(pool->k + at, bytes, to_l1);
        moas__prefetch_lines(pool->v + at, bytes, to_l1);
        asked += 2 * bytes;
        i += n;
    }
    return asked;
}

/* Make a pool of `n_pages` pages for `model`; on failure NULL with the error set. */
moas_status moas__pool_make(const moas_model *model, const moas_allocator *alloc,
                            moas_log_fn log, void *log_user, moas_type kv_type,
                            int32_t page_heads, uint64_t n_pages, struct moas_pool **out);

/* With the pool locked: the pages `kv` lacks to grow from `used` heads to `want`
 * (want >= used), counting a private copy of its last page when that page is shared
 * and about to be written; then take them (the caller has checked they are free). A
 * caller reserves for a whole call this way, all or nothing, before anything runs. */
uint32_t moas__kv_need(const struct moas_pool *pool, const moas_kv_stream *kv, uint32_t used,
                       uint32_t want);
void moas__kv_grow(struct moas_pool *pool, moas_kv_stream *kv, uint32_t used, uint32_t want);

/* With the pool locked: the shared page that growing `kv` from `used` heads to `want`
 * writes into (moas__kv_need counts its copy), or -1. */
int32_t moas__kv_write_copy(const struct moas_pool *pool, const moas_kv_stream *kv,
                            uint32_t used, uint32_t want);

/* With the pool locked: give `kv` its own copy of every shared page of page indices
 * [from, to) it holds (the caller has checked enough pages are free). */
void moas__kv_unshare(struct moas_pool *pool, moas_kv_stream *kv, uint32_t from, uint32_t to);

/* With the pool locked: drop every page `kv` holds. */
void moas__kv_drop_all(struct moas_pool *pool, moas_kv_stream *kv);

/* With the pool locked: give back the pages of `kv` beyond those `heads` heads need. */
void moas__kv_trim(struct moas_pool *pool, moas_kv_stream *kv, uint32_t heads);

/* The pages a fork of a stream of `heads` heads takes: 1 when its last page is partly
 * written (it is copied), else 0. */
uint32_t moas__kv_fork_copies(const struct moas_pool *pool, uint32_t heads);

/* With the pool locked and moas__kv_fork_copies() pages free: share every page of
 * `src` whose heads below `heads` are all written (full pages), and copy the partly
 * written last one, into `dst` (empty). */
void moas__kv_fork(struct moas_pool *pool, moas_kv_stream *dst, const moas_kv_stream *src,
                   uint32_t heads);

void moas__pool_lock(struct moas_pool *pool);
void moas__pool_unlock(struct moas_pool *pool);

#endif /* MOAS_KV_CACHE_H */
