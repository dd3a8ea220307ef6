"""The "risk" exit policy's model: how likely leaving after a student layer changes the prediction.

Per student layer l, a logistic regression of "this exit's prediction differs from full depth's" on the exit's
normalised entropy, fitted label-free on every exit's logits over text the model has seen (its training or
unlabeled text): P_l(H) = sigmoid(a_l + b_l H). The policy's knob is one risk level r in [0, 1]: a row leaves
after layer l when P_l(its entropy) < r, i.e. when its entropy is below S_l(r) = (logit(r) - a_l) / b_l. One
knob, one threshold per layer, and the same estimated risk of a changed prediction at every layer (a layer-1
head and a layer-5 head are no longer treated as equally calibrated). r = 0: full depth; r = 1: every row
leaves after the first layer. The knob is chosen on dev with the same confidence-bounded rule as S.

The fit (scikit-learn, in the pipeline: `pipelines.evaluation.exit_risk.fit_exit_risk`) is stored in the
model's config (`EarlyExitConfig.exit_risk`); this module only applies it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExitRisk:
    """(a_l, b_l) of every student layer: P(changed prediction | normalised entropy H) =
    sigmoid(a_l + b_l H)."""

    coefficients: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        pairs = tuple((float(a), float(b)) for a, b in self.coefficients)
        if not pairs or not all(math.isfinite(v) for pair in pairs for v in pair):
            raise ValueError(f"exit risk needs finite (intercept, slope) pairs, got {self.coefficients!r}")
        object.__setattr__(self, "coefficients", pairs)

    @property
    def n_students(self) -> int:
        return len(self.coefficients)

    def risk(self, entropy: torch.Tensor) -> torch.Tensor:
        """(n_students, n) normalised entropies -> estimated risk of a changed prediction, same shape."""
        a, b = (
            torch.tensor(v, dtype=torch.float64).view(-1, 1) for v in zip(*self.coefficients, strict=True)
        )
        return torch.sigmoid(a + b * entropy.double())

    def thresholds(self, risk: float) -> tuple[float, ...]:
        """S_l for risk level `risk`: the entropy below which layer l's estimated risk is < `risk`, in [0, 1].
        A layer whose fitted risk does not rise with entropy gets 0 (no row leaves there)."""
        if risk <= 0:
            return (0.0,) * self.n_students
        if risk >= 1:
            return (1.0,) * self.n_students
        level = math.log(risk / (1 - risk))
        return tuple(min(max((level - a) / b, 0.0), 1.0) if b > 0 else 0.0 for a, b in self.coefficients)

    def to_config(self) -> list[list[float]]:
        return [list(pair) for pair in self.coefficients]

    @classmethod
    def from_config(cls, value: Sequence[Sequence[float]] | None) -> ExitRisk | None:
        return None if value is None else cls(tuple(tuple(pair) for pair in value))
