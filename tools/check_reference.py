#!/usr/bin/env python3
"""Check our tools against the published MoAS PyTorch reference.

    /usr/bin/python3 tools/check_reference.py REFERENCE [--data tests/data/tiny.txt]

REFERENCE is a checkout of the published code (a directory holding
moht_gpt.py and moht_components.py) or a bare git directory of it (its HEAD is
read with git show).  Nothing of the reference is stored in this repository;
it is imported at run time from a temporary copy.

For each attention type and bias setting the script builds the reference's own
GPT (torch 1.13 has no nn.LayerNorm(bias=): a small stand-in with the same
parameter names is installed first), perturbs its random init so that logits
and gates are not degenerate, takes two AdamW steps with the reference's
configure_optimizers so that the optimizer section is realistic, and saves the
checkpoint in the reference's layout (plus a TorchVersion and a numpy scalar,
which real checkpoints carry).  Then it

  1. converts it with tools/moas-convert (F32),
  2. runs tools/train.py --golden on the reference checkpoint,
  3. compares the golden's logits with the reference model's own forward
     (all positions: the reference returns them when targets are given),
     in float32 and in float64, and the router gates (read by a hook),
  4. runs tools/moas_forward.py (docs/FORMAT.md semantics in plain Python) on
     the converted GGUF against the same reference logits,
  5. runs libmoas itself (`bin/moas logits`, token-by-token decode) on the
     converted GGUF against the same reference logits.

Needs torch and numpy; not run by CI.  Exit status 1 if any difference
exceeds the tolerance.
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)
import moas_forward  # noqa: E402

REF_FILES = ("moht_gpt.py", "moht_components.py")
TOL_LOGITS = 1e-4
MOAS_BIN = os.environ.get("MOAS_BIN", os.path.join(os.path.dirname(HERE), "bin", "moas"))


class LayerNormShim(torch.nn.Module):
    """nn.LayerNorm(n, bias=...) for torch < 2.1: parameters weight and bias."""

    def __init__(self, n, eps=1e-5, elementwise_affine=True, bias=True):
        super().__init__()
        self.n, self.eps = n, eps
        self.weight = torch.nn.Parameter(torch.ones(n))
        self.bias = torch.nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, (self.n,), self.weight, self.bias, self.eps)


def materialize(ref, dest):
    if all(os.path.isfile(os.path.join(ref, f)) for f in REF_FILES):
        for f in REF_FILES:
            with open(os.path.join(ref, f), "rb") as src, open(os.path.join(dest, f), "wb") as dst:
                dst.write(src.read())
        return
    for f in REF_FILES:
        blob = subprocess.run(["git", "--git-dir", ref, "show", "HEAD:" + f], check=True,
                              stdout=subprocess.PIPE).stdout
        with open(os.path.join(dest, f), "wb") as dst:
            dst.write(blob)


def import_reference(ref, tmp):
    materialize(ref, tmp)
    torch.nn.LayerNorm = LayerNormShim          # looked up when the model is built
    sys.path.insert(0, tmp)
    import moht_gpt                             # noqa: E402 (the reference, from tmp)
    return moht_gpt


def build(ref, margs, seed):
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        model = ref.GPT(ref.GPTConfig(**margs))
    with torch.no_grad():                       # spread the init out: gates must vary
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.25)
            elif name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    return model


def train_two_steps(model, margs, ids):
    with contextlib.redirect_stdout(io.StringIO()):
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    model.train()
    T = margs["block_size"]
    for _ in range(2):
        ix = torch.randint(len(ids) - T - 1, (2,))
        x = torch.stack([ids[i:i + T] for i in ix])
        y = torch.stack([ids[i + 1:i + T + 1] for i in ix])
        _, loss = model(x, y)
        if margs["attention_type"] == "moas":
            loss = loss + 0.01 * model.get_load_balancing_loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return opt


def reference_forward(model, tokens, dtype):
    """(logits [T, V], gates [T, L, 3] or None) of the reference model."""
    model = model.to(dtype)
    gates = []
    hooks = [blk.attn.router.register_forward_hook(
        lambda mod, inp, out: gates.append(F.softmax(out, dim=-1)))
        for blk in model.transformer.h if hasattr(blk.attn, "router")]
    idx = torch.tensor([tokens])
    with torch.no_grad():
        logits, _ = model(idx, idx)               # targets given: logits at every position
    for h in hooks:
        h.remove()
    model.float()
    g = torch.stack([x[0] for x in gates], dim=1).double() if gates else None
    return logits[0].double(), g


def run(cmd):
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         universal_newlines=True)
    if res.returncode:
        sys.exit("command failed (%d): %s\n%s" % (res.returncode, " ".join(cmd), res.stdout))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("reference", help="reference checkout or bare git dir")
    ap.add_argument("--data", default=os.path.join(HERE, "..", "tests", "data", "tiny.txt"))
    ap.add_argument("--keep", help="directory to keep the checkpoints and GGUFs in")
    o = ap.parse_args()
    work = o.keep or tempfile.mkdtemp(prefix="moas-ref-")
    os.makedirs(work, exist_ok=True)
    ref = import_reference(os.path.abspath(o.reference), tempfile.mkdtemp(prefix="moas-refsrc-"))

    with open(o.data, "r", encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    T = 64
    tokens = [stoi[c] for c in text[440:440 + T]]

    worst, seed = 0.0, 100
    print("max |difference| against the reference's own forward:")
    print("%-22s %12s %12s %12s %12s %12s" % ("model", "golden-f32", "golden-f64", "gates-f64",
                                              "gguf-py-f64", "libmoas"))
    for atype in ("moas", "static_moas", "baseline"):
        for bias in (False, True):
            seed += 1
            margs = dict(n_layer=2, n_head=6, n_embd=48, block_size=T, bias=bias,
                         vocab_size=len(chars), dropout=0.0, attention_type=atype)
            model = build(ref, margs, seed)
            opt = train_two_steps(model, margs, ids)
            tag = "ref-%s-%s" % (atype, "bias" if bias else "nobias")
            ckpt = os.path.join(work, tag + ".pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "model_args": margs, "iter_num": 2,
                        "best_val_loss": torch.tensor(3.5),
                        "config": ["batch_size", "block_size", "attention_type"],
                        "torch_version": torch.__version__,
                        "np_loss": np.float64(3.25)}, ckpt)
            out = os.path.join(work, tag + ".gguf")
            run([sys.executable, os.path.join(HERE, "moas-convert"), ckpt, "-o", out,
                 "--vocab-text", o.data])
            golden = {}
            for dt in ("float32", "float64"):
                golden[dt] = os.path.join(work, "%s-%s.golden" % (tag, dt))
                run([sys.executable, os.path.join(HERE, "train.py"), "--golden", ckpt,
                     "--data", o.data, "--text", o.data, "--text-start", "440",
                     "--text-len", str(T), "--golden-dtype", dt, "--out", golden[dt]])
            ref32, gates32 = reference_forward(model, tokens, torch.float32)
            ref64, gates64 = reference_forward(model, tokens, torch.float64)
            diffs = []
            for dt, want in (("float32", ref32), ("float64", ref64)):
                gt, gl, gg = moas_forward.read_golden(golden[dt])
                assert gt == tokens
                diffs.append((torch.tensor(gl, dtype=torch.float64) - want).abs().max().item())
            gdiff = 0.0
            if gates64 is not None:
                gg = torch.tensor(moas_forward.read_golden(golden["float64"])[2],
                                  dtype=torch.float64)
                gdiff = (gg - gates64).abs().max().item()
            py_logits, _ = moas_forward.forward(out, tokens)
            pydiff = (torch.tensor(py_logits, dtype=torch.float64) - ref64).abs().max().item()
            # libmoas: the exact characters, decoded token by token by bin/moas
            window = os.path.join(work, tag + ".txt")
            with open(window, "w", encoding="utf-8", newline="") as f:
                f.write(text[440:440 + T])
            raw = os.path.join(work, tag + ".f32")
            run([MOAS_BIN, "logits", "-m", out, "-f", window, "-o", raw])
            c_logits = torch.from_numpy(np.fromfile(raw, dtype="<f4").astype(np.float64))
            cdiff = (c_logits.reshape(ref64.shape) - ref64).abs().max().item()
            print("%-22s %12.3g %12.3g %12s %12.3g %12.3g   (logits in [%.2f, %.2f])"
                  % (tag, diffs[0], diffs[1], "%.3g" % gdiff if gates64 is not None else "-",
                     pydiff, cdiff,
                     ref64.min().item(), ref64.max().item()))
            worst = max(worst, diffs[0], diffs[1], pydiff, cdiff)
    # The other direction: our checkpoints (with --mask-buffers) load strictly
    # into the reference GPT and give the logits of our golden.
    print("our train.py checkpoints loaded into the reference GPT (strict), max |difference|:")
    for atype in ("moas", "static_moas", "baseline"):
        for bias in ("--bias", "--no-bias"):
            tag = "ours-%s%s" % (atype, bias.replace("--", "-"))
            ckpt = os.path.join(work, tag + ".pt")
            gold = os.path.join(work, tag + ".golden")
            run([sys.executable, os.path.join(HERE, "train.py"), "--data", o.data, "--out", ckpt,
                 "--init-only", "--attention-type", atype, bias, "--mask-buffers",
                 "--n-layer", "2", "--n-head", "6", "--n-embd", "48", "--block-size", str(T),
                 "--dropout", "0", "--init-std", "0.25", "--seed", "5"])
            run([sys.executable, os.path.join(HERE, "train.py"), "--golden", ckpt, "--data",
                 o.data, "--text", o.data, "--text-start", "440", "--text-len", str(T),
                 "--golden-dtype", "float32", "--out", gold])
            ck = torch.load(ckpt, map_location="cpu")
            with contextlib.redirect_stdout(io.StringIO()):
                model = ref.GPT(ref.GPTConfig(**ck["model_args"]))
            model.load_state_dict(ck["model"], strict=True)
            model.eval()
            want, _ = reference_forward(model, tokens, torch.float32)
            got = torch.tensor(moas_forward.read_golden(gold)[1], dtype=torch.float64)
            diff = (got - want).abs().max().item()
            print("%-26s %12.3g" % (tag, diff))
            worst = max(worst, diff)
    print("worst logit difference %.3g (tolerance %g); files in %s" % (worst, TOL_LOGITS, work))
    return 0 if worst <= TOL_LOGITS else 1


if __name__ == "__main__":
    sys.exit(main())
