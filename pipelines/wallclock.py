"""Measured wall-clock speed-up of chosen exit settings against the same model at full depth.

Same process, same texts, same batch size, same tokenisation path (`EarlyExitClassifier.predict`); full depth
and the early-exit settings are timed in turn, several times, and compared by their medians.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

from ee_model import EarlyExitClassifier
from ee_model.policies import KNOB_OF_POLICY


def seconds_of(model: EarlyExitClassifier, texts: list[str], batch_size: int, policy: str,
               knob: float | int | None) -> float:
    knob_name = KNOB_OF_POLICY[policy]
    kwargs = {knob_name: knob} if knob_name else {}
    started = time.perf_counter()
    model.predict(texts, policy=policy, batch_size=batch_size, **kwargs)
    return time.perf_counter() - started


def wallclock_speedups(model: EarlyExitClassifier, texts: Sequence[str], points: list[tuple[str, float | int]],
                       batch_sizes: Sequence[int] = (1, 64), repeats: int = 3) -> list[dict]:
    """For each (policy, knob) and batch size: rows/s at full depth and early exit, and their ratio. Each repeat
    times full depth and then every point, so drift in the machine's load hits both alike; the medians over
    `repeats` are reported (one unrepeated timing on a busy machine can be off by 2x)."""
    texts = list(texts)
    if not texts:
        return []
    model.predict(texts[: max(batch_sizes)], policy="none", batch_size=max(batch_sizes))  # warm-up
    rows = []
    for batch_size in batch_sizes:
        full_times, early_times = [], {point: [] for point in points}
        for _ in range(repeats):
            full_times.append(seconds_of(model, texts, batch_size, "none", None))
            for policy, knob in points:
                early_times[(policy, knob)].append(seconds_of(model, texts, batch_size, policy, knob))
        full = statistics.median(full_times)
        for (policy, knob), times in early_times.items():
            early = statistics.median(times)
            rows.append({"policy": policy, "knob": knob, "batch_size": batch_size, "rows": len(texts),
                         "repeats": repeats, "full_rows_per_s": len(texts) / full,
                         "early_rows_per_s": len(texts) / early, "wallclock_speedup": full / early})
    return rows
