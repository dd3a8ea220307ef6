"""Labeled and unlabeled data: parquet in, checked before any training starts, Ray Datasets out."""

from __future__ import annotations

import collections
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from ee_model.texts import invalid_text_reason
from pipelines.config import DataConfig
from pipelines.errors import UserError
from pipelines.paths import parquet_source, write_parquet_atomically
from pipelines.text_column import is_binary_text, is_text_type

# label id of stage-2 rows without a gold label (ignored by every loss term that uses labels)
UNLABELED = -100


class DataError(UserError):
    """Labeled or unlabeled data that cannot be trained on; raised before any training starts."""


@dataclass(frozen=True)
class LabeledSplits:
    """train/dev/test tables with columns text (string) and label (string); labels sorted from train."""

    train: pa.Table
    dev: pa.Table
    test: pa.Table
    labels: tuple[str, ...]
    dropped_invalid_text: int  # rows whose text was null, empty or not a string (reported, not trained on)
    # unlabeled texts held out of stage 2 (the knob is certified on them: pipelines.training.certification)
    held_out: tuple[str, ...] = ()


def parquet_dataset(path: str) -> pds.Dataset:
    try:
        return pds.dataset(parquet_source(path, error=DataError), format="parquet")
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"cannot read parquet at {path!r}: {error}") from error


def require_columns(dataset: pds.Dataset, columns: list[str], path: str) -> None:
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise DataError(f"{path!r} has no column(s) {missing}; its columns are {dataset.schema.names}")


def read_labeled(path: str, text_column: str, label_column: str) -> pa.Table:
    """Read text + label columns, as (text, label) with labels as strings (numbers as they print: 3 -> "3");
    null or blank labels, and labels that are not strings or numbers, refused."""
    dataset = parquet_dataset(path)
    require_columns(dataset, [text_column, label_column], path)
    try:
        table = dataset.to_table(columns=[text_column, label_column])
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"cannot read parquet at {path!r}: {error}") from error
    labels = table[label_column]
    refuse_rows(pc.is_null(labels), path, f"a null {label_column!r}")
    texts = table[text_column]
    if not is_text_type(texts.type) or is_binary_text(texts.type):
        raise DataError(f"{path!r}: column {text_column!r} must hold strings, it holds {texts.type}")
    names = label_names(labels, path, label_column)
    return pa.table({"text": texts.cast(pa.string()), "label": names})


def label_names(labels: pa.ChunkedArray, path: str, label_column: str) -> pa.ChunkedArray:
    """The labels as class names (strings); DataError for a type that names no class, or blank names."""
    kind = labels.type.value_type if pa.types.is_dictionary(labels.type) else labels.type
    names_a_class = (is_text_type(kind) and not is_binary_text(kind)) or any(
        test(kind) for test in (pa.types.is_integer, pa.types.is_floating, pa.types.is_boolean)
    )
    if not names_a_class:
        raise DataError(
            f"{path!r}: column {label_column!r} must hold class names (strings or numbers), it holds "
            f"{labels.type}"
        )
    names = labels.cast(pa.string())
    refuse_rows(pc.equal(pc.utf8_trim_whitespace(names), ""), path, f"an empty {label_column!r}")
    return names


def refuse_rows(mask: pa.ChunkedArray, path: str, what: str) -> None:
    """DataError naming how many rows of `path` have `what` (where `mask` is true) and the first of them."""
    rows = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    if len(rows):
        raise DataError(f"{path!r}: {len(rows)} row(s) have {what} (first rows {rows[:5].tolist()})")


def drop_invalid_texts(table: pa.Table) -> tuple[pa.Table, int]:
    keep = np.array([invalid_text_reason(t) is None for t in table["text"].to_pylist()], dtype=bool)
    return table.filter(pa.array(keep)), int((~keep).sum())


def stratified_split(table: pa.Table, fractions: tuple[float, float, float], seed: int):
    """Deterministic per-class shuffle and cut: each class spread over train/dev/test by `fractions`."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(table["label"].to_pylist())
    parts: list[list[int]] = [[], [], []]
    for label in sorted(set(labels.tolist())):
        index = np.flatnonzero(labels == label)
        index = index[rng.permutation(len(index))]
        n_dev, n_test = int(round(len(index) * fractions[1])), int(round(len(index) * fractions[2]))
        n_train = len(index) - n_dev - n_test
        parts[0] += index[:n_train].tolist()
        parts[1] += index[n_train : n_train + n_dev].tolist()
        parts[2] += index[n_train + n_dev :].tolist()
    return tuple(table.take(pa.array(sorted(p), type=pa.int64())) for p in parts)


def check_splits(train: pa.Table, dev: pa.Table, test: pa.Table) -> tuple[str, ...]:
    if train.num_rows == 0:
        raise DataError("the training set is empty (after dropping null/empty texts)")
    labels = tuple(sorted(set(train["label"].to_pylist())))
    if len(labels) < 2:
        raise DataError(f"the training set has a single class {list(labels)}: nothing to classify")
    for name, split in (("dev", dev), ("test", test)):
        if split.num_rows == 0:
            raise DataError(f"the {name} set is empty")
        unknown = sorted(set(split["label"].to_pylist()) - set(labels))
        if unknown:
            raise DataError(f"{name} labels {unknown} never occur in train (train labels: {list(labels)})")
    warn_unevaluated_labels(train, dev, test)
    return labels


def warn_unevaluated_labels(train: pa.Table, dev: pa.Table, test: pa.Table) -> None:
    """A warning naming each label that has training rows but no dev or no test rows (a class of one or
    two rows, which a 70/15/15 split leaves in train): the model learns it, but the knob's promise is not
    checked on it (dev) and its accuracy is not measured (test)."""
    counts = collections.Counter(train["label"].to_pylist())
    for name, split, consequence in (
        ("dev", dev, "the exit knob is chosen without them"),
        ("test", test, "the reported accuracy does not cover them"),
    ):
        missing = sorted(set(counts) - set(split["label"].to_pylist()))
        if missing:
            rows = ", ".join(f"{label!r}: {counts[label]}" for label in missing)
            warnings.warn(
                f"{len(missing)} label(s) have training rows but no {name} rows ({rows} training rows): "
                f"{consequence}",
                stacklevel=3,
            )


def load_labeled_splits(config: DataConfig) -> LabeledSplits:
    """Read, clean and split (or read separately) the labeled data, checking everything up front."""
    train_path = config.train_path or default_corpus_paths(config)["labeled"]
    table = read_labeled(train_path, config.text_column, config.label_column)
    if config.dev_path is None:
        table, dropped = drop_invalid_texts(table)
        train, dev, test = stratified_split(table, config.split_fractions, config.split_seed)
    else:
        dev_raw = read_labeled(config.dev_path, config.text_column, config.label_column)
        test_raw = read_labeled(config.test_path, config.text_column, config.label_column)
        (train, a), (dev, b), (test, c) = (drop_invalid_texts(t) for t in (table, dev_raw, test_raw))
        dropped = a + b + c
    return LabeledSplits(train, dev, test, check_splits(train, dev, test), dropped)


def unlabeled_path(config: DataConfig, splits: LabeledSplits) -> str | None:
    """The stage-2 corpus: the configured one, or for the default corpus the training articles' paragraphs."""
    if config.unlabeled_path is not None:
        return config.unlabeled_path or None  # "" switches the unlabeled corpus off
    return default_unlabeled_corpus(splits.train, config) if config.train_path is None else None


def default_corpus_paths(config: DataConfig) -> dict[str, str]:
    """Write the BBC articles (with labels) as parquet on first use."""
    from pipelines.bbc import read_bbc_articles

    path = Path(config.cache_dir).resolve() / "bbc" / "articles.parquet"
    if not path.is_file():
        write_parquet_atomically(read_bbc_articles(), path)
    return {"labeled": str(path)}


def evenly_spaced_rows(total: int, rows: int) -> np.ndarray:
    """`rows` indices spread evenly over range(total) (all of them when rows >= total)."""
    if rows >= total:
        return np.arange(total)
    return np.unique(np.floor(np.arange(rows) * (total / rows)).astype(np.int64))


def default_unlabeled_corpus(train: pa.Table, config: DataConfig) -> str:
    """Paragraphs of the training split's articles only, in a seeded random order, as parquet.

    Only training articles: paragraphs of dev or test articles would let stage 2 distil on the very texts the
    threshold is chosen and the model reported on. Shuffled: a capped corpus (`max_unlabeled_rows`) is then a
    sample of every class, not the first class's paragraphs.
    """
    from pipelines.bbc import split_paragraphs

    fractions = "-".join(f"{f:g}" for f in config.split_fractions)
    path = (
        Path(config.cache_dir).resolve()
        / "bbc"
        / f"paragraphs-train-{fractions}-seed{config.split_seed}.parquet"
    )
    if not path.is_file():
        articles = pa.table({"doc_id": pa.array(range(train.num_rows)), "text": train["text"]})
        paragraphs = split_paragraphs(articles).select(["text"])
        order = np.random.default_rng(config.split_seed).permutation(paragraphs.num_rows)
        write_parquet_atomically(paragraphs.take(pa.array(order)), path)
    return str(path)


@contextmanager
def streaming_parquet_reader(preserve_order: bool | None = None) -> Iterator[None]:
    """Datasets created inside read parquet with the reader that streams under object-store backpressure.

    Ray 2.60's datasource-V2 parquet reader reads whole groups of files in one task with no backpressure: a
    corpus larger than the object store spills whole (docs/results.md, "Measurements the code refers to").
    The flags are read when a dataset is created, so they are set only inside
    this block and restored at once. tests/pipelines/training/test_streaming.py guards the behaviour.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    previous_reader = getattr(context, "use_datasource_v2", None)
    previous_order = context.execution_options.preserve_order
    if previous_reader is not None:
        context.use_datasource_v2 = False
    if preserve_order is not None:
        context.execution_options.preserve_order = preserve_order
    try:
        yield
    finally:
        context.execution_options.preserve_order = previous_order
        if previous_reader is not None:
            context.use_datasource_v2 = previous_reader


def streaming_parquet_read(
    files: list[str], columns: list[str], include_paths: bool = False, filesystem=None
):
    """A lazy Ray Data read of parquet files on `filesystem` that streams (see `streaming_parquet_reader`);
    `include_paths` adds each row's file as the "path" column."""
    import ray.data

    with streaming_parquet_reader():
        dataset = ray.data.read_parquet(files, include_paths=include_paths, filesystem=filesystem)
    return dataset.select_columns([*columns, "path"] if include_paths else columns)


def with_label_ids(table: pa.Table, labels: tuple[str, ...]) -> pa.Table:
    """(text, label) -> (text, label_id) using the model's label order."""
    ids = pc.index_in(table["label"], value_set=pa.array(labels)).cast(pa.int64())
    return pa.table({"text": table["text"], "label_id": ids})
