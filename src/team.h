/*
 * team.h - the threads of a context's forward calls: the library's own, started with
 * the first call that wants them and kept until the workspace is freed, handed each
 * parallel step by a shared counter.
 *
 * A decoded token of a small model is dozens of parallel steps of microseconds each; a
 * posted step costs a fraction of a microsecond. The calling thread leads: it runs
 * the forward pass and, at each parallel step, posts the step, and every thread then
 * claims slices of it, its own first. A thread that is late (preempted by another
 * process, say) finds its slice done by the others instead of holding them. Between
 * calls the workers spin briefly, then sleep: the library decides how long its
 * threads wait, not a threading runtime's defaults.
 */
#ifndef MOAS_TEAM_H
#define MOAS_TEAM_H

#include <pthread.h>
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
    int32_t nth;              /* threads per step of the call under way; 1 outside a team
                               * call (the leader's own: workers read call_nth) */
    int32_t max_slices;       /* slices a step of this call may have (claim[] entries in
                               * use): MOAS_TEAM_SLICES_PER_THREAD nth, at most
                               * MOAS_MAX_THREADS */
    atomic_int n_slices;      /* the posted step's slices, nth to max_slices: stored by
                               * the leader before it posts; which slices to try for a
                               * thread before it claims, the step's count once it has;
                               * to the leader, the step before's when it posts */
    atomic_bool stop;         /* set with the last `posted` (moas__team_end): the workers
                               * leave */
    atomic_int call_nth;      /* nth of the call under way, stored before its first step:
                               * a worker numbered at or past it sits the call out */
    /* each counter on a cache line of its own (padding, not _Alignas: the struct lives
     * in calloc'd memory, which promises 16 bytes of alignment) */
    char pad0[64];
    atomic_uint posted;       /* steps posted so far: the current step's number */
    char pad1[64];
    atomic_int done;          /* slices of the current step finished */
    char pad2[64];
    atomic_int sleepers;      /* workers asleep on `posted` (or about to be): the leader
                               * wakes them when it posts, and only then */
    atomic_int leader_asleep; /* the leader sleeps on `done` (or is about to): whoever
                               * finishes a slice wakes it */
    /* the leader's own, kept from call to call (a team lives as long as its context) */
    int64_t wait_ns;          /* this call: time the leader waited for others' slices */
    int64_t saved_ns;         /* this call: what the others' slices would have cost the
                               * leader, at its own time per slice of the same step */
    int64_t gain_ns;          /* what the others saved a call beyond what the leader lost
                               * waiting, averaged over the calls not judged late (a
                               * call up to MOAS_TEAM_LATE_NS over counts as a loss) */
    int32_t solo_left;        /* calls to run on the leader alone before a team again */
    int32_t solo_scale;       /* how much longer the next back-off is: 4x after each late
                               * team, half after each team that kept up */
    bool never_solo;          /* tests: always run with the team, late or not, so that the
                               * parallel paths run whatever the machine's load */
    /* the leader alone against the team, for small calls (moas__team_compare_note) */
    int64_t call_work;        /* the next call's work, set by the caller before
                               * moas__team_lead: forward.c's block_wants_team measure (the
                               * widest product per token, or attention, times the tokens,
                               * plus the output head's rows: a fraction of the call's
                               * multiply-adds, the same for both ways); 0: unknown, never
                               * compared */
    int64_t best_rate[2];     /* ns per 1024 units of that work, [0] alone, [1] team:
                               * the lowest of the last group of calls run that way */
    int64_t group_rate;       /* the lowest of the group under way */
    int32_t group_n;          /* calls of that group so far */
    int32_t phase_left;       /* calls before the phase ends */
    int32_t exploit_len;      /* calls the faster way runs before the other is tried */
    bool alone;               /* small calls run on the leader alone (else with the team) */
    bool trial;               /* this phase tries the other way */
    /* the workers: the leader's bookkeeping (workers never read it) */
    int32_t n_workers;        /* started and not yet ended; each numbers itself from 1 */
    bool start_failed;        /* a thread could not be started: run with those there are */
    unsigned forks_seen;      /* the process's fork() count when they were started: a
                               * child has none of them, and must not join them */
    atomic_int numbered;      /* workers that took their number */
    atomic_uint start_posted; /* `posted` when the newest workers were started: the step
                               * each has seen as it begins */
    pthread_mutex_t sleep_lock;   /* where futexes do not exist (futex.h), workers sleep */
    pthread_cond_t sleep_cond;    /* on this pair; initialised with the first worker */
    char pad3[64];
    atomic_uint claim[MOAS_MAX_THREADS];   /* the last step each slice was claimed for */
    pthread_t threads[MOAS_MAX_THREADS - 1];
} moas_team;

/* Run body(arg) on the calling thread with a team of up to n_threads threads (fewer
 * when threads could not be started; one while team->solo_left says the last teams
 * came late, or when a small call's comparison says the leader alone is faster:
 * moas__team_compare_alone), which moas__team_run can then use. The first call that
 * wants more threads than the team has starts them (all signals blocked in them but
 * those of faults, so that the host's handlers run on its own threads); they stay, sleeping between
 * calls, until moas__team_end. A child of fork() starts threads of its own. team->call_work is the call's work for that comparison
 * (0: not compared). A team is zeroed memory before its first call. */
void moas__team_lead(moas_team *team, int32_t n_threads, void (*body)(void *), void *arg);

/* Stop and join the team's threads (none started: nothing to do). Not from inside
 * a call of the team. In a child of fork(), which has none of its parent's threads,
 * it only forgets them. The team may lead calls again afterwards. */
void moas__team_end(moas_team *team);

/* Spins before a worker that has no step sleeps (moas__team_lead). Steps of one
 * forward call follow each other within microseconds, which this covers, and so do
 * the calls of a decoding loop; between calls further apart, or behind a leader that
 * other processes slow, a worker sleeps instead of taking a core from them. */
#define MOAS_TEAM_SPINS_BEFORE_SLEEP (1u << 11)

/* Threads for n_threads = 0: the CPUs the calling thread may run on (its affinity mask
 * on Linux, the process's unless the thread changed it; else the CPUs online), no more
 * than its control group's CPU quota (cpu_quota.h), at most MOAS_MAX_THREADS; 1 when
 * that is unknown. */
int32_t moas__team_default_threads(void);

/* That rule: n_cpus, or quota_cpus when it is above 0 and fewer, within 1 ..
 * MOAS_MAX_THREADS. */
int32_t moas__team_threads_for(long n_cpus, int32_t quota_cpus);

/* A team is late when the leader lost more waiting for it in one call (inside steps
 * and for the team to end) than the others saved it, by more than this: the call ran
 * slower than the leader would have alone. What the others saved is estimated from
 * the leader's own time per slice in each step, so a team on an idle machine whose
 * last slice of a step ends a little after the leader's is not late, while one whose
 * thread another process preempted for a scheduler time slice is. */
#define MOAS_TEAM_LATE_NS ((int64_t)10000)

/* After a late call the next calls run on the leader alone, as many as teams that keep
 * up need to win back what it lost (its excess over the average gain of such a team),
 * times a scale that grows 4x with each late team and halves with each team that kept
 * up, up to MOAS_TEAM_SOLO_MAX calls. A rare hiccup thus costs about twice what it
 * lost, whatever the length of a call (a fixed count of solo calls cost GPT-2-sized
 * calls 30% on an idle machine); where another process keeps a core busy, a short
 * call's team gains tens of microseconds and a late one loses a scheduler time slice,
 * so the back-off soon reaches the most, where one call in 1025 still tries the team:
 * a few percent there, and an idle machine is found again within a second. */
#define MOAS_TEAM_SOLO_MAX 1024

/* Judge a call run with a team: the leader worked `busy_ns`, waited `lost_ns` for the
 * other threads, and they ran slices worth `saved_ns` of its time. Sets
 * team->solo_left, team->solo_scale and team->gain_ns as above (while that average is
 * not positive, as before any call kept up, the gain is taken as what this call's
 * others saved, or as half the leader's work when they saved nothing); returns
 * whether the team was late.
 * Thread counts never change results, so this changes speed only. */
bool moas__team_judge(moas_team *team, int64_t busy_ns, int64_t lost_ns, int64_t saved_ns);

/* A team can also cost more than it saves without ever being late: each parallel step
 * hands its inputs and outputs between cores, and where two vCPUs share no cache that
 * can cost more than splitting a step of a small model's decode saves (a cache line's
 * round trip between them took 342-352 ns in the slow minutes below; a step hands
 * several lines each way). Which way is faster changes with the host, even with its minute (the
 * 4-layer, 192-wide f16 model decoded one sequence at 1.34-1.44x its one-thread speed
 * with two threads on one Zen 5 host, and at 0.87-0.90x a few minutes later). So calls
 * of at most this much work (team->call_work: a token of a small model, not a
 * GPT-2-sized one) run the faster of the two ways as last measured: MOAS_TEAM_EXPLOIT_MIN calls
 * one way, then MOAS_TEAM_TRIAL_CALLS the other; each way's figure is the lowest time
 * per unit of work in its last group of MOAS_TEAM_TRIAL_CALLS calls (a call slowed by
 * a preemption or a cold start does not count), and the other way takes over when it
 * is at least 5% faster. While the same way stays faster, the calls before the next
 * trial double, up to MOAS_TEAM_EXPLOIT_MAX, so a trial of the slower way costs under
 * 1% of the calls. Larger calls always run with the team. */
#define MOAS_TEAM_COMPARE_MAX_WORK ((int64_t)1 << 21)
#define MOAS_TEAM_TRIAL_CALLS 4
#define MOAS_TEAM_EXPLOIT_MIN 16
#define MOAS_TEAM_EXPLOIT_MAX 512

/* Whether the next compared call runs on the leader alone. */
bool moas__team_compare_alone(const moas_team *team);

/* After a compared call that took `ns` for `work` (team->call_work), run the way
 * moas__team_compare_alone said: records it and moves the phases on as above. */
void moas__team_compare_note(moas_team *team, int64_t ns, int64_t work);

/* From the leader's body: fn(arg, ith, nth) for every ith of the team, each slice
 * once, on whichever thread claims it (its own thread unless that one is late);
 * returns when all slices are done. Outside a team, or when `parallel` is false,
 * fn(arg, 0, 1) on the calling thread. */
void moas__team_run(moas_team *team, bool parallel, moas_step_fn fn, void *arg);

/* A step may be cut into more slices than the team has threads, so that a thread that
 * runs slower than the other (a host that takes its vCPU away, or runs it at another
 * clock) leaves its last slices to the faster one instead of holding the step: each
 * thread takes its own share of the slices first, then the others' from their ends.
 * Only for steps whose slices are large enough that the smaller slices cost nothing
 * (forward.c says which), and whose scratch, if any, is one per slice, not one per
 * thread. */
#define MOAS_TEAM_SLICES_PER_THREAD 4

/* moas__team_run with the step cut into `n_slices` slices (clamped to [nth,
 * team->max_slices]): fn(arg, i, n) for every i of the n slices. */
void moas__team_run_slices(moas_team *team, bool parallel, moas_step_fn fn, void *arg,
                           int32_t n_slices);

#endif /* MOAS_TEAM_H */
