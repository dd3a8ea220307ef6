#!/usr/bin/env bash
# The pipeline end to end on a GPU machine that has PyTorch but not Ray or MLflow (what the device machine has):
# installs .gpu_pack (benchmarks/gpu/pack_wheels.sh) into a private folder, then runs benchmarks/gpu/e2e.py:
# jobs/train.py --use-gpu (stage 1, stage 2, registration; sqlite MLflow) and jobs/score.py --gpus-per-actor 1
# over 50,000 BBC paragraphs with early exit and at full depth. Logs and JSON results go to $OUT (or ./e2e-out).
# usage (repository root):  bash benchmarks/gpu/e2e.sh [extra e2e.py arguments]
# on CPU, to check the same path:  bash benchmarks/gpu/e2e.sh --cpu --encoder tiny --rows 2000
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/gpu/install_pack.sh
encoder=(--encoder "$PACK/minilm")
for a in "$@"; do [ "$a" = --encoder ] && encoder=(); done
python3 benchmarks/gpu/e2e.py "${encoder[@]}" --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
