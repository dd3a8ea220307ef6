"""The "risk" exit policy's model: how likely leaving after a student layer changes the prediction.

Per student layer l, a logistic regression of "this exit's prediction differs from full depth's" on signals of
the exit's own probabilities (`SIGNALS`: normalised entropy, top-2 margin), fitted label-free on every
exit's logits over text the model trained on: P_l(x) = sigmoid(a_l + w_l . x). The policy's knob is one risk
level r in [0, 1]: a row leaves after layer l when P_l(its signals) < r. One knob, one fitted boundary per
layer, and the same estimated risk of a changed prediction at every layer (a layer-1 head and a layer-5 head
are no longer treated as equally calibrated). r = 0: full depth; r = 1: every row leaves after the first
layer; a larger r never makes a row leave later. The knob is chosen on dev with the same confidence-bounded
rule as S. The policy that applies it is `ee_model.policies.RiskPolicy`.

The fit (scikit-learn, in the pipeline: `pipelines.evaluation.exit_risk.fit_exit_risk`) is stored in the
model's config (`EarlyExitConfig.exit_risk`); this module holds it and scores rows with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ee_model.signals import SIGNALS, exit_signals

FLOAT32_MAX = torch.finfo(torch.float32).max  # the table runs in float32: larger values would become inf


@dataclass(frozen=True)
class ExitRisk:
    """Per student layer, (a_l, w_l1, ..., w_lk): P(changed prediction | signals x) = sigmoid(a_l + w_l . x),
    x the `signals` of the exit's logits, in order."""

    signals: tuple[str, ...]
    coefficients: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        signals = tuple(self.signals)
        unknown = [s for s in signals if s not in SIGNALS]
        if not signals or unknown:
            raise ValueError(f"exit risk signals must be some of {list(SIGNALS)}, got {list(signals)}")
        rows = tuple(tuple(float(v) for v in row) for row in self.coefficients)
        if (
            not rows
            or any(len(row) != len(signals) + 1 for row in rows)
            or not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX for row in rows for v in row)
        ):
            raise ValueError(
                f"exit risk needs {len(signals) + 1} finite float32 coefficients per student layer "
                f"(intercept and one per signal of {list(signals)}), got {self.coefficients!r}"
            )
        object.__setattr__(self, "signals", signals)
        object.__setattr__(self, "coefficients", rows)

    @property
    def n_students(self) -> int:
        return len(self.coefficients)

    def table(self, device: torch.device) -> torch.Tensor:
        """(n_students, 1 + k) float32 on `device`."""
        return torch.tensor(self.coefficients, dtype=torch.float32, device=device)

    def score(self, logits: torch.Tensor, layer: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """a_l + w_l . x of each row at its own student layer `layer` (batch,), 0-based: the log-odds of a
        changed prediction. `table`: `self.table(device)`."""
        rows = table[layer]  # (batch, 1 + k)
        return rows[:, 0] + (rows[:, 1:] * exit_signals(logits, self.signals)).sum(dim=-1)

    def risk(self, all_logits: torch.Tensor) -> torch.Tensor:
        """Every student's estimated risk (n_students, n), from every exit's logits (n_layers, n, N)."""
        table = self.table(all_logits.device)
        n = all_logits.shape[1]
        return torch.stack(
            [
                torch.sigmoid(self.score(logits, torch.full((n,), i, device=all_logits.device), table))
                for i, logits in enumerate(all_logits[: self.n_students])
            ]
        )

    def to_dict(self) -> dict[str, Any]:
        return {"signals": list(self.signals), "coefficients": [list(row) for row in self.coefficients]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExitRisk:
        return cls(tuple(data["signals"]), tuple(tuple(row) for row in data["coefficients"]))


def log_odds(risk: float) -> float:
    """log(r / (1 - r)), -inf at 0 and +inf at 1."""
    if risk <= 0:
        return -math.inf
    if risk >= 1:
        return math.inf
    return math.log(risk / (1 - risk))
