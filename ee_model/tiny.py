"""Tiny randomly initialised encoders of each supported family, built from a config in code.

For tests and smoke runs: no hub access, a few layers of hidden size 32-64, a character-level WordPiece
vocabulary so any text tokenises. `write_tiny_encoder` writes a directory that `from_encoder` loads like any
pretrained checkpoint.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, BertTokenizer

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "a", "and", "of", "to", "in", "is", "good", "bad", "great", "awful", "sport", "money", "film"]


def tiny_tokenizer() -> BertTokenizer:
    characters = string.ascii_lowercase + string.digits
    tokens = SPECIAL_TOKENS + WORDS + list(characters + string.punctuation) + ["##" + c for c in characters]
    vocab = list(dict.fromkeys(tokens))  # "a" is a word and a character: one id each token, none past the end
    return BertTokenizer(vocab={token: index for index, token in enumerate(vocab)})


def tiny_encoder_config(
    model_type: str = "bert", num_layers: int = 3, hidden_size: int = 32, vocab_size: int = 128
):
    """A `PretrainedConfig` of a tiny encoder; pad token id 0 matches `tiny_tokenizer`."""
    common: dict[str, Any] = {"vocab_size": vocab_size, "pad_token_id": 0, "max_position_embeddings": 514}
    if model_type == "distilbert":
        return AutoConfig.for_model(
            "distilbert",
            dim=hidden_size,
            n_layers=num_layers,
            n_heads=2,
            hidden_dim=2 * hidden_size,
            **common,
        )
    sizes = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
    )
    if model_type == "modernbert":  # global attention every 2nd layer, a local window of 8 tokens
        special = {"cls_token_id": 2, "sep_token_id": 3, "bos_token_id": 2, "eos_token_id": 3}
        return AutoConfig.for_model(
            model_type, **sizes, **common, **special, global_attn_every_n_layers=2, local_attention=8
        )
    if model_type == "deberta-v2":  # as DeBERTa-v3: bucketed relative attention, no absolute positions
        deberta = dict(
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            max_relative_positions=-1,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
            type_vocab_size=0,
        )
        return AutoConfig.for_model(model_type, **sizes, **common, **deberta)
    sizes["type_vocab_size"] = 2
    if model_type == "electra":
        sizes["embedding_size"] = hidden_size // 2  # exercises ELECTRA's embedding projection
    return AutoConfig.for_model(model_type, **sizes, **common)


def write_tiny_encoder(
    directory: str | Path, model_type: str = "bert", num_layers: int = 3, hidden_size: int = 32, seed: int = 0
) -> Path:
    """Save a random tiny encoder + tokenizer as a Hugging Face checkpoint directory."""
    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    config = tiny_encoder_config(model_type, num_layers, hidden_size, vocab_size=len(tokenizer))
    AutoModel.from_config(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
