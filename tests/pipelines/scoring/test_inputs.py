"""What scoring reads: awkward rows and columns, files that cannot be read, inputs refused up front."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ee_model import EarlyExitClassifier
from pipelines.errors import IncompleteRun
from pipelines.scoring.pipeline import ScoringError
from tests.conftest import random_texts
from tests.pipelines.scoring.helpers import AWKWARD, read_outputs, rows_by_output, score, write


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


def test_a_file_without_a_footer_is_set_aside_and_the_others_commit(ray_local, model_dir, tmp_path):
    """Not parquet at all, or one still being written (no footer yet): named, retried by the next run."""
    write(tmp_path / "in" / "good.parquet", ["a"])
    (tmp_path / "in" / "bad.parquet").write_bytes(b"not parquet at all")
    whole = write(tmp_path / "tmp.parquet", random_texts(30, seed=1)).read_bytes()
    (tmp_path / "in" / "writing.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        IncompleteRun, match=r"2 input file\(s\) could not be read .*bad.parquet: no readable"
    ):
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


def test_no_input_files_is_an_error(model_dir, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ScoringError, match="no parquet files found"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)


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


@pytest.mark.parametrize("values, kind", [([1, 2], "int64"), ([["a"], ["b"]], "list<element: string>")])
def test_text_column_of_another_type_is_refused_up_front(model_dir, tmp_path, values, kind):
    pq.write_table(pa.table({"text": values}), tmp_path / "x.parquet")
    with pytest.raises(
        ScoringError, match=rf"x.parquet': text column 'text' holds {re.escape(kind)}, not strings"
    ):
        score(model_dir, tmp_path / "x.parquet", tmp_path / "out", tmp_path)


def test_text_in_any_string_layout_is_scored_and_a_file_without_text_is_set_aside(
    ray_local, model_dir, tmp_path
):
    """A pandas categorical column (written as dictionary<string>) and string_view are strings; a file whose
    text column holds numbers is set aside, named, while the others are scored and committed."""
    import pandas as pd

    texts = random_texts(30, seed=2) + [None]
    write(tmp_path / "in" / "plain.parquet", texts)
    pd.DataFrame({"text": pd.Categorical(texts)}).to_parquet(tmp_path / "in" / "categorical.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "in" / "categorical.parquet").field("text").type)
    pq.write_table(pa.table({"text": pa.array(texts, pa.string_view())}), tmp_path / "in" / "view.parquet")
    pq.write_table(pa.table({"text": list(range(30))}), tmp_path / "in" / "numbers.parquet")
    with pytest.raises(
        IncompleteRun, match=r"1 input file\(s\) .*numbers.parquet': text column 'text' holds int64"
    ) as incomplete:
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    outputs = read_outputs(incomplete.value.summary)
    assert sorted(outputs) == ["categorical.parquet", "plain.parquet", "view.parquet"]
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts, invalid="null")
    for name, table in outputs.items():
        assert table["label"].to_pylist() == expected.label, name
        assert table["text"].to_pylist() == texts, name  # passed through as it was


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
        IncompleteRun,
        match=r"1 input file\(s\) could not be read and were not scored \(the other 1 "
        r"were\): .*bad.parquet: .*[Cc]orrupt",
    ) as incomplete:
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
    summary = incomplete.value.summary  # what the job prints and writes to --summary-file, exit status 2
    assert summary["status"] == "files_set_aside" and incomplete.value.exit_code == 2
    assert summary["files_scored"] == 1 and list(summary["unreadable"]) == [
        str(tmp_path / "in" / "bad.parquet")
    ]
    (key,) = [p for p in (tmp_path / "out").iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert (key / "good.parquet").is_file() and not (key / "bad.parquet").exists()
    assert pq.read_table(key / "good.parquet").num_rows == 25


def test_input_with_a_stage_column_is_refused(model_dir, tmp_path):
    write(tmp_path / "in" / "a.parquet", ["x"], __ee_token_ids=pa.array([[1]]))
    with pytest.raises(ScoringError, match="__ee_token_ids"):
        score(model_dir, tmp_path / "in", tmp_path / "out", tmp_path)
