/*
 * team.c - the threads of one forward call (team.h).
 *
 * Owns: starting and stopping the team, posting a step, claiming and running its
 * slices, waiting for them. Does not own: what a step computes or how it splits its
 * work (forward.c).
 *
 * The protocol, with C11 atomics. Steps are numbered 1, 2, ... within a call. The
 * leader stores step k (fn, arg), sets `done` to 0 and stores k in `posted`
 * (release). A thread that sees `posted` reach k (acquire) claims slices: slice i is
 * claimed for step k by moving claim[i] from below k to k (compare-and-swap), so
 * exactly one thread runs it; it reads fn and arg, runs the slice, and increments
 * `done` (release). The leader returns from the step when `done` reaches nth
 * (acquire): every slice's writes then happen before what the leader does next.
 * A claim on step k can only succeed while step k is unfinished, so the leader
 * cannot have overwritten fn and arg by then; a thread still holding an older step
 * number fails every claim, since each slice's claim already holds k or more.
 */
#include "team.h"

#include <sched.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

/* Spins before a waiting thread starts giving its core away. Steps are microseconds
 * apart, so a worker normally waits well under this; yielding after it keeps a team
 * with more threads than free cores (or a leader inside a slow route callback) from
 * starving the threads it waits for. Yielding after 2^8 spins made prefill beside a
 * busy process 2-10x slower. */
#define MOAS_TEAM_SPINS (1u << 14)

static void team_wait(uint32_t *spins) {
    if (*spins < MOAS_TEAM_SPINS) {
        (*spins)++;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    } else {
        sched_yield();
    }
}

/* Claim slice i for step k and run it; false if another thread claimed it first or
 * step k is over. */
static bool team_take(moas_team *team, int32_t i, unsigned k) {
    unsigned seen = atomic_load_explicit(&team->claim[i], memory_order_relaxed);
    if (seen >= k || !atomic_compare_exchange_strong_explicit(&team->claim[i], &seen, k,
                                                              memory_order_acquire,
                                                              memory_order_relaxed)) {
        return false;
    }
    team->fn(team->arg, i, team->nth);
    atomic_fetch_add_explicit(&team->done, 1, memory_order_release);
    return true;
}

/* Every slice of step k this thread can still claim: slice `own` first, then the
 * others in order (those of a thread that has not come yet). */
static void team_take_all(moas_team *team, int32_t own, unsigned k) {
    team_take(team, own, k);
    for (int32_t i = 0; i < team->nth; i++) {
        if (i != own) {
            team_take(team, i, k);
        }
    }
}

void moas__team_run(moas_team *team, bool parallel, moas_step_fn fn, void *arg) {
    if (!parallel || team->nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    team->fn = fn;
    team->arg = arg;
    atomic_store_explicit(&team->done, 0, memory_order_relaxed);
    const unsigned k = atomic_load_explicit(&team->posted, memory_order_relaxed) + 1u;
    atomic_store_explicit(&team->posted, k, memory_order_release);
    team_take_all(team, 0, k);
    uint32_t spins = 0;
    while (atomic_load_explicit(&team->done, memory_order_acquire) < team->nth) {
        team_wait(&spins);
    }
}

#if defined(_OPENMP)
/* A worker: the slices it can claim of each step posted, until the leader posts
 * `stop`. It may miss steps the others finished without it; it joins the newest. */
static void team_work(moas_team *team, int32_t ith) {
    unsigned seen = 0;
    for (;;) {
        uint32_t spins = 0;
        unsigned k;
        while ((k = atomic_load_explicit(&team->posted, memory_order_acquire)) == seen) {
            team_wait(&spins);
        }
        seen = k;
        if (atomic_load_explicit(&team->stop, memory_order_relaxed)) {
            return;
        }
        team_take_all(team, ith, k);
    }
}
#endif

void moas__team_lead(moas_team *team, int32_t n_threads, void (*body)(void *), void *arg) {
    team->nth = 1;
    atomic_store_explicit(&team->stop, false, memory_order_relaxed);
    atomic_store_explicit(&team->posted, 0u, memory_order_relaxed);
    atomic_store_explicit(&team->done, 0, memory_order_relaxed);
#if defined(_OPENMP)
    if (n_threads > 1) {
        for (int32_t i = 0; i < n_threads && i < MOAS_MAX_THREADS; i++) {
            atomic_store_explicit(&team->claim[i], 0u, memory_order_relaxed);
        }
#pragma omp parallel num_threads(n_threads)
        {
            if (omp_get_thread_num() == 0) {
                team->nth = omp_get_num_threads();
                body(arg);
                atomic_store_explicit(&team->stop, true, memory_order_relaxed);
                atomic_fetch_add_explicit(&team->posted, 1u, memory_order_release);
            } else {
                team_work(team, omp_get_thread_num());
            }
        }
        team->nth = 1;
        return;
    }
#else
    (void)n_threads;
#endif
    body(arg);
}
