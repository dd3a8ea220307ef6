"""Training losses as pure functions of (exit logits, labels, weights).

logits are `ExitLogits.logits`: (n_layers, batch, num_labels), the last layer being the teacher.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F

JointWeighting = Literal["uniform", "layer_index"]


def check_label_ids(labels: torch.Tensor, num_labels: int) -> None:
    """Refuse label ids outside [0, num_labels): a label set that does not match the model's heads."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(
            f"label ids must be in [0, {num_labels}) for a {num_labels}-class model; "
            f"got min {int(labels.min())}, max {int(labels.max())}"
        )


def focal_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean of -(1 - p_t)^gamma log p_t; gamma = 0 is plain cross-entropy."""
    check_label_ids(labels, logits.shape[-1])
    log_p = torch.log_softmax(logits.float(), dim=-1)  # (batch, N)
    log_p_true = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)  # (batch,)
    if gamma == 0:
        return -log_p_true.mean()
    return (-(1 - log_p_true.exp()).pow(gamma) * log_p_true).mean()


def stage1_loss(logits: torch.Tensor, labels: torch.Tensor, focal_gamma: float = 0.0) -> torch.Tensor:
    """Stage 1 (KL variant): cross-entropy (or focal loss) of the teacher against gold labels."""
    return focal_cross_entropy(logits[-1], labels, focal_gamma)


def stage2_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    kl_weight: float = 1.0,
    gold_weight: float = 0.0,
) -> torch.Tensor:
    """Stage 2: sum over students of KL(teacher || student), the teacher's soft labels detached.

    FastBERT's self-distillation needs no labels (kl_weight=1, gold_weight=0). gold_weight > 0 adds the sum of
    the students' cross-entropy to gold labels (DeeBERT's recipe is kl_weight=0, gold_weight=1); rows without
    a gold label carry label -100 and are ignored by that term.
    """
    teacher_log_p = torch.log_softmax(logits[-1].detach().float(), dim=-1)  # (batch, N)
    students = logits[:-1].float()  # (L - 1, batch, N)
    total = students.new_zeros(())
    if kl_weight:
        student_log_p = torch.log_softmax(students, dim=-1)
        kl = F.kl_div(
            student_log_p, teacher_log_p.expand_as(student_log_p), reduction="none", log_target=True
        )
        total = total + kl_weight * kl.sum(dim=-1).mean(dim=-1).sum()  # batchmean per student, summed
    if gold_weight:
        if labels is None:
            raise ValueError("stage2_loss with gold_weight > 0 needs labels")
        if (labels != -100).any():
            ce = [F.cross_entropy(s, labels, ignore_index=-100) for s in students]
            total = total + gold_weight * torch.stack(ce).sum()
    return total


def joint_loss(
    logits: torch.Tensor, labels: torch.Tensor, weighting: JointWeighting = "uniform"
) -> torch.Tensor:
    """Count variant: cross-entropy of every exit, averaged with uniform or layer-index (PABEE) weights."""
    check_label_ids(labels, logits.shape[-1])
    n_layers = logits.shape[0]
    per_layer = torch.stack([F.cross_entropy(logits[j].float(), labels) for j in range(n_layers)])  # (L,)
    if weighting == "uniform":
        weights = torch.ones(n_layers, device=logits.device)
    elif weighting == "layer_index":
        weights = torch.arange(1, n_layers + 1, device=logits.device, dtype=torch.float32)
    else:
        raise ValueError(f"weighting={weighting!r} is not one of {list(get_args(JointWeighting))}")
    return (weights * per_layer).sum() / weights.sum()
