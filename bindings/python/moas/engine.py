"""moas.engine - continuous batching over a KV pool, for moas.server and, at the end of
this file, Model.generate_batch (many prompts offline).

One thread (Engine._run) owns every library object but the Model: it admits requests
between steps, and each step advances every active sequence with ONE Pool.decode call:
a chunk of prompt for sequences still reading theirs, the token sampled last for the
others. Requests talk to it through Engine.submit() and Engine.cancel() (any thread)
and receive events through a callback: each request's `emit`, called from the engine
thread, or, with a `deliver` hook, all of one step's events in one call of the hook,
which then calls `emit` wherever it likes (the server: once per step on its event
loop, as one wake-up per event cost more than the step's decode).

Policy (docs/SERVING.md):
  * A request is admitted when a sequence slot is free (max_sequences), no sequence is
    swapped out, and the pool's free pages hold its prompt at the widest scheme (MHA in
    routed mode, all schemes in mixture mode, the forced one if any) plus two
    pages per stream and headroom. Otherwise it waits in a bounded queue (max_queue);
    a full queue, or a wait longer than queue_timeout, ends it with 503. The requests
    of one prompt list (a group) count as one against max_queue, and once one of them
    is admitted the others wait for room without a time limit: their client is being
    served, and they would otherwise be turned away behind their own list.
  * Pages are taken as tokens need them (a routed token takes only its scheme's heads).
    A step that does not fit (ERR_POOL_FULL; nothing changed) swaps the youngest
    sequence out to host memory (Context.save_state), closes its context and retries
    without it; swapped sequences come back first (load_state) when pages free up,
    and new requests wait meanwhile. Nothing a client has received is ever redone.
  * Context shift (context_shift, RoPE models): a sequence whose context is full
    makes room before its next token as `moas generate` and Model.generate do: its
    first 4 tokens stay, half of the rest is dropped and the later half moves down,
    keys turned back, nothing decoded again. A request may then ask for more tokens
    than the context holds. A shift copies pages it shares (forks, cached prompts); a
    shift that does not fit is a step that does not fit (below). A shifted sequence
    is not kept in the prompt cache: its keys are no longer those of its tokens read
    from the start.
  * n > 1: the prompt is read once into one context, then forked (Context.fork): the
    n sequences share its pages copy on write; choice i samples with seed + i.
  * A sequence's context is closed, its pages back in the pool, at the first step
    boundary after its request ends: finished, cancelled, or its client gone.
  * Prompt cache (prompt_cache > 0): the first choice of a request that finished keeps
    its context (prompt and generated tokens) in a cache of that many entries, least
    recently used first out. A later request whose prompt begins with an entry's tokens
    forks the entry (full pages shared), truncates the fork to the common prefix and
    reads only the rest of its prompt: a conversation's next turn, or a shared
    instruction, is not read again. The text is the same bits as without the cache.
    Entries give their pages back whenever the pool needs them (admission, a fork, a
    step that does not fit, a swapped sequence coming back) before anything else. A
    request matches only entries of its own cache_scope (the server's cache_salt), so
    that usage's cached_tokens cannot tell one tenant another's prompt. With
    steer_below there is no cache: its pages would make the pool steer sooner. A
    request that scores its prompt (echo with logprobs) reads all of it, as every
    prompt token's logits are needed, and takes nothing from the cache.
"""

import collections
import contextlib
import ctypes
import gc
import heapq
import itertools
import math
import queue
import random
import threading
import time

from . import MoasError, Pool, Sampler, Status, _int, _stop_list, find_stop

Event = collections.namedtuple("Event", "kind data")
# kinds: "admitted" None | "prompt" None, or the prompt's logprob entries (echo: sent
#        once, when the prompt is read, before any text; the first entry is None) |
#        "text" (index, text, route or None, logprob or None) |
#        "finish" (index, finish_reason, n_generated) | "done" usage dict |
#        "error" (http_status, message, code)


class Request:
    """One completion request: its prompt (token ids), n, sampling and stop rules."""

    _ids = itertools.count(1)

    def __init__(self, prompt_ids, *, max_tokens, n=1, temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0, repeat_penalty=1.0, repeat_last_n=64, logit_bias=None, seed=None,
                 stop=(), min_tokens=0, include_stop=False, routes=False, logprobs=None,
                 cache_scope=None, emit=None,
                 frequency_penalty=0.0, presence_penalty=0.0, echo=False, group=None):
        self.id = next(Request._ids)
        # the requests of one prompt list share a list of them (None: a request alone)
        self.group = group
        self.prompt_ids = list(prompt_ids)
        self.max_tokens, self.n = max_tokens, n
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                             logit_bias=logit_bias, frequency_penalty=frequency_penalty,
                             presence_penalty=presence_penalty)
        self.seed = random.getrandbits(63) if seed is None else seed
        self.stop = list(stop)
        # stop strings are looked for only after the first min_tokens generated
        # characters (sent as they come), so that a text has at least that many before
        # one; include_stop: the stop string that ends the text is sent too
        self.min_tokens, self.include_stop = min_tokens, include_stop
        self.routes = routes
        self.logprobs = logprobs   # None, or how many of the likeliest tokens to report
        self.echo = echo           # a "prompt" event when the prompt is read
        # echo with logprobs scores the prompt too: every prompt token's logits, so none
        # of its tokens may come from the prompt cache
        self.prompt_logprobs = echo and logprobs is not None
        # the prompt cache matches only entries of the same scope (a tenant's salt):
        # cached_tokens would otherwise tell a client another one's prompt and text
        self.cache_scope = cache_scope
        self.keep = True           # its first context may enter the prompt cache when done
        self.emit = emit or (lambda event: None)
        self.cancelled = False
        self.ended = False         # its "done" or "error" was sent: nothing comes after
        self.created = time.monotonic()
        self.queued = False        # an admission pass found no room: it waits
        self.admitted = False
        self.seqs = []
        self.forked = False        # its n - 1 forks made (they count as slots before)
        self.n_open = 0
        self.completion_tokens = 0
        self.cached_tokens = 0     # prompt tokens taken from the prompt cache


class Seq:
    """One choice of a request: a context in the pool, its sampler and its text."""

    _born = itertools.count()

    def __init__(self, req, index):
        self.req, self.index = req, index
        self.born = next(Seq._born)
        self.ctx = None
        self.sampler = None
        self.prefill = 0           # prompt tokens read so far (the parent only)
        self.pending = None        # the token sampled last, decoded by the next step
        self.logits = None         # a copy of the last logits (for the forks' first token)
        self.n_gen = 0
        self.generated = []        # tokens decoded into ctx after the prompt
        self.counted = None        # scheme counts of a cached prefix, not this sequence's
        self.pending_lp = None     # the pending token's logprob entry (token_logprobs)
        self.prompt_lps = []       # prompt tokens 1.. their entries (Request.prompt_logprobs)
        self.held, self.held_routes, self.held_lps = "", [], []
        self.saved = None          # bytes of a swapped-out sequence
        self.swap_mark = 0         # contexts closed when it was swapped out
        self.done = False


# held: the entry's kv_bytes_held, fixed while it is cached (forks copy what they write)
CacheEntry = collections.namedtuple("CacheEntry", "tokens ctx scope held")


def token_logprobs(logits, token, k):
    """(log p(token), [(id, log p) of the k likeliest, likeliest first, then `token`
    when it is not among them]) under the model's own distribution: the softmax of the
    raw logits, before temperature, penalties, bias or filters. The chosen token is
    always in the list, as OpenAI's and vLLM's top_logprobs have it."""
    top = max(logits)
    norm = top + math.log(math.fsum(math.exp(x - top) for x in logits))
    likeliest = heapq.nlargest(k, range(len(logits)), key=logits.__getitem__) if k else []
    if token not in likeliest:
        likeliest.append(token)
    return logits[token] - norm, [(t, logits[t] - norm) for t in likeliest]


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    def __init__(self, model, *, pool_bytes, mode="mixture", max_sequences=64, max_queue=64,
                 queue_timeout=30.0, prefill_chunk=32, step_prefill=64, n_threads=0,
                 page_heads=0, kv_type="f32", headroom=0.02, step_delay=0.0,
                 steer_below=0.0, forced_scheme=-1, prompt_cache=8, context_shift=False,
                 n_ctx=0, deliver=None, commit=True):
        self.model = model
        self.deliver = deliver
        self._outbox = []                        # (request, event) of this step, for deliver
        self.mode = mode
        self.max_sequences, self.max_queue = max_sequences, max_queue
        self.queue_timeout = queue_timeout
        self.prefill_chunk, self.step_prefill = prefill_chunk, step_prefill
        self.step_delay = step_delay
        # with steering, pages held by cached prompts would make the pool look fuller
        # and change routing: no cache then
        self.prompt_cache = prompt_cache if steer_below <= 0 else 0
        self._cache = collections.OrderedDict()   # id -> CacheEntry, least recent first
        self._cache_ids = itertools.count()
        # the cache as the engine thread last saw it (snapshot() must not walk it)
        self.cache_entries = self.cache_tokens = 0
        self.cache_bytes_held = 0                # pages the entries hold, a shared one in each
        # commit: a server's memory resident from the start (its RSS then stays flat);
        # generate_batch's pool takes memory only as pages are first used
        self.pool = Pool(model, pool_bytes, kv_type=kv_type, page_heads=page_heads,
                         n_threads=n_threads, steer_below=steer_below, commit=commit)
        self.forced_scheme = forced_scheme
        self.n_ctx = n_ctx   # 0: the trained length, until the probe says
        self.token_texts = model.vocab
        with self._context() as probe:
            self.n_ctx = probe.n_ctx
            # a token's most: every scheme's heads in mixture mode; in routed mode the
            # widest scheme's (MHA), or the forced scheme's when one is (steering only
            # takes cheaper ones)
            if mode == "mixture":
                self.token_bytes = probe.kv_token_bytes(-1)
            elif forced_scheme >= 0:
                self.token_bytes = probe.kv_token_bytes(forced_scheme)
            else:
                self.token_bytes = max(probe.kv_token_bytes(s)
                                       for s in range(model.n_scheme))
        # (tokens kept, tokens dropped) of a context shift, as Model.generate's
        self.shift = None
        if context_shift:
            sink = 4 if self.n_ctx >= 16 else 0
            self.shift = (sink, (self.n_ctx - sink) // 2)
            rope = ("moas.position_encoding" in model.meta_keys()
                    and model.meta("moas.position_encoding") == "rope")
            if not rope or self.shift[1] == 0:
                self.pool.close()
                raise MoasError(Status.ERR_INVALID_ARG, "context shift needs a model with "
                                "RoPE positions and a context of 2 tokens or more (this "
                                "one has %s)" % ("a context of 1" if rope
                                                 else "learned positions"))
        st = self.pool.stats()
        self.page_bytes = st.page_bytes
        streams = model.n_layer * (model.n_scheme if mode == "mixture" else 1)
        self.slack_bytes = 2 * streams * st.page_bytes
        self.headroom_bytes = int(headroom * st.bytes_capacity)
        self._lock = threading.Condition()
        self._incoming = collections.deque()     # submitted, not yet seen by the loop
        self._waiting = collections.deque()      # seen, waiting for admission
        self._active = []                        # Seq with a context
        self._swapped = []                       # Seq swapped out (saved state)
        self._requests = {}                      # id -> Request with open sequences
        self._clears = []                        # (event, result) of clear_cache calls
        self._stop = False
        self._busy = False                       # had work since it last went idle
        self._collected = 0.0                    # time of the last _collect()
        self.stats = st
        self.counters = collections.Counter()
        self.scheme_tokens = [0] * model.n_scheme
        self._rate = collections.deque()          # (time, tokens) of recent steps
        self.peak_bytes_held = 0
        self.peak_active = 0
        self._n_closed = 0                       # contexts closed: pages given back
        self._close_on_exit = False              # close() came on the engine thread
        self._thread = threading.Thread(target=self._run, name="moas-engine", daemon=True)
        self._thread.start()

    # ---- any thread --------------------------------------------------------------------

    def submit(self, req):
        """Hand a request to the engine; False (and nothing queued) when max_queue
        requests already wait for room, or the engine has stopped. A request that
        finds room at the next admission pass never counts as waiting."""
        with self._lock:
            # behind a waiting request a new one waits too (first come, first served), so
            # a full queue turns it away now; an empty one lets the next pass decide. The
            # prompts of the request's own list already waiting are not ahead of it.
            waiting = len({self._queue_unit(r) for r in self._waiting
                           if r.queued and not self._served(r)} - {self._queue_unit(req)})
            if self._stop or waiting >= max(1, self.max_queue):
                return False
            self._incoming.append(req)
            self._lock.notify()
        return True

    def cancel(self, req):
        """The request is over for its client: close its sequences at the next step."""
        with self._lock:
            req.cancelled = True
            self._lock.notify()

    def fits(self, req):
        """Whether the request, every token at the widest scheme, fits the empty pool:
        then a request alone in the pool always finishes. Its n sequences share the
        prompt's pages (forks), and each has its own tokens and slack; one swapped out
        and back holds its prompt alone, which n = 1's bound covers."""
        tokens = len(req.prompt_ids) + req.n * req.max_tokens
        if self.shift and len(req.prompt_ids) + req.max_tokens > self.n_ctx:
            tokens = req.n * self.n_ctx   # each shifts, its shared pages copied
        need = tokens * self.token_bytes + req.n * self.slack_bytes
        return need <= self.stats.bytes_capacity

    def snapshot(self):
        with self._lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._rate if now - t <= 10.0]
            tokens = sum(n for _, n in recent)
            span = (now - recent[0][0]) if recent else 0.0
            return dict(stats=self.stats, active=len(self._active), swapped=len(self._swapped),
                        queued=sum(1 for r in self._waiting if r.queued),
                        tokens_per_second=tokens / span if span > 0.5 else 0.0,
                        counters=dict(self.counters), scheme_tokens=list(self.scheme_tokens),
                        peak_bytes_held=self.peak_bytes_held, peak_active=self.peak_active,
                        cache_entries=self.cache_entries, cache_tokens=self.cache_tokens,
                        cache_bytes_held=self.cache_bytes_held)

    def clear_cache(self, timeout=10.0):
        """Give back the pages of every cached prompt, between two steps; returns how
        many entries went, or None when the engine did not get to it within timeout."""
        done, result = threading.Event(), {}
        with self._lock:
            self._clears.append((done, result))
            self._lock.notify()
        return result["evicted"] if done.wait(timeout) else None

    @property
    def closed(self):
        return self._stop

    @property
    def failed(self):
        """Whether the engine thread has ended without close(): killed by a bug that
        escaped the loop's own handling (its traceback on stderr). Nothing submitted
        will be answered then."""
        return not self._thread.is_alive() and not self._stop

    def close(self):
        """Stop the engine: every request not yet done gets a 503 error event (the
        server is shutting down) instead of waiting for an answer that will not come,
        and every page goes back."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if threading.current_thread() is self._thread:
            # a collection on the engine thread finalizing what owns the engine (an
            # abandoned generate_batch_iter in a reference cycle): it cannot join
            # itself and may be mid-step, so the loop gives everything back as it stops
            self._close_on_exit = True
            return
        self._thread.join()
        self._release()

    def _release(self):
        """close() once the loop has stopped."""
        with self._lock:
            open_requests = (list(self._requests.values()) + list(self._waiting)
                             + list(self._incoming))
            self._waiting.clear()
            self._incoming.clear()
        for req in open_requests:
            self._fail(req, 503, "the server is shutting down", "shutting_down")
        self._deliver()
        for seq in self._active + self._swapped:
            self._close_seq(seq)
        evicted = len(self._cache)
        self._evict(evicted)
        for done, result in self._clears:   # asked for while the engine stopped
            result["evicted"], evicted = evicted, 0
            done.set()
        self._clears = []
        self.pool.close()

    # ---- the loop ------------------------------------------------------------------------

    def _need(self, req, reuse=0):
        return (len(req.prompt_ids) - reuse) * self.token_bytes + req.n * self.slack_bytes

    def _run(self):
        while True:
            with self._lock:
                if self._stop:
                    break
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                clears, self._clears = self._clears, []
            if clears:
                evicted = len(self._cache)
                self._evict(evicted)
                self._update_stats()
                for done, result in clears:
                    result["evicted"], evicted = evicted, 0
                    done.set()
            with self._lock:
                idle = not self._active and not self._swapped and not self._waiting
                if idle and not self._busy and not self._clears:
                    self._lock.wait(1.0)
                    continue
            if idle:
                self._busy = False
                self._collect()
                continue
            self._busy = True
            try:
                self._iteration()
            except Exception as e:   # a bug: fail the requests in flight, keep serving
                for seq in list(self._active) + list(self._swapped):
                    self._fail(seq.req, 500, "internal error: %s" % e, "internal_error")
                self._reap()
            self._deliver()
        if self._close_on_exit:
            self._release()

    COLLECT_EVERY = 1.0   # seconds at least between two collections when going idle

    def _collect(self):
        """The load is over: collect its reference cycles now rather than when the
        collector's oldest generation next fills. Each client connection leaves one
        (CPython 3.11's asyncio socket transport keeps a bound method of itself), which
        would otherwise hold its memory for several bursts. At most once a second
        (8 ms for the server's 31,000 objects on the 2-core test machine)."""
        now = time.monotonic()
        if now - self._collected >= self.COLLECT_EVERY:
            self._collected = now
            gc.collect()

    def _iteration(self):
        self._reap()
        self._resume()
        self._admit()
        self._queue()
        batch = self._batch()
        if batch:
            self._step(batch)
            self._note_peaks()   # before the finished sequences give their pages back
            # the requests this step finished get their "done" now, with the step's last
            # tokens, not one step later; the statistics first, so that what a client
            # asks next sees their end
            self._reap()
            self._update_stats()
            self._deliver()
            if self.step_delay:
                time.sleep(self.step_delay)
        else:
            self._update_stats()
            with self._lock:   # waiting for room: let time pass (or a cancel arrive)
                self._lock.wait(0.005)

    def _note_peaks(self):
        held = self.pool.stats().bytes_held
        with self._lock:
            self.peak_bytes_held = max(self.peak_bytes_held, held)
            self.peak_active = max(self.peak_active, len(self._active))

    def _update_stats(self):
        st = self.pool.stats()
        entries = list(self._cache.values())
        cache_bytes = sum(e.held for e in entries)
        cache_tokens = sum(len(e.tokens) for e in entries)
        with self._lock:
            self.stats = st
            self.cache_entries, self.cache_tokens = len(entries), cache_tokens
            self.cache_bytes_held = cache_bytes
            self.peak_bytes_held = max(self.peak_bytes_held, st.bytes_held)
            self.peak_active = max(self.peak_active, len(self._active))

    def _send(self, req, kind, data=None):
        if self.deliver is not None:
            self._outbox.append((req, Event(kind, data)))
            return
        try:
            req.emit(Event(kind, data))
        except Exception:
            req.cancelled = True   # its loop is gone: the client too

    def _deliver(self):
        """The step's events to the deliver hook, in one call."""
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self.deliver(batch)
        except Exception:
            for req, _ in batch:
                req.cancelled = True   # their loop is gone: their clients too

    def _fail(self, req, status, message, code):
        if not req.cancelled and not req.ended:
            self._send(req, "error", (status, message, code))
            req.ended = True
        req.cancelled = True

    def _close_seq(self, seq):
        if seq.ctx is not None:
            try:
                counts = seq.ctx.scheme_counts(-1)
                for s, c in enumerate(counts):
                    self.scheme_tokens[s] += c - (seq.counted[s] if seq.counted else 0)
            except MoasError:
                pass
            if not self._cache_put(seq):
                seq.ctx.close()
                self._n_closed += 1
            seq.ctx = None
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        seq.saved = None

    def _reap(self):
        """Close the sequences whose request ended or was cancelled."""
        for lst in (self._active, self._swapped):
            keep = []
            for seq in lst:
                if seq.done or seq.req.cancelled:
                    self._close_seq(seq)
                    self._seq_closed(seq)
                else:
                    keep.append(seq)
            lst[:] = keep
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for r in gone:
                self._waiting.remove(r)
                self.counters["cancelled_in_queue"] += 1

    # ---- the prompt cache --------------------------------------------------------------

    def _cache_put(self, seq):
        """Keep a finished request's first context in the cache (True), superseding the
        entries its tokens begin with, least recently used out beyond prompt_cache."""
        req = seq.req
        tokens = tuple(req.prompt_ids) + tuple(seq.generated)
        # (a shifted context holds fewer: not kept)
        if (self.prompt_cache <= 0 or seq.index != 0 or not seq.done or req.cancelled
                or not req.keep or seq.ctx.n_past != len(tokens)):
            return False
        for key in [k for k, e in self._cache.items()
                    if e.scope == req.cache_scope and e.tokens == tokens[:len(e.tokens)]]:
            self._drop(key)
        self._cache[next(self._cache_ids)] = CacheEntry(tokens, seq.ctx, req.cache_scope,
                                                        seq.ctx.kv_bytes_held)
        while len(self._cache) > self.prompt_cache:
            self._drop(next(iter(self._cache)))
        return True

    def _cache_find(self, prompt, scope):
        """(key, n): the entry of `scope` sharing the longest prefix with the prompt and
        how many of its tokens to reuse (at most all but the prompt's last, whose logits
        the request needs); (None, 0) when none shares any. Other scopes' entries are
        never looked at."""
        best, best_n = None, 0
        for key, e in self._cache.items():
            if e.scope != scope:
                continue
            n = common_prefix(e.tokens, prompt)
            if n > best_n:
                best, best_n = key, n
        n = min(best_n, len(prompt) - 1)
        return (best, n) if n > 0 else (None, 0)

    def _drop(self, key):
        self._cache.pop(key).ctx.close()
        self._n_closed += 1
        self.counters["prompt_cache_evictions"] += 1

    def _evict(self, n):
        """Give back the pages of the n least recently used entries."""
        for key in list(self._cache)[:n]:
            self._drop(key)

    def _seq_closed(self, seq):
        req = seq.req
        if seq in req.seqs:
            req.seqs.remove(seq)
            req.n_open -= 1
        if req.n_open == 0 and req.id in self._requests:
            del self._requests[req.id]
            if not req.cancelled:
                p = len(req.prompt_ids)
                req.ended = True
                self._send(req, "done", {"prompt_tokens": p,
                                         "completion_tokens": req.completion_tokens,
                                         "total_tokens": p + req.completion_tokens,
                                         "prompt_tokens_details": {
                                             "cached_tokens": req.cached_tokens}})
                self.counters["completed"] += 1
            else:
                self.counters["cancelled"] += 1

    @staticmethod
    def _queue_unit(req):
        """What the queue counts as one request: a prompt list's requests are one."""
        return id(req.group) if req.group is not None else id(req)

    @staticmethod
    def _served(req):
        """Whether another request of the request's prompt list was admitted: then it
        waits for room as the list's own, not in the queue."""
        return req.group is not None and any(r.admitted for r in req.group)

    def _queue(self):
        """After an admission pass: the requests it left wait in the queue. Beyond
        max_queue of them the newest are turned away (several can arrive between two
        passes), and those that have waited longer than queue_timeout go; a prompt
        list's requests are one, and none of a list being served (_served) goes."""
        now = time.monotonic()
        with self._lock:
            for r in self._waiting:
                r.queued = True
            queued = [r for r in self._waiting if not self._served(r)]
            units = list(dict.fromkeys(self._queue_unit(r) for r in queued))
            over = set(units[self.max_queue:])
            full = [r for r in queued if self._queue_unit(r) in over]
            old = [r for r in queued if self._queue_unit(r) not in over
                   and now - r.created > self.queue_timeout]
            for r in full + old:
                self._waiting.remove(r)
        for r in full:
            self.counters["rejected_queue_full"] += 1
            self._fail(r, 503, "the server is full: %d requests are already waiting"
                       % self.max_queue, "queue_full")
        for r in old:
            self.counters["rejected_queue_timeout"] += 1
            self._fail(r, 503, "%s: the request waited %.1f s in the queue"
                       % (self._why_waiting(r), self.queue_timeout), "pool_full")

    def _why_waiting(self, req):
        """What keeps a waiting request out, for its 503: the sequence slots or the
        pool's pages (swapped-out sequences waiting for pages count as the pool)."""
        if self._slots_taken() + min(req.n, self.max_sequences) > self.max_sequences:
            return "every sequence slot is taken (%d decode at once)" % self.max_sequences
        return "the KV pool is full"

    def _context(self):
        return self.pool.context(mode=self.mode, forced_scheme=self.forced_scheme,
                                 n_ctx=self.n_ctx)

    def _free_bytes(self):
        st = self.pool.stats()
        return st.pages_free * st.page_bytes

    def _resume(self):
        """Bring swapped-out sequences back, oldest first, while their state fits, and
        only once a sequence has given its pages back since (no ping-pong)."""
        if self._swapped:
            self._evict(len(self._cache))   # swapped sequences before cached prompts
        while self._swapped and len(self._active) < self.max_sequences:
            seq = self._swapped[0]
            if self._active and (self._n_closed <= seq.swap_mark or
                                 len(seq.saved) + self.headroom_bytes + self._committed()
                                 + self.token_bytes > self._free_bytes()):
                return
            ctx = self._context()
            try:
                ctx.load_state(seq.saved)
            except MoasError as e:
                ctx.close()
                if e.status == Status.ERR_POOL_FULL:
                    return
                raise
            seq.ctx, seq.saved = ctx, None
            self._swapped.pop(0)
            self._active.append(seq)
            self.counters["resumed"] += 1

    def _committed(self):
        """Bytes the active sequences will take before their next token: the rest of
        their prompts at the widest scheme, and a token each."""
        n = 0
        for seq in self._active:
            n += (len(seq.req.prompt_ids) - seq.prefill + 1) * self.token_bytes
        return n

    def _slots_taken(self):
        """Sequences decoding, and the forks their requests will make once the prompt
        is read (n > 1): the share of max_sequences that is not free."""
        requests = {id(seq.req): seq.req for seq in self._active}
        return len(self._active) + sum(r.n - 1 for r in requests.values() if not r.forked)

    def _admit(self):
        free = self._free_bytes() - self._committed()
        while not self._swapped:
            with self._lock:
                # its n sequences (the forks to come) all count against max_sequences;
                # one of more than that many waits for an empty engine
                if (not self._waiting or self._slots_taken() + min(
                        self._waiting[0].n, self.max_sequences) > self.max_sequences):
                    return
                req = self._waiting[0]
            hit, reuse = ((None, 0) if req.prompt_logprobs else
                          self._cache_find(req.prompt_ids, req.cache_scope))
            headroom = self.headroom_bytes if self._active else 0
            while self._need(req, reuse) + headroom > free:
                if not self._cache:
                    return
                # cached prompts give their pages back before a request waits: the
                # least recently used first, the one this request would reuse last
                victim = next((k for k in self._cache if k != hit), hit)
                if victim == hit:
                    hit, reuse = None, 0
                before = self._free_bytes()
                self._drop(victim)
                free += self._free_bytes() - before
            seq = Seq(req, 0)
            try:
                seq.ctx = self._cache_fork(hit, reuse) if hit is not None else None
                if seq.ctx is None:
                    reuse = 0
                    seq.ctx = self._context()
                seq.prefill = req.cached_tokens = reuse
                seq.counted = seq.ctx.scheme_counts(-1) if reuse else None
                seq.sampler = Sampler(self.model, seed=req.seed, **req.sampling)
                seq.sampler.accept(req.prompt_ids)
            except Exception as e:   # noqa: BLE001 - this request fails, the others go on
                self._close_seq(seq)
                with self._lock:
                    self._waiting.popleft()
                self._fail(req, 500, "internal error: %s" % e, "internal_error")
                continue
            free -= self._need(req, reuse)
            with self._lock:
                self._waiting.popleft()
                req.admitted = True
            req.seqs.append(seq)
            req.n_open = 1
            self._requests[req.id] = req
            self._active.append(seq)
            self.counters["admitted"] += 1
            self._send(req, "admitted")

    def _fork_or_none(self, ctx, keep=None):
        """ctx.fork(); when the pool has no room for the fork's partly filled pages, the
        cache's entries (but `keep`) give theirs back and it tries again; None if there
        is still no room."""
        for attempt in (0, 1):
            try:
                return ctx.fork()
            except MoasError as e:
                if e.status != Status.ERR_POOL_FULL:
                    raise
            others = [k for k in self._cache if k != keep]
            if attempt or not others:
                return None
            for key in others:
                self._drop(key)

    def _cache_fork(self, key, n):
        """A context holding the first n tokens of entry `key` (its pages shared), or
        None when the pool has no room for the fork."""
        ctx = self._fork_or_none(self._cache[key].ctx, keep=key)
        if ctx is None:
            return None
        try:
            ctx.truncate(n)
        except MoasError:
            ctx.close()
            raise
        self._cache.move_to_end(key)
        self.counters["prompt_cache_hits"] += 1
        self.counters["prompt_cache_reused_tokens"] += n
        return ctx

    def _batch(self):
        batch, budget = [], self.step_prefill
        for seq in self._active:
            if seq.done or seq.req.cancelled:
                continue
            prompt = seq.req.prompt_ids
            if seq.prefill < len(prompt):
                if budget <= 0:
                    continue
                n = min(self.prefill_chunk, budget, len(prompt) - seq.prefill)
                budget -= n
                batch.append((seq, prompt[seq.prefill:seq.prefill + n]))
            elif seq.pending is not None:
                batch.append((seq, [seq.pending]))
        return batch

    def _swap_out(self, seq):
        seq.saved = seq.ctx.save_state()
        seq.ctx.close()
        seq.ctx = None
        seq.swap_mark = self._n_closed
        self._active.remove(seq)
        self._swapped.append(seq)
        self._swapped.sort(key=lambda s: s.born)
        self.counters["swapped_out"] += 1

    @staticmethod
    def _scores_prompt(seq):
        """Whether this step needs every row of the sequence's chunk of prompt: the
        first choice of an echo request with logprobs (its forks share the prompt)."""
        return (seq.req.prompt_logprobs and seq.index == 0
                and seq.prefill < len(seq.req.prompt_ids))

    def _shift_full(self, batch):
        """Context shift: each sequence of the batch whose context is full, with a token
        to decode, makes room for it (ERR_POOL_FULL when the copies of its shared pages
        do not fit; the sequences shifted before it stay shifted)."""
        for seq, _ in batch:
            if seq.ctx.n_past >= seq.ctx.n_ctx and seq.prefill >= len(seq.req.prompt_ids):
                seq.ctx.shift(*self.shift)
                self.counters["context_shifts"] += 1

    def _step(self, batch):
        try:
            if self.shift:
                self._shift_full(batch)
            outs = self.pool.decode([(seq.ctx, tokens) for seq, tokens in batch],
                                    logits=["all" if self._scores_prompt(seq) else "last"
                                            for seq, _ in batch])
        except MoasError as e:
            if e.status != Status.ERR_POOL_FULL:
                raise
            if self._cache:   # cached prompts go first; the step is retried without them
                self._evict(len(self._cache))
                return
            if len(self._active) <= 1:   # alone and still too large: end it
                for seq, _ in batch:
                    self._finish(seq, "length")
                return
            self._swap_out(max(self._active, key=lambda s: s.born))
            return
        t = time.monotonic()
        generated = prefilled = 0
        for (seq, tokens), logits in zip(batch, outs):
            req = seq.req
            if self._scores_prompt(seq):
                prompt = req.prompt_ids
                for j, row in enumerate(logits):   # row j predicts prompt token prefill + j + 1
                    if seq.prefill + j + 1 < len(prompt):
                        seq.prompt_lps.append(token_logprobs(
                            row, prompt[seq.prefill + j + 1], req.logprobs))
                logits = logits[-1]
            if seq.prefill < len(req.prompt_ids):
                seq.prefill += len(tokens)
                if seq.prefill < len(req.prompt_ids):
                    prefilled += len(tokens)
                    continue
                prefilled += len(tokens)
                seq.logits = logits
                self._guarded(seq, self._start, seq)
                continue
            generated += 1
            self._guarded(seq, self._advance, seq, tokens[0], logits)
        with self._lock:
            self._rate.append((t, generated))
            while self._rate and t - self._rate[0][0] > 10.0:
                self._rate.popleft()
            self.counters["steps"] += 1
            self.counters["tokens_generated"] += generated
            self.counters["prompt_tokens"] += prefilled

    def _guarded(self, seq, fn, *args):
        """fn(*args) for one sequence of a step: an error ends its request alone (the
        library's refusal of what the request asked, 400; anything else, 500), and the
        step's other sequences go on."""
        try:
            fn(*args)
        except MoasError as e:
            self._fail(seq.req, 400, e.message, e.name.lower())
        except Exception as e:   # noqa: BLE001 - a bug, but this request's alone
            self._fail(seq.req, 500, "internal error: %s" % e, "internal_error")

    def _start(self, seq):
        """The prompt is read: with echo its event, the forks of n > 1, then each one's
        first token."""
        if seq.index == 0 and seq.req.echo:
            self._send(seq.req, "prompt",
                       [None] + seq.prompt_lps if seq.req.prompt_logprobs else None)
        for s in [seq] + (self._fork(seq) if seq.index == 0 else []):
            self._next(s, seq.logits)

    def _advance(self, seq, token, logits):
        self._emit_token(seq, token)
        if not seq.done:
            self._next(seq, logits)

    def _fork(self, parent):
        """n > 1: n - 1 forks of the parent that read the prompt (pages shared)."""
        req = parent.req
        req.forked = True
        children = []
        for i in range(1, req.n):
            child = Seq(req, i)
            child.prefill = len(req.prompt_ids)
            child.ctx = self._fork_or_none(parent.ctx)
            if child.ctx is None:   # no room to fork now: it reads the prompt itself later
                child.prefill = 0
                child.ctx = self._context()
            if child.prefill:
                child.counted = child.ctx.scheme_counts(-1)   # the prompt's, counted once
            child.sampler = Sampler(self.model, seed=req.seed + i, **req.sampling)
            child.sampler.accept(req.prompt_ids)
            req.seqs.append(child)
            req.n_open += 1
            self._active.append(child)
            if child.prefill:
                children.append(child)
                self.counters["forks"] += 1
        return children

    def _next(self, seq, logits):
        """Sample the next token of a sequence whose logits are `logits`, or finish it."""
        # the context holds the prompt and the tokens emitted (a fork shares the prompt;
        # only a shift makes it hold fewer): counted here rather than asked of the
        # library, whose every call lets the event loop's thread take the interpreter
        full = len(seq.req.prompt_ids) + seq.n_gen >= self.n_ctx and not self.shift
        if seq.n_gen >= seq.req.max_tokens or full:
            self._finish(seq, "length")
            return
        seq.pending = seq.sampler.sample(logits)
        if seq.req.logprobs is not None:
            seq.pending_lp = token_logprobs(logits, seq.pending, seq.req.logprobs)

    def _emit_token(self, seq, token):
        req = seq.req
        seq.pending = None
        if req.logprobs is not None:
            seq.held_lps.append(seq.pending_lp)
        seq.generated.append(token)
        seq.n_gen += 1
        req.completion_tokens += 1
        seq.held += self.token_texts[token]
        if req.routes:
            seq.held_routes.append(seq.ctx.route_lists(seq.ctx.n_past - 1, 1)[0])
        if req.stop and seq.n_gen > req.min_tokens:
            end, found = find_stop(seq.held, req.stop, more=True)
            if found and req.include_stop:
                end += self._stop_at(seq, end)
        else:
            end, found = len(seq.held), False
        self._flush(seq, end)
        if found:
            seq.held, seq.held_routes, seq.held_lps = "", [], []
            self._finish(seq, "stop")

    @staticmethod
    def _stop_at(seq, end):
        """The length of the stop string found at `end` of what is held: the shortest
        there, the one that completed (the search stops at the first to complete)."""
        return min(len(s) for s in seq.req.stop if seq.held.startswith(s, end))

    def _flush(self, seq, end):
        for i in range(end):
            route = seq.held_routes[i] if seq.req.routes else None
            lp = seq.held_lps[i] if seq.req.logprobs is not None else None
            self._send(seq.req, "text", (seq.index, seq.held[i], route, lp))
        seq.held = seq.held[end:]
        seq.held_routes = seq.held_routes[end:]
        seq.held_lps = seq.held_lps[end:]

    def _finish(self, seq, reason):
        if seq.done:
            return
        if seq.held:
            end, found = find_stop(seq.held, seq.req.stop, more=False) if seq.req.stop \
                else (len(seq.held), False)
            if found:   # a stop string whole in what was held back: it ends the text
                reason = "stop"
                if seq.req.include_stop:
                    end += self._stop_at(seq, end)
            self._flush(seq, end)
        seq.done = True
        self._send(seq.req, "finish", (seq.index, reason, seq.n_gen))


# ---- many prompts at once, offline (Model.generate_batch) ---------------------------------

Choice = collections.namedtuple("Choice", "text finish_reason n_tokens logprobs")
Choice.__doc__ = """One continuation of a prompt: its text, why it ended ("stop" or
"length", as Model.generate's finish_reason), how many characters were generated (a
stop string and what followed it included, though not in the text), and with
logprobs=k, per character of the text, (log p of the character, [(character, log p) of
the k likeliest, likeliest first, then the character itself when it is not among
them]) under the model's own distribution (the softmax of its logits, before
temperature, penalties, bias or filters, as the server's logprobs); else None."""


class Completion(collections.namedtuple("Completion", "prompt choices prompt_tokens "
                                                      "cached_tokens")):
    """A prompt's result of Model.generate_batch: the prompt, its n Choices, the
    prompt's characters and how many of them were taken from the prompt cache instead
    of being decoded again (a beginning the prompt shares with others of the batch,
    read once, or an earlier prompt it begins with). `text` is the first choice's
    text."""

    __slots__ = ()

    @property
    def text(self):
        return self.choices[0].text


# What one prompt's text depends on: Model.generate's arguments of the same names, which
# generate_batch takes for all prompts and per_prompt may set for one.
CHOICE_ARGS = ("max_tokens", "n", "seed", "temperature", "top_k", "top_p", "min_p",
               "repeat_penalty", "repeat_last_n", "logit_bias", "frequency_penalty",
               "presence_penalty", "stop", "min_tokens", "include_stop", "logprobs")
SAMPLING_ARGS = CHOICE_ARGS[3:12]


def _choice_args(model, args, where=""):
    """`args` (CHOICE_ARGS) checked and made what Request takes, before anything runs:
    MoasValueError (or TypeError) with `where` before the reason."""
    try:
        out = dict(args)
        for name, low in (("max_tokens", 0), ("n", 1), ("min_tokens", 0)):
            out[name] = _int(name, out[name])
            if out[name] < low:
                raise MoasError(Status.ERR_INVALID_ARG, "%s must be >= %d, got %d"
                                % (name, low, out[name]))
        out["stop"] = _stop_list(out["stop"])   # one string is one stop string
        find_stop("", out["stop"])   # its word on the strings (NUL, not text)
        if type(out["include_stop"]).__module__ == "numpy" and \
                type(out["include_stop"]).__name__ in ("bool_", "bool"):
            out["include_stop"] = bool(out["include_stop"])   # numpy's own bool (a mask's)
        if not isinstance(out["include_stop"], bool):   # 0 or "no" would read as a choice
            raise TypeError("include_stop must be a bool, got %r" % (out["include_stop"],))
        if out["logprobs"] is not None:
            out["logprobs"] = _int("logprobs", out["logprobs"])
            if not 0 <= out["logprobs"] <= model.n_vocab:
                raise MoasError(Status.ERR_INVALID_ARG, "logprobs must be in [0, %d] (the "
                                "vocabulary), got %d" % (model.n_vocab, out["logprobs"]))
        sampling = {name: out.pop(name) for name in SAMPLING_ARGS}
        # the library's word on the values, and on the last choice's seed
        Sampler(model, seed=out["seed"], **sampling).close()
        Sampler(model, seed=out["seed"] + out["n"] - 1, **sampling).close()
        out["sampling"] = sampling
        return out
    except MoasError as e:
        if not where:
            raise
        raise MoasError(e.status, where + e.message) from None
    except (TypeError, ValueError) as e:
        if not where:
            raise
        raise type(e)(where + str(e)) from None


SHARED_MIN = 16   # characters a run of prompts must begin with alike to read them once


def shared_beginnings(ids, limit):
    """Runs of prompts (token lists) that begin with the same SHARED_MIN tokens or more,
    the prompts taken in sorted order: [(the run's common beginning, the indices of its
    prompts)], at most `limit` of them (the prompt cache's size; none when it is 0), those
    saving the most tokens first."""
    order = sorted(range(len(ids)), key=lambda k: ids[k])
    runs, run, common = [], [order[0]] if order else [], None
    for a, b in zip(order, order[1:]):
        n = common_prefix(ids[a], ids[b])
        if n >= SHARED_MIN:
            run.append(b)
            common = n if common is None else min(common, n)
            continue
        if len(run) > 1:
            runs.append((common, run))
        run, common = [b], None
    if len(run) > 1:
        runs.append((common, run))
    runs.sort(key=lambda r: -r[0] * (len(r[1]) - 1))
    return [(ids[run[0]][:common], sorted(run)) for common, run in runs[:limit]]


def generate_batch(model, prompts, max_tokens=128, *, n=1, temperature=1.0, top_k=0,
                   top_p=1.0, min_p=0.0, repeat_penalty=1.0, repeat_last_n=64,
                   logit_bias=None, seed=0, frequency_penalty=0.0, presence_penalty=0.0,
                   stop=(), min_tokens=0, include_stop=False, mode="mixture", n_ctx=0,
                   unknown="error", n_threads=0, forced_scheme=-1, kv_type="f32",
                   context_shift=False, pool_bytes=256 << 20, max_sequences=64,
                   page_heads=0, prefill_chunk=64, step_prefill=256, prompt_cache=8,
                   logprobs=None, per_prompt=None, on_result=None, _as_iterator=False):
    """Model.generate_batch: every prompt through one Engine, then its results (with
    _as_iterator, Model.generate_batch_iter: the checks now, then an iterator of the
    results as they come)."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError("generate_batch takes a list of prompts (for one prompt, "
                        "Model.generate)")
    prompts = list(prompts)
    for k, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError("prompt %d is %s, not str" % (k, type(prompt).__name__))
    if on_result is not None and not callable(on_result):
        raise TypeError("on_result is %s, not a function" % type(on_result).__name__)
    # the engine's sizes too: its thread would otherwise wait forever on a prompt never
    # read (a chunk of 0) or die on a non-integer, and the call with it
    max_sequences, prompt_cache = _int("max_sequences", max_sequences), \
        _int("prompt_cache", prompt_cache)
    prefill_chunk, step_prefill = _int("prefill_chunk", prefill_chunk), \
        _int("step_prefill", step_prefill)
    pool_bytes = _int("pool_bytes", pool_bytes, ctypes.c_uint64)   # Pool's name is not ours
    for name, value, low in (("max_sequences", max_sequences, 1),
                             ("prompt_cache", prompt_cache, 0),
                             ("prefill_chunk", prefill_chunk, 1),
                             ("step_prefill", step_prefill, 1)):
        if value < low:
            raise MoasError(Status.ERR_INVALID_ARG, "%s must be >= %d, got %d"
                            % (name, low, value))
    given = dict(max_tokens=max_tokens, n=n, seed=seed, temperature=temperature,
                 top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                 repeat_last_n=repeat_last_n, logit_bias=logit_bias,
                 frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                 stop=stop, min_tokens=min_tokens, include_stop=include_stop,
                 logprobs=logprobs)
    choices = [_choice_args(model, given)] * len(prompts)
    if per_prompt is not None:
        per_prompt = list(per_prompt)
        if len(per_prompt) != len(prompts):
            raise MoasError(Status.ERR_INVALID_ARG, "per_prompt has %d entries for %d "
                            "prompts" % (len(per_prompt), len(prompts)))
        for k, own in enumerate(per_prompt):
            if own is None:
                continue
            if not isinstance(own, dict):
                raise TypeError("per_prompt %d is %s, not a dict (or None)"
                                % (k, type(own).__name__))
            unknown_keys = sorted(set(own) - set(CHOICE_ARGS), key=str)
            if unknown_keys:
                raise TypeError("per_prompt %d: %r is none of %s (the others are the "
                                "whole batch's)" % (k, unknown_keys[0], ", ".join(CHOICE_ARGS)))
            choices[k] = _choice_args(model, dict(given, **own), "prompt %d: " % k)
    ids = []
    for k, prompt in enumerate(prompts):
        try:
            ids.append(model.tokenize(prompt, unknown=unknown))
        except MoasError as e:   # a character of this prompt: say which prompt
            if e.status not in (Status.ERR_UNKNOWN_CHAR, Status.ERR_INVALID_UTF8):
                raise   # the rule itself, no prompt's fault
            raise MoasError(e.status, "prompt %d: %s" % (k, e.message)) from None
    for k, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise MoasError(Status.ERR_INVALID_ARG, "prompt %d is empty" % k)
    engine_args = dict(pool_bytes=pool_bytes, mode=mode, max_sequences=max_sequences,
                       prefill_chunk=prefill_chunk, step_prefill=step_prefill,
                       n_threads=n_threads, page_heads=page_heads, kv_type=kv_type,
                       forced_scheme=forced_scheme, prompt_cache=prompt_cache,
                       context_shift=context_shift, n_ctx=n_ctx)
    if _as_iterator:
        return _first_error_raised(_run_batch(model, prompts, ids, choices, engine_args))
    completions = [None] * len(prompts)
    errors = []
    # closed at once when on_result raises, not whenever the interpreter frees it
    with contextlib.closing(_run_batch(model, prompts, ids, choices, engine_args)) as run:
        for k, result, error in run:
            if error is not None:
                errors.append((k, error))
                continue
            completions[k] = result
            if on_result is not None:
                on_result(k, result)
    if errors:
        raise _prompt_error(*min(errors))
    return completions


def _prompt_error(k, error):
    """The MoasError of prompt k's "error" event (http_status, message, code)."""
    http_status, message, code = error
    try:   # the library's status, whose name the event's code is (as generate's)
        status = Status[code.upper()[len("MOAS_"):]]
    except KeyError:
        status = Status.ERR_INVALID_ARG if http_status == 400 else Status.ERR_INTERNAL
    return MoasError(status, "prompt %d: %s (%s)" % (k, message, code))


def _first_error_raised(results):
    """generate_batch_iter's results: (index, Completion) as each prompt ends; the
    first prompt that fails raises its MoasError there (the iterator then closes, and
    with it the engine)."""
    with contextlib.closing(results):
        for k, result, error in results:
            if error is not None:
                raise _prompt_error(k, error)
            yield k, result


def _run_batch(model, prompts, ids, choices, engine_args):
    """The checked prompts through one Engine: (index, Completion, None) for each prompt
    as it ends, or (index, None, its error event's data) for one that failed. Closing
    it early (or an exception in the caller while it waits) closes the engine: every
    page and thread given back."""
    prompt_cache, context_shift = engine_args["prompt_cache"], engine_args["context_shift"]
    max_sequences = engine_args["max_sequences"]
    pieces = finished = lps = None   # made once the prompts are known to fit (n may not)
    usage, errors = [None] * len(prompts), {}
    ended = queue.Queue()   # the index of each prompt done (or failed), as it ends

    def deliver(batch):   # the engine thread, once a step
        for req, event in batch:
            k = req.batch_index
            if event.kind in ("done", "error"):
                with feed_lock:   # the caller's first feed() counts up under it too
                    in_flight[0] -= 1
            if k is None:   # a shared beginning's own request
                if event.kind in ("done", "error"):   # read (or not): its prompts go
                    ready.extend(held.pop(req.group_key))
                    if not held:   # the last one read: the others go too
                        ready.extend(rest)
                    feed()
                continue
            if event.kind == "text":
                pieces[k][event.data[0]].append(event.data[1])
                if event.data[3] is not None:
                    lps[k][event.data[0]].append(event.data[3])
            elif event.kind == "finish":
                finished[k][event.data[0]] = event.data[1:]
            elif event.kind in ("done", "error"):
                if event.kind == "done":
                    usage[k] = event.data
                else:
                    errors[k] = event.data
                ended.put(k)
                feed()

    # the prompts go to the engine a window at a time, topped up as they end: each
    # submit and each step's queue pass walk the requests waiting, so all of them at
    # once would cost the square of their number
    requests, ready, held, rest = [], collections.deque(), {}, []
    in_flight, feed_lock = [0], threading.Lock()
    window = 2 * max_sequences

    def feed():   # either thread; False when the engine has stopped
        with feed_lock:
            while ready and in_flight[0] < window:
                if not engine.submit(ready[0]):
                    return False
                ready.popleft()
                in_flight[0] += 1
        return True

    vocab = model.vocab

    def completion(k):   # prompt k's result, once its "done" has come
        return Completion(prompts[k], [Choice("".join(pieces[k][i]), *finished[k][i],
                                              None if choices[k]["logprobs"] is None
                                              else [(lp, [(vocab[t], p) for t, p in top])
                                                    for lp, top in lps[k][i]])
                                       for i in range(choices[k]["n"])],
                          usage[k]["prompt_tokens"],
                          usage[k]["prompt_tokens_details"]["cached_tokens"])

    if not prompts:
        return
    engine = Engine(model, max_queue=len(prompts), queue_timeout=math.inf, deliver=deliver,
                    commit=False, **engine_args)
    try:
        for k, prompt_ids in enumerate(ids):
            if len(prompt_ids) > engine.n_ctx:
                raise MoasError(Status.ERR_INVALID_ARG, "prompt %d is %d characters, the "
                                "context holds %d" % (k, len(prompt_ids), engine.n_ctx))
            # without a shift a full context ends the text ("length"), as in
            # Model.generate: no more tokens than it holds are asked for, or reserved
            c = choices[k]
            limit = c["max_tokens"] if context_shift else min(c["max_tokens"],
                                                              engine.n_ctx - len(prompt_ids))
            req = Request(prompt_ids, max_tokens=limit, n=c["n"], seed=c["seed"],
                          stop=c["stop"], min_tokens=c["min_tokens"],
                          include_stop=c["include_stop"], logprobs=c["logprobs"],
                          **c["sampling"])
            req.batch_index = k
            if not engine.fits(req):
                raise MoasError(Status.ERR_POOL_FULL, "prompt %d (%d characters, %d x %d "
                                "to generate) does not fit a pool of %d bytes even alone; "
                                "give pool_bytes more" % (k, len(prompt_ids), c["n"], limit,
                                                          engine.stats.bytes_capacity))
            requests.append(req)
        # prompts that begin alike: their beginning read once, by a request of its own
        # that enters the prompt cache, before they go (they then fork it)
        for key, (prefix, members) in enumerate(shared_beginnings(ids, prompt_cache)):
            warm = Request(prefix, max_tokens=0, seed=0)
            warm.batch_index, warm.group_key = None, key
            ready.append(warm)
            held[key] = [requests[k] for k in members]
            # not kept when done: one that ended while another beginning's prompts
            # still waited would push that beginning out of the cache
            for r in held[key]:
                r.keep = False
        # the other prompts wait until every beginning is read, and then go behind the
        # prompts that fork it: each of them that ended first would enter the cache and
        # could push a beginning out before its prompts were admitted
        rest.extend(r for r in requests if r.keep)
        if not held:
            ready.extend(rest)
        pieces = [[[] for _ in range(c["n"])] for c in choices]
        finished = [[None] * c["n"] for c in choices]
        lps = [[[] for _ in range(c["n"])] for c in choices]
        if not feed():
            raise MoasError(Status.ERR_INTERNAL, "the engine refused a prompt")
        for _ in prompts:
            while True:
                try:   # a timeout, so that Ctrl-C gets through
                    k = ended.get(timeout=0.1)
                    break
                except queue.Empty:
                    # a bug that killed the engine thread (its traceback is on stderr)
                    # would otherwise leave the call waiting for events that never come
                    if not engine._thread.is_alive() and ended.empty():
                        raise MoasError(Status.ERR_INTERNAL, "the engine thread stopped "
                                        "before every prompt was done (a bug; its "
                                        "traceback is on stderr)") from None
            if k in errors:
                yield k, None, errors[k]
            else:
                yield k, completion(k), None
    finally:
        engine.close()
