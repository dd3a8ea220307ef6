"""Token ids as flat arrays: the fast tokenizer call gives the ids `tokenizer(...)` gives; padding and taking
rows are exact."""

import functools

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


@functools.cache
def trained_tokenizer(kind: str):
    """A fast tokenizer of `kind` (byte-level BPE as RoBERTa's, Unigram over Metaspace as
    SentencePiece's), trained here on the tests' texts: no hub."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "</s>", "<pad>", "<unk>"]
    if kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        backend = Tokenizer(models.Unigram())
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=special, unk_token="<unk>")
    backend.train_from_iterator(random_texts(400, seed=11), trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def long_texts(seed: int) -> list[str]:
    """Texts around and far past the length at which they are cut, with what could trip a cut: runs of
    mixed whitespace, words longer than a tokenizer takes whole, text without spaces, a blank tail."""
    import random

    rng = random.Random(seed)
    pieces = random_texts(50, seed=seed, max_words=8) + ["\n\n", "\t", "   ", "x" * 150, "東京大学の研究"]
    texts = ["".join(rng.choice(pieces) + rng.choice([" ", "  ", "\n"]) for _ in range(rng.randint(1, 900)))]
    texts += [" ".join(rng.choice(pieces) for _ in range(n)) for n in (40, 100, 160, 300, 3000)]
    return texts + ["東京" * 5000, "word " * 2000 + "   ", "   " + "word " * 2000, "y" * 50_000]


@pytest.mark.parametrize("kind", ["wordpiece", "wordpiece-left", "bpe", "unigram"])
@pytest.mark.parametrize("max_length", [8, 128])
def test_long_texts_are_cut_before_tokenizing_and_keep_their_ids(tiny_model, kind, max_length):
    """Cut at a whitespace boundary with a margin of tokens, a long text gives the ids of the whole text,
    whatever the tokenizer's kind or truncation side; only long texts are cut."""
    from ee_model.tokens import CHARS_PER_TOKEN, MARGIN_TOKENS

    if kind.startswith("wordpiece"):
        tokenizer = tiny_model("bert", num_layers=2).tokenizer
        tokenizer.truncation_side = "left" if kind.endswith("left") else "right"
    else:
        tokenizer = trained_tokenizer(kind)
    texts = [t for seed in range(6) for t in long_texts(seed)]
    expected = tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]
    fast = TextTokenizer(tokenizer, max_length)
    assert fast(texts).to_lists() == expected
    cut = fast.cut_long(texts)
    budget = CHARS_PER_TOKEN * (max_length + MARGIN_TOKENS)
    assert sum(c != t for c, t in zip(cut, texts, strict=True)) >= len(texts) // 3  # they were cut
    assert all(c == t for c, t in zip(cut, texts, strict=True) if len(t) <= budget)


@pytest.mark.slow  # an accuracy measurement: CI and the capped CI step run it
def test_a_10_mb_row_costs_what_its_kept_tokens_cost(tiny_model, tmp_path):
    """Time and memory bounded by the tokens kept: a 1 MB and a 10 MB row tokenize to the ids of their
    first 2 KB, within twice a 2 KB row's time, and the 10 MB row adds under 64 MB to the process (whole,
    it would take about a gigabyte)."""
    import subprocess
    import sys

    model = tiny_model("bert", num_layers=2)
    model.tokenizer.save_pretrained(tmp_path / "tokenizer")
    script = f"""
import random, resource, time
from transformers import AutoTokenizer
from ee_model.tokens import TextTokenizer
tokenizer = TextTokenizer(AutoTokenizer.from_pretrained({str(tmp_path / "tokenizer")!r}), 128)
rng = random.Random(0)
words = "good great film awful money sport naïve qu!ck 42".split()
big = " ".join(rng.choice(words) for _ in range(2_200_000))[:10_000_000]
short = big[: big.index(" ", 2000)]
def best(text):
    times = []
    for _ in range(5):
        start = time.perf_counter()
        tokenizer([text])
        times.append(time.perf_counter() - start)
    return min(times)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
same = tokenizer([big]).to_lists() == tokenizer([big[:1_000_000]]).to_lists() == tokenizer([short]).to_lists()
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(same, grew, best(big[:1_000_000]) / best(short), best(big) / best(short))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    same, grew, ratio_1mb, ratio_10mb = out.stdout.split()
    assert same == "True" and float(grew) < 64, out.stdout
    assert float(ratio_1mb) < 2 and float(ratio_10mb) < 2, out.stdout
