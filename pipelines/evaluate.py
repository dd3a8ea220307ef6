"""Evaluation of a trained model on a labeled split: per-layer accuracy and S / t sweeps from one pass.

One full-depth pass records every exit's logits; each grid point's exit layers then follow from
`ee_model.exit_layers` (the same decisions per-row early exit makes), so a whole sweep costs one pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from ee_model import EarlyExitClassifier, exit_layers, flops_speedup, layer_speedup, make_policy
from pipelines.data import with_label_ids
from pipelines.steps import exit_logits, per_layer_accuracy


@dataclass(frozen=True)
class SplitPass:
    """One full-depth pass over a split: logits (L, n, N), label ids (n,), real tokens (n,)."""

    logits: torch.Tensor
    labels: torch.Tensor
    tokens: np.ndarray


def full_pass(model: EarlyExitClassifier, table: pa.Table, batch_size: int = 64) -> SplitPass:
    data = with_label_ids(table, model.config.labels)
    texts, label_ids = data["text"].to_pylist(), data["label_id"].to_numpy()
    batches = [{"text": texts[i:i + batch_size], "label_id": label_ids[i:i + batch_size]}
               for i in range(0, len(texts), batch_size)]
    logits, labels = exit_logits(model, batches, model.device)
    tokens = np.array([len(ids) for ids in model.tokenize(texts)["input_ids"]], dtype=np.int64)
    return SplitPass(logits, labels, tokens)


def policy_point(model: EarlyExitClassifier, split: SplitPass, policy: str, knob: float | int | None) -> dict:
    """Accuracy, mean exit layer and speed-ups of one policy setting, from a recorded pass."""
    rule = make_policy(policy, threshold=knob if policy == "entropy" else None,
                       patience=int(knob) if policy in ("count", "patience") else None)
    layers = exit_layers(split.logits, rule)  # (n,) 1-based
    chosen = split.logits[layers - 1, torch.arange(split.logits.shape[1])]
    accuracy = float((chosen.argmax(-1) == split.labels).float().mean())
    exit_np = layers.numpy()
    return {
        "policy": policy,
        "knob": knob,
        "accuracy": accuracy,
        "mean_exit_layer": float(exit_np.mean()),
        "layer_speedup": layer_speedup(model.n_layers, exit_np),
        "flops_speedup": flops_speedup(model.flops_model, split.tokens, exit_np),
    }


def sweep(model: EarlyExitClassifier, split: SplitPass, thresholds: tuple[float, ...]) -> list[dict]:
    """Entropy over `thresholds` for the KL variant; count and patience over t = 1..L-1 for Count."""
    if model.config.variant == "kl":
        return [policy_point(model, split, "entropy", float(s)) for s in thresholds]
    return [policy_point(model, split, rule, t) for rule in ("count", "patience") for t in range(1, model.n_layers)]


def evaluate_split(model: EarlyExitClassifier, table: pa.Table, thresholds: tuple[float, ...],
                   batch_size: int = 64) -> dict:
    split = full_pass(model, table, batch_size)
    config = model.config
    knob = config.threshold if config.policy == "entropy" else config.patience
    return {
        "rows": int(split.labels.numel()),
        "layer_accuracy": per_layer_accuracy(split.logits, split.labels),
        "default_policy": policy_point(model, split, config.policy, knob),
        "sweep": sweep(model, split, thresholds),
    }
