"""A model's transformer layers swapped for a `Runtime`'s (`ee_model.runtime`): the files a backend builds
once per model version (`build_layers`), the swap (`with_runtime`), and a saved model loaded in a runtime
(`load_model`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ee_model import encoders
from ee_model.bf16 import with_bf16_layers
from ee_model.cpu_support import CpuSupport, cpu_support
from ee_model.int8 import int8_layers, with_int8_layers
from ee_model.modeling import EarlyExitClassifier
from ee_model.openvino_layers import openvino_layers, with_openvino_layers
from ee_model.runtime import BF16, FP32, RUNS, Runtime, auto_runtimes, resolve_runtime


def resolve_encoder_runtime(
    model_type: str,
    precision: str = "auto",
    backend: str = "auto",
    gpu: bool = False,
    support: CpuSupport | None = None,
    can_calibrate: bool = True,
) -> tuple[Runtime, str]:
    """`resolve_runtime` for an encoder of `model_type`: the runtimes that export the layers one by one (int8,
    OpenVINO) run BERT-like encoders only (`encoders.Family.exportable`); for the other families an automatic
    choice falls back to the fastest runtime on torch `auto_runtimes` lists for this machine (else fp32), an
    automatic backend to torch in the named precision (bf16, fp32), and a named one is refused (ValueError,
    one line)."""
    support = support or cpu_support()  # read once, for the fallback below too
    runtime, why = resolve_runtime(precision, backend, gpu=gpu, support=support, can_calibrate=can_calibrate)
    family = encoders.FAMILIES[model_type]
    if not runtime.builds_layers or family.exportable:
        return runtime, why
    not_exported = f"{family.name} layers are not exported one by one"
    if precision == "auto" and backend == "auto":  # the fastest runtime on torch this machine offers
        candidates, _ = auto_runtimes(support, gpu)
        on_torch = next((r for r in candidates if r.backend == "torch"), FP32)
        return on_torch, f"{why}; {not_exported}, so {on_torch.precision} on torch"
    if backend == "auto" and "torch" in RUNS[runtime.precision]:
        return Runtime(runtime.precision, "torch"), f"{why}; {not_exported}, so torch"
    raise ValueError(
        f"runtime {runtime.name} exports the layers one by one, for BERT-like encoders; {family.name} layers "
        "take more: use precision fp32 or bf16"
    )


def build_layers(
    model: EarlyExitClassifier,
    runtime: Runtime,
    directory: str | Path,
    calibration_texts: Sequence[str] | Callable[[], Sequence[str]] | None = None,
) -> Path | None:
    """The layer files `runtime` runs (built into `directory` once per model version, checked after), or
    None for a runtime that needs none. `calibration_texts`: texts like those to be scored (or a function
    drawing them, called only if the layers are built), for the runtimes that calibrate while building
    (`runtime.needs_calibration_texts`: OpenVINO int8)."""
    if runtime.backend == "onnxruntime":
        return int8_layers(model, directory)
    if runtime.backend == "openvino":
        return openvino_layers(model, directory, runtime.precision, calibration_texts)
    return None


def with_runtime(
    model: EarlyExitClassifier,
    runtime: Runtime,
    directory: str | Path | None = None,
    threads: int | None = None,
) -> EarlyExitClassifier:
    """`model` (fp32) with its layers run by `runtime`, in place; `directory`: the files `build_layers` made
    (for the runtimes that build them); `threads`: the backend's threads per layer call (default torch's)."""
    if runtime == FP32:
        return model
    if runtime == BF16:
        return with_bf16_layers(model)
    if directory is None:
        raise ValueError(f"runtime {runtime.name} runs layers built by build_layers: give their folder")
    if runtime.backend == "onnxruntime":
        return with_int8_layers(model, directory, threads)
    return with_openvino_layers(model, directory, runtime.precision, threads)


def load_model(
    model_dir: str | Path,
    precision: str = "auto",
    backend: str = "auto",
    layers_dir: str | Path | None = None,
    threads: int | None = None,
    device: str | None = None,
    calibration_texts: list[str] | None = None,
) -> EarlyExitClassifier:
    """A saved model ready for `predict` in the runtime `precision` / `backend` name (`auto`: this machine's
    fastest), on `device` (default: the CPU). Layers a backend builds go to `layers_dir` (default
    `<model_dir>/<runtime name>/`), built there on first use (OpenVINO int8: calibrated on
    `calibration_texts`; `auto` without them picks among the backends that need none) and checked after.
    `model.runtime` says which runtime it got."""
    on_gpu = device is not None and device != "cpu"
    model = EarlyExitClassifier.from_pretrained(model_dir)
    runtime, _ = resolve_encoder_runtime(
        model.encoder.config.model_type, precision, backend, gpu=on_gpu, can_calibrate=bool(calibration_texts)
    )
    if on_gpu:
        model = model.to(device)
    folder = build_layers(model, runtime, layers_dir or Path(model_dir) / runtime.name, calibration_texts)
    return with_runtime(model, runtime, folder, threads)
