/* test_cpu_quota.c - the control group's CPU limit that bounds the default thread
 * count, read from made-up /proc and /sys trees in a temporary directory: each case's
 * files as cgroup v2 and v1 write them, and the limit worked out by hand. */
#define _GNU_SOURCE   /* mkdtemp(), nftw() */

#include "test.h"
#include "cpu_quota.h"
#include "team.h"

#include <ftw.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

#if defined(__linux__)

typedef struct {
    char root[64];
} fake_tree;

static bool tree_make(fake_tree *t) {
    snprintf(t->root, sizeof t->root, "/tmp/moas_cgroup_XXXXXX");
    return mkdtemp(t->root) != NULL;
}

/* Write `text` to root + rel, making its directories. */
static bool put(const fake_tree *t, const char *rel, const char *text) {
    char path[512];
    snprintf(path, sizeof path, "%s%s", t->root, rel);
    for (char *p = path + strlen(t->root) + 1; *p != '\0'; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(path, 0700);
            *p = '/';
        }
    }
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        return false;
    }
    fputs(text, f);
    return fclose(f) == 0;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void tree_remove(const fake_tree *t) {
    nftw(t->root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* The limit of a tree made of `n` (path, text) pairs. -1 if the tree could not be
 * written. */
static int32_t quota_of(const char *const *files, int n) {
    fake_tree t;
    if (!tree_make(&t)) {
        return -1;
    }
    bool ok = true;
    for (int i = 0; i < n; i++) {
        ok = ok && put(&t, files[2 * i], files[2 * i + 1]);
    }
    const int32_t q = ok ? moas__cpu_quota(t.root) : -1;
    tree_remove(&t);
    return q;
}

#define MOUNT_ROOT_FS "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
#define MOUNT_V2 "30 22 0:27 / /sys/fs/cgroup rw,nosuid,nodev shared:4 - cgroup2 cgroup2 rw\n"
#define MOUNT_V1_CPU                                                                     \
    "31 30 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:8 - cgroup cgroup "       \
    "rw,cpu,cpuacct\n"
#define MOUNT_V1_MEMORY \
    "32 30 0:29 / /sys/fs/cgroup/memory rw,nosuid shared:9 - cgroup cgroup rw,memory\n"

/* cgroup v2: a quota rounds up to whole CPUs, and the tightest of the group's and its
 * ancestors' counts; the hierarchy's root directory is looked at too. */
TEST(cpu_quota_v2_takes_the_tightest_level_rounded_up) {
    static const struct {
        const char *root, *pod, *ctr;
        int32_t want;
    } cases[] = {
        {"max 100000\n", "max 100000\n", "250000 100000\n", 3},   /* 2.5 CPUs: 3 */
        {"max 100000\n", "250000 100000\n", "max 100000\n", 3},   /* on an ancestor */
        {"max 100000\n", "250000 100000\n", "150000 100000\n", 2},
        {"100000 100000\n", "250000 100000\n", "150000 100000\n", 1},   /* at the top */
        {"max 100000\n", "max 100000\n", "200000 100000\n", 2},   /* exact: not 3 */
        {"max 100000\n", "max 100000\n", "50000 100000", 1},      /* no newline */
        {"max 100000\n", "max 100000\n", "max 100000\n", 0},      /* no limit */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *files[] = {
            "/proc/self/cgroup", "0::/kubepods/pod1/ctr\n",
            "/proc/self/mountinfo", MOUNT_ROOT_FS MOUNT_V2,
            "/sys/fs/cgroup/cpu.max", cases[i].root,
            "/sys/fs/cgroup/kubepods/pod1/cpu.max", cases[i].pod,
            "/sys/fs/cgroup/kubepods/pod1/ctr/cpu.max", cases[i].ctr,
        };
        ASSERT_EQ(quota_of(files, 5), cases[i].want);
    }
    return TEST_PASS;
}

/* cgroup v1: the cpu controller's hierarchy (mounted with cpuacct here) beside a
 * memory one, quota over period; -1 is no limit. */
TEST(cpu_quota_v1_reads_the_cpu_hierarchy) {
    static const struct {
        const char *quota, *period;
        int32_t want;
    } cases[] = {
        {"50000\n", "100000\n", 1},
        {"400000\n", "100000\n", 4},
        {"450000\n", "100000\n", 5},
        {"-1\n", "100000\n", 0},
        {"50000\n", "0\n", 0},
        {"50000\n", "x\n", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *files[] = {
            "/proc/self/cgroup", "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
            "/proc/self/mountinfo", MOUNT_ROOT_FS MOUNT_V1_MEMORY MOUNT_V1_CPU,
            "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", cases[i].quota,
            "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us", cases[i].period,
            /* the memory hierarchy's files are not the cpu controller's */
            "/sys/fs/cgroup/memory/docker/abc/cpu.cfs_quota_us", "10000\n",
            "/sys/fs/cgroup/memory/docker/abc/cpu.cfs_period_us", "100000\n",
        };
        ASSERT_EQ(quota_of(files, 6), cases[i].want);
    }
    return TEST_PASS;
}

/* Both hierarchies (a hybrid system): the tighter limit. */
TEST(cpu_quota_of_v1_and_v2_together_is_the_tighter) {
    const char *files[] = {
        "/proc/self/cgroup", "4:cpu,cpuacct:/a\n0::/b\n",
        "/proc/self/mountinfo", MOUNT_ROOT_FS MOUNT_V2 MOUNT_V1_CPU,
        "/sys/fs/cgroup/b/cpu.max", "300000 100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/a/cpu.cfs_quota_us", "200000\n",
        "/sys/fs/cgroup/cpu,cpuacct/a/cpu.cfs_period_us", "100000\n",
    };
    ASSERT_EQ(quota_of(files, 5), 2);
    return TEST_PASS;
}

/* A mount that shows only a subtree (a cgroup namespace, a container's bind mount):
 * the group's directory is the mount point plus the path past the mount's root, and
 * a group outside that root, or one whose name only begins like it, is not there. */
TEST(cpu_quota_follows_a_mount_of_a_subtree) {
    static const struct {
        const char *group;
        int32_t want;
    } cases[] = {
        {"0::/docker/abc\n", 3},
        {"0::/docker/abc/inner\n", 2},
        {"0::/docker/abcd\n", 0},
        {"0::/other\n", 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *files[] = {
            "/proc/self/cgroup", cases[i].group,
            "/proc/self/mountinfo",
            MOUNT_ROOT_FS "30 22 0:27 /docker/abc /sys/fs/cgroup rw shared:4 - cgroup2 "
                          "cgroup2 rw\n",
            "/sys/fs/cgroup/cpu.max", "300000 100000\n",
            "/sys/fs/cgroup/inner/cpu.max", "200000 100000\n",
            /* what "abcd" would read were it taken for "abc" + "d" */
            "/sys/fs/cgroupd/cpu.max", "100000 100000\n",
        };
        ASSERT_EQ(quota_of(files, 5), cases[i].want);
    }
    return TEST_PASS;
}

/* mountinfo writes a space in a path as \040. */
TEST(cpu_quota_reads_escaped_mount_points) {
    const char *files[] = {
        "/proc/self/cgroup", "0::/g\n",
        "/proc/self/mountinfo",
        "30 22 0:27 / /sys/fs/my\\040cgroup rw shared:4 - cgroup2 cgroup2 rw\n",
        "/sys/fs/my cgroup/g/cpu.max", "100000 100000\n",
    };
    ASSERT_EQ(quota_of(files, 3), 1);
    return TEST_PASS;
}

/* A mount's root is escaped like its mount point, and a group's name may hold a space,
 * which /proc/self/cgroup writes as it is. */
TEST(cpu_quota_reads_an_escaped_mount_root) {
    const char *files[] = {
        "/proc/self/cgroup", "0::/my group/ctr\n",
        "/proc/self/mountinfo",
        "30 22 0:27 /my\\040group /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw\n",
        "/sys/fs/cgroup/ctr/cpu.max", "100000 100000\n",
    };
    ASSERT_EQ(quota_of(files, 3), 1);
    return TEST_PASS;
}

/* A mount's source may be empty (mount(2) given ""): mountinfo then writes two spaces
 * in a row, and the super options are still the field after it. */
TEST(cpu_quota_reads_a_mount_with_an_empty_source) {
    const char *v2[] = {
        "/proc/self/cgroup", "0::/g\n",
        "/proc/self/mountinfo", "30 22 0:27 / /sys/fs/cgroup rw shared:4 - cgroup2  rw\n",
        "/sys/fs/cgroup/g/cpu.max", "100000 100000\n",
    };
    ASSERT_EQ(quota_of(v2, 3), 1);
    const char *v1[] = {
        "/proc/self/cgroup", "4:cpu,cpuacct:/g\n",
        "/proc/self/mountinfo",
        "31 22 0:28 / /sys/fs/cgroup/cpu rw shared:8 - cgroup  rw,cpu,cpuacct\n",
        "/sys/fs/cgroup/cpu/g/cpu.cfs_quota_us", "200000\n",
        "/sys/fs/cgroup/cpu/g/cpu.cfs_period_us", "100000\n",
    };
    ASSERT_EQ(quota_of(v1, 4), 2);
    return TEST_PASS;
}

/* A process outside its cgroup namespace's root has a path that climbs out of it
 * ("/../sibling"): its group and the groups above it are not under the mount, and the
 * namespace root's limit is not its own. */
TEST(cpu_quota_of_a_group_outside_the_namespace_is_none) {
    const char *files[] = {
        "/proc/self/cgroup", "0::/../sibling\n",
        "/proc/self/mountinfo", MOUNT_V2,
        "/sys/fs/cgroup/cpu.max", "100000 100000\n",
        "/sys/fs/sibling/cpu.max", "200000 100000\n",
    };
    ASSERT_EQ(quota_of(files, 4), 0);
    return TEST_PASS;
}

/* Where each file of a v2 tree of group /g sits in a quota_of() list. */
enum { GROUP_FILE = 1, MOUNT_FILE = 3, CPU_MAX_FILE = 5 };

/* Each of `texts` in place of one file (`slot`) of a v2 tree that, as it is, limits
 * group /g to one CPU: the index of the first text that still gives a limit, or -1. */
static int first_with_a_limit(const char *const *texts, size_t n, int slot) {
    for (size_t i = 0; i < n; i++) {
        const char *files[] = {
            "/proc/self/cgroup", "0::/g\n",
            "/proc/self/mountinfo", MOUNT_V2,
            "/sys/fs/cgroup/g/cpu.max", "100000 100000\n",
        };
        files[slot] = texts[i];
        if (quota_of(files, 3) != 0) {
            return (int)i;
        }
    }
    return -1;
}

/* Text that is not what the kernel writes means no limit, never a guess, and a line
 * too long to read is skipped without losing the lines after it. */
TEST(cpu_quota_of_malformed_files_is_none) {
    static const char *const good_cpu_max[] = {"100000 100000\n"};
    ASSERT_EQ(first_with_a_limit(good_cpu_max, 1, CPU_MAX_FILE), 0);   /* the tree as it is */
    static const char *const bad_cpu_max[] = {
        "", "max", "abc\n", "100000\n", "0 100000\n", "100000 0\n", "-5 100000\n",
        "100000 100000 7\n", "100000  100000\n", "99999999999999999999999 1\n",
        "100000 100000\nx", "200000000000 1\n" /* 2e11 CPUs: as good as none */,
    };
    ASSERT_EQ(first_with_a_limit(bad_cpu_max, sizeof bad_cpu_max / sizeof bad_cpu_max[0],
                                 CPU_MAX_FILE), -1);
    static const char *const bad_group[] = {
        "", "0::\n", "0:/g\n", "g\n", "0::g\n", "1:cpuset:/g\n", "0:cpu:/g\n",
    };
    ASSERT_EQ(first_with_a_limit(bad_group, sizeof bad_group / sizeof bad_group[0],
                                 GROUP_FILE), -1);
    static const char *const bad_mount[] = {
        "",
        "30 22 0:27 / /sys/fs/cgroup rw shared:4 cgroup2 cgroup2 rw\n",   /* no dash */
        "30 22 0:27 / /sys/fs/cgroup rw shared:4 - cgroup2\n",           /* cut short */
        "30 22 0:27 / rw - cgroup2 cgroup2 rw\n",                        /* a field short */
        "30 22 0:27  /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",          /* no root */
        "30 22 0:27 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n",
    };
    ASSERT_EQ(first_with_a_limit(bad_mount, sizeof bad_mount / sizeof bad_mount[0],
                                 MOUNT_FILE), -1);
    /* A line longer than the reader's 4,096 bytes, then the real mount. The long one
     * ends in what would read as a mount of a decoy hierarchy were the line cut where
     * the buffer ends and its tail taken for a line. */
    static char long_lines[4096 + 256];
    memset(long_lines, 'x', 4094);
    long_lines[4094] = ' ';   /* the buffer's 4,095 characters end here */
    snprintf(long_lines + 4095, sizeof long_lines - 4095,
             "30 22 0:27 / /decoy rw shared:4 - cgroup2 cgroup2 rw\n%s", MOUNT_V2);
    const char *files[] = {
        "/proc/self/cgroup", "0::/g\n",
        "/proc/self/mountinfo", long_lines,
        "/sys/fs/cgroup/g/cpu.max", "200000 100000\n",
        "/decoy/g/cpu.max", "100000 100000\n",
    };
    ASSERT_EQ(quota_of(files, 4), 2);
    /* and with nothing there at all */
    const char *none[] = {"/empty", ""};
    ASSERT_EQ(quota_of(none, 1), 0);
    return TEST_PASS;
}

#else /* cgroups are Linux's */

#define CGROUP_SKIP(name_)                              \
    TEST(name_) {                                       \
        return test_skip("cgroups exist only on Linux"); \
    }
CGROUP_SKIP(cpu_quota_v2_takes_the_tightest_level_rounded_up)
CGROUP_SKIP(cpu_quota_v1_reads_the_cpu_hierarchy)
CGROUP_SKIP(cpu_quota_of_v1_and_v2_together_is_the_tighter)
CGROUP_SKIP(cpu_quota_follows_a_mount_of_a_subtree)
CGROUP_SKIP(cpu_quota_reads_escaped_mount_points)
CGROUP_SKIP(cpu_quota_reads_an_escaped_mount_root)
CGROUP_SKIP(cpu_quota_reads_a_mount_with_an_empty_source)
CGROUP_SKIP(cpu_quota_of_a_group_outside_the_namespace_is_none)
CGROUP_SKIP(cpu_quota_of_malformed_files_is_none)

#endif

/* The default thread count: the CPUs, or the quota where it is fewer. */
TEST(default_threads_take_the_cpu_quota_when_fewer) {
    ASSERT_EQ(moas__team_threads_for(8, 0), 8);
    ASSERT_EQ(moas__team_threads_for(8, 2), 2);
    ASSERT_EQ(moas__team_threads_for(2, 8), 2);
    ASSERT_EQ(moas__team_threads_for(0, 0), 1);
    ASSERT_EQ(moas__team_threads_for(0, 3), 1);
    ASSERT_EQ(moas__team_threads_for(5000, 0), MOAS_MAX_THREADS);
    ASSERT_EQ(moas__team_threads_for(5000, 1500), MOAS_MAX_THREADS);
    return TEST_PASS;
}
