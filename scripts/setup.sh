#!/usr/bin/env bash
# Create .venv and install the project with every extra. Installs the CPU build of torch first, so that the
# `torch>=2.3` requirement is already met and pip never pulls a multi-GB CUDA build (GPU users: install the
# torch build for your CUDA first, then run this script; it keeps an installed torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[pipeline,demo,int8,openvino,dev]"
