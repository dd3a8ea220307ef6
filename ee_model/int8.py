"""Int8 transformer layers for CPU inference, through ONNX Runtime.

Each transformer layer of a trained model is exported on its own to ONNX (`torch.onnx.export(dynamo=True)`,
batch and sequence dynamic) and quantised with ONNX Runtime's dynamic int8 quantisation (int8 weights, int8
activations quantised per call). `with_int8_layers` then swaps the model's layers for `OnnxLayer`s that run
those graphs: embeddings, heads, the exit engine and every exit policy stay as they are, so per-row exit works
at any batch size exactly as in fp32, with each layer's matmuls in int8.

The exported layers are built once per model (`export_int8_layers`, a few seconds per layer) and kept in a
folder with a manifest naming the weights they were made from; loading checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ee_model import encoders

MANIFEST = "int8_layers.json"


class _MaskedLayer(nn.Module):
    """A layer with a plain additive mask input (batch, 1, 1, seq): what the exported graph takes."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return encoders.run_layer(self.layer, hidden, additive_mask)


def additive_mask(mask, hidden: torch.Tensor) -> np.ndarray:
    """The encoder's mask object (None, a boolean or an additive 4-d mask) as a (batch, 1, 1, seq) additive
    float32 array. Every query row of a bidirectional mask is the same, so the first one is kept."""
    batch, seq = hidden.shape[0], hidden.shape[1]
    if mask is None:
        return np.zeros((batch, 1, 1, seq), dtype=np.float32)
    first = mask[:, :, :1, :seq]
    if first.dtype == torch.bool:
        first = torch.zeros(first.shape, dtype=torch.float32).masked_fill(
            ~first, torch.finfo(torch.float32).min
        )
    return np.ascontiguousarray(first.expand(batch, 1, 1, seq).float().numpy())


def export_int8_layers(model: nn.Module, directory: str | Path, weights: str) -> Path:
    """Export and quantise every transformer layer of `model` into `directory` (layer_<i>.onnx, int8) and
    write the manifest naming `weights` (a digest of the weights they come from)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder = model.encoder
    previous = encoder.config._attn_implementation
    encoder.set_attn_implementation("eager")  # a plain additive mask, exported op for op
    try:
        hidden_size = model.flops_model.hidden_size
        example = (torch.randn(2, 8, hidden_size), torch.zeros(2, 1, 1, 8))
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        for index, layer in enumerate(model.layers):
            plain = directory / f"layer_{index}.fp32.onnx"
            with torch.no_grad():
                torch.onnx.export(
                    _MaskedLayer(layer).eval(),
                    example,
                    plain,
                    dynamo=True,
                    input_names=["hidden", "additive_mask"],
                    output_names=["hidden_out"],
                    dynamic_shapes={"hidden": {0: batch, 1: seq}, "additive_mask": {0: batch, 3: seq}},
                    verbose=False,
                )
            quantize_dynamic(plain, directory / f"layer_{index}.onnx", weight_type=QuantType.QInt8)
            plain.unlink()
            for extra in directory.glob(f"layer_{index}.fp32.onnx*"):  # external data files, if any
                extra.unlink()
    finally:
        encoder.set_attn_implementation(previous)
    (directory / MANIFEST).write_text(json.dumps({"weights": weights, "layers": model.n_layers}))
    return directory


class OnnxLayer(nn.Module):
    """One exported int8 layer in an ONNX Runtime session, called as the encoder's layer is."""

    def __init__(self, path: str | Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, hidden: torch.Tensor, attention_mask=None, **_: object) -> torch.Tensor:
        inputs = {
            "hidden": np.ascontiguousarray(hidden.detach().float().numpy()),
            "additive_mask": additive_mask(attention_mask, hidden),
        }
        return torch.from_numpy(self.session.run(None, inputs)[0])


def with_int8_layers(model: nn.Module, directory: str | Path, weights: str, threads: int | None = None):
    """`model` (on the CPU) with its transformer layers replaced by the int8 layers in `directory`, in
    place; refused when they were exported from other weights."""
    directory = Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest["weights"] != weights or manifest["layers"] != model.n_layers:
        raise ValueError(f"the int8 layers in {directory} were exported from other weights")
    if model.device.type != "cpu":
        raise ValueError("int8 layers run on the CPU (ONNX Runtime's CPU provider)")
    layers = model.layers
    threads = threads or torch.get_num_threads()
    for index in range(len(layers)):
        layers[index] = OnnxLayer(directory / f"layer_{index}.onnx", threads)
    return model
