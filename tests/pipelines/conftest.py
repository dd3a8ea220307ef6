"""Fixtures for pipeline tests: a real local Ray, tiny labeled/unlabeled parquet, an MLflow sqlite store."""

from __future__ import annotations

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ee_model.tiny import WORDS

CLASS_WORDS = {"pos": "good great", "neg": "bad awful", "mid": "money sport"}


def labeled_table(n: int = 240, seed: int = 0) -> pa.Table:
    """Separable tiny task: each class has its own key words inside random filler."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = list(CLASS_WORDS)[i % 3]
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        texts.append(f"{filler} {CLASS_WORDS[label]}")
        labels.append(label)
    return pa.table({"text": texts, "label": labels, "row_id": list(range(n))})


def unlabeled_table(n: int = 300, seed: int = 1) -> pa.Table:
    rng = random.Random(seed)
    return pa.table({"body": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]})


@pytest.fixture
def labeled_parquet(tmp_path):
    path = tmp_path / "labeled.parquet"
    pq.write_table(labeled_table(), path)
    return str(path)


@pytest.fixture
def unlabeled_parquet(tmp_path):
    path = tmp_path / "unlabeled.parquet"
    pq.write_table(unlabeled_table(), path)
    return str(path)


@pytest.fixture(scope="session")
def ray_local():
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
