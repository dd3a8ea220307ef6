"""Fitting the "risk" policy's model (`ee_model.exit_risk.ExitRisk`) label-free on a trained model's logits.

Per student layer, a logistic regression (scikit-learn) of "this exit's prediction differs from the last
exit's" on the exit's normalised entropy. Fitted on text the model trained on (a sample of the training split
and the unlabeled corpus), never on dev, where the knob is then chosen with its confidence bound, nor on test.
Every layer's fit gets two pseudo-rows, an agreeing one at entropy 0 and a disagreeing one at entropy 1, so it
is defined when a layer never (or always) disagrees in the sample, and the fitted risk rises with entropy.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

from ee_model.exit_risk import ExitRisk
from ee_model.policies import normalised_entropy


def fit_exit_risk(logits: torch.Tensor) -> ExitRisk:
    """The exit risk of every student layer, from every exit's logits (n_layers, n, N) of unlabeled text."""
    if logits.ndim != 3 or logits.shape[0] < 2 or logits.shape[1] == 0:
        raise ValueError(f"fit the exit risk on (n_layers >= 2, n >= 1, N) logits, got {tuple(logits.shape)}")
    final = logits[-1].argmax(-1)
    pairs = []
    for layer in logits[:-1]:
        entropy = normalised_entropy(layer).numpy().astype(np.float64)
        changed = (layer.argmax(-1) != final).numpy()
        x = np.concatenate([entropy, [0.0, 1.0]]).reshape(-1, 1)
        y = np.concatenate([changed, [False, True]])
        fitted = LogisticRegression(C=100.0, max_iter=1000).fit(x, y)
        pairs.append((float(fitted.intercept_[0]), float(fitted.coef_[0, 0])))
    return ExitRisk(tuple(pairs))
