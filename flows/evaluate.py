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
from ecgproto.data.summary import store_dataset
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
    name = Path(str(s.info.get("source_root", store))).name
    with tracking.stage_run(
        "external-evaluate",  # apart from the training's own `evaluate` stage, which lookups by stage find
        run_name=f"evaluate on {name}",
        # an external evaluation belongs to its model: a child of the model's training run unless a caller nests it
        parent_run_id=parent_run_id or lineage.get("train_run_id"),
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
        # the black box trained beside the model, on the same records: what interpretability costs here
        net = tracking.load_black_box(lineage["model_run_id"], tracking_uri) if "model_run_id" in lineage else None
        black_box = _black_box_scores(net, s, rows, batch_size, dev) if net is not None else None
        report = external_report(
            y,
            probs,
            labels.codes,
            labels.descriptions,
            own,
            n_boot=bootstrap,
            credentialed=credentialed,
            calibrated=calibrated,
            black_box=black_box,
        )
        report.params = {"model_uri": model_uri, "bootstrap": bootstrap, "device": dev, "layout": s.info["layout"]}
        report.datasets.append(store_dataset(s, "external"))
        headline = _headline(report.metrics, name)
        report.description = (
            f"{headline}\n\nOpen: [every label](artifacts/external/labels.md), "
            "[calibration](artifacts/external/reliability.png). No record identifiers are logged."
        )
        tracking.log_report(run_id, report, tracking_uri)
        if "model_version" in lineage:  # the version's description gains a line per external evaluation
            link = tracking.run_link(run_id, uri=tracking_uri)
            tracking.describe_model_version(
                lineage["model_name"],
                lineage["model_version"],
                f"{headline} [Evaluate run]({link}).",
                tracking_uri,
                append=True,
            )
            tracking.set_tags(run_id, {"registered_model": lineage["model_name"]}, tracking_uri)
    m = report.metrics
    summary = (
        f"evaluate: {int(m['test.n_records'])} ECGs, {int(m['labels_reported'])} labels with >= 10 positives"
        + (
            f", macro-AUROC {m['test.macro_auroc']:.4f}, mean ECE {m['test.mean_ece']:.3f}"
            if "test.macro_auroc" in m
            else ""
        )
        + (f" ({m['test.mean_ece_calibrated']:.3f} calibrated)" if "test.mean_ece_calibrated" in m else "")
        + (
            f"; black box beside it {m['test.black_box.macro_auroc']:.4f}, paired difference "
            f"{m['test.minus_black_box.macro_auroc']:+.4f}"
            if "test.black_box.macro_auroc" in m
            else ""
        )
        + (
            f"; on the same labels its own test fold gave {m['macro_auroc_same_labels_training_test']:.4f} "
            f"vs {m['macro_auroc_same_labels_external']:.4f} here"
            if "macro_auroc_same_labels_training_test" in m
            else ""
        )
    )
    print(summary)
    return {"run_id": run_id, "metrics": m, "summary": summary}


def _black_box_scores(
    net: torch.nn.Module, store: ArrayStore, rows: np.ndarray, batch_size: int, device: str
) -> np.ndarray:
    """The black box's probabilities on `rows` of `store`, in that order."""
    net = net.eval().to(device)
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            x = torch.as_tensor(np.asarray(store.signals[rows[i : i + batch_size]], dtype=np.float32), device=device)
            out.append(torch.sigmoid(net(x).float()).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def _headline(m: dict[str, float], name: str) -> str:
    """The evaluate run's one sentence: the model's macro-AUROC on the foreign set, over which labels, and the
    black box beside it."""
    if "test.macro_auroc" not in m:
        return (
            f"**External evaluation on {name}** ({int(m['test.n_records'])} ECGs): no label has >= 10 positives "
            "and negatives, so no macro figure; each label's counts are in the labels table."
        )
    text = (
        f"**External evaluation on {name}** ({int(m['test.n_records']):,} ECGs): macro-AUROC "
        f"**{m['test.macro_auroc']:.4f}**"
        + (f" [{m['test.macro_auroc_lo']:.4f}, {m['test.macro_auroc_hi']:.4f}]" if "test.macro_auroc_lo" in m else "")
        + f" over the {int(m['test.n_labels'])} labels with >= 10 positives and negatives"
    )
    if "test.black_box.macro_auroc" in m:
        text += (
            f"; black box trained beside it {m['test.black_box.macro_auroc']:.4f}, paired difference "
            f"{m['test.minus_black_box.macro_auroc']:+.4f} [{m['test.minus_black_box.macro_auroc_lo']:+.4f}, "
            f"{m['test.minus_black_box.macro_auroc_hi']:+.4f}]"
        )
    return text + "."
