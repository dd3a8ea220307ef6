"""A 3-trial Bayesian learning-rate search on a tiny model with real Ray, feeding stage 2 without
retraining."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.jobs.test_train_job import run_job

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_three_trial_search_picks_the_best_trial_and_stage2_starts_from_it(
    tmp_path, labeled_parquet, tiny_encoder_dir
):
    summary = run_job(
        tmp_path,
        "--tune",
        "--encoder",
        tiny_encoder_dir("bert", num_layers=3),
        "--train-path",
        labeled_parquet,
        "--unlabeled-path",
        "",
        "--set",
        "tune.num_samples=3",
        "--set",
        "tune.lr_min=1e-4",
        "--set",
        "tune.lr_max=1e-2",
        "--set",
        "stage1.epochs=2",
        "--set",
        "stage2.learning_rate=1e-2",
        "--set",  # nothing timed: the search is under test
        "eval.wallclock_rows=0",
    )
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    trials = [r for r in children if r.info.run_name.startswith("tune-")]
    assert len(trials) == 3
    assert {r.info.run_name for r in children} - {r.info.run_name for r in trials} == {"stage2"}
    best_of = {}
    for run in trials:
        history = client.get_metric_history(run.info.run_id, "stage1_dev_score")
        assert history, run.info.run_name
        best_of[run.data.params["trial"]] = (
            max(m.value for m in history),
            float(run.data.params["learning_rate"]),
        )
    assert len({lr for _, lr in best_of.values()}) == 3  # three different learning rates were tried
    best_trial = max(best_of, key=lambda t: best_of[t][0])
    assert float(parent.data.params["tune.best_learning_rate"]) == pytest.approx(best_of[best_trial][1])
    stage2 = next(r for r in children if r.info.run_name == "stage2")
    init = Path(stage2.data.tags["init_checkpoint"])
    assert (
        init.parent == tmp_path / "ray_results" / f"ee-{parent.info.run_id[:12]}-{best_trial}"
    )  # its own run
    assert (init / "model" / "model.safetensors").is_file()
    assert summary["registered"]["version"] == 1
