"""Stage 2 from cached features: one frozen pass per row, then the students train on what it produced.

In stage 2 the backbone and the teacher are frozen and in eval mode, so what each student sees (its layer's
pooled hidden state) and what it learns from (the teacher's logits) are fixed per row. A Ray Data job computes
them once: the stage-2 corpus (labeled training texts + the unlabeled corpus, streamed) -> `map_batches`
(`FeatureExtractor`, an actor pool, the model loaded once per actor, GPU or CPU) -> parquet in a feature
store. Stage 2's Ray Train workers then read the store instead of the texts; the model's
`forward(student_features=, teacher_logits=)` runs only the student heads, so each epoch costs heads, not
backbones.

A store is named by everything its contents depend on (the stage-1 weights, the corpus, the row cap, the
model's max_length, the dtype) and is written aside, then renamed into place with a `_COMPLETE` marker: a run
finding a complete store of the same name reuses it, a killed extraction leaves nothing that could be read as
complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from ee_model.config import EarlyExitConfig
from ee_model.flops import FlopsModel
from pipelines.data import DataError, unlabeled_path
from pipelines.errors import UserError
from pipelines.feature_batches import FEATURES_COLUMN, LABEL_COLUMN, TEACHER_COLUMN
from pipelines.model_source import ModelFiles, weights_digest
from pipelines.paths import parquet_files
from pipelines.training.trainer import storage_uri
from pipelines.training.worker_loop import MODEL_SUBDIR

if TYPE_CHECKING:
    import ray.data
    from ray import ObjectRef
    from ray.train import Checkpoint

    from pipelines.config import TrainConfig
    from pipelines.data import LabeledSplits

COMPLETE_MARKER = "_COMPLETE"
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
CHUNK = 64  # rows per frozen forward inside a map_batches call


class FeatureStoreError(UserError):
    """The feature store cannot be written (e.g. too little disk)."""


class FeatureExtractor:
    """map_batches callable: text + label_id -> label_id, student features and teacher logits per row."""

    def __init__(self, model: ModelFiles | ObjectRef | str, dtype: str, cpus: float = 1.0) -> None:
        import math

        from pipelines.model_source import load_shipped_model

        torch.set_num_threads(max(1, math.floor(cpus)))
        self.model = load_shipped_model(model).eval()
        self.dtype = FEATURE_DTYPES[dtype]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows sorted by length and run `CHUNK` at a time (little padding), results in input order."""
        from pipelines.evaluation.passes import autocast_for

        model, device = self.model, self.model.device
        token_ids = model.tokenize([str(t) for t in batch["text"]])
        order = np.argsort(-token_ids.lengths, kind="stable")
        features = np.empty((len(order), model.n_layers - 1, model.flops_model.hidden_size), dtype=self.dtype)
        teacher = np.empty((len(order), model.config.num_labels), dtype=np.float32)
        for start in range(0, len(order), CHUNK):
            rows = order[start : start + CHUNK]
            input_ids, attention_mask = token_ids.take(rows).padded(model.text_tokenizer.pad_id, device)
            with torch.inference_mode(), autocast_for(device):  # as the stage-2 step ran the frozen backbone
                pooled = model.pooled_features(input_ids, attention_mask)  # (L, rows, H)
                logits = model.teacher(pooled[-1])
            features[rows] = pooled[:-1].transpose(0, 1).float().cpu().numpy()
            teacher[rows] = logits.float().cpu().numpy()
        return {
            LABEL_COLUMN: np.asarray(batch[LABEL_COLUMN], dtype=np.int64),
            FEATURES_COLUMN: features,
            TEACHER_COLUMN: teacher,
        }


@dataclass(frozen=True)
class FeatureStore:
    """Where one stage-2 corpus's features live: `<root>/<key>/`, complete once `_COMPLETE` is there."""

    root: Path
    key: str

    @property
    def path(self) -> Path:
        return self.root / self.key

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE_MARKER).is_file()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def store_key(identity: dict[str, Any]) -> str:
    """A name for the store from everything its contents depend on."""
    return "features-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def bytes_needed(rows: int, n_layers: int, hidden: int, num_labels: int, dtype: str) -> int:
    """Uncompressed size of a store: features, teacher logits and labels of every row."""
    itemsize = np.dtype(FEATURE_DTYPES[dtype]).itemsize
    return rows * ((n_layers - 1) * hidden * itemsize + num_labels * 4 + 8)


def check_disk(root: Path, needed: int) -> None:
    """Refuse before writing when the store's disk cannot hold it (with a 10 % margin): better than a
    half-written store."""
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if needed * 1.1 > free:
        raise FeatureStoreError(
            f"the stage-2 feature store needs about {needed / 2**30:.2f} GiB at {root} and the disk has "
            f"{free / 2**30:.2f} GiB free; set stage2.feature_store to a larger disk, stage2.feature_dtype="
            "float16, or data.max_unlabeled_rows lower"
        )


def extract_features(
    corpus: ray.data.Dataset,
    model: ObjectRef,
    store: FeatureStore,
    dtype: str,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    threads: float | None = None,
    batch_size: int = 256,
) -> FeatureStore:
    """Write the corpus's features into `store` (written aside, renamed into place when complete). Each actor
    reserves `cpus_per_actor` CPUs and runs `threads` torch threads (default as many as it reserves)."""
    import ray.data

    if store.complete:
        return store
    store.remove()  # an incomplete store of the same name: a killed run's, never read
    staging = store.root / f"_tmp-{store.key}-{uuid.uuid4().hex[:8]}"
    corpus.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"model": model, "dtype": dtype, "cpus": threads or cpus_per_actor},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    ).write_parquet(str(staging))
    (staging / COMPLETE_MARKER).write_text("")
    staging.rename(store.path)
    return store


def read_features(store: FeatureStore) -> ray.data.Dataset:
    import ray.data

    if not store.complete:
        raise FeatureStoreError(f"feature store {store.path} is not complete")
    return ray.data.read_parquet(str(store.path), file_extensions=["parquet"])


def cached_features(
    datasets: dict[str, ray.data.Dataset],
    rows: int,
    splits: LabeledSplits,
    init: Checkpoint,
    config: TrainConfig,
) -> tuple[dict[str, FeatureStore], dict[str, float]]:
    """Stage 2's "train" (labeled texts + unlabeled corpus) and "dev" datasets as features of the stage-1
    checkpoint `init`, extracted once each (or found complete in the store); (stores by split,
    {"feature_extraction_seconds": ..., "feature_store_bytes": ...})."""
    import ray

    stage2, resources = config.stage2, config.resources
    with init.as_directory() as directory:
        model_dir = Path(directory) / MODEL_SUBDIR
        model_config = EarlyExitConfig.load(model_dir)
        common = {
            "weights": weights_digest(model_dir),
            "max_length": model_config.max_length,
            "dtype": stage2.feature_dtype,
        }
        model = ray.put(ModelFiles.from_directory(model_dir))
    identities = {
        "train": {
            **common,
            "texts": text_digest(splits.train),
            "unlabeled": corpus_identity(config, splits),
            "max_unlabeled_rows": config.data.max_unlabeled_rows,
            "rows": rows,
        },
        "dev": {**common, "texts": text_digest(splits.dev)},
    }
    counts = {"train": rows, "dev": splits.dev.num_rows}
    flops = FlopsModel.from_encoder_config(
        model_config.pretrained_encoder_config(), model_config.head_type, model_config.num_labels
    )
    needed = {
        name: bytes_needed(
            n, flops.n_layers, flops.hidden_size, model_config.num_labels, stage2.feature_dtype
        )
        for name, n in counts.items()
    }
    root = feature_root(config)
    stores = {name: FeatureStore(root, store_key(identity)) for name, identity in identities.items()}
    actors = max(resources.num_workers, 1)
    # Ray reserves a worker's CPUs per actor, so the corpus's read tasks always find a CPU (no deadlock); no
    # training runs yet, so on CPUs each actor's torch threads may share out every core
    threads = resources.cpus_per_worker
    if not resources.use_gpu:
        threads = max(threads, float(int(ray.cluster_resources().get("CPU", 1) // actors)))
    started = time.time()
    missing = [name for name, store in stores.items() if not store.complete]
    if missing:
        check_disk(root, sum(needed[name] for name in missing))
    for name in missing:
        print(
            f"stage2: extracting features of {counts[name]} {name} rows into {stores[name].path}", flush=True
        )
        extract_features(
            datasets[name],
            model,
            stores[name],
            stage2.feature_dtype,
            actors=actors,
            cpus_per_actor=resources.cpus_per_worker,
            gpus_per_actor=1 if resources.use_gpu else 0,
            threads=threads,
        )
    return stores, {
        "feature_extraction_seconds": round(time.time() - started, 2),
        "feature_store_bytes": float(sum(needed.values())),
    }


def text_digest(table: pa.Table) -> str:
    return hashlib.sha256(str(table["text"].to_pylist()).encode()).hexdigest()


def feature_root(config: TrainConfig) -> Path:
    """stage2.feature_store, else <storage_path>/stage2_features (a local or shared path)."""
    if config.stage2.feature_store:
        return Path(config.stage2.feature_store).resolve()
    storage = storage_uri(config.resources)
    if "://" in storage:
        raise FeatureStoreError(
            f"resources.storage_path={storage!r} is not a file system path; set stage2.feature_store to a "
            "path every node can read"
        )
    return Path(storage) / "stage2_features"


def corpus_identity(config: TrainConfig, splits: LabeledSplits) -> list | None:
    """The unlabeled corpus's files with their sizes and modification times (a changed file changes it)."""
    path = unlabeled_path(config.data, splits)
    if path is None:
        return None
    files, _ = parquet_files(str(path), error=DataError)
    return [(str(f), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files]
