#!/usr/bin/env python3
"""Write the King James Bible as plain text, one verse per line, for training.

The text comes from Debian's bible-kjv-text package through its `bible` program
(public domain). Verse references ("Ge1:1 ") and the program's prompts are dropped,
so the model sees only scripture. The last 10% of the characters is the validation
split tools/train.py holds out; --heldout writes a slice of it for measurements.

    tools/kjv_corpus.py -o /tmp/kjv.txt [--heldout models/kjv-heldout.txt --heldout-chars 20000]
"""
import argparse
import re
import subprocess
import sys

VERSE = re.compile(r"^[1-3]?[A-Z][A-Za-z]*\d+:\d+ (.*)$")


def corpus():
    try:
        out = subprocess.run(["bible", "-f", "-l0", "gen1:1-rev22:21"], check=True,
                             capture_output=True, text=True, encoding="utf-8").stdout
    except FileNotFoundError:
        sys.exit("kjv_corpus: the `bible` program is missing: apt-get install bible-kjv")
    verses = []
    for line in out.splitlines():
        m = VERSE.match(line)
        if m:
            verses.append(m.group(1).strip())
    if len(verses) != 31102:   # verses in the KJV canon (Genesis..Revelation)
        sys.exit(f"kjv_corpus: expected 31102 verses, got {len(verses)}")
    return "\n".join(verses) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--heldout", help="also write the start of the validation split here")
    ap.add_argument("--heldout-chars", type=int, default=20000)
    args = ap.parse_args()
    text = corpus()
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    if args.heldout:
        val = text[int(len(text) * 0.9):]
        val = val[val.index("\n") + 1:]   # from the first whole verse of the split
        with open(args.heldout, "w", encoding="utf-8") as f:
            f.write(val[:args.heldout_chars])
    print(f"kjv_corpus: {len(text)} characters, {len(set(text))} distinct", file=sys.stderr)


if __name__ == "__main__":
    main()
