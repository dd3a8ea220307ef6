"""A scheduled rerun with nothing to do: how long `jobs/score.py` takes when every input is already scored.

Writes `--files` small parquet files (`--rows-per-file` unseen BBC texts each), then runs `jobs/score.py` as a
scheduler does, a fresh process each time, on the same output folder: the first run scores everything, the
rerun finds every output current in the manifest and answers without starting Ray or the actor pool. Prints
both wall times (process start to exit) and their ratio.

    python benchmarks/noop_rerun.py --model /path/to/quick/model --files 500
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from int8_throughput import unseen_bbc  # noqa: E402
from score_job import run_score_job  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a saved early-exit model directory or models:/ URI")
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--rows-per-file", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        texts = pq.read_table(unseen_bbc(scratch, args.files * args.rows_per_file))["text"].to_pylist()
        inputs = scratch / "in"
        inputs.mkdir()
        for f in range(args.files):
            chunk = texts[f * args.rows_per_file : (f + 1) * args.rows_per_file]
            pq.write_table(pa.table({"text": chunk}), inputs / f"part-{f:05d}.parquet")
        first, scored = run_score_job(args.model, inputs, scratch / "out", scratch)
        again, skipped = run_score_job(args.model, inputs, scratch / "out", scratch)
    result = {
        "files": args.files,
        "rows": args.files * args.rows_per_file,
        "first_run_s": round(first, 1),
        "first_run_files_scored": scored["files_scored"],
        "rerun_s": round(again, 1),
        "rerun_files_skipped": skipped["files_skipped"],
        "rerun_share_of_first": round(again / first, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
