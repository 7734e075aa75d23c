#!/usr/bin/env python3
"""loadtest.py - many concurrent streaming clients against one moas.server (loopback).

    python3 tools/loadtest.py -m models/pooled-kjv-kvinit.gguf --clients 64 --requests 2
    make loadtest                      # the full run of docs/SERVING.md
    make test                          # a short run (tests/python/pkg/test_loadtest.py)

Starts python3 -m moas.server on a free 127.0.0.1 port (its arguments after `--`),
then runs CLIENTS threads, each sending REQUESTS streamed completions with mixed prompt
lengths and its own seeds; every DISCONNECT-th request hangs up after a few characters.
Every stream's text is checked against the same request run alone in this process
(Model.generate, same seed, same mode): complete streams must be equal, cut ones a
prefix. Reports requests completed, characters streamed, lost/duplicated/corrupted
streams, non-503 5xx answers, p50/p99 time to first token and per-token latency,
aggregate tokens/s, peak pool bytes held, and the server's RSS idle, after the load
and after a second identical round (growth means a leak). --json prints one object.
Exit status 1 when anything was lost, corrupted or a 5xx other than 503 was seen.
Standard library only.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
os.environ.setdefault("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
import moas  # noqa: E402

TEXT = ("In the beginning God created the heaven and the earth. And the earth was without "
        "form, and void; and darkness was upon the face of the deep. And the Spirit of God "
        "moved upon the face of the waters. And God said, Let there be light: and there "
        "was light.")


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def get(port, path, method="GET"):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
               % (method, path)).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return data.split(b"\r\n\r\n", 1)[1].decode()


def metrics(port):
    out = {}
    for line in get(port, "/metrics").splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def stream(port, body, cut_after=None):
    """One streamed completion: dict(status, text, t_send, t_first, gaps, cut)."""
    data = json.dumps(dict(body, stream=True)).encode()
    t0 = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    f = s.makefile("rb")
    status = int(f.readline().split()[1])
    while f.readline() not in (b"\r\n", b""):
        pass
    out = dict(status=status, text="", t_send=t0, t_first=None, gaps=[], cut=False)
    if status != 200:
        out["error"] = f.read(4096).decode(errors="replace")
        s.close()
        return out
    last = None
    buf = b""
    while True:
        line = f.readline()
        if not line:
            break
        n = int(line.strip() or b"0", 16)
        if n == 0:
            break
        buf += f.read(n)
        f.readline()
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            if not block.startswith(b"data: "):
                continue
            payload = block[6:]
            if payload == b"[DONE]":
                s.close()
                return out
            ev = json.loads(payload)
            if "error" in ev:
                out["error"] = ev["error"]["message"]
                continue
            for c in ev["choices"]:
                if c["text"]:
                    now = time.monotonic()
                    if out["t_first"] is None:
                        out["t_first"] = now
                    else:
                        out["gaps"].append(now - last)
                    last = now
                    out["text"] += c["text"]
            if cut_after is not None and len(out["text"]) >= cut_after:
                out["cut"] = True
                s.close()
                return out
    s.close()
    return out


def percentile(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[k]


def round_of_load(port, model, args, expected, text):
    results = []
    lock = threading.Lock()
    n_ctx = model.n_ctx_train

    def client(c):
        for k in range(args.requests):
            seed = 1000 * c + k
            plen = args.min_prompt + (c * 37 + k * 11) % (args.max_prompt - args.min_prompt + 1)
            prompt = text[:plen]
            max_tokens = min(args.max_tokens, n_ctx - plen)
            body = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed,
                    "temperature": args.temperature}
            cut = 3 + c % 5 if args.disconnect and (c * args.requests + k) % args.disconnect \
                == 0 else None
            try:
                r = stream(port, body, cut)
            except OSError as e:
                r = dict(status=0, text="", error=repr(e), cut=False, gaps=[], t_first=None,
                         t_send=0)
            r.update(seed=seed, prompt=prompt, max_tokens=max_tokens)
            with lock:
                results.append(r)
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    # check every text against the request run alone
    lost = corrupted = 0
    for r in results:
        key = (r["prompt"], r["max_tokens"], r["seed"])
        if key not in expected:
            expected[key] = model.generate(r["prompt"], r["max_tokens"], seed=r["seed"],
                                           temperature=args.temperature, mode=args.mode,
                                           forced_scheme=args.force_scheme,
                                           kv_type=args.kv_type)
        want = expected[key]
        if r["status"] != 200:
            continue
        if r["cut"]:
            if not want.startswith(r["text"]):
                corrupted += 1
        elif r["text"] != want:
            if want.startswith(r["text"]):
                lost += 1
            else:
                corrupted += 1
    ok = [r for r in results if r["status"] == 200]
    ttft = [r["t_first"] - r["t_send"] for r in ok if r["t_first"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    chars = sum(len(r["text"]) for r in ok)
    return {
        "requests": len(results),
        "completed": sum(1 for r in ok if not r["cut"]),
        "disconnected": sum(1 for r in ok if r["cut"]),
        "status_503": sum(1 for r in results if r["status"] == 503),
        "other_errors": sum(1 for r in results if r["status"] not in (200, 503)),
        "errors_sample": [r.get("error") for r in results if r["status"] not in (200, 503)][:3],
        "characters_streamed": chars,
        "lost": lost, "corrupted": corrupted,
        "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "token_p50_ms": 1000 * percentile(gaps, 50), "token_p99_ms": 1000 * percentile(gaps, 99),
        "wall_s": wall, "tokens_per_s": chars / wall if wall else 0.0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models", "pooled-kjv-kvinit.gguf"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=4, help="shortest prompt (chars)")
    ap.add_argument("--max-prompt", type=int, default=63, help="longest prompt (chars)")
    ap.add_argument("--disconnect", type=int, default=8,
                    help="every N-th request hangs up early (0: none)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--mode", default="routed", choices=("routed", "mixture"))
    ap.add_argument("--pool-mb", type=float, default=16.0)
    ap.add_argument("--kv-type", default="f32", choices=("f32", "f16", "q8_0"),
                    help="the server's K/V type, and the lone requests' it is checked against")
    ap.add_argument("--text", help="prompts are the beginnings of this file's text (default: "
                    "Genesis 1:1-3), for prompts longer than it")
    ap.add_argument("--force-scheme", type=int, default=-1,
                    help="routed mode: every token to scheme S (0: an MHA-sized cache)")
    ap.add_argument("--rounds", type=int, default=2, help="identical rounds (RSS growth)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the server")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("server_args", nargs="*", help="after --: more moas.server arguments")
    args = ap.parse_args()
    # a run that tests nothing must not report "ok"
    for name, ok in (("--clients >= 1", args.clients >= 1),
                     ("--requests >= 1", args.requests >= 1),
                     ("--rounds >= 1", args.rounds >= 1),
                     ("--max-tokens >= 0", args.max_tokens >= 0),
                     ("--disconnect >= 0", args.disconnect >= 0),
                     ("1 <= --min-prompt <= --max-prompt",
                      1 <= args.min_prompt <= args.max_prompt)):
        if not ok:
            ap.error("needs " + name)
    try:
        with moas.Model(args.model) as probe:
            n_ctx = probe.n_ctx_train
    except (OSError, moas.MoasError) as e:
        sys.exit("loadtest: %s" % e)
    text = TEXT
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    if args.max_prompt > min(n_ctx, len(text)):
        ap.error("--max-prompt %d: prompts go up to %d characters here (the context, and "
                 "the text they are cut from)" % (args.max_prompt, min(n_ctx, len(text))))

    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bindings", "python"))
    proc = subprocess.Popen([args.python, "-m", "moas.server", "-m", args.model, "--port", "0",
                             "--pool-mb", str(args.pool_mb), "--mode", args.mode,
                             "--max-queue", str(args.clients * 2),
                             "--force-scheme", str(args.force_scheme),
                             "--kv-type", args.kv_type] + args.server_args,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    try:
        line = proc.stdout.readline()
        if "http://127.0.0.1:" not in line:
            sys.exit("loadtest: the server did not start: " + line + proc.stdout.read())
        port = int(line.rsplit(":", 1)[1].strip("/\n"))
        server_log = []   # drained: a full pipe would stall the server
        drain = threading.Thread(target=lambda: server_log.extend(proc.stdout), daemon=True)
        drain.start()
        model = moas.Model(args.model)
        # warm up (one request), then the idle RSS
        stream(port, {"prompt": TEXT[:10], "max_tokens": 4, "seed": 1})
        time.sleep(0.2)
        report = {"model": os.path.basename(args.model), "mode": args.mode,
                  "clients": args.clients, "requests_per_client": args.requests,
                  "pool_mb": args.pool_mb, "rss_idle_kb": rss_kb(proc.pid), "rounds": []}
        expected = {}
        hits = 0
        for _ in range(args.rounds):
            r = round_of_load(port, model, args, expected, text)
            deadline = time.time() + 10
            while time.time() < deadline:
                m = metrics(port)
                if (m["moas_sequences_active"] == 0 and m["moas_pool_bytes_held"]
                        <= m["moas_prompt_cache_bytes_held"]):
                    break
                time.sleep(0.05)
            # the prompt cache keeps finished requests' pages: with it cleared, any page
            # still held would be a sequence never closed
            r["prompt_cache_hits"] = m["moas_prompt_cache_hits_total"] - hits
            hits = m["moas_prompt_cache_hits_total"]
            cleared = get(port, "/v1/prompt_cache/clear", "POST")
            r["prompt_cache_cleared"] = '"prompt_cache.cleared"' in cleared
            m = metrics(port)
            r["pool_bytes_held_after"] = m["moas_pool_bytes_held"]
            r["rss_after_kb"] = rss_kb(proc.pid)
            report["rounds"].append(r)
        report["peak_pool_bytes_held"] = m["moas_pool_bytes_held_peak"]
        report["pool_bytes_capacity"] = m["moas_pool_bytes_capacity"]
        report["swapped_out"] = m["moas_swapped_out_total"]
        report["peak_sequences_active"] = m["moas_sequences_active_peak"]
    finally:
        proc.terminate()
        proc.wait(10)
    drain.join(10)
    report["server_errors_logged"] = sum(1 for line in server_log if "Traceback" in line)
    bad = report["server_errors_logged"] or any(
        r["lost"] or r["corrupted"] or r["other_errors"] or r["pool_bytes_held_after"]
        or not r["prompt_cache_cleared"] for r in report["rounds"])
    if args.json:
        print(json.dumps(report))
    else:
        print("loadtest: %s, %s mode, %d clients x %d requests, pool %.0f MB"
              % (report["model"], args.mode, args.clients, args.requests, args.pool_mb))
        print("| round | completed | cut | 503 | other 5xx/err | chars | lost | corrupted | "
              "TTFT p50/p99 ms | token p50/p99 ms | tokens/s | RSS after KB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(report["rounds"]):
            print("| %d | %d | %d | %d | %d | %d | %d | %d | %.1f / %.1f | %.2f / %.2f | %.0f | %d |"
                  % (i + 1, r["completed"], r["disconnected"], r["status_503"],
                     r["other_errors"], r["characters_streamed"], r["lost"], r["corrupted"],
                     r["ttft_p50_ms"], r["ttft_p99_ms"], r["token_p50_ms"],
                     r["token_p99_ms"], r["tokens_per_s"], r["rss_after_kb"]))
        print("RSS idle %d KB; peak pool bytes held %d of %d; most sequences at once %d; "
              "sequences swapped out %d"
              % (report["rss_idle_kb"], report["peak_pool_bytes_held"],
                 report["pool_bytes_capacity"], report["peak_sequences_active"],
                 report["swapped_out"]))
        for r in report["rounds"]:
            if r["errors_sample"]:
                print("errors:", r["errors_sample"])
        if report["server_errors_logged"]:
            print("server log (last lines):\n" + "".join(server_log[-30:]))
        print("loadtest: %s" % ("FAIL" if bad else "ok"))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
