"""Token ids of many texts as two flat arrays, and padding them into model inputs.

`TokenIds` is the one form token ids travel in: from the tokenizer to the exit engine inside a process, and
between a tokenising stage and a scoring stage as an Arrow list column (`values` and `lengths` map onto a list
array's values and offsets without a copy per row).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class TokenIds:
    """Unpadded token ids of n rows: row i is values[starts[i] : starts[i] + lengths[i]]."""

    values: np.ndarray  # (total tokens,) int32
    lengths: np.ndarray  # (n,) int64

    def __post_init__(self) -> None:
        if int(self.lengths.sum()) != len(self.values):
            raise ValueError(f"lengths sum to {int(self.lengths.sum())}, values hold {len(self.values)}")

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]]) -> TokenIds:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        values = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(lengths.sum()))
        return cls(values, lengths)

    def to_lists(self) -> list[list[int]]:
        return [self.values[s : s + n].tolist() for s, n in zip(self.starts, self.lengths, strict=True)]

    def take(self, rows: np.ndarray) -> TokenIds:
        """The given rows, in the given order."""
        starts, lengths = self.starts[rows], self.lengths[rows]
        index = np.repeat(starts - np.cumsum(np.concatenate([[0], lengths[:-1]])), lengths)
        index += np.arange(int(lengths.sum()))
        return TokenIds(self.values[index], lengths)

    def padded(self, pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), right-padded with `pad_id` to the longest row: (n, width) int64."""
        width = int(self.lengths.max()) if len(self) else 0
        mask = np.arange(width)[None, :] < self.lengths[:, None]  # (n, width), row-major = values' order
        ids = np.full(mask.shape, pad_id, dtype=np.int64)
        ids[mask] = self.values
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask.astype(np.int64)).to(device)


class TextTokenizer:
    """Texts -> `TokenIds` with the model's special tokens, truncated to `max_length`, unpadded.

    A fast (Rust) tokenizer is called through a copy of its backend set to truncate, with
    `encode_batch_fast`: the same ids as `tokenizer(texts, truncation=True, max_length=...)` without building
    a Python `BatchEncoding` per call (tests/ee_model/test_tokens.py checks both agree; benchmarks/
    tokenize_speed.py measures the gain). Other tokenizers go through their `__call__`.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.backend = None
        if getattr(tokenizer, "is_fast", False):
            # a copy: the tokenizer's own keeps its settings
            self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
            self.backend.no_padding()
            self.backend.enable_truncation(max_length, direction=tokenizer.truncation_side)

    def __call__(self, texts: Sequence[str]) -> TokenIds:
        if self.backend is None:
            encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=False)
            return TokenIds.from_lists(encoded["input_ids"])
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=True)
        return TokenIds.from_lists([e.ids for e in encodings])


def single_threaded_tokenizers() -> None:
    """Keep the Rust tokenizer on the caller's one CPU (a Ray task holding one CPU), not every core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
