"""Token ids of many texts as two flat arrays, and padding them into model inputs.

`TokenIds` is the one form token ids travel in: from the tokenizer to the exit engine inside a process, and
between a tokenising stage and a scoring stage as an Arrow list column (`values` and `lengths` map onto a list
array's values and offsets without a copy per row).
"""

from __future__ import annotations

import copy
import os
import re
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


CHARS_PER_TOKEN = 8  # a long text's first cut keeps this many characters per token wanted (doubled as needed)
MARGIN_TOKENS = 8  # a cut is kept only when it yields this many tokens past what truncation keeps


class TextTokenizer:
    """Texts -> `TokenIds` with the model's special tokens, truncated to `max_length`, unpadded.

    A fast (Rust) tokenizer is called through a copy of its backend set to truncate, with
    `encode_batch_fast`: the same ids as `tokenizer(texts, truncation=True, max_length=...)` without building
    a Python `BatchEncoding` per call (tests/ee_model/test_tokens.py checks both agree; benchmarks/
    tokenize_speed.py measures the gain). Other tokenizers go through their `__call__`.

    A tokenizer reads a whole text before it truncates, so a 1 MB row would cost a second and gigabytes for
    the `max_length` tokens kept. Long texts are therefore cut first, at a whitespace boundary, to
    CHARS_PER_TOKEN characters per token wanted; a cut is kept when it still yields MARGIN_TOKENS tokens
    more than truncation keeps (the cut's edge lies among tokens that are dropped anyway), else it is
    retried at twice the length, up to the whole text. The ids are the uncut text's (tested on WordPiece,
    byte-level BPE and Unigram tokenizers); a row costs what its kept tokens cost, at most about twice.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.side = getattr(tokenizer, "truncation_side", "right")
        self.backend = self.counter = None
        if getattr(tokenizer, "is_fast", False):
            # copies: the tokenizer's own keeps its settings
            self.backend = copy.deepcopy(tokenizer.backend_tokenizer)
            self.backend.no_padding()
            self.backend.enable_truncation(max_length, direction=self.side)
            self.counter = copy.deepcopy(self.backend)
            self.counter.enable_truncation(max_length + MARGIN_TOKENS, direction=self.side)

    def __call__(self, texts: Sequence[str]) -> TokenIds:
        return TokenIds.from_lists(self._ids(self.cut_long(list(texts)), self.max_length))

    def _ids(self, texts: list[str], max_length: int) -> list[list[int]]:
        if self.backend is None:
            return self.tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
        backend = self.backend if max_length == self.max_length else self.counter
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]

    def cut_long(self, texts: list[str]) -> list[str]:
        """`texts` with each long one replaced by its shortest cut (see the class) that keeps its ids."""
        wanted = self.max_length + MARGIN_TOKENS
        budget = CHARS_PER_TOKEN * wanted
        long = [i for i, text in enumerate(texts) if len(text) > budget]
        texts = list(texts) if long else texts
        while long:
            cuts = {i: cut_at_whitespace(texts[i], budget, self.side) for i in long}
            tried = [i for i in long if cuts[i] is not None]
            counts = [len(ids) for ids in self._ids([cuts[i] for i in tried], wanted)]
            enough = {i for i, n in zip(tried, counts, strict=True) if n >= wanted}
            for i in enough:
                texts[i] = cuts[i]
            budget *= 2
            long = [i for i in long if i not in enough and len(texts[i]) > budget]
        return texts


def cut_at_whitespace(text: str, chars: int, side: str = "right") -> str | None:
    """At most `chars` characters of `text` from the side truncation keeps, ending (or, from the left,
    starting) at a whitespace boundary, so that no word is split; None where that part holds none."""
    if side == "left":
        window = text[len(text) - chars :]
        found = _WORD_AFTER_SPACE.search(window)
        return window[found.start() :] if found else None
    window = text[: chars + 1]  # the character after the cut tells whether it ends a word
    ends = [found.end() for found in _WORD_BEFORE_SPACE.finditer(window)]
    return window[: ends[-1]] if ends else None


_WORD_BEFORE_SPACE = re.compile(r"\S(?=\s)")
_WORD_AFTER_SPACE = re.compile(r"(?<=\s)\S")


def single_threaded_tokenizers() -> None:
    """Keep the Rust tokenizer on the caller's one CPU (a Ray task holding one CPU), not every core."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
