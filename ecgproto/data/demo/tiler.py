"""A MIMIC-IV-size synthetic cohort, written in chunks: the ECGs are hard links to a pool of distinct records.

800,000 raw 500 Hz 12-lead records would take ~96 GB. Instead `pool` distinct records are generated once
(the demo's beat model, MIMIC-IV-ECG's lead order, gain and rate) and every ECG of the cohort is a hard link
to one of them (a link costs a directory entry, no data) beside its own small header (the record's name
must be its own). Each pool record has its ECG labels; an admission's diagnoses are drawn from the labels
of the pool records its ECGs link to, with the demo's planted (pattern -> diagnosis) odds ratios, so a study
must find the same associations as on the demo; background diagnoses (one ICD-10 code for each other
phecode, independent of the ECG) make the study test as many phecodes as one on MIMIC-IV and, being null,
show its false-positive rate at that size. Subjects are written `chunk_subjects` at a time: the
tables are appended chunk by chunk and nothing of the cohort is held in memory beyond one chunk.

Layout under `root` (as `generate_demo` writes it, so `ecgproto associate` runs on it unchanged):

  mimic-iv-ecg/files/pNNNN/pNNNNNNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}, record_list.csv, machine_measurements.csv
  mimic-iv/hosp/{patients,admissions,diagnoses_icd}.csv.gz     (gzip members appended per chunk)
  pool/                                                        the distinct records the .dat files link to
  ground_truth.json                                            the planted associations and the sizes
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from ecgproto.data.demo.cohort import NULL, PLANTED, draw_diagnoses, ground_truth, sample_labels
from ecgproto.data.demo.generate import (
    ADMISSION_COLUMNS,
    DIAGNOSIS_COLUMNS,
    PATIENT_COLUMNS,
    RECORD_COLUMNS,
    _machine_measurements,
    _run,
    _write_mimic_record,
)
from ecgproto.phenotype.phecodes import PhecodeMap


class TiledCohortConfig(BaseModel):
    """The size of a tiled cohort. MIMIC-IV-ECG: ~160,000 subjects, ~800,000 ECGs (5 per subject)."""

    model_config = ConfigDict(extra="forbid")

    n_subjects: int = Field(160_000, ge=1)
    background_phecodes: bool = Field(
        True,
        description="besides the demo's diagnoses, one ICD-10 code per other phecode of the Phecode 1.2 map, "
        "drawn independently of the ECG (prevalence 0.3-3%): a study tests ~1,800 phecodes, as on MIMIC-IV",
    )
    pool: int = Field(2_000, ge=10, description="distinct generated records the ECGs link to")
    admissions_per_subject: float = Field(1.0, ge=0, description="mean of the extra admissions (Poisson) after one")
    ecgs_per_admission: float = Field(1.5, ge=0, description="mean of the extra ECGs (Poisson) after one")
    seed: int = 20261206
    noise: float = Field(1.0, ge=0)
    chunk_subjects: int = Field(10_000, ge=1, description="subjects per written chunk (memory bound)")
    workers: int = Field(0, description="processes generating the pool; 0 = one per core")


def _pool(root: Path, config: TiledCohortConfig) -> tuple[list[str], list[tuple[str, ...]]]:
    """Write the pool records; returns each one's file base (relative to root) and its labels."""
    rng = np.random.default_rng([config.seed, 1])
    labels, tasks, bases = [], [], []
    for i in range(config.pool):
        age, male = float(rng.uniform(30, 90)), bool(rng.random() < 0.52)
        lab = tuple(sorted(sample_labels(rng, age, male, boost=1.6)))
        base = root / "pool" / f"{i // 1000:03d}" / f"9{i:07d}"  # a MIMIC-like 8-digit record name
        labels.append(lab)
        bases.append(str(base.relative_to(root)))
        tasks.append((config.seed, 90_000_000 + i, list(lab), str(base), "2180-01-01T12:00:00", config.noise))
    _run(_write_mimic_record, tasks, config.workers, "tiled cohort: pool")
    return bases, labels


def write_tiled_cohort(root: Path | str, config: TiledCohortConfig | None = None) -> dict[str, object]:
    """Write the cohort under `root` (replaced if present); returns its sizes and the seconds it took."""
    config = config or TiledCohortConfig()
    t0 = time.perf_counter()
    root = Path(root).resolve()
    if root.exists():
        shutil.rmtree(root)
    ecg_root, hosp = root / "mimic-iv-ecg", root / "mimic-iv" / "hosp"
    ecg_root.mkdir(parents=True)
    hosp.mkdir(parents=True)
    bases, pool_labels = _pool(root, config)
    headers = [(root / f"{b}.hea").read_text(encoding="latin-1") for b in bases]
    by_labels: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for i, lab in enumerate(pool_labels):
        by_labels[lab].append(i)
    pools = {k: np.asarray(v) for k, v in by_labels.items()}

    background, prevalence = _background_codes() if config.background_phecodes else ([], np.zeros(0))
    rng = np.random.default_rng([config.seed, 2])
    hadm_id, study_id = 20_000_000, 40_000_000
    counts = {"subjects": 0, "admissions": 0, "ecgs": 0, "diagnosis_rows": 0}
    first = True
    for lo in range(0, config.n_subjects, config.chunk_subjects):
        patients, admissions, diagnoses, records, measurements = [], [], [], [], []
        for s in range(lo, min(lo + config.chunk_subjects, config.n_subjects)):
            subject_id = 10_000_000 + s * 37
            male = bool(rng.random() < 0.52)
            anchor_age = int(rng.integers(18, 92))
            anchor_year = int(rng.integers(2110, 2180))
            patients.append((subject_id, "M" if male else "F", anchor_age, anchor_year, "2014 - 2016", None))
            when = datetime(anchor_year, 1, 1) + timedelta(days=float(rng.uniform(0, 700)))
            for _ in range(1 + rng.poisson(config.admissions_per_subject)):
                hadm_id += 1
                admit = when + timedelta(hours=float(rng.uniform(0, 24)))
                disch = admit + timedelta(days=float(rng.uniform(1, 12)))
                age = anchor_age + admit.year - anchor_year
                # the stay's ECG pattern: one pool record's labels; its ECGs are distinct records with those labels
                labels = pool_labels[int(rng.integers(config.pool))]
                version = 9 if rng.random() < 0.4 else 10
                codes = draw_diagnoses(rng, set(labels), age, male, version)
                admissions.append(
                    (subject_id, hadm_id, admit, disch, None, "EW EMER.", admit - timedelta(hours=2), admit)
                )
                diagnoses += [(subject_id, hadm_id, k + 1, c, version) for k, c in enumerate(codes)]
                t = admit - timedelta(hours=float(rng.uniform(0.5, 30)))  # the ED ECG, inside the window
                for _ in range(1 + rng.poisson(config.ecgs_per_admission)):
                    study_id += int(rng.integers(1, 50))
                    k = int(rng.choice(pools[labels]))
                    rel = f"files/p{str(subject_id)[:4]}/p{subject_id}/s{study_id}/{study_id}"
                    records.append((subject_id, study_id, f"mimic-iv-ecg/{rel}", t.strftime("%Y-%m-%d %H:%M:%S"), rel))
                    _link(ecg_root / rel, root / bases[k], headers[k], study_id)
                    measurements.append(_machine_measurements(rng, subject_id, study_id, t, set(labels)))
                    t += timedelta(hours=float(rng.uniform(6, 48)))
                when = disch + timedelta(days=float(rng.uniform(30, 400)))
        if background:  # drawn for the whole chunk at once: (admissions x codes) Bernoulli draws
            hit = rng.random((len(admissions), len(background)), dtype=np.float32) < prevalence
            for a, c in zip(*np.nonzero(hit), strict=True):
                subject, hadm = admissions[a][0], admissions[a][1]
                diagnoses.append((subject, hadm, 100 + int(c), background[c], 10))
        _append(ecg_root / "record_list.csv", pd.DataFrame(records, columns=RECORD_COLUMNS), first)
        _append(ecg_root / "machine_measurements.csv", pd.DataFrame(measurements), first)
        _append(hosp / "patients.csv.gz", pd.DataFrame(patients, columns=PATIENT_COLUMNS), first)
        _append(hosp / "admissions.csv.gz", pd.DataFrame(admissions, columns=ADMISSION_COLUMNS), first)
        _append(hosp / "diagnoses_icd.csv.gz", pd.DataFrame(diagnoses, columns=DIAGNOSIS_COLUMNS), first)
        first = False
        counts["subjects"] += len(patients)
        counts["admissions"] += len(admissions)
        counts["ecgs"] += len(records)
        counts["diagnosis_rows"] += len(diagnoses)
    truth = {"config": config.model_dump(), **counts, "pool_records": config.pool, **ground_truth()}
    (root / "ground_truth.json").write_text(json.dumps(truth, indent=2))
    return {**counts, "seconds": time.perf_counter() - t0}


def _background_codes() -> tuple[list[str], np.ndarray]:
    """One undotted ICD-10 code per phecode (for both sexes) whose most specific phecode it is, leaving out the
    phecode families of the demo's planted and null diagnoses; and each code's prevalence (log-uniform 0.3-3%,
    a fixed draw)."""
    pmap = PhecodeMap.load("1.2")
    taken = {dx.phecode.split(".")[0] for dx in PLANTED + NULL}
    both = set(pmap.info.index[pmap.info["sex"] == "Both"])
    chosen: dict[str, str] = {}
    for (icd, version), phecodes in sorted(pmap.icd_to_phecodes.items()):
        if version != 10 or "-" in icd or not phecodes:
            continue
        leaf = max(phecodes, key=len)
        if leaf in both and leaf.split(".")[0] not in taken and leaf not in chosen:
            chosen[leaf] = icd.replace(".", "")
    codes = [chosen[k] for k in sorted(chosen)]
    rng = np.random.default_rng(7)
    return codes, np.exp(rng.uniform(np.log(0.003), np.log(0.03), len(codes))).astype(np.float32)


def _link(base: Path, pool_base: Path, pool_header: str, study_id: int) -> None:
    """The record's own header (the pool record's, renamed) and its signal file as a hard link to the pool's."""
    base.parent.mkdir(parents=True, exist_ok=True)
    old = pool_base.name
    base.with_suffix(".hea").write_text(pool_header.replace(old, str(study_id)), encoding="latin-1")
    os.link(pool_base.with_suffix(".dat"), base.with_suffix(".dat"))


def _append(path: Path, frame: pd.DataFrame, first: bool) -> None:
    """Append a chunk to a CSV (a new gzip member for .gz: concatenated members are one valid gzip file)."""
    text = frame.to_csv(index=False, header=first, date_format="%Y-%m-%d %H:%M:%S").encode()
    if path.suffix == ".gz":
        with path.open("ab") as f:
            f.write(gzip.compress(text, mtime=0))
    else:
        with path.open("ab") as f:
            f.write(text)
