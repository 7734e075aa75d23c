"""Tests of bindings/python/moas (the ctypes layer) against lib/libmoas.so.1 of this tree.

Run from the repository root after `make`:  python3 -m unittest tests.python.test_binding

Each class covers one group of the API (moas.h banner sections). The binding is
loaded from this tree's lib/ (MOAS_LIBRARY), never from an installed copy, unless
MOAS_LIBRARY is already set; tests/consumers.sh runs the binding against an installed
prefix through pkg-config.
"""
import ctypes
import gc
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import unittest
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
sys.dont_write_bytecode = True
os.environ.setdefault("MOAS_LIBRARY", os.path.join(ROOT, "lib", "libmoas.so.1"))
import moas  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data")
MODEL = os.path.join(DATA, "tiny-moas-bias.gguf")
HEADER = os.path.join(ROOT, "include", "moas.h")
TEXT = "And God said, Let there be light: and there was light."


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_golden(path):
    """tests/data/README.md: magic, 4 x uint32, tokens, logits, gates."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:8] == b"MOASGLD1"
    n_tok, n_vocab, n_layer, n_scheme = struct.unpack_from("<4I", raw, 8)
    off = 24
    tokens = list(struct.unpack_from("<%di" % n_tok, raw, off))
    off += 4 * n_tok
    logits = struct.unpack_from("<%df" % (n_tok * n_vocab), raw, off)
    off += 4 * n_tok * n_vocab
    gates = struct.unpack_from("<%df" % (n_tok * n_layer * n_scheme), raw, off)
    return tokens, logits, gates, (n_tok, n_vocab, n_layer, n_scheme)


def c_struct_layouts():
    """{struct: (sizeof, alignof, [(field, offset, size, kind)])} from abi/layout.c, built
    with the system's C compiler ($CC, else cc) against this tree's moas.h."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "layout")
        # $CC may be a command with words of its own ("ccache gcc", "gcc -m64")
        cc = shlex.split(os.environ.get("CC", "")) or ["cc"]   # an empty $CC as unset
        subprocess.run(cc + ["-std=c11", "-I", os.path.join(ROOT, "include"),
                             os.path.join(ROOT, "abi", "layout.c"), "-o", exe], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    layouts, current = {}, None
    for line in out.splitlines():
        words = line.split()
        if words[0] == "struct":
            current = []
            layouts[words[1]] = (int(words[2]), int(words[3]), current)
        else:
            current.append((words[1], int(words[2]), int(words[3]), words[4]))
    return layouts


def ctypes_kind(t):
    """abi/layout.c's kind of a ctypes field type: f (floating point), i (integer), p
    (pointer); an array's is its elements'."""
    if issubclass(t, ctypes.Array):
        return ctypes_kind(t._type_)
    if issubclass(t, ctypes._SimpleCData) and t._type_ not in "PzZ":
        return "f" if t._type_ in "fdg" else "i"
    return "p"   # c_void_p, c_char_p, POINTER(...), CFUNCTYPE(...)


class Base(unittest.TestCase):
    def setUp(self):
        self.model = moas.Model(MODEL)

    def tearDown(self):
        self.model.close()

    def expect(self, status, fn, *args, **kw):
        """fn(*args) raises MoasError with `status` and a message; returns it."""
        with self.assertRaises(moas.MoasError) as cm:
            fn(*args, **kw)
        e = cm.exception
        self.assertEqual(e.status, status)
        self.assertEqual(e.name, "MOAS_" + moas.Status(status).name)
        self.assertTrue(e.message, "no moas_last_error() text")
        return e


class Library(unittest.TestCase):
    def test_loaded_from_this_tree(self):
        self.assertEqual(os.path.realpath(moas.library_path()),
                         os.path.realpath(os.environ["MOAS_LIBRARY"]))

    def test_version_matches_header(self):
        header = read_text(HEADER)
        want = re.search(r'#define MOAS_VERSION_STRING "(.*)"', header).group(1)
        self.assertEqual(moas.version_string(), want)
        major, minor, patch = map(int, want.split("."))
        self.assertEqual(moas.version_number(), major * 10000 + minor * 100 + patch)
        self.assertEqual(major, moas.ABI_MAJOR)

    def test_every_header_function_is_declared(self):
        header = read_text(HEADER)
        names = set(re.findall(r"MOAS_API\s+[^;(]*?\b(moas_\w+)\s*\(", header))
        self.assertGreater(len(names), 60)
        self.assertEqual(names - set(moas._SIGNATURES), set(), "functions not bound")
        self.assertEqual(set(moas._SIGNATURES) - names, set(), "bound but not in moas.h")

    def test_struct_sizes_match_the_library(self):
        lib = moas.library()
        for init, cls in ((lib.moas_model_params_init_sized, moas.ModelParams),
                          (lib.moas_context_params_init_sized, moas.ContextParams),
                          (lib.moas_sampler_params_init_sized, moas.SamplerParams),
                          (lib.moas_pool_params_init_sized, moas.PoolParams)):
            self.assertEqual(moas._library_sizeof(init), ctypes.sizeof(cls), cls.__name__)

    def test_struct_layouts_match_the_header(self):
        """Every struct of moas.h, as the C compiler lays it out (abi/layout.c, whose list
        test_api_doc.py checks against the header), has the same fields in the same
        order, offsets, sizes and kinds in the ctypes declaration (a c_int32 where the
        header has a float has the float's offset and size)."""
        layout = c_struct_layouts()
        classes = {"moas_allocator": moas.Allocator, "moas_model_params": moas.ModelParams,
                   "moas_tensor_info": moas.TensorInfoC,
                   "moas_context_params": moas.ContextParams,
                   "moas_pool_params": moas.PoolParams, "moas_pool_info": moas.PoolInfo,
                   "moas_pool_seq": moas.PoolSeq, "moas_tokenize_params": moas.TokenizeParams,
                   "moas_logit_bias": moas.LogitBias,
                   "moas_sampler_params": moas.SamplerParams}
        self.assertEqual(set(classes), set(layout))
        for name, cls in classes.items():
            size, align, c_fields = layout[name]
            self.assertEqual((ctypes.sizeof(cls), ctypes.alignment(cls)), (size, align), name)
            self.assertEqual([f[0] for f in cls._fields_], [f[0] for f in c_fields], name)
            types = dict(cls._fields_)
            for field, offset, field_size, kind in c_fields:
                got = getattr(cls, field)
                self.assertEqual((got.offset, got.size, ctypes_kind(types[field])),
                                 (offset, field_size, kind), "%s.%s" % (name, field))

    def test_status_table_matches_header(self):
        header = read_text(HEADER)
        rows = re.findall(r'X\((\w+),\s*(-?\d+),\s*"([^"]*)"\)', header)
        self.assertEqual(len(rows), len(moas.Status))
        for name, value, message in rows:
            self.assertEqual(moas.Status[name], int(value))
            self.assertEqual(moas.status_string(int(value)), message)
            self.assertEqual(moas.status_name(int(value)), "MOAS_" + name)
        self.assertEqual(moas.status_string(-1000), "unknown status")
        # beyond int32 ctypes wrapped them into the table: 2**32 - 1 was INVALID_ARG
        for value in (2**32 - 1, 2**32, -2**32 - 1, 2**70, -2**31):
            self.assertEqual(moas.status_name(value), "MOAS_UNKNOWN")
            self.assertEqual(moas.status_string(value), "unknown status")
            self.assertEqual(moas.MoasError(value, "x").name, "MOAS_UNKNOWN")
        self.assertRaises(TypeError, moas.status_name, -1.0)

    def test_module_docstring_example_runs(self):
        lines = moas.__doc__.split("\n")
        start = lines.index("    import moas")
        code = "\n".join(line[4:] for line in lines[start:lines.index("", start)])
        cwd = os.getcwd()
        try:
            os.chdir(ROOT)
            out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 universal_newlines=True, check=True,
                                 env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, "bindings", "python")))
        finally:
            os.chdir(cwd)
        self.assertEqual(len(out.stdout), 2)   # one character and a newline

    def test_lookup_order(self):
        env = dict(os.environ)
        try:
            os.environ["MOAS_LIBRARY"] = "/nonexistent/libmoas.so.1"
            self.assertEqual(moas._candidates(), ["/nonexistent/libmoas.so.1"])
            with tempfile.TemporaryDirectory() as tmp:
                with open(os.path.join(tmp, "moas.pc"), "w") as f:
                    f.write("libdir=/opt/x/lib\nName: moas\nDescription: d\nVersion: 1.0.0\n"
                            "Libs: -L${libdir} -lmoas\n")
                del os.environ["MOAS_LIBRARY"]
                os.environ["PKG_CONFIG_PATH"] = tmp
                os.environ["PKG_CONFIG_LIBDIR"] = tmp   # no system copy
                found = moas._candidates()
            if found[0].startswith("/opt/x/lib"):   # pkg-config is installed
                self.assertEqual(found[0], "/opt/x/lib/libmoas.so.1")
            self.assertEqual(os.path.realpath(found[-1]),
                             os.path.realpath(os.path.join(ROOT, "lib", "libmoas.so.1")))
            with self.assertRaises(OSError):
                moas.load_library("/nonexistent/libmoas.so.1")
        finally:
            os.environ.clear()
            os.environ.update(env)
            moas.load_library(env["MOAS_LIBRARY"])


class Errors(Base):
    def test_status_of_each_failure(self):
        e = self.expect(moas.Status.ERR_IO, moas.Model, "/nonexistent/model.gguf")
        self.assertEqual(e.status_string, "cannot read the model file")
        self.assertIn("MOAS_ERR_IO", str(e))
        self.expect(moas.Status.ERR_BAD_FORMAT, moas.Model.from_bytes, b"NOPE" + bytes(60))
        good = read_bytes(MODEL)
        e = self.expect(moas.Status.ERR_CORRUPT, moas.Model.from_bytes, good[:3000])
        self.assertIn("the file ends at 3000", str(e))    # the cause names the cut
        # a whole file whose metadata disagrees: not blamed on truncation
        whole = bytearray(read_bytes(os.path.join(os.path.dirname(MODEL),
                                                  "tiny-mqa-nobias.gguf")))
        at = whole.index(b"moas.attention.scheme_kv_heads") + 30 + 16
        whole[at] = 4                                  # the one scheme: 1 -> 4 KV heads
        e = self.expect(moas.Status.ERR_CORRUPT, moas.Model.from_bytes, bytes(whole))
        self.assertIn("scheme 0 has 4 KV heads", str(e))
        self.assertNotIn("truncated", str(e))
        self.expect(moas.Status.ERR_UNKNOWN_CHAR, self.model.tokenize, "Quiz")
        self.expect(moas.Status.ERR_NOT_FOUND, self.model.meta_int, "no.such.key")
        self.expect(moas.Status.ERR_WRONG_TYPE, self.model.meta_int, "general.name")
        self.expect(moas.Status.ERR_NOT_FOUND, self.model.tensor, "no.such.tensor")
        with self.model.context(n_ctx=4) as ctx:
            ctx.decode_batch([1, 2, 3, 4])
            e = self.expect(moas.Status.ERR_CONTEXT_FULL, ctx.decode, 5)
            self.assertIn("positions", e.message)

    def test_failed_call_changes_nothing(self):
        with self.model.context() as ctx:
            want = list(ctx.decode_batch([10, 11, 12]))
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.decode, 47)
            e = self.expect(moas.Status.ERR_INVALID_ARG, ctx.decode_batch, [1, -3])
            self.assertIn("index 1", e.message)
            self.assertEqual(ctx.n_past, 3)
            self.assertEqual(list(ctx.logits()), want)

    def test_closed_objects_raise(self):
        ctx = self.model.context()
        smp = moas.Sampler(self.model)
        ctx.close()
        ctx.close()   # idempotent
        smp.close()
        self.expect(moas.Status.ERR_INVALID_ARG, ctx.decode, 1)
        self.expect(moas.Status.ERR_INVALID_ARG, smp.sample, [0.0] * 47)
        self.model.close()
        self.expect(moas.Status.ERR_INVALID_ARG, lambda: self.model.n_vocab)

    def test_closing_the_model_closes_its_contexts(self):
        ctx = self.model.context()
        ctx.decode(1)
        self.model.close()
        self.assertTrue(ctx.closed)

    def test_log_callback_sees_the_message(self):
        lines = []
        with self.assertRaises(moas.MoasError) as cm:
            moas.Model("/nonexistent/model.gguf", log=lambda lvl, msg: lines.append((lvl, msg)))
        self.assertEqual(lines, [(moas.LogLevel.ERROR, cm.exception.message)])


class ModelApi(Base):
    def test_hyperparameters(self):
        m = self.model
        self.assertEqual((m.arch, m.name), ("moas", "tiny-moas-bias"))
        self.assertEqual((m.n_layer, m.n_embd, m.n_head, m.head_dim), (2, 48, 6, 8))
        self.assertEqual((m.n_ff, m.n_vocab, m.n_ctx_train, m.n_scheme), (192, 47, 64, 3))
        self.assertEqual((m.mixing, m.kv_sharing, m.has_bias),
                         (moas.Mixing.ROUTER, moas.KvSharing.INDEPENDENT, True))
        self.assertEqual(m.schemes, [6, 2, 1])
        self.expect(moas.Status.ERR_INVALID_ARG, m.scheme_n_kv, 3)
        self.assertEqual(m.n_params, sum(math.prod(t.shape) for t in m.tensors()))

    def test_typed_metadata(self):
        m = self.model
        self.assertEqual(m.meta_count, len(m.meta_keys()))
        self.assertEqual(m.meta_type("moas.block_count"), m.meta_type("moas.block_count"))
        self.assertEqual(m.meta_int("moas.block_count"), 2)
        self.assertEqual(m.meta_type("general.alignment"), moas.MetaType.UINT32)
        self.assertAlmostEqual(m.meta_float("moas.attention.layer_norm_epsilon"), 1e-5, 9)
        self.assertIs(m.meta_bool("moas.bias"), True)
        self.assertEqual(m.meta_string("moas.attention.mixing"), "router")
        self.assertEqual(m.meta_array("moas.attention.scheme_kv_heads")[1], 3)
        self.assertEqual(m.meta_array_int("moas.attention.scheme_kv_heads", 1), 2)
        elem, n = m.meta_array("tokenizer.ggml.tokens")
        self.assertEqual((elem, n), (moas.MetaType.STRING, 47))
        self.assertEqual(m.meta_array_string("tokenizer.ggml.tokens", 46), "—")
        self.expect(moas.Status.ERR_INVALID_ARG, m.meta_array_string, "tokenizer.ggml.tokens", 47)
        self.expect(moas.Status.ERR_WRONG_TYPE, m.meta_array_float, "tokenizer.ggml.tokens", 0)
        self.expect(moas.Status.ERR_INVALID_ARG, m.meta_key, m.meta_count)
        meta = m.metadata()
        self.assertEqual(meta["moas.attention.scheme_kv_heads"], [6, 2, 1])
        self.assertEqual(meta["tokenizer.ggml.tokens"], m.vocab)
        self.assertEqual(list(meta), m.meta_keys())

    def test_a_metadata_key_that_is_no_utf8_is_read_and_found(self):
        # the loader takes it; meta_key() decoded it strictly (UnicodeDecodeError), so
        # meta_keys() and metadata() failed for the whole file
        raw = bytearray(read_bytes(MODEL))
        at = raw.index(b"general.name")
        raw[at + 1] = 0xff
        with moas.Model.from_bytes(bytes(raw)) as m:
            key = "g\udcffneral.name"
            self.assertIn(key, m.meta_keys())
            self.assertEqual(m.metadata()[key], m.meta_string(key))
            self.assertEqual(m.meta(key), "tiny-moas-bias")

    def test_tensors(self):
        m = self.model
        raw = read_bytes(MODEL)
        infos = m.tensors()
        self.assertEqual(len(infos), m.n_tensors)
        self.assertEqual(len(infos), 76)
        emb = m.tensor("token_embd.weight")
        self.assertEqual(emb.index, m.tensor_find("token_embd.weight"))
        self.assertEqual((emb.type, emb.shape, emb.n_bytes), (moas.Type.F32, (48, 47), 48 * 47 * 4))
        self.assertTrue(emb.data.readonly)
        self.assertEqual(bytes(emb.data), raw[emb.offset:emb.offset + emb.n_bytes])
        self.expect(moas.Status.ERR_INVALID_ARG, m.tensor, 76)

    def test_from_bytes_keeps_the_buffer(self):
        raw = read_bytes(MODEL)
        for buf in (bytes(raw), bytearray(raw), memoryview(bytearray(raw))):
            m = moas.Model.from_bytes(buf)
            del buf
            gc.collect()
            with m.context() as ctx, moas.Model(MODEL) as ref, ref.context() as rctx:
                self.assertEqual(list(ctx.decode_batch([5, 6, 7])),
                                 list(rctx.decode_batch([5, 6, 7])))
            m.close()
        buf = bytearray(raw)
        with moas.Model.from_bytes(buf):
            with self.assertRaises(BufferError):
                buf.extend(b"x")   # exported while the model lives
        buf.extend(b"x")

    def test_without_mmap(self):
        with moas.Model(MODEL, use_mmap=False) as m:
            self.assertEqual(m.n_vocab, 47)


class Tokenizer(Base):
    def test_round_trip_utf8(self):
        text = read_text(os.path.join(DATA, "tiny.txt"))
        ids = self.model.tokenize(text)
        self.assertEqual(len(ids), len(text))
        self.assertEqual(self.model.detokenize(ids), text)
        self.assertEqual(self.model.tokenize(text.encode("utf-8")), ids)
        self.assertEqual(self.model.tokenize(""), [])
        self.assertEqual(self.model.detokenize([]), "")

    def test_unknown_characters_replaced_or_dropped(self):
        text = "And Q7\r\n"
        self.expect(moas.Status.ERR_UNKNOWN_CHAR, self.model.tokenize, text)
        a, n, d, sp, nl = self.model.tokenize("And \n")
        self.assertEqual(self.model.tokenize_ex(text, "replace"),
                         ([a, n, d, sp, sp, sp, sp, nl], 3))
        self.assertEqual(self.model.tokenize(text, unknown="replace", replacement="."),
                         [a, n, d, sp] + self.model.tokenize("...") + [nl])
        self.assertEqual(self.model.tokenize_ex(text, "drop"), ([a, n, d, sp, nl], 3))
        self.expect(moas.Status.ERR_INVALID_UTF8, self.model.tokenize_ex, b"A\xff", "drop")
        # invalid UTF-8 is that, not an unknown character, under every rule and call
        # the str: those bytes, surrogate-escaped; a lone high surrogate, which no bytes
        # stand for (it was a UnicodeEncodeError)
        for text in (b"A\xff", "A\udcff", "A\ud800"):
            for unknown in ("error", "replace", "drop"):
                self.expect(moas.Status.ERR_INVALID_UTF8, self.model.tokenize, text,
                            unknown)
            self.expect(moas.Status.ERR_INVALID_UTF8, self.model.generate, text, 1)
        e = self.expect(moas.Status.ERR_INVALID_UTF8, self.model.tokenize, "And\ud800")
        self.assertIn("lone surrogate U+D800 at index 3", e.message)
        self.expect(moas.Status.ERR_UNKNOWN_CHAR, self.model.tokenize_ex, text, "replace", "Q")
        self.expect(moas.Status.ERR_INVALID_ARG, self.model.tokenize_ex, text, "maybe")

    def test_token_text_and_vocab(self):
        vocab = self.model.vocab
        self.assertEqual(vocab, sorted(set(read_text(os.path.join(DATA, "tiny.txt")))))
        self.assertEqual(self.model.token_text(self.model.tokenize("é")[0]), "é")
        self.expect(moas.Status.ERR_INVALID_ARG, self.model.token_text, 47)
        self.expect(moas.Status.ERR_INVALID_ARG, self.model.detokenize, [0, 99])
        e = self.expect(moas.Status.ERR_UNKNOWN_CHAR, self.model.tokenize, "ab€")
        self.assertIn("offset 2", e.message)


class Decoding(Base):
    def test_mixture_matches_golden(self):
        tokens, logits, gates, (n, v, L, S) = read_golden(os.path.join(DATA,
                                                                       "tiny-moas-bias.golden"))
        with self.model.context() as ctx:
            rows = ctx.decode_batch(tokens, logits="all")
            self.assertEqual((len(rows), len(rows[0])), (n, v))
            flat = [x for row in rows for x in row]
            self.assertLess(max(abs(a - b) for a, b in zip(flat, logits)), 1e-4)
            routes = ctx.routes()
            rg = routes.gates.cast("B").cast("f")
            self.assertLess(max(abs(a - b) for a, b in zip(rg, gates)), 1e-5)
            self.assertEqual(ctx.scheme_counts(), [66, 23, 39])
            self.assertEqual(sum(ctx.scheme_counts(0)) + sum(ctx.scheme_counts(1)), 2 * n)
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.scheme_counts, 2)

    def test_batch_equals_single_decodes(self):
        ids = self.model.tokenize(TEXT)
        with self.model.context() as a, self.model.context(n_threads=1) as b:
            allv = a.decode_batch(ids, logits="all")
            for i, t in enumerate(ids):
                self.assertEqual(list(b.decode(t)), allv[i].tolist())
            self.assertIsNone(b.decode_batch([], logits="none"))

    def test_logits_view_is_zero_copy_and_invalidated(self):
        with self.model.context() as ctx:
            self.assertIsNone(ctx.logits())
            view = ctx.decode(3)
            self.assertIs(ctx.logits(), view)
            self.assertTrue(view.readonly)
            self.assertEqual((view.format, len(view)), ("f", 47))
            ptr = moas.library().moas_context_logits(ctx._ptr)
            self.assertEqual(ctypes.addressof(view.obj), ctypes.cast(ptr, ctypes.c_void_p).value)
            ctx.decode(4)                      # each of these releases the view
            with self.assertRaises(ValueError):
                view[0]
            view = ctx.decode(6)
            view.release()                     # released by its holder: a fresh one
            fresh = ctx.logits()
            self.assertIsNot(fresh, view)
            self.assertEqual(len(fresh), 47)
            for step in (lambda: ctx.truncate(1), ctx.reset, ctx.close):
                view = ctx.decode(5)
                step()
                with self.assertRaises(ValueError):
                    view[0]

    def test_no_logits_after_truncate_reset_or_none(self):
        with self.model.context() as ctx:
            ctx.decode_batch([1, 2, 3])
            ctx.truncate(2)
            self.assertIsNone(ctx.logits())
            self.assertIsNone(ctx.decode_batch([4], logits="none"))
            self.assertIsNone(ctx.logits())
            ctx.reset()
            self.assertEqual(ctx.n_past, 0)
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.truncate, 1)

    def test_truncate_then_redecode_is_exact(self):
        ids = self.model.tokenize(TEXT)
        with self.model.context(mode="routed") as ctx, self.model.context(mode="routed") as ref:
            ctx.decode_batch(ids)
            ctx.truncate(10)
            got = list(ctx.decode_batch(ids[10:20]))
            self.assertEqual(got, list(ref.decode_batch(ids[:20])))
            self.assertEqual(ctx.routes().schemes.tolist(), ref.routes().schemes.tolist())

    def test_state_getters(self):
        with self.model.context(n_ctx=32, kernels="ref", mode=moas.Mode.ROUTED) as ctx:
            self.assertEqual((ctx.n_ctx, ctx.n_past, ctx.mode, ctx.kernels_name),
                             (32, 0, moas.Mode.ROUTED, "ref"))
            self.assertEqual(moas.library().moas_context_model(ctx._ptr), self.model._ptr)
            self.assertIn("routed", repr(ctx))

    def test_bad_params(self):
        m = self.model
        self.expect(moas.Status.ERR_INVALID_ARG, m.context, n_ctx=65)
        self.expect(moas.Status.ERR_INVALID_ARG, m.context, n_threads=-1)
        self.expect(moas.Status.ERR_INVALID_ARG, m.context, kv_type="q8_0")
        self.expect(moas.Status.ERR_INVALID_ARG, m.context, forced_scheme=1)   # mixture
        self.expect(moas.Status.ERR_INVALID_ARG, m.context, mode="routed", kv_budget=10)


class Routing(Base):
    def kv_formula(self, ctx, kv_heads, elem=4):
        """docs/KV_CACHE.md, routed mode: heads * head_dim * 2 * elem + 5 per pair."""
        pairs = [h for row in kv_heads.tolist() for h in row]
        return sum(pairs) * self.model.head_dim * 2 * elem + 5 * len(pairs)

    def test_routed_counts_and_kv_bytes(self):
        ids = self.model.tokenize(TEXT)
        for kv_type, elem in (("f32", 4), ("f16", 2)):
            with self.model.context(mode="routed", kv_type=kv_type) as ctx:
                ctx.decode_batch(ids)
                counts, routes = ctx.scheme_counts(), ctx.routes()
                self.assertEqual(sum(counts), len(ids) * 2)
                heads = {0: 6, 1: 2, 2: 1}
                for srow, hrow in zip(routes.schemes.tolist(), routes.kv_heads.tolist()):
                    self.assertEqual([heads[s] for s in srow], hrow)
                self.assertEqual(ctx.kv_bytes_used(), self.kv_formula(ctx, routes.kv_heads, elem))
                self.assertEqual(ctx.kv_bytes_used(), ctx.kv_bytes_used(0) + ctx.kv_bytes_used(1))
                self.assertEqual(ctx.kv_bytes_reserved(), 2 * 64 * (6 * 8 * 2 * elem + 5))
                self.expect(moas.Status.ERR_INVALID_ARG, ctx.kv_bytes_used, 2)

    def test_kv_token_bytes_and_threads(self):
        ids = self.model.tokenize(TEXT)
        with self.model.context(mode="routed", n_threads=1) as ctx:
            self.assertEqual(ctx.n_threads, 1)
            # 2 layers, 6 heads of 8: K and V in f32 plus 5 bytes per layer
            self.assertEqual([ctx.kv_token_bytes(s) for s in range(3)],
                             [2 * (6 * 64 + 5), 2 * (2 * 64 + 5), 2 * (64 + 5)])
            self.assertEqual(ctx.kv_token_bytes(), 2 * 9 * 64)
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.kv_token_bytes, 3)
        with self.model.context() as ctx:
            ctx.decode_batch(ids)
            self.assertEqual(ctx.kv_bytes_used(), len(ids) * ctx.kv_token_bytes())

    def test_forced_scheme(self):
        ids = self.model.tokenize(TEXT)
        with self.model.context(mode="routed", forced_scheme=2) as ctx:
            ctx.decode_batch(ids[:10])
            ctx.force_scheme(-1)
            ctx.decode_batch(ids[10:])
            self.assertEqual(ctx.routes(0, 10).schemes.tolist(), [[2, 2]] * 10)
            self.assertNotEqual(ctx.routes(10).schemes.tolist(), [[2, 2]] * (len(ids) - 10))
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.force_scheme, 3)
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.routes, 0, len(ids) + 1)
            # refused by the library, not sized first: 2^31 positions asked for 51 GB
            # of buffers and ended in MemoryError
            for pos, n_pos in [(0, 2**31 - 1), (-1, 1), (0, -1), (len(ids), 1)]:
                self.expect(moas.Status.ERR_INVALID_ARG, ctx.routes, pos, n_pos)
        with self.model.context() as mix:
            self.expect(moas.Status.ERR_INVALID_ARG, mix.force_scheme, 0)

    def test_kv_budget(self):
        ids = self.model.tokenize(TEXT)
        budget = 20000
        with self.model.context(mode="routed", kv_budget=budget) as ctx:
            ctx.decode_batch(ids)
            self.assertLessEqual(ctx.kv_bytes_used(), budget)
            ctx.set_kv_budget(0)
            self.expect(moas.Status.ERR_INVALID_ARG, ctx.set_kv_budget, 1)
        with self.model.context(kv_budget=2 * 9 * 8 * 2 * 4 * 3) as mix:   # 3 tokens
            mix.decode_batch(ids[:3])
            self.expect(moas.Status.ERR_CONTEXT_FULL, mix.decode, 1)

    def test_route_callback_overrides_in_routed_mode(self):
        ids = self.model.tokenize(TEXT)
        seen = []

        def to_mqa(pos, layer, gates, proposed):
            seen.append((pos, layer, proposed))
            self.assertEqual(len(gates), 3)
            self.assertAlmostEqual(sum(gates), 1.0, places=5)
            return 2
        with self.model.context(mode="routed", route_callback=to_mqa) as ctx:
            ctx.decode_batch(ids)
            self.assertEqual(ctx.scheme_counts(), [0, 0, 2 * len(ids)])
            # every token and layer once (a batch visits them layer by layer, moas.h)
            self.assertEqual(sorted((p, l) for p, l, _ in seen),
                             [(p, l) for p in range(len(ids)) for l in range(2)])
            # gates are recorded as computed; the proposals were the largest gates
            gates = ctx.routes().gates.tolist()
            for pos, layer, proposed in seen:
                g = gates[pos][layer]
                self.assertEqual(proposed, g.index(max(g)))
            self.assertEqual(ctx.kv_bytes_used(), 2 * len(ids) * (8 * 2 * 4 + 5))
            # None keeps the proposal: the same routing as no callback at all
            ctx.reset()
            ctx.set_route_callback(lambda *a: None)
            ctx.decode_batch(ids)
            with self.model.context(mode="routed") as ref:
                ref.decode_batch(ids)
                self.assertEqual(ctx.scheme_counts(), ref.scheme_counts())
            ctx.set_route_callback(None)   # removal
            ctx.decode(1)

    def test_route_callback_observes_in_mixture_mode(self):
        calls = []
        with self.model.context(route_callback=lambda *a: calls.append(a) or 2) as ctx, \
                self.model.context() as ref:
            ids = self.model.tokenize(TEXT)
            self.assertEqual(list(ctx.decode_batch(ids)), list(ref.decode_batch(ids)))
            self.assertEqual(len(calls), 2 * len(ids))
            self.assertEqual(ctx.scheme_counts(), ref.scheme_counts())

    def test_route_callback_exception_undoes_the_decode(self):
        def boom(pos, layer, gates, proposed):
            if pos == 5:
                raise KeyError("from the callback")
        with self.model.context(mode="routed", route_callback=boom) as ctx:
            ctx.decode_batch([1, 2, 3])
            with self.assertRaises(KeyError):
                ctx.decode_batch([4, 5, 6, 7])
            self.assertEqual(ctx.n_past, 3)
            ctx.decode_batch([4, 5])
            with self.assertRaises(KeyError):
                ctx.decode(6)
            self.assertEqual(ctx.n_past, 5)


class SamplerApi(Base):
    def test_bias_penalty_min_p_hand_computed(self):
        logits = [2.0, 3.0, -1.0, 2.5]
        with moas.Sampler(4, temperature=0, logit_bias={1: -10.0}) as s:
            self.assertEqual(s.sample(logits), 3)           # 3 - 10 < 2.5
        with moas.Sampler(4, temperature=0, logit_bias={1: float("-inf"),
                                                         3: float("-inf")}) as s:
            self.assertEqual(s.sample(logits), 0)
        with moas.Sampler(4, temperature=0, repeat_penalty=2.0, repeat_last_n=2) as s:
            # own choices remembered, the last two: 3.0/2 < 2.5; 1.5, 1.25 < 2.0; 1 left
            self.assertEqual([s.sample(logits) for _ in range(4)], [1, 3, 0, 1])
            s.reset()
            s.accept([1, 1])                                # penalised once: 1.5 > 1.0
            self.assertEqual(s.sample([1.0, 3.0, -5.0, -5.0]), 1)
            self.expect(moas.Status.ERR_INVALID_ARG, s.accept, 4)
        # p 0.5 0.3 0.15 0.05: min-p 0.2 draws as top-k 3 from the same seed
        import math
        lp = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
        with moas.Sampler(4, seed=7, min_p=0.2) as a, moas.Sampler(4, seed=7, top_k=3) as b:
            got = [a.sample(lp) for _ in range(300)]
            self.assertEqual(got, [b.sample(lp) for _ in range(300)])
            self.assertNotIn(3, got)
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 4, min_p=1.5)
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 4, logit_bias={4: 1.0})

    def test_frequency_and_presence_penalties_hand_computed(self):
        logits = [2.0, 1.6, 1.0, -9.0]
        with moas.Sampler(4, temperature=0, frequency_penalty=0.25, repeat_last_n=4) as s:
            s.accept(0)
            # 2 - 0.25 > 1.6; 2 - 0.5 < 1.6; 1.5 > 1.6 - 0.25; 2 - 0.75 < 1.35
            self.assertEqual([s.sample(logits) for _ in range(4)], [0, 1, 0, 1])
        with moas.Sampler(4, temperature=0, presence_penalty=0.5) as s:
            s.accept([0, 0, 0])                             # once: 2 - 0.5 < 1.6
            self.assertEqual(s.sample(logits), 1)
        with moas.Sampler(4, temperature=0, presence_penalty=0.3) as s:
            s.accept([0, 0, 0])                             # 2 - 0.3 > 1.6
            self.assertEqual(s.sample(logits), 0)
        # after the repetition penalty: 2 / 2 - (2 * 0.25 + 0.5) = 0 < 0.25
        with moas.Sampler(4, temperature=0, repeat_penalty=2.0, frequency_penalty=0.25,
                          presence_penalty=0.5) as s:
            s.accept([0, 0])
            self.assertEqual(s.sample([2.0, 0.25, -1.0, -9.0]), 1)
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 4,
                    frequency_penalty=float("nan"))
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 4,
                    presence_penalty=float("inf"))
        # Model.generate passes them on: greedy text changes with a presence penalty
        plain = self.model.generate("And ", 40, temperature=0)
        pen = self.model.generate("And ", 40, temperature=0, presence_penalty=5.0)
        self.assertNotEqual(plain, pen)
        self.assertEqual(pen, self.model.generate("And ", 40, temperature=0,
                                                  presence_penalty=5.0))

    def test_find_stop(self):
        stops = ["\n\n", "Amen"]
        self.assertEqual(moas.find_stop("And it was so.\n\nAnd", stops), (14, True))
        self.assertEqual(moas.find_stop("so. Am", stops), (4, False))
        self.assertEqual(moas.find_stop("so. Am", stops, more=False), (6, False))
        self.assertEqual(moas.find_stop("é—Amen", stops), (2, True))     # characters
        self.assertEqual(moas.find_stop("é—Amen".encode(), stops), (5, True))  # bytes
        self.assertEqual(moas.find_stop("abc", []), (3, False))
        # a whole stop string ends the text at once, though "abcd" began earlier
        self.assertEqual(moas.find_stop("abc", ["abcd", "c"]), (2, True))
        # a C string would end at NUL and match "e" alone: refused instead
        with self.assertRaisesRegex(ValueError, "NUL"):
            moas.find_stop("The LORD", ["e\0zzz"])

    def test_greedy_is_argmax(self):
        with self.model.context() as ctx, moas.Sampler(self.model, temperature=0) as smp:
            logits = ctx.decode_batch(self.model.tokenize("And God"))
            want = max(range(47), key=lambda i: logits[i])
            self.assertEqual(smp.sample(logits), want)
            self.assertEqual(smp.sample(ctx), want)
            self.assertEqual(smp.sample(list(logits)), want)
            self.assertEqual(smp.sample(array("f", logits)), want)
            self.expect(moas.Status.ERR_INVALID_ARG, smp.sample, [0.0] * 3)
            self.expect(moas.Status.ERR_INVALID_ARG, smp.sample, [float("nan")] * 47)

    def test_seeded_streams(self):
        logits = [0.0] * 47
        with moas.Sampler(47, seed=7, top_k=10) as a, moas.Sampler(47, seed=7, top_k=10) as b:
            xs = [a.sample(logits) for _ in range(50)]
            self.assertEqual(xs, [b.sample(logits) for _ in range(50)])
            self.assertGreater(len(set(xs)), 3)
            self.assertTrue(all(x < 47 for x in xs))
            a.reseed(7)
            self.assertEqual(xs, [a.sample(logits) for _ in range(50)])

    def test_bad_params(self):
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 0)
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 47, temperature=-1)
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 47, top_p=0)
        self.expect(moas.Status.ERR_INVALID_ARG, moas.Sampler, 47, top_k=-1)


class Allocation(unittest.TestCase):
    def test_custom_allocator_counts_and_frees(self):
        libc = ctypes.CDLL(None)
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
        live = set()

        def alloc(_user, size):
            p = libc.malloc(size)
            live.add(p)
            return p

        def free(_user, p):
            live.discard(p)
            libc.free(p)
        allocator = moas.Allocator(moas.ALLOC_FN(alloc), moas.FREE_FN(free), None)
        m = moas.Model(MODEL, allocator=allocator)
        n_model = len(live)
        self.assertGreater(n_model, 0)
        ctx = m.context(allocator=allocator, mode="routed")
        smp = moas.Sampler(m, allocator=allocator)
        n_all = len(live)
        self.assertGreater(n_all, n_model)
        smp.sample(ctx.decode_batch(m.tokenize(TEXT)))
        self.assertEqual(len(live), n_all, "decoding allocated")
        smp.close()
        m.close()   # closes ctx first
        self.assertEqual(live, set())


def counting_allocator():
    """(allocator, live): an Allocator over libc's malloc whose blocks in use are the
    keys of `live` (address: size); a block is overwritten with 0xA5 bytes before it
    is freed, so a buffer read after its memory was freed shows it."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.restype, libc.free.argtypes = None, [ctypes.c_void_p]
    live = {}

    def alloc(_user, size):
        p = libc.malloc(size)
        live[p] = size
        return p

    def free(_user, p):
        size = live.pop(p, 0)
        if p and size:
            ctypes.memset(p, 0xA5, size)
        libc.free(p)
    return moas.Allocator(moas.ALLOC_FN(alloc), moas.FREE_FN(free), None), live


class LogitsLifetime(unittest.TestCase):
    """Buffers made from a logits view (a slice, logits_array()'s numpy array) keep the
    context's library memory: reading them after close() read freed memory."""

    def open(self, closer):
        """A model and a context (in a pool for closer "pool") allocating through a
        counting allocator, after a decode: (model, pool, ctx, view, live), and the
        model's blocks in self.model_blocks."""
        allocator, live = counting_allocator()
        model = moas.Model(MODEL, allocator=allocator)
        self.model_blocks = set(live)
        pool = moas.Pool(model, 1 << 20) if closer == "pool" else None
        ctx = moas.Context(model, pool=pool, allocator=allocator)
        view = ctx.decode_batch(model.tokenize(TEXT[:12]))
        self.assertIn(ctypes.addressof(view.obj), live, "the logits are not the context's")
        return model, pool, ctx, view, live

    def test_derived_buffers_keep_the_logits_after_close(self):
        np = moas._numpy()
        for closer in ("context", "model", "pool", "collector"):
            with self.subTest(closer=closer):
                model, pool, ctx, view, live = self.open(closer)
                block = ctypes.addressof(view.obj)
                head = view[:8]
                arr = ctx.logits_array() if np is not None else None
                want = list(view)
                if closer == "context":
                    ctx.close()
                elif closer == "model":
                    model.close()   # closes the context first
                elif closer == "pool":
                    pool.close()    # closes its context first
                else:               # nothing closed: the objects are collected
                    del model, pool, ctx
                gc.collect()
                if closer != "collector":
                    self.assertTrue(ctx.closed)
                    with self.assertRaises(ValueError):
                        view[0]     # the view itself is released
                del view
                gc.collect()
                self.assertIn(block, live, "the context's logits were freed under a slice")
                self.assertLessEqual(self.model_blocks, set(live),
                                     "the model was freed before its context")
                self.assertEqual(list(head), want[:8])
                if arr is not None:
                    self.assertEqual(arr.tolist(), want)
                del head, arr
                gc.collect()
                self.assertNotIn(block, live, "the context was not freed after its buffers")
                if closer in ("context", "pool"):
                    model.close()
                self.assertEqual(live, {}, "the model or context was not freed")
        self.skip_numpy_part(np)

    def skip_numpy_part(self, np):
        if np is None:
            with self.subTest("logits_array()"):
                self.skipTest("numpy is not installed: logits_array()'s array not checked")

    def test_derived_buffers_show_the_next_decode_then_stay_readable(self):
        np = moas._numpy()
        model, _, ctx, view, live = self.open("context")
        block = ctypes.addressof(view.obj)
        head = view[:8]
        whole = memoryview(view)
        arr = ctx.logits_array() if np is not None else None
        before = list(view)
        after = list(ctx.decode(7))   # the same buffer, the new logits
        self.assertNotEqual(after, before)
        self.assertEqual(list(head), after[:8])
        self.assertEqual(list(whole), after)
        if arr is not None:
            self.assertEqual(arr.tolist(), after)
        ctx.close()
        model.close()
        gc.collect()
        self.assertIn(block, live)
        self.assertEqual(list(head), after[:8])
        self.assertEqual(list(whole), after)
        if arr is not None:
            self.assertEqual(arr.tolist(), after)
        del view, head, whole, arr
        gc.collect()
        self.assertEqual(live, {})
        self.skip_numpy_part(np)

    def test_a_context_is_freed_once_nothing_reads_its_logits(self):
        # nothing derived: close() frees the context at once, not later
        model, _, ctx, view, live = self.open("context")
        block = ctypes.addressof(view.obj)
        ctx.close()
        self.assertNotIn(block, live)
        # a context dropped unclosed while its view lives: the view keeps it (open,
        # the view usable), and it is freed when the view goes (the context does not
        # keep its views, which would make a cycle the collector never frees)
        ctx = moas.Context(model, allocator=ctx._allocator)
        view = ctx.decode(3)
        block = ctypes.addressof(view.obj)
        del ctx
        gc.collect()
        self.assertIn(block, live)
        self.assertEqual(len(view), 47)
        del view
        gc.collect()
        self.assertNotIn(block, live)
        model.close()
        self.assertEqual(live, {})


class Example(unittest.TestCase):
    def test_generate_py(self):
        script = os.path.join(ROOT, "examples", "python", "generate.py")
        out = subprocess.run([sys.executable, script, MODEL, "And God", "-n", "30", "--seed",
                              "3", "--mode", "routed"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, check=True)
        self.assertTrue(out.stdout.startswith("And God"), out.stdout)
        self.assertEqual(len(out.stdout) - 1, len("And God") + 30)   # print's newline
        self.assertRegex(out.stderr,
                         r"^routing: \[\d+, \d+, \d+\] token-layers per scheme, KV bytes \d+$")
        # past the context (64): every character asked for, and stderr says how
        long = subprocess.run([sys.executable, script, MODEL, "And God", "-n", "200",
                               "--seed", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, check=True)
        self.assertEqual(len(long.stdout) - 1, len("And God") + 200)
        self.assertIn("the context (64 tokens) is full", long.stderr)
        # a prompt longer than the context: its end is kept, and stderr says so
        prompt = read_text(os.path.join(DATA, "tiny.txt"))[:100]
        cut = subprocess.run([sys.executable, script, MODEL, prompt, "-n", "5"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, check=True)
        self.assertIn("the prompt has 100 characters, more than the context's 64", cut.stderr)
        self.assertEqual(len(cut.stdout) - 1, 105)
        bad = subprocess.run([sys.executable, script, MODEL, "Quiz"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("MOAS_ERR_UNKNOWN_CHAR", bad.stderr)


if __name__ == "__main__":
    unittest.main()
