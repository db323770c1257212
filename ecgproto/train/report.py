"""What each training stage shows a reviewer: curves, provenance, gallery, whole-fold metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ecgproto.evaluation.calibration import coverage_figure, training_reliability_figure
from ecgproto.report import StageReport, scored_metrics, without_scored
from ecgproto.train.quality import is_distinct, quality_metrics, quality_summary
from ecgproto.train.trainer import FitResult

STAGE_NAMES = {
    "joint": "joint stage (backbone, prototypes and head)",
    "last_layer": "last layer (head over the projected prototypes)",
    "fusion": "fusion over every branch's prototypes",
    "baseline": "black box (1D ResNet) trained beside the model",
}


def fit_report(result: FitResult, stage: str, branch: str | None = None) -> StageReport:
    """A fitted stage: its per-epoch curves are the run's charts (train_loss, val_macro_auroc, lr); the best
    validation score is its one summary metric, and where it stopped is said in tags and the description."""
    history = pd.DataFrame(result.history)
    r = StageReport(
        params={"stage": stage, "branch": branch or "all"},
        metrics={"best_val_macro_auroc": result.best_score},
        tags={
            "best_epoch": str(result.best_epoch + 1),
            "epochs_run": str(len(history)),
            "resumed_from_epoch": str(result.resumed_from),
        },
    )
    resumed = f" (resumed after epoch {result.resumed_from})" if result.resumed_from else ""
    r.description = (
        f"**{(branch + ' ') if branch else ''}{STAGE_NAMES.get(stage, stage)}**: best validation (fold 9) "
        f"macro-AUROC **{result.best_score:.4f}** at epoch {result.best_epoch + 1} of {len(history)} run{resumed}; "
        "the weights of that epoch are the stage's output."
    )
    if not history.empty:
        r.tables["history"] = history
        r.description += " Curves: the charts of this run; [epoch table](artifacts/history.csv)."
    return r


def projection_report(provenance: pd.DataFrame) -> StageReport:
    own = provenance["own_class_source"].to_numpy()
    quality = quality_summary(provenance) if "purity" in provenance else None
    r = StageReport(
        metrics=({} if quality is None else quality_metrics(quality))
        | {
            "n_prototypes": float(len(provenance)),
            "n_projected_on_own_class": float(own.sum()),
            "mean_projection_cosine": float(provenance.loc[own, "similarity"].mean()) if own.any() else np.nan,
            "mean_projection_fidelity": float(provenance.loc[own, "fidelity"].mean()) if own.any() else np.nan,
            "n_source_records": float(provenance["ecg_id"].nunique()),
        },
        tables={"provenance": provenance},
    )
    distinct = int(is_distinct(provenance).sum())
    r.description = (
        f"**Projection**: each of {len(provenance)} prototypes is now a real segment of a training ECG "
        f"({int(own.sum())} from an ECG with its own label, from {provenance['ecg_id'].nunique()} ECGs); "
        f"**{distinct} distinct cases** after near-duplicates were merged. "
        "[Provenance](artifacts/provenance.csv): each prototype's source ECG, window, fidelity and quality."
    )
    return r


def evaluation_report(
    metrics: dict[str, float],
    tables: dict[str, pd.DataFrame],
    planted: tuple[str, ...] = (),
    descriptions: dict[str, str] | None = None,
) -> StageReport:
    """Whole-fold metrics (kept one per key for search) and the summary a reviewer reads: one row per label
    with its description, positives and AUROC [95% CI], labels without test positives listed apart."""
    r = StageReport(
        metrics=scored_metrics(metrics) | without_scored(metrics),
        tables={f"evaluation/{k}": v for k, v in tables.items()},
    )
    if planted:
        t = tables["fused"]
        sel = t[t["code"].isin(planted) & t["auroc"].notna()]
        r.metrics["test.planted_macro_auroc"] = float(sel["auroc"].mean())
    summary, without = evaluation_summary(tables["side_by_side"], descriptions or {})
    r.tables["evaluation/summary"] = summary
    r.formats["evaluation/summary"] = ("csv",)
    r.documents["evaluation/summary.md"] = summary_markdown(metrics, summary, without)
    if "reliability" in tables and "calibration" in tables:
        r.figures["evaluation/reliability.png"] = training_reliability_figure(
            tables["reliability"], tables["calibration"]
        )
    if "selective" in tables:
        r.figures["evaluation/coverage.png"] = coverage_figure(tables["selective"])
    r.description = headline_markdown(metrics, "Test fold (fold 10)") + (
        "\n\nOpen: [every label](artifacts/evaluation/summary.md), "
        "[calibration](artifacts/evaluation/reliability.png), "
        "[selective prediction](artifacts/evaluation/coverage.png), the `explanations/` folder (explained test ECGs)."
    )
    return r


def headline_markdown(metrics: dict[str, float], where: str) -> str:
    """One sentence with the figure that matters: the model's macro-AUROC with its CI on `where`, and beside it
    the black box trained with it and the paired difference."""
    m = metrics

    def ci(key: str, sign: str = "") -> str:
        return f"{m[key]:{sign}.4f} [{m[key + '_lo']:{sign}.4f}, {m[key + '_hi']:{sign}.4f}]"

    n = f" on {int(m['fused.n_records']):,} ECGs" if "fused.n_records" in m else ""
    text = f"**{where}**{n}: prototype model macro-AUROC **{ci('fused.macro_auroc')}** (95% bootstrap CI)"
    if "baseline.macro_auroc" in m:
        text += (
            f"; black box trained beside it {m['baseline.macro_auroc']:.4f}; paired difference "
            f"{ci('fused_minus_baseline.macro_auroc', '+')}"
        )
    return text + "."


def evaluation_summary(side: pd.DataFrame, descriptions: dict[str, str]) -> tuple[pd.DataFrame, list[str]]:
    """(label, description, branch, n_pos, AUROC [CI], black box) for labels with test positives, best first;
    and the labels without a positive in the fold (no AUROC exists for them)."""
    has = side["n_pos"].to_numpy() > 0
    t = side[has].copy()
    out = pd.DataFrame(
        {
            "label": t["code"],
            "description": [descriptions.get(c, "") for c in t["code"]],
            "branch": t["branch"],
            "n_pos": t["n_pos"].astype(int),
            "auroc": t["auroc"].round(4),
            "auroc_95ci": [f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(t["auroc_lo"], t["auroc_hi"], strict=True)],
        }
    )
    if "baseline_auroc" in t:
        out["black_box_auroc"] = t["baseline_auroc"].round(4)
    return out.sort_values("auroc", ascending=False).reset_index(drop=True), list(side.loc[~has, "code"])


def summary_markdown(metrics: dict[str, float], summary: pd.DataFrame, without: list[str]) -> str:
    def ci(key: str) -> str:
        return f"{metrics[key]:.4f} [{metrics[key + '_lo']:.4f}, {metrics[key + '_hi']:.4f}]"

    lines = ["# Test fold, whole-fold metrics", "", f"- prototype model macro-AUROC: {ci('fused.macro_auroc')}"]
    if "baseline.macro_auroc" in metrics:
        lines.append(f"- black box (1D ResNet, same data) macro-AUROC: {ci('baseline.macro_auroc')}")
        d = "fused_minus_baseline.macro_auroc"
        lines.append(
            f"- paired difference (prototype - black box): {metrics[d]:+.4f} "
            f"[{metrics[d + '_lo']:+.4f}, {metrics[d + '_hi']:+.4f}]"
        )
    lines += ["", "| label | description | branch | positives | AUROC | 95% CI |"]
    lines[-1] += " black box |" if "black_box_auroc" in summary else ""
    lines.append("|" + "---|" * (7 if "black_box_auroc" in summary else 6))
    for row in summary.itertuples(index=False):
        cells = [row.label, row.description, row.branch, str(row.n_pos), f"{row.auroc:.4f}", row.auroc_95ci]
        if "black_box_auroc" in summary:
            cells.append(f"{row.black_box_auroc:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    if without:
        lines += ["", f"No positive in the test fold (no AUROC): {', '.join(without)}."]
    return "\n".join(lines) + "\n"


def version_description(
    metrics: dict[str, float], dataset_hash: str, run_id: str, training_link: str | None = None
) -> str:
    """A registered version's Description: what it scored on the test fold, what it was trained on, and a link to
    its training run (external evaluations add a line each, ecgproto.flows.evaluate)."""
    m = metrics
    lines = [
        f"Test fold macro-AUROC {m['fused.macro_auroc']:.4f} "
        f"[{m['fused.macro_auroc_lo']:.4f}, {m['fused.macro_auroc_hi']:.4f}] (whole fold, 95% bootstrap CI)."
    ]
    if "baseline.macro_auroc" in m:
        d = "fused_minus_baseline.macro_auroc"
        lines.append(
            f"Black box trained beside it: {m['baseline.macro_auroc']:.4f}; paired difference {m[d]:+.4f} "
            f"[{m[d + '_lo']:+.4f}, {m[d + '_hi']:+.4f}]."
        )
    run = f"[training run]({training_link})" if training_link else "its training run"
    lines.append(
        f"Training data: store hash `{dataset_hash[:16]}`; trained and evaluated in {run} (evaluate `{run_id}`)."
    )
    return "\n\n".join(lines)
