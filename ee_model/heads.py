"""Exit heads (one per transformer layer) and the pooling that feeds them."""

from __future__ import annotations

import torch
from torch import nn

MLP_WIDTH = 128  # the paper's Table 1 classifier: H -> 128 -> 128 -> N


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden) in float32 whatever `hidden`'s dtype (layers may pass bf16):
    first token, or mean over real (mask == 1) tokens. The mean is one batched matrix product of each row's
    token weights (1 / its length on real tokens, 0 on padding) with its hidden states, accumulated in
    float32 by the matmul kernels and faster than masking and summing (docs/results.md, "Measurements the code
    refers to"); bf16 states give their mean rounded to bf16 once, as each layer's output already is."""
    if pooling == "cls":
        return hidden[:, 0].float()
    mask = attention_mask.to(torch.float32)
    weights = mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (batch, seq)
    return torch.bmm(weights.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1).float()


class LinearHead(nn.Module):
    """The paper's internal classifier: Linear (+ Softmax, applied by the caller)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(pooled))  # (batch, num_labels)


class MLPHead(nn.Module):
    """The paper's Table 1 classifier: H -> 128 -> 128 -> N with tanh activations."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc_in = nn.Linear(hidden_size, MLP_WIDTH)
        self.fc_mid = nn.Linear(MLP_WIDTH, MLP_WIDTH)
        self.out = nn.Linear(MLP_WIDTH, num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.fc_in(self.dropout(pooled)))  # (batch, 128)
        x = torch.tanh(self.fc_mid(x))  # (batch, 128)
        return self.out(x)  # (batch, num_labels)


class NormedHead(nn.Module):
    """A head with a norm of its own on the pooled vector (head_norm="own"): for a layer whose output is
    un-normalised (ModernBERT's inner layers); the norm trains with the head."""

    def __init__(self, norm: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.head = head

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(pooled))


def build_head(
    head_type: str, hidden_size: int, num_labels: int, dropout: float, norm: nn.Module | None = None
) -> nn.Module:
    """One exit head; with `norm`, a `NormedHead` that normalises the pooled vector first."""
    if head_type == "linear":
        head: nn.Module = LinearHead(hidden_size, num_labels, dropout)
    elif head_type == "mlp":
        head = MLPHead(hidden_size, num_labels, dropout)
    else:
        raise ValueError(f"head_type={head_type!r} is not one of ['linear', 'mlp']")
    return head if norm is None else NormedHead(norm, head)
