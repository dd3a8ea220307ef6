"""The input files of a scoring run: what each holds (its footer), which can be scored now, and how Ray Data
reads them so that every row comes back with the file it came from."""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import UserError
from pipelines.paths import parquet_files
from pipelines.scoring.incremental import fingerprint, output_name
from pipelines.scoring.scorer import CALL_SECONDS, OUTPUT_COLUMNS
from pipelines.text_column import is_text_type
from pipelines.tokenizing import STAGE_COLUMNS

if TYPE_CHECKING:
    from pathlib import Path

    import ray.data

# Ray Data's read_parquet(include_paths=True) writes each row's file here, over a column of that name in the
# file: an input's own `path` column is read apart (`read_inputs`) and put back by the driver (`ReaderPath`).
READER_PATH = "path"


class ScoringError(UserError):
    """Input that cannot be scored: named file or column; raised before any row is scored."""


class NotTextError(ScoringError):
    """A file whose text column holds no text (numbers, lists): set aside, named, the others scored."""


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    rows: int
    schema: pa.Schema
    mirrored: str  # its path below the input root: its output's name unless another input owns that name
    fingerprint: dict[str, int]  # size, mtime, rows: a file replaced in place is scored again

    @property
    def has_reader_path(self) -> bool:
        """Whether the file has its own `path` column, which Ray Data's reader would overwrite."""
        return READER_PATH in self.schema.names


def checked_schema(path: str, parquet: pq.ParquetFile, text_column: str, prefix: str) -> pa.Schema:
    """The file's schema once its text column exists and holds text (or is all null in an empty file, as
    pyarrow writes an empty list), and no column of its is one scoring writes."""
    schema = parquet.schema_arrow
    if text_column == READER_PATH:
        raise ScoringError(
            f"a text column named {READER_PATH!r} cannot be scored: Ray Data's parquet reader writes each "
            "row's file name there; rename the column"
        )
    if text_column not in schema.names:
        raise ScoringError(f"{path!r} has no text column {text_column!r}; its columns are {schema.names}")
    text_type = schema.field(text_column).type
    empty_nulls = pa.types.is_null(text_type) and parquet.metadata.num_rows == 0
    if not (is_text_type(text_type) or empty_nulls):
        raise NotTextError(f"{path!r}: text column {text_column!r} holds {text_type}, not strings")
    written = [prefix + c for c in OUTPUT_COLUMNS]
    clashes = [c for c in (*written, *STAGE_COLUMNS, CALL_SECONDS) if c in schema.names]
    if clashes:
        raise ScoringError(
            f"{path!r} already has column(s) {clashes} that scoring writes; give "
            "--output-prefix (e.g. pred_) to write pred_label, ... beside them"
        )
    return schema


def inspect_inputs(
    input_path: str, output: Path, text_column: str, prefix: str
) -> tuple[list[InputFile], dict[str, str]]:
    """(the input files whose footer reads, {path: reason} of those whose footer does not). A file without
    a footer is still being written (or is damaged), and one whose text column holds no text (numbers,
    lists): it is set aside, named at the end of the run and tried again by the next, while the others are
    scored. A missing text column and a column clash refuse the whole run, by name, before anything is
    scored."""
    files, root = parquet_files(input_path, skip=output, error=ScoringError)
    if not files:
        raise ScoringError(f"no parquet files found at {input_path!r}")
    inputs, unreadable = [], {}
    for path in files:
        absolute = os.path.abspath(path)
        try:
            parquet = pq.ParquetFile(path)
        except (OSError, pa.ArrowException) as error:
            unreadable[absolute] = f"no readable parquet footer (still being written, or damaged): {error}"
            continue
        try:
            schema = checked_schema(path, parquet, text_column, prefix)
        except NotTextError as error:
            unreadable[absolute] = str(error)
            continue
        rows = parquet.metadata.num_rows
        inputs.append(InputFile(absolute, rows, schema, output_name(path, root), fingerprint(path, rows)))
    return inputs, unreadable


def unreadable_texts(pending: dict[str, InputFile], text_column: str) -> dict[str, str]:
    """{path: reason} of the pending files whose text column cannot be read through (a corrupt data page
    behind an intact footer), taken out of `pending`: they are named at the end, the others are scored and
    committed. Reads each file's text column once, in row-group-sized batches (memory stays flat)."""
    bad = {}
    for key, item in list(pending.items()):
        try:
            for _ in pq.ParquetFile(item.path).iter_batches(columns=[text_column]):
                pass
        except (OSError, pa.ArrowException) as error:
            bad[item.path] = str(error)
            del pending[key]
    return bad


def read_inputs(files: list[InputFile]) -> ray.data.Dataset:
    """read_parquet of the files, each row carrying its file in `READER_PATH`. Files with a `path` column of
    their own are read without it (one read per column set), so the reader's column never overwrites it."""
    import ray.data

    groups: dict[tuple, list[str]] = collections.defaultdict(list)
    for item in files:
        columns = tuple(c for c in item.schema.names if c != READER_PATH) if item.has_reader_path else None
        groups[columns, plain_schema(item.schema, columns)].append(item.path)
    # Reading reserves no CPU: on a shared cluster whose CPUs the scoring actors of running jobs hold, read
    # tasks that wait for a CPU never run and every job hangs. Parquet reading is light next to the model.
    reads = [
        ray.data.read_parquet(
            paths,
            include_paths=True,
            num_cpus=0,
            columns=list(columns) if columns is not None else None,
            file_extensions=None,  # every file was opened already: a name without .parquet is read too
            **({"schema": schema} if schema is not None else {}),
        )
        for (columns, schema), paths in groups.items()
    ]
    return reads[0].union(*reads[1:]) if len(reads) > 1 else reads[0]


VIEW_TYPES = {pa.string_view(): pa.string(), pa.binary_view(): pa.binary()}


def plain_type(column_type: pa.DataType) -> pa.DataType:
    """A column's type as Ray Data's blocks carry it and merge it across files: views as string / binary, a
    dictionary as its values (a pandas categorical column is a dictionary in one file, strings in the
    next)."""
    if pa.types.is_dictionary(column_type):
        return plain_type(column_type.value_type)
    return VIEW_TYPES.get(column_type, column_type)


def plain_schema(schema: pa.Schema, columns: tuple[str, ...] | None) -> pa.Schema | None:
    """The schema to read a file with where it has view or dictionary columns (read as `plain_type`, the
    output casts them back to the file's own types); None where it has none."""
    if all(plain_type(field.type) == field.type for field in schema):
        return None
    kept = [field for field in schema if columns is None or field.name in columns]
    return pa.schema([field.with_type(plain_type(field.type)) for field in kept])


class ReaderPath:
    """An input's own `path` column, put back into its scored rows by position (Ray Data keeps each file's
    rows in order with `preserve_order`; the scorer returns every row it gets, in order)."""

    def __init__(self, item: InputFile) -> None:
        self.column = pq.read_table(item.path, columns=[READER_PATH])[READER_PATH]
        self.offset = 0

    def restore(self, rows: pa.Table) -> pa.Table:
        values = self.column.slice(self.offset, rows.num_rows)
        self.offset += rows.num_rows
        return rows.append_column(pa.field(READER_PATH, values.type), values)


def restore_reader_path(item: InputFile) -> Any:
    """A function putting the file's own `path` column back into its rows, or the identity."""
    if not item.has_reader_path:
        return lambda rows: rows
    return ReaderPath(item).restore
