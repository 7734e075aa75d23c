/*
 * team.h - the threads of one forward call: started once per call, handed each
 * parallel step by a shared counter instead of one OpenMP fork/join per step.
 *
 * A decoded token of a small model is dozens of parallel steps of microseconds each;
 * an OpenMP parallel region costs about 3 us to open and close on this project's
 * 2-core test machine, a posted step a fraction of that. The calling thread leads:
 * it runs the forward pass and, at each parallel step, posts the step, and every
 * thread then claims slices of it, its own first. A thread that is late (preempted by
 * another process, say) finds its slice done by the others instead of holding them.
 */
#ifndef MOAS_TEAM_H
#define MOAS_TEAM_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

/* Threads a team may have (and a context may use: each has its own attention
 * scratch). */
#define MOAS_MAX_THREADS 1024

/* One parallel step: slice ith of nth. Slices must write disjoint outputs, and what a
 * slice computes must depend only on (ith, nth), never on the thread running it. */
typedef void (*moas_step_fn)(void *arg, int32_t ith, int32_t nth);

typedef struct moas_team {
    /* the posted step: written by the leader before it posts, read by a thread only
     * once it holds a claim on one of the step's slices (which the leader cannot pass) */
    moas_step_fn fn;
    void *arg;
    int32_t nth;              /* threads and slices per step; 1 when no team started */
    atomic_bool stop;         /* set with the last `posted`: the workers leave */
    /* each counter on a cache line of its own (padding, not _Alignas: the struct lives
     * in calloc'd memory, which promises 16 bytes of alignment) */
    char pad0[64];
    atomic_uint posted;       /* steps posted so far: the current step's number */
    char pad1[64];
    atomic_int done;          /* slices of the current step finished */
    char pad2[64];
    atomic_int sleepers;      /* workers asleep on `posted` (or about to be): the leader
                               * wakes them when it posts, and only then */
    /* the leader's own, kept from call to call (a team lives as long as its context) */
    int64_t wait_ns;          /* this call: time the leader waited for others' slices */
    int32_t solo_left;        /* calls to run on the leader alone before a team again */
    int32_t solo_next;        /* solo calls after the next late team (4x, then a quarter) */
    bool never_solo;          /* tests: always run with the team, late or not, so that the
                               * parallel paths run whatever the machine's load */
    char pad3[64];
    atomic_uint claim[MOAS_MAX_THREADS];   /* the last step each slice was claimed for */
} moas_team;

/* Run body(arg) on the calling thread with a team of up to n_threads threads (fewer
 * when OpenMP gives fewer, as inside a caller's own parallel region; one without
 * OpenMP, or while team->solo_left says the last teams came late), which
 * moas__team_run can then use. */
void moas__team_lead(moas_team *team, int32_t n_threads, void (*body)(void *), void *arg);

/* After a call whose team came late, the next calls run on the leader alone, the
 * more of them the more often it happens: MOAS_TEAM_SOLO_MIN, 4 times that, ... up to
 * MOAS_TEAM_SOLO_MAX, a quarter as many again after each call whose team kept up.
 * Every late team costs its call up to a few scheduler time slices (milliseconds);
 * at the longest back-off one call in 1024 still tries the team, which costs a busy
 * machine a few percent and finds an idle one again within a second. */
#define MOAS_TEAM_SOLO_MIN 16
#define MOAS_TEAM_SOLO_MAX 1024

/* A team is late when the leader lost more than this waiting for it in one call... */
#define MOAS_TEAM_LATE_NS ((int64_t)10000)
/* ... and more than its own work divided by this. */
#define MOAS_TEAM_LATE_SHARE 4

/* Judge a call run with a team: the leader worked `busy_ns` and waited `lost_ns` for
 * the other threads (inside steps and for the team to end). Sets team->solo_left and
 * team->solo_next as above; returns whether the team was late. Thread counts never
 * change results, so this changes speed only. */
bool moas__team_judge(moas_team *team, int64_t busy_ns, int64_t lost_ns);

/* From the leader's body: fn(arg, ith, nth) for every ith of the team, each slice
 * once, on whichever thread claims it (its own thread unless that one is late);
 * returns when all slices are done. Outside a team, or when `parallel` is false,
 * fn(arg, 0, 1) on the calling thread. */
void moas__team_run(moas_team *team, bool parallel, moas_step_fn fn, void *arg);

#endif /* MOAS_TEAM_H */
