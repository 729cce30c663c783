#!/usr/bin/env bash
# Kissane et al. (chat-data vs text-data SAEs) and Lee, Breck, Arditi (upstream latents) on smollm2-safe (issue #16).
# Everything on CPU with one thread; sizes below are the ones reported in docs/notes-16k.md.
#
#   OUT=results/kissane bash scripts/kissane_real.sh
#
# Needs the shared prompt files (../shared/datasets/refusal_direction) and Debian's python3.11-doc
# (/usr/share/doc/python3.11/html, or PYDOC=folder of an extracted .deb).
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=${OUT:-results/kissane}
MODEL=${MODEL:-smollm2-safe}
LAYER=${LAYER:-12}
POSITION=${POSITION:--1}
TOKENS=${TOKENS:-204800}        # training tokens per SAE (equal for both)
WIDTH=${WIDTH:-4096}
K=${K:-32}
PYDOC=${PYDOC:-/usr/share/doc/python3.11/html}
mkdir -p "$OUT"
# 1. data: real prompts + the model's own replies; Python docs prose wrapped in the chat format
[ -f "$OUT/chat_corpus.json" ] || python scripts/chat_corpus.py --model "$MODEL" --n-harmless 640 --out "$OUT/chat_corpus.json"
[ -f "$OUT/plain_text.json" ] || python scripts/plain_text_corpus.py "$PYDOC" --out "$OUT/plain_text.json"
[ -f "$OUT/text_train.json" ] || python scripts/kissane_real.py data --plain-text "$OUT/plain_text.json" \
  --chat "$OUT/chat_corpus.json" --out-dir "$OUT"
# 2. two SAEs at equal width and token budget (activations cached once as safetensors shards)
for DATA in chat text; do
  FILE=$OUT/${DATA}_train.json
  [ -f "$OUT/sae-$DATA/cfg.json" ] || refusal-lens sae train --model "$MODEL" --layer "$LAYER" --arch topk \
    --width "$WIDTH" --k "$K" --tokens "$TOKENS" --batch-size 1024 --context-size 256 --buffer-tokens 65536 \
    --data chat --data-file "$FILE" --cache "$OUT/cache-$DATA" --out "$OUT/sae-$DATA" --overwrite --no-progress ${TRAIN_ARGS:-}
done
# 3. the paper's measurements
python scripts/kissane_real.py measure --model "$MODEL" --sae "$OUT/sae-chat" --sae "$OUT/sae-text" --names chat text \
  --data-file "$OUT/chat_heldout.json" --data-file "$OUT/text_heldout.json" --position "$POSITION" \
  --out "$OUT/measure" --overwrite
# 4. Lee et al. with the chat SAE (layer 12) upstream of the table-2 direction (layer 23, position -5)
python scripts/lee_real.py --model "$MODEL" --sae "$OUT/sae-chat" --direction docs/results-16/table2-safe-direction \
  --out "$OUT/lee" --overwrite
