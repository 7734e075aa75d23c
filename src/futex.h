/*
 * futex.h - sleeping on a 32-bit atomic word until another thread changes it (Linux's
 * futex), for the library's threads that may wait longer than a spin should last:
 * the team's idle workers and its leader (team.c), a thread waiting for a pool's
 * lock (kv_cache.c).
 *
 * Where futexes do not exist MOAS_HAVE_FUTEX is not defined and callers yield or
 * use a condition variable instead; -DMOAS_NO_FUTEX builds that way on Linux too, so
 * that the tests run those paths. A file that includes this one on Linux must be built with
 * _DEFAULT_SOURCE (for syscall()) defined before any system header.
 */
#ifndef MOAS_FUTEX_H
#define MOAS_FUTEX_H

#if defined(__linux__) && !defined(MOAS_NO_FUTEX)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MOAS_HAVE_FUTEX 1

/* Sleeps while *addr holds `seen`: returns at once if it no longer does (the kernel
 * checks atomically with going to sleep), and may return spuriously, so callers
 * look again. */
static inline void moas__futex_wait(void *addr, unsigned seen) {
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
}

/* Wakes up to n threads sleeping on addr. */
static inline void moas__futex_wake(void *addr, int n) {
    syscall(SYS_futex, (unsigned *)addr, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}
#endif

#endif
