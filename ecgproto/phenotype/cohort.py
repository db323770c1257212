"""The external cohort: MIMIC-IV hosp admissions linked to the ECGs of an ingested MIMIC-IV-ECG store.

An ECG belongs to an admission when its time lies in [admittime - window, dischtime]; an ECG that
falls in two admissions' windows goes to the one it lies inside, else to the next admission, ties
by hadm_id. One ECG per admission: the earliest. Age from anchor_age/anchor_year (90+ top-coded),
sex from gender; adults with at least one diagnosis code; by default one admission per subject.

With every admission (`admissions="all"`) the analysis unit is still the subject: `unit_of` maps each
admission to its subject, whose ECG features are averaged and whose phecodes are pooled over its
admissions, so the association tests see independent rows (see docs/design.md).

Admissions whose dischtime precedes admittime, or whose times do not parse, and ECGs whose
ecg_time does not parse are left out with a step of their own in `flow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


class CohortError(ValueError):
    """A hosp table is missing or lacks the columns MIMIC-IV gives it."""


class CohortConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silent default

    window_before_days: float = Field(7.0, ge=0, description="an ECG up to this long before admittime still counts")
    strict: bool = Field(False, description="only ECGs inside [admittime, dischtime]")
    min_age: float = 18.0
    admissions: Literal["first", "all"] = Field(
        "first", description="first eligible admission per subject, or all of them (subject-grouped CV then)"
    )


@dataclass
class Cohort:
    """One row per admission in the analysis: hadm_id, subject_id, store row of its ECG, covariates."""

    table: pd.DataFrame  # hadm_id, subject_id, record_id, row, ecg_time, age, age_top_coded, male
    diagnoses: pd.DataFrame  # the cohort admissions' rows of diagnoses_icd
    flow: pd.DataFrame  # step, n, unit: what is left after each step (a CONSORT-style count table)
    units: pd.DataFrame  # one row per analysis unit (subject): subject_id, age (first ECG), male, admissions
    unit_of: np.ndarray  # (n,) the unit (row of `units`) of each admission

    @property
    def n(self) -> int:
        return len(self.table)


def read_table(hosp: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """hosp/<name>.csv or .csv.gz, with the columns checked."""
    for suffix in (".csv.gz", ".csv"):
        f = Path(hosp) / f"{name}{suffix}"
        if f.exists():
            frame = pd.read_csv(f, dtype={"icd_code": str})
            missing = [c for c in columns if c not in frame.columns]
            if missing:
                raise CohortError(f"{f}: missing column(s) {missing}; is this MIMIC-IV hosp/{name}?")
            return frame
    raise CohortError(f"{hosp}: neither {name}.csv.gz nor {name}.csv found (MIMIC-IV hosp module)")


def link_ecgs(ecgs: pd.DataFrame, admissions: pd.DataFrame, config: CohortConfig) -> pd.DataFrame:
    """ecgs (record_id, subject_id, ecg_time, row) x admissions -> one ECG per admission (the earliest)."""
    e = ecgs.assign(ecg_time=pd.to_datetime(ecgs["ecg_time"], errors="coerce"))
    a = admissions.assign(
        admittime=pd.to_datetime(admissions["admittime"], errors="coerce"),
        dischtime=pd.to_datetime(admissions["dischtime"], errors="coerce"),
    )
    start = a["admittime"] - pd.Timedelta(days=0 if config.strict else config.window_before_days)
    a = a.assign(window_start=start)
    m = e.merge(a[["subject_id", "hadm_id", "admittime", "dischtime", "window_start"]], on="subject_id")
    m = m[(m["ecg_time"] >= m["window_start"]) & (m["ecg_time"] <= m["dischtime"])]
    # An ECG in two windows: prefer the admission it lies inside, then the nearest admittime after it.
    inside = (m["ecg_time"] >= m["admittime"]).astype(int)
    m = m.assign(_inside=inside, _gap=(m["admittime"] - m["ecg_time"]).abs())
    m = m.sort_values(["record_id", "_inside", "_gap", "hadm_id"], ascending=[True, False, True, True])
    m = m.drop_duplicates("record_id")
    m = m.sort_values(["hadm_id", "ecg_time", "record_id"]).drop_duplicates("hadm_id")
    return m[["hadm_id", "subject_id", "record_id", "row", "ecg_time", "admittime"]].reset_index(drop=True)


LISTED_STEP = "ECG records the dataset lists (the ingest run's n_listed)"


def build_cohort(
    manifest: pd.DataFrame,
    hosp: Path,
    config: CohortConfig | None = None,
    drop_rows: np.ndarray | None = None,
    drop_step: str = "",
    listed: int | None = None,
) -> Cohort:
    """manifest: the cohort store's (record_id, subject_id, ecg_time, row); hosp: MIMIC-IV hosp folder.
    `drop_rows`: store rows whose admissions are left out (not replaced by another ECG), as the flow step
    `drop_step` (e.g. ECGs the model is too uncertain about)."""
    config = config or CohortConfig()
    patients = read_table(hosp, "patients", ["subject_id", "gender", "anchor_age", "anchor_year"])
    admissions = read_table(hosp, "admissions", ["subject_id", "hadm_id", "admittime", "dischtime"])
    diagnoses = read_table(hosp, "diagnoses_icd", ["subject_id", "hadm_id", "icd_code", "icd_version"])
    ecgs = manifest[["record_id", "subject_id", "ecg_time", "row"]].copy()
    ecgs["subject_id"] = pd.to_numeric(ecgs["subject_id"], errors="raise").astype("int64")
    # `listed`: the records the dataset's index listed (the ingest run publishes it): with it in the flow, a count
    # the ingest run hid (its quarantine) stays hidden here too, however the two runs' numbers are combined
    steps = [] if listed is None else [(LISTED_STEP, int(listed), "ECGs")]
    steps.append(("ECGs in the store", len(ecgs), "ECGs"))
    ecgs = ecgs[pd.to_datetime(ecgs["ecg_time"], errors="coerce").notna()]
    steps.append(("ECGs with a readable ecg_time (others left out)", len(ecgs), "ECGs"))
    steps.append(("admissions in hosp", len(admissions), "admissions"))
    admit = pd.to_datetime(admissions["admittime"], errors="coerce")
    disch = pd.to_datetime(admissions["dischtime"], errors="coerce")
    admissions = admissions[admit.notna() & disch.notna()]
    steps.append(("with readable admittime and dischtime", len(admissions), "admissions"))
    admissions = admissions[disch[admissions.index] >= admit[admissions.index]]
    steps.append(("dischtime not before admittime", len(admissions), "admissions"))

    linked = link_ecgs(ecgs, admissions, config)
    steps.append(("with a usable ECG in the window", len(linked), "admissions"))
    linked = linked.merge(patients[["subject_id", "gender", "anchor_age", "anchor_year"]], on="subject_id", how="inner")
    age = linked["anchor_age"] + pd.to_datetime(linked["ecg_time"]).dt.year - linked["anchor_year"]
    linked["age_top_coded"] = (linked["anchor_age"] >= 91) | (age >= 90)  # MIMIC stores every 89+ as 91
    linked["age"] = np.minimum(age, 90).astype(float)
    linked["male"] = linked["gender"].astype(str).str.upper().str.startswith("M")
    linked = linked[linked["age"] >= config.min_age]
    steps.append((f"age >= {config.min_age:g}", len(linked), "admissions"))
    coded = set(diagnoses["hadm_id"])
    linked = linked[linked["hadm_id"].isin(coded)]
    steps.append(("with >= 1 diagnosis code", len(linked), "admissions"))
    if config.admissions == "first":
        linked = linked.sort_values(["subject_id", "admittime", "hadm_id"]).drop_duplicates("subject_id")
        steps.append(("first eligible admission per subject", len(linked), "admissions"))
    if drop_rows is not None:
        linked = linked[~linked["row"].isin(np.asarray(drop_rows))]
        steps.append((drop_step or "rows left out", len(linked), "admissions"))
    table = linked.sort_values("hadm_id")[
        ["hadm_id", "subject_id", "record_id", "row", "ecg_time", "age", "age_top_coded", "male"]
    ].reset_index(drop=True)
    subjects, unit_of = np.unique(table["subject_id"].to_numpy(), return_inverse=True)
    first = table.assign(_unit=unit_of).sort_values(["_unit", "ecg_time", "hadm_id"]).drop_duplicates("_unit")
    units = pd.DataFrame(
        {
            "subject_id": subjects,
            "age": first["age"].to_numpy(),
            "male": first["male"].to_numpy(),
            "admissions": np.bincount(unit_of, minlength=len(subjects)),
        }
    )
    steps.append(("subjects analysed (one row each)", len(units), "subjects"))
    dx = diagnoses[diagnoses["hadm_id"].isin(set(table["hadm_id"]))].reset_index(drop=True)
    return Cohort(table, dx, pd.DataFrame(steps, columns=["step", "n", "unit"]), units, unit_of.ravel())
