"""Bayesian learning-rate search of the first training stage with Ray Tune + Optuna; the best trial's
checkpoint is the stage-1 (KL) or joint (Count) result, so nothing is retrained.

Train V2 inside Tune: a function trainable builds the TorchTrainer with the shared `build_trainer` and fits
it;
`TuneReportCallback` forwards Train's reports (with `checkpoint_path`) to Tune. No ASHA: early stopping of
trials with Train inside leaked placement groups (ray-project/ray#54305) and that fix is unverified here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import mlflow
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch

from pipelines.config import TrainConfig
from pipelines.tracking import start_child_run
from pipelines.training.trainer import build_trainer, storage_uri
from pipelines.training.worker_loop import WorkerConfig


def concurrent_trials(config: TrainConfig) -> int:
    """Trials that fit side by side: each takes its Train workers' CPUs (GPUs), and Ray Data keeps 1 CPU."""
    if config.tune.max_concurrent_trials:
        return config.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    if config.resources.use_gpu:
        fit = resources.get("GPU", 0) // max(config.resources.num_workers, 1)
    else:
        per_trial = max(config.resources.num_workers, 1) * config.resources.cpus_per_worker
        fit = (resources.get("CPU", 1) - 1) // per_trial
    return int(max(1, min(fit, config.tune.num_samples)))


def make_sampler(config: TrainConfig):
    import optuna

    if config.tune.sampler == "gp":
        return optuna.samplers.GPSampler(seed=config.tune.seed)
    return optuna.samplers.TPESampler(seed=config.tune.seed)


def tune_first_stage(
    config: TrainConfig,
    worker_base: dict[str, Any],
    datasets: dict,
    parent_run_id: str,
    tracking_uri: str,
) -> Checkpoint:
    """Search the learning rate; return the best trial's best checkpoint. The best learning rate and every
    trial's best dev score go to the parent MLflow run (`tune.best_learning_rate`, `tune/trials.json`)."""
    stage = config.stages()[0]
    # resolved here: trials run in their own directories, where a relative storage path would land inside them
    resources = dataclasses.replace(config.resources, storage_path=storage_uri(config.resources))

    def trainable(search: dict[str, Any]) -> None:
        mlflow.set_tracking_uri(tracking_uri)
        trial = tune.get_context().get_trial_name()
        child = start_child_run(parent_run_id, f"tune-{trial}")
        stage_config = dataclasses.replace(getattr(config, stage), learning_rate=search["learning_rate"])
        worker = WorkerConfig(**{**worker_base, "stage_config": vars(stage_config), "mlflow_run_id": child})
        with mlflow.start_run(run_id=child):
            mlflow.log_params({"learning_rate": search["learning_rate"], "trial": trial, "stage": stage})
            build_trainer(
                worker,
                datasets,
                resources,
                name=f"ee-{parent_run_id[:12]}-{trial}",
                callbacks=[TuneReportCallback()],
            ).fit()

    searcher = OptunaSearch(metric="dev_score", mode="max", sampler=make_sampler(config))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.01}),  # the trial driver; its Train workers reserve the rest
        param_space={"learning_rate": tune.loguniform(config.tune.lr_min, config.tune.lr_max)},
        tune_config=tune.TuneConfig(
            metric="dev_score",
            mode="max",
            search_alg=searcher,
            num_samples=config.tune.num_samples,
            max_concurrent_trials=concurrent_trials(config),
        ),
        run_config=tune.RunConfig(
            name=f"ee-{parent_run_id[:12]}-tune", storage_path=storage_uri(config.resources)
        ),
    )
    grid = tuner.fit()
    errors = [str(r.error) for r in grid if r.error is not None]
    if len(errors) == len(grid):
        raise RuntimeError(f"every tuning trial failed; first error: {errors[0]}")
    best = grid.get_best_result(metric="dev_score", mode="max", scope="all")
    trials = [
        {"learning_rate": float(r.config["learning_rate"]), "best_dev_score": best_dev_score(r)}
        for r in grid
        if r.error is None
    ]
    best_lr = float(best.config["learning_rate"])
    mlflow.log_params({"tune.best_learning_rate": best_lr, "tune.trials": len(grid)})
    mlflow.log_dict({"trials": trials, "best_learning_rate": best_lr}, "tune/trials.json")
    return best_checkpoint(best)


def best_dev_score(result: Any) -> float:
    history = result.metrics_dataframe
    return float(history["dev_score"].max()) if history is not None and len(history) else math.nan


def best_checkpoint(result: Any) -> Checkpoint:
    """The best trial's best checkpoint: its report with the highest dev_score (Train keeps that one)."""
    history = result.metrics_dataframe
    if history is None or "checkpoint_path" not in history or not len(history):
        raise RuntimeError("the best tuning trial reported no checkpoint")
    return Checkpoint(history.loc[history["dev_score"].idxmax(), "checkpoint_path"])
