"""The MIMIC-IV-size tiled cohort: a MIMIC-IV-ECG layout whose signal files are hard links to a small pool,
tables appended chunk by chunk, readable by ingest and the study as a real cohort is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from ecgproto.data.demo.cohort import PLANTED
from ecgproto.data.demo.tiler import TiledCohortConfig, write_tiled_cohort
from ecgproto.data.ingest import IngestConfig, ingest
from ecgproto.data.wfdb_io import read_header


def test_a_tiled_cohort_links_its_records_to_the_pool_and_ingests_like_mimic(tmp_path: Path) -> None:
    config = TiledCohortConfig(n_subjects=120, pool=20, chunk_subjects=50, workers=1)
    counts = write_tiled_cohort(tmp_path / "cohort", config)
    root = tmp_path / "cohort"
    records = pd.read_csv(root / "mimic-iv-ecg" / "record_list.csv")
    assert len(records) == counts["ecgs"] > 3 * counts["subjects"] and records["study_id"].is_unique
    assert records["subject_id"].nunique() == counts["subjects"] == 120  # three chunks, one header row
    pool = {os.stat(p).st_ino for p in (root / "pool").rglob("*.dat")}
    assert len(pool) == 20
    for rel, study in zip(records["path"][:30], records["study_id"][:30], strict=True):
        base = root / "mimic-iv-ecg" / rel
        assert os.stat(f"{base}.dat").st_ino in pool  # a hard link: no second copy of the signal
        header = read_header(base)
        assert header.record_name == str(study) and {s.file for s in header.signals} == {f"{study}.dat"}
    admissions = pd.read_csv(root / "mimic-iv" / "hosp" / "admissions.csv.gz")  # gzip members, one per chunk
    diagnoses = pd.read_csv(root / "mimic-iv" / "hosp" / "diagnoses_icd.csv.gz", dtype={"icd_code": str})
    assert len(admissions) == counts["admissions"] and admissions["hadm_id"].is_unique
    assert len(diagnoses) == counts["diagnosis_rows"] and set(diagnoses["hadm_id"]) <= set(admissions["hadm_id"])
    planted = {c for dx in PLANTED for c in dx.icd9 + dx.icd10}
    assert diagnoses["icd_code"].isin(planted).any()
    assert diagnoses["icd_code"].nunique() > 300  # the background codes: a study tests many phecodes
    truth = json.loads((root / "ground_truth.json").read_text())
    assert truth["ecgs"] == counts["ecgs"] and len(truth["planted_associations"]) == len(PLANTED)

    store = ingest(root / "mimic-iv-ecg", tmp_path / "store", IngestConfig(workers=1), progress=False).store
    assert len(store.manifest) == counts["ecgs"] and len(store.quarantine) == 0
    assert (store.manifest["beat_source"] == "detected").mean() > 0.95
