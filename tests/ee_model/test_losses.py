"""Losses: stage 1 (teacher CE / focal), stage 2 (KL, frozen backbone + teacher), joint (uniform / PABEE)."""

import pytest
import torch
import torch.nn.functional as F

from ee_model import joint_loss, stage1_loss, stage2_loss
from tests.conftest import random_texts


def batch_for(model, n=8, seed=0):
    texts = random_texts(n, seed=seed)
    batch = model.tokenizer(texts, padding=True, return_tensors="pt")
    labels = torch.arange(n) % model.config.num_labels
    return batch, labels


def test_stage2_loss_leaves_backbone_and_teacher_without_gradients(tiny_model):
    model = tiny_model("bert", num_layers=3)
    model.freeze_for_stage2()
    model.train()
    assert not model.encoder.training and not model.teacher.training and model.heads[0].training
    batch, labels = batch_for(model)
    out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], train_encoder=False)
    loss = stage2_loss(out.logits, labels)
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for h in model.heads[:-1] for p in h.parameters()
    )


def test_stage2_kl_is_zero_when_students_copy_the_teacher():
    teacher = torch.randn(5, 4)
    logits = torch.stack([teacher, teacher + 3.0, teacher])  # shifted logits = same distribution
    assert stage2_loss(logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.stack([torch.randn(5, 4), teacher])
    expected = F.kl_div(F.log_softmax(other[0], -1), F.softmax(teacher, -1), reduction="batchmean")
    assert stage2_loss(other).item() == pytest.approx(expected.item(), rel=1e-5)


def test_stage2_gold_term_is_deeberts_recipe():
    logits = torch.randn(3, 6, 4)
    labels = torch.tensor([0, 1, 2, 3, -100, -100])  # unlabeled rows ignored
    expected = sum(F.cross_entropy(logits[j], labels, ignore_index=-100) for j in range(2))
    got = stage2_loss(logits, labels, kl_weight=0.0, gold_weight=1.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        stage2_loss(logits, None, gold_weight=1.0)


def test_stage1_is_teacher_cross_entropy_and_focal_generalises_it():
    logits = torch.randn(3, 6, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    assert stage1_loss(logits, labels).item() == pytest.approx(
        F.cross_entropy(logits[-1], labels).item(), rel=1e-6
    )
    assert stage1_loss(logits, labels, focal_gamma=2.0).item() < stage1_loss(logits, labels).item()
    stage1_loss(logits, labels).backward()
    assert logits.grad[:-1].abs().sum() == 0  # students untouched in stage 1


def test_joint_loss_weightings():
    logits = torch.randn(3, 6, 4)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    per_layer = [F.cross_entropy(logits[j], labels).item() for j in range(3)]
    assert joint_loss(logits, labels).item() == pytest.approx(sum(per_layer) / 3, rel=1e-5)
    pabee = (1 * per_layer[0] + 2 * per_layer[1] + 3 * per_layer[2]) / 6
    assert joint_loss(logits, labels, "layer_index").item() == pytest.approx(pabee, rel=1e-5)
    with pytest.raises(ValueError, match="weighting='depth' is not one of"):
        joint_loss(logits, labels, "depth")


@pytest.mark.parametrize("labels", [torch.tensor([0, 4]), torch.tensor([-1, 0])])
def test_label_ids_outside_the_model_label_set_are_refused(labels):
    logits = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"label ids must be in \[0, 4\) for a 4-class model"):
        stage1_loss(logits, labels)
    with pytest.raises(ValueError, match="label ids must be in"):
        joint_loss(logits, labels)
