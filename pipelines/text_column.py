"""Reading a parquet text column: which Arrow types hold text, and their values as Python strings."""

from __future__ import annotations

import pyarrow as pa


def is_text_type(column_type: pa.DataType) -> bool:
    """Strings in any of Arrow's layouts (`string`, `large_string`, `string_view`), binary that holds them
    (Spark writes strings without a UTF-8 annotation), and a dictionary of either (what a pandas categorical
    column is written as)."""
    if pa.types.is_dictionary(column_type):
        return is_text_type(column_type.value_type)
    return any(
        check(column_type)
        for check in (
            pa.types.is_string,
            pa.types.is_large_string,
            pa.types.is_string_view,
            pa.types.is_binary,
            pa.types.is_large_binary,
            pa.types.is_binary_view,
        )
    )


def is_binary_text(column_type: pa.DataType) -> bool:
    """Whether a text column's values come back as bytes (binary layouts, or a dictionary of them)."""
    if pa.types.is_dictionary(column_type):
        return is_binary_text(column_type.value_type)
    return (
        pa.types.is_binary(column_type)
        or pa.types.is_large_binary(column_type)
        or (pa.types.is_binary_view(column_type))
    )


def column_texts(column: pa.ChunkedArray | pa.Array) -> list:
    """The column's values as Python strings; binary values are decoded as UTF-8, and a value that is not
    valid UTF-8 stays bytes (an invalid row, "not a string: bytes", never a crash)."""
    values = column.to_pylist()
    if is_binary_text(column.type):
        return [decode_utf8(v) for v in values]
    return values


def decode_utf8(value: bytes | None) -> str | bytes | None:
    try:
        return value.decode("utf-8") if value is not None else None
    except UnicodeDecodeError:
        return value
