"""moas.server - an OpenAI-compatible completions and chat server for libmoas
(docs/SERVING.md).

    python3 -m moas.server -m MODEL [--host 127.0.0.1] [--port 8080] [--pool-mb N]
                           [--mode routed|mixture] [--max-sequences N] [--api-key KEY]

Endpoints: POST /v1/completions (OpenAI's completions shape, plus `routes`), POST
/v1/chat/completions (the conversation written by ChatTemplate, then completed), GET
/v1/models, GET /health, GET /metrics (Prometheus text), GET /v1/pool (the pool's
occupancy as JSON, for the page), GET / (the routing view). Needs aiohttp (Debian:
python3-aiohttp); the rest of the package does not. One engine thread batches every
sequence (moas.engine); this module only parses, validates and streams.
"""

import argparse
import asyncio
import base64
import bisect
import collections
import faulthandler
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import struct
import sys
import time

try:
    from aiohttp import web
    from aiohttp.http_exceptions import HttpProcessingError
    from aiohttp.web_protocol import RequestPayloadError
    from aiohttp.abc import AbstractAccessLogger
    # what a client's bytes cause: unparsable HTTP, a body its encoding cannot undo
    CLIENT_ERRORS = (HttpProcessingError, RequestPayloadError)
except ImportError:   # pragma: no cover - said once, clearly, by main()
    web = None
    AbstractAccessLogger = object

from . import Model, MoasError, Sampler, Status, version_string
from .chat import (ChatMessageError, ChatTemplate, check_contents,
                   conversation as chat_conversation, short_name)
from .engine import Engine, Event, Request

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _settle(fut):
    if not fut.done():
        fut.set_result(None)


class EventQueue:
    """The (prompt index, event) pairs of one HTTP request, put by _dispatch on the
    event loop, taken by its handler, which waits for the next with wait(timeout). An
    asyncio.Queue's get() under asyncio.wait_for made a task and a timer for each event
    of each stream at every step: a future and a timer are enough."""

    def __init__(self, loop):
        self._items = collections.deque()
        self._loop = loop
        self._waiter = None

    def qsize(self):
        return len(self._items)

    def empty(self):
        return not self._items

    def put_nowait(self, item):
        self._items.append(item)
        if self._waiter is not None:
            _settle(self._waiter)

    def get_nowait(self):
        return self._items.popleft()

    async def wait(self, timeout):
        """Until an item is there, or timeout seconds have passed."""
        if self._items:
            return
        self._waiter = self._loop.create_future()
        timer = self._loop.call_later(timeout, _settle, self._waiter)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None


class Histogram:
    """A Prometheus histogram of seconds: how many observations fell at or below each
    bound, their sum and count. Observed and read on the event loop only."""

    def __init__(self, bounds):
        self.bounds = list(bounds)
        self.counts = [0] * len(self.bounds)   # per bound, not yet cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, seconds):
        i = bisect.bisect_left(self.bounds, seconds)   # the first bound >= seconds
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += seconds
        self.count += 1

    def lines(self, name):
        out, cumulative = [], 0
        for bound, n in zip(self.bounds, self.counts):
            cumulative += n
            out.append('%s_bucket{le="%s"} %d' % (name, bound, cumulative))
        out.append('%s_bucket{le="+Inf"} %d' % (name, self.count))
        out.append("%s_sum %.6f" % (name, self.sum))
        out.append("%s_count %d" % (name, self.count))
        return out


# the bounds of vLLM's histograms of the same names, so that its dashboards read ours
TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0)
LATENCY_BOUNDS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                  50.0, 60.0)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status, message, param=None, code=None, headers=None, close=False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.close = close   # the connection too (the rest of a body is not waited for)


def error_kind(status):
    """OpenAI's error type for an HTTP status."""
    if status == 401:
        return "authentication_error"
    return ("invalid_request_error" if status < 500 else
            "server_error" if status != 503 else "overloaded_error")


def error_response(status, message, param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": error_kind(status), "param": param,
                      "code": code}}
    return web.json_response(body, status=status, headers=headers)


def scheme_names(model):
    names = []
    for n_kv in model.schemes:
        names.append("MHA" if n_kv == model.n_head else "MQA" if n_kv == 1 else
                     "GQA-%d" % n_kv)
    return names


# ---- request validation ---------------------------------------------------------------

# OpenAI fields this server accepts only at their neutral value (of the same JSON type:
# false is not 0) or null, the default as for every field; `user` is any string.
NEUTRAL = {"best_of": (1,), "suffix": ("",), "user": None}
PROMPT_CHARS_PER_TOKEN_LIMIT = 8   # a prompt beyond 8x the token limit is not tokenized
REPEAT_PENALTY_RANGE = (0.01, 100.0)   # beyond it a logit divided by it can overflow
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p",
         "repetition_penalty", "repeat_penalty", "repeat_last_n", "stop", "seed", "n",
         "stream", "stream_options", "routes", "logit_bias", "unknown_chars",
         "logprobs", "cache_salt", "frequency_penalty", "presence_penalty",
         "echo", "truncate_prompt_tokens", "min_tokens",
         "include_stop_str_in_output"} | set(NEUTRAL)
CACHE_SALT_MAX_CHARS = 256
UNKNOWN_HINT = " (send \"unknown_chars\": \"replace\" or \"drop\")"
TOKENIZE_FIELDS = {"model", "prompt", "unknown_chars", "return_token_strs",
                   "add_special_tokens"}
DETOKENIZE_FIELDS = {"model", "tokens"}


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:   # an integer too large for a float
        return False


def _f32(v):
    """v as the library's float32 sees it (v at most 3.4e38)."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _is_neutral(v, allowed):
    return any(v == a and type(v) is type(a) for a in allowed)


def _bad_text(s):
    """Why a string cannot be a prompt or stop string, or None: a lone surrogate (from
    a \\udXXX escape) is no character and has no UTF-8; NUL would end a C string."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        return "a lone surrogate (U+%04X) at character %d" % (ord(s[e.start]), e.start)
    if "\0" in s:
        return "NUL at character %d" % s.index("\0")
    return None


def _get(body, name, check, what, default):
    if name not in body or body[name] is None:
        return default
    v = body[name]
    if not check(v):
        raise ApiError(400, "'%s' must be %s, got %s" % (name, what, json.dumps(v)[:80]),
                       param=name, code="invalid_type")
    return v


def _check_fields(body, known, neutral=()):
    """ApiError(400) unless body is a JSON object of the fields `known`, those of
    `neutral` (name -> allowed values, or None for any) at an allowed value or null."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_type")
    for name in body:
        if name not in known:
            raise ApiError(400, "unrecognized request argument supplied: %s" % short_name(name),
                           param=short_name(name), code="unknown_field")
    for name, allowed in dict(neutral).items():
        if allowed is not None and body.get(name) is not None and \
                not _is_neutral(body[name], allowed):
            raise ApiError(400, "'%s' is not supported by this server (only %s)"
                           % (name, " or ".join(json.dumps(a) for a in allowed)),
                           param=name, code="unsupported")


def parse_completion(body, cfg):
    """Check a completions body against the server's limits: a dict of the request's
    parameters, or ApiError(400)."""
    _check_fields(body, KNOWN, NEUTRAL)
    _get(body, "model", lambda v: isinstance(v, str), "a string", None)
    _get(body, "user", lambda v: isinstance(v, str), "a string", None)
    if body.get("prompt") is None:   # null is absence, as for every field
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
    prompts = body["prompt"]
    # OpenAI's four shapes: a string, a list of strings, a list of token ids (one
    # prompt), a list of such lists; a prompt of ids is read as given (vLLM's, and
    # lm-evaluation-harness's tokenized requests)
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                    and all(_is_int(t) for t in prompts)):
        prompts = [prompts]
    if not (isinstance(prompts, list) and (
            all(isinstance(t, str) for t in prompts) or
            all(isinstance(t, list) and all(_is_int(i) for i in t) for t in prompts))):
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token "
                       "ids or a list of lists of them", param="prompt", code="invalid_type")
    if not prompts:   # as an empty string is
        raise ApiError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
    # vLLM's: keep only a prompt's last k tokens (-1: as many as the context holds), so
    # that a client may send a text longer than the context
    truncate = _get(body, "truncate_prompt_tokens", lambda v: _is_int(v) and (
        v == -1 or 1 <= v <= cfg["max_prompt_chars"]), "-1 or an integer in [1, %d]"
        % cfg["max_prompt_chars"], None)
    if len(prompts) > cfg["max_prompts"]:
        raise ApiError(400, "'prompt' is a list of %d prompts, this server takes at most %d"
                       % (len(prompts), cfg["max_prompts"]), param="prompt",
                       code="invalid_value")
    for k, prompt in enumerate(prompts):
        which = "'prompt'" if len(prompts) == 1 else "'prompt' %d" % k
        if not prompt:
            raise ApiError(400, "%s is empty" % which, param="prompt", code="invalid_value")
        if isinstance(prompt, list):   # token ids: checked against the model's vocabulary
            continue
        bad = _bad_text(prompt)
        if bad is not None and "NUL" not in bad:   # NUL is a character, maybe unknown
            raise ApiError(400, "%s has %s" % (which, bad), param="prompt",
                           code="invalid_value")
        # The limit is on the prompt's tokens (completions() counts them), as characters
        # that unknown_chars "drop" leaves out take no room; this only spares tokenizing
        # a prompt far beyond it (one to be truncated may be as long as the body).
        if (truncate is None and
                len(prompt) > PROMPT_CHARS_PER_TOKEN_LIMIT * cfg["max_prompt_chars"]):
            raise ApiError(400, "%s is %d characters, this server takes at most %d tokens"
                           % ("the prompt" if len(prompts) == 1 else which, len(prompt),
                              cfg["max_prompt_chars"]), param="prompt",
                           code="prompt_too_long")
    out = {"prompts": prompts,
           "truncate": cfg["max_prompt_chars"] if truncate == -1 else truncate}
    # OpenAI's default of 16, but never above the cap, which would refuse it (a prompt
    # and 16 beyond the context are still refused, as vLLM refuses them)
    out["max_tokens"] = _get(body, "max_tokens", lambda v: _is_int(v) and v >= 0,
                             "an integer >= 0", min(16, cfg["max_tokens_cap"]))
    if out["max_tokens"] > cfg["max_tokens_cap"]:
        raise ApiError(400, "'max_tokens' is %s, this server allows at most %d"
                       % (json.dumps(out["max_tokens"])[:80], cfg["max_tokens_cap"]),
                       param="max_tokens",
                       code="max_tokens_too_large")
    out["temperature"] = _get(body, "temperature", lambda v: _is_num(v) and 0 <= v <= 100,
                              "a number in [0, 100]", 1.0)
    out["top_p"] = _get(body, "top_p", lambda v: _is_num(v) and 0 < v <= 1 and _f32(v) > 0,
                        "a number in (0, 1] (as a float32: 1e-45 or more)", 1.0)
    out["top_k"] = _get(body, "top_k", lambda v: _is_int(v) and 0 <= v < 2**31,
                        "an integer in [0, 2^31)", 0)
    out["min_p"] = _get(body, "min_p", lambda v: _is_num(v) and 0 <= v <= 1,
                        "a number in [0, 1]", 0.0)
    lo, hi = REPEAT_PENALTY_RANGE
    penalty_ok = lambda v: _is_num(v) and lo <= v <= hi   # noqa: E731
    what = "a number in [%g, %g]" % (lo, hi)
    # both names checked, so that a bad value is never let through unseen; given both,
    # repetition_penalty (OpenAI's and vLLM's name) is the one used
    rp = _get(body, "repetition_penalty", penalty_ok, what, None)
    alias = _get(body, "repeat_penalty", penalty_ok, what, 1.0)
    out["repeat_penalty"] = rp if rp is not None else alias
    # -1: the whole context, as llama.cpp's; more than the context would only cost memory
    last_n = _get(body, "repeat_last_n", lambda v: _is_int(v) and -1 <= v <= cfg["n_ctx"],
                  "an integer in [-1, %d] (-1: the context)" % cfg["n_ctx"], 64)
    out["repeat_last_n"] = cfg["n_ctx"] if last_n == -1 else last_n
    # OpenAI's penalties and range, over the same last repeat_last_n tokens
    for name in ("frequency_penalty", "presence_penalty"):
        out[name] = _get(body, name, lambda v: _is_num(v) and -2 <= v <= 2,
                         "a number in [-2, 2]", 0.0)
    stop = _get(body, "stop", lambda v: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(s, str) and s for s in v)),
        "a string or a list of non-empty strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or any(len(s) > 256 for s in stop):
        raise ApiError(400, "at most 16 stop strings of at most 256 characters",
                       param="stop", code="invalid_value")
    for s in stop:
        bad = _bad_text(s)
        if bad is not None:
            raise ApiError(400, "stop string %s has %s" % (json.dumps(s)[:80], bad),
                           param="stop", code="invalid_value")
    out["stop"] = [s for s in stop if s]
    # vLLM's: no stop string ends a text before min_tokens characters, and the one that
    # ends it may be kept at its end
    out["min_tokens"] = _get(body, "min_tokens", lambda v: _is_int(v) and 0 <= v,
                             "an integer >= 0", 0)
    if out["min_tokens"] > out["max_tokens"]:
        raise ApiError(400, "min_tokens (%d) must be at most max_tokens (%d)"
                       % (out["min_tokens"], out["max_tokens"]), param="min_tokens",
                       code="invalid_value")
    out["include_stop"] = _get(body, "include_stop_str_in_output",
                               lambda v: isinstance(v, bool), "a boolean", False)
    out["seed"] = _get(body, "seed", lambda v: _is_int(v) and 0 <= v < 2**63,
                       "an integer in [0, 2^63)", None)
    out["n"] = _get(body, "n", lambda v: _is_int(v) and 1 <= v <= cfg["max_n"],
                    "an integer in [1, %d]" % cfg["max_n"], 1)
    out["stream"] = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    # include_usage null is its default, as null is for every field
    opts = _get(body, "stream_options", lambda v: isinstance(v, dict) and set(v) <= {
        "include_usage"} and (v.get("include_usage") is None
                              or isinstance(v["include_usage"], bool)),
        "an object {\"include_usage\": bool}", {})
    if body.get("stream_options") is not None and not out["stream"]:   # as OpenAI
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true",
                       param="stream_options", code="invalid_value")
    out["include_usage"] = bool(opts.get("include_usage") or False)
    out["routes"] = _get(body, "routes", lambda v: isinstance(v, bool), "a boolean", False)
    out["logprobs"] = _get(body, "logprobs", lambda v: _is_int(v) and 0 <= v <= 5,
                           "an integer in [0, 5]", None)
    out["echo"] = _get(body, "echo", lambda v: isinstance(v, bool), "a boolean", False)
    # a request reuses only the prompt cache's entries of requests with the same salt
    out["cache_salt"] = _get(body, "cache_salt", lambda v: isinstance(v, str) and 0 < len(
        v) <= CACHE_SALT_MAX_CHARS, "a non-empty string of at most %d characters"
        % CACHE_SALT_MAX_CHARS, None)
    out["unknown"] = _get(body, "unknown_chars", lambda v: v in ("error", "replace", "drop"),
                          "one of \"error\", \"replace\", \"drop\"", cfg["unknown"])
    bias = _get(body, "logit_bias", lambda v: isinstance(v, dict) and all(
        _is_num(b) and -100 <= b <= 100 for b in v.values()),
        "an object of token id to a number in [-100, 100]", {})
    out["logit_bias"] = {}
    for key, b in bias.items():
        token = int(key) if re.fullmatch(r"[0-9]{1,9}", key) else -1
        if not 0 <= token < cfg["n_vocab"]:
            raise ApiError(400, "logit_bias: %s is not a token id in [0, %d)"
                           % (json.dumps(key), cfg["n_vocab"]), param="logit_bias",
                           code="invalid_value")
        if token in out["logit_bias"]:   # "05" and "5": one of them would be lost
            raise ApiError(400, "logit_bias: %s names token %d a second time"
                           % (json.dumps(key), token), param="logit_bias",
                           code="invalid_value")
        out["logit_bias"][token] = float("-inf") if b <= -100 else float(b)
    if len(out["logit_bias"]) == cfg["n_vocab"] and all(
            b == float("-inf") for b in out["logit_bias"].values()):
        raise ApiError(400, "logit_bias bans every token: nothing could be sampled",
                       param="logit_bias", code="invalid_value")
    return out


# ---- chat: OpenAI's chat completions over the same engine --------------------------------

# chat fields this server takes only at their neutral value (or null): no tools, plain
# text answers, nothing stored
CHAT_NEUTRAL = {"response_format": ({"type": "text"},), "tools": ([],),
                "tool_choice": ("none",), "parallel_tool_calls": (True, False),
                "store": (False,)}
# the completions fields a chat request takes as they are (echo, prompt lists and their
# truncation have no meaning for a conversation; logprobs is a boolean here)
CHAT_SHARED = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p",
               "repetition_penalty", "repeat_penalty", "repeat_last_n", "stop", "seed",
               "n", "stream", "stream_options", "routes", "logit_bias", "unknown_chars",
               "cache_salt", "frequency_penalty", "presence_penalty", "min_tokens",
               "include_stop_str_in_output", "user"}
CHAT_KNOWN = CHAT_SHARED | {"messages", "max_completion_tokens", "logprobs",
                            "top_logprobs"} | set(CHAT_NEUTRAL)
CHAT_MAX_TOP_LOGPROBS = 20   # OpenAI's bound for chat (completions' is 5)


def parse_chat(body, cfg):
    """Check a chat completions body: (the conversation as a list of {"role",
    "content"} with content one string, the completions-shaped parameters of
    parse_completion with "max_tokens" None when the request gave none), or
    ApiError(400)."""
    _check_fields(body, CHAT_KNOWN, CHAT_NEUTRAL)
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "'messages' is required", param="messages",
                       code="missing_field")
    try:
        conversation = chat_conversation(messages)
    except ChatMessageError as e:
        raise ApiError(400, e.message, param="messages", code=e.code)
    for i, m in enumerate(conversation):
        bad = _bad_text(m["content"])
        if bad is not None and "NUL" not in bad:   # NUL is a character, maybe unknown
            raise ApiError(400, "messages[%d].content has %s" % (i, bad),
                           param="messages", code="invalid_value")
    logprobs = _get(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False)
    top = _get(body, "top_logprobs", lambda v: _is_int(v) and 0 <= v <=
               CHAT_MAX_TOP_LOGPROBS, "an integer in [0, %d]" % CHAT_MAX_TOP_LOGPROBS, None)
    if top is not None and not logprobs:   # as OpenAI
        raise ApiError(400, "'top_logprobs' needs 'logprobs' true", param="top_logprobs",
                       code="invalid_value")
    limit = _get(body, "max_completion_tokens", lambda v: _is_int(v) and v >= 0,
                 "an integer >= 0", None)
    shared = {name: body[name] for name in CHAT_SHARED if name in body}
    if limit is not None:   # the newer name wins, as vLLM takes them
        # the older one still checked, so that a bad value is never let through unseen
        _get(body, "max_tokens", lambda v: _is_int(v) and v >= 0, "an integer >= 0", None)
        shared["max_tokens"] = limit
    given = shared.get("max_tokens") is not None
    if not given:   # the rest of the context, settled once the prompt is read
        shared["max_tokens"] = cfg["max_tokens_cap"]
    shared["prompt"] = "x"   # checked below, as a conversation
    try:
        p = parse_completion(shared, cfg)
    except ApiError as e:   # said of the limit the request gave, or of none
        if e.param in ("max_tokens", "min_tokens") and limit is not None:
            e.param = "max_completion_tokens" if e.param == "max_tokens" else e.param
            e.message = e.message.replace("max_tokens", "max_completion_tokens")
        elif e.param == "min_tokens" and e.code == "invalid_value" and not given:
            e.message = "min_tokens (%d) must be at most %d, the longest answer this " \
                "server gives" % (body["min_tokens"], cfg["max_tokens_cap"])
        raise
    p["prompts"] = None   # set by the handler from the conversation
    p["limit_name"] = "max_completion_tokens" if limit is not None else "max_tokens"
    p["max_tokens"] = p["max_tokens"] if given else None
    p["logprobs"] = (top or 0) if logprobs else None
    p["top_logprobs"] = top or 0
    return conversation, p


# ---- the application -------------------------------------------------------------------

def page_headers(path):
    """GET /'s headers: a Content-Security-Policy that lets the page run its own inline
    script and stylesheet (named by their SHA-256) and talk to this server alone, so that
    markup ever reaching its DOM could run no script, load nothing and send nothing
    elsewhere, and no other site may frame it (the API key is typed there); nosniff."""
    with open(path, encoding="utf-8") as f:
        page = f.read()

    def hashes(tag):
        return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(
            body.encode("utf-8")).digest()).decode()
            for body in re.findall(r"<%s>(.*?)</%s>" % (tag, tag), page, re.S)) or "'none'"
    return {"Content-Security-Policy": "default-src 'none'; script-src %s; style-src %s; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors "
            "'none'" % (hashes("script"), hashes("style")),
            "X-Content-Type-Options": "nosniff"}


# the event a waiting request gets once the engine thread has died of a bug (for no
# prompt in particular: it ends the whole request)
ENGINE_FAILED = Event("error", (500, "internal error: the engine thread stopped (its "
                                "traceback is in the server's log)", "internal_error"))


class Server:
    def __init__(self, args):
        self.args = args
        self.model = Model(args.model, use_mmap=not args.no_mmap)
        # the names clients may ask for (vLLM's --served-model-name); without it the
        # file's name, and any "model" a client sends is taken as this one
        self.model_names = args.served_model_name or [os.path.basename(args.model)]
        self.model_id = self.model_names[0]
        # before the engine: its thread may deliver as soon as it exists
        self.loop = asyncio.get_running_loop()   # made by serve(), inside its loop
        self.engine = Engine(self.model, pool_bytes=int(args.pool_mb * (1 << 20)),
                             mode=args.mode, max_sequences=args.max_sequences,
                             max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                             prefill_chunk=args.prefill_chunk, n_threads=args.threads,
                             kv_type=args.kv_type, step_delay=args.step_delay,
                             steer_below=args.steer_below, forced_scheme=args.force_scheme,
                             prompt_cache=args.prompt_cache,
                             context_shift=args.context_shift, n_ctx=args.ctx_size,
                             deliver=self._deliver)
        # each token's text, looked up in the engine's list (it reads it for each token
        # it emits): the library's token_text is a call of about 6 us, per token on the
        # event loop (a 1 MiB /tokenize held it, and every stream, 6 s)
        self.token_texts = self.engine.token_texts
        n_ctx = self.engine.n_ctx
        # with context shift a completion may outgrow the context: max_tokens up to the
        # cap given, or 8 contexts' worth
        tokens_cap = (args.max_tokens_cap or 8 * n_ctx if args.context_shift else
                      min(args.max_tokens_cap or n_ctx, n_ctx))
        self.cfg = {"max_prompt_chars": min(args.max_prompt_chars or n_ctx, n_ctx),
                    "max_tokens_cap": tokens_cap,
                    "max_n": min(args.max_n, args.max_sequences),
                    "max_prompts": args.max_prompts,
                    "unknown": args.unknown, "n_vocab": self.model.n_vocab, "n_ctx": n_ctx}
        self.chat_template = ChatTemplate()
        # a vocabulary without the template's letters cannot hold a conversation: the
        # chat endpoint then says so, and the rest of the server is unchanged
        why = self.chat_template.unavailable(self.token_texts)
        self.chat_unavailable = why and why + "; use /v1/completions"
        self.statuses = {}
        self.disconnects = 0
        # completions' latencies, from the handler's start: until admitted (the first
        # prompt of a list), until the first generated character reached the loop, and
        # until the whole answer was ready (every prompt's usage)
        self.latency = {"request_queue_time_seconds": Histogram(LATENCY_BOUNDS),
                        "time_to_first_token_seconds": Histogram(TTFT_BOUNDS),
                        "e2e_request_latency_seconds": Histogram(LATENCY_BOUNDS)}
        self.started = time.time()
        self.schemes = scheme_names(self.model)
        self.page_headers = page_headers(os.path.join(STATIC, "index.html"))

    def _deliver(self, batch):
        """The engine thread, once per step: the step's events in one hop to the event
        loop (a hop per event, each a wake-up, cost more than decoding them)."""
        self.loop.call_soon_threadsafe(self._dispatch, batch)

    @staticmethod
    def _dispatch(batch):
        for req, event in batch:
            req.emit(event)

    def app(self):
        @web.middleware
        async def middleware(request, handler):
            return await self.middleware(request, handler)
        # aiohttp refuses a body of client_max_size bytes or more; the limit is allowed
        app = web.Application(client_max_size=self.args.max_body_bytes + 1,
                              middlewares=[middleware])
        app.on_response_prepare.append(self._cors_headers)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/pool", self.pool)
        app.router.add_post("/v1/prompt_cache/clear", self.clear_cache)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/", self.index)
        return app

    # Cross-origin requests (a web page of another origin calling the API): allowed only
    # from --allowed-origins. The headers go on through on_response_prepare, as a
    # stream's are sent before its handler returns.
    def _allowed_origin(self, request):
        origin = request.headers.get("Origin")
        allowed = self.args.allowed_origins
        if origin is None or not allowed:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    async def _cors_headers(self, request, response):
        # '*': on every answer, with an Origin or not, so that all get the same one (a
        # cache that stored one without the header would give it to a browser's
        # request, refused then; the Fetch standard's advice rather than Vary)
        origin = "*" if "*" in self.args.allowed_origins else self._allowed_origin(request)
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
        if self.args.allowed_origins and "*" not in self.args.allowed_origins:
            # the answer depends on the Origin, allowed or not: a cache between the
            # server and its browsers must not give one origin's answer to another
            response.headers["Vary"] = "Origin"

    def _preflight(self, request):
        """The browser's question before a cross-origin POST with JSON or a key: answered
        without the key (a preflight never carries it), for allowed origins only."""
        if (request.method != "OPTIONS" or self._allowed_origin(request) is None
                or "Access-Control-Request-Method" not in request.headers):
            return None
        # the headers asked for, whatever they are: the origin is the check, and a fixed
        # list fails clients that send their own (OpenAI's JS SDK: X-Stainless-*)
        asked = request.headers.get("Access-Control-Request-Headers", "").strip()
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"})

    # middleware: API key, errors in OpenAI's shape, requests counted by status
    async def middleware(self, request, handler):
        try:
            response = self._preflight(request)   # (a preflight carries no key)
            if response is None and self.args.api_key and request.path not in ("/", "/health"):
                auth = request.headers.get("Authorization", "")
                scheme, _, key = auth.strip().partition(" ")
                if not (scheme.lower() == "bearer" and hmac.compare_digest(
                        key.strip().encode("utf-8", "surrogateescape"),
                        self.args.api_key.encode("utf-8", "surrogateescape"))):
                    raise ApiError(401, "invalid API key (send 'Authorization: Bearer KEY')"
                                   if auth else "missing API key (send 'Authorization: "
                                   "Bearer KEY')", code="invalid_api_key")
            if response is None:
                response = await handler(request)
        except ApiError as e:
            response = error_response(e.status, e.message, e.param, e.code, e.headers)
            if e.close:   # written now, then the connection closed (its data sent first)
                response.force_close()   # says "Connection: close"
                try:
                    await response.prepare(request)
                    await self._send(request, response.write_eof())
                except ConnectionError:
                    pass
                if request.transport is not None:
                    request.transport.close()
        except web.HTTPException as e:
            if e.status < 400:
                raise
            message = e.text if e.status != 413 else (
                "the request body is larger than %d bytes" % self.args.max_body_bytes)
            response = error_response(e.status, message or e.reason, code=e.reason.lower()
                                      .replace(" ", "_"), headers={
                                          k: v for k, v in e.headers.items()
                                          if k.lower() == "allow"})
        except ConnectionError:   # the client went away: nobody to answer; counted as 499
            self.disconnects += 1   # (nginx's "client closed request")
            response = web.Response(status=499)
        except Exception as e:   # a bug: one request's 500, in OpenAI's shape, counted
            logging.getLogger("moas.server").exception("request %s %s failed",
                                                       request.method, request.path)
            response = error_response(500, "internal error: %s: %s" % (type(e).__name__, e),
                                      code="internal_error")
        self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
        return response

    async def index(self, request):
        return web.FileResponse(os.path.join(STATIC, "index.html"),
                                headers=self.page_headers)

    async def health(self, request):
        snap = self.engine.snapshot()
        if self.engine.failed:   # a server that answers nothing is not healthy
            raise ApiError(503, "the engine thread stopped (its traceback is in the "
                           "server's log)", code="engine_failed")
        return web.json_response({"status": "ok", "model": self.model_id,
                                  "sequences_active": snap["active"],
                                  "requests_queued": snap["queued"]})

    async def version(self, request):
        # vLLM's /version: the library's, which decides every number the server gives
        return web.json_response({"version": version_string()})

    def _model_asked(self, body):
        """The name the request's "model" names (checked a string already), or the
        first served name when it names none or "" (as vLLM takes it: clients send ""
        for a server of one model); with --served-model-name a name not served is a
        404, as OpenAI's and vLLM's answer."""
        name = body.get("model")
        if not name or self.args.served_model_name is None:
            return self.model_id
        if name not in self.model_names:
            raise ApiError(404, "The model `%s` does not exist." % name, param="model",
                           code="model_not_found")
        return name

    def model_info(self, name=None):
        return {"id": name or self.model_id, "object": "model", "created": int(self.started),
                "owned_by": "libmoas", "max_model_len": self.engine.n_ctx,
                "moas": {"name": self.model.name, "n_layer": self.model.n_layer,
                         "n_head": self.model.n_head, "n_ctx": self.engine.n_ctx,
                         "n_vocab": self.model.n_vocab, "schemes": self.schemes,
                         "scheme_kv_heads": self.model.schemes, "mode": self.args.mode,
                         "kv_type": self.args.kv_type,
                         "context_shift": self.args.context_shift,
                         "mmap": not self.args.no_mmap}}

    async def models(self, request):
        return web.json_response({"object": "list",
                                  "data": [self.model_info(n) for n in self.model_names]})

    async def pool(self, request):
        snap = self.engine.snapshot()
        st = snap["stats"]
        return web.json_response({
            "bytes_capacity": st.bytes_capacity, "bytes_held": st.bytes_held,
            "bytes_used": st.bytes_used, "pages": st.n_pages, "pages_free": st.pages_free,
            "threads": st.n_threads, "sequences_active": snap["active"],
            "sequences_swapped": snap["swapped"],
            "requests_queued": snap["queued"],
            "prompt_cache_entries": snap["cache_entries"],
            "prompt_cache_entry_tokens": snap["cache_tokens"],
            "prompt_cache_bytes_held": snap["cache_bytes_held"],
            "tokens_per_second": round(snap["tokens_per_second"], 1)})

    async def clear_cache(self, request):
        evicted = await self.loop.run_in_executor(None, self.engine.clear_cache)
        if evicted is None:
            raise ApiError(503, "the engine did not clear the prompt cache within 10 s",
                           code="busy", headers={"Retry-After": "1"})
        return web.json_response({"object": "prompt_cache.cleared", "evicted": evicted})

    async def metrics(self, request):
        snap = self.engine.snapshot()
        st, c = snap["stats"], snap["counters"]
        lines = []

        def metric(name, kind, help_, samples):
            lines.append("# HELP moas_%s %s" % (name, help_))
            lines.append("# TYPE moas_%s %s" % (name, kind))
            for labels, value in samples:
                lab = ",".join('%s="%s"' % kv for kv in labels)
                lines.append("moas_%s%s %s" % (name, "{%s}" % lab if lab else "", value))

        metric("pool_bytes_capacity", "gauge", "Bytes of KV pages in the pool.",
               [((), st.bytes_capacity)])
        metric("pool_bytes_held", "gauge", "Bytes of the pages sequences hold.",
               [((), st.bytes_held)])
        metric("pool_bytes_used", "gauge", "Bytes of K/V the sequences' tokens use.",
               [((), st.bytes_used)])
        metric("pool_bytes_held_peak", "gauge", "Most bytes held at once since the start.",
               [((), snap["peak_bytes_held"])])
        metric("pool_pages_free", "gauge", "Free pages.", [((), st.pages_free)])
        metric("sequences_active", "gauge", "Sequences decoding (with a context).",
               [((), snap["active"])])
        metric("sequences_active_peak", "gauge", "Most sequences decoding at once.",
               [((), snap["peak_active"])])
        metric("sequences_swapped", "gauge", "Sequences swapped out to host memory.",
               [((), snap["swapped"])])
        metric("requests_queued", "gauge", "Requests waiting for room.",
               [((), snap["queued"])])
        metric("prompt_cache_entries", "gauge", "Finished requests' contexts kept for reuse.",
               [((), snap["cache_entries"])])
        metric("prompt_cache_entry_tokens", "gauge", "Tokens those contexts hold.",
               [((), snap["cache_tokens"])])
        metric("prompt_cache_bytes_held", "gauge", "Bytes of the pages those contexts hold "
               "(a page two of them share counted in each).",
               [((), snap["cache_bytes_held"])])
        metric("tokens_per_second", "gauge", "Generated tokens per second, last 10 s.",
               [((), "%.1f" % snap["tokens_per_second"])])
        metric("generated_tokens_total", "counter", "Tokens generated.",
               [((), c.get("tokens_generated", 0))])
        metric("prompt_tokens_total", "counter", "Prompt tokens read.",
               [((), c.get("prompt_tokens", 0))])
        metric("decode_steps_total", "counter", "Batched decode calls.",
               [((), c.get("steps", 0))])
        for name, help_ in (("forks", "Sequences forked from a prompt (n > 1)."),
                            ("swapped_out", "Sequences swapped out when a step did not fit."),
                            ("resumed", "Swapped sequences brought back."),
                            ("context_shifts", "Full contexts shifted to go on (--context-shift)."),
                            ("prompt_cache_hits", "Requests that began from a cached prompt."),
                            ("prompt_cache_reused_tokens", "Prompt tokens taken from the cache, "
                             "not read again."),
                            ("prompt_cache_evictions", "Cached prompts whose pages went back "
                             "to the pool.")):
            metric(name + "_total", "counter", help_, [((), c.get(name, 0))])
        total = sum(snap["scheme_tokens"]) or 1
        metric("scheme_token_layers_total", "counter",
               "Token-layer pairs stored per scheme by closed sequences.",
               [((("scheme", n),), v) for n, v in zip(self.schemes, snap["scheme_tokens"])])
        metric("scheme_share", "gauge", "Share of token-layer pairs per scheme.",
               [((("scheme", n),), "%.4f" % (v / total))
                for n, v in zip(self.schemes, snap["scheme_tokens"])])
        metric("client_disconnects_total", "counter",
               "Requests whose client hung up before the end (queued, decoding or "
               "streaming).", [((), self.disconnects)])
        metric("requests_total", "counter", "HTTP requests answered, by status.",
               [((("status", str(s)),), n) for s, n in sorted(self.statuses.items())])
        for name, help_ in (("request_queue_time_seconds", "Seconds completions waited "
                             "before their first prompt was admitted."),
                            ("time_to_first_token_seconds", "Seconds until a completion's "
                             "first generated character (none for max_tokens 0)."),
                            ("e2e_request_latency_seconds", "Seconds until a completion's "
                             "whole answer was ready (those answered in full).")):
            lines.append("# HELP moas_%s %s" % (name, help_))
            lines.append("# TYPE moas_%s histogram" % name)
            lines.extend(self.latency[name].lines("moas_" + name))
        return web.Response(text="\n".join(lines) + "\n",
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Prometheus-Format": "0.0.4"})

    # the body of a POST, every endpoint alike
    async def _json_body(self, request):
        """The request's body parsed as JSON, or the ApiError that says why not."""
        try:
            # a body that never ends would hold its connection and buffer forever
            raw = await asyncio.wait_for(request.read(), self.args.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, "the request body did not arrive within %g s"
                           % self.args.body_timeout, code="body_timeout", close=True)
        except ConnectionError:   # the client hung up while sending it: a 499
            raise
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "the request body is larger than %d bytes"
                           % self.args.max_body_bytes, code="body_too_large")
        except Exception as e:   # noqa: BLE001 - e.g. a body its Content-Encoding cannot undo
            raise ApiError(400, "could not read the request body: %s" % e,
                           code="invalid_body")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ApiError(400, "could not parse the JSON body: %s" % e, code="invalid_json")
        except RecursionError:
            raise ApiError(400, "could not parse the JSON body: nested too deeply",
                           code="invalid_json")
        return body

    # POST /tokenize, /detokenize (vLLM's shapes): the model's tokens of a text, and back
    async def tokenize(self, request):
        body = self._object(await self._json_body(request), TOKENIZE_FIELDS)
        self._model_asked(body)
        text = _get(body, "prompt", lambda v: isinstance(v, str), "a string", None)
        if text is None:
            raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
        bad = _bad_text(text)
        if bad is not None and "NUL" not in bad:
            raise ApiError(400, "'prompt' has %s" % bad, param="prompt", code="invalid_value")
        unknown = _get(body, "unknown_chars", lambda v: v in ("error", "replace", "drop"),
                       "one of \"error\", \"replace\", \"drop\"", self.cfg["unknown"])
        strs = _get(body, "return_token_strs", lambda v: isinstance(v, bool), "a boolean",
                    False)
        _get(body, "add_special_tokens", lambda v: isinstance(v, bool), "a boolean", True)
        try:
            ids, changed = self.model.tokenize_ex(text, unknown=unknown)
        except MoasError as e:
            hint = UNKNOWN_HINT if e.status == Status.ERR_UNKNOWN_CHAR else ""
            raise ApiError(400, e.message + hint, param="prompt", code=e.name.lower())
        out = {"count": len(ids), "max_model_len": self.engine.n_ctx, "tokens": ids,
               "token_strs": [self.token_texts[t] for t in ids] if strs else None}
        if changed:
            out["prompt_chars_changed"] = changed
        return await self._send_whole(request, web.json_response(out))

    async def detokenize(self, request):
        body = self._object(await self._json_body(request), DETOKENIZE_FIELDS)
        self._model_asked(body)
        n_vocab = self.model.n_vocab
        tokens = _get(body, "tokens", lambda v: isinstance(v, list) and all(
            _is_int(t) for t in v), "a list of integers", None)
        if tokens is None:
            raise ApiError(400, "'tokens' is required", param="tokens", code="missing_field")
        for i, t in enumerate(tokens):
            if not 0 <= t < n_vocab:
                raise ApiError(400, "'tokens' %d is %s, not a token id in [0, %d)"
                               % (i, json.dumps(t)[:40], n_vocab), param="tokens",
                               code="invalid_value")
        return await self._send_whole(request, web.json_response(
            {"prompt": "".join(self.token_texts[t] for t in tokens)}))

    @staticmethod
    def _object(body, known):
        """A JSON object of the fields `known` (and `model`, any string), or ApiError."""
        _check_fields(body, known)
        _get(body, "model", lambda v: isinstance(v, str), "a string", None)
        return body

    # POST /v1/completions
    async def completions(self, request):
        start = self.loop.time()
        body = await self._json_body(request)
        p = parse_completion(body, self.cfg)
        p["chat"] = False
        return await self._complete(request, start, body, p)

    async def chat_completions(self, request):
        """OpenAI's chat completions: the conversation written by the chat template
        (ChatTemplate), then answered as a completion of one prompt is."""
        start = self.loop.time()
        body = await self._json_body(request)
        conversation, p = parse_chat(body, self.cfg)
        if self.chat_unavailable:
            raise ApiError(400, self.chat_unavailable, code="chat_template_unavailable")
        prompt = self.chat_template.render(conversation)
        if len(prompt) > PROMPT_CHARS_PER_TOKEN_LIMIT * self.cfg["max_prompt_chars"]:
            raise ApiError(400, "the conversation is %d characters, this server takes at "
                           "most %d tokens" % (len(prompt), self.cfg["max_prompt_chars"]),
                           param="messages", code="prompt_too_long")
        try:   # characters named by message and place
            check_contents(self.model.tokenize, conversation, p["unknown"])
        except MoasError as e:
            hint = UNKNOWN_HINT if e.status == Status.ERR_UNKNOWN_CHAR else ""
            raise ApiError(400, e.message + hint, param="messages", code=e.name.lower())
        p["prompts"] = [prompt]
        p["stop"] = p["stop"] + self.chat_template.stop
        p["chat"] = True
        return await self._complete(request, start, body, p)

    async def _complete(self, request, start, body, p):
        """A completion (p["chat"]: a chat completion) of the checked parameters p."""
        model = self._model_asked(body)
        # each prompt of a list is a request of its own to the engine (batched with the
        # others as any two requests are); prompt k's choice i is choice k n + i
        parts = [self._prompt_part(p, k, text) for k, text in enumerate(p["prompts"])]
        p["parts"] = parts
        sampling = dict(temperature=p["temperature"], top_k=p["top_k"], top_p=p["top_p"],
                        min_p=p["min_p"], repeat_penalty=p["repeat_penalty"],
                        repeat_last_n=p["repeat_last_n"], logit_bias=p["logit_bias"] or None,
                        frequency_penalty=p["frequency_penalty"],
                        presence_penalty=p["presence_penalty"])
        try:   # the library's own checks, here rather than in the engine thread
            Sampler(self.model, **sampling).close()
        except MoasError as e:
            raise ApiError(400, e.message, code=e.name.lower())
        events = EventQueue(self.loop)
        reqs = []
        for k, part in enumerate(parts):
            req = Request(part["ids"], max_tokens=p["max_tokens"], n=p["n"], seed=p["seed"],
                          stop=p["stop"], min_tokens=p["min_tokens"],
                          include_stop=p["include_stop"], routes=p["routes"],
                          logprobs=p["logprobs"],
                          echo=p["echo"], cache_scope=p["cache_salt"],
                          group=reqs if len(parts) > 1 else None,
                          emit=lambda event, k=k: self._buffer(request, reqs, events,
                                                               (k, event)), **sampling)
            if not self.engine.fits(req):
                raise ApiError(400, "%s needs more KV memory than the pool holds" % (
                    "the request" if len(parts) == 1 else "prompt %d" % k),
                    code="request_too_large")
            reqs.append(req)
        retry = {"Retry-After": str(max(1, int(self.args.queue_timeout)))}
        if self.engine.closed:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        meta = {"id": "%s-%d" % ("chatcmpl" if p["chat"] else "cmpl", reqs[0].id),
                "object": "chat.completion" if p["chat"] else "text_completion",
                "created": int(time.time()), "model": model}
        changed = sum(part["changed"] for part in parts)
        try:
            for req in reqs:
                if not self.engine.submit(req):
                    raise ApiError(503, "the server is full: %d requests are already "
                                   "waiting" % self.args.max_queue, code="queue_full",
                                   headers=retry)
            # every prompt's first event (admitted, or its error) before an answer
            # begins; later events of the prompts admitted first wait in `early`
            early, started = collections.deque(), set()
            while len(started) < len(reqs):
                k, ev = await self._next_event(request, events)
                if k in started:
                    early.append((k, ev))
                    continue
                started.add(k)
                if ev.kind == "error":
                    status, message, code = ev.data
                    raise ApiError(status, message, code=code,
                                   headers=retry if status == 503 else None)
            p["early"] = early
            if p["stream"]:
                return await self._stream(request, events, reqs, meta, p, changed)
            return await self._whole(request, events, reqs, meta, p, changed)
        finally:
            for req in reqs:
                self.engine.cancel(req)   # a no-op when it ended; frees its pages if not
            # for --access-log: what the engine did for it, however it ended; the
            # reasons in the choices' order (they finish in any), "-" for one unfinished
            finished = request.get("moas_finish", {})
            request["moas"] = "%s prompt=%d cached=%d completion=%d finish=%s" % (
                meta["id"], sum(len(r.prompt_ids) for r in reqs),
                sum(r.cached_tokens for r in reqs), sum(r.completion_tokens for r in reqs),
                ",".join(finished.get((k, i), "-") for k in range(len(reqs))
                         for i in range(p["n"])) if finished else "-")
            for key, name in (("moas_admitted", "request_queue_time_seconds"),
                              ("moas_first", "time_to_first_token_seconds")):
                if key in request:
                    self.latency[name].observe(request[key] - start)
            if request.get("moas_dones") == len(reqs):
                self.latency["e2e_request_latency_seconds"].observe(
                    request["moas_end"] - start)

    def _tokenize_prompt(self, p, which, text):
        """A prompt's text as token ids under unknown_chars, and how many characters that
        changed."""
        try:
            ids, changed = self.model.tokenize_ex(text, unknown=p["unknown"])
        except MoasError as e:
            where = "" if len(p["prompts"]) == 1 else which + ": "
            hint = UNKNOWN_HINT if e.status == Status.ERR_UNKNOWN_CHAR else ""
            raise ApiError(400, where + e.message + hint, param="prompt",
                           code=e.name.lower())
        if not ids:
            raise ApiError(400, "%s has no character in the vocabulary" % which,
                           param="prompt", code="invalid_value")
        return ids, changed

    def _prompt_part(self, p, k, text):
        """Prompt k of the request tokenized and checked: its ids, how many characters
        unknown_chars changed, its tokens' texts (echo, logprobs) and their length
        (logprobs' text_offset counts from the prompt's start, as OpenAI's does)."""
        which = ("the conversation" if p["chat"] else "the prompt" if len(p["prompts"]) == 1
                 else "prompt %d" % k)
        if isinstance(text, list):   # token ids, read as they are
            bad = next((t for t in text if not 0 <= t < self.model.n_vocab), None)
            if bad is not None:
                raise ApiError(400, "%s has %d, not a token id in [0, %d)"
                               % (which, bad, self.model.n_vocab), param="prompt",
                               code="invalid_value")
            ids, changed = list(text), 0
        else:
            ids, changed = self._tokenize_prompt(p, which, text)
        if p["truncate"] is not None:
            ids = ids[-p["truncate"]:]
        if len(ids) > self.cfg["max_prompt_chars"]:
            raise ApiError(400, "%s is %d tokens (characters in the vocabulary), this "
                           "server takes at most %d" % (which, len(ids),
                                                        self.cfg["max_prompt_chars"]),
                           param="messages" if p["chat"] else "prompt",
                           code="prompt_too_long")
        if p["max_tokens"] is None:   # a chat's default: the rest of the context
            if len(ids) >= self.engine.n_ctx:   # none left: not an empty answer, as vLLM
                raise ApiError(400, "this model's context holds %d characters and %s has "
                               "%d: none is left for the answer" % (
                                   self.engine.n_ctx, which, len(ids)),
                               param="messages", code="context_length_exceeded")
            p["max_tokens"] = min(self.engine.n_ctx - len(ids), self.cfg["max_tokens_cap"])
            if p["min_tokens"] > p["max_tokens"]:
                raise ApiError(400, "min_tokens (%d) must be at most the %d characters "
                               "left in the context" % (p["min_tokens"], p["max_tokens"]),
                               param="min_tokens", code="invalid_value")
        if len(ids) + p["max_tokens"] > self.engine.n_ctx and not self.args.context_shift:
            name = p.get("limit_name", "max_tokens")
            raise ApiError(400, "this model's context holds %d characters; %s has %d and "
                           "%s asks for %d more" % (self.engine.n_ctx, which, len(ids),
                                                    name, p["max_tokens"]),
                           param=name, code="context_length_exceeded")
        texts = [self.token_texts[t] for t in ids]
        return {"ids": ids, "changed": changed, "texts": texts,
                "chars": sum(len(t) for t in texts)}

    def _buffer(self, request, reqs, events, event):
        """An event of one of the HTTP request's engine requests (a prompt each), on
        the event loop, for its handler. A client that reads nothing stalls the
        handler's writes while the engine goes on: past --max-buffered-events waiting,
        the request ends as if the client had hung up (its handler then counts the
        disconnect) rather than holding their memory."""
        kind = event[1].kind
        if kind == "finish":   # each choice's reason, for --access-log
            request.setdefault("moas_finish", {})[event[0], event[1].data[0]] = \
                event[1].data[1]
        elif kind == "text" and "moas_first" not in request:   # latencies, /metrics
            request["moas_first"] = self.loop.time()
        elif kind == "admitted" and "moas_admitted" not in request:
            request["moas_admitted"] = self.loop.time()
        elif kind == "done":
            request["moas_dones"] = request.get("moas_dones", 0) + 1
            request["moas_end"] = self.loop.time()
        if events.qsize() < self.args.max_buffered_events:
            events.put_nowait(event)
        elif not all(req.cancelled for req in reqs):
            for req in reqs:
                self.engine.cancel(req)
            self._hang_up(request)

    @staticmethod
    def _hang_up(request):
        """Close the client's connection now, dropping what waits in its buffers."""
        transport = request.transport
        if transport is not None:
            transport.abort()

    async def _send(self, request, write, nbytes=None):
        """Await a write to the client (a coroutine) of nbytes (None: not known) for at
        most --send-timeout: a client that has read nothing for that long is gone
        (ConnectionResetError), and its connection is closed, so that what its buffers
        hold goes too. A few bytes into a connection whose buffer is empty cannot wait
        for the client (only a buffer past its high-water mark does, 64 KB), so such a
        write, each stream's at every step, goes without a timer and a task."""
        transport = request.transport
        if (nbytes is not None and nbytes <= self.SMALL_WRITE and transport is not None
                and transport.get_write_buffer_size() == 0):
            await write
            return
        try:
            await asyncio.wait_for(write, self.args.send_timeout)
        except asyncio.TimeoutError:
            self._hang_up(request)
            raise ConnectionResetError("the client read nothing for %g s"
                                       % self.args.send_timeout) from None

    def _logprobs(self, entries, offset):
        """OpenAI's completions logprobs object for (text, entry) pairs, the first at
        character `offset` of prompt and completion; an entry None (the prompt's first
        token, which nothing predicts) gives nulls, as OpenAI's echo does."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for text, entry in entries:
            lp, top = entry if entry is not None else (None, None)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if top is None else
                                       {self.token_texts[t]: v for t, v in top})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def _chat_logprobs(self, entries, k):
        """OpenAI's chat logprobs object for (text, entry) pairs: per character its log
        probability and UTF-8 bytes, and the k likeliest (exactly k: the completions
        shape's chosen character beyond them is left out, as chat has it)."""
        def item(text, lp):
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
        return {"content": [dict(item(text, lp), top_logprobs=[
            item(self.token_texts[t], v) for t, v in top[:k]])
            for text, (lp, top) in entries]}

    @staticmethod
    def _echoed(part, entries):
        """A prompt's (text, entry) pairs of an echo request: its entries from the
        "prompt" event (None without logprobs)."""
        return list(zip(part["texts"], entries or [None] * len(part["texts"])))

    POLL_SECONDS = 0.25   # how often a waiting request looks whether its client is there
    SMALL_WRITE = 16384   # bytes a write into an empty buffer takes without waiting

    async def _next_event(self, request, events, early=()):
        """The request's next (prompt index, event): those in `early` first (taken
        before the answer began), or ConnectionResetError once its client has hung
        up: aiohttp (3.8) does not cancel a handler whose connection closed, and a
        request nobody waits for would keep its sequences, or its place in the queue,
        until it ended. Once the engine thread has died, (None, ENGINE_FAILED)."""
        if early:
            return early.popleft()
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ConnectionResetError("the client hung up")
            if not events.empty():
                return events.get_nowait()
            if self.engine.failed:
                await asyncio.sleep(0)   # what it delivered before it ended comes first
                if events.empty():   # nothing more will come: an error, not a wait forever
                    return None, ENGINE_FAILED
                continue
            await events.wait(self.POLL_SECONDS)

    @staticmethod
    def _usage(usages):
        """The usage of a request of several prompts: their sums."""
        total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        for u in usages:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                total[key] += u[key]
            total["prompt_tokens_details"]["cached_tokens"] += \
                u["prompt_tokens_details"]["cached_tokens"]
        return total

    async def _whole(self, request, events, reqs, meta, p, changed):
        n, parts = p["n"], p["parts"]
        texts = [[] for _ in range(len(parts) * n)]
        routes = [[] for _ in texts]
        lps = [[] for _ in texts]
        reasons = [None] * len(texts)
        echoed = [[] for _ in parts]   # each prompt's (text, entry) pairs, with echo
        usages = []
        while len(usages) < len(parts):
            k, ev = await self._next_event(request, events, p["early"])
            if ev.kind == "prompt":
                echoed[k] = self._echoed(parts[k], ev.data)
            elif ev.kind == "text":
                i, text, route, lp = ev.data
                texts[k * n + i].append(text)
                routes[k * n + i].append(route)
                lps[k * n + i].append((text, lp))
            elif ev.kind == "finish":
                reasons[k * n + ev.data[0]] = ev.data[1]
            elif ev.kind == "error":
                raise ApiError(ev.data[0], ev.data[1], code=ev.data[2])
            elif ev.kind == "done":
                usages.append(ev.data)
        choices = []
        for c in range(len(texts)):
            k = c // n
            if p["chat"]:
                ch = {"index": c, "message": {"role": "assistant",
                                              "content": "".join(texts[c])},
                      "logprobs": None if p["logprobs"] is None else
                      self._chat_logprobs(lps[c], p["top_logprobs"]),
                      "finish_reason": reasons[c]}
            else:
                ch = {"text": "".join(t for t, _ in echoed[k]) + "".join(texts[c]),
                      "index": c, "logprobs": None if p["logprobs"] is None else
                      self._logprobs(echoed[k] + lps[c],
                                     0 if echoed[k] else parts[k]["chars"]),
                      "finish_reason": reasons[c]}
            if p["routes"]:
                ch["routes"] = routes[c]
            choices.append(ch)
        body = dict(meta, choices=choices, usage=self._usage(usages))
        if changed:
            body["prompt_chars_changed"] = changed
        return await self._send_whole(request, web.json_response(body))

    async def _send_whole(self, request, response):
        """A whole answer sent here, not by aiohttp after the handler, so that
        --send-timeout bounds it: a client that reads nothing would otherwise hold it
        for as long as it stays (/tokenize's, for a body of 1 MiB, is 8.5 MB)."""
        try:
            await response.prepare(request)
            await self._send(request, response.write_eof())
        except ConnectionError:
            # a disconnect, counted under the 200 it began with, as a cut stream's is
            self.disconnects += 1
        return response

    async def _stream(self, request, events, reqs, meta, p, changed):
        if changed:   # every chunk says it, as the whole response's body does
            meta = dict(meta, prompt_chars_changed=changed)
        if p["chat"]:
            meta = dict(meta, object="chat.completion.chunk")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            return await self._events(request, response, events, meta, p)
        except ConnectionError:   # the client hung up: completions() cancels the request
            self.disconnects += 1
            return response if response.prepared else web.Response(status=499)

    async def _events(self, request, response, events, meta, p):
        """Server-sent events, the frames of all the events waiting written at once."""
        def frame(obj):
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        n, parts = p["n"], p["parts"]
        offsets = {}   # choice -> characters streamed so far, for text_offset
        usages = []
        if p["chat"]:   # each choice's role first, as OpenAI's chunks begin
            data = b"".join(frame(dict(meta, choices=[{
                "index": i, "delta": {"role": "assistant", "content": ""},
                "logprobs": None, "finish_reason": None}])) for i in range(n))
            await self._send(request, response.write(data), len(data))
        while True:
            batch = [await self._next_event(request, events, p["early"])]
            while p["early"] and len(batch) < 256:
                batch.append(p["early"].popleft())
            while not events.empty() and len(batch) < 256:
                batch.append(events.get_nowait())
            frames, last = [], False
            for k, ev in batch:
                if ev.kind == "prompt":   # echo: the prompt first, in one chunk a choice
                    echoed = self._echoed(parts[k], ev.data)
                    for i in range(n):
                        ch = {"text": "".join(t for t, _ in echoed), "index": k * n + i,
                              "logprobs": None if p["logprobs"] is None else
                              self._logprobs(echoed, 0), "finish_reason": None}
                        if p["routes"]:   # routes are the generated characters' alone
                            ch["routes"] = []
                        frames.append(frame(dict(meta, choices=[ch])))
                elif ev.kind == "text" and p["chat"]:
                    i, text, route, lp = ev.data
                    ch = {"index": i, "delta": {"content": text}, "logprobs": None if
                          p["logprobs"] is None else
                          self._chat_logprobs([(text, lp)], p["top_logprobs"]),
                          "finish_reason": None}
                    if p["routes"]:
                        ch["routes"] = [route]
                    frames.append(frame(dict(meta, choices=[ch])))
                elif ev.kind == "text":
                    i, text, route, lp = ev.data
                    c = k * n + i
                    ch = {"text": text, "index": c, "logprobs": None, "finish_reason": None}
                    if p["logprobs"] is not None:
                        at = offsets.get(c, parts[k]["chars"])
                        ch["logprobs"] = self._logprobs([(text, lp)], at)
                        offsets[c] = at + len(text)
                    if p["routes"]:
                        ch["routes"] = [route]
                    frames.append(frame(dict(meta, choices=[ch])))
                elif ev.kind == "finish":
                    i, reason, _ = ev.data
                    ch = ({"index": i, "delta": {}} if p["chat"] else
                          {"text": "", "index": k * n + i})
                    ch.update(logprobs=None, finish_reason=reason)
                    frames.append(frame(dict(meta, choices=[ch])))
                elif ev.kind == "error":
                    frames.append(frame({"error": {"message": ev.data[1],
                                                   "type": error_kind(ev.data[0]),
                                                   "param": None, "code": ev.data[2]}}))
                    frames.append(b"data: [DONE]\n\n")
                    last = True
                    break
                elif ev.kind == "done":
                    usages.append(ev.data)
                    if len(usages) < len(parts):
                        continue
                    if p["include_usage"]:
                        frames.append(frame(dict(meta, choices=[],
                                                 usage=self._usage(usages))))
                    frames.append(b"data: [DONE]\n\n")
                    last = True
                    break
            if last and ev.kind == "done":
                # [DONE] and the body's last chunk in one write: a client may hang up
                # as soon as it has read [DONE], and a write after that would find it
                # gone and count a stream answered in full as a disconnect
                await self._send(request, response.write_eof(b"".join(frames)))
                return response
            data = b"".join(frames)
            await self._send(request, response.write(data), len(data))
            if last:
                return response


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m moas.server",
                                 description="An OpenAI-compatible completions and chat "
                                 "server for libmoas, batching every request over one KV "
                                 "pool.")
    ap.add_argument("-m", "--model", required=True, help="the GGUF model file")
    ap.add_argument("--served-model-name", nargs="+", metavar="NAME", default=None,
                    help="the names /v1/models lists and requests may give as 'model' "
                    "(the first is the answers' unless a request names another); a "
                    "request naming another model is a 404 (vLLM's; default: the file's "
                    "name, and any 'model' is accepted)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    ap.add_argument("--port", type=int, default=8080, help="port (8080; 0: any free one)")
    ap.add_argument("--pool-mb", type=float, default=64.0,
                    help="megabytes of KV pages shared by all sequences (64)")
    ap.add_argument("--mode", choices=("routed", "mixture"), default="mixture",
                    help="mixture (the trained model, every scheme stored) or routed "
                    "(each token stores only its router's scheme: less memory)")
    ap.add_argument("--max-sequences", type=int, default=64,
                    help="sequences decoding at once (64)")
    ap.add_argument("--max-queue", type=int, default=64,
                    help="requests that may wait for room before 503 (64)")
    ap.add_argument("--queue-timeout", type=float, default=30.0,
                    help="seconds a request may wait for room before 503 (30)")
    ap.add_argument("--body-timeout", type=float, default=30.0,
                    help="seconds a request's body may take to arrive before 408 (30)")
    ap.add_argument("--send-timeout", type=float, default=30.0,
                    help="seconds a write may wait for a client to read before it counts "
                    "as gone: its request cancelled, its connection closed (30)")
    ap.add_argument("--max-buffered-events", type=int, default=8192,
                    help="events (a character each, mostly) a request may have waiting "
                    "for its client to read before it counts as gone (8192)")
    ap.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (also $MOAS_API_KEY)")
    ap.add_argument("--max-tokens-cap", type=int, default=0,
                    help="largest max_tokens accepted (0: the context length; with "
                    "--context-shift 8 times it)")
    ap.add_argument("--max-prompt-chars", type=int, default=0,
                    help="longest prompt accepted (0: the context length)")
    ap.add_argument("--max-n", type=int, default=16, help="largest n accepted (16)")
    ap.add_argument("--max-prompts", type=int, default=32,
                    help="most prompts in one request's list (32)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20,
                    help="largest request body (1 MiB)")
    ap.add_argument("--unknown", choices=("error", "replace", "drop"), default="error",
                    help="characters outside the vocabulary, unless a request says "
                    "(unknown_chars): 400 (error), a space (replace) or left out (drop)")
    ap.add_argument("--prefill-chunk", type=int, default=32,
                    help="prompt tokens a sequence reads per step (32)")
    ap.add_argument("-t", "--threads", type=int, default=0, help="decode threads (0: default)")
    ap.add_argument("-c", "--ctx-size", "--max-model-len", dest="ctx_size", type=int, default=0,
                    help="each sequence's context in tokens, at most the trained length "
                    "(0: the trained length; llama.cpp's -c, vLLM's --max-model-len)")
    ap.add_argument("--kv-type", choices=("f32", "f16", "q8_0"), default="f32",
                    help="K/V element type (f32; q8_0: head_dim a multiple of 32)")
    ap.add_argument("--no-mmap", action="store_true",
                    help="read the model into memory instead of mapping the file "
                    "(llama.cpp's --no-mmap)")
    ap.add_argument("--steer-below", type=float, default=0.0,
                    help="routed mode: while less than this fraction of the pool's pages "
                    "is free, tokens take cheaper schemes (0: never; Pool steer_below)")
    ap.add_argument("--force-scheme", type=int, default=-1,
                    help="routed mode: every token takes scheme S (0: an MHA-sized cache, "
                    "for comparisons); -1: the router")
    ap.add_argument("--prompt-cache", type=int, default=8,
                    help="finished requests whose context is kept, so that a later prompt "
                    "beginning with its tokens reads only the rest; their pages go back "
                    "whenever the pool needs them (8; 0: none; none with --steer-below)")
    ap.add_argument("--context-shift", action="store_true",
                    help="RoPE models: a sequence whose context is full drops the half "
                    "after its first 4 tokens and goes on (keys turned back, nothing "
                    "read again), so prompt + max_tokens may exceed the context (the "
                    "prompt itself still fits in it), as llama.cpp's server allows (off: "
                    "such a request is refused)")
    ap.add_argument("--step-delay", type=float, default=0.0,
                    help="seconds to pause after each step, at most 3600 (slow motion for "
                    "demos, tests)")
    ap.add_argument("--access-log", metavar="FILE", default=None,
                    help="a line per request answered (client, path, status, seconds; "
                    "a completion's id, prompt, cached and generated tokens, finish "
                    "reasons) appended to FILE, '-' for stderr (none by default)")
    ap.add_argument("--allowed-origins", default="",
                    help="web pages of these origins (comma-separated, e.g. "
                    "'http://localhost:3000'; '*': any) may call the API from a browser "
                    "(CORS); none by default")
    args = ap.parse_args(argv)
    # as a browser writes its Origin (scheme and host in lower case, no path, no "/"
    # after the port, no port when it is the scheme's default), so that a URL copied
    # with its "/", capitals or ":443" still matches; an origin with a path could never
    # match: refused rather than ignored
    origins = []
    for o in (o.strip() for o in args.allowed_origins.split(",")):
        if o in ("", "*", "null"):
            origins += [o] if o else []
            continue
        o = o[:-1].lower() if o.endswith("/") else o.lower()
        if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+", o):
            ap.error("--allowed-origins: %r is not an origin (scheme://host[:port])" % o)
        scheme = o.split(":", 1)[0]
        default = {"http": ":80", "https": ":443"}.get(scheme)
        if default and o.endswith(default):
            o = o[:-len(default)]
        origins.append(o)
    args.allowed_origins = origins
    if args.served_model_name is not None and "" in args.served_model_name:
        ap.error("--served-model-name: a name must not be empty")
    # an empty file name (a script's unset variable) would leave the log off in silence
    if args.access_log == "":
        ap.error("--access-log: give a file, or '-' for stderr (leave it out for no log)")
    # an empty key would turn authentication off in silence (an unset secret in a
    # container's environment, a script's empty variable): refused, so that it fails
    # closed
    if args.api_key == "":
        ap.error("--api-key must not be empty (leave it out to serve without a key)")
    if args.api_key is None:
        env_key = os.environ.get("MOAS_API_KEY")
        if env_key == "":
            ap.error("MOAS_API_KEY is set but empty (unset it to serve without a key)")
        args.api_key = env_key
    # every number in its range, or the server would start and then fail each request
    # (a prefill chunk of 0 never reads a prompt; a negative delay, or one of years,
    # raises per step)
    checks = (("--max-sequences", args.max_sequences >= 1, ">= 1"),
              ("--max-queue", args.max_queue >= 0, ">= 0"),
              ("--pool-mb", args.pool_mb > 0 and math.isfinite(args.pool_mb),
               "a finite number > 0"),
              ("--prompt-cache", args.prompt_cache >= 0, ">= 0"),
              ("--queue-timeout", args.queue_timeout >= 0 and math.isfinite(args.queue_timeout),
               "a finite number of seconds >= 0"),
              ("--body-timeout", args.body_timeout > 0 and math.isfinite(args.body_timeout),
               "a finite number of seconds > 0"),
              ("--send-timeout", args.send_timeout > 0 and math.isfinite(args.send_timeout),
               "a finite number of seconds > 0"),
              ("--max-buffered-events", args.max_buffered_events >= 1, ">= 1"),
              ("--max-tokens-cap", args.max_tokens_cap >= 0, ">= 0 (0: the context length)"),
              ("--max-prompt-chars", args.max_prompt_chars >= 0,
               ">= 0 (0: the context length)"),
              ("--max-n", args.max_n >= 1, ">= 1"),
              ("--max-prompts", args.max_prompts >= 1, ">= 1"),
              ("--max-body-bytes", args.max_body_bytes >= 1, ">= 1"),
              ("--prefill-chunk", args.prefill_chunk >= 1, ">= 1"),
              ("--threads", args.threads >= 0, ">= 0 (0: the default)"),
              ("--ctx-size", args.ctx_size >= 0, ">= 0 (0: the trained length)"),
              ("--steer-below", 0 <= args.steer_below <= 1, "in [0, 1]"),
              ("--force-scheme", args.force_scheme >= -1, ">= -1 (-1: the router)"),
              ("--step-delay", 0 <= args.step_delay <= 3600,
               "a number of seconds in [0, 3600]"),
              ("--port", 0 <= args.port <= 65535, "in [0, 65535]"))
    for name, ok, want in checks:
        if not ok:   # NaN fails every comparison, so it lands here too
            ap.error("%s must be %s" % (name, want))
    return args


def _started_on_a_lost_connection(exc):
    """Whether exc is aiohttp 3.8's assertion, first thing in _handle_request, that the
    connection of the request it is about to handle is still there: it fails when a
    client on a kept-alive connection sent its next request and hung up while the
    handler of its last one was ending (the request is never handled; no one waits
    for it). An assertion anywhere else has a deeper innermost frame."""
    if not isinstance(exc, AssertionError) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    return (code.co_name == "_handle_request"
            and code.co_filename.endswith(os.path.join("aiohttp", "web_protocol.py")))


class AccessLog(AbstractAccessLogger):
    """--access-log: a line for each request once it is answered: when (UTC), the
    client, method and path as sent, status, seconds taken (a stream's whole time),
    and for a completion its id, prompt tokens (those from the prompt cache),
    generated tokens and each choice's finish reason in the choices' order ("-" for
    one unfinished; alone, none, as for a request refused or whose client left first)."""

    def log(self, request, response, time_taken):
        path = request.raw_path
        if len(path) > 200:
            path = path[:200] + "..."
        line = '%s %s "%s %s" %d %.3fs' % (
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), request.remote,
            request.method, _log_escaped(path), response.status, time_taken)
        if "moas" in request:
            line += " " + request["moas"]
        self.logger.info(line)


def _log_escaped(text):
    """A client's text for a log line: what is not printable ASCII, and quotes and
    backslashes, as \\xHH of its UTF-8 bytes (as nginx does): aiohttp lets U+2028 and
    U+0085 through in a path, and they end a line for Python's splitlines() and many
    viewers, so that a client could write lines of its own."""
    return re.sub(r'[^!#-\[\]-~]', lambda m: "".join(
        "\\x%02x" % b for b in m.group().encode("utf-8", "surrogatepass")), text)


def _access_logger(where):
    """The logger AccessLog writes to: stderr for "-", else the file (appended)."""
    logger = logging.getLogger("moas.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = (logging.StreamHandler(sys.stderr) if where == "-" else
               logging.FileHandler(where, encoding="utf-8"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    return logger


class QuietBadRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (bytes that are not HTTP, a bad
    header or chunk) at ERROR with a traceback, before any of our code runs, and a body
    its Content-Encoding cannot undo again after our 400; the client gets its 400
    either way. It logs so too a request it starts on a connection its client has
    just closed (_started_on_a_lost_connection). Those become DEBUG records, one line
    each, so that a client sending garbage, or leaving, cannot fill the operator's
    log; anything else passes."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, CLIENT_ERRORS):
            record.msg, record.args = "unparsable HTTP request: %s", (exc,)
        elif _started_on_a_lost_connection(exc):
            record.msg = "a request whose client hung up before it was handled"
            record.args = ()
        else:
            return True
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


async def serve(args, ready=None):
    logging.getLogger("aiohttp.server").addFilter(QuietBadRequests())
    server = Server(args)
    if args.access_log:
        runner = web.AppRunner(server.app(), access_log_class=AccessLog,
                               access_log=_access_logger(args.access_log))
    else:
        runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    # at shutdown the open requests end at once (the engine answers them 503), so the
    # handlers need little of aiohttp's grace period
    site = web.TCPSite(runner, args.host, args.port, shutdown_timeout=10.0)
    await site.start()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopping = []

    def stop():
        # this task cancelled, then its finally; later signals are ignored, as
        # cancelling the shutdown itself would leave the open requests unanswered
        if not stopping:
            stopping.append(True)
            task.cancel()
    # SIGINT too, instead of asyncio.run's handler, whose second Ctrl-C interrupts
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            loop.add_signal_handler(getattr(signal, name), stop)
    port = site._server.sockets[0].getsockname()[1]
    threads = server.engine.pool.stats().n_threads
    print("moas.server: %s (%s mode, %.0f MB pool, %d sequences, %d thread%s) on http://%s:%d/"
          % (server.model_id, args.mode, args.pool_mb, args.max_sequences, threads,
             "" if threads == 1 else "s", args.host, port), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        # every open request answered first (503; a stream gets an error event and
        # [DONE]), new ones refused alike, then the handlers, all ending, waited for
        await loop.run_in_executor(None, server.engine.close)
        await runner.cleanup()


def main(argv=None):
    if web is None:
        sys.exit("moas.server needs aiohttp: apt-get install python3-aiohttp "
                 "(or pip install 'moas[server]')")
    args = parse_args(argv)
    if hasattr(signal, "SIGUSR1"):   # kill -USR1 PID: every thread's stack on stderr
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        asyncio.run(serve(args))
    except (KeyboardInterrupt, asyncio.CancelledError):   # Ctrl-C, SIGTERM
        pass
    except (MoasError, OSError) as e:
        sys.exit("moas.server: %s" % e)


if __name__ == "__main__":
    main()
