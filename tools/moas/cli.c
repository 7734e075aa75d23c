/*
 * cli.c - what the commands of the `moas` program share: errors, time, reading text
 * (from a file or stdin), tokenizing it under --unknown, loading a model, making a
 * context from the options, naming schemes.
 */
#include "cli.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int cli_line_open;

const char *cli_note_start(void) {
    struct stat out, err;
    if (!cli_line_open) {
        return "";
    }
    if (isatty(STDERR_FILENO)) {
        return "\n";
    }
    if (fstat(STDOUT_FILENO, &out) == 0 && fstat(STDERR_FILENO, &err) == 0 &&
        out.st_dev == err.st_dev && out.st_ino == err.st_ino) {
        return "\n";
    }
    return "";
}

/* `s` on `f` with its control characters (C0 but a tab, DEL, C1) written as \u00XX:
 * an error may quote a model file's text (its architecture, a key's value), and an ESC
 * sequence or a CR there would reach the terminal. */
static void put_printable(FILE *f, const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; u[i] != '\0'; i++) {
        if ((u[i] < 0x20 && u[i] != '\t') || u[i] == 0x7f) {
            fprintf(f, "\\u%04x", u[i]);
        } else if (u[i] == 0xc2 && u[i + 1] >= 0x80 && u[i + 1] <= 0x9f) {
            fprintf(f, "\\u%04x", u[++i]);
        } else {
            fputc(u[i], f);
        }
    }
}

void die(const char *fmt, ...) {
    va_list ap, again;
    fflush(stdout);
    fputs(cli_note_start(), stderr);   /* the error starts a line of its own */
    cli_line_open = 0;
    fputs("moas: error: ", stderr);
    va_start(ap, fmt);
    va_copy(again, ap);
    const int n = vsnprintf(NULL, 0, fmt, ap);
    char *message = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (message != NULL) {
        vsnprintf(message, (size_t)n + 1, fmt, again);
        put_printable(stderr, message);
        free(message);
    } else {
        vfprintf(stderr, fmt, again);
    }
    va_end(again);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* MOAS_ERR_CORRUPT's fixed sentence ("truncated or inconsistent") would blame
 * truncation for a whole file whose metadata and tensors disagree, so that status shows
 * only the exact cause, which says which it is ("... ends past the file" or "scheme 1
 * has 3 KV heads ..."). */
void check(moas_status st, const char *what) {
    if (st == MOAS_ERR_CORRUPT && moas_last_error()[0] != '\0') {
        die("%s: %s", what, moas_last_error());
    } else if (st != MOAS_OK) {
        die("%s: %s (%s)", what, moas_last_error(), moas_status_string(st));
    }
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

const char *text_name(const char *path, char *buf, size_t cap) {
    if (!strcmp(path, "-")) {
        return "stdin";
    }
    snprintf(buf, cap, "'%s'", path);
    return buf;
}

/* The longest text read_text takes (its ids take four times as much again). */
#define MAX_TEXT_BYTES (1 << 30)

char *read_text(const char *path, size_t *len) {
    const int is_stdin = !strcmp(path, "-");
    FILE *f = is_stdin ? stdin : fopen(path, "rb");
    char *buf = NULL, name[512];
    size_t cap = 0, n = 0;

    if (f == NULL) {
        die("cannot open '%s': %s", path, strerror(errno));
    }
    for (;;) {
        if (n > MAX_TEXT_BYTES) {    /* a device without an end (/dev/zero) stops here */
            die("%s holds more than %d MB: a text is read whole, so split it",
                text_name(path, name, sizeof name), MAX_TEXT_BYTES >> 20);
        }
        if (n + 1 >= cap) {
            /* at most MAX_TEXT_BYTES + 2: a text of exactly MAX_TEXT_BYTES is read to its
             * end, one byte more is refused */
            cap = !cap ? 1 << 16 : cap * 2 > MAX_TEXT_BYTES ? (size_t)MAX_TEXT_BYTES + 2 : cap * 2;
            buf = realloc(buf, cap);
            if (buf == NULL) {
                die("out of memory reading %s", text_name(path, name, sizeof name));
            }
        }
        const size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) {
            break;
        }
    }
    if (ferror(f)) {
        die("cannot read %s: %s", text_name(path, name, sizeof name), strerror(errno));
    }
    if (!is_stdin) {
        fclose(f);
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

int32_t *tokenize_all(const moas_model *model, const unknown_opt *unk, const char *text,
                      size_t len, size_t *n_tokens, size_t *n_changed_out) {
    moas_tokenize_params tp;
    int32_t *tokens;
    size_t n_changed = 0;

    moas_tokenize_params_init(&tp);
    tp.unknown = unk->rule;
    if (tp.unknown == MOAS_UNKNOWN_REPLACE) {
        size_t n = 0;
        int32_t id;
        const moas_status st = moas_tokenize(model, unk->with, (size_t)-1, &id, 1, &n);
        if (st == MOAS_ERR_UNKNOWN_CHAR) {
            die("--unknown replace:%s: the replacement must be in the vocabulary: %s",
                unk->with, moas_last_error());
        }
        if (st == MOAS_ERR_BUFFER_TOO_SMALL || (st == MOAS_OK && n != 1)) {
            die("--unknown replace:C needs exactly one character, got '%s'", unk->with);
        }
        check(st, "--unknown replace");
        tp.replacement = id;
    }
    moas_status st = moas_tokenize_ex(model, text, len, &tp, NULL, 0, n_tokens, &n_changed);
    if (st != MOAS_OK && st != MOAS_ERR_BUFFER_TOO_SMALL) {
        if (st == MOAS_ERR_UNKNOWN_CHAR) {
            die("%s (%s; --unknown drop or --unknown replace:C to go on)",
                moas_last_error(), moas_status_string(st));
        }
        die("%s (%s)", moas_last_error(), moas_status_string(st));
    }
    tokens = malloc((*n_tokens ? *n_tokens : 1) * sizeof *tokens);
    if (tokens == NULL) {
        die("out of memory for %zu tokens", *n_tokens);
    }
    check(moas_tokenize_ex(model, text, len, &tp, tokens, *n_tokens, n_tokens, &n_changed),
          "tokenize");
    if (n_changed > 0) {
        if (tp.unknown == MOAS_UNKNOWN_DROP) {
            fprintf(stderr, "moas: dropped %zu character%s outside the vocabulary\n", n_changed,
                    n_changed == 1 ? "" : "s");
        } else {
            fprintf(stderr, "moas: replaced %zu character%s outside the vocabulary with '%s'\n",
                    n_changed, n_changed == 1 ? "" : "s", unk->with);
        }
    }
    if (n_changed_out != NULL) {
        *n_changed_out = n_changed;
    }
    return tokens;
}

moas_model *load_model(const options *o) {
    moas_model_params p;
    moas_model *model;
    moas_model_params_init(&p);
    p.use_mmap = !o->no_mmap;
    check(moas_model_load(o->model_path, &p, &model), "cannot load the model");
    return model;
}

moas_context *new_context(const moas_model *model, const options *o) {
    moas_context_params p;
    moas_context *ctx;
    moas_context_params_init(&p);
    p.n_ctx = o->n_ctx;
    p.n_threads = o->n_threads;
    p.mode = o->mode;
    p.kv_type = o->kv_type;
    p.forced_scheme = o->forced;
    check(moas_context_create(model, &p, &ctx), "cannot create a context");
    return ctx;
}

const char *mode_name(moas_mode mode) {
    return mode == MOAS_MODE_ROUTED ? "routed" : "mixture";
}

const char *type_name(moas_type t) {
    switch (t) {
    case MOAS_TYPE_F32: return "f32";
    case MOAS_TYPE_F16: return "f16";
    case MOAS_TYPE_Q8_0: return "q8_0";
    case MOAS_TYPE_BF16: return "bf16";
    default: return "?";
    }
}

const char *scheme_label(const moas_model *model, int32_t s, char *buf, size_t cap) {
    const int32_t n_kv = moas_model_scheme_n_kv(model, s), n_head = moas_model_n_head(model);
    int shared = 0;
    for (int32_t t = 0; t < moas_model_n_scheme(model); t++) {
        shared |= t != s && moas_model_scheme_n_kv(model, t) == n_kv;
    }
    const int n = n_kv == n_head ? snprintf(buf, cap, "MHA")
                  : n_kv == 1    ? snprintf(buf, cap, "MQA")
                                 : snprintf(buf, cap, "GQA-%d", n_kv);
    if (shared && n >= 0 && (size_t)n < cap) {
        snprintf(buf + n, cap - (size_t)n, "#%d", s);
    }
    return buf;
}

void put_json_string(FILE *f, const char *text) {
    const unsigned char *c = (const unsigned char *)text;
    fputc('"', f);
    for (; *c; c++) {
        if (*c == '"' || *c == '\\') {
            fprintf(f, "\\%c", *c);
        } else if (*c == '\n') {
            fputs("\\n", f);
        } else if (*c < 0x20) {
            fprintf(f, "\\u%04x", *c);
        } else {
            fputc(*c, f);
        }
    }
    fputc('"', f);
}
