"""`auto` by measurement: the runtimes a CPU could run fast, timed on rows like those to be scored, the
fastest kept.

The CPU's flags decide only the candidates (`cpu_candidates`): never a precision the CPU would emulate (no
bf16 without bf16 units), never a backend that is not installed, OpenVINO int8 only with texts to calibrate
on and only on x86 (its ARM plugin runs int8 models in fp16). `measure_runtimes` then builds each
candidate's layers, runs a warm-up pass of each, and times `repeats` passes of each, interleaved (candidate
after candidate, so a slow spell of the machine falls on all of them), with early exit at one setting, at the
threads and batch size the scorers use; the median pass counts. In the same run each candidate scores the
rows at full depth once, and its labels' agreement with fp32 full depth is measured (int8 on a CPU without
int8 dot products can saturate). `pick` keeps, of the candidates at or above the agreement floor, the
simplest (`SIMPLICITY`) within `margin` of the fastest, so noise between two near-equal runtimes does not
decide, and says why. The decision depends on what `decision_key` lists (CPU model, flags and cap, library
versions, the model, threads, batch size, the candidates); callers cache it under that key.

Left out as candidates: OpenVINO f32 (slower than PyTorch fp32 with early exit on every CPU measured,
docs/results.md), oneDNN's bf16 fast-math mode for fp32 on ARM (not a runtime here yet).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ee_model.cpu_support import CpuSupport, cpu_support, cpuinfo_field
from ee_model.runtime import (
    BF16,
    BF16_OPENVINO,
    FP32,
    INT8,
    INT8_OPENVINO,
    Runtime,
    missing_backend,
    not_on_this_arch,
    why_not,
)

if TYPE_CHECKING:
    from ee_model.modeling import EarlyExitClassifier
    from ee_model.policies import ExitSetting

# Simplest first: what `pick` keeps when runtimes run within the margin of each other (fp32 runs the
# layers as trained and exactly per row; PyTorch before a second library; files built without calibration
# before those calibrated on texts).
SIMPLICITY = (FP32, BF16, INT8, BF16_OPENVINO, INT8_OPENVINO)
AGREEMENT_FLOOR = 0.99  # labels at full depth agreeing with fp32's, as the int8 and bf16 tests hold them
MARGIN = 0.05  # a runtime must be this much faster than a simpler one to be kept over it
REPEATS = 3
VERSIONED = ("torch", "onnxruntime", "openvino", "nncf", "transformers")  # what the decision depends on


@dataclass(frozen=True)
class Measurement:
    """One candidate's timing: rows/s with early exit (the median pass), its full-depth labels' agreement
    with fp32 full depth, the seconds it took to get ready (build or find its layers, score the rows at
    full depth, the warm-up pass), or why it could not run."""

    runtime: str
    rows_per_s: float = 0.0
    agreement: float = 0.0
    build_s: float = 0.0
    passes: tuple[float, ...] = ()  # rows/s of each timed pass
    error: str | None = None


@dataclass(frozen=True)
class RuntimeChoice:
    """What `auto` picked, why, every candidate's measurement, and the key the decision depends on."""

    runtime: str
    reason: str
    measurements: tuple[Measurement, ...] = ()
    left_out: dict[str, str] = field(default_factory=dict)  # runtime name -> why it was not a candidate
    key: dict = field(default_factory=dict)
    seconds: float = 0.0  # what choosing took

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> RuntimeChoice:
        measurements = tuple(
            Measurement(**{**m, "passes": tuple(m.get("passes", ()))}) for m in record.get("measurements", ())
        )
        return cls(
            record["runtime"],
            record["reason"],
            measurements,
            dict(record.get("left_out", {})),
            dict(record.get("key", {})),
            float(record.get("seconds", 0.0)),
        )


def cpu_candidates(
    support: CpuSupport | None = None,
    can_calibrate: bool = True,
    exportable: bool = True,
    backend: str = "auto",
    installed: Callable[[str], str | None] = missing_backend,
) -> tuple[list[Runtime], dict[str, str]]:
    """(the runtimes worth timing on this CPU, simplest first; {runtime name: why not} for the others).
    `support`: the CPU (default this one's; its `arch` says x86 or ARM); `can_calibrate`: texts like those
    to be scored are at hand (OpenVINO int8 calibrates on them); `exportable`: the encoder's layers export
    one by one (BERT-like; else only PyTorch runs them); `backend`: only that backend's runtimes ("auto":
    any); `installed`: why a backend is missing here, else None."""
    support = support or cpu_support()
    candidates, left_out = [], {}
    for runtime in SIMPLICITY:
        why = _why_not_candidate(runtime, support, can_calibrate, exportable, backend, installed)
        if why is None:
            candidates.append(runtime)
        else:
            left_out[runtime.name] = why
    return candidates, left_out


def _why_not_candidate(
    runtime: Runtime,
    support: CpuSupport,
    can_calibrate: bool,
    exportable: bool,
    backend: str,
    installed: Callable[[str], str | None],
) -> str | None:
    if backend != "auto" and runtime.backend != backend:
        return f"not on backend {backend}"
    if runtime.precision == "bf16" and not support.has_bf16:
        return f"no bf16 units: it would be emulated ({support.describe()})"
    elsewhere = not_on_this_arch(runtime, support)
    if elsewhere is None and runtime.builds_layers and not exportable:
        return "the encoder's layers are not exported one by one (not BERT-like)"
    return elsewhere or why_not(runtime, can_calibrate, installed)


def measure_runtimes(
    model: EarlyExitClassifier,
    runtimes: Sequence[Runtime],
    texts: Sequence[str],
    setting: ExitSetting,
    layers_folder: Callable[[Runtime], Path],
    calibration_texts: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    threads: int | None = None,
    batch_size: int = 32,
    repeats: int = REPEATS,
) -> list[Measurement]:
    """Each runtime timed on `texts` (see the module doc): `model` in fp32 on the CPU (left as it is; each
    candidate runs a copy), `setting` the early exit timed, `layers_folder(runtime)` where a runtime's
    layers are built or found (kept for the run that follows), `threads` and `batch_size` those of the
    scorers. A runtime whose layers fail to build or run is measured as an error, not raised."""
    from ee_model.policies import ExitSetting

    threads = threads or torch.get_num_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        token_ids = model.tokenize(list(texts))
        full = ExitSetting("none")
        reference = model.predict_tokens(token_ids, setting=full, batch_size=batch_size).label_id
        ready: dict[str, tuple[EarlyExitClassifier, float, float]] = {}
        errors: dict[str, str] = {}
        for runtime in runtimes:
            start = time.perf_counter()
            try:
                candidate = _ready(model, runtime, layers_folder, calibration_texts, threads)
                labels = candidate.predict_tokens(token_ids, setting=full, batch_size=batch_size).label_id
                candidate.predict_tokens(token_ids, setting=setting, batch_size=batch_size)  # warm-up
            except Exception as error:  # a runtime that cannot run here is out, with why
                errors[runtime.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                continue
            agreement = float(np.mean(np.asarray(labels) == np.asarray(reference)))
            ready[runtime.name] = (candidate, agreement, time.perf_counter() - start)
        passes: dict[str, list[float]] = {name: [] for name in ready}
        for _ in range(repeats):  # interleaved: a slow spell of the machine falls on every candidate
            for name, (candidate, _, _) in ready.items():
                start = time.perf_counter()
                candidate.predict_tokens(token_ids, setting=setting, batch_size=batch_size)
                passes[name].append(len(texts) / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(before)
    return [
        Measurement(r.name, error=errors[r.name])
        if r.name in errors
        else _measurement(r.name, passes[r.name], *ready[r.name][1:])
        for r in runtimes
    ]


def _ready(model, runtime: Runtime, layers_folder, calibration_texts, threads: int) -> EarlyExitClassifier:
    """A copy of `model` running `runtime`, its layers built (or found) in `layers_folder(runtime)`."""
    from ee_model.runtime_layers import build_layers, with_runtime

    texts = calibration_texts if runtime.needs_calibration_texts else None
    folder = build_layers(model, runtime, layers_folder(runtime), texts)
    return with_runtime(copy.deepcopy(model), runtime, folder, threads)


def _measurement(name: str, passes: list[float], agreement: float, build_s: float) -> Measurement:
    return Measurement(
        name,
        round(statistics.median(passes), 2),
        round(agreement, 5),
        round(build_s, 2),
        tuple(round(p, 2) for p in passes),
    )


def pick(
    measurements: Sequence[Measurement], floor: float = AGREEMENT_FLOOR, margin: float = MARGIN
) -> tuple[str, str]:
    """(the runtime kept, why): of the measured runtimes at or above `floor`, the simplest whose rows/s are
    within `margin` of the fastest's; ValueError when none qualifies (fp32 always does: it is the
    reference)."""
    order = {runtime.name: index for index, runtime in enumerate(SIMPLICITY)}
    usable = [m for m in measurements if m.error is None and m.agreement >= floor]
    if not usable:
        raise ValueError("no runtime measured at or above the agreement floor")
    fastest = max(usable, key=lambda m: m.rows_per_s)
    near = [m for m in usable if m.rows_per_s * (1 + margin) >= fastest.rows_per_s]
    kept = min(near, key=lambda m: order.get(m.runtime, len(order)))
    below = [
        f"{m.runtime} (agreement {m.agreement:.4f})"
        for m in measurements
        if m.error is None and m.agreement < floor
    ]
    parts = [f"{kept.runtime}: {kept.rows_per_s:.1f} rows/s, agreement {kept.agreement:.4f}"]
    if kept is not fastest:
        parts.append(
            f"the simplest within {margin:.0%} of the fastest ({fastest.runtime}, {fastest.rows_per_s:.1f})"
        )
    else:
        parts.append("the fastest measured")
    if below:
        parts.append(f"below the {floor} agreement floor: {', '.join(below)}")
    failed = [m.runtime for m in measurements if m.error is not None]
    if failed:
        parts.append(f"could not run: {', '.join(failed)}")
    return kept.runtime, "; ".join(parts)


def versions() -> dict[str, str]:
    """The installed versions of the libraries a runtime's speed depends on (absent ones omitted)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def decision_key(
    model_identity: str,
    candidates: Sequence[Runtime],
    threads: int,
    batch_size: int,
    setting: ExitSetting,
    support: CpuSupport | None = None,
) -> dict:
    """What a measured choice depends on: a change in any of these is timed again."""
    support = support or cpu_support()
    return {
        "cpu": cpuinfo_field("model name") or platform.processor() or platform.machine(),
        "arch": support.arch,
        "flags": [*support.bf16, *support.int8],
        "cap": support.cap,
        "versions": versions(),
        "model": model_identity,
        "threads": threads,
        "batch_size": batch_size,
        "setting": str(setting),
        "candidates": [r.name for r in candidates],
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
