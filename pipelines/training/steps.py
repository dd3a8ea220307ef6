"""A training stage's loop and its optimizer steps on one worker (no Ray here: the Ray Train worker and the
benchmarks run the same loop).

A batch is a dict with "text" (sequence of str) and "label_id" (int array; -100 = unlabeled), or, for stage 2
from cached features (pipelines.training.features), "student_features" and "teacher_logits" instead of "text".
Ray code only turns dataset shards into such iterables; tests feed plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.evaluation.passes import autocast_for, encode
from pipelines.feature_batches import features_of, has_features

if TYPE_CHECKING:
    from pipelines.config import StageConfig
    from pipelines.training.stages import LossFn, TrainingStage


def optimizer_for(
    model: torch.nn.Module, stage_config: StageConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, Any]:
    """A stage's optimizer (AdamW over the trainable parameters) and its linear warm-up/decay schedule."""
    from transformers import get_linear_schedule_with_warmup

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=stage_config.learning_rate, weight_decay=stage_config.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(stage_config.warmup_ratio * total_steps), max(total_steps, 1)
    )
    return optimizer, scheduler


def train_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    stage: TrainingStage,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
) -> float | None:
    """One optimizer step; None when the batch has nothing this stage can learn from."""
    labels = torch.tensor(np.array(batch["label_id"]), dtype=torch.long, device=device)
    keep = labels != -100
    if not stage.learns_from_unlabeled and not bool(keep.all()):
        raise ValueError(f"{stage.name} needs a gold label on every row")
    if has_features(batch):  # stage 2 from cached features: only the student heads run
        features, teacher = features_of(batch, device)
        with autocast_for(device):
            out = model(student_features=features, teacher_logits=teacher)
            loss = loss_fn(out.logits, labels)
    else:
        inputs = encode(model, batch, device)
        with autocast_for(device):  # a frozen backbone (freeze_for_stage2) runs without autograd
            out = model(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
            loss = loss_fn(out.logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken


def run_stage_loop(
    model: torch.nn.Module,
    stage: TrainingStage,
    stage_config: StageConfig,
    batches_of_epoch: Callable[[int], Iterable[dict[str, Any]]],
    total_steps: int,
    device: torch.device,
    checkpoint: Callable[[TrainState], None],
    state: TrainState | None = None,
    optimizer_and_scheduler: tuple[torch.optim.Optimizer, Any] | None = None,
    on_step: Callable[[float, int], None] | None = None,
    on_epoch_end: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Train `model` through `stage_config.epochs` epochs of `batches_of_epoch(epoch)`, at most `total_steps`
    optimizer steps; `checkpoint(state)` every `checkpoint_every_steps` steps and at each epoch end (once per
    step). Resumes from `state` (epochs and steps done) with the given optimizer and scheduler (default
    fresh ones, `optimizer_for`)."""
    state = state or TrainState()
    optimizer, scheduler = optimizer_and_scheduler or optimizer_for(model, stage_config, total_steps)
    loss_fn = stage.loss(stage_config)
    model.train()
    while state.epoch < stage_config.epochs and state.step < total_steps:
        last_checkpoint = -1
        for batch in batches_of_epoch(state.epoch):
            loss = train_step(model, batch, stage, loss_fn, optimizer, scheduler, device)
            if loss is None:
                continue
            state.step += 1
            if on_step is not None:
                on_step(loss, state.step)
            if state.step % stage_config.checkpoint_every_steps == 0:
                checkpoint(state)
                last_checkpoint = state.step
            if state.step >= total_steps:
                break
        state.epoch += 1
        if on_epoch_end is not None:
            on_epoch_end(state)
        if last_checkpoint != state.step:
            checkpoint(state)
    return state
