"""Stage 2 from cached features equals stage 2 from texts: same data order and seed, same student weights."""

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from ee_model import EarlyExitClassifier
from pipelines.config import Stage2Config
from pipelines.feature_batches import FEATURES_COLUMN, TEACHER_COLUMN
from pipelines.tokenizing import TokenizerFiles, tokenize_batch
from pipelines.training.features import (
    PART_COLUMN,
    VALID_COLUMN,
    FeatureExtractor,
    FeatureStoreError,
    bytes_needed,
    check_disk,
)
from pipelines.training.stages import STAGES
from pipelines.training.steps import train_step
from tests.conftest import LABELS, random_texts


@pytest.fixture
def stage1_model(tiny_encoder_dir, tmp_path):
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("bert", num_layers=3), labels=LABELS, max_length=32, head_dropout=0.1
    )
    model.save_pretrained(tmp_path / "stage1")
    return model


def stage2_weights(model, batches, seed=3):
    """Student heads after one optimizer step per batch, stage 2's loss and optimizer, a fixed seed."""
    model = copy.deepcopy(model)
    model.freeze_for_stage2()
    model.train()
    stage, config = STAGES["stage2"], Stage2Config(learning_rate=1e-2, gold_weight=0.5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    torch.manual_seed(seed)  # head dropout draws the same masks in the same order on both paths
    losses = [
        train_step(model, b, stage, stage.loss(config), optimizer, scheduler, torch.device("cpu"))
        for b in batches
    ]
    return [p.detach().clone() for head in model.heads[:-1] for p in head.parameters()], losses


def text_batches(n_batches=6, size=8):
    texts = random_texts(n_batches * size, seed=9, max_words=30)
    labels = np.where(np.arange(len(texts)) % 3 == 0, -100, np.arange(len(texts)) % len(LABELS))
    return [
        {"text": texts[i : i + size], "label_id": labels[i : i + size]} for i in range(0, len(texts), size)
    ]


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-7), ("float16", 1e-4)])
def test_students_from_cached_features_equal_students_from_texts(stage1_model, tmp_path, dtype, tolerance):
    texts = text_batches()
    extractor = FeatureExtractor(str(tmp_path / "stage1"), dtype)
    cached = [extractor(extraction_rows(b["text"], b["label_id"])) for b in texts]
    assert cached[0][FEATURES_COLUMN].shape == (8, 2, 32) and cached[0][FEATURES_COLUMN].dtype == np.dtype(
        dtype
    )
    assert cached[0][TEACHER_COLUMN].shape == (8, 3)
    from_texts, text_losses = stage2_weights(stage1_model, texts)
    from_features, feature_losses = stage2_weights(stage1_model, cached)
    np.testing.assert_allclose(feature_losses, text_losses, rtol=tolerance, atol=tolerance)
    for a, b in zip(from_features, from_texts, strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=0)
    moved = max(
        float((a - p).abs().max())
        for a, p in zip(from_texts, stage2_weights(stage1_model, [])[0], strict=True)
    )
    assert moved > 10 * tolerance  # the steps changed the students: equal weights are not a no-op


def extraction_rows(texts, label_ids=None):
    """A batch as the extraction stream carries it: text, label id, store part."""
    n = len(texts)
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "label_id": pa.array(np.full(n, -100) if label_ids is None else label_ids, pa.int64()),
            PART_COLUMN: pa.array([0] * n, pa.int32()),
        }
    )


def test_rows_whose_text_cannot_be_read_are_marked_and_the_rest_match_a_clean_batch(stage1_model, tmp_path):
    extractor = FeatureExtractor(str(tmp_path / "stage1"), "float32")
    texts = random_texts(3, seed=4)
    out = extractor(extraction_rows([texts[0], None, texts[1], "  ", texts[2], ""]))
    assert out[VALID_COLUMN].tolist() == [True, False, True, False, True, False]
    assert not out[FEATURES_COLUMN][~out[VALID_COLUMN]].any()
    clean = extractor(extraction_rows(texts))
    np.testing.assert_allclose(out[TEACHER_COLUMN][out[VALID_COLUMN]], clean[TEACHER_COLUMN], atol=1e-6)
    np.testing.assert_allclose(out[FEATURES_COLUMN][out[VALID_COLUMN]], clean[FEATURES_COLUMN], atol=1e-6)
    assert list(out[PART_COLUMN]) == [0] * 6


def test_token_ids_from_the_tokenising_stage_give_the_same_features(stage1_model, tmp_path):
    extractor = FeatureExtractor(str(tmp_path / "stage1"), "float32")
    rows = extraction_rows([*random_texts(20, seed=5, max_words=60), None, ""])
    staged = tokenize_batch(rows, TokenizerFiles.from_directory(tmp_path / "stage1"), "text")
    by_actor, by_stage = extractor(rows), extractor(staged)
    assert by_stage[VALID_COLUMN].tolist() == by_actor[VALID_COLUMN].tolist() == [True] * 20 + [False] * 2
    for column in (FEATURES_COLUMN, TEACHER_COLUMN):
        np.testing.assert_allclose(by_stage[column], by_actor[column], atol=1e-6)


def test_the_cached_forward_needs_both_inputs(stage1_model):
    features = torch.zeros(2, 4, 32)
    with pytest.raises(ValueError, match="teacher_logits"):
        stage1_model(student_features=features)


def test_a_store_that_cannot_fit_is_refused_before_writing(tmp_path):
    needed = bytes_needed(rows=10**12, n_layers=6, hidden=384, num_labels=5, dtype="float16")
    assert needed == 10**12 * (5 * 384 * 2 + 5 * 4 + 8)
    with pytest.raises(FeatureStoreError, match="feature store needs about .* GiB .* free"):
        check_disk(tmp_path / "store", needed)
    check_disk(tmp_path / "store", 1000)
