"""Token ids as flat arrays: the fast tokenizer call gives the ids `tokenizer(...)` gives; padding and taking
rows are exact."""

import numpy as np
import pytest
import torch

from ee_model.tokens import TextTokenizer, TokenIds
from tests.conftest import ALL_FAMILIES, random_texts


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
@pytest.mark.parametrize("max_length", [8, 128])
def test_fast_path_gives_the_tokenizers_own_ids(tiny_model, model_type, max_length):
    model = tiny_model(model_type, num_layers=2)
    texts = random_texts(30, seed=3, max_words=60) + ["ÄÖÜ café naïve", "x", "a " * 300]
    expected = model.tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    fast = TextTokenizer(model.tokenizer, max_length)
    assert fast.backend is not None
    assert fast(texts).to_lists() == expected
    assert max(len(ids) for ids in expected) == min(max_length, max(len(ids) for ids in expected))


def test_fast_path_leaves_the_tokenizer_as_it_was(tiny_model):
    model = tiny_model("bert", num_layers=2)
    before = model.tokenizer(["a b c d e f g h"], padding="max_length", max_length=12)["input_ids"]
    TextTokenizer(model.tokenizer, 4)(["a b c d e f g h"])
    assert model.tokenizer(["a b c d e f g h"], padding="max_length", max_length=12)["input_ids"] == before


def test_slow_tokenizers_go_through_their_call(tiny_model):
    model = tiny_model("bert", num_layers=2)

    class Slow:  # any tokenizer without a Rust backend
        is_fast = False
        pad_token_id = model.tokenizer.pad_token_id

        def __call__(self, *args, **kwargs):
            return model.tokenizer(*args, **kwargs)

    texts = random_texts(10, seed=1)
    assert TextTokenizer(Slow(), 16)(texts).to_lists() == TextTokenizer(model.tokenizer, 16)(texts).to_lists()


def test_take_and_padded_are_exact():
    rows = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    ids = TokenIds.from_lists(rows)
    assert ids.values.dtype == np.int32 and ids.lengths.tolist() == [3, 1, 2, 4]
    assert ids.take(np.array([3, 1, 0])).to_lists() == [[11, 12, 13, 14], [8], [5, 6, 7]]
    input_ids, mask = ids.take(np.array([1, 2])).padded(pad_id=1)
    assert input_ids.tolist() == [[8, 1], [9, 10]]
    assert mask.tolist() == [[1, 0], [1, 1]]
    assert input_ids.dtype == torch.int64 and mask.dtype == torch.int64
    with pytest.raises(ValueError, match="lengths sum"):
        TokenIds(np.arange(3, dtype=np.int32), np.array([1, 1]))


def test_encode_pads_with_the_pad_id_on_the_right(tiny_model):
    model = tiny_model("roberta", num_layers=2)
    texts = ["a", "the film is good"]
    batch = model.encode(texts)
    expected = model.tokenizer(texts, padding=True, truncation=True, max_length=model.config.max_length)
    assert batch["input_ids"].tolist() == expected["input_ids"]
    assert batch["attention_mask"].tolist() == expected["attention_mask"]
