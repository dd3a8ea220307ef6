"""Int8 transformer layers for CPU inference, through ONNX Runtime.

Each transformer layer of a trained model is exported on its own to ONNX (`torch.onnx.export(dynamo=True)`,
batch and sequence dynamic) and quantised with ONNX Runtime's dynamic int8 quantisation (int8 weights per
output channel, activations quantised per call). `with_int8_layers` then swaps the model's layers for
`OnnxLayer`s that run those graphs: embeddings, heads, the exit engine and every exit policy stay as they are,
so rows exit one by one at any batch size as in fp32, and each layer's matmuls run in int8.

Dynamic quantisation scales a call's activations by its whole input, so a row's int8 result depends a little
on its batch-mates: int8 labels and exit layers agree with fp32 on most rows (tests/ee_model/test_int8.py
states the measured tolerance), not bit for bit as fp32 runs do at any batch size.

On a CPU without int8 dot products (no VNNI or AMX-INT8: AVX2 only, e.g. AMD Zen 3) ONNX Runtime multiplies
u8 x s8 with `vpmaddubsw`, which sums pairs of products in 16 bits and saturates: agreement with fp32 fell
below 99 % there (measured under an emulated Zen 3, docs/results.md "int8 on a CPU without VNNI"). The layers
are then quantised with 7-bit weights (`reduce_range`, ONNX Runtime's setting for exactly this), which cannot
saturate; on a CPU with VNNI they keep 8-bit weights. The setting is part of what the folder's manifest
vouches for (`quantization_settings`).

The layers are built once per model (`int8_layers`: a few seconds per layer) into a folder whose manifest
names the digest of the layer weights they come from and the digest of every file it holds; both are checked
before the layers are used, so stale layers are never used, and a damaged folder (a file truncated,
overwritten or missing) is rebuilt with a one-line warning.
Needs the `int8` extra (onnxruntime, onnx, onnxscript).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ee_model import encoders, layer_cache
from ee_model.cpu_support import CpuSupport, cpu_support
from ee_model.runtime import FP32, Runtime, missing_backend

if TYPE_CHECKING:
    from ee_model.modeling import EarlyExitClassifier

MANIFEST = "int8_layers.json"
INT8_FOLDER = "int8"  # the layers' folder inside a model directory (`load_int8`'s default, shipped models)
FORMAT = 3  # of the folder: bump when the export changes, so older folders are rebuilt (3: settings)


def missing_runtime() -> str | None:
    """Why int8 cannot run here (a package of the `int8` extra is missing), else None."""
    return missing_backend("onnxruntime")


def quantization_settings(support: CpuSupport | None = None) -> dict:
    """How the layers are quantised for a CPU (`support`, default this one): 7-bit weights (`reduce_range`)
    where it has no int8 dot-product units (VNNI, AMX-INT8), whose absence makes 8-bit products saturate."""
    support = support or cpu_support()
    return {"reduce_range": not support.has_int8}


def layers_digest(model: EarlyExitClassifier, settings: dict | None = None) -> str:
    """What the int8 files must come from: the layer weights, this folder's format and the quantisation
    settings (default this CPU's)."""
    return layer_cache.layers_digest(model, ["int8", FORMAT, settings or quantization_settings()])


def is_current(directory: str | Path, model: EarlyExitClassifier) -> bool:
    """Whether `directory` holds int8 layers exported from `model`'s layer weights for this CPU, every file
    intact."""
    return layer_cache.is_current(Path(directory), MANIFEST, layers_digest(model))


class MaskedLayer(nn.Module):
    """A layer with a plain additive mask input (batch, 1, 1, seq): what the exported graph takes."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return encoders.run_layer(self.layer, hidden, {"attention_mask": additive_mask})


def additive_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> np.ndarray:
    """The encoder's mask object (None, a boolean or an additive 4-d mask) as a (batch, 1, 1, seq) additive
    float32 array. Every query row of a bidirectional mask is the same, so the first one is kept."""
    batch, seq = hidden.shape[0], hidden.shape[1]
    if mask is None:
        return np.zeros((batch, 1, 1, seq), dtype=np.float32)
    first = mask[:, :, :1, :seq]
    if first.dtype == torch.bool:
        blocked = torch.zeros(first.shape, dtype=torch.float32)
        first = blocked.masked_fill(~first.cpu(), torch.finfo(torch.float32).min)
    return np.ascontiguousarray(first.expand(batch, 1, 1, seq).float().cpu().numpy())


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporter's and the quantiser's advice (torchvision absent, "consider pre-processing") silenced."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def export_onnx(
    module: nn.Module,
    inputs: dict[str, torch.Tensor],
    path: Path,
    output: str,
    axes: dict[str, dict[int, str]],
) -> Path:
    """`module(*inputs.values())` exported to `path` with `torch.onnx.export(dynamo=True)`; `axes` names each
    input's dynamic axes ({"hidden": {0: "batch", 1: "seq"}}); axes of one name are one dimension."""
    dims = {name: torch.export.Dim(name) for name in {d for named in axes.values() for d in named.values()}}
    with torch.no_grad(), _quiet_export():
        torch.onnx.export(
            module.eval(),
            tuple(inputs.values()),
            path,
            dynamo=True,
            input_names=list(inputs),
            output_names=[output],
            dynamic_shapes={name: {a: dims[d] for a, d in axes[name].items()} for name in inputs},
            verbose=False,
        )
    return path


def _export(model: EarlyExitClassifier, directory: Path, digest: str, settings: dict) -> None:
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with encoders.eager_attention(model.encoder):  # a plain additive mask, exported op for op
        hidden_size = model.flops_model.hidden_size
        example = {"hidden": torch.randn(2, 8, hidden_size), "additive_mask": torch.zeros(2, 1, 1, 8)}
        axes = {"hidden": {0: "batch", 1: "seq"}, "additive_mask": {0: "batch", 3: "seq"}}
        for index, layer in enumerate(model.layers):
            plain = export_onnx(
                MaskedLayer(layer), example, directory / f"layer_{index}.fp32.onnx", "hidden_out", axes
            )
            quantized = directory / f"layer_{index}.onnx"
            with _quiet_export():
                quantize_dynamic(plain, quantized, weight_type=QuantType.QInt8, per_channel=True, **settings)
            for fp32_file in directory.glob(f"layer_{index}.fp32.onnx*"):  # with external data, if any
                fp32_file.unlink()
    layer_cache.write_manifest(
        directory,
        MANIFEST,
        digest,
        model.n_layers,
        format=FORMAT,
        quantization="onnxruntime quantize_dynamic, int8 weights per channel, int8 activations per call",
        settings=settings,
        onnxruntime=ort_version,
        torch=torch.__version__,
    )


def int8_layers(model: EarlyExitClassifier, directory: str | Path, settings: dict | None = None) -> Path:
    """`directory` holding `model`'s int8 layers: reused when its manifest names these layer weights and
    quantisation settings (default this CPU's, `quantization_settings`) and its files are intact, else
    exported and quantised there (a few seconds per layer; `ee_model.layer_cache`)."""
    encoders.check_exportable(model.encoder, "int8")
    reason = missing_runtime()
    if reason:
        raise RuntimeError(reason)
    settings = settings or quantization_settings()
    digest = layers_digest(model, settings)
    exportable = model.device.type == "cpu" and next(model.layers.parameters()).dtype == torch.float32
    if not exportable and not layer_cache.is_current(Path(directory), MANIFEST, digest):
        raise ValueError("int8 layers are exported from an fp32 model on the CPU")  # (hashed again below)
    return layer_cache.ensure_layers(
        directory, MANIFEST, digest, lambda staging: _export(model, staging, digest, settings)
    )


class OnnxLayer(nn.Module):
    """One exported int8 layer in an ONNX Runtime session, called as the encoder's layer is."""

    def __init__(self, path: str | Path, threads: int) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        inputs = {
            "hidden": np.ascontiguousarray(hidden.detach().float().numpy()),
            "additive_mask": additive_mask(attention_mask, hidden),
        }
        return torch.from_numpy(self.session.run(None, inputs)[0])


def with_int8_layers(
    model: EarlyExitClassifier, directory: str | Path, threads: int | None = None
) -> EarlyExitClassifier:
    """`model` (fp32, on the CPU) with its transformer layers replaced, in place, by the int8 layers in
    `directory` (made by `int8_layers`); refused when they were exported from other weights. `threads`:
    ONNX Runtime's threads per layer call (default torch's)."""
    reason = missing_runtime()
    if reason:
        raise RuntimeError(reason)
    directory = Path(directory)
    if model.runtime != FP32:
        raise ValueError(f"this model already runs {model.runtime.name} layers")
    if model.device.type != "cpu":
        raise ValueError("int8 layers run on the CPU (ONNX Runtime's CPU provider): move the model there")
    built_for = (layer_cache.read_manifest(directory, MANIFEST) or {}).get("settings")
    settings = built_for if isinstance(built_for, dict) else quantization_settings()
    layer_cache.check_layers(directory, MANIFEST, layers_digest(model, settings), model.n_layers, "int8")
    if settings != quantization_settings():  # e.g. built by a driver on another kind of CPU than this node's
        warnings.warn(
            f"the int8 layers in {directory} were quantised with {settings}, this CPU's setting is "
            f"{quantization_settings()} ({cpu_support().describe()}): labels may agree less with fp32",
            stacklevel=2,
        )
    layers = model.layers
    threads = threads or torch.get_num_threads()
    for index in range(len(layers)):
        layers[index] = OnnxLayer(directory / f"layer_{index}.onnx", threads)
    model.runtime, model.layers_folder = Runtime("int8", "onnxruntime"), directory
    return model.eval()


def load_int8(
    model_dir: str | Path, layers_dir: str | Path | None = None, threads: int | None = None
) -> EarlyExitClassifier:
    """A saved model with int8 layers, ready for `predict`: the layers in `layers_dir` (default
    `<model_dir>/int8`), built there on first use."""
    from ee_model.modeling import EarlyExitClassifier

    model = EarlyExitClassifier.from_pretrained(model_dir)
    directory = int8_layers(model, layers_dir or Path(model_dir) / INT8_FOLDER)
    return with_int8_layers(model, directory, threads)
