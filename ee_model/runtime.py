"""Which number format and which backend run the transformer layers: named, or chosen per machine (`auto`).

A `Runtime` is a precision (fp32, bf16, int8) and the backend that runs the layers in it (torch, openvino,
onnxruntime). Only the transformer layers change: embeddings, exit heads, the exit engine and every policy run
as in fp32, so rows still leave one by one. The runtimes:

| runtime | layers | needs |
|---|---|---|
| `fp32` | PyTorch, as trained | nothing |
| `bf16` | PyTorch, bf16 weights (`ee_model.bf16`) | a CPU with AMX-BF16 or AVX512-BF16, or a GPU |
| `bf16-openvino` | OpenVINO, bf16 execution (`ee_model.openvino_layers`) | the `openvino` extra, a bf16 CPU |
| `fp32-openvino` | OpenVINO, f32 execution | the `openvino` extra |
| `int8` | ONNX Runtime, dynamic int8 (`ee_model.int8`) | the `int8` extra |
| `int8-openvino` | OpenVINO, NNCF static int8, calibrated on texts like those scored | the `openvino` extra |

`resolve_runtime("auto", "auto", ...)` picks what the machine runs fastest with early exit (`auto_runtimes`,
measured: docs/results.md "Early exit on the runtime a CPU user picks"): bf16 on a GPU; on a CPU, the first of
`CPU_RUNTIMES` it has fast units for and can run (its backend installed and, for OpenVINO int8, texts to
calibrate on): int8 on OpenVINO where it has VNNI, then bf16 (OpenVINO, PyTorch) where it has AMX-BF16 or
AVX512-BF16, then ONNX Runtime's int8; fp32 where it has neither. Naming a precision picks its fastest
installed backend (`AUTO_BACKENDS`); naming bf16 on a CPU without it is refused in one line.
Building and swapping in a runtime's layers: `ee_model.runtime_layers`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

from ee_model.cpu_support import CpuSupport, cpu_support

PRECISIONS = ("fp32", "bf16", "int8")
RUNS = {"fp32": ("torch", "openvino"), "bf16": ("torch", "openvino"), "int8": ("onnxruntime", "openvino")}
DEFAULT_BACKEND = {precision: backends[0] for precision, backends in RUNS.items()}
EXTRA = {
    "onnxruntime": ("int8", ("onnxruntime", "onnx", "onnxscript")),
    "openvino": ("openvino", ("openvino",)),
}


@dataclass(frozen=True)
class Runtime:
    precision: str = "fp32"
    backend: str = ""  # "": the precision's default backend (`DEFAULT_BACKEND`: torch, onnxruntime for int8)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {['auto', *PRECISIONS]}")
        if not self.backend:
            object.__setattr__(self, "backend", DEFAULT_BACKEND[self.precision])
        if self.backend not in RUNS[self.precision]:
            runs = list(RUNS[self.precision])
            raise ValueError(f"backend {self.backend!r} does not run {self.precision}; it runs on {runs}")

    @property
    def name(self) -> str:
        """`fp32`, `bf16`, `int8` on their default backend, else `<precision>-<backend>`."""
        default = self.backend == DEFAULT_BACKEND[self.precision]
        return self.precision if default else f"{self.precision}-{self.backend}"

    @property
    def builds_layers(self) -> bool:
        """Whether the layers are built into files first (exported, quantised), per model version."""
        return self.backend != "torch"

    @property
    def needs_calibration_texts(self) -> bool:
        """Whether building the layers needs texts like those to be scored (static int8 scales)."""
        return self.precision == "int8" and self.backend == "openvino"

    @property
    def pays_per_call(self) -> bool:
        """Whether a layer call costs a fixed amount besides its rows, so the exit engine fills its calls
        (`ee_model.layer_pools.default_pooling`): bf16 and every OpenVINO layer (measured, docs/results.md);
        not fp32 in PyTorch, nor ONNX Runtime's dynamic int8 (its per-call scales move with batch-mates)."""
        return self.precision == "bf16" or self.backend == "openvino"

    @property
    def exact_per_row(self) -> bool:
        """Whether a row's result is the same whatever its batch-mates (fp32 only: reduced-precision kernels
        and per-call int8 scales may change the last bits with the batch's shape)."""
        return self.precision == "fp32"

    @classmethod
    def parse(cls, name: str) -> Runtime:
        precision, _, backend = name.partition("-")
        return cls(precision, backend)


FP32 = Runtime()
BF16 = Runtime("bf16")
INT8 = Runtime("int8")
BF16_OPENVINO = Runtime("bf16", "openvino")
INT8_OPENVINO = Runtime("int8", "openvino")
# What `auto` may run on a CPU, fastest first with early exit on both CPUs measured, a Xeon with AMX and a
# Zen 4 without (docs/results.md, "Early exit on the runtime a CPU user picks"): OpenVINO's static int8 (VNNI
# or AMX-INT8), then bf16 on OpenVINO and on PyTorch (AMX-BF16 or AVX512-BF16), then ONNX Runtime's int8.
CPU_RUNTIMES = (INT8_OPENVINO, BF16_OPENVINO, BF16, INT8)
# for a named precision, its backends in that order (fp32: torch, whose layers run as trained)
AUTO_BACKENDS = {
    precision: tuple(r.backend for r in CPU_RUNTIMES if r.precision == precision) or ("torch",)
    for precision in PRECISIONS
}


def missing_backend(backend: str) -> str | None:
    """Why `backend` cannot run here (a package of its extra is missing), else None."""
    if backend not in EXTRA:
        return None
    extra, packages = EXTRA[backend]
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        return f"backend {backend} needs {', '.join(missing)}: pip install 'early-exit-pipeline[{extra}]'"
    return None


def auto_runtimes(support: CpuSupport, gpu: bool) -> tuple[tuple[Runtime, ...], str]:
    """(the runtimes `auto` may pick on this machine, fastest first as measured with early exit, why):
    `CPU_RUNTIMES` less those whose precision the CPU lacks fast units for, fp32 where it has neither."""
    if gpu:
        return (BF16,), "a GPU: bf16"
    fast = {"int8": support.has_int8, "bf16": support.has_bf16}
    runtimes = tuple(
        runtime
        for runtime in CPU_RUNTIMES
        if fast[runtime.precision] and not_on_this_arch(runtime, support) is None
    )
    has = {
        (True, True): "int8 dot products and bf16",
        (True, False): "int8 dot products but no bf16",
        (False, True): "bf16 but no int8 dot products",
        (False, False): "neither bf16 nor VNNI",
    }[fast["int8"], fast["bf16"]]
    return runtimes or (FP32,), f"{has} ({support.describe()})"


def auto_backends(precision: str, can_calibrate: bool = True) -> list[str]:
    """The backends `auto` may pick for `precision`, fastest first, installed here; without texts to calibrate
    on (`can_calibrate`), not those whose layers are calibrated when built (OpenVINO int8)."""
    return [
        backend
        for backend in AUTO_BACKENDS[precision]
        if why_not(Runtime(precision, backend), can_calibrate) is None
    ]


def resolve_runtime(
    precision: str = "auto",
    backend: str = "auto",
    gpu: bool = False,
    support: CpuSupport | None = None,
    can_calibrate: bool = True,
) -> tuple[Runtime, str]:
    """(the runtime to use, the reason), `auto` resolved for this machine (`support`: its CPU, by default read
    here; `can_calibrate`: whether texts like those to be scored are at hand, for the backends that calibrate
    their layers); ValueError in one line for a runtime this machine cannot run."""
    support = support or cpu_support()
    if precision == "auto":
        return _automatic(support, backend, gpu, can_calibrate)
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {['auto', *PRECISIONS]}")
    if gpu:
        if precision == "int8":
            raise ValueError("precision 'int8' runs on CPUs (ONNX Runtime): GPU actors use bf16 or fp32")
        _check_gpu_backend(backend)
    elif precision == "bf16" and not support.has_bf16:
        raise ValueError(
            "precision 'bf16' needs a CPU with AMX-BF16 or AVX512-BF16 (or a GPU) and this one has neither "
            f"({support.describe()}): use --precision auto"
        )
    if backend != "auto":
        _check_installed(backend)
        return Runtime(precision, backend), "asked for"
    installed = auto_backends(precision, can_calibrate)
    if not installed:
        raise ValueError(missing_backend(AUTO_BACKENDS[precision][-1]))
    backend = "torch" if gpu else installed[0]
    why = f"asked for; backend {backend} (the fastest installed for {precision}, docs/results.md)"
    return Runtime(precision, backend), why


def _automatic(support: CpuSupport, backend: str, gpu: bool, can_calibrate: bool) -> tuple[Runtime, str]:
    """`auto` precision: the first of `auto_runtimes` on `backend` (or any, for "auto") that can run here."""
    candidates, why = auto_runtimes(support, gpu)
    if backend != "auto":
        if gpu:
            _check_gpu_backend(backend)
        _check_installed(backend)
        on_backend = [runtime for runtime in candidates if runtime.backend == backend]
        usable = [r for r in on_backend if can_calibrate or not r.needs_calibration_texts] or on_backend
        if usable:
            return usable[0], why
        # none of the fast runtimes runs on this backend here: its own fp32 (every backend but ONNX
        # Runtime's, which runs int8 only, and runs it on any CPU)
        fallback = Runtime("fp32", backend) if backend in RUNS["fp32"] else Runtime("int8", backend)
        names = [r.name for r in candidates]
        return fallback, f"{why}; none of {names} runs on {backend}, so {fallback.name}"
    for runtime in candidates:
        blocked = why_not(runtime, can_calibrate)
        if blocked is None:
            return runtime, f"{why}; {runtime.name} (the fastest that runs here, docs/results.md)"
        why += f"; not {runtime.name}: {blocked}"
    return FP32, f"{why}; so fp32; backend torch"  # e.g. int8 without the int8 extras


def not_on_this_arch(runtime: Runtime, support: CpuSupport) -> str | None:
    """Why `runtime` does not run as asked on the CPU's architecture, else None: OpenVINO's ARM plugin runs
    int8 and bf16 layers in fp16."""
    if runtime.backend == "openvino" and support.arch != "x86_64":
        return f"OpenVINO's {support.arch} plugin runs these layers in fp16, not as asked"
    return None


def why_not(
    runtime: Runtime, can_calibrate: bool, installed: Callable[[str], str | None] = missing_backend
) -> str | None:
    """Why `runtime` cannot run here (its backend is missing: `installed`, or it calibrates with no
    texts), else None."""
    if not can_calibrate and runtime.needs_calibration_texts:
        return "no texts to calibrate its layers on"
    return installed(runtime.backend)


def _check_gpu_backend(backend: str) -> None:
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend {backend!r} runs on CPUs: GPU actors use torch")


def _check_installed(backend: str) -> None:
    reason = missing_backend(backend)
    if reason:
        raise ValueError(reason)
