# Sourced by the GPU scripts: installs .gpu_pack (benchmarks/gpu/pack_wheels.sh: Ray, MLflow and their pure-Python
# dependencies for the GPU image's Python) into a private folder and puts it and the repository on PYTHONPATH.
OUT=${OUT:-$PWD/e2e-out}
SITE=${SITE:-/tmp/ee-site}
PACK=${PACK:-.gpu_pack}
mkdir -p "$OUT" "$SITE"
[ -f "$PACK/site.tar.xz" ] || { echo "no $PACK: run benchmarks/gpu/pack_wheels.sh first" >&2; exit 2; }
start=$(date +%s)
tar -C "$SITE" -xJf "$PACK/site.tar.xz"
echo "pack installed in $(( $(date +%s) - start )) s"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi -L
python3 -c "import ray, mlflow, optuna, torch, transformers; print('ray', ray.__version__, 'mlflow', mlflow.__version__,
'optuna', optuna.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
