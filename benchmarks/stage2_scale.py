"""Stage 2 on large unlabeled corpora: wall time and peak memory of `jobs/train.py` as the corpus grows.

For each N: an unlabeled corpus of N BBC paragraphs of the training articles only (their paragraphs repeated,
each round in a new seeded order; never dev or test text), then `jobs/train.py` (quick profile) with
`data.unlabeled_path=<corpus> data.max_unlabeled_rows=N` in a subprocess, the peak RSS and PSS of its whole
process tree (driver + Ray) sampled every 0.5 s (PSS counts the object store's shared pages once). Reports per
N: the job's wall time, stage 2's (its MLflow child run), the feature extraction's share of it, the store's
size, peak memory, and test accuracy / share of the oracle's speed-up. Flat memory = the peak does not grow
with N.

    python benchmarks/stage2_scale.py --rows 10000 50000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu.e2e import stage_runs  # noqa: E402
from benchmarks.score_throughput import process_tree_memory  # noqa: E402


def training_paragraphs(rows: int, destination: Path) -> Path:
    """`rows` paragraphs of the default split's training articles, repeated in new orders."""
    from pipelines.config import DataConfig
    from pipelines.data import default_unlabeled_corpus, load_labeled_splits

    data = DataConfig()
    texts = pq.read_table(default_unlabeled_corpus(load_labeled_splits(data).train, data))["text"]
    rounds = -(-rows // len(texts))
    order = np.concatenate([np.random.default_rng(r).permutation(len(texts)) for r in range(rounds)])[:rows]
    path = destination / f"paragraphs-{rows}.parquet"
    pq.write_table(pa.table({"text": texts.take(pa.array(order))}), path, row_group_size=4096)
    return path


def train_with(rows: int, scratch: Path, extra: list[str]) -> dict:
    corpus = training_paragraphs(rows, scratch)
    work = scratch / f"run-{rows}"
    work.mkdir()
    tracking_uri = f"sqlite:///{work}/mlflow.db"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        "--set",
        f"data.unlabeled_path={corpus}",
        "--set",
        f"data.max_unlabeled_rows={rows}",
        "--set",
        f"resources.storage_path={work / 'ray_results'}",
        "--output",
        str(work / "summary.json"),
        *extra,
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    with open(work / "log", "w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        peak_rss = peak_pss = 0
        while process.poll() is None:
            rss, pss = process_tree_memory(process.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.5)
    if process.returncode != 0:
        raise SystemExit(f"jobs/train.py failed for {rows} rows; see {work / 'log'}")
    summary = json.loads((work / "summary.json").read_text())
    stages = stage_runs(tracking_uri, summary["run_id"])
    return {
        "unlabeled_rows": rows,
        "job_seconds": round(time.perf_counter() - start, 1),
        "stage1_seconds": stages["stage1"]["seconds"],
        "stage2_seconds": stages["stage2"]["seconds"],
        "feature_extraction_seconds": stages["stage2"].get("feature_extraction_seconds"),
        "feature_store_mib": round(stages["stage2"].get("feature_store_bytes", 0) / 2**20, 1),
        "peak_rss_mib": round(peak_rss / 2**20, 1),
        "peak_pss_mib": round(peak_pss / 2**20, 1),
        "test_accuracy": summary["test_accuracy"],
        "knob": summary["knob"],
        "layer_speedup": summary["layer_speedup"],
        "share_of_oracle_speedup": summary["share_of_oracle_speedup"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra jobs/train.py --set")
    parser.add_argument("--out", default="benchmarks/results/stage2_scale.json")
    args = parser.parse_args()
    extra = [item for s in args.sets for item in ("--set", s)]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for rows in args.rows:
            results.append(train_with(rows, Path(scratch), extra))
            print(json.dumps(results[-1]), flush=True)
    print(
        "\n| unlabeled rows | job s | stage 2 s | extraction s | store MiB | peak RSS MiB | peak PSS MiB "
        "| test acc | share of oracle |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['unlabeled_rows']} | {r['job_seconds']} | {r['stage2_seconds']} | "
            f"{r['feature_extraction_seconds']} | {r['feature_store_mib']} | {r['peak_rss_mib']} | "
            f"{r['peak_pss_mib']} | {r['test_accuracy']} | {r['share_of_oracle_speedup']} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
