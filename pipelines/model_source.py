"""Resolve a model reference (registry URI, any MLflow model URI, or a directory) to a local model directory."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ee_model.config import CONFIG_FILE
from ee_model.io import WEIGHTS_FILE


class ModelSourceError(ValueError):
    """The model reference cannot be resolved or loaded."""


@dataclass(frozen=True)
class ModelSource:
    reference: str  # what the user passed
    directory: Path  # a directory EarlyExitClassifier.from_pretrained loads
    identity: str  # stable name of these exact weights: "<name>-v<version>" or "dir-<sha>"
    registered_name: str | None = None
    version: str | None = None


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:12]


def registry_version(reference: str) -> tuple[str | None, str | None]:
    """(name, version) of a models:/name@alias or models:/name/version reference, else (None, None)."""
    if not reference.startswith("models:/"):
        return None, None
    from mlflow.tracking import MlflowClient

    body = reference[len("models:/"):]
    client = MlflowClient()
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, str(client.get_model_version_by_alias(name, alias).version)
    if "/" in body:
        name, version = body.split("/", 1)
        return name, version
    return None, None  # models:/m-<id> logged models


def pyfunc_model_dir(root: Path) -> Path | None:
    """The saved model directory inside a downloaded pyfunc (artifacts/<name>/ with an ee_config.json)."""
    found = sorted(p.parent for p in (root / "artifacts").glob(f"*/{CONFIG_FILE}"))
    return found[0] if len(found) == 1 else None


def resolve_model(reference: str, download_root: Path) -> ModelSource:
    path = Path(reference)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            candidate = pyfunc_model_dir(path)  # a downloaded pyfunc directory works too
            if candidate is None:
                raise ModelSourceError(f"{reference!r} is not a saved early-exit model directory (no {CONFIG_FILE})")
            path = candidate
        return ModelSource(reference, path.resolve(), f"dir-{weights_digest(path)}")
    if "://" not in reference and ":/" not in reference:
        raise ModelSourceError(f"model {reference!r}: no such directory, and not an MLflow model URI")
    import mlflow

    try:
        name, version = registry_version(reference)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=reference, dst_path=str(download_root)))
    except mlflow.exceptions.MlflowException as error:
        raise ModelSourceError(f"cannot load model {reference!r}: {error.message}") from error
    directory = pyfunc_model_dir(local)
    if directory is None:
        raise ModelSourceError(f"model {reference!r} is not an early-exit pyfunc (no artifacts/*/{CONFIG_FILE})")
    identity = f"{name}-v{version}" if name else f"dir-{weights_digest(directory)}"
    return ModelSource(reference, directory, identity, name, version)
