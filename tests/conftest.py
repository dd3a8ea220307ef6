"""Shared fixtures: tiny random encoders (no hub), texts of mixed lengths."""

from __future__ import annotations

import os
import random
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ee_model.cpu_support import cpu_support
from ee_model.tiny import WORDS


def free_port() -> int:
    """A TCP port free on localhost right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller looks at its workers every 2 s by default, and a fit waits for a few of those looks
# (started, reported, finished): 11.5 s for a fit that does nothing, 7 s at 0.2 s. The runs here train for
# seconds, so they look more often (inherited by every job and cluster the tests start); behaviour is the
# same.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """A test that sets an MLflow tracking URI (itself or through the pipeline's setup_tracking) must not hand
    it to later tests: mlflow.set_tracking_uri pins a process-wide URI that wins over $MLFLOW_TRACKING_URI,
    and also writes that variable, which every later subprocess inherits."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # clears the pinned URI and the variable
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


def pytest_collection_modifyitems(config, items):
    """The `ray` marker comes from the fixture that starts Ray: a test that asks for `ray_local` is a Ray test
    (tests that run a job in its own process mark themselves)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _ray_only_where_marked(request, monkeypatch):
    """A test without the `ray` marker may not start Ray: it would be left in `-m "not ray"` runs and pay for
    a cluster there. One that needs Ray asks for `ray_local`."""
    if request.node.get_closest_marker("ray") is not None:
        return
    import ray

    if ray.is_initialized():  # the session's cluster, started by an earlier Ray test: nothing to start
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts Ray: ask for the ray_local fixture")

    monkeypatch.setattr(ray, "init", refuse)


FAMILIES = ["bert", "roberta", "distilbert", "electra"]  # BERT-like: every runtime runs them
# ModernBERT (Ettin) and DeBERTa-v3: their layers take more than a padding mask (ee_model.encoders), so the
# runtimes that export layers one by one (int8, OpenVINO) refuse them
NEWER_FAMILIES = ["modernbert", "deberta-v2"]
ALL_FAMILIES = FAMILIES + NEWER_FAMILIES
# the same, the newer families behind the slow marker: for the heavier per-family tests, so the developer loop
# stays under 3 minutes (the full suite runs them all)
ALL_FAMILIES_NEWER_SLOW = FAMILIES + [pytest.param(f, marks=pytest.mark.slow) for f in NEWER_FAMILIES]
LABELS = ["business", "sport", "tech"]

# Tests that run bf16 OpenVINO layers (or anything that needs bf16 units, not just emulates them) skip on a
# CPU without them, naming what is missing: an AVX2-only CPU, or any CPU under ONEDNN_MAX_CPU_ISA=AVX2 (which
# oneDNN and `ee_model.cpu_support` honour). bf16 in PyTorch still runs there (emulated, correct, slow), so
# its tests run on every CPU.
needs_bf16_units = pytest.mark.skipif(
    not cpu_support().has_bf16,
    reason=f"needs a CPU with bf16 units (AMX-BF16 or AVX512-BF16); here: {cpu_support().describe()}",
)


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
        path = tiny_encoder_dir(model_type, num_layers, seed=seed)
        torch.manual_seed(seed)  # after the (cached) encoder is written: heads never depend on test order
        return EarlyExitClassifier.from_encoder(path, labels=LABELS, **options).eval()

    return make


def pooled_error(reference, model, texts: list[str]):
    """Per row, the largest relative L2 error over layers of `model`'s pooled hidden states against
    `reference`'s (the fp32 model), on `texts` in one padded batch (mixed lengths: padding in it)."""
    import torch

    inputs = reference.encode(texts)
    with torch.inference_mode():
        expected, got = reference.pooled_features(**inputs), model.pooled_features(**inputs)
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max(dim=-1).values


def random_texts(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
    """Texts of very different lengths, from the tiny vocabulary plus unknown characters."""

    rng = random.Random(seed)
    pool = WORDS + ["zebra", "42", "qu!ck", "naïve", "😀", "x"]
    return [" ".join(rng.choice(pool) for _ in range(rng.randint(1, max_words))) for _ in range(n)]


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


def trained_tiny(encoder_dir: str, steps: int = 60, threshold: float = 0.5):
    """A tiny model after `steps` joint cross-entropy steps on the separable task (< 1 s for 2 layers):
    confident on most rows, not all, unlike untrained heads' near-uniform outputs (S 0.5 by default)."""
    import numpy as np
    import torch

    from ee_model import EarlyExitClassifier, joint_loss

    table = labeled_table(240)
    texts, labels = table["text"].to_pylist(), table["label"].to_pylist()
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder(encoder_dir, labels=list(CLASS_WORDS), threshold=threshold)
    label_ids = torch.tensor([model.config.labels.index(label) for label in labels])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        rows = np.random.default_rng(step).choice(len(texts), 32)
        loss = joint_loss(model(**model.encode([texts[i] for i in rows])).logits, label_ids[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def unlabeled_table(n: int = 300, seed: int = 1) -> pa.Table:
    rng = random.Random(seed)
    return pa.table(
        {"body": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15))) for _ in range(n)]}
    )


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


OBJECT_STORE_BYTES = 128 * 1024 * 1024  # small on purpose: the streaming test feeds a corpus twice this size


@pytest.fixture(scope="session")
def ray_local():
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=OBJECT_STORE_BYTES,
        )
    yield ray
    ray.shutdown()
