"""The corpus builders of `benchmarks/corpora.py` on small files written here in the shipped formats."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import corpora  # noqa: E402


def test_fortunes_are_read_per_file_and_split_into_three_disjoint_parts(tmp_path):
    for name in corpora.FORTUNE_CLASSES:
        entries = [f"{name} saying number {i}\n  -- someone" for i in range(20)] + [
            "short",
            "shared text here",
        ]
        (tmp_path / name).write_text("\n%\n".join(entries) + "\n%\n")
    rows = corpora.fortune_rows(tmp_path)
    assert ("computers saying number 3 -- someone", "computers") in rows
    assert not any(text == "short" for text, _ in rows)  # under 10 characters
    counts = corpora.write_corpus(rows, tmp_path / "out")
    parts = {p: pq.read_table(tmp_path / "out" / f"{p}.parquet") for p in ("labeled", "unlabeled", "unseen")}
    texts = [set(t["text"].to_pylist()) for t in parts.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert "shared text here" not in set().union(*texts)  # under two classes: dropped
    assert counts == {"labeled": 8 * 23, "unlabeled": 6 * 23, "unseen": 6 * 23}
    assert parts["unseen"].column_names == ["text", "gold"] and parts["unlabeled"].column_names == ["text"]


def test_a_mail_reads_as_its_subject_and_text_with_html_stripped(tmp_path):
    raw = (
        "From: a@example.org\nSubject: Cheap pills\nContent-Type: multipart/alternative; boundary=XX\n\n"
        "--XX\nContent-Type: text/plain\n\nBuy now,\n  friend\n--XX\nContent-Type: text/html\n\n"
        "<html><style>p {color: red}</style><p>Buy &amp; save</p></html>\n--XX--\n"
    )
    assert corpora.readable_text(raw) == "Cheap pills Buy now, friend Buy & save"
