"""`--calibrate-rows`: the sample, the knob it chooses and its promise, pinned per output, measured in the
runtime that scores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ee_model import EarlyExitClassifier, EarlyExitConfig, ExitSetting
from ee_model.config import KnobPromise
from pipelines.errors import UserError
from pipelines.evaluation.thresholds import lower_bound
from tests.conftest import LABELS, random_texts
from tests.pipelines.scoring.helpers import read_outputs, score, scoring_runs, write


def test_calibration_sample_is_uniform_over_files_and_row_groups_and_seeded(tmp_path):
    from pipelines.row_sample import sample_rows, sample_texts

    pq.write_table(pa.table({"text": [f"a{i}" for i in range(10)]}), tmp_path / "a.parquet", row_group_size=3)
    b_texts = [f"b{i}" for i in range(25)]
    b_texts[5], b_texts[15] = None, "  "  # never scored, so never calibrated on
    pq.write_table(
        pa.table({"text": b_texts, "x": list(range(25))}), tmp_path / "b.parquet", row_group_size=4
    )
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    files = [
        (str(tmp_path / "a.parquet"), 10),
        (str(tmp_path / "e.parquet"), 0),
        (str(tmp_path / "b.parquet"), 25),
    ]
    every = [f"a{i}" for i in range(10)] + b_texts
    replaced = 0
    for seed in range(12):
        first = [every[i] for i in sample_rows(35, 7, seed)]
        kept = [t for t in first if t and t.strip()]
        got = sample_texts(files, "text", 7, seed)
        assert len(got) == 7 == len(set(got)) and all(t and t.strip() for t in got)
        assert set(kept) <= set(got)  # rows drawn on a null or blank text are replaced by further draws
        replaced += len(kept) < 7
    assert replaced  # (some of these seeds draw one)
    assert sorted(sample_texts(files, "text", 33, 0)) == sorted(t for t in every if t and t.strip())
    assert sample_texts(files, "text", 20, 1) == sample_texts(files, "text", 20, 1)
    assert sample_texts(files, "text", 20, 1) != sample_texts(files, "text", 20, 2)
    assert sample_texts(files, "text", 1000, 0) == [f"a{i}" for i in range(10)] + [
        t for t in b_texts if t and t.strip()
    ]
    # uniform: every row as likely as any other, whatever its position (2,000 draws of 3 of 10 rows)
    counts = np.bincount(np.concatenate([sample_rows(10, 3, seed) for seed in range(2000)]), minlength=10)
    assert counts.min() > 520 and counts.max() < 680  # 600 each expected; 4.4 standard deviations


def sharp_model(tiny_encoder_dir, tmp_path) -> str:
    """A saved 3-layer entropy model (S = 0.95) with sharper heads: entropies spread over [0, 1], so S really
    trades agreement for speed."""
    torch.manual_seed(3)
    model = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("bert", num_layers=3), labels=LABELS, threshold=0.95
    )
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.mul_(3)
    return str(model.save_pretrained(tmp_path / "model"))


def test_calibrated_knob_agrees_with_full_depth_and_is_pinned(ray_local, tiny_encoder_dir, tmp_path):
    model_dir = sharp_model(tiny_encoder_dir, tmp_path)
    texts = random_texts(300, seed=7) + [None, ""]
    write(tmp_path / "in" / "a.parquet", texts)
    first = score(
        model_dir, tmp_path / "in", tmp_path / "out", tmp_path, calibrate_rows=200, min_agreement=0.9
    )
    calibration, knob = first["calibration"], first["knob"]
    assert calibration["met"] and not calibration["pinned"] and 0 < knob < 1 and calibration["knob"] == knob
    assert 0.9 <= calibration["agreement"] < 1 and 1 < calibration["mean_exit_layer"] < 3  # rows exit early
    assert first["policy"] == "entropy" and first["output"].endswith(f"__entropy-{knob:g}")
    # the sample: 200 scorable rows of the 302 drawn with the recorded seed; check S with the model's own
    # early exit
    from pipelines.row_sample import sample_texts

    sample = sample_texts([(str(tmp_path / "in" / "a.parquet"), 302)], "text", 200, calibration["seed"])
    model = EarlyExitClassifier.from_pretrained(model_dir)  # the saved weights, as the Ray task loaded them
    full = model.predict(sample, policy="none").label

    def agreement(s):
        return float(
            np.mean(np.array(model.predict(sample, policy="entropy", threshold=s).label) == np.array(full))
        )

    assert calibration["rows"] == len(sample) and agreement(knob) == pytest.approx(calibration["agreement"])
    # the fastest S whose agreement clears 0.9 with 95 % confidence (one-sided Clopper-Pearson), tested in
    # order
    n = len(sample)
    assert calibration["agreement_bound"] == pytest.approx(lower_bound(round(agreement(knob) * n), n, 0.05))
    assert calibration["agreement"] > calibration["agreement_bound"] >= 0.9 and calibration["delta"] == 0.05
    assert lower_bound(round(agreement(round(knob + 0.02, 2)) * n), n, 0.05) < 0.9  # the next S fails
    write(tmp_path / "in" / "b.parquet", random_texts(40, seed=8))
    again = score(
        model_dir, tmp_path / "in", tmp_path / "out", tmp_path, calibrate_rows=200, min_agreement=0.9
    )
    assert again["calibration"]["pinned"] and again["knob"] == knob and again["output"] == first["output"]
    assert (again["files_scored"], again["files_skipped"]) == (1, 1)
    explicit = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, threshold=knob)
    assert explicit["output"] == first["output"] and explicit["files_skipped"] == 2
    runs = scoring_runs(model_dir, order_by=["start_time ASC"])
    assert runs["params.calibrate_rows"].tolist() == ["200", "200", "0"]
    assert runs["params.calibration_pinned"].tolist()[:2] == ["False", "True"]
    assert runs["metrics.calibration_agreement"].iloc[0] == pytest.approx(calibration["agreement"])
    assert runs["metrics.calibration_agreement_bound"].iloc[0] == pytest.approx(
        calibration["agreement_bound"]
    )
    assert (
        runs["params.delta"].tolist()[:2] == ["0.05", "0.05"]
        and "0.95" in runs["params.calibration_reason"].iloc[0]
    )


def test_risk_policy_scores_calibrates_and_keys_its_own_outputs(ray_local, tiny_encoder_dir, tmp_path):
    from ee_model.exit_risk import ExitRisk

    encoder = tiny_encoder_dir("bert", num_layers=3)
    torch.manual_seed(3)
    model = EarlyExitClassifier.from_encoder(encoder, labels=LABELS, policy="risk", risk=0.5)
    with torch.no_grad():  # sharper heads: entropies spread over [0, 1]
        for parameter in model.heads.parameters():
            parameter.mul_(3)
    model.config = model.config.replace(exit_risk=ExitRisk(("entropy",), ((-5.0, 6.0), (-4.0, 6.0))))
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    texts = random_texts(300, seed=7) + [None]
    write(tmp_path / "in" / "a.parquet", texts)
    stored = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)  # the stored policy and r
    assert (stored["policy"], stored["knob"]) == ("risk", 0.5) and stored["output"].endswith("__risk-0.5")
    out = read_outputs(stored)["a.parquet"]
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts, invalid="null")
    assert out["label"].to_pylist() == expected.label  # the null text: a null label in both
    assert out["exit_layer"].to_pylist()[:-1] == expected.exit_layer[:-1].tolist()
    assert 1 < np.mean(expected.exit_layer[:-1]) < 3  # rows leave at several layers
    calibrated = score(
        model_dir, tmp_path / "in", tmp_path / "out", tmp_path, calibrate_rows=200, min_agreement=0.9
    )
    calibration = calibrated["calibration"]
    assert calibration["policy"] == "risk" and calibration["met"] and 0 < calibrated["knob"] < 1
    assert calibrated["output"].endswith(f"__risk-{calibrated['knob']:g}")
    assert calibration["agreement"] > calibration["agreement_bound"] >= 0.9
    plain = without_exit_risk(model_dir, tmp_path)
    with pytest.raises(UserError, match="policy 'risk' needs a model with a fitted exit risk"):
        score(str(plain), tmp_path / "in", tmp_path / "out2", tmp_path, policy="risk")
    assert not (tmp_path / "out2").exists()


def without_exit_risk(model_dir: str, tmp_path) -> str:
    """The saved model without its exit risk (a model trained before the risk policy)."""
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "no-risk")
    data = json.loads((copy / "ee_config.json").read_text())
    data.pop("exit_risk")
    data["policy"] = "entropy"
    (copy / "ee_config.json").write_text(json.dumps(data))
    return str(copy)


def test_int8_calibration_measures_its_knob_in_the_exit_engine(tiny_encoder_dir, tmp_path):
    """The replayed sweep is only a guide for int8: the kept knob's agreement is what the engine gave."""
    from ee_model import int8_layers, with_int8_layers
    from pipelines.config import S_GRID
    from pipelines.evaluation.agreement import agreement_pass
    from pipelines.evaluation.thresholds import lower_bound
    from pipelines.scoring.calibration import calibrate
    from tests.conftest import trained_tiny

    fp32 = trained_tiny(tiny_encoder_dir("bert", num_layers=3))
    folder = int8_layers(fp32, tmp_path / "int8")
    model = with_int8_layers(fp32, folder, threads=1)
    texts = random_texts(400, seed=11)
    calibration = calibrate(model, texts, "entropy", 0.95, 0.05, S_GRID)
    assert calibration.met and calibration.knob > 0 and "exit engine" in calibration.reason
    full = agreement_pass(model, texts).labels.numpy()
    engine = model.predict(texts, policy="entropy", threshold=calibration.knob, batch_size=64)
    kept = int((engine.label_id == full).sum())
    assert calibration.agreement == pytest.approx(kept / len(texts))
    assert calibration.agreement_bound == pytest.approx(lower_bound(kept, len(texts), 0.05))
    assert calibration.agreement_bound >= 0.95 and calibration.mean_exit_layer < 3
    assert calibration.mean_exit_layer == pytest.approx(engine.exit_layer.mean())


def test_auto_keeps_the_stored_knob_on_a_small_input_and_calibrates_a_large_one(
    ray_local, tiny_encoder_dir, tmp_path, monkeypatch, capsys
):
    """`--calibrate-rows auto` (the default) at a test's scale: AUTO_MIN_ROWS 100, so an input of >= 2,000
    rows is calibrated on 5 % of them; the choice, either way, pinned per output folder and stated in the
    summary's `promise` and in MLflow."""
    from pipelines.scoring import calibration

    monkeypatch.setattr(calibration, "AUTO_MIN_ROWS", 100)
    model_dir = sharp_model(tiny_encoder_dir, tmp_path)
    write(tmp_path / "small" / "a.parquet", random_texts(300, seed=7))
    small = score(model_dir, tmp_path / "small", tmp_path / "out", tmp_path)
    assert small["knob"] == 0.95 and "calibration" not in small
    assert "kept the model's stored knob: the input's 300 rows are too few" in small["promise"]
    assert "kept the model's stored knob" in capsys.readouterr().err
    (pinned,) = (tmp_path / "out" / "_calibration").glob("*rows-auto.json")
    assert json.loads(pinned.read_text())["input_rows"] == 300
    write(
        tmp_path / "small" / "b.parquet", random_texts(2000, seed=8)
    )  # now large: the folder keeps its knob
    grown = score(model_dir, tmp_path / "small", tmp_path / "out", tmp_path)
    assert grown["knob"] == 0.95 and grown["output"] == small["output"] and grown["files_skipped"] == 1
    assert "as pinned in" in capsys.readouterr().err

    write(tmp_path / "large" / "a.parquet", random_texts(2400, seed=9))
    large = score(model_dir, tmp_path / "large", tmp_path / "out2", tmp_path, min_agreement=0.8)
    assert large["calibration"]["rows"] == 120 and large["knob"] == large["calibration"]["knob"]
    assert (
        large["calibration"]["met"]
        and f"on 120 rows drawn with seed {large['calibration']['seed']}" in (large["promise"])
    )
    logged = scoring_runs(model_dir).set_index("params.promise")
    assert {small["promise"], large["promise"]} <= set(logged.index)
    asked = score(model_dir, tmp_path / "large", tmp_path / "out3", tmp_path, threshold=0.5)
    assert "calibration" not in asked and asked["promise"].startswith("entropy-0.5 as asked: no promise")

    # a stored knob certified on more rows than auto's sample (150 > 120) is kept, and its promise stated
    certified = EarlyExitConfig.load(model_dir).with_setting(
        ExitSetting("entropy", 0.95), KnobPromise("agreement", 0.99, 0.05, 150, "150 held-out rows")
    )
    certified.save(model_dir)
    kept = score(model_dir, tmp_path / "large", tmp_path / "out4", tmp_path)
    assert kept["knob"] == 0.95 and "calibration" not in kept
    assert kept["promise"].startswith(
        "the model's stored entropy-0.95: agreement with full depth >= 0.99 at confidence 0.95, certified "
        "on 150 rows: 150 held-out rows, not on this corpus (--calibrate-rows auto kept the model's stored "
        "knob: a sample of 120 rows (5% of the input's 2,400) would certify less tightly than the stored "
        "knob's 150"
    )
