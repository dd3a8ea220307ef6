"""Automatic choice of the exit knob (S for entropy, r for risk, t for count / patience) from a sweep.

Two targets:
- "retention": a promise with a stated confidence. The statistic is, among the rows the full model gets right,
  the share the early exit also gets right (`kept / full_correct` of a sweep point). It is a binomial
  proportion, and when it is >= r on unseen data, early-exit accuracy is >= r x full-depth accuracy there
  (rows the early exit fixes only add). With labels replaced by the full model's own predictions (label-free
  calibration), `full_correct` is every row and the statistic is agreement with full depth.
  Settings are tested from the safest to the most eager and the walk stops at the first that fails
  (fixed-sequence testing, as in Learn-then-Test / CALM): a setting passes when the one-sided Clopper-Pearson
  lower bound of its statistic at confidence 1 - delta is >= the target. The chosen setting is the last that
  passed, and the promise fails with probability at most delta over the draw of the dev (or calibration)
  sample. When none passes (too few rows to promise anything), the safest setting, full depth, is used and
  `reason` says why.
- "flops": the most accurate setting whose FLOPs are <= `flops_budget` x the full model's (ties: the faster);
  no confidence statement.
"""

from __future__ import annotations

import math

from scipy.stats import binomtest

from pipelines.config import ThresholdTarget
from pipelines.evaluation.results import ChosenSetting, SweepPoint


def lower_bound(kept: int, total: int, delta: float) -> float:
    """One-sided Clopper-Pearson lower bound of a binomial proportion at confidence 1 - delta (0 when total =
    0)."""
    if total == 0:
        return 0.0
    return float(binomtest(kept, total, alternative="greater").proportion_ci(1 - delta, method="exact").low)


def rows_needed(target: float, delta: float) -> int:
    """The fewest rows on which a setting without a single loss clears `target` at confidence 1 - delta."""
    return math.inf if target >= 1 else math.ceil(math.log(delta) / math.log(target))


def safest_first(points: list[SweepPoint], rule: str) -> list[SweepPoint]:
    """The sweep points of one rule ordered from the most conservative (latest exits) to the most eager
    (`ExitSetting.eagerness`: ascending S, descending t)."""
    chosen = [p for p in points if p.policy == rule]
    if not chosen:
        raise ValueError(f"the sweep has no point for rule {rule!r}")
    return sorted(chosen, key=lambda p: p.setting.eagerness)


def choose_knob(points: list[SweepPoint], rule: str, target: ThresholdTarget) -> ChosenSetting:
    """The sweep point of `rule` that meets `target` (see the module doc), with its evidence."""
    ordered = safest_first(points, rule)
    if target.kind == "flops":
        affordable = [p for p in ordered if 1.0 / p.flops_speedup <= target.flops_budget + 1e-12]
        if not affordable:
            return ChosenSetting(ordered[-1], False, target.describe(), "no setting is within the budget")
        best = max(affordable, key=lambda p: (p.accuracy, p.flops_speedup))
        return ChosenSetting(best, True, target.describe(), "the most accurate within the budget")
    chosen, bound = None, None
    for point in ordered:
        point_bound = lower_bound(point.kept, point.full_correct, target.delta)
        if point_bound < target.min_retention:
            break
        chosen, bound = point, point_bound
    promise = {"min_retention": target.min_retention, "delta": target.delta}
    if chosen is not None:
        reason = f"{bound:.4f} >= {target.min_retention:g} at confidence {1 - target.delta:g}"
        return ChosenSetting(chosen, True, target.describe(), reason, bound=bound, **promise)
    safest = ordered[0]
    n = safest.full_correct
    safest_bound = lower_bound(safest.kept, n, target.delta)
    reason = (
        f"no setting passed, so full depth: even the safest bounds the kept share at {safest_bound:.4f} "
        f"< {target.min_retention:g} on {n} rows the full model gets right"
    )
    needed = rows_needed(target.min_retention, target.delta)
    if n < needed:
        reason += f" (a promise at confidence {1 - target.delta:g} needs at least {needed} such rows)"
    return ChosenSetting(safest, False, target.describe(), reason, bound=safest_bound, **promise)
