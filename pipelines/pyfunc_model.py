"""The MLflow pyfunc of an early-exit model ("models from code": no pickled class).

Artifacts: `model_dir`, a directory written by `EarlyExitClassifier.save_pretrained` (safetensors, JSON
config, tokenizer). predict takes a DataFrame with a `text` column (or a list of strings) and runtime params
`policy`, `threshold`, `patience`, `risk`, `batch_size`; invalid texts get a null label and a reason in
`error`.
"""

from __future__ import annotations

import mlflow
import pandas as pd


class EarlyExitPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from ee_model import EarlyExitClassifier

        self.model = EarlyExitClassifier.from_pretrained(context.artifacts["model_dir"])

    def predict(
        self, context, model_input, params=None
    ):  # no type hints: MLflow would infer a schema from them
        params = params or {}
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"input needs a 'text' column; got columns {list(model_input.columns)}")
            texts = model_input["text"].tolist()
        else:
            texts = list(model_input)
        out = self.model.predict(
            texts,
            policy=params.get("policy"),
            threshold=params.get("threshold"),
            patience=params.get("patience"),
            risk=params.get("risk"),
            batch_size=int(params.get("batch_size") or 32),
            invalid="null",
        )
        return pd.DataFrame(
            {
                "label": out.label,
                "confidence": out.confidence,
                "exit_layer": out.exit_layer,
                "flops": out.flops,
                "error": out.error,
            }
        )


mlflow.models.set_model(EarlyExitPyfunc())
