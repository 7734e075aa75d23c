#!/usr/bin/env python3
"""Write a plain GPT-2-style libmoas model as llama.cpp's `gpt2` architecture.

    python3 tools/export_llama_gpt2.py MODEL.gguf -o MODEL-llama.gguf

The output holds the same tensors, byte for byte, under llama.cpp's names (Q, K and
V of a layer joined into one `attn_qkv`, rows of Q first), so the two engines can be
timed and compared on identical weights (docs/PERFORMANCE.md, "Throughput, side by
side with llama.cpp"). Only a model the `gpt2` architecture can express is accepted:
one scheme with as many KV heads as query heads (`moas.attention.mixing` "single",
independent K/V: a plain MHA model), learned positions, LayerNorm, a GELU MLP,
biases. (The engines still differ in arithmetic: llama.cpp's GELU and f16 products
are its own.) The vocabulary is written as a byte-level BPE one without merges, whose
token i is libmoas's token i, so token ids mean the same in both files; llama.cpp's
tokenizer is not meant to be used with it. The file is written beside the output
path and renamed into place, so a failure leaves no partial output.

Standard library only (tools/gguf.py reads and writes the files).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gguf import F16, F32, Q8_0, STRING, GGUFError, GGUFReader, GGUFWriter  # noqa: E402


class ExportError(Exception):
    pass


def _require(cond, why):
    if not cond:
        raise ExportError(why)


def export(src, dst):
    r = GGUFReader(src)
    kv = r.kv
    _require(kv.get("general.architecture") == "moas", "not a libmoas model")
    n_head = kv.get("moas.attention.head_count")
    _require(isinstance(n_head, int), "moas.attention.head_count missing or not an integer")
    _require(kv.get("moas.attention.scheme_kv_heads") == [n_head],
             "only a plain MHA model (one scheme of %d KV heads) has a gpt2 twin" % n_head)
    _require(kv.get("moas.attention.mixing", "single") == "single", "mixing must be single")
    _require(kv.get("moas.attention.kv_sharing", "independent") == "independent",
             "pooled K/V has no gpt2 twin")
    _require(kv.get("moas.position_encoding", "learned") == "learned", "RoPE has no gpt2 twin")
    _require(kv.get("moas.norm_type", "layer") == "layer", "RMSNorm has no gpt2 twin")
    _require(kv.get("moas.feed_forward_type", "gelu") == "gelu", "SwiGLU has no gpt2 twin")
    _require(kv.get("moas.bias") is True, "GPT-2 has biases")

    n_layer = kv["moas.block_count"]
    w = GGUFWriter()
    w.add_string("general.architecture", "gpt2")
    w.add_string("general.name", "%s (gpt2 twin)" % kv.get("general.name", "moas"))
    w.add_uint32("gpt2.context_length", kv["moas.context_length"])
    w.add_uint32("gpt2.embedding_length", kv["moas.embedding_length"])
    w.add_uint32("gpt2.feed_forward_length", kv["moas.feed_forward_length"])
    w.add_uint32("gpt2.block_count", n_layer)
    w.add_uint32("gpt2.attention.head_count", n_head)
    w.add_float32("gpt2.attention.layer_norm_epsilon",
                  kv["moas.attention.layer_norm_epsilon"])
    n_vocab = len(kv["tokenizer.ggml.tokens"])
    w.add_string("tokenizer.ggml.model", "gpt2")
    # distinct texts that no byte-level BPE could produce from text: ids, not words
    w.add_array("tokenizer.ggml.tokens", STRING, ["<%d>" % i for i in range(n_vocab)])
    w.add_array("tokenizer.ggml.merges", STRING, [])
    # llama.cpp's gpt2 default for both is 11, outside a smaller vocabulary
    w.add_uint32("tokenizer.ggml.bos_token_id", 0)
    w.add_uint32("tokenizer.ggml.eos_token_id", 0)

    def tensor(name):
        _require(name in r.tensors, "tensor %s missing" % name)
        t = r.tensors[name]
        _require(t.ttype in (F32, F16, Q8_0), "tensor %s: type %d" % (name, t.ttype))
        return t

    def copy(name, new_name=None):
        t = tensor(name)
        w.add_tensor_raw(new_name or name, t.ne, t.ttype, r.tensor_raw(name))

    def joined(names, new_name):
        ts = [tensor(n) for n in names]
        _require(len({(t.ttype, t.ne[:-1]) for t in ts}) == 1,
                 "%s: Q, K and V differ in type or width" % new_name)
        ne = ts[0].ne[:-1] + (sum(t.ne[-1] for t in ts),)
        w.add_tensor_raw(new_name, ne, ts[0].ttype, b"".join(r.tensor_raw(n) for n in names))

    copy("token_embd.weight")
    copy("position_embd.weight")
    for i in range(n_layer):
        b = "blk.%d." % i
        for part in ("weight", "bias"):
            copy(b + "attn_norm." + part)
            joined([b + "attn_%s.0.%s" % (x, part) for x in "qkv"], b + "attn_qkv." + part)
            copy(b + "attn_output.0." + part, b + "attn_output." + part)
            copy(b + "ffn_norm." + part)
            copy(b + "ffn_up." + part)
            copy(b + "ffn_down." + part)
    copy("output_norm.weight")
    copy("output_norm.bias")
    if "output.weight" in r.tensors:   # untied; otherwise llama.cpp reuses token_embd
        copy("output.weight")
    _require(not (os.path.exists(dst) and os.path.samefile(src, dst)),
             "the output would overwrite the model")
    tmp = "%s.%d.tmp" % (dst, os.getpid())
    try:
        w.write(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a libmoas GGUF of a plain MHA GPT-2-style model")
    ap.add_argument("-o", "--output", required=True, help="the gpt2 GGUF to write")
    args = ap.parse_args(argv)
    try:
        export(args.model, args.output)
    except KeyError as e:
        print("export_llama_gpt2: %s: missing key %s" % (args.model, e), file=sys.stderr)
        return 1
    except (ExportError, GGUFError, OSError, TypeError, ValueError) as e:
        print("export_llama_gpt2: %s: %s" % (args.model, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
