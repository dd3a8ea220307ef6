"""Transformer layers run by OpenVINO on the CPU, the way `ee_model.int8` runs them with ONNX Runtime.

Each layer is converted on its own (`openvino.convert_model`, batch and sequence dynamic, a plain additive
mask input) and saved as OpenVINO IR into a folder checked like every per-layer cache
(`ee_model.layer_cache`: the weights' digest, a digest of every file). `with_openvino_layers` compiles them
once per model load and swaps them in: embeddings, heads, the exit engine and every policy stay as they are,
and rows still leave one by one. `bf16` and `fp32` share one folder of f32 IR, the precision set when
compiling (`bf16` runs the layers in bf16 on a CPU with AMX-BF16 / AVX512-BF16, OpenVINO's own default there;
`fp32` forces f32). `int8` is NNCF's post-training quantisation of each layer (weights and activations, the
transformer recipe), calibrated on the layer's own inputs for a few hundred texts like those that will be
scored (`calibration_texts`): static scales, so a row's result depends far less on its batch-mates than with
ONNX Runtime's dynamic int8; what the quantiser does not cover runs in OpenVINO's default precision for the
CPU (bf16 on AMX). Needs the `openvino` extra (openvino, nncf).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ee_model import encoders, layer_cache
from ee_model.cpu_support import CpuSupport, cpu_support
from ee_model.int8 import MaskedLayer, additive_mask
from ee_model.runtime import FP32, Runtime, missing_backend

if TYPE_CHECKING:
    from ee_model.modeling import EarlyExitClassifier

MANIFEST = "openvino_layers.json"
FORMAT = 1  # of the folder: bump when the conversion changes, so older folders are rebuilt
# OpenVINO's INFERENCE_PRECISION_HINT per precision (int8: none, what the quantiser left runs in the CPU's own
# default, bf16 on AMX, f32 elsewhere)
HINTS = {"bf16": "bf16", "fp32": "f32", "int8": None}
QUANTISED = "int8"  # the one precision whose files differ (the others share f32 IR)
CALIBRATION_ROWS = 300  # texts NNCF calibrates the int8 layers on by default (its guide's subset size)
CALIBRATION_BATCH = 8  # rows per call while the layers' inputs are recorded


def files_kind(precision: str) -> str:
    """Which files `precision` runs: "int8" (quantised) or "ir" (f32 IR, precision chosen when compiling)."""
    return QUANTISED if precision == QUANTISED else "ir"


def layers_digest(model: EarlyExitClassifier, precision: str = "bf16") -> str:
    return layer_cache.layers_digest(model, ["openvino", FORMAT, files_kind(precision)])


def read_manifest(directory: str | Path) -> dict | None:
    """The folder's manifest (what the layers were built from and how), None when there is none."""
    return layer_cache.read_manifest(Path(directory), MANIFEST)


def _converted_layers(model: EarlyExitClassifier) -> list:
    import openvino as ov

    converted = []
    with encoders.eager_attention(model.encoder):  # a plain additive mask, converted op for op
        hidden = model.flops_model.hidden_size
        example = (torch.randn(2, 8, hidden), torch.zeros(2, 1, 1, 8))
        shapes = [ov.PartialShape([-1, -1, hidden]), ov.PartialShape([-1, 1, 1, -1])]
        for layer in model.layers:
            with torch.no_grad():
                converted.append(
                    ov.convert_model(MaskedLayer(layer).eval(), example_input=example, input=shapes)
                )
    return converted


def recorded_inputs(
    model: EarlyExitClassifier, texts: list[str]
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per layer, the (hidden states, additive mask) it receives while `model` (fp32) runs `texts` at full
    depth, CALIBRATION_BATCH rows a call: what the int8 layers are calibrated on."""
    from ee_model.policies import ExitSetting

    recorded: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in model.layers]

    def recorder(index: int):
        def record(_module, args, kwargs) -> None:
            hidden = args[0]
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            recorded[index].append((hidden.detach().float().numpy().copy(), additive_mask(mask, hidden)))

        return record

    hooks = [
        layer.register_forward_pre_hook(recorder(index), with_kwargs=True)
        for index, layer in enumerate(model.layers)
    ]
    try:
        with encoders.eager_attention(model.encoder):
            model.predict(texts, setting=ExitSetting("none"), batch_size=CALIBRATION_BATCH)
    finally:
        for hook in hooks:
            hook.remove()
    return recorded


def _quantised_layers(model: EarlyExitClassifier, texts: list[str]) -> list:
    import nncf

    converted = _converted_layers(model)
    recorded = recorded_inputs(model, texts)
    with _quiet_nncf():
        return [
            nncf.quantize(
                layer,
                nncf.Dataset(inputs),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(inputs),
            )
            for layer, inputs in zip(converted, recorded, strict=True)
        ]


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[None]:
    """NNCF's progress bars and INFO lines kept off the job's output."""
    import logging

    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _build(
    model: EarlyExitClassifier, directory: Path, precision: str, digest: str, texts: list[str] | None
) -> None:
    import openvino as ov

    quantised = files_kind(precision) == QUANTISED
    layers = _quantised_layers(model, texts or []) if quantised else _converted_layers(model)
    for index, layer in enumerate(layers):
        ov.save_model(layer, directory / f"layer_{index}.xml", compress_to_fp16=False)
    facts = {"calibration_rows": len(texts or [])} if quantised else {}
    layer_cache.write_manifest(
        directory,
        MANIFEST,
        digest,
        model.n_layers,
        format=FORMAT,
        kind=files_kind(precision),
        openvino=ov.get_version(),
        **facts,
    )


def openvino_layers(
    model: EarlyExitClassifier,
    directory: str | Path,
    precision: str = "bf16",
    calibration_texts: Sequence[str] | Callable[[], Sequence[str]] | None = None,
) -> Path:
    """`directory` holding `model`'s layers as OpenVINO IR: f32 weights for fp32 / bf16 (the precision is
    chosen when they are compiled; about a second per layer), or int8 layers quantised by NNCF on the layers'
    inputs for `calibration_texts` (required for int8: a few hundred texts like those to be scored, e.g.
    CALIBRATION_ROWS of them, or a function that draws them, called only when the layers are built; a few
    seconds per layer). Reused when current and intact (built from these weights, for this kind of files),
    else built there."""
    encoders.check_exportable(model.encoder, "OpenVINO")
    reason = missing_backend("openvino")
    if reason:
        raise RuntimeError(reason)
    if precision not in HINTS:
        raise ValueError(f"OpenVINO layers run {list(HINTS)}, not {precision!r}")
    digest = layers_digest(model, precision)

    def build(staging: Path) -> None:  # only when the folder is not current: what a build needs, checked here
        if next(model.layers.parameters()).dtype != torch.float32:
            raise ValueError("OpenVINO layers are built from an fp32 model")
        if files_kind(precision) == QUANTISED and importlib.util.find_spec("nncf") is None:
            raise RuntimeError("int8 OpenVINO layers need nncf: pip install 'early-exit-pipeline[openvino]'")
        texts = []
        if files_kind(precision) == QUANTISED:  # drawn only here, when int8 layers are built
            given = calibration_texts() if callable(calibration_texts) else calibration_texts
            texts = [t for t in given or [] if isinstance(t, str) and t.strip()]
            if not texts:
                raise ValueError(
                    "int8 OpenVINO layers quantise activations with fixed scales: give calibration_texts (a "
                    f"few hundred texts like those to be scored, e.g. {CALIBRATION_ROWS})"
                )
        _build(model.cpu().eval(), staging, precision, digest, texts)

    return layer_cache.ensure_layers(directory, MANIFEST, digest, build)


class OpenVinoLayer(nn.Module):
    """One compiled OpenVINO layer, called as the encoder's layer is. Its hidden states enter and leave in
    `dtype`: bf16 where the layer computes in bf16 or int8 on a bf16 CPU (no conversion to float32 and back
    between layers; the exit heads pool in float32), else float32."""

    def __init__(self, compiled, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.request = compiled.create_infer_request()
        self.dtype = dtype

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        import openvino as ov

        inside = hidden.detach().to(self.dtype).contiguous()
        out = torch.empty_like(inside)  # written by the request: a layer keeps its shape
        self.request.set_input_tensor(0, self._shared(inside))
        mask = additive_mask(attention_mask, hidden)  # held here: the tensor below shares its memory
        self.request.set_input_tensor(1, ov.Tensor(mask, shared_memory=True))
        self.request.set_output_tensor(0, self._shared(out))
        self.request.infer()
        return out

    def _shared(self, tensor: torch.Tensor):
        """An OpenVINO tensor over `tensor`'s memory (bf16 crosses as its bits)."""
        import openvino as ov

        if self.dtype == torch.bfloat16:
            return ov.Tensor(tensor.view(torch.int16).numpy(), list(tensor.shape), ov.Type.bf16)
        return ov.Tensor(tensor.numpy(), shared_memory=True)


def boundary_dtype(precision: str, hint: str | None = None, support: CpuSupport | None = None) -> torch.dtype:
    """The dtype hidden states cross a layer's boundary in: bf16 where the layers compute in bf16 or int8 on a
    CPU with bf16 (what the quantiser leaves runs in bf16 there), else float32 (measured: docs/results.md)."""
    support = support or cpu_support()
    runs_bf16 = precision == "bf16" or (precision == QUANTISED and (hint or "bf16") == "bf16")
    return torch.bfloat16 if runs_bf16 and support.has_bf16 else torch.float32


def _with_bf16_boundaries(layer):
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    steps = PrePostProcessor(layer)
    steps.input(0).tensor().set_element_type(ov.Type.bf16)
    steps.output(0).tensor().set_element_type(ov.Type.bf16)
    return steps.build()


def with_openvino_layers(
    model: EarlyExitClassifier,
    directory: str | Path,
    precision: str = "bf16",
    threads: int | None = None,
    hint: str | None = None,
) -> EarlyExitClassifier:
    """`model` (fp32, CPU) with its transformer layers replaced, in place, by the OpenVINO layers in
    `directory` (made by `openvino_layers`), compiled to run in `precision` with `threads` threads each
    (default torch's); refused when they were converted from other weights or are damaged. `hint`: for int8,
    the precision of what the quantiser left ("f32", "bf16"; default the CPU's own), e.g. to run as on a CPU
    without bf16."""
    import openvino as ov

    if model.runtime != FP32:
        raise ValueError(f"this model already runs {model.runtime.name} layers")
    if model.device.type != "cpu":
        raise ValueError("OpenVINO layers run on the CPU: move the model there")
    if precision not in HINTS:
        raise ValueError(f"OpenVINO layers run {list(HINTS)}, not {precision!r}")
    directory = Path(directory)
    kind = "OpenVINO int8" if files_kind(precision) == QUANTISED else "OpenVINO"
    layer_cache.check_layers(directory, MANIFEST, layers_digest(model, precision), model.n_layers, kind)
    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        # OpenVINO pins its threads to cores chosen without regard to other processes: two 1-thread actors
        # on one node ran on the same core, each at half speed (docs/results.md); the OS places them apart
        "ENABLE_CPU_PINNING": False,
    }
    if HINTS[precision] is not None or hint is not None:
        config["INFERENCE_PRECISION_HINT"] = HINTS[precision] or hint
    dtype = boundary_dtype(precision, hint)
    layers = model.layers
    for index in range(len(layers)):
        layer = core.read_model(str(directory / f"layer_{index}.xml"))
        if dtype == torch.bfloat16:
            layer = _with_bf16_boundaries(layer)
        layers[index] = OpenVinoLayer(core.compile_model(layer, "CPU", config), dtype)
    model.runtime, model.layers_folder = Runtime(precision, "openvino"), directory
    return model.eval()
