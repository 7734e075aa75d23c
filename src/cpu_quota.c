/*
 * cpu_quota.c - the CPU limit of the process's control group (cpu_quota.h).
 *
 * A container's CPU limit (docker --cpus, a Kubernetes CPU limit) is a CFS quota: so
 * much CPU time per period for all of the group's threads together. Threads beyond
 * quota / period only use the period's time up sooner and then wait, all of them, for
 * the next one, so the default thread count takes no more. A limit may sit on any
 * ancestor of the process's group; the tightest counts.
 *
 * Where the files are. /proc/self/cgroup names the process's group in each hierarchy:
 * "0::/path" for v2, "N:cpu,cpuacct:/path" for v1's cpu controller. Each line of
 * /proc/self/mountinfo gives a mount's root (the group it shows at its mount point:
 * "/" unless the mount or a cgroup namespace shows only a subtree), its mount point,
 * and after a "-" field its type and super options ("cgroup2"; "cgroup" with "cpu"
 * among the options). The group's directory is the mount point followed by the
 * group's path past the mount's root; a group outside that root is not visible there.
 *
 * Every read is bounded: a line of LINE_BYTES characters or more is skipped whole, a
 * path longer than PATH_BYTES is given up on, and anything unexpected means no limit.
 */
#include "cpu_quota.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if defined(__linux__)
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

#define LINE_BYTES 4096
#define PATH_BYTES 4096
#define MOUNT_FIELDS 64
#define QUOTA_CPUS_MAX 1000000   /* a bigger quota is as good as none */

/* One cgroup path of the process: v2's and v1's cpu hierarchy's. */
typedef struct {
    char v2[PATH_BYTES];
    char v1[PATH_BYTES];
} group_paths;

/* Plain reads, not stdio: the library allocates only through the caller's allocator,
 * and stdio would malloc its FILE and buffer. */

/* read(), retried when a signal interrupts it; -1 on error. */
static ssize_t read_some(int fd, char *buf, size_t n) {
    ssize_t got;
    do {
        got = read(fd, buf, n);
    } while (got < 0 && errno == EINTR);
    return got;
}

/* Read `path` whole into buf (NUL-terminated); false if it is missing, unreadable or
 * does not fit. */
static bool read_small(const char *path, char *buf, size_t cap) {
    const int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return false;
    }
    size_t n = 0;
    ssize_t got = 1;
    while (n < cap - 1 && (got = read_some(fd, buf + n, cap - 1 - n)) > 0) {
        n += (size_t)got;
    }
    char extra;
    const bool whole = got == 0 || (got > 0 && read_some(fd, &extra, 1) == 0);
    close(fd);
    buf[n] = '\0';
    return whole;
}

/* A file read line by line through a small buffer. */
typedef struct {
    int fd;
    size_t len, pos;   /* bytes in buf, the next one to hand out */
    char buf[512];
} line_reader;

static bool reader_open(line_reader *r, const char *path) {
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    r->len = r->pos = 0;
    return r->fd >= 0;
}

/* The next line into line (NUL-terminated, without its newline); a line of more than
 * cap - 1 characters is skipped whole. False at the end or on a read error. */
static bool next_line(line_reader *r, char *line, size_t cap) {
    size_t n = 0;
    bool too_long = false;
    for (;;) {
        if (r->pos == r->len) {
            const ssize_t got = read_some(r->fd, r->buf, sizeof r->buf);
            if (got <= 0) {   /* the end: a last line without its newline counts */
                line[n] = '\0';
                r->len = r->pos = 0;
                return n > 0 && !too_long && got == 0;
            }
            r->len = (size_t)got;
            r->pos = 0;
        }
        const char c = r->buf[r->pos++];
        if (c == '\n') {
            if (!too_long) {
                line[n] = '\0';
                return true;
            }
            n = 0;
            too_long = false;
        } else if (n + 1 < cap) {
            line[n++] = c;
        } else {
            too_long = true;
        }
    }
}

/* Whether the comma-separated list holds `name`. */
static bool has_token(const char *list, const char *name) {
    const size_t n = strlen(name);
    for (const char *p = list; *p != '\0';) {
        const char *end = strchr(p, ',');
        const size_t len = end != NULL ? (size_t)(end - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) {
            return true;
        }
        if (end == NULL) {
            break;
        }
        p = end + 1;
    }
    return false;
}

static void copy_path(char *dst, const char *src) {
    const size_t n = strlen(src);
    if (n < PATH_BYTES) {
        memcpy(dst, src, n + 1);
    }
}

/* The process's groups from /proc/self/cgroup; a path left "" was not found. */
static void read_groups(const char *root, group_paths *g) {
    g->v2[0] = g->v1[0] = '\0';
    char full[PATH_BYTES], line[LINE_BYTES];
    if ((size_t)snprintf(full, sizeof full, "%s/proc/self/cgroup", root) >= sizeof full) {
        return;
    }
    line_reader r;
    if (!reader_open(&r, full)) {
        return;
    }
    while (next_line(&r, line, sizeof line)) {
        char *c1 = strchr(line, ':');
        char *c2 = c1 != NULL ? strchr(c1 + 1, ':') : NULL;
        if (c2 == NULL || c2[1] != '/') {
            continue;
        }
        *c1 = *c2 = '\0';
        const char *id = line, *controllers = c1 + 1, *path = c2 + 1;
        if (strcmp(id, "0") == 0 && controllers[0] == '\0') {
            copy_path(g->v2, path);
        } else if (has_token(controllers, "cpu")) {
            copy_path(g->v1, path);
        }
    }
    close(r.fd);
}

/* mountinfo's escapes (\040 for a space, \011, \012, \134) undone in place. */
static void unescape(char *s) {
    char *out = s;
    for (const char *p = s; *p != '\0'; p++) {
        if (p[0] == '\\' && p[1] >= '0' && p[1] <= '3' && p[2] >= '0' && p[2] <= '7' &&
            p[3] >= '0' && p[3] <= '7') {
            *out++ = (char)((p[1] - '0') * 64 + (p[2] - '0') * 8 + (p[3] - '0'));
            p += 3;
        } else {
            *out++ = *p;
        }
    }
    *out = '\0';
}

/* The decimal number at s, `rest` after it; 0 if there is none or it is too long
 * (`rest` then s). */
static uint64_t parse_count(const char *s, const char **rest) {
    uint64_t v = 0;
    const char *p = s;
    *rest = s;
    while (*p >= '0' && *p <= '9') {
        if (v > UINT64_MAX / 10 - 10) {
            *rest = s;
            return 0;
        }
        v = v * 10 + (uint64_t)(*p - '0');
        p++;
    }
    *rest = p;
    return p == s ? 0 : v;
}

/* quota / period in CPUs, rounded up; 0 for none. */
static int32_t quota_cpus(uint64_t quota, uint64_t period) {
    if (quota == 0 || period == 0) {
        return 0;
    }
    const uint64_t cpus = quota / period + (quota % period != 0);
    return cpus > QUOTA_CPUS_MAX ? 0 : (int32_t)cpus;
}

/* A line that is the number alone (with or without its newline). */
static bool ends_line(const char *p) {
    return p[0] == '\0' || (p[0] == '\n' && p[1] == '\0');
}

/* The limit set in one group's directory, 0 for none: v2's cpu.max ("max PERIOD" or
 * "QUOTA PERIOD"), v1's cpu.cfs_quota_us (-1 for none) over cpu.cfs_period_us. */
static int32_t group_limit(const char *dir, bool v2) {
    char path[PATH_BYTES], text[64];
    const char *rest;
    if (v2) {
        if ((size_t)snprintf(path, sizeof path, "%s/cpu.max", dir) >= sizeof path ||
            !read_small(path, text, sizeof text)) {
            return 0;
        }
        const uint64_t quota = parse_count(text, &rest);
        if (quota == 0 || *rest != ' ') {
            return 0;   /* "max", or not a number */
        }
        const uint64_t period = parse_count(rest + 1, &rest);
        return ends_line(rest) ? quota_cpus(quota, period) : 0;
    }
    if ((size_t)snprintf(path, sizeof path, "%s/cpu.cfs_quota_us", dir) >= sizeof path ||
        !read_small(path, text, sizeof text)) {
        return 0;
    }
    const uint64_t quota = parse_count(text, &rest);   /* "-1" (no limit) is no count */
    if (!ends_line(rest)) {
        return 0;
    }
    if ((size_t)snprintf(path, sizeof path, "%s/cpu.cfs_period_us", dir) >= sizeof path ||
        !read_small(path, text, sizeof text)) {
        return 0;
    }
    const uint64_t period = parse_count(text, &rest);
    return ends_line(rest) ? quota_cpus(quota, period) : 0;
}

/* Whether `path` has a ".." step: a group outside the cgroup namespace's root, which
 * /proc/self/cgroup writes as "/../sibling" and no mount in the namespace shows. */
static bool climbs_out(const char *path) {
    for (const char *p = strstr(path, "/.."); p != NULL; p = strstr(p + 1, "/..")) {
        if (p[3] == '/' || p[3] == '\0') {
            return true;
        }
    }
    return false;
}

/* The tightest limit from group `path`'s directory under a mount (root-prefixed
 * mount point `mount_dir`, showing group `mount_root` there) up to the mount point;
 * 0 for none or a group the mount does not show. */
static int32_t limit_under(const char *mount_dir, const char *mount_root, const char *path,
                           bool v2) {
    const char *rel;
    const size_t root_len = strlen(mount_root);
    if (climbs_out(path) || climbs_out(mount_root)) {
        return 0;
    } else if (strcmp(mount_root, "/") == 0) {
        rel = path;
    } else if (strncmp(path, mount_root, root_len) == 0 &&
               (path[root_len] == '\0' || path[root_len] == '/')) {
        rel = path + root_len;
    } else {
        return 0;
    }
    if (strcmp(rel, "/") == 0) {
        rel = "";
    }
    char dir[PATH_BYTES];
    const int n = snprintf(dir, sizeof dir, "%s%s", mount_dir, rel);
    if (n < 0 || (size_t)n >= sizeof dir) {
        return 0;
    }
    const size_t floor = strlen(mount_dir);
    int32_t best = 0;
    for (;;) {
        const int32_t limit = group_limit(dir, v2);
        if (limit > 0 && (best == 0 || limit < best)) {
            best = limit;
        }
        char *slash = strlen(dir) > floor ? strrchr(dir + floor, '/') : NULL;
        if (slash == NULL) {
            return best;
        }
        *slash = '\0';
    }
}

int32_t moas__cpu_quota(const char *root) {
    group_paths g;
    read_groups(root, &g);
    if (g.v2[0] == '\0' && g.v1[0] == '\0') {
        return 0;
    }
    char full[PATH_BYTES], line[LINE_BYTES];
    if ((size_t)snprintf(full, sizeof full, "%s/proc/self/mountinfo", root) >= sizeof full) {
        return 0;
    }
    line_reader r;
    if (!reader_open(&r, full)) {
        return 0;
    }
    int32_t best = 0;
    while (next_line(&r, line, sizeof line)) {
        /* Fields are one space apart, and a mount's source may be empty (mount(2) given
         * ""): split at every space, so the super options stay the third field past
         * the dash. */
        char *field[MOUNT_FIELDS];
        int32_t n = 0, dash = -1;
        for (char *p = line; p != NULL && n < MOUNT_FIELDS; n++) {
            char *space = strchr(p, ' ');
            if (space != NULL) {
                *space = '\0';
            }
            if (dash < 0 && n >= 6 && strcmp(p, "-") == 0) {
                dash = n;
            }
            field[n] = p;
            p = space != NULL ? space + 1 : NULL;
        }
        if (dash < 0 || dash + 3 >= n || field[3][0] != '/' || field[4][0] != '/') {
            continue;   /* type, source and super options follow the dash; the mount's root
                           and point are absolute */
        }
        const char *type = field[dash + 1], *options = field[dash + 3];
        const bool is_v2 = strcmp(type, "cgroup2") == 0 && g.v2[0] != '\0';
        const bool is_v1 =
            strcmp(type, "cgroup") == 0 && has_token(options, "cpu") && g.v1[0] != '\0';
        if (!is_v2 && !is_v1) {
            continue;
        }
        unescape(field[3]);
        unescape(field[4]);
        char mount_dir[PATH_BYTES];
        const char *point = strcmp(field[4], "/") == 0 ? "" : field[4];
        if ((size_t)snprintf(mount_dir, sizeof mount_dir, "%s%s", root, point) >=
            sizeof mount_dir) {
            continue;
        }
        const int32_t limit = limit_under(mount_dir, field[3], is_v2 ? g.v2 : g.v1, is_v2);
        if (limit > 0 && (best == 0 || limit < best)) {
            best = limit;
        }
    }
    close(r.fd);
    return best;
}

#else

int32_t moas__cpu_quota(const char *root) {
    (void)root;
    return 0;
}

#endif
