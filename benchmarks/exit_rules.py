"""Exit rules beyond one global entropy S, on several corpora and student seeds (issue 18).

Per corpus, a model trained by `jobs/train.py` (KL variant): the job's `FeatureExtractor` caches what every
student sees (training split + the job's unlabeled corpus, dev, test) once; then for each seed fresh students
are trained from those features the way the job's stage 2 trains them (`benchmarks/stage2_budget.py`'s
`train_students`), and every rule is replayed on that seed's dev and test logits. Each rule is a family of
settings ordered from the safest to the most eager, chosen on dev two ways:
  - bounded: the training job's rule (fixed-sequence testing, one-sided Clopper-Pearson bound of the kept
    share >= 0.99 at confidence 0.95: `pipelines.evaluation.thresholds`), the promise the job makes;
  - point: the most eager setting whose dev retention is >= 0.99 (no bound; what issue 6 reported).
Reported on test: retention (the promise holds when >= 0.99), layer speed-up and its share of the oracle's.

Rules:
  - entropy S: today's policy (`ee_model.policies.EntropyPolicy`);
  - risk r: the "risk" policy (`ee_model.policies.RiskPolicy`): per student layer, a logistic fit of "this
    exit disagrees with the last" on its entropy and top-2 margin, without labels, on the training split's
    logits (<= 2,000 rows, as the job); a row leaves where its layer's fitted risk < r. Also fitted on entropy
    only (one entropy threshold per layer) and on the job's unlabeled corpus instead;
  - temperature per head (fitted on dev by NLL) + S;
  - per-layer S_l = q-quantile of layer l's dev entropies (one knob q);
  - entropy S OR the prediction unchanged for 2 layers in a row;
  - entropy S AND the same prediction as the previous exit;
  - tempered max probability > 1 - S;
  - learned exit predictors (PCEE-BERT / BEEM style): per-layer logistic regressions over subsets of entropy,
    max probability, top-2 margin and agreement with the previous exit, fitted like the risk policy (and once
    on dev itself), knob r.
Then the cost of the signals: FLOPs per row per layer and the wall-clock of one policy step next to one
transformer layer's.

    python benchmarks/docstring_corpus.py --out data/docstrings.parquet   # and --by subpackage
    python jobs/train.py --train-path data/docstrings.parquet              # a model per corpus
    python benchmarks/exit_rules.py --fine-grid --corpus bbc=models:/early-exit-classifier@candidate \\
        --corpus docstrings=<model>@data/docstrings.parquet --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stage2_budget import UNLABELED, extract, split_pass, train_students  # noqa: E402

from ee_model import EarlyExitClassifier, encoders, exit_layers  # noqa: E402
from ee_model.exit_risk import ExitRisk  # noqa: E402
from ee_model.flops import transformer_layer_flops  # noqa: E402
from ee_model.policies import EntropyPolicy, RiskPolicy  # noqa: E402
from ee_model.signals import normalised_entropy  # noqa: E402
from pipelines.config import RISK_GRID, S_GRID, load_train_config  # noqa: E402
from pipelines.data import default_unlabeled_corpus, evenly_spaced_rows, load_labeled_splits  # noqa: E402
from pipelines.evaluation.exit_risk import fit_exit_risk  # noqa: E402
from pipelines.evaluation.passes import SplitPass  # noqa: E402
from pipelines.evaluation.sweep import oracle_point, point_from_layers  # noqa: E402
from pipelines.evaluation.thresholds import lower_bound  # noqa: E402
from pipelines.feature_batches import LABEL_COLUMN  # noqa: E402
from pipelines.model_source import resolve_model  # noqa: E402
from pipelines.training.features import FeatureExtractor  # noqa: E402

Rule = Callable[[SplitPass], torch.Tensor]  # a split's recorded pass -> each row's exit layer (1-based)
RISK_ROWS = 2000  # training rows the risk fits see, as the job's eval.exit_risk_rows
BASELINE = "entropy S (today)"


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


def exit_signals(split: SplitPass) -> torch.Tensor:
    """(L - 1, n, 4) per student: entropy, max probability, top-2 margin, same prediction as the previous."""
    probs = torch.softmax(split.logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    agree = (unchanged_run(split) > 0).float()
    signals = torch.stack([entropies(split), top2[..., 0], top2[..., 0] - top2[..., 1], agree], dim=-1)
    return signals[:-1]


SIGNALS = ("entropy", "max probability", "margin", "agreement")  # the columns of `exit_signals`


def learned_predictor(fit_on: SplitPass, columns: tuple[int, ...]) -> Callable[[SplitPass], torch.Tensor]:
    """Per student layer, a logistic regression of "disagrees with the last exit" on some `exit_signals`
    (`columns`), fitted without labels; returns split -> (L - 1, n) estimated risk."""
    signals, final = exit_signals(fit_on)[..., list(columns)], fit_on.logits[-1].argmax(-1)
    fits = []
    for layer, x in enumerate(signals):
        y = (fit_on.logits[layer].argmax(-1) != final).numpy()
        x = x.numpy()
        if y.all() or not y.any():  # one class only: a constant risk
            fits.append(float(y.mean()))
        else:
            fits.append(LogisticRegression(C=100.0, max_iter=2000).fit(x, y))

    def risk(split: SplitPass) -> torch.Tensor:
        out = []
        for fit, x in zip(fits, exit_signals(split)[..., list(columns)], strict=True):
            if isinstance(fit, float):
                out.append(torch.full((x.shape[0],), fit, dtype=torch.float64))
            else:
                out.append(torch.from_numpy(fit.predict_proba(x.numpy())[:, 1]))
        return torch.stack(out)

    return risk


FINE_S_GRID = tuple(round(0.005 * i, 3) for i in range(201))
COARSE_RISK_GRID = (0.0, *(float(f"{10 ** (-4 + 0.1 * i):.3g}") for i in range(38)), 1.0)


def families(
    dev: SplitPass, train: SplitPass, pool: SplitPass, fine: bool = False
) -> dict[str, list[tuple[float, Rule]]]:
    """Each rule's settings, safest first. `train`, `pool`: logits of the training split and of the job's
    unlabeled corpus (no labels used)."""
    grid = sorted({0.0, *(FINE_S_GRID if fine else S_GRID)})
    risk_grid = RISK_GRID if fine else COARSE_RISK_GRID
    temperatures = fitted_temperatures(dev)
    dev_entropy = entropies(dev)[:-1]
    risks = {
        "risk r, entropy (label-free fit)": fit_exit_risk(train.logits, ("entropy",)),
        "risk r, entropy + margin (label-free fit; the policy)": fit_exit_risk(train.logits),
        "risk r, entropy + margin, fitted on the unlabeled corpus": fit_exit_risk(pool.logits),
    }
    predictors = {
        "learned predictor (entropy, agreement) r": learned_predictor(train, (0, 3)),
        "learned predictor (margin) r": learned_predictor(train, (2,)),
        "learned predictor (entropy, margin, agreement) r": learned_predictor(train, (0, 2, 3)),
        "learned predictor (4 signals) r": learned_predictor(train, (0, 1, 2, 3)),
        "learned predictor (4 signals, fitted on dev) r": learned_predictor(dev, (0, 1, 2, 3)),
    }

    def entropy(s: float) -> Rule:
        return lambda split: exit_layers(split.logits, EntropyPolicy(s))

    def risk(exit_risk: ExitRisk, r: float) -> Rule:
        return lambda split: exit_layers(split.logits, RiskPolicy(exit_risk, r))

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

    def learned(predictor, r: float) -> Rule:
        return lambda split: first_allowed(predictor(split) < r)

    return {
        BASELINE: [(s, entropy(s)) for s in grid],
        **{name: [(r, risk(exit_risk, r)) for r in risk_grid] for name, exit_risk in risks.items()},
        "temperature per head + S": [(s, tempered(s)) for s in grid],
        "per-layer S_l = dev quantile q": [(float(q), quantile(float(q))) for q in np.linspace(0, 1, 101)],
        "entropy S OR same 2 in a row": [(s, entropy_or_run(s, 2)) for s in grid],
        "entropy S AND same as previous": [(s, entropy_and_agreement(s)) for s in grid],
        "tempered max probability > 1 - S": [(s, max_probability(s)) for s in grid],
    } | {name: [(r, learned(predictor, r)) for r in risk_grid] for name, predictor in predictors.items()}


def full_depth(split: SplitPass) -> torch.Tensor:
    return torch.full((split.logits.shape[1],), split.logits.shape[0], dtype=torch.long)


def choose(model, dev: SplitPass, family: list[tuple[float, Rule]], bounded: bool) -> tuple[float, Rule]:
    """The family's chosen setting; full depth (knob nan) when not even its safest one passes."""
    chosen = (math.nan, full_depth)
    for knob, rule in family:
        point = point_from_layers(model, dev, rule(dev), "rule", None)
        if bounded:
            if lower_bound(point.kept, point.full_correct, 0.05) < 0.99:
                break  # fixed-sequence testing: stop at the first failure
        elif point.retention < 0.99:
            continue
        chosen = (knob, rule)
    return chosen


def corpus_features(name: str, model_ref: str, train_path: str | None, scratch: Path, threads: int):
    """The corpus's splits through the job's feature extractor: train (+ the job's unlabeled corpus), dev,
    test; and the stage-1 model."""
    config = load_train_config()
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, train_path=train_path))
    splits = load_labeled_splits(config.data)
    model_dir = resolve_model(model_ref, scratch / name).directory
    base = EarlyExitClassifier.from_pretrained(model_dir).eval()
    extractor = FeatureExtractor(str(model_dir), config.stage2.feature_dtype, cpus=threads)
    labels = base.config.labels
    features, tokens = {}, {}
    for split in ("train", "dev", "test"):
        table = getattr(splits, split)
        ids = np.array([labels.index(x) for x in table["label"].to_pylist()], dtype=np.int64)
        features[split] = extract(extractor, table["text"].to_pylist(), ids)
        tokens[split] = base.tokenize(table["text"].to_pylist()).lengths.astype(np.int64)
    unlabeled = pq.read_table(default_unlabeled_corpus(splits.train, config.data))["text"].to_pylist()
    unlabeled = unlabeled[: config.data.max_unlabeled_rows]
    pool = extract(extractor, unlabeled, np.full(len(unlabeled), UNLABELED, dtype=np.int64))
    features["stage2"] = {k: np.concatenate([features["train"][k], pool[k]]) for k in pool}
    return config, base, features, tokens


def signal_costs(model: EarlyExitClassifier, families_: dict, dev: SplitPass, rows: int = 64) -> dict:
    """Wall-clock of one policy step on `rows` rows next to one transformer layer on `rows` x 64 tokens."""
    hidden = torch.randn(rows, 64, model.flops_model.hidden_size)
    mask = encoders.attention_mask_for(model.encoder, hidden, torch.ones(rows, 64, dtype=torch.long))
    logits = dev.logits[0, :rows]

    def timed(fn, repeats: int = 2000) -> float:
        for _ in range(repeats):  # warm: right after a scikit-learn fit its idle threads still spin
            fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats * 1e6

    n = model.config.num_labels
    flops = model.flops_model
    costs = {
        # per row and student: the entropy (softmax, log, product, sum: ~5 N) is what S already pays; risk
        # adds the top 2 of the same probabilities (~2 N), their difference and 2 multiply-adds; the learned
        # predictor adds the max, an argmax comparison and 4 multiply-adds
        "layer_flops_64_tokens": int(transformer_layer_flops(flops.hidden_size, flops.intermediate_size, 64)),
        "entropy_flops": 5 * n,
        "risk_flops": 7 * n + 5,
        "learned_flops": 8 * n + 10,
    }
    with torch.inference_mode():
        layer_us = timed(lambda: encoders.run_layer(model.layers[0], hidden, mask), 10)
        entropy = EntropyPolicy(0.3)
        risk = RiskPolicy(fit_exit_risk(dev.logits), 0.01)
        risk_state = risk.init_state(rows, logits.device)
        predictor_split = SplitPass(dev.logits[:, :rows], dev.labels[:rows], dev.tokens[:rows])
        learned = dict(families_["learned predictor (4 signals) r"])[0.01]
        return costs | {
            "layer_us": layer_us,
            "entropy_step_us": timed(lambda: entropy.step(logits, {})),
            "risk_step_us": timed(lambda: risk.step(logits, risk_state)),
            # every layer's signals and predictions at once, divided by the students
            "learned_step_us": timed(lambda: learned(predictor_split), 50) / (model.n_layers - 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--corpus",
        action="append",
        required=True,
        help="name=model (BBC, the job's default data) or name=model@train.parquet; repeat per corpus",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--fine-grid",
        action="store_true",
        help="S in steps of 0.005 (the job's: 0.02) and r in steps of 10^0.025 (the job's; else 10^0.1)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/exit_rules.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, costs = [], {}
    print("| corpus | seed | rule | choice | knob | test retention | test layer speed-up | share of oracle |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        for spec in args.corpus:
            name, _, source = spec.partition("=")
            model_ref, _, train_path = source.partition("@")
            config, base, features, tokens = corpus_features(
                name, model_ref, train_path or None, Path(scratch), args.threads
            )
            for seed in args.seeds:
                model, _ = train_students(
                    base, features["stage2"], features["dev"], config.stage2, base.config.head_type, seed
                )
                dev = split_pass(model, features["dev"], tokens["dev"])
                test = split_pass(model, features["test"], tokens["test"])
                sample = evenly_spaced_rows(len(tokens["train"]), RISK_ROWS)
                train_features = {k: v[sample] for k, v in features["train"].items()}
                train = split_pass(model, train_features, tokens["train"][sample])
                oracle = oracle_point(model, test)
                in_pool = np.arange(len(tokens["train"]), len(features["stage2"][LABEL_COLUMN]))
                picked = in_pool[evenly_spaced_rows(len(in_pool), RISK_ROWS)]
                pool_features = {k: v[picked] for k, v in features["stage2"].items()}
                pool = split_pass(model, pool_features, np.zeros(len(picked), dtype=np.int64))
                rules = families(dev, train, pool, args.fine_grid)
                if name not in costs:
                    costs[name] = signal_costs(model, rules, dev)
                for rule_name, family in rules.items():
                    for bounded in (True, False):
                        knob, rule = choose(model, dev, family, bounded)
                        point = point_from_layers(model, test, rule(test), "rule", None)
                        row = {
                            "corpus": name,
                            "seed": seed,
                            "rule": rule_name,
                            "choice": "bounded" if bounded else "point",
                            "knob": knob,
                            "dev_rows": int(dev.labels.numel()),
                            "test_rows": int(test.labels.numel()),
                            "test_retention": point.retention,
                            "test_layer_speedup": point.layer_speedup,
                            "test_oracle_speedup": oracle.layer_speedup,
                            "share_of_oracle": point.layer_speedup / oracle.layer_speedup,
                        }
                        rows.append(row)
                        print(
                            f"| {name} | {seed} | {rule_name} | {row['choice']} | {knob:.3g} | "
                            f"{point.retention:.3f} | {point.layer_speedup:.2f}x | "
                            f"{row['share_of_oracle']:.3f} |",
                            flush=True,
                        )
    print("\n| corpus | rule | choice | share of oracle, mean (min-max) | test retention, min | vs entropy |")
    print("|---|---|---|---|---|---|")
    summary = []
    for key in dict.fromkeys((r["corpus"], r["rule"], r["choice"]) for r in rows):
        group = [r for r in rows if (r["corpus"], r["rule"], r["choice"]) == key]
        base_group = [r for r in rows if (r["corpus"], r["rule"], r["choice"]) == (key[0], BASELINE, key[2])]
        shares = [r["share_of_oracle"] for r in group]
        gain = np.mean(shares) / np.mean([r["share_of_oracle"] for r in base_group])
        entry = {
            "corpus": key[0],
            "rule": key[1],
            "choice": key[2],
            "share_mean": float(np.mean(shares)),
            "share_min": min(shares),
            "share_max": max(shares),
            "retention_min": min(r["test_retention"] for r in group),
            "vs_entropy": float(gain),
        }
        summary.append(entry)
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {entry['share_mean']:.3f} ({entry['share_min']:.3f}-"
            f"{entry['share_max']:.3f}) | {entry['retention_min']:.3f} | {gain:.2f}x |"
        )
    print("\n| corpus | one layer: FLOPs per row (64 tokens), us per 64 rows | entropy | risk | learned |")
    print("|---|---|---|---|---|")
    for name, c in costs.items():
        print(
            f"| {name} | {c['layer_flops_64_tokens']:,}, {c['layer_us']:.0f} us | {c['entropy_flops']}, "
            f"{c['entropy_step_us']:.0f} us | {c['risk_flops']}, {c['risk_step_us']:.0f} us | "
            f"{c['learned_flops']}, {c['learned_step_us']:.0f} us |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary, "costs": costs}, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
