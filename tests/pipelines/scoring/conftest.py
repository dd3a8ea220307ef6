"""The scoring tests' shared MLflow store (`helpers.TRACKING_URI`)."""

import pytest

from tests.pipelines.scoring import helpers


@pytest.fixture(scope="session", autouse=True)
def _one_scoring_store(tmp_path_factory):
    helpers.TRACKING_URI = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
