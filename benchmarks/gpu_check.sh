#!/usr/bin/env bash
# GPU checks, for a machine with CUDA and PyTorch but without Ray/MLflow (what a bare GPU box has):
#   1. tests/pipelines/test_devices.py: predict on CUDA == CPU at any batch size; stage 1 / stage 2 / joint
#      training steps under DistributedDataParallel with NCCL and bf16 autocast (plus the CPU/gloo cases);
#   2. tests/ee_model (the model library against this machine's transformers);
#   3. benchmarks/exit_speed.py on CUDA, fp32 and bf16 autocast, batch 1 .. 1024.
# usage: bash benchmarks/gpu_check.sh <encoder dir (config + tokenizer)> <parquet with a text column> <out dir>
set -uo pipefail
MODEL=$1 TEXTS=$2 OUT=$3
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/pipelines/test_devices.py tests/ee_model -rs 2>&1 | tee "$OUT/pytest.log"
for dtype in float32 bfloat16; do
  python3 benchmarks/exit_speed.py --model "$MODEL" --random-init --texts "$TEXTS" --device cuda --dtype $dtype \
    --batch-sizes 1 64 256 1024 --rows 4096 --rows-batch-1 128 --repeats 3 --out "$OUT/exit_speed_cuda_$dtype.json" \
    2>&1 | tee "$OUT/exit_speed_cuda_$dtype.log"
done
