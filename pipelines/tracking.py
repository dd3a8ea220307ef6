"""MLflow: tracking setup, runs, per-step metrics from rank 0, the pyfunc model and the registry aliases."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.models import ModelSignature, infer_signature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ParamSchema, ParamSpec

CANDIDATE = "candidate"
CHAMPION = "champion"
SELECTION_TAG = "dev_accuracy"  # version tag compared when promoting to champion
# `claim_champion`: reads of the champion (a set between two), the pause after each, the reads in a row that
# must agree, the versions looked at for overlapping claims, and when a claim is over: ended this long
# before another started (clocks of two machines differ), or started this long before and never ended
CLAIM_ATTEMPTS, CLAIM_SETTLE_SECONDS, CLAIM_STEADY_READS, CLAIM_RIVALS = 12, 0.2, 2, 100
CLAIM_CLOCK_MARGIN_SECONDS, CLAIM_STALE_SECONDS = 5.0, 600.0
CLAIM_STARTED_TAG, CLAIM_ENDED_TAG = "champion_claim_started", "champion_claim_ended"
ALIAS_ATTEMPTS = 5  # `set_alias`: tries against a conflicting insert of the same new alias
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
EE_MODEL_DIR = Path(__file__).resolve().parent.parent / "ee_model"


def setup_tracking(tracking_uri: str, experiment_name: str) -> str:
    """Point MLflow at the store and create the experiment once, in the driver, before workers start; a new
    experiment in a local sqlite store keeps its artifacts beside the database (`local_artifact_root`).

    Returns the experiment id.
    """
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    root = local_artifact_root(tracking_uri)
    if root is not None and mlflow.get_experiment_by_name(experiment_name) is None:
        try:
            mlflow.create_experiment(experiment_name, artifact_location=root)
        except MlflowException:  # created meanwhile by a run beside this one: use it
            pass
    experiment = mlflow.set_experiment(experiment_name)
    return experiment.experiment_id


def local_artifact_root(tracking_uri: str) -> str | None:
    """`<the database's folder>/mlruns` for a local sqlite store (MLflow's own default is `./mlruns` below
    whatever folder the process runs in, so runs started from two folders against one store would keep
    their artifacts in two places); None for any other store (a server gives its own)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    database = Path(tracking_uri[len(prefix) :])
    if not database.is_absolute():
        database = Path.cwd() / database
    return (database.parent / "mlruns").as_uri()


def start_child_run(parent_run_id: str, name: str) -> str:
    """Create a child run (RUNNING) that workers can log to by id; the driver ends it."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    run = client.create_run(
        parent.info.experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id}
    )
    return run.info.run_id


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class StepLogger:
    """Batches per-step metrics from rank 0 into MLflow (one request per flush, not one per step)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None) -> None:
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri) if (tracking_uri and run_id) else None
        self.pending: list[Metric] = []

    def log(self, key: str, value: float, step: int, flush: bool = False) -> None:
        if self.client is None:
            return
        self.pending.append(Metric(key, float(value), int(time.time() * 1000), step))
        if flush:
            self.flush()

    def tags(self, tags: dict[str, str]) -> None:
        if self.client is not None:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        if self.client is not None and self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}" for name in ("torch", "transformers", "safetensors", "numpy", "pandas")
    ] + [f"mlflow=={mlflow.__version__}"]


def log_pyfunc_model(model_dir: str | Path, example_texts: list[str]) -> Any:
    """Log the saved model directory as a pyfunc whose predict takes policy/threshold/patience/risk params."""
    example = pd.DataFrame({"text": example_texts})
    output = pd.DataFrame(
        {"label": ["x"], "confidence": [0.5], "exit_layer": [1], "flops": [1], "error": [""]}
    )
    # knobs default to None, "the model's stored value", so a knob given to a policy that does not take it is
    # told apart from an absent one and refused (pipelines/pyfunc_model.py), as jobs/score.py refuses it
    params = ParamSchema(
        [
            ParamSpec("policy", "string", None),
            ParamSpec("threshold", "double", None),
            ParamSpec("patience", "long", None),
            ParamSpec("risk", "double", None),
            ParamSpec("batch_size", "long", 32),
        ]
    )
    inferred = infer_signature(example, output)
    signature = ModelSignature(inputs=inferred.inputs, outputs=inferred.outputs, params=params)
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(EE_MODEL_DIR)],
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
    )


def register(model_uri: str, name: str, dev_accuracy: float, tags: dict[str, str]) -> dict[str, Any]:
    """Register a version, alias it `candidate`, and `champion` if its dev accuracy >= the champion's.

    Trainings that register one name at once each get their own version (MLflow numbers them); `candidate`
    ends on one of them, and `champion` on the most accurate (`claim_champion`)."""
    client = MlflowClient()
    version = mlflow.register_model(model_uri, name).version
    client.set_model_version_tag(name, version, SELECTION_TAG, f"{dev_accuracy:.6f}")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    set_alias(client, name, CANDIDATE, version)
    champion_accuracy = current_champion_accuracy(client, name)
    promoted = claim_champion(client, name, version)
    return {
        "name": name,
        "version": int(version),
        "uri": f"models:/{name}/{version}",
        "candidate_uri": f"models:/{name}@{CANDIDATE}",
        "champion": promoted,
        "previous_champion_dev_accuracy": champion_accuracy,
    }


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point `alias` at `version`. Two processes creating one new alias at once both insert it, and a
    SQL store refuses the second (a UNIQUE constraint, raised as MlflowException): the retry updates
    the row the other inserted."""
    for attempt in range(ALIAS_ATTEMPTS):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except mlflow.exceptions.MlflowException:
            if attempt == ALIAS_ATTEMPTS - 1:
                raise
            time.sleep(CLAIM_SETTLE_SECONDS)


def claim_champion(client: MlflowClient, name: str, version: str) -> bool:
    """Point `champion` at the best of the champion, `version` and every registration whose claim overlaps
    this one (more accurate on dev, or as accurate and newer), and re-read until that holds on two reads
    in a row. Whether `version` is the champion at the end.

    MLflow sets an alias without comparing first, so two trainings that register at once could each see
    the other's set after its own check. Each marks its claim on its version (started, ended) before it
    reads, so of claims that overlap in time every one sees the others' and all compute the same best; the
    champion only moves to a better version, so the alias settles there, and a worse set that lands late
    is taken back. A claim that ended before this one started is not a rival: a champion a user moved back
    (a rollback) is compared with this version only."""
    started = time.time()
    client.set_model_version_tag(name, version, CLAIM_STARTED_TAG, f"{started:.3f}")
    try:
        steady = 0
        for _ in range(CLAIM_ATTEMPTS):
            holder = champion_version(client, name)
            best = best_claim(client, name, version, started, holder)
            if holder is not None and str(holder.version) == str(best):
                steady += 1
                if steady == CLAIM_STEADY_READS:
                    break
            else:
                steady = 0
                set_alias(client, name, CHAMPION, best)
            time.sleep(CLAIM_SETTLE_SECONDS)  # another registration's set lands in this window, or after it
    finally:
        client.set_model_version_tag(name, version, CLAIM_ENDED_TAG, f"{time.time():.3f}")
    holder = champion_version(client, name)
    return holder is not None and str(holder.version) == str(version)


def best_claim(client: MlflowClient, name: str, version: str, started: float, holder) -> str:
    """The version that should be champion: the best (dev accuracy, then newer) of the `holder` (a
    ModelVersion, or None), `version`, and the newest versions whose claims overlap this one's (started
    by now, not ended before `started` less the clock margin, not started so long ago that its claimant
    must have died). A holder or rival without the accuracy tag never wins."""
    candidates = {str(version)}
    if holder is not None and holder.tags.get(SELECTION_TAG) is not None:
        candidates.add(str(holder.version))
    accuracies = {}
    for mv in client.search_model_versions(
        f"name = '{name}'", max_results=CLAIM_RIVALS, order_by=["version_number DESC"]
    ):
        accuracies[str(mv.version)] = mv.tags.get(SELECTION_TAG)
        if overlaps(mv.tags, started):
            candidates.add(str(mv.version))
    if holder is not None:
        accuracies.setdefault(str(holder.version), holder.tags.get(SELECTION_TAG))

    def rank(v: str) -> tuple[float, int]:
        accuracy = accuracies.get(v)
        return (float(accuracy) if accuracy is not None else float("-inf"), int(v))

    return max(candidates, key=rank)


def overlaps(version_tags: dict[str, str], started: float) -> bool:
    """Whether a version's claim (its tags) overlaps a claim `started` at that time."""
    began, ended = version_tags.get(CLAIM_STARTED_TAG), version_tags.get(CLAIM_ENDED_TAG)
    if began is None or version_tags.get(SELECTION_TAG) is None:
        return False
    if ended is not None:
        return float(ended) >= started - CLAIM_CLOCK_MARGIN_SECONDS
    return float(began) >= started - CLAIM_STALE_SECONDS


def champion_version(client: MlflowClient, name: str):
    """The version `champion` points at (a ModelVersion), or None when there is none yet."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def current_champion_accuracy(client: MlflowClient, name: str) -> float | None:
    champion = champion_version(client, name)
    value = champion.tags.get(SELECTION_TAG) if champion is not None else None
    return float(value) if value is not None else None
