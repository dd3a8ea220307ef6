"""Does the automatic knob keep its promise on data it was not chosen on? Fixed-sequence testing with a
Clopper-Pearson bound (what training and `--calibrate-rows` now do) against the point estimate (what they
did).

For a trained model, the rows it never trained on (its dev + test splits, rebuilt from the same data config)
are pooled, then split again at random `--resamples` times into a dev set of the configured dev size and a
held-out rest. Each rule chooses S on the dev set; the held-out rest says whether the promise held there:
- labeled (training): early-exit accuracy >= `target` x full-depth accuracy (and the kept share: of the rows
  full depth gets right, the share the early exit gets right too, the statistic the bound is about);
- label-free (`jobs/score.py --calibrate-rows`): agreement with full depth >= `target`, calibrating on
  `--calibrate-rows` texts (BBC: paragraphs of the pooled articles; another corpus: the pooled texts) and
  checking on the others.
One full-depth pass each; every choice after that is arithmetic on recorded logits, so it costs seconds.

    python benchmarks/promise_check.py --model models:/early-exit-classifier@candidate --name bbc
    python benchmarks/promise_check.py --model DIR --train-path docstrings.parquet --name docstrings

Prints the tables over the first 5 resamples and over all `--resamples`; writes
benchmarks/results/promise_check_<name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scipy.stats import binomtest  # noqa: E402

from ee_model import EarlyExitClassifier, ExitSetting  # noqa: E402
from pipelines.bbc import split_paragraphs  # noqa: E402
from pipelines.config import (  # noqa: E402
    S_GRID,
    DataConfig,
    ThresholdTarget,  # noqa: E402
)
from pipelines.data import load_labeled_splits  # noqa: E402
from pipelines.evaluation.passes import SplitPass, full_pass  # noqa: E402
from pipelines.evaluation.sweep import oracle_point, policy_point, swept_settings  # noqa: E402
from pipelines.evaluation.thresholds import choose_knob, safest_first  # noqa: E402
from pipelines.model_source import resolve_model  # noqa: E402
from pipelines.scoring.calibration import agreement_pass  # noqa: E402


def subset(split: SplitPass, rows: np.ndarray) -> SplitPass:
    index = torch.as_tensor(rows)
    return SplitPass(split.logits[:, index], split.labels[index], split.tokens[rows])


def point_estimate_knob(points: list[dict], rule: str, target: float) -> float:
    """The rule before the bound: the end of the run of settings, safest first, whose measured retention >=
    target."""
    chosen = None
    for point in safest_first(points, rule):
        if point.retention < target:
            break
        chosen = point
    return (chosen or safest_first(points, rule)[0]).knob


def sweep_of(model: EarlyExitClassifier, split: SplitPass, policy: str) -> list[dict]:
    settings = [s for s in swept_settings(model, S_GRID) if s.policy == policy]
    return [policy_point(model, split, setting) for setting in settings]


def held_out(model, split: SplitPass, policy: str, knob) -> dict:
    point = policy_point(model, split, ExitSetting(policy, knob))
    oracle = oracle_point(model, split)
    upper = binomtest(point.kept, point.full_correct, alternative="less").proportion_ci(0.95).high
    return {
        "knob": knob,
        "retention": point.retention,
        "kept_share": point.kept / max(point.full_correct, 1),
        "kept_share_upper_95": float(upper),
        "layer_speedup": point.layer_speedup,
        "share_of_oracle": point.layer_speedup / oracle.layer_speedup,
    }


def resampled(
    model, split: SplitPass, choose_rows: int, resamples: int, target: ThresholdTarget, seed: int
) -> list:
    """Per resample: the knob each rule chooses on `choose_rows` random rows, measured on the rest."""
    policy = model.config.policy
    rng = np.random.default_rng(seed)
    results = []
    for r in range(resamples):
        order = rng.permutation(split.labels.numel())
        choose, rest = subset(split, order[:choose_rows]), subset(split, order[choose_rows:])
        points = sweep_of(model, choose, policy)
        bound = choose_knob(points, policy, target)
        rules = {
            "point estimate": point_estimate_knob(points, policy, target.min_retention),
            "bound": bound.point.knob,
        }
        for rule, knob in rules.items():
            results.append(
                {
                    "resample": r,
                    "rule": rule,
                    "chosen_on": choose_rows,
                    "held_out": len(order) - choose_rows,
                    "met_on_dev": bound.met if rule == "bound" else None,
                    **held_out(model, rest, policy, knob),
                }
            )
    return results


def summarise(rows: list[dict], target: float, resamples: int) -> list[dict]:
    """Per rule over the first `resamples`: how often the held-out measurement met the target, how often it
    was clearly below it (its one-sided 95 % upper bound under the target: the held-out rows are finite
    too)."""
    table = []
    for rule in ("point estimate", "bound"):
        mine = [r for r in rows if r["rule"] == rule and r["resample"] < resamples]
        table.append(
            {
                "rule": rule,
                "resamples": len(mine),
                "held": sum(r["retention"] >= target for r in mine),
                "kept_share_held": sum(r["kept_share"] >= target for r in mine),
                "clearly_failed": sum(r["kept_share_upper_95"] < target for r in mine),
                "min_retention": min(r["retention"] for r in mine),
                "mean_knob": float(np.mean([r["knob"] for r in mine])),
                "mean_layer_speedup": float(np.mean([r["layer_speedup"] for r in mine])),
                "mean_share_of_oracle": float(np.mean([r["share_of_oracle"] for r in mine])),
            }
        )
    return table


def print_table(title: str, table: list[dict]) -> None:
    print(f"\n{title}")
    print(
        "| rule | resamples | held (retention) | held (kept share) | clearly failed | min retention | "
        "mean S | "
        "layer speed-up | share of oracle |\n|---|---|---|---|---|---|---|---|---|"
    )
    for t in table:
        print(
            f"| {t['rule']} | {t['resamples']} | {t['held']} | {t['kept_share_held']} | "
            f"{t['clearly_failed']} | "
            f"{t['min_retention']:.4f} | {t['mean_knob']:.3f} | {t['mean_layer_speedup']:.2f}x | "
            f"{t['mean_share_of_oracle']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model directory or MLflow model URI")
    parser.add_argument("--name", required=True, help="corpus name for the results file")
    parser.add_argument("--train-path", default=None, help="the training job's --train-path (default BBC)")
    parser.add_argument("--cache-dir", default=".ee_data")
    parser.add_argument("--resamples", type=int, default=5)
    parser.add_argument("--calibrate-rows", type=int, default=1000)
    parser.add_argument("--target", type=float, default=0.99)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    target = ThresholdTarget(min_retention=args.target, delta=args.delta)
    with tempfile.TemporaryDirectory() as scratch:
        model = EarlyExitClassifier.from_pretrained(resolve_model(args.model, Path(scratch)).directory)
    data = DataConfig(train_path=args.train_path, cache_dir=args.cache_dir)  # the training job's split
    splits = load_labeled_splits(data)
    pool = pa.concat_tables([splits.dev, splits.test])
    labeled = resampled(model, full_pass(model, pool), splits.dev.num_rows, args.resamples, target, args.seed)
    articles = pool.append_column("doc_id", pa.array(range(pool.num_rows)))
    texts = (split_paragraphs(articles) if args.train_path is None else pool)["text"].to_pylist()
    calibrate_rows = min(args.calibrate_rows, len(texts) // 2)
    agreement = resampled(
        model, agreement_pass(model, texts), calibrate_rows, args.resamples, target, args.seed
    )
    result = {
        "model": args.model,
        "corpus": args.name,
        "policy": model.config.policy,
        "target": args.target,
        "delta": args.delta,
        "pooled_rows": pool.num_rows,
        "dev_rows": splits.dev.num_rows,
        "calibration_texts": len(texts),
        "calibrate_rows": calibrate_rows,
        "labeled": {"rows": labeled},
        "label_free": {"rows": agreement},
    }
    for counted in sorted({min(5, args.resamples), args.resamples}):
        result["labeled"][f"table_{counted}"] = summarise(labeled, args.target, counted)
        result["label_free"][f"table_{counted}"] = summarise(agreement, args.target, counted)
        print_table(
            f"{args.name}, labeled: S chosen on {splits.dev.num_rows} dev rows, checked on the other "
            f"{pool.num_rows - splits.dev.num_rows} (target {args.target:g}, delta {args.delta:g})",
            result["labeled"][f"table_{counted}"],
        )
        print_table(
            f"{args.name}, label-free: S calibrated on {calibrate_rows} texts, agreement checked on the "
            f"other {len(texts) - calibrate_rows}",
            result["label_free"][f"table_{counted}"],
        )
    out = ROOT / "benchmarks" / "results" / f"promise_check_{args.name}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
