"""Labeled data checks happen before training: clear errors naming the file, column or labels."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import DataConfig
from pipelines.data import DataError, LabeledSplits, load_labeled_splits, stratified_split, unlabeled_path
from tests.conftest import labeled_table


def write(tmp_path, name, table):
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_split_is_stratified_deterministic_and_complete(labeled_parquet):
    splits = load_labeled_splits(DataConfig(train_path=labeled_parquet, split_seed=3))
    again = load_labeled_splits(DataConfig(train_path=labeled_parquet, split_seed=3))
    assert splits.train.equals(again.train) and splits.dev.equals(again.dev)
    assert (splits.train.num_rows, splits.dev.num_rows, splits.test.num_rows) == (168, 36, 36)  # 70/15/15
    for split in (splits.dev, splits.test):
        counts = pa.compute.value_counts(split["label"]).to_pylist()
        assert sorted(c["counts"] for c in counts) == [12, 12, 12]
    all_texts = sorted(
        splits.train["text"].to_pylist() + splits.dev["text"].to_pylist() + splits.test["text"].to_pylist()
    )
    assert all_texts == sorted(labeled_table()["text"].to_pylist())
    assert splits.labels == ("mid", "neg", "pos")


def test_folder_and_glob_inputs(tmp_path):
    table = labeled_table()
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts", "a.parquet", table.slice(0, 120))
    write(tmp_path / "parts", "b.parquet", table.slice(120))
    for path in (str(tmp_path / "parts"), str(tmp_path / "parts" / "*.parquet")):
        splits = load_labeled_splits(DataConfig(train_path=path))
        assert splits.train.num_rows + splits.dev.num_rows + splits.test.num_rows == 240


def test_missing_column_names_the_file_and_columns(tmp_path):
    path = write(tmp_path, "x.parquet", labeled_table().drop_columns(["label"]))
    with pytest.raises(DataError, match=r"x.parquet' has no column\(s\) \['label'\]; its columns are"):
        load_labeled_splits(DataConfig(train_path=path))


def test_null_labels_are_refused(tmp_path):
    table = labeled_table()
    labels = table["label"].to_pylist()
    labels[5] = None
    path = write(tmp_path, "x.parquet", table.set_column(1, "label", pa.array(labels)))
    with pytest.raises(DataError, match=r"1 row\(s\) have a null 'label' \(first rows \[5\]\)"):
        load_labeled_splits(DataConfig(train_path=path))


def test_dev_labels_unknown_to_train_are_refused(tmp_path):
    table = labeled_table()
    train = write(tmp_path, "train.parquet", table)
    dev_table = table.slice(0, 10).set_column(1, "label", pa.array(["zzz"] * 10))
    dev = write(tmp_path, "dev.parquet", dev_table)
    with pytest.raises(DataError, match=r"dev labels \['zzz'\] never occur in train"):
        load_labeled_splits(DataConfig(train_path=train, dev_path=dev, test_path=train))


def test_empty_training_set_is_refused(tmp_path):
    path = write(tmp_path, "x.parquet", labeled_table().slice(0, 0))
    with pytest.raises(DataError, match="training set is empty"):
        load_labeled_splits(DataConfig(train_path=path))


def test_invalid_texts_are_dropped_and_counted(tmp_path):
    table = labeled_table()
    texts = table["text"].to_pylist()
    texts[0], texts[1], texts[2] = None, "", "   "
    path = write(tmp_path, "x.parquet", table.set_column(0, "text", pa.array(texts)))
    splits = load_labeled_splits(DataConfig(train_path=path))
    assert splits.dropped_invalid_text == 3
    assert splits.train.num_rows + splits.dev.num_rows + splits.test.num_rows == 237


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="cannot read parquet at .*broken.parquet"):
        load_labeled_splits(DataConfig(train_path=str(path)))
    with pytest.raises(DataError, match="no parquet files match"):
        load_labeled_splits(DataConfig(train_path=str(tmp_path / "nothing-*.parquet")))


def test_non_string_text_column_is_refused(tmp_path):
    path = write(tmp_path, "x.parquet", pa.table({"text": [1, 2, 3], "label": ["a", "b", "a"]}))
    with pytest.raises(DataError, match="column 'text' must hold strings, it holds int64"):
        load_labeled_splits(DataConfig(train_path=path))


def test_stratified_split_keeps_every_row_once():
    table = labeled_table(50)
    parts = stratified_split(table, (0.6, 0.2, 0.2), seed=1)
    ids = sorted(sum((p["row_id"].to_pylist() for p in parts), []))
    assert ids == list(range(50))


def test_default_unlabeled_corpus_holds_only_training_paragraphs_shuffled(tmp_path):
    def article(name: str, n: int) -> str:
        return "\n\n".join(
            ["Headline"] + [f"{name} paragraph {i} " + "with enough words to keep" for i in range(n)]
        )

    train = pa.table({"text": [article("train-a", 4), article("train-b", 5)], "label": ["x", "y"]})
    held_out = pa.table({"text": [article("held-out", 3)], "label": ["x"]})
    splits = LabeledSplits(train, held_out, held_out, ("x", "y"), 0)
    config = DataConfig(cache_dir=str(tmp_path), split_seed=3)

    path = unlabeled_path(config, splits)  # no train_path, no unlabeled_path: the default corpus
    texts = pq.read_table(path)["text"].to_pylist()
    expected = [p for t in train["text"].to_pylist() for p in t.split("\n\n")[1:]]
    assert sorted(texts) == sorted(expected)  # every training paragraph once; no headline, nothing held out
    assert texts != expected  # shuffled, so a capped corpus samples every article
    assert unlabeled_path(config, splits) == path and pq.read_table(path)["text"].to_pylist() == texts
    assert not list(tmp_path.rglob("*.tmp"))
    assert unlabeled_path(DataConfig(cache_dir=str(tmp_path), train_path="x.parquet"), splits) is None
    assert unlabeled_path(DataConfig(train_path="x.parquet", unlabeled_path="c/"), splits) == "c/"


def test_numeric_and_categorical_labels_are_class_names(tmp_path):
    table = labeled_table()
    numbers = pa.array([{"neg": 0, "mid": 1, "pos": 2}[x] for x in table["label"].to_pylist()])
    path = write(tmp_path, "n.parquet", table.set_column(1, "label", numbers))
    assert load_labeled_splits(DataConfig(train_path=path)).labels == ("0", "1", "2")
    categorical = write(
        tmp_path, "c.parquet", table.set_column(1, "label", table["label"].dictionary_encode())
    )
    assert load_labeled_splits(DataConfig(train_path=categorical)).labels == ("mid", "neg", "pos")


@pytest.mark.parametrize(
    "labels, message",
    [
        (lambda n: pa.array([""] * 3 + ["pos"] * (n - 3)),
         r"3 row\(s\) have an empty 'label' \(first rows \[0, 1, 2\]\)"),
        (lambda n: pa.array(["  "] * n), rf"{240} row\(s\) have an empty 'label'"),
        (lambda n: pa.array([None] * n, pa.string()), rf"{240} row\(s\) have a null 'label'"),
        (lambda n: pa.array([["a"]] * n),
         r"column 'label' must hold class names \(strings or numbers\), it holds list"),
    ],
)  # fmt: skip
def test_labels_that_name_no_class_are_refused(tmp_path, labels, message):
    table = labeled_table()
    path = write(tmp_path, "x.parquet", table.set_column(1, "label", labels(table.num_rows)))
    with pytest.raises(DataError, match=message):
        load_labeled_splits(DataConfig(train_path=path))


def test_a_label_with_no_dev_or_test_rows_is_trained_with_a_warning(tmp_path):
    table = labeled_table()
    labels = table["label"].to_pylist()
    labels[7] = "rare"  # one row: a 70/15/15 split leaves it in train
    path = write(tmp_path, "x.parquet", table.set_column(1, "label", pa.array(labels)))
    with pytest.warns(
        UserWarning, match=r"1 label\(s\) have training rows but no dev rows \('rare': 1"
    ) as seen:
        splits = load_labeled_splits(DataConfig(train_path=path))
    assert any(
        "no test rows ('rare': 1 training rows): the reported accuracy" in str(w.message) for w in seen
    )
    assert "rare" in splits.labels


def test_dev_and_test_rows_repeating_training_texts_are_counted_with_a_warning(tmp_path):
    from pipelines.training.eval_overlap import eval_rows_in_train, warn_eval_in_train

    table = labeled_table()
    repeated = pa.concat_tables([table, table.slice(0, 40)])  # 40 texts twice: some land in dev and test
    splits = load_labeled_splits(DataConfig(train_path=write(tmp_path, "x.parquet", repeated)))
    counts = eval_rows_in_train(splits)
    train = set(splits.train["text"].to_pylist())
    assert counts == {
        name: sum(t in train for t in split["text"].to_pylist())
        for name, split in (("dev", splits.dev), ("test", splits.test))
    }
    assert counts["dev"] + counts["test"] > 0
    with pytest.warns(
        UserWarning, match=rf"{counts['test']} of {splits.test.num_rows} test rows have a text"
    ):
        warn_eval_in_train(counts, splits)
    clean = load_labeled_splits(DataConfig(train_path=write(tmp_path, "y.parquet", table)))
    assert eval_rows_in_train(clean) == {"dev": 0, "test": 0}
