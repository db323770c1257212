"""External validation sets: PhysioNet Challenge 2020/2021 folders and generic WFDB folders are ingested
with their labels mapped from SNOMED CT, unmapped codes counted, and records of any rate and length."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import wfdb

from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.labels import load_label_set
from ecgproto.data.layouts import detect_layout, list_records
from ecgproto.data.summary import ingest_report

CANONICAL = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]


def _signal(fs: int, seconds: float) -> np.ndarray:
    """(12, n) mV: lead k a 1.2 Hz wave of amplitude (k + 1) / 10, so the lead order can be checked; after the
    first 10 s three times larger, so which window became the model's input can be checked too."""
    t = np.arange(int(fs * seconds)) / fs
    gain = np.where(t < 10, 1.0, 3.0)
    return np.stack([(k + 1) * 0.1 * gain * np.sin(2 * np.pi * 1.2 * t) for k in range(12)])


def _challenge_mat(folder: Path, name: str, fs: int, seconds: float, comments: list[str]) -> None:
    """A Challenge record as distributed: a MATLAB v4 `val` matrix (int16, leads x samples) read at a 24-byte
    offset, lower-case and reordered lead names, and Age/Sex/Dx comments."""
    folder.mkdir(parents=True, exist_ok=True)
    order = [1, 0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 10]
    digital = np.round(_signal(fs, seconds)[order] * 1000).astype(np.int16)
    scipy.io.savemat(folder / f"{name}.mat", {"val": digital}, format="4")
    lines = [f"{name} 12 {fs} {digital.shape[1]}"] + [
        f"{name}.mat 16+24 1000/mV 16 0 {digital[i, 0]} 0 0 {CANONICAL[order[i]].lower()}" for i in range(12)
    ]
    (folder / f"{name}.hea").write_text("\n".join(lines + comments) + "\n")


def _wfdb_dat(folder: Path, name: str, fs: int, seconds: float, comments: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        name,
        fs=fs,
        units=["mV"] * 12,
        sig_name=CANONICAL,
        p_signal=_signal(fs, seconds).T,
        fmt=["16"] * 12,
        write_dir=str(folder),
        comments=comments,
    )


@pytest.fixture()
def challenge(tmp_path: Path) -> Path:
    root = tmp_path / "challenge"
    _challenge_mat(root / "g1", "A0001", 500, 30, ["#Age: 74", "#Sex: Male", "#Dx: 426783006,39732003"])
    _challenge_mat(root / "g1", "A0002", 257, 5, ["#Age: 61", "#Sex: Female", "#Dx: 164889003"])  # too short
    _wfdb_dat(root / "g2", "HR00003", 1000, 10, ["Age: NaN", "Sex: Female", "Dx: 164889003,59118001,251146004"])
    return root


def test_a_challenge_folder_is_detected_and_its_snomed_codes_become_statements(challenge: Path) -> None:
    assert detect_layout(challenge) == "challenge"
    listing = list_records(challenge)
    labels = load_label_set()
    assert list(listing.records["record_id"]) == ["g1/A0001", "g1/A0002", "g2/HR00003"]
    assert listing.records.loc[0, "age"] == 74 and listing.records.loc[0, "sex"] == "male"
    assert np.isnan(listing.records.loc[2, "age"])
    assert listing.labels is not None
    positives = [{labels.codes[j] for j in np.flatnonzero(row)} for row in listing.labels]
    # RBBB (59118001) is scored as complete RBBB; low QRS voltages (251146004) is LVOLT
    assert positives == [{"SR"}, {"AFIB"}, {"AFIB", "CRBBB", "LVOLT"}]
    mapping = listing.label_mapping.set_index("snomed_ct")
    assert mapping.loc["39732003", "abbreviation"] == "LAD" and not mapping.loc["39732003", "mapped"]
    assert mapping.loc["164889003", "n_records"] == 2 and mapping.loc["164889003", "scp_code"] == "AFIB"


def test_records_of_any_rate_and_length_become_the_first_10_s_at_100_hz_and_short_ones_are_quarantined(
    challenge: Path, tmp_path: Path
) -> None:
    result = ingest(challenge, tmp_path / "store", IngestConfig(workers=1), progress=False)
    store = result.store
    assert list(store.manifest["record_id"]) == ["g1/A0001", "g2/HR00003"]
    q = store.quarantine.set_index("record_id")
    assert q.loc["g1/A0002", "reason"] == "too_short"
    assert store.signals.shape[1:] == (12, 1000) and set(store.manifest["split"]) == {"external"}
    # a reordered, lower-case 30 s .mat record comes out as its first 10 s, in the canonical lead order
    x = np.asarray(store.signals[int(store.manifest.loc[0, "row"])], dtype=np.float32)
    expected = _signal(100, 10)  # the same wave, resampled 500 -> 100 Hz and high-passed by ingest
    amplitude = np.abs(x).max(axis=1)
    np.testing.assert_allclose(amplitude, np.abs(expected).max(axis=1), rtol=0.15)
    assert np.argsort(amplitude).tolist() == list(range(12))
    assert store.info["labels"] and store.info["layout"] == "challenge"
    report = ingest_report(store, cache_hit=False, seconds=1.0, config={})  # what the ingest run logs
    assert report.metrics["source_codes_unmapped"] == 1.0 and "label_mapping" in report.tables
    prevalence = report.tables["label_prevalence"].set_index("code")
    assert prevalence.loc["AFIB", "n_external"] == 1 and "n_train" not in prevalence  # A0002 was too short


def test_a_folder_of_plain_wfdb_records_is_ingested_without_labels(tmp_path: Path) -> None:
    root = tmp_path / "export"
    _wfdb_dat(root / "2024" / "05", "ecg_17", 250, 12, ["exported from a hospital system"])
    assert detect_layout(root) == "wfdb"
    store = ingest(root, tmp_path / "store", IngestConfig(workers=1), progress=False).store
    assert store.labels is None and list(store.manifest["record_id"]) == ["2024/05/ecg_17"]


def test_a_folder_without_any_recognised_layout_is_one_line_naming_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no ECGs here")
    out = subprocess.run(
        [sys.executable, "-m", "ecgproto.cli", "ingest", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ECGPROTO_HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "ptbxl_database.csv (PTB-XL)" in line and "record_list.csv (MIMIC-IV-ECG)" in line and "*.hea" in line


def test_calibration_error_and_the_operating_point_match_their_definitions() -> None:
    from sklearn.metrics import confusion_matrix

    from ecgproto.evaluation.calibration import expected_calibration_error
    from ecgproto.evaluation.external import external_table

    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 20_000)
    calibrated = (rng.uniform(0, 1, p.size) < p).astype(int)
    assert expected_calibration_error(calibrated, p) < 0.02
    overconfident = (rng.uniform(0, 1, p.size) < 0.5 + 0.5 * (p - 0.5) * 0.2).astype(int)
    reference = sum(
        ((b <= p * 10) & (p * 10 < b + 1)).mean()
        * abs(overconfident[(b <= p * 10) & (p * 10 < b + 1)].mean() - p[(b <= p * 10) & (p * 10 < b + 1)].mean())
        for b in range(10)
    )
    assert expected_calibration_error(overconfident, p) == pytest.approx(reference, abs=1e-9)
    assert reference > 0.15

    y = np.stack([calibrated, np.zeros_like(calibrated), np.r_[np.ones(5), np.zeros(p.size - 5)]], axis=1)
    probs = np.stack([p, p, p], axis=1)
    table, apart = external_table(y, probs, ("A", "B", "C"), ("a", "b", "c"), n_boot=20, credentialed=True)
    assert apart.set_index("label").loc["C", "n_pos"] == "<10"  # a credentialed count below 10 is not exported
    tn, fp, fn, tp = confusion_matrix(calibrated, p >= 0.5).ravel()
    row = table.set_index("label").loc["A"]
    assert row["sensitivity"] == pytest.approx(tp / (tp + fn)) and row["specificity"] == pytest.approx(tn / (tn + fp))
    assert row["auroc_lo"] < row["auroc"] < row["auroc_hi"]
    why = dict(zip(apart["label"], apart["why"], strict=True))
    assert why["B"] == "no positives" and why["C"].startswith("fewer than 10 positives or negatives")
    import pandas as pd

    from ecgproto.evaluation.external import external_report

    own = pd.DataFrame({"code": ["A", "B", "C"], "n_pos": [300, 20, 9], "auroc": [0.9, 0.8, 0.7]})
    report = external_report(y, probs, ("A", "B", "C"), ("a", "b", "c"), own, n_boot=10)
    side = report.tables["external/labels"].set_index("label")
    assert side.loc["A", "training_test_auroc"] == 0.9  # the model's own test fold, beside the external figure
    # C has 5 positives: listed, not reported, so the like-for-like macro is over A alone
    assert report.metrics["macro_auroc_same_labels_training_test"] == pytest.approx(0.9)
    # what a training of this ecgproto logs (evaluation/operating.csv): every figure has its twin
    operating, _ = external_table(y, probs, ("A", "B", "C"), ("a", "b", "c"), n_boot=0)
    report = external_report(y, probs, ("A", "B", "C"), ("a", "b", "c"), operating, n_boot=10)
    side = report.tables["external/labels"].set_index("label")
    for column in ("auroc", "auprc", "ece", "sensitivity", "specificity", "prevalence"):
        assert side.loc["A", f"training_test_{column}"] == pytest.approx(side.loc["A", column])
    # the calibrated probabilities' ECE beside the raw one, and its twin from the training's test fold
    scaled = np.clip(probs * 0.5, 0, 1)
    operating, _ = external_table(y, probs, ("A", "B", "C"), ("a", "b", "c"), n_boot=0, calibrated=scaled)
    report = external_report(y, probs, ("A", "B", "C"), ("a", "b", "c"), operating, n_boot=10, calibrated=scaled)
    side = report.tables["external/labels"].set_index("label")
    assert side.loc["A", "ece_calibrated"] == pytest.approx(expected_calibration_error(y[:, 0], scaled[:, 0]))
    assert side.loc["A", "training_test_ece_calibrated"] == pytest.approx(side.loc["A", "ece_calibrated"])
    assert report.metrics["test.mean_ece_calibrated"] == pytest.approx(side["ece_calibrated"].mean())
    # beside the black box trained with the model: per label and macro, paired over the same resamples
    rng = np.random.default_rng(1)
    black_box = np.clip(probs + rng.normal(0, 0.3, probs.shape), 0, 1)
    report = external_report(y, probs, ("A", "B", "C"), ("a", "b", "c"), None, n_boot=50, black_box=black_box)
    row = report.tables["external/labels"].set_index("label").loc["A"]
    assert row["minus_black_box"] == pytest.approx(row["auroc"] - row["black_box_auroc"])
    assert row["minus_black_box_lo"] < row["minus_black_box"] < row["minus_black_box_hi"]
    m = report.metrics
    assert m["test.n_labels"] == 1 and m["test.macro_auroc"] == pytest.approx(row["auroc"])  # over label A only
    assert m["test.minus_black_box.macro_auroc_lo"] > 0  # the noisy black box ranks worse, and the CI says so
    assert "black box trained beside it" in report.documents["external/labels.md"]


@pytest.mark.slow
def test_evaluate_logs_each_label_of_the_external_set_beside_nothing_identifying(
    challenge: Path, tmp_path: Path, prefect_server: None, mlflow_uri: str
) -> None:
    import torch

    from ecgproto import tracking
    from ecgproto.flows.evaluate import evaluate_flow
    from ecgproto.model.config import ModelConfig
    from ecgproto.model.network import ECGProtoNet

    store = ingest(challenge, tmp_path / "store", IngestConfig(workers=1), progress=False).store
    torch.manual_seed(0)
    model = ECGProtoNet(ModelConfig.small(), load_label_set()).eval()
    with tracking.stage_run("train", uri=mlflow_uri) as run_id:
        logged = tracking.log_model(run_id, model, np.asarray(store.signals[:1], dtype=np.float32), None, mlflow_uri)
    out = evaluate_flow(str(store.path), logged["model_uri"], tracking_uri=mlflow_uri, device="cpu", bootstrap=10)
    info = tracking.describe(out["run_id"], mlflow_uri)
    assert info["status"] == "FINISHED" and info["tags"]["external"] == "true"
    assert {"external/labels.csv", "external/labels_not_reported.csv", "external/labels.md"} <= set(info["artifacts"])
    apart = tracking.run_table(out["run_id"], "external/labels_not_reported.csv", mlflow_uri).set_index("label")
    # 2 records: a label with a positive and a negative is listed with its counts, never with a CI or a rank
    few = apart[apart["why"].str.startswith("fewer than 10")]
    assert set(few.index) == {"SR", "AFIB", "CRBBB", "LVOLT"} and (few["n_pos"] + few["n_neg"] == 2).all()
    assert info["metrics"]["labels_reported"] == 0.0 and len(apart) == 71
    assert info["metrics"]["test.n_records"] == 2.0 and "test.macro_auroc" not in info["metrics"]
    assert "no label has >= 10 positives" in info["tags"]["mlflow.note.content"]
    logged_text = " ".join(
        Path(tracking.client(mlflow_uri).download_artifacts(out["run_id"], a, str(tmp_path / "dl"))).read_text()
        for a in info["artifacts"]
        if a.endswith(".csv")
    )
    assert "A0001" not in logged_text and "HR00003" not in logged_text


def test_a_wfdb_folder_takes_its_labels_from_a_csv_and_quarantines_records_it_does_not_list(tmp_path: Path) -> None:
    root = tmp_path / "export"
    for name in ("a", "b", "c", "d"):
        _wfdb_dat(root / "ward", name, 500, 10, [])
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text('record,scp_codes\nward/a,"AFIB,CRBBB"\nward/b,"{\'SR\': 100.0}"\nward/c,"AFIB,NOT_A_CODE"\n')
    config = IngestConfig(workers=1, labels_csv=str(labels_csv))
    store = ingest(root, tmp_path / "store", config, progress=False).store
    labels = load_label_set()
    positives = {
        rid: {labels.codes[j] for j in np.flatnonzero(store.labels[row])}
        for rid, row in zip(store.manifest["record_id"], store.manifest["row"], strict=True)
    }
    assert positives == {"ward/a": {"AFIB", "CRBBB"}, "ward/b": {"SR"}}
    q = store.quarantine.set_index("record_id")["reason"].to_dict()
    assert q == {"ward/c": "unknown_label", "ward/d": "unlabelled"}
    labels_csv.write_text(labels_csv.read_text() + "ward/d,SR\n")  # a changed labels file is a new store
    again = ingest(root, tmp_path / "store", config, progress=False)
    assert not again.cache_hit and "ward/d" in set(again.store.manifest["record_id"])


def test_label_rows_that_name_no_record_are_counted_and_named_in_the_ingest(tmp_path: Path) -> None:
    """A typo, a record not downloaded, '../x' or an absolute path in the labels file: reported, never read."""
    from ecgproto.data.summary import ingest_report

    root = tmp_path / "export"
    _wfdb_dat(root / "ward", "a", 500, 10, [])
    (tmp_path / "secret.hea").write_text("secret 12 500 5000\n")
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text(
        f"record,scp_codes\nward/a,AFIB\nward/typo,SR\n../secret,SR\n{(tmp_path / 'secret').as_posix()},SR\n"
    )
    result = ingest(root, tmp_path / "store", IngestConfig(workers=1, labels_csv=str(labels_csv)), progress=False)
    info = result.store.info
    assert list(result.store.manifest["record_id"]) == ["ward/a"]
    assert info["n_unmatched_label_rows"] == 3
    assert info["unmatched_label_examples"][:2] == ["ward/typo", "../secret"]
    report = ingest_report(result.store, cache_hit=False, seconds=1.0, config={})
    assert report.metrics["unmatched_label_rows"] == 3
