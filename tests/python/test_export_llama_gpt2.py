"""tools/export_llama_gpt2.py: a plain MHA model's tensors under llama.cpp's gpt2 names,
byte for byte (tied F32 and untied Q8_0/F16 models), a refusal for every model the gpt2
architecture cannot express, and no partial output when writing fails."""
import contextlib
import importlib.util
import io
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "..", "tools")
DATA = os.path.join(HERE, "..", "data")
sys.path.insert(0, TOOLS)
import gguf  # noqa: E402

SPEC = importlib.util.spec_from_file_location(
    "export_llama_gpt2", os.path.join(TOOLS, "export_llama_gpt2.py"))
export_llama_gpt2 = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(export_llama_gpt2)


# llama.cpp's gpt2 architecture, named independently of libmoas's names
def gpt2_names(n_layer, untied):
    names = {"token_embd.weight", "position_embd.weight", "output_norm.weight",
             "output_norm.bias"} | ({"output.weight"} if untied else set())
    for i in range(n_layer):
        for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"):
            names |= {"blk.%d.%s.weight" % (i, t), "blk.%d.%s.bias" % (i, t)}
    return names


def small_model(path, **keys):
    """An untied model of 32 wide (Q8_0 rows need multiples of 32): Q8_0 matrices, F16
    embeddings and output, F32 norms and biases; `keys` override its metadata."""
    C, ff, vocab, ctx = 32, 64, 5, 4
    kv = {"general.architecture": "moas", "moas.context_length": ctx,
          "moas.embedding_length": C, "moas.block_count": 1, "moas.feed_forward_length": ff,
          "moas.attention.head_count": 2, "moas.attention.layer_norm_epsilon": 1e-5,
          "moas.attention.scheme_kv_heads": [2], "moas.attention.mixing": "single",
          "moas.bias": True, "tokenizer.ggml.model": "char",
          "tokenizer.ggml.tokens": list("abcde")}
    kv.update(keys)
    w = gguf.GGUFWriter()
    for k, v in kv.items():
        if isinstance(v, list) and isinstance(v[0], int):
            w.add_array(k, gguf.UINT32, v)
        elif isinstance(v, list):
            w.add_array(k, gguf.STRING, v)
        else:
            w.add(k, v)
    val = iter(range(1, 1 << 30))

    def tensor(name, shape, ttype):
        n = 1
        for d in shape:
            n *= d
        w.add_tensor(name, [((next(val) * 37) % 101 - 50) / 64.0 for _ in range(n)], shape,
                     ttype)

    tensor("token_embd.weight", (vocab, C), gguf.F16)
    tensor("position_embd.weight", (ctx, C), gguf.F16)
    for t, shape in (("attn_norm", (C,)), ("ffn_norm", (C,))):
        tensor("blk.0.%s.weight" % t, shape, gguf.F32)
        tensor("blk.0.%s.bias" % t, shape, gguf.F32)
    for t in ("attn_q.0", "attn_k.0", "attn_v.0", "attn_output.0"):
        tensor("blk.0.%s.weight" % t, (C, C), gguf.Q8_0)
        tensor("blk.0.%s.bias" % t, (C,), gguf.F32)
    tensor("blk.0.ffn_up.weight", (ff, C), gguf.Q8_0)
    tensor("blk.0.ffn_up.bias", (ff,), gguf.F32)
    tensor("blk.0.ffn_down.weight", (C, ff), gguf.Q8_0)
    tensor("blk.0.ffn_down.bias", (C,), gguf.F32)
    tensor("output_norm.weight", (C,), gguf.F32)
    tensor("output_norm.bias", (C,), gguf.F32)
    tensor("output.weight", (vocab, C), gguf.F16)
    w.write(path)


class TestExportLlamaGpt2(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.out = os.path.join(self.tmp.name, "twin.gguf")

    def tearDown(self):
        self.tmp.cleanup()

    def test_same_bytes_under_gpt2_names(self):
        src_path = os.path.join(DATA, "tiny-baseline-bias.gguf")
        self.assertEqual(export_llama_gpt2.main([src_path, "-o", self.out]), 0)
        src, dst = gguf.GGUFReader(src_path), gguf.GGUFReader(self.out)
        self.assertEqual(dst.kv["general.architecture"], "gpt2")
        for key in ("context_length", "embedding_length", "block_count",
                    "feed_forward_length", "attention.head_count",
                    "attention.layer_norm_epsilon"):
            self.assertEqual(dst.kv["gpt2." + key], src.kv["moas." + key], key)
        n_vocab = len(src.kv["tokenizer.ggml.tokens"])
        self.assertEqual(len(dst.kv["tokenizer.ggml.tokens"]), n_vocab)
        self.assertEqual(len(set(dst.kv["tokenizer.ggml.tokens"])), n_vocab)
        self.assertEqual(dst.kv["tokenizer.ggml.merges"], [])
        C = src.kv["moas.embedding_length"]
        seen = set()
        for i in range(src.kv["moas.block_count"]):
            for part in ("weight", "bias"):
                name = "blk.%d.attn_qkv.%s" % (i, part)
                qkv = [src.tensor_raw("blk.%d.attn_%s.0.%s" % (i, x, part)) for x in "qkv"]
                self.assertEqual(dst.tensor_raw(name), b"".join(qkv), name)
                self.assertEqual(dst.tensors[name].shape,
                                 (3 * C, C) if part == "weight" else (3 * C,))
                self.assertEqual(dst.tensor_raw("blk.%d.attn_output.%s" % (i, part)),
                                 src.tensor_raw("blk.%d.attn_output.0.%s" % (i, part)))
                seen.update({name, "blk.%d.attn_output.%s" % (i, part)})
        for name in src.tensors:   # everything else under its own name
            if ".attn_q." in name or ".attn_k." in name or ".attn_v." in name \
                    or ".attn_output." in name:
                continue
            self.assertEqual(dst.tensor_raw(name), src.tensor_raw(name), name)
            self.assertEqual(dst.tensors[name].ttype, src.tensors[name].ttype, name)
            seen.add(name)
        self.assertEqual(seen, set(dst.tensors))
        # tied: no output.weight, llama.cpp reuses token_embd
        self.assertEqual(set(dst.tensors), gpt2_names(src.kv["moas.block_count"], False))

    def test_untied_q8_0(self):
        src_path = os.path.join(self.tmp.name, "small.gguf")
        small_model(src_path)
        self.assertEqual(export_llama_gpt2.main([src_path, "-o", self.out]), 0)
        src, dst = gguf.GGUFReader(src_path), gguf.GGUFReader(self.out)
        self.assertEqual(set(dst.tensors), gpt2_names(1, True))
        qkv = dst.tensors["blk.0.attn_qkv.weight"]
        self.assertEqual((qkv.ttype, qkv.shape), (gguf.Q8_0, (96, 32)))
        self.assertEqual(dst.tensor_raw("blk.0.attn_qkv.weight"),
                         b"".join(src.tensor_raw("blk.0.attn_%s.0.weight" % x) for x in "qkv"))
        self.assertEqual(dst.tensor_raw("output.weight"), src.tensor_raw("output.weight"))
        self.assertEqual(dst.tensors["output.weight"].ttype, gguf.F16)
        for name in ("ffn_up", "ffn_down"):
            self.assertEqual(dst.tensor_raw("blk.0.%s.weight" % name),
                             src.tensor_raw("blk.0.%s.weight" % name))
        self.assertEqual((dst.kv["tokenizer.ggml.bos_token_id"],
                          dst.kv["tokenizer.ggml.eos_token_id"]), (0, 0))

    def test_refuses_what_gpt2_cannot_express(self):
        for name, why in (("tiny-moas-bias.gguf", "one scheme"),
                          ("tiny-gqa2-bias.gguf", "one scheme"),
                          ("tiny-baseline-nobias.gguf", "biases"),
                          ("tiny-rope-baseline-nobias.gguf", "RoPE")):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = export_llama_gpt2.main([os.path.join(DATA, name), "-o", self.out])
            self.assertEqual(rc, 1, name)
            self.assertIn(why, err.getvalue(), name)
            self.assertFalse(os.path.exists(self.out), name)
        for keys, why in (({"moas.norm_type": "rms"}, "RMSNorm"),
                          ({"moas.feed_forward_type": "swiglu"}, "SwiGLU"),
                          ({"moas.attention.kv_sharing": "pooled"}, "pooled"),
                          ({"moas.position_encoding": "rope"}, "RoPE"),
                          ({"moas.attention.head_count": "two"}, "not an integer"),
                          ({"general.architecture": "gpt2"}, "not a libmoas model")):
            src_path = os.path.join(self.tmp.name, "bad.gguf")
            small_model(src_path, **keys)
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = export_llama_gpt2.main([src_path, "-o", self.out])
            self.assertEqual(rc, 1, keys)
            self.assertIn(why, err.getvalue(), keys)
            self.assertFalse(os.path.exists(self.out), keys)

    def test_failed_write_leaves_nothing(self):
        src_path = os.path.join(self.tmp.name, "small.gguf")
        small_model(src_path)
        with open(src_path, "rb") as f:
            before = f.read()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            self.assertEqual(export_llama_gpt2.main([src_path, "-o", src_path]), 1)
            missing_dir = os.path.join(self.tmp.name, "no-such-dir", "twin.gguf")
            self.assertEqual(export_llama_gpt2.main([src_path, "-o", missing_dir]), 1)
            # the output path is a directory: the rename fails after the write
            os.mkdir(self.out)
            self.assertEqual(export_llama_gpt2.main([src_path, "-o", self.out]), 1)
            self.assertEqual(export_llama_gpt2.main([os.path.join(self.tmp.name, "none"),
                                                     "-o", self.out + "x"]), 1)
        self.assertIn("overwrite the model", err.getvalue())
        with open(src_path, "rb") as f:
            self.assertEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(self.tmp.name)), ["small.gguf", "twin.gguf"])
        self.assertEqual(os.listdir(self.out), [])


if __name__ == "__main__":
    unittest.main()
