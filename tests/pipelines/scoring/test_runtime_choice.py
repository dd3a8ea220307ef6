"""`--precision auto` chosen by timing on the input's rows (pipelines.scoring.runtime_choice): the decision
pinned per output folder and reused by a rerun, timed again when what it depends on changes, the CPU-flag
table on an input too small to pay for timing, and a scoring run's summary, output key and MLflow run."""

from __future__ import annotations

import json

from ee_model.runtime import resolve_runtime
from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.pipeline import layers_folder
from pipelines.scoring.runtime_choice import MEASURE_MIN_ROWS, chosen_runtime
from tests.conftest import random_texts, trained_tiny
from tests.pipelines.scoring.helpers import score, scoring_runs, write


def choose(model_dir, tmp_path, rows=300, **flags):
    from pipelines.model_source import ModelSource

    config = ScoreConfig(model=model_dir, input=str(tmp_path / "in"), output=str(tmp_path / "out"), **flags)
    source = ModelSource(model_dir, tmp_path, "dir-test", None, None)
    texts = random_texts(rows, seed=5)
    model = __import__("ee_model").EarlyExitClassifier.from_pretrained(model_dir)
    return chosen_runtime(
        config,
        source.identity,
        model_dir,
        "bert",
        model.config.setting(),
        rows,
        lambda n: texts[:n],
        lambda runtime: layers_folder(config, source, runtime),
        lambda: texts,
        resolve_runtime("auto", config.backend),
    )


def test_a_timed_choice_is_pinned_reused_and_timed_again_when_its_key_changes(tiny_encoder_dir, tmp_path):
    model_dir = str(trained_tiny(tiny_encoder_dir("bert", num_layers=2)).save_pretrained(tmp_path / "model"))
    flags = {"choose_runtime": "measure", "backend": "torch", "batch_size": 16}  # PyTorch's: no layers built
    runtime, why, choice = choose(model_dir, tmp_path, **flags)
    assert runtime.name == choice.runtime and why == choice.reason and "timed on 256 input rows" in why
    assert [m.runtime for m in choice.measurements][0] == "fp32" and choice.measurements[0].rows_per_s > 0
    (pin,) = (tmp_path / "out" / "_runtime").glob("*.json")
    assert json.loads(pin.read_text())["runtime"] == runtime.name
    again, why_again, choice_again = choose(model_dir, tmp_path, **flags)
    assert again == runtime and why_again.startswith(f"as pinned in {pin}") and choice_again == choice
    choose(model_dir, tmp_path, **{**flags, "batch_size": 32})  # another batch size: timed again
    assert len(list((tmp_path / "out" / "_runtime").glob("*.json"))) == 2


def test_auto_on_a_small_input_takes_the_flag_table_and_pins_it(tiny_encoder_dir, tmp_path):
    model_dir = str(trained_tiny(tiny_encoder_dir("bert", num_layers=2)).save_pretrained(tmp_path / "model"))
    runtime, why, choice = choose(model_dir, tmp_path, rows=300)
    table, table_why = resolve_runtime("auto")
    assert runtime == table and why.startswith(table_why) and not choice.measurements
    assert f"300 input rows, under the {MEASURE_MIN_ROWS}" in why
    again, why_again, _ = choose(model_dir, tmp_path, rows=300)
    assert again == runtime and why_again.startswith("as pinned in ")


def test_the_job_times_scores_in_the_runtime_it_picked_and_logs_every_candidate(
    ray_local, tiny_encoder_dir, tmp_path
):
    model_dir = str(trained_tiny(tiny_encoder_dir("bert", num_layers=2)).save_pretrained(tmp_path / "model"))
    write(tmp_path / "in" / "a.parquet", random_texts(40, seed=1))
    flags = {"precision": "auto", "choose_runtime": "measure", "backend": "torch"}
    first = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **flags)
    choice = first["runtime_choice"]
    assert first["precision"] == choice["runtime"] and first["precision_reason"] == choice["reason"]
    assert first["rows_scored"] == 40 and choice["measurements"][0]["runtime"] == "fp32"
    suffix = "" if choice["runtime"] == "fp32" else f"__{choice['runtime']}"  # fp32 keys carry none
    assert first["output"].endswith(f"__{first['policy']}-{first['knob']:g}{suffix}")
    assert list((tmp_path / "out" / "_runtime").glob("*.json"))  # pinned: reruns reuse it (tested above)
    runs = scoring_runs(model_dir, order_by=["start_time ASC"])
    assert runs["metrics.runtime_fp32_rows_per_s"].iloc[0] == choice["measurements"][0]["rows_per_s"]
