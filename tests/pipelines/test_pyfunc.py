"""The registry's pyfunc answers as jobs/score.py does: same refusals, same nulls for invalid rows, and an
empty frame for an empty one (a real sqlite MLflow store, the model logged as training logs it)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from ee_model import EarlyExitClassifier
from pipelines.tracking import log_pyfunc_model
from tests.conftest import random_texts


@pytest.fixture
def pyfunc(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("pyfunc")
    with mlflow.start_run():
        info = log_pyfunc_model(model_dir, ["a text", "another"])
    return mlflow.pyfunc.load_model(info.model_uri)


def test_a_knob_the_policy_does_not_take_is_refused(pyfunc):
    texts = pd.DataFrame({"text": ["a text"]})
    with pytest.raises(Exception, match=r"policy .entropy. does not use patience=5: drop it"):
        pyfunc.predict(texts, params={"policy": "entropy", "patience": 5})
    with pytest.raises(Exception, match=r"policy 'none' does not use threshold=0.3"):
        pyfunc.predict(texts, params={"policy": "none", "threshold": 0.3})
    with pytest.raises(Exception, match=r"does not use risk=0.2"):  # the model's own policy: entropy
        pyfunc.predict(texts, params={"risk": 0.2})
    assert len(pyfunc.predict(texts, params={"policy": "count", "patience": 2})) == 1


def test_invalid_rows_get_nulls_as_the_scoring_job_writes_them(pyfunc, model_dir):
    texts = random_texts(5, seed=1) + [None, ""]
    out = pyfunc.predict(pd.DataFrame({"text": texts}))
    expected = EarlyExitClassifier.from_pretrained(model_dir).predict(texts, invalid="null")
    assert out["label"].tolist()[:5] == expected.label[:5]
    assert out["exit_layer"].tolist()[:5] == expected.exit_layer[:5].tolist()
    assert out[["label", "confidence", "exit_layer", "flops"]].iloc[5:].isna().all().all()
    assert out["error"].tolist()[5:] == ["null text", "empty or whitespace-only text"]


def test_an_empty_frame_gives_an_empty_frame(pyfunc):
    out = pyfunc.predict(pd.DataFrame({"text": pd.Series([], dtype=object)}))
    assert len(out) == 0 and list(out.columns) == ["label", "confidence", "exit_layer", "flops", "error"]
