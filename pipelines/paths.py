"""Files on disk: the one parser of "parquet file, folder or glob" (with one rule for hidden paths), and
writes that a kill never leaves half done.

Hidden: any part of a path below the input (or output) root starting with '_' or '.': Spark's _temporary/ and
_SUCCESS, .staging folders, our own _manifest/, _tmp/, _lock and _calibration/.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import UserError

HIDDEN_PREFIXES = ("_", ".")


def is_hidden(relative: str | Path) -> bool:
    """Whether any part of a path below the input (or output) root starts with '_' or '.'."""
    return any(part.startswith(HIDDEN_PREFIXES) for part in Path(relative).parts)


def is_uri(path: str) -> bool:
    return "://" in path


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def glob_root(pattern: str) -> str:
    """The folders of a glob before its first wildcard: `in/*/*.parquet` -> `in`. It does not move as matches
    come and go (the common folder of the matches would: one day's partition, then all of `in/`), so the
    names of outputs below it stay the same from run to run."""
    fixed = []
    for part in Path(pattern).parts[:-1]:
        if is_glob(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def parquet_files(
    path: str, skip: Path | None = None, error: type[UserError] = UserError
) -> tuple[list[str], str]:
    """Sorted parquet files of a local file, folder (searched recursively) or glob, and the folder their names
    are relative to (the folder given, the file's folder, or a glob's fixed prefix: `glob_root`). Hidden paths
    below that folder are left out, and so is everything inside `skip` (an output folder inside the input).
    A path that does not exist, or a glob that matches nothing, raises `error`."""
    if os.path.isdir(path):
        files, root = [str(p) for p in Path(path).rglob("*.parquet")], path
    elif is_glob(path):
        files = [f for f in glob.glob(path, recursive=True) if os.path.isfile(f)]
        if not files:
            raise error(f"no parquet files match {path!r}")
        root = glob_root(path)
    elif os.path.isfile(path):
        return [path], os.path.dirname(path) or "."
    else:
        raise error(f"input {path!r} does not exist")
    base = os.path.abspath(root)
    kept = [
        f
        for f in files
        if not is_hidden(os.path.relpath(os.path.abspath(f), base))
        and not (skip is not None and Path(f).resolve().is_relative_to(skip))
    ]
    return sorted(kept), root


def parquet_source(path: str, error: type[UserError] = UserError) -> list[str] | str:
    """What pyarrow and Ray Data read for `path`: the local files of `parquet_files`, or a URI as given (the
    filesystem's own listing applies there)."""
    if is_uri(path):
        return path
    files, _ = parquet_files(path, error=error)
    if not files:
        raise error(f"no parquet files found at {path!r}")
    return files


def replace_atomically(aside: Path, final: Path) -> None:
    """Make `aside` visible as `final` in one rename (atomic on a POSIX filesystem)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(aside, final)


def write_text_atomically(path: Path, text: str) -> None:
    """Written aside, then renamed: a killed run never leaves half a file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(path.name + ".tmp")
    aside.write_text(text)
    replace_atomically(aside, path)


def write_parquet_atomically(table: pa.Table, path: Path) -> None:
    """Written aside, then renamed: a killed run never leaves half a file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(path.name + ".tmp")
    pq.write_table(table, aside)
    replace_atomically(aside, path)
