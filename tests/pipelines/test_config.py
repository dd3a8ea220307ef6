"""The typed training config: profiles, YAML, overrides, unknown keys, the tracking URI."""

import pytest

from pipelines.config import TrackingConfig, load_train_config, resolve_tracking_uri


def test_quick_profile_is_the_default_and_full_matches_the_paper():
    quick = load_train_config()
    assert quick.profile == "quick" and quick.variant == "kl"
    assert quick.stages() == ["stage1", "stage2"]
    assert quick.resources.cpus_per_worker < 1  # leaves CPU for Ray Data on small machines
    full = load_train_config(profile="full")
    assert full.stage1.epochs == 10 and full.stage1.checkpoint_every_steps == 1500
    assert full.stage2.learning_rate == pytest.approx(10 * full.stage1.learning_rate)


def test_the_defaults_a_reader_sees_are_the_ones_that_run():
    from pipelines.config import PROFILES, TrainConfig

    assert PROFILES["quick"] == {} and load_train_config() == TrainConfig()
    assert TrainConfig().model.options() == {
        "head_type": "linear",
        "student_head_type": "linear",  # made concrete: the teacher's (ee_model's own: None, the same)
        "pooling": "mean",
        "threshold": 0.1,
        "patience": 3,
        "risk": 0.01,
        "max_length": 64,
        "head_dropout": 0.1,
        "head_norm": "final",
    }  # ee_model.ModelOptions' fields and checks; only max_length has a training default of its own


@pytest.mark.parametrize(
    "overrides, students, stage2_rate",
    [
        ({}, "linear", 1e-2),  # the teacher's head type, at linear students' learning rate
        ({"model": {"student_head_type": "mlp"}}, "mlp", 2e-3),  # MLP students over a linear teacher
        ({"model": {"head_type": "mlp"}, "variant": "count"}, "mlp", 2e-3),
        ({"model": {"student_head_type": "mlp"}, "stage2": {"learning_rate": 5e-3}}, "mlp", 5e-3),  # kept
    ],
)
def test_unset_student_heads_and_stage2_rate_are_made_concrete(overrides, students, stage2_rate):
    config = load_train_config(None, overrides)
    assert config.model.student_head_type == students
    assert config.stage2.learning_rate == pytest.approx(stage2_rate)
    assert config.to_dict()["model"]["student_head_type"] == students  # what MLflow logs


def test_yaml_and_overrides_layer_on_the_profile(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("variant: count\nstage1:\n  epochs: 4\nmodel:\n  pooling: cls\n")
    config = load_train_config(path, {"joint": {"learning_rate": 3e-5}, "model": {"max_length": 32}})
    assert config.variant == "count" and config.stages() == ["joint"]
    assert config.stage1.epochs == 4 and config.model.pooling == "cls" and config.model.max_length == 32
    assert config.joint.learning_rate == 3e-5 and config.joint.batch_size_per_worker == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stage1": {"epochs": 1, "epoch": 2}}, r"unknown key\(s\) in stage1: epoch=2; known: \["),
        ({"modle": {}}, r"unknown key\(s\) in config: modle=\{\}"),
        ({"stage1": {"kl_weight": 0.5}}, r"in stage1: kl_weight=0.5 \(a setting of stage2\)"),
        ({"joint": {"focal_gamma": 2}}, r"in joint: focal_gamma=2 \(a setting of stage1\)"),
        ({"stage2": {"batch_size": 8}}, r"in stage2: batch_size=8 \(now batch_size_per_worker\)"),
        ({"stage2": {"kl_weight": 0, "gold_weight": 0}}, "kl_weight=0, gold_weight=0: both >= 0, not both 0"),
        ({"model": {"max_length": 1}}, r"max_length=1 must be an integer >= 2"),
        ({"variant": "fast"}, "variant='fast' is not one of"),
        ({"model": {"pooling": "max"}}, "pooling='max' is not one of"),
        ({"stage2": {"learning_rate": 0}}, "learning_rate=0 must be > 0"),
        ({"data": {"split_fractions": [0.5, 0.5, 0.5]}}, "must be 3 non-negative numbers summing to 1"),
        ({"data": {"dev_path": "x.parquet"}}, "give both dev_path and test_path"),
        ({"tune": {"sampler": "random"}}, "sampler='random' is not one of"),
        ({"tune": {"lr_min": 1e-3, "lr_max": 1e-4}}, "lr_max=0.0001 must be > lr_min=0.001"),
        ({"eval": {"thresholds": [0.1, 1.5]}}, r"must be values in \[0, 1\]"),
        ({"eval": {"risks": [-0.1, 0.01]}}, r"risks=.*-0.1.* must be values in \[0, 1\]"),
        ({"model": {"policy": "risk"}, "eval": {"exit_risk_rows": 0}}, "eval.exit_risk_rows must be > 0"),
        ({"eval": {"target": "speed"}}, "target='speed' is not one of"),
        ({"eval": {"min_retention": 1.2}}, "min_retention=1.2 must be in"),
        ({"eval": {"delta": 0}}, r"delta=0 must be a number in \(0, 1\)"),
        ({"eval": {"wallclock_batch_sizes": [0]}}, "wallclock_batch_sizes=0 must be > 0"),
        ({"resources": {"num_workers": 0}}, "num_workers=0 is Ray Train's local mode, which keeps no"),
        ({"resources": {"num_workers": -1}}, "num_workers=-1 must be >= 0"),
    ],
)
def test_bad_config_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(overrides=overrides)


def test_tracking_uri_is_always_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    assert resolve_tracking_uri(TrackingConfig()) == f"sqlite:///{tmp_path}/rel/m.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(TrackingConfig()) == "http://mlflow:5000"


def test_timed_thresholds_join_the_sweep_grid():
    config = load_train_config(overrides={"eval": {"thresholds": [0.0, 0.4], "timed_thresholds": [0.25]}})
    assert config.eval.thresholds == (0.0, 0.25, 0.4)
    assert config.eval.auto_threshold and config.eval.target_spec().min_retention == 0.99


def test_score_config_sorts_at_least_one_model_call():
    from pipelines.scoring.config import ScoreConfig

    assert ScoreConfig(model="m", input="i", output="o").rows_per_task == 512
    assert ScoreConfig(model="m", input="i", output="o", batch_size=1024, sort_rows=512).rows_per_task == 1024
    for bad in (
        {"sort_rows": 0},
        {"batch_size": 0},
        {"actors": 0},
        {"policy": "fastest"},
        {"gpus_per_actor": -1},
        {"precision": "int4"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ScoreConfig.from_flags(model="m", input="i", output="o", **bad)
    with pytest.raises(ValueError, match="int8' runs on CPUs"):
        ScoreConfig(model="m", input="i", output="o", precision="int8", gpus_per_actor=1)


def test_score_config_calibration_excludes_a_given_knob():
    from ee_model import ExitRequest
    from pipelines.scoring.config import ScoreConfig

    config = ScoreConfig.from_flags(model="m", input="i", output="o", calibrate_rows=100, policy="count")
    assert config.min_agreement == 0.99 and config.exit == ExitRequest("count")
    for bad, message in (
        ({"calibrate_rows": -1}, "calibrate_rows"),
        ({"min_agreement": 0}, "min_agreement"),
        ({"min_agreement": 1.5}, "min_agreement"),
        ({"delta": 1.0}, "delta=1.0"),
        ({"calibrate_rows": 10, "policy": "none"}, "none"),
        ({"calibrate_rows": 10, "threshold": 0.3}, "not both"),
        ({"calibrate_rows": 10, "patience": 2}, "not both"),
        ({"calibrate_rows": 10, "risk": 0.01}, "not both"),
        ({"risk": 2.0}, r"risk=2.0 must be a number in \[0, 1\]"),
        ({"policy": "count", "risk": 0.01}, "policy 'count' does not use risk=0.01"),
        ({"threshold": 0.3, "risk": 0.01}, "give one knob"),
    ):
        with pytest.raises(ValueError, match=message):
            ScoreConfig.from_flags(model="m", input="i", output="o", **bad)


def test_score_config_calibrates_by_default_unless_a_knob_or_full_depth_is_asked():
    from pipelines.scoring.calibration import auto_calibration_rows
    from pipelines.scoring.config import ScoreConfig

    def config(**flags):
        return ScoreConfig.from_flags(model="m", input="i", output="o", **flags)

    assert config().calibrate_rows == "auto" and config().calibrates
    assert not config(threshold=0.3).calibrates and not config(policy="none").calibrates  # as asked
    assert not config(calibrate_rows="0").calibrates and config(calibrate_rows="250").calibrate_rows == 250
    assert config(policy="entropy").calibrates  # a policy without a knob: its knob is calibrated
    for bad in ("many", "-5", "1.5", -1, True, 2.5):
        with pytest.raises(ValueError, match="calibrate_rows=.* must be 'auto' or a whole number >= 0"):
            config(calibrate_rows=bad)
    # auto: 5 % of an input of >= 20,000 rows, at most 4,000; fewer rows keep the stored knob
    assert [auto_calibration_rows(n) for n in (0, 19_999, 20_000, 50_000, 80_000, 10**7)] == [
        0, 0, 1000, 2500, 4000, 4000
    ]  # fmt: skip
    # a stored knob certified on 4,000 rows: only a sample at least as large pays (inputs of >= 80,000)
    assert [auto_calibration_rows(n, 4000) for n in (20_000, 79_999, 80_000)] == [0, 0, 4000]
    assert auto_calibration_rows(20_000, 325) == 1000  # a dev-certified knob: 1,000 rows beat it


def test_the_trained_models_policy():
    assert load_train_config().exit_policy == "risk"  # kl: entropy and margin, the exit risk fitted
    assert load_train_config(overrides={"eval": {"exit_risk_rows": 0}}).exit_policy == "entropy"
    assert load_train_config(overrides={"variant": "count"}).exit_policy == "count"
    assert load_train_config(overrides={"model": {"policy": "entropy"}}).exit_policy == "entropy"
    assert (
        load_train_config(overrides={"variant": "count", "model": {"policy": "risk"}}).exit_policy == "risk"
    )


def test_a_local_encoder_folder_is_made_absolute_for_the_workers(tmp_path, monkeypatch):
    from pipelines.training.pipeline import training_encoder

    (tmp_path / "my-encoder").mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_train_config(overrides={"model": {"encoder": "my-encoder"}})
    assert training_encoder(config) == str(tmp_path / "my-encoder")  # Ray Train workers run elsewhere
    hub_id = load_train_config(overrides={"model": {"encoder": "org/some-encoder"}})
    assert training_encoder(hub_id) == "org/some-encoder"  # not a folder here: a hub id, left alone
