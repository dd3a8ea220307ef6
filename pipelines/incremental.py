"""Incremental, kill-safe output of batch scoring: one committed output file per input file.

Layout under the output folder, per (model, policy, knob) key:
    <output>/<key>/<input name>.parquet      committed outputs (their presence is the commit)
    <output>/<key>/_manifest/<input name>.json   what was scored: input path, rows, model, time
    <output>/<key>/_tmp/                      work in progress; cleared at start, never read
Each output is written aside in _tmp and made visible with one os.replace (atomic on a POSIX filesystem), so a
run killed at any moment leaves only complete outputs, and the rerun scores exactly the files without one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def output_name(input_file: str, input_root: str | None) -> str:
    """A flat, unique output file name for an input file (its path below the input folder)."""
    relative = os.path.relpath(input_file, input_root) if input_root else os.path.basename(input_file)
    stem = relative.replace(os.sep, "__")
    return stem if stem.endswith(".parquet") else f"{stem}.parquet"


@dataclass
class OutputFolder:
    root: Path  # <output>/<key>

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "_manifest").mkdir(exist_ok=True)
        shutil.rmtree(self.root / "_tmp", ignore_errors=True)  # leftovers of a killed run: never committed
        (self.root / "_tmp").mkdir()

    def committed(self, name: str) -> bool:
        return (self.root / name).is_file()

    def repair_manifest(self) -> None:
        """Write the manifest record of any output committed just before a kill took its record."""
        for output in self.root.glob("*.parquet"):
            record = self.root / "_manifest" / f"{output.name}.json"
            if not record.is_file():
                rows = pq.ParquetFile(output).metadata.num_rows
                record.write_text(json.dumps({"output": output.name, "rows": rows, "repaired": True}))

    def writer(self, name: str, schema: pa.Schema) -> PendingOutput:
        return PendingOutput(self, name, self.root / "_tmp" / name, pq.ParquetWriter(self.root / "_tmp" / name, schema))


@dataclass
class PendingOutput:
    folder: OutputFolder
    name: str
    path: Path
    writer: pq.ParquetWriter
    rows: int = 0
    meta: dict = field(default_factory=dict)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self, record: dict) -> None:
        """Close, then make the output visible in one atomic rename; the manifest record follows."""
        self.writer.close()
        manifest_tmp = self.folder.root / "_tmp" / f"{self.name}.json"
        manifest_tmp.write_text(json.dumps({**record, "output": self.name, "rows": self.rows,
                                            "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
        os.replace(self.path, self.folder.root / self.name)  # the commit point
        os.replace(manifest_tmp, self.folder.root / "_manifest" / f"{self.name}.json")
