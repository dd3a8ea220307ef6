"""Batch-scoring throughput through the real Ray Data path, and memory flatness of the whole scoring job.

Part 1 (--model, a trained early-exit model dir or MLflow URI): BBC paragraphs scored by
  (a) the early-exit model at its stored policy and threshold,
  (b) the same model at full depth (policy none),
  (c) a plain AutoModelForSequenceClassification of the same encoder (same weights, its own head), one model
      call per Ray Data batch of --batch-size rows as they come,
  (c') the same plain model given what (a) and (b) get from jobs/score.py: --sort-rows rows per Ray Data
      batch, sorted by length, model calls of --batch-size (isolates the padding that sorting saves),
  (d) the plain model (encoder + final classifier, the same weights) in OpenVINO with no settings (bf16 on AMX
      CPUs), and (d') after NNCF int8 quantisation on 300 rows of the input: the fastest plain scorers a CPU
      user picks (docs/results.md), given sorted model calls as (c') is,
each through read_parquet -> map_batches(actor pool) -> consumed rows, same actors, model-call size and
truncation. Reports rows/s end to end (actor start and model load included) and steady (rows over the seconds
spent inside the scorer's calls: what a large corpus pays per row once the actors are up), the ratio (a)/(b)
next to the FLOPs speed-up, (a)/(c), (a)/(c') and agreement of (a) with (b). Then chooses S as
`jobs/score.py --calibrate-rows N` does (N evenly spaced rows of the input, one full-depth pass, no labels:
the fastest S whose agreement with full depth clears --min-agreement with 95 % confidence), times that Ray
task, and times (a) again at that S; its agreement is then measured on every row.

(a) and (b) run in --precision / --backend (default auto: what jobs/score.py picks on this machine; the
layers a backend builds are built once and shipped as the job ships them), and the calibration runs in it too.

Part 2 (--memory-rows, --memory-long-rows): jobs/score.py on a tiny model (or --memory-model) over N rows in a
subprocess, short rows (12 words) or rows of --row-bytes each (1 MB); peaks of the job's whole process tree
(driver + Ray; RSS and PSS), of the driver and of the largest Ray worker (PSS), sampled every 0.2 s. Flat
memory = the peaks do not grow with N, nor (past the tokens kept) with the length of a row.

    python benchmarks/score_throughput.py --model /path/to/model --rows 5000
    python benchmarks/score_throughput.py --memory-rows 100000 1000000
    python benchmarks/score_throughput.py --memory-rows 300000 --memory-long-rows 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import unseen_bbc

ROOT = Path(__file__).resolve().parents[1]


class PlainScorer:
    """Baseline (c): the encoder as AutoModelForSequenceClassification, at full depth.

    batch_size None: the batch as it comes in one model call (plain). Otherwise (c'): the batch's rows sorted
    by length and cut into model calls of batch_size, as the early-exit scorer does, to separate the padding
    saved by sorting from the compute saved by exiting early.
    """

    def __init__(self, model_dir: str, max_length: int, cpus: float, batch_size: int | None = None) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification

        from ee_model import EarlyExitClassifier

        torch.set_num_threads(max(1, int(cpus)))
        ee = EarlyExitClassifier.from_pretrained(model_dir)
        config = ee.encoder.config
        config.num_labels = ee.config.num_labels
        self.model = AutoModelForSequenceClassification.from_config(config).eval()
        base = getattr(self.model, self.model.base_model_prefix)
        base.load_state_dict(ee.encoder.state_dict(), strict=False)  # the same encoder; pooler, head its own
        self.tokenizer, self.max_length, self.batch_size = ee.tokenizer, max_length, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch["text"].to_pylist()
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        if self.batch_size is None:
            order = np.arange(len(texts))
        else:
            order = np.argsort([-len(ids) for ids in encoded["input_ids"]], kind="stable")
        size = self.batch_size or max(len(texts), 1)
        labels = np.empty(len(texts), dtype=np.int64)
        for start in range(0, len(texts), size):
            chunk = order[start : start + size]
            padded = self.tokenizer.pad(
                [{k: v[i] for k, v in encoded.items()} for i in chunk], return_tensors="pt"
            )
            labels[chunk] = self.logits(padded).argmax(-1)
        return batch.append_column("label_id", pa.array(labels, pa.int64()))

    def logits(self, padded) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(**padded).logits.numpy()


class PlainOpenVinoScorer(PlainScorer):
    """Baselines (d) and (d'): the plain model converted to OpenVINO (`common.plain_openvino`, saved as IR at
    `xml`), compiled with no settings but the actor's threads (and f32 where the CPU has no bf16 units:
    `openvino_layers.plain_config`), as a user runs it; rows tokenised and sorted
    as (c') does."""

    def __init__(self, xml: str, model_dir: str, max_length: int, cpus: float, batch_size: int) -> None:
        import openvino as ov

        from ee_model import EarlyExitClassifier
        from ee_model.openvino_layers import plain_config

        config = {"INFERENCE_NUM_THREADS": max(1, int(cpus)), "PERFORMANCE_HINT": "LATENCY", **plain_config()}
        self.request = ov.Core().compile_model(xml, "CPU", config).create_infer_request()
        self.tokenizer = EarlyExitClassifier.from_pretrained(model_dir).tokenizer
        self.max_length, self.batch_size = max_length, batch_size

    def logits(self, padded) -> np.ndarray:
        inputs = [padded["input_ids"].numpy(), padded["attention_mask"].numpy()]
        return np.array(self.request.infer(inputs)[0])


def bbc_parquet(directory: Path, rows: int) -> Path:
    """BBC paragraphs stage 2 did not distil on, shuffled: the dev and test articles' paragraphs (about 2,050
    with the default split), then the training articles' paragraphs from the end of the default stage-2 corpus
    (a capped stage 2, e.g. the quick profile's 1,000 rows, reads it from the start)."""
    from pipelines.bbc import split_paragraphs
    from pipelines.config import DataConfig
    from pipelines.data import default_unlabeled_corpus, load_labeled_splits

    data = DataConfig()
    splits = load_labeled_splits(data)
    held_out = pa.concat_tables([splits.dev, splits.test])
    held_out = split_paragraphs(
        pa.table({"doc_id": pa.array(range(held_out.num_rows)), "text": held_out["text"]})
    )
    training = pq.read_table(default_unlabeled_corpus(splits.train, data))
    from_training = max(0, min(rows - held_out.num_rows, training.num_rows))
    table = pa.concat_tables(
        [held_out.select(["text"]), training.slice(training.num_rows - from_training, from_training)]
    )
    table = table.take(pa.array(np.random.default_rng(0).permutation(table.num_rows)))
    print(
        f"paragraphs: {min(held_out.num_rows, rows)} of dev/test articles + {from_training} "
        f"of training articles "
        f"(the last {from_training} of {training.num_rows} in the stage-2 corpus)",
        flush=True,
    )
    while table.num_rows < rows:
        table = pa.concat_tables([table, table.slice(0, rows - table.num_rows)])
    table = table.slice(0, rows)
    path = directory / "paragraphs.parquet"
    pq.write_table(table, path)
    return path


def timed(scorer_class: type) -> type:
    """The scorer, adding `call_seconds`: each row's share of the time its map_batches call took."""

    class Timed(scorer_class):
        def __call__(self, batch: pa.Table) -> pa.Table:
            start = time.perf_counter()
            out = super().__call__(batch)
            share = (time.perf_counter() - start) / max(batch.num_rows, 1)
            return out.append_column("call_seconds", pa.array([share] * batch.num_rows, pa.float64()))

    Timed.__name__ = Timed.__qualname__ = scorer_class.__name__
    return Timed


def timed_pass(
    path: Path, scorer, kwargs: dict, actors: int, rows_per_call: int
) -> tuple[float, float, pa.Table]:
    """(seconds end to end, steady rows/s, the scored table).

    End to end includes starting the actor pool and loading the model (seconds, whatever the corpus size).
    Steady: rows over the seconds spent inside the scorer's calls (tokenising, the model, Arrow out): what a
    large corpus pays per row once the actors are up, without Ray Data's start."""
    import ray.data

    from pipelines.data import streaming_parquet_reader

    with streaming_parquet_reader(preserve_order=True):  # the reader jobs/score.py uses
        dataset = ray.data.read_parquet(str(path)).map_batches(
            timed(scorer),
            fn_constructor_kwargs=kwargs,
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=rows_per_call,
            batch_format="pyarrow",
            num_cpus=kwargs["cpus"],
        )
    start = time.perf_counter()
    table = pa.concat_tables(list(dataset.iter_batches(batch_size=None, batch_format="pyarrow")))
    seconds = time.perf_counter() - start
    return seconds, table.num_rows / max(sum(table["call_seconds"].to_pylist()), 1e-9), table


def calibrated_threshold(
    path: Path,
    model,
    rows: int,
    min_agreement: float,
    batch_size: int,
    cpus: float,
    runtime: str,
    policy: str,
) -> tuple[dict, float]:
    """What `jobs/score.py --calibrate-rows rows` does before scoring: the same sample of the input, the same
    Ray task with an actor's CPUs. Returns (calibration, seconds)."""
    import ray

    from pipelines.config import S_GRID
    from pipelines.row_sample import sample_texts
    from pipelines.scoring.calibration import calibrate_on_worker

    start = time.perf_counter()
    texts = sample_texts([(str(path), pq.ParquetFile(path).metadata.num_rows)], "text", rows, seed=0)
    task = ray.remote(calibrate_on_worker).options(num_cpus=cpus)
    calibration = ray.get(
        task.remote(model, texts, policy, min_agreement, 0.05, S_GRID, batch_size, cpus, runtime)
    )
    return calibration.to_dict(), time.perf_counter() - start


def sample_rows_of(path: Path, rows: int) -> list[str]:
    """`rows` texts of the input drawn as jobs/score.py draws its samples (seed 0)."""
    from pipelines.row_sample import sample_texts

    return sample_texts([(str(path), pq.ParquetFile(path).metadata.num_rows)], "text", rows, seed=0)


def ship_in_runtime(model, directory: Path, runtime, texts: list[str], scratch: Path):
    """The model as jobs/score.py ships it to its actors: its files, with the layers `runtime` builds (built
    here once, OpenVINO int8 calibrated on `texts`), in the object store."""
    import ray

    from ee_model.runtime_layers import build_layers
    from pipelines.model_source import ModelFiles

    layers = build_layers(
        model, runtime, scratch / "layers", texts if runtime.needs_calibration_texts else None
    )
    return ray.put(ModelFiles.from_directory(directory, layers))


def plain_openvino_ir(model, texts: list[str], scratch: Path) -> dict[str, str]:
    """{"default", "int8"}: the plain model as OpenVINO IR files, as converted and as NNCF quantises it on
    `texts` (one row per item, as its guide feeds them)."""
    import openvino as ov
    from common import plain_openvino

    encoded = [model.encode([text]) for text in texts]
    sample = [
        {"input_ids": e["input_ids"].numpy(), "attention_mask": e["attention_mask"].numpy()} for e in encoded
    ]
    example = model.encode(texts[:2])
    converted, quantized = plain_openvino(
        model, {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"]}, sample
    )
    paths = {"default": scratch / "plain.xml", "int8": scratch / "plain-int8.xml"}
    ov.save_model(converted, paths["default"], compress_to_fp16=False)
    ov.save_model(quantized, paths["int8"], compress_to_fp16=False)
    return {name: str(path) for name, path in paths.items()}


def throughput(
    model_ref: str,
    rows: int,
    actors: int,
    cpus: float,
    batch_size: int,
    sort_rows: int,
    calibrate_rows: int,
    min_agreement: float,
    precision: str = "auto",
    backend: str = "auto",
    unseen: bool = False,
) -> dict:
    import ray

    from ee_model import EarlyExitClassifier, ExitSetting
    from ee_model.runtime import resolve_runtime
    from pipelines.model_source import resolve_model
    from pipelines.scoring.scorer import Scorer

    ray.init(address="local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    runtime, why = resolve_runtime(precision, backend)
    print(f"early exit runs {runtime.name}: {why}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        source = resolve_model(model_ref, Path(scratch))
        model = EarlyExitClassifier.from_pretrained(source.directory)
        path = unseen_bbc(Path(scratch), rows) if unseen else bbc_parquet(Path(scratch), rows)
        sample = sample_rows_of(path, 300)
        shipped = ship_in_runtime(model, source.directory, runtime, sample, Path(scratch))
        common = {
            "model": shipped,
            "runtime": runtime.name,
            "text_column": "text",
            "cpus": cpus,
            "batch_size": batch_size,
        }
        plain = {"model_dir": str(source.directory), "max_length": model.config.max_length, "cpus": cpus}
        ir = plain_openvino_ir(model, sample, Path(scratch))
        sorted_calls = {**plain, "batch_size": batch_size}
        # as jobs/score.py: sort this many rows, model calls of batch_size
        window = max(sort_rows, batch_size)
        results = {}

        def run(name, scorer, kwargs, rows_per_call):
            seconds, steady, table = timed_pass(path, scorer, kwargs, actors, rows_per_call)
            results[name] = (seconds, steady, table)
            print(
                f"{name}: {table.num_rows / seconds:.2f} rows/s end to end ({seconds:.1f} s), "
                f"{steady:.2f} rows/s steady",
                flush=True,
            )

        for name, scorer, kwargs, rows_per_call in (
            ("a_early_exit", Scorer, {**common, "setting": None}, window),
            ("b_full_depth", Scorer, {**common, "setting": ExitSetting("none")}, window),
            ("c_plain_hf", PlainScorer, plain, batch_size),
            ("c_plain_hf_sorted", PlainScorer, sorted_calls, window),
            ("d_plain_openvino", PlainOpenVinoScorer, {**sorted_calls, "xml": ir["default"]}, window),
            ("d_plain_openvino_int8", PlainOpenVinoScorer, {**sorted_calls, "xml": ir["int8"]}, window),
        ):
            run(name, scorer, kwargs, rows_per_call)
        policy = model.config.policy
        calibrated, calibration_s = calibrated_threshold(
            path, shipped, calibrate_rows, min_agreement, batch_size, cpus, runtime.name, policy
        )
        print(
            f"S calibrated on {calibrated['rows']} of the rows for >= {min_agreement:.0%} agreement "
            "(no labels): "
            f"{calibrated['knob']} in {calibration_s:.1f} s",
            flush=True,
        )
        run("a_calibrated", Scorer, {**common, "setting": ExitSetting(policy, calibrated["knob"])}, window)
    (a_s, a_ss, a), (b_s, b_ss, b), (c_s, c_ss, _), (cs_s, cs_ss, _), (k_s, k_ss, k) = (
        results[n]
        for n in ("a_early_exit", "b_full_depth", "c_plain_hf", "c_plain_hf_sorted", "a_calibrated")
    )
    plain_names = ("c_plain_hf", "c_plain_hf_sorted", "d_plain_openvino", "d_plain_openvino_int8")
    fastest = min(plain_names, key=lambda n: results[n][0])  # end to end
    fastest_steady = max(plain_names, key=lambda n: results[n][1])

    def flops_speedup(table: pa.Table) -> float:
        tokens = table["tokens"].to_numpy().astype(np.int64)
        return float(model.flops_model.full_depth_flops(tokens).sum() / table["flops"].to_numpy().sum())

    def agreement(table: pa.Table) -> float:
        return float(np.mean(np.array(table["label"].to_pylist()) == np.array(b["label"].to_pylist())))

    return {
        "rows": rows,
        "runtime": runtime.name,
        "runtime_reason": why,
        "actors": actors,
        "cpus_per_actor": cpus,
        "batch_size": batch_size,
        "sort_rows": window,
        "policy": model.config.policy,
        "knob": model.config.setting().knob,
        "max_length": model.config.max_length,
        "rows_per_s": {
            "a_early_exit": rows / a_s,
            "b_full_depth": rows / b_s,
            "c_plain_hf": rows / c_s,
            "c_plain_hf_sorted": rows / cs_s,
            "d_plain_openvino": rows / results["d_plain_openvino"][0],
            "d_plain_openvino_int8": rows / results["d_plain_openvino_int8"][0],
            "a_calibrated": rows / k_s,
        },
        "steady_rows_per_s": {
            "a_early_exit": a_ss,
            "b_full_depth": b_ss,
            "c_plain_hf": c_ss,
            "c_plain_hf_sorted": cs_ss,
            "d_plain_openvino": results["d_plain_openvino"][1],
            "d_plain_openvino_int8": results["d_plain_openvino_int8"][1],
            "a_calibrated": k_ss,
        },
        "fastest_plain": {"end_to_end": fastest, "steady": fastest_steady},
        "a_over_b": b_s / a_s,
        "flops_speedup": flops_speedup(a),
        "a_over_b_per_flops_speedup": (b_s / a_s) / flops_speedup(a),
        "steady_a_over_b_per_flops_speedup": (a_ss / b_ss) / flops_speedup(a),
        "a_over_c": c_s / a_s,
        "a_over_c_sorted": cs_s / a_s,
        "steady_a_over_c": a_ss / c_ss,
        "agreement_a_b": agreement(a),
        "calibrated": {
            "threshold": calibrated["knob"],
            "calibration": calibrated,
            "calibration_seconds": calibration_s,
            "agreement_a_b": agreement(k),
            "flops_speedup": flops_speedup(k),
            "a_over_c": c_s / k_s,
            "a_over_c_with_calibration": c_s / (k_s + calibration_s),
            "steady_a_over_c": k_ss / c_ss,
            "over_fastest_plain": results[fastest][0] / k_s,
            "steady_over_fastest_plain": k_ss / results[fastest_steady][1],
            "steady_a_over_b_per_flops_speedup": (k_ss / b_ss) / flops_speedup(k),
        },
        "mean_exit_layer": float(a["exit_layer"].to_numpy().mean()),
        "mean_exit_layer_calibrated": float(k["exit_layer"].to_numpy().mean()),
    }


def memory_run(rows: int, scratch: Path, row_bytes: int | None = None, model: str | None = None) -> dict:
    """jobs/score.py over `rows` rows (12-word texts, or texts of `row_bytes` bytes) on `model` (default a
    tiny one) in a subprocess: peaks of the whole tree (RSS, PSS), of the driver and of the largest Ray
    worker (PSS: its own pages, and its share of the object store it maps)."""
    model_dir = Path(model) if model else scratch / "model"
    if not model_dir.exists():
        from ee_model import EarlyExitClassifier
        from ee_model.tiny import write_tiny_encoder

        EarlyExitClassifier.from_encoder(
            str(write_tiny_encoder(scratch / "enc", "bert", 2, 32)), labels=["a", "b", "c"], threshold=0.9
        ).save_pretrained(model_dir)
    name = f"{rows}x{row_bytes or 'short'}"
    inputs = scratch / f"in-{name}"
    inputs.mkdir(exist_ok=True)
    per_file = 50_000
    words = np.array(["money", "sport", "film", "good", "bad", "the", "a", "of", "market", "vote"])
    rng = np.random.default_rng(0)
    long_text = " ".join(words[rng.integers(0, 10, (row_bytes or 0) // 4)])[: row_bytes or 0]
    for f in range((rows + per_file - 1) // per_file):
        n = min(per_file, rows - f * per_file)
        if row_bytes:  # each row its own text: a rotation of one long text
            texts = [long_text[i * 7 :] + long_text[: i * 7] for i in range(n)]
        else:
            texts = [" ".join(words[rng.integers(0, 10, 12)]) for _ in range(n)]
        pq.write_table(pa.table({"text": texts, "id": np.arange(n)}), inputs / f"part-{f:04d}.parquet")
    summary_file = scratch / f"summary-{name}.json"
    command = [sys.executable, str(ROOT / "jobs" / "score.py"), "--model", str(model_dir), "--input"]
    command += [str(inputs), "--output", str(scratch / f"out-{name}"), "--summary-file", str(summary_file)]
    command += [] if row_bytes else ["--batch-size", "512"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db", "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    peaks = {"tree_rss": 0, "tree_pss": 0, "driver_pss": 0, "worker_pss": 0}
    while process.poll() is None:
        tree_rss, tree_pss, driver, worker = process_tree_peaks(process.pid)
        for key, value in zip(peaks, (tree_rss, tree_pss, driver, worker), strict=True):
            peaks[key] = max(peaks[key], value)
        time.sleep(0.2)
    summary = json.loads(summary_file.read_text())
    return {
        "rows": rows,
        "row_bytes": row_bytes or round(float(np.mean([len(t) for t in texts])), 1),
        **{f"peak_{key}_mib": round(value / 2**20, 1) for key, value in peaks.items()},
        "seconds": round(time.perf_counter() - start, 1),
        "rows_scored": summary["rows_scored"],
        "rows_per_s": summary["rows_per_s"],
    }


def process_tree_peaks(pid: int) -> tuple[int, int, int, int]:
    """(tree RSS, tree PSS, the driver's PSS, the largest Ray worker's PSS) now."""
    import psutil

    try:
        root = psutil.Process(pid)
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0, 0, 0
    rss = pss = driver = worker = 0
    for process in [root, *children]:
        try:
            info, title = process.memory_full_info(), (process.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss, pss = rss + info.rss, pss + info.pss
        if process.pid == pid:
            driver = info.pss
        elif title.startswith("ray::") and "IDLE" not in title:  # a task or actor worker (setproctitle)
            worker = max(worker, info.pss)
    return rss, pss, driver, worker


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="trained early-exit model (dir or MLflow URI) for the throughput part"
    )
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="rows per model call")
    parser.add_argument(
        "--sort-rows", type=int, default=512, help="rows sorted by length together (jobs/score.py)"
    )
    parser.add_argument("--calibrate-rows", type=int, default=1000, help="as jobs/score.py --calibrate-rows")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--precision", default="auto", help="early exit's runtime, as jobs/score.py takes it")
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--unseen",
        action="store_true",
        help="score text of the dev and test articles only (common.unseen_bbc), none the model trained on",
    )
    parser.add_argument("--memory-rows", type=int, nargs="*", default=[], help="short-row runs of part 2")
    parser.add_argument(
        "--memory-long-rows", type=int, default=0, help="part 2 also over this many rows of --row-bytes each"
    )
    parser.add_argument("--row-bytes", type=int, default=1_000_000)
    parser.add_argument("--memory-model", help="part 2's model (default a tiny random one)")
    parser.add_argument("--out", default="benchmarks/results/score_throughput.json")
    args = parser.parse_args()
    record: dict = {"device": "cpu", "cpus": os.cpu_count()}
    if args.model:
        record["throughput"] = throughput(
            args.model,
            args.rows,
            args.actors,
            args.cpus_per_actor,
            args.batch_size,
            args.sort_rows,
            args.calibrate_rows,
            args.min_agreement,
            args.precision,
            args.backend,
            args.unseen,
        )
        t = record["throughput"]
        print("\n| scorer | rows/s end to end | rows/s steady |\n|---|---|---|")
        for name, value in t["rows_per_s"].items():
            print(f"| {name} | {value:.2f} | {t['steady_rows_per_s'][name]:.2f} |")
        k = t["calibrated"]
        print(
            f"\nDefault S: (a)/(b) = {t['a_over_b']:.3f}x vs FLOPs speed-up {t['flops_speedup']:.3f}x "
            f"-> ratio {t['a_over_b_per_flops_speedup']:.3f} end to end, "
            f"{t['steady_a_over_b_per_flops_speedup']:.3f} steady (target >= 0.85); "
            f"(a)/(c) = {t['a_over_c']:.3f}x end to end, {t['steady_a_over_c']:.3f}x steady "
            f"(target >= 3; over (c) sorted by length as (a) is: {t['a_over_c_sorted']:.3f}x); "
            f"agreement (a) vs "
            f"(b) = {t['agreement_a_b']:.4f} (target >= 0.99)"
        )
        print(
            f"S = {k['threshold']} calibrated as jobs/score.py --calibrate-rows {args.calibrate_rows} does "
            f"({k['calibration']['rows']} rows, {k['calibration_seconds']:.1f} s, sample agreement "
            f"{k['calibration']['agreement']:.4f}): agreement on all rows {k['agreement_a_b']:.4f}, FLOPs "
            f"{k['flops_speedup']:.3f}x, (a)/(c) {k['a_over_c']:.3f}x end to end "
            f"({k['a_over_c_with_calibration']:.3f}x counting the calibration), "
            f"{k['steady_a_over_c']:.3f}x steady; "
            f"steady wall/FLOPs {k['steady_a_over_b_per_flops_speedup']:.3f}"
        )
        fastest = t["fastest_plain"]
        print(
            f"early exit ({t['runtime']}, calibrated) over the fastest plain scorer: "
            f"{k['over_fastest_plain']:.3f}x end to end ({fastest['end_to_end']}), "
            f"{k['steady_over_fastest_plain']:.3f}x steady ({fastest['steady']})"
        )
    if args.memory_rows or args.memory_long_rows:
        runs = [(rows, None) for rows in args.memory_rows]
        runs += [(args.memory_long_rows, args.row_bytes)] if args.memory_long_rows else []
        with tempfile.TemporaryDirectory() as scratch:
            record["memory"] = [memory_run(n, Path(scratch), size, args.memory_model) for n, size in runs]
        print(
            "\n| rows | bytes per row | peak PSS of the job / driver / largest worker (MiB) "
            "| peak RSS of the job (MiB) | seconds | rows/s |\n|---|---|---|---|---|---|"
        )
        for m in record["memory"]:
            print(
                f"| {m['rows']} | {m['row_bytes']} | {m['peak_tree_pss_mib']} / {m['peak_driver_pss_mib']} "
                f"/ {m['peak_worker_pss_mib']} | {m['peak_tree_rss_mib']} | {m['seconds']} "
                f"| {m['rows_per_s']} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
