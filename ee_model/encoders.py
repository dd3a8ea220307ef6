"""Run a Hugging Face encoder one transformer layer at a time.

We load the encoder with `AutoModel` and reuse its own embeddings, mask builders, position encodings and
layers; nothing of the encoder is copied here. One small adapter per family (`Family`) says where its layers
are, what each layer takes beside the hidden states (`LayerInputs`), and what an exit head reads
(`head_input`):

- BERT-like (bert, roberta, xlm-roberta, camembert, electra, distilbert): each layer takes the padding mask;
  a head reads the layer's output.
- ModernBERT and the Ettin encoders (modernbert): each layer takes the mask of its kind (global attention, or
  the local window) and the rotary position embeddings of its kind; a head reads the layer's output through
  the encoder's final norm (applied after the last layer only, so inner layers' outputs are un-normalised),
  or, with the model option head_norm="own", a head normalises its pooled vector itself (`check_head_norm`).
- DeBERTa-v2/v3 (deberta-v2): each layer takes the padding mask, the relative positions and the relative
  embeddings the encoder builds once; a head reads the layer's output.

Every family is checked against the model's own forward at every layer (tests/ee_model/test_encoders.py).
Only the BERT-like layers take nothing but (hidden states, padding mask): those can be exported one by one
(int8 on ONNX Runtime, OpenVINO; `check_exportable`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask


@dataclass(frozen=True)
class Family:
    """How one encoder family runs layer by layer."""

    name: str
    layer_path: tuple[str, ...]  # attribute path of the layer list
    exportable: bool = True  # layers take only (hidden, padding mask): int8 / OpenVINO layers can be built
    final_norm: str | None = None  # a norm applied after the last layer only (inner outputs lack it)


BERT_LIKE = Family("BERT-like", ("encoder", "layer"))
FAMILIES: dict[str, Family] = {
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
    "xlm-roberta": BERT_LIKE,
    "camembert": BERT_LIKE,
    "electra": BERT_LIKE,
    "distilbert": Family("BERT-like", ("transformer", "layer")),
    "modernbert": Family("ModernBERT", ("layers",), exportable=False, final_norm="final_norm"),
    "deberta-v2": Family("DeBERTa-v2/v3", ("encoder", "layer"), exportable=False),
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def check_supported(model_type: str, config: Any = None) -> None:
    """ValueError in one line for an encoder this package cannot run layer by layer (`config`: its config,
    for the variants a family leaves out)."""
    if model_type not in FAMILIES:
        raise ValueError(
            f"encoder model_type {model_type!r} is not supported; supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "deberta-v2" and config is not None and getattr(config, "conv_kernel_size", 0):
        raise ValueError(
            "DeBERTa-v2 with a convolution after the first layer (conv_kernel_size > 0, as in "
            "deberta-v2-xlarge) is not supported; DeBERTa-v3 and v2 without it are"
        )


def check_head_norm(model_type: str, head_norm: str) -> None:
    """ValueError in one line for head_norm="own" on a family whose every layer ends in a norm of its own."""
    if head_norm == "own" and FAMILIES[model_type].final_norm is None:
        raise ValueError(
            f"head_norm='own' is for encoders whose inner layers leave un-normalised outputs (modernbert); "
            f"{model_type} layers end in a norm of their own: use head_norm='final'"
        )


def family_of(encoder: PreTrainedModel) -> Family:
    check_supported(encoder.config.model_type, encoder.config)
    return FAMILIES[encoder.config.model_type]


def check_exportable(encoder: PreTrainedModel, what: str) -> None:
    """ValueError in one line when `encoder`'s layers cannot be exported one by one for `what`."""
    family = family_of(encoder)
    if not family.exportable:
        raise ValueError(
            f"{what} layers are built for BERT-like encoders (a layer takes hidden states and a padding "
            f"mask); {family.name} layers take more: run this model in fp32 or bf16 on torch"
        )


def encoder_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    module: nn.Module = encoder
    for name in family_of(encoder).layer_path:
        module = getattr(module, name)
    return module  # type: ignore[return-value]


def drop_unused_pooler(encoder: PreTrainedModel) -> None:
    """BERT/RoBERTa carry a pooler we never use; unused parameters break DDP, so remove it."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None


def embed(
    encoder: PreTrainedModel,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token ids -> first hidden states (batch, seq, hidden), as the encoder's own forward computes them."""
    model_type = encoder.config.model_type
    if model_type in ("distilbert", "modernbert"):
        return encoder.embeddings(input_ids)
    if model_type == "deberta-v2":  # its embeddings zero the padding positions
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, mask=mask)
    hidden = encoder.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    project = getattr(encoder, "embeddings_project", None)  # ELECTRA when embedding size != hidden size
    if project is not None:
        hidden = project(hidden)
    return hidden


def attention_mask_for(encoder: PreTrainedModel, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The padding mask object a BERT-like encoder's layers expect (4-d additive/boolean mask, or None when
    nothing is masked)."""
    return create_bidirectional_mask(
        config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
    )


def additive_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """A 2-d padding mask (1 = token) as the (batch, 1, 1, seq) additive float32 mask eager attention adds to
    its scores: what a layer exported on its own (ONNX, OpenVINO) takes."""
    blocked = 1.0 - attention_mask[:, None, None, :].to(torch.float32)
    return blocked * torch.finfo(torch.float32).min


class LayerInputs:
    """What each layer of `encoder` takes beside the hidden states, for one batch of `hidden` (batch, width,
    hidden) with its 2-d padding `attention_mask`: `for_layer(index)` gives the keyword arguments. Built
    lazily and once per batch (ModernBERT: once per attention kind). `exported`: the layers were exported
    on their own (`Runtime.builds_layers`) and take the additive mask they were exported with."""

    def __init__(
        self,
        encoder: PreTrainedModel,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        exported: bool = False,
    ) -> None:
        self.encoder, self.hidden, self.attention_mask = encoder, hidden, attention_mask
        self.model_type = encoder.config.model_type
        self.exported = exported
        self._built: dict[str, dict[str, Any]] = {}  # per layer kind

    def for_layer(self, index: int) -> dict[str, Any]:
        if self.model_type == "modernbert":
            kind = self.encoder.config.layer_types[index]
        else:
            kind = self.model_type
        if kind not in self._built:
            self._built[kind] = self._build(kind)
        return self._built[kind]

    def _build(self, kind: str) -> dict[str, Any]:
        if self.exported:  # BERT-like families only (`check_exportable`)
            return {"attention_mask": additive_padding_mask(self.attention_mask)}
        if self.model_type == "modernbert":
            return self._modernbert(kind)
        if self.model_type == "deberta-v2":
            return self._deberta()
        return {"attention_mask": attention_mask_for(self.encoder, self.hidden, self.attention_mask)}

    def _modernbert(self, kind: str) -> dict[str, Any]:
        arguments = {
            "config": self.encoder.config,
            "inputs_embeds": self.hidden,
            "attention_mask": self.attention_mask,
        }
        if kind == "sliding_attention":
            mask = create_bidirectional_sliding_window_mask(**arguments)
        else:
            mask = create_bidirectional_mask(**arguments)
        positions = torch.arange(self.hidden.shape[1], device=self.hidden.device).unsqueeze(0)
        rotary = self.encoder.rotary_emb(self.hidden, positions, kind)
        return {"attention_mask": mask, "position_embeddings": rotary}

    def _deberta(self) -> dict[str, Any]:
        inner = self.encoder.encoder
        return {
            "attention_mask": inner.get_attention_mask(self.attention_mask),
            "relative_pos": inner.get_rel_pos(self.hidden),
            "rel_embeddings": inner.get_rel_embedding(),
        }


def run_layer(layer: nn.Module, hidden: torch.Tensor, inputs: dict[str, Any]) -> torch.Tensor:
    """One layer on `hidden` with its `inputs` (`LayerInputs.for_layer`)."""
    out = layer(hidden, **inputs)
    return out[0] if isinstance(out, tuple) else out  # DeBERTa (and older transformers) return tuples


def final_norm(encoder: PreTrainedModel) -> nn.Module | None:
    """The norm `encoder` applies after its last layer only (ModernBERT's `final_norm`), None for families
    whose layers each end in a norm."""
    name = family_of(encoder).final_norm
    return None if name is None else getattr(encoder, name)


def head_input(encoder: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """What an exit head pools with head_norm="final": ModernBERT's layers leave their output un-normalised
    (the encoder's final norm runs after the last layer only), so a head reads it through that norm, as the
    final classifier does; other families' layers end in a norm of their own."""
    norm = final_norm(encoder)
    return hidden if norm is None else norm(hidden)


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
