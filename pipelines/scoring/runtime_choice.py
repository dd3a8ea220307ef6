"""`--precision auto` on CPU actors, chosen by timing the candidates on the input's rows and pinned per output
folder (`ee_model.runtime_choice` times and picks; this module draws the rows, keeps the decision and
reuses it).

`--choose-runtime`: "measure" times the candidates on every first run of an output folder; "auto" (the
default) times them where the input is large enough to pay for it (`MEASURE_MIN_ROWS` rows; choosing takes
about a minute, once per model version, CPU kind and library versions) and takes the CPU-flag table's
choice (`ee_model.runtime.resolve_runtime`) on smaller inputs; "table" always takes the table's. Either
decision is pinned in `<output>/_runtime/`, under a name holding the digest of what it depends on
(`ee_model.runtime_choice.decision_key`): a scheduled rerun finds it and scores the same runtime into the same
output key, and a change of CPU kind, library version, model, threads or batch size decides again.

The candidates are timed in the driver, at the actors' threads and batch size, on the driver's CPU: on a
cluster of one node kind (and on one machine) that is the actors' CPU. The actors check theirs again when
they load the model (`pipelines.model_source.load_shipped_model`: a runtime their CPU lacks is refused);
on a cluster of mixed CPU kinds, give `--precision` (and `--backend`) for the kind the actors run on.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ee_model.cpu_support import cpu_support
from ee_model.runtime import Runtime
from ee_model.runtime_choice import (
    RuntimeChoice,
    cpu_candidates,
    decision_key,
    key_digest,
    measure_runtimes,
    pick,
)
from pipelines.paths import write_text_atomically

MEASURE_ROWS = 256  # rows each candidate is timed on (drawn at random from the inputs)
MEASURE_MIN_ROWS = 50_000  # "auto": inputs of fewer rows take the flag table's choice


def measures_runtime(precision: str, choose: str, gpus_per_actor: float) -> bool:
    """Whether this run's runtime may be chosen by measurement: `--precision auto` on CPU actors."""
    return precision == "auto" and gpus_per_actor == 0 and choose != "table"


def runtime_pin(output: str | Path, identity: str, key: dict) -> Path:
    return Path(output).resolve() / "_runtime" / f"{identity}__{key_digest(key)}.json"


def chosen_runtime(
    config,
    identity: str,
    model_dir: Path,
    model_type: str,
    setting,
    input_rows: int,
    sample: Callable[[int], list[str]],
    layers_folder: Callable[[Runtime], Path],
    calibration_texts: Callable[[], list[str]],
    table: tuple[Runtime, str],
) -> tuple[Runtime, str, RuntimeChoice | None]:
    """(the runtime, why, the measured choice or None) for a run with `--precision auto` on CPU actors: the
    decision pinned for this key in the output folder, else timed (`sample(rows)`: texts drawn from the
    inputs; `layers_folder(runtime)`: where its layers are built, the run's own folder so the winner's are
    reused) or the flag `table`'s (runtime, why) on an input of fewer than `MEASURE_MIN_ROWS` rows under
    "auto"; pinned either way."""
    from ee_model import encoders

    support = cpu_support()
    exportable = encoders.FAMILIES[model_type].exportable
    candidates, left_out = cpu_candidates(
        support, can_calibrate=True, exportable=exportable, backend=config.backend
    )
    threads = max(1, int(config.cpus_per_actor))
    key = decision_key(identity, candidates, threads, config.batch_size, setting, support)
    path = runtime_pin(config.output, identity, key)
    if path.is_file():
        record = json.loads(path.read_text())
        choice = RuntimeChoice.from_dict(record)
        print(f"runtime {choice.runtime}, as pinned in {path}", file=sys.stderr)
        return Runtime.parse(choice.runtime), f"as pinned in {path}: {choice.reason}", choice
    if not candidates:
        return (*table, None)  # e.g. a backend none of this CPU's candidates runs on: the table decides
    if config.choose_runtime == "auto" and input_rows < MEASURE_MIN_ROWS:
        runtime, why = table
        reason = (
            f"{why} (the CPU-flag table: {input_rows} input rows, under the {MEASURE_MIN_ROWS} that pay for "
            "timing the candidates; --choose-runtime measure times them)"
        )
        choice = RuntimeChoice(runtime.name, reason, left_out=left_out, key=key)
    else:
        choice = timed_choice(
            model_dir, candidates, sample, layers_folder, calibration_texts, setting, threads,
            config.batch_size, table, left_out, key,
        )  # fmt: skip
    write_text_atomically(path, json.dumps(choice.to_dict(), indent=2))
    return Runtime.parse(choice.runtime), choice.reason, choice


def timed_choice(
    model_dir: Path,
    candidates: list[Runtime],
    sample: Callable[[int], list[str]],
    layers_folder: Callable[[Runtime], Path],
    calibration_texts: Callable[[], list[str]],
    setting,
    threads: int,
    batch_size: int,
    table: tuple[Runtime, str],
    left_out: dict[str, str],
    key: dict,
) -> RuntimeChoice:
    """The candidates timed on `MEASURE_ROWS` input rows and the pick (`ee_model.runtime_choice`); the
    `table`'s runtime when none holds the agreement floor."""
    from ee_model import EarlyExitClassifier

    start = time.perf_counter()
    model = EarlyExitClassifier.from_pretrained(model_dir)
    texts = sample(MEASURE_ROWS)
    measurements = measure_runtimes(
        model, candidates, texts, setting, layers_folder, calibration_texts, threads, batch_size
    )
    try:
        name, why = pick(measurements)
    except ValueError:  # none held the agreement floor (fp32, the reference, was not a candidate)
        name = table[0].name
        why = f"none of {[m.runtime for m in measurements]} held the agreement floor, so {table[1]}"
    seconds = round(time.perf_counter() - start, 1)
    reason = f"timed on {len(texts)} input rows at {threads} thread(s), {seconds} s: {why}"
    print(f"runtime {name}, {reason}", file=sys.stderr)
    return RuntimeChoice(name, reason, tuple(measurements), left_out, key, seconds)
