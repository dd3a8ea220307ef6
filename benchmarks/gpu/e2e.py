"""The whole pipeline on one machine's GPU, as users run it: `jobs/train.py --use-gpu` (Ray Train, NCCL, bf16
autocast) through stage 1, stage 2 and registration in a local sqlite MLflow store, then `jobs/score.py
--gpus-per-actor 1` on the registered model over BBC paragraphs, sampling how busy the GPU is:
  - early exit with a tokenising stage (`--tokenize tasks`, what `auto` picks with a GPU),
  - early exit with the actor tokenising its own batches (`--tokenize actor`: the path before the stage),
  - full depth (`--policy none`) with the stage.
Between training and scoring, the two capacities the end-to-end rate is bounded by: the tokenising stage
alone on this machine's free CPUs (read_parquet -> map_batches(tokenize_batch) through Ray Data, no model),
and the model alone on the GPU (`predict_tokens` on pre-tokenised rows, the scorer's batch size). Target:
end-to-end rows/s >= 0.8 x min(the two). Run by `benchmarks/gpu/e2e.sh`, which installs the pack first.

    python benchmarks/gpu/e2e.py --encoder .gpu_pack/minilm --out $OUT            # on the GPU machine
    python benchmarks/gpu/e2e.py --encoder tiny --cpu --rows 2000 --out /tmp/e2e   # the same path on CPU

The encoder's weights are initialised randomly from its config (the packaged weights are too large to carry):
the run proves the pipeline and times it; accuracy and the chosen S mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
MODEL_NAME = "early-exit-classifier"


class GpuSampler:
    """Samples `nvidia-smi` utilisation every `interval_s` in a thread: (unix time, busy %, memory MiB)."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self.available = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)

    def _run(self, interval_s: float) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.split("\n")[0]
            if "," in out:
                busy, memory = (float(v) for v in out.split(",")[:2])
                self.samples.append((time.time(), busy, memory))
            self._stop.wait(interval_s)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()

    def busy_share(self, start: float, end: float) -> dict | None:
        window = [(busy, memory) for t, busy, memory in self.samples if start <= t <= end]
        if not window:
            return None
        return {
            "mean_busy_percent": round(sum(b for b, _ in window) / len(window), 1),
            "samples": len(window),
            "peak_memory_mib": max(m for _, m in window),
        }


def random_encoder(config_dir: str, destination: Path) -> str:
    """A checkpoint of the encoder in `config_dir` (config + tokenizer) with random weights; 'tiny' = tiny
    BERT."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if config_dir == "tiny":
        from ee_model.tiny import write_tiny_encoder

        return str(write_tiny_encoder(destination, num_layers=3, hidden_size=32))
    AutoModel.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(str(destination))
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(str(destination))
    return str(destination)


def paragraph_corpus(rows: int, files: int, destination: Path) -> int:
    """At least `rows` BBC paragraphs (the corpus repeated in a new order each round), in `files` parquet
    files."""
    import numpy as np

    from pipelines.bbc import read_bbc_articles, split_paragraphs

    texts = split_paragraphs(read_bbc_articles())["text"]
    rounds = -(-rows // len(texts))
    order = np.concatenate([np.random.default_rng(r).permutation(len(texts)) for r in range(rounds)])[:rows]
    table = pa.table({"row_id": np.arange(rows), "text": texts.take(order)})
    destination.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        pq.write_table(table.take(part), destination / f"part-{i:03d}.parquet")
    return rows


def run_job(name: str, args: list[str], out: Path, env: dict[str, str]) -> tuple[float, float]:
    """Run a job script, its output teed to <out>/<name>.log; (start, end) unix times. Raises on failure."""
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for line in process.stdout:
            log.write(line)
            if not line.startswith(("(", " ")):  # worker chatter stays in the log
                print(f"[{name}] {line}", end="", flush=True)
        code = process.wait()
    end = time.time()
    print(f"[{name}] exit {code} after {end - start:.1f} s", flush=True)
    if code != 0:
        raise SystemExit(f"{name} failed with exit status {code}; see {out / (name + '.log')}")
    return start, end


def timed_tokenize_batch(batch: pa.Table, **kwargs) -> pa.Table:
    """`tokenize_batch`, adding each row's share of the seconds its call took."""
    from pipelines.tokenizing import tokenize_batch

    start = time.perf_counter()
    out = tokenize_batch(batch, **kwargs)
    share = (time.perf_counter() - start) / max(batch.num_rows, 1)
    return out.append_column("call_seconds", pa.array([share] * batch.num_rows, pa.float64()))


def tokenizing_capacity(corpus: Path, model_dir: str, sort_rows: int, cpus: int) -> dict:
    """Rows/s of the tokenising stage alone: Ray Data tasks on `cpus` CPUs, as `jobs/score.py` builds it.
    Capacity = rows over the seconds spent inside the tasks' calls, divided over the CPUs (what the stage
    sustains once running); with Ray Data's start included too."""
    import ray
    import ray.data

    from pipelines.data import streaming_parquet_reader
    from pipelines.tokenizing import TokenizerFiles

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        with streaming_parquet_reader(preserve_order=True):
            dataset = ray.data.read_parquet(str(corpus), num_cpus=0).map_batches(
                timed_tokenize_batch,
                fn_kwargs={"tokenizer": TokenizerFiles.from_directory(model_dir), "text_column": "text"},
                batch_size=sort_rows,
                batch_format="pyarrow",
                num_cpus=1,
            )
        start = time.perf_counter()
        rows, busy = 0, 0.0
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += batch.num_rows
            busy += float(pa.compute.sum(batch["call_seconds"]).as_py())
        seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {
        "cpus": cpus,
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / (busy / cpus), 1),
        "rows_per_s_per_cpu": round(rows / busy, 1),
        "rows_per_s_with_start": round(rows / seconds, 1),
    }


def model_capacity(corpus: Path, model_dir: str, batch_size: int, sort_rows: int, rows: int = 50_000) -> dict:
    """Rows/s of the model alone on this machine's GPU (or CPU): the corpus's first `rows` rows tokenised
    first, then scored as a scoring actor scores them (`predict_tokens`, `sort_rows` rows a call, `batch_size`
    rows a layer step), early exit at the model's stored setting and at full depth; results copied back to
    the host."""
    import torch

    from ee_model import EarlyExitClassifier, ExitSetting

    model = EarlyExitClassifier.from_pretrained(model_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    texts = pq.read_table(corpus, columns=["text"])["text"].slice(0, rows).to_pylist()
    calls = [model.tokenize(texts[s : s + sort_rows]) for s in range(0, len(texts), sort_rows)]
    result = {}
    for name, setting in (("early_exit", model.config.setting()), ("full_depth", ExitSetting("none"))):
        model.predict_tokens(calls[0], setting=setting, batch_size=batch_size)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        layers = [model.predict_tokens(c, setting=setting, batch_size=batch_size).exit_layer for c in calls]
        seconds = time.perf_counter() - start
        mean_layer = float(sum(x.sum() for x in layers) / len(texts))
        result[name] = {"rows_per_s": round(len(texts) / seconds, 1), "mean_exit_layer": round(mean_layer, 3)}
    result["layer_speedup"] = round(model.n_layers / result["early_exit"]["mean_exit_layer"], 3)
    result["early_over_full"] = round(
        result["early_exit"]["rows_per_s"] / result["full_depth"]["rows_per_s"], 3
    )
    result["early_over_full_per_layer_speedup"] = round(
        result["early_over_full"] / result["layer_speedup"], 3
    )
    return result


def registered_model_dir(tracking_uri: str, destination: Path) -> str:
    """The registered candidate's files, downloaded once for the capacity measurements."""
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from pipelines.model_source import resolve_model

    return str(resolve_model(f"models:/{MODEL_NAME}@candidate", destination).directory)


def stage_runs(tracking_uri: str, parent_run_id: str) -> dict[str, dict]:
    """Wall time, worker placement and feature-store metrics of each training stage, read back from its
    MLflow child run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {
        run.info.run_name: {
            "seconds": round((run.info.end_time - run.info.start_time) / 1000, 1),
            **{k: v for k, v in run.data.tags.items() if k.startswith("worker.")},
            **{k: v for k, v in run.data.metrics.items() if k.startswith("feature_")},
        }
        for run in children
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--encoder", required=True, help="dir with the encoder's config + tokenizer, or 'tiny'"
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "e2e-out")))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ee-e2e"))
    parser.add_argument("--rows", type=int, default=50_000, help="paragraphs to score")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--cpu", action="store_true", help="no GPU: train and score on CPU (checks the path)")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--sort-rows", type=int, default=8192)
    parser.add_argument("--train-set", action="append", default=[], help="extra --set for jobs/train.py")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    tracking_uri = f"sqlite:///{args.work / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    result: dict = {"device": "cpu" if args.cpu else None, "rows": args.rows}
    if not args.cpu:
        import torch

        result["device"] = torch.cuda.get_device_name()
        result["torch"] = torch.__version__
    encoder = random_encoder(args.encoder, args.work / "encoder")
    paragraph_corpus(args.rows, args.files, args.work / "corpus")

    gpu = ["--use-gpu"] if not args.cpu else ["--no-gpu"]
    sets = [f"--set={s}" for s in args.train_set]
    with GpuSampler() as sampler:
        train_args = [
            "jobs/train.py",
            *gpu,
            "--num-workers",
            "1",
            "--encoder",
            encoder,
            "--output",
            str(args.out / "train_summary.json"),
            *sets,
        ]
        start, end = run_job("train", train_args, args.out, env)
        train = json.loads((args.out / "train_summary.json").read_text())
        result["train"] = {
            "seconds": round(end - start, 1),
            "stages": stage_runs(tracking_uri, train["run_id"]),
            "registered": train["registered"],
            "gpu": sampler.busy_share(start, end),
        }
        model_dir = registered_model_dir(tracking_uri, args.work / "registered")
        free_cpus = max(1, (os.cpu_count() or 2) - 1)  # the scoring actor holds one
        result["tokenizing_capacity"] = tokenizing_capacity(
            args.work / "corpus", model_dir, args.sort_rows, free_cpus
        )
        print("tokenizing stage alone:", json.dumps(result["tokenizing_capacity"]), flush=True)
        start = time.time()
        result["model_capacity"] = model_capacity(
            args.work / "corpus", model_dir, args.batch_size, args.sort_rows
        )
        result["model_capacity"]["gpu"] = sampler.busy_share(start, time.time())
        print("model alone:", json.dumps(result["model_capacity"]), flush=True)
        # the actor-tokenising run (several times slower on a GPU) scores the first file only
        first_file = sorted((args.work / "corpus").glob("*.parquet"))[0]
        for name, policy, tokenize, corpus in (
            ("score_default", "default", "tasks", args.work / "corpus"),
            ("score_default_actor_tokenizes", "default", "actor", first_file),
            ("score_none", "none", "tasks", args.work / "corpus"),
        ):
            summary_file = args.out / f"{name}.json"
            score_args = [
                "jobs/score.py",
                "--model",
                f"models:/{MODEL_NAME}@candidate",
                "--input",
                str(corpus),
                "--output",
                str(args.work / f"scored-{tokenize}"),
                "--batch-size",
                str(args.batch_size),
                "--sort-rows",
                str(args.sort_rows),
                "--tokenize",
                tokenize,
                "--summary-file",
                str(summary_file),
            ]
            if not args.cpu:
                score_args += ["--gpus-per-actor", "1"]
            if policy == "none":
                score_args += ["--policy", "none"]
            start, end = run_job(name, score_args, args.out, env)
            summary = json.loads(summary_file.read_text())
            streaming = (summary["started_at"], summary["started_at"] + summary["seconds"])
            result[name] = {
                "tokenize": summary["tokenize"],
                "job_seconds": round(end - start, 1),
                "scoring_seconds": summary["seconds"],
                "rows_per_s": summary["rows_per_s"],
                "rows_in": summary["rows_in"],
                "rows_scored": summary["rows_scored"],
                "errors": summary["errors"],
                "mean_exit_layer": summary["mean_exit_layer"],
                "flops_speedup": summary["flops_speedup"],
                "driver_busy_share": summary["driver_busy_share"],
                "policy": summary["policy"],
                "knob": summary["knob"],
                "gpu_while_scoring": sampler.busy_share(*streaming),
                "gpu_whole_job": sampler.busy_share(start, end),
            }
    bound = min(
        result["tokenizing_capacity"]["rows_per_s"], result["model_capacity"]["early_exit"]["rows_per_s"]
    )
    result["end_to_end_over_bound"] = round(result["score_default"]["rows_per_s"] / bound, 3)  # target >= 0.8
    result["stage_over_actor_tokenizing"] = round(
        result["score_default"]["rows_per_s"] / result["score_default_actor_tokenizes"]["rows_per_s"], 3
    )
    result["early_exit_vs_full_rows_per_s"] = round(
        result["score_default"]["rows_per_s"] / result["score_none"]["rows_per_s"], 3
    )
    text = json.dumps(result, indent=2)
    (args.out / "e2e.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
