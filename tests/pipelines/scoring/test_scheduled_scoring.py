"""jobs/score.py as a scheduler runs it, day after day on one output folder: no output overwritten, duplicated
or kept stale; rows in == rows out per input (real local Ray, real parquet, the tiny model)."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ee_model.cpu_support import cpu_support
from ee_model.runtime import resolve_runtime
from pipelines.scoring import pipeline
from tests.conftest import random_texts
from tests.pipelines.scoring.helpers import read_outputs, score, write


def outputs_by_input(summary) -> dict[str, int]:
    """{input path: output rows} from the manifest: which input every committed output belongs to."""
    root = Path(summary["output"])
    found = {}
    for name, table in read_outputs(summary).items():
        record = json.loads((root / "_manifest" / f"{name}.json").read_text())
        assert record["input"] not in found, f"{record['input']} has two outputs"
        found[record["input"]] = table.num_rows
    return found


def input_rows(*paths: Path) -> dict[str, int]:
    return {str(p.resolve()): pq.ParquetFile(p).metadata.num_rows for p in paths}


def test_day_folders_into_one_output_keep_every_day(ray_local, model_dir, tmp_path):
    day1 = write(tmp_path / "in" / "2026-12-01" / "part-0.parquet", random_texts(40, seed=1))
    first = score(model_dir, day1.parent, tmp_path / "out", tmp_path)
    day1_output = read_outputs(first)["part-0.parquet"]
    day2 = write(tmp_path / "in" / "2026-12-02" / "part-0.parquet", random_texts(30, seed=2))
    with pytest.warns(UserWarning, match="mirror to an output name another input owns"):
        second = score(model_dir, day2.parent, tmp_path / "out", tmp_path)
    assert (second["files_scored"], second["files_changed"], second["rows_scored"]) == (1, 0, 30)
    assert outputs_by_input(second) == input_rows(day1, day2)  # day 1's 40 rows are still there
    assert read_outputs(second)["part-0.parquet"].equals(day1_output)
    # the scheduler reruns both days, then scores the parent folder: nothing is scored twice
    for again in (day1.parent, day2.parent, tmp_path / "in"):
        rerun = score(model_dir, again, tmp_path / "out", tmp_path)
        assert rerun["files_scored"] == 0 and outputs_by_input(rerun) == input_rows(day1, day2)


def test_a_partitioned_glob_growing_for_three_days(ray_local, model_dir, tmp_path):
    pattern = f"{tmp_path}/in/*/*.parquet"
    days = []
    for day in range(3):
        days.append(write(tmp_path / "in" / f"d{day}" / "part-0.parquet", random_texts(20 + day, seed=day)))
        summary = score(model_dir, pattern, tmp_path / "out", tmp_path)
        assert (summary["files_scored"], summary["files_skipped"]) == (1, day)
        assert outputs_by_input(summary) == input_rows(*days)  # one output per input, rows in == rows out
    assert sorted(read_outputs(summary)) == ["d0/part-0.parquet", "d1/part-0.parquet", "d2/part-0.parquet"]


def test_settings_that_change_the_output_get_their_own_output(ray_local, model_dir, tmp_path):
    texts, titles = random_texts(20, seed=1), random_texts(20, seed=2, max_words=4)
    write(tmp_path / "in" / "a.parquet", texts, title=pa.array(titles))
    body = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    title = score(
        model_dir, tmp_path / "in", tmp_path / "out", tmp_path, text_column="title", include_probs=True
    )
    assert title["files_scored"] == 1 and title["output"] != body["output"]
    assert title["output"].endswith("__text-title__probs")
    from ee_model import EarlyExitClassifier

    model = EarlyExitClassifier.from_pretrained(model_dir)
    by_title = read_outputs(title)["a.parquet"]
    assert by_title["label"].to_pylist() == model.predict(titles).label and "probs" in by_title.column_names
    assert read_outputs(body)["a.parquet"]["label"].to_pylist() == model.predict(texts).label
    record = json.loads((Path(title["output"]) / "_manifest" / "a.parquet.json").read_text())
    assert (record["text_column"], record["include_probs"]) == ("title", True)


def test_renamed_and_deleted_inputs_are_reported_then_removed_on_request(ray_local, model_dir, tmp_path):
    a = write(tmp_path / "in" / "a.parquet", random_texts(10, seed=1))
    c = write(tmp_path / "in" / "c.parquet", random_texts(12, seed=3))
    score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    b = a.rename(tmp_path / "in" / "b.parquet")
    c.unlink()
    with pytest.warns(UserWarning, match="2 output\\(s\\) .* belong to input files that no longer exist"):
        summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (summary["files_scored"], summary["orphaned_outputs"]) == (1, 2)
    assert set(summary["orphaned"]) == {"a.parquet", "c.parquet"}
    cleaned = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, remove_orphans=True)
    assert (cleaned["orphans_removed"], cleaned["orphaned_outputs"], cleaned["files_scored"]) == (2, 0, 0)
    assert outputs_by_input(cleaned) == input_rows(b)
    assert not (Path(cleaned["output"]) / "_manifest" / "a.parquet.json").exists()


def test_an_input_column_named_path_is_kept(ray_local, model_dir, tmp_path):
    urls = [f"https://example.com/{i}" for i in range(25)]
    (tmp_path / "in").mkdir()
    table = pa.table({"text": random_texts(25, seed=1), "path": urls})
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    write(tmp_path / "in" / "b.parquet", random_texts(5, seed=2))  # another column set, read apart
    for prefix in ("", "pred_"):
        summary = score(model_dir, tmp_path / "in", tmp_path / f"out{prefix}", tmp_path, output_prefix=prefix)
        out = read_outputs(summary)
        assert out["a.parquet"]["path"].to_pylist() == urls and out["a.parquet"].num_rows == 25
        assert out["a.parquet"].column_names[:2] == ["text", "path"]
        assert out["b.parquet"].num_rows == 5 and "path" not in out["b.parquet"].column_names
    with pytest.raises(pipeline.ScoringError, match="a text column named 'path' cannot be scored"):
        score(model_dir, tmp_path / "in", tmp_path / "out3", tmp_path, text_column="path")


def test_an_empty_file_with_a_null_typed_text_column_is_an_empty_input(ray_local, model_dir, tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.null())}), write_dir(tmp_path) / "empty.parquet")
    write(tmp_path / "in" / "a.parquet", random_texts(8, seed=1))
    summary = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (summary["files_scored"], summary["rows_scored"]) == (2, 8)
    assert read_outputs(summary)["empty.parquet"].num_rows == 0


def write_dir(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir(parents=True, exist_ok=True)
    return tmp_path / "in"


def test_a_rerun_with_nothing_to_do_answers_from_the_manifest(ray_local, model_dir, tmp_path, monkeypatch):
    for i in range(3):
        write(tmp_path / "in" / f"{i}.parquet", random_texts(5, seed=i))
    score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)

    def no_ray(*_, **__):
        raise AssertionError("a rerun with nothing to do joined Ray or built a dataset")

    monkeypatch.setattr(pipeline, "connect_ray", no_ray)
    monkeypatch.setattr(pipeline, "build_dataset", no_ray)
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    assert (again["files_scored"], again["files_skipped"], again["rows_scored"]) == (0, 3, 0)


def test_a_failed_calibration_is_not_pinned_and_a_pinned_one_states_its_promise(
    ray_local, model_dir, tmp_path, capsys
):
    write(tmp_path / "in" / "a.parquet", random_texts(60, seed=1))
    few = {"calibrate_rows": 20}  # 20 rows can never bound agreement >= 0.99 at 95 %
    with pytest.warns(UserWarning, match="not pinned; the next run calibrates again"):
        failed = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **few)
    assert not failed["calibration"]["met"] and not list((tmp_path / "out" / "_calibration").glob("*"))
    with pytest.warns(UserWarning, match="not pinned"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, **few)  # calibrates again
    enough = {"calibrate_rows": 60, "min_agreement": 0.5, "delta": 0.5, "calibration_seed": 7}
    pinned = score(model_dir, tmp_path / "in", tmp_path / "out2", tmp_path, **enough)
    assert pinned["calibration"]["met"] and pinned["calibration"]["seed"] == 7
    capsys.readouterr()
    again = score(model_dir, tmp_path / "in", tmp_path / "out2", tmp_path, **enough)
    assert again["calibration"]["pinned"] and again["calibration"]["seed"] == 7
    said = capsys.readouterr().err
    assert "scoring with the calibration pinned in" in said and "drawn with seed 7" in said


def test_a_periodic_corpus_is_sampled_at_random_not_at_its_period(tmp_path):
    """Every 5th row easy: an evenly spaced sample of 1 in 5 held only those; a random one holds ~20 %."""
    from pipelines.row_sample import sample_texts

    texts = ["easy" if i % 5 == 0 else f"hard {i}" for i in range(1000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet", row_group_size=64)
    shares = [
        np.mean([t == "easy" for t in sample_texts([(str(tmp_path / "a.parquet"), 1000)], "text", 200, s)])
        for s in range(10)
    ]
    assert 0.15 < np.mean(shares) < 0.25 and max(shares) < 0.35


def test_no_scored_output_is_lost_when_os_paths_are_relative(ray_local, model_dir, tmp_path, monkeypatch):
    """Inputs given relative to the working directory own their outputs by absolute path."""
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "in" / "x" / "a.parquet", random_texts(6, seed=1))
    first = score(model_dir, "in/x", "out", tmp_path)
    again = score(model_dir, f"{os.getcwd()}/in/x/a.parquet", "out", tmp_path)
    assert first["files_scored"] == 1 and again["files_scored"] == 0


@pytest.mark.skipif(not cpu_support().has_bf16, reason="needs a CPU with bf16 units (AMX-BF16 / AVX512-BF16)")
def test_each_runtime_scores_into_its_own_output_and_says_why(ray_local, model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", random_texts(20, seed=1))
    fp32 = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    bf16 = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, precision="bf16", backend="torch")
    auto = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, precision="auto")
    assert bf16["output"] == fp32["output"] + "__bf16" and bf16["files_scored"] == 1
    assert bf16["precision"] == "bf16" and bf16["precision_reason"] == "asked for"
    expected, why = resolve_runtime("auto")  # this CPU's choice (int8 on OpenVINO with VNNI)
    assert expected.backend == "openvino"  # the extra is installed, and the job has texts to calibrate on
    assert auto["precision"] == expected.name and auto["precision_reason"].startswith(why)
    assert "(the CPU-flag table: 20 input rows" in auto["precision_reason"]  # too few rows to time on
    assert "(CPU flags: " in why and f"; {expected.name} (the fastest that runs here" in why
    assert auto["output"] == fp32["output"] + f"__{expected.name}" and auto["files_scored"] == 1
    again = score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path, precision=expected.precision)
    assert again["output"] == auto["output"] and again["files_skipped"] == 1  # the same runtime: the same key
    assert read_outputs(bf16)["a.parquet"].num_rows == 20


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB filesystem of its own (tmpfs; needs root, as CI and the developers' machines run)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode
    ):
        pytest.skip("mounting a small filesystem needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_output_ends_in_one_line_with_what_was_committed_and_the_next_run_finishes(
    ray_local, model_dir, tmp_path, small_disk
):
    """The disk fills while writing: committed outputs stay whole, the run ends with a one-line reason (the
    output, its free space) and the summary of what it committed, exit status 3 (not 2: nothing to fix in
    the input); once there is room the next run scores the rest, every row once."""
    import subprocess

    from pipelines.errors import IncompleteRun

    def words(rows: int, seed: int) -> list[str]:  # texts that compress little: ~0.4 MB of output per file
        rng = random.Random(seed)
        return [
            " ".join("".join(rng.choices(string.ascii_lowercase, k=6)) for _ in range(6)) for _ in range(rows)
        ]

    files = [write(tmp_path / "in" / f"part-{i}.parquet", words(8000, seed=i)) for i in range(4)]
    with pytest.raises(
        IncompleteRun, match=rf"the output {small_disk}/.* is full \(\d+\.\d MiB free\): "
    ) as full:
        score(model_dir, tmp_path / "in", small_disk, tmp_path)
    summary = full.value.summary
    assert full.value.exit_code == 3 and summary["status"] == "output_full" and "\n" not in str(full.value)
    assert summary["files_scored"] + summary["files_left"] == 4 and summary["files_left"] >= 1
    committed = outputs_by_input({"output": summary["output"]})
    assert len(committed) == summary["files_scored"] and all(rows == 8000 for rows in committed.values())
    assert not [p for p in Path(summary["output"]).rglob("*") if ".tmp" in p.name or "staging" in p.name]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    rest = score(model_dir, tmp_path / "in", small_disk, tmp_path)
    assert rest["files_scored"] == summary["files_left"] and rest["files_skipped"] == summary["files_scored"]
    assert outputs_by_input(rest) == input_rows(*files)
