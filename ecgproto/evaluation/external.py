"""External validation: a trained model scored on another dataset (a PhysioNet Challenge set, a hospital's
WFDB export), label by label, beside what it scored on its own test fold.

For every label the external set has at least 10 positives and 10 negatives for: prevalence, AUROC and
AUPRC with bootstrap CIs, calibration (expected calibration error over 10 equal-width bins, and a
reliability diagram), and sensitivity and specificity at the decision threshold 0.5 of the model's
probability (the one `explain` reports as predicted). With fewer, a CI is meaningless (one positive
gives AUROC 1.0 [1.0, 1.0]): such labels are listed with their counts, unranked, outside the macro
figures; labels the set lacks are listed apart. Beside the model, the black box trained with it, scored
on the same records: its AUROC per label and macro, and the paired difference with its CI.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ecgproto.evaluation.calibration import expected_calibration_error, reliability_bins, reliability_figure
from ecgproto.evaluation.metrics import auprc_per_label, auroc_per_label, macro_ci, percentile_ci, resampled
from ecgproto.report import StageReport, scored_metrics

THRESHOLD = 0.5
MIN_CELL = 10


def bootstrap(
    y: np.ndarray, p: np.ndarray, black_box: np.ndarray | None, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """One bootstrap for every label and figure (ecgproto.evaluation.metrics.resampled: the same record resamples
    for each): per-resample AUROC and AUPRC of the model and AUROC of the black box, (n_boot, L) each; {} without
    resamples."""
    if not n_boot:
        return {}
    y = np.asarray(y).astype(int)
    out = {"auroc": resampled(y, p, n_boot, seed), "auprc": resampled(y, p, n_boot, seed, auprc_per_label)}
    if black_box is not None:
        out["black_box"] = resampled(y, black_box, n_boot, seed)
    return out


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
    min_cases: int = 1,
    black_box: np.ndarray | None = None,
    resamples: dict[str, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per reportable label, best AUROC first; the labels not reported, with why and their counts).

    A label is reported when it has at least `min_cases` positives and negatives (MIN_CELL for a credentialed
    set, whatever is asked). `calibrated`: the model's calibrated probabilities (ECGProtoNet.uncertainty), whose
    ECE joins as `ece_calibrated`. `black_box`: the black box's probabilities on the same records: its AUROC and
    the paired difference (model minus black box) with its CI join per label. `resamples`: `bootstrap(...)` of
    the same arguments, when the caller needs them too (external_report's macro CIs)."""
    y = np.asarray(y).astype(int)
    need = max(min_cases, MIN_CELL) if credentialed else max(min_cases, 1)
    auroc, auprc = auroc_per_label(y, p), auprc_per_label(y, p)
    boot = resamples if resamples is not None else bootstrap(y, p, black_box, n_boot, seed)
    ci = {k: percentile_ci(boot[k]) for k in ("auroc", "auprc") if k in boot}
    if black_box is not None:
        bb_auroc = auroc_per_label(y, black_box)
        if n_boot:
            ci["minus_black_box"] = percentile_ci(boot["auroc"] - boot["black_box"])
    rows, apart = [], []
    for j, code in enumerate(codes):
        pos = int(y[:, j].sum())
        neg = len(y) - pos
        if pos == 0 or neg == 0:
            why = "no positives" if not pos else "no negatives"
            apart.append({"label": code, "description": descriptions[j], "why": why, "n_pos": pos, "n_neg": neg})
            continue
        if min(pos, neg) < need:
            apart.append(
                {
                    "label": code,
                    "description": descriptions[j],
                    "why": f"fewer than {need} positives or negatives: no CI, not ranked, not in the macro figures",
                    "n_pos": pos,
                    "n_neg": neg,
                }
            )
            continue
        yj, pj = y[:, j], p[:, j]
        called = pj >= THRESHOLD
        row = {
            "label": code,
            "description": descriptions[j],
            "n_pos": pos,
            "prevalence": pos / len(y),
            "auroc": float(auroc[j]),
            "auroc_lo": float(ci["auroc"][0][j]) if n_boot else np.nan,
            "auroc_hi": float(ci["auroc"][1][j]) if n_boot else np.nan,
            "auprc": float(auprc[j]),
            "auprc_lo": float(ci["auprc"][0][j]) if n_boot else np.nan,
            "auprc_hi": float(ci["auprc"][1][j]) if n_boot else np.nan,
            "ece": expected_calibration_error(yj, pj),
            "sensitivity": float(called[yj == 1].mean()),
            "specificity": float((~called[yj == 0]).mean()),
        }
        if calibrated is not None:
            row["ece_calibrated"] = expected_calibration_error(yj, calibrated[:, j])
        if black_box is not None:
            row["black_box_auroc"] = float(bb_auroc[j])
            row["minus_black_box"] = float(auroc[j] - bb_auroc[j])
            if n_boot:
                row["minus_black_box_lo"] = float(ci["minus_black_box"][0][j])
                row["minus_black_box_hi"] = float(ci["minus_black_box"][1][j])
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values("auroc", ascending=False).reset_index(drop=True)
    out = pd.DataFrame(apart, columns=["label", "description", "why", "n_pos", "n_neg"])
    if credentialed:  # counts below the small-cell limit are not exported
        for c in ("n_pos", "n_neg"):
            out[c] = [str(n) if n == 0 or n >= MIN_CELL else f"<{MIN_CELL}" for n in out[c]]
    return table, out


def external_reliability_figure(y: np.ndarray, p: np.ndarray, table: pd.DataFrame, codes: tuple[str, ...]) -> Figure:
    """Reliability diagrams of the (up to 6) most frequent reported labels, each with its ECE."""
    labels = table.sort_values("n_pos", ascending=False)["label"].head(6).tolist()
    ece = table.set_index("label")["ece"]
    parts = [
        reliability_bins(y[:, codes.index(c)], p[:, codes.index(c)]).assign(panel=c, series="external set")
        for c in labels
    ]
    columns = ["panel", "series", "mean_probability", "observed_rate"]
    curves = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    titles = {c: f"{c}: ECE {ece[c]:.3f}" for c in labels}
    return reliability_figure(curves, titles, "calibration on the external set (10 equal-width bins)")


def labels_markdown(table: pd.DataFrame, apart: pd.DataFrame, metrics: dict[str, float]) -> str:
    """The external labels as a table the artifact viewer shows in one screen: the macro figures and over which
    labels they are taken, then each reported label (best AUROC first), then the labels not reported."""
    m = metrics
    lines = ["# External evaluation", ""]
    if "test.macro_auroc" in m:
        lines.append(
            f"- model macro-AUROC **{m['test.macro_auroc']:.4f}** [{m['test.macro_auroc_lo']:.4f}, "
            f"{m['test.macro_auroc_hi']:.4f}] over the {int(m['test.n_labels'])} labels with >= {MIN_CELL} "
            f"positives and negatives among {int(m['test.n_records']):,} ECGs"
        )
    if "test.black_box.macro_auroc" in m:
        lines.append(
            f"- black box trained beside it: {m['test.black_box.macro_auroc']:.4f}; paired difference "
            f"{m['test.minus_black_box.macro_auroc']:+.4f} [{m['test.minus_black_box.macro_auroc_lo']:+.4f}, "
            f"{m['test.minus_black_box.macro_auroc_hi']:+.4f}]"
        )
    bb = "black_box_auroc" in table
    lines += [
        "",
        "| label | description | positives | AUROC [95% CI] | AUPRC | ECE |" + (" black box | diff |" if bb else ""),
    ]
    lines.append("|" + "---|" * (8 if bb else 6))
    for r in table.itertuples(index=False):
        cells = [
            r.label,
            r.description,
            str(r.n_pos),
            f"{r.auroc:.3f} [{r.auroc_lo:.3f}, {r.auroc_hi:.3f}]",
            f"{r.auprc:.3f}",
            f"{r.ece:.3f}",
        ]
        if bb:
            cells += [f"{r.black_box_auroc:.3f}", f"{r.minus_black_box:+.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    few = apart[~apart["why"].str.startswith("no ")]
    if len(few):
        lines += ["", f"Too few to report (< {MIN_CELL} positives or negatives): "]
        lines.append(", ".join(f"{r.label} ({r.n_pos} positives)" for r in few.itertuples(index=False)) + ".")
    return "\n".join(lines) + "\n"


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
    black_box: np.ndarray | None = None,
) -> StageReport:
    """The evaluate run: per-label table, with the same figures of the model on its own test fold beside when
    `training` is given (the training run's `evaluation/operating.csv`: n_pos, prevalence, AUROC, AUPRC, ECE,
    ECE of the calibrated probabilities, sensitivity, specificity; or, from an older training,
    `evaluation/fused.csv`: n_pos and AUROC), labels apart, macro figures in the vocabulary every scoring run
    shares (`test.macro_auroc`, ...), the black box beside (`black_box`), reliability diagrams."""
    boot = bootstrap(y, p, black_box, n_boot, seed)  # once: per label in the table, macro below
    table, apart = external_table(
        y,
        p,
        codes,
        descriptions,
        n_boot=n_boot,
        seed=seed,
        credentialed=credentialed,
        calibrated=calibrated,
        min_cases=MIN_CELL,
        black_box=black_box,
        resamples=boot,
    )
    if training is not None and len(table):
        own = training.rename(columns={"code": "label"}).set_index("label")
        for column in ("n_pos", "prevalence", "auroc", "auprc", "ece", "ece_calibrated", "sensitivity", "specificity"):
            if column in own:
                table[f"training_test_{column}"] = table["label"].map(own[column])
    r = StageReport(tables={"external/labels": table, "external/labels_not_reported": apart})
    r.formats = {"external/labels": ("csv",), "external/labels_not_reported": ("csv",)}
    r.metrics = {
        "test.n_records": float(len(y)),
        "labels_reported": float(len(table)),
        "labels_apart": float(len(apart)),
    }
    if len(table):
        cols = [codes.index(c) for c in table["label"]]
        macro = {"fused.macro_auroc": float(table["auroc"].mean()), "fused.macro_auprc": float(table["auprc"].mean())}
        if n_boot:  # over the reported labels only, from the table's own resamples
            lo, hi = macro_ci(boot["auroc"][:, cols])
            macro |= {"fused.macro_auroc_lo": lo, "fused.macro_auroc_hi": hi}
        macro["fused.n_labels_scored"] = float(len(table))
        if black_box is not None:
            macro["baseline.macro_auroc"] = float(table["black_box_auroc"].mean())
            dlo, dhi = macro_ci((boot["auroc"] - boot["black_box"])[:, cols]) if n_boot else (np.nan, np.nan)
            macro |= {
                "fused_minus_baseline.macro_auroc": macro["fused.macro_auroc"] - macro["baseline.macro_auroc"],
                "fused_minus_baseline.macro_auroc_lo": dlo,
                "fused_minus_baseline.macro_auroc_hi": dhi,
            }
        r.metrics |= scored_metrics(macro) | {"test.mean_ece": float(table["ece"].mean())}
        if "ece_calibrated" in table:
            r.metrics["test.mean_ece_calibrated"] = float(table["ece_calibrated"].mean())
        if "training_test_auroc" in table and table["training_test_auroc"].notna().any():
            both = table.dropna(subset=["training_test_auroc"])
            r.metrics["macro_auroc_same_labels_training_test"] = float(both["training_test_auroc"].mean())
            r.metrics["macro_auroc_same_labels_external"] = float(both["auroc"].mean())
        r.figures["external/reliability.png"] = external_reliability_figure(y, p, table, codes)
    r.documents["external/labels.md"] = labels_markdown(table, apart, r.metrics)
    return r
