/*
 * generate.c - `moas generate`: continue a prompt.
 */
#include "cli.h"

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void usage(FILE *f) {
    moas_sampler_params sp;
    moas_sampler_params_init(&sp);   /* the defaults below are the library's */
    fprintf(f,
            "usage: moas generate -m MODEL (-p PROMPT | -f FILE) [options]\n"
            "\n"
            "Continues the prompt. The prompt (as the model read it, --unknown's changes\n"
            "made) and then the text go to stdout as they are made, ended by a newline;\n"
            "notes and the timings (load, prompt eval, eval, total, as llama.cpp prints\n"
            "them) go to stderr. Ctrl-C ends the text where it is (a long prompt's decode\n"
            "stops between layers), prints the timings and exits with status 130; a\n"
            "second Ctrl-C ends the program at once.\n"
            "\n"
            "  -m, --model PATH        GGUF model file\n"
            "  -p, --prompt TEXT       the prompt; - reads it from stdin\n"
            "  -f, --file FILE         the prompt is FILE's bytes, as they are; - is stdin\n"
            "  -n, --n-predict N       tokens to generate (default 256; --predict too)\n"
            "      --temp T            temperature; 0: greedy (default %g)\n"
            "      --top-k K           sample from the K likeliest (default %d: all)\n"
            "      --top-p P           from the likeliest whose probabilities sum to P\n"
            "                          (default %g)\n"
            "      --min-p P           keep tokens at least P times as likely as the likeliest\n"
            "                          (default %g)\n"
            "  -s, --seed S            the sampler's seed: the same seed, the same text\n"
            "                          (default %llu)\n"
            "      --repeat-penalty F  penalize the tokens among the last N: a positive logit\n"
            "                          is divided by F, another multiplied (default %g: off)\n"
            "      --repeat-last-n N   N for the penalties; the prompt counts (default %d)\n"
            "      --frequency-penalty F\n"
            "                          subtract F from a token's logit for each time it is\n"
            "                          among the last N, after --repeat-penalty (OpenAI's;\n"
            "                          default %g: off)\n"
            "      --presence-penalty F\n"
            "                          subtract F once from the logit of each token among\n"
            "                          the last N (default %g: off)\n"
            "      --logit-bias T=B    add B to token T's logit: T an id or one character, B a\n"
            "                          number or -inf (never T); repeatable (a digit of the\n"
            "                          vocabulary is refused: 05 is id 5)\n"
            "      --stop STRING       end the text just before STRING (characters of the\n"
            "                          vocabulary); repeatable\n"
            "      --show-routes       after the text, the route map of the last window (as\n"
            "                          moas routes draws it)\n"
            "      --prompt-cache FILE the prompt's decoded state kept in FILE: a later run\n"
            "                          whose prompt starts the same decodes only the rest\n"
            "                          (the same text as without it); written after the\n"
            "                          prompt, made when missing or empty\n"
            "      --prompt-cache-ro   read the cache, never write it\n"
            "      --prompt-cache-all  write it at the end, with the generated text, so that\n"
            "                          a prompt continuing the output reuses it too (not\n"
            "                          once the window slid)\n"
            "      --no-warmup         no untimed call before the prompt (by default two tokens\n"
            "                          are decoded and forgotten while loading, as llama.cpp\n"
            "                          does, so that prompt eval does not time the threads'\n"
            "                          start and the weights' first reads)\n"
            "      --color, --no-color colour the route map (default: when stdout is a\n"
            "                          terminal)\n",
            (double)sp.temperature, sp.top_k, (double)sp.top_p, (double)sp.min_p,
            (unsigned long long)sp.seed, (double)sp.repeat_penalty, sp.repeat_last_n,
            (double)sp.frequency_penalty, (double)sp.presence_penalty);
    print_context_options(f, &moas_cmd_generate);
}

static const opt_id accepted[] = {
    OPT_MODEL, OPT_PROMPT, OPT_FILE, OPT_N_PREDICT, OPT_TEMP, OPT_TOP_K, OPT_TOP_P,
    OPT_MIN_P, OPT_SEED, OPT_REPEAT_PENALTY, OPT_REPEAT_LAST_N, OPT_FREQUENCY_PENALTY,
    OPT_PRESENCE_PENALTY, OPT_LOGIT_BIAS, OPT_STOP,
    OPT_SHOW_ROUTES, OPT_NO_WARMUP, OPT_PROMPT_CACHE, OPT_PROMPT_CACHE_RO, OPT_PROMPT_CACHE_ALL, OPT_COLOR, OPT_THREADS, OPT_CTX, OPT_MODE, OPT_KV_TYPE, OPT_UNKNOWN,
    OPT_FORCE_SCHEME, OPT_NO_MMAP, OPT_END,
};

static int run(int argc, char **argv);

const command moas_cmd_generate = {
    "generate", "continue a prompt (-p TEXT, or -f FILE; - for stdin)", usage, accepted, run,
};

/* ---- the text on stdout --------------------------------------------------------- */

/* The text goes to stdout piece by piece, flushed, so that it shows as it is made and
 * stays in order with stderr's lines when both go to one pipe (cli_line_open: the last
 * byte written is not a newline). A write that fails (a closed stdout, a full disk, a
 * reader gone while SIGPIPE is ignored) ends the run at once. */
static void put_text(const char *text, size_t len) {
    if (len > 0) {
        if (fwrite(text, 1, len, stdout) != len || fflush(stdout) != 0) {
            die("cannot write stdout: %s", strerror(errno));
        }
        cli_line_open = text[len - 1] != '\n';
    }
}

/* One line of the timings, llama.cpp's layout: the time, then (n >= 0) the tokens, then
 * (rates) the time per token and tokens per second. */
static void timing(const char *what, double seconds, long n, int rates) {
    fprintf(stderr, "moas: %16s = %10.2f ms", what, seconds * 1e3);
    if (n >= 0) {
        fprintf(stderr, " / %5ld tokens", n);
    }
    if (rates && n > 0 && seconds > 0) {
        fprintf(stderr, " (%8.2f ms per token, %9.2f tokens per second)", seconds * 1e3 / n,
                n / seconds);
    }
    fputc('\n', stderr);
}

/* --logit-bias TOKEN=BIAS: TOKEN is a token id (digits) or one character of the
 * vocabulary; BIAS a number, or -inf to ban the token. A single digit that is also a
 * character of the vocabulary is refused as ambiguous ("05" is the id, the character's
 * id the character). */
static moas_logit_bias parse_logit_bias(const moas_model *model, const char *arg) {
    moas_logit_bias b;
    const char *eq = strrchr(arg, '=');
    char key[32];
    size_t n = 0;

    if (eq == NULL || eq == arg || (size_t)(eq - arg) >= sizeof key) {
        die("--logit-bias needs TOKEN=BIAS (an id or one character, then a number), got '%s'",
            arg);
    }
    memcpy(key, arg, (size_t)(eq - arg));
    key[eq - arg] = '\0';
    b.bias = !strcmp(eq + 1, "-inf") ? -INFINITY   /* bans the token */
                                     : parse_float(eq + 1, "--logit-bias's BIAS");
    if (strspn(key, "0123456789") == strlen(key)) {
        int32_t digit;
        /* one digit that the vocabulary holds as a character names two tokens: the
         * id was taken silently, a ban of the digit banned another token */
        if (key[1] == '\0' && moas_tokenize(model, key, 1, &digit, 1, &n) == MOAS_OK) {
            die("--logit-bias %s: '%s' is both token id %s and the character '%s' (id %d): "
                "write 0%s for the id or %d for the character", arg, key, key, key,
                (int)digit, key, (int)digit);
        }
        b.token = (int32_t)parse_long(key, "--logit-bias's token id", 0,
                                      moas_model_n_vocab(model) - 1);
        return b;
    }
    const moas_status st = moas_tokenize(model, key, (size_t)-1, &b.token, 1, &n);
    if (st == MOAS_ERR_BUFFER_TOO_SMALL || (st == MOAS_OK && n != 1)) {
        die("--logit-bias: '%s' is neither a token id nor one character", key);
    }
    check(st, "--logit-bias");
    return b;
}

/* A token's bytes into `buf` (8 bytes: a character and a NUL), returning their count.
 * Not moas_token_text's C string: a vocabulary may hold the NUL character, whose text
 * reads as empty there, and the character vanished from the output. */
static size_t token_bytes(const moas_model *model, int32_t token, char *buf) {
    size_t len = 0;
    check(moas_detokenize(model, &token, 1, buf, 8, &len), "detokenize");
    return len;
}

/* ---- Ctrl-C ----------------------------------------------------------------------- */

/* SIGINT sets a flag that the context's abort callback reads (a decode under way stops
 * between layers, nothing half stored) and the generation loop checks; the text so far
 * and the timings are then printed, as llama.cpp prints them, with exit status 130. A
 * second SIGINT has the default effect. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig) {
    (void)sig;
    interrupted = 1;
    signal(SIGINT, SIG_DFL);
}

static int32_t stop_when_interrupted(void *user) {
    (void)user;
    return interrupted != 0;
}

/* A decoding call's status: true when it ran, false when Ctrl-C stopped it; any other
 * failure ends the run. */
static int decoded(moas_status st, const char *what) {
    if (st == MOAS_ERR_ABORTED && interrupted) {
        return 0;
    }
    check(st, what);
    return 1;
}

/* ---- generate ------------------------------------------------------------------- */

/* A call before the timed ones, then forgotten (the context is as created): the first
 * call pays once for what later ones find done (the weights' pages read in from the
 * file, the threads started), and without it prompt eval timed those, not the prompt
 * (14 prompt tokens at 0.26-1.1 ms each against 0.11 ms a generated token). Counted in
 * load time. Tokens 0 and 1 (or 0 alone), as llama.cpp decodes two before it times. */
static void warm_up(moas_context *ctx) {
    const int32_t tokens[2] = {0, 1};
    const moas_model *model = moas_context_model(ctx);
    const int32_t n = moas_model_n_vocab(model) < 2 || moas_context_n_ctx(ctx) < 2 ? 1 : 2;
    check(moas_context_decode_batch(ctx, tokens, n, NULL, MOAS_LOGITS_LAST), "warm-up decode");
    moas_context_reset(ctx);
}

/* Generation beyond the context: a RoPE model's cache is shifted when it is full
 * (moas_context_shift); the published model only knows positions below its trained
 * length, so its last half of the window is decoded again from position 0 and
 * generation continues from there. */
static int run(int argc, char **argv) {
    options o;
    options_init(&o);
    o.n_predict = 256;
    parse_options(&moas_cmd_generate, argc, argv, &o);
    if (o.prompt != NULL && o.text_path != NULL) {
        usage_error(&moas_cmd_generate, "generate takes the prompt from -p or -f, not both");
    }
    if (o.prompt == NULL && o.text_path == NULL) {
        usage_error(&moas_cmd_generate, "generate needs a prompt: -p TEXT or -f FILE");
    }
    if ((o.prompt_cache_ro || o.prompt_cache_all) && o.prompt_cache == NULL) {
        usage_error(&moas_cmd_generate, "--prompt-cache-%s needs --prompt-cache FILE",
                    o.prompt_cache_ro ? "ro" : "all");
    }
    if (o.prompt_cache_ro && o.prompt_cache_all) {
        usage_error(&moas_cmd_generate, "--prompt-cache-ro never writes the cache and "
                    "--prompt-cache-all writes it at the end: give one of them");
    }

    signal(SIGINT, on_sigint);   /* before anything slow: loading, warming up */
    const double t_start = now_seconds();
    moas_model *model = load_model(&o);
    moas_context *ctx = new_context(model, &o);
    moas_sampler_params sp;
    moas_sampler *smp;
    moas_logit_bias bias[MAX_REPEATED];
    moas_sampler_params_init(&sp);
    sp.temperature = o.temperature;
    sp.top_k = o.top_k;
    sp.top_p = o.top_p;
    sp.seed = o.seed;
    sp.min_p = o.min_p;
    sp.repeat_penalty = o.repeat_penalty;
    sp.repeat_last_n = o.repeat_last_n;
    sp.frequency_penalty = o.frequency_penalty;
    sp.presence_penalty = o.presence_penalty;
    for (int i = 0; i < o.n_bias; i++) {
        bias[i] = parse_logit_bias(model, o.bias[i]);
    }
    sp.n_logit_bias = o.n_bias;
    sp.logit_bias = bias;
    /* a stop string the model cannot write would be ignored without a word: "\n\n"
     * given without the shell's $'...' is a backslash and an n */
    for (int i = 0; i < o.n_stop; i++) {
        size_t n_stop_tokens;
        if (moas_tokenize(model, o.stop[i], (size_t)-1, NULL, 0, &n_stop_tokens) ==
            MOAS_ERR_UNKNOWN_CHAR) {
            die("--stop '%s' can never be generated: %s", o.stop[i], moas_last_error());
        }
    }
    check(moas_sampler_create(&sp, moas_model_n_vocab(model), &smp), "cannot create a sampler");
    if (!o.no_warmup) {
        warm_up(ctx);
    }
    moas_context_set_abort_callback(ctx, stop_when_interrupted, NULL);
    const double t_loaded = now_seconds();

    /* the prompt: -p's text, or a file's (-f), or stdin's (either of them as -) */
    const char *source = o.text_path != NULL ? o.text_path : o.prompt;
    size_t prompt_len = 0, n_prompt;
    char *prompt = NULL;
    if (source != NULL && (o.text_path != NULL || !strcmp(source, "-"))) {
        prompt = read_text(source, &prompt_len);
    } else if (source != NULL) {
        prompt_len = strlen(source);
        prompt = malloc(prompt_len + 1);
        if (prompt == NULL) {
            die("out of memory");
        }
        memcpy(prompt, source, prompt_len + 1);
    }
    size_t n_changed = 0;
    int32_t *tokens = tokenize_all(model, &o.unknown, prompt ? prompt : "", prompt_len,
                                   &n_prompt, &n_changed);
    for (size_t i = 0; i < n_prompt; i++) {   /* the penalty sees the prompt too */
        check(moas_sampler_accept(smp, tokens[i]), "sampler");
    }
    if (n_prompt == 0) {
        die("the prompt is empty: give at least one character with -p or -f");
    }
    const int32_t n_ctx = moas_context_n_ctx(ctx);
    int32_t n_window = 0, n_slides = 0;
    int32_t *window = malloc((size_t)n_ctx * sizeof *window);
    if (window == NULL) {
        die("out of memory");
    }
    /* a prompt longer than the context keeps its end, and says so */
    const size_t start = n_prompt > (size_t)n_ctx ? n_prompt - (size_t)n_ctx : 0;
    if (start > 0) {
        fprintf(stderr, "moas: the prompt has %zu characters, more than the context's %d: only "
                "its last %d are decoded (the first %zu are not seen)\n", n_prompt, n_ctx,
                n_ctx, start);
    }
    for (size_t i = start; i < n_prompt; i++) {
        window[n_window++] = tokens[i];
    }
    /* a prompt cache's tokens that the prompt starts with are not decoded again; reading
     * it counts as loading */
    const double t_cache = now_seconds();
    const int32_t n_reused =
        o.prompt_cache != NULL
            ? prompt_cache_load(o.prompt_cache, ctx, o.forced, window, n_window,
                                o.prompt_cache_ro    ? NULL
                                : o.prompt_cache_all ? "at the end, with the text"
                                                     : "after the prompt")
            : 0;
    const double t_prompt = now_seconds();
    const int32_t n_prompt_eval = n_window - n_reused;
    const int prompt_read =
        n_prompt_eval == 0 ||
        decoded(moas_context_decode_batch(ctx, window + n_reused, n_prompt_eval, NULL,
                                          MOAS_LOGITS_LAST),
                "decode");
    const double t_prompt_done = now_seconds();
    if (prompt_read && o.prompt_cache != NULL && !o.prompt_cache_ro && !o.prompt_cache_all &&
        n_prompt_eval > 0) {
        prompt_cache_save(o.prompt_cache, ctx, o.forced, window, n_window);
    }
    const double t_eval = now_seconds();   /* eval time does not count the cache's writing */
    if (n_changed == 0) {
        put_text(prompt, prompt_len);
    } else {   /* --unknown dropped or replaced characters: show what the model read */
        for (size_t i = 0; i < n_prompt; i++) {
            char piece[8];
            put_text(piece, token_bytes(model, tokens[i], piece));
        }
    }

    /* text sampled but not shown yet: it may be the start of a stop string */
    size_t held = 0, held_cap = 256;
    char *pending = malloc(held_cap);
    int n_generated = 0, n_decoded = 0, stopped = 0;
    if (pending == NULL) {
        die("out of memory");
    }
    for (int i = 0; i < o.n_predict && !stopped && prompt_read && !interrupted; i++) {
        int32_t token;
        size_t show;
        check(moas_sampler_sample(smp, moas_context_logits(ctx), &token), "sample");
        n_generated++;
        char piece[8];
        const size_t piece_len = token_bytes(model, token, piece);
        if (held + piece_len > held_cap) {
            held_cap = 2 * (held + piece_len);
            pending = realloc(pending, held_cap);
            if (pending == NULL) {
                die("out of memory");
            }
        }
        memcpy(pending + held, piece, piece_len);
        held += piece_len;
        check(moas_text_find_stop(pending, held, o.stop, (size_t)o.n_stop, 1, &show, &stopped),
              "stop strings");
        put_text(pending, show);
        memmove(pending, pending + show, held - show);
        held -= show;
        if (stopped || (i + 1 == o.n_predict && !o.show_routes)) {
            break;   /* nothing reads the last token's logits: it is decoded only for the
                      * route map, which shows every token's routing */
        }
        if (n_window == n_ctx) {
            /* RoPE models shift: the first tokens stay (attention sinks), half of the
             * rest goes, the later half moves down without being decoded again */
            const int32_t sink = n_ctx >= 16 ? 4 : 0, drop = (n_ctx - sink) / 2;
            const moas_status shifted =
                drop > 0 ? moas_context_shift(ctx, sink, drop) : MOAS_ERR_INVALID_ARG;
            if (shifted == MOAS_OK) {
                if (n_slides++ == 0) {
                    fprintf(stderr, "%smoas: the context (%d tokens) is full: from here on, "
                            "each time it fills, the first %d tokens stay, the next %d are "
                            "dropped and the rest move down (a context shift: RoPE keys "
                            "turned back, nothing decoded again)\n", cli_note_start(), n_ctx, sink,
                            drop);
                }
                memmove(window + sink, window + sink + drop,
                        (size_t)(n_window - sink - drop) * sizeof *window);
                n_window -= drop;
            } else {
                const int32_t keep = n_ctx / 2;
                if (n_slides++ == 0) {
                    /* why there is no shift: learned positions (the model's kind), a
                     * context too short to drop anything, or the shift's own error */
                    const char *encoding = NULL;
                    const int rope = moas_model_meta_string(model, "moas.position_encoding",
                                                            &encoding, NULL) == MOAS_OK &&
                                     strcmp(encoding, "rope") == 0;
                    const char *why = !rope ? "the model has learned positions (no shift)"
                                      : drop == 0 ? "too short to shift"
                                                  : "the shift failed: ";
                    fprintf(stderr, "%smoas: the context (%d token%s) is full and %s%s: from "
                            "here on, each time it fills, generation goes on from its last "
                            "%d token%s, decoded again from position 0\n", cli_note_start(),
                            n_ctx, n_ctx == 1 ? "" : "s", why,
                            rope && drop > 0 ? moas_status_string(shifted) : "", keep,
                            keep == 1 ? "" : "s");
                }
                memmove(window, window + n_window - keep, (size_t)keep * sizeof *window);
                n_window = keep;
                moas_context_reset(ctx);
                if (!decoded(moas_context_decode_batch(ctx, window, n_window, NULL,
                                                       MOAS_LOGITS_NONE),
                             "decode")) {
                    break;
                }
            }
        }
        window[n_window++] = token;
        if (!decoded(moas_context_decode(ctx, token, NULL), "decode")) {
            break;
        }
        n_decoded++;
    }
    const double t_end = now_seconds();
    if (!stopped && held > 0) {   /* nothing follows: a whole stop string still counts */
        size_t show;
        check(moas_text_find_stop(pending, held, o.stop, (size_t)o.n_stop, 0, &show, &stopped),
              "stop strings");
        put_text(pending, show);
    }
    free(pending);
    if (cli_line_open) {   /* the text ends a line before anything else is printed */
        put_text("\n", 1);
    }
    /* --prompt-cache-all: the tokens decoded, the generated ones too (the window's first
     * n_past: a token whose decode Ctrl-C stopped is in the window, not the cache). A
     * window that slid holds keys a fresh read of its tokens would not give. */
    if (o.prompt_cache_all && prompt_read) {
        if (n_slides > 0) {
            fprintf(stderr, "moas: prompt cache '%s' not written: the window slid, and its "
                    "keys are no longer those of its tokens read from the start\n",
                    o.prompt_cache);
        } else if (moas_context_n_past(ctx) > n_reused) {
            prompt_cache_save(o.prompt_cache, ctx, o.forced, window, moas_context_n_past(ctx));
        }
    }

    timing("load time", t_loaded - t_start + (t_prompt - t_cache), -1, 0);
    timing("prompt eval time", t_prompt_done - t_prompt, prompt_read ? n_prompt_eval : 0, 1);
    /* as llama.cpp counts: eval is the tokens decoded after the prompt, one fewer than
     * those generated (the first comes from the prompt's logits, the last is not
     * decoded) */
    timing("eval time", t_end - t_eval, n_decoded, 1);
    timing("total time", t_end - t_start, (long)(prompt_read ? n_prompt_eval : 0) + n_decoded,
           0);
    fprintf(stderr, "moas: mode %s, kernels %s, %d thread%s", mode_name(o.mode),
            moas_context_kernels_name(ctx), moas_context_n_threads(ctx),
            moas_context_n_threads(ctx) == 1 ? "" : "s");
    if (stopped) {
        fprintf(stderr, ", ended by a stop string");
    }
    if (n_slides > 0) {
        fprintf(stderr, ", the window slid %d time%s", n_slides, n_slides == 1 ? "" : "s");
    }
    if (interrupted) {
        fprintf(stderr, ", interrupted (Ctrl-C)");
    }
    fputc('\n', stderr);
    if (o.show_routes) {   /* the window in the cache now: the text's last n_ctx tokens */
        fputc('\n', stdout);
        print_route_map(stdout, ctx, window, moas_context_n_past(ctx), o.color);
    }

    free(window);
    free(tokens);
    free(prompt);
    moas_sampler_free(smp);
    moas_context_free(ctx);
    moas_model_free(model);
    return interrupted ? 128 + SIGINT : 0;
}
