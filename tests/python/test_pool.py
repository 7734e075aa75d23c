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

    def test_fork_needs_a_pool(self):
        with self.model.context() as ctx:
            with self.assertRaises(moas.MoasError):
                ctx.fork()


if __name__ == "__main__":
    unittest.main()
