"""What the ingest and demo-data stages report: counts, prevalence, quarantine, example ECGs.

Credentialed stores (MIMIC) report no identifiers and no count below 10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ecgproto.data.labels import LabelSet, load_label_set, parse_scp_codes
from ecgproto.data.store import ArrayStore
from ecgproto.figures import plot_ecg, plot_label_prevalence
from ecgproto.privacy import MIN_CELL, suppress_counts
from ecgproto.report import DatasetRef, StageReport

SPLITS = ("train", "val", "test")


def label_prevalence(store: ArrayStore, labels: LabelSet | None = None) -> pd.DataFrame:
    """Positives per label and split, in label order."""
    labels = labels or load_label_set()
    if store.labels is None:
        raise ValueError(f"{store.path}: this store has no labels (layout {store.info['layout']})")
    m = store.manifest
    table = pd.DataFrame({"code": labels.codes, "description": labels.descriptions, "branch": labels.branch_of})
    present = set(m["split"].astype(str))
    splits = list(SPLITS) if present & set(SPLITS) or not present else []
    splits += sorted(present - set(SPLITS))  # e.g. an external validation set's one split
    for split in splits:
        rows = m.loc[m["split"] == split, "row"].to_numpy()
        table[f"n_{split}"] = np.asarray(store.labels[np.sort(rows)]).sum(axis=0).astype(int) if len(rows) else 0
    table["n_total"] = table[[f"n_{s}" for s in splits]].sum(axis=1)
    table["prevalence"] = table["n_total"] / max(len(m), 1)
    return table


def manifest_summary(store: ArrayStore) -> pd.DataFrame:
    m = store.manifest
    rows = []
    for split, g in m.groupby("split"):
        row = {"split": split, "n_records": len(g)}
        if "patient_id" in g:
            row["n_patients"] = g["patient_id"].nunique()
            row["age_mean"] = round(float(g["age"].mean()), 1)
            row["female_share"] = round(float((g["sex"] == 1).mean()), 3)
        if "subject_id" in g:
            row["n_subjects"] = g["subject_id"].nunique()
        row["resampled_from_hz"] = ",".join(sorted({f"{v:g}" for v in g["fs_in"]}))
        rows.append(row)
    return pd.DataFrame(rows)


def quarantine_table(store: ArrayStore) -> pd.DataFrame:
    """Per record for open data; counts per reason for credentialed data (small ones hidden, with the
    complements that keep them hidden, see `credentialed_counts`)."""
    q = store.quarantine
    if not store.info.get("credentialed"):
        return q
    return credentialed_counts(store.info, q)[1]


def example_records(store: ArrayStore, per_label: int = 1, max_figures: int = 8) -> list[tuple[int, str, str]]:
    """(row, record_id, labels_text) of a few records, one per frequent label, for example plots."""
    m = store.manifest
    if "labels_text" not in m:
        return []
    picks, seen = [], set()
    counts = pd.Series(" ".join(m["labels_text"]).split()).value_counts()
    for code in counts.index:
        hits = m[m["labels_text"].str.split().apply(lambda codes, c=code: c in codes) & ~m["row"].isin(seen)]
        for _, r in hits.head(per_label).iterrows():
            picks.append((int(r["row"]), str(r["record_id"]), str(r["labels_text"])))
            seen.add(int(r["row"]))
        if len(picks) >= max_figures:
            break
    return picks


def credentialed_counts(info: dict, quarantine: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """What a credentialed store may export: records listed = stored + quarantined, and the quarantine
    reasons add up to the quarantined, so each is hidden below 10 with complements (`Disclosure`)."""
    from ecgproto.privacy import Disclosure

    d = Disclosure(MIN_CELL)
    listed, stored = d.cell(info["n_listed"], keep=1), d.cell(info["n_records"], keep=1)
    quarantined = d.cell(info["n_quarantined"])
    d.total(listed, [stored, quarantined])
    per_reason = quarantine.groupby("reason").size().rename("n_records").reset_index()
    reasons = [d.cell(int(n)) for n in per_reason["n_records"]]
    if reasons:
        d.total(quarantined, reasons)
    fallback = d.cell(info.get("n_beat_fallback", 0))
    hidden = d.protect()
    listed_s, stored_s, quarantined_s, fallback_s = d.shown([listed, stored, quarantined, fallback], hidden)
    shown = {k: v for k, v in info.items() if k != "shape"}  # the array's rows are the records listed
    shown.update(n_listed=listed_s, n_records=stored_s, n_quarantined=quarantined_s, n_beat_fallback=fallback_s)
    return shown, per_reason.assign(n_records=d.shown(reasons, hidden))


def ingest_report(store: ArrayStore, *, cache_hit: bool, seconds: float, config: dict[str, object]) -> StageReport:
    info = store.info
    credentialed = bool(info.get("credentialed"))
    q = store.quarantine
    document, reasons_table = credentialed_counts(info, q) if credentialed else (info, None)
    counts = {
        k: float(v) if str(v).isdigit() else float("nan")
        for k, v in document.items()
        if k in ("n_listed", "n_records", "n_quarantined")
    }
    report = StageReport(
        params={
            "config": config,
            "layout": info["layout"],
            "store_path": str(store.path),
            "store_dtype": info["dtype"],
            **({} if credentialed else {"store_shape": info["shape"]}),
        },
        metrics={**counts, "seconds": seconds, "cache_hit": float(cache_hit)},
        tags={"dataset_hash": store.key, "layout": info["layout"], "credentialed": str(credentialed).lower()},
        documents={"store.json": document},
    )
    if not credentialed:
        for reason, n in q.groupby("reason").size().items():
            report.metrics[f"quarantined.{reason}"] = int(n)
        if "n_unmatched_label_rows" in info:  # a labels file's rows that name no record found
            report.metrics["unmatched_label_rows"] = int(info["n_unmatched_label_rows"])
    if not cache_hit and seconds > 0 and not credentialed:
        report.metrics["records_per_s"] = info["n_listed"] / seconds
    summary = manifest_summary(store) if len(store.manifest) else pd.DataFrame()
    if credentialed and len(summary):  # one split: its records are the store's; subjects hidden below 10
        summary["n_records"] = (
            document["n_records"] if len(summary) == 1 else suppress_counts(summary, ["n_records"])["n_records"]
        )
        if "n_subjects" in summary:
            summary = suppress_counts(summary, ["n_subjects"])
    report.tables["manifest_summary"] = summary
    report.tables["quarantine"] = quarantine_table(store)
    if (store.path / "label_mapping.parquet").exists():  # a Challenge set: source codes -> statements
        mapping = pd.read_parquet(store.path / "label_mapping.parquet")
        report.tables["label_mapping"] = mapping
        report.metrics["source_codes_mapped"] = float(mapping["mapped"].sum())
        report.metrics["source_codes_unmapped"] = float((~mapping["mapped"]).sum())
    if store.labels is not None:  # per label counts as a table and a figure, not 71 metrics
        prevalence = label_prevalence(store)
        report.tables["label_prevalence"] = prevalence
        report.figures["label_prevalence.png"] = plot_label_prevalence(prevalence)
    report.datasets.append(store_dataset(store, "output"))
    reasons = (
        reasons_table.assign(n=reasons_table["n_records"].astype(str))
        if credentialed and reasons_table is not None
        else q.groupby("reason").size().rename("n").reset_index()
    )
    why = ", ".join(f"{r.reason} {r.n}" for r in reasons.itertuples(index=False))
    report.description = (
        f"**Ingest** of a {info['layout']} folder{' (credentialed: counts below 10 hidden)' if credentialed else ''}: "
        f"**{document['n_records']}** records in the store `{store.key[:16]}`, {document['n_quarantined']} "
        f"quarantined{f' ({why})' if why else ''}{'; a cache hit, nothing read' if cache_hit else ''}.\n\n"
        "Open: [quarantine](artifacts/quarantine.csv) (each refused record and what to do), "
        "[records per split](artifacts/manifest_summary.csv)"
        + (", [label prevalence](artifacts/label_prevalence.png)" if store.labels is not None else "")
        + "."
    )
    if not credentialed:  # no waveforms of credentialed patients in artifacts
        fs = int(info["config"]["preprocess"]["fs"])
        for row, record_id, text in example_records(store):
            report.figures[f"examples/ecg_{record_id}.png"] = plot_ecg(
                np.asarray(store.signals[row]), fs, f"record {record_id} (preprocessed): {text}"
            )
    return report


def demo_report(ground_truth_file: Path, ptbxl_root: Path, seconds: float) -> StageReport:
    """The demo-data stage: sizes, ground truth, and raw demo ECGs as read back with plain wfdb."""
    import json

    import wfdb

    from ecgproto.data.leads import lead_permutation

    truth = json.loads(ground_truth_file.read_text())
    report = StageReport(
        params={"demo": truth["config"]},
        metrics={"seconds": seconds, "n_ptbxl": truth["ptbxl"]["n_records"]},
        documents={"ground_truth.json": truth},
    )
    if truth.get("mimic"):
        for k in ("subjects", "admissions", "ecgs", "diagnosis_rows"):
            report.metrics[f"mimic_{k}"] = truth["mimic"][k]
    db = pd.read_csv(ptbxl_root / "ptbxl_database.csv")
    shown: set[str] = set()
    for _, r in db.iterrows():
        codes = [c for c in parse_scp_codes(r["scp_codes"]) if c not in shown and c != "SR"]
        if not codes:
            continue
        signal, fields = wfdb.rdsamp(str(ptbxl_root / r["filename_lr"]))
        x = signal[:, lead_permutation(fields["sig_name"])].T
        report.figures[f"demo_ecgs/ecg_{r['ecg_id']}.png"] = plot_ecg(
            x, fields["fs"], f"demo record {r['ecg_id']} (raw, wfdb.rdsamp): {r['scp_codes']}"
        )
        shown.update(codes)
        if len(report.figures) >= 8:
            break
    return report


SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def store_dataset(store: ArrayStore, context: str, split: str | None = None) -> DatasetRef:
    """The store (or one split of it) as the MLflow dataset a run used or wrote: named by layout and dataset hash,
    its digest the hash, its source the store folder; the record count only for non-credentialed sets."""
    rows = store.rows(split) if split else store.manifest["row"].to_numpy()
    name = f"{store.info['layout']} {store.key[:8]}" + (f" ({SPLIT_NAMES.get(split, split)} split)" if split else "")
    profile = {} if store.info.get("credentialed") else {"records": int(len(rows))}
    return DatasetRef(name, store.key[:32], str(store.path), context, profile)
