"""Bad input to predict: clear errors or defined results, never a crash deep inside torch."""

import numpy as np
import pytest

from ee_model import EarlyExitClassifier
from tests.conftest import LABELS


def test_empty_list_gives_an_empty_result(tiny_model):
    out = tiny_model("bert").predict([])
    assert len(out) == 0 and out.probs.shape == (0, len(LABELS))


@pytest.mark.parametrize(
    "texts, message",
    [
        (["fine", ""], r"row 1: empty or whitespace-only text"),
        (["   \n\t", "fine"], r"row 0: empty or whitespace-only text"),
        (["fine", None], r"row 1: null text"),
        (["fine", float("nan")], r"row 1: null text"),
        (["fine", 3, b"bytes"], r"row 1: not a string: int, row 2: not a string: bytes"),
    ],
)
def test_invalid_texts_raise_naming_the_rows(tiny_model, texts, message):
    with pytest.raises(ValueError, match=message):
        tiny_model("bert").predict(texts)


@pytest.mark.parametrize("texts", ["a single string", 42, None])
def test_texts_must_be_a_list(tiny_model, texts):
    with pytest.raises(TypeError, match="texts must be a list of strings"):
        tiny_model("bert").predict(texts)


def test_invalid_null_gives_defined_rows_and_scores_the_rest(tiny_model):
    model = tiny_model("bert")
    texts = ["the film", None, "", 7, "money and sport " * 200]
    out = model.predict(texts, invalid="null", batch_size=2)
    assert out.label[1] is None and out.label[2] is None and out.label[3] is None
    assert out.error[1] == "null text" and out.error[3] == "not a string: int"
    assert out.label[0] in LABELS and out.label[4] in LABELS and out.error[0] is None
    assert np.isnan(out.probs[1]).all() and out.exit_layer[1] == 0 and out.flops[1] == 0
    assert out.tokens[4] == model.config.max_length  # long texts are truncated, not refused
    assert out.label[0] == model.predict(["the film"]).label[0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size=0 must be >= 1"),
        ({"invalid": "skip"}, "invalid='skip' is not one of"),
        ({"policy": "entropy", "threshold": float("nan")}, r"threshold=nan must be a number in \[0, 1\]"),
    ],
)
def test_bad_predict_arguments(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model("bert").predict(["x"], **kwargs)


def test_bad_label_lists_are_refused(tiny_encoder_dir):
    path = tiny_encoder_dir("bert")
    with pytest.raises(ValueError, match="duplicates"):
        EarlyExitClassifier.from_encoder(path, labels=["a", "b", "a"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        EarlyExitClassifier.from_encoder(path, labels=[])


def test_text_of_only_zero_width_or_control_characters_is_invalid(tiny_model):
    out = tiny_model().predict(["\u200b\u200b", "\ufeff \x00", "fine \u200b"], invalid="null")
    assert out.error == ["only control or zero-width characters"] * 2 + [None]


def test_code_shipped_with_a_checkpoint_never_runs(tiny_encoder_dir, tmp_path):
    """A saved encoder whose config points at its own code (auto_map, unknown model_type): even with "y" on
    stdin, the code is not imported (trust_remote_code=False is passed to every Auto* load), and loading
    fails."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    encoder = shutil.copytree(tiny_encoder_dir("bert"), tmp_path / "encoder")
    marker = tmp_path / "remote-code-ran"
    (encoder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import BertConfig\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil-bert'\n"
    )
    config = json.loads((encoder / "config.json").read_text())
    config.update(model_type="evil-bert", auto_map={"AutoConfig": "evil.EvilConfig"})
    (encoder / "config.json").write_text(json.dumps(config))
    code = (
        "from ee_model import EarlyExitClassifier\n"
        f"EarlyExitClassifier.from_encoder({str(encoder)!r}, labels=['a', 'b'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert not marker.exists()
    assert result.returncode != 0 and "trust_remote_code" in result.stderr, result.stderr[-2000:]
