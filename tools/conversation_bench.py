#!/usr/bin/env python3
"""conversation_bench.py - time to first token of a conversation's turns through
moas.server, with the prompt cache and without it (loopback).

    python3 tools/conversation_bench.py -m models/pooled-rope-kjv-1k.gguf [--rounds 3]
        [--first 600] [--turns 4] [--add 60] [--max-tokens 32] [--mode routed] [--json]

Each round starts the server twice, once with --prompt-cache 8 and once with
--prompt-cache 0 (the order alternating round by round), and runs the same
conversation against each: turn 1 sends the first FIRST characters of
models/kjv-heldout.txt; every later turn sends the whole conversation so far (the
previous prompt, the text it got back, and the next ADD characters of the file), as a
chat client does. Each turn is one streamed completion of MAX_TOKENS characters with
its own seed; the time to its first character and to its end are taken from the
client's side. Prints, per turn and setting, the prompt length, the cached tokens the
server reported and the median times over rounds, and whether every text was the same
with and without the cache (exit status 1 if not). Standard library only.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(args, cache):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bindings", "python"))
    proc = subprocess.Popen([args.python, "-m", "moas.server", "-m", args.model, "--port", "0",
                             "--mode", args.mode, "--prompt-cache", cache, "-t",
                             str(args.threads)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        sys.exit("conversation_bench: the server did not start: " + line)
    return proc, int(line.rsplit(":", 1)[1].strip("/\n"))


def turn(port, body):
    """(seconds to the first character, seconds to the end, text, usage)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    data = json.dumps(dict(body, stream=True,
                           stream_options={"include_usage": True})).encode()
    t0 = time.monotonic()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data)
                 + data)
    f = sock.makefile("rb")
    status = f.readline()
    if b" 200 " not in status:
        sys.exit("conversation_bench: %s%s" % (status.decode().strip(),
                                               f.read().decode(errors="replace")[-300:]))
    first, text, usage = None, [], None
    for line in f:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        event = json.loads(payload)
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            if choice["text"]:
                first = first if first is not None else time.monotonic() - t0
                text.append(choice["text"])
    end = time.monotonic() - t0
    sock.close()
    return first, end, "".join(text), usage


def conversation(args, port, source):
    turn(port, {"prompt": source[:8], "max_tokens": 2, "seed": 1})   # warm-up
    prompt, out = source[:args.first], []
    for t in range(args.turns):
        first, end, text, usage = turn(port, {"prompt": prompt, "max_tokens": args.max_tokens,
                                              "seed": 7 + t, "temperature": 0.8})
        out.append({"prompt_chars": len(prompt), "ttft_ms": first * 1e3, "total_ms": end * 1e3,
                    "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
                    "text": text})
        at = args.first + args.add * t
        prompt = prompt + text + source[at:at + args.add]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--first", type=int, default=600)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--add", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mode", default="routed")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--text", default=os.path.join(ROOT, "models", "kjv-heldout.txt"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for name, ok in (("--rounds >= 1", args.rounds >= 1), ("--turns >= 1", args.turns >= 1),
                     ("--max-tokens >= 1", args.max_tokens >= 1), ("--first >= 1", args.first >= 1),
                     ("--add >= 0", args.add >= 0)):
        if not ok:   # a turn must answer something for its time to first token
            ap.error("needs " + name)
    try:
        with open(args.text, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        sys.exit("conversation_bench: %s: %s" % (args.text, e.strerror))
    runs = {"8": [], "0": []}
    for r in range(args.rounds):
        for cache in (("8", "0") if r % 2 == 0 else ("0", "8")):
            proc, port = start(args, cache)
            try:
                runs[cache].append(conversation(args, port, source))
            finally:
                proc.terminate()
                proc.wait(10)
    same = all(a[t]["text"] == b[t]["text"] for a, b in zip(runs["8"], runs["0"])
               for t in range(args.turns))
    rows = []
    for cache in ("8", "0"):
        for t in range(args.turns):
            turns = [run[t] for run in runs[cache]]
            rows.append({"prompt_cache": int(cache), "turn": t + 1,
                         "prompt_chars": turns[0]["prompt_chars"],
                         "cached_tokens": turns[0]["cached_tokens"],
                         "ttft_ms": statistics.median(x["ttft_ms"] for x in turns),
                         "total_ms": statistics.median(x["total_ms"] for x in turns)})
    if args.json:
        print(json.dumps({"rows": rows, "same_text": same}))
    else:
        print("| --prompt-cache | turn | prompt chars | cached tokens | first character ms "
              "(median) | whole turn ms (median) |")
        print("|---|--:|--:|--:|--:|--:|")
        for row in rows:
            print("| %d | %d | %d | %d | %.1f | %.1f |" % (
                row["prompt_cache"], row["turn"], row["prompt_chars"], row["cached_tokens"],
                row["ttft_ms"], row["total_ms"]))
        print("texts the same with and without the cache: %s" % ("yes" if same else "NO"))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
