"""Pipeline fixtures live in tests/conftest.py (shared with tests/jobs)."""

import pytest
import torch

from ee_model import EarlyExitClassifier
from tests.conftest import LABELS, labeled_table, unlabeled_table  # noqa: F401


@pytest.fixture
def model_dir(tmp_path, tiny_encoder_dir):
    torch.manual_seed(0)
    model = EarlyExitClassifier.from_encoder(
        tiny_encoder_dir("bert", num_layers=3), labels=LABELS, threshold=0.95
    )
    return str(model.save_pretrained(tmp_path / "model"))
