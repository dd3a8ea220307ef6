"""Shared fixtures: tiny random encoders (no hub), texts of mixed lengths."""

from __future__ import annotations

import os
import random

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

FAMILIES = ["bert", "roberta", "distilbert", "electra"]
LABELS = ["business", "sport", "tech"]


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory):
    """Factory: path of a saved tiny encoder checkpoint of the given family (cached per session)."""
    from ee_model.tiny import write_tiny_encoder

    cache: dict[tuple, str] = {}

    def make(model_type: str = "bert", num_layers: int = 3, hidden_size: int = 32, seed: int = 0) -> str:
        key = (model_type, num_layers, hidden_size, seed)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"tiny-{model_type}-{num_layers}-{hidden_size}-{seed}")
            cache[key] = str(write_tiny_encoder(directory, model_type, num_layers, hidden_size, seed))
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_encoder_dir):
    """Factory: an EarlyExitClassifier on a tiny encoder, heads seeded, in eval mode."""
    import torch

    from ee_model import EarlyExitClassifier

    def make(model_type: str = "bert", num_layers: int = 3, seed: int = 0, **options):
        torch.manual_seed(seed)
        path = tiny_encoder_dir(model_type, num_layers, seed=seed)
        return EarlyExitClassifier.from_encoder(path, labels=LABELS, **options).eval()

    return make


def random_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """Texts of very different lengths, from the tiny vocabulary plus unknown characters."""
    from ee_model.tiny import WORDS

    rng = random.Random(seed)
    pool = WORDS + ["zebra", "42", "qu!ck", "naïve", "😀", "x"]
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(1, max_words))) for _ in range(n)]
