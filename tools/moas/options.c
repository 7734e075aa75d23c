/*
 * options.c - every option of the `moas` program, and the one parser all commands use.
 *
 * A command takes the options it lists (cli.h); any other, even one another command
 * takes, is refused by name. The same spelling may mean different things to different
 * commands only where the meaning cannot be confused: -n is the number of tokens
 * generate makes and bench measures. -p is a prompt's text wherever it is taken, so
 * bench's prompt length is --n-prompt.
 */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct {
    const char *name;
    opt_id id;
    int takes_value;
    const char *fixed;   /* the value of an option without one (--color: "1") */
} opt_name;

static const opt_name names[] = {
    {"-h", OPT_HELP, 0, NULL},
    {"--help", OPT_HELP, 0, NULL},
    {"-m", OPT_MODEL, 1, NULL},
    {"--model", OPT_MODEL, 1, NULL},
    {"-p", OPT_PROMPT, 1, NULL},
    {"--prompt", OPT_PROMPT, 1, NULL},
    {"-f", OPT_FILE, 1, NULL},
    {"--file", OPT_FILE, 1, NULL},
    {"-o", OPT_OUTPUT, 1, NULL},
    {"--output", OPT_OUTPUT, 1, NULL},
    {"-n", OPT_N_PREDICT, 1, NULL},
    {"--n-predict", OPT_N_PREDICT, 1, NULL},
    {"--predict", OPT_N_PREDICT, 1, NULL},   /* llama.cpp's other spelling */
    {"--temp", OPT_TEMP, 1, NULL},
    {"--top-k", OPT_TOP_K, 1, NULL},
    {"--top-p", OPT_TOP_P, 1, NULL},
    {"--min-p", OPT_MIN_P, 1, NULL},
    {"-s", OPT_SEED, 1, NULL},
    {"--seed", OPT_SEED, 1, NULL},
    {"--repeat-penalty", OPT_REPEAT_PENALTY, 1, NULL},
    {"--repeat-last-n", OPT_REPEAT_LAST_N, 1, NULL},
    {"--frequency-penalty", OPT_FREQUENCY_PENALTY, 1, NULL},
    {"--presence-penalty", OPT_PRESENCE_PENALTY, 1, NULL},
    {"--logit-bias", OPT_LOGIT_BIAS, 1, NULL},
    {"--stop", OPT_STOP, 1, NULL},
    {"--show-routes", OPT_SHOW_ROUTES, 0, "1"},
    {"--no-warmup", OPT_NO_WARMUP, 0, "1"},
    {"--prompt-cache", OPT_PROMPT_CACHE, 1, NULL},
    {"--prompt-cache-ro", OPT_PROMPT_CACHE_RO, 0, "1"},
    {"--prompt-cache-all", OPT_PROMPT_CACHE_ALL, 0, "1"},
    {"--color", OPT_COLOR, 0, "1"},
    {"--no-color", OPT_COLOR, 0, "0"},
    {"--json", OPT_JSON, 0, "1"},
    {"--stride", OPT_STRIDE, 1, NULL},
    {"--ppl-stride", OPT_STRIDE, 1, NULL},   /* llama-perplexity's name */
    {"-t", OPT_THREADS, 1, NULL},
    {"--threads", OPT_THREADS, 1, NULL},
    {"-c", OPT_CTX, 1, NULL},
    {"--ctx", OPT_CTX, 1, NULL},
    {"--ctx-size", OPT_CTX, 1, NULL},   /* llama.cpp's name */
    {"--mode", OPT_MODE, 1, NULL},
    {"--kv-type", OPT_KV_TYPE, 1, NULL},
    {"--unknown", OPT_UNKNOWN, 1, NULL},
    {"--force-scheme", OPT_FORCE_SCHEME, 1, NULL},
    {"--no-mmap", OPT_NO_MMAP, 0, "1"},
    {"--n-prompt", OPT_N_PROMPT, 1, NULL},
    {"-n", OPT_N_GEN, 1, NULL},
    {"--n-gen", OPT_N_GEN, 1, NULL},
    {"-d", OPT_N_DEPTH, 1, NULL},
    {"--n-depth", OPT_N_DEPTH, 1, NULL},
    {"-r", OPT_REPEATS, 1, NULL},
    {"--repeats", OPT_REPEATS, 1, NULL},
    {"-npp", OPT_NPP, 1, NULL},
    {"-ntg", OPT_NTG, 1, NULL},
    {"-npl", OPT_NPL, 1, NULL},
    {"--shared-prompt", OPT_SHARED_PROMPT, 0, "1"},
    {"-pps", OPT_SHARED_PROMPT, 0, "1"},
    {"--pool-mb", OPT_POOL_MB, 1, NULL},
    {"-b", OPT_BATCH, 1, NULL},
    {"--page-heads", OPT_PAGE_HEADS, 1, NULL},
    {"--compact-keep", OPT_COMPACT_KEEP, 1, NULL},
};

/* The options of the context, shared by the commands that decode text; each command's
 * usage shows the ones it takes. */
static const struct {
    opt_id id;
    const char *help;
} context_help[] = {
    {OPT_THREADS, "  -t, --threads N         threads per call (default: each CPU it may use,\n"
                  "                          within its cgroup's CPU quota)\n"},
    {OPT_CTX, "  -c, --ctx N             context length; 0 (the default): the trained length\n"
              "                          (--ctx-size, as llama.cpp spells it)\n"},
    {OPT_MODE, "      --mode M            mixture (default) or routed\n"},
    {OPT_KV_TYPE, "      --kv-type T         KV cache type: f32 (default), f16 or q8_0 (head_dim a\n"
                  "                          multiple of 32)\n"},
    {OPT_UNKNOWN, "      --unknown R         characters outside the vocabulary: error (default),\n"
                  "                          drop, replace (by a space) or replace:C (by C)\n"},
    {OPT_FORCE_SCHEME, "      --force-scheme S    routed mode: every token runs scheme S (e.g. 0: MHA)\n"},
    {OPT_NO_MMAP, "      --no-mmap           read the model into memory instead of mapping the file\n"
                  "                          (llama.cpp's --no-mmap; see docs/PERFORMANCE.md)\n"},
};

static int takes(const command *cmd, opt_id id) {
    for (const opt_id *p = cmd->options; *p != OPT_END; p++) {
        if (*p == id) {
            return 1;
        }
    }
    return id == OPT_HELP;
}

void print_context_options(FILE *f, const command *cmd) {
    int any = 0;
    fputs("  -h, --help              this text\n", f);
    for (size_t i = 0; i < sizeof context_help / sizeof context_help[0]; i++) {
        if (takes(cmd, context_help[i].id)) {
            fputs(any++ ? "" : "\ncontext:\n", f);
            fputs(context_help[i].help, f);
        }
    }
}

void usage_error(const command *cmd, const char *fmt, ...) {
    va_list ap;
    fputs("moas: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n\n", stderr);
    cmd->usage(stderr);
    exit(2);
}

void options_init(options *o) {
    memset(o, 0, sizeof *o);
    moas_sampler_params sp;
    moas_sampler_params_init(&sp);   /* the sampler's defaults are the library's */
    o->temperature = sp.temperature;
    o->top_k = sp.top_k;
    o->top_p = sp.top_p;
    o->min_p = sp.min_p;
    o->seed = sp.seed;
    o->repeat_penalty = sp.repeat_penalty;
    o->repeat_last_n = sp.repeat_last_n;
    o->frequency_penalty = sp.frequency_penalty;
    o->presence_penalty = sp.presence_penalty;
    o->color = isatty(STDOUT_FILENO);
    o->mode = MOAS_MODE_MIXTURE;
    o->kv_type = MOAS_TYPE_F32;
    o->unknown.rule = MOAS_UNKNOWN_ERROR;
    o->unknown.with = " ";
    o->forced = -1;
    o->compact_keep = -1;
}

/* Whether s begins as a number is written: a digit, after an optional '-' (and for a
 * fraction also '.' then a digit). strtol and strtod would skip leading white space
 * and take a '+', so ' 5' and '+5' passed where '5 ' and '5x' did not. */
static int starts_as_number(const char *s, int fraction) {
    s += *s == '-';
    return isdigit((unsigned char)s[0]) ||
           (fraction && s[0] == '.' && isdigit((unsigned char)s[1]));
}

long parse_long(const char *s, const char *what, long min, long max) {
    char *end;
    errno = 0;
    const long v = strtol(s, &end, 10);
    if (!starts_as_number(s, 0) || errno != 0 || *end != '\0' || end == s || v < min ||
        v > max) {
        die("%s must be an integer in [%ld, %ld], got '%s'", what, min, max, s);
    }
    return v;
}

/* A seed: any unsigned 64-bit value, as the sampler takes (strtoull would wrap "-1"). */
static unsigned long long parse_seed(const char *s, const char *what) {
    char *end;
    errno = 0;
    const unsigned long long v = strtoull(s, &end, 10);
    if (!isdigit((unsigned char)s[0]) || errno != 0 || *end != '\0' || end == s) {
        die("%s must be an integer in [0, %llu], got '%s'", what, ULLONG_MAX, s);
    }
    return v;
}

double parse_double(const char *s, const char *what) {
    char *end;
    errno = 0;
    const double v = strtod(s, &end);
    if (!starts_as_number(s, 1) || strpbrk(s, "xX") != NULL /* strtod's hex floats */ ||
        errno != 0 || *end != '\0' || end == s || !isfinite(v)) {
        die("%s must be a finite number, got '%s'", what, s);
    }
    return v;
}

float parse_float(const char *s, const char *what) {
    const double v = parse_double(s, what);
    if (fabs(v) > FLT_MAX) {   /* would become an infinity */
        die("%s must be a finite number within a float's range (|x| <= %g), got '%s'", what,
            (double)FLT_MAX, s);
    }
    return (float)v;
}

/* A comma-separated list of integers in [min, 1000000]. */
static int parse_list(const char *s, const char *what, int min, int *out) {
    int n = 0;
    const char *at = s;
    while (*at != '\0') {
        char *end;
        errno = 0;
        const long v = strtol(at, &end, 10);
        if (n == MAX_LIST || !starts_as_number(at, 0) || errno != 0 || end == at ||
            v < min || v > 1000000 || (*end != ',' && *end != '\0')) {
            die("%s must be a list of at most %d integers in [%d, 1000000] separated by "
                "commas, got '%s'", what, MAX_LIST, min, s);
        }
        out[n++] = (int)v;
        at = *end == ',' ? end + 1 : end;
    }
    if (n == 0) {
        die("%s needs at least one number", what);
    }
    return n;
}

static void set_option(options *o, opt_id id, const char *name, const char *v) {
    switch (id) {
    case OPT_MODEL: o->model_path = v; break;
    case OPT_PROMPT: o->prompt = v; break;
    case OPT_FILE: o->text_path = v; break;
    case OPT_OUTPUT: o->out_path = v; break;
    case OPT_N_PREDICT: o->n_predict = (int)parse_long(v, name, 0, 1L << 30); break;
    case OPT_TEMP: o->temperature = parse_float(v, name); break;
    case OPT_TOP_K: o->top_k = (int)parse_long(v, name, 0, 1L << 30); break;
    case OPT_TOP_P: o->top_p = parse_float(v, name); break;
    case OPT_MIN_P: o->min_p = parse_float(v, name); break;
    case OPT_SEED: o->seed = parse_seed(v, name); break;
    case OPT_REPEAT_PENALTY: o->repeat_penalty = parse_float(v, name); break;
    case OPT_FREQUENCY_PENALTY: o->frequency_penalty = parse_float(v, name); break;
    case OPT_PRESENCE_PENALTY: o->presence_penalty = parse_float(v, name); break;
    case OPT_REPEAT_LAST_N: o->repeat_last_n = (int)parse_long(v, name, 0, 1L << 20); break;
    case OPT_LOGIT_BIAS:
        if (o->n_bias == MAX_REPEATED) {
            die("at most %d --logit-bias options", MAX_REPEATED);
        }
        o->bias[o->n_bias++] = v;
        break;
    case OPT_STOP:
        if (o->n_stop == MAX_REPEATED) {
            die("at most %d --stop options", MAX_REPEATED);
        }
        if (v[0] == '\0') {   /* the library ignores it: it would stop nothing */
            die("--stop needs a string of at least one character");
        }
        o->stop[o->n_stop++] = v;
        break;
    case OPT_SHOW_ROUTES: o->show_routes = 1; break;
    case OPT_NO_WARMUP: o->no_warmup = 1; break;
    case OPT_PROMPT_CACHE:
        if (v[0] == '\0') {
            die("--prompt-cache needs a file name");
        }
        o->prompt_cache = v;
        break;
    case OPT_PROMPT_CACHE_RO: o->prompt_cache_ro = 1; break;
    case OPT_PROMPT_CACHE_ALL: o->prompt_cache_all = 1; break;
    case OPT_COLOR: o->color = v[0] == '1'; break;
    case OPT_JSON: o->json = 1; break;
    case OPT_STRIDE: o->stride = (int)parse_long(v, name, 1, 1L << 30); break;
    case OPT_THREADS: o->n_threads = (int)parse_long(v, name, 1, 1024); break;
    case OPT_CTX: o->n_ctx = (int)parse_long(v, name, 0, 1L << 30); break;
    case OPT_MODE:
        if (!strcmp(v, "mixture")) {
            o->mode = MOAS_MODE_MIXTURE;
        } else if (!strcmp(v, "routed")) {
            o->mode = MOAS_MODE_ROUTED;
        } else {
            die("--mode must be mixture or routed, got '%s'", v);
        }
        break;
    case OPT_KV_TYPE:
        if (!strcmp(v, "f32")) {
            o->kv_type = MOAS_TYPE_F32;
        } else if (!strcmp(v, "f16")) {
            o->kv_type = MOAS_TYPE_F16;
        } else if (!strcmp(v, "q8_0")) {
            o->kv_type = MOAS_TYPE_Q8_0;
        } else {
            die("--kv-type must be f32, f16 or q8_0, got '%s'", v);
        }
        break;
    case OPT_UNKNOWN:
        if (!strcmp(v, "error")) {
            o->unknown.rule = MOAS_UNKNOWN_ERROR;
        } else if (!strcmp(v, "drop")) {
            o->unknown.rule = MOAS_UNKNOWN_DROP;
        } else if (!strcmp(v, "replace")) {
            o->unknown.rule = MOAS_UNKNOWN_REPLACE;
            o->unknown.with = " ";
        } else if (!strncmp(v, "replace:", 8)) {
            o->unknown.rule = MOAS_UNKNOWN_REPLACE;
            o->unknown.with = v + 8;
        } else {
            die("--unknown must be error, drop, replace or replace:C, got '%s'", v);
        }
        break;
    case OPT_FORCE_SCHEME: o->forced = (int)parse_long(v, name, 0, 7); break;
    case OPT_NO_MMAP: o->no_mmap = 1; break;
    case OPT_N_PROMPT: o->n_prompt = (int)parse_long(v, name, 1, 1L << 20); break;
    case OPT_N_GEN: o->n_gen = (int)parse_long(v, name, 0, 1L << 20); break;
    case OPT_N_DEPTH: o->depth = (int)parse_long(v, name, 0, 1L << 20); break;
    case OPT_REPEATS: o->repeats = (int)parse_long(v, name, 1, 1000); break;
    case OPT_NPP: o->n_npp = parse_list(v, name, 1, o->npp); break;
    case OPT_NTG: o->n_ntg = parse_list(v, name, 0, o->ntg); break;
    case OPT_NPL: o->n_npl = parse_list(v, name, 1, o->npl); break;
    case OPT_SHARED_PROMPT: o->shared_prompt = 1; break;
    case OPT_POOL_MB:
        o->pool_mb = parse_double(v, name);
        if (!(o->pool_mb > 0) || o->pool_mb > 1e9) {
            die("--pool-mb needs a size in (0, 1e9] MB, got '%s'", v);
        }
        break;
    case OPT_BATCH: o->n_batch = (int)parse_long(v, name, 1, 1L << 20); break;
    case OPT_PAGE_HEADS: o->page_heads = (int)parse_long(v, name, 1, 1L << 10); break;
    case OPT_COMPACT_KEEP: o->compact_keep = (int)parse_long(v, name, 0, 1L << 30); break;
    case OPT_HELP:
    case OPT_END:
    case OPT_COUNT:
        break;
    }
}

void parse_options(const command *cmd, int argc, char **argv, options *o) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const opt_name *found = NULL, *elsewhere = NULL;
        for (size_t k = 0; k < sizeof names / sizeof names[0] && found == NULL; k++) {
            if (!strcmp(a, names[k].name)) {
                if (takes(cmd, names[k].id)) {
                    found = &names[k];
                } else {
                    elsewhere = &names[k];
                }
            }
        }
        if (found == NULL && elsewhere != NULL) {
            if (elsewhere->id == OPT_PROMPT && takes(cmd, OPT_N_PROMPT)) {
                usage_error(cmd, "%s does not take %s: -p is a prompt's text wherever it is "
                            "taken; the prompt length is --n-prompt N (llama-bench's -p)",
                            cmd->name, a);
            }
            usage_error(cmd, "%s does not take %s", cmd->name, a);
        } else if (found == NULL) {
            usage_error(cmd, a[0] == '-' ? "unknown option '%s'" : "unexpected argument '%s'",
                        a);
        }
        if (found->id == OPT_HELP) {   /* as `moas help CMD`: a help not written fails */
            cmd->usage(stdout);
            if (fflush(stdout) != 0 || ferror(stdout)) {
                die("cannot write stdout: %s", strerror(errno));
            }
            exit(0);
        }
        const char *value = found->fixed;
        if (found->takes_value) {
            if (i + 1 >= argc) {
                usage_error(cmd, "option %s needs a value", a);
            }
            value = argv[++i];
        }
        o->given[found->id] = 1;
        set_option(o, found->id, a, value);
    }
    if (o->model_path == NULL) {
        usage_error(cmd, "%s needs -m MODEL", cmd->name);
    }
}
