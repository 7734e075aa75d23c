"""The measuring tools of tools/ answer a wrong option or input with one line and a
failing exit status, never a traceback, and never "ok" for a run that tested nothing."""
import os
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data")


def tool(name, *args):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name)] + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60, env=env)
    return r.returncode, r.stderr


class ToolErrors(unittest.TestCase):
    def refused(self, expect, rc_err, status=None):
        rc, err = rc_err
        self.assertNotEqual(rc, 0, err)
        if status is not None:
            self.assertEqual(rc, status, err)
        self.assertNotIn("Traceback", err)
        self.assertIn(expect, err)

    def test_compaction_cost(self):
        text = os.path.join(DATA, "tiny.txt")
        pooled = os.path.join(DATA, "tiny-pooled-bias.gguf")
        self.refused("pooled K/V", tool("compaction_cost.py", "-m",
                                        os.path.join(DATA, "tiny-moas-bias.gguf"), "-f", text))
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as empty:
            self.refused("at least 2 characters",
                         tool("compaction_cost.py", "-m", pooled, "-f", empty.name))
        self.refused("--keep", tool("compaction_cost.py", "-m", pooled, "-f", text,
                                    "--keep", "4,x"), 2)
        self.refused("--scheme 7", tool("compaction_cost.py", "-m", pooled, "-f", text,
                                        "--scheme", "7"))
        self.refused("No such file", tool("compaction_cost.py", "-m", pooled, "-f",
                                          text + ".absent"))

    def test_load_tools_refuse_runs_that_test_nothing(self):
        model = os.path.join(DATA, "tiny-pooled-bias.gguf")
        self.refused("--clients", tool("loadtest.py", "-m", model, "--clients", "0"), 2)
        self.refused("--min-prompt", tool("loadtest.py", "-m", model, "--min-prompt", "10",
                                          "--max-prompt", "9"), 2)
        self.refused("--rounds", tool("loadtest.py", "-m", model, "--rounds", "0"), 2)
        self.refused("--max-prompt 66", tool("loadtest.py", "-m", model, "--min-prompt",
                                             "66", "--max-prompt", "66"), 2)
        self.refused("--rounds", tool("conversation_bench.py", "-m", model, "--rounds", "0"), 2)
        self.refused("--max-tokens", tool("conversation_bench.py", "-m", model,
                                          "--max-tokens", "0"), 2)
        self.refused("No such file", tool("conversation_bench.py", "-m", model, "--text",
                                          "/nonexistent/text"))

    def test_moas_forward_routes_every_model_and_refuses_bad_files_in_one_line(self):
        model = os.path.join(DATA, "tiny-moas-bias.gguf")   # independent schemes
        golden = os.path.join(DATA, "tiny-moas-bias-routed.golden")
        rc, err = tool("moas_forward.py", model, golden, "--mode", "routed")
        self.assertEqual(rc, 0, err)
        self.refused("not a golden file",
                     tool("moas_forward.py", model, os.path.join(DATA, "tiny.txt")))
        self.refused("not a GGUF file",
                     tool("moas_forward.py", os.path.join(DATA, "tiny.txt"), golden))

    def test_bench_sh_stops_with_random_models_message(self):
        """make bench's script: a model random_model cannot make is an error with
        random_model's own message, before any benchmark runs on it."""
        with tempfile.TemporaryDirectory() as d:
            def script(name, body):
                with open(os.path.join(d, name), "w") as f:
                    f.write("#!/bin/sh\n" + body)
                os.chmod(os.path.join(d, name), 0o755)
            script("moas", 'echo "$@" >>moas.log\n')
            # writes part of the file, as a full disk would, then fails
            script("random_model", 'echo x >"$2"\n'
                   'echo "random_model: cannot write \'$2\'" >&2\nexit 1\n')
            env = dict(os.environ, BENCH_SHAPES="small", BENCH_REPEATS="1")
            r = subprocess.run(["sh", os.path.join(ROOT, "tools", "bench.sh"), d, d], cwd=d,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60, env=env)
            self.assertEqual(r.returncode, 1, r.stderr)
            self.assertIn("random_model: cannot write 'build/bench/small-mha-f32.gguf'",
                          r.stderr)
            self.assertIn("bench: random_model could not make build/bench/small-mha-f32.gguf",
                          r.stderr)
            self.assertFalse(os.path.exists(os.path.join(d, "moas.log")), "moas ran")
            self.assertFalse(os.path.exists(os.path.join(d, "build/bench/small-mha-f32.gguf")))

    RANDOM_SHAPE = ["--layers", "1", "--embd", "192", "--heads", "6", "--ctx", "8",
                    "--vocab", "8"]

    def random_model_refuses(self, cases, also=None):
        """Each (arguments, text) of `cases` added to RANDOM_SHAPE: random_model (the
        benchmarks' models; `make test` builds it) exits 2 saying `text` (and `also`)
        and writes no file."""
        exe = os.environ.get("MOAS_RANDOM_MODEL",
                             os.path.join(ROOT, "build", "tools", "random_model"))
        if not os.path.exists(exe):
            self.skipTest("%s not built (make %s)" % (exe, "build/tools/random_model"))
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "m.gguf")
            for bad, expect in cases:
                with self.subTest(bad=bad):
                    r = subprocess.run([exe] + self.RANDOM_SHAPE + bad + ["-o", out],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       universal_newlines=True, timeout=60)
                    self.assertEqual(r.returncode, 2, r.stderr)
                    self.assertIn(expect, r.stderr)
                    if also is not None:
                        self.assertIn(also, r.stderr)
                    self.assertFalse(os.path.exists(out))
        return exe

    def test_random_model_refuses_what_it_does_not_know(self):
        """A scheme list, type or mixing random_model cannot read is a usage error, not
        a model of another shape."""
        exe = self.random_model_refuses((
            (["--schemes", "6,x,1"], "got 'x'"),
            (["--schemes", "6,,1"], "got ''"),
            (["--schemes", "6,2,"], "got ''"),
            (["--schemes", ""], "got ''"),
            (["--schemes", "6" + ",1" * 8], "at most 8"),
            (["--type", "f61"], "f32, f16 or q8_0"),
            (["--mixing", "routr"], "single, mean or router"),
            # --mha sets both: given too, they were ignored
            (["--mha", "--schemes", "6,2,1"], "takes no --schemes"),
            (["--mixing", "router", "--mha"], "takes no --schemes or --mixing"),
            # past the last code point: tokens that are no character
            (["--vocab", "1111904"], "--vocab is at most 1111903"),
            # a router of 192/4 = 48 wide: no Q8_0 rows ("cannot build this shape" said
            # nothing of why)
            (["--type", "q8_0"], "the router's embd/4 48"),
            (["--type", "q8_0", "--mha", "--ff", "100"], "--ff 100\n")))
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "m.gguf")
            r = subprocess.run([exe] + self.RANDOM_SHAPE + ["--schemes", "6,3,1", "--type",
                                                            "f16", "--mixing", "mean", "-o", out],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=60)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertTrue(os.path.getsize(out) > 0)

    def test_random_model_refuses_a_model_libmoas_refuses(self):
        """random_model writes what the tests' generator builds, which checks nothing:
        arguments it reads but that make a model the library would not load (mixing
        single with three schemes, kv heads not dividing the heads) are a usage error
        with the library's reason, and no file."""
        self.random_model_refuses(((["--mixing", "single"], "needs exactly one scheme"),
                                   (["--schemes", "6,4,1"], "scheme 1 has 4 KV heads")),
                                  also="libmoas would refuse this model")

    def test_spaced_decode_refuses_a_number_it_cannot_read_whole(self):
        """spaced_decode (`make test` builds it) answers an option's value that is not a
        whole number with its usage: "-g 1O" measured 1 ms, "-n 20k" 20 calls."""
        exe = os.environ.get("MOAS_SPACED_DECODE",
                             os.path.join(ROOT, "build", "tools", "spaced_decode"))
        if not os.path.exists(exe):
            self.skipTest("%s not built (make %s)" % (exe, "build/tools/spaced_decode"))
        lib = os.environ.get("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
        model = os.path.join(DATA, "tiny-moas-bias.gguf")
        for bad in (["-g", "1O"], ["-n", "20k"], ["-t", ""], ["-g", "9" * 30]):
            with self.subTest(bad=bad):
                r = subprocess.run([exe, "-m", model, "-n", "2"] + bad + [lib],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=60)
                self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
                self.assertIn("usage: spaced_decode", r.stderr)
                self.assertEqual(r.stdout, "")
        r = subprocess.run([exe, "-m", model, "-n", "2", "-g", "0", "-t", "1", lib],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("2 calls 0 ms apart, 1 threads", r.stdout)

    def test_ab_decode_refuses_numbers_that_are_not(self):
        """ab_decode (`make test` builds it) answers an option's value, or a build's
        forced scheme after '@', that is not a whole number with its usage: it read them
        with atoi, so "-r 2x" ran 2 rounds and "LIB@x" forced scheme 0."""
        exe = os.environ.get("MOAS_AB_DECODE", os.path.join(ROOT, "build", "tools", "ab_decode"))
        if not os.path.exists(exe):
            self.skipTest("%s not built (make %s)" % (exe, "build/tools/ab_decode"))
        lib = os.environ.get("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
        model = os.path.join(DATA, "tiny-moas-bias.gguf")
        for bad in (["-r", "2x", lib, lib], ["-d", "", lib, lib], ["-n", "9" * 30, lib, lib],
                    [lib, lib + "@x"], [lib, lib + "@"]):
            with self.subTest(bad=bad):
                r = subprocess.run([exe, "-m", model, "-d", "4", "-n", "2", "-r", "1"] + bad,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=60)
                self.assertEqual(r.returncode, 2, r.stdout + r.stderr)
                self.assertIn("usage: ab_decode", r.stderr)
                self.assertEqual(r.stdout, "")
        r = subprocess.run([exe, "-m", model, "-d", "4", "-n", "2", "-r", "1", lib, lib + "@0"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_abi_sh_without_its_arguments_is_a_usage_line(self):
        usage = "usage: abi.sh check|update LIB BASELINE [SUPPRESSIONS]\n"
        for args in ([], ["check"], ["check", "lib/libmoas.so"], ["diff", "a", "b"],
                     ["check", "a", "b", "c", "d"]):
            with self.subTest(args=args):
                r = subprocess.run(["sh", os.path.join(ROOT, "tools", "abi.sh")] + args,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   universal_newlines=True, timeout=60)
                self.assertEqual((r.returncode, r.stdout, r.stderr), (2, "", usage))

    def test_a_missing_moas_or_log_is_one_line(self):
        self.refused("cannot run", tool("layer_shares.py", "--moas", "/nonexistent/moas",
                                        "-m", "x.gguf", "-f", "x.txt"))
        tiny = os.path.join(DATA, "tiny-moas-bias.gguf")   # models given: none to make
        self.refused("--log", tool("goal_rounds.py", "--log", "/nonexistent/dir/log",
                                   "--small", tiny, "--gpt2", tiny,
                                   "--moas", "/nonexistent/moas", "--rounds", "1"))


if __name__ == "__main__":
    unittest.main()
