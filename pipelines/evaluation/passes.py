"""One full-depth pass over texts: every exit's logits, the labels and each row's real tokens (no Ray here).

Everything downstream (sweeps, the oracle, the automatic knob, calibration, the training loop's dev score) is
arithmetic on a recorded pass. A batch is a dict with "text" (sequence of str) and "label_id" (int array).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ee_model import EarlyExitClassifier
from ee_model.io import unwrap
from pipelines.data import with_label_ids
from pipelines.feature_batches import features_of, has_features


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


@torch.no_grad()
def exit_logits(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device,
    mixed_precision: bool = True,
) -> SplitPass:
    """Every exit's logits, the label ids and each row's real tokens over all batches, in one full-depth pass
    (batches of texts, or of cached stage-2 features: pipelines.feature_batches).

        mixed_precision: bf16 autocast on CUDA, as training runs; False runs the model's own dtype, as scoring
        does."""
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    all_logits, all_labels, all_tokens = [], [], []
    try:
        for batch in batches:
            if has_features(batch):  # cached stage-2 features: the heads only; token counts unknown (0)
                features, teacher = features_of(batch, device)
                with autocast_for(device) if mixed_precision else nullcontext():
                    out = inner(student_features=features, teacher_logits=teacher)
                tokens = np.zeros(features.shape[1], dtype=np.int64)
            else:
                inputs = encode(inner, batch, device)
                with autocast_for(device) if mixed_precision else nullcontext():
                    out = inner(inputs["input_ids"], inputs["attention_mask"], inputs.get("token_type_ids"))
                tokens = inputs["attention_mask"].sum(dim=1).cpu().numpy().astype(np.int64)
            all_logits.append(out.logits.float().cpu())
            all_labels.append(torch.tensor(np.array(batch["label_id"]), dtype=torch.long))
            all_tokens.append(tokens)
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


def texts_pass(
    model: EarlyExitClassifier,
    texts: list[str],
    label_ids: np.ndarray,
    batch_size: int = 64,
    mixed_precision: bool = True,
) -> SplitPass:
    """One full-depth pass over `texts` in batches of `batch_size` (see `steps.exit_logits` for the
    precision)."""
    batches = [
        {"text": texts[i : i + batch_size], "label_id": label_ids[i : i + batch_size]}
        for i in range(0, len(texts), batch_size)
    ]
    return exit_logits(model, batches, model.device, mixed_precision)  # tokenised once


def full_pass(model: EarlyExitClassifier, table: pa.Table, batch_size: int = 64) -> SplitPass:
    data = with_label_ids(table, model.config.labels)
    return texts_pass(model, data["text"].to_pylist(), data["label_id"].to_numpy(), batch_size)
