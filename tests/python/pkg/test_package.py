"""The Python package: pip install offline, library lookup of the installed package,
and the high-level API (generate, perplexity, numpy logits, plain-list routes, errors
as ValueError / FileNotFoundError). Run by `make pytest` (part of `make test`)."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
import moas

MODEL = os.path.join(ROOT, "tests", "data", "tiny-moas-bias.gguf")
TEXT = "And God said, Let there be light: and there was light."


@pytest.fixture(scope="module")
def model():
    with moas.Model(MODEL) as m:
        yield m


def test_pip_install_offline_and_pkg_config_lookup(tmp_path):
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("pip", "setuptools", "wheel")):
        pytest.skip("pip, setuptools or wheel missing (python3-pip, python3-setuptools, python3-wheel)")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                    "--no-index", "--no-deps", "--target", str(target),
                    os.path.join(ROOT, "bindings", "python")], check=True,
                   cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert (target / "moas" / "__init__.py").is_file()
    assert (target / "moas" / "server.py").is_file()
    assert (target / "moas" / "engine.py").is_file()
    assert (target / "moas" / "static" / "index.html").is_file()
    # the installed package finds libmoas through pkg-config when MOAS_LIBRARY is unset
    pc = tmp_path / "pc"
    pc.mkdir()
    (pc / "moas.pc").write_text("libdir=%s\nName: moas\nDescription: t\nVersion: 1.1.0\n"
                                "Libs: -L${libdir} -lmoas\n" % os.path.join(ROOT, "lib"))
    env = {k: v for k, v in os.environ.items() if k != "MOAS_LIBRARY"}
    env.update(PYTHONPATH=str(target), PKG_CONFIG_PATH=str(pc))
    code = ("import moas; print(moas.__file__); print(moas.library_path()); "
            "print(moas.Model(%r).generate('And God', 8, temperature=0))" % MODEL)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(tmp_path), check=True,
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.split("\n")
    assert out[0].startswith(str(target))
    assert os.path.realpath(out[1]) == os.path.realpath(os.path.join(ROOT, "lib", "libmoas.so.1"))
    assert len(out[2]) == 8


def test_version_matches_header():
    with open(os.path.join(ROOT, "include", "moas.h")) as f:
        header = re.search(r'#define MOAS_VERSION_STRING "([^"]+)"', f.read()).group(1)
    with open(os.path.join(ROOT, "bindings", "python", "pyproject.toml")) as f:
        assert 'version = "%s"' % header in f.read()
    assert moas.version_string() == header


def test_generate_greedy_is_decode_and_argmax(model):
    text = model.generate("And God", 12, temperature=0)
    ids = model.tokenize("And God")
    with model.context() as ctx:
        logits = ctx.decode_batch(ids)
        want = []
        for _ in range(12):
            t = max(range(model.n_vocab), key=lambda i: logits[i])
            want.append(t)
            logits = ctx.decode(t)
    assert text == model.detokenize(want)


def test_default_temperature_is_the_library_s(model):
    # one default everywhere: the library's (moas_sampler_params_init, 1), which Sampler
    # and `moas generate` use too
    assert model.generate("And God", 20, seed=7) == model.generate("And God", 20, seed=7,
                                                                    temperature=1.0)


def test_stream_equals_whole_and_routes_are_lists(model):
    whole = model.generate("And God", 20, temperature=0.9, seed=7)
    pieces = list(model.generate("And God", 20, temperature=0.9, seed=7, stream=True))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == whole
    text, routes = model.generate("And God", 20, temperature=0.9, seed=7, routes=True)
    assert text == whole and len(routes) == len(text)
    for r in routes:
        assert type(r["schemes"]) is list and len(r["schemes"]) == model.n_layer
        assert all(0 <= s < model.n_scheme for s in r["schemes"])
        assert len(r["gates"]) == model.n_layer
        assert all(abs(sum(g) - 1) < 1e-4 for g in r["gates"])
    streamed = list(model.generate("And God", 20, temperature=0.9, seed=7, stream=True,
                                   routes=True))
    assert [p[0] for p in streamed] == list(whole) and [p[1] for p in streamed] == routes


def test_generation_stops_at_the_first_stop_string_written(model):
    # as OpenAI's API, vLLM and llama.cpp stop: once a stop string has been written,
    # even while a longer one that began a character earlier might still complete
    whole = model.generate("And God", 30, temperature=0)
    k = next(k for k in range(1, len(whole) - 2) if whole[k] not in whole[:k])
    longer, short = whole[k - 1:k + 2], whole[k]   # the longer one completes next
    assert model.generate("And God", 30, temperature=0, stop=[longer, short]) == whole[:k]
    # one character past the prompt for each of the k + 1 written, none beyond
    done = model.generate_batch(["And God"], 30, temperature=0, stop=[longer, short])[0]
    assert (done.text, done.choices[0].finish_reason) == (whole[:k], "stop")
    assert done.choices[0].n_tokens == k + 1


def test_stop_strings_and_context_end(model):
    whole = model.generate("And God", 30, temperature=0.9, seed=3)
    stop = whole[10:12]
    cut = model.generate("And God", 30, temperature=0.9, seed=3, stop=[stop])
    assert cut == whole[:whole.index(stop)]
    # generation ends when the context is full (64 for the tiny model)
    assert len(model.generate("And God", 500, temperature=0)) == model.n_ctx_train - 7
    # and says why it ended, once its last piece is out: a stop string, or a length
    # (max_tokens, or the full context); None before
    for kw, text, reason in ((dict(stop=[stop]), cut, "stop"), ({}, whole, "length"),
                             (dict(stop=["#"]), whole, "length")):
        gen = model.generate("And God", 30, temperature=0.9, seed=3, stream=True, **kw)
        assert isinstance(gen, moas.Generation) and gen.finish_reason is None
        assert next(gen) == text[0] and gen.finish_reason is None
        assert text[0] + "".join(gen) == text and gen.finish_reason == reason
    full = model.generate("And God", 500, temperature=0, stream=True)
    assert len("".join(full)) == model.n_ctx_train - 7 and full.finish_reason == "length"
    empty = model.generate("And God", 0, stream=True)
    assert list(empty) == [] and empty.finish_reason == "length"
    # closed early, after a piece or before any: its context and sampler go at once,
    # and no reason is made up
    for pieces_read in (1, 0):
        early = model.generate("And God", 30, seed=3, stream=True)
        for _ in range(pieces_read):
            next(early)
        early.close()
        assert all(obj.closed for obj in early._owned), pieces_read
        assert early.finish_reason is None and list(early) == []


@pytest.mark.parametrize("path", ["models/pooled-rope-kjv-1k.gguf", "tests/data/tiny-moas-bias.gguf"])
def test_context_shift_goes_on_as_the_cli_does(path):
    # past a full context: a RoPE model's cache is shifted, a learned-position model's
    # last half decoded again; the text is `moas generate`'s, character for character
    prompt, n = "And God said, Let there be light", 120
    with moas.Model(os.path.join(ROOT, path)) as m:
        ends = m.generate(prompt, n, n_ctx=48, temperature=0.8, seed=5)
        assert len(ends) == 48 - len(prompt)   # without it: the context's end
        text = m.generate(prompt, n, n_ctx=48, temperature=0.8, seed=5, context_shift=True)
        assert text.startswith(ends) and len(text) == n
    out = subprocess.run([os.path.join(ROOT, "bin", "moas"), "generate", "-m",
                          os.path.join(ROOT, path), "-p", prompt, "-n", str(n), "-c", "48",
                          "--temp", "0.8", "--seed", "5", "--no-warmup"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, check=True)
    assert out.stdout == prompt + text + "\n"
    assert ("context shift" in out.stderr) == ("rope" in path)


def test_perplexity_matches_cli(model, tmp_path):
    with open(os.path.join(ROOT, "tests", "data", "tiny.txt"), encoding="utf-8") as f:
        text = f.read()[:300]
    p = model.perplexity(text)
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    out = subprocess.run([os.path.join(ROOT, "bin", "moas"), "perplexity", "-m", MODEL, "-f",
                          str(tmp_path / "t.txt")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True, check=True).stdout
    assert "%.4f" % p.perplexity == re.search(r"perplexity\s+([\d.]+)", out).group(1)
    assert p.n_scored == int(re.search(r"\((\d+) scored", out).group(1))
    assert p.n_chars == 300 and p.n_changed == 0
    q = model.perplexity(text + "99", unknown="drop")
    assert q.n_changed == 2 and q.n_chars == 302
    # a sliding window, as `moas perplexity --stride S` (a RoPE model: any stride)
    rope = os.path.join(ROOT, "models", "pooled-rope-kjv-1k.gguf")
    with open(os.path.join(ROOT, "models", "kjv-heldout.txt"), encoding="utf-8") as f:
        long_text = f.read()[:700]
    (tmp_path / "l.txt").write_text(long_text, encoding="utf-8")
    with moas.Model(rope) as m:
        for n_ctx, stride in ((256, 64), (256, 256), (256, 0), (100, 7)):
            got = m.perplexity(long_text, n_ctx=n_ctx, stride=stride, mode="routed")
            cmd = [os.path.join(ROOT, "bin", "moas"), "perplexity", "-m", rope, "-f",
                   str(tmp_path / "l.txt"), "-c", str(n_ctx), "--mode", "routed", "--json"]
            cmd += ["--stride", str(stride)] if stride else []   # none: consecutive windows
            cli = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, check=True,
                                            universal_newlines=True).stdout)
            assert got.n_scored == cli["n_scored"], (n_ctx, stride)
            assert abs(got.nll - cli["nats_per_token"]) < 1e-6, (got, cli)
        assert m.perplexity(long_text, n_ctx=256, stride=64).n_scored == 699
        for bad in (-1, 257):
            with pytest.raises(moas.MoasValueError):
                m.perplexity(long_text, n_ctx=256, stride=bad)


def test_logits_numpy_and_zero_copy(model):
    np = pytest.importorskip("numpy")
    rows = model.logits(TEXT[:20])
    assert isinstance(rows, np.ndarray) and rows.shape == (20, model.n_vocab)
    assert rows.dtype == np.float32
    empty = model.logits("")   # was the list []
    assert isinstance(empty, np.ndarray) and empty.shape == (0, model.n_vocab)
    assert empty.dtype == np.float32
    with model.context() as ctx:
        view = ctx.decode_batch(model.tokenize(TEXT[:20]))
        arr = ctx.logits_array()
        assert arr.tolist() == list(view) == rows[-1].tolist()
        assert not arr.flags.writeable
        # the same memory as the library's buffer: no copy
        import ctypes
        assert arr.ctypes.data == ctypes.addressof(
            ctx._call("moas_context_logits").contents)


def test_errors_are_value_and_file_errors(model):
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        moas.Model("/no-such.gguf")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        model.generate("And God 9", 4)
    with pytest.raises(ValueError, match="mode must be one of"):
        model.generate("And God", 4, mode="sideways")
    with pytest.raises(ValueError, match="max_tokens"):
        model.generate("And God", -1)
    with pytest.raises(ValueError, match="context holds 64"):
        model.generate("A" * 65, 1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("And God", 4, temperature=-1)
    with pytest.raises(moas.MoasError) as e:
        model.generate("And God", 4, top_p=2)
    assert isinstance(e.value, ValueError) and e.value.status == moas.Status.ERR_INVALID_ARG
    # the generated text continues fine after the errors
    assert len(model.generate("And God 9", 4, unknown="replace")) == 4


def test_server_without_aiohttp_says_so():
    # the package imports without the server's dependency; the server names it
    code = ("import sys; sys.modules['aiohttp'] = None\n"
            "import moas, moas.server\n"
            "moas.server.main(['-m', 'x'])")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bindings", "python"))
    out = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True)
    assert out.returncode == 1 and "needs aiohttp" in out.stdout, out.stdout


def _with_embedding_row(scale):
    """The test model's bytes with the embedding of "A" (id 11) multiplied by `scale`."""
    with open(MODEL, "rb") as f:
        raw = bytearray(f.read())
    with moas.Model(MODEL) as m:
        emb = m.tensor("token_embd.weight")
        row = emb.offset + 11 * emb.shape[0] * 4
    first = memoryview(raw)[row:row + 4].cast("f")
    first[0] *= scale
    first.release()
    return bytes(raw)


def test_perplexity_refuses_logits_that_are_not_finite():
    # a NaN weight gave NaN logits, and perplexity summed them into a result of nan
    # where `moas perplexity` names the token
    with moas.Model.from_bytes(_with_embedding_row(float("nan"))) as bad:
        for stride in (0, 4):
            with pytest.raises(moas.MoasValueError, match="scoring token 1 of the text "
                               "are not finite"):
                bad.perplexity("And God", stride=stride, n_ctx=8)


def test_perplexity_beyond_the_largest_float_is_infinite(tmp_path):
    # logits 100 times as large: a finite mean of about 1100 nats, whose exp raised
    # OverflowError where `moas perplexity` prints inf
    with moas.Model(MODEL) as m:
        emb = m.tensor("token_embd.weight")
    with open(MODEL, "rb") as f:
        whole = memoryview(bytearray(f.read()))
    floats = whole[emb.offset:emb.offset + emb.n_bytes].cast("f")
    for i in range(len(floats)):
        floats[i] *= 100
    floats.release()
    (tmp_path / "big.gguf").write_bytes(whole)
    (tmp_path / "t.txt").write_text("And God said", encoding="utf-8")
    with moas.Model(str(tmp_path / "big.gguf")) as big:
        p = big.perplexity("And God said")
    out = subprocess.run([os.path.join(ROOT, "bin", "moas"), "perplexity", "-m",
                          str(tmp_path / "big.gguf"), "-f", str(tmp_path / "t.txt")],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    assert re.search(r"perplexity\s+inf\b", out), out
    assert p.perplexity == float("inf") and 709 < p.nll < float("inf")
    assert "%.4f" % p.nll == re.search(r"nats/token\s+([\d.]+)", out).group(1)
    # and --json stays JSON, which has no inf: the perplexity is null there
    out = subprocess.run([os.path.join(ROOT, "bin", "moas"), "perplexity", "-m",
                          str(tmp_path / "big.gguf"), "-f", str(tmp_path / "t.txt"), "--json"],
                         stdout=subprocess.PIPE, universal_newlines=True, check=True).stdout
    strict = json.loads(out, parse_constant=lambda name: pytest.fail("not JSON: " + name))
    assert strict["perplexity"] is None and 709 < strict["nats_per_token"] < float("inf")


def test_the_nul_character_of_a_vocabulary_is_text():
    # a vocabulary may hold U+0000, whose moas_token_text reads as "": token_text and
    # vocab gave "", and generate's text lost every NUL it generated (as `moas
    # generate` did before it took the byte from moas_detokenize)
    with open(MODEL, "rb") as f:
        data = bytearray(f.read())
    at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 16
    entry = data.index(b"\x01" + b"\x00" * 7 + b"(", at)   # "(" (id 2), 1 byte long
    data[entry + 8] = 0
    with moas.Model.from_bytes(bytes(data)) as m:
        assert m.token_text(2) == "\0" and m.vocab[2] == "\0"
        assert m.tokenize("A\0D") == [11, 2, 12]
        assert m.generate("And", 3, temperature=0, logit_bias={2: 100}) == "\0\0\0"
        text, routes = m.generate("And", 2, temperature=0, logit_bias={2: 100}, routes=True)
        assert text == "\0\0" and len(routes) == 2
