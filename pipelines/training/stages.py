"""What each training stage is: its loss, whether it freezes the backbone, whether every row needs a gold
label, and how dev scores its checkpoints. The pipeline, the worker loop and the step ask the stage object;
nothing compares stage names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ee_model import joint_loss, stage1_loss, stage2_loss
from pipelines.config import JointConfig, Stage1Config, Stage2Config, StageConfig

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (exit logits (L, B, N), label ids (B,))


@dataclass(frozen=True)
class TrainingStage:
    name: str
    config_type: type[StageConfig]
    # KL stage 2: backbone and teacher frozen, students learn from the teacher, so unlabeled text counts
    freezes_backbone: bool = False

    @property
    def learns_from_unlabeled(self) -> bool:
        """Rows without a gold label (label id -100) are learned from, so the unlabeled corpus joins."""
        return self.freezes_backbone

    def loss(self, config: StageConfig) -> LossFn:
        raise NotImplementedError

    def dev_score(self, layer_accuracy: list[float]) -> float:
        """What selects the stage's best checkpoint: the mean accuracy over exits (every exit is trained)."""
        return sum(layer_accuracy) / len(layer_accuracy)


class Stage1(TrainingStage):
    def loss(self, config: Stage1Config) -> LossFn:
        return lambda logits, labels: stage1_loss(logits, labels, config.focal_gamma)

    def dev_score(self, layer_accuracy: list[float]) -> float:
        """Stage 1 trains the teacher only: its accuracy."""
        return layer_accuracy[-1]


class Stage2(TrainingStage):
    def loss(self, config: Stage2Config) -> LossFn:
        return lambda logits, labels: stage2_loss(
            logits, labels, kl_weight=config.kl_weight, gold_weight=config.gold_weight
        )


class Joint(TrainingStage):
    def loss(self, config: JointConfig) -> LossFn:
        return lambda logits, labels: joint_loss(logits, labels, config.joint_weighting)


STAGES: dict[str, TrainingStage] = {
    "stage1": Stage1("stage1", Stage1Config),
    "stage2": Stage2("stage2", Stage2Config, freezes_backbone=True),
    "joint": Joint("joint", JointConfig),
}


def stage_named(name: str) -> TrainingStage:
    if name not in STAGES:
        raise ValueError(f"stage={name!r} is not one of {list(STAGES)}")
    return STAGES[name]
