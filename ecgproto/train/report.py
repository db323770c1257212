"""What each training stage shows a reviewer: curves, provenance, gallery, whole-fold metrics."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ecgproto.report import StageReport
from ecgproto.train.trainer import FitResult


def fit_report(result: FitResult, stage: str, branch: str | None = None) -> StageReport:
    history = pd.DataFrame(result.history)
    r = StageReport(
        params={"stage": stage, "branch": branch or "all"},
        metrics={
            "best_val_macro_auroc": result.best_score,
            "best_epoch": float(result.best_epoch),
            "epochs_run": float(len(history)),
            "resumed_from_epoch": float(result.resumed_from),
        },
    )
    if not history.empty:
        r.tables["history"] = history
    return r


def projection_report(provenance: pd.DataFrame) -> StageReport:
    own = provenance["own_class_source"].to_numpy()
    return StageReport(
        metrics={
            "n_prototypes": float(len(provenance)),
            "n_projected_on_own_class": float(own.sum()),
            "mean_projection_cosine": float(provenance.loc[own, "similarity"].mean()) if own.any() else np.nan,
            "mean_projection_fidelity": float(provenance.loc[own, "fidelity"].mean()) if own.any() else np.nan,
            "n_source_records": float(provenance["ecg_id"].nunique()),
        },
        tables={"provenance": provenance},
    )


def evaluation_report(
    metrics: dict[str, float], tables: dict[str, pd.DataFrame], planted: tuple[str, ...] = ()
) -> StageReport:
    r = StageReport(metrics=dict(metrics), tables={f"evaluation/{k}": v for k, v in tables.items()})
    if planted:
        t = tables["fused"]
        sel = t[t["code"].isin(planted) & t["auroc"].notna()]
        r.metrics["fused.planted_macro_auroc"] = float(sel["auroc"].mean())
    return r
