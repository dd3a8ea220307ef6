"""The scoring job's one typed config (jobs/score.py builds it from its flags; every default is declared here
and the CLI's help reads it from here)."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ee_model.policies import ExitRequest
from ee_model.runtime import Runtime, resolve_runtime
from pipelines.config import ThresholdTarget, check_choice, check_positive

Tokenizing = Literal["auto", "actor", "tasks"]
ChooseRuntime = Literal["auto", "measure", "table"]
EXIT_FLAGS = ("policy", "threshold", "patience", "risk")  # the CLI's flags that make ScoreConfig.exit


@dataclass(frozen=True)
class ScoreConfig:
    """Offline batch scoring of parquet corpora (jobs/score.py)."""

    model: str  # models:/name@alias, models:/name/version, any MLflow model URI, or a saved model directory
    input: str  # parquet file, folder, glob (local)
    output: str  # folder; one sub-folder per (model, policy, knob)
    # the policy and knob asked for; what is not asked: the model's stored policy and its knob (or, with
    # calibrate_rows, the calibrated knob)
    exit: ExitRequest = field(default_factory=ExitRequest)
    text_column: str = "text"
    batch_size: int = 64  # rows per model call
    # rows per map_batches call: sorted by length together, then cut into model calls of batch_size, so a
    # model call holds texts of similar length (less padding); at least batch_size
    sort_rows: int = 512
    # scoring actors: None (default) sizes an autoscaling pool from the cluster when the job starts, 1 to as
    # many as its CPUs (GPUs) hold at cpus_per_actor (gpus_per_actor) each, a CPU left for a tokenising stage
    actors: int | None = None
    cpus_per_actor: float = 1.0  # torch threads follow it
    gpus_per_actor: float = 0.0
    # where texts become token ids: "actor" (each scoring actor tokenises its batches), "tasks" (a CPU stage
    # of Ray Data tasks before the actors, on any node's free CPUs: what keeps a GPU actor busy), "auto"
    # (tasks when the actors have GPUs, else actor: on CPUs tokenising is a few % of the work and a separate
    # stage only takes CPUs from the actors)
    tokenize: str = "auto"
    # what runs the transformer layers (ee_model.runtime): "auto" (what this machine runs fastest: bf16 on
    # a GPU, int8 on a CPU with VNNI, bf16 on one with bf16 units only, else fp32), "fp32",
    # "bf16", "int8"; backend "auto" (the fastest measured for the precision, installed), "torch", "openvino",
    # "onnxruntime". Layers a backend builds (int8, OpenVINO) are built once per model version into
    # <output>/_int8/, <output>/_openvino/ or <output>/_openvino-int8/ (NNCF int8, calibrated on 300 rows of
    # the inputs) and shipped with the model
    precision: str = "auto"
    backend: str = "auto"
    # how "auto" chooses on CPU actors (pipelines.scoring.runtime_choice): "measure" (time the candidates
    # this CPU runs on rows of the input, keep the fastest at >= 99 % agreement with fp32), "auto" (measure
    # on inputs of >= 50,000 rows, else the CPU-flag table), "table" (the table); pinned per output folder
    choose_runtime: str = "auto"
    include_probs: bool = False
    output_prefix: str = ""  # prepended to every output column (label -> pred_label) to keep an input `label`
    # > 0: choose the knob on this many rows of the input without labels (pipelines.scoring.calibration): the
    # fastest agreeing with full depth on >= min_agreement of them; pinned in <output>/_calibration so reruns
    # keep it. "auto": so where the input is large enough to pay for it (`auto_calibration_rows`), else the
    # model's stored knob (that choice pinned too); 0: the model's stored knob. An explicit knob (threshold,
    # patience, risk) or policy "none" is scored as asked, never calibrated
    calibrate_rows: int | Literal["auto"] = "auto"
    min_agreement: float = 0.99
    delta: float = 0.05  # the calibrated knob's agreement promise holds with probability >= 1 - delta
    # seed of the calibration's uniform random sample of the input rows; None: a fresh one, recorded with the
    # pinned calibration and in the summary (give it to repeat a calibration)
    calibration_seed: int | None = None
    # delete the outputs whose input file no longer exists (else they are kept and reported)
    remove_orphans: bool = False
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: str = "early-exit-scoring"

    def __post_init__(self) -> None:
        check_positive("batch_size", self.batch_size)
        check_positive("sort_rows", self.sort_rows)
        if self.actors is not None:
            check_positive("actors", self.actors)
        check_positive("cpus_per_actor", self.cpus_per_actor)
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor={self.gpus_per_actor!r} must be >= 0")
        check_choice("tokenize", self.tokenize, Tokenizing)
        check_choice("choose_runtime", self.choose_runtime, ChooseRuntime)
        check_output_folder(self.output)
        self.runtime()  # an unknown, unavailable or unsupported precision / backend is refused here
        if self.output_prefix and not self.output_prefix.replace("_", "").isalnum():
            raise ValueError(f"output_prefix={self.output_prefix!r} must be letters, digits and '_'")
        check_calibrate_rows(self.calibrate_rows)
        if self.calibration_seed is not None and not 0 <= self.calibration_seed < 2**32:
            raise ValueError(f"calibration_seed={self.calibration_seed!r} must be in [0, 2**32)")
        if self.calibration_seed is not None and not self.calibrate_rows:
            raise ValueError("calibration_seed seeds the sample of calibrate_rows: give calibrate_rows too")
        if not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement={self.min_agreement!r} must be in (0, 1]")
        ThresholdTarget(min_retention=self.min_agreement, delta=self.delta)  # checks delta
        asked = self.calibrate_rows != "auto" and self.calibrate_rows > 0
        if asked and self.exit.policy == "none":
            raise ValueError("calibrate_rows chooses an exit knob; policy 'none' has none")
        if asked and self.exit.knobs:
            raise ValueError(
                "calibrate_rows chooses the knob: give a threshold / patience / risk or calibrate_rows, "
                "not both"
            )

    @classmethod
    def from_flags(cls, **flags: Any) -> ScoreConfig:
        """The config from flat values, as the CLI gives them: `policy`, `threshold`, `patience` and `risk`
        become the `exit` request, the rest are fields."""
        asked = {name: flags.pop(name) for name in EXIT_FLAGS if name in flags}
        if isinstance(flags.get("calibrate_rows"), str) and flags["calibrate_rows"] != "auto":
            text = flags["calibrate_rows"]
            flags["calibrate_rows"] = int(text) if text.strip().isdigit() else text  # else refused as it is
        return cls(**flags, exit=ExitRequest(**asked))

    def runtime(self, model_type: str | None = None) -> tuple[Runtime, str]:
        """(what runs the layers, why): `precision` and `backend` with "auto" resolved for this machine (the
        driver's CPU, or a GPU when the actors have one); the actors check their own CPU again. With the
        encoder's `model_type`, for its family (`ee_model.runtime_layers.resolve_encoder_runtime`: a runtime
        the family cannot run is refused, ValueError)."""
        gpu = self.gpus_per_actor > 0
        if model_type is None:
            return resolve_runtime(self.precision, self.backend, gpu=gpu)
        from ee_model.runtime_layers import resolve_encoder_runtime  # loads the model code: not for the CLI

        return resolve_encoder_runtime(model_type, self.precision, self.backend, gpu=gpu)

    @property
    def calibrates(self) -> bool:
        """Whether the knob may be calibrated on the input: `calibrate_rows` given or "auto", no knob asked,
        a policy that exits early (an "auto" on a small input then keeps the stored knob)."""
        return bool(self.calibrate_rows) and not self.exit.knobs and self.exit.policy != "none"

    @property
    def rows_per_task(self) -> int:
        """Rows per map_batches call: the sort window, never less than one model call."""
        return max(self.sort_rows, self.batch_size)

    @property
    def tokenizes_in_tasks(self) -> bool:
        """Whether a tokenising stage runs before the scoring actors (`tokenize`, "auto" resolved)."""
        return self.tokenize == "tasks" or (self.tokenize == "auto" and self.gpus_per_actor > 0)


def check_calibrate_rows(rows: Any) -> None:
    """calibrate_rows is "auto" or an int >= 0 (ValueError, one line)."""
    if rows == "auto":
        return
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"calibrate_rows={rows!r} must be 'auto' or a whole number >= 0")


def check_output_folder(output: str) -> None:
    """ValueError, one line, where `output` cannot be a folder: it, or the nearest part of it that exists,
    is a file."""
    path = Path(output).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is below {str(existing)!r}, a file"
        raise ValueError(f"output={output!r} {where}: give a folder (it is created if missing)")


def score_defaults() -> dict[str, Any]:
    """{field: its default} of `ScoreConfig` (the required fields left out)."""
    return {f.name: f.default for f in fields(ScoreConfig) if f.default is not MISSING}
