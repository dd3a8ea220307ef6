"""Transformer layers run by OpenVINO on the CPU, the way `ee_model.int8` runs them with ONNX Runtime.

Each layer is converted on its own (`openvino.convert_model`, batch and sequence dynamic, a plain additive
mask input) and saved as OpenVINO IR into a folder checked like every per-layer cache
(`ee_model.layer_cache`: the weights' digest, a digest of every file). `with_openvino_layers` compiles them
once per model load and swaps them in: embeddings, heads, the exit engine and every policy stay as they are,
and rows still leave one by one. Precision is set when compiling: `bf16` runs the layers in bf16 on a CPU with
AMX-BF16 / AVX512-BF16 (OpenVINO's own default there), `fp32` forces f32. Needs the `openvino` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ee_model import encoders, layer_cache
from ee_model.int8 import MaskedLayer, additive_mask
from ee_model.runtime import FP32, Runtime, missing_backend

if TYPE_CHECKING:
    from ee_model.modeling import EarlyExitClassifier

MANIFEST = "openvino_layers.json"
FORMAT = 1  # of the folder: bump when the conversion changes, so older folders are rebuilt
HINTS = {"bf16": "bf16", "fp32": "f32"}  # OpenVINO's INFERENCE_PRECISION_HINT per precision


def layers_digest(model: EarlyExitClassifier) -> str:
    return layer_cache.layers_digest(model, ["openvino", FORMAT])


def _convert(model: EarlyExitClassifier, directory: Path, digest: str) -> None:
    import openvino as ov

    with encoders.eager_attention(model.encoder):  # a plain additive mask, converted op for op
        hidden = model.flops_model.hidden_size
        example = (torch.randn(2, 8, hidden), torch.zeros(2, 1, 1, 8))
        shapes = [ov.PartialShape([-1, -1, hidden]), ov.PartialShape([-1, 1, 1, -1])]
        for index, layer in enumerate(model.layers):
            with torch.no_grad():
                converted = ov.convert_model(MaskedLayer(layer).eval(), example_input=example, input=shapes)
            ov.save_model(converted, directory / f"layer_{index}.xml", compress_to_fp16=False)
    layer_cache.write_manifest(
        directory, MANIFEST, digest, model.n_layers, format=FORMAT, openvino=ov.get_version()
    )


def openvino_layers(model: EarlyExitClassifier, directory: str | Path, precision: str = "bf16") -> Path:
    """`directory` holding `model`'s layers as OpenVINO IR (f32 weights; the precision is chosen when they
    are compiled): reused when current and intact, else converted there (about a second per layer)."""
    reason = missing_backend("openvino")
    if reason:
        raise RuntimeError(reason)
    if precision not in HINTS:
        raise ValueError(f"OpenVINO layers run {list(HINTS)}, not {precision!r}")
    digest = layers_digest(model)
    fp32 = next(model.layers.parameters()).dtype == torch.float32
    if not fp32 and not layer_cache.is_current(Path(directory), MANIFEST, digest):  # hashed below anyway
        raise ValueError("OpenVINO layers are converted from an fp32 model")
    return layer_cache.ensure_layers(
        directory, MANIFEST, digest, lambda staging: _convert(model.cpu(), staging, digest)
    )


class OpenVinoLayer(nn.Module):
    """One compiled OpenVINO layer, called as the encoder's layer is."""

    def __init__(self, compiled) -> None:
        super().__init__()
        self.request = compiled.create_infer_request()

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        inputs = [
            np.ascontiguousarray(hidden.detach().float().numpy()),
            additive_mask(attention_mask, hidden),
        ]
        out = self.request.infer(inputs, share_inputs=True)
        return torch.from_numpy(np.array(out[0], copy=True))


def with_openvino_layers(
    model: EarlyExitClassifier, directory: str | Path, precision: str = "bf16", threads: int | None = None
) -> EarlyExitClassifier:
    """`model` (fp32, CPU) with its transformer layers replaced, in place, by the OpenVINO layers in
    `directory` (made by `openvino_layers`), compiled to run in `precision` with `threads` threads each
    (default torch's); refused when they were converted from other weights or are damaged."""
    import openvino as ov

    if model.runtime != FP32:
        raise ValueError(f"this model already runs {model.runtime.name} layers")
    if model.device.type != "cpu":
        raise ValueError("OpenVINO layers run on the CPU: move the model there")
    if precision not in HINTS:
        raise ValueError(f"OpenVINO layers run {list(HINTS)}, not {precision!r}")
    directory = Path(directory)
    layer_cache.check_layers(directory, MANIFEST, layers_digest(model), model.n_layers, "OpenVINO")
    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": HINTS[precision],
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
    }
    layers = model.layers
    for index in range(len(layers)):
        compiled = core.compile_model(str(directory / f"layer_{index}.xml"), "CPU", config)
        layers[index] = OpenVinoLayer(compiled)
    model.runtime, model.layers_folder = Runtime(precision, "openvino"), directory
    return model.eval()
