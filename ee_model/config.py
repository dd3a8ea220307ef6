"""The one typed config of an early-exit model: what is saved next to the weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ee_model.exit_risk import ExitRisk
from ee_model.policies import (  # noqa: F401  (POLICY_NAMES: re-exported)
    KNOB_OF_POLICY,
    POLICY_NAMES,
    ExitRequest,
    ExitSetting,
    PolicyName,
    check_patience,
    check_policy,
    check_risk,
    check_threshold,
)

HeadType = Literal["linear", "mlp"]
HeadNorm = Literal["final", "own"]
Pooling = Literal["cls", "mean"]
Variant = Literal["kl", "count"]

# the choices in messages come from the types
HEAD_TYPES: tuple[str, ...] = get_args(HeadType)
HEAD_NORMS: tuple[str, ...] = get_args(HeadNorm)
POOLINGS: tuple[str, ...] = get_args(Pooling)
VARIANTS: tuple[str, ...] = get_args(Variant)

CONFIG_FILE = "ee_config.json"


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def check_labels(labels: Any) -> tuple[str, ...]:
    """Return labels as a tuple of strings, refusing empty, duplicate or non-string entries."""
    if isinstance(labels, str) or not isinstance(labels, (list, tuple)):
        raise ValueError(f"labels must be a list of class names, got {labels!r}")
    if len(labels) < 2:
        raise ValueError(f"labels needs at least 2 classes, got {list(labels)!r}")
    bad = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if bad:
        raise ValueError(f"labels must be non-empty strings; bad entries: {bad!r}")
    seen: set[str] = set()
    duplicates = sorted({label for label in labels if label in seen or seen.add(label)})
    if duplicates:
        raise ValueError(f"labels contain duplicates: {duplicates!r}")
    return tuple(labels)


def check_head_dropout(head_dropout: Any) -> float:
    """A dropout probability: a number in [0, 1)."""
    if (
        isinstance(head_dropout, bool)
        or not isinstance(head_dropout, (int, float))
        or not 0 <= head_dropout < 1
    ):
        raise ValueError(f"head_dropout={head_dropout!r} must be in [0, 1)")
    return float(head_dropout)


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """The options of an early-exit model that a user chooses before training, each checked here; the training
    config's `model` section is these plus where the encoder comes from.

    Attributes:
        head_type: "linear" (the paper's Linear + Softmax) or "mlp" (the paper's Table 1:
            H -> 128 -> 128 -> N): the final classifier's (the teacher's), and the students' unless
            `student_head_type` says otherwise.
        student_head_type: the student heads' type (every layer but the last), when it differs from
            `head_type`: for example MLP students distilling a linear teacher; None: `head_type`.
        pooling: "cls" (first token) or "mean" (average over real tokens).
        threshold: default normalised-entropy threshold S for the "entropy" policy (0 <= S <= 1;
            S = 0: full depth).
        patience: default t for "count" / "patience" policies.
        risk: default r for the "risk" policy (estimated risk of a changed prediction, in [0, 1]).
        max_length: tokens kept per text (truncation); 128 is the paper's FLOPs convention.
        head_dropout: dropout before each exit head while training.
        head_norm: for encoders whose inner layers leave un-normalised outputs (ModernBERT): "final" (every
            head reads the layer's tokens through the encoder's final norm, as the final classifier does) or
            "own" (each student head pools the raw output and normalises the pooled vector with a LayerNorm
            of its own, initialised from the final norm and trained with the head). Other families: "final"
            (their layers end in a norm; "own" is refused).
    """

    head_type: HeadType = "linear"
    student_head_type: HeadType | None = None
    pooling: Pooling = "mean"  # measured best on BBC with MiniLM-L6 (see docs/results.md)
    threshold: float = 0.1
    patience: int = 3
    risk: float = 0.01
    max_length: int = 128
    head_dropout: float = 0.1
    head_norm: HeadNorm = "final"

    def __post_init__(self) -> None:
        _check_choice("head_type", self.head_type, HEAD_TYPES)
        if self.student_head_type is not None:
            _check_choice("student_head_type", self.student_head_type, HEAD_TYPES)
        _check_choice("head_norm", self.head_norm, HEAD_NORMS)
        _check_choice("pooling", self.pooling, POOLINGS)
        check_threshold(self.threshold)
        check_patience(self.patience)
        check_risk(self.risk)
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r} must be an integer >= 2")
        check_head_dropout(self.head_dropout)

    @property
    def student_heads(self) -> str:
        """The type of every student head (every layer's but the last): `student_head_type`, else
        `head_type`."""
        return self.student_head_type or self.head_type

    def options(self) -> dict[str, Any]:
        """The ModelOptions fields as keyword arguments (of `EarlyExitClassifier.from_encoder`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelOptions)}


def default_policy(variant: str, has_exit_risk: bool) -> str:
    """The one place that decides a variant's default exit policy: count -> "count" (Algorithm 2); kl ->
    "risk" when the model has a fitted exit risk (the training job fits one unless eval.exit_risk_rows = 0:
    docs/results.md, "Exit rules beyond one S"), else "entropy" (one S, Algorithm 1)."""
    if variant == "count":
        return "count"
    return "risk" if has_exit_risk else "entropy"


@dataclass(frozen=True)
class KnobPromise:
    """What the stored knob was certified to keep, and on which rows: `statistic` ("agreement": the share of
    rows whose label equals full depth's, no labels needed; "retention": the share of the rows full depth
    gets right that the early exit keeps, on labels) is >= `min_value` with confidence 1 - `delta`, judged on
    `rows` rows, described by `rows_source`."""

    statistic: Literal["agreement", "retention"]
    min_value: float
    delta: float
    rows: int
    rows_source: str

    def describe(self) -> str:
        of = "agreement with full depth" if self.statistic == "agreement" else "retention of full accuracy"
        return (
            f"{of} >= {self.min_value:g} at confidence {1 - self.delta:g}, certified on {self.rows} rows: "
            f"{self.rows_source}"
        )


@dataclass(frozen=True)
class EarlyExitConfig(ModelOptions):
    """Everything needed to rebuild an early-exit classifier, apart from its weights: the `ModelOptions` and
    the fields below.

    Attributes:
        encoder_name_or_path: the Hugging Face model id or local path the encoder came from (provenance).
        labels: class names; index i of every exit's logits is labels[i].
        encoder_config: the encoder's `PretrainedConfig.to_dict()`, so loading needs no hub access.
        variant: "kl" (two-stage) or "count" (joint); with the exit risk, sets the default policy.
        policy: default exit policy used by `predict` when none is given.
        encoder_revision: the hub revision of the encoder, when known.
        exit_risk: the "risk" policy's fitted model (`ee_model.exit_risk.ExitRisk`), None until fitted.
        knob_promise: what the stored knob was certified on (`KnobPromise`), None when it was not.
    """

    encoder_name_or_path: str
    labels: tuple[str, ...]
    encoder_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    variant: Variant = "kl"
    policy: PolicyName | None = None  # None -> `default_policy` of the variant
    encoder_revision: str | None = None
    exit_risk: ExitRisk | None = None
    knob_promise: KnobPromise | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.exit_risk, dict):  # from to_dict / JSON
            object.__setattr__(self, "exit_risk", ExitRisk.from_dict(self.exit_risk))
        if isinstance(self.knob_promise, dict):
            object.__setattr__(self, "knob_promise", KnobPromise(**self.knob_promise))
        object.__setattr__(self, "labels", check_labels(self.labels))
        _check_choice("variant", self.variant, VARIANTS)
        if self.policy is None:
            object.__setattr__(self, "policy", default_policy(self.variant, self.exit_risk is not None))
        check_policy(self.policy)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def encoder_model_type(self) -> str:
        """The encoder's `model_type` (bert, modernbert, deberta-v2, ...)."""
        return self.encoder_config.get("model_type", "bert")

    def pretrained_encoder_config(self) -> Any:
        """The encoder's transformers `PretrainedConfig`, rebuilt from the stored dict (no hub access)."""
        from transformers import AutoConfig

        data = dict(self.encoder_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    def setting(
        self,
        policy: str | None = None,
        threshold: float | None = None,
        patience: int | None = None,
        risk: float | None = None,
    ) -> ExitSetting:
        """The exit setting `predict` runs: `policy` (default the stored one) with the given knob, else the
        knob stored for it; the knob the policy does not take is ignored (the pyfunc passes every param)."""
        name = check_policy(policy or self.policy)
        knob_name = KNOB_OF_POLICY[name]
        if knob_name is None:
            return ExitSetting(name)
        given = {"threshold": threshold, "patience": patience, "risk": risk}[knob_name]
        return ExitSetting(name, getattr(self, knob_name) if given is None else given)

    def resolve(self, request: ExitRequest) -> ExitSetting:
        """The setting a model of this config runs for `request`: the asked policy and knob, the stored ones
        for what was not asked."""
        return self.setting(request.policy, **request.knobs)

    def with_setting(self, setting: ExitSetting, promise: KnobPromise | None = None) -> EarlyExitConfig:
        """This config with `setting` as the default policy and knob, and what it was certified on (None: not
        certified; a promise of the knob it replaces never carries over)."""
        return self.replace(policy=setting.policy, knob_promise=promise, **setting.kwargs)

    def replace(self, **changes: Any) -> EarlyExitConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["labels"] = list(self.labels)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EarlyExitConfig:
        """Build from a dict, refusing unknown keys so a typo never goes unnoticed."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown EarlyExitConfig keys: {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, directory: str | Path) -> EarlyExitConfig:
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no {CONFIG_FILE} in {directory}: not a saved early-exit model directory"
            )
        return cls.from_dict(json.loads(path.read_text()))
