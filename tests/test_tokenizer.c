/* test_tokenizer.c - characters <-> ids on a real vocabulary (tests/data/tiny.txt's
 * 47 characters, among them é, ï, – and —), UTF-8 handling and the error paths. */
#include "test.h"

#include <stdio.h>

static const char *vocab_model = "tiny-moas-bias.gguf";

/* The reference vocabulary is the sorted set of characters: ids follow code points. */
TEST(tokenize_follows_sorted_vocabulary) {
    moas_model *model;
    int32_t tokens[16];
    size_t n;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_EQ(moas_model_n_vocab(model), 47);
    ASSERT_STR_EQ(moas_token_text(model, 0), "\n");
    ASSERT_STR_EQ(moas_token_text(model, 1), " ");
    ASSERT_STR_EQ(moas_token_text(model, 46), "\xe2\x80\x94");   /* — U+2014, the largest */
    ASSERT_TRUE(moas_token_text(model, 47) == NULL);
    ASSERT_TRUE(moas_token_text(model, -1) == NULL);
    ASSERT_TRUE(moas_token_text(NULL, 0) == NULL);

    /* ids computed from the sorted set of tiny.txt in Python, not from our table */
    ASSERT_OK(moas_tokenize(model, "A \xc3\xa9\xe2\x80\x94\n", (size_t)-1, tokens, 16, &n));
    ASSERT_EQ(n, 5);
    ASSERT_EQ(tokens[0], 11);   /* 'A' after "\n (),.156:;" */
    ASSERT_EQ(tokens[1], 1);
    ASSERT_EQ(tokens[2], 43);   /* é */
    ASSERT_EQ(tokens[3], 46);   /* — */
    ASSERT_EQ(tokens[4], 0);

    /* round trip through detokenize */
    char text[32];
    size_t len;
    ASSERT_OK(moas_detokenize(model, tokens, n, text, sizeof text, &len));
    ASSERT_EQ(len, 8);
    ASSERT_STR_EQ(text, "A \xc3\xa9\xe2\x80\x94\n");

    /* an explicit length stops early, also in the middle of nothing special */
    ASSERT_OK(moas_tokenize(model, "AAAA", 2, tokens, 16, &n));
    ASSERT_EQ(n, 2);
    ASSERT_OK(moas_tokenize(model, "", (size_t)-1, tokens, 16, &n));
    ASSERT_EQ(n, 0);
    moas_model_free(model);
    return TEST_PASS;
}

TEST(tokenize_names_unknown_character_and_offset) {
    moas_model *model;
    int32_t tokens[16];
    size_t n;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_STATUS(moas_tokenize(model, "And Q", (size_t)-1, tokens, 16, &n), MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "'Q'") != NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "U+0051") != NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "offset 4") != NULL);
    /* a non-ASCII character outside the vocabulary: ü at byte 2 */
    ASSERT_STATUS(moas_tokenize(model, "A \xc3\xbc", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "U+00FC") != NULL);
    ASSERT_TRUE(strstr(moas_last_error(), "offset 2") != NULL);
    /* invalid UTF-8: a lone continuation byte, a truncated sequence, an overlong '/' ,
     * a surrogate */
    ASSERT_STATUS(moas_tokenize(model, "A\x80", (size_t)-1, tokens, 16, &n), MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "invalid UTF-8 at byte offset 1") != NULL);
    ASSERT_STATUS(moas_tokenize(model, "\xc3", (size_t)-1, tokens, 16, &n), MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STATUS(moas_tokenize(model, "\xc0\xaf", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STATUS(moas_tokenize(model, "\xed\xa0\x80", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    /* a control character is named by code point only */
    ASSERT_STATUS(moas_tokenize(model, "\t", (size_t)-1, tokens, 16, &n), MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "U+0009") != NULL);
    moas_model_free(model);
    return TEST_PASS;
}

TEST(tokenize_reports_needed_size) {
    moas_model *model;
    int32_t tokens[4] = {-7, -7, -7, -7};
    size_t n = 0;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_STATUS(moas_tokenize(model, "And God", (size_t)-1, NULL, 0, &n),
                  MOAS_ERR_BUFFER_TOO_SMALL);
    ASSERT_EQ(n, 7);
    ASSERT_STATUS(moas_tokenize(model, "And God", (size_t)-1, tokens, 3, &n),
                  MOAS_ERR_BUFFER_TOO_SMALL);
    ASSERT_EQ(n, 7);
    for (int i = 0; i < 4; i++) {   /* a failed call writes nothing, not even n_max ids */
        ASSERT_EQ(tokens[i], -7);
    }
    /* nor does one that meets a character it refuses after the ids that would fit */
    ASSERT_STATUS(moas_tokenize(model, "God\x01", (size_t)-1, tokens, 4, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STATUS(moas_tokenize(model, "God\xff", (size_t)-1, tokens, 4, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    for (int i = 0; i < 4; i++) {
        ASSERT_EQ(tokens[i], -7);
    }
    ASSERT_STATUS(moas_tokenize(model, NULL, 0, tokens, 4, &n), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_tokenize(model, "A", 1, NULL, 4, &n), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_tokenize(model, "A", 1, tokens, 4, NULL), MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_tokenize(NULL, "A", 1, tokens, 4, &n), MOAS_ERR_INVALID_ARG);

    char text[4];
    size_t len = 0;
    const int32_t ids[3] = {11, 43, 46};   /* "Aé—": 1 + 2 + 3 bytes */
    ASSERT_STATUS(moas_detokenize(model, ids, 3, text, sizeof text, &len),
                  MOAS_ERR_BUFFER_TOO_SMALL);
    ASSERT_EQ(len, 6);
    const int32_t bad[2] = {0, 47};
    ASSERT_STATUS(moas_detokenize(model, bad, 2, text, sizeof text, &len), MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "47") != NULL);
    ASSERT_OK(moas_detokenize(model, ids, 0, text, 1, &len));
    ASSERT_EQ(len, 0);
    ASSERT_STR_EQ(text, "");
    moas_model_free(model);
    return TEST_PASS;
}

/* moas_tokenize_ex: unknown characters are an error by default, or replaced by a
 * chosen token, or dropped, and counted; invalid UTF-8 has a status of its own. Ids
 * from the sorted set of tiny.txt: '\n' 0, ' ' 1, 'A' 11, 'G' 13, 'd' 24, 'n' 33,
 * 'o' 34; 'Q', '\r' and '7' are not in it. */
TEST(tokenize_ex_replaces_or_drops_unknown_characters) {
    moas_model *model;
    moas_tokenize_params tp;
    int32_t tokens[16];
    size_t n = 99, changed = 99;
    const char *text = "And Q7\r\n";

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    /* the default rule, and NULL params, is moas_tokenize's error */
    moas_tokenize_params_init(&tp);
    ASSERT_EQ(tp.size, sizeof tp);
    ASSERT_EQ(tp.unknown, MOAS_UNKNOWN_ERROR);
    ASSERT_EQ(tp.replacement, -1);
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "'Q' (U+0051) at byte offset 4") != NULL);
    /* a control character is named, not printed (a raw CR sent the terminal's cursor
     * back over the message) */
    ASSERT_STATUS(moas_tokenize_ex(model, "And\r\n", (size_t)-1, NULL, tokens, 16, &n, NULL),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "control character U+000D at byte offset 3") != NULL);
    ASSERT_TRUE(strchr(moas_last_error(), '\r') == NULL);
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, NULL, tokens, 16, &n, NULL),
                  MOAS_ERR_UNKNOWN_CHAR);

    /* replace by ' ' (id 1): Q, 7 and \r */
    tp.unknown = MOAS_UNKNOWN_REPLACE;
    tp.replacement = 1;
    ASSERT_OK(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed));
    ASSERT_EQ(n, 8);
    ASSERT_EQ(changed, 3);
    const int32_t want_replace[8] = {11, 33, 24, 1, 1, 1, 1, 0};
    for (int i = 0; i < 8; i++) {
        ASSERT_EQ(tokens[i], want_replace[i]);
    }

    /* drop them: "And \n" */
    tp.unknown = MOAS_UNKNOWN_DROP;
    ASSERT_OK(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed));
    ASSERT_EQ(n, 5);
    ASSERT_EQ(changed, 3);
    const int32_t want_drop[5] = {11, 33, 24, 1, 0};
    for (int i = 0; i < 5; i++) {
        ASSERT_EQ(tokens[i], want_drop[i]);
    }
    /* the needed size counts only what is written; n_changed is set anyway */
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, &tp, NULL, 0, &n, &changed),
                  MOAS_ERR_BUFFER_TOO_SMALL);
    ASSERT_EQ(n, 5);
    ASSERT_EQ(changed, 3);
    /* a text without unknown characters changes nothing */
    ASSERT_OK(moas_tokenize_ex(model, "God", (size_t)-1, &tp, tokens, 16, &n, &changed));
    ASSERT_EQ(n, 3);
    ASSERT_EQ(changed, 0);
    ASSERT_EQ(tokens[0], 13);
    ASSERT_EQ(tokens[1], 34);
    ASSERT_EQ(tokens[2], 24);

    /* invalid UTF-8 is its own status under every rule, moas_tokenize's stays as in 1.0 */
    for (int32_t rule = 0; rule < MOAS_UNKNOWN_COUNT; rule++) {
        tp.unknown = rule;
        ASSERT_STATUS(moas_tokenize_ex(model, "A\xff", (size_t)-1, &tp, tokens, 16, &n, &changed),
                      MOAS_ERR_INVALID_UTF8);
        ASSERT_TRUE(strstr(moas_last_error(), "invalid UTF-8 at byte offset 1 (byte 0xff)") != NULL);
    }
    ASSERT_STR_EQ(moas_status_string(MOAS_ERR_INVALID_UTF8), "text is not valid UTF-8");
    ASSERT_STATUS(moas_tokenize(model, "A\xff", (size_t)-1, tokens, 16, &n), MOAS_ERR_UNKNOWN_CHAR);

    /* bad params */
    tp.unknown = MOAS_UNKNOWN_REPLACE;
    tp.replacement = -1;
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed),
                  MOAS_ERR_INVALID_ARG);
    tp.replacement = 47;
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_TRUE(strstr(moas_last_error(), "replacement token 47") != NULL);
    tp.unknown = MOAS_UNKNOWN_COUNT;
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed),
                  MOAS_ERR_INVALID_ARG);
    tp.unknown = MOAS_UNKNOWN_DROP;
    tp.size = 2;
    ASSERT_STATUS(moas_tokenize_ex(model, text, (size_t)-1, &tp, tokens, 16, &n, &changed),
                  MOAS_ERR_INVALID_ARG);
    ASSERT_STATUS(moas_tokenize_ex(NULL, text, (size_t)-1, NULL, tokens, 16, &n, &changed),
                  MOAS_ERR_INVALID_ARG);
    moas_model_free(model);
    return TEST_PASS;
}

/* UTF-8's edges (RFC 3629): under the DROP rule a valid character outside the
 * vocabulary is dropped and counted, while an overlong form, a surrogate (U+D800 to
 * U+DFFF, both ends) or a code point above U+10FFFF is MOAS_ERR_INVALID_UTF8 at the
 * offset of its first byte. An overlong 'A' is not 'A', which the vocabulary holds. */
TEST(tokenize_utf8_edges_are_exact) {
    moas_model *model;
    moas_tokenize_params tp;
    int32_t tokens[16];
    size_t n = 99, changed = 99;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    moas_tokenize_params_init(&tp);
    tp.unknown = MOAS_UNKNOWN_DROP;
    static const char *const valid[5] = {
        "A\xc2\x80",           /* U+0080, the least of two bytes */
        "A\xe0\xa0\x80",       /* U+0800, of three */
        "A\xed\x9f\xbf",       /* U+D7FF, just below the surrogates */
        "A\xee\x80\x80",       /* U+E000, just above them */
        "A\xf4\x8f\xbf\xbf",   /* U+10FFFF, the last code point */
    };
    for (int i = 0; i < 5; i++) {
        ASSERT_OK(moas_tokenize_ex(model, valid[i], (size_t)-1, &tp, tokens, 16, &n, &changed));
        ASSERT_EQ(n, 1);
        ASSERT_EQ(tokens[0], 11);
        ASSERT_EQ(changed, 1);
    }
    static const struct {
        const char *text;
        unsigned byte;
    } invalid[6] = {
        {"A\xc1\x81", 0xc1},           /* 'A' in two bytes */
        {"A\xe0\x81\x81", 0xe0},       /* 'A' in three */
        {"A\xf0\x8f\xbf\xbf", 0xf0},   /* U+FFFF in four */
        {"A\xed\xa0\x80", 0xed},       /* U+D800 */
        {"A\xed\xbf\xbf", 0xed},       /* U+DFFF */
        {"A\xf4\x90\x80\x80", 0xf4},   /* U+110000 */
    };
    for (int i = 0; i < 6; i++) {
        char want[64];
        snprintf(want, sizeof want, "tokenize: invalid UTF-8 at byte offset 1 (byte 0x%02x)",
                 invalid[i].byte);
        ASSERT_STATUS(moas_tokenize_ex(model, invalid[i].text, (size_t)-1, &tp, tokens, 16, &n,
                                       &changed), MOAS_ERR_INVALID_UTF8);
        ASSERT_STR_EQ(moas_last_error(), want);
        ASSERT_STATUS(moas_tokenize(model, invalid[i].text, (size_t)-1, tokens, 16, &n),
                      MOAS_ERR_UNKNOWN_CHAR);
        ASSERT_STR_EQ(moas_last_error(), want);
    }
    moas_model_free(model);
    return TEST_PASS;
}

/* DEL (U+007F) is a control character like those below U+0020: named by code point,
 * never written raw into the message. */
TEST(tokenize_names_del_as_a_control_character) {
    moas_model *model;
    int32_t tokens[16];
    size_t n;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_STATUS(moas_tokenize(model, "A\x7f", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STR_EQ(moas_last_error(),
                  "tokenize: control character U+007F at byte offset 1 is not in the vocabulary");
    moas_model_free(model);
    return TEST_PASS;
}

/* So are the C1 controls (U+0080 to U+009F): their raw bytes reached the message, and
 * U+009B is CSI, which starts an escape sequence where a terminal honours C1. */
TEST(tokenize_names_c1_controls_as_control_characters) {
    moas_model *model;
    int32_t tokens[16];
    size_t n;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_STATUS(moas_tokenize(model, "A\xc2\x9b", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STR_EQ(moas_last_error(),
                  "tokenize: control character U+009B at byte offset 1 is not in the vocabulary");
    ASSERT_STATUS(moas_tokenize(model, "\xc2\x80", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "control character U+0080 at byte offset 0") != NULL);
    /* the first character after them is printed as before */
    ASSERT_STATUS(moas_tokenize(model, "\xc2\xa0", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "character '\xc2\xa0' (U+00A0)") != NULL);
    moas_model_free(model);
    return TEST_PASS;
}

/* An invisible format character is named by code point too: a BOM (U+FEFF) showed as
 * empty quotes, and a right-to-left override (U+202E) reversed the rest of the message
 * on the terminal. */
TEST(tokenize_names_format_characters) {
    moas_model *model;
    int32_t tokens[16];
    size_t n;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_STATUS(moas_tokenize(model, "\xef\xbb\xbf" "And", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STR_EQ(moas_last_error(),
                  "tokenize: format character U+FEFF at byte offset 0 is not in the vocabulary");
    ASSERT_STATUS(moas_tokenize(model, "A\xe2\x80\xae" "dnA", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_STR_EQ(moas_last_error(),
                  "tokenize: format character U+202E at byte offset 1 is not in the vocabulary");
    /* a visible character just past them is printed as before */
    ASSERT_STATUS(moas_tokenize(model, "\xe2\x80\xb0", (size_t)-1, tokens, 16, &n),
                  MOAS_ERR_UNKNOWN_CHAR);
    ASSERT_TRUE(strstr(moas_last_error(), "character '\xe2\x80\xb0' (U+2030)") != NULL);
    moas_model_free(model);
    return TEST_PASS;
}

/* moas_detokenize needs the text's bytes and a NUL: "Aé—" (6 bytes) does not fit in
 * a capacity of 6, which is refused with nothing written at or past the capacity, and
 * fits in 7. */
TEST(detokenize_needs_room_for_the_nul) {
    moas_model *model;
    const int32_t ids[3] = {11, 43, 46};
    char text[8];
    size_t len = 0;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    memset(text, '#', sizeof text);
    ASSERT_STATUS(moas_detokenize(model, ids, 3, text, 6, &len), MOAS_ERR_BUFFER_TOO_SMALL);
    ASSERT_EQ(len, 6);
    ASSERT_EQ(text[6], '#');
    ASSERT_STR_EQ(moas_last_error(),
                  "detokenize: the text needs 6 bytes and a NUL, the buffer holds 6");
    ASSERT_OK(moas_detokenize(model, ids, 3, text, 7, &len));
    ASSERT_EQ(len, 6);
    ASSERT_STR_EQ(text, "A\xc3\xa9\xe2\x80\x94");
    ASSERT_EQ(text[7], '#');
    moas_model_free(model);
    return TEST_PASS;
}

/* A buffer of exactly the tokens the text needs is enough, for both calls (only a
 * smaller one is MOAS_ERR_BUFFER_TOO_SMALL); nothing is written past it. */
TEST(tokenize_fills_a_buffer_of_exactly_the_tokens_needed) {
    moas_model *model;
    moas_tokenize_params tp;
    int32_t tokens[4] = {-7, -7, -7, -7};
    size_t n = 0, changed = 99;

    ASSERT_OK(moas_model_load(test_data(vocab_model), NULL, &model));
    ASSERT_OK(moas_tokenize(model, "God", (size_t)-1, tokens, 3, &n));
    ASSERT_EQ(n, 3);
    ASSERT_EQ(tokens[0], 13);
    ASSERT_EQ(tokens[1], 34);
    ASSERT_EQ(tokens[2], 24);
    ASSERT_EQ(tokens[3], -7);
    moas_tokenize_params_init(&tp);
    tp.unknown = MOAS_UNKNOWN_DROP;
    tokens[0] = tokens[1] = -7;
    ASSERT_OK(moas_tokenize_ex(model, "GQo", (size_t)-1, &tp, tokens, 2, &n, &changed));
    ASSERT_EQ(n, 2);
    ASSERT_EQ(changed, 1);
    ASSERT_EQ(tokens[0], 13);
    ASSERT_EQ(tokens[1], 34);
    ASSERT_EQ(tokens[2], 24);   /* from before: not written */
    moas_model_free(model);
    return TEST_PASS;
}
