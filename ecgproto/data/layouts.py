"""Dataset layouts as downloaded from PhysioNet -> a listing of records.

  ptbxl      PTB-XL: ptbxl_database.csv (labels: scp_codes; folds: strat_fold)
  mimic_ecg  MIMIC-IV-ECG: record_list.csv (credentialed; no labels)
  challenge  PhysioNet/CinC Challenge 2020/2021 sets (CPSC, Georgia, Chapman-Shaoxing, Ningbo, PTB, INCART,
             ...): .hea + .mat (or .dat) pairs at any depth, `# Age:`, `# Sex:`, `# Dx:` (SNOMED CT codes,
             mapped to the PTB-XL statements by the shipped `snomed_scp.csv`; unmapped codes are counted)
  wfdb       any folder of WFDB records (every .hea below it), unlabelled

A listing is what ingest works from: one row per record (id, WFDB path, metadata), the multi-hot
labels where the layout has them, and the rows already refused (duplicate ids, malformed labels).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ecgproto.data.labels import LabelError, LabelSet, load_label_set, multi_hot, parse_scp_codes

Layout = Literal["ptbxl", "mimic_ecg", "challenge", "wfdb"]
LAYOUTS: tuple[str, ...] = ("ptbxl", "mimic_ecg", "challenge", "wfdb")
_COMMENT = re.compile(r"^#\s*(Age|Sex|Dx)\s*:\s*(.*?)\s*$", re.IGNORECASE)
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
    label_mapping: pd.DataFrame | None = None  # challenge: every source code, its records and its statement
    unmatched_label_rows: list[str] = field(default_factory=list)  # a labels file's rows naming no record found


def detect_layout(root: Path) -> Layout:
    if (root / "ptbxl_database.csv").exists():
        return "ptbxl"
    if (root / "record_list.csv").exists():
        return "mimic_ecg"
    headers = _headers(root)
    if headers:
        return "challenge" if any(_comments(h).get("dx") for h in headers[:50]) else "wfdb"
    raise DatasetError(
        f"{root}: no ptbxl_database.csv (PTB-XL), record_list.csv (MIMIC-IV-ECG) or WFDB header (*.hea: a "
        "PhysioNet Challenge set or any WFDB folder) found; point ingest at the folder you downloaded"
    )


def _headers(root: Path) -> list[Path]:
    """Every WFDB header below `root`, in a stable order (hidden folders, e.g. a store's, skipped)."""
    return sorted(p for p in root.rglob("*.hea") if not any(part.startswith(".") for part in p.relative_to(root).parts))


def _comments(header: Path) -> dict[str, str]:
    """`# Age:`, `# Sex:`, `# Dx:` of a header ({} when unreadable: the record's own read names the fault)."""
    out: dict[str, str] = {}
    try:
        lines = header.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        if m := _COMMENT.match(line.strip()):
            out[m.group(1).lower()] = m.group(2)
    return out


def check_root(root: Path, layout: Layout | Literal["auto"] = "auto") -> Layout:
    """The layout of `root`, or a DatasetError saying why it cannot be ingested (checked before any run starts)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if layout == "auto":
        return detect_layout(root)
    if layout not in LAYOUTS:
        raise DatasetError(
            f"unknown layout {layout!r}; recognised layouts: 'ptbxl' (ptbxl_database.csv), "
            "'mimic_ecg' (record_list.csv), 'challenge' (.hea with # Dx: SNOMED codes), 'wfdb' (any .hea), "
            "or 'auto'"
        )
    return layout


def list_records(
    root: Path,
    layout: Layout | Literal["auto"] = "auto",
    *,
    model_fs: int = 100,
    min_likelihood: float = 0.0,
    labels: LabelSet | None = None,
    allow_outside_root: bool = False,
    labels_csv: Path | None = None,
) -> DatasetListing:
    """`allow_outside_root`: accept record paths that lead outside `root` (otherwise quarantined as
    outside_root: an index file should not make ingest read files elsewhere on the machine)."""
    root = Path(root).resolve()
    layout = check_root(root, layout)
    if layout == "ptbxl":
        listing = _ptbxl(root, model_fs, min_likelihood, labels or load_label_set())
    elif layout == "mimic_ecg":
        listing = _mimic_ecg(root)
    else:
        listing = _wfdb_folder(root, layout, labels or load_label_set(), labels_csv)
    out = outside_root(listing.records, root, allow_outside_root).to_numpy()
    if out.any():
        refused = _refuse(
            listing.records,
            pd.Series(out, index=listing.records.index),
            "path",
            "outside_root",
            "the record path leads outside the dataset folder; move the record into it, or allow "
            "this with --allow-outside-root",
        )
        listing.quarantine = pd.concat([listing.quarantine, refused], ignore_index=True)
        listing.records = listing.records.loc[~out].reset_index(drop=True)
        if listing.labels is not None:
            listing.labels = listing.labels[~out]
    return listing


def read_index(file: Path, dtype: dict[str, type]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An index CSV -> (rows, refused rows). A row with more fields than the header, or with bytes that are
    not UTF-8, is refused with the line number (its record is quarantined), not the whole file; a file
    that is not CSV at all is a DatasetError naming the file."""
    bad_lines: list[tuple[int, list[str]]] = []

    def keep_aside(fields: list[str]) -> None:  # python engine: a row of the wrong width
        bad_lines.append((0, fields))

    try:
        table = pd.read_csv(file, dtype=dtype, encoding_errors="replace")
    except pd.errors.ParserError:
        table = pd.read_csv(file, dtype=dtype, encoding_errors="replace", engine="python", on_bad_lines=keep_aside)
    except (UnicodeError, ValueError, OSError) as exc:
        raise DatasetError(f"{file}: cannot be read as CSV ({exc}); is this the original file?") from exc
    id_column = {"ptbxl_database.csv": "ecg_id", "record_list.csv": "study_id"}.get(file.name, table.columns[0])
    header = list(table.columns)
    refused = [
        {
            "record_id": str(
                f[header.index(id_column)] if id_column in header and len(f) > header.index(id_column) else "?"
            ).strip(),
            "file": file.name,
            "reason": "ragged_row",
            "message": f"a row of {file.name} has {len(f)} fields, the header {len(header)}; fix that row",
        }
        for _, f in bad_lines
    ]
    text = table.select_dtypes(include=["object", "string"])
    garbled = (
        text.apply(lambda c: c.astype(str).str.contains("\ufffd", regex=False)).any(axis=1)
        if len(text.columns)
        else pd.Series(False, index=table.index)
    )
    for i in np.flatnonzero(garbled.to_numpy()):
        cols = [c for c in text.columns if "\ufffd" in str(text.iloc[i][c])]
        refused.append(
            {
                "record_id": str(table.iloc[i].get(id_column, "?")).strip(),
                "file": file.name,
                "reason": "bad_encoding",
                "message": f"column(s) {cols} of {file.name} line {i + 2} hold "
                "bytes that are not UTF-8; re-save the file as UTF-8",
            }
        )
    return table.loc[~garbled.to_numpy()].reset_index(drop=True), pd.DataFrame(refused, columns=QUARANTINE_COLUMNS)


def outside_root(frame: pd.DataFrame, root: Path, allow: bool) -> pd.Series:
    """Rows whose record path leads outside the dataset folder ('../x', an absolute path), unless allowed."""
    if allow:
        return pd.Series(False, index=frame.index)
    from ecgproto.data.wfdb_io import is_inside

    base = str(root.resolve())
    return frame["path"].astype(str).map(lambda p: not is_inside(os.path.join(base, p), base))


def _require(table: pd.DataFrame, columns: list[str], file: Path) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetError(f"{file}: missing column(s) {missing}; is this the original file?")


def _refuse(
    frame: pd.DataFrame, mask: pd.Series, file_col: str, reason: str, messages: pd.Series | str
) -> pd.DataFrame:
    rows = frame.loc[mask]
    return pd.DataFrame(
        {
            "record_id": rows["record_id"].astype(str).to_numpy(),
            "file": rows[file_col].astype(str).to_numpy(),
            "reason": reason,
            "message": messages if isinstance(messages, str) else messages.loc[mask].to_numpy(),
        }
    )


def _ptbxl(root: Path, model_fs: int, min_likelihood: float, labels: LabelSet) -> DatasetListing:
    index_file = root / "ptbxl_database.csv"
    db, unreadable = read_index(index_file, {"ecg_id": str})
    _require(
        db, ["ecg_id", "patient_id", "age", "sex", "scp_codes", "strat_fold", "filename_lr", "filename_hr"], index_file
    )
    db = db.rename(columns={"ecg_id": "record_id"})
    db["record_id"] = db["record_id"].str.strip()
    column = "filename_lr" if model_fs <= 100 else "filename_hr"
    db["path"] = db[column].astype("string")
    refused = [unreadable]

    dup = db["record_id"].duplicated(keep=False)
    counts = db["record_id"].map(db["record_id"].value_counts())
    refused.append(
        _refuse(
            db,
            dup,
            "path",
            "duplicate_id",
            "ecg_id appears " + counts.astype(str) + f" times in {index_file.name}; keep one row per ecg_id",
        )
    )
    db = db.loc[~dup]

    no_path = db["path"].isna() | (db["path"].str.strip() == "")
    refused.append(
        _refuse(
            db.assign(path=db["path"].fillna("")),
            no_path,
            "path",
            "missing_filename",
            f"{column} is empty in {index_file.name}",
        )
    )
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
    y = (
        np.stack([t for t, k in zip(targets, keep, strict=True) if k])
        if keep.any()
        else np.zeros((0, len(labels)), np.uint8)
    )

    db["split"] = np.select([db["strat_fold"] <= 8, db["strat_fold"] == 9], ["train", "val"], "test")
    records = pd.DataFrame(
        {
            "record_id": db["record_id"].astype(str),
            "path": db["path"].astype(str),
            "patient_id": pd.to_numeric(db["patient_id"], errors="coerce").astype("Int64").astype(str),
            "age": pd.to_numeric(db["age"], errors="coerce"),
            "sex": pd.to_numeric(db["sex"], errors="coerce"),
            "strat_fold": db["strat_fold"],
            "split": db["split"],
            "labels_text": [" ".join(labels.codes[i] for i in np.flatnonzero(row)) for row in y],
        }
    )
    quarantine = pd.concat(refused, ignore_index=True)
    return DatasetListing("ptbxl", root, False, records, y, quarantine, [index_file])


def _mimic_ecg(root: Path) -> DatasetListing:
    index_file = root / "record_list.csv"
    rl, unreadable = read_index(index_file, {"subject_id": str, "study_id": str})
    _require(rl, ["subject_id", "study_id", "ecg_time", "path"], index_file)
    rl = rl.rename(columns={"study_id": "record_id"})
    dup = rl["record_id"].duplicated(keep=False)
    counts = rl["record_id"].map(rl["record_id"].value_counts())
    refused = [
        unreadable,
        _refuse(
            rl, dup, "path", "duplicate_id", "study_id appears " + counts.astype(str) + f" times in {index_file.name}"
        ),
    ]
    rl = rl.loc[~dup].reset_index(drop=True)
    records = pd.DataFrame(
        {
            "record_id": rl["record_id"].astype(str),
            "path": rl["path"].astype(str),
            "subject_id": rl["subject_id"].astype(str),
            "ecg_time": rl["ecg_time"].astype(str),
            "split": "external",
        }
    )
    return DatasetListing("mimic_ecg", root, True, records, None, pd.concat(refused, ignore_index=True), [index_file])


def load_snomed_map(path: Path | None = None) -> pd.DataFrame:
    """The shipped SNOMED CT -> PTB-XL statement table (snomed_ct, abbreviation, diagnosis, scp_code)."""
    from ecgproto.settings import reference_dir

    table = pd.read_csv(path or reference_dir() / "snomed_scp.csv", dtype=str, keep_default_na=False)
    return table


def _wfdb_folder(root: Path, layout: Layout, labels: LabelSet, labels_csv: Path | None = None) -> DatasetListing:
    """Every .hea below `root` is a record (id: its path relative to `root`, without extension). For the
    challenge layout, `# Dx:` codes become labels through the SNOMED map; for a wfdb folder, the rows of
    `labels_csv` (record, scp_codes) when given."""
    headers = _headers(root)
    if not headers:
        raise DatasetError(f"{root}: no WFDB header (*.hea) found below this folder")
    rows, codes_of = [], []
    for h in headers:
        c = _comments(h)
        rel = h.relative_to(root).with_suffix("").as_posix()
        age = pd.to_numeric(c.get("age", ""), errors="coerce")
        sex = c.get("sex", "").strip().lower()
        rows.append(
            {
                "record_id": rel,
                "path": rel,
                "age": float(age) if pd.notna(age) else np.nan,
                "sex": {"male": "male", "m": "male", "female": "female", "f": "female"}.get(sex, ""),
                "split": "external",
            }
        )
        codes_of.append([x.strip() for x in c.get("dx", "").split(",") if x.strip()])
    records = pd.DataFrame(rows)
    empty = pd.DataFrame(columns=QUARANTINE_COLUMNS)
    if layout == "wfdb":
        if labels_csv is None:
            return DatasetListing("wfdb", root, False, records, None, empty, [])
        return _with_labels_csv(DatasetListing("wfdb", root, False, records, None, empty, []), labels_csv, labels)
    table = load_snomed_map()
    index = labels.index
    to_scp = {r.snomed_ct: r.scp_code for r in table.itertuples() if r.scp_code in index}
    y = np.zeros((len(records), len(labels)), dtype=np.uint8)
    seen: dict[str, int] = {}
    for i, codes in enumerate(codes_of):
        for code in dict.fromkeys(codes):
            seen[code] = seen.get(code, 0) + 1
            if code in to_scp:
                y[i, index[to_scp[code]]] = 1
    names = table.set_index("snomed_ct")
    mapping = pd.DataFrame(
        {
            "snomed_ct": list(seen),
            "abbreviation": [names["abbreviation"].get(c, "") for c in seen],
            "diagnosis": [names["diagnosis"].get(c, "") for c in seen],
            "n_records": list(seen.values()),
            "scp_code": [to_scp.get(c, "") for c in seen],
        }
    ).sort_values("n_records", ascending=False, kind="stable")
    mapping["mapped"] = mapping["scp_code"] != ""
    records["dx_codes"] = [",".join(c) for c in codes_of]
    return DatasetListing("challenge", root, False, records, y, empty, [], mapping.reset_index(drop=True))


def _with_labels_csv(listing: DatasetListing, csv: Path, labels: LabelSet) -> DatasetListing:
    """Label a wfdb folder from a CSV of `record, scp_codes` ('AFIB,CRBBB', or PTB-XL's dict literal): a
    record the file does not list is quarantined as unlabelled, a malformed row as malformed_scp_codes."""
    table, unreadable = read_index(csv, {"record": str, "scp_codes": str})
    _require(table, ["record", "scp_codes"], csv)
    given = dict(zip(table["record"].str.strip(), table["scp_codes"].fillna(""), strict=True))
    records = listing.records
    y = np.zeros((len(records), len(labels)), dtype=np.uint8)
    keep = np.ones(len(records), dtype=bool)
    why: list[str] = []
    reasons: list[str] = []
    for i, rid in enumerate(records["record_id"]):
        text = given.get(rid)
        if text is None:
            keep[i] = False
            reasons.append("unlabelled")
            why.append(f"not in {csv.name}; add a row for it (record, scp_codes) or leave the labels file out")
            continue
        try:
            codes = (
                parse_scp_codes(text)
                if text.strip().startswith("{")
                else {c.strip(): 100.0 for c in text.split(",") if c.strip()}
            )
        except LabelError as exc:
            keep[i] = False
            reasons.append("malformed_scp_codes")
            why.append(f"{csv.name}: {exc}")
            continue
        if unknown := [c for c in codes if c not in labels.index]:
            keep[i] = False
            reasons.append("unknown_label")
            why.append(f"{csv.name}: {', '.join(unknown)} not among the 71 PTB-XL statements the model knows")
            continue
        y[i] = multi_hot(codes, labels)
    refused = records.loc[~keep, ["record_id", "path"]].rename(columns={"path": "file"})
    refused["reason"], refused["message"] = reasons, why
    listing.records = records.loc[keep].reset_index(drop=True)
    listing.labels = y[keep]
    listing.quarantine = pd.concat([listing.quarantine, unreadable, refused[QUARANTINE_COLUMNS]], ignore_index=True)
    listing.metadata_files = [csv]
    # a row naming no record below the folder (a typo, a record not downloaded, '../x' or an absolute path) is
    # reported with the ingest, never read
    listed = set(records["record_id"])
    listing.unmatched_label_rows = [r for r in given if r not in listed]
    return listing
