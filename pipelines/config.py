"""The typed training config: one frozen dataclass per concern, loaded from YAML with unknown keys refused.

Profiles: "quick" (the default: finishes the embedded BBC + MiniLM-L6 run on 2 CPU cores in under 20 minutes)
and "full" (the paper's settings, for GPU clusters). A YAML file and CLI overrides are applied on top.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from ee_model.config import VARIANTS, ModelOptions, default_policy
from ee_model.losses import JointWeighting
from ee_model.policies import EXIT_RULES
from ee_model.runtime import resolve_runtime

Stage = Literal["stage1", "stage2", "joint"]
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
Sampler = Literal["tpe", "gp"]
TargetKind = Literal["retention", "flops"]
FeatureDtype = Literal["float16", "float32"]


def check_choice(name: str, value: Any, kind: Any) -> None:
    """`value` is one of the Literal type `kind`'s choices; the message lists them from the type."""
    choices = list(get_args(kind))
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")


def check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r} must be a number")
    if not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")


@dataclass(frozen=True)
class DataConfig:
    """Where labeled and unlabeled data come from. Paths: parquet file, folder, glob, or pyarrow URI."""

    train_path: str | None = None  # None -> the BBC News corpus (demo extra), split 70/15/15
    dev_path: str | None = None  # None -> split from train_path
    test_path: str | None = None  # None -> split from train_path
    text_column: str = "text"
    label_column: str = "label"
    # dev is where the automatic knob's promise is tested: keeping >= 99 % of full accuracy with 95 %
    # confidence needs >= 299 dev rows the full model gets right
    # (pipelines.evaluation.thresholds.rows_needed); 15 % of BBC gives a few more
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    split_seed: int = 0
    # Stage 2 corpus, streamed: None -> the training articles' paragraphs with the default corpus, else none.
    unlabeled_path: str | None = None
    unlabeled_text_column: str | None = None  # default: text_column
    max_unlabeled_rows: int | None = 4000  # the quick default; None = the whole corpus (the full profile)
    cache_dir: str = ".ee_data"  # where the default corpus is written as parquet on first use

    def __post_init__(self) -> None:
        fractions = tuple(float(f) for f in self.split_fractions)
        object.__setattr__(self, "split_fractions", fractions)
        if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"split_fractions={self.split_fractions!r} must be 3 non-negative numbers summing to 1"
            )
        if fractions[0] == 0:
            raise ValueError("split_fractions gives the training split nothing")
        if (self.dev_path is None) != (self.test_path is None):
            raise ValueError(
                "give both dev_path and test_path, or neither (then both are split from train_path)"
            )
        if self.max_unlabeled_rows is not None and self.max_unlabeled_rows < 0:
            raise ValueError(f"max_unlabeled_rows={self.max_unlabeled_rows!r} must be >= 0")


# Stage 2's learning rate by the students' head type, measured on BBC with the quick profile (docs/results.md:
# linear students, "How much stage 2 the students need"; MLP students, issue 40: 2e-3 beat 1e-2)
STAGE2_LEARNING_RATES = {"linear": 1e-2, "mlp": 2e-3}


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelOptions):
    """The model to train: its encoder, and `ee_model.ModelOptions` (declared and checked there, once).
    `student_head_type` unset (None) is `head_type`, made concrete when the TrainConfig is built."""

    encoder: str | None = None  # HF id or local path; None -> the packaged MiniLM-L6 (demo extra)
    encoder_revision: str | None = None
    max_length: int = 64  # the quick default (2 CPU cores); the model's own and the full profile's: 128
    # the exit policy whose knob is chosen on dev and stored as the model's default: one of EXIT_RULES;
    # None -> the variant's (`TrainConfig.exit_policy`); "risk" needs eval.exit_risk_rows > 0
    policy: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.policy is not None and self.policy not in EXIT_RULES:
            raise ValueError(f"model.policy={self.policy!r} is not one of {list(EXIT_RULES)} (or unset)")


@dataclass(frozen=True)
class StageConfig:
    """Optimisation of one training stage; each stage's own loss options are in its subclass."""

    learning_rate: float = 1e-4
    epochs: int = 1
    # rows per optimizer step on each worker (as Hugging Face's per_device_train_batch_size): the global batch
    # is this x resources.num_workers, printed when the stage starts
    batch_size_per_worker: int = 16
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_steps: int | None = None  # stop the stage after this many optimizer steps (quick runs)
    checkpoint_every_steps: int = 50  # also at each epoch end; the paper (full profile): 1500

    def __post_init__(self) -> None:
        self.check_learning_rate()
        check_positive("epochs", self.epochs)
        check_positive("batch_size_per_worker", self.batch_size_per_worker)
        check_positive("checkpoint_every_steps", self.checkpoint_every_steps)
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")

    def check_learning_rate(self) -> None:
        check_positive("learning_rate", self.learning_rate)


@dataclass(frozen=True)
class Stage1Config(StageConfig):
    """KL stage 1: backbone + final classifier, cross-entropy (focal when focal_gamma > 0)."""

    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.focal_gamma >= 0:
            raise ValueError(f"focal_gamma={self.focal_gamma!r} must be >= 0")


@dataclass(frozen=True)
class Stage2Config(StageConfig):
    """KL stage 2: students distil the frozen teacher (KL), optionally + cross-entropy to gold labels."""

    # Heads only, on features the frozen backbone computed once per row (pipelines.training.features): epochs
    # cost heads, not backbones. The budget below was measured on BBC (docs/results.md, "How much stage 2 the
    # students need" and "Stage 2 from cached features"). learning_rate None: the students' head type's
    # (`STAGE2_LEARNING_RATES`, set when the TrainConfig is built).
    learning_rate: float | None = None
    epochs: int = 3
    batch_size_per_worker: int = 32
    checkpoint_every_steps: int = 100
    kl_weight: float = 1.0
    gold_weight: float = 0.0  # DeeBERT's recipe is kl_weight 0, gold_weight 1
    # the students train on features computed once per row by a frozen pass (pipelines.training.features):
    # their dtype in the store, where the store lives (default <resources.storage_path>/stage2_features; a
    # path every node can read), and whether it stays after the run (a later run with the same stage-1
    # weights and corpus reuses a kept store)
    feature_dtype: str = "float16"
    feature_store: str | None = None
    keep_features: bool = False

    def check_learning_rate(self) -> None:
        if self.learning_rate is not None:  # None: the students' head type's, set by TrainConfig
            super().check_learning_rate()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("feature_dtype", self.feature_dtype, FeatureDtype)
        if self.kl_weight < 0 or self.gold_weight < 0 or self.kl_weight + self.gold_weight == 0:
            raise ValueError(
                f"kl_weight={self.kl_weight!r}, gold_weight={self.gold_weight!r}: both >= 0, not both 0"
            )


@dataclass(frozen=True)
class JointConfig(StageConfig):
    """Count variant: every exit trained together with cross-entropy."""

    joint_weighting: JointWeighting = "uniform"  # or "layer_index" (PABEE)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("joint_weighting", self.joint_weighting, JointWeighting)


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 1
    use_gpu: bool = False
    # Leave CPU for Ray Data: workers that take every CPU starve the data pipeline and the run hangs.
    cpus_per_worker: float = 0.5
    max_failures: int = 2  # worker crashes survived by restarting from the last checkpoint
    storage_path: str = "ray_results"  # made absolute; any pyarrow URI (s3://...) for multi-node
    torch_threads: int | None = None  # per worker; None = torch's default
    # Ray placement of the workers: PACK fills a node first; SPREAD / STRICT_SPREAD put them on different
    # nodes
    placement_strategy: Placement = "PACK"

    def __post_init__(self) -> None:
        check_choice("placement_strategy", self.placement_strategy, Placement)
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers!r} must be >= 0 (0 = Ray Train local mode)")
        check_positive("cpus_per_worker", self.cpus_per_worker)


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str | None = None  # None -> $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment_name: str = "early-exit"
    registered_model_name: str = "early-exit-classifier"
    register: bool = True


@dataclass(frozen=True)
class TuneSearchConfig:
    """Bayesian learning-rate search of stage 1 (KL) or joint training (Count) with Ray Tune + Optuna."""

    enabled: bool = False
    num_samples: int = 2  # the quick default; the full profile: 4
    lr_min: float = 8e-5  # the paper searched 8e-5 .. 2e-4
    lr_max: float = 2e-4
    sampler: Sampler = "tpe"  # or "gp" (Optuna's GP sampler)
    max_concurrent_trials: int | None = None  # None -> as many as the cluster's CPUs/GPUs fit
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("num_samples", self.num_samples)
        check_positive("lr_min", self.lr_min)
        if not self.lr_max > self.lr_min:
            raise ValueError(f"lr_max={self.lr_max!r} must be > lr_min={self.lr_min!r}")
        check_choice("sampler", self.sampler, Sampler)
        if self.max_concurrent_trials is not None:
            check_positive("max_concurrent_trials", self.max_concurrent_trials)


@dataclass(frozen=True)
class ThresholdTarget:
    kind: str = "retention"  # "retention" or "flops"
    min_retention: float = 0.99
    flops_budget: float = 0.5  # fraction of full-depth FLOPs, for kind="flops"
    delta: float = 0.05  # for "retention": the promise may fail with at most this probability

    def __post_init__(self) -> None:
        check_choice("target", self.kind, TargetKind)
        if not 0 < self.min_retention <= 1:
            raise ValueError(f"min_retention={self.min_retention!r} must be in (0, 1]")
        if not 0 < self.flops_budget <= 1:
            raise ValueError(f"flops_budget={self.flops_budget!r} must be in (0, 1]")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta!r} must be a number in (0, 1)")

    def describe(self) -> str:
        if self.kind == "retention":
            return (
                f"fastest knob keeping >= {self.min_retention:.1%} of full-depth accuracy "
                f"with confidence {1 - self.delta:.0%}"
            )
        return f"most accurate knob within {self.flops_budget:.0%} of full-model FLOPs on dev"


S_GRID: tuple[float, ...] = tuple(round(0.02 * i, 2) for i in range(51))  # 0, 0.02, ..., 1
# the "risk" policy's r: 0 (full depth), then 1e-4 ... 0.5 in 148 log steps of 10^0.025 (6 %), 1 (every
# row leaves at layer 1). Fine, since fixed-sequence testing pays nothing per setting tested: the walk stops
# closer to the last safe setting (measured: docs/results.md, "Exit rules beyond one S")
RISK_GRID: tuple[float, ...] = (0.0, *(float(f"{10 ** (-4 + 0.025 * i):.3g}") for i in range(149)), 1.0)


@dataclass(frozen=True)
class EvalConfig:
    """Dev/test evaluation after training: sweeps, the oracle, the automatic knob, wall-clock timings."""

    thresholds: tuple[float, ...] = S_GRID  # S grid in [0, 1] swept on dev and test (t always 1..L-1)
    risks: tuple[float, ...] = RISK_GRID  # r grid in [0, 1] of the "risk" policy, swept the same way
    # training rows (evenly spaced) the "risk" policy's exit risk is fitted on, no labels used; 0: no fit
    exit_risk_rows: int = 2000
    # unlabeled rows like the text to be scored that the automatic knob is certified on, label-free (agreement
    # with full depth; `pipelines.training.certification`: the default corpus's dev articles' paragraphs and
    # passages, else a random slice of the unlabeled corpus held out of stage 2), dev's labels the check
    # beside it; 0, or no such rows: certified on dev's labels
    certify_rows: int = 4000
    batch_size: int = 64
    # Automatic knob of the model's policy (`TrainConfig.exit_policy`), chosen on dev and stored as its
    # default: r (risk, the KL default), S (entropy) or t (count, patience)
    auto_threshold: bool = True  # False -> model.risk / model.threshold / model.patience stay as configured
    target: str = "retention"  # "retention": keep >= min_retention of full accuracy; "flops": within budget
    min_retention: float = 0.99
    flops_budget: float = 0.5  # fraction of the full model's FLOPs, for target "flops"
    delta: float = 0.05  # target "retention" holds on unseen data with probability >= 1 - delta
    # Measured wall-clock speed-ups on test (same process, vs full depth): the chosen knob plus these.
    timed_thresholds: tuple[float, ...] = (0.1, 0.5, 0.8)
    timed_patiences: tuple[int, ...] = (2, 4)
    wallclock_batch_sizes: tuple[int, ...] = (1, 64)
    wallclock_rows: int = 256  # test rows timed per point; 0 turns timing off
    wallclock_repeats: int = 3  # full depth and every point timed in turn this many times; medians reported
    # the runtime scoring will use (ee_model.runtime; "auto": this machine's fastest): the automatic knob is
    # checked in it through the exit engine on dev, and the wall-clock columns are timed in it
    precision: str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        # timed points are always on the grid, and so is S = 0 (full depth), the fallback of the automatic
        # knob
        grid = tuple(
            sorted({0.0} | {float(s) for s in self.thresholds} | {float(s) for s in self.timed_thresholds})
        )
        if not grid or grid[0] < 0 or grid[-1] > 1:
            raise ValueError(f"thresholds={self.thresholds!r} must be values in [0, 1] (normalised entropy)")
        object.__setattr__(self, "thresholds", grid)
        risks = tuple(sorted({0.0} | {float(r) for r in self.risks}))
        if risks[0] < 0 or risks[-1] > 1:
            raise ValueError(f"risks={self.risks!r} must be values in [0, 1] (risk of a changed prediction)")
        object.__setattr__(self, "risks", risks)
        if self.exit_risk_rows < 0:
            raise ValueError(f"exit_risk_rows={self.exit_risk_rows!r} must be >= 0")
        if self.certify_rows < 0:
            raise ValueError(f"certify_rows={self.certify_rows!r} must be >= 0")
        self.target_spec()  # checks target, min_retention, flops_budget, delta
        resolve_runtime(self.precision, self.backend)  # one line for a runtime this machine cannot run
        check_positive("batch_size", self.batch_size)
        for size in self.wallclock_batch_sizes:
            check_positive("wallclock_batch_sizes", size)
        for t in self.timed_patiences:
            check_positive("timed_patiences", t)
        check_positive("wallclock_repeats", self.wallclock_repeats)
        if self.wallclock_rows < 0:
            raise ValueError(f"wallclock_rows={self.wallclock_rows!r} must be >= 0")

    def target_spec(self) -> ThresholdTarget:
        return ThresholdTarget(self.target, self.min_retention, self.flops_budget, self.delta)


@dataclass(frozen=True)
class TrainConfig:
    variant: str = "kl"
    profile: str = "quick"
    seed: int = 0
    run_name: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    joint: JointConfig = field(default_factory=JointConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneSearchConfig = field(default_factory=TuneSearchConfig)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant={self.variant!r} is not one of {list(VARIANTS)}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile={self.profile!r} is not one of {sorted(PROFILES)}")
        if self.resources.num_workers == 0:
            raise ValueError(
                "resources.num_workers=0 is Ray Train's local mode, which keeps no checkpoints; the job "
                "trains from them: use 1 or more workers"
            )
        self._resolve_student_heads()
        if self.model.policy == "risk" and self.eval.exit_risk_rows == 0:
            raise ValueError(
                "model.policy 'risk' needs its exit risk fitted: eval.exit_risk_rows must be > 0"
            )

    def _resolve_student_heads(self) -> None:
        """Unset student head type and stage-2 learning rate made concrete, so what runs, what MLflow logs and
        what the model saves say the same: the students' type the teacher's (MLP students over a linear
        teacher are `model.student_head_type=mlp`: faster on two corpora of three, slower on the third,
        docs/results.md, issue 40), stage 2's learning rate the students' type's (`STAGE2_LEARNING_RATES`)."""
        students = self.model.student_head_type
        if students is None:
            students = self.model.head_type
            object.__setattr__(self, "model", dataclasses.replace(self.model, student_head_type=students))
        if self.stage2.learning_rate is None:
            rate = STAGE2_LEARNING_RATES[students]
            object.__setattr__(self, "stage2", dataclasses.replace(self.stage2, learning_rate=rate))

    def stages(self) -> list[Stage]:
        return ["stage1", "stage2"] if self.variant == "kl" else ["joint"]

    @property
    def exit_policy(self) -> str:
        """The policy the trained model gets: `model.policy`, else the variant's (`ee_model.config.
        default_policy`: kl gets "risk" when eval.exit_risk_rows > 0 fits an exit risk)."""
        if self.model.policy is not None:
            return self.model.policy
        return default_policy(self.variant, has_exit_risk=self.eval.exit_risk_rows > 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Profiles are overrides of the dataclass defaults, nothing else. The defaults are the quick profile: the
# embedded BBC + MiniLM-L6 run on 2 CPU cores in under 10 minutes.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {},
    # The paper: 10 epochs, checkpoint every 1500 steps, lr from the 8e-5..2e-4 range, stage 2 at 10x.
    "full": {
        "data": {"max_unlabeled_rows": None},
        "model": {"max_length": 128},
        "stage1": {
            "learning_rate": 1e-4,
            "epochs": 10,
            "batch_size_per_worker": 32,
            "checkpoint_every_steps": 1500,
        },
        "stage2": {
            "learning_rate": 1e-3,
            "epochs": 10,
            "batch_size_per_worker": 64,
            "checkpoint_every_steps": 1500,
        },
        "joint": {
            "learning_rate": 1e-4,
            "epochs": 10,
            "batch_size_per_worker": 32,
            "checkpoint_every_steps": 1500,
        },
        "resources": {"num_workers": 2, "use_gpu": True, "cpus_per_worker": 4},
        "tune": {"num_samples": 4},
    },
}


RENAMED = {"batch_size": "batch_size_per_worker"}  # in the stage sections


def elsewhere(key: str, where: str) -> str:
    """' (a setting of stage2)' when another section takes `key`, else ''."""
    if where in ("stage1", "stage2", "joint") and key in RENAMED:
        return f" (now {RENAMED[key]})"
    owners = [
        n for n, cls in NESTED.items() if n != where and key in {f.name for f in dataclasses.fields(cls)}
    ]
    return f" (a setting of {', '.join(owners)})" if owners else ""


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate a (nested) config dataclass from a dict, refusing unknown keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        given = ", ".join(f"{key}={data[key]!r}" + elsewhere(key, where) for key in unknown)
        raise ValueError(f"unknown key(s) in {where or 'config'}: {given}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        nested = NESTED.get(name) if cls is TrainConfig else None
        if nested is not None:
            value = _build(nested, value, f"{where}.{name}".lstrip("."))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


NESTED: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "stage1": Stage1Config,
    "stage2": Stage2Config,
    "joint": JointConfig,
    "resources": ResourcesConfig,
    "tracking": TrackingConfig,
    "eval": EvalConfig,
    "tune": TuneSearchConfig,
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def load_train_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, profile: str | None = None
) -> TrainConfig:
    """Profile defaults <- YAML file <- overrides (nested dicts, e.g. {"stage1": {"epochs": 2}})."""
    from_file: dict[str, Any] = {}
    if path is not None:
        try:
            from_file = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:  # one line: the problem and where, without the quoted source
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"{path} is not valid YAML: {problem}{where}") from None
        if not isinstance(from_file, dict):
            raise ValueError(f"{path} must hold a YAML mapping, got {type(from_file).__name__}")
    layered = merge(from_file, overrides or {})
    chosen = profile or layered.get("profile") or "quick"
    if chosen not in PROFILES:
        raise ValueError(f"profile={chosen!r} is not one of {sorted(PROFILES)}")
    return _build(TrainConfig, merge(merge(PROFILES[chosen], layered), {"profile": chosen}), "")


def resolve_tracking_uri(config: TrackingConfig) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else an absolute sqlite store in the working directory."""
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path('mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # workers run in other directories
    return uri
