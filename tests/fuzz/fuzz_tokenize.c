/*
 * fuzz_tokenize.c - arbitrary bytes through moas_tokenize() and back through
 * moas_detokenize(), checked against a reference tokenizer written here.
 *
 * Input: byte 0 chooses the buffer sizes (below); the rest is the text.
 *
 * The fixed model (built once) has a vocabulary chosen for UTF-8's edges, stored out
 * of code-point order so that the tokenizer's index is exercised: a NUL character,
 * the last one-byte character (U+007F), the first and last two-byte ones (U+0080,
 * U+07FF), the first three-byte one (U+0800), the neighbours of the surrogate block
 * (U+D7FF, U+E000), U+FFFD, U+FFFF, the first and last four-byte ones (U+10000,
 * U+10FFFF), an emoji, and a few letters.
 *
 * The reference decodes UTF-8 with the table of RFC 3629 section 4 (a different
 * method from the library's) and looks characters up by linear search. Then:
 *   - text the reference can tokenize gives the same ids, or BUFFER_TOO_SMALL with
 *     the needed count when n_max is short, writing nothing past n_max;
 *   - text it cannot gives UNKNOWN_CHAR naming the byte offset of the first bad
 *     character;
 *   - ids that came back turn into exactly the input bytes; a short buffer gives
 *     BUFFER_TOO_SMALL and the needed length;
 *   - the NUL-terminated form ((size_t)-1) tokenizes the text up to its first NUL;
 *   - moas_tokenize_ex replaces or drops what the reference cannot look up, counts
 *     it, and gives INVALID_UTF8 naming the offset of the first text that is not
 *     UTF-8.
 */
#include "fuzz.h"

#include "support/tiny_model.h"

#include <string.h>

#define N_VOCAB 21

static const char *const vocab[N_VOCAB] = {
    "z", "\xf4\x8f\xbf\xbf", "a", "\n", "\xc2\x80", "", "\xef\xbf\xbf", " ", "\xed\x9f\xbf",
    "\xdf\xbf", "A", "\xe0\xa0\x80", "\x7f", "\xf0\x90\x80\x80", "\xc3\xa9", "\xee\x80\x80",
    "\xe2\x80\x94", "b", "\xf0\x9f\x98\x80", "\xef\xbf\xbd", ".",
};
/* entry 5 is the NUL character: one byte, stored with an explicit length */
static const size_t vocab_len[N_VOCAB] = {1, 4, 1, 1, 2, 1, 3, 1, 3, 2, 1, 3, 1, 4, 2, 3, 3, 1, 4, 3, 1};

static const moas_model *model;
static uint32_t vocab_cp[N_VOCAB];

/* One character of s[0..n) by RFC 3629's table: its length, or 0 if not UTF-8. */
static size_t ref_decode(const uint8_t *s, size_t n, uint32_t *cp) {
    static const struct {
        uint8_t lo, hi;      /* first byte range */
        uint8_t n;           /* bytes */
        uint8_t lo2, hi2;    /* second byte range */
    } rows[] = {
        {0x00, 0x7f, 1, 0, 0},       {0xc2, 0xdf, 2, 0x80, 0xbf}, {0xe0, 0xe0, 3, 0xa0, 0xbf},
        {0xe1, 0xec, 3, 0x80, 0xbf}, {0xed, 0xed, 3, 0x80, 0x9f}, {0xee, 0xef, 3, 0x80, 0xbf},
        {0xf0, 0xf0, 4, 0x90, 0xbf}, {0xf1, 0xf3, 4, 0x80, 0xbf}, {0xf4, 0xf4, 4, 0x80, 0x8f},
    };
    if (n == 0) {
        return 0;
    }
    for (size_t r = 0; r < sizeof rows / sizeof rows[0]; r++) {
        if (s[0] < rows[r].lo || s[0] > rows[r].hi) {
            continue;
        }
        const size_t len = rows[r].n;
        if (len == 1) {
            *cp = s[0];
            return 1;
        }
        if (n < len || s[1] < rows[r].lo2 || s[1] > rows[r].hi2) {
            return 0;
        }
        uint32_t c = s[0] & (0xffu >> (len + 1));
        for (size_t i = 1; i < len; i++) {
            if (i > 1 && (s[i] < 0x80 || s[i] > 0xbf)) {
                return 0;
            }
            c = (c << 6) | (s[i] & 0x3fu);
        }
        *cp = c;
        return len;
    }
    return 0;
}

/* The reference: ids of text[0..n) into ids[] (room for n), their count, or -1 and
 * the byte offset of the first character it cannot tokenize in *bad_at. */
static long ref_tokenize(const uint8_t *text, size_t n, int32_t *ids, size_t *bad_at) {
    long count = 0;
    for (size_t at = 0; at < n;) {
        uint32_t cp;
        const size_t len = ref_decode(text + at, n - at, &cp);
        int32_t id = -1;
        for (int32_t v = 0; len > 0 && v < N_VOCAB; v++) {
            if (vocab_cp[v] == cp) {
                id = v;
            }
        }
        if (id < 0) {
            *bad_at = at;
            return -1;
        }
        ids[count++] = id;
        at += len;
    }
    return count;
}

/* The reference under moas_tokenize_ex's rules: characters outside the vocabulary
 * are replaced by `repl` (>= 0) or dropped (-1) and counted in *changed; the count of
 * ids, or -1 and the offset of the first invalid UTF-8 in *bad_at. */
static long ref_tokenize_ex(const uint8_t *text, size_t n, int32_t repl, int32_t *ids,
                            size_t *changed, size_t *bad_at) {
    long count = 0;
    *changed = 0;
    for (size_t at = 0; at < n;) {
        uint32_t cp;
        const size_t len = ref_decode(text + at, n - at, &cp);
        int32_t id = -1;
        if (len == 0) {
            *bad_at = at;
            return -1;
        }
        for (int32_t v = 0; v < N_VOCAB; v++) {
            if (vocab_cp[v] == cp) {
                id = v;
            }
        }
        at += len;
        if (id < 0) {
            ++*changed;
            if (repl < 0) {
                continue;
            }
            id = repl;
        }
        ids[count++] = id;
    }
    return count;
}

static void init(void) {
    tiny_model_config cfg;
    gguf_writer *w = gguf_writer_create();
    uint8_t *image;
    size_t size;
    moas_model *m = NULL;

    for (int32_t v = 0; v < N_VOCAB; v++) {
        FUZZ_CHECK(ref_decode((const uint8_t *)vocab[v], vocab_len[v], &vocab_cp[v]) ==
                   vocab_len[v]);
    }
    tiny_model_config_default(&cfg);
    cfg.n_layer = 1;
    cfg.n_embd = 8;
    cfg.n_head = 2;
    cfg.n_ff = 8;
    cfg.n_ctx_train = 4;
    cfg.n_scheme = 1;
    cfg.scheme_n_kv[0] = 2;
    cfg.mixing = MOAS_MIXING_SINGLE;
    cfg.vocab = vocab;
    cfg.n_vocab = N_VOCAB;
    cfg.omit_key = "tokenizer.ggml.tokens";   /* written below, with the NUL entry */
    FUZZ_CHECK(w != NULL && tiny_model_write(&cfg, 1, w));
    gguf_writer_add_array_string_n(w, "tokenizer.ggml.tokens", vocab, vocab_len, N_VOCAB);
    image = gguf_writer_finish(w, &size);
    gguf_writer_free(w);
    FUZZ_CHECK(image != NULL);
    FUZZ_CHECK(moas_model_load_memory(image, size, NULL, &m) == MOAS_OK);
    FUZZ_CHECK(moas_model_n_vocab(m) == N_VOCAB);
    model = m;   /* the image and the model live as long as the process */
}

/* "offset N " appears in the last error. */
static int names_offset(size_t at) {
    char needle[48];
    snprintf(needle, sizeof needle, "offset %zu ", at);
    return strstr(moas_last_error(), needle) != NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (model == NULL) {
        init();
    }
    if (size == 0) {
        return 0;
    }
    const uint8_t flags = data[0];
    const uint8_t *text = data + 1;
    const size_t len = size - 1;
    int32_t *want = malloc((len + 1) * sizeof *want);
    size_t bad_at = 0;
    FUZZ_CHECK(want != NULL);
    const long n_want = ref_tokenize(text, len, want, &bad_at);

    /* n_max: 0 enough for any text, 1 exactly the need, 2 small, 3 none (tokens NULL) */
    size_t n_max;
    switch (flags & 3) {
    case 0:
        n_max = len;
        break;
    case 1:
        n_max = n_want >= 0 ? (size_t)n_want : len;
        break;
    case 2:
        n_max = (size_t)(flags >> 2);
        break;
    default:
        n_max = 0;
        break;
    }
    /* exactly n_max ids: a sanitizer sees a write past them; filled with -7, which a
     * failing call must leave as it is */
    int32_t *tokens = n_max > 0 ? malloc(n_max * sizeof *tokens) : NULL;
    size_t n = (size_t)-7;
    FUZZ_CHECK(n_max == 0 || tokens != NULL);
    for (size_t i = 0; i < n_max; i++) {
        tokens[i] = -7;
    }
    fuzz_prime_error();
    const moas_status st = moas_tokenize(model, (const char *)text, len, tokens, n_max, &n);

    if (st != MOAS_OK) {   /* a failed call writes no id */
        for (size_t i = 0; i < n_max; i++) {
            FUZZ_CHECK(tokens[i] == -7);
        }
    }
    if (n_want < 0) {
        FUZZ_CHECK(st == MOAS_ERR_UNKNOWN_CHAR);
        FUZZ_CHECK(fuzz_error_replaced() && names_offset(bad_at));
    } else if ((size_t)n_want > n_max) {
        FUZZ_CHECK(st == MOAS_ERR_BUFFER_TOO_SMALL && n == (size_t)n_want);
        FUZZ_CHECK(fuzz_error_replaced());
    } else {
        FUZZ_CHECK(st == MOAS_OK && n == (size_t)n_want);
        FUZZ_CHECK(n == 0 || memcmp(tokens, want, n * sizeof *tokens) == 0);

        /* back to text: exact bytes, or BUFFER_TOO_SMALL with the needed length */
        const size_t capacity = flags & 0x10 ? len : len + 1 + (flags >> 5);
        char *out = capacity > 0 ? malloc(capacity) : NULL;
        size_t out_len = (size_t)-7;
        FUZZ_CHECK(capacity == 0 || out != NULL);
        fuzz_prime_error();
        const moas_status ds = moas_detokenize(model, tokens, n, out, capacity, &out_len);
        FUZZ_CHECK(out_len == len);
        if (capacity > len) {
            FUZZ_CHECK(ds == MOAS_OK && out[len] == '\0');
            FUZZ_CHECK(len == 0 || memcmp(out, text, len) == 0);
        } else {
            FUZZ_CHECK(ds == MOAS_ERR_BUFFER_TOO_SMALL && fuzz_error_replaced());
        }
        /* each id's own text is the right slice of the input */
        size_t at = 0;
        for (size_t i = 0; i < n; i++) {
            const char *t = moas_token_text(model, tokens[i]);
            FUZZ_CHECK(t != NULL);
            const size_t tl = vocab_len[tokens[i]];
            FUZZ_CHECK(at + tl <= len && memcmp(t, text + at, tl) == 0);
            at += tl;
        }
        FUZZ_CHECK(at == len);
        free(out);
    }

    /* the NUL-terminated form reads up to the first NUL */
    char *cstr = malloc(len + 1);
    FUZZ_CHECK(cstr != NULL);
    memcpy(cstr, text, len);
    cstr[len] = '\0';
    const size_t clen = strlen(cstr);
    const long n_cwant = ref_tokenize((const uint8_t *)cstr, clen, want, &bad_at);
    int32_t *ctokens = malloc((clen + 1) * sizeof *ctokens);
    FUZZ_CHECK(ctokens != NULL);
    const moas_status cs = moas_tokenize(model, cstr, (size_t)-1, ctokens, clen + 1, &n);
    if (n_cwant < 0) {
        FUZZ_CHECK(cs == MOAS_ERR_UNKNOWN_CHAR && names_offset(bad_at));
    } else {
        FUZZ_CHECK(cs == MOAS_OK && n == (size_t)n_cwant);
        FUZZ_CHECK(n == 0 || memcmp(ctokens, want, n * sizeof *ctokens) == 0);
    }
    free(ctokens);
    free(cstr);

    /* moas_tokenize_ex: replace (by id flags >> 3 % N_VOCAB) or drop unknown
     * characters; invalid UTF-8 is MOAS_ERR_INVALID_UTF8 naming its offset */
    {
        moas_tokenize_params tp;
        size_t changed = (size_t)-7, want_changed = 0;
        int32_t *ex = malloc((len + 1) * sizeof *ex);
        FUZZ_CHECK(ex != NULL);
        moas_tokenize_params_init(&tp);
        tp.unknown = flags & 4 ? MOAS_UNKNOWN_REPLACE : MOAS_UNKNOWN_DROP;
        tp.replacement = (int32_t)((flags >> 3) % N_VOCAB);
        const long n_ex = ref_tokenize_ex(text, len, flags & 4 ? tp.replacement : -1, want,
                                          &want_changed, &bad_at);
        fuzz_prime_error();
        const moas_status es = moas_tokenize_ex(model, (const char *)text, len, &tp, ex, len + 1,
                                                &n, &changed);
        if (n_ex < 0) {
            FUZZ_CHECK(es == MOAS_ERR_INVALID_UTF8 && fuzz_error_replaced() &&
                       names_offset(bad_at));
        } else {
            FUZZ_CHECK(es == MOAS_OK && n == (size_t)n_ex && changed == want_changed);
            FUZZ_CHECK(n == 0 || memcmp(ex, want, n * sizeof *ex) == 0);
        }
        free(ex);
    }
    free(tokens);
    free(want);
    return 0;
}
