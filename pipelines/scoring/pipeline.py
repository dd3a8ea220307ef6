"""Batch scoring of parquet corpora: read_parquet -> map_batches(Scorer) on an actor pool -> one committed
output per input file, incremental across runs, rows in == rows out; summary to an MLflow `scoring` run."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ee_model import ExitSetting
from ee_model.config import EarlyExitConfig
from ee_model.runtime import FP32, Runtime
from ee_model.runtime_choice import RuntimeChoice
from pipelines import actor_stream
from pipelines.actor_stream import actor_pool, commit_each_input
from pipelines.config import S_GRID
from pipelines.data import streaming_parquet_reader
from pipelines.errors import IncompleteRun, UserError
from pipelines.model_source import ModelFiles, ModelSource, resolve_model
from pipelines.paths import write_text_atomically
from pipelines.row_sample import sample_texts
from pipelines.scoring.calibration import (
    Calibration,
    auto_calibration_rows,
    auto_kept_reason,
    calibrate_on_worker,
)
from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.incremental import (
    OutputFolder,
    OutputLock,
    OutputPlan,
    PendingOutput,
    plan_outputs,
    record_is_current,
)
from pipelines.scoring.inputs import (
    READER_PATH,
    InputFile,
    ScoringError,
    inspect_inputs,
    read_inputs,
    restore_reader_path,
    unreadable_texts,
)
from pipelines.scoring.runtime_choice import chosen_runtime, measures_runtime
from pipelines.scoring.scorer import CALL_SECONDS, Scorer
from pipelines.scoring.summary import ScoringSummary, Tally, little_saved_warning
from pipelines.tokenizing import TokenizerFiles, tokenize_batch

if TYPE_CHECKING:
    from ray import ObjectRef


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


def runtime_suffix(runtime: Runtime) -> str:
    """The run key's runtime part: empty for fp32 (the keys of earlier runs stay valid), "__int8", "__bf16",
    "__bf16-openvino", ..."""
    return "" if runtime == FP32 else f"__{runtime.name}"


def column_part(name: str) -> str:
    """A column name as a folder-name part: as it is when it is letters, digits, '_', '-' or '.', else with a
    digest (two names never share a part)."""
    if name and all(ch.isalnum() or ch in "_-." for ch in name) and not name.startswith("."):
        return name
    return "".join(ch if ch.isalnum() else "_" for ch in name)[:40] + "-" + digest_of(name)


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def text_column_suffix(config: ScoreConfig) -> str:
    """The key's text-column part: empty for the default column (the keys of earlier runs stay valid)."""
    default = config.text_column == ScoreConfig.text_column
    return "" if default else f"__text-{column_part(config.text_column)}"


def run_key(source: ModelSource, setting: ExitSetting, config: ScoreConfig, runtime: Runtime) -> str:
    """The output folder of everything that changes what an output holds:
    `<identity>__<policy>[-<knob>][__<runtime>][__text-<column>][__probs][__prefix-<p>]` (the parts in
    brackets only when not the default, so the keys of earlier runs stay valid)."""
    key = f"{source.identity}__{setting}{runtime_suffix(runtime)}{text_column_suffix(config)}"
    if config.include_probs:
        key += "__probs"
    if config.output_prefix:
        key += f"__prefix-{config.output_prefix}"
    return key


def score_stream(
    dataset: Any,
    pending: dict[str, InputFile],
    plan: OutputPlan,
    folder: OutputFolder,
    schema_of: Callable[[InputFile], pa.Schema],
    tally: Tally,
    record: dict[str, Any],
) -> int:
    """Drive the Ray Data stream (`commit_each_input`): each input file's rows go to its output (`plan`),
    committed with its manifest record when complete. The seconds the driver spends on its
    own work go to `tally.driver_seconds`: its share of the run says whether one driver keeps up."""

    def batches():
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            tally.actor_seconds += float(pa.compute.sum(batch[CALL_SECONDS]).as_py() or 0.0)
            yield batch.drop_columns([CALL_SECONDS])

    def open_output(source: str) -> ScoredOutput:
        item = pending[source]
        writer = folder.writer(plan.names[source], schema_of(item))
        return ScoredOutput(writer, restore_reader_path(item), manifest_record(item, record), tally)

    expected = {source: item.rows for source, item in pending.items()}
    result = commit_each_input(batches(), READER_PATH, expected, open_output)
    tally.driver_seconds += result.busy_seconds
    return result.committed


@dataclass
class ScoredOutput:
    """One input file's output while its scored rows arrive (a `pipelines.actor_stream.StreamedOutput`)."""

    pending: PendingOutput
    restore: Callable[[pa.Table], pa.Table]  # puts back an input column named like the reader's path column
    record: dict[str, Any]  # its manifest record
    tally: Tally

    def write(self, rows: pa.Table) -> None:
        schema = self.pending.writer.schema  # a batch joining files of different columns holds their union
        self.pending.write(self.restore(rows).select(schema.names).cast(schema))
        self.tally.add(rows)

    def commit(self) -> None:
        self.pending.commit(self.record)

    def discard(self) -> None:
        self.pending.discard()


def manifest_record(item: InputFile, record: dict[str, Any]) -> dict[str, Any]:
    """An output's manifest record: the run's settings, the input it belongs to and its fingerprint."""
    return {**record, "input": item.path, "fingerprint": item.fingerprint}


def build_dataset(
    files: list[InputFile],
    config: ScoreConfig,
    model: ObjectRef,
    setting: ExitSetting | None = None,
    tokenizer: TokenizerFiles | None = None,
    runtime: Runtime = FP32,
    actors: int | None = None,
):
    """read_parquet -> [map_batches(tokenize_batch), CPU tasks, when `tokenizer` is given] ->
    map_batches(Scorer), an actor pool (`actor_pool`; `actors`: its largest size, default `most_actors`)."""

    with streaming_parquet_reader(preserve_order=True):  # outputs in input order, deterministic
        dataset = read_inputs(files)
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
                "runtime": runtime.name,
                "text_column": config.text_column,
                "setting": setting,
                "include_probs": config.include_probs,
                "column_prefix": config.output_prefix,
                "cpus": config.cpus_per_actor,
                "batch_size": config.batch_size,
            },
            compute=actor_pool(config.actors, actors or most_actors(config, tokenizer is not None)),
            batch_size=config.rows_per_task,
            batch_format="pyarrow",
            num_cpus=config.cpus_per_actor,
            num_gpus=config.gpus_per_actor or None,
        )


def most_actors(config: ScoreConfig, tokenizing_tasks: bool) -> int:
    """`--actors`, else as many actors as the cluster holds now (`pipelines.actor_stream.most_actors`), a CPU
    left for a tokenising stage's tasks."""
    if config.actors is not None:
        return config.actors
    return actor_stream.most_actors(
        config.cpus_per_actor, config.gpus_per_actor, 1 if tokenizing_tasks else 0
    )


def spare_cpus_for_tokenizing(config: ScoreConfig) -> bool:
    """Whether the cluster has a CPU the scoring actors do not hold, for the tokenising stage's tasks (else
    they would wait for ever). None spare: `tokenize="tasks"` is refused before anything runs; "auto" warns
    and tokenises in the actors."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    actors = most_actors(config, tokenizing_tasks=True)
    held = actors * config.cpus_per_actor
    if cpus - held >= 1:
        return True
    problem = (
        f"a tokenising stage needs a CPU the scoring actors do not hold: the cluster has {cpus:g} and "
        f"{actors} actor(s) x {config.cpus_per_actor:g} CPU hold {held:g}"
    )
    if config.tokenize == "tasks":
        raise ScoringError(f"{problem}; lower --cpus-per-actor or --actors, or use --tokenize actor")
    warnings.warn(f"{problem}: the actors tokenise their own batches", stacklevel=2)
    return False


def layer_cache_name(runtime: Runtime) -> str:
    """The folder below the output that holds `runtime`'s built layers, per model version: `_int8` (ONNX
    Runtime), `_openvino` (f32 IR, compiled as fp32 or bf16), `_openvino-int8` (NNCF int8)."""
    if runtime.backend == "onnxruntime":
        return "_int8"
    return "_openvino-int8" if runtime.precision == "int8" else "_openvino"


def layers_for(
    config: ScoreConfig, source: ModelSource, runtime: Runtime, inputs: list[InputFile]
) -> Path | None:
    """The layers `runtime` runs (`build_layers`: int8, OpenVINO), built by the driver once per model version
    into `layers_folder` and reused by every later run on that output (checked first: weights' digest and
    every file's); None for the runtimes that build none. OpenVINO int8 is calibrated on
    `layer_calibration_texts` when first built."""
    from ee_model import EarlyExitClassifier
    from ee_model.runtime_layers import build_layers

    if not runtime.builds_layers:
        return None
    model = EarlyExitClassifier.from_pretrained(source.directory)
    folder = layers_folder(config, source, runtime)
    return build_layers(model, runtime, folder, lambda: layer_calibration_texts(config, inputs))


def layers_folder(config: ScoreConfig, source: ModelSource, runtime: Runtime) -> Path:
    """`<output>/<layer_cache_name>/<identity>`: where a runtime's built layers live, per model version."""
    return Path(config.output).resolve() / layer_cache_name(runtime) / source.identity


def layer_calibration_texts(config: ScoreConfig, inputs: list[InputFile]) -> list[str]:
    """`openvino_layers.CALIBRATION_ROWS` texts drawn from `inputs`: what OpenVINO int8 layers are
    calibrated on when built (drawn only then)."""
    from ee_model.openvino_layers import CALIBRATION_ROWS

    return seeded_texts(config, inputs, CALIBRATION_ROWS)


def seeded_texts(config: ScoreConfig, inputs: list[InputFile], rows: int) -> list[str]:
    """`rows` texts drawn from `inputs`, seeded by `config.calibration_seed` (else 0), so a rerun draws the
    same ones."""
    seed = config.calibration_seed if config.calibration_seed is not None else 0
    return sample_texts([(f.path, f.rows) for f in inputs], config.text_column, rows, seed)


def run_runtime(
    config: ScoreConfig,
    source: ModelSource,
    model_config: EarlyExitConfig,
    inputs: list[InputFile],
) -> tuple[Runtime, str, RuntimeChoice | None]:
    """(what runs the layers, why, the measured choice): `--precision auto` on CPU actors is chosen by
    timing the candidates on the inputs' rows (`pipelines.scoring.runtime_choice`), else as `model_runtime`
    resolves it."""
    table = model_runtime(config, model_config)
    if not measures_runtime(config.precision, config.choose_runtime, config.gpus_per_actor):
        return (*table, None)
    return chosen_runtime(
        config,
        source.identity,
        source.directory,
        model_config.encoder_model_type,
        model_config.resolve(config.exit),
        sum(f.rows for f in inputs),
        lambda rows: seeded_texts(config, inputs, rows),
        lambda runtime: layers_folder(config, source, runtime),
        lambda: layer_calibration_texts(config, inputs),
        table,
    )


def ship_model(source: ModelSource, layers: Path | None = None) -> ObjectRef:
    """The resolved model's files (and its built layers, for the runtimes that build them) in the object
    store, once per job: actors and tasks on any node load them from there (the driver's folders exist on its
    node only)."""
    import ray

    return ray.put(ModelFiles.from_directory(source.directory, layers))


def calibration_path(config: ScoreConfig, source: ModelSource, policy: str, runtime: Runtime) -> Path:
    name = (
        f"{source.identity}__{policy}{runtime_suffix(runtime)}{text_column_suffix(config)}"
        f"__agree-{config.min_agreement:g}"
        f"__delta-{config.delta:g}__rows-{config.calibrate_rows}.json"
    )
    return Path(config.output).resolve() / "_calibration" / name


def pinned_calibration(
    config: ScoreConfig,
    source: ModelSource,
    model_config: EarlyExitConfig,
    inputs: list[InputFile],
    shipped_model: Callable[[], ObjectRef],
    runtime: Runtime,
) -> tuple[Calibration | None, bool, str | None]:
    """(calibration, whether it was pinned by an earlier run, why the stored knob was kept); calibration None:
    `--calibrate-rows auto` kept the model's stored knob, for the reason given. The first run on an output
    folder calibrates on a uniform random sample of the inputs' rows (`config.calibration_seed`, else a fresh
    seed, recorded), in a Ray task with an actor's resources, and pins the result when it met its target;
    later runs reuse it, so new files are scored with the same knob into the same output key. A calibration
    that met nothing is not pinned: the next run draws a new sample (give more --calibrate-rows). "auto" on an
    input too small to pay for a calibration pins that it kept the stored knob, so the folder's later, larger
    runs keep it too (and their outputs' key)."""
    policy = config.exit.policy_of(model_config.policy)
    path = calibration_path(config, source, policy, runtime)
    if path.is_file():
        calibration, kept = read_pinned(path)
        return calibration, True, kept
    rows = config.calibrate_rows
    if rows == "auto":
        input_rows = sum(f.rows for f in inputs)
        promise = model_config.knob_promise if policy == model_config.policy else None
        stored_rows = 0 if promise is None else promise.rows
        rows = auto_calibration_rows(input_rows, stored_rows)
        if not rows:
            kept = auto_kept_reason(input_rows, stored_rows)
            write_text_atomically(path, json.dumps({"kept": kept, "input_rows": input_rows}, indent=2))
            print(kept, file=sys.stderr)
            return None, False, kept
    calibration = calibrated_on_sample(config, inputs, rows, policy, shipped_model, runtime)
    if calibration.met:
        write_text_atomically(path, json.dumps(calibration.to_dict(), indent=2))  # a kill pins nothing or all
        print(f"calibrated and pinned in {path}: {calibration.promise}", file=sys.stderr)
    else:
        warnings.warn(
            f"calibration of {policy} (not pinned; the next run calibrates again): {calibration.reason}",
            stacklevel=2,
        )
    return calibration, False, None


def read_pinned(path: Path) -> tuple[Calibration | None, str | None]:
    """A pinned choice, said on stderr: (its calibration, None), or (None, why the stored knob was kept)."""
    record = json.loads(path.read_text())
    if "kept" in record:
        print(f"scoring with the model's stored knob, as pinned in {path}: {record['kept']}", file=sys.stderr)
        return None, record["kept"]
    calibration = Calibration(**record)
    print(f"scoring with the calibration pinned in {path}: {calibration.promise}", file=sys.stderr)
    return calibration, None


def calibrated_on_sample(
    config: ScoreConfig,
    inputs: list[InputFile],
    rows: int,
    policy: str,
    shipped_model: Callable[[], ObjectRef],
    runtime: Runtime,
) -> Calibration:
    """The knob calibrated on `rows` rows drawn at random from `inputs` (`config.calibration_seed`, else a
    fresh seed, recorded in the result), in a Ray task with an actor's resources and runtime."""
    import ray

    seed = config.calibration_seed if config.calibration_seed is not None else secrets.randbits(32)
    texts = sample_texts([(f.path, f.rows) for f in inputs], config.text_column, rows, seed)
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
            runtime.name,
        )
    )
    return dataclasses.replace(calibration, seed=seed)


def stated_promise(
    config: ScoreConfig,
    model_config: EarlyExitConfig,
    setting: ExitSetting,
    calibration: Calibration | None,
    kept: str | None,
) -> str:
    """Which rows the run's promise stands on, in one line (the summary's `promise`)."""
    if calibration is not None:
        return calibration.promise
    if setting.policy == "none":
        return "full depth, as asked: every row's label is the full model's"
    if config.exit.knobs:
        return f"{setting} as asked: no promise about this corpus (--calibrate-rows N certifies one on it)"
    promise = model_config.knob_promise if setting == model_config.setting() else None
    stored = (
        f"the model's stored {setting}, not certified"
        if promise is None
        else f"the model's stored {setting}: {promise.describe()}"
    ) + ", not on this corpus"
    return f"{stored} ({kept})" if kept else f"{stored} (--calibrate-rows 0)"


def connect_ray(address: str | None) -> None:
    """Join the Ray cluster at `address` ($RAY_ADDRESS, else a new local one), once: only a run with
    something to compute needs it."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local")


def remove_orphans(folder: OutputFolder, plan: OutputPlan, remove: bool) -> int:
    """Report (and with `remove`, delete) the outputs whose input file no longer exists."""
    if not plan.orphaned:
        return 0
    shown = dict(list(plan.orphaned.items())[:5])
    if remove:
        for name in plan.orphaned:
            folder.remove(name)
        print(f"removed {len(plan.orphaned)} output(s) whose input is gone: {shown}", file=sys.stderr)
        return len(plan.orphaned)
    warnings.warn(
        f"{len(plan.orphaned)} output(s) in {folder.root} belong to input files that no longer exist "
        f"(kept; --remove-orphans deletes them): {shown}",
        stacklevel=2,
    )
    return 0


def warn_placed_apart(plan: OutputPlan) -> None:
    if plan.placed_apart:
        shown = {plan.names[path]: owner for path, owner in list(plan.placed_apart.items())[:5]}
        warnings.warn(
            f"{len(plan.placed_apart)} input file(s) mirror to an output name another input owns; written "
            f"apart, beside it ({{new name: owner of the mirrored name}}): {shown}",
            stacklevel=2,
        )


def files_to_score(inputs: list[InputFile], plan: OutputPlan, records: dict[str, dict]) -> tuple[dict, list]:
    """({input path: input} to score, paths changed since scored): the inputs without a committed output,
    and those whose file changed (size, mtime or rows) since its output was committed, which are scored
    again into the same output. `records`: the committed outputs' records the plan was made from (read
    once)."""
    pending, changed = {}, []
    for item in inputs:
        current = record_is_current(records.get(plan.names[item.path]), item.fingerprint)
        if current is False:
            changed.append(item.path)
        if not current:
            pending[item.path] = item
    if changed:
        warnings.warn(
            f"{len(changed)} input file(s) changed since they were scored; scoring them again: {changed[:5]}",
            stacklevel=2,
        )
    return pending, changed


@dataclass
class ScoringRun:
    """What a scoring run settled before it streams: the model, what runs its layers, the exit setting (a
    calibrated knob included) and the output folder it writes."""

    config: ScoreConfig  # as requested
    source: ModelSource
    model_config: EarlyExitConfig
    runtime: Runtime
    runtime_reason: str
    setting: ExitSetting
    folder: OutputFolder
    shipped_model: Callable[[], ObjectRef]  # the model in the object store, put there on first call
    address: str | None
    calibration: Calibration | None = None
    pinned: bool = False
    promise: str = ""  # `stated_promise`
    runtime_choice: RuntimeChoice | None = None  # `--precision auto` chosen by timing (or the table, pinned)

    @property
    def record(self) -> dict[str, Any]:
        """The settings every manifest record of this run holds."""
        return {
            "model": self.source.reference,
            "model_identity": self.source.identity,
            "policy": self.setting.policy,
            "knob": self.setting.knob,
            "precision": self.runtime.name,
            "text_column": self.config.text_column,
            "include_probs": self.config.include_probs,
            "output_prefix": self.config.output_prefix,
        }

    def schema_of(self, item: InputFile) -> pa.Schema:
        return output_schema(item.schema, self.config.include_probs, self.config.output_prefix)


@dataclass(frozen=True)
class ScoringPlan:
    """Which inputs this run scores, and what it found in the output folder."""

    outputs: OutputPlan
    pending: dict[str, InputFile]  # by input path: not yet scored, or changed since
    changed: list[str]
    skipped: int
    orphans_removed: int


def run_scoring(config: ScoreConfig, address: str | None = None) -> ScoringSummary:
    """Score every input file not yet scored for this (model, setting, output columns); return the summary.
    Ray (`address`, see `connect_ray`) is joined only when there is something to calibrate or score: a rerun
    with nothing to do answers from the manifest."""
    output = Path(config.output).resolve()
    inputs, unreadable = inspect_inputs(config.input, output, config.text_column, config.output_prefix)
    if not inputs:
        raise ScoringError(f"no input file of {config.input!r} can be read: {unreadable}")
    if config.tokenize == "tasks":  # a stage that can never run is refused before anything is written
        connect_ray(address)
        spare_cpus_for_tokenizing(config)
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as held:
        source = resolve_model(config.model, Path(scratch))  # a model that cannot load leaves no output
        model_config = checked_model_config(config, source)  # nor one that cannot run the policy
        held.enter_context(OutputLock(output))  # before calibration writes there too
        run = settle_run(config, source, model_config, inputs, output, address)
        plan = plan_run(run, inputs)
        unreadable |= unreadable_texts(plan.pending, config.text_column)
        tally = Tally(prefix=config.output_prefix)
        try:
            stream = score_pending(run, plan, tally)
        except OSError as error:
            if not output_full(error):
                raise
            raise output_full_summary(run, plan, inputs) from None
        summary = run_summary(run, plan, tally, stream, len(inputs), unreadable)
    log_scoring_run(summary, config, source)
    little_saved = little_saved_warning(summary.policy, summary.flops_speedup)
    if little_saved:
        warnings.warn(little_saved, stacklevel=2)
    if unreadable:  # after the readable files were committed and the run logged; a rerun retries these
        named = "; ".join(f"{path}: {reason}" for path, reason in unreadable.items())
        raise IncompleteRun(
            f"{len(unreadable)} input file(s) could not be read and were not scored (the other "
            f"{summary.files_scored} were): {named}",
            summary.to_dict(),
        )
    return summary


def output_full(error: OSError) -> bool:
    """Whether `error` says the output's storage is full (no space, or over a quota)."""
    return error.errno in (errno.ENOSPC, errno.EDQUOT)


def output_full_summary(run: ScoringRun, plan: ScoringPlan, inputs: list[InputFile]) -> IncompleteRun:
    """What a run stopped by a full output tells: what it committed (read back from the output's manifest),
    what is left, the free space."""
    records = run.folder.records()
    done = [item for path, item in plan.pending.items() if plan.outputs.names[path] in records]
    free = shutil.disk_usage(run.folder.root).free
    summary = {
        "status": "output_full",
        "output": str(run.folder.root),
        "free_bytes": free,
        "input_files": len(inputs),
        "files_skipped": plan.skipped,
        "files_scored": len(done),
        "rows_scored": sum(item.rows for item in done),
        "files_left": len(plan.pending) - len(done),
        "rows_left": sum(item.rows for item in plan.pending.values()) - sum(item.rows for item in done),
        "model": run.source.reference,
        "model_version": run.source.version,
        "policy": run.setting.policy,
        "knob": run.setting.knob,
        "precision": run.runtime.name,
    }
    return IncompleteRun(
        f"the output {run.folder.root} is full ({free / 2**20:.1f} MiB free): {len(done)} of "
        f"{len(plan.pending)} file(s) were scored and committed, {summary['files_left']} were not; free "
        "space and run again to score the rest",
        summary,
        IncompleteRun.OUTPUT_FULL,
    )


def checked_model_config(config: ScoreConfig, source: ModelSource) -> EarlyExitConfig:
    """The model's config; a policy the model cannot run is refused here, before anything is written."""
    model_config = EarlyExitConfig.load(source.directory)
    if config.exit.policy_of(model_config.policy) == "risk" and model_config.exit_risk is None:
        raise UserError(
            f"policy 'risk' needs a model with a fitted exit risk, and {config.model!r} has none "
            "(trained before the risk policy, or with eval.exit_risk_rows=0): use --policy entropy"
        )
    model_runtime(config, model_config)  # a runtime that cannot run this encoder family: refused here
    return model_config


def model_runtime(config: ScoreConfig, model_config: EarlyExitConfig) -> tuple[Runtime, str]:
    """(what runs the layers, why): `config.runtime()` for this model's encoder family; a runtime the family
    cannot run is refused."""
    try:
        return config.runtime(model_config.encoder_model_type)
    except ValueError as error:
        raise UserError(str(error)) from None


def settle_run(
    config: ScoreConfig,
    source: ModelSource,
    model_config: EarlyExitConfig,
    inputs: list[InputFile],
    output: Path,
    address: str | None,
) -> ScoringRun:
    """The run's runtime (its layers built once), exit setting (calibrated when asked) and output folder,
    prepared for writing."""
    runtime, runtime_reason, runtime_choice = run_runtime(config, source, model_config, inputs)
    layers = layers_for(config, source, runtime, inputs)

    def shipped() -> ObjectRef:
        connect_ray(address)
        return ship_model(source, layers)

    shipped_model = functools.cache(shipped)
    calibration, pinned, kept = None, False, None
    if config.calibrates:
        calibration, pinned, kept = pinned_calibration(
            config, source, model_config, inputs, shipped_model, runtime
        )
    setting = model_config.resolve(config.exit) if calibration is None else calibration.setting
    folder = OutputFolder(output / run_key(source, setting, config, runtime))
    folder.prepare()
    return ScoringRun(
        config,
        source,
        model_config,
        runtime,
        runtime_reason,
        setting,
        folder,
        shipped_model,
        address,
        calibration,
        pinned,
        stated_promise(config, model_config, setting, calibration, kept),
        runtime_choice,
    )


def plan_run(run: ScoringRun, inputs: list[InputFile]) -> ScoringPlan:
    """Each input's output (owned by its input for good, `plan_outputs`), orphans reported or removed, and
    the inputs left to score."""
    records = run.folder.records()
    outputs = plan_outputs({f.path: f.mirrored for f in inputs}, records)
    warn_placed_apart(outputs)
    removed = remove_orphans(run.folder, outputs, run.config.remove_orphans)
    pending, changed = files_to_score(inputs, outputs, records)
    return ScoringPlan(outputs, pending, changed, len(inputs) - len(pending), removed)


@dataclass(frozen=True)
class StreamOutcome:
    """What scoring the pending inputs did."""

    committed: int  # outputs committed
    tokenize: str  # where texts became token ids: "actor" or "tasks"
    actors: int | None  # the pool's largest size
    started: float  # time.time() when scoring began
    seconds: float


def score_pending(run: ScoringRun, plan: ScoringPlan, tally: Tally) -> StreamOutcome:
    """Score the plan's pending inputs: empty ones committed at once, the others streamed through the actor
    pool."""
    config, committed, tokenizer, started = run.config, 0, None, time.time()
    pending = dict(plan.pending)
    for path, item in list(pending.items()):
        if item.rows == 0:  # nothing to stream: commit an empty output with the full schema
            empty = run.folder.writer(plan.outputs.names[path], run.schema_of(item))
            empty.commit(manifest_record(item, run.record))
            del pending[path]
            committed += 1
    if not pending:
        return StreamOutcome(committed, "actor", config.actors, started, time.time() - started)
    connect_ray(run.address)
    if config.tokenizes_in_tasks and spare_cpus_for_tokenizing(config):
        tokenizer = TokenizerFiles.from_directory(run.source.directory)
    actors = most_actors(config, tokenizer is not None)
    dataset = build_dataset(
        list(pending.values()), config, run.shipped_model(), run.setting, tokenizer, run.runtime, actors
    )
    committed += score_stream(dataset, pending, plan.outputs, run.folder, run.schema_of, tally, run.record)
    tokenize = "tasks" if tokenizer is not None else "actor"
    return StreamOutcome(committed, tokenize, actors, started, time.time() - started)


def run_summary(
    run: ScoringRun,
    plan: ScoringPlan,
    tally: Tally,
    stream: StreamOutcome,
    inputs: int,
    unreadable: dict[str, str],
) -> ScoringSummary:
    """The run's summary; refuses a run whose rows out do not equal its rows in."""
    rows_in = sum(f.rows for f in plan.pending.values())
    if tally.rows != rows_in:
        raise RuntimeError(f"rows in {rows_in} != rows out {tally.rows}")
    calibration = None if run.calibration is None else {**run.calibration.to_dict(), "pinned": run.pinned}
    return ScoringSummary(
        input_files=inputs + len(unreadable),
        files_scored=stream.committed,
        files_skipped=plan.skipped,
        files_changed=len(plan.changed),
        files_unreadable=len(unreadable),
        files_placed_apart=len(plan.outputs.placed_apart),
        orphaned_outputs=len(plan.outputs.orphaned) - plan.orphans_removed,
        orphans_removed=plan.orphans_removed,
        rows_in=rows_in,
        **tally.rates(run.model_config, stream.seconds, stream.actors),
        tokenize=stream.tokenize,
        actors=stream.actors,
        output=str(run.folder.root),
        model=run.source.reference,
        model_version=run.source.version,
        policy=run.setting.policy,
        knob=run.setting.knob,
        precision=run.runtime.name,
        precision_reason=run.runtime_reason,
        started_at=round(stream.started, 3),
        calibration=calibration,
        runtime_choice=None if run.runtime_choice is None else run.runtime_choice.to_dict(),
        promise=run.promise,
        unreadable=unreadable,
        orphaned=[] if plan.orphans_removed else plan.outputs.orphaned,
        status="files_set_aside" if unreadable else "complete",
    )


def log_scoring_run(summary: ScoringSummary, config: ScoreConfig, source: ModelSource) -> None:
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
        "output": summary.output,
    }
    with mlflow.start_run(run_name="scoring", tags=tags):
        mlflow.log_params(
            {
                "policy": summary.policy,
                "knob": summary.knob,
                "batch_size": config.batch_size,
                "sort_rows": config.rows_per_task,
                "actors": summary.actors,
                "cpus_per_actor": config.cpus_per_actor,
                "gpus_per_actor": config.gpus_per_actor,
                "tokenize": summary.tokenize,
                "precision": summary.precision,
                "precision_reason": summary.precision_reason[:500],
                "calibrate_rows": config.calibrate_rows if config.calibrates else 0,  # 0: not applied
                "text_column": config.text_column,
                "include_probs": config.include_probs,
                "remove_orphans": config.remove_orphans,
                "min_agreement": config.min_agreement if summary.calibration else None,
                "delta": config.delta if summary.calibration else None,
                "promise": summary.promise[:500],
            }
        )
        log_how_it_chose(summary)
        mlflow.log_metrics(summary.metrics())
        mlflow.log_dict(summary.to_dict(), "scoring_summary.json")


def log_how_it_chose(summary: ScoringSummary) -> None:
    """The calibration's figures and every runtime candidate `auto` timed, in the active MLflow run."""
    import mlflow

    if summary.calibration is not None:
        calibration = summary.calibration
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
                "calibration_seed": calibration["seed"],
            }
        )
    choice = summary.runtime_choice or {}
    for measured in choice.get("measurements", ()):  # every candidate `auto` timed, beside the pick
        if measured["error"] is None:
            name = measured["runtime"]
            mlflow.log_metrics(
                {
                    f"runtime_{name}_rows_per_s": measured["rows_per_s"],
                    f"runtime_{name}_agreement": measured["agreement"],
                }
            )
