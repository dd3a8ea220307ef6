"""Automatic choice of the exit knob (S for entropy, t for count / patience) from a sweep on dev.

Two targets:
- "retention": the fastest setting that keeps >= `min_retention` of the full model's accuracy, taken as the
  end of the longest run of settings, from the safest one up, that all keep it: one lucky grid point beyond a
  failing one is not chosen (dev sets are small, and the curve should be trusted up to the chosen knob);
- "flops": the most accurate setting whose FLOPs are <= `flops_budget` x the full model's (ties: the faster).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ThresholdTarget:
    kind: str = "retention"  # "retention" or "flops"
    min_retention: float = 0.99
    flops_budget: float = 0.5  # fraction of full-depth FLOPs, for kind="flops"

    def __post_init__(self) -> None:
        if self.kind not in ("retention", "flops"):
            raise ValueError(f"auto threshold target {self.kind!r} is not one of ['retention', 'flops']")
        if not 0 < self.min_retention <= 1:
            raise ValueError(f"min_retention={self.min_retention!r} must be in (0, 1]")
        if not 0 < self.flops_budget <= 1:
            raise ValueError(f"flops_budget={self.flops_budget!r} must be in (0, 1]")

    def describe(self) -> str:
        if self.kind == "retention":
            return f"fastest knob keeping >= {self.min_retention:.1%} of full-model dev accuracy"
        return f"most accurate knob within {self.flops_budget:.0%} of full-model FLOPs on dev"


def safest_first(points: list[dict], rule: str) -> list[dict]:
    """The sweep points of one rule ordered from the most conservative (latest exits) to the most eager.

    Entropy: larger S exits earlier, so ascending S. Count / patience: smaller t exits earlier, so descending t.
    """
    chosen = [p for p in points if p["policy"] == rule]
    if not chosen:
        raise ValueError(f"the sweep has no point for rule {rule!r}")
    return sorted(chosen, key=lambda p: p["knob"], reverse=rule != "entropy")


def choose_knob(points: list[dict], rule: str, target: ThresholdTarget) -> dict:
    """The sweep point of `rule` that meets `target`; the safest point if none does (flagged `met: False`)."""
    ordered = safest_first(points, rule)
    if target.kind == "retention":
        chosen = None
        for point in ordered:
            if point["retention"] < target.min_retention:
                break
            chosen = point
        return {**(chosen or ordered[0]), "met": chosen is not None, "target": target.describe()}
    affordable = [p for p in ordered if 1.0 / p["flops_speedup"] <= target.flops_budget + 1e-12]
    if not affordable:
        return {**ordered[-1], "met": False, "target": target.describe()}
    best = max(affordable, key=lambda p: (p["accuracy"], p["flops_speedup"]))
    return {**best, "met": True, "target": target.describe()}
