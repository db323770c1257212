"""External validation: a trained model scored on another dataset (a PhysioNet Challenge set, a hospital's
WFDB export), label by label, beside what it scored on its own test fold.

For every label the external set has positives (and negatives) for: prevalence, AUROC and AUPRC with
bootstrap CIs, calibration (expected calibration error over 10 equal-width bins, and a reliability
diagram), and sensitivity and specificity at the decision threshold 0.5 of the model's probability (the
one `explain` reports as predicted). Labels the model knows but the set lacks are listed apart. For a
credentialed set a label needs at least 10 positives and 10 negatives to be reported.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import average_precision_score, roc_auc_score

from ecgproto.report import StageReport

THRESHOLD = 0.5
MIN_CELL = 10


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Sum over equal-width probability bins of (bin share) x |observed rate - mean probability|."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    which = np.clip((p * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(total)


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> pd.DataFrame:
    """Per equal-width bin: records, mean probability, observed rate (the points of a reliability diagram)."""
    which = np.clip((np.asarray(p) * bins).astype(int), 0, bins - 1)
    frame = pd.DataFrame({"bin": which, "p": p, "y": y})
    out = frame.groupby("bin").agg(n=("y", "size"), mean_probability=("p", "mean"), observed_rate=("y", "mean"))
    return out.reset_index()


def _bootstrap(y: np.ndarray, p: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float, float]:
    """95% percentile CIs of AUROC and AUPRC over record resamples that keep both classes."""
    rng = np.random.default_rng(seed)
    aurocs, auprcs = [], []
    for _ in range(n_boot):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            aurocs.append(roc_auc_score(y[i], p[i]))
            auprcs.append(average_precision_score(y[i], p[i]))
    if not aurocs:
        return (np.nan,) * 4
    a, b = np.percentile(aurocs, [2.5, 97.5]), np.percentile(auprcs, [2.5, 97.5])
    return float(a[0]), float(a[1]), float(b[0]), float(b[1])


def external_table(
    y: np.ndarray,
    p: np.ndarray,
    codes: tuple[str, ...],
    descriptions: tuple[str, ...],
    *,
    n_boot: int = 200,
    seed: int = 0,
    credentialed: bool = False,
    calibrated: np.ndarray | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per reportable label, best AUROC first; the labels not reported and why). `calibrated`: the
    model's calibrated probabilities (ECGProtoNet.uncertainty), whose ECE joins as `ece_calibrated`."""
    y = np.asarray(y).astype(int)
    rows, apart = [], []
    for j, code in enumerate(codes):
        pos = int(y[:, j].sum())
        neg = len(y) - pos
        if pos == 0 or neg == 0:
            apart.append(
                {"label": code, "description": descriptions[j], "why": "no positives" if not pos else "no negatives"}
            )
            continue
        if credentialed and min(pos, neg) < MIN_CELL:
            apart.append(
                {"label": code, "description": descriptions[j], "why": f"fewer than {MIN_CELL} (credentialed)"}
            )
            continue
        yj, pj = y[:, j], p[:, j]
        lo, hi, plo, phi = _bootstrap(yj, pj, n_boot, seed + j)
        called = pj >= THRESHOLD
        rows.append(
            {
                "label": code,
                "description": descriptions[j],
                "n_pos": pos,
                "prevalence": pos / len(y),
                "auroc": roc_auc_score(yj, pj),
                "auroc_lo": lo,
                "auroc_hi": hi,
                "auprc": average_precision_score(yj, pj),
                "auprc_lo": plo,
                "auprc_hi": phi,
                "ece": expected_calibration_error(yj, pj),
                "sensitivity": float(called[yj == 1].mean()),
                "specificity": float((~called[yj == 0]).mean()),
            }
        )
        if calibrated is not None:
            rows[-1]["ece_calibrated"] = expected_calibration_error(yj, calibrated[:, j])
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("auroc", ascending=False).reset_index(drop=True)
    return table, pd.DataFrame(apart, columns=["label", "description", "why"])


def reliability_figure(y: np.ndarray, p: np.ndarray, table: pd.DataFrame, codes: tuple[str, ...]) -> Figure:
    """Reliability diagrams of the (up to 6) most frequent reported labels: observed rate vs mean probability."""
    labels = table.sort_values("n_pos", ascending=False)["label"].head(6).tolist()
    fig = Figure(figsize=(4 * max(len(labels), 1), 4.2))
    axes = fig.subplots(1, max(len(labels), 1), squeeze=False)[0]
    for ax, code in zip(axes, labels, strict=False):
        j = codes.index(code)
        r = reliability(y[:, j], p[:, j])
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.plot(r["mean_probability"], r["observed_rate"], marker="o")
        ece = float(table.loc[table["label"] == code, "ece"].iloc[0])
        ax.set_title(f"{code}: ECE {ece:.3f}", fontsize=10)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    fig.suptitle("calibration on the external set (10 equal-width bins)", fontsize=10)
    fig.tight_layout()
    return fig


def external_report(
    y: np.ndarray,
    p: np.ndarray,
    codes: tuple[str, ...],
    descriptions: tuple[str, ...],
    training: pd.DataFrame | None,
    *,
    n_boot: int = 200,
    seed: int = 0,
    credentialed: bool = False,
    calibrated: np.ndarray | None = None,
) -> StageReport:
    """The evaluate run: per-label table, with the same figures of the model on its own test fold beside when
    `training` is given (the training run's `evaluation/operating.csv`: n_pos, prevalence, AUROC, AUPRC, ECE,
    ECE of the calibrated probabilities, sensitivity, specificity; or, from an older training,
    `evaluation/fused.csv`: n_pos and AUROC), labels apart, macro figures, reliability diagrams."""
    table, apart = external_table(
        y, p, codes, descriptions, n_boot=n_boot, seed=seed, credentialed=credentialed, calibrated=calibrated
    )
    if training is not None and len(table):
        own = training.rename(columns={"code": "label"}).set_index("label")
        for column in ("n_pos", "prevalence", "auroc", "auprc", "ece", "ece_calibrated", "sensitivity", "specificity"):
            if column in own:
                table[f"training_test_{column}"] = table["label"].map(own[column])
    r = StageReport(tables={"external/labels": table, "external/labels_not_reported": apart})
    r.formats = {"external/labels": ("csv",), "external/labels_not_reported": ("csv",)}
    r.metrics = {"records": float(len(y)), "labels_reported": float(len(table)), "labels_apart": float(len(apart))}
    if len(table):
        r.metrics |= {
            "macro_auroc": float(table["auroc"].mean()),
            "macro_auprc": float(table["auprc"].mean()),
            "mean_ece": float(table["ece"].mean()),
        }
        if "ece_calibrated" in table:
            r.metrics["mean_ece_calibrated"] = float(table["ece_calibrated"].mean())
        if "training_test_auroc" in table and table["training_test_auroc"].notna().any():
            both = table.dropna(subset=["training_test_auroc"])
            r.metrics["macro_auroc_same_labels_training_test"] = float(both["training_test_auroc"].mean())
            r.metrics["macro_auroc_same_labels_external"] = float(both["auroc"].mean())
        for row in table.itertuples(index=False):
            r.metrics[f"auroc.{row.label}"] = float(row.auroc)
        r.figures["external/reliability.png"] = reliability_figure(y, p, table, codes)
    return r
