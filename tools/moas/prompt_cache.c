/*
 * prompt_cache.c - `moas generate --prompt-cache FILE`: a prompt's decoded state kept in
 * a file, so that the next run with the same prompt, or one that starts the same way,
 * decodes only what is new (llama.cpp's --prompt-cache).
 *
 * The file (docs/FORMAT.md, "Prompt cache"): the tokens the state holds, then the state
 * as moas_context_state_save() writes it. The tokens are ours to keep: the state holds
 * keys and values, not the ids they came from, and the prompt is matched against them.
 */
#include "cli.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CACHE_MAGIC0 0x53414f4du   /* "MOAS" */
#define CACHE_MAGIC1 0x544d5250u   /* "PRMT" */
#define CACHE_VERSION 2u          /* 1 had no checksum */
#define CACHE_HEADER 20            /* magic, version, forced scheme, n_tokens: 5 u32 */
#define CACHE_TRAILER 8            /* the checksum: FNV-1a (64-bit) of the bytes before */

/* FNV-1a (64-bit): a state's keys, values and logits are not checked by the library
 * (only its shape is), so a flipped bit loaded as it was and changed the text, or
 * made every logit NaN. */
static uint64_t checksum(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * 0x100000001b3ull;
    }
    return h;
}

static uint32_t get_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* The file's tokens and state, or the reason it cannot be used (a sentence for "not
 * used: ..."). Returns NULL when it can be used. */
static const char *parse_cache(const unsigned char *buf, size_t len, int forced,
                               uint32_t *n_tokens, const unsigned char **state,
                               size_t *state_len) {
    static char why[96];
    if (len < CACHE_HEADER + 8 + CACHE_TRAILER) {
        return "it is truncated";
    }
    if (get_u32(buf + 8) != CACHE_VERSION) {
        return "it is of another version of the format";
    }
    len -= CACHE_TRAILER;   /* the sizes first: a cut file is said to be cut */
    *n_tokens = get_u32(buf + 16);
    if ((uint64_t)*n_tokens * 4 > len - CACHE_HEADER - 8) {
        return "it is truncated";
    }
    const unsigned char *p = buf + CACHE_HEADER + (size_t)*n_tokens * 4;
    const uint64_t n_state = (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
    if (n_state != (uint64_t)(len - (size_t)(p + 8 - buf))) {
        return n_state > (uint64_t)(len - (size_t)(p + 8 - buf)) ? "it is truncated"
                                                                  : "it has bytes after its end";
    }
    const uint64_t sum = (uint64_t)get_u32(buf + len) | (uint64_t)get_u32(buf + len + 4) << 32;
    if (checksum(buf, len) != sum) {
        return "it is damaged (its checksum does not match its bytes)";
    }
    /* a forced scheme is the context's, not the state's: the state would load, and its
     * keys and values be those of the other setting */
    if ((int32_t)get_u32(buf + 12) < -1) {   /* not "without": no run writes that */
        snprintf(why, sizeof why, "its forced scheme %d is not a scheme",
                 (int)(int32_t)get_u32(buf + 12));
        return why;
    }
    if ((int32_t)get_u32(buf + 12) != forced) {
        const int32_t made = (int32_t)get_u32(buf + 12);
        char was[32] = "without --force-scheme", is[32] = "without it";
        if (made >= 0) {
            snprintf(was, sizeof was, "with --force-scheme %d", made);
        }
        if (forced >= 0) {
            snprintf(is, sizeof is, "with --force-scheme %d", forced);
        }
        snprintf(why, sizeof why, "it was made %s, this run is %s", was, is);
        return why;
    }
    *state = p + 8;
    *state_len = (size_t)n_state;
    return NULL;
}

int32_t prompt_cache_load(const char *path, moas_context *ctx, int forced,
                          const int32_t *window, int32_t n_window, const char *when) {
    /* only a file can be a cache: a directory would read as empty, a FIFO would block,
     * and a device such as /dev/null would read as empty and then be renamed over */
    struct stat file;
    if (stat(path, &file) == 0 && !S_ISREG(file.st_mode)) {
        die("'%s' is not a moas prompt cache: it is %s, not a file; it is neither read nor "
            "written over (name a file)", path,
            S_ISDIR(file.st_mode)    ? "a directory"
            : S_ISFIFO(file.st_mode) ? "a FIFO"
                                     : "a device or a socket");
    }
    /* how the notes end: when this run writes the cache, if it does */
    const char *written = when == NULL ? "" : ": it is written ";
    const char *anew = when == NULL ? "" : "; it is written anew ";
    when = when == NULL ? "" : when;
    FILE *f = fopen(path, "rb");
    if (f == NULL && errno == ENOENT) {
        fprintf(stderr, "moas: prompt cache '%s' does not exist yet%s%s\n", path,
                *when == '\0' ? " (--prompt-cache-ro: it is not written)" : written, when);
        return 0;
    }
    if (f == NULL) {
        die("cannot open the prompt cache '%s': %s", path, strerror(errno));
    }
    /* the magic first: a file of something else is not read whole */
    unsigned char head[8];
    const size_t got = fread(head, 1, sizeof head, f);
    if (got == 0) {   /* an empty file (mktemp's) holds nothing to lose */
        fclose(f);
        fprintf(stderr, "moas: prompt cache '%s' is empty%s%s\n", path, written, when);
        return 0;
    }
    if (got < sizeof head || get_u32(head) != CACHE_MAGIC0 || get_u32(head + 4) != CACHE_MAGIC1) {
        fclose(f);
        die("'%s' is not a moas prompt cache: it is neither read nor written over (remove it "
            "or name another file)", path);
    }
    /* the rest through the same handle: the bytes parsed are those of the file whose
     * magic was checked (opening the path again would find whatever a concurrent run
     * renamed there since, and read_text takes "-" for stdin) */
    struct stat opened;
    if (fstat(fileno(f), &opened) != 0) {
        die("cannot read the prompt cache '%s': %s", path, strerror(errno));
    }
    size_t len = opened.st_size > (off_t)sizeof head ? (size_t)opened.st_size : sizeof head;
    unsigned char *buf = malloc(len);
    if (buf == NULL) {
        die("out of memory reading the prompt cache '%s' (%zu bytes)", path, len);
    }
    memcpy(buf, head, sizeof head);
    len = sizeof head + fread(buf + sizeof head, 1, len - sizeof head, f);
    if (ferror(f)) {
        die("cannot read the prompt cache '%s': %s", path, strerror(errno));
    }
    fclose(f);

    const unsigned char *state = NULL;
    uint32_t n_cached = 0;
    size_t state_len = 0;
    const char *why = parse_cache(buf, len, forced, &n_cached, &state, &state_len);
    if (why == NULL) {
        const moas_status st = moas_context_state_load(ctx, state, state_len);
        if (st != MOAS_OK) {
            /* another model, mode, KV type or context length, mostly: the library's
             * message says which */
            why = moas_last_error()[0] != '\0' ? moas_last_error() : moas_status_string(st);
        } else if ((uint32_t)moas_context_n_past(ctx) != n_cached) {
            moas_context_reset(ctx);
            why = "its tokens and its state disagree";
        }
    }
    if (why != NULL) {
        fprintf(stderr, "moas: prompt cache '%s' not used: %s%s%s\n", path, why, anew, when);
        free(buf);
        return 0;
    }

    int32_t same = 0;
    while (same < n_window && (uint32_t)same < n_cached &&
           (int32_t)get_u32(buf + CACHE_HEADER + (size_t)same * 4) == window[same]) {
        same++;
    }
    /* the whole prompt, and nothing more, with its last logits: nothing to decode;
     * otherwise at least the prompt's last token is decoded again, for its logits */
    int32_t keep = same;
    if (!(same == n_window && (uint32_t)same == n_cached && moas_context_logits(ctx) != NULL) &&
        keep == n_window) {
        keep = n_window - 1;
    }
    if ((uint32_t)keep < n_cached) {   /* (a truncate to n_past would drop the logits) */
        check(moas_context_truncate(ctx, keep), "prompt cache");
    }
    free(buf);
    if (keep == n_window) {
        fprintf(stderr, "moas: prompt cache '%s': the prompt's %d tokens are all there, none "
                "decoded\n", path, n_window);
    } else {
        fprintf(stderr, "moas: prompt cache '%s': %d of the prompt's %d tokens reused, %d "
                "decoded\n", path, keep, n_window, n_window - keep);
    }
    return keep;
}

/* The file that `path` names through its symbolic links, to be written in its place: a
 * cache kept elsewhere behind a link is updated there, the link left as it is (a rename
 * onto the link itself would replace it). A string to free. */
static char *link_target(const char *path) {
    char *name = strdup(path);
    for (int hop = 0; name != NULL && hop < 40; hop++) {   /* 40: the kernel's own limit */
        struct stat file;
        char target[4096];
        if (lstat(name, &file) != 0 || !S_ISLNK(file.st_mode)) {
            return name;
        }
        const ssize_t n = readlink(name, target, sizeof target - 1);
        if (n < 0 || (size_t)n == sizeof target - 1) {
            return name;   /* unreadable or too long: the link itself, as before */
        }
        target[n] = '\0';
        const char *slash = strrchr(name, '/');
        /* a relative target is relative to the link's directory */
        const size_t dir = target[0] == '/' || slash == NULL ? 0 : (size_t)(slash - name) + 1;
        char *next = malloc(dir + (size_t)n + 1);
        if (next != NULL) {
            memcpy(next, name, dir);
            memcpy(next + dir, target, (size_t)n + 1);
        }
        free(name);
        name = next;
    }
    if (name == NULL) {
        die("out of memory writing the prompt cache");
    }
    return name;
}

void prompt_cache_save(const char *path, const moas_context *ctx, int forced,
                       const int32_t *window, int32_t n_window) {
    /* written whole to a file beside it, then renamed over it: a reader, or a run
     * stopped halfway, never sees half a cache */
    size_t n_state = 0;
    const moas_status st = moas_context_state_save(ctx, NULL, 0, &n_state);
    if (st != MOAS_ERR_BUFFER_TOO_SMALL && st != MOAS_OK) {
        check(st, "prompt cache");
    }
    const size_t len = CACHE_HEADER + (size_t)n_window * 4 + 8 + n_state + CACHE_TRAILER;
    unsigned char *buf = malloc(len);
    char *file = link_target(path);
    char *tmp = malloc(strlen(file) + 8);
    if (buf == NULL || tmp == NULL) {
        die("out of memory writing the prompt cache");
    }
    put_u32(buf, CACHE_MAGIC0);
    put_u32(buf + 4, CACHE_MAGIC1);
    put_u32(buf + 8, CACHE_VERSION);
    put_u32(buf + 12, (uint32_t)forced);
    put_u32(buf + 16, (uint32_t)n_window);
    for (int32_t i = 0; i < n_window; i++) {
        put_u32(buf + CACHE_HEADER + (size_t)i * 4, (uint32_t)window[i]);
    }
    unsigned char *p = buf + CACHE_HEADER + (size_t)n_window * 4;
    put_u32(p, (uint32_t)n_state);
    put_u32(p + 4, (uint32_t)((uint64_t)n_state >> 32));
    size_t written = 0;
    check(moas_context_state_save(ctx, p + 8, n_state, &written), "prompt cache");
    const uint64_t sum = checksum(buf, len - CACHE_TRAILER);
    put_u32(buf + len - CACHE_TRAILER, (uint32_t)sum);
    put_u32(buf + len - CACHE_TRAILER + 4, (uint32_t)(sum >> 32));

    sprintf(tmp, "%s.XXXXXX", file);
    /* mkstemp's file is private (0600); the cache keeps the permissions of the one it
     * replaces, or a new file's (0666 less the umask), as a plain fopen would give it */
    struct stat old;
    const mode_t mask = umask(0);
    umask(mask);
    const mode_t mode = stat(file, &old) == 0 ? old.st_mode & 07777 : 0666 & ~mask;
    const int fd = mkstemp(tmp);
    FILE *f = fd < 0 || fchmod(fd, mode) != 0 ? NULL : fdopen(fd, "wb");
    const char *failed = NULL;
    if (f == NULL) {
        failed = strerror(errno);
        if (fd >= 0) {
            close(fd);
        }
    } else {
        /* on the disk before the rename: after a crash the path holds the old cache or
         * the new one, not a renamed file whose bytes never arrived */
        const int bad = fwrite(buf, 1, len, f) != len || fflush(f) != 0 || fsync(fd) != 0;
        const int err = errno;
        if (fclose(f) != 0 || bad) {
            failed = strerror(bad ? err : errno);
        } else if (rename(tmp, file) != 0) {
            failed = strerror(errno);
        }
    }
    if (failed != NULL) {
        if (fd >= 0) {
            unlink(tmp);
        }
        fprintf(stderr, "%smoas: cannot write the prompt cache '%s': %s\n", cli_note_start(),
                path, failed);
    } else {
        fprintf(stderr, "%smoas: prompt cache '%s': %d tokens saved (%zu bytes)\n",
                cli_note_start(), path, n_window, len);
    }
    free(tmp);
    free(file);
    free(buf);
}
