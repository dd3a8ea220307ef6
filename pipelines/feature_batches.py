"""Batches of cached stage-2 features (pipelines.training.features writes them): their columns, and turning a
numpy batch into the model's `forward(student_features=, teacher_logits=)` inputs. Shared by the training step
and the dev pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

FEATURES_COLUMN = "student_features"  # (n_layers - 1, hidden) per row, the store's dtype
TEACHER_COLUMN = "teacher_logits"  # (num_labels,) float32 per row
LABEL_COLUMN = "label_id"


def has_features(batch: dict[str, Any]) -> bool:
    return FEATURES_COLUMN in batch


def features_of(batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(student features (L - 1, batch, hidden) float32, teacher logits (batch, N)) of a numpy batch."""
    features = torch.as_tensor(np.asarray(batch[FEATURES_COLUMN]), device=device).float().transpose(0, 1)
    teacher = torch.as_tensor(np.asarray(batch[TEACHER_COLUMN]), device=device).float()
    return features, teacher
