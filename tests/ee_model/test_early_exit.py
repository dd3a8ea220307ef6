"""Per-row early exit at any batch size equals batch-size-1 results and the one-pass reference."""

import random

import numpy as np
import pytest
import torch

from ee_model import exit_layers, make_policy
from ee_model.exit_risk import ExitRisk
from tests.conftest import ALL_FAMILIES_NEWER_SLOW, random_texts

# three student layers with different fitted risks: one r gives boundaries from entropy ~0.2 to 1 across them
EXIT_RISK = ExitRisk(("entropy", "margin"), ((-4.0, 6.0, -1.0), (-5.0, 6.0, -1.0), (-6.0, 6.0, -1.0)))


def random_policies(seed: int, n_layers: int):
    rng = random.Random(seed)
    yield "none", {}
    for _ in range(3):
        yield "entropy", {"threshold": rng.uniform(0.2, 1.0)}
        yield "risk", {"risk": rng.uniform(0.02, 0.8)}
    for t in range(1, n_layers):
        yield "count", {"patience": t}
        yield "patience", {"patience": t}


# seeds whose random encoders and heads exit at 3+ layers under these policies
SEEDS = {"modernbert": 4, "deberta-v2": 0}


@pytest.mark.parametrize("model_type", ALL_FAMILIES_NEWER_SLOW)
def test_batched_equals_batch_size_one_for_every_policy(tiny_model, model_type):
    model = tiny_model(model_type, num_layers=4, seed=SEEDS.get(model_type, 7))
    model.config = model.config.replace(exit_risk=EXIT_RISK)
    texts = random_texts(24, seed=7)
    exits_seen = set()
    for policy, knobs in random_policies(seed=11, n_layers=4):
        single = model.predict(texts, policy=policy, batch_size=1, **knobs)
        for batch_size in (5, 24):
            batched = model.predict(texts, policy=policy, batch_size=batch_size, **knobs)
            assert batched.label == single.label, (policy, knobs, batch_size)
            np.testing.assert_array_equal(batched.exit_layer, single.exit_layer)
            np.testing.assert_allclose(batched.probs, single.probs, atol=1e-5)
            np.testing.assert_array_equal(batched.flops, single.flops)
        exits_seen.update(single.exit_layer.tolist())
    assert len(exits_seen) >= 3, f"policies never exercised several exit layers: {exits_seen}"


@pytest.mark.parametrize(
    "policy, knobs",
    [
        ("entropy", {"threshold": 0.9}),
        ("risk", {"risk": 0.83}),  # about entropy 0.93 at layer 1, 1 after: layers 1 and 2
        ("count", {"patience": 1}),
        ("patience", {"patience": 2}),
    ],
)
def test_early_exit_matches_full_pass_reference(tiny_model, policy, knobs):
    """The exiting loop makes the same decision as the rule applied to a full-depth pass, row by row."""
    model = tiny_model("bert", num_layers=4, seed=5)
    model.config = model.config.replace(exit_risk=EXIT_RISK)
    texts = random_texts(40, seed=2)
    batch = model.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        all_logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
    rule = make_policy(policy, **knobs, exit_risk=EXIT_RISK)
    expected_layers = exit_layers(all_logits, rule)
    out = model.early_exit(batch["input_ids"], batch["attention_mask"], rule, batch["token_type_ids"])
    assert out.exit_layer.tolist() == expected_layers.tolist()
    chosen = all_logits[expected_layers - 1, torch.arange(len(texts))]
    torch.testing.assert_close(out.logits, chosen, atol=1e-5, rtol=1e-5)
    assert len(set(expected_layers.tolist())) >= 2


def test_threshold_zero_gives_the_teacher_output(tiny_model):
    model = tiny_model("distilbert", num_layers=3)
    texts = random_texts(10, seed=4)
    early = model.predict(texts, policy="entropy", threshold=0.0, batch_size=4)
    full = model.predict(texts, policy="none", batch_size=4)
    assert early.exit_layer.tolist() == [3] * 10
    np.testing.assert_allclose(early.probs, full.probs, atol=1e-6)


def test_larger_threshold_never_exits_later_end_to_end(tiny_model):
    model = tiny_model("electra", num_layers=4, seed=1)
    texts = random_texts(30, seed=9)
    previous = None
    for threshold in np.linspace(0, 1, 11):
        layers = model.predict(texts, policy="entropy", threshold=float(threshold), batch_size=8).exit_layer
        if previous is not None:
            assert (layers <= previous).all()
        previous = layers


def test_outputs_are_in_input_order_with_consistent_fields(tiny_model):
    model = tiny_model("bert")
    texts = random_texts(17, seed=3)
    out = model.predict(texts, policy="entropy", threshold=0.95, batch_size=4)
    one_by_one = [model.predict([t], policy="entropy", threshold=0.95).label[0] for t in texts]
    assert out.label == one_by_one
    assert np.allclose(out.probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.confidence, out.probs.max(axis=1))
    assert [model.config.labels[i] for i in out.label_id] == out.label
    assert out.error == [None] * 17


def test_stored_policy_and_threshold_are_the_defaults(tiny_model):
    model = tiny_model("bert", variant="count", patience=1)
    texts = random_texts(12, seed=5)
    default = model.predict(texts)
    explicit = model.predict(texts, policy="count", patience=1)
    assert default.exit_layer.tolist() == explicit.exit_layer.tolist()


def test_predict_takes_an_exit_setting(tiny_model):
    from ee_model import ExitSetting

    model = tiny_model("bert", num_layers=3, seed=1)
    texts = ["a short text", "another one that is a little longer", "x"]
    by_setting = model.predict(texts, setting=ExitSetting("entropy", 0.6))
    by_keywords = model.predict(texts, policy="entropy", threshold=0.6)
    assert by_setting.label == by_keywords.label and (by_setting.exit_layer == by_keywords.exit_layer).all()
    with pytest.raises(ValueError, match="not both"):
        model.predict(texts, policy="none", setting=ExitSetting("none"))
