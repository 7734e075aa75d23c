/*
 * tokenizer.c - the character tokenizer: one token per Unicode code point.
 *
 * The vocabulary is the model's `tokenizer.ggml.tokens`, checked at load (one code
 * point each, all distinct) and indexed by code point (model.c), so text -> ids is a
 * binary search per character and ids -> text a copy. A character outside the
 * vocabulary is an error, or, on request (moas_tokenize_ex), replaced or dropped.
 */
#include "model.h"

#include <string.h>

/* The token whose character is `cp`, or -1. */
static int32_t find_token(const moas_model *m, uint32_t cp) {
    int32_t lo = 0, hi = m->n_vocab - 1;
    while (lo <= hi) {
        const int32_t mid = lo + (hi - lo) / 2;
        const uint32_t mid_cp = m->vocab_cp[m->cp_order[mid]];
        if (mid_cp == cp) {
            return m->cp_order[mid];
        }
        if (mid_cp < cp) {
            lo = mid + 1;
        } else {
            hi = mid - 1;
        }
    }
    return -1;
}

/* The ids of text[0, text_len) under rule `unknown` (a moas_unknown; `replacement` for
 * REPLACE), written to `tokens` unless it is NULL; how many in *n_tokens and how many
 * characters were unknown in *n_changed. Invalid UTF-8 fails with `bad_utf8`. */
static moas_status scan(const moas_model *m, const char *text, size_t text_len,
                        int32_t unknown, int32_t replacement, moas_status bad_utf8,
                        int32_t *tokens, size_t *n_tokens, size_t *n_changed) {
    size_t n = 0, changed = 0;

    for (size_t at = 0; at < text_len;) {
        uint32_t cp;
        size_t n_bytes;
        int32_t id;

        MOAS_RETURN_IF(!moas__utf8_decode(text + at, text_len - at, &cp, &n_bytes),
                       bad_utf8, "tokenize: invalid UTF-8 at byte offset %zu (byte 0x%02x)",
                       at, (unsigned)(unsigned char)text[at]);
        id = find_token(m, cp);
        /* a control character (C0, DEL or C1) is named, not printed: a raw CR or NUL in
         * the message would garble the terminal line or end the string, and a C1 CSI
         * (U+009B) starts an escape sequence on terminals that honour it */
        MOAS_RETURN_IF(id < 0 && unknown == MOAS_UNKNOWN_ERROR &&
                       (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)),
                       MOAS_ERR_UNKNOWN_CHAR, "tokenize: control character U+%04X at byte "
                       "offset %zu is not in the vocabulary", (unsigned)cp, at);
        MOAS_RETURN_IF(id < 0 && unknown == MOAS_UNKNOWN_ERROR && moas__is_format_character(cp),
                       MOAS_ERR_UNKNOWN_CHAR, "tokenize: format character U+%04X at byte "
                       "offset %zu is not in the vocabulary", (unsigned)cp, at);
        MOAS_RETURN_IF(id < 0 && unknown == MOAS_UNKNOWN_ERROR, MOAS_ERR_UNKNOWN_CHAR,
                       "tokenize: character '%.*s' (U+%04X) at byte offset %zu is not in the "
                       "vocabulary", (int)n_bytes, text + at, (unsigned)cp, at);
        at += n_bytes;
        if (id < 0) {
            changed++;
            if (unknown == MOAS_UNKNOWN_DROP) {
                continue;
            }
            id = replacement;
        }
        if (tokens != NULL) {
            tokens[n] = id;
        }
        n++;
    }
    *n_tokens = n;
    *n_changed = changed;
    return MOAS_OK;
}

/* Text -> ids under rule `unknown`. Invalid UTF-8 fails with `bad_utf8`:
 * MOAS_ERR_UNKNOWN_CHAR for moas_tokenize(), which promised that in 1.0,
 * MOAS_ERR_INVALID_UTF8 for moas_tokenize_ex(). The text is read twice: checked and
 * counted, then written, so that a failing call (a character it refuses, a buffer too
 * small) leaves `tokens` as it was. */
static moas_status tokenize(const moas_model *m, const char *text, size_t text_len,
                            int32_t unknown, int32_t replacement, moas_status bad_utf8,
                            int32_t *tokens, size_t n_max, size_t *n_tokens,
                            size_t *n_changed) {
    size_t n, changed;

    if (text_len == (size_t)-1) {
        text_len = strlen(text);
    }
    MOAS_TRY(scan(m, text, text_len, unknown, replacement, bad_utf8, NULL, &n, &changed));
    *n_tokens = n;
    if (n_changed != NULL) {
        *n_changed = changed;
    }
    MOAS_RETURN_IF(n > n_max, MOAS_ERR_BUFFER_TOO_SMALL,
                   "tokenize: the text needs %zu tokens, the buffer holds %zu", n, n_max);
    return scan(m, text, text_len, unknown, replacement, bad_utf8, tokens, &n, &changed);
}

static moas_status check_args(const moas_model *m, const char *text, int32_t *tokens,
                              size_t n_max, size_t *n_tokens) {
    MOAS_RETURN_IF(m == NULL || text == NULL || n_tokens == NULL || (tokens == NULL && n_max > 0),
                   MOAS_ERR_INVALID_ARG, "tokenize: %s is NULL",
                   m == NULL ? "model" : text == NULL ? "text" : n_tokens == NULL ? "n_tokens"
                                                                                  : "tokens");
    return MOAS_OK;
}

moas_status moas_tokenize(const moas_model *m, const char *text, size_t text_len,
                          int32_t *tokens, size_t n_max, size_t *n_tokens) {
    MOAS_TRY(check_args(m, text, tokens, n_max, n_tokens));
    return tokenize(m, text, text_len, MOAS_UNKNOWN_ERROR, -1, MOAS_ERR_UNKNOWN_CHAR, tokens,
                    n_max, n_tokens, NULL);
}

void moas_tokenize_params_init_sized(moas_tokenize_params *params, size_t size) {
    moas_tokenize_params p;
    memset(&p, 0, sizeof p);
    p.unknown = MOAS_UNKNOWN_ERROR;
    p.replacement = -1;
    moas__params_fill(params, size, &p, &moas__tokenize_params_layout);
}

moas_status moas_tokenize_ex(const moas_model *m, const char *text, size_t text_len,
                             const moas_tokenize_params *params, int32_t *tokens, size_t n_max,
                             size_t *n_tokens, size_t *n_changed) {
    moas_tokenize_params p;

    moas_tokenize_params_init(&p);
    MOAS_TRY(check_args(m, text, tokens, n_max, n_tokens));
    if (params != NULL) {
        MOAS_TRY(moas__params_copy(&p, params, &moas__tokenize_params_layout, "tokenize"));
    }
    MOAS_RETURN_IF(p.unknown < 0 || p.unknown >= MOAS_UNKNOWN_COUNT, MOAS_ERR_INVALID_ARG,
                   "tokenize: unknown-character rule %d is not ERROR (0), REPLACE (1) or "
                   "DROP (2)", (int)p.unknown);
    MOAS_RETURN_IF(p.unknown == MOAS_UNKNOWN_REPLACE &&
                   (p.replacement < 0 || p.replacement >= m->n_vocab), MOAS_ERR_INVALID_ARG,
                   "tokenize: replacement token %d is outside the vocabulary [0, %d)",
                   p.replacement, m->n_vocab);
    return tokenize(m, text, text_len, p.unknown, p.replacement, MOAS_ERR_INVALID_UTF8, tokens,
                    n_max, n_tokens, n_changed);
}

moas_status moas_detokenize(const moas_model *m, const int32_t *tokens, size_t n_tokens,
                            char *text, size_t capacity, size_t *length) {
    size_t len = 0;

    MOAS_RETURN_IF(m == NULL || (tokens == NULL && n_tokens > 0) || length == NULL ||
                   (text == NULL && capacity > 0), MOAS_ERR_INVALID_ARG,
                   "detokenize: NULL argument");
    for (size_t i = 0; i < n_tokens; i++) {
        MOAS_RETURN_IF(tokens[i] < 0 || tokens[i] >= m->n_vocab, MOAS_ERR_INVALID_ARG,
                       "detokenize: token %d at index %zu is outside the vocabulary [0, %d)",
                       tokens[i], i, m->n_vocab);
        len += (size_t)m->vocab[tokens[i]].len;
    }
    *length = len;
    MOAS_RETURN_IF(len >= capacity, MOAS_ERR_BUFFER_TOO_SMALL,
                   "detokenize: the text needs %zu bytes and a NUL, the buffer holds %zu", len,
                   capacity);
    len = 0;
    for (size_t i = 0; i < n_tokens; i++) {
        const moas_gguf_string *t = &m->vocab[tokens[i]];
        memcpy(text + len, t->text, (size_t)t->len);
        len += (size_t)t->len;
    }
    text[len] = '\0';
    return MOAS_OK;
}

const char *moas_token_text(const moas_model *m, int32_t token) {
    if (m == NULL || token < 0 || token >= m->n_vocab) {
        return NULL;
    }
    return m->vocab[token].text;
}
