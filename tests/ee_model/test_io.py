"""Save / load round trip: safetensors + JSON config + tokenizer, identical outputs, no pickle."""

import json

import numpy as np
import pytest

from ee_model import EarlyExitClassifier, EarlyExitConfig
from tests.conftest import ALL_FAMILIES, random_texts


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_round_trip_gives_identical_outputs(tiny_model, tmp_path, model_type):
    model = tiny_model(model_type, head_type="mlp", pooling="cls", variant="count", patience=2, threshold=0.3)
    texts = random_texts(12, seed=8)
    before = model.predict(texts, batch_size=4)
    model.save_pretrained(tmp_path)
    loaded = EarlyExitClassifier.from_pretrained(tmp_path)
    after = loaded.predict(texts, batch_size=4)
    assert after.label == before.label
    np.testing.assert_array_equal(after.exit_layer, before.exit_layer)
    np.testing.assert_array_equal(after.probs, before.probs)
    assert loaded.config == model.config
    assert loaded.config.policy == "count" and loaded.config.patience == 2


def test_saved_directory_holds_safetensors_config_and_tokenizer_only(tiny_model, tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "ee_config.json", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl", ".pickle"))]
    config = json.loads((tmp_path / "ee_config.json").read_text())
    assert config["labels"] == ["business", "sport", "tech"]
    assert config["encoder_config"]["model_type"] == "bert"
    assert {"head_type", "pooling", "variant", "policy", "threshold", "patience"} <= set(config)


def test_unknown_config_keys_are_refused(tiny_model, tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "ee_config.json").read_text())
    data["treshold"] = 0.5
    (tmp_path / "ee_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown EarlyExitConfig keys: \['treshold'\]"):
        EarlyExitClassifier.from_pretrained(tmp_path)


def test_loading_a_non_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved early-exit model directory"):
        EarlyExitClassifier.from_pretrained(tmp_path)


def test_weights_with_another_label_count_are_refused(tiny_model, tmp_path):
    tiny_model("bert").save_pretrained(tmp_path)
    data = json.loads((tmp_path / "ee_config.json").read_text())
    data["labels"] = ["a", "b"]  # 3 classes in the weights, 2 in the config
    (tmp_path / "ee_config.json").write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="size mismatch"):
        EarlyExitClassifier.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"head_type": "conv"}, "head_type='conv' is not one of"),
        ({"pooling": "max"}, "pooling='max' is not one of"),
        ({"threshold": 1.5}, r"threshold=1.5 must be a number in \[0, 1\]"),
        ({"patience": 0}, "patience=0 must be an integer >= 1"),
        ({"labels": ("a", "a", "b")}, r"labels contain duplicates: \['a'\]"),
        ({"labels": ("a",)}, "at least 2 classes"),
        ({"labels": ("a", "")}, "non-empty strings"),
        ({"labels": "ab"}, "must be a list of class names"),
    ],
)
def test_config_values_are_checked(changes, message):
    base = {"encoder_name_or_path": "x", "labels": ("a", "b")}
    with pytest.raises(ValueError, match=message):
        EarlyExitConfig(**{**base, **changes})


def test_the_risk_policy_travels_with_the_saved_model(tiny_model, tmp_path):
    from ee_model.exit_risk import ExitRisk

    model = tiny_model("bert", num_layers=3)
    exit_risk = ExitRisk(("entropy", "margin"), ((-3.0, 5.0, -1.0), (-2.0, 4.0, -1.0)))
    model.config = model.config.replace(policy="risk", risk=0.3, exit_risk=exit_risk)
    texts = random_texts(12, seed=3)
    before = model.predict(texts, batch_size=4)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "ee_config.json").read_text())
    assert stored["policy"] == "risk" and stored["exit_risk"] == {
        "signals": ["entropy", "margin"],
        "coefficients": [[-3.0, 5.0, -1.0], [-2.0, 4.0, -1.0]],
    }
    loaded = EarlyExitClassifier.from_pretrained(tmp_path)
    assert loaded.config == model.config
    after = loaded.predict(texts, batch_size=4)  # the stored default: risk 0.3
    np.testing.assert_array_equal(after.exit_layer, before.exit_layer)
    assert after.label == before.label

    stored["exit_risk"]["coefficients"] = [[-3.0, 5.0, -1.0]]  # one layer's fit for two student layers
    (tmp_path / "ee_config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="exit_risk has 1 layers' coefficients for 2 student layers"):
        EarlyExitClassifier.from_pretrained(tmp_path)
