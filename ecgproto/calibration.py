"""Post-hoc calibration and selective prediction of a multi-label model's probabilities.

Temperature scaling (Guo et al. 2017): one temperature T per model, fitted on the validation fold by
minimising the binary cross-entropy of sigmoid(logit / T) over every (record, label); it changes no
ranking (AUROC is unchanged) and only how far probabilities sit from 0 and 1. The models train with a
positive-class weight w per label (a rare label's positives count more), which shifts every logit by
log w at the optimum; that known shift is undone first (a per-label offset of -log w), since no single
temperature can remove a per-label bias. Selective prediction:
keep the records the model is most certain about (lowest mean binary entropy over the labels) and
report macro-AUROC at each coverage; a useful uncertainty makes the kept records easier.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

from ecgproto.model.network import EPS, binary_entropy
from ecgproto.train.metrics import macro_auroc
from ecgproto.validation import expected_calibration_error


def logits(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _bce(y: np.ndarray, z: np.ndarray) -> float:
    """Mean binary cross-entropy of logits z (stable form)."""
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(y: np.ndarray, p: np.ndarray, offset: np.ndarray | float = 0.0) -> float:
    """The T in [0.05, 20] minimising the BCE of sigmoid((logit(p) + offset) / T) on (y, p); `offset` (per label)
    undoes a known shift of the logits first (a positive-class weight w in training shifts them by log w)."""
    z, y = logits(p) + offset, np.asarray(y, dtype=np.float64)
    res = minimize_scalar(lambda log_t: _bce(y, z / np.exp(log_t)), bounds=(np.log(0.05), np.log(20)), method="bounded")
    return float(np.exp(res.x))


def apply_temperature(p: np.ndarray, t: float, offset: np.ndarray | float = 0.0) -> np.ndarray:
    return 1 / (1 + np.exp(-(logits(p) + offset) / t))


def mean_ece(y: np.ndarray, p: np.ndarray) -> float:
    """ECE averaged over the labels that have positives and negatives."""
    y = np.asarray(y)
    cols = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    return float(np.mean([expected_calibration_error(y[:, j], p[:, j]) for j in cols])) if cols else float("nan")


def uncertainty(p: np.ndarray) -> np.ndarray:
    """Per record: mean binary entropy (bits) over the labels; 0 when every probability is 0 or 1."""
    return binary_entropy(torch.as_tensor(np.asarray(p, dtype=np.float64))).mean(dim=1).numpy()


COVERAGES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def selective(
    y: np.ndarray,
    p: np.ndarray,
    coverages: tuple[float, ...] = (1.0, 0.9, 0.8),
    scores: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Macro-AUROC of `p` over the most certain `coverage` share of the records, for each coverage and each
    per-record uncertainty score in `scores` (name -> (N,), lower = more certain; by default the mean binary
    entropy of `p` itself, named "entropy"). Columns: score, coverage, records, macro_auroc."""
    scores = scores if scores is not None else {"entropy": uncertainty(p)}
    rows = []
    for name, u in scores.items():
        order = np.argsort(np.asarray(u), kind="stable")
        for c in coverages:
            keep = order[: max(int(round(c * len(order))), 1)]
            rows.append(
                {"score": name, "coverage": c, "records": len(keep), "macro_auroc": macro_auroc(y[keep], p[keep])}
            )
    return pd.DataFrame(rows)


def reliability_table(
    y: np.ndarray,
    p: dict[str, np.ndarray],
    temperatures: dict[str, float],
    label_index: dict,
    offsets: dict[str, np.ndarray] | None = None,
    bins: int = 10,
) -> pd.DataFrame:
    """Reliability of each model over all its (record, label) cells, before and after its temperature: per
    equal-width bin the mean predicted probability, the observed rate and the cells in it. Columns: model,
    scaled, bin, mean_probability, observed_rate, cells."""
    rows = []
    for name, pn in p.items():
        yn = np.asarray(y)[:, label_index[name]].ravel()
        for scaled in (False, True):
            shift = (offsets or {}).get(name, 0.0)
            q = apply_temperature(pn, temperatures[name], shift) if scaled else np.asarray(pn, dtype=np.float64)
            q = q.ravel()
            which = np.clip((q * bins).astype(int), 0, bins - 1)
            for b in np.unique(which):
                sel = which == b
                rows.append(
                    {
                        "model": name,
                        "scaled": scaled,
                        "bin": int(b),
                        "mean_probability": float(q[sel].mean()),
                        "observed_rate": float(yn[sel].mean()),
                        "cells": int(sel.sum()),
                    }
                )
    return pd.DataFrame(rows)


def reliability_figure(table: pd.DataFrame, calibration: pd.DataFrame) -> Figure:
    """One reliability diagram per model (fused and each branch): observed rate against mean predicted
    probability over 10 equal-width bins, before and after temperature scaling, with each one's mean ECE."""
    models = list(dict.fromkeys(table["model"]))
    fig = Figure(figsize=(3.6 * len(models), 4.0))
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    ece = calibration.set_index("model")
    for ax, name in zip(axes, models, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for scaled, style, label in ((False, "o-", "as trained"), (True, "s-", "temperature-scaled")):
            r = table[(table["model"] == name) & (table["scaled"] == scaled)]
            key = "test_mean_ece_scaled" if scaled else "test_mean_ece"
            label = f"{label} (ECE {ece.loc[name, key]:.3f})"
            ax.plot(r["mean_probability"], r["observed_rate"], style, ms=4, label=label)
        ax.set_title(f"{name} (T = {ece.loc[name, 'temperature']:.2f})", fontsize=10)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed rate of the label")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        "test fold: calibration over every (record, label) cell, 10 equal-width bins; temperature fitted on the "
        "validation fold; ECE = mean over labels",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def coverage_figure(table: pd.DataFrame) -> Figure:
    """Selective prediction: macro-AUROC of the fused model on the most certain share of the test records, for
    each uncertainty score; a score that finds the hard records rises as coverage falls."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for name, g in table.groupby("score", sort=False):
        ax.plot(100 * g["coverage"], g["macro_auroc"], marker="o", ms=4, label=str(name))
    ax.invert_xaxis()
    ax.set_xlabel("coverage: share of test records kept, most certain first (%)")
    ax.set_ylabel("macro-AUROC on the kept records")
    ax.set_title("test fold: selective prediction by uncertainty score", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def calibration_table(
    y_val: np.ndarray,
    p_val: np.ndarray,
    y_test: np.ndarray,
    p_test: dict[str, np.ndarray],
    label_index: dict,
    offsets: dict[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Per model (fused, each branch on its labels): the temperature fitted on validation (after each label's
    logit offset in `offsets`, if any) and the test-fold mean ECE before and after. `p_val`/`p_test` map a
    model name to (N, its labels) probabilities; `label_index` maps a name to its label columns of `y_*`."""
    rows = []
    temperatures = {}
    offsets = offsets or {}
    for name, pt in p_test.items():
        cols = label_index[name]
        shift = offsets.get(name, 0.0)
        t = fit_temperature(y_val[:, cols], p_val[name], shift)
        temperatures[name] = t
        rows.append(
            {
                "model": name,
                "temperature": t,
                "test_mean_ece": mean_ece(y_test[:, cols], pt),
                "test_mean_ece_scaled": mean_ece(y_test[:, cols], apply_temperature(pt, t, shift)),
            }
        )
    return pd.DataFrame(rows), temperatures
