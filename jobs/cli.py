"""What the jobs share: user errors end the job with one line on stderr and exit status 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer


@contextmanager
def one_line_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Inside, an exception of `kinds` (errors the user causes and can fix) prints `error: <message>` and
    exits with status 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except kinds as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
