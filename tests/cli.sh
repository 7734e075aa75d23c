#!/bin/sh
# cli.sh MOAS - the command-line program on a real tiny model: every command runs,
# generation is reproducible from a seed, outputs have the promised shape, and bad
# input is a clean error (exit status 1 and the library's message), never a crash.
set -eu
moas=${1:-bin/moas}
data=tests/data
model=$data/tiny-moas-bias.gguf
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "cli: FAIL: $*"; exit 1; }

# expect_error STATUS PATTERN CMD... : the command exits with STATUS and says PATTERN
expect_error() {
    want=$1; pattern=$2; shift 2
    set +e
    "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    set -e
    [ "$got" -eq "$want" ] || fail "'$*' exited $got, expected $want: $(cat "$tmp/err")"
    grep -q "$pattern" "$tmp/err" || fail "'$*' did not say '$pattern': $(cat "$tmp/err")"
}

"$moas" --version | grep -q '^moas [0-9]' || fail "--version"
"$moas" inspect -m "$model" >"$tmp/inspect"
grep -q '^layers  *2$' "$tmp/inspect" || fail "inspect: layers"
grep -q 'blk.1.attn_router_down.weight' "$tmp/inspect" || fail "inspect: tensor list"
grep -q 'tokenizer.ggml.tokens' "$tmp/inspect" || fail "inspect: metadata"

a=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 5 2>/dev/null)
b=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 5 -t 1 2>/dev/null)
c=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 6 2>/dev/null)
[ "$a" = "$b" ] || fail "the same seed gave different text"
[ "$a" != "$c" ] || fail "different seeds gave the same text"
case "$a" in "And God"*) ;; *) fail "generate did not echo the prompt" ;; esac
# generating past the context length slides the window instead of failing
"$moas" generate -m "$model" -p "A" -n 200 --temp 0 >/dev/null 2>&1 || fail "long generation"

"$moas" perplexity -m "$model" -f "$data/tiny.txt" --json >"$tmp/ppl.json"
python3 - "$tmp/ppl.json" <<'PY' || fail "perplexity --json"
import json, math, sys
r = json.load(open(sys.argv[1]))
assert r["mode"] == "mixture" and r["n_tokens"] > 100, r
assert abs(math.exp(r["nats_per_token"]) - r["perplexity"]) < 1e-3 * r["perplexity"], r
assert r["kv_bytes"] > 0, r
PY

# routed mode: the reported KV bytes are the formula applied to the reported counts
"$moas" perplexity -m "$model" -f "$data/tiny.txt" --mode routed --json >"$tmp/routed.json"
"$moas" perplexity -m "$model" -f "$data/tiny.txt" --mode routed --kv-type f16 --json >"$tmp/routed16.json"
python3 - "$tmp/routed.json" "$tmp/routed16.json" "$tmp/ppl.json" <<'PY' || fail "perplexity --mode routed --json"
import json, sys
mix = json.load(open(sys.argv[3]))
for path, elem in ((sys.argv[1], 4), (sys.argv[2], 2)):
    r = json.load(open(path))
    assert r["mode"] == "routed", r
    pairs, heads = r["kv_window_scheme_pairs"], r["scheme_kv_heads"]
    assert sum(pairs) == r["kv_window_tokens"] * r["n_layer"], r
    want = sum(p * h for p, h in zip(pairs, heads)) * r["head_dim"] * 2 * elem + 5 * sum(pairs)
    assert r["kv_bytes"] == want, (r["kv_bytes"], want)
    assert abs(sum(r["scheme_shares"]) - 1) < 1e-5, r
    assert r["kv_bytes_per_token"] < r["mha_kv_bytes_per_token"] + 5 * r["n_layer"], r
# mixture mode stores every scheme's heads: (6 + 2 + 1) / 6 of an MHA cache
assert abs(mix["kv_bytes_per_token"] * 6 - mix["mha_kv_bytes_per_token"] * 9) < 1e-6, mix
PY

"$moas" routes -m "$model" -f "$data/tiny.txt" --mode routed --json >"$tmp/routes.jsonl"
python3 - "$tmp/routes.jsonl" <<'PY' || fail "routes --json"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
assert len(rows) == 537 * 2, len(rows)
heads = {0: 6, 1: 2, 2: 1}
for r in rows:
    assert set(r) >= {"pos", "layer", "gates", "scheme", "kv_heads", "char"}, r
    assert r["kv_heads"] == heads[r["scheme"]], r
    assert abs(sum(r["gates"]) - 1) < 1e-4, r
assert rows[0]["char"] == "I" and rows[0]["pos"] == 0
PY
"$moas" routes -m "$model" -f "$data/tiny.txt" --no-color | grep -q '^layer 1  *MHA' || fail "routes map"
"$moas" generate -m "$model" -p "And" -n 10 --show-routes --no-color 2>/dev/null | grep -q '^text  *And' \
    || fail "generate --show-routes"

# logits: every position of the file's exact bytes, [n_tokens][n_vocab] float32
printf 'And God saw' >"$tmp/text"
"$moas" logits -m "$model" -f "$tmp/text" -o "$tmp/logits" 2>/dev/null
[ "$(wc -c <"$tmp/logits")" -eq $((11 * 47 * 4)) ] || fail "logits file size"

expect_error 1 "cannot open" "$moas" inspect -m "$tmp/missing.gguf"
printf 'GGUF\003\000\000\000' >"$tmp/short.gguf"
expect_error 1 "gguf" "$moas" inspect -m "$tmp/short.gguf"
head -c 3000 "$model" >"$tmp/cut.gguf"
# bench: the JSON has the promised fields, runs are clamped to the trained context,
# and a model path needing escapes still gives valid JSON
cp "$model" "$tmp/q\"uote.gguf"
"$moas" bench -m "$tmp/q\"uote.gguf" -p 8 -n 6 -d 4 -r 2 -t 1 --mode routed --json >"$tmp/bench.json"
"$moas" bench -m "$model" -p 100000 -n 100000 -r 1 -t 1 --json >"$tmp/bench2.json"
python3 - "$tmp/bench.json" "$tmp/bench2.json" <<'PY' || fail "bench --json"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["model"].endswith('q"uote.gguf'), r["model"]
assert (r["n_prompt"], r["n_decode"], r["depth"], r["repeats"], r["mode"]) == (8, 6, 4, 2, "routed"), r
assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["weight_bytes_per_token"] > 0, r
c = json.load(open(sys.argv[2]))
assert 0 < c["n_prompt"] <= 64 and c["depth"] == 0 and 0 < c["n_decode"] <= 64, c
PY
expect_error 1 "moas: error" "$moas" generate -m "$tmp/cut.gguf" -p "A"
# a whole file whose metadata disagrees with itself: the MQA model with its one scheme
# rewritten from 1 KV head to 4 (not a divisor of 6) is named as such, not as truncated
python3 - "$data/tiny-mqa-nobias.gguf" "$tmp/four.gguf" <<'PY'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
key = b"moas.attention.scheme_kv_heads"
at = b.index(key) + len(key)
assert struct.unpack_from("<IIQI", b, at) == (9, 4, 1, 1)    # array of one uint32: [1]
struct.pack_into("<I", b, at + 16, 4)
open(sys.argv[2], "wb").write(b)
PY
expect_error 1 "scheme 0 has 4 KV heads" "$moas" inspect -m "$tmp/four.gguf"
! grep -q "truncated" "$tmp/err" || fail "a whole file blamed on truncation: $(cat "$tmp/err")"
expect_error 1 "not in the vocabulary" "$moas" generate -m "$model" -p "And Q"
expect_error 1 "context" "$moas" generate -m "$model" -p "A" --ctx 100000
expect_error 2 "unknown option" "$moas" generate -m "$model" --bogus
echo "cli: ok"
