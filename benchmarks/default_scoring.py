"""`jobs/score.py` as a user runs it, for several models or flag sets side by side in one run (issue 40's
throughput target): each scorer scores the same unseen BBC passages into a fresh output folder, the scorers
interleaved `--repeats` times; reports per scorer the median rows/s end to end (process start to exit: Ray's
start, the model's load and any calibration included) and steady (the job's own `steady_rows_per_s`), the
knob it ran, its layer speed-up, agreement of its labels with the first scorer's full depth (`--reference`)
and the summary's `promise`, then each scorer's rows/s over the first one's.

    python benchmarks/default_scoring.py --rows 20000 \\
        --scorer today=<old model>:--calibrate-rows=0 --scorer now=<new model> \\
        --scorer full-depth=<new model>:--policy=none --reference full-depth

A scorer is NAME=MODEL[:FLAG[,FLAG...]] (flags with `=` for their value, passed to jobs/score.py as given).
The rows: every distinct paragraph and sentence passage of BBC's test articles (no model of the training job
trained or certified on them), repeated in a seeded order up to --rows.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import ROOT, run_score_job, write_json
from exit_promise import bbc_test_pieces

RESULTS = ROOT / "benchmarks" / "results"


def unseen_rows(directory: Path, rows: int) -> Path:
    table = bbc_test_pieces()
    order = np.random.default_rng(0).permutation(rows) % table.num_rows
    path = directory / "input" / "unseen.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"text": table["text"].take(order), "gold": table["gold"].take(order)}), path)
    return path


def parse_scorer(spec: str) -> tuple[str, str, list[str]]:
    name, _, rest = spec.partition("=")
    model, _, flags = rest.partition(":")
    return name, model, [part for flag in flags.split(",") if flag for part in flag.split("=", 1)]


def labels_by_text(summary: dict) -> dict[str, list[str]]:
    """Every scored label of one run, per text (the input repeats texts; rows are not in input order)."""
    root = Path(summary["output"])
    out: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.parquet")):
        if not path.relative_to(root).parts[0].startswith("_"):
            table = pq.read_table(path, columns=["text", "label"])
            for text, label in zip(table["text"].to_pylist(), table["label"].to_pylist(), strict=True):
                out.setdefault(text, []).append(label)
    return out


def agreement(labels: dict[str, list[str]], reference: dict[str, list[str]]) -> float:
    """The share of rows whose label equals the reference's most frequent label for that text."""
    majority = {text: max(set(found), key=found.count) for text, found in reference.items()}
    pairs = [label == majority[text] for text, found in labels.items() for label in found]
    return float(np.mean(pairs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scorer", action="append", required=True, help="NAME=MODEL[:FLAG,...]")
    parser.add_argument("--reference", default=None, help="the scorer whose labels agreement is measured on")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "default_scoring"))
    args = parser.parse_args()
    scorers = [parse_scorer(spec) for spec in args.scorer]
    results: dict[str, list[dict]] = {name: [] for name, _, _ in scorers}
    labels: dict[str, dict[str, list[str]]] = {}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        inputs = unseen_rows(scratch, args.rows)
        for repeat in range(args.repeats):
            for name, model, flags in scorers:
                output = scratch / f"out-{name}-{repeat}"
                seconds, summary = run_score_job(model, inputs.parent, output, scratch, *flags)
                results[name].append({"seconds": seconds, **summary})
                labels.setdefault(name, labels_by_text(summary))
                print(f"{name} #{repeat}: {seconds:.1f} s, {summary['rows_per_s']} rows/s", flush=True)
    reference = labels[args.reference or scorers[0][0]]
    rows = []
    first = None
    for name, _, flags in scorers:
        runs = results[name]
        wall = statistics.median(args.rows / r["seconds"] for r in runs)
        first = first or wall
        row = {
            "scorer": name,
            "flags": " ".join(flags),
            "rows_per_s_process": round(wall, 1),
            "steady_rows_per_s": round(statistics.median(r["steady_rows_per_s"] or 0 for r in runs), 1),
            "ratio_to_first": round(wall / first, 3),
            "knob": runs[0]["knob"],
            "layer_speedup": runs[0]["layer_speedup"],
            "precision": runs[0]["precision"],
            "agreement_with_reference": round(agreement(labels[name], reference), 4),
            "promise": runs[0]["promise"],
        }
        rows.append(row)
    lines = [
        "| scorer | flags | rows/s (process) | steady rows/s | vs first | knob | layer speed-up | precision "
        "| agreement | promise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ] + [
        f"| {r['scorer']} | {r['flags']} | {r['rows_per_s_process']} | {r['steady_rows_per_s']} | "
        f"{r['ratio_to_first']}x | {r['knob']} | {r['layer_speedup']} | {r['precision']} | "
        f"{r['agreement_with_reference']} | {r['promise'][:160]} |"
        for r in rows
    ]
    table = "\n".join(lines)
    write_json(f"{args.out}.json", {"rows": args.rows, "repeats": args.repeats, "scorers": rows,
                                     "runs": results, "finished": time.time()})  # fmt: skip
    Path(f"{args.out}.md").write_text(table + "\n")
    print(f"\n{table}\nwritten: {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
