"""What a stage hands to MLflow: params, metrics, tables, figures, JSON documents. Pure data.

Stage modules build a StageReport; `ecgproto.tracking.log_report` is the only code that sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


@dataclass(frozen=True)
class DatasetRef:
    """A dataset a run used or wrote, as MLflow shows it in the runs table's Dataset column: a store (or one of
    its splits) by its dataset hash; `context` is training, validation, test, cohort, external or output."""

    name: str
    digest: str
    source: str
    context: str
    profile: dict[str, Any] = field(default_factory=dict)  # e.g. {"records": 2183}; empty for credentialed sets


@dataclass
class StageReport:
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # artifact path without suffix
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact path with .png
    documents: dict[str, Any] = field(default_factory=dict)  # artifact path -> JSON-able object, or text (e.g. .md)
    tags: dict[str, str] = field(default_factory=dict)
    formats: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table path -> formats; default csv+parquet
    datasets: list[DatasetRef] = field(default_factory=list)  # MLflow dataset inputs of the run
    description: str | None = None  # the run's Description (markdown): its headline and links


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested configs as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


_VOCABULARY = {
    "fused.macro_auroc": "macro_auroc",
    "fused.macro_auroc_lo": "macro_auroc_lo",
    "fused.macro_auroc_hi": "macro_auroc_hi",
    "fused.macro_auprc": "macro_auprc",
    "fused.n_records": "n_records",
    "fused.n_labels_scored": "n_labels",
    "baseline.macro_auroc": "black_box.macro_auroc",
    "baseline.macro_auroc_lo": "black_box.macro_auroc_lo",
    "baseline.macro_auroc_hi": "black_box.macro_auroc_hi",
    "baseline.macro_auprc": "black_box.macro_auprc",
    "fused_minus_baseline.macro_auroc": "minus_black_box.macro_auroc",
    "fused_minus_baseline.macro_auroc_lo": "minus_black_box.macro_auroc_lo",
    "fused_minus_baseline.macro_auroc_hi": "minus_black_box.macro_auroc_hi",
}


def scored_metrics(metrics: dict[str, float], prefix: str = "test") -> dict[str, float]:
    """The one metric vocabulary of every run that scores the model on a set (the training's test fold, the
    pipeline run, an external evaluation), so one runs-table column compares them: `test.macro_auroc` with
    `_lo`/`_hi`, `test.macro_auprc`, `test.n_records`, `test.n_labels`, and beside the black box trained with the
    model `test.black_box.macro_auroc` and the paired `test.minus_black_box.macro_auroc` (with CIs)."""
    return {f"{prefix}.{name}": float(metrics[key]) for key, name in _VOCABULARY.items() if key in metrics}


def without_scored(metrics: dict[str, float]) -> dict[str, float]:
    """The other figures of a scoring stage (branches, calibration, ...): what `scored_metrics` does not rename."""
    return {k: v for k, v in metrics.items() if k not in _VOCABULARY and not k.startswith("baseline.")}


def pipeline_report(
    summary: dict[str, str],
    train: dict[str, float] | None,
    association: dict[str, float] | None,
    links: dict[str, str],
    title: str,
) -> StageReport:
    """The pipeline run's headline (metrics, tags) and its Description in the UI: what was trained on what,
    how it scored beside the black box, which version and alias it became, what the association found, and
    links (`links`: label -> UI link) to what a reviewer opens next."""
    r = StageReport()
    lines = [f"## {title}", ""]
    if train:
        r.metrics.update(scored_metrics(train))

        def ci(key: str, sign: str = "") -> str:
            return f"{train[key]:{sign}.4f} [{train[key + '_lo']:{sign}.4f}, {train[key + '_hi']:{sign}.4f}]"

        lines.append(f"**Test fold macro-AUROC** (whole fold, 95% CI): prototype model {ci('fused.macro_auroc')}")
        if "baseline.macro_auroc" in train:
            lines[-1] += (
                f"; black box trained beside it {ci('baseline.macro_auroc')}; paired difference "
                f"{ci('fused_minus_baseline.macro_auroc', '+')}."
            )
    if "model_version" in summary:
        alias = summary.get("model_alias", "")
        lines += ["", f"**Model**: version {summary['model_version']}" + (f", alias **{alias}**." if alias else ".")]
    if association:
        sets = sorted(k.split(".")[0] for k in association if k.endswith(".significant_phecodes"))
        for fs in sets:
            r.metrics[f"association.{fs}.significant_phecodes"] = association[f"{fs}.significant_phecodes"]
        if "phecodes_tested" in association:
            r.metrics["association.phecodes_tested"] = association["phecodes_tested"]
            found = ", ".join(f"{fs} {int(association[f'{fs}.significant_phecodes'])}" for fs in sets)
            lines += [
                "",
                f"**Association**: {int(association['phecodes_tested'])} phecodes tested; conditions with a "
                f"Bonferroni-significant association, by feature set: {found or 'none'}.",
            ]
    hashes = {k: summary[k] for k in ("dataset_hash", "cohort_dataset_hash") if k in summary}
    r.tags = {k: summary[k] for k in ("model_version", "model_alias") if k in summary} | hashes
    if hashes:
        lines += ["", "**Data**: " + "; ".join(f"{k.replace('_', ' ')} `{v[:16]}`" for k, v in hashes.items())]
    if links:
        lines += ["", "**Open next**", ""] + [f"- [{label}]({url})" for label, url in links.items()]
    r.tags["mlflow.note.content"] = "\n".join(lines) + "\n"
    return r
