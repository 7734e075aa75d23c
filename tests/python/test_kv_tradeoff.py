"""Tests of tools/kv_tradeoff.py, standard library only.

Run from the repository root:  python3 -m unittest discover -s tests/python -t . -q

No bin/moas and no trained model is needed: --moas points at a fake moas written to a
temporary directory, which prints canned JSON for `perplexity` and `bench` (the real
output of bin/moas on models/pooled-kjv-l005.gguf, the pooled model shipped until
2026-12-02), logs every call, and fails like moas does for a model path containing
"bad".
"""
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "kv_tradeoff.py")
SVG_NS = "{http://www.w3.org/2000/svg}"
sys.dont_write_bytecode = True


def _load_tool():
    spec = importlib.util.spec_from_file_location("kv_tradeoff", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


kv_tradeoff = _load_tool()

# A stand-in for bin/moas. A path containing "mha" is a one-scheme model, and so are
# "gqa" (GQA-2, 1.47 nats at 2,048 bytes) and "mqaN" (MQA, 1.5N at 1,024); "bad" fails;
# "garbage" prints no JSON. bench answers 2743, 100, 5000, 2743, ... decode tokens/s on
# successive calls for one (model, mode), so the median of 3 rounds is 2743.
FAKE_MOAS = r'''
import json, os, sys
argv = sys.argv[1:]
cmd = argv[0]
opt = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("-")}
path, mode = opt["-m"], opt.get("--mode", "mixture")
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "calls.log"), "a") as f:
    f.write(" ".join(argv) + "\n")
if "bad" in path:
    sys.stderr.write("moas: cannot load '%s': not a GGUF file\n" % path)
    sys.exit(3)
if "garbage" in path:
    print("this is not json")
    sys.exit(0)
base = os.path.basename(path)
if cmd == "perplexity":
    if base.startswith("mqa") or base.startswith("gqa"):
        mqa = base.startswith("mqa")
        out = {"mode": mode, "kv_type": "f32",
               "nats_per_token": 1.5 + 0.01 * int(base[3]) if mqa else 1.47,
               "kv_bytes_per_token": 1024.0 if mqa else 2048.0,
               "mha_kv_bytes_per_token": 6144, "scheme_shares": [1.0],
               "schemes": ["MQA" if mqa else "GQA-2"]}
    elif "mha" in path:
        out = {"mode": mode, "kv_type": "f32", "nats_per_token": 1.401234,
               "perplexity": 4.06, "kv_bytes_per_token": 6144.00,
               "mha_kv_bytes_per_token": 6144, "scheme_shares": [1.0], "schemes": ["MHA"]}
    elif mode == "routed":
        out = {"mode": "routed", "kv_type": "f32", "n_tokens": 20000, "n_scored": 19843,
               "nats_per_token": 1.477383, "perplexity": 4.381463,
               "tokens_per_second": 4186.6, "kv_bytes": 165376, "kv_bytes_per_token": 1292.00,
               "mha_kv_bytes_per_token": 6144,
               "scheme_shares": [0.014212, 0.078088, 0.907700],
               "schemes": ["MHA", "GQA-2", "MQA"]}
    else:
        out = {"mode": "mixture", "kv_type": "f32", "nats_per_token": 1.478329,
               "perplexity": 4.39, "kv_bytes_per_token": 6144.00,
               "mha_kv_bytes_per_token": 6144,
               "scheme_shares": [0.014, 0.078, 0.908], "schemes": ["MHA", "GQA-2", "MQA"]}
elif cmd == "bench":
    assert opt["-r"] == "1" and opt["--n-prompt"] == "64" and opt["-n"] == "64", argv
    key = os.path.join(here, "n-" + os.path.basename(path) + "-" + mode)
    n = int(open(key).read()) if os.path.exists(key) else 0
    with open(key, "w") as f:
        f.write(str(n + 1))
    decode = [2743.0, 100.0, 5000.0][n % 3] + (0.0 if mode == "routed" else -1000.0)
    out = {"model": path, "mode": mode, "threads": int(opt["-t"]), "repeats": 1,
           "prefill_tok_s": 6165.1 + n, "decode_tok_s": decode}
else:
    sys.exit("moas: unknown command '%s'" % cmd)
print(json.dumps(out))
'''


class KvTradeoff(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.dir = cls.tmp.name
        cls.moas = os.path.join(d, "moas")
        with open(cls.moas, "w") as f:
            f.write("#!%s -S\n%s" % (sys.executable, FAKE_MOAS))
        os.chmod(cls.moas, 0o755)
        cls.text = os.path.join(d, "heldout.txt")
        for name in ("heldout.txt", "mha-kjv.gguf", "pooled.gguf", "bad.gguf", "garbage.gguf",
                     "mqa1.gguf", "mqa2.gguf", "gqa.gguf"):
            with open(os.path.join(d, name), "w") as f:
                f.write("x")
        cls.json_path = os.path.join(d, "out.json")
        cls.svg_path = os.path.join(d, "out.svg")
        cls.result = cls.run_tool(
            "--model", "MHA <base> & co=" + os.path.join(d, "mha-kjv.gguf"),
            "--model", "Pooled λ=0.05=" + os.path.join(d, "pooled.gguf"),
            "--bench-repeats", "3", "--markdown", "--json", cls.json_path, "--svg", cls.svg_path)
        with open(os.path.join(d, "calls.log")) as f:
            cls.calls = f.read().splitlines()

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    @classmethod
    def run_tool(cls, *args, measure=True):
        argv = [sys.executable, TOOL]
        if measure:
            argv += ["--moas", cls.moas, "--text", cls.text]
        return subprocess.run(argv + list(args), capture_output=True, text=True,
                              encoding="utf-8", timeout=60)

    def table(self):
        self.assertEqual(self.result.returncode, 0, self.result.stderr)
        lines = self.result.stdout.splitlines()
        self.assertTrue(lines[0].startswith("| model | mode | nats/char |"), lines[0])
        return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]

    def test_markdown_rows(self):
        rows = self.table()
        self.assertEqual(len(rows), 3)
        self.assertEqual(rows[0], ["MHA <base> & co", "single", "1.4012", "6,144", "100.0%",
                                   "100.0% / — / —", "1,743"])
        self.assertEqual(rows[1], ["Pooled λ=0.05", "mixture", "1.4783", "6,144", "100.0%",
                                   "1.4% / 7.8% / 90.8%", "1,743"])
        self.assertEqual(rows[2], ["Pooled λ=0.05", "routed", "1.4774", "1,292", "21.0%",
                                   "1.4% / 7.8% / 90.8%", "2,743"])
        self.assertEqual(self.result.stderr, "")

    def test_single_scheme_model_runs_once_in_mixture_mode(self):
        mha = [c for c in self.calls if "mha-kjv" in c]
        self.assertEqual(len([c for c in mha if c.startswith("perplexity")]), 1)
        self.assertTrue(all("--mode mixture" in c for c in mha), mha)

    def test_bench_is_interleaved_in_rounds(self):
        bench = [c for c in self.calls if c.startswith("bench")]
        self.assertEqual(len(bench), 9)
        order = [(os.path.basename(c.split(" -m ")[1].split()[0]), c.split("--mode ")[1].split()[0])
                 for c in bench]
        one_round = [("mha-kjv.gguf", "mixture"), ("pooled.gguf", "mixture"),
                     ("pooled.gguf", "routed")]
        self.assertEqual(order, one_round * 3)
        self.assertTrue(all(" -r 1 " in c and " -t 1 " in c for c in bench))
        # every perplexity run comes before the first bench run
        self.assertTrue(all(c.startswith("perplexity") for c in self.calls[:3]))

    def test_json_document(self):
        with open(self.json_path, encoding="utf-8") as f:
            doc = json.load(f)
        self.assertEqual(doc["text"], self.text)
        self.assertEqual(len(doc["rows"]), 3)
        self.assertTrue(any(c.split()[1:2] == ["bench"] for c in doc["commands"]))
        self.assertTrue(any("perplexity" in c and "--mode routed" in c for c in doc["commands"]))
        routed = doc["rows"][2]
        self.assertEqual(routed["label"], "Pooled λ=0.05")
        self.assertEqual(routed["path"], os.path.join(self.dir, "pooled.gguf"))
        self.assertEqual(routed["mode"], "routed")
        self.assertEqual(routed["nats_per_char"], 1.477383)
        self.assertEqual(routed["kv_bytes_per_token"], 1292.0)
        self.assertEqual(routed["mha_kv_bytes_per_token"], 6144)
        self.assertAlmostEqual(routed["kv_fraction_of_mha"], 1292 / 6144)
        self.assertEqual(routed["scheme_shares"], {"MHA": 0.014212, "GQA-2": 0.078088,
                                                   "MQA": 0.9077})
        self.assertEqual(routed["decode_tok_s"], 2743.0)
        self.assertEqual(sorted(routed["decode_tok_s_rounds"]), [100.0, 2743.0, 5000.0])
        self.assertAlmostEqual(routed["prefill_tok_s"], 6166.1)
        self.assertEqual(doc["rows"][0]["scheme_shares"], {"MHA": 1.0})

    def test_svg(self):
        root = ET.parse(self.svg_path).getroot()
        self.assertEqual(root.tag, SVG_NS + "svg")
        w, h = float(root.get("width")), float(root.get("height"))
        self.assertEqual((w, h), (720, 440))
        points = [e for e in root.iter() if "point" in (e.get("class") or "").split()]
        self.assertEqual(len(points), 3)
        by_kind = {e.get("class").split()[1]: e for e in points}
        self.assertEqual(by_kind["mixture"].get("fill"), "#ffffff")      # hollow
        routed = by_kind["routed"]
        self.assertEqual(routed.get("fill"), routed.get("stroke"))     # filled
        self.assertNotEqual(routed.get("fill"), by_kind["single"].get("fill"))  # colour per model
        mha = [e for e in root.iter(SVG_NS + "line") if e.get("class") == "mha-ref"]
        self.assertEqual(len(mha), 1)
        self.assertIn("stroke-dasharray", mha[0].attrib)
        # the mixture point sits on the MHA line (both at 6,144 bytes), the routed one left
        self.assertEqual(float(by_kind["mixture"].get("cx")), float(mha[0].get("x1")))
        self.assertLess(float(routed.get("cx")), float(mha[0].get("x1")))
        # lower nats/char is drawn lower
        self.assertGreater(float(routed.get("cy")), float(by_kind["mixture"].get("cy")))
        texts = ["".join(e.itertext()) for e in root.iter(SVG_NS + "text")]
        for wanted in ("MHA cache", "KV cache bytes per token (f32)",
                       "nats per character (held-out text, lower is better)",
                       "MHA <base> & co", "Pooled λ=0.05", "0"):
            self.assertIn(wanted, texts)
        # every text starts inside the canvas
        for e in root.iter(SVG_NS + "text"):
            if e.get("x") is not None:
                self.assertTrue(0 <= float(e.get("x")) <= w and 0 <= float(e.get("y")) <= h)

    def test_from_json_redraws_the_same_svg(self):
        again = os.path.join(self.dir, "again.svg")
        r = self.call("--from-json", self.json_path, "--svg", again, "--markdown",
                      measure=False)
        self.assertEqual(r.returncode, 0, r.stderr)
        with open(self.svg_path, "rb") as a, open(again, "rb") as b:
            self.assertEqual(a.read(), b.read())
        self.assertEqual(r.stdout, self.result.stdout)

    def test_append_seeds_and_the_static_front(self):
        d = self.dir
        out_json, out_svg = os.path.join(d, "front.json"), os.path.join(d, "front.svg")
        r = self.call("--append-to", self.json_path, "--no-bench",
                      "--model", "MQA [seed 1]=" + os.path.join(d, "mqa1.gguf"),
                      "--model", "MQA [seed 2]=" + os.path.join(d, "mqa2.gguf"),
                      "--model", "GQA-2=" + os.path.join(d, "gqa.gguf"),
                      "--relabel", "MHA <base> & co", "MHA",
                      "--front", "MHA", "--front", "GQA-2", "--front", "MQA",
                      "--json", out_json, "--svg", out_svg, "--markdown")
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.splitlines()
        self.assertTrue(lines[0].endswith("| decode tokens/s | vs. front |"), lines[0])
        rows = [[c.strip() for c in l.strip("|").split(" | ")] for l in lines[2:8]]
        # the front at 1,292 bytes: 1.515 + (1.47 - 1.515) * 268 / 1024 = 1.50322
        self.assertEqual([(x[0], x[1], x[2], x[-1]) for x in rows], [
            ("MHA", "single", "1.4012", "+0.00%"),
            ("Pooled λ=0.05", "mixture", "1.4783", "+5.50%"),
            ("Pooled λ=0.05", "routed", "1.4774", "-1.72%"),
            ("MQA [seed 1]", "single", "1.5100", "-0.33%"),
            ("MQA [seed 2]", "single", "1.5200", "+0.33%"),
            ("GQA-2", "single", "1.4700", "+0.00%")])
        self.assertEqual(rows[5][6], "—")                      # not benchmarked
        self.assertEqual(lines[8], "")
        self.assertEqual(lines[11], "| MQA | single | 2 | 1.5150 | 1.5100 | 1.5200 | 0.0100 "
                                    "| 1,024 |")
        self.assertEqual(len(lines), 12)
        with open(out_json, encoding="utf-8") as f:
            doc = json.load(f)
        with open(self.json_path, encoding="utf-8") as f:
            old = json.load(f)
        self.assertEqual(doc["front"], ["MHA", "GQA-2", "MQA"])
        self.assertEqual(doc["commands"], old["commands"])
        self.assertEqual(len(doc["appended"]), 1)
        self.assertEqual(len(doc["appended"][0]["commands"]), 3)     # perplexity only
        root = ET.parse(out_svg).getroot()
        front = [e for e in root.iter() if e.get("class") == "front"]
        self.assertEqual(len(front), 1)
        self.assertEqual(len(front[0].get("points").split()), 3)
        self.assertEqual(len([e for e in root.iter() if e.get("class") == "spread"]), 1)
        mqa = [e for e in root.iter() if "point" in (e.get("class") or "").split()][3:5]
        self.assertEqual(mqa[0].get("fill"), mqa[1].get("fill"))     # one colour per group
        texts = ["".join(e.itertext()) for e in root.iter(SVG_NS + "text")]
        self.assertIn("static front: MHA, GQA-2, MQA", texts)
        self.assertIn("MQA", texts)
        self.assertNotIn("MQA [seed 1]", texts)                       # the legend lists groups
        # the same document redraws to the same bytes
        again = os.path.join(d, "front-again.svg")
        r2 = self.call("--from-json", out_json, "--svg", again, "--markdown", measure=False)
        self.assertEqual(r2.stdout, r.stdout)
        with open(out_svg, "rb") as a, open(again, "rb") as b:
            self.assertEqual(a.read(), b.read())
        # --only draws and tabulates a subset of the groups
        r3 = self.call("--from-json", out_json, "--only", "MQA", "--only", "MHA",
                       "--front", "MHA", "--front", "MQA", "--markdown", measure=False)
        self.assertEqual(r3.returncode, 0, r3.stderr)
        self.assertEqual([l.split(" | ")[0] for l in r3.stdout.splitlines()[2:5]],
                         ["| MHA", "| MQA [seed 1]", "| MQA [seed 2]"])
        # --only of groups that leave out some of the document's front draws them against
        # the front of all the rows (it failed: "--front 'MHA' names no rows")
        r4 = self.call("--from-json", out_json, "--only", "MQA", "--markdown", measure=False)
        self.assertEqual(r4.returncode, 0, r4.stderr)
        rows4 = [[c.strip() for c in l.strip("|").split(" | ")]
                 for l in r4.stdout.splitlines()[2:4]]
        self.assertEqual([(x[0], x[-1]) for x in rows4],
                         [("MQA [seed 1]", "-0.33%"), ("MQA [seed 2]", "+0.33%")])
        self.assertFails(self.call("--from-json", out_json, "--only", "nope", measure=False),
                         "--only")
        # the front must be single-scheme groups that exist; labels stay unique
        self.assertFails(self.call("--from-json", out_json, "--front", "Pooled λ=0.05",
                                   measure=False), "not a single-scheme model")
        self.assertFails(self.call("--from-json", out_json, "--front", "MQA [seed 3]",
                                   measure=False), "names no rows")
        self.assertFails(self.call("--from-json", out_json, "--relabel", "nope", "x",
                                   measure=False), "no row is labelled")
        self.assertFails(self.call("--append-to", out_json, "--model",
                                   "GQA-2=" + os.path.join(d, "gqa.gguf")), "two models")

    def test_schemes_of_one_kind_named_apart_are_summed(self):
        # moas names two schemes of one width MHA#0 and MHA#1: both are MHA's share
        self.assertEqual(kv_tradeoff.share_columns({"MHA#0": 0.5, "MHA#1": 0.25, "MQA": 0.25}),
                         (0.75, None, 0.25))
        self.assertEqual(kv_tradeoff.share_columns({"MHA": 0.1, "GQA-2": 0.2, "GQA-3": 0.3,
                                                  "MQA": 0.4}), (0.1, 0.5, 0.4))

    def test_no_bench(self):
        r = self.call("--model", "P=" + os.path.join(self.dir, "pooled.gguf"),
                      "--modes", "routed", "--no-bench")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.splitlines()[2],
                         "| P | routed | 1.4774 | 1,292 | 21.0% | 1.4% / 7.8% / 90.8% | — |")

    def call(self, *args, measure=True):
        """main() in this process (quicker than a subprocess): a result like run_tool's."""
        argv = (["--moas", self.moas, "--text", self.text] if measure else []) + list(args)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = kv_tradeoff.main(argv)
        return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())

    def assertFails(self, result, *words):
        self.assertEqual(result.returncode, 1, result.stderr)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertTrue(lines[0].startswith("kv_tradeoff: error: "), lines[0])
        for word in words:
            self.assertIn(word, lines[0])
        self.assertEqual(result.stdout, "")

    def test_moas_failure_exits_1(self):
        # the one error case run as a process, for the exit status itself
        self.assertFails(self.run_tool("--model", "B=" + os.path.join(self.dir, "bad.gguf")),
                         "failed (status 3)", "not a GGUF file", "bad.gguf")

    def test_unparseable_output(self):
        self.assertFails(self.call("--model", "G=" + os.path.join(self.dir, "garbage.gguf")),
                         "no JSON", "this is not json")

    def test_bad_model_syntax(self):
        self.assertFails(self.call("--model", os.path.join(self.dir, "pooled.gguf")),
                         "LABEL=PATH")
        self.assertFails(self.call("--model", "=" + os.path.join(self.dir, "pooled.gguf")),
                         "LABEL=PATH")

    def test_missing_files(self):
        self.assertFails(self.call("--model", "M=" + os.path.join(self.dir, "nope.gguf")),
                         "nope.gguf", "does not exist")
        self.assertFails(self.call("--from-json", os.path.join(self.dir, "nope.json"),
                                   measure=False), "nope.json")
        self.assertFails(self.call("--moas", os.path.join(self.dir, "no-moas"), "--model",
                                   "P=" + os.path.join(self.dir, "pooled.gguf")), "no-moas")

    def test_executable_script(self):
        self.assertTrue(os.access(TOOL, os.X_OK))
        with open(TOOL, encoding="utf-8") as f:
            self.assertEqual(f.readline(), "#!/usr/bin/env python3\n")

    def test_nice_ticks(self):
        self.assertEqual(kv_tradeoff.ticks(0, 9216 * 1.05, 7),
                         ([0, 2000, 4000, 6000, 8000, 10000], 0))
        self.assertEqual(kv_tradeoff.ticks(0, 6144 * 1.05, 7)[0][-1], 7000)
        values, decimals = kv_tradeoff.ticks(1.45, 1.50, 6)
        self.assertEqual((values[0], values[-1], decimals), (1.45, 1.5, 2))
        self.assertEqual(kv_tradeoff.fmt_tick(1.5, 2), "1.50")
        self.assertEqual(kv_tradeoff.ticks(0, 0.9, 6)[1], 1)


if __name__ == "__main__":
    unittest.main()
