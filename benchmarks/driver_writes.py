"""How many scored rows per second one scoring driver can write: its ceiling, with no model in the way.

`jobs/score.py` streams every scored row through the driver, which splits batches by input file, writes each
file's output and commits it (pipelines.scoring.pipeline.score_stream). Here the same `score_stream` consumes
rows that already carry the scorer's columns (BBC paragraphs with label, confidence, exit_layer, flops,
tokens, error), read by Ray Data from --files parquet files, so the rate is the driver's own ceiling (plus Ray
Data's read and transfer). Compare it with what the scoring actors can produce (rows/s of `jobs/score.py` or
benchmarks/gpu/e2e.sh): if it is well above, one driver keeps up.

    python benchmarks/driver_writes.py --rows 400000 --files 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def scored_corpus(directory: Path, rows: int, files: int) -> list[str]:
    from pipelines.bbc import read_bbc_articles, split_paragraphs

    texts = split_paragraphs(read_bbc_articles())["text"]
    rng = np.random.default_rng(0)
    paths = []
    per_file = rows // files
    for part in range(files):
        index = rng.integers(0, len(texts), size=per_file)
        table = pa.table(
            {
                "text": texts.take(pa.array(index)),
                "label": pa.array(rng.choice(["business", "sport", "tech"], size=per_file)),
                "confidence": pa.array(rng.random(per_file, dtype=np.float32)),
                "exit_layer": pa.array(rng.integers(1, 7, size=per_file, dtype=np.int32)),
                "flops": pa.array(rng.integers(10**8, 10**9, size=per_file)),
                "tokens": pa.array(rng.integers(10, 128, size=per_file, dtype=np.int32)),
                "error": pa.nulls(per_file, pa.string()),
            }
        )
        path = directory / f"part-{part}.parquet"
        pq.write_table(table, path, row_group_size=8192)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=400_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/driver_writes.json")
    args = parser.parse_args()
    import ray
    import ray.data

    from pipelines.data import streaming_parquet_reader
    from pipelines.scoring.incremental import OutputFolder, fingerprint
    from pipelines.scoring.pipeline import InputFile, Tally, score_stream

    ray.init(address="local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    with tempfile.TemporaryDirectory() as scratch:
        paths = scored_corpus(Path(scratch), args.rows, args.files)
        text_only = pa.schema([pa.field("text", pa.string())])
        pending = {
            str(Path(p).resolve()): InputFile(
                p, pq.ParquetFile(p).metadata.num_rows, text_only, Path(p).name, fingerprint(p, 0)
            )
            for p in paths
        }
        scored_schema = pq.ParquetFile(paths[0]).schema_arrow
        folder = OutputFolder(Path(scratch) / "out")
        folder.prepare()
        with streaming_parquet_reader(preserve_order=True):
            dataset = ray.data.read_parquet(paths, include_paths=True, num_cpus=0)
        tally = Tally()
        start = time.perf_counter()
        committed = score_stream(dataset, pending, folder, lambda _item: scored_schema, tally, {})
        seconds = time.perf_counter() - start
    rows = sum(item.rows for item in pending.values())
    assert committed == args.files and tally.rows == rows
    record = {
        "rows": rows,
        "files": args.files,
        "cpus": os.cpu_count(),
        "seconds": round(seconds, 2),
        "driver_rows_per_s": round(rows / seconds, 1),
        "driver_busy_share": round(tally.driver_seconds / seconds, 3),
        "busy_rows_per_s": round(rows / tally.driver_seconds, 1),
    }
    print(json.dumps(record), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
