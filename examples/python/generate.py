#!/usr/bin/env python3
"""generate.py - generate text from a prompt with the libmoas Python binding.

    python3 examples/python/generate.py models/moas-kjv.gguf "And God said" -n 200

Finds libmoas as bindings/python/moas documents (MOAS_LIBRARY, pkg-config, lib/).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                os.pardir, os.pardir, "bindings", "python"))
import moas  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("prompt", nargs="?", default="In the beginning")
    ap.add_argument("-n", type=int, default=100, help="characters to generate")
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=["mixture", "routed"], default="mixture")
    args = ap.parse_args()

    try:
        with moas.Model(args.model) as model, \
                model.context(mode=args.mode) as ctx, \
                moas.Sampler(model, temperature=args.temp, seed=args.seed) as sampler:
            window = model.tokenize(args.prompt)
            if not window:   # nothing to continue from: no logits to sample
                sys.exit("generate.py: the prompt is empty")
            if len(window) > ctx.n_ctx:   # the model knows no later positions
                print("generate.py: the prompt has %d characters, more than the context's "
                      "%d: only its last %d are decoded" % (len(window), ctx.n_ctx, ctx.n_ctx),
                      file=sys.stderr)
                window = window[-ctx.n_ctx:]
            logits = ctx.decode_batch(window)
            out = [args.prompt]
            slides = 0
            for _ in range(args.n):
                token = sampler.sample(logits)   # reads the library's buffer in place
                out.append(model.token_text(token))
                if ctx.n_past == ctx.n_ctx:
                    # full: go on from the last half of the window, decoded again from
                    # position 0, as `moas generate` does for learned positions (for a
                    # RoPE model it shifts the cache instead: Context.shift)
                    if slides == 0:
                        print("generate.py: the context (%d tokens) is full: each time it "
                              "fills, generation goes on from its last %d tokens, decoded "
                              "again from position 0" % (ctx.n_ctx, ctx.n_ctx // 2),
                              file=sys.stderr)
                    slides += 1
                    window = window[-(ctx.n_ctx // 2):]
                    ctx.reset()
                    ctx.decode_batch(window, logits="none")
                window.append(token)
                logits = ctx.decode(token)       # the old view is released here
            print("".join(out))
            counts = ctx.scheme_counts()
            print("routing: %s token-layers per scheme, KV bytes %d"
                  % (counts, ctx.kv_bytes_used()), file=sys.stderr)
    except moas.MoasError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
