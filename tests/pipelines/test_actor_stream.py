"""The driver's half of the job shape scoring and feature extraction share (`pipelines.actor_stream`): each
input's output is committed exactly when all its rows are back, whatever the blocks' mix and order."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipelines.actor_stream import IncompleteInputsError, commit_each_input


class Recorded:
    """A StreamedOutput that records what happened to it."""

    def __init__(self, key, log):
        self.key, self.log, self.rows = key, log, []

    def write(self, rows):
        assert "key" not in rows.column_names  # the key column is the stream's, not the output's
        self.rows += rows["value"].to_pylist()

    def commit(self):
        self.log.append(("commit", self.key, sorted(self.rows)))

    def discard(self):
        self.log.append(("discard", self.key, sorted(self.rows)))


def batch(*pairs):
    return pa.table({"key": [k for k, _ in pairs], "value": [v for _, v in pairs]})


def test_each_input_commits_once_its_last_row_is_back_in_any_block_order():
    log = []
    stream = [batch(("b", 1), ("a", 1)), batch(("b", 2)), batch(("a", 2), ("c", 1), ("b", 3))]
    result = commit_each_input(stream, "key", {"a": 2, "b": 3, "c": 1}, lambda k: Recorded(k, log))
    assert result.committed == 3 and result.busy_seconds >= 0
    assert log == [("commit", "a", [1, 2]), ("commit", "c", [1]), ("commit", "b", [1, 2, 3])]


def test_an_input_that_ends_short_is_discarded_and_named_and_the_complete_ones_stay_committed():
    log = []
    stream = [batch(("a", 1), ("b", 1)), batch(("a", 2))]
    with pytest.raises(IncompleteInputsError, match=r"'b': '1/2'"):
        commit_each_input(stream, "key", {"a": 2, "b": 2}, lambda k: Recorded(k, log))
    assert log == [("commit", "a", [1, 2]), ("discard", "b", [1])]


def test_rows_of_an_input_the_run_did_not_read_stop_it():
    log = []
    with pytest.raises(IncompleteInputsError, match="did not read: 'z'"):
        commit_each_input([batch(("a", 1)), batch(("z", 1))], "key", {"a": 2}, lambda k: Recorded(k, log))
    assert log == [("discard", "a", [1])]


def test_a_failing_stream_discards_what_is_open():
    log = []

    def stream():
        yield batch(("a", 1))
        raise RuntimeError("an actor died for good")

    with pytest.raises(RuntimeError, match="actor died"):
        commit_each_input(stream(), "key", {"a": 2}, lambda k: Recorded(k, log))
    assert log == [("discard", "a", [1])]


def test_a_fixed_pool_or_an_autoscaling_one_that_starts_with_what_the_cluster_holds():
    from pipelines.actor_stream import actor_pool

    fixed = actor_pool(3, most=8)
    assert (fixed.min_size, fixed.max_size) == (3, 3)
    grows = actor_pool(None, most=8)  # the scoring job's default (the tests' runs fix 1 actor)
    assert (grows.min_size, grows.initial_size) == (1, 8) and grows.max_size in (None, float("inf"))
