/*
 * sampler.c - choosing the next token from logits: greedy, temperature, top-k, top-p,
 * with a seeded generator so that a seed reproduces a text exactly.
 *
 * All scratch is allocated at creation; sampling allocates nothing. Ties in
 * probability are broken by the lower token id, so the order never depends on qsort.
 */
#include "core.h"

#include <math.h>
#include <string.h>

typedef struct {
    float p;      /* probability (unnormalised until the cut) */
    int32_t id;
} candidate;

struct moas_sampler {
    const moas_allocator *alloc;
    moas_allocator alloc_copy;
    float temperature;
    int32_t top_k;
    float top_p;
    uint64_t state;           /* xorshift64* state, never 0 */
    int32_t n_vocab;
    candidate *cand;          /* [n_vocab] scratch */
};

void moas_sampler_params_init_sized(moas_sampler_params *params, size_t size) {
    moas_sampler_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.seed = 0;
    moas__params_fill(params, size, &p, sizeof p);
}

/* splitmix64 turns any seed (0 included) into a well-mixed non-zero state. */
static uint64_t seed_state(uint64_t seed) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return z != 0 ? z : 0x2545f4914f6cdd1dull;
}

/* A uniform float in [0, 1) from xorshift64*: 24 random bits, exact in a float. */
static float next_uniform(moas_sampler *s) {
    s->state ^= s->state >> 12;
    s->state ^= s->state << 25;
    s->state ^= s->state >> 27;
    return (float)((s->state * 0x2545f4914f6cdd1dull) >> 40) * (1.0f / 16777216.0f);
}

moas_status moas_sampler_create(const moas_sampler_params *params, int32_t n_vocab,
                                moas_sampler **out) {
    moas_sampler_params p;
    moas_sampler *s;

    if (out != NULL) {
        *out = NULL;
    }
    moas_sampler_params_init(&p);
    MOAS_RETURN_IF(out == NULL, MOAS_ERR_INVALID_ARG, "sampler_create: out is NULL");
    MOAS_RETURN_IF(params != NULL && !moas__params_copy(&p, sizeof p, params),
                   MOAS_ERR_INVALID_ARG, "sampler_create: params->size is %u; this library "
                   "knows %zu bytes", params ? (unsigned)params->size : 0u, sizeof p);
    MOAS_RETURN_IF(n_vocab < 1, MOAS_ERR_INVALID_ARG, "sampler_create: n_vocab %d < 1", n_vocab);
    MOAS_RETURN_IF(!(p.temperature >= 0.0f) || isinf(p.temperature), MOAS_ERR_INVALID_ARG,
                   "sampler_create: temperature %g is not a finite value >= 0",
                   (double)p.temperature);
    MOAS_RETURN_IF(p.top_k < 0, MOAS_ERR_INVALID_ARG, "sampler_create: top_k %d < 0", p.top_k);
    MOAS_RETURN_IF(!(p.top_p > 0.0f && p.top_p <= 1.0f), MOAS_ERR_INVALID_ARG,
                   "sampler_create: top_p %g outside (0, 1]", (double)p.top_p);
    MOAS_RETURN_IF(p.allocator != NULL && (p.allocator->alloc == NULL || p.allocator->free == NULL),
                   MOAS_ERR_INVALID_ARG, "sampler_create: allocator without alloc or free");

    s = moas__calloc(p.allocator, 1, sizeof *s);
    MOAS_RETURN_IF(s == NULL, MOAS_ERR_NO_MEMORY, "sampler_create: no memory for the sampler");
    if (p.allocator != NULL) {
        s->alloc_copy = *p.allocator;
        s->alloc = &s->alloc_copy;
    }
    s->cand = moas__calloc(s->alloc, (size_t)n_vocab, sizeof *s->cand);
    if (s->cand == NULL) {
        moas_sampler_free(s);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY, "sampler_create: no memory for %d candidates",
                       n_vocab);
    }
    s->temperature = p.temperature;
    s->top_k = p.top_k;
    s->top_p = p.top_p;
    s->n_vocab = n_vocab;
    s->state = seed_state(p.seed);
    *out = s;
    return MOAS_OK;
}

void moas_sampler_free(moas_sampler *s) {
    moas_allocator alloc_copy;
    const moas_allocator *alloc;
    if (s == NULL) {
        return;
    }
    alloc_copy = s->alloc_copy;
    alloc = s->alloc != NULL ? &alloc_copy : NULL;
    moas__free(alloc, s->cand);
    moas__free(alloc, s);
}

void moas_sampler_reseed(moas_sampler *s, uint64_t seed) {
    s->state = seed_state(seed);
}

/* True when `a` ranks after `b`: less probable, or as probable with a higher id. */
static bool ranks_after(const candidate *a, const candidate *b) {
    return a->p < b->p || (a->p == b->p && a->id > b->id);
}

static void sift_down(candidate *c, int32_t root, int32_t n) {
    for (;;) {
        int32_t child = 2 * root + 1;
        if (child >= n) {
            return;
        }
        /* a min-heap by rank: the root is the candidate that ranks last */
        if (child + 1 < n && ranks_after(&c[child + 1], &c[child])) {
            child++;
        }
        if (!ranks_after(&c[child], &c[root])) {
            return;
        }
        const candidate t = c[root];
        c[root] = c[child];
        c[child] = t;
        root = child;
    }
}

/* Sort most probable first, in place. A heapsort rather than qsort(): glibc's qsort
 * may call malloc for large arrays, and sampling promises never to allocate. */
static void sort_by_rank(candidate *c, int32_t n) {
    for (int32_t i = n / 2 - 1; i >= 0; i--) {
        sift_down(c, i, n);
    }
    for (int32_t end = n - 1; end > 0; end--) {
        const candidate t = c[0];   /* the last-ranked goes to the back */
        c[0] = c[end];
        c[end] = t;
        sift_down(c, 0, end);
    }
}

moas_status moas_sampler_sample(moas_sampler *s, const float *logits, int32_t *token) {
    int32_t n = 0, best = -1;
    float max = -INFINITY, total = 0.0f;

    MOAS_RETURN_IF(s == NULL || logits == NULL || token == NULL, MOAS_ERR_INVALID_ARG,
                   "sampler_sample: NULL argument");
    for (int32_t i = 0; i < s->n_vocab; i++) {
        if (logits[i] > max) {   /* false for NaN */
            max = logits[i];
            best = i;
        }
    }
    MOAS_RETURN_IF(best < 0, MOAS_ERR_INVALID_ARG,
                   "sampler_sample: no logit is finite (all NaN or -infinity)");
    MOAS_RETURN_IF(isinf(max), MOAS_ERR_INVALID_ARG, "sampler_sample: logit %d is +infinity",
                   best);
    if (s->temperature == 0.0f) {
        *token = best;
        return MOAS_OK;
    }

    /* probabilities relative to the maximum, softened by the temperature */
    for (int32_t i = 0; i < s->n_vocab; i++) {
        if (logits[i] > -INFINITY) {   /* skips NaN and -inf */
            s->cand[n].p = expf((logits[i] - max) / s->temperature);
            s->cand[n].id = i;
            n++;
        }
    }
    if ((s->top_k > 0 && s->top_k < n) || s->top_p < 1.0f) {
        sort_by_rank(s->cand, n);
        if (s->top_k > 0 && s->top_k < n) {
            n = s->top_k;
        }
        if (s->top_p < 1.0f) {
            float mass = 0.0f, kept = 0.0f;
            for (int32_t i = 0; i < n; i++) {
                mass += s->cand[i].p;
            }
            for (int32_t i = 0; i < n; i++) {
                kept += s->cand[i].p;
                if (kept >= s->top_p * mass) {
                    n = i + 1;
                    break;
                }
            }
        }
    }
    for (int32_t i = 0; i < n; i++) {
        total += s->cand[i].p;
    }

    /* inverse CDF; the last candidate absorbs round-off */
    const float r = next_uniform(s) * total;
    float cdf = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        cdf += s->cand[i].p;
        if (r < cdf) {
            *token = s->cand[i].id;
            return MOAS_OK;
        }
    }
    *token = s->cand[n - 1].id;
    return MOAS_OK;
}
