"""What a scoring run reports: running totals over the scored rows (`Tally`) and the typed summary the job
prints as JSON and logs to MLflow (`ScoringSummary.to_dict`, `.metrics`)."""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ee_model.config import EarlyExitConfig
from ee_model.flops import FlopsModel


@dataclass
class Tally:
    """Running totals over scored rows, for the summary."""

    rows: int = 0
    errors: int = 0
    exit_layers: list[np.ndarray] = field(default_factory=list)
    tokens: list[np.ndarray] = field(default_factory=list)
    flops: int = 0
    labels: collections.Counter = field(default_factory=collections.Counter)
    prefix: str = ""  # of the output columns
    driver_seconds: float = 0.0  # the driver's own work on the stream (score_stream)
    actor_seconds: float = 0.0  # inside the scorers' calls, summed over actors (`CALL_SECONDS`)

    def steady_rows_per_s(self, actors: int) -> float | None:
        """The pool's rate once its actors are up and have loaded the model: rows over the seconds each actor
        spent scoring, `actors` of them at once (reading, start-up and the driver's waits left out)."""
        return self.rows * actors / self.actor_seconds if self.actor_seconds > 0 else None

    def add(self, table: pa.Table) -> None:
        column = lambda name: table[self.prefix + name]  # noqa: E731
        self.rows += table.num_rows
        self.errors += table.num_rows - column("error").null_count
        scored = column("error").is_null()
        self.exit_layers.append(column("exit_layer").filter(scored).to_numpy())
        self.tokens.append(column("tokens").filter(scored).to_numpy())
        self.flops += int(pa.compute.sum(column("flops").filter(scored)).as_py() or 0)
        self.labels.update(column("label").filter(scored).to_pylist())

    def rates(self, model_config: EarlyExitConfig, seconds: float, actors: int | None) -> dict[str, Any]:
        """The rows, rates and speed-ups of these totals, as `ScoringSummary` fields."""
        layers = np.concatenate(self.exit_layers) if self.exit_layers else np.array([])
        tokens = np.concatenate(self.tokens).astype(np.int64) if self.tokens else np.array([], dtype=np.int64)
        flops_model = FlopsModel.of_model(model_config)
        full = int(flops_model.full_depth_flops(tokens).sum()) if len(tokens) else 0
        steady = self.steady_rows_per_s(actors or 1)
        return {
            "rows_scored": self.rows,
            "errors": self.errors,
            "rows_per_s": round(self.rows / seconds, 2) if seconds > 0 else None,
            "steady_rows_per_s": round(steady, 2) if steady else None,
            "mean_exit_layer": round(float(layers.mean()), 4) if len(layers) else None,
            "layer_speedup": round(flops_model.n_layers / float(layers.mean()), 4) if len(layers) else None,
            "flops_speedup": round(full / self.flops, 4) if self.flops else None,
            "label_distribution": dict(sorted(self.labels.items())),
            "seconds": round(seconds, 2),
            "driver_busy_share": round(self.driver_seconds / seconds, 4) if seconds > 0 else None,
        }


# FLOPs speed-up under which early exit may lose to the plain model in the fastest runtime: on this project's
# CPU early exit ran at about 0.7x its FLOPs speed-up relative to plain OpenVINO int8 (docs/results.md, "On
# text the model was not trained for": 1.14x FLOPs, 0.81x plain)
LITTLE_SAVED = 1.5


def little_saved_warning(policy: str, flops_speedup: float | None) -> str | None:
    """Why early exit may not pay on what was scored (its FLOPs speed-up is under LITTLE_SAVED), else None
    (also for policy "none": full depth was asked for)."""
    if policy == "none" or flops_speedup is None or flops_speedup >= LITTLE_SAVED:
        return None
    return (
        f"early exit saved little on these texts (FLOPs speed-up {flops_speedup:.2f}x, under "
        f"{LITTLE_SAVED}x): few rows were confident early, and the plain model in the fastest runtime "
        "(e.g. OpenVINO) may score them faster; a model trained on text like this exits earlier "
        "(docs/results.md)"
    )


@dataclass(frozen=True)
class ScoringSummary:
    """One scoring run: what it read, scored, skipped and found, how fast, with which model, setting and
    runtime. `to_dict()` is the job's JSON (calibration, unreadable and orphaned only when there are any)."""

    input_files: int
    files_scored: int
    files_skipped: int  # scored by an earlier run, unchanged
    files_changed: int  # changed since an earlier run scored them: scored again
    files_unreadable: int
    files_placed_apart: int  # outputs named apart because another input owns the mirrored name
    orphaned_outputs: int  # outputs whose input file is gone, kept
    orphans_removed: int
    rows_in: int
    rows_scored: int
    errors: int  # rows with an invalid text (null label, the reason in `error`)
    rows_per_s: float | None  # end to end, from the first row streamed
    steady_rows_per_s: float | None  # the pool's rate once its actors were up (`Tally.steady_rows_per_s`)
    mean_exit_layer: float | None
    layer_speedup: float | None
    flops_speedup: float | None
    label_distribution: dict[str, int]
    seconds: float
    driver_busy_share: float | None
    tokenize: str
    actors: int | None
    output: str
    model: str
    model_version: str | int | None
    policy: str
    knob: float | int | None
    precision: str
    precision_reason: str
    started_at: float
    calibration: dict | None = None
    runtime_choice: dict | None = None  # how `auto` chose the runtime (`ee_model.runtime_choice`), if it did
    promise: str = ""  # which rows the run's promise stands on (`pipelines.scoring.pipeline.stated_promise`)
    unreadable: dict[str, str] = field(default_factory=dict)
    orphaned: list[str] = field(default_factory=list)
    # "complete", or "files_set_aside" (inputs named in `unreadable` were not scored; the job exits 2)
    status: str = "complete"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for optional in ("calibration", "runtime_choice", "unreadable", "orphaned"):
            if not data[optional]:
                del data[optional]
        return data

    def metrics(self) -> dict[str, float]:
        """The numbers of the summary, as MLflow metrics (the knob and the start time are params)."""
        return {
            name: float(value)
            for name, value in self.to_dict().items()
            if isinstance(value, (int, float))
            and not isinstance(value, bool)
            and name not in ("knob", "started_at", "model_version")
        }
