"""FLOPs in the paper's convention: hand counts, the published BERT-base numbers, and FlopCounterMode."""

import numpy as np
import pytest
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig

from ee_model import FlopsModel, flops_speedup, layer_speedup, make_policy
from ee_model.flops import head_flops, transformer_layer_flops


def test_bert_base_layer_matches_the_published_convention():
    assert transformer_layer_flops(768, 3072, 128) == 1_811_939_328


def test_hand_count_of_a_tiny_row():
    # hidden 32, intermediate 64, 10 tokens: per token 4*32*32 + 2*32*64 = 8192 MACs -> 2*10*8192 FLOPs
    model = FlopsModel(
        hidden_size=32,
        intermediate_size=64,
        embedding_size=32,
        n_layers=3,
        head_flops=head_flops("linear", 32, 3),
    )
    assert model.row_flops(10, 2) == 2 * (2 * 10 * 8192 + 2 * 32 * 3)
    assert model.full_depth_flops(10) == 3 * 2 * 10 * 8192 + 2 * 32 * 3
    assert head_flops("mlp", 32, 3) == 2 * (32 * 128 + 128 * 128 + 128 * 3)


def test_students_and_teacher_heads_counted_apart():
    linear, mlp = head_flops("linear", 32, 3), head_flops("mlp", 32, 3)
    model = FlopsModel(32, 64, 32, 3, head_flops=linear, student_head_flops=mlp)
    layer = transformer_layer_flops(32, 64, 10)
    assert model.row_flops(10, 2) == 2 * layer + 2 * mlp  # two students' heads
    assert model.row_flops(10, 3) == 3 * layer + 2 * mlp + linear  # and the teacher's
    assert model.full_depth_flops(10) == 3 * layer + linear  # the teacher only
    rows = model.row_flops(np.array([10, 10]), np.array([2, 3]))
    assert rows.tolist() == [2 * layer + 2 * mlp, 3 * layer + 2 * mlp + linear]


def test_speedups():
    model = FlopsModel(32, 64, 32, 4, head_flops=0)
    tokens, exits = np.array([10, 10]), np.array([1, 3])
    assert layer_speedup(4, exits) == pytest.approx(2.0)
    assert flops_speedup(model, tokens, exits) == pytest.approx(2.0)


def linear_flops_counted(model, texts, policy):
    """FLOPs of matmuls that come from nn.Linear (mm/addmm), measured by torch's own counter."""
    # the counter's module tracker hooks the leaf parameters a layer takes as inputs (DeBERTa's relative
    # embeddings), which fails when they need grad
    model.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model.predict(
            texts, policy=policy.name, threshold=getattr(policy, "threshold", None), batch_size=1
        )
    counts = counter.get_flop_counts()["Global"]
    linear = sum(v for op, v in counts.items() if str(op).split(".")[1] in ("mm", "addmm"))
    return linear, out


@pytest.mark.parametrize(
    "model_type, head_type, student_head_type",
    [
        ("bert", "linear", None),
        ("bert", "linear", "mlp"),  # MLP students, a linear teacher
        ("electra", "mlp", None),
        ("distilbert", "linear", None),
        ("roberta", "mlp", "linear"),
        ("modernbert", "linear", None),  # gated feed-forward
        ("deberta-v2", "mlp", None),  # relative-embedding projections in every layer
    ],
)
def test_flops_match_torch_flop_counter(tiny_model, model_type, head_type, student_head_type):
    model = tiny_model(model_type, num_layers=3, head_type=head_type, student_head_type=student_head_type)
    texts = ["the film was good", "money and sport and the bad film of the year"]
    for policy in (make_policy("none"), make_policy("entropy", threshold=0.999)):
        total = 0
        for text in texts:  # batch 1 per row: no padding, so the counter sees exactly the real tokens
            counted, out = linear_flops_counted(model, [text], policy)
            assert int(out.flops[0]) == counted, (policy, text, out.exit_layer)
            total += counted
        assert total > 0


def test_flops_of_the_newer_families_by_hand():
    modern = AutoConfig.for_model(
        "modernbert", hidden_size=768, intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12
    )
    model = FlopsModel.from_encoder_config(modern, "linear", 2)
    assert model.layer_flops(100) == 2 * 100 * (4 * 768**2 + 3 * 768 * 1152)  # Wi: H -> 2I, Wo: I -> H
    deberta = AutoConfig.for_model(
        "deberta-v2", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, relative_attention=True,
        position_buckets=256, share_att_key=True, pos_att_type=["p2c", "c2p"],
    )  # fmt: skip
    model = FlopsModel.from_encoder_config(deberta, "linear", 2)
    assert model.layer_flops(100) == transformer_layer_flops(768, 3072, 100) + 2 * 2 * (2 * 256) * 768**2


def test_flops_model_reads_encoder_configs():
    bert = AutoConfig.for_model("bert", hidden_size=768, intermediate_size=3072, num_hidden_layers=12)
    model = FlopsModel.from_encoder_config(bert, "linear", 2)
    assert model.row_flops(128, 12) - 12 * 2 * 768 * 2 == 12 * 1_811_939_328
    electra = AutoConfig.for_model("electra", embedding_size=128, hidden_size=256, intermediate_size=1024)
    assert FlopsModel.from_encoder_config(electra, "linear", 2).embedding_flops(10) == 2 * 10 * 128 * 256
    distil = AutoConfig.for_model("distilbert", dim=768, hidden_dim=3072, n_layers=6)
    assert FlopsModel.from_encoder_config(distil, "linear", 2).n_layers == 6
