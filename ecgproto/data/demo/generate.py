"""Write the demo datasets: a PTB-XL-layout training set and a MIMIC-IV-ECG + hosp cohort.

Both are written with `wfdb` in the exact layouts of the PhysioNet downloads, so the demo runs the
same code path as real data. Everything is deterministic from one seed (each record draws from its
own seed sequence, so the result does not depend on worker scheduling).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field
from scipy.signal import resample_poly
from tqdm.auto import tqdm

from ecgproto.data.demo.beat_model import PLANTED_LABELS, synthesize
from ecgproto.data.demo.cohort import draw_diagnoses, ground_truth, sample_labels
from ecgproto.data.demo.wfdb_writer import write_record
from ecgproto.data.labels import parse_scp_codes
from ecgproto.data.leads import LEADS, MIMIC_LEADS
from ecgproto.settings import reference_dir

PTBXL_NAMES = [lead.upper() for lead in LEADS]  # PTB-XL headers spell AVR, AVL, AVF
_RHYTHM_OR_FORM = {"SR", "AFIB", "STACH", "SBRAD", "PVC"}  # PTB-XL gives these likelihood 0
_REPORTS = {
    "SR": "Sinus rhythm",
    "AFIB": "Atrial fibrillation",
    "STACH": "Sinus tachycardia",
    "SBRAD": "Sinus bradycardia",
    "1AVB": "1st degree A-V block",
    "CLBBB": "Left bundle branch block",
    "CRBBB": "Right bundle branch block",
    "LVH": "Left ventricular hypertrophy",
    "IMI": "Inferior infarct - age undetermined",
    "STD_": "ST depression",
    "STE_": "ST elevation",
    "INVT": "T wave inversion",
    "LOWT": "Nonspecific T wave abnormality",
    "PVC": "Ventricular premature complex",
    "NORM": "Normal ECG",
}
# MIMIC-IV's hosp tables and MIMIC-IV-ECG's record list, the columns the demo writes
ADMISSION_COLUMNS = [
    "subject_id",
    "hadm_id",
    "admittime",
    "dischtime",
    "deathtime",
    "admission_type",
    "edregtime",
    "edouttime",
]
PATIENT_COLUMNS = ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"]
DIAGNOSIS_COLUMNS = ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"]
RECORD_COLUMNS = ["subject_id", "study_id", "file_name", "ecg_time", "path"]
_GZIP = {"method": "gzip", "mtime": 0}  # no timestamp in the header: same seed, same bytes
_HEDGES = {"LVH": "Possible ", "IMI": "Possible ", "STE_": "Consider "}


class DemoConfig(BaseModel):
    seed: int = 20261123
    n_ptbxl: int = Field(2000, ge=20, description="PTB-XL-layout records (100 Hz)")
    n_hr: int = Field(50, ge=0, description="of those, also written at 500 Hz (records500/)")
    n_mimic_subjects: int = Field(1500, ge=0, description="MIMIC-layout subjects (~2 ECGs each); 0 = none")
    noise: float = Field(1.0, ge=0, description="scale of baseline wander, hum and muscle noise")
    workers: int = Field(0, description="processes writing records; 0 = one per core")


@dataclass(frozen=True)
class DemoData:
    root: Path
    ptbxl: Path
    mimic_ecg: Path | None
    mimic_hosp: Path | None
    ground_truth: Path
    seconds: float


def _seed(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


# --- writing records (in worker processes) ---------------------------------------------------


def _write_ptbxl_record(task: tuple[int, int, list[str], str, str | None, float]) -> None:
    seed, ecg_id, labels, lr_base, hr_base, noise = task
    rng = _seed(seed, 1, ecg_id)
    x500, _ = synthesize(rng, set(labels), fs=500.0, noise=noise)
    x100 = resample_poly(x500, 1, 5, axis=0)  # as PTB-XL's records100 were made from records500
    for base, fs, x in ((lr_base, 100, x100), (hr_base, 500, x500)):
        if base is None:
            continue
        write_record(Path(base), x, fs, PTBXL_NAMES, adc_gain=1000.0)


def _write_mimic_record(task: tuple[int, int, list[str], str, str, float]) -> None:
    seed, study_id, labels, base, ecg_time, noise = task
    rng = _seed(seed, 2, study_id)
    x, _ = synthesize(rng, set(labels), fs=500.0, noise=noise, mains_hz=60.0)
    order = [LEADS.index(lead) for lead in MIMIC_LEADS]  # MIMIC stores aVF before aVL
    when = datetime.fromisoformat(ecg_time)
    write_record(
        Path(base), x[:, order], 500, list(MIMIC_LEADS), adc_gain=200.0, base_time=when.time(), base_date=when.date()
    )


def _run(fn, tasks: list, workers: int, desc: str) -> None:  # noqa: ANN001
    workers = workers or min(8, os.cpu_count() or 1)
    with tqdm(total=len(tasks), desc=desc, unit="rec", leave=False, disable=None) as bar:
        if workers <= 1:
            for t in tasks:
                fn(t)
                bar.update()
            return
        pool = mp.get_context("fork").Pool(workers)
        finished = False
        try:
            for _ in pool.imap_unordered(fn, tasks, chunksize=16):
                bar.update()
            finished = True
        finally:
            # close() lets workers exit on their own; terminate() (on error) makes them print tracebacks
            pool.close() if finished else pool.terminate()
            pool.join()


# --- PTB-XL layout -----------------------------------------------------------------------------


def _assign_folds(rng: np.random.Generator, patient_of: np.ndarray, labels: list[set[str]]) -> np.ndarray:
    """10 folds by patient, stratified: rarest-label-first greedy placement (as PTB-XL's folds)."""
    counts = pd.Series([lab for s in labels for lab in s]).value_counts()
    patients = np.unique(patient_of)
    rarity = {
        p: min((counts[lab] for i in np.flatnonzero(patient_of == p) for lab in labels[i]), default=0) for p in patients
    }
    order = sorted(patients, key=lambda p: (rarity[p], rng.random()))
    fold_size = np.zeros(10)
    fold_label = {lab: np.zeros(10) for lab in counts.index}
    fold_of_patient = {}
    for p in order:
        recs = np.flatnonzero(patient_of == p)
        rarest = min((lab for i in recs for lab in labels[i]), key=lambda lab: counts[lab])
        score = fold_label[rarest] * 1000 + fold_size
        f = int(np.argmin(score + rng.random(10) * 1e-3))
        fold_of_patient[p] = f + 1
        fold_size[f] += len(recs)
        for i in recs:
            for lab in labels[i]:
                fold_label[lab][f] += 1
    return np.array([fold_of_patient[p] for p in patient_of])


def _scp_codes(rng: np.random.Generator, labels: set[str]) -> str:
    items = {
        lab: (0.0 if lab in _RHYTHM_OR_FORM else float(rng.choice([100.0, 100.0, 80.0, 50.0])))
        for lab in sorted(labels, key=lambda lab: (lab in _RHYTHM_OR_FORM, lab))
    }
    return repr(items)


def write_ptbxl(root: Path, config: DemoConfig) -> pd.DataFrame:
    rng = np.random.default_rng([config.seed, 0])
    n = config.n_ptbxl
    n_patients = max(1, round(n * 0.87))
    patient_of = np.concatenate([np.arange(n_patients), rng.integers(0, n_patients, n - n_patients)])
    rng.shuffle(patient_of)
    age = np.clip(rng.normal(60, 17, n_patients), 18, 95).round()
    sex = (rng.random(n_patients) < 0.48).astype(int)  # PTB-XL: 0 male, 1 female
    labels = [sample_labels(rng, age[p], sex[p] == 0) for p in patient_of]
    folds = _assign_folds(rng, patient_of, labels)
    ecg_ids = np.arange(1, n + 1)
    hr_ids = set(ecg_ids[: config.n_hr].tolist())
    start = datetime(1984, 11, 9)
    table = pd.DataFrame(
        {
            "ecg_id": ecg_ids,
            "patient_id": (patient_of + 10000).astype(float),
            "age": age[patient_of],
            "sex": sex[patient_of],
            "height": np.nan,
            "weight": np.where(rng.random(n) < 0.4, rng.normal(75, 14, n).round(), np.nan),
            "nurse": np.nan,
            "site": 0.0,
            "device": "CS-12   E",
            "recording_date": [
                (start + timedelta(days=float(d))).strftime("%Y-%m-%d %H:%M:%S")
                for d in np.sort(rng.uniform(0, 6000, n))
            ],
            "report": ["; ".join(_REPORTS[lab].lower() for lab in sorted(s)) for s in labels],
            "scp_codes": [_scp_codes(rng, s) for s in labels],
            "heart_axis": np.nan,
            "infarction_stadium1": np.nan,
            "infarction_stadium2": np.nan,
            "validated_by": np.nan,
            "second_opinion": False,
            "initial_autogenerated_report": False,
            "validated_by_human": True,
            "baseline_drift": np.nan,
            "static_noise": np.nan,
            "burst_noise": np.nan,
            "electrodes_problems": np.nan,
            "extra_beats": ["1ES" if "PVC" in s else np.nan for s in labels],
            "pacemaker": np.nan,
            "strat_fold": folds,
            "filename_lr": [f"records100/{(i // 1000) * 1000:05d}/{i:05d}_lr" for i in ecg_ids],
            "filename_hr": [f"records500/{(i // 1000) * 1000:05d}/{i:05d}_hr" for i in ecg_ids],
        }
    )
    tasks = [
        (config.seed, int(i), sorted(s), str(root / lr), str(root / hr) if i in hr_ids else None, config.noise)
        for i, s, lr, hr in zip(ecg_ids, labels, table["filename_lr"], table["filename_hr"], strict=True)
    ]
    _run(_write_ptbxl_record, tasks, config.workers, "demo ptb-xl")
    table.to_csv(root / "ptbxl_database.csv", index=False)
    shutil.copyfile(reference_dir() / "scp_statements.csv", root / "scp_statements.csv")
    return table


# --- MIMIC-IV-ECG + hosp layout -------------------------------------------------------------------


def write_mimic(ecg_root: Path, hosp_root: Path, config: DemoConfig) -> dict[str, int]:
    rng = np.random.default_rng([config.seed, 3])
    patients, admissions, diagnoses, ecgs, measurements = [], [], [], [], []
    hadm_id, study_id = 20_000_000, 40_000_000
    for s in range(config.n_mimic_subjects):
        subject_id = 10_000_000 + s * 37
        male = bool(rng.random() < 0.52)
        anchor_age = int(rng.integers(16, 92)) if rng.random() < 0.97 else int(rng.integers(16, 18))
        anchor_year = int(rng.integers(2110, 2180))
        patients.append((subject_id, "M" if male else "F", anchor_age, anchor_year, "2014 - 2016", None))
        when = datetime(anchor_year, 1, 1) + timedelta(days=float(rng.uniform(0, 700)))
        for _ in range(1 + rng.poisson(0.6)):
            hadm_id += 1
            admit = when + timedelta(hours=float(rng.uniform(0, 24)))
            disch = admit + timedelta(days=float(rng.uniform(1, 12)))
            age = anchor_age + admit.year - anchor_year
            labels = sample_labels(rng, age, male, boost=1.6)
            version = 9 if rng.random() < 0.4 else 10
            codes = [] if rng.random() < 0.02 else draw_diagnoses(rng, labels, age, male, version)
            admissions.append(
                (
                    subject_id,
                    hadm_id,
                    admit,
                    disch,
                    None,
                    "EW EMER.",
                    admit - timedelta(hours=float(rng.uniform(1, 8))),
                    admit,
                )
            )
            diagnoses += [(subject_id, hadm_id, k + 1, c, version) for k, c in enumerate(codes)]
            first = admit - timedelta(hours=float(rng.uniform(0.5, 30)))  # ED ECG, inside the 7-day window
            for k in range(1 + int(rng.random() < 0.4)):
                study_id += int(rng.integers(1, 500))
                t = first + timedelta(hours=float(k * rng.uniform(12, 48)))
                ecgs.append((subject_id, study_id, t, labels))
            when = disch + timedelta(days=float(rng.uniform(30, 400)))
        if rng.random() < 0.2:  # an outpatient ECG outside every admission
            study_id += int(rng.integers(1, 500))
            ecgs.append((subject_id, study_id, when + timedelta(days=3), sample_labels(rng, anchor_age, male)))

    rows = []
    tasks = []
    for subject_id, sid, t, labels in ecgs:
        rel = f"files/p{str(subject_id)[:4]}/p{subject_id}/s{sid}/{sid}"
        rows.append((subject_id, sid, f"mimic-iv-ecg/{rel}", t.strftime("%Y-%m-%d %H:%M:%S"), rel))
        tasks.append((config.seed, sid, sorted(labels), str(ecg_root / rel), t.isoformat(), config.noise))
        measurements.append(_machine_measurements(rng, subject_id, sid, t, labels))
    _run(_write_mimic_record, tasks, config.workers, "demo mimic")

    pd.DataFrame(rows, columns=RECORD_COLUMNS).to_csv(ecg_root / "record_list.csv", index=False)
    pd.DataFrame(measurements).to_csv(ecg_root / "machine_measurements.csv", index=False)
    hosp_root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(patients, columns=PATIENT_COLUMNS).to_csv(
        hosp_root / "patients.csv.gz", index=False, compression=_GZIP
    )
    pd.DataFrame(admissions, columns=ADMISSION_COLUMNS).to_csv(
        hosp_root / "admissions.csv.gz", index=False, date_format="%Y-%m-%d %H:%M:%S", compression=_GZIP
    )
    pd.DataFrame(diagnoses, columns=DIAGNOSIS_COLUMNS).to_csv(
        hosp_root / "diagnoses_icd.csv.gz", index=False, compression=_GZIP
    )
    return {
        "subjects": len(patients),
        "admissions": len(admissions),
        "ecgs": len(ecgs),
        "diagnosis_rows": len(diagnoses),
    }


def _machine_measurements(
    rng: np.random.Generator, subject_id: int, study_id: int, t: datetime, labels: set[str]
) -> dict[str, object]:
    lines = [
        _HEDGES.get(lab, "") + _REPORTS[lab] if lab in _HEDGES and rng.random() < 0.4 else _REPORTS[lab]
        for lab in sorted(labels, key=lambda lab: (lab not in ("SR", "AFIB", "STACH", "SBRAD"), lab))
    ]
    lines.append("Normal ECG" if "NORM" in labels else "Abnormal ECG")
    lines = list(dict.fromkeys(lines))
    afib = "AFIB" in labels
    rr = 60000 / (
        rng.uniform(105, 150)
        if "STACH" in labels
        else rng.uniform(40, 55)
        if "SBRAD" in labels
        else rng.uniform(58, 110)
    )
    row: dict[str, object] = {
        "subject_id": subject_id,
        "study_id": study_id,
        "cart_id": 6848296,
        "machine": "TC50",
        "ecg_time": t.strftime("%Y-%m-%d %H:%M:%S"),
    }
    row.update({f"report_{k}": (lines[k] if k < len(lines) else None) for k in range(18)})
    row.update(
        {
            "bandwidth": "0.005-150 Hz",
            "filtering": "60 Hz  Notch  Baseline Correction",
            "rr_interval": int(rr),
            "p_onset": 29999 if afib else 40,
            "p_end": 29999 if afib else 140,
            "qrs_onset": 200,
            "qrs_end": 200 + int(rng.uniform(130, 170) if "CLBBB" in labels else rng.uniform(80, 105)),
            "t_end": 600,
            "p_axis": 29999 if afib else int(rng.normal(50, 20)),
            "qrs_axis": int(rng.normal(40, 30)),
            "t_axis": int(rng.normal(45, 30)),
        }
    )
    return row


# --- everything ---------------------------------------------------------------------------------


def generate_demo(root: Path, config: DemoConfig | None = None) -> DemoData:
    """Write all demo datasets under `root` (replacing what is there) and the ground-truth file."""
    config = config or DemoConfig()
    t0 = time.perf_counter()
    root = Path(root).resolve()
    tmp = root.with_name(f".{root.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    ptbxl, ecg_root, hosp_root = tmp / "ptbxl", tmp / "mimic-iv-ecg", tmp / "mimic-iv" / "hosp"
    ptbxl.mkdir(parents=True)
    table = write_ptbxl(ptbxl, config)
    mimic_counts = {}
    if config.n_mimic_subjects:
        ecg_root.mkdir(parents=True)
        mimic_counts = write_mimic(ecg_root, hosp_root, config)
    prevalence = pd.Series([c for s in table["scp_codes"] for c in parse_scp_codes(s)]).value_counts()
    truth = {
        "seed": config.seed,
        "config": config.model_dump(),
        "ptbxl": {
            "n_records": int(len(table)),
            "planted_labels": PLANTED_LABELS,
            "label_counts": {k: int(v) for k, v in prevalence.items()},
        },
        "mimic": {**mimic_counts, **ground_truth()} if mimic_counts else None,
    }
    (tmp / "ground_truth.json").write_text(json.dumps(truth, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.rename(tmp, root)
    mimic = root / "mimic-iv-ecg" if mimic_counts else None
    return DemoData(
        root,
        root / "ptbxl",
        mimic,
        root / "mimic-iv" / "hosp" if mimic_counts else None,
        root / "ground_truth.json",
        time.perf_counter() - t0,
    )
