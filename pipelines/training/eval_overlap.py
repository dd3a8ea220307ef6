"""Unlabeled text that is also dev or test text: left out of stage 2 and counted; dev or test text that is
also training text: counted, with a warning.

Stage 2 distils the teacher into the students on the unlabeled corpus; the exit knob is then chosen on dev and
the model reported on test. A dev or test text inside the corpus would make both a measurement on text the
students were trained on, so an unlabeled row whose text equals a dev or test text (exactly) is dropped from
the stream (as an unreadable row is) and counted (`rows.unlabeled_overlapping_eval`), with a warning.
Texts are compared by an 8-byte BLAKE2 digest, so the set that travels to the read tasks stays small.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pds

from pipelines.data import DataError, LabeledSplits
from pipelines.text_column import column_texts


def text_key(text: Any) -> bytes | None:
    return hashlib.blake2b(text.encode(), digest_size=8).digest() if isinstance(text, str) else None


def eval_text_keys(splits: LabeledSplits) -> frozenset[bytes]:
    """Digests of every dev and test text and of the held-out certification rows: what stage 2 never reads."""
    texts = [*splits.dev["text"].to_pylist(), *splits.test["text"].to_pylist(), *splits.held_out]
    return frozenset(key for key in map(text_key, texts) if key is not None)


def keys_digest(keys: frozenset[bytes]) -> str:
    """One name for a set of keys: part of a feature store part's identity."""
    return hashlib.sha256(b"".join(sorted(keys))).hexdigest()[:16]


def overlapping(texts: Iterable[Any], keys: frozenset[bytes]) -> list[bool]:
    return [text_key(text) in keys for text in texts]


def count_overlap(files: list[Any], filesystem: Any, column: str, keys: frozenset[bytes]) -> int:
    """Rows of the used part of each corpus file (`CorpusFile`: path, rows) whose text is a dev or test text;
    reads the text column once, a record batch at a time."""
    total = 0
    for corpus_file in files:
        left = corpus_file.rows
        try:
            fragment = pds.dataset(corpus_file.path, format="parquet", filesystem=filesystem)
            for batch in fragment.to_batches(columns=[column]):
                texts = column_texts(batch.column(0).slice(0, left))
                total += sum(overlapping(texts, keys))
                left -= len(texts)
                if left <= 0:
                    break
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"cannot read unlabeled corpus file {corpus_file.path!r}: {error}") from error
    return total


def warn_overlap(count: int) -> None:
    if count:
        warnings.warn(
            f"{count} row(s) of the unlabeled corpus are dev or test texts: left out of stage 2, so the knob "
            "chosen on dev and the test numbers are not measured on text the students were distilled on",
            stacklevel=2,
        )


def eval_rows_in_train(splits: LabeledSplits) -> dict[str, int]:
    """Dev and test rows whose text is (exactly) a training text: {"dev": n, "test": n}."""
    train = frozenset(map(text_key, splits.train["text"].to_pylist()))
    return {
        name: sum(overlapping(split["text"].to_pylist(), train))
        for name, split in (("dev", splits.dev), ("test", splits.test))
    }


def warn_eval_in_train(counts: dict[str, int], splits: LabeledSplits) -> None:
    """A warning with the counts when dev or test rows repeat training texts (duplicates in the labeled
    data): the model is measured, and the knob chosen, partly on texts it was trained on."""
    sizes = {"dev": splits.dev.num_rows, "test": splits.test.num_rows}
    named = [f"{counts[name]} of {sizes[name]} {name} rows" for name in ("dev", "test") if counts[name]]
    if named:
        warnings.warn(
            f"{' and '.join(named)} have a text that is also a training text: the test accuracy and the "
            "knob chosen on dev partly measure texts the model was trained on (deduplicate the labeled data)",
            stacklevel=2,
        )
