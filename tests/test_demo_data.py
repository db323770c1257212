import filecmp
import json
from pathlib import Path

import numpy as np
import pandas as pd
import wfdb
from scipy.signal import find_peaks

from ecgproto.data.demo.beat_model import synthesize
from ecgproto.data.demo.generate import DemoConfig, generate_demo
from ecgproto.data.leads import LEADS


def _rr(x: np.ndarray, fs: float) -> np.ndarray:
    lead = x[:, LEADS.index("II")] - np.median(x[:, LEADS.index("II")])
    peaks, _ = find_peaks(lead, height=0.5 * lead.max(), distance=int(0.25 * fs))
    return np.diff(peaks) / fs


def test_limb_leads_obey_einthoven_and_goldberger() -> None:
    x, _ = synthesize(np.random.default_rng(3), {"SR", "NORM"}, noise=0.0)
    i, ii, iii, avr, avl, avf = (x[:, k] for k in range(6))
    for lhs, rhs in ((iii, ii - i), (avr, -(i + ii) / 2), (avl, i - ii / 2), (avf, ii - i / 2)):
        np.testing.assert_allclose(lhs, rhs, atol=1e-5)


def test_planted_rhythm_labels_are_measurable_in_the_signal() -> None:
    rng = np.random.default_rng(7)
    hr = {
        lab: np.mean([60 / np.median(_rr(synthesize(rng, {lab}, noise=0.3)[0], 500)) for _ in range(10)])
        for lab in ("SBRAD", "SR", "STACH")
    }
    assert hr["SBRAD"] < 56 < hr["SR"] < 100 < hr["STACH"]
    cv = {
        lab: np.mean(
            [np.std(r) / np.mean(r) for r in (_rr(synthesize(rng, {lab}, noise=0.3)[0], 500) for _ in range(10))]
        )
        for lab in ("SR", "AFIB")
    }
    assert cv["AFIB"] > 3 * cv["SR"]
    qrs_energy = {
        lab: np.mean([np.abs(synthesize(rng, {lab}, noise=0.0)[0]).max() for _ in range(10)]) for lab in ("SR", "LVH")
    }
    assert qrs_energy["LVH"] > 1.5 * qrs_energy["SR"]


def test_demo_is_deterministic_from_its_seed_and_opens_with_plain_wfdb(demo_root: Path, tmp_path: Path) -> None:
    config = DemoConfig(**json.loads((demo_root / "ground_truth.json").read_text())["config"])
    again = generate_demo(tmp_path / "again", config.model_copy(update={"workers": 1})).root
    for rel in [
        "ptbxl/ptbxl_database.csv",
        "ptbxl/records100/00000/00007_lr.dat",
        "ptbxl/records500/00000/00003_hr.hea",
        "mimic-iv-ecg/record_list.csv",
        "mimic-iv/hosp/diagnoses_icd.csv.gz",
    ]:
        assert filecmp.cmp(demo_root / rel, again / rel, shallow=False), rel
    other = generate_demo(tmp_path / "other", config.model_copy(update={"seed": 1, "n_mimic_subjects": 0}))
    assert not filecmp.cmp(
        demo_root / "ptbxl/ptbxl_database.csv", other.root / "ptbxl/ptbxl_database.csv", shallow=False
    )
    signal, fields = wfdb.rdsamp(str(demo_root / "ptbxl/records100/00000/00007_lr"))
    assert signal.shape == (1000, 12) and fields["fs"] == 100 and fields["units"] == ["mV"] * 12
    assert 0.3 < np.ptp(signal[:, 1]) < 6  # a plausible lead II in mV


def test_ptbxl_layout_folds_are_by_patient_and_stratified(demo_root: Path) -> None:
    db = pd.read_csv(demo_root / "ptbxl" / "ptbxl_database.csv")
    assert db.groupby("patient_id")["strat_fold"].nunique().max() == 1
    assert set(db["strat_fold"]) == set(range(1, 11))
    sizes = db["strat_fold"].value_counts()
    assert sizes.max() - sizes.min() <= 0.35 * sizes.mean()
    afib_folds = db[db["scp_codes"].str.contains("'AFIB'")]["strat_fold"].value_counts()
    assert afib_folds.max() - afib_folds.min() <= 2


def test_mimic_cohort_has_mimic_lead_order_hosp_tables_and_ground_truth(demo_root: Path) -> None:
    ecg = demo_root / "mimic-iv-ecg"
    records = pd.read_csv(ecg / "record_list.csv")
    _, fields = wfdb.rdsamp(str(ecg / records["path"].iloc[0]))
    assert fields["sig_name"][3:6] == ["aVR", "aVF", "aVL"] and fields["fs"] == 500 and fields["sig_len"] == 5000
    hosp = demo_root / "mimic-iv" / "hosp"
    patients = pd.read_csv(hosp / "patients.csv.gz")
    admissions = pd.read_csv(hosp / "admissions.csv.gz")
    dx = pd.read_csv(hosp / "diagnoses_icd.csv.gz", dtype={"icd_code": str})
    assert set(dx["icd_version"]) == {9, 10} and not dx["icd_code"].str.contains(r"\.").any()  # undotted, as MIMIC
    assert set(admissions["subject_id"]) <= set(patients["subject_id"])
    assert set(records["subject_id"]) <= set(patients["subject_id"])
    mm = pd.read_csv(ecg / "machine_measurements.csv")
    assert {"report_0", "report_17", "rr_interval", "p_axis"} <= set(mm.columns)
    truth = json.loads((demo_root / "ground_truth.json").read_text())["mimic"]
    planted = {p["pattern"]: p["phecode"] for p in truth["planted_associations"]}
    assert planted["AFIB"] == "427.21" and planted["LVH"] == "428"
    assert all(p["odds_ratio"] > 1 for p in truth["planted_associations"])
