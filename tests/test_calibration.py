"""Calibration: temperature scaling and selective prediction."""

from __future__ import annotations

import numpy as np
import pytest


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_the_calibration_error() -> None:
    from ecgproto.evaluation.calibration import apply_temperature, fit_temperature, mean_ece, selective

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 3))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at T = 1
    overconfident = 1 / (1 + np.exp(-3 * z))  # what a model with T = 3 too sharp predicts
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    scaled = apply_temperature(overconfident, t)
    assert mean_ece(y, scaled) < mean_ece(y, overconfident) / 2
    # ranking unchanged: the same AUROC; the most certain records are the easier ones
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[:, 0], scaled[:, 0]) == pytest.approx(roc_auc_score(y[:, 0], overconfident[:, 0]))
    s = selective(y, scaled).set_index("coverage")["macro_auroc"]
    assert s.loc[0.8] > s.loc[1.0]
