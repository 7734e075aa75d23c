#!/usr/bin/env python3
"""goal_rounds.py - the throughput goals of batched decode and of decode at depth,
measured as docs/PERFORMANCE.md measures them.

  tools/goal_rounds.py [--rounds 5] [--moas bin/moas] [--small MODEL] [--gpt2 MODEL]
                       [--long MODEL] [--log FILE]

Runs ROUNDS interleaved rounds of the documented commands: each round runs every
command once, in a fixed order, so that a drifting machine moves every figure of a
round alike. Per round each goal's ratio is taken from that round's figures (the
small shape's one sequence runs three times a round, its median taken, as its 128
tokens take about 10 ms); the summary gives, per goal, the medians of the figures
over rounds, the median ratio and its range, the ratio of every round, and whether
the median meets the goal. Under the table, for the 16 sequences at depth, the bytes a
decode step reads on each side (the weights once, from `bench`'s
weight_bytes_per_token, and each sequence's K/V at its mean depth, from
`batched-bench`'s kv_bytes) and their ratio, which a decode bound by the bytes it reads
would reach.

--small and --gpt2 default to random-weight models of the documented shapes under
build/bench, made with build/tools/random_model (`make bench` builds it) when missing;
--long defaults to models/pooled-rope-kjv-1k.gguf. Each run's figure goes to stderr
(and to --log) as a JSON line; the summary, a markdown table, to stdout.

Standard library only. It takes minutes; the machine should be otherwise idle.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

SMALL_SHAPE = ["--layers", "4", "--embd", "192", "--heads", "6", "--ff", "768",
               "--vocab", "63", "--ctx", "256", "--mha", "--type", "f16"]
GPT2_SHAPE = ["--layers", "12", "--embd", "768", "--heads", "12", "--vocab", "50257",
              "--ctx", "1024", "--mha", "--untied", "--type", "f16"]

SMALL_B1 = "small_b1"   # three runs a round, their median taken


def round_commands(moas, small, gpt2, long):
    """The commands of one round, in order: (name, threads, JSON key, argv)."""
    cmds = []
    for t in (2, 1):
        bb_small = [moas, "batched-bench", "-m", small, "-npp", "128", "-ntg", "128",
                    "-t", str(t), "--kv-type", "f16", "--json"]
        bb_gpt2 = [moas, "batched-bench", "-m", gpt2, "-npp", "128", "-ntg", "32",
                   "-t", str(t), "--kv-type", "f16", "--json"]
        for _ in range(3):
            cmds.append((SMALL_B1, t, "s_tg", bb_small + ["-npl", "1"]))
        cmds.append(("small_b64", t, "s_tg", bb_small + ["-npl", "64"]))
        cmds.append(("gpt2_b1", t, "s_tg", bb_gpt2 + ["-npl", "1"]))
        cmds.append(("gpt2_b16", t, "s_tg", bb_gpt2 + ["-npl", "16"]))
    for t in (1, 2):
        one = [moas, "bench", "-m", long, "--n-prompt", "64", "-n", "128", "-d", "896",
               "-r", "3", "-t", str(t), "--mode", "routed", "--json"]
        cmds.append(("one_routed", t, "decode_tok_s", one))
        cmds.append(("one_mha", t, "decode_tok_s", one + ["--force-scheme", "0"]))
    b16 = [moas, "batched-bench", "-m", long, "-npp", "960", "-ntg", "64", "-npl", "16",
           "-t", "2", "--mode", "routed", "--json"]
    cmds.append(("b16_routed", 2, "s_tg", b16))
    cmds.append(("b16_mha", 2, "s_tg", b16 + ["--force-scheme", "0"]))
    return cmds


# (goal, threads shown, goal ratio, numerator (name, threads), denominator (name, threads))
GOALS = [
    ("small shape: S_TG at B = 64 >= 2x B = 1", "2", 2.0, ("small_b64", 2), (SMALL_B1, 2)),
    ("the same, against B = 1 at 1 thread", "2 / 1", 2.0, ("small_b64", 2), (SMALL_B1, 1)),
    ("the same, 1 thread", "1", 2.0, ("small_b64", 1), (SMALL_B1, 1)),
    ("GPT-2 small: S_TG at B = 16 >= 6x B = 1", "2", 6.0, ("gpt2_b16", 2), ("gpt2_b1", 2)),
    ("the same, 1 thread", "1", 6.0, ("gpt2_b16", 1), ("gpt2_b1", 1)),
    ("16 sequences at depth 960: routed >= 3.5x MHA-sized", "2", 3.5, ("b16_routed", 2),
     ("b16_mha", 2)),
    ("one sequence at depth 960: routed >= 1.8x MHA-sized", "1", 1.8, ("one_routed", 1),
     ("one_mha", 1)),
    ("the same, 2 threads", "2", 1.8, ("one_routed", 2), ("one_mha", 2)),
]


class RunError(Exception):
    pass


def run_one(argv, key):
    """The figure `key` of the first JSON line argv prints, and that whole line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, encoding="utf-8",
                              timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RunError("%s: %s" % (" ".join(argv), e))
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()
        raise RunError("%s: exit status %d%s" % (" ".join(argv), proc.returncode,
                                                  ": " + why[-1] if why else ""))
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            try:
                record = json.loads(line)
                value = record[key]
            except (ValueError, KeyError) as e:
                raise RunError("%s: no '%s' in its JSON (%s)" % (" ".join(argv), key, e))
            if not isinstance(value, (int, float)) or value <= 0:
                raise RunError("%s: '%s' is %r, not a positive number" % (" ".join(argv),
                                                                          key, value))
            return float(value), record
    raise RunError("%s: printed no JSON line" % " ".join(argv))


def summarize(per_round):
    """per_round: [{(name, threads): tok/s}], one per round (the small shape's one
    sequence already the median of its three). Returns the summary's rows:
    (goal, threads, numerator median, denominator median, ratios, goal ratio)."""
    rows = []
    for goal, threads, want, num, den in GOALS:
        ratios = [r[num] / r[den] for r in per_round if num in r and den in r]
        if not ratios:
            continue
        rows.append((goal, threads, statistics.median(r[num] for r in per_round),
                     statistics.median(r[den] for r in per_round), ratios, want))
    return rows


def markdown(rows, n_rounds):
    out = ["| goal | threads | tokens/s (medians of %d round%s) | ratio, median (range) | "
           "every round | met? |" % (n_rounds, "" if n_rounds == 1 else "s"),
           "|---|---|---|--:|---|---|"]
    for goal, threads, num, den, ratios, want in rows:
        med = statistics.median(ratios)
        out.append("| %s | %s | %s / %s | %.2f (%.2f-%.2f) | %s | %s |" % (
            goal, threads, format(round(num), ","), format(round(den), ","), med,
            min(ratios), max(ratios), " ".join("%.2f" % r for r in ratios),
            "met" if med >= want else "not met (%.2f of %g)" % (med, want)))
    return "\n".join(out)


def bytes_note(records, rows):
    """The line under the table on what the 16 sequences' decode steps read, from the
    last round's runs; None when a figure it needs is missing (an older moas)."""
    try:
        weights = float(records[("one_routed", 1)]["weight_bytes_per_token"])
        step = {}
        for name in ("b16_routed", "b16_mha"):
            r = records[(name, 2)]
            b, pp, tg = int(r["b"]), int(r["pp"]), int(r["tg"])
            per_token = float(r["kv_bytes"]) / (b * (pp + tg))
            # keys read by the decoded tokens' steps: pp + 1 .. pp + tg, pp + (tg + 1) / 2
            # on average
            step[name] = weights + b * per_token * (pp + (tg + 1) / 2)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    ratio = step["b16_mha"] / step["b16_routed"]
    line = ("16 sequences at depth 960: a decode step reads %.1f MB routed against %.1f MB "
            "MHA-sized (the weights once, each sequence's K/V at its mean depth), a byte "
            "ratio of %.2f" % (step["b16_routed"] / 1e6, step["b16_mha"] / 1e6, ratio))
    for goal, _, _, _, ratios, _ in rows:
        if goal.startswith("16 sequences"):
            line += "; the median ratio is %.0f%% of it" % (
                100 * statistics.median(ratios) / ratio)
    return line + "."


def ensure_model(path, random_model, shape):
    if os.path.exists(path):
        return
    if not os.path.exists(random_model):
        raise RunError("%s is missing and so is %s to make it (make bench builds it)"
                       % (path, random_model))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    proc = subprocess.run([random_model, "-o", path] + shape, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RunError("%s: %s" % (random_model, proc.stderr.strip()))


def measure(a, small, gpt2, log):
    """a.rounds rounds: per round {(name, threads): tok/s}, and the last round's JSON
    line of each run {(name, threads): record}."""
    per_round, records = [], {}
    for r in range(1, a.rounds + 1):
        figures, small_b1 = {}, {}
        for name, threads, key, cmd in round_commands(a.moas, small, gpt2, a.long):
            v, records[(name, threads)] = run_one(cmd, key)
            line = json.dumps({"round": r, "what": name, "threads": threads, "tok_s": v})
            print(line, file=sys.stderr, flush=True)
            print(line, file=log, flush=True)
            if name == SMALL_B1:
                small_b1.setdefault(threads, []).append(v)
            else:
                figures[(name, threads)] = v
        for threads, vs in small_b1.items():
            figures[(SMALL_B1, threads)] = statistics.median(vs)
        per_round.append(figures)
    return per_round, records



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--moas", default="bin/moas")
    ap.add_argument("--random-model", default="build/tools/random_model")
    ap.add_argument("--small", help="the 4-layer 192-wide f16 shape (default: made)")
    ap.add_argument("--gpt2", help="GPT-2 small's shape in f16 (default: made)")
    ap.add_argument("--long", default="models/pooled-rope-kjv-1k.gguf")
    ap.add_argument("--log", help="also write each run's JSON line here")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        small, gpt2 = a.small, a.gpt2
        if small is None:
            small = "build/bench/goal-small-f16.gguf"
            ensure_model(small, a.random_model, SMALL_SHAPE)
        if gpt2 is None:
            gpt2 = "build/bench/goal-gpt2-f16.gguf"
            ensure_model(gpt2, a.random_model, GPT2_SHAPE)
        try:
            log = open(a.log if a.log else os.devnull, "w", encoding="utf-8")
        except OSError as e:
            raise RunError("--log %s: %s" % (a.log, e.strerror))
        with log:
            per_round, records = measure(a, small, gpt2, log)
    except RunError as e:
        print("goal_rounds: %s" % e, file=sys.stderr)
        return 1
    rows = summarize(per_round)
    print(markdown(rows, a.rounds))
    note = bytes_note(records, rows)
    if note:
        print("\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
