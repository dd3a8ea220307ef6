"""The tracking setup: an experiment of a local sqlite store keeps its artifacts beside the database, whatever
folder the run starts in."""

from __future__ import annotations

import mlflow

from pipelines.tracking import local_artifact_root, setup_tracking


def test_a_sqlite_stores_artifacts_live_beside_it_not_in_the_working_folder(tmp_path, monkeypatch):
    store = tmp_path / "store with space"
    store.mkdir()
    monkeypatch.chdir(tmp_path)  # elsewhere than the store: MLflow's default would be ./mlruns here
    uri = f"sqlite:///{store}/mlflow.db"
    first = setup_tracking(uri, "beside")
    assert mlflow.get_experiment(first).artifact_location == (store / "mlruns").as_uri()
    with mlflow.start_run(experiment_id=first):
        mlflow.log_dict({"a": 1}, "a.json")
    assert list((store / "mlruns").rglob("a.json")) and not (tmp_path / "mlruns").exists()
    assert setup_tracking(uri, "beside") == first  # found again, not created twice
    assert local_artifact_root("sqlite:///rel/mlflow.db") == (tmp_path / "rel" / "mlruns").as_uri()
    assert local_artifact_root("http://tracking:5000") is None  # a server keeps its own
