"""The rows the training job certifies its knob on (issue 40): unseen unlabeled text, disjoint from what
trains the students and fits the exit risk."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipelines.config import load_train_config
from pipelines.data import load_labeled_splits
from pipelines.training.certification import certification_rows
from pipelines.training.eval_overlap import eval_text_keys, overlapping, text_key
from pipelines.training.pipeline import check_inputs
from tests.conftest import labeled_table, unlabeled_table


def test_the_default_corpus_certifies_on_the_dev_articles_pieces_stage1_never_saw(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the BBC parquet cache goes here
    config = load_train_config(overrides={"eval": {"certify_rows": 500}})
    splits = load_labeled_splits(config.data)
    rows = certification_rows(config, splits)
    assert len(rows.texts) == 500 == len(set(rows.texts)) and "of the 334 dev articles" in rows.source
    dev = " ".join(splits.dev["text"].to_pylist())
    assert all(
        " ".join(t.split()) in " ".join(dev.split()) for t in rows.texts[:50]
    )  # pieces of dev articles
    from pipelines.training.certification import article_pieces

    others = [*splits.train["text"].to_pylist(), *splits.test["text"].to_pylist()]
    seen = {
        text_key(t) for t in (*others, *article_pieces(others))
    }  # stage 1's articles, stage 2's paragraphs
    assert not any(text_key(t) in seen for t in rows.texts)
    assert certification_rows(config, splits) == rows  # seeded
    assert certification_rows(load_train_config(overrides={"eval": {"certify_rows": 0}}), splits) is None


def test_a_slice_of_an_unlabeled_corpus_is_held_out_of_stage2(tmp_path, tiny_encoder_dir):
    labeled, unlabeled = tmp_path / "labeled.parquet", tmp_path / "unlabeled.parquet"
    pq.write_table(labeled_table(), labeled)
    pq.write_table(unlabeled_table(1000), unlabeled)
    overrides = {
        "model": {"encoder": tiny_encoder_dir("bert", num_layers=2)},
        "data": {
            "train_path": str(labeled),
            "unlabeled_path": str(unlabeled),
            "unlabeled_text_column": "body",
        },
    }
    inputs = check_inputs(load_train_config(overrides=overrides))
    certifying = inputs.certification.texts
    assert "from the unlabeled corpus's 1,000" in inputs.certification.source
    assert "; and the 36 dev texts, without their labels" in inputs.certification.source
    assert inputs.splits.held_out == certifying
    assert all(overlapping(certifying, eval_text_keys(inputs.splits)))
    corpus = set(pq.read_table(unlabeled)["body"].to_pylist())
    dev_texts = set(inputs.splits.dev["text"].to_pylist())
    held, dev = [t for t in certifying if t not in dev_texts], [t for t in certifying if t in dev_texts]
    assert 150 <= len(held) <= 200 and set(held) <= corpus and sorted(dev) == sorted(dev_texts)
    assert len(set(certifying)) == len(certifying)
    # labeled data only: certified label-free on the dev texts
    only_labeled = load_train_config(overrides={**overrides, "data": {"train_path": str(labeled)}})
    alone = check_inputs(only_labeled).certification
    assert sorted(alone.texts) == sorted(dev) and alone.source.startswith("the 36 dev texts")
    # no knob certification asked (eval.certify_rows 0): dev's labels, as before
    no_rows = {**overrides, "eval": {"certify_rows": 0}}
    assert check_inputs(load_train_config(overrides=no_rows)).certification is None
