"""Exit rules on crafted prediction sequences and entropies."""

import math

import pytest
import torch

from ee_model import CountPolicy, PatiencePolicy, exit_layers, make_policy, normalised_entropy


def one_hot_logits(predictions: list[list[int]], num_labels: int = 3) -> torch.Tensor:
    """(n_layers, batch, N) logits whose argmax follows `predictions[row][layer]`, confidently."""
    per_row = torch.tensor(predictions)  # (batch, n_layers)
    logits = torch.full((*per_row.T.shape, num_labels), -5.0)
    logits.scatter_(2, per_row.T.unsqueeze(-1), 5.0)
    return logits


# Layer predictions of one row over 6 layers; Algorithm 2 as printed never resets the counter.
@pytest.mark.parametrize(
    "sequence, patience, count_exit, patience_exit",
    [
        ([0, 0, 0, 0, 0, 0], 2, 3, 3),  # agreements at layers 2, 3 -> both exit after layer 3
        ([0, 0, 1, 1, 2, 2], 2, 4, 6),  # count: agreements at 2 and 4; patience: never 2 in a row
        ([0, 1, 1, 2, 2, 2], 2, 5, 6),  # count: agreements at 3, 5; patience: 2 consecutive at 6 = teacher
        ([0, 1, 2, 0, 1, 2], 1, 6, 6),  # never agrees: both leave at the teacher
        ([0, 0, 1, 1, 1, 1], 3, 5, 6),  # count: 2, 4, 5; patience: 4, 5 -> 2 consecutive by layer 5, 3 at 6
        ([0, 0, 0, 0, 0, 0], 9, 6, 6),  # t beyond depth: teacher
    ],
)
def test_count_vs_patience_semantics(sequence, patience, count_exit, patience_exit):
    logits = one_hot_logits([sequence])
    assert exit_layers(logits, CountPolicy(patience)).tolist() == [count_exit]
    assert exit_layers(logits, PatiencePolicy(patience)).tolist() == [patience_exit]


def test_normalised_entropy_bounds_and_stability():
    uniform = torch.zeros(1, 5)
    certain = torch.tensor([[1e4, -1e4, 0.0, 0.0, 0.0]])
    assert normalised_entropy(uniform).item() == pytest.approx(1.0)
    assert normalised_entropy(certain).item() == pytest.approx(0.0, abs=1e-6)
    huge = torch.tensor([[1e30, 1e30, -1e30]])
    value = normalised_entropy(huge).item()
    assert math.isfinite(value) and value == pytest.approx(math.log(2) / math.log(3), rel=1e-5)


def test_threshold_zero_gives_full_depth():  # below 0 is refused (test_bad_policy_arguments_are_refused)
    logits = torch.randn(4, 16, 3) * 10
    assert exit_layers(logits, make_policy("entropy", threshold=0.0)).eq(4).all()


def test_larger_threshold_never_exits_later():
    torch.manual_seed(0)
    logits = torch.randn(6, 200, 5) * 3
    previous = None
    for threshold in torch.linspace(0, 1, 21).tolist():
        layers = exit_layers(logits, make_policy("entropy", threshold=threshold))
        if previous is not None:
            assert (layers <= previous).all()
        previous = layers
    assert previous.float().mean() < 6  # the sweep really moved rows


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("entropy", {"threshold": None}, r"threshold=None must be a number in \[0, 1\]"),
        ("entropy", {"threshold": float("nan")}, r"threshold=nan must be a number in \[0, 1\]"),
        ("entropy", {"threshold": -1.0}, r"threshold=-1.0 must be a number in \[0, 1\]"),
        ("entropy", {"threshold": 2}, r"threshold=2 must be a number in \[0, 1\]"),
        ("count", {"patience": 0}, "patience=0 must be an integer >= 1"),
        ("count", {"patience": -3}, "patience=-3 must be an integer >= 1"),
        ("patience", {"patience": 1.5}, "patience=1.5 must be an integer >= 1"),
        ("fastest", {}, "is not one of"),
    ],
)
def test_bad_policy_arguments_are_refused(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **kwargs)


def test_exit_setting_is_the_one_map_from_policy_to_knob():
    from ee_model import EarlyExitConfig, ExitSetting

    assert ExitSetting("entropy", 1).knob == 1.0 and ExitSetting("count", 2.0).knob == 2  # normalised types
    assert ExitSetting("entropy", 0.3).kwargs == {"threshold": 0.3} and ExitSetting("none").kwargs == {}
    assert str(ExitSetting("entropy", 0.24)) == "entropy-0.24" and str(ExitSetting("none")) == "none"
    for bad, message in (
        (("entropy", None), "threshold=None must be a number"),
        (("count", 0), "patience=0"),
        (("none", 0.5), "takes no knob"),
        (("fastest", 1), "policy='fastest' is not one of"),
    ):
        with pytest.raises(ValueError, match=message):
            ExitSetting(*bad)
    # safest first: ascending S, descending t
    ordered = sorted(
        [ExitSetting("entropy", 0.5), ExitSetting("entropy", 0.0), ExitSetting("entropy", 0.2)],
        key=lambda s: s.eagerness,
    )
    assert [s.knob for s in ordered] == [0.0, 0.2, 0.5]
    assert [
        s.knob for s in sorted([ExitSetting("count", t) for t in (1, 3, 2)], key=lambda s: s.eagerness)
    ] == [3, 2, 1]
    assert isinstance(ExitSetting("patience", 2).exit_policy(), PatiencePolicy)

    config = EarlyExitConfig("enc", labels=("a", "b"), threshold=0.4, patience=2)
    assert config.setting() == ExitSetting("entropy", 0.4)  # the stored policy and knob
    assert config.setting("count") == ExitSetting("count", 2) and config.setting("none") == ExitSetting(
        "none"
    )
    assert config.setting("entropy", threshold=0.1, patience=5) == ExitSetting("entropy", 0.1)  # t ignored
    stored = config.with_setting(ExitSetting("patience", 4))
    assert (stored.policy, stored.patience, stored.threshold) == ("patience", 4, 0.4)


def test_a_stored_knob_keeps_what_it_was_certified_on_through_save_and_load_and_loses_it_when_replaced(
    tmp_path,
):
    from ee_model import EarlyExitConfig, ExitSetting
    from ee_model.config import KnobPromise

    promise = KnobPromise("agreement", 0.99, 0.05, 4000, "4000 passages of unseen articles")
    config = EarlyExitConfig("enc", labels=("a", "b")).with_setting(ExitSetting("entropy", 0.3), promise)
    loaded = EarlyExitConfig.load(config.save(tmp_path).parent)
    assert loaded.knob_promise == promise and loaded.threshold == 0.3
    assert promise.describe() == (
        "agreement with full depth >= 0.99 at confidence 0.95, certified on 4000 rows: 4000 passages of "
        "unseen articles"
    )
    assert loaded.with_setting(ExitSetting("entropy", 0.5)).knob_promise is None  # another knob: no promise


# ---- the "risk" policy: one risk level r, one fitted boundary per student layer ----------------------------
def test_exit_risk_refuses_coefficients_it_cannot_apply():
    from ee_model.exit_risk import ExitRisk

    for signals, rows, message in (
        (("entropy",), (), "finite float32 coefficients"),
        (("entropy",), ((1.0, float("nan")),), "finite float32 coefficients"),
        (("entropy",), ((1.0, 1e39),), "finite float32 coefficients"),  # finite in float64, inf in the table
        (("entropy", "margin"), ((1.0, 2.0),), "3 finite float32 coefficients per student layer"),
        (("loudness",), ((1.0, 2.0),), "signals must be some of"),
    ):
        with pytest.raises(ValueError, match=message):
            ExitRisk(signals, rows)
    assert torch.isfinite(ExitRisk(("entropy",), ((1.0, 3e38),)).table(torch.device("cpu"))).all()


def test_risk_policy_leaves_where_each_layers_risk_falls_below_r():
    from ee_model import RiskPolicy
    from ee_model.exit_risk import ExitRisk

    torch.manual_seed(0)
    logits = torch.randn(4, 300, 5) * 2
    # entropy only, every weight > 0: one entropy threshold per layer, S_l = (logit(r) - a_l) / w_l
    entropy_only = ExitRisk(("entropy",), ((-6.0, 9.0), (-5.0, 7.0), (-3.0, 8.0)))
    for r in (0.01, 0.2, 0.6):
        level = math.log(r / (1 - r))
        limits = torch.tensor([(level - a) / w for a, w in entropy_only.coefficients]).view(-1, 1)
        below = torch.stack([normalised_entropy(layer) for layer in logits[:-1]]) < limits
        expected = torch.cat([below, torch.ones(1, 300, dtype=torch.bool)]).float().argmax(0) + 1
        assert exit_layers(logits, RiskPolicy(entropy_only, r)).tolist() == expected.tolist(), r
    with_margin = ExitRisk(("entropy", "margin"), ((-2.0, 6.0, -4.0), (-3.0, 5.0, -5.0), (-1.0, 4.0, -6.0)))
    risk = with_margin.risk(logits)  # (3, 300): each student's estimated risk from its entropy and margin
    # a weight <= 0 (risk not rising with entropy) is applied as fitted, not clipped to "no row leaves"
    falling = ExitRisk(("entropy",), ((-1.0, -3.0), (-2.0, 0.0), (-3.0, 8.0)))
    for r in (0.05, 0.2, 0.5):
        below = torch.cat([falling.risk(logits) < r, torch.ones(1, 300, dtype=torch.bool)])
        assert exit_layers(logits, RiskPolicy(falling, r)).tolist() == (below.float().argmax(0) + 1).tolist()
    for r in (0.05, 0.3):
        below = torch.cat([risk < r, torch.ones(1, 300, dtype=torch.bool)])
        assert (
            exit_layers(logits, RiskPolicy(with_margin, r)).tolist() == (below.float().argmax(0) + 1).tolist()
        )
    previous = None
    for r in torch.linspace(0, 1, 21).tolist():  # a larger r never makes a row leave later
        layers = exit_layers(logits, RiskPolicy(with_margin, r))
        assert previous is None or (layers <= previous).all()
        previous = layers
    assert exit_layers(logits, RiskPolicy(with_margin, 0.0)).eq(4).all()  # r = 0: full depth
    assert exit_layers(logits, RiskPolicy(with_margin, 1.0)).eq(1).all()


def test_risk_policy_needs_a_fitted_model_and_a_risk_in_range():
    from ee_model import EarlyExitConfig, ExitSetting, RiskPolicy
    from ee_model.exit_risk import ExitRisk

    setting = ExitSetting("risk", 0.02)
    assert str(setting) == "risk-0.02" and setting.kwargs == {"risk": 0.02}
    assert ExitSetting("risk", 0.1).eagerness > setting.eagerness  # a larger r exits earlier
    with pytest.raises(ValueError, match="needs the model's fitted exit risk"):
        setting.exit_policy()
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match=r"risk=.* must be a number in \[0, 1\]"):
            ExitSetting("risk", bad)
    risk = ExitRisk(("entropy", "margin"), ((-6.0, 8.0, -1.0),))
    assert setting.exit_policy(risk) == RiskPolicy(risk, 0.02)
    assert make_policy("risk", risk=0.02, exit_risk=risk) == setting.exit_policy(risk)
    config = EarlyExitConfig("enc", labels=("a", "b"), policy="risk", risk=0.03, exit_risk=risk)
    assert config.setting() == ExitSetting("risk", 0.03) and config.setting(risk=0.2).knob == 0.2
    again = EarlyExitConfig.from_dict(config.to_dict())  # the stored JSON form
    assert again.exit_risk == risk and again == config
