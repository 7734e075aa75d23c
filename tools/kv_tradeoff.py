#!/usr/bin/env python3
"""Quality against KV-cache memory for a set of models: measure, tabulate, plot.

    tools/kv_tradeoff.py --moas bin/moas --text models/kjv-heldout.txt \\
        --model "MHA baseline=/tmp/sweep/mha-kjv.gguf" \\
        --model "MoAS (published)=models/moas-kjv.gguf" ... \\
        [--modes mixture,routed] [--threads 1] [--bench-repeats 5] [--no-bench] \\
        [--json OUT.json] [--svg OUT.svg] [--markdown]
    tools/kv_tradeoff.py --from-json OUT.json --svg OUT.svg --markdown   # redraw only
    tools/kv_tradeoff.py --append-to OUT.json --model ... --no-bench \
        [--relabel OLD NEW] [--front GROUP ...] --json OUT.json --svg OUT.svg --markdown

--model takes LABEL=PATH; the label may itself contain '=' (the last one splits).
For every model and mode the script runs

    MOAS perplexity -m PATH -f TEXT --mode MODE --json -t THREADS

and, unless --no-bench, times decoding with

    MOAS bench -m PATH --mode MODE -t THREADS --n-prompt 64 -n 64 -r 1 --json

A model with one attention scheme (plain MHA) computes the same in both modes, so it
is measured once, in the first mode of --modes, and gets one row whose mode is
"single". The benchmark runs in rounds: each round runs every (model, mode) pair once,
there are --bench-repeats rounds, and each pair reports the median of its rounds, so
that load from other work on a shared machine falls on all pairs alike rather than on
whichever model happened to run during it.

Outputs (markdown is the default when neither --json nor --svg is given):
  --json OUT   the command lines, the text, and one record per row (nats_per_char,
               kv_bytes_per_token, mha_kv_bytes_per_token, kv_fraction_of_mha,
               scheme_shares {name: share}, decode_tok_s, prefill_tok_s, ...)
  --markdown   a GitHub table on stdout; the GQA column sums every GQA-n scheme
  --svg OUT    a scatter plot of nats/char against KV bytes per token: hollow markers
               for mixture mode, filled for routed, a diamond for single-scheme models,
               the two modes of a model joined, a dashed line at the MHA cache size.
               The drawing depends only on the JSON document, so --from-json redraws
               the same bytes.

Seeds and groups: a label may end in a bracketed note, "MQA [seed 1338]"; the text
before it is the row's group. Rows of one group share a colour and a legend entry,
and where a group has two or more rows in one mode the plot draws their spread (a
bar from the lowest to the highest nats/char at their mean KV bytes) and --markdown
adds a table of it. A label without brackets is its own group.

  --append-to IN   measure only the --model(s) given and add their rows to IN's
                   (labels must be new); the document keeps IN's commands and bench
                   settings and lists each appending run under "appended"
  --relabel OLD NEW  rename a row of IN (to put an earlier model into a group)
  --front GROUP    (repeatable) single-scheme groups that make the static front, e.g.
                   MHA, GQA-2, MQA: the plot joins their mean points with a dashed
                   line, and --markdown adds a column "vs. front", a row's nats/char
                   against the front interpolated linearly in KV bytes at its KV
                   bytes ("—" outside the front's range). Kept in the document.
  --only GROUP     (repeatable) draw and tabulate only these groups (a zoomed plot);
                   the --json document keeps every row

Tokens are characters for the shipped models, so nats per token is nats per character.
Any error prints one line on stderr and exits with status 1. Standard library only.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys

PROG = "kv_tradeoff"
MODES = ("mixture", "routed")
BENCH_PROMPT = 64
BENCH_DECODE = 64
SINGLE = "single"

# Tableau 10: distinct, print- and colour-blind-friendly enough for a handful of models.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


class Failure(Exception):
    """An error the user should see as one line."""


# ---- measuring -----------------------------------------------------------------------

def parse_model(spec):
    label, sep, path = spec.rpartition("=")
    label = label.strip()
    if not sep or not label or not path:
        raise Failure("--model wants LABEL=PATH, got %r" % spec)
    return label, path


def group_of(label):
    """'MQA [seed 1338]' -> 'MQA'; a label without a bracketed note is its own group."""
    label = str(label)
    if label.endswith("]") and " [" in label:
        head = label[:label.rindex(" [")].rstrip()
        if head:
            return head
    return label


def parse_modes(text):
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise Failure("--modes is empty")
    for m in modes:
        if m not in MODES:
            raise Failure("--modes: unknown mode %r (mixture or routed)" % m)
    if len(set(modes)) != len(modes):
        raise Failure("--modes names a mode twice: %r" % text)
    return modes


def resolve_moas(moas):
    if os.sep not in moas and "/" not in moas:
        found = shutil.which(moas)
        if found is None:
            raise Failure("moas executable %r is not on PATH" % moas)
        return moas
    if not os.path.isfile(moas):
        raise Failure("moas executable '%s' does not exist (build it with make)" % moas)
    if not os.access(moas, os.X_OK):
        raise Failure("'%s' is not executable" % moas)
    return moas


def last_line(text):
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def run_json(argv, required):
    """Run one moas command that prints one JSON object; return the object."""
    shown = shlex.join(argv)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, encoding="utf-8",
                              errors="replace")
    except OSError as e:
        raise Failure("cannot run `%s`: %s" % (shown, e.strerror or e))
    if proc.returncode != 0:
        why = last_line(proc.stderr) or last_line(proc.stdout) or "no message"
        status = ("signal %d" % -proc.returncode if proc.returncode < 0
                  else "status %d" % proc.returncode)
        raise Failure("`%s` failed (%s): %s" % (shown, status, why))
    obj = None
    for candidate in (proc.stdout.strip(), last_line(proc.stdout)):
        try:
            obj = json.loads(candidate)
            break
        except ValueError:
            continue
    if not isinstance(obj, dict):
        head = last_line(proc.stdout)[:80] or "nothing"
        raise Failure("`%s` printed no JSON object (got: %s)" % (shown, head))
    missing = [k for k in required if k not in obj]
    if missing:
        raise Failure("`%s` printed JSON without %s" % (shown, ", ".join(missing)))
    return obj


PPL_FIELDS = ("nats_per_token", "kv_bytes_per_token", "mha_kv_bytes_per_token",
              "scheme_shares", "schemes")
BENCH_FIELDS = ("decode_tok_s", "prefill_tok_s")


def row_from_perplexity(label, path, mode, run_mode, ppl, command):
    shares, names = ppl["scheme_shares"], ppl["schemes"]
    if not isinstance(shares, list) or not isinstance(names, list) or len(shares) != len(names):
        raise Failure("`%s`: scheme_shares and schemes do not match" % command)
    try:
        kv, mha = float(ppl["kv_bytes_per_token"]), float(ppl["mha_kv_bytes_per_token"])
        nats = float(ppl["nats_per_token"])
        share_map = {str(n): float(s) for n, s in zip(names, shares)}
    except (TypeError, ValueError):
        raise Failure("`%s` printed a non-numeric field" % command)
    if mha <= 0:
        raise Failure("`%s`: mha_kv_bytes_per_token is %s" % (command, mha))
    return {
        "label": label,
        "path": path,
        "mode": mode,
        "run_mode": run_mode,
        "kv_type": ppl.get("kv_type", "f32"),
        "nats_per_char": nats,
        "perplexity": ppl.get("perplexity"),
        "n_scored": ppl.get("n_scored"),
        "kv_bytes_per_token": kv,
        "mha_kv_bytes_per_token": mha,
        "kv_fraction_of_mha": kv / mha,
        "scheme_shares": share_map,
        "decode_tok_s": None,
        "prefill_tok_s": None,
        "perplexity_command": command,
    }


def measure(args, models, modes, progress):
    moas = resolve_moas(args.moas)
    if not os.path.isfile(args.text):
        raise Failure("text file '%s' does not exist" % args.text)
    threads = str(args.threads)
    rows, commands = [], []
    for label, path in models:
        for i, mode in enumerate(modes):
            argv = [moas, "perplexity", "-m", path, "-f", args.text, "--mode", mode,
                    "--json", "-t", threads]
            progress("perplexity: %s, %s mode" % (label, mode))
            ppl = run_json(argv, PPL_FIELDS)
            command = shlex.join(argv)
            commands.append(command)
            single = len(ppl["schemes"]) == 1
            rows.append(row_from_perplexity(label, path, SINGLE if single else mode, mode,
                                            ppl, command))
            if single:
                break   # one scheme: every mode computes the same thing

    bench = None
    if not args.no_bench:
        repeats = args.bench_repeats
        decode = [[] for _ in rows]
        prefill = [[] for _ in rows]
        bench_argv = []
        for row in rows:
            bench_argv.append([moas, "bench", "-m", row["path"], "--mode", row["run_mode"],
                               "-t", threads, "--n-prompt", str(BENCH_PROMPT),
                               "-n", str(BENCH_DECODE), "-r", "1", "--json"])
        commands.extend(shlex.join(a) for a in bench_argv)
        for r in range(repeats):
            for i, row in enumerate(rows):
                progress("bench round %d/%d: %s, %s" % (r + 1, repeats, row["label"], row["mode"]))
                out = run_json(bench_argv[i], BENCH_FIELDS)
                try:
                    decode[i].append(float(out["decode_tok_s"]))
                    prefill[i].append(float(out["prefill_tok_s"]))
                except (TypeError, ValueError):
                    raise Failure("`%s` printed a non-numeric speed" % shlex.join(bench_argv[i]))
        for i, row in enumerate(rows):
            row["decode_tok_s"] = statistics.median(decode[i])
            row["prefill_tok_s"] = statistics.median(prefill[i])
            row["decode_tok_s_rounds"] = decode[i]
            row["prefill_tok_s_rounds"] = prefill[i]
        bench = {"rounds": repeats, "n_prompt": BENCH_PROMPT, "n_decode": BENCH_DECODE,
                 "statistic": "median over interleaved rounds of one run each"}

    return {
        "tool": "tools/kv_tradeoff.py",
        "argv": args.argv,
        "moas": args.moas,
        "text": args.text,
        "threads": args.threads,
        "modes": modes,
        "bench": bench,
        "commands": commands,
        "rows": rows,
    }


ROW_FIELDS = ("label", "mode", "nats_per_char", "kv_bytes_per_token",
              "mha_kv_bytes_per_token", "scheme_shares")


def load_doc(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise Failure("'%s' does not exist" % path)
    except OSError as e:
        raise Failure("cannot read '%s': %s" % (path, e.strerror))
    except ValueError as e:
        raise Failure("'%s' is not JSON: %s" % (path, e))
    if not isinstance(doc, dict) or not isinstance(doc.get("rows"), list) or not doc["rows"]:
        raise Failure("'%s' has no rows (not written by kv_tradeoff.py --json?)" % path)
    for n, row in enumerate(doc["rows"], 1):
        if not isinstance(row, dict):
            raise Failure("'%s': row %d is not an object" % (path, n))
        for key in ROW_FIELDS:
            if key not in row:
                raise Failure("'%s': row %d has no %r" % (path, n, key))
        for key in ("nats_per_char", "kv_bytes_per_token", "mha_kv_bytes_per_token"):
            if not isinstance(row[key], (int, float)) or not math.isfinite(row[key]):
                raise Failure("'%s': row %d: %s is not a number" % (path, n, key))
        if row["mha_kv_bytes_per_token"] <= 0:
            raise Failure("'%s': row %d: mha_kv_bytes_per_token is not positive" % (path, n))
        if not isinstance(row["scheme_shares"], dict):
            raise Failure("'%s': row %d: scheme_shares is not an object" % (path, n))
    return doc


# ---- markdown ------------------------------------------------------------------------

def round_half_up(x):
    return int(math.floor(x + 0.5))


def fmt_int(x):
    return "—" if x is None else "{:,}".format(round_half_up(x))


def fmt_pct(x):
    return "—" if x is None else "%.1f%%" % (100.0 * x)


def share_columns(shares):
    """(MHA, GQA, MQA) shares; GQA sums every GQA-n scheme, and schemes of one kind
    named apart (MHA#0, MHA#1) are summed too; None where there is none."""
    mha = gqa = mqa = None
    for name, share in shares.items():
        name = name.split("#")[0]
        if name == "MHA":
            mha = (mha or 0.0) + share
        elif name == "MQA":
            mqa = (mqa or 0.0) + share
        elif name.startswith("GQA"):
            gqa = (gqa or 0.0) + share
    return mha, gqa, mqa


def md_cell(text):
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def group_means(rows, group, mode=None):
    """(mean KV bytes, mean nats/char, rows) of a group's rows (in one mode if given)."""
    sel = [r for r in rows if group_of(r["label"]) == group and (mode is None or
                                                                 r["mode"] == mode)]
    if not sel:
        return None
    return (statistics.fmean(r["kv_bytes_per_token"] for r in sel),
            statistics.fmean(r["nats_per_char"] for r in sel), sel)


def front_points(doc):
    """The static front: [(KV bytes, nats/char)] of each --front group's mean, by bytes."""
    pts = []
    for group in doc.get("front") or []:
        # --only draws some rows against the front of all of them
        m = group_means(doc.get("front_rows") or doc["rows"], group)
        if m is None:
            raise Failure("--front %r names no rows" % group)
        if any(r["mode"] != SINGLE for r in m[2]):
            raise Failure("--front %r is not a single-scheme model" % group)
        pts.append((m[0], m[1]))
    return sorted(pts)


def front_at(pts, kv):
    """The front's nats/char at `kv` bytes, linear between its points; None outside."""
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= kv <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (kv - x0) / (x1 - x0)
    return None


def spreads(rows):
    """[(group, mode, rows)] for every group with two or more rows in one mode."""
    out, seen = [], []
    for row in rows:
        key = (group_of(row["label"]), row["mode"])
        if key in seen:
            continue
        seen.append(key)
        sel = [r for r in rows if (group_of(r["label"]), r["mode"]) == key]
        if len(sel) > 1:
            out.append((key[0], key[1], sel))
    return out


def markdown(doc):
    pts = front_points(doc)
    lines = ["| model | mode | nats/char | KV bytes/token | % of MHA | "
             "shares MHA / GQA / MQA | decode tokens/s |" + (" vs. front |" if pts else ""),
             "|---|---|--:|--:|--:|--:|--:|" + ("--:|" if pts else "")]
    for row in doc["rows"]:
        fraction = row.get("kv_fraction_of_mha")
        if fraction is None:
            fraction = row["kv_bytes_per_token"] / row["mha_kv_bytes_per_token"]
        shares = " / ".join(fmt_pct(s) for s in share_columns(row["scheme_shares"]))
        line = "| %s | %s | %.4f | %s | %s | %s | %s |" % (
            md_cell(row["label"]), md_cell(row["mode"]), row["nats_per_char"],
            fmt_int(row["kv_bytes_per_token"]), fmt_pct(fraction), shares,
            fmt_int(row.get("decode_tok_s")))
        if pts:
            at = front_at(pts, row["kv_bytes_per_token"])
            line += " %s |" % ("—" if at is None else
                               "%+.2f%%" % (100.0 * (row["nats_per_char"] - at) / at))
        lines.append(line)
    spread = spreads(doc["rows"])
    if spread:
        lines += ["", "| group | mode | runs | nats/char mean | lowest | highest | spread | "
                  "KV bytes/token mean |", "|---|---|--:|--:|--:|--:|--:|--:|"]
        for group, mode, sel in spread:
            nats = [r["nats_per_char"] for r in sel]
            lines.append("| %s | %s | %d | %.4f | %.4f | %.4f | %.4f | %s |" % (
                md_cell(group), md_cell(mode), len(sel), statistics.fmean(nats), min(nats),
                max(nats), max(nats) - min(nats),
                fmt_int(statistics.fmean(r["kv_bytes_per_token"] for r in sel))))
    return "\n".join(lines) + "\n"


# ---- SVG -----------------------------------------------------------------------------

FONT = "DejaVu Sans, Verdana, Helvetica, Arial, sans-serif"


def esc(text):
    text = "".join(c for c in str(text) if c in "\t\n\r" or ord(c) >= 0x20)
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def text_width(text, size):
    """A generous estimate of rendered width in a DejaVu/Verdana-like sans-serif."""
    w = 0.0
    for c in str(text):
        if c in "il.,:;'|!()[]{} fjtI":
            w += 0.36
        elif c in "MWmw@%":
            w += 0.95
        elif c.isupper():
            w += 0.74
        elif c.isdigit():
            w += 0.64
        elif ord(c) >= 0x2e80:
            w += 1.0
        else:
            w += 0.62
    return w * size


def nice_step(raw):
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= raw; also its decimals."""
    k = math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        step = m * 10.0 ** k
        if step >= raw * (1 - 1e-9):
            if m == 10:
                m, k = 1, k + 1
            decimals = max(0, -k) + (1 if m == 2.5 else 0)
            return m * 10.0 ** k, decimals
    raise AssertionError("unreachable")


def ticks(lo, hi, max_intervals):
    """Nice tick values covering [lo, hi]: (values, decimals)."""
    if hi <= lo:
        hi = lo + 1.0
    step, decimals = nice_step((hi - lo) / max_intervals)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [round(i * step, decimals + 1) for i in range(first, last + 1)], decimals


def fmt_tick(value, decimals):
    if decimals == 0:
        return "{:,}".format(round_half_up(value))
    return "{:,.{}f}".format(value, decimals)


def fmt_num(x):
    """Coordinates with two decimals at most, without trailing zeros."""
    s = "%.2f" % x
    s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def marker(kind, x, y, colour, r, cls, title=None):
    """A hollow circle (mixture), filled circle (routed) or filled diamond (single)."""
    inner = "<title>%s</title>" % esc(title) if title else ""
    close = ">%s</%s>" if inner else "/>"
    if kind == SINGLE:
        d = r * 1.35
        pts = "M%s,%s L%s,%s L%s,%s L%s,%s Z" % (
            fmt_num(x), fmt_num(y - d), fmt_num(x + d), fmt_num(y),
            fmt_num(x), fmt_num(y + d), fmt_num(x - d), fmt_num(y))
        head = '<path class="%s" d="%s" fill="%s" stroke="%s" stroke-width="1.5"' % (
            cls, pts, colour, colour)
        return head + (close % (inner, "path") if inner else close)
    fill = "#ffffff" if kind == "mixture" else colour
    head = '<circle class="%s" cx="%s" cy="%s" r="%s" fill="%s" stroke="%s" stroke-width="2"' % (
        cls, fmt_num(x), fmt_num(y), fmt_num(r), fill, colour)
    return head + (close % (inner, "circle") if inner else close)


def svg(doc):
    rows = doc["rows"]
    labels, groups = [], []
    for row in rows:
        if row["label"] not in labels:
            labels.append(row["label"])
        if group_of(row["label"]) not in groups:
            groups.append(group_of(row["label"]))
    gcolour = {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}
    colour = {label: gcolour[group_of(label)] for label in labels}
    front = front_points(doc)
    modes_present = []
    for kind in ("mixture", "routed", SINGLE):
        if any(row["mode"] == kind for row in rows):
            modes_present.append(kind)
    kv_types = sorted({str(row.get("kv_type", "f32")) for row in rows})

    # axes
    mhas = sorted({float(row["mha_kv_bytes_per_token"]) for row in rows})
    xmax_data = max([row["kv_bytes_per_token"] for row in rows] + mhas)
    xt, xdec = ticks(0.0, xmax_data * 1.05, 7)
    ys = [row["nats_per_char"] for row in rows]
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.12 if yhi > ylo else max(abs(ylo) * 0.02, 0.01)
    yt, ydec = ticks(ylo - pad, yhi + pad, 6)
    x_labels = [fmt_tick(v, xdec) for v in xt]
    y_labels = [fmt_tick(v, ydec) for v in yt]

    # layout: title band, plot, legend at the right, axis titles outside the plot
    size, small = 12, 11
    key_text = {"mixture": "mixture mode (hollow)", "routed": "routed mode (filled)",
                SINGLE: "single scheme (one run)"}
    front_text = "static front: " + ", ".join(doc.get("front") or [])
    legend_texts = groups + [key_text[k] for k in modes_present] + (
        [front_text] if front else [])
    legend_w = 40 + max(text_width(t, size) for t in legend_texts)
    left = 30 + max(text_width(t, small) for t in y_labels) + 10
    top = 44
    width = 720.0
    gap = 18 + text_width(x_labels[-1], small) / 2
    plot_w = width - left - gap - legend_w - 10
    if plot_w < 380:
        plot_w = 380.0
        width = left + plot_w + gap + legend_w + 10
    right = left + plot_w
    legend_rows = len(groups) + 1 + len(modes_present) + (1 if front else 0)
    bottom = max(440.0 - 62, top + 8 + 20 * legend_rows)
    height = bottom + 62
    plot_h = bottom - top

    def px(v):
        return left + (v - xt[0]) / (xt[-1] - xt[0]) * plot_w

    def py(v):
        return bottom - (v - yt[0]) / (yt[-1] - yt[0]) * plot_h

    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<svg xmlns="http://www.w3.org/2000/svg" width="%s" height="%s" '
           'viewBox="0 0 %s %s" font-family="%s" font-size="%d">' % (
               fmt_num(width), fmt_num(height), fmt_num(width), fmt_num(height), FONT, size),
           '<rect class="background" x="0" y="0" width="%s" height="%s" fill="#ffffff"/>' % (
               fmt_num(width), fmt_num(height))]

    title = "Quality against KV cache size"
    sub = ""
    if doc.get("text"):
        sub = "— " + os.path.basename(str(doc["text"]))
        if left + text_width(title, 15) + 8 + text_width(sub, size) > width - 10:
            sub = ""
    out.append('<text class="title" x="%s" y="24" font-size="15" font-weight="bold">%s'
               '<tspan dx="8" font-weight="normal" font-size="%d" fill="#555555">%s</tspan></text>'
               % (fmt_num(left), esc(title), size, esc(sub)))

    # grid and ticks
    out.append('<g class="grid" stroke="#e6e6e6" stroke-width="1">')
    for v in xt[1:-1]:
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s"/>' % (
            fmt_num(px(v)), fmt_num(top), fmt_num(px(v)), fmt_num(bottom)))
    for v in yt[1:-1]:
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s"/>' % (
            fmt_num(left), fmt_num(py(v)), fmt_num(right), fmt_num(py(v))))
    out.append('</g>')
    out.append('<rect class="frame" x="%s" y="%s" width="%s" height="%s" fill="none" '
               'stroke="#333333" stroke-width="1"/>' % (
                   fmt_num(left), fmt_num(top), fmt_num(plot_w), fmt_num(plot_h)))
    out.append('<g class="x-ticks" font-size="%d" fill="#333333" text-anchor="middle">' % small)
    for v, s in zip(xt, x_labels):
        x = fmt_num(px(v))
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#333333"/>'
                   '<text x="%s" y="%s">%s</text>' % (
                       x, fmt_num(bottom), x, fmt_num(bottom + 5), x, fmt_num(bottom + 19),
                       esc(s)))
    out.append('</g>')
    out.append('<g class="y-ticks" font-size="%d" fill="#333333" text-anchor="end">' % small)
    for v, s in zip(yt, y_labels):
        y = fmt_num(py(v))
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#333333"/>'
                   '<text x="%s" y="%s">%s</text>' % (
                       fmt_num(left - 5), y, fmt_num(left), y, fmt_num(left - 8),
                       fmt_num(py(v) + 4), esc(s)))
    out.append('</g>')
    out.append('<text class="x-title" x="%s" y="%s" text-anchor="middle">%s</text>' % (
        fmt_num(left + plot_w / 2), fmt_num(bottom + 44),
        esc("KV cache bytes per token (%s)" % ", ".join(kv_types))))
    yx, ymid = 18, top + plot_h / 2
    out.append('<text class="y-title" x="%s" y="%s" text-anchor="middle" '
               'transform="rotate(-90 %s %s)">%s</text>' % (
                   fmt_num(yx), fmt_num(ymid), fmt_num(yx), fmt_num(ymid),
                   esc("nats per character (held-out text, lower is better)")))

    # MHA reference line(s)
    for n, mha in enumerate(mhas):
        x = px(mha)
        owners = [l for l in labels
                  if any(r["label"] == l and float(r["mha_kv_bytes_per_token"]) == mha
                         for r in rows)]
        text = "MHA cache" if len(mhas) == 1 else "MHA cache (%s)" % ", ".join(owners)
        ty = top + 15 + 15 * n
        w = text_width(text, small)
        if x + 5 + w <= right - 4:
            tx, anchor = x + 5, "start"
        else:
            tx, anchor = x - 5, "end"
        out.append('<line class="mha-ref" x1="%s" y1="%s" x2="%s" y2="%s" stroke="#555555" '
                   'stroke-width="1.2" stroke-dasharray="6 4"/>' % (
                       fmt_num(x), fmt_num(top), fmt_num(x), fmt_num(bottom)))
        out.append('<text class="mha-label" x="%s" y="%s" font-size="%d" fill="#555555" '
                   'text-anchor="%s">%s</text>' % (
                       fmt_num(tx), fmt_num(ty), small, anchor, esc(text)))

    # one model's modes joined, then the markers on top
    for label in labels:
        pts = [(px(r["kv_bytes_per_token"]), py(r["nats_per_char"]))
               for r in rows if r["label"] == label]
        if len(pts) > 1:
            out.append('<polyline class="pair" points="%s" fill="none" stroke="%s" '
                       'stroke-width="1" stroke-opacity="0.7"/>' % (
                           " ".join("%s,%s" % (fmt_num(x), fmt_num(y)) for x, y in pts),
                           colour[label]))
    if front:
        out.append('<polyline class="front" points="%s" fill="none" stroke="#222222" '
                   'stroke-width="1.5" stroke-dasharray="3 3"/>' % " ".join(
                       "%s,%s" % (fmt_num(px(x)), fmt_num(py(y))) for x, y in front))
    for group, mode, sel in spreads(rows):
        x = px(statistics.fmean(r["kv_bytes_per_token"] for r in sel))
        y0 = py(min(r["nats_per_char"] for r in sel))
        y1 = py(max(r["nats_per_char"] for r in sel))
        c = gcolour[group]
        out.append('<path class="spread" d="M%s,%s H%s M%s,%s V%s M%s,%s H%s" fill="none" '
                   'stroke="%s" stroke-width="1.5"/>' % (
                       fmt_num(x - 5), fmt_num(y0), fmt_num(x + 5), fmt_num(x), fmt_num(y0),
                       fmt_num(y1), fmt_num(x - 5), fmt_num(y1), fmt_num(x + 5), c))
    for row in rows:
        kv, nats = row["kv_bytes_per_token"], row["nats_per_char"]
        fraction = kv / row["mha_kv_bytes_per_token"]
        tip = "%s, %s: %.4f nats/char, %s KV bytes/token (%.1f%% of MHA)" % (
            row["label"], row["mode"], nats, fmt_int(kv), 100 * fraction)
        kind = row["mode"] if row["mode"] in ("mixture", "routed") else SINGLE
        out.append(marker(kind, px(kv), py(nats), colour[row["label"]], 5.5,
                          "point " + kind, tip))

    # legend
    lx, ly = right + gap, top + 4
    out.append('<g class="legend">')
    for i, label in enumerate(groups):
        y = ly + 10 + 20 * i
        kinds = []
        for r in rows:
            if group_of(r["label"]) == label and r["mode"] not in kinds:
                kinds.append(r["mode"])
        c = gcolour[label]
        if len(kinds) == 1:
            kind = kinds[0] if kinds[0] in ("mixture", "routed") else SINGLE
            out.append(marker(kind, lx + 13, y, c, 4.5, "legend-marker"))
        else:
            out.append('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s" stroke-width="1"/>' % (
                fmt_num(lx + 4), fmt_num(y), fmt_num(lx + 22), fmt_num(y), c))
            out.append(marker("mixture", lx + 4, y, c, 4, "legend-marker"))
            out.append(marker("routed", lx + 22, y, c, 4, "legend-marker"))
        out.append('<text x="%s" y="%s">%s</text>' % (
            fmt_num(lx + 34), fmt_num(y + 4), esc(label)))
    for j, kind in enumerate(modes_present):
        y = ly + 10 + 20 * (len(groups) + 1 + j)
        out.append(marker(kind, lx + 13, y, "#555555", 4.5, "legend-marker"))
        out.append('<text x="%s" y="%s" fill="#333333">%s</text>' % (
            fmt_num(lx + 34), fmt_num(y + 4), esc(key_text[kind])))
    if front:
        y = ly + 10 + 20 * (len(groups) + 1 + len(modes_present))
        out.append('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#222222" stroke-width="1.5" '
                   'stroke-dasharray="3 3"/>' % (fmt_num(lx + 2), fmt_num(y), fmt_num(lx + 24),
                                                 fmt_num(y)))
        out.append('<text x="%s" y="%s" fill="#333333">%s</text>' % (
            fmt_num(lx + 34), fmt_num(y + 4), esc(front_text)))
    out.append('</g>')
    out.append('</svg>')
    return "\n".join(out) + "\n"


# ---- main ----------------------------------------------------------------------------

def relabel(doc, specs):
    for old, new in specs:
        if not new.strip():
            raise Failure("--relabel: the new label for %r is empty" % old)
        rows = [r for r in doc["rows"] if r["label"] == old]
        if not rows:
            raise Failure("--relabel: no row is labelled %r" % old)
        if any(r["label"] == new for r in doc["rows"]):
            raise Failure("--relabel: a row is already labelled %r" % new)
        for r in rows:
            r["label"] = new


def write_text(path, text):
    try:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    except OSError as e:
        raise Failure("cannot write '%s': %s" % (path, e.strerror))


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="kv_tradeoff.py",
        description="Measure nats/char against KV-cache bytes per token with bin/moas "
                    "and tabulate or plot it.")
    p.add_argument("--moas", default=os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "bin", "moas"), help="the moas CLI (default: ../bin/moas)")
    p.add_argument("--text", help="held-out text to score")
    p.add_argument("--model", action="append", default=[], metavar="LABEL=PATH",
                   help="a model to measure (repeatable)")
    p.add_argument("--modes", default="mixture,routed",
                   help="comma-separated modes (default: mixture,routed)")
    p.add_argument("--threads", type=int, default=1, help="threads per moas run (default 1)")
    p.add_argument("--bench-repeats", type=int, default=5,
                   help="interleaved bench rounds; each pair reports the median (default 5)")
    p.add_argument("--no-bench", action="store_true", help="skip the decode timings")
    p.add_argument("--from-json", metavar="IN", help="redraw from an earlier --json output")
    p.add_argument("--append-to", metavar="IN",
                   help="add the --model rows to an earlier --json output")
    p.add_argument("--relabel", action="append", default=[], nargs=2, metavar=("OLD", "NEW"),
                   help="rename a row of --from-json/--append-to's document (repeatable)")
    p.add_argument("--front", action="append", default=None, metavar="GROUP",
                   help="a single-scheme group on the static front (repeatable; replaces "
                        "the document's)")
    p.add_argument("--json", metavar="OUT", help="write the measurements as JSON")
    p.add_argument("--svg", metavar="OUT", help="write the scatter plot")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--only", action="append", default=None, metavar="GROUP",
                   help="draw and tabulate only these groups (repeatable)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress lines (they go to stderr, and only to a terminal)")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    try:
        if args.from_json and args.append_to:
            raise Failure("--from-json and --append-to exclude each other")
        if args.relabel and not (args.from_json or args.append_to):
            raise Failure("--relabel renames rows of --from-json or --append-to")
        if args.from_json:
            if args.model:
                raise Failure("--from-json redraws; it takes no --model")
            doc = load_doc(args.from_json)
            relabel(doc, args.relabel)
        else:
            if not args.model:
                raise Failure("nothing to measure: give --model LABEL=PATH (or --from-json)")
            if not args.text:
                raise Failure("--text is required to measure")
            if args.threads < 1:
                raise Failure("--threads must be at least 1")
            if args.bench_repeats < 1:
                raise Failure("--bench-repeats must be at least 1")
            modes = parse_modes(args.modes)
            models = [parse_model(m) for m in args.model]
            base = None
            if args.append_to:
                base = load_doc(args.append_to)
                relabel(base, args.relabel)
            seen = set(r["label"] for r in base["rows"]) if base else set()
            for label, path in models:
                if label in seen:
                    raise Failure("two models are labelled %r" % label)
                seen.add(label)
                if not os.path.isfile(path):
                    raise Failure("model '%s' (%s) does not exist" % (path, label))
            show = not args.quiet and sys.stderr.isatty()

            def progress(msg):
                if show:
                    print("%s: %s" % (PROG, msg), file=sys.stderr, flush=True)

            doc = measure(args, models, modes, progress)
            if base is not None:
                base.setdefault("appended", []).append(
                    {"argv": doc["argv"], "commands": doc["commands"], "bench": doc["bench"],
                     "threads": doc["threads"], "modes": doc["modes"]})
                base["rows"].extend(doc["rows"])
                doc = base
        if args.front is not None:
            doc["front"] = list(args.front)
        front_points(doc)   # a --front that names no single-scheme rows fails here

        if args.json:
            write_text(args.json, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        if args.only is not None:
            missing = [g for g in args.only
                       if not any(group_of(r["label"]) == g for r in doc["rows"])]
            if missing:
                raise Failure("--only %r names no rows" % missing[0])
            doc = dict(doc, rows=[r for r in doc["rows"] if group_of(r["label"]) in args.only],
                       front_rows=doc["rows"])
            front_points(doc)
        if args.svg:
            write_text(args.svg, svg(doc))
        if args.markdown or not (args.json or args.svg):
            sys.stdout.write(markdown(doc))
    except Failure as e:
        print("%s: error: %s" % (PROG, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
