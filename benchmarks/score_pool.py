"""The scoring job's default actor pool against one actor: `jobs/score.py` with no pool flags vs `--actors 1`.

Writes --rows unseen BBC texts (`common.unseen_bbc`) into --files parquet files and scores them with
`jobs/score.py` as a user runs it (a fresh process and a new local Ray each time, --precision as given: `auto`
by default), once with no pool flags (an autoscaling pool sized from the machine's CPUs) and once with
`--actors 1`; then with `--actors 1 --cpus-per-actor N` (one wide actor, N = the machine's CPUs), so many
narrow actors and one wide one are compared on the same machine. Prints end-to-end and steady rows/s of each
and the ratios.

    python benchmarks/score_pool.py --model /path/to/quick/model --rows 10000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]

from common import run_score_job, unseen_bbc  # noqa: E402


def score(model: str, inputs: Path, output: Path, scratch: Path, precision: str, *flags: str) -> dict:
    seconds, data = run_score_job(model, inputs, output, scratch, "--precision", precision, *flags)
    return {
        "flags": " ".join(flags) or "(none)",
        "actors": data["actors"],
        "precision": data["precision"],
        "process_s": round(seconds, 1),
        "rows_per_s": data["rows_per_s"],
        "steady_rows_per_s": data["steady_rows_per_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a saved early-exit model directory or models:/ URI")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--precision", default="auto", help="as jobs/score.py takes it; every run")
    args = parser.parse_args()
    cpus = str(os.cpu_count())
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        texts = pq.read_table(unseen_bbc(scratch, args.rows))["text"].to_pylist()
        inputs = scratch / "in"
        inputs.mkdir()
        per_file = -(-len(texts) // args.files)
        for f in range(args.files):
            chunk = texts[f * per_file : (f + 1) * per_file]
            pq.write_table(pa.table({"text": chunk}), inputs / f"part-{f:03d}.parquet")
        job = (args.model, inputs)
        wide = ("--actors", "1", "--cpus-per-actor", cpus)  # one actor as wide as the machine
        runs = [
            score(*job, scratch / "out-default", scratch, args.precision),
            score(*job, scratch / "out-one", scratch, args.precision, "--actors", "1"),
            score(*job, scratch / "out-wide", scratch, args.precision, *wide),
        ]
    for run in runs:
        print(json.dumps(run), flush=True)
    default, one = runs[0], runs[1]
    print(
        json.dumps(
            {
                "default_over_one_actor": round(default["rows_per_s"] / one["rows_per_s"], 2),
                "default_over_one_actor_steady": round(
                    default["steady_rows_per_s"] / one["steady_rows_per_s"], 2
                ),
                "narrow_over_wide": round(default["rows_per_s"] / runs[2]["rows_per_s"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
