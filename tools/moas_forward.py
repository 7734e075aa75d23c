#!/usr/bin/env python3
"""The semantics of docs/FORMAT.md as a slow, plain-Python forward pass.

Standard library only.  It reads a libmoas GGUF with tools/gguf.py and runs the
forward of the format's Semantics section token by token with a K/V cache, in
double precision, in "mixture" or "routed" mode (docs/ROUTING.md: per token
and layer the argmax scheme of the gates, lowest index on ties, whose K/V are
cached with n_kv(s) heads: pooled, or of that scheme's own projections).  The
block options (RoPE, RMSNorm, SwiGLU; docs/FORMAT.md "Block options") are read
from the file's keys.  It exists to check files and goldens without torch or the C
library (tests/python, tools/check_reference.py); it is far too slow for
anything but the tiny test models.

    python3 tools/moas_forward.py model.gguf tests/data/x.golden            # compare
    python3 tools/moas_forward.py model.gguf x-routed.golden --mode routed
"""

import math
import os
import struct
import sys
from operator import mul

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import gguf  # noqa: E402


def _rows(values, n_rows, n_cols):
    return [values[r * n_cols:(r + 1) * n_cols] for r in range(n_rows)]


class Model:
    """Hyperparameters and weights (row-major lists of rows) of a GGUF model."""

    def __init__(self, path):
        r = gguf.GGUFReader(path)
        kv = r.kv
        if kv.get("general.architecture") != "moas":
            raise ValueError("not a moas model")
        self.n_ctx = kv["moas.context_length"]
        self.C = kv["moas.embedding_length"]
        self.L = kv["moas.block_count"]
        self.H = kv["moas.attention.head_count"]
        self.eps = kv["moas.attention.layer_norm_epsilon"]
        self.kv_heads = list(kv["moas.attention.scheme_kv_heads"])
        self.mixing = kv["moas.attention.mixing"]
        self.kv_sharing = kv.get("moas.attention.kv_sharing", "independent")
        if self.kv_sharing not in ("independent", "pooled"):
            raise ValueError("unknown kv_sharing %r" % self.kv_sharing)
        self.bias = kv["moas.bias"]
        self.tokens = list(kv["tokenizer.ggml.tokens"])
        self.d = self.C // self.H
        self.rope = kv.get("moas.position_encoding", "learned") == "rope"
        self.rope_base = kv.get("moas.rope.freq_base", 10000.0)
        self.rms = kv.get("moas.norm_type", "layer") == "rms"
        self.swiglu = kv.get("moas.feed_forward_type", "gelu") == "swiglu"
        self._r = r

    def vec(self, name):
        return self._r.tensor_values(name) if name in self._r.tensors else None

    def mat(self, name):
        """(rows, bias or None) of a weight stored with GGUF shape [in, out]."""
        t = self._r.tensors[name + ".weight"]
        n_in, n_out = t.ne
        w = _rows(self._r.tensor_values(name + ".weight"), n_out, n_in)
        return w, self.vec(name + ".bias")


def matvec(w, b, x):
    y = [sum(map(mul, row, x)) for row in w]
    if b is not None:
        y = [v + c for v, c in zip(y, b)]
    return y


def layer_norm(x, w, b, eps):
    n = len(x)
    mean = sum(x) / n
    var = sum((v - mean) ** 2 for v in x) / n
    inv = 1.0 / math.sqrt(var + eps)
    y = [(v - mean) * inv * g for v, g in zip(x, w)]
    return y if b is None else [v + c for v, c in zip(y, b)]


def rms_norm(x, w, b, eps):
    inv = 1.0 / math.sqrt(sum(v * v for v in x) / len(x) + eps)
    y = [v * inv * g for v, g in zip(x, w)]
    return y if b is None else [v + c for v, c in zip(y, b)]


def rope(x, n_heads, d, pos, base):
    """Each head's pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/d)."""
    out = list(x)
    for i in range(d // 2):
        ang = pos * base ** (-(2 * i) / d)
        c, s = math.cos(ang), math.sin(ang)
        for h in range(n_heads):
            j = h * d + 2 * i
            out[j], out[j + 1] = x[j] * c - x[j + 1] * s, x[j] * s + x[j + 1] * c
    return out


def gelu(v):
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def softmax(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def argmax(values):
    """Index of the largest value, the lowest one on ties."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def pool_heads(x, H, n_kv, d):
    """pool_s(x): the mean of each group of H/n_kv consecutive heads, n_kv heads."""
    grp = H // n_kv
    out = []
    for i in range(n_kv):
        for t in range(d):
            acc = 0.0
            for h in range(i * grp, (i + 1) * grp):
                acc += x[h * d + t]
            out.append(acc / grp)
    return out


class Runner:
    """Token-by-token forward with a K/V cache per layer (and scheme).

    mode "mixture" or "routed"; routed mode runs one scheme per token and layer,
    as src/forward.c does for both kinds of kv_sharing.
    """

    def __init__(self, m, mode="mixture"):
        if mode not in ("mixture", "routed"):
            raise ValueError("mode must be 'mixture' or 'routed'")
        self.m, self.mode = m, mode
        self.pooled = m.kv_sharing == "pooled"
        # one stream of (k, v, n_kv) per layer, n_kv varying by token: routed mode and
        # pooled mixture (which stores H heads); else a stream per scheme
        self.ragged = self.pooled or mode == "routed"
        self.n_past = 0
        self.emb = _rows(m.vec("token_embd.weight"), len(m.tokens), m.C)
        self.pos = None if m.rope else _rows(m.vec("position_embd.weight"), m.n_ctx, m.C)
        self.out = (_rows(m.vec("output.weight"), len(m.tokens), m.C)
                    if "output.weight" in m._r.tensors else self.emb)
        self.layers = []
        for i in range(m.L):
            p = "blk.%d." % i
            layer = {
                "attn_norm": (m.vec(p + "attn_norm.weight"), m.vec(p + "attn_norm.bias")),
                "ffn_norm": (m.vec(p + "ffn_norm.weight"), m.vec(p + "ffn_norm.bias")),
                "ffn_up": m.mat(p + "ffn_up"), "ffn_down": m.mat(p + "ffn_down"),
            }
            if m.swiglu:
                layer["ffn_gate"] = m.mat(p + "ffn_gate")
            if self.pooled:
                layer["pooled"] = {k: m.mat("%sattn_%s" % (p, k))
                                   for k in ("q", "k", "v", "output")}
            else:
                layer["schemes"] = [{k: m.mat("%sattn_%s.%d" % (p, k, s))
                                     for k in ("q", "k", "v", "output")}
                                    for s in range(len(m.kv_heads))]
            if m.mixing == "router":
                layer["router_up"] = m.mat(p + "attn_router_up")
                layer["router_down"] = m.mat(p + "attn_router_down")
            self.layers.append(layer)
        self.out_norm = (m.vec("output_norm.weight"), m.vec("output_norm.bias"))
        # ragged: cache[layer] = list of (k, v, n_kv) per position
        # else: cache[layer][scheme] = list of (k, v) per position
        self.cache = [[] if self.ragged else [[] for _ in m.kv_heads]
                      for _ in range(m.L)]
        # pooled or routed: the scheme chosen per position and layer (routed mode;
        # None in pooled mixture)
        self.chosen = []

    def gates(self, layer, a):
        m = self.m
        if m.mixing == "router":
            hid = [gelu(v) for v in matvec(*layer["router_up"], a)]
            return softmax(matvec(*layer["router_down"], hid))
        S = len(m.kv_heads)
        return [1.0 / S] * S

    def attend(self, q, cache):
        """Causal attention of query q over cache [(k, v, n_kv)]: query head h
        reads kv head h*n_kv/H of each cached token."""
        m = self.m
        scale = 1.0 / math.sqrt(m.d)
        o = []
        for h in range(m.H):
            qh = q[h * m.d:(h + 1) * m.d]
            sls = [slice((h * n // m.H) * m.d, (h * n // m.H + 1) * m.d) for _, _, n in cache]
            att = softmax([sum(map(mul, qh, kj[sl])) * scale
                           for (kj, _, _), sl in zip(cache, sls)])
            oh = [0.0] * m.d
            for wgt, (_, vj, _), sl in zip(att, cache, sls):
                vh = vj[sl]
                for t in range(m.d):
                    oh[t] += wgt * vh[t]
            o.extend(oh)
        return o

    def pooled_attention(self, li, layer, a):
        """(y, gates, chosen scheme or None) of a kv_sharing "pooled" layer."""
        m = self.m
        w = layer["pooled"]
        gates = self.gates(layer, a)
        q = matvec(*w["q"], a)
        k = matvec(*w["k"], a)
        v = matvec(*w["v"], a)
        if m.rope:      # all H key heads, before pooling
            q = rope(q, m.H, m.d, self.n_past - 1, m.rope_base)
            k = rope(k, m.H, m.d, self.n_past - 1, m.rope_base)
        pk = [pool_heads(k, m.H, n, m.d) for n in m.kv_heads]
        pv = [pool_heads(v, m.H, n, m.d) for n in m.kv_heads]
        if self.mode == "routed":
            s = argmax(gates)
            entry = (pk[s], pv[s], m.kv_heads[s])
        else:
            s = None

            def mix(pools):
                out = []
                for h in range(m.H):
                    for t in range(m.d):
                        acc = None
                        for si, (n, pool) in enumerate(zip(m.kv_heads, pools)):
                            term = gates[si] * pool[(h * n // m.H) * m.d + t]
                            acc = term if acc is None else acc + term
                        out.append(acc)
                return out
            entry = (mix(pk), mix(pv), m.H)
        self.cache[li].append(entry)
        y = matvec(*w["output"], self.attend(q, self.cache[li]))
        return y, gates, s

    def routed_attention(self, li, layer, a):
        """(y, gates, chosen scheme) of an independent-scheme layer in routed mode:
        only the top-1 scheme's projections run, its K/V cached with n_kv(s) heads,
        its output at full weight (static models' equal gates choose scheme 0)."""
        m = self.m
        gates = self.gates(layer, a)
        s = argmax(gates)
        w = layer["schemes"][s]
        n_kv = m.kv_heads[s]
        q = matvec(*w["q"], a)
        k = matvec(*w["k"], a)
        v = matvec(*w["v"], a)
        if m.rope:
            q = rope(q, m.H, m.d, self.n_past - 1, m.rope_base)
            k = rope(k, n_kv, m.d, self.n_past - 1, m.rope_base)
        self.cache[li].append((k, v, n_kv))
        y = matvec(*w["output"], self.attend(q, self.cache[li]))
        return y, gates, s

    def step(self, token):
        """(logits, gates per layer) for the next token."""
        m = self.m
        p = self.n_past
        if p >= m.n_ctx:
            raise ValueError("context full")
        self.n_past += 1
        x = list(self.emb[token]) if m.rope else [a + b for a, b in zip(self.emb[token],
                                                                        self.pos[p])]
        all_gates = []
        chosen = []
        for li, layer in enumerate(self.layers):
            a = self.norm(x, layer["attn_norm"])
            if self.ragged:
                if self.pooled:
                    y, gates, s = self.pooled_attention(li, layer, a)
                else:
                    y, gates, s = self.routed_attention(li, layer, a)
                if m.mixing == "router":
                    all_gates.append(gates)
                chosen.append(s)
                x = [u + v for u, v in zip(x, y)]
                x = [u + v for u, v in zip(x, self.mlp(layer, x))]
                continue
            ys = []
            for s, w in enumerate(layer["schemes"]):
                n_kv = m.kv_heads[s]
                q = matvec(*w["q"], a)
                k = matvec(*w["k"], a)
                v = matvec(*w["v"], a)
                if m.rope:
                    q = rope(q, m.H, m.d, p, m.rope_base)
                    k = rope(k, n_kv, m.d, p, m.rope_base)
                cache = self.cache[li][s]
                cache.append((k, v))
                o = []
                scale = 1.0 / math.sqrt(m.d)
                for h in range(m.H):
                    g = h * n_kv // m.H
                    qh = q[h * m.d:(h + 1) * m.d]
                    sl = slice(g * m.d, (g + 1) * m.d)
                    att = softmax([sum(map(mul, qh, kj[sl])) * scale for kj, _ in cache])
                    oh = [0.0] * m.d
                    for wgt, (_, vj) in zip(att, cache):
                        vh = vj[sl]
                        for t in range(m.d):
                            oh[t] += wgt * vh[t]
                    o.extend(oh)
                ys.append(matvec(*w["output"], o))
            if m.mixing == "router":
                hid = [gelu(v) for v in matvec(*layer["router_up"], a)]
                gates = softmax(matvec(*layer["router_down"], hid))
                all_gates.append(gates)
                y = [sum(g * ys[s][c] for s, g in enumerate(gates)) for c in range(m.C)]
            elif m.mixing == "mean":
                y = [sum(ys[s][c] for s in range(len(ys))) / len(ys) for c in range(m.C)]
            else:
                y = ys[0]
            x = [u + v for u, v in zip(x, y)]
            x = [u + v for u, v in zip(x, self.mlp(layer, x))]
        if self.ragged:
            self.chosen.append(chosen)
        x = self.norm(x, self.out_norm)
        return matvec(self.out, None, x), all_gates

    def norm(self, x, wb):
        return (rms_norm if self.m.rms else layer_norm)(x, wb[0], wb[1], self.m.eps)

    def mlp(self, layer, x):
        h = self.norm(x, layer["ffn_norm"])
        if self.m.swiglu:
            g = matvec(*layer["ffn_gate"], h)
            h = [gv / (1.0 + math.exp(-gv)) * uv
                 for gv, uv in zip(g, matvec(*layer["ffn_up"], h))]
        else:
            h = [gelu(v) for v in matvec(*layer["ffn_up"], h)]
        return matvec(*layer["ffn_down"], h)

    def kv_heads_cached(self, layer):
        """Heads of K (likewise V) the layer's cache holds."""
        if self.ragged:
            return sum(n for _, _, n in self.cache[layer])
        return sum(n * len(c) for n, c in zip(self.m.kv_heads, self.cache[layer]))


def forward(path, tokens, mode="mixture"):
    """(logits [T][V], gates [T][L][S]) of the model in path over tokens."""
    runner = Runner(Model(path), mode)
    logits, gates = [], []
    for t in tokens:
        lg, g = runner.step(t)
        logits.append(lg)
        gates.append(g)
    return logits, gates


def read_golden(path):
    """(tokens, logits [T][V], gates [T][L][S]) of a MOASGLD1 file."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"MOASGLD1":
        raise ValueError("%s: not a golden file" % path)
    T, V, L, S = struct.unpack_from("<4I", data, 8)
    pos = 24
    tokens = list(struct.unpack_from("<%di" % T, data, pos))
    pos += 4 * T
    flat = struct.unpack_from("<%df" % (T * V), data, pos)
    pos += 4 * T * V
    logits = [list(flat[t * V:(t + 1) * V]) for t in range(T)]
    flat = struct.unpack_from("<%df" % (T * L * S), data, pos)
    pos += 4 * T * L * S
    if pos != len(data):
        raise ValueError("%s: %d trailing bytes" % (path, len(data) - pos))
    gates = [[list(flat[(t * L + li) * S:(t * L + li + 1) * S]) for li in range(L)]
             for t in range(T)]
    return tokens, logits, gates


def max_diffs(path_gguf, path_golden, n_tokens=None, mode="mixture"):
    """(max |logit diff|, max |gate diff|) of the forward against a golden."""
    tokens, want_logits, want_gates = read_golden(path_golden)
    if n_tokens is not None:
        tokens = tokens[:n_tokens]
    logits, gates = forward(path_gguf, tokens, mode)
    dl = max(abs(a - b) for got, want in zip(logits, want_logits) for a, b in zip(got, want))
    dg = 0.0
    for got, want in zip(gates, want_gates):
        for gl, wl in zip(got, want):
            for a, b in zip(gl, wl):
                dg = max(dg, abs(a - b))
    return dl, dg


if __name__ == "__main__":
    args = sys.argv[1:]
    mode = "mixture"
    if len(args) == 4 and args[2] == "--mode" and args[3] in ("mixture", "routed"):
        mode = args[3]
        args = args[:2]
    if len(args) != 2:
        sys.stderr.write("usage: moas_forward.py MODEL.gguf FIXTURE.golden "
                         "[--mode mixture|routed]\n")
        sys.exit(2)
    try:
        dl, dg = max_diffs(args[0], args[1], mode=mode)
    except (OSError, ValueError, KeyError, struct.error, gguf.GGUFError) as e:   # one line
        sys.exit("moas_forward: %s" % e)
    print("max |logit diff| %.3g, max |gate diff| %.3g" % (dl, dg))
