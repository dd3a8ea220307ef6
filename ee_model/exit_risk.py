"""The "risk" exit policy's model: how likely leaving after a student layer changes the prediction.

Per student layer l, a logistic regression of "this exit's prediction differs from full depth's" on signals of
the exit's own probabilities (`SIGNALS`: normalised entropy, top-2 margin), fitted label-free on every
exit's logits over text the model trained on: P_l(x) = sigmoid(a_l + w_l . x). The policy's knob is one risk
level r in [0, 1]: a row leaves after layer l when P_l(its signals) < r. One knob, one fitted boundary per
layer, and the same estimated risk of a changed prediction at every layer (a layer-1 head and a layer-5 head
are no longer treated as equally calibrated). r = 0: full depth; r = 1: every row leaves after the first
layer; a larger r never makes a row leave later. With the entropy as the only signal this is one entropy
threshold per layer (`ExitRisk.thresholds`). The knob is chosen on dev with the same confidence-bounded rule
as S.

The fit (scikit-learn, in the pipeline: `pipelines.evaluation.exit_risk.fit_exit_risk`) is stored in the
model's config (`EarlyExitConfig.exit_risk`); this module only applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ee_model.policies import ExitPolicy, State, entropy_of

SIGNALS = ("entropy", "margin")  # normalised entropy; p(top class) - p(second class); both in [0, 1]
SURE = {"entropy": 0.0, "margin": 1.0}  # the value of each when the exit is sure / unsure
UNSURE = {"entropy": 1.0, "margin": 0.0}


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
            or not all(math.isfinite(v) for row in rows for v in row)
        ):
            raise ValueError(
                f"exit risk needs {len(signals) + 1} finite coefficients per student layer (intercept and "
                f"one per signal of {list(signals)}), got {self.coefficients!r}"
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

    def thresholds(self, risk: float) -> tuple[float, ...]:
        """For an entropy-only fit: S_l for risk level `risk`, the entropy below which layer l's estimated
        risk is < `risk`, in [0, 1]. A layer whose fitted risk does not rise with entropy gets 0 (no row
        leaves)."""
        if self.signals != ("entropy",):
            raise ValueError(f"entropy thresholds need an entropy-only fit, not {list(self.signals)}")
        if risk <= 0:
            return (0.0,) * self.n_students
        if risk >= 1:
            return (1.0,) * self.n_students
        level = log_odds(risk)
        return tuple(min(max((level - a) / b, 0.0), 1.0) if b > 0 else 0.0 for a, b in self.coefficients)

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


@dataclass(frozen=True)
class RiskPolicy(ExitPolicy):
    """The "risk" policy: a row leaves after student layer l when its estimated risk of a changed prediction
    P_l(signals) < `risk`. Each row carries the index of its next layer."""

    exit_risk: ExitRisk
    risk: float
    # the coefficient table per device, made once (no host-to-device copy per step)
    tables: dict[torch.device, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    name = "risk"

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {"layer": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        layer = state["layer"]  # (batch,) 0-based index of this student
        table = self.tables.get(logits.device)
        if table is None:
            table = self.tables[logits.device] = self.exit_risk.table(logits.device)
        leave = self.exit_risk.score(logits, layer, table) < log_odds(self.risk)
        return leave, {"layer": layer + 1}
