"""Dataset layouts as downloaded from PhysioNet: PTB-XL and MIMIC-IV-ECG -> a listing of records.

A listing is what ingest works from: one row per record (id, WFDB path, metadata), the multi-hot
labels where the layout has them, and the rows already refused (duplicate ids, malformed labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ecgproto.data.labels import LabelError, LabelSet, load_label_set, multi_hot, parse_scp_codes

Layout = Literal["ptbxl", "mimic_ecg"]
QUARANTINE_COLUMNS = ["record_id", "file", "reason", "message"]


class DatasetError(ValueError):
    """The dataset as a whole is unusable (missing index file, missing columns)."""


@dataclass
class DatasetListing:
    layout: Layout
    root: Path
    credentialed: bool
    records: pd.DataFrame  # record_id (str), path (relative, no extension), metadata columns
    labels: np.ndarray | None  # (n_records, n_labels) uint8, aligned with records
    quarantine: pd.DataFrame  # QUARANTINE_COLUMNS
    metadata_files: list[Path] = field(default_factory=list)


def detect_layout(root: Path) -> Layout:
    if (root / "ptbxl_database.csv").exists():
        return "ptbxl"
    if (root / "record_list.csv").exists():
        return "mimic_ecg"
    raise DatasetError(
        f"{root}: neither ptbxl_database.csv (PTB-XL) nor record_list.csv (MIMIC-IV-ECG) found; "
        "point ingest at the folder you downloaded from PhysioNet"
    )


def list_records(root: Path, layout: Layout | Literal["auto"] = "auto", *, model_fs: int = 100,
                 min_likelihood: float = 0.0, labels: LabelSet | None = None) -> DatasetListing:
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "ptbxl":
        return _ptbxl(root, model_fs, min_likelihood, labels or load_label_set())
    if layout == "mimic_ecg":
        return _mimic_ecg(root)
    raise DatasetError(f"unknown layout {layout!r}; use 'ptbxl', 'mimic_ecg' or 'auto'")


def _require(table: pd.DataFrame, columns: list[str], file: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(f"{file}: missing column(s) {missing}; is this the original file?")


def _refuse(frame: pd.DataFrame, mask: pd.Series, file_col: str, reason: str, messages: pd.Series | str) -> pd.DataFrame:
    rows = frame.loc[mask]
    return pd.DataFrame({
        "record_id": rows["record_id"].astype(str).to_numpy(),
        "file": rows[file_col].astype(str).to_numpy(),
        "reason": reason,
        "message": messages if isinstance(messages, str) else messages.loc[mask].to_numpy(),
    })


def _ptbxl(root: Path, model_fs: int, min_likelihood: float, labels: LabelSet) -> DatasetListing:
    index_file = root / "ptbxl_database.csv"
    db = pd.read_csv(index_file, dtype={"ecg_id": str})
    _require(db, ["ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", "filename_lr", "filename_hr"], index_file)
    db = db.rename(columns={"ecg_id": "record_id"})
    db["record_id"] = db["record_id"].str.strip()
    column = "filename_lr" if model_fs <= 100 else "filename_hr"
    db["path"] = db[column].astype("string")
    refused = []

    dup = db["record_id"].duplicated(keep=False)
    counts = db["record_id"].map(db["record_id"].value_counts())
    refused.append(_refuse(db, dup, "path", "duplicate_id",
                           "ecg_id appears " + counts.astype(str) + f" times in {index_file.name}; keep one row per ecg_id"))
    db = db.loc[~dup]

    no_path = db["path"].isna() | (db["path"].str.strip() == "")
    refused.append(_refuse(db.assign(path=db["path"].fillna("")), no_path, "path", "missing_filename",
                           f"{column} is empty in {index_file.name}"))
    db = db.loc[~no_path]

    fold = pd.to_numeric(db["strat_fold"], errors="coerce")
    bad_fold = ~fold.isin(range(1, 11))
    refused.append(_refuse(db, bad_fold, "path", "bad_fold", "strat_fold is not an integer 1-10"))
    db = db.loc[~bad_fold].assign(strat_fold=fold.loc[~bad_fold].astype(int))

    targets, messages = [], {}
    for record_id, text in zip(db["record_id"], db["scp_codes"], strict=True):
        try:
            targets.append(multi_hot(parse_scp_codes(text), labels, min_likelihood))
        except LabelError as exc:
            messages[record_id] = f"{exc}; fix the scp_codes cell in {index_file.name}"
            targets.append(None)
    bad_labels = db["record_id"].isin(messages)
    refused.append(_refuse(db, bad_labels, "path", "malformed_scp_codes", db["record_id"].map(messages)))
    keep = ~bad_labels.to_numpy()
    db = db.loc[keep].reset_index(drop=True)
    y = np.stack([t for t, k in zip(targets, keep, strict=True) if k]) if keep.any() else np.zeros((0, len(labels)), np.uint8)

    db["split"] = np.select([db["strat_fold"] <= 8, db["strat_fold"] == 9], ["train", "val"], "test")
    records = pd.DataFrame({
        "record_id": db["record_id"].astype(str),
        "path": db["path"].astype(str),
        "patient_id": pd.to_numeric(db["patient_id"], errors="coerce").astype("Int64").astype(str),
        "age": pd.to_numeric(db["age"], errors="coerce"),
        "sex": pd.to_numeric(db["sex"], errors="coerce"),
        "strat_fold": db["strat_fold"],
        "split": db["split"],
        "labels_text": [" ".join(labels.codes[i] for i in np.flatnonzero(row)) for row in y],
    })
    quarantine = pd.concat(refused, ignore_index=True)
    return DatasetListing("ptbxl", root, False, records, y, quarantine, [index_file])


def _mimic_ecg(root: Path) -> DatasetListing:
    index_file = root / "record_list.csv"
    rl = pd.read_csv(index_file, dtype={"subject_id": str, "study_id": str})
    _require(rl, ["subject_id", "study_id", "ecg_time", "path"], index_file)
    rl = rl.rename(columns={"study_id": "record_id"})
    dup = rl["record_id"].duplicated(keep=False)
    counts = rl["record_id"].map(rl["record_id"].value_counts())
    refused = [_refuse(rl, dup, "path", "duplicate_id",
                       "study_id appears " + counts.astype(str) + f" times in {index_file.name}")]
    rl = rl.loc[~dup].reset_index(drop=True)
    records = pd.DataFrame({
        "record_id": rl["record_id"].astype(str),
        "path": rl["path"].astype(str),
        "subject_id": rl["subject_id"].astype(str),
        "ecg_time": rl["ecg_time"].astype(str),
        "split": "external",
    })
    return DatasetListing("mimic_ecg", root, True, records, None, pd.concat(refused, ignore_index=True), [index_file])
