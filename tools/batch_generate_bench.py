#!/usr/bin/env python3
"""batch_generate_bench.py - Model.generate_batch against Model.generate prompt by prompt.

  tools/batch_generate_bench.py -m MODEL [--prompts 16] [--prompt-chars 32]
                                [--shared-chars 0] [--max-tokens 64] [--rounds 3]
                                [--mode routed] [--kv-type f32] [--prompt-cache 8]
                                [-t THREADS] [--json]

The prompts are consecutive pieces of models/kjv-heldout.txt (--text), each
--prompt-chars long (characters outside the vocabulary replaced by a space), after
the text's first --shared-chars characters, which they all begin with (a shared
instruction; generate_batch reads it once unless --prompt-cache is 0). Each
round runs the batch, then the same prompts one at a time, with the same arguments;
the rounds alternate so that a drifting machine moves both alike. Every round checks
that the texts are equal (exit 1 if not). Reports generated characters per second,
prompts included in the time, per round and the medians. Standard library only, plus
the package in bindings/python.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
import moas  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--text", default=os.path.join(ROOT, "models", "kjv-heldout.txt"))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-chars", type=int, default=32)
    ap.add_argument("--shared-chars", type=int, default=0)
    ap.add_argument("--prompt-cache", type=int, default=8,
                    help="generate_batch's prompt_cache (0: no beginning read once)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=["mixture", "routed"], default="routed")
    ap.add_argument("--kv-type", choices=["f32", "f16", "q8_0"], default="f32")
    ap.add_argument("-t", "--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for name in ("prompts", "prompt_chars", "rounds"):
        if getattr(args, name) < 1:
            ap.error("--%s must be at least 1" % name.replace("_", "-"))
    for name in ("max_tokens", "shared_chars", "prompt_cache"):
        if getattr(args, name) < 0:
            ap.error("--%s must be at least 0" % name.replace("_", "-"))

    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    step, shared = args.prompt_chars, args.shared_chars
    if len(text) < shared + args.prompts * step:
        sys.exit("batch_generate_bench: %s has %d characters, fewer than %d shared and %d "
                 "prompts of %d" % (args.text, len(text), shared, args.prompts, step))
    prompts = [text[:shared] + text[shared + i * step:shared + (i + 1) * step]
               for i in range(args.prompts)]
    common = dict(mode=args.mode, kv_type=args.kv_type, n_threads=args.threads, seed=1,
                  unknown="replace")
    rows = []
    with moas.Model(args.model) as model:
        for r in range(args.rounds):
            t = time.perf_counter()
            batch = model.generate_batch(prompts, args.max_tokens,
                                         prompt_cache=args.prompt_cache, **common)
            t_batch = time.perf_counter() - t
            t = time.perf_counter()
            alone = [model.generate(p, args.max_tokens, **common) for p in prompts]
            t_alone = time.perf_counter() - t
            same = [c.text for c in batch] == alone
            chars = sum(c.choices[0].n_tokens for c in batch)
            rows.append(dict(round=r, chars=chars, batch_chars_s=chars / t_batch,
                             alone_chars_s=chars / t_alone, same_text=same,
                             cached_tokens=sum(c.cached_tokens for c in batch)))
            if not args.json:
                print("round %d: batch %.0f chars/s, one at a time %.0f (%.2fx)%s"
                      % (r, chars / t_batch, chars / t_alone, t_alone / t_batch,
                         "" if same else "  TEXTS DIFFER"), flush=True)
    med_batch = statistics.median(row["batch_chars_s"] for row in rows)
    med_alone = statistics.median(row["alone_chars_s"] for row in rows)
    same = all(row["same_text"] for row in rows)
    if args.json:
        print(json.dumps(dict(model=args.model, prompts=args.prompts,
                              prompt_chars=args.prompt_chars,
                              shared_chars=args.shared_chars,
                              prompt_cache=args.prompt_cache, max_tokens=args.max_tokens,
                              mode=args.mode, kv_type=args.kv_type, rounds=rows,
                              batch_chars_s=med_batch, alone_chars_s=med_alone,
                              same_text=same)))
    else:
        print("medians: batch %.0f chars/s, one at a time %.0f (%.2fx)"
              % (med_batch, med_alone, med_batch / med_alone))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
