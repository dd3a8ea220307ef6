"""head_norm: ModernBERT's student heads read the layer through the encoder's final norm ("final") or
normalise their pooled vector with a norm of their own ("own"); other families refuse "own"."""

import pytest
import torch

from ee_model import EarlyExitClassifier, ExitSetting
from ee_model.heads import NormedHead
from tests.conftest import LABELS, random_texts


def test_own_norms_start_as_the_final_norm_and_read_the_raw_layer(tiny_model):
    """With cls pooling (one token: norm then pool == pool then norm) and the same head weights, an untrained
    "own" model gives the "final" model's logits at every exit; with mean pooling the students differ (the
    norm of a mean is not the mean of norms), the teacher does not."""
    final = tiny_model("modernbert", num_layers=3, pooling="cls")
    own = tiny_model("modernbert", num_layers=3, pooling="cls", head_norm="own")
    assert [type(h) is NormedHead for h in own.heads] == [True, True, False]
    norm = own.encoder.final_norm
    for head in own.heads[:-1]:
        torch.testing.assert_close(head.norm.weight, norm.weight)
        assert head.norm is not norm and head.norm.weight.data_ptr() != norm.weight.data_ptr()
    for own_head, final_head in zip(own.heads, final.heads, strict=True):
        (own_head.head if isinstance(own_head, NormedHead) else own_head).load_state_dict(
            final_head.state_dict()
        )
    inputs = final.encode(random_texts(5, seed=3) + ["a", "the film " * 30])
    with torch.no_grad():
        torch.testing.assert_close(own(**inputs).logits, final(**inputs).logits, atol=1e-5, rtol=1e-5)
        own.config = own.config.replace(pooling="mean")
        final.config = final.config.replace(pooling="mean")
        got, expected = own(**inputs).logits, final(**inputs).logits
    torch.testing.assert_close(got[-1], expected[-1])
    assert not torch.allclose(got[:-1], expected[:-1], atol=1e-4)


def test_own_norms_exit_the_same_in_every_engine_and_survive_save_and_load(tiny_model, tmp_path):
    model = tiny_model("modernbert", num_layers=4, head_norm="own", threshold=0.9)
    with torch.no_grad():
        for head in model.heads[:-1]:  # trained norms: no longer the final norm's copy
            head.norm.weight.mul_(torch.linspace(0.5, 1.5, head.norm.weight.numel()))
    texts = random_texts(24, seed=7, max_words=40)
    inputs = model.encode(texts)
    setting = ExitSetting("entropy", 0.9)
    pools = model.early_exit(**inputs, policy=setting, batch_size=5, layer_pools=True)
    compaction = model.early_exit(**inputs, policy=setting, batch_size=5, layer_pools=False)
    alone = [model.early_exit(**model.encode([t]), policy=setting) for t in texts]
    assert pools.exit_layer.tolist() == compaction.exit_layer.tolist()
    assert pools.exit_layer.tolist() == [int(a.exit_layer[0]) for a in alone]
    assert len(set(pools.exit_layer.tolist())) > 1  # rows leave at different layers
    torch.testing.assert_close(pools.logits, compaction.logits, atol=1e-5, rtol=1e-5)
    loaded = EarlyExitClassifier.from_pretrained(model.save_pretrained(tmp_path / "own"))
    assert loaded.config.head_norm == "own"
    again = loaded.early_exit(**inputs, policy=setting, batch_size=5)
    assert again.exit_layer.tolist() == pools.exit_layer.tolist()
    torch.testing.assert_close(again.logits, pools.logits)


def test_cached_student_features_give_the_text_path_with_own_norms(tiny_model):
    model = tiny_model("modernbert", num_layers=3, head_norm="own")
    inputs = model.encode(random_texts(6, seed=2))
    with torch.no_grad():
        text_path = model(**inputs).logits
        pooled = model.pooled_features(**inputs)
        cached = model(student_features=pooled[:-1], teacher_logits=text_path[-1]).logits
    torch.testing.assert_close(cached, text_path)


@pytest.mark.parametrize("model_type", ["bert", "deberta-v2"])
def test_own_norm_is_refused_where_every_layer_ends_in_a_norm(tiny_encoder_dir, model_type):
    with pytest.raises(ValueError, match=f"head_norm='own' is for .*modernbert.*{model_type} layers end"):
        EarlyExitClassifier.from_encoder(tiny_encoder_dir(model_type, 2), labels=LABELS, head_norm="own")


def test_an_unknown_head_norm_is_refused():
    from ee_model.config import ModelOptions

    with pytest.raises(ValueError, match=r"head_norm='layer' is not one of \['final', 'own'\]"):
        ModelOptions(head_norm="layer")
