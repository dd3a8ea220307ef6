"""Evaluation of a trained model on a labeled split: per-layer accuracy, S / t sweeps and the oracle,
all from one full-depth pass.

One pass records every exit's logits; each grid point's exit layers then follow from `ee_model.exit_layers`
(the same decisions per-row early exit makes), so a whole sweep of every rule costs one pass.
Wall-clock speed-ups need real early-exit runs: `pipelines.evaluation.wallclock`.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from sklearn.metrics import f1_score

from ee_model import EarlyExitClassifier, ExitSetting, exit_layers, flops_speedup, layer_speedup
from pipelines.config import RISK_GRID
from pipelines.evaluation.passes import SplitPass, full_pass, per_layer_accuracy
from pipelines.evaluation.results import SplitEvaluation, SweepPoint


def point_from_layers(
    model: EarlyExitClassifier, split: SplitPass, layers: torch.Tensor, policy: str, knob: float | int | None
) -> SweepPoint:
    """Quality and cost of exiting each row at `layers` (n,), 1-based. `full_correct` counts the rows the full
    model gets right and `kept` those of them the early exit gets right too (the statistic of
    `pipelines.evaluation.thresholds.choose_knob`)."""
    chosen = split.logits[layers - 1, torch.arange(split.logits.shape[1])].argmax(-1)
    labels = split.labels.numpy()
    predicted = chosen.numpy()
    right = predicted == labels
    full_right = split.logits[-1].argmax(-1).numpy() == labels
    accuracy = float(right.mean())
    full = split.full_accuracy
    exit_np = layers.numpy()
    return SweepPoint(
        policy=policy,
        knob=knob,
        accuracy=accuracy,
        # macro over every class of the model, present in this split or not (0 for a class never right)
        macro_f1=float(
            f1_score(
                labels,
                predicted,
                labels=list(range(split.logits.shape[-1])),
                average="macro",
                zero_division=0,
            )
        ),
        retention=accuracy / full if full > 0 else float("nan"),
        rows=int(len(labels)),
        full_correct=int(full_right.sum()),
        kept=int((right & full_right).sum()),
        mean_exit_layer=float(exit_np.mean()),
        layer_speedup=layer_speedup(model.n_layers, exit_np),
        flops_speedup=flops_speedup(model.flops_model, split.tokens, exit_np),
    )


def policy_point(model: EarlyExitClassifier, split: SplitPass, setting: ExitSetting) -> SweepPoint:
    """One exit setting, from a recorded pass."""
    layers = exit_layers(split.logits, model.exit_policy(setting))
    return point_from_layers(model, split, layers, setting.policy, setting.knob)


def oracle_layers(split: SplitPass) -> torch.Tensor:
    """Each row's earliest layer whose classifier is right, else the last layer: (n,), 1-based.

    The best any exit rule could do with these classifiers (it needs the gold label, so it is a bound).
    """
    right = split.logits.argmax(-1) == split.labels.unsqueeze(0)  # (L, n)
    right[-1] = True  # rows no layer gets right run to the end
    return right.float().argmax(dim=0) + 1  # first True


def oracle_point(model: EarlyExitClassifier, split: SplitPass) -> SweepPoint:
    return point_from_layers(model, split, oracle_layers(split), "oracle", None)


def swept_settings(
    model: EarlyExitClassifier, thresholds: tuple[float, ...], risks: tuple[float, ...] = RISK_GRID
) -> list[ExitSetting]:
    """Entropy over `thresholds`, risk over `risks` (when the model has a fitted exit risk), count and
    patience over t = 1..L-1, whatever the variant."""
    settings = [ExitSetting("entropy", s) for s in thresholds]
    if model.config.exit_risk is not None:
        settings += [ExitSetting("risk", r) for r in risks]
    return settings + [
        ExitSetting(rule, t) for rule in ("count", "patience") for t in range(1, model.n_layers)
    ]


def sweep(
    model: EarlyExitClassifier,
    split: SplitPass,
    thresholds: tuple[float, ...],
    risks: tuple[float, ...] = RISK_GRID,
) -> list[SweepPoint]:
    """Every `swept_settings` point, from one pass."""
    return [policy_point(model, split, setting) for setting in swept_settings(model, thresholds, risks)]


def evaluate_split(
    model: EarlyExitClassifier,
    table: pa.Table,
    thresholds: tuple[float, ...],
    batch_size: int = 64,
    split: SplitPass | None = None,
    risks: tuple[float, ...] = RISK_GRID,
) -> SplitEvaluation:
    """Per-layer accuracy, the model's default policy point, the full model, the oracle and every sweep."""
    split = split if split is not None else full_pass(model, table, batch_size)
    return SplitEvaluation(
        rows=int(split.labels.numel()),
        layer_accuracy=per_layer_accuracy(split.logits, split.labels),
        default_policy=policy_point(model, split, model.config.setting()),
        full_model=policy_point(model, split, ExitSetting("none")),
        oracle=oracle_point(model, split),
        sweep=sweep(model, split, thresholds, risks),
    )
