#!/usr/bin/env bash
# Issue 15's GPU measurements in one device call (about 8 minutes on an H200; carry .gpu_pack built by
# benchmarks/gpu/pack_wheels.sh):
#   1. benchmarks/exit_speed.py, model only, bf16 autocast, the BBC KL model's skewed exit schedule (80 % after
#      layer 1, then 10, 4, 3, 2, 1 %), batch 256 and 1024: full depth vs per-batch compaction vs layer pools,
#      MiniLM-L6 shape and BERT-base shape (12 layers, H = 768), random weights (timing only).
#      Targets: pools >= 0.85 x the layer speed-up at batch 1024, >= 0.75 at 256 (MiniLM-L6).
#   2. benchmarks/gpu/e2e.py: train, then the tokenising stage's and the model's capacities alone, then
#      jobs/score.py --gpus-per-actor 1 with the tokenising stage, with the actor tokenising, and at full depth.
#      Target: end-to-end rows/s >= 0.8 x min(tokenising capacity, model capacity).
# usage (repository root):  bash benchmarks/gpu/scoring_speed.sh      results and logs in $OUT
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/install_pack.sh
WORK=${WORK:-/tmp/ee-speed}
mkdir -p "$WORK"
python3 - "$PACK/minilm" "$WORK/bert-base" <<'PY'
import sys
from transformers import AutoTokenizer, BertConfig
BertConfig().save_pretrained(sys.argv[2])  # BERT-base: 12 layers, H = 768, the uncased vocabulary's size
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
PY
# the skewed schedule per layer; for 12 layers each 6-layer share is split over two layers (same shape, twice deep)
declare -A SHARE=([minilm]="0.8 0.1 0.04 0.03 0.02 0.01"
                  [bert-base]="0.4 0.4 0.05 0.05 0.02 0.02 0.015 0.015 0.01 0.01 0.005 0.005")
for shape in minilm bert-base; do
  encoder="$PACK/minilm"; [ "$shape" = bert-base ] && encoder="$WORK/bert-base"
  # shellcheck disable=SC2086  (the shares are separate arguments)
  python3 benchmarks/exit_speed.py --model "$encoder" --random-init --device cuda --dtype bfloat16 \
    --batch-sizes 256 1024 --rows 16384 --repeats 3 --exit-share ${SHARE[$shape]} \
    --out "$OUT/exit_speed_${shape}_bf16_skewed.json" 2>&1 | grep -v "^Loading" | tee "$OUT/exit_speed_$shape.log"
done
python3 benchmarks/gpu/e2e.py --encoder "$PACK/minilm" --rows 400000 --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
