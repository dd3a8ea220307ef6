"""A uniform random sample of a parquet corpus's rows, reading only the row groups that hold them (no Ray
here): what `jobs/score.py --calibrate-rows` certifies its knob on, and what the training job holds out of
a user's unlabeled corpus to certify on.

The sample is drawn uniformly at random, without replacement, from all the files' rows (across files and row
groups) with a recorded seed: a bound speaks of the corpus only if the sample is random with respect to it,
and an evenly spaced sample of a corpus in periodic order (fixed-size documents, templated records,
interleaved sources) is not (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ee_model.texts import invalid_text_reasons
from pipelines.errors import UserError
from pipelines.text_column import column_texts


def sample_rows(total: int, rows: int, seed: int) -> np.ndarray:
    """`rows` of `total` row numbers drawn uniformly without replacement (all when rows >= total), sorted."""
    if rows >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=rows, replace=False))


def sample_texts(files: Sequence[tuple[str, int]], text_column: str, rows: int, seed: int) -> list[str]:
    """The texts of `rows` rows drawn uniformly at random, with `seed`, from the scorable rows of `files`
    ((path, row count) in order): null, empty and non-string texts are never scored, so rows drawn on them
    are replaced by further draws from the rows not drawn yet (fewer only when the files hold fewer). Only
    the row groups holding drawn rows are read."""
    counts = np.array([n for _, n in files], dtype=np.int64)
    total = int(counts.sum())
    wanted = sample_rows(total, rows, seed)
    drawn, texts = wanted, valid_texts(read_rows(files, counts, wanted, text_column))
    rng = np.random.default_rng([seed, 1])
    while len(texts) < rows and len(drawn) < total:
        left = total - len(drawn)
        if left <= 4 * len(drawn):  # few rows left: draw among them directly
            remaining = np.setdiff1d(np.arange(total), drawn, assume_unique=True)
            more = np.sort(rng.choice(remaining, size=min(left, len(drawn)), replace=False))
        else:  # many: draw afresh (as many as drawn so far) and keep the ones not drawn before
            more = np.setdiff1d(np.unique(rng.integers(total, size=len(drawn))), drawn)
        drawn = np.union1d(drawn, more)
        found, need = valid_texts(read_rows(files, counts, more, text_column)), rows - len(texts)
        if len(found) > need:  # the ones needed, drawn among those found
            found = [found[i] for i in np.sort(rng.choice(len(found), size=need, replace=False))]
        texts += found
    return texts


def valid_texts(texts: list) -> list[str]:
    """The scorable ones of `texts`, in order."""
    return [t for t, reason in zip(texts, invalid_text_reasons(texts), strict=True) if reason is None]


def read_rows(
    files: Sequence[tuple[str, int]], counts: np.ndarray, wanted: np.ndarray, text_column: str
) -> list:
    """The `text_column` values of the rows numbered `wanted` (sorted, over all rows of `files` in order),
    reading only the row groups that hold them."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    texts: list = []
    for f, (path, _) in enumerate(files):
        local = wanted[(wanted >= starts[f]) & (wanted < starts[f + 1])] - starts[f]
        if not len(local):
            continue
        parquet = pq.ParquetFile(path)
        group_starts = np.cumsum(
            [0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        )
        group_of = np.searchsorted(group_starts, local, side="right") - 1  # the row group of each sampled row
        groups = np.unique(group_of)
        try:
            column = parquet.read_row_groups(groups.tolist(), columns=[text_column])[text_column]
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"cannot read the sampled rows from {path!r}: {error}") from None
        read_starts = np.cumsum(np.concatenate([[0], np.diff(group_starts)[groups]]))[:-1]  # in `column`
        positions = read_starts[np.searchsorted(groups, group_of)] + (local - group_starts[group_of])
        texts.extend(column_texts(column.take(positions)))
    return texts
