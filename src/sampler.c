/*
 * sampler.c - choosing the next token from logits: logit biases, repetition, frequency
 * and presence penalties, greedy, temperature, top-k, top-p, min-p, with a seeded
 * generator so that a seed reproduces a text exactly; and finding stop strings in
 * generated text.
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
    float min_p;
    float repeat_penalty;     /* 1: off */
    float frequency_penalty;  /* 0: off */
    float presence_penalty;   /* 0: off */
    int32_t repeat_last_n;    /* capacity of `history`; 0 when no penalty is on */
    uint64_t state;           /* xorshift64* state, never 0 */
    int32_t n_vocab;
    candidate *cand;          /* [n_vocab] scratch */
    float *bias;              /* [n_vocab] summed logit biases; NULL when there are none */
    float *adj;               /* [n_vocab] logits after biases and penalties; NULL when
                               * none can change them */
    int32_t *count;           /* [n_vocab] penalty scratch: a token's count in `history`,
                               * zero between calls */
    int32_t *history;         /* [repeat_last_n] ring of the last tokens seen */
    int32_t n_history;        /* tokens in the ring, <= repeat_last_n */
    int32_t history_next;     /* where the next token goes */
};

void moas_sampler_params_init_sized(moas_sampler_params *params, size_t size) {
    moas_sampler_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.seed = 0;
    p.min_p = 0.0f;
    p.repeat_penalty = 1.0f;
    p.repeat_last_n = 64;
    p.n_logit_bias = 0;
    p.logit_bias = NULL;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    moas__params_fill(params, size, &p, &moas__sampler_params_layout);
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
    if (params != NULL) {
        MOAS_TRY(moas__params_copy(&p, params, &moas__sampler_params_layout, "sampler_create"));
    }
    MOAS_RETURN_IF(n_vocab < 1, MOAS_ERR_INVALID_ARG, "sampler_create: n_vocab %d < 1", n_vocab);
    MOAS_RETURN_IF(!(p.temperature >= 0.0f) || isinf(p.temperature), MOAS_ERR_INVALID_ARG,
                   "sampler_create: temperature %g is not a finite value >= 0",
                   (double)p.temperature);
    MOAS_RETURN_IF(p.top_k < 0, MOAS_ERR_INVALID_ARG, "sampler_create: top_k %d < 0", p.top_k);
    MOAS_RETURN_IF(!(p.top_p > 0.0f && p.top_p <= 1.0f), MOAS_ERR_INVALID_ARG,
                   "sampler_create: top_p %g outside (0, 1]", (double)p.top_p);
    MOAS_RETURN_IF(p.allocator != NULL && (p.allocator->alloc == NULL || p.allocator->free == NULL),
                   MOAS_ERR_INVALID_ARG, "sampler_create: allocator without alloc or free");
    MOAS_RETURN_IF(!(p.min_p >= 0.0f && p.min_p <= 1.0f), MOAS_ERR_INVALID_ARG,
                   "sampler_create: min_p %g outside [0, 1]", (double)p.min_p);
    MOAS_RETURN_IF(!(p.repeat_penalty > 0.0f) || isinf(p.repeat_penalty), MOAS_ERR_INVALID_ARG,
                   "sampler_create: repeat_penalty %g is not a finite value > 0",
                   (double)p.repeat_penalty);
    MOAS_RETURN_IF(p.repeat_last_n < 0, MOAS_ERR_INVALID_ARG,
                   "sampler_create: repeat_last_n %d < 0", p.repeat_last_n);
    MOAS_RETURN_IF(p.n_logit_bias < 0 || (p.n_logit_bias > 0 && p.logit_bias == NULL),
                   MOAS_ERR_INVALID_ARG, "sampler_create: %d logit biases at %s",
                   p.n_logit_bias, p.logit_bias == NULL ? "NULL" : "a pointer");
    MOAS_RETURN_IF(!isfinite(p.frequency_penalty), MOAS_ERR_INVALID_ARG,
                   "sampler_create: frequency_penalty %g is not finite",
                   (double)p.frequency_penalty);
    MOAS_RETURN_IF(!isfinite(p.presence_penalty), MOAS_ERR_INVALID_ARG,
                   "sampler_create: presence_penalty %g is not finite",
                   (double)p.presence_penalty);
    for (int32_t i = 0; i < p.n_logit_bias; i++) {
        const moas_logit_bias *b = &p.logit_bias[i];
        MOAS_RETURN_IF(b->token < 0 || b->token >= n_vocab, MOAS_ERR_INVALID_ARG,
                       "sampler_create: logit_bias[%d] is for token %d, outside [0, %d)", i,
                       b->token, n_vocab);
        MOAS_RETURN_IF(isnan(b->bias) || b->bias == INFINITY, MOAS_ERR_INVALID_ARG,
                       "sampler_create: logit_bias[%d] (token %d) is %g; a bias is finite or "
                       "-infinity", i, b->token, (double)b->bias);
    }

    s = moas__calloc(p.allocator, 1, sizeof *s);
    MOAS_RETURN_IF(s == NULL, MOAS_ERR_NO_MEMORY, "sampler_create: no memory for the sampler");
    if (p.allocator != NULL) {
        s->alloc_copy = *p.allocator;
        s->alloc = &s->alloc_copy;
    }
    const bool penalty = (p.repeat_penalty != 1.0f || p.frequency_penalty != 0.0f ||
                          p.presence_penalty != 0.0f) && p.repeat_last_n > 0;
    s->cand = moas__calloc(s->alloc, (size_t)n_vocab, sizeof *s->cand);
    bool ok = s->cand != NULL;
    if (ok && p.n_logit_bias > 0) {
        s->bias = moas__calloc(s->alloc, (size_t)n_vocab, sizeof *s->bias);
        ok = s->bias != NULL;
    }
    if (ok && (p.n_logit_bias > 0 || penalty)) {
        s->adj = moas__calloc(s->alloc, (size_t)n_vocab, sizeof *s->adj);
        s->count = moas__calloc(s->alloc, (size_t)n_vocab, sizeof *s->count);
        ok = s->adj != NULL && s->count != NULL;
    }
    if (ok && penalty) {
        s->history = moas__calloc(s->alloc, (size_t)p.repeat_last_n, sizeof *s->history);
        ok = s->history != NULL;
    }
    if (!ok) {
        moas_sampler_free(s);
        MOAS_RETURN_IF(penalty, MOAS_ERR_NO_MEMORY, "sampler_create: no memory for the "
                       "scratch of %d candidates and the penalties' history of %d tokens",
                       n_vocab, p.repeat_last_n);
        MOAS_RETURN_IF(true, MOAS_ERR_NO_MEMORY, "sampler_create: no memory for the scratch "
                       "of %d candidates", n_vocab);
    }
    for (int32_t i = 0; i < p.n_logit_bias; i++) {
        s->bias[p.logit_bias[i].token] += p.logit_bias[i].bias;
    }
    s->temperature = p.temperature;
    s->top_k = p.top_k;
    s->top_p = p.top_p;
    s->min_p = p.min_p;
    s->repeat_penalty = p.repeat_penalty;
    s->frequency_penalty = p.frequency_penalty;
    s->presence_penalty = p.presence_penalty;
    s->repeat_last_n = penalty ? p.repeat_last_n : 0;
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
    moas__free(alloc, s->bias);
    moas__free(alloc, s->adj);
    moas__free(alloc, s->count);
    moas__free(alloc, s->history);
    moas__free(alloc, s);
}

void moas_sampler_reseed(moas_sampler *s, uint64_t seed) {
    if (s == NULL) {
        moas__set_error("sampler_reseed: sampler is NULL");
        return;
    }
    s->state = seed_state(seed);
}

/* Remember `token` for the penalties (a no-op when they are off). */
static void remember(moas_sampler *s, int32_t token) {
    if (s->repeat_last_n == 0) {
        return;
    }
    s->history[s->history_next] = token;
    s->history_next = (s->history_next + 1) % s->repeat_last_n;
    if (s->n_history < s->repeat_last_n) {
        s->n_history++;
    }
}

moas_status moas_sampler_accept(moas_sampler *s, int32_t token) {
    MOAS_RETURN_IF(s == NULL, MOAS_ERR_INVALID_ARG, "sampler_accept: sampler is NULL");
    MOAS_RETURN_IF(token < 0 || token >= s->n_vocab, MOAS_ERR_INVALID_ARG,
                   "sampler_accept: token %d outside [0, %d)", token, s->n_vocab);
    remember(s, token);
    return MOAS_OK;
}

void moas_sampler_reset(moas_sampler *s) {
    if (s == NULL) {
        moas__set_error("sampler_reset: sampler is NULL");
        return;
    }
    s->n_history = 0;
    s->history_next = 0;
}

/* The logits sampling reads: the caller's, or in s->adj the caller's plus the biases,
 * with the penalties applied once to each distinct remembered token: the repetition
 * penalty, then count * frequency_penalty + presence_penalty subtracted (llama.cpp's
 * order). Each penalty that is off is skipped, so its neutral value changes no bit. */
static const float *adjusted(moas_sampler *s, const float *logits) {
    if (s->adj == NULL) {
        return logits;
    }
    for (int32_t i = 0; i < s->n_vocab; i++) {
        s->adj[i] = s->bias != NULL ? logits[i] + s->bias[i] : logits[i];
    }
    const bool repeat = s->repeat_penalty != 1.0f;
    const bool openai = s->frequency_penalty != 0.0f || s->presence_penalty != 0.0f;
    for (int32_t j = 0; j < s->n_history; j++) {
        s->count[s->history[j]]++;
    }
    for (int32_t j = 0; j < s->n_history; j++) {
        const int32_t t = s->history[j];
        if (s->count[t] == 0) {
            continue;   /* penalised already */
        }
        if (repeat) {
            s->adj[t] = s->adj[t] > 0.0f ? s->adj[t] / s->repeat_penalty
                                         : s->adj[t] * s->repeat_penalty;
        }
        if (openai) {
            s->adj[t] -= (float)s->count[t] * s->frequency_penalty + s->presence_penalty;
        }
        s->count[t] = 0;
    }
    return s->adj;
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
    logits = adjusted(s, logits);
    for (int32_t i = 0; i < s->n_vocab; i++) {
        if (logits[i] > max) {   /* false for NaN */
            max = logits[i];
            best = i;
        }
    }
    MOAS_RETURN_IF(best < 0, MOAS_ERR_INVALID_ARG,
                   "sampler_sample: no logit is finite (all NaN or -infinity)");
    if (s->temperature == 0.0f) {
        *token = best;
        remember(s, best);
        return MOAS_OK;
    }

    /* probabilities relative to the maximum, softened by the temperature; +infinity
     * logits (two huge biases add up to one) are the limit of that: those tokens alone,
     * alike, where exp(inf - inf) would be NaN */
    const bool certain = isinf(max);
    for (int32_t i = 0; i < s->n_vocab; i++) {
        if (certain ? logits[i] == max : logits[i] > -INFINITY) {   /* skips NaN and -inf */
            s->cand[n].p = certain ? 1.0f : expf((logits[i] - max) / s->temperature);
            s->cand[n].id = i;
            n++;
        }
    }
    if ((s->top_k > 0 && s->top_k < n) || s->top_p < 1.0f || s->min_p > 0.0f) {
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
        /* probabilities are relative to the most likely (its p is exactly 1), so min-p
         * keeps p >= min_p; the first candidate always stays */
        if (s->min_p > 0.0f) {
            for (int32_t i = 1; i < n; i++) {
                if (s->cand[i].p < s->min_p) {
                    n = i;
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
    int32_t chosen = s->cand[n - 1].id;
    for (int32_t i = 0; i < n; i++) {
        cdf += s->cand[i].p;
        if (r < cdf) {
            chosen = s->cand[i].id;
            break;
        }
    }
    *token = chosen;
    remember(s, chosen);
    return MOAS_OK;
}

/* ---- stop strings -------------------------------------------------------------- */

moas_status moas_text_find_stop(const char *text, size_t len, const char *const *stops,
                                size_t n_stops, int32_t more, size_t *end, int32_t *found) {
    MOAS_RETURN_IF(end == NULL || found == NULL || (text == NULL && len > 0) ||
                   (stops == NULL && n_stops > 0), MOAS_ERR_INVALID_ARG,
                   "text_find_stop: NULL argument");
    for (size_t k = 0; k < n_stops; k++) {
        MOAS_RETURN_IF(stops[k] == NULL, MOAS_ERR_INVALID_ARG,
                       "text_find_stop: stop string %zu is NULL", k);
    }
    /* The first offset where a stop string occurs whole: generation stops as soon as
     * one has been written, as OpenAI's, vLLM's and llama.cpp's servers stop, even
     * where another stop string, cut off by the end of the text, began earlier and
     * might have completed there. Else, while more text may come, the first offset
     * where a stop string is cut off by the end of the text: the rest is held back. */
    size_t held = len;
    for (size_t at = 0; at < len; at++) {
        for (size_t k = 0; k < n_stops; k++) {
            const size_t sl = strlen(stops[k]);
            if (sl == 0) {
                continue;
            }
            const size_t avail = len - at < sl ? len - at : sl;
            if (memcmp(text + at, stops[k], avail) == 0) {
                if (avail == sl) {
                    *end = at;
                    *found = 1;
                    return MOAS_OK;
                }
                if (more && held == len) {
                    held = at;
                }
            }
        }
    }
    *end = held;
    *found = 0;
    return MOAS_OK;
}
