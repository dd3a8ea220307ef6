"""Student heads of their own type (`student_head_type`): MLP students distilling a linear teacher exit per
row exactly as the one-type models do, at any batch size and with layer pools, and travel with the model."""

import numpy as np
import pytest
import torch

from ee_model import EarlyExitClassifier, EarlyExitConfig, make_policy
from ee_model.heads import LinearHead, MLPHead
from tests.conftest import FAMILIES, random_texts
from tests.ee_model.test_early_exit import EXIT_RISK, random_policies


def test_students_and_teacher_get_their_own_head_types(tiny_model):
    model = tiny_model("bert", num_layers=4, student_head_type="mlp")
    assert [type(head) for head in model.heads] == [MLPHead, MLPHead, MLPHead, LinearHead]
    assert model.config.student_heads == "mlp" and model.config.head_type == "linear"
    same = tiny_model("bert", num_layers=4, head_type="mlp")
    assert [type(head) for head in same.heads] == [MLPHead] * 4 and same.config.student_heads == "mlp"


@pytest.mark.parametrize("model_type", FAMILIES)
def test_mlp_students_exit_alike_at_any_batch_size_with_pools_on_and_off(tiny_model, model_type):
    model = tiny_model(model_type, num_layers=4, seed=7, student_head_type="mlp")
    with torch.no_grad():  # random MLP heads are near uniform: sharpened, rows exit at different layers
        for head in model.heads[:-1]:
            head.out.weight.mul_(4.0)
    model.config = model.config.replace(exit_risk=EXIT_RISK)
    texts = random_texts(24, seed=7)
    batch = model.encode(texts)
    exits_seen = set()
    for policy, knobs in random_policies(seed=11, n_layers=4):
        single = model.predict(texts, policy=policy, batch_size=1, **knobs)
        batched = model.predict(texts, policy=policy, batch_size=24, **knobs)
        assert batched.label == single.label, (policy, knobs)
        np.testing.assert_array_equal(batched.exit_layer, single.exit_layer)
        np.testing.assert_array_equal(batched.flops, single.flops)
        rule = make_policy(policy, **knobs, exit_risk=EXIT_RISK)
        compaction = model.early_exit(batch["input_ids"], batch["attention_mask"], rule)
        pooled = model.early_exit(batch["input_ids"], batch["attention_mask"], rule, batch_size=5)
        assert pooled.exit_layer.tolist() == compaction.exit_layer.tolist(), (policy, knobs)
        exits_seen.update(single.exit_layer.tolist())
    assert len(exits_seen) >= 3, f"policies never exercised several exit layers: {exits_seen}"


def test_student_head_type_round_trips(tiny_model, tmp_path):
    model = tiny_model("distilbert", num_layers=3, student_head_type="mlp", threshold=0.95)
    texts = random_texts(10, seed=3)
    before = model.predict(texts, batch_size=4)
    model.save_pretrained(tmp_path)
    loaded = EarlyExitClassifier.from_pretrained(tmp_path)
    assert loaded.config.student_head_type == "mlp" and loaded.config == model.config
    after = loaded.predict(texts, batch_size=4)
    np.testing.assert_array_equal(after.probs, before.probs)
    np.testing.assert_array_equal(after.flops, before.flops)


def test_a_model_saved_before_student_head_type_loads_with_one_head_type(tiny_model, tmp_path):
    import json

    tiny_model("bert", num_layers=3).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "ee_config.json").read_text())
    del data["student_head_type"]
    (tmp_path / "ee_config.json").write_text(json.dumps(data))
    assert EarlyExitClassifier.from_pretrained(tmp_path).config.student_heads == "linear"


def test_an_unknown_student_head_type_is_refused():
    with pytest.raises(ValueError, match=r"student_head_type='conv' is not one of \['linear', 'mlp'\]"):
        EarlyExitConfig(encoder_name_or_path="x", labels=("a", "b"), student_head_type="conv")


def test_students_of_their_own_type_leave_the_teacher_and_the_random_stream_as_they_were(tiny_model):
    one_type = tiny_model("bert", num_layers=3, seed=2)
    after_one_type = torch.rand(4)
    own_students = tiny_model("bert", num_layers=3, seed=2, student_head_type="mlp")
    after_own_students = torch.rand(4)
    torch.testing.assert_close(own_students.heads[-1].out.weight, one_type.heads[-1].out.weight)
    torch.testing.assert_close(after_own_students, after_one_type)  # stage 1 would draw the same numbers
