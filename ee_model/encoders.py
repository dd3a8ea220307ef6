"""Run a Hugging Face encoder one transformer layer at a time.

We load the encoder with `AutoModel` and reuse its own embeddings, mask builder and layers; nothing of the
encoder is copied here. Supported families are those whose layers only need `(hidden, attention_mask)`:
checked against each model's own forward in tests/ee_model/test_encoders.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

# model_type -> attribute path of the layer list. DeBERTa is left out on purpose: its layers need
# relative-position inputs that the plain (hidden, mask) pattern does not give them.
LAYER_PATHS: dict[str, tuple[str, ...]] = {
    "bert": ("encoder", "layer"),
    "roberta": ("encoder", "layer"),
    "xlm-roberta": ("encoder", "layer"),
    "camembert": ("encoder", "layer"),
    "electra": ("encoder", "layer"),
    "distilbert": ("transformer", "layer"),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(LAYER_PATHS)


def check_supported(model_type: str) -> None:
    if model_type not in LAYER_PATHS:
        raise ValueError(
            f"encoder model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    check_supported(encoder.config.model_type)
    module: nn.Module = encoder
    for name in LAYER_PATHS[encoder.config.model_type]:
        module = getattr(module, name)
    return module  # type: ignore[return-value]


def drop_unused_pooler(encoder: PreTrainedModel) -> None:
    """BERT/RoBERTa carry a pooler we never use; unused parameters break DDP, so remove it."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


def embed(
    encoder: PreTrainedModel, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None
) -> torch.Tensor:
    """Token ids -> first hidden states (batch, seq, hidden), as the encoder's own forward computes them."""
    if encoder.config.model_type == "distilbert":
        return encoder.embeddings(input_ids)
    hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    project = getattr(encoder, "embeddings_project", None)  # ELECTRA when embedding size != hidden size
    if project is not None:
        hidden = project(hidden)
    return hidden


def attention_mask_for(encoder: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The mask object the encoder's layers expect (4-d additive/boolean mask, or None when nothing is
    masked)."""
    return create_bidirectional_mask(
        config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
    )


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    out = layer(hidden, attention_mask=mask)
    return out[0] if isinstance(out, tuple) else out  # older transformers returned tuples


@contextlib.contextmanager
def eager_attention(encoder: PreTrainedModel) -> Iterator[None]:
    """Inside the block the encoder's layers use eager attention, whose mask is a plain additive tensor: what
    a layer exported or converted on its own (ONNX, OpenVINO) takes op for op."""
    previous = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")
    try:
        yield
    finally:
        encoder.set_attn_implementation(previous)
