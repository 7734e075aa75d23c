"""Tests of tools/train.py's router recipes for pooled_moas: --balance, --router-entropy,
--router-z-loss, --kv-penalty-warmup/--kv-penalty-schedule, --gate-temperature,
--kv-target-per-layer and --init-from.

Run from the repository root:  python3 -m unittest discover -s tests/python -t . -q

They need torch.  Without it in this interpreter, one test reruns this file under
$TORCH_PY (default /usr/bin/python3, Debian's python3-torch) and skips when that has
no torch either.  The last checks load the converted model in the C library with
$MOAS_BIN (default bin/moas, which `make` builds) and skip without it.  Everything
runs with one thread and tiny shapes: under a minute on a machine busy with training.
"""
import contextlib
import io
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import unittest
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
TRAIN = os.path.join(TOOLS, "train.py")
CONVERT = os.path.join(TOOLS, "moas-convert")
TINY = os.path.join(ROOT, "tests", "data", "tiny.txt")
MOAS = os.environ.get("MOAS_BIN") or os.path.join(ROOT, "bin", "moas")
TORCH_PY = os.environ.get("TORCH_PY", "/usr/bin/python3")
sys.dont_write_bytecode = True

try:
    import torch
except ImportError:
    torch = None

if torch is not None:
    sys.path.insert(0, TOOLS)
    import train  # noqa: E402
    from torch.nn import functional as F  # noqa: E402
    torch.set_num_threads(1)

needs_torch = unittest.skipUnless(torch is not None, "torch not installed")
needs_moas = unittest.skipUnless(os.access(MOAS, os.X_OK), "no %s (run make)" % MOAS)
LN2, LN3 = math.log(2.0), math.log(3.0)


class TestUserMistakes(unittest.TestCase):
    """Mistakes on train.py's command line end in a line saying what is wrong (after
    argparse's usage, for its own) and a failing status, never a traceback, with or
    without torch here (without it, that line says so)."""

    def run_train(self, *args):
        res = subprocess.run([sys.executable, TRAIN] + list(args), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertNotIn("Traceback", res.stderr)
        self.assertNotEqual(res.returncode, 0, res.stdout)
        return res.stderr.strip().splitlines()[-1]   # argparse's usage lines before it

    def test_one_line_each(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t.pt")
            cases = [
                (["--data", os.path.join(d, "missing.txt"), "--out", out], "cannot read"),
                (["--data", d, "--out", out], "not a regular file"),
                (["--data", os.path.join(ROOT, "tests", "data", "tiny-ckpt.pt"), "--out", out],
                 "not UTF-8 text"),
                (["--data", TINY, "--out", out, "--n-head", "0"], "not a positive integer"),
                (["--data", TINY, "--out", out, "--eval-interval", "0"], "not a positive"),
                (["--data", TINY, "--out", out, "--dropout", "1.5"], "outside [0, 1)"),
                (["--data", TINY, "--out", os.path.join(d, "no", "t.pt")], "does not exist"),
                (["--data", TINY, "--out", out, "--n-embd", "10", "--n-head", "4"],
                 "not a multiple"),
                # the router's C/4 hidden units would be none (a file libmoas refuses)
                (["--data", TINY, "--out", out, "--attention-type", "pooled_moas",
                  "--n-embd", "2", "--n-head", "2"], "router of n_embd / 4 = 0 hidden units"),
            ]
            for args, needle in cases:
                err = self.run_train(*args)
                if torch is None:
                    self.assertIn("PyTorch is not installed", err)
                else:
                    self.assertIn(needle, err, args)

    def test_a_nan_option_is_a_usage_error(self):
        """--kv-penalty nan trained NaN weights and saved them with status 0."""
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t.pt")
            res = subprocess.run([sys.executable, TRAIN, "--data", TINY, "--out", out,
                                  "--attention-type", "pooled_moas", "--kv-penalty", "nan",
                                  "--n-layer", "1", "--n-embd", "8", "--n-head", "2",
                                  "--block-size", "8", "--batch-size", "2", "--iters", "2",
                                  "--eval-interval", "2", "--eval-iters", "1", "--threads", "1"],
                                 capture_output=True, text=True, timeout=60)
            if torch is None:
                self.assertIn("PyTorch is not installed", res.stderr)
            else:
                self.assertEqual(res.returncode, 2, res.stdout + res.stderr)
                self.assertIn("argument --kv-penalty: nan is not a finite number",
                              res.stderr.strip().splitlines()[-1])
            self.assertFalse(os.path.exists(out))


@needs_torch
class TestNumberOptions(unittest.TestCase):
    def test_refuse_non_finite_and_out_of_range_values(self):
        """A NaN or infinite number option, or one outside its range, is a usage error
        (status 2) naming the option, before anything trains (--lr -1 or nan ended in
        a torch traceback)."""
        cases = [
            ("--lr", "nan", "not a finite number"), ("--lr", "inf", "not a finite number"),
            ("--lr", "-1", "not > 0"), ("--lr", "0", "not > 0"),
            ("--lr", "fast", "is not a number"),
            ("--min-lr", "-1e-4", "negative"), ("--kv-penalty", "nan", "not a finite"),
            ("--kv-penalty", "-0.5", "negative"),
            ("--load-balance-weight", "inf", "not a finite"),
            ("--router-entropy", "nan", "not a finite"), ("--router-z-loss", "-1", "negative"),
            ("--grad-clip", "-inf", "not a finite"), ("--rope-base", "1", "not > 1"),
            ("--init-std", "-1", "negative"), ("--kv-init-scale", "0", "not > 0"),
            ("--gate-temperature", "nan", "not a finite"), ("--dropout", "nan", "finite"),
            ("--warmup", "-1", "negative"), ("--hard-top1-from", "-1", "negative"),
            ("--kv-penalty-warmup", "-3", "negative"),
            ("--n-ff", "0", "not a positive integer"), ("--n-ff", "-4", "not a positive"),
            ("--kv-heads", "0", "not a positive integer"),
            ("--seed", str(2**64), "outside -2^63 .. 2^64-1"),
            ("--seed", str(-2**63 - 1), "outside"),
        ]
        for opt, value, needle in cases:
            err = io.StringIO()
            with self.assertRaises(SystemExit, msg=(opt, value)) as cm, \
                    contextlib.redirect_stderr(err):
                options(opt + "=" + value)      # "=": argparse takes -1e-4 for an option
            self.assertEqual(cm.exception.code, 2, (opt, value))
            last = err.getvalue().strip().splitlines()[-1]
            self.assertIn("argument %s: " % opt, last)
            self.assertIn(needle, last, (opt, value))
        self.assertEqual(options("--router-entropy=-0.5").router_entropy, -0.5)
        self.assertEqual(options("--grad-clip", "0").grad_clip, 0.0)
        self.assertEqual(options("--seed=%d" % (2**64 - 1)).seed, 2**64 - 1)
        self.assertEqual(options("--seed=-1").seed, -1)


@unittest.skipIf(torch is not None, "torch is here: the tests run in this interpreter")
class TestUnderTorchPython(unittest.TestCase):
    def test_rerun_with_torch(self):
        try:
            ok = subprocess.run([TORCH_PY, "-c", "import torch"], capture_output=True).returncode
        except OSError:
            ok = 1
        if ok:
            self.skipTest("torch not installed here nor for %s (apt-get install python3-torch)"
                          % TORCH_PY)
        r = subprocess.run([TORCH_PY, "-m", "unittest", "discover", "-s", "tests/python",
                            "-t", ".", "-p", os.path.basename(__file__), "-q"],
                           cwd=ROOT, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


def options(*argv):
    return train.parse_args(["--data", TINY, "--out", "unused.pt",
                             "--attention-type", "pooled_moas"] + list(argv))


def tiny_args(atype="pooled_moas", bias=True, **kw):
    base = dict(n_layer=2, n_head=4, n_embd=16, block_size=32, bias=bias, vocab_size=47,
                dropout=0.0, attention_type=atype)
    base.update(kw)
    return train.ModelArgs(**base)


def tiny_model(atype="pooled_moas", seed=0, std=0.25, **kw):
    torch.manual_seed(seed)
    model = train.MoASGPT(tiny_args(atype, **kw))
    train.init_weights(model, std)
    return model.eval()


def tokens(n=32, batch=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 47, (batch, n), generator=g)


# ---------------------------------------------------------------------------
# Loss terms against hand-computed values
# ---------------------------------------------------------------------------

# Gates of two layers, 4 tokens, 3 schemes.  Layer 0: argmax 0, 1, 0, 2, so
# f = (1/2, 1/4, 1/4) and the mean gates p = (0.35, 0.35, 0.3); layer 1 all uniform,
# every argmax the lowest index 0: f = (1, 0, 0), p = (1/3, 1/3, 1/3).
GATES = [[[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]],
         [[1 / 3.0] * 3] * 4]
# Router logits of two layers, 2 tokens: rows (0, 0, 0) and (ln 2, 0, 0), then
# the same shifted by +5 and -1 (the same gates: 1/3 each, and (1/2, 1/4, 1/4)).
LOGITS = [[[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]],
          [[5.0, 5.0, 5.0], [LN2 - 1.0, -1.0, -1.0]]]


def as_layers(rows, requires_grad=False):
    return [torch.tensor([layer], dtype=torch.float64, requires_grad=requires_grad)
            for layer in rows]


@needs_torch
class TestLossTerms(unittest.TestCase):
    def test_switch_balance(self):
        g = as_layers(GATES, requires_grad=True)
        # layer 0: 3 * (0.5*0.35 + 0.25*0.35 + 0.25*0.3) = 1.0125; layer 1: 3 * 1/3 = 1
        loss = train.balance_loss(g, "switch")
        self.assertAlmostEqual(loss.item(), (1.0125 + 1.0) / 2, places=12)
        loss.backward()
        # f has no gradient: d/dg[t, s] = S * f_s / (B*T) / L
        self.assertAlmostEqual(g[0].grad[0, 0, 0].item(), 3 * 0.5 / 4 / 2, places=12)
        self.assertAlmostEqual(g[0].grad[0, 3, 2].item(), 3 * 0.25 / 4 / 2, places=12)
        self.assertAlmostEqual(g[1].grad[0, 1, 1].item(), 0.0, places=12)
        # mse (default, unchanged): layer 0 ((1/60)^2 * 2 + (1/30)^2) / 3, layer 1 0
        self.assertAlmostEqual(train.balance_loss(as_layers(GATES), "mse").item(),
                               1 / 1800.0 / 2, places=12)
        self.assertAlmostEqual(train.balance_loss(as_layers(GATES)).item(), 1 / 3600.0,
                               places=12)
        self.assertIsNone(train.balance_loss(as_layers(GATES), "none"))
        self.assertIsNone(train.balance_loss([], "switch"))

    def test_entropy_and_z_loss(self):
        z = as_layers(LOGITS)
        want_z = ((LN3 ** 2 + math.log(4) ** 2 + (5 + LN3) ** 2 + (math.log(4) - 1) ** 2) / 4)
        self.assertAlmostEqual(train.router_z_loss(z).item(), want_z, places=12)
        # uniform: ln 3; (1/2, 1/4, 1/4): 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
        self.assertAlmostEqual(train.router_entropy(z).item(), (LN3 + 1.5 * LN2) / 2, places=12)

    def test_kv_schedule(self):
        at = train.kv_penalty_at
        for it, want in ((0, 0.0), (1, 0.05), (2, 0.1), (3, 0.15), (4, 0.2), (100, 0.2)):
            self.assertAlmostEqual(at(it, 0.2, 4, "linear"), want, places=12)
        r = math.sqrt(0.5)                  # cos(pi/4): 0.2 * (1 - cos(pi * it/4)) / 2
        for it, want in ((0, 0.0), (1, 0.1 * (1 - r)), (2, 0.1), (3, 0.1 * (1 + r)), (4, 0.2)):
            self.assertAlmostEqual(at(it, 0.2, 4, "cosine"), want, places=12)
        for it in (0, 1, 5):
            self.assertEqual(at(it, 0.2, 4, "constant"), 0.2)
            self.assertEqual(at(it, 0.2, 0, "linear"), 0.2)    # N = 0: today's behaviour
            self.assertEqual(at(it, 0.2, 0, "cosine"), 0.2)

    def test_kv_targets_and_shares(self):
        g = as_layers(GATES)
        # schemes [4, 2, 1] of H = 4 cost (1, 1/2, 1/4). Layer 0 per token: 0.6+0.15+0.025,
        # 0.2+0.25+0.075, 0.5+0.2+0.025, 0.1+0.1+0.175 -> mean 2.4/4; layer 1: 1.75/3
        kv = train.kv_fractions_per_layer(g, [4, 2, 1], 4)
        self.assertEqual(tuple(kv.shape), (2,))
        self.assertAlmostEqual(kv[0].item(), 0.6, places=12)
        self.assertAlmostEqual(kv[1].item(), 1.75 / 3, places=12)
        self.assertAlmostEqual(kv.mean().item(),
                               train.kv_fractions(g, [4, 2, 1], 4)[0].item(), places=12)
        pen = train.kv_target_penalty(kv, [0.5, 0.8])    # relu(0.1), relu(-0.22) = 0
        self.assertAlmostEqual(pen.item(), 0.1 / 2, places=12)
        # all targets 0: the plain penalty on the mean kv fraction
        self.assertAlmostEqual(train.kv_target_penalty(kv, [0.0, 0.0]).item(),
                               kv.mean().item(), places=12)
        self.assertEqual(train.parse_kv_targets("1.0, 0.5", 2), [1.0, 0.5])
        for bad in ("1,0.5,0.2", "1,x", "1,1.5", "-0.1,1"):
            with self.assertRaises(ValueError, msg=bad):
                train.parse_kv_targets(bad, 2)
        self.assertEqual(train.scheme_shares(g).tolist(), [[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]])

    def test_training_loss_assembly(self):
        """cmd_train's loss: every option changes it by its hand-computed term."""
        z = as_layers(LOGITS)
        g = [F.softmax(x, -1) for x in z]
        ce = torch.tensor(2.0, dtype=torch.float64)
        # Both layers' gates: (1/3, 1/3, 1/3) and (1/2, 1/4, 1/4).  Both argmax 0:
        # switch 3 * (1/3 + 1/2)/2 = 1.25; mse (1/144 + 2/576)/3 = 1/288.  kv with
        # schemes [4, 2, 1]: (7/12 + 11/16)/2 = 61/96 in both layers.
        args = ("--schemes", "4,2,1", "--kv-penalty", "0.4")

        def total(*argv, it=1):
            o = options(*(args + argv))
            return train.training_loss(o, it, ce, g, z, [4, 2, 1], 4,
                                       train.parse_kv_targets(o.kv_target_per_layer, 2)
                                       if o.kv_target_per_layer else None)[0].item()

        base = 2.0 + 0.01 / 288 + 0.4 * 61 / 96
        self.assertAlmostEqual(total(), base, places=12)
        self.assertAlmostEqual(total("--balance", "none"), base - 0.01 / 288, places=12)
        self.assertAlmostEqual(total("--balance", "switch", "--load-balance-weight", "0.1"),
                               base - 0.01 / 288 + 0.1 * 1.25, places=12)
        self.assertAlmostEqual(total("--router-entropy", "0.2"),
                               base + 0.2 * (LN3 + 1.5 * LN2) / 2, places=12)
        self.assertAlmostEqual(total("--router-entropy", "-0.2"),
                               base - 0.2 * (LN3 + 1.5 * LN2) / 2, places=12)
        want_z = ((LN3 ** 2 + math.log(4) ** 2 + (5 + LN3) ** 2 + (math.log(4) - 1) ** 2) / 4)
        self.assertAlmostEqual(total("--router-z-loss", "0.03"), base + 0.03 * want_z, places=12)
        # lambda 0.4 * 1/4 at iteration 1 of a 4-iteration linear ramp
        ramp = ("--kv-penalty-warmup", "4", "--kv-penalty-schedule", "linear")
        self.assertAlmostEqual(total(*ramp), base - 0.3 * 61 / 96, places=12)
        self.assertAlmostEqual(total(*ramp, it=4), base, places=12)
        # targets 0.5, 0.25: (13/96 + 37/96) / 2 = 25/96 instead of 61/96
        self.assertAlmostEqual(total("--kv-target-per-layer", "0.5,0.25"),
                               base - 0.4 * 61 / 96 + 0.4 * 25 / 96, places=12)
        # the moas router (no logits): the balance term only
        o = options("--balance", "switch")
        self.assertAlmostEqual(train.training_loss(o, 0, ce, g)[0].item(), 2.0 + 0.01 * 1.25,
                               places=12)

    def test_option_errors(self):
        scratch = tempfile.TemporaryDirectory()   # of its own: no file of another run
        self.addCleanup(scratch.cleanup)

        def fails(*argv):
            out = os.path.join(scratch.name, "never-written.pt")
            with self.assertRaises(SystemExit, msg=argv) as cm, \
                    contextlib.redirect_stdout(io.StringIO()):
                train.main(["--data", TINY, "--out", out, "--init-only", "--n-layer", "2",
                            "--n-embd", "24", "--n-head", "6", "--block-size", "8"]
                           + list(argv))
            self.assertFalse(os.path.exists(out))
            return str(cm.exception.code)
        self.assertIn("pooled_moas", fails("--attention-type", "moas", "--router-z-loss", "1"))
        self.assertIn("pooled_moas", fails("--attention-type", "baseline",
                                           "--gate-temperature", "2"))
        self.assertIn("--kv-penalty", fails("--attention-type", "pooled_moas",
                                            "--kv-target-per-layer", "1,0.5"))
        self.assertIn("2 layers", fails("--attention-type", "pooled_moas", "--kv-penalty", "1",
                                        "--kv-target-per-layer", "1,0.5,0.2"))
        self.assertIn("constant", fails("--attention-type", "pooled_moas", "--kv-penalty", "1",
                                         "--kv-penalty-warmup", "5",
                                         "--kv-penalty-schedule", "constant"))
        self.assertIn("pooled_moas", fails("--attention-type", "gqa", "--kv-init-scale", "2"))
        # learned positions have no base: --rope-base was ignored
        self.assertIn("--rope-base is for --pos rope", fails("--rope-base", "500"))
        # a schedule that would rise: refused (it trained on, never decaying)
        self.assertIn("--min-lr 0.01 is above --lr 0.001",
                      fails("--lr", "0.001", "--min-lr", "0.01"))

    def test_model_args_defaults_only_when_missing(self):
        """rope_base and n_ff take their defaults when missing (None), not when 0: 0
        trained with base 10000 and width 4C.  Each bad value has its own message."""
        self.assertEqual(tiny_args("baseline", pos="rope", rope_base=None).rope_base, 10000.0)
        self.assertEqual(tiny_args("baseline", n_ff=None).n_ff, 64)
        self.assertEqual(tiny_args("baseline", pos="rope", rope_base=500).rope_base, 500.0)
        for kw, needle in ((dict(pos="rope", rope_base=0), "rope_base must be"),
                           (dict(pos="rope", rope_base=float("nan")), "rope_base must be"),
                           (dict(n_ff=0), "n_ff must be >= 1, not 0"),
                           (dict(n_ff=-4), "n_ff must be >= 1, not -4"),
                           (dict(pos=""), "unknown block option")):
            with self.assertRaises(ValueError, msg=kw) as cm:
                tiny_args("baseline", **kw)
            self.assertIn(needle, str(cm.exception), kw)
            self.assertNotIn("and", str(cm.exception).split(":")[0], kw)

    def test_kv_init_scale(self):
        """--kv-init-scale F multiplies the initial k_proj/v_proj weights, nothing else."""
        def init(*argv):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "init.pt")
                with contextlib.redirect_stdout(io.StringIO()):
                    train.main(["--data", TINY, "--out", out, "--init-only", "--n-layer", "2",
                                "--n-embd", "24", "--n-head", "6", "--block-size", "8",
                                "--attention-type", "pooled_moas"] + list(argv))
                return torch.load(out)["model"]
        plain, scaled = init(), init("--kv-init-scale", "2.5")
        for name, w in plain.items():
            if name.endswith(("k_proj.weight", "v_proj.weight")):
                self.assertTrue(torch.equal(scaled[name], w * 2.5), name)
            else:
                self.assertTrue(torch.equal(scaled[name], w), name)


# ---------------------------------------------------------------------------
# --gate-temperature: folded into the saved router
# ---------------------------------------------------------------------------

def convert(ckpt, gguf_path):
    r = subprocess.run([sys.executable, CONVERT, ckpt, "-o", gguf_path, "--vocab-text", TINY],
                       capture_output=True, text=True)
    if r.returncode:
        raise AssertionError("moas-convert failed: %s" % r.stderr)


def moas(*argv):
    r = subprocess.run([MOAS] + list(argv) + ["-t", "1"], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise AssertionError("moas %s failed: %s" % (argv[0], r.stderr))
    return r.stdout


@needs_torch
class TestGateTemperature(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def saved(self, model, t, name="t.pt"):
        path = os.path.join(self.tmp.name, name)
        train.save_checkpoint(path, model, train.make_optimizer(model, 1e-3), 0, float("inf"),
                              {}, t)
        return path

    def test_folded_checkpoint_equals_training_forward(self):
        x = tokens()
        for bias in (True, False):
            with self.subTest(bias=bias):
                model = tiny_model(bias=bias)
                model.set_gate_temperature(0.37)
                with torch.no_grad():
                    want = {r: model(x, r) for r in ("soft", "hard")}
                    z = model(x, with_router_logits=True)[2]
                self.assertGreater(max((F.softmax(zl * 0.37, -1) - g).abs().max().item()
                                       for zl, g in zip(z, want["soft"][1])), 1e-2)
                path = self.saved(model, 0.37)
                loaded, margs = train.load_checkpoint(path)
                self.assertNotIn("gate_temperature", margs)
                self.assertEqual(sorted(loaded.state_dict()), sorted(model.state_dict()))
                with torch.no_grad():
                    for routing, (logits, gates) in want.items():
                        got_logits, got_gates = loaded.eval()(x, routing)
                        self.assertLess((got_logits - logits).abs().max().item(), 1e-5)
                        for a, b in zip(got_gates, gates):
                            self.assertLess((a - b).abs().max().item(), 1e-6)
                    # unfolded, the mixture logits would differ
                    model.set_gate_temperature(1.0)
                    plain = train.load_checkpoint(self.saved(model, 1.0, "p.pt"))[0].eval()
                    self.assertGreater((plain(x)[0] - want["soft"][0]).abs().max().item(), 1e-3)
                # the temperature's router logits: softmax(z) are the gates
                for zl, g in zip(z, want["soft"][1]):
                    self.assertLess((F.softmax(zl, -1) - g).abs().max().item(), 1e-6)

    @needs_moas
    def test_libmoas_mixture_logits(self):
        """The GGUF of a T = 0.37 model: libmoas's mixture logits equal the training
        forward with the temperature."""
        model = tiny_model(bias=True, n_head=6, n_embd=24)
        model.set_gate_temperature(0.37)
        with open(TINY, encoding="utf-8") as f:
            text = f.read()
        chars, stoi = train.build_vocab(text)
        text = text[:32]
        with torch.no_grad():
            want = model(torch.tensor([[stoi[c] for c in text]]))[0][0]
        path = self.saved(model, 0.37)
        gg = os.path.join(self.tmp.name, "t.gguf")
        convert(path, gg)
        txt = os.path.join(self.tmp.name, "text")
        with open(txt, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        out = os.path.join(self.tmp.name, "logits")
        moas("logits", "-m", gg, "-f", txt, "-o", out, "--mode", "mixture")
        with open(out, "rb") as f:
            got = torch.tensor(array("f", f.read())).view(len(text), -1)
        self.assertEqual(tuple(got.shape), tuple(want.shape))
        self.assertLess((got - want).abs().max().item(), 1e-4)


# ---------------------------------------------------------------------------
# --init-from
# ---------------------------------------------------------------------------

@needs_torch
class TestInitFrom(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.tmp.cleanup()

    def save(self, model, name):
        path = os.path.join(self.tmp.name, name)
        train.save_checkpoint(path, model, train.make_optimizer(model, 1e-3), 0, float("inf"),
                              {})
        return path

    def test_baseline_into_pooled_forced_to_mha(self):
        x = tokens()
        for kw in (dict(bias=True), dict(bias=False, pos="rope", norm="rms", mlp="swiglu",
                                         n_ff=48)):
            with self.subTest(**kw):
                mha = tiny_model("baseline", seed=1, **kw)
                path = self.save(mha, "mha.pt")
                pooled = tiny_model("pooled_moas", seed=2, **kw)
                router_before = pooled.transformer.h[0].attn.router[0].weight.clone()
                got = train.init_from_checkpoint(pooled, path)
                self.assertEqual(got["from"], "baseline")
                self.assertEqual(len(got["split"]), 2 * (2 if kw["bias"] else 1))
                self.assertEqual(sorted(set(k.split(".attn.")[1] for k in got["new"])),
                                 ["router.0.bias", "router.0.weight", "router.2.bias",
                                  "router.2.weight"] if kw["bias"]
                                 else ["router.0.weight", "router.2.weight"])
                self.assertTrue(torch.equal(pooled.transformer.h[0].attn.router[0].weight,
                                            router_before))
                c_attn = mha.transformer.h[1].attn.c_attn.weight
                self.assertTrue(torch.equal(pooled.transformer.h[1].attn.k_proj.weight,
                                            c_attn[16:32]))
                # Router forced to scheme 0 (H heads): router.2 all zero, so the gates tie
                # and the argmax is the lowest index.
                with torch.no_grad():
                    for block in pooled.transformer.h:
                        for p in block.attn.router[2].parameters():
                            p.zero_()
                    want = mha(x)[0]
                    logits, gates = pooled(x, "hard")
                    self.assertTrue(all((g.argmax(-1) == 0).all() for g in gates))
                    self.assertLess((logits - want).abs().max().item(), 1e-5)
                    # the soft mixture of all three schemes is not the MHA model: the check
                    # has teeth
                    self.assertGreater((pooled(x, "soft")[0] - want).abs().max().item(), 1e-4)

    def test_same_type_copies_all(self):
        x = tokens()
        src = tiny_model("pooled_moas", seed=3)
        src.untie()                              # an lm_head of its own, and different
        with torch.no_grad():
            src.lm_head.weight.mul_(0.5)
        path = self.save(src, "p.pt")
        dst = tiny_model("pooled_moas", seed=4)
        got = train.init_from_checkpoint(dst, path)
        self.assertEqual((got["split"], got["new"]), ([], []))
        self.assertIsNot(dst.lm_head.weight, dst.transformer.wte.weight)
        with torch.no_grad():
            for routing in ("soft", "hard"):
                self.assertTrue(torch.equal(dst(x, routing)[0], src(x, routing)[0]))

    def test_refused(self):
        path = self.save(tiny_model("baseline"), "b.pt")
        for model, what in ((tiny_model("pooled_moas", n_layer=3), "n_layer"),
                            (tiny_model("pooled_moas", bias=False), "bias"),
                            (tiny_model("gqa"), "gqa"),
                            (tiny_model("moas"), "moas")):
            with self.assertRaises(ValueError) as cm:
                train.init_from_checkpoint(model, path)
            self.assertIn(what, str(cm.exception))
        path = self.save(tiny_model("pooled_moas"), "p.pt")
        with self.assertRaises(ValueError) as cm:
            train.init_from_checkpoint(tiny_model("pooled_moas", schemes=[4, 1]), path)
        self.assertIn("schemes", str(cm.exception))


# ---------------------------------------------------------------------------
# Smoke: all options at once, converted and run by libmoas
# ---------------------------------------------------------------------------

@needs_torch
class TestDivergence(unittest.TestCase):
    """A run whose loss turns NaN or infinite stops there with a failing status and
    writes no checkpoint, rather than training on and saving NaN weights."""

    def test_nan_loss_stops_the_run_and_saves_nothing(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t.pt")
            log = io.StringIO()
            with self.assertRaises(SystemExit) as cm, contextlib.redirect_stdout(log):
                # finite but absurd: Adam's first step moves every weight by about 1e30
                train.main(["--data", TINY, "--out", out, "--n-layer", "1", "--n-embd", "8",
                            "--n-head", "2", "--block-size", "8", "--batch-size", "2",
                            "--iters", "4", "--eval-interval", "2", "--eval-iters", "1",
                            "--warmup", "0", "--lr", "1e30", "--dropout", "0",
                            "--log-interval", "1", "--attention-type", "baseline"])
            msg = str(cm.exception.code)
            self.assertIn("diverged", msg)
            self.assertIn("at iteration 1", msg)
            self.assertIn("nothing saved", msg)
            self.assertFalse(os.path.exists(out))
            self.assertFalse(os.path.exists(out + ".tmp"))
            self.assertNotIn("saved", log.getvalue())

    def test_non_finite_initial_weights_are_not_saved(self):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t.pt")
            with self.assertRaises(SystemExit) as cm, \
                    contextlib.redirect_stdout(io.StringIO()):
                # each finite, their product beyond float32
                train.main(["--data", TINY, "--out", out, "--init-only", "--n-layer", "1",
                            "--n-embd", "8", "--n-head", "2", "--block-size", "8",
                            "--attention-type", "pooled_moas", "--kv-init-scale", "1e300"])
            self.assertIn("k_proj.weight", str(cm.exception.code))
            self.assertFalse(os.path.exists(out))


@needs_torch
class TestSavedLoss(unittest.TestCase):
    def test_checkpoint_and_log_give_the_saved_weights_val_loss(self):
        """The checkpoint holds the last iteration's weights: its best_val_loss and the
        last line give their val loss, the last evaluation's, and the line the lowest
        seen as well (both were the lowest, for other weights)."""
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "t.pt")
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                # a large step and one batch per evaluation: the val loss goes up and down
                train.main(["--data", TINY, "--out", out, "--n-layer", "1", "--n-embd", "8",
                            "--n-head", "2", "--block-size", "8", "--batch-size", "2",
                            "--iters", "6", "--eval-interval", "2", "--eval-iters", "1",
                            "--warmup", "0", "--lr", "0.1", "--dropout", "0",
                            "--log-interval", "0", "--attention-type", "baseline"])
            lines = log.getvalue().splitlines()
            vals = [float(l.split("val ")[1].split()[0]) for l in lines if " nats/char, lr " in l]
            self.assertEqual(len(vals), 4, lines)
            self.assertNotEqual(vals[-1], min(vals), "the run no longer tells the two apart")
            self.assertIn("(final val %.4f nats/char; best seen %.4f at iteration %d)"
                          % (vals[-1], min(vals), 2 * vals.index(min(vals))), lines[-1])
            self.assertAlmostEqual(torch.load(out)["best_val_loss"].item(), vals[-1], places=4)

    def test_a_warmup_as_long_as_the_run_is_warned_of(self):
        """--warmup >= --iters: the learning rate never gets past the warm-up, which the
        log's lr column alone did not make plain."""
        def stderr_of(*argv):
            with tempfile.TemporaryDirectory() as d:
                err = io.StringIO()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                    train.main(["--data", TINY, "--out", os.path.join(d, "t.pt"), "--n-layer",
                                "1", "--n-embd", "8", "--n-head", "2", "--block-size", "8",
                                "--batch-size", "2", "--iters", "2", "--eval-interval", "2",
                                "--eval-iters", "1", "--lr", "1e-3", "--log-interval", "0",
                                "--attention-type", "baseline"] + list(argv))
                return err.getvalue()
        self.assertIn("train.py: warning: --warmup 4 >= --iters 2: the learning rate only "
                      "rises, to 0.0005 on the last iteration (--lr 0.001)",
                      stderr_of("--warmup", "4"))
        self.assertIn("--warmup 2 >= --iters 2", stderr_of("--warmup", "2"))
        self.assertEqual(stderr_of("--warmup", "1"), "")


@needs_torch
class TestGoldenText(unittest.TestCase):
    """--golden's --text, --text-start and --text-len: the characters asked for, or an
    error; never fewer characters, others from the end, or a file name's letters."""

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.ckpt = os.path.join(cls.tmp.name, "b.pt")
        with contextlib.redirect_stdout(io.StringIO()):
            train.main(["--data", TINY, "--out", cls.ckpt, "--init-only", "--n-layer", "1",
                        "--n-embd", "8", "--n-head", "2", "--block-size", "16",
                        "--attention-type", "baseline"])

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def golden(self, *argv):
        """(tokens of the golden written, or None), stdout, stderr, exit status."""
        out = os.path.join(self.tmp.name, "g.golden")
        if os.path.exists(out):
            os.unlink(out)
        log, err, code = io.StringIO(), io.StringIO(), 0
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
                train.main(["--golden", self.ckpt, "--data", TINY, "--out", out] + list(argv))
        except SystemExit as e:
            code = e.code
        tokens = None
        if os.path.exists(out):
            with open(out, "rb") as f:
                n = struct.unpack("<8s4I", f.read(24))[1]
                tokens = list(struct.unpack("<%di" % n, f.read(4 * n)))
        return tokens, log.getvalue(), err.getvalue(), code

    def test_a_checkpoint_with_bad_model_args(self):
        """model_args the model cannot be built from are the checkpoint's fault: one line
        naming it and the value (n_head 0 was a ZeroDivisionError, a missing key or
        n_head 3 for n_embd 8 a ValueError, each a traceback)."""
        ck = torch.load(self.ckpt)
        bad = os.path.join(self.tmp.name, "bad.pt")
        saved = self.ckpt
        try:
            for change, needle in ((dict(n_head=0), "n_head is 0, not a positive integer"),
                                   (dict(n_head=3), "n_embd must be a multiple of n_head"),
                                   (dict(attention_type=None), "lacks attention_type"),
                                   ([1, 2], "must be a mapping")):
                with self.subTest(change=change):
                    margs = dict(ck["model_args"])
                    if isinstance(change, list):
                        margs = change
                    else:
                        margs.update(change)
                        margs = {k: v for k, v in margs.items() if v is not None}
                    torch.save(dict(ck, model_args=margs), bad)
                    self.ckpt = bad
                    tokens, _, _, code = self.golden("--text", "abc")
                    self.assertIsNone(tokens)
                    self.assertIn("train.py: cannot load %s: its model_args" % bad, str(code))
                    self.assertIn(needle, str(code))
        finally:
            self.ckpt = saved

    def test_help_says_which_options_apply(self):
        out = io.StringIO()
        with self.assertRaises(SystemExit), contextlib.redirect_stdout(out):
            train.parse_args(["--help"])
        self.assertTrue("the model and training options are ignored"
                        in " ".join(out.getvalue().split()), "not said in --help")

    def test_the_characters_asked_for(self):
        with open(TINY, encoding="utf-8") as f:
            text = f.read()
        chars = sorted(set(text))
        tokens, _, _, code = self.golden("--text", TINY, "--text-start", "440",
                                         "--text-len", "16")
        self.assertEqual(code, 0)
        self.assertEqual(tokens, [chars.index(c) for c in text[440:456]])
        tokens, _, _, code = self.golden("--text", "God said")    # a text of its own
        self.assertEqual(tokens, [chars.index(c) for c in "God said"])

    def test_negative_start_or_length_is_a_usage_error(self):
        # --text-start -5 took the last 5 characters
        for opt, value in (("--text-start", "-5"), ("--text-len", "-3"), ("--text-len", "0")):
            tokens, _, err, code = self.golden("--text", TINY, "--text-len", "10",
                                               opt + "=" + value)
            self.assertEqual(code, 2, (opt, value))
            self.assertIn("argument %s" % opt, err)
            self.assertIsNone(tokens)

    def test_fewer_characters_than_text_len_is_an_error(self):
        for start in ("530", "537", "600"):       # tests/data/tiny.txt has 537 characters
            tokens, _, _, code = self.golden("--text", TINY, "--text-start", start,
                                             "--text-len", "10")
            self.assertIsNone(tokens, start)
            self.assertRegex(str(code), "fewer than --text-len 10|beyond the end")

    def test_a_missing_file_is_not_taken_as_the_text(self):
        # "said.dat" wrote a golden of its 8 characters
        for name in ("said.dat", os.path.join(self.tmp.name, "missing")):
            tokens, _, _, code = self.golden("--text", name)
            self.assertIsNone(tokens, name)
            self.assertIn("looks like a file name, but there is no such file", str(code))


SHAPE = ["--n-layer", "2", "--n-embd", "48", "--n-head", "6", "--block-size", "32",
         "--batch-size", "4", "--threads", "1", "--dropout", "0.0"]


@needs_torch
class TestSmoke(unittest.TestCase):
    def run_train(self, *argv):
        r = subprocess.run([sys.executable, TRAIN, "--data", TINY] + SHAPE + list(argv),
                           capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return r.stdout

    def test_all_options(self):
        with tempfile.TemporaryDirectory() as tmp:
            base = os.path.join(tmp, "mha.pt")
            plain = os.path.join(tmp, "plain.pt")
            ck = os.path.join(tmp, "pooled.pt")
            self.run_train("--out", base, "--attention-type", "baseline", "--init-only")
            self.run_train("--out", plain, "--attention-type", "pooled_moas", "--init-only")
            out = self.run_train(
                "--out", ck, "--attention-type", "pooled_moas", "--init-from", base,
                "--iters", "5", "--eval-interval", "5", "--eval-iters", "1",
                "--log-interval", "1", "--warmup", "1", "--lr", "3e-3",
                "--balance", "switch", "--router-entropy", "0.01", "--router-z-loss", "0.001",
                "--kv-penalty", "0.05", "--kv-penalty-warmup", "3",
                "--kv-penalty-schedule", "cosine", "--gate-temperature", "0.8",
                "--kv-target-per-layer", "1.0,0.3", "--hard-top1-from", "3")
            self.assertIn("init from %s (baseline)" % base, out)
            self.assertIn("new, freshly initialised: 4 (h.*.attn.router.0, h.*.attn.router.2)",
                          out)
            self.assertIn("router terms: balance switch x 0.01, gate entropy x 0.01, "
                          "z-loss x 0.001, kv lambda cosine over 3 iters, "
                          "kv targets per layer [1.0, 0.3]", out)
            self.assertIn("iter 1: loss", out)
            self.assertIn("kv lambda 0.0125", out)        # 0.05 * (1 - cos(pi/3)) / 2
            shares = [l for l in out.splitlines() if "val hard shares" in l]
            self.assertEqual(len(shares), 2, out)         # iterations 0 and 5
            self.assertIn("per layer: layer 0 ", shares[-1])
            self.assertIn("; layer 1 ", shares[-1])
            # the saved model: the keys and shapes of a plain pooled_moas checkpoint
            got, want = torch.load(ck), torch.load(plain)
            self.assertEqual({k: tuple(v.shape) for k, v in got["model"].items()},
                             {k: tuple(v.shape) for k, v in want["model"].items()})
            self.assertEqual(got["model_args"], want["model_args"])
            cfg = got["config"]
            for k, v in (("balance", "switch"), ("router_entropy", 0.01),
                         ("router_z_loss", 0.001), ("kv_penalty_warmup", 3),
                         ("kv_penalty_schedule", "cosine"), ("gate_temperature", 0.8),
                         ("kv_target_per_layer", "1.0,0.3"), ("init_from", base)):
                self.assertEqual(cfg[k], v, k)
            gg = os.path.join(tmp, "pooled.gguf")
            convert(ck, gg)
            if not os.access(MOAS, os.X_OK):
                self.skipTest("no %s (run make): converted, not run" % MOAS)
            for mode in ("mixture", "routed"):
                r = json.loads(moas("perplexity", "-m", gg, "-f", TINY, "--mode", mode,
                                    "--json"))
                self.assertTrue(0.0 < r["nats_per_token"] < math.log(47) + 1.0, r)


if __name__ == "__main__":
    unittest.main()
