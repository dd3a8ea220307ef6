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

The sample is drawn uniformly at random, without replacement, from all the inputs' rows (across files and
row groups) with a recorded seed: the bound speaks of the corpus only if the sample is random with respect to
it, and an evenly spaced sample of a corpus in periodic order (fixed-size documents, templated records,
interleaved sources) is not (docs/results.md). Only the row groups that hold sampled rows are read, so
calibrating costs one full-depth pass over `rows` texts whatever the corpus size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ee_model import EarlyExitClassifier, ExitSetting
from ee_model.policies import EXIT_RULES
from ee_model.texts import invalid_text_reasons
from pipelines.config import ThresholdTarget
from pipelines.errors import UserError
from pipelines.evaluation.passes import SplitPass, texts_pass
from pipelines.evaluation.results import ChosenSetting, SweepPoint
from pipelines.evaluation.sweep import sweep
from pipelines.evaluation.thresholds import choose_knob, lower_bound, safest_first
from pipelines.model_source import ModelFiles, load_shipped_model
from pipelines.text_column import column_texts

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


def auto_calibration_rows(input_rows: int, stored_rows: int = 0) -> int:
    """The rows `--calibrate-rows auto` calibrates on for an input of `input_rows` rows, given that the stored
    knob was certified on `stored_rows` (0: it was not); 0: too few to pay for a calibration (the model's
    stored knob is kept)."""
    rows = min(AUTO_MAX_ROWS, int(input_rows * AUTO_SHARE))
    return rows if rows >= max(AUTO_MIN_ROWS, stored_rows) else 0


def auto_kept_reason(input_rows: int, stored_rows: int = 0) -> str:
    """Why `--calibrate-rows auto` kept the stored knob on an input of `input_rows` rows."""
    rows = min(AUTO_MAX_ROWS, int(input_rows * AUTO_SHARE))
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


def sample_rows(total: int, rows: int, seed: int) -> np.ndarray:
    """`rows` of `total` row numbers drawn uniformly without replacement (all when rows >= total), sorted."""
    if rows >= total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=rows, replace=False))


def sample_texts(files: Sequence[tuple[str, int]], text_column: str, rows: int, seed: int) -> list[str]:
    """The texts of `rows` rows drawn uniformly at random, with `seed`, from the scorable rows of `files`
    ((path, row count) in order): null, empty and non-string texts are never scored, so rows drawn on them
    are replaced by further draws from the rows not drawn yet (fewer only when the files hold fewer). Only
    the row groups holding drawn rows are read."""
    counts = np.array([n for _, n in files], dtype=np.int64)
    total = int(counts.sum())
    wanted = sample_rows(total, rows, seed)
    drawn, texts = wanted, valid_texts(read_rows(files, counts, wanted, text_column))
    rng = np.random.default_rng([seed, 1])
    while len(texts) < rows and len(drawn) < total:
        left = total - len(drawn)
        if left <= 4 * len(drawn):  # few rows left: draw among them directly
            remaining = np.setdiff1d(np.arange(total), drawn, assume_unique=True)
            more = np.sort(rng.choice(remaining, size=min(left, len(drawn)), replace=False))
        else:  # many: draw afresh (as many as drawn so far) and keep the ones not drawn before
            more = np.setdiff1d(np.unique(rng.integers(total, size=len(drawn))), drawn)
        drawn = np.union1d(drawn, more)
        found, need = valid_texts(read_rows(files, counts, more, text_column)), rows - len(texts)
        if len(found) > need:  # the ones needed, drawn among those found
            found = [found[i] for i in np.sort(rng.choice(len(found), size=need, replace=False))]
        texts += found
    return texts


def valid_texts(texts: list) -> list[str]:
    """The scorable ones of `texts`, in order."""
    return [t for t, reason in zip(texts, invalid_text_reasons(texts), strict=True) if reason is None]


def read_rows(
    files: Sequence[tuple[str, int]], counts: np.ndarray, wanted: np.ndarray, text_column: str
) -> list:
    """The `text_column` values of the rows numbered `wanted` (sorted, over all rows of `files` in order),
    reading only the row groups that hold them."""
    starts = np.concatenate([[0], np.cumsum(counts)])
    texts: list = []
    for f, (path, _) in enumerate(files):
        local = wanted[(wanted >= starts[f]) & (wanted < starts[f + 1])] - starts[f]
        if not len(local):
            continue
        parquet = pq.ParquetFile(path)
        group_starts = np.cumsum(
            [0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        )
        group_of = np.searchsorted(group_starts, local, side="right") - 1  # the row group of each sampled row
        groups = np.unique(group_of)
        try:
            column = parquet.read_row_groups(groups.tolist(), columns=[text_column])[text_column]
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"cannot read the calibration sample from {path!r}: {error}") from None
        read_starts = np.cumsum(np.concatenate([[0], np.diff(group_starts)[groups]]))[:-1]  # in `column`
        positions = read_starts[np.searchsorted(groups, group_of)] + (local - group_starts[group_of])
        texts.extend(column_texts(column.take(positions)))
    return texts


def agreement_pass(model: EarlyExitClassifier, texts: list[str], batch_size: int = 64) -> SplitPass:
    """One full-depth pass whose `labels` are the full model's own predictions (agreement = accuracy), in the
    precision the scorer runs (no autocast), so the chosen knob is measured on the logits scoring will see.

    Rows run longest first in batches of `batch_size`, as the scorer's exit engine takes them: with int8
    layers a row's result depends on its batch-mates (activations are scaled per call), and unsorted batches
    (more padding, other mates) disagree with the scorer's full depth where sorted ones match it
    (docs/results.md, "Measurements the code refers to"); fp32 is the same either way. The pass is returned
    in input order."""
    order = np.argsort(-model.tokenize(texts).lengths, kind="stable")
    ordered = [texts[i] for i in order]
    recorded = texts_pass(model, ordered, np.zeros(len(texts), np.int64), batch_size, mixed_precision=False)
    back = torch.from_numpy(np.argsort(order))  # sorted position of each input row
    logits = recorded.logits[:, back]
    return SplitPass(logits, logits[-1].argmax(-1), recorded.tokens[back.numpy()])


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
    split = agreement_pass(model, texts, batch_size)
    points = [p for p in sweep(model, split, tuple(sorted({0.0, *thresholds}))) if p.policy == policy]
    target = ThresholdTarget("retention", min_agreement, delta=delta)
    chosen = choose_knob(points, policy, target)
    if not model.runtime.exact_per_row:
        chosen = checked_in_the_engine(model, texts, split, points, chosen, target, batch_size)
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


def checked_in_the_engine(
    model: EarlyExitClassifier,
    texts: list[str],
    split: SplitPass,
    points: list[SweepPoint],
    chosen: ChosenSetting,
    target: ThresholdTarget,
    batch_size: int,
) -> ChosenSetting:
    """`chosen` re-measured where the scorer runs it, for every runtime but fp32: the sweep replays every exit
    from one full-depth pass, but an int8 row's logits depend on its batch-mates (and a bf16 row's last bits
    on the shape of its batch), which change as rows leave the engine (the replay overstates the engine's
    agreement: docs/results.md, "Measurements the code refers to"). So the chosen knob runs
    through the exit engine on the sample; while its bound misses the target the next safer knob is tried
    (the safest, full depth in the engine's batching, agrees by construction)."""
    if not chosen.met:
        return chosen
    ordered = safest_first(points, chosen.point.policy)
    reference, n = split.labels.numpy(), len(texts)
    full_flops = float(model.flops_model.full_depth_flops(split.tokens).sum())
    token_ids = model.tokenize(texts)  # once for every setting tried
    for point in reversed(ordered[: ordered.index(chosen.point) + 1]):
        out = model.predict_tokens(token_ids, setting=point.setting, batch_size=batch_size)
        kept = int((out.label_id == reference).sum())
        bound = lower_bound(kept, n, target.delta)
        if bound >= target.min_retention:
            mean_exit = float(out.exit_layer.mean())
            measured = replace(
                point,
                accuracy=kept / n,
                retention=kept / n,
                kept=kept,
                mean_exit_layer=mean_exit,
                layer_speedup=model.n_layers / mean_exit,
                flops_speedup=full_flops / float(out.flops.sum()),
            )
            steps = ordered.index(chosen.point) - ordered.index(point)
            reason = (
                f"{bound:.4f} >= {target.min_retention:g} at confidence {1 - target.delta:g}, measured in "
                f"the exit engine ({steps} setting(s) safer than the replayed sweep's {chosen.point.setting})"
            )
            return replace(chosen, point=measured, reason=reason, bound=bound)
    return chosen  # not reached: the safest setting agrees with the pass on every row


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
