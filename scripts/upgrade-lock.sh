#!/usr/bin/env bash
# Move the lock to the newest releases: install everything unpinned into a new venv, write
# requirements/lock-py<X.Y>.txt from it, and run the suite there. Commit the lock when the suite passes;
# when it fails, `git diff requirements/` shows what moved and `git checkout requirements/` keeps the old one.
#   bash scripts/upgrade-lock.sh                 (PYTHON=python3.12 bash scripts/upgrade-lock.sh: another Python)
# torch stays at TORCH_VERSION (default the lock's): a new torch is a decision of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
version=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
lock="requirements/lock-py$version.txt"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
torch=${TORCH_VERSION:-$( [ -f "$lock" ] && sed -n 's/^torch==\([^+ ;]*\).*/\1/p' "$lock" )}
VENV="$scratch/venv" EE_UNPINNED=1 TORCH_VERSION=${torch:-2.13.0} PYTHON="$PYTHON" bash scripts/setup.sh
{
  echo "# Every package scripts/setup.sh installs (Python $version, $(uname -m), the CPU build of torch), as pip"
  echo "# constraints; written by scripts/upgrade-lock.sh on $(date -u +%F), which ran the suite on it. Not by hand."
  "$scratch/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v -i "^early-exit-pipeline"
} > "$lock"
echo "wrote $lock; running the suite on it"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_AUTH_MODE=disabled
"$scratch/venv/bin/python" -m pytest -q
echo "the suite passed on $lock: commit it"
