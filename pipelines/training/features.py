"""Stage 2 from cached features: one frozen pass per row, then the students train on what it produced.

In stage 2 the backbone and the teacher are frozen and in eval mode, so what each student sees (its layer's
pooled hidden state) and what it learns from (the teacher's logits) are fixed per row. A Ray Data job computes
them once: the stage-2 corpus (labeled training texts + the unlabeled corpus, streamed) -> `map_batches`
(`FeatureExtractor`, an actor pool, the model loaded once per actor, GPU or CPU) -> parquet in a feature
store. Stage 2's Ray Train workers then read the store instead of the texts; the model's
`forward(student_features=, teacher_logits=)` runs only the student heads, so each epoch costs heads, not
backbones.

A store (`<root>/<key>/`, the key from the stage-1 weights, max_length and dtype) holds one part per input:
the labeled training split, the dev split, and each file of the unlabeled corpus (named by the file's path,
size, modification time, the rows used and the text column). The driver writes each part aside and renames it
into place once every one of its input rows has come back (rows whose text is null, empty or not a string
count, and are left out), so a killed extraction leaves only complete parts and the rerun extracts only the
parts still missing; a corpus that gains a file extracts that file only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ee_model.config import EarlyExitConfig
from ee_model.flops import FlopsModel
from ee_model.texts import invalid_text_reason, invalid_text_reasons
from pipelines.actor_stream import actor_pool, commit_each_input
from pipelines.data import (
    UNLABELED,
    DataError,
    parquet_dataset,
    require_columns,
    streaming_parquet_read,
    unlabeled_path,
    with_label_ids,
)
from pipelines.errors import UserError
from pipelines.feature_batches import FEATURES_COLUMN, LABEL_COLUMN, TEACHER_COLUMN
from pipelines.model_source import ModelFiles, weights_digest
from pipelines.paths import replace_atomically
from pipelines.text_column import column_texts
from pipelines.tokenizing import TokenizerFiles, has_token_ids, token_ids_of, tokenize_batch
from pipelines.training.eval_overlap import eval_text_keys, keys_digest, overlapping
from pipelines.training.trainer import storage_uri
from pipelines.training.worker_loop import MODEL_SUBDIR

if TYPE_CHECKING:
    import ray.data
    from ray import ObjectRef
    from ray.train import Checkpoint

    from pipelines.config import TrainConfig
    from pipelines.data import LabeledSplits

FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}
CHUNK = 64  # rows per frozen forward inside a map_batches call
PART_COLUMN = "__ee_part"  # int32: the row's part, its index in `extraction_parts` (dropped when written)
VALID_COLUMN = "__ee_valid"  # False: the row's text is null, empty or not a string (counted, not written)


class FeatureStoreError(UserError):
    """The feature store cannot be written (e.g. too little disk)."""


class FeatureExtractor:
    """map_batches callable: text + label_id -> label_id, student features and teacher logits per row."""

    def __init__(self, model: ModelFiles | ObjectRef | str, dtype: str, cpus: float = 1.0) -> None:
        from pipelines.model_source import load_shipped_model

        self.model = load_shipped_model(model, cpus=cpus).eval()
        self.dtype = FEATURE_DTYPES[dtype]

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """Rows sorted by length and run `CHUNK` at a time (little padding), results in input order; a row
        whose text cannot be read gets zeros and `VALID_COLUMN` False. Token ids come from the tokenising
        stage when it ran (`pipelines.tokenizing`), else the actor tokenises."""
        from pipelines.evaluation.passes import autocast_for

        model, device = self.model, self.model.device
        if has_token_ids(batch):
            token_ids, reasons, batch = token_ids_of(batch)
        else:
            texts = column_texts(batch["text"])
            reasons = invalid_text_reasons(texts)
            token_ids = model.tokenize([t for t, r in zip(texts, reasons, strict=True) if r is None])
        valid = np.array([r is None for r in reasons], dtype=bool)
        positions = np.flatnonzero(valid)  # the row of each token_ids entry
        features = np.zeros((len(valid), model.n_layers - 1, model.flops_model.hidden_size), dtype=self.dtype)
        teacher = np.zeros((len(valid), model.config.num_labels), dtype=np.float32)
        order = np.argsort(-token_ids.lengths, kind="stable")
        for start in range(0, len(order), CHUNK):
            chunk = order[start : start + CHUNK]
            rows = positions[chunk]
            input_ids, attention_mask = token_ids.take(chunk).padded(model.text_tokenizer.pad_id, device)
            with torch.inference_mode(), autocast_for(device):  # as the stage-2 step ran the frozen backbone
                pooled = model.pooled_features(input_ids, attention_mask)  # (L, rows, H)
                logits = model.teacher(pooled[-1])
            features[rows] = pooled[:-1].transpose(0, 1).float().cpu().numpy()
            teacher[rows] = logits.float().cpu().numpy()
        return {
            LABEL_COLUMN: batch[LABEL_COLUMN].to_numpy().astype(np.int64),
            FEATURES_COLUMN: features,
            TEACHER_COLUMN: teacher,
            PART_COLUMN: batch[PART_COLUMN].to_numpy(),
            VALID_COLUMN: valid,
        }


@dataclass(frozen=True)
class StorePart:
    """One input's features: a parquet file in the store, complete once it exists."""

    name: str
    rows: int  # input rows it covers (unreadable texts included; they are left out of the file)


@dataclass(frozen=True)
class CorpusFile:
    """A file of the unlabeled corpus and the rows of it stage 2 uses (the first `rows`)."""

    path: str
    rows: int
    file_rows: int
    part: StorePart


@dataclass(frozen=True)
class FeatureStore:
    """Parts of one store folder (`<root>/<key>/`) that make one dataset (stage 2's train or dev)."""

    path: Path
    parts: tuple[StorePart, ...]

    @property
    def missing(self) -> list[StorePart]:
        return [part for part in self.parts if not (self.path / part.name).is_file()]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def rows(self) -> int:
        return sum(part.rows for part in self.parts)

    def files(self) -> list[str]:
        return [str(self.path / part.name) for part in self.parts]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def digest(identity: Any) -> str:
    """A short, stable name for everything some contents depend on."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def store_key(identity: dict[str, Any]) -> str:
    return f"features-{digest(identity)}"


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


def part_name(kind: str, identity: Any) -> str:
    return f"{kind}-{digest(identity)}.parquet"


def labeled_part(kind: str, table: pa.Table) -> StorePart:
    """The part of a labeled split (text + label id), named by its contents."""
    identity = [table["text"].to_pylist(), table["label_id"].to_pylist()]
    return StorePart(part_name(kind, identity), table.num_rows)


def unlabeled_files(config: TrainConfig, splits: LabeledSplits) -> tuple[list[CorpusFile], Any, str]:
    """The unlabeled corpus's files in order with the rows used of each (`data.max_unlabeled_rows` takes the
    first rows in file order), its pyarrow filesystem and its text column. Row counts come from the parquet
    footers; nothing is read."""
    path = unlabeled_path(config.data, splits)
    column = config.data.unlabeled_text_column or config.data.text_column
    if path is None:
        return [], None, column
    dataset = parquet_dataset(path)
    require_columns(dataset, [column], path)
    left = config.data.max_unlabeled_rows
    left_out = keys_digest(eval_text_keys(splits))  # the dev and test texts dropped from the corpus
    files = []
    for fragment in dataset.get_fragments():
        if left == 0:
            break
        try:
            file_rows = fragment.count_rows()
            info = dataset.filesystem.get_file_info(fragment.path)
        except (OSError, pa.ArrowException) as error:
            raise DataError(f"cannot read unlabeled corpus file {fragment.path!r}: {error}") from error
        rows = file_rows if left is None else min(file_rows, left)
        left = None if left is None else left - rows
        if rows == 0:
            continue
        identity = [fragment.path, info.size, info.mtime_ns, rows, column, left_out]
        files.append(
            CorpusFile(fragment.path, rows, file_rows, StorePart(part_name("unlabeled", identity), rows))
        )
    return files, dataset.filesystem, column


def tag_unlabeled(
    batch: pa.Table, column: str, parts: dict[str, int], eval_keys: frozenset[bytes] = frozenset()
) -> pa.Table:
    """Rows of corpus files as extraction input: text (null where unreadable, or where it is a dev or test
    text: `eval_overlap`), no label, their part's index."""
    texts = column_texts(batch[column])
    left_out = overlapping(texts, eval_keys)
    texts = [
        t if invalid_text_reason(t) is None and not out else None
        for t, out in zip(texts, left_out, strict=True)
    ]
    paths = batch["path"].to_pylist()
    part_of = {path: parts[_path_key(path)] for path in set(paths)}
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            LABEL_COLUMN: pa.array([UNLABELED] * len(texts), pa.int64()),
            PART_COLUMN: pa.array([part_of[path] for path in paths], pa.int32()),
        }
    )


def _path_key(path: str) -> str:
    """Ray's "path" column and pyarrow's fragment paths name local files alike once made absolute."""
    return os.path.abspath(path) if "://" not in path and os.path.exists(path) else path


def extraction_parts(labeled: dict[StorePart, pa.Table], files: list[CorpusFile]) -> list[StorePart]:
    """The parts one extraction writes, in the order `PART_COLUMN` numbers them: labeled, then files."""
    return [*labeled, *(f.part for f in files)]


def extraction_dataset(
    labeled: dict[StorePart, pa.Table],
    files: list[CorpusFile],
    filesystem: Any,
    column: str,
    eval_keys: frozenset[bytes] = frozenset(),
) -> ray.data.Dataset:
    """The rows of the parts to extract, each tagged with its part's index in `extraction_parts` (an
    integer: a name on every row took a fifth more of the object store in flight): labeled tables as they
    are, corpus files streamed (a file used only in part is read up to its rows)."""
    import ray.data

    pieces = [
        ray.data.from_arrow(
            table.select(["text", LABEL_COLUMN]).append_column(
                PART_COLUMN, pa.array([index] * table.num_rows, pa.int32())
            )
        )
        for index, table in enumerate(labeled.values())
    ]
    parts = {_path_key(f.path): len(labeled) + i for i, f in enumerate(files)}
    whole = [f.path for f in files if f.rows == f.file_rows]
    reads = (
        [streaming_parquet_read(whole, [column], include_paths=True, filesystem=filesystem)] if whole else []
    )
    reads += [
        streaming_parquet_read([f.path], [column], include_paths=True, filesystem=filesystem).limit(f.rows)
        for f in files
        if f.rows < f.file_rows
    ]
    pieces += [
        read.map_batches(
            tag_unlabeled,
            fn_kwargs={"column": column, "parts": parts, "eval_keys": eval_keys},
            batch_format="pyarrow",
        )
        for read in reads
    ]
    return pieces[0].union(*pieces[1:]) if len(pieces) > 1 else pieces[0]


def write_parts(features: ray.data.Dataset, store_path: Path, parts: list[StorePart]) -> None:
    """Drive the extraction (`commit_each_input`): each part's rows are written aside and the part renamed
    into place once all its input rows have come back (`parts` as `extraction_parts` numbers them). A part
    that ends short (or long) is never committed."""
    staging = store_path / f"_tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        commit_each_input(
            features.iter_batches(batch_size=None, batch_format="pyarrow"),
            PART_COLUMN,
            {index: part.rows for index, part in enumerate(parts)},
            lambda index: PartOutput(staging / parts[index].name, store_path / parts[index].name),
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class PartOutput:
    """One store part while its feature rows arrive (an `actor_stream.StreamedOutput`): the valid rows are
    written to `staging`, renamed to `final` when complete."""

    staging: Path
    final: Path
    writer: pq.ParquetWriter | None = None

    def write(self, rows: pa.Table) -> None:
        kept = rows.filter(rows[VALID_COLUMN]).drop_columns([VALID_COLUMN])
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.staging, kept.schema)
        self.writer.write_table(kept)

    def commit(self) -> None:
        self.writer.close()
        replace_atomically(self.staging, self.final)  # the part's commit point

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()


def extract_features(
    labeled: dict[StorePart, pa.Table],
    files: list[CorpusFile],
    filesystem: Any,
    column: str,
    model: ObjectRef,
    store_path: Path,
    dtype: str,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
    threads: float | None = None,
    batch_size: int = 256,
    tokenizer: TokenizerFiles | None = None,
    eval_keys: frozenset[bytes] = frozenset(),
) -> None:
    """Extract the given parts into `store_path`. Each actor reserves `cpus_per_actor` CPUs and runs
    `threads` torch threads (default as many as it reserves). With `tokenizer`, CPU tasks tokenise before the
    actors (what keeps a GPU actor on the model)."""

    rows = extraction_dataset(labeled, files, filesystem, column, eval_keys)
    if tokenizer is not None:
        rows = rows.map_batches(
            tokenize_batch, fn_kwargs={"tokenizer": tokenizer, "text_column": "text"}, batch_format="pyarrow"
        )
    features = rows.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"model": model, "dtype": dtype, "cpus": threads or cpus_per_actor},
        compute=actor_pool(actors, actors),
        batch_size=batch_size,
        batch_format="pyarrow",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
    write_parts(features, store_path, extraction_parts(labeled, files))


def read_features(store: FeatureStore) -> ray.data.Dataset:
    import ray.data

    if not store.complete:
        raise FeatureStoreError(f"feature store {store.path} lacks parts {[p.name for p in store.missing]}")
    return ray.data.read_parquet(store.files())


def training_features(store: FeatureStore, memory_share: float = 0.25) -> ray.data.Dataset:
    """The store as Ray Train reads it every epoch: materialised in Ray's object store when its files take
    at most `memory_share` of the store's memory (an epoch then starts from memory, not from new read tasks),
    streamed from the files otherwise, so memory stays bounded for any corpus size."""
    import ray

    dataset = read_features(store)
    size = sum(os.path.getsize(f) for f in store.files())
    if size <= memory_share * ray.cluster_resources().get("object_store_memory", 0):
        return dataset.materialize()
    return dataset


@dataclass(frozen=True)
class ExtractionPlan:
    """What stage 2's features are made of: the labeled splits and corpus files as store parts, the store
    they belong in, and the stage-1 model that makes them."""

    labeled: dict[str, pa.Table]  # "train" / "dev": text and label ids
    labeled_parts: dict[str, StorePart]
    files: list[CorpusFile]
    filesystem: Any
    column: str
    path: Path  # the store folder of this model's features
    model: ObjectRef  # the stage-1 model's files in the object store
    tokenizer: TokenizerFiles | None
    bytes_for: Callable[[int], int]  # bytes the features of n rows take in the store

    @property
    def stores(self) -> dict[str, FeatureStore]:
        train_parts = (self.labeled_parts["train"], *(f.part for f in self.files))
        return {
            "train": FeatureStore(self.path, train_parts),
            "dev": FeatureStore(self.path, (self.labeled_parts["dev"],)),
        }


def cached_features(
    splits: LabeledSplits, init: Checkpoint, config: TrainConfig
) -> tuple[dict[str, FeatureStore], int, dict[str, float]]:
    """Stage 2's "train" (labeled texts + unlabeled corpus) and "dev" datasets as features of the stage-1
    checkpoint `init`, extracting only the parts not already in the store; (stores by split, training rows,
    {"feature_extraction_seconds": ..., "feature_store_bytes": ...})."""
    plan = extraction_plan(splits, init, config)
    stores, started = plan.stores, time.time()
    missing = {part.name for store in stores.values() for part in store.missing}
    if missing:
        extract_missing(plan, missing, config, eval_text_keys(splits))
    return (
        stores,
        stores["train"].rows,
        {
            "feature_extraction_seconds": round(time.time() - started, 2),
            "feature_store_bytes": float(plan.bytes_for(stores["train"].rows + stores["dev"].rows)),
        },
    )


def extraction_plan(splits: LabeledSplits, init: Checkpoint, config: TrainConfig) -> ExtractionPlan:
    """The store parts of `splits` and the unlabeled corpus, keyed by the stage-1 checkpoint `init`."""
    import ray

    stage2 = config.stage2
    with init.as_directory() as directory:
        model_dir = Path(directory) / MODEL_SUBDIR
        model_config = EarlyExitConfig.load(model_dir)
        identity = {
            "weights": weights_digest(model_dir),
            "max_length": model_config.max_length,
            "pooling": model_config.pooling,  # what the students' features are: pooled how,
            "head_norm": model_config.head_norm,  # through the final norm or not
            "dtype": stage2.feature_dtype,
        }
        model = ray.put(ModelFiles.from_directory(model_dir))
        tokenizer = TokenizerFiles.from_directory(model_dir) if tokenizes_in_tasks(config) else None
    labeled = {
        name: with_label_ids(getattr(splits, name), splits.labels).select(["text", LABEL_COLUMN])
        for name in ("train", "dev")
    }
    files, filesystem, column = unlabeled_files(config, splits)
    flops = FlopsModel.of_model(model_config)

    def size(rows: int) -> int:
        return bytes_needed(
            rows, flops.n_layers, flops.hidden_size, model_config.num_labels, stage2.feature_dtype
        )

    return ExtractionPlan(
        labeled,
        {name: labeled_part(name, table) for name, table in labeled.items()},
        files,
        filesystem,
        column,
        feature_root(config) / store_key(identity),
        model,
        tokenizer,
        size,
    )


def extract_missing(
    plan: ExtractionPlan, missing: set[str], config: TrainConfig, eval_keys: frozenset
) -> None:
    """Extract the parts named `missing` into the plan's store, after checking the disk can hold them."""
    import ray

    resources = config.resources
    stores = plan.stores
    check_disk(
        plan.path.parent,
        plan.bytes_for(sum(p.rows for s in stores.values() for p in s.parts if p.name in missing)),
    )
    todo_labeled = {
        plan.labeled_parts[n]: t for n, t in plan.labeled.items() if plan.labeled_parts[n].name in missing
    }
    todo_files = [f for f in plan.files if f.part.name in missing]
    rows = sum(p.rows for p in todo_labeled) + sum(f.rows for f in todo_files)
    print(f"stage2: extracting features of {rows} rows ({len(missing)} parts) into {plan.path}", flush=True)
    actors = max(resources.num_workers, 1)
    # Ray reserves a worker's CPUs per actor, so the corpus's read tasks always find a CPU (no deadlock);
    # no training runs yet, so on CPUs each actor's torch threads may share out every core
    threads = resources.cpus_per_worker
    if not resources.use_gpu:
        threads = max(threads, float(int(ray.cluster_resources().get("CPU", 1) // actors)))
    extract_features(
        todo_labeled,
        todo_files,
        plan.filesystem,
        plan.column,
        plan.model,
        plan.path,
        config.stage2.feature_dtype,
        actors=actors,
        cpus_per_actor=resources.cpus_per_worker,
        gpus_per_actor=1 if resources.use_gpu else 0,
        threads=threads,
        tokenizer=plan.tokenizer,
        eval_keys=eval_keys,
    )


def tokenizes_in_tasks(config: TrainConfig) -> bool:
    """GPU actors get a tokenising stage of CPU tasks before them when the cluster has a CPU beside the
    actors; on CPUs the actors tokenise (a separate stage would only take CPUs from them, as measured for
    scoring)."""
    import ray

    resources = config.resources
    if not resources.use_gpu:
        return False
    spare = ray.cluster_resources().get("CPU", 0) - max(resources.num_workers, 1) * resources.cpus_per_worker
    return spare >= 1


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
