"""Per-worker training and evaluation steps over any iterable of dict batches (no Ray here).

A batch is a dict with "text" (sequence of str) and "label_id" (int array; -100 = unlabeled). Ray code only
turns dataset shards into such iterables; tests feed plain lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ee_model.io import unwrap

if TYPE_CHECKING:
    from pipelines.stages import LossFn, TrainingStage


def encode(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's texts as the model's inputs on `device` (`EarlyExitClassifier.encode`, through DDP)."""
    return unwrap(model).encode(batch["text"], device)


@dataclass(frozen=True)
class SplitPass:
    """One full-depth pass over a split: every exit's logits (L, n, N), label ids (n,), real tokens (n,)."""

    logits: torch.Tensor
    labels: torch.Tensor
    tokens: np.ndarray

    @property
    def n_layers(self) -> int:
        return int(self.logits.shape[0])

    @property
    def full_accuracy(self) -> float:
        return float((self.logits[-1].argmax(-1) == self.labels).double().mean())


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Mixed precision of training on this device: bf16 autocast on CUDA, none on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def autocast_for(device: torch.device):
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


@torch.no_grad()
def exit_logits(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    mixed_precision: bool = True,
) -> SplitPass:
    """Every exit's logits, the label ids and each row's real tokens over all batches, in one full-depth pass.

    mixed_precision: bf16 autocast on CUDA, as training runs; False runs the model's own dtype, as scoring
    does."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    all_logits, all_labels, all_tokens = [], [], []
    try:
        for batch in batches:
            inputs = encode(inner, batch, device)
            with autocast_for(device) if mixed_precision else nullcontext():
                out = inner(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
            all_logits.append(out.logits.float().cpu())
            all_labels.append(torch.tensor(np.array(batch["label_id"]), dtype=torch.long))
            all_tokens.append(inputs["attention_mask"].sum(dim=1).cpu().numpy().astype(np.int64))
    finally:
        inner.train(was_training)
    if not all_logits:
        empty = torch.empty(inner.n_layers, 0, inner.config.num_labels)
        return SplitPass(empty, torch.empty(0, dtype=torch.long), np.empty(0, dtype=np.int64))
    return SplitPass(torch.cat(all_logits, dim=1), torch.cat(all_labels), np.concatenate(all_tokens))


def per_layer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Accuracy of each exit: logits (L, n, N), labels (n,) -> L floats."""
    if labels.numel() == 0:
        return [float("nan")] * logits.shape[0]
    return (logits.argmax(-1) == labels.unsqueeze(0)).float().mean(dim=1).tolist()
