"""tools/export_llama_gpt2.py: a plain MHA model's tensors under llama.cpp's gpt2 names,
byte for byte, and a refusal for every model the gpt2 architecture cannot express."""
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
        self.assertNotIn("output.weight", dst.tensors)   # tied: llama.cpp reuses token_embd

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


if __name__ == "__main__":
    unittest.main()
