/*
 * team.h - the threads of one forward call: started once per call, handed each
 * parallel step by a shared counter instead of one OpenMP fork/join per step.
 *
 * A decoded token of a small model is dozens of parallel steps of microseconds each;
 * an OpenMP parallel region costs about 3 us to open and close on this project's
 * 2-core test machine, a posted step a fraction of that. The calling thread leads:
 * it runs the forward pass and, at each parallel step, posts the step, takes slice 0
 * itself and waits for the others; the other threads spin between steps.
 */
#ifndef MOAS_TEAM_H
#define MOAS_TEAM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* One parallel step: slice ith of nth. Slices must write disjoint outputs, and what a
 * slice computes must not depend on nth beyond which outputs it owns. */
typedef void (*moas_step_fn)(void *arg, int32_t ith, int32_t nth);

typedef struct moas_team {
    /* written by the leader, read by the workers after they see `posted` change */
    moas_step_fn fn;
    void *arg;
    bool stop;
    int32_t nth;              /* threads in the team; 1 when none was started */
    /* each counter on a cache line of its own: workers poll `posted` while others
     * count down `running` (padding, not _Alignas: the struct lives in calloc'd
     * memory, which promises 16 bytes of alignment) */
    char pad0[64];
    atomic_uint posted;       /* steps posted so far */
    char pad1[64];
    atomic_int running;       /* workers still in the posted step */
    char pad2[64];
} moas_team;

/* Run body(arg) on the calling thread with a team of up to n_threads threads (fewer
 * when OpenMP gives fewer, as inside a caller's own parallel region; one without
 * OpenMP), which moas__team_run can then use. */
void moas__team_lead(moas_team *team, int32_t n_threads, void (*body)(void *), void *arg);

/* From the leader's body: fn(arg, ith, nth) for every ith of the team, slice 0 on the
 * calling thread; returns when all slices are done. Outside a team, or when
 * `parallel` is false, fn(arg, 0, 1) on the calling thread. */
void moas__team_run(moas_team *team, bool parallel, moas_step_fn fn, void *arg);

#endif /* MOAS_TEAM_H */
