#!/usr/bin/env bash
# The pipeline end to end on a GPU machine that has PyTorch but not Ray or MLflow (what the device machine has):
# installs .gpu_pack (benchmarks/gpu/pack_wheels.sh) into a private folder, then runs benchmarks/gpu/e2e.py:
# jobs/train.py --use-gpu (stage 1, stage 2, registration; sqlite MLflow) and jobs/score.py --gpus-per-actor 1
# over 50,000 BBC paragraphs with early exit and at full depth. Logs and JSON results go to $OUT (or ./e2e-out).
# usage (repository root):  bash benchmarks/gpu/e2e.sh [extra e2e.py arguments]
# on CPU, to check the same path:  bash benchmarks/gpu/e2e.sh --cpu --encoder tiny --rows 2000
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/e2e-out}
SITE=${SITE:-/tmp/ee-site}
PACK=${PACK:-.gpu_pack}
mkdir -p "$OUT" "$SITE"
[ -f "$PACK/site.tar.xz" ] || { echo "no $PACK: run benchmarks/gpu/pack_wheels.sh first" >&2; exit 2; }
start=$(date +%s)
tar -C "$SITE" -xJf "$PACK/site.tar.xz"
echo "pack installed in $(( $(date +%s) - start )) s"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import ray, mlflow, optuna, torch, transformers; print('ray', ray.__version__, 'mlflow', mlflow.__version__,
'optuna', optuna.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
encoder=(--encoder "$PACK/minilm")
for a in "$@"; do [ "$a" = --encoder ] && encoder=(); done
python3 benchmarks/gpu/e2e.py "${encoder[@]}" --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log"
