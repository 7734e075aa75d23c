/*
 * team.c - the threads of one forward call (team.h).
 *
 * Owns: starting and stopping the team, posting a step and waiting for it. Does not
 * own: what a step computes or how it splits its work (forward.c).
 *
 * The protocol, with C11 atomics: the leader stores the step, sets `running` to the
 * number of workers and increments `posted` (release); a worker that sees `posted`
 * change (acquire) runs its slice and decrements `running` (release); the leader,
 * having run slice 0, waits for `running` to reach 0 (acquire). So every write of a
 * step happens before the leader goes on, and the next step's stores cannot overtake
 * a worker still reading the last one.
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

void moas__team_run(moas_team *team, bool parallel, moas_step_fn fn, void *arg) {
    if (!parallel || team->nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    team->fn = fn;
    team->arg = arg;
    atomic_store_explicit(&team->running, team->nth - 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&team->posted, 1u, memory_order_release);
    fn(arg, 0, team->nth);
    uint32_t spins = 0;
    while (atomic_load_explicit(&team->running, memory_order_acquire) != 0) {
        team_wait(&spins);
    }
}

#if defined(_OPENMP)
/* A worker: every posted step until the leader posts `stop`. `posted` is 0 when the
 * team starts (moas__team_lead sets it before the region, which orders it first). */
static void team_work(moas_team *team, int32_t ith) {
    unsigned seen = 0;
    for (;;) {
        uint32_t spins = 0;
        unsigned now;
        while ((now = atomic_load_explicit(&team->posted, memory_order_acquire)) == seen) {
            team_wait(&spins);
        }
        seen = now;
        if (team->stop) {
            return;
        }
        team->fn(team->arg, ith, team->nth);
        atomic_fetch_sub_explicit(&team->running, 1, memory_order_release);
    }
}
#endif

void moas__team_lead(moas_team *team, int32_t n_threads, void (*body)(void *), void *arg) {
    team->nth = 1;
    team->stop = false;
    atomic_store_explicit(&team->posted, 0u, memory_order_relaxed);
    atomic_store_explicit(&team->running, 0, memory_order_relaxed);
#if defined(_OPENMP)
    if (n_threads > 1) {
#pragma omp parallel num_threads(n_threads)
        {
            if (omp_get_thread_num() == 0) {
                team->nth = omp_get_num_threads();
                body(arg);
                team->stop = true;
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
