"""End to end: jobs/train.py on a tiny model and tiny parquet with real Ray workers, a real MLflow store and
registry; the registered model loads by alias in a fresh process and reproduces in-process predictions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ee_model import EarlyExitClassifier, EarlyExitConfig, ExitSetting
from ee_model.config import KnobPromise
from pipelines.config import load_train_config
from pipelines.data import DataError
from pipelines.model_source import resolve_model
from pipelines.training.pipeline import run_training
from tests.conftest import random_texts

ROOT = Path(__file__).resolve().parents[2]
MODEL_NAME = "tiny-ee"


def job_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
        "PYTHONPATH": str(ROOT),
    }


def run_job(tmp_path: Path, *args: str, timeout: int = 900) -> dict:
    summary = tmp_path / "summary.json"
    command = [
        sys.executable,
        str(ROOT / "jobs" / "train.py"),
        *args,
        "--output",
        str(summary),
        "--set",
        f"tracking.registered_model_name={MODEL_NAME}",
        "--set",
        "model.max_length=32",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=job_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(summary.read_text())


@pytest.mark.slow
@pytest.mark.ray
def test_kl_job_with_two_workers_end_to_end(tmp_path, labeled_parquet, unlabeled_parquet, tiny_encoder_dir):
    summary = run_job(
        tmp_path,
        "--encoder",
        tiny_encoder_dir("bert", num_layers=3),
        "--train-path",
        labeled_parquet,
        "--unlabeled-path",
        unlabeled_parquet,
        "--num-workers",
        "2",
        "--set",
        "data.unlabeled_text_column=body",
        "--set",
        "stage1.epochs=3",
        "--set",
        "stage1.learning_rate=5e-3",
        "--set",
        "stage2.learning_rate=1e-2",
        "--set",  # timed in the default-resources job and the newer families' (eval.precision=auto)
        "eval.wallclock_rows=0",
    )
    assert summary["registered"]["version"] == 1 and summary["registered"]["champion"] is True
    assert summary["test_accuracy_full_depth"] > 0.6
    promise = summary["promise"]  # certified label-free on a slice of the unlabeled corpus, dev beside it
    assert (
        promise["of"] == "agreement with full depth (no labels)"
        and "held out of stage 2" in promise["rows_source"]
    )
    assert set(promise["dev_check"]) == {"retention", "bound", "rows"}

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(summary["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {"stage1", "stage2"}
    for stage, run in by_name.items():
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, f"{stage}_loss")) > 3
        assert client.get_metric_history(run.info.run_id, f"{stage}_dev_score")
        placement = {k: v for k, v in run.data.tags.items() if k.startswith("worker.")}
        assert placement == {
            "worker.device": "cpu",
            "worker.dist_backend": "gloo",
            "worker.world_size": "2",
            "worker.autocast": "off",
        }  # on a GPU: the GPU's name, nccl, bfloat16
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"label_map.json", "config.json", "summary.json", "evaluation", "trade_off", "plots"} <= artifacts
    assert len(client.get_metric_history(parent.info.run_id, "dev_accuracy_layer")) == 3
    assert parent.data.params["rows.train"] == "168"  # 70 % of 240
    assert parent.data.params["rows.unlabeled_overlapping_eval"] == "0"

    version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert (
        int(version.version) == 1
        and int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 1
    )

    # the knob chosen on dev is the registered model's default
    assert summary["knob_source"].startswith("auto") and version.tags["knob"] == str(summary["knob"])
    assert parent.data.params["auto_threshold.knob"] == str(summary["knob"])
    assert parent.data.params["promise.rows_source"] == summary["promise"]["rows_source"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    source = resolve_model(f"models:/{MODEL_NAME}@candidate", tmp_path / "download")
    stored = EarlyExitConfig.load(source.directory)
    assert summary["policy"] == "risk" and stored.setting() == ExitSetting("risk", summary["knob"])
    certified = KnobPromise("agreement", 0.99, 0.05, promise["rows"], promise["rows_source"])
    assert stored.knob_promise == (certified if promise["met"] else None)  # the model says what it promises

    # stage 2 started from stage 1's best checkpoint and left backbone + teacher untouched
    stage1_ckpt = Path(by_name["stage1"].data.tags["best_checkpoint"]) / "model" / "model.safetensors"
    stage2_dir = Path(by_name["stage2"].data.tags["best_checkpoint"]) / "model"
    before, after = load_file(str(stage1_ckpt)), load_file(str(stage2_dir / "model.safetensors"))
    frozen = [k for k in before if k.startswith(("encoder.", "heads.2."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("heads.0."))

    # the registered model, loaded by alias in a fresh process, reproduces in-process predictions
    texts = random_texts(20, seed=4) + ["", None]
    local = EarlyExitClassifier.from_pretrained(stage2_dir).predict(texts, invalid="null", threshold=0.5)
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model('models:/{MODEL_NAME}@candidate')\n"
        "texts = json.loads(sys.stdin.read())\n"
        "out = model.predict(pd.DataFrame({'text': texts}), params={'policy': 'entropy', 'threshold': 0.5})\n"
        "risky = model.predict(pd.DataFrame({'text': texts}), params={'policy': 'risk', 'risk': 0.2})\n"
        "print(risky.to_json(orient='records'))\n"
        "print(out.to_json(orient='records'))\n"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=job_env(tmp_path),
        cwd=tmp_path,
        timeout=300,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    remote = pd.DataFrame(json.loads(fresh.stdout.strip().splitlines()[-1]))
    assert [None if pd.isna(x) else x for x in remote["label"]] == local.label
    # invalid rows: null exit layer, confidence and FLOPs, as jobs/score.py writes them
    assert nullable(remote["exit_layer"]) == local.exit_layer[:-2].tolist() + [None, None]
    assert nullable(remote["flops"])[-2:] == [None, None]
    np.testing.assert_allclose(
        remote["confidence"].to_numpy(float), local.confidence, atol=1e-5, equal_nan=True
    )
    assert remote["error"].tolist()[-2:] == ["empty or whitespace-only text", "null text"]
    # the "risk" policy's fit (on training text, no labels) travels with the registered model
    registered = EarlyExitClassifier.from_pretrained(source.directory)
    assert registered.config.exit_risk is not None and registered.config.exit_risk.n_students == 2
    risky = pd.DataFrame(json.loads(fresh.stdout.strip().splitlines()[-2]))
    expected = registered.predict(texts, invalid="null", policy="risk", risk=0.2)
    assert nullable(risky["exit_layer"]) == expected.exit_layer[:-2].tolist() + [None, None]


def nullable(column: pd.Series) -> list:
    return [None if pd.isna(x) else int(x) for x in column]


@pytest.mark.slow
@pytest.mark.ray
def test_count_job_with_default_resources(tmp_path, labeled_parquet, tiny_encoder_dir):
    """The default resource settings (1 worker at 0.5 CPU, Ray Data beside it) finish on 2 cores."""
    summary = run_job(
        tmp_path,
        "--variant",
        "count",
        "--encoder",
        tiny_encoder_dir("bert", num_layers=3),
        "--train-path",
        labeled_parquet,
        "--set",
        "joint.epochs=3",
        "--set",
        "joint.learning_rate=5e-3",
    )
    assert summary["policy"] == "count" and summary["registered"]["version"] == 1
    assert summary["test_accuracy_full_depth"] > 0.6
    promise = summary["promise"]  # no unlabeled corpus: label-free on the dev texts
    assert promise["of"] == "agreement with full depth (no labels)" and " dev texts" in promise["rows_source"]


@pytest.mark.slow
@pytest.mark.ray
# kl: stage 1, then stage 2 from cached features; count: joint
@pytest.mark.parametrize("family, variant", [("modernbert", "kl"), ("deberta-v2", "count")])
def test_the_job_trains_the_newer_encoder_families(
    tmp_path, labeled_parquet, tiny_encoder_dir, family, variant
):
    """ModernBERT (Ettin) and DeBERTa-v3 through the whole job: training, the automatic knob, registration,
    and the registered pyfunc scoring in a fresh load."""
    epochs = "stage1.epochs=3" if variant == "kl" else "joint.epochs=3"
    rate = "stage1.learning_rate=5e-3" if variant == "kl" else "joint.learning_rate=5e-3"
    summary = run_job(
        tmp_path, "--variant", variant, "--encoder", tiny_encoder_dir(family, num_layers=3),
        "--train-path", labeled_parquet, "--set", epochs, "--set", rate, "--set", "eval.precision=auto",
    )  # fmt: skip
    assert summary["registered"]["version"] == 1 and summary["test_accuracy_full_depth"] > 0.6
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    source = resolve_model(f"models:/{MODEL_NAME}@candidate", tmp_path / "download")
    assert EarlyExitConfig.load(source.directory).encoder_model_type == family
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")
    out = pyfunc.predict(pd.DataFrame({"text": random_texts(20, seed=4) + [None]}))
    assert len(out) == 21 and out["error"].iloc[-1] and out["exit_layer"].iloc[:-1].between(1, 3).all()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.drop_columns(["label"]), r"has no column\(s\) \['label'\]"),
        (
            lambda t: t.set_column(1, "label", __import__("pyarrow").array([None] * t.num_rows, "string")),
            "have a null 'label'",
        ),
        (lambda t: t.slice(0, 0), "training set is empty"),
    ],
)
def test_bad_data_fails_before_training_and_registers_nothing(tmp_path, mutate, message, monkeypatch):
    import pyarrow.parquet as pq

    from tests.conftest import labeled_table

    path = tmp_path / "bad.parquet"
    pq.write_table(mutate(labeled_table()), path)
    monkeypatch.chdir(tmp_path)
    config = load_train_config(
        overrides={
            "data": {"train_path": str(path)},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"},
        }
    )
    with pytest.raises(DataError, match=message):
        run_training(config)
    assert not (tmp_path / "m.db").exists()  # no run, no registry entry, not even a store


def corpus_without_the_text_column(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b"]}), path)


def corpus_that_is_not_parquet(path):
    path.write_bytes(b"not parquet at all")


@pytest.mark.parametrize(
    "write, message",
    [
        (corpus_without_the_text_column, r"has no column\(s\) \['body'\]"),
        (corpus_that_is_not_parquet, "cannot read parquet"),
    ],
)
def test_a_bad_unlabeled_corpus_fails_before_training(tmp_path, labeled_parquet, monkeypatch, write, message):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus / "part-0.parquet")
    monkeypatch.chdir(tmp_path)
    config = load_train_config(
        overrides={
            "data": {
                "train_path": labeled_parquet,
                "unlabeled_path": str(corpus),
                "unlabeled_text_column": "body",
            },
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"},
        }
    )
    with pytest.raises(DataError, match=message):
        run_training(config)
    assert not (tmp_path / "m.db").exists()


def test_unknown_dev_labels_fail_before_training(tmp_path, labeled_parquet, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import labeled_table

    dev = tmp_path / "dev.parquet"
    pq.write_table(labeled_table(30).set_column(1, "label", pa.array(["unseen"] * 30)), dev)
    monkeypatch.chdir(tmp_path)
    config = load_train_config(
        overrides={"data": {"train_path": labeled_parquet, "dev_path": str(dev), "test_path": str(dev)}}
    )
    with pytest.raises(DataError, match=r"dev labels \['unseen'\] never occur in train"):
        run_training(config)
    assert not (tmp_path / "mlflow.db").exists()
