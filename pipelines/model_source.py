"""Resolve a model reference (registry URI, any MLflow model URI, or a directory) to a local model
directory."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ee_model.config import CONFIG_FILE
from ee_model.io import WEIGHTS_FILE
from pipelines.errors import UserError

if TYPE_CHECKING:
    from ray import ObjectRef

    from ee_model import EarlyExitClassifier


LAYERS_FOLDER = "runtime_layers"  # a shipped model's built layers (int8, OpenVINO), beside its weights


class ModelSourceError(UserError):
    """The model reference cannot be resolved or loaded."""


@dataclass(frozen=True)
class ModelFiles:
    """A saved model directory's files, as bytes. The driver resolves the model once and `ray.put`s this, so
    actors and tasks on any node load it from the object store instead of a path only the driver can see."""

    files: dict[str, bytes]

    @classmethod
    def from_directory(cls, directory: str | Path, layers: Path | None = None) -> ModelFiles:
        """The model directory's files; with `layers` (a runtime's built layers, `ee_model.runtime`) those
        too, as `runtime_layers/`."""
        root = Path(directory)
        files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
        if layers is not None:
            files = {k: v for k, v in files.items() if not k.startswith(f"{LAYERS_FOLDER}/")}
            for path in sorted(layers.iterdir()):
                files[f"{LAYERS_FOLDER}/{path.name}"] = path.read_bytes()
        return cls(files)

    @property
    def size(self) -> int:
        """Bytes in all its files."""
        return sum(len(data) for data in self.files.values())

    def write_to(self, directory: str | Path) -> Path:
        root = Path(directory)
        for name, data in self.files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return root


@dataclass(frozen=True)
class ModelSource:
    reference: str  # what the user passed
    directory: Path  # a directory EarlyExitClassifier.from_pretrained loads
    identity: str  # stable name of these exact weights: "<name>-v<version>-<sha>" or "dir-<sha>"
    registered_name: str | None = None
    version: str | None = None


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        digest.update((directory / name).read_bytes())
    return digest.hexdigest()[:12]


def check_weights(directory: Path, reference: str) -> None:
    """Refuse unreadable weights here, in the driver, not in every actor after it started: safetensors checks
    the header and that the file covers every tensor it lists (a truncated or overwritten file fails)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
            weights.keys()
    except (SafetensorError, OSError) as error:
        raise ModelSourceError(
            f"model {reference!r}: cannot read {directory / WEIGHTS_FILE}: {error}"
        ) from None


def registry_version(reference: str) -> tuple[str | None, str | None]:
    """(name, version) of a models:/name@alias or models:/name/version reference, else (None, None)."""
    if not reference.startswith("models:/"):
        return None, None
    from mlflow.tracking import MlflowClient

    body = reference[len("models:/") :]
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
                raise ModelSourceError(
                    f"{reference!r} is not a saved early-exit model directory (no {CONFIG_FILE})"
                )
            path = candidate
        check_weights(path, reference)
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
        raise ModelSourceError(
            f"model {reference!r} is not an early-exit pyfunc (no artifacts/*/{CONFIG_FILE})"
        )
    check_weights(directory, reference)
    # the digest too: another registry (or a recreated one) has its own "<name>" v1
    identity = (
        f"{name}-v{version}-{weights_digest(directory)}" if name else f"dir-{weights_digest(directory)}"
    )
    return ModelSource(reference, directory, identity, name, version)


MEMORY_SCRATCH = Path("/dev/shm")  # Linux's shared memory: a filesystem in RAM
SCRATCH_HEADROOM = 256 << 20  # bytes /dev/shm must keep free beside a model written there (Ray may use it)
SCRATCH_PREFIX = "ee-model-"
STALE_SCRATCH_S = 3600  # a load takes seconds: a folder this old was left by a process killed mid-load


def memory_scratch(size: int) -> str | None:
    """Where an actor writes a shipped model's files for the moment it reads them: /dev/shm (memory, several
    times faster to write than a disk-backed /tmp: docs/results.md, "Measurements the code refers to") where
    it is writable with room for `size` bytes twice over plus a margin, else the default temporary folder
    (None). Containers often mount a small /dev/shm (Docker: 64 MB): that is checked, not assumed. Before
    the check, folders that killed loads left there are removed (`remove_stale_scratch`)."""
    import os
    import shutil

    if size and MEMORY_SCRATCH.is_dir() and os.access(MEMORY_SCRATCH, os.W_OK):
        remove_stale_scratch()
        if shutil.disk_usage(MEMORY_SCRATCH).free >= 2 * size + SCRATCH_HEADROOM:
            return str(MEMORY_SCRATCH)
    return None


def remove_stale_scratch() -> None:
    """Folders of ours in /dev/shm older than STALE_SCRATCH_S: a process killed while it loaded a model
    leaves its folder there, holding memory until the machine restarts."""
    import shutil
    import time

    for folder in MEMORY_SCRATCH.glob(f"{SCRATCH_PREFIX}*"):
        try:
            if time.time() - folder.stat().st_mtime > STALE_SCRATCH_S:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # another process removed it first
            continue


def load_shipped_model(
    model: ModelFiles | ObjectRef | str | Path, runtime: str = "fp32", cpus: float | None = None
) -> EarlyExitClassifier:
    """The model from a `ModelFiles` (or an object-store reference to one, as jobs pass it) or a local
    directory; on the GPU when the worker has one; its layers run by `runtime` (`ee_model.runtime`, by name:
    "fp32", "bf16", "int8", "bf16-openvino", ...), with the built layers it carries in `runtime_layers/` for
    the runtimes that build them. A bf16 runtime on a CPU without bf16 units is refused, naming the node.

    `cpus`: the CPUs of the actor or task loading it; torch, ONNX Runtime and OpenVINO then run that many
    threads (at least one), not the machine's. None leaves the threads as they are."""
    import math
    import platform

    import ray
    import torch

    from ee_model import EarlyExitClassifier
    from ee_model.cpu_support import cpu_support
    from ee_model.runtime import Runtime
    from ee_model.runtime_layers import with_runtime

    threads = None
    if cpus is not None:
        threads = max(1, math.floor(cpus))
        torch.set_num_threads(threads)
    chosen = Runtime.parse(runtime)
    gpu = torch.cuda.is_available() and not chosen.builds_layers
    if chosen.precision == "bf16" and not gpu and not cpu_support().has_bf16:
        raise RuntimeError(
            f"runtime {chosen.name} was chosen for bf16 CPUs, and this node ({platform.node()}) has no bf16 "
            f"units ({cpu_support().describe()}): score with --precision fp32 or int8 on a mixed cluster"
        )
    if isinstance(model, ray.ObjectRef):
        model = ray.get(model)
    size = model.size if isinstance(model, ModelFiles) else 0
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=memory_scratch(size)) as local:
        directory = model.write_to(local) if isinstance(model, ModelFiles) else Path(model)
        loaded = EarlyExitClassifier.from_pretrained(directory)
        if gpu:
            loaded = loaded.to("cuda")
        # the backends read their layer files now: the temporary folder may go
        layers = directory / LAYERS_FOLDER if chosen.builds_layers else None
        return with_runtime(loaded, chosen, layers, threads)
