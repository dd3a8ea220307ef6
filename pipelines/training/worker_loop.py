"""The Ray Train worker loop for stage 1, stage 2 and joint training (worker side only).

Each worker: builds or loads the model (tokenizer once per worker), wraps it with Ray's `prepare_model`
(DDP: NCCL on GPU, gloo on CPU), streams its shard of the "train" dataset, and reports dev metrics with a
checkpoint every `checkpoint_every_steps` steps and at each epoch end. After a worker crash Ray restarts the
group and `ray.train.get_checkpoint()` hands back the last checkpoint: the run resumes from it (the
interrupted epoch's data is replayed from the epoch's start, with the weights and optimizer of the
checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from ee_model import EarlyExitClassifier
from ee_model.io import load_weights, unwrap
from pipelines.evaluation.passes import autocast_dtype, exit_logits, per_layer_accuracy
from pipelines.tracking import StepLogger
from pipelines.training.stages import TrainingStage, stage_named
from pipelines.training.steps import TrainState, optimizer_for, run_stage_loop

MODEL_SUBDIR = "model"
STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
LOG_EVERY_STEPS = 10


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs, passed as Ray Train's train_loop_config (plain data)."""

    stage: str
    stage_config: dict[str, Any]
    labels: tuple[str, ...]
    encoder: str
    model_options: dict[str, Any]  # EarlyExitConfig fields: head_type, pooling, variant, max_length, ...
    total_steps: int
    seed: int = 0
    init_checkpoint: Any = None  # ray.train.Checkpoint of the previous stage (stage 2 starts from stage 1)
    encoder_revision: str | None = None
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    torch_threads: int | None = None


def build_model(spec: WorkerConfig) -> EarlyExitClassifier:
    if spec.init_checkpoint is not None:
        with spec.init_checkpoint.as_directory() as directory:
            return EarlyExitClassifier.from_pretrained(Path(directory) / MODEL_SUBDIR)
    return EarlyExitClassifier.from_encoder(
        spec.encoder, labels=list(spec.labels), revision=spec.encoder_revision, **spec.model_options
    )


def dev_metrics(model: torch.nn.Module, stage: TrainingStage, device: torch.device) -> dict[str, float]:
    """Per-exit dev accuracy on rank 0, shared with every rank; dev_score (`TrainingStage.dev_score`) selects
    the best checkpoint."""
    payload: list[Any] = [None]
    if ray.train.get_context().get_world_rank() == 0:
        batches = ray.train.get_dataset_shard("dev").iter_batches(batch_size=64, batch_format="numpy")
        recorded = exit_logits(model, batches, device)
        accuracy = per_layer_accuracy(recorded.logits, recorded.labels)
        payload[0] = {
            "dev_score": stage.dev_score(accuracy),
            "dev_accuracy": accuracy[-1],
            **{f"dev_accuracy_layer_{i + 1}": a for i, a in enumerate(accuracy)},
        }
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(payload, src=0)
    return payload[0]


def report(
    model,
    optimizer,
    scheduler,
    state: TrainState,
    stage: TrainingStage,
    device: torch.device,
    logger: StepLogger | None,
) -> None:
    metrics = {**dev_metrics(model, stage, device), "epoch": state.epoch, "step": state.step}
    if logger is not None:
        for key, value in metrics.items():
            if key.startswith("dev_"):
                logger.log(f"{stage.name}_{key}", value, state.step)
        logger.flush()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            unwrap(model).save_pretrained(Path(directory) / MODEL_SUBDIR)
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                Path(directory) / OPTIMIZER_FILE,
            )
            (Path(directory) / STATE_FILE).write_text(json.dumps(dataclasses.asdict(state)))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def restore(model, optimizer, scheduler) -> TrainState:
    """Resume after a failure from the last reported checkpoint of this run, if there is one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as directory:
        load_weights(unwrap(model), Path(directory) / MODEL_SUBDIR)
        saved = torch.load(Path(directory) / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        saved = json.loads((Path(directory) / STATE_FILE).read_text())
        return TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})


def placement_tags(device: torch.device) -> dict[str, str]:
    """Where this worker group really ran, for the stage's MLflow run (rank 0 writes them)."""
    backend = dist.get_backend() if dist.is_available() and dist.is_initialized() else "none"
    return {
        "worker.device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "worker.dist_backend": backend,
        "worker.world_size": str(ray.train.get_context().get_world_size()),
        "worker.autocast": str(autocast_dtype(device) or "off").removeprefix("torch."),
    }


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = WorkerConfig(**config)
    stage = stage_named(spec.stage)
    stage_config = stage.config_type(**spec.stage_config)
    if spec.torch_threads:
        torch.set_num_threads(spec.torch_threads)
    context = ray.train.get_context()
    torch.manual_seed(spec.seed + context.get_world_rank())
    model = build_model(spec)
    if stage.freezes_backbone:
        model.freeze_for_stage2()
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    optimizer, scheduler = optimizer_for(model, stage_config, spec.total_steps)
    state = restore(model, optimizer, scheduler)
    logger = StepLogger(spec.tracking_uri, spec.mlflow_run_id) if context.get_world_rank() == 0 else None
    if logger is not None:
        logger.tags(placement_tags(device))
    if logger is not None and state.step > 0:  # a worker group restarted after a failure
        logger.log("resumed_from_step", state.step, state.step, flush=True)
    shard = ray.train.get_dataset_shard("train")

    def batches_of_epoch(epoch: int):
        return shard.iter_batches(
            batch_size=stage_config.batch_size_per_worker,
            batch_format="numpy",
            local_shuffle_buffer_size=1024,
            local_shuffle_seed=spec.seed + epoch,
        )

    def log_loss(loss: float, step: int) -> None:
        logger.log(f"{stage.name}_loss", loss, step, flush=step % LOG_EVERY_STEPS == 0)

    run_stage_loop(
        model,
        stage,
        stage_config,
        batches_of_epoch,
        spec.total_steps,
        device,
        checkpoint=lambda state: report(model, optimizer, scheduler, state, stage, device, logger),
        state=state,
        optimizer_and_scheduler=(optimizer, scheduler),
        on_step=log_loss if logger is not None else None,
        on_epoch_end=(lambda _: logger.flush()) if logger is not None else None,
    )
