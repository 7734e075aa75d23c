#!/bin/sh
# Regenerates every file in tests/data/ except tiny.txt, README.md and this
# script.  Needs torch (Debian's python3-torch 1.13 under /usr/bin/python3);
# not run by CI.  The checkpoints go to $CKPT_DIR (default /tmp/moas-testdata)
# and are not committed.  Output is deterministic for a given torch build.
#
#   sh tests/data/regen.sh
set -eu

cd "$(dirname "$0")/../.."
TORCH_PY=${TORCH_PY:-/usr/bin/python3}     # python with torch, for tools/train.py
PY=${PY:-python3}                          # any python3 >= 3.9, for the converter
CKPT_DIR=${CKPT_DIR:-/tmp/moas-testdata}
D=tests/data
TEXT=$D/tiny.txt
mkdir -p "$CKPT_DIR"

# 1. Six tiny random models: 2 layers, n_embd 48, 6 heads, context 64, with a
#    spread-out init (--init-std 0.25) so that logits and gates vary.
seed=10
for type in baseline static moas; do
    case $type in static) atype=static_moas ;; *) atype=$type ;; esac
    for bias in bias nobias; do
        seed=$((seed + 1))
        name=tiny-$type-$bias
        case $bias in bias) flag=--bias ;; *) flag=--no-bias ;; esac
        $TORCH_PY tools/train.py --data $TEXT --out "$CKPT_DIR/$name.pt" --init-only \
            --attention-type $atype $flag --n-layer 2 --n-head 6 --n-embd 48 \
            --block-size 64 --dropout 0.0 --init-std 0.25 --seed $seed
        $PY tools/moas-convert "$CKPT_DIR/$name.pt" -o $D/$name.gguf --vocab-text $TEXT \
            --type f32 --name $name
        $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
            --text-start 440 --text-len 64 --out $D/$name.golden
        if [ $type != baseline ]; then   # libmoas's routed mode (SchemeMixture.routed)
            $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
                --text-start 440 --text-len 64 --golden-mode routed --out $D/$name-routed.golden
        fi
    done
done

# 2. The moas model with biases as F16 (matrices and embeddings F16, norms and
#    biases F32); its golden is the forward with matrices and embeddings rounded
#    to float16.
$PY tools/moas-convert "$CKPT_DIR/tiny-moas-bias.pt" -o $D/tiny-moas-f16.gguf \
    --vocab-text $TEXT --type f16 --name tiny-moas-f16
$TORCH_PY tools/train.py --golden "$CKPT_DIR/tiny-moas-bias.pt" --data $TEXT --text $TEXT \
    --text-start 440 --text-len 64 --round-f16 --out $D/tiny-moas-f16.golden

# 3. The routed-KV variant (docs/FORMAT.md "Pooled K/V"):
#    pooled_moas, schemes [6, 2, 1], same shapes and init.  Two goldens each:
#    mixture (soft gates) and routed (hard top-1).  Seeds 19 and 20 were picked
#    so that routed mode chooses every scheme in every layer (at least 10 times)
#    and, in the routed goldens, no top-1 gate is within 6e-3 of the runner-up.
for bias in bias nobias; do
    case $bias in bias) flag=--bias; seed=19 ;; *) flag=--no-bias; seed=20 ;; esac
    name=tiny-pooled-$bias
    $TORCH_PY tools/train.py --data $TEXT --out "$CKPT_DIR/$name.pt" --init-only \
        --attention-type pooled_moas $flag --n-layer 2 --n-head 6 --n-embd 48 \
        --block-size 64 --dropout 0.0 --init-std 0.25 --seed $seed
    $PY tools/moas-convert "$CKPT_DIR/$name.pt" -o $D/$name.gguf --vocab-text $TEXT \
        --type f32 --name $name
    $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
        --text-start 440 --text-len 64 --golden-mode mixture --out $D/$name.golden
    $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
        --text-start 440 --text-len 64 --golden-mode routed --out $D/$name-routed.golden
done

# 4. The block options (docs/FORMAT.md, "Block options"): RoPE, RMSNorm and SwiGLU,
#    same shapes and init (SwiGLU's n_ff is 128).  "rope" models change positions
#    only; "modern" ones all three, with rope base 500 so that the slow pairs turn
#    too within 64 positions.  The pooled seeds were picked as in step 3: in the
#    routed goldens every scheme is chosen in every layer (at least 9 times) and no
#    top-1 gate is within 5e-3 of the runner-up.
block() {   # block NAME SEED TYPE [train.py options]
    name=$1 seed=$2 atype=$3; shift 3
    $TORCH_PY tools/train.py --data $TEXT --out "$CKPT_DIR/$name.pt" --init-only \
        --attention-type $atype --n-layer 2 --n-head 6 --n-embd 48 --block-size 64 \
        --dropout 0.0 --init-std 0.25 --seed $seed "$@"
    $PY tools/moas-convert "$CKPT_DIR/$name.pt" -o $D/$name.gguf --vocab-text $TEXT \
        --type f32 --name $name
    $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
        --text-start 440 --text-len 64 --out $D/$name.golden
    if [ $atype = pooled_moas ] || [ $atype = moas ]; then
        $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
            --text-start 440 --text-len 64 --golden-mode routed --out $D/$name-routed.golden
    fi
}
block tiny-rope-baseline-nobias 21 baseline --no-bias --pos rope
block tiny-rms-static-nobias 23 static_moas --no-bias --norm rms --mlp swiglu
block tiny-modern-moas-bias 22 moas --bias --pos rope --rope-base 500 --norm rms --mlp swiglu
block tiny-rope-pooled-bias 37 pooled_moas --bias --pos rope
block tiny-modern-pooled-nobias 55 pooled_moas --no-bias --pos rope --rope-base 500 \
    --norm rms --mlp swiglu
block tiny-modern-gqa2-nobias 71 gqa --kv-heads 2 --no-bias --pos rope --rope-base 500 \
    --norm rms --mlp swiglu
block tiny-rope-static-bias 72 static_moas --bias --pos rope
# A RoPE model with a context of 1,024 (no position table, so no bigger): its goldens
# cover all 537 characters of tiny.txt, positions up to 536.  Seed 66: every scheme
# chosen often, smallest routed top-1 margin 2.6e-3.
$TORCH_PY tools/train.py --data $TEXT --out "$CKPT_DIR/tiny-rope-long.pt" --init-only \
    --attention-type pooled_moas --no-bias --n-layer 2 --n-head 6 --n-embd 48 \
    --block-size 1024 --dropout 0.0 --init-std 0.25 --seed 66 --pos rope
$PY tools/moas-convert "$CKPT_DIR/tiny-rope-long.pt" -o $D/tiny-rope-long.gguf \
    --vocab-text $TEXT --type f32 --name tiny-rope-long
for mode in mixture routed; do
    case $mode in routed) suffix=-routed ;; *) suffix= ;; esac
    $TORCH_PY tools/train.py --golden "$CKPT_DIR/tiny-rope-long.pt" --data $TEXT --text $TEXT \
        --golden-mode $mode --out $D/tiny-rope-long$suffix.golden
done
$PY tools/moas-convert "$CKPT_DIR/tiny-modern-moas-bias.pt" -o $D/tiny-modern-moas-f16.gguf \
    --vocab-text $TEXT --type f16 --name tiny-modern-moas-f16
$TORCH_PY tools/train.py --golden "$CKPT_DIR/tiny-modern-moas-bias.pt" --data $TEXT \
    --text $TEXT --text-start 440 --text-len 64 --round-f16 --out $D/tiny-modern-moas-f16.golden

# 5. Plain GQA and MQA (one scheme of G < 6 kv heads, mixing single): gqa
#    --kv-heads 2 with biases and --kv-heads 1 (MQA) without, and a pooled_moas
#    model with the one scheme [1] (a pooled MQA model).  One golden each: the
#    same forward in both modes.
for spec in gqa2-bias:2:--bias:21 mqa-nobias:1:--no-bias:22; do
    IFS=: read -r kind g flag seed <<SPEC
$spec
SPEC
    name=tiny-$kind
    $TORCH_PY tools/train.py --data $TEXT --out "$CKPT_DIR/$name.pt" --init-only \
        --attention-type gqa --kv-heads $g $flag --n-layer 2 --n-head 6 --n-embd 48 \
        --block-size 64 --dropout 0.0 --init-std 0.25 --seed $seed
    $PY tools/moas-convert "$CKPT_DIR/$name.pt" -o $D/$name.gguf --vocab-text $TEXT \
        --type f32 --name $name
    $TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
        --text-start 440 --text-len 64 --out $D/$name.golden
done
name=tiny-pooled-mqa
$TORCH_PY tools/train.py --data $TEXT --out "$CKPT_DIR/$name.pt" --init-only \
    --attention-type pooled_moas --schemes 1 --bias --n-layer 2 --n-head 6 --n-embd 48 \
    --block-size 64 --dropout 0.0 --init-std 0.25 --seed 23
$PY tools/moas-convert "$CKPT_DIR/$name.pt" -o $D/$name.gguf --vocab-text $TEXT \
    --type f32 --name $name
$TORCH_PY tools/train.py --golden "$CKPT_DIR/$name.pt" --data $TEXT --text $TEXT \
    --text-start 440 --text-len 64 --golden-mode routed --out $D/$name.golden

# 6. A real torch.save() checkpoint for tests/python: a 1-layer moas model with
#    biases, the reference's mask buffers and the optimizer state of two AdamW
#    steps, plus its state_dict values as JSON (written by torch, not by us).
$TORCH_PY tools/train.py --data $TEXT --out $D/tiny-ckpt.pt --attention-type moas --bias \
    --mask-buffers --n-layer 1 --n-head 2 --n-embd 4 --block-size 4 --dropout 0.0 \
    --init-std 0.3 --seed 7 --iters 2 --batch-size 2 --eval-interval 1000 --eval-iters 1 \
    --warmup 1 --log-interval 0
$TORCH_PY - $D/tiny-ckpt.pt $D/tiny-ckpt.json <<'EOF'
import json, sys, torch
ck = torch.load(sys.argv[1], map_location="cpu")
out = {"model_args": ck["model_args"],
       "tensors": {k: {"shape": list(v.shape), "values": v.flatten().tolist()}
                   for k, v in ck["model"].items()}}
with open(sys.argv[2], "w") as f:
    json.dump(out, f, indent=0, sort_keys=True)
    f.write("\n")
EOF

ls -l $D
