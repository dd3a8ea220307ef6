"""Measured wall-clock speed-up of chosen exit settings against the same model at full depth.

Same process, same texts, same batch size, same tokenisation path (`EarlyExitClassifier.predict`); full depth
and the early-exit settings are timed in turn, several times, and compared by their medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from ee_model import EarlyExitClassifier, ExitSetting
from pipelines.evaluation.results import WallclockTiming


def seconds_of(model: EarlyExitClassifier, texts: list[str], batch_size: int, setting: ExitSetting) -> float:
    started = time.perf_counter()
    model.predict(texts, batch_size=batch_size, setting=setting)
    return time.perf_counter() - started


def wallclock_speedups(
    model: EarlyExitClassifier,
    texts: Sequence[str],
    settings: list[ExitSetting],
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 3,
) -> list[WallclockTiming]:
    """For each setting and batch size: rows/s at full depth and early exit, and their ratio. Each repeat
    times full depth and then every setting, so drift in the machine's load hits both alike; the medians over
    `repeats` are reported (one unrepeated timing on a busy machine can be off by 2x)."""
    texts = list(texts)
    if not texts:
        return []
    full_depth = ExitSetting("none")
    model.predict(texts[: max(batch_sizes)], batch_size=max(batch_sizes), setting=full_depth)  # warm-up
    rows = []
    for batch_size in batch_sizes:
        full_times, early_times = [], {setting: [] for setting in settings}
        for _ in range(repeats):
            full_times.append(seconds_of(model, texts, batch_size, full_depth))
            for setting in settings:
                early_times[setting].append(seconds_of(model, texts, batch_size, setting))
        full = statistics.median(full_times)
        for setting, times in early_times.items():
            early = statistics.median(times)
            rows.append(
                WallclockTiming(
                    policy=setting.policy,
                    knob=setting.knob,
                    batch_size=batch_size,
                    rows=len(texts),
                    repeats=repeats,
                    full_rows_per_s=len(texts) / full,
                    early_rows_per_s=len(texts) / early,
                    wallclock_speedup=full / early,
                    runtime=model.runtime.name,
                )
            )
    return rows
