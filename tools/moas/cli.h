/*
 * cli.h - what the `moas` program's commands share: the command table, the options
 * every command picks from, model loading, text input, errors, scheme labels.
 *
 * The program is a thin client of the public API (it includes nothing but moas.h and
 * libc), so it doubles as a worked example. A failure prints one line, "moas: error:
 * ...", usually the library's message, and exits with status 1; a usage error (an
 * unknown option, one the command does not take, a missing value or argument) prints
 * what is wrong and the command's usage on stderr and exits with status 2.
 */
#ifndef MOAS_CLI_H
#define MOAS_CLI_H

#include "moas.h"

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- commands ------------------------------------------------------------------- */

/* Every option of every command; a command lists the ones it takes. */
typedef enum {
    OPT_END = 0,   /* ends a command's list */
    OPT_HELP,
    /* where the input comes from */
    OPT_MODEL, OPT_PROMPT, OPT_FILE, OPT_OUTPUT,
    /* generate */
    OPT_N_PREDICT, OPT_TEMP, OPT_TOP_K, OPT_TOP_P, OPT_MIN_P, OPT_SEED, OPT_REPEAT_PENALTY,
    OPT_REPEAT_LAST_N, OPT_FREQUENCY_PENALTY, OPT_PRESENCE_PENALTY, OPT_LOGIT_BIAS, OPT_STOP, OPT_SHOW_ROUTES, OPT_NO_WARMUP,
    OPT_PROMPT_CACHE, OPT_PROMPT_CACHE_RO, OPT_PROMPT_CACHE_ALL,
    /* output */
    OPT_COLOR, OPT_JSON,
    /* perplexity */
    OPT_STRIDE,
    /* the context: shared by the commands that decode text */
    OPT_THREADS, OPT_CTX, OPT_MODE, OPT_KV_TYPE, OPT_UNKNOWN, OPT_FORCE_SCHEME, OPT_NO_MMAP,
    /* bench */
    OPT_N_PROMPT, OPT_N_GEN, OPT_N_DEPTH, OPT_REPEATS,
    /* batched-bench */
    OPT_NPP, OPT_NTG, OPT_NPL, OPT_SHARED_PROMPT, OPT_POOL_MB, OPT_BATCH, OPT_PAGE_HEADS,
    OPT_COMPACT_KEEP,
    OPT_COUNT
} opt_id;

typedef struct command {
    const char *name;
    const char *summary;                 /* one line of `moas help` */
    void (*usage)(FILE *f);              /* `moas help NAME`, `moas NAME --help` */
    const opt_id *options;               /* the options it takes, ended by OPT_END */
    int (*run)(int argc, char **argv);   /* argv[0] is the command's name */
} command;

extern const command moas_cmd_generate, moas_cmd_perplexity, moas_cmd_routes,
    moas_cmd_logits, moas_cmd_inspect, moas_cmd_bench, moas_cmd_batched_bench;

/* ---- options -------------------------------------------------------------------- */

#define MAX_REPEATED 64   /* --logit-bias, --stop */
#define MAX_LIST 32       /* -npp, -ntg, -npl */

/* How text meets the vocabulary (--unknown): the rule and, for replace, the character. */
typedef struct {
    int32_t rule;            /* a moas_unknown */
    const char *with;        /* replace: the replacement character, as given */
} unknown_opt;

/* Every option's value. options_init() sets the shared defaults; a command sets its
 * own before parse_options(). given[id] says whether the command line had it. */
typedef struct {
    char given[OPT_COUNT];
    const char *model_path;
    const char *prompt;        /* -p (or NULL) */
    const char *text_path;     /* -f (or NULL); "-": stdin */
    const char *out_path;
    /* generate */
    int n_predict;
    float temperature;
    int top_k;
    float top_p;
    float min_p;
    unsigned long long seed;
    float repeat_penalty;
    int repeat_last_n;
    float frequency_penalty;
    float presence_penalty;
    int n_bias;
    const char *bias[MAX_REPEATED];   /* --logit-bias TOKEN=BIAS, as given */
    int n_stop;
    const char *stop[MAX_REPEATED];
    int show_routes;
    int no_warmup;   /* generate: time the first call's one-time costs with the prompt */
    const char *prompt_cache;   /* generate: the prompt's state kept in this file (or NULL) */
    int prompt_cache_ro;        /* ... read, never written */
    int prompt_cache_all;       /* ... written at the end, the generated text included */
    int color;       /* 1: ANSI colours; default: when stdout is a terminal */
    int json;
    int stride;      /* perplexity: new tokens scored per window (0: consecutive windows) */
    /* the context */
    int n_threads;   /* 0: the library's default */
    int n_ctx;       /* 0: the trained length */
    moas_mode mode;
    moas_type kv_type;
    unknown_opt unknown;
    int forced;      /* routed mode: the context-wide forced scheme, -1: the router's */
    int no_mmap;     /* read the model file into memory instead of mapping it */
    /* bench */
    int n_prompt;
    int n_gen;
    int depth;
    int repeats;
    /* batched-bench */
    int npp[MAX_LIST], ntg[MAX_LIST], npl[MAX_LIST];
    int n_npp, n_ntg, n_npl;
    int shared_prompt;
    double pool_mb;
    int n_batch;
    int page_heads;
    int compact_keep;
} options;

void options_init(options *o);

/* Parse argv[1..] (argv[0] is the command's name) for `cmd`: -h/--help prints its
 * usage on stdout and exits 0; an unknown option, or one `cmd` does not take, is a
 * usage error (exit 2); a bad value is an error (exit 1). -m MODEL is required. */
void parse_options(const command *cmd, int argc, char **argv, options *o);

/* An option's value: an integer in [min, max], or a number; anything else is an error
 * naming `what`. */
long parse_long(const char *s, const char *what, long min, long max);
double parse_double(const char *s, const char *what);
/* parse_double within a float's range: a value that would become an infinity is an error. */
float parse_float(const char *s, const char *what);

/* The end of a command's usage: -h, then the context options `cmd` takes. */
void print_context_options(FILE *f, const command *cmd);

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3), noreturn))
#endif
void usage_error(const command *cmd, const char *fmt, ...);

/* ---- errors, time, input -------------------------------------------------------- */

#if defined(__GNUC__)
__attribute__((format(printf, 1, 2), noreturn))
#endif
void die(const char *fmt, ...);

/* Text on stdout whose last line is not finished (generate sets it), and what a line on
 * stderr then starts with: a newline when both show in one place (stderr a terminal,
 * or the same file or pipe as stdout), so that it starts a line of its own. die() uses
 * it too. */
extern int cli_line_open;
const char *cli_note_start(void);

/* Exit with the library's message when `st` is a failure. */
void check(moas_status st, const char *what);

double now_seconds(void);

/* The whole of `path` ("-": stdin), NUL-terminated; its length in *len. */
char *read_text(const char *path, size_t *len);

/* How `path` is named in messages: 'PATH', or stdin. */
const char *text_name(const char *path, char *buf, size_t cap);

/* Text -> freshly allocated token ids, under the --unknown rule `unk`; says on stderr
 * how many characters were replaced or dropped, and returns that count in *n_changed
 * (may be NULL). */
int32_t *tokenize_all(const moas_model *model, const unknown_opt *unk, const char *text,
                      size_t len, size_t *n_tokens, size_t *n_changed);

/* ---- the prompt cache (prompt_cache.c) ------------------------------------------ */

/* Load the prompt cache at `path` into ctx (fresh, nothing decoded; `forced` its
 * --force-scheme, -1 for none) and keep of it the tokens the prompt `window` starts
 * with: returns how many (ctx's n_past); when that is n_window, ctx holds the prompt's
 * last logits, otherwise the rest is to be decoded. A missing, empty or unusable cache
 * is a note on stderr and 0; a file that is not a prompt cache at all ends the run (it
 * is not written over). `when` says when the run writes it ("after the prompt"), NULL
 * if never. */
int32_t prompt_cache_load(const char *path, moas_context *ctx, int forced,
                          const int32_t *window, int32_t n_window, const char *when);

/* Write ctx's state and the tokens it holds to `path`, whole or not at all (a
 * failure is a note on stderr: the run goes on). */
void prompt_cache_save(const char *path, const moas_context *ctx, int forced,
                       const int32_t *window, int32_t n_window);

/* ---- models and contexts -------------------------------------------------------- */

moas_model *load_model(const options *o);
moas_context *new_context(const moas_model *model, const options *o);
const char *mode_name(moas_mode mode);
const char *type_name(moas_type t);

/* A scheme's name, from its KV heads: MHA (all of them), MQA (one), GQA-g (g); when
 * another scheme of the model has as many KV heads, the name ends in #s, its number
 * (MHA#0, MHA#1), so that every scheme's name is its own. */
const char *scheme_label(const moas_model *model, int32_t s, char *buf, size_t cap);

/* `text` as a JSON string. */
void put_json_string(FILE *f, const char *text);

/* The route map (routes.c): the n tokens stored in ctx, in rows of 64 characters, under
 * each row one line per layer with the scheme each token used there, then each layer's
 * shares. */
void print_route_map(FILE *f, const moas_context *ctx, const int32_t *tokens, int32_t n,
                     int color);

#endif
