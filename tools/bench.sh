#!/bin/sh
# bench.sh [BIN_DIR] [TOOLS_BUILD_DIR] - the benchmarks of docs/PERFORMANCE.md.
#
# Makes random-weight models of the benchmark shapes (tools/random_model.c) under
# build/bench/, then runs `moas bench` on each at 1 and 2 threads: prefill of 512
# tokens and decode of 128, median of 5 runs, one JSON object per line. Shapes:
#   shipped   models/moas-kjv.gguf (4 layers, 192 wide, MoAS), mixture and routed
#   small     6 layers, 384 wide, 6 heads, vocab 256: plain MHA in f32, f16, q8_0;
#             and MoAS (schemes 6,2,1) in f32 and f16, mixture and routed
#   gpt2      12 layers, 768 wide, 12 heads, vocab 50257, untied: f32, f16, q8_0
#   batched   `moas batched-bench` (many sequences in one KV pool, llama-batched-bench's
#             rows): the shipped models and a 4-layer 192-wide MHA model with
#             PP 64, TG 64, and GPT-2 small f16 with PP 128, TG 128; B = 1 ... 64, f16
#             KV, 2 threads; and the shipped models' capacity in a 64 MB pool
# BENCH_SHAPES="shipped small" limits the set (batched is not in the default set);
# BENCH_REPEATS changes the repeats.
set -eu
bin=${1:-bin}
tools=${2:-build/tools}
out=build/bench
shapes=${BENCH_SHAPES:-shipped small gpt2}
repeats=${BENCH_REPEATS:-5}
mkdir -p "$out"

# Called directly, never in $(...): there its exit would leave only the subshell and the
# benchmarks would go on without the model.
model() {   # model NAME ARGS...: build/bench/NAME.gguf, made once; its path in $made
    name=$1; shift
    made=$out/$name.gguf
    [ -f "$made" ] && return
    "$tools/random_model" -o "$made" "$@" || {
        rm -f "$made"   # a half-written file would pass for made on the next run
        echo "bench: random_model could not make $made" >&2
        exit 1
    }
}

run() {     # run MODEL MODE
    for t in 1 2; do
        "$bin/moas" bench -m "$1" --mode "$2" -t "$t" --n-prompt 512 -n 128 -r "$repeats" --json
    done
}

for shape in $shapes; do
    case $shape in
    shipped)
        [ -f models/moas-kjv.gguf ] || { echo "bench: models/moas-kjv.gguf missing" >&2; continue; }
        run models/moas-kjv.gguf mixture
        run models/moas-kjv.gguf routed ;;
    small)
        for type in f32 f16 q8_0; do
            model small-mha-$type --layers 6 --embd 384 --heads 6 --vocab 256 --mha \
                --no-bias --type $type
            run "$made" mixture
        done
        for type in f32 f16; do
            model small-moas-$type --layers 6 --embd 384 --heads 6 --vocab 256 --no-bias \
                --type $type
            run "$made" mixture
            run "$made" routed
        done ;;
    gpt2)
        for type in f32 f16 q8_0; do
            model gpt2-$type --layers 12 --embd 768 --heads 12 --vocab 50257 --mha \
                --untied --type $type
            run "$made" mixture
        done ;;
    batched)
        text=models/kjv-heldout.txt
        for m in models/pooled-kjv-kvinit.gguf models/moas-kjv.gguf; do
            for mode in mixture routed; do
                "$bin/moas" batched-bench -m "$m" -npp 64 -ntg 64 -npl 1,2,4,8,16,32,64 \
                    --mode $mode --kv-type f16 -t 2 -f $text --json
                "$bin/moas" batched-bench -m "$m" -npp 96 -ntg 32 --pool-mb 64 --mode $mode \
                    -f $text --json
            done
        done
        model tiny192-mha-f16 --layers 4 --embd 192 --heads 6 --vocab 64 --ctx 256 --mha \
            --no-bias --type f16
        "$bin/moas" batched-bench -m "$made" -npp 64 -ntg 64 -npl 1,2,4,8,16,32,64 \
            --kv-type f16 -t 2 --json
        model gpt2-f16 --layers 12 --embd 768 --heads 12 --vocab 50257 --mha --untied --type f16
        "$bin/moas" batched-bench -m "$made" -npp 128 -ntg 128 -npl 1,2,4,8,16,32,64 \
            --kv-type f16 -t 2 --json ;;
    *) echo "bench: unknown shape '$shape'" >&2; exit 2 ;;
    esac
done
