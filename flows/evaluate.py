"""Evaluate flow: a trained model on an external labelled set (a PhysioNet Challenge folder, another
PTB-XL), one MLflow run `evaluate` beside the model's own test-fold figures. No record ids are logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow
from prefect.runtime import flow_run

from ecgproto import tracking
from ecgproto.data.labels import load_label_set
from ecgproto.data.layouts import DatasetError
from ecgproto.data.store import ArrayStore
from ecgproto.evaluation.external import external_report
from ecgproto.scoring import score_rows
from ecgproto.settings import DEFAULT_MODEL_URI
from ecgproto.train.stages import resolve_device


@flow(name="evaluate", log_prints=True)
def evaluate_flow(
    store: str,
    model_uri: str = DEFAULT_MODEL_URI,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    device: str = "auto",
    bootstrap: int = 200,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Score every record of `store` and report each label it has positives for; returns the run id and metrics."""
    s = ArrayStore.open(store)
    if s.labels is None:
        raise DatasetError(
            f"{store}: this store has no labels (layout {s.info['layout']}); external evaluation needs a labelled "
            "set: a PhysioNet Challenge folder or a PTB-XL-layout folder"
        )
    credentialed = bool(s.info.get("credentialed"))
    lineage = tracking.model_lineage(model_uri, tracking_uri)
    dev = str(resolve_device(device))
    with tracking.stage_run(
        "evaluate",
        run_name=f"evaluate on {Path(str(s.info.get('source_root', store))).name}",
        parent_run_id=parent_run_id,
        uri=tracking_uri,
        error_detail=not credentialed,
        tags={
            "prefect_flow_run_id": str(flow_run.id),
            "external": "true",
            "cohort_dataset_hash": s.key,
            **{k: v for k, v in lineage.items() if k in ("model_uri", "model_version", "train_run_id")},
        },
    ) as run_id:
        model = tracking.load_model(lineage["model_uri"], tracking_uri)
        labels = load_label_set()
        if tuple(model.codes) != tuple(labels.codes):
            raise DatasetError(f"{lineage['model_uri']}: the model's labels are not this ecgproto's 71 statements")
        rows = s.manifest["row"].to_numpy()
        sims, probs = score_rows(model, s, rows, batch_size=batch_size, device=dev, progress=True, desc="evaluate")
        # the model's calibrated probabilities, where it carries a calibration (ECGProtoNet.uncertainty)
        calibrated = model.cpu().uncertainty(torch.as_tensor(sims))["probability"].numpy() if model.calibrated else None
        y = np.asarray(s.labels[rows])
        own = None
        if "model_run_id" in lineage:  # the model's own test fold, as its training's evaluate stage logged it
            own = tracking.run_table(lineage["model_run_id"], "evaluation/operating.csv", tracking_uri)
            if own is None:  # trained by an earlier ecgproto: AUROC and positives only
                own = tracking.run_table(lineage["model_run_id"], "evaluation/fused.csv", tracking_uri)
        report = external_report(
            y,
            probs,
            labels.codes,
            labels.descriptions,
            own,
            n_boot=bootstrap,
            credentialed=credentialed,
            calibrated=calibrated,
        )
        report.params = {"model_uri": model_uri, "bootstrap": bootstrap, "device": dev, "layout": s.info["layout"]}
        tracking.log_report(run_id, report, tracking_uri)
    m = report.metrics
    summary = (
        f"evaluate: {int(m['records'])} ECGs, {int(m['labels_reported'])} labels reported"
        + (f", macro-AUROC {m['macro_auroc']:.4f}, mean ECE {m['mean_ece']:.3f}" if "macro_auroc" in m else "")
        + (f" ({m['mean_ece_calibrated']:.3f} calibrated)" if "mean_ece_calibrated" in m else "")
        + (
            f"; on the same labels its own test fold gave {m['macro_auroc_same_labels_training_test']:.4f} "
            f"vs {m['macro_auroc_same_labels_external']:.4f} here"
            if "macro_auroc_same_labels_training_test" in m
            else ""
        )
    )
    print(summary)
    return {"run_id": run_id, "metrics": m, "summary": summary}
