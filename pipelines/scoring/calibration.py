"""Label-free calibration of the exit knob on the corpus being scored.

A model's stored S (or t) was chosen on its labeled dev split. A corpus of another kind (shorter texts,
another source) can need a safer knob to keep the early-exit labels equal to the full model's. Calibration
needs no labels: one full-depth pass over a sample of the corpus records every exit's logits, the full model's
own predictions stand in for gold labels, so each sweep point's `retention` is its agreement with full depth,
and the knob is chosen with the training job's rule (`pipelines.evaluation.thresholds.choose_knob`): settings
are tested from the safest to the most eager, each passing when the one-sided Clopper-Pearson bound of its
agreement at confidence 1 - delta is >= `min_agreement`; the last to pass is used. So the promise "agrees with
full depth on >= min_agreement of the corpus" holds with probability >= 1 - delta (the sample standing for the
corpus); with too small a sample no setting can pass and full depth is used.

"Full depth" is the same model at full depth in the runtime that scores (bf16, int8, OpenVINO: the pass runs
there): the promise bounds what early exit changes. What the runtime itself changes against fp32 is the
runtime's, the same for a plain model run there, and is measured apart (docs/results.md: bf16 0.05-0.2 % of
labels, int8 0.5-2 % on BBC, more on text unlike the training data).

The sample is drawn uniformly at random from all the inputs' rows with a recorded seed
(`pipelines.row_sample`); only the row groups that hold sampled rows are read, so calibrating costs one
full-depth pass over `rows` texts whatever the corpus size. The pass and the rule are
`pipelines.evaluation.agreement`'s, which the training job certifies with too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ee_model import EarlyExitClassifier, ExitSetting
from ee_model.policies import EXIT_RULES
from pipelines.config import ThresholdTarget
from pipelines.evaluation.agreement import certified_setting
from pipelines.model_source import ModelFiles, load_shipped_model

if TYPE_CHECKING:
    from ray import ObjectRef


@dataclass(frozen=True)
class Calibration:
    policy: str
    knob: float | int
    min_agreement: float
    delta: float  # the promise (agreement >= min_agreement on the corpus) fails with probability <= delta
    met: bool  # False: no setting passed, not even the safest (full depth is used); `reason` says why
    agreement: float  # on the sample, at knob
    agreement_bound: float  # one-sided Clopper-Pearson lower bound of that agreement at confidence 1 - delta
    rows: int  # valid texts in the sample
    flops_speedup: float  # on the sample, at knob
    mean_exit_layer: float
    reason: str
    seed: int | None = None  # of the random sample (None: calibrated before samples were seeded)

    @property
    def promise(self) -> str:
        """The calibration's promise in one line, as a run that scores with it states it."""
        if not self.met:
            return f"{self.policy} at full depth ({self.reason})"
        return (
            f"{self.policy} knob {self.knob:g}: agreement with full depth >= {self.min_agreement:g} on the "
            f"corpus with probability >= {1 - self.delta:g} (bound {self.agreement_bound:.4f} on "
            f"{self.rows} rows drawn with seed {self.seed})"
        )

    @property
    def setting(self) -> ExitSetting:
        return ExitSetting(self.policy, self.knob)

    def to_dict(self) -> dict:
        return asdict(self)


# `--calibrate-rows auto`: calibrate on AUTO_SHARE of the input's rows, at most AUTO_MAX_ROWS, when that is at
# least AUTO_MIN_ROWS (inputs of >= 20,000 rows) and at least as many rows as the model's stored knob was
# certified on; else keep the stored knob. The pass is full depth, so 5 % of the rows costs about 5 % x its
# speed-up of the scoring itself (~15 % at 3x), paid back when the knob is faster by more: on unseen BBC
# paragraphs a knob certified on 1,000 input rows ran 2.67x against 2.15x for one certified on 325 dev rows
# (1.24x), on 4,000 rows 2.88x (issue 40's table); a sample smaller than the stored knob's certification
# chooses a slower knob than it (a looser bound), so it does not pay
AUTO_SHARE = 0.05
AUTO_MIN_ROWS = 1000
AUTO_MAX_ROWS = 4000


def auto_sample_rows(input_rows: int) -> int:
    """The size of `--calibrate-rows auto`'s sample for an input of `input_rows` rows (before it is weighed
    against `AUTO_MIN_ROWS` and the stored knob's rows)."""
    return min(AUTO_MAX_ROWS, int(input_rows * AUTO_SHARE))


def auto_calibration_rows(input_rows: int, stored_rows: int = 0) -> int:
    """The rows `--calibrate-rows auto` calibrates on for an input of `input_rows` rows, given that the stored
    knob was certified on `stored_rows` (0: it was not); 0: too few to pay for a calibration (the model's
    stored knob is kept)."""
    rows = auto_sample_rows(input_rows)
    return rows if rows >= max(AUTO_MIN_ROWS, stored_rows) else 0


def auto_kept_reason(input_rows: int, stored_rows: int = 0) -> str:
    """Why `--calibrate-rows auto` kept the stored knob on an input of `input_rows` rows."""
    rows = auto_sample_rows(input_rows)
    if rows >= AUTO_MIN_ROWS:
        why = (
            f"a sample of {rows:,} rows ({AUTO_SHARE:.0%} of the input's {input_rows:,}) would certify less "
            f"tightly than the stored knob's {stored_rows:,} rows"
        )
    else:
        why = (
            f"the input's {input_rows:,} rows are too few to pay for a calibration (auto calibrates on "
            f"{AUTO_SHARE:.0%} of an input of >= {round(AUTO_MIN_ROWS / AUTO_SHARE):,} rows, at most "
            f"{AUTO_MAX_ROWS:,})"
        )
    return (
        f"--calibrate-rows auto kept the model's stored knob: {why}; give --calibrate-rows N to calibrate "
        "anyway"
    )


def calibrate(
    model: EarlyExitClassifier,
    texts: list[str],
    policy: str,
    min_agreement: float,
    delta: float,
    thresholds: tuple[float, ...],
    batch_size: int = 64,
) -> Calibration:
    """The fastest knob of `policy` whose agreement with full depth on the corpus is >= min_agreement with
    confidence 1 - delta, judged on `texts` (see module doc)."""
    if policy not in EXIT_RULES:
        raise ValueError(
            f"calibration needs an early-exit policy (one of {list(EXIT_RULES)}), not {policy!r}"
        )
    if not texts:
        raise ValueError("calibration sample holds no valid text")
    target = ThresholdTarget("retention", min_agreement, delta=delta)
    grid = tuple(sorted({0.0, *thresholds}))
    chosen = certified_setting(model, texts, policy, target, grid, batch_size=batch_size)
    point = chosen.point
    return Calibration(
        policy,
        point.setting.knob,
        min_agreement,
        delta,
        chosen.met,
        point.accuracy,
        float(chosen.bound),
        len(texts),
        point.flops_speedup,
        point.mean_exit_layer,
        chosen.reason,
    )


def calibrate_on_worker(
    model: ModelFiles | ObjectRef | str,
    texts: list[str],
    policy: str,
    min_agreement: float,
    delta: float,
    thresholds: tuple[float, ...],
    batch_size: int,
    cpus: float,
    runtime: str = "fp32",
) -> Calibration:
    """`calibrate` where a scoring actor would run (its CPUs, its GPU when it has one) and in the runtime it
    scores in (`ee_model.runtime`), so the knob is chosen on the logits scoring will see: a Ray task body."""
    model = load_shipped_model(model, runtime, cpus)
    return calibrate(model, texts, policy, min_agreement, delta, thresholds, batch_size)
