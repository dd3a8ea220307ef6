"""jobs/score.py as users run it: a registered model by alias in a fresh process, and a run killed mid-way
then rerun gives outputs identical to a clean run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from ee_model import EarlyExitClassifier
from pipelines.model_source import weights_digest
from pipelines.tracking import log_pyfunc_model, register, setup_tracking
from tests.conftest import LABELS, random_texts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROWS = 800  # per file of the killed run's input


def env_for(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }


def score_command(model: str, input_dir: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "jobs" / "score.py"),
        "--model",
        model,
        "--input",
        str(input_dir),
        "--output",
        str(output),
        "--batch-size",
        "32",
        "--precision",  # exact labels whatever the CPU (auto picks int8 or bf16 on most)
        "fp32",
        *extra,
    ]


@pytest.fixture
def model_dir(tmp_path, tiny_encoder_dir):
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("bert", num_layers=3), labels=LABELS, threshold=0.95
    )
    return model.save_pretrained(tmp_path / "model")


def outputs_of(folder: Path) -> dict[str, pa.Table]:
    (key,) = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")]  # not _calibration
    return {p.name: pq.read_table(p) for p in sorted(key.glob("*.parquet"))}


def test_registered_model_by_alias_in_a_fresh_process(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    setup_tracking(f"sqlite:///{tmp_path}/mlflow.db", "registry")
    with mlflow.start_run():
        info = log_pyfunc_model(model_dir, ["a text", "another"])
    register(info.model_uri, "tiny-scorer", dev_accuracy=0.5, tags={})
    (tmp_path / "in").mkdir()
    texts = random_texts(50, seed=3) + [None]
    pq.write_table(
        pa.table({"text": pa.array(texts, pa.string()), "n": list(range(51))}), tmp_path / "in" / "a.parquet"
    )
    result = subprocess.run(
        score_command(
            "models:/tiny-scorer@champion",
            tmp_path / "in",
            tmp_path / "out",
            "--summary-file",
            str(tmp_path / "s.json"),
        ),
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    digest = weights_digest(Path(model_dir))  # the registry's name and version, and these exact weights
    assert summary["model_version"] == "1" and summary["output"].endswith(
        f"tiny-scorer-v1-{digest}__entropy-0.95"
    )
    out = outputs_of(tmp_path / "out")["a.parquet"]
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts, invalid="null")
    assert out["label"].to_pylist() == expected.label and out["n"].to_pylist() == list(range(51))
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("early-exit-scoring").experiment_id])
    assert runs[0].data.tags["model_version"] == "1" and runs[0].data.metrics["rows_scored"] == 51
    assert runs[0].data.metrics["errors"] == 1


def test_killed_run_then_rerun_equals_a_clean_run(tmp_path, model_dir):
    inputs = tmp_path / "in"
    inputs.mkdir()
    files = 16  # one actor commits a block (a few files) at a time, a second apart: the kill lands mid-run
    for f in range(files):
        texts = random_texts(ROWS, seed=f, max_words=40)
        pq.write_table(
            pa.table({"text": texts, "row": list(range(ROWS)), "file": [f] * ROWS}),
            inputs / f"part-{f}.parquet",
        )
    clean = subprocess.run(  # the reference: the default pool (the outputs do not depend on it)
        score_command(str(model_dir), inputs, tmp_path / "clean"),
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert clean.returncode == 0, clean.stderr[-4000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        score_command(str(model_dir), inputs, killed, "--actors", "1"),
        cwd=tmp_path,
        env=env_for(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and not list(killed.glob("*/part-*.parquet")):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-run
    process.wait()
    done = {p.name for p in killed.glob("*/part-*.parquet")}
    assert 1 <= len(done) < files, f"the kill did not land mid-run: {len(done)} files committed"
    for table in outputs_of(killed).values():  # what is visible is complete
        assert table.num_rows == ROWS

    rerun = subprocess.run(
        score_command(str(model_dir), inputs, killed, "--summary-file", str(tmp_path / "s.json")),
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["files_skipped"] == len(done) and summary["files_scored"] == files - len(done)
    clean_out, resumed = outputs_of(tmp_path / "clean"), outputs_of(killed)
    assert set(clean_out) == set(resumed) and len(resumed) == files
    for name, table in clean_out.items():  # float outputs may differ in the last bits with batch composition
        exact = [c for c in table.column_names if c != "confidence"]
        assert resumed[name].select(exact).equals(table.select(exact)), name
        np.testing.assert_allclose(
            resumed[name]["confidence"].to_numpy(), table["confidence"].to_numpy(), atol=1e-5
        )
