"""Tests of tools/gguf.py and tools/moas-convert, standard library only.

Run from the repository root:  python3 -m unittest discover -s tests/python

The checkpoints here are built by hand: a small pickle assembler below emits
the same opcodes torch.save does (GLOBAL torch._utils._rebuild_tensor_v2,
persistent storage ids, ...) and the zip gets the torch layout
(archive/data.pkl, archive/data/<key>).  tests/data/tiny-ckpt.pt is a real
torch.save file, checked against the values torch itself dumped to JSON.
"""

import json
import os
import random
import stat
import struct
import subprocess
import sys
import tempfile
import unittest
import zipfile
from array import array

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(ROOT, "tools")
DATA = os.path.join(ROOT, "tests", "data")
CONVERT = os.path.join(TOOLS, "moas-convert")
sys.path.insert(0, TOOLS)
sys.dont_write_bytecode = True
import gguf          # noqa: E402
import moas_forward  # noqa: E402


def _load_converter():
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("moas_convert", CONVERT)
    spec = importlib.util.spec_from_loader("moas_convert", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


moas_convert = _load_converter()


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def f32(values):
    return list(array("f", values))


# ---------------------------------------------------------------------------
# A tiny pickle assembler (protocol 2 opcodes, as torch.save writes them)
# ---------------------------------------------------------------------------

class G:
    """A global reference: GLOBAL 'module name'."""
    def __init__(self, module, name):
        self.module, self.name = module, name


class R:
    """REDUCE: callable(*args)."""
    def __init__(self, func, args):
        self.func, self.args = func, tuple(args)


class NewObj:
    """NEWOBJ: cls.__new__(cls, *args)."""
    def __init__(self, cls, args):
        self.cls, self.args = cls, tuple(args)


class Build:
    """BUILD: obj.__setstate__(state)."""
    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class PersId:
    """BINPERSID of a tuple."""
    def __init__(self, pid):
        self.pid = tuple(pid)


def _emit(obj, out):
    if obj is None:
        out += b"N"
    elif obj is True:
        out += b"\x88"
    elif obj is False:
        out += b"\x89"
    elif isinstance(obj, int):
        if -2**31 <= obj < 2**31:
            out += b"J" + struct.pack("<i", obj)
        else:
            raw = obj.to_bytes(16, "little", signed=True)
            out += b"\x8a" + bytes([16]) + raw
    elif isinstance(obj, float):
        out += b"G" + struct.pack(">d", obj)
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        out += b"X" + struct.pack("<I", len(b)) + b
    elif isinstance(obj, bytes):
        out += b"B" + struct.pack("<I", len(obj)) + obj
    elif isinstance(obj, tuple):
        if not obj:
            out += b")"
        else:
            out += b"("
            for v in obj:
                _emit(v, out)
            out += b"t"
    elif isinstance(obj, list):
        out += b"]"
        if obj:
            out += b"("
            for v in obj:
                _emit(v, out)
            out += b"e"
    elif isinstance(obj, dict):
        out += b"}"
        if obj:
            out += b"("
            for k, v in obj.items():
                _emit(k, out)
                _emit(v, out)
            out += b"u"
    elif isinstance(obj, G):
        out += b"c" + obj.module.encode() + b"\n" + obj.name.encode() + b"\n"
    elif isinstance(obj, R):
        _emit(obj.func, out)
        _emit(obj.args, out)
        out += b"R"
    elif isinstance(obj, NewObj):
        _emit(obj.cls, out)
        _emit(obj.args, out)
        out += b"\x81"
    elif isinstance(obj, Build):
        _emit(obj.obj, out)
        _emit(obj.state, out)
        out += b"b"
    elif isinstance(obj, PersId):
        _emit(obj.pid, out)
        out += b"Q"
    else:
        raise TypeError(type(obj))


def assemble(obj):
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    out += b"."
    return bytes(out)


# ---------------------------------------------------------------------------
# Hand-made torch checkpoints
# ---------------------------------------------------------------------------

class Ckpt:
    """Collects storages and builds the pickle nodes of tensors."""

    def __init__(self):
        self.storages = {}          # key -> bytes

    def storage(self, values, fmt="f", stype="FloatStorage"):
        key = str(len(self.storages))
        self.storages[key] = struct.pack("<%d%s" % (len(values), fmt), *values)
        return (key, stype, len(values))

    def tensor(self, storage, shape, stride=None, offset=0):
        key, stype, numel = storage
        if stride is None:
            stride, acc = [], 1
            for s in reversed(shape):
                stride.append(acc)
                acc *= s
            stride = tuple(reversed(stride))
        pid = PersId(("storage", G("torch", stype), key, "cpu", numel))
        return R(G("torch._utils", "_rebuild_tensor_v2"),
                 (pid, offset, tuple(shape), tuple(stride), False,
                  R(G("collections", "OrderedDict"), ())))

    def new_tensor(self, values, shape):
        return self.tensor(self.storage(values), shape)

    def write(self, path, root, prefix="archive", pickle_bytes=None):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            z.writestr(prefix + "/data.pkl", pickle_bytes if pickle_bytes is not None
                       else assemble(root))
            z.writestr(prefix + "/byteorder", "little")
            for key, raw in self.storages.items():
                z.writestr(prefix + "/data/" + key, raw)
            z.writestr(prefix + "/version", "3\n")


TEXT = "hello world\nthe quick brown fox\n"
VOCAB = sorted(set(TEXT))


def model_tensors(atype, bias, C=8, H=4, L=2, T=4, V=len(VOCAB), n_ff=None, R=None, G_=2,
                  seed=1, n_scheme=3):
    """OrderedDict reference key -> (shape, f32 values) of a random model."""
    rnd = random.Random(seed)
    d = C // H
    n_ff = n_ff or 4 * C
    R = R or C // 4
    sd = {}

    def put(key, shape):
        n = 1
        for s in shape:
            n *= s
        sd[key] = (tuple(shape), f32([rnd.gauss(0, 0.5) for _ in range(n)]))

    def lin(prefix, n_out, n_in):
        put(prefix + ".weight", (n_out, n_in))
        if bias:
            put(prefix + ".bias", (n_out,))

    def ln(prefix):
        put(prefix + ".weight", (C,))
        if bias:
            put(prefix + ".bias", (C,))

    put("transformer.wte.weight", (V, C))
    put("transformer.wpe.weight", (T, C))
    for i in range(L):
        p = "transformer.h.%d." % i
        ln(p + "ln_1")
        if atype == "baseline":
            lin(p + "attn.c_attn", 3 * C, C)
            lin(p + "attn.c_proj", C, C)
        elif atype == "pooled_moas":
            for m in ("q_proj", "k_proj", "v_proj", "c_proj"):
                lin(p + "attn." + m, C, C)
            lin(p + "attn.router.0", R, C)
            lin(p + "attn.router.2", n_scheme, R)
        elif atype == "gqa":
            lin(p + "attn.q_proj", C, C)
            lin(p + "attn.k_proj", G_ * d, C)
            lin(p + "attn.v_proj", G_ * d, C)
            lin(p + "attn.c_proj", C, C)
        else:
            lin(p + "attn.mha.c_attn", 3 * C, C)
            lin(p + "attn.mha.c_proj", C, C)
            for br, g in (("gqa", G_), ("mqa", 1)):
                lin(p + "attn.%s.q_proj" % br, C, C)
                lin(p + "attn.%s.k_proj" % br, g * d, C)
                lin(p + "attn.%s.v_proj" % br, g * d, C)
                lin(p + "attn.%s.c_proj" % br, C, C)
            if atype == "moas":
                lin(p + "attn.router.0", R, C)
                lin(p + "attn.router.2", 3, R)
        ln(p + "ln_2")
        lin(p + "mlp.c_fc", n_ff, C)
        lin(p + "mlp.c_proj", C, n_ff)
    ln("transformer.ln_f")
    return sd


def expected_gguf(sd, atype, bias, C=8, L=2):
    """GGUF name -> (row-major shape, values), straight from docs/FORMAT.md."""
    exp = {"token_embd.weight": sd["transformer.wte.weight"],
           "position_embd.weight": sd["transformer.wpe.weight"]}

    def copy(name, key):
        exp[name + ".weight"] = sd[key + ".weight"]
        if bias:
            exp[name + ".bias"] = sd[key + ".bias"]

    def fused(blk, key, s):
        shape, w = sd[key + ".c_attn.weight"]
        for j, part in enumerate("qkv"):
            exp["%s.attn_%s.%d.weight" % (blk, part, s)] = ((C, C), w[j * C * C:(j + 1) * C * C])
            if bias:
                b = sd[key + ".c_attn.bias"][1]
                exp["%s.attn_%s.%d.bias" % (blk, part, s)] = ((C,), b[j * C:(j + 1) * C])
        copy("%s.attn_output.%d" % (blk, s), key + ".c_proj")

    for i in range(L):
        blk, p = "blk.%d" % i, "transformer.h.%d." % i
        copy(blk + ".attn_norm", p + "ln_1")
        if atype == "baseline":
            fused(blk, p + "attn", 0)
        elif atype == "pooled_moas":
            # docs/FORMAT.md "Pooled K/V": no scheme index.
            for part, src in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                              ("output", "c_proj")):
                copy("%s.attn_%s" % (blk, part), "%sattn.%s" % (p, src))
            copy(blk + ".attn_router_up", p + "attn.router.0")
            copy(blk + ".attn_router_down", p + "attn.router.2")
        elif atype == "gqa":
            # docs/FORMAT.md: one scheme [G], its tensors as any scheme's.
            for part, src in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                              ("output", "c_proj")):
                copy("%s.attn_%s.0" % (blk, part), "%sattn.%s" % (p, src))
        else:
            fused(blk, p + "attn.mha", 0)
            for s, br in ((1, "gqa"), (2, "mqa")):
                for part, src in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"),
                                  ("output", "c_proj")):
                    copy("%s.attn_%s.%d" % (blk, part, s), "%sattn.%s.%s" % (p, br, src))
            if atype == "moas":
                copy(blk + ".attn_router_up", p + "attn.router.0")
                copy(blk + ".attn_router_down", p + "attn.router.2")
        copy(blk + ".ffn_norm", p + "ln_2")
        copy(blk + ".ffn_up", p + "mlp.c_fc")
        copy(blk + ".ffn_down", p + "mlp.c_proj")
    copy("output_norm", "transformer.ln_f")
    return exp


def build_checkpoint(path, sd, model_args, key_prefix="", tie="shared", extra_sd=None,
                     extras=True, prefix="archive", mutate=None):
    """Write a reference-layout checkpoint holding the tensors of sd.

    tie: "shared" (lm_head shares wte's storage), "copy" (same values, own
    storage), "untied" (different values), "absent" (no lm_head key).
    """
    ck = Ckpt()
    state = {}
    for key, (shape, values) in sd.items():
        state[key_prefix + key] = ck.new_tensor(values, shape)
    wte_shape, wte_values = sd["transformer.wte.weight"]
    if tie == "shared":
        state[key_prefix + "lm_head.weight"] = state[key_prefix + "transformer.wte.weight"]
    elif tie == "copy":
        state[key_prefix + "lm_head.weight"] = ck.new_tensor(list(wte_values), wte_shape)
    elif tie == "untied":
        state[key_prefix + "lm_head.weight"] = ck.new_tensor(
            f32([v * 0.5 + 0.125 for v in wte_values]), wte_shape)
    for key, node in (extra_sd or {}).items():
        state[key] = node(ck) if callable(node) else node
    root = {"model": R(G("collections", "OrderedDict"), ([[k, v] for k, v in state.items()],)),
            "model_args": model_args}
    if extras:
        # What real checkpoints carry beside the weights.
        step = ck.new_tensor([2.0], ())
        root["optimizer"] = {"state": {0: {"step": step, "exp_avg": ck.new_tensor([0.5] * 4, (2, 2))}},
                             "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]}
        root["iter_num"] = 2
        root["best_val_loss"] = ck.new_tensor([1.25], ())
        root["config"] = ["batch_size", "block_size"]
        root["torch_version"] = NewObj(G("torch.torch_version", "TorchVersion"), ("1.13.0",))
        dtype = Build(R(G("numpy", "dtype"), ("f8", False, True)),
                      (3, "<", None, None, None, -1, -1, 0))
        root["np_loss"] = R(G("numpy.core.multiarray", "scalar"),
                            (dtype, R(G("_codecs", "encode"),
                                      ("\x00\x00\x00\x00\x00\x00\x04@", "latin1"))))
        root["size"] = R(G("torch", "Size"), ([2, 3],))
        root["device"] = R(G("torch", "device"), ("cpu",))
        root["names"] = R(G("__builtin__", "set"), (["a", "b"],))
    if mutate:
        mutate(ck)
    ck.write(path, root, prefix=prefix)


def margs(atype, bias, C=8, H=4, L=2, T=4, V=len(VOCAB), schemes=None, n_kv_head=None):
    a = {"n_layer": L, "n_head": H, "n_embd": C, "block_size": T, "bias": bias,
         "vocab_size": V, "dropout": 0.0, "attention_type": atype}
    if schemes is not None:
        a["schemes"] = schemes
    if n_kv_head is not None:
        a["n_kv_head"] = n_kv_head
    return a


class Tmp(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="moas-test-")
        self.dir = self._tmp.name
        self.text = self.path("train.txt")
        with open(self.text, "w", encoding="utf-8") as f:
            f.write(TEXT)

    def tearDown(self):
        self._tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    # Most tests call the converter's main() in-process (Python start-up is
    # the bulk of a conversion this small); the CLI tests use a subprocess.
    def convert(self, ckpt, *extra, out="out.gguf", vocab=True, in_process=True):
        argv = [ckpt, "-o", self.path(out)]
        if vocab:
            argv += ["--vocab-text", self.text]
        argv += list(extra)
        if in_process:
            import contextlib
            import io
            out_buf, err_buf = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err_buf):
                rc = moas_convert.main(argv)
            return Result(rc, out_buf.getvalue(), err_buf.getvalue())
        res = subprocess.run([sys.executable, CONVERT] + argv, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
        self.assertNotIn("Traceback", res.stderr)
        return res

    def convert_ok(self, ckpt, *extra):
        res = self.convert(ckpt, *extra)
        self.assertEqual(res.returncode, 0, res.stderr)
        return gguf.GGUFReader(self.path("out.gguf"))

    def convert_fails(self, ckpt, *needles, extra=(), in_process=True):
        if os.path.exists(self.path("out.gguf")):
            os.unlink(self.path("out.gguf"))
        res = self.convert(ckpt, *extra, in_process=in_process)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        lines = res.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, res.stderr)
        self.assertTrue(lines[0].startswith("moas-convert: error: "), lines[0])
        for n in needles:
            self.assertIn(n, lines[0])
        self.assertFalse(os.path.exists(self.path("out.gguf")))
        self.assertEqual([f for f in os.listdir(self.dir) if ".tmp" in f], [])
        return lines[0]


# ---------------------------------------------------------------------------
# tools/gguf.py
# ---------------------------------------------------------------------------

class TestGGUF(unittest.TestCase):
    def test_metadata_round_trip(self):
        w = gguf.GGUFWriter()
        kvs = [("u8", gguf.UINT8, 255, None), ("i8", gguf.INT8, -128, None),
               ("u16", gguf.UINT16, 65535, None), ("i16", gguf.INT16, -32768, None),
               ("u32", gguf.UINT32, 2**32 - 1, None), ("i32", gguf.INT32, -2**31, None),
               ("f32", gguf.FLOAT32, 1.5, None), ("b", gguf.BOOL, True, None),
               ("s", gguf.STRING, "héllo — ✓", None), ("u64", gguf.UINT64, 2**64 - 1, None),
               ("i64", gguf.INT64, -2**63, None), ("f64", gguf.FLOAT64, 0.1, None),
               ("as", gguf.ARRAY, ["\n", "é", "", "—"], gguf.STRING),
               ("ai", gguf.ARRAY, [6, 2, 1], gguf.UINT32),
               ("ai64", gguf.ARRAY, [-1, 2**40], gguf.INT64),
               ("af", gguf.ARRAY, [0.5, -2.0], gguf.FLOAT32),
               ("ab", gguf.ARRAY, [True, False], gguf.BOOL),
               ("empty", gguf.ARRAY, [], gguf.UINT8),
               ("nested", gguf.ARRAY, [(gguf.UINT8, [1, 2]), (gguf.STRING, ["x"])], gguf.ARRAY)]
        for key, vt, v, et in kvs:
            w.add_kv(key, vt, v, et)
        r = gguf.GGUFReader(w.to_bytes())
        self.assertEqual(r.kv["general.alignment"], 64)
        for key, vt, v, et in kvs:
            self.assertEqual(r.kv[key], v, key)
            self.assertEqual(r.kv_types[key], (vt, et), key)
        self.assertEqual(list(r.kv)[0], "general.alignment")

    def test_writer_rejects(self):
        w = gguf.GGUFWriter()
        w.add_uint32("k", 1)
        self.assertRaises(gguf.GGUFError, w.add_uint32, "k", 2)          # duplicate
        self.assertRaises(gguf.GGUFError, w.add_uint8, "x", 256)         # range
        self.assertRaises(gguf.GGUFError, w.add_uint32, "y", 1.5)
        # a float key takes numbers only: "1.5" and True were stored as 1.5 and 1.0
        self.assertRaises(gguf.GGUFError, w.add_float32, "f", "1.5")
        self.assertRaises(gguf.GGUFError, w.add_float64, "g", True)
        self.assertRaises(gguf.GGUFError, w.add_array, "h", gguf.FLOAT32, [1.0, "2"])
        w.add_float32("f", 2)   # an int is a number
        self.assertRaises(gguf.GGUFError, w.add_tensor, "t", [0.0] * 48, (48,), gguf.Q8_0)
        self.assertRaises(gguf.GGUFError, w.add_tensor, "t", [0.0] * 3, (2, 2))
        self.assertRaises(gguf.GGUFError, gguf.GGUFWriter, 48)

    def test_tensor_types_round_trip(self):
        rnd = random.Random(3)
        vals = f32([rnd.gauss(0, 2) for _ in range(4 * 64)])
        w = gguf.GGUFWriter()
        for t in (gguf.F32, gguf.F16, gguf.BF16, gguf.Q8_0):
            w.add_tensor("t%d" % t, vals, (4, 64), t)
        w.add_tensor("odd", vals[:7], (7,), gguf.F32)     # unaligned size
        w.add_tensor("after", vals[:5], (5,), gguf.F16)
        data = w.to_bytes()
        r = gguf.GGUFReader(data)
        self.assertEqual(r.data_offset % 64, 0)
        for t in r.tensors.values():
            self.assertEqual((t.offset - r.data_offset) % 64, 0)
        self.assertEqual(r.tensors["t0"].ne, (64, 4))
        self.assertEqual(r.tensors["t0"].shape, (4, 64))
        self.assertEqual(r.tensor_values("t0"), vals)
        self.assertEqual(r.tensor_values("odd"), vals[:7])
        self.assertEqual(r.tensor_values("t1"), [struct.unpack("<e", struct.pack("<e", v))[0]
                                                  for v in vals])
        for t, tol in ((gguf.BF16, 2 ** -8), (gguf.Q8_0, 1 / 127 + 1e-3)):
            got = r.tensor_values("t%d" % t)
            for i, (a, b) in enumerate(zip(got, vals)):
                scale = abs(b) if t == gguf.BF16 else max(abs(x) for x in vals[i // 32 * 32:][:32])
                self.assertLessEqual(abs(a - b), tol * scale, (t, i))
        self.assertEqual(len(data), r.tensors["after"].offset + 10 + 54)   # padded to 64

    def test_alignment_32(self):
        # without the key, readers take 32: another alignment would shift every tensor
        # (the second tensor of this file read as 0.0, not 1.0)
        with self.assertRaisesRegex(gguf.GGUFError, "alignment 64 needs the general"):
            gguf.GGUFWriter(alignment=64, write_alignment_key=False)
        w = gguf.GGUFWriter(alignment=32, write_alignment_key=False)
        w.add_tensor("a", [1.0, 2.0], (2,))
        w.add_tensor("b", [1.0], (1,))
        r = gguf.GGUFReader(w.to_bytes())
        self.assertNotIn("general.alignment", r.kv)
        self.assertEqual((r.alignment, r.tensor_values("b")), (32, [1.0]))
        w = gguf.GGUFWriter(alignment=32)
        w.add_tensor("a", [1.0] * 3, (3,))
        w.add_tensor("b", [2.0] * 3, (3,))
        r = gguf.GGUFReader(w.to_bytes())
        self.assertEqual(r.alignment, 32)
        self.assertEqual(r.tensors["b"].offset - r.tensors["a"].offset, 32)

    def test_q8_0_known_values(self):
        block1 = [float(i - 16) for i in range(32)]        # amax 16: d = 16/127
        block2 = [0.0] * 32                                # d = 0, q = 0
        block3 = [2.5, -2.5, 0.5, -0.5, 127.0] + [1.0] * 27   # d = 1: ties away from 0
        raw = gguf.quantize_q8_0(block1 + block2 + block3)
        self.assertEqual(len(raw), 3 * 34)
        d1 = struct.unpack("<e", raw[0:2])[0]
        self.assertEqual(raw[0:2], struct.pack("<e", 16 / 127))
        q1 = list(struct.unpack("<32b", raw[2:34]))
        self.assertEqual(q1[0], -127)                      # -16
        self.assertEqual(q1[17], 8)                        # 1 * 127/16 = 7.94
        self.assertEqual(q1[31], 119)                      # 15 * 127/16 = 119.06
        self.assertEqual(q1[16], 0)
        self.assertAlmostEqual(d1, 0.1259765625)
        self.assertEqual(raw[34:68], bytes(34))
        self.assertEqual(raw[68:70], struct.pack("<e", 1.0))
        self.assertEqual(list(struct.unpack("<5b", raw[70:75])), [3, -3, 1, -1, 127])
        back = gguf.dequantize_q8_0(raw, 96)
        self.assertEqual(back[32:64], [0.0] * 32)
        self.assertEqual(back[64:69], [3.0, -3.0, 1.0, -1.0, 127.0])
        self.assertAlmostEqual(back[0], -127 * d1, places=6)

    def test_q8_0_extreme_blocks(self):
        """A block so small that 1/d overflows float32 (C's would be inf, and q undefined)
        decodes to zeros as its F16 scale of 0 says; one whose scale d = amax / 127 is
        beyond F16 is refused, naming the tensor, not stored as an inf scale."""
        tiny = [1e-38, -3e-39] + [0.0] * 30
        self.assertEqual(gguf.quantize_q8_0(tiny), bytes(34))
        small = [1e-7] + [0.0] * 31                     # 1/d fits: ggml's q, scale 0
        self.assertEqual(gguf.quantize_q8_0(small)[:3], b"\x00\x00\x7f")
        with self.assertRaisesRegex(gguf.GGUFError, "values 32..63.*beyond F16"):
            gguf.quantize_q8_0([0.5] * 32 + [9e6] + [0.5] * 31)
        w = gguf.GGUFWriter()
        w.add_tensor("blk.0.ffn_up.weight", [0.5] * 63 + [-9e6], (2, 32), gguf.Q8_0)
        with self.assertRaisesRegex(gguf.GGUFError, "'blk.0.ffn_up.weight'.*beyond F16"):
            w.to_bytes()

    def test_f16_bf16_known_values(self):
        self.assertEqual(gguf.encode_tensor([1.0, -2.0, 65504.0, 1e6], gguf.F16),
                         bytes.fromhex("003c00c0ff7b007c"))
        self.assertEqual(gguf.encode_tensor([1.0, 1.00390625, 1.01171875, -0.0], gguf.BF16),
                         bytes.fromhex("803f803f823f0080"))
        self.assertEqual(gguf.decode_tensor(bytes.fromhex("803f40c0"), gguf.BF16, 2), [1.0, -3.0])

    def test_reader_rejects(self):
        w = gguf.GGUFWriter()
        w.add_string("general.architecture", "moas")
        w.add_tensor("a", [1.0] * 8, (8,))
        good = w.to_bytes()
        bad_cases = {
            "magic": b"GGUX" + good[4:],
            "version": good[:4] + struct.pack("<I", 2) + good[8:],
            "truncated": good[:-40],            # into the tensor data
            "header": good[:30],
        }
        for what, blob in bad_cases.items():
            with self.assertRaises(gguf.GGUFError, msg=what):
                gguf.GGUFReader(blob)
        # a file is read whole: a device without an end is refused, not read until
        # memory runs out
        if os.path.exists("/dev/zero"):
            with self.assertRaisesRegex(gguf.GGUFError, "not a regular file"):
                gguf.GGUFReader("/dev/zero")


# ---------------------------------------------------------------------------
# tools/moas-convert
# ---------------------------------------------------------------------------

class TestConvert(Tmp):
    def check_model(self, r, atype, bias, sd, C=8, H=4, L=2, T=4, types=None, schemes=None):
        kv = r.kv
        self.assertEqual(kv["general.architecture"], "moas")
        self.assertEqual(kv["general.alignment"], 64)
        self.assertEqual(r.alignment, 64)
        self.assertEqual(kv["moas.context_length"], T)
        self.assertEqual(kv["moas.embedding_length"], C)
        self.assertEqual(kv["moas.block_count"], L)
        self.assertEqual(kv["moas.feed_forward_length"], 4 * C)
        self.assertEqual(kv["moas.attention.head_count"], H)
        self.assertAlmostEqual(kv["moas.attention.layer_norm_epsilon"], 1e-5, places=10)
        self.assertEqual(r.kv_types["moas.attention.layer_norm_epsilon"][0], gguf.FLOAT32)
        self.assertEqual(kv["moas.attention.scheme_kv_heads"],
                         schemes or ([H] if atype == "baseline" else [H, 2, 1]))
        self.assertEqual(r.kv_types["moas.attention.scheme_kv_heads"], (gguf.ARRAY, gguf.UINT32))
        self.assertEqual(kv["moas.attention.mixing"],
                         {"baseline": "single", "static_moas": "mean", "moas": "router",
                          "pooled_moas": "router", "gqa": "single"}[atype])
        self.assertEqual(kv["moas.attention.kv_sharing"],
                         "pooled" if atype == "pooled_moas" else "independent")
        self.assertEqual(kv["moas.bias"], bias)
        self.assertEqual(r.kv_types["moas.bias"][0], gguf.BOOL)
        if atype in ("moas", "pooled_moas"):
            self.assertEqual(kv["moas.router.hidden_length"], C // 4)
        else:
            self.assertNotIn("moas.router.hidden_length", kv)
        self.assertEqual(kv["tokenizer.ggml.model"], "char")
        self.assertEqual(kv["tokenizer.ggml.tokens"], VOCAB)
        exp = expected_gguf(sd, atype, bias, C=C, L=L)
        self.assertEqual(sorted(r.tensors), sorted(exp))
        for name, (shape, values) in exp.items():
            t = r.tensors[name]
            self.assertEqual(t.shape, tuple(shape), name)
            want_type = (types or {}).get(name, gguf.F32)
            self.assertEqual(t.ttype, want_type, name)
            got = r.tensor_values(name)
            if want_type == gguf.F32:
                self.assertEqual(got, list(values), name)
            else:
                for a, b in zip(got, values):
                    self.assertAlmostEqual(a, b, delta=0.02 * max(1.0, abs(b)), msg=name)

    def test_all_attention_types_and_bias(self):
        # the converter runs in-process and needs neither torch nor numpy: with both
        # made unimportable (a None entry in sys.modules makes `import` fail), it still
        # converts every attention type
        from unittest import mock
        with mock.patch.dict(sys.modules, {"torch": None, "numpy": None}):
            for atype in ("moas", "static_moas", "baseline"):
                for bias in (True, False):
                    with self.subTest(atype=atype, bias=bias):
                        sd = model_tensors(atype, bias)
                        ck = self.path("%s-%s.pt" % (atype, bias))
                        build_checkpoint(ck, sd, margs(atype, bias))
                        r = self.convert_ok(ck)
                        self.check_model(r, atype, bias, sd)
                        self.assertNotIn("output.weight", r.tensors)
                        self.assertEqual(any(n.endswith(".bias") for n in r.tensors), bias)

    def test_pooled_checkpoint(self):
        """tools/train.py --attention-type pooled_moas -> docs/FORMAT.md "Pooled K/V"."""
        for bias in (True, False):
            with self.subTest(bias=bias):
                sd = model_tensors("pooled_moas", bias)
                ck = self.path("pooled-%s.pt" % bias)
                build_checkpoint(ck, sd, margs("pooled_moas", bias, schemes=[4, 2, 1]))
                r = self.convert_ok(ck)
                self.check_model(r, "pooled_moas", bias, sd)
                names = sorted(n for n in r.tensors if n.startswith("blk.0.attn_"))
                want = ["blk.0.attn_%s.%s" % (t, k) for t in ("k", "norm", "output", "q",
                                                                "router_down", "router_up", "v")
                        for k in (("bias", "weight") if bias else ("weight",))]
                self.assertEqual(names, sorted(want))
                self.assertEqual(r.tensors["blk.1.attn_k.weight"].ne, (8, 8))   # all H heads
                self.assertEqual(r.tensors["blk.1.attn_router_down.weight"].ne, (2, 3))
        # Without 'schemes' in model_args: the reference's [H, 2, 1]; with a
        # mask buffer (attn.bias) as torch < 2 would store one.
        sd = model_tensors("pooled_moas", True)
        tril = [1.0 if j <= i else 0.0 for i in range(4) for j in range(4)]
        build_checkpoint(ck, sd, margs("pooled_moas", True), key_prefix="_orig_mod.",
                         extra_sd={"transformer.h.1.attn.bias":
                                   lambda c: c.new_tensor(tril, (1, 1, 4, 4))})
        self.check_model(self.convert_ok(ck), "pooled_moas", True, sd)

    def test_block_options(self):
        """tools/train.py --pos rope --norm rms --mlp swiglu -> docs/FORMAT.md "Block
        options": the keys, no position_embd, ffn_gate; absent model_args keys are
        inferred from the tensors (no wpe: RoPE; mlp.c_gate: SwiGLU)."""
        sd = model_tensors("pooled_moas", False, n_ff=24)
        del sd["transformer.wpe.weight"]
        rnd = random.Random(5)
        for i in range(2):
            sd["transformer.h.%d.mlp.c_gate.weight" % i] = (
                (24, 8), f32([rnd.gauss(0, 0.5) for _ in range(24 * 8)]))
        ck = self.path("modern.pt")
        a = dict(margs("pooled_moas", False), pos="rope", rope_base=500.0, norm="rms",
                 mlp="swiglu", n_ff=24)
        build_checkpoint(ck, sd, a)
        r = self.convert_ok(ck)
        self.assertEqual((r.kv["moas.position_encoding"], r.kv["moas.rope.freq_base"],
                          r.kv["moas.norm_type"], r.kv["moas.feed_forward_type"]),
                         ("rope", 500.0, "rms", "swiglu"))
        self.assertEqual(r.kv["moas.feed_forward_length"], 24)
        self.assertNotIn("position_embd.weight", r.tensors)
        self.assertEqual(r.tensors["blk.1.ffn_gate.weight"].ne, (8, 24))
        self.assertEqual(r.tensor_values("blk.1.ffn_gate.weight"),
                         sd["transformer.h.1.mlp.c_gate.weight"][1])
        # inferred: RoPE with the default base, SwiGLU, LayerNorm (not visible in shapes)
        for k in ("pos", "rope_base", "norm", "mlp"):
            del a[k]
        build_checkpoint(ck, sd, a)
        r = self.convert_ok(ck)
        self.assertEqual((r.kv["moas.position_encoding"], r.kv["moas.rope.freq_base"],
                          r.kv.get("moas.norm_type"), r.kv["moas.feed_forward_type"]),
                         ("rope", 10000.0, None, "swiglu"))
        # the published block writes none of the keys
        sd = model_tensors("moas", True)
        build_checkpoint(ck, sd, margs("moas", True))
        r = self.convert_ok(ck)
        for k in ("moas.position_encoding", "moas.rope.freq_base", "moas.norm_type",
                  "moas.feed_forward_type"):
            self.assertNotIn(k, r.kv)
        # refused: an unknown option, an odd head size with RoPE
        build_checkpoint(ck, sd, dict(margs("moas", True), norm="batch"))
        self.convert_fails(ck, "model_args['norm']", "batch")
        # a base outside libmoas's (1, 1e30), also once rounded to the float32 the file
        # holds (1 + 1e-9 is 1.0 there, 0.99999999e30 is above 1e30)
        for base in (1e31, 1.0 + 1e-9, 0.99999999e30):
            build_checkpoint(ck, sd, dict(margs("moas", True), pos="rope", rope_base=base))
            self.convert_fails(ck, "model_args['rope_base'] is %r" % base, "below 1e30")
        sd = model_tensors("baseline", False, C=12)
        del sd["transformer.wpe.weight"]
        build_checkpoint(ck, sd, dict(margs("baseline", False, C=12), pos="rope"))
        self.convert_fails(ck, "even head size")
        # n_ff is read from the weights; a stated width must agree with them
        sd = model_tensors("moas", True, n_ff=24)
        build_checkpoint(ck, sd, dict(margs("moas", True), n_ff=32))
        self.convert_fails(ck, "model_args['n_ff'] is 32", "24 wide")
        build_checkpoint(ck, sd, dict(margs("moas", True), n_ff="24"))
        self.convert_fails(ck, "model_args['n_ff'] is '24'", "positive integer")
        build_checkpoint(ck, sd, dict(margs("moas", True), n_ff=24))
        self.assertEqual(self.convert_ok(ck).kv["moas.feed_forward_length"], 24)

    def test_pooled_schemes(self):
        ck = self.path("c.pt")
        # Two schemes, MHA and MQA.
        sd = model_tensors("pooled_moas", False, n_scheme=2)
        build_checkpoint(ck, sd, margs("pooled_moas", False, schemes=[4, 1]))
        self.check_model(self.convert_ok(ck), "pooled_moas", False, sd, schemes=[4, 1])
        # As a string, e.g. from safetensors metadata.
        build_checkpoint(ck, sd, margs("pooled_moas", False, schemes="H,1"))
        self.check_model(self.convert_ok(ck), "pooled_moas", False, sd, schemes=[4, 1])
        # The router must have one output per scheme.
        build_checkpoint(ck, sd, margs("pooled_moas", False, schemes=[4, 2, 1]))
        self.convert_fails(ck, "'transformer.h.0.attn.router.2.weight'",
                           "shape [2, 2], expected [3, 2]")
        # No scheme has to keep all H heads: [2, 1] routes between GQA-2 and MQA.
        build_checkpoint(ck, sd, margs("pooled_moas", False, schemes=[2, 1]))
        self.check_model(self.convert_ok(ck), "pooled_moas", False, sd, schemes=[2, 1])
        for bad in ([3, 1], [], [4, 0], "4,x", 4):
            build_checkpoint(ck, sd, margs("pooled_moas", False, schemes=bad))
            self.convert_fails(ck, "schemes")
        # Attention type from the keys; n_head is not in the shapes.
        sd = model_tensors("pooled_moas", False)
        ma = margs("pooled_moas", False)
        del ma["attention_type"]
        build_checkpoint(ck, sd, ma)
        self.check_model(self.convert_ok(ck), "pooled_moas", False, sd)
        del ma["n_head"]
        build_checkpoint(ck, sd, ma)
        self.convert_fails(ck, "n_head", "pooled_moas", "--config")
        # Another type's scheme list or kv heads would be ignored: refused, as train.py's
        # ModelArgs refuses them.
        sd = model_tensors("moas", False)
        for extra, owner in (({"schemes": [4, 2, 1]}, "pooled_moas"),
                             ({"n_kv_head": 2}, "gqa")):
            build_checkpoint(ck, sd, dict(margs("moas", False), **extra))
            self.convert_fails(ck, "model_args['%s'] is for %s models, not moas"
                               % (list(extra)[0], owner))
        sd = model_tensors("gqa", False)
        build_checkpoint(ck, sd, margs("gqa", False, n_kv_head=2, schemes="H,1"))
        self.convert_fails(ck, "model_args['schemes'] is for pooled_moas models, not gqa")
        # A pooled key in another type's checkpoint is unexpected.
        sd = model_tensors("moas", False)
        build_checkpoint(ck, sd, margs("moas", False), extra_sd={
            "transformer.h.0.attn.k_proj.weight": lambda c: c.new_tensor([0.0] * 64, (8, 8))})
        self.convert_fails(ck, "unexpected tensor 'transformer.h.0.attn.k_proj.weight'")

    def test_gqa_checkpoint(self):
        """tools/train.py --attention-type gqa: one scheme [G], mixing single."""
        ck = self.path("g.pt")
        for g in (2, 1):
            for bias in (True, False):
                with self.subTest(g=g, bias=bias):
                    sd = model_tensors("gqa", bias, G_=g)
                    build_checkpoint(ck, sd, margs("gqa", bias, n_kv_head=g))
                    r = self.convert_ok(ck)
                    self.check_model(r, "gqa", bias, sd, schemes=[g])
                    self.assertEqual(r.tensors["blk.1.attn_k.0.weight"].ne, (8, 2 * g))
        # G from layer 0's k_proj when model_args lack it, and the type from the keys
        # (q_proj without a router); n_head is not in the shapes.
        sd = model_tensors("gqa", False, G_=1)
        ma = margs("gqa", False)
        build_checkpoint(ck, sd, ma)
        self.check_model(self.convert_ok(ck), "gqa", False, sd, schemes=[1])
        del ma["attention_type"]
        build_checkpoint(ck, sd, ma)
        self.check_model(self.convert_ok(ck), "gqa", False, sd, schemes=[1])
        del ma["n_head"]
        build_checkpoint(ck, sd, ma)
        self.convert_fails(ck, "n_head", "gqa", "--config")
        # G must divide H and be below it (H itself is a baseline model).
        for bad in (3, 4, 0, "x"):
            build_checkpoint(ck, sd, margs("gqa", False, n_kv_head=bad))
            self.convert_fails(ck, "n_kv_head")
        # model_args' G and the tensors must agree.
        build_checkpoint(ck, sd, margs("gqa", False, n_kv_head=2))
        self.convert_fails(ck, "'transformer.h.0.attn.k_proj.weight'", "expected [4, 8]")

    def test_command_line(self):
        sd = model_tensors("moas", True)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", True))
        res = self.convert(ck, "--name", "tiny", in_process=False)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertIn("wrote", res.stdout)
        r = gguf.GGUFReader(self.path("out.gguf"))
        self.assertEqual(r.kv["general.name"], "tiny")
        self.check_model(r, "moas", True, sd)
        res = self.convert(ck, "--type", "f64", in_process=False)
        self.assertEqual(res.returncode, 2)
        self.assertEqual(len(res.stderr.strip().splitlines()), 1, res.stderr)

    def test_orig_mod_prefix(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False), key_prefix="_orig_mod.")
        self.check_model(self.convert_ok(ck), "moas", False, sd)

    def test_mask_buffers_skipped_with_real_biases(self):
        # bias=True baseline: attn.bias is the [1,1,T,T] mask, attn.c_attn.bias a real bias.
        sd = model_tensors("baseline", True)
        tril = [1.0 if j <= i else 0.0 for i in range(4) for j in range(4)]
        extra = {"transformer.h.%d.attn.bias" % i: (lambda ck: ck.new_tensor(tril, (1, 1, 4, 4)))
                 for i in range(2)}
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("baseline", True), extra_sd=extra)
        self.check_model(self.convert_ok(ck), "baseline", True, sd)
        # moas: attn.mha.bias / gqa / mqa masks
        sd = model_tensors("moas", True)
        extra = {"transformer.h.%d.attn.%s.bias" % (i, br):
                 (lambda ck: ck.new_tensor(tril, (1, 1, 4, 4)))
                 for i in range(2) for br in ("mha", "gqa", "mqa")}
        build_checkpoint(ck, sd, margs("moas", True), extra_sd=extra)
        self.check_model(self.convert_ok(ck), "moas", True, sd)

    def test_mask_name_with_wrong_shape(self):
        sd = model_tensors("moas", True)
        extra = {"transformer.h.0.attn.mha.bias": lambda ck: ck.new_tensor([0.0] * 8, (8,))}
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", True), extra_sd=extra)
        self.convert_fails(ck, "transformer.h.0.attn.mha.bias", "[8]")

    def test_unexpected_tensor(self):
        sd = model_tensors("moas", False)
        extra = {"transformer.h.0.attn.mha.c_attn.bias":
                 lambda ck: ck.new_tensor([0.0] * 24, (24,))}
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False), extra_sd=extra)
        self.convert_fails(ck, "unexpected tensor 'transformer.h.0.attn.mha.c_attn.bias'")

    def test_tied_and_untied_lm_head(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        for tie in ("shared", "copy", "absent"):
            build_checkpoint(ck, sd, margs("moas", False), tie=tie)
            self.assertNotIn("output.weight", self.convert_ok(ck).tensors, tie)
        build_checkpoint(ck, sd, margs("moas", False), tie="untied")
        r = self.convert_ok(ck)
        self.assertEqual(r.tensors["output.weight"].shape, (len(VOCAB), 8))
        self.assertEqual(r.tensor_values("output.weight"),
                         f32([v * 0.5 + 0.125 for v in sd["transformer.wte.weight"][1]]))

    def test_strided_views_and_offsets(self):
        sd = model_tensors("moas", False)
        C, T = 8, 4
        wpe_shape, wpe = sd.pop("transformer.wpe.weight")
        fc_shape, fc = sd.pop("transformer.h.1.mlp.c_fc.weight")
        transposed = [wpe[t * C + c] for c in range(C) for t in range(T)]   # stored [C, T]

        def wpe_node(ck):       # the .t() of a [C, T] tensor: stride (1, T)
            return ck.tensor(ck.storage(transposed), (T, C), stride=(1, T))

        def fc_node(ck):        # a view 5 elements into a bigger storage
            return ck.tensor(ck.storage([9.0] * 5 + fc + [7.0] * 3), fc_shape, offset=5)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False), extra_sd={
            "transformer.wpe.weight": wpe_node, "transformer.h.1.mlp.c_fc.weight": fc_node})
        r = self.convert_ok(ck)
        self.assertEqual(r.tensor_values("position_embd.weight"), wpe)
        self.assertEqual(r.tensor_values("blk.1.ffn_up.weight"), fc)

    def test_other_storage_types(self):
        sd = model_tensors("moas", False)
        shape, wpe = sd.pop("transformer.wpe.weight")
        halves = [struct.unpack("<e", struct.pack("<e", v))[0] for v in wpe]
        bf = [struct.unpack("<f", struct.pack("<I", (struct.unpack("<I", struct.pack("<f", v))[0]
                                                      & 0xFFFF0000)))[0] for v in wpe]
        bf_bits = [struct.unpack("<I", struct.pack("<f", v))[0] >> 16 for v in bf]
        ck = self.path("c.pt")
        for fmt, stype, vals, want in (("e", "HalfStorage", wpe, halves),
                                       ("d", "DoubleStorage", wpe, wpe),
                                       ("H", "BFloat16Storage", bf_bits, bf)):
            build_checkpoint(ck, sd, margs("moas", False), extra_sd={
                "transformer.wpe.weight":
                    lambda c, fmt=fmt, stype=stype, vals=vals: c.tensor(
                        c.storage(vals, fmt, stype), shape)})
            r = self.convert_ok(ck)
            self.assertEqual(r.tensor_values("position_embd.weight"), want, stype)
        build_checkpoint(ck, sd, margs("moas", False), extra_sd={
            "transformer.wpe.weight": lambda c: c.tensor(c.storage([1] * 32, "q", "LongStorage"),
                                                          shape)})
        self.convert_fails(ck, "transformer.wpe.weight", "int64")

    def test_types_f16_and_q8_0(self):
        C, H = 32, 4
        sd = model_tensors("moas", True, C=C, H=H)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", True, C=C, H=H))
        for wtype, mat_type in (("f16", gguf.F16), ("q8_0", gguf.Q8_0)):
            res = self.convert(ck, "--type", wtype)
            self.assertEqual(res.returncode, 0, res.stderr)
            r = gguf.GGUFReader(self.path("out.gguf"))
            types = {}
            for name, t in r.tensors.items():
                if name.endswith(".bias") or "norm" in name:
                    types[name] = gguf.F32
                elif "embd" in name:
                    types[name] = gguf.F16
                elif wtype == "q8_0" and t.ne[0] % 32:
                    types[name] = gguf.F16          # router_down rows of C/4 = 8
                else:
                    types[name] = mat_type
            self.assertEqual(types["blk.0.attn_router_down.weight"], gguf.F16)
            self.check_model(r, "moas", True, sd, C=C, H=H, types=types)
            self.assertEqual(r.kv["general.file_type"], {"f16": 1, "q8_0": 7}[wtype])
            if wtype == "q8_0":
                self.assertIn("written as F16 instead of Q8_0", res.stderr)
        # no matrix of rows 8 or 24 wide can be Q8_0: the file is F16 and says so
        sd = model_tensors("moas", True, n_ff=24)
        build_checkpoint(ck, sd, margs("moas", True))
        res = self.convert(ck, "--type", "q8_0")
        self.assertEqual(res.returncode, 0, res.stderr)
        r = gguf.GGUFReader(self.path("out.gguf"))
        self.assertEqual({t.ttype for t in r.tensors.values()}, {gguf.F32, gguf.F16})
        self.assertEqual(r.kv["general.file_type"], 1)

    def test_q8_0_scale_beyond_f16_is_refused(self):
        """--type q8_0 on a matrix with a block whose scale overflows F16: an error naming
        the tensor, and no file (the scale was written as inf: NaN weights)."""
        C, H = 32, 4
        sd = model_tensors("moas", True, C=C, H=H)
        shape, values = sd["transformer.h.1.mlp.c_fc.weight"]
        sd["transformer.h.1.mlp.c_fc.weight"] = (shape, f32([1e7] + list(values[1:])))
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", True, C=C, H=H))
        self.convert_fails(ck, "tensor 'blk.1.ffn_up.weight'", "beyond F16",
                           extra=("--type", "q8_0"))

    def test_real_torch_checkpoint(self):
        """tests/data/tiny-ckpt.pt: torch.save of a 1-layer moas model with biases,
        mask buffers and AdamW state; values checked against torch's own dump."""
        with open(os.path.join(DATA, "tiny-ckpt.json")) as f:
            ref = json.load(f)
        a = ref["model_args"]
        with open(self.text, "w", encoding="utf-8") as f:
            with open(os.path.join(DATA, "tiny.txt"), encoding="utf-8") as g:
                f.write(g.read())
        r = self.convert_ok(os.path.join(DATA, "tiny-ckpt.pt"))
        sd = {k: (tuple(v["shape"]), f32(v["values"])) for k, v in ref["tensors"].items()}
        masks = [k for k, (shape, _) in sd.items() if len(shape) == 4]
        self.assertEqual(len(masks), 3)
        for k in masks + ["lm_head.weight"]:
            sd.pop(k)
        exp = expected_gguf(sd, a["attention_type"], a["bias"], C=a["n_embd"], L=a["n_layer"])
        self.assertEqual(sorted(r.tensors), sorted(exp))
        for name, (shape, values) in exp.items():
            self.assertEqual(r.tensors[name].shape, shape, name)
            self.assertEqual(r.tensor_values(name), values, name)
        self.assertEqual(r.kv["moas.attention.scheme_kv_heads"], [2, 2, 1])

    def test_safetensors(self):
        sd = model_tensors("moas", True)
        header, blobs, pos = {}, [], 0
        for k, (shape, values) in sd.items():
            raw = struct.pack("<%df" % len(values), *values)
            header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
            blobs.append(raw)
            pos += len(raw)
        header["__metadata__"] = {"format": "pt"}
        h = json.dumps(header).encode()
        path = self.path("m.safetensors")
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
        self.check_model(self.convert_ok(path), "moas", True, sd)     # all inferred
        # __metadata__ must be an object of strings (a list was an AttributeError)
        bad = dict(header, __metadata__=[1])
        hb = json.dumps(bad).encode()
        with open(self.path("bad.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))
        self.convert_fails(self.path("bad.safetensors"), "__metadata__ is a list")
        # a stated MLP width is checked against the weights, as a checkpoint's is (it was
        # not read from __metadata__ at all)
        bad = dict(header, __metadata__={"n_ff": "24"})
        hb = json.dumps(bad).encode()
        with open(self.path("bad.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb + b"".join(blobs))
        self.convert_fails(self.path("bad.safetensors"), "model_args['n_ff'] is 24", "32 wide")
        # A baseline model's n_head is not in its shapes: --config supplies it.
        sd = model_tensors("baseline", False)
        header, blobs, pos = {}, [], 0
        for k, (shape, values) in sd.items():
            raw = struct.pack("<%df" % len(values), *values)
            header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + len(raw)]}
            blobs.append(raw)
            pos += len(raw)
        h = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
        self.convert_fails(path, "n_head", "--config")
        cfg = self.path("cfg.json")
        with open(cfg, "w") as f:
            json.dump({"model_args": margs("baseline", False)}, f)
        self.check_model(self.convert_ok(path, "--config", cfg), "baseline", False, sd)

    def test_config_inline_or_file_and_only_known_keys(self):
        """--config takes JSON itself when it starts with '{' (it was always read as a
        file's name), or a file; a key model_args do not have (a typo such as n_heads,
        which left n_head to come from elsewhere) is an error naming it."""
        sd = model_tensors("baseline", False)
        args = margs("baseline", False)
        del args["n_head"]                        # not in a baseline model's shapes
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, args)
        self.convert_fails(ck, "n_head", "--config")
        self.check_model(self.convert_ok(ck, "--config", '{"n_head": 4}'), "baseline", False, sd)
        self.check_model(self.convert_ok(ck, "--config", ' {"model_args": {"n_head": 4}}'),
                         "baseline", False, sd)
        cfg = self.path("cfg.json")
        with open(cfg, "w") as f:
            json.dump({"n_head": 4, "n_heads": 4, "dropuot": 0.1}, f)
        self.convert_fails(ck, "--config '%s'" % cfg, "model_args do not", "dropuot, n_heads",
                           extra=("--config", cfg))
        self.convert_fails(ck, "model_args do not: n_heads",
                           extra=("--config", '{"n_head": 4, "n_heads": 4}'))
        self.convert_fails(ck, "--config is not valid JSON", extra=("--config", "{n_head: 4}"))
        self.convert_fails(ck, "cannot read --config 'missing.json'",
                           extra=("--config", "missing.json"))
        # the keys train.py's checkpoints carry are all known
        full = dict(margs("gqa", False), n_kv_head=2, pos="learned", rope_base=10000.0,
                    norm="layer", mlp="gelu", n_ff=32, dropout=0.0)
        self.assertEqual(sorted(moas_convert.load_config(json.dumps(full))), sorted(full))

    def test_vocab_meta(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False))
        meta = self.path("meta.pkl")
        import pickle
        with open(meta, "wb") as f:
            pickle.dump({"vocab_size": len(VOCAB), "itos": dict(enumerate(VOCAB)),
                         "stoi": {c: i for i, c in enumerate(VOCAB)}}, f)
        res = self.convert(ck, "--vocab-meta", meta, vocab=False)
        self.assertEqual(res.returncode, 0, res.stderr)
        self.assertEqual(gguf.GGUFReader(self.path("out.gguf")).kv["tokenizer.ggml.tokens"], VOCAB)
        # a pickled str may be a lone surrogate, which UTF-8 (and libmoas) cannot hold
        with open(meta, "wb") as f:
            pickle.dump({"itos": dict(enumerate(VOCAB[:-1] + ["\udc80"]))}, f)
        os.unlink(self.path("out.gguf"))
        res = self.convert(ck, "--vocab-meta", meta, vocab=False)
        self.assertEqual(res.returncode, 1, res.stderr)
        self.assertEqual(res.stderr, "moas-convert: error: '%s': token %d is U+DC80, a lone "
                         "surrogate, not a character\n" % (meta, len(VOCAB) - 1))
        self.assertFalse(os.path.exists(self.path("out.gguf")))

    # -- bad inputs -------------------------------------------------------

    def malicious(self, module, name, arg_builder):
        marker = self.path("pwned-%s-%s" % (module, name))
        sd = model_tensors("moas", False)
        ck = self.path("evil.pt")
        payload = R(G(module, name), arg_builder(marker))
        build_checkpoint(ck, sd, margs("moas", False), extra_sd={"transformer.evil": payload})
        msg = self.convert_fails(ck, "refusing", "'%s.%s'" % (module, name), in_process=False)
        self.assertFalse(os.path.exists(marker), "the payload ran!")
        return msg

    def test_refuses_code_execution(self):
        py = sys.executable
        touch = "open(%r, 'w').close()"
        self.malicious("os", "system", lambda m: ("touch '%s'" % m,))
        self.malicious("posix", "system", lambda m: ("touch '%s'" % m,))
        self.malicious("builtins", "eval", lambda m: (touch % m,))
        self.malicious("builtins", "exec", lambda m: (touch % m,))
        self.malicious("subprocess", "Popen", lambda m: ([py, "-c", touch % m],))
        self.malicious("torch", "load", lambda m: (m,))
        # Python-2 spellings are reported under their Python 3 names.
        marker = self.path("pwned-py2")
        ck = self.path("evil2.pt")
        build_checkpoint(ck, model_tensors("moas", False), margs("moas", False),
                         extra_sd={"x": R(G("__builtin__", "eval"), (touch % marker,))})
        self.convert_fails(ck, "'builtins.eval'")
        self.assertFalse(os.path.exists(marker))

    def test_payload_is_live(self):
        """The payloads above are real: plain pickle runs them."""
        import pickle
        marker = self.path("live")
        pickle.loads(assemble(R(G("builtins", "eval"), ("open(%r, 'w').close()" % marker,))))
        self.assertTrue(os.path.exists(marker))

    def test_build_on_storage_refused(self):
        c = Ckpt()
        st = c.storage([1.0] * 4)
        pid = PersId(("storage", G("torch", "FloatStorage"), st[0], "cpu", 4))
        evil = Build(pid, (None, {"_fetch": G("collections", "OrderedDict")}))
        c.write(self.path("c.pt"), {"model": {"x": evil}, "model_args": {}})
        self.convert_fails(self.path("c.pt"), "set the state of a Storage")

    def test_corrupt_zip(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False))
        with open(ck, "rb") as f:
            blob = f.read()
        with open(ck, "wb") as f:
            f.write(blob[:len(blob) // 2])          # truncated: no central directory
        self.convert_fails(ck, "corrupt zip", in_process=False)
        with open(ck, "wb") as f:
            f.write(os.urandom(1000))
        self.convert_fails(ck, "corrupt zip")
        with open(ck, "wb") as f:
            f.write(b"")
        self.convert_fails(ck, "corrupt zip")
        self.convert_fails(self.path("missing.pt"), "does not exist")

    def test_unsupported_compression_is_a_corrupt_record(self):
        """A flipped bit that makes a record claim an unknown compression method: the
        corrupt-record error naming it (it was an "unexpected NotImplementedError")."""
        with open(os.path.join(DATA, "tiny-ckpt.pt"), "rb") as f:
            data = bytearray(f.read())
        data[44982] ^= 16
        flipped = self.path("flip.pt")
        with open(flipped, "wb") as f:
            f.write(data)
        res = self.convert(flipped, "--vocab-text", os.path.join(DATA, "tiny.txt"),
                           vocab=False)
        self.assertEqual(res.returncode, 1, res.stderr)
        self.assertIn("corrupt checkpoint: cannot read record", res.stderr)
        self.assertIn("compression method", res.stderr)
        self.assertNotIn("unexpected", res.stderr)

    def test_corrupt_records(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False))
        # A zip without data.pkl.
        with zipfile.ZipFile(ck, "w") as z:
            z.writestr("archive/version", "3\n")
        self.convert_fails(ck, "no data.pkl")
        # A garbled pickle.
        Ckpt().write(ck, None, pickle_bytes=b"\x80\x02}q\x00(X\x05")
        self.convert_fails(ck, "corrupt pickle")
        # A storage record that is too short (storage 0 holds wte).
        build_checkpoint(ck, sd, margs("moas", False),
                         mutate=lambda c: c.storages.__setitem__("0", c.storages["0"][:7]))
        self.convert_fails(ck, "corrupt checkpoint", "archive/data/0")
        # A storage record the pickle names but the zip lacks.
        build_checkpoint(ck, sd, margs("moas", False), mutate=lambda c: c.storages.pop("0"))
        self.convert_fails(ck, "archive/data/0", "missing")
        # A tensor view reaching past its storage.
        build_checkpoint(ck, sd, margs("moas", False), tie="absent", extra_sd={
            "transformer.wte.weight": lambda c: c.tensor(c.storage([1.0] * 4), (len(VOCAB), 8))})
        self.convert_fails(ck, "transformer.wte.weight", "outside its storage")
        # A state_dict entry that is not a tensor.
        build_checkpoint(ck, sd, margs("moas", False), extra_sd={"transformer.wpe.weight": 3})
        self.convert_fails(ck, "transformer.wpe.weight", "not a tensor")

    def test_missing_tensor(self):
        sd = model_tensors("moas", True)
        del sd["transformer.h.1.attn.gqa.v_proj.bias"]
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", True))
        self.convert_fails(ck, "no tensor 'transformer.h.1.attn.gqa.v_proj.bias'")

    def test_wrong_shape(self):
        sd = model_tensors("moas", False)
        sd["transformer.h.1.attn.mqa.k_proj.weight"] = ((3, 8), f32([0.5] * 24))
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False))
        self.convert_fails(ck, "'transformer.h.1.attn.mqa.k_proj.weight'",
                           "shape [3, 8], expected [2, 8]")
        sd = model_tensors("baseline", False)
        sd["transformer.h.0.attn.c_attn.weight"] = ((16, 8), f32([0.5] * 128))
        build_checkpoint(ck, sd, margs("baseline", False))
        self.convert_fails(ck, "shape [16, 8], expected [24, 8]")

    def test_vocab_mismatch(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False))
        with open(self.text, "w", encoding="utf-8") as f:
            f.write(TEXT + "XYZ")
        self.convert_fails(ck, "%d characters" % (len(VOCAB) + 3), "%d rows" % len(VOCAB))

    def test_bad_vocab_inputs(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        build_checkpoint(ck, sd, margs("moas", False))
        with open(self.text, "wb") as f:
            f.write(b"abc\xff\xfe")
        self.convert_fails(ck, "not valid UTF-8")
        # no vocabulary is a usage error (status 2, as the docstring says), not status 1
        res = self.convert(ck, vocab=False, in_process=False)
        self.assertEqual(res.returncode, 2, res.stderr)
        self.assertEqual(res.stderr.strip().splitlines(),
                         ["moas-convert: usage error: one of the arguments --vocab-text "
                          "--vocab-meta is required (see --help)"])
        self.assertFalse(os.path.exists(self.path("out.gguf")))

    def test_bad_model_args(self):
        sd = model_tensors("moas", False)
        ck = self.path("c.pt")
        # above a limit of docs/FORMAT.md the file would not load (a RoPE model's context
        # is in no tensor's shape)
        rope = dict(sd)
        del rope["transformer.wpe.weight"]
        for T, ok in ((1 << 20, True), ((1 << 20) + 1, False)):
            build_checkpoint(ck, rope, dict(margs("moas", False, T=T), pos="rope"))
            if ok:
                self.assertEqual(self.convert_ok(ck).kv["moas.context_length"], T)
            else:
                self.convert_fails(ck, "model_args['block_size'] is 1048577, above libmoas's "
                                   "limit 1048576")
        bad = dict(margs("moas", False), attention_type="sparse")
        build_checkpoint(ck, sd, bad)
        self.convert_fails(ck, "attention_type", "sparse")
        bad = dict(margs("moas", False), n_head=3)
        build_checkpoint(ck, sd, bad)
        self.convert_fails(ck, "not a multiple of n_head 3")
        # a GQA branch of 2 heads for 3 query heads (which the reference cannot make) has
        # no file libmoas loads; 3 rows are no whole head of 4
        sd3 = model_tensors("moas", False, C=12, H=3, G_=2)
        build_checkpoint(ck, sd3, margs("moas", False, C=12, H=3))
        self.convert_fails(ck, "'transformer.h.0.attn.gqa.k_proj.weight' has 8 rows",
                           "divides n_head 3")
        sd3 = model_tensors("moas", False, C=12, H=3, G_=1)
        shape, values = sd3["transformer.h.0.attn.gqa.k_proj.weight"]
        sd3["transformer.h.0.attn.gqa.k_proj.weight"] = ((3, 12), values[:36])
        build_checkpoint(ck, sd3, margs("moas", False, C=12, H=3))
        self.convert_fails(ck, "has 3 rows: not a number of kv heads of 4")

    def test_output_that_cannot_be_written(self):
        """An -o the converter cannot write: exit 1 with one line naming the path given
        (never the temporary file beside it), no traceback, nothing left behind. The
        output is checked before the checkpoint is read, so a bad checkpoint does not
        hide it."""
        ck = self.path("c.pt")
        build_checkpoint(ck, model_tensors("moas", False), margs("moas", False))
        junk = self.path("junk.pt")
        with open(junk, "wb") as f:
            f.write(b"not a checkpoint")
        before = sorted(os.listdir(self.dir))

        def fails(ckpt, out, *needles, in_process=False):
            res = self.convert(ckpt, out=out, in_process=in_process)
            self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
            lines = res.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, res.stderr)
            self.assertTrue(lines[0].startswith("moas-convert: error: "), lines[0])
            self.assertIn("'%s'" % self.path(out), lines[0])
            self.assertNotIn(".tmp", lines[0])
            for n in needles:
                self.assertIn(n, lines[0])
            self.assertEqual(sorted(os.listdir(self.dir)), before)

        fails(ck, "missing/x.gguf",
              "the output directory '%s' does not exist" % self.path("missing"))
        fails(junk, "missing/x.gguf", "does not exist")
        fails(ck, "train.txt/x.gguf", "'%s' is not a directory" % self.text)
        fails(ck, ".", "is a directory")
        # what the rename over the output would replace rather than write: a pipe, a
        # link (even to a file), one of the inputs (the file was replaced, exit 0)
        os.mkfifo(self.path("fifo"))
        os.symlink(self.text, self.path("link.gguf"))
        before = sorted(os.listdir(self.dir))
        fails(ck, "fifo", "not a regular file")
        fails(ck, "link.gguf", "not a regular file")
        fails(ck, "c.pt", "is the checkpoint")
        self.assertTrue(stat.S_ISFIFO(os.lstat(self.path("fifo")).st_mode))
        self.assertTrue(os.path.islink(self.path("link.gguf")))
        with open(self.text) as f:
            vocab = f.read()
        with open(self.path("v.txt"), "w") as f:
            f.write(vocab)
        before = sorted(os.listdir(self.dir))
        res = self.convert(ck, "--vocab-text", self.path("v.txt"), out="v.txt", vocab=False)
        self.assertEqual(res.returncode, 1, res.stderr)
        self.assertIn("is the --vocab-text", res.stderr)
        with open(self.path("v.txt")) as f:
            self.assertEqual(f.read(), vocab)
        # a side input without an end is refused, not read until memory runs out
        if os.path.exists("/dev/zero"):
            res = self.convert(ck, "--vocab-text", "/dev/zero", vocab=False)
            self.assertEqual(res.returncode, 1, res.stderr)
            self.assertIn("--vocab-text '/dev/zero' is not a regular file", res.stderr)
        # a failure while writing (here the same missing directory, with the early
        # check skipped) names the path given too, and leaves no temporary file
        from unittest import mock
        with mock.patch.object(moas_convert, "check_output", lambda path, inputs: None):
            fails(ck, "missing/x.gguf", "cannot write", in_process=True)


# ---------------------------------------------------------------------------
# The committed fixtures
# ---------------------------------------------------------------------------

FIXTURES = ["tiny-%s-%s" % (t, b) for t in ("baseline", "static", "moas")
            for b in ("bias", "nobias")] + ["tiny-moas-f16", "tiny-gqa2-bias", "tiny-mqa-nobias"]
# docs/FORMAT.md "Block options": name -> (position_encoding, freq_base, norm_type,
# feed_forward_type) as the file must say
BLOCK_FIXTURES = {
    "tiny-rope-baseline-nobias": ("rope", 10000.0, None, None),
    "tiny-rms-static-nobias": (None, None, "rms", "swiglu"),
    "tiny-modern-moas-bias": ("rope", 500.0, "rms", "swiglu"),
    "tiny-modern-moas-f16": ("rope", 500.0, "rms", "swiglu"),
}
POOLED_FIXTURES = {
    "tiny-pooled-bias": (None, None, None, None),
    "tiny-pooled-nobias": (None, None, None, None),
    "tiny-rope-pooled-bias": ("rope", 10000.0, None, None),
    "tiny-modern-pooled-nobias": ("rope", 500.0, "rms", "swiglu"),
}
BLOCK_KEYS = ("moas.position_encoding", "moas.rope.freq_base", "moas.norm_type",
              "moas.feed_forward_type")


class TestFixtures(unittest.TestCase):
    def test_goldens_match_format_semantics(self):
        """Each GGUF run through docs/FORMAT.md's semantics (tools/moas_forward.py)
        reproduces its torch golden."""
        for name in FIXTURES + list(BLOCK_FIXTURES):
            with self.subTest(name=name):
                path = os.path.join(DATA, name + ".gguf")
                r = gguf.GGUFReader(path)
                self.assertEqual(tuple(r.kv.get(k) for k in BLOCK_KEYS),
                                 BLOCK_FIXTURES.get(name, (None,) * 4))
                self.assertEqual("position_embd.weight" in r.tensors,
                                 r.kv.get("moas.position_encoding") != "rope")
                self.assertEqual("blk.1.ffn_gate.weight" in r.tensors,
                                 r.kv.get("moas.feed_forward_type") == "swiglu")
                self.assertEqual(r.kv["moas.context_length"], 64)
                self.assertEqual(r.kv["moas.embedding_length"], 48)
                tokens, logits, gates = moas_forward.read_golden(os.path.join(DATA, name + ".golden"))
                self.assertEqual(len(tokens), 64)
                self.assertEqual(len(logits[0]), len(r.kv["tokenizer.ggml.tokens"]))
                want_f16 = name.endswith("f16")
                for t in r.tensors.values():
                    if t.name.endswith(".bias") or "norm" in t.name:
                        self.assertEqual(t.ttype, gguf.F32)
                    else:
                        self.assertEqual(t.ttype, gguf.F16 if want_f16 else gguf.F32, t.name)
                dl, dg = moas_forward.max_diffs(path, os.path.join(DATA, name + ".golden"))
                self.assertLess(dl, 1e-5)
                self.assertLess(dg, 1e-6)
                spread = max(max(row) - min(row) for row in logits)
                self.assertGreater(spread, 2.0)       # not a degenerate model
                if "moas" in name:
                    self.assertEqual(len(gates[0][0]), 3)
                    self.assertGreater(max(g for t in gates for l in t for g in l), 0.6)
                else:
                    self.assertEqual(gates[0], [[], []])

    def test_plain_gqa_and_pooled_mqa_goldens(self):
        """One scheme of G < H kv heads: the plain GQA/MQA models hold [G] with mixing
        single, the pooled MQA model [1]; FORMAT.md's semantics reproduce their goldens
        (the pooled one in both modes: with one scheme they are the same forward)."""
        for name, g in (("tiny-gqa2-bias", 2), ("tiny-mqa-nobias", 1)):
            r = gguf.GGUFReader(os.path.join(DATA, name + ".gguf"))
            self.assertEqual(r.kv["moas.attention.scheme_kv_heads"], [g])
            self.assertEqual(r.kv["moas.attention.mixing"], "single")
            self.assertEqual(r.kv["moas.attention.kv_sharing"], "independent")
            self.assertEqual(r.tensors["blk.0.attn_k.0.weight"].ne, (48, 8 * g))
        path = os.path.join(DATA, "tiny-pooled-mqa.gguf")
        r = gguf.GGUFReader(path)
        self.assertEqual(r.kv["moas.attention.scheme_kv_heads"], [1])
        self.assertEqual(r.kv["moas.attention.kv_sharing"], "pooled")
        for mode in ("mixture", "routed"):
            dl, dg = moas_forward.max_diffs(path, os.path.join(DATA, "tiny-pooled-mqa.golden"),
                                            mode=mode)
            self.assertLess(dl, 1e-5)
            self.assertLess(dg, 1e-6)

    def test_pooled_goldens(self):
        """The pooled models (kv_sharing "pooled") reproduce their mixture golden
        (soft gates) and their routed golden (hard top-1, K/V cached with n_kv(s)
        heads), and routed mode chooses every scheme in every layer."""
        for name, options in POOLED_FIXTURES.items():
            path = os.path.join(DATA, name + ".gguf")
            r = gguf.GGUFReader(path)
            self.assertEqual(tuple(r.kv.get(k) for k in BLOCK_KEYS), options)
            self.assertEqual(r.kv["moas.attention.kv_sharing"], "pooled")
            self.assertEqual(r.kv["moas.attention.scheme_kv_heads"], [6, 2, 1])
            self.assertEqual(r.kv["moas.attention.mixing"], "router")
            self.assertEqual(r.kv["moas.embedding_length"], 48)
            self.assertEqual(r.kv["moas.context_length"], 64)
            self.assertEqual(r.kv["moas.bias"], name.endswith("-bias"))
            self.assertNotIn("blk.0.attn_q.0.weight", r.tensors)
            self.assertEqual(r.tensors["blk.0.attn_k.weight"].ne, (48, 48))
            model = moas_forward.Model(path)
            goldens = {}
            for mode in ("mixture", "routed"):
                with self.subTest(name=name, mode=mode):
                    golden = os.path.join(DATA, name + ("-routed" if mode == "routed" else "")
                                          + ".golden")
                    tokens, want_logits, want_gates = moas_forward.read_golden(golden)
                    goldens[mode] = want_logits
                    self.assertEqual(len(tokens), 64)
                    self.assertEqual(len(want_gates[0]), 2)
                    self.assertEqual(len(want_gates[0][0]), 3)
                    runner = moas_forward.Runner(model, mode)
                    dl = dg = 0.0
                    for t, tok in enumerate(tokens):
                        logits, gates = runner.step(tok)
                        dl = max(dl, max(abs(a - b) for a, b in zip(logits, want_logits[t])))
                        dg = max(dg, max(abs(a - b) for gl, wl in zip(gates, want_gates[t])
                                         for a, b in zip(gl, wl)))
                    self.assertLess(dl, 1e-4)
                    self.assertLess(dg, 1e-5)
                    if mode == "mixture":
                        for layer in range(2):
                            self.assertEqual(runner.kv_heads_cached(layer), 6 * 64)
                        continue
                    for layer in range(2):
                        chosen = [c[layer] for c in runner.chosen]
                        # the golden's (soft) gates decide the scheme
                        self.assertEqual(chosen, [moas_forward.argmax(want_gates[t][layer])
                                                  for t in range(64)])
                        counts = [chosen.count(s) for s in range(3)]
                        self.assertGreaterEqual(min(counts), 5, counts)
                        self.assertEqual(runner.kv_heads_cached(layer),
                                         6 * counts[0] + 2 * counts[1] + counts[2])
            # Routing changes the result: the two goldens are different forwards.
            diff = max(abs(a - b) for ra, rb in zip(goldens["mixture"], goldens["routed"])
                       for a, b in zip(ra, rb))
            self.assertGreater(diff, 0.1)

    def test_independent_routed_goldens(self):
        """Routed mode on independent-scheme models (docs/ROUTING.md: only the top-1
        scheme's projections run, its K/V cached with n_kv(s) heads, its output at
        full weight) reproduces train.py's routed goldens; static models' equal gates
        choose scheme 0 everywhere."""
        for name in ("tiny-moas-bias", "tiny-moas-nobias", "tiny-modern-moas-bias",
                     "tiny-static-bias", "tiny-static-nobias"):
            with self.subTest(name=name):
                model = moas_forward.Model(os.path.join(DATA, name + ".gguf"))
                self.assertEqual(model.kv_sharing, "independent")
                tokens, want_logits, want_gates = moas_forward.read_golden(
                    os.path.join(DATA, name + "-routed.golden"))
                runner = moas_forward.Runner(model, "routed")
                dl = dg = 0.0
                for t, tok in enumerate(tokens):
                    logits, gates = runner.step(tok)
                    dl = max(dl, max(abs(a - b) for a, b in zip(logits, want_logits[t])))
                    dg = max(dg, max((abs(a - b) for gl, wl in zip(gates, want_gates[t])
                                      for a, b in zip(gl, wl)), default=0.0))
                self.assertLess(dl, 1e-4)
                self.assertLess(dg, 1e-5)
                for layer in range(2):
                    chosen = [c[layer] for c in runner.chosen]
                    if model.mixing == "router":
                        self.assertEqual(chosen, [moas_forward.argmax(want_gates[t][layer])
                                                  for t in range(64)])
                        self.assertEqual(len(set(chosen)), 3)
                    else:
                        self.assertEqual(set(chosen), {0})
                    counts = [chosen.count(s) for s in range(3)]
                    self.assertEqual(runner.kv_heads_cached(layer),
                                     sum(n * c for n, c in zip(model.kv_heads, counts)))

    def test_golden_text_is_tiny_txt(self):
        with open(os.path.join(DATA, "tiny.txt"), encoding="utf-8") as f:
            text = f.read()
        vocab = sorted(set(text))
        self.assertTrue(40 <= len(vocab) <= 60)
        self.assertTrue(any(ord(c) > 127 for c in vocab))
        tokens, _, _ = moas_forward.read_golden(os.path.join(DATA, "tiny-moas-bias.golden"))
        self.assertEqual("".join(vocab[t] for t in tokens), text[440:504])
        r = gguf.GGUFReader(os.path.join(DATA, "tiny-moas-bias.gguf"))
        self.assertEqual(r.kv["tokenizer.ggml.tokens"], vocab)


if __name__ == "__main__":
    unittest.main()
