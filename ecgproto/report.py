"""What a stage hands to MLflow: params, metrics, tables, figures, JSON documents. Pure data.

Stage modules build a StageReport; `ecgproto.tracking.log_report` is the only code that sends it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure


@dataclass
class StageReport:
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # artifact path without suffix
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact path with .png
    documents: dict[str, Any] = field(default_factory=dict)  # artifact path -> JSON-able object, or text (e.g. .md)
    tags: dict[str, str] = field(default_factory=dict)
    formats: dict[str, tuple[str, ...]] = field(default_factory=dict)  # table path -> formats; default csv+parquet


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
        keys = [k for k in train if k.startswith(("fused.macro_au", "baseline.macro_au", "fused_minus_baseline."))]
        r.metrics.update({f"test.{k}": train[k] for k in keys})

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
