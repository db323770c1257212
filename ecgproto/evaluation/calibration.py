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

from ecgproto.evaluation.metrics import macro_auroc
from ecgproto.model.network import EPS, binary_entropy

BINS = 10  # equal-width probability bins of every ECE and reliability diagram


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> float:
    """Sum over equal-width probability bins of (bin share) x |observed rate - mean probability|."""
    r = reliability_bins(y, p, bins)
    if not len(r):
        return 0.0
    return float((r["n"] / r["n"].sum() * (r["observed_rate"] - r["mean_probability"]).abs()).sum())


def reliability_bins(y: np.ndarray, p: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """The points of a reliability diagram: per non-empty equal-width bin, its cells (n), their mean predicted
    probability and the observed rate of the label among them."""
    p = np.asarray(p, dtype=np.float64).ravel()
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "p": p, "y": np.asarray(y, dtype=np.float64).ravel()})
    out = frame.groupby("bin").agg(n=("y", "size"), mean_probability=("p", "mean"), observed_rate=("y", "mean"))
    return out.reset_index()


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
    bins: int = BINS,
) -> pd.DataFrame:
    """Reliability of each model over all its (record, label) cells, before and after its temperature: per
    equal-width bin the mean predicted probability, the observed rate and the cells in it. Columns: model,
    scaled, bin, mean_probability, observed_rate, cells."""
    parts = []
    for name, pn in p.items():
        yn = np.asarray(y)[:, label_index[name]]
        for scaled in (False, True):
            shift = (offsets or {}).get(name, 0.0)
            q = apply_temperature(pn, temperatures[name], shift) if scaled else np.asarray(pn, dtype=np.float64)
            r = reliability_bins(yn, q, bins).rename(columns={"n": "cells"})
            parts.append(r.assign(model=name, scaled=scaled))
    columns = ["model", "scaled", "bin", "mean_probability", "observed_rate", "cells"]
    return pd.concat(parts, ignore_index=True)[columns] if parts else pd.DataFrame(columns=columns)


def reliability_figure(curves: pd.DataFrame, titles: dict[str, str], suptitle: str) -> Figure:
    """The one reliability diagram of the project: a panel per `panel` (a model, or a label), in rows of at most
    three so each stays legible at the MLflow artifact viewer's width, one line per `series` (e.g. as trained and
    temperature-scaled), observed rate against mean predicted probability, the diagonal for reference.
    `curves`: panel, series, mean_probability, observed_rate."""
    panels = list(dict.fromkeys(curves["panel"])) or [""]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(4.0 * cols, 3.7 * rows + 0.5))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, panels, strict=False):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for (series, r), style in zip(
            curves[curves["panel"] == name].groupby("series", sort=False), "os^", strict=False
        ):
            ax.plot(r["mean_probability"], r["observed_rate"], f"{style}-", ms=4, label=str(series))
        ax.set_title(titles.get(name, str(name)), fontsize=10)
        ax.set_xlabel("mean predicted probability", fontsize=9)
        ax.set_ylabel("observed rate", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def training_reliability_figure(table: pd.DataFrame, calibration: pd.DataFrame) -> Figure:
    """The test fold's reliability per model (fused and each branch), before and after temperature scaling, each
    with its mean ECE: `reliability_table` and `calibration_table` drawn by `reliability_figure`."""
    ece = calibration.set_index("model")
    names = {False: ("as trained", "test_mean_ece"), True: ("temperature-scaled", "test_mean_ece_scaled")}
    curves = table.assign(
        panel=table["model"],
        series=[
            f"{names[s][0]} (ECE {ece.loc[m, names[s][1]]:.3f})"
            for m, s in zip(table["model"], table["scaled"], strict=True)
        ],
    )
    titles = {m: f"{m} (T = {ece.loc[m, 'temperature']:.2f})" for m in ece.index}
    return reliability_figure(
        curves,
        titles,
        "test fold: every (record, label) cell, 10 equal-width bins; temperature fitted on the validation fold",
    )


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
