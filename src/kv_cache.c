/*
 * kv_cache.c - the pool of KV pages: creation, the free list and reference counts,
 * reservation before a call and trimming after it, sharing pages with a fork.
 *
 * Owns: which page belongs to whom. Does not own: what is written in a page
 * (forward.c writes K/V, context.c saves and loads them) nor which tokens a sequence
 * holds (context.c).
 *
 * Invariant: outside a call every stream holds exactly the pages its heads need,
 * ceil(heads / page_heads), each with a reference; a free page has refs 0 and is on
 * the free stack once.
 */
#if defined(__linux__)
#define _DEFAULT_SOURCE   /* syscall() for futex.h, beside the build's _POSIX_C_SOURCE */
#endif

#include "context.h"
#include "futex.h"

#include <math.h>
#include <sched.h>
#include <string.h>

/* The lock guards bookkeeping of at most a few thousand pages (and the copies of the
 * shared pages a call, a fork or an unshare writes into). A thread that finds it
 * taken spins briefly and yields a few times; should the holder still have it (it
 * was preempted, the machine is busy), the thread sleeps until the holder lets go,
 * where futexes exist, rather than yield in a loop for as long as that lasts. The
 * word is 0 (free), 1 (held) or 2 (held, and a thread may sleep on it: the unlock
 * wakes one). */
#define POOL_LOCK_SPINS 64
#define POOL_LOCK_YIELDS 16

static bool pool_try_lock(moas_pool *pool) {
    unsigned free_word = 0;
    return atomic_compare_exchange_strong_explicit(&pool->lock, &free_word, 1u,
                                                   memory_order_acquire, memory_order_relaxed);
}

void moas__pool_lock(moas_pool *pool) {
    for (uint32_t tries = 0; tries < POOL_LOCK_SPINS + POOL_LOCK_YIELDS; tries++) {
        if (atomic_load_explicit(&pool->lock, memory_order_relaxed) == 0 && pool_try_lock(pool)) {
            return;
        }
        if (tries < POOL_LOCK_SPINS) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
#if defined(MOAS_HAVE_FUTEX)
    /* taking the word to 2 either takes a free lock (then held as if contended: one
     * needless wake at unlock) or marks that a thread sleeps */
    while (atomic_exchange_explicit(&pool->lock, 2u, memory_order_acquire) != 0) {
        moas__futex_wait(&pool->lock, 2u);
    }
#else
    while (!pool_try_lock(pool)) {
        sched_yield();
    }
#endif
}

void moas__pool_unlock(moas_pool *pool) {
    if (atomic_exchange_explicit(&pool->lock, 0u, memory_order_release) == 2u) {
#if defined(MOAS_HAVE_FUTEX)
        moas__futex_wake(&pool->lock, 1);
#endif
    }
}

#define SLAB_ALIGNMENT 64

static void *alloc_slab(const moas_allocator *alloc, size_t bytes, void **raw) {
    size_t padded;
    if (!moas__size_add(bytes, SLAB_ALIGNMENT - 1, &padded) ||
        (*raw = moas__malloc(alloc, padded)) == NULL) {
        return NULL;
    }
    const uintptr_t p = (uintptr_t)*raw;
    return (void *)(p + (SLAB_ALIGNMENT - p % SLAB_ALIGNMENT) % SLAB_ALIGNMENT);
}

static void pool_release(moas_pool *pool) {
    const moas_allocator *alloc = pool->alloc;
    moas__free(alloc, pool->k_raw);
    moas__free(alloc, pool->v_raw);
    moas__free(alloc, pool->refs);
    moas__free(alloc, pool->free_pages);
}

moas_status moas__pool_make(const moas_model *model, const moas_allocator *alloc,
                            moas_log_fn log, void *log_user, moas_type kv_type,
                            int32_t page_heads, uint64_t n_pages, moas_pool **out) {
    moas_pool *pool;
    size_t slab_bytes;

    *out = NULL;
    pool = moas__calloc(alloc, 1, sizeof *pool);
    MOAS_RETURN_IF(pool == NULL, MOAS_ERR_NO_MEMORY, "pool: no memory for the pool");
    if (alloc != NULL) {
        pool->alloc_copy = *alloc;
        pool->alloc = &pool->alloc_copy;
    }
    pool->model = model;
    pool->log = log;
    pool->log_user = log_user;
    pool->kv_type = kv_type;
    pool->head_bytes = moas__kv_head_bytes(kv_type, model->head_dim);
    pool->page_heads = page_heads;
    while ((1 << pool->page_shift) < page_heads) {
        pool->page_shift++;
    }
    atomic_init(&pool->lock, 0u);
    atomic_flag_clear(&pool->busy);
    /* head indices are 32-bit: the slabs hold at most 2^32 - 1 heads */
    if (n_pages > (uint64_t)INT32_MAX || n_pages * (uint64_t)page_heads >= UINT32_MAX ||
        !moas__size_mul((size_t)n_pages * (size_t)page_heads, pool->head_bytes, &slab_bytes)) {
        moas__free(pool->alloc, pool);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY, "pool: %llu pages of %d heads do not fit",
                       (unsigned long long)n_pages, page_heads);
    }
    pool->n_pages = (int32_t)n_pages;
    /* the slabs first: the page bookkeeping is zeroed as it is allocated, and a pool
     * whose slabs cannot be had should not write gigabytes of it first (a 1 TB pool
     * spent 18 s and 8 GB that way before failing) */
    pool->k = alloc_slab(pool->alloc, slab_bytes, &pool->k_raw);
    pool->v = pool->k == NULL ? NULL : alloc_slab(pool->alloc, slab_bytes, &pool->v_raw);
    if (pool->v != NULL) {
        pool->refs = moas__calloc(pool->alloc, (size_t)n_pages + 1, sizeof *pool->refs);
        pool->free_pages =
            moas__calloc(pool->alloc, (size_t)n_pages + 1, sizeof *pool->free_pages);
    }
    if (pool->k == NULL || pool->v == NULL || pool->refs == NULL || pool->free_pages == NULL) {
        pool_release(pool);
        moas__free(pool->alloc, pool);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY, "pool: no memory for %llu pages (%zu bytes)",
                       (unsigned long long)n_pages, 2 * slab_bytes);
    }
    /* the stack hands out low pages first: a lightly used pool touches little memory */
    for (int32_t i = 0; i < pool->n_pages; i++) {
        pool->free_pages[i] = pool->n_pages - 1 - i;
    }
    pool->n_free = pool->n_pages;
    *out = pool;
    return MOAS_OK;
}

static int32_t take_page(moas_pool *pool) {
    const int32_t p = pool->free_pages[--pool->n_free];
    pool->refs[p] = 1;
    return p;
}

static void drop_page(moas_pool *pool, int32_t p) {
    if (--pool->refs[p] == 0) {
        pool->free_pages[pool->n_free++] = p;
    }
}

static uint32_t pages_for(const moas_pool *pool, uint32_t heads) {
    return (heads + (uint32_t)pool->page_heads - 1) >> pool->page_shift;
}

/* Whether growing from `used` heads to `want` writes into a page `kv` shares with
 * others (a call that stores nothing writes nowhere: it needs no copy). */
static bool writes_shared_page(const moas_pool *pool, const moas_kv_stream *kv, uint32_t used,
                               uint32_t want) {
    const uint32_t page = used >> pool->page_shift;
    return want > used && (used & ((uint32_t)pool->page_heads - 1)) != 0 &&
           page < (uint32_t)kv->n_pages && pool->refs[kv->pages[page]] > 1;
}

static void copy_page(moas_pool *pool, int32_t dst, int32_t src) {
    const size_t bytes = (size_t)pool->page_heads * pool->head_bytes;
    memcpy(pool->k + (size_t)dst * bytes, pool->k + (size_t)src * bytes, bytes);
    memcpy(pool->v + (size_t)dst * bytes, pool->v + (size_t)src * bytes, bytes);
}

uint32_t moas__kv_need(const moas_pool *pool, const moas_kv_stream *kv, uint32_t used,
                       uint32_t want) {
    const uint32_t have = (uint32_t)kv->n_pages, total = pages_for(pool, want);
    return (total > have ? total - have : 0) + (writes_shared_page(pool, kv, used, want) ? 1 : 0);
}

int32_t moas__kv_write_copy(const moas_pool *pool, const moas_kv_stream *kv, uint32_t used,
                            uint32_t want) {
    return writes_shared_page(pool, kv, used, want) ? kv->pages[used >> pool->page_shift] : -1;
}

void moas__kv_grow(moas_pool *pool, moas_kv_stream *kv, uint32_t used, uint32_t want) {
    if (writes_shared_page(pool, kv, used, want)) {   /* copy on write */
        const uint32_t page = used >> pool->page_shift;
        const int32_t copy = take_page(pool);
        copy_page(pool, copy, kv->pages[page]);
        drop_page(pool, kv->pages[page]);
        kv->pages[page] = copy;
    }
    for (const uint32_t total = pages_for(pool, want); (uint32_t)kv->n_pages < total;) {
        kv->pages[kv->n_pages++] = take_page(pool);
    }
}

void moas__kv_unshare(moas_pool *pool, moas_kv_stream *kv, uint32_t from, uint32_t to) {
    for (uint32_t p = from; p < to && p < (uint32_t)kv->n_pages; p++) {
        if (pool->refs[kv->pages[p]] > 1) {
            const int32_t copy = take_page(pool);
            copy_page(pool, copy, kv->pages[p]);
            drop_page(pool, kv->pages[p]);
            kv->pages[p] = copy;
        }
    }
}

void moas__kv_drop_all(moas_pool *pool, moas_kv_stream *kv) {
    while (kv->n_pages > 0) {
        drop_page(pool, kv->pages[--kv->n_pages]);
    }
}

void moas__kv_trim(moas_pool *pool, moas_kv_stream *kv, uint32_t heads) {
    const int32_t keep = (int32_t)pages_for(pool, heads);
    while (kv->n_pages > keep) {
        drop_page(pool, kv->pages[--kv->n_pages]);
    }
}

uint32_t moas__kv_fork_copies(const moas_pool *pool, uint32_t heads) {
    return (heads & ((uint32_t)pool->page_heads - 1)) != 0;
}

void moas__kv_fork(moas_pool *pool, moas_kv_stream *dst, const moas_kv_stream *src,
                   uint32_t heads) {
    const uint32_t full = heads >> pool->page_shift;
    const bool partial = moas__kv_fork_copies(pool, heads) != 0;

    for (uint32_t i = 0; i < full; i++) {
        dst->pages[i] = src->pages[i];
        pool->refs[src->pages[i]]++;
    }
    dst->n_pages = (int32_t)full;
    if (partial) {
        dst->pages[dst->n_pages] = take_page(pool);
        copy_page(pool, dst->pages[dst->n_pages], src->pages[full]);
        dst->n_pages++;
    }
}

/* ---- element types ------------------------------------------------------------- */

void moas__kv_head_store(const moas_ops *ops, moas_type type, void *dst, const float *src,
                         int32_t head_dim) {
    if (type == MOAS_TYPE_F16) {
        ops->to_f16(src, dst, head_dim);
    } else if (type == MOAS_TYPE_Q8_0) {
        ops->to_q8_0(src, dst, head_dim);
    } else {
        memcpy(dst, src, (size_t)head_dim * sizeof *src);
    }
}

void moas__kv_head_load(moas_type type, const void *src, float *dst, int32_t head_dim) {
    if (type == MOAS_TYPE_F16) {
        const uint16_t *h = src;
        for (int32_t i = 0; i < head_dim; i++) {
            dst[i] = moas__f16_to_f32(h[i]);
        }
    } else if (type == MOAS_TYPE_Q8_0) {
        const moas_block_q8_0 *b = src;
        for (int32_t i = 0; i < head_dim; i++) {
            dst[i] = moas__f16_to_f32(b[i / MOAS_QK8_0].d) * (float)b[i / MOAS_QK8_0].q[i % MOAS_QK8_0];
        }
    } else {
        memcpy(dst, src, (size_t)head_dim * sizeof *dst);
    }
}

/* ---- the public pool -------------------------------------------------------------- */

void moas_pool_params_init_sized(moas_pool_params *params, size_t size) {
    moas_pool_params p;
    memset(&p, 0, sizeof p);
    p.kv_type = MOAS_TYPE_F32;
    p.kernels = MOAS_KERNELS_AUTO;
    moas__params_fill(params, size, &p, &moas__pool_params_layout);
}

moas_status moas_pool_create(const moas_model *model, const moas_pool_params *params,
                             moas_pool **out) {
    moas_pool_params p;
    moas_status st;
    moas_pool *pool = NULL;

    if (out != NULL) {
        *out = NULL;
    }
    /* the caller's log hears of every failure, a bad size among them, when the
     * struct holds it whole (as moas_context_create) */
    moas_log_fn log = NULL;
    void *log_user = NULL;
    if (params != NULL &&
        params->size >= offsetof(moas_pool_params, log_user) + sizeof params->log_user) {
        log = params->log;
        log_user = params->log_user;
    }
    if (model == NULL || out == NULL) {
        moas__set_error("pool_create: %s is NULL", model == NULL ? "model" : "out");
        moas__log_error(log, log_user);
        return MOAS_ERR_INVALID_ARG;
    }
    moas_pool_params_init(&p);
    if (params != NULL &&
        (st = moas__params_copy(&p, params, &moas__pool_params_layout, "pool_create")) != MOAS_OK) {
        moas__log_error(log, log_user);
        return st;
    }
    const int32_t page_heads = p.page_heads == 0 ? MOAS_PAGE_HEADS : p.page_heads;
    const char *bad = NULL;
    if (p.kv_type != MOAS_TYPE_F32 && p.kv_type != MOAS_TYPE_F16 && p.kv_type != MOAS_TYPE_Q8_0) {
        bad = "kv_type is not F32 (0), F16 (1) or Q8_0 (8)";
    } else if (p.kv_type == MOAS_TYPE_Q8_0 && model->head_dim % 32 != 0) {
        bad = "a Q8_0 cache needs head_dim a multiple of 32";
    } else if (page_heads < 1 || page_heads > 4096 || (page_heads & (page_heads - 1)) != 0) {
        bad = "page_heads is not a power of two in [1, 4096]";
    } else if (p.n_threads < 0 || p.n_threads > MOAS_MAX_THREADS) {
        bad = "n_threads outside [0, 1024]";
    } else if (p.kernels < 0 || p.kernels >= MOAS_KERNELS_COUNT) {
        bad = "unknown kernels";
    } else if (p.n_batch < 0 || p.n_batch > 65536) {
        bad = "n_batch outside [0, 65536]";
    } else if (!(p.steer_below >= 0.0f && p.steer_below <= 1.0f)) {
        bad = "steer_below outside [0, 1]";
    } else if (p.allocator != NULL && (p.allocator->alloc == NULL || p.allocator->free == NULL)) {
        bad = "allocator without alloc or free";
    }
    if (bad != NULL) {
        moas__set_error("pool_create: %s", bad);
        moas__log_error(p.log, p.log_user);
        return MOAS_ERR_INVALID_ARG;
    }
    const uint64_t page_bytes =
        (uint64_t)page_heads * 2 * moas__kv_head_bytes((moas_type)p.kv_type, model->head_dim);
    const uint64_t n_pages = p.capacity_bytes / page_bytes;
    if (n_pages == 0) {
        moas__set_error("pool_create: capacity_bytes %llu holds no page of %llu bytes",
                        (unsigned long long)p.capacity_bytes, (unsigned long long)page_bytes);
        moas__log_error(p.log, p.log_user);
        return MOAS_ERR_INVALID_ARG;
    }
    if ((st = moas__pool_make(model, p.allocator, p.log, p.log_user, (moas_type)p.kv_type,
                              page_heads, n_pages, &pool)) != MOAS_OK) {
        moas__log_error(p.log, p.log_user);
        return st;
    }
    pool->steer_below = p.steer_below;
    if (p.commit) {   /* every page resident now: RSS stays flat as sequences come and go */
        const size_t slab_bytes = (size_t)pool->n_pages * (size_t)page_heads * pool->head_bytes;
        memset(pool->k, 0, slab_bytes);
        memset(pool->v, 0, slab_bytes);
    }
    const int32_t n_threads = moas__default_threads(p.n_threads);
    const int32_t n_batch = p.n_batch == 0 ? MOAS_BATCH : p.n_batch;
    if ((st = moas__workspace_make(model, pool->alloc, moas__ops_select((moas_kernels)p.kernels),
                                   n_threads, n_batch, model->n_ctx_train,
                                   n_batch < MOAS_POOL_LOGIT_ROWS ? n_batch : MOAS_POOL_LOGIT_ROWS,
                                   &pool->ws)) != MOAS_OK ||
        (st = moas__workspace_shards(pool->ws, pool->alloc)) != MOAS_OK) {
        moas__log_error(p.log, p.log_user);
        moas_pool_free(pool);
        return st;
    }
    if (p.commit) {   /* and the buffers of moas_pool_decode, which a large call reaches */
        moas__workspace_commit(pool->ws);
    }
    *out = pool;
    return MOAS_OK;
}

void moas_pool_free(moas_pool *pool) {
    if (pool == NULL) {
        return;
    }
    /* a caller that frees the pool before its contexts (a garbage collector's order)
     * finds them working, and the pool goes with the last of them */
    moas__pool_lock(pool);
    const bool in_use = pool->n_contexts > 0;
    pool->freed = true;
    moas__pool_unlock(pool);
    if (in_use) {
        return;
    }
    moas_allocator alloc_copy = pool->alloc_copy;
    const moas_allocator *alloc = pool->alloc != NULL ? &alloc_copy : NULL;
    moas__workspace_free(alloc, pool->ws);
    pool_release(pool);
    moas__free(alloc, pool);
}

moas_status moas_pool_stats(moas_pool *pool, moas_pool_info *info) {
    if (pool == NULL || info == NULL) {
        moas__set_error("pool_stats: %s is NULL", pool == NULL ? "pool" : "info");
        return MOAS_ERR_INVALID_ARG;
    }
    if (info->size < sizeof info->size) {
        moas__set_error("pool_stats: info->size %u cannot hold the size field",
                        (unsigned)info->size);
        return MOAS_ERR_INVALID_ARG;
    }
    moas_pool_info r;
    memset(&r, 0, sizeof r);
    const uint64_t page_bytes = (uint64_t)pool->page_heads * pool->head_bytes * 2;
    moas__pool_lock(pool);
    r.page_heads = pool->page_heads;
    r.page_bytes = page_bytes;
    r.n_pages = pool->n_pages;
    r.pages_free = pool->n_free;
    r.n_contexts = pool->n_contexts;
    r.bytes_capacity = (uint64_t)pool->n_pages * page_bytes;
    r.bytes_held = (uint64_t)(pool->n_pages - pool->n_free) * page_bytes;
    r.n_threads = pool->ws->n_threads;
    for (const moas_context *c = pool->contexts; c != NULL; c = c->pool_next) {
        r.bytes_used += c->published_used;   /* as of each context's last call */
        r.bytes_stored += c->published_stored;
    }
    moas__pool_unlock(pool);
    moas__params_fill(info, info->size, &r, &moas__pool_info_layout);
    return MOAS_OK;
}
