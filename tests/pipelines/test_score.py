"""Batch scoring with real Ray Data actor pools on a tiny model: nothing lost, clear errors, incremental."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ee_model import EarlyExitClassifier, ExitSetting
from ee_model.signals import normalised_entropy
from pipelines.config import ScoreConfig
from pipelines.errors import UserError
from pipelines.evaluation.thresholds import lower_bound
from pipelines.model_source import ModelSourceError
from pipelines.scoring.pipeline import ScoringError
from tests.conftest import LABELS, random_texts
from tests.pipelines.scoring_helpers import read_outputs, rows_by_output, score, write

pytestmark = pytest.mark.ray

AWKWARD = ["hello world", None, "", "   \n", "money " * 20_000, "😀 emoji only 🎉", "the film was good"]


def test_awkward_rows_and_extra_columns_all_come_out(ray_local, model_dir, tmp_path):
    texts = AWKWARD + random_texts(93, seed=2)
    write(tmp_path / "in" / "a.parquet", texts, doc_id=pa.array(range(100)), source=pa.array(["s"] * 100))
    write(
        tmp_path / "in" / "sub" / "b.parquet",
        random_texts(40, seed=3),
        doc_id=pa.array(range(40)),
        source=pa.array(["t"] * 40),
    )
    write(
        tmp_path / "in" / "empty.parquet",
        [],
        doc_id=pa.array([], pa.int64()),
        source=pa.array([], pa.string()),
    )
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, include_probs=True)
    outputs = read_outputs(summary)
    assert set(outputs) == {"a.parquet", "sub/b.parquet", "empty.parquet"}
    assert summary["rows_in"] == summary["rows_scored"] == 140 and summary["errors"] == 3
    a = outputs["a.parquet"]
    assert (
        a["doc_id"].to_pylist() == list(range(100)) and a["source"].to_pylist() == ["s"] * 100
    )  # order kept
    assert a["text"].to_pylist() == texts
    assert a["error"].to_pylist()[:4] == [
        None,
        "null text",
        "empty or whitespace-only text",
        "empty or whitespace-only text",
    ]
    assert (
        a["label"].to_pylist()[1:4] == [None, None, None] and a["exit_layer"].to_pylist()[1:4] == [None] * 3
    )
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts, invalid="null")
    assert a["label"].to_pylist() == expected.label
    assert [x or 0 for x in a["exit_layer"].to_pylist()] == expected.exit_layer.tolist()
    assert a["tokens"][4].as_py() == 128  # the 100k-character text is truncated, not dropped
    probs = a["probs"].to_pylist()
    assert probs[1] is None and np.allclose(probs[0], expected.probs[0], atol=1e-6)
    assert outputs["empty.parquet"].num_rows == 0 and "label" in outputs["empty.parquet"].column_names
    manifest = json.loads(
        (tmp_path / "out" / summary["output"].split("/")[-1] / "_manifest" / "a.parquet.json").read_text()
    )
    assert manifest["rows"] == 100 and manifest["input"].endswith("a.parquet")


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


def test_policy_defaults_come_from_the_model(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(10))
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (summary["policy"], summary["knob"]) == ("entropy", 0.95)
    full = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, policy="none")
    assert full["mean_exit_layer"] == 3 and full["output"].endswith("__none")


def test_a_file_without_a_footer_is_set_aside_and_the_others_commit(ray_local, model_dir, tmp_path):
    """Not parquet at all, or one still being written (no footer yet): named, retried by the next run."""
    write(tmp_path / "in" / "good.parquet", ["a"])
    (tmp_path / "in" / "bad.parquet").write_bytes(b"not parquet at all")
    whole = write(tmp_path / "tmp.parquet", random_texts(30, seed=1)).read_bytes()
    (tmp_path / "in" / "writing.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ScoringError, match=r"2 input file\(s\) could not be read .*bad.parquet: no readable"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    out = next((tmp_path / "out").glob("dir-*"))
    assert [p.name for p in out.glob("*.parquet")] == ["good.parquet"]
    (tmp_path / "in" / "bad.parquet").unlink()
    (tmp_path / "in" / "writing.parquet").write_bytes(whole)  # the writer finished
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (again["files_scored"], again["files_skipped"], again["rows_scored"]) == (1, 1, 30)


def test_missing_text_column_is_named(model_dir, tmp_path):
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(
        ScoringError, match=r"x.parquet' has no text column 'text'; its columns are \['body'\]"
    ):
        score(model_dir, tmp_path / "x.parquet", tmp_path / "out", tmp_path)


def test_output_column_clash_is_refused(model_dir, tmp_path):
    write(tmp_path / "x.parquet", ["a"], label=pa.array(["gold"]))
    with pytest.raises(ScoringError, match=r"already has column\(s\) \['label'\]"):
        score(model_dir, tmp_path / "x.parquet", tmp_path / "out", tmp_path)


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


def test_no_input_files_is_an_error(model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ScoringError, match="no parquet files found"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)


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


def test_calibration_sample_is_uniform_over_files_and_row_groups_and_seeded(tmp_path):
    from pipelines.scoring.calibration import sample_rows, sample_texts

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
    for seed in range(5):
        expected = [every[i] for i in sample_rows(35, 7, seed)]
        assert sample_texts(files, "text", 7, seed) == [t for t in expected if t and t.strip()]
    assert sample_texts(files, "text", 20, 1) == sample_texts(files, "text", 20, 1)
    assert sample_texts(files, "text", 20, 1) != sample_texts(files, "text", 20, 2)
    assert sample_texts(files, "text", 1000, 0) == [f"a{i}" for i in range(10)] + [
        t for t in b_texts if t and t.strip()
    ]
    # uniform: every row as likely as any other, whatever its position (2,000 draws of 3 of 10 rows)
    counts = np.bincount(np.concatenate([sample_rows(10, 3, seed) for seed in range(2000)]), minlength=10)
    assert counts.min() > 520 and counts.max() < 680  # 600 each expected; 4.4 standard deviations


def test_calibrated_knob_agrees_with_full_depth_and_is_pinned(ray_local, tiny_encoder_dir, tmp_path):
    encoder = tiny_encoder_dir("bert", num_layers=3)
    torch.manual_seed(3)
    model = EarlyExitClassifier.from_encoder(encoder, labels=LABELS, threshold=0.95)
    with (
        torch.no_grad()
    ):  # sharper heads: entropies spread over [0, 1], so S really trades agreement for speed
        for parameter in model.heads.parameters():
            parameter.mul_(3)
    model_dir = str(model.save_pretrained(tmp_path / "model"))
    texts = random_texts(300, seed=7) + [None, ""]
    write(tmp_path / "in" / "a.parquet", texts)
    first = score(
        model_dir, tmp_path / "in", tmp_path / "out", tmp_path, calibrate_rows=200, min_agreement=0.9
    )
    calibration, knob = first["calibration"], first["knob"]
    assert calibration["met"] and not calibration["pinned"] and 0 < knob < 1 and calibration["knob"] == knob
    assert 0.9 <= calibration["agreement"] < 1 and 1 < calibration["mean_exit_layer"] < 3  # rows exit early
    assert first["policy"] == "entropy" and first["output"].endswith(f"__entropy-{knob:g}")
    # the sample: 200 of the 302 rows drawn with the recorded seed; check S with the model's own early exit
    from pipelines.scoring.calibration import sample_rows

    sample = [texts[i] for i in sample_rows(302, 200, calibration["seed"])]
    sample = [t for t in sample if t]
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
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["early-exit-scoring"], order_by=["start_time ASC"])
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


def test_hidden_and_in_progress_folders_are_not_scored(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "_temporary" / "0" / "_temporary" / "attempt_1" / "part-00000.parquet", ["a"] * 7)
    write(tmp_path / "in" / ".spark-staging-1" / "part-00001.parquet", ["b"] * 13)
    write(tmp_path / "in" / "_SUCCESS.parquet", ["c"])
    write(tmp_path / "in" / "done" / "part-00002.parquet", random_texts(20, seed=3))
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert rows_by_output(summary) == {"done/part-00002.parquet": 20} and summary["input_files"] == 1
    globbed = score(model_dir, f"{tmp_path}/in/**/*.parquet", tmp_path / "out2", tmp_path)
    assert rows_by_output(globbed) == {"done/part-00002.parquet": 20}


def test_output_folder_inside_the_input_is_not_read_back(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(10, seed=1))
    first = score(model_dir, tmp_path / "in", tmp_path / "in" / "scored", tmp_path)
    again = score(model_dir, tmp_path / "in", tmp_path / "in" / "scored", tmp_path)
    assert first["input_files"] == again["input_files"] == 1
    assert (again["files_scored"], again["files_skipped"]) == (0, 1)


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
        cwd=Path(__file__).resolve().parents[2],
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(OutputLockedError):
        OutputLock(tmp_path / "out2").__enter__()
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
    holder.wait()
    with OutputLock(tmp_path / "out2"):
        pass


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


@pytest.mark.parametrize("values, kind", [([1, 2], "int64"), ([["a"], ["b"]], "list<element: string>")])
def test_text_column_of_another_type_is_refused_up_front(model_dir, tmp_path, values, kind):
    pq.write_table(pa.table({"text": values}), tmp_path / "x.parquet")
    with pytest.raises(
        ScoringError, match=rf"x.parquet': text column 'text' holds {re.escape(kind)}, not strings"
    ):
        score(model_dir, tmp_path / "x.parquet", tmp_path / "out", tmp_path)


def test_binary_text_column_is_decoded_as_utf8(ray_local, model_dir, tmp_path):
    texts = random_texts(20, seed=4)
    values = [t.encode() for t in texts] + [b"\xff\xfe not utf-8", None]
    pq.write_table(pa.table({"text": pa.array(values, pa.binary())}), tmp_path / "spark.parquet")
    summary = score(model_dir, tmp_path / "spark.parquet", tmp_path / "out", tmp_path)
    out = read_outputs(summary)["spark.parquet"]
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts)
    assert out["label"].to_pylist()[:20] == expected.label
    assert out["error"].to_pylist()[20:] == ["not a string: bytes", "null text"]
    assert summary["rows_in"] == summary["rows_scored"] == 22


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


def test_a_labeled_corpus_is_scored_with_an_output_prefix(ray_local, model_dir, tmp_path):
    texts = random_texts(30, seed=6) + [None]
    write(tmp_path / "eval.parquet", texts, label=pa.array(["gold"] * 31))
    summary = score(model_dir, tmp_path / "eval.parquet", tmp_path / "out", tmp_path, output_prefix="pred_")
    out = read_outputs(summary)["eval.parquet"]
    assert out.column_names == [
        "text",
        "label",
        "pred_label",
        "pred_confidence",
        "pred_exit_layer",
        "pred_flops",
        "pred_tokens",
        "pred_error",
    ]
    assert out["label"].to_pylist() == ["gold"] * 31
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts[:30])
    assert out["pred_label"].to_pylist()[:30] == expected.label
    assert (
        summary["errors"] == 1
        and summary["rows_scored"] == 31
        and summary["output"].endswith("__prefix-pred_")
    )
    with pytest.raises(ValueError, match="output_prefix='pred-' must be letters, digits and '_'"):
        score(model_dir, tmp_path / "eval.parquet", tmp_path / "out", tmp_path, output_prefix="pred-")


def test_a_corrupt_data_page_names_its_file_and_the_good_files_still_commit(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "good.parquet", random_texts(25, seed=1))
    pq.write_table(
        pa.table({"text": [f"text number {i} " * 5 for i in range(2000)]}),
        tmp_path / "in" / "bad.parquet",
        compression="snappy",
    )
    data = bytearray((tmp_path / "in" / "bad.parquet").read_bytes())
    data[1000:1064] = b"\xff" * 64  # inside a data page; the footer stays intact
    (tmp_path / "in" / "bad.parquet").write_bytes(bytes(data))
    with pytest.raises(
        ScoringError,
        match=r"1 input file\(s\) could not be read and were not scored \(the other 1 "
        r"were\): .*bad.parquet: .*[Cc]orrupt",
    ):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    (key,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert (key / "good.parquet").is_file() and not (key / "bad.parquet").exists()
    assert pq.read_table(key / "good.parquet").num_rows == 25


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
    run = mlflow.search_runs(experiment_names=["early-exit-scoring"], output_format="list")[0]
    assert run.data.params["tokenize"] in ("actor", "tasks") and "driver_busy_share" in run.data.metrics


def test_a_tokenizing_stage_without_a_spare_cpu_is_refused_before_scoring(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(10, seed=1))
    with pytest.raises(ScoringError, match="a CPU the scoring actors do not hold.*--tokenize actor"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, tokenize="tasks", actors=2)
    assert not (tmp_path / "out").exists()


def test_input_with_a_stage_column_is_refused(model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", ["x"], __ee_token_ids=pa.array([[1]]))
    with pytest.raises(ScoringError, match="__ee_token_ids"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)


def test_int8_scoring_builds_the_layers_once_calibrates_in_int8_and_keys_apart(
    ray_local, tiny_encoder_dir, tmp_path
):
    from ee_model import load_int8
    from ee_model.int8 import MANIFEST
    from tests.conftest import trained_tiny

    model_dir = str(trained_tiny(tiny_encoder_dir("bert", num_layers=3)).save_pretrained(tmp_path / "model"))
    texts = random_texts(300, seed=7) + [None, "", "good great"]
    write(tmp_path / "in" / "a.parquet", texts)
    int8 = {"precision": "int8", "calibrate_rows": 300, "min_agreement": 0.95}
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
    local = load_int8(model_dir, layers, threads=1)
    expected = local.predict(texts, policy="entropy", threshold=first["knob"], batch_size=16, invalid="null")
    out = read_outputs(first)["a.parquet"]
    assert out["error"].to_pylist() == expected.error
    assert np.mean(np.array(out["label"].to_pylist()) == np.array(expected.label)) >= 0.99

    write(tmp_path / "in" / "b.parquet", random_texts(40, seed=8))
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **int8)
    assert again["output"] == first["output"] and (again["files_scored"], again["files_skipped"]) == (1, 1)
    assert again["calibration"]["pinned"] and (layers / MANIFEST).stat().st_mtime_ns == stamp  # not rebuilt
    fp32 = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, threshold=first["knob"])
    assert fp32["output"] == first["output"].removesuffix("__int8") and fp32["files_scored"] == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["early-exit-scoring"], order_by=["start_time ASC"])
    assert runs["params.precision"].tolist() == ["int8", "int8", "fp32"]


def test_int8_calibration_measures_its_knob_in_the_exit_engine(tiny_encoder_dir, tmp_path):
    """The replayed sweep is only a guide for int8: the kept knob's agreement is what the engine gave."""
    from ee_model import int8_layers, with_int8_layers
    from pipelines.config import S_GRID
    from pipelines.evaluation.thresholds import lower_bound
    from pipelines.scoring.calibration import agreement_pass, calibrate
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
