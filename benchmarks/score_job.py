"""`jobs/score.py` run as a user (or a scheduler) runs it: a fresh process, its own MLflow store; for the
benchmarks that time the whole job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
