"""What a reviewer reads without digging: summaries, descriptions, loss terms, progress lines."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ecgproto.explain import example_cases
from ecgproto.progress import CountProgress, EpochProgress
from ecgproto.report import pipeline_report
from ecgproto.train import losses
from ecgproto.train.config import LossWeights
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


def test_example_cases_explain_one_positive_ecg_per_label_planted_labels_first() -> None:
    labels = np.zeros((6, 3), dtype=np.uint8)
    labels[[0, 1, 2, 3], 0] = 1  # the most frequent
    labels[[1, 4], 1] = 1
    labels[[0], 2] = 1
    assert example_cases(labels, ("NORM", "IMI", "STE"), preferred=("STE",), n=3) == [
        (0, "STE"),
        (1, "NORM"),
        (4, "IMI"),
    ]
    assert example_cases(np.zeros((3, 2), dtype=np.uint8), ("A", "B")) == []


def test_the_pipeline_description_says_the_headline_and_links_what_to_open_next() -> None:
    summary = {"model_version": "3", "model_alias": "challenger", "dataset_hash": "a" * 64}
    association = {"phecodes_tested": 120.0, "prototype.significant_phecodes": 4.0, "nlp.significant_phecodes": 2.0}
    links = {"Prototype gallery": "#/experiments/1/runs/abc/artifacts/gallery"}
    r = pipeline_report(summary, METRICS, association, links, "ecgproto pipeline on the demo data")
    assert r.metrics["test.fused.macro_auroc"] == METRICS["fused.macro_auroc"]
    assert r.metrics["association.prototype.significant_phecodes"] == 4.0
    assert r.tags["model_alias"] == "challenger" and r.tags["dataset_hash"] == "a" * 64
    note = r.tags["mlflow.note.content"]
    assert "prototype model 0.9123 [0.9000, 0.9200]" in note and "paired difference -0.0077" in note
    assert "version 3, alias **challenger**" in note and "120 phecodes tested" in note
    assert "[Prototype gallery](#/experiments/1/runs/abc/artifacts/gallery)" in note
    assert "Test fold macro-AUROC 0.9123" in version_description(METRICS, "b" * 64, "run1")


def test_the_joint_loss_reports_its_terms_and_they_add_up_to_it() -> None:
    g = torch.Generator().manual_seed(0)
    logits, sims = torch.randn(8, 3, generator=g), torch.rand(8, 6, generator=g)
    prototypes = torch.randn(6, 16, generator=g)
    targets = (torch.rand(8, 3, generator=g) < 0.4).float()
    identity = torch.zeros(6, 3)
    identity[torch.arange(6), torch.arange(6) % 3] = 1
    parts: dict[str, torch.Tensor] = {}
    w = LossWeights()
    total = losses.joint_loss(logits, sims, prototypes, targets, identity, torch.eye(3), None, w, parts)
    assert set(parts) == {"bce", "clustering", "separation", "diversity", "contrastive"}
    assert torch.isclose(sum(parts.values()), total)
    assert parts["clustering"] <= 0  # why the total can be negative: clustering is minus a similarity


def test_a_progress_line_per_epoch_with_the_best_score_and_the_time_left() -> None:
    out, now = io.StringIO(), iter([0.0, 60.0, 120.0, 121.0, 122.0, 123.0])
    show = EpochProgress("train rhythm_1d/joint", 30, out, clock=lambda: next(now))
    show(0, {"train_loss": 0.5, "val_macro_auroc": 0.81})
    show(1, {"train_loss": 0.4, "val_macro_auroc": 0.79})  # 60 s later: shown
    show(2, {"train_loss": 0.3, "val_macro_auroc": 0.80})  # 1 s later, no new best: quiet
    show(3, {"train_loss": 0.3, "val_macro_auroc": 0.83})  # a new best: shown
    first, second, third = out.getvalue().splitlines()
    assert first.startswith("train rhythm_1d/joint  epoch 1/30  loss 0.500  val macro-AUROC 0.810 (best 0.810)")
    assert first.endswith("~29 min left at most")
    assert "(best 0.810)" in second and second.endswith("~28 min left at most")
    assert third.startswith("train rhythm_1d/joint  epoch 4/30") and "(best 0.830)" in third


def test_counted_progress_shows_the_first_batch_then_every_10_s_and_the_end() -> None:
    out, now = io.StringIO(), iter([0.0, 2.0, 5.0, 14.0, 20.0])
    show = CountProgress("ingest", 1000, stream=out, clock=lambda: next(now))
    show.update(100)  # 2 s: the first batch, shown
    show.update(100)  # 5 s: quiet
    show.update(300)  # 14 s: shown
    show.update(500)  # 20 s: the end, shown
    first, second, last = out.getvalue().splitlines()
    assert first == "ingest  100/1,000 records (10%)  50 records/s  ~18 s left"
    assert second.startswith("ingest  500/1,000 records (50%)") and second.endswith("~14 s left")
    assert last == "ingest  1,000/1,000 records (100%)  50 records/s"


def test_ingest_reports_its_progress_as_lines_when_stderr_is_not_a_terminal(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ecgproto.data.ingest import IngestConfig, ingest

    ingest(demo_root / "ptbxl", tmp_path / "store", IngestConfig(workers=1))
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith("ingest  240/240 records (100%)")  # no bar codes, a readable last line
    assert all("\r" not in line and "\x1b" not in line for line in lines)


def test_temperature_scaling_recovers_a_known_temperature_and_lowers_the_calibration_error() -> None:
    from ecgproto.evaluation.calibration import apply_temperature, fit_temperature, mean_ece, selective

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, (4000, 3))
    y = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(int)  # calibrated at T = 1
    overconfident = 1 / (1 + np.exp(-3 * z))  # what a model with T = 3 too sharp predicts
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3.0, rel=0.1)
    scaled = apply_temperature(overconfident, t)
    assert mean_ece(y, scaled) < mean_ece(y, overconfident) / 2
    # ranking unchanged: the same AUROC; the most certain records are the easier ones
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[:, 0], scaled[:, 0]) == pytest.approx(roc_auc_score(y[:, 0], overconfident[:, 0]))
    s = selective(y, scaled).set_index("coverage")["macro_auroc"]
    assert s.loc[0.8] > s.loc[1.0]
