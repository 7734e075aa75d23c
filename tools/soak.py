#!/usr/bin/env python3
"""soak.py - a production-like mix of traffic against one moas.server, for minutes.

    python3 tools/soak.py --duration 840 --json soak.json [-- MORE SERVER ARGS]

Starts python3 -m moas.server on a free 127.0.0.1 port (pooled-kjv-kvinit, routed,
a 1.5 MB pool, --max-queue 20, --queue-timeout 5, --body-timeout 2, so that the pool
fills, sequences swap, requests queue or get 503 and a stalled body gets 408), then for
--duration seconds (at most --max-requests requests) WORKERS clients send a random
mix: streamed and whole completions and chat completions, n > 1, stop strings,
logprobs, sampling filters,
echo (the prompt scored with logprobs, max_tokens 0 at times), lists of prompts,
cache_salts, conversations continuing an earlier answer (prompt cache hits), long
prompts, several requests on one kept-alive connection, streams cut after a few
characters, bodies cut half way, clients gone before reading or just after sending on
a kept-alive connection, stalled bodies, bad JSON and bad fields (400), a body too
large (413), unknown paths and methods; /metrics, /v1/pool and /health are polled.
Every --idle-every seconds the clients pause: once the server is idle its pool is
read, the prompt cache cleared, and every page must be free. RSS every --rss-every s.

With --context-shift the server runs pooled-rope-kjv-1k with -c 128 --context-shift,
and "shift" requests (prompts of 20-128 characters, max_tokens 100-300) go past the
context: their texts are checked against Model.generate(context_shift=True, n_ctx=128)
and moas_context_shifts_total against the shifts their answers imply.

At the end: moas_requests_total{status}, generated tokens and disconnects against
what the clients saw and told, a deterministic request before and after the storm,
a sample of the answers against Model.generate (same seed: equal text, a cut stream
a prefix), and, unless --no-shutdown, SIGTERM under load (every stream must end with
[DONE], every request be answered). Exit status 1 on any disagreement, an unexpected
status, a hang or a traceback in the server's log. Standard library only.
"""
import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
os.environ.setdefault("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
import moas  # noqa: E402
from moas.chat import ChatTemplate  # noqa: E402

TEMPLATE = ChatTemplate()

N_CTX = 128
SALTS = ["tenant-a", "tenant-b", "tenant-c", "tenant-d"]
STOPS = ["e ", "th", "\n", ", ", "and", "o", "LORD"]
DETERMINISTIC = {"prompt": "And God said, ", "max_tokens": 64, "temperature": 0.8,
                 "seed": 7}
BAD_JSON = [b"{", b"not json", b"[1, 2]", b'{"prompt": "a",}', b"\xff\xfe{}", b'"str"',
            b"null", b"[" * 60000]
BAD_FIELDS = [{"prompt": "x", "temprature": 1}, {"prompt": "x", "max_tokens": "5"},
              {"prompt": "x", "top_p": 0}, {"prompt": "x", "n": 0},
              {"prompt": "x", "logprobs": 6}, {"prompt": ""}, {},
              {"prompt": "x\u20ac"}, {"prompt": "x", "echo": 1}, {"prompt": []},
              {"prompt": "a" * 100, "max_tokens": 100}, {"prompt": "x", "cache_salt": ""},
              {"prompt": "x", "stream_options": {"include_usage": True}},
              {"prompt": "x", "logit_bias": {"05": 1, "5": 2}}, {"prompt": [1, "a"]},
              {"prompt": "x", "seed": -1}, {"prompt": "x", "max_tokens": 1000}]
# with --context-shift a prompt and max_tokens past the context are served: what is
# still refused is max_tokens above the cap (8 contexts) and a prompt above the context
SHIFT_BAD_FIELDS = [f for f in BAD_FIELDS if "max_tokens" not in f] + [
    {"prompt": "a" * 100, "max_tokens": 8 * N_CTX + 1}, {"prompt": "x", "max_tokens": 10**6},
    {"prompt": "a" * (N_CTX + 1), "max_tokens": 1}]
KINDS = [("stream", 18), ("whole", 12), ("fork_whole", 6), ("fork_stream", 4),
         ("stop", 8), ("logprobs", 8), ("long", 8), ("conversation", 6), ("cut_stream", 6),
         ("cut_body", 3), ("drop_before_read", 4), ("stall_body", 1), ("bad_json", 3),
         ("bad_field", 5), ("too_large", 1), ("not_found", 1), ("bad_method", 1),
         ("keepalive", 4), ("echo", 5), ("list", 5), ("chat", 8)]
SHIFT_KINDS = [("shift", 12)]   # added with --context-shift


def shifts(prompt_tokens, decodes):
    """Context shifts of a choice that decodes this many tokens after its prompt (the
    server's and Model.generate's: 4 kept, (N_CTX - 4) // 2 dropped at each)."""
    over = decodes - (N_CTX - prompt_tokens)
    return 0 if over <= 0 else -(-over // ((N_CTX - 4) // 2))


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def head(method, path, length, connection="Connection: close\r\n"):
    return ("%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n%s\r\n" % (method, path, length, connection)).encode()


async def read_head(reader):
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("closed before the status line")
    status = int(line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            return status, headers
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()


async def chunks(reader, headers):
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = await reader.readline()
            if not size:
                return
            n = int(size.strip() or b"0", 16)
            if n == 0:
                await reader.readline()   # the empty line that ends the body
                return
            data = await reader.readexactly(n)
            await reader.readline()
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def call(port, method, path, data=b"", *, cut_after=None, leave=None):
    """One HTTP exchange on a connection of its own: dict(status, body | texts ...).
    leave="body" sends half the body then closes; leave="read" sends it all and
    closes; leave="stall" sends half and waits for the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    try:
        if leave in ("body", "stall"):
            writer.write(head(method, path, len(data)) + data[:len(data) // 2])
            await writer.drain()
            if leave == "body":
                await asyncio.sleep(0.02)
                return {"status": None}
            return await answer(reader)
        if leave == "read":
            writer.write(head(method, path, len(data)) + data)
            await writer.drain()
            return {"status": None}
        return await exchange(reader, writer, method, path, data, cut_after=cut_after)
    finally:
        writer.close()


async def exchange(reader, writer, method, path, data=b"", *, cut_after=None, keep=False):
    writer.write(head(method, path, len(data),
                      "Connection: keep-alive\r\n" if keep else "Connection: close\r\n")
                 + data)
    await writer.drain()
    return await answer(reader, cut_after, keep)


async def answer(reader, cut_after=None, keep=False):
    """The answer: dict(status, body) or, streamed, dict(status, texts, reasons, done,
    error, usage, cut); with keep, read to the body's end (the connection goes on)."""
    status, headers = await read_head(reader)
    out = {"status": status}
    if "text/event-stream" not in headers.get("content-type", ""):
        body = b"".join([c async for c in chunks(reader, headers)])
        try:
            out["body"] = json.loads(body)
        except ValueError:
            out["body"] = body.decode(errors="replace")
        return out
    texts, reasons, buf = collections.defaultdict(str), {}, b""
    out.update(texts=texts, reasons=reasons, done=False, error=None, usage=None, cut=False)
    async for data in chunks(reader, headers):
        buf += data
        while b"\n\n" in buf and not out["done"]:
            block, buf = buf.split(b"\n\n", 1)
            payload = block[6:]
            if payload == b"[DONE]":
                out["done"] = True
                break
            ev = json.loads(payload)
            if "error" in ev:
                out["error"] = ev["error"]["code"]
                continue
            if ev.get("usage"):
                out["usage"] = ev["usage"]
            for c in ev["choices"]:
                texts[c["index"]] += c["text"] if "text" in c else \
                    c["delta"].get("content", "")
                if c["finish_reason"]:
                    reasons[c["index"]] = c["finish_reason"]
        if out["done"] and not keep:
            return out   # as an SSE client: [DONE] ends it
        if cut_after is not None and sum(map(len, texts.values())) >= cut_after:
            out["cut"] = True
            return out
    return out


class Soak:
    def __init__(self, args, proc, port):
        self.args, self.proc, self.port = args, proc, port
        self.rng = random.Random(args.seed)
        self.text = open(os.path.join(ROOT, "models", "kjv-heldout.txt")).read()
        self.seen = collections.Counter()        # (kind, status) the clients saw
        self.statuses = collections.Counter()    # status -> answers seen (all paths)
        self.unknown = 0                         # requests whose status nobody read
        self.tokens = 0                          # completion tokens the answers told
        self.tokens_unsure = 0                   # at most this many more (cut, left)
        self.prompt_read = 0                     # prompt - cached tokens of answers
        self.hits = self.cached = 0              # answers with cached tokens, and those
        self.convs = collections.deque(maxlen=32)
        self.checks = []                         # (body, texts, cut) for Model.generate
        self.shifts = 0                          # shifts the finished answers imply
        self.shifts_most = 0                     # at most this many, all requests sent
        self.n_sent = 0
        self.in_flight = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.stopping = False
        self.rss = []
        self.idle = []
        self.cache_entries_max = 0
        self.problems = []
        self.deterministic_texts = set()
        self.t0 = time.monotonic()

    def note(self, status, kind):
        self.seen[(kind, status)] += 1
        if status is None:
            self.unknown += 1
        else:
            self.statuses[status] += 1

    def chat_body(self):
        """A conversation of 1-4 messages cut from the held-out text (a system message
        at times), streamed or whole, n of 1-2, with the answer's room in the context."""
        rng = self.rng
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "Answer as the book."})
        for turn in range(rng.randint(1, 3)):
            role = "user" if turn % 2 == 0 else "assistant"
            plen = rng.randint(3, 20)
            start = rng.randrange(len(self.text) - plen)
            messages.append({"role": role, "content": self.text[start:start + plen]})
        if messages[-1]["role"] != "user":
            messages.append({"role": "user", "content": "And?"})
        room = N_CTX - len(TEMPLATE.render(messages))
        b = {"messages": messages, "seed": rng.randrange(2**31),
             "temperature": rng.choice([0, 0.5, 0.8, 1.0]), "n": rng.choice([1, 1, 2])}
        if rng.random() < 0.7:   # else the rest of the context, chat's default
            b["max_completion_tokens"] = rng.randint(1, max(1, min(64, room)))
        if rng.random() < 0.25:
            b["stop"] = rng.sample(STOPS, rng.randint(1, 2))
        if rng.random() < 0.2:
            b["logprobs"] = True
            b["top_logprobs"] = rng.randint(0, 5)
        if rng.random() < 0.5:   # usage counts the tokens: the template has stop strings
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        return b

    def body(self, kind):
        rng = self.rng
        if kind == "chat":
            return self.chat_body()
        if kind == "long":
            plen = rng.randint(80, 112)
        elif kind == "shift":
            plen = rng.randint(20, 100) if rng.random() < 0.9 else rng.randint(101, N_CTX)
        else:
            plen = rng.randint(4, 60)
        start = rng.randrange(len(self.text) - plen)
        prompt, salt = self.text[start:start + plen], None
        r = rng.random()
        if r < 0.5:
            salt = rng.choice(SALTS)
        elif r < 0.65:
            salt = "once-%d" % rng.randrange(10**9)
        if kind == "conversation" and self.convs:
            prev, salt = rng.choice(self.convs)
            more = rng.randint(3, 12)
            if len(prev) + more < 100:
                start = rng.randrange(len(self.text) - more)
                prompt = prev + self.text[start:start + more]
        room = N_CTX - len(prompt)   # 0 for a shift request's longest: set below
        b = {"prompt": prompt, "seed": rng.randrange(2**31),
             "temperature": rng.choice([0, 0.5, 0.8, 1.0]),
             "max_tokens": room if kind == "long" else rng.randint(0 if rng.random() < 0.03
                                                                   else 1, min(64, max(room, 1)))}
        if kind == "cut_stream":
            b["max_tokens"] = min(room, rng.randint(40, 64))
        if kind == "shift":   # past the context
            b["max_tokens"] = rng.randint(100, 300)
            b["n"] = rng.choice([1, 1, 2, 3])
            if rng.random() < 0.25:
                b["stop"] = rng.sample(STOPS, rng.randint(1, 2))
            if rng.random() < 0.1:
                b["echo"] = True
        if salt is not None:
            b["cache_salt"] = salt
        if rng.random() < 0.25:
            b["top_k"] = rng.choice([5, 20])
        if rng.random() < 0.15:
            b["top_p"] = 0.9
        if rng.random() < 0.1:
            b["min_p"] = 0.05
        if rng.random() < 0.15:
            b["repetition_penalty"] = 1.1
        if kind.startswith("fork"):
            b["n"] = rng.randint(2, 4)
        elif kind == "long":
            b["n"] = rng.choice([1, 1, 2, 3])
        if kind == "stop":
            b["stop"] = rng.sample(STOPS, rng.randint(1, 3))
        if kind == "logprobs" or rng.random() < 0.05:
            b["logprobs"] = rng.randint(0, 5)
        if kind == "echo":   # a text scored, with or without a continuation
            b["echo"] = True
            if rng.random() < 0.6:
                b["logprobs"] = rng.randint(0, 5)
            if rng.random() < 0.4:
                b["max_tokens"] = 0
            b["n"] = rng.choice([1, 1, 2])
        if kind == "list":   # 2-4 prompts in one request, each fitting with max_tokens
            more = []
            for _ in range(rng.randint(1, 3)):
                plen = rng.randint(4, 60)
                start = rng.randrange(len(self.text) - plen)
                more.append(self.text[start:start + plen])
            b["prompt"] = [prompt] + more
            b["max_tokens"] = min(b["max_tokens"], N_CTX - max(map(len, b["prompt"])))
            b["n"] = rng.choice([1, 1, 2])
            b["echo"] = rng.random() < 0.3
        stream = kind in ("stream", "fork_stream", "cut_stream") or (
            kind in ("stop", "logprobs", "long", "conversation", "drop_before_read", "echo",
                     "list", "shift")
            and rng.random() < 0.5)
        prompts = b["prompt"] if isinstance(b["prompt"], list) else [b["prompt"]]
        self.shifts_most += sum(shifts(len(p), b["max_tokens"]) for p in prompts) * b.get("n", 1)
        if stream:
            b["stream"] = True
            # usage is what counts the tokens of a stream with a stop string
            if "stop" in b or rng.random() < 0.6:
                b["stream_options"] = {"include_usage": True}
        return b

    async def one(self, kind):
        rng = self.rng
        post = lambda data, **kw: call(self.port, "POST", "/v1/completions", data, **kw)  # noqa
        if kind == "bad_json":
            r = await post(rng.choice(BAD_JSON))
            return r, 400
        if kind == "bad_field":
            r = await post(json.dumps(rng.choice(
                SHIFT_BAD_FIELDS if self.args.context_shift else BAD_FIELDS)).encode())
            return r, 400
        if kind == "too_large":
            r = await post(json.dumps({"prompt": "a" * (self.args.max_body + 10)}).encode())
            return r, 413
        if kind == "not_found":
            return await call(self.port, "POST", "/v1/embeddings", b"{}"), 404
        if kind == "bad_method":
            return await call(self.port, "GET", "/v1/completions"), 405
        if kind == "keepalive":   # a client's connection pool: requests in turn on one
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                out = []
                for _ in range(rng.randint(2, 4)):
                    sub = rng.choice(["whole", "stream", "poll"])
                    if sub == "poll":
                        r = await exchange(reader, writer, "GET", "/v1/pool", keep=True)
                    else:
                        body = self.body(sub)
                        r = await exchange(reader, writer, "POST", "/v1/completions",
                                           json.dumps(body).encode(), keep=True)
                        r["req"] = body
                    out.append(r)
                if self.rng.random() < 0.3:   # one more request, and gone without it
                    body = self.body("whole")
                    writer.write(head("POST", "/v1/completions", len(json.dumps(body)),
                                      "Connection: keep-alive\r\n")
                                 + json.dumps(body).encode())
                    await writer.drain()
                    self.tokens_unsure += body["max_tokens"]
                    self.seen[("keepalive left", None)] += 1
                    self.unknown += 1
                return out, 200
            finally:
                writer.close()
        body = self.body(kind)
        data = json.dumps(body).encode()
        if kind == "cut_body":
            return await post(data, leave="body"), None
        if kind == "stall_body":
            return await post(data, leave="stall"), 408
        if kind == "drop_before_read":
            self.tokens_unsure += body["max_tokens"] * body.get("n", 1)
            return await post(data, leave="read"), None
        if kind == "chat":
            r = await call(self.port, "POST", "/v1/chat/completions", data)
            r["req"] = body
            return r, 200
        cut = rng.randint(1, 5) if kind == "cut_stream" else None
        r = await post(data, cut_after=cut)
        r["req"] = body
        return r, 200

    def account(self, kind, r, want):
        status = r["status"]
        self.note(status, kind)
        body = r.get("body")
        code = body["error"]["code"] if isinstance(body, dict) and "error" in body else None
        if code and status != want:
            self.seen[(kind, "%s %s" % (status, code))] += 1
        # a full server's 503, and a 400 for a request larger than the whole pool
        # (n choices of a long prompt in a small one), are answers too
        if want is not None and status != want and not (want == 200 and (
                status == 503 or code == "request_too_large")):
            self.problems.append("%s: %s, wanted %s: %s" % (kind, status, want,
                                                          str(body)[:200]))
        if status != 200 or "req" not in r:
            return
        body = r["req"]
        n = body.get("n", 1)
        chat = "messages" in body
        # a list's prompt k has choices k n .. k n + n - 1; echo begins each with its prompt
        prompts = ([TEMPLATE.render(body["messages"])] if chat else body["prompt"]
                   if isinstance(body["prompt"], list) else [body["prompt"]])
        n_choices = n * len(prompts)

        def unechoed(texts):
            if not body.get("echo"):
                return texts
            out = []
            for c, text in enumerate(texts):
                prompt = prompts[c // n]
                cut_short = r.get("cut") and prompt.startswith(text)
                if not text.startswith(prompt) and not cut_short:
                    self.problems.append("%s: choice %d does not begin with its prompt: %r"
                                         % (kind, c, text[:80]))
                out.append(text[len(prompt):])
            return out

        def check(texts, cut):
            for k, prompt in enumerate(prompts):
                self.checks.append((body if chat else dict(body, prompt=prompt),
                                    texts[k * n:(k + 1) * n], cut))
                # a choice of G characters decoded at least its first G - 1 (a stop
                # string's held back or cut text only adds to them)
                if not cut:
                    self.shifts += sum(shifts(len(prompt), len(t) - 1)
                                       for t in texts[k * n:(k + 1) * n])

        if "texts" in r:   # a stream
            texts = unechoed([r["texts"].get(i, "") for i in range(n_choices)])
            if r["cut"]:
                check(texts, True)
                self.tokens_unsure += body["max_tokens"] * n_choices
                return
            if not r["done"] or r["error"]:
                self.problems.append("%s: stream ended %s, error %s" % (
                    kind, "with [DONE]" if r["done"] else "without [DONE]", r["error"]))
                return
            usage = r["usage"]
            if usage is None:
                if "stop" in body or chat:
                    self.problems.append("%s: no usage" % kind)
                self.tokens += sum(map(len, texts))
            else:
                # a stop string's characters were generated, not sent (chat's template
                # has stop strings of its own)
                if "stop" not in body and not chat and \
                        usage["completion_tokens"] != sum(map(len, texts)):
                    self.problems.append("%s: usage %r for %d characters" % (
                        kind, usage, sum(map(len, texts))))
                self.tokens += usage["completion_tokens"]
                self.prompt_read += (usage["prompt_tokens"]
                                     - usage["prompt_tokens_details"]["cached_tokens"])
                self.cached += usage["prompt_tokens_details"]["cached_tokens"]
                self.hits += usage["prompt_tokens_details"]["cached_tokens"] > 0
        else:
            choices = sorted(r["body"]["choices"], key=lambda c: c["index"])
            if [c["index"] for c in choices] != list(range(n_choices)):
                self.problems.append("%s: choices %r for %d" % (
                    kind, [c["index"] for c in choices], n_choices))
            texts = unechoed([c["message"]["content"] if chat else c["text"]
                              for c in choices])
            usage = r["body"]["usage"]
            self.tokens += usage["completion_tokens"]
            self.prompt_read += (usage["prompt_tokens"]
                                 - usage["prompt_tokens_details"]["cached_tokens"])
            self.cached += usage["prompt_tokens_details"]["cached_tokens"]
            self.hits += usage["prompt_tokens_details"]["cached_tokens"] > 0
        check(texts, False)
        if n_choices == 1 and "stop" not in body and kind not in ("shift", "chat"):
            self.convs.append((prompts[0] + texts[0], body.get("cache_salt")))

    async def worker(self):
        kinds, weights = zip(*[(k, w) for k, w in KINDS + (SHIFT_KINDS if
                                                          self.args.context_shift else [])
                               if not self.args.kinds or k in self.args.kinds.split(",")])
        while not self.stopping:
            await self.gate.wait()
            if self.stopping or self.n_sent >= self.args.max_requests:
                return
            kind = self.rng.choices(kinds, weights)[0]
            self.n_sent += 1
            self.in_flight += 1
            try:
                r, want = await asyncio.wait_for(self.one(kind), 120)
                for r in r if isinstance(r, list) else [r]:
                    self.account(kind, r, want)
            except asyncio.TimeoutError:
                self.note("timeout", kind)
                self.problems.append("%s: no answer within 120 s" % kind)
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                # the server may close on a 413 before reading the rest
                self.note("reset" if kind != "too_large" else None, kind)
                if kind != "too_large":
                    self.problems.append("%s: %r" % (kind, e))
            finally:
                self.in_flight -= 1

    async def get_json(self, path, method="GET"):
        r = await asyncio.wait_for(call(self.port, method, path), 60)
        self.note(r["status"], "poll " + path)
        return r["body"]

    async def metrics(self):
        r = await asyncio.wait_for(call(self.port, "GET", "/metrics"), 60)
        self.note(r["status"], "poll /metrics")
        out = {}
        for line in r["body"].splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    async def poller(self, path, every):
        while not self.stopping:
            if path == "/metrics":
                await self.metrics()
            elif path == "/v1/prompt_cache/clear":   # an operator's, under load
                if await self.nap(every):
                    await self.get_json(path, "POST")
            else:
                body = await self.get_json(path)
                if path == "/v1/pool":
                    self.cache_entries_max = max(self.cache_entries_max,
                                                 body["prompt_cache_entries"])
            await self.nap(every)

    async def nap(self, seconds):
        """Sleep, unless the storm ends first: whether it goes on."""
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))
        return not self.stopping

    async def rss_sampler(self):
        while not self.stopping:
            self.rss.append((round(time.monotonic() - self.t0), rss_kb(self.proc.pid)))
            await self.nap(self.args.rss_every)

    async def settle(self):
        """Wait for the clients to finish and the server to go idle: (pool before and
        after the prompt cache is cleared, evicted)."""
        deadline = time.monotonic() + 60
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        while time.monotonic() < deadline:
            pool = await self.get_json("/v1/pool")
            if not (pool["sequences_active"] or pool["sequences_swapped"]
                    or pool["requests_queued"]):
                break
            await asyncio.sleep(0.1)
        else:
            self.problems.append("the server did not go idle: %r" % pool)
        cleared = await self.get_json("/v1/prompt_cache/clear", "POST")
        after = await self.get_json("/v1/pool")
        if after["pages_free"] != after["pages"] or after["bytes_held"]:
            self.problems.append("pages held once idle with the cache cleared: %r" % after)
        if pool["bytes_held"] > pool["prompt_cache_bytes_held"]:
            self.problems.append("idle pages beyond the prompt cache's: %r" % pool)
        return pool, after, cleared["evicted"]

    async def idle_point(self, label):
        self.gate.clear()
        before, after, evicted = await self.settle()
        self.idle.append({"label": label, "t": round(time.monotonic() - self.t0),
                          "rss_kb": rss_kb(self.proc.pid),
                          "pages": before["pages"], "pages_free_before": before["pages_free"],
                          "cache_entries": before["prompt_cache_entries"],
                          "cache_tokens": before["prompt_cache_entry_tokens"],
                          "cache_bytes_held": before["prompt_cache_bytes_held"],
                          "evicted": evicted, "pages_free_after": after["pages_free"]})
        self.gate.set()

    async def deterministic(self):
        t = time.monotonic()
        r = await call(self.port, "POST", "/v1/completions",
                       json.dumps(DETERMINISTIC).encode())
        ms = 1000 * (time.monotonic() - t)
        self.note(r["status"], "deterministic")
        s = await call(self.port, "POST", "/v1/completions",
                       json.dumps(dict(DETERMINISTIC, stream=True)).encode())
        self.note(s["status"], "deterministic")
        self.tokens += 2 * DETERMINISTIC["max_tokens"]
        self.deterministic_texts |= {r["body"]["choices"][0]["text"], s["texts"][0]}
        return r["body"]["choices"][0]["text"], s["texts"][0], round(ms, 1)


async def storm(soak, args):
    report = {}
    report["deterministic_before"] = await soak.deterministic()
    await soak.idle_point("start")
    soak.t0 = time.monotonic()
    tasks = [asyncio.ensure_future(soak.worker()) for _ in range(args.workers)]
    pollers = [asyncio.ensure_future(soak.poller(p, e)) for p, e in
               (("/metrics", 1.0), ("/v1/pool", 0.5), ("/health", 2.0),
                ("/v1/prompt_cache/clear", 10.0))]
    pollers.append(asyncio.ensure_future(soak.rss_sampler()))
    end = soak.t0 + args.duration
    next_idle = soak.t0 + args.idle_every
    while time.monotonic() < end and soak.n_sent < args.max_requests:
        await asyncio.sleep(0.5)
        if time.monotonic() >= next_idle:
            await soak.idle_point("during")
            next_idle = time.monotonic() + args.idle_every
    soak.stopping = True
    soak.gate.set()
    await asyncio.gather(*tasks)
    await asyncio.gather(*pollers)
    report["duration_s"] = round(time.monotonic() - soak.t0)
    soak.stopping = False
    soak.gate.set()
    await soak.idle_point("end")
    soak.rss.append((round(time.monotonic() - soak.t0), rss_kb(soak.proc.pid)))
    m = await soak.metrics()   # not counted by itself: the last poll before it is
    server = {int(k.split('"')[1]): int(v) for k, v in m.items()
              if k.startswith("moas_requests_total")}
    client = dict(soak.statuses)
    client[200] -= 1   # this /metrics call
    known = {s: n for s, n in client.items() if s not in (200, 499, 503)}
    server_known = {s: n for s, n in server.items() if s not in (200, 499, 503)}
    report["statuses_server"] = server
    report["statuses_client"] = client
    report["statuses_unread_by_client"] = soak.unknown
    # a client that left before reading may have been answered 200, 499 or 503
    unsure = (200, 499, 503)
    # and one that left a kept-alive connection just after sending a request may not
    # have reached the server's code at all (aiohttp drops it: docs/SERVING.md)
    answered = sum(server.get(s, 0) for s in unsure)
    asked = sum(client.get(s, 0) for s in unsure) + soak.unknown
    ok = (known == server_known
          and asked - soak.seen[("keepalive left", None)] <= answered <= asked
          and server.get(503, 0) >= client.get(503, 0)
          and server.get(499, 0) >= soak.seen[("cut_body", None)])
    if not ok:
        soak.problems.append("moas_requests_total %r disagrees with the clients' %r "
                             "(+%d unread)" % (server, client, soak.unknown))
    report["tokens"] = {"server_generated": int(m["moas_generated_tokens_total"]),
                        "clients_told": soak.tokens,
                        "clients_unsure_at_most": soak.tokens_unsure,
                        "server_prompt_read": int(m["moas_prompt_tokens_total"]),
                        "clients_prompt_read": soak.prompt_read}
    if not soak.tokens <= m["moas_generated_tokens_total"] <= soak.tokens + soak.tokens_unsure:
        soak.problems.append("generated tokens disagree with the clients': %r"
                             % report["tokens"])
    report["disconnects"] = int(m["moas_client_disconnects_total"])
    left = sum(soak.seen[(k, None)] for k in ("cut_body", "drop_before_read",
                                                "keepalive left"))
    left_at_most = left + soak.seen[("cut_stream", 200)]
    report["clients_that_left"] = [left, left_at_most]
    if not soak.seen[("cut_body", None)] <= report["disconnects"] <= left_at_most:
        soak.problems.append("%d disconnects counted, %d to %d clients left" % (
            report["disconnects"], left, left_at_most))
    for name in ("swapped_out", "resumed", "forks", "prompt_cache_hits",
                 "prompt_cache_evictions", "decode_steps", "context_shifts"):
        report[name] = int(m["moas_%s_total" % name])
    # shifts: at least those the finished answers imply, at most those of every request
    # sent decoding all its max_tokens (cut, abandoned and stopped ones fewer)
    report["context_shifts_told"] = [soak.shifts, soak.shifts_most]
    if not soak.shifts <= report["context_shifts"] <= soak.shifts_most:
        soak.problems.append("%d context shifts counted, the clients' answers imply %d "
                             "to %d" % (report["context_shifts"], soak.shifts,
                                        soak.shifts_most))
    # every answer that says cached_tokens was a hit; cancelled requests hit too
    report["prompt_cache_hits_told"] = [soak.hits, soak.cached]
    if not (soak.hits <= report["prompt_cache_hits"] and soak.cached
            <= m["moas_prompt_cache_reused_tokens_total"]):
        soak.problems.append("prompt cache hits %r beyond the server's %r" % (
            [soak.hits, soak.cached], [report["prompt_cache_hits"],
                                       m["moas_prompt_cache_reused_tokens_total"]]))
    report["sequences_active_peak"] = int(m["moas_sequences_active_peak"])
    report["pool_bytes_held_peak"] = int(m["moas_pool_bytes_held_peak"])
    report["prompt_cache_entries_max"] = soak.cache_entries_max
    if soak.cache_entries_max > args.prompt_cache:
        soak.problems.append("the prompt cache held %d entries, above --prompt-cache %d"
                             % (soak.cache_entries_max, args.prompt_cache))
    t = time.monotonic()
    report["deterministic_after"] = await soak.deterministic()
    report["fresh_request_ms"] = round(1000 * (time.monotonic() - t), 1)
    if report["deterministic_after"][:2] != report["deterministic_before"][:2]:
        soak.problems.append("the deterministic request changed: %r" % (
            report["deterministic_after"],))
    return report


async def shutdown_under_load(soak, args):
    """SIGTERM while WORKERS streams and whole requests are open."""
    results = []

    async def client(i):
        body = {"prompt": soak.text[i * 7:i * 7 + 40], "max_tokens": 88, "seed": i,
                "stream": i % 3 != 0, "n": 1 + i % 2}
        try:
            results.append(await asyncio.wait_for(call(
                soak.port, "POST", "/v1/completions", json.dumps(body).encode()), 60))
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            results.append({"status": repr(e)})
        except asyncio.TimeoutError:
            results.append({"status": "timeout"})
    tasks = [asyncio.ensure_future(client(i)) for i in range(args.workers * 2)]
    await asyncio.sleep(0.3)
    pool = await soak.get_json("/v1/pool")
    t = time.monotonic()
    soak.proc.send_signal(signal.SIGTERM)
    while soak.proc.poll() is None and time.monotonic() - t < 30:
        await asyncio.sleep(0.02)
    exit_s = time.monotonic() - t
    await asyncio.gather(*tasks)
    kinds = collections.Counter()
    for r in results:
        if "texts" in r:
            kinds["stream " + ("[DONE] after shutting_down" if r["done"] and r["error"] ==
                               "shutting_down" else "[DONE]" if r["done"] and not r["error"]
                               else "ended without [DONE]")] += 1
        elif isinstance(r.get("body"), dict) and "error" in r["body"]:
            kinds["%s %s" % (r["status"], r["body"]["error"]["code"])] += 1
        else:
            kinds[str(r["status"])] += 1
    out = {"active_at_sigterm": pool["sequences_active"],
           "queued_at_sigterm": pool["requests_queued"], "exit_s": round(exit_s, 2),
           "exit_code": soak.proc.poll(), "answers": dict(kinds)}
    if soak.proc.poll() != 0 or exit_s > 10:
        soak.problems.append("shutdown: %r" % out)
    if any("without" in k or "timeout" in k for k in kinds):
        soak.problems.append("shutdown left requests unanswered: %r" % out)
    return out


def past_the_context(body):
    """Whether a request asked for more than the context holds (a chat's answer never
    does: its limit is at most the rest of the context)."""
    return "prompt" in body and len(body["prompt"]) + body["max_tokens"] > N_CTX


def verify(soak, args, model):
    """Answers against Model.generate (same seed and sampling): a sample of them."""
    rng = random.Random(args.seed + 1)
    shift = dict(n_ctx=N_CTX, context_shift=True) if args.context_shift else {}
    if shift:   # half of them past the context: they are fewer, and what is new
        past = [c for c in soak.checks if past_the_context(c[0])]
        rest = [c for c in soak.checks if not past_the_context(c[0])]
        sample = rng.sample(past, min(args.verify // 2, len(past)))
        sample += rng.sample(rest, min(args.verify - len(sample), len(rest)))
    else:
        sample = rng.sample(soak.checks, min(args.verify, len(soak.checks)))
    bad = 0
    for body, texts, cut in sample:
        kw = {k: body[k] for k in ("temperature", "top_k", "top_p", "min_p") if k in body}
        if "repetition_penalty" in body:
            kw["repeat_penalty"] = body["repetition_penalty"]
        for i, text in enumerate(texts):
            if "messages" in body:
                want = model.chat(body["messages"], body.get("max_completion_tokens"),
                                  seed=body["seed"] + i, stop=body.get("stop", ()),
                                  mode=args.mode, **kw, **shift)
            else:
                want = model.generate(body["prompt"], body["max_tokens"],
                                      seed=body["seed"] + i, stop=body.get("stop", ()),
                                      mode=args.mode, **kw, **shift)
            if (not want.startswith(text)) if cut else text != want:
                bad += 1
                soak.problems.append("text differs from Model.generate: %r %r != %r"
                                     % (body, text, want))
    want = model.generate(DETERMINISTIC["prompt"], DETERMINISTIC["max_tokens"],
                          seed=DETERMINISTIC["seed"],
                          temperature=DETERMINISTIC["temperature"], mode=args.mode, **shift)
    if soak.deterministic_texts != {want}:
        bad += 1
        soak.problems.append("the deterministic request: %r, Model.generate %r"
                             % (soak.deterministic_texts, want))
    return {"checked": len(sample), "differ": bad,
            "past_the_context": sum(past_the_context(b) for b, _, _ in sample),
            "chat": sum("messages" in b for b, _, _ in sample)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="(pooled-kjv-kvinit, pooled-rope-kjv-1k with "
                    "--context-shift)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    ap.add_argument("--max-requests", type=int, default=100000, help="at most (100000)")
    ap.add_argument("--workers", type=int, default=28, help="concurrent clients (28)")
    ap.add_argument("--idle-every", type=float, default=120.0,
                    help="seconds between idle checkpoints (120)")
    ap.add_argument("--rss-every", type=float, default=15.0, help="RSS sample period (15)")
    ap.add_argument("--mode", choices=("routed", "mixture"), default="routed")
    ap.add_argument("--pool-mb", type=float,
                    help="(1.5; 2.5 with --context-shift, where n = 3 past the context is "
                    "3 contexts)")
    ap.add_argument("--prompt-cache", type=int, default=8)
    ap.add_argument("--max-body", type=int, default=65536)
    ap.add_argument("--verify", type=int, default=400, help="answers checked (400)")
    ap.add_argument("--no-shutdown", action="store_true", help="plain SIGTERM when idle")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kinds", help="only these kinds of request (comma-separated)")
    ap.add_argument("--context-shift", action="store_true",
                    help="a RoPE model, -c %d --context-shift, requests past the context"
                    % N_CTX)
    ap.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "moas-soak-server.log"),
                    help="the server's output (default: moas-soak-server.log in the "
                    "temporary directory, not the working one)")
    ap.add_argument("--json", help="write the report here too")
    ap.add_argument("server_args", nargs="*", help="after --: more moas.server arguments")
    args = ap.parse_args()
    if args.model is None:
        args.model = os.path.join(ROOT, "models", "pooled-rope-kjv-1k.gguf"
                                  if args.context_shift else "pooled-kjv-kvinit.gguf")
    shift_args = ["-c", str(N_CTX), "--context-shift"] if args.context_shift else []
    if args.pool_mb is None:
        args.pool_mb = 2.5 if args.context_shift else 1.5
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bindings", "python"))
    log = open(args.log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moas.server", "-m", args.model, "--port", "0", "--mode",
         args.mode, "--pool-mb", str(args.pool_mb), "--max-queue", "20", "--queue-timeout",
         "5", "--body-timeout", "2", "--max-body-bytes", str(args.max_body),
         "--prompt-cache", str(args.prompt_cache)] + shift_args + args.server_args,
        env=env, stdout=subprocess.PIPE, stderr=log, universal_newlines=True)
    line = proc.stdout.readline()
    if "http://127.0.0.1:" not in line:
        proc.kill()
        sys.exit("soak: the server did not start: %s (see %s)" % (line, args.log))
    port = int(line.rsplit(":", 1)[1].strip("/\n"))
    printed = []   # drained: a full pipe would stall the server
    drain = threading.Thread(target=lambda: printed.extend(proc.stdout), daemon=True)
    drain.start()
    soak = None
    try:
        async def run():
            nonlocal soak
            soak = Soak(args, proc, port)
            await asyncio.sleep(0.5)
            soak.rss.append((0, rss_kb(proc.pid)))
            report = await storm(soak, args)
            if not args.no_shutdown:
                report["shutdown"] = await shutdown_under_load(soak, args)
            return report
        report = asyncio.run(run())
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        log.close()
    with moas.Model(args.model) as model:
        report["verified"] = verify(soak, args, model)
    drain.join(10)
    with open(args.log) as f:
        logged = f.read() + "".join(printed)
    report["server_log_tracebacks"] = logged.count("Traceback")
    if report["server_log_tracebacks"] or "ERROR" in logged:
        soak.problems.append("the server logged errors (%s)" % args.log)
    report["requests_by_kind"] = collections.defaultdict(dict)
    for (kind, status), n in sorted(soak.seen.items(), key=str):
        report["requests_by_kind"][kind][str(status)] = n
    report["rss_kb"] = soak.rss
    report["idle_points"] = soak.idle
    report["problems"] = soak.problems[:50]
    report["problem_count"] = len(soak.problems)
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    print("soak: %s" % ("FAIL" if soak.problems else "ok"))
    sys.exit(1 if soak.problems else 0)


if __name__ == "__main__":
    main()
