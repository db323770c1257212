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

from ecgproto.evaluation.calibration import expected_calibration_error, reliability_bins, reliability_figure
from ecgproto.evaluation.metrics import auprc_per_label, auroc_per_label, percentile_ci, resampled
from ecgproto.report import StageReport

THRESHOLD = 0.5
MIN_CELL = 10


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
    auroc, auprc = auroc_per_label(y, p), auprc_per_label(y, p)
    # one bootstrap for every label (ecgproto.evaluation.metrics): the same record resamples for AUROC and AUPRC
    auroc_lo, auroc_hi = percentile_ci(resampled(y, p, n_boot, seed)) if n_boot else (auroc * np.nan,) * 2
    auprc_lo, auprc_hi = (
        percentile_ci(resampled(y, p, n_boot, seed, auprc_per_label)) if n_boot else (auprc * np.nan,) * 2
    )
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
        called = pj >= THRESHOLD
        rows.append(
            {
                "label": code,
                "description": descriptions[j],
                "n_pos": pos,
                "prevalence": pos / len(y),
                "auroc": float(auroc[j]),
                "auroc_lo": float(auroc_lo[j]),
                "auroc_hi": float(auroc_hi[j]),
                "auprc": float(auprc[j]),
                "auprc_lo": float(auprc_lo[j]),
                "auprc_hi": float(auprc_hi[j]),
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


def external_reliability_figure(y: np.ndarray, p: np.ndarray, table: pd.DataFrame, codes: tuple[str, ...]) -> Figure:
    """Reliability diagrams of the (up to 6) most frequent reported labels, each with its ECE."""
    labels = table.sort_values("n_pos", ascending=False)["label"].head(6).tolist()
    ece = table.set_index("label")["ece"]
    curves = (
        pd.concat(
            [
                reliability_bins(y[:, codes.index(c)], p[:, codes.index(c)]).assign(panel=c, series="external set")
                for c in labels
            ],
            ignore_index=True,
        )
        if labels
        else pd.DataFrame(columns=["panel", "series", "mean_probability", "observed_rate"])
    )
    titles = {c: f"{c}: ECE {ece[c]:.3f}" for c in labels}
    return reliability_figure(curves, titles, "calibration on the external set (10 equal-width bins)")


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
        r.figures["external/reliability.png"] = external_reliability_figure(y, p, table, codes)
    return r
