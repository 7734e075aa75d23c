#!/usr/bin/env python3
"""Per-layer scheme shares of a routed model, from `moas routes --json`.

    tools/layer_shares.py --moas bin/moas -m MODEL -f TEXT [--mode routed] [--label L]

Runs `moas routes` on TEXT (windows of the model's context, each from an empty cache,
as `moas perplexity` scores them) and prints one Markdown table row per model: for each
layer, the shares of its token-layer pairs that took each scheme, and the layer's mean
KV heads per token. Standard library only.
"""
import argparse
import json
import subprocess
import sys


def layer_shares(lines):
    """{layer: [count per scheme]}, {layer: kv heads summed}, from routes JSON lines."""
    counts, heads = {}, {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        layer, scheme = r["layer"], r["scheme"]
        c = counts.setdefault(layer, [])
        c.extend([0] * (scheme + 1 - len(c)))
        c[scheme] += 1
        heads[layer] = heads.get(layer, 0) + r["kv_heads"]
    return counts, heads


def markdown_row(label, counts, heads):
    n_scheme = max(len(c) for c in counts.values())
    cells = []
    for layer in sorted(counts):
        c = counts[layer] + [0] * (n_scheme - len(counts[layer]))
        total = sum(c)
        cells.append("%s (%.2f)" % (" / ".join("%.1f%%" % (100.0 * x / total) for x in c),
                                    heads[layer] / total))
    return "| %s | %s |" % (label, " | ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--moas", default="bin/moas")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-f", "--text", required=True)
    ap.add_argument("--mode", default="routed")
    ap.add_argument("--label", default=None)
    o = ap.parse_args(argv)
    try:
        r = subprocess.run([o.moas, "routes", "-m", o.model, "-f", o.text, "--mode", o.mode,
                            "--json"], capture_output=True, text=True)
    except OSError as e:   # no such program (the default is relative to the checkout)
        sys.exit("layer_shares: cannot run %s: %s (--moas PATH)" % (o.moas, e.strerror))
    if r.returncode:
        sys.exit("layer_shares: moas routes failed: %s" % r.stderr.strip())
    counts, heads = layer_shares(r.stdout.splitlines())
    if not counts:
        sys.exit("layer_shares: moas routes printed no routes")
    print(markdown_row(o.label or o.model, counts, heads))


if __name__ == "__main__":
    main()
