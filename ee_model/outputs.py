"""Typed outputs of the early-exit model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ExitLogits:
    """Training forward: the logits of every exit.

    logits: (n_layers, batch, num_labels); index n_layers - 1 is the teacher (final classifier).
    """

    logits: torch.Tensor

    @property
    def teacher(self) -> torch.Tensor:
        return self.logits[-1]  # (batch, num_labels)

    @property
    def students(self) -> torch.Tensor:
        return self.logits[:-1]  # (n_layers - 1, batch, num_labels)


@dataclass
class EarlyExitBatch:
    """Per-row early-exit inference on one tokenised batch, rows in input order.

    logits: (batch, num_labels) of the exit each row left at.
    exit_layer: (batch,) 1-based layer after which the row left (n_layers = the teacher).
    tokens: (batch,) real (unpadded) tokens of the row.
    """

    logits: torch.Tensor
    exit_layer: torch.Tensor
    tokens: torch.Tensor


@dataclass
class Prediction:
    """Per-row results of `EarlyExitClassifier.predict`, in input order.

    Rows whose text could not be scored (only with invalid="null") have label None, NaN probabilities and
    confidence, exit_layer 0, flops 0 and a reason in `error`.
    """

    label: list[str | None]
    label_id: np.ndarray  # (n,) int64, -1 where not scored
    probs: np.ndarray  # (n, num_labels) float32
    confidence: np.ndarray  # (n,) float32, max probability
    exit_layer: np.ndarray  # (n,) int64, 1-based; 0 where not scored
    flops: np.ndarray  # (n,) int64, paper convention (ee_model.flops)
    tokens: np.ndarray  # (n,) int64 real tokens after truncation
    error: list[str | None]

    def __len__(self) -> int:
        return len(self.label)

    def to_records(self) -> list[dict]:
        """Public API: one plain dict per row (label, confidence, exit_layer, flops, probs, error),
        JSON-ready, for callers that want rows rather than columns."""
        return [
            {
                "label": self.label[i],
                "confidence": float(self.confidence[i]),
                "exit_layer": int(self.exit_layer[i]),
                "flops": int(self.flops[i]),
                "probs": self.probs[i].tolist(),
                "error": self.error[i],
            }
            for i in range(len(self))
        ]
