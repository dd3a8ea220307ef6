"""Registering: trainings that register one name at once (separate processes, one real sqlite store) each
get their own version; `candidate` ends on one of them and `champion` on the most accurate."""

from __future__ import annotations

import multiprocessing

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import CANDIDATE, CHAMPION, log_pyfunc_model, register, setup_tracking


def register_at_once(uri: str, model_uri: str, accuracy: float, barrier, results) -> None:
    mlflow.set_tracking_uri(uri)
    barrier.wait()  # every process registers at the same moment
    results.put(register(model_uri, "shared", accuracy, {}))


@pytest.mark.slow
def test_trainings_registering_one_name_at_once_get_distinct_versions_and_one_champion(tmp_path, model_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    setup_tracking(uri, "registry")
    with mlflow.start_run():
        model_uri = log_pyfunc_model(model_dir, ["a text", "another"]).model_uri
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(3), context.Queue()
    accuracies = [0.7, 0.9, 0.8]
    processes = [
        context.Process(target=register_at_once, args=(uri, model_uri, a, barrier, results))
        for a in accuracies
    ]
    for process in processes:
        process.start()
    registered = [results.get(timeout=300) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    versions = sorted(r["version"] for r in registered)
    assert versions == [1, 2, 3]  # one version each, none lost
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("shared", CHAMPION)
    best = next(r for r in registered if r["version"] == int(champion.version))
    assert champion.tags["dev_accuracy"] == "0.900000"
    assert [r["champion"] for r in registered].count(True) == 1 and best["champion"]
    assert int(client.get_model_version_by_alias("shared", CANDIDATE).version) in versions
    # later, one at a time: as accurate as the champion takes it over; less accurate does not
    assert register(model_uri, "shared", 0.9, {})["champion"]
    assert not register(model_uri, "shared", 0.85, {})["champion"]
    assert str(client.get_model_version_by_alias("shared", CHAMPION).version) == "4"


def test_a_worse_version_that_sets_champion_last_does_not_keep_it(tmp_path, model_dir):
    """The race itself, forced: a worse version that compared before and sets `champion` just after the
    better one did (what a second training does when both compare at once) loses it again."""
    import threading
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    setup_tracking(uri, "registry")
    with mlflow.start_run():
        model_uri = log_pyfunc_model(model_dir, ["a text", "another"]).model_uri
    client = MlflowClient(uri)
    worse = mlflow.register_model(model_uri, "shared").version
    client.set_model_version_tag("shared", worse, "dev_accuracy", "0.800000")

    def set_late() -> None:  # the worse training's set, after it saw no champion, just after the better's
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if str(client.get_model_version_by_alias("shared", CHAMPION).version) != str(worse):
                    break
            except mlflow.exceptions.MlflowException:
                pass  # no champion yet
            time.sleep(0.01)
        client.set_registered_model_alias("shared", CHAMPION, worse)

    late = threading.Thread(target=set_late)
    late.start()
    better = register(model_uri, "shared", 0.9, {})
    late.join()
    assert better["champion"]
    assert str(client.get_model_version_by_alias("shared", CHAMPION).version) == str(better["version"])


def test_a_store_path_with_spaces_logs_registers_and_resolves(tmp_path, model_dir, monkeypatch):
    """An MLflow store (sqlite) and artifacts under a folder named with spaces and non-ASCII characters,
    given as the relative sqlite URI users write: the model logs, registers, resolves by alias for scoring
    and loads as a pyfunc."""
    import pandas as pd

    from pipelines.config import TrackingConfig, resolve_tracking_uri
    from pipelines.model_source import resolve_model

    folder = tmp_path / "my mlflow störe"
    folder.mkdir()
    monkeypatch.chdir(folder)
    uri = resolve_tracking_uri(TrackingConfig(tracking_uri="sqlite:///mlflow db.sqlite"))
    assert uri == f"sqlite:///{folder}/mlflow db.sqlite"
    setup_tracking(uri, "spaced")
    with mlflow.start_run():
        model_uri = log_pyfunc_model(model_dir, ["a text", "another"]).model_uri
    registered = register(model_uri, "spaced", 0.5, {})
    assert registered["champion"] and (folder / "mlflow db.sqlite").is_file()
    source = resolve_model("models:/spaced@champion", tmp_path / "download here")
    assert source.version == "1" and (source.directory / "ee_config.json").is_file()
    out = mlflow.pyfunc.load_model("models:/spaced@champion").predict(pd.DataFrame({"text": ["a", None]}))
    assert out["error"].tolist() == [None, "null text"]


def test_a_champion_moved_back_by_hand_meets_later_trainings_only(tmp_path, model_dir, monkeypatch):
    """A rollback holds: a user points `champion` back at an older version; a later, less accurate training
    does not hand the title to the more accurate version the user moved away from (its claim is over)."""
    import pipelines.tracking as tracking

    monkeypatch.setattr(tracking, "CLAIM_CLOCK_MARGIN_SECONDS", 0.0)  # claims over the moment they end
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    setup_tracking(uri, "registry")
    with mlflow.start_run():
        model_uri = log_pyfunc_model(model_dir, ["a text", "another"]).model_uri
    client = MlflowClient(uri)
    assert register(model_uri, "shared", 0.9, {})["champion"]
    assert register(model_uri, "shared", 0.95, {})["champion"]
    client.set_registered_model_alias("shared", CHAMPION, "1")  # the user's rollback
    later = register(model_uri, "shared", 0.85, {})
    assert not later["champion"] and later["previous_champion_dev_accuracy"] == 0.9
    assert str(client.get_model_version_by_alias("shared", CHAMPION).version) == "1"
    assert register(model_uri, "shared", 0.92, {})["champion"]  # better than the champion: takes it
    tags = client.get_model_version("shared", "4").tags
    assert float(tags[tracking.CLAIM_STARTED_TAG]) <= float(tags[tracking.CLAIM_ENDED_TAG])
