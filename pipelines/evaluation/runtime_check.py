"""The automatic knob, checked in the runtime that will score (`ee_model.runtime`: bf16, int8, OpenVINO).

The knob is chosen on dev from a replay of one fp32 full-depth pass (`thresholds.choose_knob`). Scoring runs
the layers in the machine's runtime, where a row's logits move in their last bits with its batch-mates (which
change as rows leave the exit engine), so the chosen knob is run through the exit engine in that runtime on
dev: the statistic is the training job's own (of the dev rows the runtime's full depth gets right, the share
its early exit gets right too), and while its one-sided bound misses the target the next safer knob is tried.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ee_model import EarlyExitClassifier, ExitSetting
from pipelines.config import ThresholdTarget
from pipelines.evaluation.results import ChosenSetting, SweepPoint
from pipelines.evaluation.thresholds import lower_bound, safest_first


def checked_in_runtime(
    model: EarlyExitClassifier,
    texts: list[str],
    labels: np.ndarray,
    points: list[SweepPoint],
    chosen: ChosenSetting,
    target: ThresholdTarget,
    batch_size: int,
) -> ChosenSetting:
    """`chosen` (from the fp32 replay) re-measured with `model` (its layers in the scoring runtime) on the dev
    `texts` and their gold `labels`; the safest knob that passes, with its measured evidence."""
    if not chosen.met or chosen.bound is None or model.runtime.exact_per_row:
        return chosen
    token_ids = model.tokenize(texts)
    full = model.predict_tokens(token_ids, setting=ExitSetting("none"), batch_size=batch_size)
    right = full.label_id == labels
    n = int(right.sum())
    ordered = safest_first(points, chosen.point.policy)
    candidates = ordered[: ordered.index(chosen.point) + 1]
    for point in reversed(candidates):
        out = model.predict_tokens(token_ids, setting=point.setting, batch_size=batch_size)
        kept = int(((out.label_id == labels) & right).sum())
        bound = lower_bound(kept, n, target.delta)
        if bound >= target.min_retention or point is candidates[0]:
            accuracy = float(np.mean(out.label_id == labels))
            measured = replace(
                point,
                accuracy=accuracy,
                retention=accuracy / max(float(np.mean(right)), 1e-12),
                full_correct=n,
                kept=kept,
                mean_exit_layer=float(out.exit_layer.mean()),
                layer_speedup=model.n_layers / float(out.exit_layer.mean()),
            )
            steps = ordered.index(chosen.point) - ordered.index(point)
            met = bound >= target.min_retention
            reason = (
                f"{bound:.4f} {'>=' if met else '<'} {target.min_retention:g} at confidence "
                f"{1 - target.delta:g}, measured in {model.runtime.name} through the exit engine ({steps} "
                f"setting(s) safer than the fp32 replay's {chosen.point.setting})"
            )
            return replace(chosen, point=measured, met=met, reason=reason, bound=bound)
    return chosen  # not reached: the loop returns at the safest point
