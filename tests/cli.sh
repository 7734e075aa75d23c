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
    grep -q -e "$pattern" "$tmp/err" || fail "'$*' did not say '$pattern': $(cat "$tmp/err")"
}

"$moas" --version | grep -q '^moas [0-9]' || fail "--version"
"$moas" inspect -m "$model" >"$tmp/inspect"
grep -q '^layers  *2$' "$tmp/inspect" || fail "inspect: layers"
grep -q 'blk.1.attn_router_down.weight' "$tmp/inspect" || fail "inspect: tensor list"
grep -q 'tokenizer.ggml.tokens' "$tmp/inspect" || fail "inspect: metadata"
# text of the model file is shown escaped, never raw: a name with an ESC sequence, a CR,
# a quote, a backslash and a C1 CSI (the same 14 bytes as "tiny-moas-bias")
python3 - "$model" "$tmp/esc.gguf" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
at = data.index(b"tiny-moas-bias", data.index(b"general.name"))
data[at:at + 14] = b'\x1b[31mX\rY"\\\xc2\x9bZW'
open(sys.argv[2], "wb").write(data)
PY
"$moas" inspect -m "$tmp/esc.gguf" >"$tmp/esc.out" || fail "inspect: a name with escapes"
grep -q 'general.name  *"\\u001b\[31mX\\u000dY\\"\\\\\\u009bZW"$' "$tmp/esc.out" &&
    ! grep -q "$(printf '[\033\r]')" "$tmp/esc.out" || fail "inspect: the file's text raw: $(grep general.name "$tmp/esc.out")"
# an error quoting the file's text does not pass its control characters to the
# terminal: an architecture of ESC [ 2 J (clear the screen), 4 bytes as "moas"
python3 - "$model" "$tmp/arch.gguf" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
at = data.index(b"\x04" + b"\x00" * 7 + b"moas", data.index(b"general.architecture")) + 8
data[at:at + 4] = b"\x1b[2J"
open(sys.argv[2], "wb").write(data)
PY
expect_error 1 "architecture '\\\\u001b\[2J' is not supported" "$moas" inspect -m "$tmp/arch.gguf"
! grep -q "$(printf '\033')" "$tmp/err" || fail "an error wrote the file's ESC to the terminal"
# inspect's KV bytes per token are the cache's own: a pooled model's mixture cache holds
# one gate-mixed K/V of all 6 heads (2 layers x 6 heads x 8 x 2 x 4 bytes = 768), as
# perplexity measures it, not every scheme's 9 heads
"$moas" inspect -m "$data/tiny-pooled-bias.gguf" >"$tmp/inspect-pooled"
grep -q '^mixture mode stores .*: 768 / 384 bytes per token$' "$tmp/inspect-pooled" \
    || fail "inspect: pooled mixture KV bytes: $(grep '^mixture' "$tmp/inspect-pooled")"
grep -q '^mixture mode stores every scheme: 1152 / 576 bytes per token$' "$tmp/inspect" \
    || fail "inspect: mixture KV bytes"
"$moas" perplexity -m "$data/tiny-pooled-bias.gguf" -f "$data/tiny.txt" --json >"$tmp/ppl-pooled.json"
python3 - "$tmp/ppl-pooled.json" <<'PY' || fail "pooled perplexity KV bytes per token"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["kv_bytes"] == 768 * r["kv_window_tokens"], r
PY

a=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 5 2>/dev/null)
b=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 5 -t 1 2>/dev/null)
c=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 6 2>/dev/null)
[ "$a" = "$b" ] || fail "the same seed gave different text"
[ "$a" != "$c" ] || fail "different seeds gave the same text"
# llama.cpp's spellings: -s, --predict, --ctx-size (and perplexity's --ppl-stride below)
d=$("$moas" generate -m "$model" -p "And God" --predict 40 -s 5 --ctx-size 64 2>/dev/null)
[ "$a" = "$d" ] || fail "-s, --predict and --ctx-size are not --seed, -n and --ctx"
# any 64-bit seed, as the sampler takes (it stopped at 2^63 - 1); an empty stop string
# would stop nothing
"$moas" generate -m "$model" -p "And" -n 4 --seed 18446744073709551615 >/dev/null 2>&1 ||
    fail "the largest seed"
expect_error 1 "must be an integer in \[0, 18446744073709551615\]" "$moas" generate -m "$model" -p "And" --seed -1
expect_error 1 "at least one character" "$moas" generate -m "$model" -p "And" --stop ""
case "$a" in "And God"*) ;; *) fail "generate did not echo the prompt" ;; esac
# --no-mmap reads the file into memory: the same model, the same numbers
e=$("$moas" generate -m "$model" -p "And God" -n 40 --seed 5 --no-mmap 2>/dev/null)
[ "$a" = "$e" ] || fail "--no-mmap changed the text"
"$moas" perplexity -m "$model" -f "$data/tiny.txt" --json >"$tmp/ppl-map.json"
"$moas" perplexity -m "$model" -f "$data/tiny.txt" --json --no-mmap >"$tmp/ppl-read.json"
python3 - "$tmp/ppl-map.json" "$tmp/ppl-read.json" <<'PY' || fail "--no-mmap changed perplexity"
import json, sys
a, b = (json.load(open(f)) for f in sys.argv[1:])
for r in (a, b):
    del r["tokens_per_second"]
assert a == b, (a, b)
PY
expect_error 1 "cannot open" "$moas" bench -m "$tmp/missing.gguf" --no-mmap
expect_error 2 "inspect does not take --no-mmap" "$moas" inspect -m "$model" --no-mmap
# generating past the context length slides the window instead of failing, and says so
"$moas" generate -m "$model" -p "A" -n 200 --temp 0 >"$tmp/long.out" 2>"$tmp/long.err" \
    || fail "long generation"
[ "$(head -n 1 "$tmp/long.out" | wc -m)" -ge 1 ] || fail "long generation: no text"
grep -q "the context (64 tokens) is full" "$tmp/long.err" || fail "long generation: no note"
grep -q "^moas:  *eval time = .* / *199 tokens (.* ms per token, .* tokens per second)$" \
    "$tmp/long.err" || fail "long generation: eval time: $(cat "$tmp/long.err")"
grep -q "^moas: mode mixture, .*, the window slid [0-9]* times$" "$tmp/long.err" \
    || fail "long generation: stats line: $(cat "$tmp/long.err")"
# Ctrl-C: the text so far, a newline, the timings, "interrupted", status 130 (llama.cpp's)
# (the text showing means the handler is in place: a background job of a script starts
# with SIGINT ignored, so a signal sent before then would be lost)
: >"$tmp/int.out"
"$moas" generate -m "$model" -p "And" -n 100000000 --temp 1 >"$tmp/int.out" 2>"$tmp/int.err" &
pid=$!
i=0
while [ "$(wc -c <"$tmp/int.out")" -lt 200 ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i + 1)); done
kill -INT $pid
( sleep 10; kill -KILL $pid 2>/dev/null ) &   # should it not stop: a failure, not a hang
killer=$!
set +e
wait $pid
st=$?
kill $killer 2>/dev/null
set -e
[ "$st" -eq 130 ] || fail "Ctrl-C: exit status $st, expected 130: $(cat "$tmp/int.err")"
grep -q ", interrupted (Ctrl-C)$" "$tmp/int.err" || fail "Ctrl-C: not said: $(cat "$tmp/int.err")"
grep -q "eval time" "$tmp/int.err" || fail "Ctrl-C: no timings"
[ "$(tail -c 1 "$tmp/int.out" | od -An -c | tr -d ' ')" = '\n' ] || fail "Ctrl-C: the text not ended"
case "$(head -c 3 "$tmp/int.out")" in And) ;; *) fail "Ctrl-C: the prompt not shown" ;; esac
# a prompt longer than the context: its end is decoded, and stderr says what was left out
"$moas" generate -m "$model" -p "$(head -c 100 "$data/tiny.txt")" -n 1 >/dev/null 2>"$tmp/cut.err"
grep -q "the prompt has 100 characters, more than the context's 64: only its last 64 are decoded" \
    "$tmp/cut.err" || fail "long prompt: $(cat "$tmp/cut.err")"

# sampling: a stop string ends the text just before it; biases by id or character
full=$("$moas" generate -m "$model" -p "And God" -n 60 --seed 5 2>/dev/null)
stop=$(printf '%s' "$full" | python3 -c 'import sys; t = sys.stdin.read(); print(t[12:14], end="")')
want=$(printf '%s' "$full" | python3 -c 'import sys; t = sys.stdin.read(); s = sys.argv[1]; print(t[:t.index(s, 7)], end="")' "$stop")
got=$("$moas" generate -m "$model" -p "And God" -n 60 --seed 5 --stop "$stop" --stop "never here" \
    2>"$tmp/stop.err")
[ "$got" = "$want" ] || fail "--stop '$stop': got '$got', want '$want'"
grep -q "ended by a stop string" "$tmp/stop.err" || fail "--stop: stats line"
[ "$("$moas" generate -m "$model" -p "And God" -n 5 --temp 0 --logit-bias A=100 2>/dev/null)" = \
  "And GodAAAAA" ] || fail "--logit-bias A=100"
[ "$("$moas" generate -m "$model" -p "And God" -n 5 --temp 0 --logit-bias 11=100 2>/dev/null)" = \
  "And GodAAAAA" ] || fail "--logit-bias 11=100 (the id of A)"
# a digit the vocabulary holds ("5", id 7) is not silently token id 5 ("."): refused,
# with the two spellings that are not ambiguous
expect_error 1 "'5' is both token id 5 and the character '5' (id 7): write 05 for the id or 7" \
    "$moas" generate -m "$model" -p "And" -n 3 --temp 0 --logit-bias 5=100
[ "$("$moas" generate -m "$model" -p "And" -n 3 --temp 0 --logit-bias 05=100 2>/dev/null)" = "And..." ] &&
[ "$("$moas" generate -m "$model" -p "And" -n 3 --temp 0 --logit-bias 7=100 2>/dev/null)" = "And555" ] ||
    fail "--logit-bias 05 and 7"
# a ban: greedy never picks the banned token, which greedy picks otherwise
first_new() { python3 -c 'import sys; print(sys.stdin.read()[7], end="")'; }
g=$("$moas" generate -m "$model" -p "And God" -n 1 --temp 0 2>/dev/null | first_new)
b=$("$moas" generate -m "$model" -p "And God" -n 1 --temp 0 --logit-bias "$g=-inf" 2>/dev/null | first_new)
[ -n "$g" ] && [ "$g" != "$b" ] || fail "--logit-bias '$g=-inf' did not ban it"
"$moas" generate -m "$model" -p "And God" -n 40 --seed 5 --min-p 0.05 --repeat-penalty 1.3 \
    --repeat-last-n 16 >/dev/null 2>&1 || fail "--min-p --repeat-penalty --repeat-last-n"
# OpenAI's penalties over the last 64 tokens, the prompt's "A" included: with A's logit
# raised by 100, a frequency penalty of 60 lets one more A through (100 - 2 * 60 < 0), a
# presence penalty of 60 every one (100 - 60 > 0), one of 200 none
pen() { "$moas" generate -m "$model" -p "And God" -n 5 --temp 0 --logit-bias 11=100 "$@" 2>/dev/null |
        python3 -c 'import sys; t = sys.stdin.read()[7:12]; print(t[0] == "A", t.count("A"))'; }
[ "$(pen --frequency-penalty 60)" = "True 1" ] || fail "--frequency-penalty: $(pen --frequency-penalty 60)"
[ "$(pen --presence-penalty 60)" = "True 5" ] || fail "--presence-penalty 60: $(pen --presence-penalty 60)"
[ "$(pen --presence-penalty 200)" = "False 0" ] || fail "--presence-penalty 200: $(pen --presence-penalty 200)"
# a stop string the model cannot write is an error, not ignored: '\n' without the
# shell's $'...' is a backslash (not in the vocabulary) and an n
expect_error 1 "stop '\\\\n' can never be generated: tokenize: character '\\\\' (U+005C) at byte offset 0" \
    "$moas" generate -m "$model" -p "And" -n 3 --stop '\n'
expect_error 1 "must be a finite number" "$moas" generate -m "$model" -p "A" --frequency-penalty inf
expect_error 1 "min_p 2 outside" "$moas" generate -m "$model" -p "A" --min-p 2
expect_error 1 "repeat_penalty 0 is not" "$moas" generate -m "$model" -p "A" --repeat-penalty 0
expect_error 1 "neither a token id nor one character" "$moas" generate -m "$model" -p "A" --logit-bias ab=1
expect_error 1 "token id must be an integer in \[0, 46\]" "$moas" generate -m "$model" -p "A" --logit-bias 47=1

# --prompt-cache: the text is that of a run without it, whether the cache holds the
# whole prompt, the start of it or more than it; only the tokens not in it are decoded
pc=$tmp/prompt.cache
gen_pc() { "$moas" generate -m "$model" -n 30 --seed 3 --mode routed "$@"; }
for p in "And God said" "And God said, Let there be" "And God"; do
    want=$(gen_pc -p "$p" 2>/dev/null)
    got=$(gen_pc -p "$p" --prompt-cache "$pc" 2>"$tmp/pc.err")
    [ "$want" = "$got" ] || fail "--prompt-cache '$p': '$got', without it '$want'"
    case $p in
    "And God said") n=12; grep -q "does not exist yet" "$tmp/pc.err" || fail "new cache: $(cat "$tmp/pc.err")" ;;
    *there*) n=14; grep -q "12 of the prompt's 26 tokens reused, 14 decoded" "$tmp/pc.err" ||
        fail "longer prompt: $(cat "$tmp/pc.err")" ;;
    *) n=1; grep -q "6 of the prompt's 7 tokens reused, 1 decoded" "$tmp/pc.err" ||
        fail "shorter prompt: $(cat "$tmp/pc.err")" ;;
    esac
    grep -q "prompt eval time = .* / *$n tokens" "$tmp/pc.err" || fail "prompt eval of '$p' is not $n tokens: $(cat "$tmp/pc.err")"
    grep -q "tokens saved" "$tmp/pc.err" || fail "the cache of '$p' was not written"
done
# the whole prompt found: nothing decoded, nothing written, the same text
cp "$pc" "$tmp/pc.before"
[ "$(gen_pc -p "And God" --prompt-cache "$pc" 2>"$tmp/pc.err")" = "$want" ] || fail "--prompt-cache, all found"
grep -q "the prompt's 7 tokens are all there, none decoded" "$tmp/pc.err" || fail "all found: $(cat "$tmp/pc.err")"
grep -q "prompt eval time = .* / *0 tokens" "$tmp/pc.err" || fail "all found: tokens decoded"
cmp -s "$pc" "$tmp/pc.before" || fail "a cache holding the whole prompt was written again"
# --prompt-cache-ro reads and never writes
gen_pc -p "And God said" --prompt-cache "$pc" --prompt-cache-ro >/dev/null 2>"$tmp/pc.err"
grep -q "7 of the prompt's 12 tokens reused, 5 decoded" "$tmp/pc.err" || fail "-ro: $(cat "$tmp/pc.err")"
cmp -s "$pc" "$tmp/pc.before" || fail "--prompt-cache-ro wrote the cache"
# a cache of another mode, KV type or forced scheme, or a cut one, is not used (and is
# written anew); the text is still right
for opt in "--mode mixture" "--kv-type f16" "--force-scheme 0"; do
    # shellcheck disable=SC2086
    want=$("$moas" generate -m "$model" -n 30 --seed 3 --mode routed -p "And God" $opt 2>/dev/null)
    cp "$tmp/pc.before" "$pc"
    # shellcheck disable=SC2086
    got=$("$moas" generate -m "$model" -n 30 --seed 3 --mode routed -p "And God" $opt --prompt-cache "$pc" 2>"$tmp/pc.err")
    [ "$want" = "$got" ] || fail "a cache made without $opt changed the text"
    grep -q "not used: .*written anew" "$tmp/pc.err" || fail "$opt: $(cat "$tmp/pc.err")"
done
# edit_pc OFFSET FORMAT VALUE [SUM]: the cache pc.before with struct.pack's VALUE at
# OFFSET (negative: from the end), into $pc; its checksum (FNV-1a, 64-bit, of the
# bytes before it) made right again when SUM is 1
edit_pc() {
    python3 - "$tmp/pc.before" "$pc" "$@" <<'PY'
import struct, sys
data = bytearray(open(sys.argv[1], "rb").read())
at = int(sys.argv[3])
struct.pack_into(sys.argv[4], data, at if at >= 0 else len(data) + at, int(sys.argv[5]))
if sys.argv[6:] == ["1"]:
    h = 0xcbf29ce484222325
    for b in data[:-8]:
        h = ((h ^ b) * 0x100000001b3) & (2 ** 64 - 1)
    struct.pack_into("<Q", data, len(data) - 8, h)
open(sys.argv[2], "wb").write(data)
PY
}
# a forced scheme below -1 is no run's: said as such ("made without --force-scheme, this
# run is without it" contradicted itself)
edit_pc 12 "<i" -2 1
gen_pc -p "And God" --prompt-cache "$pc" >/dev/null 2>"$tmp/pc.err"
grep -q "not used: its forced scheme -2 is not a scheme" "$tmp/pc.err" ||
    fail "forced scheme -2: $(cat "$tmp/pc.err")"
# a damaged byte of the state (here the last of the last V row) is found by the
# checksum: the cache is not used (it loaded, and its keys and values changed the text)
want=$(gen_pc -p "And God said" 2>/dev/null)
edit_pc -9 "<B" 255
got=$(gen_pc -p "And God said" --prompt-cache "$pc" --prompt-cache-ro 2>"$tmp/pc.err" || true)
grep -q "not used: it is damaged (its checksum does not match its bytes)" "$tmp/pc.err" &&
    [ "$got" = "$want" ] || fail "a damaged cache: '$got', without it '$want': $(cat "$tmp/pc.err")"
head -c 100 "$tmp/pc.before" >"$pc"
gen_pc -p "And God" --prompt-cache "$pc" >/dev/null 2>"$tmp/pc.err"
grep -q "not used: it is truncated" "$tmp/pc.err" || fail "cut cache: $(cat "$tmp/pc.err")"
# a file that is no prompt cache is neither read nor written over; an empty one is new
echo "my notes" >"$tmp/notes.txt"
expect_error 1 "is not a moas prompt cache" gen_pc -p "And God" --prompt-cache "$tmp/notes.txt"
[ "$(cat "$tmp/notes.txt")" = "my notes" ] || fail "--prompt-cache wrote over a file of notes"
: >"$pc"
gen_pc -p "And God" --prompt-cache "$pc" >/dev/null 2>"$tmp/pc.err"
grep -q "is empty" "$tmp/pc.err" && [ -s "$pc" ] || fail "empty cache: $(cat "$tmp/pc.err")"
expect_error 2 "needs --prompt-cache FILE" "$moas" generate -m "$model" -p "A" --prompt-cache-ro
expect_error 2 "give one of them" "$moas" generate -m "$model" -p "A" --prompt-cache "$pc" \
    --prompt-cache-ro --prompt-cache-all
# --prompt-cache-all keeps the generated text too: a prompt that continues the output
# reuses all of it but its last character (never decoded), and its text is unchanged
rm -f "$pc"
out=$(gen_pc -p "And God" --prompt-cache "$pc" --prompt-cache-all 2>"$tmp/pc.err")
grep -q "36 tokens saved" "$tmp/pc.err" || fail "--prompt-cache-all: $(cat "$tmp/pc.err")"
want=$("$moas" generate -m "$model" -n 30 --seed 9 --mode routed -p "$out" 2>/dev/null)
got=$("$moas" generate -m "$model" -n 30 --seed 9 --mode routed -p "$out" --prompt-cache "$pc" 2>"$tmp/pc.err")
[ "$want" = "$got" ] || fail "--prompt-cache-all: the next turn's text changed"
grep -q "36 of the prompt's 37 tokens reused, 1 decoded" "$tmp/pc.err" || fail "next turn: $(cat "$tmp/pc.err")"
# a window that slid is not saved (its keys are not those of a fresh read)
gen_pc -p "And God" -n 100 --prompt-cache "$tmp/slid.pc" --prompt-cache-all >/dev/null 2>"$tmp/pc.err"
grep -q "not written: the window slid" "$tmp/pc.err" && [ ! -e "$tmp/slid.pc" ] ||
    fail "--prompt-cache-all after a slide: $(cat "$tmp/pc.err")"
# the cache is made as any file the run writes (umask), and keeps the permissions of
# the one it replaces (not the temporary file's 0600)
rm -f "$pc"
(umask 022 && gen_pc -p "And God" --prompt-cache "$pc" >/dev/null 2>&1)
[ "$(ls -l "$pc" | cut -c1-10)" = "-rw-r--r--" ] || fail "a new cache is $(ls -l "$pc")"
chmod 640 "$pc"
gen_pc -p "And God said" --prompt-cache "$pc" >/dev/null 2>&1
[ "$(ls -l "$pc" | cut -c1-10)" = "-rw-r-----" ] || fail "a rewritten cache is $(ls -l "$pc")"
# a cache named "-" is that file, not stdin (the magic was checked in the file, the rest
# was read from stdin)
gen_pc -p "And God" --prompt-cache "$pc" >/dev/null 2>&1
cp "$pc" "$tmp/-"
case $moas in /*) moas_path=$moas ;; *) moas_path=$PWD/$moas ;; esac
model_path=$PWD/$model
(cd "$tmp" && "$moas_path" generate -m "$model_path" -n 30 --seed 3 --mode routed \
    -p "And God said" --prompt-cache - </dev/null >/dev/null 2>"$tmp/pc.err")
grep -q "7 of the prompt's 12 tokens reused" "$tmp/pc.err" || fail "a cache named -: $(cat "$tmp/pc.err")"
# a cache behind a symbolic link is updated where it is, the link kept (relative links
# too, and one to a cache not made yet)
mkdir "$tmp/pc.elsewhere"
gen_pc -p "And God" --prompt-cache "$tmp/pc.elsewhere/real" >/dev/null 2>&1
ln -s pc.elsewhere/real "$tmp/pc.link"
ln -s "$tmp/pc.elsewhere/later" "$tmp/pc.dangling"
cp "$tmp/pc.elsewhere/real" "$tmp/pc.before"
gen_pc -p "And God said" --prompt-cache "$tmp/pc.link" >/dev/null 2>"$tmp/pc.err"
grep -q "7 of the prompt's 12 tokens reused" "$tmp/pc.err" || fail "cache behind a link: $(cat "$tmp/pc.err")"
[ -L "$tmp/pc.link" ] || fail "--prompt-cache replaced a symbolic link with a file"
cmp -s "$tmp/pc.elsewhere/real" "$tmp/pc.before" && fail "the cache behind a link was not updated"
gen_pc -p "And God" --prompt-cache "$tmp/pc.dangling" >/dev/null 2>&1
[ -L "$tmp/pc.dangling" ] && [ -s "$tmp/pc.elsewhere/later" ] || fail "a link to a cache not made yet"
# what is not a file is not a cache: a directory (it read as empty), a FIFO (its open
# would wait for a writer) or a device (/dev/null read as empty, then renamed over)
mkdir "$tmp/pc.dir"
expect_error 1 "it is a directory, not a file" gen_pc -p "And God" --prompt-cache "$tmp/pc.dir"
[ -d "$tmp/pc.dir" ] || fail "--prompt-cache replaced a directory"
if mkfifo "$tmp/pc.fifo" 2>/dev/null; then
    expect_error 1 "it is a FIFO, not a file" gen_pc -p "And God" --prompt-cache "$tmp/pc.fifo"
fi
if mknod "$tmp/pc.null" c 1 3 2>/dev/null; then   # as root only
    expect_error 1 "it is a device or a socket, not a file" gen_pc -p "And God" --prompt-cache "$tmp/pc.null"
    [ -c "$tmp/pc.null" ] || fail "--prompt-cache replaced a device with a file"
fi

"$moas" perplexity -m "$model" -f "$data/tiny.txt" --json >"$tmp/ppl.json" 2>"$tmp/ppl.err"
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

# --stride: a stride of the whole context is the consecutive windows, in other
# calls, with the same numbers; a shorter one scores every token after the first,
# on a RoPE model too
"$moas" perplexity -m "$model" -f "$data/tiny.txt" --stride 64 --json >"$tmp/s64.json"
"$moas" perplexity -m "$model" -f "$data/tiny.txt" --ppl-stride 64 --json >"$tmp/p64.json"
[ "$(sed 's/"tokens_per_second": [0-9.]*, //' "$tmp/s64.json")" = \
  "$(sed 's/"tokens_per_second": [0-9.]*, //' "$tmp/p64.json")" ] || fail "--ppl-stride is not --stride"
rope=$data/tiny-modern-pooled-nobias.gguf
"$moas" perplexity -m "$rope" -f "$data/tiny.txt" --mode routed --stride 16 --json >"$tmp/s16.json"
python3 - "$tmp/ppl.json" "$tmp/s64.json" "$tmp/s16.json" <<'PY' || fail "perplexity --stride"
import json, sys
base, s64, s16 = (json.load(open(p)) for p in sys.argv[1:])
assert s64["stride"] == 64 and base["stride"] == 0, (base, s64)
assert (s64["n_scored"], s64["nats_per_token"]) == (base["n_scored"], base["nats_per_token"])
assert s16["n_scored"] == s16["n_tokens"] - 1 > base["n_scored"], s16
PY
expect_error 1 "longer than the context" "$moas" perplexity -m "$model" -f "$data/tiny.txt" --stride 65

# --force-scheme: routed mode with every token on one scheme (here MQA)
"$moas" perplexity -m "$rope" -f "$data/tiny.txt" --mode routed --force-scheme 2 --json >"$tmp/f2.json"
python3 - "$tmp/f2.json" <<'PY' || fail "perplexity --force-scheme"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["forced_scheme"] == 2 and r["scheme_shares"] == [0, 0, 1], r
PY
expect_error 1 "needs routed mode" "$moas" perplexity -m "$model" -f "$data/tiny.txt" --force-scheme 0

"$moas" routes -m "$model" -f "$data/tiny.txt" --mode routed --json >"$tmp/routes.jsonl" 2>/dev/null
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
assert all(r["window"] == r["pos"] // 64 and r["window_pos"] == r["pos"] % 64 for r in rows)
PY
"$moas" routes -m "$model" -f "$data/tiny.txt" --no-color >"$tmp/map" 2>"$tmp/map.err"
grep -q '^layer 1  *MHA' "$tmp/map" || fail "routes map"
# 537 characters in windows of 64: each map says which window it is
[ "$(grep -c '^window [1-9] of 9: characters [0-9]*-[0-9]* of the text, from an empty cache$' \
    "$tmp/map")" -eq 9 ] || fail "routes: window labels"
grep -q '^window 9 of 9: characters 512-536 ' "$tmp/map" || fail "routes: last window"
grep -q "routed in 9 windows of up to 64" "$tmp/map.err" || fail "routes: stderr note"
"$moas" generate -m "$model" -p "And" -n 10 --show-routes --no-color 2>/dev/null | grep -q '^text  *And' \
    || fail "generate --show-routes"
# the route map shows every generated token, the last one too (decoded for the map)
"$moas" generate -m "$model" -p "And God" -n 5 --temp 0 --show-routes --no-color \
    >"$tmp/routes-map" 2>/dev/null || fail "generate --show-routes -n 5"
[ "$(sed -n 's/^text  *//p' "$tmp/routes-map" | head -n 1)" = "$(head -n 1 "$tmp/routes-map")" ] \
    || fail "generate --show-routes: the map's text is not the generated text: $(cat "$tmp/routes-map")"

# a control character of the vocabulary is one visible cell, as the layers' digits are
# (a raw tab or CR in the text's row moved the cursor): the tiny model with "(" and ")"
# made a tab and a CR, strings of one byte as before, so the file is otherwise the same
python3 - "$model" "$tmp/ctl.gguf" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8 + 8
for old, new in ((b"(", b"\t"), (b")", b"\r")):
    entry = data.index(b"\x01" + b"\x00" * 7 + old, at)
    data[entry + 8:entry + 9] = new
open(sys.argv[2], "wb").write(data)
PY
printf 'A\tD\rG' >"$tmp/ctl.txt"
"$moas" routes -m "$tmp/ctl.gguf" -f "$tmp/ctl.txt" --no-color >"$tmp/ctl.map" 2>/dev/null ||
    fail "routes on a vocabulary with a tab and a CR"
grep -q "$(printf '^text     A\342\220\211D\342\220\215G$')" "$tmp/ctl.map" &&
    ! grep -q "$(printf '[\t\r]')" "$tmp/ctl.map" || fail "routes: control characters raw in the map"

# a vocabulary may hold the NUL character (its C string is empty): generated, it is a
# byte of the text, and routes' JSON names it; it vanished from both
python3 - "$model" "$tmp/nul.gguf" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8 + 8
entry = data.index(b"\x01" + b"\x00" * 7 + b"(", at)
data[entry + 8:entry + 9] = b"\x00"
open(sys.argv[2], "wb").write(data)
PY
"$moas" generate -m "$tmp/nul.gguf" -p "And" -n 3 --temp 0 --logit-bias 2=100 2>/dev/null |
    od -An -c | tr -s ' \n' ' ' | grep -q '^ A n d \\0 \\0 \\0 \\n $' || fail "generate: the NUL character lost"
printf 'A\0D' >"$tmp/nul.txt"
"$moas" routes -m "$tmp/nul.gguf" -f "$tmp/nul.txt" --json 2>/dev/null | python3 -c '
import json, sys
assert [json.loads(line)["char"] for line in sys.stdin][::2] == ["A", "\0", "D"]' ||
    fail "routes --json: the NUL character lost"

# logits: every position of the file's exact bytes, [n_tokens][n_vocab] float32
printf 'And God saw' >"$tmp/text"
"$moas" logits -m "$model" -f "$tmp/text" -o "$tmp/logits" 2>/dev/null
[ "$(wc -c <"$tmp/logits")" -eq $((11 * 47 * 4)) ] || fail "logits file size"
"$moas" logits -m "$model" -f "$data/tiny.txt" -o "$tmp/logits2" 2>"$tmp/logits2.err"
grep -q "the text has 537 characters, more than the context's 64: its logits come from windows of 64" \
    "$tmp/logits2.err" || fail "logits: windows not said"

expect_error 1 "cannot open" "$moas" inspect -m "$tmp/missing.gguf"
printf 'GGUF\003\000\000\000' >"$tmp/short.gguf"
expect_error 1 "gguf" "$moas" inspect -m "$tmp/short.gguf"
head -c 3000 "$model" >"$tmp/cut.gguf"
# bench: the JSON has the promised fields, runs are clamped to the trained context,
# and a model path needing escapes still gives valid JSON
cp "$model" "$tmp/q\"uote.gguf"
"$moas" bench -m "$tmp/q\"uote.gguf" --n-prompt 8 -n 6 -d 4 -r 2 -t 1 --mode routed --json >"$tmp/bench.json"
"$moas" bench -m "$model" --n-prompt 100000 -n 100000 -r 1 -t 1 --json >"$tmp/bench2.json" 2>"$tmp/bench2.err"
grep -q "^moas: bench: --n-prompt 100000 is more than the trained context: the prefill measures 64 tokens$" \
    "$tmp/bench2.err" || fail "bench: --n-prompt clamp not said: $(cat "$tmp/bench2.err")"
# not given, the prompt length is 512 or the trained context if shorter, without a word
"$moas" bench -m "$model" -n 4 -r 1 -t 1 --json >"$tmp/bench4.json" 2>"$tmp/bench4.err"
grep -q '"n_prompt": 64,' "$tmp/bench4.json" || fail "bench default prompt: $(cat "$tmp/bench4.json")"
[ ! -s "$tmp/bench4.err" ] || fail "bench default prompt warned: $(cat "$tmp/bench4.err")"
grep -q "^moas: bench: -n 100000 does not fit after 0 cached tokens .*: decode measures 64 tokens$" \
    "$tmp/bench2.err" || fail "bench: -n clamp not said"
# the default thread count is reported as the number used: the CPUs the process may
# run on (one, under taskset; OpenMP's variables count for nothing)
first_cpu=$(taskset -pc $$ 2>/dev/null | sed 's/.*: *//; s/[-,].*//')
if [ -n "$first_cpu" ]; then
    pin="taskset -c $first_cpu"; want_threads=1
else   # no taskset, or it cannot read this shell's mask
    pin=; want_threads=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
fi
OMP_NUM_THREADS=3 $pin "$moas" bench -m "$model" --n-prompt 8 -n 4 -d 200 -r 1 --json \
    >"$tmp/bench3.json" 2>"$tmp/bench3.err"
grep -q "^moas: bench: -d 200 leaves no room .*: decoding starts after 63 cached tokens$" \
    "$tmp/bench3.err" || fail "bench: -d clamp not said"
"$moas" bench -m "$model" --n-prompt 8 -n 4 -r 1 -t 1 | grep -q '^model .*(mixture mode, .* kernels, 1 thread, as asked)$' \
    || fail "bench: thread count"
python3 - "$tmp/bench.json" "$tmp/bench2.json" "$tmp/bench3.json" "$want_threads" <<'PY' || fail "bench --json"
import json, sys
r = json.load(open(sys.argv[1]))
assert r["model"].endswith('q"uote.gguf'), r["model"]
assert (r["n_prompt"], r["n_decode"], r["depth"], r["repeats"], r["mode"]) == (8, 6, 4, 2, "routed"), r
assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["weight_bytes_per_token"] > 0, r
c = json.load(open(sys.argv[2]))
assert 0 < c["n_prompt"] <= 64 and c["depth"] == 0 and 0 < c["n_decode"] <= 64, c
assert r["threads"] == 1 and c["threads"] == 1, (r, c)
assert r["mmap"] is True and c["mmap"] is True, (r, c)
d = json.load(open(sys.argv[3]))
assert (d["depth"], d["n_decode"], d["threads"]) == (63, 1, int(sys.argv[4])), d
PY
"$moas" bench -m "$model" --n-prompt 8 -n 4 -r 1 -t 1 --no-mmap --json | grep -q '"mmap": false,' ||
    fail "bench --no-mmap: not said in --json"
"$moas" bench -m "$model" --n-prompt 8 -n 4 -r 1 -t 1 --no-mmap | grep -q '^model .*, 1 thread, as asked; read into memory)$' ||
    fail "bench --no-mmap: not said"
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

# characters outside the vocabulary: an error by default, naming the way on; dropped or
# replaced on request, counted on stderr; perplexity says how many characters it scored
printf 'And God said 7\r\nLet there' >"$tmp/crlf.txt"
expect_error 1 "'7' (U+0037) at byte offset 13 is not in the vocabulary.*--unknown drop" \
    "$moas" perplexity -m "$model" -f "$tmp/crlf.txt"
"$moas" perplexity -m "$model" -f "$tmp/crlf.txt" --unknown drop --json >"$tmp/drop.json" \
    2>"$tmp/drop.err"
grep -q '^moas: dropped 2 characters outside the vocabulary$' "$tmp/drop.err" || fail "drop: stderr"
"$moas" perplexity -m "$model" -f "$tmp/crlf.txt" --unknown "replace: " --json >"$tmp/repl.json" \
    2>"$tmp/repl.err"
grep -q "^moas: replaced 2 characters outside the vocabulary with ' '$" "$tmp/repl.err" \
    || fail "replace: stderr"
python3 - "$tmp/drop.json" "$tmp/repl.json" <<'PY' || fail "perplexity --unknown"
import json, sys
d, r = (json.load(open(p)) for p in sys.argv[1:3])
assert (d["n_chars"], d["n_unknown"], d["unknown"], d["n_tokens"], d["n_scored"]) == (25, 2, "drop", 23, 22), d
assert (r["n_chars"], r["n_unknown"], r["unknown"], r["n_tokens"], r["n_scored"]) == (25, 2, "replace", 25, 24), r
PY
"$moas" perplexity -m "$model" -f "$tmp/crlf.txt" --unknown drop 2>/dev/null | grep -q \
    '^characters  *25 in the text, 2 outside the vocabulary dropped$' || fail "perplexity: characters"
expect_error 1 "replacement must be in the vocabulary" \
    "$moas" generate -m "$model" -p "And Q" --unknown replace:Q
expect_error 1 "--unknown must be error, drop, replace or replace:C" "$moas" generate -m "$model" -p "And Q" --unknown maybe
# invalid UTF-8 is said to be that, whatever the rule
printf 'And\377' >"$tmp/bad-utf8.txt"
expect_error 1 "invalid UTF-8 at byte offset 3 (byte 0xff) (text is not valid UTF-8)" \
    "$moas" perplexity -m "$model" -f "$tmp/bad-utf8.txt" --unknown drop
! grep -q "outside the vocabulary" "$tmp/err" || fail "invalid UTF-8 called outside the vocabulary"
expect_error 2 "unknown option" "$moas" generate -m "$model" --bogus
# logits that are not finite (the tiny model with a NaN in the embedding of "A", id 11)
# are an error, in text and JSON: it printed nan ("nan" is no JSON number) and exited 0
python3 - "$model" "$tmp/nan.gguf" <<'PY'
import struct, sys
sys.path.insert(0, "tools")
import gguf
t = gguf.GGUFReader(sys.argv[1]).tensors["token_embd.weight"]
data = bytearray(open(sys.argv[1], "rb").read())
struct.pack_into("<f", data, t.offset + 11 * t.ne[0] * 4, float("nan"))
open(sys.argv[2], "wb").write(data)
PY
printf 'And God' >"$tmp/ag.txt"
for how in "" --json "--stride 4"; do
    # shellcheck disable=SC2086
    expect_error 1 "the logits scoring token 1 of the text are not finite" \
        "$moas" perplexity -m "$tmp/nan.gguf" -f "$tmp/ag.txt" $how
    [ ! -s "$tmp/out" ] || fail "perplexity $how printed a result of NaN: $(cat "$tmp/out")"
done
# routes --json stays JSON on such a model: its gates are null where they are not finite
"$moas" routes -m "$tmp/nan.gguf" -f "$tmp/ag.txt" --json 2>/dev/null | python3 -c '
import json, sys
def refuse(name):
    raise ValueError(name)
rows = [json.loads(line, parse_constant=refuse) for line in sys.stdin]
assert len(rows) == 14 and rows[0]["gates"] == [None, None, None], rows[0]' ||
    fail "routes --json: not JSON on a model whose gates are NaN"
# a context of one token scores nothing: an error (it printed NaN, and NaN in its JSON)
expect_error 1 "leaves nothing to score" "$moas" perplexity -m "$model" -f "$data/tiny.txt" -c 1

# batched-bench: llama-batched-bench's rows, one per B, with the documented JSON keys;
# KV bytes follow the formula (mixture: every scheme, 1152 bytes a token as inspect
# says above); a shared prompt is stored once (fork); with --pool-mb
# alone, the sequences that fit
# what it cannot measure is an error, not a row: a pool that holds no sequence, a text
# with no character (it used random tokens), and large pages in the default pool (too
# small for them: it lacked pages mid-run)
expect_error 1 "holds no sequence of 12 tokens" "$moas" batched-bench -m "$model" -npp 8 -ntg 4 --pool-mb 0.001
: >"$tmp/empty.txt"
expect_error 1 "has no characters" "$moas" batched-bench -m "$model" -npp 8 -ntg 4 -npl 2 -f "$tmp/empty.txt"
# it reads a text as the other commands do: a character outside the vocabulary names
# --unknown, which drops it (batched-bench had no --unknown: such a text was unusable)
expect_error 1 "'7' (U+0037) at byte offset 13 is not in the vocabulary.*--unknown drop" \
    "$moas" batched-bench -m "$model" -npp 4 -ntg 2 -npl 1 -f "$tmp/crlf.txt" -t 1
"$moas" batched-bench -m "$model" -npp 4 -ntg 2 -npl 1 -f "$tmp/crlf.txt" --unknown drop \
    >"$tmp/bb-drop.out" 2>"$tmp/bb-drop.err" || fail "batched-bench --unknown drop"
grep -q '^moas: dropped 2 characters outside the vocabulary$' "$tmp/bb-drop.err" ||
    fail "batched-bench --unknown drop: stderr"
grep -q '^model .*, threads [1-9][0-9]* (default)$' "$tmp/bb-drop.out" ||
    fail "batched-bench: the threads it ran (it said 0)"
"$moas" batched-bench -m "$model" -npp 8 -ntg 4 -npl 1,8 --page-heads 1024 -t 1 >/dev/null ||
    fail "batched-bench: the default pool with pages of 1024 heads"
"$moas" batched-bench -m "$model" -npp 8 -ntg 4 -npl 1,3 --json -t 1 >"$tmp/bb.json"
"$moas" batched-bench -m "$model" -npp 8 -ntg 4 -npl 3 --shared-prompt --json -t 1 >"$tmp/bb-shared.json"
"$moas" batched-bench -m "$model" -npp 8 -ntg 4 --pool-mb 0.05 --json >"$tmp/bb-cap.json"
python3 - "$tmp/bb.json" "$tmp/bb-shared.json" "$tmp/bb-cap.json" <<'PY' || fail "batched-bench"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert [r["b"] for r in rows] == [1, 3], rows
for r in rows:
    for k in ("pp", "tg", "b", "n_kv", "t_pp", "s_pp", "t_tg", "s_tg", "t", "s", "kv_bytes", "pages"):
        assert k in r, k
    assert r["n_kv"] == r["b"] * 12 and r["kv_bytes"] == r["b"] * 12 * 1152, r
    assert r["s_tg"] > 0 and r["pages"] > 0
    assert r["threads"] == 1, r   # the pool's, as -t gave it
shared = json.loads(open(sys.argv[2]).read())
assert shared["n_kv"] == 8 + 3 * 4, shared
# the forks' shared prompt counts once in the bytes too (1152 bytes a token)
assert shared["kv_bytes"] == (8 + 3 * 4) * 1152, shared
assert shared["pages"] < rows[1]["pages"], (shared, rows[1])
cap = json.loads(open(sys.argv[3]).read())
# 0.05 MB of pages: as many 12-token sequences as fit, their bytes as the pool counts
assert cap["max_sequences"] * cap["kv_bytes_per_sequence"] == cap["kv_bytes"], cap
assert cap["max_sequences"] > 0 and cap["kv_bytes"] <= cap["pool_bytes"], cap
PY
expect_error 1 "exceed the model's context" "$moas" batched-bench -m "$model" -npp 60 -ntg 30
# a row that does not fit in the caller's pool is skipped with a note; the rest still run
if "$moas" batched-bench -m "$model" -npp 8 -ntg 4 -npl 1,64,2 --pool-mb 0.05 --json -t 1 \
    >"$tmp/bb-skip.json" 2>"$tmp/bb-skip.err"; then
    fail "batched-bench: a skipped row exits 0"
fi
grep -q '^moas: PP 8, TG 4, B 64 skipped: prompt: .*lacks [0-9]* page' "$tmp/bb-skip.err" ||
    fail "batched-bench: skipped row's note: $(cat "$tmp/bb-skip.err")"
[ "$(python3 -c 'import json,sys; print([json.loads(l)["b"] for l in open(sys.argv[1])])' \
    "$tmp/bb-skip.json")" = "[1, 2]" ] || fail "batched-bench: rows around a skipped one"
expect_error 2 "usage" "$moas" batched-bench -m "$model" --bogus

# the untimed warm-up call is forgotten: the same text with and without it, in routed
# mode past a RoPE model's context (shifts), in mixture mode, and in a one-token context
for args in "-m $data/tiny-modern-pooled-nobias.gguf --mode routed -n 100" \
            "-m $model -n 40" "-m $data/tiny-modern-pooled-nobias.gguf -n 3 -c 1"; do
    # shellcheck disable=SC2086
    warm=$("$moas" generate $args -p "And " --seed 3 2>/dev/null)
    # shellcheck disable=SC2086
    cold=$("$moas" generate $args -p "And " --seed 3 --no-warmup 2>/dev/null)
    [ "$warm" = "$cold" ] || fail "generate $args: the warm-up changed the text"
done

# generation past the context: a RoPE model shifts its cache, a learned-position model
# decodes the window's last half again; each says which on stderr
"$moas" generate -m "$data/tiny-modern-pooled-nobias.gguf" -p "And " -n 100 --seed 1 \
    >/dev/null 2>"$tmp/shift.err"
grep -q "context shift" "$tmp/shift.err" || fail "generate: RoPE context shift: $(cat "$tmp/shift.err")"
"$moas" generate -m "$model" -p "And " -n 100 --seed 1 >/dev/null 2>"$tmp/slide.err"
grep -q "learned positions (no shift)" "$tmp/slide.err" || fail "generate: re-encode message"
# a one-token context: a shift would drop nothing, so the window is decoded again (it
# wrote past the window's end before)
"$moas" generate -m "$data/tiny-modern-pooled-nobias.gguf" -p "A" -n 3 -c 1 --seed 1 \
    >/dev/null 2>"$tmp/c1.err" || fail "generate -c 1 on a RoPE model: $(cat "$tmp/c1.err")"
grep -q "is full and too short to shift" "$tmp/c1.err" \
    || fail "generate -c 1: why there is no shift: $(cat "$tmp/c1.err")"

# the K/V type and a forced scheme, asked for and reported (text and JSON), on the
# shipped model (Q8_0 K/V needs heads of 32)
shipped=models/moas-kjv.gguf
"$moas" bench -m "$shipped" --n-prompt 8 -n 4 -r 1 -t 1 --mode routed --force-scheme 2 \
    --kv-type q8_0 --json >"$tmp/bq.json"
"$moas" bench -m "$shipped" --n-prompt 8 -n 4 -r 1 -t 1 --mode routed --force-scheme 2 \
    --kv-type q8_0 | grep -q "^model .*(routed mode, every token on scheme 2, q8_0 K/V, " \
    || fail "bench: forced scheme and K/V type not said"
"$moas" batched-bench -m "$shipped" -npp 8 -ntg 4 -npl 2 -t 1 --mode routed --force-scheme 2 \
    --kv-type q8_0 --json >"$tmp/bbq.json"
"$moas" batched-bench -m "$shipped" -npp 8 -ntg 4 -npl 2 -t 1 --mode routed --kv-type f16 \
    --json >"$tmp/bbf.json"
python3 - "$tmp/bq.json" "$tmp/bbq.json" "$tmp/bbf.json" <<'PY' || fail "--kv-type, --force-scheme"
import json, sys
bench, forced, free = (json.loads(open(p).read().splitlines()[-1]) for p in sys.argv[1:])
assert (bench["kv_type"], bench["forced_scheme"]) == ("q8_0", 2), bench
assert (forced["kv_type"], forced["forced_scheme"]) == ("q8_0", 2), forced
assert (free["kv_type"], free["forced_scheme"]) == ("f16", -1), free
# every token on MQA: one K and one V row a token and layer (4 layers), a Q8_0 row of
# 32 elements 34 bytes; the router's mix in f16 stores more
assert forced["stored_bytes"] == forced["n_kv"] * 4 * 2 * 34, forced
assert forced["stored_bytes"] < free["stored_bytes"], (forced, free)
PY
expect_error 2 "generate needs a prompt" "$moas" generate -m "$model" -n 3
expect_error 1 "must be a finite number" "$moas" generate -m "$model" -p A --temp inf
expect_error 1 "needs a size in" "$moas" batched-bench -m "$model" --pool-mb 1e30
# bench with nothing decoded, routed: the shares are 0, not 0/0 (JSON has no NaN)
"$moas" bench -m "$rope" --n-prompt 4 -n 0 -r 1 -t 1 --mode routed --json >"$tmp/n0.json"
python3 -c 'import json, sys; json.load(open(sys.argv[1]), parse_constant=lambda c: sys.exit("not JSON: " + c))' \
    "$tmp/n0.json" || fail "bench -n 0 --json: $(cat "$tmp/n0.json")"
# ---- conventions (issue 17): help, options, input, timings ----

# help: on stdout, exit 0, for the program and for each command, three ways each
"$moas" --help >"$tmp/help" 2>"$tmp/help.err" || fail "--help exited $?"
[ ! -s "$tmp/help.err" ] && grep -q '^usage: moas COMMAND' "$tmp/help" || fail "--help: not on stdout"
for how in -h help; do
    "$moas" $how >"$tmp/help2" || fail "moas $how exited $?"
    cmp -s "$tmp/help" "$tmp/help2" || fail "moas $how differs from moas --help"
done
commands="generate perplexity routes logits inspect bench batched-bench"
listed=$(sed -n 's/^  \([a-z-]*\)  .*/\1/p' "$tmp/help" | tr '\n' ' ')
[ "$listed" = "$commands " ] || fail "moas --help lists '$listed'"
for c in $commands; do
    "$moas" help "$c" >"$tmp/h1" 2>"$tmp/h.err" || fail "moas help $c exited $?"
    "$moas" "$c" --help >"$tmp/h2" || fail "moas $c --help exited $?"
    "$moas" "$c" -h >"$tmp/h3" || fail "moas $c -h exited $?"
    [ ! -s "$tmp/h.err" ] && head -n 1 "$tmp/h1" | grep -q "^usage: moas $c " \
        || fail "moas help $c: $(head -n 1 "$tmp/h1")"
    cmp -s "$tmp/h1" "$tmp/h2" && cmp -s "$tmp/h1" "$tmp/h3" || fail "$c: three helps differ"
done
expect_error 2 "unknown command 'nosuch'" "$moas" help nosuch
expect_error 2 "unknown command 'nosuch'" "$moas" nosuch -m "$model"
expect_error 2 "usage: moas COMMAND" "$moas"

# options: a command takes exactly the options its help lists; any other, even one
# another command takes, is refused by name (exit 2), never ignored
python3 - "$moas" <<'PY' || fail "options and help disagree"
import re, subprocess, sys
moas = sys.argv[1]
commands = "generate perplexity routes logits inspect bench batched-bench".split()
listed = {}
for c in commands:
    text = subprocess.run([moas, "help", c], capture_output=True, text=True).stdout
    listed[c] = {o for m in re.finditer(r"^ +(-[\w-]+)(?:, (-[\w-]+))?", text, re.M)
                 for o in m.groups() if o}
assert all("-m" in listed[c] for c in commands), listed
every = set().union(*listed.values()) - {"-h", "--help"}
bad = []
for c in commands:
    for opt in sorted(every):
        r = subprocess.run([moas, c, opt], capture_output=True, text=True)
        refused = "does not take" in r.stderr or "unknown option" in r.stderr
        first = r.stderr.splitlines()[0] if r.stderr else "exit %d" % r.returncode
        if refused != (opt not in listed[c]):
            bad.append("%s %s: %s" % (c, opt, first))
        elif refused and (r.returncode != 2 or "moas: %s does not take %s" % (c, opt) not in r.stderr):
            bad.append("%s %s refused as: exit %d, %s" % (c, opt, r.returncode, first))
assert not bad, "\n".join(bad)
PY
expect_error 2 "moas: bench does not take --temp" "$moas" bench -m "$model" --temp 1
expect_error 2 "moas: inspect does not take -t" "$moas" inspect -m "$model" -t 2
expect_error 2 "moas: perplexity does not take -p" "$moas" perplexity -m "$model" -p "And"
# bench: -p is a prompt's text everywhere, so bench's prompt length is --n-prompt
expect_error 2 "bench does not take -p: .*--n-prompt N" "$moas" bench -m "$model" -p 8
"$moas" bench -m "$model" --n-prompt 6 --n-gen 3 --n-depth 2 -r 1 --json >"$tmp/np.json" \
    || fail "bench --n-prompt --n-gen --n-depth"
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); assert (r["n_prompt"], r["n_decode"], r["depth"]) == (6, 3, 2), r' \
    "$tmp/np.json" || fail "bench --n-prompt --n-gen --n-depth: $(cat "$tmp/np.json")"

# the default temperature is the library's (1): no --temp is --temp 1
[ "$("$moas" generate -m "$model" -p "And God" -n 30 --seed 9 2>/dev/null)" = \
  "$("$moas" generate -m "$model" -p "And God" -n 30 --seed 9 --temp 1 2>/dev/null)" ] \
    || fail "generate's default temperature is not the library's 1"
"$moas" help generate | grep -q -- '--temp T .*(default 1)$' || fail "help: default temperature"

# -c 0 is the trained length, as n_ctx = 0 in the library; a negative length is an error
"$moas" perplexity -m "$model" -f "$data/tiny.txt" -c 0 --json >"$tmp/c0.json" || fail "-c 0"
python3 -c 'import json, sys; assert json.load(open(sys.argv[1]))["n_ctx"] == 64' "$tmp/c0.json" \
    || fail "perplexity -c 0: n_ctx"
[ "$("$moas" generate -m "$model" -p "And God" -n 20 --seed 3 -c 0 2>/dev/null)" = \
  "$("$moas" generate -m "$model" -p "And God" -n 20 --seed 3 2>/dev/null)" ] || fail "generate -c 0"
expect_error 1 "must be an integer in \[0, " "$moas" generate -m "$model" -p "A" -c -1

# a number starts with a digit, '-' or (a fraction) '.': strtol and strtod's leading
# white space and '+' are refused with the message of '5x', in every numeric parser
tab=$(printf '\t')
for n in ' 5' "${tab}5" '+5' '5x' ''; do
    expect_error 1 "^moas: error: -n must be an integer in \[0, " \
        "$moas" generate -m "$model" -p A -n "$n"
done
expect_error 1 "^moas: error: --seed must be an integer" "$moas" generate -m "$model" -p A --seed +3
expect_error 1 "^moas: error: --threads must be an integer" \
    "$moas" generate -m "$model" -p A --threads ' 1'
for t in ' 1' '+1' '+.5' ' .5' "${tab}1" '1x' '0x1p-1' '0X2'; do
    expect_error 1 "^moas: error: --temp must be a finite number, got '$t'" \
        "$moas" generate -m "$model" -p A --temp "$t"
done
expect_error 1 "^moas: error: --logit-bias's BIAS must be a finite number" \
    "$moas" generate -m "$model" -p A --logit-bias 'A=+1'
expect_error 1 "^moas: error: --pool-mb must be a finite number" \
    "$moas" batched-bench -m "$model" --pool-mb ' 1'
for l in '+2' ' 2' '1,+2' '1, 2' '1,2x'; do
    expect_error 1 "^moas: error: -npl must be a list of at most" \
        "$moas" batched-bench -m "$model" -npp 8 -ntg 4 -npl "$l"
done
# what is written as a number still is one
[ "$("$moas" generate -m "$model" -p "And God" -n 10 --seed 5 --temp .5 2>/dev/null)" = \
  "$("$moas" generate -m "$model" -p "And God" -n 10 --seed 5 --temp 0.5 2>/dev/null)" ] \
    || fail "--temp .5 is not --temp 0.5"

# a prompt from a file or stdin (-f FILE, -f -, -p -); a text from stdin (-f -)
printf 'And God' >"$tmp/prompt"
want=$("$moas" generate -m "$model" -p "And God" -n 20 --seed 4 2>/dev/null)
[ "$("$moas" generate -m "$model" -f "$tmp/prompt" -n 20 --seed 4 2>/dev/null)" = "$want" ] \
    || fail "generate -f FILE"
[ "$("$moas" generate -m "$model" -f - -n 20 --seed 4 <"$tmp/prompt" 2>/dev/null)" = "$want" ] \
    || fail "generate -f -"
[ "$("$moas" generate -m "$model" -p - -n 20 --seed 4 <"$tmp/prompt" 2>/dev/null)" = "$want" ] \
    || fail "generate -p -"
expect_error 2 "not both" "$moas" generate -m "$model" -p "And" -f "$tmp/prompt"
"$moas" perplexity -m "$model" -f - <"$data/tiny.txt" >"$tmp/ppl-stdin" 2>&1 || fail "perplexity -f -"
"$moas" perplexity -m "$model" -f "$data/tiny.txt" >"$tmp/ppl-file" 2>&1
[ "$(grep -v tokens/s "$tmp/ppl-stdin")" = "$(grep -v tokens/s "$tmp/ppl-file")" ] \
    || fail "perplexity -f - differs from -f FILE"
"$moas" routes -m "$model" -f - --mode routed --json <"$data/tiny.txt" 2>/dev/null \
    | cmp -s - "$tmp/routes.jsonl" || fail "routes -f -"
"$moas" logits -m "$model" -f - -o "$tmp/logits-stdin" <"$tmp/text" 2>/dev/null || fail "logits -f -"
cmp -s "$tmp/logits" "$tmp/logits-stdin" || fail "logits -f -: other logits"

# generate's timings, llama.cpp's lines, on stderr
"$moas" generate -m "$model" -p "And God" -n 30 --seed 1 >/dev/null 2>"$tmp/timings"
for line in "load time = *[0-9.]* ms$" \
            "prompt eval time = *[0-9.]* ms / *7 tokens ( *[0-9.]* ms per token, *[0-9.]* tokens per second)$" \
            "eval time = *[0-9.]* ms / *29 tokens ( *[0-9.]* ms per token, *[0-9.]* tokens per second)$" \
            "total time = *[0-9.]* ms / *36 tokens$"; do
    grep -q "^moas: *$line" "$tmp/timings" || fail "timings: no '$line': $(cat "$tmp/timings")"
done

# stdout and stderr in one pipe: every line of stderr starts a line, none is glued to
# the text (the text is flushed as it comes, and ends a line before the timings)
"$moas" generate -m "$model" -p "And God" -n 200 --seed 2 2>&1 | cat >"$tmp/piped"
[ "$(grep -c 'moas: ' "$tmp/piped")" -eq "$(grep -c '^moas: ' "$tmp/piped")" ] \
    && grep -q '^moas: *load time' "$tmp/piped" && grep -q '^moas: the context' "$tmp/piped" \
    || fail "generate | cat: a note glued to the text: $(cat "$tmp/piped")"

# perplexity's progress: on a terminal only, and erased before the result
[ ! -s "$tmp/ppl.err" ] || fail "perplexity: stderr not empty off a terminal: $(cat "$tmp/ppl.err")"
if script -qec true /dev/null </dev/null >/dev/null 2>&1; then   # util-linux's script
    script -qec "'$moas' perplexity -m '$model' -f '$data/tiny.txt' -t 1" /dev/null \
        </dev/null >"$tmp/tty.out" 2>&1 || fail "perplexity on a terminal: $(cat "$tmp/tty.out")"
    grep -q 'moas: perplexity: window 1 of 9, 0 of 537 tokens' "$tmp/tty.out" \
        || fail "perplexity: no progress on a terminal: $(cat -v "$tmp/tty.out")"
    python3 - "$tmp/tty.out" <<'PY' || fail "perplexity: the progress is not erased: $(cat -v "$tmp/tty.out")"
import sys
out = open(sys.argv[1], "rb").read()
assert out[out.rindex(b"\r\x1b[K") + 4:].startswith(b"mode "), out
PY
else
    echo "cli: SKIP: perplexity's progress on a terminal (no util-linux script(1))"
fi

# scheme names are unique: the pooled model with its GQA scheme given 6 KV heads, as
# many as MHA, names them MHA#0 and MHA#1
python3 - "$data/tiny-pooled-bias.gguf" "$tmp/same.gguf" <<'PY'
import struct, sys
b = bytearray(open(sys.argv[1], "rb").read())
key = b"moas.attention.scheme_kv_heads"
at = b.index(key) + len(key)
assert struct.unpack_from("<IIQIII", b, at) == (9, 4, 3, 6, 2, 1)   # [6, 2, 1]
struct.pack_into("<I", b, at + 20, 6)
open(sys.argv[2], "wb").write(b)
PY
"$moas" perplexity -m "$tmp/same.gguf" -f "$data/tiny.txt" --mode routed >"$tmp/same.out"
grep -q '^scheme shares   MHA#0 [0-9.]*% MHA#1 [0-9.]*% MQA [0-9.]*%$' "$tmp/same.out" \
    || fail "scheme names: $(grep shares "$tmp/same.out")"
"$moas" routes -m "$tmp/same.gguf" -f "$tmp/text" --no-color \
    | grep -q '^schemes:  0 = MHA#0  1 = MHA#1  2 = MQA ' || fail "routes: scheme names"
grep -q '^scheme shares   MHA [0-9.]*% GQA-2 [0-9.]*% MQA [0-9.]*%$' "$tmp/ppl-file" \
    || fail "scheme names of distinct schemes: $(grep shares "$tmp/ppl-file")"

# a text with nothing to route, decode or score is an error, not an empty success
: >"$tmp/empty.txt"
expect_error 1 "'.*empty.txt' has no characters to route" "$moas" routes -m "$model" -f "$tmp/empty.txt"
expect_error 1 "stdin has no characters to route" "$moas" routes -m "$model" -f - --json <"$tmp/empty.txt"
expect_error 1 "has no characters: there are no logits" "$moas" logits -m "$model" -f "$tmp/empty.txt" -o "$tmp/l"
printf 'A' >"$tmp/one.txt"
expect_error 1 "has 1 character to score: perplexity needs at least 2" \
    "$moas" perplexity -m "$model" -f "$tmp/one.txt"

# a file may hold tensors its model does not use: bench's count of the weights a token
# reads skips a layer the model lacks (blk.100000 was read out of bounds: a segfault)
python3 - "$model" "$tmp/extra.gguf" <<'PY'
import sys
sys.path.insert(0, "tools")
import gguf
r = gguf.GGUFReader(sys.argv[1])
w = gguf.GGUFWriter()
for k, v in r.kv.items():
    if k != "general.alignment":
        vtype, elem = r.kv_types[k]
        w.add_kv(k, vtype, v, elem)
for name, t in r.tensors.items():
    w.add_tensor_raw(name, t.ne, t.ttype, r.tensor_raw(name))
w.add_tensor("blk.100000.attn_q.0.weight", [0.0] * 4, [2, 2])
w.write(sys.argv[2])
PY
"$moas" bench -m "$tmp/extra.gguf" --n-prompt 4 -n 4 -r 1 -t 1 >/dev/null 2>&1 ||
    fail "bench: a tensor of a layer the model lacks"

# batched-bench: options it would ignore are usage errors, and settings the library
# refuses stop the run before its table starts
expect_error 2 "not lists" "$moas" batched-bench -m "$model" --pool-mb 0.05 -npp 4,8 -ntg 4
expect_error 2 "needs -npl" "$moas" batched-bench -m "$model" --pool-mb 0.05 -npp 4 -ntg 4 -pps
expect_error 2 "compact-keep applies" "$moas" batched-bench -m "$model" -npp 4 -ntg 4 -npl 1 \
    --compact-keep 2
expect_error 1 "power of two" "$moas" batched-bench -m "$model" -npp 4 -ntg 4 -npl 2 --page-heads 3
[ ! -s "$tmp/out" ] || fail "batched-bench: a table begun before the error: $(cat "$tmp/out")"
expect_error 1 "needs routed mode" "$moas" batched-bench -m "$model" -npp 4 -ntg 4 -npl 2 \
    --force-scheme 1 --json
[ ! -s "$tmp/out" ] || fail "batched-bench --json: output before the error: $(cat "$tmp/out")"
# the sampler's seed is 64-bit: seeds past 2^31 are accepted (they were refused)
"$moas" generate -m "$model" -p "And" -n 2 --seed 9223372036854775807 >/dev/null 2>&1 ||
    fail "generate --seed 2^63 - 1"
# a number past a float's range is an error, not an infinity
expect_error 1 "within a float's range" "$moas" generate -m "$model" -p "And" -n 1 --temp 1e39
expect_error 1 "within a float's range" "$moas" generate -m "$model" -p "And" -n 1 \
    --logit-bias A=-1e39

# the shipped pooled model scores on the held-out text what models/README.md says
set -- pooled-kjv-kvinit 1.4600 1336
    "$moas" perplexity -m "models/$1.gguf" -f models/kjv-heldout.txt --mode routed --json \
        -t 1 >"$tmp/shipped.json" 2>/dev/null || fail "perplexity on models/$1.gguf"
    python3 - "$tmp/shipped.json" "$2" "$3" <<'PY' || fail "models/$1.gguf: not the documented score"
import json, sys
r = json.load(open(sys.argv[1]))
assert round(r["nats_per_token"], 4) == float(sys.argv[2]), r["nats_per_token"]
assert round(r["kv_bytes_per_token"]) == int(sys.argv[3]), r["kv_bytes_per_token"]
PY

# output that cannot be written is a failure: a closed stdout, or a reader that went
# away while SIGPIPE is ignored (generation stops at the first failed write)
expect_error 1 "cannot write stdout" sh -c '"$0" inspect -m "$1" >&-' "$moas" "$model"
# a command's --help too, as moas help CMD (it exited 0 with nothing written)
expect_error 1 "cannot write stdout" sh -c '"$0" generate --help >&-' "$moas"
expect_error 1 "cannot write stdout" sh -c '"$0" help generate >&-' "$moas"
set +e
(trap '' PIPE; "$moas" generate -m "$model" -p "A" -n 5000 -t 1 2>"$tmp/pipe.err"; \
    echo $? >"$tmp/pipe.rc") | head -c 3 >/dev/null
set -e
[ "$(cat "$tmp/pipe.rc")" = 1 ] && grep -q "cannot write stdout" "$tmp/pipe.err" \
    || fail "generate into a closed pipe: $(cat "$tmp/pipe.rc") $(cat "$tmp/pipe.err")"
# the prompt is echoed as the model read it: a dropped character is not shown
out=$("$moas" generate -m "$model" -p "And 7 God" --unknown drop -n 0 2>/dev/null)
[ "$out" = "And  God" ] || fail "echo of a prompt with a dropped character: '$out'"
# logits never writes over its inputs (the mapped model gave a bus error)
cp "$model" "$tmp/own.gguf"
expect_error 1 "is the model file" "$moas" logits -m "$tmp/own.gguf" -f "$data/tiny.txt" \
    -o "$tmp/own.gguf"
cmp -s "$model" "$tmp/own.gguf" || fail "logits -o MODEL changed the model"
cp "$data/tiny.txt" "$tmp/own.txt"
expect_error 1 "is the text" "$moas" logits -m "$model" -f "$tmp/own.txt" -o "$tmp/own.txt"
cmp -s "$data/tiny.txt" "$tmp/own.txt" || fail "logits -o TEXT changed the text"
# help about help; --version takes nothing more
"$moas" help help | grep -q '^usage: moas COMMAND' || fail "help help"
"$moas" help --help | grep -q '^usage: moas COMMAND' || fail "help --help"
expect_error 2 "takes no argument" "$moas" --version extra
# an error in the middle of the text starts a line of its own when both streams show
# in one place: every token banned, the first sample fails after the prompt's echo
bans=$(i=0; while [ $i -lt 47 ]; do printf -- '--logit-bias %02d=-inf ' $i; i=$((i + 1)); done)
set +e
# shellcheck disable=SC2086
"$moas" generate -m "$model" -p "and" -n 3 $bans >"$tmp/both" 2>&1
set -e
grep -q '^moas: error: sample' "$tmp/both" || fail "error glued to the text: $(cat "$tmp/both")"

echo "cli: ok"
