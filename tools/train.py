#!/usr/bin/env python3
"""Train, initialise or evaluate a MoAS character model with PyTorch (CPU).

This is libmoas's own implementation of the published MoAS architecture
(docs/FORMAT.md, "Semantics").  Its state_dict keys are the
reference's, so checkpoints go both ways: ours load into the reference GPT (add
--mask-buffers to also store the [1, 1, T, T] causal-mask buffers that the
reference registers under PyTorch < 2.0), and the reference's load here.

    # train (the reference's defaults: 6 layers, 6 heads, 384 wide, 256 context)
    python3 tools/train.py --data input.txt --out ckpt.pt --attention-type moas

    # a random model, no training (for test fixtures)
    python3 tools/train.py --data tiny.txt --out tiny.pt --init-only --init-std 0.25 ...

    # golden fixture: logits and router gates of one forward over a text
    python3 tools/train.py --golden ckpt.pt --data tiny.txt --text tiny.txt \\
        --text-start 0 --text-len 64 --out tiny.golden

    # the routed-KV variant (docs/FORMAT.md "Pooled K/V"), trained soft, then straight-through
    # top-1, with a penalty on the expected kv heads per token
    python3 tools/train.py --data input.txt --out pooled.pt --attention-type pooled_moas \\
        --kv-penalty 0.05 --hard-top1-from 1500

    # the block options (docs/FORMAT.md, "Block options"), for any attention type:
    # rotary positions instead of the learned table, RMSNorm, a SwiGLU MLP
    python3 tools/train.py --data input.txt --out rope.pt --attention-type pooled_moas \\
        --pos rope --rope-base 10000 --norm rms --mlp swiglu

Attention types: baseline, static_moas and moas are the published ones.
gqa is a plain GPT with one grouped-query attention of --kv-heads G < H kv
heads (G = 1: multi-query attention), the reference's GQA branch on its own:
per layer attn.{q_proj,k_proj,v_proj,c_proj}, k_proj and v_proj [G*d, C];
model_args of such a checkpoint carry 'n_kv_head'.
pooled_moas is libmoas's routed-KV variant (docs/FORMAT.md, "Pooled K/V"): per
layer one q_proj, k_proj, v_proj (all [C, C], H heads) and c_proj, plus the
router (router.0, GELU, router.2) on ln_1's output.  Scheme s keeps a token's
K/V mean-pooled over groups of H/n_kv(s) consecutive heads (--schemes, default
H,2,1); training mixes the pooled K/V with the gates (soft) and, from
--hard-top1-from on, with a straight-through one-hot of the gates' argmax.
--kv-penalty adds lambda * (mean over tokens and layers of sum_s g_s n_kv(s)/H)
to the loss.  model_args of such a checkpoint carry 'schemes'.  The router
recipes (--balance, --router-entropy, --router-z-loss, --kv-penalty-warmup,
--kv-target-per-layer, --gate-temperature, --init-from) are in tools/README.md.

    # from a trained MHA (baseline) checkpoint of the same shape, routers new
    python3 tools/train.py --data input.txt --out pooled.pt --attention-type pooled_moas \\
        --init-from mha.pt --kv-penalty 0.05 --kv-penalty-warmup 300 --balance switch

Needs torch (tested with Debian's 1.13) and no network.  The vocabulary is
sorted(set(text)) of --data read as UTF-8 with universal newlines, and the data
split is the reference's: the first 90% of the ids train, the rest validate.
Number options must be finite and in range (a usage error, status 2, otherwise).
A run whose loss turns NaN or infinite stops there with status 1 and saves nothing.

Golden fixture (little-endian; --golden-mode routed: libmoas's routed mode, the
argmax of the gates, lowest index on ties, for pooled_moas, moas and static_moas):
    char    magic[8] = "MOASGLD1"
    uint32  n_tokens, n_vocab, n_layer, n_scheme      (n_scheme 0: no router)
    int32   tokens[n_tokens]
    float32 logits[n_tokens][n_vocab]
    float32 gates[n_tokens][n_layer][n_scheme]
The forward runs in float64 by default (--golden-dtype) and is stored as float32.
"""

import argparse
import io
import math
import os
import re
import struct
import sys
import time

try:
    import torch
    import torch.nn as nn
    from torch.nn import functional as F
except ImportError:
    if __name__ != "__main__":
        raise
    sys.exit("train.py: PyTorch is not installed for %s (apt-get install python3-torch, "
             "or make train-deps)" % sys.executable)

ATTENTION_TYPES = ("baseline", "static_moas", "moas", "pooled_moas", "gqa")
GQA_KV_HEADS = 2          # hard-coded in the reference
LN_EPS = 1e-5
POS_TYPES = ("learned", "rope")
NORM_TYPES = ("layer", "rms")
MLP_TYPES = ("gelu", "swiglu")
ROPE_BASE = 10000.0


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------

class ModelArgs:
    """The reference's model_args, the dict stored in checkpoints.

    pooled_moas models also carry 'schemes', the kv-head count of each scheme
    (default [H, 2, 1]), and gqa models 'n_kv_head' (default 2); the published
    types carry neither.  The block options
    (docs/FORMAT.md, "Block options") are stored only when they differ from the
    published GPT-2 block: 'pos' ("learned" or "rope") with 'rope_base', 'norm'
    ("layer" or "rms"), 'mlp' ("gelu" or "swiglu") and 'n_ff' (MLP width, 4C by
    default).
    """
    KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout",
            "attention_type")

    def __init__(self, **kw):
        missing = [k for k in self.KEYS if k not in kw]
        if missing:
            raise ValueError("model_args lacks %s" % ", ".join(missing))
        for k in self.KEYS:
            setattr(self, k, kw[k])
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError("%s is %r, not a positive integer" % (k, v))
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError("unknown attention_type %r" % self.attention_type)
        if self.n_embd % self.n_head:
            raise ValueError("n_embd must be a multiple of n_head")
        self.schemes = None
        if self.attention_type == "pooled_moas":
            schemes = kw.get("schemes")
            if schemes is None:
                schemes = [self.n_head, GQA_KV_HEADS, 1]
            self.schemes = [int(n) for n in schemes]
            check_schemes(self.schemes, self.n_head)
        elif kw.get("schemes") is not None:
            raise ValueError("'schemes' is for pooled_moas models only")
        self.n_kv_head = None
        if self.attention_type == "gqa":
            n_kv = kw.get("n_kv_head")
            self.n_kv_head = GQA_KV_HEADS if n_kv is None else int(n_kv)
            if not 1 <= self.n_kv_head < self.n_head or self.n_head % self.n_kv_head:
                raise ValueError("gqa needs n_kv_head dividing n_head %d and below it, got %d"
                                 % (self.n_head, self.n_kv_head))
        elif kw.get("n_kv_head") is not None:
            raise ValueError("'n_kv_head' is for gqa models only")
        elif self.attention_type in ("static_moas", "moas") and self.n_head % GQA_KV_HEADS:
            raise ValueError("n_head must be a multiple of %d for MoAS" % GQA_KV_HEADS)
        if self.attention_type in ("moas", "pooled_moas") and self.n_embd < 4:
            # its gates would be constants, and moas.router.hidden_length must be >= 1
            raise ValueError("a router of n_embd / 4 = %d hidden units: %s needs n_embd >= 4"
                             % (self.n_embd // 4, self.attention_type))
        # Only a missing (None) option takes the default: 0 for rope_base or n_ff is a
        # mistake to report, not a request for the default.
        def given(key, default):
            v = kw.get(key)
            return default if v is None else v
        self.pos = given("pos", "learned")
        self.rope_base = float(given("rope_base", ROPE_BASE))
        self.norm = given("norm", "layer")
        self.mlp = given("mlp", "gelu")
        self.n_ff = int(given("n_ff", 4 * self.n_embd))
        if self.pos not in POS_TYPES or self.norm not in NORM_TYPES or self.mlp not in MLP_TYPES:
            raise ValueError("unknown block option: pos %r, norm %r, mlp %r"
                             % (self.pos, self.norm, self.mlp))
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError("rope needs an even head size, not %d" % (self.n_embd // self.n_head))
        if not 1.0 < self.rope_base < math.inf:
            raise ValueError("rope_base must be a finite number > 1, not %r" % self.rope_base)
        if self.n_ff < 1:
            raise ValueError("n_ff must be >= 1, not %d" % self.n_ff)

    def as_dict(self):
        d = {k: getattr(self, k) for k in self.KEYS}
        if self.schemes is not None:
            d["schemes"] = list(self.schemes)
        if self.pos != "learned":
            d["pos"] = self.pos
            d["rope_base"] = self.rope_base
        if self.norm != "layer":
            d["norm"] = self.norm
        if self.mlp != "gelu":
            d["mlp"] = self.mlp
        if self.n_ff != 4 * self.n_embd:
            d["n_ff"] = self.n_ff
        if self.n_kv_head is not None:
            d["n_kv_head"] = self.n_kv_head
        return d


def check_schemes(schemes, n_head):
    """docs/FORMAT.md: 1 to 8 schemes, each dividing H (--schemes 1: a pooled MQA model)."""
    if not 1 <= len(schemes) <= 8:
        raise ValueError("need 1 to 8 schemes, got %d" % len(schemes))
    bad = [n for n in schemes if n < 1 or n_head % n]
    if bad:
        raise ValueError("scheme kv heads %s do not divide n_head %d" % (bad, n_head))


def parse_schemes(spec, n_head):
    """'H,2,1' -> [n_head, 2, 1]."""
    out = []
    for item in spec.split(","):
        item = item.strip()
        out.append(n_head if item.upper() == "H" else int(item))
    check_schemes(out, n_head)
    return out


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional (torch 1.13's nn.LayerNorm has no bias=)."""

    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LN_EPS)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (+ bias): no centring, no learned shift
    unless the model has biases."""

    def __init__(self, n, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n)) if bias else None

    def forward(self, x):
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + LN_EPS) * self.weight
        return y if self.bias is None else y + self.bias


def make_norm(a):
    return (RMSNorm if a.norm == "rms" else LayerNorm)(a.n_embd, a.bias)


def rope_tables(T, d, base, dtype, pos0=0):
    """(cos, sin) [T, d/2] for positions pos0 .. pos0+T-1: angle p * base^(-2i/d) of
    pair i, computed in float64 and then rounded to dtype."""
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)            # [d/2]
    ang = torch.arange(pos0, pos0 + T, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x, n_heads, rope):
    """Rotate each head's adjacent pairs (x[2i], x[2i+1]) of x [B, T, n_heads*d] by
    the angles of rope = (cos, sin) [T, d/2]; None: x unchanged."""
    if rope is None:
        return x
    cos, sin = rope
    B, T, C = x.shape
    d = C // n_heads
    x = x.view(B, T, n_heads, d // 2, 2)
    x0, x1 = x[..., 0], x[..., 1]                                               # [B, T, G, d/2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).view(B, T, C)


def causal_attention(q, k, v, n_head, drop, rope=None):
    """softmax(q k^T / sqrt(d)) v over earlier positions.

    q: [B, T, H*d]; k, v: [B, T, G*d] with G dividing H.  Query head h reads
    kv head h // (H/G).  rope (cos, sin) rotates q and every k head first.
    Returns [B, T, H*d].
    """
    B, T, C = q.shape
    d = C // n_head
    n_kv = k.shape[-1] // d
    q = apply_rope(q, n_head, rope)
    k = apply_rope(k, n_kv, rope)
    q = q.view(B, T, n_head, d).transpose(1, 2)                   # [B, H, T, d]
    k = k.view(B, T, n_kv, d).transpose(1, 2)                     # [B, G, T, d]
    v = v.view(B, T, n_kv, d).transpose(1, 2)
    if n_kv != n_head:
        k = k.repeat_interleave(n_head // n_kv, dim=1)            # [B, H, T, d]
        v = v.repeat_interleave(n_head // n_kv, dim=1)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))        # [B, H, T, T]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    att = att.masked_fill(future, float("-inf"))
    att = drop(F.softmax(att, dim=-1))
    y = att @ v                                                   # [B, H, T, d]
    return y.transpose(1, 2).contiguous().view(B, T, C)


class FusedAttention(nn.Module):
    """MHA with one c_attn [3C, C] (q, k, v thirds) and c_proj."""

    def __init__(self, a, mask_buffers):
        super().__init__()
        self.n_head = a.n_head
        self.c_attn = nn.Linear(a.n_embd, 3 * a.n_embd, bias=a.bias)
        self.c_proj = nn.Linear(a.n_embd, a.n_embd, bias=a.bias)
        self.attn_dropout = nn.Dropout(a.dropout)
        self.resid_dropout = nn.Dropout(a.dropout)
        if mask_buffers:
            add_mask_buffer(self, a.block_size)

    def forward(self, x, rope=None):
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        y = causal_attention(q, k, v, self.n_head, self.attn_dropout, rope)
        return self.resid_dropout(self.c_proj(y))


class SplitAttention(nn.Module):
    """GQA (n_kv > 1) or MQA (n_kv = 1): q_proj, k_proj, v_proj, c_proj."""

    def __init__(self, a, n_kv, mask_buffers):
        super().__init__()
        d = a.n_embd // a.n_head
        self.n_head = a.n_head
        self.q_proj = nn.Linear(a.n_embd, a.n_embd, bias=a.bias)
        self.k_proj = nn.Linear(a.n_embd, n_kv * d, bias=a.bias)
        self.v_proj = nn.Linear(a.n_embd, n_kv * d, bias=a.bias)
        self.c_proj = nn.Linear(a.n_embd, a.n_embd, bias=a.bias)
        self.attn_dropout = nn.Dropout(a.dropout)
        self.resid_dropout = nn.Dropout(a.dropout)
        if mask_buffers:
            add_mask_buffer(self, a.block_size)

    def forward(self, x, rope=None):
        y = causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.n_head,
                             self.attn_dropout, rope)
        return self.resid_dropout(self.c_proj(y))


def add_mask_buffer(module, T):
    # The name and shape the reference uses under PyTorch < 2.0.  Unused here.
    module.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))


class SchemeMixture(nn.Module):
    """MHA, GQA and MQA branches mixed by their mean or by a per-token router."""

    def __init__(self, a, routed, mask_buffers):
        super().__init__()
        self.mha = FusedAttention(a, mask_buffers)
        self.gqa = SplitAttention(a, GQA_KV_HEADS, mask_buffers)
        self.mqa = SplitAttention(a, 1, mask_buffers)
        self.router = None
        if routed:
            hidden = a.n_embd // 4
            self.router = nn.Sequential(nn.Linear(a.n_embd, hidden, bias=a.bias), nn.GELU(),
                                        nn.Linear(hidden, 3, bias=a.bias))
            self.gate_dropout = nn.Dropout(a.dropout)

    def forward(self, x, rope=None, routing="soft"):
        """(output [B, T, C], gates [B, T, 3] before dropout, or None).  routing
        "hard": libmoas's routed mode instead of the mixture (self.routed)."""
        if routing == "hard":
            return self.routed(x, rope)
        outs = torch.stack([self.mha(x, rope), self.gqa(x, rope), self.mqa(x, rope)],
                           dim=2)                                           # [B, T, 3, C]
        if self.router is None:
            return outs.sum(dim=2) / 3.0, None
        gates = F.softmax(self.router(x), dim=-1)                             # [B, T, 3]
        y = (self.gate_dropout(gates).unsqueeze(-1) * outs).sum(dim=2)
        return y, gates


    def routed(self, x, rope=None):
        """libmoas's routed mode (docs/ROUTING.md, "Routed mode"), for golden files:
        per token the branch of the largest gate (the first of equals; branch 0 for
        static MoAS, whose gates are all 1/3) runs alone and its output enters at
        full weight.  Its keys and values are what the cache stores, n_kv heads of
        that branch's projections, rotated at the token's position; query head h
        reads token j's kv head h*n_kv(s_j)/H of the branch j took, so a query meets
        keys that other branches' projections made.  Inference only (argmax, no
        gradient to the router)."""
        B, T, C = x.shape
        H = self.mha.n_head
        d = C // H
        gates = F.softmax(self.router(x), dim=-1) if self.router is not None else None
        choice = gates.argmax(dim=-1) if gates is not None else \
            torch.zeros(B, T, dtype=torch.long, device=x.device)            # [B, T]
        q, k, v = self.mha.c_attn(x).chunk(3, dim=-1)
        branches = [(q, k, v, self.mha.c_proj)] + [
            (b.q_proj(x), b.k_proj(x), b.v_proj(x), b.c_proj) for b in (self.gqa, self.mqa)]

        def widen(t, n_kv):                    # [B, T, n_kv*d] -> [B, T, H*d]
            t = t.view(B, T, n_kv, 1, d).expand(B, T, n_kv, H // n_kv, d)
            return t.reshape(B, T, C)

        def chosen(per_branch):                # [B, T, C] per branch -> each token's
            stacked = torch.stack(per_branch, dim=2)                         # [B, T, 3, C]
            index = choice[:, :, None, None].expand(B, T, 1, C)
            return stacked.gather(2, index).squeeze(2)

        qs, ks, vs = [], [], []
        for bq, bk, bv, _ in branches:
            n_kv = bk.shape[-1] // d
            qs.append(apply_rope(bq, H, rope))
            ks.append(widen(apply_rope(bk, n_kv, rope), n_kv))
            vs.append(widen(bv, n_kv))
        y = causal_attention(chosen(qs), chosen(ks), chosen(vs), H, self.mha.attn_dropout)
        return chosen([proj(y) for _, _, _, proj in branches]), gates


class PooledAttention(nn.Module):
    """The routed-KV variant (docs/FORMAT.md "Pooled K/V").

    One q_proj, k_proj, v_proj (H heads each) and c_proj shared by all schemes.
    Scheme s keeps K/V mean-pooled over groups of H/n_kv(s) consecutive heads;
    query head h reads pooled head h*n_kv(s)/H.  routing "soft" mixes the
    broadcast pooled K/V with the router's gates; "hard" with the one-hot of
    their argmax (lowest index on ties), straight-through when gradients flow
    (forward: exactly the one-hot, which is routed mode; backward: through g).

    gate_temperature T (training only, not a parameter): the gates are
    softmax(router(x) / T).  save_checkpoint folds 1/T into router.2, so a
    saved model has T = 1 and computes the same gates (docs: tools/README.md).
    """

    def __init__(self, a, mask_buffers):
        super().__init__()
        C = a.n_embd
        self.n_head = a.n_head
        self.schemes = list(a.schemes)
        self.q_proj = nn.Linear(C, C, bias=a.bias)
        self.k_proj = nn.Linear(C, C, bias=a.bias)
        self.v_proj = nn.Linear(C, C, bias=a.bias)
        self.c_proj = nn.Linear(C, C, bias=a.bias)
        hidden = C // 4
        self.router = nn.Sequential(nn.Linear(C, hidden, bias=a.bias), nn.GELU(),
                                    nn.Linear(hidden, len(self.schemes), bias=a.bias))
        self.attn_dropout = nn.Dropout(a.dropout)
        self.resid_dropout = nn.Dropout(a.dropout)
        self.gate_temperature = 1.0
        if mask_buffers:
            add_mask_buffer(self, a.block_size)

    def mix(self, x, weights):
        """sum_s weights[..., s] * broadcast(pool_s(x)); x [B, T, C] -> [B, T, C]."""
        B, T, C = x.shape
        H = self.n_head
        d = C // H
        x = x.view(B, T, H, d)
        out = None
        for s, n_kv in enumerate(self.schemes):
            pooled = x.view(B, T, n_kv, H // n_kv, d).mean(dim=3)          # [B, T, n_kv, d]
            if n_kv != H:
                pooled = pooled.repeat_interleave(H // n_kv, dim=2)        # [B, T, H, d]
            term = weights[..., s, None, None] * pooled
            out = term if out is None else out + term
        return out.reshape(B, T, C)

    def forward(self, x, routing="soft", rope=None, with_logits=False):
        """(output [B, T, C], soft gates [B, T, S]), and with_logits the router
        logits [B, T, S] too: the softmax's input router(x) / gate_temperature.

        With rope, q and all H heads of k are rotated before k is pooled: the
        rotation is the same for every head, so pooling commutes with it."""
        z = self.router(x)
        if self.gate_temperature != 1.0:
            z = z / self.gate_temperature
        gates = F.softmax(z, dim=-1)
        if routing == "soft":
            w = gates
        elif routing == "hard":
            w = F.one_hot(gates.argmax(dim=-1), len(self.schemes)).to(gates.dtype)
            if gates.requires_grad:
                w = w + (gates - gates.detach())       # forward: exactly one-hot
        else:
            raise ValueError("routing must be 'soft' or 'hard', not %r" % (routing,))
        k = self.mix(apply_rope(self.k_proj(x), self.n_head, rope), w)
        v = self.mix(self.v_proj(x), w)
        q = apply_rope(self.q_proj(x), self.n_head, rope)
        y = causal_attention(q, k, v, self.n_head, self.attn_dropout)
        out = self.resid_dropout(self.c_proj(y))
        return (out, gates, z) if with_logits else (out, gates)


class MLP(nn.Module):
    """gelu: c_proj(GELU(c_fc x)); swiglu: c_proj(SiLU(c_gate x) * c_fc x)."""

    def __init__(self, a):
        super().__init__()
        self.c_fc = nn.Linear(a.n_embd, a.n_ff, bias=a.bias)
        self.c_gate = nn.Linear(a.n_embd, a.n_ff, bias=a.bias) if a.mlp == "swiglu" else None
        self.c_proj = nn.Linear(a.n_ff, a.n_embd, bias=a.bias)
        self.dropout = nn.Dropout(a.dropout)

    def forward(self, x):
        if self.c_gate is None:
            h = F.gelu(self.c_fc(x))
        else:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, a, mask_buffers):
        super().__init__()
        self.ln_1 = make_norm(a)
        if a.attention_type == "baseline":
            self.attn = FusedAttention(a, mask_buffers)
        elif a.attention_type == "gqa":
            self.attn = SplitAttention(a, a.n_kv_head, mask_buffers)
        elif a.attention_type == "pooled_moas":
            self.attn = PooledAttention(a, mask_buffers)
        else:
            self.attn = SchemeMixture(a, a.attention_type == "moas", mask_buffers)
        self.ln_2 = make_norm(a)
        self.mlp = MLP(a)

    def forward(self, x, routing="soft", rope=None):
        """(x, gates or None, router logits or None; the logits: pooled_moas only)."""
        h = self.ln_1(x)
        z = None
        if isinstance(self.attn, SchemeMixture):
            y, gates = self.attn(h, rope, routing)
        elif isinstance(self.attn, PooledAttention):
            y, gates, z = self.attn(h, routing, rope, with_logits=True)
        else:
            y, gates = self.attn(h, rope), None
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, gates, z


class MoASGPT(nn.Module):
    def __init__(self, a, mask_buffers=False):
        super().__init__()
        self.args = a
        parts = dict(
            wte=nn.Embedding(a.vocab_size, a.n_embd),
            wpe=nn.Embedding(a.block_size, a.n_embd),
            h=nn.ModuleList([Block(a, mask_buffers) for _ in range(a.n_layer)]),
            ln_f=make_norm(a),
        )
        if a.pos == "rope":
            del parts["wpe"]                 # no learned position table with RoPE
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(a.n_embd, a.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight      # tied, as published
        self.emb_dropout = nn.Dropout(a.dropout)

    def untie(self):
        self.lm_head.weight = nn.Parameter(self.lm_head.weight.detach().clone())

    def set_gate_temperature(self, t):
        """pooled_moas: gates softmax(router(x) / t) in this model's forward."""
        for m in self.modules():
            if isinstance(m, PooledAttention):
                m.gate_temperature = float(t)

    def forward(self, idx, routing="soft", with_router_logits=False):
        """(logits [B, T, V] at every position, [gates [B, T, S] per layer] or []),
        and with_router_logits a third item: [router logits [B, T, S] per layer],
        the softmax's input (pooled_moas only; [] for the other types).

        routing "hard": pooled_moas's straight-through top-1 routing; for moas and
        static_moas, libmoas's routed mode (SchemeMixture.routed, inference only).
        """
        B, T = idx.shape
        if T > self.args.block_size:
            raise ValueError("sequence of %d exceeds block_size %d" % (T, self.args.block_size))
        x = self.transformer.wte(idx)
        rope = None
        if self.args.pos == "rope":
            rope = rope_tables(T, self.args.n_embd // self.args.n_head, self.args.rope_base,
                               x.dtype)
        else:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        x = self.emb_dropout(x)
        all_gates, all_z = [], []
        for block in self.transformer.h:
            x, gates, z = block(x, routing, rope)
            if gates is not None:
                all_gates.append(gates)
            if z is not None:
                all_z.append(z)
        logits = self.lm_head(self.transformer.ln_f(x))
        return (logits, all_gates, all_z) if with_router_logits else (logits, all_gates)


def init_weights(model, std=None, seed_norm=0.2):
    """The reference's init, or with std given a spread-out one for fixtures.

    Reference: Linear and Embedding weights N(0, 0.02), every c_proj.weight
    N(0, 0.02/sqrt(2*n_layer)), biases 0, LayerNorm weight 1 and bias 0.
    With std: every Linear/Embedding weight and Linear bias N(0, std),
    LayerNorm weights 1 + N(0, seed_norm) and biases N(0, seed_norm), so that
    logits and router gates vary noticeably in a tiny random model.
    """
    n_layer = model.args.n_layer
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = name.rsplit(".", 1)
            is_norm = re.search(r"(^|\.)(ln_1|ln_2|ln_f)\.(weight|bias)$", name) is not None
            if std is None:
                if is_norm:
                    p.fill_(1.0 if owner[1] == "weight" else 0.0)
                elif owner[1] == "bias":
                    p.zero_()
                elif name.endswith("c_proj.weight"):
                    p.normal_(0.0, 0.02 / math.sqrt(2 * n_layer))
                else:
                    p.normal_(0.0, 0.02)
            else:
                if is_norm:
                    p.normal_(0.0, seed_norm)
                    if owner[1] == "weight":
                        p.add_(1.0)
                else:
                    p.normal_(0.0, std)


# ---------------------------------------------------------------------------
# Data and checkpoints
# ---------------------------------------------------------------------------

def read_text(path):
    """The text of `path`; a file that cannot be read as UTF-8 text ends the program with
    one line saying why."""
    if os.path.exists(path) and not os.path.isfile(path):
        sys.exit("train.py: '%s' is not a regular file" % path)
    try:
        with open(path, "r", encoding="utf-8") as f:  # universal newlines, as the reference
            return f.read()
    except OSError as e:
        sys.exit("train.py: cannot read '%s': %s" % (path, e.strerror or e))
    except UnicodeDecodeError as e:
        sys.exit("train.py: '%s' is not UTF-8 text (byte %d)" % (path, e.start))


def build_vocab(text):
    chars = sorted(set(text))
    return chars, {c: i for i, c in enumerate(chars)}


MASK_KEY = re.compile(r"transformer\.h\.\d+\.attn(\.(mha|gqa|mqa))?\.bias")


def clean_state_dict(sd):
    """Strip torch.compile/DDP prefixes and drop causal-mask buffers."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("_orig_mod.", "module.")):
            k = k.split(".", 1)[1]
        if MASK_KEY.fullmatch(k) and v.dim() == 4:
            continue
        out[k] = v
    return out


def _converter():
    """tools/moas-convert as a module: its restricted checkpoint reader."""
    import importlib.machinery
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), "moas-convert")
    loader = importlib.machinery.SourceFileLoader("moas_convert", path)
    spec = importlib.util.spec_from_loader("moas_convert", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def load_checkpoint(path, unsafe=False):
    """(model, model_args dict) from a reference-layout checkpoint.

    By default the file is read with moas-convert's restricted unpickler, which
    runs no code from it (torch 1.13's weights_only loader rejects the floats
    every checkpoint holds).  unsafe=True uses torch.load as is.
    """
    if unsafe:
        ck = torch.load(path, map_location="cpu")
        margs, sd = ck["model_args"], ck["model"]
    else:
        conv = _converter()
        try:
            ck = conv.load_torch_zip(path)
            if not isinstance(ck, dict) or "model" not in ck or "model_args" not in ck:
                raise conv.ConvertError("no 'model' and 'model_args' entries")
            margs, sd = ck["model_args"], {}
            for k, t in ck["model"].items():
                if not isinstance(t, conv.LazyTensor):
                    continue
                if MASK_KEY.fullmatch(k.replace("_orig_mod.", "")) and len(t.shape) == 4:
                    continue
                vals = t.floats(k)
                sd[k] = torch.frombuffer(vals, dtype=torch.float32).clone().view(t.shape)
        except conv.ConvertError as e:
            sys.exit("train.py: cannot load %s: %s" % (path, e))
        except OSError as e:
            sys.exit("train.py: cannot read '%s': %s" % (path, e.strerror or e))
    try:       # a checkpoint's model_args are data like its weights: a bad one is an error
        a = ModelArgs(**margs)
    except (TypeError, ValueError) as e:
        sys.exit("train.py: cannot load %s: its model_args are not a model's: %s" % (path, e))
    model = MoASGPT(a)
    sd = clean_state_dict(sd)
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"],
                                                   sd["transformer.wte.weight"]):
        model.untie()
    model.load_state_dict(sd, strict=True)
    return model, margs


INIT_FROM_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "pos",
                  "rope_base", "norm", "mlp", "n_ff")


def init_from_checkpoint(model, path, unsafe=False):
    """--init-from: copy a checkpoint's weights into model, in place.

    The same attention type: every tensor (the shapes must all agree).  A
    baseline checkpoint into a pooled_moas model: every tensor of the same name
    and shape (embeddings, norms, MLPs, attn.c_proj, lm_head), and each layer's
    attn.c_attn [3C, C] split into its q, k, v thirds (FusedAttention.forward's
    chunk order) as q_proj, k_proj, v_proj; the routers keep their fresh init.
    Returns {"from": type, "copied": [...], "split": [...], "new": [...]};
    raises ValueError when the checkpoint does not fit.
    """
    src, _ = load_checkpoint(path, unsafe)
    sa, a = src.args, model.args
    same = sa.attention_type == a.attention_type
    if not same and (sa.attention_type, a.attention_type) != ("baseline", "pooled_moas"):
        raise ValueError("a %s checkpoint cannot start a %s model (same type, or baseline "
                         "-> pooled_moas)" % (sa.attention_type, a.attention_type))
    keys = INIT_FROM_KEYS + (("schemes", "n_kv_head") if same else ())
    diff = ["%s %r (here %r)" % (k, getattr(sa, k), getattr(a, k)) for k in keys
            if getattr(sa, k) != getattr(a, k)]
    if diff:
        raise ValueError("%s differs: %s" % (path, ", ".join(diff)))
    if src.lm_head.weight is not src.transformer.wte.weight:
        model.untie()
    sd = dict(src.state_dict())
    split = []
    if not same:
        for i in range(a.n_layer):
            pre = "transformer.h.%d.attn." % i
            for kind in ("weight", "bias"):
                w = sd.pop(pre + "c_attn." + kind, None)
                if w is None:
                    continue
                for name, part in zip(("q_proj", "k_proj", "v_proj"), w.chunk(3, dim=0)):
                    sd[pre + name + "." + kind] = part
                split.append(pre + "c_attn." + kind)
    target = model.state_dict()
    copied, new = [], []
    with torch.no_grad():
        for k, t in target.items():
            if MASK_KEY.fullmatch(k) and t.dim() == 4:
                continue
            if k in sd and sd[k].shape == t.shape:
                t.copy_(sd[k])               # state_dict tensors share the parameters' storage
                copied.append(k)
            else:
                new.append(k)
    unused = [k for k in sd if k not in copied]
    if unused or (new and same) or any(".attn.router." not in k for k in new):
        raise ValueError("%s does not fit: unused %s, missing %s" % (path, unused, new))
    return {"from": sa.attention_type, "copied": copied, "split": split, "new": new}


def summarize_keys(keys):
    """'transformer.h.1.attn.router.0.weight', ... -> 'h.*.attn.router.0, ...': the
    modules, in order, with layers folded."""
    mods = []
    for k in keys:
        k = re.sub(r"^transformer\.|\.(weight|bias)$", "", re.sub(r"\.h\.\d+\.", ".h.*.", k))
        if k not in mods:
            mods.append(k)
    return ", ".join(mods) or "none"


ROUTER_OUT_KEY = re.compile(r"transformer\.h\.\d+\.attn\.router\.2\.(weight|bias)")


def fold_gate_temperature(sd, t):
    """A copy of state_dict sd with router.2's weight and bias divided by t: the
    saved router's output is then router(x) / t, so softmax of it (libmoas's
    gates, src/forward.c) equals the training gates softmax(router(x) / t)."""
    if t == 1.0:
        return sd
    return {k: (v / t if ROUTER_OUT_KEY.fullmatch(k) else v) for k, v in sd.items()}


def save_checkpoint(path, model, optimizer, iter_num, best_val_loss, config,
                    gate_temperature=1.0):
    ck = {
        "model": fold_gate_temperature(model.state_dict(), gate_temperature),
        "optimizer": optimizer.state_dict(),
        "model_args": model.args.as_dict(),
        "iter_num": iter_num,
        "best_val_loss": torch.tensor(float(best_val_loss)),
        "config": config,
    }
    buf = io.BytesIO()          # zip records then live under "archive/", as torch >= 2 names them
    torch.save(ck, buf)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)


def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.99)):
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def kv_fractions(gates_per_layer, schemes, n_head):
    """(expected kv fraction sum_s g_s n_kv(s)/H, the argmax's n_kv/H), each the
    mean over tokens and layers; the first keeps its gradient."""
    cost = torch.tensor([n / n_head for n in schemes], dtype=gates_per_layer[0].dtype)
    soft = torch.stack([(g * cost).sum(-1).mean() for g in gates_per_layer]).mean()
    hard = torch.stack([cost[g.argmax(-1)].mean() for g in gates_per_layer]).mean()
    return soft, hard


def kv_fractions_per_layer(gates_per_layer, schemes, n_head):
    """[L] expected kv fraction of each layer, mean over its tokens of
    sum_s g_s n_kv(s)/H, with gradient; kv_fractions' soft value is their mean."""
    cost = torch.tensor([n / n_head for n in schemes], dtype=gates_per_layer[0].dtype)
    return torch.stack([(g * cost).sum(-1).mean() for g in gates_per_layer])


def parse_kv_targets(spec, n_layer):
    """'1.0,0.5,0.2,0.2' -> [1.0, 0.5, 0.2, 0.2]: one fraction in [0, 1] per layer."""
    try:
        out = [float(item) for item in spec.split(",")]
    except ValueError:
        raise ValueError("not a comma-separated list of numbers: %r" % spec)
    if len(out) != n_layer:
        raise ValueError("%d fractions for %d layers" % (len(out), n_layer))
    if not all(0.0 <= f <= 1.0 for f in out):
        raise ValueError("fractions must be in [0, 1]: %r" % spec)
    return out


def kv_target_penalty(kv_per_layer, targets):
    """--kv-target-per-layer: mean over layers of relu(kv_l - F_l), each layer's
    expected kv fraction above its target (with F_l = 0 it is the plain penalty)."""
    t = torch.tensor(targets, dtype=kv_per_layer.dtype)
    return F.relu(kv_per_layer - t).mean()


def scheme_shares(gates_per_layer):
    """[L, S] share of tokens whose argmax (lowest index on ties) is each scheme."""
    return torch.stack([F.one_hot(g.argmax(-1), g.shape[-1]).to(torch.float64).mean(dim=(0, 1))
                        for g in gates_per_layer])


KV_SCHEDULES = ("constant", "linear", "cosine")


def kv_penalty_at(it, lam, warmup=0, schedule="linear"):
    """--kv-penalty's lambda at iteration it: from 0 at it = 0 up to lam at it = warmup
    (linear: lam*it/warmup; cosine: lam*(1 - cos(pi*it/warmup))/2), lam after;
    lam throughout with warmup 0 or the constant schedule."""
    if schedule not in KV_SCHEDULES:
        raise ValueError("unknown kv penalty schedule %r" % (schedule,))
    if warmup <= 0 or schedule == "constant" or it >= warmup:
        return lam
    r = max(it, 0) / warmup
    if schedule == "linear":
        return lam * r
    return lam * 0.5 * (1.0 - math.cos(math.pi * r))


def load_balance_loss(gates_per_layer):
    """Mean over layers of MSE(mean gate per scheme, 1/3), as in the reference."""
    if not gates_per_layer:
        return None
    losses = []
    for g in gates_per_layer:
        mean = g.mean(dim=(0, 1))
        losses.append(F.mse_loss(mean, torch.full_like(mean, 1.0 / mean.numel())))
    return sum(losses) / len(losses)


def switch_balance_loss(gates_per_layer):
    """Mean over layers of the Switch Transformer's S * sum_s f_s p_s: f_s the
    share of tokens whose argmax (lowest index on ties) is s, without gradient,
    p_s the mean gate of s.  1 when balanced, S when one scheme takes all."""
    if not gates_per_layer:
        return None
    losses = []
    for g in gates_per_layer:
        S = g.shape[-1]
        f = F.one_hot(g.detach().argmax(-1), S).to(g.dtype).mean(dim=(0, 1))
        losses.append(S * (f * g.mean(dim=(0, 1))).sum())
    return sum(losses) / len(losses)


def router_entropy(logits_per_layer):
    """Mean over tokens and layers of the gates' entropy -sum_s g_s log g_s
    (nats), g = softmax of the router logits."""
    return torch.stack([-(F.softmax(z, -1) * F.log_softmax(z, -1)).sum(-1).mean()
                        for z in logits_per_layer]).mean()


def router_z_loss(logits_per_layer):
    """ST-MoE's router z-loss: mean over tokens and layers of logsumexp_s(z_s)^2."""
    return torch.stack([torch.logsumexp(z, -1).pow(2).mean() for z in logits_per_layer]).mean()


BALANCE_TYPES = ("mse", "switch", "none")


def balance_loss(gates_per_layer, kind="mse"):
    """--balance: 'mse' (load_balance_loss, published), 'switch' or 'none';
    None when there is no term (no router, or 'none')."""
    if kind == "mse":
        return load_balance_loss(gates_per_layer)
    if kind == "switch":
        return switch_balance_loss(gates_per_layer)
    if kind == "none":
        return None
    raise ValueError("unknown balance loss %r" % (kind,))


def training_loss(o, it, ce, gates, router_logits=None, schemes=None, n_head=None,
                  kv_targets=None):
    """(loss to minimise at iteration it, {term: unweighted value}) from the
    cross-entropy ce, the gates and (pooled_moas: router_logits not None) the
    router logits: ce + load_balance_weight * --balance term, then, pooled,
    + lambda(it) * (mean kv fraction, or kv_target_penalty with kv_targets)
    + router_entropy * entropy + router_z_loss * z-loss, added in that order."""
    parts = {}
    total = ce
    lb = balance_loss(gates, o.balance)
    if lb is not None:
        parts["balance"] = lb
        total = total + o.load_balance_weight * lb
    if router_logits is None:
        return total, parts
    parts["kv_soft"], parts["kv_hard"] = kv_fractions(gates, schemes, n_head)
    lam = kv_penalty_at(it, o.kv_penalty, o.kv_penalty_warmup, o.kv_penalty_schedule)
    parts["kv_lambda"] = lam
    if lam and kv_targets is not None:
        parts["kv_target"] = kv_target_penalty(kv_fractions_per_layer(gates, schemes, n_head),
                                               kv_targets)
        total = total + lam * parts["kv_target"]
    elif lam:
        total = total + lam * parts["kv_soft"]
    if o.router_entropy:
        parts["entropy"] = router_entropy(router_logits)
        total = total + o.router_entropy * parts["entropy"]
    if o.router_z_loss:
        parts["z_loss"] = router_z_loss(router_logits)
        total = total + o.router_z_loss * parts["z_loss"]
    return total, parts


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def cmd_train(o):
    text = read_text(o.data)
    chars, stoi = build_vocab(text)
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = len(ids)
    train_ids, val_ids = ids[:int(n * 0.9)], ids[int(n * 0.9):]
    torch.manual_seed(o.seed)
    pooled = o.attention_type == "pooled_moas"
    extra = {}
    if pooled:
        try:
            extra["schemes"] = parse_schemes(o.schemes or "H,%d,1" % GQA_KV_HEADS, o.n_head)
        except ValueError as e:
            sys.exit("train.py: --schemes: %s" % e)
    elif o.schemes is not None or o.kv_penalty or o.hard_top1_from is not None:
        sys.exit("train.py: --schemes, --kv-penalty and --hard-top1-from are for "
                 "--attention-type pooled_moas")
    elif (o.gate_temperature != 1.0 or o.router_entropy or o.router_z_loss
          or o.kv_penalty_warmup):
        sys.exit("train.py: --gate-temperature, --router-entropy, --router-z-loss and "
                 "--kv-penalty-warmup are for --attention-type pooled_moas")
    kv_targets = None
    if o.kv_target_per_layer is not None:
        if not pooled or not o.kv_penalty:
            sys.exit("train.py: --kv-target-per-layer needs --attention-type pooled_moas and "
                     "--kv-penalty")
        try:
            kv_targets = parse_kv_targets(o.kv_target_per_layer, o.n_layer)
        except ValueError as e:
            sys.exit("train.py: --kv-target-per-layer: %s" % e)
    if o.kv_penalty_warmup and o.kv_penalty_schedule == "constant":
        sys.exit("train.py: --kv-penalty-schedule constant takes no --kv-penalty-warmup")
    if o.rope_base is not None and o.pos != "rope":
        sys.exit("train.py: --rope-base is for --pos rope (learned positions have no base)")
    if o.min_lr > o.lr:   # the cosine would rise towards it instead of decaying
        sys.exit("train.py: --min-lr %g is above --lr %g" % (o.min_lr, o.lr))
    if o.attention_type == "gqa":
        extra["n_kv_head"] = GQA_KV_HEADS if o.kv_heads is None else o.kv_heads
    elif o.kv_heads is not None:
        sys.exit("train.py: --kv-heads is for --attention-type gqa")
    n_ff = o.n_ff
    if n_ff is None and o.mlp == "swiglu":    # 2/3 of 4C (as many weights), a multiple of 16
        n_ff = (8 * o.n_embd // 3 + 15) // 16 * 16
    try:
        a = ModelArgs(n_layer=o.n_layer, n_head=o.n_head, n_embd=o.n_embd,
                      block_size=o.block_size, bias=o.bias, vocab_size=len(chars),
                      dropout=o.dropout, attention_type=o.attention_type, pos=o.pos,
                      rope_base=o.rope_base, norm=o.norm, mlp=o.mlp, n_ff=n_ff, **extra)
    except ValueError as e:
        sys.exit("train.py: %s" % e)
    model = MoASGPT(a, mask_buffers=o.mask_buffers)
    init_weights(model, o.init_std)
    if o.kv_init_scale != 1.0:
        if not pooled:
            sys.exit("train.py: --kv-init-scale is for --attention-type pooled_moas")
        with torch.no_grad():   # pooled K/V start at the spread of a head of their own
            for name, p in model.named_parameters():
                if re.search(r"\.(k_proj|v_proj)\.weight$", name):
                    p.mul_(o.kv_init_scale)
    model.set_gate_temperature(o.gate_temperature)
    n_params = sum(p.numel() for p in model.parameters())
    log("%s model: %d layers, %d heads, n_embd %d, block %d, bias %s, vocab %d, pos %s%s, "
        "norm %s, mlp %s (n_ff %d), %.3fM params%s"
        % (a.attention_type, a.n_layer, a.n_head, a.n_embd, a.block_size, a.bias,
           a.vocab_size, a.pos, " (base %g)" % a.rope_base if a.pos == "rope" else "",
           a.norm, a.mlp, a.n_ff, n_params / 1e6,
           ", schemes %s, kv penalty %g, hard top-1 from %s, gate temperature %g"
           % (a.schemes, o.kv_penalty, o.hard_top1_from, o.gate_temperature) if pooled
           else ", %d kv heads" % a.n_kv_head if a.n_kv_head is not None else ""))
    if pooled or a.attention_type == "moas":
        terms = ["balance %s x %g" % (o.balance, o.load_balance_weight)
                 if o.balance != "none" else "no balance term"]
        if pooled:
            terms += ["gate entropy x %g" % o.router_entropy, "z-loss x %g" % o.router_z_loss,
                      "kv lambda %s over %d iters" % (o.kv_penalty_schedule, o.kv_penalty_warmup)
                      if o.kv_penalty_warmup else "kv lambda constant",
                      "kv targets per layer %s" % kv_targets if kv_targets else "mean kv fraction"]
        log("router terms: " + ", ".join(terms))
    if o.init_from:
        try:
            got = init_from_checkpoint(model, o.init_from, o.unsafe_load)
        except ValueError as e:
            sys.exit("train.py: --init-from: %s" % e)
        log("init from %s (%s): copied %d tensors (%s)%s; new, freshly initialised: %d (%s)"
            % (o.init_from, got["from"], len(got["copied"]), summarize_keys(got["copied"]),
               ", %d of them split from %d c_attn into q_proj, k_proj, v_proj"
               % (3 * len(got["split"]), len(got["split"])) if got["split"] else "",
               len(got["new"]), summarize_keys(got["new"])))
    optimizer = make_optimizer(model, o.lr)
    golden_opts = ("golden", "text", "text_start", "text_len", "round_f16", "golden_dtype",
                   "golden_mode", "unsafe_load", "out", "threads")
    pooled_opts = ("schemes", "kv_penalty", "hard_top1_from", "gate_temperature",
                   "router_entropy", "router_z_loss", "kv_penalty_warmup",
                   "kv_penalty_schedule", "kv_target_per_layer")
    config = {k: v for k, v in vars(o).items()
              if k not in golden_opts and (pooled or k not in pooled_opts)
              and (o.attention_type == "gqa" or k != "kv_heads")
              and isinstance(v, (int, float, str, bool))}
    if o.init_only:
        check_weights_finite(model)
        save_checkpoint(o.out, model, optimizer, 0, float("inf"), config, o.gate_temperature)
        log("saved %s checkpoint %s" % ("initial (--init-from)" if o.init_from else "random-init",
                                         o.out))
        return
    if len(val_ids) <= o.block_size or len(train_ids) <= o.block_size:
        sys.exit("train.py: %s is too short for block_size %d (train %d, val %d chars)"
                 % (o.data, o.block_size, len(train_ids), len(val_ids)))
    if 0 < o.iters <= o.warmup:
        sys.stderr.write("train.py: warning: --warmup %d >= --iters %d: the learning rate only "
                         "rises, to %g on the last iteration (--lr %g), and never decays "
                         "towards --min-lr\n" % (o.warmup, o.iters, o.lr * o.iters / o.warmup,
                                                  o.lr))

    def batch(split):
        data = train_ids if split == "train" else val_ids
        ix = torch.randint(len(data) - o.block_size, (o.batch_size,))
        x = torch.stack([data[i:i + o.block_size] for i in ix])
        y = torch.stack([data[i + 1:i + 1 + o.block_size] for i in ix])
        return x, y

    def routing_at(it):
        return "hard" if o.hard_top1_from is not None and it >= o.hard_top1_from else "soft"

    @torch.no_grad()
    def estimate_pooled():
        """Losses under soft and hard routing on the same batches, kv fractions."""
        model.eval()
        res = {}
        for split in ("train", "val"):
            acc = {"soft": 0.0, "hard": 0.0, "kv_soft": 0.0, "kv_hard": 0.0, "shares": 0.0}
            for _ in range(o.eval_iters):
                x, y = batch(split)
                for routing in ("soft", "hard"):
                    logits, gates = model(x, routing)
                    acc[routing] += F.cross_entropy(logits.view(-1, logits.size(-1)),
                                                    y.view(-1)).item()
                    kv_soft, kv_hard = kv_fractions(gates, a.schemes, a.n_head)
                    acc["kv_" + routing] += (kv_soft if routing == "soft" else kv_hard).item()
                    if routing == "hard":
                        acc["shares"] = acc["shares"] + scheme_shares(gates)
            res[split] = {k: v / o.eval_iters for k, v in acc.items()}
        model.train()
        return res

    @torch.no_grad()
    def estimate():
        model.eval()
        res = {}
        for split in ("train", "val"):
            losses = []
            for _ in range(o.eval_iters):
                x, y = batch(split)
                logits, _ = model(x)
                losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item())
            res[split] = sum(losses) / len(losses)
        model.train()
        return res

    def lr_at(it):
        if it < o.warmup:
            return o.lr * (it + 1) / o.warmup
        if o.iters <= o.warmup:
            return o.lr
        ratio = min(1.0, (it - o.warmup) / (o.iters - o.warmup))
        return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (o.lr - o.min_lr)

    t_start = time.time()
    # The checkpoint holds the last iteration's weights (a run that ends in hard routing
    # must be saved as it ends, whatever scored best earlier under soft routing), so its
    # best_val_loss is their val loss, the last evaluation's; the lowest seen is logged.
    final = best = float("inf")
    best_it = 0
    model.train()
    for it in range(o.iters + 1):
        if (it % o.eval_interval == 0 or it == o.iters) and pooled:
            ev = estimate_pooled()
            tr, va = ev["train"], ev["val"]
            check_finite_losses(it, [tr["soft"], tr["hard"], va["soft"], va["hard"]])
            final = va[routing_at(min(it, o.iters - 1))]
            log("iter %d: train %.4f (hard %.4f), val %.4f (hard %.4f) nats/char, "
                "val kv fraction %.3f (hard %.3f), lr %.2e, %.1fs"
                % (it, tr["soft"], tr["hard"], va["soft"], va["hard"], va["kv_soft"],
                   va["kv_hard"], lr_at(min(it, o.iters - 1)), time.time() - t_start))
            cost = [n / a.n_head for n in a.schemes]
            log("iter %d: val hard shares of schemes %s per layer: %s" % (it, a.schemes, "; ".join(
                "layer %d %s (kv %.3f)" % (i, " ".join("%.3f" % v for v in row),
                                           sum(v * c for v, c in zip(row, cost)))
                for i, row in enumerate(va["shares"].tolist()))))
        elif it % o.eval_interval == 0 or it == o.iters:
            ev = estimate()
            check_finite_losses(it, [ev["train"], ev["val"]])
            final = ev["val"]
            log("iter %d: train %.4f, val %.4f nats/char, lr %.2e, %.1fs"
                % (it, ev["train"], ev["val"], lr_at(min(it, o.iters - 1)),
                   time.time() - t_start))
        if final < best:
            best, best_it = final, it
        if it == o.iters:
            break
        for g in optimizer.param_groups:
            g["lr"] = lr_at(it)
        x, y = batch("train")
        if pooled:
            if it == o.hard_top1_from:
                log("iter %d: switching to straight-through top-1 routing" % it)
            logits, gates, router_logits = model(x, routing_at(it), with_router_logits=True)
        else:
            logits, gates = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        total, parts = training_loss(o, it, loss, gates, router_logits if pooled else None,
                                     a.schemes, a.n_head, kv_targets)
        check_finite_losses(it, [total.item()], "training loss")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        if o.log_interval and it % o.log_interval == 0:
            extra = ""
            if gates:
                mean = torch.stack([g.mean(dim=(0, 1)) for g in gates]).mean(0)
                extra = ", gates " + " ".join("%.3f" % v for v in mean.tolist())
            if pooled:
                extra += ", kv fraction %.3f (hard %.3f)" % (parts["kv_soft"].item(),
                                                            parts["kv_hard"].item())
                if o.kv_penalty_warmup and it <= o.kv_penalty_warmup:
                    extra += ", kv lambda %.4g" % parts["kv_lambda"]
                if o.router_entropy:
                    extra += ", gate entropy %.3f" % parts["entropy"].item()
                if o.router_z_loss:
                    extra += ", z-loss %.3f" % parts["z_loss"].item()
            log("iter %d: loss %.4f%s, %.1fs" % (it, loss.item(), extra, time.time() - t_start))
    check_weights_finite(model)
    save_checkpoint(o.out, model, optimizer, o.iters, final, config, o.gate_temperature)
    log("saved %s (final val %.4f nats/char; best seen %.4f at iteration %d) after %.1fs"
        % (o.out, final, best, best_it, time.time() - t_start))


def check_finite_losses(it, losses, what="evaluation loss"):
    """End the run, nothing saved, once a loss is NaN or infinite: every later step
    only spreads it, and min() over evaluations would skip a NaN silently."""
    bad = [v for v in losses if not math.isfinite(v)]
    if bad:
        sys.exit("train.py: the %s is %s at iteration %d: training diverged (a "
                 "smaller --lr or loss weight may help); nothing saved" % (what, bad[0], it))


def check_weights_finite(model):
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        sys.exit("train.py: %d tensors hold NaN or infinite values (%s, ...); "
                 "nothing saved" % (len(bad), bad[0]))


EXTENSION_AT_END = re.compile(r"\.[A-Za-z0-9]{1,8}$")


def golden_text(arg):
    """--text: the text of the file it names, or else the argument itself.  An argument
    that names no file but looks like a file name (one line ending in an extension, or a
    path without spaces) is refused: a mistyped file name would be a golden of its
    own letters."""
    if os.path.exists(arg):
        return read_text(arg)
    path_like = ("/" in arg or os.sep in arg) and not any(c.isspace() for c in arg)
    if "\n" not in arg and (EXTENSION_AT_END.search(arg) or path_like):
        sys.exit("train.py: --text '%s' looks like a file name, but there is no such file "
                 "(a text that looks like one has to be given in a file)" % arg)
    return arg


def cmd_golden(o):
    model, _ = load_checkpoint(o.golden, o.unsafe_load)
    a = model.args
    if o.golden_mode == "routed" and a.attention_type not in ("pooled_moas", "moas",
                                                              "static_moas"):
        sys.exit("train.py: --golden-mode routed needs a model with schemes: pooled_moas, "
                 "moas or static_moas (this one is %s)" % a.attention_type)
    chars, stoi = build_vocab(read_text(o.data))
    if len(chars) != a.vocab_size:
        sys.exit("train.py: %s has %d characters, the model's vocab_size is %d"
                 % (o.data, len(chars), a.vocab_size))
    text = golden_text(o.text)
    if o.text_start > len(text):
        sys.exit("train.py: --text-start %d is beyond the end of --text (%d characters)"
                 % (o.text_start, len(text)))
    text = text[o.text_start:]
    if o.text_len is not None:
        if len(text) < o.text_len:
            sys.exit("train.py: --text has %d characters from --text-start %d on, fewer than "
                     "--text-len %d" % (len(text), o.text_start, o.text_len))
        text = text[:o.text_len]
    if not 1 <= len(text) <= a.block_size:
        sys.exit("train.py: golden text has %d characters; need 1..block_size (%d)"
                 % (len(text), a.block_size))
    bad = sorted(set(c for c in text if c not in stoi))
    if bad:
        sys.exit("train.py: golden text has characters outside the vocabulary: %r" % bad)
    if o.round_f16:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:                  # matrices and embeddings
                    p.copy_(p.half().float())
    dtype = {"float64": torch.float64, "float32": torch.float32}[o.golden_dtype]
    model = model.to(dtype).eval()
    tokens = [stoi[c] for c in text]
    routing = {"mixture": "soft", "routed": "hard"}[o.golden_mode]
    with torch.no_grad():
        logits, gates = model(torch.tensor([tokens]), routing)
    logits = logits[0].float()                                     # [T, V]
    n_scheme = gates[0].shape[-1] if gates else 0
    g64 = torch.stack([x[0] for x in gates], dim=1) if gates else None     # [T, L, S]
    g = g64.float() if gates else torch.zeros(0)
    with open(o.out, "wb") as f:
        f.write(b"MOASGLD1")
        f.write(struct.pack("<4I", len(tokens), a.vocab_size, a.n_layer, n_scheme))
        f.write(struct.pack("<%di" % len(tokens), *tokens))
        f.write(struct.pack("<%df" % logits.numel(), *logits.flatten().tolist()))
        if n_scheme:
            f.write(struct.pack("<%df" % g.numel(), *g.flatten().tolist()))
    msg = "wrote %s: %d tokens, logits in [%.3f, %.3f]" % (
        o.out, len(tokens), logits.min().item(), logits.max().item())
    if n_scheme:
        msg += ", gates in [%.3f, %.3f], argmax counts %s" % (
            g.min().item(), g.max().item(),
            torch.bincount(g.argmax(-1).flatten(), minlength=n_scheme).tolist())
        if n_scheme > 1:
            top2 = g64.topk(2, dim=-1).values
            msg += ", min top-1 margin %.2g" % (top2[..., 0] - top2[..., 1]).min().item()
        if a.attention_type == "pooled_moas":
            msg += ", %s, kv fraction %.3f" % (o.golden_mode, kv_fractions(
                gates, a.schemes, a.n_head)[0 if o.golden_mode == "mixture" else 1].item())
    log(msg)


def log(msg):
    print(msg, flush=True)


def positive(s):
    """argparse type: an integer >= 1."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("%d is not a positive integer" % v)
    return v


def non_negative(s):
    """argparse type: an integer >= 0."""
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError("%d is negative" % v)
    return v


def seed_value(s):
    """argparse type: an integer torch.manual_seed takes, -2^63 to 2^64 - 1 (beyond them
    it raised a RuntimeError after the model was built)."""
    v = int(s)
    if not -2**63 <= v < 2**64:
        raise argparse.ArgumentTypeError("%d is outside -2^63 .. 2^64-1" % v)
    return v


def dropout_rate(s):
    """argparse type: a probability in [0, 1)."""
    v = finite_float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError("%g is outside [0, 1)" % v)
    return v


def finite_float(s):
    """argparse type: a finite number (nan or inf would train to NaN weights)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a number" % s)
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError("%s is not a finite number" % s)
    return v


def positive_float(s):
    """argparse type: a finite number > 0."""
    v = finite_float(s)
    if not v > 0.0:
        raise argparse.ArgumentTypeError("%g is not > 0" % v)
    return v


def non_negative_float(s):
    """argparse type: a finite number >= 0."""
    v = finite_float(s)
    if v < 0.0:
        raise argparse.ArgumentTypeError("%g is negative" % v)
    return v


def rope_base_value(s):
    """argparse type: a finite RoPE base > 1 (at 1 every pair rotates at one speed)."""
    v = finite_float(s)
    if not v > 1.0:
        raise argparse.ArgumentTypeError("%g is not > 1" % v)
    return v


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--data", required=True, help="training text (UTF-8); defines the vocabulary")
    ap.add_argument("--out", required=True, help="checkpoint to write (golden file with --golden)")
    m = ap.add_argument_group("model")
    m.add_argument("--attention-type", choices=ATTENTION_TYPES, default="moas")
    m.add_argument("--n-layer", type=positive, default=6)
    m.add_argument("--n-head", type=positive, default=6)
    m.add_argument("--n-embd", type=positive, default=384)
    m.add_argument("--block-size", type=positive, default=256)
    m.add_argument("--bias", action=argparse.BooleanOptionalAction, default=False,
                   help="biases in every Linear and LayerNorm (reference training: off)")
    m.add_argument("--dropout", type=dropout_rate, default=0.2)
    m.add_argument("--mask-buffers", action="store_true",
                   help="also store the reference's [1,1,T,T] causal-mask buffers")
    m.add_argument("--pos", choices=POS_TYPES, default="learned",
                   help="positions: a learned table (published) or rotary (RoPE)")
    m.add_argument("--rope-base", type=rope_base_value, default=None,
                   help="RoPE frequency base (default %g); needs --pos rope" % ROPE_BASE)
    m.add_argument("--norm", choices=NORM_TYPES, default="layer",
                   help="LayerNorm (published) or RMSNorm")
    m.add_argument("--mlp", choices=MLP_TYPES, default="gelu",
                   help="GELU MLP (published) or SwiGLU (c_gate, c_fc, c_proj)")
    m.add_argument("--n-ff", type=positive, default=None,
                   help="MLP width (default 4C; with swiglu 8C/3 rounded up to 16)")
    m.add_argument("--schemes", metavar="H,2,1", default=None,
                   help="pooled_moas: kv heads of each scheme, H for n_head (default H,2,1)")
    m.add_argument("--kv-heads", type=positive, default=None, metavar="G",
                   help="gqa: kv heads G, dividing n_head and below it (default 2; "
                        "1 is multi-query attention)")
    t = ap.add_argument_group("training")
    t.add_argument("--iters", type=non_negative, default=2000)
    t.add_argument("--batch-size", type=positive, default=12)
    t.add_argument("--lr", type=positive_float, default=1e-3)
    t.add_argument("--min-lr", type=non_negative_float, default=1e-4)
    t.add_argument("--warmup", type=non_negative, default=100)
    t.add_argument("--grad-clip", type=non_negative_float, default=1.0,
                   help="clip the gradient norm to this (0: no clipping)")
    t.add_argument("--eval-interval", type=positive, default=200)
    t.add_argument("--eval-iters", type=positive, default=20)
    t.add_argument("--log-interval", type=non_negative, default=50)
    t.add_argument("--load-balance-weight", type=non_negative_float, default=0.01,
                   help="weight of the --balance term")
    t.add_argument("--balance", choices=BALANCE_TYPES, default="mse",
                   help="routers' balance term: mse of mean gates to 1/S (published), "
                        "switch S*sum_s f_s*p_s (f: argmax share), or none")
    t.add_argument("--kv-penalty", type=non_negative_float, default=0.0, metavar="LAMBDA",
                   help="pooled_moas: add LAMBDA * mean_{tokens,layers} sum_s g_s n_kv(s)/H "
                        "to the loss")
    t.add_argument("--kv-target-per-layer", metavar="F1,F2,...", default=None,
                   help="pooled_moas: penalise LAMBDA * mean_l relu(kv_l - F_l), each layer's "
                        "expected kv fraction above its F_l, instead of the mean kv fraction")
    t.add_argument("--kv-penalty-warmup", type=non_negative, default=0, metavar="N",
                   help="pooled_moas: ramp the kv penalty from 0 to LAMBDA over the first N "
                        "iterations (0: LAMBDA from the start)")
    t.add_argument("--kv-penalty-schedule", choices=KV_SCHEDULES, default="linear",
                   help="shape of that ramp: linear, cosine (half a cosine), or constant "
                        "(no ramp, needs N = 0)")
    t.add_argument("--hard-top1-from", type=non_negative, default=None, metavar="ITER",
                   help="pooled_moas: straight-through top-1 routing from this iteration on")
    t.add_argument("--gate-temperature", type=positive_float, default=1.0, metavar="T",
                   help="pooled_moas: gates softmax(router(x)/T); 1/T is folded into "
                        "router.2 when saving, so the GGUF's mixture gates are the same")
    t.add_argument("--router-entropy", type=finite_float, default=0.0, metavar="W",
                   help="pooled_moas: add W * mean gate entropy (W > 0: confident gates, "
                        "W < 0: spread-out ones)")
    t.add_argument("--router-z-loss", type=non_negative_float, default=0.0, metavar="W",
                   help="pooled_moas: add W * mean logsumexp(router logits)^2 (ST-MoE z-loss)")
    t.add_argument("--init-from", metavar="CKPT", default=None,
                   help="start from CKPT's weights: same attention type (all), or baseline -> "
                        "pooled_moas (c_attn split into q/k/v_proj; routers new)")
    t.add_argument("--seed", type=seed_value, default=1337)
    t.add_argument("--threads", type=non_negative, default=0, help="torch threads (0: torch's default)")
    t.add_argument("--init-only", action="store_true", help="save a random-init checkpoint")
    t.add_argument("--kv-init-scale", type=positive_float, default=1.0, metavar="F",
                   help="pooled_moas: multiply the initial k_proj/v_proj weights by F "
                        "(sqrt(H): a head mean-pooled over all H heads starts with the "
                        "spread of a head of its own)")
    t.add_argument("--init-std", type=non_negative_float, default=None,
                   help="init std for all weights and biases, LayerNorm weights/biases "
                        "perturbed too (default: the reference's init)")
    g = ap.add_argument_group("golden fixture", "--golden writes a golden file for CKPT's "
                              "model, which the checkpoint defines: of the options above only "
                              "--data (the vocabulary), --out and --threads apply; the model "
                              "and training options are ignored")
    g.add_argument("--golden", metavar="CKPT", help="write a golden fixture for this checkpoint")
    g.add_argument("--text", metavar="FILE|TEXT",
                   help="a file holding the golden text, or the text itself when no file of "
                        "that name exists; a name that looks like a file's (one line ending "
                        "in an extension such as .txt, or a path without spaces) and names "
                        "no file is an error")
    g.add_argument("--text-start", type=non_negative, default=0,
                   help="first character of --text to use")
    g.add_argument("--text-len", type=positive, default=None,
                   help="characters of --text to use (default: all from --text-start; "
                        "fewer left is an error)")
    g.add_argument("--round-f16", action="store_true",
                   help="round matrices and embeddings to float16 first (an F16 GGUF's values)")
    g.add_argument("--golden-dtype", choices=("float64", "float32"), default="float64")
    g.add_argument("--golden-mode", choices=("mixture", "routed"), default="mixture",
                   help="routed (models with schemes): libmoas's routed mode, the argmax of "
                        "the gates (lowest index on ties); the gates stored are the soft ones")
    g.add_argument("--unsafe-load", action="store_true",
                   help="read the checkpoint with torch.load, which runs its pickle "
                        "(default: moas-convert's restricted reader)")
    o = ap.parse_args(argv)
    if o.golden and o.text is None:
        ap.error("--golden needs --text")
    if o.n_embd % o.n_head:
        ap.error("--n-embd %d is not a multiple of --n-head %d" % (o.n_embd, o.n_head))
    where = os.path.dirname(o.out) or "."
    if not os.path.isdir(where):
        ap.error("--out '%s': the directory '%s' does not exist" % (o.out, where))
    if os.path.isdir(o.out):
        ap.error("--out '%s' is a directory" % o.out)
    return o


def main(argv=None):
    o = parse_args(argv)
    if o.threads:
        torch.set_num_threads(o.threads)
    if o.golden:
        cmd_golden(o)
    else:
        cmd_train(o)


if __name__ == "__main__":
    main()
