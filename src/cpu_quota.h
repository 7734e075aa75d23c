/*
 * cpu_quota.h - the CPUs a process's control group lets it keep busy: the default
 * thread count follows a container's CPU limit, not the host's CPU count.
 */
#ifndef MOAS_CPU_QUOTA_H
#define MOAS_CPU_QUOTA_H

#include <stdint.h>

/* The tightest CFS quota over the process's cgroup and its ancestors, in CPUs rounded
 * up (a quota of 1.5 CPUs is 2), from cgroup v2's cpu.max or v1's cpu.cfs_quota_us and
 * cpu.cfs_period_us; 0 when there is none or it cannot be read. `root` is prefixed to
 * every path read (/proc/self/cgroup, /proc/self/mountinfo and the group's files):
 * "" for the running system, a directory holding a made-up tree for tests. Reads a
 * few small files with open() and read(), allocating nothing. 0 off Linux. */
int32_t moas__cpu_quota(const char *root);

#endif
