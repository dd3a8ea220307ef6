"""What the benchmarks share: the machine they ran on, a JSON record, unseen BBC text, `jobs/score.py` run
as a user runs it. Benchmarks are run as scripts (`python benchmarks/<name>.py`) with the project installed
(`scripts/setup.sh`), so `from common import ...` and the project's packages import without path set-up."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict[str, Any]:
    """What a result depends on: the CPU, its flags as `auto` reads them (ee_model.cpu_support), the CPUs
    this process may use, and the versions of torch and the runtimes."""
    import torch

    from ee_model.cpu_support import cpu_support

    support = cpu_support()
    record: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "bf16_flags": list(support.bf16),
        "int8_flags": list(support.int8),
        "onednn_max_cpu_isa": support.cap,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for package in ("onnxruntime", "openvino", "ray", "mlflow", "transformers"):
        try:
            record[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            record[package] = None
    return record


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    from ee_model.cpu_support import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def write_json(path: str | Path, record: dict[str, Any]) -> Path:
    """`record` with the machine it ran on, as indented JSON at `path` (folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **record}, indent=2, default=str))
    return path


def unseen_bbc(directory: Path, rows: int) -> Path:
    """`rows` texts of the dev and test articles (never trained on): their paragraphs, then sentence
    passages, distinct, shuffled; `gold` is the article's label."""
    from pipelines.config import DataConfig
    from pipelines.data import load_labeled_splits
    from pipelines.training.certification import article_pieces

    splits = load_labeled_splits(DataConfig())
    articles = pa.concat_tables([splits.dev, splits.test])
    texts, gold = [], []
    for text, label in zip(articles["text"].to_pylist(), articles["label"].to_pylist(), strict=True):
        pieces = article_pieces([text])
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


def run_score_job(model: str, inputs: Path, output: Path, scratch: Path, *flags: str) -> tuple[float, dict]:
    """(seconds from process start to exit, the job's JSON summary); the job's stderr on failure."""
    summary = scratch / "summary.json"
    command = [sys.executable, str(ROOT / "jobs" / "score.py"), "--model", model, "--input", str(inputs)]
    command += ["--output", str(output), "--summary-file", str(summary), *flags]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db", "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return seconds, json.loads(summary.read_text())


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


def plain_openvino(model, example: dict, sample: list[dict] | None = None):
    """(the plain classifier converted to OpenVINO, batch and sequence dynamic; the same after NNCF's
    post-training int8 quantisation on `sample`, the recipe a user follows (sentence-transformers' efficiency
    guide: model_type TRANSFORMER, a few hundred rows of their data, one row per item), or None without a
    sample). `example`: {"input_ids", "attention_mask"} tensors of two rows."""
    import copy

    import openvino as ov

    model = copy.deepcopy(model)  # the caller's model keeps its attention
    model.encoder.set_attn_implementation("eager")  # a plain additive mask, converted op for op
    with torch.no_grad():
        converted = ov.convert_model(
            PlainClassifier(model).eval(),
            example_input=example,
            input=[("input_ids", ov.PartialShape([-1, -1])), ("attention_mask", ov.PartialShape([-1, -1]))],
        )
    if not sample:
        return converted, None
    import nncf

    quantized = nncf.quantize(
        converted, nncf.Dataset(sample), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(sample)
    )
    return converted, quantized
