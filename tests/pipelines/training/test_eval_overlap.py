"""Unlabeled rows that are dev or test texts are dropped from stage 2 and counted."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data import LabeledSplits
from pipelines.training.eval_overlap import count_overlap, eval_text_keys, warn_overlap
from pipelines.training.features import CorpusFile, StorePart, tag_unlabeled


def splits() -> LabeledSplits:
    def table(texts):
        return pa.table({"text": texts, "label": ["a"] * len(texts)})

    return LabeledSplits(table(["t1", "t2"]), table(["dev text"]), table(["test text"]), ("a",), 0)


def test_dev_and_test_texts_in_the_corpus_are_counted_and_dropped(tmp_path):
    corpus = ["other", "dev text", None, "test text", "dev text", "dev text "]
    pq.write_table(pa.table({"body": corpus}), tmp_path / "u.parquet", row_group_size=2)
    keys = eval_text_keys(splits())
    whole = CorpusFile(str(tmp_path / "u.parquet"), 6, 6, StorePart("p", 6))
    assert count_overlap([whole], None, "body", keys) == 3  # exact text only: "dev text " is not dev text
    first_four = CorpusFile(str(tmp_path / "u.parquet"), 4, 6, StorePart("p", 4))
    assert count_overlap([first_four], None, "body", keys) == 2  # only the rows stage 2 uses
    batch = pa.table({"body": corpus, "path": [str(tmp_path / "u.parquet")] * 6})
    tagged = tag_unlabeled(batch, "body", {str(tmp_path / "u.parquet"): 0}, keys)
    assert tagged["text"].to_pylist() == ["other", None, None, None, None, "dev text "]
    with pytest.warns(UserWarning, match="3 row\\(s\\) of the unlabeled corpus are dev or test texts"):
        warn_overlap(3)
