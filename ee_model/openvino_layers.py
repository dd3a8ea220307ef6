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

Calibration: on CALIBRATION_ROWS texts; layers calibrated on fewer (a first input of a few rows) are built
with a warning and rebuilt when a later build is given more texts (`calibration_rows` in the manifest is part
of what decides whether the folder is kept).

On a CPU without int8 dot products (no VNNI or AMX-INT8: AVX2 only) the u8 x s8 products are summed in 16
bits and saturate: labels agreed with fp32 on 96 % of rows there (an emulated Zen 3, and a real one:
docs/results.md "int8 on a CPU without VNNI"). The products of two activations (the attention) are what
saturates; for such a CPU they are left unquantised and the weights get NNCF's overflow fix
(`quantization_settings`), which brings agreement back to fp32's level. The settings are in the manifest.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import warnings
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
FORMAT = 2  # of the folder: bump when the conversion changes, so older folders are rebuilt (2: settings)
# OpenVINO's INFERENCE_PRECISION_HINT per precision (int8: none, what the quantiser left runs in the CPU's own
# default, bf16 on AMX, f32 elsewhere)
HINTS = {"bf16": "bf16", "fp32": "f32", "int8": None}
QUANTISED = "int8"  # the one precision whose files differ (the others share f32 IR)
CALIBRATION_ROWS = 300  # texts NNCF calibrates the int8 layers on by default (its guide's subset size)
CALIBRATION_BATCH = 8  # rows per call while the layers' inputs are recorded


def files_kind(precision: str) -> str:
    """Which files `precision` runs: "int8" (quantised) or "ir" (f32 IR, precision chosen when compiling)."""
    return QUANTISED if precision == QUANTISED else "ir"


def quantization_settings(support: CpuSupport | None = None) -> dict:
    """How int8 layers are quantised for a CPU (`support`, default this one): as NNCF's transformer recipe has
    it where the CPU has int8 dot products (VNNI, AMX-INT8); without them, the products of two activations in
    float and the weights' overflow fix, so that no u8 x s8 sum saturates."""
    support = support or cpu_support()
    return {} if support.has_int8 else {"activation_products": "float", "overflow_fix": "enable"}


def layers_digest(model: EarlyExitClassifier, precision: str = "bf16", settings: dict | None = None) -> str:
    """What the files must come from: the layer weights, the folder's format and kind, and for int8 the
    quantisation settings (default this CPU's)."""
    kind = files_kind(precision)
    if kind == QUANTISED:
        return layer_cache.layers_digest(
            model, ["openvino", FORMAT, kind, quantization_settings() if settings is None else settings]
        )
    return layer_cache.layers_digest(model, ["openvino", FORMAT, kind])


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


def activation_products(layer) -> list[str]:
    """The names of `layer`'s products of two activations, not of a weight: its attention
    (`ScaledDotProductAttention`, what the converter makes of scores x values) and any MatMul of two
    activations. What a CPU without VNNI cannot run in int8 without saturating."""

    def constant(value, depth: int = 0) -> bool:  # a weight, possibly converted or reshaped
        node = value.get_node()
        if node.get_type_name() == "Constant":
            return True
        inputs = range(node.get_input_size())
        return len(inputs) > 0 and depth < 4 and all(constant(node.input_value(i), depth + 1) for i in inputs)

    return [
        op.get_friendly_name()
        for op in layer.get_ops()
        if op.get_type_name() == "ScaledDotProductAttention"
        or (op.get_type_name() == "MatMul" and not any(constant(op.input_value(i)) for i in (0, 1)))
    ]


def _quantised_layers(model: EarlyExitClassifier, texts: list[str], settings: dict) -> list:
    import nncf

    converted = _converted_layers(model)
    recorded = recorded_inputs(model, texts)
    options = {}
    if settings.get("overflow_fix"):
        options["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
            overflow_fix=nncf.OverflowFix(settings["overflow_fix"])
        )
    with _quiet_nncf():
        return [
            nncf.quantize(
                layer,
                nncf.Dataset(inputs),
                model_type=nncf.ModelType.TRANSFORMER,
                subset_size=len(inputs),
                ignored_scope=nncf.IgnoredScope(names=activation_products(layer))
                if settings.get("activation_products") == "float"
                else None,
                **options,
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
    model: EarlyExitClassifier,
    directory: Path,
    precision: str,
    digest: str,
    texts: list[str] | None,
    settings: dict,
) -> None:
    import openvino as ov

    quantised = files_kind(precision) == QUANTISED
    layers = _quantised_layers(model, texts or [], settings) if quantised else _converted_layers(model)
    for index, layer in enumerate(layers):
        ov.save_model(layer, directory / f"layer_{index}.xml", compress_to_fp16=False)
    facts = {"calibration_rows": len(texts or []), "settings": settings} if quantised else {}
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
    settings: dict | None = None,
) -> Path:
    """`directory` holding `model`'s layers as OpenVINO IR: f32 weights for fp32 / bf16 (the precision is
    chosen when they are compiled; about a second per layer), or int8 layers quantised by NNCF on the layers'
    inputs for `calibration_texts` (required for int8: a few hundred texts like those to be scored, e.g.
    CALIBRATION_ROWS of them, or a function that draws them, called only when the layers are built; a few
    seconds per layer). Reused when current and intact (built from these weights, for this kind of files,
    with this CPU's quantisation settings), else built there. int8 layers calibrated on fewer than
    CALIBRATION_ROWS texts are built with a warning and rebuilt by a later call given more texts.
    `settings`: int8's quantisation settings (default this CPU's, `quantization_settings`)."""
    encoders.check_exportable(model.encoder, "OpenVINO")
    reason = missing_backend("openvino")
    if reason:
        raise RuntimeError(reason)
    if precision not in HINTS:
        raise ValueError(f"OpenVINO layers run {list(HINTS)}, not {precision!r}")
    quantised = files_kind(precision) == QUANTISED
    settings = (quantization_settings() if settings is None else settings) if quantised else {}
    digest = layers_digest(model, precision, settings)
    drawn: list[list[str]] = []

    def texts() -> list[str]:  # the valid calibration texts, drawn at most once, only when needed
        if not drawn:
            given = calibration_texts() if callable(calibration_texts) else calibration_texts
            drawn.append([t for t in given or [] if isinstance(t, str) and t.strip()][:CALIBRATION_ROWS])
        return drawn[0]

    def keep(manifest: dict) -> bool:  # int8 calibrated on fewer rows than wanted: rebuilt when more come
        rows = manifest.get("calibration_rows", 0)
        if not quantised or calibration_texts is None or rows >= CALIBRATION_ROWS:
            return True
        return len(texts()) <= rows

    def build(staging: Path) -> None:  # only when the folder is not kept: what a build needs, checked here
        if next(model.layers.parameters()).dtype != torch.float32:
            raise ValueError("OpenVINO layers are built from an fp32 model")
        if quantised and importlib.util.find_spec("nncf") is None:
            raise RuntimeError("int8 OpenVINO layers need nncf: pip install 'early-exit-pipeline[openvino]'")
        if quantised and not texts():
            raise ValueError(
                "int8 OpenVINO layers quantise activations with fixed scales: give calibration_texts (a "
                f"few hundred texts like those to be scored, e.g. {CALIBRATION_ROWS})"
            )
        if quantised and len(texts()) < CALIBRATION_ROWS:
            warnings.warn(
                f"int8 OpenVINO layers in {directory} calibrated on {len(texts())} rows, fewer than "
                f"{CALIBRATION_ROWS}: they are rebuilt when a later run has more rows to calibrate on",
                stacklevel=4,
            )
        _build(model.cpu().eval(), staging, precision, digest, texts() if quantised else [], settings)

    return layer_cache.ensure_layers(directory, MANIFEST, digest, build, keep)


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


def plain_config(support: CpuSupport | None = None) -> dict:
    """What an OpenVINO model compiled with its defaults must be told on this CPU to run at all: f32 where
    the CPU (as oneDNN is capped) has no bf16 units. OpenVINO reads the CPU's own flags, past a
    ONEDNN_MAX_CPU_ISA cap, picks bf16 on a bf16 CPU, and its capped kernels then refuse those nodes; on a CPU
    without bf16 its default is f32 anyway. Nothing elsewhere."""
    return {} if (support or cpu_support()).has_bf16 else {"INFERENCE_PRECISION_HINT": "f32"}


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


def built_settings(directory: Path, support: CpuSupport) -> dict:
    """The quantisation settings the int8 layers in `directory` were built with (their manifest's; this
    CPU's when it names none), with a warning when they are not this CPU's (e.g. built by a driver on
    another kind of CPU): their digest is checked against them."""
    built_for = (read_manifest(directory) or {}).get("settings")
    settings = built_for if isinstance(built_for, dict) else quantization_settings(support)
    if settings != quantization_settings(support):
        warnings.warn(
            f"the int8 OpenVINO layers in {directory} were quantised with {settings or 'the defaults'}, "
            f"this CPU's settings are {quantization_settings(support) or 'the defaults'} "
            f"({support.describe()}): labels may agree less with fp32",
            stacklevel=3,
        )
    return settings


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
    support = cpu_support()
    if precision == "bf16" and not support.has_bf16:  # OpenVINO would run f32, or fail under a oneDNN cap
        raise ValueError(
            "bf16 OpenVINO layers need a CPU with AMX-BF16 or AVX512-BF16 and this one has neither "
            f"({support.describe()}): run them in fp32"
        )
    directory = Path(directory)
    kind = "OpenVINO int8" if files_kind(precision) == QUANTISED else "OpenVINO"
    settings = built_settings(directory, support) if files_kind(precision) == QUANTISED else None
    digest = layers_digest(model, precision, settings)
    layer_cache.check_layers(directory, MANIFEST, digest, model.n_layers, kind)
    core = ov.Core()
    config = {
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "PERFORMANCE_HINT": "LATENCY",
        # OpenVINO pins its threads to cores chosen without regard to other processes: two 1-thread actors
        # on one node ran on the same core, each at half speed (docs/results.md); the OS places them apart
        "ENABLE_CPU_PINNING": False,
    }
    if precision == QUANTISED and hint is None and not support.has_bf16:
        # what the quantiser left runs in f32: OpenVINO's default reads the CPU's own flags, past a oneDNN
        # cap (ONEDNN_MAX_CPU_ISA=AVX2 on a bf16 CPU), whose kernels then refuse its bf16 nodes
        hint = "f32"
    if HINTS[precision] is not None or hint is not None:
        config["INFERENCE_PRECISION_HINT"] = HINTS[precision] or hint
    dtype = boundary_dtype(precision, hint, support)
    layers = model.layers
    for index in range(len(layers)):
        layer = core.read_model(str(directory / f"layer_{index}.xml"))
        if dtype == torch.bfloat16:
            layer = _with_bf16_boundaries(layer)
        layers[index] = OpenVinoLayer(core.compile_model(layer, "CPU", config), dtype)
    model.runtime, model.layers_folder = Runtime(precision, "openvino"), directory
    return model.eval()
