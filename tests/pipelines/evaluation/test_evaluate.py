"""Sweeps, the oracle, the automatic knob, wall-clock timing and the MLflow trade-off records."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ee_model import ExitSetting
from ee_model.flops import FlopsModel
from pipelines.config import EvalConfig, ThresholdTarget
from pipelines.evaluation.final import evaluate_trained_model, log_final_evaluation
from pipelines.evaluation.passes import SplitPass, full_pass
from pipelines.evaluation.report import trade_off_table
from pipelines.evaluation.results import SweepPoint
from pipelines.evaluation.sweep import evaluate_split, oracle_layers, point_from_layers, sweep
from pipelines.evaluation.thresholds import choose_knob, lower_bound, rows_needed
from pipelines.evaluation.wallclock import wallclock_speedups
from pipelines.tracking import setup_tracking
from tests.conftest import LABELS, labeled_table

GRID = tuple(np.round(np.linspace(0, 1, 26), 2))


@pytest.fixture(scope="module")
def model_and_pass(tiny_model):
    model = tiny_model("bert", num_layers=4, seed=3)
    table = labeled_table(90).set_column(
        1, "label", __import__("pyarrow").array([LABELS[i % 3] for i in range(90)])
    )
    return model, table, full_pass(model, table, batch_size=16)


def test_sweep_mean_exit_layers_are_monotone(model_and_pass):
    model, _, split = model_and_pass
    points = sweep(model, split, GRID)
    entropy = [p.mean_exit_layer for p in points if p.policy == "entropy"]
    assert len(entropy) == len(GRID)
    assert all(a >= b for a, b in zip(entropy, entropy[1:], strict=False))  # larger S never exits later
    assert entropy[0] == 4 and entropy[-1] < entropy[0]  # S=0 is full depth; the sweep moved rows
    for rule in ("count", "patience"):
        by_t = [p.mean_exit_layer for p in points if p.policy == rule]
        assert len(by_t) == 3 and all(a <= b for a, b in zip(by_t, by_t[1:], strict=False))  # larger t: later


def test_every_point_reports_all_quantities(model_and_pass):
    model, table, split = model_and_pass
    evaluation = evaluate_split(model, table, GRID, split=split)
    full = evaluation.full_model
    assert full.mean_exit_layer == 4 and full.retention == pytest.approx(1.0)
    assert full.flops_speedup < 1  # full depth at early-exit cost (student heads) vs the plain model
    for point in evaluation.sweep:
        assert point.rows == 90 and 0 <= point.kept <= point.full_correct <= 90
        assert point.retention == pytest.approx(point.accuracy / full.accuracy)
        assert 0 <= point.macro_f1 <= 1


def test_oracle_matches_a_hand_computed_case():
    # 3 layers, 4 rows, 2 classes; labels 0, 1, 1, 0
    logits = torch.tensor(
        [
            [[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]],  # layer 1 right on rows 0, 2
            [[2.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 2.0]],  # layer 2 right on rows 0, 1, 2
            [[0.0, 2.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]],  # layer 3 right on row 1 only
        ]
    )
    split = SplitPass(logits, torch.tensor([0, 1, 1, 0]), np.array([5, 5, 5, 5]))
    assert oracle_layers(split).tolist() == [1, 2, 1, 3]  # row 3: no layer right -> the last

    class Model:  # what point_from_layers reads of a model
        n_layers = 3
        flops_model = FlopsModel(8, 16, 8, 3, 0)

    point = point_from_layers(Model(), split, oracle_layers(split), "oracle", None)
    assert point.accuracy == 0.75 and point.mean_exit_layer == pytest.approx(7 / 4)
    assert point.layer_speedup == pytest.approx(3 / (7 / 4))
    assert point.retention == pytest.approx(0.75 / 0.25)  # the full model gets 1 of 4 right
    # macro-F1 by hand: class 0 P=1/1 R=1/2 F=2/3; class 1 P=2/3 R=2/2 F=4/5
    assert point.macro_f1 == pytest.approx((2 / 3 + 4 / 5) / 2)


def points(rule, knobs, kept, full_correct=1000):
    """Sweep points with `kept` of `full_correct` rows the full model gets right (flops 1x, 2x, ...)."""
    return [
        SweepPoint(
            policy=rule,
            knob=k,
            accuracy=c / full_correct,
            macro_f1=c / full_correct,
            retention=c / full_correct,
            rows=full_correct,
            full_correct=full_correct,
            kept=c,
            mean_exit_layer=1.0,
            layer_speedup=1.0 + i,
            flops_speedup=1.0 + i,
        )
        for i, (k, c) in enumerate(zip(knobs, kept, strict=True))
    ]


def test_lower_bound_is_the_one_sided_clopper_pearson_bound():
    from scipy.stats import beta

    assert lower_bound(1000, 1000, 0.05) == pytest.approx(0.05 ** (1 / 1000))  # no loss: delta^(1/n)
    assert lower_bound(990, 1000, 0.05) == pytest.approx(beta.ppf(0.05, 990, 11))
    assert lower_bound(990, 1000, 0.05) < lower_bound(990, 1000, 0.2) < 0.99  # less confidence, higher bound
    assert lower_bound(0, 0, 0.05) == 0.0
    assert rows_needed(0.99, 0.05) == 299 and lower_bound(299, 299, 0.05) >= 0.99 > lower_bound(
        298, 298, 0.05
    )


def test_choose_knob_stops_at_the_first_setting_whose_bound_fails():
    # bounds at delta 0.05 on 1000 rows: 1000 -> 0.9970, 998 -> 0.9937, 985 -> 0.9772, 999 -> 0.9953
    chosen = choose_knob(
        points("entropy", [0.0, 0.1, 0.2, 0.3], [1000, 998, 985, 999]), "entropy", ThresholdTarget()
    )
    assert chosen.point.knob == 0.1 and chosen.met  # 0.3 passes too, but only past a failing 0.2
    assert chosen.bound == pytest.approx(lower_bound(998, 1000, 0.05)) and chosen.rows == 1000
    assert (chosen.delta, chosen.min_retention) == (0.05, 0.99) and "confidence 95%" in chosen.target
    # count: larger t is safer, so the walk goes t = 3, 2, 1
    count = points("count", [1, 2, 3], [970, 998, 1000])
    assert choose_knob(count, "count", ThresholdTarget()).point.knob == 2


def test_a_point_estimate_that_meets_the_target_is_not_enough():
    # 995 of 1000 kept: 99.5 % measured, but the 95 % bound (0.9894) is under 0.99; at 0.98 it passes
    sweep_points = points("entropy", [0.0, 0.1], [1000, 995])
    assert choose_knob(sweep_points, "entropy", ThresholdTarget()).point.knob == 0.0
    assert choose_knob(sweep_points, "entropy", ThresholdTarget(min_retention=0.98)).point.knob == 0.1
    assert (
        choose_knob(sweep_points, "entropy", ThresholdTarget(delta=0.5)).point.knob == 0.1
    )  # a coin-flip promise


def test_too_few_rows_fall_back_to_full_depth_and_say_why():
    chosen = choose_knob(
        points("entropy", [0.0, 0.5], [215, 215], full_correct=215), "entropy", ThresholdTarget()
    )
    assert not chosen.met and chosen.point.knob == 0.0  # the safest setting: S = 0 never exits early
    assert chosen.bound == pytest.approx(0.05 ** (1 / 215))  # 0.9862: no loss at all, and still < 0.99
    assert "on 215 rows" in chosen.reason and "needs at least 299" in chosen.reason


def test_the_promise_holds_on_unseen_data_with_probability_one_minus_delta():
    """Simulated dev sets drawn from a known population: the chosen setting's true kept share is below the
    target in at most ~delta of the draws; the point estimate (today's rule before the bound) fails far more
    often."""
    knobs = [round(0.05 * i, 2) for i in range(11)]
    true_kept = np.array(
        [1.0, 0.999, 0.998, 0.996, 0.994, 0.992, 0.9905, 0.989, 0.985, 0.98, 0.97]
    )  # per knob
    rng = np.random.default_rng(0)
    draws, n = 400, 2000
    failed = {"bound": 0, "point": 0}
    for _ in range(draws):
        losses = rng.random(n)  # nested: a row lost at a safer knob is lost at every more eager one
        kept = [int((losses < p).sum()) for p in true_kept]
        sweep_points = points("entropy", knobs, kept, full_correct=n)
        chosen = choose_knob(sweep_points, "entropy", ThresholdTarget())
        failed["bound"] += true_kept[knobs.index(chosen.point.knob)] < 0.99
        point = max(
            k
            for k, c in zip(knobs, kept, strict=True)
            if all(c2 / n >= 0.99 for c2 in kept[: knobs.index(k) + 1])
        )
        failed["point"] += true_kept[knobs.index(point)] < 0.99
    assert failed["bound"] / draws <= 0.05 + 0.03  # delta, plus the simulation's own noise
    assert failed["point"] / draws > 0.3


def test_choose_knob_with_a_flops_budget():
    sweep_points = points("entropy", [0.0, 0.1, 0.2, 0.3], [1000, 990, 970, 900])  # FLOPs 1x .. 4x
    chosen = choose_knob(sweep_points, "entropy", ThresholdTarget(kind="flops", flops_budget=0.5))
    assert chosen.point.knob == 0.1 and 1 / chosen.point.flops_speedup <= 0.5


def test_auto_knob_meets_its_target_on_the_data_it_was_chosen_on(model_and_pass, tmp_path):
    model, table, _ = model_and_pass
    # fp32 as the fixture's pass (the choice in the scoring runtime: test_risk_policy_... and the job tests)
    config = EvalConfig(thresholds=GRID, min_retention=0.8, delta=0.2, wallclock_rows=0, precision="fp32")
    result = evaluate_trained_model(model, tmp_path, table, table, config)
    chosen = result.chosen
    n = chosen.point.full_correct  # dev rows the full model gets right (about 30 of 90)
    assert chosen.met and chosen.point.knob > 0 and chosen.rows == n > 8  # 0.2 ** (1 / 8) < 0.8
    assert model.config.threshold == chosen.point.knob  # now the model's default
    assert n >= chosen.point.kept and chosen.point.kept / n >= chosen.bound >= 0.8
    assert result.dev.default_policy.kept == chosen.point.kept
    eager = [p for p in result.dev.sweep if p.policy == "entropy" and p.knob > chosen.point.knob]
    assert not eager or lower_bound(eager[0].kept, n, 0.2) < 0.8  # the next, faster setting fails
    from ee_model import EarlyExitConfig

    assert EarlyExitConfig.load(tmp_path).threshold == result.chosen.point.knob  # saved with the model


def test_wallclock_rows_and_the_table(model_and_pass):
    model, table, split = model_and_pass
    texts = table["text"].to_pylist()[:24]
    rows = wallclock_speedups(
        model, texts, [ExitSetting("entropy", 0.52), ExitSetting("entropy", 0.0)], batch_sizes=(1, 8)
    )
    assert [(r.batch_size, r.knob) for r in rows] == [(1, 0.52), (1, 0.0), (8, 0.52), (8, 0.0)]
    assert all(r.wallclock_speedup > 0 and r.rows == 24 and r.repeats == 3 for r in rows)  # medians
    evaluation = evaluate_split(model, table, GRID, split=split)
    frame = trade_off_table(evaluation, rows)
    assert list(frame["policy"][:2]) == ["none", "oracle"]
    timed = frame.dropna(subset=["wallclock_speedup_b1"])
    assert sorted(timed["knob"]) == [0.0, 0.52]


@pytest.mark.slow
def test_mlflow_run_holds_the_table_and_plots(model_and_pass, tmp_path):
    import mlflow

    model, table, _ = model_and_pass
    # never the active experiment id another test left behind; artifacts beside the store
    setup_tracking(f"sqlite:///{tmp_path}/mlflow.db", "trade-off")
    config = EvalConfig(thresholds=GRID, wallclock_rows=12, wallclock_batch_sizes=(4,), precision="fp32")
    model_dir = model.save_pretrained(tmp_path / "model")
    with mlflow.start_run() as run:
        result = evaluate_trained_model(model, model_dir, table, table, config)
        log_final_evaluation(model, result)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    files = {
        f.path
        for folder in ("trade_off", "plots", "evaluation")
        for f in client.list_artifacts(run.info.run_id, folder)
    }
    assert {
        "trade_off/test_sweep.csv",
        "trade_off/test_sweep.md",
        "trade_off/dev_sweep.csv",
        "plots/test_trade_off.png",
        "plots/test_exit_histogram.png",
        "plots/dev_trade_off.png",
        "evaluation/test.json",
    } <= files
    history = client.get_metric_history(run.info.run_id, "test_sweep_entropy_mean_exit_layer")
    assert sorted(m.step for m in history) == list(range(len(config.thresholds)))  # grid + timed knobs
    csv = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/trade_off/test_sweep.csv")
    assert (
        csv.splitlines()[0].startswith("policy,knob,accuracy,macro_f1,retention")
        and "wallclock_speedup_b4" in csv
    )
    png = mlflow.artifacts.download_artifacts(
        f"runs:/{run.info.run_id}/plots/test_trade_off.png", dst_path=str(tmp_path)
    )
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    logged = client.get_run(run.info.run_id).data
    assert logged.params["auto_threshold.knob"] == str(result.chosen.point.knob)
    # the promise: target, delta, bound and rows, and why it fell back to full depth (~30 rows right: too few)
    n = result.chosen.point.full_correct
    assert (
        logged.params["auto_threshold.min_retention"] == "0.99"
        and logged.params["auto_threshold.delta"] == "0.05"
    )
    assert logged.metrics["auto_threshold.bound"] == pytest.approx(0.05 ** (1 / n))  # about 0.905 < 0.99
    assert logged.metrics["auto_threshold.rows"] == n < 299
    assert "needs at least 299" in logged.params["auto_threshold.reason"]


def test_calibration_on_too_small_a_sample_keeps_full_depth_and_says_why(model_and_pass):
    from pipelines.scoring.calibration import calibrate

    model, table, _ = model_and_pass
    texts = table["text"].to_pylist()[:60]
    result = calibrate(model, texts, "entropy", 0.99, 0.05, GRID)
    assert not result.met and result.knob == 0.0 and result.agreement == 1.0  # S = 0: full depth
    assert result.agreement_bound == pytest.approx(0.05 ** (1 / 60)) and "needs at least 299" in result.reason
    loose = calibrate(model, texts, "entropy", 0.9, 0.2, GRID)  # a weaker promise on the same sample passes
    assert loose.met and loose.knob > 0 and loose.agreement_bound >= 0.9 and loose.delta == 0.2


def test_fit_exit_risk_learns_which_exits_change_the_prediction():
    from pipelines.evaluation.exit_risk import RISK_SIGNALS, fit_exit_risk

    generator = torch.Generator().manual_seed(0)
    n, classes = 400, 3
    final = torch.randint(0, classes, (n,), generator=generator)
    confident = torch.nn.functional.one_hot(final, classes).float() * 6  # entropy ~0.05, agrees
    flat = torch.rand(n, classes, generator=generator) * 0.3  # entropy ~1, argmax at random
    hard = torch.arange(n) % 2 == 0  # half the rows are unsure at layer 1
    layer1 = torch.where(hard.unsqueeze(1), flat, confident)
    logits = torch.stack([layer1, confident, confident])  # layer 2 always agrees with the teacher
    for signals in (("entropy",), RISK_SIGNALS):
        risk = fit_exit_risk(logits, signals)
        assert risk.signals == signals and risk.n_students == 2
        estimated = risk.risk(logits)  # (2, n)
        assert estimated[0, ~hard].max() < 0.05 < 0.3 < estimated[0, hard].mean()  # ~2/3 of unsure rows flip
        assert estimated[1].max() < 0.05  # defined, and low, where a layer never disagrees
    assert fit_exit_risk(logits, ("entropy",)).coefficients[0][1] > 0  # risk rises with entropy
    with pytest.raises(ValueError, match="n_layers >= 2"):
        fit_exit_risk(torch.zeros(1, 5, 3))


def test_risk_policy_is_fitted_swept_chosen_and_stored(tiny_model, tmp_path):
    import mlflow

    from ee_model import EarlyExitConfig
    from tests.conftest import random_texts

    model = tiny_model("bert", num_layers=4, seed=3)
    assert model.config.policy == "entropy"
    table = labeled_table(90).set_column(
        1, "label", __import__("pyarrow").array([LABELS[i % 3] for i in range(90)])
    )
    # precision auto: the knob is chosen in the runtime this machine scores in (built here, as the job does)
    config = EvalConfig(thresholds=GRID, min_retention=0.8, delta=0.2, wallclock_rows=0, exit_risk_rows=60)
    model_dir = model.save_pretrained(tmp_path / "model")
    setup_tracking(f"sqlite:///{tmp_path}/mlflow.db", "risk")
    with mlflow.start_run() as run:
        result = evaluate_trained_model(
            model, model_dir, table, table, config, random_texts(150, seed=4), policy="risk"
        )
        log_final_evaluation(model, result)
    risk = model.config.exit_risk
    assert risk is not None and risk.n_students == 3
    assert EarlyExitConfig.load(model_dir).exit_risk == risk  # stored with the model
    swept = [p for p in result.dev.sweep if p.policy == "risk"]
    assert [p.knob for p in swept] == list(config.risks)
    layers = [p.mean_exit_layer for p in swept]
    assert layers[0] == 4 and all(a >= b for a, b in zip(layers, layers[1:], strict=False)) and layers[-1] < 4
    chosen = result.chosen
    assert chosen.point.policy == "risk" and model.config.setting() == ExitSetting("risk", chosen.point.knob)
    assert EarlyExitConfig.load(model_dir).risk == chosen.point.knob
    assert result.test.default_policy.policy == "risk"
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        run.info.run_id, "test_sweep_risk_mean_exit_layer"
    )
    assert len(history) == len(config.risks)
