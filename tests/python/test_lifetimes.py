"""The Python binding keeps the library's lifetime and threading rules for its caller:
an object is freed after the ones that need it (whatever order the garbage collector
picks), close() waits for a call another thread is making, a route callback cannot
use its own context, integers out of their C type's range are refused rather than
wrapped, and wrong types are TypeErrors. Each case that once crashed the interpreter
runs in a subprocess of its own, so a crash is a failed test, not a lost run."""
import contextlib
import os
import subprocess
import sys
import textwrap
import threading
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
sys.dont_write_bytecode = True
os.environ.setdefault("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
import moas  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
MOAS = os.path.join(DATA, "tiny-moas-bias.gguf")
POOLED = os.path.join(DATA, "tiny-pooled-bias.gguf")


def run(code):
    """Run `code` in a fresh interpreter with moas importable: (returncode, output)."""
    prelude = ("import gc, os, sys, threading, time\nsys.path.insert(0, %r)\nimport moas\n"
               "MOAS, POOLED = %r, %r\n" % (os.path.join(ROOT, "bindings", "python"),
                                            MOAS, POOLED))
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=120,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    return out.returncode, out.stdout


class Lifetimes(unittest.TestCase):
    def expect_ok(self, code, printed="ok"):
        rc, out = run(code)
        self.assertEqual(rc, 0, out)
        self.assertIn(printed, out)

    def test_a_cycle_through_a_pool_context_is_collected_safely(self):
        # the collector may finalise the pool first: its library object waits for the
        # context's (freeing it first corrupted the heap: SIGABRT)
        self.expect_ok("""
            m = moas.Model(POOLED)
            for _ in range(20):
                p = moas.Pool(m, 1 << 20)
                c = p.context(); c.decode_batch([1, 2, 3]); f = c.fork()
                c.me, f.me, p.me = c, f, p
                del c, f, p
                gc.collect()
            print("ok")
        """)

    def test_globals_at_exit(self):
        self.expect_ok("""
            def make():
                m = moas.Model(POOLED)
                p = moas.Pool(m, 1 << 20)
                c = p.context(); c.decode_batch([1, 2, 3])
                return m, p, c, c.fork()
            m, p, c, f = make()
            print("ok")
        """)

    def test_pool_close_closes_its_contexts(self):
        self.expect_ok("""
            m = moas.Model(POOLED); p = moas.Pool(m, 1 << 20)
            c = p.context(); c.decode_batch([1, 2, 3]); f = c.fork()
            p.close()
            assert c.closed and f.closed and p.closed
            try:
                c.decode(1)
            except moas.MoasError as e:
                assert "closed" in e.message, e
                print("ok")
        """)

    def test_close_from_another_thread_waits_for_the_call(self):
        # a worker decodes in a loop while the main thread closes the context, then the
        # model: each close waits for the call in flight (it freed the context under it)
        self.expect_ok("""
            m = moas.Model(POOLED)
            for target in ("context", "model", "pool"):
                m = moas.Model(POOLED); p = moas.Pool(m, 1 << 20); c = p.context()
                errors = []
                def work():
                    try:
                        while True:
                            if c.n_past > 50:
                                c.reset()
                            c.decode_batch([1] * 8)
                    except moas.MoasError as e:
                        errors.append(e.message)
                t = threading.Thread(target=work); t.start(); time.sleep(0.05)
                {"context": c, "model": m, "pool": p}[target].close()
                t.join(10)
                assert not t.is_alive() and "closed" in errors[0], errors
            print("ok")
        """)

    def test_sampler_close_waits_for_a_sample_on_another_thread(self):
        # 20M logits take the sampler about a second; close() freed its buffers under
        # the call (a crash) and must wait for it instead
        self.expect_ok("""
            import array
            n = 20000000
            logits = array.array("f", bytes(4 * n))
            s = moas.Sampler(n, top_p=0.5, seed=1)
            got = []
            t = threading.Thread(target=lambda: got.append(s.sample(logits)))
            t.start(); time.sleep(0.15)
            s.close()   # waits: freeing under the call crashed this process
            t.join()    # (the thread appends after the call lets go of the sampler)
            assert got and 0 <= got[0] < n, got
            try:
                s.sample(logits)
                raise SystemExit("a closed sampler sampled")
            except moas.MoasError as e:
                assert "closed" in e.message, e
            print("ok")
        """)

    def test_sampling_a_context_holds_it_against_a_decode(self):
        # sample(context) reads the context's logits in place: a decode on another
        # thread (here while the sampler is slowed down) must wait, not change them
        # under the call
        self.expect_ok("""
            m = moas.Model(MOAS)
            prompt = m.tokenize("And God")
            argmax = lambda row: max(range(len(row)), key=row.__getitem__)
            c = m.context()
            want = argmax(c.decode_batch(prompt))

            def argmax_after(token):
                with m.context() as probe:
                    probe.decode_batch(prompt)
                    return argmax(probe.decode(token))
            other = next(t for t in range(m.n_vocab) if argmax_after(t) != want)
            s = moas.Sampler(m, temperature=0)
            lib = moas.library()
            real = lib.moas_sampler_sample
            def slow(*args):
                time.sleep(0.3)
                return real(*args)
            lib.moas_sampler_sample = slow
            got = []
            t = threading.Thread(target=lambda: got.append(s.sample(c)))
            t.start(); time.sleep(0.1)
            c.decode(other)   # waits for the sample
            assert got == [want], "the decode did not wait for the sample: %r" % got
            t.join()
            print("ok")
        """)

    def test_a_route_callback_may_use_a_sampler_another_thread_samples_with(self):
        # the callback runs holding its context's lock and takes the sampler's, while
        # the other thread, sampling that context, waits for the context's lock first:
        # taken the other way round, each waited for the other's lock for ever
        self.expect_ok("""
            m = moas.Model(MOAS)
            s = moas.Sampler(m, temperature=0)
            row = [0.0] * m.n_vocab
            def route(pos, layer, gates, proposed):
                if pos == 0 and layer == 0:
                    time.sleep(0.2)   # the other thread asks for the context meanwhile
                    s.sample(row)
            c = m.context(mode="routed", route_callback=route)
            threads = [threading.Thread(target=c.decode, args=(1,), daemon=True),
                       threading.Thread(target=lambda: (time.sleep(0.1), s.sample(c)),
                                        daemon=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            if any(t.is_alive() for t in threads):
                print("deadlocked", flush=True)
                os._exit(1)
            assert c.n_past == 1
            print("ok")
        """)

    def test_a_route_callback_may_decode_a_context_another_pool_call_waits_for(self):
        # Thread A's pool call runs c's route callback, which decodes x; thread B's pool
        # call names x and c. B held x's lock while it waited for c's, which A holds
        # until its call ends, and A's callback waited for x's: each waited for the
        # other for ever. B now waits holding none of them.
        self.expect_ok("""
            m = moas.Model(POOLED)
            p = moas.Pool(m, 1 << 20)
            asked = threading.Event()
            decoded = []
            def route(pos, layer, gates, proposed):
                if pos == 0 and layer == 0 and not decoded:
                    asked.set()
                    time.sleep(0.3)   # B asks for x and c meanwhile
                    decoded.append(len(x.decode(1)))   # a view, gone with x's next call
            c = p.context(mode="routed", route_callback=route)
            # B took the locks in the order of id(): x's before c's
            others = [p.context(mode="routed") for _ in range(64)]
            x = next(o for o in others if id(o) < id(c))
            a = threading.Thread(target=lambda: p.decode([(c, [1])]), daemon=True)
            b = threading.Thread(target=lambda: (asked.wait(), time.sleep(0.05),
                                                 p.decode([(x, [2]), (c, [3])])),
                                 daemon=True)
            for t in (a, b):
                t.start()
            for t in (a, b):
                t.join(10)
            if a.is_alive() or b.is_alive():
                print("deadlocked", flush=True)
                os._exit(1)
            assert decoded == [m.n_vocab], decoded
            assert (x.n_past, c.n_past) == (2, 2), (x.n_past, c.n_past)
            print("ok")
        """)

    def test_pool_decode_lets_go_of_the_locks_it_took_when_taking_one_raises(self):
        # an exception between two acquisitions (a KeyboardInterrupt) left the ones
        # already taken held: every later call on those contexts waited for ever
        class Raising:
            def acquire(self, blocking=True):
                raise KeyboardInterrupt

        first = threading.RLock()
        with self.assertRaises(KeyboardInterrupt), contextlib.ExitStack() as held:
            moas._hold_all([first, Raising()], held)
        t = threading.Thread(target=lambda: first.acquire() and first.release())
        t.start()
        t.join(5)
        self.assertFalse(t.is_alive(), "the first lock stayed held")

    def test_a_route_callback_cannot_use_its_own_context(self):
        self.expect_ok("""
            m = moas.Model(MOAS)
            c = m.context(mode="routed")
            for act in (lambda: c.close(), lambda: c.decode(2), lambda: c.n_past):
                c.set_route_callback(lambda pos, layer, g, prop, act=act: act())
                try:
                    c.decode(1)
                    raise SystemExit("not refused")
                except moas.MoasError as e:
                    assert "route callback" in e.message, e
                assert not c.closed and c.n_past == 0   # the decode undone
            c.set_route_callback(None); c.decode(1)
            print("ok")
        """)

    def test_repr_of_a_context_from_its_own_callback(self):
        # repr() called the context, which is refused from its callbacks: a callback
        # that logged or printed its context raised, and the decode was undone
        self.expect_ok("""
            m = moas.Model(MOAS)
            seen = []
            c = m.context(mode="routed", route_callback=lambda *a: seen.append(repr(c)),
                          abort_callback=lambda: seen.append(repr(c)))
            c.decode(1)
            assert c.n_past == 1 and seen and all("moas.Context" in r for r in seen), seen
            assert "1/64 tokens" in repr(c), repr(c)
            print("ok")
        """)

    def test_closing_the_model_or_pool_from_a_callback_is_refused_closing_nothing(self):
        # refused half-way, it closed the contexts it reached before the one calling,
        # and the model (or pool) refused every call while `closed` said False
        self.expect_ok("""
            m = moas.Model(POOLED); p = moas.Pool(m, 1 << 20)
            others = [m.context() for _ in range(4)] + [p.context() for _ in range(4)]
            for owner, make in ((m, m.context), (p, p.context), (m, p.context)):
                c = make(route_callback=lambda pos, layer, g, prop, o=owner: o.close())
                for call in (lambda: c.decode(1),
                             lambda: p.decode([(c, [1])]) if c.pool else c.decode(1)):
                    try:
                        call()
                        raise SystemExit("not refused")
                    except moas.MoasError as e:
                        assert e.status == moas.Status.ERR_BUSY, e
                    assert not any(o.closed for o in others + [c, m, p])
                    assert m.n_vocab == 47 and p.stats().n_contexts >= 4 and c.n_past == 0
                c.close()
            others[0].decode(1); others[-1].decode(1)
            m.close()
            assert p.closed and all(o.closed for o in others)
            print("ok")
        """)

    def test_a_log_callback_cannot_close_the_context_whose_call_logs(self):
        # a failing call logs its error: a log callback that closed the context got the
        # library's refusal (the context in use), while Python counted it freed (its
        # pages held to the end, the library object outliving its pool and model) and
        # the call's error became context_free's
        self.expect_ok("""
            m = moas.Model(POOLED); p = moas.Pool(m, 1 << 20)
            box = {"refused": []}
            def log(level, text):
                for act in box.get("acts", ()):
                    try:
                        act()
                    except moas.MoasError as e:
                        box["refused"].append(e)
            c = p.context(log=log, n_threads=1)
            c.decode_batch([1, 2, 3])
            other = p.context(log=log, n_threads=1)
            box["acts"] = (c.close, lambda: c.n_past, m.close, p.close)
            try:
                c.truncate(999)
                raise SystemExit("not refused")
            except moas.MoasError as e:
                assert "n_keep 999" in e.message, e.message
            assert [e.status for e in box["refused"]] == [moas.Status.ERR_BUSY] * 4, box
            assert "log callback" in box["refused"][0].message
            assert not c.closed and c.n_past == 3 and p.stats().n_contexts == 2
            box["acts"] = ()
            c.close(); other.close()
            assert p.stats().n_contexts == 0
            # a fork that fails (a full pool) logs through its parent's callback
            small = moas.Pool(m, 1 << 12)
            parent = small.context(log=log, n_threads=1)
            try:
                while True:
                    parent.decode(1)
            except moas.MoasError as e:
                assert e.status == moas.Status.ERR_POOL_FULL, e
            box["acts"], box["refused"] = (parent.close,), []
            try:
                parent.fork()
                raise SystemExit("not refused")
            except moas.MoasError as e:
                assert "context_fork" in e.message, e.message
            assert [e.status for e in box["refused"]] == [moas.Status.ERR_BUSY], box
            assert not parent.closed and small.stats().n_contexts == 1
            box["acts"] = ()
            parent.close()
            assert small.stats().n_contexts == 0
            print("ok")
        """)

    def test_a_forks_callback_error_is_its_own(self):
        self.expect_ok("""
            m = moas.Model(POOLED); p = moas.Pool(m, 1 << 20)
            def cb(pos, layer, g, prop):
                if pos >= 3:
                    raise RuntimeError("boom at %d" % pos)
            parent = p.context(mode="routed", route_callback=cb)
            parent.decode_batch([1, 2, 3])
            child = parent.fork()
            try:
                child.decode(4)
                raise SystemExit("the fork's error was lost")
            except RuntimeError as e:
                assert "boom at 3" in str(e)
            assert child.n_past == 3 and parent.n_past == 3
            parent.set_route_callback(None)
            parent.decode(5)   # not charged with the fork's error
            assert parent.n_past == 4
            print("ok")
        """)


    def test_a_fork_keeps_its_parents_log_and_allocator(self):
        # the library copies both into the fork; the parent and its Python objects
        # gone, a fork's failing call logged through a freed callback (a crash)
        self.expect_ok("""
            m = moas.Model(POOLED)
            pool = moas.Pool(m, 1 << 20)
            heard = []
            p = pool.context(log=lambda level, text: heard.append(text))
            p.decode_batch(m.tokenize("And God"))
            child = p.fork()
            p.close(); del p; gc.collect()
            try:
                child.truncate(99)
            except moas.MoasValueError:
                pass
            assert heard and "truncate" in heard[-1], heard
            child.close(); pool.close(); m.close()
            print("ok")
        """)

    def test_slices_of_tensor_data_keep_the_models_memory(self):
        # a cast or slice outlives the view close() releases, and the Model object:
        # reading it read unmapped memory (a crash)
        self.expect_ok("""
            def embedding(path):
                m = moas.Model(path)
                return m.tensor("token_embd.weight").data.cast("f")
            w = embedding(MOAS)
            gc.collect()
            first = w[0]
            m = moas.Model(MOAS)
            d = m.tensor(0).data
            head = d[:16]
            m.close()
            try:
                bytes(d)
                raise SystemExit("the view should be released")
            except ValueError:
                pass
            assert len(bytes(head)) == 16
            del w, head; gc.collect()
            print("ok")
        """)

    def test_model_close_waits_for_a_context_being_made(self):
        # a thread switch between making the library's context and counting it as the
        # model's dependent (widened here by a slow _depend_on) let close() free the
        # model under it: its first decode read freed weights
        self.expect_ok("""
            m = moas.Model(MOAS)
            slow_from = moas._Handle._depend_on
            def slow(self, owner):
                time.sleep(0.2)
                slow_from(self, owner)
            moas._Handle._depend_on = slow
            made = {}
            def make():
                try:
                    made["ctx"] = moas.Context(m)
                except moas.MoasError as e:
                    made["error"] = e
            t = threading.Thread(target=make)
            t.start(); time.sleep(0.05)
            m.close()
            t.join()
            ctx = made.get("ctx")
            assert ctx is None or ctx.closed, "a context over a freed model"
            print("ok")
        """)

    def test_pool_close_waits_for_a_context_being_made_in_it(self):
        # the pool's pointer was read with nothing holding the pool: a close() on
        # another thread meanwhile freed it (no dependent yet) and the library read the
        # freed pool ("made for another model", or worse). The window is widened at
        # the same place, a slow _depend_on
        self.expect_ok("""
            m = moas.Model(MOAS)
            p = moas.Pool(m, 1 << 20, n_threads=1)
            slow_from = moas._Handle._depend_on
            def slow(self, owner):
                time.sleep(0.2)
                slow_from(self, owner)
            moas._Handle._depend_on = slow
            made = {}
            def make():
                try:
                    made["ctx"] = p.context(n_threads=1)
                except moas.MoasError as e:
                    made["error"] = e
            t = threading.Thread(target=make)
            t.start(); time.sleep(0.05)
            p.close()   # waits for the context being made, then closes it first
            t.join()
            ctx = made.get("ctx")
            assert "error" not in made, made
            assert ctx is not None and ctx.closed and p.closed, "a context over a freed pool"
            print("ok")
        """)

    def test_routes_while_another_thread_decodes_the_context(self):
        # routes() sized its buffers from n_past under one hold of the lock and called
        # the library under another: a decode between them made it write past them
        # (SIGSEGV in every run)
        self.expect_ok("""
            m = moas.Model(MOAS)
            ctx = m.context(n_threads=1)
            ids = m.tokenize("And God said")
            stop = False
            def churn():
                while not stop:
                    ctx.reset(); ctx.decode_batch(ids)
            t = threading.Thread(target=churn); t.start()
            got = 0
            for _ in range(5000):
                try:
                    r = ctx.routes(0, 12)
                    got += len(r.schemes) == 12
                except moas.MoasError:
                    pass
            stop = True; t.join()
            print("ok", got)
        """)

    def test_decode_returns_its_own_logits_whatever_another_thread_does(self):
        # decode() released the lock between the library call and making the view: a
        # reset (or decode) by another thread in between made it return None (or that
        # thread's logits). The other thread here tries just there, without waiting.
        self.expect_ok("""
            m = moas.Model(MOAS)
            ctx = m.context()
            ids = m.tokenize("And God")
            logits = ctx.logits
            def reset_if_free():
                if ctx._lock.acquire(blocking=False):
                    try:
                        ctx.reset()
                    finally:
                        ctx._lock.release()
            def meddle():
                t = threading.Thread(target=reset_if_free); t.start(); t.join()
                return logits()
            ctx.logits = meddle
            assert ctx.decode(ids[0]) is not None
            assert ctx.decode_batch(ids[1:]) is not None and ctx.n_past == len(ids)
            print("ok")
        """)

    def test_save_state_while_another_thread_decodes_the_context(self):
        # the size was read under one hold of the lock and the state saved under
        # another: a decode between them made the state too large for its buffer
        self.expect_ok("""
            m = moas.Model(MOAS)
            ctx = m.context()
            ctx.decode_batch(m.tokenize("And God"))
            call = ctx._call
            def decode_if_free():
                if ctx._lock.acquire(blocking=False):
                    try:
                        ctx.decode(1)
                    finally:
                        ctx._lock.release()
            def meddle(name, *args):
                if name == "moas_context_state_save":
                    t = threading.Thread(target=decode_if_free); t.start(); t.join()
                return call(name, *args)
            ctx._call = meddle
            state = ctx.save_state()
            del ctx._call
            other = m.context(); other.load_state(state)
            assert other.n_past == ctx.n_past == 7
            print("ok")
        """)

    def test_a_change_of_the_logits_releases_a_view_another_thread_just_made(self):
        # reset, truncate, compact and load_state released the views, then took the
        # lock for their call: a view another thread made in between was not released
        # and showed the logits of after the change
        self.expect_ok("""
            m = moas.Model(POOLED)
            ctx = m.context(mode="routed")
            ids = m.tokenize("And God said")
            ctx.decode_batch(ids)
            state = ctx.save_state()
            views = []
            def view_if_free():
                if ctx._lock.acquire(blocking=False):
                    try:
                        views.append(ctx.logits())
                    finally:
                        ctx._lock.release()
            call = ctx._call
            def meddle(name, *args):
                if name != "moas_context_n_past":
                    t = threading.Thread(target=view_if_free); t.start(); t.join()
                return call(name, *args)
            for change in (lambda: ctx.truncate(len(ids) - 1), lambda: ctx.reset(),
                           lambda: ctx.load_state(state), lambda: ctx.compact(4, 2)):
                ctx._call = meddle
                change()
                del ctx._call
                for v in views:
                    try:
                        v.tolist()
                        raise SystemExit("a view outlived the change")
                    except ValueError:
                        pass
                ctx.load_state(state)
            print("ok")
        """)

    def test_a_callback_set_by_two_threads_is_the_one_kept(self):
        # set_route_callback (and set_abort_callback) installed the callback, released
        # the lock, then kept it: another thread's set in between left the library
        # with that thread's callback and Python keeping the first, so the one the
        # library called was freed (a crash, or the wrong callback)
        self.expect_ok("""
            m = moas.Model(MOAS)
            ctx = m.context(mode="routed")
            heard = []
            first = lambda *a: heard.append("first")
            second = lambda *a: heard.append("second")
            call = ctx._call
            for setter, name in ((ctx.set_route_callback, "moas_context_set_route_callback"),
                                 (ctx.set_abort_callback, "moas_context_set_abort_callback")):
                def set_second_if_free():
                    if ctx._lock.acquire(blocking=False):
                        try:
                            setter(second)
                        finally:
                            ctx._lock.release()
                def meddle(got, *args):
                    out = call(got, *args)
                    if got == name and args[0] is not None and not heard:
                        heard.append("meddled")
                        t = threading.Thread(target=set_second_if_free); t.start(); t.join()
                    return out
                ctx._call = meddle
                setter(first)
                del ctx._call
                gc.collect()
                heard.clear()
                kept = ctx._route_fn if name.endswith("route_callback") else ctx._abort_fn
                ctx.reset(); ctx.decode(1)
                want = "first" if kept is first else "second"
                assert heard and set(heard) == {want}, (heard, want)
                setter(None)
                heard.clear()
            print("ok")
        """)

    def test_model_close_waits_for_a_call_on_another_thread(self):
        self.expect_ok("""
            m = moas.Model(MOAS)
            text = "And God said, Let there be light. " * 200000
            errors = []
            def tokenize():
                try:
                    for _ in range(3):
                        m.tokenize(text)
                except moas.MoasError as e:
                    errors.append(e)
            t = threading.Thread(target=tokenize)
            t.start(); time.sleep(0.05)
            m.close()
            t.join()
            assert all("closed" in e.message for e in errors), errors
            print("ok")
        """)


class Arguments(unittest.TestCase):
    def setUp(self):
        self.model = moas.Model(MOAS)
        self.ctx = self.model.context()

    def tearDown(self):
        self.model.close()

    def refused(self, fn, *args, **kw):
        with self.assertRaises(moas.MoasValueError) as cm:
            fn(*args, **kw)
        return cm.exception.message

    def test_integers_beyond_their_c_type_are_refused_not_wrapped(self):
        c, m = self.ctx, self.model
        c.decode_batch([1, 2, 3])
        self.assertIn("4294967298", self.refused(c.truncate, 2**32 + 2))
        self.assertEqual(c.n_past, 3)   # not truncated to 2
        self.refused(c.decode, 2**32 + 5)
        self.refused(c.decode_batch, [2**64 + 5])
        self.refused(m.token_text, 2**32 + 5)
        self.refused(m.detokenize, [2**32 + 5])
        self.refused(m.tensor, 2**64)
        self.refused(m.context, n_ctx=2**32 + 4)
        self.refused(m.context, kv_budget=-1)
        self.refused(c.set_kv_budget, -1)
        self.refused(moas.Pool, m, -1)
        self.refused(moas.Sampler, m, seed=-1)
        self.refused(moas.Sampler, m, top_k=2**32 + 1)
        self.refused(moas.Sampler, m, logit_bias={2**32 + 1: 1.0})
        self.refused(moas.Sampler, 2**32 + 47)
        self.assertEqual(c.n_past, 3)

    def test_a_callback_answer_beyond_int32_keeps_the_proposal(self):
        with self.model.context(mode="routed") as a, self.model.context(mode="routed") as b:
            a.set_route_callback(lambda pos, layer, g, prop: 2**32 + 1)   # would be 1
            a.decode_batch([1, 2, 3])
            b.decode_batch([1, 2, 3])
            self.assertEqual(a.routes(0, 3).schemes.tolist(), b.routes(0, 3).schemes.tolist())

    def test_wrong_types_are_type_errors(self):
        c, m = self.ctx, self.model
        for fn, arg in ((c.decode, 1.0), (c.decode, None), (c.decode, "a"),
                        (c.decode_batch, b"ab"), (c.decode_batch, "ab"), (m.tokenize, 5),
                        (m.tokenize, [65, 66]), (c.load_state, 5), (c.truncate, 0.5),
                        (c.set_kv_budget, 1.5)):
            with self.assertRaises(TypeError, msg=repr((fn, arg))):
                fn(arg)
        # a float or a bool passed as an integer, wherever it goes
        with moas.Sampler(m) as s:
            for fn, args, kw in ((m.generate, ("And", 1.0), {}),
                                 (m.generate, ("And", True), {}),
                                 (m.generate, ("And",), {"max_tokens": 2.0}),
                                 (c.decode, (True,), {}), (c.decode_batch, ([1, False],), {}),
                                 (m.context, (), {"n_ctx": True}),
                                 (moas.Sampler, (m,), {"top_k": True}),
                                 (moas.Sampler, (True,), {}),
                                 (s.accept, (True,), {}), (s.accept, ([1, True],), {}),
                                 (s.reseed, (False,), {}),
                                 (m.context, (), {"mode": True}),
                                 (m.context, (), {"mode": 1.0}),
                                 (m.context, (), {"kv_type": 8.0}),
                                 (m.context, (), {"kernels": True}),
                                 (c.decode_batch, ([1],), {"logits": 2.0}),
                                 (moas.Pool, (m, 1 << 20), {"kv_type": True})):
                with self.assertRaises(TypeError, msg=repr((fn, args, kw))):
                    fn(*args, **kw)
        self.assertEqual(c.n_past, 0)
        # an index checked in Python before the library sees it: a float was a
        # MoasValueError naming it truncated ("layer 5"), or broke the sizing of
        # routes()'s buffers (AttributeError), a str a comparison's message
        c.decode_batch([1, 2, 3])
        for fn, args in ((c.routes, (0, 1.5)), (c.route_lists, (0, 2.0)), (c.routes, (0.0,)),
                         (c.kv_bytes_used, (5.5,)), (c.kv_bytes_reserved, ("a",)),
                         (c.kv_bytes_used, (None,)), (c.kv_token_bytes, (5.5,)),
                         (c.kv_token_bytes, (True,))):
            with self.assertRaises(TypeError, msg=repr((fn, args))) as cm:
                fn(*args)
            self.assertIn("must be an integer", str(cm.exception))
        c.reset()
        # a real number's parameter: named, where ctypes said "must be real number, not
        # str"; True was taken as 1.0
        for fn, args, kw in ((moas.Sampler, (m,), {"temperature": "0.5"}),
                             (moas.Sampler, (m,), {"temperature": True}),
                             (moas.Sampler, (m,), {"top_p": None}),
                             (moas.Sampler, (m,), {"min_p": b"0"}),
                             (moas.Sampler, (m,), {"repeat_penalty": [1.0]}),
                             (moas.Sampler, (m,), {"frequency_penalty": "x"}),
                             (moas.Sampler, (m,), {"presence_penalty": False}),
                             (moas.Sampler, (m,), {"logit_bias": {1: "x"}}),
                             (moas.Pool, (m, 1 << 20), {"steer_below": "x"})):
            with self.assertRaises(TypeError, msg=repr(kw)) as cm:
                fn(*args, **kw).close()
            self.assertIn(list(kw)[0], str(cm.exception))
        self.refused(moas.Sampler, m, temperature=10**400)   # not OverflowError
        with self.assertRaises(TypeError):
            moas.find_stop(5, [])
        with self.assertRaises(TypeError):
            m.context(pool=5)
        for make in (moas.Context, lambda model: moas.Pool(model, 1 << 20)):
            for not_a_model in (None, MOAS, c):
                with self.assertRaises(TypeError) as cm:
                    make(not_a_model)
                self.assertIn("Model", str(cm.exception))
        with self.assertRaises(ValueError):
            moas.Model(MOAS + "\0junk")

    def test_a_callback_answer_that_is_no_integer_is_a_type_error(self):
        # a float was truncated (1.7: scheme 1) and a str parsed ("2": scheme 2): like
        # an exception of the callback's, it undoes the decode and is raised
        with self.model.context(mode="routed") as c, moas.Model(POOLED) as pooled_model, \
                moas.Pool(pooled_model, 1 << 20) as pool:
            pooled = pool.context(mode="routed")
            for answer in (1.7, "2", True, [1]):
                c.set_route_callback(lambda pos, layer, g, prop, a=answer: a)
                pooled.set_route_callback(lambda pos, layer, g, prop, a=answer: a)
                for decode in (lambda: c.decode_batch([1, 2, 3]),
                               lambda: pool.decode([(pooled, [1, 2, 3])])):
                    with self.assertRaises(TypeError, msg=repr(answer)) as cm:
                        decode()
                    self.assertIn("route callback", str(cm.exception))
                self.assertEqual((c.n_past, pooled.n_past), (0, 0))
            c.set_route_callback(lambda pos, layer, g, prop: 1)
            c.decode_batch([1, 2, 3])
            self.assertEqual({s for row in c.routes().schemes.tolist() for s in row}, {1})

    def test_sampler_and_context_must_agree_on_the_vocabulary(self):
        self.ctx.decode(1)
        for n in (100000, 10):
            with moas.Sampler(n, temperature=0) as s:
                self.assertIn("logits", self.refused(s.sample, self.ctx))

    def test_sampler_integers_are_checked_and_numpy_like_ints_taken(self):
        class Index:   # what numpy's integers look like to Python: __index__, not int
            def __init__(self, v):
                self.v = v

            def __index__(self):
                return self.v

        with moas.Sampler(self.model, seed=1, repeat_penalty=100.0) as s:
            self.refused(s.accept, 2**32 + 5)
            self.refused(s.accept, [2**70 + 5])
            self.refused(s.reseed, -1)
            self.refused(s.reseed, 2**64)
            with self.assertRaises(TypeError):
                s.reseed(1.5)
            with self.assertRaises(TypeError):
                s.accept([1.5])
            s.accept(Index(5))
            s.reseed(Index(3))
            try:
                import numpy
            except ImportError:
                numpy = None
            if numpy is not None:   # an array is a sequence of ids, its items numpy ints
                s.accept(numpy.array([1, 2, 3], dtype=numpy.int32))
                s.accept(numpy.int64(4))
            with self.assertRaises(moas.MoasValueError):
                s.sample(None)   # decode_batch([]) or logits="none" gives None
        self.assertEqual(len(self.model.generate("And", Index(2), temperature=0, stop=None)),
                         2)

    def test_sampler_accept_of_a_sequence_is_all_or_nothing(self):
        # a refused id stopped the loop with the ids before it already remembered
        logits = [0.5] * 47
        logits[5] = 1.0   # penalised by 100: 0.01, below the rest
        with moas.Sampler(self.model, temperature=0, repeat_penalty=100.0) as s:
            for bad in (47, -1, 2**40, 1.5):
                with self.assertRaises((moas.MoasValueError, TypeError)):
                    s.accept([5, bad])
                self.assertEqual(s.sample(logits), 5)   # 5 not penalised
                s.reset()
            s.accept([5])
            self.assertNotEqual(s.sample(logits), 5)   # remembered: penalised

    def test_text_helpers_take_what_users_pass(self):
        self.assertEqual(moas.find_stop("hello", "lo"), (3, True))
        self.assertEqual(moas.find_stop("hello", ["lo"]), (3, True))
        for key in ("general.name\0zzz", "a\0b"):
            self.refused(self.model.meta, key)
            self.refused(self.model.tensor_find, key)
        with self.assertRaises(TypeError):
            self.model.meta(b"general.name")
        with self.assertRaises(moas.MoasValueError):
            self.model.perplexity("And God said", n_ctx=1)

    def test_a_callback_or_allocator_of_the_wrong_type_is_refused_where_given(self):
        # a route or abort callback that is not callable failed every decode later, a
        # log callback was never heard, and an allocator gave ctypes' "_type_ must have
        # storage info"
        c, m = self.ctx, self.model
        for fn, kw in ((m.context, {"route_callback": 5}), (m.context, {"abort_callback": "x"}),
                       (m.context, {"log": 5}), (moas.Model, {"log": 5}),
                       (moas.Pool, {"log": 5}), (m.context, {"allocator": 5}),
                       (moas.Model, {"allocator": 5}), (moas.Sampler, {"allocator": 5})):
            args = (MOAS,) if fn is moas.Model else (m, 1 << 20) if fn is moas.Pool else \
                (m,) if fn is moas.Sampler else ()
            with self.assertRaises(TypeError, msg=repr(kw)) as cm:
                fn(*args, **kw).close()
            self.assertIn(list(kw)[0], str(cm.exception))
        seen = []
        c.set_route_callback(lambda *a: seen.append(a))
        for setter in (c.set_route_callback, c.set_abort_callback):
            with self.assertRaises(TypeError):
                setter(5)
        c.decode(1)   # the callbacks before the refusals stay
        self.assertTrue(seen)

    def test_generate_refuses_a_wrong_stop_string_at_the_call(self):
        # a streaming generate checked its stop strings at the first piece, after the
        # prompt was decoded, and a NUL in one was a plain ValueError, no MoasError
        self.assertIn("NUL", self.refused(moas.find_stop, "a", ["b", "a\0"]))
        for stream in (True, False):
            self.assertIn("NUL", self.refused(self.model.generate, "And", 3, stop=["a\0"],
                                              stream=stream))
            with self.assertRaises(TypeError):
                self.model.generate("And", 3, stop=["a", 5], stream=stream)

    def test_missing_model_is_a_file_not_found_error_with_its_errno(self):
        import errno
        path = MOAS + ".absent"
        with self.assertRaises(FileNotFoundError) as cm:
            moas.Model(path)
        self.assertEqual(cm.exception.errno, errno.ENOENT)
        self.assertEqual(cm.exception.filename, path)
        self.assertEqual(cm.exception.status, moas.Status.ERR_IO)

    def test_all_logits_of_too_many_tokens_fail_before_allocating(self):
        before = self.ctx.n_past
        with self.assertRaises(moas.MoasValueError) as cm:
            self.ctx.decode_batch([1] * 10**7, logits="all")   # 10^7 rows: gigabytes
        self.assertEqual(cm.exception.status, moas.Status.ERR_CONTEXT_FULL)
        self.assertEqual(self.ctx.n_past, before)
        with moas.Pool(self.model, 1 << 20) as pool, pool.context() as c:
            with self.assertRaises(moas.MoasValueError):
                pool.decode([(c, [1] * 10**7)], logits="all")
            c.decode_batch([1, 2])
            got = pool.decode([(c, [])])[0]   # no tokens: the logits it holds
            self.assertEqual(list(got), list(c.logits()))

    def test_strided_logits_are_sampled_as_their_values(self):
        import array
        n = self.model.n_vocab
        values = array.array("f", [0.0] * (2 * n))
        values[2 * 7] = 5.0   # token 7 of every other float
        with moas.Sampler(self.model, temperature=0) as s:
            self.assertEqual(s.sample(memoryview(values)[::2]), 7)

    def test_a_bad_state_is_not_called_a_gguf_file(self):
        with self.assertRaises(moas.MoasValueError) as cm:
            self.ctx.load_state(b"not a state at all, surely")
        self.assertNotIn("GGUF", str(cm.exception))
        self.assertIn("not a libmoas state", str(cm.exception))

    def test_tensor_views_are_released_with_the_model(self):
        t = self.model.tensor(0)
        self.assertGreater(len(bytes(t.data)), 0)
        self.model.close()
        with self.assertRaises(ValueError):
            bytes(t.data)


if __name__ == "__main__":
    unittest.main()
