"""Bad flag and config values end the jobs at once: one line naming the value, exit status 2, and nothing
started or written (no Ray session, no MLflow store, no ray_results). Each job is run once as users run it (a
fresh process); the other values are checked in this process through the same CLI (typer's runner), which
takes milliseconds instead of the seconds a process needs to import Ray, torch and transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from jobs import score, train
from tests.conftest import labeled_table

ROOT = Path(__file__).resolve().parents[2]
APPS = {"score.py": score.app, "train.py": train.app}


def run(tmp_path: Path, job: str, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / job), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def run_in_process(tmp_path: Path, monkeypatch, job: str, *args: str) -> subprocess.CompletedProcess:
    """The job's CLI called in this process, in `tmp_path`, as `run` calls it in a fresh one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    result = CliRunner().invoke(APPS[job], list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_refused(result: subprocess.CompletedProcess, message: str, tmp_path: Path) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {message}"), result.stderr[-2000:]
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, ray_results, outputs


def test_each_job_refuses_a_bad_value_in_a_fresh_process(tmp_path):
    score_dir, train_dir = tmp_path / "score", tmp_path / "train"
    score_dir.mkdir(), train_dir.mkdir()
    score_args = ("--model", "m", "--input", "in", "--output", "out", "--threshold", "-1")
    assert_refused(run(score_dir, "score.py", *score_args), "threshold=-1.0 must be a number", score_dir)
    refused = run(train_dir, "train.py", "--set", "model.threshold=1.5")
    assert_refused(refused, "threshold=1.5 must be a number in [0, 1]", train_dir)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--threshold", "-1"], "threshold=-1.0 must be a number in [0, 1]"),
        (["--threshold", "2"], "threshold=2.0 must be a number in [0, 1]"),
        (["--threshold", "nan"], "threshold=nan must be a number in [0, 1]"),
        (["--patience", "0"], "patience=0 must be an integer >= 1"),
        (["--patience", "-3"], "patience=-3 must be an integer >= 1"),
        (["--policy", "entropy", "--patience", "3"], "policy 'entropy' does not use patience=3"),
        (
            ["--policy", "fastest"],
            "policy='fastest' is not one of ['entropy', 'risk', 'count', 'patience', 'none']",
        ),
        (["--risk", "1.5"], "risk=1.5 must be a number in [0, 1]"),
        (["--policy", "entropy", "--risk", "0.1"], "policy 'entropy' does not use risk=0.1"),
        (["--calibrate-rows", "500", "--risk", "0.1"], "calibrate_rows chooses the knob"),
        (["--calibrate-rows", "500", "--delta", "0"], "delta=0.0 must be a number in (0, 1)"),
        (["--calibrate-rows", "lots"], "calibrate_rows='lots' must be 'auto' or a whole number >= 0"),
        (["--precision", "int4"], "precision='int4' is not one of ['auto', 'fp32', 'bf16', 'int8']"),
        (["--precision", "int8", "--backend", "torch"], "backend 'torch' does not run int8"),
        (["--precision", "int8", "--gpus-per-actor", "1"], "precision 'int8' runs on CPUs"),
    ],
)
def test_score_job_refuses_bad_knobs_before_anything_starts(tmp_path, monkeypatch, flags, message):
    result = run_in_process(
        tmp_path, monkeypatch, "score.py", "--model", "m", "--input", "in", "--output", "out", *flags
    )
    assert_refused(result, message, tmp_path)


def test_score_job_refuses_an_output_that_is_a_file_before_anything_starts(tmp_path, monkeypatch):
    taken = tmp_path.parent / f"{tmp_path.name}-scored.parquet"  # outside tmp_path: nothing may appear there
    taken.write_bytes(b"PAR1")
    for output, where in ((taken, "is a file"), (taken / "day-1", f"is below {str(taken)!r}, a file")):
        result = run_in_process(
            tmp_path, monkeypatch, "score.py", "--model", "m", "--input", "in", "--output", str(output)
        )
        assert_refused(result, f"output={str(output)!r} {where}: give a folder", tmp_path)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["model.threshold=1.5"], "threshold=1.5 must be a number in [0, 1]"),
        (["model.patience=0"], "patience=0 must be an integer >= 1"),
        (["model.risk=-0.5"], "risk=-0.5 must be a number in [0, 1]"),
        (["eval.exit_risk_rows=-1"], "exit_risk_rows=-1 must be >= 0"),
        (["model.policy=none"], "model.policy='none' is not one of ['entropy', 'risk', 'count', 'patience']"),
        (["model.head_dropout=2.0"], "head_dropout=2.0 must be in [0, 1)"),
        (["model.pooling=max"], "pooling='max' is not one of"),
        (["eval.delta=1.5"], "delta=1.5 must be a number in (0, 1)"),
        (["stage1.kl_weight=0.5"], "unknown key(s) in stage1: kl_weight=0.5 (a setting of stage2)"),
        (["variant=fast"], "variant='fast' is not one of ['kl', 'count']"),
        (["model.max_length=1"], "max_length=1 must be an integer >= 2"),
        (["model.head_norm=layer"], "head_norm='layer' is not one of ['final', 'own']"),
        (["model.student_head_type=conv"], "student_head_type='conv' is not one of ['linear', 'mlp']"),
        (["model.head_norm=own"], "head_norm='own' is for encoders whose inner layers leave un-normalised"),
    ],
)
def test_train_job_refuses_bad_config_values_before_anything_starts(tmp_path, monkeypatch, sets, message):
    result = run_in_process(tmp_path, monkeypatch, "train.py", *[arg for s in sets for arg in ("--set", s)])
    assert_refused(result, message, tmp_path)


def test_train_job_names_a_yaml_file_that_does_not_parse(tmp_path, monkeypatch):
    config = tmp_path.parent / f"{tmp_path.name}-bad.yaml"
    config.write_text("stage1: [1, 2\n")
    result = run_in_process(tmp_path, monkeypatch, "train.py", "--config", str(config))
    assert_refused(result, f"{config} is not valid YAML", tmp_path)


def test_train_job_refuses_bad_data_before_ray_starts(tmp_path, monkeypatch):
    """Data the job cannot train on ends it in one line before Ray starts (this test may not start Ray:
    conftest refuses it), nothing written where it runs."""
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    data_dir.mkdir(), run_dir.mkdir()
    table = labeled_table()
    blank = data_dir / "blank.parquet"
    pq.write_table(table.set_column(1, "label", pa.array([""] * table.num_rows)), blank)
    refused = run_in_process(run_dir, monkeypatch, "train.py", "--train-path", str(blank))
    assert_refused(refused, f"{str(blank)!r}: 240 row(s) have an empty 'label'", run_dir)
