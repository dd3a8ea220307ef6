"""How much stage-2 training the students need: unlabeled rows x epochs x learning rate x head type.

Stage 2 freezes the backbone and the teacher (eval mode), so what each student sees is a fixed function of the
text: every layer's pooled hidden state. This script computes those features once for the training texts plus
the first N rows of the default stage-2 corpus (the training articles' paragraphs, shuffled) and for dev and
test, then trains fresh students on them with the job's own loss (`stage2_loss`, KL to the teacher) for each
setting, and reports what the training job would: the S chosen on dev for the retention target, test retention
and layer speed-up at that S, the test oracle, and the share of the oracle's speed-up.

    python benchmarks/stage2_budget.py --model models:/early-exit-classifier@candidate \
        --unlabeled-rows 1000 4000 --settings linear:5e-3:2 linear:1e-2:3 mlp:2e-3:3

The students here see the corpus in a fresh random order per epoch, as the job's do; the numbers vary by a few
points of share from seed to seed (--seeds).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ee_model import EarlyExitClassifier  # noqa: E402
from ee_model.heads import build_head  # noqa: E402
from ee_model.losses import stage2_loss  # noqa: E402
from pipelines.config import load_train_config  # noqa: E402
from pipelines.data import default_unlabeled_corpus, load_labeled_splits  # noqa: E402
from pipelines.evaluation.passes import SplitPass  # noqa: E402
from pipelines.evaluation.sweep import oracle_point, sweep  # noqa: E402
from pipelines.evaluation.thresholds import choose_knob  # noqa: E402
from pipelines.model_source import resolve_model  # noqa: E402


def features(
    model: EarlyExitClassifier, texts: list[str], batch_size: int = 64
) -> tuple[torch.Tensor, np.ndarray]:
    """(n_layers, n, hidden) pooled features and (n,) token counts, at the model's max_length."""
    pooled, tokens = [], []
    for start in range(0, len(texts), batch_size):
        encoded = model.tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=model.config.max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            pooled.append(
                model.pooled_features(
                    encoded["input_ids"], encoded["attention_mask"], encoded.get("token_type_ids")
                )
            )
        tokens.append(encoded["attention_mask"].sum(dim=1).numpy())
    return torch.cat(pooled, dim=1), np.concatenate(tokens)


def train_students(
    model, corpus: torch.Tensor, head_type: str, lr: float, epochs: int, batch_size: int, seed: int
) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    n_students, hidden = corpus.shape[0] - 1, corpus.shape[2]
    heads = torch.nn.ModuleList(
        build_head(head_type, hidden, model.config.num_labels, model.config.head_dropout)
        for _ in range(n_students)
    )
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr)
    with torch.no_grad():
        teacher = model.teacher(corpus[-1])  # (n, N)
    for _ in range(epochs):
        order = torch.randperm(corpus.shape[1])
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            logits = torch.stack([head(corpus[j, rows]) for j, head in enumerate(heads)] + [teacher[rows]])
            loss = stage2_loss(logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return heads.eval()


def split_pass(model, heads, pooled: torch.Tensor, labels: torch.Tensor, tokens: np.ndarray) -> SplitPass:
    with torch.no_grad():
        logits = torch.stack([head(pooled[j]) for j, head in enumerate(heads)] + [model.teacher(pooled[-1])])
    return SplitPass(logits=logits, labels=labels, tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a trained KL model: dir or MLflow URI")
    parser.add_argument("--unlabeled-rows", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["linear:5e-3:2", "linear:1e-2:3"],
        help="head_type:learning_rate:epochs",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="benchmarks/results/stage2_budget.json")
    args = parser.parse_args()

    config = load_train_config()
    splits = load_labeled_splits(config.data)
    with tempfile.TemporaryDirectory() as scratch:
        model = EarlyExitClassifier.from_pretrained(resolve_model(args.model, Path(scratch)).directory).eval()
    labels = {
        name: torch.tensor([splits.labels.index(x) for x in getattr(splits, name)["label"].to_pylist()])
        for name in ("dev", "test")
    }
    held_out = {name: features(model, getattr(splits, name)["text"].to_pylist()) for name in ("dev", "test")}
    paragraphs = pq.read_table(default_unlabeled_corpus(splits.train, config.data))["text"].to_pylist()
    labeled, _ = features(model, splits.train["text"].to_pylist())
    unlabeled, _ = features(model, paragraphs[: max(args.unlabeled_rows)])
    target = config.eval.target_spec()

    rows = []
    print(
        "| unlabeled rows | head | lr | epochs | seed | S (dev) | dev speed-up | test retention | "
        "test speed-up |"
        " test oracle | share of oracle |\n|---|---|---|---|---|---|---|---|---|---|---|",
        flush=True,
    )
    for n_unlabeled in args.unlabeled_rows:
        corpus = torch.cat([labeled, unlabeled[:, :n_unlabeled]], dim=1)
        for setting in args.settings:
            head_type, lr, epochs = setting.split(":")
            for seed in args.seeds:
                heads = train_students(
                    model, corpus, head_type, float(lr), int(epochs), args.batch_size, seed
                )
                passes = {
                    name: split_pass(model, heads, held_out[name][0], labels[name], held_out[name][1])
                    for name in ("dev", "test")
                }
                chosen = choose_knob(sweep(model, passes["dev"], config.eval.thresholds), "entropy", target)
                test_points = {
                    p.knob: p
                    for p in sweep(model, passes["test"], config.eval.thresholds)
                    if p.policy == "entropy"
                }
                at_s, oracle = test_points[chosen.point.knob], oracle_point(model, passes["test"])
                row = {
                    "unlabeled_rows": n_unlabeled,
                    "head_type": head_type,
                    "learning_rate": float(lr),
                    "epochs": int(epochs),
                    "seed": seed,
                    "threshold": chosen.point.knob,
                    "met_on_dev": chosen.met,
                    "dev_layer_speedup": chosen.point.layer_speedup,
                    "test_retention": at_s.retention,
                    "test_layer_speedup": at_s.layer_speedup,
                    "test_oracle_speedup": oracle.layer_speedup,
                    "share_of_oracle": at_s.layer_speedup / oracle.layer_speedup,
                }
                rows.append(row)
                print(
                    f"| {n_unlabeled} | {head_type} | {lr} | {epochs} | {seed} | {row['threshold']:.2f} | "
                    f"{row['dev_layer_speedup']:.2f}x | {row['test_retention']:.3f} | "
                    f"{row['test_layer_speedup']:.2f}x | {row['test_oracle_speedup']:.2f}x | "
                    f"{row['share_of_oracle']:.2f} |",
                    flush=True,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
