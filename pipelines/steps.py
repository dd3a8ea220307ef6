"""Per-worker training and evaluation steps over any iterable of dict batches (no Ray here).

A batch is a dict with "text" (sequence of str) and "label_id" (int array; -100 = unlabeled). Ray code only
turns dataset shards into such iterables; tests feed plain lists.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from ee_model import EarlyExitClassifier, joint_loss, stage1_loss, stage2_loss
from ee_model.io import unwrap

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_for(stage: str, stage_config: Any) -> LossFn:
    """The loss of a stage as a function of (exit logits (L, B, N), label ids (B,))."""
    if stage == "stage1":
        return lambda logits, labels: stage1_loss(logits, labels, stage_config.focal_gamma)
    if stage == "stage2":
        return lambda logits, labels: stage2_loss(
            logits, labels, kl_weight=stage_config.kl_weight, gold_weight=stage_config.gold_weight
        )
    if stage == "joint":
        return lambda logits, labels: joint_loss(logits, labels, stage_config.joint_weighting)
    raise ValueError(f"stage={stage!r} is not one of ['stage1', 'stage2', 'joint']")


def encode(
    model: EarlyExitClassifier, batch: dict[str, Any], device: torch.device
) -> dict[str, torch.Tensor]:
    """Tokenise a batch's texts with the model's tokenizer; tensors on `device`."""
    inner = unwrap(model)
    encoded = inner.tokenizer(
        [str(t) for t in batch["text"]],
        truncation=True,
        max_length=inner.config.max_length,
        padding="longest",
        return_tensors="pt",
    )
    return {key: value.to(device) for key, value in encoded.items()}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision of training on this device: bf16 autocast on CUDA, none on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast_for(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(
    model: torch.nn.Module,
    batch: dict[str, Any],
    stage: str,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
) -> float | None:
    """One optimizer step; None when the batch has nothing this stage can learn from."""
    labels = torch.tensor(np.array(batch["label_id"]), dtype=torch.long, device=device)
    keep = labels != -100
    if stage != "stage2" and not bool(keep.all()):
        raise ValueError("stage 1 and joint training need a gold label on every row")
    inputs = encode(model, batch, device)
    with autocast_for(device):
        out = model(
            inputs["input_ids"],
            inputs["attention_mask"],
            inputs.get("token_type_ids"),
            train_encoder=stage != "stage2",
        )
        loss = loss_fn(out.logits, labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    scheduler.step()
    return float(loss.detach())


@torch.no_grad()
def exit_logits(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    mixed_precision: bool = True,
):
    """Every exit's logits (L, n, N) and label ids (n,) over all batches, from one full-depth pass.

    mixed_precision: bf16 autocast on CUDA, as training runs; False runs the model's own dtype, as scoring
    does."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    all_logits, all_labels = [], []
    try:
        for batch in batches:
            inputs = encode(inner, batch, device)
            with autocast_for(device) if mixed_precision else nullcontext():
                out = inner(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
            all_logits.append(out.logits.float().cpu())
            all_labels.append(torch.tensor(np.array(batch["label_id"]), dtype=torch.long))
    finally:
        inner.train(was_training)
    if not all_logits:
        return torch.empty(inner.n_layers, 0, inner.config.num_labels), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits, dim=1), torch.cat(all_labels)


def per_layer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy of each exit: logits (L, n, N), labels (n,) -> L floats."""
    if labels.numel() == 0:
        return [float("nan")] * logits.shape[0]
    return (logits.argmax(-1) == labels.unsqueeze(0)).float().mean(dim=1).tolist()
