"""Incremental, kill-safe output of batch scoring: one committed output file per input file.

Layout under the output folder:
    <output>/_lock                             held (flock) by the one scoring run writing here
    <output>/<key>/<input path>.parquet        committed outputs, the input folder's layout mirrored
    <output>/<key>/_manifest/<input path>.json what was scored: input path and fingerprint, rows, model, time
    <output>/<key>/_tmp/                       work in progress; cleared by the lock's holder, never read
`<key>` names everything that changes what an output holds (model, policy, knob, precision, text column,
probabilities, column prefix). Each output is written aside in _tmp and made visible with one os.replace
(atomic on a POSIX filesystem), so a run killed at any moment leaves only complete outputs, and the rerun
scores exactly the files without one, and the files whose input changed since.

An output belongs to the input it was scored from (its manifest record names the input's absolute path), for
good: a later run finds an input's output by that record, whatever folder or glob it was given that day, and
an input whose mirrored name another input already owns (a day folder's `part-0.parquet` after the last
day's) is placed apart, at `<name>--<digest of its path>.parquet`, never over the other's output
(`plan_outputs`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import UserError
from pipelines.paths import is_hidden, replace_atomically, write_text_atomically


def output_name(input_file: str, input_root: str) -> str:
    """The output of an input file: its path below the input root, as a .parquet file. Distinct inputs below
    one root get distinct names (the layout is mirrored, not flattened)."""
    relative = Path(os.path.relpath(input_file, input_root)).as_posix()
    return relative if relative.endswith(".parquet") else f"{relative}.parquet"


def placed_apart(name: str, input_file: str) -> str:
    """The output name of an input whose mirrored `name` another input owns: stable, as it depends only on
    the input's absolute path."""
    tag = hashlib.sha256(os.path.abspath(input_file).encode()).hexdigest()[:10]
    return f"{name.removesuffix('.parquet')}--{tag}.parquet"


def fingerprint(path: str, rows: int) -> dict[str, int]:
    """What identifies an input file's content cheaply: size, modification time and row count."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "rows": rows}


def owner_of(record: dict) -> str | None:
    """The absolute path of the input an output was scored from; None for records that do not say (written
    before records named absolute inputs, or repaired after a kill)."""
    owner = record.get("input")
    return owner if isinstance(owner, str) and os.path.isabs(owner) else None


@dataclass(frozen=True)
class OutputPlan:
    """Where each input's rows go, and what the folder holds that no input of this run accounts for."""

    names: dict[str, str]  # absolute input path -> output name
    placed_apart: dict[str, str]  # absolute input path -> the input that owns its mirrored name
    orphaned: dict[str, str]  # output name -> the input it was scored from, which no longer exists


def plan_outputs(mirrored: dict[str, str], records: dict[str, dict]) -> OutputPlan:
    """`mirrored`: {absolute input path: its path below the input root}, in input order; `records`: the
    committed outputs' manifest records (`OutputFolder.records`). An input keeps the output it was scored
    into before, under whatever name; else it takes its mirrored name when no other input owns that (an output
    of unknown owner belongs to the input of its mirrored name, as before records named inputs), else it is
    placed apart (`placed_apart`)."""
    owners = {name: owner_of(record) for name, record in records.items()}
    output_of = {owner: name for name, owner in owners.items() if owner is not None}
    taken: dict[str, str | None] = dict(owners)
    names, apart = {}, {}
    for path, name in mirrored.items():
        if path in output_of:
            names[path] = output_of[path]
            continue
        holder = taken.get(name, path)
        if holder is not None and holder != path:
            apart[path] = holder
            name = placed_apart(name, path)
        names[path] = name
        taken[name] = path
    orphaned = {
        name: owner for name, owner in owners.items() if owner is not None and not os.path.exists(owner)
    }
    return OutputPlan(names, apart, orphaned)


def record_is_current(record: dict | None, source: dict[str, int]) -> bool | None:
    """None: never committed (no record); True: committed from an input with this fingerprint; False: the
    input changed since (a record repaired after a kill knows only the row count, which must still match)."""
    if record is None:
        return None
    if "fingerprint" in record:
        return record["fingerprint"] == source
    return record.get("rows") == source["rows"]


class OutputLockedError(UserError):
    """Another scoring run is writing to the same output folder."""


class OutputLock:
    """One scoring run at a time per output folder. An flock is released by the kernel when its holder exits,
    however it exits (SIGKILL too), so a crashed run never leaves a stale lock behind."""

    def __init__(self, output: Path) -> None:
        self.path = output / "_lock"
        self.file: IO[str] | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # noqa: SIM115 (held open until __exit__)
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise OutputLockedError(
                f"another scoring run is writing to {self.path.parent} ({holder}); wait for it "
                "to finish or give another --output"
            ) from None
        file.truncate(0)
        file.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
        file.flush()
        self.file = file
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


@dataclass
class OutputFolder:
    root: Path  # <output>/<key>

    def prepare(self) -> None:
        """Create the folder and discard a killed run's unfinished files (call holding the OutputLock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "_manifest").mkdir(exist_ok=True)
        shutil.rmtree(self.root / "_tmp", ignore_errors=True)  # leftovers of a killed run: never committed
        (self.root / "_tmp").mkdir()
        self.repair_manifest()

    def records(self) -> dict[str, dict]:
        """Manifest records of every committed output, by output name."""
        found = {}
        manifest = self.root / "_manifest"
        for path in manifest.rglob("*.json"):
            name = path.relative_to(manifest).as_posix().removesuffix(".json")
            if (self.root / name).is_file():
                found[name] = json.loads(path.read_text())
        return found

    def remove(self, name: str) -> None:
        """Delete a committed output and its record (the output first: a kill between leaves a record that
        `records` ignores)."""
        (self.root / name).unlink(missing_ok=True)
        self._record_path(name).unlink(missing_ok=True)

    def record(self, name: str) -> dict | None:
        """The manifest record of a committed output, or None when `name` has no committed output."""
        if not (self.root / name).is_file():
            return None
        return json.loads(self._record_path(name).read_text())

    def is_current(self, name: str, source: dict[str, int]) -> bool | None:
        """`record_is_current` of the output `name`'s record."""
        return record_is_current(self.record(name), source)

    def repair_manifest(self) -> None:
        """Write the manifest record of any output committed just before a kill took its record."""
        for output in self.root.rglob("*.parquet"):
            name = output.relative_to(self.root).as_posix()
            if is_hidden(name) or self._record_path(name).is_file():
                continue
            rows = pq.ParquetFile(output).metadata.num_rows
            write_text_atomically(
                self._record_path(name), json.dumps({"output": name, "rows": rows, "repaired": True})
            )

    def writer(self, name: str, schema: pa.Schema) -> PendingOutput:
        path = self.root / "_tmp" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return PendingOutput(self, name, path, pq.ParquetWriter(path, schema))

    def _record_path(self, name: str) -> Path:
        return self.root / "_manifest" / f"{name}.json"


@dataclass
class PendingOutput:
    folder: OutputFolder
    name: str
    path: Path
    writer: pq.ParquetWriter
    rows: int = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def discard(self) -> None:
        """Close and delete: the input did not come back whole."""
        self.writer.close()
        self.path.unlink(missing_ok=True)

    def commit(self, record: dict) -> None:
        """Close, then make the output visible in one atomic rename; the manifest record follows."""
        self.writer.close()
        manifest_tmp = self.path.with_name(self.path.name + ".json")
        manifest_tmp.write_text(
            json.dumps(
                {
                    **record,
                    "output": self.name,
                    "rows": self.rows,
                    "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
            )
        )
        replace_atomically(self.path, self.folder.root / self.name)  # the commit point
        replace_atomically(manifest_tmp, self.folder._record_path(self.name))
