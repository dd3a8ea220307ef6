"""build_trainer: the one place a TorchTrainer is configured (training and tuning both call it)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.config import ResourcesConfig
from pipelines.training.worker_loop import WorkerConfig, train_loop_per_worker


def storage_uri(resources: ResourcesConfig) -> str:
    """Absolute local path (workers run in other directories) or a pyarrow URI unchanged."""
    path = resources.storage_path
    return path if "://" in path else str(Path(path).resolve())


def build_trainer(
    worker_config: WorkerConfig,
    datasets: dict[str, ray.data.Dataset],
    resources: ResourcesConfig,
    name: str,
    callbacks: list[Any] | None = None,
) -> TorchTrainer:
    """A TorchTrainer for one stage: N workers (gloo on CPU, NCCL on GPU), only "train" split across them,
    the best checkpoint by dev_score kept, worker crashes resumed from the last checkpoint."""
    scaling = ScalingConfig(
        num_workers=resources.num_workers,
        use_gpu=resources.use_gpu,
        resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
        placement_strategy=resources.placement_strategy,
    )
    run = RunConfig(
        name=name,
        storage_path=storage_uri(resources),
        failure_config=FailureConfig(max_failures=resources.max_failures),
        checkpoint_config=CheckpointConfig(
            num_to_keep=2, checkpoint_score_attribute="dev_score", checkpoint_score_order="max"
        ),
        callbacks=callbacks,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(worker_config)
        | {"init_checkpoint": worker_config.init_checkpoint},
        scaling_config=scaling,
        run_config=run,
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
