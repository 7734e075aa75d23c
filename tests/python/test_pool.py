"""Tests of the KV pool in bindings/python/moas: batched decode equals decoding
alone, fork, saved state, a full pool. Run from the repository root after `make`."""
import os
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
sys.dont_write_bytecode = True
os.environ.setdefault("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
import moas  # noqa: E402

MODEL = os.path.join(ROOT, "tests", "data", "tiny-pooled-bias.gguf")


def tokens(n, n_vocab, seed):
    out = []
    for _ in range(n):
        seed = (seed * 1664525 + 1013904223) % 2**32
        out.append((seed >> 8) % n_vocab)
    return out


class PoolTest(unittest.TestCase):
    def setUp(self):
        self.model = moas.Model(MODEL)
        self.pool = moas.Pool(self.model, 1 << 20, page_heads=4)

    def tearDown(self):
        self.pool.close()
        self.model.close()

    def test_decode_equals_alone(self):
        V = self.model.n_vocab
        prompts = [tokens(n, V, 10 + n) for n in (7, 1, 12)]
        for mode in ("mixture", "routed"):
            ctxs = [self.pool.context(mode=mode) for _ in prompts]
            got = self.pool.decode(zip(ctxs, prompts))
            for ctx, prompt, logits in zip(ctxs, prompts, got):
                with self.model.context(mode=mode) as alone:
                    want = alone.decode_batch(prompt)
                    self.assertEqual(list(want), list(logits))
                    self.assertEqual(list(ctx.logits()), list(want))
                    self.assertEqual(alone.kv_bytes_used(), ctx.kv_bytes_used())
            for ctx in ctxs:
                ctx.close()
        self.assertEqual(self.pool.stats().pages_free, self.pool.stats().n_pages)

    def test_stats_report_the_decode_threads(self):
        with moas.Pool(self.model, 1 << 16, n_threads=3) as pool:
            self.assertEqual(pool.stats().n_threads, 3)
        with moas.Pool(self.model, 1 << 16) as pool, self.model.context() as ctx:
            # 0 resolves as a context's does: the CPUs it may use, within a cgroup quota
            self.assertEqual(pool.stats().n_threads, ctx.n_threads)
            self.assertGreaterEqual(pool.stats().n_threads, 1)

    def test_logits_asked_per_pair(self):
        # one pair's every row, another's last, a third's none, in one call: each what
        # decode_batch gives alone with that choice
        V = self.model.n_vocab
        prompts = [tokens(n, V, 20 + n) for n in (5, 3, 4)]
        ctxs = [self.pool.context(mode="routed") for _ in prompts]
        got = self.pool.decode(list(zip(ctxs, prompts)), logits=["all", "last", "none"])
        with self.model.context(mode="routed") as alone:
            rows = alone.decode_batch(prompts[0], logits="all")
            self.assertEqual([list(r) for r in got[0]], [list(r) for r in rows])
        with self.model.context(mode="routed") as alone:
            self.assertEqual(list(got[1]), list(alone.decode_batch(prompts[1])))
        self.assertIsNone(got[2])
        self.assertEqual([c.n_past for c in ctxs], [5, 3, 4])
        # a list that does not match the pairs, or an unknown value, changes nothing
        for bad in (["all"], ["all", "last", "none", "last"], ["all", "last", "most"]):
            with self.assertRaises(moas.MoasError) as err:
                self.pool.decode(list(zip(ctxs, prompts)), logits=bad)
            self.assertEqual(err.exception.status, moas.Status.ERR_INVALID_ARG)
        self.assertEqual([c.n_past for c in ctxs], [5, 3, 4])
        for c in ctxs:
            c.close()

    def test_a_pair_of_no_tokens_gets_its_logits_whatever_another_thread_does(self):
        # its logits were read after the call let go of the contexts: another thread's
        # decode in between gave that decode's logits (or released the view being
        # copied). The other thread here decodes just there, only if the lock is free.
        import threading
        V = self.model.n_vocab
        idle, busy = self.pool.context(), self.pool.context()
        idle.decode_batch(tokens(4, V, 1))
        before = list(idle.logits())
        logits = idle.logits

        def decode_if_free():
            if idle._lock.acquire(blocking=False):
                try:
                    idle.decode(5)
                finally:
                    idle._lock.release()

        def meddle():
            t = threading.Thread(target=decode_if_free)
            t.start()
            t.join()
            return logits()
        idle.logits = meddle
        got = self.pool.decode([(idle, []), (busy, tokens(3, V, 2))])
        del idle.logits
        self.assertEqual(list(got[0]), before)
        self.assertEqual(idle.n_past, 4)
        idle.close()
        busy.close()

    def test_fork_and_state(self):
        V = self.model.n_vocab
        prompt, tail = tokens(13, V, 1), tokens(5, V, 2)
        parent = self.pool.context(mode="routed")
        parent.decode_batch(prompt)
        held = self.pool.stats().n_pages - self.pool.stats().pages_free
        child = parent.fork()
        self.assertEqual(child.n_past, 13)
        # the child shares the parent's full pages: at most one page more per layer
        grown = self.pool.stats().n_pages - self.pool.stats().pages_free - held
        self.assertLessEqual(grown, self.model.n_layer)
        state = parent.save_state()
        child.decode_batch(tail)
        parent.decode_batch(tail)
        self.assertEqual(list(parent.logits()), list(child.logits()))
        other = self.pool.context(mode="routed")
        other.load_state(state)
        self.assertEqual(other.n_past, 13)
        self.assertEqual(list(other.decode_batch(tail)), list(parent.logits()))
        with self.assertRaises(moas.MoasError) as err:
            other.load_state(state[:-1])
        self.assertEqual(err.exception.status, moas.Status.ERR_CORRUPT)
        self.assertEqual(other.n_past, 18)
        for c in (parent, child, other):
            c.close()

    def test_full_pool_raises_and_changes_nothing(self):
        small = moas.Pool(self.model, 2 * 4 * self.model.head_dim * 4 * 8, page_heads=4)
        ctx = small.context()
        with self.assertRaises(moas.MoasError) as err:
            small.decode([(ctx, tokens(30, self.model.n_vocab, 3))])
        self.assertEqual(err.exception.status, moas.Status.ERR_POOL_FULL)
        self.assertIn("lacks", str(err.exception))
        self.assertEqual(ctx.n_past, 0)
        self.assertEqual(small.stats().pages_free, 8)
        ctx.close()
        small.close()

    def test_a_route_callback_error_undoes_the_whole_decode(self):
        # as decode_batch: the call is undone for every context in it, the exception
        # raised; once the callback behaves, the same decode gives the same logits
        V = self.model.n_vocab
        failing = {"on": True}

        def boom(pos, layer, gates, proposed):
            if failing["on"] and pos == 3:
                raise RuntimeError("boom at %d" % pos)
        plain = self.pool.context(mode="routed")
        picky = self.pool.context(mode="routed", route_callback=boom)
        plain.decode_batch(tokens(2, V, 5))
        picky.decode_batch(tokens(2, V, 6))
        free = self.pool.stats().pages_free
        batch = [(plain, tokens(4, V, 7)), (picky, tokens(4, V, 8))]
        with self.assertRaises(RuntimeError) as err:
            self.pool.decode(batch)
        self.assertIn("boom at 3", str(err.exception))
        self.assertEqual((plain.n_past, picky.n_past), (2, 2))
        self.assertEqual(self.pool.stats().pages_free, free)
        failing["on"] = False
        got = self.pool.decode(batch)   # the error is not raised again
        with self.model.context(mode="routed") as alone:
            alone.decode_batch(tokens(2, V, 5))
            self.assertEqual(list(got[0]), list(alone.decode_batch(tokens(4, V, 7))))
        for c in (plain, picky):
            c.close()

    # ---- abort callbacks: a stopped call is undone, the same call later is exact ----

    def state(self, ctx):
        """What an aborted call must leave as it was."""
        return (ctx.n_past, ctx.kv_bytes_used(), ctx.kv_bytes_held, ctx.kv_pages,
                ctx.scheme_counts(), self.pool.stats().pages_free)

    def test_an_abort_callback_stops_decode_batch_at_any_ask_and_loses_nothing(self):
        # 40 tokens in blocks of 8 over 2 layers: asked before each block and between
        # its layers, 10 times; stopped at each, the context is as before the call
        V = self.model.n_vocab
        prompt, tail = tokens(6, V, 40), tokens(40, V, 41)
        asked, stop_at = [0], [0]

        def stop():
            asked[0] += 1
            return asked[0] == stop_at[0]
        ctx = self.pool.context(mode="routed", n_batch=8, abort_callback=stop)
        never = self.pool.context(mode="routed", n_batch=8)
        ctx.decode_batch(prompt)
        never.decode_batch(prompt)
        want = [bytes(row) for row in never.decode_batch(tail, logits="all")]
        before = self.state(ctx)
        for k in range(1, 11):
            asked[0], stop_at[0] = 0, k
            with self.assertRaises(moas.MoasError) as err:
                ctx.decode_batch(tail, logits="all")
            self.assertEqual(err.exception.status, moas.Status.ERR_ABORTED)
            self.assertIn("abort callback", str(err.exception))
            self.assertEqual(asked[0], k)
            self.assertEqual(self.state(ctx), before)
            self.assertIsNone(ctx.logits())
        asked[0], stop_at[0] = 0, 2   # one token: between its layers
        with self.assertRaises(moas.MoasError) as err:
            ctx.decode(tail[0])
        self.assertEqual(err.exception.status, moas.Status.ERR_ABORTED)
        self.assertEqual(self.state(ctx), before)
        asked[0], stop_at[0] = 0, 0
        got = [bytes(row) for row in ctx.decode_batch(tail, logits="all")]
        self.assertEqual(asked[0], 10)
        self.assertEqual(got, want)   # bit for bit
        self.assertEqual(ctx.route_lists(), never.route_lists())
        ctx.set_abort_callback(None)   # removed: never asked again
        ctx.decode(tail[0])
        self.assertEqual(asked[0], 10)
        for c in (ctx, never):
            c.close()

    def test_an_abort_callback_stops_a_pool_decode_for_every_context(self):
        # one context's callback stops the call: the other context, with no callback,
        # is undone too; without the stop the same call gives what decoding alone does
        V = self.model.n_vocab
        stopping = [False]
        plain = self.pool.context(mode="routed")
        stopper = self.pool.context(mode="routed", abort_callback=lambda: stopping[0])
        idle = self.pool.context(mode="routed")   # in the call with no tokens
        plain.decode_batch(tokens(3, V, 50))
        stopper.decode_batch(tokens(3, V, 51))
        idle_logits = bytes(idle.decode_batch(tokens(2, V, 52)))
        batch = [(plain, tokens(9, V, 53)), (stopper, tokens(5, V, 54)), (idle, [])]
        before = [self.state(c) for c in (plain, stopper, idle)]
        stopping[0] = True
        with self.assertRaises(moas.MoasError) as err:
            self.pool.decode(batch)
        self.assertEqual(err.exception.status, moas.Status.ERR_ABORTED)
        self.assertEqual([self.state(c) for c in (plain, stopper, idle)], before)
        self.assertIsNone(plain.logits())
        self.assertIsNone(stopper.logits())
        self.assertEqual(bytes(idle.logits()), idle_logits)   # not decoded: kept
        stopping[0] = False
        got = self.pool.decode(batch)
        with self.model.context(mode="routed") as alone:
            alone.decode_batch(tokens(3, V, 50))
            self.assertEqual(bytes(got[0]), bytes(alone.decode_batch(tokens(9, V, 53))))
        for c in (plain, stopper, idle):
            c.close()

    def test_an_abort_callback_error_stops_the_call_and_is_raised(self):
        # the exception cannot cross the library's frames: the callback says stop, and
        # the exception, not ERR_ABORTED, is raised once the library has undone the call
        V = self.model.n_vocab
        failing = [False]

        def boom():
            if failing[0]:
                raise KeyError("from the abort callback")
            return False
        ctx = self.pool.context(mode="routed", abort_callback=boom)
        other = self.pool.context(mode="routed")
        ctx.decode_batch(tokens(4, V, 60))
        before = self.state(ctx)
        failing[0] = True
        with self.assertRaises(KeyError):
            ctx.decode_batch(tokens(5, V, 61))
        self.assertEqual(self.state(ctx), before)
        self.assertIsNone(ctx.logits())
        with self.assertRaises(KeyError):
            self.pool.decode([(other, tokens(5, V, 62)), (ctx, tokens(5, V, 61))])
        self.assertEqual((other.n_past, ctx.n_past), (0, 4))
        failing[0] = False   # the error is not raised again
        ctx.decode_batch(tokens(5, V, 61))
        self.assertEqual(ctx.n_past, 9)
        for c in (ctx, other):
            c.close()

    def test_a_fork_keeps_the_abort_callback_and_its_errors_are_its_own(self):
        V = self.model.n_vocab
        calls = []

        def stop_or_fail():
            calls.append(1)
            if len(calls) == 2:
                raise ValueError("second ask")
            return len(calls) == 1
        parent = self.pool.context(mode="routed")
        parent.decode_batch(tokens(5, V, 70))
        parent.set_abort_callback(stop_or_fail)
        child = parent.fork()
        with self.assertRaises(moas.MoasError) as err:
            child.decode(3)
        self.assertEqual(err.exception.status, moas.Status.ERR_ABORTED)
        with self.assertRaises(ValueError):   # raised by the child's call, not kept
            child.decode(3)
        self.assertEqual((parent.n_past, child.n_past), (5, 5))
        parent.decode(3)   # the parent's own call: nothing of the child's error
        child.set_abort_callback(None)
        self.assertEqual(len(calls), 4)   # two asks of parent.decode, the child's own
        child.decode(3)
        self.assertEqual(len(calls), 4)
        self.assertEqual(bytes(child.logits()), bytes(parent.logits()))
        for c in (parent, child):
            c.close()

    def test_fork_needs_a_pool(self):
        with self.model.context() as ctx:
            with self.assertRaises(moas.MoasError):
                ctx.fork()


if __name__ == "__main__":
    unittest.main()
