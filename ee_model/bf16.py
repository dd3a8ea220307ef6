"""bf16 transformer layers in PyTorch: the path with no extra dependency to the bf16 matrix units of a CPU
(AMX-BF16, AVX512-BF16, through oneDNN) or a GPU.

`with_bf16_layers` swaps each transformer layer for a `Bf16Layer` holding the layer's weights in bf16:
hidden states enter each layer in bf16 and leave it in float32, so the embeddings, the exit heads (small, and
what the exit decision reads), the exit engine and every policy run as in fp32, and rows still leave one by
one. Weights are cast once, not on every call as `torch.autocast` casts them (docs/results.md). Labels agree
with fp32 on >= 99 % of rows (tests/ee_model/test_runtimes.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ee_model import encoders
from ee_model.runtime import BF16, FP32

if TYPE_CHECKING:
    from ee_model.modeling import EarlyExitClassifier


class Bf16Layer(nn.Module):
    """One transformer layer with bf16 weights, called as the encoder's layer is (float32 in and out)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer.to(torch.bfloat16)

    def forward(self, hidden: torch.Tensor, **inputs: Any):
        # floating inputs (an additive mask, rotary or relative embeddings) in the layer's dtype
        out = encoders.run_layer(self.layer, hidden.to(torch.bfloat16), to_bf16(inputs))
        return out.float()


def to_bf16(value: Any) -> Any:
    """`value` with every floating tensor in it (in dicts, tuples, lists) cast to bf16."""
    if isinstance(value, torch.Tensor):
        return value.to(torch.bfloat16) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {key: to_bf16(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_bf16(item) for item in value)
    return value


def with_bf16_layers(model: EarlyExitClassifier) -> EarlyExitClassifier:
    """`model` with its transformer layers in bf16, in place (see the module doc)."""
    if model.runtime != FP32:
        raise ValueError(f"this model already runs {model.runtime.name} layers")
    layers = model.layers
    for index in range(len(layers)):
        layers[index] = Bf16Layer(layers[index])
    model.runtime = BF16
    return model.eval()
