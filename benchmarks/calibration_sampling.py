"""Does `--calibrate-rows`' promise hold on a corpus in periodic order? Evenly spaced vs random samples.

A corpus of unseen BBC texts (those of `int8_throughput.unseen_bbc`) is arranged so that every `period`-th row
is one of the model's easiest rows (the most confident at its first exit, agreeing with full depth there) and
the rest are shuffled: fixed-size documents, templated records and interleaved sources put rows of one kind at
a fixed period. The calibration sample of `rows` rows is then
  - evenly spaced (what `jobs/score.py` took before it drew at random): with rows = corpus / period it holds
    only the easy rows;
  - drawn uniformly at random with each of `--seeds` seeds (what it takes now).
Each sample is calibrated as the job does (`pipelines.scoring.calibration.calibrate`, the model's policy,
min agreement 0.99, delta 0.05) and the chosen knob is run over the whole corpus: the promise holds when the
corpus agrees with full depth on >= 0.99 of its rows. With delta 0.05, random samples may miss it for about 1
seed in 20; the evenly spaced one misses it whenever the period lines up.

    python benchmarks/calibration_sampling.py --model /path/to/quick/model --corpus-rows 2000 --rows 400
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from int8_throughput import unseen_bbc  # noqa: E402


def periodic_corpus(model, texts: list[str], period: int) -> tuple[list[str], np.ndarray]:
    """`texts` reordered: every `period`-th row one of the easiest (lowest normalised entropy at the first
    exit among rows whose first exit agrees with full depth), the others shuffled between them; and the
    full-depth labels in that order."""
    from ee_model.signals import normalised_entropy
    from pipelines.scoring.calibration import agreement_pass

    recorded = agreement_pass(model, texts)
    first = recorded.logits[0]
    full = recorded.labels.numpy()
    entropy = normalised_entropy(first).numpy()
    agrees = first.argmax(-1).numpy() == full
    easiness = np.where(agrees, entropy, np.inf)
    slots = np.arange(0, len(texts), period)
    easiest = np.argsort(easiness, kind="stable")[: len(slots)]
    rest = np.random.default_rng(0).permutation(np.setdiff1d(np.arange(len(texts)), easiest))
    order = np.empty(len(texts), dtype=np.int64)
    order[slots] = easiest
    order[np.setdiff1d(np.arange(len(texts)), slots)] = rest
    return [texts[i] for i in order], full[order]


def corpus_agreement(model, texts: list[str], full: np.ndarray, calibration) -> float:
    out = model.predict(texts, setting=calibration.setting, batch_size=64)
    return float(np.mean(out.label_id == full))


def run(args) -> dict:
    from ee_model import EarlyExitClassifier
    from pipelines.config import S_GRID
    from pipelines.data import evenly_spaced_rows
    from pipelines.scoring.calibration import calibrate, sample_rows

    torch.set_num_threads(args.threads)
    model = EarlyExitClassifier.from_pretrained(args.model).eval()
    with tempfile.TemporaryDirectory() as scratch:
        texts = pq.read_table(unseen_bbc(Path(scratch), args.corpus_rows))["text"].to_pylist()
    period = args.corpus_rows // args.rows
    corpus, full = periodic_corpus(model, texts, period)
    policy = model.config.policy

    def calibrated(positions: np.ndarray, name: str) -> dict:
        start = time.perf_counter()
        calibration = calibrate(model, [corpus[i] for i in positions], policy, 0.99, 0.05, S_GRID)
        agreement = corpus_agreement(model, corpus, full, calibration)
        row = {
            "sample": name,
            "knob": calibration.knob,
            "bound": round(calibration.agreement_bound, 4),
            "met": calibration.met,
            "corpus_agreement": round(agreement, 4),
            "promise_held": agreement >= 0.99,
            "mean_exit_layer_on_sample": round(calibration.mean_exit_layer, 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        return row

    rows = [calibrated(evenly_spaced_rows(len(corpus), args.rows), "evenly spaced")]
    rows += [
        calibrated(sample_rows(len(corpus), args.rows, seed), f"random seed {seed}")
        for seed in range(args.seeds)
    ]
    random = rows[1:]
    summary = {
        "policy": policy,
        "corpus_rows": len(corpus),
        "sample_rows": args.rows,
        "period": period,
        "evenly_spaced": rows[0],
        "random_seeds": len(random),
        "random_promise_held": sum(r["promise_held"] for r in random),
        "random_corpus_agreement_min": min(r["corpus_agreement"] for r in random),
        "random_corpus_agreement_median": float(np.median([r["corpus_agreement"] for r in random])),
    }
    print(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a saved early-exit model directory")
    parser.add_argument("--corpus-rows", type=int, default=2000)
    parser.add_argument("--rows", type=int, default=400, help="calibration sample (--calibrate-rows)")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    run(parser.parse_args())


if __name__ == "__main__":
    main()
