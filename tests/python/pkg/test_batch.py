"""Model.generate_batch: many prompts through one KV pool and batched decode, each
result equal to Model.generate alone (the invariant the library holds bit for bit),
and every bad input refused before anything runs. Run by `make pytest`."""
import gc
import os
import sys
import threading
import time

import pytest

from conftest import ROOT
import moas
import moas.engine

MODEL = os.path.join(ROOT, "tests", "data", "tiny-pooled-bias.gguf")        # 64 context
MODERN = os.path.join(ROOT, "tests", "data", "tiny-modern-pooled-nobias.gguf")   # RoPE, 64
PROMPTS = ["And God said, ", "In the beginning", "And the earth was ",
           "And it came to pass, when", "Let there be light"]


@pytest.fixture(scope="module")
def model():
    with moas.Model(MODEL) as m:
        yield m


def alone(model, prompt, max_tokens, seed, **kw):
    """Model.generate's text and finish reason for one prompt."""
    gen = model.generate(prompt, max_tokens, seed=seed, stream=True, **kw)
    text = "".join(gen)
    return text, gen.finish_reason


@pytest.mark.parametrize("kw", [
    dict(mode="routed"),
    dict(mode="mixture", kv_type="f16"),
    dict(mode="routed", forced_scheme=1, top_k=8, repeat_penalty=1.2, min_p=0.05),
])
def test_every_choice_is_what_generate_gives_alone(model, kw):
    out = model.generate_batch(PROMPTS, 30, n=3, seed=7, n_threads=2, **kw)
    assert [c.prompt for c in out] == PROMPTS
    for prompt, completion in zip(PROMPTS, out):
        assert completion.prompt_tokens == len(model.tokenize(prompt))
        assert len(completion.choices) == 3
        for i, choice in enumerate(completion.choices):
            text, reason = alone(model, prompt, 30, 7 + i, n_threads=2, **kw)
            assert (choice.text, choice.finish_reason) == (text, reason)
            assert choice.n_tokens == 30
        assert completion.text == completion.choices[0].text
    # the choices of a prompt differ (seed + i), so a choice is not its sibling's copy
    assert len({c.text for c in out[0].choices}) == 3


def test_stop_strings_and_a_full_context_end_as_alone(model):
    # "dd" and "G" stop most texts early; n_ctx 32 ends the rest at the context's end
    out = model.generate_batch(PROMPTS, 200, seed=3, stop=["dd", "G"], n_ctx=32,
                               mode="routed")
    reasons = set()
    for prompt, completion in zip(PROMPTS, out):
        text, reason = alone(model, prompt, 200, 3, stop=["dd", "G"], n_ctx=32,
                             mode="routed")
        assert (completion.text, completion.choices[0].finish_reason) == (text, reason)
        reasons.add(reason)
    assert reasons == {"stop", "length"}
    full = [c for c in out if c.choices[0].finish_reason == "length"]
    assert full and all(c.prompt_tokens + c.choices[0].n_tokens == 32 for c in full)


def test_include_stop_and_min_tokens(model):
    plain = model.generate_batch(PROMPTS, 40, seed=5, mode="routed")
    out = model.generate_batch(PROMPTS, 40, seed=5, mode="routed", stop=["d"],
                               include_stop=True, min_tokens=3)
    stopped = 0
    for p, c in zip(plain, out):
        # the text runs to the first "d" that starts after its first 3 characters, the
        # "d" kept; a text without one runs to max_tokens
        cut = p.text.find("d", 3)
        if cut < 0:
            assert (c.text, c.choices[0].finish_reason) == (p.text, "length")
            continue
        assert (c.text, c.choices[0].finish_reason) == (p.text[:cut + 1], "stop")
        stopped += 1
    assert stopped >= 3
    numpy = pytest.importorskip("numpy")   # its bools are no Python bools, yet bools
    for flag in (numpy.bool_(True), numpy.array([True, False])[1]):
        again = model.generate_batch(PROMPTS, 40, seed=5, mode="routed", stop=["d"],
                                     include_stop=flag, min_tokens=3)
        # without the stop string, a stopped text loses its last character, the "d"
        assert [c.text for c in again] == [
            c.text[:-1] if not flag and c.choices[0].finish_reason == "stop" else c.text
            for c in out]


def test_a_small_pool_makes_prompts_wait_and_swap_and_changes_no_text(model):
    # 160 KB of pages hold a few of the 15 sequences at once: the rest wait for room,
    # and sequences that outgrow the pool are swapped out and back
    prompts = PROMPTS * 3
    out = model.generate_batch(prompts, 40, seed=11, mode="mixture", pool_bytes=160 << 10)
    want = model.generate_batch(prompts, 40, seed=11, mode="mixture")
    assert [c.text for c in out] == [c.text for c in want]
    for prompt, completion in zip(prompts[:5], out[:5]):
        assert completion.text == alone(model, prompt, 40, 11, mode="mixture")[0]


def test_context_shift_goes_past_the_context_as_alone():
    with moas.Model(MODERN) as m:
        prompts = ["And God said, Let there be light", "In the beginning God"]
        out = m.generate_batch(prompts, 100, seed=2, mode="routed", context_shift=True)
        for prompt, completion in zip(prompts, out):
            text, reason = alone(m, prompt, 100, 2, mode="routed", context_shift=True)
            assert (completion.text, completion.choices[0].finish_reason) == (text, reason)
            assert completion.choices[0].n_tokens == 100 > 64
        with pytest.raises(moas.MoasValueError, match="RoPE"):
            moas.Model(MODEL).generate_batch(prompts, 10, context_shift=True)


def test_no_prompts_no_work(model):
    assert model.generate_batch([], 10) == []


def test_bad_input_is_refused_before_anything_runs(model):
    threads = threading.active_count()
    with pytest.raises(TypeError, match="list of prompts"):
        model.generate_batch("And God", 10)
    with pytest.raises(TypeError, match="prompt 1 is int"):
        model.generate_batch(["And", 5], 10)
    with pytest.raises(moas.MoasValueError, match="prompt 1 is empty"):
        model.generate_batch(["And", ""], 10)
    with pytest.raises(moas.MoasValueError, match="prompt 2 is 200 characters, the "
                                                  "context holds 64"):
        model.generate_batch(["And", "God", "a" * 200], 10)
    with pytest.raises(moas.MoasValueError) as e:
        model.generate_batch(["And", "God Z"], 10)
    assert e.value.status == moas.Status.ERR_UNKNOWN_CHAR
    assert e.value.message.startswith("prompt 1: ") and "'Z'" in e.value.message
    # text that no UTF-8 stands for (a lone surrogate) is ERR_INVALID_UTF8, as in
    # generate, naming the prompt too
    with pytest.raises(moas.MoasValueError, match="prompt 1: text has a lone surrogate "
                       "U[+]D800 at index 3") as e:
        model.generate_batch(["And", "God\ud800"], 10, unknown="replace")
    assert e.value.status == moas.Status.ERR_INVALID_UTF8
    with pytest.raises(moas.MoasValueError):
        model.generate_batch(["And"], 10, temperature=-1)
    for name, value in (("max_tokens", -1), ("n", 0), ("min_tokens", -2)):
        with pytest.raises(moas.MoasValueError, match="%s must be >= " % name):
            model.generate_batch(["And"], **{"max_tokens": 10, name: value})
    for value in (1, "no", None):   # not a bool: "no" would have kept the stop strings
        with pytest.raises(TypeError, match="include_stop must be a bool"):
            model.generate_batch(["And"], 10, include_stop=value)
    with pytest.raises(TypeError, match="prompt 1: include_stop must be a bool"):
        model.generate_batch(["And", "God"], 10, per_prompt=[None, {"include_stop": 0}])
    with pytest.raises(moas.MoasError) as e:
        model.generate_batch(["And", "And God said, let there be light"], 90,
                             pool_bytes=16 << 10, mode="mixture")
    assert e.value.status == moas.Status.ERR_POOL_FULL
    assert "prompt 0 " in e.value.message and "pool_bytes" in e.value.message
    assert threading.active_count() == threads   # no engine thread left behind


def test_batch_generate_bench_reports_equal_texts(tmp_path):
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "batch_generate_bench.py"),
                          "-m", MODEL, "--prompts", "3", "--prompt-chars", "10",
                          "--max-tokens", "8", "--rounds", "2", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=120)
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert report["same_text"] is True and len(report["rounds"]) == 2
    assert all(r["chars"] == 24 and r["batch_chars_s"] > 0 for r in report["rounds"])
    # prompts after a shared beginning: read once, each prompt's cached_tokens its length
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "batch_generate_bench.py"),
                          "-m", MODEL, "--prompts", "3", "--prompt-chars", "5",
                          "--shared-chars", "20", "--max-tokens", "4", "--rounds", "1",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, timeout=120)
    assert out.returncode == 0, out.stdout
    report = json.loads(out.stdout)
    assert report["same_text"] is True and report["rounds"][0]["cached_tokens"] >= 3 * 20
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "batch_generate_bench.py"),
                          "-m", MODEL, "--prompts", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    assert bad.returncode == 2 and "--prompts must be at least 1" in bad.stdout


def finishes(fn):
    """fn()'s exception or result, from a thread of its own: a call that never returns
    fails the test instead of hanging the suite (60 s is no timing, only a hang)."""
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the call never returned"
    return out


@pytest.mark.parametrize("name, value, error", [
    ("step_prefill", 0, moas.MoasValueError),     # no prompt would ever be read
    ("prefill_chunk", 0, moas.MoasValueError),
    ("prefill_chunk", -1, moas.MoasValueError),
    ("max_sequences", 0, moas.MoasValueError),
    ("max_sequences", None, TypeError),           # the engine thread would die on it
    ("max_sequences", 2.5, TypeError),
    ("prompt_cache", None, TypeError),
    ("prompt_cache", -1, moas.MoasValueError),
    ("pool_bytes", None, TypeError),              # named as the caller knows it
    ("pool_bytes", 1.5e6, TypeError),
])
def test_engine_sizes_are_refused_before_anything_runs(model, name, value, error):
    threads = threading.active_count()
    out = finishes(lambda: model.generate_batch(["And", "God"], 5, **{name: value}))
    assert isinstance(out.get("error"), error), out
    assert name in str(out["error"])
    assert threading.active_count() == threads


def test_stop_strings_are_taken_and_refused_as_generate_takes_them(model):
    # one bytes stop string is one string, as in Model.generate, not its byte values
    out = model.generate_batch(PROMPTS, 40, seed=3, stop=b"dd", mode="routed")
    for prompt, completion in zip(PROMPTS, out):
        assert (completion.text, completion.choices[0].finish_reason) == \
            alone(model, prompt, 40, 3, stop=b"dd", mode="routed")
    # what find_stop refuses is refused before anything runs, as the error generate
    # gives at its first character, not as an internal error of every prompt after it
    with pytest.raises(ValueError, match="NUL"):
        model.generate_batch(["And", "God"], 5, stop=["a\0"])
    with pytest.raises(TypeError):
        model.generate_batch(["And", "God"], 5, stop=["d", 5])


def test_an_n_too_large_for_the_pool_is_refused_before_any_memory_is_taken():
    # n = 2^31 - 1 choices cannot fit any pool: ERR_POOL_FULL, before the lists that
    # would hold their texts (64 GiB and more) are made. Under a 3 GiB address space,
    # so that making them fails fast with MemoryError instead of taking the machine's
    # memory.
    import subprocess
    import sys
    code = ("import resource, moas\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "m = moas.Model(%r)\n"
            "try:\n"
            "    m.generate_batch(['And'], 5, n=2**31 - 1)\n"
            "except moas.MoasError as e:\n"
            "    print(e.status.name, 'prompt 0 ' in e.message)\n" % MODEL)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bindings", "python"))
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, timeout=120,
                         env=env)
    assert out.stdout.strip() == "ERR_POOL_FULL True", out.stdout


def test_a_seed_whose_last_choice_overflows_is_refused_before_anything_runs(model,
                                                                           monkeypatch):
    # choice i samples with seed + i: the last one's seed must be a uint64 as well
    import moas.engine
    made = []
    monkeypatch.setattr(moas.engine.Engine, "__init__",
                        lambda self, *a, **kw: made.append(1) or pytest.fail("ran"))
    with pytest.raises(moas.MoasValueError, match="seed 18446744073709551616 is outside"):
        model.generate_batch(["And", "God"], 5, n=2, seed=2**64 - 1)
    assert made == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_thread_that_dies_ends_the_call_with_an_error(model, monkeypatch):
    # a bug that kills the engine thread (here: _reap raises, in the step and again in
    # its recovery) must not leave the caller waiting forever
    import moas.engine

    def broken(self):
        raise RuntimeError("broken on purpose")
    monkeypatch.setattr(moas.engine.Engine, "_reap", broken)
    threads = threading.active_count()
    out = finishes(lambda: model.generate_batch(["And", "God"], 5))
    assert isinstance(out.get("error"), moas.MoasError), out
    assert out["error"].status == moas.Status.ERR_INTERNAL
    assert threading.active_count() == threads


def test_a_failure_while_running_keeps_the_library_status(model, monkeypatch):
    # Model.generate would raise the library's own status; so does the batch, naming
    # the first prompt that failed (not MoasValueError(ERR_INVALID_ARG) for all)
    def sample(self, logits):
        raise moas.MoasError(moas.Status.ERR_NO_MEMORY, "no memory, on purpose")
    monkeypatch.setattr(moas.Sampler, "sample", sample)
    with pytest.raises(moas.MoasError) as e:
        model.generate_batch(["And", "God"], 5)
    assert e.value.status == moas.Status.ERR_NO_MEMORY
    assert not isinstance(e.value, ValueError)
    assert e.value.message.startswith("prompt 0: no memory, on purpose")


def test_the_engine_is_handed_a_window_of_prompts_not_all_of_them(model, monkeypatch):
    # each submit walks the requests waiting, as does each step's queue pass: all N
    # prompts handed over at once cost N^2 (16,000 prompts: 8 s of submit alone). The
    # engine holds fewer than 2 x max_sequences of them at a time, topped up as they end.
    import moas.engine
    seen = []
    submit = moas.engine.Engine.submit

    def counting(self, req):
        with self._lock:
            seen.append(len(self._incoming) + len(self._waiting))
        return submit(self, req)
    monkeypatch.setattr(moas.engine.Engine, "submit", counting)
    prompts = PROMPTS * 40
    out = model.generate_batch(prompts, 3, seed=1, max_sequences=4, mode="routed")
    # and four requests of their own that read a beginning the copies share: four of
    # the five prompts are 16 characters or more (shared_beginnings)
    assert len(seen) == len(prompts) + 4 and max(seen) < 2 * 4
    want = {p: alone(model, p, 3, 1, mode="routed")[0] for p in PROMPTS}
    assert [c.text for c in out] == [want[p] for p in prompts]


def test_per_prompt_settings_give_each_prompt_generate_s_text_with_its_own(model):
    # vLLM takes a SamplingParams per prompt; here a dict per prompt over the call's own
    own = [None,
           dict(max_tokens=12, seed=40, temperature=0.0),
           dict(n=3, top_k=4, stop=["d"], include_stop=True),
           dict(repeat_penalty=1.3, repeat_last_n=8, logit_bias={5: 2.0}, min_p=0.1),
           dict(stop="dd", min_tokens=2, presence_penalty=0.5)]
    out = model.generate_batch(PROMPTS, 25, seed=6, mode="routed", per_prompt=own)
    for prompt, completion, args in zip(PROMPTS, out, own):
        args = dict(args or {})
        n = args.pop("n", 1)
        assert len(completion.choices) == n
        max_tokens = args.pop("max_tokens", 25)
        seed = args.pop("seed", 6)
        include_stop = args.pop("include_stop", False)
        min_tokens = args.pop("min_tokens", 0)
        for i, choice in enumerate(completion.choices):
            if include_stop or min_tokens:   # generate has neither: the same call alone
                want = model.generate_batch([prompt], max_tokens, seed=seed, mode="routed",
                                            per_prompt=[own[PROMPTS.index(prompt)]])
                assert choice == want[0].choices[i]
                continue
            text, reason = alone(model, prompt, max_tokens, seed + i, mode="routed", **args)
            assert (choice.text, choice.finish_reason) == (text, reason)
    assert out[1].choices[0].n_tokens == 12
    # the third prompt's choices end at a "d", kept
    assert all(c.text.endswith("d") and c.finish_reason == "stop" for c in out[2].choices)


def test_per_prompt_settings_are_checked_and_named_before_anything_runs(model):
    with pytest.raises(moas.MoasValueError, match="per_prompt has 1 entries for 2 prompts"):
        model.generate_batch(["And", "God"], 5, per_prompt=[None])
    with pytest.raises(TypeError, match="per_prompt 1 is int, not a dict"):
        model.generate_batch(["And", "God"], 5, per_prompt=[None, 3])
    with pytest.raises(TypeError, match="per_prompt 0: 'mode' is none of max_tokens"):
        model.generate_batch(["And", "God"], 5, per_prompt=[dict(mode="routed"), None])
    with pytest.raises(moas.MoasValueError, match="prompt 1: n must be >= 1, got 0"):
        model.generate_batch(["And", "God"], 5, per_prompt=[None, dict(n=0)])
    with pytest.raises(moas.MoasValueError, match="^.*prompt 1: .*temperature"):
        model.generate_batch(["And", "God"], 5, per_prompt=[None, dict(temperature=-2)])
    with pytest.raises(ValueError, match="prompt 0: "):
        model.generate_batch(["And", "God"], 5, per_prompt=[dict(stop=["a\0"]), None])
    with pytest.raises(moas.MoasError) as e:
        model.generate_batch(["And", "God"], 5, pool_bytes=24 << 10, mode="mixture",
                             per_prompt=[None, dict(n=40, max_tokens=60)])
    assert e.value.status == moas.Status.ERR_POOL_FULL and "prompt 1 " in e.value.message


def log_softmax(row):
    import math
    top = max(row)
    norm = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - norm for x in row]


def test_logprobs_are_the_model_s_own_for_every_character(model):
    out = model.generate_batch(PROMPTS[:3], 12, n=2, seed=8, mode="routed", logprobs=3,
                               temperature=0.7, top_k=5,
                               per_prompt=[None, dict(logprobs=0), dict(logprobs=None)])
    assert out[2].choices[0].logprobs is None
    for completion in out[:2]:
        k = 3 if completion is out[0] else 0
        for choice in completion.choices:
            assert len(choice.logprobs) == len(choice.text) == 12
            # the same text decoded by a context alone: the softmax of its raw logits
            with model.context(mode="routed") as ctx:
                row = list(ctx.decode_batch(model.tokenize(completion.prompt)))
                for ch, (lp, top) in zip(choice.text, choice.logprobs):
                    want = log_softmax(row)
                    token = model.tokenize(ch)[0]
                    assert abs(lp - want[token]) < 1e-9
                    likeliest = sorted(range(len(row)), key=lambda t: -row[t])[:k]
                    if token not in likeliest:
                        likeliest.append(token)
                    assert [c for c, _ in top] == [model.vocab[t] for t in likeliest]
                    assert all(abs(p - want[t]) < 1e-9 for (_, p), t in zip(top, likeliest))
                    row = list(ctx.decode(token))
    with pytest.raises(moas.MoasValueError, match="logprobs must be in \\[0, 47\\]"):
        model.generate_batch(["And"], 5, logprobs=48)


def test_shared_beginnings_are_runs_of_sorted_prompts():
    from moas.engine import shared_beginnings
    a = list(range(20))
    ids = [a + [1], [5] * 30, a + [2, 3], a[:15] + [9], a + [1], [5] * 17 + [0]]
    # prompts 0, 2 and 4 share 20 tokens; 1 and 5 share 17; 3 shares only 15
    assert shared_beginnings(ids, 8) == [(a, [0, 2, 4]), ([5] * 17, [1, 5])]
    assert shared_beginnings(ids, 1) == [(a, [0, 2, 4])]   # the larger saving first
    assert shared_beginnings(ids, 0) == [] and shared_beginnings([], 8) == []


def test_a_beginning_prompts_share_is_read_once_and_changes_no_text(model):
    # eight prompts that begin with the same 30 characters, two that do not: the
    # beginning is read once, by a request of its own, and each of the eight takes it
    # from the prompt cache (cached_tokens); the texts are generate's alone
    shared = "And God said, Let there be lig"
    prompts = [shared + s for s in ("ht", " a", "ved", "ning", ": and", "s", "e", "h")]
    prompts += ["In the beginning", "Let there be light"]
    out = model.generate_batch(prompts, 20, seed=12, mode="routed", n=2)
    for prompt, completion in zip(prompts, out):
        for i, choice in enumerate(completion.choices):
            assert choice.text == alone(model, prompt, 20, 12 + i, mode="routed")[0]
    assert [c.cached_tokens for c in out[:8]] == [len(shared)] * 8
    assert [c.cached_tokens for c in out[8:]] == [0, 0]
    plain = model.generate_batch(prompts, 20, seed=12, mode="routed", n=2, prompt_cache=0)
    assert [c.choices for c in plain] == [c.choices for c in out]
    assert [c.cached_tokens for c in plain] == [0] * 10


def test_a_shared_beginning_is_still_cached_when_its_prompts_go(model):
    # other prompts in the batch, listed before or after, must not end (each entering
    # the prompt cache) between the beginning's read and its prompts' turn: they would
    # push it out, and each of the eight would read it again
    shared = "And God said, Let there be lig"
    members = [shared + s for s in ("ht", " a", "ved", "ning", ": and", "s", "e", "h")]
    others = ["And %s" % w for w in ("he", "she", "the", "was", "it", "God", "man",
                                     "on", "in", "be", "so", "as")]
    for prompts in (others + members, members + others):
        out = model.generate_batch(prompts, 4, seed=1, mode="routed", max_sequences=4)
        assert [c.cached_tokens for c in out if c.prompt in members] == [len(shared)] * 8
        plain = model.generate_batch(prompts, 4, seed=1, mode="routed", max_sequences=4,
                                     prompt_cache=0)
        assert [c.choices for c in out] == [c.choices for c in plain]


@pytest.mark.parametrize("max_sequences", [1, 2, 64])
def test_each_of_prompt_cache_beginnings_is_read_once(model, max_sequences):
    # two beginnings, a cache of two: one's prompts, ending while the other's still
    # wait, must not push the other out of the cache (one sequence at a time: three of
    # its four prompts read it again)
    a, b = "And God said, Let there be lig", "In the beginning God created th"
    prompts = [a + s for s in "htsa"] + [b + s for s in "eaio"]
    out = model.generate_batch(prompts, 4, seed=1, mode="routed", prompt_cache=2,
                               max_sequences=max_sequences)
    assert [c.cached_tokens for c in out] == [len(a)] * 4 + [len(b)] * 4
    plain = model.generate_batch(prompts, 4, seed=1, mode="routed", prompt_cache=0)
    assert [c.choices for c in out] == [c.choices for c in plain]


def test_on_result_hears_each_prompt_as_it_ends(model):
    # as each prompt ends, on the caller's thread, with what the call then returns
    heard = []
    caller = threading.get_ident()

    def on_result(k, completion):
        assert threading.get_ident() == caller
        heard.append((k, completion))
    out = model.generate_batch(PROMPTS * 2, 15, seed=4, mode="routed", max_sequences=3,
                               n=2, on_result=on_result)
    assert sorted(k for k, _ in heard) == list(range(len(PROMPTS) * 2))
    assert all(out[k] == completion for k, completion in heard)
    # what it raises ends the call there, every page and thread given back
    threads = threading.active_count()

    def stop_at_the_second(k, completion, seen=[]):
        seen.append(k)
        if len(seen) == 2:
            raise KeyboardInterrupt("enough")
    with pytest.raises(KeyboardInterrupt, match="enough"):
        model.generate_batch(PROMPTS * 4, 30, seed=4, max_sequences=2,
                             on_result=stop_at_the_second)
    assert threading.active_count() == threads
    with pytest.raises(TypeError, match="on_result is int, not a function"):
        model.generate_batch(PROMPTS, 5, on_result=3)


def test_generate_batch_iter_yields_each_result_as_it_ends(model):
    # the results of generate_batch, as (index, completion) in the order the prompts
    # end: a prompt of 2 characters to make ends before those of 40 that share the pool
    per_prompt = [None, {"max_tokens": 2}, None, None, None]
    kw = dict(seed=7, mode="routed", max_sequences=5, per_prompt=per_prompt)
    whole = model.generate_batch(PROMPTS, 40, **kw)
    got = list(model.generate_batch_iter(PROMPTS, 40, **kw))
    assert got[0][0] == 1
    assert sorted(k for k, _ in got) == list(range(len(PROMPTS)))
    assert all(whole[k] == completion for k, completion in got)
    assert list(model.generate_batch_iter([], 5)) == []


def test_generate_batch_iter_checks_before_anything_runs_and_stops_when_left(model):
    threads = threading.active_count()
    with pytest.raises(moas.MoasValueError, match="prompt 1 is empty"):
        model.generate_batch_iter(["And", ""], 10)   # at the call, not at next()
    with pytest.raises(moas.MoasValueError):
        model.generate_batch_iter(["And"], 10, temperature=-1)
    with pytest.raises(TypeError, match="no on_result"):
        model.generate_batch_iter(["And"], 10, on_result=print)
    late = model.generate_batch_iter(["And"], 10, kv_type="f8")   # the engine's: at next()
    with pytest.raises(moas.MoasValueError, match="f8"):
        next(late)
    results = model.generate_batch_iter(PROMPTS * 4, 30, max_sequences=2)
    assert threading.active_count() == threads   # nothing runs before the first next()
    for _ in results:   # left after the first: closed, every page and thread given back
        break
    assert threading.active_count() == threads + 1   # still held: it runs until closed
    results.close()
    assert threading.active_count() == threads
    for _ in model.generate_batch_iter(PROMPTS * 4, 30, max_sequences=2):
        break   # the iterator dropped without close(): collected, the same
    assert threading.active_count() == threads


def test_generate_batch_iter_raises_where_a_failing_prompt_ends(model, monkeypatch):
    # the results before it came; the failing prompt raises its own status, naming it
    real_init, real_sample = moas.Sampler.__init__, moas.Sampler.sample

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.failing = kw.get("seed") == 99

    def sample(self, logits):
        if getattr(self, "failing", False):
            raise moas.MoasError(moas.Status.ERR_NO_MEMORY, "no memory, on purpose")
        return real_sample(self, logits)
    monkeypatch.setattr(moas.Sampler, "__init__", init)
    monkeypatch.setattr(moas.Sampler, "sample", sample)
    threads = threading.active_count()
    per_prompt = [{"max_tokens": 1}, {"seed": 99}, {"max_tokens": 1}]
    results = model.generate_batch_iter(["And", "God", "said"], 20, per_prompt=per_prompt,
                                        max_sequences=1)
    seen = []
    with pytest.raises(moas.MoasError) as e:
        for k, completion in results:
            seen.append(k)
    assert seen == [0]
    assert e.value.status == moas.Status.ERR_NO_MEMORY
    assert e.value.message.startswith("prompt 1: no memory, on purpose")
    assert threading.active_count() == threads


def test_generate_batch_iter_collected_on_the_engine_thread_gives_everything_back(
        model, monkeypatch):
    # an iterator left in a reference cycle is finalised by whichever thread collects
    # it, here the engine's own as it goes idle: its close cannot join that thread
    pools, unraisable = [], []

    class RecordedPool(moas.Pool):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            pools.append(self)
    monkeypatch.setattr(moas.engine, "Pool", RecordedPool)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    # the engine kept busy (its collection comes as it goes idle) until the iterator
    # is garbage: prompt 1, admitted once prompt 0 is done, samples only then
    real_init, real_sample = moas.Sampler.__init__, moas.Sampler.sample
    dropped = threading.Event()

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        self.held = kw.get("seed") == 99

    def sample(self, logits):
        if getattr(self, "held", False):
            dropped.wait(10)
        return real_sample(self, logits)
    monkeypatch.setattr(moas.Sampler, "__init__", init)
    monkeypatch.setattr(moas.Sampler, "sample", sample)
    threads = threading.active_count()
    gc.disable()   # no collection on this thread: the engine's comes first
    try:
        results = model.generate_batch_iter(["And", "God"], 5, max_sequences=1,
                                            per_prompt=[{"max_tokens": 1}, {"seed": 99}])
        assert next(results)[0] == 0
        cycle = [results]
        cycle.append(cycle)
        del cycle, results
        dropped.set()
        deadline = time.monotonic() + 10
        while threading.active_count() != threads and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gc.enable()
    assert [u.exc_value for u in unraisable] == []
    assert threading.active_count() == threads
    assert [pool.closed for pool in pools] == [True]
