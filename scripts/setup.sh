#!/usr/bin/env bash
# Create .venv (or $VENV) and install the project with every extra, at the versions CI last passed with:
# requirements/lock-py<X.Y>.txt for this Python (pip constraints; scripts/upgrade-lock.sh rewrites it).
# EE_UNPINNED=1, or a Python without a lock, installs the newest releases the ranges in pyproject.toml allow.
#
# torch: the CPU build is installed first (the locked version), so that `torch>=2.3` is already met and pip
# never pulls a multi-GB CUDA build; where pip finds only CUDA builds, point it at the CPU wheels first
# (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu). An installed torch is kept, whatever its build
# (GPU users: install the torch for your CUDA first, then run this script): the lock's torch line is then
# left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS="pipeline,demo,int8,openvino,dev"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
version=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
lock="requirements/lock-py$version.txt"
has_torch() { "$VENV/bin/python" -c "import torch" 2>/dev/null; }
locked() { sed -n "s/^$1==\([^ ;]*\).*/\1/p" "$lock"; }  # a package's version in the lock

if [ -z "${EE_UNPINNED:-}" ] && [ -f "$lock" ]; then
  "${pip[@]}" install -q "pip==$(locked pip)"
  has_torch || "${pip[@]}" install -q "torch==${TORCH_VERSION:-$(locked torch | sed 's/+.*//')}"
  constraints="$VENV/constraints.txt"  # the lock without torch: the torch installed now is kept
  grep -v -i "^torch==" "$lock" > "$constraints"
  "${pip[@]}" install -q -c "$constraints" -e ".[$EXTRAS]"
else
  [ -n "${EE_UNPINNED:-}" ] || echo "no $lock: installing the newest releases (scripts/upgrade-lock.sh writes one)"
  "${pip[@]}" install -q --upgrade pip
  has_torch || "${pip[@]}" install -q "torch==${TORCH_VERSION:-2.13.0}"
  "${pip[@]}" install -q -e ".[$EXTRAS]"
fi
