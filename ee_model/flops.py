"""FLOPs in the paper's (and FastBERT's) convention.

Convention: FLOPs = 2 x multiply-accumulates of the `nn.Linear` layers only (biases, layer norms, softmax and
the attention-score matmuls QK^T and AV are not counted), at the row's real token count. Per transformer
layer and token: Q, K, V and output projections (4 H^2) plus the two feed-forward matrices (2 H I).
For BERT-base at 128 tokens this gives 2 * 128 * (4 * 768^2 + 2 * 768 * 3072) = 1,811,939,328 per layer,
the 1809.8-1809.9M the FastBERT and early-exit papers print. Each exit head that ran is counted once per row
(it reads one pooled vector). ELECTRA's embedding projection (E -> H per token) counts when present.

Per family: ModernBERT's feed-forward is gated (H -> 2I, then I -> H: 3 H I per token instead of 2 H I; its
local attention changes only the uncounted score matmuls). DeBERTa-v2/v3 also projects its relative
embeddings (2 x span rows, span = position_buckets or max_relative_positions) through the query and key
projections in every layer: 2 x 2 span H^2 MACs per layer, independent of the row's tokens (per row here, as a
row scored alone pays them; a batch shares them).

`tests/ee_model/test_flops.py` cross-checks these numbers against `torch.utils.flop_counter.FlopCounterMode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ee_model.heads import MLP_WIDTH


def transformer_layer_flops(
    hidden_size: int, intermediate_size: int, tokens: int | np.ndarray, ffn_matrices: int = 2
) -> Any:
    """2 x MACs of one layer's Linear modules at `tokens` real tokens (`ffn_matrices`: H x I matrices in the
    feed-forward, 3 when it is gated)."""
    return 2 * tokens * (4 * hidden_size * hidden_size + ffn_matrices * hidden_size * intermediate_size)


def relative_position_flops(encoder_config: Any) -> int:
    """DeBERTa-v2/v3: 2 x MACs of one layer's projections of the relative embeddings (0 for the others)."""
    if encoder_config.model_type != "deberta-v2" or not getattr(encoder_config, "relative_attention", False):
        return 0
    buckets = getattr(encoder_config, "position_buckets", -1)
    span = buckets if buckets > 0 else encoder_config.max_relative_positions
    if span < 1:
        span = encoder_config.max_position_embeddings
    if getattr(encoder_config, "share_att_key", False):
        projections = 2  # query and key projections, whatever the attention types
    else:
        projections = len({"c2p", "p2c"} & set(encoder_config.pos_att_type or ()))
    return 2 * projections * 2 * span * encoder_config.hidden_size**2


def head_flops(head_type: str, hidden_size: int, num_labels: int) -> int:
    """2 x MACs of one exit head on one pooled vector."""
    if head_type == "linear":
        return 2 * hidden_size * num_labels
    if head_type == "mlp":
        return 2 * (hidden_size * MLP_WIDTH + MLP_WIDTH * MLP_WIDTH + MLP_WIDTH * num_labels)
    raise ValueError(f"head_type={head_type!r} is not one of ['linear', 'mlp']")


@dataclass(frozen=True)
class FlopsModel:
    """Per-row FLOPs of one early-exit model, as a function of real tokens and exit layer."""

    hidden_size: int
    intermediate_size: int
    embedding_size: int  # == hidden_size unless ELECTRA projects embeddings
    n_layers: int
    head_flops: int  # the final classifier's (the teacher's)
    ffn_matrices: int = 2  # H x I matrices in each feed-forward (3: gated, ModernBERT)
    layer_constant: int = 0  # per layer and row whatever its tokens (DeBERTa's relative projections)
    student_head_flops: int | None = None  # each student head's; None: head_flops (the same type)

    def __post_init__(self) -> None:
        if self.student_head_flops is None:
            object.__setattr__(self, "student_head_flops", self.head_flops)

    @classmethod
    def from_encoder_config(
        cls, encoder_config: Any, head_type: str, num_labels: int, student_head_type: str | None = None
    ) -> FlopsModel:
        if encoder_config.model_type == "distilbert":
            hidden, intermediate, layers = (
                encoder_config.dim,
                encoder_config.hidden_dim,
                encoder_config.n_layers,
            )
        else:
            hidden = encoder_config.hidden_size
            intermediate = encoder_config.intermediate_size
            layers = encoder_config.num_hidden_layers
        embedding = getattr(encoder_config, "embedding_size", hidden) or hidden
        return cls(
            hidden,
            intermediate,
            embedding,
            layers,
            head_flops(head_type, hidden, num_labels),
            ffn_matrices=3 if encoder_config.model_type == "modernbert" else 2,
            layer_constant=relative_position_flops(encoder_config),
            student_head_flops=head_flops(student_head_type or head_type, hidden, num_labels),
        )

    @classmethod
    def of_model(cls, config: Any) -> FlopsModel:
        """The FLOPs model of an `EarlyExitConfig`: its stored encoder config and head types."""
        return cls.from_encoder_config(
            config.pretrained_encoder_config(), config.head_type, config.num_labels, config.student_heads
        )

    def layer_flops(self, tokens: int | np.ndarray) -> Any:
        """One transformer layer of a row with `tokens` real tokens."""
        linear = transformer_layer_flops(self.hidden_size, self.intermediate_size, tokens, self.ffn_matrices)
        return linear + self.layer_constant

    def embedding_flops(self, tokens: int | np.ndarray) -> Any:
        if self.embedding_size == self.hidden_size:
            return 0 * tokens
        return 2 * tokens * self.embedding_size * self.hidden_size

    def row_flops(self, tokens: int | np.ndarray, exit_layer: int | np.ndarray) -> Any:
        """FLOPs of rows with `tokens` real tokens that exit after layer `exit_layer` (1-based): the layers
        run, and the head of each (students up to layer n_layers - 1, the teacher's at the last)."""
        students = np.minimum(exit_layer, self.n_layers - 1)
        teacher = np.asarray(exit_layer) >= self.n_layers
        heads = students * self.student_head_flops + teacher * self.head_flops
        return self.embedding_flops(tokens) + exit_layer * self.layer_flops(tokens) + heads

    def full_depth_flops(self, tokens: int | np.ndarray) -> Any:
        """FLOPs of the same model run to the teacher only (no student head evaluated): the baseline."""
        return self.embedding_flops(tokens) + self.n_layers * self.layer_flops(tokens) + self.head_flops


def flops_speedup(flops_model: FlopsModel, tokens: np.ndarray, exit_layer: np.ndarray) -> float:
    """Total full-depth FLOPs / total early-exit FLOPs over a set of rows."""
    tokens = np.asarray(tokens, dtype=np.int64)
    spent = flops_model.row_flops(tokens, np.asarray(exit_layer, dtype=np.int64)).sum()
    return float(flops_model.full_depth_flops(tokens).sum() / spent)


def layer_speedup(n_layers: int, exit_layer: np.ndarray) -> float:
    """L / mean exit layer."""
    return float(n_layers / np.mean(exit_layer))
