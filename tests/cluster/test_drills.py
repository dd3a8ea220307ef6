"""Two-node drill and fault drills on a real Ray cluster (`ray start --head` + a second `ray start` node on
this machine), jobs submitted through the Ray job API as users do, tiny models.

The tests run in file order on one cluster; the last one kills the worker node.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from ee_model import EarlyExitClassifier
from pipelines.scoring.config import ScoreConfig
from pipelines.scoring.pipeline import run_scoring
from tests.cluster.local_cluster import RAY, ROOT, LocalCluster, committed_outputs, read_summary, wait_until
from tests.conftest import LABELS, labeled_table, random_texts

pytestmark = [pytest.mark.slow, pytest.mark.ray]
MODEL_NAME = "drill-ee"
FILES, ROWS_PER_FILE = 6, 2500


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("drills")


@pytest.fixture(scope="module")
def env(work):
    import os

    return {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture(scope="module")
def cluster(env):
    cluster = LocalCluster(env).start(cpus_per_node=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def job_env(env):
    return {
        k: env[k] for k in ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
    }


@pytest.fixture(scope="module")
def corpus(work):
    """FILES parquet files with a row_id each, big enough that scoring runs for a while."""
    folder = work / "corpus"
    folder.mkdir()
    for f in range(FILES):
        texts = random_texts(ROWS_PER_FILE, seed=100 + f, max_words=30)
        ids = pa.array(range(f * ROWS_PER_FILE, (f + 1) * ROWS_PER_FILE))
        pq.write_table(pa.table({"text": texts, "row_id": ids}), folder / f"part-{f}.parquet")
    return folder


@pytest.fixture(scope="module")
def scoring_model(work, tiny_encoder_dir):
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("bert", num_layers=3), labels=LABELS, threshold=0.9
    )
    return str(model.save_pretrained(work / "scoring-model"))


@pytest.fixture(scope="module")
def single_node_scores(ray_local, work, env, corpus, scoring_model) -> pa.Table:
    """The reference: the same scoring on the single-node local Ray of the test session, in-process."""
    summary = run_scoring(
        ScoreConfig(
            model=scoring_model,
            input=str(corpus),
            output=str(work / "scored-single"),
            batch_size=64,
            precision="fp32",  # as the drills score: exact at any batching
            tracking_uri=env["MLFLOW_TRACKING_URI"],
        )
    )
    assert summary.rows_scored == FILES * ROWS_PER_FILE
    return all_rows_once(work / "scored-single")


def train_args(work: Path, encoder: str, name: str, *extra: str) -> list[str]:
    train = work / "train.parquet"
    if not train.exists():
        pq.write_table(labeled_table(), train)
    return [
        "jobs/train.py",
        "--encoder",
        encoder,
        "--train-path",
        str(train),
        "--num-workers",
        "2",
        "--output",
        str(work / f"{name}.json"),
        "--set",
        f"tracking.registered_model_name={MODEL_NAME}",
        "--set",
        f"resources.storage_path={work / name}",
        "--set",
        "model.max_length=32",
        "--set",  # 192 training rows, as these drills were sized for (the default split is 70/15/15)
        "data.split_fractions=[0.8, 0.1, 0.1]",
        "--set",
        "stage1.learning_rate=5e-3",
        "--set",
        "stage2.learning_rate=1e-2",
        "--set",
        "eval.wallclock_rows=0",
        *extra,
    ]


def score_args(model: str, corpus: Path, output: Path, *extra: str) -> list[str]:
    return [
        "jobs/score.py",
        "--model",
        model,
        "--input",
        str(corpus),
        "--output",
        str(output),
        "--actors",
        "2",
        "--cpus-per-actor",
        "0.5",
        "--batch-size",
        "64",
        "--precision",  # fp32 is exact at any batching: two nodes must score as one does
        "fp32",
        "--summary-file",
        f"{output}.json",
        *extra,
    ]


def all_rows_once(output: Path) -> pa.Table:
    tables = [pq.read_table(p) for p in sorted(output.glob("*/*.parquet"))]
    assert len(tables) == FILES
    table = pa.concat_tables(tables)
    ids = table["row_id"].to_pylist()
    assert len(ids) == FILES * ROWS_PER_FILE and set(ids) == set(range(FILES * ROWS_PER_FILE))
    return table


def assert_same_scores(got: pa.Table, expected: pa.Table) -> None:
    """Same rows in the same order with the same labels and exit layers; confidences equal to float noise."""
    assert got.column_names == expected.column_names
    for column in ("row_id", "text", "label", "exit_layer", "flops", "tokens", "error"):
        assert got[column].to_pylist() == expected[column].to_pylist(), column
    np.testing.assert_allclose(got["confidence"].to_numpy(), expected["confidence"].to_numpy(), atol=1e-6)


def nodes_of(cluster: LocalCluster, actor_name: str) -> set[str]:
    roles = cluster.node_ids()
    return {roles.get(a["node_id"], "gone") for a in cluster.actors(actor_name, state=None)}


def test_two_node_training_survives_a_killed_train_worker_and_scoring_matches_a_single_node_run(
    cluster, work, env, job_env, corpus, tiny_encoder_dir, scoring_model, single_node_scores
):
    """Training through the CLI exactly as documented, one Train worker per node (STRICT_SPREAD); one of them
    is killed mid stage 1 and the group resumes from its last checkpoint, on both nodes again. Then scoring
    with two actors, one on each node, equals a single-node run."""
    started = time.time()
    command = [
        RAY,
        "job",
        "submit",
        "--no-wait",
        "--address",
        cluster.dashboard,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        __import__("json").dumps({"env_vars": job_env}),
        "--",
        sys.executable,
        *train_args(
            work,
            tiny_encoder_dir("bert", num_layers=3),
            "two-node",
            "--set",
            "resources.placement_strategy=STRICT_SPREAD",
            "--set",
            "stage1.epochs=10",
            "--set",
            "stage1.checkpoint_every_steps=10",
        ),
    ]
    submitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-3000:]
    job = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)
    # a checkpoint folder appears before Ray Train has registered the report; the manager's snapshot after
    wait_until(
        lambda: list((work / "two-node").glob("*stage1*/checkpoint_manager_snapshot.json")),
        timeout=600,
        every=0.5,
    )
    roles = cluster.node_ids()
    victim = next(  # the Train worker on the worker node: a remote rank dies
        a for a in cluster.wait_for_actors("RayTrainWorker", count=2) if roles.get(a["node_id"]) == "worker"
    )
    cluster.kill_pid(victim["pid"])
    assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)[-4000:]
    summary = read_summary(work / "two-node.json")
    assert summary["registered"]["version"] >= 1 and summary["test_accuracy_full_depth"] > 0.8
    assert nodes_of(cluster, "RayTrainWorker") == {"head", "worker"}  # both nodes trained
    client = MlflowClient(job_env["MLFLOW_TRACKING_URI"])
    stage1 = client.search_runs(
        [client.get_run(summary["run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}' and tags.mlflow.runName = 'stage1'",
    )[0]
    resumed = client.get_metric_history(stage1.info.run_id, "resumed_from_step")
    assert (
        resumed and resumed[0].value >= 1
    )  # restarted from its last checkpoint (step or epoch end), not step 0
    assert client.get_metric_history(stage1.info.run_id, "stage1_dev_score")

    # scoring with two actors: one on each node; the output equals a single-node run's
    job = cluster.submit(*score_args(scoring_model, corpus, work / "scored-two-node"), env_vars=job_env)
    assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)[-4000:]
    assert nodes_of(cluster, "Scorer") == {"head", "worker"}
    assert_same_scores(all_rows_once(work / "scored-two-node"), single_node_scores)
    print(f"\ndrill two-node train (a Train worker killed) + score: {time.time() - started:.1f} s")


def test_scoring_survives_a_killed_actor(cluster, work, job_env, corpus, scoring_model, single_node_scores):
    started = time.time()
    output = work / "scored-killed-actor"
    job = cluster.submit(*score_args(scoring_model, corpus, output), env_vars=job_env)
    victim = cluster.wait_for_actors("Scorer", count=1)[0]
    wait_until(lambda: committed_outputs(output) >= 1)
    assert committed_outputs(output) < FILES  # killed mid-run
    cluster.kill_pid(victim["pid"])
    assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)[-4000:]
    assert_same_scores(all_rows_once(output), single_node_scores)
    print(f"\ndrill kill scoring actor: {time.time() - started:.1f} s")


def test_killed_incremental_job_rerun_equals_a_clean_run(
    cluster, work, job_env, corpus, scoring_model, single_node_scores
):
    started = time.time()
    output = work / "scored-stopped"
    job = cluster.submit(*score_args(scoring_model, corpus, output), env_vars=job_env)
    wait_until(lambda: committed_outputs(output) >= 1)
    cluster.client().stop_job(job)  # SIGTERM, then SIGKILL, to the driver
    assert cluster.wait(job) == "STOPPED"
    done = committed_outputs(output)
    assert 1 <= done < FILES
    rerun = cluster.submit(*score_args(scoring_model, corpus, output), env_vars=job_env)
    assert cluster.wait(rerun) == "SUCCEEDED", cluster.logs(rerun)[-4000:]
    summary = read_summary(Path(f"{output}.json"))
    assert summary["files_skipped"] == done and summary["files_scored"] == FILES - done
    assert_same_scores(all_rows_once(output), single_node_scores)
    print(f"\ndrill kill + rerun incremental scoring: {time.time() - started:.1f} s")


def test_scoring_finishes_on_the_head_when_the_worker_node_dies(
    cluster, work, job_env, corpus, scoring_model, single_node_scores
):
    started = time.time()
    output = work / "scored-node-lost"
    job = cluster.submit(*score_args(scoring_model, corpus, output), env_vars=job_env)
    wait_until(lambda: {cluster.node_ids().get(a["node_id"]) for a in cluster.actors("Scorer")} >= {"worker"})
    wait_until(lambda: committed_outputs(output) >= 1)
    assert committed_outputs(output) < FILES
    cluster.kill_worker_node()
    assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)[-4000:]
    assert_same_scores(all_rows_once(output), single_node_scores)
    print(f"\ndrill kill worker node during scoring: {time.time() - started:.1f} s")
