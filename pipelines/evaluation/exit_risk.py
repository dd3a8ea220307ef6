"""Fitting the "risk" policy's model (`ee_model.exit_risk.ExitRisk`) label-free on a trained model's logits.

Per student layer, a logistic regression (scikit-learn) of "this exit's prediction differs from the last
exit's" on signals of the exit's probabilities (`RISK_SIGNALS`). Fitted on text the model trained on (a
sample of the training split), never on dev, where the knob is then chosen with its confidence bound, nor on
test.
Every layer's fit gets two pseudo-rows, an agreeing one where the exit is sure (entropy 0, margin 1) and a
disagreeing one where it is unsure (entropy 1, margin 0), so it is defined when a layer never (or always)
disagrees in the sample.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ee_model.exit_risk import ExitRisk
from ee_model.signals import SURE, UNSURE, exit_signals

RISK_SIGNALS = ("entropy", "margin")  # measured: docs/results.md, "Exit rules beyond one S"


def fit_exit_risk(logits: torch.Tensor, signals: tuple[str, ...] = RISK_SIGNALS) -> ExitRisk:
    """The exit risk of every student layer, from every exit's logits (n_layers, n, N) of unlabeled text."""
    if logits.ndim != 3 or logits.shape[0] < 2 or logits.shape[1] == 0:
        raise ValueError(f"fit the exit risk on (n_layers >= 2, n >= 1, N) logits, got {tuple(logits.shape)}")
    final = logits[-1].argmax(-1)
    pseudo = np.array([[SURE[s] for s in signals], [UNSURE[s] for s in signals]])
    rows = []
    for layer in logits[:-1]:
        x = np.concatenate([exit_signals(layer, signals).numpy().astype(np.float64), pseudo])
        y = np.concatenate([(layer.argmax(-1) != final).numpy(), [False, True]])
        fitted = LogisticRegression(C=100.0, max_iter=1000).fit(x, y)
        rows.append((float(fitted.intercept_[0]), *(float(w) for w in fitted.coef_[0])))
    return ExitRisk(signals, tuple(rows))
