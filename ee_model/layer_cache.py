"""A folder of per-layer files built from a model's transformer layers (int8 ONNX graphs, OpenVINO models):
built once, checked before every use, rebuilt when stale or damaged.

The folder's manifest (written last, so a folder without one is incomplete) names the digest of the layer
weights the files come from, the folder's format, and a digest of every file it holds. `ensure_layers` reuses
a folder whose manifest names these weights and whose files are intact; otherwise it builds the files aside
and renames the folder into place (a killed build leaves no half folder; two builders of the same layers both
end with a complete one), warning in one line when it replaces a damaged folder. `check_layers` refuses,
naming the folder, a folder that is not what the loader needs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ee_model.modeling import EarlyExitClassifier


def layers_digest(model: EarlyExitClassifier, fmt: Any) -> str:
    """A digest of the transformer layers' weights and shape, and of `fmt` (the folder's kind and format):
    what the built files must come from."""
    digest = hashlib.sha256()
    config = model.encoder.config
    digest.update(json.dumps([fmt, config.model_type, model.flops_model.hidden_size]).encode())
    for name, tensor in model.layers.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path, name: str) -> dict | None:
    try:
        return json.loads((directory / name).read_text())
    except (OSError, ValueError):
        return None


def damaged_files(directory: Path, manifest: dict) -> list[str]:
    """The files the manifest vouches for that are missing or whose content is not what was written."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return ["(no file digests in the manifest)"]
    return [
        name
        for name, expected in files.items()
        if not (directory / name).is_file() or file_digest(directory / name) != expected
    ]


def is_current(directory: Path, manifest_name: str, digest: str) -> bool:
    """Whether `directory` holds files built from the weights of `digest`, every one intact."""
    manifest = read_manifest(directory, manifest_name)
    return (
        manifest is not None and manifest.get("weights") == digest and not damaged_files(directory, manifest)
    )


def write_manifest(directory: Path, name: str, digest: str, n_layers: int, **facts: Any) -> None:
    """The manifest of a finished build: written last, it marks the folder complete."""
    manifest = {
        "weights": digest,
        "layers": n_layers,
        "files": {path.name: file_digest(path) for path in sorted(directory.iterdir())},
        **facts,
    }
    (directory / name).write_text(json.dumps(manifest, indent=2))


def ensure_layers(
    directory: str | Path,
    manifest_name: str,
    digest: str,
    build: Callable[[Path], None],
    keep: Callable[[dict], bool] | None = None,
) -> Path:
    """`directory` once it holds current, intact files: reused as it is, else built by `build(staging)` (which
    writes the files and the manifest) aside and renamed into place. `keep(manifest)`: whether current files
    are good enough to keep (e.g. not calibrated on fewer rows than are at hand now); default yes."""
    directory = Path(directory)
    if is_current(directory, manifest_name, digest) and (
        keep is None or keep(read_manifest(directory, manifest_name) or {})
    ):
        return directory
    manifest = read_manifest(directory, manifest_name)
    if manifest is not None and manifest.get("weights") == digest:
        warnings.warn(
            f"the layers in {directory} are damaged ({', '.join(damaged_files(directory, manifest))} not as "
            "written): rebuilding them",
            stacklevel=3,
        )
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(directory)
    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        build(staging)
        # what is there now: stale layers (other weights, older format), damaged ones, ones not to keep, or a
        # concurrent build (kept when it is as good as this one)
        if directory.exists():
            if is_current(directory, manifest_name, digest) and (
                keep is None or keep(read_manifest(directory, manifest_name) or {})
            ):
                return directory
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


ABANDONED_AFTER_S = 3600  # a staging folder this old whose builder is not running here was left by a kill


def remove_abandoned_staging(directory: Path) -> list[Path]:
    """Remove the staging folders of `directory` that killed builds left (`.<name>.tmp-<pid>`, older than
    ABANDONED_AFTER_S and no process of that id running here); the ones removed."""
    removed = []
    for staging in directory.parent.glob(f".{directory.name}.tmp-*"):
        pid = staging.name.rpartition("-")[2]
        try:
            old = time.time() - staging.stat().st_mtime > ABANDONED_AFTER_S
        except OSError:
            continue
        if old and not (pid.isdigit() and _running(int(pid))):
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_layers(directory: str | Path, manifest_name: str, digest: str, n_layers: int, kind: str) -> dict:
    """The manifest of `directory` when it holds intact `kind` layers of these weights; else ValueError
    naming the folder."""
    directory = Path(directory)
    manifest = read_manifest(directory, manifest_name)
    if manifest is None:
        raise ValueError(
            f"{directory} holds no {kind} layers (no readable {manifest_name}): build them first"
        )
    if manifest.get("weights") != digest or manifest.get("layers") != n_layers:
        raise ValueError(f"the {kind} layers in {directory} were built from other weights")
    damaged = damaged_files(directory, manifest)
    if damaged:
        raise ValueError(
            f"the {kind} layers in {directory} are damaged ({', '.join(damaged)} not as written)"
        )
    return manifest
