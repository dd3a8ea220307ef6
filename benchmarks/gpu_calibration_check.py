"""CUDA check of `pipelines.scoring.calibration` (what `jobs/score.py --calibrate-rows` runs in its Ray task).

On a GPU box with torch, transformers, pyarrow, scipy and scikit-learn (no Ray or MLflow needed): a randomly
initialised encoder of the given architecture with sharpened heads (so rows exit at different layers) is
calibrated on CPU and on CUDA, both in fp32 as the scorer runs; the knob and agreement must match, and the
model's own per-row early exit on CUDA at that knob must agree with full depth as the calibration said.

    python benchmarks/gpu_calibration_check.py --model <config + tokenizer dir> --texts <parquet> --out <json>
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoConfig, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ee_model import EarlyExitClassifier  # noqa: E402
from pipelines.config import S_GRID  # noqa: E402
from pipelines.scoring.calibration import calibrate  # noqa: E402


def timed_calibration(model, texts, device: str, target: float) -> tuple[dict, float]:
    start = time.perf_counter()
    result = calibrate(model.to(device), texts, "entropy", target, 0.05, S_GRID)
    return result.to_dict(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--out", default="benchmarks/results/calibration_cuda.json")
    args = parser.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    texts = [t for t in pq.read_table(args.texts)["text"].to_pylist() if t and t.strip()][: args.rows]
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder_config(
        AutoConfig.from_pretrained(args.model),
        list("abcde"),
        AutoTokenizer.from_pretrained(args.model),
        max_length=128,
    ).eval()
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.mul_(3)
    record = {}
    for target in (0.9, 0.99):
        cpu, cpu_s = timed_calibration(model, texts, "cpu", target)
        cuda, cuda_s = timed_calibration(model, texts, "cuda", target)
        full = np.array(model.predict(texts, policy="none", batch_size=256).label)
        early = np.array(model.predict(texts, policy="entropy", threshold=cuda["knob"], batch_size=256).label)
        record[str(target)] = {
            "cpu": cpu,
            "cuda": cuda,
            "cpu_s": cpu_s,
            "cuda_s": cuda_s,
            "scorer_agreement_cuda": float(np.mean(early == full)),
        }
        print(target, json.dumps(record[str(target)]), flush=True)
        assert (cpu["knob"], cpu["agreement"]) == (cuda["knob"], cuda["agreement"])
        assert record[str(target)]["scorer_agreement_cuda"] == cuda["agreement"]
    Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
