"""Bad flag and config values end the jobs at once: one line naming the value, exit status 2, and nothing
started or written (no Ray session, no MLflow store, no ray_results)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
        timeout=120,
    )


def assert_refused(result: subprocess.CompletedProcess, message: str, tmp_path: Path) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith(f"error: {message}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, ray_results, outputs


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
        (["--precision", "int4"], "precision='int4' is not one of ['auto', 'fp32', 'bf16', 'int8']"),
        (["--precision", "int8", "--backend", "torch"], "backend 'torch' does not run int8"),
        (["--precision", "int8", "--gpus-per-actor", "1"], "precision 'int8' runs on CPUs"),
    ],
)
def test_score_job_refuses_bad_knobs_before_anything_starts(tmp_path, flags, message):
    result = run(tmp_path, "score.py", "--model", "m", "--input", "in", "--output", "out", *flags)
    assert_refused(result, message, tmp_path)


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
    ],
)
def test_train_job_refuses_bad_config_values_before_anything_starts(tmp_path, sets, message):
    result = run(tmp_path, "train.py", *[arg for s in sets for arg in ("--set", s)])
    assert_refused(result, message, tmp_path)


def test_train_job_names_a_yaml_file_that_does_not_parse(tmp_path):
    config = tmp_path.parent / f"{tmp_path.name}-bad.yaml"
    config.write_text("stage1: [1, 2\n")
    result = run(tmp_path, "train.py", "--config", str(config))
    assert_refused(result, f"{config} is not valid YAML", tmp_path)
