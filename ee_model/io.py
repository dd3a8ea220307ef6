"""Weights on disk: safetensors of the unwrapped module, loaded onto CPU, never pickled."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers so their prefixes never reach disk."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def save_weights(model: nn.Module, directory: str | Path) -> Path:
    path = Path(directory) / WEIGHTS_FILE
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in unwrap(model).state_dict().items()}
    save_file(state, str(path))
    return path


def load_weights(model: nn.Module, directory: str | Path) -> None:
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {directory}: not a saved early-exit model directory")
    unwrap(model).load_state_dict(load_file(str(path), device="cpu"), strict=True)
