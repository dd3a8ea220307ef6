"""The MLflow pyfunc of an early-exit model ("models from code": no pickled class).

Artifacts: `model_dir`, a directory written by `EarlyExitClassifier.save_pretrained` (safetensors, JSON
config, tokenizer). predict takes a DataFrame with a `text` column (or a list of strings) and runtime params
`policy`, `threshold`, `patience`, `risk`, `batch_size`. Every missing value is null (None or pd.NA: `null`
in a served model's JSON, never NaN); invalid texts get a null label, confidence, exit layer and FLOPs and a
reason in `error`, as `jobs/score.py` writes them. A knob the policy does not take is refused, as the job
refuses it, and a frame without `text`, each with its one-line reason (`mlflow models serve` answers 400
with it; the logged signature's knob defaults are None; models logged before fill absent knobs with their
stored value, so only a value other than that counts as given); an empty frame gives an empty frame.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE


class EarlyExitPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ee_model import EarlyExitClassifier

        self.model = EarlyExitClassifier.from_pretrained(context.artifacts["model_dir"])

    # no type hints: MLflow would infer a schema from them
    def predict(self, context, model_input, params=None):
        from ee_model.policies import KNOB_OF_POLICY

        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise MlflowException(
                    f"input needs a 'text' column; got columns {list(model_input.columns)}",
                    INVALID_PARAMETER_VALUE,
                )
            texts = model_input["text"].tolist()
        else:
            texts = list(model_input)
        config = self.model.config
        policy = params.get("policy") or config.policy
        for knob in ("threshold", "patience", "risk"):
            value = params.get(knob)
            if knob != KNOB_OF_POLICY.get(policy) and value is not None and value != getattr(config, knob):
                # an MlflowException keeps its message through `mlflow models serve` (HTTP 400); any other
                # exception is answered there with a generic one, the reason only in the stack trace
                raise MlflowException(
                    f"policy {policy!r} does not use {knob}={value!r}: drop it", INVALID_PARAMETER_VALUE
                )
        if not texts:
            return empty_output()
        out = self.model.predict(
            texts,
            policy=params.get("policy"),
            threshold=params.get("threshold"),
            patience=params.get("patience"),
            risk=params.get("risk"),
            batch_size=int(params.get("batch_size") or 32),
            invalid="null",
        )
        scored = np.array([e is None for e in out.error], dtype=bool)
        return pd.DataFrame(
            {
                # object columns hold None where a value is missing (pandas' default for strings holds
                # NaN, which a served model's JSON would carry as a bare NaN token)
                "label": pd.Series(out.label, dtype=object),
                "confidence": pd.Series(out.confidence, dtype="Float32").where(scored, pd.NA),
                "exit_layer": pd.Series(out.exit_layer, dtype="Int32").where(scored, pd.NA),
                "flops": pd.Series(out.flops, dtype="Int64").where(scored, pd.NA),
                "error": pd.Series(out.error, dtype=object),
            }
        )


def empty_output() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "label": pd.Series([], dtype=object),
            "confidence": pd.Series([], dtype="Float32"),
            "exit_layer": pd.Series([], dtype="Int32"),
            "flops": pd.Series([], dtype="Int64"),
            "error": pd.Series([], dtype=object),
        }
    )


mlflow.models.set_model(EarlyExitPyfunc())
