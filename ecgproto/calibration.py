"""Post-hoc calibration and selective prediction of a multi-label model's probabilities.

Temperature scaling (Guo et al. 2017): one temperature T per model, fitted on the validation fold by
minimising the binary cross-entropy of sigmoid(logit / T) over every (record, label); it changes no
ranking (AUROC is unchanged) and only how far probabilities sit from 0 and 1. Selective prediction:
keep the records the model is most certain about (lowest mean binary entropy over the labels) and
report macro-AUROC at each coverage; a useful uncertainty makes the kept records easier.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar

from ecgproto.train.metrics import macro_auroc
from ecgproto.validation import expected_calibration_error

EPS = 1e-6


def logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _bce(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits z (stable form)."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The T in [0.05, 20] minimising the BCE of sigmoid(logit(p) / T) on (y, p)."""
    z, y = logits(p), np.asarray(y, dtype=np.float64)
    res = minimize_scalar(lambda log_t: _bce(y, z / np.exp(log_t)), bounds=(np.log(0.05), np.log(20)), method="bounded")
    return float(np.exp(res.x))


def apply_temperature(p: np.ndarray, t: float) -> np.ndarray:
    return 1 / (1 + np.exp(-logits(p) / t))


def mean_ece(y: np.ndarray, p: np.ndarray) -> float:
    """ECE averaged over the labels that have positives and negatives."""
    y = np.asarray(y)
    cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean([expected_calibration_error(y[:, j], p[:, j]) for j in cols])) if cols else float("nan")


def uncertainty(p: np.ndarray) -> np.ndarray:
    """Per record: mean binary entropy (bits) over the labels; 0 when every probability is 0 or 1."""
    q = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return -(q * np.log2(q) + (1 - q) * np.log2(1 - q)).mean(axis=1)


def selective(y: np.ndarray, p: np.ndarray, coverages: tuple[float, ...] = (1.0, 0.9, 0.8)) -> pd.DataFrame:
    """Macro-AUROC over the most certain `coverage` share of the records, for each coverage."""
    order = np.argsort(uncertainty(p), kind="stable")
    rows = []
    for c in coverages:
        keep = order[: max(int(round(c * len(order))), 1)]
        rows.append({"coverage": c, "records": len(keep), "macro_auroc": macro_auroc(y[keep], p[keep])})
    return pd.DataFrame(rows)


def calibration_table(
    y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: dict[str, np.ndarray], label_index: dict
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per model (fused, each branch on its labels): the temperature fitted on validation and the test-fold
    mean ECE before and after. `p_val`/`p_test` map a model name to (N, its labels) probabilities;
    `label_index` maps a name to its label columns of `y_*`."""
    rows = []
    temperatures = {}
    for name, pt in p_test.items():
        cols = label_index[name]
        t = fit_temperature(y_val[:, cols], p_val[name])
        temperatures[name] = t
        rows.append(
            {
                "model": name,
                "temperature": t,
                "test_mean_ece": mean_ece(y_test[:, cols], pt),
                "test_mean_ece_scaled": mean_ece(y_test[:, cols], apply_temperature(pt, t)),
            }
        )
    return pd.DataFrame(rows), temperatures
