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
CLAIM_ATTEMPTS, CLAIM_SETTLE_SECONDS = 5, 0.2  # `claim_champion`: re-reads after setting the alias
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
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion_accuracy = current_champion_accuracy(client, name)
    promoted = claim_champion(client, name, version, dev_accuracy)
    return {
        "name": name,
        "version": int(version),
        "uri": f"models:/{name}/{version}",
        "candidate_uri": f"models:/{name}@{CANDIDATE}",
        "champion": promoted,
        "previous_champion_dev_accuracy": champion_accuracy,
    }


def claim_champion(client: MlflowClient, name: str, version: str, dev_accuracy: float) -> bool:
    """Point `champion` at `version` unless the champion beats it (more accurate on dev, or as accurate and
    newer), and re-read until that holds. MLflow sets an alias without comparing first, so of two trainings
    that compare at once the worse could set it last: each re-reads after setting and takes it back if it
    is the better, so the alias settles on the best of them. Whether `version` is the champion at the end."""
    for _ in range(CLAIM_ATTEMPTS):
        holder = champion_version(client, name)
        if holder is not None and str(holder.version) == str(version):
            return True
        if holder is not None and beats(holder, dev_accuracy, version):
            return False
        client.set_registered_model_alias(name, CHAMPION, version)
        time.sleep(CLAIM_SETTLE_SECONDS)  # another registration's set lands in this window, or after it
    holder = champion_version(client, name)
    return holder is not None and str(holder.version) == str(version)


def beats(holder, dev_accuracy: float, version: str) -> bool:
    """Whether the champion `holder` (a ModelVersion) keeps the title against `version` of `dev_accuracy`:
    more accurate, or as accurate and registered later. A holder without the tag never does."""
    held = holder.tags.get(SELECTION_TAG)
    if held is None:
        return False
    mine = float(f"{dev_accuracy:.6f}")  # as the tag holds it
    return (float(held), int(holder.version)) > (mine, int(version))


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
