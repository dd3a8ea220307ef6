"""Batch scoring of parquet corpora: read_parquet -> map_batches(Scorer) on an actor pool -> one committed
output per input file, incremental across runs, rows in == rows out; summary to an MLflow `scoring` run."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ee_model import ExitSetting
from ee_model.config import EarlyExitConfig
from ee_model.flops import FlopsModel
from pipelines.config import S_GRID, ScoreConfig
from pipelines.data import streaming_parquet_reader
from pipelines.errors import UserError
from pipelines.model_source import ModelFiles, ModelSource, resolve_model
from pipelines.paths import parquet_files, write_text_atomically
from pipelines.scoring.calibration import Calibration, calibrate_on_worker, sample_texts
from pipelines.scoring.incremental import OutputFolder, OutputLock, PendingOutput, fingerprint, output_name
from pipelines.scoring.scorer import OUTPUT_COLUMNS, Scorer
from pipelines.text_column import is_text_type
from pipelines.tokenizing import STAGE_COLUMNS, TokenizerFiles, tokenize_batch

if TYPE_CHECKING:
    from ray import ObjectRef

SOURCE_COLUMN = "path"  # added by read_parquet(include_paths=True)


class ScoringError(UserError):
    """Input that cannot be scored: named file or column; raised before any row is scored."""


@dataclass(frozen=True)
class InputFile:
    path: str
    rows: int
    schema: pa.Schema
    output: str  # its output's name below the run's output folder
    fingerprint: dict[str, int]  # size, mtime, rows: a file replaced in place is scored again

    def manifest_record(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, "input": self.path, "fingerprint": self.fingerprint}


def unique_outputs(inputs: list[InputFile]) -> None:
    """Every input's output name must be its own: refuse before anything is scored, naming both inputs."""
    seen: dict[str, str] = {}
    for item in inputs:
        other = seen.setdefault(item.output, item.path)
        if other != item.path:
            raise ScoringError(
                f"inputs {other!r} and {item.path!r} would both be written to {item.output!r}; "
                "rename one or score them into different --output folders"
            )


def inspect_inputs(config: ScoreConfig) -> list[InputFile]:
    """Open every input file's footer: corrupt files, missing text columns and clashes fail here, by name."""
    files, root = parquet_files(config.input, skip=Path(config.output).resolve(), error=ScoringError)
    if not files:
        raise ScoringError(f"no parquet files found at {config.input!r}")
    inputs = []
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as error:
            raise ScoringError(f"cannot read parquet file {path!r}: {error}") from error
        schema = parquet.schema_arrow
        if config.text_column not in schema.names:
            raise ScoringError(
                f"{path!r} has no text column {config.text_column!r}; its columns are {schema.names}"
            )
        text_type = schema.field(config.text_column).type
        if not is_text_type(text_type):
            raise ScoringError(f"{path!r}: text column {config.text_column!r} holds {text_type}, not strings")
        written = [config.output_prefix + c for c in OUTPUT_COLUMNS]
        clashes = [c for c in (*written, SOURCE_COLUMN, *STAGE_COLUMNS) if c in schema.names]
        if clashes:
            raise ScoringError(
                f"{path!r} already has column(s) {clashes} that scoring writes; give "
                "--output-prefix (e.g. pred_) to write pred_label, ... beside them"
            )
        rows = parquet.metadata.num_rows
        inputs.append(InputFile(path, rows, schema, output_name(path, root), fingerprint(path, rows)))
    unique_outputs(inputs)
    return inputs


def files_to_score(inputs: list[InputFile], folder: OutputFolder) -> tuple[dict[str, InputFile], list[str]]:
    """({resolved path: input} to score, paths changed since scored): the inputs without a committed output,
    and those whose file changed (size, mtime or rows) since its output was committed, which are scored
    again."""
    pending, changed = {}, []
    for item in inputs:
        current = folder.is_current(item.output, item.fingerprint)
        if current is False:
            changed.append(item.path)
        if not current:
            pending[str(Path(item.path).resolve())] = item
    if changed:
        warnings.warn(
            f"{len(changed)} input file(s) changed since they were scored; scoring them again: {changed[:5]}",
            stacklevel=2,
        )
    return pending, changed


def unreadable_files(pending: dict[str, InputFile], text_column: str) -> dict[str, str]:
    """{path: reason} of the pending files whose text column cannot be read through (a corrupt data page
    behind an intact footer), taken out of `pending`: they are named at the end, the others are scored and
    committed. Reads each file's text column once, in row-group-sized batches (memory stays flat)."""
    bad = {}
    for key, item in list(pending.items()):
        try:
            for _ in pq.ParquetFile(item.path).iter_batches(columns=[text_column]):
                pass
        except (OSError, pa.ArrowException) as error:
            bad[item.path] = str(error)
            del pending[key]
    return bad


def output_schema(input_schema: pa.Schema, include_probs: bool, prefix: str = "") -> pa.Schema:
    extra = [
        pa.field("label", pa.string()),
        pa.field("confidence", pa.float32()),
        pa.field("exit_layer", pa.int32()),
        pa.field("flops", pa.int64()),
        pa.field("tokens", pa.int32()),
    ]
    if include_probs:
        extra.append(pa.field("probs", pa.list_(pa.float32())))
    extra.append(pa.field("error", pa.string()))
    return pa.schema([*input_schema, *(column.with_name(prefix + column.name) for column in extra)])


def precision_suffix(config: ScoreConfig) -> str:
    """The run key's precision part: empty for fp32 (the keys of earlier runs stay valid), "__int8"."""
    return "" if config.precision == "fp32" else f"__{config.precision}"


def run_key(source: ModelSource, setting: ExitSetting, config: ScoreConfig) -> str:
    """The output folder of one (model, setting, precision, column prefix):
    `<identity>__<policy>[-<knob>][__int8][__prefix-<p>]`."""
    return f"{source.identity}__{setting}{precision_suffix(config)}" + (
        f"__prefix-{config.output_prefix}" if config.output_prefix else ""
    )


@dataclass
class Tally:
    """Running totals over scored rows, for the summary."""

    rows: int = 0
    errors: int = 0
    exit_layers: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    flops: int = 0
    labels: collections.Counter = field(default_factory=collections.Counter)
    prefix: str = ""  # of the output columns
    driver_seconds: float = 0.0  # the driver's own work on the stream (score_stream)

    def add(self, table: pa.Table) -> None:
        column = lambda name: table[self.prefix + name]  # noqa: E731
        self.rows += table.num_rows
        self.errors += table.num_rows - column("error").null_count
        scored = column("error").is_null()
        self.exit_layers.append(column("exit_layer").filter(scored).to_numpy())
        self.tokens.append(column("tokens").filter(scored).to_numpy())
        self.flops += int(pa.compute.sum(column("flops").filter(scored)).as_py() or 0)
        self.labels.update(column("label").filter(scored).to_pylist())


def score_stream(
    dataset: Any, pending: dict[str, InputFile], folder: OutputFolder, schema_of, tally: Tally, record: dict
) -> int:
    """Drive the Ray Data stream; write each input file's rows to its own output and commit it when
    complete. The seconds the driver spends on its own work (splitting, writing, committing, counting; not
    waiting for batches) go to `tally.driver_seconds`: its share of the run says whether one driver keeps
    up."""
    open_outputs: dict[str, PendingOutput] = {}
    committed = 0
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        busy_since = time.perf_counter()
        sources = batch[SOURCE_COLUMN].to_pylist()
        for source in dict.fromkeys(sources):  # a block may hold rows of several files
            rows = batch.filter(pa.compute.equal(batch[SOURCE_COLUMN], source)).drop_columns([SOURCE_COLUMN])
            item = pending[source]
            output = open_outputs.get(source) or open_outputs.setdefault(
                source, folder.writer(item.output, schema_of(item))
            )
            # a batch that joined files of different columns holds the union of them, null where missing
            output.write(rows.select(output.writer.schema.names).cast(output.writer.schema))
            tally.add(rows)
            if output.rows == item.rows:
                output.commit(item.manifest_record(record))
                del open_outputs[source]
                committed += 1
        tally.driver_seconds += time.perf_counter() - busy_since
    if open_outputs:  # rows in must equal rows out: never commit a short file
        short = {s: f"{o.rows}/{pending[s].rows}" for s, o in open_outputs.items()}
        raise RuntimeError(f"scoring ended with incomplete files (rows written/expected): {short}")
    return committed


def build_dataset(
    files: list[str],
    config: ScoreConfig,
    model: ObjectRef,
    setting: ExitSetting | None = None,
    tokenizer: TokenizerFiles | None = None,
):
    """read_parquet -> [map_batches(tokenize_batch), CPU tasks, when `tokenizer` is given] ->
    map_batches(Scorer), an actor pool."""
    import ray.data

    with streaming_parquet_reader(preserve_order=True):  # outputs in input order, deterministic
        # Reading reserves no CPU: on a shared cluster whose CPUs the scoring actors of running jobs hold,
        # read tasks that wait for a CPU never run and every job hangs. Parquet reading is light next to the
        # model.
        dataset = ray.data.read_parquet(files, include_paths=True, num_cpus=0)
        if tokenizer is not None:
            dataset = dataset.map_batches(
                tokenize_batch,
                fn_kwargs={"tokenizer": tokenizer, "text_column": config.text_column},
                batch_size=config.rows_per_task,
                batch_format="pyarrow",
                num_cpus=1,
            )
        return dataset.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "model": model,
                "precision": config.precision,
                "text_column": config.text_column,
                "setting": setting,
                "include_probs": config.include_probs,
                "column_prefix": config.output_prefix,
                "cpus": config.cpus_per_actor,
                "batch_size": config.batch_size,
            },
            compute=ray.data.ActorPoolStrategy(size=config.actors),
            batch_size=config.rows_per_task,
            batch_format="pyarrow",
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor or None,
        )


def spare_cpus_for_tokenizing(config: ScoreConfig) -> bool:
    """Whether the cluster has a CPU the scoring actors do not hold, for the tokenising stage's tasks (else
    they would wait for ever). None spare: `tokenize="tasks"` is refused before anything runs; "auto" warns
    and tokenises in the actors."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    held = config.actors * config.cpus_per_actor
    if cpus - held >= 1:
        return True
    problem = (
        f"a tokenising stage needs a CPU the scoring actors do not hold: the cluster has {cpus:g} and "
        f"{config.actors} actor(s) x {config.cpus_per_actor:g} CPU hold {held:g}"
    )
    if config.tokenize == "tasks":
        raise ScoringError(f"{problem}; lower --cpus-per-actor or --actors, or use --tokenize actor")
    warnings.warn(f"{problem}: the actors tokenise their own batches", stacklevel=2)
    return False


def summarize(tally: Tally, model_config: EarlyExitConfig, seconds: float, counts: dict) -> dict[str, Any]:
    layers = np.concatenate(tally.exit_layers) if tally.exit_layers else np.array([])
    tokens = np.concatenate(tally.tokens).astype(np.int64) if tally.tokens else np.array([], dtype=np.int64)
    flops_model = FlopsModel.from_encoder_config(
        model_config.pretrained_encoder_config(), model_config.head_type, model_config.num_labels
    )
    full = int(flops_model.full_depth_flops(tokens).sum()) if len(tokens) else 0
    return {
        **counts,
        "rows_scored": tally.rows,
        "errors": tally.errors,
        "rows_per_s": round(tally.rows / seconds, 2) if seconds > 0 else None,
        "mean_exit_layer": round(float(layers.mean()), 4) if len(layers) else None,
        "layer_speedup": round(flops_model.n_layers / float(layers.mean()), 4) if len(layers) else None,
        "flops_speedup": round(full / tally.flops, 4) if tally.flops else None,
        "label_distribution": dict(sorted(tally.labels.items())),
        "seconds": round(seconds, 2),
        "driver_busy_share": round(tally.driver_seconds / seconds, 4) if seconds > 0 else None,
    }


def int8_layers_for(config: ScoreConfig, source: ModelSource) -> Path:
    """The model's int8 layers (ee_model.int8), built by the driver once per model version into
    `<output>/_int8/<identity>` and reused by every later run on that output (the manifest is checked)."""
    from ee_model import EarlyExitClassifier, int8_layers

    folder = Path(config.output).resolve() / "_int8" / source.identity
    return int8_layers(EarlyExitClassifier.from_pretrained(source.directory), folder)


def ship_model(source: ModelSource, int8_layers: Path | None = None) -> ObjectRef:
    """The resolved model's files (and its int8 layers, when scoring in int8) in the object store, once per
    job: actors and tasks on any node load them from there (the driver's folders exist on its node only)."""
    import ray

    return ray.put(ModelFiles.from_directory(source.directory, int8_layers))


def calibration_path(config: ScoreConfig, source: ModelSource, policy: str) -> Path:
    name = (
        f"{source.identity}__{policy}{precision_suffix(config)}__agree-{config.min_agreement:g}"
        f"__delta-{config.delta:g}__rows-{config.calibrate_rows}.json"
    )
    return Path(config.output).resolve() / "_calibration" / name


def pinned_calibration(
    config: ScoreConfig,
    source: ModelSource,
    model_config: EarlyExitConfig,
    inputs: list[InputFile],
    shipped_model: Callable[[], ObjectRef],
) -> tuple[Calibration, bool]:
    """(calibration, whether it was pinned by an earlier run). The first run on an output folder calibrates on
    the inputs it sees, in a Ray task with an actor's resources, and pins the result; later runs reuse it, so
    new files are scored with the same knob into the same output key."""
    import ray

    policy = config.policy or model_config.policy
    path = calibration_path(config, source, policy)
    if path.is_file():
        return Calibration(**json.loads(path.read_text())), True
    texts = sample_texts([(f.path, f.rows) for f in inputs], config.text_column, config.calibrate_rows)
    if not texts:
        raise ScoringError(
            f"no valid text to calibrate on in column {config.text_column!r} of {config.input!r}"
        )
    task = ray.remote(calibrate_on_worker).options(
        num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor
    )
    calibration = ray.get(
        task.remote(
            shipped_model(),
            texts,
            policy,
            config.min_agreement,
            config.delta,
            S_GRID,
            config.batch_size,
            config.cpus_per_actor,
            config.precision,
        )
    )
    write_text_atomically(path, json.dumps(calibration.to_dict(), indent=2))  # a kill pins nothing or all
    if not calibration.met:
        warnings.warn(f"calibration of {policy}: {calibration.reason}", stacklevel=2)
    return calibration, False


def with_calibrated_knob(config: ScoreConfig, calibration: Calibration) -> ScoreConfig:
    return dataclasses.replace(
        config, calibrate_rows=0, policy=calibration.policy, **calibration.setting.kwargs
    )


def run_scoring(config: ScoreConfig) -> dict[str, Any]:
    """Score every input file not yet scored for this (model, policy, knob); return the summary."""
    inputs = inspect_inputs(config)
    tokenize_in_tasks = config.tokenizes_in_tasks and spare_cpus_for_tokenizing(config)
    requested, calibration = config, None
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as held:
        source = resolve_model(
            config.model, Path(scratch)
        )  # a model that cannot load leaves no output folder
        model_config = EarlyExitConfig.load(source.directory)
        if (config.policy or model_config.policy) == "risk" and model_config.exit_risk is None:
            raise UserError(
                f"policy 'risk' needs a model with a fitted exit risk, and {config.model!r} has none "
                "(trained before the risk policy, or with eval.exit_risk_rows=0): use --policy entropy"
            )
        held.enter_context(OutputLock(Path(config.output).resolve()))  # before calibration writes there too
        int8 = int8_layers_for(config, source) if config.precision == "int8" else None
        shipped_model = functools.cache(lambda: ship_model(source, int8))
        if config.calibrate_rows:
            calibration, pinned = pinned_calibration(config, source, model_config, inputs, shipped_model)
            config = with_calibrated_knob(config, calibration)
        setting = model_config.setting(config.policy, config.threshold, config.patience, config.risk)
        folder = OutputFolder(Path(config.output).resolve() / run_key(source, setting, config))
        folder.prepare()
        pending, changed = files_to_score(inputs, folder)
        unreadable = unreadable_files(pending, config.text_column)
        record = {
            "model": source.reference,
            "model_identity": source.identity,
            "policy": setting.policy,
            "knob": setting.knob,
            "precision": config.precision,
        }
        schema_of = lambda item: output_schema(item.schema, config.include_probs, config.output_prefix)  # noqa: E731
        tally, started = Tally(prefix=config.output_prefix), time.time()
        skipped = len(inputs) - len(pending)
        committed, tokenizer = 0, None
        for path, item in list(pending.items()):
            if item.rows == 0:  # nothing to stream: commit an empty output with the full schema
                folder.writer(item.output, schema_of(item)).commit(item.manifest_record(record))
                del pending[path]
                committed += 1
        if pending:
            if tokenize_in_tasks:
                tokenizer = TokenizerFiles.from_directory(source.directory)
            dataset = build_dataset(list(pending), config, shipped_model(), setting, tokenizer)
            committed += score_stream(dataset, pending, folder, schema_of, tally, record)
        counts = {
            "input_files": len(inputs),
            "files_scored": committed,
            "files_skipped": skipped,
            "files_changed": len(changed),
            "files_unreadable": len(unreadable),
            "rows_in": sum(f.rows for f in pending.values()),
        }
        summary = summarize(tally, model_config, time.time() - started, counts)
        summary["tokenize"] = "tasks" if tokenizer is not None else "actor"
        if summary["rows_scored"] != counts["rows_in"]:
            raise RuntimeError(f"rows in {counts['rows_in']} != rows out {summary['rows_scored']}")
        summary.update(
            {
                "output": str(folder.root),
                "model": source.reference,
                "model_version": source.version,
                "policy": setting.policy,
                "knob": setting.knob,
                "precision": config.precision,
                "started_at": round(started, 3),
            }
        )
        if calibration is not None:
            summary["calibration"] = {**calibration.to_dict(), "pinned": pinned}
        if unreadable:
            summary["unreadable"] = unreadable
    log_scoring_run(summary, requested, source)
    if unreadable:  # after the readable files were committed and the run logged; a rerun retries these
        named = "; ".join(f"{path}: {reason}" for path, reason in unreadable.items())
        raise ScoringError(
            f"{len(unreadable)} input file(s) could not be read and were not scored (the other "
            f"{summary['files_scored']} were): {named}"
        )
    return summary


def log_scoring_run(summary: dict[str, Any], config: ScoreConfig, source: ModelSource) -> None:
    """One MLflow `scoring` run per job, tagged with the model version."""
    import mlflow

    from pipelines.config import TrackingConfig, resolve_tracking_uri
    from pipelines.tracking import setup_tracking

    setup_tracking(
        resolve_tracking_uri(TrackingConfig(tracking_uri=config.tracking_uri)), config.experiment_name
    )
    tags = {
        "model": source.reference,
        "model_identity": source.identity,
        "model_version": str(source.version),
        "registered_model": str(source.registered_name),
        "input": config.input,
        "output": summary["output"],
    }
    with mlflow.start_run(run_name="scoring", tags=tags):
        mlflow.log_params(
            {
                "policy": summary["policy"],
                "knob": summary["knob"],
                "batch_size": config.batch_size,
                "sort_rows": config.rows_per_task,
                "actors": config.actors,
                "cpus_per_actor": config.cpus_per_actor,
                "gpus_per_actor": config.gpus_per_actor,
                "tokenize": summary["tokenize"],
                "precision": summary["precision"],
                "calibrate_rows": config.calibrate_rows,
                "min_agreement": config.min_agreement if config.calibrate_rows else None,
                "delta": config.delta if config.calibrate_rows else None,
            }
        )
        if "calibration" in summary:
            calibration = summary["calibration"]
            mlflow.log_metrics(
                {
                    f"calibration_{k}": float(calibration[k])
                    for k in ("agreement", "agreement_bound", "rows", "flops_speedup", "mean_exit_layer")
                }
            )
            mlflow.log_params(
                {
                    "calibration_met": calibration["met"],
                    "calibration_pinned": calibration["pinned"],
                    "calibration_reason": calibration["reason"],
                }
            )
        numbers = {
            k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        mlflow.log_metrics({k: float(v) for k, v in numbers.items() if k not in ("knob", "started_at")})
        mlflow.log_dict(summary, "scoring_summary.json")
