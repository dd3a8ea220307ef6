"""Tokenising as its own Ray Data stage: CPU tasks turn the text column into token ids before the scoring
actors (or stage 2's feature extractors), so a GPU actor spends its time on the model, not on the tokenizer.

The ids travel as an Arrow list<int32> column (null for a row that cannot be scored) beside the reason such a
row gets; the scorer reads both and drops them. Rows keep their order and count.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ee_model.io import WEIGHTS_FILE
from ee_model.texts import invalid_text_reasons
from ee_model.tokens import TextTokenizer, TokenIds, single_threaded_tokenizers
from pipelines.model_source import ModelFiles
from pipelines.text_column import column_texts

TOKEN_IDS_COLUMN = "__ee_token_ids"  # list<int32>: the row's token ids, null when it cannot be scored
INVALID_COLUMN = "__ee_invalid"  # string: why the row cannot be scored, null when it can
STAGE_COLUMNS = (TOKEN_IDS_COLUMN, INVALID_COLUMN)


@dataclass(frozen=True)
class TokenizerFiles:
    """The model's files without its weights (tokenizer files and `ee_config.json`), and their digest: what a
    tokenising task needs, a few MB at most, loaded once per worker process."""

    files: ModelFiles
    digest: str

    @classmethod
    def from_directory(cls, directory) -> TokenizerFiles:
        everything = ModelFiles.from_directory(directory)
        files = {name: data for name, data in everything.files.items() if name != WEIGHTS_FILE}
        digest = hashlib.sha256()
        for name, data in sorted(files.items()):
            digest.update(name.encode() + b"\0" + data)
        return cls(ModelFiles(files), digest.hexdigest()[:16])

    def load(self) -> TextTokenizer:
        loaded = _LOADED.get(self.digest)
        if loaded is None:
            from transformers import AutoTokenizer

            from ee_model.config import EarlyExitConfig

            with tempfile.TemporaryDirectory(prefix="ee-tokenizer-") as local:
                self.files.write_to(local)
                max_length = EarlyExitConfig.load(local).max_length
                tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=False)
            loaded = _LOADED[self.digest] = TextTokenizer(tokenizer, max_length)
        return loaded


_LOADED: dict[str, TextTokenizer] = {}  # per worker process: Ray reuses task workers, so one load each


def tokenize_batch(batch: pa.Table, tokenizer: TokenizerFiles, text_column: str) -> pa.Table:
    """The batch with its token ids and invalid-row reasons appended (the stage's map_batches function)."""
    single_threaded_tokenizers()  # the task holds one CPU
    texts = column_texts(batch[text_column])
    reasons = invalid_text_reasons(texts)
    invalid = np.array([reason is not None for reason in reasons], dtype=bool)
    ids = tokenizer.load()([t for t, r in zip(texts, reasons, strict=True) if r is None])
    lengths = np.zeros(len(texts), dtype=np.int32)
    lengths[~invalid] = ids.lengths
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    column = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(ids.values, pa.int32()), mask=pa.array(invalid)
    )
    return batch.append_column(TOKEN_IDS_COLUMN, column).append_column(
        INVALID_COLUMN, pa.array(reasons, pa.string())
    )


def has_token_ids(batch: pa.Table) -> bool:
    return TOKEN_IDS_COLUMN in batch.column_names


def token_ids_of(batch: pa.Table) -> tuple[TokenIds, list[str | None], pa.Table]:
    """(ids of the scoreable rows in order, every row's reason or None, the batch without the stage's
    columns)."""
    column = batch[TOKEN_IDS_COLUMN].combine_chunks()
    scoreable = column.filter(column.is_valid())
    lengths = pc.list_value_length(scoreable).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(scoreable).to_numpy(zero_copy_only=False).astype(np.int32)
    reasons = batch[INVALID_COLUMN].to_pylist()
    return TokenIds(values, lengths), reasons, batch.drop_columns(list(STAGE_COLUMNS))
