"""Running the encoder layer by layer reproduces the encoder's own forward for every supported family."""

import pytest
import torch
from transformers import AutoConfig, AutoModel

from ee_model import EarlyExitClassifier, encoders
from ee_model.heads import pool
from ee_model.tiny import tiny_tokenizer
from tests.conftest import ALL_FAMILIES, LABELS, NEWER_FAMILIES, random_texts


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_layerwise_run_matches_the_encoders_forward_at_every_layer(tiny_encoder_dir, model_type):
    """Every layer's output equals the model's own (its hidden_states; the last one as the encoder returns it,
    through ModernBERT's final norm), and what the heads pool at the last layer equals the model's
    last_hidden_state pooled, for every pooling. ModernBERT's local layers see rows far longer than their
    8-token window next to rows shorter than it (padding)."""
    path = tiny_encoder_dir(model_type, num_layers=4)
    model = EarlyExitClassifier.from_encoder(path, labels=LABELS).eval()
    reference = AutoModel.from_pretrained(path).eval()
    texts = random_texts(6, seed=1) + ["a", "the film " * 30]
    batch = model.tokenizer(texts, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < 8 < lengths.max()  # shorter and longer than ModernBERT's window
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch and model_type not in ("distilbert", "modernbert"):
        kwargs["token_type_ids"] = batch["token_type_ids"]
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = reference(**kwargs, output_hidden_states=True)
        hidden = encoders.embed(
            model.encoder, batch["input_ids"], batch.get("token_type_ids"), batch["attention_mask"]
        )
        inputs = encoders.LayerInputs(model.encoder, hidden, batch["attention_mask"])
        for index, layer in enumerate(model.layers):
            hidden = encoders.run_layer(layer, hidden, inputs.for_layer(index))
            last = index == model.n_layers - 1
            mine = encoders.head_input(model.encoder, hidden) if last else hidden
            own = expected.hidden_states[index + 1]
            torch.testing.assert_close(mine[real], own[real], atol=1e-5, rtol=1e-5)
        seen = encoders.head_input(model.encoder, hidden)
        torch.testing.assert_close(seen[real], expected.last_hidden_state[real], atol=1e-5, rtol=1e-5)
        for pooling in ("cls", "mean"):
            torch.testing.assert_close(
                pool(seen, batch["attention_mask"], pooling),
                pool(expected.last_hidden_state, batch["attention_mask"], pooling),
                atol=1e-5,
                rtol=1e-5,
            )


def test_modernbert_local_layers_use_their_window():
    """A token past the window changes a local layer's output only through a global layer: with its local
    layer run on the full mask instead, the output differs (the test above would catch a swapped mask)."""
    from ee_model.tiny import tiny_encoder_config

    torch.manual_seed(0)
    encoder = AutoModel.from_config(tiny_encoder_config("modernbert", num_layers=2)).eval()
    ids = torch.randint(5, 60, (1, 30))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        hidden = encoders.embed(encoder, ids, None, mask)
        inputs = encoders.LayerInputs(encoder, hidden, mask)
        local = inputs.for_layer(1)  # layer 1: sliding_attention
        assert encoder.config.layer_types[1] == "sliding_attention"
        windowed = encoders.run_layer(encoder.layers[1], hidden, local)
        full = encoders.run_layer(encoder.layers[1], hidden, {**local, "attention_mask": None})
    assert not torch.allclose(windowed, full, atol=1e-4)


@pytest.mark.parametrize("model_type", NEWER_FAMILIES)
def test_layers_of_the_newer_families_are_not_exported(tiny_model, model_type, tmp_path):
    from ee_model.int8 import int8_layers
    from ee_model.openvino_layers import openvino_layers

    model = tiny_model(model_type, num_layers=2)
    with pytest.raises(ValueError, match="int8 layers are built for BERT-like encoders.*fp32 or bf16"):
        int8_layers(model, tmp_path / "int8")
    with pytest.raises(ValueError, match="OpenVINO layers are built for BERT-like encoders"):
        openvino_layers(model, tmp_path / "ov")
    assert not list(tmp_path.iterdir())


def test_deberta_v2_with_a_convolution_is_refused_in_one_line():
    config = AutoConfig.for_model(
        "deberta-v2", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, conv_kernel_size=3
    )
    with pytest.raises(ValueError, match="conv_kernel_size > 0.*not supported; DeBERTa-v3"):
        EarlyExitClassifier.from_encoder_config(config, LABELS, tiny_tokenizer())


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
    config = AutoConfig.for_model("funnel", d_model=32, n_head=2, block_sizes=[1, 1], vocab_size=100)
    config.save_pretrained(tmp_path)  # config only: loading weights would fail differently
    with pytest.raises(ValueError, match="'funnel' is not supported"):
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
