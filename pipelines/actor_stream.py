"""The Ray Data job shape that scoring and stage-2 feature extraction share: inputs -> an actor pool
(`actor_pool`, sized here) -> each input's output committed once all its rows are back
(`commit_each_input`, the driver's half).

The stream's batches carry a key column naming the input each row came from (a file, a store part); a
block may hold rows of several inputs, and an input's rows may arrive in several blocks, in any order. Each
input's rows go to its own output, opened on its first rows, and the output is committed (made visible in
one atomic step, by the caller's `commit`) when the rows seen equal the rows the input holds. Rows in must
equal rows out: an input that ends short or long is never committed, and the run fails naming it. A kill
at any point leaves every committed output whole and nothing else visible.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc


def most_actors(cpus_per_actor: float, gpus_per_actor: float, spare_cpus: int = 0) -> int:
    """As many actors as the cluster's GPUs (GPU actors) or CPUs hold now, `spare_cpus` left for other
    stages' tasks (at least one actor)."""
    import ray

    resources = ray.cluster_resources()
    if gpus_per_actor:
        return max(1, math.floor(resources.get("GPU", 0) / gpus_per_actor))
    return max(1, math.floor((resources.get("CPU", 1) - spare_cpus) / cpus_per_actor))


def actor_pool(size: int | None, most: int):
    """A pool of `size` actors, else an autoscaling one started with `most` actors (what the cluster holds
    now), shrunk by Ray Data when the input runs short and grown, with no upper bound of ours, within the
    resources Ray Data's budget gives the stage: nodes that join while the job runs (a cluster autoscaler,
    `ray start --address`) get actors too."""
    import ray.data

    if size is not None:
        return ray.data.ActorPoolStrategy(size=size)
    return ray.data.ActorPoolStrategy(min_size=1, max_size=None, initial_size=most)


class StreamedOutput(Protocol):
    """One input's output while its rows arrive."""

    def write(self, rows: pa.Table) -> None: ...

    def commit(self) -> None:
        """All the input's rows are written: make the output visible, atomically."""

    def discard(self) -> None:
        """The run ended before the input was complete: leave nothing visible."""


@dataclass(frozen=True)
class StreamResult:
    committed: int  # outputs committed
    busy_seconds: float  # the driver's own work (splitting, writing, committing), not waiting for batches


class IncompleteInputsError(RuntimeError):
    """The stream ended with inputs whose rows did not all come back (or came back twice)."""


def commit_each_input(
    batches: Iterable[pa.Table],
    key_column: str,
    expected_rows: Mapping[Hashable, int],
    open_output: Callable[[Hashable], StreamedOutput],
) -> StreamResult:
    """Drive `batches`; write each input's rows (without `key_column`) to `open_output(key)` and commit it
    when `expected_rows[key]` rows have come back. Raises `IncompleteInputsError` naming the inputs whose
    row counts do not reconcile; outputs left open are discarded and a stream left early is closed."""
    open_outputs: dict[Hashable, StreamedOutput] = {}
    seen: collections.Counter = collections.Counter()
    committed, busy = 0, 0.0
    stream = iter(batches)
    try:
        for batch in stream:
            started = time.perf_counter()
            keys = batch[key_column]
            for key in dict.fromkeys(keys.to_pylist()):
                if key not in expected_rows:
                    raise IncompleteInputsError(f"rows of an input the run did not read: {key!r}")
                rows = batch.filter(pc.equal(keys, key)).drop_columns([key_column])
                if key not in open_outputs:
                    open_outputs[key] = open_output(key)
                open_outputs[key].write(rows)
                seen[key] += rows.num_rows
                if seen[key] == expected_rows[key]:
                    open_outputs.pop(key).commit()
                    committed += 1
            busy += time.perf_counter() - started
        wrong = {key: f"{seen[key]}/{n}" for key, n in expected_rows.items() if seen[key] != n}
        if wrong:
            raise IncompleteInputsError(
                f"the stream ended with incomplete inputs (rows seen/expected): {wrong}"
            )
    finally:
        for output in open_outputs.values():
            output.discard()
        if hasattr(stream, "close"):  # a stream left early stops now, while Ray still runs (not at exit)
            stream.close()
    return StreamResult(committed, busy)
