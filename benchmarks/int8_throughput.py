"""Early exit x int8 on CPU against what a CPU user would pick instead, side by side through Ray Data.

The texts are BBC text the model never saw: the paragraphs of the dev and test articles, then passages
starting at each of their sentences (up to 40 words), shuffled; each keeps its article's label as `gold`.
Scorers, each a Ray Data actor pool (same actors, CPUs, rows sorted by length --sort-rows at a time, model
calls of --batch-size rows, the model's tokenisation and truncation):
  (c)  the plain fine-tuned model in PyTorch fp32: the encoder's own forward + the final classifier (what
       stage 1 trains: the model a user without early exit would have), full depth;
  (d)  the same plain model exported whole to ONNX (`torch.onnx.export(dynamo=True)`) and quantised with
       ONNX Runtime's dynamic int8 (`quantize_dynamic`, per-channel weights; d0: per-tensor weights,
       Optimum's default): the user's alternative;
  (b)  the early-exit model at full depth, fp32 (the reference for agreement);
  (a)  early exit fp32 at the S `jobs/score.py --calibrate-rows N` chooses (label-free, fp32);
  (e8) the int8 early-exit layers at full depth (what int8 alone gives through the exit engine);
  (e)  early exit with int8 layers at the S that calibration chooses in int8 (`--precision int8`).
Reports rows/s end to end (actor start and model load included) and steady (rows over the seconds inside the
scorer's calls), ratios to (c) and (e) / (d), agreement with (b) and of (d) with (c), accuracy against the
articles' labels, and the one-off costs (int8 export of the layers, calibration).

    python benchmarks/int8_throughput.py --model /path/to/quick/model --rows 5000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from score_throughput import timed_pass  # noqa: E402


class PlainClassifier(nn.Module):
    """The encoder's own full forward + the final classifier over the model's pooling: the plain fine-tuned
    classifier (a head on `AutoModel`, as `AutoModelForSequenceClassification` is), no exits."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder, self.head, self.pooling = model.encoder, model.teacher, model.config.pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from ee_model.heads import pool

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(pool(hidden, attention_mask, self.pooling))


def export_plain_int8(model_dir: str, folder: Path) -> dict[str, Path]:
    """(d): the plain model exported whole, then int8 per-channel and per-tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ee_model import EarlyExitClassifier
    from ee_model.int8 import export_onnx

    model = EarlyExitClassifier.from_pretrained(model_dir)
    model.encoder.set_attn_implementation("eager")
    plain = PlainClassifier(model).eval()
    example = model.encode(["a short text", "a somewhat longer text than the first one"])
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    fp32 = export_onnx(plain, example, folder / "plain.onnx", "logits", axes)
    paths = {"per_channel": folder / "plain.int8pc.onnx", "per_tensor": folder / "plain.int8.onnx"}
    quantize_dynamic(fp32, paths["per_channel"], weight_type=QuantType.QInt8, per_channel=True)
    quantize_dynamic(fp32, paths["per_tensor"], weight_type=QuantType.QInt8)
    return paths


class PlainScorer:
    """(c) in PyTorch (onnx_path None) or (d) in ONNX Runtime: rows sorted by length, model calls of
    batch_size rows, the early-exit model's tokenisation."""

    def __init__(self, model_dir: str, cpus: float, batch_size: int, onnx_path: str | None = None) -> None:
        from ee_model import EarlyExitClassifier

        threads = max(1, math.floor(cpus))
        torch.set_num_threads(threads)
        model = EarlyExitClassifier.from_pretrained(model_dir)
        self.tokenizer, self.labels = model.text_tokenizer, model.config.labels
        self.batch_size, self.session, self.plain = batch_size, None, None
        if onnx_path:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        else:
            self.plain = PlainClassifier(model).eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        token_ids = self.tokenizer(batch["text"].to_pylist())
        order = np.argsort(-token_ids.lengths, kind="stable")
        label_ids = np.empty(len(order), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = token_ids.take(rows).padded(self.tokenizer.pad_id)
            if self.session is not None:
                logits = self.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            else:
                with torch.inference_mode():
                    logits = self.plain(ids, mask).numpy()
            label_ids[rows] = logits.argmax(-1)
        labels = [self.labels[i] for i in label_ids]
        return batch.append_column("label", pa.array(labels, pa.string()))


def unseen_bbc(directory: Path, rows: int) -> Path:
    """`rows` texts of the dev and test articles (never trained on): their paragraphs, then sentence
    passages, distinct, shuffled; `gold` is the article's label."""
    from pipelines.bbc import sentence_passages, split_paragraphs
    from pipelines.config import DataConfig
    from pipelines.data import load_labeled_splits

    splits = load_labeled_splits(DataConfig())
    articles = pa.concat_tables([splits.dev, splits.test])
    texts, gold = [], []
    for text, label in zip(articles["text"].to_pylist(), articles["label"].to_pylist(), strict=True):
        one = pa.table({"doc_id": [0], "text": [text]})
        pieces = split_paragraphs(one)["text"].to_pylist() + sentence_passages([text])
        texts += pieces
        gold += [label] * len(pieces)
    unique = dict(zip(texts, gold, strict=True))  # distinct (a one-sentence paragraph is also a passage)
    order = np.random.default_rng(0).permutation(len(unique))
    if rows > len(unique):
        raise SystemExit(f"only {len(unique)} distinct unseen texts; ask for fewer --rows")
    keys = list(unique)
    chosen = [keys[i] for i in order[:rows]]
    table = pa.table({"text": chosen, "gold": [unique[t] for t in chosen]})
    path = directory / "unseen.parquet"
    pq.write_table(table, path)
    print(f"{rows} of {len(unique)} unseen texts ({articles.num_rows} dev/test articles)", flush=True)
    return path


def calibrated(shipped, path: Path, rows: int, min_agreement: float, batch_size: int, cpus, precision: str):
    """What `jobs/score.py --calibrate-rows rows --precision P` does before scoring: the same sample, the
    same Ray task. Returns (calibration dict, seconds)."""
    import ray

    from pipelines.config import S_GRID
    from pipelines.scoring.calibration import calibrate_on_worker, sample_texts

    start = time.perf_counter()
    texts = sample_texts([(str(path), pq.ParquetFile(path).metadata.num_rows)], "text", rows, seed=0)
    task = ray.remote(calibrate_on_worker).options(num_cpus=cpus)
    result = task.remote(shipped, texts, "entropy", min_agreement, 0.05, S_GRID, batch_size, cpus, precision)
    return ray.get(result).to_dict(), time.perf_counter() - start


def run_benchmark(args) -> dict:
    import ray

    from ee_model import EarlyExitClassifier, ExitSetting, int8_layers
    from pipelines.model_source import ModelFiles, resolve_model
    from pipelines.scoring.scorer import Scorer

    ray.init(address="local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    results: dict[str, tuple[float, float, pa.Table]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        source = resolve_model(args.model, scratch)
        model_dir = str(source.directory)
        path = unseen_bbc(scratch, args.rows)
        start = time.perf_counter()
        layers = int8_layers(EarlyExitClassifier.from_pretrained(model_dir), scratch / "int8")
        export_layers_s = time.perf_counter() - start
        start = time.perf_counter()
        plain_int8 = export_plain_int8(model_dir, scratch)
        export_plain_s = time.perf_counter() - start
        shipped = {
            "fp32": ray.put(ModelFiles.from_directory(model_dir)),
            "int8": ray.put(ModelFiles.from_directory(model_dir, layers)),
        }
        window = max(args.sort_rows, args.batch_size)
        plain = {"model_dir": model_dir, "cpus": args.cpus_per_actor, "batch_size": args.batch_size}

        def early_exit(precision: str, setting: ExitSetting) -> dict:
            return {
                "model": shipped[precision],
                "runtime": precision,
                "setting": setting,
                "text_column": "text",
                "cpus": args.cpus_per_actor,
                "batch_size": args.batch_size,
            }

        def run(name: str, scorer, kwargs: dict) -> None:
            seconds, steady, table = timed_pass(path, scorer, kwargs, args.actors, window)
            results[name] = (seconds, steady, table)
            print(
                f"{name}: {table.num_rows / seconds:.1f} rows/s end to end ({seconds:.1f} s), "
                f"{steady:.1f} steady",
                flush=True,
            )

        calibrations = {}
        for precision in ("fp32", "int8"):
            calibrations[precision] = calibrated(
                shipped[precision],
                path,
                args.calibrate_rows,
                args.min_agreement,
                args.batch_size,
                args.cpus_per_actor,
                precision,
            )
            print(f"S calibrated in {precision}: {calibrations[precision][0]['knob']}", flush=True)
        s_fp32, s_int8 = (ExitSetting("entropy", calibrations[p][0]["knob"]) for p in ("fp32", "int8"))
        run("c_plain_fp32", PlainScorer, plain)
        run("d_plain_int8", PlainScorer, {**plain, "onnx_path": str(plain_int8["per_channel"])})
        run("d0_plain_int8_per_tensor", PlainScorer, {**plain, "onnx_path": str(plain_int8["per_tensor"])})
        run("b_full_depth_fp32", Scorer, early_exit("fp32", ExitSetting("none")))
        run("a_early_exit_fp32", Scorer, early_exit("fp32", s_fp32))
        run("e8_full_depth_int8", Scorer, early_exit("int8", ExitSetting("none")))
        run("e_early_exit_int8", Scorer, early_exit("int8", s_int8))
    labels = {name: np.array(table["label"].to_pylist()) for name, (_, _, table) in results.items()}
    gold = np.array(results["b_full_depth_fp32"][2]["gold"].to_pylist())
    rows_per_s = {name: args.rows / seconds for name, (seconds, _, _) in results.items()}
    steady = {name: value for name, (_, value, _) in results.items()}

    def exits(name: str) -> float:
        return float(results[name][2]["exit_layer"].to_numpy().mean())

    return {
        "rows": args.rows,
        "actors": args.actors,
        "cpus_per_actor": args.cpus_per_actor,
        "batch_size": args.batch_size,
        "sort_rows": window,
        "calibrate_rows": args.calibrate_rows,
        "min_agreement": args.min_agreement,
        "rows_per_s": rows_per_s,
        "steady_rows_per_s": steady,
        "over_c": {name: rows_per_s[name] / rows_per_s["c_plain_fp32"] for name in rows_per_s},
        "steady_over_c": {name: steady[name] / steady["c_plain_fp32"] for name in steady},
        "e_over_d": rows_per_s["e_early_exit_int8"] / rows_per_s["d_plain_int8"],
        "steady_e_over_d": steady["e_early_exit_int8"] / steady["d_plain_int8"],
        "agreement_with_b": {n: float(np.mean(labels[n] == labels["b_full_depth_fp32"])) for n in labels},
        "agreement_d_with_c": float(np.mean(labels["d_plain_int8"] == labels["c_plain_fp32"])),
        "agreement_d0_with_c": float(np.mean(labels["d0_plain_int8_per_tensor"] == labels["c_plain_fp32"])),
        "agreement_e_with_e8": float(np.mean(labels["e_early_exit_int8"] == labels["e8_full_depth_int8"])),
        "accuracy_vs_article_label": {name: float(np.mean(labels[name] == gold)) for name in labels},
        "mean_exit_layer": {"a": exits("a_early_exit_fp32"), "e": exits("e_early_exit_int8")},
        "calibration": {p: {**c, "seconds": s} for p, (c, s) in calibrations.items()},
        "one_off_seconds": {"export_int8_layers": export_layers_s, "export_plain_int8_both": export_plain_s},
    }


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", required=True, help="trained early-exit model (dir or MLflow URI)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--sort-rows", type=int, default=512)
    parser.add_argument("--calibrate-rows", type=int, default=2000)
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--out", default="benchmarks/results/int8_throughput.json")
    args = parser.parse_args()
    record = {"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__, **run_benchmark(args)}
    text = json.dumps(record, indent=2)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    over_c, agree = record["over_c"], record["agreement_with_b"]
    print(
        f"\n(d)/(c) {over_c['d_plain_int8']:.2f}x   (a)/(c) {over_c['a_early_exit_fp32']:.2f}x   "
        f"(e)/(c) {over_c['e_early_exit_int8']:.2f}x   (e)/(d) {record['e_over_d']:.2f}x "
        f"(steady {record['steady_e_over_d']:.2f}x; target >= 2)\n"
        f"agreement: (e) with (b) {agree['e_early_exit_int8']:.4f} (target >= 0.99), (d) with (c) "
        f"{record['agreement_d_with_c']:.4f}, (a) with (b) {agree['a_early_exit_fp32']:.4f}"
    )


if __name__ == "__main__":
    main()
