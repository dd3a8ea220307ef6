"""Every benchmark kept in benchmarks/ runs end to end on a tiny model and a small input, as a user runs it
(`python benchmarks/<name>.py`, a fresh process): a refactor that breaks one fails here. The numbers are not
checked (a tiny random model on a few rows measures nothing); docs/results.md holds the real runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import labeled_table, trained_tiny

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_encoder_dir):
    """(a trained tiny early-exit model's folder, its encoder's folder)."""
    encoder = tiny_encoder_dir("bert", num_layers=2)
    return str(trained_tiny(encoder).save_pretrained(tmp_path_factory.mktemp("bench") / "model")), encoder


def run(tmp_path: Path, name: str, *args: str, timeout: int = 600) -> str:
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_exit_speed(tmp_path, tiny):
    out = tmp_path / "exit_speed.json"
    run(tmp_path, "exit_speed", "--model", tiny[0], "--batch-sizes", "1", "8", "--rows", "16",
        "--rows-batch-1", "4", "--repeats", "1", "--out", str(out))  # fmt: skip
    assert json.loads(out.read_text())["results"]


def test_cpu_runtimes(tmp_path, tiny):
    printed = run(tmp_path, "cpu_runtimes", "--model", tiny[0], "--rows", "64", "--calibrate-rows", "64",
                  "--repeats", "1")  # fmt: skip
    assert "| plain torch-fp32 |" in printed and "| ee-fp32 |" in printed
    assert "auto picked " in printed and printed.count("| picked |") == 1  # what auto chose, beside the rest


@pytest.mark.ray
def test_score_pool(tmp_path, tiny):
    printed = run(tmp_path, "score_pool", "--model", tiny[0], "--rows", "100", "--files", "2",
                  "--precision", "fp32")  # fmt: skip
    assert "default_over_one_actor" in printed


@pytest.mark.ray
def test_score_throughput(tmp_path, tiny):
    out = tmp_path / "score_throughput.json"
    run(tmp_path, "score_throughput", "--model", tiny[0], "--rows", "200", "--calibrate-rows", "100",
        "--memory-long-rows", "3", "--row-bytes", "200000", "--out", str(out))  # fmt: skip
    memory = json.loads(out.read_text())["memory"]
    assert memory[0]["rows_scored"] == 3 and memory[0]["peak_worker_pss_mib"] > 0


@pytest.mark.ray
def test_tokenize_speed(tmp_path, tiny):
    out = tmp_path / "tokenize_speed.json"
    run(tmp_path, "tokenize_speed", "--tokenizer", tiny[0], "--rows", "64", "--repeats", "1", "--model",
        tiny[0], "--actors", "2", "--out", str(out))  # fmt: skip
    assert "tasks_over_actor" in json.loads(out.read_text())["scoring"]


@pytest.mark.ray
def test_tradeoff(tmp_path, tiny):
    labeled = tmp_path / "labeled.parquet"
    pq.write_table(labeled_table(240), labeled)
    sets = [f"model.encoder={tiny[1]}", f"data.train_path={labeled}", "data.unlabeled_path=",
            "model.max_length=32", "stage1.epochs=1", "stage2.epochs=1", "joint.epochs=1",
            "eval.wallclock_rows=0", "tracking.register=false"]  # fmt: skip
    run(tmp_path, "tradeoff", "--wallclock-rows", "8", "--out", str(tmp_path / "tradeoff"),
        *[arg for s in sets for arg in ("--set", s)], timeout=900)  # fmt: skip
    assert list(tmp_path.glob("tradeoff*"))


def test_encoder_families(tmp_path):
    out = tmp_path / "encoder_families.json"
    run(tmp_path, "encoder_families", "--rows", "16", "--repeats", "1", "--out", str(out))
    families = [r["family"] for r in json.loads(out.read_text())["results"]]
    assert families == ["bert", "modernbert", "deberta-v2"]


def test_exit_promise(tmp_path, tiny):
    import pyarrow as pa

    table = labeled_table(200, seed=3)
    unseen = tmp_path / "unseen.parquet"
    pq.write_table(pa.table({"text": table["text"], "gold": table["label"]}), unseen)
    out = tmp_path / "promise"
    printed = run(tmp_path, "exit_promise", "--corpus", f"tiny={tiny[0]}@{unseen}",
                  "--corpus", f"refit={tiny[0]}@{unseen}", "--refit-risk", f"refit={unseen}",
                  "--sizes", "50", "150", "--draws", "2", "--out", str(out))  # fmt: skip
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    tiny_rows = [(r["rule"], r["calibrated_on"]) for r in rows if r["corpus"] == "tiny"]
    assert tiny_rows == [
        ("entropy", "stored knob 0.5"),
        ("entropy", "all 200 rows, no bound"),
        ("entropy", "50 rows"),
    ]  # fmt: skip (the model has no exit risk)
    refit_rows = [(r["rule"], r["calibrated_on"]) for r in rows if r["corpus"] == "refit"]
    assert ("risk", "50 rows") in refit_rows and not any(on.startswith("stored") for _, on in refit_rows)
    assert rows[2]["draws"] == 2 and 0 <= rows[2]["share_of_gold_oracle"] <= 1
    assert "over half the 200 rows; skipped" in printed


@pytest.mark.ray
def test_default_scoring(tmp_path, tiny):
    out = tmp_path / "default"
    printed = run(tmp_path, "default_scoring", "--scorer", f"tiny={tiny[0]}:--policy=none", "--rows", "40",
                  "--repeats", "1", "--out", str(out))  # fmt: skip
    (row,) = json.loads(out.with_suffix(".json").read_text())["scorers"]
    assert row["agreement_with_reference"] == 1.0 and row["promise"].startswith("full depth, as asked")
    assert "| tiny | --policy none |" in printed
