"""Measured wall-clock speed-up of chosen exit settings against the same model at full depth.

Same process, same texts, same batch size, same tokenisation path (`EarlyExitClassifier.predict`); the
full-depth run is timed right before each early-exit run so both see the same machine load.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ee_model import EarlyExitClassifier


def seconds_of(model: EarlyExitClassifier, texts: list[str], batch_size: int, policy: str,
               knob: float | int | None, repeats: int) -> float:
    """Best-of-`repeats` seconds to predict `texts` (the minimum is the least noisy estimate)."""
    kwargs = {"threshold": knob} if policy == "entropy" else {"patience": knob} if policy != "none" else {}
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict(texts, policy=policy, batch_size=batch_size, **kwargs)
        best = min(best, time.perf_counter() - started)
    return best


def wallclock_speedups(model: EarlyExitClassifier, texts: Sequence[str], points: list[tuple[str, float | int]],
                       batch_sizes: Sequence[int] = (1, 64), repeats: int = 1) -> list[dict]:
    """For each (policy, knob) and batch size: rows/s at full depth and early exit, and their ratio."""
    texts = list(texts)
    if not texts:
        return []
    model.predict(texts[: max(batch_sizes)], policy="none", batch_size=max(batch_sizes))  # warm-up
    rows = []
    for batch_size in batch_sizes:
        for policy, knob in points:
            full = seconds_of(model, texts, batch_size, "none", None, repeats)
            early = seconds_of(model, texts, batch_size, policy, knob, repeats)
            rows.append({"policy": policy, "knob": knob, "batch_size": batch_size, "rows": len(texts),
                         "full_rows_per_s": len(texts) / full, "early_rows_per_s": len(texts) / early,
                         "wallclock_speedup": full / early})
    return rows
