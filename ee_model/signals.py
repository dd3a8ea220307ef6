"""What an exit's logits say about its certainty: normalised entropy and the top-2 probability margin, the
signals the exit policies read (`ee_model.policies`) and the risk fit uses (`ee_model.exit_risk`)."""

from __future__ import annotations

import math

import torch

SIGNALS = ("entropy", "margin")  # normalised entropy; p(top class) - p(second class); both in [0, 1]
SURE = {"entropy": 0.0, "margin": 1.0}  # the value of each when the exit is sure / unsure
UNSURE = {"entropy": 1.0, "margin": 0.0}


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) / log N in [0, 1], computed from log_softmax so large logits never overflow.

    logits: (batch, N) -> (batch,)
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (batch, N)
    return entropy_of(log_p, log_p.exp())


def entropy_of(log_p: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Normalised entropy from log-probabilities and probabilities (batch, N) -> (batch,)."""
    return -(p * log_p).sum(dim=-1) / math.log(log_p.shape[-1])


def exit_signals(logits: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
    """(batch, N) logits -> (batch, len(names)) signals, float32, from one log_softmax."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    values = {}
    if "entropy" in names:
        values["entropy"] = entropy_of(log_p, p)
    if "margin" in names:
        top2 = p.topk(2, dim=-1).values
        values["margin"] = top2[:, 0] - top2[:, 1]
    return torch.stack([values[name] for name in names], dim=-1)
