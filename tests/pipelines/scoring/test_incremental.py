"""Scoring again into the same output: what is skipped, what is scored again, names kept apart, one run at a
time."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import pytest
import torch

from ee_model import EarlyExitClassifier
from tests.conftest import LABELS, random_texts
from tests.pipelines.scoring.helpers import read_outputs, rows_by_output, score, write


def test_second_run_skips_everything_and_new_files_are_scored_alone(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(30, seed=1))
    first = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    before = read_outputs(first)["a.parquet"]
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (again["files_scored"], again["files_skipped"], again["rows_scored"]) == (0, 1, 0)
    write(tmp_path / "in" / "b.parquet", random_texts(20, seed=5))
    third = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (third["files_scored"], third["files_skipped"], third["rows_scored"]) == (1, 1, 20)
    assert read_outputs(third)["a.parquet"].equals(before)
    other = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, threshold=0.5)  # new knob: new key
    assert other["files_scored"] == 2 and other["output"] != first["output"]


def test_same_file_name_in_two_folders_through_a_glob_keeps_both(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "x" / "part-0.parquet", random_texts(15, seed=1))
    write(tmp_path / "in" / "y" / "part-0.parquet", random_texts(25, seed=2))
    summary = score(model_dir, f"{tmp_path}/in/*/part-0.parquet", tmp_path / "out", tmp_path)
    assert rows_by_output(summary) == {"x/part-0.parquet": 15, "y/part-0.parquet": 25}
    assert summary["rows_in"] == summary["rows_scored"] == 40


def test_nested_names_that_flatten_alike_stay_apart(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a" / "b__c.parquet", random_texts(12, seed=1))
    write(tmp_path / "in" / "a__b" / "c.parquet", random_texts(30, seed=2))
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert rows_by_output(summary) == {"a/b__c.parquet": 12, "a__b/c.parquet": 30}


def test_output_names_that_collide_are_placed_apart(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a", ["x"])  # no extension: its output would be a.parquet too
    write(tmp_path / "in" / "a.parquet", ["y", "z"])
    with pytest.warns(UserWarning, match=r"1 input file\(s\) mirror to an output name another input owns"):
        summary = score(model_dir, f"{tmp_path}/in/*", tmp_path / "out", tmp_path)
    outputs = rows_by_output(summary)
    assert outputs.pop("a.parquet") == 1 and list(outputs.values()) == [2]
    assert re.fullmatch(r"a--[0-9a-f]{10}\.parquet", next(iter(outputs)))
    assert summary["files_placed_apart"] == 1
    again = score(model_dir, f"{tmp_path}/in/*", tmp_path / "out", tmp_path)
    assert (again["files_scored"], again["files_skipped"]) == (0, 2)


def test_a_file_replaced_in_place_is_scored_again(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(30, seed=1))
    first = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    new_texts = random_texts(50, seed=9)
    write(tmp_path / "in" / "a.parquet", new_texts)
    with pytest.warns(UserWarning, match=r"1 input file\(s\) changed since they were scored"):
        again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (again["files_changed"], again["files_scored"], again["rows_scored"]) == (1, 1, 50)
    assert again["output"] == first["output"]
    assert read_outputs(again)["a.parquet"]["text"].to_pylist() == new_texts
    record = json.loads((Path(again["output"]) / "_manifest" / "a.parquet.json").read_text())
    assert record["rows"] == 50 and record["fingerprint"]["rows"] == 50
    third = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (third["files_changed"], third["files_skipped"]) == (0, 1)


def test_a_busy_output_folder_is_refused_and_a_killed_holder_leaves_no_lock(model_dir, tmp_path):
    import subprocess
    import sys

    from pipelines.scoring.incremental import OutputLock, OutputLockedError

    write(tmp_path / "in" / "a.parquet", ["x"])
    with OutputLock((tmp_path / "out").resolve()):
        with pytest.raises(
            OutputLockedError, match=r"another scoring run is writing to .*out \(\{\"pid\": \d+"
        ):
            score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path\n"
                "from pipelines.scoring.incremental import OutputLock\n"
                f"lock = OutputLock(Path({str(tmp_path / 'out2')!r})).__enter__()\n"
                "print('held', flush=True); time.sleep(60)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputLockedError):
        OutputLock(tmp_path / "out2").__enter__()
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.wait()
    with OutputLock(tmp_path / "out2"):
        pass


def test_same_name_and_version_in_two_registries_get_different_output_keys(tmp_path, tiny_encoder_dir):
    """Versions restart at 1 in another (or a recreated) registry: the weights' digest keeps outputs apart."""
    from pipelines.model_source import resolve_model
    from pipelines.tracking import log_pyfunc_model, register

    identities = []
    for seed in (0, 1):
        store = tmp_path / f"registry-{seed}"
        store.mkdir()
        mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
        torch.manual_seed(seed)
        model = EarlyExitClassifier.from_encoder(tiny_encoder_dir("bert", num_layers=3), labels=LABELS)
        directory = model.save_pretrained(store / "model")
        mlflow.set_experiment("registry")
        with mlflow.start_run():
            info = log_pyfunc_model(directory, ["a text"])
        register(info.model_uri, "early-exit-classifier", dev_accuracy=0.5, tags={})
        identities.append(resolve_model("models:/early-exit-classifier/1", store / "download").identity)
    assert all(i.startswith("early-exit-classifier-v1-") for i in identities)
    assert identities[0] != identities[1]
