"""Typed evaluation results, shared by training, scoring and the benchmarks: a sweep point, the chosen setting
with its evidence, a split's evaluation and a wall-clock timing. `to_dict` gives the JSON written to MLflow
and summaries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ee_model import ExitSetting


@dataclass(frozen=True)
class SweepPoint:
    """Quality and cost of exiting each row of a split where one setting says (policy "oracle": the earliest
    correct layer). `full_correct` counts the rows the full model gets right and `kept` those of them the
    early exit gets right too: the statistic of the confidence-bounded knob (`evaluation.thresholds`)."""

    policy: str
    knob: float | int | None
    accuracy: float
    macro_f1: float
    retention: float  # accuracy / full-depth accuracy
    rows: int
    full_correct: int
    kept: int
    mean_exit_layer: float
    layer_speedup: float
    flops_speedup: float

    @property
    def setting(self) -> ExitSetting:
        return ExitSetting(self.policy, self.knob)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChosenSetting:
    """The automatically chosen sweep point and the evidence for it. For a "retention" target: `bound` is the
    one-sided Clopper-Pearson lower bound at 1 - delta of the point's kept share on its `full_correct` rows;
    when `met` is False no setting passed and `point` is the safest one (full depth), `reason` says why."""

    point: SweepPoint
    met: bool
    target: str  # in words
    reason: str
    min_retention: float | None = None  # for "retention"
    delta: float | None = None
    bound: float | None = None

    @property
    def setting(self) -> ExitSetting:
        return self.point.setting

    @property
    def rows(self) -> int:
        """The rows behind the bound: those the full model gets right."""
        return self.point.full_correct

    def to_dict(self) -> dict[str, Any]:
        evidence = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "point"}
        return {**self.point.to_dict(), **evidence}


@dataclass(frozen=True)
class WallclockTiming:
    """Measured rows/s of one setting against the same model at full depth (same process, same texts)."""

    policy: str
    knob: float | int | None
    batch_size: int
    rows: int
    repeats: int
    full_rows_per_s: float
    early_rows_per_s: float
    wallclock_speedup: float
    runtime: str = "fp32"  # what ran the layers, both timings (ee_model.runtime)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SplitEvaluation:
    """One split: per-layer accuracy, the model's default setting, the full model, the oracle, every sweep
    point; after training also the chosen setting and wall-clock timings."""

    rows: int
    layer_accuracy: list[float]
    default_policy: SweepPoint
    full_model: SweepPoint
    oracle: SweepPoint
    sweep: list[SweepPoint]
    chosen: ChosenSetting | None = None
    wallclock: list[WallclockTiming] = field(default_factory=list)

    def points(self, rule: str) -> list[SweepPoint]:
        return [p for p in self.sweep if p.policy == rule]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "layer_accuracy": self.layer_accuracy,
            "default_policy": self.default_policy.to_dict(),
            "full_model": self.full_model.to_dict(),
            "oracle": self.oracle.to_dict(),
            "sweep": [p.to_dict() for p in self.sweep],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "wallclock": [w.to_dict() for w in self.wallclock],
        }
