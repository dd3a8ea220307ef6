"""The tokenising stage's function, without Ray: ids equal the model's, invalid rows keep their reason."""

import pyarrow as pa
import pytest

from ee_model import EarlyExitClassifier
from pipelines.tokenizing import (
    INVALID_COLUMN,
    TOKEN_IDS_COLUMN,
    TokenizerFiles,
    token_ids_of,
    tokenize_batch,
)
from tests.conftest import LABELS, random_texts


@pytest.fixture
def model(tiny_encoder_dir, tmp_path):
    model = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("roberta", num_layers=2), labels=LABELS, max_length=24
    )
    model.save_pretrained(tmp_path / "model")
    return model


def test_ids_and_reasons_round_trip(model, tmp_path):
    texts = [*random_texts(12, seed=3, max_words=40), None, "", "\u200b", "ok"]
    batch = pa.table({"text": pa.array(texts, pa.string()), "id": pa.array(range(len(texts)))})
    files = TokenizerFiles.from_directory(tmp_path / "model")
    assert "model.safetensors" not in files.files.files and "ee_config.json" in files.files.files
    out = tokenize_batch(batch, files, "text")
    assert out.column_names == ["text", "id", TOKEN_IDS_COLUMN, INVALID_COLUMN]
    assert out[TOKEN_IDS_COLUMN].type == pa.list_(pa.int32())
    assert out[TOKEN_IDS_COLUMN].null_count == 3
    token_ids, reasons, rest = token_ids_of(out)
    assert rest.column_names == ["text", "id"]
    assert reasons[12:15] == [
        "null text",
        "empty or whitespace-only text",
        "only control or zero-width characters",
    ]
    valid = [t for t, r in zip(texts, reasons, strict=True) if r is None]
    assert token_ids.to_lists() == model.tokenize(valid).to_lists()
    assert max(token_ids.lengths) == 24  # the model's max_length, read from its config


def test_a_batch_of_only_invalid_rows(model, tmp_path):
    batch = pa.table({"text": pa.array([None, " "], pa.string())})
    token_ids, reasons, _ = token_ids_of(
        tokenize_batch(batch, TokenizerFiles.from_directory(tmp_path / "model"), "text")
    )
    assert len(token_ids) == 0 and reasons == ["null text", "empty or whitespace-only text"]
    prediction = model.predict_tokens(token_ids, reasons)
    assert prediction.label == [None, None] and prediction.error == reasons


def test_the_tokenizer_loads_once_per_process(model, tmp_path):
    files = TokenizerFiles.from_directory(tmp_path / "model")
    assert files.load() is files.load()
    assert TokenizerFiles.from_directory(tmp_path / "model").digest == files.digest
