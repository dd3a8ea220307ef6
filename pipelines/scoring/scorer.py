"""The map_batches callable: one model and tokenizer per actor, per-row early exit per batch."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ee_model import ExitSetting
from pipelines.model_source import load_shipped_model
from pipelines.text_column import column_texts
from pipelines.tokenizing import has_token_ids, token_ids_of

if TYPE_CHECKING:
    from ray import ObjectRef

    from pipelines.model_source import ModelFiles

OUTPUT_COLUMNS = ("label", "confidence", "exit_layer", "flops", "tokens", "probs", "error")
# each row's share of the seconds its scorer call took: summed by the driver for the pool's steady rate, then
# dropped (never written)
CALL_SECONDS = "__ee_call_seconds"


class Scorer:
    """Adds label, confidence, exit_layer, flops, tokens (and probs) and error to every row of a batch.

    Rows are never dropped: a null, empty or non-string text gets null outputs and its reason in `error`.
    When a tokenising stage ran before (pipelines.tokenizing), the batch carries token ids and the
    scorer only runs the model; else it tokenises the batch itself. Either way the batch's rows are sorted by
    length and run through the exit engine `batch_size` rows per layer step (layer pools on a GPU and for bf16
    and OpenVINO layers, per-batch compaction otherwise: `ee_model.layer_pools.default_pooling`), and come
    back in input order.
    """

    def __init__(
        self,
        model: ModelFiles | ObjectRef | str,
        text_column: str,
        setting: ExitSetting | None = None,
        include_probs: bool = False,
        cpus: float = 1.0,
        batch_size: int | None = None,
        column_prefix: str = "",
        runtime: str = "fp32",
    ) -> None:
        self.model = load_shipped_model(model, runtime, cpus)  # threads: the actor's CPUs, not the machine's
        self.text_column = text_column
        self.setting = setting or self.model.config.setting()  # None: the model's stored policy and knob
        self.include_probs = include_probs
        self.column_prefix = column_prefix  # e.g. "pred_": a labeled corpus keeps its own `label` column
        self.batch_size = batch_size  # None: the whole batch in one model call

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        batch_size = self.batch_size or max(batch.num_rows, 1)
        if has_token_ids(batch):
            token_ids, reasons, batch = token_ids_of(batch)
            out = self.model.predict_tokens(token_ids, reasons, setting=self.setting, batch_size=batch_size)
        else:
            texts = column_texts(batch[self.text_column])
            out = self.model.predict(texts, setting=self.setting, batch_size=batch_size, invalid="null")
        scored = np.array([e is None for e in out.error], dtype=bool)
        missing = ~scored
        columns = {
            "label": pa.array(out.label, pa.string()),
            "confidence": pa.array(out.confidence, pa.float32(), mask=missing),
            "exit_layer": pa.array(out.exit_layer, pa.int32(), mask=missing),
            "flops": pa.array(out.flops, pa.int64(), mask=missing),
            "tokens": pa.array(out.tokens, pa.int32(), mask=missing),
        }
        if self.include_probs:
            probs = [row.tolist() if ok else None for row, ok in zip(out.probs, scored, strict=True)]
            columns["probs"] = pa.array(probs, pa.list_(pa.float32()))
        columns["error"] = pa.array(out.error, pa.string())
        for name, values in columns.items():
            # input columns never clash: checked up front
            batch = batch.append_column(self.column_prefix + name, values)
        share = (time.perf_counter() - started) / max(batch.num_rows, 1)
        return batch.append_column(CALL_SECONDS, pa.array(np.full(batch.num_rows, share), pa.float64()))
