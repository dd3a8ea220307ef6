"""Exit policies: after each student layer, which rows may leave.

Each policy carries per-row state (a dict of tensors indexed by row) that the caller compacts together with
the rows, so a row's previous prediction and counter travel with it when other rows leave the batch.
The final (teacher) layer always lets every remaining row out; policies are only asked about students.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ee_model.exit_risk import ExitRisk, log_odds
from ee_model.signals import normalised_entropy

State = dict[str, torch.Tensor]


class ExitPolicy:
    """Decides, per row, whether to exit after a student layer."""

    name = "base"

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {}

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """logits: (batch, N) of the current layer -> (exit mask (batch,) bool, new state)."""
        raise NotImplementedError


@dataclass(frozen=True)
class EntropyPolicy(ExitPolicy):
    """Algorithm 1 (KL variant): exit at the first layer whose normalised entropy < S. S <= 0 = full depth."""

    threshold: float
    name = "entropy"

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return normalised_entropy(logits) < self.threshold, state


class _AgreementPolicy(ExitPolicy):
    """Shared state of count and patience: the previous prediction and an agreement counter."""

    patience: int
    reset_on_change: bool

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {
            "previous": torch.full((batch_size,), -1, dtype=torch.long, device=device),  # no prediction yet
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        prediction = logits.argmax(dim=-1)  # (batch,)
        same = prediction == state["previous"]
        kept = state["count"] if not self.reset_on_change else torch.zeros_like(state["count"])
        count = torch.where(same, state["count"] + 1, kept)
        return count >= self.patience, {"previous": prediction, "count": count}


@dataclass(frozen=True)
class CountPolicy(_AgreementPolicy):
    """Algorithm 2 exactly as printed (Count variant): cnt_i = cnt_{i-1} + 1 when y_i == y_{i-1}, else
    cnt_i = cnt_{i-1} (NOT reset); exit when cnt_i reaches t. The agreements need not be consecutive."""

    patience: int
    name = "count"
    reset_on_change = False


@dataclass(frozen=True)
class PatiencePolicy(_AgreementPolicy):
    """PABEE: exit once the prediction stayed unchanged for t consecutive layers (counter reset on change)."""

    patience: int
    name = "patience"
    reset_on_change = True


@dataclass(frozen=True)
class RiskPolicy(ExitPolicy):
    """The "risk" policy: a row leaves after student layer l when its estimated risk of a changed prediction
    P_l(signals) < `risk`. Each row carries the index of its next layer."""

    exit_risk: ExitRisk
    risk: float
    # the coefficient table per device, made once (no host-to-device copy per step)
    tables: dict[torch.device, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    name = "risk"

    def init_state(self, batch_size: int, device: torch.device) -> State:
        return {"layer": torch.zeros(batch_size, dtype=torch.long, device=device)}

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        layer = state["layer"]  # (batch,) 0-based index of this student
        table = self.tables.get(logits.device)
        if table is None:
            table = self.tables[logits.device] = self.exit_risk.table(logits.device)
        leave = self.exit_risk.score(logits, layer, table) < log_odds(self.risk)
        return leave, {"layer": layer + 1}


class FullDepthPolicy(ExitPolicy):
    """No early exit: every row runs to the teacher."""

    name = "none"

    def step(self, logits: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        return torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device), state


PolicyName = str  # one of POLICY_NAMES


@dataclass(frozen=True)
class PolicyKind:
    """One exit policy as the rest of the code knows it: its name, the knob it takes (None: none), and how
    a knob becomes the `ExitPolicy` that runs it (`build(knob, exit_risk)`)."""

    name: str
    knob: str | None
    build: Callable[[Any, ExitRisk | None], ExitPolicy]


def _risk_policy(risk: float, exit_risk: ExitRisk | None) -> ExitPolicy:
    if exit_risk is None:
        raise ValueError(
            "policy 'risk' needs the model's fitted exit risk, and this model has none (a model trained "
            "before it, or with eval.exit_risk_rows=0); use policy 'entropy' or retrain"
        )
    return RiskPolicy(exit_risk, risk)


# The one registry of policies: names, knobs, CLI choices and messages all come from here, in this order.
POLICIES: dict[str, PolicyKind] = {
    kind.name: kind
    for kind in (
        PolicyKind("entropy", "threshold", lambda s, _: EntropyPolicy(s)),
        PolicyKind("risk", "risk", _risk_policy),
        PolicyKind("count", "patience", lambda t, _: CountPolicy(t)),
        PolicyKind("patience", "patience", lambda t, _: PatiencePolicy(t)),
        PolicyKind("none", None, lambda _, __: FullDepthPolicy()),
    )
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
EXIT_RULES: tuple[str, ...] = tuple(n for n, kind in POLICIES.items() if kind.knob)  # those that exit early
KNOB_OF_POLICY: dict[str, str | None] = {name: kind.knob for name, kind in POLICIES.items()}


def check_policy(name: Any) -> str:
    """One of POLICY_NAMES."""
    if name not in POLICY_NAMES:
        raise ValueError(f"policy={name!r} is not one of {list(POLICY_NAMES)}")
    return name


def check_threshold(threshold: Any) -> float:
    """S is a normalised entropy: a number in [0, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r} must be a number in [0, 1] (normalised entropy S)")
    return float(threshold)


def check_risk(risk: Any) -> float:
    """r is a probability: a number in [0, 1]."""
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0 <= risk <= 1:
        raise ValueError(f"risk={risk!r} must be a number in [0, 1] (estimated risk of a changed prediction)")
    return float(risk)


def check_patience(patience: Any) -> int:
    """t counts layers: an integer >= 1."""
    if (
        isinstance(patience, bool)
        or not isinstance(patience, (int, float))
        or not math.isfinite(patience)
        or int(patience) != patience
        or patience < 1
    ):
        raise ValueError(f"patience={patience!r} must be an integer >= 1 (layers t)")
    return int(patience)


# each knob's check
CHECK_OF_KNOB = {"threshold": check_threshold, "risk": check_risk, "patience": check_patience}


def make_policy(
    name: str,
    threshold: float | None = None,
    patience: int | None = None,
    risk: float | None = None,
    exit_risk: ExitRisk | None = None,
) -> ExitPolicy:
    """Build a policy by name; entropy needs `threshold` in [0, 1], count and patience need `patience` >= 1,
    risk needs `risk` in [0, 1] and the model's fitted `exit_risk` (the knobs the policy does not take are
    ignored). `ExitSetting(name, knob).exit_policy(exit_risk)` is the same."""
    check_policy(name)
    knobs = {"threshold": threshold, "patience": patience, "risk": risk}
    return ExitSetting(name, knobs.get(KNOB_OF_POLICY[name])).exit_policy(exit_risk)


def exit_layers(all_logits: torch.Tensor, policy: ExitPolicy) -> torch.Tensor:
    """Exit layer (1-based) of every row, given every exit's logits (n_layers, batch, N).

    The same decisions `EarlyExitClassifier.early_exit` makes, computed from one full-depth pass: used by
    sweeps (one pass serves every threshold) and by tests as the reference.
    """
    n_layers, batch = all_logits.shape[:2]
    exit_layer = torch.full((batch,), n_layers, dtype=torch.long, device=all_logits.device)
    done = torch.zeros(batch, dtype=torch.bool, device=all_logits.device)
    state = policy.init_state(batch, all_logits.device)
    for layer in range(n_layers - 1):
        leave, state = policy.step(all_logits[layer], state)
        newly = leave & ~done
        exit_layer[newly] = layer + 1
        done |= leave
    return exit_layer


@dataclass(frozen=True)
class ExitSetting:
    """An exit policy with its knob: S for "entropy", r for "risk", t for "count" / "patience", none for
    "none".

    The one place that knows which knob a policy takes, how it is checked, which way it trades accuracy for
    speed, and which value means full depth. Everything that passes a setting around (predict, the scorer,
    evaluation, calibration, the knob search, wall-clock timing) passes one of these.
    """

    policy: str
    knob: float | int | None = None

    def __post_init__(self) -> None:
        check_policy(self.policy)
        name = self.knob_name
        if name is None:
            if self.knob is not None:
                raise ValueError(f"policy {self.policy!r} takes no knob, got {self.knob!r}")
        else:
            object.__setattr__(self, "knob", CHECK_OF_KNOB[name](self.knob))

    @property
    def knob_name(self) -> str | None:
        return KNOB_OF_POLICY[self.policy]

    @property
    def kwargs(self) -> dict[str, float | int]:
        """{knob name: knob}, as `predict` and `make_policy` take it; {} for "none"."""
        return {} if self.knob_name is None else {self.knob_name: self.knob}

    @property
    def eagerness(self) -> float:
        """Orders settings of one policy from the safest (latest exits) to the most eager: a larger S or r
        exits earlier, a smaller t exits earlier."""
        if self.knob is None:
            return -math.inf
        return -float(self.knob) if self.knob_name == "patience" else float(self.knob)

    def exit_policy(self, exit_risk: ExitRisk | None = None) -> ExitPolicy:
        """The policy that runs this setting; "risk" needs the model's fitted `exit_risk`
        (`EarlyExitConfig.exit_risk`), the others ignore it."""
        return POLICIES[self.policy].build(self.knob, exit_risk)

    def __str__(self) -> str:
        """ "entropy-0.24", "risk-0.01", "count-2", "none": as in output keys."""
        return self.policy if self.knob is None else f"{self.policy}-{self.knob:g}"


@dataclass(frozen=True)
class ExitRequest:
    """The exit setting a user asks for before knowing the model: a policy (None: the model's stored one) and
    at most one knob, the one that policy takes (None: the knob stored for the policy, or a calibrated one).
    Checked when made; `EarlyExitConfig.resolve` turns it into the setting a model runs."""

    policy: str | None = None
    threshold: float | None = None
    patience: int | None = None
    risk: float | None = None

    def __post_init__(self) -> None:
        if self.policy is not None:
            check_policy(self.policy)
        for knob, value in self.knobs.items():
            object.__setattr__(self, knob, CHECK_OF_KNOB[knob](value))
            if self.policy is not None and KNOB_OF_POLICY[self.policy] != knob:
                raise ValueError(f"policy {self.policy!r} does not use {knob}={value!r}: drop it")
        if len(self.knobs) > 1:
            raise ValueError(f"give one knob, for the policy that takes it: got {sorted(self.knobs)}")

    @property
    def knobs(self) -> dict[str, float | int]:
        """The knobs given ({name: value}; at most one)."""
        return {name: getattr(self, name) for name in CHECK_OF_KNOB if getattr(self, name) is not None}

    def policy_of(self, stored: str) -> str:
        """The policy that runs: the asked one, else the model's `stored` one."""
        return self.policy or stored
