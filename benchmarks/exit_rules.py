"""Exit rules beyond one global entropy S, replayed on a trained model's dev and test logits (issue 18, first
step: which rules could pay, before any becomes a policy).

One full-depth pass over the model's dev and test splits records every exit's logits; each rule is a family of
settings ordered from the safest to the most eager, and each family is chosen on dev two ways:
  - bounded: the training job's rule (fixed-sequence testing, one-sided Clopper-Pearson bound of the kept
    share >= 0.99 at confidence 0.95: `pipelines.evaluation.thresholds`), the promise the job makes;
  - point: the most eager setting whose dev retention is >= 0.99 (no bound; what issue 6 reported).
Reported on test: retention, layer speed-up and its share of the oracle's.

Rules: entropy S (today's); per-head temperature (fitted on dev by NLL) + one S; per-layer thresholds S_l set
to the q-quantile of layer l's dev entropies (one knob q, label-free ordering); entropy OR the prediction
unchanged for t layers in a row; entropy AND agreement with the previous exit; tempered max probability.

    python benchmarks/exit_rules.py --model models:/early-exit-classifier@candidate
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ee_model import EarlyExitClassifier  # noqa: E402
from ee_model.policies import normalised_entropy  # noqa: E402
from pipelines.config import S_GRID, load_train_config  # noqa: E402
from pipelines.data import load_labeled_splits  # noqa: E402
from pipelines.evaluation.passes import SplitPass, full_pass  # noqa: E402
from pipelines.evaluation.sweep import oracle_point, point_from_layers  # noqa: E402
from pipelines.evaluation.thresholds import lower_bound  # noqa: E402
from pipelines.model_source import resolve_model  # noqa: E402

Rule = Callable[[SplitPass], torch.Tensor]  # a split's recorded pass -> each row's exit layer (1-based)


def first_allowed(may_exit: torch.Tensor) -> torch.Tensor:
    """(L - 1, n) bool, whether a row may leave after each student -> its exit layer (the teacher if none)."""
    allowed = torch.cat([may_exit, torch.ones(1, may_exit.shape[1], dtype=torch.bool)])
    return allowed.float().argmax(dim=0) + 1


def entropies(split: SplitPass, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    logits = split.logits if temperatures is None else split.logits / temperatures.view(-1, 1, 1)
    return torch.stack([normalised_entropy(layer) for layer in logits])  # (L, n)


def fitted_temperatures(split: SplitPass) -> torch.Tensor:
    """Per exit head, the temperature minimising the NLL of the gold labels (a grid over 0.2-5)."""
    grid = torch.exp(torch.linspace(math.log(0.2), math.log(5), 81))
    best = []
    for logits in split.logits:
        nll = [torch.nn.functional.cross_entropy(logits / t, split.labels).item() for t in grid]
        best.append(float(grid[int(np.argmin(nll))]))
    return torch.tensor(best)


def unchanged_run(split: SplitPass) -> torch.Tensor:
    """(L, n): for how many layers in a row each row's prediction has stayed the same (0 at layer 1)."""
    predictions = split.logits.argmax(-1)
    runs = [torch.zeros_like(predictions[0])]
    for layer in range(1, len(predictions)):
        same = predictions[layer] == predictions[layer - 1]
        runs.append(torch.where(same, runs[-1] + 1, torch.zeros_like(runs[-1])))
    return torch.stack(runs)


def families(dev: SplitPass) -> dict[str, list[tuple[float, Rule]]]:
    """Each rule's settings, safest first."""
    grid = sorted({0.0, *S_GRID})
    temperatures = fitted_temperatures(dev)
    dev_entropy = entropies(dev)[:-1]

    def entropy(s: float) -> Rule:
        return lambda split: first_allowed(entropies(split)[:-1] < s)

    def tempered(s: float) -> Rule:
        return lambda split: first_allowed(entropies(split, temperatures)[:-1] < s)

    def quantile(q: float) -> Rule:
        thresholds = torch.quantile(dev_entropy, q, dim=1) if q > 0 else torch.zeros(len(dev_entropy))
        return lambda split: first_allowed(entropies(split)[:-1] < thresholds.view(-1, 1))

    def entropy_or_run(s: float, t: int) -> Rule:
        return lambda split: first_allowed(((entropies(split) < s) | (unchanged_run(split) >= t))[:-1])

    def entropy_and_agreement(s: float) -> Rule:
        return lambda split: first_allowed(((entropies(split) < s) & (unchanged_run(split) >= 1))[:-1])

    def max_probability(s: float) -> Rule:
        def rule(split: SplitPass) -> torch.Tensor:
            probs = torch.softmax(split.logits / temperatures.view(-1, 1, 1), dim=-1)
            return first_allowed((probs.max(-1).values > 1 - s)[:-1])

        return rule

    return {
        "entropy S (today)": [(s, entropy(s)) for s in grid],
        "temperature per head + S": [(s, tempered(s)) for s in grid],
        "per-layer S_l = dev quantile q": [(float(q), quantile(float(q))) for q in np.linspace(0, 1, 101)],
        "entropy S OR same 2 in a row": [(s, entropy_or_run(s, 2)) for s in grid],
        "entropy S OR same 3 in a row": [(s, entropy_or_run(s, 3)) for s in grid],
        "entropy S AND same as previous": [(s, entropy_and_agreement(s)) for s in grid],
        "tempered max probability > 1 - S": [(s, max_probability(s)) for s in grid],
    }


def choose(model, dev: SplitPass, family: list[tuple[float, Rule]], bounded: bool) -> tuple[float, Rule]:
    chosen = family[0]
    for knob, rule in family:
        point = point_from_layers(model, dev, rule(dev), "rule", None)
        if bounded:
            passes = lower_bound(point.kept, point.full_correct, 0.05) >= 0.99
            if not passes:
                break  # fixed-sequence testing: stop at the first failure
        elif point.retention < 0.99:
            continue
        chosen = (knob, rule)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a trained early-exit model: dir or MLflow URI")
    parser.add_argument("--out", default="benchmarks/results/exit_rules.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = load_train_config()
    splits = load_labeled_splits(config.data)
    with tempfile.TemporaryDirectory() as scratch:
        model = EarlyExitClassifier.from_pretrained(resolve_model(args.model, Path(scratch)).directory)
    dev, test = full_pass(model, splits.dev), full_pass(model, splits.test)
    oracle = oracle_point(model, test)
    n_right = int((dev.logits[-1].argmax(-1) == dev.labels).sum())
    print(
        f"dev {dev.labels.numel()} rows ({n_right} right at full depth: the bound at 0.99 / 0.95 allows "
        f"{sum(lower_bound(n_right - k, n_right, 0.05) >= 0.99 for k in range(1, n_right))} loss(es)); "
        f"test oracle {oracle.layer_speedup:.2f}x\n"
    )
    print("| rule | choice | knob | test retention | test layer speed-up | share of oracle |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, family in families(dev).items():
        for bounded in (True, False):
            knob, rule = choose(model, dev, family, bounded)
            point = point_from_layers(model, test, rule(test), "rule", None)
            row = {
                "rule": name,
                "choice": "bounded" if bounded else "point",
                "knob": knob,
                "test_retention": point.retention,
                "test_layer_speedup": point.layer_speedup,
                "share_of_oracle": point.layer_speedup / oracle.layer_speedup,
            }
            rows.append(row)
            print(
                f"| {name} | {row['choice']} | {knob:g} | {point.retention:.3f} | "
                f"{point.layer_speedup:.2f}x | {row['share_of_oracle']:.3f} |",
                flush=True,
            )
    result = {
        "model": args.model,
        "dev_rows": dev.labels.numel(),
        "oracle": oracle.layer_speedup,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
