"""Helpers of the scoring tests: input files, one scoring run, its committed outputs."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.pipeline import run_scoring

# one MLflow store for every scoring test's runs (set per session by tests/pipelines/conftest.py): a new
# sqlite store costs about a second and a half to create; tests that read runs filter them by the model's tag
TRACKING_URI: str | None = None
AWKWARD = ["hello world", None, "", "   \n", "money " * 20_000, "😀 emoji only 🎉", "the film was good"]


def write(path, texts, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string()), **extra}), path)
    return path


def score(model_dir, input_path, output, tmp_path, **kw):
    """One scoring run; fp32 unless `precision` is given, so results do not depend on the test machine's CPU
    (`auto` is tested on its own); one actor unless `actors` is given (each actor process is seconds of
    imports on 2 cores; the default pool is run by the job tests and the score_pool smoke test)."""
    kw.setdefault("precision", "fp32")
    kw.setdefault("actors", 1)
    kw.setdefault("tracking_uri", TRACKING_URI or f"sqlite:///{tmp_path}/mlflow.db")
    config = ScoreConfig.from_flags(
        model=model_dir, input=str(input_path), output=str(output), batch_size=16, **kw
    )
    return run_scoring(config).to_dict()  # as the job prints it


def read_outputs(summary) -> dict[str, pa.Table]:
    """Committed outputs by their path below the run's folder (the input layout, mirrored)."""
    root = Path(summary["output"])
    return {
        p.relative_to(root).as_posix(): pq.read_table(p)
        for p in sorted(root.rglob("*.parquet"))
        if not p.relative_to(root).parts[0].startswith("_")
    }


def rows_by_output(summary) -> dict[str, int]:
    return {name: table.num_rows for name, table in read_outputs(summary).items()}


def scoring_runs(model_dir, **search):
    """The MLflow scoring runs of the model at `model_dir` in the tests' store, as `mlflow.search_runs`."""
    import mlflow

    mlflow.set_tracking_uri(TRACKING_URI)
    return mlflow.search_runs(
        experiment_names=["early-exit-scoring"], filter_string=f"tags.model = '{model_dir}'", **search
    )
