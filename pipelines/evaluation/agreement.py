"""Certifying an exit knob label-free on texts: one full-depth pass whose labels are the full model's own, the
training job's rule on it (`pipelines.evaluation.thresholds.choose_knob`: the fastest setting whose agreement
with full depth clears the target at the stated confidence, settings tried safest first), and the choice
re-measured in the exit engine where a runtime is not exact per row. Used by `jobs/score.py
--calibrate-rows` (`pipelines.scoring.calibration`) and by the training job on its certification rows
(`pipelines.evaluation.final`)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ee_model import EarlyExitClassifier
from pipelines.config import RISK_GRID, ThresholdTarget
from pipelines.evaluation.passes import SplitPass, texts_pass
from pipelines.evaluation.results import ChosenSetting, SweepPoint
from pipelines.evaluation.sweep import sweep
from pipelines.evaluation.thresholds import choose_knob, lower_bound, safest_first


def certified_setting(
    model: EarlyExitClassifier,
    texts: list[str],
    policy: str,
    target: ThresholdTarget,
    thresholds: tuple[float, ...],
    risks: tuple[float, ...] = RISK_GRID,
    batch_size: int = 64,
) -> ChosenSetting:
    """The knob of `policy` certified on `texts` (module doc), in the runtime `model` runs."""
    split = agreement_pass(model, texts, batch_size)
    points = [p for p in sweep(model, split, thresholds, risks) if p.policy == policy]
    chosen = choose_knob(points, policy, target)
    if not model.runtime.exact_per_row:
        chosen = checked_in_the_engine(model, texts, split, points, chosen, target, batch_size)
    return chosen


def agreement_pass(model: EarlyExitClassifier, texts: list[str], batch_size: int = 64) -> SplitPass:
    """One full-depth pass whose `labels` are the full model's own predictions (agreement = accuracy), in the
    precision the scorer runs (no autocast), so the chosen knob is measured on the logits scoring will see.

    Rows run longest first in batches of `batch_size`, as the scorer's exit engine takes them: with int8
    layers a row's result depends on its batch-mates (activations are scaled per call), and unsorted batches
    (more padding, other mates) disagree with the scorer's full depth where sorted ones match it
    (docs/results.md, "Measurements the code refers to"); fp32 is the same either way. The pass is returned
    in input order."""
    order = np.argsort(-model.tokenize(texts).lengths, kind="stable")
    ordered = [texts[i] for i in order]
    recorded = texts_pass(model, ordered, np.zeros(len(texts), np.int64), batch_size, mixed_precision=False)
    back = torch.from_numpy(np.argsort(order))  # sorted position of each input row
    logits = recorded.logits[:, back]
    return SplitPass(logits, logits[-1].argmax(-1), recorded.tokens[back.numpy()])


def checked_in_the_engine(
    model: EarlyExitClassifier,
    texts: list[str],
    split: SplitPass,
    points: list[SweepPoint],
    chosen: ChosenSetting,
    target: ThresholdTarget,
    batch_size: int,
) -> ChosenSetting:
    """`chosen` re-measured where the scorer runs it, for every runtime but fp32: the sweep replays every exit
    from one full-depth pass, but an int8 row's logits depend on its batch-mates (and a bf16 row's last bits
    on the shape of its batch), which change as rows leave the engine (the replay overstates the engine's
    agreement: docs/results.md, "Measurements the code refers to"). So the chosen knob runs
    through the exit engine on the sample; while its bound misses the target the next safer knob is tried
    (the safest, full depth in the engine's batching, agrees by construction)."""
    if not chosen.met:
        return chosen
    ordered = safest_first(points, chosen.point.policy)
    reference, n = split.labels.numpy(), len(texts)
    full_flops = float(model.flops_model.full_depth_flops(split.tokens).sum())
    token_ids = model.tokenize(texts)  # once for every setting tried
    for point in reversed(ordered[: ordered.index(chosen.point) + 1]):
        out = model.predict_tokens(token_ids, setting=point.setting, batch_size=batch_size)
        kept = int((out.label_id == reference).sum())
        bound = lower_bound(kept, n, target.delta)
        if bound >= target.min_retention:
            mean_exit = float(out.exit_layer.mean())
            measured = replace(
                point,
                accuracy=kept / n,
                retention=kept / n,
                kept=kept,
                mean_exit_layer=mean_exit,
                layer_speedup=model.n_layers / mean_exit,
                flops_speedup=full_flops / float(out.flops.sum()),
            )
            steps = ordered.index(chosen.point) - ordered.index(point)
            reason = (
                f"{bound:.4f} >= {target.min_retention:g} at confidence {1 - target.delta:g}, measured in "
                f"the exit engine ({steps} setting(s) safer than the replayed sweep's {chosen.point.setting})"
            )
            return replace(chosen, point=measured, reason=reason, bound=bound)
    return chosen  # not reached: the safest setting agrees with the pass on every row
