"""Exit policies: after each student layer, which rows may leave.

Each policy carries per-row state (a dict of tensors indexed by row) that the caller compacts together with
the rows, so a row's previous prediction and counter travel with it when other rows leave the batch.
The final (teacher) layer always lets every remaining row out; policies are only asked about students.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

State = dict[str, torch.Tensor]


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) / log N in [0, 1], computed from log_softmax so large logits never overflow.

    logits: (batch, N) -> (batch,)
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (batch, N)
    entropy = -(log_p.exp() * log_p).sum(dim=-1)  # (batch,)
    return entropy / math.log(logits.shape[-1])


class ExitPolicy:
    """Decides, per row, whether to exit after a student layer."""

    name = "base"

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {}

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """logits: (batch, N) of the current layer -> (exit mask (batch,) bool, new state)."""
        raise NotImplementedError


@dataclass(frozen=True)
class EntropyPolicy(ExitPolicy):
    """Algorithm 1 (KL variant): exit at the first layer whose normalised entropy < S. S <= 0 = full depth."""

    threshold: float
    name = "entropy"

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return normalised_entropy(logits) < self.threshold, state


class _AgreementPolicy(ExitPolicy):
    """Shared state of count and patience: the previous prediction and an agreement counter."""

    patience: int
    reset_on_change: bool

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {
            "previous": torch.full((batch_size,), -1, dtype=torch.long, device=device),  # no prediction yet
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        prediction = logits.argmax(dim=-1)  # (batch,)
        same = prediction == state["previous"]
        kept = state["count"] if not self.reset_on_change else torch.zeros_like(state["count"])
        count = torch.where(same, state["count"] + 1, kept)
        return count >= self.patience, {"previous": prediction, "count": count}


@dataclass(frozen=True)
class CountPolicy(_AgreementPolicy):
    """Algorithm 2 exactly as printed (Count variant): cnt_i = cnt_{i-1} + 1 when y_i == y_{i-1}, else
    cnt_i = cnt_{i-1} (NOT reset); exit when cnt_i reaches t. The agreements need not be consecutive."""

    patience: int
    name = "count"
    reset_on_change = False


@dataclass(frozen=True)
class PatiencePolicy(_AgreementPolicy):
    """PABEE: exit once the prediction stayed unchanged for t consecutive layers (counter reset on change)."""

    patience: int
    name = "patience"
    reset_on_change = True


class FullDepthPolicy(ExitPolicy):
    """No early exit: every row runs to the teacher."""

    name = "none"

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state


KNOB_OF_POLICY: dict[str, str | None] = {"entropy": "threshold", "count": "patience", "patience": "patience",
                                         "none": None}  # the argument each policy takes


def check_threshold(threshold: Any) -> float:
    """S is a normalised entropy: a number in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r} must be a number in [0, 1] (normalised entropy S)")
    return float(threshold)


def check_patience(patience: Any) -> int:
    """t counts layers: an integer >= 1."""
    if isinstance(patience, bool) or not isinstance(patience, (int, float)) or not math.isfinite(patience) \
            or int(patience) != patience or patience < 1:
        raise ValueError(f"patience={patience!r} must be an integer >= 1 (layers t)")
    return int(patience)


def make_policy(name: str, threshold: float | None = None, patience: int | None = None) -> ExitPolicy:
    """Build a policy by name; entropy needs `threshold` in [0, 1], count and patience need `patience` >= 1."""
    if name == "entropy":
        return EntropyPolicy(check_threshold(threshold))
    if name in ("count", "patience"):
        patience = check_patience(patience)
        return CountPolicy(patience) if name == "count" else PatiencePolicy(patience)
    if name == "none":
        return FullDepthPolicy()
    raise ValueError(f"policy={name!r} is not one of ['entropy', 'count', 'patience', 'none']")


def exit_layers(all_logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor:
    """Exit layer (1-based) of every row, given every exit's logits (n_layers, batch, N).

    The same decisions `EarlyExitClassifier.early_exit` makes, computed from one full-depth pass: used by
    sweeps (one pass serves every threshold) and by tests as the reference.
    """
    n_layers, batch = all_logits.shape[:2]
    exit_layer = torch.full((batch,), n_layers, dtype=torch.long, device=all_logits.device)
    done = torch.zeros(batch, dtype=torch.bool, device=all_logits.device)
    state = policy.init_state(batch, all_logits.device)
    for layer in range(n_layers - 1):
        leave, state = policy.step(all_logits[layer], state)
        newly = leave & ~done
        exit_layer[newly] = layer + 1
        done |= leave
    return exit_layer
