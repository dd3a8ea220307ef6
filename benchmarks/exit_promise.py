"""Does the promise hold on unseen rows, and how close to the oracle does it get? (issue 40, part 4)

Per corpus of unseen labeled rows and its trained model: one full-depth pass (fp32) records every exit's
logits; then, for each exit rule and calibration size, `--draws` random samples certify the knob as
`jobs/score.py --calibrate-rows N` does (label-free: the fastest knob whose agreement with full depth is
>= 99 % at 95 % confidence, settings tried safest first, `pipelines.evaluation.thresholds.choose_knob`), and
each choice is scored on the rows outside its sample. Beside them, one row each for:
- the model's stored knob (what the training job certified; `jobs/score.py` with no flags on an input of
  fewer than 20,000 rows, which keeps it);
- a perfect calibration: the fastest knob whose agreement on all rows is >= the target (no bound, no sample).

Columns: agreement with full depth, how often the promise held (agreement >= target on the rows outside the
sample), retention on gold, layer speed-up, and the shares of the **gold oracle** (each row's earliest layer
that is right, `pipelines.evaluation.sweep.oracle_layers`) and of the **agreement oracle** (each row's
earliest layer whose label equals full depth's) that the speed-up reaches (layer speed-up / oracle's).

    python benchmarks/corpora.py --out /tmp/corpora                      # fortunes, spam
    python benchmarks/exit_promise.py --corpus bbc=<bbc model> \\
        --corpus fortunes=<fortunes model>@/tmp/corpora/fortunes/unseen.parquet \\
        --corpus spam=<spam model>@/tmp/corpora/spam/unseen.parquet

`--refit-risk NAME=PARQUET` refits that corpus's exit risk first, on 2,000 evenly spaced texts of the
file (as the training job fits it on its training articles), to compare what the risk is fitted on; the
stored knob's row is then left out (it was certified with the other fit).

A model is a saved model folder or an MLflow model URI (`models:/<name>@champion` with MLFLOW_TRACKING_URI
set). `bbc` without a file: every distinct paragraph and sentence passage of the test articles (stage 1,
stage 2, the exit risk and the training job's certification saw none of them). Writes
benchmarks/results/exit_promise.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import ROOT, write_json

from ee_model import EarlyExitClassifier, ExitSetting, exit_layers
from pipelines.config import EvalConfig, ThresholdTarget
from pipelines.evaluation.passes import SplitPass, texts_pass
from pipelines.evaluation.results import SweepPoint
from pipelines.evaluation.sweep import oracle_layers, point_from_layers, swept_settings
from pipelines.evaluation.thresholds import choose_knob

RESULTS = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One corpus's full-depth pass, and each swept setting's exit layer per row."""

    name: str
    model: EarlyExitClassifier
    gold: SplitPass  # labels: gold
    settings: list[ExitSetting]
    exits: np.ndarray  # (settings, rows) exit layer, 1-based

    @property
    def full_label(self) -> np.ndarray:
        return self.gold.logits[-1].argmax(-1).numpy()

    @functools.cached_property
    def agrees(self) -> np.ndarray:
        """(settings, rows): whether the row's label at its exit equals full depth's."""
        predicted = self.gold.logits.argmax(-1).numpy()  # (L, rows)
        return np.take_along_axis(predicted, self.exits - 1, axis=0) == self.full_label


def bbc_test_pieces() -> pa.Table:
    """Every distinct paragraph and sentence passage of BBC's test articles, gold = the article's label."""
    from pipelines.config import DataConfig
    from pipelines.data import load_labeled_splits
    from pipelines.training.certification import article_pieces

    test = load_labeled_splits(DataConfig()).test
    gold: dict[str, str] = {}
    for text, label in zip(test["text"].to_pylist(), test["label"].to_pylist(), strict=True):
        for piece in article_pieces([text]):
            gold.setdefault(piece, label)
    return pa.table({"text": list(gold), "gold": list(gold.values())})


def load(reference: str, scratch: Path) -> EarlyExitClassifier:
    from pipelines.model_source import resolve_model

    return EarlyExitClassifier.from_pretrained(resolve_model(reference, scratch).directory).eval()


def record(name: str, model: EarlyExitClassifier, table: pa.Table, rules: list[str]) -> Recorded:
    labels = list(model.config.labels)
    unknown = sorted(set(table["gold"].to_pylist()) - set(labels))
    if unknown:
        raise SystemExit(f"{name}: gold labels {unknown} are not the model's {labels}")
    gold = np.array([labels.index(label) for label in table["gold"].to_pylist()])
    texts = table["text"].to_pylist()
    order = np.argsort(-model.tokenize(texts).lengths, kind="stable")  # longest first: less padding
    ordered = texts_pass(model, [texts[i] for i in order], gold[order], mixed_precision=False)
    back = torch.from_numpy(np.argsort(order))
    split = SplitPass(ordered.logits[:, back], ordered.labels[back], ordered.tokens[back.numpy()])
    settings = [s for s in swept_settings(model, EvalConfig().thresholds) if s.policy in rules]
    exits = np.stack([exit_layers(split.logits, model.exit_policy(s)).numpy() for s in settings])
    return Recorded(name, model, split, settings, exits)


def certified(recorded: Recorded, sample: np.ndarray, rule: str, target: ThresholdTarget) -> int:
    """Index (into `recorded.settings`) of the knob `choose_knob` certifies on `sample`'s agreement."""
    kept = recorded.agrees[:, sample].sum(1)
    n = len(sample)
    points = [
        SweepPoint(s.policy, s.knob, 0, 0, 0, n, n, int(k), 0, 0, 0)
        for s, k in zip(recorded.settings, kept, strict=True)
        if s.policy == rule
    ]
    chosen = choose_knob(points, rule, target)
    return recorded.settings.index(chosen.point.setting)


def perfectly_calibrated(recorded: Recorded, rule: str, target: float) -> int:
    """The fastest knob whose agreement on every row is >= `target` (walked safest first, as the bound is)."""
    agree = recorded.agrees.mean(1)
    ordered = sorted(
        (i for i, s in enumerate(recorded.settings) if s.policy == rule),
        key=lambda i: recorded.settings[i].eagerness,
    )
    best = ordered[0]
    for i in ordered:
        if agree[i] < target:
            break
        best = i
    return best


def scored(recorded: Recorded, layers: np.ndarray, rows: np.ndarray, target: float) -> dict[str, float]:
    """The exit at `layers` (per row of `rows`) scored on `rows`."""
    split = SplitPass(recorded.gold.logits[:, rows], recorded.gold.labels[rows], recorded.gold.tokens[rows])
    full = recorded.full_label[rows]
    at_exit = split.logits[torch.from_numpy(layers) - 1, torch.arange(len(rows))].argmax(-1).numpy()
    agreement = float((at_exit == full).mean())
    point = point_from_layers(recorded.model, split, torch.from_numpy(layers), "", None)
    gold_oracle = point_from_layers(recorded.model, split, oracle_layers(split), "", None).layer_speedup
    agree_split = SplitPass(split.logits, torch.from_numpy(full), split.tokens)
    agreement_oracle = point_from_layers(
        recorded.model, agree_split, oracle_layers(agree_split), "", None
    ).layer_speedup
    return {
        "agreement": agreement,
        "held": float(agreement >= target),
        "retention": point.retention,
        "layer_speedup": point.layer_speedup,
        "share_of_gold_oracle": point.layer_speedup / gold_oracle,
        "share_of_agreement_oracle": point.layer_speedup / agreement_oracle,
        "gold_oracle": gold_oracle,
        "agreement_oracle": agreement_oracle,
    }


def mean_of(draws: list[dict[str, float]]) -> dict[str, float]:
    out = {key: float(np.mean([d[key] for d in draws])) for key in draws[0]}
    out["held"] = int(sum(d["held"] for d in draws))
    out["draws"] = len(draws)
    return out


def refit_risk(model: EarlyExitClassifier, path: str) -> None:
    """`model`'s exit risk fitted anew on `EvalConfig().exit_risk_rows` evenly spaced texts of `path`."""
    from pipelines.data import evenly_spaced_rows
    from pipelines.evaluation.final import fitted_exit_risk

    texts = pq.read_table(path, columns=["text"])["text"].to_pylist()
    chosen = [texts[i] for i in evenly_spaced_rows(len(texts), EvalConfig().exit_risk_rows)]
    model.config = model.config.replace(exit_risk=fitted_exit_risk(model, chosen))


def corpus_rows(
    recorded: Recorded,
    rules: list[str],
    sizes: list[int],
    draws: int,
    target: ThresholdTarget,
    stored_row: bool = True,
):
    n = recorded.exits.shape[1]
    everything = np.arange(n)
    rows = []
    if stored_row:
        stored = recorded.model.config.setting()
        stored_layers = exit_layers(recorded.gold.logits, recorded.model.exit_policy(stored)).numpy()
        rows.append(
            {"corpus": recorded.name, "rule": stored.policy, "calibrated_on": f"stored knob {stored.knob:g}",
             **mean_of([scored(recorded, stored_layers, everything, target.min_retention)])}
        )  # fmt: skip
    for rule in rules:
        perfect = perfectly_calibrated(recorded, rule, target.min_retention)
        rows.append(
            {"corpus": recorded.name, "rule": rule, "calibrated_on": f"all {n} rows, no bound",
             **mean_of([scored(recorded, recorded.exits[perfect], everything, target.min_retention)])}
        )  # fmt: skip
        for size in sizes:
            if size > n // 2:
                print(
                    f"{recorded.name}: {size} calibration rows is over half the {n} rows; skipped", flush=True
                )
                continue
            results = []
            for draw in range(draws):
                order = np.random.default_rng([draw, size]).permutation(n)
                sample, rest = order[:size], order[size:]
                chosen = certified(recorded, sample, rule, target)
                results.append(scored(recorded, recorded.exits[chosen][rest], rest, target.min_retention))
            rows.append(
                {"corpus": recorded.name, "rule": rule, "calibrated_on": f"{size} rows", **mean_of(results)}
            )
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| corpus | rule | knob certified on | agreement | promise held | retention (gold) | layer speed-up "
        "| share of gold oracle | share of agreement oracle |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(
        f"| {r['corpus']} | {r['rule']} | {r['calibrated_on']} | {r['agreement']:.4f} | "
        f"{r['held']}/{r['draws']} | {r['retention']:.4f} | {r['layer_speedup']:.2f}x | "
        f"{r['share_of_gold_oracle']:.3f} | {r['share_of_agreement_oracle']:.3f} |"
        for r in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", action="append", required=True, help="NAME=MODEL[@PARQUET] (text, gold)")
    parser.add_argument("--refit-risk", action="append", default=[], help="NAME=PARQUET (text)")
    parser.add_argument("--rules", nargs="+", default=["risk", "entropy"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[325, 1000, 2000, 4000])
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "exit_promise"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = ThresholdTarget("retention", args.min_agreement, delta=args.delta)
    rows, corpora = [], {}
    refits = dict(spec.split("=", 1) for spec in args.refit_risk)
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.corpus:
            name, _, rest = spec.partition("=")
            reference, _, path = rest.partition("@")
            table = pq.read_table(path, columns=["text", "gold"]) if path else bbc_test_pieces()
            model = load(reference, Path(scratch))
            if name in refits:
                refit_risk(model, refits[name])
            rules = [r for r in args.rules if r != "risk" or model.config.exit_risk is not None]
            recorded = record(name, model, table, rules)
            corpora[name] = {"model": reference, "rows": table.num_rows, "path": path or "BBC test articles",
                             "full_depth_accuracy": recorded.gold.full_accuracy,
                             "risk_refitted_on": refits.get(name)}  # fmt: skip
            rows += corpus_rows(recorded, rules, args.sizes, args.draws, target, name not in refits)
            print(markdown([r for r in rows if r["corpus"] == name]), flush=True)
    table_md = markdown(rows)
    record_json = {
        "corpora": corpora,
        "target": dataclasses.asdict(target),
        "draws": args.draws,
        "rows": rows,
    }
    write_json(f"{args.out}.json", record_json)
    Path(f"{args.out}.md").write_text(table_md + "\n")
    print(f"\n{table_md}\nwritten: {args.out}.json, {args.out}.md")


if __name__ == "__main__":
    main()
