#!/usr/bin/env python3
"""What compaction costs: nats/char of a pooled-K/V model in routed mode when, as
decoding goes on, every token older than the last KEEP is pooled down to a cheaper
scheme (moas_context_compact), against no compaction.

Scores the text the way `moas perplexity` does: consecutive windows of the model's
context, each from an empty cache, every character after the first of a window scored
(so KEEP = none reproduces `moas perplexity --mode routed`). Prints one JSON object per
KEEP: nats/char, characters scored, and the mean KV bytes used at the end of a window.

    tools/compaction_cost.py -m models/pooled-kjv-kvinit.gguf -f models/kjv-heldout.txt \\
        --keep none,64,32,16,8,0 --scheme 2
"""
import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bindings", "python"))
os.environ.setdefault("MOAS_LIBRARY", os.path.join(HERE, "..", "lib", "libmoas.so.1"))
import moas  # noqa: E402


def nll(logits, target):
    top = max(logits)
    return math.log(sum(math.exp(x - top) for x in logits)) + top - logits[target]


def run(model, ids, keep, scheme, threads):
    ctx = model.context(mode="routed", n_threads=threads)
    n_ctx = ctx.n_ctx
    total, scored, kv_end, windows, changed = 0.0, 0, 0, 0, 0
    for begin in range(0, len(ids), n_ctx):
        window = ids[begin:begin + n_ctx]
        ctx.reset()
        for i, tok in enumerate(window):
            logits = ctx.decode(tok)
            if i + 1 < len(window):
                total += nll(logits, window[i + 1])
                scored += 1
            if keep is not None and ctx.n_past > keep:
                changed += ctx.compact(ctx.n_past - keep, scheme)
        kv_end += ctx.kv_bytes_used()
        windows += 1
    ctx.close()
    return {"keep": "none" if keep is None else keep, "scheme": scheme,
            "nats_per_char": total / scored, "chars_scored": scored,
            "mean_kv_bytes_at_window_end": kv_end / windows, "token_layers_pooled": changed}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--file", required=True)
    ap.add_argument("--keep", default="none,64,32,16,8,0",
                    help="comma-separated: tokens kept as routed ('none': no compaction)")
    ap.add_argument("--scheme", type=int, default=-1,
                    help="scheme to pool down to (default: the one with the fewest KV heads)")
    ap.add_argument("-t", "--threads", type=int, default=1)
    args = ap.parse_args()
    try:
        keeps = [None if k == "none" else int(k) for k in args.keep.split(",")]
    except ValueError:
        ap.error("--keep takes 'none' and whole numbers >= 0, comma-separated: %r"
                 % args.keep)
    if any(k is not None and k < 0 for k in keeps):
        ap.error("--keep takes 'none' and whole numbers >= 0: %r" % args.keep)
    try:
        model = moas.Model(args.model)
        if model.kv_sharing != moas.KvSharing.POOLED:
            raise SystemExit("compaction_cost.py: %s: compaction needs a model with pooled "
                             "K/V" % args.model)
        if not -1 <= args.scheme < model.n_scheme:
            raise SystemExit("compaction_cost.py: --scheme %d: the model has schemes 0 to %d"
                             % (args.scheme, model.n_scheme - 1))
        with open(args.file, encoding="utf-8") as f:
            ids = model.tokenize(f.read())
        if len(ids) < 2:
            raise SystemExit("compaction_cost.py: %s: scoring needs at least 2 characters"
                             % args.file)
        scheme = args.scheme
        if scheme < 0:
            kv = model.schemes
            scheme = min(range(len(kv)), key=lambda s: kv[s])
        for keep in keeps:
            print(json.dumps(run(model, ids, keep, scheme, args.threads)), flush=True)
    except (OSError, moas.MoasError) as e:   # one line, not a traceback
        raise SystemExit("compaction_cost.py: %s" % e)


if __name__ == "__main__":
    main()
