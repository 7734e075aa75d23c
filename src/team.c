/*
 * team.c - the threads of one forward call (team.h).
 *
 * Owns: starting and stopping the team, posting a step, claiming and running its
 * slices, waiting for them. Does not own: what a step computes or how it splits its
 * work (forward.c).
 *
 * The threads. The calling thread leads; the others are the team's own, started by
 * the first call that wants them and kept, sleeping between calls, until
 * moas__team_end. A worker takes part in the steps of calls whose team size is above
 * its number, and sits the others out.
 *
 * The protocol, with C11 atomics. Steps are numbered 1, 2, ... for the team's life,
 * modulo 2^32 (step_reached), so a worker still on a step of an earlier call is one
 * more thread on an older step. The
 * leader stores step k (fn, arg), marks the slices it has beyond step k - 1's as
 * claimed for k - 1, stores its number of slices n (release), sets `done` to 0 and
 * stores k in `posted` (release). A thread that sees `posted` reach k (acquire) reads
 * n (acquire) and claims slices: slice i is claimed for step k by moving claim[i]
 * from below k to k (compare-and-swap), so exactly one thread runs it; it reads fn,
 * arg and n, runs the slice, and increments `done` (release). The leader returns
 * from the step when `done` reaches n (acquire): every slice's writes then happen
 * before what the leader does next. A claim on step k can only succeed while step k
 * is unfinished, so the leader cannot have overwritten fn, arg and n by then. A
 * thread still holding an older step number j fails every claim: the n it read is
 * that of step j or of a later step m, and each of m's slices then holds m - 1 >= j
 * or more (claimed in step m - 1, or marked when m was posted, which the acquire of
 * n makes visible).
 *
 * Waiting. A worker that finds no new step, within a call or between calls, spins
 * briefly, then sleeps on `posted`: it counts itself in `sleepers`, looks at `posted`
 * once more and sleeps only if it still holds the step it saw (on Linux a futex, whose
 * kernel checks that again atomically; elsewhere a condition variable, checked under
 * its mutex). The leader, after storing a new `posted`, wakes the sleepers if
 * `sleepers` is not 0 (taking that mutex to broadcast, where there is no futex); both
 * sides order these with sequentially consistent operations, so either the leader
 * sees the sleeper or the sleeper sees the step.
 * A sleeping worker gives its core to the leader or to other processes; the leader
 * never waits for it, since it claims whatever slices are left. Which thread runs a
 * slice never changes what the slice computes, so results are bit-for-bit the same.
 *
 * Late teams. The leader still waits for a thread that claimed a slice and was then
 * preempted (a call has no barrier at its end: a worker that comes after the last
 * step finds nothing to claim). On a machine whose cores other processes keep busy, that wait
 * can be whole scheduler time slices per token: two threads decoded 20-30x slower
 * than one there. So the leader times what it loses waiting and what the others'
 * slices saved it (at its own pace per slice), and after a call that lost more than
 * it saved runs the next calls alone, for as long as teams that keep up take to win
 * the loss back (moas__team_judge). A fixed fraction of the leader's work and 16 or
 * more solo calls was the first rule: memory-bound GPT-2-sized calls on an idle
 * machine crossed it now and then and ran 30% below a team that never judged.
 */
#if defined(__linux__)
#define _GNU_SOURCE   /* syscall() for futex.h; sched_getaffinity(), CPU_COUNT */
#endif

#include "team.h"
#include "cpu_quota.h"
#include "futex.h"

#include <sched.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

/* Spins before a waiting thread starts giving its core away. Steps are microseconds
 * apart, so a worker normally waits well under this; yielding after it keeps a team
 * with more threads than free cores (or a leader inside a slow route callback) from
 * starving the threads it waits for. Yielding after 2^8 spins made prefill beside a
 * busy process 2-10x slower. */
#define MOAS_TEAM_SPINS (1u << 14)

/* A worker's stack: a call needs up to about 48 KB (moas.h, THREADING); a few times
 * that, and address space only until touched. */
#define MOAS_TEAM_STACK_BYTES ((size_t)1 << 20)

/* Yields, after MOAS_TEAM_SPINS spins, before a leader waiting for a slice another
 * thread runs sleeps until it ends, where futexes exist: past about 0.8 ms (on the
 * 2-vCPU test host, idle: 2^14 pauses took 0.44-0.48 ms, 1,024 yields 0.31-0.32 ms) a
 * long slice (a long product, a worker preempted mid-slice) costs the leader's core
 * nothing, where it yielded in a loop for as long as the slice lasted. */
#define MOAS_TEAM_YIELDS_BEFORE_SLEEP (1u << 10)

/* The futex words are 32-bit atomic counters (`posted` and `done`). */
#if defined(MOAS_HAVE_FUTEX)
static void futex_wake_all(void *addr) {
    moas__futex_wake(addr, 0x7fffffff);
}
#endif

/* After storing a new `posted`: wake the workers that sleep on it, if any. */
static void team_wake(moas_team *team) {
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&team->sleepers, memory_order_seq_cst) > 0) {
#if defined(MOAS_HAVE_FUTEX)
        futex_wake_all(&team->posted);
#else
        pthread_mutex_lock(&team->sleep_lock);
        pthread_cond_broadcast(&team->sleep_cond);
        pthread_mutex_unlock(&team->sleep_lock);
#endif
    }
}

/* Whether step a is step b or a later one. Steps are numbered modulo 2^32 for the
 * team's life (a few a microsecond at most: the count wraps in an hour or more), so
 * this is right while no thread holds a step number 2^31 steps older than the newest,
 * that is while no worker stays stopped in mid-step for half an hour as its team runs
 * on. */
static bool step_reached(unsigned a, unsigned b) {
    return a - b < 0x80000000u;
}

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

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

bool moas__team_judge(moas_team *team, int64_t busy_ns, int64_t lost_ns, int64_t saved_ns) {
    const int64_t excess = lost_ns - saved_ns;
    if (excess <= MOAS_TEAM_LATE_NS) {
        team->gain_ns = team->gain_ns == 0 ? -excess : (3 * team->gain_ns - excess) / 4;
        team->solo_scale /= 2;
        return false;
    }
    int64_t gain = team->gain_ns > 0 ? team->gain_ns : saved_ns > 0 ? saved_ns : busy_ns / 2;
    gain = gain > 1000 ? gain : 1000;
    const int64_t scale = team->solo_scale > 1 ? team->solo_scale : 1;
    int64_t calls = (excess + gain - 1) / gain;
    calls = calls < MOAS_TEAM_SOLO_MAX / scale ? calls * scale : MOAS_TEAM_SOLO_MAX;
    team->solo_left = (int32_t)calls;
    team->solo_scale = (int32_t)(scale < MOAS_TEAM_SOLO_MAX / 4 ? 4 * scale
                                                                : MOAS_TEAM_SOLO_MAX);
    return true;
}

bool moas__team_compare_alone(const moas_team *team) {
    return team->trial ? !team->alone : team->alone;
}

void moas__team_compare_note(moas_team *team, int64_t ns, int64_t work) {
    if (team->exploit_len == 0) {   /* the first compared call: the team's phase begins */
        team->exploit_len = MOAS_TEAM_EXPLOIT_MIN;
        team->phase_left = MOAS_TEAM_EXPLOIT_MIN;
    }
    const int way = moas__team_compare_alone(team) ? 0 : 1;
    const int64_t rate = ns * 1024 / (work > 0 ? work : 1);
    team->group_rate = team->group_n == 0 || rate < team->group_rate ? rate : team->group_rate;
    if (++team->group_n == MOAS_TEAM_TRIAL_CALLS) {
        team->best_rate[way] = team->group_rate;
        team->group_n = 0;
    }
    if (--team->phase_left > 0) {
        return;
    }
    team->group_n = 0;
    if (!team->trial) {   /* the faster way's calls are over: try the other */
        team->trial = true;
        team->phase_left = MOAS_TEAM_TRIAL_CALLS;
        return;
    }
    team->trial = false;
    const int now = team->alone ? 0 : 1, other = 1 - now;
    if (team->best_rate[other] > 0 && team->best_rate[now] > 0 &&
        team->best_rate[other] * 20 <= team->best_rate[now] * 19) {
        team->alone = !team->alone;   /* the other way is 5% faster or more */
        team->exploit_len = MOAS_TEAM_EXPLOIT_MIN;
    } else if (team->exploit_len < MOAS_TEAM_EXPLOIT_MAX) {
        team->exploit_len *= 2;
    }
    team->phase_left = team->exploit_len;
}

/* Claim slice i for step k and run it; false if another thread claimed it first or
 * step k is over. */
static bool team_take(moas_team *team, int32_t i, unsigned k) {
    unsigned seen = atomic_load_explicit(&team->claim[i], memory_order_relaxed);
    if (step_reached(seen, k) || !atomic_compare_exchange_strong_explicit(&team->claim[i], &seen, k,
                                                              memory_order_acquire,
                                                              memory_order_relaxed)) {
        return false;
    }
    team->fn(team->arg, i, atomic_load_explicit(&team->n_slices, memory_order_acquire));
    atomic_fetch_add_explicit(&team->done, 1, memory_order_seq_cst);
#if defined(MOAS_HAVE_FUTEX)
    /* with the leader's store of leader_asleep and load of done (both seq_cst), either
     * it sees this slice done or this sees it asleep */
    if (atomic_load_explicit(&team->leader_asleep, memory_order_seq_cst)) {
        futex_wake_all(&team->done);
    }
#endif
    return true;
}

/* Every slice of step k this thread can still claim, of the step's n: its own share
 * of them first (thread `own` of the call's nth), then the other threads' shares from
 * their ends (the slices a thread that has not come yet, or runs slower, would reach
 * last). */
static int32_t team_take_all(moas_team *team, int32_t own, int32_t nth, unsigned k,
                             int32_t n) {
    int32_t taken = 0;
    for (int32_t i = own * n / nth; i < (own + 1) * n / nth; i++) {
        taken += team_take(team, i, k);
    }
    for (int32_t j = 1; j < nth; j++) {
        const int32_t other = (own + j) % nth;
        for (int32_t i = (other + 1) * n / nth - 1; i >= other * n / nth; i--) {
            taken += team_take(team, i, k);
        }
    }
    return taken;
}

void moas__team_run(moas_team *team, bool parallel, moas_step_fn fn, void *arg) {
    moas__team_run_slices(team, parallel, fn, arg, team->nth);
}

void moas__team_run_slices(moas_team *team, bool parallel, moas_step_fn fn, void *arg,
                           int32_t n_slices) {
    if (!parallel || team->nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    const int32_t n = n_slices < team->nth          ? team->nth
                      : n_slices > team->max_slices ? team->max_slices
                                                    : n_slices;
    team->fn = fn;
    team->arg = arg;
    const unsigned k = atomic_load_explicit(&team->posted, memory_order_relaxed) + 1u;
    /* the slices this step has beyond the last step's count as claimed for that step,
     * so that a thread still on it, or on an older one, that reads this step's count
     * claims none of them (the protocol above); only a step with more slices than the
     * one before writes them, so that steps of one size touch no claim but their own.
     * The first step of a call is no different: the count is the last call's last
     * step's, and its claims hold that step's number or later. */
    for (int32_t i = atomic_load_explicit(&team->n_slices, memory_order_relaxed); i < n; i++) {
        atomic_store_explicit(&team->claim[i], k - 1u, memory_order_relaxed);
    }
    atomic_store_explicit(&team->n_slices, n, memory_order_release);
    atomic_store_explicit(&team->done, 0, memory_order_relaxed);
    atomic_store_explicit(&team->posted, k, memory_order_seq_cst);
    team_wake(team);
    const int64_t t0 = now_ns();
    const int32_t taken = team_take_all(team, 0, team->nth, k, n);
    const int64_t t1 = now_ns();
    if (taken > 0) {   /* the others' slices, at the leader's time per slice */
        team->saved_ns += (int64_t)(n - taken) * (t1 - t0) / taken;
    }
    if (atomic_load_explicit(&team->done, memory_order_acquire) < n) {
        /* another thread still runs a slice it claimed */
        uint32_t spins = 0;
#if defined(MOAS_HAVE_FUTEX)
        uint32_t yields = 0;   /* before the leader sleeps */
#endif
        int done;
        while ((done = atomic_load_explicit(&team->done, memory_order_acquire)) < n) {
#if defined(MOAS_HAVE_FUTEX)
            if (spins >= MOAS_TEAM_SPINS && yields++ >= MOAS_TEAM_YIELDS_BEFORE_SLEEP) {
                atomic_store_explicit(&team->leader_asleep, 1, memory_order_seq_cst);
                if (atomic_load_explicit(&team->done, memory_order_seq_cst) == done) {
                    moas__futex_wait(&team->done, (unsigned)done);
                }
                atomic_store_explicit(&team->leader_asleep, 0, memory_order_relaxed);
                continue;
            }
#endif
            team_wait(&spins);
        }
        const int64_t waited = now_ns() - t1;
        team->wait_ns += waited;
        if (taken == 0) {   /* the others ran every slice: the wait was their work */
            team->saved_ns += waited;
        }
    }
}

/* A worker: the slices it can claim of each step posted, until moas__team_end. It may
 * miss steps the others finished without it; it joins the newest. */
static void *team_work(void *arg) {
    moas_team *team = arg;
    const int32_t ith = atomic_fetch_add_explicit(&team->numbered, 1, memory_order_relaxed) + 1;
    /* the step posted when the leader started it, not when it runs: a thread may first
     * run after the call and the end that follow, and must not take the end's post
     * for the step it has seen */
    unsigned seen = atomic_load_explicit(&team->start_posted, memory_order_relaxed);
    for (;;) {
        uint32_t spins = 0;
        unsigned k;
        while ((k = atomic_load_explicit(&team->posted, memory_order_acquire)) == seen) {
            if (spins >= MOAS_TEAM_SPINS_BEFORE_SLEEP) {
                atomic_fetch_add_explicit(&team->sleepers, 1, memory_order_seq_cst);
#if defined(MOAS_HAVE_FUTEX)
                if (atomic_load_explicit(&team->posted, memory_order_seq_cst) == seen) {
                    moas__futex_wait(&team->posted, seen);
                }
#else
                pthread_mutex_lock(&team->sleep_lock);
                while (atomic_load_explicit(&team->posted, memory_order_seq_cst) == seen) {
                    pthread_cond_wait(&team->sleep_cond, &team->sleep_lock);
                }
                pthread_mutex_unlock(&team->sleep_lock);
#endif
                atomic_fetch_sub_explicit(&team->sleepers, 1, memory_order_relaxed);
                spins = 0;
                continue;
            }
            team_wait(&spins);
        }
        seen = k;
        if (atomic_load_explicit(&team->stop, memory_order_relaxed)) {
            return NULL;
        }
        /* the call's size and the step's slices: posted k was seen (acquire), so these
         * are step k's or, if the leader has posted another step since, a later one's;
         * the count is read with acquire, so that that step's marks are seen too and
         * every claim for k then fails */
        const int32_t nth = atomic_load_explicit(&team->call_nth, memory_order_relaxed);
        if (ith < nth) {
            team_take_all(team, ith, nth, k,
                          atomic_load_explicit(&team->n_slices, memory_order_acquire));
        }
    }
}

/* Forks of this process since the library first started a thread, counted by a
 * pthread_atfork() handler in each child (one comparison a call, where getpid() is a
 * system call: a microsecond on the test host, 1-2% of a small model's token). glibc
 * drops the handler when the library is unloaded; should registering it fail, a child
 * takes its parent's workers for its own, and its calls run on the leader alone. */
static atomic_uint forks;
static pthread_once_t forks_counted = PTHREAD_ONCE_INIT;

static void count_fork(void) {
    atomic_fetch_add_explicit(&forks, 1u, memory_order_relaxed);
}

static void count_forks(void) {
    (void)pthread_atfork(NULL, NULL, count_fork);
}

/* Start workers until the team has n_threads threads, or until one fails to start;
 * returns the team's size. Signals are blocked in the workers (they inherit the mask
 * at creation), so that a signal for the process reaches one of its own threads; but
 * not those a fault raises, which go to the faulting thread: blocked, POSIX leaves
 * them undefined, and Linux kills the process without running the host's handler. */
static int32_t team_start(moas_team *team, int32_t n_threads) {
    pthread_once(&forks_counted, count_forks);
    if (team->n_workers > 0 &&
        team->forks_seen != atomic_load_explicit(&forks, memory_order_relaxed)) {
        /* a child of fork(): the parent's workers are not here, and their sleeping pair
         * may have been copied held; forget them and start the child's own */
        team->n_workers = 0;
        team->start_failed = false;
    }
    if (team->n_workers + 1 >= n_threads || team->start_failed) {
        return team->n_workers + 1 < n_threads ? team->n_workers + 1 : n_threads;
    }
    if (team->n_workers == 0) {   /* the sleeping pair exists exactly while workers do */
        atomic_store_explicit(&team->stop, false, memory_order_relaxed);
        atomic_store_explicit(&team->numbered, 0, memory_order_relaxed);
        atomic_store_explicit(&team->sleepers, 0, memory_order_relaxed);   /* a fork's */
        team->forks_seen = atomic_load_explicit(&forks, memory_order_relaxed);
#if !defined(MOAS_HAVE_FUTEX)
        if (pthread_mutex_init(&team->sleep_lock, NULL) != 0) {
            team->start_failed = true;
            return 1;
        }
        if (pthread_cond_init(&team->sleep_cond, NULL) != 0) {
            pthread_mutex_destroy(&team->sleep_lock);
            team->start_failed = true;
            return 1;
        }
#endif
    }
    atomic_store_explicit(&team->start_posted,
                          atomic_load_explicit(&team->posted, memory_order_relaxed),
                          memory_order_relaxed);
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    const bool masked = pthread_sigmask(SIG_SETMASK, &all, &old) == 0;
    /* a stack of its own size: the C library's default follows `ulimit -s`, which may
     * be below what a call needs (moas.h, THREADING) */
    pthread_attr_t attr;
    const bool sized = pthread_attr_init(&attr) == 0;
    if (sized) {
        (void)pthread_attr_setstacksize(&attr, MOAS_TEAM_STACK_BYTES);
    }
    while (team->n_workers + 1 < n_threads) {
        if (pthread_create(&team->threads[team->n_workers], sized ? &attr : NULL, team_work,
                           team) != 0) {
            team->start_failed = true;
            break;
        }
        team->n_workers++;
    }
    if (sized) {
        pthread_attr_destroy(&attr);
    }
    if (masked) {
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
#if !defined(MOAS_HAVE_FUTEX)
    if (team->n_workers == 0) {
        pthread_cond_destroy(&team->sleep_cond);
        pthread_mutex_destroy(&team->sleep_lock);
    }
#endif
    return team->n_workers + 1;
}

void moas__team_end(moas_team *team) {
    if (team->n_workers == 0) {
        return;
    }
    if (team->forks_seen == atomic_load_explicit(&forks, memory_order_relaxed)) {
        atomic_store_explicit(&team->stop, true, memory_order_relaxed);
        atomic_fetch_add_explicit(&team->posted, 1u, memory_order_seq_cst);
        team_wake(team);
        for (int32_t i = 0; i < team->n_workers; i++) {
            pthread_join(team->threads[i], NULL);
        }
#if !defined(MOAS_HAVE_FUTEX)
        pthread_cond_destroy(&team->sleep_cond);
        pthread_mutex_destroy(&team->sleep_lock);
#endif
    }
    team->n_workers = 0;
    team->start_failed = false;
}

int32_t moas__team_threads_for(long n_cpus, int32_t quota_cpus) {
    long n = n_cpus;
    if (quota_cpus > 0 && quota_cpus < n) {
        n = quota_cpus;
    }
    return n < 1 ? 1 : n > MOAS_MAX_THREADS ? MOAS_MAX_THREADS : (int32_t)n;
}

/* The cgroup's CPU quota, read again at most once a second. Reading it opens a few
 * files under /proc and /sys, tens of microseconds, where the rest of making a context
 * in a pool takes about one. A thread that finds the reading stale reads it again;
 * two at once both read, and the one that stores last stands for the next second. */
#define QUOTA_READ_EVERY_NS 1000000000
static int32_t cpu_quota_now(void) {
    static _Atomic int64_t read_at = INT64_MIN;
    static atomic_int quota;
    const int64_t t = now_ns();
    const int64_t at = atomic_load_explicit(&read_at, memory_order_acquire);
    if (at != INT64_MIN && t - at < QUOTA_READ_EVERY_NS) {
        return atomic_load_explicit(&quota, memory_order_relaxed);
    }
    const int32_t q = moas__cpu_quota("");
    atomic_store_explicit(&quota, q, memory_order_relaxed);
    atomic_store_explicit(&read_at, t, memory_order_release);
    return q;
}

int32_t moas__team_default_threads(void) {
    long n = 0;
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        n = CPU_COUNT(&set);
    }
#endif
#if defined(_SC_NPROCESSORS_ONLN)
    if (n < 1) {
        n = sysconf(_SC_NPROCESSORS_ONLN);
    }
#endif
    return moas__team_threads_for(n, cpu_quota_now());
}

void moas__team_lead(moas_team *team, int32_t n_threads, void (*body)(void *), void *arg) {
    team->nth = 1;
    atomic_store_explicit(&team->leader_asleep, 0, memory_order_relaxed);
    const bool compared = n_threads > 1 && !team->never_solo && team->call_work > 0 &&
                          team->call_work <= MOAS_TEAM_COMPARE_MAX_WORK;
    int32_t size = 1;
    if (n_threads > 1 && team->solo_left > 0 && !team->never_solo) {
        team->solo_left--;   /* the last teams came late: this call runs alone */
    } else if (compared && moas__team_compare_alone(team)) {
        const int64_t start = now_ns();
        body(arg);
        moas__team_compare_note(team, now_ns() - start, team->call_work);
        return;
    } else if (n_threads > 1 && (size = team_start(team, n_threads)) > 1) {
        team->nth = size;
        team->max_slices = MOAS_TEAM_SLICES_PER_THREAD * size < MOAS_MAX_THREADS
                               ? MOAS_TEAM_SLICES_PER_THREAD * size
                               : MOAS_MAX_THREADS;
        atomic_store_explicit(&team->call_nth, size, memory_order_relaxed);
        team->wait_ns = 0;
        team->saved_ns = 0;
        const int64_t start = now_ns();
        body(arg);
        const int64_t end = now_ns();
        /* what the leader lost: its waits inside steps */
        moas__team_judge(team, (end - start) - team->wait_ns, team->wait_ns, team->saved_ns);
        if (compared) {
            moas__team_compare_note(team, end - start, team->call_work);
        }
        team->nth = 1;
        return;
    }
    body(arg);
}
