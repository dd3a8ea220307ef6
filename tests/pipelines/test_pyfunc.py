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


def test_the_served_model_answers_strict_json_with_nulls_and_400_with_the_reason(pyfunc):
    """`mlflow models serve`'s own app (MLflow's scoring server, in process): a batch mixing a valid and a
    null text parses as strict JSON (no bare NaN) with null for every missing value; a knob the policy does
    not use is answered 400 with its one-line reason as the message (a frame without `text`, by MLflow's own
    schema check)."""
    import json

    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    client = TestClient(scoring_server.init(pyfunc))

    def post(body: dict):
        return client.post("/invocations", json=body)

    def strict(text: str):
        return json.loads(text, parse_constant=lambda token: pytest.fail(f"{token} in {text}"))

    answer = post({"dataframe_split": {"columns": ["text"], "data": [["good film"], [None], [""]]}})
    assert answer.status_code == 200
    valid, null, empty = strict(answer.text)["predictions"]
    assert isinstance(valid["label"], str) and valid["error"] is None and valid["exit_layer"] >= 1
    for row in (null, empty):
        assert {k: row[k] for k in ("label", "confidence", "exit_layer", "flops")} == dict.fromkeys(
            ("label", "confidence", "exit_layer", "flops")
        )
    assert (null["error"], empty["error"]) == ("null text", "empty or whitespace-only text")
    knob = post({"dataframe_split": {"columns": ["text"], "data": [["a"]]}, "params": {"patience": 5}})
    assert knob.status_code == 400
    assert strict(knob.text)["message"].endswith("policy 'entropy' does not use patience=5: drop it")
    column = post({"dataframe_split": {"columns": ["body"], "data": [["a"]]}})
    assert column.status_code == 400 and "missing inputs ['text']" in strict(column.text)["message"]
