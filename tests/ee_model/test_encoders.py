"""Running the encoder layer by layer reproduces the encoder's own forward for every supported family."""

import pytest
import torch
from transformers import AutoConfig, AutoModel

from ee_model import EarlyExitClassifier, encoders
from ee_model.tiny import tiny_tokenizer
from tests.conftest import FAMILIES, LABELS, random_texts


@pytest.mark.parametrize("model_type", FAMILIES)
def test_layerwise_run_matches_the_encoders_forward(tiny_encoder_dir, model_type):
    path = tiny_encoder_dir(model_type)
    model = EarlyExitClassifier.from_encoder(path, labels=LABELS).eval()
    reference = AutoModel.from_pretrained(path).eval()
    batch = model.tokenizer(random_texts(6, seed=1), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoders.embed(model.encoder, batch["input_ids"], batch.get("token_type_ids"))
        mask = encoders.attention_mask_for(model.encoder, hidden, batch["attention_mask"])
        for layer in model.layers:
            hidden = encoders.run_layer(layer, hidden, mask)
        kwargs = dict(batch)
        if model_type == "distilbert":
            kwargs.pop("token_type_ids")
        expected = reference(**kwargs).last_hidden_state
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)


def test_one_head_per_layer_and_forward_shapes(tiny_model):
    model = tiny_model("bert", num_layers=4)
    batch = model.tokenizer(["a b c", "the film"], padding=True, return_tensors="pt")
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert len(model.heads) == 4
    assert out.logits.shape == (4, 2, len(LABELS))
    assert out.teacher.shape == (2, len(LABELS))
    assert out.students.shape == (3, 2, len(LABELS))


def test_unsupported_architecture_names_the_supported_ones():
    config = AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: \['bert', 'roberta'"):
        EarlyExitClassifier.from_encoder_config(config, LABELS, tiny_tokenizer())


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path):
    AutoConfig.for_model(
        "deberta-v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2
    ).save_pretrained(tmp_path)  # config only: loading weights would fail differently
    with pytest.raises(ValueError, match="'deberta-v2' is not supported"):
        EarlyExitClassifier.from_encoder(str(tmp_path), labels=LABELS)


def test_mlp_head_and_cls_pooling_build(tiny_model):
    model = tiny_model("roberta", head_type="mlp", pooling="cls")
    assert model.heads[0].fc_in.out_features == 128
    assert model.predict(["the film was good"]).label[0] in LABELS


def test_ee_model_imports_without_ray_or_mlflow():
    import subprocess
    import sys

    # Libraries may probe for optional packages (find_spec); what matters is that nothing imports them.
    code = (
        "import sys\n"
        "import ee_model, ee_model.tiny\n"
        "m = ee_model.tiny.write_tiny_encoder\n"
        "loaded = sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'mlflow', 'pipelines', 'jobs'})\n"
        "print('ok' if not loaded else f'imported: {loaded}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_tiny_vocabulary_has_an_embedding_for_every_id(tiny_model):
    model = tiny_model("bert")
    vocab = model.tokenizer.get_vocab()
    assert sorted(vocab.values()) == list(range(len(vocab)))  # no duplicate token, no gap
    ids = model.tokenizer(["9 z ~"], return_tensors="pt")["input_ids"]  # "##9"-style pieces: the last ids
    assert ids.max() < model.encoder.get_input_embeddings().num_embeddings
    assert model.predict(["year 2019: 99 ~~"]).label[0] in LABELS
