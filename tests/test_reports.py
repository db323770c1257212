"""What a reviewer reads in MLflow: the evaluation summary, the pipeline run's description, the model
version's description."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ecgproto.report import pipeline_report
from ecgproto.train.report import evaluation_summary, summary_markdown, version_description

METRICS = {
    "fused.macro_auroc": 0.91234,
    "fused.macro_auroc_lo": 0.9,
    "fused.macro_auroc_hi": 0.92,
    "baseline.macro_auroc": 0.92,
    "baseline.macro_auroc_lo": 0.91,
    "baseline.macro_auroc_hi": 0.93,
    "fused_minus_baseline.macro_auroc": -0.0077,
    "fused_minus_baseline.macro_auroc_lo": -0.02,
    "fused_minus_baseline.macro_auroc_hi": 0.004,
}


def test_the_summary_lists_labels_best_first_with_their_ci_and_those_without_positives_apart() -> None:
    side = pd.DataFrame(
        {
            "code": ["NORM", "IMI", "WPW"],
            "n_pos": [900, 40, 0],
            "auroc": [0.93, 0.95, np.nan],
            "auroc_lo": [0.92, 0.91, np.nan],
            "auroc_hi": [0.94, 0.98, np.nan],
            "baseline_auroc": [0.94, 0.93, np.nan],
            "branch": ["global_2d", "morphology_2d_local", "rhythm_1d"],
        }
    )
    summary, without = evaluation_summary(side, {"IMI": "inferior myocardial infarction"})
    assert list(summary["label"]) == ["IMI", "NORM"] and without == ["WPW"]
    assert summary.loc[0, "description"] == "inferior myocardial infarction"
    assert summary.loc[0, "auroc_95ci"] == "[0.910, 0.980]"
    text = summary_markdown(METRICS, summary, without)
    assert "0.9123 [0.9000, 0.9200]" in text and "-0.0077 [-0.0200, +0.0040]" in text
    assert "| IMI | inferior myocardial infarction |" in text
    assert "No positive in the test fold (no AUROC): WPW." in text
    assert "nan" not in text  # no blank rows mixed in


def test_the_pipeline_description_says_the_headline_and_links_what_to_open_next() -> None:
    summary = {"model_version": "3", "model_alias": "challenger", "dataset_hash": "a" * 64}
    association = {"phecodes_tested": 120.0, "prototype.significant_phecodes": 4.0, "nlp.significant_phecodes": 2.0}
    links = {"Prototype gallery": "#/experiments/1/runs/abc/artifacts/gallery"}
    r = pipeline_report(summary, METRICS, association, links, "ecgproto pipeline on the demo data")
    assert r.metrics["test.macro_auroc"] == METRICS["fused.macro_auroc"]  # the vocabulary of every scoring run
    assert r.metrics["test.minus_black_box.macro_auroc_lo"] == METRICS["fused_minus_baseline.macro_auroc_lo"]
    assert r.metrics["association.prototype.significant_phecodes"] == 4.0
    assert r.tags["model_alias"] == "challenger" and r.tags["dataset_hash"] == "a" * 64
    note = r.tags["mlflow.note.content"]
    assert "prototype model 0.9123 [0.9000, 0.9200]" in note and "paired difference -0.0077" in note
    assert "version 3, alias **challenger**" in note and "120 phecodes tested" in note
    assert "[Prototype gallery](#/experiments/1/runs/abc/artifacts/gallery)" in note
    assert "Test fold macro-AUROC 0.9123" in version_description(METRICS, "b" * 64, "run1")
