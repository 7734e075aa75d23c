/*
 * fuzz_load.c - the input is a model file: load it from memory and, when it loads,
 * use everything the API lets a caller reach.
 *
 * Every input is loaded through a counting allocator:
 *   - a refused file gives BAD_FORMAT, CORRUPT or UNSUPPORTED, *out NULL, a message,
 *     and no live allocation;
 *   - the load is repeated with allocation number k failing (k chosen from the input's
 *     hash among those the first load made): NO_MEMORY, *out NULL, nothing leaked.
 * A file that loads is also loaded from a misaligned copy (the copying path) and must
 * describe the same tensors. Then every metadata key is read with the getter of its
 * type and with a wrong one, every array at its ends and one past them, every tensor
 * described, found by name and read to its last byte; the vocabulary goes through
 * detokenize and tokenize and must come back unchanged; a small context decodes a
 * few tokens one by one and as a batch (logits of all positions), its routes and KV
 * accounting are read, and a sampler draws from the logits. Everything is freed and
 * the allocator must balance.
 */
#include "fuzz.h"

#include <math.h>
#include <string.h>

static bool is_load_failure(moas_status st) {
    return st == MOAS_ERR_BAD_FORMAT || st == MOAS_ERR_CORRUPT || st == MOAS_ERR_UNSUPPORTED;
}

/* Bytes of a tensor of `type` with n elements in rows of ne0; 0 for other types. */
static uint64_t tensor_bytes(moas_type type, uint64_t n) {
    switch (type) {
    case MOAS_TYPE_F32:
        return 4 * n;
    case MOAS_TYPE_F16:
    case MOAS_TYPE_BF16:
        return 2 * n;
    case MOAS_TYPE_Q8_0:
        return n / 32 * 34;
    default:
        return 0;
    }
}

static bool is_int_type(moas_meta_type t) {
    return t == MOAS_META_UINT8 || t == MOAS_META_INT8 || t == MOAS_META_UINT16 ||
           t == MOAS_META_INT16 || t == MOAS_META_UINT32 || t == MOAS_META_INT32 ||
           t == MOAS_META_UINT64 || t == MOAS_META_INT64;
}

static void check_metadata(const moas_model *m) {
    const int64_t n_kv = moas_model_meta_count(m);
    FUZZ_CHECK(n_kv >= 0);
    FUZZ_CHECK(moas_model_meta_key(m, -1) == NULL);
    FUZZ_CHECK(moas_model_meta_key(m, n_kv) == NULL);

    for (int64_t i = 0; i < n_kv; i++) {
        const char *key = moas_model_meta_key(m, i);
        moas_meta_type type, elem;
        int64_t iv;
        double fv;
        int32_t bv;
        const char *sv;
        size_t len;
        uint64_t n;

        FUZZ_CHECK(key != NULL && key[0] != '\0');
        FUZZ_CHECK(moas_model_meta_type(m, key, &type) == MOAS_OK);
        FUZZ_CHECK((unsigned)type < MOAS_META_TYPE_COUNT);

        const moas_status si = moas_model_meta_int(m, key, &iv);
        const moas_status sf = moas_model_meta_float(m, key, &fv);
        const moas_status sb = moas_model_meta_bool(m, key, &bv);
        const moas_status ss = moas_model_meta_string(m, key, &sv, &len);
        const moas_status sa = moas_model_meta_array(m, key, &elem, &n);

        /* exactly the getter of the stored type succeeds; the others say WRONG_TYPE
         * (meta_int reads the eight integer types, not BOOL; a uint64 above INT64_MAX
         * does not fit) */
        if (is_int_type(type)) {
            FUZZ_CHECK(si == MOAS_OK || (si == MOAS_ERR_WRONG_TYPE && type == MOAS_META_UINT64));
        } else {
            FUZZ_CHECK(si == MOAS_ERR_WRONG_TYPE);
        }
        FUZZ_CHECK(sf == (type == MOAS_META_FLOAT32 || type == MOAS_META_FLOAT64
                              ? MOAS_OK : MOAS_ERR_WRONG_TYPE));
        FUZZ_CHECK(sb == (type == MOAS_META_BOOL ? MOAS_OK : MOAS_ERR_WRONG_TYPE));
        FUZZ_CHECK(ss == (type == MOAS_META_STRING ? MOAS_OK : MOAS_ERR_WRONG_TYPE));
        FUZZ_CHECK(sa == (type == MOAS_META_ARRAY ? MOAS_OK : MOAS_ERR_WRONG_TYPE));
        if (type == MOAS_META_BOOL) {
            FUZZ_CHECK(bv == 0 || bv == 1);
        }
        if (type == MOAS_META_STRING) {
            FUZZ_CHECK(sv != NULL && sv[len] == '\0' && strlen(sv) <= len);
        }
        if (type != MOAS_META_ARRAY) {
            continue;
        }
        FUZZ_CHECK((unsigned)elem < MOAS_META_TYPE_COUNT && elem != MOAS_META_ARRAY);
        const uint64_t probe[4] = {0, n / 2, n - 1, n};
        for (int k = 0; k < 4; k++) {
            const uint64_t at = probe[k];
            const bool inside = at < n;
            const moas_status ai = moas_model_meta_array_int(m, key, at, &iv);
            const moas_status af = moas_model_meta_array_float(m, key, at, &fv);
            const moas_status as = moas_model_meta_array_string(m, key, at, &sv, &len);
            if (!inside) {
                /* the index is checked before the element type */
                FUZZ_CHECK(ai == MOAS_ERR_INVALID_ARG && af == MOAS_ERR_INVALID_ARG &&
                           as == MOAS_ERR_INVALID_ARG);
            } else if (elem == MOAS_META_STRING) {
                FUZZ_CHECK(ai == MOAS_ERR_WRONG_TYPE && af == MOAS_ERR_WRONG_TYPE);
                FUZZ_CHECK(as == MOAS_OK);
                FUZZ_CHECK(sv != NULL && sv[len] == '\0' && strlen(sv) <= len);
            } else if (elem == MOAS_META_FLOAT32 || elem == MOAS_META_FLOAT64) {
                FUZZ_CHECK(ai == MOAS_ERR_WRONG_TYPE && as == MOAS_ERR_WRONG_TYPE);
                FUZZ_CHECK(af == MOAS_OK);
            } else if (is_int_type(elem)) {
                FUZZ_CHECK(af == MOAS_ERR_WRONG_TYPE && as == MOAS_ERR_WRONG_TYPE);
                FUZZ_CHECK(ai == MOAS_OK || (ai == MOAS_ERR_WRONG_TYPE && elem == MOAS_META_UINT64));
            } else {
                /* BOOL arrays: no element getter reads them */
                FUZZ_CHECK(elem == MOAS_META_BOOL && ai == MOAS_ERR_WRONG_TYPE &&
                           af == MOAS_ERR_WRONG_TYPE && as == MOAS_ERR_WRONG_TYPE);
            }
        }
    }
    /* a key longer than any the reader accepts cannot be found */
    char long_key[300];
    moas_meta_type type;
    memset(long_key, 'k', sizeof long_key - 1);
    long_key[sizeof long_key - 1] = '\0';
    FUZZ_CHECK(moas_model_meta_type(m, long_key, &type) == MOAS_ERR_NOT_FOUND);
}

/* Every tensor: described, found by its name, its bytes inside [base, base + size)
 * when `base` is the buffer the model uses in place (NULL: a copy; only read). */
static uint64_t check_tensors(const moas_model *m, const uint8_t *base, size_t size) {
    const int64_t n = moas_model_n_tensors(m);
    moas_tensor_info t;
    uint64_t sum = 0;

    FUZZ_CHECK(n >= 0);
    t.size = sizeof t;
    FUZZ_CHECK(moas_model_tensor(m, -1, &t) == MOAS_ERR_INVALID_ARG);
    FUZZ_CHECK(moas_model_tensor(m, n, &t) == MOAS_ERR_INVALID_ARG);
    for (int64_t i = 0; i < n; i++) {
        int64_t found = -1;
        t.size = sizeof t;
        FUZZ_CHECK(moas_model_tensor(m, i, &t) == MOAS_OK);
        FUZZ_CHECK(t.name != NULL && t.name[0] != '\0');
        FUZZ_CHECK(moas_model_tensor_find(m, t.name, &found) == MOAS_OK && found == i);
        FUZZ_CHECK(t.n_dims >= 1 && t.n_dims <= 4);
        uint64_t elems = 1;
        for (int d = 0; d < 4; d++) {
            FUZZ_CHECK(t.ne[d] >= 1);
            FUZZ_CHECK(d < t.n_dims || t.ne[d] == 1);
            elems *= (uint64_t)t.ne[d];   /* the reader refused overflow */
        }
        FUZZ_CHECK(t.n_bytes == tensor_bytes(t.type, elems));
        FUZZ_CHECK(t.data != NULL || t.n_bytes == 0);
        if (base != NULL) {
            FUZZ_CHECK((const uint8_t *)t.data == base + t.offset);
            FUZZ_CHECK(t.offset <= size && t.n_bytes <= size - t.offset);
        }
        /* read every byte: a sanitizer sees any byte outside the buffer */
        const uint8_t *p = t.data;
        for (uint64_t b = 0; b < t.n_bytes; b++) {
            sum += p[b];
        }
    }
    return sum;
}

/* ids -> text -> ids over the whole vocabulary: one distinct character per token. */
static void check_vocabulary(const moas_model *m, const moas_allocator *alloc) {
    const int32_t n_vocab = moas_model_n_vocab(m);
    FUZZ_CHECK(n_vocab >= 1);
    const size_t n = (size_t)n_vocab;
    int32_t *ids = alloc->alloc(alloc->user, n * sizeof *ids);
    int32_t *back = alloc->alloc(alloc->user, n * sizeof *back);
    char *text = alloc->alloc(alloc->user, 4 * n + 1);
    size_t len = 0, n_back = 0;

    if (ids != NULL && back != NULL && text != NULL) {
        for (int32_t i = 0; i < n_vocab; i++) {
            ids[i] = i;
            FUZZ_CHECK(moas_token_text(m, i) != NULL);
        }
        FUZZ_CHECK(moas_token_text(m, n_vocab) == NULL && moas_token_text(m, -1) == NULL);
        FUZZ_CHECK(moas_detokenize(m, ids, n, text, 4 * n + 1, &len) == MOAS_OK);
        FUZZ_CHECK(len >= n && len <= 4 * n);
        FUZZ_CHECK(moas_tokenize(m, text, len, back, n, &n_back) == MOAS_OK);
        FUZZ_CHECK(n_back == n);
        FUZZ_CHECK(memcmp(ids, back, n * sizeof *ids) == 0);
    }
    alloc->free(alloc->user, ids);
    alloc->free(alloc->user, back);
    alloc->free(alloc->user, text);
}

/* A small context: decode, batch, routes, KV accounting, sampling. */
static void check_context(const moas_model *m, const moas_allocator *alloc, uint64_t h) {
    const int32_t n_vocab = moas_model_n_vocab(m), n_layer = moas_model_n_layer(m);
    const int32_t n_scheme = moas_model_n_scheme(m);
    moas_context_params cp;
    moas_context *ctx = NULL;

    moas_context_params_init(&cp);
    cp.allocator = alloc;
    cp.n_threads = 1;
    cp.kernels = (h >> 8) & 1 ? MOAS_KERNELS_REF : MOAS_KERNELS_AUTO;
    cp.kv_type = (h >> 9) & 1 ? MOAS_TYPE_F16 : MOAS_TYPE_F32;
    cp.n_ctx = moas_model_n_ctx_train(m) < 6 ? moas_model_n_ctx_train(m) : 6;
    const moas_status st = moas_context_create(m, &cp, &ctx);
    if (st == MOAS_ERR_NO_MEMORY) {
        FUZZ_CHECK(ctx == NULL);   /* a file may declare a cache this process cannot hold */
        return;
    }
    FUZZ_CHECK(st == MOAS_OK && ctx != NULL);
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    FUZZ_CHECK(n_ctx == cp.n_ctx && moas_context_n_past(ctx) == 0);
    FUZZ_CHECK(moas_context_logits(ctx) == NULL);

    float *logits = alloc->alloc(alloc->user, (size_t)n_vocab * 3 * sizeof *logits);
    int32_t *schemes = alloc->alloc(alloc->user, (size_t)n_ctx * n_layer * sizeof *schemes);
    int32_t *kv_heads = alloc->alloc(alloc->user, (size_t)n_ctx * n_layer * sizeof *kv_heads);
    float *gates =
        alloc->alloc(alloc->user, (size_t)n_ctx * n_layer * n_scheme * sizeof *gates);
    if (logits == NULL || schemes == NULL || kv_heads == NULL || gates == NULL) {
        goto done;
    }

    /* one by one: the last token, the first, one from the hash */
    const int32_t singles[3] = {n_vocab - 1, 0, (int32_t)(h % (uint64_t)n_vocab)};
    for (int i = 0; i < 3 && i < n_ctx; i++) {
        FUZZ_CHECK(moas_context_decode(ctx, singles[i], logits) == MOAS_OK);
        FUZZ_CHECK(moas_context_n_past(ctx) == i + 1);
        FUZZ_CHECK(memcmp(logits, moas_context_logits(ctx), (size_t)n_vocab * sizeof *logits) == 0);
    }
    FUZZ_CHECK(moas_context_decode(ctx, n_vocab, NULL) == MOAS_ERR_INVALID_ARG);
    FUZZ_CHECK(moas_context_decode(ctx, -1, NULL) == MOAS_ERR_INVALID_ARG);

    /* then a batch of up to three with every position's logits */
    const int32_t room = n_ctx - moas_context_n_past(ctx);
    const int32_t batch[3] = {(int32_t)((h >> 16) % (uint64_t)n_vocab), n_vocab / 2, 0};
    const int32_t n_batch = room < 3 ? room : 3;
    FUZZ_CHECK(moas_context_decode_batch(ctx, batch, n_batch, logits, MOAS_LOGITS_ALL) ==
               MOAS_OK);
    if (n_batch > 0) {
        FUZZ_CHECK(memcmp(logits + (size_t)(n_batch - 1) * n_vocab, moas_context_logits(ctx),
                          (size_t)n_vocab * sizeof *logits) == 0);
    }
    const int32_t n_past = moas_context_n_past(ctx);
    FUZZ_CHECK(n_past == (n_ctx < 3 ? n_ctx : 3) + n_batch);
    FUZZ_CHECK(moas_context_decode(ctx, 0, NULL) ==
               (n_past == n_ctx ? MOAS_ERR_CONTEXT_FULL : MOAS_OK));

    /* routes of everything stored */
    const int32_t n_stored = moas_context_n_past(ctx);
    FUZZ_CHECK(moas_context_routes(ctx, 0, n_stored, gates, schemes, kv_heads) == MOAS_OK);
    for (int32_t i = 0; i < n_stored * n_layer; i++) {
        FUZZ_CHECK(schemes[i] >= 0 && schemes[i] < n_scheme);
        FUZZ_CHECK(kv_heads[i] >= 1);
    }
    FUZZ_CHECK(moas_context_routes(ctx, 0, n_stored + 1, NULL, NULL, NULL) ==
               MOAS_ERR_INVALID_ARG);

    /* KV accounting: the layers add up, and use never exceeds the reservation */
    size_t sum = 0;
    for (int32_t l = 0; l < n_layer; l++) {
        FUZZ_CHECK(moas_context_kv_bytes_used(ctx, l) <= moas_context_kv_bytes_reserved(ctx, l));
        sum += moas_context_kv_bytes_used(ctx, l);
    }
    FUZZ_CHECK(sum == moas_context_kv_bytes_used(ctx, -1));
    FUZZ_CHECK(moas_context_kv_bytes_used(ctx, n_layer) == 0);
    FUZZ_CHECK(moas_context_kv_bytes_used(ctx, -2) == 0);

    /* a sampler on logits the file's weights produced (maybe NaN or infinite) */
    moas_sampler_params sp;
    moas_sampler *smp = NULL;
    moas_sampler_params_init(&sp);
    sp.allocator = alloc;
    sp.seed = h;
    sp.temperature = (h >> 10) & 1 ? 0.0f : 0.8f;
    sp.top_k = (int32_t)((h >> 11) % 4);
    sp.top_p = (h >> 13) & 1 ? 0.9f : 1.0f;
    if (moas_sampler_create(&sp, n_vocab, &smp) == MOAS_OK) {
        int32_t token = -1;
        const moas_status ss = moas_sampler_sample(smp, moas_context_logits(ctx), &token);
        FUZZ_CHECK(ss == MOAS_OK || ss == MOAS_ERR_INVALID_ARG);
        if (ss == MOAS_OK) {
            FUZZ_CHECK(token >= 0 && token < n_vocab);
            FUZZ_CHECK(!isnan(moas_context_logits(ctx)[token]));
        }
        moas_sampler_free(smp);
    }

    FUZZ_CHECK(moas_context_truncate(ctx, 1) == MOAS_OK && moas_context_n_past(ctx) == 1);
    moas_context_reset(ctx);
    FUZZ_CHECK(moas_context_n_past(ctx) == 0 && moas_context_kv_bytes_used(ctx, -1) == 0);
done:
    alloc->free(alloc->user, logits);
    alloc->free(alloc->user, schemes);
    alloc->free(alloc->user, kv_heads);
    alloc->free(alloc->user, gates);
    moas_context_free(ctx);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const uint8_t empty[1];
    fuzz_counting c = {0, 0, 0};
    const moas_allocator alloc = {fuzz_count_alloc, fuzz_count_free, &c};
    const uint64_t h = fuzz_hash(data, size);
    moas_model_params mp;
    moas_model *m = (moas_model *)&c;   /* any non-NULL value: must be overwritten */

    if (data == NULL) {
        data = empty;
    }
    moas_model_params_init(&mp);
    mp.allocator = &alloc;
    const moas_status st = moas_model_load_memory(data, size, &mp, &m);
    const long n_allocs = c.n_calls;
    if (st != MOAS_OK) {
        FUZZ_CHECK(is_load_failure(st));
        FUZZ_CHECK(m == NULL);
        FUZZ_CHECK(moas_last_error()[0] != '\0');
        FUZZ_CHECK(c.live == 0);
    }

    /* the same load with one allocation failing */
    if (n_allocs > 0) {
        fuzz_counting f = {0, 1 + (long)(h % (uint64_t)n_allocs), 0};
        const moas_allocator failing = {fuzz_count_alloc, fuzz_count_free, &f};
        moas_model *fm = (moas_model *)&f;
        mp.allocator = &failing;
        FUZZ_CHECK(moas_model_load_memory(data, size, &mp, &fm) == MOAS_ERR_NO_MEMORY);
        FUZZ_CHECK(fm == NULL && f.live == 0);
        mp.allocator = &alloc;
    }
    if (st != MOAS_OK) {
        return 0;
    }

    /* hyperparameters that the rest of the API relies on */
    FUZZ_CHECK(moas_model_arch(m) != NULL && moas_model_name(m) != NULL);
    const int32_t n_head = moas_model_n_head(m), n_scheme = moas_model_n_scheme(m);
    FUZZ_CHECK(moas_model_n_layer(m) >= 0 && n_head >= 1 && moas_model_n_ff(m) >= 1);
    FUZZ_CHECK(moas_model_head_dim(m) * n_head == moas_model_n_embd(m));
    FUZZ_CHECK(moas_model_n_ctx_train(m) >= 1 && n_scheme >= 1);
    for (int32_t s = 0; s < n_scheme; s++) {
        const int32_t n_kv = moas_model_scheme_n_kv(m, s);
        FUZZ_CHECK(n_kv >= 1 && n_head % n_kv == 0);
    }
    FUZZ_CHECK(moas_model_scheme_n_kv(m, n_scheme) == 0 && moas_model_scheme_n_kv(m, -1) == 0);
    FUZZ_CHECK((unsigned)moas_model_mixing(m) < MOAS_MIXING_COUNT);

    check_metadata(m);
    const uint64_t sum = check_tensors(m, data, size);
    check_vocabulary(m, &alloc);
    check_context(m, &alloc, h);

    /* the copying path: a buffer that is not 4-byte aligned */
    uint8_t *shifted = malloc(size + 1);
    if (shifted != NULL) {
        moas_model *m2 = NULL;
        memcpy(shifted + 1, data, size);
        FUZZ_CHECK(moas_model_load_memory(shifted + 1, size, &mp, &m2) == MOAS_OK);
        FUZZ_CHECK(moas_model_n_tensors(m2) == moas_model_n_tensors(m));
        FUZZ_CHECK(check_tensors(m2, NULL, 0) == sum);
        moas_model_free(m2);
        free(shifted);
    }

    moas_model_free(m);
    FUZZ_CHECK(c.live == 0);
    return 0;
}
