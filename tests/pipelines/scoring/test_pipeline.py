"""The scoring job's stream: the model shipped to an actor pool, sorted model calls, a tokenising stage, int8
layers, runs side by side."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from ee_model import EarlyExitClassifier, ExitSetting
from ee_model.signals import normalised_entropy
from pipelines.model_source import ModelSourceError
from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.pipeline import ScoringError
from tests.conftest import random_texts
from tests.pipelines.scoring.helpers import AWKWARD, read_outputs, score, scoring_runs, write


def test_shipped_files_go_to_memory_only_where_it_has_room(tmp_path, monkeypatch):
    """An actor writes a shipped model to /dev/shm for the moment it reads it, when /dev/shm is writable and
    has room for it twice over plus a margin (containers often mount 64 MB there); else to /tmp."""
    import shutil
    from collections import namedtuple

    from pipelines import model_source

    room = tmp_path / "shm"
    room.mkdir()
    monkeypatch.setattr(model_source, "MEMORY_SCRATCH", room)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(64 << 20, 0, 64 << 20))  # Docker's default
    assert model_source.memory_scratch(10 << 20) is None  # 10 MB twice + the margin do not fit in 64 MB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(8 << 30, 0, 8 << 30))
    assert model_source.memory_scratch(180 << 20) == str(room)
    assert model_source.memory_scratch(0) is None  # a folder the driver gave: nothing is written
    monkeypatch.setattr(model_source, "MEMORY_SCRATCH", tmp_path / "absent")
    assert model_source.memory_scratch(180 << 20) is None


def test_a_model_folder_left_in_memory_by_a_killed_load_is_removed_later(tmp_path, monkeypatch):
    import os
    import time

    from pipelines import model_source

    monkeypatch.setattr(model_source, "MEMORY_SCRATCH", tmp_path)
    stale, loading, other = tmp_path / "ee-model-old", tmp_path / "ee-model-now", tmp_path / "someone-else"
    for folder in (stale, loading, other):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights").write_bytes(b"x" * 100)
    hours_ago = time.time() - 2 * 3600
    for folder in (stale, other):
        os.utime(folder, (hours_ago, hours_ago))
    model_source.memory_scratch(1 << 20)
    assert not stale.exists()  # left by a process killed mid-load
    assert loading.exists() and other.exists()  # a load under way; not ours


def test_policy_defaults_come_from_the_model(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(10))
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (summary["policy"], summary["knob"]) == ("entropy", 0.95)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full depth asked for: no "saved little" warning
        full = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, policy="none")
    assert full["mean_exit_layer"] == 3 and full["output"].endswith("__none")
    with pytest.warns(UserWarning, match=r"early exit saved little on these texts \(FLOPs speed-up"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, policy="entropy", threshold=0.0)


@pytest.mark.parametrize(
    "reference, message",
    [
        ("/no/such/model", "no such directory, and not an MLflow model URI"),
        ("models:/never-registered@champion", "cannot load model 'models:/never-registered@champion'"),
    ],
)
def test_model_that_cannot_be_loaded_is_named(tmp_path, reference, message, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    write(tmp_path / "x.parquet", ["a"])
    with pytest.raises(ModelSourceError, match=message):
        score(reference, tmp_path / "x.parquet", tmp_path / "out", tmp_path)


def test_model_calls_of_sorted_rows_score_like_one_call(model_dir):
    from pipelines.scoring.scorer import Scorer

    texts = AWKWARD + random_texts(57, seed=4)
    batch = pa.table({"text": pa.array(texts, pa.string()), "id": list(range(len(texts)))})
    model = EarlyExitClassifier.from_pretrained(model_dir)
    encoded = model.tokenizer(texts[-57:], padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        first = model(encoded["input_ids"], encoded["attention_mask"]).logits[0]
    threshold = float(normalised_entropy(first).median())  # about half the rows leave at layer 1
    setting = ExitSetting("entropy", threshold)
    whole = Scorer(model_dir, "text", setting, include_probs=True)(batch)
    sorted_calls = Scorer(model_dir, "text", setting, include_probs=True, batch_size=4)(batch)
    assert sorted_calls["id"].to_pylist() == whole["id"].to_pylist()  # input order kept
    for column in ("label", "exit_layer", "tokens", "flops", "error"):
        assert sorted_calls[column].to_pylist() == whole[column].to_pylist(), column
    scored = [p is not None for p in whole["probs"].to_pylist()]
    np.testing.assert_allclose(
        np.array([p for p in sorted_calls["probs"].to_pylist() if p is not None]),
        np.array([p for p in whole["probs"].to_pylist() if p is not None]),
        atol=1e-5,
    )
    assert sum(scored) == len(texts) - 3  # None, "" and whitespace are not scored
    assert len(set(whole["exit_layer"].drop_null().to_pylist())) > 1  # rows really exit at different layers


def test_actors_load_the_model_from_the_object_store_not_the_drivers_folder(ray_local, model_dir, tmp_path):
    """On a cluster the driver's download folder exists on the driver's node only: actors must not read it."""
    import shutil

    from pipelines.model_source import ModelFiles, resolve_model
    from pipelines.scoring.inputs import inspect_inputs
    from pipelines.scoring.pipeline import build_dataset, ship_model

    copy = shutil.copytree(model_dir, tmp_path / "driver-only")
    texts = random_texts(50, seed=4) + [None]
    write(tmp_path / "in" / "a.parquet", texts)
    shipped = ship_model(resolve_model(str(copy), tmp_path / "dl"))
    shutil.rmtree(copy)  # before any actor starts (Ray Data starts them when the stream is read)
    config = ScoreConfig(
        model=str(copy), input=str(tmp_path / "in"), output=str(tmp_path / "out"), batch_size=16
    )
    inputs, _ = inspect_inputs(config.input, tmp_path / "out", "text", "")
    dataset = build_dataset(inputs, config, shipped)
    out = pa.concat_tables(list(dataset.iter_batches(batch_size=None, batch_format="pyarrow")))
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts, invalid="null")
    assert out["label"].to_pylist() == expected.label and out["error"].to_pylist()[-1] == "null text"
    files = ModelFiles.from_directory(model_dir)
    assert set(files.files) >= {"model.safetensors", "ee_config.json"}
    written = files.write_to(tmp_path / "again")
    assert ModelFiles.from_directory(written) == files


def test_two_jobs_at_once_on_a_cluster_their_actors_fill_both_finish(ray_local, model_dir, tmp_path):
    """2 CPUs, two jobs whose actors take one CPU each: reading must not wait for a CPU (it used to hang)."""
    for name in ("p", "q"):
        for i in range(3):
            write(tmp_path / name / f"{i}.parquet", random_texts(40, seed=i))
    results: dict[str, dict] = {}

    def job(name: str) -> None:
        (tmp_path / f"db-{name}").mkdir()  # one store each: two sqlite writers at once are not the point here
        results[name] = score(model_dir, tmp_path / name, tmp_path / f"out-{name}", tmp_path / f"db-{name}")

    threads = [threading.Thread(target=job, args=(name,), daemon=True) for name in ("p", "q")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads), "scoring jobs deadlocked on the cluster's CPUs"
    assert [results[n]["rows_scored"] for n in ("p", "q")] == [120, 120]


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_unreadable_weights_are_refused_by_the_driver(model_dir, tmp_path, damage):
    import shutil

    broken = Path(shutil.copytree(model_dir, tmp_path / "broken"))
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not safetensors" * 100)
    write(tmp_path / "in" / "a.parquet", ["x"])
    with pytest.raises(ModelSourceError, match=r"cannot read .*broken/model.safetensors"):
        score(str(broken), tmp_path / "in", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_tokenizing_stage_gives_the_actors_results(ray_local, model_dir, tmp_path):
    """--tokenize tasks: CPU tasks tokenise before the actors; every row, reason and score equals the actors
    tokenising themselves, and no stage column reaches the output."""
    texts = AWKWARD + random_texts(120, seed=6, max_words=80)
    write(tmp_path / "in" / "a.parquet", texts, doc_id=pa.array(range(len(texts))))
    write(tmp_path / "in" / "b.parquet", random_texts(33, seed=7))
    common = dict(include_probs=True, sort_rows=64)
    actor = score(model_dir, tmp_path / "in", tmp_path / "out-actor", tmp_path, tokenize="actor", **common)
    tasks = score(model_dir, tmp_path / "in", tmp_path / "out-tasks", tmp_path, tokenize="tasks", **common)
    assert (actor["tokenize"], tasks["tokenize"]) == ("actor", "tasks")
    assert tasks["rows_in"] == tasks["rows_scored"] == len(texts) + 33 and tasks["errors"] == 3
    by_actor, by_tasks = read_outputs(actor), read_outputs(tasks)
    assert set(by_tasks) == {"a.parquet", "b.parquet"}
    for name, table in by_tasks.items():
        assert table.column_names == by_actor[name].column_names  # no __ee_ column left
        for column in ("text", "label", "exit_layer", "tokens", "error"):
            assert table[column].to_pylist() == by_actor[name][column].to_pylist(), (name, column)
        np.testing.assert_allclose(
            np.array([p or [0.0] * 3 for p in table["probs"].to_pylist()]),
            np.array([p or [0.0] * 3 for p in by_actor[name]["probs"].to_pylist()]),
            atol=1e-6,
        )
    run = scoring_runs(model_dir, output_format="list")[0]
    assert run.data.params["tokenize"] in ("actor", "tasks") and "driver_busy_share" in run.data.metrics


def test_a_tokenizing_stage_without_a_spare_cpu_is_refused_before_scoring(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(10, seed=1))
    with pytest.raises(ScoringError, match="a CPU the scoring actors do not hold.*--tokenize actor"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, tokenize="tasks", actors=2)
    assert not (tmp_path / "out").exists()


def assert_scored_by(summary, local, texts, threshold: float) -> None:
    """The run's a.parquet is what `local` (the model in the run's runtime) gives at entropy `threshold`:
    the same errors, >= 99 % of labels (reduced precision moves a few with their batch-mates)."""
    expected = local.predict(texts, policy="entropy", threshold=threshold, batch_size=16, invalid="null")
    out = read_outputs(summary)["a.parquet"]
    assert out["error"].to_pylist() == expected.error
    assert np.mean(np.array(out["label"].to_pylist()) == np.array(expected.label)) >= 0.99


def test_int8_scoring_builds_the_layers_once_calibrates_in_int8_and_keys_apart(
    ray_local, tiny_encoder_dir, tmp_path
):
    from ee_model import load_int8
    from ee_model.int8 import MANIFEST
    from tests.conftest import trained_tiny

    model_dir = str(trained_tiny(tiny_encoder_dir("bert", num_layers=3)).save_pretrained(tmp_path / "model"))
    texts = random_texts(300, seed=7) + [None, "", "good great"]
    write(tmp_path / "in" / "a.parquet", texts)
    int8 = {"precision": "int8", "backend": "onnxruntime", "calibrate_rows": 300, "min_agreement": 0.95}
    first = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **int8)
    assert first["precision"] == "int8" and first["output"].endswith(f"__entropy-{first['knob']:g}__int8")
    assert first["rows_scored"] == len(texts) and first["errors"] == 2
    layers = next((tmp_path / "out" / "_int8").iterdir())
    stamp = (layers / MANIFEST).stat().st_mtime_ns
    assert json.loads((layers / MANIFEST).read_text())["layers"] == 3
    calibration = first["calibration"]
    assert calibration["met"] and not calibration["pinned"] and first["knob"] > 0
    assert "exit engine" in calibration["reason"]
    assert calibration["agreement"] > calibration["agreement_bound"] >= 0.95
    assert list((tmp_path / "out" / "_calibration").glob("*__entropy__int8__*"))  # its own pinned file
    # what the actors ran: the same int8 layers, the calibrated S
    assert_scored_by(first, load_int8(model_dir, layers, threads=1), texts, first["knob"])

    write(tmp_path / "in" / "b.parquet", random_texts(40, seed=8))
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **int8)
    assert again["output"] == first["output"] and (again["files_scored"], again["files_skipped"]) == (1, 1)
    assert again["calibration"]["pinned"] and (layers / MANIFEST).stat().st_mtime_ns == stamp  # not rebuilt
    fp32 = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, threshold=first["knob"])
    assert fp32["output"] == first["output"].removesuffix("__int8") and fp32["files_scored"] == 2
    runs = scoring_runs(model_dir, order_by=["start_time ASC"])
    assert runs["params.precision"].tolist() == ["int8", "int8", "fp32"]


def test_openvino_int8_scoring_calibrates_its_layers_on_the_inputs_once(
    ray_local, tiny_encoder_dir, tmp_path
):
    """Calibrated on the inputs' rows; a first input too small to calibrate on (5 rows) gives layers that
    are used with a warning and rebuilt once the inputs hold enough rows, then kept."""
    from ee_model.openvino_layers import CALIBRATION_ROWS, read_manifest
    from ee_model.runtime import Runtime
    from ee_model.runtime_layers import with_runtime
    from tests.conftest import trained_tiny

    fp32 = trained_tiny(tiny_encoder_dir("bert", num_layers=3))
    model_dir = str(fp32.save_pretrained(tmp_path / "model"))
    texts = random_texts(5, seed=7) + [None, "", "good great"]
    write(tmp_path / "in" / "a.parquet", texts)
    int8 = {"precision": "int8", "backend": "openvino", "threshold": 0.3}
    with pytest.warns(UserWarning, match=rf"calibrated on 6 rows, fewer than {CALIBRATION_ROWS}"):
        first = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **int8)
    assert first["precision"] == "int8-openvino" and first["output"].endswith("__int8-openvino")
    assert first["rows_scored"] == len(texts) and first["errors"] == 2
    layers = next((tmp_path / "out" / "_openvino-int8").iterdir())
    manifest = read_manifest(layers)
    assert manifest["kind"] == "int8" and manifest["calibration_rows"] == len(texts) - 2  # all valid rows
    # what the actors ran: those layers
    assert_scored_by(first, with_runtime(fp32, Runtime("int8", "openvino"), layers, threads=1), texts, 0.3)

    write(tmp_path / "in" / "b.parquet", random_texts(CALIBRATION_ROWS + 100, seed=8))
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **int8)
    assert again["output"] == first["output"] and (again["files_scored"], again["files_skipped"]) == (1, 1)
    manifest = read_manifest(layers)
    assert manifest["calibration_rows"] == CALIBRATION_ROWS  # rebuilt on enough of the inputs' rows
    write(tmp_path / "in" / "c.parquet", random_texts(40, seed=9))
    score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **int8)
    assert read_manifest(layers) == manifest  # then kept, not recalibrated on new inputs


@pytest.mark.parametrize("family", ["modernbert", "deberta-v2"])
def test_the_newer_encoder_families_score_and_refuse_exported_layers(
    ray_local, tiny_encoder_dir, tmp_path, family
):
    from ee_model import EarlyExitClassifier
    from pipelines.errors import UserError
    from tests.conftest import trained_tiny

    model_dir = str(trained_tiny(tiny_encoder_dir(family, num_layers=3)).save_pretrained(tmp_path / "model"))
    texts = random_texts(60, seed=7) + [None, ""]
    write(tmp_path / "in" / "a.parquet", texts)
    with pytest.raises(UserError, match="runtime int8-openvino exports the layers one by one.*fp32 or bf16"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, precision="int8")
    assert not (tmp_path / "out").exists()  # refused before anything was written
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, threshold=0.3)
    assert summary["rows_scored"] == len(texts) and summary["errors"] == 2
    local = EarlyExitClassifier.from_pretrained(model_dir)
    expected = local.predict(texts, policy="entropy", threshold=0.3, batch_size=16, invalid="null")
    out = read_outputs(summary)["a.parquet"]
    assert out["label"].to_pylist() == expected.label  # fp32: exact at any batch size
    assert out["exit_layer"].to_pylist()[:60] == expected.exit_layer[:60].tolist()
