"""What stage 2 buys with more unlabeled text: share of the oracle's speed-up vs unlabeled rows and seeds.

Stage 2 freezes the backbone and the teacher, so what each student sees is a fixed function of the text. This
script extracts those features once with the job's own `FeatureExtractor` (training articles, dev, test, and
the largest unlabeled corpus asked for), then for each unlabeled-row count, setting and seed trains fresh
students the way the job's stage 2 does (`train_step` with the stage-2 loss, `optimizer_for`'s AdamW and
schedule, rows in a new order each epoch, the best dev checkpoint by mean exit accuracy every
`checkpoint_every_steps` and at each epoch end), chooses S on dev with the job's confidence-bounded rule and
reports test: retention and layer speed-up at that S, the oracle's, and the share of the oracle's.

Unlabeled text, from the training articles only (never dev or test):
  - `paragraphs`: the job's default corpus (the articles' paragraphs, shuffled; ~7,300 rows, ~6,900 distinct);
  - `passages`: those paragraphs plus a passage starting at every sentence (sentences up to ~40 words, what
    the quick profile's 64 tokens keep), all distinct, shuffled: ~33,000 texts. Beyond that, rows repeat in a
    new order (the table says how many are distinct).

    python benchmarks/stage2_budget.py --model models:/early-exit-classifier@candidate \
        --rows paragraphs:0 paragraphs:4000 passages:16000 passages:32000 passages:50000 --seeds 0 1 2

`--settings head_type:learning_rate:epochs` (default: the job's stage-2 config) compares budgets.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ee_model import EarlyExitClassifier  # noqa: E402
from ee_model.heads import build_head  # noqa: E402
from pipelines.bbc import sentence_passages  # noqa: E402
from pipelines.config import Stage2Config, load_train_config  # noqa: E402
from pipelines.data import default_unlabeled_corpus, load_labeled_splits  # noqa: E402
from pipelines.evaluation.passes import SplitPass, exit_logits, per_layer_accuracy  # noqa: E402
from pipelines.evaluation.sweep import oracle_point, sweep  # noqa: E402
from pipelines.evaluation.thresholds import choose_knob  # noqa: E402
from pipelines.feature_batches import FEATURES_COLUMN, LABEL_COLUMN, TEACHER_COLUMN  # noqa: E402
from pipelines.model_source import resolve_model  # noqa: E402
from pipelines.training.features import PART_COLUMN, FeatureExtractor  # noqa: E402
from pipelines.training.stages import stage_named  # noqa: E402
from pipelines.training.steps import TrainState, run_stage_loop  # noqa: E402

UNLABELED = -100


def unlabeled_pools(splits, data_config) -> dict[str, list[str]]:
    paragraphs = pq.read_table(default_unlabeled_corpus(splits.train, data_config))["text"].to_pylist()
    distinct = list(dict.fromkeys(paragraphs + sentence_passages(splits.train["text"].to_pylist())))
    order = np.random.default_rng(0).permutation(len(distinct))
    return {"paragraphs": paragraphs, "passages": [distinct[i] for i in order]}


def take_rows(pool_size: int, rows: int) -> np.ndarray:
    """Indices of `rows` rows of a pool: the pool in order, then again in new seeded orders."""
    rounds = [np.arange(pool_size)]
    while sum(len(r) for r in rounds) < rows:
        rounds.append(np.random.default_rng(len(rounds)).permutation(pool_size))
    return np.concatenate(rounds)[:rows]


def extract(extractor: FeatureExtractor, texts: list[str], label_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Features of `texts` through the job's extractor, 256 rows per call as in the job's stream."""
    parts = []
    for i in range(0, len(texts), 256):
        rows = pa.table(
            {
                "text": pa.array(texts[i : i + 256], pa.string()),
                LABEL_COLUMN: pa.array(label_ids[i : i + 256], pa.int64()),
                PART_COLUMN: pa.array([0] * len(texts[i : i + 256]), pa.int32()),
            }
        )
        out = extractor(rows)
        parts.append({k: out[k] for k in (LABEL_COLUMN, FEATURES_COLUMN, TEACHER_COLUMN)})
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def batches(features: dict[str, np.ndarray], rows: np.ndarray, size: int):
    for start in range(0, len(rows), size):
        take = rows[start : start + size]
        yield {key: values[take] for key, values in features.items()}


def fresh_students(base: EarlyExitClassifier, head_type: str, seed: int) -> EarlyExitClassifier:
    """The stage-1 model with new, seeded student heads, frozen for stage 2 (what the job's stage 2 starts
    from)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    config = model.config
    for i in range(model.n_layers - 1):
        model.heads[i] = build_head(
            head_type, model.flops_model.hidden_size, config.num_labels, config.head_dropout
        )
    model.freeze_for_stage2()
    return model.train()


def train_students(
    base: EarlyExitClassifier,
    train: dict[str, np.ndarray],
    dev: dict[str, np.ndarray],
    stage_config: Stage2Config,
    head_type: str,
    seed: int,
    select: str = "best-dev",
) -> tuple[EarlyExitClassifier, float]:
    """Students trained as the job's stage 2 trains them; (the best dev checkpoint, seconds)."""
    started = time.perf_counter()
    stage = stage_named("stage2")
    model = fresh_students(base, head_type, seed)
    n, size = len(train[LABEL_COLUMN]), stage_config.batch_size_per_worker
    device, rng = torch.device("cpu"), np.random.default_rng(seed)
    best: list = [-1.0, {}]

    def keep_if_best(_: TrainState) -> None:
        recorded = exit_logits(model, batches(dev, np.arange(len(dev[LABEL_COLUMN])), 256), device)
        score = stage.dev_score(per_layer_accuracy(recorded.logits, recorded.labels))
        if score > best[0]:
            best[:] = [score, copy.deepcopy(model.state_dict())]

    total = math.ceil(n / size) * stage_config.epochs
    run_stage_loop(
        model,
        stage,
        stage_config,
        lambda _: batches(train, rng.permutation(n), size),
        total,
        device,
        keep_if_best,
    )
    if select == "best-dev":
        model.load_state_dict(best[1])
    return model.eval(), time.perf_counter() - started


def split_pass(model, features: dict[str, np.ndarray], tokens: np.ndarray) -> SplitPass:
    recorded = exit_logits(model, batches(features, np.arange(len(tokens)), 256), torch.device("cpu"))
    return SplitPass(recorded.logits, recorded.labels, tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a trained KL model: dir or MLflow URI")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["paragraphs:0", "paragraphs:4000", "passages:16000", "passages:32000", "passages:50000"],
        help="pool:unlabeled_rows",
    )
    parser.add_argument("--settings", nargs="+", default=[None], help="head_type:learning_rate:epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--select",
        choices=["best-dev", "final"],
        default="best-dev",
        help="the job's best dev checkpoint (mean exit accuracy), or the last weights",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/stage2_budget.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_train_config()
    splits = load_labeled_splits(config.data)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = resolve_model(args.model, Path(scratch)).directory
        base = EarlyExitClassifier.from_pretrained(model_dir).eval()
        extractor = FeatureExtractor(str(model_dir), config.stage2.feature_dtype, cpus=args.threads)
        # the same FeatureExtractor (and precision) as the job's store
        labels = base.config.labels
        started = time.perf_counter()
        held_out, tokens = {}, {}
        for name in ("train", "dev", "test"):
            table = getattr(splits, name)
            ids = np.array([labels.index(x) for x in table["label"].to_pylist()], dtype=np.int64)
            held_out[name] = extract(extractor, table["text"].to_pylist(), ids)
            tokens[name] = base.tokenize(table["text"].to_pylist()).lengths.astype(np.int64)
        pools = unlabeled_pools(splits, config.data)
        wanted = [(spec.split(":")[0], int(spec.split(":")[1])) for spec in args.rows]
        pool_features = {}
        for pool_name in {p for p, n in wanted if n > 0}:
            texts = pools[pool_name][: max(n for p, n in wanted if p == pool_name)]
            pool_features[pool_name] = extract(
                extractor, texts, np.full(len(texts), UNLABELED, dtype=np.int64)
            )
        extraction_s = time.perf_counter() - started
        rows_extracted = sum(len(f[LABEL_COLUMN]) for f in (*held_out.values(), *pool_features.values()))
        print(f"features of {rows_extracted} rows in {extraction_s:.0f} s", flush=True)

    target = config.eval.target_spec()
    results = []
    print(
        "| pool | unlabeled rows (distinct) | setting | seed | S (dev) | test retention | test speed-up | "
        "test oracle | share of oracle | students s |\n|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for pool_name, n_unlabeled in wanted:
        train, distinct = held_out["train"], 0
        if n_unlabeled > 0:
            pool = pool_features[pool_name]
            pick = take_rows(len(pool[LABEL_COLUMN]), n_unlabeled)
            train = {k: np.concatenate([train[k], pool[k][pick]]) for k in train}
            distinct = int(len(np.unique(pick)))
        for setting in args.settings:
            stage_config = config.stage2
            head_type = base.config.head_type
            if setting is not None:
                head_type, lr, epochs = setting.split(":")
                stage_config = dataclasses.replace(stage_config, learning_rate=float(lr), epochs=int(epochs))
            for seed in args.seeds:
                model, seconds = train_students(
                    base, train, held_out["dev"], stage_config, head_type, seed, args.select
                )
                dev = split_pass(model, held_out["dev"], tokens["dev"])
                test = split_pass(model, held_out["test"], tokens["test"])
                chosen = choose_knob(sweep(model, dev, config.eval.thresholds), "entropy", target)
                at_s = {
                    p.knob: p for p in sweep(model, test, config.eval.thresholds) if p.policy == "entropy"
                }[chosen.point.knob]
                oracle = oracle_point(model, test)
                row = {
                    "pool": pool_name,
                    "unlabeled_rows": n_unlabeled,
                    "distinct_rows": distinct,
                    "setting": setting or "job",
                    "seed": seed,
                    "threshold": chosen.point.knob,
                    "met_on_dev": chosen.met,
                    "test_retention": at_s.retention,
                    "test_layer_speedup": at_s.layer_speedup,
                    "test_oracle_speedup": oracle.layer_speedup,
                    "share_of_oracle": at_s.layer_speedup / oracle.layer_speedup,
                    "students_seconds": round(seconds, 1),
                }
                results.append(row)
                print(
                    f"| {pool_name} | {n_unlabeled} ({row['distinct_rows']}) | {row['setting']} | {seed} | "
                    f"{row['threshold']:.2f} | {row['test_retention']:.3f} | "
                    f"{row['test_layer_speedup']:.2f}x | {row['test_oracle_speedup']:.2f}x | "
                    f"{row['share_of_oracle']:.2f} | {seconds:.0f} |",
                    flush=True,
                )
    print("\n| pool | unlabeled rows | setting | share of oracle, mean (min-max) | test retention, min |")
    print("|---|---|---|---|---|")
    for key in dict.fromkeys((r["pool"], r["unlabeled_rows"], r["setting"]) for r in results):
        group = [r for r in results if (r["pool"], r["unlabeled_rows"], r["setting"]) == key]
        shares = [r["share_of_oracle"] for r in group]
        print(
            f"| {key[0]} | {key[1]} | {key[2]} | {np.mean(shares):.2f} ({min(shares):.2f}-{max(shares):.2f}) "
            f"| {min(r['test_retention'] for r in group):.3f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {"model": args.model, "extraction_seconds": round(extraction_s, 1), "rows": results}, indent=2
        )
    )
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
