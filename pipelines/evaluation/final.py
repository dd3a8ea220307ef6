"""After training: fit the exit risk, evaluate on dev and test, choose the exit knob on dev, time chosen
settings, log it all.

The knob of the model's policy (r for the KL variant's default "risk" rule, S for "entropy", t for the Count
variant's count rule) is chosen on dev only and written into the saved model's config with the policy and the
exit risk, so the registered model carries them as its default; test numbers are then reported at that knob.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa

from ee_model import EarlyExitClassifier, ExitSetting, exit_layers
from ee_model.config import KnobPromise
from ee_model.exit_risk import ExitRisk
from ee_model.runtime import FP32
from ee_model.runtime_layers import build_layers, resolve_encoder_runtime, with_runtime
from pipelines.config import EvalConfig, ThresholdTarget
from pipelines.data import evenly_spaced_rows
from pipelines.evaluation.agreement import certified_setting
from pipelines.evaluation.exit_risk import fit_exit_risk
from pipelines.evaluation.passes import SplitPass, full_pass, texts_pass
from pipelines.evaluation.report import (
    exit_histogram_figure,
    log_trade_off,
    trade_off_figure,
    trade_off_table,
)
from pipelines.evaluation.results import ChosenSetting, SplitEvaluation, WallclockTiming
from pipelines.evaluation.runtime_check import checked_in_runtime
from pipelines.evaluation.sweep import evaluate_split, policy_point
from pipelines.evaluation.thresholds import choose_knob
from pipelines.evaluation.wallclock import wallclock_speedups


@dataclass
class FinalEvaluation:
    dev: SplitEvaluation
    test: SplitEvaluation
    chosen: ChosenSetting | None  # the setting chosen automatically on dev, with its evidence; None when off
    wallclock: list[WallclockTiming]
    passes: dict[str, SplitPass]


def set_default_setting(
    model: EarlyExitClassifier,
    setting: ExitSetting,
    model_dir: str | Path,
    promise: KnobPromise | None = None,
) -> None:
    """Store `setting` as the model's default, with what it was certified on, in memory and in the saved
    config."""
    model.config = model.config.with_setting(setting, promise)
    model.config.save(model_dir)


def knob_promise(
    chosen: ChosenSetting, target: ThresholdTarget, certified_on: str | None, dev_rows: int
) -> KnobPromise | None:
    """What a met retention target certified (`certified_on`: the label-free certification rows' source;
    None: dev's labels, judged on the rows full depth gets right); None for a FLOPs budget or a miss."""
    if not chosen.met or chosen.bound is None:
        return None
    if certified_on is not None:
        return KnobPromise("agreement", target.min_retention, target.delta, chosen.point.rows, certified_on)
    rows = chosen.point.full_correct
    source = f"the {rows} of the {dev_rows} labeled dev rows that full depth gets right"
    return KnobPromise("retention", target.min_retention, target.delta, rows, source)


def timed_settings(model: EarlyExitClassifier, config: EvalConfig) -> list[ExitSetting]:
    """The model's default setting first, then the configured extra knobs of the same rule (S or t; none for
    risk)."""
    default = model.config.setting()
    extra = {
        "entropy": config.timed_thresholds,
        "count": [t for t in config.timed_patiences if t < model.n_layers],
        "patience": [t for t in config.timed_patiences if t < model.n_layers],
    }.get(default.policy, ())
    settings = [default]
    for knob in extra:
        if ExitSetting(default.policy, knob) not in settings:
            settings.append(ExitSetting(default.policy, knob))
    return settings


def scoring_runtime_model(
    model: EarlyExitClassifier, config: EvalConfig, scratch: Path, calibration_texts: list[str]
) -> EarlyExitClassifier:
    """A copy of `model` with its layers in the runtime scoring will use (`config.precision` / `backend`),
    or `model` itself for fp32; `calibration_texts`: what OpenVINO int8 is calibrated on (`CALIBRATION_ROWS`
    of them, evenly spaced)."""
    from ee_model.openvino_layers import CALIBRATION_ROWS

    runtime, _ = resolve_encoder_runtime(
        model.encoder.config.model_type, config.precision, config.backend, gpu=model.device.type == "cuda"
    )
    if runtime == FP32:
        return model
    copy_of = copy.deepcopy(model)
    texts = None
    if runtime.needs_calibration_texts:
        texts = [calibration_texts[i] for i in evenly_spaced_rows(len(calibration_texts), CALIBRATION_ROWS)]
    return with_runtime(copy_of, runtime, build_layers(copy_of.cpu(), runtime, scratch / "layers", texts))


def fitted_exit_risk(model: EarlyExitClassifier, texts: list[str], batch_size: int = 64) -> ExitRisk:
    """The "risk" policy's model, fitted on `texts` (training text, no labels needed)."""
    recorded = texts_pass(model, texts, np.zeros(len(texts), dtype=np.int64), batch_size)
    return fit_exit_risk(recorded.logits)


def set_policy_and_exit_risk(
    model: EarlyExitClassifier,
    model_dir: str | Path,
    config: EvalConfig,
    risk_texts: list[str] | None,
    policy: str | None,
) -> None:
    """The model's policy (when given) and its fitted exit risk (on `config.exit_risk_rows` evenly spaced
    `risk_texts`), in memory and in the saved config."""
    changes: dict[str, Any] = {} if policy is None else {"policy": policy}
    if risk_texts and config.exit_risk_rows > 0:
        sample = evenly_spaced_rows(len(risk_texts), config.exit_risk_rows)
        changes["exit_risk"] = fitted_exit_risk(model, [risk_texts[i] for i in sample], config.batch_size)
    if changes:
        model.config = model.config.replace(**changes)
        model.config.save(model_dir)


def evaluate_trained_model(
    model: EarlyExitClassifier,
    model_dir: str | Path,
    dev: pa.Table,
    test: pa.Table,
    config: EvalConfig,
    risk_texts: list[str] | None = None,
    policy: str | None = None,
    certify_texts: list[str] | None = None,
    certified_on: str = "",
) -> FinalEvaluation:
    """`risk_texts`: training text the exit risk is fitted on (`config.exit_risk_rows` of them, evenly
    spaced); None or empty: the model gets no exit risk and the "risk" policy is not swept. `policy`: the
    policy whose knob is chosen and stored (default the model's). `certify_texts`: unlabeled rows like the
    text to be scored (`pipelines.training.certification`): the knob is certified on them label-free
    (agreement with full depth, in the runtime that scores) and dev's labels are the check beside it; None:
    certified on dev's labels. `certified_on` says which rows `certify_texts` are (stored with the knob)."""
    set_policy_and_exit_risk(model, model_dir, config, risk_texts, policy)
    passes = {
        "dev": full_pass(model, dev, config.batch_size),
        "test": full_pass(model, test, config.batch_size),
    }
    dev_eval = evaluate_split(model, dev, config.thresholds, split=passes["dev"], risks=config.risks)
    test_eval = evaluate_split(model, test, config.thresholds, split=passes["test"], risks=config.risks)
    chosen, wallclock = None, []
    with tempfile.TemporaryDirectory() as scratch:
        scoring = scoring_runtime_model(model, config, Path(scratch), risk_texts or dev["text"].to_pylist())
        if config.auto_threshold:
            if certify_texts:
                chosen = certified_knob(scoring, certify_texts, model.config.policy, config)
            else:
                chosen = dev_knob(scoring, dev, passes["dev"], dev_eval, model.config.policy, config)
            if not chosen.met:
                where = "the certification rows" if certify_texts else "dev"
                warnings.warn(
                    f"automatic {model.config.policy} knob on {where}: {chosen.reason}", stacklevel=2
                )
            certified = certified_on if certify_texts else None
            promise = knob_promise(chosen, config.target_spec(), certified, dev.num_rows)
            set_default_setting(model, chosen.setting, model_dir, promise)
            scoring.config = model.config
            for evaluation, split in ((dev_eval, passes["dev"]), (test_eval, passes["test"])):
                evaluation.default_policy = policy_point(model, split, model.config.setting())
        if config.wallclock_rows > 0:
            texts = test["text"].to_pylist()[: config.wallclock_rows]
            wallclock = wallclock_speedups(
                scoring,
                texts,
                timed_settings(model, config),
                config.wallclock_batch_sizes,
                config.wallclock_repeats,
            )
    test_eval.wallclock = wallclock
    dev_eval.chosen = test_eval.chosen = chosen
    return FinalEvaluation(dev_eval, test_eval, chosen, wallclock, passes)


def dev_knob(
    scoring: EarlyExitClassifier,
    dev: pa.Table,
    dev_pass: SplitPass,
    dev_eval: SplitEvaluation,
    policy: str,
    config: EvalConfig,
) -> ChosenSetting:
    """The knob chosen on dev's labels (kept share of the rows full depth gets right), re-measured in the
    runtime that scores where that is not fp32."""
    chosen = choose_knob(dev_eval.sweep, policy, config.target_spec())
    if chosen.bound is None:  # a FLOPs budget: nothing to re-measure
        return chosen
    return checked_in_runtime(
        scoring,
        dev["text"].to_pylist(),
        dev_pass.labels.numpy(),
        dev_eval.sweep,
        chosen,
        config.target_spec(),
        config.batch_size,
    )


def certified_knob(
    scoring: EarlyExitClassifier, texts: list[str], policy: str, config: EvalConfig
) -> ChosenSetting:
    """The knob certified label-free on `texts` as `jobs/score.py --calibrate-rows` certifies one: the fastest
    setting whose agreement with full depth (in the runtime that scores, through the exit engine where that
    is not exact per row) clears `config.min_retention` at confidence 1 - `config.delta`."""
    return certified_setting(
        scoring, texts, policy, config.target_spec(), config.thresholds, config.risks, config.batch_size
    )


def log_final_evaluation(model: EarlyExitClassifier, result: FinalEvaluation) -> None:
    """Per split: per-layer accuracy, the default point, sweep metrics, the table and the plots."""
    chosen = result.chosen
    if chosen is not None:
        mlflow.log_params(
            {
                "auto_threshold.policy": chosen.point.policy,
                "auto_threshold.knob": chosen.point.knob,
                "auto_threshold.target": chosen.target,
                "auto_threshold.met_on_dev": chosen.met,
                "auto_threshold.reason": chosen.reason,
            }
        )
        if chosen.bound is not None:
            mlflow.log_params(
                {"auto_threshold.min_retention": chosen.min_retention, "auto_threshold.delta": chosen.delta}
            )
            mlflow.log_metrics({"auto_threshold.bound": chosen.bound, "auto_threshold.rows": chosen.rows})
    setting = model.config.setting()
    for name, evaluation in (("dev", result.dev), ("test", result.test)):
        for i, accuracy in enumerate(evaluation.layer_accuracy):
            mlflow.log_metric(f"{name}_accuracy_layer", accuracy, step=i + 1)
        point = evaluation.default_policy
        numbers = {k: v for k, v in point.to_dict().items() if k not in ("policy", "knob")}
        mlflow.log_metrics({f"{name}_{k}": float(v) for k, v in numbers.items()})
        mlflow.log_metric(f"{name}_full_depth_accuracy", evaluation.layer_accuracy[-1])
        mlflow.log_dict(evaluation.to_dict(), f"evaluation/{name}.json")
        table = trade_off_table(evaluation, result.wallclock if name == "test" else ())
        layers = exit_layers(result.passes[name].logits, model.exit_policy(setting)).numpy()
        figures = {
            f"{name}_trade_off.png": trade_off_figure(evaluation, f"{name}: accuracy vs speed-up", point),
            f"{name}_exit_histogram.png": exit_histogram_figure(
                layers, model.n_layers, f"{name}: exit layers at {setting.policy}={setting.knob}"
            ),
        }
        log_trade_off(name, evaluation, table, figures)
    for row in result.wallclock:
        mlflow.log_metric(
            f"test_wallclock_speedup_b{row.batch_size}_{row.policy}_{row.knob}", row.wallclock_speedup
        )
